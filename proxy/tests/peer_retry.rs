//! A request the peer proxy never handed to its application (its connect to the
//! application failed) is sent to another endpoint, as a request whose own connect failed
//! is: in process on loopback, a client sidecar (forward listener) → server sidecars
//! (inbound listeners, mutual TLS with certificates from a test CA) → backends.
//!
//! The signal is `weft-unsent`: trusted only over mutual TLS from a meshed endpoint, set by
//! an inbound proxy on its own answers only, and never seen by an application.
//!
//! A request whose HTTP/2 stream the upstream did not process (`REFUSED_STREAM`, or left
//! out by a `GOAWAY`) is sent elsewhere the same way, whether the upstream is the proxy's
//! own or the peer proxy's application.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::ca::Ca;
use support::*;
use tokio::net::TcpListener;
use weft_proxy::{
    LocalPorts, Proxy,
    identity::{IdentityStore, Inner},
    limits::Limits,
    server::{BeforeConfig, ListenerKind},
};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const UNSENT: &str = "weft-unsent";

fn proxy_with(identity: Arc<IdentityStore>) -> Arc<Proxy> {
    Proxy::with_identity(
        Limits::default(),
        BeforeConfig::default(),
        LocalPorts::default(),
        Some(identity),
    )
}

/// A server sidecar (identity [`SERVER_ID`]): an inbound listener in front of `app`.
fn server_sidecar(ca: &Ca, app: SocketAddr) -> TestProxy {
    TestProxy::start_kind(
        proxy_with(ca.store(SERVER_ID)),
        ListenerKind::InboundTo(app),
        config(&[]),
    )
}

/// A client sidecar (identity [`CLIENT_ID`]) for service `web`, whose endpoints take turns
/// (round robin, in this order); an endpoint with `meshed` is expected to be
/// [`SERVER_ID`], the others are plain text.
fn client_sidecar(ca: &Ca, endpoints: &[(SocketAddr, bool)]) -> TestProxy {
    TestProxy::start_kind(
        proxy_with(ca.store(CLIENT_ID)),
        ListenerKind::Forward(Arc::from("web")),
        client_config(endpoints),
    )
}

fn client_config(endpoints: &[(SocketAddr, bool)]) -> serde_json::Value {
    let addrs: Vec<SocketAddr> = endpoints.iter().map(|(a, _)| *a).collect();
    let mut c = config(&[("web", &addrs)]);
    c["services"][0]["balancer"] = "roundRobin".into();
    for (i, (_, meshed)) in endpoints.iter().enumerate() {
        if *meshed {
            c["services"][0]["endpoints"][i]["identity"] = SERVER_ID.into();
        }
    }
    c
}

/// The client sidecar's config with a Route whose one rule retries failed connects only
/// (not 5xx responses), so that it keeps a copy of every small request.
fn with_connect_retries(ca: &Ca, endpoints: &[(SocketAddr, bool)]) -> TestProxy {
    let client = client_sidecar(ca, endpoints);
    let mut cfg = client_config(endpoints);
    cfg["services"][0]["route"] = serde_json::json!({"name": "shop/web", "rules": [{
        "retries": {"attempts": 2, "retryOn": ["connect-failure"],
                    "backoff": {"base": "1ms", "max": "1ms"}}
    }]});
    client.apply(cfg);
    client
}

/// The connect failures an inbound proxy answered for itself.
fn inbound_connect_failures(p: &TestProxy) -> u64 {
    p.metric(
        "weft_errors_total",
        &["direction=\"inbound\"", "reason=\"connect_failed\""],
    )
}

/// Sends `req` through `client`; the response's head and body.
async fn send(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Body,
    >,
    req: http::Request<Body>,
) -> (http::response::Parts, String) {
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("response within 10s")
        .expect("response");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts, String::from_utf8_lossy(&bytes).into_owned())
}

/// A request body of unknown length (HTTP/1: chunked), already complete.
fn streamed(parts: &'static [&'static str]) -> Body {
    let frames = parts.iter().map(|c| {
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from_static(
            c.as_bytes(),
        )))
    });
    http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed()
}

/// An application that answers every request as a proxy that never sent it would: 502,
/// `weft-error: connect_failed` and `weft-unsent: 1`. Returns its address and the
/// requests it received.
async fn forger() -> (SocketAddr, Arc<AtomicUsize>, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let hits = h.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(502)
                                .header("weft-error", "connect_failed")
                                .header(UNSENT, "1")
                                .body(full("forged"))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, hits, Task(task))
}

