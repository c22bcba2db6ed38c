//! Tracing on the wire: two proxies (a client's outbound sidecar, then the server's
//! inbound one) in front of an application, and a real OTLP/gRPC receiver (the
//! collector's TraceService, served by tonic) that the proxies export to.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::Request;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::{Span, span::SpanKind},
};
use prometheus_client::metrics::counter::Counter;
use serde_json::json;
use support::*;
use tokio_util::sync::CancellationToken;
use weft_proxy::{
    Proxy,
    access_log::{AccessLog, Format},
    server::ListenerKind,
    trace::{Collector, DropReason, Sampling, TraceConfig, Tracer},
};

/// A local OTLP receiver: every span exported to it, and the resources they came with.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    services: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    self.services.lock().unwrap().push(service.clone());
                    self.spans.lock().unwrap().push(span);
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    async fn start() -> (Receiver, SocketAddr, Task) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = Receiver::default();
        let service = TraceServiceServer::new(receiver.clone());
        let task = Task(tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await;
        }));
        (receiver, addr, task)
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// The spans once there are at least `n` (within 10 s), then after one more export
    /// interval and a second, so that a span too many would have arrived too.
    async fn settled(&self, n: usize) -> Vec<Span> {
        let r = self.clone();
        eventually(
            Duration::from_secs(10),
            &format!("{n} spans exported"),
            || {
                let r = r.clone();
                async move { r.spans().len() >= n }
            },
        )
        .await;
        tokio::time::sleep(weft_proxy::trace::FLUSH_INTERVAL + Duration::from_secs(1)).await;
        self.spans()
    }
}

/// Turns tracing on for `proxy`, exporting to `collector` as `service`; the export task
/// lives as long as the returned task.
fn trace(proxy: &Arc<Proxy>, collector: SocketAddr, sampling: &str, service: &str) -> Task {
    let (tracer, exporter) = Tracer::new(
        TraceConfig {
            collector: collector.to_string().parse::<Collector>().unwrap(),
            sampling: sampling.parse::<Sampling>().unwrap(),
            resource: vec![("service.name", service.to_owned())],
        },
        proxy.metrics.trace.clone(),
    );
    proxy.tracer.set(tracer).unwrap();
    Task(tokio::spawn(exporter.run(CancellationToken::new())))
}

/// An application behind an inbound proxy, and an outbound proxy whose service `web` is
/// that inbound proxy: client ─▶ outbound ─▶ inbound ─▶ app.
struct Mesh {
    app: Scripted,
    outbound: TestProxy,
    _inbound: TestProxy,
    _exporters: Vec<Task>,
}

async fn mesh(collector: SocketAddr, sampling: &str) -> Mesh {
    let app = Scripted::ok("127.0.0.3", "app").await;
    let inbound = Proxy::new();
    let t1 = trace(&inbound, collector, sampling, "web");
    let inbound = TestProxy::start_kind(inbound, ListenerKind::InboundTo(app.addr), config(&[]));
    let outbound = Proxy::new();
    let t2 = trace(&outbound, collector, sampling, "client");
    let outbound = TestProxy::start_with(outbound, "web", config(&[("web", &[inbound.addr])]));
    Mesh {
        app,
        outbound,
        _inbound: inbound,
        _exporters: vec![t1, t2],
    }
}

async fn send(url: &str, headers: &[(&str, &str)]) -> http::Response<()> {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        h1_client().request(req.body(full("")).unwrap()),
    )
    .await
    .expect("response within 10 s")
    .expect("response");
    let (parts, body) = resp.into_parts();
    http_body_util::BodyExt::collect(body).await.unwrap();
    http::Response::from_parts(parts, ())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// `traceparent`'s trace id, parent id and flags.
fn traceparent(v: &str) -> (String, String, String) {
    let parts: Vec<&str> = v.split('-').collect();
    assert_eq!(parts.len(), 4, "{v}");
    assert_eq!(parts[0], "00", "{v}");
    (
        parts[1].to_owned(),
        parts[2].to_owned(),
        parts[3].to_owned(),
    )
}

