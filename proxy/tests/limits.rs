//! Limits and request validity, probed as a client would: raw bytes on HTTP/1.1, hyper's
//! and h2's clients on HTTP/2, a proxy with small limits so that each one bites, and the
//! refusal counted in `/metrics`.

// Helpers below panic on failed setup, which fails the test that called them.
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

use std::convert::Infallible;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;
use weft_proxy::{Proxy, limits::Limits};

/// A proxy forwarding to `service` with these limits.
fn start(service: &str, config: serde_json::Value, limits: Limits) -> TestProxy {
    TestProxy::start_with(Proxy::with_limits(limits), service, config)
}

/// The value of one sample in the proxy's metrics, 0 when absent.
fn sample(proxy: &Proxy, series: &str) -> u64 {
    let text = proxy.metrics.encode().unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

fn refusals(proxy: &Proxy, limit: &str) -> u64 {
    sample(
        proxy,
        &format!("weft_limit_refusals_total{{limit=\"{limit}\"}}"),
    )
}

fn errors(proxy: &Proxy, reason: &str) -> u64 {
    sample(
        proxy,
        &format!("weft_errors_total{{direction=\"outbound\",reason=\"{reason}\"}}"),
    )
}

/// Sends raw bytes and reads until the server closes (or 5 s pass): the response text.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = connect(addr).await;
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads until the peer closes; `Err` if it has not within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> Result<Vec<u8>, Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return Err(out),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(out),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn status_line(response: &str) -> &str {
    response.lines().next().unwrap_or("")
}

fn has_header(response: &str, line: &str) -> bool {
    response
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .lines()
        .any(|l| l.eq_ignore_ascii_case(line))
}

async fn h2_connect(
    addr: SocketAddr,
) -> (hyper::client::conn::http2::SendRequest<support::Body>, Task) {
    let stream = connect(addr).await;
    let (send, conn) = hyper::client::conn::http2::handshake::<_, _, support::Body>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    let task = Task(tokio::spawn(async move {
        let _ = conn.await;
    }));
    (send, task)
}

// ---- Item 14: request validity (RFC 9110/9112/9113) ----

#[tokio::test]
async fn http11_host_rules_are_enforced() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let proxy = start(
        "web",
        config(&[("web", &[backend.addr])]),
        Limits::default(),
    );

    // No Host on HTTP/1.1: 400 from the proxy, with its reason.
    let r = raw(proxy.addr, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(status_line(&r).starts_with("HTTP/1.1 400"), "{r}");
    assert!(has_header(&r, "weft-error: invalid_request"), "{r}");

    // Two Host lines, even equal ones.
    let r = raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: web\r\nHost: web\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 400"), "{r}");
    assert!(has_header(&r, "weft-error: invalid_request"), "{r}");

    // A Host that is not uri-host[:port] (userinfo, a path), or empty: an `http` target
    // has a host (RFC 9110 §4.2.1).
    for bad in ["user@web", "web/x", "web shop", ""] {
        let req = format!("GET / HTTP/1.1\r\nHost: {bad}\r\nConnection: close\r\n\r\n");
        let r = raw(proxy.addr, req.as_bytes()).await;
        assert!(status_line(&r).starts_with("HTTP/1.1 400"), "{bad}: {r}");
    }
    assert_eq!(backend.hits(), 0, "no invalid request reached the backend");

    // HTTP/1.0 may omit Host.
    let r = raw(proxy.addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(status_line(&r).starts_with("HTTP/1.0 200"), "{r}");

    // An absolute-form target's authority replaces Host (RFC 9112 §3.2.2).
    let r = raw(
        proxy.addr,
        b"GET http://web.shop:8080/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 200"), "{r}");
    assert!(has_header(&r, "x-seen-host: web.shop:8080"), "{r}");

    // An absolute-form target with userinfo (RFC 9110 §4.2.4): refused here, not passed
    // on as `Host: user@web.shop`, and the connection closed.
    let r = raw(
        proxy.addr,
        b"GET http://user@web.shop/x HTTP/1.1\r\nHost: web.shop\r\n\r\n",
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 400"), "{r}");
    assert!(has_header(&r, "weft-error: invalid_request"), "{r}");
    assert!(has_header(&r, "connection: close"), "{r}");
    assert!(errors(&proxy.proxy, "invalid_request") >= 5);
}

#[tokio::test]
async fn framing_and_syntax_errors_are_refused_by_the_parser_and_counted() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let proxy = start(
        "web",
        config(&[("web", &[backend.addr])]),
        Limits::default(),
    );
    for (what, req) in [
        (
            "conflicting Content-Length",
            &b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
                [..],
        ),
        (
            "Transfer-Encoding not ending in chunked",
            b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: gzip\r\n\r\nabcd",
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "space in a field name",
            b"GET / HTTP/1.1\r\nHost: web\r\nBad Name: x\r\n\r\n",
        ),
        (
            "space before the colon",
            b"GET / HTTP/1.1\r\nHost: web\r\nX-Name : x\r\n\r\n",
        ),
        (
            "obsolete line folding",
            b"GET / HTTP/1.1\r\nHost: web\r\nX-A: 1\r\n  folded\r\n\r\n",
        ),
        (
            "NUL in a value",
            b"GET / HTTP/1.1\r\nHost: web\r\nX-A: a\x00b\r\n\r\n",
        ),
    ] {
        let r = raw(proxy.addr, req).await;
        assert!(status_line(&r).starts_with("HTTP/1.1 400"), "{what}: {r:?}");
    }
    assert_eq!(backend.hits(), 0);
    assert!(errors(&proxy.proxy, "invalid_request") >= 7);

    // Transfer-Encoding with Content-Length: chunked wins, Content-Length is dropped
    // before forwarding (RFC 9112 §6.3), and the connection closes after the response.
    let r = raw(
        proxy.addr,
        b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(backend.hits(), 1);

    // What hyper reads as chunked but the proxy would forward decoded with a coding lost:
    // another coding before `chunked`, or `chunked` twice (RFC 9112 §6.1). Refused by
    // the proxy, with its reason, and the connection closed.
    for (what, req) in [
        (
            "gzip, chunked",
            &b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"[..],
        ),
        (
            "identity, then chunked on a second line",
            b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "chunked, chunked",
            b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        ),
    ] {
        let r = raw(proxy.addr, req).await;
        assert!(status_line(&r).starts_with("HTTP/1.1 400"), "{what}: {r}");
        assert!(has_header(&r, "weft-error: invalid_request"), "{what}: {r}");
        assert!(has_header(&r, "connection: close"), "{what}: {r}");
    }
    assert_eq!(backend.hits(), 1);

    // A chunked GET body goes on chunked: hyper's client would send a GET whose body has
    // no length with none.
    let r = raw(
        proxy.addr,
        b"GET /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 200"), "{r}");
    let body = r.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert!(body.contains("hello"), "the body came back: {r}");
}

#[tokio::test]
async fn http2_authority_and_host_must_agree() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let proxy = start(
        "web",
        config(&[("web", &[backend.addr])]),
        Limits::default(),
    );
    let (mut send, _conn) = h2_connect(proxy.addr).await;
    let resp = send
        .send_request(
            Request::get("http://web.shop/")
                .header("host", "other.shop")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(resp.headers()["weft-error"], "invalid_request");
    let resp = send
        .send_request(
            Request::get("http://web.shop/")
                .header("host", "WEB.shop")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "the same authority, any case"
    );
    assert_eq!(backend.hits(), 1);
}

// ---- Item 14: size limits ----

fn small_heads() -> Limits {
    Limits {
        max_request_headers_bytes: 4096,
        max_header_line_bytes: 1024,
        max_request_target_bytes: 512,
        max_request_headers_count: 20,
        ..Limits::default()
    }
}

#[tokio::test]
async fn http1_head_limits_answer_414_and_431_with_a_reason() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let proxy = start("web", config(&[("web", &[backend.addr])]), small_heads());

    let long_target = format!("/{}", "a".repeat(600));
    let r = raw(
        proxy.addr,
        format!("GET {long_target} HTTP/1.1\r\nHost: web\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 414"), "{r}");
    assert!(has_header(&r, "weft-error: request_target_too_long"), "{r}");

    let r = raw(
        proxy.addr,
        format!(
            "GET / HTTP/1.1\r\nHost: web\r\nX-Big: {}\r\n\r\n",
            "b".repeat(1100)
        )
        .as_bytes(),
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 431"), "{r}");
    assert!(
        has_header(&r, "weft-error: request_headers_too_large"),
        "{r}"
    );

    let many: String = (0..6)
        .map(|i| format!("X-{i}: {}\r\n", "c".repeat(900)))
        .collect();
    let r = raw(
        proxy.addr,
        format!("GET / HTTP/1.1\r\nHost: web\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 431"), "{r}");
    assert!(
        has_header(&r, "weft-error: request_headers_too_large"),
        "{r}"
    );

    let count: String = (0..25).map(|i| format!("X-{i}: 1\r\n")).collect();
    let r = raw(
        proxy.addr,
        format!("GET / HTTP/1.1\r\nHost: web\r\n{count}\r\n").as_bytes(),
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 431"), "{r}");

    // Far beyond: hyper's parser stops reading (a bare 431), still counted.
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: web\r\nX-Huge: {}\r\n\r\n",
        "d".repeat(64 * 1024)
    );
    let r = raw(proxy.addr, huge.as_bytes()).await;
    assert!(status_line(&r).starts_with("HTTP/1.1 431"), "{r}");

    // Within every limit: forwarded.
    let r = raw(
        proxy.addr,
        format!(
            "GET /{} HTTP/1.1\r\nHost: web\r\nX-Ok: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(400),
            "e".repeat(900)
        )
        .as_bytes(),
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 200"), "{r}");
    assert_eq!(backend.hits(), 1);

    let p = &proxy.proxy;
    assert_eq!(refusals(p, "request_target_bytes"), 1);
    assert_eq!(refusals(p, "header_line_bytes"), 1);
    assert_eq!(refusals(p, "request_headers_bytes"), 1);
    assert_eq!(refusals(p, "request_headers_count"), 1);
    assert_eq!(refusals(p, "request_head"), 1);
    assert_eq!(errors(p, "request_headers_too_large"), 4);
    assert_eq!(errors(p, "request_target_too_long"), 1);
}

#[tokio::test]
async fn http2_head_limits_answer_414_and_431_with_a_reason() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let proxy = start("web", config(&[("web", &[backend.addr])]), small_heads());
    let (mut send, _conn) = h2_connect(proxy.addr).await;

    let long = format!("http://web/{}", "a".repeat(600));
    let resp = send
        .send_request(Request::get(long).body(full("")).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::URI_TOO_LONG);
    assert_eq!(resp.headers()["weft-error"], "request_target_too_long");

    let resp = send
        .send_request(
            Request::get("http://web/")
                .header("x-big", "b".repeat(1100))
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(resp.headers()["weft-error"], "request_headers_too_large");

    let mut req = Request::get("http://web/");
    for i in 0..25 {
        req = req.header(format!("x-{i}"), "1");
    }
    let resp = send
        .send_request(req.body(full("")).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);

    let resp = send
        .send_request(Request::get("http://web/ok").body(full("")).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(backend.hits(), 1);
    assert_eq!(refusals(&proxy.proxy, "request_target_bytes"), 1);
    assert_eq!(refusals(&proxy.proxy, "header_line_bytes"), 1);
    assert_eq!(refusals(&proxy.proxy, "request_headers_count"), 1);
}

#[tokio::test]
async fn default_limits_refuse_what_envoy_refuses() {
    // 70 KiB of headers in 16 KiB-or-smaller fields: over Envoy's 60 KiB default, under
    // hyper's own ~400 KB, which the proxy used to forward.
    let backend = Backend::start("127.0.0.2", "a").await;
    let proxy = start(
        "web",
        config(&[("web", &[backend.addr])]),
        Limits::default(),
    );
    let fields: String = (0..7)
        .map(|i| format!("X-{i}: {}\r\n", "f".repeat(10 * 1024)))
        .collect();
    let r = raw(
        proxy.addr,
        format!("GET / HTTP/1.1\r\nHost: web\r\n{fields}\r\n").as_bytes(),
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 431"), "{r}");
    assert!(
        has_header(&r, "weft-error: request_headers_too_large"),
        "{r}"
    );
    let r = raw(
        proxy.addr,
        format!(
            "GET /{} HTTP/1.1\r\nHost: web\r\n\r\n",
            "t".repeat(9 * 1024)
        )
        .as_bytes(),
    )
    .await;
    assert!(status_line(&r).starts_with("HTTP/1.1 414"), "{r}");
    assert_eq!(backend.hits(), 0);
}

// ---- Item 10: connection and stream limits, idle timeouts ----

#[tokio::test]
async fn a_listener_closes_connections_past_its_limit_and_counts_them() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let limits = Limits {
        max_connections: 2,
        ..Limits::default()
    };
    let proxy = start("web", config(&[("web", &[backend.addr])]), limits);
    let request = b"GET / HTTP/1.1\r\nHost: web\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect(proxy.addr).await;
        s.write_all(request).await.unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    let mut third = connect(proxy.addr).await;
    let _ = third.write_all(request).await;
    let got = closed_within(&mut third, Duration::from_secs(5))
        .await
        .expect("the third connection is closed");
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    assert_eq!(refusals(&proxy.proxy, "outbound_connections"), 1);

    // A slot frees when a connection closes.
    held.pop();
    eventually(
        Duration::from_secs(5),
        "a new connection is served",
        || async {
            let r = raw(
                proxy.addr,
                b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
            )
            .await;
            status_line(&r).starts_with("HTTP/1.1 200")
        },
    )
    .await;
}

#[tokio::test]
async fn http2_advertises_its_stream_limit() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let limits = Limits {
        http2_max_concurrent_streams: 7,
        ..Limits::default()
    };
    let proxy = start("web", config(&[("web", &[backend.addr])]), limits);
    let stream = connect(proxy.addr).await;
    let (client, conn) = h2::client::handshake(stream).await.unwrap();
    let _conn = Task(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let mut client = client.ready().await.unwrap();
    let (resp, _) = client
        .send_request(Request::get("http://web/").body(()).unwrap(), true)
        .unwrap();
    // Once a response came back, the server's SETTINGS have been applied.
    assert_eq!(resp.await.unwrap().status(), StatusCode::OK);
    assert_eq!(client.current_max_send_streams(), 7);
}

#[tokio::test]
async fn an_http2_client_that_does_not_answer_pings_is_disconnected() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let limits = Limits {
        http2_keepalive_interval: Duration::from_millis(200),
        http2_keepalive_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let proxy = start("web", config(&[("web", &[backend.addr])]), limits);
    // A peer that opens HTTP/2 (preface and an empty SETTINGS frame), then goes silent,
    // as a client behind a dead network path would: it never acknowledges a PING.
    let mut s = connect(proxy.addr).await;
    s.write_all(weft_proxy::detect::H2_PREFACE).await.unwrap();
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let got = closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("the silent HTTP/2 peer is disconnected");
    // Frame type 6 is PING: the proxy asked before giving up.
    let mut frames = &got[..];
    let mut pings = 0;
    while frames.len() >= 9 {
        let len =
            usize::from(frames[0]) << 16 | usize::from(frames[1]) << 8 | usize::from(frames[2]);
        if frames[3] == 6 {
            pings += 1;
        }
        frames = frames.get(9 + len..).unwrap_or(&[]);
    }
    assert!(pings >= 1, "no PING before the close: {got:?}");
}

#[tokio::test]
async fn http1_connections_per_endpoint_are_bounded() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let limits = Limits {
        max_http1_connections_per_endpoint: 1,
        ..Limits::default()
    };
    let proxy = start("web", config(&[("web", &[backend.addr])]), limits);
    let url = proxy.url("/");
    let slow = {
        let url = url.clone();
        tokio::spawn(async move {
            let client = h1_client();
            let resp = client
                .request(
                    Request::get(url)
                        .header("x-delay-ms", "800")
                        .body(full(""))
                        .unwrap(),
                )
                .await
                .unwrap();
            resp.status()
        })
    };
    eventually(
        Duration::from_secs(5),
        "the slow request is at the backend",
        || async { backend.hits() == 1 },
    )
    .await;
    // A second client connection needs a second upstream connection: refused at once.
    let (resp, _) = get(&h1_client(), &url).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&resp, "weft-error"), "upstream_connection_limit");
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
    assert_eq!(refusals(&proxy.proxy, "upstream_http1_connections"), 1);
    // Once released, the one connection serves again.
    let (resp, _) = get(&h1_client(), &url).await;
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_idle_opaque_connection_is_closed() {
    let (backend, _t) = tcp_backend("127.0.0.2", "banner").await;
    let mut cfg = config(&[("web", &[backend])]);
    cfg["services"][0]["protocol"] = "opaque".into();
    let limits = Limits {
        opaque_idle_timeout: Duration::from_millis(400),
        ..Limits::default()
    };
    let proxy = start("web", cfg, limits);
    let mut s = connect(proxy.addr).await;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"220"));
    // Traffic keeps it open past the timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        s.read_exact(&mut echo).await.unwrap();
    }
    // ...silence closes it.
    let started = std::time::Instant::now();
    closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("the idle connection is closed");
    assert!(started.elapsed() >= Duration::from_millis(350));
    assert_eq!(refusals(&proxy.proxy, "opaque_idle_timeout"), 1);
}

