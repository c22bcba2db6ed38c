//! Mutual TLS benchmarks behind `docs/benchmarks.md` (issue 9): full handshakes per second
//! per core through the proxy against raw rustls with the same certificates, and the
//! proxy's memory per idle inbound mutual TLS connection.
//!
//! ```sh
//! cargo build --release -p weft-proxy --example mtls_bench
//! target/release/examples/mtls_bench [HANDSHAKES] [CONNECTIONS]   # default 3000, 1000
//! ```
//!
//! Handshakes: one test CA (rcgen, ECDSA P-256 like the operator's), a client leaf and a
//! server leaf (SPIFFE URI SANs; the server's also a DNS name, so plain rustls can verify
//! it by name). The server runs on its own thread (a current-thread runtime, as the proxy
//! runs by default), the client on another, 8 handshakes in flight; every handshake is
//! full (no resumption), TLS 1.3, mutual, and the connection is closed once it completes.
//! Each side's CPU time is read from `/proc/thread-self/schedstat` on its own thread.
//!
//! - `raw rustls`: a `rustls::ServerConfig` (webpki client verifier over the CA) and a
//!   `rustls::ClientConfig` (webpki server verifier, client certificate), resumption off;
//! - `weft`: the proxy's inbound listener (`server::serve`, `ListenerKind::InboundTo`:
//!   peek, detect TLS, handshake with `IdentityStore::server_config`, read the client's
//!   SPIFFE ID) and the proxy's outbound `ClientTls` (the SPIFFE ID check on the server).
//!
//! Memory (`WEFT_BENCH_PARTS=rss`, or part of the default run): this process runs only
//! the proxy's inbound listener and a small application; a child process (this binary,
//! `rss-client`) opens the connections and holds them, so the child's own memory is not
//! counted. RSS (`VmRSS`) is read after 1 s of quiet, before and with N connections open:
//! plain text with one HTTP/1.1 request each, mutual TLS (`weft-http1`) after the handshake
//! only and with one request each, the `weft-mux` session two proxies hold (hyper's HTTP/2
//! client, as the outbound proxy opens it) idle and after one multiplexed HTTP/1 request;
//! and, as the floor, a bare rustls server (tokio-rustls, the same certificates and configs
//! as `raw rustls` above) holding handshake-only sessions. Beside RSS, the live heap (this
//! example counts allocations in its global allocator) of the server and of the client
//! process. `WEFT_BENCH_MODES=plain,mux-idle,...` picks rows; `WEFT_BENCH_HEAP=1` lists the
//! allocation sizes each connection holds; `WEFT_BENCH_TRACE_SIZE=<bytes>` prints the
//! backtrace of the first allocations of that size (who holds it).
//!
//! Only loopback addresses are used.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::{
    io::{BufRead, Write},
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;
use weft_proxy::{
    LocalPorts, Proxy,
    identity::{IdentityStore, Inner},
    limits::Limits,
    server::{BeforeConfig, ListenerKind},
};

/// The system allocator, counting live heap bytes and live allocations by size (in 16-byte
/// classes up to 64 KiB, one class above), so that the memory part can say how much of
/// the RSS growth is heap and which allocations each connection holds
/// (`WEFT_BENCH_HEAP=1` prints those).
struct Counting;

const CLASSES: usize = 4097;
static LIVE_BYTES: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
static LIVE_BY_CLASS: [std::sync::atomic::AtomicI64; CLASSES] =
    [const { std::sync::atomic::AtomicI64::new(0) }; CLASSES];
static BYTES_BY_CLASS: [std::sync::atomic::AtomicI64; CLASSES] =
    [const { std::sync::atomic::AtomicI64::new(0) }; CLASSES];

fn class(size: usize) -> usize {
    (size.div_ceil(16)).min(CLASSES - 1)
}

fn count(size: usize, sign: i64) {
    use std::sync::atomic::Ordering::Relaxed;
    LIVE_BYTES.fetch_add(sign * size as i64, Relaxed);
    LIVE_BY_CLASS[class(size)].fetch_add(sign, Relaxed);
    BYTES_BY_CLASS[class(size)].fetch_add(sign * size as i64, Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters change.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        count(layout.size(), 1);
        trace(layout.size());
        // SAFETY: the caller's contract is passed on as is.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        count(layout.size(), 1);
        // SAFETY: as above.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        count(layout.size(), -1);
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        count(layout.size(), -1);
        count(new, 1);
        // SAFETY: as above.
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
}

thread_local!(static INSIDE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });

