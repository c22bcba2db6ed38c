//! Traffic policy end to end: a `weft-operator` process and `weft-proxy` processes against
//! the test bed's real API server, carrying HTTP traffic to backends on test hosts. A
//! Route's split, a Breaker's pool limit and a Policy's rate limit change what the proxies
//! do within moments of `apply`, are `Programmed` on every proxy that needs them, and
//! deleting them restores the traffic as it was. Conflicts and a missing Service show in
//! `Accepted`.
//!
//! The proxies are started with `--forward` listeners (no interception), and the
//! rate-limited pod's proxy with an `--inbound-forward` listener to its application: the
//! rate-limit test sends the pod's inbound requests through it.
//!
//! Needs the `weft-proxy` binary: `cargo build -p weft-proxy` first when testing this
//! package alone.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::ensure;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;
use support::{mesh::*, processes::*};
use weft_crds::{Breaker, Policy, Route};
use weft_e2e::shared::eventually;

/// How soon after `apply` (or delete) the proxies must act on a change.
const PROMPTLY: Duration = Duration::from_secs(1);

/// The operator process and a temporary directory for logs and tokens.
struct Rig {
    bed: Bed,
    dir: tempfile::TempDir,
    push: SocketAddr,
    operator: Proc,
}

impl Rig {
    async fn new(prefix: &str) -> Rig {
        let bed = Bed::new(prefix).await;
        let dir = tempfile::tempdir().unwrap();
        let (push, admin) = (free_addr(), free_addr());
        let operator = start_operator(&bed, push, admin, dir.path(), 1);
        Rig {
            bed,
            dir,
            push,
            operator,
        }
    }

    /// A meshed pod (labels `app: <app>`) and its proxy, forwarding to Service `service`,
    /// once the proxy answers through it with `expect`.
    async fn proxy(
        &self,
        pod: &str,
        app: &str,
        ip: &str,
        service: &str,
        expect: &str,
    ) -> ProxyProc {
        self.proxy_with_app(pod, app, ip, service, expect, None)
            .await
    }

    /// Like [`Rig::proxy`], with an inbound listener to `local` (the pod's application).
    async fn proxy_with_app(
        &self,
        pod: &str,
        app: &str,
        ip: &str,
        service: &str,
        expect: &str,
        local: Option<SocketAddr>,
    ) -> ProxyProc {
        self.bed.service_account(pod).await;
        let pod = self.bed.pod(pod, pod, app, ip).await;
        let config = format!("{service}.{}.80", self.bed.ns);
        let p =
            ProxyProc::start_with_app(&self.bed, self.push, &pod, &config, self.dir.path(), local)
                .await;
        p.until_answered(expect, &self.operator).await;
        p
    }

    async fn done(self) {
        drop(self.operator);
        self.bed.cleanup().await;
    }
}

/// `n` requests through `forward`, one after the other, counted by answer (the body of a
/// 200, else the status and its `weft-error`).
async fn tally(forward: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let key = match http_request(forward, "/").await {
            Ok(r) if r.status == 200 => r.body,
            Ok(r) => format!("{} {}", r.status, r.header("weft-error").unwrap_or("")),
            Err(e) => format!("error {e:#}"),
        };
        *out.entry(key).or_default() += 1;
    }
    out
}

/// `n` requests through `forward` at once.
async fn concurrently(forward: SocketAddr, n: usize) -> Vec<Reply> {
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(async move { http_request(forward, "/").await }))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        if let Ok(Ok(r)) = t.await {
            out.push(r);
        }
    }
    out
}