/// A backend that reads request heads and bodies and never answers, as a server that
/// waits for a whole body does.
async fn swallowing_backend() -> (SocketAddr, Task) {
    let listener = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                }
            });
        }
    });
    (addr, Task(task))
}

/// Sends `head` and ten bytes of a 100-byte body to a proxy whose request-body idle timeout
/// is 400 ms, in front of `backend`, then waits for the connection to close; what the
/// client read, and the proxy.
async fn stall_a_body(backend: SocketAddr, head: &str) -> (String, TestProxy) {
    let limits = Limits {
        request_body_idle_timeout: Duration::from_millis(400),
        ..Limits::default()
    };
    let proxy = start("web", config(&[("web", &[backend])]), limits);
    let mut s = connect(proxy.addr).await;
    s.write_all(format!("{head}Content-Length: 100\r\n\r\n0123456789").as_bytes())
        .await
        .unwrap();
    let got = closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("the stalled body is cut and its connection closed");
    (String::from_utf8_lossy(&got).into_owned(), proxy)
}

#[tokio::test]
async fn a_stalled_request_body_is_cut_and_answered_408() {
    let (backend, _t) = swallowing_backend().await;
    let (got, proxy) = stall_a_body(backend, "POST /upload HTTP/1.1\r\nHost: web\r\n").await;
    assert!(status_line(&got).starts_with("HTTP/1.1 408"), "{got}");
    assert!(
        has_header(&got, "weft-error: request_body_timeout"),
        "{got}"
    );
    assert_eq!(refusals(&proxy.proxy, "request_body_idle_timeout"), 1);
}