/// With `WEFT_BENCH_TRACE_SIZE=N`, the first three allocations of exactly N bytes print
/// their backtrace (to find who holds a size class `WEFT_BENCH_HEAP` lists).
#[inline(never)]
fn trace(size: usize) {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    static WANTED: AtomicUsize = AtomicUsize::new(usize::MAX);
    static PRINTED: AtomicUsize = AtomicUsize::new(0);
    let wanted = WANTED.load(Relaxed);
    if wanted == 0 || (wanted != usize::MAX && wanted != size) {
        return;
    }
    if INSIDE.with(|i| i.replace(true)) {
        return;
    }
    if wanted == usize::MAX {
        let n = std::env::var("WEFT_BENCH_TRACE_SIZE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        WANTED.store(n, Relaxed);
        INSIDE.with(|i| i.set(false));
        return;
    }
    if PRINTED.fetch_add(1, Relaxed) < 3 {
        eprintln!(
            "allocation of {size} B:\n{}",
            std::backtrace::Backtrace::force_capture()
        );
    }
    INSIDE.with(|i| i.set(false));
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Live allocations and bytes per size class.
type Classes = Vec<(i64, i64)>;

/// Live heap: total bytes, and (count, bytes) per size class.
fn heap() -> (i64, Classes) {
    use std::sync::atomic::Ordering::Relaxed;
    (
        LIVE_BYTES.load(Relaxed),
        LIVE_BY_CLASS
            .iter()
            .zip(BYTES_BY_CLASS.iter())
            .map(|(c, b)| (c.load(Relaxed), b.load(Relaxed)))
            .collect(),
    )
}

const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/bench/sa/server";
const SERVER_DNS: &str = "server.bench.test";
const IN_FLIGHT: usize = 8;

struct Leaf {
    chain_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Leaf {
    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone().into())
    }
}

struct Certs {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    client: Leaf,
    server: Leaf,
}

fn now() -> time::OffsetDateTime {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap()
}

fn certs() -> Certs {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "bench root");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_params(&ca, &ca_key);
    let leaf = |id: &str, dns: Option<&str>| {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        if let Some(d) = dns {
            p.subject_alt_names
                .push(SanType::DnsName(d.try_into().unwrap()));
        }
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = now() - time::Duration::seconds(60);
        p.not_after = now() + time::Duration::seconds(24 * 3600);
        let cert = p.signed_by(&key, &issuer).unwrap();
        Leaf {
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    };
    Certs {
        ca_pem: ca_cert.pem(),
        ca_der: ca_cert.der().clone(),
        client: leaf(CLIENT_ID, None),
        server: leaf(SERVER_ID, Some(SERVER_DNS)),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(c: &Certs) -> Arc<rustls::RootCertStore> {
    let mut r = rustls::RootCertStore::empty();
    r.add(c.ca_der.clone()).unwrap();
    Arc::new(r)
}

fn raw_server_config(c: &Certs) -> Arc<rustls::ServerConfig> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(c), provider())
            .build()
            .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![c.server.der.clone(), c.ca_der.clone()], c.server.key())
        .unwrap();
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![b"weft-http1".to_vec()];
    Arc::new(config)
}

fn raw_client_config(c: &Certs) -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(c))
        .with_client_auth_cert(vec![c.client.der.clone(), c.ca_der.clone()], c.client.key())
        .unwrap();
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"weft-http1".to_vec()];
    Arc::new(config)
}

fn store(c: &Certs, leaf: &Leaf) -> Arc<IdentityStore> {
    let s = IdentityStore::new().unwrap();
    s.install_pem(&leaf.chain_pem, &leaf.key_pem, &c.ca_pem)
        .unwrap();
    s
}

/// This thread's CPU time so far, from the scheduler's accounting (ns resolution).
fn thread_cpu() -> Duration {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    let ns: u64 = text.split_whitespace().next().unwrap().parse().unwrap();
    Duration::from_nanos(ns)
}

