//! The judging half of `check`, over objects as the API server would return them.

use k8s_openapi::{
    ByteString,
    api::{apps::v1::Deployment, coordination::v1::Lease, core::v1::Secret},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use serde_json::json;
use weft_api::proxy_status::ProxyRow;

use super::*;

const NOW: i64 = 1_800_000_000;
const DAY: i64 = 86_400;

fn established(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    crd.status = Some(
        serde_json::from_value(json!({"conditions": [
            {"type": "Established", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z", "reason": "InitialNamesAccepted", "message": ""}
        ]}))
        .unwrap(),
    );
    crd
}

fn pairs() -> Vec<(CustomResourceDefinition, Option<CustomResourceDefinition>)> {
    weft_crds::all()
        .into_iter()
        .map(|(_, c)| (c.clone(), Some(established(c))))
        .collect()
}

#[test]
fn crds_as_built_pass_and_a_version_not_served_or_a_missing_crd_fails() {
    let healthy = evaluate_crds(&pairs());
    assert_eq!(healthy.status, Status::Ok, "{healthy:?}");
    assert!(healthy.message.contains("serving v1alpha1"), "{healthy:?}");

    let mut p = pairs();
    p[0].1.as_mut().unwrap().spec.versions[0].served = false;
    p[2].1 = None;
    let f = evaluate_crds(&p);
    assert_eq!(f.status, Status::Fail);
    assert_eq!(
        f.message,
        "routes.weft.dev does not serve version v1alpha1\nbreakers.weft.dev is missing"
    );
    assert!(f.hint.unwrap().starts_with("kubectl apply -f crds/"));

    let mut p = pairs();
    p[1].1.as_mut().unwrap().spec.versions[0].schema = None;
    let f = evaluate_crds(&p);
    assert_eq!(f.status, Status::Warn, "{f:?}");
    assert!(f.message.contains("policies.weft.dev v1alpha1"), "{f:?}");
}

fn deployment(replicas: i32, ready: Option<i32>) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": "weft-operator", "namespace": "weft-system"},
        "spec": {"replicas": replicas, "selector": {}, "template": {}},
        "status": {"readyReplicas": ready}
    }))
    .unwrap()
}

#[test]
fn replicas_all_ready_pass_some_warn_none_fail() {
    let at = "weft-system/weft-operator";
    assert_eq!(
        evaluate_replicas(at, Some(&deployment(2, Some(2)))).status,
        Status::Ok
    );
    assert_eq!(
        evaluate_replicas(at, Some(&deployment(2, Some(1)))).status,
        Status::Warn
    );
    let none = evaluate_replicas(at, Some(&deployment(2, None)));
    assert_eq!(none.status, Status::Fail);
    assert_eq!(
        none.message,
        "Deployment weft-system/weft-operator: 0 of 2 replicas ready"
    );
    assert_eq!(evaluate_replicas(at, None).status, Status::Fail);
}

fn lease(holder: Option<&str>, renewed: i64) -> Lease {
    let mut l: Lease = serde_json::from_value(json!({
        "metadata": {"name": "weft-operator"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15}
    }))
    .unwrap();
    l.spec.as_mut().unwrap().renew_time = Some(MicroTime(
        k8s_openapi::jiff::Timestamp::from_second(renewed).unwrap(),
    ));
    l
}

#[test]
fn a_lease_renewed_within_its_duration_is_live_and_a_stale_one_fails() {
    let at = "weft-system/weft-operator";
    assert_eq!(
        evaluate_lease(at, Some(&lease(Some("op-1"), NOW - 3)), NOW).status,
        Status::Ok
    );
    let stale = evaluate_lease(at, Some(&lease(Some("op-1"), NOW - 60)), NOW);
    assert_eq!(stale.status, Status::Fail);
    assert!(stale.message.contains("last renewed 60s ago"), "{stale:?}");
    assert_eq!(
        evaluate_lease(at, Some(&lease(None, NOW)), NOW).status,
        Status::Fail
    );
    assert_eq!(evaluate_lease(at, None, NOW).status, Status::Fail);
}

