//! Identity, mutual TLS and Policy end to end, through real processes only: a
//! `weft-operator` process against the test bed's real API server issues certificates to
//! two `weft-proxy` processes (`client` and `web`, distinct ServiceAccounts); the client
//! proxy's requests to Service `web` reach web's proxy over mutual TLS, and a `Strict`
//! Policy with rules on `web` changes who may call within seconds of `apply`.
//!
//! The web proxy is Service `web`'s endpoint: the test writes the EndpointSlice itself,
//! pointing (with a `targetRef` to pod `web`, so clients expect web's identity) at web's
//! `--inbound-forward` listener, which forwards to an application on loopback. The API
//! server refuses loopback addresses in EndpointSlices, so that listener is bound on this
//! machine's end of a test host's veth pair ([`TestHost::near`]): a local address, traffic
//! never leaves the machine.
//!
//! Needs the `weft-proxy` binary: `cargo build -p weft-proxy -p weft-operator` first when
//! testing this package alone.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use k8s_openapi::api::{
    core::v1::{Secret, Service},
    discovery::v1::EndpointSlice,
};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::{mesh::*, processes::*};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use weft_crds::Policy;
use weft_e2e::shared::eventually;

/// How soon after `apply` (or delete) the proxies must act on a Policy.
const SOON: Duration = Duration::from_secs(5);

/// The DNS name the operator's identity endpoint is certified for in this test.
const IDENTITY_NAME: &str = "weft-operator.identity.test";

/// The application behind web's proxy, on loopback: answers 200 with what it was asked,
/// `path=<path> xfcc=<x-forwarded-client-cert or ->`, so the test sees what the proxy
/// passed on.
async fn echo_app() -> SocketAddr {
    echo_app_on(TcpListener::bind("127.0.0.1:0").await.unwrap())
}

/// [`echo_app`] on listener `l`.
fn echo_app_on(l: TcpListener) -> SocketAddr {
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&seen).into_owned();
                let path = head.split(' ').nth(1).unwrap_or("?").to_owned();
                let xfcc = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(n, _)| n.trim().eq_ignore_ascii_case("x-forwarded-client-cert"))
                    .map(|(_, v)| v.trim().to_owned())
                    .unwrap_or_else(|| "-".to_owned());
                let body = format!("path={path} xfcc={xfcc}");
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(response.as_bytes()).await;
            });
        }
    });
    addr
}

/// A GET with an extra header line (`name: value`), as a client that tries to forge it.
async fn get_with_header(addr: SocketAddr, path: &str, header: &str) -> anyhow::Result<Reply> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: t\r\n{header}\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .context("response timed out")??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).unwrap_or("0").parse()?;
    let (_, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok(Reply {
        status,
        headers: Vec::new(),
        body: body.to_owned(),
    })
}

/// A free port on `ip` (bound, read, released).
fn free_addr_on(ip: std::net::Ipv4Addr) -> SocketAddr {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The value of the sample `name{labels}` in a Prometheus text exposition.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The two proxies of the identity tests and what they run on.
struct ClientAndWeb {
    client: ProxyProc,
    web: ProxyProc,
    /// Web's inbound listener: Service web's one endpoint.
    web_inbound: SocketAddr,
    /// The proxies' name for Service web (`web.<ns>.80`).
    service: String,
    /// Where web's inbound listener is (removed on drop).
    host: TestHost,
}

/// What the proxy in front of a served application needs: the application, the inbound
/// listener clients reach it through, and the operator's identity endpoint.
struct ServedBy<'a> {
    app: SocketAddr,
    inbound: SocketAddr,
    identity: &'a ProxyIdentity,
}

impl ServedBy<'_> {
    /// The proxy of `pod`, which serves the application and forwards to `service`.
    async fn proxy(
        &self,
        bed: &Bed,
        push: SocketAddr,
        pod: &k8s_openapi::api::core::v1::Pod,
        service: &str,
        dir: &std::path::Path,
    ) -> ProxyProc {
        let options = ProxyOptions {
            app: Some(self.app),
            inbound_listen: Some(self.inbound),
            identity: Some(self.identity.clone()),
            ..ProxyOptions::default()
        };
        ProxyProc::start_with(bed, push, pod, service, dir, &options).await
    }
}

/// Proxies `client` and `web` (ServiceAccounts of those names, pods at `ips`) for Service
/// `web`, whose one endpoint is web's inbound listener on a test host (a `targetRef` to
/// pod `web`, so clients expect web's identity), web forwarding to an echo app. The client
/// takes the root as the injector gives it, in `WEFT_TRUST_ROOTS`; web from the file.
async fn client_and_web(
    bed: &Bed,
    push: SocketAddr,
    dir: &std::path::Path,
    identity: &ProxyIdentity,
    ips: [&str; 2],
) -> ClientAndWeb {
    let ns = &bed.ns;
    let host = TestHost::new();
    let web_inbound = free_addr_on(host.near());
    let app = echo_app().await;
    for sa in ["client", "web"] {
        bed.service_account(sa).await;
    }
    let client_pod = bed.pod("client", "client", "client", ips[0]).await;
    let web_pod = bed.pod("web", "web", "web", ips[1]).await;
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
        "ports": [{"name": "http", "port": web_inbound.port()}],
        "endpoints": [{"addresses": [web_inbound.ip().to_string()], "conditions": {"ready": true},
                       "targetRef": {"kind": "Pod", "name": "web", "namespace": ns}}],
    }))
    .unwrap();
    bed.api::<EndpointSlice>()
        .create(&PostParams::default(), &slice)
        .await
        .unwrap();
    let service = format!("web.{ns}.80");
    let web = ServedBy {
        app,
        inbound: web_inbound,
        identity,
    }
    .proxy(bed, push, &web_pod, &service, dir)
    .await;
    let client = ProxyProc::start_with(
        bed,
        push,
        &client_pod,
        &service,
        dir,
        &ProxyOptions {
            identity: Some(ProxyIdentity {
                inline: true,
                ..identity.clone()
            }),
            ..ProxyOptions::default()
        },
    )
    .await;
    ClientAndWeb {
        client,
        web,
        web_inbound,
        service,
        host,
    }
}

