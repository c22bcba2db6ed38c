//! Traffic policy as it travels to a proxy: a service's Route (matching, split, timeouts,
//! retries, faults, mirror, edits), its Breaker (outlier ejection, pool limits), its retry
//! budget, and the inbound rate limit of the proxy's own workload.
//!
//! The operator compiles `Route`, `Breaker` and `Policy.spec.rateLimit` into these types;
//! `weft-proxy` validates them once, into runtime types, and enforces them per request.
//! Every nested type refuses fields it does not know: a setting a proxy does not know is
//! one it cannot enforce.
//!
//! ```text
//! ServiceConfig ─┬─ route:       RouteConfig { rules: [RuleConfig { matches, backends, ... }] }
//!                ├─ retryBudget: RetryBudgetConfig   (default 20 % + 10/s over 10s)
//!                └─ breaker:     BreakerConfig { outlierDetection, connectionPool }
//! ProxyConfig.inbound / Update.inbound: InboundConfig { rateLimit }
//! ```

use serde::{Deserialize, Serialize};

use crate::Duration;

/// A service's routing: ordered rules; the first rule with a matching `matches` entry
/// handles a request, and a request no rule matches goes to the service's own endpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteConfig {
    /// The Route this was compiled from, as `namespace/name`: the `route` metric label.
    pub name: String,
    /// The rules, in order (at most 32).
    pub rules: Vec<RuleConfig>,
}

/// One rule: which requests it takes and what happens to them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleConfig {
    /// The rule's name, the `rule` metric label; the proxy uses its index when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The rule takes a request when any entry matches it. Empty: every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<MatchConfig>,
    /// Where matching requests go, split by weight. Empty: the service's own endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendConfig>,
    /// Deadline for the whole request, retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Deadline for each attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// Retries of failed attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetryConfig>,
    /// Injected delays and aborts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<FaultConfig>,
    /// A copy of a share of requests sent to another service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorConfig>,
    /// Edits to request headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderEditsConfig>,
    /// Edits to response headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderEditsConfig>,
    /// A path rewrite.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<RewriteConfig>,
}

/// Conditions on a request; every one that is set must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchConfig {
    /// The normalized request path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatchConfig>,
    /// The request method, such as `GET`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Headers that must be present with a matching value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatchConfig>,
    /// Query parameters that must be present with a matching value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<ValueMatchConfig>,
}

/// How a path is matched (after normalization).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum PathMatchConfig {
    /// The path equals this.
    Exact(String),
    /// The path starts with this at a segment boundary.
    Prefix(String),
    /// The whole path matches this RE2-syntax regular expression.
    Regex(String),
}

/// A header or query parameter that must be present with a matching value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ValueMatchConfig {
    /// Header name (case-insensitive) or query parameter name (case-sensitive).
    pub name: String,
    /// The value, or the regular expression the whole value must match.
    pub value: String,
    /// `exact` (default) or `regex`.
    #[serde(default, rename = "type")]
    pub kind: ValueMatchKind,
}

/// How a value is compared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ValueMatchKind {
    /// Equal.
    #[default]
    Exact,
    /// The whole value matches a regular expression.
    Regex,
}

/// One weighted destination of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendConfig {
    /// The name of a service in this config. Absent: the backend does not resolve (its
    /// Service does not exist), and its share of requests is answered 500
    /// `backend_not_found`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// What the backend is, for the error message when it does not resolve, such as
    /// `Service shop/web-v3 port 80`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
    /// Relative share, 0 to 1,000,000; 0 sends nothing.
    pub weight: u32,
}

/// Retries of a rule's failed attempts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryConfig {
    /// Retries after the first attempt, 0 to 10.
    pub attempts: u32,
    /// Which failures are retried.
    pub retry_on: Vec<RetryOn>,
    /// Wait between attempts; the proxy's default when absent (25ms up to 250ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffConfig>,
    /// The rule's own budget; the service's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudgetConfig>,
}

/// A failure that may be retried (the names of `Route.spec.rules[].retries.retryOn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RetryOn {
    /// Any 5xx response.
    #[serde(rename = "5xx")]
    ServerError,
    /// 502, 503 and 504.
    #[serde(rename = "gateway-error")]
    GatewayError,
    /// No connection to the endpoint.
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// An HTTP/2 stream refused before processing (`REFUSED_STREAM`).
    #[serde(rename = "refused-stream")]
    RefusedStream,
    /// The connection or stream reset before a response started.
    #[serde(rename = "reset")]
    Reset,
    /// gRPC status 14 UNAVAILABLE.
    #[serde(rename = "unavailable")]
    Unavailable,
    /// gRPC status 8 RESOURCE_EXHAUSTED.
    #[serde(rename = "resource-exhausted")]
    ResourceExhausted,
}

