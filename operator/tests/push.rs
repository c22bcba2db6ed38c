//! The control plane against the test bed's real API server: the operator watches a test
//! namespace, real weft-proxy config clients (in this process, on loopback) subscribe with
//! real projected ServiceAccount tokens checked by TokenReview, and the status written to
//! the real Routes is read back.
//!
//! There is no kubelet: the test creates a Node object, binds Pods to it and writes their
//! status, so the real EndpointSlice controller publishes their addresses.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{anyhow, ensure};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{ConfigMap, Event, Pod, Service},
};
use kube::{
    ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weft_crds::{Breaker, Policy, Route};
use weft_e2e::shared::eventually;
use weft_operator::{index::ObjectKey, mesh, status::reports};
use weft_proxy::{
    Proxy,
    control::{ControlClient, ControlConfig},
};

mod support;

use support::mesh::*;

#[tokio::test]
async fn subscribers_get_their_config_and_a_route_change_is_programmed_everywhere() {
    let bed = Bed::new("push-route").await;
    let ns = bed.ns.clone();
    for sa in ["web", "client"] {
        bed.service_account(sa).await;
    }
    bed.service("web", "web").await;
    let _web0 = bed.pod("web-0", "web", "web", "198.18.240.10").await;
    let web1 = bed.pod("web-1", "web", "web", "198.18.240.11").await;
    let client_pod = bed.pod("client", "client", "client", "198.18.240.20").await;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let op = Operator::start(&bed, listener).await;
    let client = TestProxy::start(&bed, &addr, &client_pod, None).await;
    let web = TestProxy::start(&bed, &addr, &web1, None).await;

    let web_svc = format!("web.{ns}.80");
    eventually(WAIT, || async {
        let services = client.services();
        let found = services
            .iter()
            .find(|(n, _, _)| *n == web_svc)
            .ok_or_else(|| anyhow!("no {web_svc} yet: {services:?}"))?;
        ensure!(
            found.1 == vec!["198.18.240.10:8080", "198.18.240.11:8080"],
            "endpoints {:?}",
            found.1
        );
        Ok(())
    })
    .await
    .unwrap();
    // Identities are the endpoint pods' ServiceAccounts.
    let snapshot = client.proxy.store.load().unwrap();
    let svc = snapshot
        .raw
        .services
        .iter()
        .find(|s| s.name == web_svc)
        .unwrap();
    assert!(
        svc.endpoints
            .iter()
            .all(|e| e.identity.as_deref()
                == Some(&*format!("spiffe://cluster.local/ns/{ns}/sa/web"))),
        "{svc:?}"
    );
    // The proxy's version is the operator's.
    assert_eq!(
        Some(snapshot.version.parse::<u64>().unwrap()),
        client.status.borrow().acked
    );

    // A Route with a backend that does not exist yet.
    bed.route(
        "web",
        json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web", "weight": 90}, {"name": "web-v2", "weight": 10}]}]}),
    )
    .await;
    let msg = bed.route_condition("web", "ResolvedRefs", "False").await;
    assert!(
        msg.contains(&format!("Service {ns}/web-v2 not found")),
        "{msg}"
    );
    bed.route_condition("web", "Accepted", "True").await;
    // The reason is on an Event too.
    eventually(WAIT, || async {
        let events = bed.api::<Event>().list(&ListParams::default()).await?;
        ensure!(
            events
                .items
                .iter()
                .any(|e| e.reason.as_deref() == Some("BackendNotFound")
                    && e.involved_object.name.as_deref() == Some("web")),
            "no BackendNotFound event yet"
        );
        Ok(())
    })
    .await
    .unwrap();

    bed.service("web-v2", "web-v2").await;
    bed.route_condition("web", "ResolvedRefs", "True").await;

    // Change the Route: every proxy that needs it acknowledges the new generation.
    bed.route(
        "web",
        json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}], "timeout": "5s"}]}),
    )
    .await;
    bed.route_programmed("web", 2).await;
    let services = client.services();
    let web_cfg = services.iter().find(|(n, _, _)| *n == web_svc).unwrap();
    assert_eq!(
        web_cfg.2.as_deref(),
        Some("5s"),
        "the Route's timeout reached the proxy"
    );
    assert!(web.status.borrow().acked.is_some());

    // An endpoint that stops being ready leaves the proxies' config, sent as an endpoint
    // delta: fewer bytes than the service it changes.
    let client_key = ObjectKey::new(ns.clone(), "client");
    let bytes_before = op.handles.registry.snapshot()[&client_key].bytes_sent;
    let not_ready = json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}});
    bed.api::<Pod>()
        .patch_status("web-0", &PatchParams::default(), &Patch::Merge(&not_ready))
        .await
        .unwrap();
    eventually(WAIT, || async {
        let services = client.services();
        let found = services.iter().find(|(n, _, _)| *n == web_svc).unwrap();
        ensure!(
            found.1 == vec!["198.18.240.11:8080"],
            "endpoints {:?}",
            found.1
        );
        Ok(())
    })
    .await
    .unwrap();
    let delta = op.handles.registry.snapshot()[&client_key].bytes_sent - bytes_before;
    let service = client.proxy.store.load().unwrap();
    let service = service.raw.services.iter().find(|s| s.name == web_svc);
    let whole_service = serde_json::to_vec(&service).unwrap().len() as u64;
    assert!(
        delta < whole_service,
        "{delta} bytes sent for an endpoint change; the changed service alone is {whole_service}"
    );

    // The operator reports both proxies in sync.
    let rows = mesh::proxy_rows(&op.handles).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().all(|r| r.connected), "{rows:?}");

    // The admin endpoints: health, readiness (the index is synced), metrics, proxies.
    assert_eq!(http_get(op.admin, "/healthz").await.unwrap().0, 200);
    assert_eq!(http_get(op.admin, "/readyz").await.unwrap().0, 200);
    let (status, metrics) = http_get(op.admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    for needle in [
        "weft_operator_subscribers 2",
        "weft_operator_index_objects{kind=\"Pod\"} 3",
        "weft_operator_index_objects{kind=\"Route\"} 1",
        "weft_operator_updates_pushed_total",
        "weft_operator_push_bytes_total",
        "weft_operator_nacks_total 0",
        "weft_operator_change_to_ack_seconds_count",
    ] {
        assert!(metrics.contains(needle), "no {needle:?} in\n{metrics}");
    }
    let (_, proxies) = http_get(op.admin, "/proxies").await.unwrap();
    let proxies: serde_json::Value = serde_json::from_str(&proxies).unwrap();
    assert_eq!(proxies.as_array().unwrap().len(), 2, "{proxies}");
    assert!(
        proxies
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["inSync"] == true),
        "{proxies}"
    );

    op.stop().await;
    bed.cleanup().await;
}

