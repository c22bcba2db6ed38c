//! In-process integration tests: real loopback sockets, real backends on 127.0.0.x, a
//! proxy with a forward listener on 127.0.0.1:0.

mod support;

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn http1_request_reaches_the_backend_with_host_kept_and_hop_by_hop_removed() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let proxy = TestProxy::start("web", config(&[("web", &[backend.addr])])).await;

    let client = h1_client();
    let req = Request::get(proxy.url("/hello"))
        .header("host", "web.shop.svc:8080")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "do not forward")
        .header("keep-alive", "timeout=5")
        .header("x-app", "forward me")
        .body(full(""))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (parts, body) = resp.into_parts();
    let resp = http::Response::from_parts(parts, ());
    let body = body.collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello from a");
    assert_eq!(header(&resp, "x-seen-host"), "web.shop.svc:8080");
    assert_eq!(header(&resp, "x-seen-version"), "HTTP/1.1");
    let seen = header(&resp, "x-seen-headers");
    assert!(seen.contains("x-app"), "{seen}");
    assert!(!seen.contains("x-private"), "{seen}");
    assert!(!seen.contains("keep-alive"), "{seen}");
    assert_eq!(header(&resp, "weft-error"), "");
}

#[tokio::test]
async fn http2_prior_knowledge_is_proxied_as_http2_with_authority_kept() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let proxy = TestProxy::start("web", config(&[("web", &[backend.addr])])).await;
    let req = Request::get("http://web.shop:80/x")
        .version(http::Version::HTTP_2)
        .body(full(""))
        .unwrap();
    // The client dials the proxy but names the service in :authority.
    let stream = connect(proxy.addr).await;
    let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Body>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    let _conn = Task(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-seen-version"], "HTTP/2.0");
    assert_eq!(resp.headers()["x-seen-authority"], "web.shop:80");
}

#[tokio::test]
async fn requests_on_one_http2_connection_are_balanced_per_request() {
    let a = Backend::start("127.0.0.2", "a").await;
    let b = Backend::start("127.0.0.3", "b").await;
    let c = Backend::start("127.0.0.4", "c").await;
    let proxy = TestProxy::start("web", config(&[("web", &[a.addr, b.addr, c.addr])])).await;

    let stream = connect(proxy.addr).await;
    let (send, conn) = hyper::client::conn::http2::handshake::<_, _, Body>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    let _conn = Task(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..60 {
        let mut send = send.clone();
        send.ready().await.unwrap();
        let resp = send
            .send_request(Request::get("http://web/").body(full("")).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        *seen
            .entry(resp.headers()["x-backend"].to_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        seen.len(),
        3,
        "one client connection reached every endpoint: {seen:?}"
    );
}

#[tokio::test]
async fn large_bodies_stream_both_ways_without_buffering() {
    // The client sends a chunk and waits for it to come back before sending the next:
    // if the proxy buffered either body, the first echo would never arrive.
    let backend = Backend::start("127.0.0.2", "a").await;
    let proxy = TestProxy::start("web", config(&[("web", &[backend.addr])])).await;
    let stream = connect(proxy.addr).await;
    let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Body>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    let _conn = Task(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let (mut tx, rx) = futures::channel::mpsc::channel::<Bytes>(1);
    let body = BodyExt::boxed(StreamBody::new(
        rx.map(|b| Ok::<_, Infallible>(Frame::data(b))),
    ));
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        send.send_request(Request::post("http://web/echo").body(body).unwrap()),
    )
    .await
    .expect("response headers before the request body ended")
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut resp_body = resp.into_body();
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 64;
    let mut received = 0usize;
    for i in 0..CHUNKS {
        tx.send(Bytes::from(vec![i as u8; CHUNK])).await.unwrap();
        let want = (i + 1) * CHUNK;
        while received < want {
            let frame = tokio::time::timeout(Duration::from_secs(10), resp_body.frame())
                .await
                .expect("echo of the chunk just sent")
                .unwrap()
                .unwrap();
            if let Ok(data) = frame.into_data() {
                assert!(
                    data.iter()
                        .all(|b| *b == (received / CHUNK) as u8 || *b == i as u8)
                );
                received += data.len();
            }
        }
    }
    drop(tx);
    while let Some(frame) = resp_body.frame().await {
        if let Ok(d) = frame.unwrap().into_data() {
            received += d.len();
        }
    }
    assert_eq!(received, CHUNK * CHUNKS);
}

#[tokio::test]
async fn http1_large_upload_and_download() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let proxy = TestProxy::start("web", config(&[("web", &[backend.addr])])).await;
    let body = Bytes::from(vec![7u8; 32 << 20]);
    let resp = h1_client()
        .request(
            Request::post(proxy.url("/echo"))
                .body(full(body.clone()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got.len(), body.len());
    assert!(got == body);
}

#[tokio::test]
async fn websocket_style_upgrade_passes_through() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let proxy = TestProxy::start("web", config(&[("web", &[backend.addr])])).await;
    let mut s = connect(proxy.addr).await;
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for msg in [&b"ping"[..], b"not http at all \x00\x01"] {
        echo_roundtrip(&mut s, msg).await;
    }
}

#[tokio::test]
async fn connect_is_forwarded_to_the_destination_and_tunnels_bytes_both_ways() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let proxy = TestProxy::start("web", config(&[("web", &[backend.addr])])).await;
    let (mut s, head) = open_connect(proxy.addr, "db.example:5432").await;
    // The destination got the CONNECT itself, with its authority-form target unchanged.
    assert!(head.contains("x-backend: a"), "{head}");
    assert!(head.contains("x-seen-authority: db.example:5432"), "{head}");
    for msg in [
        &b"\x16\x03\x01 a TLS hello, say"[..],
        b"and more, both ways",
    ] {
        echo_roundtrip(&mut s, msg).await;
    }
    let metrics = proxy.proxy.metrics.encode().unwrap();
    let needle = r#"weft_responses_total{direction="outbound",service="web",status_class="2xx"} 1"#;
    assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
}

/// A client that closes while its request waits for an answer cancels it upstream, as with
/// Linkerd, Envoy and nginx: the application's connection closes at once, rather than
/// holding the request (and a pooled connection) until it answers. Shutting down only the
/// sending side looks the same on the wire (end of stream), so it cancels too.
#[tokio::test]
async fn an_http1_client_that_goes_away_cancels_its_request_upstream() {
    let app = HangingApp::start("127.0.0.2").await;
    let proxy = TestProxy::start("web", config(&[("web", &[app.addr])])).await;
    for (n, how) in [(1, "closed"), (2, "shut down its sending side")] {
        let mut s = connect(proxy.addr).await;
        s.write_all(b"GET /long-poll HTTP/1.1\r\nhost: web\r\n\r\n")
            .await
            .unwrap();
        app.wait_held(n).await;
        if n == 1 {
            drop(s);
        } else {
            s.shutdown().await.unwrap();
            assert!(
                closed_within(&mut s, Duration::from_secs(2)).await,
                "{how}: the client is not answered"
            );
        }
        app.wait_closed(
            n,
            &format!("a client that {how}: the request is cancelled upstream"),
        )
        .await;
    }
    // Counted as requests, with no response.
    let metrics = proxy.proxy.metrics.encode().unwrap();
    let needle = r#"weft_requests_total{direction="outbound",service="web"} 2"#;
    assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    assert!(!metrics.contains("weft_responses_total{"), "{metrics}");
}

/// An HTTP/2 client that resets its stream while the request waits cancels it upstream
/// too: the proxy resets its stream to the application, whose handler is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_resets_its_stream_cancels_the_request_upstream() {
    // An HTTP/2 application that holds each request and counts handlers dropped unanswered.
    let held: Arc<AtomicUsize> = Arc::default();
    let dropped: Arc<AtomicUsize> = Arc::default();
    struct Unanswered(Arc<AtomicUsize>);
    impl Drop for Unanswered {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let (h, d) = (held.clone(), dropped.clone());
    let _app = Task(tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (h, d) = (h.clone(), d.clone());
            let svc = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                let (h, d) = (h.clone(), d.clone());
                async move {
                    let _unanswered = Unanswered(d);
                    h.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Ok::<_, Infallible>(http::Response::new(full("too late")))
                }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc),
            );
        }
    }));
    let proxy = TestProxy::start("web", config(&[("web", &[app])])).await;
    let client = h2_client();
    let url = proxy.url("/long-poll");
    let request = tokio::spawn(async move { client.get(url.parse().unwrap()).await });
    let held_now = held.clone();
    eventually(Duration::from_secs(5), "the application holds it", || {
        let held = held_now.clone();
        async move { held.load(Ordering::SeqCst) == 1 }
    })
    .await;
    // Dropping the client's response future resets its stream.
    request.abort();
    eventually(
        Duration::from_secs(2),
        "the application's handler is dropped",
        || {
            let dropped = dropped.clone();
            async move { dropped.load(Ordering::SeqCst) == 1 }
        },
    )
    .await;
}

