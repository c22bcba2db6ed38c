//! Mutual TLS between proxies, in process on loopback: a client sidecar (forward listener)
//! → a server sidecar (inbound listener) → a backend, with certificates from a test CA
//! made here with rcgen (the operator's issuance is tested in the operator's crate).
//! Bad peers are played by a bare rustls server or client presenting the certificate
//! under test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hyper_util::client::legacy::{Client, connect::HttpConnector};
use rustls::pki_types::{CertificateDer, ServerName};
use support::ca::{Ca, Leaf};
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use weft_proxy::{
    LocalPorts, Proxy,
    identity::{Http1Transport, IdentityStore},
    limits::Limits,
    server::{BeforeConfig, ListenerKind},
    upstream::IdleTimeout,
};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";

fn proxy_with(identity: Option<Arc<IdentityStore>>) -> Arc<Proxy> {
    Proxy::with_identity(
        Limits::default(),
        BeforeConfig::default(),
        LocalPorts::default(),
        identity,
    )
}

/// A server sidecar: an inbound listener in front of `app`.
fn server_sidecar(identity: Option<Arc<IdentityStore>>, app: SocketAddr) -> TestProxy {
    TestProxy::start_kind(
        proxy_with(identity),
        ListenerKind::InboundTo(app),
        config(&[]),
    )
}

/// A config whose service `web` has one endpoint, meshed with `identity`.
fn meshed_config(endpoint: SocketAddr, identity: &str, opaque: bool) -> serde_json::Value {
    let mut c = config(&[("web", &[endpoint])]);
    c["services"][0]["endpoints"][0]["identity"] = serde_json::json!(identity);
    if opaque {
        c["services"][0]["protocol"] = serde_json::json!("opaque");
    }
    c
}

/// A client sidecar: a forward listener for service `web`, whose endpoint is `endpoint`.
fn client_sidecar(
    identity: Option<Arc<IdentityStore>>,
    endpoint: SocketAddr,
    expect: &str,
) -> TestProxy {
    TestProxy::start_kind(
        proxy_with(identity),
        ListenerKind::Forward(Arc::from("web")),
        meshed_config(endpoint, expect, false),
    )
}

fn metric(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

fn metrics_of(p: &TestProxy) -> String {
    p.proxy.metrics.encode().unwrap()
}

#[tokio::test]
async fn mtls_between_two_sidecars_carries_the_client_identity_to_the_backend() {
    let ca = Ca::new("mesh root");
    let backend = Scripted::ok("127.0.0.1", "cart").await;
    let server = server_sidecar(Some(ca.store(SERVER_ID)), backend.addr);
    let client = client_sidecar(Some(ca.store(CLIENT_ID)), server.addr, SERVER_ID);

    for c in [h1_client(), h2_client()] {
        let (resp, body) = get(&c, &client.url("/items")).await;
        assert_eq!(resp.status(), 200, "{body}");
        assert_eq!(body, "hello from cart");
    }
    // The backend learns who called, from the verified certificate.
    let seen = backend.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(
            s.header_values("x-forwarded-client-cert"),
            vec![format!("URI={CLIENT_ID}")]
        );
    }
    // Both sides counted the session: one, which the HTTP/1 and HTTP/2 requests shared.
    let m = metrics_of(&server);
    assert_eq!(
        metric(&m, "weft_tls_sessions_total", &["direction=\"inbound\""]),
        1,
        "{m}"
    );
    let c = metrics_of(&client);
    assert_eq!(
        metric(&c, "weft_tls_sessions_total", &["direction=\"outbound\""]),
        1,
        "{c}"
    );
    assert_eq!(
        metric(&m, "weft_tls_refused_total", &[]),
        0,
        "no refusal: {m}"
    );
    // The server side counts the requests, their responses and latency under the
    // client's verified identity; the client side's series carry none.
    let from_client = format!("client_id=\"{CLIENT_ID}\"");
    for (name, n) in [
        ("weft_requests_total{", 2),
        ("weft_responses_total{", 2),
        ("weft_request_duration_seconds_count{", 2),
    ] {
        assert_eq!(
            metric(&m, name, &["direction=\"inbound\"", &from_client]),
            n,
            "{name}: {m}"
        );
    }
    assert_eq!(
        metric(&m, "weft_requests_total{", &["direction=\"inbound\""]),
        2
    );
    assert!(!c.contains("client_id="), "{c}");
}

#[tokio::test]
async fn a_per_client_rate_limit_keys_on_the_identity_of_the_mtls_session() {
    let ca = Ca::new("mesh root");
    let backend = Scripted::ok("127.0.0.1", "cart").await;
    let mut limited = config(&[]);
    limited["inbound"] = serde_json::json!({"rateLimit": {"name": "shop/cart",
        "requestsPerSecond": 1, "burst": 2, "per": "client"}});
    let server = TestProxy::start_kind(
        proxy_with(Some(ca.store(SERVER_ID))),
        ListenerKind::InboundTo(backend.addr),
        limited,
    );
    // Two callers on the same loopback address, told apart only by their certificates.
    let frontend = client_sidecar(Some(ca.store(CLIENT_ID)), server.addr, SERVER_ID);
    let other_id = "spiffe://cluster.local/ns/shop/sa/checkout";
    let checkout = client_sidecar(Some(ca.store(other_id)), server.addr, SERVER_ID);
    let c = h1_client();
    for _ in 0..2 {
        assert_eq!(get(&c, &frontend.url("/")).await.0.status(), 200);
    }
    let (resp, _) = get(&c, &frontend.url("/")).await;
    assert_eq!(resp.status(), 429, "frontend's burst of 2 is spent");
    // checkout has a bucket of its own.
    for _ in 0..2 {
        assert_eq!(get(&c, &checkout.url("/")).await.0.status(), 200);
    }
    assert_eq!(backend.seen().len(), 4);
}

#[tokio::test]
async fn plain_text_is_still_accepted_inbound_and_cannot_claim_an_identity() {
    let ca = Ca::new("mesh root");
    let backend = Scripted::ok("127.0.0.1", "cart").await;
    let server = server_sidecar(Some(ca.store(SERVER_ID)), backend.addr);
    // Permissive: a plain-text client gets through, but a spoofed identity header is
    // removed before the application sees it.
    let resp = h1_client()
        .request(
            http::Request::get(server.url("/"))
                .header("x-forwarded-client-cert", format!("URI={CLIENT_ID}"))
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        backend.seen()[0]
            .header_values("x-forwarded-client-cert")
            .is_empty()
    );
    // Counted, under no identity.
    let m = metrics_of(&server);
    assert_eq!(
        metric(&m, "weft_requests_total{", &["direction=\"inbound\""]),
        1,
        "{m}"
    );
    assert!(!m.contains("client_id="), "{m}");
}

#[tokio::test]
async fn opaque_tcp_travels_inside_the_tls_session() {
    let ca = Ca::new("mesh root");
    let (app, _task) = tcp_backend("127.0.0.1", "echo-until-eof").await;
    let server = server_sidecar(Some(ca.store(SERVER_ID)), app);
    let client = TestProxy::start_kind(
        proxy_with(Some(ca.store(CLIENT_ID))),
        ListenerKind::Forward(Arc::from("web")),
        meshed_config(server.addr, SERVER_ID, true),
    );
    let mut s = connect(client.addr).await;
    s.write_all(b"twelve bytes").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, "got 12 bytes");
    let m = metrics_of(&server);
    assert_eq!(
        metric(&m, "weft_tls_sessions_total", &["direction=\"inbound\""]),
        1
    );
    let m = metrics_of(&client);
    assert_eq!(
        metric(&m, "weft_tls_sessions_total", &["direction=\"outbound\""]),
        1
    );
}

/// A peer that is not a Weft proxy: a bare TLS 1.3 server presenting `leaf`, answering
/// every request with 200 (HTTP/2 in a `weft-mux` session, HTTP/1 otherwise).
async fn bare_tls_server(leaf: &Leaf, ca_pem: &str) -> SocketAddr {
    let config = leaf.server_config(ca_pem, &[b"weft-mux", b"weft-http1", b"weft-h2"]);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                if tls.get_ref().1.alpn_protocol() == Some(b"weft-mux") {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(full("ok")))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
                    return;
                }
                let mut buf = [0u8; 1024];
                let _ = tls.read(&mut buf).await;
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    addr
}

/// Sends one request through a client sidecar whose endpoint is `peer` (expected to be
/// `SERVER_ID`), and returns the status and `weft-error` reason.
async fn through_client(ca: &Ca, peer: SocketAddr) -> (u16, String, String) {
    let client = client_sidecar(Some(ca.store(CLIENT_ID)), peer, SERVER_ID);
    let (resp, _) = get(&h1_client(), &client.url("/")).await;
    let reason = resp
        .headers()
        .get("weft-error")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (resp.status().as_u16(), reason, metrics_of(&client))
}

#[tokio::test]
async fn outbound_refuses_a_peer_certificate_signed_by_another_ca() {
    let mesh = Ca::new("mesh root");
    let other = Ca::new("another root");
    // Control: the same bare server with a mesh certificate is accepted.
    let good = bare_tls_server(&mesh.issue(SERVER_ID), &mesh.pem).await;
    assert_eq!(through_client(&mesh, good).await.0, 200);

    let peer = bare_tls_server(&other.issue(SERVER_ID), &other.pem).await;
    let (status, reason, m) = through_client(&mesh, peer).await;
    assert_eq!((status, reason.as_str()), (502, "tls_peer_untrusted"));
    assert_eq!(
        metric(
            &m,
            "weft_tls_refused_total",
            &["direction=\"outbound\"", "reason=\"untrusted\""]
        ),
        1,
        "{m}"
    );
}

#[tokio::test]
async fn outbound_refuses_an_expired_peer_certificate() {
    let mesh = Ca::new("mesh root");
    let peer = bare_tls_server(&mesh.issue_at(SERVER_ID, -7200, -3600), &mesh.pem).await;
    let (status, reason, _) = through_client(&mesh, peer).await;
    assert_eq!((status, reason.as_str()), (502, "tls_peer_expired"));
}

#[tokio::test]
async fn outbound_refuses_a_peer_certificate_not_valid_yet() {
    let mesh = Ca::new("mesh root");
    let peer = bare_tls_server(&mesh.issue_at(SERVER_ID, 3600, 7200), &mesh.pem).await;
    let (status, reason, _) = through_client(&mesh, peer).await;
    assert_eq!((status, reason.as_str()), (502, "tls_peer_not_yet_valid"));
}

