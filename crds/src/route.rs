//! `Route`: how requests to one Service are matched, split, retried, timed out, faulted,
//! mirrored and rewritten.
//!
//! Rules are evaluated in order; the first rule with a matching `matches` entry handles the
//! request. A rule without `matches` matches every request.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use weft_api::Duration;

use crate::{
    common::{HEADER_NAME_PATTERN, HttpMethod, PathMatch, ServiceRef, ValueMatchType},
    status::Conditions,
};

/// Routing for one Service: ordered rules that match requests and send them to weighted
/// backends, with timeouts, retries under a budget, fault injection, mirroring and edits.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "Route",
    namespaced,
    doc = "Route says how requests to one Service are routed: ordered rules that match requests and split them across weighted backends, with timeouts, retries under a budget, fault injection, mirroring, header edits and path rewrites.",
    status = "RouteStatus",
    shortname = "wroute",
    category = "weft",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service.name"}"#,
    printcolumn = r#"{"name":"Port","type":"integer","jsonPath":".spec.service.port"}"#,
    printcolumn = r#"{"name":"Rules","type":"integer","jsonPath":".status.ruleCount"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    /// The Service whose requests this Route governs.
    pub service: ServiceRef,
    /// Ordered rules; the first rule that matches a request handles it.
    #[schemars(length(min = 1, max = 32))]
    pub rules: Vec<RouteRule>,
}

/// One routing rule: which requests it takes and what happens to them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.backends.exists(b, b.weight > 0)")
    .message("at least one backend must have a weight above 0")
    .field_path(".backends"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.timeout) || !has(self.perTryTimeout) || duration(self.perTryTimeout) <= duration(self.timeout)"
).message("perTryTimeout must not exceed timeout").field_path(".perTryTimeout"))]
#[x_kube(validation = kube::core::Rule::new(
    "!has(self.rewrite) || !has(self.rewrite.replacePrefixMatch) || (size(self.matches) > 0 && self.matches.all(m, has(m.path) && has(m.path.prefix)))"
).message("rewrite.replacePrefixMatch needs every match to have a path prefix").field_path(".rewrite.replacePrefixMatch"))]
pub struct RouteRule {
    /// A name for the rule, used in metrics and status. Unique within the Route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(crate::common::DNS_LABEL_PATTERN))]
    pub name: Option<String>,
    /// The rule applies when any one of these matches. Empty: every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub matches: Vec<RouteMatch>,
    /// Where matching requests go, split by weight (for canaries: weights 90 and 10).
    #[schemars(length(min = 1, max = 16))]
    pub backends: Vec<Backend>,
    /// Deadline for the whole request, retries included. No deadline when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Deadline for each attempt; at most `timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// Retries of failed attempts, always under a budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Delays or aborts a share of requests, for testing resilience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// Sends a copy of a share of requests to another Service; responses are discarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// Edits to request headers before they reach the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderEdits>,
    /// Edits to response headers before they reach the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderEdits>,
    /// Rewrites the request path before it reaches the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<PathRewrite>,
}

/// Conditions on a request; all that are set must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    /// The request path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// The request method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<HttpMethod>,
    /// Request headers that must be present with matching values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub headers: Vec<ValueMatch>,
    /// Query parameters that must be present with matching values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub query_params: Vec<ValueMatch>,
}

/// A header or query parameter that must be present with a matching value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValueMatch {
    /// Header name (case-insensitive) or query parameter name (case-sensitive).
    #[schemars(length(min = 1, max = 256), pattern(HEADER_NAME_PATTERN))]
    pub name: String,
    /// The value to compare with.
    #[schemars(length(max = 4096))]
    pub value: String,
    /// How `value` is compared: `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub match_type: ValueMatchType,
}

/// A destination Service and its share of the rule's traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Backend {
    /// Name of the Service, in this Route's namespace.
    #[schemars(length(min = 1, max = 63), pattern(crate::common::DNS_LABEL_PATTERN))]
    pub name: String,
    /// Port of the backend Service. When omitted, the port the request was sent to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// Relative share of traffic: a backend gets weight / (sum of weights). 0 sends it
    /// nothing (useful to drain a canary without removing it).
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub weight: i32,
}

fn default_weight() -> i32 {
    1
}

/// Retry policy. Retries are only made when the request is safe to repeat (its body was
/// small enough to buffer, and the failure happened before a response was started), and
/// never beyond the budget.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Retries after the first attempt (0 disables retries).
    #[serde(default = "default_attempts")]
    #[schemars(range(min = 0, max = 10))]
    pub attempts: u32,
    /// Which failures are retried.
    #[serde(default = "default_retry_on")]
    #[schemars(length(min = 1, max = 8))]
    pub retry_on: Vec<RetryOn>,
    /// Wait between attempts: retry n waits a random time between half and all of
    /// min(`max`, `base` × 2^(n-1)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Caps retries to a share of live traffic, so retries cannot amplify an outage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
}

