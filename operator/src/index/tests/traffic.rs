//! Routes, Breakers and rate limits compiled into proxy views.

use weft_api::proxy_config::{
    BackendConfig, FaultAbortConfig, MatchConfig, MirrorConfig, PathMatchConfig, RateLimitConfig,
    RateLimitPer, RetryBudgetConfig, RetryConfig, RetryOn, RewriteConfig, RouteConfig, RuleConfig,
};

use super::*;

/// A Service with cluster IP `ip`, selector `app: <name>`, and TCP `ports`.
fn svc_ports(ns: &str, name: &str, ip: &str, ports: &[u16]) -> (ObjectKey, Object) {
    let ports: Vec<_> = ports
        .iter()
        .map(|p| json!({"name": format!("p{p}"), "port": p}))
        .collect();
    let s: Service = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "selector": {"app": name}, "ports": ports}
    }))
    .unwrap();
    model::service(&s)
}

/// An example manifest of `examples/`, in namespace `shop`.
fn example(kind: Kind, yaml: &str) -> (ObjectKey, Object) {
    let mut o: DynamicObject = serde_yaml::from_str(yaml).unwrap();
    o.metadata.namespace = Some("shop".into());
    o.metadata.generation = Some(1);
    model::weft_resource(kind, &o)
}

fn client_view(i: &Index) -> ProxyView {
    i.view(&key("shop", "client")).unwrap()
}

fn service_route(i: &Index, service: &str) -> Option<RouteConfig> {
    client_view(i).services.get(service).unwrap().route.clone()
}

fn backend(service: Option<&str>, display: &str, weight: u32) -> BackendConfig {
    BackendConfig {
        service: service.map(str::to_owned),
        display: Some(display.to_owned()),
        weight,
    }
}

#[test]
fn the_canary_example_compiles_into_a_route_and_the_endpoints_stay_the_services_own() {
    let mut i = shop();
    for (name, ip) in [
        ("reviews", "198.19.0.20"),
        ("reviews-v1", "198.19.0.21"),
        ("reviews-v2", "198.19.0.22"),
    ] {
        apply(&mut i, svc_ports("shop", name, ip, &[9080]));
    }
    let reviews_slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "reviews-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "reviews"}},
        "addressType": "IPv4",
        "ports": [{"name": "p9080", "port": 9080}],
        "endpoints": [{"addresses": ["198.18.103.1"], "conditions": {"ready": true}}],
    }))
    .unwrap();
    apply(&mut i, model::endpoint_slice(&reviews_slice));
    let before = service_route(&i, "reviews.shop.9080");
    assert_eq!(before, None);
    apply(
        &mut i,
        example(
            Kind::Route,
            include_str!("../../../../examples/route-canary.yaml"),
        ),
    );
    let view = client_view(&i);
    let reviews = view.services.get("reviews.shop.9080").unwrap();
    assert_eq!(
        reviews.route,
        Some(RouteConfig {
            name: "shop/reviews-canary".into(),
            rules: vec![RuleConfig {
                name: Some("split".into()),
                backends: vec![
                    backend(
                        Some("reviews-v1.shop.9080"),
                        "Service shop/reviews-v1 port 9080",
                        90
                    ),
                    backend(
                        Some("reviews-v2.shop.9080"),
                        "Service shop/reviews-v2 port 9080",
                        10
                    ),
                ],
                timeout: Some("5s".parse().unwrap()),
                ..RuleConfig::default()
            }],
        })
    );
    // The split is the proxy's backend stage: no flattening into endpoint weights, no
    // service-wide timeout, and the balancer stays latency-aware.
    let addrs: Vec<(&str, Option<u32>)> = reviews
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.weight))
        .collect();
    assert_eq!(addrs, [("198.18.103.1:9080", None)]);
    assert_eq!(reviews.timeout, None);
    assert_eq!(reviews.balancer, Balancer::PeakEwma);
    assert_eq!(reviews.retry_budget, None);
    assert_eq!(proxy_accepts(&i, &key("shop", "client")), Ok(()));
}

