use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::api::DynamicObject;
use serde_json::json;
use weft_api::proxy_config::Protocol;

use super::*;

fn svc(ns: &str, name: &str, ip: &str) -> (ObjectKey, Object) {
    let s: Service = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "selector": {"app": name},
                 "ports": [{"name": "http", "port": 80}]}
    }))
    .unwrap();
    model::service(&s)
}

/// A slice with (ip, ready, terminating, pod) endpoints on port `http` 8080.
fn slice(
    ns: &str,
    name: &str,
    service: &str,
    eps: &[(&str, bool, bool, Option<&str>)],
) -> (ObjectKey, Object) {
    let endpoints: Vec<_> = eps
        .iter()
        .map(|(ip, ready, term, pod)| {
            let mut e = json!({"addresses": [ip], "conditions": {"ready": ready, "terminating": term}, "zone": "z1"});
            if let Some(p) = pod {
                e["targetRef"] = json!({"kind": "Pod", "name": p, "namespace": ns});
            }
            e
        })
        .collect();
    let s: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": endpoints,
    }))
    .unwrap();
    model::endpoint_slice(&s)
}

fn pod(ns: &str, name: &str, sa: &str, labels: serde_json::Value) -> (ObjectKey, Object) {
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"serviceAccountName": sa, "containers": []}
    }))
    .unwrap();
    model::pod(&p)
}

fn weft(
    kind: Kind,
    ns: &str,
    name: &str,
    gen_: i64,
    created: &str,
    spec: serde_json::Value,
) -> (ObjectKey, Object) {
    let o: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": kind.as_str(),
        "metadata": {"name": name, "namespace": ns, "generation": gen_, "creationTimestamp": created},
        "spec": spec,
    }))
    .unwrap();
    model::weft_resource(kind, &o)
}

fn route(
    ns: &str,
    name: &str,
    created: &str,
    service: &str,
    backends: serde_json::Value,
) -> (ObjectKey, Object) {
    weft(
        Kind::Route,
        ns,
        name,
        1,
        created,
        json!({"service": {"name": service}, "rules": [{"backends": backends, "timeout": "3s"}]}),
    )
}

fn apply(index: &mut Index, (k, o): (ObjectKey, Object)) -> Affected {
    index.apply(k, o)
}

fn key(ns: &str, name: &str) -> ObjectKey {
    ObjectKey::new(ns, name)
}

/// A namespace `shop` with Service web (2 ready, 1 not ready, 1 terminating endpoints) and a
/// meshed client pod.
fn shop() -> Index {
    shop_with(Index::new("cluster.local"))
}

/// The `shop` namespace of [`shop`] in `i`.
fn shop_with(mut i: Index) -> Index {
    apply(&mut i, svc("shop", "web", "198.19.0.10"));
    apply(
        &mut i,
        slice(
            "shop",
            "web-1",
            "web",
            &[
                ("198.18.100.1", true, false, Some("web-a")),
                ("198.18.100.2", true, false, None),
                ("198.18.100.3", false, false, None),
                ("198.18.100.4", false, true, None),
            ],
        ),
    );
    apply(
        &mut i,
        pod("shop", "web-a", "web-sa", json!({"app": "web"})),
    );
    apply(
        &mut i,
        pod("shop", "client", "client-sa", json!({"app": "client"})),
    );
    i
}

#[test]
fn a_proxy_gets_ready_endpoints_with_identities_of_meshed_pods() {
    let i = shop();
    let view = i.view(&key("shop", "client")).unwrap();
    let web = view.services.get("web.shop.80").unwrap();
    assert_eq!(web.addresses, vec!["198.19.0.10:80"]);
    let addrs: Vec<&str> = web.endpoints.iter().map(|e| e.address.as_str()).collect();
    assert_eq!(
        addrs,
        vec!["198.18.100.1:8080", "198.18.100.2:8080"],
        "not-ready and terminating endpoints are left out"
    );
    assert_eq!(
        web.endpoints[0].identity.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/web-sa")
    );
    assert_eq!(web.endpoints[1].identity, None, "unmeshed endpoint");
    assert_eq!(web.endpoints[0].labels["zone"], "z1");
    assert!(i.view(&key("shop", "unknown")).is_none());
}

#[test]
fn opaque_ports_of_a_service_reach_its_clients() {
    let s: Service = serde_json::from_value(json!({
        "metadata": {"name": "db", "namespace": "shop",
                     "annotations": {"weft.dev/opaque-ports": "3307,9000-9001"}},
        "spec": {"clusterIP": "198.19.0.30", "clusterIPs": ["198.19.0.30"],
                 "ports": [{"name": "sql", "port": 3307}, {"name": "http", "port": 80},
                           {"name": "admin", "port": 9001},
                           {"name": "raw", "port": 7000, "appProtocol": "tcp"}]}
    }))
    .unwrap();
    let mut i = shop();
    apply(&mut i, model::service(&s));
    let view = i.view(&key("shop", "client")).unwrap();
    let protocol = |name: &str| view.services.get(name).unwrap().protocol;
    assert_eq!(protocol("db.shop.3307"), Protocol::Opaque);
    assert_eq!(protocol("db.shop.9001"), Protocol::Opaque);
    assert_eq!(protocol("db.shop.7000"), Protocol::Opaque, "appProtocol");
    assert_eq!(protocol("db.shop.80"), Protocol::Detect);

    // A malformed annotation is ignored, not fatal.
    let mut bad = s.clone();
    bad.metadata.annotations = Some(
        [("weft.dev/opaque-ports".to_owned(), "mysql".to_owned())]
            .into_iter()
            .collect(),
    );
    apply(&mut i, model::service(&bad));
    let view = i.view(&key("shop", "client")).unwrap();
    assert_eq!(
        view.services.get("db.shop.3307").unwrap().protocol,
        Protocol::Detect
    );
}

#[test]
fn the_generated_config_passes_the_proxys_wire_format() {
    let i = shop();
    let view = i.view(&key("shop", "client")).unwrap();
    let raw = weft_api::proxy_config::ProxyConfig {
        api_version: weft_api::proxy_config::PROXY_CONFIG_API_VERSION.into(),
        kind: weft_api::proxy_config::PROXY_CONFIG_KIND.into(),
        version: Some(view.version.to_string()),
        detect_timeout: None,
        connect_timeout: None,
        opaque_ports: None,
        services: view.services.values().map(|s| (**s).clone()).collect(),
        inbound: None,
    };
    let text = serde_json::to_string(&raw).unwrap();
    let back: weft_api::proxy_config::ProxyConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(back, raw);
}