fn root_pem(not_after: i64) -> String {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "weft identity root");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.not_before = time_of(NOW - DAY);
    p.not_after = time_of(not_after);
    p.self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap()
        .pem()
}

/// A registration whose every webhook has `bundle` as its caBundle.
fn registration_with(bundle: &str) -> MutatingWebhookConfiguration {
    use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, WebhookClientConfig};
    let webhook = |name: &str| MutatingWebhook {
        name: name.to_owned(),
        client_config: WebhookClientConfig {
            url: Some("https://weft.invalid/inject".to_owned()),
            ca_bundle: Some(ByteString(bundle.as_bytes().to_vec())),
            service: None,
        },
        admission_review_versions: vec!["v1".to_owned()],
        side_effects: "None".to_owned(),
        ..Default::default()
    };
    MutatingWebhookConfiguration {
        metadata: Default::default(),
        webhooks: Some(vec![
            webhook("a.inject.weft.dev"),
            webhook("b.inject.weft.dev"),
        ]),
    }
}

/// After a change of the webhook's CA the bundle holds the new CA and the one before; once
/// that one expires, and until the operator rewrites the bundle without it, the API server
/// still verifies against the new one: a warning that needs no action, not a failure whose
/// way out (a new CA) would be one more change. A bundle of expired certificates only
/// fails.
#[test]
fn an_expired_ca_beside_a_valid_one_in_the_webhook_bundle_warns_and_alone_fails() {
    let name = "weft-injector";
    let judge = |bundle: &str| {
        evaluate_webhook_registration(name, &Ok(Some(registration_with(bundle))), NOW)
    };
    let valid = root_pem(NOW + DAY);
    let expired = root_pem(NOW - 60);

    assert_eq!(judge(&valid).status, Status::Ok);
    let both = judge(&format!("{valid}{expired}"));
    assert_eq!(both.status, Status::Warn, "{both:?}");
    assert!(
        both.message
            .contains("expired certificate beside a valid one"),
        "{both:?}"
    );
    let hint = both.hint.as_deref().unwrap_or_default();
    assert!(
        hint.contains("restart the operator") && !hint.contains("delete Secret weft-ca"),
        "{both:?}"
    );
    let alone = judge(&expired);
    assert_eq!(alone.status, Status::Fail, "{alone:?}");
    assert!(
        alone
            .hint
            .as_deref()
            .unwrap_or_default()
            .contains("delete Secret weft-ca"),
        "{alone:?}"
    );
}

fn time_of(secs: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap()
}

fn secret(ca: &str) -> Secret {
    Secret {
        data: Some([("ca.crt".to_owned(), ByteString(ca.as_bytes().to_vec()))].into()),
        ..Secret::default()
    }
}

#[test]
fn a_trust_root_under_60_days_fails_and_one_beyond_passes() {
    let at = "weft-system/weft-identity";
    let long = evaluate_trust_root(at, Some(&secret(&root_pem(NOW + 400 * DAY))), NOW);
    assert_eq!(long.status, Status::Ok, "{long:?}");
    assert!(long.message.contains("(400 days)"), "{long:?}");
    let soon = evaluate_trust_root(at, Some(&secret(&root_pem(NOW + 30 * DAY))), NOW);
    assert_eq!(soon.status, Status::Fail);
    assert!(
        soon.message.contains("expires in 30 days") && soon.message.contains("under 60"),
        "{soon:?}"
    );
    let gone = evaluate_trust_root(at, Some(&secret(&root_pem(NOW - 1))), NOW);
    assert_eq!(gone.status, Status::Fail);
    assert!(gone.message.contains("expired on"), "{gone:?}");
    assert_eq!(evaluate_trust_root(at, None, NOW).status, Status::Warn);
    assert_eq!(
        evaluate_trust_root(at, Some(&secret("junk")), NOW).status,
        Status::Fail
    );
}

fn row(pod: &str, acked: u64, desired: u64, proxy: Option<&str>) -> ProxyRow {
    ProxyRow {
        pod: pod.into(),
        connected: true,
        desired_version: Some(desired),
        acked_version: Some(acked),
        in_sync: acked == desired,
        rejected: None,
        last_seen: 0,
        resources: 0,
        not_enforced: Some(vec![]),
        proxy: proxy.map(str::to_owned),
    }
}