#[tokio::test]
async fn a_grpc_content_type_over_http1_does_not_exempt_a_stalled_body() {
    // Only gRPC over HTTP/2 is exempt (its streams are bounded by HTTP/2's own limits and
    // pings); over HTTP/1 the header is the client's word and must not hold a connection.
    let (backend, _t) = swallowing_backend().await;
    let (_, proxy) = stall_a_body(
        backend,
        "POST /pkg.Svc/Call HTTP/1.1\r\nHost: web\r\nContent-Type: application/grpc\r\n",
    )
    .await;
    assert_eq!(refusals(&proxy.proxy, "request_body_idle_timeout"), 1);
}

#[tokio::test]
async fn a_body_stalled_after_the_response_started_is_cut() {
    // The echo backend answers at once and streams the body back: the stall cuts both.
    let backend = Backend::start("127.0.0.2", "a").await;
    let (got, proxy) = stall_a_body(backend.addr, "POST /echo HTTP/1.1\r\nHost: web\r\n").await;
    assert!(status_line(&got).starts_with("HTTP/1.1 200"), "{got}");
    assert_eq!(refusals(&proxy.proxy, "request_body_idle_timeout"), 1);
}

/// A request body of `0123456789`, one byte every 150 ms (1.5 s in all), and the task
/// that sends it.
fn steady_body() -> (Body, tokio::task::JoinHandle<()>) {
    let (mut tx, rx) = futures::channel::mpsc::channel::<Bytes>(1);
    let body = BodyExt::boxed(StreamBody::new(
        rx.map(|b| Ok::<_, Infallible>(Frame::data(b))),
    ));
    let sender = tokio::spawn(async move {
        for b in b"0123456789" {
            tokio::time::sleep(Duration::from_millis(150)).await;
            tx.send(Bytes::copy_from_slice(&[*b])).await.unwrap();
        }
    });
    (body, sender)
}

