//! Which Policies select which pods, as the index keeps it from change to change
//! (`selection.rs`), and which it refuses for `TooManyPolicies`: always what evaluating
//! every Policy against every pod gives, after single changes and re-lists alike, the
//! same views and statuses as the same objects listed into a fresh index, and every pod
//! whose view a change alters reported as affected by it.

use proptest::prelude::*;

use super::*;
use crate::index::shared::SharedIndex;

/// A meshed pod with labels `app`/`tier`, an address, and a declared port 8080 (so that
/// its identity, which its Policies' mTLS mode decides, is in `pods.<ns>`).
fn labelled_pod(ns: &str, name: &str, app: &str, tier: &str, ip: &str) -> (ObjectKey, Object) {
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app, "tier": tier}},
        "spec": {"serviceAccountName": "sa",
                 "containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIPs": [{"ip": ip}]},
    }))
    .unwrap();
    model::pod(&p)
}

/// Service `name` selecting `app` (none: no selector).
fn selecting_svc(ns: &str, name: &str, ip: &str, app: Option<&str>) -> (ObjectKey, Object) {
    let mut spec =
        json!({"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80}]});
    if let Some(app) = app {
        spec["selector"] = json!({"app": app});
    }
    let s: Service =
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}, "spec": spec}))
            .unwrap();
    model::service(&s)
}

/// The valid Policies of `pod`'s namespace that select it, by evaluating each (refused or
/// not).
fn naive_selecting(i: &Index, pod: &ObjectKey) -> Vec<ObjectKey> {
    let Some(model) = i.pods.get(pod) else {
        return Vec::new();
    };
    in_ns(&i.policies, &pod.namespace)
        .filter(|(_, (_, spec))| matches!(spec, Parsed::Valid(p) if i.selects(p, pod, model)))
        .map(|(k, _)| k.clone())
        .collect()
}

/// The Policies selecting `pod` that are not `refused`.
fn naive_policies_for(
    i: &Index,
    pod: &ObjectKey,
    refused: &BTreeMap<String, BTreeMap<ObjectKey, ObjectKey>>,
) -> Vec<ObjectKey> {
    let refused = refused.get(&pod.namespace);
    naive_selecting(i, pod)
        .into_iter()
        .filter(|k| !refused.is_some_and(|r| r.contains_key(k)))
        .collect()
}

/// The Policies refused for `TooManyPolicies`, per namespace, each with the first pod (by
/// key) that already had `max`: oldest first, a Policy that sends authorization counts
/// on every pod it selects unless one of them is full. Evaluates each Policy against each
/// pod, without the index's selection or refusal set.
fn naive_refused(i: &Index, max: usize) -> BTreeMap<String, BTreeMap<ObjectKey, ObjectKey>> {
    let mut out = BTreeMap::new();
    for ns in NAMESPACES {
        let mut sending: Vec<(&ObjectKey, &model::ResourceMeta, &weft_crds::PolicySpec)> =
            in_ns(&i.policies, ns)
                .filter_map(|(k, (meta, spec))| match spec {
                    Parsed::Valid(p) if sends_authorization(p) => Some((k, meta, p)),
                    _ => None,
                })
                .collect();
        sending.sort_by(|a, b| conflict::age_order((a.0, a.1), (b.0, b.1)));
        let mut counts: BTreeMap<&ObjectKey, usize> = BTreeMap::new();
        let mut refused = BTreeMap::new();
        for (key, _, spec) in sending {
            let selected: Vec<&ObjectKey> = in_ns(&i.pods, ns)
                .filter(|(pod, model)| i.selects(spec, pod, model))
                .map(|(pod, _)| pod)
                .collect();
            match selected.iter().find(|p| counts.get(*p) >= Some(&max)) {
                Some(full) => {
                    refused.insert(key.clone(), (*full).clone());
                }
                None => {
                    for pod in selected {
                        *counts.entry(pod).or_default() += 1;
                    }
                }
            }
        }
        if !refused.is_empty() {
            out.insert(ns.to_owned(), refused);
        }
    }
    out
}

/// Checks what the index keeps against what evaluating every Policy gives: the refused
/// set, each pod's Policies both ways, and no key of a pod gone or a Policy gone or
/// invalid left in the selection; and that clients expect mutual TLS of each pod exactly
/// when its proxy does not run `Disabled` (its address in `pods.<ns>` has its identity,
/// else is absent), where no EndpointSlice lists its address (a slice's endpoints here
/// may name another pod than the one at their address).
fn check_selection(
    i: &Index,
    pods: &BTreeSet<ObjectKey>,
    max: usize,
    step: &Step,
) -> Result<(), TestCaseError> {
    let refused = naive_refused(i, max);
    prop_assert_eq!(&i.refused_policies, &refused, "after {:?}", step);
    for pod in pods {
        prop_assert_eq!(
            i.policies_for(pod),
            naive_policies_for(i, pod, &refused),
            "{} after {:?}",
            pod,
            step
        );
    }
    let (selected, selecting) = i.selection.keys();
    for pod in selected {
        prop_assert!(
            i.pods.contains_key(pod),
            "gone {} kept, after {:?}",
            pod,
            step
        );
    }
    for policy in selecting {
        prop_assert!(
            matches!(i.policies.get(policy), Some((_, Parsed::Valid(_)))),
            "gone or invalid {} kept, after {:?}",
            policy,
            step
        );
        let naive: BTreeSet<&ObjectKey> = i
            .pods
            .keys()
            .filter(|p| naive_selecting(i, p).contains(policy))
            .collect();
        prop_assert_eq!(
            i.selection.pods(policy).collect::<BTreeSet<_>>(),
            naive,
            "{} after {:?}",
            policy,
            step
        );
    }
    for (pod, model) in &i.pods {
        let ip = model.ips[0];
        if i.pod_addresses.get(&ip).is_some_and(|h| h.len() > 1) {
            continue;
        }
        let view = i.view(pod).unwrap();
        let address = format!("{ip}:8080");
        let pods_config = format!("pods.{}", pod.namespace);
        if view.services.iter().any(|(name, c)| {
            *name != pods_config && c.endpoints.iter().any(|e| e.address == address)
        }) {
            continue;
        }
        let mode = view
            .inbound
            .as_ref()
            .and_then(|b| b.mtls)
            .unwrap_or(MtlsMode::Permissive);
        let expected = view.services.get(&pods_config).is_some_and(|c| {
            c.endpoints
                .iter()
                .any(|e| e.address == address && e.identity.is_some())
        });
        prop_assert_eq!(
            expected,
            mode != MtlsMode::Disabled,
            "{} runs {:?}, after {:?}",
            pod,
            mode,
            step
        );
    }
    Ok(())
}

