//! Distributed tracing: the proxy continues the trace a request arrives with (W3C
//! `traceparent`, B3 single or multi), or starts one, records one span per request per
//! hop (server span inbound, client span outbound), and exports sampled spans over OTLP
//! to a collector. Off unless a collector is configured (`--trace-collector`).
//!
//! ```text
//! request ──Tracer::begin──▶ Hop (ids, sampled) ──Hop::write──▶ headers sent upstream
//!    │                         └─ sampled: OpenSpan, filled by the stages (attempts)
//!    └─ response body ends ──OpenSpan::finish──try_send──▶ bounded queue (2,048 spans)
//!                    full: dropped and counted (weft_trace_spans_dropped_total)
//!    export task (every 200 ms) ──batches of ≤ 512──OTLP/gRPC──▶ collector
//! ```
//!
//! The proxy builds its spans itself and sends them with `opentelemetry-proto`'s
//! generated OTLP types over tonic, instead of going through the OpenTelemetry SDK: the
//! request path then does no more than fill a plain struct and hand it to a queue that
//! never waits, and the queue's bound and its drop counter are the proxy's own. Nothing
//! on the request path waits on the collector: a slow or dead collector costs spans
//! (counted), never latency.
//!
//! Retries are events of the hop's one span (`attempt`, one per attempt sent upstream),
//! not child spans: one span per hop is what a trace view shows per proxy, and the
//! attempts stay readable on it in order.

pub mod context;
pub mod export;

use std::{
    net::SocketAddr,
    str::FromStr,
    sync::{
        Arc,
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, Instant, SystemTime},
};

use http::{HeaderMap, Method, Uri};
use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

pub use context::{Hop, Incoming, SpanId, TraceId};

use crate::metrics::Direction;

/// Finished spans waiting for export; more are dropped. It holds two seconds of a
/// sidecar's sampled requests at 1,000 per second, which rides out one slow export, and
/// bounds memory (a span is a few hundred bytes: under a megabyte in all). Emptied every
/// [`FLUSH_INTERVAL`], it lets about 10,000 spans per second through.
pub const SPAN_QUEUE: usize = 2048;

/// The most spans sent in one export request.
pub const MAX_BATCH: usize = 512;

/// How often the export task wakes to send what has queued. The request path never
/// wakes it: a wake-up per span would cost more than the span. Five wake-ups a second
/// cost nothing measurable, and let a full queue drain before it overflows at up to
/// about 10,000 sampled requests per second.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// The default probability of recording a trace that the proxy starts.
pub const DEFAULT_SAMPLING: f64 = 0.01;

/// The probability (0 to 1) of recording a trace the proxy starts itself; a trace that
/// arrives with a sampling decision keeps it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling(f64);

impl Sampling {
    /// The probability.
    pub fn rate(self) -> f64 {
        self.0
    }
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling(DEFAULT_SAMPLING)
    }
}

impl FromStr for Sampling {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().parse::<f64>() {
            Ok(p) if (0.0..=1.0).contains(&p) => Ok(Sampling(p)),
            _ => Err(format!(
                "{s:?}: expected a probability from 0 to 1, such as 0.01"
            )),
        }
    }
}

impl std::fmt::Display for Sampling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An OTLP/gRPC collector (`host:port`, or `http://host:port`), reached in plain-text
/// HTTP/2 (port 4317 is OTLP/gRPC's default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Collector(Uri);

impl Collector {
    /// The collector's URI.
    pub fn uri(&self) -> &Uri {
        &self.0
    }
}

impl FromStr for Collector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let full = if s.contains("://") {
            s.to_owned()
        } else {
            format!("http://{s}")
        };
        let uri: Uri = full
            .parse()
            .map_err(|_| format!("{s:?}: expected host:port, such as otel-collector:4317"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "{s:?}: only plain-text OTLP/gRPC (http://) is supported"
            ));
        }
        let Some(authority) = uri.authority() else {
            return Err(format!("{s:?}: no host"));
        };
        if authority.host().is_empty() || authority.port_u16().is_none_or(|p| p == 0) {
            return Err(format!(
                "{s:?}: expected host:port with a port, such as otel-collector:4317"
            ));
        }
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            return Err(format!("{s:?}: an OTLP/gRPC collector takes no path"));
        }
        Ok(Collector(uri))
    }
}

