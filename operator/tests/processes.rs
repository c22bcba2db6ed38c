//! The mesh as separate processes against the test bed's real API server: a `weft-operator`
//! process, two `weft-proxy` processes subscribed to it with real projected-style tokens,
//! carrying HTTP traffic to a backend on a test host, and `kubectl weft proxy-status`.
//!
//! The operator is killed with SIGKILL while the proxies carry traffic: no request may fail,
//! and after a restart both proxies resync to a change made while it was down.
//!
//! `weft-proxy` and `kubectl-weft` are other packages' binaries, found next to this test's
//! own directory in the target dir: `cargo test --workspace` builds them (run
//! `cargo build -p weft-proxy -p kubectl-weft` first when testing this package alone).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::{Context, ensure};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{Resource, api::PostParams};
use serde_json::json;
use support::{mesh::*, processes::*};
use tokio_util::sync::CancellationToken;
use weft_e2e::shared::{self, eventually};

/// The Route timeout of `service` in a proxy's active config (its Route's catch-all rule's),
/// read from its admin `/config`.
async fn proxy_timeout(admin: SocketAddr, service: &str) -> anyhow::Result<Option<String>> {
    let (status, body) = http_get(admin, "/config").await?;
    ensure!(status == 200, "/config answered {status}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let svc = v["config"]["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == service))
        .with_context(|| format!("no {service} in {body}"))?;
    let rule = svc["route"]["rules"]
        .as_array()
        .and_then(|r| r.last())
        .unwrap_or(&serde_json::Value::Null);
    Ok(rule["timeout"]
        .as_str()
        .or(svc["timeout"].as_str())
        .map(str::to_owned))
}