#[test]
fn an_endpoint_change_touches_only_proxies_that_see_the_namespace() {
    let mut i = shop();
    apply(&mut i, svc("other", "db", "198.19.0.20"));
    apply(&mut i, pod("other", "worker", "default", json!({})));
    let before_client = i.view(&key("shop", "client")).unwrap();
    let before_worker = i.view(&key("other", "worker")).unwrap();

    let affected = apply(
        &mut i,
        slice(
            "shop",
            "web-1",
            "web",
            &[
                ("198.18.100.1", true, false, Some("web-a")),
                ("198.18.100.9", true, false, None),
            ],
        ),
    );
    assert_eq!(affected.namespaces, BTreeSet::from(["shop".to_owned()]));
    assert!(i.is_affected(&key("shop", "client"), &affected));
    assert!(!i.is_affected(&key("other", "worker"), &affected));
    let after_worker = i.view(&key("other", "worker")).unwrap();
    assert!(after_worker.same_content(&before_worker));
    let after_client = i.view(&key("shop", "client")).unwrap();
    assert!(!after_client.same_content(&before_client));
    assert!(after_client.version > before_client.version);

    // The same object again changes nothing and wakes nobody.
    let again = apply(
        &mut i,
        slice(
            "shop",
            "web-1",
            "web",
            &[
                ("198.18.100.1", true, false, Some("web-a")),
                ("198.18.100.9", true, false, None),
            ],
        ),
    );
    assert!(again.is_empty(), "{again:?}");
    // A slice change that does not change the endpoints the proxy sees wakes nobody.
    let not_ready_only = apply(
        &mut i,
        slice(
            "shop",
            "web-1",
            "web",
            &[
                ("198.18.100.1", true, false, Some("web-a")),
                ("198.18.100.9", true, false, None),
                ("198.18.100.7", false, false, None),
            ],
        ),
    );
    assert!(not_ready_only.namespaces.is_empty(), "{not_ready_only:?}");
}

#[test]
fn unchanged_services_keep_their_shared_config() {
    let mut i = shop();
    apply(&mut i, svc("shop", "api", "198.19.0.11"));
    let before = i.view(&key("shop", "client")).unwrap();
    apply(
        &mut i,
        slice(
            "shop",
            "api-1",
            "api",
            &[("198.18.101.1", true, false, None)],
        ),
    );
    let after = i.view(&key("shop", "client")).unwrap();
    assert!(Arc::ptr_eq(
        before.services.get("web.shop.80").unwrap(),
        after.services.get("web.shop.80").unwrap()
    ));
    assert!(!Arc::ptr_eq(
        before.services.get("api.shop.80").unwrap(),
        after.services.get("api.shop.80").unwrap()
    ));
}