#[test]
fn every_reachable_rule_is_compiled_with_the_crd_defaults_and_nothing_after_the_catch_all() {
    let mut i = shop();
    apply(&mut i, svc("shop", "shadow", "198.19.0.30"));
    apply(
        &mut i,
        weft(
            Kind::Route,
            "shop",
            "full",
            1,
            "2026-01-01T00:00:00Z",
            json!({"service": {"name": "web"}, "rules": [
                {"name": "api",
                 "matches": [{"path": {"prefix": "/api"}, "method": "GET",
                              "headers": [{"name": "x-canary", "value": "1"}],
                              "queryParams": [{"name": "v", "value": "[0-9]+", "type": "RegularExpression"}]}],
                 "backends": [{"name": "web"}],
                 "timeout": "2s", "perTryTimeout": "500ms",
                 "retries": {"budget": {"percent": 30, "dryRun": true}},
                 "fault": {"abort": {"httpStatus": 503, "grpcStatus": 14, "percentage": 10}},
                 "mirror": {"service": {"name": "shadow"}, "percentage": 5},
                 "requestHeaders": {"set": [{"name": "x-a", "value": "1"}], "remove": ["x-b"]},
                 "rewrite": {"replacePrefixMatch": "/v2"}},
                {"backends": [{"name": "web", "weight": 3}],
                 "responseHeaders": {"add": [{"name": "x-c", "value": "2"}]},
                 "mirror": {"service": {"name": "gone"}}},
                {"matches": [{"method": "POST"}], "backends": [{"name": "web"}]}
            ]}),
        ),
    );
    let route = service_route(&i, "web.shop.80").unwrap();
    assert_eq!(route.name, "shop/full");
    assert_eq!(
        route.rules.len(),
        2,
        "no request gets past the catch-all rule: {route:?}"
    );
    let api = &route.rules[0];
    assert_eq!(
        api.matches,
        vec![MatchConfig {
            path: Some(PathMatchConfig::Prefix("/api".into())),
            method: Some("GET".into()),
            headers: vec![weft_api::proxy_config::ValueMatchConfig {
                name: "x-canary".into(),
                value: "1".into(),
                kind: weft_api::proxy_config::ValueMatchKind::Exact,
            }],
            query_params: vec![weft_api::proxy_config::ValueMatchConfig {
                name: "v".into(),
                value: "[0-9]+".into(),
                kind: weft_api::proxy_config::ValueMatchKind::Regex,
            }],
        }]
    );
    assert_eq!(
        api.retries,
        Some(RetryConfig {
            attempts: 2,
            retry_on: vec![
                RetryOn::ConnectFailure,
                RetryOn::RefusedStream,
                RetryOn::Unavailable
            ],
            backoff: None,
            budget: Some(RetryBudgetConfig {
                percent: 30,
                min_retries_per_second: 10,
                ttl: None,
                dry_run: true,
            }),
        }),
        "the CRD's defaults (attempts 2, retryOn) and the rule's own budget"
    );
    assert_eq!(
        api.fault.as_ref().and_then(|f| f.abort.clone()),
        Some(FaultAbortConfig {
            http_status: 503,
            grpc_status: Some(14),
            percentage: 10
        })
    );
    assert_eq!(
        api.mirror,
        Some(MirrorConfig {
            service: Some("shadow.shop.80".into()),
            percentage: 5
        })
    );
    assert_eq!(
        api.per_try_timeout.as_ref().map(|d| d.as_str()),
        Some("500ms")
    );
    assert_eq!(
        api.request_headers
            .as_ref()
            .map(|h| (h.set.len(), h.remove.clone())),
        Some((1, vec!["x-b".to_owned()]))
    );
    assert_eq!(
        api.rewrite,
        Some(RewriteConfig::ReplacePrefixMatch("/v2".into()))
    );
    let rest = &route.rules[1];
    assert!(rest.matches.is_empty());
    assert_eq!(
        rest.backends,
        [backend(Some("web.shop.80"), "Service shop/web port 80", 3)]
    );
    assert_eq!(
        rest.mirror,
        Some(MirrorConfig {
            service: None,
            percentage: 100
        }),
        "a mirror whose Service does not exist mirrors nothing"
    );
    assert_eq!(rest.response_headers.as_ref().map(|h| h.add.len()), Some(1));
    assert_eq!(
        client_view(&i)
            .services
            .get("web.shop.80")
            .unwrap()
            .retry_budget,
        None
    );
    assert_eq!(proxy_accepts(&i, &key("shop", "client")), Ok(()));
}

#[test]
fn a_missing_backend_is_compiled_unresolved_and_the_others_keep_their_weights() {
    let mut i = shop();
    // Headless: no cluster IP, so no proxy has it as a service.
    apply(&mut i, svc("shop", "headless", "None"));
    apply(
        &mut i,
        route(
            "shop",
            "r",
            "2026-01-01T00:00:00Z",
            "web",
            json!([
                {"name": "web", "weight": 70},
                {"name": "web-v3", "weight": 10},
                {"name": "web", "port": 81, "weight": 10},
                {"name": "gone", "weight": 5},
                {"name": "headless", "weight": 5}
            ]),
        ),
    );
    let state = i.resource_state(Kind::Route, &key("shop", "r")).unwrap();
    assert!(state.accepted.ok, "{state:?}");
    assert!(!state.resolved_refs.ok);
    assert_eq!(state.resolved_refs.reason, reasons::BACKEND_NOT_FOUND);
    for missing in [
        "Service shop/web-v3 not found",
        "Service shop/web has no port 81",
        "Service shop/gone not found",
    ] {
        assert!(
            state.resolved_refs.message.contains(missing),
            "{missing}: {}",
            state.resolved_refs.message
        );
    }
    let route = service_route(&i, "web.shop.80").unwrap();
    assert_eq!(
        route.rules[0].backends,
        [
            backend(Some("web.shop.80"), "Service shop/web port 80", 70),
            backend(None, "Service shop/web-v3 port 80", 10),
            backend(None, "Service shop/web port 81", 10),
            backend(None, "Service shop/gone port 80", 5),
            backend(None, "Service shop/headless port 80", 5),
        ]
    );
    assert_eq!(
        route.rules[0].timeout.as_ref().map(|t| t.as_str()),
        Some("3s")
    );
    assert_eq!(proxy_accepts(&i, &key("shop", "client")), Ok(()));

    // The backend appears: the same Route now resolves it.
    apply(&mut i, svc("shop", "web-v3", "198.19.0.13"));
    let route = service_route(&i, "web.shop.80").unwrap();
    assert_eq!(
        route.rules[0].backends[1],
        backend(Some("web-v3.shop.80"), "Service shop/web-v3 port 80", 10)
    );
}