#[test]
fn a_policy_change_touches_the_pods_it_selected_or_selects() {
    let mut i = Index::new("cluster.local");
    for (name, app, ip) in [
        ("web-a", "web", "198.18.100.1"),
        ("client", "client", "198.18.100.2"),
    ] {
        apply(&mut i, labelled_pod("shop", name, app, "t0", ip));
    }
    let policy = |app: &str, gen_: i64| {
        weft(
            Kind::Policy,
            "shop",
            "p",
            gen_,
            "2026-01-01T00:00:00Z",
            json!({"target": {"selector": {"matchLabels": {"app": app}}}, "defaultAction": "Allow"}),
        )
    };
    let a = apply(&mut i, policy("web", 1));
    assert_eq!(a.pods, BTreeSet::from([key("shop", "web-a")]));
    // Strict (the default) keeps every identity: no config of the namespace changed.
    assert!(a.namespaces.is_empty(), "{a:?}");
    assert_eq!(
        i.policies_for(&key("shop", "web-a")),
        vec![key("shop", "p")]
    );
    // Moved to the client: both views change, and both are told.
    let a = apply(&mut i, policy("client", 2));
    assert_eq!(
        a.pods,
        BTreeSet::from([key("shop", "client"), key("shop", "web-a")])
    );
    assert!(i.policies_for(&key("shop", "web-a")).is_empty());
    assert_eq!(
        i.policies_for(&key("shop", "client")),
        vec![key("shop", "p")]
    );
    // Disabled strips the client's identity from the namespace's configs: every
    // subscriber that sees the namespace is told.
    let a = apply(
        &mut i,
        weft(
            Kind::Policy,
            "shop",
            "p",
            3,
            "2026-01-01T00:00:00Z",
            json!({"target": {"selector": {"matchLabels": {"app": "client"}}}, "mtls": {"mode": "Disabled"}, "defaultAction": "Allow"}),
        ),
    );
    assert_eq!(a.namespaces, BTreeSet::from(["shop".to_owned()]));
    let a = i.delete(Kind::Policy, &key("shop", "p"));
    assert!(a.pods.contains(&key("shop", "client")));
    assert!(i.policies_for(&key("shop", "client")).is_empty());
}

#[test]
fn a_service_and_a_pod_change_reselect_the_policies_they_bear_on() {
    let mut i = Index::new("cluster.local");
    apply(
        &mut i,
        labelled_pod("shop", "web-a", "web", "t0", "198.18.100.1"),
    );
    apply(
        &mut i,
        labelled_pod("shop", "client", "client", "t0", "198.18.100.2"),
    );
    apply(
        &mut i,
        selecting_svc("shop", "web", "198.19.0.10", Some("web")),
    );
    apply(
        &mut i,
        weft(
            Kind::Policy,
            "shop",
            "by-svc",
            1,
            "2026-01-01T00:00:00Z",
            json!({"target": {"service": "web"}, "defaultAction": "Allow"}),
        ),
    );
    let by_svc = vec![key("shop", "by-svc")];
    assert_eq!(i.policies_for(&key("shop", "web-a")), by_svc);
    // The Service now selects the client's pods instead.
    apply(
        &mut i,
        selecting_svc("shop", "web", "198.19.0.10", Some("client")),
    );
    assert!(i.policies_for(&key("shop", "web-a")).is_empty());
    assert_eq!(i.policies_for(&key("shop", "client")), by_svc);
    // The pod's labels change, and so does what selects it.
    apply(
        &mut i,
        labelled_pod("shop", "web-a", "client", "t0", "198.18.100.1"),
    );
    assert_eq!(i.policies_for(&key("shop", "web-a")), by_svc);
    // Without the Service, the Policy selects nothing.
    i.delete(Kind::Service, &key("shop", "web"));
    assert!(i.policies_for(&key("shop", "web-a")).is_empty());
    assert!(i.policies_for(&key("shop", "client")).is_empty());
    // A pod gone is selected by nothing, and one back is evaluated again.
    apply(
        &mut i,
        selecting_svc("shop", "web", "198.19.0.10", Some("client")),
    );
    i.delete(Kind::Pod, &key("shop", "client"));
    assert!(i.policies_for(&key("shop", "client")).is_empty());
    assert_eq!(i.selection.pods(&key("shop", "by-svc")).count(), 1);
    apply(
        &mut i,
        labelled_pod("shop", "client", "client", "t0", "198.18.100.2"),
    );
    assert_eq!(i.policies_for(&key("shop", "client")), by_svc);
}

/// Web-0's identity as `client`'s view lists it in Service `web`'s config (`pods.shop`
/// lists an address only where no Service lists it with an identity).
fn web_0_identity(i: &Index) -> Option<String> {
    let view = i.view(&key("shop", "client")).unwrap();
    let web = view.services.get("web.shop.80").unwrap();
    assert_eq!(web.endpoints.len(), 1, "{web:?}");
    web.endpoints[0].identity.clone()
}

