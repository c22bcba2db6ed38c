//! The proxy's own validation of a resource, run by the operator when the resource is
//! read: what the API server's schema lets through but a proxy would refuse (a regular
//! expression that does not compile or is too large, a header edit of `host`, a name set
//! twice) makes the resource `Accepted=False` here, instead of a config every proxy that
//! sees the Service refuses whole (NACK), which would freeze all their other updates.
//!
//! ```text
//! RouteSpec ──compile──▶ RouteConfig ──weft_proxy::rules::Route::from_wire──▶ ok | problems
//! ```

use std::collections::HashMap;

use weft_crds::{BreakerSpec, PolicySpec, RouteSpec};

use super::{compile, model::ObjectKey};

/// Problems a proxy would find in a Route, each naming its field (`spec.rules[0]...`).
pub fn route(key: &ObjectKey, spec: &RouteSpec) -> Result<(), Vec<String>> {
    // Every backend and mirror resolves to a service of its own name: whether they exist
    // is `ResolvedRefs`' concern, not validity's.
    let config = compile::route(key, spec, 80, |name, port| Some(format!("{name}.{port}")));
    let services: HashMap<String, usize> = config
        .rules
        .iter()
        .flat_map(|r| {
            r.backends
                .iter()
                .filter_map(|b| b.service.clone())
                .chain(r.mirror.iter().filter_map(|m| m.service.clone()))
        })
        .enumerate()
        .map(|(i, name)| (name, i))
        .collect();
    let route = weft_proxy::rules::Route::from_wire(&config, "spec", &services)?;
    // Injected proxies run with the default request limits: a rule whose edits alone pass
    // them would have every request it takes refused 431, and a proxy refuses the config.
    let problems = route.edits_beyond(&weft_proxy::limits::Limits::default(), "spec");
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Problems a proxy would find in a Breaker.
pub fn breaker(key: &ObjectKey, spec: &BreakerSpec) -> Result<(), Vec<String>> {
    weft_proxy::breaker::BreakerSpec::from_wire(&compile::breaker(key, spec), "spec").map(drop)
}

/// Problems a proxy would find in a Policy's rate limit and authorization (the trust
/// domain does not change validity: any valid one is used).
pub fn policy(key: &ObjectKey, spec: &PolicySpec) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    let expressions = spec
        .target
        .selector
        .iter()
        .flat_map(|s| s.match_expressions.iter().flatten());
    // Only what already selected no pod is invalid: a misspelt operator, `In` without
    // values. `NotIn` without values and `Exists` with values, which Kubernetes refuses
    // elsewhere, have always matched here, so refusing them now would lift a Policy that
    // enforces on upgrade.
    for (i, e) in expressions.enumerate() {
        let at = format!("spec.target.selector.matchExpressions[{i}]");
        let no_values = e.values.as_deref().unwrap_or_default().is_empty();
        match e.operator.as_str() {
            "In" if no_values => problems.push(format!(
                "{at}: operator In needs at least one value (as written it selects no pod)"
            )),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => problems.push(format!(
                "{at}.operator: {other:?} is not In, NotIn, Exists or DoesNotExist (as written it selects no pod)"
            )),
        }
    }
    if let Some(limit) = &spec.rate_limit
        && let Err(p) = weft_proxy::ratelimit::RateLimiter::from_wire(
            &compile::rate_limit(key, limit),
            "spec.rateLimit",
        )
    {
        problems.extend(p);
    }
    let authz = compile::authorization(key, spec, "cluster.local");
    if let Err(p) = weft_proxy::authz::Authorizer::from_wire(std::slice::from_ref(&authz), "spec") {
        // The proxy names `spec[0].rules[..]`; the Policy's own field is `spec.rules[..]`.
        problems.extend(p.into_iter().map(|p| p.replacen("spec[0].", "spec.", 1)));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route_spec(rules: serde_json::Value) -> RouteSpec {
        serde_json::from_value(serde_json::json!({"service": {"name": "web"}, "rules": rules}))
            .unwrap()
    }

    #[test]
    fn what_the_schema_allows_and_a_proxy_refuses_is_named_by_field() {
        let key = ObjectKey::new("shop", "web");
        assert_eq!(
            route(
                &key,
                &route_spec(serde_json::json!([{"backends": [{"name": "web"}]}]))
            ),
            Ok(())
        );
        let bad = route_spec(serde_json::json!([
            {"matches": [{"path": {"regex": "(unclosed"}}], "backends": [{"name": "web"}]},
            {"backends": [{"name": "web"}],
             "requestHeaders": {"set": [{"name": "host", "value": "evil"}]}}
        ]));
        let problems = route(&key, &bad).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("spec.rules[0].matches[0].path")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("spec.rules[1].requestHeaders")),
            "{problems:?}"
        );
    }

    /// A rule whose header edits alone pass an injected proxy's request limits is not
    /// accepted: every proxy would refuse the whole config (a NACK that freezes its other
    /// updates), and every request the rule took would be refused 431. Half of it is.
    #[test]
    fn a_rule_whose_edits_pass_the_proxys_request_limits_is_refused_by_field() {
        let key = ObjectKey::new("shop", "web");
        let fields = |kind: &str, n: usize| -> Vec<serde_json::Value> {
            (0..n)
                .map(|i| serde_json::json!({"name": format!("x-{kind}-{i}"), "value": "v".repeat(4096)}))
                .collect()
        };
        let spec = |n: usize| {
            route_spec(serde_json::json!([{"backends": [{"name": "web"}],
                "requestHeaders": {"set": fields("set", n), "add": fields("add", n)}}]))
        };
        let problems = route(&key, &spec(16)).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with(
                "spec.rules[0].requestHeaders: set and add write 131308 bytes of fields, \
                 above the proxy's limit of 61440 bytes"
            ),
            "{problems:?}"
        );
        assert_eq!(route(&key, &spec(7)), Ok(()));
    }

    #[test]
    fn a_policy_path_the_proxy_refuses_is_named_by_field() {
        let key = ObjectKey::new("shop", "web");
        let ok: PolicySpec = serde_json::from_value(serde_json::json!({
            "target": {"service": "web"},
            "rules": [{"action": "Allow", "from": [{"namespaces": ["shop"]}],
                       "to": [{"paths": [{"prefix": "/api"}]}]}]
        }))
        .unwrap();
        assert_eq!(policy(&key, &ok), Ok(()));
        let bad: PolicySpec = serde_json::from_value(serde_json::json!({
            "target": {"service": "web"},
            "rules": [{"action": "Deny", "to": [{"paths": [{"regex": "(unclosed"}]}]}]
        }))
        .unwrap();
        let problems = policy(&key, &bad).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("spec.rules[0].to[0].paths[0].regex")),
            "{problems:?}"
        );
    }

    /// A selector that selects no pod as written (a misspelt operator, `In` without values)
    /// read `Accepted`; it is named now. What has always matched is left valid.
    #[test]
    fn a_policy_selector_that_selects_nothing_as_written_is_named_by_field() {
        let key = ObjectKey::new("shop", "web");
        let with = |exprs: serde_json::Value| -> PolicySpec {
            serde_json::from_value(serde_json::json!({
                "target": {"selector": {"matchExpressions": exprs}},
                "mtls": {"mode": "Strict"}
            }))
            .unwrap()
        };
        let ok = with(serde_json::json!([
            {"key": "app", "operator": "In", "values": ["web"]},
            {"key": "tier", "operator": "NotIn", "values": ["batch"]},
            {"key": "team", "operator": "Exists"},
            {"key": "legacy", "operator": "DoesNotExist", "values": []},
            {"key": "zone", "operator": "NotIn"},
            {"key": "owner", "operator": "Exists", "values": ["x"]}
        ]));
        assert_eq!(policy(&key, &ok), Ok(()));
        let bad = with(serde_json::json!([
            {"key": "app", "operator": "in", "values": ["web"]},
            {"key": "app", "operator": "In"}
        ]));
        let problems = policy(&key, &bad).unwrap_err();
        let at = |i: usize| format!("spec.target.selector.matchExpressions[{i}]");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with(&format!("{}.operator", at(0))),
            "{problems:?}"
        );
        assert!(problems[1].starts_with(&at(1)) && problems[1].contains("needs"));
    }
}
