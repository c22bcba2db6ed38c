//! Prometheus metrics, registered once and shared by every listener. Labels are bounded:
//! `direction` (two values), `service` (configured service names, or `passthrough` /
//! `local`), `route` and `rule` (the Route rule that handled a request: at most
//! [`crate::rules::MAX_RULES`] per service, and absent when none did), `status_class`
//! (`1xx`…`5xx`), `reason` ([`ErrorCode`]). No path, no client address.

use std::{
    fmt::Write as _,
    sync::{Arc, OnceLock, atomic::AtomicU64},
};

use prometheus_client::{
    encoding::{
        EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder, text::encode,
    },
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{errors::ErrorCode, limits::Limit, traffic_metrics::TrafficMetrics};

/// Which way traffic flows through the proxy, relative to its own pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From other pods into the local application.
    Inbound,
    /// From the local application to services.
    Outbound,
}

impl Direction {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// A service name as a cheaply cloned label value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceLabel(pub Arc<str>);

impl ServiceLabel {
    /// The label for traffic to destinations no service claims.
    pub fn passthrough() -> Self {
        ServiceLabel(Arc::from("passthrough"))
    }
    /// The label for requests to a cluster address no service claims any more.
    pub fn unknown() -> Self {
        ServiceLabel(Arc::from("unknown"))
    }
    /// The label for inbound traffic to the local application.
    pub fn local() -> Self {
        ServiceLabel(Arc::from("local"))
    }
}

impl EncodeLabelValue for ServiceLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

/// The Route rule that handled a request: the `route` (`namespace/name`) and `rule` (the
/// rule's name, or its index) labels, or neither when no rule did (no Route, or no rule
/// matched). Absent rather than empty, so that a request no rule handled keeps the
/// series it had before Routes existed; Prometheus reads an absent label as `""`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RouteRuleLabel(Option<(Arc<str>, Arc<str>)>);

impl RouteRuleLabel {
    /// Rule `rule` of Route `route`.
    pub fn new(route: Arc<str>, rule: Arc<str>) -> Self {
        RouteRuleLabel(Some((route, rule)))
    }
}

impl EncodeLabelSet for RouteRuleLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        match &self.0 {
            Some((route, rule)) => [("route", &**route), ("rule", &**rule)].encode(encoder),
            None => Ok(()),
        }
    }
}

/// The client's mesh identity on an inbound request that came over mutual TLS: the
/// `client_id` label (its SPIFFE ID). Absent on plain-text inbound requests and on
/// outbound ones, which keep the series they had before identities existed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientLabel(Option<Arc<str>>);

impl ClientLabel {
    /// The client identified as `identity` (a SPIFFE ID).
    pub fn identified(identity: Arc<str>) -> Self {
        ClientLabel(Some(identity))
    }
}

impl EncodeLabelSet for ClientLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        match &self.0 {
            Some(id) => [("client_id", &**id)].encode(encoder),
            None => Ok(()),
        }
    }
}

/// Labels of request counters and latency.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// Inbound or outbound.
    pub direction: Direction,
    /// The destination service.
    pub service: ServiceLabel,
    /// The Route rule that handled the request, when one did.
    #[prometheus(flatten)]
    pub rule: RouteRuleLabel,
    /// Inbound over mutual TLS: the client's identity.
    #[prometheus(flatten)]
    pub client: ClientLabel,
}

/// Labels of response counters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResponseLabels {
    /// Inbound or outbound.
    pub direction: Direction,
    /// The destination service.
    pub service: ServiceLabel,
    /// The Route rule that handled the request, when one did.
    #[prometheus(flatten)]
    pub rule: RouteRuleLabel,
    /// Inbound over mutual TLS: the client's identity.
    #[prometheus(flatten)]
    pub client: ClientLabel,
    /// `1xx` to `5xx`.
    pub status_class: &'static str,
}

/// Labels of per-direction connection metrics.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DirectionLabels {
    /// Inbound or outbound.
    pub direction: Direction,
}

/// Labels of error counters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Inbound or outbound.
    pub direction: Direction,
    /// The stable error code.
    pub reason: &'static str,
}