#[test]
fn a_policy_refused_by_the_change_that_applies_it_counts_in_no_identity() {
    let max = weft_proxy::authz::MAX_POLICIES;
    let mut i = Index::new("cluster.local");
    apply(
        &mut i,
        labelled_pod("shop", "web-0", "web", "t0", "198.18.100.1"),
    );
    apply(
        &mut i,
        labelled_pod("shop", "client", "client", "t0", "198.18.100.2"),
    );
    apply(
        &mut i,
        selecting_svc("shop", "web", "198.19.0.10", Some("web")),
    );
    apply(
        &mut i,
        slice(
            "shop",
            "web-1",
            "web",
            &[("198.18.100.1", true, false, Some("web-0"))],
        ),
    );
    let created = |n: usize| format!("2026-01-01T{:02}:{:02}:00Z", n / 60, n % 60);
    for n in 0..max {
        apply(
            &mut i,
            weft(
                Kind::Policy,
                "shop",
                &format!("wide{n:03}"),
                1,
                &created(n),
                json!({"target": {"selector": {}}, "mtls": {"mode": "Strict"},
                       "defaultAction": "Deny"}),
            ),
        );
    }
    let strict = Some("spiffe://cluster.local/ns/shop/sa/sa".to_owned());
    assert_eq!(web_0_identity(&i), strict);
    // Newer, so refused: web-0 already has as many authorization policies as a proxy
    // takes. Its Disabled mode must not strip the identity web-0's proxy still asks for.
    let plain = weft(
        Kind::Policy,
        "shop",
        "plain",
        1,
        &created(max),
        json!({"target": {"selector": {"matchLabels": {"app": "web"}}},
               "mtls": {"mode": "Disabled"}, "defaultAction": "Allow",
               "rules": [{"action": "Deny", "from": [{"namespaces": ["other"]}]}]}),
    );
    apply(&mut i, plain.clone());
    let state = i
        .resource_state(Kind::Policy, &key("shop", "plain"))
        .unwrap();
    assert_eq!(state.accepted.reason, reasons::TOO_MANY_POLICIES);
    let web_0 = i.view(&key("shop", "web-0")).unwrap();
    assert_eq!(web_0.inbound.and_then(|b| b.mtls), Some(MtlsMode::Strict));
    assert_eq!(web_0_identity(&i), strict);
    // An older one goes and it is accepted: web-0 runs Disabled, so no client may expect
    // its identity any more.
    i.delete(Kind::Policy, &key("shop", "wide000"));
    let state = i
        .resource_state(Kind::Policy, &key("shop", "plain"))
        .unwrap();
    assert!(state.accepted.ok, "{state:?}");
    let web_0 = i.view(&key("shop", "web-0")).unwrap();
    assert_eq!(web_0.inbound.and_then(|b| b.mtls), Some(MtlsMode::Disabled));
    assert_eq!(web_0_identity(&i), None);
    // And back, by a Policy as old as the first.
    apply(
        &mut i,
        weft(
            Kind::Policy,
            "shop",
            "wide000",
            1,
            &created(0),
            json!({"target": {"selector": {}}, "mtls": {"mode": "Strict"},
                   "defaultAction": "Deny"}),
        ),
    );
    assert_eq!(web_0_identity(&i), strict);
}

/// Policy `name` of `shop` with `target`, at `generation`.
fn targeting(name: &str, generation: i64, target: serde_json::Value) -> (ObjectKey, Object) {
    weft(
        Kind::Policy,
        "shop",
        name,
        generation,
        "2026-01-01T00:00:00Z",
        json!({"target": target, "defaultAction": "Allow"}),
    )
}

/// Service `name` of `shop` selecting pods by `selector` (none: no selector).
fn service_selecting(
    name: &str,
    ip: &str,
    selector: Option<serde_json::Value>,
) -> (ObjectKey, Object) {
    let mut spec = json!({"clusterIP": ip, "ports": [{"name": "http", "port": 80}]});
    if let Some(selector) = selector {
        spec["selector"] = selector;
    }
    let s: Service = serde_json::from_value(
        json!({"metadata": {"name": name, "namespace": "shop"}, "spec": spec}),
    )
    .unwrap();
    model::service(&s)
}

/// The names of the Policies selecting pod `name` of `shop`.
fn names_of(i: &Index, name: &str) -> Vec<String> {
    i.policies_for(&key("shop", name))
        .into_iter()
        .map(|k| k.name)
        .collect()
}

/// Holds every pod's Policies and every Policy's pods against evaluating each Policy.
fn assert_selection_is_naive(i: &Index, what: &str) {
    for pod in i.pods.keys() {
        assert_eq!(
            i.selection.policies(pod).cloned().collect::<Vec<_>>(),
            naive_selecting(i, pod),
            "{pod} after {what}"
        );
    }
    for policy in i.policies.keys() {
        let naive: Vec<&ObjectKey> = i
            .pods
            .keys()
            .filter(|p| naive_selecting(i, p).contains(policy))
            .collect();
        assert_eq!(
            i.selection.pods(policy).collect::<Vec<_>>(),
            naive,
            "{policy} after {what}"
        );
    }
}