/// Waits until the proxy at `admin` is ready with a certificate for `id`.
async fn ready_with_identity(p: &ProxyProc, id: &str, operator: &Proc) {
    eventually(WAIT, || async {
        let (status, body) = http_get(p.admin, "/ready").await?;
        ensure!(status == 200, "/ready {status}: {body}");
        let (status, body) = http_get(p.admin, "/config").await?;
        ensure!(status == 200, "/config {status}: {body}");
        let config: serde_json::Value = serde_json::from_str(&body)?;
        ensure!(
            config["identity"]["identity"] == id,
            "/config identity: {}",
            config["identity"]
        );
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", p.proc.log_tail(), operator.log_tail()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_get_certificates_from_the_operator_speak_mutual_tls_and_a_strict_policy_decides_who_calls()
 {
    let bed = Bed::new("mesh-identity").await;
    let ns = bed.ns.clone();
    let dir = tempfile::tempdir().unwrap();
    // The trust root proxies verify the identity endpoint against: the operator's
    // generated root, read from its Secret as an installer would.
    let op = IdentityOperator::start(&bed, dir.path(), IDENTITY_NAME, &[]).await;
    let (push, op_admin, operator) = (op.push, op.admin, &op.proc);
    let identity = op.proxy_identity(IDENTITY_NAME);

    // Pods, ServiceAccounts, and Service web whose one endpoint is web's proxy.
    let ClientAndWeb {
        client,
        web,
        web_inbound,
        service,
        host: _host,
    } = client_and_web(
        &bed,
        push,
        dir.path(),
        &identity,
        ["198.18.240.10", "198.18.240.11"],
    )
    .await;

    // 1. Both are ready only with a certificate from the operator, for their own
    // ServiceAccount.
    let client_id = format!("spiffe://cluster.local/ns/{ns}/sa/client");
    let web_id = format!("spiffe://cluster.local/ns/{ns}/sa/web");
    ready_with_identity(&client, &client_id, operator).await;
    ready_with_identity(&web, &web_id, operator).await;
    // The defaults of an operator started without identity flags: it generated the root,
    // saying so at WARN, and issues for 24 h; web's proxy shows its leaf's expiry in
    // `/config` and as a metric.
    let log = std::fs::read_to_string(&operator.log).unwrap();
    let generated = log
        .lines()
        .find(|l| l.contains("generated a NEW identity trust root"))
        .unwrap_or_else(|| panic!("no line about the new root\n{}", operator.log_tail()));
    assert!(generated.contains("WARN"), "{generated}");
    let presented = presented_not_after(
        web_inbound,
        &std::fs::read_to_string(&op.trust_root).unwrap(),
    )
    .await
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (now + 24 * 3600 - 120..=now + 24 * 3600).contains(&presented),
        "web's leaf expires at {presented}, now is {now}: not 24 h"
    );
    assert_expiry_shown(&web, presented).await;
    // Without a certificate a proxy is not ready and takes no config: one whose
    // identity endpoint does not answer stays 503 and says why.
    let orphan_pod = bed.pod("orphan", "client", "client", "198.18.240.12").await;
    let orphan = ProxyProc::start_with(
        &bed,
        push,
        &orphan_pod,
        &service,
        dir.path(),
        &ProxyOptions {
            identity: Some(ProxyIdentity {
                addr: free_addr(),
                ..identity.clone()
            }),
            ..ProxyOptions::default()
        },
    )
    .await;
    eventually(WAIT, || async {
        // It does not even subscribe for its config before it has a certificate: every
        // ACK reports what it enforces, and without one it cannot enforce an mTLS mode.
        let (status, _) = http_get(orphan.admin, "/config").await?;
        ensure!(status != 200, "/config {status} before any certificate");
        let (status, body) = http_get(orphan.admin, "/ready").await?;
        ensure!(
            status == 503 && body.starts_with("no certificate yet"),
            "/ready {status}: {body}"
        );
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", orphan.proc.log_tail()));
    drop(orphan);
    let (_, op_metrics) = http_get(op_admin, "/metrics").await.unwrap();
    let issued = sample(&op_metrics, "weft_operator_identity_issued_total").unwrap_or(0.0);
    assert!(issued >= 2.0, "the operator issued {issued} certificates");

    // 2. Through the client proxy, over mutual TLS: the application learns the client's
    // identity, and web's proxy counts the inbound TLS session.
    let expect_xfcc = format!("path=/allowed xfcc=URI={client_id}");
    eventually(WAIT, || async {
        let r = http_request(client.forward, "/allowed").await?;
        ensure!(
            r.status == 200 && r.body == expect_xfcc,
            "{} {:?} {}",
            r.status,
            r.header("weft-error"),
            r.body
        );
        Ok(())
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\n{}\n{}\n{}",
            client.proc.log_tail(),
            web.proc.log_tail(),
            operator.log_tail()
        )
    });
    let (_, web_metrics) = http_get(web.admin, "/metrics").await.unwrap();
    let sessions = sample(
        &web_metrics,
        r#"weft_tls_sessions_total{direction="inbound",protocol="mux"}"#,
    )
    .unwrap_or(0.0);
    assert!(
        sessions >= 1.0,
        "web's proxy counts {sessions} inbound TLS sessions"
    );
    // The client's proxy counts the session it originated.
    let (_, client_metrics) = http_get(client.admin, "/metrics").await.unwrap();
    let outbound = sample(
        &client_metrics,
        r#"weft_tls_sessions_total{direction="outbound",protocol="mux"}"#,
    )
    .unwrap_or(0.0);
    assert!(
        outbound >= 1.0,
        "the client's proxy counts {outbound} outbound TLS sessions"
    );
    // Plain text straight to web's listener is accepted without a Policy (Permissive),
    // as unauthenticated: a forged identity header does not reach the application.
    let forged = get_with_header(
        web_inbound,
        "/allowed",
        &format!("x-forwarded-client-cert: URI={client_id}"),
    )
    .await
    .unwrap();
    assert_eq!(
        (forged.status, forged.body.as_str()),
        (200, "path=/allowed xfcc=-")
    );
    // Web's proxy counts the requests by who made them: the client's over mutual TLS
    // under its identity, the plain-text one under none (a forged header names nobody).
    let (_, web_metrics) = http_get(web.admin, "/metrics").await.unwrap();
    let inbound_requests = |by: Option<&str>| -> f64 {
        web_metrics
            .lines()
            .filter(|l| {
                l.starts_with("weft_requests_total{") && l.contains("direction=\"inbound\"")
            })
            .filter(|l| match by {
                Some(id) => l.contains(&format!("client_id=\"{id}\"")),
                None => !l.contains("client_id="),
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        inbound_requests(Some(&client_id)) >= 1.0,
        "no inbound request counted under {client_id}:\n{web_metrics}"
    );
    assert_eq!(inbound_requests(None), 1.0, "{web_metrics}");

    // 3. A Strict Policy: only the client's ServiceAccount, only GET /allowed.
    let policy: Policy = serde_json::from_value(json!({
        "metadata": {"name": "web-strict"},
        "spec": {"target": {"selector": {"matchLabels": {"app": "web"}}},
                 "mtls": {"mode": "Strict"}, "defaultAction": "Deny",
                 "rules": [{"action": "Allow",
                            "from": [{"serviceAccounts": [{"name": "client"}]}],
                            "to": [{"methods": ["GET"], "paths": [{"exact": "/allowed"}]}]}]}
    }))
    .unwrap();
    bed.api::<Policy>()
        .patch(
            "web-strict",
            &PatchParams::apply("weft-test").force(),
            &Patch::Apply(&policy),
        )
        .await
        .unwrap();
    let applied = Instant::now();
    eventually(SOON, || async {
        let r = http_request(client.forward, "/denied").await?;
        ensure!(
            r.status == 403 && r.header("weft-error") == Some("forbidden"),
            "{} {:?} {}",
            r.status,
            r.header("weft-error"),
            r.body
        );
        ensure!(
            r.header("weft-policy") == Some(&format!("{ns}/web-strict")),
            "weft-policy {:?}",
            r.header("weft-policy")
        );
        let r = http_request(web_inbound, "/allowed").await?;
        ensure!(
            r.status == 403 && r.header("weft-error") == Some("mtls_required"),
            "plain text: {} {:?} {}",
            r.status,
            r.header("weft-error"),
            r.body
        );
        Ok(())
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "the Policy did not act within {SOON:?}: {e:#}\n{}\n{}",
            web.proc.log_tail(),
            operator.log_tail()
        )
    });
    let took = applied.elapsed();
    let r = http_request(client.forward, "/denied").await.unwrap();
    assert!(
        r.body.contains("web-strict"),
        "the body names the Policy: {r:?}"
    );
    for _ in 0..5 {
        let r = http_request(client.forward, "/allowed").await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, expect_xfcc.as_str()));
    }
    // Normalization does not open the denied path, nor close the allowed one.
    let r = http_request(client.forward, "/x/../allowed").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, expect_xfcc.as_str()));
    let r = http_request(client.forward, "/%61llowed/..//denied")
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{r:?}");

    let (_, msg) = bed
        .condition::<Policy>("web-strict", "Accepted", "True")
        .await;
    eprintln!("Accepted: {msg}");
    // A proxy with a mesh certificate enforces the mode as well as the rules (it refused
    // plain text above and admitted the client's mutual TLS): the Policy is Programmed.
    let (_, msg) = bed
        .condition::<Policy>("web-strict", "Programmed", "True")
        .await;
    assert_eq!(
        msg, "generation 1 acknowledged by 1 of 1 proxies, and enforced by all",
        "{msg}"
    );

    // Deleting the Policy restores access.
    bed.api::<Policy>()
        .delete("web-strict", &DeleteParams::default())
        .await
        .unwrap();
    eventually(SOON, || async {
        let r = http_request(client.forward, "/denied").await?;
        ensure!(r.status == 200, "{} {:?}", r.status, r.header("weft-error"));
        let r = http_request(web_inbound, "/denied").await?;
        ensure!(
            r.status == 200,
            "plain text: {} {:?}",
            r.status,
            r.header("weft-error")
        );
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("the Policy outlived its deletion: {e:#}"));
    eprintln!("the Policy acted {took:?} after apply");

    drop((client, web, op));
    bed.cleanup().await;
}

/// Who calls `payments` in the example-Policy test, and how.
#[derive(Clone, Copy, Debug)]
enum Caller<'a> {
    /// Through this client proxy's forward listener (mutual TLS from its certificate).
    Proxy(SocketAddr),
    /// Straight to payments' inbound listener over TLS, presenting this leaf (chain PEM,
    /// key PEM), verifying payments against the trust root (PEM).
    Peer(SocketAddr, &'a str, (&'a str, &'a str)),
    /// Straight to payments' inbound listener in plain text.
    Plain(SocketAddr),
}

impl Caller<'_> {
    /// The answer's status and `weft-error` (none for [`Caller::Peer`], which reads the
    /// status only).
    async fn call(self, method: &str, path: &str) -> anyhow::Result<(u16, Option<String>)> {
        let reply = |r: Reply| (r.status, r.header("weft-error").map(str::to_owned));
        Ok(match self {
            Caller::Proxy(addr) | Caller::Plain(addr) => {
                reply(http_call(addr, method, path).await?)
            }
            Caller::Peer(addr, root, leaf) => {
                (peer_call(addr, root, Some(leaf), method, path).await?, None)
            }
        })
    }
}