/// A thread with its own current-thread runtime; `cpu()` asks it for its CPU time.
struct Side {
    ask: mpsc::Sender<oneshot::Sender<Duration>>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Side {
    fn spawn<F, Fut>(name: &str, work: F) -> Side
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        let (ask, mut asks) = mpsc::channel::<oneshot::Sender<Duration>>(4);
        let stop = CancellationToken::new();
        let token = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    tokio::task::spawn_local(async move {
                        while let Some(reply) = asks.recv().await {
                            let _ = reply.send(thread_cpu());
                        }
                    });
                    work(token.clone()).await;
                    token.cancelled().await;
                });
            })
            .unwrap();
        Side {
            ask,
            stop,
            thread: Some(thread),
        }
    }

    async fn cpu(&self) -> Duration {
        let (tx, rx) = oneshot::channel();
        self.ask.send(tx).await.unwrap();
        rx.await.unwrap()
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A tiny HTTP/1.1 application on 127.0.0.1: 200 with a 2-byte body, keep-alive.
async fn app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Starts the proxy's inbound listener in front of a fresh `app()`, on the current
/// runtime; returns its address.
async fn proxy_inbound(
    identity: Option<Arc<IdentityStore>>,
    app_addr: Option<SocketAddr>,
    stop: CancellationToken,
) -> SocketAddr {
    let app = match app_addr {
        Some(a) => a,
        None => app().await,
    };
    let proxy = Proxy::with_identity(
        Limits::default(),
        BeforeConfig::default(),
        LocalPorts::default(),
        identity,
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
    tokio::task::spawn_local(weft_proxy::server::serve(
        listener,
        ListenerKind::InboundTo(app),
        proxy,
        stop,
    ));
    addr
}

async fn raw_server(config: Arc<rustls::ServerConfig>, stop: CancellationToken) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::task::spawn_local(async move {
        loop {
            let s = tokio::select! {
                () = stop.cancelled() => return,
                r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
            };
            let acceptor = acceptor.clone();
            tokio::task::spawn_local(async move {
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let mut buf = [0u8; 64];
                    let _ = tls.read(&mut buf).await;
                }
            });
        }
    });
    addr
}

#[derive(Clone, Copy, PartialEq)]
enum Path2 {
    Raw,
    Weft,
}

struct HandshakeResult {
    wall: Duration,
    server_cpu: Duration,
    client_cpu: Duration,
}

