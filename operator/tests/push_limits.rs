//! The push port's limits against the test bed's real API server: a bad token costs one
//! TokenReview however often it is presented, a flood from one address is refused with
//! 429 while a genuine proxy still connects, and a subscriber that stops acknowledging is
//! cut off within the ACK timeout and resyncs with a full snapshot when it returns.
//!
//! The raw subscribers here speak `weft.push.v1` over their own HTTP/2 connections, from
//! chosen loopback source addresses (the per-source limit keys on them).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{net::SocketAddr, time::Duration};

use anyhow::ensure;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::mesh::*;
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::mpsc,
};
use weft_api::push::{self, Ack, ClientMessage, FrameDecoder, ServerMessage, Update};
use weft_e2e::shared::eventually;
use weft_operator::push::{AuthLimits, Authenticator};
use weft_proxy::control::ChannelBody;

/// An HTTP/2 connection to the push port from `source` (a loopback address).
async fn connect(
    addr: SocketAddr,
    source: &str,
) -> hyper::client::conn::http2::SendRequest<ChannelBody> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// Opens a subscription for `pod` with `token`: the status, and the stream with the
/// sender of the proxy's answers.
async fn subscribe(
    sender: &mut hyper::client::conn::http2::SendRequest<ChannelBody>,
    pod: &str,
    token: &str,
) -> (StatusCode, Incoming, mpsc::Sender<Bytes>) {
    let (tx, rx) = mpsc::channel(16);
    let req = http::Request::post(format!("http://weft{}", push::SUBSCRIBE_PATH))
        .header(push::POD_HEADER, pod)
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(ChannelBody(rx))
        .unwrap();
    sender.ready().await.unwrap();
    let resp = sender.send_request(req).await.unwrap();
    (resp.status(), resp.into_body(), tx)
}

/// The next update on `body`, within `within`.
async fn next_update(body: &mut Incoming, decoder: &mut FrameDecoder, within: Duration) -> Update {
    loop {
        if let Some(ServerMessage::Update(u)) = decoder.next::<ServerMessage>().unwrap() {
            return u;
        }
        let frame = tokio::time::timeout(within, body.frame())
            .await
            .expect("an update in time")
            .expect("the stream is open")
            .expect("no stream error");
        if let Ok(data) = frame.into_data() {
            decoder.extend(&data);
        }
    }
}