/// A rebuild computes again only the configs a change may alter (`Dirty`): each change
/// below must show in the config of the Service whose endpoint it touches, and leave the
/// other Service's config the very same `Arc`. A `Dirty` that missed the Service would
/// keep its stale config here (and fail the rebuild's own check against a whole one).
#[test]
fn a_change_rebuilds_the_service_configs_it_touches_and_keeps_the_others() {
    let mut i = shop();
    apply(&mut i, svc("shop", "api", "198.19.0.11"));
    apply(
        &mut i,
        slice(
            "shop",
            "api-1",
            "api",
            &[("198.18.101.1", true, false, Some("api-a"))],
        ),
    );
    apply(
        &mut i,
        pod_at("api-a", &["198.18.101.1"], &[8080], "", "Running"),
    );
    apply(
        &mut i,
        pod_at("web-a", &["198.18.100.1"], &[8080, 9090], "", "Running"),
    );
    let client = key("shop", "client");
    let config = |i: &Index, name: &str| i.view(&client).unwrap().services.get(name).cloned();
    let endpoints = |c: &Option<Arc<ServiceConfig>>| -> Vec<(String, Option<String>)> {
        c.as_ref()
            .map(|c| {
                c.endpoints
                    .iter()
                    .map(|e| (e.address.clone(), e.identity.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let web_identity = |sa: &str| Some(format!("spiffe://cluster.local/ns/shop/sa/{sa}"));
    assert_eq!(
        endpoints(&config(&i, "web.shop.80")),
        [
            ("198.18.100.1:8080".to_owned(), web_identity("web-a-sa")),
            ("198.18.100.2:8080".to_owned(), None),
        ]
    );
    let api = config(&i, "api.shop.80").unwrap();
    let pods_ns = pods_config_name("shop", Protocol::Detect);
    let still_api = |i: &Index, step: &str| {
        let now = config(i, "api.shop.80").unwrap();
        assert!(Arc::ptr_eq(&api, &now), "api's config rebuilt by {step}");
    };

    // web-a's endpoint leaves web's slice: the pods config lists it at 8080, since no
    // Service does now (only the slice as it was names that address).
    let at_8080 = |i: &Index| {
        endpoints(&config(i, &pods_ns))
            .iter()
            .any(|(a, _)| a == "198.18.100.1:8080")
    };
    assert!(!at_8080(&i));
    apply(
        &mut i,
        slice(
            "shop",
            "web-1",
            "web",
            &[("198.18.100.2", true, false, None)],
        ),
    );
    assert!(at_8080(&i), "{:?}", config(&i, &pods_ns));
    still_api(&i, "web's slice");

    // Back, not ready: web's config does not list it, the pods config still does; api's
    // is untouched.
    apply(
        &mut i,
        slice(
            "shop",
            "web-1",
            "web",
            &[
                ("198.18.100.1", false, false, Some("web-a")),
                ("198.18.100.2", true, false, None),
            ],
        ),
    );
    assert_eq!(
        endpoints(&config(&i, "web.shop.80")),
        [("198.18.100.2:8080".to_owned(), None)]
    );
    assert!(
        endpoints(&config(&i, &pods_ns))
            .iter()
            .any(|(a, _)| a == "198.18.100.1:8080"),
        "{:?}",
        config(&i, &pods_ns)
    );
    still_api(&i, "web's readiness");

    // Ready again, and its pod changes ServiceAccount and address: web's endpoint
    // carries the new identity (its address is the slice's), the pods config the new
    // address.
    apply(
        &mut i,
        slice(
            "shop",
            "web-1",
            "web",
            &[
                ("198.18.100.1", true, false, Some("web-a")),
                ("198.18.100.2", true, false, None),
            ],
        ),
    );
    let (k, Object::Pod(mut moved)) =
        pod_at("web-a", &["198.18.100.5"], &[8080, 9090], "", "Running")
    else {
        unreachable!("pod_at makes a pod")
    };
    moved.service_account = "web-b-sa".to_owned();
    apply(&mut i, (k, Object::Pod(moved)));
    assert_eq!(
        endpoints(&config(&i, "web.shop.80"))[0],
        ("198.18.100.1:8080".to_owned(), web_identity("web-b-sa"))
    );
    let pods_now: Vec<String> = endpoints(&config(&i, &pods_ns))
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    assert!(
        pods_now.contains(&"198.18.100.5:9090".to_owned()),
        "{pods_now:?}"
    );
    assert!(
        !pods_now.contains(&"198.18.100.1:9090".to_owned()),
        "{pods_now:?}"
    );
    still_api(&i, "web-a's pod");

    // A Policy disabling mTLS on web's pods strips web-a's identity from web's config.
    apply(
        &mut i,
        policy_with_mode(
            "plain",
            "2026-01-01T00:00:00Z",
            json!({"selector": {"matchLabels": {"app": "web-a"}}}),
            "Disabled",
        ),
    );
    assert_eq!(
        endpoints(&config(&i, "web.shop.80"))[0],
        ("198.18.100.1:8080".to_owned(), None)
    );
    still_api(&i, "a Policy on web-a");
    i.delete(Kind::Policy, &key("shop", "plain"));
    assert_eq!(
        endpoints(&config(&i, "web.shop.80"))[0].1,
        web_identity("web-b-sa")
    );
    still_api(&i, "the Policy's deletion");

    // web-a's pod gone: its endpoint has no identity left.
    i.delete(Kind::Pod, &key("shop", "web-a"));
    assert_eq!(endpoints(&config(&i, "web.shop.80"))[0].1, None);
    still_api(&i, "web-a's deletion");
}

#[test]
fn conflicting_routes_are_both_told_and_the_older_wins() {
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
    let newer = i
        .resource_state(Kind::Route, &key("shop", "newer"))
        .unwrap();
    let older = i
        .resource_state(Kind::Route, &key("shop", "older"))
        .unwrap();
    assert!(!newer.accepted.ok);
    assert_eq!(newer.accepted.reason, reasons::CONFLICTED);
    assert!(
        newer.accepted.message.contains("older"),
        "{}",
        newer.accepted.message
    );
    assert!(older.accepted.ok);
    assert!(
        older.accepted.message.contains("newer"),
        "{}",
        older.accepted.message
    );
    let view = i.view(&key("shop", "client")).unwrap();
    assert!(view.resources.iter().any(|r| r.name == "older"));
    assert!(
        !view.resources.iter().any(|r| r.name == "newer"),
        "a losing Route is not programmed"
    );

    // Delete the winner: the other takes over.
    i.delete(Kind::Route, &key("shop", "older"));
    assert!(
        i.resource_state(Kind::Route, &key("shop", "newer"))
            .unwrap()
            .accepted
            .ok
    );
}

#[test]
fn a_missing_backend_is_named_until_it_exists() {
    let mut i = shop();
    apply(
        &mut i,
        route(
            "shop",
            "r",
            "2026-01-01T00:00:00Z",
            "web",
            json!([{"name": "web"}, {"name": "web-v3"}]),
        ),
    );
    let state = i.resource_state(Kind::Route, &key("shop", "r")).unwrap();
    assert!(!state.resolved_refs.ok);
    assert_eq!(state.resolved_refs.reason, reasons::BACKEND_NOT_FOUND);
    assert!(
        state.resolved_refs.message.contains("shop/web-v3"),
        "{}",
        state.resolved_refs.message
    );
    apply(&mut i, svc("shop", "web-v3", "198.19.0.13"));
    assert!(
        i.resource_state(Kind::Route, &key("shop", "r"))
            .unwrap()
            .resolved_refs
            .ok
    );
}

#[test]
fn an_unparsable_resource_is_kept_as_invalid_and_reported() {
    let mut i = shop();
    apply(
        &mut i,
        weft(
            Kind::Breaker,
            "shop",
            "bad",
            3,
            "2026-01-01T00:00:00Z",
            json!({"service": 42}),
        ),
    );
    let state = i
        .resource_state(Kind::Breaker, &key("shop", "bad"))
        .unwrap();
    assert!(!state.accepted.ok);
    assert_eq!(state.accepted.reason, reasons::INVALID);
    assert_eq!(state.generation, 3);
    let view = i.view(&key("shop", "client")).unwrap();
    assert!(view.resources.is_empty());
}

#[test]
fn a_relist_removes_what_disappeared_while_the_watch_was_down() {
    let mut i = shop();
    apply(&mut i, svc("shop", "api", "198.19.0.11"));
    let affected = i.replace(Kind::Service, vec![svc("shop", "web", "198.19.0.10")]);
    assert!(affected.namespaces.contains("shop"));
    let view = i.view(&key("shop", "client")).unwrap();
    assert!(view.services.contains_key("web.shop.80"));
    assert!(!view.services.contains_key("api.shop.80"));
    assert_eq!(i.len(Kind::Service), 1);
    // Relisting the same state is a no-op.
    assert!(
        i.replace(Kind::Service, vec![svc("shop", "web", "198.19.0.10")])
            .is_empty()
    );
}

#[test]
fn visibility_annotations_widen_what_a_proxy_receives() {
    let mut i = shop();
    apply(&mut i, svc("other", "db", "198.19.0.20"));
    let client = key("shop", "client");
    assert!(
        !i.view(&client)
            .unwrap()
            .services
            .contains_key("db.other.80")
    );
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "shop", "annotations": {"weft.dev/visible-namespaces": "other"}}})).unwrap();
    let (k, o) = model::namespace(&ns);
    let affected = i.apply(k, o);
    assert!(affected.pods.contains(&client));
    assert!(
        i.view(&client)
            .unwrap()
            .services
            .contains_key("db.other.80")
    );
    // A pod annotation `*` sees every namespace.
    let p: Pod = serde_json::from_value(json!({"metadata": {"name": "all", "namespace": "x", "annotations": {"weft.dev/visible-namespaces": "*"}}, "spec": {"containers": []}})).unwrap();
    let (k, o) = model::pod(&p);
    i.apply(k.clone(), o);
    let all = i.view(&k).unwrap();
    assert!(all.services.contains_key("db.other.80") && all.services.contains_key("web.shop.80"));
}

#[test]
fn policies_apply_to_the_pods_they_select() {
    let mut i = shop();
    apply(
        &mut i,
        weft(
            Kind::Policy,
            "shop",
            "web-in",
            2,
            "2026-01-01T00:00:00Z",
            json!({"target": {"selector": {"matchLabels": {"app": "web"}}}}),
        ),
    );
    apply(
        &mut i,
        weft(
            Kind::Policy,
            "shop",
            "by-svc",
            1,
            "2026-01-01T00:00:00Z",
            json!({"target": {"service": "web"}}),
        ),
    );
    let web = i.view(&key("shop", "web-a")).unwrap();
    let names: Vec<&str> = web
        .resources
        .iter()
        .filter(|r| r.kind == "Policy")
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, vec!["by-svc", "web-in"]);
    let client = i.view(&key("shop", "client")).unwrap();
    assert!(client.resources.iter().all(|r| r.kind != "Policy"));
}

#[test]
fn policies_compile_into_the_inbound_config_of_their_pods_and_the_strictest_mode_wins() {
    let mut i = shop();
    apply(
        &mut i,
        weft(
            Kind::Policy,
            "shop",
            "web-in",
            1,
            "2026-01-01T00:00:00Z",
            json!({"target": {"selector": {"matchLabels": {"app": "web"}}},
                   "mtls": {"mode": "Permissive"}, "defaultAction": "Deny",
                   "rules": [{"action": "Allow", "from": [{"serviceAccounts": [{"name": "client-sa"}]}],
                              "to": [{"paths": [{"prefix": "/api"}]}]}]}),
        ),
    );
    let inbound = i.view(&key("shop", "web-a")).unwrap().inbound.unwrap();
    assert_eq!(inbound.mtls, Some(MtlsMode::Permissive));
    assert_eq!(inbound.authorization.len(), 1);
    assert_eq!(inbound.authorization[0].name, "shop/web-in");
    assert_eq!(
        inbound.authorization[0].rules[0].from[0].identities,
        ["spiffe://cluster.local/ns/shop/sa/client-sa"]
    );
    assert_eq!(proxy_accepts(&i, &key("shop", "web-a")), Ok(()));
    // The client pod is not selected: nothing inbound.
    assert_eq!(i.view(&key("shop", "client")).unwrap().inbound, None);

    // A second Policy through the Service, Strict and allowing everything: Strict wins,
    // and an allow-all authorization is not sent.
    apply(
        &mut i,
        weft(
            Kind::Policy,
            "shop",
            "by-svc",
            1,
            "2026-01-02T00:00:00Z",
            json!({"target": {"service": "web"}, "mtls": {"mode": "Strict"},
                   "defaultAction": "Allow"}),
        ),
    );
    let inbound = i.view(&key("shop", "web-a")).unwrap().inbound.unwrap();
    assert_eq!(inbound.mtls, Some(MtlsMode::Strict));
    let names: Vec<&str> = inbound
        .authorization
        .iter()
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(names, ["shop/web-in"]);
}

