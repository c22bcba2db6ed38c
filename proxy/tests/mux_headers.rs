//! Request smuggling and header handling between two sidecars, on the wire: raw bytes from
//! the client application into a client sidecar, mutual TLS to a server sidecar (HTTP/1 on
//! the `weft-mux` session, or in `weft-http1` sessions of its own), or plain text to the
//! same server sidecar, and a raw TCP application behind it that records exactly the
//! bytes it received and frames them itself, strictly.
//!
//! ```text
//!  raw bytes ─▶ client sidecar ══ mux | sessions | plain ══▶ server sidecar ─▶ recording app
//! ```
//!
//! Each case states what the far application must receive (one well-framed request per
//! client request, or nothing), what the client is answered, and whether its connection
//! stays in step; the same on every transport. The single-proxy path is in `limits.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use support::ca::Ca;
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use weft_proxy::{
    LocalPorts, Proxy,
    detect::{MAX_DETECT_BYTES, Protocol, classify},
    identity::{ClientTls, Http1Transport, IdentityStore, Inner},
    limits::Limits,
    server::{BeforeConfig, ListenerKind},
    trace::{Collector, Sampling, TraceConfig, Tracer},
};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";

/// How long any single read may wait: a proxy that leaves a connection hanging fails.
const WAIT: Duration = Duration::from_secs(5);

// ---- the recording application ----

/// One request as the application framed it.
#[derive(Clone, Debug)]
struct AppRequest {
    /// The request line, as sent.
    line: String,
    /// Header fields, names lower-cased, in order.
    headers: Vec<(String, String)>,
    /// The decoded body.
    body: Vec<u8>,
}

impl AppRequest {
    fn path(&self) -> &str {
        self.line.split(' ').nth(1).unwrap_or_default()
    }

    fn values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn has(&self, name: &str) -> bool {
        !self.values(name).is_empty()
    }
}

/// What the application saw: complete requests, and anything it could not frame as one
/// (a malformed head or framing, or bytes left when a connection closed).
#[derive(Default)]
struct Record {
    requests: Vec<AppRequest>,
    malformed: Vec<String>,
    partial: Vec<Vec<u8>>,
}

/// A raw HTTP/1.1 application: frames what it reads strictly (CRLF only, exactly one of
/// `content-length` and `transfer-encoding: chunked`, no chunk extensions), records it, and
/// answers each request `200` with the body `ok`.
struct RecordingApp {
    addr: SocketAddr,
    record: Arc<Mutex<Record>>,
    _task: Task,
}

impl RecordingApp {
    async fn start() -> RecordingApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let record: Arc<Mutex<Record>> = Arc::default();
        let shared = record.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(app_connection(s, shared.clone()));
            }
        });
        RecordingApp {
            addr,
            record,
            _task: Task(task),
        }
    }

    /// An application that speaks HTTP/1.1 and HTTP/2 (hyper's), recording each request's
    /// head as hyper read it (the line as `METHOD target HTTP/2.0`, `:authority` as
    /// `:authority`), and answering `200 ok` (to `HEAD`, `head_body`: an application
    /// that sends one breaks HTTP/2's rule, RFC 9113 §8.1.1).
    async fn start_h2(head_body: &'static str) -> RecordingApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let record: Arc<Mutex<Record>> = Arc::default();
        let shared = record.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let _ = s.set_nodelay(true);
                let shared = shared.clone();
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let shared = shared.clone();
                        async move {
                            let mut headers: Vec<(String, String)> = req
                                .headers()
                                .iter()
                                .map(|(n, v)| {
                                    (
                                        n.as_str().to_owned(),
                                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                    )
                                })
                                .collect();
                            if let Some(a) = req.uri().authority() {
                                headers.push((":authority".to_owned(), a.to_string()));
                            }
                            let head = req.method() == http::Method::HEAD;
                            let line = format!(
                                "{} {} {:?}",
                                req.method(),
                                req.uri().path_and_query().map_or("/", |p| p.as_str()),
                                req.version()
                            );
                            let body = http_body_util::BodyExt::collect(req.into_body())
                                .await
                                .map(|b| b.to_bytes().to_vec())
                                .unwrap_or_default();
                            shared.lock().unwrap().requests.push(AppRequest {
                                line,
                                headers,
                                body,
                            });
                            let body = if head { full(head_body) } else { full("ok") };
                            Ok::<_, std::convert::Infallible>(http::Response::new(body))
                        }
                    });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
                });
            }
        });
        RecordingApp {
            addr,
            record,
            _task: Task(task),
        }
    }

    /// An application that speaks HTTP/2 alone (prior knowledge), built on the h2 crate,
    /// which sends what hyper's server would not: `/answer` is answered as the request's
    /// `x-script` ([`H2Script`], JSON in hex) says, anything else `200 ok`.
    async fn start_h2_scripted() -> RecordingApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let _ = s.set_nodelay(true);
                tokio::spawn(serve_scripted_h2(s));
            }
        });
        RecordingApp {
            addr,
            record: Arc::default(),
            _task: Task(task),
        }
    }

    fn take(&self) -> Record {
        std::mem::take(&mut *self.record.lock().unwrap())
    }
}

async fn app_connection(mut s: TcpStream, record: Arc<Mutex<Record>>) {
    let mut buf = Vec::new();
    loop {
        match frame_request(&buf) {
            Framed::Request(req, used) => {
                buf.drain(..used);
                // `/answer`: the bytes the request's `x-answer` spells in hex, as they are.
                if req.path() == "/answer" {
                    let answer = req.values("x-answer").first().map(|h| unhex(h));
                    let close = req.has("x-then-close");
                    record.lock().unwrap().requests.push(req);
                    let answer = answer.unwrap_or_default();
                    if s.write_all(&answer).await.is_err() || close {
                        return;
                    }
                    continue;
                }
                let answer: &[u8] = match req.path() {
                    "/trailers-back" => {
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-r, connection, keep-alive, upgrade\r\n\r\n2\r\nok\r\n0\r\nx-r: 1\r\nconnection: close\r\nkeep-alive: 1\r\nupgrade: x\r\n\r\n"
                    }
                    // Bodies whose transfer codings the proxy cannot carry (the gzip
                    // bytes here are a stand-in: no proxy decodes them).
                    "/gzip-chunked" => {
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n4\r\ngzip\r\n0\r\n\r\n"
                    }
                    "/gzip-then-chunked" => {
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n4\r\ngzip\r\n0\r\n\r\n"
                    }
                    "/chunked-twice" => {
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, chunked\r\n\r\n9\r\n4\r\ngzip\r\n\r\n0\r\n\r\n"
                    }
                    // Read to the connection's close (RFC 9112 §6.3).
                    "/gzip-to-close" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\ngzip",
                    _ if req.line.starts_with("HEAD ") => {
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
                    }
                    _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                };
                let close = req.path() == "/gzip-to-close";
                record.lock().unwrap().requests.push(req);
                if s.write_all(answer).await.is_err() || close {
                    return;
                }
                continue;
            }
            Framed::Malformed(why) => {
                let got = String::from_utf8_lossy(&buf[..buf.len().min(512)]);
                record
                    .lock()
                    .unwrap()
                    .malformed
                    .push(format!("{why} in {got:?}"));
                return;
            }
            Framed::More => {}
        }
        let mut chunk = [0u8; 8192];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                if !buf.is_empty() {
                    record.lock().unwrap().partial.push(buf);
                }
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .filter_map(|i| u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

enum Framed {
    Request(AppRequest, usize),
    Malformed(String),
    More,
}

fn find(buf: &[u8], what: &[u8]) -> Option<usize> {
    buf.windows(what.len()).position(|w| w == what)
}

/// Frames one request at the start of `buf`, as strictly as RFC 9112 allows a sender to
/// write one.
fn frame_request(buf: &[u8]) -> Framed {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return Framed::More;
    };
    let head = &buf[..end];
    if head.contains(&0) {
        return Framed::Malformed("NUL in the head".into());
    }
    let head = String::from_utf8_lossy(head).into_owned();
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default().to_string();
    if line.contains(['\r', '\n']) || line.split(' ').count() != 3 {
        return Framed::Malformed(format!("request line {line:?}"));
    }
    let mut headers = Vec::new();
    for l in lines {
        if l.contains(['\r', '\n']) || l.starts_with([' ', '\t']) {
            return Framed::Malformed(format!("field line {l:?}"));
        }
        let Some((name, value)) = l.split_once(':') else {
            return Framed::Malformed(format!("field line {l:?}"));
        };
        if name.is_empty() || name.contains([' ', '\t']) {
            return Framed::Malformed(format!("field name {name:?}"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    let mut req = AppRequest {
        line,
        headers,
        body: Vec::new(),
    };
    let cl = req.values("content-length");
    let te = req.values("transfer-encoding");
    let mut at = end + 4;
    match (cl.as_slice(), te.as_slice()) {
        ([], []) => {}
        ([len], []) => {
            let Ok(len) = len.parse::<usize>() else {
                return Framed::Malformed(format!("content-length {len:?}"));
            };
            if buf.len() < at + len {
                return Framed::More;
            }
            req.body = buf[at..at + len].to_vec();
            at += len;
        }
        ([], ["chunked"]) => loop {
            let Some(eol) = find(&buf[at..], b"\r\n") else {
                return Framed::More;
            };
            let size_line = String::from_utf8_lossy(&buf[at..at + eol]).into_owned();
            let Ok(size) = usize::from_str_radix(&size_line, 16) else {
                return Framed::Malformed(format!("chunk size {size_line:?}"));
            };
            at += eol + 2;
            if size == 0 {
                // Trailer fields, then the empty line.
                loop {
                    let Some(eol) = find(&buf[at..], b"\r\n") else {
                        return Framed::More;
                    };
                    let trailer = String::from_utf8_lossy(&buf[at..at + eol]).into_owned();
                    at += eol + 2;
                    if trailer.is_empty() {
                        break;
                    }
                    if let Some((n, v)) = trailer.split_once(':') {
                        req.headers.push((
                            format!("trailer:{}", n.to_ascii_lowercase()),
                            v.trim().into(),
                        ));
                    }
                }
                break;
            }
            if buf.len() < at + size + 2 {
                return Framed::More;
            }
            if &buf[at + size..at + size + 2] != b"\r\n" {
                return Framed::Malformed("chunk not ended by CRLF".into());
            }
            req.body.extend_from_slice(&buf[at..at + size]);
            at += size + 2;
        },
        _ => {
            return Framed::Malformed(format!(
                "ambiguous framing: content-length {cl:?}, transfer-encoding {te:?}"
            ));
        }
    }
    Framed::Request(req, at)
}

// ---- the chain ----

fn proxy_with(identity: Option<Arc<IdentityStore>>, limits: Limits) -> Arc<Proxy> {
    Proxy::with_identity(
        limits,
        BeforeConfig::default(),
        LocalPorts::default(),
        identity,
    )
}

/// The recording application, its server sidecar, and a client sidecar per way of
/// carrying HTTP/1 to it: on the mux, in TLS sessions of its own, and in plain text.
struct Chain {
    app: RecordingApp,
    /// Kept alive for the chain's life.
    _server: TestProxy,
    clients: Vec<(&'static str, TestProxy)>,
    /// The client's mesh identity towards the server's sidecar, for a test that plays a
    /// peer proxy itself ([`peer_mux`]).
    peer: Arc<ClientTls>,
}

impl Chain {
    async fn start() -> Chain {
        Chain::with_limits(Limits::default()).await
    }

    async fn with_limits(limits: Limits) -> Chain {
        Chain::with(limits, None).await
    }

    /// A chain whose client sidecars route the service with these Route `rules`.
    async fn routed(rules: serde_json::Value) -> Chain {
        Chain::with(Limits::default(), Some(rules)).await
    }

    async fn with(limits: Limits, rules: Option<serde_json::Value>) -> Chain {
        Chain::with_app(limits, rules, RecordingApp::start().await).await
    }

    async fn with_app(
        limits: Limits,
        rules: Option<serde_json::Value>,
        app: RecordingApp,
    ) -> Chain {
        let route = |c: &mut serde_json::Value| {
            if let Some(rules) = &rules {
                c["services"][0]["route"] = serde_json::json!({"name": "shop/web", "rules": rules});
            }
        };
        let ca = Ca::new("mesh root");
        let server = TestProxy::start_kind(
            proxy_with(Some(ca.store(SERVER_ID)), limits),
            ListenerKind::InboundTo(app.addr),
            config(&[]),
        );
        let mut clients = Vec::new();
        for (name, transport) in [
            ("mux", Http1Transport::Multiplexed),
            ("sessions", Http1Transport::Sessions),
        ] {
            let store = IdentityStore::with_http1(transport).unwrap();
            ca.install(&store, CLIENT_ID);
            let mut c = config(&[("web", &[server.addr])]);
            c["services"][0]["endpoints"][0]["identity"] = serde_json::json!(SERVER_ID);
            route(&mut c);
            let client = TestProxy::start_kind(
                proxy_with(Some(store), limits),
                ListenerKind::Forward(Arc::from("web")),
                c,
            );
            clients.push((name, client));
        }
        let mut c = config(&[("web", &[server.addr])]);
        route(&mut c);
        let plain = TestProxy::start_kind(
            proxy_with(None, limits),
            ListenerKind::Forward(Arc::from("web")),
            c,
        );
        clients.push(("plain", plain));
        let peer = ca
            .store(CLIENT_ID)
            .client_tls(Arc::from(SERVER_ID))
            .unwrap();
        Chain {
            app,
            _server: server,
            clients,
            peer,
        }
    }
}

/// Turns tracing on in `proxy`, every request sampled; its spans go nowhere (no
/// collector runs), which changes nothing of what it writes into requests.
fn traced(proxy: &Proxy) {
    let (tracer, _exporter) = Tracer::new(
        TraceConfig {
            collector: "127.0.0.1:9".parse::<Collector>().unwrap(),
            sampling: "1".parse::<Sampling>().unwrap(),
            resource: vec![("service.name", "test".to_owned())],
        },
        proxy.metrics.trace.clone(),
    );
    proxy.tracer.set(tracer).unwrap();
}

// ---- the client application ----

/// A response as the client read it: the head lower-cased, the body, and the trailer
/// fields of a chunked one.
struct Answer {
    head: String,
    body: Vec<u8>,
    trailers: Vec<String>,
}

/// One CRLF-ended line, without its CRLF.
async fn read_line(s: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut byte))
            .await
            .expect("a line within 5 s")
            .unwrap();
        assert_eq!(n, 1, "closed within a chunked body: {line:?}");
        line.push(byte[0]);
    }
    line.truncate(line.len() - 2);
    String::from_utf8_lossy(&line).into_owned()
}

impl Answer {
    fn status(&self) -> u16 {
        self.head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            (n.trim() == name).then(|| v.trim())
        })
    }
}

/// Reads one response on `s`: `None` if the connection closed before a head. A proxy that
/// neither answers nor closes within [`WAIT`] fails the test.
async fn read_answer(s: &mut TcpStream) -> Option<Answer> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, s.read(&mut byte))
            .await
            .expect("an answer or a close within 5 s, not a hanging connection")
        {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let mut answer = Answer {
        head,
        body: Vec::new(),
        trailers: Vec::new(),
    };
    if let Some(len) = answer.header("content-length") {
        let mut body = vec![0u8; len.parse().unwrap()];
        tokio::time::timeout(WAIT, s.read_exact(&mut body))
            .await
            .expect("body within 5 s")
            .unwrap();
        answer.body = body;
    } else if answer.header("transfer-encoding") == Some("chunked") {
        // Chunks, then trailer fields (kept, lower-cased, after the head) to the empty line.
        loop {
            let line = read_line(s).await;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or_default(), 16)
                .unwrap_or_else(|_| panic!("chunk size {line:?}"));
            if size == 0 {
                loop {
                    let trailer = read_line(s).await;
                    if trailer.is_empty() {
                        return Some(answer);
                    }
                    answer.trailers.push(trailer.to_lowercase());
                }
            }
            let mut chunk = vec![0u8; size + 2];
            tokio::time::timeout(WAIT, s.read_exact(&mut chunk))
                .await
                .expect("chunk within 5 s")
                .unwrap();
            answer.body.extend_from_slice(&chunk[..size]);
        }
    } else {
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut answer.body)).await;
    }
    Some(answer)
}

