//! What this proxy enforces of the Weft resources its config implements. The operator
//! sends each resource with what enforcing it takes ([`Requirement`]s); the proxy, which
//! alone knows its features, reports in every ACK which resources it enforces fully and
//! which parts of the others it does not, so `Programmed` never claims more than the data
//! plane does.
//!
//! ```text
//! Update.resources ─▶ [ResourceRef { requires: [Requirement { feature, field }] }]
//!                         │ report(): every feature in FEATURES?
//!                         ▼
//!           Ack.enforcement { enforced: [...], notEnforced: [{resource, fields}] }
//! ```

use weft_api::push::{Enforcement, NotEnforced, ResourceRef, feature};

/// This proxy's name and version, as status messages name it.
pub const PROXY_AGENT: &str = concat!("weft-proxy ", env!("CARGO_PKG_VERSION"));

/// The enforcement features this proxy has: every part of a Route (matching, weighted
/// backends, timeouts, retries under a budget, faults, mirrors, header edits, rewrites), a
/// Breaker's outlier ejection and pool limits, and a Policy's rate limit and authorization
/// rules. A Policy's mTLS mode is enforced only by a proxy with a mesh certificate
/// ([`report_with_identity`]): without one it cannot terminate mutual TLS, so `strict`
/// would refuse every client rather than admit meshed ones.
pub const FEATURES: &[&str] = &[
    feature::ROUTE_BACKENDS,
    feature::ROUTE_TIMEOUT,
    feature::ROUTE_MATCHES,
    feature::ROUTE_PER_TRY_TIMEOUT,
    feature::ROUTE_RETRIES,
    feature::ROUTE_FAULT,
    feature::ROUTE_MIRROR,
    feature::ROUTE_REQUEST_HEADERS,
    feature::ROUTE_RESPONSE_HEADERS,
    feature::ROUTE_REWRITE,
    feature::POLICY_RATE_LIMIT,
    feature::POLICY_AUTHORIZATION,
    feature::BREAKER_OUTLIER_DETECTION,
    feature::BREAKER_CONNECTION_POOL,
];

/// Whether this proxy has `feature`.
pub fn has(feature: &str) -> bool {
    FEATURES.contains(&feature)
}

/// What this proxy enforces of `resources`: a resource is enforced when this proxy has the
/// feature of every one of its requirements; otherwise its unmet requirements' fields are
/// listed. For a proxy without a mesh certificate.
pub fn report<'a>(resources: impl IntoIterator<Item = &'a ResourceRef>) -> Enforcement {
    report_with_identity(resources, false)
}

/// [`report`], for a proxy that holds a mesh certificate when `identity` is true: it then
/// also enforces a Policy's mTLS mode (it terminates mutual TLS, refuses plain text under
/// `strict`, and originates mTLS to meshed endpoints).
pub fn report_with_identity<'a>(
    resources: impl IntoIterator<Item = &'a ResourceRef>,
    identity: bool,
) -> Enforcement {
    let mut out = Enforcement {
        proxy: PROXY_AGENT.to_owned(),
        ..Enforcement::default()
    };
    for r in resources {
        let fields: Vec<String> = r
            .requires
            .iter()
            .filter(|req| !(has(&req.feature) || identity && req.feature == feature::POLICY_MTLS))
            .map(|req| req.field.clone())
            .collect();
        if fields.is_empty() {
            out.enforced.push(r.bare());
        } else {
            out.not_enforced.push(NotEnforced {
                resource: r.bare(),
                fields,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use weft_api::push::Requirement;

    use super::*;

    fn resource(kind: &str, name: &str, requires: &[(&str, &str)]) -> ResourceRef {
        ResourceRef {
            kind: kind.into(),
            namespace: "shop".into(),
            name: name.into(),
            generation: 3,
            requires: requires
                .iter()
                .map(|(feature, field)| Requirement {
                    feature: (*feature).into(),
                    field: (*field).into(),
                })
                .collect(),
        }
    }

    #[test]
    fn every_traffic_policy_feature_and_authorization_are_enforced() {
        for f in feature::TRAFFIC_POLICY {
            assert!(has(f), "{f}");
        }
        assert!(has(feature::POLICY_AUTHORIZATION));
        assert!(
            !has(feature::POLICY_MTLS),
            "only with a mesh certificate (report_with_identity)"
        );
    }

    #[test]
    fn routes_are_enforced_and_what_is_not_is_named_by_field() {
        let split = resource(
            "Route",
            "split",
            &[
                (feature::ROUTE_BACKENDS, "spec.rules[0].backends"),
                (feature::ROUTE_TIMEOUT, "spec.rules[0].timeout"),
            ],
        );
        let matched = resource(
            "Route",
            "matched",
            &[
                (feature::ROUTE_MATCHES, "spec.rules[0].matches"),
                (feature::ROUTE_BACKENDS, "spec.rules[0].backends"),
                (feature::ROUTE_RETRIES, "spec.rules[0].retries"),
            ],
        );
        let policy = resource(
            "Policy",
            "db",
            &[
                (feature::POLICY_RATE_LIMIT, "spec.rateLimit"),
                (feature::POLICY_MTLS, "spec.mtls.mode"),
            ],
        );
        let future = resource("Route", "future", &[("route.teleport", "spec.rules[0].x")]);
        let report = report([&split, &matched, &policy, &future]);
        assert_eq!(report.proxy, PROXY_AGENT);
        assert_eq!(report.enforced, vec![split.bare(), matched.bare()]);
        let not: Vec<(&str, Vec<&str>)> = report
            .not_enforced
            .iter()
            .map(|n| {
                (
                    n.resource.name.as_str(),
                    n.fields.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            not,
            [
                ("db", vec!["spec.mtls.mode"]),
                ("future", vec!["spec.rules[0].x"]),
            ]
        );
        assert!(
            report
                .not_enforced
                .iter()
                .all(|n| n.resource.requires.is_empty()),
            "references come back bare"
        );
    }

    #[test]
    fn the_mtls_mode_is_enforced_only_by_a_proxy_with_a_certificate() {
        let strict = resource(
            "Policy",
            "strict",
            &[
                (feature::POLICY_MTLS, "spec.mtls.mode"),
                (feature::POLICY_AUTHORIZATION, "spec.rules"),
            ],
        );
        let without = report_with_identity([&strict], false);
        assert!(without.enforced.is_empty());
        assert_eq!(without.not_enforced[0].fields, ["spec.mtls.mode"]);
        let with = report_with_identity([&strict], true);
        assert_eq!(with.enforced, vec![strict.bare()]);
        assert!(with.not_enforced.is_empty());
    }
}