#[tokio::test]
async fn a_slow_but_steady_body_is_not_cut() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let limits = Limits {
        request_body_idle_timeout: Duration::from_millis(400),
        ..Limits::default()
    };
    let proxy = start("web", config(&[("web", &[backend.addr])]), limits);
    let (body, sender) = steady_body();
    let resp = h1_client()
        .request(Request::post(proxy.url("/echo")).body(body).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&got[..], b"0123456789");
    sender.await.unwrap();
    assert_eq!(refusals(&proxy.proxy, "request_body_idle_timeout"), 0);
}

/// One `GET /` on `s`, a kept-alive HTTP/1 connection to the proxy: the answer's status
/// line, lower-cased.
async fn get_on(s: &mut TcpStream) -> String {
    s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(s).await;
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    read_exactly(s, len).await;
    head.lines().next().unwrap_or("").to_owned()
}

/// Sends a byte every 100 ms on `s`, whose head has begun, until the server closes: how
/// long that took, or `None` if it had not after 5 s.
async fn dribble_until_closed(s: &mut TcpStream) -> Option<Duration> {
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if s.write_all(b"x").await.is_err() {
            return Some(started.elapsed());
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            _ => {}
        }
    }
    None
}

#[tokio::test]
async fn a_kept_alive_http1_connection_outlives_the_head_timeout() {
    // hyper's head timer also runs between requests: before, a connection idle for the
    // header read timeout was closed, and a client pool's next request could meet the close.
    let backend = Backend::start("127.0.0.2", "a").await;
    let limits = Limits {
        header_read_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let proxy = start("web", config(&[("web", &[backend.addr])]), limits);
    let mut s = connect(proxy.addr).await;
    assert!(get_on(&mut s).await.starts_with("http/1.1 200"));
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(
        get_on(&mut s).await.starts_with("http/1.1 200"),
        "the connection serves again after three head timeouts idle"
    );
    assert_eq!(refusals(&proxy.proxy, "header_read_timeout"), 0);
}

#[tokio::test]
async fn a_dribbled_head_is_cut_at_the_head_timeout_on_a_new_or_an_idle_connection() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let limits = Limits {
        header_read_timeout: Duration::from_millis(400),
        ..Limits::default()
    };
    let proxy = start("web", config(&[("web", &[backend.addr])]), limits);
    let mut fresh = connect(proxy.addr).await;
    fresh.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let took = dribble_until_closed(&mut fresh).await;
    let took = took.expect("a slow first head is cut");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert_eq!(refusals(&proxy.proxy, "header_read_timeout"), 1);

    // Idle past the head timeout first: the timer starts at the head's first byte.
    let mut kept = connect(proxy.addr).await;
    assert!(get_on(&mut kept).await.starts_with("http/1.1 200"));
    tokio::time::sleep(Duration::from_millis(800)).await;
    kept.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let took = dribble_until_closed(&mut kept).await;
    let took = took.expect("a slow head after an idle wait is cut");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert_eq!(refusals(&proxy.proxy, "header_read_timeout"), 2);
}