/// Labels of the requests connection pools sent again.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResendLabels {
    /// Inbound or outbound.
    pub direction: Direction,
    /// `unwritten` or `unanswered` (see [`Resends`]).
    pub reason: &'static str,
}

/// Where one direction's HTTP/1 connection pools count the requests they sent again on
/// another connection (`weft_upstream_resends_total`): made once, so that a request never
/// looks its labels up.
#[derive(Clone, Debug, Default)]
pub struct Resends {
    /// Requests a kept-alive connection was found closed under before they were written.
    pub unwritten: Counter,
    /// Requests safe to repeat that were written on a kept-alive connection the endpoint
    /// then closed or reset without answering.
    pub unanswered: Counter,
}

/// Labels of the counter of connections accepted before the first config.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BeforeConfigLabels {
    /// Inbound or outbound.
    pub direction: Direction,
    /// `passthrough` or `refuse`: the `WEFT_BEFORE_CONFIG` setting in force.
    pub action: &'static str,
}

/// Labels of limit refusals.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LimitLabels {
    /// Which limit ([`Limit::as_str`]).
    pub limit: &'static str,
}

/// Labels of per-service gauges.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ServiceOnly {
    /// The service.
    pub service: ServiceLabel,
}

/// Labels of connection-pool refusals.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OverloadedLabels {
    /// The service.
    pub service: ServiceLabel,
    /// `max_requests`, `max_pending_requests` or `max_connections`.
    pub limit: &'static str,
}

/// Labels of dry-run decisions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DryRunLabels {
    /// The service.
    pub service: ServiceLabel,
    /// What would have happened: `ejection`, `overloaded`, `retry_budget` or `rate_limit`.
    pub kind: &'static str,
}

/// Labels of the config info metric.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct VersionLabels {
    /// The active config's version label.
    pub version: String,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    responses: Family<ResponseLabels, Counter>,
    latency: Family<RequestLabels, Histogram, fn() -> Histogram>,
    tcp_opened: Family<DirectionLabels, Counter>,
    tcp_closed: Family<DirectionLabels, Counter>,
    tcp_open: Family<DirectionLabels, Gauge>,
    bytes_read: Family<DirectionLabels, Counter>,
    bytes_written: Family<DirectionLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    before_config: Family<BeforeConfigLabels, Counter>,
    limit_refusals: Family<LimitLabels, Counter>,
    endpoints: Family<ServiceOnly, Gauge>,
    breaker_ejected: Family<ServiceOnly, Gauge>,
    breaker_ejections: Family<ServiceOnly, Counter>,
    breaker_overloaded: Family<OverloadedLabels, Counter>,
    dry_run_decisions: Family<DryRunLabels, Counter>,
    config_generation: Gauge,
    config_last_update: Gauge<f64, AtomicU64>,
    config_info: Family<VersionLabels, Gauge>,
    config_rejected: Counter,
    control_failures: Family<[(&'static str, &'static str); 1], Counter>,
    /// Inbound's, then outbound's.
    resends: [Resends; 2],
    /// What Routes, retry budgets, faults, mirrors and rate limits did.
    pub traffic: TrafficMetrics,
    /// Access-log lines written.
    pub access_log_lines: Counter,
    /// Access-log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
    /// The proxy's certificate and its mutual TLS sessions.
    pub tls: TlsMetrics,
    /// Spans exported and dropped.
    pub trace: crate::trace::TraceMetrics,
}

/// The proxy's certificate and its mutual TLS sessions. Labels are bounded: `direction`,
/// `protocol` ([`crate::identity::Inner::as_str`]), `result` (`ok`, `error`) and `reason`
/// ([`crate::identity::TlsFailure::as_str`], or for sessions ended
/// [`crate::identity::session::EndReason::as_str`]).
#[derive(Clone, Debug, Default)]
pub struct TlsMetrics {
    expiry: Gauge,
    renewals: Family<[(&'static str, &'static str); 1], Counter>,
    sessions: Family<[(&'static str, &'static str); 2], Counter>,
    refused: Family<[(&'static str, &'static str); 2], Counter>,
    ended: Family<[(&'static str, &'static str); 2], Counter>,
}