#[test]
fn a_backend_that_never_resolves_is_named_in_resolved_refs() {
    let mut i = shop();
    // web-81 exists but lacks the routed port 80; headless has no cluster IP.
    apply(&mut i, svc_ports("shop", "web-81", "198.19.0.81", &[81]));
    apply(&mut i, svc("shop", "headless", "None"));
    apply(
        &mut i,
        route(
            "shop",
            "r",
            "2026-01-01T00:00:00Z",
            "web",
            json!([
                {"name": "web", "weight": 80},
                {"name": "web-81", "weight": 10},
                {"name": "headless", "weight": 10}
            ]),
        ),
    );
    let state = i.resource_state(Kind::Route, &key("shop", "r")).unwrap();
    assert!(state.accepted.ok, "{state:?}");
    assert!(!state.resolved_refs.ok, "{state:?}");
    assert_eq!(state.resolved_refs.reason, reasons::BACKEND_NOT_FOUND);
    for missing in [
        "Service shop/web-81 has no port 80",
        "Service shop/headless is headless or ExternalName",
    ] {
        assert!(
            state.resolved_refs.message.contains(missing),
            "{missing}: {}",
            state.resolved_refs.message
        );
    }
    // As the proxy config has it: both shares are unresolved.
    let compiled = service_route(&i, "web.shop.80").unwrap();
    assert_eq!(compiled.rules[0].backends[1].service, None);
    assert_eq!(compiled.rules[0].backends[2].service, None);

    // With the port given, web-81 resolves; only the headless one is named.
    apply(
        &mut i,
        route(
            "shop",
            "r",
            "2026-01-01T00:00:00Z",
            "web",
            json!([{"name": "web-81", "port": 81}, {"name": "headless"}]),
        ),
    );
    let state = i.resource_state(Kind::Route, &key("shop", "r")).unwrap();
    assert_eq!(
        state.resolved_refs.message,
        "Service shop/headless is headless or ExternalName: it has no cluster IP for proxies to send to"
    );
}

#[test]
fn a_route_or_breaker_whose_own_service_does_not_exist_is_not_accepted() {
    let mut i = shop();
    apply(
        &mut i,
        route(
            "shop",
            "orphan",
            "2026-01-01T00:00:00Z",
            "nope",
            json!([{"name": "web"}]),
        ),
    );
    apply(
        &mut i,
        weft(
            Kind::Breaker,
            "shop",
            "orphan-b",
            1,
            "2026-01-01T00:00:00Z",
            json!({"service": {"name": "web", "port": 81}, "connectionPool": {"maxRequests": 1}}),
        ),
    );
    let r = i
        .resource_state(Kind::Route, &key("shop", "orphan"))
        .unwrap();
    assert!(!r.accepted.ok);
    assert_eq!(r.accepted.reason, reasons::SERVICE_NOT_FOUND);
    assert!(
        r.accepted.message.contains("shop/nope"),
        "{}",
        r.accepted.message
    );
    let b = i
        .resource_state(Kind::Breaker, &key("shop", "orphan-b"))
        .unwrap();
    assert_eq!(b.accepted.reason, reasons::SERVICE_NOT_FOUND);
    assert!(
        b.accepted.message.contains("no port 81"),
        "{}",
        b.accepted.message
    );
    assert!(
        client_view(&i).resources.is_empty(),
        "nothing to program, so no proxy carries them"
    );
    // The Service appears: the Route is accepted and programmed.
    apply(&mut i, svc("shop", "nope", "198.19.0.40"));
    let r = i
        .resource_state(Kind::Route, &key("shop", "orphan"))
        .unwrap();
    assert!(r.accepted.ok, "{r:?}");
    assert!(service_route(&i, "nope.shop.80").is_some());
    assert!(client_view(&i).resources.iter().any(|r| r.name == "orphan"));
}

#[test]
fn a_route_or_breaker_on_a_headless_or_external_name_service_is_not_accepted() {
    let mut i = shop();
    apply(&mut i, svc("shop", "headless", "None"));
    let external: Service = serde_json::from_value(json!({
        "metadata": {"name": "external", "namespace": "shop"},
        "spec": {"type": "ExternalName", "externalName": "db.example.com",
                 "ports": [{"name": "http", "port": 80}]}
    }))
    .unwrap();
    apply(&mut i, model::service(&external));
    for (n, service) in ["headless", "external"].into_iter().enumerate() {
        apply(
            &mut i,
            route(
                "shop",
                &format!("r-{service}"),
                "2026-01-01T00:00:00Z",
                service,
                json!([{"name": "web"}]),
            ),
        );
        apply(
            &mut i,
            weft(
                Kind::Breaker,
                "shop",
                &format!("b-{service}"),
                1,
                &format!("2026-01-01T00:00:0{n}Z"),
                json!({"service": {"name": service}, "connectionPool": {"maxRequests": 1}}),
            ),
        );
    }
    for (kind, name) in [
        (Kind::Route, "r-headless"),
        (Kind::Route, "r-external"),
        (Kind::Breaker, "b-headless"),
        (Kind::Breaker, "b-external"),
    ] {
        let state = i.resource_state(kind, &key("shop", name)).unwrap();
        assert!(!state.accepted.ok, "{name}: {state:?}");
        assert_eq!(
            state.accepted.reason,
            reasons::UNSUPPORTED_SERVICE,
            "{name}: {state:?}"
        );
        assert!(
            state.accepted.message.contains("no cluster IP"),
            "{name}: {}",
            state.accepted.message
        );
    }
    let view = client_view(&i);
    assert!(
        view.resources.is_empty(),
        "no proxy carries them, so none counts toward Programmed: {:?}",
        view.resources
    );
    assert!(view.services.get("headless.shop.80").is_none());
}