/// Whether the proxy closes `s` within [`WAIT`] (an end of stream or a reset).
async fn closes(s: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    match tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await {
        Ok(Ok(_)) => {
            assert!(rest.is_empty(), "bytes after the answer: {rest:?}");
            true
        }
        Ok(Err(_)) => true,
        Err(_) => false,
    }
}

/// `GET /next` on `s`: answered `ok` by the application, so the connection is in step.
async fn next_in_step(s: &mut TcpStream, what: &str) {
    s.write_all(b"GET /next HTTP/1.1\r\nHost: cart\r\n\r\n")
        .await
        .unwrap();
    let a = read_answer(s)
        .await
        .unwrap_or_else(|| panic!("{what}: closed"));
    assert_eq!(a.status(), 200, "{what}: {}", a.head);
    assert_eq!(a.body, b"ok", "{what}");
}

// ---- expectations ----

/// The invariants every request the application receives must keep, on any transport:
/// one framing, no hop-by-hop field, no field of the mesh's own but the identity it set.
fn well_formed(transport: &str, what: &str, r: &AppRequest) {
    let ctx = format!("{transport}, {what}: {r:?}");
    assert!(
        r.line.ends_with(" HTTP/1.1") || r.line.ends_with(" HTTP/1.0"),
        "{ctx}"
    );
    assert!(
        !(r.has("content-length") && r.has("transfer-encoding")),
        "{ctx}"
    );
    // An upgrade request keeps `Upgrade` and `Connection: upgrade`, so that the
    // application can switch; never to h2c.
    let upgrade = r.values("connection") == ["upgrade"] && r.has("upgrade");
    for offered in r.values("upgrade") {
        assert!(!offered.to_ascii_lowercase().contains("h2c"), "{ctx}");
    }
    for hop in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "weft-orig-proto",
    ] {
        let allowed = upgrade && (hop == "connection" || hop == "upgrade");
        assert!(
            allowed || !r.has(hop),
            "{hop} reached the application; {ctx}"
        );
    }
    for te in r.values("te") {
        assert_eq!(te, "trailers", "{ctx}");
    }
    assert_eq!(r.values("host").len(), 1, "exactly one Host; {ctx}");
    let identity = format!("URI={CLIENT_ID}");
    let expected: Vec<&str> = if transport == "plain" || transport == "direct" {
        vec![]
    } else {
        vec![identity.as_str()]
    };
    assert_eq!(
        r.values("x-forwarded-client-cert"),
        expected,
        "only the identity the server sidecar verified; {ctx}"
    );
}

/// What a case expects.
enum Expect {
    /// Answered with this status by a proxy (no request reaches the application) and the
    /// connection closed.
    Refused(u16),
    /// Answered with this status by a proxy (no request reaches the application), and the
    /// connection, whose framing was never in doubt, serves a next request.
    RefusedInStep(u16),
    /// Forwarded: the application receives requests to exactly these paths, in order
    /// (each one checked by `check`), and the client gets one `200 ok` per request;
    /// `close`: the connection then closes (else a next request is served on it).
    Forwarded {
        paths: &'static [&'static str],
        close: bool,
        check: fn(&AppRequest),
    },
}

fn no_check(_: &AppRequest) {}

/// Sends `bytes` on a new connection through every transport of `chain` and checks what
/// the client is answered and what the application received.
async fn case(chain: &Chain, what: &str, bytes: &[u8], expect: &Expect) {
    for (transport, client) in &chain.clients {
        chain.app.take();
        let mut s = connect(client.addr).await;
        let ctx = format!("{transport}, {what}");
        // A proxy may answer and close before it has read all of an oversize head.
        let written = s.write_all(bytes).await;
        match expect {
            Expect::Refused(status) => {
                match read_answer(&mut s).await {
                    Some(a) => {
                        assert_eq!(a.status(), *status, "{ctx}: {}", a.head);
                        assert!(closes(&mut s).await, "{ctx}: left open after a refusal");
                    }
                    // The answer lost to the reset of a connection closed with unread
                    // bytes: only when the client was still writing.
                    None => assert!(written.is_err(), "{ctx}: closed without an answer"),
                }
                let seen = chain.app.take();
                assert!(seen.partial.is_empty(), "{ctx}: {:?}", seen.partial);
                assert!(
                    seen.requests.is_empty(),
                    "{ctx}: reached the application: {:?}",
                    seen.requests
                );
                assert!(seen.malformed.is_empty(), "{ctx}: {:?}", seen.malformed);
            }
            Expect::RefusedInStep(status) => {
                written.unwrap();
                let a = read_answer(&mut s)
                    .await
                    .unwrap_or_else(|| panic!("{ctx}: closed without an answer"));
                assert_eq!(a.status(), *status, "{ctx}: {}", a.head);
                next_in_step(&mut s, &ctx).await;
                let seen = chain.app.take();
                let got: Vec<&str> = seen.requests.iter().map(AppRequest::path).collect();
                assert_eq!(got, ["/next"], "{ctx}: reached the application");
                assert!(seen.partial.is_empty(), "{ctx}: {:?}", seen.partial);
                assert!(seen.malformed.is_empty(), "{ctx}: {:?}", seen.malformed);
            }
            Expect::Forwarded {
                paths,
                close,
                check,
            } => {
                written.unwrap();
                for _ in paths.iter() {
                    let a = read_answer(&mut s)
                        .await
                        .unwrap_or_else(|| panic!("{ctx}: closed without an answer"));
                    assert_eq!(a.status(), 200, "{ctx}: {}", a.head);
                    assert_eq!(a.body, b"ok", "{ctx}");
                }
                if *close {
                    assert!(closes(&mut s).await, "{ctx}: not closed");
                } else {
                    next_in_step(&mut s, &ctx).await;
                }
                let seen = chain.app.take();
                assert!(seen.malformed.is_empty(), "{ctx}: {:?}", seen.malformed);
                assert!(seen.partial.is_empty(), "{ctx}: {:?}", seen.partial);
                let got: Vec<&str> = seen
                    .requests
                    .iter()
                    .map(AppRequest::path)
                    .filter(|p| *p != "/next")
                    .collect();
                assert_eq!(got, *paths, "{ctx}: {:?}", seen.requests);
                for r in &seen.requests {
                    well_formed(transport, what, r);
                    if r.path() != "/next" {
                        check(r);
                    }
                }
            }
        }
    }
}

// ---- framing ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_refused_or_read_one_way_on_every_transport() {
    let chain = Chain::start().await;
    let refused: &[(&str, &[u8])] = &[
        (
            "two different Content-Lengths",
            b"POST /x HTTP/1.1\r\nHost: cart\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        ),
        (
            "Content-Length: 1, 2",
            b"POST /x HTTP/1.1\r\nHost: cart\r\nContent-Length: 1, 2\r\n\r\nab",
        ),
        (
            "Content-Length: 2, 2 (a list, even of equal values)",
            b"POST /x HTTP/1.1\r\nHost: cart\r\nContent-Length: 2, 2\r\n\r\nab",
        ),
        (
            "Content-Length: +2",
            b"POST /x HTTP/1.1\r\nHost: cart\r\nContent-Length: +2\r\n\r\nab",
        ),
        (
            "Transfer-Encoding: chunked, identity",
            b"POST /x HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding: xchunked",
            b"POST /x HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding: chunked then a second line identity",
            b"POST /x HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding: gzip, chunked (a coding the proxy does not decode)",
            b"POST /x HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding: identity then a second line chunked",
            b"POST /x HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding: chunked, chunked (chunked twice)",
            b"POST /x HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\n0\r\n\r\n\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            b"POST /x HTTP/1.0\r\nHost: cart\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "whitespace before the colon: Transfer-Encoding : chunked",
            b"POST /x HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\nabc",
        ),
        (
            "obs-fold of Transfer-Encoding",
            b"POST /x HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "obs-fold of another field",
            b"GET /x HTTP/1.1\r\nHost: cart\r\nX-A: 1\r\n folded\r\n\r\n",
        ),
        (
            "NUL in a value",
            b"GET /x HTTP/1.1\r\nHost: cart\r\nX-A: a\x00b\r\n\r\n",
        ),
        (
            "CR in a value",
            b"GET /x HTTP/1.1\r\nHost: cart\r\nX-A: a\rb\r\n\r\n",
        ),
        (
            "a bare CR ending a field line",
            b"GET /x HTTP/1.1\r\nHost: cart\rX-A: b\r\n\r\n",
        ),
    ];
    for (what, bytes) in refused {
        case(&chain, what, bytes, &Expect::Refused(400)).await;
    }

    // Both framings (RFC 9112 §6.3): read as chunked, Content-Length dropped, and the
    // connection closed after the answer, so bytes past the chunked body are never read
    // as a request. CL.TE: what a length-reading hop would take as the body is the empty
    // chunked body and a second request.
    case(
        &chain,
        "CL.TE: Content-Length 6 and chunked with a request after the last chunk",
        b"POST /clte HTTP/1.1\r\nHost: cart\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: cart\r\n\r\n",
        &Expect::Forwarded {
            paths: &["/clte"],
            close: true,
            check: |r| assert!(r.body.is_empty(), "{r:?}"),
        },
    )
    .await;
    // TE.CL: the length ends within the first chunk.
    case(
        &chain,
        "TE.CL: chunked and Content-Length 3",
        b"POST /tecl HTTP/1.1\r\nHost: cart\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n18\r\nGET /smuggled HTTP/1.1\r\n\r\n0\r\n\r\n",
        &Expect::Forwarded {
            paths: &["/tecl"],
            close: true,
            check: |r| assert_eq!(r.body, b"GET /smuggled HTTP/1.1\r\n", "{r:?}"),
        },
    )
    .await;
    // Transfer-Encoding after Content-Length, in another case, and chunked in the body of
    // a GET: the body stays a body.
    case(
        &chain,
        "GET with a chunked body that reads as a request",
        b"GET /get-body HTTP/1.1\r\nHost: cart\r\ntransfer-encoding: CHUNKED\r\n\r\n26\r\nGET /smuggled HTTP/1.1\r\nHost: cart\r\n\r\n\r\n0\r\n\r\n",
        &Expect::Forwarded {
            paths: &["/get-body"],
            close: false,
            check: |r| assert_eq!(r.body, b"GET /smuggled HTTP/1.1\r\nHost: cart\r\n\r\n", "{r:?}"),
        },
    )
    .await;
    case(
        &chain,
        "GET with a Content-Length body that reads as a request",
        b"GET /get-length HTTP/1.1\r\nHost: cart\r\nContent-Length: 38\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: cart\r\n\r\n",
        &Expect::Forwarded {
            paths: &["/get-length"],
            close: false,
            check: |r| assert_eq!(r.body, b"GET /smuggled HTTP/1.1\r\nHost: cart\r\n\r\n", "{r:?}"),
        },
    )
    .await;
    // Pipelined requests, each framed: each reaches the application once, in order.
    case(
        &chain,
        "three pipelined requests",
        b"POST /one HTTP/1.1\r\nHost: cart\r\nContent-Length: 5\r\n\r\nhelloPOST /two HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /three HTTP/1.1\r\nHost: cart\r\n\r\n",
        &Expect::Forwarded {
            paths: &["/one", "/two", "/three"],
            close: false,
            check: |r| match r.path() {
                "/one" => assert_eq!(r.body, b"hello"),
                "/two" => assert_eq!(r.body, b"abc"),
                _ => assert!(r.body.is_empty()),
            },
        },
    )
    .await;
    // Chunk extensions are read and not passed on.
    case(
        &chain,
        "chunk extensions",
        b"POST /ext HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding: chunked\r\n\r\n5;name=value;q=\"a;b\"\r\nhello\r\n0;last\r\n\r\n",
        &Expect::Forwarded {
            paths: &["/ext"],
            close: false,
            check: |r| assert_eq!(r.body, b"hello", "{r:?}"),
        },
    )
    .await;
    // A bare LF ending the head's lines (RFC 9112 §2.2 lets a recipient accept it): the
    // application gets CRLF.
    case(
        &chain,
        "bare LF line endings in the head",
        b"GET /lf HTTP/1.1\nHost: cart\nX-A: 1\n\n",
        &Expect::Forwarded {
            paths: &["/lf"],
            close: false,
            check: |r| assert_eq!(r.values("x-a"), ["1"], "{r:?}"),
        },
    )
    .await;
}

/// A chunked body the client's sidecar cannot decode: the client is answered 400
/// `request_body_incomplete` (or its connection closed, when the head was answered
/// already), and the application never gets a complete request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_never_becomes_a_complete_request() {
    let chain = Chain::start().await;
    let bodies: &[(&str, &[u8])] = &[
        (
            "an overflowing chunk size",
            b"POST /x HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding: chunked\r\n\r\n1000000000000000a\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "a chunk size with a sign",
            b"POST /x HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n",
        ),
        (
            "a chunk size ended by a bare LF",
            b"POST /x HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
        ),
        (
            "chunk data longer than its size",
            b"POST /x HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n",
        ),
        (
            "a chunk extension with a bare LF",
            b"POST /x HTTP/1.1\r\nHost: cart\r\nTransfer-Encoding: chunked\r\n\r\n3;a\nb\r\nabc\r\n0\r\n\r\n",
        ),
    ];
    for (what, bytes) in bodies {
        for (transport, client) in &chain.clients {
            let ctx = format!("{transport}, {what}");
            let mut s = connect(client.addr).await;
            s.write_all(bytes).await.unwrap();
            let a = read_answer(&mut s)
                .await
                .unwrap_or_else(|| panic!("{ctx}: closed without an answer"));
            assert_eq!(a.status(), 400, "{ctx}: {}", a.head);
            assert_eq!(
                a.header("weft-error"),
                Some("request_body_incomplete"),
                "{ctx}"
            );
            assert!(closes(&mut s).await, "{ctx}: left open");
            // The application may have seen the head and part of the body, never a
            // request it would answer.
            eventually(WAIT, &ctx, || async {
                let r = chain.app.record.lock().unwrap();
                r.requests.is_empty() && r.malformed.is_empty()
            })
            .await;
            chain.app.take();
        }
    }
    still_serving(&chain).await;
}