/// A listener on port `port` of some loopback address (127.x.y.z, tried until one is free):
/// the application port a Policy names, which the test cannot pick.
async fn listen_on_loopback_port(port: u16) -> TcpListener {
    let seed = std::process::id();
    for i in 0..50u32 {
        let n = seed.wrapping_add(i.wrapping_mul(7919));
        let ip = std::net::Ipv4Addr::new(127, 10 + (n % 200) as u8, (n / 200 % 250) as u8, 2);
        if let Ok(l) = TcpListener::bind((ip, port)).await {
            return l;
        }
    }
    panic!("no loopback address with port {port} free");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applying_the_strict_example_policy_changes_who_may_call_and_it_is_programmed() {
    let (bed, dir) = (
        Bed::new("policy-example").await,
        tempfile::tempdir().unwrap(),
    );
    let op = IdentityOperator::start(&bed, dir.path(), IDENTITY_NAME, &[]).await;
    let (ns, push, operator) = (bed.ns.clone(), op.push, &op.proc);
    let identity = op.proxy_identity(IDENTITY_NAME);

    // payments: its application on 8443, the port the example's first rule names; its
    // proxy's inbound listener is its pod address (a test host's near end), which the
    // EndpointSlice controller publishes for Service payments (selector app=payments)
    // with a targetRef to the pod, so clients expect payments' identity.
    let app = echo_app_on(listen_on_loopback_port(8443).await);
    let host = TestHost::new();
    let payments_inbound = free_addr_on(host.near());
    for sa in ["payments", "web", "other"] {
        bed.service_account(sa).await;
    }
    let payments_pod = bed
        .pod("payments", "payments", "payments", &host.near().to_string())
        .await;
    let web_pod = bed.pod("web", "web", "web", "198.18.240.50").await;
    let other_pod = bed.pod("other", "other", "other", "198.18.240.51").await;
    let service = format!("payments.{ns}.80");
    let svc = json!({
        "metadata": {"name": "payments"},
        "spec": {"selector": {"app": "payments"},
                 "ports": [{"name": "http", "port": 80, "targetPort": payments_inbound.port()}]}
    });
    let svc: Service = serde_json::from_value(svc).unwrap();
    bed.api::<Service>()
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
    let payments = ServedBy {
        app,
        inbound: payments_inbound,
        identity: &identity,
    }
    .proxy(&bed, push, &payments_pod, &service, dir.path())
    .await;
    let client = |pod| {
        let options = ProxyOptions {
            identity: Some(identity.clone()),
            ..ProxyOptions::default()
        };
        let (bed, dir, service) = (&bed, dir.path(), &service);
        async move { ProxyProc::start_with(bed, push, pod, service, dir, &options).await }
    };
    let web = client(&web_pod).await;
    let other = client(&other_pod).await;
    for (p, sa) in [(&payments, "payments"), (&web, "web"), (&other, "other")] {
        ready_with_identity(
            p,
            &format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"),
            operator,
        )
        .await;
    }
    // A peer of the monitoring namespace (the example's second rule): a certificate from
    // the mesh root for an identity there, presented straight to payments' listener.
    let secret = bed.api::<Secret>().get("weft-identity").await.unwrap();
    let root_key = String::from_utf8(secret.data.unwrap()["ca.key"].0.clone()).unwrap();
    let root_pem = std::fs::read_to_string(&op.trust_root).unwrap();
    let monitoring = leaf_from(
        &root_pem,
        &root_key,
        "spiffe://cluster.local/ns/monitoring/sa/prometheus",
    );
    let logs = || {
        format!(
            "{}\n{}\n{}",
            payments.proc.log_tail(),
            web.proc.log_tail(),
            operator.log_tail()
        )
    };

    // Who calls what, and the answer (status, `weft-error`) once the Policy is in; before
    // it, every call gets 200.
    let peer = Caller::Peer(payments_inbound, &root_pem, (&monitoring.0, &monitoring.1));
    let (w, o) = (Caller::Proxy(web.forward), Caller::Proxy(other.forward));
    let plain = Caller::Plain(payments_inbound);
    let (forbidden, mtls) = (Some("forbidden"), Some("mtls_required"));
    let matrix = [
        ("web", w, "POST", "/charge", 200, None),
        ("web", w, "GET", "/charge", 403, forbidden),
        ("web", w, "POST", "/refund", 403, forbidden),
        ("other", o, "POST", "/charge", 403, forbidden),
        ("other", o, "GET", "/metrics", 403, forbidden),
        ("monitoring", peer, "GET", "/metrics", 200, None),
        // The peer reads the status only.
        ("monitoring", peer, "POST", "/charge", 403, None),
        ("plain text", plain, "GET", "/metrics", 403, mtls),
    ];
    let check = |after: bool| {
        let matrix = &matrix;
        async move {
            let mut wrong = Vec::new();
            for (who, caller, method, path, status, error) in matrix {
                let want = match after {
                    true => (*status, error.map(str::to_owned)),
                    false => (200, None),
                };
                let got = caller.call(method, path).await?;
                if got != want {
                    wrong.push(format!("{who} {method} {path}: {got:?}, want {want:?}"));
                }
            }
            ensure!(wrong.is_empty(), "{wrong:#?}");
            Ok(())
        }
    };
    // Before: no Policy, everyone may call (mesh default Permissive, no rules).
    eventually(WAIT, || check(false))
        .await
        .unwrap_or_else(|e| panic!("before the Policy: {e:#}\n{}", logs()));

    // The example as written: it names no namespace, so it lands in the test's, and it
    // targets Service payments.
    let name = bed.apply_example::<Policy>("policy-strict.yaml").await;
    assert_eq!(name, "payments");
    let applied = Instant::now();
    eventually(SOON, || check(true))
        .await
        .unwrap_or_else(|e| panic!("after the Policy: {e:#}\n{}", logs()));
    let took = applied.elapsed();
    // The denial names the Policy, and web's allowed call reaches payments as web.
    let r = http_call(other.forward, "POST", "/charge").await.unwrap();
    assert_eq!(
        r.header("weft-policy"),
        Some(format!("{ns}/payments").as_str()),
        "{r:?}"
    );
    let r = http_call(web.forward, "POST", "/charge").await.unwrap();
    assert_eq!(
        r.body,
        format!("path=/charge xfcc=URI=spiffe://cluster.local/ns/{ns}/sa/web")
    );

    bed.condition::<Policy>(&name, "Accepted", "True").await;
    let (_, msg) = bed.condition::<Policy>(&name, "Programmed", "True").await;
    assert_eq!(
        msg, "generation 1 acknowledged by 1 of 1 proxies, and enforced by all",
        "{msg}"
    );
    eprintln!("the example Policy acted {took:?} after apply: {msg}");
    drop((payments, web, other, op));
    bed.cleanup().await;
}

/// The `Programmed` condition of Policy `name` once it is `status` with exactly `message`
/// (and `observedGeneration` current); panics with the last one seen after [`WAIT`].
async fn programmed_as(bed: &Bed, name: &str, status: &str, message: &str, logs: &str) {
    let policies = bed.api::<Policy>();
    eventually(WAIT, || async {
        let object = serde_json::to_value(policies.get(name).await?)?;
        ensure!(
            object["status"]["observedGeneration"] == object["metadata"]["generation"],
            "observedGeneration: {}",
            object["status"]
        );
        let c = object["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Programmed"))
            .with_context(|| format!("no Programmed in {}", object["status"]))?;
        ensure!(
            c["status"] == status && c["message"] == message,
            "Programmed: {c}"
        );
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{logs}"));
}

/// The proxy's `weft_authz_denials_total{policy}` for `policy` (namespace/name).
async fn denials(p: &ProxyProc, policy: &str) -> f64 {
    let (_, m) = http_get(p.admin, "/metrics").await.unwrap_or_default();
    sample(
        &m,
        &format!(r#"weft_authz_denials_total{{policy="{policy}"}}"#),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_on_three_proxies_is_programmed_3_of_3_each_enforces_it_and_the_count_follows_a_killed_proxy()
 {
    let (bed, dir) = (
        Bed::new("policy-n-of-n").await,
        tempfile::tempdir().unwrap(),
    );
    let op = IdentityOperator::start(&bed, dir.path(), IDENTITY_NAME, &[]).await;
    let (ns, push, operator) = (bed.ns.clone(), op.push, &op.proc);
    let identity = op.proxy_identity(IDENTITY_NAME);
    bed.service_account("payments").await;
    let app = echo_app().await;
    let service = format!("payments.{ns}.80");

    // Three pods of `payments` (app=payments), each with its own proxy process
    // subscribed with its pod's token, serving the application on its own inbound
    // listener.
    let start = |i: usize| {
        let (bed, dir, service, identity) = (&bed, dir.path(), &service, &identity);
        async move {
            let name = format!("payments-{i}");
            let pod = match bed
                .api::<k8s_openapi::api::core::v1::Pod>()
                .get_opt(&name)
                .await
                .unwrap()
            {
                Some(pod) => pod,
                None => {
                    bed.pod(
                        &name,
                        "payments",
                        "payments",
                        &format!("198.18.240.{}", 60 + i),
                    )
                    .await
                }
            };
            ServedBy {
                app,
                inbound: free_addr(),
                identity,
            }
            .proxy(bed, push, &pod, service, dir)
            .await
        }
    };
    let mut proxies = Vec::new();
    for i in 0..3 {
        proxies.push(start(i).await);
    }
    let payments_id = format!("spiffe://cluster.local/ns/{ns}/sa/payments");
    for p in &proxies {
        ready_with_identity(p, &payments_id, operator).await;
    }
    let logs = |proxies: &[ProxyProc]| {
        let mut out: Vec<String> = proxies.iter().map(|p| p.proc.log_tail()).collect();
        out.push(operator.log_tail());
        out.join("\n")
    };

    // Two peers with certificates from the mesh root, calling each proxy's inbound
    // listener straight: web (allowed) and other (denied once the Policy is in).
    let secret = bed.api::<Secret>().get("weft-identity").await.unwrap();
    let root_key = String::from_utf8(secret.data.unwrap()["ca.key"].0.clone()).unwrap();
    let root_pem = std::fs::read_to_string(&op.trust_root).unwrap();
    let web = leaf_from(
        &root_pem,
        &root_key,
        &format!("spiffe://cluster.local/ns/{ns}/sa/web"),
    );
    let other = leaf_from(
        &root_pem,
        &root_key,
        &format!("spiffe://cluster.local/ns/{ns}/sa/other"),
    );
    // Each proxy's answers to (web, other).
    let answers = |proxies: &[ProxyProc], want: (u16, u16)| {
        let inbounds: Vec<SocketAddr> = proxies.iter().map(|p| p.inbound.unwrap()).collect();
        let (root_pem, web, other) = (&root_pem, &web, &other);
        async move {
            let mut wrong = Vec::new();
            for (i, inbound) in inbounds.iter().enumerate() {
                let (web, other) = (
                    (web.0.as_str(), web.1.as_str()),
                    (other.0.as_str(), other.1.as_str()),
                );
                let got = (
                    peer_call(*inbound, root_pem, Some(web), "GET", "/charge").await?,
                    peer_call(*inbound, root_pem, Some(other), "GET", "/charge").await?,
                );
                if got != want {
                    wrong.push(format!("proxy {i}: (web, other) {got:?}, want {want:?}"));
                }
            }
            ensure!(wrong.is_empty(), "{wrong:#?}");
            Ok(())
        }
    };
    eventually(WAIT, || answers(&proxies, (200, 200)))
        .await
        .unwrap_or_else(|e| panic!("before the Policy: {e:#}\n{}", logs(&proxies)));

    // A Policy on app=payments denying ServiceAccount other.
    let name = "payments-deny-other";
    let policy: Policy = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"target": {"selector": {"matchLabels": {"app": "payments"}}},
                 "defaultAction": "Allow",
                 "rules": [{"action": "Deny", "from": [{"serviceAccounts": [{"name": "other"}]}]}]}
    }))
    .unwrap();
    bed.api::<Policy>()
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let policy_key = format!("{ns}/{name}");
    eventually(SOON, || answers(&proxies, (200, 403)))
        .await
        .unwrap_or_else(|e| panic!("after the Policy: {e:#}\n{}", logs(&proxies)));
    programmed_as(
        &bed,
        name,
        "True",
        "generation 1 acknowledged by 3 of 3 proxies, and enforced by all",
        &logs(&proxies),
    )
    .await;
    // Each proxy counts its own denial: one more denied call to each is one more there.
    for (i, p) in proxies.iter().enumerate() {
        let before = denials(p, &policy_key).await;
        assert!(before >= 1.0, "proxy {i} counted no denial");
        let leaf = (other.0.as_str(), other.1.as_str());
        let status = peer_call(p.inbound.unwrap(), &root_pem, Some(leaf), "POST", "/x")
            .await
            .unwrap();
        assert_eq!(status, 403, "proxy {i}");
        assert_eq!(denials(p, &policy_key).await, before + 1.0, "proxy {i}");
    }

    // One proxy is killed (SIGKILL, its pod stays): `Programmed` counts the connected
    // proxies that need the Policy, so it reads 2 of 2, and the other two still deny.
    let killed = proxies.pop().unwrap();
    let killed_inbound = killed.inbound.unwrap();
    killed.proc.kill();
    programmed_as(
        &bed,
        name,
        "True",
        "generation 1 acknowledged by 2 of 2 proxies, and enforced by all",
        &logs(&proxies),
    )
    .await;
    answers(&proxies, (200, 403)).await.unwrap();
    assert!(
        TcpStream::connect(killed_inbound).await.is_err(),
        "the killed proxy's listener is gone"
    );

    // Its pod's proxy starts again: 3 of 3, and it denies too.
    proxies.push(start(2).await);
    ready_with_identity(&proxies[2], &payments_id, operator).await;
    eventually(SOON, || answers(&proxies, (200, 403)))
        .await
        .unwrap_or_else(|e| panic!("after the restart: {e:#}\n{}", logs(&proxies)));
    programmed_as(
        &bed,
        name,
        "True",
        "generation 1 acknowledged by 3 of 3 proxies, and enforced by all",
        &logs(&proxies),
    )
    .await;
    drop((proxies, op));
    bed.cleanup().await;
}

/// The proxy at `admin`'s count of config streams that ended for `reason`.
async fn stream_failures(admin: SocketAddr, reason: &str) -> f64 {
    let (_, metrics) = http_get(admin, "/metrics").await.unwrap_or_default();
    sample(
        &metrics,
        &format!(r#"weft_control_stream_failures_total{{reason="{reason}"}}"#),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_stream_is_tls_from_the_mesh_root_and_nothing_else_gets_config() {
    let bed = Bed::new("push-tls").await;
    let ns = bed.ns.clone();
    let dir = tempfile::tempdir().unwrap();
    let op = IdentityOperator::start(&bed, dir.path(), IDENTITY_NAME, &[]).await;
    let (push, op_admin, operator) = (op.push, op.admin, &op.proc);
    let root = op.trust_root.clone();
    // Another mesh's root: a valid CA, just not this operator's.
    let (other, _) = weft_operator::identity::IdentityCa::generate().unwrap();
    let other_root = dir.path().join("other.crt");
    std::fs::write(&other_root, other.trust_bundle()).unwrap();

    bed.service_account("client").await;
    service_to(&bed, "web", "198.18.240.99:8080".parse().unwrap()).await;
    let service = format!("web.{ns}.80");
    let start =
        |name: &'static str, ip: &'static str, root: Option<(std::path::PathBuf, &'static str)>| {
            let (bed, dir, service) = (&bed, dir.path(), service.clone());
            async move {
                let pod = bed.pod(name, "client", "client", ip).await;
                let options = ProxyOptions {
                    operator_root: root.map(|(r, n)| (r, n.to_owned())),
                    ..ProxyOptions::default()
                };
                ProxyProc::start_with(bed, push, &pod, &service, dir, &options).await
            }
        };
    let good = start("good", "198.18.240.20", Some((root.clone(), IDENTITY_NAME))).await;
    let stranger = start(
        "stranger",
        "198.18.240.21",
        Some((other_root, IDENTITY_NAME)),
    )
    .await;
    let misnamed = start(
        "misnamed",
        "198.18.240.22",
        Some((root.clone(), "weft-operator.elsewhere.test")),
    )
    .await;
    let plain = start("plain", "198.18.240.23", None).await;

    // The proxy holding the mesh root for the operator's name syncs over TLS.
    eventually(WAIT, || async {
        let (status, body) = http_get(good.admin, "/config").await?;
        ensure!(
            status == 200 && body.contains(&service),
            "/config {status}: {body}"
        );
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", good.proc.log_tail(), operator.log_tail()));
    let log = std::fs::read_to_string(&good.proc.log).unwrap();
    assert!(
        log.contains("config stream over TLS 1.3") && log.contains("subscribed to the operator"),
        "{}",
        good.proc.log_tail()
    );

    // A proxy with another root, or expecting another name, refuses the operator: it says
    // why in its log, counts it, and takes no config.
    for (p, reason) in [(&stranger, "tls_untrusted"), (&misnamed, "tls_wrong_name")] {
        eventually(WAIT, || async {
            let refused = stream_failures(p.admin, reason).await;
            ensure!(refused >= 1.0, "{reason} failures: {refused}");
            let log = std::fs::read_to_string(&p.proc.log)?;
            ensure!(
                log.contains(&format!(
                    "TLS with the operator at {push} failed ({reason})"
                )),
                "no clear log line"
            );
            Ok(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", p.proc.log_tail()));
        let (status, _) = http_get(p.admin, "/config").await.unwrap();
        assert_ne!(status, 200, "{} took a config", p.proc.name);
    }

    // A proxy without a root speaks plain text, which an operator with identity does not
    // serve: it gets nothing, and the operator counts the failed handshakes.
    eventually(WAIT, || async {
        let (_, m) = http_get(op_admin, "/metrics").await?;
        let refused = sample(
            &m,
            r#"weft_operator_push_refusals_total{reason="tls_handshake"}"#,
        )
        .unwrap_or(0.0);
        ensure!(refused >= 1.0, "tls_handshake refusals: {refused}");
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail()));
    eventually(WAIT, || async {
        let (status, _) = http_get(plain.admin, "/config").await?;
        ensure!(status != 200, "a plain-text proxy took a config");
        let log = std::fs::read_to_string(&plain.proc.log)?;
        ensure!(log.contains("config stream in plain text"), "no log line");
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", plain.proc.log_tail()));

    // Only the good proxy is known to the operator.
    let (_, proxies) = http_get(op_admin, "/proxies").await.unwrap();
    assert!(proxies.contains(&format!("{ns}/good")), "{proxies}");
    for name in ["stranger", "misnamed", "plain"] {
        assert!(!proxies.contains(&format!("{ns}/{name}")), "{proxies}");
    }
    drop((good, stranger, misnamed, plain, op));
    bed.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_strict_mesh_default_plain_text_is_refused_until_a_namespace_policy_permits_it() {
    let bed = Bed::new("mesh-strict").await;
    let ns = bed.ns.clone();
    let dir = tempfile::tempdir().unwrap();
    let op = IdentityOperator::start(
        &bed,
        dir.path(),
        IDENTITY_NAME,
        &["--mesh-mtls-mode", "strict"],
    )
    .await;
    let (push, operator) = (op.push, &op.proc);
    bed.service_account("web").await;
    let web_pod = bed.pod("web", "web", "web", "198.18.240.31").await;
    let app = echo_app().await;
    let web = ProxyProc::start_with(
        &bed,
        push,
        &web_pod,
        &format!("web.{ns}.80"),
        dir.path(),
        &ProxyOptions {
            app: Some(app),
            identity: Some(op.proxy_identity(IDENTITY_NAME)),
            ..ProxyOptions::default()
        },
    )
    .await;
    ready_with_identity(
        &web,
        &format!("spiffe://cluster.local/ns/{ns}/sa/web"),
        operator,
    )
    .await;
    let inbound = web.inbound.unwrap();
    let plain_answers = |want: u16, error: Option<&'static str>| async move {
        eventually(SOON, || async {
            let r = http_request(inbound, "/x").await?;
            ensure!(
                r.status == want && r.header("weft-error") == error,
                "plain text: {} {:?} {}",
                r.status,
                r.header("weft-error"),
                r.body
            );
            Ok(())
        })
        .await
    };

    // No Policy anywhere: the mesh default (Strict) refuses plain text.
    plain_answers(403, Some("mtls_required"))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", web.proc.log_tail(), operator.log_tail()));

    // A namespace-wide Permissive Policy overrides the mesh default in its namespace.
    let apply = |name: &'static str, spec: serde_json::Value| {
        let policies = bed.api::<Policy>();
        async move {
            let p: Policy =
                serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap();
            policies
                .patch(
                    name,
                    &PatchParams::apply("weft-test").force(),
                    &Patch::Apply(&p),
                )
                .await
                .unwrap();
        }
    };
    apply(
        "namespace",
        json!({"target": {"selector": {}}, "mtls": {"mode": "Permissive"}, "defaultAction": "Allow"}),
    )
    .await;
    plain_answers(200, None).await.unwrap_or_else(|e| {
        panic!(
            "the namespace Policy did not act: {e:#}\n{}",
            web.proc.log_tail()
        )
    });
    // The API server kept the empty selector (it is what makes the Policy namespace-wide).
    let stored = bed.api::<Policy>().get("namespace").await.unwrap();
    assert!(
        stored.spec.target.selector.is_some(),
        "{:?}",
        stored.spec.target
    );

    // A workload Policy overrides the namespace's.
    apply(
        "web",
        json!({"target": {"selector": {"matchLabels": {"app": "web"}}}, "mtls": {"mode": "Strict"},
               "defaultAction": "Allow"}),
    )
    .await;
    plain_answers(403, Some("mtls_required"))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the workload Policy did not act: {e:#}\n{}",
                web.proc.log_tail()
            )
        });
    bed.api::<Policy>()
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    plain_answers(200, None).await.unwrap();
    drop((web, op));
    bed.cleanup().await;
}

/// Requests sent without pause from `workers` tasks through a client proxy's forward
/// listener, each on its own connection, until [`Load::stop`]; bounded by `LOAD_MAX_*`.
struct Load {
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failed: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The longest a load runs, and the most requests one worker sends.
const LOAD_MAX_TIME: Duration = Duration::from_secs(900);
const LOAD_MAX_REQUESTS: u64 = 200_000;

impl Load {
    fn start(addr: SocketAddr, workers: usize) -> Load {
        use std::sync::{
            Arc, Mutex,
            atomic::{AtomicBool, AtomicU64, Ordering},
        };
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let tasks = (0..workers)
            .map(|_| {
                let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
                tokio::spawn(async move {
                    for _ in 0..LOAD_MAX_REQUESTS {
                        if stop.load(Ordering::Relaxed) || started.elapsed() > LOAD_MAX_TIME {
                            return;
                        }
                        match http_request(addr, "/load").await {
                            Ok(r) if r.status == 200 && r.body.starts_with("path=/load") => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                let what = match other {
                                    Ok(r) => format!(
                                        "{} {:?} {}",
                                        r.status,
                                        r.header("weft-error"),
                                        r.body
                                    ),
                                    Err(e) => format!("{e:#}"),
                                };
                                failed.lock().unwrap().push(format!(
                                    "at {:.1}s: {what}",
                                    started.elapsed().as_secs_f64()
                                ));
                            }
                        }
                        // A steady trickle, not a flood: the machine is shared.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
            })
            .collect();
        Load {
            ok,
            failed,
            stop,
            tasks,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn failures(&self) -> Vec<String> {
        self.failed.lock().unwrap().clone()
    }

    /// Stops the workers; (requests answered 200, failures).
    async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let ok = self.ok.load(std::sync::atomic::Ordering::Relaxed);
        let failed = self.failed.lock().unwrap().clone();
        (ok, failed)
    }
}

/// The `identity` object of a proxy's `/config`.
async fn identity_of(admin: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let (status, body) = http_get(admin, "/config").await?;
    ensure!(status == 200, "/config {status}: {body}");
    let config: serde_json::Value = serde_json::from_str(&body)?;
    Ok(config["identity"].clone())
}

/// Waits until the proxy at `p` holds a certificate whose chain leads to the root with
/// fingerprint `root` and whose trust bundle is exactly `bundle` (fingerprints, in order):
/// it has renewed since the operator started answering with that bundle.
async fn renewed_onto(p: &ProxyProc, root: &str, bundle: &[&str], operator: &Proc) {
    eventually(RENEWAL_WAIT, || async {
        let id = identity_of(p.admin).await?;
        ensure!(
            id["chainRoot"] == root && id["trustRoots"] == json!(bundle),
            "{}: identity {id}",
            p.proc.name
        );
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", p.proc.log_tail(), operator.log_tail()));
}

/// Certificate lifetime of the rotation tests: the operator's minimum. Proxies renew at
/// 65–75 % of it, every 39–45 s.
const LIFETIME: &str = "1m";
/// How long one renewal may take to happen: a renewal interval (at most 45 s) plus backoff slack.
const RENEWAL_WAIT: Duration = Duration::from_secs(90);

/// Inbound TLS sessions web's proxy has accepted so far.
async fn inbound_sessions(admin: SocketAddr) -> f64 {
    let (_, m) = http_get(admin, "/metrics").await.unwrap_or_default();
    sample(
        &m,
        r#"weft_tls_sessions_total{direction="inbound",protocol="mux"}"#,
    )
    .unwrap_or(0.0)
}

/// Waits until web's proxy accepts a new TLS session (the client's proxy replaces its
/// connection every 25 requests, by the Breaker): handshakes work with what both hold now.
async fn new_handshakes(web: &ProxyProc) {
    let before = inbound_sessions(web.admin).await;
    eventually(WAIT, || async {
        let now = inbound_sessions(web.admin).await;
        ensure!(now >= before + 2.0, "inbound sessions {before} → {now}");
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", web.proc.log_tail()));
}

/// Accepts the server's certificate only if its chain leads to `roots`.
#[derive(Debug)]
struct ChainsTo {
    roots: std::sync::Arc<rustls::RootCertStore>,
    provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for ChainsTo {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &rustls::server::ParsedCertificate::try_from(end_entity)?,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// One GET as a peer proxy would send it to a proxy's inbound listener: TLS 1.3 with ALPN
/// `weft-http1`, presenting `leaf` (chain PEM, key PEM) if given, and accepting the
/// proxy's certificate only if it chains to `roots_pem`. The answer's status, or why none.
async fn peer_get(
    addr: SocketAddr,
    roots_pem: &str,
    leaf: Option<(&str, &str)>,
) -> anyhow::Result<u16> {
    peer_call(addr, roots_pem, leaf, "GET", "/peer").await
}

/// As [`peer_get`], with `method` and `path`.
async fn peer_call(
    addr: SocketAddr,
    roots_pem: &str,
    leaf: Option<(&str, &str)>,
    method: &str,
    path: &str,
) -> anyhow::Result<u16> {
    let mut tls = peer_connect(addr, roots_pem, leaf).await?;
    tls.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    // A client certificate the server refuses is answered with an alert after the
    // client's side of the handshake has completed: it shows up here.
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out))
        .await
        .context("response timed out")?
        .context("after the handshake")?;
    let text = String::from_utf8_lossy(&out);
    Ok(text.get(9..12).context("no status line")?.parse()?)
}

/// A TLS 1.3 connection as a peer proxy opens it to a proxy's inbound listener (ALPN
/// `weft-http1`), presenting `leaf` (chain PEM, key PEM) if given, and accepting the
/// proxy's certificate only if it chains to `roots_pem`.
async fn peer_connect(
    addr: SocketAddr,
    roots_pem: &str,
    leaf: Option<(&str, &str)>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    use std::sync::Arc;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut roots_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ChainsTo {
            roots: Arc::new(roots),
            provider,
        }));
    let mut config = match leaf {
        Some((chain, key)) => builder.with_client_auth_cert(
            rustls_pemfile::certs(&mut chain.as_bytes()).collect::<Result<_, _>>()?,
            rustls_pemfile::private_key(&mut key.as_bytes())?.context("no key")?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"weft-http1".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
            tcp,
        )
        .await
        .context("handshake")
}

/// The notAfter (Unix seconds) of the leaf certificate the proxy listening on `addr`
/// presents in a TLS handshake, verified against `roots_pem`.
async fn presented_not_after(addr: SocketAddr, roots_pem: &str) -> anyhow::Result<u64> {
    let tls = peer_connect(addr, roots_pem, None).await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no certificate presented")?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)?;
    Ok(u64::try_from(cert.validity().not_after.timestamp())?)
}

/// Asserts that the proxy `p` shows `not_after` (Unix seconds) as its certificate's expiry,
/// in `/config` and in `weft_identity_expiry_timestamp_seconds` (within 1 s).
async fn assert_expiry_shown(p: &ProxyProc, not_after: u64) {
    let id = identity_of(p.admin).await.unwrap();
    assert_eq!(
        id["notAfter"],
        json!(not_after),
        "{}: /config {id}",
        p.proc.name
    );
    let metric = expiry_metric(p).await;
    assert!(
        (metric - not_after as f64).abs() <= 1.0,
        "{}: expiry metric {metric}, leaf's notAfter {not_after}",
        p.proc.name
    );
}

/// The proxy's `weft_identity_expiry_timestamp_seconds`.
async fn expiry_metric(p: &ProxyProc) -> f64 {
    let (_, m) = http_get(p.admin, "/metrics").await.unwrap();
    sample(&m, "weft_identity_expiry_timestamp_seconds")
        .unwrap_or_else(|| panic!("{}: no expiry metric", p.proc.name))
}

/// A leaf for `id` signed directly by the root `root_pem` with key `key_pem`: what a peer
/// from that root presents. (chain PEM, key PEM).
fn leaf_from(root_pem: &str, key_pem: &str, id: &str) -> (String, String) {
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(root_pem, rcgen::KeyPair::from_pem(key_pem).unwrap())
            .unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::URI(id.try_into().unwrap()));
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A Breaker on Service `web` that makes client proxies replace their connection to it
/// every 25 requests, so that under load new mutual TLS handshakes happen all along.
async fn recycle_connections(bed: &Bed, client: &ProxyProc) {
    let breaker: weft_crds::Breaker = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"service": {"name": "web"},
                 "connectionPool": {"maxRequestsPerConnection": 25}}
    }))
    .unwrap();
    bed.api::<weft_crds::Breaker>()
        .patch(
            "web",
            &PatchParams::apply("weft-test").force(),
            &Patch::Apply(&breaker),
        )
        .await
        .unwrap();
    eventually(WAIT, || async {
        let (status, body) = http_get(client.admin, "/config").await?;
        ensure!(
            status == 200 && body.contains("maxRequestsPerConnection"),
            "/config {status}: no Breaker yet"
        );
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", client.proc.log_tail()));
}

/// What the rotation tests share: an operator issuing 1-minute certificates, and proxies
/// `client` (root in `WEFT_TRUST_ROOTS`, as injected) and `web` (root in a file) for
/// Service `web`, whose one endpoint is web's inbound listener.
struct Mesh {
    bed: Bed,
    dir: tempfile::TempDir,
    push: SocketAddr,
    op_admin: SocketAddr,
    op_identity: SocketAddr,
    operator: Option<Proc>,
    /// Operator processes started so far (each restart gets its own log).
    starts: u32,
    identity: ProxyIdentity,
    /// The root the operator generated (PEM) and its key (PEM).
    root_a: (String, String),
    client: ProxyProc,
    web: ProxyProc,
    web_inbound: SocketAddr,
    service: String,
    _host: TestHost,
}

impl Mesh {
    async fn start(prefix: &str) -> Mesh {
        let bed = Bed::new(prefix).await;
        let ns = bed.ns.clone();
        let dir = tempfile::tempdir().unwrap();
        let (push, op_admin, op_identity) = (free_addr(), free_addr(), free_addr());
        let mut starts = 0;
        let operator = Self::operator_proc(&bed, push, op_admin, op_identity, &dir, &mut starts);
        let secrets = bed.api::<Secret>();
        let root_a = eventually(WAIT, || async {
            let s = secrets.get("weft-identity").await?;
            let data = s.data.context("no data")?;
            let field = |k: &str| {
                data.get(k)
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                    .with_context(|| format!("no {k}"))
            };
            Ok((field("ca.crt")?, field("ca.key")?))
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail()));
        let trust_root = dir.path().join("ca.crt");
        std::fs::write(&trust_root, &root_a.0).unwrap();
        let identity = ProxyIdentity {
            addr: op_identity,
            server_name: IDENTITY_NAME.to_owned(),
            trust_root,
            inline: false,
        };

        let ClientAndWeb {
            client,
            web,
            web_inbound,
            service,
            host,
        } = client_and_web(
            &bed,
            push,
            dir.path(),
            &identity,
            ["198.18.240.40", "198.18.240.41"],
        )
        .await;
        let client_id = format!("spiffe://cluster.local/ns/{ns}/sa/client");
        ready_with_identity(&client, &client_id, &operator).await;
        ready_with_identity(
            &web,
            &format!("spiffe://cluster.local/ns/{ns}/sa/web"),
            &operator,
        )
        .await;
        recycle_connections(&bed, &client).await;
        Mesh {
            bed,
            dir,
            push,
            op_admin,
            op_identity,
            operator: Some(operator),
            starts,
            identity,
            root_a,
            client,
            web,
            web_inbound,
            service,
            _host: host,
        }
    }

    fn operator_proc(
        bed: &Bed,
        push: SocketAddr,
        admin: SocketAddr,
        identity: SocketAddr,
        dir: &tempfile::TempDir,
        starts: &mut u32,
    ) -> Proc {
        *starts += 1;
        start_operator_with(
            bed,
            push,
            admin,
            identity,
            dir.path(),
            *starts,
            &[
                "--identity-dns-names",
                IDENTITY_NAME,
                "--identity-lifetime",
                LIFETIME,
            ],
        )
    }

    fn operator(&self) -> &Proc {
        self.operator.as_ref().unwrap()
    }

    /// Starts the operator again (after a stop or a kill), on the same addresses.
    fn start_operator(&mut self) {
        assert!(self.operator.is_none());
        self.operator = Some(Self::operator_proc(
            &self.bed,
            self.push,
            self.op_admin,
            self.op_identity,
            &self.dir,
            &mut self.starts,
        ));
    }

    /// `kubectl rollout restart`, as the procedure says: stop (SIGTERM), start again.
    fn restart_operator(&mut self) {
        drop(self.operator.take());
        self.start_operator();
    }

    /// Writes `ca.crt` and `ca.key` of the identity Secret, as a user following
    /// docs/identity.md does with `kubectl`.
    async fn set_secret(&self, bundle: &str, key: &str) {
        let patch = json!({"stringData": {"ca.crt": bundle, "ca.key": key}});
        self.bed
            .api::<Secret>()
            .patch(
                "weft-identity",
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .unwrap();
    }

    /// Both proxies' and the operator's last log lines.
    fn logs(&self) -> String {
        format!(
            "{}\n{}\n{}",
            self.client.proc.log_tail(),
            self.web.proc.log_tail(),
            self.operator
                .as_ref()
                .map(Proc::log_tail)
                .unwrap_or_default()
        )
    }

    async fn cleanup(self) {
        drop((self.client, self.web, self.operator));
        self.bed.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trust_root_rotates_by_the_documented_steps_under_load_without_losing_a_request() {
    let mut mesh = Mesh::start("rotation").await;
    let fp = |pem: &str| {
        let der = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        weft_proxy::identity::fingerprint(&der)
    };
    let (a_crt, a_key) = mesh.root_a.clone();
    let a = fp(&a_crt);
    // Root B, as a user would make it (same shape as the operator's own).
    let (b_ca, b_key) = weft_operator::identity::IdentityCa::generate().unwrap();
    let b_crt = b_ca.trust_bundle().to_owned();
    let b = fp(&b_crt);
    let (client, web) = (&mesh.client, &mesh.web);
    renewed_onto(client, &a, &[&a], mesh.operator()).await;
    renewed_onto(web, &a, &[&a], mesh.operator()).await;
    // A peer whose certificate comes from root A.
    let intruder = format!("spiffe://cluster.local/ns/{}/sa/intruder", mesh.bed.ns);
    let a_peer = leaf_from(&a_crt, &a_key, &intruder);

    let load = Load::start(mesh.client.forward, 2);
    eventually(WAIT, || async {
        ensure!(load.ok() >= 50, "{} requests answered", load.ok());
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}: {:?}\n{}", load.failures(), mesh.logs()));
    new_handshakes(&mesh.web).await;

    // 1. Trust both: B after A in ca.crt, A's key; restart; every proxy renews.
    let t = Instant::now();
    mesh.set_secret(&format!("{a_crt}{b_crt}"), &a_key).await;
    mesh.restart_operator();
    renewed_onto(&mesh.client, &a, &[&a, &b], mesh.operator()).await;
    renewed_onto(&mesh.web, &a, &[&a, &b], mesh.operator()).await;
    new_handshakes(&mesh.web).await;
    eprintln!(
        "step 1 (trust both): both proxies renewed in {:?}",
        t.elapsed()
    );

    // 2. Sign with B: B first, then A; B's key; restart. The operator now serves the
    // identity endpoint and the config stream from B too: proxies trust it only through
    // the bundle of step 1's answers (they were started with A alone).
    let t = Instant::now();
    mesh.set_secret(&format!("{b_crt}{a_crt}"), &b_key).await;
    mesh.restart_operator();
    renewed_onto(&mesh.client, &b, &[&b, &a], mesh.operator()).await;
    renewed_onto(&mesh.web, &b, &[&b, &a], mesh.operator()).await;
    new_handshakes(&mesh.web).await;
    eprintln!(
        "step 2 (sign with B): both proxies renewed in {:?}",
        t.elapsed()
    );
    // Web's certificate, as a handshake shows it, chains to B (and no longer to A) ...
    assert_eq!(
        peer_get(mesh.web_inbound, &b_crt, None).await.unwrap(),
        200,
        "web's certificate chains to B"
    );
    let to_a = peer_get(mesh.web_inbound, &a_crt, None).await;
    assert!(
        to_a.is_err(),
        "web's certificate still chains to A: {to_a:?}"
    );
    // ... and a peer still on A is still trusted while A is in the bundle.
    assert_eq!(
        peer_get(mesh.web_inbound, &b_crt, Some((&a_peer.0, &a_peer.1)))
            .await
            .unwrap(),
        200,
        "a peer from A during step 2"
    );
    // The config stream follows the new root as well: both proxies are subscribed to the
    // operator that serves from B.
    eventually(WAIT, || async {
        let (_, proxies) = http_get(mesh.op_admin, "/proxies").await?;
        for name in ["client", "web"] {
            ensure!(
                proxies.contains(&format!("{}/{name}", mesh.bed.ns)),
                "{name} has no config stream to the operator serving from B: {proxies}"
            );
        }
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()));

    // 3. Drop A: B alone; restart; every proxy renews.
    let t = Instant::now();
    mesh.set_secret(&b_crt, &b_key).await;
    mesh.restart_operator();
    renewed_onto(&mesh.client, &b, &[&b], mesh.operator()).await;
    renewed_onto(&mesh.web, &b, &[&b], mesh.operator()).await;
    new_handshakes(&mesh.web).await;
    eprintln!("step 3 (drop A): both proxies renewed in {:?}", t.elapsed());

    let (ok, failed) = load.stop().await;
    eprintln!(
        "{ok} requests answered during the rotation, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} requests failed: {failed:#?}\n{}",
        failed.len(),
        mesh.logs()
    );
    assert!(ok >= 500, "the load ran: {ok} requests");

    // A peer presenting a certificate from A is refused now, and counted as untrusted;
    // without a certificate (Permissive, no Policy) the same client gets through.
    let refused = |m: &str| {
        sample(
            m,
            r#"weft_tls_refused_total{direction="inbound",reason="untrusted"}"#,
        )
        .unwrap_or(0.0)
    };
    let before = refused(&http_get(mesh.web.admin, "/metrics").await.unwrap().1);
    let from_a = peer_get(mesh.web_inbound, &b_crt, Some((&a_peer.0, &a_peer.1))).await;
    assert!(from_a.is_err(), "a peer from A got {from_a:?}");
    eventually(WAIT, || async {
        let after = refused(&http_get(mesh.web.admin, "/metrics").await?.1);
        ensure!(after > before, "untrusted refusals {before} → {after}");
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.web.proc.log_tail()));
    assert_eq!(peer_get(mesh.web_inbound, &b_crt, None).await.unwrap(), 200);

    // Limit (docs/identity.md): a proxy started now with A alone in `WEFT_TRUST_ROOTS`
    // (a pod injected before step 1 whose sidecar restarts) cannot verify the operator,
    // so gets no certificate, until the pod is recreated with the new bundle.
    let late_pod = mesh
        .bed
        .pod("late", "client", "client", "198.18.240.42")
        .await;
    let late = ProxyProc::start_with(
        &mesh.bed,
        mesh.push,
        &late_pod,
        &mesh.service,
        mesh.dir.path(),
        &ProxyOptions {
            identity: Some(ProxyIdentity {
                inline: true,
                ..mesh.identity.clone()
            }),
            ..ProxyOptions::default()
        },
    )
    .await;
    eventually(WAIT, || async {
        let (status, body) = http_get(late.admin, "/ready").await?;
        ensure!(
            status == 503 && body.starts_with("no certificate yet"),
            "/ready {status}: {body}"
        );
        let log = std::fs::read_to_string(&late.proc.log)?;
        ensure!(
            // `BadSignature` here: B has A's subject (both from the operator's generator).
            log.contains("certificate request failed") && log.contains("invalid peer certificate"),
            "no failed request in the log"
        );
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", late.proc.log_tail()));
    drop(late);
    mesh.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_operator_down_proxies_keep_their_certificate_until_it_expires_and_renew_when_it_returns()
 {
    let mut mesh = Mesh::start("operator-down").await;
    let load = Load::start(mesh.client.forward, 2);
    eventually(WAIT, || async {
        ensure!(load.ok() >= 50, "{} requests answered", load.ok());
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}: {:?}\n{}", load.failures(), mesh.logs()));

    // The operator dies (SIGKILL) right after both proxies renewed, so that it is down
    // for more than a renewal interval before their certificates expire.
    let first = (
        identity_of(mesh.client.admin).await.unwrap(),
        identity_of(mesh.web.admin).await.unwrap(),
    );
    let first_expiry = expiry_metric(&mesh.web).await;
    let first_not_after = first.1["notAfter"].as_u64().unwrap();
    assert!(
        (first_expiry - first_not_after as f64).abs() <= 1.0,
        "expiry metric {first_expiry}, /config {}",
        first.1
    );
    let (client_id, web_id) = eventually(RENEWAL_WAIT, || async {
        let now = (
            identity_of(mesh.client.admin).await?,
            identity_of(mesh.web.admin).await?,
        );
        ensure!(
            now.0["notAfter"] != first.0["notAfter"] && now.1["notAfter"] != first.1["notAfter"],
            "not renewed yet: {} {}",
            now.0,
            now.1
        );
        Ok(now)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()));
    // The metric follows the renewal: it is the notAfter of the leaf web now presents.
    let presented = presented_not_after(mesh.web_inbound, &mesh.root_a.0)
        .await
        .unwrap();
    assert_eq!(json!(presented), web_id["notAfter"]);
    assert_expiry_shown(&mesh.web, presented).await;
    assert!(
        presented > first_not_after,
        "renewed leaf expires at {presented}, the first at {first_not_after}"
    );
    mesh.operator.take().unwrap().kill();
    let down = Instant::now();
    let unix = |v: &serde_json::Value| v.as_u64().unwrap();
    let renew_at = unix(&client_id["renewAt"]).max(unix(&web_id["renewAt"]));
    let expiry = unix(&client_id["notAfter"]).min(unix(&web_id["notAfter"]));
    let now_unix = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    assert!(
        renew_at + 5 < expiry,
        "renew at {renew_at}, expiry {expiry}"
    );

    // Past the renewal time, into the last seconds before expiry: both tried to renew
    // and failed, kept their certificate, are ready, made new handshakes with it, and no
    // request failed.
    while now_unix() < renew_at + 2 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sessions = inbound_sessions(mesh.web.admin).await;
    while now_unix() < expiry - 3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let down_for = down.elapsed();
    assert!(
        down_for > Duration::from_secs(42),
        "the operator was down only {down_for:?}, less than one renewal interval"
    );
    let later = inbound_sessions(mesh.web.admin).await;
    assert!(
        later >= sessions + 2.0,
        "new handshakes after the failed renewal: {sessions} → {later}"
    );
    for (p, before) in [(&mesh.client, &client_id), (&mesh.web, &web_id)] {
        let (status, body) = http_get(p.admin, "/ready").await.unwrap();
        assert_eq!(status, 200, "{}: /ready {body}", p.proc.name);
        let now = identity_of(p.admin).await.unwrap();
        assert_eq!(
            now["notAfter"], before["notAfter"],
            "{}: {now}",
            p.proc.name
        );
        let (_, m) = http_get(p.admin, "/metrics").await.unwrap();
        let errors = sample(&m, r#"weft_identity_renewals_total{result="error"}"#).unwrap_or(0.0);
        assert!(errors >= 1.0, "{}: {errors} failed renewals", p.proc.name);
    }
    let failed = load.failures();
    assert!(
        failed.is_empty(),
        "{} requests failed before expiry: {failed:#?}\n{}",
        failed.len(),
        mesh.logs()
    );
    let ok_before_expiry = load.ok();

    // Past expiry the proxies say so in /ready.
    while now_unix() <= expiry + 1 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for p in [&mesh.client, &mesh.web] {
        eventually(WAIT, || async {
            let (status, body) = http_get(p.admin, "/ready").await?;
            ensure!(
                status == 503 && body.contains("expired"),
                "/ready {status}: {body}"
            );
            Ok(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", p.proc.log_tail()));
    }

    // The operator returns: both renew within their backoff (at most 60 s), are ready,
    // and requests get through again.
    mesh.start_operator();
    let back = Instant::now();
    for p in [&mesh.client, &mesh.web] {
        eventually(RENEWAL_WAIT, || async {
            let (status, body) = http_get(p.admin, "/ready").await?;
            ensure!(status == 200, "/ready {status}: {body}");
            let id = identity_of(p.admin).await?;
            ensure!(unix(&id["notAfter"]) > expiry, "identity {id}");
            Ok(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()));
    }
    let recovered = back.elapsed();
    let ok_then = load.ok();
    eventually(WAIT, || async {
        ensure!(
            load.ok() >= ok_then + 50,
            "{} requests answered",
            load.ok() - ok_then
        );
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()));
    let (ok, failed) = load.stop().await;
    eprintln!(
        "operator down {down_for:?} before expiry with {ok_before_expiry} requests answered and none failed; \
         both proxies renewed {recovered:?} after it returned; {ok} answered in all, {} failed while the certificates were expired",
        failed.len()
    );
    mesh.cleanup().await;
}
