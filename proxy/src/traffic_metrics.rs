//! Metrics of traffic policy: what Routes, retry budgets, faults, mirrors and rate limits
//! did, with bounded labels (service, route, rule; never paths), and the dry-run
//! decisions of every policy that has a dry run.
//!
//! ```text
//! weft_route_events_total{service, route, rule, event}      retry, retry_budget_exhausted,
//!                                                            response_timeout, per_try_timeout,
//!                                                            fault_injected, fault_delayed,
//!                                                            backend_not_found, mirrored,
//!                                                            mirror_overflow, mirror_skipped
//! weft_rate_limited_total{policy}                            requests refused with 429
//! weft_authz_denials_total{policy}                           requests and connections a Policy denied
//! weft_dry_run_decisions_total{service, kind}                what a dry-run policy would have done
//! ```

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use crate::metrics::{DryRunLabels, ServiceLabel};

/// Labels of route events.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RouteEventLabels {
    /// The service the request was sent to.
    pub service: ServiceLabel,
    /// The Route (`namespace/name`).
    pub route: Arc<str>,
    /// The rule's name, or its index.
    pub rule: Arc<str>,
    /// What happened ([`RouteEvent::as_str`]).
    pub event: &'static str,
}

/// Something a Route rule did to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteEvent {
    /// An attempt after the first was sent.
    Retry,
    /// A retry the policy allowed was not made because the budget was spent.
    RetryBudgetExhausted,
    /// The rule's `timeout` expired.
    ResponseTimeout,
    /// An attempt's `perTryTimeout` expired.
    PerTryTimeout,
    /// The fault injection aborted the request.
    FaultInjected,
    /// The fault injection delayed the request.
    FaultDelayed,
    /// The picked backend does not resolve.
    BackendNotFound,
    /// A copy was sent to the mirror.
    Mirrored,
    /// No copy was sent: too many mirrored requests were in flight.
    MirrorOverflow,
    /// No copy was sent: the request's body could not be copied (streaming or too large).
    MirrorSkipped,
}

impl RouteEvent {
    /// The `event` label; the same text as the `weft-error` code where there is one.
    pub const fn as_str(self) -> &'static str {
        match self {
            RouteEvent::Retry => "retry",
            RouteEvent::RetryBudgetExhausted => "retry_budget_exhausted",
            RouteEvent::ResponseTimeout => "response_timeout",
            RouteEvent::PerTryTimeout => "per_try_timeout",
            RouteEvent::FaultInjected => "fault_injected",
            RouteEvent::FaultDelayed => "fault_delayed",
            RouteEvent::BackendNotFound => "backend_not_found",
            RouteEvent::Mirrored => "mirrored",
            RouteEvent::MirrorOverflow => "mirror_overflow",
            RouteEvent::MirrorSkipped => "mirror_skipped",
        }
    }
}

/// Labels of rate-limit refusals.
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PolicyLabels {
    /// The Policy (`namespace/name`).
    pub policy: Arc<str>,
}

/// A decision a policy in dry run would have made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DryRun {
    /// A retry the budget would have refused (it was made).
    RetryBudget,
    /// A request the rate limit would have refused (it was let through).
    RateLimit,
    /// An endpoint the breaker would have ejected (it was not).
    Ejection,
    /// A request the breaker's pool limits would have refused (it was let through).
    Overloaded,
    /// A request or connection a Policy's authorization would have denied (it was let
    /// through).
    Authorization,
}

impl DryRun {
    /// The `kind` label.
    pub const fn as_str(self) -> &'static str {
        match self {
            DryRun::RetryBudget => "retry_budget",
            DryRun::RateLimit => "rate_limit",
            DryRun::Ejection => "ejection",
            DryRun::Overloaded => "overloaded",
            DryRun::Authorization => "authorization",
        }
    }
}

/// The traffic-policy metric families.
#[derive(Debug, Default)]
pub struct TrafficMetrics {
    route_events: Family<RouteEventLabels, Counter>,
    rate_limited: Family<PolicyLabels, Counter>,
    authz_denials: Family<PolicyLabels, Counter>,
    /// Rate-limits the denial log lines: the second of the last line.
    denial_logged: std::sync::atomic::AtomicU64,
    /// `weft_dry_run_decisions_total`, shared with the breakers' dry runs (registered by
    /// [`crate::metrics::Metrics`]).
    dry_run: Family<DryRunLabels, Counter>,
    /// Rate-limits the dry-run log lines: the second of the last line.
    dry_run_logged: std::sync::atomic::AtomicU64,
}