/// Every transport still serves a new connection.
async fn still_serving(chain: &Chain) {
    for (transport, client) in &chain.clients {
        let mut s = connect(client.addr).await;
        next_in_step(&mut s, &format!("{transport}: a new connection")).await;
    }
    chain.app.take();
}

// ---- hop-by-hop fields ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_fields_stop_at_the_first_proxy_on_every_transport() {
    let chain = Chain::start().await;
    case(
        &chain,
        "Connection names a field",
        b"GET /named HTTP/1.1\r\nHost: cart\r\nConnection: x-secret, X-Other\r\nX-Secret: 1\r\nx-other: 2\r\nX-Kept: 3\r\n\r\n",
        &Expect::Forwarded {
            paths: &["/named"],
            close: false,
            check: |r| {
                assert!(!r.has("x-secret") && !r.has("x-other"), "{r:?}");
                assert_eq!(r.values("x-kept"), ["3"]);
            },
        },
    )
    .await;
    case(
        &chain,
        "Connection, Keep-Alive, Proxy-Connection, TE: gzip, Upgrade without Connection: upgrade",
        b"GET /hop HTTP/1.1\r\nHost: cart\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: gzip\r\nUpgrade: websocket\r\n\r\n",
        &Expect::Forwarded {
            paths: &["/hop"],
            close: false,
            check: |r| assert!(!r.has("te"), "{r:?}"),
        },
    )
    .await;
    case(
        &chain,
        "TE: trailers crosses",
        b"GET /te HTTP/1.1\r\nHost: cart\r\nTE: trailers\r\n\r\n",
        &Expect::Forwarded {
            paths: &["/te"],
            close: false,
            check: |r| assert_eq!(r.values("te"), ["trailers"], "{r:?}"),
        },
    )
    .await;
    case(
        &chain,
        "Connection: close",
        b"GET /close HTTP/1.1\r\nHost: cart\r\nConnection: close\r\n\r\n",
        &Expect::Forwarded {
            paths: &["/close"],
            close: true,
            check: no_check,
        },
    )
    .await;
    // Connection naming the framing or Host cannot unframe a request or lose its Host.
    case(
        &chain,
        "Connection names Content-Length, Host and the identity",
        b"POST /framed HTTP/1.1\r\nHost: cart\r\nConnection: content-length, host, x-forwarded-client-cert\r\nContent-Length: 5\r\n\r\nhello",
        &Expect::Forwarded {
            paths: &["/framed"],
            close: false,
            check: |r| {
                assert_eq!(r.body, b"hello", "{r:?}");
                assert_eq!(r.values("content-length"), ["5"], "{r:?}");
                assert_eq!(r.values("host"), ["cart"], "{r:?}");
            },
        },
    )
    .await;
    case(
        &chain,
        "Connection names Transfer-Encoding",
        b"POST /framed-chunked HTTP/1.1\r\nHost: cart\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        &Expect::Forwarded {
            paths: &["/framed-chunked"],
            close: false,
            check: |r| assert_eq!(r.body, b"hello", "{r:?}"),
        },
    )
    .await;
}

/// Empty lines before the request line are skipped (RFC 9112 §2.2), as hyper's parser
/// skips them: the request is HTTP to every proxy, not opaque bytes the application would
/// read as a request past every HTTP rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_lines_before_a_request_are_skipped_on_every_transport() {
    let chain = Chain::start().await;
    case(
        &chain,
        "CRLF, LF, then a request",
        b"\r\n\nGET /lead HTTP/1.1\r\nHost: cart\r\n\r\n",
        &Expect::Forwarded {
            paths: &["/lead"],
            close: false,
            check: no_check,
        },
    )
    .await;
}

/// `TE` goes on as `trailers` alone: a later `TE` behind a first `trailers` reached the
/// application on HTTP/1 (and h2 refused the request on the mux).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_crosses_as_trailers_alone_on_every_transport() {
    let chain = Chain::start().await;
    for (what, bytes) in [
        (
            "TE: trailers, then TE: gzip",
            &b"GET /te HTTP/1.1\r\nHost: cart\r\nTE: trailers\r\nTE: gzip\r\n\r\n"[..],
        ),
        (
            "TE: gzip, then TE: trailers",
            b"GET /te HTTP/1.1\r\nHost: cart\r\nTE: gzip\r\nTE: trailers\r\n\r\n",
        ),
    ] {
        case(
            &chain,
            what,
            bytes,
            &Expect::Forwarded {
                paths: &["/te"],
                close: false,
                check: |r| assert_eq!(r.values("te"), ["trailers"], "{r:?}"),
            },
        )
        .await;
    }
}

/// An offer to switch to h2c never reaches the application, from a client sidecar or
/// straight at the server's: an application that took it would answer `101` and serve
/// HTTP/2 requests inside the tunnel, past the server sidecar's authorization ("h2c
/// smuggling"). The request itself goes on, as plain HTTP/1.1; another protocol offered
/// beside h2c stays an upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_offer_never_reaches_the_application() {
    let chain = Chain::start().await;
    let offer: &[u8] = b"GET /h2c HTTP/1.1\r\nHost: cart\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n";
    let no_offer = |r: &AppRequest| {
        for field in ["upgrade", "http2-settings", "connection"] {
            assert!(!r.has(field), "{field} reached the application: {r:?}");
        }
    };
    case(
        &chain,
        "Upgrade: h2c",
        offer,
        &Expect::Forwarded {
            paths: &["/h2c"],
            close: false,
            check: no_offer,
        },
    )
    .await;
    // Straight at the server's sidecar, in plain text (a client outside the mesh).
    let mut s = connect(chain._server.addr).await;
    s.write_all(offer).await.unwrap();
    let a = read_answer(&mut s).await.expect("an answer");
    assert_eq!(a.status(), 200, "{}", a.head);
    let seen = chain.app.take();
    assert_eq!(seen.requests.len(), 1, "{:?}", seen.requests);
    no_offer(&seen.requests[0]);
    case(
        &chain,
        "Upgrade: h2c, websocket",
        b"GET /ws HTTP/1.1\r\nHost: cart\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c, websocket\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        &Expect::Forwarded {
            paths: &["/ws"],
            close: false,
            check: |r| {
                assert_eq!(r.values("upgrade"), ["websocket"], "{r:?}");
                assert!(!r.has("http2-settings"), "{r:?}");
            },
        },
    )
    .await;
}

// ---- trailers ----

/// Trailers cross as HTTP/2 trailers on the mux and after the last chunk in HTTP/1. The
/// connection-specific fields never belong there (h2 refuses to send trailers holding
/// one, which left the stream open), nor do the mesh's own: dropped on every transport,
/// both ways; the rest cross.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_cross_without_connection_fields_or_the_meshs_own_on_every_transport() {
    let chain = Chain::start().await;
    case(
        &chain,
        "request trailers",
        b"POST /trailers HTTP/1.1\r\nHost: cart\r\nTrailer: x-t, connection, keep-alive, proxy-connection, transfer-encoding, te, upgrade, weft-orig-proto, x-forwarded-client-cert, content-length, host\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\ncontent-length: 99\r\nhost: evil.example\r\nconnection: close\r\nkeep-alive: 1\r\nproxy-connection: x\r\ntransfer-encoding: gzip\r\nte: gzip\r\nupgrade: x\r\nweft-orig-proto: HTTP/1.0\r\nx-forwarded-client-cert: URI=spiffe://evil\r\n\r\n",
        &Expect::Forwarded {
            paths: &["/trailers"],
            close: false,
            check: |r| {
                assert_eq!(r.body, b"abc", "{r:?}");
                let trailers: Vec<_> = r
                    .headers
                    .iter()
                    .filter(|(n, _)| n.starts_with("trailer:"))
                    .collect();
                assert_eq!(
                    trailers,
                    [&("trailer:x-t".to_string(), "1".to_string())],
                    "{r:?}"
                );
            },
        },
    )
    .await;
    // The application's answer to `/trailers-back` ends with `x-r: 1`, `connection`,
    // `keep-alive` and `upgrade` trailers.
    for (transport, client) in &chain.clients {
        let mut s = connect(client.addr).await;
        s.write_all(b"GET /trailers-back HTTP/1.1\r\nHost: cart\r\nTE: trailers\r\n\r\n")
            .await
            .unwrap();
        let a = read_answer(&mut s)
            .await
            .unwrap_or_else(|| panic!("{transport}: closed"));
        assert_eq!(a.status(), 200, "{transport}: {}", a.head);
        assert_eq!(a.body, b"ok", "{transport}");
        assert_eq!(a.trailers, ["x-r: 1"], "{transport}");
        next_in_step(&mut s, transport).await;
    }
    chain.app.take();
}

/// An application's response naming a transfer coding besides one `chunked` would reach
/// the client re-framed with the coding's mention gone (a gzip body read as plain): the
/// server sidecar answers 502 `upstream_failed` instead, on every transport, and the
/// client's connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_whose_transfer_coding_would_be_lost_is_a_502_on_every_transport() {
    let chain = Chain::start().await;
    for (transport, client) in &chain.clients {
        let mut s = connect(client.addr).await;
        for path in [
            "/gzip-chunked",
            "/gzip-then-chunked",
            "/chunked-twice",
            "/gzip-to-close",
        ] {
            let what = format!("{transport} {path}");
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: cart\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let a = read_answer(&mut s)
                .await
                .unwrap_or_else(|| panic!("{what}: closed"));
            assert_eq!(a.status(), 502, "{what}: {}", a.head);
            assert_eq!(
                a.header("weft-error"),
                Some("upstream_failed"),
                "{what}: {}",
                a.head
            );
            assert!(
                !a.body.windows(4).any(|w| w == b"gzip"),
                "{what}: {:?}",
                a.body
            );
        }
        next_in_step(&mut s, transport).await;
    }
    chain.app.take();
}

// ---- the mesh's own fields, and Host ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_speak_for_the_mesh_on_any_transport() {
    let chain = Chain::start().await;
    // weft-orig-proto is the outbound proxy's to set, and never reaches an application.
    case(
        &chain,
        "weft-orig-proto: HTTP/1.0 on an HTTP/1.1 request",
        b"GET /orig HTTP/1.1\r\nHost: cart\r\nweft-orig-proto: HTTP/1.0\r\nWeft-Orig-Proto: HTTP/3\r\n\r\n",
        &Expect::Forwarded {
            paths: &["/orig"],
            close: false,
            check: |r| assert!(r.line.ends_with(" HTTP/1.1"), "{r:?}"),
        },
    )
    .await;
    case(
        &chain,
        "weft-orig-proto on an HTTP/1.0 request",
        b"GET /orig10 HTTP/1.0\r\nHost: cart\r\nweft-orig-proto: HTTP/1.1\r\n\r\n",
        &Expect::Forwarded {
            paths: &["/orig10"],
            close: true,
            check: |r| assert!(r.line.ends_with(" HTTP/1.0"), "{r:?}"),
        },
    )
    .await;
    // x-forwarded-client-cert is the server sidecar's to set: a client's is replaced by
    // the identity it verified, or removed in plain text (checked by `well_formed`).
    case(
        &chain,
        "a forged x-forwarded-client-cert",
        b"GET /xfcc HTTP/1.1\r\nHost: cart\r\nX-Forwarded-Client-Cert: URI=spiffe://cluster.local/ns/kube-system/sa/admin\r\nx-forwarded-client-cert: By=x\r\n\r\n",
        &Expect::Forwarded {
            paths: &["/xfcc"],
            close: false,
            check: no_check,
        },
    )
    .await;
    // Nor is a name that CGI-style servers (WSGI, Rack, PHP) read as the same variable,
    // `HTTP_X_FORWARDED_CLIENT_CERT`.
    case(
        &chain,
        "x-forwarded-client-cert with underscores",
        b"GET /xfcc-underscores HTTP/1.1\r\nHost: cart\r\nx_forwarded_client_cert: URI=spiffe://cluster.local/ns/kube-system/sa/admin\r\nX-Forwarded_Client-Cert: URI=b\r\nx_forwarded_client_certs: kept\r\n\r\n",
        &Expect::Forwarded {
            paths: &["/xfcc-underscores"],
            close: false,
            check: |r| {
                assert!(
                    !r.has("x_forwarded_client_cert") && !r.has("x-forwarded_client-cert"),
                    "{r:?}"
                );
                assert_eq!(r.values("x_forwarded_client_certs"), ["kept"], "{r:?}");
            },
        },
    )
    .await;
    // weft-error and weft-unsent mean something in responses only: a request's pass to
    // the application as they are, and change nothing about how the request is handled.
    case(
        &chain,
        "weft-error and weft-unsent in a request",
        b"POST /errors HTTP/1.1\r\nHost: cart\r\nweft-error: connect_failed\r\nweft-unsent: 1\r\nContent-Length: 2\r\n\r\nhi",
        &Expect::Forwarded {
            paths: &["/errors"],
            close: false,
            check: |r| {
                assert_eq!(r.values("weft-error"), ["connect_failed"], "{r:?}");
                assert_eq!(r.body, b"hi");
            },
        },
    )
    .await;
    // An absolute-form target's authority wins over Host (RFC 9112 §3.2.2).
    case(
        &chain,
        "Host differs from the absolute-form target",
        b"GET http://cart.shop:8080/abs?q=1 HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        &Expect::Forwarded {
            paths: &["/abs?q=1"],
            close: false,
            check: |r| assert_eq!(r.values("host"), ["cart.shop:8080"], "{r:?}"),
        },
    )
    .await;
    for (what, bytes) in [
        (
            "two Host lines",
            &b"GET /x HTTP/1.1\r\nHost: cart\r\nHost: evil.example\r\n\r\n"[..],
        ),
        (
            "two equal Host lines",
            b"GET /x HTTP/1.1\r\nHost: cart\r\nhost: cart\r\n\r\n",
        ),
        ("no Host on HTTP/1.1", b"GET /x HTTP/1.1\r\n\r\n"),
        (
            "an empty Host on HTTP/1.1",
            b"GET /x HTTP/1.1\r\nHost:\r\n\r\n",
        ),
        (
            "an empty Host on HTTP/1.1, with spaces",
            b"GET /x HTTP/1.1\r\nHost:   \r\n\r\n",
        ),
        (
            "a Host with userinfo",
            b"GET /x HTTP/1.1\r\nHost: cart@evil.example\r\n\r\n",
        ),
        (
            "an absolute-form target with userinfo",
            b"GET http://user@cart/x HTTP/1.1\r\nHost: cart\r\n\r\n",
        ),
        (
            "an absolute-form target and no Host",
            b"GET http://cart/x HTTP/1.1\r\n\r\n",
        ),
        (
            "a refused request with another pipelined behind it",
            b"GET /x HTTP/1.1\r\nHost: cart\r\nHost: evil.example\r\n\r\nGET /second HTTP/1.1\r\nHost: cart\r\n\r\n",
        ),
    ] {
        case(&chain, what, bytes, &Expect::Refused(400)).await;
    }
}

// ---- sizes ----

