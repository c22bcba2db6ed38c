//! Test support: backends on 127.0.0.x, an in-process proxy, clients, an "eventually"
//! helper and a child-process proxy.
// Test helpers: a failed setup step should panic the test that called it.
#![allow(dead_code, missing_docs, clippy::unwrap_used, clippy::expect_used)]

pub mod ca;

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;
use weft_proxy::{
    Proxy,
    server::{self, ListenerKind},
};

pub type Body = BoxBody<Bytes, Infallible>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// Aborts a task when dropped, so a test's servers die with it.
pub struct Task(pub tokio::task::JoinHandle<()>);
impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An HTTP/1.1 + HTTP/2 backend that says who it is.
///
/// - any path: 200 `hello from NAME`, headers `x-backend`, `x-seen-host`,
///   `x-seen-authority`, `x-seen-version`, `x-seen-headers` (names received)
/// - `/echo`: streams the request body back as it arrives
/// - header `x-delay-ms: N`: waits N ms before answering
/// - `Upgrade: echo`: answers 101 and echoes bytes on the upgraded connection
/// - `CONNECT host:port`: answers 200 and echoes bytes through the tunnel
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    pub hits: Arc<AtomicUsize>,
    _task: Task,
}

impl Backend {
    pub async fn start(ip: &str, name: &str) -> Backend {
        Backend::start_slow(ip, name, 0).await
    }