#[tokio::test]
async fn an_http1_connection_idle_past_its_idle_timeout_is_closed_without_a_refusal() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let limits = Limits {
        http1_idle_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let proxy = start("web", config(&[("web", &[backend.addr])]), limits);
    let mut s = connect(proxy.addr).await;
    assert!(get_on(&mut s).await.starts_with("http/1.1 200"));
    let started = std::time::Instant::now();
    let got = closed_within(&mut s, Duration::from_secs(5))
        .await
        .expect("the idle connection is closed");
    assert!(got.is_empty(), "closed without an answer");
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(refusals(&proxy.proxy, "header_read_timeout"), 0);
}

/// An HTTP/2 connection to `addr`: its sender, and its end (`Ok` when the server closed
/// it gracefully, with GOAWAY).
async fn h2_open(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<Body>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let stream = connect(addr).await;
    let (send, conn) = hyper::client::conn::http2::handshake::<_, _, Body>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    (send, tokio::spawn(conn))
}

fn h2_idle_limits() -> Limits {
    Limits {
        http2_idle_timeout: Duration::from_millis(400),
        ..Limits::default()
    }
}

#[tokio::test]
async fn an_http2_connection_without_streams_is_closed_with_goaway_after_its_idle_timeout() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let proxy = start("web", config(&[("web", &[backend.addr])]), h2_idle_limits());
    let (mut send, ended) = h2_open(proxy.addr).await;
    let resp = send
        .send_request(Request::get("http://web/").body(full("")).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();
    let idle_from = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), ended)
        .await
        .expect("the idle HTTP/2 connection is closed within 5 s")
        .unwrap();
    let took = idle_from.elapsed();
    assert!(ended.is_ok(), "closed without GOAWAY: {ended:?}");
    assert!(took >= Duration::from_millis(400), "{took:?}");
    assert!(
        send.ready().await.is_err(),
        "the sender still takes requests"
    );
}