/// A request with `n` fields besides Host, `each` bytes of value apiece.
fn many_fields(n: usize, each: usize) -> Vec<u8> {
    let mut r = b"GET /fields HTTP/1.1\r\nHost: cart\r\n".to_vec();
    for i in 0..n {
        r.extend_from_slice(format!("x-f{i:03}: {}\r\n", "v".repeat(each)).as_bytes());
    }
    r.extend_from_slice(b"\r\n");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_heads_are_answered_431_and_the_sidecars_keep_serving() {
    let chain = Chain::start().await;
    let limits = Limits::default();
    for (what, bytes) in [
        (
            "a header block over the total limit",
            many_fields(8, 9 * 1024),
        ),
        (
            "one field over the line limit",
            many_fields(1, limits.max_header_line_bytes + 1),
        ),
        (
            "more fields than the count limit",
            many_fields(limits.max_request_headers_count, 8),
        ),
        (
            "a head past the parser's hard stop",
            many_fields(40, 9 * 1024),
        ),
    ] {
        case(&chain, what, &bytes, &Expect::Refused(431)).await;
        still_serving(&chain).await;
    }
    // A request within every limit is the far side's to take as well: what the proxies
    // add on the way (the identity, the version marker) never pushes it over one.
    let host = "host".len() + "cart".len();
    let at_count = many_fields(limits.max_request_headers_count - 1, 8);
    let name = "x-f000".len();
    let each = (limits.max_request_headers_bytes - host) / 50 - name;
    let at_bytes = many_fields(50, each);
    for (what, bytes) in [
        ("exactly as many fields as the limit", at_count),
        ("exactly the header bytes limit, nearly", at_bytes),
    ] {
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        case(
            &chain,
            what,
            bytes,
            &Expect::Forwarded {
                paths: &["/fields"],
                close: false,
                check: no_check,
            },
        )
        .await;
    }
}

/// A request with `n` fields besides Host, 8 bytes of value apiece, then the lines
/// `extra` (each with its CRLF).
fn fields_and(n: usize, extra: &str) -> Vec<u8> {
    let mut r = many_fields(n, 8);
    r.truncate(r.len() - 2);
    r.extend_from_slice(extra.as_bytes());
    r.extend_from_slice(b"\r\n");
    r
}

/// A request with Host and fields of 1 KiB and less whose names and values add up to
/// exactly `total` bytes (with Host's), then the lines `extra`, which are not counted.
fn of_bytes(total: usize, extra: &str) -> Vec<u8> {
    let mut r = b"GET /fields HTTP/1.1\r\nHost: cart\r\n".to_vec();
    let mut left = total - "host".len() - "cart".len();
    let mut i = 0;
    while left > 0 {
        // Whole KiB fields, and the last one holds the rest (at least its name's bytes).
        let take = if left >= 1024 + "x-f000".len() {
            1024
        } else {
            left
        };
        let value = take - "x-f000".len();
        r.extend_from_slice(format!("x-f{i:03}: {}\r\n", "v".repeat(value)).as_bytes());
        left -= "x-f000".len() + value;
        i += 1;
    }
    r.extend_from_slice(extra.as_bytes());
    r.extend_from_slice(b"\r\n");
    r
}

fn carries_traceparent(r: &AppRequest) {
    assert_eq!(r.values("traceparent").len(), 1, "{r:?}");
}

fn carries_b3_multi(r: &AppRequest) {
    carries_traceparent(r);
    for name in ["x-b3-traceid", "x-b3-spanid", "x-b3-sampled"] {
        assert_eq!(r.values(name).len(), 1, "{name}: {r:?}");
    }
}

fn carries_a_lengthened_b3(r: &AppRequest) {
    carries_traceparent(r);
    // 128-bit trace, span, decision and the caller's span as parent: 17 bytes more.
    let b3 = r.values("b3");
    assert_eq!(b3.len(), 1, "{r:?}");
    assert_eq!(b3[0].len(), 32 + 1 + 16 + 1 + 1 + 1 + 16, "{r:?}");
}

/// With tracing on, the client's sidecar writes `traceparent` into each request, and B3 in
/// the forms that came in, before its checks: it checks the request as it forwards it. So
/// the server's sidecar, which checks what it receives, never refuses what the client's
/// accepted: a request the trace context takes over a limit is answered 431 by the
/// client's sidecar, on every transport (before, the server's sidecar refused it: on the
/// mux from its count, in sessions and plain text from hyper's parser stopping at 100
/// fields, with a bare 431), and one it takes exactly to the limit is forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_request_is_checked_as_the_client_sidecar_forwards_it_on_every_transport() {
    let limits = Limits::default();
    let chain = Chain::start().await;
    traced(&chain._server.proxy);
    for (_, client) in &chain.clients {
        traced(&client.proxy);
    }
    let count = limits.max_request_headers_count;
    let bytes = limits.max_request_headers_bytes;
    let traceparent = "traceparent".len() + 55;
    // B3's sampled-only form gains the two ids beside it, and `traceparent`.
    let b3_multi = "x-b3-sampled: 1\r\n";
    // A `b3` the sidecar lengthens with the caller's span as the parent, and `traceparent`.
    let b3 = format!("b3: {}-{}-1\r\n", "a".repeat(32), "b".repeat(16));
    let b3_bytes = "b3".len() + 32 + 1 + 16 + 1 + 1;
    // Sent this many bytes, each request is forwarded with exactly the limit.
    let tp_at = bytes - traceparent;
    let b3_at = bytes - traceparent - 17 - b3_bytes;
    let forwarded = [
        (
            "a field short of the count: traceparent makes it the limit",
            fields_and(count - 2, ""),
            carries_traceparent as fn(&AppRequest),
        ),
        (
            "x-b3-sampled, with the three fields it gains the limit",
            fields_and(count - 5, b3_multi),
            carries_b3_multi,
        ),
        (
            "the header bytes the trace context takes to the limit",
            of_bytes(tp_at, ""),
            carries_traceparent,
        ),
        (
            "a b3 lengthened to the header bytes limit",
            of_bytes(b3_at, &b3),
            carries_a_lengthened_b3,
        ),
    ];
    for (what, request, check) in forwarded {
        let request: &'static [u8] = Box::leak(request.into_boxed_slice());
        let paths: &'static [&'static str] = &["/fields"];
        let expect = Expect::Forwarded {
            paths,
            close: false,
            check,
        };
        case(&chain, what, request, &expect).await;
    }
    let refused = [
        ("exactly the count limit", fields_and(count - 1, "")),
        (
            "x-b3-sampled, with the three fields it gains one over",
            fields_and(count - 4, b3_multi),
        ),
        ("a byte over, with traceparent", of_bytes(tp_at + 1, "")),
        (
            "a byte over, with a lengthened b3",
            of_bytes(b3_at + 1, &b3),
        ),
    ];
    for (what, request) in refused {
        case(&chain, what, &request, &Expect::Refused(431)).await;
        still_serving(&chain).await;
    }
    let far = chain._server.proxy.metrics.encode().unwrap();
    let refused_far: Vec<&str> = far
        .lines()
        .filter(|l| l.starts_with("weft_limit_refusals_total{") && !l.ends_with(" 0"))
        .collect();
    assert!(
        refused_far.is_empty(),
        "the server's sidecar refused what the client's accepted: {refused_far:?}"
    );
}

fn carries_the_routes_field(r: &AppRequest) {
    assert_eq!(r.values("x-added"), ["route"], "{r:?}");
}

/// `GET <path>` with Host alone.
fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: cart\r\n\r\n").into_bytes()
}

/// A Route's header edits and path rewrite come after the client sidecar's checks of what
/// it received, so it checks the request again as the rule made it: one the rule takes
/// exactly to a limit reaches the application, one it takes over is answered 431 (414 for
/// the target) by the client's sidecar, on every transport, and the connection, whose
/// framing was never in doubt, stays in step. The server's sidecar refuses nothing (before,
/// it refused them all: the client's sidecar forwarded what its rule had enlarged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_edits_are_checked_as_the_client_sidecar_forwards_them_on_every_transport() {
    let limits = Limits::default();
    // 1,000 bytes in place of `/long`'s 5.
    let replacement = format!("/{}", "x".repeat(999));
    let grows = replacement.len() - "/long".len();
    let chain = Chain::routed(serde_json::json!([
        {
            "matches": [{"path": {"prefix": "/long"}}],
            "rewrite": {"replacePrefixMatch": replacement},
        },
        {"requestHeaders": {"add": [{"name": "x-added", "value": "route"}]}},
    ]))
    .await;
    let count = limits.max_request_headers_count;
    let added = "x-added".len() + "route".len();
    let at_bytes = limits.max_request_headers_bytes - added;
    let target = limits.max_request_target_bytes;
    // `/long/ppp…`, rewritten `/xxx…/ppp…`, `target - grows + over` bytes sent.
    let long = |over: usize| format!("/long/{}", "p".repeat(target - grows + over - 6));
    let rewritten: &'static str = Box::leak(
        format!(
            "{replacement}/{}",
            "p".repeat(target - replacement.len() - 1)
        )
        .into_boxed_str(),
    );
    assert_eq!(rewritten.len(), target);
    let forwarded = [
        (
            "a field short of the count: the rule's field makes it the limit",
            fields_and(count - 2, ""),
            &["/fields"] as &'static [&'static str],
        ),
        (
            "the header bytes the rule's field takes to the limit",
            of_bytes(at_bytes, ""),
            &["/fields"],
        ),
        (
            "a target the rewrite takes to the limit",
            get(&long(0)),
            Box::leak(Box::new([rewritten])),
        ),
    ];
    for (what, request, paths) in forwarded {
        let request: &'static [u8] = Box::leak(request.into_boxed_slice());
        let check = if paths[0] == "/fields" {
            carries_the_routes_field as fn(&AppRequest)
        } else {
            no_check
        };
        let expect = Expect::Forwarded {
            paths,
            close: false,
            check,
        };
        case(&chain, what, request, &expect).await;
    }
    let refused = [
        (
            "exactly the count limit, and the rule's field",
            fields_and(count - 1, ""),
            431,
        ),
        (
            "a byte over, with the rule's field",
            of_bytes(at_bytes + 1, ""),
            431,
        ),
        ("a target the rewrite takes a byte over", get(&long(1)), 414),
    ];
    for (what, request, status) in refused {
        case(&chain, what, &request, &Expect::RefusedInStep(status)).await;
    }
    let far = chain._server.proxy.metrics.encode().unwrap();
    let refused_far: Vec<&str> = far
        .lines()
        .filter(|l| l.starts_with("weft_limit_refusals_total{") && !l.ends_with(" 0"))
        .collect();
    assert!(
        refused_far.is_empty(),
        "the server's sidecar refused what the client's accepted: {refused_far:?}"
    );
    for (transport, client) in &chain.clients {
        let near = client.proxy.metrics.encode().unwrap();
        for limit in [
            "request_headers_count",
            "request_headers_bytes",
            "request_target_bytes",
        ] {
            let line = format!("weft_limit_refusals_total{{limit=\"{limit}\"}} 1");
            assert!(near.lines().any(|l| l == line), "{transport}: no {line}");
        }
    }
}

// ---- generated requests ----

/// Panics on the runtime's worker threads, where the proxies' tasks run: tokio catches
/// them and drops the task, so a test would not see one otherwise.
static WORKER_PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Fails when a task of the runtime's workers panicked ([`count_worker_panics`]).
fn assert_no_worker_panicked() {
    assert_eq!(
        WORKER_PANICS.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "a task panicked (see the output above)"
    );
}

/// A generated test's seed (`WEFT_FUZZ_SEED`, default 1) and number of cases
/// (`WEFT_FUZZ_CASES`, default `cases`).
fn fuzz_run(cases: usize) -> (u64, usize) {
    let var = |name: &str| std::env::var(name).ok().and_then(|s| s.parse().ok());
    (
        var("WEFT_FUZZ_SEED").unwrap_or(1),
        var("WEFT_FUZZ_CASES").map_or(cases, |n| n as usize),
    )
}

/// One generated test's run: its seed, the cases it may run, and when it started.
struct Fuzz {
    seed: u64,
    cases: usize,
    ran: usize,
    started: std::time::Instant,
}

impl Fuzz {
    /// Starts counting worker panics and reads the run's seed and count ([`fuzz_run`],
    /// `default` cases); the generator seeded with it.
    fn start(default: usize) -> (Fuzz, rand::rngs::StdRng) {
        use rand::SeedableRng as _;
        count_worker_panics();
        let (seed, cases) = fuzz_run(default);
        let fuzz = Fuzz {
            seed,
            cases,
            ran: 0,
            started: std::time::Instant::now(),
        };
        (fuzz, rand::rngs::StdRng::seed_from_u64(seed))
    }

    /// The next case's number, or `None` once every case ran or 60 s passed.
    fn next_case(&mut self) -> Option<usize> {
        if self.ran == self.cases || self.started.elapsed() > Duration::from_secs(60) {
            return None;
        }
        self.ran += 1;
        Some(self.ran - 1)
    }

    /// Says what the run did, and fails it if a task of any proxy panicked.
    fn finish(&self, what: &str) {
        eprintln!(
            "seed {}: {} cases in {:?}: {what}",
            self.seed,
            self.ran,
            self.started.elapsed()
        );
        assert_no_worker_panicked();
    }
}

/// Through each client sidecar, and straight at the server's in plain text (a client
/// outside the mesh): each way's name and address.
fn every_way(chain: &Chain) -> Vec<(&'static str, SocketAddr)> {
    let mut ways: Vec<_> = chain.clients.iter().map(|(t, c)| (*t, c.addr)).collect();
    ways.push(("direct", chain._server.addr));
    ways
}

fn count_worker_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let worker = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("tokio-runtime-worker"));
            if worker {
                WORKER_PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            previous(info);
        }));
    });
}