#[test]
fn each_meshed_pod_needs_a_proxy_in_sync_and_not_older_than_the_operator() {
    let pods = vec!["shop/a".to_owned(), "shop/b".to_owned()];
    let current = Some("weft-proxy 0.2.0");
    let ok = evaluate_proxies(
        &pods,
        &[row("shop/a", 3, 3, current), row("shop/b", 4, 4, current)],
        "0.2.0",
    );
    assert_eq!(ok.status, Status::Ok, "{ok:?}");

    let stale = evaluate_proxies(
        &pods,
        &[
            row("shop/a", 3, 5, current),
            row("shop/b", 4, 4, Some("weft-proxy 0.1.9")),
        ],
        "0.2.0",
    );
    assert_eq!(stale.status, Status::Fail);
    assert_eq!(
        stale.message,
        "1 proxy(ies) older than the operator: shop/b (weft-proxy 0.1.9)\n\
         1 proxy(ies) out of sync: shop/a (runs version 3, the operator wants 5)"
    );

    let missing = evaluate_proxies(&pods, &[row("shop/a", 3, 3, current)], "0.2.0");
    assert_eq!(missing.status, Status::Fail);
    assert!(
        missing
            .message
            .contains("not connected to the operator: shop/b"),
        "{missing:?}"
    );

    let mut rejected = row("shop/b", 4, 5, current);
    rejected.rejected = Some("version 5: bad regex".to_owned());
    let f = evaluate_proxies(&pods, &[row("shop/a", 3, 3, current), rejected], "0.2.0");
    assert!(
        f.message
            .contains("rejected its config: shop/b (version 5: bad regex)"),
        "{f:?}"
    );

    let silent = evaluate_proxies(
        &pods,
        &[row("shop/a", 3, 3, current), row("shop/b", 4, 4, None)],
        "0.2.0",
    );
    assert_eq!(silent.status, Status::Warn, "{silent:?}");
}

#[test]
fn webhook_urls_split_into_host_and_port() {
    assert_eq!(
        split_https_url("https://127.0.0.1:8443/inject"),
        Some(("127.0.0.1".to_owned(), 8443))
    );
    assert_eq!(
        split_https_url("https://[::1]:9443/inject"),
        Some(("[::1]".to_owned(), 9443))
    );
    assert_eq!(
        split_https_url("https://hooks.example/inject"),
        Some(("hooks.example".to_owned(), 443))
    );
    assert_eq!(split_https_url("http://x/inject"), None);
}

#[test]
fn unmeshed_pods_are_judged_by_the_live_registrations_selectors_scope_included() {
    use weft_inject::selection::selected;
    let hook: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": "weft-injector"},
        "webhooks": [{
            "name": "namespace.inject.weft.dev",
            "clientConfig": {"url": "https://weft.invalid/inject"},
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "namespaceSelector": {
                "matchLabels": {"team": "a"},
                "matchExpressions": [{"key": "weft.dev/inject", "operator": "In", "values": ["enabled"]}]
            },
            "objectSelector": {"matchExpressions": [{"key": "weft.dev/inject", "operator": "NotIn", "values": ["disabled"]}]}
        }]
    }))
    .unwrap();
    let entries = live_entries(&hook);
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    let in_scope = labels(&[("weft.dev/inject", "enabled"), ("team", "a")]);
    let out_of_scope = labels(&[("weft.dev/inject", "enabled")]);
    assert!(selected(&entries, "shop", Some(&in_scope), None));
    assert!(!selected(&entries, "shop", Some(&out_of_scope), None));
    let disabled = labels(&[("weft.dev/inject", "disabled")]);
    assert!(!selected(
        &entries,
        "shop",
        Some(&in_scope),
        Some(&disabled)
    ));
}