/// Exponential backoff with jitter: retry n waits between half and all of
/// min(max, base × 2^(n−1)).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackoffConfig {
    /// The first wait's upper bound, doubled for each further retry.
    pub base: Duration,
    /// The longest wait.
    pub max: Duration,
}

/// A retry budget: retries may add at most `percent` % of the requests of the last `ttl`,
/// plus `minRetriesPerSecond`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBudgetConfig {
    /// Share of recent requests retries may add, 0 to 100 (default 20).
    #[serde(default = "default_budget_percent")]
    pub percent: u32,
    /// Retries per second allowed whatever the ratio (default 10).
    #[serde(default = "default_min_retries")]
    pub min_retries_per_second: u32,
    /// The window requests are counted over (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    /// Record what the budget would refuse, and retry anyway.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

fn default_budget_percent() -> u32 {
    20
}

fn default_min_retries() -> u32 {
    10
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            percent: default_budget_percent(),
            min_retries_per_second: default_min_retries(),
            ttl: None,
            dry_run: false,
        }
    }
}

/// Fault injection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultConfig {
    /// Delays a share of requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelayConfig>,
    /// Answers a share of requests with an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbortConfig>,
}

/// Delay injection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelayConfig {
    /// How long.
    pub fixed_delay: Duration,
    /// Share of requests, 0 to 100.
    pub percentage: u32,
}

/// Abort injection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbortConfig {
    /// HTTP status, 200 to 599.
    pub http_status: u16,
    /// gRPC status code (0 to 16) for gRPC requests; derived from `httpStatus` as gRPC's
    /// HTTP mapping does when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u8>,
    /// Share of requests, 0 to 100.
    pub percentage: u32,
}

/// Traffic mirroring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MirrorConfig {
    /// The name of a service in this config that receives the copies. Absent: the
    /// mirror's Service does not exist, and nothing is mirrored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Share of requests, 0 to 100.
    pub percentage: u32,
}

/// Header edits, applied in the order remove, set, add.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderEditsConfig {
    /// Headers to set, replacing existing values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HeaderConfig>,
    /// Headers to append.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderConfig>,
    /// Header names to remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// A header name and value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderConfig {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// A path rewrite.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum RewriteConfig {
    /// Replaces the prefix the request matched with this.
    ReplacePrefixMatch(String),
    /// Replaces the whole path with this.
    ReplaceFullPath(String),
}

/// Circuit breaking for a service: outlier ejection and pool limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BreakerConfig {
    /// The Breaker this was compiled from, as `namespace/name`.
    pub name: String,
    /// Outlier ejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionConfig>,
    /// Limits on this proxy's pool to the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolConfig>,
    /// Record what the breaker would do, and do not do it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// Outlier ejection (defaults as `Breaker.spec.outlierDetection`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionConfig {
    /// Consecutive 5xx responses that eject an endpoint.
    pub consecutive5xx: u32,
    /// Consecutive failed connects that eject an endpoint.
    pub consecutive_connect_failures: u32,
    /// How often ejections are reconsidered.
    pub interval: Duration,
    /// Ejection time for the first ejection, multiplied by the number of ejections.
    pub base_ejection_time: Duration,
    /// The longest ejection.
    pub max_ejection_time: Duration,
    /// At most this percentage of endpoints is ejected at once, 0 to 100.
    pub max_ejected_percent: u32,
}

/// Limits on one proxy's connections and requests to a service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPoolConfig {
    /// Open connections to all endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Requests on one connection before it is replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
}

/// Settings of the proxy's inbound side (its own workload).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InboundConfig {
    /// The rate limit on requests to the workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitConfig>,
    /// Which transports clients may use. Absent: `permissive` (the mesh default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
    /// Authorization: every policy applies; a request any `deny` rule matches is denied,
    /// else one an `allow` rule matches is allowed, else it is denied if any policy's
    /// default is `deny`. Empty: everything is allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorization: Vec<AuthorizationConfig>,
}