#[test]
fn a_disabled_mode_strips_the_pods_identity_from_every_clients_view() {
    let mut i = shop();
    let identity = |i: &Index| {
        i.view(&key("shop", "client"))
            .unwrap()
            .services
            .get("web.shop.80")
            .unwrap()
            .endpoints[0]
            .identity
            .clone()
    };
    assert!(identity(&i).is_some());
    apply(
        &mut i,
        weft(
            Kind::Policy,
            "shop",
            "plain",
            1,
            "2026-01-01T00:00:00Z",
            json!({"target": {"service": "web"}, "mtls": {"mode": "Disabled"},
                   "defaultAction": "Allow"}),
        ),
    );
    assert_eq!(identity(&i), None, "no client originates mTLS to it");
    // A stricter Policy on the same pod brings it back.
    apply(
        &mut i,
        weft(
            Kind::Policy,
            "shop",
            "tls",
            1,
            "2026-01-02T00:00:00Z",
            json!({"target": {"selector": {"matchLabels": {"app": "web"}}},
                   "mtls": {"mode": "Permissive"}, "defaultAction": "Allow"}),
        ),
    );
    assert!(identity(&i).is_some());
    i.delete(Kind::Policy, &key("shop", "tls"));
    assert_eq!(identity(&i), None);
}

/// The inbound mTLS mode the proxy of `pod` is sent (`None`: no inbound settings, so the
/// proxy's own default, Permissive).
fn inbound_mode(i: &Index, pod: &str) -> Option<MtlsMode> {
    i.view(&key("shop", pod))
        .unwrap()
        .inbound
        .and_then(|b| b.mtls)
}

fn policy_with_mode(
    name: &str,
    created: &str,
    target: serde_json::Value,
    mode: &str,
) -> (ObjectKey, Object) {
    weft(
        Kind::Policy,
        "shop",
        name,
        1,
        created,
        json!({"target": target, "mtls": {"mode": mode}, "defaultAction": "Allow"}),
    )
}

#[test]
fn the_mesh_default_applies_where_no_policy_selects_and_a_namespace_policy_overrides_it() {
    // The default mesh (Permissive) sends nothing: the proxy's own default is the same.
    let i = shop();
    assert_eq!(inbound_mode(&i, "web-a"), None);
    assert_eq!(inbound_mode(&i, "client"), None);

    // A Strict mesh: every pod is told, though no Policy exists.
    let mut i = shop_with(Index::new("cluster.local").with_mesh_mtls(MtlsMode::Strict));
    assert_eq!(inbound_mode(&i, "web-a"), Some(MtlsMode::Strict));
    assert_eq!(inbound_mode(&i, "client"), Some(MtlsMode::Strict));
    assert_eq!(proxy_accepts(&i, &key("shop", "client")), Ok(()));

    // A namespace-wide Policy (empty selector) overrides the mesh in its namespace, even
    // with a laxer mode.
    apply(
        &mut i,
        policy_with_mode(
            "ns-wide",
            "2026-01-01T00:00:00Z",
            json!({"selector": {}}),
            "Permissive",
        ),
    );
    assert_eq!(inbound_mode(&i, "web-a"), Some(MtlsMode::Permissive));
    assert_eq!(inbound_mode(&i, "client"), Some(MtlsMode::Permissive));

    // A workload Policy overrides the namespace's, in either direction: laxer here...
    apply(
        &mut i,
        policy_with_mode(
            "web-plain",
            "2026-01-02T00:00:00Z",
            json!({"selector": {"matchLabels": {"app": "web"}}}),
            "Disabled",
        ),
    );
    assert_eq!(inbound_mode(&i, "web-a"), Some(MtlsMode::Disabled));
    assert_eq!(inbound_mode(&i, "client"), Some(MtlsMode::Permissive));
    // ...and a Disabled workload is one no client originates mTLS to.
    let web = i.view(&key("shop", "client")).unwrap();
    assert_eq!(
        web.services.get("web.shop.80").unwrap().endpoints[0].identity,
        None
    );

    // ...stricter there, through a Service.
    i.delete(Kind::Policy, &key("shop", "web-plain"));
    apply(
        &mut i,
        policy_with_mode(
            "web-strict",
            "2026-01-03T00:00:00Z",
            json!({"service": "web"}),
            "Strict",
        ),
    );
    assert_eq!(inbound_mode(&i, "web-a"), Some(MtlsMode::Strict));
    assert_eq!(inbound_mode(&i, "client"), Some(MtlsMode::Permissive));

    // Without the namespace Policy, the mesh default is back where no Policy selects.
    i.delete(Kind::Policy, &key("shop", "ns-wide"));
    assert_eq!(inbound_mode(&i, "client"), Some(MtlsMode::Strict));
    assert_eq!(inbound_mode(&i, "web-a"), Some(MtlsMode::Strict));
}

/// The feature each Policy's `spec.mtls.mode` requires on `pod`, by Policy name.
fn mode_features(i: &Index, pod: &str) -> Vec<(String, String)> {
    i.view(&key("shop", pod))
        .unwrap()
        .resources
        .iter()
        .filter(|r| r.kind == "Policy")
        .flat_map(|r| {
            r.requires
                .iter()
                .filter(|q| q.field == "spec.mtls.mode")
                .map(|q| (r.name.clone(), q.feature.clone()))
        })
        .collect()
}

#[test]
fn an_overridden_mode_is_not_claimed_as_enforced_on_the_pods_where_it_is_overridden() {
    let mut i = shop();
    apply(
        &mut i,
        policy_with_mode(
            "ns-wide",
            "2026-01-01T00:00:00Z",
            json!({"selector": {}}),
            "Permissive",
        ),
    );
    apply(
        &mut i,
        policy_with_mode(
            "web-strict",
            "2026-01-02T00:00:00Z",
            json!({"selector": {"matchLabels": {"app": "web"}}}),
            "Strict",
        ),
    );
    let mtls = weft_api::push::feature::POLICY_MTLS.to_owned();
    let overridden = requires::OVERRIDDEN.to_owned();
    // On web-a the workload Policy decides: the namespace's mode is not applied there.
    assert_eq!(
        mode_features(&i, "web-a"),
        [
            ("ns-wide".to_owned(), overridden.clone()),
            ("web-strict".to_owned(), mtls.clone())
        ]
    );
    // On the client the namespace's mode is the one applied.
    assert_eq!(
        mode_features(&i, "client"),
        [("ns-wide".to_owned(), mtls.clone())]
    );

    // Of two workload Policies, the laxer mode is overridden by the stricter.
    apply(
        &mut i,
        policy_with_mode(
            "web-lax",
            "2026-01-03T00:00:00Z",
            json!({"service": "web"}),
            "Permissive",
        ),
    );
    assert_eq!(
        mode_features(&i, "web-a"),
        [
            ("ns-wide".to_owned(), overridden.clone()),
            ("web-lax".to_owned(), overridden),
            ("web-strict".to_owned(), mtls),
        ]
    );
}