/// A re-list of Policies selects once for them all, at its end, evaluating a Policy that
/// requires labels only against the pods that carry the rarest of them: what it selects
/// is still what evaluating each Policy against each pod gives, for selectors of several
/// labels, labels no pod carries, labels with expressions, expressions alone, Services
/// selecting by several labels or none; and it reports the pods each changed Policy
/// selected before or selects now. Cut short by a panic, it leaves its Policies' selection
/// to the next change, which settles it and reports those pods.
#[test]
fn a_policy_relist_selects_what_evaluating_each_policy_gives() {
    let mut i = Index::new("cluster.local");
    for (name, labels) in [
        ("a", json!({"app": "web", "tier": "t0"})),
        ("b", json!({"app": "web", "tier": "t1"})),
        ("c", json!({"app": "api", "tier": "t0"})),
        ("d", json!({"zone": "z1"})),
    ] {
        apply(&mut i, pod("shop", name, "sa", labels));
    }
    apply(
        &mut i,
        pod("cart", "e", "sa", json!({"app": "web", "tier": "t0"})),
    );
    apply(
        &mut i,
        service_selecting(
            "two",
            "198.19.0.10",
            Some(json!({"app": "web", "tier": "t1"})),
        ),
    );
    apply(&mut i, service_selecting("none", "198.19.0.11", None));
    apply(
        &mut i,
        service_selecting("empty", "198.19.0.12", Some(json!({}))),
    );
    let policies = |generation: i64, two: serde_json::Value| {
        vec![
            targeting("wide", generation, json!({"selector": {}})),
            targeting("two", 1, json!({"selector": {"matchLabels": two}})),
            targeting(
                "absent",
                1,
                json!({"selector": {"matchLabels": {"app": "web", "zone": "nowhere"}}}),
            ),
            targeting(
                "mixed",
                1,
                json!({"selector": {"matchLabels": {"app": "web"}, "matchExpressions": [
                    {"key": "tier", "operator": "NotIn", "values": ["t0"]}]}}),
            ),
            targeting(
                "expr",
                1,
                json!({"selector": {"matchExpressions": [
                    {"key": "tier", "operator": "In", "values": ["t0", "t9"]}]}}),
            ),
            targeting("by-two", 1, json!({"service": "two"})),
            targeting("by-none", 1, json!({"service": "none"})),
            targeting("by-empty", 1, json!({"service": "empty"})),
            targeting("by-missing", 1, json!({"service": "missing"})),
            weft(
                Kind::Policy,
                "shop",
                "invalid",
                1,
                "2026-01-01T00:00:00Z",
                json!({"target": 5}),
            ),
        ]
    };
    let affected = i.replace(
        Kind::Policy,
        policies(1, json!({"app": "web", "tier": "t0"})),
    );
    assert_selection_is_naive(&i, "the first list");
    assert_eq!(names_of(&i, "a"), ["expr", "two", "wide"]);
    assert_eq!(names_of(&i, "b"), ["by-two", "mixed", "wide"]);
    assert_eq!(names_of(&i, "c"), ["expr", "wide"]);
    assert_eq!(names_of(&i, "d"), ["wide"]);
    // Every pod of `shop` is selected by `wide`; none of `cart`.
    let shop_pods: BTreeSet<ObjectKey> = ["a", "b", "c", "d"].map(|n| key("shop", n)).into();
    assert_eq!(affected.pods, shop_pods);

    // `two` moves from a to b; `wide` changes its spec alone; the rest are as they were.
    let affected = i.replace(
        Kind::Policy,
        policies(2, json!({"app": "web", "tier": "t1"})),
    );
    assert_selection_is_naive(&i, "a re-list moving one target");
    assert_eq!(affected.pods, shop_pods);
    // `two` moves to {a, c}; the others but `wide` (unchanged) are gone: the pods they
    // selected are reported, d (only `wide` selects it) is not.
    let mut listed = policies(2, json!({"tier": "t0"}));
    listed.retain(|(k, _)| k.name == "two" || k.name == "wide");
    let affected = i.replace(Kind::Policy, listed);
    assert_selection_is_naive(&i, "a re-list moving it again, the others gone");
    assert_eq!(
        affected.pods,
        BTreeSet::from([key("shop", "a"), key("shop", "b"), key("shop", "c")])
    );

    // Cut short after its objects are applied: the next change, elsewhere, settles it.
    i.panic_mid_replace = true;
    let moved = vec![
        targeting(
            "two",
            1,
            json!({"selector": {"matchLabels": {"zone": "z1"}}}),
        ),
        targeting("wide", 2, json!({"selector": {}})),
    ];
    let cut_short = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        i.replace(Kind::Policy, moved)
    }));
    assert!(cut_short.is_err());
    let affected = apply(&mut i, pod("cart", "f", "sa", json!({})));
    assert_selection_is_naive(&i, "the next change after a re-list cut short");
    assert!(
        affected.pods.is_superset(&BTreeSet::from([
            key("shop", "a"),
            key("shop", "c"),
            key("shop", "d")
        ])),
        "{affected:?}"
    );
    assert_eq!(names_of(&i, "d"), ["two", "wide"]);
}

/// A re-list that leaves a namespace's pods without a kept mTLS mode (more than a few)
/// has them computed Policy by Policy for the whole namespace: each pod's is what its own
/// Policies give (workload over namespace-wide, the strictest of a level, refused
/// Policies left out, the mesh default where none selects it), and no pod of another
/// namespace is touched.
#[test]
fn a_relist_keeps_each_pods_mode_as_its_own_policies_give_it() {
    let mut i = Index::new("cluster.local")
        .with_mesh_mtls(MtlsMode::Disabled)
        .with_max_policies(1);
    for n in 0..100 {
        let labels = json!({"app": format!("a{}", n % 4), "tier": format!("t{}", n % 3)});
        apply(&mut i, pod("shop", &format!("p{n:03}"), "sa", labels));
    }
    apply(&mut i, pod("cart", "other", "sa", json!({"app": "a0"})));
    // With `rules`, a Policy sends authorization, and counts towards the limit of 1.
    let policy = |name: &str, created: u8, selector: serde_json::Value, mode: &str, rules: bool| {
        let mut spec = json!({"target": {"selector": selector}, "mtls": {"mode": mode},
                              "defaultAction": "Allow"});
        if rules {
            spec["rules"] = json!([{"action": "Deny", "from": [{"namespaces": ["other"]}]}]);
        }
        weft(
            Kind::Policy,
            "shop",
            name,
            1,
            &format!("2026-01-01T00:00:{created:02}Z"),
            spec,
        )
    };
    let tier_t0 =
        json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["t0"]}]});
    let policies = vec![
        policy("wide", 0, json!({}), "Permissive", false),
        policy("wide-strict", 1, json!({}), "Strict", false),
        policy(
            "a1",
            2,
            json!({"matchLabels": {"app": "a1"}}),
            "Disabled",
            false,
        ),
        policy(
            "a2",
            2,
            json!({"matchLabels": {"app": "a2"}}),
            "Permissive",
            false,
        ),
        policy("t0", 3, tier_t0, "Strict", false),
        policy(
            "a3-old",
            4,
            json!({"matchLabels": {"app": "a3"}}),
            "Permissive",
            true,
        ),
        // Newer, and its pods already have a3-old's authorization: refused.
        policy(
            "a3",
            5,
            json!({"matchLabels": {"app": "a3"}}),
            "Strict",
            true,
        ),
    ];
    i.replace(Kind::Policy, policies);
    assert!(i.refused_policies["shop"].contains_key(&key("shop", "a3")));
    let kept = lock(&mut i.policy_modes).clone();
    for (pod, _) in in_ns(&i.pods, "shop") {
        assert_eq!(kept.get(pod), Some(&i.compute_policy_mode(pod)), "{pod}");
    }
    let mode = |n: usize| kept[&key("shop", &format!("p{n:03}"))];
    // a0 with t0: the workload Policy; a0 alone: the strictest namespace-wide one.
    assert_eq!(mode(0), MtlsMode::Strict);
    assert_eq!(mode(4), MtlsMode::Strict);
    // a1: its workload Policy, below the namespace-wide ones; with t0, the strictest.
    assert_eq!(mode(1), MtlsMode::Disabled);
    assert_eq!(mode(9), MtlsMode::Strict);
    assert_eq!(mode(2), MtlsMode::Permissive);
    // a3 is refused: a3-old decides.
    assert_eq!(mode(7), MtlsMode::Permissive);
    assert!(!kept.contains_key(&key("cart", "other")));
    // Without any Policy, every pod runs the mesh default.
    i.replace(Kind::Policy, Vec::new());
    let kept = lock(&mut i.policy_modes).clone();
    for (pod, _) in in_ns(&i.pods, "shop") {
        assert_eq!(kept.get(pod), Some(&MtlsMode::Disabled), "{pod}");
    }
}

