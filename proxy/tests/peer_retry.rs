//! A request the peer proxy never handed to its application (its connect to the
//! application failed) is sent to another endpoint, as a request whose own connect failed
//! is: in process on loopback, a client sidecar (forward listener) → server sidecars
//! (inbound listeners, mutual TLS with certificates from a test CA) → backends.
//!
//! The signal is `weft-unsent`: trusted only over mutual TLS from a meshed endpoint, set by
//! an inbound proxy on its own answers only, and never seen by an application.

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

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::ca::Ca;
use support::*;
use tokio::net::TcpListener;
use weft_proxy::{
    LocalPorts, Proxy,
    identity::IdentityStore,
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

fn metric(p: &TestProxy, name: &str, labels: &[&str]) -> u64 {
    let text = p.proxy.metrics.encode().unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// The connect failures an inbound proxy answered for itself.
fn inbound_connect_failures(p: &TestProxy) -> u64 {
    metric(
        p,
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
        metric(
            &client,
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