#[test]
fn a_disabled_mesh_default_originates_no_mtls_until_a_namespace_policy_asks_for_it() {
    let identity = |i: &Index| {
        i.view(&key("shop", "client"))
            .unwrap()
            .services
            .get("web.shop.80")
            .unwrap()
            .endpoints[0]
            .identity
            .clone()
    };
    let mut i = shop_with(Index::new("cluster.local").with_mesh_mtls(MtlsMode::Disabled));
    assert_eq!(identity(&i), None);
    assert_eq!(inbound_mode(&i, "web-a"), Some(MtlsMode::Disabled));
    apply(
        &mut i,
        policy_with_mode(
            "ns-wide",
            "2026-01-01T00:00:00Z",
            json!({"selector": {}}),
            "Permissive",
        ),
    );
    assert_eq!(
        identity(&i).as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/web-sa")
    );
}

#[test]
fn only_an_empty_selector_is_namespace_wide() {
    let spec = |target: serde_json::Value| -> weft_crds::PolicySpec {
        serde_json::from_value(json!({"target": target})).unwrap()
    };
    assert!(compile::namespace_wide(&spec(json!({"selector": {}}))));
    assert!(compile::namespace_wide(&spec(
        json!({"selector": {"matchLabels": {}, "matchExpressions": []}})
    )));
    assert!(!compile::namespace_wide(&spec(
        json!({"selector": {"matchLabels": {"app": "web"}}})
    )));
    assert!(!compile::namespace_wide(&spec(json!({"selector": {
        "matchExpressions": [{"key": "app", "operator": "Exists"}]}}))));
    assert!(!compile::namespace_wide(&spec(json!({"service": "web"}))));
    // Of two namespace-wide Policies the strictest wins; a workload one beats both.
    let (strict, lax) = (
        serde_json::from_value::<weft_crds::PolicySpec>(
            json!({"target": {"selector": {}}, "mtls": {"mode": "Strict"}}),
        )
        .unwrap(),
        serde_json::from_value::<weft_crds::PolicySpec>(
            json!({"target": {"selector": {}}, "mtls": {"mode": "Permissive"}}),
        )
        .unwrap(),
    );
    assert_eq!(
        compile::mtls(MtlsMode::Disabled, [&lax, &strict]),
        MtlsMode::Strict
    );
    let workload = serde_json::from_value::<weft_crds::PolicySpec>(
        json!({"target": {"service": "web"}, "mtls": {"mode": "Disabled"}}),
    )
    .unwrap();
    assert_eq!(
        compile::mtls(MtlsMode::Strict, [&strict, &workload]),
        MtlsMode::Disabled
    );
    assert_eq!(compile::mtls(MtlsMode::Strict, []), MtlsMode::Strict);
}

/// The config a proxy of `pod` would validate, or the proxy's reasons to reject it.
fn proxy_accepts(i: &Index, pod: &ObjectKey) -> Result<(), String> {
    proxy_config(i, pod).map(|_| ())
}

/// The config a proxy of `pod` would run, or its reasons to reject it.
fn proxy_config(i: &Index, pod: &ObjectKey) -> Result<weft_proxy::config::Config, String> {
    let view = i.view(pod).unwrap();
    let raw = weft_api::proxy_config::ProxyConfig {
        api_version: weft_api::proxy_config::PROXY_CONFIG_API_VERSION.into(),
        kind: weft_api::proxy_config::PROXY_CONFIG_KIND.into(),
        version: Some(view.version.to_string()),
        detect_timeout: None,
        connect_timeout: None,
        opaque_ports: None,
        services: view.services.values().map(|s| (**s).clone()).collect(),
        inbound: view.inbound.clone(),
    };
    weft_proxy::config::Config::validate(&raw).map_err(|e| e.to_string())
}

