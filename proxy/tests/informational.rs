//! What happens between a request's head and the end of its response, on the wire and
//! across every client transport (the mux, TLS sessions of their own, plain text): a client
//! sidecar (forward listener) → a server sidecar (inbound listener) → an application that
//! writes its answers byte by byte.
//!
//! - `Expect: 100-continue`, answered `100` by the application, or early with a final
//!   status it sends before reading the body (and then keeps or closes its connection);
//! - interim answers (`103 Early Hints`, a `100` nobody asked for) and a `101` to a
//!   request that asked for no upgrade;
//! - a response that ends before its declared length;
//! - a per-try timeout while the client's own body stalls;
//! - the rest of a request body after an early answer and a close: read and discarded
//!   within 256 KiB and 10 s (per proxy on the way), else the client's connection closes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::BodyExt as _;
use support::ca::Ca;
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use weft_proxy::{
    LocalPorts, Proxy,
    http::{DISCARD_LIMIT, DISCARD_TIME},
    identity::{Http1Transport, IdentityStore},
    limits::Limits,
    server::{BeforeConfig, ListenerKind},
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
fn server_sidecar(ca: &Ca, app: SocketAddr) -> TestProxy {
    TestProxy::start_kind(
        proxy_with(Some(ca.store(SERVER_ID))),
        ListenerKind::InboundTo(app),
        config(&[]),
    )
}

/// Client sidecars for service `web`, whose one endpoint is the server sidecar at
/// `server`, named by how they carry HTTP/1: on the mux, in TLS sessions of their own, and
/// in plain text. `edit` changes the service's config (a Route, a Breaker).
fn every_client_transport(
    ca: &Ca,
    server: SocketAddr,
    edit: impl Fn(&mut serde_json::Value),
) -> Vec<(String, TestProxy)> {
    every_client_transport_on(ca, server, edit, || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        TcpListener::from_std(listener).unwrap()
    })
}

/// [`every_client_transport`], each client sidecar listening on a listener from `listen`.
fn every_client_transport_on(
    ca: &Ca,
    server: SocketAddr,
    edit: impl Fn(&mut serde_json::Value),
    listen: impl Fn() -> TcpListener,
) -> Vec<(String, TestProxy)> {
    let mut clients = Vec::new();
    for transport in [Http1Transport::Multiplexed, Http1Transport::Sessions] {
        let store = IdentityStore::with_http1(transport).unwrap();
        ca.install(&store, CLIENT_ID);
        let mut c = config(&[("web", &[server])]);
        c["services"][0]["endpoints"][0]["identity"] = serde_json::json!(SERVER_ID);
        edit(&mut c["services"][0]);
        let client = TestProxy::start_kind_on(
            listen(),
            proxy_with(Some(store)),
            ListenerKind::Forward(Arc::from("web")),
            c,
        );
        clients.push((format!("{transport:?}"), client));
    }
    let mut c = config(&[("web", &[server])]);
    edit(&mut c["services"][0]);
    let plain = TestProxy::start_kind_on(
        listen(),
        proxy_with(None),
        ListenerKind::Forward(Arc::from("web")),
        c,
    );
    clients.push(("plain text".to_string(), plain));
    clients
}

fn content_length(head: &str) -> Option<usize> {
    head.lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())
}

/// Request lines an application received, lower-cased.
type Seen = Arc<Mutex<Vec<String>>>;