/// One request, mostly well formed with a few odd parts: a request line, header fields
/// and a body drawn from lists of what clients, attackers and broken libraries send, so
/// that framing, fields and body often disagree. With the most messages a server could read
/// in the bytes: the body may be read as a next request, and a second one may follow.
/// Each request carries `X-Case: @@`, for the sender to fill in ([`MARK`]).
fn odd_request(rng: &mut impl rand::Rng) -> (Vec<u8>, usize) {
    // `usual` most of the time (`in_ten` in ten), else any of `odd`.
    fn part(rng: &mut dyn rand::RngCore, in_ten: u32, usual: &[&str], odd: &[&str]) -> String {
        let list = if rand::Rng::random_range(rng, 0..10) < in_ten {
            usual
        } else {
            odd
        };
        list[rand::Rng::random_range(rng, 0..list.len())].to_owned()
    }
    let long = "a".repeat(9 * 1024);
    let method = part(
        rng,
        8,
        &["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"],
        &["get", "G ET", "PRI", "", "X-CUSTOM", "GET\t"],
    );
    let target = part(
        rng,
        7,
        &["/", "/a?b=c", "/api/x", "/a%20b"],
        &[
            "*",
            "http://cart/x",
            "http://other:81/y",
            "https://cart/z",
            "cart:80",
            "/%00",
            "/a b",
            "//x",
            "/../x",
            "/a/%2e%2e/b",
            "/\u{1}",
            "",
            "/é",
            "/a#frag",
            "?q",
        ],
    );
    let version = part(
        rng,
        9,
        &["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"],
        &[
            "HTTP/2.0",
            "HTTP/1.2",
            "http/1.1",
            "HTTP/1.1 x",
            "",
            "HTTP/1.10",
            "HTTP/0.9",
        ],
    );
    let host = part(
        rng,
        8,
        &["Host: cart"],
        &[
            "",
            "Host: other",
            "Host:",
            "Host: a b",
            "Host: cart\r\nHost: cart",
            "Host: cart:99999",
            "host: CART",
        ],
    );
    let fields = [
        "Content-Length: 5",
        "Content-Length: 0",
        "Content-Length: +5",
        "Content-Length: 5, 5",
        "Content-Length: 5, 6",
        "Content-Length: -1",
        "Content-Length: 99999999999999999999",
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: gzip, chunked",
        "Transfer-Encoding: chunked, gzip",
        "Transfer-Encoding: identity",
        "Transfer-Encoding : chunked",
        "Transfer-Encoding:\tchunked",
        " X-Folded: a",
        "X-Null: a\0b",
        "X-Empty:",
        ": no-name",
        "No-Colon",
        "Expect: 100-continue",
        "Expect: nonsense",
        "Connection: close",
        "Connection: keep-alive, x-drop",
        "X-Drop: 1",
        "Connection: upgrade",
        "Upgrade: websocket",
        "Upgrade: h2c",
        "HTTP2-Settings: AAMAAABkAAQAAP__",
        "weft-orig-proto: HTTP/1.0",
        "weft-orig-proto: HTTP/9",
        "x-forwarded-client-cert: URI=spiffe://evil/ns/x/sa/y",
        "TE: trailers",
        "TE: gzip",
        "Trailer: x-t",
        "Content-Type: application/grpc",
        "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "traceparent: garbage",
        "b3: 1",
        "weft-error: forbidden",
        "weft-unsent: 1",
        "Keep-Alive: timeout=5",
        "Proxy-Connection: keep-alive",
        "X-Utf8: é",
        "X-Obs: \u{80}\u{ff}",
    ];
    let eol = if rng.random_range(0..20) == 0 {
        "\n"
    } else {
        "\r\n"
    };
    let target = if rng.random_range(0..30) == 0 {
        format!("/{long}")
    } else {
        target
    };
    let mut r = format!("{method} {target} {version}{eol}X-Case: {MARK}{eol}");
    if !host.is_empty() {
        r.push_str(&host);
        r.push_str(eol);
    }
    let mut chosen = Vec::new();
    for _ in 0..rng.random_range(0..5) {
        let f = fields[rng.random_range(0..fields.len())];
        chosen.push(f);
        r.push_str(f);
        r.push_str(eol);
    }
    if rng.random_range(0..20) == 0 {
        r.push_str(&format!("X-Long: {long}{long}{eol}"));
    }
    r.push_str(eol);
    let chunked = chosen.contains(&"Transfer-Encoding: chunked");
    let length = chosen.contains(&"Content-Length: 5");
    let body = match (rng.random_range(0..10), chunked, length) {
        (0..6, true, _) => "5\r\nhello\r\n0\r\n\r\n".to_owned(),
        (0..6, false, true) => "hello".to_owned(),
        (0..6, false, false) => String::new(),
        _ => part(
            rng,
            0,
            &[],
            &[
                "",
                "hello",
                "5\r\nhello\r\n0\r\n\r\n",
                "5;ext=1\r\nhello\r\n0\r\n\r\n",
                "5\r\nhello\r\n0\r\nx-t: 1\r\nconnection: close\r\n\r\n",
                "zz\r\nhello\r\n0\r\n\r\n",
                "5\r\nhel",
                "0\r\n\r\n",
                "5\nhello\n0\n\n",
                "5\r\nhelloXX0\r\n\r\n",
                "ffffffffffffffffff\r\n",
                "GET /smuggled HTTP/1.1\r\nHost: cart\r\nX-Case: @@\r\n\r\n",
                "0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: cart\r\nX-Case: @@\r\n\r\n",
            ],
        ),
    };
    r.push_str(&body);
    let mut messages = 1 + usize::from(!body.is_empty()) + usize::from(body.contains("/smuggled"));
    if rng.random_range(0..3) == 0 {
        r.push_str("GET /second HTTP/1.1\r\nHost: cart\r\nX-Case: @@\r\n\r\n");
        messages += 1;
    }
    (r.into_bytes(), messages)
}

/// The bytes the proxy's protocol detection decides on.
fn detected(bytes: &[u8]) -> &[u8] {
    &bytes[..bytes.len().min(MAX_DETECT_BYTES)]
}

/// Where a generated request says which case and transport sent it, so that a request
/// reaching the application late is still judged by its own transport.
const MARK: &str = "@@";

/// The responses in what a client read, in order: each must be a whole HTTP/1.1 response
/// (a head, and the body its framing says, none when another head follows at once), but
/// the last may be cut short by a reset.
/// `None` when the bytes are not responses at all.
fn responses(mut back: &[u8]) -> Option<Vec<u16>> {
    let mut statuses = Vec::new();
    while !back.is_empty() {
        let Some(end) = find(back, b"\r\n\r\n") else {
            return back.starts_with(b"HTTP/1.1 ").then_some(statuses);
        };
        let head = String::from_utf8_lossy(&back[..end]).to_lowercase();
        if !head.starts_with("http/1.1 ") && !head.starts_with("http/1.0 ") {
            return None;
        }
        statuses.push(head.get(9..12)?.parse().ok()?);
        back = &back[end + 4..];
        // An answer to `HEAD` has no body, whatever its framing says.
        if back.starts_with(b"HTTP/1.") {
            continue;
        }
        let length = head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            (n.trim() == "content-length").then(|| v.trim().parse::<usize>().ok())?
        });
        if let Some(n) = length {
            back = &back[n.min(back.len())..];
        } else if head.contains("transfer-encoding: chunked") {
            let Some(last) = find(back, b"0\r\n\r\n") else {
                return Some(statuses);
            };
            back = &back[last + 5..];
        }
    }
    Some(statuses)
}

/// Requests drawn at random from odd parts ([`odd_request`]), each sent on a new
/// connection through every transport and straight at the server's sidecar in plain
/// text, then the client's side closed: no proxy panics or
/// leaves the connection hanging, what the client reads back is whole responses and no
/// more than one per request it sent, what reaches the application is well framed with one
/// `Host` and none of the mesh's fields but the identity the server sidecar verified, and
/// every sidecar keeps serving. Seeded (`WEFT_FUZZ_SEED`, default 1), `WEFT_FUZZ_CASES`
/// requests (default 1,000), stopped after 60 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_odd_requests_never_panic_hang_or_reach_the_application_malformed() {
    send_odd_requests(&Chain::start().await).await;
}

/// The same through client sidecars whose Route rewrites, edits headers, and keeps
/// bodies to retry them: the routed stages see the same odd requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_odd_requests_through_a_route_never_panic_hang_or_reach_the_application_malformed()
 {
    let retries = serde_json::json!({
        "attempts": 2,
        "retryOn": ["5xx", "reset", "connect-failure"],
        "backoff": {"base": "1ms", "max": "1ms"},
        "budget": {"percent": 100, "minRetriesPerSecond": 1000},
    });
    let chain = Chain::routed(serde_json::json!([
        {
            "matches": [{"path": {"prefix": "/api"}}],
            "rewrite": {"replacePrefixMatch": "/v2"},
            "requestHeaders": {"add": [{"name": "x-added", "value": "route"}], "remove": ["x-drop"]},
            "retries": retries,
        },
        {"retries": retries, "timeout": "3s"},
    ]))
    .await;
    send_odd_requests(&chain).await;
}

/// Sends the generated requests through `chain` (see the first test above).
async fn send_odd_requests(chain: &Chain) {
    let (mut fuzz, mut rng) = Fuzz::start(1000);
    let seed = fuzz.seed;
    // What each case sent, by mark: its bytes, the most messages in them, and whether they
    // go as opaque TCP (then they reach the application as sent: no framing to judge).
    let mut sent = std::collections::HashMap::<String, (Vec<u8>, usize, bool)>::new();
    let mut reached = std::collections::HashMap::<String, usize>::new();
    let mut opaque_cases = 0usize;
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    // Judges what reached the application since the last look, each request by the
    // transport its mark names (it may come after its client was done).
    let mut judge =
        |seen: Record, sent: &std::collections::HashMap<String, (Vec<u8>, usize, bool)>| {
            for m in &seen.malformed {
                // Opaque bytes the application could not frame: what it got is part of them.
                let got = m
                    .split_once(" in \"")
                    .map_or("", |(_, g)| g.strip_suffix('"').unwrap_or(g));
                let opaque = sent.values().any(|(bytes, _, opaque)| {
                    *opaque && format!("{:?}", String::from_utf8_lossy(bytes)).contains(got)
                });
                assert!(opaque, "seed {seed}: {m}");
            }
            for r in &seen.requests {
                if r.path() == "/next" {
                    continue;
                }
                let mark = r.values("x-case");
                let [mark] = mark.as_slice() else {
                    panic!("seed {seed}: a request without one mark: {r:?}");
                };
                let (bytes, most, opaque) = &sent[*mark];
                if *opaque {
                    continue;
                }
                let ctx = format!("seed {seed}, {mark}: {:?}", String::from_utf8_lossy(bytes));
                let transport = mark.rsplit('-').next().unwrap_or_default();
                well_formed(transport, &ctx, r);
                let n = reached.entry((*mark).to_owned()).or_default();
                *n += 1;
                assert!(*n <= *most, "{ctx}: the application framed {n} requests");
            }
        };
    while let Some(case) = fuzz.next_case() {
        let (template, most) = odd_request(&mut rng);
        if std::env::var_os("WEFT_FUZZ_SHOW").is_some() {
            eprintln!("case {case}: {:?}", String::from_utf8_lossy(&template));
        }
        // Bytes that cannot be HTTP are carried as opaque TCP, unchanged and unchecked.
        if classify(detected(&template)) == Some(Protocol::Opaque) {
            opaque_cases += 1;
        }
        // Every transport, straight at the server's sidecar in plain text, and in a
        // `weft-http1` session of a peer proxy's own (the client's certificate; no client
        // sidecar judged the bytes, and no detection runs: ALPN says HTTP/1).
        let mut targets = every_way(chain);
        targets.push(("peer", chain._server.addr));
        for (transport, addr) in targets {
            let mark = format!("{case}-{transport}");
            let mut bytes = Vec::new();
            let mut rest = &template[..];
            while let Some(at) = find(rest, MARK.as_bytes()) {
                bytes.extend_from_slice(&rest[..at]);
                bytes.extend_from_slice(mark.as_bytes());
                rest = &rest[at + MARK.len()..];
            }
            bytes.extend_from_slice(rest);
            let ctx = format!("seed {seed}, {mark}: {:?}", String::from_utf8_lossy(&bytes));
            let opaque =
                transport != "peer" && classify(detected(&bytes)) == Some(Protocol::Opaque);
            sent.insert(mark, (bytes.clone(), most, opaque));
            let s = connect(addr).await;
            let back = if transport == "peer" {
                let tls = chain
                    .peer
                    .handshake(s, addr, Inner::Http1, WAIT)
                    .await
                    .unwrap_or_else(|e| panic!("{ctx}: weft-http1 session: {e}"));
                send_and_read_to_close(tls, &bytes).await
            } else {
                send_and_read_to_close(s, &bytes).await
            };
            let back = back.unwrap_or_else(|| panic!("{ctx}: neither answered and closed in 5 s"));
            let got = responses(&back).unwrap_or_else(|| {
                panic!("{ctx}: not responses: {:?}", String::from_utf8_lossy(&back))
            });
            // Interim answers (`100 Continue`) aside.
            let finals = got.iter().filter(|s| **s >= 200).count();
            assert!(finals <= most, "{ctx}: {got:?} for at most {most} requests");
            for status in &got {
                *statuses.entry(*status).or_default() += 1;
            }
        }
        judge(chain.app.take(), &sent);
        if case % 25 == 24 {
            still_serving(chain).await;
        }
    }
    still_serving(chain).await;
    // Requests cancelled by their client's close may still reach the application.
    tokio::time::sleep(Duration::from_millis(200)).await;
    judge(chain.app.take(), &sent);
    let forwarded: usize = reached.values().sum();
    fuzz.finish(&format!(
        "requests × {} ways; {opaque_cases} carried as opaque TCP; {forwarded} reached the application; answers by status {statuses:?}",
        chain.clients.len() + 2,
    ));
}

/// Writes `bytes` on `s`, shuts its sending side, and reads until the peer closes:
/// what came back, or `None` if the peer neither closed nor failed within 5 s.
async fn send_and_read_to_close<S>(mut s: S, bytes: &[u8]) -> Option<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut back = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        let mut chunk = [0u8; 8192];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => back.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    read.ok().map(|()| back)
}

/// One response, mostly well formed with a few odd parts, as broken or hostile
/// applications write them; and whether the application closes after it (always when
/// nothing else says where its body ends). No body is `ok`, the body of the application's
/// ordinary answer: a piece of one of these taken as the answer to a later request shows.
fn odd_response(rng: &mut impl rand::Rng) -> (Vec<u8>, bool) {
    fn one<'a>(rng: &mut dyn rand::RngCore, list: &[&'a str]) -> &'a str {
        list[rand::Rng::random_range(rng, 0..list.len())]
    }
    let status = if rng.random_range(0..10) < 7 {
        one(
            rng,
            &[
                "HTTP/1.1 200 OK",
                "HTTP/1.1 404 Not Found",
                "HTTP/1.1 503 Busy",
                "HTTP/1.0 200 OK",
            ],
        )
    } else {
        one(
            rng,
            &[
                "HTTP/1.1 200",
                "HTTP/1.1 999 Odd",
                "HTTP/1.1 099 Low",
                "HTTP/1.1 204 No Content",
                "HTTP/1.1 304 Not Modified",
                "HTTP/1.1 101 Switching Protocols",
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK",
                "HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK",
                "HTTP/2 200",
                "HTTP/1.1 2000 OK",
                "garbage",
                "HTTP/1.1",
            ],
        )
    };
    let fields = [
        "content-length: 3",
        "content-length: 3",
        "content-length: 0",
        "content-length: 3, 3",
        "content-length: 3, 4",
        "content-length: +3",
        "content-length: 99999999999999999999",
        "transfer-encoding: chunked",
        "transfer-encoding: chunked",
        "transfer-encoding: gzip, chunked",
        "transfer-encoding: gzip",
        "transfer-encoding: chunked, chunked",
        "transfer-encoding : chunked",
        "connection: close",
        "connection: keep-alive, x-drop",
        "x-drop: 1",
        "keep-alive: timeout=1",
        "upgrade: websocket",
        "trailer: x-t, connection",
        "te: trailers",
        "weft-error: forbidden",
        "weft-unsent: 1",
        "x-forwarded-client-cert: URI=spiffe://evil/ns/x/sa/y",
        " x-folded: a",
        "x-null: a\0b",
        ": no-name",
        "no-colon",
        "set-cookie: a=1",
        "set-cookie: b=2",
        "x-utf8: é",
        "content-type: application/grpc",
        "grpc-status: 0",
    ];
    let mut r = format!("{status}\r\n");
    let mut chosen = Vec::new();
    for _ in 0..rng.random_range(0..5) {
        let f = one(rng, &fields);
        chosen.push(f);
        r.push_str(f);
        r.push_str("\r\n");
    }
    if rng.random_range(0..30) == 0 {
        r.push_str(&format!("x-long: {}\r\n", "a".repeat(6 * 1024)));
    }
    r.push_str("\r\n");
    let chunked = chosen.contains(&"transfer-encoding: chunked");
    let length = chosen.contains(&"content-length: 3");
    let body = match (rng.random_range(0..10), chunked, length) {
        (0..6, true, _) => "3\r\nodd\r\n0\r\n\r\n",
        (0..6, false, true) => "odd",
        (0..6, false, false) => "",
        _ => one(
            rng,
            &[
                "",
                "odd",
                "oddextra",
                "od",
                "3\r\nodd\r\n0\r\n\r\n",
                "3;x=1\r\nodd\r\n0\r\nx-t: 1\r\nconnection: close\r\n\r\n",
                "3\r\nodd\r\n0\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                "zz\r\nodd\r\n0\r\n\r\n",
                "3\r\nod",
                "ffffffffffffffffffff\r\n",
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            ],
        ),
    };
    r.push_str(body);
    // Nothing else says where the body ends: the close does (RFC 9112 §6.3). A body short
    // of what its framing says ends with the close too: an application that kept it open
    // would be a slow one, which the client waits for.
    let unframed = !chunked && !chosen.iter().any(|f| f.starts_with("content-length"));
    let short = ["od", "3\r\nod", "ffffffffffffffffffff\r\n"].contains(&body)
        || body.is_empty()
            && (chunked
                || chosen
                    .iter()
                    .any(|f| f.starts_with("content-length: 3") || f.ends_with("+3")))
        || chosen
            .iter()
            .any(|f| f.contains("99999") || f.contains("3, 4"));
    let close = unframed || short || rng.random_range(0..4) == 0;
    (r.into_bytes(), close)
}