/// Every Weft resource's `Accepted` and `ResolvedRefs`, by kind and key.
fn states(i: &Index) -> BTreeMap<(Kind, ObjectKey), ResourceState> {
    [Kind::Route, Kind::Policy, Kind::Breaker]
        .into_iter()
        .flat_map(|kind| {
            i.resource_keys(kind)
                .into_iter()
                .filter_map(move |k| Some(((kind, k.clone()), i.resource_state(kind, &k)?)))
        })
        .collect()
}

/// In a namespace without pods, creating or deleting a headless Service changes no
/// proxy's view, yet a Route or Breaker governing it goes from `ServiceNotFound` to
/// `UnsupportedService` (and back), and a Route sending or mirroring to it, or a Policy
/// targeting it, gets another `ResolvedRefs` message: the change must wake the status
/// writer (`statuses`), or the status is written only on its timer. A Service that no
/// resource names wakes nobody.
#[test]
fn a_service_change_that_changes_only_a_status_wakes_the_status_writer() {
    let mut i = Index::new("cluster.local");
    apply(
        &mut i,
        weft(
            Kind::Route,
            "empty",
            "r",
            1,
            "2026-01-01T00:00:00Z",
            json!({"service": {"name": "db"}, "rules": [{"backends": [{"name": "cache"}],
                   "mirror": {"service": {"name": "audit"}}}]}),
        ),
    );
    apply(
        &mut i,
        weft(
            Kind::Breaker,
            "empty",
            "b",
            1,
            "2026-01-01T00:00:00Z",
            json!({"service": {"name": "db"}, "connectionPool": {"maxRequests": 1}}),
        ),
    );
    apply(
        &mut i,
        weft(
            Kind::Policy,
            "empty",
            "p",
            1,
            "2026-01-01T00:00:00Z",
            json!({"target": {"service": "target"}, "defaultAction": "Deny"}),
        ),
    );
    let headless = |name: &str| svc("empty", name, "None");
    let changes = ["db", "cache", "audit", "target"]
        .map(|name| (name, true))
        .into_iter()
        .chain(["db", "cache", "audit", "target"].map(|name| (name, false)));
    for (name, create) in changes {
        let before = states(&i);
        let affected = if create {
            apply(&mut i, headless(name))
        } else {
            i.delete(Kind::Service, &key("empty", name))
        };
        let what = format!("{name} {}", if create { "created" } else { "deleted" });
        assert_ne!(states(&i), before, "{what}: some status changes");
        assert!(affected.is_empty(), "{what}: no view changes: {affected:?}");
        assert!(affected.statuses, "{what}: the status writer is woken");
    }
    let r = i.resource_state(Kind::Route, &key("empty", "r")).unwrap();
    assert_eq!(r.accepted.reason, reasons::SERVICE_NOT_FOUND, "{r:?}");
    assert_eq!(apply(&mut i, headless("other")), Affected::default());
    assert_eq!(
        i.delete(Kind::Service, &key("empty", "other")),
        Affected::default()
    );
}

#[test]
fn a_route_or_breaker_on_an_opaque_port_is_not_accepted_there_and_not_sent() {
    let mut i = shop();
    let db: Service = serde_json::from_value(json!({
        "metadata": {"name": "db", "namespace": "shop",
                     "annotations": {"weft.dev/opaque-ports": "5432"}},
        "spec": {"clusterIP": "198.19.0.30", "clusterIPs": ["198.19.0.30"],
                 "ports": [{"name": "sql", "port": 5432}, {"name": "http", "port": 80},
                           {"name": "raw", "port": 7000, "appProtocol": "tcp"}]}
    }))
    .unwrap();
    apply(&mut i, model::service(&db));
    let on = |port: Option<u16>| match port {
        Some(p) => json!({"name": "db", "port": p}),
        None => json!({"name": "db"}),
    };
    // On one opaque port each, by annotation and by appProtocol.
    for (name, port) in [("sql", 5432), ("raw", 7000)] {
        apply(
            &mut i,
            weft(
                Kind::Route,
                "shop",
                &format!("r-{name}"),
                1,
                "2026-01-01T00:00:00Z",
                json!({"service": on(Some(port)), "rules": [{"backends": [{"name": "web"}]}]}),
            ),
        );
        apply(
            &mut i,
            weft(
                Kind::Breaker,
                "shop",
                &format!("b-{name}"),
                1,
                "2026-01-01T00:00:00Z",
                json!({"service": on(Some(port)), "connectionPool": {"maxConnections": 1}}),
            ),
        );
    }
    for (kind, name, port) in [
        (Kind::Route, "r-sql", "port 5432"),
        (Kind::Route, "r-raw", "port 7000"),
        (Kind::Breaker, "b-sql", "port 5432"),
        (Kind::Breaker, "b-raw", "port 7000"),
    ] {
        let state = i.resource_state(kind, &key("shop", name)).unwrap();
        assert!(!state.accepted.ok, "{name}: {state:?}");
        assert_eq!(state.accepted.reason, reasons::OPAQUE_PORT, "{name}");
        assert!(
            state
                .accepted
                .message
                .contains(&format!("Service shop/db {port} is opaque")),
            "{name}: {}",
            state.accepted.message
        );
    }
    let view = client_view(&i);
    assert!(view.resources.is_empty(), "{:?}", view.resources);
    for port in [5432, 7000] {
        let c = view.services.get(&format!("db.shop.{port}")).unwrap();
        assert_eq!((c.route.is_some(), c.breaker.is_some()), (false, false));
    }

    // On every port: it applies on port 80 only, and says so.
    apply(
        &mut i,
        weft(
            Kind::Route,
            "shop",
            "r-all",
            1,
            "2026-01-01T00:00:00Z",
            json!({"service": on(None), "rules": [{"backends": [{"name": "web"}]}]}),
        ),
    );
    apply(
        &mut i,
        weft(
            Kind::Breaker,
            "shop",
            "b-all",
            1,
            "2026-01-01T00:00:00Z",
            json!({"service": on(None), "connectionPool": {"maxConnections": 1}}),
        ),
    );
    for (kind, name) in [(Kind::Route, "r-all"), (Kind::Breaker, "b-all")] {
        let state = i.resource_state(kind, &key("shop", name)).unwrap();
        assert!(state.accepted.ok, "{name}: {state:?}");
        assert!(
            state.accepted.message.ends_with(
                "not applied on the opaque ports 5432, 7000 of Service shop/db (forwarded as bytes)"
            ),
            "{name}: {}",
            state.accepted.message
        );
    }
    let view = client_view(&i);
    let db80 = view.services.get("db.shop.80").unwrap();
    assert_eq!(
        db80.route.as_ref().map(|r| r.name.as_str()),
        Some("shop/r-all")
    );
    assert_eq!(
        db80.breaker.as_ref().map(|b| b.name.as_str()),
        Some("shop/b-all")
    );
    for port in [5432, 7000] {
        let c = view.services.get(&format!("db.shop.{port}")).unwrap();
        assert_eq!(
            (c.route.is_some(), c.breaker.is_some()),
            (false, false),
            "{port}"
        );
    }
    assert_eq!(proxy_accepts(&i, &key("shop", "client")), Ok(()));
}

