//! Weft's resources compiled into the proxy's traffic-policy vocabulary
//! ([`weft_api::traffic`]): a Route into a [`RouteConfig`], a Breaker into a
//! [`BreakerConfig`], a Policy's rate limit into a [`RateLimitConfig`].
//!
//! ```text
//! RouteSpec   ──route(resolve)──▶ RouteConfig  (backends and mirror by config name, or
//!                                               unresolved with a display name)
//! BreakerSpec ──breaker─────────▶ BreakerConfig
//! RateLimit   ──rate_limit──────▶ RateLimitConfig
//! PolicySpec  ──authorization───▶ AuthorizationConfig (ServiceAccounts and namespaces
//!                                  as SPIFFE IDs and prefixes in the trust domain)
//! PolicySpecs ──mtls(mesh)──────▶ MtlsMode (workload Policies > namespace-wide Policies
//!                                  > the mesh default)
//! ```
//!
//! Plain functions of the spec: the index decides which resource wins and resolves
//! Services (`resolve` gives the config name of a Service port a proxy can reach), so
//! these never look at the cluster. CRD defaults are already applied by deserialization
//! (`retries.attempts` 2, `retryOn` connect-failure, refused-stream, unavailable).

use weft_api::proxy_config::{
    AuthorizationConfig, AuthzAction, AuthzDestinationConfig, AuthzRuleConfig, AuthzSourceConfig,
    BackendConfig, BackoffConfig, BreakerConfig, ConnectionPoolConfig, FaultAbortConfig,
    FaultConfig, FaultDelayConfig, HeaderConfig, HeaderEditsConfig, MatchConfig, MirrorConfig,
    OutlierDetectionConfig, PathMatchConfig, RateLimitConfig, RateLimitPer, RetryBudgetConfig,
    RetryConfig, RetryOn, RewriteConfig, RouteConfig, RuleConfig, ValueMatchConfig, ValueMatchKind,
};
use weft_crds::{
    BreakerSpec, PolicySpec, RouteSpec,
    common::{HttpMethod, PathMatch, ValueMatchType},
    policy::{Action, RateLimit, RateLimitScope},
    route::{self, HeaderEdits, RouteRule},
};

use super::model::ObjectKey;

/// Whether a Policy applies to its whole namespace: its target is a selector with no
/// labels and no expressions, which selects every pod there. Such a Policy sets the
/// namespace's mTLS mode, below any Policy that targets a workload.
pub fn namespace_wide(spec: &PolicySpec) -> bool {
    spec.target.service.is_none()
        && spec.target.selector.as_ref().is_some_and(|s| {
            s.match_labels.as_ref().is_none_or(|l| l.is_empty())
                && s.match_expressions.as_ref().is_none_or(|e| e.is_empty())
        })
}

/// The mTLS mode of a pod selected by `policies` (valid Policies of its namespace), where
/// the mesh-wide default is `mesh`: the workload Policies' mode if any selects it, else the
/// namespace-wide Policies', else `mesh`. Among Policies of one level, the strictest mode
/// wins (a Policy that omits `mtls` is `Strict`).
pub fn mtls<'a>(
    mesh: weft_api::proxy_config::MtlsMode,
    policies: impl IntoIterator<Item = &'a PolicySpec>,
) -> weft_api::proxy_config::MtlsMode {
    let mut levels = MtlsLevels::default();
    for spec in policies {
        levels.add(spec);
    }
    levels.mode(mesh)
}

/// [`mtls`] folded one Policy at a time, in any order (the strictest of each level wins),
/// so that the modes of a namespace's pods can be computed Policy by Policy, each added to
/// the pods it selects, rather than pod by pod, each looking its Policies up.
#[derive(Clone, Copy, Debug, Default)]
pub struct MtlsLevels {
    /// The strictest mode of the workload Policies added.
    workload: Option<weft_api::proxy_config::MtlsMode>,
    /// The strictest mode of the namespace-wide Policies added.
    namespace: Option<weft_api::proxy_config::MtlsMode>,
}