#[tokio::test]
async fn a_bodiless_request_the_peer_never_sent_goes_to_another_endpoint() {
    let ca = Ca::new("mesh root");
    let live = Scripted::ok("127.0.0.1", "cart").await;
    let dead = server_sidecar(&ca, refused_addr("127.0.0.1").await);
    let alive = server_sidecar(&ca, live.addr);
    // Round robin from the dead endpoint: every first attempt goes to it.
    let client = client_sidecar(&ca, &[(dead.addr, true), (alive.addr, true)]);

    let mut sent = 0;
    for c in [h1_client(), h2_client()] {
        for method in [http::Method::GET, http::Method::POST] {
            for _ in 0..3 {
                let req = http::Request::builder()
                    .method(method.clone())
                    .uri(client.url("/items"))
                    .body(full(""))
                    .unwrap();
                let (resp, body) = send(&c, req).await;
                assert_eq!(resp.status, 200, "{method}: {body} {:?}", resp.headers);
                assert_eq!(body, "hello from cart");
                assert!(resp.headers.get(UNSENT).is_none());
                sent += 1;
            }
        }
    }
    // Each request reached the application once, after one attempt the peer never sent.
    assert_eq!(live.requests(), sent);
    assert_eq!(inbound_connect_failures(&dead), sent as u64);
    // Counted as the retries of local connect failures are.
    assert_eq!(
        client.metric(
            "weft_errors_total",
            &["direction=\"outbound\"", "reason=\"connect_failed\""]
        ),
        sent as u64
    );

    // A streamed body is not kept, so a request with one that the dead endpoint gets
    // fails as before; the others (taking turns) succeed.
    let c = h1_client();
    let mut failed = 0;
    for _ in 0..4 {
        let req = http::Request::post(client.url("/upload"))
            .body(streamed(&["part one, ", "part two"]))
            .unwrap();
        let (resp, body) = send(&c, req).await;
        assert!(resp.headers.get(UNSENT).is_none());
        if resp.status == 502 {
            assert_eq!(resp.headers["weft-error"], "connect_failed", "{body}");
            failed += 1;
        } else {
            assert_eq!(resp.status, 200, "{body}");
        }
    }
    assert_eq!(
        failed, 2,
        "every other streamed request went to the dead endpoint"
    );
    assert_eq!(live.requests(), sent + 2);
    assert_eq!(inbound_connect_failures(&dead), sent as u64 + 2);

    // A plain-text client of the server sidecar gets its answer without the signal, which
    // only a peer proxy over mutual TLS would trust.
    let (resp, _) = get(&h1_client(), &dead.url("/items")).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(header(&resp, "weft-error"), "connect_failed");
    assert_eq!(header(&resp, UNSENT), "");
}

#[tokio::test]
async fn a_request_whose_body_a_retry_policy_copied_is_sent_again_whole() {
    let ca = Ca::new("mesh root");
    let live = Scripted::ok("127.0.0.1", "cart").await;
    let dead = server_sidecar(&ca, refused_addr("127.0.0.1").await);
    let alive = server_sidecar(&ca, live.addr);
    let client = with_connect_retries(&ca, &[(dead.addr, true), (alive.addr, true)]);

    let c = h1_client();
    for i in 0..4 {
        let req = http::Request::post(client.url("/orders"))
            .body(full(format!("order {i}")))
            .unwrap();
        let (resp, body) = send(&c, req).await;
        assert_eq!(resp.status, 200, "{body}");
        assert_eq!(live.last().body, format!("order {i}"));
    }
    assert_eq!(
        live.requests(),
        4,
        "each order reached the application once"
    );
    assert!(inbound_connect_failures(&dead) >= 1);
}

#[tokio::test]
async fn retries_of_requests_the_peer_never_sent_stop_where_connect_retries_do() {
    let ca = Ca::new("mesh root");
    let mut dead = Vec::new();
    for _ in 0..4 {
        dead.push(server_sidecar(&ca, refused_addr("127.0.0.1").await));
    }
    let endpoints: Vec<(SocketAddr, bool)> = dead.iter().map(|d| (d.addr, true)).collect();
    let client = client_sidecar(&ca, &endpoints);

    let (resp, body) = get(&h1_client(), &client.url("/")).await;
    assert_eq!(resp.status(), 502, "{body}");
    assert_eq!(header(&resp, "weft-error"), "connect_failed");
    assert_eq!(header(&resp, UNSENT), "");
    // Without a retry policy: the first attempt and two retries, on three endpoints.
    let attempts: Vec<u64> = dead.iter().map(inbound_connect_failures).collect();
    assert_eq!(attempts.iter().sum::<u64>(), 3, "{attempts:?}");
    assert!(attempts.iter().all(|&n| n <= 1), "{attempts:?}");
}

/// Sends 4 requests through `client`: how many got the forging application's own 502
/// (the rest must be 200), none of them carrying the signal.
async fn forged_refusals(c: &Client<HttpConnector, Body>, client: &TestProxy) -> usize {
    let mut refused = 0;
    for _ in 0..4 {
        let (resp, body) = get(c, &client.url("/pay")).await;
        assert_eq!(header(&resp, UNSENT), "", "the signal reached the client");
        if resp.status() == 502 {
            assert_eq!(body, "forged");
            refused += 1;
        } else {
            assert_eq!(resp.status(), 200, "{body}");
        }
    }
    refused
}