    /// A backend that waits `delay_ms` before every answer.
    pub async fn start_slow(ip: &str, name: &str, delay_ms: u64) -> Backend {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let name_arc: Arc<str> = Arc::from(name);
        let h = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let name = name_arc.clone();
                let hits = h.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        backend_handle(name.clone(), hits.clone(), delay_ms, req)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend {
            addr,
            name: name.to_owned(),
            hits,
            _task: Task(task),
        }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn backend_handle(
    name: Arc<str>,
    hits: Arc<AtomicUsize>,
    delay_ms: u64,
    mut req: Request<Incoming>,
) -> Result<Response<BoxBody<Bytes, hyper::Error>>, Infallible> {
    hits.fetch_add(1, Ordering::SeqCst);
    if delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    }
    if let Some(ms) = req
        .headers()
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let seen_host = req
        .headers()
        .get(http::header::HOST)
        .map(|h| h.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    let seen_authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let seen_headers: Vec<String> = req.headers().keys().map(|k| k.to_string()).collect();
    let mut builder = Response::builder()
        .header("x-backend", &*name)
        .header("x-seen-host", seen_host)
        .header("x-seen-authority", seen_authority)
        .header("x-seen-version", format!("{:?}", req.version()))
        .header("x-seen-headers", seen_headers.join(","));
    let connect = req.method() == http::Method::CONNECT;
    let upgrade = req
        .headers()
        .get(http::header::UPGRADE)
        .is_some_and(|v| v == "echo");
    if connect || upgrade {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if io.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
    }
    if connect {
        return Ok(builder
            .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
            .unwrap());
    }
    if upgrade {
        let resp = builder
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::UPGRADE, "echo")
            .header(http::header::CONNECTION, "upgrade")
            .body(Full::new(Bytes::new()).map_err(|e| match e {}).boxed())
            .unwrap();
        return Ok(resp);
    }
    if req.uri().path() == "/echo" {
        builder = builder.header("x-echo", "1");
        return Ok(builder.body(req.into_body().boxed()).unwrap());
    }
    Ok(builder
        .body(
            Full::new(Bytes::from(format!("hello from {name}")))
                .map_err(|e| match e {})
                .boxed(),
        )
        .unwrap())
}

/// A TCP backend: `mode` "echo-until-eof" reads to EOF then writes `got N bytes` and
/// closes; "banner" writes a banner first, then echoes.
pub async fn tcp_backend(ip: &str, mode: &'static str) -> (SocketAddr, Task) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if mode == "banner" {
                    let _ = s.write_all(b"220 hello, I speak first\r\n").await;
                    let mut buf = [0u8; 256];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                } else {
                    let mut all = Vec::new();
                    let _ = s.read_to_end(&mut all).await;
                    let _ = s
                        .write_all(format!("got {} bytes", all.len()).as_bytes())
                        .await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    (addr, Task(task))
}

/// An HTTP/1 application that reads each request head and never answers: it counts the
/// requests it holds and the connections that close under them, to see a cancellation
/// reach it.
pub struct HangingApp {
    pub addr: SocketAddr,
    /// Request heads read.
    pub held: Arc<AtomicUsize>,
    /// Connections closed (end of stream or error) while holding a request.
    pub closed: Arc<AtomicUsize>,
    _task: Task,
}

impl HangingApp {
    pub async fn start(ip: &str) -> HangingApp {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held: Arc<AtomicUsize> = Arc::default();
        let closed: Arc<AtomicUsize> = Arc::default();
        let (h, c) = (held.clone(), closed.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (held, closed) = (h.clone(), c.clone());
                tokio::spawn(async move {
                    if read_request_head(&mut s).await.is_none() {
                        return;
                    }
                    held.fetch_add(1, Ordering::SeqCst);
                    let _ = s.read(&mut [0u8; 1]).await;
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        HangingApp {
            addr,
            held,
            closed,
            _task: Task(task),
        }
    }

    /// Waits until the application holds `n` requests in all.
    pub async fn wait_held(&self, n: usize) {
        let held = self.held.clone();
        eventually(
            Duration::from_secs(5),
            "the application holds the request",
            || {
                let held = held.clone();
                async move { held.load(Ordering::SeqCst) >= n }
            },
        )
        .await;
    }

    /// Sends a GET through `front` on a connection of its own, waits until the
    /// application holds it (its `n`th in all), and closes the connection.
    pub async fn request_and_go_away(&self, front: SocketAddr, n: usize) {
        let mut s = connect(front).await;
        s.write_all(b"GET /long-poll HTTP/1.1\r\nhost: web\r\n\r\n")
            .await
            .unwrap();
        self.wait_held(n).await;
        drop(s);
    }

    /// Waits until `n` of the connections holding a request have closed in all.
    pub async fn wait_closed(&self, n: usize, what: &str) {
        let closed = self.closed.clone();
        eventually(Duration::from_secs(2), what, || {
            let closed = closed.clone();
            async move { closed.load(Ordering::SeqCst) >= n }
        })
        .await;
    }
}

/// A proxy config with one service per `(name, endpoints)`.
pub fn config(services: &[(&str, &[SocketAddr])]) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "weft.dev/proxy/v1alpha1",
        "kind": "ProxyConfig",
        "services": services.iter().map(|(name, eps)| serde_json::json!({
            "name": name,
            "endpoints": eps.iter().map(|a| serde_json::json!({"address": a.to_string()})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// An in-process proxy with one forward listener on 127.0.0.1:0.
pub struct TestProxy {
    pub proxy: Arc<Proxy>,
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: Option<tokio::task::JoinHandle<()>>,
}

impl TestProxy {
    /// The sum of the proxy's samples of metric `name` whose lines contain every one of
    /// `labels` (such as `reason="unanswered"`).
    pub fn metric(&self, name: &str, labels: &[&str]) -> u64 {
        let text = self.proxy.metrics.encode().unwrap();
        text.lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }

    pub async fn start(service: &str, config: serde_json::Value) -> TestProxy {
        Self::start_with(Proxy::new(), service, config)
    }

    /// Like [`TestProxy::start`], with a proxy built by the caller (its limits, say).
    pub fn start_with(proxy: Arc<Proxy>, service: &str, config: serde_json::Value) -> TestProxy {
        Self::start_kind(proxy, ListenerKind::Forward(Arc::from(service)), config)
    }

    /// Like [`TestProxy::start_with`], with a listener of any kind.
    pub fn start_kind(
        proxy: Arc<Proxy>,
        kind: ListenerKind,
        config: serde_json::Value,
    ) -> TestProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        Self::start_kind_on(listener, proxy, kind, config)
    }

    /// Like [`TestProxy::start_kind`], serving a listener the caller bound (with socket
    /// options of its own, say).
    pub fn start_kind_on(
        listener: TcpListener,
        proxy: Arc<Proxy>,
        kind: ListenerKind,
        config: serde_json::Value,
    ) -> TestProxy {
        proxy
            .store
            .apply(serde_json::from_value(config).unwrap())
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server::serve(
            listener,
            kind,
            proxy.clone(),
            shutdown.clone(),
        ));
        TestProxy {
            proxy,
            addr,
            shutdown,
            task: Some(task),
        }
    }

    pub fn apply(&self, config: serde_json::Value) {
        self.proxy
            .store
            .apply(serde_json::from_value(config).unwrap())
            .unwrap();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

pub fn h1_client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub async fn get(client: &Client<HttpConnector, Body>, url: &str) -> (Response<()>, String) {
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(Request::get(url).body(full("")).unwrap()),
    )
    .await
    .expect("response within 10s")
    .expect("response");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        Response::from_parts(parts, ()),
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

pub fn header<'a>(r: &'a Response<()>, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap_or(""))
        .unwrap_or("")
}

/// Polls `check` every 20 ms until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < within {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not true within {within:?}: {what}");
}

pub async fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The proxy binary as a child process, killed on drop.
pub struct ChildProxy {
    pub child: Child,
    pub forward: SocketAddr,
    pub admin: SocketAddr,
}

impl ChildProxy {
    pub async fn start(config: &Path, extra: &[&str]) -> ChildProxy {
        let forward: SocketAddr = format!("127.0.0.1:{}", free_port().await).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port().await).parse().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_weft-proxy"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .args(["--no-transparent", "--log", "info,weft_proxy=debug"])
            .arg("--forward")
            .arg(format!("{forward}=web"))
            .arg("--admin-addr")
            .arg(admin.to_string())
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let p = ChildProxy {
            child,
            forward,
            admin,
        };
        let client = h1_client();
        let url = format!("http://{admin}/ready");
        eventually(Duration::from_secs(10), "child proxy ready", || {
            let client = client.clone();
            let url = url.clone();
            async move {
                match client
                    .request(Request::get(url).body(full("")).unwrap())
                    .await
                {
                    Ok(r) => r.status() == StatusCode::OK,
                    Err(_) => false,
                }
            }
        })
        .await;
        p
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub async fn metrics(&self) -> String {
        get(&h1_client(), &format!("http://{}/metrics", self.admin))
            .await
            .1
    }
}

impl Drop for ChildProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects to `addr` and returns the stream, with a 5 s bound.
pub async fn connect(addr: SocketAddr) -> TcpStream {
    tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap()
}

/// Writes a config file as YAML, atomically: editors and config-map updates replace the
/// file, so the watcher never sees it half-written.
pub fn write_config(path: &std::path::Path, value: &serde_json::Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_yaml::to_string(value).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Reads `n` body bytes within 5 s.
pub async fn read_exactly(s: &mut TcpStream, n: usize) -> String {
    let mut body = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut body))
        .await
        .expect("body within 5 s")
        .unwrap();
    String::from_utf8(body).unwrap()
}

/// Reads an HTTP/1 response head (up to the blank line) byte by byte, so that nothing
/// after it (tunnelled bytes) is consumed; lower-cased.
pub async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("response head within 5 s")
            .unwrap();
        assert_eq!(n, 1, "connection closed in the response head: {head:?}");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).to_lowercase()
}

/// Reads a request head up to its blank line, lower-cased; `None` once the peer closes.
pub async fn read_request_head(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).to_lowercase())
}

