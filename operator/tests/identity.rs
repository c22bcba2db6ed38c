//! The identity endpoint against the test bed's real API server: a real projected token
//! gets a chain that verifies (rustls/webpki) against the trust bundle and carries exactly
//! the token's SPIFFE ID; each way of asking for another identity, or with a bad token or
//! body, is refused with its reason and counted; two operators share one root.
//!
//! An expired token: the API server mints none shorter than 10 minutes, so the test signs
//! one itself with the test bed's service-account signing key, with the claims of a token
//! the API server minted, and shows first that the same construction with a future expiry
//! is issued. The same construction shows that the accepted-token cache keeps no token
//! past its expiry.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::ensure;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::{
    authentication::v1::TokenRequest,
    core::v1::{Pod, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube::{
    ResourceExt,
    api::{DeleteParams, PostParams},
};
use rcgen::{CertificateParams, KeyPair, PublicKeyData, SanType};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    server::WebPkiClientVerifier,
};
use serde_json::json;
use support::{
    mesh::{Bed, WAIT, http_get},
    processes::IdentityOperator,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
};
use tokio_util::sync::CancellationToken;
use weft_api::identity::{
    CERTIFY_PATH, CertifyRequest, CertifyResponse, IdentityError, MAX_REQUEST_BYTES, reason,
    spiffe_id,
};
use weft_e2e::shared::eventually;
use weft_operator::{
    identity::{self, IdentityCa, IdentityLimits, IdentityServer, ServingSettings},
    metrics::Metrics,
};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

const SERVER_NAME: &str = "weft-operator.weft-system.svc";

/// Where the test's clients connect from, unless a test says otherwise.
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Another client address on loopback (Linux routes all of 127.0.0.0/8 to `lo`).
const OTHER_SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A P-384 key whose CSR is signed with SHA-256 (`openssl req -sha256`): a certificate
/// for it would label the key P-256, so it is refused `unsupported_key`.
const CSR_P384_SHA256: &str = "\
-----BEGIN CERTIFICATE REQUEST-----\n\
MIH4MH8CAQAwADB2MBAGByqGSM49AgEGBSuBBAAiA2IABMa0POIghGfbEfVTKtC7\n\
io5+MtP4E9CT4MFaYcFn9yHFnkHHBjVgChSH89vPBijMfl2LVly8nS74L5lYjvsH\n\
PLCvtz7sa4gjCspHNBe7+WtWnk5ZDkUcylYtXcDb9UsQT6AAMAoGCCqGSM49BAMC\n\
A2kAMGYCMQCz5r7RjulVGlcp1z5wYMagZlo5yAJKlYk0JVaoLGDjB4hLK9d7xZMk\n\
IMjLwKr+ihwCMQDPBjrF9KY7YjiHKTzLvryqxxziyS/WQyd7layBTCNoC+w8lZ16\n\
YjgyIC2JwNDUcf4=\n\
-----END CERTIFICATE REQUEST-----\n\
";

/// One identity endpoint on loopback, as `weft-operator --identity-addr` runs it.
struct Endpoint {
    addr: SocketAddr,
    ca: Arc<IdentityCa>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
}

impl Endpoint {
    async fn start(bed: &Bed, secret: &str, limits: IdentityLimits) -> Endpoint {
        Endpoint::start_reviewing(bed, secret, limits, bed.client.clone()).await
    }

    /// As [`Endpoint::start`], with TokenReviews sent as `reviewer` authenticates (the
    /// trust root is still read and written as the bed's administrator).
    async fn start_reviewing(
        bed: &Bed,
        secret: &str,
        limits: IdentityLimits,
        reviewer: kube::Client,
    ) -> Endpoint {
        let ca = Arc::new(
            identity::ca::load_or_create(bed.client.clone(), &bed.ns, secret)
                .await
                .unwrap(),
        );
        let metrics = Arc::new(Metrics::new());
        let server = Arc::new(IdentityServer::new(
            ca.clone(),
            reviewer,
            "weft".to_owned(),
            "cluster.local".to_owned(),
            Duration::from_secs(24 * 3600),
            limits,
            metrics.clone(),
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let serving = ServingSettings {
            dns_names: vec![SERVER_NAME.to_owned()],
            lifetime: Duration::from_secs(3600),
        };
        tokio::spawn(identity::serve(
            listener,
            server,
            serving,
            stop.clone().cancelled_owned(),
        ));
        Endpoint {
            addr,
            ca,
            metrics,
            stop,
        }
    }

    fn count(&self, sample: &str) -> f64 {
        self.metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    fn refusals(&self, reason: &str) -> f64 {
        self.count(&format!(
            "weft_operator_identity_refusals_total{{reason=\"{reason}\"}}"
        ))
    }
}

fn roots(bundle: &str) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

/// What one request sends.
struct Ask<'a> {
    token: Option<&'a str>,
    pod: &'a str,
    body: Vec<u8>,
    h2: bool,
}

/// A TLS connection to the endpoint at `addr` (verified against `bundle`), speaking
/// HTTP/2 if `h2`, else HTTP/1.1.
async fn connect(
    addr: SocketAddr,
    bundle: &str,
    h2: bool,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    connect_from(LOCALHOST, addr, bundle, h2).await
}

/// [`connect`] from the loopback address `source`.
async fn connect_from(
    source: IpAddr,
    addr: SocketAddr,
    bundle: &str,
    h2: bool,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    try_connect_from(source, addr, bundle, h2).await.unwrap()
}

/// [`connect_from`], or why the TLS handshake failed.
async fn try_connect_from(
    source: IpAddr,
    addr: SocketAddr,
    bundle: &str,
    h2: bool,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(bundle))
        .with_no_client_auth();
    config.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
        .await
}

/// Sends one certificate request over TLS (verifying the endpoint against `bundle`).
async fn send(addr: SocketAddr, bundle: &str, ask: Ask<'_>) -> (StatusCode, Bytes) {
    send_from(LOCALHOST, addr, bundle, ask).await
}

/// [`send`] from the loopback address `source`.
async fn send_from(
    source: IpAddr,
    addr: SocketAddr,
    bundle: &str,
    ask: Ask<'_>,
) -> (StatusCode, Bytes) {
    let tls = connect_from(source, addr, bundle, ask.h2).await;
    request_on(tls, ask).await
}

/// Sends one certificate request on the TLS connection `tls` (HTTP/2 if `ask.h2`).
async fn request_on(
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    ask: Ask<'_>,
) -> (StatusCode, Bytes) {
    let mut req = http::Request::post(format!("https://{SERVER_NAME}{CERTIFY_PATH}"))
        .header(weft_api::push::POD_HEADER, ask.pod)
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(t) = ask.token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Full::new(Bytes::from(ask.body))).unwrap();
    let resp = if ask.h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    };
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

fn csr(key: &KeyPair, sans: Vec<SanType>) -> String {
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(key).unwrap().pem().unwrap()
}

/// `token`'s request for `pod` (namespace/name) over HTTP/2, a CSR with `key` naming
/// nothing.
fn plain_ask<'a>(token: &'a str, pod: &'a str, key: &KeyPair) -> Ask<'a> {
    Ask {
        token: Some(token),
        pod,
        body: body(csr(key, vec![]), None),
        h2: true,
    }
}