/// A response as a client read it, which may be cut short by the proxy's close.
struct Read {
    status: u16,
    head: String,
    body: Vec<u8>,
    /// The connection closed before the body's framing said it ended.
    cut: bool,
}

impl Read {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            (n.trim() == name).then(|| v.trim())
        })
    }
}

/// Where the response at the start of `buf` ends: `Err` with a message when it is not a
/// response, `Ok(None)` when more bytes are needed, or its head, body and length. A body
/// without a length or chunks runs to the close (`Ok(None)` until then).
fn whole_response(buf: &[u8]) -> Result<Option<(String, Vec<u8>, usize)>, String> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
    if !head.starts_with("http/1.1 ") && !head.starts_with("http/1.0 ") {
        return Err(format!("not a response: {head:?}"));
    }
    let status: u16 = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status: {head:?}"))?;
    let at = end + 4;
    let field = |name: &str| -> Option<String> {
        head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            (n.trim() == name).then(|| v.trim().to_owned())
        })
    };
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Some((head, Vec::new(), at)));
    }
    if let Some(len) = field("content-length") {
        let len: usize = len.parse().map_err(|_| format!("content-length {len:?}"))?;
        if buf.len() < at + len {
            return Ok(None);
        }
        return Ok(Some((head, buf[at..at + len].to_vec(), at + len)));
    }
    if field("transfer-encoding").as_deref() == Some("chunked") {
        let mut i = at;
        let mut body = Vec::new();
        loop {
            let Some(eol) = find(&buf[i..], b"\r\n") else {
                return Ok(None);
            };
            let size_line = String::from_utf8_lossy(&buf[i..i + eol]).into_owned();
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or(""), 16)
                .map_err(|_| format!("chunk size {size_line:?}"))?;
            i += eol + 2;
            if size == 0 {
                // Trailer fields to the empty line.
                loop {
                    let Some(eol) = find(&buf[i..], b"\r\n") else {
                        return Ok(None);
                    };
                    i += eol + 2;
                    if eol == 0 {
                        return Ok(Some((head, body, i)));
                    }
                }
            }
            if buf.len() < i + size + 2 {
                return Ok(None);
            }
            body.extend_from_slice(&buf[i..i + size]);
            i += size + 2;
        }
    }
    Ok(None)
}

/// Reads the final answer on `s`, past interim `1xx` ones: `None` if the proxy closed
/// before a head. What the proxy sends must be HTTP/1.1 responses, each whole unless the
/// connection closes within it; a proxy that neither answers nor closes within 5 s fails.
async fn read_final(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Read> {
    loop {
        match whole_response(buf) {
            Err(e) => panic!("{e}"),
            Ok(Some((head, body, used))) => {
                buf.drain(..used);
                let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
                if (100..200).contains(&status) && status != 101 {
                    continue;
                }
                return Some(Read {
                    status,
                    head,
                    body,
                    cut: false,
                });
            }
            Ok(None) => {}
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(WAIT, s.read(&mut chunk))
            .await
            .expect("an answer or a close within 5 s, not a hanging connection")
            .unwrap_or(0);
        if n == 0 {
            if buf.is_empty() {
                return None;
            }
            let end = find(buf, b"\r\n\r\n");
            let head = String::from_utf8_lossy(&buf[..end.unwrap_or(buf.len())]).to_lowercase();
            let body = end.map(|e| buf[e + 4..].to_vec()).unwrap_or_default();
            buf.clear();
            let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
            // A body that runs to the close is whole at the close.
            let to_close = !head.contains("\r\ncontent-length:")
                && !head.contains("\r\ntransfer-encoding:")
                && end.is_some();
            return Some(Read {
                status,
                head,
                body,
                cut: !to_close,
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// What [`RecordingApp::start_h2_scripted`] answers a `GET /answer` with.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct H2Script {
    /// A `103 Early Hints` first.
    early: bool,
    status: u16,
    headers: Vec<(String, String)>,
    data: Vec<String>,
    /// How the stream ends after the data: `eos`, `trailers`, `reset`, `reset-first`
    /// (before the head), `close` (the whole connection, after the data).
    end: String,
    trailers: Vec<(String, String)>,
}

impl H2Script {
    /// Asks for this answer with an HTTP/2 `method` request on a new connection to
    /// `addr`: a valid answer must come whole (status and data; none for `HEAD`), and no
    /// answer may carry `weft-unsent`. The status, or `stream error`.
    async fn ask_h2(&self, addr: SocketAddr, method: &http::Method, ctx: &str) -> String {
        let req = http::Request::builder()
            .method(method.clone())
            .uri("http://cart/answer")
            .header("x-script", hex(&serde_json::to_vec(self).unwrap()))
            .body(full(""))
            .unwrap();
        let answer = h2_exchange(addr, req, ctx).await;
        self.settle().await;
        if self.valid() {
            let (status, _, body) = answer
                .as_ref()
                .unwrap_or_else(|e| panic!("{ctx}: a valid answer lost: {e:?}"));
            let want = if method == http::Method::HEAD {
                String::new()
            } else {
                self.data.concat()
            };
            assert_eq!(status.as_u16(), self.status, "{ctx}");
            assert_eq!(String::from_utf8_lossy(body), want, "{ctx}");
        }
        match &answer {
            Ok((status, unsent, _)) => {
                assert!(!unsent, "{ctx}: weft-unsent");
                status.as_str().to_owned()
            }
            Err(_) => "stream error".to_owned(),
        }
    }

    /// Waits for a `close` ending to take effect: an answer to `HEAD` ends at its head,
    /// before the application (or peer) closes its connection a few milliseconds later,
    /// and a request sent on that connection in between fails as it would with any
    /// application that dies with requests in flight, which is not what these tests judge.
    async fn settle(&self) {
        if self.end == "close" {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the answer keeps HTTP/2's rules, so that every proxy must pass it on whole:
    /// a final status, ordinary fields, a `content-length` (if any) equal to the data.
    fn valid(&self) -> bool {
        let length: usize = self.data.iter().map(String::len).sum();
        let lengths: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n == "content-length")
            .map(|(_, v)| v.as_str())
            .collect();
        (200..600).contains(&self.status)
            && self.status != 204
            && self.status != 304
            && self
                .headers
                .iter()
                .all(|(n, _)| n.starts_with("x-") || n == "content-length")
            && self.trailers.iter().all(|(n, _)| n.starts_with("x-"))
            && matches!(lengths.as_slice(), [] | [_])
            && lengths
                .iter()
                .all(|l| l.parse::<usize>().ok() == Some(length))
            && (self.end == "eos" || self.end == "trailers")
    }
}

/// Serves one HTTP/2 connection (prior knowledge) with [`scripted_h2_answer`], until the
/// peer or a script closes it.
async fn serve_scripted_h2<S>(io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Ok(mut conn) = h2::server::handshake(io).await else {
        return;
    };
    let close = Arc::new(tokio::sync::Notify::new());
    loop {
        tokio::select! {
            next = conn.accept() => {
                let Some(Ok((req, respond))) = next else { return };
                tokio::spawn(scripted_h2_answer(req, respond, close.clone()));
            }
            () = close.notified() => return,
        }
    }
}

/// A faulty peer proxy: a TLS 1.3 server with the server's mesh certificate that accepts
/// `weft-mux` sessions and answers each stream as [`scripted_h2_answer`] does. What a
/// client sidecar gets from it, no server sidecar checked.
async fn scripted_peer(ca: &Ca) -> (SocketAddr, Task) {
    let config = ca.issue(SERVER_ID).server_config(&ca.pem, &[b"weft-mux"]);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(s).await {
                    serve_scripted_h2(tls).await;
                }
            });
        }
    });
    (addr, Task(task))
}

async fn scripted_h2_answer(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<bytes::Bytes>,
    close: Arc<tokio::sync::Notify>,
) {
    let script: Option<H2Script> = req
        .headers()
        .get("x-script")
        .and_then(|v| serde_json::from_slice(&unhex(v.to_str().unwrap_or_default())).ok());
    let Some(script) = script.filter(|_| req.uri().path() == "/answer") else {
        let resp = http::Response::builder().status(200).body(()).unwrap();
        if let Ok(mut body) = respond.send_response(resp, false) {
            let _ = body.send_data(bytes::Bytes::from_static(b"ok"), true);
        }
        return;
    };
    if script.end == "reset-first" {
        respond.send_reset(h2::Reason::INTERNAL_ERROR);
        return;
    }
    if script.early {
        let early = http::Response::builder()
            .status(103)
            .header("link", "</a>; rel=preload");
        let _ = respond.send_informational(early.body(()).unwrap());
    }
    let mut resp = http::Response::builder().status(script.status);
    for (n, v) in &script.headers {
        resp = resp.header(n.as_str(), v.as_str());
    }
    let Ok(resp) = resp.body(()) else {
        respond.send_reset(h2::Reason::INTERNAL_ERROR);
        return;
    };
    let only_head = script.data.is_empty() && script.end == "eos";
    let mut body = match respond.send_response(resp, only_head) {
        Ok(body) => body,
        Err(_) => {
            respond.send_reset(h2::Reason::INTERNAL_ERROR);
            return;
        }
    };
    if only_head {
        return;
    }
    for (i, d) in script.data.iter().enumerate() {
        let last = i + 1 == script.data.len() && script.end == "eos";
        if body.send_data(bytes::Bytes::from(d.clone()), last).is_err() {
            return;
        }
    }
    match script.end.as_str() {
        "eos" if script.data.is_empty() => {
            let _ = body.send_data(bytes::Bytes::new(), true);
        }
        "trailers" => {
            let mut t = http::HeaderMap::new();
            for (n, v) in &script.trailers {
                if let (Ok(n), Ok(v)) = (
                    http::HeaderName::from_bytes(n.as_bytes()),
                    http::HeaderValue::from_str(v),
                ) {
                    t.append(n, v);
                }
            }
            if body.send_trailers(t).is_err() {
                body.send_reset(h2::Reason::INTERNAL_ERROR);
            }
        }
        "reset" => body.send_reset(h2::Reason::CANCEL),
        "close" => {
            // Let the data go out first, as an application that writes and exits would.
            tokio::time::sleep(Duration::from_millis(5)).await;
            close.notify_one();
        }
        _ => {}
    }
}

/// An odd HTTP/2 answer: statuses, fields (lengths that disagree with the data, two of
/// them, connection-specific and mesh fields, which h2 may refuse to send), early hints,
/// data, and ends (trailers odd and plain, resets before and after the head, a closed
/// connection).
fn odd_h2_script(rng: &mut impl rand::Rng) -> H2Script {
    use rand::seq::IndexedRandom as _;
    let status = *[200u16, 200, 201, 204, 206, 304, 400, 404, 500, 503, 599]
        .choose(rng)
        .unwrap_or(&200);
    let data: Vec<String> = (0..rng.random_range(0..4))
        .map(|i| {
            [
                "abc",
                "de",
                "",
                "xyz\r\n0\r\n\r\n",
                "GET / HTTP/1.1\r\n\r\n",
            ][(i + rng.random_range(0..5)) % 5]
                .to_owned()
        })
        .collect();
    let length: usize = data.iter().map(String::len).sum();
    let mut headers = Vec::new();
    for _ in 0..rng.random_range(0..4) {
        let field: (&str, String) = match rng.random_range(0..16) {
            0 => ("content-length", length.to_string()),
            1 => ("content-length", (length + 1).to_string()),
            2 => ("content-length", length.saturating_sub(1).to_string()),
            3 => ("content-length", format!("{length}, {length}")),
            4 => ("content-length", "abc".to_owned()),
            5 => ("connection", "close".to_owned()),
            6 => ("transfer-encoding", "chunked".to_owned()),
            7 => ("weft-unsent", "1".to_owned()),
            8 => ("x-forwarded-client-cert", "By=spiffe://x".to_owned()),
            9 => ("trailer", "x-t".to_owned()),
            _ => ("x-field", "v".to_owned()),
        };
        headers.push((field.0.to_owned(), field.1));
    }
    let end = *["eos", "eos", "trailers", "reset", "reset-first", "close"]
        .choose(rng)
        .unwrap_or(&"eos");
    let trailers = match rng.random_range(0..4) {
        0 => vec![("x-t".to_owned(), "1".to_owned())],
        1 => vec![("connection".to_owned(), "close".to_owned())],
        2 => vec![("content-length".to_owned(), "9".to_owned())],
        _ => vec![],
    };
    H2Script {
        early: rng.random_bool(0.1),
        status,
        headers,
        data,
        end: end.to_owned(),
        trailers,
    }
}

/// An HTTP/2 connection to `addr` (prior knowledge), driven until the returned task drops.
async fn h2_connect(
    addr: SocketAddr,
    ctx: &str,
) -> (hyper::client::conn::http2::SendRequest<Body>, Task) {
    let stream = connect(addr).await;
    // HTTP/2 writes a head and its body apart: without this, each request waits out the
    // peer's delayed ACK.
    stream.set_nodelay(true).unwrap();
    h2_over(stream, ctx).await
}

/// An HTTP/2 client connection (prior knowledge) over `io`, driven until the returned
/// task drops.
async fn h2_over<S>(io: S, ctx: &str) -> (hyper::client::conn::http2::SendRequest<Body>, Task)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .unwrap_or_else(|e| panic!("{ctx}: HTTP/2 handshake: {e}"));
    let task = Task(tokio::spawn(async move {
        let _ = conn.await;
    }));
    (sender, task)
}

/// `req` on `sender`, with 5 s to answer or fail: the status, whether `weft-unsent` came
/// with it, and the body.
async fn h2_send(
    sender: &mut hyper::client::conn::http2::SendRequest<Body>,
    req: http::Request<Body>,
    ctx: &str,
) -> Result<(http::StatusCode, bool, bytes::Bytes), hyper::Error> {
    tokio::time::timeout(WAIT, async {
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let unsent = resp.headers().contains_key("weft-unsent");
        let body = http_body_util::BodyExt::collect(resp.into_body()).await?;
        Ok((status, unsent, body.to_bytes()))
    })
    .await
    .unwrap_or_else(|_| panic!("{ctx}: neither answered nor failed in 5 s"))
}

/// A `weft-mux` session to the chain's server sidecar, as a peer proxy opens one (the
/// client's certificate, HTTP/2 inside): what a compromised or faulty peer could send on
/// it reaches the server's sidecar unchecked by any client sidecar.
async fn peer_mux(
    chain: &Chain,
    ctx: &str,
) -> (hyper::client::conn::http2::SendRequest<Body>, Task) {
    let addr = chain._server.addr;
    let tcp = connect(addr).await;
    tcp.set_nodelay(true).unwrap();
    let tls = chain
        .peer
        .handshake(tcp, addr, Inner::Mux, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{ctx}: mux session: {e}"));
    h2_over(tls, ctx).await
}

/// [`h2_send`] on a new connection to `addr`.
async fn h2_exchange(
    addr: SocketAddr,
    req: http::Request<Body>,
    ctx: &str,
) -> Result<(http::StatusCode, bool, bytes::Bytes), hyper::Error> {
    let (mut sender, _conn) = h2_connect(addr, ctx).await;
    h2_send(&mut sender, req, ctx).await
}

/// An HTTP/2 `GET /next` through every transport and straight at the server's sidecar is
/// answered `200 ok`.
async fn still_serving_h2(chain: &Chain) {
    for (transport, addr) in every_way(chain) {
        let req = http::Request::get("http://cart/next")
            .body(full(""))
            .unwrap();
        let ctx = format!("{transport}: a new HTTP/2 connection");
        let (status, _, body) = h2_exchange(addr, req, &ctx)
            .await
            .unwrap_or_else(|e| panic!("{ctx}: {e:?}"));
        assert_eq!((status.as_u16(), &body[..]), (200, &b"ok"[..]), "{ctx}");
    }
}

/// Odd HTTP/2 answers from an application that speaks HTTP/2 ([`odd_h2_script`]), to
/// HTTP/2 `GET` and `HEAD` requests (an HTTP/1 request reaches the application in
/// HTTP/1: [`odd_response`]'s test) through every transport and straight at the server's
/// sidecar: a valid answer ([`H2Script::valid`]) reaches the client with its status and
/// data; any other is an answer or a stream error within 5 s, never with `weft-unsent`;
/// every sidecar keeps serving; no task of any proxy panics. Seeded (`WEFT_FUZZ_SEED`, default 1),
/// `WEFT_FUZZ_CASES` answers (default 200), stopped after 60 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_odd_http2_responses_never_panic_hang_or_lose_a_valid_answer() {
    let (mut fuzz, mut rng) = Fuzz::start(200);
    let seed = fuzz.seed;
    let app = RecordingApp::start_h2_scripted().await;
    let chain = Chain::with_app(Limits::default(), None, app).await;
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    while let Some(case) = fuzz.next_case() {
        let script = odd_h2_script(&mut rng);
        let head = rand::Rng::random_bool(&mut rng, 0.25);
        let method = if head {
            http::Method::HEAD
        } else {
            http::Method::GET
        };
        if std::env::var_os("WEFT_FUZZ_SHOW").is_some() {
            eprintln!(
                "case {case}: {method}, valid {}: {script:?}",
                script.valid()
            );
        }
        for (transport, addr) in every_way(&chain) {
            let ctx = format!("seed {seed}, case {case}, {transport}, {method}: {script:?}");
            let label = script.ask_h2(addr, &method, &ctx).await;
            *outcomes.entry(label).or_default() += 1;
        }
        chain.app.take();
        if case % 10 == 9 {
            still_serving_h2(&chain).await;
        }
    }
    still_serving_h2(&chain).await;
    fuzz.finish(&format!(
        "HTTP/2 answers × {} ways; outcomes {outcomes:?}",
        chain.clients.len() + 1,
    ));
}

/// Odd answers from a faulty peer proxy ([`scripted_peer`], [`odd_h2_script`]) to
/// HTTP/1 and HTTP/2 `GET` and `HEAD` requests through a client sidecar that carries
/// them on the mux: the client sidecar restores each to its client's HTTP version. A
/// valid answer reaches the client whole (status and data; none for `HEAD`); any other is
/// an answer, a close or a stream error within 5 s, never with `weft-unsent` (a peer that
/// says "never sent" has the request tried again at most as retries allow) and never with
/// two framings; an HTTP/1 connection that goes on is in step; no task panics. Seeded
/// (`WEFT_FUZZ_SEED`, default 1), `WEFT_FUZZ_CASES` answers (default 200), stopped after
/// 60 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_odd_answers_of_a_peer_proxy_reach_the_client_well_framed() {
    let (mut fuzz, mut rng) = Fuzz::start(200);
    let seed = fuzz.seed;
    let ca = Ca::new("mesh root");
    let (peer, _peer) = scripted_peer(&ca).await;
    let store = IdentityStore::with_http1(Http1Transport::Multiplexed).unwrap();
    ca.install(&store, CLIENT_ID);
    let mut c = config(&[("web", &[peer])]);
    c["services"][0]["endpoints"][0]["identity"] = serde_json::json!(SERVER_ID);
    let client = TestProxy::start_kind(
        proxy_with(Some(store), Limits::default()),
        ListenerKind::Forward(Arc::from("web")),
        c,
    );
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    while let Some(case) = fuzz.next_case() {
        let script = odd_h2_script(&mut rng);
        let head = rand::Rng::random_bool(&mut rng, 0.25);
        let encoded = hex(&serde_json::to_vec(&script).unwrap());
        let valid = script.valid();
        let want_body = if head {
            String::new()
        } else {
            script.data.concat()
        };
        let method = if head { "HEAD" } else { "GET" };
        let ctx = format!("seed {seed}, case {case}, {method}: {script:?}");
        if std::env::var_os("WEFT_FUZZ_SHOW").is_some() {
            eprintln!("case {case}: {method}, valid {valid}: {script:?}");
        }

        // HTTP/1: the mux stream's answer restored to HTTP/1.1.
        let mut s = connect(client.addr).await;
        let request =
            format!("{method} /answer HTTP/1.1\r\nHost: cart\r\nx-script: {encoded}\r\n\r\n");
        s.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let answer = if head {
            // A HEAD answer's length describes a body that is not sent.
            tokio::time::timeout(WAIT, read_head_or_close(&mut s))
                .await
                .unwrap_or_else(|_| panic!("{ctx}: HTTP/1: neither answered nor closed in 5 s"))
                .map(|h| (h, Vec::new(), false))
        } else {
            read_final(&mut s, &mut buf)
                .await
                .map(|a| (a.head, a.body, a.cut))
        };
        script.settle().await;
        let label = answer
            .as_ref()
            .map_or("closed", |(h, _, _)| h.get(9..12).unwrap_or("?"));
        *outcomes.entry(format!("HTTP/1 {label}")).or_default() += 1;
        if valid {
            let (h, body, cut) = answer
                .as_ref()
                .unwrap_or_else(|| panic!("{ctx}: HTTP/1: closed"));
            assert!(
                h.starts_with(&format!("http/1.1 {}", script.status)),
                "{ctx}: HTTP/1: {h}"
            );
            assert!(!cut, "{ctx}: HTTP/1: cut short: {h}");
            assert_eq!(
                String::from_utf8_lossy(body),
                want_body,
                "{ctx}: HTTP/1: {h}"
            );
        }
        if let Some((h, body, cut)) = &answer {
            assert!(!h.contains("\r\nweft-unsent:"), "{ctx}: HTTP/1: {h}");
            let framings = h.matches("\r\ncontent-length:").count()
                + h.matches("\r\ntransfer-encoding:").count();
            assert!(framings <= 1, "{ctx}: HTTP/1: {h}");
            if !head {
                assert_ne!(
                    &body[..],
                    b"ok",
                    "{ctx}: HTTP/1: another request's answer: {h}"
                );
            }
            if !cut && !h.contains("\r\nconnection: close") {
                next_in_step(&mut s, &format!("{ctx}: HTTP/1, the next request")).await;
            }
        }

        // HTTP/2: the stream's answer as it came, through the client sidecar.
        let method = http::Method::from_bytes(method.as_bytes()).unwrap();
        let label = script
            .ask_h2(client.addr, &method, &format!("{ctx}: HTTP/2"))
            .await;
        *outcomes.entry(format!("HTTP/2 {label}")).or_default() += 1;
        if case % 10 == 9 {
            let mut s = connect(client.addr).await;
            next_in_step(
                &mut s,
                &format!("seed {seed}, after case {case}: a new connection"),
            )
            .await;
        }
    }
    fuzz.finish(&format!(
        "answers of a peer proxy × 2 client versions; outcomes {outcomes:?}"
    ));
}