/// What a subscriber of `pod` holds, checked against the view computed afresh.
fn held(
    shared: &SharedIndex,
    rx: &mut tokio::sync::watch::Receiver<Option<ProxyView>>,
    pod: &ObjectKey,
    what: &str,
) -> Option<ProxyView> {
    let held = rx.borrow_and_update().clone();
    let fresh = shared.read(|i| i.view(pod));
    assert!(
        same(held.as_ref(), fresh.as_ref()),
        "{pod} after {what}: holds {held:#?}, should be {fresh:#?}"
    );
    held
}

/// The rate of `view`'s inbound limit and the names of its authorization policies.
fn inbound_of(view: Option<&ProxyView>) -> (Option<u32>, Vec<String>) {
    let inbound = view.and_then(|v| v.inbound.as_ref());
    (
        inbound.and_then(|b| b.rate_limit.as_ref().map(|r| r.requests_per_second)),
        inbound
            .map(|b| b.authorization.iter().map(|a| a.name.clone()).collect())
            .unwrap_or_default(),
    )
}

/// The shared index brings a subscriber's view up to date from the one it holds: a
/// change to its namespace's services alone keeps the Policy part (and with it what the
/// mesh default gave), and whatever feeds that part (its labels, a Policy selecting it
/// added, changed or removed, a namespace-wide one, another Policy's refusal, the pod
/// gone) has it recomputed. Each step is checked against the view computed afresh.
#[test]
fn a_held_view_keeps_its_policy_part_until_an_input_of_it_changes() {
    let shared = SharedIndex::new(
        Index::new("cluster.local")
            .with_mesh_mtls(MtlsMode::Strict)
            .with_max_policies(1),
        std::sync::Arc::new(crate::metrics::Metrics::new()),
    );
    let apply = |object: (ObjectKey, Object)| shared.update(|i| i.apply(object.0, object.1));
    let ready = |web_1: bool| {
        slice(
            "shop",
            "web-x",
            "web",
            &[
                ("198.18.100.1", true, false, Some("web-0")),
                ("198.18.100.2", web_1, false, Some("web-1")),
            ],
        )
    };
    let limit = |rps: u32, generation: i64| {
        weft(
            Kind::Policy,
            "shop",
            "limit",
            generation,
            "2026-01-01T00:00:05Z",
            json!({"target": {"selector": {"matchLabels": {"app": "web"}}},
                   "defaultAction": "Allow", "rateLimit": {"requestsPerSecond": rps}}),
        )
    };
    apply(labelled_pod("shop", "web-0", "web", "t0", "198.18.100.1"));
    apply(labelled_pod("shop", "web-1", "web", "t0", "198.18.100.2"));
    apply(labelled_pod(
        "shop",
        "client",
        "client",
        "t0",
        "198.18.100.3",
    ));
    apply(selecting_svc("shop", "web", "198.19.0.10", Some("web")));
    apply(ready(true));
    apply(limit(10, 1));
    let (web_0, client) = (key("shop", "web-0"), key("shop", "client"));
    let mut rx = shared.subscribe(&web_0);
    let mut client_rx = shared.subscribe(&client);
    assert_eq!(
        inbound_of(held(&shared, &mut rx, &web_0, "start").as_ref()).0,
        Some(10)
    );

    // Only the namespace's services change: the Policy part and the mesh default stay.
    let version = shared.read(Index::version);
    apply(ready(false));
    let view = held(&shared, &mut rx, &web_0, "an endpoint not ready").unwrap();
    assert!(view.version > version, "the services changed: {view:?}");
    assert_eq!(inbound_of(Some(&view)).0, Some(10));
    let client_view = held(&shared, &mut client_rx, &client, "an endpoint not ready");
    let client_mode = client_view.and_then(|v| v.inbound).and_then(|b| b.mtls);
    assert_eq!(client_mode, Some(MtlsMode::Strict));

    // A Route and a Breaker (references sorting before and after the Policies') come,
    // change and go: the view's Routes and Breakers follow, its Policies stay.
    let kinds = |view: Option<ProxyView>| -> Vec<(String, String, i64)> {
        view.map(|v| v.resources.into_iter())
            .into_iter()
            .flatten()
            .map(|r| (r.kind, r.name, r.generation))
            .collect()
    };
    let breaker = weft(
        Kind::Breaker,
        "shop",
        "b",
        1,
        "2026-01-01T00:00:00Z",
        json!({"service": {"name": "web"}, "connectionPool": {"maxRequests": 1}}),
    );
    apply(breaker);
    let web_route = |generation: i64| {
        weft(
            Kind::Route,
            "shop",
            "r",
            generation,
            "2026-01-01T00:00:00Z",
            json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}]}]}),
        )
    };
    apply(web_route(1));
    apply(web_route(2));
    let view = held(&shared, &mut rx, &web_0, "a Breaker and a Route");
    let expected = |route: Option<i64>| {
        let mut refs = vec![
            ("Breaker".to_owned(), "b".to_owned(), 1),
            ("Policy".to_owned(), "limit".to_owned(), 1),
        ];
        refs.extend(route.map(|g| ("Route".to_owned(), "r".to_owned(), g)));
        refs
    };
    assert_eq!(kinds(view), expected(Some(2)));
    apply(ready(true));
    apply(ready(false));
    let view = held(
        &shared,
        &mut rx,
        &web_0,
        "endpoints, with a Route and a Breaker",
    );
    assert_eq!(kinds(view), expected(Some(2)));
    shared.update(|i| i.delete(Kind::Route, &key("shop", "r")));
    let view = held(&shared, &mut rx, &web_0, "the Route deleted");
    assert_eq!(kinds(view), expected(None));

    // The Policy selecting it changes.
    apply(limit(20, 2));
    assert_eq!(
        inbound_of(held(&shared, &mut rx, &web_0, "limit changed").as_ref()).0,
        Some(20)
    );
    // Its labels change, so the Policy no longer selects it; and back.
    apply(labelled_pod("shop", "web-0", "api", "t0", "198.18.100.1"));
    assert_eq!(
        inbound_of(held(&shared, &mut rx, &web_0, "relabelled").as_ref()).0,
        None
    );
    apply(labelled_pod("shop", "web-0", "web", "t0", "198.18.100.1"));
    assert_eq!(
        inbound_of(held(&shared, &mut rx, &web_0, "labels back").as_ref()).0,
        Some(20)
    );

    // A namespace-wide Policy that denies by default: its authorization applies.
    let wide = weft(
        Kind::Policy,
        "shop",
        "wide",
        1,
        "2026-01-01T00:00:03Z",
        json!({"target": {"selector": {}}, "defaultAction": "Deny"}),
    );
    apply(wide.clone());
    let view = held(&shared, &mut rx, &web_0, "a namespace-wide Policy");
    assert_eq!(inbound_of(view.as_ref()).1, vec!["shop/wide".to_owned()]);
    apply(ready(true));
    let view = held(&shared, &mut rx, &web_0, "an endpoint ready again");
    assert_eq!(
        inbound_of(view.as_ref()),
        (Some(20), vec!["shop/wide".to_owned()])
    );

    // An older Policy that selects the client alone takes the one authorization slot its
    // proxy has, so the namespace-wide one is refused on every pod, web-0's included,
    // which the new Policy does not select.
    let older = weft(
        Kind::Policy,
        "shop",
        "older",
        1,
        "2026-01-01T00:00:01Z",
        json!({"target": {"selector": {"matchLabels": {"app": "client"}}},
               "defaultAction": "Allow",
               "rules": [{"action": "Deny", "from": [{"namespaces": ["other"]}]}]}),
    );
    apply(older);
    let view = held(
        &shared,
        &mut rx,
        &web_0,
        "the namespace-wide Policy refused",
    );
    assert_eq!(inbound_of(view.as_ref()), (Some(20), Vec::new()));
    apply(ready(false));
    held(
        &shared,
        &mut rx,
        &web_0,
        "an endpoint not ready, with a refusal",
    );
    // Accepted again when the older one goes.
    shared.update(|i| i.delete(Kind::Policy, &key("shop", "older")));
    let view = held(
        &shared,
        &mut rx,
        &web_0,
        "the namespace-wide Policy accepted again",
    );
    assert_eq!(inbound_of(view.as_ref()).1, vec!["shop/wide".to_owned()]);

    // The Policy selecting it goes, and then the pod.
    shared.update(|i| i.delete(Kind::Policy, &key("shop", "limit")));
    assert_eq!(
        inbound_of(held(&shared, &mut rx, &web_0, "limit deleted").as_ref()).0,
        None
    );
    shared.update(|i| i.delete(Kind::Pod, &web_0));
    assert!(held(&shared, &mut rx, &web_0, "pod deleted").is_none());
}