impl std::fmt::Display for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The tracing settings of one proxy, validated at startup.
#[derive(Clone, Debug)]
pub struct TraceConfig {
    /// Where spans go.
    pub collector: Collector,
    /// How many of the traces the proxy starts are recorded.
    pub sampling: Sampling,
    /// The OTLP resource attributes (`service.name`, `k8s.pod.name`, …) of every span.
    pub resource: Vec<(&'static str, String)>,
}

/// The tracing counters (`weft_trace_spans_*`).
#[derive(Clone, Debug, Default)]
pub struct TraceMetrics {
    exported: Counter,
    dropped: Family<[(&'static str, &'static str); 1], Counter>,
}

/// Why a span was not exported: the `reason` label of `weft_trace_spans_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The export queue was full.
    QueueFull,
    /// The collector refused the export, failed or did not answer in time.
    ExportFailed,
}

impl DropReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::ExportFailed => "export_failed",
        }
    }
}

impl TraceMetrics {
    /// Registers the counters under `weft_`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "trace_spans_exported",
            "Spans the trace collector accepted",
            self.exported.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Spans not exported, by reason (queue_full: the export queue was full; export_failed: the collector failed or did not answer); the request path never waits for export",
            self.dropped.clone(),
        );
    }

    /// Counts `n` spans exported.
    pub fn exported(&self, n: u64) {
        self.exported.inc_by(n);
    }

    /// Counts `n` spans dropped for `reason`.
    pub fn dropped(&self, reason: DropReason, n: u64) {
        self.dropped
            .get_or_create(&[("reason", reason.as_str())])
            .inc_by(n);
    }

    /// Spans exported so far.
    pub fn exported_total(&self) -> u64 {
        self.exported.get()
    }

    /// Spans dropped so far for `reason`.
    pub fn dropped_total(&self, reason: DropReason) -> u64 {
        self.dropped
            .get_or_create(&[("reason", reason.as_str())])
            .get()
    }
}

/// One proxy's tracer: the sampling rate and the queue of finished spans.
#[derive(Debug)]
pub struct Tracer {
    rate: f64,
    queue: SyncSender<SpanRecord>,
    metrics: TraceMetrics,
}

impl Tracer {
    /// A tracer whose spans the returned [`export::Exporter`] sends to the collector (its
    /// `run` is the export task).
    pub fn new(config: TraceConfig, metrics: TraceMetrics) -> (Arc<Tracer>, export::Exporter) {
        let (tx, rx): (SyncSender<SpanRecord>, Receiver<SpanRecord>) = sync_channel(SPAN_QUEUE);
        let tracer = Arc::new(Tracer {
            rate: config.sampling.rate(),
            queue: tx,
            metrics: metrics.clone(),
        });
        (tracer, export::Exporter::new(rx, config, metrics))
    }

    /// This hop's context for a request arriving with `headers`.
    pub fn begin(&self, headers: &HeaderMap) -> (Incoming, Hop) {
        let incoming = Incoming::read(headers);
        let hop = Hop::continue_or_start(&incoming, self.rate, &mut rand::rng());
        (incoming, hop)
    }

    /// Queues a finished span; when the queue is full, drops it and counts it. Never waits.
    fn record(&self, span: SpanRecord) {
        match self.queue.try_send(span) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.metrics.dropped(DropReason::QueueFull, 1);
            }
        }
    }
}

/// What ended one attempt sent upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// A response with this status.
    Status(u16),
    /// No response: this `weft-error` reason.
    Failed(&'static str),
}

/// One attempt, as an event of the hop's span.
#[derive(Clone, Debug)]
pub struct AttemptEvent {
    /// When it was sent.
    pub at: SystemTime,
    /// How long until its response headers or its failure.
    pub took: Duration,
    /// The endpoint it went to.
    pub endpoint: SocketAddr,
    /// How it ended.
    pub outcome: AttemptOutcome,
}

