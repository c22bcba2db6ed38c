//! The operator's Prometheus metrics, served at `/metrics` in OpenMetrics text format.
//!
//! | metric | what |
//! | --- | --- |
//! | `weft_operator_index_objects{kind}` | objects in the index, by kind |
//! | `weft_operator_subscribers` | pods with at least one open config stream |
//! | `weft_operator_updates_pushed_total` | config updates sent to proxies |
//! | `weft_operator_push_bytes_total` | bytes of those updates |
//! | `weft_operator_nacks_total` | updates proxies rejected |
//! | `weft_operator_watch_errors_total{kind}` | failed watch requests (retried) |
//! | `weft_operator_index_change_panics_total{kind}` | index changes that panicked (a bug); the kind's watch then starts over with a full re-list |
//! | `weft_operator_change_to_ack_seconds` | from a cluster change seen by the operator to a proxy's ACK of the version containing it |
//! | `weft_operator_token_reviews_total{result}` | TokenReviews the push server asked for: `authenticated`, `rejected`, `error` |
//! | `weft_operator_push_refusals_total{reason}` | subscriptions refused, by reason (see [`crate::push::auth::AuthError::reason`] and the push server) |
//! | `weft_operator_identity_issued_total` | certificates the identity endpoint issued |
//! | `weft_operator_identity_refusals_total{reason}` | certificate requests refused, by [`weft_api::identity::reason`] |
//! | `weft_operator_identity_request_duration_seconds` | time to answer one certificate request (issued or refused) |
//! | `weft_operator_identity_abandoned_total{step}` | certificate requests whose client went away before the answer, by the step they were at: `slot`, `body`, `token_review`, `issue` |
//! | `weft_operator_identity_connections` | connections open to the identity endpoint (TLS handshakes included) |
//! | `weft_operator_identity_connections_refused_total` | connections the identity endpoint closed at accept, holding `--identity-max-connections` already |
//! | `weft_operator_identity_connections_refused_per_address_total` | connections the identity endpoint closed at accept, their address holding `--identity-max-connections-per-address` already |
//! | `weft_operator_identity_tls_handshake_failures_total{reason}` | TLS handshakes at the identity endpoint that failed, by [`crate::https::handshake_failure`] |
//! | `weft_operator_push_stalls_total` | streams closed because the proxy did not take or acknowledge an update within the ACK timeout |

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::index::Kind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabel {
    step: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Every metric of the operator.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Metrics of other parts of the process (the injection webhook), added once at start.
    extra: std::sync::OnceLock<Registry>,
    index_objects: Family<KindLabel, Gauge>,
    subscribers: Gauge,
    updates: Counter,
    bytes: Counter,
    nacks: Counter,
    watch_errors: Family<KindLabel, Counter>,
    index_change_panics: Family<KindLabel, Counter>,
    change_to_ack: Histogram,
    token_reviews: Family<ResultLabel, Counter>,
    push_refusals: Family<ReasonLabel, Counter>,
    push_stalls: Counter,
    identity_issued: Counter,
    identity_refusals: Family<ReasonLabel, Counter>,
    identity_latency: Histogram,
    identity_abandoned: Family<StepLabel, Counter>,
    identity_connections: crate::https::ConnMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics, registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weft_operator");
        let index_objects = Family::<KindLabel, Gauge>::default();
        registry.register(
            "index_objects",
            "Objects in the mesh index, by kind",
            index_objects.clone(),
        );
        let subscribers = Gauge::default();
        registry.register(
            "subscribers",
            "Pods with an open config stream",
            subscribers.clone(),
        );
        let updates = Counter::default();
        registry.register(
            "updates_pushed",
            "Config updates sent to proxies",
            updates.clone(),
        );
        let bytes = Counter::default();
        registry.register(
            "push_bytes",
            "Bytes of config updates sent to proxies",
            bytes.clone(),
        );
        let nacks = Counter::default();
        registry.register("nacks", "Config updates rejected by proxies", nacks.clone());
        let watch_errors = Family::<KindLabel, Counter>::default();
        registry.register(
            "watch_errors",
            "Failed watch requests, retried with backoff",
            watch_errors.clone(),
        );
        let index_change_panics = Family::<KindLabel, Counter>::default();
        registry.register(
            "index_change_panics",
            "Index changes that panicked (a bug); the kind's watch starts over with a full re-list",
            index_change_panics.clone(),
        );
        // 1 ms to ~65 s.
        let change_to_ack = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17),
        );
        registry.register(
            "change_to_ack_seconds",
            "Time from a cluster change seen by the operator to a proxy acknowledging it",
            change_to_ack.clone(),
        );
        let token_reviews = Family::<ResultLabel, Counter>::default();
        registry.register(
            "token_reviews",
            "TokenReviews the push server asked the API server for, by result",
            token_reviews.clone(),
        );
        let push_refusals = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "push_refusals",
            "Subscriptions the push server refused, by reason",
            push_refusals.clone(),
        );
        let push_stalls = Counter::default();
        registry.register(
            "push_stalls",
            "Push streams closed because the proxy did not take or acknowledge an update in time",
            push_stalls.clone(),
        );
        let identity_issued = Counter::default();
        registry.register(
            "identity_issued",
            "Certificates the identity endpoint issued",
            identity_issued.clone(),
        );
        let identity_refusals = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "identity_refusals",
            "Certificate requests the identity endpoint refused, by reason",
            identity_refusals.clone(),
        );
        // 250 µs to ~8 s.
        let identity_latency = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.00025, 2.0, 16),
        );
        registry.register(
            "identity_request_duration_seconds",
            "Time to answer one certificate request, issued or refused",
            identity_latency.clone(),
        );
        let identity_abandoned = Family::<StepLabel, Counter>::default();
        registry.register(
            "identity_abandoned",
            "Certificate requests whose client went away before the answer, by the step they were at",
            identity_abandoned.clone(),
        );
        let identity_connections = crate::https::ConnMetrics::default();
        identity_connections.register(&mut registry, "identity");
        identity_connections.register_per_address(&mut registry, "identity");
        Metrics {
            registry,
            identity_connections,
            identity_abandoned,
            identity_issued,
            identity_refusals,
            identity_latency,
            token_reviews,
            push_refusals,
            push_stalls,
            extra: std::sync::OnceLock::new(),
            index_objects,
            subscribers,
            updates,
            bytes,
            nacks,
            watch_errors,
            index_change_panics,
            change_to_ack,
        }
    }

    /// Records the index size of one kind.
    pub fn index_objects(&self, kind: Kind, n: usize) {
        self.index_objects
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Records the number of subscribed pods.
    pub fn subscribers(&self, n: usize) {
        self.subscribers.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts one update of `bytes` bytes sent.
    pub fn pushed(&self, bytes: usize) {
        self.updates.inc();
        self.bytes.inc_by(bytes as u64);
    }

    /// Counts one rejected update.
    pub fn nack(&self) {
        self.nacks.inc();
    }

    /// Counts a failed watch request.
    pub fn watch_error(&self, kind: Kind) {
        self.watch_errors
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }

    /// Counts an index change of `kind` that panicked.
    pub fn index_change_panic(&self, kind: Kind) {
        self.index_change_panics
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }

    /// Records the time from a change to its acknowledgement.
    pub fn change_acked(&self, elapsed: std::time::Duration) {
        self.change_to_ack.observe(elapsed.as_secs_f64());
    }

    /// Counts one TokenReview call with its `result` (`authenticated`, `rejected`, `error`).
    pub fn token_review(&self, result: &'static str) {
        self.token_reviews
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Counts one refused subscription.
    pub fn push_refusal(&self, reason: &'static str) {
        self.push_refusals
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts one stream closed for a stall.
    pub fn push_stall(&self) {
        self.push_stalls.inc();
    }

    /// Counts one certificate issued.
    pub fn identity_issued(&self) {
        self.identity_issued.inc();
    }

    /// Counts one certificate request abandoned by its client at `step`.
    pub fn identity_abandoned(&self, step: &'static str) {
        self.identity_abandoned
            .get_or_create(&StepLabel { step })
            .inc();
    }

    /// The identity endpoint's connection counts.
    pub fn identity_connections(&self) -> crate::https::ConnMetrics {
        self.identity_connections.clone()
    }

    /// Counts one refused certificate request, by its [`weft_api::identity::reason`].
    pub fn identity_refusal(&self, reason: &'static str) {
        self.identity_refusals
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Records the time to answer one certificate request.
    pub fn identity_answered(&self, elapsed: std::time::Duration) {
        self.identity_latency.observe(elapsed.as_secs_f64());
    }

    /// The metrics in OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        if let Some(extra) = self.extra.get() {
            // One exposition has one `# EOF`: drop the first registry's, keep the last.
            if let Some(body) = out.strip_suffix("# EOF\n") {
                out.truncate(body.len());
            }
            if prometheus_client::encoding::text::encode(&mut out, extra).is_err() {
                out.clear();
            }
        }
        out
    }

    /// Adds another part's registry to what [`Metrics::encode`] serves; only the first
    /// call takes effect.
    pub fn add_registry(&self, registry: Registry) {
        let _ = self.extra.set(registry);
    }
}

#[cfg(test)]
mod docs_tests {
    use std::sync::Arc;

    use weft_proxy::{
        errors::ErrorCode,
        limits::Limit,
        metrics::{Direction, ServiceLabel},
        traffic_metrics::{DryRun, RouteEvent},
    };

    use super::{Kind, Metrics};

    /// A proxy's metrics with a series in every family (empty families print nothing).
    fn every_proxy_series() -> Arc<weft_proxy::metrics::Metrics> {
        let m = Arc::new(weft_proxy::metrics::Metrics::new());
        let web = ServiceLabel(Arc::from("web"));
        let r = m.for_requests(Direction::Outbound, &web);
        r.request();
        r.response(http::StatusCode::OK, 0.001);
        m.error(Direction::Outbound, ErrorCode::NoEndpoints);
        m.before_config(Direction::Outbound, "passthrough");
        m.limit_refused(Limit::RequestHead);
        drop(m.connection(Direction::Inbound));
        m.config_applied(1, "1", [(web.clone(), 1)].into_iter());
        m.config_rejected();
        m.control_stream_failure("tls_untrusted");
        let b = m.breaker(&web);
        b.set_ejected(0);
        b.ejection();
        b.overloaded("max_requests");
        b.dry_run("ejection");
        let rule: Arc<str> = Arc::from("0");
        m.traffic
            .route_event(&web, &Arc::from("shop/web"), &rule, RouteEvent::Retry);
        m.traffic.rate_limited("shop/limit");
        m.traffic.dry_run(&web, DryRun::RateLimit);
        m.tls.renewal(true, Some(1));
        m.tls
            .session(Direction::Inbound, Some(weft_proxy::identity::Inner::Mux));
        m.tls.refused(
            Direction::Inbound,
            weft_proxy::identity::TlsFailure::Untrusted,
        );
        m.tls.ended(
            Direction::Inbound,
            weft_proxy::identity::session::EndReason::Untrusted,
        );
        m.traffic
            .authz_denied("shop/web", None, Some("/admin"), Some("GET"));
        m.trace.exported(1);
        m.trace.dropped(weft_proxy::trace::DropReason::QueueFull, 1);
        m
    }

    /// The sample names of every family in an exposition (counters with `_total`).
    fn families(exposition: &str) -> Vec<String> {
        exposition
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| {
                let mut parts = l.split(' ');
                let (name, kind) = (parts.next()?, parts.next()?);
                Some(if kind == "counter" {
                    format!("{name}_total")
                } else {
                    name.to_owned()
                })
            })
            .collect()
    }

    /// `docs/metrics.md` names every metric the proxy and the operator export, and no
    /// other: a metric added without its row, or a row left after its metric, fails here.
    #[test]
    fn docs_metrics_md_lists_exactly_the_metrics_of_proxy_and_operator() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let doc = std::fs::read_to_string(dir.join("../docs/metrics.md")).unwrap();
        let mut exported = families(&every_proxy_series().encode().unwrap());
        let operator = Metrics::new();
        operator.index_objects(Kind::Route, 1);
        operator.subscribers(1);
        operator.pushed(1);
        operator.nack();
        operator.watch_error(Kind::Route);
        operator.index_change_panic(Kind::Route);
        operator.change_acked(std::time::Duration::from_millis(1));
        operator.token_review("allowed");
        operator.push_refusal("forbidden");
        operator.push_stall();
        operator.identity_refusal("bad_request");
        operator.identity_abandoned("slot");
        operator
            .identity_connections()
            .handshake_failures
            .get_or_create(&crate::https::ReasonLabel { reason: "closed" })
            .inc();
        let webhook = crate::webhook::server::WebhookMetrics::default();
        webhook.count("injected");
        webhook
            .connections
            .handshake_failures
            .get_or_create(&crate::https::ReasonLabel { reason: "closed" })
            .inc();
        let mut registry = prometheus_client::registry::Registry::default();
        webhook.register(&mut registry);
        operator.add_registry(registry);
        exported.extend(families(&operator.encode()));
        for name in &exported {
            assert!(
                doc.contains(&format!("| `{name}` |")),
                "docs/metrics.md has no row for {name}"
            );
        }
        for row in doc.lines().filter_map(|l| l.strip_prefix("| `weft_")) {
            let name = format!("weft_{}", row.split('`').next().unwrap_or_default());
            assert!(
                exported.contains(&name),
                "docs/metrics.md lists {name}, which nobody exports"
            );
        }
    }
}