/// An HTTP/1.1 application that writes its answers byte by byte, by path:
///
/// - `/continue`: `100 Continue`, reads the body, `200 got`;
/// - `/417` and `/401`: answers `417` or `401` at once, then reads the body and discards
///   it, keeping the connection (as RFC 9110 §10.1.1 lets a server do);
/// - `/413`: answers `413` with `connection: close` at once and closes without reading;
/// - the early answers of `/417`, `/401` and `/413` to a request with `Expect:
///   100-continue` wait 200 ms: by then the proxies have asked for the body (their
///   `100 Continue` is out), which the test of that case counts on. An answer that
///   overtakes the `100` is a final answer without one, as RFC 9110 allows: another
///   case, which made that test flaky under load;
/// - `/early-hints`: `103 Early Hints`, then `200 ok`; `/interim-100`: an unasked `100
///   Continue`, then `200 ok`; `/switch`: `101 Switching Protocols` to a plain `GET`;
/// - `/slow`: `200 ok` after 300 ms;
/// - `/short`: a head with `content-length: 100`, 7 bytes, and a close; `/short-chunked`:
///   one chunk and a close;
/// - `/upload`: reads a chunked body to its end, then `200 ok`;
/// - anything else: `200 ok`.
async fn raw_app() -> (SocketAddr, Seen, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                while let Some(head) = read_request_head(&mut s).await {
                    let line = head.lines().next().unwrap_or_default().to_string();
                    record.lock().unwrap().push(line.clone());
                    let len = content_length(&head).unwrap_or(0);
                    let path = line.split(' ').nth(1).unwrap_or_default().to_string();
                    if head.contains("expect: 100-continue")
                        && ["/417", "/401", "/413"].contains(&path.as_str())
                    {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    let answer: &[u8] = match path.as_str() {
                        "/continue" => {
                            s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.unwrap();
                            let mut body = vec![0u8; len];
                            if s.read_exact(&mut body).await.is_err() {
                                return;
                            }
                            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\ngot"
                        }
                        "/417" | "/401" => {
                            let answer: &[u8] = if path == "/417" {
                                b"HTTP/1.1 417 Expectation Failed\r\ncontent-length: 4\r\n\r\nnope"
                            } else {
                                b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 4\r\n\r\nwho?"
                            };
                            s.write_all(answer).await.unwrap();
                            let mut body = vec![0u8; len];
                            if s.read_exact(&mut body).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        "/413" => {
                            let _ = s
                                .write_all(b"HTTP/1.1 413 Content Too Large\r\nconnection: close\r\ncontent-length: 8\r\n\r\ntoo big\n")
                                .await;
                            return;
                        }
                        "/early-hints" => {
                            s.write_all(
                                b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n",
                            )
                            .await
                            .unwrap();
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                        }
                        "/interim-100" => {
                            s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.unwrap();
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                        }
                        "/switch" => {
                            let _ = s
                                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: foo\r\nconnection: upgrade\r\n\r\n")
                                .await;
                            // Holds the connection, as an application that switched would.
                            let _ = s.read(&mut [0u8; 1]).await;
                            return;
                        }
                        "/slow" => {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                        }
                        "/short" => {
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
                                .await;
                            return;
                        }
                        "/short-chunked" => {
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n7\r\npartial\r\n")
                                .await;
                            return;
                        }
                        "/upload" => {
                            let mut body = Vec::new();
                            let mut byte = [0u8; 1];
                            while !body.ends_with(b"0\r\n\r\n") {
                                if s.read(&mut byte).await.unwrap_or(0) == 0 {
                                    return;
                                }
                                body.push(byte[0]);
                            }
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
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

/// Reads whatever arrives until the peer closes, within 5 s, or until a whole `502`
/// answer has arrived: after an answer the proxy made whole, its connection rightly stays
/// open for the next request.
async fn read_to_close_or_502(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Err(_) => panic!("no close within 5 s: {:?}", String::from_utf8_lossy(&got)),
            Ok(Ok(0) | Err(_)) => return String::from_utf8_lossy(&got).to_lowercase(),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&got).to_lowercase();
        if let Some((head, body)) = text.split_once("\r\n\r\n")
            && head.starts_with("http/1.1 502")
            && content_length(head) == Some(body.len())
        {
            return text;
        }
    }
}

/// `GET /next` on `s`, answered `ok`: the connection is still in step.
async fn still_in_step(s: &mut TcpStream, after: &str) {
    s.write_all(b"GET /next HTTP/1.1\r\nhost: cart\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(s).await;
    assert!(head.starts_with("http/1.1 200"), "after {after}: {head}");
    assert_eq!(read_exactly(s, 2).await, "ok", "after {after}");
}

/// A `POST` of 5 bytes with `Expect: 100-continue`: the head, then (as a client does once
/// it hears `100 Continue`) the body; returns the final answer's head and body.
async fn post_expecting(c: &mut TcpStream, path: &str, transport: &str) -> (String, String) {
    c.write_all(
        format!("POST {path} HTTP/1.1\r\nhost: cart\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(c).await;
    assert!(
        head.starts_with("http/1.1 100"),
        "{transport} {path}: {head}"
    );
    c.write_all(b"hello").await.unwrap();
    let head = read_head(c).await;
    let body = read_exactly(c, content_length(&head).unwrap_or(0)).await;
    (head, body)
}

fn posts(seen: &Seen, path: &str) -> usize {
    let line = format!("post {path} http/1.1");
    seen.lock().unwrap().iter().filter(|l| **l == line).count()
}

/// `Expect: 100-continue`: the client gets the application's final answer, whether the
/// application said `100` first or answered before reading the body; each request reaches
/// the application once; and the client's connection stays in step. An application that
/// answers early leaves its connection busy with a body the client still owes: another
/// client's request must not wait behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_gets_the_applications_answer_early_or_late() {
    let ca = Ca::new("mesh root");
    let (app, seen, _app) = raw_app().await;
    let server = server_sidecar(&ca, app);
    for (transport, client) in &every_client_transport(&ca, server.addr, |_| {}) {
        seen.lock().unwrap().clear();
        let mut c = connect(client.addr).await;

        let (head, body) = post_expecting(&mut c, "/continue", transport).await;
        assert!(head.starts_with("http/1.1 200"), "{transport}: {head}");
        assert_eq!(body, "got", "{transport}");
        still_in_step(&mut c, "a 100 from the application").await;

        // Answered before the body was read, and the connection kept.
        let (head, body) = post_expecting(&mut c, "/417", transport).await;
        assert!(head.starts_with("http/1.1 417"), "{transport}: {head}");
        assert_eq!(body, "nope", "{transport}");
        still_in_step(&mut c, "an early 417").await;

        // Answered, and the application's connection closed, before the client sent the
        // body it owes since its proxy's `100 Continue`: the proxy reads that body and
        // discards it, rather than close the client's connection under its next request.
        c.write_all(b"POST /413 HTTP/1.1\r\nhost: cart\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        assert!(read_head(&mut c).await.starts_with("http/1.1 100"));
        let head = read_head(&mut c).await;
        assert!(head.starts_with("http/1.1 413"), "{transport}: {head}");
        assert_eq!(read_exactly(&mut c, 8).await, "too big\n", "{transport}");
        c.write_all(b"hello").await.unwrap();
        still_in_step(&mut c, "an early 413 and a close").await;

        // Answered before the body was sent at all: the client heard `100 Continue` from
        // its proxy and owes the body, but has not sent it yet.
        let mut owing = connect(client.addr).await;
        owing
            .write_all(b"POST /401 HTTP/1.1\r\nhost: cart\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n")
            .await
            .unwrap();
        assert!(read_head(&mut owing).await.starts_with("http/1.1 100"));
        let head = read_head(&mut owing).await;
        assert!(head.starts_with("http/1.1 401"), "{transport}: {head}");
        assert_eq!(read_exactly(&mut owing, 4).await, "who?");
        let started = Instant::now();
        let mut other = connect(client.addr).await;
        still_in_step(&mut other, "another client's early 401").await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{transport}: another client waited {:?} behind a body it does not send",
            started.elapsed()
        );
        owing.write_all(b"hello").await.unwrap();
        still_in_step(&mut owing, "its own early 401").await;

        for path in ["/continue", "/417", "/413", "/401"] {
            assert_eq!(posts(&seen, path), 1, "{transport} {path}: sent once");
        }
    }
}

/// Interim answers are not passed on, and break nothing: `103 Early Hints` (from an
/// HTTP/1 and an HTTP/2 application) and an unasked `100` leave the final answer intact.
/// A `101 Switching Protocols` to a request that asked for no upgrade is the
/// application's error (502 `upstream_failed`), never a switch the client did not ask
/// for, and on the mux it costs only its own stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_answers_are_dropped_and_an_unasked_switch_is_a_bad_gateway() {
    let ca = Ca::new("mesh root");
    let (app, _seen, _app) = raw_app().await;
    let server = server_sidecar(&ca, app);
    let (h2_app, _h2_app) = h2_app().await;
    let h2_server = server_sidecar(&ca, h2_app);
    let h2_clients = every_client_transport(&ca, h2_server.addr, |_| {});
    let clients = every_client_transport(&ca, server.addr, |_| {});
    for (transport, client) in &clients {
        let mut c = connect(client.addr).await;
        for path in ["/early-hints", "/interim-100"] {
            c.write_all(format!("GET {path} HTTP/1.1\r\nhost: cart\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let head = read_head(&mut c).await;
            assert!(
                head.starts_with("http/1.1 200"),
                "{transport} {path}: {head}"
            );
            assert_eq!(read_exactly(&mut c, 2).await, "ok", "{transport} {path}");
        }
        still_in_step(&mut c, "interim answers").await;

        // A request in flight on the same mux connection while the switch happens.
        let slow = tokio::spawn(slow_get(client.addr));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut c = connect(client.addr).await;
        c.write_all(b"GET /switch HTTP/1.1\r\nhost: cart\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut c).await;
        assert!(
            head.starts_with("http/1.1 502") && head.contains("weft-error: upstream_failed"),
            "{transport}: {head}"
        );
        assert_eq!(
            slow.await.unwrap(),
            "ok",
            "{transport}: the other request finished"
        );
    }
    for (transport, client) in &h2_clients {
        let resp = tokio::time::timeout(
            Duration::from_secs(5),
            h2_client().request(
                http::Request::get(client.url("/early-hints"))
                    .body(full(""))
                    .unwrap(),
            ),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(resp.status(), 200, "{transport}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok", "{transport}");
    }
}

/// `GET /slow` on a connection of its own to `front`; its body.
async fn slow_get(front: SocketAddr) -> String {
    let mut c = connect(front).await;
    c.write_all(b"GET /slow HTTP/1.1\r\nhost: cart\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut c).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    read_exactly(&mut c, 2).await
}

/// An HTTP/2 application: `/early-hints` sends `103` before `200 ok`; `/short-reset`
/// sends 7 of the 100 bytes its `content-length` promises and resets the stream;
/// `/short-eos` ends the stream after those 7 bytes; anything else is `200 ok`.
async fn h2_app() -> (SocketAddr, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    tokio::spawn(async move {
                        let head = |len: usize| {
                            http::Response::builder()
                                .header("content-length", len)
                                .body(())
                                .unwrap()
                        };
                        let partial = bytes::Bytes::from_static(b"partial");
                        match req.uri().path() {
                            "/short-reset" => {
                                let mut s = respond.send_response(head(100), false).unwrap();
                                s.send_data(partial, false).unwrap();
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                s.send_reset(h2::Reason::INTERNAL_ERROR);
                            }
                            "/short-eos" => {
                                let mut s = respond.send_response(head(100), false).unwrap();
                                let _ = s.send_data(partial, true);
                            }
                            path => {
                                if path == "/early-hints" {
                                    let hint = http::Response::builder()
                                        .status(103)
                                        .header("link", "</a.css>; rel=preload")
                                        .body(())
                                        .unwrap();
                                    respond.send_informational(hint).unwrap();
                                }
                                let mut s = respond.send_response(head(2), false).unwrap();
                                let _ = s.send_data(bytes::Bytes::from_static(b"ok"), true);
                            }
                        }
                    });
                }
            });
        }
    });
    (addr, Task(task))
}

/// An answer whose application stops before its body's declared end reaches the client
/// as what the application sent, its head and the bytes it wrote, then a broken end
/// (HTTP/1: the connection closes short of the length, or of the last chunk; HTTP/2: the
/// stream is reset), never as a complete shorter body, never as a 502 in place of the
/// head, and over every transport between the proxies alike, the mux included.
#[tokio::test]
async fn a_response_cut_short_is_an_error_never_a_shorter_body() {
    let ca = Ca::new("mesh root");
    let (app, _seen, _app) = raw_app().await;
    let server = server_sidecar(&ca, app);
    let (h2_app, _h2_app) = h2_app().await;
    let h2_server = server_sidecar(&ca, h2_app);
    let h2_clients = every_client_transport(&ca, h2_server.addr, |_| {});
    for (transport, client) in &every_client_transport(&ca, server.addr, |_| {}) {
        // What the application wrote before closing (`raw_app`), body bytes as sent.
        for (path, sent) in [
            ("/short", "partial"),
            ("/short-chunked", "7\r\npartial\r\n"),
        ] {
            let mut c = connect(client.addr).await;
            c.write_all(format!("GET {path} HTTP/1.1\r\nhost: cart\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let got = read_to_close_or_502(&mut c).await;
            let (head, body) = got
                .split_once("\r\n\r\n")
                .unwrap_or_else(|| panic!("{transport} {path}: no head: {got:?}"));
            assert!(
                head.starts_with("http/1.1 200"),
                "{transport} {path}: {got}"
            );
            match content_length(head) {
                Some(n) => assert!(body.len() < n, "{transport} {path}: {got}"),
                None => assert!(head.contains("transfer-encoding: chunked"), "{got}"),
            }
            assert_eq!(body, sent, "{transport} {path}");
        }
    }
    for (transport, client) in &h2_clients {
        // `/short-reset` resets the stream after its DATA; `/short-eos` ends it short of
        // its `content-length`, which HTTP/2 makes a stream error.
        for (path, sent) in [("/short-reset", "partial"), ("/short-eos", "")] {
            let resp = tokio::time::timeout(
                Duration::from_secs(5),
                h2_client().request(http::Request::get(client.url(path)).body(full("")).unwrap()),
            )
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{transport} {path}: {e}"));
            assert_eq!(resp.status(), 200, "{transport} {path}");
            let mut body = resp.into_body();
            let mut got = Vec::new();
            let end = loop {
                match tokio::time::timeout(Duration::from_secs(5), body.frame())
                    .await
                    .unwrap()
                {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            got.extend_from_slice(data);
                        }
                    }
                    end => break end,
                }
            };
            assert!(matches!(end, Some(Err(_))), "{transport} {path}: {end:?}");
            assert_eq!(String::from_utf8_lossy(&got), sent, "{transport} {path}");
        }
    }
}

/// A per-try timeout that passes while the proxy waits for the client's own request body
/// is the client's stall, not the endpoint's failure: the Breaker ejects nothing, and the
/// endpoint keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_try_timeout_on_a_stalled_request_body_is_not_the_endpoints_failure() {
    let ca = Ca::new("mesh root");
    let (app, seen, _app) = raw_app().await;
    let server = server_sidecar(&ca, app);
    let clients = every_client_transport(&ca, server.addr, |service| {
        service["route"] =
            serde_json::json!({"name": "shop/web", "rules": [{"perTryTimeout": "1s"}]});
        service["breaker"] = serde_json::json!({"name": "shop/web", "outlierDetection": {
            "consecutive5xx": 2, "consecutiveConnectFailures": 2, "interval": "10s",
            "baseEjectionTime": "30s", "maxEjectionTime": "60s", "maxEjectedPercent": 100}});
    });
    for (transport, client) in &clients {
        // A body the client finishes in time is answered; it also opens the connection
        // to the server sidecar, whose handshake must not eat into the stalled tries'
        // per-try timeout on a loaded machine.
        let mut c = connect(client.addr).await;
        c.write_all(b"POST /upload HTTP/1.1\r\nhost: cart\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut c).await;
        assert!(head.starts_with("http/1.1 200"), "{transport}: {head}");
        seen.lock().unwrap().clear();
        for _ in 0..3 {
            let mut c = connect(client.addr).await;
            c.write_all(b"POST /upload HTTP/1.1\r\nhost: cart\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
                .await
                .unwrap();
            let head = read_head(&mut c).await;
            assert!(
                head.starts_with("http/1.1 504") && head.contains("weft-error: per_try_timeout"),
                "{transport}: {head}"
            );
        }
        assert_eq!(
            posts(&seen, "/upload"),
            3,
            "{transport}: each reached the app"
        );
        seen.lock().unwrap().clear();
        let text = client.proxy.metrics.encode().unwrap();
        assert!(
            !text.contains("weft_breaker_ejections_total{"),
            "{transport}: {text}"
        );

        // And after them, the endpoint still answers.
        let mut c = connect(client.addr).await;
        c.write_all(b"POST /upload HTTP/1.1\r\nhost: cart\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut c).await;
        assert!(head.starts_with("http/1.1 200"), "{transport}: {head}");
        seen.lock().unwrap().clear();
    }
}

/// A chunked request body with trailers has ended after them: the connection to the
/// application goes back to the pool, rather than one connection per request (hyper's
/// HTTP/1 client stops reading a body at its trailers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_trailers_leaves_its_connection_to_the_pool() {
    let ca = Ca::new("mesh root");
    let app = Scripted::ok("127.0.0.1", "app").await;
    let server = server_sidecar(&ca, app.addr);
    for (transport, client) in &every_client_transport(&ca, server.addr, |_| {}) {
        let mut c = connect(client.addr).await;
        for _ in 0..5 {
            c.write_all(b"POST /sum HTTP/1.1\r\nhost: cart\r\nte: trailers\r\ntrailer: x-sum\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-sum: 5\r\n\r\n")
                .await
                .unwrap();
            let head = read_head(&mut c).await;
            assert!(head.starts_with("http/1.1 200"), "{transport}: {head}");
            let mut body = vec![0u8; content_length(&head).unwrap_or(0)];
            c.read_exact(&mut body).await.unwrap();
        }
    }
    // Fifteen requests, one after another: without pooling, fifteen connections.
    assert!(
        app.connections() <= 3,
        "{} connections to the app for 15 sequential requests",
        app.connections()
    );
}

/// Sends `POST /413` framed by `framing` (a `content-length` or `transfer-encoding`
/// header) with no body yet, and reads the application's early `413`: the client owes a
/// body that the application, which closed, will never read.
async fn answered_early(c: &mut TcpStream, framing: &str, transport: &str) {
    c.write_all(format!("POST /413 HTTP/1.1\r\nhost: cart\r\n{framing}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(c).await;
    assert!(head.starts_with("http/1.1 413"), "{transport}: {head}");
    assert_eq!(read_exactly(c, 8).await, "too big\n", "{transport}");
}

/// `len` bytes of body in chunks of 16 KiB, each framed as a chunk when `chunked` (the
/// last chunk included); each piece with the data bytes it carries.
fn body_pieces(len: usize, chunked: bool) -> Vec<(Vec<u8>, usize)> {
    let mut pieces = Vec::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(16 * 1024);
        let data = vec![b'x'; n];
        pieces.push(if chunked {
            (
                [format!("{n:x}\r\n").as_bytes(), &data, b"\r\n"].concat(),
                n,
            )
        } else {
            (data, n)
        });
        left -= n;
    }
    if chunked {
        pieces.push((b"0\r\n\r\n".to_vec(), 0));
    }
    pieces
}

/// Writes `pieces` on `c` until one fails; the data bytes written before, and whether
/// one failed (the proxy closed the connection). A piece that cannot be written within
/// 5 s fails the test: the proxy neither reads nor closes.
async fn send_until_refused(c: &mut TcpStream, pieces: &[(Vec<u8>, usize)]) -> (usize, bool) {
    let mut sent = 0;
    for (piece, data) in pieces {
        match tokio::time::timeout(Duration::from_secs(5), c.write_all(piece)).await {
            Err(_) => panic!("after {sent} bytes, the proxy neither reads nor closes"),
            Ok(Err(_)) => return (sent, true),
            Ok(Ok(())) => sent += data,
        }
    }
    (sent, false)
}

/// A connection to `addr` whose send buffer is small (about 8 KiB), so that what it
/// manages to write is close to what the proxy read.
async fn connect_small(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    tokio::time::timeout(Duration::from_secs(5), socket.connect(addr))
        .await
        .unwrap()
        .unwrap()
}

/// A listener whose connections have a small receive buffer (about 8 KiB, no autotuning),
/// so that what a client manages to write is close to what the proxy read.
fn small_buffer_listener() -> TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    socket.listen(128).unwrap()
}

/// How many proxies on the way from a client of `transport` to the application read and
/// discard the rest of a body the application left, each within its own 256 KiB and 10 s:
/// on the mux only the client sidecar (the server sidecar's side of a stream is HTTP/2,
/// whose rest a reset refuses); over an HTTP/1 session or plain text also the server
/// sidecar, after which the client sidecar, whose upstream connection then closes, starts
/// its own.
fn discarding_hops(transport: &str) -> u32 {
    if transport == "Multiplexed" { 1 } else { 2 }
}

/// An application answers early and closes while the client still owes 100 KiB of its
/// body (with a `content-length`, or chunked): the proxy reads that rest and discards
/// it, so the client's next request on the same connection is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_within_256_kib_is_discarded_and_the_connection_serves_the_next_request() {
    let ca = Ca::new("mesh root");
    let (app, seen, _app) = raw_app().await;
    let server = server_sidecar(&ca, app);
    for (transport, client) in &every_client_transport(&ca, server.addr, |_| {}) {
        let mut c = connect(client.addr).await;
        for chunked in [false, true] {
            let framing = if chunked {
                "transfer-encoding: chunked".to_string()
            } else {
                format!("content-length: {}", 100 * 1024)
            };
            answered_early(&mut c, &framing, transport).await;
            let (sent, refused) =
                send_until_refused(&mut c, &body_pieces(100 * 1024, chunked)).await;
            assert!(
                !refused,
                "{transport} {framing}: refused after {sent} bytes"
            );
            still_in_step(
                &mut c,
                &format!("{transport}: 100 KiB discarded ({framing})"),
            )
            .await;
        }
        assert_eq!(posts(&seen, "/413"), 2, "{transport}: each sent once");
        seen.lock().unwrap().clear();
    }
}

/// Past 256 KiB the proxy stops reading the rest of a body the application left, and
/// closes the client's connection: a chunked 1 MiB is cut after about 256 KiB, and a
/// `content-length` of 1 MiB, more than the bound, is not read at all. The next request
/// takes a new connection. The client's send buffer and the proxy's receive buffer are
/// small, so that what the client manages to write is about what the proxy read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_256_kib_the_rest_is_not_read_and_the_connection_closes() {
    const MIB: usize = 1024 * 1024;
    let ca = Ca::new("mesh root");
    let (app, _seen, _app) = raw_app().await;
    let server = server_sidecar(&ca, app);
    let clients = every_client_transport_on(&ca, server.addr, |_| {}, small_buffer_listener);
    for (transport, client) in &clients {
        for chunked in [true, false] {
            let framing = if chunked {
                "transfer-encoding: chunked".to_string()
            } else {
                format!("content-length: {MIB}")
            };
            let mut c = connect_small(client.addr).await;
            answered_early(&mut c, &framing, transport).await;
            let (sent, refused) = send_until_refused(&mut c, &body_pieces(MIB, chunked)).await;
            assert!(refused, "{transport} {framing}: all {sent} bytes taken");
            // What the buffers on the way hold besides: measured at less than one 16 KiB
            // piece.
            let slack = 128 * 1024;
            let bound = if chunked {
                discarding_hops(transport) as usize * DISCARD_LIMIT as usize + slack
            } else {
                slack
            };
            assert!(
                sent <= bound,
                "{transport} {framing}: {sent} bytes taken, more than {bound}"
            );
            assert!(
                closed_within(&mut c, Duration::from_secs(5)).await,
                "{transport} {framing}: still open"
            );
            let mut fresh = connect(client.addr).await;
            still_in_step(&mut fresh, &format!("{transport}: a closed connection")).await;
        }
    }
}

/// A client that stalls the rest of a body the application left is not waited for
/// forever: each proxy discarding it gives up after 10 s, and the client's connection
/// closes ([`discarding_hops`]). SLOW: `DISCARD_TIME` is a constant, so this test waits
/// for it, 20 s (every transport at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_rest_closes_the_connection_after_10_s_per_discarding_proxy() {
    let ca = Ca::new("mesh root");
    let (app, _seen, _app) = raw_app().await;
    let server = server_sidecar(&ca, app);
    let clients = every_client_transport(&ca, server.addr, |_| {});
    let stalls = clients.iter().map(|(transport, client)| async move {
        let mut c = connect(client.addr).await;
        answered_early(
            &mut c,
            &format!("content-length: {}", 100 * 1024),
            transport,
        )
        .await;
        let started = Instant::now();
        let (sent, refused) = send_until_refused(&mut c, &body_pieces(10 * 1024, false)).await;
        assert!(!refused, "{transport}: refused after {sent} bytes");
        let closed = closed_within(&mut c, Duration::from_secs(30)).await;
        (transport, closed, started.elapsed())
    });
    for (transport, closed, after) in futures::future::join_all(stalls).await {
        let bound = DISCARD_TIME * discarding_hops(transport);
        assert!(closed, "{transport}: still open after {after:?}");
        assert!(
            after >= bound - Duration::from_millis(500) && after < bound + Duration::from_secs(5),
            "{transport}: closed after {after:?}, not about {bound:?}"
        );
    }
}