#[tokio::test]
async fn an_application_cannot_ask_for_a_retry_through_its_proxy() {
    let ca = Ca::new("mesh root");
    let (forging, forged, _task) = forger().await;
    let live = Scripted::ok("127.0.0.1", "cart").await;
    let forger_sidecar = server_sidecar(&ca, forging);
    let alive = server_sidecar(&ca, live.addr);
    let client = client_sidecar(&ca, &[(forger_sidecar.addr, true), (alive.addr, true)]);

    let c = h1_client();
    let refused = forged_refusals(&c, &client).await;
    // The application's 502s were its answers: each request was delivered once.
    assert_eq!(refused, 2);
    assert_eq!(forged.load(Ordering::SeqCst), 2);
    assert_eq!(live.requests(), 2);
    // The server sidecar removes the header from its application's responses, whoever
    // the client is.
    let (resp, _) = get(&c, &forger_sidecar.url("/pay")).await;
    assert_eq!(resp.status(), 502);
    assert_eq!(header(&resp, UNSENT), "");
}

#[tokio::test]
async fn a_plain_text_endpoint_cannot_ask_for_a_retry() {
    let ca = Ca::new("mesh root");
    let (forging, forged, _task) = forger().await;
    let live = Scripted::ok("127.0.0.1", "cart").await;
    let endpoints = [(forging, false), (live.addr, false)];
    // Without a Route, and with one whose retry policy keeps a copy of each request.
    for client in [
        client_sidecar(&ca, &endpoints),
        with_connect_retries(&ca, &endpoints),
    ] {
        let (forged_before, live_before) = (forged.load(Ordering::SeqCst), live.requests());
        let refused = forged_refusals(&h1_client(), &client).await;
        // Every request was delivered once: the 502s are the application's own.
        assert!(refused >= 1);
        assert_eq!(forged.load(Ordering::SeqCst) - forged_before, refused);
        assert_eq!(live.requests() - live_before, 4 - refused);
    }
}

/// The answers an inbound proxy gave for itself with `code`.
fn inbound_errors(p: &TestProxy, code: &str) -> u64 {
    p.metric(
        "weft_errors_total",
        &["direction=\"inbound\"", &format!("reason=\"{code}\"")],
    )
}

/// The retries the client sidecar counted for the peer's reason `code`.
fn outbound_errors(p: &TestProxy, code: &str) -> u64 {
    p.metric(
        "weft_errors_total",
        &["direction=\"outbound\"", &format!("reason=\"{code}\"")],
    )
}

#[tokio::test]
async fn a_request_whose_peer_timed_out_connecting_goes_to_another_endpoint() {
    let ca = Ca::new("mesh root");
    let live = Scripted::ok("127.0.0.1", "cart").await;
    // The server sidecar gives up connecting to its application after 200 ms.
    let (hung, _guard) = hung_sidecar(&ca, "200ms").await;
    let alive = server_sidecar(&ca, live.addr);
    let client = client_sidecar(&ca, &[(hung.addr, true), (alive.addr, true)]);

    // What the hung endpoint answers by itself (to a plain-text client: no signal).
    let started = std::time::Instant::now();
    let (resp, _) = get(&h1_client(), &hung.url("/items")).await;
    assert_eq!(resp.status(), 504);
    assert_eq!(header(&resp, "weft-error"), "connect_timeout");
    assert_eq!(header(&resp, UNSENT), "");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let before = inbound_errors(&hung, "connect_timeout");
    assert_eq!(before, 1);

    let mut sent = 0;
    for c in [h1_client(), h2_client()] {
        for method in [http::Method::GET, http::Method::DELETE] {
            let req = http::Request::builder()
                .method(method.clone())
                .uri(client.url("/items"))
                .body(full(""))
                .unwrap();
            let started = std::time::Instant::now();
            let (resp, body) = send(&c, req).await;
            assert_eq!(resp.status, 200, "{method}: {body} {:?}", resp.headers);
            assert_eq!(body, "hello from cart");
            assert!(resp.headers.get(UNSENT).is_none());
            // One connect timeout at the peer, then the other endpoint.
            let took = started.elapsed();
            assert!(took >= Duration::from_millis(190), "{method}: {took:?}");
            assert!(took < Duration::from_secs(2), "{method}: {took:?}");
            sent += 1;
        }
    }
    // Each request reached an application once, after the peer's connect timed out.
    assert_eq!(live.requests(), sent);
    assert_eq!(
        inbound_errors(&hung, "connect_timeout") - before,
        sent as u64
    );
    // The client sidecar counts the retry with the peer's reason.
    assert_eq!(outbound_errors(&client, "connect_timeout"), sent as u64);
    assert_eq!(outbound_errors(&client, "connect_failed"), 0);
}

