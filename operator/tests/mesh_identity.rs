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
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
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
    let (push, op_admin, op_identity) = (free_addr(), free_addr(), free_addr());
    let operator = start_operator_with(
        &bed,
        push,
        op_admin,
        op_identity,
        dir.path(),
        1,
        &["--identity-dns-names", IDENTITY_NAME],
    );

    // The trust root proxies verify the identity endpoint against: the operator's
    // generated root, read from its Secret as an installer would.
    let secrets = bed.api::<Secret>();
    let ca = eventually(WAIT, || async {
        let s = secrets.get("weft-identity").await?;
        let ca = s
            .data
            .and_then(|d| d.get("ca.crt").cloned())
            .context("no ca.crt")?;
        Ok(ca.0)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail()));
    let trust_root = dir.path().join("ca.crt");
    std::fs::write(&trust_root, &ca).unwrap();
    let identity = ProxyIdentity {
        addr: op_identity,
        server_name: IDENTITY_NAME.to_owned(),
        trust_root,
        inline: false,
    };

    // Pods, ServiceAccounts, and Service web whose one endpoint is web's proxy.
    let host = TestHost::new();
    let web_inbound = free_addr_on(host.near());
    let app = echo_app().await;
    for sa in ["client", "web"] {
        bed.service_account(sa).await;
    }
    let client_pod = bed.pod("client", "client", "client", "198.18.240.10").await;
    let web_pod = bed.pod("web", "web", "web", "198.18.240.11").await;
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
    let web = ProxyProc::start_with(
        &bed,
        push,
        &web_pod,
        &service,
        dir.path(),
        &ProxyOptions {
            app: Some(app),
            inbound_listen: Some(web_inbound),
            identity: Some(identity.clone()),
            ..ProxyOptions::default()
        },
    )
    .await;
    let client = ProxyProc::start_with(
        &bed,
        push,
        &client_pod,
        &service,
        dir.path(),
        &ProxyOptions {
            // The client takes the root as the injector gives it, in `WEFT_TRUST_ROOTS`.
            identity: Some(ProxyIdentity {
                inline: true,
                ..identity.clone()
            }),
            ..ProxyOptions::default()
        },
    )
    .await;

    // 1. Both are ready only with a certificate from the operator, for their own
    // ServiceAccount.
    let client_id = format!("spiffe://cluster.local/ns/{ns}/sa/client");
    let web_id = format!("spiffe://cluster.local/ns/{ns}/sa/web");
    ready_with_identity(&client, &client_id, &operator).await;
    ready_with_identity(&web, &web_id, &operator).await;
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
        r#"weft_tls_sessions_total{direction="inbound"}"#,
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
        r#"weft_tls_sessions_total{direction="outbound"}"#,
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

    drop((client, web, operator));
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
    let (push, op_admin, op_identity) = (free_addr(), free_addr(), free_addr());
    let operator = start_operator_with(
        &bed,
        push,
        op_admin,
        op_identity,
        dir.path(),
        1,
        &["--identity-dns-names", IDENTITY_NAME],
    );
    let secrets = bed.api::<Secret>();
    let ca = eventually(WAIT, || async {
        let s = secrets.get("weft-identity").await?;
        Ok(s.data
            .and_then(|d| d.get("ca.crt").cloned())
            .context("no ca.crt")?
            .0)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail()));
    let root = dir.path().join("ca.crt");
    std::fs::write(&root, &ca).unwrap();
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
    drop((good, stranger, misnamed, plain, operator));
    bed.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_strict_mesh_default_plain_text_is_refused_until_a_namespace_policy_permits_it() {
    let bed = Bed::new("mesh-strict").await;
    let ns = bed.ns.clone();
    let dir = tempfile::tempdir().unwrap();
    let (push, op_admin, op_identity) = (free_addr(), free_addr(), free_addr());
    let operator = start_operator_with(
        &bed,
        push,
        op_admin,
        op_identity,
        dir.path(),
        1,
        &[
            "--identity-dns-names",
            IDENTITY_NAME,
            "--mesh-mtls-mode",
            "strict",
        ],
    );
    let secrets = bed.api::<Secret>();
    let ca = eventually(WAIT, || async {
        let s = secrets.get("weft-identity").await?;
        Ok(s.data
            .and_then(|d| d.get("ca.crt").cloned())
            .context("no ca.crt")?
            .0)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail()));
    let trust_root = dir.path().join("ca.crt");
    std::fs::write(&trust_root, &ca).unwrap();
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
            identity: Some(ProxyIdentity {
                addr: op_identity,
                server_name: IDENTITY_NAME.to_owned(),
                trust_root,
                inline: false,
            }),
            ..ProxyOptions::default()
        },
    )
    .await;
    ready_with_identity(
        &web,
        &format!("spiffe://cluster.local/ns/{ns}/sa/web"),
        &operator,
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
    drop((web, operator));
    bed.cleanup().await;
}