#[tokio::test]
async fn opaque_tcp_honours_half_close() {
    let (backend, _t) = tcp_backend("127.0.0.2", "echo-until-eof").await;
    let proxy = TestProxy::start("web", config(&[("web", &[backend])])).await;
    let mut s = connect(proxy.addr).await;
    // Not HTTP: detection decides "opaque" at the first byte.
    s.write_all(b"\x00\x01binary protocol").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out, "got 17 bytes");
}

#[tokio::test]
async fn server_speaks_first_protocol_does_not_wait_for_detection() {
    let (backend, _t) = tcp_backend("127.0.0.2", "banner").await;
    let mut cfg = config(&[("web", &[backend])]);
    cfg["detectTimeout"] = "30s".into();
    cfg["services"][0]["protocol"] = "opaque".into();
    let proxy = TestProxy::start("web", cfg).await;
    let start = Instant::now();
    let mut s = connect(proxy.addr).await;
    let mut banner = [0u8; 26];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut banner))
        .await
        .expect("banner without waiting for the 30s detection timeout")
        .unwrap();
    assert_eq!(&banner, b"220 hello, I speak first\r\n");
    assert!(start.elapsed() < Duration::from_secs(2));
    s.write_all(b"EHLO\r\n").await.unwrap();
    let mut echo = [0u8; 6];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"EHLO\r\n");
}

#[tokio::test]
async fn no_endpoints_is_503_with_a_reason() {
    let proxy = TestProxy::start("web", config(&[("web", &[])])).await;
    let (resp, body) = get(&h1_client(), &proxy.url("/")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&resp, "weft-error"), "no_endpoints");
    assert!(body.contains("no_endpoints"));
}

#[tokio::test]
async fn refused_connection_is_502_and_an_unsent_request_tries_up_to_two_other_endpoints() {
    let closed_port = |ip: &'static str| async move {
        let l = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        l.local_addr().unwrap()
    };
    let refused = closed_port("127.0.0.5").await;
    let only_refused = TestProxy::start("web", config(&[("web", &[refused])])).await;
    let (resp, _) = get(&h1_client(), &only_refused.url("/")).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(header(&resp, "weft-error"), "connect_failed");

    let good = Backend::start("127.0.0.2", "good").await;
    let mut cfg = config(&[("web", &[refused, good.addr])]);
    cfg["services"][0]["balancer"] = "roundRobin".into();
    let mixed = TestProxy::start("web", cfg).await;
    let client = h1_client();
    for _ in 0..10 {
        let (resp, body) = get(&client, &mixed.url("/")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body, "hello from good");
    }

    // Two endpoints gone at once (a rolling update the proxy has not heard of yet): round
    // robin tries both before the live one, so every request needs two retries.
    let also_refused = closed_port("127.0.0.6").await;
    let mut cfg = config(&[("web", &[refused, also_refused, good.addr])]);
    cfg["services"][0]["balancer"] = "roundRobin".into();
    let two_gone = TestProxy::start("web", cfg).await;
    for _ in 0..6 {
        let (resp, body) = get(&client, &two_gone.url("/")).await;
        assert_eq!(resp.status(), StatusCode::OK, "{body}");
        assert_eq!(body, "hello from good");
    }
}