fn body(csr: String, identity: Option<String>) -> Vec<u8> {
    serde_json::to_vec(&CertifyRequest { csr, identity }).unwrap()
}

/// The projected token of pod `web-1` (at `ip`) of ServiceAccount `web`, both created.
async fn web_token(bed: &Bed, ip: &str) -> String {
    bed.service_account("web").await;
    let pod = bed.pod("web-1", "web", "web", ip).await;
    bed.token(&pod).await
}

/// A token for ServiceAccount `sa` with `audiences`, bound to `pod`.
async fn token_for(bed: &Bed, pod: &Pod, audiences: &[&str]) -> String {
    let sa = pod
        .spec
        .as_ref()
        .unwrap()
        .service_account_name
        .clone()
        .unwrap();
    request_token(
        bed,
        &sa,
        json!({"audiences": audiences, "expirationSeconds": 3600,
               "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod.name_any(), "uid": pod.uid().unwrap()}}),
    )
    .await
}

/// A token for ServiceAccount `sa` of the bed's namespace, by a TokenRequest with `spec`.
async fn request_token(bed: &Bed, sa: &str, spec: serde_json::Value) -> String {
    let req: TokenRequest = serde_json::from_value(json!({ "spec": spec })).unwrap();
    bed.api::<ServiceAccount>()
        .create_subresource::<TokenRequest, TokenRequest>("token", sa, &PostParams::default(), &req)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
}

/// Asserts that the answer is a refusal with `want` status and `code`.
fn assert_refused(status: StatusCode, body: &Bytes, want: StatusCode, code: &str) {
    assert_eq!(refused(status, body), (want, code.to_owned()));
}

fn refused(status: StatusCode, body: &Bytes) -> (StatusCode, String) {
    let e: IdentityError = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not an IdentityError: {}", String::from_utf8_lossy(body)));
    assert!(!e.message.is_empty());
    (status, e.reason)
}

/// Verifies `chain` against `bundle` as a proxy verifying a client would, and returns the
/// leaf's URI SANs.
fn verify(chain: &str, bundle: &str) -> Vec<String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain.as_bytes())
        .map(Result::unwrap)
        .collect();
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(bundle)),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(&certs[0], &certs[1..], UnixTime::now())
        .expect("the chain verifies against the trust bundle");
    let (_, leaf) = X509Certificate::from_der(&certs[0]).unwrap();
    let sans = leaf.subject_alternative_name().unwrap().unwrap();
    sans.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => u.to_string(),
            other => panic!("a name other than the URI: {other:?}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projected_token_gets_a_chain_for_its_service_account_that_verifies_against_the_bundle() {
    weft_e2e::shared::init_tracing();
    let bed = Bed::new("identity-ok").await;
    let token = web_token(&bed, "198.18.240.11").await;
    let ep = Endpoint::start(
        &bed,
        "weft-identity",
        IdentityLimits {
            per_identity_burst: 2,
            per_identity_rate: 0.001,
            ..IdentityLimits::default()
        },
    )
    .await;
    let want = spiffe_id("cluster.local", &bed.ns, "web");
    let who = format!("{}/web-1", bed.ns);
    let bundle = ep.ca.trust_bundle().to_owned();
    for h2 in [true, false] {
        let key = KeyPair::generate().unwrap();
        let ask = Ask {
            token: Some(&token),
            pod: &who,
            // The subject and a DNS name in the CSR are ignored, never copied.
            body: body(
                csr(
                    &key,
                    vec![SanType::DnsName("evil.example".try_into().unwrap())],
                ),
                Some(want.clone()),
            ),
            h2,
        };
        let (status, answer) = send(ep.addr, &bundle, ask).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&answer)
        );
        let r: CertifyResponse = serde_json::from_slice(&answer).unwrap();
        assert_eq!(r.identity, want);
        assert_eq!(r.trust_bundle, bundle);
        assert_eq!(
            verify(&r.certificate_chain, &r.trust_bundle),
            vec![want.clone()]
        );
        let leaf = CertificateDer::pem_slice_iter(r.certificate_chain.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let (_, leaf) = X509Certificate::from_der(&leaf).unwrap();
        assert_eq!(
            leaf.public_key().raw,
            key.subject_public_key_info().as_slice(),
            "the proxy's own key"
        );
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && eku.server_auth);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            (now + 24 * 3600 - 60..=now + 24 * 3600 + 60).contains(&r.not_after),
            "24 h: {} vs {now}",
            r.not_after
        );
        assert_eq!(leaf.validity().not_after.timestamp() as u64, r.not_after);
    }
    assert_eq!(ep.count("weft_operator_identity_issued_total"), 2.0);
    // The same pod asking a third time within its burst of 2: 429 with Retry-After.
    let key = KeyPair::generate().unwrap();
    let (status, answer) = send(
        ep.addr,
        &bundle,
        Ask {
            token: Some(&token),
            pod: &who,
            body: body(csr(&key, vec![]), None),
            h2: true,
        },
    )
    .await;
    assert_refused(
        status,
        &answer,
        StatusCode::TOO_MANY_REQUESTS,
        reason::RATE_LIMITED,
    );
    assert_eq!(ep.refusals(reason::RATE_LIMITED), 1.0);
    assert!(
        ep.metrics
            .encode()
            .contains("weft_operator_identity_request_duration_seconds_count 3"),
        "every answer is timed"
    );
    ep.stop.cancel();
    bed.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_refusal_has_its_reason_status_and_count() {
    weft_e2e::shared::init_tracing();
    let bed = Bed::new("identity-refused").await;
    bed.service_account("web").await;
    bed.service_account("db").await;
    bed.service_account("gone").await;
    let web = bed.pod("web-1", "web", "web", "198.18.240.12").await;
    let db = bed.pod("db-1", "db", "db", "198.18.240.13").await;
    let gone = bed.pod("gone-1", "gone", "gone", "198.18.240.14").await;
    let dead = bed.pod("dead-1", "web", "web", "198.18.240.15").await;
    let ep = Endpoint::start(&bed, "weft-identity", IdentityLimits::default()).await;
    let bundle = ep.ca.trust_bundle().to_owned();
    let ns = bed.ns.clone();
    let key = KeyPair::generate().unwrap();
    let plain = || body(csr(&key, vec![]), None);

    let web_token = bed.token(&web).await;
    let db_token = bed.token(&db).await;
    let other_audience = token_for(&bed, &web, &["other"]).await;
    let gone_token = bed.token(&gone).await;
    bed.api::<ServiceAccount>()
        .delete("gone", &DeleteParams::default())
        .await
        .unwrap();
    let dead_token = bed.token(&dead).await;
    bed.api::<Pod>()
        .delete(
            "dead-1",
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let web_pod = format!("{ns}/web-1");
    let (db_pod, gone_pod, dead_pod) = (
        format!("{ns}/db-1"),
        format!("{ns}/gone-1"),
        format!("{ns}/dead-1"),
    );
    let web_id = spiffe_id("cluster.local", &ns, "web");

    let cases: Vec<(&str, Ask<'_>, StatusCode, &str)> = vec![
        (
            "a token for another audience",
            Ask { token: Some(&other_audience), pod: &web_pod, body: plain(), h2: true },
            StatusCode::FORBIDDEN,
            reason::NOT_A_SERVICE_ACCOUNT,
        ),
        (
            "no token",
            Ask { token: None, pod: &web_pod, body: plain(), h2: true },
            StatusCode::UNAUTHORIZED,
            reason::TOKEN_INVALID,
        ),
        (
            "a token that is not one",
            Ask { token: Some("garbage"), pod: &web_pod, body: plain(), h2: true },
            StatusCode::UNAUTHORIZED,
            reason::TOKEN_INVALID,
        ),
        (
            "the token of a deleted ServiceAccount",
            Ask { token: Some(&gone_token), pod: &gone_pod, body: plain(), h2: true },
            StatusCode::UNAUTHORIZED,
            reason::TOKEN_INVALID,
        ),
        (
            "the token of a deleted pod",
            Ask { token: Some(&dead_token), pod: &dead_pod, body: plain(), h2: true },
            StatusCode::UNAUTHORIZED,
            reason::TOKEN_INVALID,
        ),
        (
            "db's token asking for web's identity",
            Ask { token: Some(&db_token), pod: &db_pod, body: body(csr(&key, vec![]), Some(web_id.clone())), h2: true },
            StatusCode::FORBIDDEN,
            reason::IDENTITY_MISMATCH,
        ),
        (
            "db's token presented for web's pod",
            Ask { token: Some(&db_token), pod: &web_pod, body: plain(), h2: true },
            StatusCode::FORBIDDEN,
            reason::IDENTITY_MISMATCH,
        ),
        (
            "a CSR asking for web in another namespace",
            Ask {
                token: Some(&web_token),
                pod: &web_pod,
                body: body(
                    csr(&key, vec![SanType::URI(spiffe_id("cluster.local", "kube-system", "web").try_into().unwrap())]),
                    None,
                ),
                h2: true,
            },
            StatusCode::FORBIDDEN,
            reason::IDENTITY_MISMATCH,
        ),
        (
            "a pod header naming another namespace",
            Ask { token: Some(&web_token), pod: "kube-system/web-1", body: plain(), h2: true },
            StatusCode::FORBIDDEN,
            reason::IDENTITY_MISMATCH,
        ),
        (
            "a garbage body",
            Ask { token: Some(&web_token), pod: &web_pod, body: b"\x00not json".to_vec(), h2: false },
            StatusCode::BAD_REQUEST,
            reason::BAD_REQUEST,
        ),
        (
            "a CSR that is not one",
            Ask { token: Some(&web_token), pod: &web_pod, body: body("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(), None), h2: true },
            StatusCode::BAD_REQUEST,
            reason::BAD_REQUEST,
        ),
        (
            "a P-384 key signed with SHA-256",
            Ask { token: Some(&web_token), pod: &web_pod, body: body(CSR_P384_SHA256.into(), None), h2: true },
            StatusCode::BAD_REQUEST,
            weft_api::identity::reason::UNSUPPORTED_KEY,
        ),
        (
            "no pod header",
            Ask { token: Some(&web_token), pod: "web-1", body: plain(), h2: true },
            StatusCode::BAD_REQUEST,
            reason::BAD_REQUEST,
        ),
        (
            "a body over the limit",
            Ask { token: Some(&web_token), pod: &web_pod, body: vec![b' '; MAX_REQUEST_BYTES + 1], h2: true },
            StatusCode::PAYLOAD_TOO_LARGE,
            reason::TOO_LARGE,
        ),
    ];
    let mut failures = Vec::new();
    for (what, ask, status, code) in cases {
        let before = ep.refusals(code);
        let (got, answer) = send(ep.addr, &bundle, ask).await;
        if got == StatusCode::OK {
            failures.push(format!("{what}: issued"));
            continue;
        }
        let (got, got_code) = refused(got, &answer);
        if (got, got_code.as_str()) != (status, code) {
            failures.push(format!(
                "{what}: {got} {got_code}, want {status} {code}: {}",
                String::from_utf8_lossy(&answer)
            ));
        } else if ep.refusals(code) != before + 1.0 {
            failures.push(format!("{what}: not counted under {code}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(ep.count("weft_operator_identity_issued_total"), 0.0);
    // And web's own request, after all that, is issued.
    let (status, answer) = send(
        ep.addr,
        &bundle,
        Ask {
            token: Some(&web_token),
            pod: &web_pod,
            body: body(
                csr(
                    &key,
                    vec![SanType::URI(web_id.as_str().try_into().unwrap())],
                ),
                Some(web_id.clone()),
            ),
            h2: true,
        },
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&answer)
    );
    ep.stop.cancel();
    bed.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_racing_on_a_missing_secret_issue_chains_from_one_root() {
    weft_e2e::shared::init_tracing();
    let bed = Bed::new("identity-ha").await;
    bed.service_account("web").await;
    let pod = bed.pod("web-1", "web", "web", "198.18.240.16").await;
    let token = bed.token(&pod).await;
    let (a, b) = tokio::join!(
        Endpoint::start(&bed, "weft-identity", IdentityLimits::default()),
        Endpoint::start(&bed, "weft-identity", IdentityLimits::default()),
    );
    assert_eq!(a.ca.root_fingerprint(), b.ca.root_fingerprint());
    assert_eq!(a.ca.trust_bundle(), b.ca.trust_bundle());
    let who = format!("{}/web-1", bed.ns);
    let mut chains = Vec::new();
    for ep in [&a, &b] {
        let key = KeyPair::generate().unwrap();
        let (status, answer) = send(
            ep.addr,
            ep.ca.trust_bundle(),
            Ask {
                token: Some(&token),
                pod: &who,
                body: body(csr(&key, vec![]), None),
                h2: true,
            },
        )
        .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&answer)
        );
        chains.push(
            serde_json::from_slice::<CertifyResponse>(&answer)
                .unwrap()
                .certificate_chain,
        );
    }
    // Each replica derives its own issuing CA: the chains differ, the root is shared.
    assert_ne!(chains[0], chains[1]);
    let want = vec![spiffe_id("cluster.local", &bed.ns, "web")];
    assert_eq!(verify(&chains[0], b.ca.trust_bundle()), want);
    assert_eq!(verify(&chains[1], a.ca.trust_bundle()), want);
    // A third start reads the Secret the race left behind.
    let c = Endpoint::start(&bed, "weft-identity", IdentityLimits::default()).await;
    assert_eq!(c.ca.root_fingerprint(), a.ca.root_fingerprint());
    for ep in [a, b, c] {
        ep.stop.cancel();
    }
    bed.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_its_one_in_flight_slot_held_by_a_slow_client_the_endpoint_answers_429_after_2s() {
    weft_e2e::shared::init_tracing();
    let bed = Bed::new("identity-busy").await;
    let token = web_token(&bed, "198.18.240.17").await;
    let dir = tempfile::tempdir().unwrap();
    // The operator process, as deployed, with `--identity-in-flight 1` and one request in
    // flight per source address.
    let one_slot = [
        "--identity-in-flight",
        "1",
        "--identity-in-flight-per-source",
        "1",
    ];
    let op = IdentityOperator::start(&bed, dir.path(), SERVER_NAME, &one_slot).await;
    let bundle = std::fs::read_to_string(&op.trust_root).unwrap();
    eventually(WAIT, || async {
        Ok(TcpStream::connect(op.identity).await?)
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", op.proc.log_tail()));
    let who = format!("{}/web-1", bed.ns);
    let key = KeyPair::generate().unwrap();
    let ask = || plain_ask(&token, &who, &key);
    let metrics = || async {
        let (_, m) = http_get(op.admin, "/metrics").await.unwrap();
        m
    };
    let count = |m: &str, reason: &str| {
        let series = format!("weft_operator_identity_refusals_total{{reason=\"{reason}\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(series.as_str())?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };

    // A slow client: its request holds the one slot while the endpoint waits for the body.
    let slow_request = slow_request(&who);
    let mut slow = connect(op.identity, &bundle, false).await;
    slow.write_all(slow_request.as_bytes()).await.unwrap();
    slow.flush().await.unwrap();

    // A proxy's request (from another address: the slow client's has its one place per
    // source) now waits for the slot, then is refused with its reason. (The first try
    // can win the race with the slow client's request and be issued.)
    let (waited, message) = eventually(WAIT, || async {
        let asked = Instant::now();
        let (status, answer) = send_from(OTHER_SOURCE, op.identity, &bundle, ask()).await;
        let waited = asked.elapsed();
        ensure!(
            status == StatusCode::TOO_MANY_REQUESTS,
            "{status}: {}",
            String::from_utf8_lossy(&answer)
        );
        let e: IdentityError = serde_json::from_slice(&answer)?;
        ensure!(e.reason == reason::RATE_LIMITED, "reason {}", e.reason);
        Ok((waited, e.message))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", op.proc.log_tail()));
    assert!(
        message.contains("in progress"),
        "refused for the slot, not the identity's rate: {message}"
    );
    assert!(
        (Duration::from_secs(2)..Duration::from_secs(5)).contains(&waited),
        "refused after {waited:?}, the documented wait is 2 s"
    );
    let m = metrics().await;
    assert_eq!(count(&m, reason::RATE_LIMITED), 1.0, "{m}");
    // From the slow client's own address, with `--identity-in-flight-per-source 1`:
    // refused at once, with the per-source reason, not after the wait for a slot.
    let asked = Instant::now();
    let (status, answer) = send(op.identity, &bundle, ask()).await;
    assert_refused(
        status,
        &answer,
        StatusCode::TOO_MANY_REQUESTS,
        reason::SOURCE_IN_FLIGHT,
    );
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    let m = metrics().await;
    assert_eq!(count(&m, reason::SOURCE_IN_FLIGHT), 1.0, "{m}");
    assert_eq!(count(&m, reason::RATE_LIMITED), 1.0, "{m}");

    // The slow client gives up: the slot is free, the same request is issued at once,
    // and the abandoned body is a bad request, not one over the size limit.
    drop(slow);
    let asked = Instant::now();
    let (status, answer) = send(op.identity, &bundle, ask()).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    eventually(WAIT, || async {
        let m = metrics().await;
        ensure!(count(&m, reason::BAD_REQUEST) == 1.0, "bad_request: {m}");
        ensure!(count(&m, reason::TOO_LARGE) == 0.0, "too_large: {m}");
        Ok(())
    })
    .await
    .unwrap();

    // A slow client that stays holds the slot only until the body's deadline (10 s),
    // then gets 408.
    let mut slow = connect(op.identity, &bundle, false).await;
    let started = Instant::now();
    slow.write_all(slow_request.as_bytes()).await.unwrap();
    slow.flush().await.unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(15), slow.read_exact(&mut head))
        .await
        .expect("an answer within 15 s")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 408", "{}", String::from_utf8_lossy(&head));
    assert!(
        (Duration::from_secs(10)..Duration::from_secs(13)).contains(&started.elapsed()),
        "answered after {:?}",
        started.elapsed()
    );
    drop(op);
    bed.cleanup().await;
}

/// A slow client's request for `who`'s certificate: the headers and the first byte of a
/// 1 KiB body, then nothing, so it holds its place at the endpoint until the body's
/// deadline (10 s).
fn slow_request(who: &str) -> String {
    format!(
        "POST {CERTIFY_PATH} HTTP/1.1\r\nhost: {SERVER_NAME}\r\n{}: {who}\r\n\
         content-type: application/json\r\ncontent-length: 1024\r\n\r\n{{",
        weft_api::push::POD_HEADER
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_holding_four_slow_requests_is_refused_at_once_while_another_address_is_issued() {
    weft_e2e::shared::init_tracing();
    let bed = Bed::new("identity-source").await;
    let token = web_token(&bed, "198.18.240.19").await;
    // The defaults, as `weft-operator` runs without flags.
    let limits = IdentityLimits::default();
    let per_source = limits.max_in_flight_per_source.map_or(0, |n| n.get());
    assert_eq!(per_source, 4, "the documented default");
    let ep = Endpoint::start(&bed, "weft-identity", limits).await;
    let bundle = ep.ca.trust_bundle().to_owned();
    let who = format!("{}/web-1", bed.ns);
    let key = KeyPair::generate().unwrap();

    // Four slow clients on 127.0.0.1, each on its own connection: every request holds
    // its place (and a slot of the 256) while the endpoint waits for its body.
    let mut slow = Vec::new();
    for _ in 0..per_source {
        let mut c = connect(ep.addr, &bundle, false).await;
        c.write_all(slow_request(&who).as_bytes()).await.unwrap();
        c.flush().await.unwrap();
        slow.push(c);
    }
    // Until the endpoint has read all four, a probe without a token can get in (and is
    // refused 401 at once); then the source is full.
    eventually(WAIT, || async {
        let probe = Ask {
            token: None,
            ..plain_ask("", &who, &key)
        };
        let (status, answer) = send(ep.addr, &bundle, probe).await;
        let (status, code) = refused(status, &answer);
        ensure!(code == reason::SOURCE_IN_FLIGHT, "{status} {code}");
        Ok(())
    })
    .await
    .unwrap();

    // A proxy's request from that address: refused at once (not after the 2 s wait for
    // a slot, of which 252 are free), with its own reason, and counted under it.
    let before = ep.refusals(reason::SOURCE_IN_FLIGHT);
    let asked = Instant::now();
    let (status, answer) = send(ep.addr, &bundle, plain_ask(&token, &who, &key)).await;
    let took = asked.elapsed();
    assert_refused(
        status,
        &answer,
        StatusCode::TOO_MANY_REQUESTS,
        reason::SOURCE_IN_FLIGHT,
    );
    assert!(took < Duration::from_secs(2), "refused after {took:?}");
    assert_eq!(ep.refusals(reason::SOURCE_IN_FLIGHT), before + 1.0);
    assert_eq!(ep.refusals(reason::RATE_LIMITED), 0.0);

    // The same request from another address is issued: one source cannot starve others.
    let (status, answer) = send_from(
        OTHER_SOURCE,
        ep.addr,
        &bundle,
        plain_ask(&token, &who, &key),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // One slow client goes away: its place is freed, and its address is issued again.
    drop(slow.pop());
    eventually(WAIT, || async {
        let (status, answer) = send(ep.addr, &bundle, plain_ask(&token, &who, &key)).await;
        ensure!(
            status == StatusCode::OK,
            "{status}: {}",
            String::from_utf8_lossy(&answer)
        );
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(ep.count("weft_operator_identity_issued_total"), 2.0);
    drop(slow);
    ep.stop.cancel();
    bed.cleanup().await;
}

/// Reads from `conn` until the endpoint closes it (end of stream or an error), for at
/// most `within`; how long after `since` (its handshake, when the endpoint's idle timer
/// started) that was, or `None` if it stayed open.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    (mut conn, since): (S, Instant),
    within: Duration,
) -> Option<Duration> {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return since.elapsed(),
                // A GOAWAY, SETTINGS or an answer: not yet closed.
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_nothing_after_the_tls_handshake_are_closed_after_10s() {
    weft_e2e::shared::init_tracing();
    let bed = Bed::new("identity-idle").await;
    let ep = Endpoint::start(&bed, "weft-identity", IdentityLimits::default()).await;
    let bundle = ep.ca.trust_bundle().to_owned();
    let who = format!("{}/web-1", bed.ns);
    let key = KeyPair::generate().unwrap();
    // The documented bound: 10 s without a request in progress, and the close itself.
    // Each connection is timed from its own handshake; the bounds leave a loaded 2-core
    // runner room for scheduling, and the preface-only close (~11 s) room above.
    let bound = Duration::from_secs(10);
    let (earliest, latest) = (
        bound - Duration::from_secs(1),
        bound + Duration::from_secs(4),
    );

    // After the handshake: nothing at all (HTTP/2 by ALPN, and HTTP/1.1); the HTTP/2
    // preface and SETTINGS but no request; half a request head.
    let silent_h2 = (connect(ep.addr, &bundle, true).await, Instant::now());
    let silent_h1 = (connect(ep.addr, &bundle, false).await, Instant::now());
    let mut preface_only = connect(ep.addr, &bundle, true).await;
    let preface_since = Instant::now();
    preface_only
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    preface_only.flush().await.unwrap();
    let mut half_head = connect(ep.addr, &bundle, false).await;
    let half_head_since = Instant::now();
    half_head
        .write_all(format!("POST {CERTIFY_PATH} HTTP/1.1\r\nhost: x\r\n").as_bytes())
        .await
        .unwrap();
    half_head.flush().await.unwrap();
    let within = latest + Duration::from_secs(3);
    let closed = futures::future::join_all([
        closed_within(silent_h2, within),
        closed_within(silent_h1, within),
        closed_within((preface_only, preface_since), within),
        closed_within((half_head, half_head_since), within),
    ])
    .await;

    let names = [
        "silent h2",
        "silent http/1.1",
        "preface only",
        "half a head",
    ];
    for (name, closed) in names.iter().zip(&closed) {
        let took = closed.unwrap_or_else(|| panic!("{name}: still open after {within:?}"));
        assert!(
            took >= earliest && took < latest,
            "{name}: closed after {took:?}"
        );
    }

    // An HTTP/2 connection left idle after an answer (a refusal: no token) is closed too.
    let tls = connect(ep.addr, &bundle, true).await;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::post(format!("https://{SERVER_NAME}{CERTIFY_PATH}"))
        .header(weft_api::push::POD_HEADER, &who)
        .body(Full::new(Bytes::from(body(csr(&key, vec![]), None))))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let answered = Instant::now();
    tokio::time::timeout(within, conn)
        .await
        .expect("the idle HTTP/2 connection is closed")
        .unwrap()
        .ok();
    let idle_h2 = answered.elapsed();

    assert!(
        idle_h2 >= earliest && idle_h2 < latest,
        "idle h2: closed after {idle_h2:?}"
    );
    eventually(WAIT, || async {
        let open = ep.count("weft_operator_identity_connections");
        ensure!(open == 0.0, "{open} connections still counted open");
        Ok(())
    })
    .await
    .unwrap();
    ep.stop.cancel();
    bed.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed_at_once_while_open_ones_still_work() {
    weft_e2e::shared::init_tracing();
    let bed = Bed::new("identity-conns").await;
    let token = web_token(&bed, "198.18.240.20").await;
    let ep = Endpoint::start(
        &bed,
        "weft-identity",
        IdentityLimits {
            max_connections: 3,
            ..IdentityLimits::default()
        },
    )
    .await;
    let bundle = ep.ca.trust_bundle().to_owned();
    let who = format!("{}/web-1", bed.ns);
    let key = KeyPair::generate().unwrap();

    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect(ep.addr, &bundle, true).await);
    }
    assert_eq!(ep.count("weft_operator_identity_connections"), 3.0);
    // A fourth: closed as soon as accepted, before any TLS, and counted.
    let fourth = try_connect_from(LOCALHOST, ep.addr, &bundle, true).await;
    assert!(fourth.is_err(), "a fourth connection completed TLS");
    assert_eq!(
        ep.count("weft_operator_identity_connections_refused_total"),
        1.0
    );
    // The three still work: one asks and is issued.
    let (status, answer) = request_on(held.pop().unwrap(), plain_ask(&token, &who, &key)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // Once one goes, a new connection is taken again.
    drop(held.pop());
    let (status, answer) = eventually(WAIT, || async {
        let tls = try_connect_from(LOCALHOST, ep.addr, &bundle, true).await?;
        Ok(request_on(tls, plain_ask(&token, &who, &key)).await)
    })
    .await
    .unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&answer)
    );
    drop(held);
    ep.stop.cancel();
    bed.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_more_than_its_share_of_connections() {
    weft_e2e::shared::init_tracing();
    let bed = Bed::new("identity-conns-per-address").await;
    let token = web_token(&bed, "198.18.240.21").await;
    let ep = Endpoint::start(
        &bed,
        "weft-identity",
        IdentityLimits {
            max_connections: 10,
            max_connections_per_address: std::num::NonZeroUsize::new(2),
            ..IdentityLimits::default()
        },
    )
    .await;
    let bundle = ep.ca.trust_bundle().to_owned();
    let who = format!("{}/web-1", bed.ns);
    let key = KeyPair::generate().unwrap();

    let mut held = vec![
        connect(ep.addr, &bundle, true).await,
        connect(ep.addr, &bundle, true).await,
    ];
    // A third from the same address: closed at accept, before any TLS, and counted
    // apart from the server-wide cap, which is far from full.
    let third = try_connect_from(LOCALHOST, ep.addr, &bundle, true).await;
    assert!(
        third.is_err(),
        "a third connection from one address completed TLS"
    );
    assert_eq!(
        ep.count("weft_operator_identity_connections_refused_per_address_total"),
        1.0
    );
    assert_eq!(
        ep.count("weft_operator_identity_connections_refused_total"),
        0.0
    );
    // Another address is not held back by it, and is issued.
    let tls = try_connect_from(OTHER_SOURCE, ep.addr, &bundle, true)
        .await
        .unwrap();
    let (status, answer) = request_on(tls, plain_ask(&token, &who, &key)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // A connection that fails its handshake gives its place back too: with one of the
    // two held, garbage instead of TLS, then a TLS connection that must be taken.
    drop(held.pop());
    eventually(WAIT, || async {
        ensure!(ep.count("weft_operator_identity_connections") == 1.0);
        Ok(())
    })
    .await
    .unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = TcpStream::connect(ep.addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut rest)).await;
    }
    // Once it has gone, the address has a place again: the one its closed connection
    // and the one its failed handshake held were both given back.
    eventually(WAIT, || async {
        ensure!(ep.count("weft_operator_identity_connections") == 1.0);
        Ok(())
    })
    .await
    .unwrap();
    held.push(
        try_connect_from(LOCALHOST, ep.addr, &bundle, true)
            .await
            .unwrap(),
    );
    assert_eq!(
        ep.count("weft_operator_identity_connections_refused_per_address_total"),
        1.0
    );
    drop(held);
    ep.stop.cancel();
    bed.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_tls_handshakes_at_the_endpoint_are_counted_by_reason() {
    use tokio::io::AsyncWriteExt;
    weft_e2e::shared::init_tracing();
    let bed = Bed::new("identity-handshakes").await;
    let ep = Endpoint::start(&bed, "weft-identity", IdentityLimits::default()).await;
    let bundle = ep.ca.trust_bundle().to_owned();
    let failures = |reason: &str| {
        ep.count(&format!(
            "weft_operator_identity_tls_handshake_failures_total{{reason=\"{reason}\"}}"
        ))
    };

    // A TCP probe: connects and goes.
    drop(TcpStream::connect(ep.addr).await.unwrap());
    // Plain text HTTP to the TLS port.
    let mut plain = TcpStream::connect(ep.addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // A client that speaks TLS 1.2 only.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let old = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots(&bundle))
        .with_no_client_auth();
    let tcp = TcpStream::connect(ep.addr).await.unwrap();
    let refused = tokio_rustls::TlsConnector::from(Arc::new(old))
        .connect(ServerName::try_from(SERVER_NAME).unwrap(), tcp)
        .await;
    assert!(refused.is_err(), "a TLS 1.2 client completed a handshake");
    // A client that trusts another root, as after a trust-root rotation gone wrong.
    let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other = other
        .self_signed(&KeyPair::generate().unwrap())
        .unwrap()
        .pem();
    let refused = try_connect_from(LOCALHOST, ep.addr, &other, true).await;
    assert!(
        refused.is_err(),
        "a client of another root trusted the endpoint"
    );
    eventually(WAIT, || async {
        let seen = [
            failures("closed"),
            failures("other"),
            failures("incompatible"),
            failures("certificate"),
        ];
        ensure!(
            seen == [1.0, 1.0, 1.0, 1.0],
            "closed, other, incompatible, certificate: {seen:?}"
        );
        Ok(())
    })
    .await
    .unwrap();
    drop(plain);
    // A good client still gets through, and counts as no failure.
    drop(connect(ep.addr, &bundle, true).await);
    assert_eq!(failures("certificate"), 1.0);
    assert_eq!(failures("timeout"), 0.0);
    ep.stop.cancel();
    bed.cleanup().await;
}

/// A TCP relay to the test bed's API server that can hold every byte it relays, as a
/// network partition between the operator and the API server would: open, TokenReviews
/// reach the real API server; held, they hang.
struct Relay {
    url: String,
    open: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Relay {
    async fn start() -> Relay {
        let server: http::Uri = weft_e2e::shared::testbed().server().parse().unwrap();
        let upstream = format!("{}:{}", server.host().unwrap(), server.port_u16().unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let open = Arc::new(tokio::sync::watch::Sender::new(true));
        let gate = open.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(Relay::pump(client_read, server_write, gate.subscribe()));
                tokio::spawn(Relay::pump(server_read, client_write, gate.subscribe()));
            }
        });
        Relay { url, open }
    }

    /// Copies `from` to `to`, holding what it read while the relay is held.
    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut open: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if open.wait_for(|open| *open).await.is_err() || to.write_all(&buf[..n]).await.is_err()
            {
                return;
            }
        }
    }

    fn hold(&self) {
        self.open.send_replace(false);
    }

    fn release(&self) {
        self.open.send_replace(true);
    }

    /// A client of the API server through this relay, as the bed's administrator.
    async fn client(&self) -> kube::Client {
        let kubeconfig =
            kube::config::Kubeconfig::read_from(weft_e2e::shared::testbed().kubeconfig()).unwrap();
        let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        config.cluster_url = self.url.parse().unwrap();
        kube::Client::try_from(config).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_api_server_unreachable_a_proxy_is_answered_unavailable_before_its_timeout() {
    weft_e2e::shared::init_tracing();
    let bed = Bed::new("identity-partition").await;
    bed.service_account("web").await;
    let pod = bed.pod("web-1", "web", "web", "198.18.240.21").await;
    let relay = Relay::start().await;
    let ep = Endpoint::start_reviewing(
        &bed,
        "weft-identity",
        IdentityLimits::default(),
        relay.client().await,
    )
    .await;
    let bundle = ep.ca.trust_bundle().to_owned();
    let who = format!("{}/web-1", bed.ns);
    // weft-proxy's own identity client, with its 10 s request timeout; each step with a
    // fresh token, so that none is answered from the accepted-token cache.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let proxy = weft_proxy::identity::client::IdentityClient::new(
        weft_proxy::identity::client::IdentityClientConfig {
            addr: ep.addr.to_string(),
            server_name: ServerName::try_from(SERVER_NAME).unwrap(),
            trust_roots: roots(&bundle),
            token_file: Some(token_file.clone()),
            pod: who.clone(),
            expected: None,
        },
        weft_proxy::identity::IdentityStore::new().unwrap(),
        Arc::new(weft_proxy::metrics::Metrics::new()),
    )
    .unwrap();
    let fresh_token = || async { std::fs::write(&token_file, bed.token(&pod).await).unwrap() };

    // Through the relay, open: the real API server reviews the token.
    fresh_token().await;
    proxy.certify_once().await.unwrap();

    // The API server unreachable: the proxy gets `unavailable` and its reason before its
    // own timeout, and the refusal is counted.
    relay.hold();
    fresh_token().await;
    let asked = Instant::now();
    let e = proxy.certify_once().await.err().unwrap();
    let took = asked.elapsed();
    match &e {
        weft_proxy::identity::client::ClientError::Refused {
            status,
            reason,
            message,
        } => {
            assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(reason, reason::UNAVAILABLE);
            assert!(message.contains("timed out"), "{message}");
        }
        other => panic!("not the operator's answer: {other}"),
    }
    assert!(took < Duration::from_secs(9), "answered after {took:?}");
    assert_eq!(ep.refusals(reason::UNAVAILABLE), 1.0);

    // A client that gives up while the review hangs (its HTTP/2 stream reset) is still
    // counted, at the step it gave up at.
    let abandoned = r#"weft_operator_identity_abandoned_total{step="token_review"}"#;
    let token = bed.token(&pod).await;
    let key = KeyPair::generate().unwrap();
    let gave_up = tokio::time::timeout(
        Duration::from_secs(1),
        send(ep.addr, &bundle, plain_ask(&token, &who, &key)),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "answered while the API server is unreachable"
    );
    eventually(WAIT, || async {
        ensure!(ep.count(abandoned) == 1.0, "{}", ep.metrics.encode());
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(ep.refusals(reason::UNAVAILABLE), 1.0);

    // The API server reachable again: issued.
    relay.release();
    fresh_token().await;
    eventually(WAIT, || async { Ok(proxy.certify_once().await?) })
        .await
        .unwrap();
    ep.stop.cancel();
    bed.cleanup().await;
}

/// The header and claims of the JWT `token`.
fn jwt_parts(token: &str) -> (serde_json::Value, serde_json::Value) {
    let mut parts = token.split('.').map(|p| {
        let json = URL_SAFE_NO_PAD.decode(p).unwrap();
        serde_json::from_slice::<serde_json::Value>(&json).unwrap()
    });
    (parts.next().unwrap(), parts.next().unwrap())
}

/// A JWT with `header` and `claims`, signed as the test bed's API server signs
/// service-account tokens: with its `--service-account-signing-key-file`, an ECDSA P-256
/// key (ES256, the signature as r ‖ s).
fn sign_as_the_api_server(header: &serde_json::Value, claims: &serde_json::Value) -> String {
    assert_eq!(
        header["alg"], "ES256",
        "the bed's signing key is ECDSA P-256 (e2e/src/certs.rs)"
    );
    let path = weft_e2e::shared::testbed()
        .dir()
        .join(weft_e2e::certs::files::SA_KEY);
    let pem = std::fs::read(&path).unwrap();
    let PrivateKeyDer::Pkcs8(der) = PrivateKeyDer::from_pem_slice(&pem).unwrap() else {
        panic!("{} is not PKCS#8", path.display());
    };
    let rng = ring::rand::SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        der.secret_pkcs8_der(),
        &rng,
    )
    .unwrap();
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(header).unwrap()),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap())
    );
    let signature = key.sign(&rng, input.as_bytes()).unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
}

/// The pod `web-1` (ServiceAccount `web`) in a fresh namespace, an identity endpoint with
/// the default limits, and tokens for the pod signed as the test bed's API server signs
/// them ([`sign_as_the_api_server`]): with the header (alg, kid) and claims (iss, aud, sub,
/// the ServiceAccount's and pod's names and uids) of a token the API server minted for
/// the pod, as the kubelet projects it; only the times (and the token's id) are the test's.
struct SelfSignedPod {
    bed: Bed,
    ep: Endpoint,
    bundle: String,
    who: String,
    key: KeyPair,
    header: serde_json::Value,
    minted: serde_json::Value,
}

impl SelfSignedPod {
    /// In a namespace named after `prefix`, the pod at `ip`.
    async fn start(prefix: &str, ip: &str) -> SelfSignedPod {
        weft_e2e::shared::init_tracing();
        let bed = Bed::new(prefix).await;
        bed.service_account("web").await;
        let pod = bed.pod("web-1", "web", "web", ip).await;
        let (header, minted) = jwt_parts(&bed.token(&pod).await);
        let sa_uid = bed
            .api::<ServiceAccount>()
            .get("web")
            .await
            .unwrap()
            .uid()
            .unwrap();
        assert_eq!(minted["kubernetes.io"]["serviceaccount"]["uid"], sa_uid);
        assert_eq!(minted["kubernetes.io"]["pod"]["uid"], pod.uid().unwrap());
        assert_eq!(minted["aud"], json!(["weft"]));
        let ep = Endpoint::start(&bed, "weft-identity", IdentityLimits::default()).await;
        SelfSignedPod {
            bundle: ep.ca.trust_bundle().to_owned(),
            who: format!("{}/web-1", bed.ns),
            key: KeyPair::generate().unwrap(),
            bed,
            ep,
            header,
            minted,
        }
    }

    /// A token issued (and valid from) `iat` and expiring at `exp`, in seconds from now,
    /// with the id `jti`.
    fn sign(&self, iat: i64, exp: i64, jti: &str) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let now = i64::try_from(now).unwrap();
        let (iat, exp) = (now + iat, now + exp);
        let mut claims = self.minted.clone();
        claims["iat"] = json!(iat);
        claims["nbf"] = json!(iat);
        claims["exp"] = json!(exp);
        claims["jti"] = json!(jti);
        sign_as_the_api_server(&self.header, &claims)
    }

    /// Asks the endpoint for `web-1`'s certificate with `token`.
    async fn ask(&self, token: &str) -> (StatusCode, Bytes) {
        send(
            self.ep.addr,
            &self.bundle,
            plain_ask(token, &self.who, &self.key),
        )
        .await
    }

    /// Asks with `token` and asserts a certificate is issued.
    async fn issued(&self, token: &str) -> CertifyResponse {
        let (status, answer) = self.ask(token).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "not issued: {}",
            String::from_utf8_lossy(&answer)
        );
        serde_json::from_slice(&answer).unwrap()
    }

    /// `weft_operator_token_reviews_total{result}`.
    fn reviews(&self, result: &str) -> f64 {
        self.ep.count(&format!(
            r#"weft_operator_token_reviews_total{{result="{result}"}}"#
        ))
    }

    /// Stops the endpoint and deletes the namespace.
    async fn stop(self) {
        self.ep.stop.cancel();
        self.bed.cleanup().await;
    }
}

/// Asserts the answer refuses a token as expired (`token_invalid`, 401, "expired").
fn assert_refused_as_expired(status: StatusCode, answer: &Bytes) {
    assert_refused(
        status,
        answer,
        StatusCode::UNAUTHORIZED,
        reason::TOKEN_INVALID,
    );
    let e: IdentityError = serde_json::from_slice(answer).unwrap();
    assert!(
        e.message.contains("expired"),
        "refused for its expiry, not its signature or claims: {}",
        e.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_signed_as_the_api_server_signs_is_issued_before_its_expiry_and_refused_after() {
    let web = SelfSignedPod::start("identity-expired", "198.18.240.20").await;
    // Valid for 10 more minutes; and one that expired an hour ago (well past the API
    // server's leeway of a minute), issued two hours ago.
    let valid = web.sign(-60, 600, "3c1f0a3e-weft-test-valid");
    let expired = web.sign(-7200, -3600, "3c1f0a3e-weft-test-expired");

    // The construction is right: the real TokenReview accepts the test's own token, and
    // it gets web's certificate.
    let r = web.issued(&valid).await;
    assert_eq!(
        verify(&r.certificate_chain, &r.trust_bundle),
        vec![spiffe_id("cluster.local", &web.bed.ns, "web")]
    );

    // The same token expired: the API server does not authenticate it, and the endpoint
    // refuses it as an invalid token, counted.
    let (status, answer) = web.ask(&expired).await;
    assert_refused_as_expired(status, &answer);
    assert_eq!(web.ep.refusals(reason::TOKEN_INVALID), 1.0);
    assert_eq!(
        web.reviews("rejected"),
        1.0,
        "refused by the API server's TokenReview"
    );
    assert_eq!(web.ep.count("weft_operator_identity_issued_total"), 1.0);
    web.stop().await;
}

/// The accepted-token cache keeps a token no longer than its `exp`. The API server itself
/// accepts a service-account token until a minute past its `exp` (go-jose's leeway) and
/// answers a token it accepted from its own cache for 10 s, so the refusal is shown with
/// a token in that minute: accepted now, expired for the API server 10 s later, when the
/// operator's 60 s would still have answered it from the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_token_is_not_answered_from_the_cache_past_its_expiry() {
    let web = SelfSignedPod::start("identity-cache-exp", "198.18.240.21").await;
    let expiring = web.sign(-60, 4, "5e2d7c41-weft-test-expiring");
    // Expired 50 s ago: the API server accepts it for 10 s more.
    let lapsing = web.sign(-120, -50, "5e2d7c41-weft-test-lapsing");
    let signed = Instant::now();
    for token in [&expiring, &lapsing] {
        web.issued(token).await;
    }
    let asked = Instant::now();
    assert_eq!(web.reviews("authenticated"), 2.0);

    // Past the expiring token's exp, the lapsing one's minute of leeway, and the 10 s the
    // API server remembers its own verdicts; well within the operator's 60 s cache.
    // (Token times are whole seconds, rounded down: a second of margin.)
    let until = (signed + Duration::from_secs(11)).max(asked + Duration::from_millis(10_500));
    tokio::time::sleep_until(until.into()).await;

    // Expired for the cache: reviewed again, and accepted (the API server's leeway).
    web.issued(&expiring).await;
    assert_eq!(
        web.reviews("authenticated"),
        3.0,
        "asked the API server again, not answered from the cache"
    );
    // Expired for the API server too: refused, not answered from the cache.
    let (status, answer) = web.ask(&lapsing).await;
    assert_refused_as_expired(status, &answer);
    assert_eq!(web.reviews("rejected"), 1.0, "refused by the API server");
    assert_eq!(web.ep.count("weft_operator_identity_issued_total"), 3.0);
    web.stop().await;
}

/// A client of the test bed's API server authenticated by `token` only.
async fn client_with_token(token: String) -> kube::Client {
    let kubeconfig =
        kube::config::Kubeconfig::read_from(weft_e2e::shared::testbed().kubeconfig()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.into()),
        ..Default::default()
    };
    kube::Client::try_from(config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_rbac_for_tokenreviews_the_endpoint_answers_unavailable_until_granted() {
    weft_e2e::shared::init_tracing();
    let bed = Bed::new("identity-norbac").await;
    let token = web_token(&bed, "198.18.240.18").await;
    bed.service_account("weft-operator").await;
    // The operator's ServiceAccount bound to no role (a chart whose RBAC lacks
    // tokenreviews): the API server refuses its TokenReviews.
    let operator_token =
        request_token(&bed, "weft-operator", json!({"expirationSeconds": 3600})).await;
    let ep = Endpoint::start_reviewing(
        &bed,
        "weft-identity",
        IdentityLimits::default(),
        client_with_token(operator_token).await,
    )
    .await;
    let bundle = ep.ca.trust_bundle().to_owned();
    let who = format!("{}/web-1", bed.ns);
    let key = KeyPair::generate().unwrap();
    let ask = || plain_ask(&token, &who, &key);
    let (status, answer) = send(ep.addr, &bundle, ask()).await;
    assert_refused(
        status,
        &answer,
        StatusCode::SERVICE_UNAVAILABLE,
        reason::UNAVAILABLE,
    );
    assert_eq!(ep.refusals(reason::UNAVAILABLE), 1.0);
    assert_eq!(
        ep.count(r#"weft_operator_token_reviews_total{result="error"}"#),
        1.0
    );

    // Granted what the chart grants: the same token is issued (the failure was not
    // remembered as a refusal of the token).
    let name = format!("weft-test-reviews-{}", bed.ns);
    let role: ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": name},
        "rules": [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}]
    }))
    .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": "weft-operator", "namespace": bed.ns}]
    }))
    .unwrap();
    let roles = kube::Api::<ClusterRole>::all(bed.client.clone());
    let bindings = kube::Api::<ClusterRoleBinding>::all(bed.client.clone());
    roles.create(&PostParams::default(), &role).await.unwrap();
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let issued = eventually(WAIT, || async {
        let (status, answer) = send(ep.addr, &bundle, ask()).await;
        ensure!(
            status == StatusCode::OK,
            "{status}: {}",
            String::from_utf8_lossy(&answer)
        );
        Ok(())
    })
    .await;
    let _ = bindings.delete(&name, &DeleteParams::default()).await;
    let _ = roles.delete(&name, &DeleteParams::default()).await;
    issued.unwrap();
    ep.stop.cancel();
    bed.cleanup().await;
}

/// A CA certificate valid from `from` to `until` (seconds from now), with path length
/// `pathlen`, self-signed or signed by `parent`: its PEM, key PEM and issuer.
fn ca_cert(
    name: &str,
    pathlen: u8,
    from: i64,
    until: i64,
    parent: Option<&rcgen::Issuer<'static, KeyPair>>,
) -> (String, String, rcgen::Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(pathlen));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::seconds(from);
    params.not_after = now + time::Duration::seconds(until);
    let key = KeyPair::generate().unwrap();
    let key_pem = key.serialize_pem();
    let cert = match parent {
        Some(p) => params.signed_by(&key, p).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    (cert.pem(), key_pem, rcgen::Issuer::new(params, key))
}

/// A Secret whose supplied chain (`tls.crt`) holds an intermediate that has expired stops
/// the operator at load, naming the certificate: every chain through it would fail at the
/// proxies. The same chain with the intermediate valid loads, and its certificates end
/// with the intermediate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supplied_chain_with_an_expired_intermediate_stops_the_operator_at_load() {
    use k8s_openapi::{ByteString, api::core::v1::Secret};
    use std::collections::BTreeMap;
    weft_e2e::shared::init_tracing();
    let bed = Bed::new("identity-chain").await;
    const DAY: i64 = 24 * 3600;
    let (root, _, root_issuer) = ca_cert("root", 2, -60, 3650 * DAY, None);
    let secret = |name: &str, chain: String, key: &str| Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            ("ca.crt".to_owned(), ByteString(root.clone().into_bytes())),
            ("tls.crt".to_owned(), ByteString(chain.into_bytes())),
            ("tls.key".to_owned(), ByteString(key.as_bytes().to_vec())),
        ])),
        ..Default::default()
    };
    let secrets = bed.api::<Secret>();
    // Expired yesterday, above an issuer valid for 30 days.
    let (upper, _, upper_issuer) = ca_cert("upper", 1, -2 * DAY, -DAY, Some(&root_issuer));
    let (issuer, issuer_key, _) = ca_cert("issuer", 0, -60, 30 * DAY, Some(&upper_issuer));
    secrets
        .create(
            &PostParams::default(),
            &secret("expired", format!("{issuer}{upper}"), &issuer_key),
        )
        .await
        .unwrap();
    let e = identity::ca::load_or_create(bed.client.clone(), &bed.ns, "expired")
        .await
        .expect_err("an expired intermediate stops the operator");
    let e = e.to_string();
    assert!(
        e.contains(&format!("Secret {}/expired", bed.ns))
            && e.contains("certificate 2 of tls.crt expired at"),
        "{e}"
    );
    // Valid for an hour more: loaded, and no certificate outlives it.
    let (upper, _, upper_issuer) = ca_cert("upper", 1, -60, 3600, Some(&root_issuer));
    let (issuer, issuer_key, _) = ca_cert("issuer", 0, -60, 30 * DAY, Some(&upper_issuer));
    secrets
        .create(
            &PostParams::default(),
            &secret("valid", format!("{issuer}{upper}"), &issuer_key),
        )
        .await
        .unwrap();
    let ca = identity::ca::load_or_create(bed.client.clone(), &bed.ns, "valid")
        .await
        .unwrap();
    let ends = std::time::SystemTime::now() + Duration::from_secs(3600);
    assert!(
        ca.issuer_not_after() <= ends,
        "{:?} is after the intermediate's end",
        ca.issuer_not_after()
    );
    bed.cleanup().await;
}
