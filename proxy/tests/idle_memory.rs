//! Memory held by idle mutual TLS `weft-mux` sessions, the connections two proxies keep
//! open between them (issue 9: ≤ 16 KiB per idle connection). This binary counts every
//! allocation in its global allocator, so it holds this one test only: a test running
//! beside it would count too.
//!
//! Both ends run here: the proxy's inbound listener (`server::serve`, `InboundTo`, with a
//! mesh certificate) and, for each connection, the client end the outbound proxy opens
//! (`ClientTls::handshake` announcing `weft-mux`, then hyper's HTTP/2 client). The figure
//! asserted is the live heap per idle connection, both ends together. h2 0.4.20 as
//! published holds 28 KiB of buffers per end for as long as a connection lives (16 KiB to
//! write, 8 KiB to read, 4 KiB of HPACK scratch); the patched copy in `third_party/h2`
//! frees them while the connection is idle, and this test fails without it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use weft_proxy::{
    LocalPorts, Proxy,
    identity::{IdentityStore, Inner},
    limits::Limits,
    server::{BeforeConfig, ListenerKind},
};

/// The system allocator, counting the bytes live on the heap.
struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call goes to the system allocator unchanged; only a counter changes.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Relaxed);
        // SAFETY: as above.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Relaxed);
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new as i64 - layout.size() as i64, Relaxed);
        // SAFETY: as above.
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";

/// Connections measured: enough that a few allocations shared by all (a slab of tokio's,
/// a grown `Vec`) do not move the figure per connection by more than a few bytes.
const CONNECTIONS: usize = 200;

/// Live heap allowed per idle mux connection, both ends together. Measured (debug build):
/// 34.0 KiB with the patched h2, 90.1 KiB with h2 0.4.20 as published. Tight enough that
/// losing the release of either of the two larger buffers (16 KiB to write, 8 KiB to
/// read, on each end) fails, with 6 KiB to spare for Weft's own per-connection state.
const BOUND_PER_CONNECTION: i64 = 40 * 1024;

/// Identity stores for both ends, from a fresh test CA.
fn stores() -> (Arc<IdentityStore>, Arc<IdentityStore>) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "mesh root");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::from_params(&ca, &ca_key);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let now = time::OffsetDateTime::from_unix_timestamp(now as i64).unwrap();
    let store = |id: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = now - time::Duration::seconds(60);
        p.not_after = now + time::Duration::seconds(3600);
        let cert = p.signed_by(&key, &issuer).unwrap();
        let s = IdentityStore::new().unwrap();
        s.install_pem(&cert.pem(), &key.serialize_pem(), &ca_pem)
            .unwrap();
        s
    };
    (store(SERVER_ID), store(CLIENT_ID))
}

/// An HTTP/1.1 application answering every request with 200 `ok`.
async fn app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from_static(b"ok"),
                )))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc),
            );
        }
    });
    addr
}

/// A server sidecar: the inbound listener in front of `app`.
async fn inbound(
    identity: Arc<IdentityStore>,
    app: SocketAddr,
    stop: CancellationToken,
) -> SocketAddr {
    let proxy = Proxy::with_identity(
        Limits::default(),
        BeforeConfig::default(),
        LocalPorts::default(),
        Some(identity),
    );
    proxy
        .store
        .apply(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "weft.dev/proxy/v1alpha1",
                "kind": "ProxyConfig",
                "services": [],
            }))
            .unwrap(),
        )
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(weft_proxy::server::serve(
        listener,
        ListenerKind::InboundTo(app),
        proxy,
        stop,
    ));
    addr
}

/// Opens `n` mux sessions to `addr` as the outbound proxy does, each left idle once the
/// HTTP/2 handshake (both SETTINGS and their acks) is over; returns what keeps them open.
async fn open_idle_mux(
    tls: &weft_proxy::identity::ClientTls,
    addr: SocketAddr,
    n: usize,
) -> Vec<hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let s = tls
            .handshake(tcp, addr, Inner::Mux, Duration::from_secs(10))
            .await
            .unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .handshake(hyper_util::rt::TokioIo::new(s))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender.ready().await.unwrap();
        held.push(sender);
    }
    held
}

#[test]
fn an_idle_mux_session_between_two_proxies_holds_no_http2_buffers() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (server_id, client_id) = stores();
        let stop = CancellationToken::new();
        let addr = inbound(server_id, app().await, stop.clone()).await;
        let tls = client_id.client_tls(Arc::from(SERVER_ID)).unwrap();
        // Warm up: what the first connections allocate once for all (TLS session state
        // caches, the runtime's task slabs, tracing's callsites) is not per connection.
        let warm = open_idle_mux(&tls, addr, 20).await;
        tokio::time::sleep(Duration::from_millis(300)).await;

        let before = LIVE_BYTES.load(Relaxed);
        let held = open_idle_mux(&tls, addr, CONNECTIONS).await;
        // Quiet: the last SETTINGS acks pass and every connection's task goes idle.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let per_connection = (LIVE_BYTES.load(Relaxed) - before) / CONNECTIONS as i64;

        // Still usable after giving its buffers back: a request on an idle session
        // reaches the application and its answer comes back.
        let mut sender = held[0].clone();
        let mut req = http::Request::get("/")
            .header(http::header::HOST, "app")
            .body(http_body_util::Empty::new())
            .unwrap();
        weft_proxy::mux::to_mux(&mut req, &|| None);
        let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .expect("an idle session answers")
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], b"ok");

        eprintln!("live heap per idle mux connection, both ends: {per_connection} B");
        assert!(
            per_connection < BOUND_PER_CONNECTION,
            "each idle mux connection holds {per_connection} B of heap (both ends), \
             more than {BOUND_PER_CONNECTION}: are h2's buffers released while idle?"
        );
        drop((warm, held));
        stop.cancel();
    });
}