/// An HTTP/1 response head on `s` (lower-cased, to its blank line), or `None` if the
/// connection closes first; interim `1xx` heads are skipped.
async fn read_head_or_close(s: &mut TcpStream) -> Option<String> {
    loop {
        // A response head reads as a request head does: lines to a blank one.
        let head = read_request_head(s).await?;
        let status: u16 = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        if !(100..200).contains(&status) || status == 101 {
            return Some(head);
        }
    }
}

/// A TCP application that keeps every byte each connection brings, until the client
/// half-closes it (then closes its side too).
struct ByteSink {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Vec<u8>>>>,
    _task: Task,
}

impl ByteSink {
    async fn start() -> ByteSink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let shared = got.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let mut all = Vec::new();
                    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut all)).await;
                    shared.lock().unwrap().push(all);
                });
            }
        });
        ByteSink {
            addr,
            got,
            _task: Task(task),
        }
    }

    /// What the connections closed since the last call brought, each.
    fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.got.lock().unwrap())
    }
}

/// A TLS ClientHello as rustls writes it, offering `alpn` (the first flight's bytes).
fn client_hello(alpn: &[&str], tls12: bool) -> Vec<u8> {
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from("app.example").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

/// First bytes drawn from TLS ClientHellos, whole or not: offering a peer proxy's ALPN or
/// an application's own, cut short, with bytes flipped, followed by more, with record
/// lengths that lie, or random bytes after a handshake record's type. Also what such
/// a start must become: `Some(true)` a peer proxy's hello (terminated: nothing reaches
/// the application), `Some(false)` anything else in full (replayed byte for byte), `None`
/// either.
fn odd_tls_start(rng: &mut impl rand::Rng) -> (Vec<u8>, Option<bool>) {
    use rand::seq::IndexedRandom as _;
    let alpns: [&[&str]; 7] = [
        &[],
        &["h2"],
        &["http/1.1", "h2"],
        &["weft-mux"],
        &["h2", "weft-tcp"],
        &["weft-http1"],
        &["weft-muxx"],
    ];
    let alpn = *alpns.choose(rng).unwrap_or(&alpns[0]);
    let ours = alpn
        .iter()
        .any(|p| ["weft-mux", "weft-tcp", "weft-http1", "weft-h2"].contains(p));
    let mut hello = client_hello(alpn, rng.random_bool(0.5));
    match rng.random_range(0..7) {
        0 => (hello, Some(ours)),
        1 => {
            // Cut short: the proxy waits for the rest until the client's close, then
            // replays what came.
            let at = rng.random_range(1..hello.len());
            hello.truncate(at);
            (hello, Some(false))
        }
        2 => {
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(1..hello.len());
                hello[at] ^= 1 << rng.random_range(0..8);
            }
            (hello, None)
        }
        3 => {
            hello.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            (hello, Some(ours).filter(|o| !o).or(None))
        }
        4 => {
            // The record's length lies.
            let len = [0u16, 1, 4, 0x4000, 0x4001, 0xffff][rng.random_range(0..6)];
            hello[3..5].copy_from_slice(&len.to_be_bytes());
            (hello, None)
        }
        5 => {
            let n = rng.random_range(1..64);
            let mut bytes = vec![0x16];
            bytes.extend((0..n).map(|_| rng.random::<u8>()));
            (bytes, None)
        }
        _ => {
            // Two hellos back to back.
            let again = hello.clone();
            hello.extend_from_slice(&again);
            (hello, Some(ours).filter(|o| !o).or(None))
        }
    }
}

/// First bytes drawn from TLS ClientHellos ([`odd_tls_start`]) at a server sidecar with
/// a mesh identity, each on its own connection, written in random pieces and then
/// half-closed: a peer proxy's hello is terminated (nothing reaches the application); an
/// application's own TLS, or anything that is not a whole hello, reaches it byte for
/// byte; whatever it is, the application gets all of it or nothing, the proxy closes
/// within 5 s, keeps serving peers and plain clients, and no task panics. Seeded
/// (`WEFT_FUZZ_SEED`, default 1), `WEFT_FUZZ_CASES` starts (default 300), stopped after
/// 60 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_tls_starts_are_terminated_or_replayed_whole() {
    use rand::{Rng as _, SeedableRng as _};
    let (mut fuzz, mut rng) = Fuzz::start(300);
    let seed = fuzz.seed;
    let ca = Ca::new("mesh root");
    let sink = ByteSink::start().await;
    let server = TestProxy::start_kind(
        proxy_with(Some(ca.store(SERVER_ID)), Limits::default()),
        ListenerKind::InboundTo(sink.addr),
        config(&[]),
    );
    let peer = ca
        .store(CLIENT_ID)
        .client_tls(Arc::from(SERVER_ID))
        .unwrap();
    let mut outcomes = std::collections::BTreeMap::<&str, usize>::new();
    while let Some(case) = fuzz.next_case() {
        let (bytes, expect) = odd_tls_start(&mut rng);
        let ctx = format!(
            "seed {seed}, case {case}, expect {expect:?}: {}",
            hex(&bytes)
        );
        // The pieces from a generator of their own, so that a write the proxy cut short
        // does not change the cases after it.
        let mut pieces = rand::rngs::StdRng::seed_from_u64(rng.random());
        let mut s = connect(server.addr).await;
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let n = pieces.random_range(1..=rest.len());
            if s.write_all(&rest[..n]).await.is_err() {
                break;
            }
            rest = &rest[n..];
            if pieces.random_bool(0.3) {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let _ = s.shutdown().await;
        let mut back = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut back))
            .await
            .unwrap_or_else(|_| panic!("{ctx}: the proxy neither closed nor answered in 5 s"))
            .ok();
        // A replay ends with the application's close, which comes after it kept what it
        // got: by the client's end, the sink has it.
        let got = sink.take();
        let reached = match got.as_slice() {
            [] => None,
            [one] => Some(one.clone()),
            more => panic!("{ctx}: {} connections reached the application", more.len()),
        };
        if let Some(r) = &reached {
            assert!(*r == bytes, "{ctx}: the application got {}", hex(r));
        }
        match expect {
            Some(true) => assert!(
                reached.is_none(),
                "{ctx}: a peer's hello reached the application"
            ),
            Some(false) => assert!(reached.is_some(), "{ctx}: not replayed"),
            None => {}
        }
        *outcomes
            .entry(if reached.is_some() {
                "replayed"
            } else {
                "terminated or refused"
            })
            .or_default() += 1;
        if case % 25 == 24 {
            // A peer proxy's session still works, and plain bytes still pass.
            let tcp = connect(server.addr).await;
            let tls = peer
                .handshake(tcp, server.addr, Inner::Tcp, WAIT)
                .await
                .unwrap_or_else(|e| {
                    panic!("seed {seed}, after case {case}: a peer's session: {e}")
                });
            drop(tls);
            let mut s = connect(server.addr).await;
            s.write_all(b"plain bytes").await.unwrap();
            s.shutdown().await.unwrap();
            let mut back = Vec::new();
            let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut back)).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let got = sink.take();
            assert!(
                got.iter().any(|g| g == b"plain bytes"),
                "seed {seed}, after case {case}: {got:?}"
            );
        }
    }
    fuzz.finish(&format!("TLS starts; {outcomes:?}"));
}