#[test]
fn a_route_or_breaker_on_a_port_proxies_treat_as_opaque_by_default_is_not_accepted_there() {
    // Redis's 6379 is among the ports every proxy forwards as bytes unless told otherwise
    // (`DEFAULT_OPAQUE_PORTS`): no appProtocol or annotation is needed for that.
    let mut i = shop();
    let cache: Service = serde_json::from_value(json!({
        "metadata": {"name": "cache", "namespace": "shop"},
        "spec": {"clusterIP": "198.19.0.31", "clusterIPs": ["198.19.0.31"],
                 "ports": [{"name": "redis", "port": 6379}]}
    }))
    .unwrap();
    apply(&mut i, model::service(&cache));
    let on = json!({"name": "cache", "port": 6379});
    apply(
        &mut i,
        weft(
            Kind::Route,
            "shop",
            "r-redis",
            1,
            "2026-01-01T00:00:00Z",
            json!({"service": on, "rules": [{"backends": [{"name": "web"}]}]}),
        ),
    );
    apply(
        &mut i,
        weft(
            Kind::Breaker,
            "shop",
            "b-redis",
            1,
            "2026-01-01T00:00:00Z",
            json!({"service": on, "connectionPool": {"maxConnections": 1}}),
        ),
    );
    for (kind, name) in [(Kind::Route, "r-redis"), (Kind::Breaker, "b-redis")] {
        let state = i.resource_state(kind, &key("shop", name)).unwrap();
        assert!(!state.accepted.ok, "{name}: {state:?}");
        assert_eq!(state.accepted.reason, reasons::OPAQUE_PORT, "{name}");
        assert!(
            state
                .accepted
                .message
                .contains("Service shop/cache port 6379 is opaque"),
            "{name}: {}",
            state.accepted.message
        );
    }
    let view = client_view(&i);
    assert!(view.resources.is_empty(), "{:?}", view.resources);
    let c = view.services.get("cache.shop.6379").unwrap();
    assert_eq!((c.route.is_some(), c.breaker.is_some()), (false, false));
    assert_eq!(c.protocol, Protocol::Opaque);
    assert_eq!(proxy_accepts(&i, &key("shop", "client")), Ok(()));
}

#[test]
fn of_two_routes_for_one_port_the_older_is_compiled_until_it_goes() {
    let mut i = shop();
    apply(
        &mut i,
        route(
            "shop",
            "newer",
            "2026-01-02T00:00:00Z",
            "web",
            json!([{"name": "web"}]),
        ),
    );
    apply(
        &mut i,
        route(
            "shop",
            "older",
            "2026-01-01T00:00:00Z",
            "web",
            json!([{"name": "web"}]),
        ),
    );
    assert_eq!(service_route(&i, "web.shop.80").unwrap().name, "shop/older");
    let newer = i
        .resource_state(Kind::Route, &key("shop", "newer"))
        .unwrap();
    assert_eq!(
        (newer.accepted.ok, newer.accepted.reason),
        (false, reasons::CONFLICTED)
    );
    assert!(
        newer.accepted.message.contains("Route older"),
        "{}",
        newer.accepted.message
    );
    i.delete(Kind::Route, &key("shop", "older"));
    assert_eq!(service_route(&i, "web.shop.80").unwrap().name, "shop/newer");
}