fn proxy_status(ns: &str, admin: SocketAddr) -> String {
    let out = Command::new(sibling_binary("kubectl-weft"))
        .env("KUBECONFIG", shared::testbed().kubeconfig())
        .args(["proxy-status", "-n", ns, "--operator-url"])
        .arg(format!("http://{admin}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl weft proxy-status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_processes_lose_no_request_while_the_operator_process_is_killed_and_restarted() {
    let bed = Bed::new("proc-restart").await;
    let ns = bed.ns.clone();
    let dir = tempfile::tempdir().unwrap();
    bed.service_account("client").await;
    let (backend, _host) = backend().await;
    // A Service without a selector and its EndpointSlice, written by the test: the backend
    // is a real server on a test host.
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"ports": [{"name": "http", "port": 80}]}
    }))
    .unwrap();
    bed.api::<Service>()
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web", "endpointslice.kubernetes.io/managed-by": "weft-test"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": backend.port()}],
        "endpoints": [{"addresses": [backend.ip().to_string()], "conditions": {"ready": true}}],
    }))
    .unwrap();
    bed.api::<EndpointSlice>()
        .create(&PostParams::default(), &slice)
        .await
        .unwrap();
    bed.route(
        "web",
        json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}], "timeout": "3s"}]}),
    )
    .await;

    let (push, admin) = (free_addr(), free_addr());
    let operator = start_operator(&bed, push, admin, dir.path(), 1);

    let web = format!("web.{ns}.80");
    let mut proxies = Vec::new();
    for i in 0..2 {
        let pod = bed
            .pod(
                &format!("client-{i}"),
                "client",
                "client",
                &format!("198.18.240.6{i}"),
            )
            .await;
        let p = ProxyProc::start(&bed, push, &pod, &web, dir.path()).await;
        let (proc, forward, proxy_admin) = (p.proc, p.forward, p.admin);
        proxies.push((proc, forward, proxy_admin));
    }
    for (proc, forward, _) in &proxies {
        eventually(WAIT, || async {
            let (status, body) = http_get(*forward, "/").await?;
            ensure!(status == 200 && body == "hello", "{status} {body}");
            Ok(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", proc.log_tail(), operator.log_tail()));
    }
    bed.route_programmed("web", 2).await;
    let table = proxy_status(&ns, admin);
    assert_eq!(table.matches("SYNCED").count(), 2, "{table}");

    // Traffic flows continuously through both proxies while the operator dies and returns.
    let stop = CancellationToken::new();
    let mut traffic = Vec::new();
    for (_, forward, _) in &proxies {
        let (stop, forward) = (stop.clone(), *forward);
        traffic.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.is_cancelled() {
                match http_get(forward, "/").await {
                    Ok((200, body)) if body == "hello" => ok += 1,
                    Ok((status, body)) => failed.push(format!("{status} {body}")),
                    Err(e) => failed.push(format!("{e:#}")),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (ok, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    operator.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A change made while the operator is down reaches both proxies after the restart.
    bed.route(
        "web",
        json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}], "timeout": "7s"}]}),
    )
    .await;
    for (_, _, proxy_admin) in &proxies {
        assert_eq!(
            proxy_timeout(*proxy_admin, &web).await.unwrap().as_deref(),
            Some("3s"),
            "a proxy keeps its config while the operator is away"
        );
    }
    let operator = start_operator(&bed, push, admin, dir.path(), 2);
    for (proc, _, proxy_admin) in &proxies {
        eventually(WAIT, || async {
            let t = proxy_timeout(*proxy_admin, &web).await?;
            ensure!(t.as_deref() == Some("7s"), "timeout still {t:?}");
            Ok(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", proc.log_tail(), operator.log_tail()));
    }
    let route = bed.api::<weft_crds::Route>().get("web").await.unwrap();
    let msg = bed.route_programmed("web", 2).await;
    let generation = route.meta().generation.unwrap();
    assert!(
        msg.starts_with(&format!("generation {generation} ")),
        "{msg}"
    );
    let table = proxy_status(&ns, admin);
    assert_eq!(table.matches("SYNCED").count(), 2, "{table}");

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    for t in traffic {
        let (ok, failed) = t.await.unwrap();
        assert!(
            failed.is_empty(),
            "{} of {} requests failed: {:?}",
            failed.len(),
            ok as usize + failed.len(),
            &failed[..failed.len().min(5)]
        );
        assert!(ok > 50, "only {ok} requests were made");
    }
    drop(proxies);
    drop(operator);
    bed.cleanup().await;
}

/// An operator whose webhook cannot start (here its CA Secret is malformed; a refused
/// registration or an API server blip fails the same start-up) says so on
/// `/readyz/webhook`, keeps its webhook listener and retries; `/readyz`, which the Service
/// carrying config push and identity follows, stays ready. Once the cause is fixed (the
/// Secret deleted, so the operator creates a new CA) the webhook registers and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_whose_webhook_cannot_start_says_so_and_retries() {
    use k8s_openapi::api::{
        admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret,
    };

    let bed = Bed::new("proc-hook").await;
    let dir = tempfile::tempdir().unwrap();
    let broken: Secret = serde_json::from_value(json!({
        "metadata": {"name": "weft-ca"},
        "stringData": {"tls.crt": "not a certificate", "tls.key": "not a key"}
    }))
    .unwrap();
    let secrets = bed.api::<Secret>();
    secrets
        .create(&PostParams::default(), &broken)
        .await
        .unwrap();
    let (push, admin, identity, hook) = (free_addr(), free_addr(), free_addr(), free_addr());
    let name = format!("weft-injector-{}", bed.ns);
    let mut cmd = operator_command(&bed.ns, push, admin, identity, 1);
    cmd.arg("--no-identity")
        .args(["--webhook-addr", &hook.to_string()])
        .args(["--webhook-name", &name])
        .args(["--webhook-url", &format!("https://{hook}/inject")])
        // Scoped to a label no namespace carries: the API server calls it for nobody.
        .args([
            "--webhook-namespace-scope",
            &format!("e2e.weft.dev/webhook={}", bed.ns),
        ]);
    let operator = Proc::spawn("operator-1", cmd, dir.path());

    let not_ready = || async {
        let (status, body) = http_get(admin, "/readyz/webhook").await?;
        ensure!(status == 503, "/readyz/webhook {status}: {body}");
        let (status, body) = http_get(admin, "/readyz").await?;
        ensure!(
            status == 200 && body.contains("not serving yet: webhook"),
            "/readyz {status}: {body}"
        );
        Ok(())
    };
    eventually(Duration::from_secs(30), not_ready)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail()));
    // Not a passing state: it stays so while the webhook cannot start.
    tokio::time::sleep(Duration::from_secs(2)).await;
    not_ready()
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail()));
    let log = std::fs::read_to_string(&operator.log).unwrap_or_default();
    assert!(
        log.matches("the injection webhook could not start").count() >= 2,
        "retried: {}",
        operator.log_tail()
    );

    secrets
        .delete("weft-ca", &Default::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(45), || async {
        let (status, body) = http_get(admin, "/readyz/webhook").await?;
        ensure!(status == 200, "/readyz/webhook {status}: {body}");
        let (status, body) = http_get(admin, "/readyz").await?;
        ensure!(status == 200 && body == "ok\n", "/readyz {status}: {body}");
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail()));
    let webhooks = kube::Api::<MutatingWebhookConfiguration>::all(bed.client.clone());
    assert!(webhooks.get_opt(&name).await.unwrap().is_some());
    // The listener it kept serves.
    tokio::net::TcpStream::connect(hook).await.unwrap();

    drop(operator);
    let _ = webhooks.delete(&name, &Default::default()).await;
    bed.cleanup().await;
}