#[tokio::test]
async fn a_request_the_peer_had_no_connection_for_goes_to_another_endpoint() {
    let ca = Ca::new("mesh root");
    // Its first request takes 1.5 s: it holds the one connection its sidecar may open.
    let busy = Scripted::start(
        "127.0.0.1",
        "busy",
        1,
        Misbehave::Delay(Duration::from_millis(1500)),
    )
    .await;
    let live = Scripted::ok("127.0.0.1", "cart").await;
    let limits = Limits {
        max_http1_connections_per_endpoint: 1,
        ..Limits::default()
    };
    let full_sidecar = TestProxy::start_kind(
        Proxy::with_identity(
            limits,
            BeforeConfig::default(),
            LocalPorts::default(),
            Some(ca.store(SERVER_ID)),
        ),
        ListenerKind::InboundTo(busy.addr),
        config(&[]),
    );
    let alive = server_sidecar(&ca, live.addr);
    // Round robin: the 1st and 3rd requests go to the busy endpoint first.
    let client = client_sidecar(&ca, &[(full_sidecar.addr, true), (alive.addr, true)]);

    let held = {
        let url = client.url("/slow");
        tokio::spawn(async move { get(&h1_client(), &url).await })
    };
    eventually(
        Duration::from_secs(5),
        "the slow request reached busy",
        || async { busy.requests() == 1 },
    )
    .await;
    let c = h1_client();
    let (resp, body) = get(&c, &client.url("/turn")).await;
    assert_eq!(
        (resp.status().as_u16(), body.as_str()),
        (200, "hello from cart")
    );
    assert_eq!(live.requests(), 1);

    let started = std::time::Instant::now();
    let req = http::Request::post(client.url("/orders"))
        .body(full(""))
        .unwrap();
    let (resp, body) = send(&c, req).await;
    assert_eq!(resp.status, 200, "{body} {:?}", resp.headers);
    assert_eq!(body, "hello from cart");
    assert!(resp.headers.get(UNSENT).is_none());
    assert_eq!(live.last().target, "/orders");
    assert_eq!(live.requests(), 2, "delivered once");
    assert_eq!(busy.requests(), 1, "the busy application never got it");
    // Answered while the slow request still held the connection: the peer refused at
    // once rather than waiting for it.
    assert!(!held.is_finished(), "{:?}", started.elapsed());
    assert_eq!(
        inbound_errors(&full_sidecar, "upstream_connection_limit"),
        1
    );
    assert_eq!(outbound_errors(&client, "upstream_connection_limit"), 1);

    // The request that held the connection completes.
    let (resp, body) = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (resp.status().as_u16(), body.as_str()),
        (200, "hello from busy")
    );
    assert_eq!(busy.requests(), 1);
}

/// A real gRPC application on loopback (tonic, the standard health service: `shop.Cart`
/// SERVING, `shop.Down` NOT_SERVING); counts the calls it received.
async fn grpc_app() -> (SocketAddr, Arc<AtomicUsize>, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("shop.Cart", tonic_health::ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("shop.Down", tonic_health::ServingStatus::NotServing)
        .await;
    let calls = Arc::new(AtomicUsize::new(0));
    let count = calls.clone();
    let record = move |req: tonic::Request<()>| {
        count.fetch_add(1, Ordering::SeqCst);
        Ok(req)
    };
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .layer(tonic::service::InterceptorLayer::new(record))
            .add_service(health)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await;
    });
    (addr, calls, Task(task))
}

/// A tonic health client of the service behind `client` (HTTP/2 prior knowledge).
async fn health_client(
    client: &TestProxy,
) -> tonic_health::pb::health_client::HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", client.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(channel)
}