#[tokio::test]
async fn slow_upstream_is_504_after_the_service_timeout() {
    let backend = Backend::start("127.0.0.2", "slow").await;
    let mut cfg = config(&[("web", &[backend.addr])]);
    cfg["services"][0]["timeout"] = "200ms".into();
    let proxy = TestProxy::start("web", cfg).await;
    let start = Instant::now();
    let resp = h1_client()
        .request(
            Request::get(proxy.url("/"))
                .header("x-delay-ms", "3000")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(resp.headers()["weft-error"], "response_timeout");
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn the_service_timeout_cuts_a_response_body_that_outlives_it() {
    // The echo backend answers at once and streams back what the client sends; the client
    // sends one chunk and then holds its body open, so the response never ends by itself.
    let backend = Backend::start("127.0.0.2", "a").await;
    let mut cfg = config(&[("web", &[backend.addr])]);
    cfg["services"][0]["timeout"] = "300ms".into();
    let proxy = TestProxy::start("web", cfg).await;
    let (mut tx, rx) = futures::channel::mpsc::channel::<Bytes>(1);
    let body = BodyExt::boxed(StreamBody::new(
        rx.map(|b| Ok::<_, Infallible>(Frame::data(b))),
    ));
    let start = Instant::now();
    let resp = h1_client()
        .request(Request::post(proxy.url("/echo")).body(body).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    tx.send(Bytes::from_static(b"first")).await.unwrap();
    let mut resp_body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), resp_body.frame())
        .await
        .expect("the first chunk")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "first");
    let cut = tokio::time::timeout(Duration::from_secs(5), resp_body.frame())
        .await
        .expect("the body is cut at the service's timeout, not left streaming");
    assert!(
        !matches!(cut, Some(Ok(_))),
        "the body went on past the deadline: {cut:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(3));
    let metrics = proxy.proxy.metrics.encode().unwrap();
    assert!(
        metrics.contains(r#"reason="response_timeout""#),
        "{metrics}"
    );
    drop(tx);
}

#[tokio::test]
async fn round_robin_respects_weights() {
    let a = Backend::start("127.0.0.2", "a").await;
    let b = Backend::start("127.0.0.3", "b").await;
    let mut cfg = config(&[("web", &[a.addr, b.addr])]);
    cfg["services"][0]["balancer"] = "roundRobin".into();
    cfg["services"][0]["endpoints"][0]["weight"] = 3.into();
    let proxy = TestProxy::start("web", cfg).await;
    let client = h1_client();
    for _ in 0..40 {
        assert_eq!(
            get(&client, &proxy.url("/")).await.0.status(),
            StatusCode::OK
        );
    }
    assert_eq!((a.hits(), b.hits()), (30, 10));
}

#[tokio::test]
async fn peak_ewma_sends_most_requests_to_the_faster_endpoint() {
    // "slow" answers after 200 ms. Its estimate jumps to 200 ms at its first observation,
    // far above the 30 ms seed the fast one decays from, so P2C keeps choosing "fast" (the
    // margin keeps this true on a loaded machine, where "fast" may take tens of ms).
    let fast = Backend::start("127.0.0.2", "fast").await;
    let slow = Backend::start_slow("127.0.0.3", "slow", 200).await;
    let proxy = TestProxy::start("web", config(&[("web", &[fast.addr, slow.addr])])).await;
    let client = h1_client();
    for _ in 0..100 {
        assert_eq!(
            get(&client, &proxy.url("/")).await.0.status(),
            StatusCode::OK
        );
    }
    assert!(slow.hits() <= 10, "slow got {} of 100", slow.hits());
    assert_eq!(fast.hits() + slow.hits(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_gives_equal_endpoints_their_weighted_share() {
    // Two equally fast backends weighted 9 : 1: the light one gets its 10 %, from one
    // client and from eight keep-alive clients (before the fix it got 0 to 7 %).
    //
    // Only while the proxy sees them as equally fast. From one client (nothing in flight
    // to even things out), one response slower than twice the other endpoint's estimate
    // (the 30 ms seed, decaying with the 10 s constant) makes its endpoint "clearly
    // slower" for longer than the test, and then latency, not weight, decides (the light
    // one gets 1 % or 19 %). On a loaded machine a CPU stall does that: with the test
    // suite and three busy loops on two cores, 3 suites of 5 gave the light one 14-16 %
    // from one client. A run in which the one client saw such a response proves nothing
    // about weights, so it is repeated with fresh estimates, at most five times (under
    // the same load, 1 suite of 10 then had three such runs in a row). From eight
    // clients the in-flight term pulls shares back, and the clients' own latency, which
    // includes waiting for each other, would flag nearly every loaded run (9.6-12 % seen).
    for run in 1..=5 {
        match weighted_share_run().await {
            Ok(()) => return,
            Err(stall) => eprintln!("run {run}: {stall}; weights not tested, again"),
        }
    }
    panic!("five runs in a row had a request slow enough to decide by latency");
}

/// One run of [`peak_ewma_gives_equal_endpoints_their_weighted_share`]: `Err` when a
/// request from the one client took long enough to put its endpoint outside the 2× band.
#[allow(clippy::unwrap_used)]
async fn weighted_share_run() -> Result<(), String> {
    let heavy = Backend::start("127.0.0.2", "heavy").await;
    let light = Backend::start("127.0.0.3", "light").await;
    let mut cfg = config(&[("web", &[heavy.addr, light.addr])]);
    cfg["services"][0]["endpoints"][0]["weight"] = 9.into();
    let proxy = TestProxy::start("web", cfg).await;
    let started = Instant::now();
    // From one client the light endpoint's count is binomial (n, 0.1): with 3,000
    // requests the 7-13 % band is 5.5 standard deviations wide each way, where 1,000 left
    // 3.2 and a CI run once saw 6.9 % with no stall.
    for (clients, requests) in [(1, 3000), (8, 2000)] {
        let before = (heavy.hits(), light.hits());
        let mut workers = Vec::new();
        for _ in 0..clients {
            let url = proxy.url("/");
            workers.push(tokio::spawn(async move {
                let client = h1_client();
                let mut stalls = Vec::new();
                for _ in 0..requests / clients {
                    let sent = Instant::now();
                    assert_eq!(get(&client, &url).await.0.status(), StatusCode::OK);
                    // Twice the other endpoint's lowest possible estimate by now: the
                    // seed decayed for the time since the proxy started (the client's
                    // latency includes the proxy's, so this errs toward "stalled").
                    let at = sent.duration_since(started).as_secs_f64();
                    let band = Duration::from_millis(60).mul_f64((-at / 10.0).exp());
                    if clients == 1 && sent.elapsed() >= band {
                        stalls.push((sent.elapsed(), at));
                    }
                }
                stalls
            }));
        }
        let mut stalls = Vec::new();
        for w in workers {
            stalls.extend(w.await.unwrap());
        }
        let (h, l) = (heavy.hits() - before.0, light.hits() - before.1);
        assert_eq!(h + l, requests);
        let share = l as f64 / requests as f64;
        if let Some((took, at)) = stalls.first() {
            return Err(format!(
                "{clients} clients: a request took {took:?} at {at:.2} s (light got {:.1} %)",
                share * 100.0
            ));
        }
        // Eight clients' share drifts up under load (14.1 % once, in a CI run sharing
        // the cores with a release build and callgrind): the upper bound is wider there.
        // The bug this guards against gave the light endpoint too little (0 to 7 %).
        let most = if clients == 1 { 0.13 } else { 0.16 };
        assert!(
            (0.07..=most).contains(&share),
            "{clients} clients: light got {:.1} % of {requests}",
            share * 100.0
        );
    }
    Ok(())
}

#[tokio::test]
async fn peak_ewma_steers_away_from_an_endpoint_failing_fast_and_back_once_it_recovers() {
    // "bad" answers 503 at once, "good" answers 200 after 3 ms. On latency alone "bad"
    // looks the faster and got most requests (the test bed's node saw 68-96 %); failures
    // in a row now multiply its estimate, so it gets a few requests, then one probe per
    // ~14 s. No retry policy: every request that reaches "bad" fails at the client.
    let bad = ControlledBackend::start("127.0.0.2", 0).await;
    bad.fail(true);
    let good = Backend::start_slow("127.0.0.3", "good", 3).await;
    let proxy = TestProxy::start("web", config(&[("web", &[bad.addr, good.addr])])).await;
    let client = h1_client();
    let n = 400;
    let mut failed = 0;
    for _ in 0..n {
        let status = get(&client, &proxy.url("/")).await.0.status();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            failed += 1;
        } else {
            assert_eq!(status, StatusCode::OK);
        }
    }
    assert_eq!(failed, bad.hits());
    assert_eq!(good.hits() + bad.hits(), n);
    eprintln!("failing endpoint: {failed} of {n} requests");
    assert!(failed <= n / 20, "the failing endpoint got {failed} of {n}");

    // Recovered, it is tried again once its penalty has decayed below "good"'s estimate:
    // ~14 s after its last probe, ~35 s when that probe multiplied the 30 ms seed
    // (DEFAULT_DECAY × ln(4 × 30 ms / 3 ms)), and never later than the decay from the
    // 1 s cap takes (DEFAULT_DECAY × ln(1 s / 3 ms) ≈ 58 s).
    bad.fail(false);
    let (recovered, before) = (Instant::now(), bad.hits());
    while bad.hits() == before {
        assert!(
            recovered.elapsed() < Duration::from_secs(60),
            "the recovered endpoint got no request in 60 s"
        );
        let status = get(&client, &proxy.url("/")).await.0.status();
        assert_eq!(status, StatusCode::OK);
    }
    eprintln!(
        "recovered endpoint tried again after {:?}",
        recovered.elapsed()
    );
    // One success ends its run of failures: it has a share again, not one probe per 14 s
    // (29 of 100 measured: the two estimates are close and move on DEFAULT_DECAY's scale).
    // Twenty requests within 30 s tell the two apart (one probe per 14 s gives at most
    // three). Counted by time, not in a fixed number of requests: on a loaded machine a
    // slow answer to the probe raises its estimate above "good"'s for a few seconds (a
    // full suite saw 200 requests give it fewer than 20).
    let (since, before, mut sent) = (Instant::now(), bad.hits(), 0);
    while bad.hits() - before < 20 {
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "the recovered endpoint got {} of {sent} requests in 30 s",
            bad.hits() - before
        );
        let status = get(&client, &proxy.url("/")).await.0.status();
        assert_eq!(status, StatusCode::OK);
        sent += 1;
    }
    eprintln!("recovered endpoint: 20 of {sent} requests");
}

#[tokio::test]
async fn endpoint_removed_mid_traffic_loses_no_request() {
    let a = Backend::start("127.0.0.2", "a").await;
    let b = Backend::start("127.0.0.3", "b").await;
    let proxy = TestProxy::start("web", config(&[("web", &[a.addr, b.addr])])).await;
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let url = proxy.url("/");
        let failures = failures.clone();
        let done = done.clone();
        workers.push(tokio::spawn(async move {
            let client = h1_client();
            for _ in 0..100 {
                let req = Request::get(&url)
                    .header("x-delay-ms", "2")
                    .body(full(""))
                    .unwrap();
                match client.request(req).await {
                    Ok(r) if r.status() == StatusCode::OK => {
                        let _ = r.into_body().collect().await;
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    eventually(Duration::from_secs(10), "traffic started", || {
        let d = done.load(Ordering::SeqCst);
        async move { d > 100 }
    })
    .await;
    proxy.apply(config(&[("web", &[a.addr])]));
    let b_at_removal = b.hits();
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::SeqCst), 0);
    assert_eq!(done.load(Ordering::SeqCst), 800);
    assert!(b_at_removal > 0);
    // Requests in flight at the swap may still finish on b; nothing new goes there.
    assert!(
        b.hits() <= b_at_removal + 8,
        "{} > {} + 8",
        b.hits(),
        b_at_removal
    );
}

#[tokio::test]
async fn config_reload_under_load_loses_no_request() {
    let a = Backend::start("127.0.0.2", "a").await;
    let b = Backend::start("127.0.0.3", "b").await;
    let proxy = TestProxy::start("web", config(&[("web", &[a.addr])])).await;
    let failures = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for i in 0..8 {
        let url = proxy.url("/");
        let failures = failures.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let client = if i % 2 == 0 { h1_client() } else { h2_client() };
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) && n < 5000 {
                match client
                    .request(Request::get(&url).body(full("")).unwrap())
                    .await
                {
                    Ok(r) if r.status() == StatusCode::OK => {
                        let _ = r.into_body().collect().await;
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                n += 1;
            }
            n
        }));
    }
    for i in 0..50 {
        let eps: &[_] = match i % 3 {
            0 => &[b.addr],
            1 => &[a.addr, b.addr],
            _ => &[a.addr],
        };
        let mut cfg = config(&[("web", eps)]);
        cfg["version"] = format!("v{i}").into();
        if i % 2 == 0 {
            cfg["services"][0]["balancer"] = "roundRobin".into();
        }
        proxy.apply(cfg);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for w in workers {
        total += w.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::SeqCst), 0, "of {total} requests");
    assert!(total > 100, "only {total} requests");
    assert!(a.hits() > 0 && b.hits() > 0);
    assert_eq!(proxy.proxy.store.load().unwrap().version, "v49");
}

#[tokio::test]
async fn metrics_count_requests_errors_and_connections() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let proxy = TestProxy::start("web", config(&[("web", &[backend.addr]), ("empty", &[])])).await;
    let client = h1_client();
    for _ in 0..3 {
        get(&client, &proxy.url("/")).await;
    }
    let text = proxy.proxy.metrics.encode().unwrap();
    for needle in [
        r#"weft_requests_total{direction="outbound",service="web"} 3"#,
        r#"weft_responses_total{direction="outbound",service="web",status_class="2xx"} 3"#,
        r#"weft_request_duration_seconds_count{direction="outbound",service="web"} 3"#,
        r#"weft_service_endpoints{service="web"} 1"#,
        r#"weft_service_endpoints{service="empty"} 0"#,
        r#"weft_tcp_connections_opened_total{direction="outbound"} 1"#,
        r#"weft_config_generation 1"#,
        r#"weft_config_info{version="1"} 1"#,
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    assert!(text.contains(r#"weft_tcp_read_bytes_total{direction="outbound"}"#));
}

#[tokio::test]
async fn request_lines_ended_by_a_bare_lf_or_naming_another_http_version_take_the_http_path() {
    let app = Scripted::ok("127.0.0.2", "a").await;
    let proxy = TestProxy::start("web", config(&[("web", &[app.addr])])).await;
    let requests = || {
        let text = proxy.proxy.metrics.encode().unwrap();
        text.lines()
            .find(|l| l.starts_with(r#"weft_requests_total{direction="outbound",service="web"}"#))
            .map(|l| l.rsplit(' ').next().unwrap().to_string())
            .unwrap_or_default()
    };
    // Bare LFs (RFC 9112 §2.2 lets a recipient accept them, as hyper and most servers
    // do): proxied as HTTP, not passed through as opaque bytes after the detect timeout.
    let mut c = connect(proxy.addr).await;
    c.write_all(b"GET /bare HTTP/1.1\nhost: web\n\n")
        .await
        .unwrap();
    let head = read_head(&mut c).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(app.last().target, "/bare");
    assert_eq!(requests(), "1", "counted as an HTTP request");
    // A version the proxy does not serve is refused by the proxy, not handed to the
    // application past every HTTP rule.
    for version in ["HTTP/1.2", "HTTP/2.0"] {
        let mut c = connect(proxy.addr).await;
        c.write_all(format!("GET /v {version}\r\nhost: web\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let head = read_head(&mut c).await;
        assert!(head.starts_with("http/1.1 400"), "{version}: {head}");
    }
    assert_eq!(
        app.connections(),
        1,
        "the application saw only the first request"
    );
    let text = proxy.proxy.metrics.encode().unwrap();
    assert!(
        text.contains(r#"weft_errors_total{direction="outbound",reason="invalid_request"} 2"#),
        "refused by the proxy: {text}"
    );
}

/// An application that answers every request `413` at once, without reading its body,
/// stops writing, and closes half a second later, as a server that refuses an upload
/// does.
#[allow(clippy::unwrap_used)] // a test that cannot set up fails here
async fn early_refuser() -> (std::net::SocketAddr, Task) {
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = Task(tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request_head(&mut s).await.is_some() {
                    let _ = s
                        .write_all(b"HTTP/1.1 413 Payload Too Large\r\nconnection: close\r\ncontent-length: 3\r\n\r\nbig")
                        .await;
                    let _ = s.shutdown().await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            });
        }
    }));
    (addr, task)
}

#[tokio::test]
async fn an_early_answer_to_an_upload_reaches_the_client_that_is_still_sending() {
    let (app, _app) = early_refuser().await;
    let proxy = TestProxy::start("web", config(&[("web", &[app])])).await;
    let c = connect(proxy.addr).await;
    let (mut rd, mut wr) = c.into_split();
    // The client sends its 64 MiB as fast as it can and reads only afterwards, as
    // a client that does not watch for an early answer does. The proxy, which closes
    // the connection after the answer, must not reset it while bytes are arriving:
    // a reset would destroy the answer before the client reads it. (hyper's server
    // gets this right; this pins it.)
    let writer = tokio::spawn(async move {
        let _ = wr
            .write_all(b"POST /upload HTTP/1.1\r\nhost: web\r\ncontent-length: 67108864\r\n\r\n")
            .await;
        let chunk = vec![b'x'; 65536];
        for _ in 0..1024 {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
        wr
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut answer))
        .await
        .expect("the proxy closes within 5 s");
    let text = String::from_utf8_lossy(&answer);
    assert!(read.is_ok(), "{read:?}, after {text:?}");
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.ends_with("big"), "{text}");
    drop(writer);
}

#[tokio::test]
async fn an_upstream_that_answers_garbage_is_502_upstream_failed() {
    // A port that does not speak HTTP: it reads the request and answers with nonsense.
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _server = Task(tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"SSH-2.0-not-http\r\n\r\n").await;
        }
    }));
    let proxy = TestProxy::start("web", config(&[("web", &[addr])])).await;
    let resp = h1_client()
        .request(Request::get(proxy.url("/")).body(full("")).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(resp.headers()["weft-error"], "upstream_failed");
}

#[tokio::test]
async fn connect_timeout_is_504() {
    let (addr, listener, _held) = hanging_addr("127.0.0.6").await;
    let mut cfg = config(&[("web", &[addr])]);
    cfg["services"][0]["connectTimeout"] = "150ms".into();
    let proxy = TestProxy::start("web", cfg).await;
    let start = Instant::now();
    let (resp, _) = get(&h1_client(), &proxy.url("/")).await;
    assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(header(&resp, "weft-error"), "connect_timeout");
    assert!(start.elapsed() < Duration::from_secs(1));
    drop(listener);
}

#[tokio::test]
async fn shutdown_keeps_outbound_serving_until_inbound_has_drained() {
    use weft_proxy::{Proxy, server::ListenerKind, shutdown};
    let slow = Backend::start_slow("127.0.0.2", "slow", 600).await;
    let fast = Backend::start("127.0.0.3", "fast").await;
    let proxy = Proxy::new();
    proxy
        .store
        .apply(
            serde_json::from_value(config(&[("in", &[slow.addr]), ("out", &[fast.addr])])).unwrap(),
        )
        .unwrap();
    let l_in = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let l_out = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (in_addr, out_addr) = (l_in.local_addr().unwrap(), l_out.local_addr().unwrap());
    let mut inbound = shutdown::ListenerGroup::new();
    inbound.spawn(l_in, ListenerKind::Forward(Arc::from("in")), proxy.clone());
    let mut outbound = shutdown::ListenerGroup::new();
    outbound.spawn(
        l_out,
        ListenerKind::Forward(Arc::from("out")),
        proxy.clone(),
    );

    let in_flight =
        tokio::spawn(async move { get(&h1_client(), &format!("http://{in_addr}/")).await });
    eventually(
        Duration::from_secs(5),
        "slow request reached its backend",
        || {
            let n = slow.hits();
            async move { n == 1 }
        },
    )
    .await;
    let p = proxy.clone();
    let drain = tokio::spawn(async move {
        shutdown::drain(&p, inbound, outbound, Duration::from_secs(10)).await
    });
    eventually(
        Duration::from_secs(5),
        "inbound stopped accepting",
        || async move { tokio::net::TcpStream::connect(in_addr).await.is_err() },
    )
    .await;
    assert!(proxy.draining.is_cancelled());
    // The application can still call out while inbound drains.
    let (resp, body) = get(&h1_client(), &format!("http://{out_addr}/")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body, "hello from fast");
    assert!(!drain.is_finished());
    // The accepted inbound request is answered, then everything stops.
    let (resp, body) = in_flight.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body, "hello from slow");
    assert!(
        tokio::time::timeout(Duration::from_secs(5), drain)
            .await
            .unwrap()
            .unwrap()
    );
    assert!(tokio::net::TcpStream::connect(out_addr).await.is_err());
}

#[tokio::test]
async fn a_service_missing_from_the_config_is_503_service_not_found() {
    let backend = Backend::start("127.0.0.2", "a").await;
    let proxy = TestProxy::start("web", config(&[("web", &[backend.addr])])).await;
    let client = h1_client();
    assert_eq!(
        get(&client, &proxy.url("/")).await.0.status(),
        StatusCode::OK
    );
    // The forward listener's service disappears from the config.
    proxy.apply(config(&[("other", &[backend.addr])]));
    let (resp, _) = get(&client, &proxy.url("/")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&resp, "weft-error"), "service_not_found");
    // A new connection gets the same honest answer.
    let (resp, _) = get(&h1_client(), &proxy.url("/")).await;
    assert_eq!(header(&resp, "weft-error"), "service_not_found");
}

/// A raw HTTP/1.1 backend that counts accepted connections and answers each request with
/// `ok`; with `close_after_each`, it closes the connection after every response without
/// saying so (as a server whose keep-alive timeout fires between requests does).
#[allow(clippy::unwrap_used)]
async fn counting_h1_backend(
    close_after_each: bool,
) -> (std::net::SocketAddr, Arc<AtomicUsize>, Task) {
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(resp).await.is_err() || close_after_each {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, accepted, Task(task))
}

#[tokio::test]
async fn http1_upstream_connections_are_reused() {
    let (addr, accepted, _backend) = counting_h1_backend(false).await;
    let proxy = TestProxy::start("web", config(&[("web", &[addr])])).await;
    let client = h1_client();
    for _ in 0..5 {
        let (resp, body) = get(&client, &proxy.url("/")).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body, "ok");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_upstream_closing_idle_connections_costs_no_request() {
    let (addr, accepted, _backend) = counting_h1_backend(true).await;
    let proxy = TestProxy::start("web", config(&[("web", &[addr])])).await;
    let client = h1_client();
    for _ in 0..5 {
        let (resp, body) = get(&client, &proxy.url("/")).await;
        assert_eq!(resp.status(), StatusCode::OK, "{body}");
        assert_eq!(body, "ok");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 5);
}

#[tokio::test]
#[allow(clippy::unwrap_used)]
async fn http2_requests_share_one_upstream_connection_and_survive_its_loss() {
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let (kill_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let kill = kill_tx.clone();
    let _backend = Task(tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let mut killed = kill.subscribe();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(http::Response::new(full("ok")))
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = killed.recv() => {}
                }
            });
        }
    }));
    let proxy = TestProxy::start("web", config(&[("web", &[addr])])).await;
    let client = h2_client();
    let send_all = || async {
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let client = client.clone();
            let url = proxy.url("/");
            tasks.push(tokio::spawn(async move { get(&client, &url).await }));
        }
        for t in tasks {
            let (resp, body) = t.await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "{body}");
            assert_eq!(body, "ok");
        }
    };
    send_all().await;
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // The upstream connection drops; the next requests get a new one.
    kill_tx.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    send_all().await;
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_upgrade_in_flight_when_draining_begins_completes_and_is_drained() {
    use weft_proxy::{Proxy, server::ListenerKind, shutdown};
    let backend = Backend::start("127.0.0.2", "a").await;
    let proxy = Proxy::new();
    proxy
        .store
        .apply(serde_json::from_value(config(&[("web", &[backend.addr])])).unwrap())
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut inbound = shutdown::ListenerGroup::new();
    inbound.spawn(
        listener,
        ListenerKind::Forward(Arc::from("web")),
        proxy.clone(),
    );

    // The backend answers the upgrade only after 300 ms; draining begins meanwhile.
    let mut s = connect(addr).await;
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: echo\r\nx-delay-ms: 300\r\n\r\n",
    )
    .await
    .unwrap();
    eventually(
        Duration::from_secs(5),
        "upgrade reached the backend",
        || {
            let n = backend.hits();
            async move { n == 1 }
        },
    )
    .await;
    let p = proxy.clone();
    let drain = tokio::spawn(async move {
        shutdown::drain(
            &p,
            inbound,
            shutdown::ListenerGroup::new(),
            Duration::from_secs(10),
        )
        .await
    });
    let head = read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    echo_roundtrip(&mut s, b"switched while draining").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!drain.is_finished(), "drain finished with a tunnel open");
    echo_roundtrip(&mut s, b"still open").await;
    drop(s);
    let drained = tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .expect("drained once the tunnel closed")
        .unwrap();
    assert!(drained);
}