#[test]
fn an_older_route_or_breaker_that_governs_nothing_takes_nothing_from_a_newer_one() {
    let mut i = shop();
    let on = |kind: Kind, name: &str, created: &str, service: serde_json::Value| {
        let spec = match kind {
            Kind::Route => json!({"service": service, "rules": [{"backends": [{"name": "web"}]}]}),
            _ => json!({"service": service, "connectionPool": {"maxRequests": 1}}),
        };
        weft(kind, "shop", name, 1, created, spec)
    };
    for kind in [Kind::Route, Kind::Breaker] {
        // The older one names a port web does not have: ServiceNotFound, governs nothing.
        apply(
            &mut i,
            on(
                kind,
                "a",
                "2026-01-01T00:00:00Z",
                json!({"name": "web", "port": 9090}),
            ),
        );
        apply(
            &mut i,
            on(kind, "b", "2026-01-02T00:00:00Z", json!({"name": "web"})),
        );
        let a = i.resource_state(kind, &key("shop", "a")).unwrap();
        assert_eq!(a.accepted.reason, reasons::SERVICE_NOT_FOUND, "{kind:?}");
        let b = i.resource_state(kind, &key("shop", "b")).unwrap();
        assert!(b.accepted.ok, "{kind:?}: {b:?}");
        assert!(
            !b.accepted.message.contains("wins over"),
            "{}",
            b.accepted.message
        );
    }
    let web = client_view(&i)
        .services
        .get("web.shop.80")
        .cloned()
        .unwrap();
    assert_eq!(
        web.route.as_ref().map(|r| r.name.clone()),
        Some("shop/b".to_owned())
    );
    assert_eq!(
        web.breaker.as_ref().map(|b| b.name.clone()),
        Some("shop/b".to_owned())
    );

    // One that lost a conflict takes nothing either: c (port 81) overlaps only the
    // loser b (every port), not the winner a (port 80).
    apply(&mut i, svc_ports("shop", "api", "198.19.0.50", &[80, 81]));
    for kind in [Kind::Route, Kind::Breaker] {
        apply(
            &mut i,
            on(
                kind,
                "api-a",
                "2026-01-01T00:00:00Z",
                json!({"name": "api", "port": 80}),
            ),
        );
        apply(
            &mut i,
            on(
                kind,
                "api-b",
                "2026-01-02T00:00:00Z",
                json!({"name": "api"}),
            ),
        );
        apply(
            &mut i,
            on(
                kind,
                "api-c",
                "2026-01-03T00:00:00Z",
                json!({"name": "api", "port": 81}),
            ),
        );
        let b = i.resource_state(kind, &key("shop", "api-b")).unwrap();
        assert_eq!(b.accepted.reason, reasons::CONFLICTED, "{kind:?}");
        assert!(
            b.accepted
                .message
                .contains(&format!("{} api-a", kind.as_str())),
            "{}",
            b.accepted.message
        );
        let c = i.resource_state(kind, &key("shop", "api-c")).unwrap();
        assert!(c.accepted.ok, "{kind:?}: {c:?}");
        let a = i.resource_state(kind, &key("shop", "api-a")).unwrap();
        assert!(
            a.accepted.message.ends_with("api-b (older ones win)"),
            "{}",
            a.accepted.message
        );
    }
    let view = client_view(&i);
    let api81 = view.services.get("api.shop.81").cloned().unwrap();
    assert_eq!(
        api81.route.as_ref().map(|r| r.name.clone()),
        Some("shop/api-c".to_owned())
    );
    assert_eq!(
        api81.breaker.as_ref().map(|b| b.name.clone()),
        Some("shop/api-c".to_owned())
    );
    let api80 = view.services.get("api.shop.80").cloned().unwrap();
    assert_eq!(
        api80.route.as_ref().map(|r| r.name.clone()),
        Some("shop/api-a".to_owned())
    );
    let names: Vec<&str> = view.resources.iter().map(|r| r.name.as_str()).collect();
    // Breakers first, then Routes, each by name.
    assert_eq!(
        names,
        ["api-a", "api-c", "b", "api-a", "api-c", "b"],
        "{names:?}"
    );
}