fn default_attempts() -> u32 {
    2
}

fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::ConnectFailure,
        RetryOn::RefusedStream,
        RetryOn::Unavailable,
    ]
}

/// A failure that may be retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum RetryOn {
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    ServerError,
    /// 502, 503 and 504 responses.
    #[serde(rename = "gateway-error")]
    GatewayError,
    /// The connection to the backend could not be made.
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// The backend refused the HTTP/2 stream before processing it.
    #[serde(rename = "refused-stream")]
    RefusedStream,
    /// The connection was reset before a response started.
    #[serde(rename = "reset")]
    Reset,
    /// gRPC status UNAVAILABLE.
    #[serde(rename = "unavailable")]
    Unavailable,
    /// gRPC status RESOURCE_EXHAUSTED.
    #[serde(rename = "resource-exhausted")]
    ResourceExhausted,
}

/// Exponential backoff between retry attempts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("duration(self.base) <= duration(self.max)")
    .message("backoff.base must not exceed backoff.max").field_path(".base"))]
pub struct Backoff {
    /// The first wait's upper bound, doubled on each further retry.
    pub base: Duration,
    /// The longest wait.
    pub max: Duration,
}

/// Limits retries to a ratio of live traffic (as in Linkerd's retry budgets).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// Retries may add at most this percentage of the original requests (default 20).
    #[serde(default = "default_budget_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub percent: u32,
    /// Retries allowed per second regardless of the ratio, so low traffic can still retry
    /// (default 10).
    #[serde(default = "default_min_retries")]
    #[schemars(range(min = 0, max = 10_000))]
    pub min_retries_per_second: u32,
    /// The window over which requests and retries are counted (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    /// Dry run: retry as if there were no budget, and record (a counter and a rate-limited
    /// log line) each retry the budget would have refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

fn default_budget_percent() -> u32 {
    20
}

fn default_min_retries() -> u32 {
    10
}

/// Fault injection; at least one of `delay` or `abort`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.delay) || has(self.abort)")
    .message("fault needs a delay, an abort, or both"))]
pub struct Fault {
    /// Delays a share of requests before forwarding them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Answers a share of requests with an error instead of forwarding them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// Delay injection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// How long to delay.
    pub fixed_delay: Duration,
    /// Share of requests delayed, 0 to 100.
    #[schemars(range(min = 0, max = 100))]
    pub percentage: u32,
}

/// Abort injection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// HTTP status to answer with, 200 to 599.
    #[schemars(range(min = 200, max = 599))]
    pub http_status: u16,
    /// gRPC status code (0 to 16) to answer gRPC requests with. When omitted, derived
    /// from `httpStatus` as gRPC maps HTTP statuses (503 is UNAVAILABLE, 429 is
    /// UNAVAILABLE, 404 is UNIMPLEMENTED, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 16))]
    pub grpc_status: Option<u8>,
    /// Share of requests aborted, 0 to 100.
    #[schemars(range(min = 0, max = 100))]
    pub percentage: u32,
}

/// Traffic mirroring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Mirror {
    /// The Service that receives the copies.
    pub service: ServiceRef,
    /// Share of requests mirrored, 0 to 100 (default 100).
    #[serde(default = "default_mirror_percentage")]
    #[schemars(range(min = 0, max = 100))]
    pub percentage: u32,
}

fn default_mirror_percentage() -> u32 {
    100
}

/// Edits to a set of HTTP headers, applied in the order remove, set, add.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderEdits {
    /// Headers to set, replacing any existing values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub set: Vec<HeaderValue>,
    /// Headers to append, keeping existing values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub add: Vec<HeaderValue>,
    /// Names of headers to remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        inner(length(min = 1, max = 256), pattern(HEADER_NAME_PATTERN))
    )]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeaderValue {
    /// Header name.
    #[schemars(length(min = 1, max = 256), pattern(HEADER_NAME_PATTERN))]
    pub name: String,
    /// Header value.
    #[schemars(length(max = 4096))]
    pub value: String,
}

/// A path rewrite; exactly one of `replacePrefixMatch` or `replaceFullPath`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.replacePrefixMatch) != has(self.replaceFullPath)")
    .message("exactly one of replacePrefixMatch or replaceFullPath must be set"))]
pub struct PathRewrite {
    /// Replaces the matched path prefix with this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), pattern(crate::common::PATH_PATTERN))]
    pub replace_prefix_match: Option<String>,
    /// Replaces the whole path with this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024), pattern(crate::common::PATH_PATTERN))]
    pub replace_full_path: Option<String>,
}

/// The observed state of a Route, written by the operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    /// The `metadata.generation` these conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of rules in the observed generation (shown by `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_count: Option<u32>,
    /// `Accepted`, `ResolvedRefs` and `Programmed`, each with a reason and a message.
    #[serde(default)]
    pub conditions: Conditions,
}