#[tokio::test]
async fn a_forward_listener_before_the_first_config_answers_503_service_not_found() {
    use weft_proxy::{Proxy, server::ListenerKind};
    let proxy = Proxy::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _serve = Task(tokio::spawn(weft_proxy::server::serve(
        listener,
        ListenerKind::Forward(Arc::from("web")),
        proxy.clone(),
        shutdown.clone(),
    )));
    // Not a silent close: the client learns why, as when the service is missing.
    let (resp, _) = get(&h1_client(), &format!("http://{addr}/")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&resp, "weft-error"), "service_not_found");
}

/// How one connection of a [`closing_app`] behaves: it answers `answered` requests
/// (`200`, keep-alive), then, at the next request's head, closes without answering (with
/// a reset when `reset`, as an application killed mid-request does); or, with `idle`,
/// closes once no request has come for that long (an application's keep-alive timeout).
/// Its answers carry `keep_alive` as their `Keep-Alive` field, if given.
#[derive(Clone, Copy, Default)]
struct Closes {
    answered: usize,
    reset: bool,
    idle: Option<Duration>,
    keep_alive: Option<&'static str>,
}

/// Waits until `seen` (what a [`closing_app`] read) holds `n` entries.
async fn until_seen(seen: &std::sync::Mutex<Vec<(usize, String)>>, n: usize, what: &str) {
    eventually(Duration::from_secs(5), what, || async {
        seen.lock().unwrap_or_else(|p| p.into_inner()).len() == n
    })
    .await;
}