#[tokio::test]
async fn programmed_is_true_only_for_what_the_proxies_enforce() {
    let bed = Bed::new("push-enforce").await;
    let ns = bed.ns.clone();
    bed.service_account("client").await;
    // The Services the examples govern and route to: a Route or Breaker whose own Service
    // does not exist is not accepted.
    for (name, port) in [
        ("reviews", 9080),
        ("reviews-v1", 9080),
        ("reviews-v2", 9080),
        ("frontend", 8080),
        ("frontend-v1", 8080),
        ("frontend-v2", 8080),
        ("legacy-db-proxy", 8080),
    ] {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": port}]}
        }))
        .unwrap();
        bed.api::<Service>()
            .create(&Default::default(), &svc)
            .await
            .unwrap();
    }
    let pod = bed.pod("client", "client", "client", "198.18.240.50").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let op = Operator::start(&bed, listener).await;
    let proxy = TestProxy::start(&bed, &addr, &pod, None).await;
    proxy.acked().await;

    // A plain 90/10 split with a timeout.
    let canary = bed.apply_example::<Route>("route-canary.yaml").await;
    let msg = bed.route_programmed(&canary, 1).await;
    assert!(msg.ends_with("and enforced by all"), "{msg}");
    let reviews = format!("reviews.{ns}.9080");
    assert_eq!(
        proxy
            .services()
            .iter()
            .find(|(n, _, _)| *n == reviews)
            .and_then(|s| s.2.clone())
            .as_deref(),
        Some("5s"),
        "the split's timeout reached the proxy"
    );

    // Matches, faults, rewrites, header edits and mirrors are enforced too.
    let frontend = bed.apply_example::<Route>("route-header-match.yaml").await;
    let msg = bed.route_programmed(&frontend, 1).await;
    assert!(msg.ends_with("and enforced by all"), "{msg}");
    // So is a Breaker.
    let breaker = bed.apply_example::<Breaker>("breaker-pool.yaml").await;
    let (_, msg) = bed
        .condition::<Breaker>(&breaker, "Programmed", "True")
        .await;
    assert!(msg.ends_with("and enforced by all"), "{msg}");

    // A Policy's mTLS mode is not enforced yet: acknowledged, not enforced, and named.
    let policy: Policy = serde_json::from_value(json!({
        "metadata": {"name": "client-strict"},
        "spec": {"target": {"selector": {"matchLabels": {"app": "client"}}},
                 "mtls": {"mode": "Strict"}, "defaultAction": "Allow",
                 "rateLimit": {"requestsPerSecond": 100}}
    }))
    .unwrap();
    bed.api::<Policy>()
        .create(&Default::default(), &policy)
        .await
        .unwrap();
    let (reason, msg) = bed
        .condition::<Policy>("client-strict", "Programmed", "False")
        .await;
    assert_eq!(reason, "NotEnforced", "{msg}");
    assert!(
        msg.contains("acknowledged by 1 of 1 proxies; enforced by 0 of 1"),
        "{msg}"
    );
    assert!(
        msg.contains(&format!(
            "spec.mtls.mode: not enforced by weft-proxy {} (1 proxy: {ns}/client)",
            env!("CARGO_PKG_VERSION")
        )),
        "{msg}"
    );
    // Accepted stays True: the Policy is valid, it is only not applied in full.
    bed.condition::<Policy>("client-strict", "Accepted", "True")
        .await;

    // The Routes are still programmed: one resource's gap is not another's.
    bed.route_programmed(&canary, 1).await;
    op.stop().await;
    bed.cleanup().await;
}

