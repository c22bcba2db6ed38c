//! Types shared by more than one resource: references to Services, HTTP methods, path
//! matches and the patterns that constrain names.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A DNS-1035 label, as Kubernetes requires of Service names.
pub const DNS_LABEL_PATTERN: &str = r"^[a-z]([-a-z0-9]*[a-z0-9])?$";

/// An HTTP header name (an RFC 9110 token).
pub const HEADER_NAME_PATTERN: &str = r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$";

/// An absolute request path.
pub const PATH_PATTERN: &str = r"^/[^?#\s]*$";

/// A Service in the same namespace as the resource that names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRef {
    /// Name of the Service, in this resource's namespace.
    #[schemars(length(min = 1, max = 63), pattern(DNS_LABEL_PATTERN))]
    pub name: String,
    /// Service port this applies to. When omitted, every port of the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
}

/// An HTTP request method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
#[allow(missing_docs)]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Connect,
    Options,
    Trace,
    Patch,
}

/// How a request path is matched. Exactly one of `exact`, `prefix` or `regex` is set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, kube::KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "[has(self.exact), has(self.prefix), has(self.regex)].filter(x, x).size() == 1"
).message("exactly one of exact, prefix or regex must be set"))]
pub struct PathMatch {
    /// The path must equal this value, such as `/api/v1/orders`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), pattern(PATH_PATTERN))]
    pub exact: Option<String>,
    /// The path must start with this value at a segment boundary: `/api` matches
    /// `/api` and `/api/orders`, not `/apis`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), pattern(PATH_PATTERN))]
    pub prefix: Option<String>,
    /// The whole path must match this RE2 regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub regex: Option<String>,
}

/// How a header or query parameter value is compared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ValueMatchType {
    /// The value must equal the given string.
    #[default]
    Exact,
    /// The whole value must match the given RE2 regular expression.
    RegularExpression,
}