impl MtlsLevels {
    /// Adds a Policy selecting the pod.
    pub fn add(&mut self, spec: &PolicySpec) {
        let level = if namespace_wide(spec) {
            &mut self.namespace
        } else {
            &mut self.workload
        };
        let mode = super::mtls_mode(spec.mtls.mode);
        *level = Some(match *level {
            Some(m) if super::strictness(m) >= super::strictness(mode) => m,
            _ => mode,
        });
    }

    /// The mode of the pod the Policies added select, where the mesh-wide default is
    /// `mesh`.
    pub fn mode(self, mesh: weft_api::proxy_config::MtlsMode) -> weft_api::proxy_config::MtlsMode {
        self.workload.or(self.namespace).unwrap_or(mesh)
    }
}

/// Compiles the rules of `spec` (Route `key`) for the Service port `port`: every rule up to
/// and including the first one without `matches`, since no request gets past it.
/// `resolve(service, port)` names the proxy config of a Service port, or `None` when the
/// proxy cannot reach it (the backend then answers its share 500 `backend_not_found`).
pub fn route(
    key: &ObjectKey,
    spec: &RouteSpec,
    port: u16,
    resolve: impl Fn(&str, u16) -> Option<String>,
) -> RouteConfig {
    let mut rules = Vec::new();
    for rule in &spec.rules {
        rules.push(rule_config(&key.namespace, rule, port, &resolve));
        if rule.matches.is_empty() {
            break;
        }
    }
    RouteConfig {
        name: key.to_string(),
        rules,
    }
}

fn rule_config(
    ns: &str,
    rule: &RouteRule,
    port: u16,
    resolve: &impl Fn(&str, u16) -> Option<String>,
) -> RuleConfig {
    RuleConfig {
        name: rule.name.clone(),
        matches: rule.matches.iter().map(match_config).collect(),
        backends: rule
            .backends
            .iter()
            .map(|b| {
                let port = b.port.unwrap_or(port);
                BackendConfig {
                    service: resolve(&b.name, port),
                    display: Some(format!("Service {ns}/{} port {port}", b.name)),
                    // The schema bounds weights to 0..=1,000,000; anything else sends nothing.
                    weight: u32::try_from(b.weight).unwrap_or(0),
                }
            })
            .collect(),
        timeout: rule.timeout.clone(),
        per_try_timeout: rule.per_try_timeout.clone(),
        retries: rule.retries.as_ref().map(retry_config),
        fault: rule.fault.as_ref().map(fault_config),
        mirror: rule.mirror.as_ref().map(|m| MirrorConfig {
            service: resolve(&m.service.name, m.service.port.unwrap_or(port)),
            percentage: m.percentage,
        }),
        request_headers: rule.request_headers.as_ref().map(header_edits),
        response_headers: rule.response_headers.as_ref().map(header_edits),
        rewrite: rule.rewrite.as_ref().and_then(|r| {
            r.replace_prefix_match
                .clone()
                .map(RewriteConfig::ReplacePrefixMatch)
                .or_else(|| {
                    r.replace_full_path
                        .clone()
                        .map(RewriteConfig::ReplaceFullPath)
                })
        }),
    }
}

fn match_config(m: &route::RouteMatch) -> MatchConfig {
    MatchConfig {
        path: m.path.as_ref().and_then(path_match),
        method: m.method.map(|m| method_name(m).to_owned()),
        headers: m.headers.iter().map(value_match).collect(),
        query_params: m.query_params.iter().map(value_match).collect(),
    }
}

/// The schema requires exactly one of the three; a path match that sets none (which the
/// API server refuses) constrains nothing.
fn path_match(p: &PathMatch) -> Option<PathMatchConfig> {
    p.exact
        .clone()
        .map(PathMatchConfig::Exact)
        .or_else(|| p.prefix.clone().map(PathMatchConfig::Prefix))
        .or_else(|| p.regex.clone().map(PathMatchConfig::Regex))
}

