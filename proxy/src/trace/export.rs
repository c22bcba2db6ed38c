//! The export task: wakes every [`super::FLUSH_INTERVAL`], takes what has queued in
//! batches of at most [`super::MAX_BATCH`], turns it into an OTLP
//! `ExportTraceServiceRequest` and sends it to the collector over gRPC. A failed or slow
//! export drops its batch (counted); spans finished meanwhile wait in the bounded queue.

use std::{
    sync::mpsc::{Receiver, TryRecvError},
    time::{Duration, SystemTime},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status},
};
use tokio_util::sync::CancellationToken;

use super::{AttemptOutcome, DropReason, MAX_BATCH, SpanRecord, TraceConfig, TraceMetrics};
use crate::metrics::Direction;

/// How long one export may take, connecting included.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long connecting to the collector may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends finished spans to the collector; [`Exporter::run`] is its task.
#[derive(Debug)]
pub struct Exporter {
    rx: Receiver<SpanRecord>,
    config: TraceConfig,
    metrics: TraceMetrics,
}

impl Exporter {
    pub(super) fn new(
        rx: Receiver<SpanRecord>,
        config: TraceConfig,
        metrics: TraceMetrics,
    ) -> Self {
        Exporter {
            rx,
            config,
            metrics,
        }
    }

    /// Exports until `stop`, then sends what is still queued once and returns.
    pub async fn run(self, stop: CancellationToken) {
        let channel = tonic::transport::Endpoint::from(self.config.collector.uri().clone())
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(EXPORT_TIMEOUT)
            .connect_lazy();
        let mut client = TraceServiceClient::new(channel);
        let resource = Resource {
            attributes: self
                .config
                .resource
                .iter()
                .map(|(k, v)| string(k, v.clone()))
                .collect(),
            ..Resource::default()
        };
        let mut failing = false;
        loop {
            let stopping = tokio::select! {
                () = stop.cancelled() => true,
                () = tokio::time::sleep(super::FLUSH_INTERVAL) => false,
            };
            loop {
                let (batch, more) = self.take();
                if batch.is_empty() {
                    break;
                }
                let n = batch.len() as u64;
                let request = ExportTraceServiceRequest {
                    resource_spans: vec![ResourceSpans {
                        resource: Some(resource.clone()),
                        scope_spans: vec![ScopeSpans {
                            scope: Some(InstrumentationScope {
                                name: "weft-proxy".to_owned(),
                                version: env!("CARGO_PKG_VERSION").to_owned(),
                                ..InstrumentationScope::default()
                            }),
                            spans: batch.iter().map(to_otlp).collect(),
                            ..ScopeSpans::default()
                        }],
                        ..ResourceSpans::default()
                    }],
                };
                let sent = tokio::time::timeout(EXPORT_TIMEOUT, client.export(request)).await;
                match sent {
                    Ok(Ok(resp)) => {
                        let rejected = resp
                            .get_ref()
                            .partial_success
                            .as_ref()
                            .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0))
                            .min(n);
                        self.metrics.exported(n - rejected);
                        if rejected > 0 {
                            self.metrics.dropped(DropReason::ExportFailed, rejected);
                        }
                        if failing {
                            tracing::info!(collector = %self.config.collector, "span export recovered");
                            failing = false;
                        }
                    }
                    Ok(Err(error)) => {
                        self.failed(n, &mut failing, &error.to_string());
                    }
                    Err(_) => self.failed(n, &mut failing, "timed out"),
                }
                if !more {
                    break;
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// Up to one batch of queued spans, and whether more are waiting.
    fn take(&self) -> (Vec<SpanRecord>, bool) {
        let mut batch = Vec::new();
        while batch.len() < MAX_BATCH {
            match self.rx.try_recv() {
                Ok(span) => batch.push(span),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return (batch, false),
            }
        }
        (batch, true)
    }

    /// Counts a failed export; warns once when exports start failing, then at debug level.
    fn failed(&self, n: u64, failing: &mut bool, error: &str) {
        self.metrics.dropped(DropReason::ExportFailed, n);
        if *failing {
            tracing::debug!(collector = %self.config.collector, error, spans = n, "span export failed");
        } else {
            tracing::warn!(collector = %self.config.collector, error, spans = n, "span export failed; spans are dropped until the collector answers");
            *failing = true;
        }
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn string(key: &str, value: String) -> KeyValue {
    attr(key, Value::StringValue(value))
}

fn attr(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..KeyValue::default()
    }
}

/// The OTLP form of a span. Attribute names follow OpenTelemetry's HTTP conventions where
/// one fits, `weft.*` otherwise.
pub fn to_otlp(r: &SpanRecord) -> Span {
    let start = unix_nanos(r.start);
    let end = start.saturating_add(u64::try_from(r.duration.as_nanos()).unwrap_or(u64::MAX));
    let mut attributes = vec![
        string("http.request.method", r.method.as_str().to_owned()),
        string("server.address", r.authority.clone()),
        string("url.path", r.path.clone()),
        string("weft.direction", r.direction.as_str().to_owned()),
        attr("weft.attempts", Value::IntValue(i64::from(r.attempts))),
    ];
    // Status 0: the client went away before an answer, so there is none to record.
    if r.status != 0 {
        attributes.push(attr(
            "http.response.status_code",
            Value::IntValue(i64::from(r.status)),
        ));
    }
    if let Some(reason) = &r.reason {
        attributes.push(string("weft.error", reason.clone()));
    }
    if let Some(id) = &r.peer_identity {
        attributes.push(string("weft.peer.identity", id.clone()));
    }
    if let Some(u) = r.upstream {
        attributes.push(string("weft.upstream", u.to_string()));
    }
    if let Some((route, rule)) = &r.route {
        attributes.push(string("weft.route", route.to_string()));
        attributes.push(string("weft.rule", rule.to_string()));
    }
    let events = r
        .events
        .iter()
        .enumerate()
        .map(|(i, e)| span::Event {
            time_unix_nano: unix_nanos(e.at),
            name: "attempt".to_owned(),
            attributes: vec![
                attr(
                    "weft.attempt",
                    Value::IntValue(i64::try_from(i + 1).unwrap_or(i64::MAX)),
                ),
                string("weft.upstream", e.endpoint.to_string()),
                string(
                    "weft.outcome",
                    match e.outcome {
                        AttemptOutcome::Status(s) => s.to_string(),
                        AttemptOutcome::Failed(reason) => reason.to_owned(),
                    },
                ),
                attr(
                    "weft.duration_ms",
                    Value::DoubleValue(e.took.as_secs_f64() * 1000.0),
                ),
            ],
            ..span::Event::default()
        })
        .collect();
    let failed = r.reason.is_some() || r.status >= 500;
    Span {
        trace_id: r.hop.trace_id.0.to_vec(),
        span_id: r.hop.span_id.0.to_vec(),
        parent_span_id: r.hop.parent.map(|p| p.0.to_vec()).unwrap_or_default(),
        // W3C trace flags: sampled.
        flags: 1,
        name: format!("{} {}", r.method, r.authority),
        kind: match r.direction {
            Direction::Inbound => span::SpanKind::Server,
            Direction::Outbound => span::SpanKind::Client,
        } as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: end,
        attributes,
        events,
        status: Some(Status {
            message: if failed {
                r.reason.clone().unwrap_or_default()
            } else {
                String::new()
            },
            code: if failed {
                status::StatusCode::Error
            } else {
                status::StatusCode::Unset
            } as i32,
        }),
        ..Span::default()
    }
}