fn attrs(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn by_kind(spans: &[Span], kind: SpanKind) -> Span {
    let found: Vec<&Span> = spans.iter().filter(|s| s.kind == kind as i32).collect();
    assert_eq!(found.len(), 1, "one {kind:?} span in {spans:#?}");
    found[0].clone()
}

#[tokio::test]
async fn one_trace_id_end_to_end_and_one_span_per_hop() {
    let (receiver, collector, _rx) = Receiver::start().await;
    let m = mesh(collector, "0").await;
    // The application's own span, sampled: its decision holds even at sampling 0.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let resp = send(
        &m.outbound.url("/orders/7?secret=1"),
        &[
            ("traceparent", &format!("00-{trace_id}-{caller}-01")),
            ("tracestate", "vendor=opaque"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);

    let seen = m.app.last();
    let (app_trace, app_parent, flags) = traceparent(&seen.header_values("traceparent")[0]);
    assert_eq!(app_trace, trace_id);
    assert_eq!(flags, "01");
    assert_ne!(app_parent, caller, "each hop puts its own span in");
    assert_eq!(seen.header_values("tracestate"), ["vendor=opaque"]);

    let spans = receiver.settled(2).await;
    assert_eq!(spans.len(), 2, "one span per hop: {spans:#?}");
    let client = by_kind(&spans, SpanKind::Client);
    let server = by_kind(&spans, SpanKind::Server);
    for s in [&client, &server] {
        assert_eq!(hex(&s.trace_id), trace_id);
        assert!(s.end_time_unix_nano >= s.start_time_unix_nano);
    }
    // caller ─▶ outbound proxy's span ─▶ inbound proxy's span ─▶ the application.
    assert_eq!(hex(&client.parent_span_id), caller);
    assert_eq!(server.parent_span_id, client.span_id);
    assert_eq!(hex(&server.span_id), app_parent);
    // The server span lies within the client span.
    assert!(server.start_time_unix_nano >= client.start_time_unix_nano);
    assert!(server.end_time_unix_nano <= client.end_time_unix_nano);

    let a = attrs(&client);
    assert_eq!(a["http.request.method"], "GET");
    assert_eq!(a["url.path"], "/orders/7");
    assert_eq!(a["http.response.status_code"], "200");
    assert_eq!(a["weft.attempts"], "1");
    assert_eq!(a["weft.direction"], "outbound");
    assert_eq!(a["weft.upstream"], m._inbound.addr.to_string());
    assert_eq!(attrs(&server)["weft.direction"], "inbound");
    let services = receiver.services.lock().unwrap().clone();
    assert!(services.contains(&"web".to_owned()) && services.contains(&"client".to_owned()));
}

#[tokio::test]
async fn a_trace_the_proxy_starts_has_the_outbound_span_as_root() {
    let (receiver, collector, _rx) = Receiver::start().await;
    let m = mesh(collector, "1").await;
    let resp = send(&m.outbound.url("/"), &[]).await;
    assert_eq!(resp.status(), 200);
    let seen = m.app.last();
    let (trace_id, parent, flags) = traceparent(&seen.header_values("traceparent")[0]);
    assert_eq!(flags, "01");
    // Not started from nothing: no B3 out when none came in.
    assert!(seen.header_values("x-b3-traceid").is_empty());
    assert!(seen.header_values("b3").is_empty());

    let spans = receiver.settled(2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let client = by_kind(&spans, SpanKind::Client);
    let server = by_kind(&spans, SpanKind::Server);
    assert!(client.parent_span_id.is_empty(), "the root span");
    assert_eq!(hex(&client.trace_id), trace_id);
    assert_eq!(server.parent_span_id, client.span_id);
    assert_eq!(hex(&server.span_id), parent);
}

#[tokio::test]
async fn b3_multi_and_single_contexts_are_continued() {
    let (receiver, collector, _rx) = Receiver::start().await;
    let m = mesh(collector, "0").await;

    // Multi-header, a 64-bit trace id (older Zipkin tracers).
    let resp = send(
        &m.outbound.url("/multi"),
        &[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let seen = m.app.last();
    assert_eq!(seen.header_values("x-b3-traceid"), ["463ac35c9f6413ad"]);
    assert_eq!(seen.header_values("x-b3-sampled"), ["1"]);
    let app_span = seen.header_values("x-b3-spanid")[0].clone();
    let app_parent = seen.header_values("x-b3-parentspanid")[0].clone();
    let (tp_trace, tp_parent, _) = traceparent(&seen.header_values("traceparent")[0]);
    assert_eq!(tp_trace, "0000000000000000463ac35c9f6413ad");
    assert_eq!(tp_parent, app_span);

    let spans = receiver.settled(2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let client = by_kind(&spans, SpanKind::Client);
    let server = by_kind(&spans, SpanKind::Server);
    assert_eq!(hex(&client.trace_id), tp_trace);
    assert_eq!(hex(&client.parent_span_id), "a2fb4a1d1a96d312");
    assert_eq!(hex(&server.span_id), app_span);
    assert_eq!(hex(&server.parent_span_id), app_parent);
    assert_eq!(server.parent_span_id, client.span_id);
    receiver.spans.lock().unwrap().clear();

    // Single header, 128-bit id, debug flag.
    let trace_id = "80f198ee56343ba864fe8b2a57d3eff7";
    let resp = send(
        &m.outbound.url("/single"),
        &[("b3", &format!("{trace_id}-e457b5a2e4d86bd1-d"))],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let seen = m.app.last();
    let b3 = seen.header_values("b3")[0].clone();
    let parts: Vec<&str> = b3.split('-').collect();
    assert_eq!(parts[0], trace_id, "{b3}");
    assert_eq!(parts[2], "d", "{b3}");
    let spans = receiver.settled(2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let server = by_kind(&spans, SpanKind::Server);
    let client = by_kind(&spans, SpanKind::Client);
    assert_eq!(hex(&server.span_id), parts[1]);
    assert_eq!(hex(&server.parent_span_id), parts[3]);
    assert_eq!(hex(&client.parent_span_id), "e457b5a2e4d86bd1");
}

#[tokio::test]
async fn sampling_zero_exports_nothing_unless_the_caller_sampled() {
    let (receiver, collector, _rx) = Receiver::start().await;
    let m = mesh(collector, "0").await;
    for _ in 0..5 {
        assert_eq!(send(&m.outbound.url("/"), &[]).await.status(), 200);
    }
    // Still one trace id to the application, marked not sampled.
    let (_, _, flags) = traceparent(&m.app.last().header_values("traceparent")[0]);
    assert_eq!(flags, "00");
    // A caller that decided not to sample: nothing either.
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    assert_eq!(
        send(&m.outbound.url("/"), &[("traceparent", unsampled)])
            .await
            .status(),
        200
    );
    let (trace_id, _, flags) = traceparent(&m.app.last().header_values("traceparent")[0]);
    assert_eq!(
        (trace_id.as_str(), flags.as_str()),
        ("11111111111111111111111111111111", "00")
    );
    tokio::time::sleep(2 * weft_proxy::trace::FLUSH_INTERVAL + Duration::from_secs(1)).await;
    assert!(receiver.spans().is_empty(), "{:#?}", receiver.spans());

    // A caller that sampled: one span per hop.
    let sampled = "00-33333333333333333333333333333333-4444444444444444-01";
    assert_eq!(
        send(&m.outbound.url("/"), &[("traceparent", sampled)])
            .await
            .status(),
        200
    );
    let spans = receiver.settled(2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    assert!(
        spans
            .iter()
            .all(|s| hex(&s.trace_id) == "33333333333333333333333333333333")
    );
}

#[tokio::test]
async fn retries_are_events_of_the_one_span() {
    let (receiver, collector, _rx) = Receiver::start().await;
    let backend = Scripted::start("127.0.0.2", "web", 1, Misbehave::Status(503)).await;
    let mut cfg = config(&[("web", &[backend.addr])]);
    cfg["services"][0]["route"] = json!({"name": "shop/web", "rules": [{
        "retries": {"attempts": 2, "retryOn": ["5xx"],
                    "backoff": {"base": "1ms", "max": "1ms"}}
    }]});
    let proxy = Proxy::new();
    let _t = trace(&proxy, collector, "1", "client");
    let proxy = TestProxy::start_with(proxy, "web", cfg);
    assert_eq!(send(&proxy.url("/"), &[]).await.status(), 200);
    let spans = receiver.settled(1).await;
    assert_eq!(spans.len(), 1, "{spans:#?}");
    let span = &spans[0];
    let a = attrs(span);
    assert_eq!(a["weft.attempts"], "2");
    assert_eq!(a["weft.route"], "shop/web");
    let outcomes: Vec<String> = span
        .events
        .iter()
        .map(|e| {
            assert_eq!(e.name, "attempt");
            assert!(e.time_unix_nano >= span.start_time_unix_nano);
            assert!(e.time_unix_nano <= span.end_time_unix_nano);
            attrs_of(&e.attributes)["weft.outcome"].clone()
        })
        .collect();
    assert_eq!(outcomes, ["503", "200"]);
}

fn attrs_of(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> HashMap<String, String> {
    attrs(&Span {
        attributes: kvs.to_vec(),
        ..Span::default()
    })
}

#[tokio::test]
async fn a_refusal_is_a_failed_span_with_its_reason() {
    let (receiver, collector, _rx) = Receiver::start().await;
    let proxy = Proxy::new();
    let _t = trace(&proxy, collector, "1", "client");
    // A service without endpoints: the proxy answers 503 no_endpoints itself.
    let proxy = TestProxy::start_with(proxy, "web", config(&[("web", &[])]));
    let resp = send(&proxy.url("/"), &[]).await;
    assert_eq!(resp.status(), 503);
    let spans = receiver.settled(1).await;
    assert_eq!(spans.len(), 1);
    let a = attrs(&spans[0]);
    assert_eq!(a["weft.error"], "no_endpoints");
    assert_eq!(a["weft.attempts"], "0");
    let status = spans[0].status.clone().unwrap();
    assert_eq!(status.code, 2, "error");
    assert_eq!(status.message, "no_endpoints");
}

/// A request whose client went away before its answer still ends its span, with the
/// attempt on its way and no response status.
#[tokio::test]
async fn a_request_whose_client_went_away_ends_its_span_without_a_status() {
    let (receiver, collector, _rx) = Receiver::start().await;
    let app = HangingApp::start("127.0.0.3").await;
    let proxy = Proxy::new();
    let _t = trace(&proxy, collector, "1", "client");
    let proxy = TestProxy::start_with(proxy, "web", config(&[("web", &[app.addr])]));
    app.request_and_go_away(proxy.addr, 1).await;
    let spans = receiver.settled(1).await;
    assert_eq!(spans.len(), 1);
    let a = attrs(&spans[0]);
    assert_eq!(a["url.path"], "/long-poll");
    assert_eq!(a["weft.attempts"], "1");
    assert!(!a.contains_key("http.response.status_code"), "{a:?}");
}

/// A writer the test reads back.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_access_log_line_carries_the_trace_id_of_a_started_trace() {
    let (_receiver, collector, _rx) = Receiver::start().await;
    let app = Scripted::ok("127.0.0.3", "app").await;
    let proxy = Proxy::new();
    let sink = Sink::default();
    let log = AccessLog::start(
        Format::Json,
        Box::new(sink.clone()),
        Counter::default(),
        Counter::default(),
    )
    .unwrap();
    proxy.access_log.set(log).unwrap();
    // Not sampled: the trace id is there all the same.
    let _t = trace(&proxy, collector, "0", "client");
    let proxy = TestProxy::start_with(proxy, "web", config(&[("web", &[app.addr])]));
    assert_eq!(send(&proxy.url("/"), &[]).await.status(), 200);
    let (trace_id, _, _) = traceparent(&app.last().header_values("traceparent")[0]);
    let mut line = String::new();
    for _ in 0..200 {
        line = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        if !line.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let line: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(line["trace_id"], trace_id.as_str());
}

#[tokio::test]
async fn a_dead_collector_leaves_requests_unaffected() {
    let dead = refused_addr("127.0.0.1").await;
    let app = Scripted::ok("127.0.0.3", "app").await;
    let proxy = Proxy::new();
    let _t = trace(&proxy, dead, "1", "client");
    let metrics = proxy.metrics.clone();
    let proxy = TestProxy::start_with(proxy, "web", config(&[("web", &[app.addr])]));
    let client = h1_client();
    let started = std::time::Instant::now();
    for _ in 0..50 {
        let (resp, body) = get(&client, &proxy.url("/")).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(body, "hello from app");
    }
    // Fifty requests on loopback: far below one export timeout, so nothing waited on it.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(app.requests(), 50);
    eventually(Duration::from_secs(10), "spans counted as dropped", || {
        let m = metrics.clone();
        async move { m.trace.dropped_total(DropReason::ExportFailed) == 50 }
    })
    .await;
    assert_eq!(metrics.trace.exported_total(), 0);
    let text = metrics.encode().unwrap();
    assert!(
        text.contains("weft_trace_spans_dropped_total{reason=\"export_failed\"} 50"),
        "{text}"
    );
}

/// The binary's flags: `--trace-collector`, `--trace-sampling` and
/// `--trace-service-name` turn tracing on as the in-process tests do, and the spans'
/// resource names the service.
#[tokio::test]
async fn the_proxy_binary_exports_with_its_flags() {
    let (receiver, collector, _rx) = Receiver::start().await;
    let app = Scripted::ok("127.0.0.3", "app").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    write_config(&path, &config(&[("web", &[app.addr])]));
    let child = ChildProxy::start(
        &path,
        &[
            "--trace-collector",
            &collector.to_string(),
            "--trace-sampling",
            "1",
            "--trace-service-name",
            "checkout",
        ],
    )
    .await;
    let resp = send(&format!("http://{}/cart", child.forward), &[]).await;
    assert_eq!(resp.status(), 200);
    let (trace_id, parent, _) = traceparent(&app.last().header_values("traceparent")[0]);
    let spans = receiver.settled(1).await;
    assert_eq!(spans.len(), 1, "{spans:#?}");
    assert_eq!(hex(&spans[0].trace_id), trace_id);
    assert_eq!(hex(&spans[0].span_id), parent);
    assert_eq!(*receiver.services.lock().unwrap(), ["checkout"]);
    let metrics = child.metrics().await;
    assert!(
        metrics.contains("weft_trace_spans_exported_total 1"),
        "{metrics}"
    );
}