#[tokio::test]
async fn a_root_left_in_the_bundle_past_its_end_anchors_no_peer_either_way() {
    let mesh = Ca::new("mesh root");
    // The root before a rotation, left in the bundle, ended an hour ago; whoever still
    // holds its key mints peer certificates valid now.
    let old = Ca::valid_between("old mesh root", -7200, -3600);
    let bundle = format!("{}{}", mesh.pem, old.pem);
    let tls13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

    // Outbound: a client sidecar to a server presenting a certificate from the old root.
    let send = async |peer: SocketAddr| {
        let client = client_sidecar(
            Some(mesh.store_with_bundle(CLIENT_ID, &bundle)),
            peer,
            SERVER_ID,
        );
        let (resp, _) = get(&h1_client(), &client.url("/")).await;
        (
            resp.status(),
            header(&resp, "weft-error").to_owned(),
            metrics_of(&client),
        )
    };
    let good = bare_tls_server(&mesh.issue(SERVER_ID), &mesh.pem).await;
    assert_eq!(send(good).await.0, 200, "control: the current root's peer");
    // Its chain without the root, as the operator issues chains.
    let stale = old.issue(SERVER_ID);
    let peer = bare_tls_server(&stale, "").await;
    let (status, reason, m) = send(peer).await;
    assert_eq!((status.as_u16(), &*reason), (502, "tls_peer_untrusted"));
    assert_eq!(
        metric(
            &m,
            "weft_tls_refused_total",
            &["direction=\"outbound\"", "reason=\"untrusted\""]
        ),
        1,
        "{m}"
    );
    // With the root in the chain, webpki judges it as an intermediate, by its dates.
    let peer = bare_tls_server(&stale, &old.pem).await;
    let (status, reason, _) = send(peer).await;
    assert_eq!((status.as_u16(), &*reason), (502, "tls_peer_expired"));

    // Inbound: a server sidecar, a client presenting a certificate from the old root.
    let backend = Scripted::ok("127.0.0.1", "cart").await;
    let server = server_sidecar(
        Some(mesh.store_with_bundle(SERVER_ID, &bundle)),
        backend.addr,
    );
    let good = mesh.issue(CLIENT_ID);
    assert!(bare_tls_client(server.addr, &mesh.pem, Some(&good), tls13).await);
    let stale = old.issue(CLIENT_ID);
    assert!(!bare_tls_client(server.addr, &mesh.pem, Some(&stale), tls13).await);
    eventually(Duration::from_secs(5), "inbound untrusted", || {
        let m = metrics_of(&server);
        async move {
            metric(
                &m,
                "weft_tls_refused_total",
                &["direction=\"inbound\"", "reason=\"untrusted\""],
            ) == 1
        }
    })
    .await;
    assert_eq!(backend.requests(), 1, "only the current root's client");
}

#[tokio::test]
async fn with_no_root_of_its_bundle_valid_a_proxy_blames_itself_not_its_peers() {
    // The whole bundle: a root ending 2 seconds from now. Both sidecars install a
    // certificate from it while it is valid; then it ends.
    let brief = Ca::valid_between("brief mesh root", -60, 2);
    let client_store = brief.store_with_bundle(CLIENT_ID, &brief.pem);
    let server_store = brief.store_with_bundle(SERVER_ID, &brief.pem);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let tls13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

    // Outbound: not `tls_peer_untrusted` (the peer is not to blame) but this proxy's
    // failure, counted `no_local_identity`.
    let peer = bare_tls_server(&brief.issue(SERVER_ID), "").await;
    let client = client_sidecar(Some(client_store), peer, SERVER_ID);
    let (resp, _) = get(&h1_client(), &client.url("/")).await;
    assert_eq!(
        (resp.status().as_u16(), header(&resp, "weft-error")),
        (502, "tls_handshake_failed")
    );
    let m = metrics_of(&client);
    let outbound = |reason: &str| {
        metric(
            &m,
            "weft_tls_refused_total",
            &["direction=\"outbound\"", &format!("reason=\"{reason}\"")],
        )
    };
    assert_eq!(
        (outbound("no_local_identity"), outbound("untrusted")),
        (1, 0),
        "{m}"
    );

    // Inbound: a client presenting a certificate from the same root is refused, counted
    // `no_local_identity`, not `untrusted`.
    let backend = Scripted::ok("127.0.0.1", "cart").await;
    let server = server_sidecar(Some(server_store), backend.addr);
    let leaf = brief.issue(CLIENT_ID);
    assert!(!bare_tls_client(server.addr, &brief.pem, Some(&leaf), tls13).await);
    eventually(Duration::from_secs(5), "inbound no_local_identity", || {
        let m = metrics_of(&server);
        async move {
            metric(
                &m,
                "weft_tls_refused_total",
                &["direction=\"inbound\"", "reason=\"no_local_identity\""],
            ) == 1
                && metric(
                    &m,
                    "weft_tls_refused_total",
                    &["direction=\"inbound\"", "reason=\"untrusted\""],
                ) == 0
        }
    })
    .await;
    assert_eq!(backend.requests(), 0);
}

#[tokio::test]
async fn outbound_refuses_a_trusted_peer_with_another_identity_and_never_falls_back() {
    let mesh = Ca::new("mesh root");
    let backend = Scripted::ok("127.0.0.1", "cart").await;
    // A real sidecar, trusted, but it is someone else.
    let server = server_sidecar(
        Some(mesh.store("spiffe://cluster.local/ns/shop/sa/impostor")),
        backend.addr,
    );
    let (status, reason, _) = through_client(&mesh, server.addr).await;
    assert_eq!((status, reason.as_str()), (502, "tls_identity_mismatch"));
    // Not retried in plain text: the backend never saw a request.
    assert_eq!(backend.requests(), 0);
}

#[tokio::test]
async fn outbound_without_a_certificate_yet_fails_rather_than_send_plain_text() {
    let mesh = Ca::new("mesh root");
    let backend = Scripted::ok("127.0.0.1", "cart").await;
    let server = server_sidecar(Some(mesh.store(SERVER_ID)), backend.addr);
    let client = client_sidecar(Some(IdentityStore::new().unwrap()), server.addr, SERVER_ID);
    let (resp, _) = get(&h1_client(), &client.url("/")).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(header(&resp, "weft-error"), "tls_handshake_failed");
    assert_eq!(backend.requests(), 0);
}

/// A bare TLS client of `versions`, presenting `leaf` if given, offering ALPN
/// `weft-http1`; returns whether an HTTP/1 request through the session got an answer.
async fn bare_tls_client(
    addr: SocketAddr,
    trust: &str,
    leaf: Option<&Leaf>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> bool {
    bare_tls_get(addr, trust, leaf, versions)
        .await
        .is_some_and(|head| head.starts_with("HTTP/1.1 200"))
}

/// The same request; the start of the response, or `None` when the handshake or the
/// exchange failed.
async fn bare_tls_get(
    addr: SocketAddr,
    trust: &str,
    leaf: Option<&Leaf>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Option<String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut trust.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer(
        rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
            .build()
            .unwrap(),
    )));
    let mut config = match leaf {
        Some(l) => builder
            .with_client_auth_cert(vec![l.der.clone()], l.key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"weft-http1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    let mut tls = connector.connect(name, tcp).await.ok()?;
    tls.write_all(b"GET / HTTP/1.1\r\nhost: cart\r\n\r\n")
        .await
        .ok()?;
    let mut buf = [0u8; 512];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        _ => None,
    }
}

/// Accepts any server certificate: what is under test is the sidecar's check of the
/// client, not this client's check of the sidecar.
#[derive(Debug)]
struct AnyServer(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[tokio::test]
async fn strict_refuses_tls_without_a_client_certificate_with_its_own_reason() {
    let mesh = Ca::new("mesh root");
    let backend = Scripted::ok("127.0.0.1", "cart").await;
    let mut strict = config(&[]);
    strict["inbound"] = serde_json::json!({"mtls": "strict"});
    let server = TestProxy::start_kind(
        proxy_with(Some(mesh.store(SERVER_ID))),
        ListenerKind::InboundTo(backend.addr),
        strict,
    );
    let tls13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

    let good = mesh.issue(CLIENT_ID);
    assert!(bare_tls_client(server.addr, &mesh.pem, Some(&good), tls13).await);
    let head = bare_tls_get(server.addr, &mesh.pem, None, tls13)
        .await
        .expect("the handshake succeeds: the refusal is the request's");
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("weft-error: client_certificate_required"),
        "{head}"
    );
    // Plain text keeps its own reason.
    let resp = h1_client()
        .request(http::Request::get(server.url("/")).body(full("")).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.headers()["weft-error"], "mtls_required");
    let m = metrics_of(&server);
    for reason in ["client_certificate_required", "mtls_required"] {
        assert_eq!(
            metric(
                &m,
                "weft_errors_total",
                &["direction=\"inbound\"", &format!("reason=\"{reason}\"")]
            ),
            1,
            "{reason}: {m}"
        );
    }
    assert_eq!(
        backend.seen().len(),
        1,
        "only the client with a certificate got through"
    );
}