impl TlsMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "identity_expiry_timestamp_seconds",
            "Unix time at which the proxy's certificate expires (0: none yet)",
            self.expiry.clone(),
        );
        registry.register(
            "identity_renewals",
            "Certificate requests to the operator, by result",
            self.renewals.clone(),
        );
        registry.register(
            "tls_sessions",
            "Mutual TLS sessions established with peer proxies, by what they carry",
            self.sessions.clone(),
        );
        registry.register(
            "tls_refused",
            "Mutual TLS handshakes refused or failed, by direction and reason",
            self.refused.clone(),
        );
        registry.register(
            "tls_sessions_ended",
            "Established mutual TLS sessions ended by this proxy because a certificate that admitted them is no longer valid (or is about to end, for its own), by direction and reason",
            self.ended.clone(),
        );
    }

    /// Records a certificate request's outcome, and the expiry of the certificate in use.
    pub fn renewal(&self, ok: bool, not_after_unix: Option<u64>) {
        let result = if ok { "ok" } else { "error" };
        self.renewals.get_or_create(&[("result", result)]).inc();
        if let Some(t) = not_after_unix {
            self.expiry.set(i64::try_from(t).unwrap_or(i64::MAX));
        }
    }

    /// Counts an established session that carries `inner` (`None`: no ALPN agreed, the
    /// label `none`).
    pub fn session(&self, direction: Direction, inner: Option<crate::identity::Inner>) {
        self.sessions
            .get_or_create(&[
                ("direction", direction.as_str()),
                (
                    "protocol",
                    inner.map_or("none", crate::identity::Inner::as_str),
                ),
            ])
            .inc();
    }

    /// Counts a session ended because a certificate that admitted it is no longer valid.
    pub fn ended(&self, direction: Direction, reason: crate::identity::session::EndReason) {
        self.ended
            .get_or_create(&[
                ("direction", direction.as_str()),
                ("reason", reason.as_str()),
            ])
            .inc();
    }

    /// Counts a refused or failed handshake.
    pub fn refused(&self, direction: Direction, failure: crate::identity::TlsFailure) {
        self.refused
            .get_or_create(&[
                ("direction", direction.as_str()),
                ("reason", failure.as_str()),
            ])
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weft");
        let dry_run_decisions: Family<DryRunLabels, Counter> = Family::default();
        let resends: Family<ResendLabels, Counter> = Family::default();
        let resends_of = |direction| {
            let counter = |reason| {
                resends
                    .get_or_create(&ResendLabels { direction, reason })
                    .clone()
            };
            Resends {
                unwritten: counter("unwritten"),
                unanswered: counter("unanswered"),
            }
        };
        let m = Metrics {
            resends: [
                resends_of(Direction::Inbound),
                resends_of(Direction::Outbound),
            ],
            requests: Family::default(),
            responses: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_open: Family::default(),
            bytes_read: Family::default(),
            bytes_written: Family::default(),
            errors: Family::default(),
            before_config: Family::default(),
            limit_refusals: Family::default(),
            endpoints: Family::default(),
            breaker_ejected: Family::default(),
            breaker_ejections: Family::default(),
            breaker_overloaded: Family::default(),
            traffic: TrafficMetrics::new(dry_run_decisions.clone()),
            access_log_lines: Counter::default(),
            access_log_dropped: Counter::default(),
            dry_run_decisions,
            tls: TlsMetrics::default(),
            trace: crate::trace::TraceMetrics::default(),
            config_generation: Gauge::default(),
            config_last_update: Gauge::default(),
            config_info: Family::default(),
            config_rejected: Counter::default(),
            control_failures: Family::default(),
            registry: Registry::default(),
        };
        m.traffic.register(&mut registry);
        m.tls.register(&mut registry);
        m.trace.register(&mut registry);
        registry.register(
            "access_log_lines",
            "Access-log lines written",
            m.access_log_lines.clone(),
        );
        registry.register(
            "access_log_dropped",
            "Access-log lines dropped because the writer fell behind (the request path never waits for it)",
            m.access_log_dropped.clone(),
        );
        registry.register(
            "requests",
            "HTTP requests received, by direction and destination service",
            m.requests.clone(),
        );
        registry.register(
            "responses",
            "HTTP responses sent, by direction, service and status class",
            m.responses.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from receiving a request to sending its response headers",
            m.latency.clone(),
        );
        registry.register(
            "tcp_connections_opened",
            "Accepted TCP connections",
            m.tcp_opened.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "Closed accepted TCP connections",
            m.tcp_closed.clone(),
        );
        registry.register(
            "tcp_connections_open",
            "Currently open accepted TCP connections",
            m.tcp_open.clone(),
        );
        registry.register(
            "tcp_read_bytes",
            "Bytes read from accepted connections",
            m.bytes_read.clone(),
        );
        registry.register(
            "tcp_write_bytes",
            "Bytes written to accepted connections",
            m.bytes_written.clone(),
        );
        registry.register(
            "errors",
            "Failures the proxy answered or dropped itself, by reason code",
            m.errors.clone(),
        );
        registry.register(
            "before_config_connections",
            "Connections accepted before the first config, passed through or refused",
            m.before_config.clone(),
        );
        registry.register(
            "limit_refusals",
            "Connections, streams or requests refused or cut because a limit bit",
            m.limit_refusals.clone(),
        );
        registry.register(
            "service_endpoints",
            "Endpoints per service in the active config",
            m.endpoints.clone(),
        );
        registry.register(
            "breaker_ejected_endpoints",
            "Endpoints a service's Breaker has ejected from load balancing now",
            m.breaker_ejected.clone(),
        );
        registry.register(
            "breaker_ejections",
            "Endpoints ejected by outlier detection",
            m.breaker_ejections.clone(),
        );
        registry.register(
            "breaker_overloaded",
            "Requests refused with 503 overloaded by a connection-pool limit",
            m.breaker_overloaded.clone(),
        );
        registry.register(
            "dry_run_decisions",
            "Decisions a policy in dry run would have made and did not: ejections and overloads (Breakers), retries over budget, rate-limit refusals",
            m.dry_run_decisions.clone(),
        );
        registry.register(
            "config_generation",
            "How many configs this process has accepted",
            m.config_generation.clone(),
        );
        registry.register(
            "config_last_update_timestamp_seconds",
            "Unix time at which the active config was accepted",
            m.config_last_update.clone(),
        );
        registry.register(
            "config_info",
            "Always 1, labelled with the active config's version",
            m.config_info.clone(),
        );
        registry.register(
            "config_rejected",
            "Configs rejected as invalid",
            m.config_rejected.clone(),
        );
        registry.register(
            "control_stream_failures",
            "Config streams to the operator that failed or ended, by reason (tls_untrusted: the operator's certificate does not verify against the trust root)",
            m.control_failures.clone(),
        );
        registry.register(
            "upstream_resends",
            "Requests an HTTP/1 connection pool sent again on another connection because the endpoint closed a kept-alive one under them: unwritten (found closed as the request was written), unanswered (written, closed without an answer; only requests safe to repeat)",
            resends,
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// The series that requests of `direction` to `service` update. Callers on the request
    /// path keep the result (per service, per connection) rather than calling this per
    /// request: each call hashes the label set under the families' locks.
    pub fn for_requests(&self, direction: Direction, service: &ServiceLabel) -> RequestMetrics {
        self.for_rule_requests(direction, service, RouteRuleLabel::default())
    }

    /// The series that requests of `direction` to `service` handled by Route rule `rule`
    /// update; kept per rule as [`Metrics::for_requests`]' result is per service.
    pub fn for_rule_requests(
        &self,
        direction: Direction,
        service: &ServiceLabel,
        rule: RouteRuleLabel,
    ) -> RequestMetrics {
        self.series(RequestLabels {
            direction,
            service: service.clone(),
            rule,
            client: ClientLabel::default(),
        })
    }

    /// The series that inbound requests to `service` from `client` update; kept per
    /// connection, whose client is one for its life.
    pub fn for_client_requests(
        &self,
        service: &ServiceLabel,
        client: ClientLabel,
    ) -> RequestMetrics {
        self.series(RequestLabels {
            direction: Direction::Inbound,
            service: service.clone(),
            rule: RouteRuleLabel::default(),
            client,
        })
    }

    fn series(&self, labels: RequestLabels) -> RequestMetrics {
        RequestMetrics {
            requests: self.requests.get_or_create(&labels).clone(),
            latency: OnceLock::new(),
            latency_family: self.latency.clone(),
            responses: Default::default(),
            responses_family: self.responses.clone(),
            labels,
        }
    }

    /// Counts an error by reason.
    pub fn error(&self, direction: Direction, code: ErrorCode) {
        self.errors
            .get_or_create(&ErrorLabels {
                direction,
                reason: code.as_str(),
            })
            .inc();
    }

    /// Counts a connection accepted before the first config, by what was done with it
    /// (`passthrough` or `refuse`).
    pub fn before_config(&self, direction: Direction, action: &'static str) {
        self.before_config
            .get_or_create(&BeforeConfigLabels { direction, action })
            .inc();
    }

    /// Counts one refusal by `limit`.
    pub fn limit_refused(&self, limit: Limit) {
        self.limit_refusals
            .get_or_create(&LimitLabels {
                limit: limit.as_str(),
            })
            .inc();
    }

    /// Records an accepted connection; the returned guard records its close.
    pub fn connection(self: &Arc<Self>, direction: Direction) -> ConnectionGuard {
        let labels = DirectionLabels { direction };
        self.tcp_opened.get_or_create(&labels).inc();
        self.tcp_open.get_or_create(&labels).inc();
        ConnectionGuard {
            read: self.bytes_read.get_or_create(&labels).clone(),
            written: self.bytes_written.get_or_create(&labels).clone(),
            metrics: self.clone(),
            labels,
        }
    }

    /// Replaces the per-service endpoint gauges and the config gauges after a config swap.
    pub fn config_applied(
        &self,
        generation: u64,
        version: &str,
        services: impl Iterator<Item = (ServiceLabel, usize)>,
    ) {
        self.endpoints.clear();
        for (service, n) in services {
            self.endpoints
                .get_or_create(&ServiceOnly { service })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.config_generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.config_last_update.set(now);
        self.config_info.clear();
        self.config_info
            .get_or_create(&VersionLabels {
                version: version.to_owned(),
            })
            .set(1);
    }

    /// Where `direction`'s connection pools count the requests they send again.
    pub fn resends(&self, direction: Direction) -> &Resends {
        match direction {
            Direction::Inbound => &self.resends[0],
            Direction::Outbound => &self.resends[1],
        }
    }

    /// Counts a config stream to the operator that failed or ended, by `reason`
    /// ([`crate::control::ControlError::reason`]).
    pub fn control_stream_failure(&self, reason: &'static str) {
        self.control_failures
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// Counts a config rejected as invalid.
    pub fn config_rejected(&self) {
        self.config_rejected.inc();
    }
}

/// The breaker series of one service. Breakers act rarely (an ejection, a refusal), so
/// the series are looked up when they do, and appear only once they have.
#[derive(Clone)]
pub struct BreakerMetrics {
    service: ServiceLabel,
    ejected: Family<ServiceOnly, Gauge>,
    ejections: Family<ServiceOnly, Counter>,
    overloaded: Family<OverloadedLabels, Counter>,
    dry_run: Family<DryRunLabels, Counter>,
}

impl std::fmt::Debug for BreakerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BreakerMetrics({})", self.service.0)
    }
}

impl Metrics {
    /// The breaker series of `service`.
    pub fn breaker(&self, service: &ServiceLabel) -> BreakerMetrics {
        BreakerMetrics {
            service: service.clone(),
            ejected: self.breaker_ejected.clone(),
            ejections: self.breaker_ejections.clone(),
            overloaded: self.breaker_overloaded.clone(),
            dry_run: self.dry_run_decisions.clone(),
        }
    }
}

impl BreakerMetrics {
    fn only(&self) -> ServiceOnly {
        ServiceOnly {
            service: self.service.clone(),
        }
    }

    /// Sets how many endpoints are ejected now.
    pub fn set_ejected(&self, n: usize) {
        self.ejected
            .get_or_create(&self.only())
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts one ejection.
    pub fn ejection(&self) {
        self.ejections.get_or_create(&self.only()).inc();
    }

    /// Counts one request refused by `limit`.
    pub fn overloaded(&self, limit: &'static str) {
        self.overloaded
            .get_or_create(&OverloadedLabels {
                service: self.service.clone(),
                limit,
            })
            .inc();
    }

    /// Counts one decision a dry run did not act on (`ejection` or `overloaded`).
    pub fn dry_run(&self, kind: &'static str) {
        self.dry_run
            .get_or_create(&DryRunLabels {
                service: self.service.clone(),
                kind,
            })
            .inc();
    }
}

/// The request series of one direction and service, looked up once ([`Metrics::for_requests`])
/// and then updated without hashing labels or taking the families' locks.
#[derive(Debug)]
pub struct RequestMetrics {
    labels: RequestLabels,
    requests: Counter,
    // The latency and response series are created on first use, so that `/metrics` shows
    // only what occurred, exactly as when every request looked them up.
    latency: OnceLock<Histogram>,
    latency_family: Family<RequestLabels, Histogram, fn() -> Histogram>,
    /// One per status class, indexed by [`status_class_index`].
    responses: [OnceLock<Counter>; 5],
    responses_family: Family<ResponseLabels, Counter>,
}

impl RequestMetrics {
    /// Counts a request.
    pub fn request(&self) {
        self.requests.inc();
    }

    /// Records a response's status and the latency to its headers.
    pub fn response(&self, status: http::StatusCode, seconds: f64) {
        let (index, class) = status_class_index(status);
        self.responses[index]
            .get_or_init(|| {
                self.responses_family
                    .get_or_create(&ResponseLabels {
                        direction: self.labels.direction,
                        service: self.labels.service.clone(),
                        rule: self.labels.rule.clone(),
                        client: self.labels.client.clone(),
                        status_class: class,
                    })
                    .clone()
            })
            .inc();
        self.latency
            .get_or_init(|| self.latency_family.get_or_create(&self.labels).clone())
            .observe(seconds);
    }
}

/// Tracks one accepted connection's bytes and, on drop, its close.
#[derive(Debug)]
pub struct ConnectionGuard {
    metrics: Arc<Metrics>,
    labels: DirectionLabels,
    /// Bytes read from the client.
    pub read: Counter,
    /// Bytes written to the client.
    pub written: Counter,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.metrics.tcp_closed.get_or_create(&self.labels).inc();
        self.metrics.tcp_open.get_or_create(&self.labels).dec();
    }
}

/// `1xx` … `5xx`.
pub fn status_class(status: http::StatusCode) -> &'static str {
    status_class_index(status).1
}