/// Opens a connection to `addr` and switches it to the backend's echo protocol with an
/// HTTP/1 `Upgrade` (as a WebSocket client does).
pub async fn open_upgrade(addr: SocketAddr) -> TcpStream {
    let mut s = connect(addr).await;
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    s
}

/// Opens an HTTP/1 `CONNECT` tunnel to `target` through `addr`; returns the stream and
/// the response head.
pub async fn open_connect(addr: SocketAddr, target: &str) -> (TcpStream, String) {
    let mut s = connect(addr).await;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    (s, head)
}

/// Sends `msg` and expects it echoed back within 5 s.
pub async fn echo_roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .expect("echo within 5 s")
        .unwrap();
    assert_eq!(buf, msg);
}

/// Waits up to `within` for the peer to close `s` (end of stream or reset).
pub async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// What a [`Scripted`] backend does with the requests it misbehaves on.
#[derive(Clone, Copy, Debug)]
pub enum Misbehave {
    /// Answers with this HTTP status (with the usual `x-backend` headers).
    Status(u16),
    /// Answers gRPC "trailers-only": HTTP 200, `content-type: application/grpc` and
    /// `grpc-status: N` in the headers, no body.
    GrpcStatus(u8),
    /// Reads the request, then closes the connection without answering, with a TCP RST.
    Reset,
    /// Waits this long, then answers normally.
    Delay(Duration),
    /// Reads the request and never answers; counted in [`Scripted::cancelled`] once the
    /// proxy gives up on it (resets the stream, or closes or resets the connection).
    Hang,
}