/// The namespaces of the property test.
const NAMESPACES: [&str; 2] = ["shop", "other"];

/// What a Policy of the property test targets.
#[derive(Clone, Debug)]
enum Target {
    /// `app: a<n>`.
    Labels(u8),
    /// `tier In (t<n>)`.
    Tier(u8),
    /// Every pod of the namespace.
    Wide,
    /// Service `s<n>`'s pods.
    Service(u8),
    /// A spec that does not deserialize.
    Invalid,
}

/// One change, as the watches would deliver it.
#[derive(Clone, Debug)]
enum Step {
    Pod {
        ns: usize,
        name: u8,
        app: u8,
        tier: u8,
        ip: u8,
    },
    Service {
        ns: usize,
        name: u8,
        app: Option<u8>,
    },
    /// EndpointSlice `s<service>-<name>` of Service `s<service>`: (address, pod, ready)
    /// endpoints, each naming pod `pod<pod>`, whose identity (its mTLS mode) the
    /// Service's config then carries; addresses from the pods' pool, so that one may be
    /// a pod's own.
    Slice {
        ns: usize,
        service: u8,
        name: u8,
        eps: Vec<(u8, u8, bool)>,
    },
    Policy {
        ns: usize,
        name: u8,
        created: u8,
        target: Target,
        rules: bool,
        mode: u8,
        rate: Option<u32>,
    },
    /// Deletes the `n`th object present (modulo their number).
    Delete(usize),
    /// The watch of `kind` re-lists after losing its stream: `missed`, its steps of that
    /// kind (a deletion: of the `n`th object of that kind), happened meanwhile, and the
    /// index learns them from the list alone ([`Index::replace`]).
    Relist { kind: Kind, missed: Vec<Step> },
}