#[tokio::test]
async fn http2_streams_outlasting_the_idle_timeout_keep_their_connection() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let proxy = start("web", config(&[("web", &[backend.addr])]), h2_idle_limits());
    let (mut send, ended) = h2_open(proxy.addr).await;

    // Waiting for its answer: the backend answers after 1 s.
    let resp = send
        .send_request(
            Request::get("http://web/")
                .header("x-delay-ms", "1000")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();
    assert!(!ended.is_finished(), "closed under a waiting request");

    // Answered at once, its bodies streaming both ways for 1.5 s.
    let (body, sender) = steady_body();
    send.ready().await.unwrap();
    let resp = send
        .send_request(Request::post("http://web/echo").body(body).unwrap())
        .await
        .unwrap();
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&got[..], b"0123456789");
    sender.await.unwrap();
    assert!(!ended.is_finished(), "closed under a streaming request");

    // Then idle: closed.
    let ended = tokio::time::timeout(Duration::from_secs(5), ended)
        .await
        .expect("closed once idle")
        .unwrap();
    assert!(ended.is_ok(), "{ended:?}");
}

// ---- Item 4: the admin listener ----

async fn start_admin(limits: Limits) -> (Arc<Proxy>, SocketAddr, CancellationToken, Task) {
    let proxy = Proxy::with_limits(limits);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let task = Task(tokio::spawn(weft_proxy::admin::serve(
        listener,
        proxy.clone(),
        stop.clone(),
    )));
    (proxy, addr, stop, task)
}

#[tokio::test]
async fn the_admin_listener_drops_a_client_that_dribbles_its_head() {
    let limits = Limits {
        admin_header_read_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let (proxy, addr, _stop, _task) = start_admin(limits).await;
    let mut s = connect(addr).await;
    s.write_all(b"GET /live HTTP/1.1\r\n").await.unwrap();
    let took = dribble_until_closed(&mut s).await;
    let took = took.expect("the slow client is disconnected within 5 s");
    assert!(took >= Duration::from_millis(400), "{took:?}");
    assert_eq!(refusals(&proxy, "header_read_timeout"), 1);
}

#[tokio::test]
async fn the_admin_listener_bounds_its_connections_and_head_size() {
    let limits = Limits {
        max_admin_connections: 1,
        ..Limits::default()
    };
    let (proxy, addr, _stop, _task) = start_admin(limits).await;
    let _held = connect(addr).await;
    // Let the listener accept the held connection first.
    eventually(
        Duration::from_secs(5),
        "the second connection is refused",
        || async {
            let mut s = connect(addr).await;
            let _ = s.write_all(b"GET /live HTTP/1.1\r\nHost: a\r\n\r\n").await;
            matches!(closed_within(&mut s, Duration::from_secs(2)).await, Ok(b) if b.is_empty())
        },
    )
    .await;
    assert!(refusals(&proxy, "admin_connections") >= 1);
    drop(_held);

    let big = format!(
        "GET /live HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    eventually(Duration::from_secs(5), "a large head gets 431", || {
        let big = big.clone();
        async move { status_line(&raw(addr, big.as_bytes()).await).starts_with("HTTP/1.1 431") }
    })
    .await;
}

