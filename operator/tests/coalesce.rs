//! The push server on loopback with a slow subscriber: it never blocks a fast one, and
//! when it reads again it gets the latest version, not every intermediate one. The index
//! is fed directly (no API server needed: nothing here talks to Kubernetes), subscribers
//! are trusted by their pod header.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::json;
use tokio::{net::TcpListener, sync::mpsc};
use tokio_util::sync::CancellationToken;
use weft_api::push::{self, Ack, ClientMessage, FrameDecoder, ServerMessage, Update};
use weft_operator::{
    index::{Index, Kind, model, shared::SharedIndex},
    metrics::Metrics,
    push::{Authenticator, PushServer, Registry},
};
use weft_proxy::control::ChannelBody;

fn slice(generation: u32) -> EndpointSlice {
    // A large slice, so a few updates fill a small flow-control window.
    let endpoints: Vec<_> = (0..200)
        .map(|e| json!({"addresses": [format!("10.1.{}.{}", e / 250, (e + generation) % 250)]}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": endpoints,
    }))
    .unwrap()
}

fn mesh() -> Arc<SharedIndex> {
    let mut index = Index::new("cluster.local");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "198.19.0.10", "ports": [{"name": "http", "port": 80}]}
    }))
    .unwrap();
    let (k, o) = model::service(&svc);
    index.apply(k, o);
    for name in ["fast", "slow", "other"] {
        let ns = if name == "other" { "elsewhere" } else { "shop" };
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns}, "spec": {"containers": []}
        }))
        .unwrap();
        let (k, o) = model::pod(&pod);
        index.apply(k, o);
    }
    let shared = SharedIndex::new(index, Arc::new(Metrics::new()));
    for kind in Kind::ALL {
        shared.mark_synced(kind);
    }
    shared
}

/// Opens a subscription on its own connection with a small receive window.
async fn subscribe(addr: &str, pod: &str) -> (Incoming, mpsc::Sender<Bytes>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(16 * 1024)
        .initial_connection_window_size(16 * 1024)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel(64);
    let req = http::Request::post(format!("http://{addr}{}", push::SUBSCRIBE_PATH))
        .header(push::POD_HEADER, pod)
        .body(ChannelBody(rx))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert!(resp.status().is_success());
    (resp.into_body(), tx)
}

/// Reads updates (ACKing each) until one has `version >= until`; returns them all.
async fn read_until(body: &mut Incoming, tx: &mpsc::Sender<Bytes>, until: u64) -> Vec<Update> {
    let mut decoder = FrameDecoder::default();
    let mut got = Vec::new();
    while got.last().is_none_or(|u: &Update| u.version < until) {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("an update within 10s")
            .unwrap()
            .unwrap();
        let Ok(data) = frame.into_data() else {
            continue;
        };
        decoder.extend(&data);
        while let Some(ServerMessage::Update(u)) = decoder.next::<ServerMessage>().unwrap() {
            let ack = push::encode(&ClientMessage::Ack(Ack {
                version: u.version,
                enforcement: None,
            }))
            .unwrap();
            tx.send(Bytes::from(ack)).await.unwrap();
            got.push(u);
        }
    }
    got
}