/// A finished span, as queued for export.
#[derive(Clone, Debug)]
pub struct SpanRecord {
    /// The ids.
    pub hop: Hop,
    /// Inbound (a server span) or outbound (a client span).
    pub direction: Direction,
    /// When the request arrived.
    pub start: SystemTime,
    /// From arrival to the end of the response body.
    pub duration: Duration,
    /// The request method.
    pub method: Method,
    /// `Host` or `:authority`.
    pub authority: String,
    /// The path, without the query string (which may carry secrets).
    pub path: String,
    /// The status sent to the client.
    pub status: u16,
    /// The `weft-error` reason, when the proxy answered itself.
    pub reason: Option<String>,
    /// The peer's mesh identity: the client's inbound, the endpoint's expected one
    /// outbound.
    pub peer_identity: Option<String>,
    /// Attempts sent upstream.
    pub attempts: u32,
    /// The endpoint of the last attempt.
    pub upstream: Option<SocketAddr>,
    /// The Route and rule the request matched.
    pub route: Option<(Arc<str>, Arc<str>)>,
    /// The attempts, in order.
    pub events: Vec<AttemptEvent>,
}

/// A sampled request's span while the request runs; finished when its response body ends.
#[derive(Debug)]
pub struct OpenSpan {
    /// The span so far.
    pub record: SpanRecord,
    started: Instant,
    tracer: Arc<Tracer>,
}

impl OpenSpan {
    /// A span for the request whose head is `method`, `authority` and `path`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tracer: Arc<Tracer>,
        hop: Hop,
        direction: Direction,
        start: SystemTime,
        started: Instant,
        method: Method,
        authority: String,
        path: String,
    ) -> OpenSpan {
        OpenSpan {
            record: SpanRecord {
                hop,
                direction,
                start,
                duration: Duration::ZERO,
                method,
                authority,
                path,
                status: 0,
                reason: None,
                peer_identity: None,
                attempts: 0,
                upstream: None,
                route: None,
                events: Vec::new(),
            },
            started,
            tracer,
        }
    }

    /// Ends the span now and queues it for export.
    pub fn finish(mut self) {
        self.record.duration = self.started.elapsed();
        self.tracer.record(self.record);
    }
}

/// What the request path learns for its span and writes into the request it sends on.
#[derive(Clone, Copy, Debug)]
pub struct Propagate {
    /// How the request arrived.
    pub incoming: Incoming,
    /// This hop.
    pub hop: Hop,
}

impl Propagate {
    /// Writes this hop's context into the request's headers.
    pub fn write(&self, headers: &mut HeaderMap) {
        self.hop.write(&self.incoming, headers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_is_a_probability() {
        assert_eq!("0.25".parse::<Sampling>().unwrap().rate(), 0.25);
        assert_eq!("1".parse::<Sampling>().unwrap().rate(), 1.0);
        assert_eq!("0".parse::<Sampling>().unwrap().rate(), 0.0);
        for bad in ["1.5", "-0.1", "NaN", "ten", ""] {
            assert!(bad.parse::<Sampling>().is_err(), "{bad}");
        }
    }

    #[test]
    fn collectors_are_plain_host_and_port() {
        let c: Collector = "otel:4317".parse().unwrap();
        assert_eq!(c.uri().to_string(), "http://otel:4317/");
        let c: Collector = "http://127.0.0.1:4317".parse().unwrap();
        assert_eq!(c.uri().authority().unwrap().as_str(), "127.0.0.1:4317");
        for bad in [
            "otel",
            "https://otel:4317",
            "otel:0",
            "otel:4317/v1/traces",
            ":4317",
        ] {
            assert!(bad.parse::<Collector>().is_err(), "{bad}");
        }
    }

    /// With the export task stalled (never run here), spans beyond the queue are
    /// dropped and counted, and finishing a span returns at once.
    #[test]
    fn a_full_queue_costs_spans_not_waiting() {
        let metrics = TraceMetrics::default();
        let (tracer, _exporter) = Tracer::new(
            TraceConfig {
                collector: "127.0.0.1:4317".parse().unwrap(),
                sampling: Sampling(1.0),
                resource: Vec::new(),
            },
            metrics.clone(),
        );
        let started = Instant::now();
        for _ in 0..SPAN_QUEUE + 10 {
            let (_, hop) = tracer.begin(&HeaderMap::new());
            OpenSpan::new(
                tracer.clone(),
                hop,
                Direction::Outbound,
                SystemTime::now(),
                Instant::now(),
                Method::GET,
                "web".into(),
                "/".into(),
            )
            .finish();
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(metrics.dropped_total(DropReason::QueueFull), 10);
    }
}