fn method_name(m: HttpMethod) -> &'static str {
    match m {
        HttpMethod::Get => "GET",
        HttpMethod::Head => "HEAD",
        HttpMethod::Post => "POST",
        HttpMethod::Put => "PUT",
        HttpMethod::Delete => "DELETE",
        HttpMethod::Connect => "CONNECT",
        HttpMethod::Options => "OPTIONS",
        HttpMethod::Trace => "TRACE",
        HttpMethod::Patch => "PATCH",
    }
}

fn value_match(v: &route::ValueMatch) -> ValueMatchConfig {
    ValueMatchConfig {
        name: v.name.clone(),
        value: v.value.clone(),
        kind: match v.match_type {
            ValueMatchType::Exact => ValueMatchKind::Exact,
            ValueMatchType::RegularExpression => ValueMatchKind::Regex,
        },
    }
}

fn retry_config(r: &route::Retries) -> RetryConfig {
    RetryConfig {
        attempts: r.attempts,
        retry_on: r.retry_on.iter().map(|c| retry_on(*c)).collect(),
        backoff: r.backoff.as_ref().map(|b| BackoffConfig {
            base: b.base.clone(),
            max: b.max.clone(),
        }),
        budget: r.budget.as_ref().map(|b| RetryBudgetConfig {
            percent: b.percent,
            min_retries_per_second: b.min_retries_per_second,
            ttl: b.ttl.clone(),
            dry_run: b.dry_run,
        }),
    }
}

fn retry_on(c: route::RetryOn) -> RetryOn {
    match c {
        route::RetryOn::ServerError => RetryOn::ServerError,
        route::RetryOn::GatewayError => RetryOn::GatewayError,
        route::RetryOn::ConnectFailure => RetryOn::ConnectFailure,
        route::RetryOn::RefusedStream => RetryOn::RefusedStream,
        route::RetryOn::Reset => RetryOn::Reset,
        route::RetryOn::Unavailable => RetryOn::Unavailable,
        route::RetryOn::ResourceExhausted => RetryOn::ResourceExhausted,
    }
}

fn fault_config(f: &route::Fault) -> FaultConfig {
    FaultConfig {
        delay: f.delay.as_ref().map(|d| FaultDelayConfig {
            fixed_delay: d.fixed_delay.clone(),
            percentage: d.percentage,
        }),
        abort: f.abort.as_ref().map(|a| FaultAbortConfig {
            http_status: a.http_status,
            grpc_status: a.grpc_status,
            percentage: a.percentage,
        }),
    }
}

fn header_edits(h: &HeaderEdits) -> HeaderEditsConfig {
    let header = |v: &route::HeaderValue| HeaderConfig {
        name: v.name.clone(),
        value: v.value.clone(),
    };
    HeaderEditsConfig {
        set: h.set.iter().map(header).collect(),
        add: h.add.iter().map(header).collect(),
        remove: h.remove.clone(),
    }
}

/// Compiles Breaker `key`.
pub fn breaker(key: &ObjectKey, spec: &BreakerSpec) -> BreakerConfig {
    BreakerConfig {
        name: key.to_string(),
        outlier_detection: spec
            .outlier_detection
            .as_ref()
            .map(|o| OutlierDetectionConfig {
                consecutive5xx: o.consecutive5xx,
                consecutive_connect_failures: o.consecutive_connect_failures,
                interval: o.interval.clone(),
                base_ejection_time: o.base_ejection_time.clone(),
                max_ejection_time: o.max_ejection_time.clone(),
                max_ejected_percent: o.max_ejected_percent,
            }),
        connection_pool: spec.connection_pool.as_ref().map(|c| ConnectionPoolConfig {
            max_connections: c.max_connections,
            max_pending_requests: c.max_pending_requests,
            max_requests: c.max_requests,
            max_requests_per_connection: c.max_requests_per_connection,
        }),
        dry_run: spec.dry_run,
    }
}

