//! Benchmark of the identity endpoint (not a test: it measures and prints): N proxies
//! starting at once, each opening its own TLS 1.3 connection and asking for a
//! certificate with its own ServiceAccount token, against the test bed's real API server
//! (TokenReview) and the real endpoint code on loopback.
//!
//! ```sh
//! cargo run --release -p weft-operator --example identity_scale -- 1000
//! ```
//!
//! Two rounds with the same N tokens: *cold* (every token is new to the operator: one
//! TokenReview each) and *cached* (the same tokens again within the accepted-token TTL of
//! 60 s: no TokenReview). The endpoint runs on its own 1-thread runtime (threads named
//! `identity-srv`); its CPU time is read from `/proc/self/task/*/stat`, so "per core" is
//! issuances per CPU-second of the endpoint alone (the API server's TokenReview work is a
//! separate process and not included). Clients generate their keys and CSRs before the
//! clock starts. Per-identity and per-source limits are lifted (all clients share one
//! address and one ServiceAccount): the per-identity rate, the TokenReviews per source
//! and the in-flight requests per source (`--identity-in-flight-per-source 0`; its
//! default of 4 would refuse all but 4 of the N at once); the total in-flight bounds are
//! the defaults. The reference
//! in the same run is the bare CA: the same CSRs parsed and signed on one thread, without
//! TLS, HTTP, token checks or limits.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::{authentication::v1::TokenRequest, core::v1::ServiceAccount};
use kube::{Api, api::PostParams};
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use weft_api::identity::{CERTIFY_PATH, CertifyRequest};
use weft_operator::{
    identity::{self, IdentityLimits, IdentityServer, ServingSettings},
    metrics::Metrics,
    push::AuthLimits,
};

const NAME: &str = "identity.bench";

fn server_cpu_seconds() -> f64 {
    let ticks = 100.0; // USER_HZ on Linux.
    let mut total = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap_or_default();
        let Some((comm, rest)) = stat.split_once(") ") else {
            continue;
        };
        if !comm.ends_with("identity-srv") {
            continue;
        }
        let fields: Vec<&str> = rest.split(' ').collect();
        // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
        total += fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
    }
    total as f64 / ticks
}

async fn certify(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    token: String,
    pod: String,
    body: Vec<u8>,
) -> (u16, Duration) {
    let start = Instant::now();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from(NAME).unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("https://{NAME}{CERTIFY_PATH}"))
        .header(weft_api::push::POD_HEADER, pod)
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    (status, start.elapsed())
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().unwrap())
        .unwrap_or(1000);
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("identity-srv")
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = client_rt.block_on(weft_e2e::shared::client()).unwrap();
    let ns = client_rt
        .block_on(weft_e2e::shared::namespace(&client, "identity-bench"))
        .unwrap();
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), &ns);
    let tokens: Vec<String> = client_rt.block_on(async {
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": "bench"}})).unwrap();
        sas.create(&PostParams::default(), &sa).await.unwrap();
        let mut tokens = Vec::with_capacity(n);
        for _ in 0..n {
            let req: TokenRequest = serde_json::from_value(
                json!({"spec": {"audiences": ["weft"], "expirationSeconds": 3600}}),
            )
            .unwrap();
            let out: TokenRequest = sas
                .create_subresource("token", "bench", &PostParams::default(), &req)
                .await
                .unwrap();
            tokens.push(out.status.unwrap().token);
        }
        tokens
    });
    let bodies: Vec<Vec<u8>> = (0..n)
        .map(|_| {
            let key = KeyPair::generate().unwrap();
            let csr = CertificateParams::default()
                .serialize_request(&key)
                .unwrap()
                .pem()
                .unwrap();
            serde_json::to_vec(&CertifyRequest {
                csr,
                identity: None,
            })
            .unwrap()
        })
        .collect();

    let ca = Arc::new(
        server_rt
            .block_on(identity::ca::load_or_create(
                client.clone(),
                &ns,
                "weft-identity",
            ))
            .unwrap(),
    );
    let defaults = IdentityLimits::default();
    let server = Arc::new(IdentityServer::new(
        ca.clone(),
        client.clone(),
        "weft".into(),
        "cluster.local".into(),
        Duration::from_secs(24 * 3600),
        IdentityLimits {
            per_identity_rate: 1e9,
            per_identity_burst: u32::MAX,
            in_flight_wait: Duration::from_secs(60),
            // Every client is 127.0.0.1: a per-source bound would measure refusals.
            max_in_flight_per_source: None,
            auth: AuthLimits {
                source_rate: 1e9,
                source_burst: u32::MAX,
                ..defaults.auth.clone()
            },
            ..defaults.clone()
        },
        Arc::new(Metrics::new()),
    ));
    let listener = server_rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = ServingSettings {
        dns_names: vec![NAME.into()],
        lifetime: Duration::from_secs(3600),
    };
    server_rt.spawn(identity::serve(
        listener,
        server,
        serving,
        std::future::pending(),
    ));

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.trust_bundle().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tls = Arc::new(tls);

    println!(
        "identity_scale: {n} concurrent requests, each on its own TLS 1.3 connection; \
         endpoint limits: {} in flight, {} TokenReviews in flight, no per-source bound \
         (all clients are 127.0.0.1)",
        defaults.max_in_flight, defaults.auth.max_in_flight
    );
    // The reference, in the same run: the bare CA on this thread, parsing each CSR and
    // signing its certificate, without TLS, HTTP, token checks or limits.
    let csrs: Vec<String> = bodies
        .iter()
        .map(|b| serde_json::from_slice::<CertifyRequest>(b).unwrap().csr)
        .collect();
    let started = Instant::now();
    for (i, pem) in csrs.iter().enumerate() {
        let csr = identity::ca::Csr::from_pem(pem).unwrap();
        ca.issue(
            &csr,
            &format!("spiffe://cluster.local/ns/{ns}/sa/bench-{i}"),
            Duration::from_secs(24 * 3600),
        )
        .unwrap();
    }
    let bare = started.elapsed().as_secs_f64();
    println!(
        "   bare CA (reference): {n} CSRs parsed and signed on one thread in {bare:.2} s = {:.0} per CPU-second",
        n as f64 / bare
    );
    for round in ["cold", "cached"] {
        let cpu0 = server_cpu_seconds();
        let started = Instant::now();
        let results: Vec<(u16, Duration)> = client_rt.block_on(async {
            let tasks: Vec<_> = (0..n)
                .map(|i| {
                    tokio::spawn(certify(
                        addr,
                        tls.clone(),
                        tokens[i].clone(),
                        format!("{ns}/bench-{i}"),
                        bodies[i].clone(),
                    ))
                })
                .collect();
            let mut out = Vec::with_capacity(n);
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        let wall = started.elapsed().as_secs_f64();
        let cpu = server_cpu_seconds() - cpu0;
        let ok = results.iter().filter(|(s, _)| *s == 200).count();
        let mut lat: Vec<Duration> = results.iter().map(|(_, d)| *d).collect();
        lat.sort();
        println!(
            "{round:>6}: {ok}/{n} issued in {wall:.2} s ({:.0}/s wall); endpoint CPU {cpu:.2} s \
             = {:.0} issuances per CPU-second; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            ok as f64 / wall,
            ok as f64 / cpu.max(0.01),
            pct(&lat, 0.50),
            pct(&lat, 0.99),
            pct(&lat, 1.0),
        );
    }
}