/// The value of one sample line of the operator's metrics (0 when absent).
async fn metric(op: &Operator, sample: &str) -> f64 {
    let (_, text) = http_get(op.admin, "/metrics").await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_cost_one_token_review_and_a_flood_is_refused_while_a_proxy_connects() {
    let bed = Bed::new("push-limits").await;
    bed.service_account("client").await;
    bed.service("web", "web").await;
    let pod = bed.pod("client", "client", "client", "198.18.240.90").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = bed.client.clone();
    let op = Operator::start_with(&bed, listener, "limits", |s| {
        s.auth = Authenticator::token_review_with(
            client,
            vec!["weft".into()],
            AuthLimits {
                source_rate: 2.0,
                source_burst: 5,
                ..AuthLimits::default()
            },
        );
    })
    .await;
    let who = format!("{}/client", bed.ns);
    eventually(WAIT, || async {
        let mut c = connect(addr, "127.0.0.1").await;
        let (status, _, _) = subscribe(&mut c, &who, "warm-up").await;
        ensure!(
            status != StatusCode::SERVICE_UNAVAILABLE,
            "index not synced"
        );
        Ok(())
    })
    .await
    .unwrap();
    let reviews = r#"weft_operator_token_reviews_total{result="rejected"}"#;
    let before = metric(&op, reviews).await;

    // One bad token, fifty times, from one address: one TokenReview.
    let mut c = connect(addr, "127.0.0.3").await;
    for _ in 0..50 {
        let (status, _, _) = subscribe(&mut c, &who, "not-a-valid-token").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        metric(&op, reviews).await - before,
        1.0,
        "TokenReviews caused"
    );
    assert_eq!(
        metric(
            &op,
            r#"weft_operator_push_refusals_total{reason="token_rejected_cached"}"#
        )
        .await,
        49.0
    );

    // A flood of distinct bad tokens from another address: past the burst it is refused
    // with 429 without a TokenReview, while a genuine proxy connects.
    let flood = tokio::spawn({
        let who = who.clone();
        async move {
            let mut c = connect(addr, "127.0.0.2").await;
            let (mut limited, mut reviewed) = (0u32, 0u32);
            for i in 0..200 {
                let (status, _, _) = subscribe(&mut c, &who, &format!("garbage-{i}")).await;
                match status {
                    StatusCode::TOO_MANY_REQUESTS => limited += 1,
                    StatusCode::UNAUTHORIZED => reviewed += 1,
                    other => panic!("flood request answered {other}"),
                }
            }
            (limited, reviewed)
        }
    });
    let proxy = TestProxy::start(&bed, &addr.to_string(), &pod, None).await;
    proxy.acked().await;
    let (limited, reviewed) = flood.await.unwrap();
    assert!(limited >= 150, "{limited} of 200 refused with 429");
    assert_eq!(
        metric(
            &op,
            r#"weft_operator_push_refusals_total{reason="rate_limited"}"#
        )
        .await,
        f64::from(limited)
    );
    let caused = metric(&op, reviews).await - before - 1.0;
    assert_eq!(
        caused,
        f64::from(reviewed),
        "every 401 of the flood was one review"
    );
    assert!(
        reviewed <= 5 + 10,
        "{reviewed} TokenReviews: the burst of 5 plus 2/s for the flood's few seconds"
    );
    op.stop().await;
    bed.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_acknowledging_is_cut_off_counted_and_resynced() {
    let bed = Bed::new("push-stall").await;
    for sa in ["client", "other"] {
        bed.service_account(sa).await;
    }
    bed.service("web", "web").await;
    let pod = bed.pod("client", "client", "client", "198.18.240.91").await;
    let other = bed.pod("other", "other", "other", "198.18.240.92").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ack_timeout = Duration::from_secs(1);
    let op = Operator::start_with(&bed, listener, "stall", |s| {
        s.push_ack_timeout = ack_timeout;
    })
    .await;
    // A well-behaved proxy on its own connection throughout.
    let good = TestProxy::start(&bed, &addr.to_string(), &other, None).await;
    good.acked().await;

    let token = bed.token(&pod).await;
    let who = format!("{}/client", bed.ns);
    let mut c = connect(addr, "127.0.0.1").await;
    let (status, mut body, _answers) = subscribe(&mut c, &who, &token).await;
    assert_eq!(status, StatusCode::OK);
    let mut decoder = FrameDecoder::default();
    let first = next_update(&mut body, &mut decoder, WAIT).await;
    assert!(first.full);
    // It never answers: within the timeout (plus slack) the operator closes the stream.
    let cut = tokio::time::Instant::now();
    let end = tokio::time::timeout(ack_timeout * 5, async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                other => return other.map(|r| r.map(|_| ())),
            }
        }
    })
    .await
    .expect("the stalled stream is closed within the bound");
    assert!(
        end.is_none() || end.as_ref().is_some_and(Result::is_err),
        "{end:?}"
    );
    let took = cut.elapsed();
    assert!(took >= ack_timeout / 2, "cut after {took:?}: too early");
    assert_eq!(metric(&op, "weft_operator_push_stalls_total").await, 1.0);
    eventually(WAIT, || async {
        let rows = weft_operator::mesh::proxy_rows(&op.handles).await;
        let row = rows.iter().find(|r| r.pod == who);
        ensure!(row.is_some_and(|r| !r.connected), "{rows:?}");
        Ok(())
    })
    .await
    .unwrap();
    assert!(
        good.status.borrow().connects == 1,
        "the well-behaved proxy kept its stream"
    );

    // Back with a proxy that answers: a full snapshot, acknowledged, and no new stall.
    let mut c = connect(addr, "127.0.0.1").await;
    let (status, mut body, answers) = subscribe(&mut c, &who, &token).await;
    assert_eq!(status, StatusCode::OK);
    let mut decoder = FrameDecoder::default();
    let again = next_update(&mut body, &mut decoder, WAIT).await;
    assert!(again.full, "a reconnect resyncs with a full snapshot");
    // This one answers every update.
    let answering = tokio::spawn(async move {
        let mut version = again.version;
        loop {
            let ack = push::encode(&ClientMessage::Ack(Ack {
                version,
                enforcement: None,
            }))
            .unwrap();
            if answers.send(Bytes::from(ack)).await.is_err() {
                return;
            }
            version = next_update(&mut body, &mut decoder, Duration::from_secs(3600))
                .await
                .version;
        }
    });
    tokio::time::sleep(ack_timeout * 3).await;
    assert_eq!(metric(&op, "weft_operator_push_stalls_total").await, 1.0);
    eventually(WAIT, || async {
        let rows = weft_operator::mesh::proxy_rows(&op.handles).await;
        ensure!(
            rows.iter()
                .any(|r| r.pod == who && r.connected && r.in_sync),
            "{rows:?}"
        );
        Ok(())
    })
    .await
    .unwrap();
    answering.abort();
    op.stop().await;
    bed.cleanup().await;
}