#[tokio::test]
async fn two_conflicting_routes_are_both_told_and_the_older_wins() {
    let bed = Bed::new("push-conflict").await;
    bed.service("web", "web").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let op = Operator::start(&bed, listener).await;
    bed.route(
        "first",
        json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}]}]}),
    )
    .await;
    // Creation timestamps have one-second resolution: make "first" clearly older.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    bed.route(
        "second",
        json!({"service": {"name": "web", "port": 80}, "rules": [{"backends": [{"name": "web"}]}]}),
    )
    .await;
    let loser = bed.route_condition("second", "Accepted", "False").await;
    assert!(loser.contains("Route first"), "{loser}");
    let winner = bed.route_condition("first", "Accepted", "True").await;
    assert!(winner.contains("second"), "{winner}");
    let routes = bed.api::<Route>();
    let second = routes.get("second").await.unwrap();
    let reason = second
        .status
        .unwrap()
        .conditions
        .0
        .into_iter()
        .find(|c| c.type_ == "Accepted")
        .unwrap()
        .reason;
    assert_eq!(reason, "Conflicted");

    // Once the winner is gone, the other Route is accepted.
    routes
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    bed.route_condition("second", "Accepted", "True").await;
    op.stop().await;
    bed.cleanup().await;
}

#[tokio::test]
async fn a_rejected_config_shows_in_status_and_the_proxy_keeps_its_last_good_version() {
    rejected_config_flow("push-nack", None).await;
}

/// The same flow as above, with the config stream over TLS from a mesh root (an operator
/// with identity): ACK, NACK, status and recovery do not depend on the transport.
#[tokio::test]
async fn over_tls_from_the_mesh_root_acks_nacks_and_status_flow_the_same() {
    rejected_config_flow("push-nack-tls", Some(PushTls::generate())).await;
}