fn step() -> impl Strategy<Value = Step> {
    let kind = prop_oneof![
        Just(Kind::Pod),
        Just(Kind::Service),
        Just(Kind::Policy),
        Just(Kind::EndpointSlice)
    ];
    prop_oneof![
        10 => change(),
        1 => (kind, proptest::collection::vec(change(), 0..4))
            .prop_map(|(kind, missed)| Step::Relist { kind, missed }),
    ]
}

/// A step the watches deliver one by one.
fn change() -> impl Strategy<Value = Step> {
    let ns = 0usize..2;
    let target = prop_oneof![
        3 => (0u8..3).prop_map(Target::Labels),
        1 => (0u8..2).prop_map(Target::Tier),
        1 => Just(Target::Wide),
        2 => (0u8..3).prop_map(Target::Service),
        1 => Just(Target::Invalid),
    ];
    prop_oneof![
        4 => (ns.clone(), 0u8..5, 0u8..3, 0u8..2, 0u8..6)
            .prop_map(|(ns, name, app, tier, ip)| Step::Pod { ns, name, app, tier, ip }),
        2 => (ns.clone(), 0u8..3, proptest::option::of(0u8..3))
            .prop_map(|(ns, name, app)| Step::Service { ns, name, app }),
        2 => (ns.clone(), 0u8..3, 0u8..2, proptest::collection::vec((0u8..6, 0u8..5, any::<bool>()), 0..4))
            .prop_map(|(ns, service, name, eps)| Step::Slice { ns, service, name, eps }),
        4 => (ns, 0u8..4, 0u8..3, target, any::<bool>(), 0u8..3, proptest::option::of(1u32..4))
            .prop_map(|(ns, name, created, target, rules, mode, rate)| Step::Policy {
                ns, name, created, target, rules, mode, rate,
            }),
        2 => any::<usize>().prop_map(Step::Delete),
    ]
}

/// Address `ip` of namespace `ns`'s pool: the last one is both namespaces', so that a pod
/// may take or leave an address a pod of the other holds (stale state, when neither is
/// sent by it).
fn address(ns: usize, ip: u8) -> String {
    if ip == 5 {
        "10.0.9.9".to_owned()
    } else {
        format!("10.0.{ns}.{ip}")
    }
}

/// The object a step applies (`None` for a deletion); `generation` numbers Policies'
/// specs, so that each one applied is a new generation.
fn object(step: &Step, generation: i64) -> Option<(ObjectKey, Object)> {
    Some(match step {
        Step::Pod {
            ns,
            name,
            app,
            tier,
            ip,
        } => labelled_pod(
            NAMESPACES[*ns],
            &format!("pod{name}"),
            &format!("a{app}"),
            &format!("t{tier}"),
            &address(*ns, *ip),
        ),
        Step::Service { ns, name, app } => selecting_svc(
            NAMESPACES[*ns],
            &format!("s{name}"),
            &format!("10.96.{ns}.{name}"),
            app.map(|a| format!("a{a}")).as_deref(),
        ),
        Step::Slice {
            ns,
            service,
            name,
            eps,
        } => {
            let eps: Vec<(String, bool, String)> = eps
                .iter()
                .map(|(ip, pod, ready)| (address(*ns, *ip), *ready, format!("pod{pod}")))
                .collect();
            let eps: Vec<(&str, bool, bool, Option<&str>)> = eps
                .iter()
                .map(|(ip, ready, pod)| (ip.as_str(), *ready, false, Some(pod.as_str())))
                .collect();
            slice(
                NAMESPACES[*ns],
                &format!("s{service}-{name}"),
                &format!("s{service}"),
                &eps,
            )
        }
        Step::Policy {
            ns,
            name,
            created,
            target,
            rules,
            mode,
            rate,
        } => {
            let ns_name = NAMESPACES[*ns];
            let mut spec = match target {
                Target::Labels(a) => {
                    json!({"target": {"selector": {"matchLabels": {"app": format!("a{a}")}}}})
                }
                Target::Tier(t) => json!({"target": {"selector": {"matchExpressions": [
                    {"key": "tier", "operator": "In", "values": [format!("t{t}")]}]}}}),
                Target::Wide => json!({"target": {"selector": {}}}),
                Target::Service(s) => json!({"target": {"service": format!("s{s}")}}),
                Target::Invalid => json!({"target": 5}),
            };
            let mode = ["Strict", "Permissive", "Disabled"][usize::from(*mode)];
            spec["mtls"] = json!({ "mode": mode });
            spec["defaultAction"] = json!("Allow");
            if *rules {
                spec["rules"] = json!([{"action": "Deny", "from": [{"namespaces": ["other"]}]}]);
            }
            if let Some(rps) = rate {
                spec["rateLimit"] = json!({"requestsPerSecond": rps});
            }
            weft(
                Kind::Policy,
                ns_name,
                &format!("p{name}"),
                generation,
                &format!("2026-01-01T00:00:0{created}Z"),
                spec,
            )
        }
        Step::Delete(_) | Step::Relist { .. } => return None,
    })
}

/// Every pod's view, by pod.
fn views(i: &Index, pods: &BTreeSet<ObjectKey>) -> BTreeMap<ObjectKey, Option<ProxyView>> {
    pods.iter().map(|p| (p.clone(), i.view(p))).collect()
}

fn same(a: Option<&ProxyView>, b: Option<&ProxyView>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.same_content(b),
        (None, None) => true,
        _ => false,
    }
}