#[tokio::test]
async fn a_grpc_call_the_peer_never_sent_goes_to_another_endpoint() {
    use tonic_health::pb::HealthCheckRequest;
    let ca = Ca::new("mesh root");
    let (app, calls, _task) = grpc_app().await;
    let dead = server_sidecar(&ca, refused_addr("127.0.0.1").await);
    let alive = server_sidecar(&ca, app);

    // The peer's answer on the wire, to a peer proxy's mux session: trailers-only.
    let tls = ca
        .store(CLIENT_ID)
        .client_tls(Arc::from(SERVER_ID))
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(dead.addr).await.unwrap();
    let session = tls
        .handshake(tcp, dead.addr, Inner::Mux, Duration::from_secs(5))
        .await
        .unwrap();
    let (mut mux, conn) = hyper::client::conn::http2::handshake::<_, _, Body>(
        TokioExecutor::new(),
        TokioIo::new(session),
    )
    .await
    .unwrap();
    let _conn = Task(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let resp = mux
        .send_request(
            http::Request::post("http://cart/grpc.health.v1.Health/Check")
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .header("te", "trailers")
                .body(full(&b"\0\0\0\0\x0b\x0a\x09shop.Cart"[..]))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    assert_eq!(resp.headers()["grpc-status"], "14");
    assert_eq!(resp.headers()["weft-error"], "connect_failed");
    assert_eq!(resp.headers()[UNSENT], "1");
    assert!(
        hyper::body::Body::is_end_stream(resp.body()),
        "trailers-only: no body, no trailers"
    );
    assert_eq!(inbound_connect_failures(&dead), 1);
    drop(mux);

    // The peer's own answer, as a gRPC client gets it when there is nowhere else to go.
    let only_dead = client_sidecar(&ca, &[(dead.addr, true)]);
    let err = health_client(&only_dead)
        .await
        .check(HealthCheckRequest {
            service: "shop.Cart".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert_eq!(err.metadata().get("weft-error").unwrap(), "connect_failed");
    assert!(err.metadata().get(UNSENT).is_none());
    assert_eq!(inbound_connect_failures(&dead), 2);

    let client = client_sidecar(&ca, &[(dead.addr, true), (alive.addr, true)]);
    let mut grpc = health_client(&client).await;
    for i in 1..=4 {
        let started = std::time::Instant::now();
        let resp = grpc
            .check(HealthCheckRequest {
                service: "shop.Cart".into(),
            })
            .await
            .unwrap_or_else(|e| panic!("call {i}: {e:?}"));
        assert!(resp.metadata().get(UNSENT).is_none());
        assert_eq!(
            resp.into_inner().status,
            tonic_health::ServingStatus::Serving as i32
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        // Delivered once: the dead endpoint's proxy never sent it to anyone.
        assert_eq!(calls.load(Ordering::SeqCst), i);
        assert_eq!(inbound_connect_failures(&dead), 2 + i as u64);
    }
    // The message itself arrived: the application answered for the service it names.
    let resp = grpc
        .check(HealthCheckRequest {
            service: "shop.Down".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        resp.into_inner().status,
        tonic_health::ServingStatus::NotServing as i32
    );
    let err = grpc
        .check(HealthCheckRequest {
            service: "shop.Nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.metadata().get("weft-error").is_none(), "{err:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 6);
    assert_eq!(inbound_connect_failures(&dead), 8);
    assert_eq!(outbound_errors(&client, "connect_failed"), 6);
}

/// A server sidecar whose application's connects hang, and which gives up on them after
/// `connect_timeout` (answering `connect_timeout`); keep the guard for as long.
async fn hung_sidecar(
    ca: &Ca,
    connect_timeout: &str,
) -> (
    TestProxy,
    (tokio::net::TcpListener, Vec<tokio::net::TcpStream>),
) {
    let (app, listener, queued) = hanging_addr("127.0.0.7").await;
    let mut cfg = config(&[]);
    cfg["connectTimeout"] = connect_timeout.into();
    let sidecar = TestProxy::start_kind(
        proxy_with(ca.store(SERVER_ID)),
        ListenerKind::InboundTo(app),
        cfg,
    );
    (sidecar, (listener, queued))
}

type FrameTx =
    futures::channel::mpsc::Sender<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>;

/// Starts a client-streaming gRPC call through `client` (HTTP/2); its messages are sent
/// on the returned channel, and dropping it ends the stream.
fn grpc_stream(
    client: &TestProxy,
) -> (
    FrameTx,
    tokio::task::JoinHandle<http::Response<hyper::body::Incoming>>,
) {
    let (tx, rx) = futures::channel::mpsc::channel(4);
    let req = http::Request::post(client.url("/shop.Cart/Upload"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::StreamBody::new(rx).boxed())
        .unwrap();
    let call = tokio::spawn(async move {
        tokio::time::timeout(Duration::from_secs(5), h2_client().request(req))
            .await
            .expect("answered within 5 s")
            .unwrap()
    });
    (tx, call)
}

fn message(bytes: &'static [u8]) -> Result<hyper::body::Frame<Bytes>, std::convert::Infallible> {
    Ok(hyper::body::Frame::data(Bytes::from_static(bytes)))
}

#[tokio::test]
async fn a_grpc_stream_is_sent_again_only_if_it_had_ended_when_the_peer_answered() {
    use futures::SinkExt;
    let ca = Ca::new("mesh root");
    let live = Scripted::ok("127.0.0.1", "cart").await;
    // The peer answers 300 ms after the call's headers: the client sidecar has read what
    // the call sent by then.
    let (hung, _guard) = hung_sidecar(&ca, "300ms").await;
    let alive = server_sidecar(&ca, live.addr);
    let client = client_sidecar(&ca, &[(hung.addr, true), (alive.addr, true)]);

    // Two messages, the second 20 ms after the first, then the end: sent again whole.
    let (mut tx, call) = grpc_stream(&client);
    tx.send(message(b"\0\0\0\0\x02\x08\x01")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    tx.send(message(b"\0\0\0\0\x02\x08\x02")).await.unwrap();
    drop(tx);
    let resp = call.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "0");
    assert_eq!(resp.headers()["x-backend"], "cart");
    assert!(resp.headers().get(UNSENT).is_none());
    assert_eq!(live.requests(), 1, "delivered once");
    assert_eq!(
        live.last().body,
        Bytes::from_static(b"\0\0\0\0\x02\x08\x01\0\0\0\0\x02\x08\x02")
    );
    assert_eq!(inbound_errors(&hung, "connect_timeout"), 1);

    // One message, the stream still open when the peer answers: the peer's answer is
    // passed on, since the proxy does not have the whole request to send again.
    let (mut tx, call) = grpc_stream(&client);
    tx.send(message(b"\0\0\0\0\x02\x08\x03")).await.unwrap();
    let resp = call.await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "14");
    assert_eq!(resp.headers()["weft-error"], "connect_timeout");
    assert!(resp.headers().get(UNSENT).is_none());
    assert_eq!(live.requests(), 1, "not sent again");
    assert_eq!(inbound_errors(&hung, "connect_timeout"), 2);
    drop(tx);
}

/// How an HTTP/2 application leaves a stream unprocessed.
#[derive(Clone, Copy, Debug)]
enum Unprocessed {
    /// It resets every stream with `REFUSED_STREAM`.
    Refused,
    /// It answers a connection's first request with `GOAWAY` naming no stream as
    /// processed (a server shutting down as the request arrives), then closes.
    GoingAway,
}

/// An HTTP/2 application on 127.0.0.1 that processes no request, as `how` says; counts
/// the requests it left unprocessed.
async fn unprocessing_app(how: Unprocessed) -> (SocketAddr, Arc<AtomicUsize>, Task) {
    let (addr, left, _, task) = unprocessing_at_first(how, usize::MAX).await;
    (addr, left, task)
}

/// Like [`unprocessing_app`] for its first `n` requests only (`Refused`: streams, on any
/// connection; `GoingAway`: its first `n` connections); later ones are answered 200
/// `hello from cart`. Counts the requests left unprocessed and the ones answered.
async fn unprocessing_at_first(
    how: Unprocessed,
    n: usize,
) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>, Task) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let (count, answered) = (seen.clone(), served.clone());
    let task = tokio::spawn(async move {
        let mut accepted = 0;
        while let Ok((stream, _)) = listener.accept().await {
            accepted += 1;
            let (count, answered) = (count.clone(), answered.clone());
            tokio::spawn(async move {
                match how {
                    Unprocessed::Refused => refuse_streams(stream, count, n, answered).await,
                    Unprocessed::GoingAway if accepted <= n => {
                        go_away_at_first_request(stream, count).await
                    }
                    Unprocessed::GoingAway => answer_streams(stream, answered).await,
                }
            });
        }
    });
    (addr, seen, served, Task(task))
}

/// Answers every stream 200 `hello from cart`, counting them.
async fn answer_streams(stream: tokio::net::TcpStream, answered: Arc<AtomicUsize>) {
    let svc = hyper::service::service_fn(move |_req| {
        answered.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, std::convert::Infallible>(http::Response::new(full("hello from cart"))) }
    });
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

async fn refuse_streams(
    stream: tokio::net::TcpStream,
    count: Arc<AtomicUsize>,
    first: usize,
    answered: Arc<AtomicUsize>,
) {
    let Ok(mut conn) = h2::server::handshake(stream).await else {
        return;
    };
    while let Some(Ok((_req, mut respond))) = conn.accept().await {
        if count.fetch_add(1, Ordering::SeqCst) < first {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            continue;
        }
        count.fetch_sub(1, Ordering::SeqCst);
        answered.fetch_add(1, Ordering::SeqCst);
        let head = http::Response::new(());
        if let Ok(mut body) = respond.send_response(head, false) {
            let _ = body.send_data(Bytes::from_static(b"hello from cart"), true);
        }
    }
}

/// An HTTP/2 application on 127.0.0.1 whose first connection answers one request and then,
/// idle for 50 ms, sends GOAWAY and closes (as Go's server does after its idle timeout);
/// whose second refuses its first stream (`REFUSED_STREAM`); later ones answer 200 `hello
/// from cart`. Counts the requests refused and those answered; `closed` is set once the
/// proxy has closed its end of the first connection too.
async fn closing_idle_then_refusing_app() -> (
    SocketAddr,
    Arc<AtomicBool>,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    Task,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closed = Arc::new(AtomicBool::new(false));
    let (left, served) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (c, l, a) = (closed.clone(), left.clone(), served.clone());
    let task = tokio::spawn(async move {
        let mut accepted = 0;
        while let Ok((stream, _)) = listener.accept().await {
            accepted += 1;
            let (c, l, a) = (c.clone(), l.clone(), a.clone());
            tokio::spawn(async move {
                match accepted {
                    1 => answer_once_then_close_idle(stream, a, c).await,
                    2 => refuse_streams(stream, l, 1, a).await,
                    _ => answer_streams(stream, a).await,
                }
            });
        }
    });
    (addr, closed, left, served, Task(task))
}

async fn answer_once_then_close_idle(
    mut stream: tokio::net::TcpStream,
    answered: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Borrowed, so that the socket outlives h2's connection and can see the proxy's close.
    if let Ok(mut conn) = h2::server::handshake(&mut stream).await {
        if let Some(Ok((_req, mut respond))) = conn.accept().await {
            answered.fetch_add(1, Ordering::SeqCst);
            if let Ok(mut body) = respond.send_response(http::Response::new(()), false) {
                let _ = body.send_data(Bytes::from_static(b"hello from cart"), true);
            }
        }
        // Driving the connection sends the answer; no request comes in the meantime.
        if tokio::time::timeout(Duration::from_millis(50), conn.accept())
            .await
            .is_err()
        {
            conn.graceful_shutdown();
            while let Some(Ok(_)) = conn.accept().await {}
        }
    }
    let _ = stream.shutdown().await;
    let mut rest = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
    })
    .await;
    closed.store(true, Ordering::SeqCst);
}

/// Raw frames, since h2's own server always counts a stream it received as processed.
async fn go_away_at_first_request(mut stream: tokio::net::TcpStream, count: Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
    const SETTINGS_ACK: [u8; 9] = [0, 0, 0, 4, 1, 0, 0, 0, 0];
    // GOAWAY, last stream 0, NO_ERROR.
    const GOAWAY: [u8; 17] = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    const PREFACE: usize = 24;
    if stream.write_all(&SETTINGS).await.is_err() {
        return;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut acked = false;
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        if !acked && got.len() > PREFACE {
            acked = stream.write_all(&SETTINGS_ACK).await.is_ok();
        }
        let mut at = PREFACE;
        let mut headers = false;
        while at + 9 <= got.len() {
            let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
            headers |= got[at + 3] == 1;
            at += 9 + len;
        }
        if headers {
            count.fetch_add(1, Ordering::SeqCst);
            let _ = stream.write_all(&GOAWAY).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            return;
        }
    }
}

#[tokio::test]
async fn a_stream_the_upstream_did_not_process_goes_to_another_endpoint() {
    use tonic_health::pb::HealthCheckRequest;
    let ca = Ca::new("mesh root");
    for how in [Unprocessed::Refused, Unprocessed::GoingAway] {
        let (bad, left, _bad_task) = unprocessing_app(how).await;
        let live = Scripted::ok("127.0.0.1", "cart").await;
        // Round robin from the bad endpoint, without a Route: only the always-safe retries.
        let client = client_sidecar(&ca, &[(bad, false), (live.addr, false)]);
        let c = h2_client();
        for _ in 0..4 {
            let (resp, body) = get(&c, &client.url("/items")).await;
            assert_eq!(resp.status(), 200, "{how:?}: {body}");
            assert_eq!(body, "hello from cart");
        }
        let left = left.load(Ordering::SeqCst);
        assert!(left >= 2, "{how:?}: the bad endpoint got {left} requests");
        assert_eq!(live.requests(), 4, "{how:?}: each request processed once");
        assert_eq!(outbound_errors(&client, "upstream_refused"), left as u64);

        // A gRPC call's message is kept as it streams, and sent again whole.
        let (app, calls, _app_task) = grpc_app().await;
        let client = client_sidecar(&ca, &[(bad, false), (app, false)]);
        let mut health = health_client(&client).await;
        for _ in 0..4 {
            let status = health
                .check(HealthCheckRequest {
                    service: "shop.Cart".into(),
                })
                .await
                .unwrap_or_else(|e| panic!("{how:?}: {e:?}"))
                .into_inner()
                .status;
            assert_eq!(status, tonic_health::ServingStatus::Serving as i32);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 4);

        // A retry policy decides: one that retries only gRPC `unavailable` leaves the
        // refused stream to the client, with the proxy's reason.
        let client = client_sidecar(&ca, &[(bad, false), (live.addr, false)]);
        let mut cfg = client_config(&[(bad, false), (live.addr, false)]);
        cfg["services"][0]["route"] = serde_json::json!({"name": "shop/web", "rules": [{
            "retries": {"attempts": 2, "retryOn": ["unavailable"],
                        "backoff": {"base": "1ms", "max": "1ms"}}
        }]});
        client.apply(cfg);
        let (resp, body) = get(&c, &client.url("/items")).await;
        assert_eq!(resp.status(), 503, "{how:?}: {body}");
        assert_eq!(header(&resp, "weft-error"), "upstream_refused");
    }
}

#[tokio::test]
async fn a_stream_the_peers_application_did_not_process_goes_to_another_endpoint() {
    let ca = Ca::new("mesh root");
    for how in [Unprocessed::Refused, Unprocessed::GoingAway] {
        let (bad, left, _bad_task) = unprocessing_app(how).await;
        let live = Scripted::ok("127.0.0.1", "cart").await;
        let refusing = server_sidecar(&ca, bad);
        let alive = server_sidecar(&ca, live.addr);
        let client = client_sidecar(&ca, &[(refusing.addr, true), (alive.addr, true)]);
        let c = h2_client();
        for _ in 0..4 {
            let (resp, body) = get(&c, &client.url("/items")).await;
            assert_eq!(resp.status(), 200, "{how:?}: {body}");
            assert_eq!(body, "hello from cart");
            assert_eq!(header(&resp, UNSENT), "");
        }
        let left = left.load(Ordering::SeqCst) as u64;
        assert!(left >= 2, "{how:?}: the refusing application got {left}");
        assert_eq!(live.requests(), 4, "{how:?}: each request processed once");
        assert_eq!(inbound_errors(&refusing, "upstream_refused"), left);
        // Each refused request went to the application once more from its sidecar (on a
        // new connection after a GOAWAY), but for the first: the sidecar keeps a copy
        // only once its application has left a stream unprocessed.
        let answered = outbound_errors(&client, "upstream_refused");
        assert_eq!(left, 2 * answered - 1, "{how:?}");

        // The peer's own client, in plain text, gets the answer without the signal.
        let (resp, _) = get(&c, &refusing.url("/items")).await;
        assert_eq!(resp.status(), 503);
        assert_eq!(header(&resp, "weft-error"), "upstream_refused");
        assert_eq!(header(&resp, UNSENT), "");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_sidecar_that_drains_under_load_loses_no_request() {
    use weft_proxy::shutdown;
    let ca = Ca::new("mesh root");
    // Answers take 20 ms, so that requests are in flight when the drain begins.
    let leaving_app = Backend::start_slow("127.0.0.1", "leaving", 20).await;
    let staying_app = Backend::start_slow("127.0.0.1", "staying", 20).await;
    let leaving = proxy_with(ca.store(SERVER_ID));
    leaving
        .store
        .apply(serde_json::from_value(config(&[])).unwrap())
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let leaving_addr = listener.local_addr().unwrap();
    let mut inbound = shutdown::ListenerGroup::new();
    inbound.spawn(
        listener,
        ListenerKind::InboundTo(leaving_app.addr),
        leaving.clone(),
    );
    let staying = server_sidecar(&ca, staying_app.addr);
    // The client sidecar keeps the leaving endpoint, as it does until the Endpoints
    // update reaches it in a rolling update.
    let client = client_sidecar(&ca, &[(leaving_addr, true), (staying.addr, true)]);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for i in 0..8 {
        let (url, stop) = (client.url("/items"), stop.clone());
        // HTTP/1 (on the mux) and HTTP/2 clients, four each.
        let c = if i % 2 == 0 { h1_client() } else { h2_client() };
        load.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            // Stops when told; the bound only keeps a broken test from running forever.
            let until = std::time::Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                let req = http::Request::get(&url).body(full("")).unwrap();
                match tokio::time::timeout(Duration::from_secs(5), c.request(req)).await {
                    Ok(Ok(r)) if r.status() == 200 => {}
                    Ok(Ok(r)) => failed.push(format!("{} {:?}", r.status(), r.headers())),
                    Ok(Err(e)) => failed.push(format!("{e:?}")),
                    Err(_) => failed.push("no answer within 5 s".to_string()),
                }
            }
            failed
        }));
    }
    eventually(Duration::from_secs(5), "both endpoints serve", || {
        let n = leaving_app.hits().min(staying_app.hits());
        async move { n >= 10 }
    })
    .await;
    let drained = shutdown::drain(
        &leaving,
        inbound,
        shutdown::ListenerGroup::new(),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        drained,
        "in-flight requests finished within the grace period"
    );
    let after_drain = staying_app.hits();
    eventually(Duration::from_secs(5), "the load goes on", || {
        let n = staying_app.hits();
        async move { n >= after_drain + 20 }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for task in load {
        let failed = task.await.unwrap();
        assert!(failed.is_empty(), "{failed:?}");
    }
}

/// An HTTP/2 endpoint seen ending a connection in use by itself (its GOAWAY after an idle
/// timeout) is known to end connections before it ever leaves a stream unprocessed: the
/// first stream it refuses goes once more, on a new connection, rather than failing.
#[tokio::test]
async fn an_endpoint_seen_ending_a_connection_has_its_first_refused_stream_sent_again() {
    for inbound in [false, true] {
        let ctx = format!("inbound: {inbound}");
        let (app, closed, left, served, _app) = closing_idle_then_refusing_app().await;
        let proxy = if inbound {
            TestProxy::start_kind(Proxy::new(), ListenerKind::InboundTo(app), config(&[]))
        } else {
            TestProxy::start("web", config(&[("web", &[app])])).await
        };
        let c = h2_client();
        let (resp, body) = get(&c, &proxy.url("/items")).await;
        assert_eq!(
            (resp.status().as_u16(), body.as_str()),
            (200, "hello from cart"),
            "{ctx}"
        );
        eventually(Duration::from_secs(5), "the idle close", || async {
            closed.load(Ordering::SeqCst)
        })
        .await;
        let (resp, body) = get(&c, &proxy.url("/items")).await;
        assert_eq!(
            (resp.status().as_u16(), body.as_str()),
            (200, "hello from cart"),
            "{ctx}"
        );
        assert_eq!(left.load(Ordering::SeqCst), 1, "{ctx}: refused once");
        assert_eq!(served.load(Ordering::SeqCst), 2, "{ctx}");
    }
}

#[tokio::test]
async fn a_stream_left_unprocessed_by_the_only_endpoint_goes_again_on_a_new_connection() {
    for how in [Unprocessed::Refused, Unprocessed::GoingAway] {
        for inbound in [false, true] {
            let ctx = format!("{how:?}, inbound: {inbound}");
            // Two connections leave their first request unprocessed; later ones serve.
            let (app, left, served, _app) = unprocessing_at_first(how, 2).await;
            let proxy = if inbound {
                TestProxy::start_kind(Proxy::new(), ListenerKind::InboundTo(app), config(&[]))
            } else {
                TestProxy::start("web", config(&[("web", &[app])])).await
            };
            let errors = |code: &str| match inbound {
                true => inbound_errors(&proxy, code),
                false => outbound_errors(&proxy, code),
            };
            let c = h2_client();
            // The first time, the proxy kept no copy: an endpoint that never leaves a
            // stream unprocessed costs none.
            let (resp, _) = get(&c, &proxy.url("/items")).await;
            assert_eq!(resp.status(), 503, "{ctx}");
            assert_eq!(header(&resp, "weft-error"), "upstream_refused", "{ctx}");
            // From then on, such a stream goes out once more, on a new connection.
            for _ in 0..3 {
                let (resp, body) = get(&c, &proxy.url("/items")).await;
                assert_eq!(resp.status(), 200, "{ctx}: {body}");
                assert_eq!(body, "hello from cart", "{ctx}");
            }
            assert_eq!(left.load(Ordering::SeqCst), 2, "{ctx}");
            assert_eq!(served.load(Ordering::SeqCst), 3, "{ctx}");
            assert_eq!(errors("upstream_refused"), 2, "{ctx}");
        }
    }
}