async fn rejected_config_flow(prefix: &str, tls: Option<PushTls>) {
    let bed = Bed::new(prefix).await;
    let ns = bed.ns.clone();
    bed.service_account("client").await;
    bed.service("web", "web").await;
    let pod = bed.pod("client", "client", "client", "198.18.240.30").await;
    bed.route(
        "web",
        json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}]}]}),
    )
    .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server_tls = tls.as_ref().map(|t| t.server.clone());
    let op = Operator::start_with(&bed, listener, "op-nack", |s| s.push_tls = server_tls).await;
    // This proxy accepts one service at most.
    let client_tls = tls.as_ref().map(|t| t.client(PUSH_SERVER_NAME));
    let proxy = TestProxy::start_tls(&bed, &addr, &pod, Some(1), client_tls).await;
    let good = proxy.acked().await;
    bed.route_programmed("web", 1).await;

    // A second Service and a new Route generation: the config now has two services.
    bed.service("api", "api").await;
    bed.route(
        "web",
        json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}], "timeout": "2s"}]}),
    )
    .await;
    let msg = bed.route_condition("web", "Programmed", "False").await;
    assert!(msg.contains(&format!("{ns}/client")), "{msg}");
    assert!(msg.contains("at most 1"), "{msg}");
    let routes = bed.api::<Route>();
    let programmed = routes
        .get("web")
        .await
        .unwrap()
        .status
        .unwrap()
        .conditions
        .0
        .into_iter()
        .find(|c| c.type_ == "Programmed")
        .unwrap();
    assert_eq!(programmed.reason, "Rejected");
    // The proxy still runs its last good version.
    let active = proxy.proxy.store.load().unwrap();
    assert_eq!(active.version, good.to_string());
    assert_eq!(active.raw.services.len(), 1);
    let rows = mesh::proxy_rows(&op.handles).await;
    assert!(!rows[0].in_sync && rows[0].rejected.is_some(), "{rows:?}");

    // Remove the extra Service: the next version fits and is acknowledged.
    bed.api::<Service>()
        .delete("api", &DeleteParams::default())
        .await
        .unwrap();
    bed.route_programmed("web", 1).await;
    assert_eq!(proxy.services()[0].2.as_deref(), Some("2s"));
    op.stop().await;
    bed.cleanup().await;
}