#[test]
fn breakers_compile_per_service_port_and_the_older_of_two_wins() {
    let mut i = shop();
    apply(&mut i, svc_ports("shop", "api", "198.19.0.50", &[80, 81]));
    apply(
        &mut i,
        weft(
            Kind::Breaker,
            "shop",
            "pool",
            1,
            "2026-01-01T00:00:00Z",
            json!({"service": {"name": "api", "port": 80}, "dryRun": true,
                   "connectionPool": {"maxRequests": 20, "maxPendingRequests": 0}}),
        ),
    );
    apply(
        &mut i,
        weft(
            Kind::Breaker,
            "shop",
            "eject",
            1,
            "2026-01-02T00:00:00Z",
            json!({"service": {"name": "api", "port": 81}, "outlierDetection": {"consecutive5xx": 3}}),
        ),
    );
    apply(
        &mut i,
        weft(
            Kind::Breaker,
            "shop",
            "late",
            1,
            "2026-01-03T00:00:00Z",
            json!({"service": {"name": "api"}, "connectionPool": {"maxConnections": 1}}),
        ),
    );
    let view = client_view(&i);
    let on80 = view
        .services
        .get("api.shop.80")
        .unwrap()
        .breaker
        .clone()
        .unwrap();
    assert_eq!(on80.name, "shop/pool");
    assert!(on80.dry_run);
    let pool = on80.connection_pool.unwrap();
    assert_eq!(
        (
            pool.max_requests,
            pool.max_pending_requests,
            pool.max_connections
        ),
        (Some(20), Some(0), None)
    );
    assert_eq!(on80.outlier_detection, None);
    let on81 = view
        .services
        .get("api.shop.81")
        .unwrap()
        .breaker
        .clone()
        .unwrap();
    assert_eq!(on81.name, "shop/eject");
    let od = on81.outlier_detection.unwrap();
    assert_eq!(
        (
            od.consecutive5xx,
            od.consecutive_connect_failures,
            od.interval.as_str(),
            od.max_ejected_percent
        ),
        (3, 5, "10s", 50),
        "the CRD's defaults fill the rest"
    );
    assert!(!on81.dry_run);
    assert_eq!(view.services.get("web.shop.80").unwrap().breaker, None);

    // `late` covers every port, so it overlaps both; it loses to the first older one.
    let late = i
        .resource_state(Kind::Breaker, &key("shop", "late"))
        .unwrap();
    assert_eq!(
        (late.accepted.ok, late.accepted.reason),
        (false, reasons::CONFLICTED)
    );
    assert!(
        late.accepted.message.contains("Breaker pool"),
        "{}",
        late.accepted.message
    );
    let pool_state = i
        .resource_state(Kind::Breaker, &key("shop", "pool"))
        .unwrap();
    assert!(
        pool_state.accepted.message.contains("late"),
        "{}",
        pool_state.accepted.message
    );
    assert!(
        !view.resources.iter().any(|r| r.name == "late"),
        "a losing Breaker is not programmed"
    );
    assert_eq!(proxy_accepts(&i, &key("shop", "client")), Ok(()));

    // The winners go: the newer one takes over on both ports.
    i.delete(Kind::Breaker, &key("shop", "pool"));
    i.delete(Kind::Breaker, &key("shop", "eject"));
    let view = client_view(&i);
    for port in [80, 81] {
        let b = view
            .services
            .get(&format!("api.shop.{port}"))
            .unwrap()
            .breaker
            .clone();
        assert_eq!(b.map(|b| b.name), Some("shop/late".to_owned()));
    }
}

fn policy(name: &str, created: &str, spec: serde_json::Value) -> (ObjectKey, Object) {
    weft(Kind::Policy, "shop", name, 1, created, spec)
}

fn inbound(i: &Index, pod: &str) -> Option<RateLimitConfig> {
    i.view(&key("shop", pod))
        .unwrap()
        .inbound
        .and_then(|b| b.rate_limit)
}

#[test]
fn a_rate_limit_reaches_only_the_pods_its_policy_targets_and_the_older_policy_wins() {
    let mut i = shop();
    apply(&mut i, svc("shop", "api", "198.19.0.11"));
    apply(
        &mut i,
        pod("shop", "api-a", "api-sa", json!({"app": "api"})),
    );
    // By selector: web's pods.
    let affected = apply(
        &mut i,
        policy(
            "web-limit",
            "2026-01-02T00:00:00Z",
            json!({"target": {"selector": {"matchLabels": {"app": "web"}}}, "mtls": {"mode": "Disabled"},
                   "defaultAction": "Allow",
                   "rateLimit": {"requestsPerSecond": 5, "per": "ClientIdentity", "dryRun": true}}),
        ),
    );
    assert!(affected.pods.contains(&key("shop", "web-a")));
    assert_eq!(
        inbound(&i, "web-a"),
        Some(RateLimitConfig {
            name: "shop/web-limit".into(),
            requests_per_second: 5,
            burst: 5,
            per: RateLimitPer::Client,
            dry_run: true,
        }),
        "burst defaults to requestsPerSecond"
    );
    assert_eq!(inbound(&i, "client"), None);
    assert_eq!(inbound(&i, "api-a"), None);

    // By Service: the pods its selector matches.
    apply(
        &mut i,
        policy(
            "api-limit",
            "2026-01-02T00:00:00Z",
            json!({"target": {"service": "api"}, "rateLimit": {"requestsPerSecond": 50, "burst": 80}}),
        ),
    );
    let api = inbound(&i, "api-a").unwrap();
    assert_eq!(
        (
            api.name.as_str(),
            api.requests_per_second,
            api.burst,
            api.per,
            api.dry_run
        ),
        ("shop/api-limit", 50, 80, RateLimitPer::Workload, false)
    );
    assert_eq!(inbound(&i, "client"), None);
    assert_eq!(inbound(&i, "web-a").unwrap().name, "shop/web-limit");

    // An older Policy that also limits web's pods wins; a Policy without a limit changes
    // nothing.
    apply(
        &mut i,
        policy(
            "web-older",
            "2026-01-01T00:00:00Z",
            json!({"target": {"service": "web"}, "rateLimit": {"requestsPerSecond": 7}}),
        ),
    );
    apply(
        &mut i,
        policy(
            "web-oldest-no-limit",
            "2025-01-01T00:00:00Z",
            json!({"target": {"service": "web"}}),
        ),
    );
    assert_eq!(inbound(&i, "web-a").unwrap().name, "shop/web-older");
    let features = |name: &str| -> Vec<String> {
        let view = i.view(&key("shop", "web-a")).unwrap();
        let r = view.resources.iter().find(|r| r.name == name).unwrap();
        r.requires.iter().map(|r| r.feature.clone()).collect()
    };
    assert!(
        features("web-limit").contains(&requires::OVERRIDDEN.to_owned()),
        "an overridden limit is not claimed as enforced: {:?}",
        features("web-limit")
    );
    assert!(features("web-older").contains(&weft_api::push::feature::POLICY_RATE_LIMIT.to_owned()));
    assert_eq!(proxy_accepts(&i, &key("shop", "web-a")), Ok(()));
    i.delete(Kind::Policy, &key("shop", "web-older"));
    assert_eq!(inbound(&i, "web-a").unwrap().name, "shop/web-limit");
}