#[tokio::test]
async fn a_slow_subscriber_blocks_nobody_and_skips_to_the_latest_version() {
    let index = mesh();
    let registry = Arc::new(Registry::default());
    let server = Arc::new(PushServer {
        index: index.clone(),
        registry: registry.clone(),
        auth: Authenticator::InsecureTrustPodHeader,
        ack_timeout: weft_operator::push::DEFAULT_ACK_TIMEOUT,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    tokio::spawn(weft_operator::push::serve(listener, server, stop.clone()));

    let (mut fast, fast_tx) = subscribe(&addr, "shop/fast").await;
    let (mut slow, slow_tx) = subscribe(&addr, "shop/slow").await;
    let (mut other, other_tx) = subscribe(&addr, "elsewhere/other").await;
    let start = index.read(|i| i.version());
    for body in [
        (&mut fast, &fast_tx),
        (&mut slow, &slow_tx),
        (&mut other, &other_tx),
    ] {
        let first = read_until(body.0, body.1, start).await;
        assert!(
            first[0].full,
            "the first update on a stream is a full snapshot"
        );
    }

    // 100 endpoint changes while `slow` reads nothing.
    const CHANGES: u32 = 100;
    let mut fast_updates = 0;
    for g in 1..=CHANGES {
        let (k, o) = model::endpoint_slice(&slice(g));
        index.update(|i| i.apply(k, o));
        let v = index.read(|i| i.version());
        // The fast subscriber gets each change promptly although `slow` is stalled.
        fast_updates += read_until(&mut fast, &fast_tx, v).await.len();
    }
    let latest = index.read(|i| i.version());
    assert_eq!(fast_updates, CHANGES as usize);

    // `slow` now reads: it catches up on the latest version with far fewer updates,
    // the last of which carries the final endpoints.
    let caught_up = read_until(&mut slow, &slow_tx, latest).await;
    assert!(
        caught_up.len() < (CHANGES / 2) as usize,
        "{} updates: intermediate versions were queued, not coalesced",
        caught_up.len()
    );
    let last = caught_up.last().unwrap();
    assert_eq!(last.version, latest);
    assert!(!last.full, "a delta");
    assert_eq!(last.services.len(), 1, "only the changed service");

    // A subscriber in another namespace got nothing at all.
    let nothing = tokio::time::timeout(Duration::from_millis(300), other.frame()).await;
    assert!(
        nothing.is_err(),
        "an unaffected subscriber received {nothing:?}"
    );

    // The registry knows both shop proxies run the latest version.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let snapshot = registry.snapshot();
    for pod in ["fast", "slow"] {
        let key = weft_operator::index::ObjectKey::new("shop", pod);
        assert_eq!(snapshot[&key].acked_version, Some(latest), "{pod}");
    }
    stop.cancel();
}

#[tokio::test]
async fn a_subscriber_that_reads_but_never_answers_is_cut_off_while_updates_keep_coming() {
    let index = mesh();
    let ack_timeout = Duration::from_secs(1);
    let server = Arc::new(PushServer {
        index: index.clone(),
        registry: Arc::new(Registry::default()),
        auth: Authenticator::InsecureTrustPodHeader,
        ack_timeout,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    tokio::spawn(weft_operator::push::serve(
        listener,
        server.clone(),
        stop.clone(),
    ));
    let (mut mute, _never_answers) = subscribe(&addr, "shop/slow").await;

    // Changes every 2 ms: more unanswered versions than the session remembers (64) go
    // out before the timeout, and the oldest must still count.
    let changes = tokio::spawn({
        let index = index.clone();
        async move {
            for g in 1.. {
                let (k, o) = model::endpoint_slice(&slice(g));
                index.update(|i| i.apply(k, o));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    let start = tokio::time::Instant::now();
    let mut updates = 0;
    let mut decoder = FrameDecoder::default();
    let ended = tokio::time::timeout(ack_timeout * 4, async {
        loop {
            match mute.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        decoder.extend(&data);
                        while let Some(ServerMessage::Update(_)) =
                            decoder.next::<ServerMessage>().unwrap()
                        {
                            updates += 1;
                        }
                    }
                }
                _ => return,
            }
        }
    })
    .await;
    changes.abort();
    assert!(
        ended.is_ok(),
        "still streaming {:?} after the ACK timeout ({updates} updates unanswered)",
        start.elapsed()
    );
    assert!(updates > 64, "only {updates} updates were sent");
    assert!(
        server
            .index
            .metrics()
            .encode()
            .contains("weft_operator_push_stalls_total 1"),
        "{}",
        server.index.metrics().encode()
    );
    stop.cancel();
}