#[tokio::test]
async fn a_subscriber_with_a_token_for_another_service_account_is_refused() {
    let bed = Bed::new("push-auth").await;
    for sa in ["a", "b"] {
        bed.service_account(sa).await;
    }
    let pod_a = bed.pod("pod-a", "a", "a", "198.18.240.40").await;
    let pod_b = bed.pod("pod-b", "b", "b", "198.18.240.41").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let op = Operator::start(&bed, listener).await;
    // Pod a presents pod b's token.
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), bed.token(&pod_b).await).unwrap();
    let proxy = Proxy::new();
    let mut config = ControlConfig::new(&addr, format!("{}/{}", bed.ns, pod_a.name_any()));
    config.token_file = Some(token.path().to_owned());
    let client = ControlClient::new(config, proxy.store.clone());
    let status = client.status();
    let stop = CancellationToken::new();
    tokio::spawn(client.run(stop.clone()));
    // The genuine pod b gets its config meanwhile.
    let b = TestProxy::start(&bed, &addr, &pod_b, None).await;
    eventually(WAIT, || async {
        ensure!(b.status.borrow().acked.is_some(), "pod b has no config yet");
        Ok(())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(status.borrow().connects, 0, "pod a was never subscribed");
    assert!(proxy.store.load().is_none(), "pod a got no config");
    stop.cancel();
    op.stop().await;
    bed.cleanup().await;
}

#[tokio::test]
async fn two_replicas_serve_proxies_one_writes_status_counting_both_and_the_other_takes_over() {
    let bed = Bed::new("push-ha").await;
    bed.service_account("client").await;
    bed.service("web", "web").await;
    bed.route(
        "web",
        json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}]}]}),
    )
    .await;
    let mut replicas = Vec::new();
    let mut proxies = Vec::new();
    for (i, name) in ["replica-a", "replica-b"].into_iter().enumerate() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        replicas.push((name, Operator::start_as(&bed, listener, name).await));
        let pod = bed
            .pod(
                &format!("client-{i}"),
                "client",
                "client",
                &format!("198.18.240.8{i}"),
            )
            .await;
        // One proxy streams from each replica.
        let proxy = TestProxy::start(&bed, &addr, &pod, None).await;
        proxy.acked().await;
        proxies.push(proxy);
    }
    // Whichever replica writes status counts the proxy streaming from the other one.
    bed.route_programmed("web", 2).await;
    let leases = bed.api::<Lease>();
    let holder_of = || async {
        leases
            .get("weft-operator")
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
    };
    let holder = holder_of().await.unwrap();
    assert!(
        ["replica-a", "replica-b"].contains(&holder.as_str()),
        "{holder}"
    );
    // Each replica's /proxies shows both proxies in sync.
    for (name, op) in &replicas {
        eventually(WAIT, || async {
            let rows = mesh::proxy_rows(&op.handles).await;
            ensure!(
                rows.len() == 2 && rows.iter().all(|r| r.in_sync),
                "{name}: {rows:?}"
            );
            Ok(())
        })
        .await
        .unwrap();
    }
    let reports = bed
        .api::<ConfigMap>()
        .list(&ListParams::default().labels(reports::REPORT_LABEL))
        .await
        .unwrap();
    assert_eq!(reports.items.len(), 2, "one ACK report per replica");

    // A new generation is programmed on both proxies.
    bed.route(
        "web",
        json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}], "timeout": "4s"}]}),
    )
    .await;
    bed.route_programmed("web", 2).await;

    // The status writer shuts down: it steps down and removes its report; its proxy keeps
    // its config but has no operator to talk to. The other replica takes the Lease and
    // writes the next generation's status, counting the one proxy still connected.
    let i = replicas.iter().position(|(n, _)| *n == holder).unwrap();
    let (_, leader) = replicas.remove(i);
    leader.stop().await;
    bed.route(
        "web",
        json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}], "timeout": "5s"}]}),
    )
    .await;
    bed.route_programmed("web", 1).await;
    let (survivor, op) = replicas.pop().unwrap();
    assert_eq!(holder_of().await.as_deref(), Some(survivor));
    let names: Vec<String> = bed
        .api::<ConfigMap>()
        .list(&ListParams::default().labels(reports::REPORT_LABEL))
        .await
        .unwrap()
        .items
        .iter()
        .map(|c| c.name_any())
        .collect();
    assert_eq!(names, vec![reports::report_name(survivor)]);
    assert_eq!(
        proxies[i].services()[0].2.as_deref(),
        Some("4s"),
        "the orphaned proxy keeps its last config"
    );
    assert_eq!(proxies[1 - i].services()[0].2.as_deref(), Some("5s"));
    drop(proxies);
    op.stop().await;
    bed.cleanup().await;
}

/// One status write the test saw: which object, at which generation, and its `Programmed`
/// condition.
#[derive(Debug, Clone)]
struct Written {
    kind: &'static str,
    name: String,
    generation: i64,
    status: String,
    reason: String,
    message: String,
    /// Whether each of the test's proxies held the resource when the write was seen.
    held_by_all: bool,
}

/// Whether every test proxy holds the resource of this kind and name right now.
type Held = std::sync::Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// Records the `Programmed` condition of every write to `K` objects in the bed's namespace
/// until `stop`; `held` says whether every proxy holds the named object right now.
fn record_programmed<K>(
    bed: &Bed,
    kind: &'static str,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Written>>>,
    held: Held,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let api = bed.api::<K>();
    tokio::spawn(async move {
        // Every write is an event: the watch does not coalesce them.
        let stream = watcher::watcher(api, watcher::Config::default()).applied_objects();
        futures::pin_mut!(stream);
        loop {
            let object = tokio::select! {
                () = stop.cancelled() => return,
                o = stream.next() => match o {
                    Some(Ok(o)) => o,
                    Some(Err(e)) => panic!("watching {kind}: {e}"),
                    None => return,
                },
            };
            let name = object.meta().name.clone().unwrap_or_default();
            let held_now = held(kind, &name);
            let v = serde_json::to_value(&object).unwrap();
            let Some(c) = v["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Programmed"))
            else {
                continue;
            };
            let text = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            seen.lock().unwrap().push(Written {
                kind,
                name,
                generation: c["observedGeneration"].as_i64().unwrap_or(-1),
                status: text("status"),
                reason: text("reason"),
                message: text("message"),
                held_by_all: held_now,
            });
        }
    })
}