/// One request as a [`Scripted`] backend received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: http::Method,
    /// Path and query, as they arrived.
    pub target: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Seen {
    /// Every value of header `name`, in order.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("").to_owned())
            .collect()
    }
}

/// An HTTP/1.1 + HTTP/2 backend that misbehaves on demand: its first `first` requests get
/// `what`, later ones a normal answer. It records every request ([`Seen`]), counts
/// requests and connections, and names itself.
///
/// A normal answer is 200 `hello from NAME` with headers `x-backend: NAME`,
/// `x-seen-path` (the path and query received) and `x-upstream-secret` (for response
/// header edits to remove); a gRPC request (`content-type: application/grpc…`) gets a
/// trailers-only `grpc-status: 0` as well.
pub struct Scripted {
    pub addr: SocketAddr,
    pub name: String,
    state: Arc<ScriptState>,
    _task: Task,
}

struct ScriptState {
    name: String,
    first: usize,
    what: Misbehave,
    requests: AtomicUsize,
    connections: AtomicUsize,
    cancelled: Arc<AtomicUsize>,
    seen: std::sync::Mutex<Vec<Seen>>,
}

impl Scripted {
    /// A backend whose first `first` requests get `what`.
    pub async fn start(ip: &str, name: &str, first: usize, what: Misbehave) -> Scripted {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ScriptState {
            name: name.to_owned(),
            first,
            what,
            requests: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            cancelled: Arc::new(AtomicUsize::new(0)),
            seen: std::sync::Mutex::new(Vec::new()),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                st.connections.fetch_add(1, Ordering::SeqCst);
                if matches!(st.what, Misbehave::Reset) {
                    // Closing then sends a RST, not a FIN.
                    let _ = stream.set_zero_linger();
                }
                let st = st.clone();
                tokio::spawn(async move {
                    // Set by a `Reset` request, or by the wrapper when the peer closes: the
                    // connection (and any request hanging on it) is dropped.
                    let drop_conn = Arc::new(tokio::sync::Notify::new());
                    let io = Watched {
                        inner: stream,
                        closed: drop_conn.clone(),
                    };
                    let dc = drop_conn.clone();
                    let svc = hyper::service::service_fn(move |req| {
                        scripted_handle(st.clone(), dc.clone(), req)
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(io), svc);
                    tokio::select! {
                        _ = conn => {}
                        () = drop_conn.notified() => {}
                    }
                });
            }
        });
        Scripted {
            addr,
            name: name.to_owned(),
            state,
            _task: Task(task),
        }
    }

    /// A backend that always answers normally.
    pub async fn ok(ip: &str, name: &str) -> Scripted {
        Scripted::start(ip, name, 0, Misbehave::Status(200)).await
    }

    /// A backend that misbehaves on every request.
    pub async fn always(ip: &str, name: &str, what: Misbehave) -> Scripted {
        Scripted::start(ip, name, usize::MAX, what).await
    }

    /// Requests received (each attempt of a retried request counts).
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Connections accepted.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Hanging requests the proxy gave up on.
    pub fn cancelled(&self) -> usize {
        self.state.cancelled.load(Ordering::SeqCst)
    }

    /// Every request received so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// The last request received; panics when there was none.
    pub fn last(&self) -> Seen {
        self.seen().pop().expect("the backend received a request")
    }
}

/// Counts a hanging request as cancelled when the server drops it.
struct CancelGuard(Arc<AtomicUsize>);
impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

