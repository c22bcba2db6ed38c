//! Circuit breaking for one service: outlier ejection of endpoints that keep failing
//! ([`outlier`]) and limits on this proxy's connections and requests to the service
//! ([`pool`]), from a validated [`BreakerSpec`].
//!
//! ```text
//! config::Service.breaker ──store──▶ ServiceBreaker (one per service lineage, kept while
//!      its spec stays) ──┬─ OutlierDetector  ◀─ ServiceState::record / ::pick
//!                        └─ ServicePool      ◀─ ServiceState::admit, upstream pools
//! ```
//!
//! A *lineage* is a service's breaker state across config updates: an update that keeps
//! the service's Breaker keeps the lineage (its ejections, counts and connections); one
//! that changes it starts a new lineage with fresh state.

pub mod outlier;
pub mod pool;
pub mod spec;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

pub use outlier::{EndpointOutlier, Outcome, OutlierDetector, Verdict};
pub use pool::{Overloaded, PoolLimit, RequestPermit, ServicePool};
pub use spec::{BreakerSpec, OutlierSpec, PoolSpec};

use crate::metrics::{BreakerMetrics, Metrics, ServiceLabel};

/// The breaker state of one service lineage.
#[derive(Debug)]
pub struct ServiceBreaker {
    /// The spec this lineage enforces.
    pub spec: BreakerSpec,
    /// Unique per lineage: endpoint pools of a limited service are keyed by it, so that a
    /// new lineage gets pools (and counts) of its own.
    pub id: u64,
    /// Outlier ejection, when configured.
    pub outlier: Option<OutlierDetector>,
    /// Connection-pool limits, when configured.
    pub pool: Option<Arc<ServicePool>>,
    observer: Arc<BreakerObserver>,
}

static NEXT_LINEAGE: AtomicU64 = AtomicU64::new(1);

impl ServiceBreaker {
    /// A fresh lineage for `spec`.
    pub fn new(spec: BreakerSpec, metrics: &Metrics, service: ServiceLabel) -> Self {
        let observer = Arc::new(BreakerObserver::new(metrics, service, spec.dry_run));
        let outlier = spec.outlier.map(|o| {
            observer.metrics.set_ejected(0);
            OutlierDetector::new(o, spec.dry_run)
        });
        let pool = spec
            .pool
            .map(|p| Arc::new(ServicePool::new(p, observer.clone())));
        ServiceBreaker {
            id: NEXT_LINEAGE.fetch_add(1, Ordering::Relaxed),
            spec,
            outlier,
            pool,
            observer,
        }
    }

    /// Whether the service's endpoints need connection pools of their own.
    pub fn owns_connections(&self) -> bool {
        self.spec.pool.is_some_and(|p| p.limits_connections())
    }

    /// Admits a request under `maxRequests`.
    pub fn admit(&self) -> Result<RequestPermit, Overloaded> {
        match &self.pool {
            Some(p) => p.admit(),
            None => Ok(RequestPermit::unlimited()),
        }
    }

    /// Counts an outcome of `entries[i]` (at `addr`, for logs) and acts on the verdict.
    pub fn record(
        &self,
        entries: &[Arc<EndpointOutlier>],
        i: usize,
        addr: SocketAddr,
        outcome: Outcome,
    ) {
        let Some(detector) = &self.outlier else {
            return;
        };
        let now = Instant::now();
        match detector.record_at(entries, i, outcome, now) {
            Verdict::Counted => {}
            Verdict::Ejected(length) => {
                self.observer.metrics.ejection();
                self.observer.metrics.set_ejected(detector.ejected());
                tracing::info!(service = %self.observer.service.0, endpoint = %addr,
                    ?length, ?outcome, "endpoint ejected");
            }
            Verdict::WouldEject(length) => {
                self.observer.metrics.dry_run("ejection");
                if self.observer.log_allowed(now) {
                    tracing::info!(service = %self.observer.service.0, endpoint = %addr,
                        ?length, ?outcome, "dry run: endpoint would have been ejected");
                }
            }
            Verdict::Capped => {
                tracing::debug!(service = %self.observer.service.0, endpoint = %addr,
                    "endpoint not ejected: maxEjectedPercent reached");
            }
        }
    }

    /// Updates the ejected-endpoints gauge after picks may have ended ejections.
    pub fn ejections_changed(&self) {
        if let Some(d) = &self.outlier
            && !self.spec.dry_run
        {
            self.observer.metrics.set_ejected(d.ejected());
        }
    }
}

/// Where a lineage's decisions are counted and logged.
#[derive(Debug)]
pub struct BreakerObserver {
    service: ServiceLabel,
    dry_run: bool,
    metrics: BreakerMetrics,
    base: Instant,
    /// When a dry-run decision was last logged, as nanoseconds after `base` plus one; 0:
    /// never. Keeps the log to one line per second per service.
    last_log: AtomicU64,
}

/// The least time between two dry-run log lines of one service.
const DRY_RUN_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl BreakerObserver {
    /// The observer of one service's lineage.
    pub fn new(metrics: &Metrics, service: ServiceLabel, dry_run: bool) -> Self {
        BreakerObserver {
            metrics: metrics.breaker(&service),
            service,
            dry_run,
            base: Instant::now(),
            last_log: AtomicU64::new(0),
        }
    }

    /// Whether decisions are recorded rather than acted on.
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// Counts a refusal by `limit`.
    pub fn refused(&self, limit: PoolLimit) {
        self.metrics.overloaded(limit.as_str());
    }

    /// Counts, and logs at most once a second, a refusal dry run let through.
    pub fn would_refuse(&self, limit: PoolLimit) {
        self.metrics.dry_run("overloaded");
        if self.log_allowed(Instant::now()) {
            tracing::info!(service = %self.service.0, limit = limit.as_str(),
                "dry run: request would have been refused as overloaded");
        }
    }

    fn log_allowed(&self, now: Instant) -> bool {
        let now_ns = u64::try_from(now.saturating_duration_since(self.base).as_nanos())
            .unwrap_or(u64::MAX - 1)
            + 1;
        let last = self.last_log.load(Ordering::Relaxed);
        let every = DRY_RUN_LOG_EVERY.as_nanos() as u64;
        (last == 0 || now_ns >= last.saturating_add(every))
            && self
                .last_log
                .compare_exchange(last, now_ns, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_dry_run_log_is_limited_to_one_line_a_second() {
        let o = BreakerObserver::new(&Metrics::new(), ServiceLabel(Arc::from("db")), true);
        let t = Instant::now();
        assert!(o.log_allowed(t));
        assert!(!o.log_allowed(t + std::time::Duration::from_millis(500)));
        assert!(o.log_allowed(t + std::time::Duration::from_millis(1001)));
    }
}
