//! `Policy`: who may talk to a workload, over which transport, and how fast.
//!
//! Deny wins: a request matched by any `Deny` rule is refused even if an `Allow` rule also
//! matches; a request no rule matches gets `defaultAction`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    common::{DNS_LABEL_PATTERN, HttpMethod, PathMatch},
    status::Status,
};

/// Inbound policy for the pods it selects: the mTLS mode, allow and deny rules by client
/// identity, port, path and method, a default action, and an optional rate limit.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "Policy",
    namespaced,
    doc = "Policy says who may talk to the pods it selects, over which transport and how fast: the mTLS mode, allow and deny rules by client identity, port, path and method (deny wins), a default action and an optional rate limit.",
    status = "Status",
    shortname = "wpolicy",
    category = "weft",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.target.service"}"#,
    printcolumn = r#"{"name":"mTLS","type":"string","jsonPath":".spec.mtls.mode"}"#,
    printcolumn = r#"{"name":"Default","type":"string","jsonPath":".spec.defaultAction"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = kube::core::Rule::new(
    "!((has(self.mtls) ? self.mtls.mode : 'Strict') == 'Strict' && has(self.rules) && self.rules.exists(r, r.action == 'Allow' && has(r.from) && r.from.exists(s, has(s.unauthenticated) && s.unauthenticated)))"
).message("mtls.mode Strict refuses unauthenticated clients, so a rule allowing them can never match; use Permissive or drop the rule").field_path(".rules"))]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    /// The workload this policy protects.
    pub target: PolicyTarget,
    /// Transport security required of clients.
    #[serde(default)]
    pub mtls: Mtls,
    /// What happens to a request that no rule matches (default `Deny`).
    #[serde(default)]
    pub default_action: Action,
    /// Allow and deny rules. Deny wins over allow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub rules: Vec<PolicyRule>,
    /// Limits the request rate the workload receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Dry run of the authorization (`rules` and `defaultAction`): let every request
    /// through, and record (a counter and a rate-limited log line) each one this Policy
    /// would have denied. The mTLS mode and the rate limit are not affected.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// The pods a Policy applies to: exactly one of `selector` or `service`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.selector) != has(self.service)")
    .message("exactly one of target.selector or target.service must be set"))]
pub struct PolicyTarget {
    /// Pods in this namespace whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// The pods behind this Service (by its selector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(DNS_LABEL_PATTERN))]
    pub service: Option<String>,
}

/// Transport security settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Mtls {
    /// `Strict` (default): only mutual-TLS clients. `Permissive`: mutual TLS or plain
    /// text. `Disabled`: plain text only.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// Which transports a workload accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MtlsMode {
    /// Only clients that present a mesh identity over mutual TLS.
    #[default]
    Strict,
    /// Mutual TLS or plain text; plain-text clients are unauthenticated.
    Permissive,
    /// Plain text only.
    Disabled,
}

/// What a rule or the default does with a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Action {
    /// Let the request through.
    Allow,
    /// Refuse the request (HTTP 403, or a closed connection for opaque TCP).
    #[default]
    Deny,
}

/// One allow or deny rule: it matches when any `from` source and any `to` destination
/// match (an empty list matches everything).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    /// `Allow` or `Deny`.
    pub action: Action,
    /// Clients this rule applies to. Empty: every client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub from: Vec<Source>,
    /// Ports, paths and methods this rule applies to. Empty: every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub to: Vec<Destination>,
}

/// A set of clients, by identity. At least one field must be set; a client matches if it
/// matches any of them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(has(self.serviceAccounts) && size(self.serviceAccounts) > 0) || (has(self.namespaces) && size(self.namespaces) > 0) || (has(self.spiffeIds) && size(self.spiffeIds) > 0) || (has(self.unauthenticated) && self.unauthenticated)"
).message("a source needs serviceAccounts, namespaces, spiffeIds or unauthenticated: true"))]
pub struct Source {
    /// Clients running as one of these ServiceAccounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub service_accounts: Vec<ServiceAccountRef>,
    /// Clients in one of these namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        inner(length(min = 1, max = 63), pattern(DNS_LABEL_PATTERN))
    )]
    pub namespaces: Vec<String>,
    /// Clients presenting one of these SPIFFE IDs, such as
    /// `spiffe://cluster.local/ns/shop/sa/web`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        inner(
            length(max = 2048),
            pattern(r"^spiffe://[a-z0-9.\-_]+(/[A-Za-z0-9.\-_]+)*$")
        )
    )]
    pub spiffe_ids: Vec<String>,
    /// Clients without a mesh identity (plain text). Only meaningful with `Permissive` or
    /// `Disabled` mTLS.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unauthenticated: bool,
}

/// A ServiceAccount, by name and namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    /// ServiceAccount name.
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Its namespace. When omitted, the Policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(DNS_LABEL_PATTERN))]
    pub namespace: Option<String>,
}

/// Requests a rule applies to; every field that is set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Destination {
    /// Workload ports. Empty: every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(range(min = 1, max = 65535)))]
    pub ports: Vec<u16>,
    /// Request paths (HTTP only). Empty: every path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub paths: Vec<PathMatch>,
    /// Request methods (HTTP only). Empty: every method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 9))]
    pub methods: Vec<HttpMethod>,
}

/// A token-bucket rate limit on inbound requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!has(self.burst) || self.burst >= self.requestsPerSecond")
    .message("burst must be at least requestsPerSecond").field_path(".burst"))]
pub struct RateLimit {
    /// Sustained requests per second.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub requests_per_second: u32,
    /// Requests allowed at once above the sustained rate. Defaults to `requestsPerSecond`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub burst: Option<u32>,
    /// `Workload` (default): one bucket for all clients. `ClientIdentity`: one bucket per
    /// client identity.
    #[serde(default)]
    pub per: RateLimitScope,
    /// Dry run: let every request through, and record (a counter and a rate-limited log
    /// line) each one the limit would have refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// What one rate-limit bucket covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RateLimitScope {
    /// All clients of the workload share one bucket.
    #[default]
    Workload,
    /// Each client identity has its own bucket.
    ClientIdentity,
}