/// Compiles the rate limit of Policy `key`; `burst` defaults to `requestsPerSecond`.
pub fn rate_limit(key: &ObjectKey, limit: &RateLimit) -> RateLimitConfig {
    RateLimitConfig {
        name: key.to_string(),
        requests_per_second: limit.requests_per_second,
        burst: limit.burst.unwrap_or(limit.requests_per_second),
        per: match limit.per {
            RateLimitScope::Workload => RateLimitPer::Workload,
            RateLimitScope::ClientIdentity => RateLimitPer::Client,
        },
        dry_run: limit.dry_run,
    }
}

/// Compiles the authorization of Policy `key` (its rules, `defaultAction` and `dryRun`):
/// a ServiceAccount becomes `spiffe://<trust domain>/ns/<namespace>/sa/<name>` (the
/// Policy's namespace when it names none), a namespace the prefix
/// `spiffe://<trust domain>/ns/<namespace>/sa/`, SPIFFE IDs stay as they are.
pub fn authorization(
    key: &ObjectKey,
    spec: &PolicySpec,
    trust_domain: &str,
) -> AuthorizationConfig {
    let action = |a: Action| match a {
        Action::Allow => AuthzAction::Allow,
        Action::Deny => AuthzAction::Deny,
    };
    AuthorizationConfig {
        name: key.to_string(),
        default_action: action(spec.default_action),
        rules: spec
            .rules
            .iter()
            .map(|r| AuthzRuleConfig {
                action: action(r.action),
                from: r
                    .from
                    .iter()
                    .map(|s| AuthzSourceConfig {
                        identities: s
                            .service_accounts
                            .iter()
                            .map(|sa| {
                                let ns = sa.namespace.as_deref().unwrap_or(&key.namespace);
                                format!("spiffe://{trust_domain}/ns/{ns}/sa/{}", sa.name)
                            })
                            .chain(s.spiffe_ids.iter().cloned())
                            .collect(),
                        identity_prefixes: s
                            .namespaces
                            .iter()
                            .map(|ns| format!("spiffe://{trust_domain}/ns/{ns}/sa/"))
                            .collect(),
                        unauthenticated: s.unauthenticated,
                    })
                    .collect(),
                to: r
                    .to
                    .iter()
                    .map(|d| AuthzDestinationConfig {
                        ports: d.ports.clone(),
                        paths: d.paths.iter().filter_map(path_match).collect(),
                        methods: d
                            .methods
                            .iter()
                            .map(|m| method_name(*m).to_owned())
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
        dry_run: spec.dry_run,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_compiles_identities_in_the_trust_domain() {
        let spec: PolicySpec = serde_json::from_value(serde_json::json!({
            "target": {"service": "payments"},
            "defaultAction": "Deny",
            "dryRun": true,
            "rules": [
                {"action": "Allow",
                 "from": [{"serviceAccounts": [{"name": "web"}, {"name": "ops", "namespace": "admin"}],
                           "namespaces": ["monitoring"],
                           "spiffeIds": ["spiffe://other.org/ns/x/sa/y"]}],
                 "to": [{"ports": [8443], "methods": ["POST"], "paths": [{"exact": "/charge"}]}]},
                {"action": "Deny", "from": [{"unauthenticated": true}]}
            ]
        }))
        .unwrap();
        let c = authorization(&ObjectKey::new("shop", "payments"), &spec, "cluster.local");
        let want = serde_json::json!({
            "name": "shop/payments",
            "defaultAction": "deny",
            "dryRun": true,
            "rules": [
                {"action": "allow",
                 "from": [{"identities": ["spiffe://cluster.local/ns/shop/sa/web",
                                          "spiffe://cluster.local/ns/admin/sa/ops",
                                          "spiffe://other.org/ns/x/sa/y"],
                           "identityPrefixes": ["spiffe://cluster.local/ns/monitoring/sa/"]}],
                 "to": [{"ports": [8443], "paths": [{"exact": "/charge"}], "methods": ["POST"]}]},
                {"action": "deny", "from": [{"unauthenticated": true}]}
            ]
        });
        assert_eq!(serde_json::to_value(&c).unwrap(), want);
    }
}