/// Every Policy's `Accepted` and `ResolvedRefs`, by key.
fn policy_states(i: &Index) -> BTreeMap<ObjectKey, Option<ResourceState>> {
    i.resource_keys(Kind::Policy)
        .into_iter()
        .map(|k| {
            let state = i.resource_state(Kind::Policy, &k);
            (k, state)
        })
        .collect()
}

/// The present objects of `kind`.
fn of_kind(present: &BTreeMap<(Kind, ObjectKey), Object>, kind: Kind) -> Vec<(ObjectKey, Object)> {
    present
        .iter()
        .filter(|((k, _), _)| *k == kind)
        .map(|((_, key), o)| (key.clone(), o.clone()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// With `max` (the proxy's limit, or one a few Policies reach) and each mesh-wide
    /// mode (that of pods no Policy selects), after each step.
    #[test]
    fn the_kept_selection_is_what_evaluating_every_policy_gives(
        steps in proptest::collection::vec(step(), 1..24),
        max in prop_oneof![Just(1usize), Just(2), Just(weft_proxy::authz::MAX_POLICIES)],
        mesh in prop_oneof![Just(MtlsMode::Permissive), Just(MtlsMode::Strict), Just(MtlsMode::Disabled)],
    ) {
        let mut i = Index::new("cluster.local").with_mesh_mtls(mesh).with_max_policies(max);
        let mut present: BTreeMap<(Kind, ObjectKey), Object> = BTreeMap::new();
        // Every pod ever applied, so that one deleted is checked too.
        let mut pods: BTreeSet<ObjectKey> = BTreeSet::new();
        // Each pod's view as a subscriber holds it: brought up to date after each step
        // from the one held before, as the shared index does (`Index::refresh_view`).
        let mut held: BTreeMap<ObjectKey, Option<ProxyView>> = BTreeMap::new();
        // Numbers Policies' specs: each one applied is a new generation.
        let mut generation = 0;
        let mut next = |step: &Step| {
            generation += 1;
            object(step, generation)
        };
        for step in &steps {
            let before = views(&i, &pods);
            let statuses_before = policy_states(&i);
            let affected = match step {
                Step::Delete(which) => {
                    if present.is_empty() {
                        continue;
                    }
                    let (kind, k) = present.keys().nth(which % present.len()).unwrap().clone();
                    present.remove(&(kind, k.clone()));
                    i.delete(kind, &k)
                }
                Step::Relist { kind, missed } => {
                    for m in missed {
                        if let Step::Delete(which) = m {
                            let keys: Vec<ObjectKey> =
                                of_kind(&present, *kind).into_iter().map(|(k, _)| k).collect();
                            if !keys.is_empty() {
                                present.remove(&(*kind, keys[which % keys.len()].clone()));
                            }
                        } else if let Some((k, o)) = next(m).filter(|(_, o)| o.kind() == *kind) {
                            if *kind == Kind::Pod {
                                pods.insert(k.clone());
                            }
                            present.insert((*kind, k), o);
                        }
                    }
                    i.replace(*kind, of_kind(&present, *kind))
                }
                _ => {
                    let (k, o) = next(step).unwrap();
                    if o.kind() == Kind::Pod {
                        pods.insert(k.clone());
                    }
                    present.insert((o.kind(), k.clone()), o.clone());
                    i.apply(k, o)
                }
            };
            check_selection(&i, &pods, max, step)?;
            // The status writer is woken by a change that alters a status, not only by
            // one that alters a view: else the status waits for its timer.
            if policy_states(&i) != statuses_before {
                prop_assert!(
                    affected.statuses || !affected.is_empty(),
                    "a status changed but {:?} wakes no one, after {:?}", affected, step
                );
            }
            let after = views(&i, &pods);
            // What the change reported, without the re-list's repair: every pod of a
            // relisted namespace is affected and has its view computed afresh, which
            // would hide a report that missed a pod whose Policy part changed. Reports
            // are held to this, so that a re-list's are as complete as a single change's.
            let reported = Affected { relisted: BTreeSet::new(), ..affected.clone() };
            for pod in &pods {
                // The shared index recomputes only the views of affected subscribers: any
                // other whose view changed would keep a stale one.
                // A pod not seen before had no view.
                let was = before.get(pod).and_then(Option::as_ref);
                if !same(was, after.get(pod).and_then(Option::as_ref)) {
                    prop_assert!(
                        i.is_affected(pod, &reported),
                        "{}'s view changed but {:?} does not touch it, after {:?}", pod, reported, step
                    );
                }
                // A subscriber there since before the pod was seen held no view. Brought
                // up to date by the report alone, its kept Policy part is held against a
                // fresh one (`Index::refresh_view`'s test asserts); the repair then finds
                // nothing to repair.
                let view = held.entry(pod.clone()).or_default();
                if i.is_affected(pod, &reported) {
                    i.refresh_view(pod, &reported, view, &mut Comparisons::default());
                }
                if i.is_affected(pod, &affected) {
                    prop_assert_eq!(
                        i.refresh_view(pod, &affected, view, &mut Comparisons::default()),
                        Refresh::Same,
                        "{} repaired by the re-list, after {:?}", pod, step
                    );
                }
                prop_assert!(
                    same(view.as_ref(), after.get(pod).and_then(Option::as_ref)),
                    "{}'s held view is not its view, after {:?}", pod, step
                );
            }
        }
        // The same objects listed into a fresh index, Policies first: the same views and
        // statuses.
        let mut fresh = Index::new("cluster.local").with_mesh_mtls(mesh).with_max_policies(max);
        for kind in [Kind::Policy, Kind::Service, Kind::EndpointSlice, Kind::Pod] {
            fresh.replace(kind, of_kind(&present, kind));
        }
        for pod in &pods {
            prop_assert!(same(i.view(pod).as_ref(), fresh.view(pod).as_ref()), "{}", pod);
        }
        for key in i.resource_keys(Kind::Policy) {
            prop_assert_eq!(
                i.resource_state(Kind::Policy, &key),
                fresh.resource_state(Kind::Policy, &key),
                "{}", key
            );
        }
    }
}