#[tokio::test]
async fn the_admin_listener_serves_config_to_loopback() {
    let (proxy, addr, _stop, _task) = start_admin(Limits::default()).await;
    proxy
        .store
        .apply(
            serde_json::from_value(config(&[("web", &["127.0.0.2:80".parse().unwrap()])])).unwrap(),
        )
        .unwrap();
    let client = h1_client();
    for path in ["/live", "/ready", "/metrics", "/config"] {
        let (resp, _) = get(&client, &format!("http://{addr}{path}")).await;
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
    }
}

#[test]
fn a_zero_limit_is_refused_before_anything_is_bound() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft-proxy"))
        .args([
            "run",
            "--config",
            "/nonexistent.yaml",
            "--max-connections",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--max-connections must be greater than zero"),
        "{stderr}"
    );
}

#[test]
fn a_zero_idle_timeout_is_refused_before_anything_is_bound() {
    for (env, flag) in [
        ("WEFT_UPSTREAM_IDLE_TIMEOUT", "--upstream-idle-timeout"),
        ("WEFT_APP_IDLE_TIMEOUT", "--app-idle-timeout"),
        ("WEFT_HTTP1_IDLE_TIMEOUT", "--http1-idle-timeout"),
        ("WEFT_HTTP2_IDLE_TIMEOUT", "--http2-idle-timeout"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_weft-proxy"))
            .args(["run", "--config", "/nonexistent.yaml"])
            .env(env, "0s")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("{flag} must be greater than zero")),
            "{stderr}"
        );
    }
}

/// An application (HTTP/1.1 and HTTP/2, every request answered 200) that counts the
/// connections it accepts and those that have closed since.
struct CountingApp {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    _task: Task,
}