/// Which transports the inbound side accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MtlsMode {
    /// Only mutual TLS with a mesh identity.
    Strict,
    /// Mutual TLS or plain text (plain-text clients are unauthenticated).
    #[default]
    Permissive,
    /// Plain text only; clients do not originate mTLS to this workload.
    Disabled,
}

/// One compiled Policy's authorization.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationConfig {
    /// The Policy, as `namespace/name`: named in denials (`weft-error`, logs, metrics).
    pub name: String,
    /// What a request no rule matches gets.
    pub default_action: AuthzAction,
    /// The rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<AuthzRuleConfig>,
    /// Log and count what would be denied, and let it through.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// Allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AuthzAction {
    /// Let the request through.
    Allow,
    /// Refuse it: HTTP 403 (gRPC PERMISSION_DENIED), or a closed connection for opaque TCP.
    Deny,
}

/// One rule: it matches when any `from` entry and any `to` entry match (empty: any).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzRuleConfig {
    /// Allow or deny.
    pub action: AuthzAction,
    /// Clients.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<AuthzSourceConfig>,
    /// Ports, paths and methods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<AuthzDestinationConfig>,
}

/// A set of clients; a client matches if it matches any field.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzSourceConfig {
    /// Exact SPIFFE IDs (ServiceAccounts are compiled into these).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// SPIFFE ID prefixes, such as `spiffe://cluster.local/ns/monitoring/sa/` for a
    /// namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identity_prefixes: Vec<String>,
    /// Clients without a mesh identity (plain text).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unauthenticated: bool,
}

/// Requests a rule applies to; every field that is set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthzDestinationConfig {
    /// Workload ports. Empty: every port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Request paths, matched after normalization (HTTP only). Empty: every path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathMatchConfig>,
    /// Request methods (HTTP only). Empty: every method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

/// A token bucket on inbound requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitConfig {
    /// The Policy this was compiled from, as `namespace/name`.
    pub name: String,
    /// Sustained requests per second, at least 1.
    pub requests_per_second: u32,
    /// The bucket's size, at least `requestsPerSecond`.
    pub burst: u32,
    /// One bucket for the workload, or one per client.
    #[serde(default)]
    pub per: RateLimitPer,
    /// Record what the limit would refuse, and let it through.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// What one bucket covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RateLimitPer {
    /// All clients share one bucket.
    #[default]
    Workload,
    /// One bucket per client: its verified mesh identity over mutual TLS, else its source
    /// address.
    Client,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_round_trips_and_unknown_nested_fields_are_refused_by_name() {
        let json = serde_json::json!({
            "name": "shop/web",
            "rules": [{
                "name": "api",
                "matches": [{"path": {"prefix": "/api"}, "method": "GET",
                             "headers": [{"name": "x-canary", "value": "1"}],
                             "queryParams": [{"name": "v", "value": "[0-9]+", "type": "regex"}]}],
                "backends": [{"service": "web.shop.80", "weight": 90},
                             {"display": "Service shop/gone port 80", "weight": 10}],
                "timeout": "2s", "perTryTimeout": "500ms",
                "retries": {"attempts": 2, "retryOn": ["5xx", "unavailable"],
                            "budget": {"percent": 20, "dryRun": true}},
                "fault": {"abort": {"httpStatus": 503, "percentage": 10}},
                "mirror": {"service": "shadow.shop.80", "percentage": 5},
                "requestHeaders": {"set": [{"name": "x-a", "value": "1"}], "remove": ["x-b"]},
                "rewrite": {"replacePrefixMatch": "/v2"}
            }]
        });
        let route: RouteConfig = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(
            route.rules[0].rewrite,
            Some(RewriteConfig::ReplacePrefixMatch("/v2".into()))
        );
        assert_eq!(
            route.rules[0].matches[0].query_params[0].kind,
            ValueMatchKind::Regex
        );
        let budget = route.rules[0]
            .retries
            .as_ref()
            .unwrap()
            .budget
            .as_ref()
            .unwrap();
        assert_eq!((budget.min_retries_per_second, budget.dry_run), (10, true));
        assert_eq!(
            serde_json::to_value(&route).unwrap()["rules"][0]["backends"],
            json["rules"][0]["backends"]
        );

        let mut typo = json;
        typo["rules"][0]["retries"]["atempts"] = 3.into();
        let error = serde_json::from_value::<RouteConfig>(typo)
            .unwrap_err()
            .to_string();
        assert!(error.contains("atempts"), "{error}");
    }
}