/// The status class as an index `0..5` and as its label value.
fn status_class_index(status: http::StatusCode) -> (usize, &'static str) {
    match status.as_u16() {
        100..=199 => (0, "1xx"),
        200..=299 => (1, "2xx"),
        300..=399 => (2, "3xx"),
        400..=499 => (3, "4xx"),
        _ => (4, "5xx"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traffic_metrics::{DryRun, RouteEvent};

    /// Each family is registered once: Prometheus refuses an exposition that declares a
    /// name twice, and the breakers and the traffic policies share the dry-run family.
    #[test]
    fn every_family_is_declared_once_and_dry_runs_share_one() {
        let m = Metrics::new();
        let web = ServiceLabel(Arc::from("web"));
        m.breaker(&web).dry_run("ejection");
        m.traffic.dry_run(&web, DryRun::RetryBudget);
        m.traffic.route_event(
            &web,
            &Arc::from("shop/web"),
            &Arc::from("0"),
            RouteEvent::Retry,
        );
        m.traffic.rate_limited("shop/limit");
        let text = m.encode().unwrap();
        let mut names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let all = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all, "{text}");
        assert!(
            text.contains(r#"weft_dry_run_decisions_total{service="web",kind="ejection"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"weft_dry_run_decisions_total{service="web",kind="retry_budget"} 1"#),
            "{text}"
        );
    }
}