#[test]
fn a_cluster_ip_claimed_twice_stays_with_one_service_so_the_proxy_accepts_the_config() {
    // Found by the property test below: two Services with one cluster IP (stale state)
    // made every proxy reject its whole config.
    let mut i = shop();
    apply(&mut i, svc("shop", "web-old", "198.19.0.10"));
    let client = key("shop", "client");
    assert_eq!(proxy_accepts(&i, &client), Ok(()));
    let view = i.view(&client).unwrap();
    assert_eq!(
        view.services.get("web.shop.80").unwrap().addresses,
        vec!["198.19.0.10:80"]
    );
    assert!(
        view.services
            .get("web-old.shop.80")
            .unwrap()
            .addresses
            .is_empty()
    );
    // Across namespaces: the first namespace by name keeps it, in every view.
    apply(&mut i, svc("other", "db", "198.19.0.10"));
    assert_eq!(
        proxy_accepts(&i, &client),
        Ok(()),
        "shop alone sees no conflict"
    );
    let ns: Namespace = serde_json::from_value(
        json!({"metadata": {"name": "shop", "annotations": {"weft.dev/visible-namespaces": "other"}}}),
    )
    .unwrap();
    let (k, o) = model::namespace(&ns);
    i.apply(k, o);
    assert_eq!(proxy_accepts(&i, &client), Ok(()));
    let view = i.view(&client).unwrap();
    assert_eq!(
        view.services.get("db.other.80").unwrap().addresses,
        vec!["198.19.0.10:80"]
    );
    assert!(
        view.services
            .get("web.shop.80")
            .unwrap()
            .addresses
            .is_empty()
    );
    // Once the stale Service goes, the survivor gets its address back.
    i.delete(Kind::Service, &key("other", "db"));
    let view = i.view(&client).unwrap();
    assert_eq!(
        view.services.get("web.shop.80").unwrap().addresses,
        vec!["198.19.0.10:80"]
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// The namespaces objects land in; the client pod in `shop` sees both.
    const NAMESPACES: [&str; 2] = ["shop", "other"];

    /// One object, as the watches would deliver it, in `NAMESPACES[ns]`.
    #[derive(Clone, Debug)]
    enum Input {
        /// Service `s<name>` with a cluster IP from a small pool (so two Services may claim
        /// the same one, as stale state can), or headless.
        Service { ns: usize, name: u8, ip: Option<u8> },
        /// An EndpointSlice of Service `s<service>`: (host, ready, terminating) endpoints
        /// from a pool shared by every Service.
        Slice {
            ns: usize,
            name: u8,
            service: u8,
            eps: Vec<(u8, bool, bool)>,
        },
        /// A Route on Service `s<service>` with (backend, port, weight) backends; backend
        /// names may name no Service.
        Route {
            ns: usize,
            name: u8,
            created: u8,
            service: u8,
            backends: Vec<(u8, Option<u16>, u32)>,
        },
        /// Deletes whatever the previous input created.
        DeletePrevious,
    }

    fn input() -> impl Strategy<Value = Input> {
        let ns = prop_oneof![3 => Just(0usize), 1 => Just(1usize)];
        prop_oneof![
            4 => (ns.clone(), 0u8..5, proptest::option::of(0u8..4)).prop_map(|(ns, name, ip)| Input::Service { ns, name, ip }),
            4 => (ns.clone(), 0u8..6, 0u8..5, proptest::collection::vec((0u8..12, any::<bool>(), any::<bool>()), 0..6))
                .prop_map(|(ns, name, service, eps)| Input::Slice { ns, name, service, eps }),
            4 => (
                ns,
                0u8..3,
                0u8..3,
                0u8..6,
                proptest::collection::vec(
                    (
                        0u8..6,
                        proptest::option::of(prop_oneof![Just(80u16), Just(81)]),
                        prop_oneof![0u32..4, 1u32..=1_000_000, Just(1_000_000)],
                    ),
                    1..5,
                ),
            )
                .prop_map(|(ns, name, created, service, backends)| Input::Route { ns, name, created, service, backends }),
            1 => Just(Input::DeletePrevious),
        ]
    }

    fn object(input: &Input) -> Option<(ObjectKey, Object)> {
        Some(match input {
            Input::Service { ns, name, ip } => {
                let ip = ip.map_or("None".to_owned(), |h| format!("198.19.1.{h}"));
                svc(NAMESPACES[*ns], &format!("s{name}"), &ip)
            }
            Input::Slice {
                ns,
                name,
                service,
                eps,
            } => {
                let ips: Vec<String> = eps
                    .iter()
                    .map(|(h, _, _)| format!("198.18.109.{h}"))
                    .collect();
                let eps: Vec<(&str, bool, bool, Option<&str>)> = eps
                    .iter()
                    .zip(&ips)
                    .map(|((_, ready, term), ip)| (ip.as_str(), *ready, *term, None))
                    .collect();
                slice(
                    NAMESPACES[*ns],
                    &format!("s{service}-{name}"),
                    &format!("s{service}"),
                    &eps,
                )
            }
            Input::Route {
                ns,
                name,
                created,
                service,
                backends,
            } => {
                let backends: Vec<serde_json::Value> = backends
                    .iter()
                    .map(|(b, port, weight)| {
                        let mut v = json!({"name": format!("s{b}"), "weight": weight});
                        if let Some(p) = port {
                            v["port"] = json!(p);
                        }
                        v
                    })
                    .collect();
                route(
                    NAMESPACES[*ns],
                    &format!("r{name}"),
                    &format!("2026-01-01T00:00:0{created}Z"),
                    &format!("s{service}"),
                    json!(backends),
                )
            }
            Input::DeletePrevious => return None,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_set_of_services_slices_and_routes_compiles_to_a_config_the_proxy_accepts(
            inputs in proptest::collection::vec(input(), 0..16),
        ) {
            let mut i = shop();
            let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "shop", "annotations": {"weft.dev/visible-namespaces": "other"}}})).unwrap();
            let (k, o) = model::namespace(&ns);
            i.apply(k, o);
            let mut previous: Option<(ObjectKey, Kind)> = None;
            for input in &inputs {
                match object(input) {
                    Some((k, o)) => {
                        previous = Some((k.clone(), o.kind()));
                        apply(&mut i, (k, o));
                    }
                    None => {
                        if let Some((k, kind)) = previous.take() {
                            i.delete(kind, &k);
                        }
                    }
                }
            }
            if let Err(e) = proxy_accepts(&i, &key("shop", "client")) {
                return Err(TestCaseError::fail(e));
            }
        }
    }
}

mod selection;
mod traffic;

/// A meshed pod whose init container was told to skip `skip` inbound, as injection writes it.
fn pod_skipping(
    ns: &str,
    name: &str,
    sa: &str,
    labels: serde_json::Value,
    skip: &str,
) -> (ObjectKey, Object) {
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"serviceAccountName": sa, "containers": [],
                 "initContainers": [
                     {"name": "weft-init", "args": [
                         "init", "--inbound-port=15006", format!("--skip-inbound-ports={skip}")]},
                     {"name": "weft-proxy", "restartPolicy": "Always",
                      "env": [{"name": "WEFT_ADMIN_ADDR", "value": "[::]:15021"}]}]}
    }))
    .unwrap();
    model::pod(&p)
}

#[test]
fn no_client_originates_mtls_to_a_port_its_pod_leaves_to_the_application() {
    // web-a's redirect skips 8080, the port web's endpoints listen on: its application
    // answers there itself, so a client's TLS would reach it as garbage.
    let mut i = shop();
    let web_identity = |i: &Index| {
        let view = i.view(&key("shop", "client")).unwrap();
        let web = view.services.get("web.shop.80").unwrap();
        assert_eq!(web.endpoints[0].address, "198.18.100.1:8080");
        web.endpoints[0].identity.clone()
    };
    apply(
        &mut i,
        pod_skipping(
            "shop",
            "web-a",
            "web-sa",
            json!({"app": "web"}),
            "15021,8000-8080",
        ),
    );
    assert_eq!(web_identity(&i), None, "8080 is skipped: plain text");
    apply(
        &mut i,
        pod_skipping(
            "shop",
            "web-a",
            "web-sa",
            json!({"app": "web"}),
            "15021,9000",
        ),
    );
    assert_eq!(
        web_identity(&i).as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/web-sa"),
        "8080 reaches the proxy: mutual TLS"
    );
    // The other forms `weft-proxy init` reads: `--flag value`, and its variable.
    for init in [
        json!({"name": "weft-init", "args": ["init", "--skip-inbound-ports", "8080"]}),
        json!({"name": "weft-init", "args": ["init"],
               "env": [{"name": "WEFT_INIT_SKIP_INBOUND_PORTS", "value": "8080"}]}),
    ] {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-a", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"serviceAccountName": "web-sa", "containers": [], "initContainers": [init]}
        }))
        .unwrap();
        apply(&mut i, model::pod(&p));
        assert_eq!(web_identity(&i), None, "{:?}", p.spec);
    }
    // Unreadable flags leave mutual TLS on (the proxy's rules could not have been
    // installed from them either).
    apply(
        &mut i,
        pod_skipping("shop", "web-a", "web-sa", json!({"app": "web"}), "8080-80"),
    );
    assert!(web_identity(&i).is_some());
}

#[test]
fn meshed_pods_behind_a_headless_service_are_known_by_address_for_mtls() {
    // A StatefulSet's pods behind a headless Service alone: clients dial pod addresses,
    // which no cluster IP's endpoints list.
    let mut i = shop();
    apply(&mut i, svc("shop", "db", "None"));
    apply(
        &mut i,
        slice(
            "shop",
            "db-1",
            "db",
            &[
                ("198.18.101.1", true, false, Some("db-0")),
                ("198.18.101.2", true, false, None),
                ("198.18.101.3", false, false, Some("db-1")),
                ("198.18.101.4", false, true, Some("db-2")),
            ],
        ),
    );
    let client = key("shop", "client");
    assert!(
        i.view(&client)
            .unwrap()
            .services
            .get("db.shop.80")
            .is_none(),
        "no meshed endpoint yet: nothing to send"
    );
    for p in ["db-0", "db-1", "db-2"] {
        apply(&mut i, pod("shop", p, "db-sa", json!({"app": "db"})));
    }
    let view = i.view(&client).unwrap();
    let db = view.services.get("db.shop.80").unwrap();
    assert!(db.addresses.is_empty(), "{db:?}");
    assert!(db.route.is_none() && db.breaker.is_none());
    let listed: Vec<_> = db
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.identity.as_deref()))
        .collect();
    let db_sa = Some("spiffe://cluster.local/ns/shop/sa/db-sa");
    assert_eq!(
        listed,
        [
            ("198.18.101.1:8080", db_sa),
            ("198.18.101.3:8080", db_sa),
            ("198.18.101.4:8080", db_sa)
        ],
        "only meshed endpoints, ready or not: peers dial them while they bootstrap or drain"
    );
    let cfg = proxy_config(&i, &client).unwrap();
    assert!(
        cfg.meshed_endpoint("198.18.101.1:8080".parse().unwrap())
            .is_some()
    );
    assert!(
        cfg.meshed_endpoint("198.18.101.2:8080".parse().unwrap())
            .is_none()
    );
    assert!(
        cfg.service_for_addr("198.18.101.1:8080".parse().unwrap())
            .is_none()
    );

    for p in ["db-0", "db-1", "db-2"] {
        i.delete(Kind::Pod, &key("shop", p));
    }
    assert!(
        i.view(&client)
            .unwrap()
            .services
            .get("db.shop.80")
            .is_none()
    );
}