#[test]
fn deleting_a_route_breaker_or_rate_limit_restores_every_view() {
    let mut i = shop();
    apply(&mut i, svc("shop", "web-v2", "198.19.0.12"));
    let pods = [key("shop", "client"), key("shop", "web-a")];
    let resources = [
        (
            Kind::Route,
            route(
                "shop",
                "split",
                "2026-01-01T00:00:00Z",
                "web",
                json!([{"name": "web", "weight": 50}, {"name": "web-v2", "weight": 50}]),
            ),
        ),
        (
            Kind::Breaker,
            weft(
                Kind::Breaker,
                "shop",
                "b",
                1,
                "2026-01-01T00:00:00Z",
                json!({"service": {"name": "web"}, "connectionPool": {"maxRequests": 2}}),
            ),
        ),
        (
            Kind::Policy,
            policy(
                "limit",
                "2026-01-01T00:00:00Z",
                json!({"target": {"service": "web"}, "rateLimit": {"requestsPerSecond": 1}}),
            ),
        ),
    ];
    for (kind, (k, o)) in resources {
        let before: Vec<ProxyView> = pods.iter().map(|p| i.view(p).unwrap()).collect();
        apply(&mut i, (k.clone(), o));
        let during: Vec<ProxyView> = pods.iter().map(|p| i.view(p).unwrap()).collect();
        assert!(
            before.iter().zip(&during).any(|(b, d)| !b.same_content(d)),
            "{kind:?} changed nothing"
        );
        let affected = i.delete(kind, &k);
        assert!(pods.iter().any(|p| i.is_affected(p, &affected)), "{kind:?}");
        for (pod, b) in pods.iter().zip(&before) {
            let after = i.view(pod).unwrap();
            assert!(
                after.same_content(b),
                "{kind:?}: {pod} before {b:?}\nafter {after:?}"
            );
            let services = |v: &ProxyView| -> Vec<ServiceConfig> {
                v.services.values().map(|s| (**s).clone()).collect()
            };
            assert_eq!(services(&after), services(b), "{kind:?}: {pod}");
            assert_eq!(after.inbound, b.inbound, "{kind:?}: {pod}");
        }
    }
}

#[test]
fn policies_beyond_what_a_proxy_accepts_for_one_pod_are_refused_newest_first() {
    let max = weft_proxy::authz::MAX_POLICIES;
    let mut i = shop();
    let created = |n: usize| format!("2026-01-01T{:02}:{:02}:00Z", n / 60, n % 60);
    let deny_admin = json!({"target": {"selector": {"matchLabels": {"app": "client"}}},
                            "mtls": {"mode": "Permissive"},
                            "rules": [{"action": "Deny", "to": [{"paths": [{"prefix": "/admin"}]}]}]});
    for n in 0..max + 2 {
        apply(
            &mut i,
            policy(&format!("p{n:03}"), &created(n), deny_admin.clone()),
        );
    }
    // One that sends no authorization costs the proxy nothing: never refused.
    apply(
        &mut i,
        policy(
            "mode-only",
            &created(max + 5),
            json!({"target": {"selector": {"matchLabels": {"app": "client"}}},
                   "mtls": {"mode": "Permissive"}, "defaultAction": "Allow"}),
        ),
    );
    for n in 0..max + 2 {
        let state = i
            .resource_state(Kind::Policy, &key("shop", &format!("p{n:03}")))
            .unwrap();
        if n < max {
            assert!(state.accepted.ok, "p{n:03}: {state:?}");
        } else {
            assert_eq!(state.accepted.reason, reasons::TOO_MANY_POLICIES, "p{n:03}");
            assert!(
                state.accepted.message.contains("pod shop/client"),
                "{}",
                state.accepted.message
            );
        }
    }
    let mode_only = i
        .resource_state(Kind::Policy, &key("shop", "mode-only"))
        .unwrap();
    assert!(mode_only.accepted.ok, "{mode_only:?}");
    let view = client_view(&i);
    assert_eq!(view.inbound.as_ref().unwrap().authorization.len(), max);
    assert!(
        !view
            .resources
            .iter()
            .any(|r| r.name == format!("p{max:03}"))
    );
    assert_eq!(proxy_accepts(&i, &key("shop", "client")), Ok(()));

    // An older one goes: the oldest refused one takes its place.
    i.delete(Kind::Policy, &key("shop", "p000"));
    let state = i
        .resource_state(Kind::Policy, &key("shop", &format!("p{max:03}")))
        .unwrap();
    assert!(state.accepted.ok, "{state:?}");
    assert_eq!(
        i.resource_state(Kind::Policy, &key("shop", &format!("p{:03}", max + 1)))
            .unwrap()
            .accepted
            .reason,
        reasons::TOO_MANY_POLICIES
    );
    assert_eq!(proxy_accepts(&i, &key("shop", "client")), Ok(()));
}
