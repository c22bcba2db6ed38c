//! What enforcing a resource takes: the [`Requirement`]s the operator sends with each
//! resource reference, so that the proxy — which alone knows its features — can say in its
//! ACK whether it enforces the resource (`docs/protocol.md`, "Enforcement").
//!
//! ```text
//! RouteSpec / PolicySpec / BreakerSpec ──requires──▶ [Requirement { feature, field }]
//!                                                     │ in ResourceRef.requires
//!                                                     ▼
//!                               proxy: enforced iff it has every feature ─▶ Ack.enforcement
//! ```
//!
//! One requirement per part of the spec that changes proxy behaviour, named by the field
//! path users know from `kubectl explain`. Parts that change nothing (a rule's `name`; a
//! rule after the first catch-all rule, which no request reaches) require nothing.

use weft_api::push::{Requirement, feature};
use weft_crds::{BreakerSpec, PolicySpec, RouteSpec, policy::Action, policy::MtlsMode};

/// The feature a part of a resource requires when another resource overrides it on this
/// proxy (a Policy's rate limit on a pod an older Policy limits): no proxy has it, so the
/// proxy reports that part not enforced.
pub const OVERRIDDEN: &str = "overridden";

fn req(feature: &str, field: String) -> Requirement {
    Requirement {
        feature: feature.to_owned(),
        field,
    }
}

/// What enforcing a Route takes: every field of every rule a request can reach (rules up
/// to and including the first one without `matches`).
pub fn route(spec: &RouteSpec) -> Vec<Requirement> {
    let mut out = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = |field: &str| format!("spec.rules[{i}].{field}");
        if !rule.matches.is_empty() {
            out.push(req(feature::ROUTE_MATCHES, at("matches")));
        }
        out.push(req(feature::ROUTE_BACKENDS, at("backends")));
        let optional = [
            (rule.timeout.is_some(), feature::ROUTE_TIMEOUT, "timeout"),
            (
                rule.per_try_timeout.is_some(),
                feature::ROUTE_PER_TRY_TIMEOUT,
                "perTryTimeout",
            ),
            (rule.retries.is_some(), feature::ROUTE_RETRIES, "retries"),
            (rule.fault.is_some(), feature::ROUTE_FAULT, "fault"),
            (rule.mirror.is_some(), feature::ROUTE_MIRROR, "mirror"),
            (
                rule.request_headers.is_some(),
                feature::ROUTE_REQUEST_HEADERS,
                "requestHeaders",
            ),
            (
                rule.response_headers.is_some(),
                feature::ROUTE_RESPONSE_HEADERS,
                "responseHeaders",
            ),
            (rule.rewrite.is_some(), feature::ROUTE_REWRITE, "rewrite"),
        ];
        out.extend(
            optional
                .into_iter()
                .filter(|(set, _, _)| *set)
                .map(|(_, f, field)| req(f, at(field))),
        );
        if rule.matches.is_empty() {
            // Every request stops here: later rules are never used.
            break;
        }
    }
    out
}

/// What enforcing a Policy takes. A Policy with `mtls.mode: Disabled`, `defaultAction:
/// Allow`, no rules and no rate limit changes nothing and requires nothing.
pub fn policy(spec: &PolicySpec) -> Vec<Requirement> {
    let mut out = Vec::new();
    if spec.mtls.mode != MtlsMode::Disabled {
        out.push(req(feature::POLICY_MTLS, "spec.mtls.mode".to_owned()));
    }
    if !spec.rules.is_empty() {
        out.push(req(feature::POLICY_AUTHORIZATION, "spec.rules".to_owned()));
    }
    if spec.default_action == Action::Deny {
        out.push(req(
            feature::POLICY_AUTHORIZATION,
            "spec.defaultAction".to_owned(),
        ));
    }
    if spec.rate_limit.is_some() {
        out.push(req(feature::POLICY_RATE_LIMIT, "spec.rateLimit".to_owned()));
    }
    out
}

/// What enforcing a Breaker takes.
pub fn breaker(spec: &BreakerSpec) -> Vec<Requirement> {
    let mut out = Vec::new();
    if spec.outlier_detection.is_some() {
        out.push(req(
            feature::BREAKER_OUTLIER_DETECTION,
            "spec.outlierDetection".to_owned(),
        ));
    }
    if spec.connection_pool.is_some() {
        out.push(req(
            feature::BREAKER_CONNECTION_POOL,
            "spec.connectionPool".to_owned(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(r: &[Requirement]) -> Vec<&str> {
        r.iter().map(|r| r.field.as_str()).collect()
    }

    fn route_spec(rules: serde_json::Value) -> RouteSpec {
        serde_json::from_value(serde_json::json!({"service": {"name": "web"}, "rules": rules}))
            .unwrap()
    }

    #[test]
    fn a_route_requires_each_field_of_each_reachable_rule() {
        let split = route_spec(serde_json::json!([
            {"backends": [{"name": "a", "weight": 90}, {"name": "b", "weight": 10}], "timeout": "5s"}
        ]));
        let r = route(&split);
        let features: Vec<&str> = r.iter().map(|r| r.feature.as_str()).collect();
        assert_eq!(features, [feature::ROUTE_BACKENDS, feature::ROUTE_TIMEOUT]);
        assert_eq!(
            fields(&r),
            ["spec.rules[0].backends", "spec.rules[0].timeout"]
        );

        let matched = route_spec(serde_json::json!([
            {"matches": [{"path": {"prefix": "/api"}}], "backends": [{"name": "a"}],
             "retries": {"attempts": 2}},
            {"backends": [{"name": "a"}], "fault": {"abort": {"httpStatus": 503, "percentage": 1}}},
            {"matches": [{"method": "GET"}], "backends": [{"name": "b"}], "mirror": {"service": {"name": "m"}}}
        ]));
        assert_eq!(
            fields(&route(&matched)),
            [
                "spec.rules[0].matches",
                "spec.rules[0].backends",
                "spec.rules[0].retries",
                "spec.rules[1].backends",
                "spec.rules[1].fault",
            ],
            "the third rule is behind a catch-all: no request reaches it"
        );
    }

    #[test]
    fn policies_and_breakers_require_what_they_set() {
        let default: PolicySpec =
            serde_json::from_value(serde_json::json!({"target": {"service": "web"}})).unwrap();
        assert_eq!(
            fields(&policy(&default)),
            ["spec.mtls.mode", "spec.defaultAction"]
        );
        let noop: PolicySpec = serde_json::from_value(serde_json::json!({
            "target": {"service": "web"}, "mtls": {"mode": "Disabled"}, "defaultAction": "Allow"
        }))
        .unwrap();
        assert!(policy(&noop).is_empty());
        let pool: BreakerSpec = serde_json::from_value(serde_json::json!({
            "service": {"name": "db"}, "connectionPool": {"maxConnections": 10}
        }))
        .unwrap();
        assert_eq!(fields(&breaker(&pool)), ["spec.connectionPool"]);
    }
}