/// What is left of [`PROMPTLY`] since `since`.
fn left(since: Instant) -> Duration {
    PROMPTLY.saturating_sub(since.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_split_moves_traffic_within_a_second_and_deleting_it_restores_it() {
    let rig = Rig::new("traffic-split").await;
    let (a, _host_a) = backend_answering("a", Duration::ZERO).await;
    let (b, _host_b) = backend_answering("b", Duration::ZERO).await;
    service_to(&rig.bed, "web", a).await;
    service_to(&rig.bed, "web-b", b).await;
    let mut proxies = Vec::new();
    for i in 0..2 {
        let ip = format!("198.18.240.8{i}");
        proxies.push(
            rig.proxy(&format!("client-{i}"), "client", &ip, "web", "a")
                .await,
        );
    }

    rig.bed
        .route(
            "web",
            json!({"service": {"name": "web"}, "rules": [{"backends": [
                {"name": "web", "weight": 50}, {"name": "web-b", "weight": 50}]}]}),
        )
        .await;
    let applied = Instant::now();
    for p in &proxies {
        eventually(left(applied), || async {
            let (status, body) = http_get(p.forward, "/").await?;
            ensure!(status == 200 && body == "b", "{status} {body}");
            Ok(())
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "no request reached the new backend within {PROMPTLY:?} of apply: {e:#}\n{}\n{}",
                p.proc.log_tail(),
                rig.operator.log_tail()
            )
        });
    }
    for p in &proxies {
        let counts = tally(p.forward, 200).await;
        for backend in ["a", "b"] {
            let n = counts.get(backend).copied().unwrap_or(0);
            assert!(
                (80..=120).contains(&n),
                "a 50/50 split sent {n} of 200 to {backend}: {counts:?}"
            );
        }
    }
    let msg = rig.bed.route_programmed("web", 2).await;
    assert!(msg.contains("2 of 2"), "{msg}");

    rig.bed
        .api::<Route>()
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    let deleted = Instant::now();
    for p in &proxies {
        eventually(left(deleted), || async {
            let counts = tally(p.forward, 10).await;
            ensure!(counts.get("a") == Some(&10), "{counts:?}");
            Ok(())
        })
        .await
        .unwrap_or_else(|e| panic!("the split outlived its Route: {e:#}"));
        let counts = tally(p.forward, 200).await;
        assert_eq!(counts.get("a"), Some(&200), "{counts:?}");
    }
    drop(proxies);
    rig.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_route_for_the_service_is_conflicted_and_one_for_a_missing_service_is_not_accepted()
 {
    let rig = Rig::new("traffic-conflict").await;
    let (a, _host) = backend().await;
    service_to(&rig.bed, "web", a).await;
    let spec = json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}]}]});
    rig.bed.route("first", spec.clone()).await;
    // Creation timestamps have one-second resolution: make "first" clearly older.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    rig.bed.route("second", spec).await;
    let (reason, msg) = rig
        .bed
        .condition::<Route>("second", "Accepted", "False")
        .await;
    assert_eq!(reason, "Conflicted", "{msg}");
    assert!(msg.contains("Route first"), "{msg}");
    let (_, msg) = rig
        .bed
        .condition::<Route>("first", "Accepted", "True")
        .await;
    assert!(msg.contains("second"), "{msg}");

    rig.bed
        .route(
            "orphan",
            json!({"service": {"name": "nope"}, "rules": [{"backends": [{"name": "web"}]}]}),
        )
        .await;
    let (reason, msg) = rig
        .bed
        .condition::<Route>("orphan", "Accepted", "False")
        .await;
    assert_eq!(reason, "ServiceNotFound", "{msg}");
    assert!(msg.contains("nope"), "{msg}");

    // The winner goes: the other takes over.
    rig.bed
        .api::<Route>()
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    rig.bed
        .condition::<Route>("second", "Accepted", "True")
        .await;
    rig.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_deleted_and_recreated_under_its_name_gets_its_own_status_at_once() {
    let rig = Rig::new("traffic-recreate").await;
    let spec = json!({"service": {"name": "nope"}, "rules": [{"backends": [{"name": "nope"}]}]});
    rig.bed.route("orphan", spec.clone()).await;
    let (reason, _) = rig
        .bed
        .condition::<Route>("orphan", "Accepted", "False")
        .await;
    assert_eq!(reason, "ServiceNotFound");
    let routes = rig.bed.api::<Route>();
    let old = routes.get("orphan").await.unwrap().metadata.uid;

    // Back to back: the new object computes to the same conditions at the same generation.
    routes
        .delete("orphan", &DeleteParams::default())
        .await
        .unwrap();
    rig.bed.route("orphan", spec).await;
    let new = routes.get("orphan").await.unwrap().metadata.uid;
    assert_ne!(old, new, "a new object");
    let seen = eventually(Duration::from_secs(5), || {
        let routes = routes.clone();
        let new = new.clone();
        async move {
            let r = routes.get("orphan").await?;
            ensure!(r.metadata.uid == new, "uid {:?}", r.metadata.uid);
            let st = r.status.clone().unwrap_or_default();
            let accepted = st.conditions.0.iter().find(|c| c.type_ == "Accepted");
            ensure!(
                accepted.is_some_and(|c| c.status == "False" && c.reason == "ServiceNotFound"),
                "status of the re-created Route: {st:?}"
            );
            Ok(st.observed_generation)
        }
    })
    .await;
    if seen.is_err() {
        eprintln!("operator log:\n{}", rig.operator.log_tail());
    }
    assert_eq!(seen.unwrap(), Some(1));
    rig.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_pool_limit_answers_overloaded_under_concurrency_until_it_is_deleted() {
    let rig = Rig::new("traffic-breaker").await;
    // Each request is held for half a second, so concurrent ones overlap.
    let (slow, _host) = backend_answering("slow", Duration::from_millis(500)).await;
    service_to(&rig.bed, "web", slow).await;
    let p = rig
        .proxy("client-0", "client", "198.18.240.90", "web", "slow")
        .await;

    let breaker: Breaker = serde_json::from_value(json!({
        "metadata": {"name": "pool"},
        "spec": {"service": {"name": "web"}, "connectionPool": {"maxRequests": 1, "maxPendingRequests": 0}}
    }))
    .unwrap();
    rig.bed
        .api::<Breaker>()
        .patch(
            "pool",
            &PatchParams::apply("weft-test").force(),
            &Patch::Apply(&breaker),
        )
        .await
        .unwrap();
    eventually(WAIT, || async {
        let replies = concurrently(p.forward, 8).await;
        let ok = replies.iter().filter(|r| r.status == 200).count();
        let overloaded = replies
            .iter()
            .filter(|r| r.status == 503 && r.header("weft-error") == Some("overloaded"))
            .count();
        ensure!(
            ok >= 1 && overloaded >= 1 && ok + overloaded == 8,
            "{ok} ok, {overloaded} overloaded: {replies:?}"
        );
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", p.proc.log_tail()));
    let (_, msg) = rig
        .bed
        .condition::<Breaker>("pool", "Programmed", "True")
        .await;
    assert!(msg.contains("1 of 1 proxies, and enforced by all"), "{msg}");

    rig.bed
        .api::<Breaker>()
        .delete("pool", &DeleteParams::default())
        .await
        .unwrap();
    eventually(WAIT, || async {
        let replies = concurrently(p.forward, 8).await;
        ensure!(
            replies.len() == 8 && replies.iter().all(|r| r.status == 200),
            "{replies:?}"
        );
        Ok(())
    })
    .await
    .unwrap();
    drop(p);
    rig.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_answers_429_on_the_pods_it_targets_until_it_is_deleted() {
    let rig = Rig::new("traffic-limit").await;
    let (a, _host) = backend().await;
    service_to(&rig.bed, "web", a).await;
    let limited = rig
        .proxy_with_app("web-0", "web", "198.18.240.95", "web", "hello", Some(a))
        .await;
    let limited_inbound = limited.inbound.unwrap();
    let other = rig
        .proxy("client-0", "client", "198.18.240.96", "web", "hello")
        .await;

    // Plain text and allow-all, so the rate limit is all this Policy enforces.
    let policy: Policy = serde_json::from_value(json!({
        "metadata": {"name": "limit"},
        "spec": {"target": {"selector": {"matchLabels": {"app": "web"}}},
                 "mtls": {"mode": "Disabled"}, "defaultAction": "Allow",
                 "rateLimit": {"requestsPerSecond": 1, "burst": 2}}
    }))
    .unwrap();
    rig.bed
        .api::<Policy>()
        .patch(
            "limit",
            &PatchParams::apply("weft-test").force(),
            &Patch::Apply(&policy),
        )
        .await
        .unwrap();
    eventually(WAIT, || async {
        let mut limited_replies = Vec::new();
        for _ in 0..6 {
            limited_replies.push(http_request(limited_inbound, "/").await?);
        }
        let refused: Vec<&Reply> = limited_replies.iter().filter(|r| r.status == 429).collect();
        ensure!(!refused.is_empty(), "nothing refused: {limited_replies:?}");
        ensure!(
            refused.iter().all(|r| r.header("retry-after").is_some()),
            "a 429 without Retry-After: {refused:?}"
        );
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", limited.proc.log_tail()));
    // The pod's outbound traffic, and the pod the Policy does not target, are not limited.
    let counts = tally(limited.forward, 6).await;
    assert_eq!(counts.get("hello"), Some(&6), "{counts:?}");
    let counts = tally(other.forward, 6).await;
    assert_eq!(counts.get("hello"), Some(&6), "{counts:?}");
    let (_, msg) = rig
        .bed
        .condition::<Policy>("limit", "Programmed", "True")
        .await;
    assert!(msg.contains("1 of 1 proxies, and enforced by all"), "{msg}");

    rig.bed
        .api::<Policy>()
        .delete("limit", &DeleteParams::default())
        .await
        .unwrap();
    eventually(WAIT, || async {
        let counts = tally(limited_inbound, 6).await;
        ensure!(counts.get("hello") == Some(&6), "{counts:?}");
        Ok(())
    })
    .await
    .unwrap();
    drop((limited, other));
    rig.done().await;
}