#[test]
fn a_policys_status_names_the_ports_its_pods_leave_to_their_application() {
    let mut i = shop();
    apply(
        &mut i,
        weft(
            Kind::Policy,
            "shop",
            "strict-web",
            1,
            "2026-01-01T00:00:00Z",
            json!({"target": {"selector": {"matchLabels": {"app": "web"}}},
                   "mtls": {"mode": "Strict"}}),
        ),
    );
    let message = |i: &Index| {
        let state = i
            .resource_state(Kind::Policy, &key("shop", "strict-web"))
            .unwrap();
        assert!(state.accepted.ok, "{state:?}");
        state.accepted.message
    };
    // The admin port alone is the proxy's, skipped on every pod: nothing to say.
    apply(
        &mut i,
        pod_skipping("shop", "web-a", "web-sa", json!({"app": "web"}), "15021"),
    );
    assert!(!message(&i).contains("not enforced"), "{}", message(&i));
    apply(
        &mut i,
        pod_skipping(
            "shop",
            "web-a",
            "web-sa",
            json!({"app": "web"}),
            "15021,8080,9000-9010",
        ),
    );
    let m = message(&i);
    assert!(
        m.contains("not enforced on the ports") && m.ends_with("sees: 8080, 9000-9010"),
        "{m}"
    );
    // A pod the Policy does not select does not count.
    apply(
        &mut i,
        pod_skipping(
            "shop",
            "client",
            "client-sa",
            json!({"app": "client"}),
            "15021,7000",
        ),
    );
    assert!(!message(&i).contains("7000"), "{}", message(&i));
}

/// A meshed pod at `ips`, declaring `ports` in an application container (and 15090 in the
/// proxy's), whose init container skips `skip` inbound (with the admin port 15021, as
/// injection writes it) and whose proxy takes 7078 as opaque, in `phase`.
fn pod_at(name: &str, ips: &[&str], ports: &[u16], skip: &str, phase: &str) -> (ObjectKey, Object) {
    let ports: Vec<_> = ports.iter().map(|p| json!({"containerPort": p})).collect();
    let ips: Vec<_> = ips.iter().map(|ip| json!({"ip": ip})).collect();
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": name}},
        "spec": {"serviceAccountName": format!("{name}-sa"),
                 "containers": [
                     {"name": "app", "ports": ports},
                     {"name": "udp", "ports": [{"containerPort": 5353, "protocol": "UDP"}]}],
                 "initContainers": [
                     {"name": "weft-init", "args": ["init", format!("--skip-inbound-ports={skip}")]},
                     {"name": "weft-proxy", "restartPolicy": "Always",
                      "ports": [{"containerPort": 15090}],
                      "env": [{"name": "WEFT_ADMIN_ADDR", "value": "[::]:15021"},
                              {"name": "WEFT_OPAQUE_PORTS", "value": "7078"}]}]},
        "status": {"phase": phase, "podIPs": ips}
    }))
    .unwrap();
    model::pod(&p)
}