impl TrafficMetrics {
    /// The families, counting dry-run decisions in `dry_run`.
    pub fn new(dry_run: Family<DryRunLabels, Counter>) -> Self {
        TrafficMetrics {
            dry_run,
            ..TrafficMetrics::default()
        }
    }

    /// Registers the route-event and rate-limit families in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "route_events",
            "What Route rules did to requests: retries, budget exhaustion, timeouts, faults, mirrors",
            self.route_events.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by a workload's rate limit, by Policy",
            self.rate_limited.clone(),
        );
        registry.register(
            "authz_denials",
            "Requests and connections a Policy's authorization denied, by Policy",
            self.authz_denials.clone(),
        );
    }

    /// Counts `event` for a request of `service` handled by `rule` of `route`.
    pub fn route_event(
        &self,
        service: &ServiceLabel,
        route: &Arc<str>,
        rule: &Arc<str>,
        event: RouteEvent,
    ) {
        self.route_events
            .get_or_create(&RouteEventLabels {
                service: service.clone(),
                route: route.clone(),
                rule: rule.clone(),
                event: event.as_str(),
            })
            .inc();
    }

    /// Counts a request refused by `policy`'s rate limit.
    pub fn rate_limited(&self, policy: &str) {
        self.rate_limited
            .get_or_create(&PolicyLabels {
                policy: Arc::from(policy),
            })
            .inc();
    }

    /// Counts a request (or opaque connection, `path` and `method` then `None`) that
    /// `policy` denied, and logs it at most once a second for the whole proxy.
    pub fn authz_denied(
        &self,
        policy: &str,
        client: Option<&str>,
        path: Option<&str>,
        method: Option<&str>,
    ) {
        self.authz_denials
            .get_or_create(&PolicyLabels {
                policy: Arc::from(policy),
            })
            .inc();
        if once_a_second(&self.denial_logged) {
            tracing::info!(
                policy,
                client = client.unwrap_or("unauthenticated"),
                path = path.unwrap_or("-"),
                method = method.unwrap_or("-"),
                "authorization denied (weft_authz_denials_total counts every denial; this line at most once a second)"
            );
        }
    }

    /// Counts and logs (at most once a second, as denials) what a dry-run authorization
    /// `policy` would have denied.
    pub fn authz_dry_run(
        &self,
        service: &ServiceLabel,
        policy: &str,
        client: Option<&str>,
        path: Option<&str>,
        method: Option<&str>,
    ) {
        self.dry_run
            .get_or_create(&DryRunLabels {
                service: service.clone(),
                kind: DryRun::Authorization.as_str(),
            })
            .inc();
        if once_a_second(&self.denial_logged) {
            tracing::info!(
                policy,
                client = client.unwrap_or("unauthenticated"),
                path = path.unwrap_or("-"),
                method = method.unwrap_or("-"),
                "dry run: authorization would have denied (weft_dry_run_decisions_total counts every case)"
            );
        }
    }

    /// Counts what a dry-run policy of `service` would have done, and logs it at most once
    /// a second for the whole proxy.
    pub fn dry_run(&self, service: &ServiceLabel, kind: DryRun) {
        self.dry_run
            .get_or_create(&DryRunLabels {
                service: service.clone(),
                kind: kind.as_str(),
            })
            .inc();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self
            .dry_run_logged
            .swap(now, std::sync::atomic::Ordering::Relaxed);
        if last != now {
            tracing::info!(
                service = %service.0,
                kind = kind.as_str(),
                "dry run: a policy would have acted here and did not (weft_dry_run_decisions_total counts every case)"
            );
        }
    }
}

/// Whether a line rate-limited by `last` (the second of its last line) may be logged now.
fn once_a_second(last: &std::sync::atomic::AtomicU64) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    last.swap(now, std::sync::atomic::Ordering::Relaxed) != now
}