fn handshakes(c: &Arc<Certs>, path: Path2, n: usize) -> HandshakeResult {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let certs = c.clone();
    let server = Side::spawn("server", move |stop| async move {
        let addr = match path {
            Path2::Raw => raw_server(raw_server_config(&certs), stop).await,
            Path2::Weft => proxy_inbound(Some(store(&certs, &certs.server)), None, stop).await,
        };
        addr_tx.send(addr).unwrap();
    });
    let addr: SocketAddr = addr_rx.recv().unwrap();
    let certs = c.clone();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let client = Side::spawn("client", move |_stop| async move {
        let raw = tokio_rustls::TlsConnector::from(raw_client_config(&certs));
        let weft = store(&certs, &certs.client)
            .client_tls(Arc::from(SERVER_ID))
            .unwrap();
        let one = move || {
            let (raw, weft) = (raw.clone(), weft.clone());
            async move {
                let tcp = TcpStream::connect(addr).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                match path {
                    Path2::Raw => {
                        let name = ServerName::try_from(SERVER_DNS).unwrap();
                        let mut s = raw.connect(name, tcp).await.unwrap();
                        let _ = s.shutdown().await;
                    }
                    Path2::Weft => {
                        let mut s = weft
                            .handshake(tcp, addr, Inner::Http1, Duration::from_secs(10))
                            .await
                            .unwrap();
                        let _ = s.shutdown().await;
                    }
                }
            }
        };
        // Warm-up, not counted.
        for _ in 0..50 {
            one().await;
        }
        let start = Instant::now();
        let cpu0 = thread_cpu();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..IN_FLIGHT {
            let (next, one) = (next.clone(), one.clone());
            tasks.push(tokio::task::spawn_local(async move {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                    one().await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        done_tx
            .send((start.elapsed(), thread_cpu() - cpu0))
            .unwrap();
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The server's CPU before the warm-up ends is not known exactly; read it before and
    // after the measured part, which the client reports.
    let server_before = rt.block_on(server.cpu());
    let (wall, client_cpu) = done_rx.recv().unwrap();
    let server_after = rt.block_on(server.cpu());
    drop(client);
    drop(server);
    HandshakeResult {
        wall,
        // The warm-up (50 handshakes) is inside the server's window: subtract its share.
        server_cpu: (server_after - server_before).mul_f64(n as f64 / (n + 50) as f64),
        client_cpu,
    }
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// What one memory measurement saw: RSS (KiB) and live heap (bytes) before and with the
/// connections, and the heap by size class before and with.
struct Growth {
    rss: (u64, u64),
    heap: (i64, i64),
    classes: (Classes, Classes),
    /// The client process's RSS (KiB) and heap (bytes), before and with.
    client: Vec<i64>,
}

/// The proxy's RSS growth (KiB) with `n` connections of `mode` held open by a child.
fn rss_with(dir: &Path, addr: SocketAddr, n: usize, mode: &str) -> Growth {
    std::thread::sleep(Duration::from_secs(1));
    let before = vm_rss_kib(std::process::id());
    let heap_before = heap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["rss-client", &addr.to_string(), &n.to_string(), mode])
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let client: Vec<i64> = match line.trim().strip_prefix("ready ") {
        Some(rest) => rest
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect(),
        None => panic!("the client said {line:?}"),
    };
    std::thread::sleep(Duration::from_secs(1));
    let with = vm_rss_kib(std::process::id());
    let heap_with = heap();
    drop(child.stdin.take());
    let _ = child.wait();
    Growth {
        rss: (before, with),
        heap: (heap_before.0, heap_with.0),
        classes: (heap_before.1, heap_with.1),
        client,
    }
}

/// The child: opens `n` connections to `addr` as `mode` says, prints `ready`, and holds
/// them until stdin closes.
fn rss_client(addr: SocketAddr, n: usize, mode: &str, dir: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The client's own growth too: it holds the other end of each connection (for the
    // mux modes: a TLS session and hyper's HTTP/2 client with the outbound proxy's
    // settings, though not the proxy's pool around them).
    let rss_before = vm_rss_kib(std::process::id());
    let heap_before = heap().0;
    let held = rt.block_on(async {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        let store = IdentityStore::new().unwrap();
        store
            .install_pem(&read("client.crt"), &read("client.key"), &read("ca.crt"))
            .unwrap();
        let tls = store.client_tls(Arc::from(SERVER_ID)).unwrap();
        let mut held: Vec<Box<dyn std::any::Any>> = Vec::with_capacity(n);
        for _ in 0..n {
            let tcp = TcpStream::connect(addr).await.unwrap();
            match mode {
                "plain" => {
                    let mut s = tcp;
                    request(&mut s).await;
                    held.push(Box::new(s));
                }
                "mux-idle" | "mux-request" => {
                    let s = tls
                        .handshake(tcp, addr, Inner::Mux, Duration::from_secs(10))
                        .await
                        .unwrap();
                    // As the outbound proxy does: one HTTP/2 connection (hyper's client
                    // defaults) in the session.
                    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .timer(hyper_util::rt::TokioTimer::new())
                    .handshake(hyper_util::rt::TokioIo::new(s))
                    .await
                    .unwrap();
                    tokio::spawn(conn);
                    if mode == "mux-request" {
                        let mut req = http::Request::get("/")
                            .header(http::header::HOST, "app")
                            .body(http_body_util::Empty::<bytes::Bytes>::new())
                            .unwrap();
                        weft_proxy::mux::to_mux(&mut req, &|| None);
                        let resp = sender.send_request(req).await.unwrap();
                        assert_eq!(resp.status(), 200);
                        let body = http_body_util::BodyExt::collect(resp.into_body())
                            .await
                            .unwrap()
                            .to_bytes();
                        assert_eq!(&body[..], b"ok");
                    } else {
                        // The server's SETTINGS and its ack of ours: let them pass.
                        sender.ready().await.unwrap();
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    held.push(Box::new(sender));
                }
                "mtls-idle" | "mtls-request" => {
                    let mut s = tls
                        .handshake(tcp, addr, Inner::Http1, Duration::from_secs(10))
                        .await
                        .unwrap();
                    if mode == "mtls-request" {
                        request(&mut s).await;
                    } else {
                        // The server's handshake ends with the client's Finished, which
                        // it reads with the first bytes after it: none come, so give it
                        // a moment rather than count a half-open handshake.
                        tokio::task::yield_now().await;
                    }
                    held.push(Box::new(s));
                }
                other => panic!("unknown mode {other}"),
            }
        }
        held
    });
    // Let the last SETTINGS acks and pings pass, as the server side waits 1 s too.
    rt.block_on(async { tokio::time::sleep(Duration::from_secs(1)).await });
    println!(
        "ready {rss_before} {} {heap_before} {}",
        vm_rss_kib(std::process::id()),
        heap().0
    );
    std::io::stdout().flush().unwrap();
    // The runtime keeps running (HTTP/2 connections answer the server's pings) until
    // stdin closes.
    rt.block_on(async {
        let _ = tokio::task::spawn_blocking(|| {
            let mut buf = [0u8; 1];
            let _ = std::io::Read::read(&mut std::io::stdin(), &mut buf);
        })
        .await;
    });
    drop(held);
    drop(rt);
}

async fn request<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) {
    s.write_all(b"GET / HTTP/1.1\r\nhost: app\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"ok") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the response");
        got.extend_from_slice(&buf[..n]);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("rss-client") {
        rss_client(
            args[2].parse().unwrap(),
            args[3].parse().unwrap(),
            &args[4],
            Path::new(&args[5]),
        );
        return;
    }
    if args.get(1).map(String::as_str) == Some("app") {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let addr = rt.block_on(app());
        println!("{addr}");
        std::io::stdout().flush().unwrap();
        // Serve until stdin closes.
        let (tx, rx) = oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1];
            let _ = std::io::Read::read(&mut std::io::stdin(), &mut buf);
            let _ = tx.send(());
        });
        let _ = rt.block_on(rx);
        return;
    }
    if args.get(1).map(String::as_str) == Some("rss-one") {
        // A fresh certificate set would do as well; the child reads these files.
        let dir = Path::new(&args[4]);
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        let server_store = IdentityStore::new().unwrap();
        server_store
            .install_pem(&read("server.crt"), &read("server.key"), &read("ca.crt"))
            .unwrap();
        // The application in a process of its own too, so that its side of the proxy's
        // upstream connections is not counted.
        let mut app_proc = Command::new(std::env::current_exe().unwrap())
            .arg("app")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(app_proc.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let app_addr: SocketAddr = line.trim().parse().unwrap();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let raw = args[2].starts_with("raw-");
        let raw_config = raw.then(|| {
            let der = |f: &str| {
                rustls_pemfile::certs(&mut read(f).as_bytes())
                    .next()
                    .unwrap()
                    .unwrap()
            };
            let key = rustls_pemfile::private_key(&mut read("server.key").as_bytes())
                .unwrap()
                .unwrap();
            let c = Certs {
                ca_pem: read("ca.crt"),
                ca_der: der("ca.crt"),
                client: Leaf {
                    chain_pem: String::new(),
                    key_pem: String::new(),
                    der: der("ca.crt"),
                    key_der: Vec::new(),
                },
                server: Leaf {
                    chain_pem: read("server.crt"),
                    key_pem: read("server.key"),
                    der: der("server.crt"),
                    key_der: key.secret_der().to_vec(),
                },
            };
            raw_server_config(&c)
        });
        let server = Side::spawn("proxy", move |stop| async move {
            let addr = match raw_config {
                // The floor: a bare rustls server holding the same sessions.
                Some(config) => raw_server(config, stop).await,
                None => proxy_inbound(Some(server_store), Some(app_addr), stop).await,
            };
            addr_tx.send(addr).unwrap();
        });
        let addr = addr_rx.recv().unwrap();
        let mode = args[2].strip_prefix("raw-").unwrap_or(&args[2]);
        let n: i64 = args[3].parse().unwrap();
        let g = rss_with(dir, addr, n as usize, mode);
        println!(
            "{} {} {} {} {} {} {} {}",
            g.rss.0,
            g.rss.1,
            g.heap.0,
            g.heap.1,
            g.client[0],
            g.client[1],
            g.client[2],
            g.client[3]
        );
        // The size classes that grew by at least half an allocation per connection:
        // what each connection holds.
        for (i, ((c0, b0), (c1, b1))) in g.classes.0.iter().zip(&g.classes.1).enumerate() {
            if (c1 - c0) * 2 >= n {
                println!(
                    "class {}-{} B: {:.2} per connection, {:.0} B per connection",
                    i.saturating_sub(1) * 16 + 1,
                    if i == CLASSES - 1 { usize::MAX } else { i * 16 },
                    (c1 - c0) as f64 / n as f64,
                    (b1 - b0) as f64 / n as f64
                );
            }
        }
        drop(server);
        drop(app_proc.stdin.take());
        let _ = app_proc.wait();
        return;
    }
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(3000);
    let conns: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let parts = std::env::var("WEFT_BENCH_PARTS").unwrap_or_else(|_| "handshake,rss".into());
    let c = Arc::new(certs());
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average: {}", load().trim());

    if parts.contains("handshake") {
        println!(
            "\n## Full mutual TLS 1.3 handshakes ({n} per path, {IN_FLIGHT} in flight, ECDSA P-256, no resumption)\n"
        );
        println!(
            "| path | handshakes/s (wall) | server CPU µs/handshake | client CPU µs/handshake | server handshakes per CPU-s | client+server per CPU-s |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: |");
        let mut per_core = Vec::new();
        for (name, path) in [("raw rustls", Path2::Raw), ("weft", Path2::Weft)] {
            let r = handshakes(&c, path, n);
            let s_us = r.server_cpu.as_secs_f64() * 1e6 / n as f64;
            let c_us = r.client_cpu.as_secs_f64() * 1e6 / n as f64;
            println!(
                "| {name} | {:.0} | {s_us:.0} | {c_us:.0} | {:.0} | {:.0} |",
                n as f64 / r.wall.as_secs_f64(),
                1e6 / s_us,
                1e6 / (s_us + c_us),
            );
            per_core.push((1e6 / s_us, 1e6 / (s_us + c_us)));
        }
        println!(
            "\nweft / raw rustls, per core: server side {:.2}×, both sides {:.2}× (target ≥ 0.8×)",
            per_core[1].0 / per_core[0].0,
            per_core[1].1 / per_core[0].1
        );
    }

    if parts.contains("rss") {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), &c.ca_pem).unwrap();
        std::fs::write(dir.path().join("client.crt"), &c.client.chain_pem).unwrap();
        std::fs::write(dir.path().join("client.key"), &c.client.key_pem).unwrap();
        std::fs::write(dir.path().join("server.crt"), &c.server.chain_pem).unwrap();
        std::fs::write(dir.path().join("server.key"), &c.server.key_pem).unwrap();
        println!("\n## Proxy RSS with {conns} inbound connections held open by another process\n");
        println!(
            "| connections | RSS before (KiB) | RSS with them (KiB) | RSS per connection (KiB) | heap per connection (KiB) | client process: RSS / heap per connection (KiB) |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: |");
        let mut details = Vec::new();
        for (label, mode) in [
            ("plain text, one HTTP/1.1 request each", "plain"),
            ("mutual TLS, handshake only", "mtls-idle"),
            ("mutual TLS, one HTTP/1.1 request each", "mtls-request"),
            ("mutual TLS mux (weft-mux, HTTP/2), idle", "mux-idle"),
            ("mutual TLS mux, one request each", "mux-request"),
            (
                "reference: a bare rustls server (same certificates), handshake only",
                "raw-mtls-idle",
            ),
        ]
        .into_iter()
        .filter(|(_, m)| {
            std::env::var("WEFT_BENCH_MODES").map_or(true, |only| only.split(',').any(|o| o == *m))
        }) {
            // Each in a fresh process: memory freed by an earlier mode would otherwise be
            // reused and hide part of the growth.
            let out = Command::new(std::env::current_exe().unwrap())
                .args(["rss-one", mode, &conns.to_string()])
                .arg(dir.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            if std::env::var_os("WEFT_BENCH_TRACE_SIZE").is_some() {
                eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let mut lines = text.lines();
            let f: Vec<f64> = lines
                .next()
                .unwrap()
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect();
            println!(
                "| {label} | {} | {} | {:.1} | {:.1} | {:.1} / {:.1} |",
                f[0],
                f[1],
                (f[1] - f[0]) / conns as f64,
                (f[3] - f[2]) / 1024.0 / conns as f64,
                (f[5] - f[4]) / conns as f64,
                (f[7] - f[6]) / 1024.0 / conns as f64
            );
            details.push((label, lines.map(str::to_owned).collect::<Vec<_>>()));
        }
        if std::env::var_os("WEFT_BENCH_HEAP").is_some() {
            for (label, lines) in details {
                println!("\n{label}: live allocations per connection, by size");
                for l in lines {
                    println!("  {l}");
                }
            }
        }
    }
    println!("\nload average: {}", load().trim());
}