async fn scripted_handle(
    st: Arc<ScriptState>,
    drop_conn: Arc<tokio::sync::Notify>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let n = st.requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let grpc = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    st.seen.lock().unwrap().push(Seen {
        method: parts.method.clone(),
        target: target.clone(),
        headers: parts.headers.clone(),
        body,
    });
    let answer = |status: u16| {
        let mut b = Response::builder()
            .status(status)
            .header("x-backend", st.name.as_str())
            .header("x-seen-path", target.as_str())
            .header("x-upstream-secret", "s3cr3t");
        if grpc {
            b = b
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header("grpc-status", "0");
            return b.body(full("")).unwrap();
        }
        b.body(full(format!("hello from {}", st.name))).unwrap()
    };
    if n >= st.first {
        return Ok(answer(200));
    }
    match st.what {
        Misbehave::Status(s) => Ok(answer(s)),
        Misbehave::GrpcStatus(code) => Ok(Response::builder()
            .status(200)
            .header("x-backend", st.name.as_str())
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header("grpc-status", code.to_string())
            .body(full(""))
            .unwrap()),
        Misbehave::Reset => {
            drop_conn.notify_one();
            std::future::pending().await
        }
        Misbehave::Delay(d) => {
            tokio::time::sleep(d).await;
            Ok(answer(200))
        }
        Misbehave::Hang => {
            let _guard = CancelGuard(st.cancelled.clone());
            std::future::pending().await
        }
    }
}

/// A server-side socket that reports the peer's close (end of stream or error on read),
/// so a connection whose client went away is dropped even while a request on it hangs.
struct Watched {
    inner: TcpStream,
    closed: Arc<tokio::sync::Notify>,
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        match &r {
            std::task::Poll::Ready(Ok(())) if buf.filled().len() == before => {
                self.closed.notify_one()
            }
            std::task::Poll::Ready(Err(_)) => self.closed.notify_one(),
            _ => {}
        }
        r
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An address on `ip` where nothing listens: connecting is refused. Its port stays bound
/// (never listening, without `SO_REUSEADDR`) for the rest of the test binary, so that no
/// other test's server can take it and answer in its place, as a freed port allows.
pub async fn refused_addr(ip: &str) -> SocketAddr {
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind(SocketAddr::new(ip.parse().unwrap(), 0)).unwrap();
    let addr = held.local_addr().unwrap();
    // Leaked on purpose: one socket per call, for the life of the test process.
    std::mem::forget(held);
    addr
}

/// An HTTP/1 client whose connections come from source address `ip` (127.0.0.x), so a
/// test can play several clients.
pub fn h1_client_from(ip: &str) -> Client<HttpConnector, Body> {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(ip.parse().unwrap()));
    Client::builder(TokioExecutor::new()).build(connector)
}

/// An HTTP/1.1 + HTTP/2 backend whose behaviour a test changes while it runs: it answers
/// 503 while `failing` is set, waits `delay_ms` before every answer, and counts the
/// connections it accepted and the requests it answered.
pub struct ControlledBackend {
    pub addr: SocketAddr,
    pub failing: Arc<std::sync::atomic::AtomicBool>,
    pub connections: Arc<AtomicUsize>,
    pub hits: Arc<AtomicUsize>,
    _task: Task,
}

impl ControlledBackend {
    pub async fn start(ip: &str, delay_ms: u64) -> ControlledBackend {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let hits = Arc::new(AtomicUsize::new(0));
        let (f, c, h) = (failing.clone(), connections.clone(), hits.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (failing, hits) = (f.clone(), h.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                        let (failing, hits) = (failing.clone(), hits.clone());
                        async move {
                            hits.fetch_add(1, Ordering::SeqCst);
                            if delay_ms > 0 {
                                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                            }
                            let status = if failing.load(Ordering::SeqCst) {
                                StatusCode::SERVICE_UNAVAILABLE
                            } else {
                                StatusCode::OK
                            };
                            let mut resp = Response::new(full("controlled"));
                            *resp.status_mut() = status;
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        ControlledBackend {
            addr,
            failing,
            connections,
            hits,
            _task: Task(task),
        }
    }

    pub fn fail(&self, on: bool) {
        self.failing.store(on, Ordering::SeqCst);
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// An address on `ip` whose connects hang: a listener that never accepts, its accept queue
/// filled first, so the kernel drops further SYNs. Keep the returned listener and
/// connections alive for as long as the address must hang.
pub async fn hanging_addr(
    ip: &str,
) -> (
    SocketAddr,
    tokio::net::TcpListener,
    Vec<tokio::net::TcpStream>,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => held.push(s),
            Ok(Err(e)) => panic!("unexpected connect error {e}"),
            Err(_) => return (addr, listener, held),
        }
    }
    panic!("the accept queue never filled");
}