/// An HTTP/1 application on 127.0.0.1 whose connections behave, in the order accepted, as
/// `script` says (later ones answer everything); it records each request line it read,
/// with the number of the connection that read it.
async fn closing_app(
    script: Vec<Closes>,
) -> (
    std::net::SocketAddr,
    Arc<std::sync::Mutex<Vec<(usize, String)>>>,
    Task,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local address: {e}"));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let task = tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut s, _)) = listener.accept().await {
            let how = script.get(n).copied().unwrap_or(Closes {
                answered: usize::MAX,
                ..Closes::default()
            });
            let (conn, log) = (n, log.clone());
            n += 1;
            tokio::spawn(async move {
                let mut answered = 0;
                loop {
                    let head = match how.idle.filter(|_| answered == how.answered) {
                        Some(idle) => {
                            match tokio::time::timeout(idle, read_request_head(&mut s)).await {
                                Ok(head) => head,
                                Err(_) => {
                                    // Logged once the proxy has closed its end too, so the
                                    // proxy has seen the close when the test goes on.
                                    let _ = s.shutdown().await;
                                    let mut rest = [0u8; 64];
                                    let _ = tokio::time::timeout(
                                        Duration::from_secs(5),
                                        s.read(&mut rest),
                                    )
                                    .await;
                                    log.lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .push((conn, "closed idle".to_owned()));
                                    return;
                                }
                            }
                        }
                        None => read_request_head(&mut s).await,
                    };
                    let Some(head) = head else {
                        return;
                    };
                    let line = head.lines().next().unwrap_or("").to_owned();
                    log.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((conn, line.clone()));
                    if answered == how.answered {
                        if how.reset {
                            let _ = s.set_zero_linger();
                        }
                        return;
                    }
                    answered += 1;
                    let keep_alive = how
                        .keep_alive
                        .map(|v| format!("keep-alive: {v}\r\n"))
                        .unwrap_or_default();
                    let body = if line.starts_with("head ") { "" } else { "ok" };
                    let answer =
                        format!("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n{keep_alive}\r\n{body}");
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen, Task(task))
}

/// Sends a request for service `web` through `proxy`, with an `Idempotency-Key` when
/// `key`; its status and `weft-error` field. No answer carries `Keep-Alive`, a hop-by-hop
/// field.
async fn to_web(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Body,
    >,
    proxy: &TestProxy,
    method: &str,
    path: &str,
    body: &'static str,
    key: bool,
) -> (u16, Option<String>) {
    let mut req = Request::builder()
        .method(method)
        .uri(proxy.url(path))
        .header("host", "web");
    if key {
        req = req.header("idempotency-key", "order-7");
    }
    let req = req
        .body(full(body))
        .unwrap_or_else(|e| panic!("request: {e}"));
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within 10 s"))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    assert!(
        !resp.headers().contains_key("keep-alive"),
        "{method} {path}"
    );
    let error = resp
        .headers()
        .get("weft-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (resp.status().as_u16(), error)
}

/// Asserts what a [`closing_app`] read: each request line, by the connection that read it.
fn assert_seen(seen: &std::sync::Mutex<Vec<(usize, String)>>, expected: &[(usize, &str)]) {
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let seen: Vec<(usize, &str)> = seen.iter().map(|(c, l)| (*c, l.as_str())).collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn a_safe_request_whose_kept_alive_connection_closed_unanswered_is_sent_again() {
    let close = |answered, reset| Closes {
        answered,
        reset,
        ..Closes::default()
    };
    let (app, seen, _app) = closing_app(vec![
        close(1, false), // /a; closes at /b, the first time
        close(1, true),  // /b2; resets at HEAD /c
        close(1, false), // HEAD /c again; closes at POST /d
        close(1, false), // /e; closes at PUT /f
        close(0, false), // closes at /g, its first request
        close(1, false), // /h; closes at the keyed POST /i
    ])
    .await;
    let proxy = TestProxy::start("web", config(&[("web", &[app])])).await;
    let client = h1_client();
    let send = |method, path, body, key| to_web(&client, &proxy, method, path, body, key);
    let ok = (200, None);
    let failed = (502, Some("upstream_failed".to_owned()));
    assert_eq!(send("GET", "/a", "", false).await, ok);
    // The first time the application closes a kept-alive connection under a request, the
    // proxy kept no copy of it: a well-behaved application never does.
    assert_eq!(send("GET", "/b", "", false).await, failed);
    assert_eq!(send("GET", "/b2", "", false).await, ok);
    // From then on, a GET or HEAD whose kept-alive connection was reset (or closed)
    // under it goes out again on a new connection, and the client sees only the answer.
    assert_eq!(send("HEAD", "/c", "", false).await, ok);
    // A request with a body, or with a method that may have side effects, does not.
    assert_eq!(send("POST", "/d", "x", false).await, failed);
    assert_eq!(send("GET", "/e", "", false).await, ok);
    assert_eq!(send("PUT", "/f", "", false).await, failed);
    // A new connection closing unanswered is the application's failure, not a race.
    assert_eq!(send("GET", "/g", "", false).await, failed);
    // An idempotency key makes a bodiless POST safe to repeat.
    assert_eq!(send("GET", "/h", "", false).await, ok);
    assert_eq!(send("POST", "/i", "", true).await, ok);
    assert_seen(
        &seen,
        &[
            (0, "get /a http/1.1"),
            (0, "get /b http/1.1"),
            (1, "get /b2 http/1.1"),
            (1, "head /c http/1.1"),
            (2, "head /c http/1.1"),
            (2, "post /d http/1.1"),
            (3, "get /e http/1.1"),
            (3, "put /f http/1.1"),
            (4, "get /g http/1.1"),
            (5, "get /h http/1.1"),
            (5, "post /i http/1.1"),
            (6, "post /i http/1.1"),
        ],
    );
    // The two requests sent again, HEAD /c and POST /i, are counted, and nothing else is:
    // no request here was found closed under before it was written.
    let resends = |reason: &str| {
        let reason = format!("reason=\"{reason}\"");
        proxy.metric(
            "weft_upstream_resends_total",
            &["direction=\"outbound\"", &reason],
        )
    };
    assert_eq!((resends("unanswered"), resends("unwritten")), (2, 0));
    assert_eq!(
        proxy.metric("weft_upstream_resends_total", &["direction=\"inbound\""]),
        0
    );
}

/// A connection whose server announced its idle timeout (`Keep-Alive: timeout=2`, as
/// Node.js and Apache do) is not sent on once it has been idle that long less a margin
/// (here 1 s), so no request, safe to repeat or not, meets the server's close; a server
/// that announces nothing has its connection kept for the pool's idle timeout.
#[tokio::test]
async fn a_connection_idle_for_the_timeout_its_server_announced_is_not_sent_on() {
    let (app, seen, _app) = closing_app(vec![
        Closes {
            answered: usize::MAX,
            keep_alive: Some("timeout=2"),
            ..Closes::default()
        },
        Closes {
            answered: usize::MAX,
            ..Closes::default()
        },
    ])
    .await;
    let proxy = TestProxy::start("web", config(&[("web", &[app])])).await;
    let client = h1_client();
    let post = |path| to_web(&client, &proxy, "POST", path, "", false);
    assert_eq!(post("/a").await, (200, None));
    assert_eq!(post("/a2").await, (200, None));
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert_eq!(post("/b").await, (200, None));
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert_eq!(post("/c").await, (200, None));
    assert_seen(
        &seen,
        &[
            (0, "post /a http/1.1"),
            (0, "post /a2 http/1.1"),
            (1, "post /b http/1.1"),
            (1, "post /c http/1.1"),
        ],
    );
}

/// An endpoint seen closing a connection idle 1.2 s, a keep-alive timeout it never
/// announced (gunicorn's 2 s, say), has its connections sent on only while idle less than
/// that less the margin (here 0.6 s): a `POST` after 0.9 s idle goes on a new connection
/// rather than into the endpoint's close, while one right after still reuses.
#[tokio::test]
async fn an_endpoint_seen_closing_idle_connections_has_its_idle_timeout_learnt() {
    let (app, seen, _app) = closing_app(vec![Closes {
        answered: 1,
        idle: Some(Duration::from_millis(1_200)),
        ..Closes::default()
    }])
    .await;
    let proxy = TestProxy::start("web", config(&[("web", &[app])])).await;
    let client = h1_client();
    let post = |path| to_web(&client, &proxy, "POST", path, "", false);
    assert_eq!(post("/a").await, (200, None));
    until_seen(&seen, 2, "the idle close").await;
    assert_eq!(post("/b").await, (200, None));
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(post("/c").await, (200, None));
    assert_eq!(post("/d").await, (200, None));
    assert_seen(
        &seen,
        &[
            (0, "post /a http/1.1"),
            (0, "closed idle"),
            (1, "post /b http/1.1"),
            (2, "post /c http/1.1"),
            (2, "post /d http/1.1"),
        ],
    );
}

/// An endpoint that closes idle kept-alive connections by itself (a keep-alive timeout
/// shorter than the proxy's) is known for it before it ever closes one under a request: the
/// first safe request caught by that race goes out again, rather than failing.
#[tokio::test]
async fn an_endpoint_seen_closing_idle_connections_has_its_first_race_sent_again() {
    let (app, seen, _app) = closing_app(vec![
        Closes {
            answered: 1,
            idle: Some(Duration::from_millis(50)),
            ..Closes::default()
        }, // /a; then closes idle
        Closes {
            answered: 1,
            ..Closes::default()
        }, // /b; closes at /c
    ])
    .await;
    let proxy = TestProxy::start("web", config(&[("web", &[app])])).await;
    let client = h1_client();
    let get = |path| to_web(&client, &proxy, "GET", path, "", false);
    assert_eq!(get("/a").await, (200, None));
    // The application's keep-alive timeout closes the proxy's pooled connection.
    until_seen(&seen, 2, "the idle close").await;
    assert_eq!(get("/b").await, (200, None));
    assert_eq!(get("/c").await, (200, None));
    assert_seen(
        &seen,
        &[
            (0, "get /a http/1.1"),
            (0, "closed idle"),
            (1, "get /b http/1.1"),
            (1, "get /c http/1.1"),
            (2, "get /c http/1.1"),
        ],
    );
    assert_eq!(
        proxy.metric(
            "weft_upstream_resends_total",
            &["direction=\"outbound\"", "reason=\"unanswered\""]
        ),
        1
    );
}
