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

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use anyhow::{Context, ensure};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{Resource, ResourceExt, api::PostParams};
use serde_json::json;
use support::mesh::*;
use tokio_util::sync::CancellationToken;
use weft_e2e::{
    process::{self, Lifetime},
    shared::{self, eventually},
};

/// A binary built by another package of the workspace, in this target dir.
fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo test --workspace`, or `cargo build -p weft-proxy -p kubectl-weft` first",
        path.display()
    );
    path
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A child process in its own process group, killed (with its group) on drop.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, cmd: Command, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let child = process::spawn(cmd, &log, Lifetime::Attached).unwrap();
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    /// SIGKILL: no shutdown path runs, as when a node dies or the OOM killer strikes.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- {} log ---\n{}",
            self.name,
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        process::stop_group(self.pid(), Duration::from_secs(5));
        let _ = self.child.try_wait();
    }
}

/// The operator as its own process, watching only the test's namespace.
fn start_operator(bed: &Bed, push: SocketAddr, admin: SocketAddr, dir: &Path, n: u32) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weft-operator"));
    cmd.env("KUBECONFIG", shared::testbed().kubeconfig())
        .args(["--push-addr", &push.to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .args(["--lease-namespace", &bed.ns])
        .args(["--identity", &format!("operator-{n}")])
        .args(["--lease-duration", "5s"])
        .args(["--watch-namespace", &bed.ns])
        .arg("--no-webhook");
    Proc::spawn(&format!("operator-{n}"), cmd, dir)
}

/// The Route timeout of `service` in a proxy's active config, read from its admin `/config`.
async fn proxy_timeout(admin: SocketAddr, service: &str) -> anyhow::Result<Option<String>> {
    let (status, body) = http_get(admin, "/config").await?;
    ensure!(status == 200, "/config answered {status}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let svc = v["config"]["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == service))
        .with_context(|| format!("no {service} in {body}"))?;
    Ok(svc["timeout"].as_str().map(str::to_owned))
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
                &format!("198.51.100.6{i}"),
            )
            .await;
        let token = dir.path().join(format!("token-{i}"));
        std::fs::write(&token, bed.token(&pod).await).unwrap();
        let (forward, proxy_admin) = (free_addr(), free_addr());
        let mut cmd = Command::new(sibling_binary("weft-proxy"));
        cmd.arg("run")
            .args(["--operator-addr", &push.to_string()])
            .args(["--pod-namespace", &ns])
            .args(["--pod-name", &pod.name_any()])
            .arg("--token-file")
            .arg(&token)
            .arg("--no-transparent")
            .args(["--forward", &format!("{forward}={web}")])
            .args(["--admin-addr", &proxy_admin.to_string()]);
        let proc = Proc::spawn(&format!("proxy-{i}"), cmd, dir.path());
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