#[test]
fn meshed_pods_no_service_lists_are_known_by_address_at_the_ports_they_declare() {
    // A Job's workers, a Spark driver's executors: dialled straight at their addresses,
    // behind no Service, yet meshed and perhaps Strict.
    let mut i = shop();
    apply(
        &mut i,
        pod_at(
            "worker",
            &["198.18.2.1", "fd00::21"],
            &[7077, 7078, 15021, 9000],
            "15021,9000",
            "Running",
        ),
    );
    let client = key("shop", "client");
    let pods = |i: &Index| {
        let view = i.view(&client).unwrap();
        view.services.get("pods.shop").map(|c| {
            assert!(c.addresses.is_empty() && c.route.is_none(), "{c:?}");
            c.endpoints
                .iter()
                .map(|e| (e.address.clone(), e.identity.clone()))
                .collect::<Vec<_>>()
        })
    };
    let worker = Some("spiffe://cluster.local/ns/shop/sa/worker-sa".to_owned());
    assert_eq!(
        pods(&i).unwrap(),
        [
            ("198.18.2.1:7077".to_owned(), worker.clone()),
            ("[fd00::21]:7077".to_owned(), worker.clone()),
        ],
        "the declared TCP ports its proxy intercepts: not the skipped one, the admin port, \
         the proxy's own or a UDP one"
    );
    // A port its proxy takes as opaque is forwarded without detection by clients too.
    let view = i.view(&client).unwrap();
    let opaque = view.services.get("pods.shop.opaque").unwrap();
    assert_eq!(opaque.protocol, Protocol::Opaque);
    assert_eq!(
        opaque
            .endpoints
            .iter()
            .map(|e| e.address.as_str())
            .collect::<Vec<_>>(),
        ["198.18.2.1:7078", "[fd00::21]:7078"]
    );
    assert_eq!(
        view.services.get("pods.shop").unwrap().protocol,
        Protocol::Detect
    );
    let cfg = proxy_config(&i, &client).unwrap();
    assert!(
        cfg.meshed_endpoint("198.18.2.1:7077".parse().unwrap())
            .is_some()
    );
    assert!(
        cfg.meshed_endpoint("198.18.2.1:9000".parse().unwrap())
            .is_none()
    );

    // Once a Service lists the address, its config carries it and this one does not.
    apply(&mut i, svc("shop", "worker", "None"));
    let s: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "worker-1", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "worker"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 7077}],
        "endpoints": [{"addresses": ["198.18.2.1"], "conditions": {"ready": true},
                       "targetRef": {"kind": "Pod", "name": "worker", "namespace": "shop"}}],
    }))
    .unwrap();
    apply(&mut i, model::endpoint_slice(&s));
    assert_eq!(
        pods(&i).unwrap(),
        [("[fd00::21]:7077".to_owned(), worker.clone())]
    );
    i.delete(Kind::EndpointSlice, &key("shop", "worker-1"));

    // A Disabled pod is reached in plain text: nothing to list.
    apply(
        &mut i,
        weft(
            Kind::Policy,
            "shop",
            "off",
            1,
            "2026-01-01T00:00:00Z",
            json!({"target": {"selector": {"matchLabels": {"app": "worker"}}},
                   "mtls": {"mode": "Disabled"}}),
        ),
    );
    assert_eq!(pods(&i), None);
    i.delete(Kind::Policy, &key("shop", "off"));
    assert!(pods(&i).is_some());

    // A finished pod's address may be another's already.
    apply(
        &mut i,
        pod_at("worker", &["198.18.2.1"], &[7077], "15021", "Succeeded"),
    );
    assert_eq!(pods(&i), None);

    // Two pods claiming one address (one stale): which identity it has is not known.
    apply(
        &mut i,
        pod_at("worker", &["198.18.2.1"], &[7077], "15021", "Running"),
    );
    apply(
        &mut i,
        pod_at(
            "other",
            &["198.18.2.1", "198.18.2.2"],
            &[7077],
            "15021",
            "Running",
        ),
    );
    assert_eq!(
        pods(&i).unwrap(),
        [(
            "198.18.2.2:7077".to_owned(),
            Some("spiffe://cluster.local/ns/shop/sa/other-sa".to_owned())
        )]
    );
    // ... in any namespace: a pod of `cart` given 198.18.2.2 takes it out of `shop`'s
    // config, at every port, until it goes.
    let cart: Pod = serde_json::from_value(json!({
        "metadata": {"name": "stale", "namespace": "cart"},
        "spec": {"containers": [{"name": "app", "ports": [{"containerPort": 9999}]}]},
        "status": {"phase": "Running", "podIPs": [{"ip": "198.18.2.2"}]}
    }))
    .unwrap();
    let affected = i.apply(model::pod(&cart).0, model::pod(&cart).1);
    assert!(affected.namespaces.contains("shop"), "{affected:?}");
    assert_eq!(pods(&i), None);
    let affected = i.delete(Kind::Pod, &key("cart", "stale"));
    assert!(affected.namespaces.contains("shop"), "{affected:?}");
    assert_eq!(pods(&i).unwrap().len(), 1);
    i.delete(Kind::Pod, &key("shop", "worker"));
    assert_eq!(
        pods(&i).unwrap().len(),
        2,
        "the address is other's alone again"
    );
    i.delete(Kind::Pod, &key("shop", "other"));
    assert_eq!(pods(&i), None);

    // A port a Service declares opaque stays opaque while that Service does not list the
    // pod (not ready): not detected by turns with readiness.
    let s: Service = serde_json::from_value(json!({
        "metadata": {"name": "broker", "namespace": "shop"},
        "spec": {"clusterIP": "198.19.0.9", "clusterIPs": ["198.19.0.9"],
                 "ports": [{"name": "amqp", "port": 5672, "appProtocol": "tcp"}]}
    }))
    .unwrap();
    apply(&mut i, model::service(&s));
    let s: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "broker-1", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "broker"}},
        "addressType": "IPv4",
        "ports": [{"name": "amqp", "port": 7077}],
        "endpoints": [{"addresses": ["198.18.2.1"], "conditions": {"ready": false},
                       "targetRef": {"kind": "Pod", "name": "worker", "namespace": "shop"}}],
    }))
    .unwrap();
    apply(&mut i, model::endpoint_slice(&s));
    apply(
        &mut i,
        pod_at("worker", &["198.18.2.1"], &[7077], "15021", "Running"),
    );
    let view = i.view(&client).unwrap();
    assert!(view.services.get("pods.shop").is_none());
    let opaque = view.services.get("pods.shop.opaque").unwrap();
    assert_eq!(opaque.endpoints[0].address, "198.18.2.1:7077");
}

/// The objects of `kind` the index holds, as a re-list finding nothing changed gives them.
fn listed(i: &Index, kind: Kind) -> Vec<(ObjectKey, Object)> {
    match kind {
        Kind::Service => i
            .services
            .iter()
            .map(|(k, m)| (k.clone(), Object::Service(m.clone())))
            .collect(),
        Kind::Pod => i
            .pods
            .iter()
            .map(|(k, m)| (k.clone(), Object::Pod(m.clone())))
            .collect(),
        Kind::Policy => i
            .policies
            .iter()
            .map(|(k, m)| (k.clone(), Object::Policy(m.clone())))
            .collect(),
        _ => unreachable!("only kinds that feed the Policy part"),
    }
}

/// A re-list of pods, Services or Policies that finds every object unchanged still
/// rebuilds the namespaces it went over from their objects: what a change cut short by a
/// panic left of a namespace's derived state (here its outbound services and Routes
/// lost, a pod's kept mTLS mode wrong) is computed again, so that the views rebuilt from
/// the index are right, not only equal to a stale index.
#[test]
fn a_relist_rebuilds_the_derived_state_of_its_namespaces() {
    for kind in [Kind::Pod, Kind::Service, Kind::Policy] {
        let mut i = shop();
        apply(
            &mut i,
            route(
                "shop",
                "web",
                "2026-01-01T00:00:00Z",
                "web",
                json!([{"name": "web"}]),
            ),
        );
        apply(
            &mut i,
            policy_with_mode(
                "strict",
                "2026-01-01T00:00:00Z",
                json!({"selector": {"matchLabels": {"app": "web"}}}),
                "Strict",
            ),
        );
        let client = key("shop", "client");
        let want = i.view(&client).unwrap();
        assert!(want.services.contains_key("web.shop.80"));
        assert!(want.resources.iter().any(|r| r.kind == "Route"));
        // As a rebuild cut short might leave them.
        i.outbound.remove("shop");
        i.ns_resources.remove("shop");
        lock(&mut i.policy_modes).insert(key("shop", "web-a"), MtlsMode::Disabled);
        let objects = listed(&i, kind);
        let affected = i.replace(kind, objects);
        assert!(
            affected.namespaces.contains("shop"),
            "{kind:?}: {affected:?}"
        );
        let view = i.view(&client).unwrap();
        assert!(
            view.same_content(&want),
            "{kind:?}: {view:?} is not {want:?}"
        );
    }
}

/// A re-list cut short by a panic (the index lock recovers from poisoning) leaves no
/// later change deferred: the next one rebuilds its namespace, and those the re-list
/// left unrebuilt, and takes a new version, without which push sessions send nothing.
#[test]
fn a_relist_cut_short_leaves_no_later_change_deferred() {
    let mut i = shop();
    let client = key("shop", "client");
    i.panic_mid_replace = true;
    let services = vec![
        svc("shop", "web", "198.19.0.10"),
        svc("cart", "api", "198.19.0.11"),
    ];
    let cut_short = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        i.replace(Kind::Service, services)
    }));
    assert!(cut_short.is_err());
    let version = i.version();
    let before = i.view(&client).unwrap();
    let affected = apply(
        &mut i,
        slice(
            "shop",
            "web-1",
            "web",
            &[("198.18.100.1", true, false, Some("web-a"))],
        ),
    );
    assert!(affected.namespaces.contains("shop"), "{affected:?}");
    assert!(affected.namespaces.contains("cart"), "{affected:?}");
    assert!(i.version() > version);
    let view = i.view(&client).unwrap();
    assert!(!view.same_content(&before));
    assert_eq!(view.services.get("web.shop.80").unwrap().endpoints.len(), 1);
    assert!(
        i.outbound
            .get("cart")
            .is_some_and(|m| m.contains_key("api.cart.80"))
    );
}