#[tokio::test]
async fn inbound_refuses_bad_client_certificates_and_tls_below_1_3_with_reasons() {
    let mesh = Ca::new("mesh root");
    let other = Ca::new("another root");
    let backend = Scripted::ok("127.0.0.1", "cart").await;
    let server = server_sidecar(Some(mesh.store(SERVER_ID)), backend.addr);
    let tls13: &[&'static rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

    // Control: a good client certificate, and none at all (Permissive), get through.
    let good = mesh.issue(CLIENT_ID);
    assert!(bare_tls_client(server.addr, &mesh.pem, Some(&good), tls13).await);
    assert!(bare_tls_client(server.addr, &mesh.pem, None, tls13).await);

    let cases: [(
        Option<Leaf>,
        &[&'static rustls::SupportedProtocolVersion],
        &str,
    ); 4] = [
        (Some(other.issue(CLIENT_ID)), tls13, "untrusted"),
        (
            Some(mesh.issue_at(CLIENT_ID, -7200, -3600)),
            tls13,
            "expired",
        ),
        (
            Some(mesh.issue_at(CLIENT_ID, 3600, 7200)),
            tls13,
            "not_yet_valid",
        ),
        (Some(good), &[&rustls::version::TLS12], "protocol_version"),
    ];
    for (leaf, versions, reason) in cases {
        assert!(
            !bare_tls_client(server.addr, &mesh.pem, leaf.as_ref(), versions).await,
            "{reason}: refused"
        );
        eventually(Duration::from_secs(5), reason, || {
            let m = metrics_of(&server);
            async move {
                metric(
                    &m,
                    "weft_tls_refused_total",
                    &["direction=\"inbound\"", &format!("reason=\"{reason}\"")],
                ) == 1
            }
        })
        .await;
    }
    assert_eq!(
        backend.requests(),
        2,
        "only the two accepted clients got through"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_constant_load_loses_no_request() {
    let ca = Ca::new("mesh root");
    let backend = Scripted::ok("127.0.0.1", "cart").await;
    let server_id = ca.store(SERVER_ID);
    let client_id = ca.store(CLIENT_ID);
    let server = server_sidecar(Some(server_id.clone()), backend.addr);
    let client = client_sidecar(Some(client_id.clone()), server.addr, SERVER_ID);
    let url = client.url("/");

    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = Vec::new();
    for _ in 0..8 {
        let (url, ok, failed, stop) = (url.clone(), ok.clone(), failed.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let c = h1_client();
            while !stop.is_cancelled() {
                let (resp, _) = get(&c, &url).await;
                if resp.status() == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Rotate both sides' certificates (new keys, short lifetimes) 20 times while requests
    // flow; each rotation also replaces the client's upstream pools (a changed connect
    // timeout), so new connections handshake with the new certificates while old ones
    // finish on the old.
    let mut serials = Vec::new();
    for i in 0..20u64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = ca.issue_at(SERVER_ID, -1, 30);
        server_id.install_pem(&s.chain, &s.key, &ca.pem).unwrap();
        let c = ca.issue_at(CLIENT_ID, -1, 30);
        client_id.install_pem(&c.chain, &c.key, &ca.pem).unwrap();
        serials.push(server_id.current().unwrap().not_after_unix());
        let mut cfg = meshed_config(server.addr, SERVER_ID, false);
        cfg["services"][0]["connectTimeout"] = serde_json::json!(format!("{}ms", 1001 + i));
        let before = metric(
            &metrics_of(&server),
            "weft_tls_sessions_total",
            &["direction=\"inbound\""],
        );
        client.apply(cfg);
        // The new pool's one mux connection handshakes with the new certificates.
        eventually(Duration::from_secs(5), "a new session", || {
            let m = metrics_of(&server);
            async move { metric(&m, "weft_tls_sessions_total", &["direction=\"inbound\""]) > before }
        })
        .await;
    }
    stop.cancel();
    for t in load {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert!(ok > 100, "load ran: {ok} requests");
    let sessions = metric(
        &metrics_of(&server),
        "weft_tls_sessions_total",
        &["direction=\"inbound\""],
    );
    assert!(sessions > 20, "new handshakes during rotation: {sessions}");
}

#[tokio::test]
async fn ready_waits_for_the_first_certificate_and_says_why() {
    let ca = Ca::new("mesh root");
    let store = IdentityStore::new().unwrap();
    let proxy = proxy_with(Some(store.clone()));
    proxy
        .store
        .apply(serde_json::from_value(config(&[])).unwrap())
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(weft_proxy::admin::serve(listener, proxy, stop.clone()));
    let url = format!("http://{addr}/ready");
    store.set_error("connect to the identity endpoint: refused".to_owned());
    let (resp, body) = get(&h1_client(), &url).await;
    assert_eq!(resp.status(), 503);
    assert!(
        body.contains("no certificate yet") && body.contains("refused"),
        "{body}"
    );
    ca.install(&store, CLIENT_ID);
    let (resp, _) = get(&h1_client(), &url).await;
    assert_eq!(resp.status(), 200);
    let (resp, body) = get(&h1_client(), &format!("http://{addr}/config")).await;
    assert_eq!(resp.status(), 200);
    assert!(
        body.contains(CLIENT_ID) && body.contains("notAfter"),
        "{body}"
    );
    stop.cancel();
}

/// One request as an HTTP/1-only application received it.
#[derive(Clone, Debug)]
struct H1Seen {
    version: http::Version,
    target: String,
    headers: http::HeaderMap,
    body: bytes::Bytes,
    trailers: Option<http::HeaderMap>,
}

/// An application that speaks HTTP/1.1 only (hyper's HTTP/1 server: an HTTP/2 preface
/// would be a parse error). It records each request; `/chunked` answers a body of unknown
/// length (sent chunked), anything else echoes the request body with a length.
struct H1App {
    addr: SocketAddr,
    seen: Arc<std::sync::Mutex<Vec<H1Seen>>>,
    _task: Task,
}

impl H1App {
    async fn start() -> H1App {
        use http_body_util::BodyExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<std::sync::Mutex<Vec<H1Seen>>> = Arc::default();
        let record = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let record = record.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let collected = body.collect().await.unwrap();
                                let trailers = collected.trailers().cloned();
                                let body = collected.to_bytes();
                                record.lock().unwrap().push(H1Seen {
                                    version: parts.version,
                                    target: parts.uri.to_string(),
                                    headers: parts.headers.clone(),
                                    body: body.clone(),
                                    trailers,
                                });
                                let resp = if parts.uri.path() == "/trailers" {
                                    let mut t = http::HeaderMap::new();
                                    t.insert("x-sum", http::HeaderValue::from_static("42"));
                                    let frames = vec![
                                        Ok::<_, std::convert::Infallible>(
                                            hyper::body::Frame::data(bytes::Bytes::from_static(
                                                b"with trailers",
                                            )),
                                        ),
                                        Ok(hyper::body::Frame::trailers(t)),
                                    ];
                                    let mut r = http::Response::new(
                                        http_body_util::StreamBody::new(futures::stream::iter(
                                            frames,
                                        ))
                                        .boxed(),
                                    );
                                    r.headers_mut()
                                        .insert("trailer", http::HeaderValue::from_static("x-sum"));
                                    r
                                } else if parts.uri.path() == "/chunked" {
                                    let frames = ["one ", "two ", "three"].map(|c| {
                                        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                            bytes::Bytes::from_static(c.as_bytes()),
                                        ))
                                    });
                                    http::Response::new(
                                        http_body_util::StreamBody::new(futures::stream::iter(
                                            frames,
                                        ))
                                        .boxed(),
                                    )
                                } else {
                                    http::Response::new(full(body))
                                };
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        H1App {
            addr,
            seen,
            _task: Task(task),
        }
    }

    fn seen(&self) -> Vec<H1Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// An HTTP/1.1 connection of hyper's own client to `addr`, to see responses' framing.
async fn h1_conn(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Body> {
    let (send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(connect(addr).await))
            .await
            .unwrap();
    tokio::spawn(conn);
    send
}

/// A request body of unknown length: hyper's HTTP/1 client sends it chunked.
fn chunked(parts: &'static [&'static str]) -> Body {
    use http_body_util::BodyExt;
    let frames = parts.iter().map(|c| {
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from_static(
            c.as_bytes(),
        )))
    });
    http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed()
}

async fn send_h1(
    send: &mut hyper::client::conn::http1::SendRequest<Body>,
    req: http::Request<Body>,
) -> (http::response::Parts, bytes::Bytes) {
    use http_body_util::BodyExt;
    send.ready().await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    let (parts, body) = resp.into_parts();
    (parts, body.collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn chunked_trailers_cross_the_mux_both_ways_and_none_appear_where_there_were_none() {
    use http_body_util::BodyExt;
    let ca = Ca::new("mesh root");
    let app = H1App::start().await;
    let server = server_sidecar(Some(ca.store(SERVER_ID)), app.addr);
    let client = client_sidecar(Some(ca.store(CLIENT_ID)), server.addr, SERVER_ID);
    let mut c = h1_conn(client.addr).await;

    // Request trailers (a chunked body, announced in `Trailer`) reach the HTTP/1 app.
    let mut t = http::HeaderMap::new();
    t.insert("x-checksum", http::HeaderValue::from_static("abc"));
    let frames = vec![
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from_static(
            b"body",
        ))),
        Ok(hyper::body::Frame::trailers(t)),
    ];
    c.ready().await.unwrap();
    let resp = c
        .send_request(
            http::Request::post("/trailers")
                .header("host", "cart")
                .header("trailer", "x-checksum")
                .header("te", "trailers")
                .body(http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed())
                .unwrap(),
        )
        .await
        .unwrap();
    let seen = app.seen().pop().unwrap();
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(&seen.body[..], b"body");
    assert_eq!(seen.headers["transfer-encoding"], "chunked");
    assert_eq!(seen.trailers.unwrap()["x-checksum"], "abc");
    // And the app's response trailers reach the HTTP/1 client (which sent `TE: trailers`).
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    let got = resp.into_body().collect().await.unwrap();
    assert_eq!(got.trailers().unwrap()["x-sum"], "42");
    assert_eq!(&got.to_bytes()[..], b"with trailers");

    // A chunked body without trailers gets none on the way.
    c.ready().await.unwrap();
    let resp = c
        .send_request(
            http::Request::post("/chunked")
                .header("host", "cart")
                .body(chunked(&["no ", "trailers"]))
                .unwrap(),
        )
        .await
        .unwrap();
    let got = resp.into_body().collect().await.unwrap();
    assert!(got.trailers().is_none());
    let seen = app.seen().pop().unwrap();
    assert_eq!(&seen.body[..], b"no trailers");
    assert!(seen.trailers.is_none(), "{:?}", seen.trailers);
}

#[tokio::test]
async fn http1_through_the_mux_reaches_an_http1_app_as_http1_with_its_framing() {
    let ca = Ca::new("mesh root");
    let app = H1App::start().await;
    let server = server_sidecar(Some(ca.store(SERVER_ID)), app.addr);
    let client = client_sidecar(Some(ca.store(CLIENT_ID)), server.addr, SERVER_ID);
    let mut c = h1_conn(client.addr).await;

    // A body with a length keeps its length.
    let (resp, body) = send_h1(
        &mut c,
        http::Request::post("/len?q=1")
            .header("host", "cart.shop:8080")
            .header("x-app", "a")
            .header("x-app", "b")
            .header("content-length", "5")
            .body(full("hello"))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.version, http::Version::HTTP_11);
    assert_eq!(&body[..], b"hello");
    assert_eq!(resp.headers["content-length"], "5");
    let seen = app.seen().pop().unwrap();
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(seen.target, "/len?q=1");
    assert_eq!(seen.headers["host"], "cart.shop:8080");
    assert_eq!(seen.headers["content-length"], "5");
    assert!(seen.headers.get("transfer-encoding").is_none());
    assert_eq!(
        seen.headers
            .get_all("x-app")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect::<Vec<_>>(),
        ["a", "b"],
        "repeated fields keep their order"
    );
    assert_eq!(
        seen.headers["x-forwarded-client-cert"],
        format!("URI={CLIENT_ID}").as_str(),
        "the client identity reaches the application"
    );
    assert!(
        seen.headers.get("weft-orig-proto").is_none(),
        "the marker stops at the inbound proxy"
    );

    // A chunked body stays chunked, both ways.
    let (resp, body) = send_h1(
        &mut c,
        http::Request::post("/chunked")
            .header("host", "cart")
            .body(chunked(&["stream", "ed ", "body"]))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(&body[..], b"one two three");
    assert_eq!(resp.headers["transfer-encoding"], "chunked");
    assert!(resp.headers.get("content-length").is_none());
    let seen = app.seen().pop().unwrap();
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(&seen.body[..], b"streamed body");
    assert_eq!(seen.headers["transfer-encoding"], "chunked");
    assert!(seen.headers.get("content-length").is_none());

    // Hop-by-hop fields stay on their hop; a client's own marker is not trusted.
    let (resp, _) = send_h1(
        &mut c,
        http::Request::get("/hop")
            .header("host", "cart")
            .header("connection", "x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 200);
    let seen = app.seen().pop().unwrap();
    for hop in ["x-hop", "keep-alive", "connection", "weft-orig-proto"] {
        assert!(seen.headers.get(hop).is_none(), "{hop}: {:?}", seen.headers);
    }
    assert!(seen.headers.get("content-length").is_none() && seen.body.is_empty());
}

/// An HTTP/1.1 application that writes its answers byte by byte, for the framing hyper's
/// own server would not show: a `HEAD` answer with a length and no body, 204 and 304, a
/// body ended by closing the connection (`/close`, an HTTP/1.0 answer), an interim
/// `100 Continue` before it reads a body (`/continue`), and a body framed both chunked and
/// by a length (`/clte`). It records each request line.
async fn raw_h1_app() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let record = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                while let Some(head) = read_request_head(&mut s).await {
                    let line = head.lines().next().unwrap_or_default().to_string();
                    record.lock().unwrap().push(line.clone());
                    let answer: &[u8] = match line.split(' ').nth(1).unwrap_or_default() {
                        "/head" => b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n",
                        "/204" => b"HTTP/1.1 204 No Content\r\n\r\n",
                        "/304" => b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\n\r\n",
                        "/clte" => b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                        "/close" => {
                            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nuntil close").await;
                            return;
                        }
                        "/continue" => {
                            assert!(head.contains("expect: 100-continue"), "{head}");
                            s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.unwrap();
                            let mut body = [0u8; 5];
                            s.read_exact(&mut body).await.unwrap();
                            assert_eq!(&body, b"hello");
                            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\ngot"
                        }
                        _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                    };
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen, Task(task))
}

/// Reads until the peer closes, within 5 s.
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut body))
        .await
        .expect("close within 5 s")
        .unwrap();
    String::from_utf8(body).unwrap()
}

/// Reads a chunked body to its last chunk, within 5 s, and returns it decoded.
async fn read_chunked(s: &mut TcpStream) -> String {
    let mut body = String::new();
    loop {
        let mut size_line = Vec::new();
        while !size_line.ends_with(b"\r\n") {
            size_line.push(read_exactly(s, 1).await.into_bytes()[0]);
        }
        let size =
            usize::from_str_radix(std::str::from_utf8(&size_line).unwrap().trim(), 16).unwrap();
        let chunk = read_exactly(s, size + 2).await;
        if size == 0 {
            assert_eq!(chunk, "\r\n", "no trailers");
            return body;
        }
        body.push_str(&chunk[..size]);
    }
}

/// `GET /next` on `s`, answered `ok` with a length: the connection is still in step.
async fn still_in_step(s: &mut TcpStream, after: &str) {
    s.write_all(b"GET /next HTTP/1.1\r\nhost: cart\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(s).await;
    assert!(head.starts_with("http/1.1 200"), "after {after}: {head}");
    assert_eq!(read_exactly(s, 2).await, "ok", "after {after}");
}

/// Client sidecars in front of the server sidecar at `server`, named by how they carry
/// HTTP/1: on the mux, in TLS sessions of their own, and in plain text.
fn every_client_transport(ca: &Ca, server: SocketAddr) -> Vec<(String, TestProxy)> {
    let mut clients = Vec::new();
    for transport in [Http1Transport::Multiplexed, Http1Transport::Sessions] {
        let store = IdentityStore::with_http1(transport).unwrap();
        ca.install(&store, CLIENT_ID);
        let client = client_sidecar(Some(store), server, SERVER_ID);
        clients.push((format!("{transport:?}"), client));
    }
    let plain = TestProxy::start_kind(
        proxy_with(None),
        ListenerKind::Forward(Arc::from("web")),
        config(&[("web", &[server])]),
    );
    clients.push(("plain text".to_string(), plain));
    clients
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_answers_without_a_body_or_a_length_keep_their_framing_across_the_mesh() {
    let ca = Ca::new("mesh root");
    let (app, seen, _app) = raw_h1_app().await;
    let server = server_sidecar(Some(ca.store(SERVER_ID)), app);
    let clients = every_client_transport(&ca, server.addr);
    for (transport, client) in &clients {
        seen.lock().unwrap().clear();
        let mut c = connect(client.addr).await;

        // A HEAD answer carries the length of the body it does not send: waiting for
        // that body would stall the connection.
        c.write_all(b"HEAD /head HTTP/1.1\r\nhost: cart\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut c).await;
        assert!(head.starts_with("http/1.1 200"), "{transport}: {head}");
        assert!(
            head.contains("content-length: 1000\r\n"),
            "{transport}: {head}"
        );
        still_in_step(&mut c, "HEAD").await;
        assert!(
            seen.lock()
                .unwrap()
                .contains(&"head /head http/1.1".to_string()),
            "{transport}: the application is asked HEAD, not GET"
        );

        // 204 and 304 have no body, and gain no length or chunked framing on the way.
        for (path, status) in [("/204", "204"), ("/304", "304")] {
            c.write_all(format!("GET {path} HTTP/1.1\r\nhost: cart\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let head = read_head(&mut c).await;
            assert!(
                head.starts_with(&format!("http/1.1 {status}")),
                "{transport}: {head}"
            );
            assert!(
                !head.contains("transfer-encoding") && !head.contains("content-length: "),
                "{transport}: {head}"
            );
            if status == "304" {
                assert!(head.contains("etag: \"v1\"\r\n"), "{transport}: {head}");
            }
            still_in_step(&mut c, path).await;
        }

        // An answer framed by both `Transfer-Encoding` and `Content-Length` is read as
        // chunked, and the length it also names is not passed on (RFC 9112 §6.3).
        c.write_all(b"GET /clte HTTP/1.1\r\nhost: cart\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut c).await;
        assert!(
            head.starts_with("http/1.1 200") && !head.contains("content-length"),
            "{transport}: {head}"
        );
        assert_eq!(read_chunked(&mut c).await, "ok", "{transport}");
        still_in_step(&mut c, "an answer framed twice").await;

        // `Expect: 100-continue`: the client hears `100 Continue` before it sends the
        // body, and the application gets the body after its own `100 Continue`.
        c.write_all(
            b"POST /continue HTTP/1.1\r\nhost: cart\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
        let head = read_head(&mut c).await;
        assert!(head.starts_with("http/1.1 100"), "{transport}: {head}");
        c.write_all(b"hello").await.unwrap();
        let head = read_head(&mut c).await;
        assert!(head.starts_with("http/1.1 200"), "{transport}: {head}");
        assert_eq!(read_exactly(&mut c, 3).await, "got");
        still_in_step(&mut c, "100-continue").await;

        // A body the application ends by closing: an HTTP/1.1 client gets it chunked on
        // a connection that stays open, an HTTP/1.0 client gets it up to the close.
        c.write_all(b"GET /close HTTP/1.1\r\nhost: cart\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut c).await;
        assert!(
            head.starts_with("http/1.1 200") && head.contains("transfer-encoding: chunked"),
            "{transport}: {head}"
        );
        assert_eq!(read_chunked(&mut c).await, "until close");
        still_in_step(&mut c, "a close-delimited body").await;

        let mut c10 = connect(client.addr).await;
        c10.write_all(b"GET /close HTTP/1.0\r\nhost: cart\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut c10).await;
        assert!(
            head.starts_with("http/1.0 200") && !head.contains("transfer-encoding"),
            "{transport}: {head}"
        );
        assert_eq!(read_to_close(&mut c10).await, "until close");
    }
}

/// A client that goes away while its request waits cancels it at the application behind
/// the server sidecar too: on the mux the client sidecar resets the stream, in TLS
/// sessions of their own and in plain text it closes the connection, and either way the
/// server sidecar closes its connection to the application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_cancels_its_request_at_the_far_application() {
    let ca = Ca::new("mesh root");
    let app = HangingApp::start("127.0.0.1").await;
    let server = server_sidecar(Some(ca.store(SERVER_ID)), app.addr);
    let clients = every_client_transport(&ca, server.addr);
    for (n, (transport, client)) in clients.iter().enumerate() {
        app.request_and_go_away(client.addr, n + 1).await;
        app.wait_closed(n + 1, &format!("{transport}: cancelled at the application"))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_http1_connections_share_one_tls_connection_between_the_proxies() {
    let ca = Ca::new("mesh root");
    let app = H1App::start().await;
    // Counts the TCP connections the server sidecar accepts, in front of it.
    let server = server_sidecar(Some(ca.store(SERVER_ID)), app.addr);
    let (front, accepted, _) = counting_forwarder(server.addr).await;
    let client = client_sidecar(Some(ca.store(CLIENT_ID)), front, SERVER_ID);

    let mut tasks = Vec::new();
    for i in 0..8 {
        let addr = client.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = h1_conn(addr).await;
            for j in 0..10 {
                let (resp, body) = send_h1(
                    &mut c,
                    http::Request::post("/x")
                        .header("host", "cart")
                        .body(full(format!("{i}-{j}")))
                        .unwrap(),
                )
                .await;
                assert_eq!(resp.status, 200);
                assert_eq!(body, format!("{i}-{j}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seen = app.seen();
    assert_eq!(seen.len(), 80);
    assert!(seen.iter().all(|s| s.version == http::Version::HTTP_11));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "8 client connections, 80 requests, one connection between the proxies"
    );
    let m = metrics_of(&server);
    assert_eq!(
        metric(
            &m,
            "weft_tls_sessions_total",
            &["direction=\"inbound\"", "protocol=\"mux\""]
        ),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mesh_http1_sessions_http1_takes_pooled_tls_sessions_of_its_own() {
    use http_body_util::BodyExt;
    let ca = Ca::new("mesh root");
    let app = H1App::start().await;
    let mut server_config = config(&[]);
    // Only the client's identity may call `/`; the Policy applies on these sessions too.
    server_config["inbound"] = serde_json::json!({"mtls": "strict", "authorization": [{
        "name": "shop/cart",
        "defaultAction": "deny",
        "rules": [{"action": "allow", "from": [{"identities": [CLIENT_ID]}],
                   "to": [{"paths": [{"prefix": "/ok"}]}]}]
    }]});
    let server = TestProxy::start_kind(
        proxy_with(Some(ca.store(SERVER_ID))),
        ListenerKind::InboundTo(app.addr),
        server_config,
    );
    let (front, accepted, _) = counting_forwarder(server.addr).await;
    let client_store = IdentityStore::with_http1(Http1Transport::Sessions).unwrap();
    ca.install(&client_store, CLIENT_ID);
    let client = client_sidecar(Some(client_store), front, SERVER_ID);

    // Request A holds a session: its body stays open until B has its answer.
    let (tx, rx) = futures::channel::mpsc::unbounded();
    tx.unbounded_send(Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
        bytes::Bytes::from_static(b"first "),
    )))
    .unwrap();
    let mut a = h1_conn(client.addr).await;
    let held = tokio::spawn(async move {
        send_h1(
            &mut a,
            http::Request::post("/ok/a")
                .header("host", "cart")
                .body(http_body_util::StreamBody::new(rx).boxed())
                .unwrap(),
        )
        .await
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while accepted.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "A never reached the server sidecar"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut b = h1_conn(client.addr).await;
    let (resp, body) = send_h1(
        &mut b,
        http::Request::post("/ok/b")
            .header("host", "cart")
            .body(full("second"))
            .unwrap(),
    )
    .await;
    assert_eq!((resp.status.as_u16(), &body[..]), (200, &b"second"[..]));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "a request in flight holds its session, so the next one opens another"
    );
    tx.unbounded_send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
        b"done",
    ))))
    .unwrap();
    drop(tx);
    let (resp, body) = held.await.unwrap();
    assert_eq!((resp.status.as_u16(), &body[..]), (200, &b"first done"[..]));

    // Sessions are kept alive and pooled: ten more requests open none.
    for i in 0..10 {
        let (resp, body) = send_h1(
            &mut b,
            http::Request::post("/ok/more")
                .header("host", "cart")
                .body(full(format!("{i}")))
                .unwrap(),
        )
        .await;
        assert_eq!(
            (resp.status.as_u16(), body),
            (200, bytes::Bytes::from(format!("{i}")))
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);

    // The Policy still decides, by the session's identity.
    let (resp, _) = send_h1(
        &mut b,
        http::Request::get("/admin")
            .header("host", "cart")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 403);
    assert_eq!(resp.headers["weft-error"], "forbidden");

    let seen = app.seen();
    assert_eq!(seen.len(), 12, "the denied request never reached the app");
    for s in &seen {
        assert_eq!(s.version, http::Version::HTTP_11);
        assert!(s.headers.get("weft-orig-proto").is_none());
        assert_eq!(
            s.headers["x-forwarded-client-cert"],
            format!("URI={CLIENT_ID}").as_str()
        );
    }
    let m = metrics_of(&server);
    assert_eq!(
        metric(
            &m,
            "weft_tls_sessions_total",
            &["direction=\"inbound\"", "protocol=\"http1\""]
        ),
        2
    );
    assert_eq!(
        metric(&m, "weft_tls_sessions_total", &["protocol=\"mux\""]),
        0
    );
    let m = metrics_of(&client);
    assert_eq!(
        metric(
            &m,
            "weft_tls_sessions_total",
            &["direction=\"outbound\"", "protocol=\"http1\""]
        ),
        2
    );
}

/// A TCP forwarder to `to` that counts the connections it accepts, and those closed
/// since (both ways).
async fn counting_forwarder(to: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (count, ends) = (accepted.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((mut down, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let ends = ends.clone();
            tokio::spawn(async move {
                let mut up = TcpStream::connect(to).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                ends.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, accepted, closed)
}

/// A client sidecar as [`client_sidecar`] makes it, carrying HTTP/1 as `http1` says, whose
/// upstream connections close after `idle` unused.
fn client_sidecar_idle(
    ca: &Ca,
    endpoint: SocketAddr,
    http1: Http1Transport,
    idle: Duration,
) -> TestProxy {
    let store = IdentityStore::with_http1(http1).unwrap();
    ca.install(&store, CLIENT_ID);
    let limits = Limits {
        upstream_idle_timeout: IdleTimeout::new(idle).unwrap(),
        ..Limits::default()
    };
    TestProxy::start_kind(
        Proxy::with_identity(
            limits,
            BeforeConfig::default(),
            LocalPorts::default(),
            Some(store),
        ),
        ListenerKind::Forward(Arc::from("web")),
        meshed_config(endpoint, SERVER_ID, false),
    )
}

/// The sessions HTTP/1 and HTTP/2 requests take to a peer proxy, with each HTTP/1
/// transport: (name, transport, client).
fn session_kinds() -> [(&'static str, Http1Transport, Client<HttpConnector, Body>); 3] {
    [
        ("mux, HTTP/1", Http1Transport::Multiplexed, h1_client()),
        ("mux, HTTP/2", Http1Transport::Multiplexed, h2_client()),
        ("weft-http1", Http1Transport::Sessions, h1_client()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_to_a_peer_unused_past_the_upstream_idle_timeout_is_closed_then_replaced() {
    let ca = Ca::new("mesh root");
    let app = Scripted::ok("127.0.0.1", "cart").await;
    let server = server_sidecar(Some(ca.store(SERVER_ID)), app.addr);
    closed_idle_then_replaced(&ca, server.addr, Duration::from_secs(1)).await;
}

/// For each session kind: a client sidecar whose pool keeps unused sessions `client_idle`
/// sends a request through `server`, the session is closed once idle (by whichever side's
/// timeout is shorter), and the next request succeeds on a new session.
async fn closed_idle_then_replaced(ca: &Ca, server: SocketAddr, client_idle: Duration) {
    for (kind, http1, http) in session_kinds() {
        let (front, accepted, closed) = counting_forwarder(server).await;
        let client = client_sidecar_idle(ca, front, http1, client_idle);
        let (resp, body) = get(&http, &client.url("/")).await;
        assert_eq!(
            (resp.status().as_u16(), &body[..]),
            (200, "hello from cart"),
            "{kind}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "{kind}");
        // The bound only guards against a hang: 90 s, the default, would exceed it.
        eventually(
            Duration::from_secs(20),
            &format!("{kind}: the idle session is closed"),
            || async { closed.load(Ordering::SeqCst) == 1 },
        )
        .await;
        let (resp, body) = get(&http, &client.url("/")).await;
        assert_eq!(
            (resp.status().as_u16(), &body[..]),
            (200, "hello from cart"),
            "{kind}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "{kind}: a new session");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_to_a_peer_used_within_the_upstream_idle_timeout_is_reused() {
    let ca = Ca::new("mesh root");
    let app = Scripted::ok("127.0.0.1", "cart").await;
    let server = server_sidecar(Some(ca.store(SERVER_ID)), app.addr);
    for (kind, http1, http) in session_kinds() {
        let (front, accepted, closed) = counting_forwarder(server.addr).await;
        let client = client_sidecar_idle(&ca, front, http1, Duration::from_secs(60));
        let (resp, _) = get(&http, &client.url("/")).await;
        assert_eq!(resp.status(), 200, "{kind}");
        // Longer than the timeout of the test above.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let (resp, _) = get(&http, &client.url("/")).await;
        assert_eq!(resp.status(), 200, "{kind}");
        assert_eq!(
            (
                accepted.load(Ordering::SeqCst),
                closed.load(Ordering::SeqCst)
            ),
            (1, 0),
            "{kind}: one session, reused"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_peer_closes_idle_is_replaced_and_no_request_fails() {
    let ca = Ca::new("mesh root");
    let app = Scripted::ok("127.0.0.1", "cart").await;
    // The server's idle timeouts far below the client's pool's, the reverse of the
    // defaults: the peer, not the client, closes the unused session.
    let limits = Limits {
        http1_idle_timeout: Duration::from_millis(500),
        http2_idle_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let server = TestProxy::start_kind(
        Proxy::with_identity(
            limits,
            BeforeConfig::default(),
            LocalPorts::default(),
            Some(ca.store(SERVER_ID)),
        ),
        ListenerKind::InboundTo(app.addr),
        config(&[]),
    );
    closed_idle_then_replaced(&ca, server.addr, Duration::from_secs(60)).await;
}

/// RFC 6455 §1.3's example handshake.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A WebSocket server on raw TCP: checks the opening handshake, answers 101 with the
/// accept key, then echoes frames' bytes.
async fn websocket_app() -> (SocketAddr, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                let ok = head.starts_with("get /chat http/1.1")
                    && head.contains("upgrade: websocket")
                    && head.contains(&format!("sec-websocket-key: {}", WS_KEY.to_lowercase()))
                    && head.contains("sec-websocket-version: 13");
                if !ok {
                    let _ = s
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {WS_ACCEPT}\r\n\r\n"
                );
                s.write_all(answer.as_bytes()).await.unwrap();
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, Task(task))
}

#[tokio::test]
async fn a_websocket_upgrade_works_end_to_end_through_two_proxies() {
    let ca = Ca::new("mesh root");
    let (app, _task) = websocket_app().await;
    let server = server_sidecar(Some(ca.store(SERVER_ID)), app);
    let client = client_sidecar(Some(ca.store(CLIENT_ID)), server.addr, SERVER_ID);
    // An ordinary request first (the application refuses it): the mux connection exists
    // when the upgrade comes.
    let (resp, _) = get(&h1_client(), &client.url("/chat")).await;
    assert_eq!(resp.status(), 400);
    let mut s = connect(client.addr).await;
    s.write_all(
        format!(
            "GET /chat HTTP/1.1\r\nHost: cart\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(
        head.contains(&format!(
            "sec-websocket-accept: {}",
            WS_ACCEPT.to_lowercase()
        )),
        "{head}"
    );
    // A masked text frame "Hello" (RFC 6455 §5.7), and binary noise: echoed as they are.
    for msg in [
        &[
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ][..],
        b"\x00\x01\x02 not http",
    ] {
        echo_roundtrip(&mut s, msg).await;
    }
    // The upgrade has a TLS session of its own, beside the mux one, as documented.
    let m = metrics_of(&server);
    assert_eq!(
        metric(&m, "weft_tls_sessions_total", &["direction=\"inbound\""]),
        2
    );
}

#[tokio::test]
async fn http2_and_grpc_clients_work_through_the_mux() {
    use tonic_health::{
        ServingStatus,
        pb::{HealthCheckRequest, health_client::HealthClient},
    };
    let ca = Ca::new("mesh root");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("shop.Cart", ServingStatus::Serving)
        .await;
    let _server = Task(tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await;
    }));
    let server = server_sidecar(Some(ca.store(SERVER_ID)), app);
    let client = client_sidecar(Some(ca.store(CLIENT_ID)), server.addr, SERVER_ID);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", client.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = HealthClient::new(channel);
    let resp = grpc
        .check(HealthCheckRequest {
            service: "shop.Cart".into(),
        })
        .await
        .unwrap();
    assert_eq!(resp.into_inner().status, ServingStatus::Serving as i32);
    let err = grpc
        .check(HealthCheckRequest {
            service: "shop.Nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "grpc-status in trailers");
    let mut watch = grpc
        .watch(HealthCheckRequest {
            service: "shop.Cart".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    reporter
        .set_service_status("shop.Cart", ServingStatus::NotServing)
        .await;
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    let m = metrics_of(&server);
    assert_eq!(
        metric(&m, "weft_tls_sessions_total", &["direction=\"inbound\""]),
        1
    );
}

/// A bare TLS client offering only `alpn` (what a proxy older than the mux offered),
/// presenting `leaf`.
async fn old_peer_session(
    addr: SocketAddr,
    ca: &Ca,
    leaf: &Leaf,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca.pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer(
        rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
            .build()
            .unwrap(),
    )))
    .with_client_auth_cert(vec![leaf.der.clone()], leaf.key())
    .unwrap();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn peers_that_offer_no_mux_alpn_still_work() {
    let ca = Ca::new("mesh root");
    let backend = Backend::start("127.0.0.1", "cart").await;
    let server = server_sidecar(Some(ca.store(SERVER_ID)), backend.addr);
    let leaf = ca.issue(CLIENT_ID);

    // An HTTP/1 session (weft-http1): the request reaches the application as HTTP/1.1.
    let tls = old_peer_session(server.addr, &ca, &leaf, b"weft-http1").await;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Body>(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (resp, body) = send_h1(
        &mut send,
        http::Request::get("/old")
            .header("host", "cart")
            .body(full(""))
            .unwrap(),
    )
    .await;
    assert_eq!(resp.status, 200, "{body:?}");
    assert_eq!(resp.headers["x-seen-version"], "HTTP/1.1");

    // An HTTP/2 session (weft-h2): its HTTP/2 requests reach the application as HTTP/2,
    // and a marker it sends is not honoured (only mux sessions may restore HTTP/1).
    let tls = old_peer_session(server.addr, &ca, &leaf, b"weft-h2").await;
    let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Body>(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            http::Request::get("http://cart/old2")
                .header("weft-orig-proto", "HTTP/1.1")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-seen-version"], "HTTP/2.0");
    let names = resp.headers()["x-seen-headers"].to_str().unwrap();
    assert!(!names.contains("weft-orig-proto"), "{names}");
    assert!(names.contains("x-forwarded-client-cert"), "{names}");
}

#[tokio::test]
async fn a_breakers_connection_limits_count_mux_connections_and_their_streams() {
    let ca = Ca::new("mesh root");
    let app = H1App::start().await;
    let server = server_sidecar(Some(ca.store(SERVER_ID)), app.addr);
    let mut cfg = meshed_config(server.addr, SERVER_ID, false);
    cfg["services"][0]["breaker"] = serde_json::json!({
        "name": "shop/web",
        "connectionPool": {"maxConnections": 1, "maxRequestsPerConnection": 5}
    });
    let client = TestProxy::start_kind(
        proxy_with(Some(ca.store(CLIENT_ID))),
        ListenerKind::Forward(Arc::from("web")),
        cfg,
    );
    let mut c = h1_conn(client.addr).await;
    for i in 0..12 {
        let (resp, _) = send_h1(
            &mut c,
            http::Request::get(format!("/{i}"))
                .header("host", "cart")
                .body(full(""))
                .unwrap(),
        )
        .await;
        assert_eq!(resp.status, 200, "request {i}");
    }
    // 12 HTTP/1 requests, 5 streams per mux connection: three connections, one at a time.
    assert_eq!(app.seen().len(), 12);
    let m = metrics_of(&server);
    assert_eq!(
        metric(&m, "weft_tls_sessions_total", &["direction=\"inbound\""]),
        3,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_the_client_breaks_off_is_its_fault_on_every_hop() {
    let ca = Ca::new("mesh root");
    let app = Scripted::ok("127.0.0.1", "cart").await;
    let server = server_sidecar(Some(ca.store(SERVER_ID)), app.addr);
    let clients = every_client_transport(&ca, server.addr);
    for (transport, client) in &clients {
        let before = app.requests();
        let server_before = metric(
            &metrics_of(&server),
            "weft_errors_total",
            &["request_body_incomplete"],
        );
        let mut c = connect(client.addr).await;
        c.write_all(b"POST /upload HTTP/1.1\r\nhost: cart\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .await
            .unwrap();
        eventually(
            Duration::from_secs(2),
            "the upload reaches the app",
            || async { app.requests() > before },
        )
        .await;
        c.write_all(b"zz\r\n").await.unwrap();
        let head = read_head(&mut c).await;
        assert!(head.starts_with("http/1.1 400"), "{transport}: {head}");
        assert!(
            head.contains("weft-error: request_body_incomplete\r\n"),
            "{transport}: {head}"
        );
        // The server sidecar saw its client's connection break (in sessions and in plain
        // text) and answers the same; on the mux the client sidecar resets the stream,
        // which may cancel the request there before its body fails. Either way neither
        // hop counts the upstream as failed.
        let mux = transport == "Multiplexed";
        eventually(
            Duration::from_secs(2),
            &format!("{transport}: the server sidecar answers request_body_incomplete"),
            || async {
                mux || metric(
                    &metrics_of(&server),
                    "weft_errors_total",
                    &["request_body_incomplete"],
                ) > server_before
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (side, p) in [("client", client), ("server", &server)] {
            let text = metrics_of(p);
            assert_eq!(
                metric(&text, "weft_errors_total", &["upstream_failed"]),
                0,
                "{transport}, {side} sidecar: {text}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mux_session_carries_more_requests_at_once_than_one_clients_stream_limit() {
    let ca = Ca::new("mesh root");
    let app = HangingApp::start("127.0.0.1").await;
    // An HTTP/2 client of the server sidecar may open 2 streams at once; the listener
    // takes 8 connections.
    let limits = Limits {
        http2_max_concurrent_streams: 2,
        max_connections: 8,
        ..Limits::default()
    };
    let server = TestProxy::start_kind(
        Proxy::with_identity(
            limits,
            BeforeConfig::default(),
            LocalPorts::default(),
            Some(ca.store(SERVER_ID)),
        ),
        ListenerKind::InboundTo(app.addr),
        config(&[]),
    );
    let store = IdentityStore::with_http1(Http1Transport::Multiplexed).unwrap();
    ca.install(&store, CLIENT_ID);
    let client = client_sidecar(Some(store), server.addr, SERVER_ID);
    // Five long polls from five client connections share one mux session: none waits
    // in the client sidecar for another to end.
    let mut polls = Vec::new();
    for _ in 0..5 {
        let mut s = connect(client.addr).await;
        s.write_all(b"GET /long-poll HTTP/1.1\r\nhost: web\r\n\r\n")
            .await
            .unwrap();
        polls.push(s);
    }
    app.wait_held(5).await;
    let text = metrics_of(&server);
    assert_eq!(
        metric(&text, "weft_tls_sessions_total", &["mux"]),
        1,
        "one mux session: {text}"
    );
}

/// An application (HTTP/1 and HTTP/2) answering `GET /big/N` with a header `x-big` of N
/// bytes.
async fn big_head_app() -> (SocketAddr, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let n = req.uri().path().trim_start_matches("/big/").parse();
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("x-big", "a".repeat(n.unwrap_or(0)))
                                .body(full("ok"))
                                .unwrap(),
                        )
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await;
            });
        }
    });
    (addr, Task(task))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_heads_past_16_kib_cross_every_hop_as_they_cross_http1() {
    let (app, _app) = big_head_app().await;
    let ca = Ca::new("mesh root");
    let server = server_sidecar(Some(ca.store(SERVER_ID)), app);
    // HTTP/2 clients that take heads as large as HTTP/1 clients do (hyper's default is
    // 16 KiB; Go's and gRPC's take megabytes).
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .http2_max_header_list_size(1 << 20)
        .build_http::<Body>();
    for (transport, client) in &every_client_transport(&ca, server.addr) {
        for (version, c) in [("HTTP/1", h1_client()), ("HTTP/2", h2.clone())] {
            // hyper's HTTP/1 client, behind the server sidecar, reads up to 408 KiB.
            for n in [17_000, 200_000, 390_000] {
                let (resp, body) = get(&c, &client.url(&format!("/big/{n}"))).await;
                assert_eq!(
                    resp.status(),
                    200,
                    "{transport}, {version}, {n} bytes: {body}"
                );
                assert_eq!(header(&resp, "x-big").len(), n, "{transport}, {version}");
            }
        }
    }
}

// Established sessions end when the certificates that admitted them stop being valid, or
// when the trust that admitted them is withdrawn (docs/identity.md, "Established
// sessions end with their peer's chain").

/// Requests through `url` from `tasks` concurrent clients until `stop`: (ok, failed).
fn steady_load(
    url: String,
    tasks: usize,
    stop: tokio_util::sync::CancellationToken,
) -> (
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..tasks {
        let (url, ok, failed, stop) = (url.clone(), ok.clone(), failed.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let c = h1_client();
            while !stop.is_cancelled() {
                let (resp, _) = get(&c, &url).await;
                if resp.status() == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "request failed: {} weft-error={}",
                        resp.status(),
                        header(&resp, "weft-error")
                    );
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    (ok, failed, load)
}

/// Waits for [`steady_load`]'s requests to keep flowing (`what`), stops the load and
/// asserts that none of its requests failed.
async fn keeps_flowing_then_stops(
    ok: &AtomicUsize,
    failed: &AtomicUsize,
    load: Vec<tokio::task::JoinHandle<()>>,
    stop: &tokio_util::sync::CancellationToken,
    what: &str,
) {
    let before = ok.load(Ordering::Relaxed);
    eventually(Duration::from_secs(5), what, || {
        let n = ok.load(Ordering::Relaxed);
        async move { n > before + 10 }
    })
    .await;
    stop.cancel();
    for t in load {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
}

fn sessions(p: &TestProxy, direction: &str) -> u64 {
    metric(
        &metrics_of(p),
        "weft_tls_sessions_total",
        &[&format!("direction=\"{direction}\"")],
    )
}

fn ended(p: &TestProxy, direction: &str, reason: &str) -> u64 {
    metric(
        &metrics_of(p),
        "weft_tls_sessions_ended_total",
        &[
            &format!("direction=\"{direction}\""),
            &format!("reason=\"{reason}\""),
        ],
    )
}

/// One side's certificate expires under a busy mux session, after a renewal gave it a new
/// one: the outbound side retires the session (at the server's certificate's end, or
/// 2 s before its own), the next requests take a new session (a new handshake), and none
/// fails.
async fn a_busy_mux_session_ends_at_the_peer_certificates_expiry(short_lived_server: bool) {
    let ca = Ca::new("mesh root");
    let backend = Scripted::ok("127.0.0.1", "cart").await;
    let (server_id, client_id) = (ca.store(SERVER_ID), ca.store(CLIENT_ID));
    let (short, id) = if short_lived_server {
        (&server_id, SERVER_ID)
    } else {
        (&client_id, CLIENT_ID)
    };
    let leaf = ca.issue_at(id, -60, 3);
    short.install_pem(&leaf.chain, &leaf.key, &ca.pem).unwrap();
    let expiry = leaf.ends();
    let server = server_sidecar(Some(server_id.clone()), backend.addr);
    let client = client_sidecar(Some(client_id.clone()), server.addr, SERVER_ID);

    let stop = tokio_util::sync::CancellationToken::new();
    let (ok, failed, load) = steady_load(client.url("/"), 4, stop.clone());
    eventually(Duration::from_secs(5), "requests flow", || {
        let n = ok.load(Ordering::Relaxed);
        async move { n > 10 }
    })
    .await;
    assert_eq!(sessions(&server, "inbound"), 1, "one mux session");
    // Renewed before the expiry, as the identity client does: new sessions verify.
    let renewed = ca.issue(id);
    short
        .install_pem(&renewed.chain, &renewed.key, &ca.pem)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sessions(&server, "inbound"), 1, "a renewal ends nothing");

    // The client's own certificate: retired before the server's GOAWAY could race it.
    let (reason, due) = if short_lived_server {
        ("peer_certificate_expired", expiry)
    } else {
        ("local_certificate_expired", expiry - Duration::from_secs(2))
    };
    eventually(
        Duration::from_secs(8),
        "the session ends at the expiry",
        || {
            let n = ended(&client, "outbound", reason);
            async move { n >= 1 }
        },
    )
    .await;
    assert_eq!(ended(&client, "outbound", reason), 1);
    let late = std::time::SystemTime::now()
        .duration_since(due)
        .expect("not before it is due");
    assert!(
        late < Duration::from_secs(3),
        "ended {late:?} after the expiry"
    );
    eventually(
        Duration::from_secs(5),
        "a new session carries the load",
        || {
            let n = sessions(&server, "inbound");
            async move { n == 2 }
        },
    )
    .await;
    keeps_flowing_then_stops(
        &ok,
        &failed,
        load,
        &stop,
        "requests flow on the new session",
    )
    .await;
    assert_eq!(sessions(&server, "inbound"), 2, "exactly one new handshake");
    assert_eq!(sessions(&client, "outbound"), 2);
    eventually(
        Duration::from_secs(5),
        "the old session's connection closed",
        || {
            let m = metrics_of(&server);
            async move { metric(&m, "weft_tcp_connections_open{", &["direction=\"inbound\""]) == 1 }
        },
    )
    .await;
    // The server judges the client's certificate only, and it was not expired.
    if short_lived_server {
        assert_eq!(ended(&server, "inbound", "peer_certificate_expired"), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_a_busy_mux_session_ends_at_the_servers_certificate_expiry_losing_no_request() {
    a_busy_mux_session_ends_at_the_peer_certificates_expiry(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_retires_a_busy_mux_session_before_its_own_certificate_ends_losing_no_request() {
    a_busy_mux_session_ends_at_the_peer_certificates_expiry(false).await;
}

/// An HTTP/1.1 application whose `GET /long` answers at once with the first half of a
/// chunked body (`first-`) and sends the rest (`last`) `after` later; other requests get
/// both halves at once.
async fn streaming_app(after: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0; 4096];
                // One request after another on the connection (no request bodies here).
                loop {
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let first =
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nfirst-\r\n";
                    if s.write_all(first).await.is_err() {
                        return;
                    }
                    if head.starts_with(b"GET /long") {
                        tokio::time::sleep(after).await;
                    }
                    if s.write_all(b"4\r\nlast\r\n0\r\n\r\n").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A server identity whose certificate is past its renewal window, and its end. Eleven
/// seconds of life, seven gone: renewed by about 7.8 s (and 0.55 s of slack), so a client
/// retires its session about 1.4 s from now; the certificate ends about 4 s from now.
fn past_its_renewal_window(ca: &Ca) -> (Arc<IdentityStore>, std::time::SystemTime) {
    let server_id = IdentityStore::new().unwrap();
    let leaf = ca.issue_at(SERVER_ID, -7, 4);
    server_id
        .install_pem(&leaf.chain, &leaf.key, &ca.pem)
        .unwrap();
    (server_id, leaf.ends())
}

/// Reads from `c` until what was read contains `marker`, each read within 5 s.
async fn read_until(c: &mut TcpStream, marker: &[u8], what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(marker.len()).any(|w| w == marker) {
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{what} within 5 s"))
            .unwrap();
        assert_ne!(n, 0, "closed before {what}: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// A long request on a session is not cut when the session is retired: once the server
/// has renewed (the end of the renewal window of its certificate's life), the client's
/// new requests take a new session, which presents the renewed certificate, while the
/// response in flight streams on over the old session, past the old certificate's end
/// (counted then) within the end's grace, and the old session closes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_a_retired_mux_session_streams_its_response_to_the_end_while_new_requests_take_a_new_session()
 {
    let ca = Ca::new("mesh root");
    // The long response's second half comes 7 s after its first: past the old
    // certificate's end, within its grace.
    let app = streaming_app(Duration::from_secs(7)).await;
    let (server_id, expiry) = past_its_renewal_window(&ca);
    let server = server_sidecar(Some(server_id.clone()), app);
    let client = client_sidecar(Some(ca.store(CLIENT_ID)), server.addr, SERVER_ID);

    let long = {
        let url = client.url("/long");
        tokio::spawn(async move {
            let (resp, body) = get(&h1_client(), &url).await;
            (resp.status(), body)
        })
    };
    eventually(
        Duration::from_secs(2),
        "the long response has begun",
        || {
            let n = sessions(&server, "inbound");
            async move { n == 1 }
        },
    )
    .await;
    // The server renews, as its identity client does by then.
    let renewed = ca.issue(SERVER_ID);
    server_id
        .install_pem(&renewed.chain, &renewed.key, &ca.pem)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(std::time::SystemTime::now() < expiry, "the test ran late");
    let (resp, body) = get(&h1_client(), &client.url("/after")).await;
    assert_eq!((resp.status().as_u16(), body.as_str()), (200, "first-last"));
    assert_eq!(
        sessions(&server, "inbound"),
        2,
        "the request after the retirement took a new session"
    );
    // The old session's end is counted while its response still streams.
    eventually(
        Duration::from_secs(4),
        "the retired session's end is counted",
        || {
            let n = ended(&client, "outbound", "peer_certificate_expired");
            async move { n == 1 }
        },
    )
    .await;
    let (status, body) = long.await.unwrap();
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (200, "first-last"),
        "the response in flight streamed to its end"
    );
    assert!(
        std::time::SystemTime::now() > expiry,
        "it ended after the expiry"
    );
    eventually(
        Duration::from_secs(5),
        "the retired session's connection closed",
        || {
            let m = metrics_of(&server);
            async move { metric(&m, "weft_tcp_connections_open{", &["direction=\"inbound\""]) == 1 }
        },
    )
    .await;
    assert_eq!(sessions(&client, "outbound"), 2);
}

/// An application that answers a `POST` at once and then reads its body of `len` bytes
/// (as one does with an early answer), reporting how many bytes of it arrived before its
/// connection closed.
async fn early_answer_app(len: usize) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                if read_request_head(&mut s).await.is_none() {
                    return;
                }
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly";
                if s.write_all(answer).await.is_err() {
                    return;
                }
                let mut buf = vec![0; 4096];
                let mut body = 0;
                while body < len {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => body += n,
                    }
                }
                let _ = tx.send(body);
            });
        }
    });
    (addr, rx)
}

/// With `weft.dev/mesh-http1: sessions`, a session retired while its request's body is
/// still on its way (the application answered first) carries that body to its end: the
/// retirement takes the connection out of the pool, never cuts what is on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_a_retired_http1_session_carries_the_rest_of_a_request_body_answered_early() {
    let ca = Ca::new("mesh root");
    let (app, mut bodies) = early_answer_app(10).await;
    let (server_id, expiry) = past_its_renewal_window(&ca);
    let server = server_sidecar(Some(server_id.clone()), app);
    let client_id = IdentityStore::with_http1(Http1Transport::Sessions).unwrap();
    ca.install(&client_id, CLIENT_ID);
    let client = client_sidecar(Some(client_id), server.addr, SERVER_ID);

    let mut c = TcpStream::connect(client.addr).await.unwrap();
    c.write_all(b"POST /upload HTTP/1.1\r\nhost: web\r\ncontent-length: 10\r\n\r\nhello")
        .await
        .unwrap();
    let answer = read_until(&mut c, b"early", "the early answer").await;
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    // The server renews; the client retires the session about a second later.
    let renewed = ca.issue(SERVER_ID);
    server_id
        .install_pem(&renewed.chain, &renewed.key, &ca.pem)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(std::time::SystemTime::now() < expiry, "the test ran late");
    // The rest of the body, after the retirement.
    c.write_all(b"world").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), bodies.recv())
        .await
        .expect("the application's report within 5 s");
    assert_eq!(got, Some(10), "the whole body reached the application");
    // The retirement happened: a new request takes a new session.
    let (resp, body) = get(&h1_client(), &client.url("/after")).await;
    assert_eq!((resp.status().as_u16(), body.as_str()), (200, "early"));
    assert_eq!(sessions(&client, "outbound"), 2);
}

/// An application that answers each request with a chunked body of `tick\n` every 250 ms
/// for a minute.
async fn ticking_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request_head(&mut s).await.is_none() {
                    return;
                }
                let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                if s.write_all(head).await.is_err() {
                    return;
                }
                for _ in 0..240 {
                    if s.write_all(b"5\r\ntick\n\r\n").await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                let _ = s.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    addr
}

/// Work still running on a session 30 s (`SESSION_END_GRACE`) after the session ended is
/// cut, by the side that ended it alone (`outbound`: the client's trust drops the server's
/// root; otherwise the server's drops the client's). The response streams on through the
/// grace, then the connection is cut and the client sees a broken body, never a complete
/// one.
async fn work_past_the_ends_grace_is_cut(outbound: bool) {
    let (a, b) = (Ca::new("root A"), Ca::new("root B"));
    let both = format!("{}{}", a.pem, b.pem);
    let server_id = a.store_with_bundle(SERVER_ID, &both);
    let server = server_sidecar(Some(server_id.clone()), ticking_app().await);
    let client_id = b.store_with_bundle(CLIENT_ID, &both);
    let client = client_sidecar(Some(client_id.clone()), server.addr, SERVER_ID);

    let mut c = TcpStream::connect(client.addr).await.unwrap();
    c.write_all(b"GET /ticks HTTP/1.1\r\nhost: web\r\n\r\n")
        .await
        .unwrap();
    let mut got = read_until(&mut c, b"tick", "the first tick").await;
    let mut buf = [0u8; 1024];
    // A renewal brings a bundle without the other side's root: that side's session ends.
    let (ending, direction, other, other_direction) = if outbound {
        let renewed = b.issue(CLIENT_ID);
        client_id
            .install_pem(&renewed.chain, &renewed.key, &b.pem)
            .unwrap();
        (&client, "outbound", &server, "inbound")
    } else {
        let renewed = a.issue(SERVER_ID);
        server_id
            .install_pem(&renewed.chain, &renewed.key, &a.pem)
            .unwrap();
        (&server, "inbound", &client, "outbound")
    };
    let end = std::time::Instant::now();
    eventually(
        Duration::from_secs(3),
        "the session's end is counted",
        || {
            let n = ended(ending, direction, "untrusted");
            async move { n == 1 }
        },
    )
    .await;
    // The ticks go on through the grace, then the connection is cut.
    let mut last_tick = end;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await {
            Err(_) => panic!(
                "neither a tick nor the cut within 5 s, at {:?}",
                end.elapsed()
            ),
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                last_tick = std::time::Instant::now();
            }
        }
    }
    let (streamed, cut) = (last_tick - end, end.elapsed());
    assert!(
        streamed >= Duration::from_secs(27),
        "{direction}: the response streamed {streamed:?} of the 30 s grace"
    );
    assert!(
        cut < Duration::from_secs(38),
        "{direction}: cut {cut:?} after the end"
    );
    assert!(
        !got.ends_with(b"0\r\n\r\n"),
        "{direction}: a cut response is never a complete one"
    );
    // The one side ended it: the other saw no end, only the connection go.
    assert_eq!(ended(other, other_direction, "untrusted"), 0, "{direction}");
    eventually(Duration::from_secs(5), "the cut connection closed", || {
        let m = metrics_of(&server);
        async move { metric(&m, "weft_tcp_connections_open{", &["direction=\"inbound\""]) == 0 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_work_still_running_past_the_ends_grace_is_cut() {
    work_past_the_ends_grace_is_cut(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_work_still_running_past_the_ends_grace_is_cut() {
    work_past_the_ends_grace_is_cut(false).await;
}

/// The inbound side's own enforcement, against a client that does not retire its session
/// (hyper's HTTP/2 client over the client end of a `weft-mux` session): at the client's
/// certificate's end the server sends GOAWAY, the request in flight finishes, and the
/// connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_a_mux_session_ends_gracefully_at_the_clients_certificate_expiry() {
    let ca = Ca::new("mesh root");
    // Each request takes 2.5 s: the one sent at 1.5 s is in flight at the expiry.
    let backend = Scripted::always(
        "127.0.0.1",
        "cart",
        Misbehave::Delay(Duration::from_millis(2500)),
    )
    .await;
    let server = server_sidecar(Some(ca.store(SERVER_ID)), backend.addr);
    let client_id = IdentityStore::new().unwrap();
    let leaf = ca.issue_at(CLIENT_ID, -60, 3);
    client_id
        .install_pem(&leaf.chain, &leaf.key, &ca.pem)
        .unwrap();
    let expiry = leaf.ends();
    let tls = client_id.client_tls(Arc::from(SERVER_ID)).unwrap();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let session = tls
        .handshake(
            tcp,
            server.addr,
            weft_proxy::identity::Inner::Mux,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(session),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut req = http::Request::get("/")
        .header(http::header::HOST, "cart")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    weft_proxy::mux::to_mux(&mut req, &|| None);
    let resp = tokio::time::timeout(Duration::from_secs(8), sender.send_request(req))
        .await
        .expect("answered")
        .expect("the request in flight at the expiry finishes");
    assert_eq!(resp.status(), 200);
    assert!(
        std::time::SystemTime::now() > expiry,
        "the answer came after the expiry"
    );
    assert_eq!(ended(&server, "inbound", "peer_certificate_expired"), 1);
    // GOAWAY, then closed once its last stream ended.
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the server closed the session")
        .unwrap()
        .unwrap();
    assert!(sender.is_closed());
    assert_eq!(sessions(&server, "inbound"), 1);
}

#[tokio::test]
async fn an_opaque_tcp_stream_over_mtls_is_closed_at_the_peer_certificates_expiry() {
    let ca = Ca::new("mesh root");
    let (app, _task) = tcp_backend("127.0.0.1", "banner").await;
    let server_id = ca.store(SERVER_ID);
    let leaf = ca.issue_at(SERVER_ID, -60, 3);
    server_id
        .install_pem(&leaf.chain, &leaf.key, &ca.pem)
        .unwrap();
    let expiry = leaf.ends();
    let server = server_sidecar(Some(server_id), app);
    let client = TestProxy::start_kind(
        proxy_with(Some(ca.store(CLIENT_ID))),
        ListenerKind::Forward(Arc::from("web")),
        meshed_config(server.addr, SERVER_ID, true),
    );
    let mut s = connect(client.addr).await;
    let banner = read_exactly(&mut s, 26).await;
    assert!(banner.starts_with("220 hello"), "{banner}");
    echo_roundtrip(&mut s, b"still open").await;
    assert!(
        closed_within(&mut s, Duration::from_secs(8)).await,
        "not closed at the expiry"
    );
    let late = std::time::SystemTime::now()
        .duration_since(expiry)
        .expect("not closed before the certificate's end");
    assert!(
        late < Duration::from_secs(3),
        "closed {late:?} after the expiry"
    );
    assert_eq!(ended(&client, "outbound", "peer_certificate_expired"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawn_trust_ends_the_sessions_it_admitted_and_only_those() {
    let (a, b) = (Ca::new("root A"), Ca::new("root B"));
    let both = format!("{}{}", a.pem, b.pem);
    let backend = Scripted::ok("127.0.0.1", "cart").await;
    let server_id = a.store_with_bundle(SERVER_ID, &both);
    let server = server_sidecar(Some(server_id.clone()), backend.addr);
    // One client on each root, both trusting both.
    let on_b = client_sidecar(
        Some(b.store_with_bundle(CLIENT_ID, &both)),
        server.addr,
        SERVER_ID,
    );
    let on_a = client_sidecar(
        Some(a.store_with_bundle(CLIENT_ID, &both)),
        server.addr,
        SERVER_ID,
    );
    let (c_b, c_a) = (h1_client(), h1_client());
    assert_eq!(get(&c_b, &on_b.url("/")).await.0.status(), 200);
    assert_eq!(get(&c_a, &on_a.url("/")).await.0.status(), 200);
    assert_eq!(sessions(&server, "inbound"), 2);

    // The server's renewal brings a bundle without B (root rotation step 3, or B's key
    // leaked): B's session ends at once, A's is untouched.
    let renewed = a.issue(SERVER_ID);
    server_id
        .install_pem(&renewed.chain, &renewed.key, &a.pem)
        .unwrap();
    eventually(Duration::from_secs(3), "B's session ended", || {
        let n = ended(&server, "inbound", "untrusted");
        async move { n == 1 }
    })
    .await;
    // B's client's next requests need a new session, which the server refuses (counted
    // once the server's side of the handshake has ended, maybe after the client's).
    for _ in 0..2 {
        let (resp, _) = get(&c_b, &on_b.url("/")).await;
        assert_ne!(resp.status(), 200, "B's client is no longer admitted");
    }
    eventually(Duration::from_secs(2), "refused as untrusted", || {
        let m = metrics_of(&server);
        async move {
            metric(
                &m,
                "weft_tls_refused_total",
                &["direction=\"inbound\"", "reason=\"untrusted\""],
            ) >= 1
        }
    })
    .await;
    // A's session goes on: no new handshake for its requests.
    for _ in 0..5 {
        assert_eq!(get(&c_a, &on_a.url("/")).await.0.status(), 200);
    }
    assert_eq!(sessions(&server, "inbound"), 2, "no new session for A");
    assert_eq!(sessions(&on_a, "outbound"), 1);
    assert_eq!(ended(&server, "inbound", "untrusted"), 1);
    assert_eq!(ended(&on_a, "outbound", "untrusted"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_http1_sessions_end_at_the_servers_certificate_expiry_losing_no_request() {
    let ca = Ca::new("mesh root");
    let backend = Scripted::ok("127.0.0.1", "cart").await;
    let server_id = ca.store(SERVER_ID);
    let leaf = ca.issue_at(SERVER_ID, -60, 3);
    server_id
        .install_pem(&leaf.chain, &leaf.key, &ca.pem)
        .unwrap();
    let expiry = leaf.ends();
    let server = server_sidecar(Some(server_id.clone()), backend.addr);
    let client_id = IdentityStore::with_http1(Http1Transport::Sessions).unwrap();
    ca.install(&client_id, CLIENT_ID);
    let client = client_sidecar(Some(client_id), server.addr, SERVER_ID);

    let stop = tokio_util::sync::CancellationToken::new();
    let (ok, failed, load) = steady_load(client.url("/"), 3, stop.clone());
    eventually(Duration::from_secs(5), "requests flow", || {
        let n = ok.load(Ordering::Relaxed);
        async move { n > 10 }
    })
    .await;
    // Read before the renewal: every one of these verified the certificate that expires.
    let before_expiry = sessions(&client, "outbound");
    let renewed = ca.issue(SERVER_ID);
    server_id
        .install_pem(&renewed.chain, &renewed.key, &ca.pem)
        .unwrap();
    assert!((1..=3).contains(&before_expiry), "{before_expiry} sessions");
    // Every session opened before the renewal ends at the expiry; new ones carry the load.
    eventually(Duration::from_secs(8), "each old session ended", || {
        // More may have opened meanwhile (the load's concurrency varies): those end too.
        let n = ended(&client, "outbound", "peer_certificate_expired");
        async move { n >= before_expiry }
    })
    .await;
    let late = std::time::SystemTime::now()
        .duration_since(expiry)
        .expect("not before the certificate's end");
    assert!(
        late < Duration::from_secs(3),
        "ended {late:?} after the expiry"
    );
    keeps_flowing_then_stops(&ok, &failed, load, &stop, "requests flow on new sessions").await;
    assert!(
        sessions(&client, "outbound") > before_expiry,
        "new handshakes"
    );
    assert_eq!(
        metric(
            &metrics_of(&client),
            "weft_tls_sessions_total",
            &["direction=\"outbound\"", "protocol=\"http1\""],
        ),
        sessions(&client, "outbound"),
        "HTTP/1 in sessions of its own"
    );
}