/// Waits until the `K` named `name` is `Programmed=True` for its current generation with a
/// message containing `want`.
async fn programmed_by<K>(bed: &Bed, name: &str, want: &str)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned,
{
    let api = bed.api::<K>();
    eventually(WAIT, || {
        let api = api.clone();
        async move {
            let object = serde_json::to_value(api.get(name).await?)?;
            let generation = &object["metadata"]["generation"];
            let c = object["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Programmed"))
                .ok_or_else(|| anyhow!("no Programmed condition in {}", object["status"]))?;
            ensure!(
                c["observedGeneration"] == *generation
                    && c["status"] == "True"
                    && c["message"].as_str().is_some_and(|m| m.contains(want)),
                "{name}: {c} (generation {generation})"
            );
            Ok(())
        }
    })
    .await
    .unwrap();
}

/// The bug the node tests found: right after a Route, Breaker or Policy was created, its
/// `Programmed` read True ("no connected proxy needs this Route", or "acknowledged by 1 of
/// 1 proxies" where four proxies needed it) before the proxies had it. Here four proxies
/// need every resource, one streaming from the status writer and three from the other
/// replica, and every `Programmed` the operator ever writes is recorded: none may be True
/// before all four acknowledged and enforce the resource, and none may count fewer than
/// the four proxies that need it. A resource no connected proxy needs is not Programmed.
#[tokio::test]
async fn programmed_is_never_true_before_every_proxy_that_needs_a_new_resource_has_it() {
    let bed = Bed::new("push-programmed").await;
    let ns = bed.ns.clone();
    bed.service_account("client").await;
    bed.service("web", "web").await;
    bed.service("api", "api").await;

    // Replica a writes status (it takes the Lease before replica b starts).
    let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr_a = la.local_addr().unwrap().to_string();
    let a = Operator::start_as(&bed, la, "replica-a").await;
    let leases = bed.api::<Lease>();
    eventually(WAIT, || async {
        let holder = leases
            .get_opt("weft-operator")
            .await?
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity);
        ensure!(holder.as_deref() == Some("replica-a"), "holder {holder:?}");
        Ok(())
    })
    .await
    .unwrap();
    let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr_b = lb.local_addr().unwrap().to_string();
    let b = Operator::start_as(&bed, lb, "replica-b").await;

    bed.route(
        "early",
        json!({"service": {"name": "api"}, "rules": [{"backends": [{"name": "api"}]}]}),
    )
    .await;

    // Four meshed client pods: one proxy streams from the writer, three from the other.
    let mut proxies = Vec::new();
    for i in 0..4 {
        let pod = bed
            .pod(
                &format!("client-{i}"),
                "client",
                "client",
                &format!("198.18.240.6{i}"),
            )
            .await;
        let addr = if i == 0 { &addr_a } else { &addr_b };
        let proxy = TestProxy::start(&bed, addr, &pod, None).await;
        proxy.acked().await;
        proxies.push(proxy);
    }
    // The early Route is programmed on all four once they are connected.
    bed.route_programmed("early", 4).await;

    // What each proxy holds, looked at when a status write is seen.
    let stores: Vec<_> = proxies.iter().map(|p| p.proxy.store.clone()).collect();
    let web = format!("web.{ns}.80");
    let held: Held = std::sync::Arc::new(move |kind: &str, name: &str| {
        stores.iter().all(|store| {
            let Some(active) = store.load() else {
                return false;
            };
            let raw = &active.raw;
            let svc = raw.services.iter().find(|s| s.name == web);
            match (kind, name) {
                ("Route", "web") => svc.is_some_and(|s| s.route.is_some()),
                ("Breaker", "web") => svc.is_some_and(|s| s.breaker.is_some()),
                ("Policy", _) => raw.inbound.as_ref().is_some_and(|i| i.rate_limit.is_some()),
                _ => true,
            }
        })
    });
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let watchers = vec![
        record_programmed::<Route>(&bed, "Route", seen.clone(), held.clone(), stop.clone()),
        record_programmed::<Breaker>(&bed, "Breaker", seen.clone(), held.clone(), stop.clone()),
        record_programmed::<Policy>(&bed, "Policy", seen.clone(), held.clone(), stop.clone()),
    ];
    // Let the watches start before anything is created.
    tokio::time::sleep(Duration::from_secs(1)).await;

    bed.route(
        "web",
        json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}], "timeout": "3s"}]}),
    )
    .await;
    let breaker: Breaker = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"service": {"name": "web"}, "connectionPool": {"maxConnections": 50}}
    }))
    .unwrap();
    bed.api::<Breaker>()
        .create(&Default::default(), &breaker)
        .await
        .unwrap();
    // Plain text and allow-all: the rate limit is what this Policy asks of the proxies.
    let policy: Policy = serde_json::from_value(json!({
        "metadata": {"name": "client-limit"},
        "spec": {"target": {"selector": {"matchLabels": {"app": "client"}}},
                 "mtls": {"mode": "Disabled"}, "defaultAction": "Allow",
                 "rateLimit": {"requestsPerSecond": 100}}
    }))
    .unwrap();
    bed.api::<Policy>()
        .create(&Default::default(), &policy)
        .await
        .unwrap();

    let all = "acknowledged by 4 of 4 proxies, and enforced by all";
    bed.route_programmed("web", 4).await;
    programmed_by::<Breaker>(&bed, "web", all).await;
    programmed_by::<Policy>(&bed, "client-limit", all).await;
    // Writes after the last True would be seen late otherwise.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    for w in watchers {
        w.await.unwrap();
    }

    let seen = seen.lock().unwrap().clone();
    let ours: Vec<&Written> = seen
        .iter()
        .filter(|w| {
            matches!(
                (w.kind, w.name.as_str()),
                ("Route", "web") | ("Breaker", "web") | ("Policy", "client-limit")
            )
        })
        .collect();
    let dump = || {
        ours.iter()
            .map(|w| format!("{w:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    tracing::info!(writes = %dump(), "every Programmed written");
    for (kind, name) in [
        ("Route", "web"),
        ("Breaker", "web"),
        ("Policy", "client-limit"),
    ] {
        assert!(
            ours.iter()
                .any(|w| w.kind == kind && w.name == name && w.status == "True"),
            "{kind} {name} never written Programmed=True:\n{}",
            dump()
        );
    }
    for w in &ours {
        // Never a count of fewer proxies than need the resource.
        if let Some(rest) = w.message.split(" of ").nth(1) {
            assert!(
                rest.starts_with("4 proxies"),
                "a write counted fewer than the 4 proxies that need it: {w:?}\nall writes:\n{}",
                dump()
            );
        }
        assert_eq!(w.generation, 1, "a new resource's first generation: {w:?}");
        if w.status == "True" {
            assert!(
                w.message.contains(all) && w.reason == "Programmed",
                "Programmed=True before every proxy acknowledged: {w:?}\nall writes:\n{}",
                dump()
            );
            assert!(
                w.held_by_all,
                "Programmed=True while a proxy did not hold the resource: {w:?}\nall writes:\n{}",
                dump()
            );
        }
    }

    // A Policy that selects no pod is needed by no proxy: that is not a success.
    let nobody: Policy = serde_json::from_value(json!({
        "metadata": {"name": "nobody"},
        "spec": {"target": {"selector": {"matchLabels": {"app": "none"}}},
                 "mtls": {"mode": "Disabled"}, "defaultAction": "Allow"}
    }))
    .unwrap();
    bed.api::<Policy>()
        .create(&Default::default(), &nobody)
        .await
        .unwrap();
    let (reason, msg) = bed
        .condition::<Policy>("nobody", "Programmed", "False")
        .await;
    assert_eq!(reason, "NoProxies", "{msg}");
    assert!(
        msg.starts_with("no connected proxy needs this Policy, so nothing enforces it yet"),
        "{msg}"
    );

    drop(proxies);
    b.stop().await;
    a.stop().await;
    bed.cleanup().await;
}