#[test]
fn misspelt_annotations_warn_naming_the_pod_and_the_likely_key() {
    use weft_inject::{UnknownAnnotation, audit::Misannotated};
    assert_eq!(misannotated(Vec::new()).status, Status::Ok);
    let typo = |n: usize| Misannotated {
        namespace: "shop".into(),
        name: format!("web-{n}"),
        unknown: vec![
            UnknownAnnotation {
                key: "weft.dev/opaque-port".into(),
                likely: Some(weft_inject::keys::OPAQUE_PORTS),
            },
            UnknownAnnotation {
                key: "weft.dev/something".into(),
                likely: None,
            },
        ],
        inject_value: None,
    };
    let one = misannotated(vec![typo(0)]);
    assert_eq!(one.status, Status::Warn);
    assert_eq!(
        one.message,
        "1 pod(s) carry weft.dev/ annotations or labels that do nothing: shop/web-0: weft.dev/opaque-port (did you mean weft.dev/opaque-ports?), weft.dev/something"
    );
    let istio_style = misannotated(vec![Misannotated {
        namespace: "shop".into(),
        name: "job".into(),
        unknown: Vec::new(),
        inject_value: weft_inject::inject_value_problem(&kube::api::ObjectMeta {
            annotations: Some([(weft_inject::keys::INJECT.to_owned(), "false".to_owned())].into()),
            ..Default::default()
        }),
    }]);
    assert!(
        istio_style.message.ends_with(
            "shop/job: annotation weft.dev/inject: \"false\" is neither enabled nor disabled, so it opts the pod neither in nor out"
        ),
        "{}",
        istio_style.message
    );
    let many = misannotated((0..12).map(typo).collect());
    assert!(many.message.starts_with("12 pod(s)"), "{}", many.message);
    assert!(many.message.ends_with("; and 2 more"), "{}", many.message);
}

#[test]
fn namespace_and_service_metadata_weft_does_not_read_there_warns_naming_it() {
    let meta =
        |v: serde_json::Value| -> kube::api::ObjectMeta { serde_json::from_value(v).unwrap() };
    let fine = [
        meta(
            json!({"name": "shop", "labels": {"weft.dev/inject": "enabled"},
                    "annotations": {"weft.dev/visible-namespaces": "*"}}),
        ),
        meta(json!({"name": "ops", "labels": {"weft.dev/inject": "disabled"}})),
        meta(json!({"name": "plain"})),
    ];
    let fine_svc = [meta(
        json!({"name": "db", "namespace": "shop", "annotations": {"weft.dev/opaque-ports": "5432"}}),
    )];
    let ok = evaluate_namespace_service_annotations(&fine, &fine_svc);
    assert_eq!(ok.status, Status::Ok, "{}", ok.message);

    let wrong = [
        // Linkerd's way: an annotation on the Namespace, which selects nothing here.
        meta(json!({"name": "linkerd-style", "annotations": {"weft.dev/inject": "enabled"}})),
        meta(
            json!({"name": "typo", "annotations": {"weft.dev/visible-namespace": "*"},
                    "labels": {"weft.dev/inject": "true"}}),
        ),
    ];
    let wrong_svc = [meta(
        json!({"name": "db", "namespace": "shop", "annotations": {"weft.dev/opaque-port": "5432"}}),
    )];
    let warned = evaluate_namespace_service_annotations(&wrong, &wrong_svc);
    assert_eq!(warned.status, Status::Warn);
    assert_eq!(
        warned.message,
        "3 Namespace(s) or Service(s) carry weft.dev/ metadata Weft does not read there, which does nothing: \
         namespace linkerd-style: weft.dev/inject is an annotation, but Namespaces opt in by label (kubectl label namespace linkerd-style weft.dev/inject=enabled); \
         namespace typo: weft.dev/visible-namespace (did you mean weft.dev/visible-namespaces?), label weft.dev/inject=true is neither enabled nor disabled, so it does nothing; \
         service shop/db: weft.dev/opaque-port (did you mean weft.dev/opaque-ports?)"
    );
    let many: Vec<_> = (0..12)
        .map(|i| {
            meta(json!({"name": format!("ns-{i}"), "annotations": {"weft.dev/inject": "enabled"}}))
        })
        .collect();
    let capped = evaluate_namespace_service_annotations(&many, &[]);
    assert!(
        capped.message.starts_with("12 Namespace(s)"),
        "{}",
        capped.message
    );
    assert!(
        capped.message.ends_with("; and 2 more"),
        "{}",
        capped.message
    );
}
