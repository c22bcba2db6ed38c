//! Breakers on the wire: outlier ejection takes a failing endpoint out of balancing and
//! brings it back; connection-pool limits refuse the excess at once with 503 `overloaded`
//! and shape the upstream connections; dry run changes nothing and counts.
// A test that cannot set up should fail at the step that could not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use support::{
    ControlledBackend, Scripted, TestProxy, connect, eventually, get, h1_client, h2_client, header,
    read_head,
};
use tokio::io::AsyncWriteExt;

/// A config with service `web` over `endpoints`, balanced round robin (so that shares are
/// exact), with `breaker`.
fn config(endpoints: &[SocketAddr], breaker: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "weft.dev/proxy/v1alpha1",
        "kind": "ProxyConfig",
        "services": [{
            "name": "web",
            "balancer": "roundRobin",
            "endpoints": endpoints.iter().map(|a| serde_json::json!({"address": a.to_string()})).collect::<Vec<_>>(),
            "breaker": breaker,
        }],
    })
}

fn metrics(proxy: &TestProxy) -> String {
    proxy.proxy.metrics.encode().unwrap()
}

#[tokio::test]
async fn a_failing_endpoint_among_three_is_ejected_after_five_5xx_and_returns_after_the_ejection_time()
 {
    let good = [
        ControlledBackend::start("127.0.0.1", 0).await,
        ControlledBackend::start("127.0.0.1", 0).await,
    ];
    let bad = ControlledBackend::start("127.0.0.1", 0).await;
    bad.fail(true);
    let proxy = TestProxy::start(
        "web",
        config(
            &[good[0].addr, bad.addr, good[1].addr],
            serde_json::json!({"name": "shop/web", "outlierDetection": {
                "consecutive5xx": 5, "consecutiveConnectFailures": 5, "interval": "10s",
                "baseEjectionTime": "500ms", "maxEjectionTime": "5s", "maxEjectedPercent": 50}}),
        ),
    )
    .await;
    let client = h1_client();
    let mut failed = 0;
    for _ in 0..30 {
        let (resp, _) = get(&client, &proxy.url("/")).await;
        if resp.status() == 503 {
            assert_eq!(header(&resp, "weft-error"), "", "the backend's own 503");
            failed += 1;
        }
    }
    assert_eq!(bad.hits(), 5, "no request after the fifth 5xx");
    assert_eq!(failed, 5);
    let text = metrics(&proxy);
    assert!(
        text.contains("weft_breaker_ejected_endpoints{service=\"web\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("weft_breaker_ejections_total{service=\"web\"} 1"),
        "{text}"
    );

    // Healed, and back once the 500 ms are up.
    bad.fail(false);
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..9 {
        let (resp, _) = get(&client, &proxy.url("/")).await;
        assert_eq!(resp.status(), 200);
    }
    assert!(bad.hits() >= 8, "back in rotation: {} hits", bad.hits());
    assert!(
        metrics(&proxy).contains("weft_breaker_ejected_endpoints{service=\"web\"} 0"),
        "{}",
        metrics(&proxy)
    );
}

#[tokio::test]
async fn request_bodies_their_clients_break_off_eject_no_endpoint() {
    let backends = [
        Scripted::ok("127.0.0.1", "a").await,
        Scripted::ok("127.0.0.1", "b").await,
    ];
    let proxy = TestProxy::start(
        "web",
        config(
            &[backends[0].addr, backends[1].addr],
            serde_json::json!({"name": "shop/web", "outlierDetection": {
                "consecutive5xx": 2, "consecutiveConnectFailures": 2, "interval": "10s",
                "baseEjectionTime": "30s", "maxEjectionTime": "60s", "maxEjectedPercent": 50}}),
        ),
    )
    .await;
    // Round robin sends the four malformed bodies to one endpoint and the four abandoned
    // uploads to the other: with the failures held against the endpoints, each would
    // pass `consecutive5xx`.
    for i in 0..8 {
        let mut c = connect(proxy.addr).await;
        c.write_all(b"POST /upload HTTP/1.1\r\nhost: web\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .await
            .unwrap();
        // The request reaches the endpoint before the body breaks off.
        eventually(
            Duration::from_secs(2),
            "the upload reaches an endpoint",
            || async { backends[0].requests() + backends[1].requests() > i },
        )
        .await;
        if i % 2 == 0 {
            c.write_all(b"zz\r\n").await.unwrap();
            let head = read_head(&mut c).await;
            assert!(head.starts_with("http/1.1 400"), "{head}");
            assert!(
                head.contains("weft-error: request_body_incomplete\r\n"),
                "{head}"
            );
        } else {
            // A client that goes away mid-upload.
            drop(c);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(
        backends[0].requests() + backends[1].requests(),
        8,
        "every upload reached an endpoint"
    );
    let text = metrics(&proxy);
    assert!(!text.contains("weft_breaker_ejections_total{"), "{text}");
    assert!(
        text.contains("weft_breaker_ejected_endpoints{service=\"web\"} 0"),
        "{text}"
    );
    assert!(!text.contains("reason=\"upstream_failed\""), "{text}");
    let client = h1_client();
    for _ in 0..4 {
        let (resp, _) = get(&client, &proxy.url("/")).await;
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(
        backends[0].requests(),
        6,
        "both endpoints still take requests"
    );
}

/// Sends `n` GETs at once; each answer's status, `weft-error` and latency.
async fn concurrently(
    proxy: &TestProxy,
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        support::Body,
    >,
    n: usize,
) -> Vec<(u16, String, Duration)> {
    let url = proxy.url("/");
    let requests = (0..n).map(|_| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let start = Instant::now();
            let (resp, _) = get(&client, &url).await;
            (
                resp.status().as_u16(),
                header(&resp, "weft-error").to_owned(),
                start.elapsed(),
            )
        }
    });
    futures::future::join_all(requests).await
}

#[tokio::test]
async fn max_requests_4_refuses_4_of_8_concurrent_slow_requests_at_once() {
    let backend = ControlledBackend::start("127.0.0.1", 500).await;
    let proxy = TestProxy::start(
        "web",
        config(
            &[backend.addr],
            serde_json::json!({"name": "shop/web", "connectionPool": {"maxRequests": 4}}),
        ),
    )
    .await;
    let client = h1_client();
    // Warm the client's connections so that all 8 reach the proxy at once.
    let _ = concurrently(&proxy, &client, 8).await;
    let answers = concurrently(&proxy, &client, 8).await;
    let (ok, refused): (Vec<_>, Vec<_>) = answers.into_iter().partition(|a| a.0 == 200);
    assert_eq!(ok.len(), 4, "{ok:?} {refused:?}");
    for (status, code, took) in &refused {
        assert_eq!((*status, code.as_str()), (503, "overloaded"));
        // Refused at once: well under the backend's 500 ms (100 ms leaves room for a
        // debug build on a busy machine).
        assert!(*took < Duration::from_millis(100), "refused after {took:?}");
    }
    for (_, _, took) in &ok {
        assert!(
            *took >= Duration::from_millis(450),
            "admitted took {took:?}"
        );
    }
    let text = metrics(&proxy);
    assert!(
        text.contains("weft_breaker_overloaded_total{service=\"web\",limit=\"max_requests\"} 8"),
        "4 refused in each round: {text}"
    );
    assert!(text.contains("reason=\"overloaded\""), "{text}");
}

#[tokio::test]
async fn max_connections_1_keeps_one_http1_upstream_connection_for_concurrent_requests() {
    let backend = ControlledBackend::start("127.0.0.1", 50).await;
    let proxy = TestProxy::start(
        "web",
        config(
            &[backend.addr],
            serde_json::json!({"name": "shop/web", "connectionPool": {"maxConnections": 1}}),
        ),
    )
    .await;
    let answers = concurrently(&proxy, &h1_client(), 6).await;
    assert!(answers.iter().all(|a| a.0 == 200), "{answers:?}");
    assert_eq!(backend.connections(), 1);
    assert_eq!(backend.hits(), 6);
}

#[tokio::test]
async fn max_pending_0_at_max_connections_refuses_at_once() {
    let backend = ControlledBackend::start("127.0.0.1", 300).await;
    let proxy = TestProxy::start(
        "web",
        config(
            &[backend.addr],
            serde_json::json!({"name": "shop/web", "connectionPool":
                {"maxConnections": 1, "maxPendingRequests": 0}}),
        ),
    )
    .await;
    let answers = concurrently(&proxy, &h1_client(), 3).await;
    let refused: Vec<_> = answers.iter().filter(|a| a.1 == "overloaded").collect();
    assert_eq!(refused.len(), 2, "{answers:?}");
    assert_eq!(backend.connections(), 1);
    assert!(
        metrics(&proxy).contains("limit=\"max_pending_requests\"} 2"),
        "{}",
        metrics(&proxy)
    );
}

#[tokio::test]
async fn max_requests_per_connection_2_opens_a_new_upstream_connection_every_2_requests() {
    for (version, client) in [("HTTP/1.1", h1_client()), ("HTTP/2", h2_client())] {
        let backend = ControlledBackend::start("127.0.0.1", 0).await;
        let proxy = TestProxy::start(
            "web",
            config(
                &[backend.addr],
                serde_json::json!({"name": "shop/web",
                    "connectionPool": {"maxRequestsPerConnection": 2}}),
            ),
        )
        .await;
        for _ in 0..6 {
            let (resp, _) = get(&client, &proxy.url("/")).await;
            assert_eq!(resp.status(), 200);
            // Let the proxy take the connection back (or retire it) before the next.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(backend.connections(), 3, "{version}");
    }
}

#[tokio::test]
async fn dry_run_lets_everything_through_and_counts_what_it_would_have_done() {
    let good = ControlledBackend::start("127.0.0.1", 200).await;
    let bad = ControlledBackend::start("127.0.0.1", 200).await;
    bad.fail(true);
    let proxy = TestProxy::start(
        "web",
        config(
            &[good.addr, bad.addr],
            serde_json::json!({"name": "shop/web", "dryRun": true,
                "outlierDetection": {"consecutive5xx": 2, "consecutiveConnectFailures": 2,
                    "interval": "10s", "baseEjectionTime": "30s", "maxEjectionTime": "5m",
                    "maxEjectedPercent": 100},
                "connectionPool": {"maxRequests": 2}}),
        ),
    )
    .await;
    let client = h1_client();
    let answers = concurrently(&proxy, &client, 8).await;
    assert!(answers.iter().all(|a| a.1.is_empty()), "{answers:?}");
    assert_eq!(answers.iter().filter(|a| a.0 == 503).count(), 4);
    for _ in 0..6 {
        get(&client, &proxy.url("/")).await;
    }
    assert_eq!(bad.hits(), 7, "still half the traffic");
    let text = metrics(&proxy);
    assert!(
        text.contains("weft_dry_run_decisions_total{service=\"web\",kind=\"overloaded\"} 6"),
        "{text}"
    );
    assert!(
        text.contains("weft_dry_run_decisions_total{service=\"web\",kind=\"ejection\"}"),
        "{text}"
    );
    assert!(!text.contains("weft_breaker_ejections_total{"), "{text}");
    assert!(!text.contains("weft_breaker_overloaded_total{"), "{text}");
    assert!(text.contains("weft_breaker_ejected_endpoints{service=\"web\"} 0"));
}
