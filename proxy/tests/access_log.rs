//! Access logs on the wire: a proxy with an access log writes one line per request, after
//! its response body, with the fields a user reads it for; without one, nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Request, StatusCode};
use prometheus_client::metrics::counter::Counter;
use serde_json::{Value, json};
use support::*;
use weft_proxy::{
    Proxy,
    access_log::{AccessLog, Format},
    server::ListenerKind,
};

/// A writer the test reads back.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    /// The lines written so far, once at least `n` are there (within 2 s).
    async fn lines(&self, n: usize) -> Vec<String> {
        for _ in 0..200 {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            if lines.len() >= n {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("fewer than {n} access-log lines");
    }
}

fn logging_proxy(format: Format) -> (Arc<Proxy>, Sink) {
    let proxy = Proxy::new();
    let sink = Sink::default();
    let log = AccessLog::start(
        format,
        Box::new(sink.clone()),
        Counter::default(),
        Counter::default(),
    )
    .unwrap();
    proxy.access_log.set(log).unwrap();
    (proxy, sink)
}

#[tokio::test]
async fn a_retried_post_is_one_line_with_its_attempts_sizes_and_trace_id() {
    // The backend fails the first request with 503; the rule retries it.
    let backend = Scripted::start("127.0.0.2", "web", 1, Misbehave::Status(503)).await;
    let mut cfg = config(&[("web", &[backend.addr])]);
    cfg["services"][0]["route"] = json!({"name": "shop/web", "rules": [{
        "retries": {"attempts": 2, "retryOn": ["5xx"],
                    "backoff": {"base": "1ms", "max": "1ms"}}
    }]});
    let (proxy, sink) = logging_proxy(Format::Json);
    let proxy = TestProxy::start_with(proxy, "web", cfg);
    let client = h1_client();
    let req = Request::post(proxy.url("/orders/7?token=secret"))
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(full("hello"))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();

    let lines = sink.lines(1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(line["direction"], "outbound");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["authority"], proxy.addr.to_string());
    assert_eq!(
        line["path"], "/orders/7",
        "the query string stays out of the log"
    );
    assert_eq!(line["status"], 200);
    assert_eq!(line["attempts"], 2);
    assert_eq!(line["upstream"], backend.addr.to_string());
    assert_eq!(line["bytes_in"], 5);
    assert_eq!(line["bytes_out"], body.len());
    assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(line["source_addr"], "127.0.0.1");
    assert!(line.get("reason").is_none(), "{line}");
    assert!(line["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(line["timestamp"].as_str().unwrap().ends_with('Z'), "{line}");
}

#[tokio::test]
async fn an_answer_of_the_proxy_carries_its_reason_and_no_attempt() {
    let (proxy, sink) = logging_proxy(Format::Text);
    let proxy = TestProxy::start_with(proxy, "web", config(&[("web", &[])]));
    let (resp, _) = get(&h1_client(), &proxy.url("/x")).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let lines = sink.lines(1).await;
    let line = &lines[0];
    for field in [
        "direction=outbound",
        "method=GET",
        "path=/x",
        "status=503",
        "attempts=0",
        "reason=no_endpoints",
        "bytes_in=0",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
}

/// A client that goes away before its answer still leaves a line: status 0 (no answer was
/// sent), with the attempt that was on its way.
#[tokio::test]
async fn a_request_whose_client_went_away_is_logged_with_status_0() {
    let app = HangingApp::start("127.0.0.2").await;
    let (proxy, sink) = logging_proxy(Format::Json);
    let proxy = TestProxy::start_with(proxy, "web", config(&[("web", &[app.addr])]));
    app.request_and_go_away(proxy.addr, 1).await;
    let lines = sink.lines(1).await;
    let line: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(line["status"], 0, "{line}");
    assert_eq!(line["path"], "/long-poll", "{line}");
    assert_eq!(line["attempts"], 1, "{line}");
    assert_eq!(line["upstream"], app.addr.to_string(), "{line}");
    assert!(line.get("reason").is_none(), "{line}");
    app.wait_closed(1, "cancelled upstream").await;
}

#[tokio::test]
async fn the_inbound_side_logs_its_requests_to_the_application() {
    let app = Scripted::ok("127.0.0.2", "app").await;
    let (proxy, sink) = logging_proxy(Format::Json);
    let proxy = TestProxy::start_kind(proxy, ListenerKind::InboundTo(app.addr), config(&[]));
    for _ in 0..3 {
        let (resp, _) = get(&h1_client(), &proxy.url("/health")).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let lines = sink.lines(3).await;
    assert_eq!(lines.len(), 3);
    for l in &lines {
        let line: Value = serde_json::from_str(l).unwrap();
        assert_eq!(line["direction"], "inbound");
        assert_eq!(line["upstream"], app.addr.to_string());
        assert_eq!(line["attempts"], 1);
    }
}

#[tokio::test]
async fn without_an_access_log_nothing_is_written() {
    let backend = Scripted::ok("127.0.0.2", "web").await;
    let proxy = Proxy::new();
    let proxy = TestProxy::start_with(proxy, "web", config(&[("web", &[backend.addr])]));
    let (resp, _) = get(&h1_client(), &proxy.url("/")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(proxy.proxy.access_log.get().is_none());
    let metrics = proxy.proxy.metrics.encode().unwrap();
    assert!(
        metrics.contains("weft_access_log_lines_total 0"),
        "{metrics}"
    );
}