impl CountingApp {
    async fn start(ip: &str) -> CountingApp {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, c) = (accepted.clone(), closed.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, Infallible>(http::Response::new(full("counted")))
                    });
                    // Ends when the proxy closes the connection (or breaks it).
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        CountingApp {
            addr,
            accepted,
            closed,
            _task: Task(task),
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

/// The test clients' type: [`h1_client`] or [`h2_client`].
type Client =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

/// A proxy process forwarding to `app`, started with `--upstream-idle-timeout idle`.
async fn proxy_process_with_idle_timeout(
    app: &CountingApp,
    idle: &str,
) -> (ChildProxy, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    write_config(&path, &config(&[("web", &[app.addr])]));
    let proxy = ChildProxy::start(&path, &["--upstream-idle-timeout", idle]).await;
    (proxy, dir)
}

/// With `--upstream-idle-timeout 1s`, the proxy closes its connection to the application
/// once it has been unused that long, and the next request opens a new one.
async fn an_upstream_connection_idle_past_the_flag_is_closed(client: Client) {
    let app = CountingApp::start("127.0.0.2").await;
    let (proxy, _dir) = proxy_process_with_idle_timeout(&app, "1s").await;
    let url = format!("http://{}/", proxy.forward);
    let (resp, body) = get(&client, &url).await;
    assert_eq!(resp.status(), StatusCode::OK, "{body}");
    assert_eq!(app.accepted(), 1);
    // The bound only guards against a hang: 90 s, the default, would exceed it.
    eventually(
        Duration::from_secs(20),
        "the proxy closes its idle upstream connection",
        || async { app.closed() == 1 },
    )
    .await;
    let (resp, body) = get(&client, &url).await;
    assert_eq!(resp.status(), StatusCode::OK, "{body}");
    assert_eq!(app.accepted(), 2, "the next request opens a new connection");
}

/// With `--upstream-idle-timeout 1m`, a connection unused for longer than the 1 s above is
/// still open, and the next request reuses it.
async fn an_upstream_connection_within_the_flag_is_reused(client: Client) {
    let app = CountingApp::start("127.0.0.2").await;
    let (proxy, _dir) = proxy_process_with_idle_timeout(&app, "1m").await;
    let url = format!("http://{}/", proxy.forward);
    let (resp, body) = get(&client, &url).await;
    assert_eq!(resp.status(), StatusCode::OK, "{body}");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (resp, body) = get(&client, &url).await;
    assert_eq!(resp.status(), StatusCode::OK, "{body}");
    assert_eq!(
        (app.accepted(), app.closed()),
        (1, 0),
        "one connection, reused"
    );
}

#[tokio::test]
async fn an_http1_upstream_connection_idle_past_the_flag_is_closed() {
    an_upstream_connection_idle_past_the_flag_is_closed(h1_client()).await;
}

#[tokio::test]
async fn an_http2_upstream_connection_idle_past_the_flag_is_closed() {
    an_upstream_connection_idle_past_the_flag_is_closed(h2_client()).await;
}

#[tokio::test]
async fn an_http1_upstream_connection_within_the_flag_is_reused() {
    an_upstream_connection_within_the_flag_is_reused(h1_client()).await;
}

#[tokio::test]
async fn an_http2_upstream_connection_within_the_flag_is_reused() {
    an_upstream_connection_within_the_flag_is_reused(h2_client()).await;
}

/// A proxy process with an inbound listener to `inbound_app` (`--inbound-forward`, as the
/// transparent inbound listener sends connections to the pod's application) and the
/// outbound service `web` on `outbound_app`, started with `extra`; and the inbound
/// listener's address.
async fn proxy_process_both_ways(
    inbound_app: &CountingApp,
    outbound_app: &CountingApp,
    extra: &[&str],
) -> (ChildProxy, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    write_config(&path, &config(&[("web", &[outbound_app.addr])]));
    let inbound: SocketAddr = format!("127.0.0.1:{}", free_port().await).parse().unwrap();
    let forward = format!("{inbound}={}", inbound_app.addr);
    let mut args = vec!["--inbound-forward", forward.as_str()];
    args.extend_from_slice(extra);
    let proxy = ChildProxy::start(&path, &args).await;
    (proxy, inbound, dir)
}

/// `--app-idle-timeout` governs the inbound connection to the application and
/// `--upstream-idle-timeout` the outbound ones: with 1 s and 1 min, after the inbound
/// connection has closed (1 s unused) the outbound one, unused as long, is still open;
/// the next inbound request opens a new connection and the next outbound one reuses its.
async fn the_app_idle_timeout_is_the_inbound_sides_own(client: Client) {
    let (app, remote) = (
        CountingApp::start("127.0.0.2").await,
        CountingApp::start("127.0.0.3").await,
    );
    let (proxy, inbound, _dir) = proxy_process_both_ways(
        &app,
        &remote,
        &["--app-idle-timeout", "1s", "--upstream-idle-timeout", "1m"],
    )
    .await;
    let (inbound_url, outbound_url) = (
        format!("http://{inbound}/"),
        format!("http://{}/", proxy.forward),
    );
    for url in [&inbound_url, &outbound_url] {
        let (resp, body) = get(&client, url).await;
        assert_eq!(resp.status(), StatusCode::OK, "{body}");
    }
    let unused_since = std::time::Instant::now();
    assert_eq!((app.accepted(), remote.accepted()), (1, 1));
    // The bound only guards against a hang.
    eventually(
        Duration::from_secs(20),
        "the proxy closes its idle connection to the application",
        || async { app.closed() == 1 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1_500).saturating_sub(unused_since.elapsed())).await;
    assert_eq!(remote.closed(), 0, "the outbound connection stays open");
    for url in [&inbound_url, &outbound_url] {
        let (resp, body) = get(&client, url).await;
        assert_eq!(resp.status(), StatusCode::OK, "{body}");
    }
    assert_eq!(
        (app.accepted(), remote.accepted()),
        (2, 1),
        "a new connection to the application, the outbound one reused"
    );
}

#[tokio::test]
async fn the_app_idle_timeout_is_the_inbound_sides_own_over_http1() {
    the_app_idle_timeout_is_the_inbound_sides_own(h1_client()).await;
}

#[tokio::test]
async fn the_app_idle_timeout_is_the_inbound_sides_own_over_http2() {
    the_app_idle_timeout_is_the_inbound_sides_own(h2_client()).await;
}

/// By default the inbound proxy closes an unused connection to the application within
/// 2.5 s, before the keep-alive timeout of common servers (Node.js 5 s, gunicorn 2 s is
/// the lowest), so that it never writes a request on a connection the application is
/// closing; an application the proxy has not used for 2.5 s sees its connection closed
/// while the outbound one (90 s) stays.
#[tokio::test]
async fn by_default_the_proxy_closes_an_idle_app_connection_before_common_keep_alives() {
    let (app, remote) = (
        CountingApp::start("127.0.0.2").await,
        CountingApp::start("127.0.0.3").await,
    );
    let (proxy, inbound, _dir) = proxy_process_both_ways(&app, &remote, &[]).await;
    let client = h1_client();
    for url in [
        format!("http://{inbound}/"),
        format!("http://{}/", proxy.forward),
    ] {
        let (resp, body) = get(&client, &url).await;
        assert_eq!(resp.status(), StatusCode::OK, "{body}");
    }
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!((app.closed(), remote.closed()), (1, 0));
}