/// Responses drawn at random from odd parts ([`odd_response`]), each the application's
/// answer to a request through every transport: the client gets one whole response or a
/// close within 5 s, never a field only a proxy may set or one about the application's
/// own connection, and never more than one framing; the next request on its connection,
/// and later ones on new connections, get their own answers (no piece of a broken answer
/// left on a pooled connection to the application is taken for one); no task of any
/// proxy panics. Seeded (`WEFT_FUZZ_SEED`, default 1), `WEFT_FUZZ_CASES` responses
/// (default 300), stopped after 60 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_odd_responses_never_panic_hang_or_answer_another_request() {
    let (mut fuzz, mut rng) = Fuzz::start(300);
    let seed = fuzz.seed;
    let chain = Chain::start().await;
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    while let Some(case) = fuzz.next_case() {
        let (answer, close) = odd_response(&mut rng);
        let shown = String::from_utf8_lossy(&answer[..answer.len().min(300)]).into_owned();
        if std::env::var_os("WEFT_FUZZ_SHOW").is_some() {
            eprintln!("case {case}: {shown:?} then close {close}");
        }
        let request = format!(
            "GET /answer HTTP/1.1\r\nHost: cart\r\nx-answer: {}\r\n{}\r\n",
            hex(&answer),
            if close { "x-then-close: 1\r\n" } else { "" }
        );
        for (transport, client) in &chain.clients {
            let ctx = format!("seed {seed}, case {case}, {transport}: {shown:?}, close {close}");
            let mut s = connect(client.addr).await;
            s.write_all(request.as_bytes()).await.unwrap();
            let mut buf = Vec::new();
            let Some(a) = read_final(&mut s, &mut buf).await else {
                continue;
            };
            *statuses.entry(a.status).or_default() += 1;
            assert!(a.header("weft-unsent").is_none(), "{ctx}: {}", a.head);
            let named = find(&answer, b"connection: keep-alive, x-drop").is_some();
            for field in ["keep-alive", "proxy-connection", "upgrade", "x-drop"] {
                let hop = field != "x-drop" || named;
                assert!(
                    !hop || a.header(field).is_none(),
                    "{ctx}: {field} in {}",
                    a.head
                );
            }
            let framings = a.head.matches("\r\ncontent-length:").count()
                + a.head.matches("\r\ntransfer-encoding:").count();
            assert!(framings <= 1, "{ctx}: {}", a.head);
            if let Some(te) = a.header("transfer-encoding") {
                assert_eq!(te, "chunked", "{ctx}");
            }
            assert_ne!(a.body, b"ok", "{ctx}: another request's answer: {}", a.head);
            // The connection goes on in step, or closes.
            if a.cut || a.header("connection") == Some("close") {
                continue;
            }
            if s.write_all(b"GET /next HTTP/1.1\r\nHost: cart\r\n\r\n")
                .await
                .is_ok()
                && let Some(next) = read_final(&mut s, &mut buf).await
            {
                // An application that closes after its answer without saying so: the
                // next request can go out on that connection before the server's sidecar
                // has seen it close, and is answered `502 upstream_failed`, an answer of
                // its own (docs/proxy.md, the application's idle timeout).
                if close
                    && next.status == 502
                    && next.header("weft-error") == Some("upstream_failed")
                {
                    continue;
                }
                assert_eq!(
                    next.status, 200,
                    "{ctx}: the next request got {}",
                    next.head
                );
                assert_eq!(
                    next.body, b"ok",
                    "{ctx}: the next request got {}",
                    next.head
                );
            }
        }
        chain.app.take();
        if case % 10 == 9 {
            // The same race for a new connection's request: the application's close
            // has reached the server's sidecar within this wait.
            if close {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            still_serving(&chain).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    still_serving(&chain).await;
    fuzz.finish(&format!(
        "responses × {} transports; answers by status {statuses:?}",
        chain.clients.len(),
    ));
}

/// One HTTP/2 request of odd parts, as far as an HTTP/2 client lets one be built (it
/// refuses connection-specific fields itself): odd authorities, `Host` beside or against
/// `:authority`, lengths that disagree with the body, the mesh's own fields.
fn odd_h2_request(rng: &mut impl rand::Rng, mark: &str) -> http::Request<Body> {
    fn one<'a>(rng: &mut dyn rand::RngCore, list: &[&'a str]) -> &'a str {
        list[rand::Rng::random_range(rng, 0..list.len())]
    }
    let method = one(
        rng,
        &[
            "GET", "GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "X-CUSTOM",
        ],
    );
    let uri = one(
        rng,
        &[
            "http://cart/",
            "http://cart/a?b=c",
            "http://cart/api/x",
            "http://other/x",
            "https://cart/x",
            "http://user@cart/x",
            "http://cart:81/x",
            "http://cart/%2e%2e/x",
            "http://cart//x",
            "http://CART/x",
        ],
    );
    let fields = [
        ("host", "cart"),
        ("host", "other"),
        ("host", ""),
        ("content-length", "5"),
        ("content-length", "3"),
        ("content-length", "5, 5"),
        ("content-length", "0"),
        ("te", "trailers"),
        ("weft-orig-proto", "HTTP/1.0"),
        ("weft-orig-proto", "HTTP/1.1"),
        ("weft-orig-proto", "HTTP/1.1"),
        ("weft-orig-proto", "HTTP/9"),
        ("x-forwarded-client-cert", "URI=spiffe://evil/ns/x/sa/y"),
        ("content-type", "application/grpc"),
        ("traceparent", "garbage"),
        ("cookie", "a=1"),
        ("cookie", "b=2"),
        ("x-utf8", "é"),
        ("weft-error", "forbidden"),
        ("weft-unsent", "1"),
        ("expect", "100-continue"),
    ];
    let mut req = http::Request::builder()
        .method(method)
        .uri(uri)
        .header("x-case", mark);
    for _ in 0..rng.random_range(0..4) {
        let (name, value) = fields[rng.random_range(0..fields.len())];
        req = req.header(
            name,
            http::HeaderValue::from_bytes(value.as_bytes()).unwrap(),
        );
    }
    let body = one(rng, &["", "", "hello", "hel"]);
    req.body(full(body)).unwrap()
}

/// What every HTTP/2 request reaching the application must keep (it goes on as HTTP/2,
/// or as HTTP/1 when a peer proxy's stream says it was one):
/// at most one `Host`, equal to `:authority` (but for case) when both are there, `TE` only `trailers`,
/// no `weft-orig-proto`, and no `x-forwarded-client-cert` but the identity the server's
/// sidecar verified.
fn well_formed_h2(transport: &str, ctx: &str, r: &AppRequest) {
    let ctx = format!("{transport}, {ctx}: {r:?}");
    let hosts = r.values("host");
    // A peer proxy's stream with `weft-orig-proto` is restored to HTTP/1 before the
    // application: one `Host`, from `:authority` unless it came as a field.
    if transport == "peer" && !r.line.ends_with(" HTTP/2.0") {
        assert!(
            r.line.ends_with(" HTTP/1.1") || r.line.ends_with(" HTTP/1.0"),
            "{ctx}"
        );
        assert_eq!(hosts.len(), 1, "{ctx}");
    } else {
        assert!(r.line.ends_with(" HTTP/2.0"), "{ctx}");
    }
    assert!(hosts.len() <= 1, "{ctx}");
    if let ([host], [authority]) = (hosts.as_slice(), r.values(":authority").as_slice()) {
        assert!(host.eq_ignore_ascii_case(authority), "{ctx}");
    }
    for te in r.values("te") {
        assert_eq!(te, "trailers", "{ctx}");
    }
    assert!(!r.has("weft-orig-proto"), "{ctx}");
    let identity = format!("URI={CLIENT_ID}");
    let expected: Vec<&str> = if transport == "plain" || transport == "direct" {
        vec![]
    } else {
        vec![identity.as_str()]
    };
    assert_eq!(r.values("x-forwarded-client-cert"), expected, "{ctx}");
}

/// An HTTP/2 application that sends DATA in its answer to `HEAD` breaks the protocol
/// (RFC 9113 §8.1.1), but its head is whole: the client gets that head as the whole
/// answer, over HTTP/1 and HTTP/2, on every transport, and its connection goes on.
/// Before, an HTTP/2 client had its stream reset after the head.
#[tokio::test]
async fn a_head_answered_with_data_by_an_http2_application_gets_its_head_alone() {
    let chain = Chain::with_app(
        Limits::default(),
        None,
        RecordingApp::start_h2("oops").await,
    )
    .await;
    for (transport, addr) in every_way(&chain) {
        let mut s = connect(addr).await;
        for round in 0..2 {
            s.write_all(b"HEAD / HTTP/1.1\r\nHost: web\r\n\r\n")
                .await
                .unwrap();
            let head = read_head(&mut s).await;
            assert!(
                head.starts_with("http/1.1 200 ok\r\n"),
                "{transport} HTTP/1, {round}: {head:?}"
            );
            assert!(
                head.contains("content-length: 4\r\n"),
                "{transport} HTTP/1, {round}: {head:?}"
            );
        }
        // Nothing of "oops" came after either head.
        s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut s).await;
        assert!(
            head.starts_with("http/1.1 200 ok\r\n"),
            "{transport} HTTP/1 GET: {head:?}"
        );
        assert_eq!(read_exactly(&mut s, 2).await, "ok", "{transport}");

        let (mut sender, _conn) = h2_connect(addr, transport).await;
        for (round, method) in [http::Method::HEAD, http::Method::HEAD, http::Method::GET]
            .into_iter()
            .enumerate()
        {
            let req = http::Request::builder()
                .method(method.clone())
                .uri("http://web/")
                .body(full(""))
                .unwrap();
            let (status, length, body) = tokio::time::timeout(WAIT, async {
                let resp = sender.send_request(req).await?;
                let status = resp.status();
                let length = resp
                    .headers()
                    .get("content-length")
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .unwrap_or_default();
                let body = http_body_util::BodyExt::collect(resp.into_body()).await?;
                Ok::<_, hyper::Error>((status, length, body.to_bytes()))
            })
            .await
            .unwrap_or_else(|_| panic!("{transport} HTTP/2, {round}: no answer in 5 s"))
            .unwrap_or_else(|e| panic!("{transport} HTTP/2, {round} {method}: {e:?}"));
            assert_eq!(status, http::StatusCode::OK, "{transport} HTTP/2, {round}");
            let want: &[u8] = if method == http::Method::HEAD {
                b""
            } else {
                b"ok"
            };
            assert_eq!(&body[..], want, "{transport} HTTP/2, {round}");
            if method == http::Method::HEAD {
                assert_eq!(length, "4", "{transport} HTTP/2, {round}");
            }
        }
    }
}

/// HTTP/2 requests drawn from odd parts ([`odd_h2_request`]), each on a new connection
/// through every transport and straight at the server's sidecar, to an application that
/// speaks HTTP/2 (a request goes on in its own version): the client gets a response or a
/// stream error within 5 s, what reaches the application keeps [`well_formed_h2`], at most
/// once per request, every sidecar keeps serving, and no task of
/// any proxy panics. Seeded (`WEFT_FUZZ_SEED`, default 1), `WEFT_FUZZ_CASES` requests
/// (default 300), stopped after 60 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_odd_http2_requests_never_panic_hang_or_reach_the_application_malformed() {
    use rand::SeedableRng as _;
    let (mut fuzz, mut rng) = Fuzz::start(300);
    let seed = fuzz.seed;
    let chain = Chain::with_app(Limits::default(), None, RecordingApp::start_h2("").await).await;
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    let mut shown = std::collections::HashMap::<String, String>::new();
    while let Some(case) = fuzz.next_case() {
        // Every transport, straight at the server's sidecar, and in a mux session of a
        // peer proxy's own (what only a proxy may send, such as `weft-orig-proto`).
        let mut targets: Vec<_> = every_way(&chain)
            .into_iter()
            .map(|(t, a)| (t, Some(a)))
            .collect();
        targets.push(("peer", None));
        // The same parts on every transport.
        let parts_seed: u64 = rand::Rng::random(&mut rng);
        for (transport, addr) in targets {
            let mark = format!("{case}-{transport}");
            let req = odd_h2_request(&mut rand::rngs::StdRng::seed_from_u64(parts_seed), &mark);
            let ctx = format!("seed {seed}, {mark}: {req:?}");
            shown.insert(mark.clone(), ctx.clone());
            let answer = match addr {
                Some(addr) => h2_exchange(addr, req, &ctx).await,
                None => {
                    let (mut sender, _session) = peer_mux(&chain, &ctx).await;
                    h2_send(&mut sender, req, &ctx).await
                }
            };
            let label = match &answer {
                Ok((status, _, _)) => status.as_str().to_owned(),
                Err(_) => "stream error".to_owned(),
            };
            *statuses.entry(label).or_default() += 1;
        }
        let seen = chain.app.take();
        assert!(
            seen.malformed.is_empty(),
            "seed {seed}: {:?}",
            seen.malformed
        );
        let mut marks = std::collections::HashSet::new();
        for r in &seen.requests {
            let mark = r.values("x-case");
            let [mark] = mark.as_slice() else {
                panic!("seed {seed}: a request without one mark: {r:?}");
            };
            let ctx = &shown[*mark];
            assert!(marks.insert(*mark), "{ctx}: reached the application twice");
            let transport = mark.rsplit('-').next().unwrap_or_default();
            well_formed_h2(transport, ctx, r);
        }
        if case % 25 == 24 {
            still_serving(&chain).await;
        }
    }
    still_serving(&chain).await;
    fuzz.finish(&format!(
        "HTTP/2 requests × {} ways; answers {statuses:?}",
        chain.clients.len() + 2,
    ));
}
