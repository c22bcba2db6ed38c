//! Connection-pool limits of one service, per proxy: the counts behind `maxRequests`,
//! `maxConnections` and `maxPendingRequests`. Admission happens once per request
//! ([`ServicePool::admit`]); the connection limits are enforced by the endpoint pools of
//! [`crate::upstream`], which every endpoint of a limited service gets of its own.
//!
//! ```text
//! request ──admit──▶ RequestPermit (held until the response body ends) ─┐ or 503 overloaded
//! no idle connection ──try_connection──▶ permit ─▶ connect              │
//!                       └─ full ──enter_pending──▶ wait for a permit or an idle connection
//! ```
//!
//! Nothing queues beyond `maxPendingRequests`: a request over a limit is refused at once,
//! so admitted requests keep their latency.

use std::sync::{
    Arc, Mutex, Weak,
    atomic::{AtomicUsize, Ordering},
};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::{BreakerObserver, spec::PoolSpec};

/// Which connection-pool limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PoolLimit {
    /// `maxRequests`: requests in flight to the service.
    MaxRequests,
    /// `maxPendingRequests`: requests waiting for a connection.
    MaxPendingRequests,
    /// `maxConnections`: open connections to the service.
    MaxConnections,
}

impl PoolLimit {
    /// The `limit` label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            PoolLimit::MaxRequests => "max_requests",
            PoolLimit::MaxPendingRequests => "max_pending_requests",
            PoolLimit::MaxConnections => "max_connections",
        }
    }
}

/// A request refused by a connection-pool limit (answered 503 `overloaded`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the service's {} limit is reached", .0.as_str())]
pub struct Overloaded(pub PoolLimit);

/// Something that holds idle connections of a limited service and can close one, so that
/// a request at `maxConnections` on another endpoint gets a connection.
pub trait IdleConnections: Send + Sync + std::fmt::Debug {
    /// Closes one idle connection; false when there was none.
    fn close_one_idle(&self) -> bool;
}

/// The connection-pool state of one service lineage.
#[derive(Debug)]
pub struct ServicePool {
    spec: PoolSpec,
    observer: Arc<BreakerObserver>,
    in_flight: AtomicUsize,
    pending: AtomicUsize,
    connections: Option<Arc<Semaphore>>,
    /// Woken when a connection of the service goes idle, for the requests waiting at
    /// `maxConnections`.
    released: Notify,
    /// The endpoint pools, to close an idle connection of one when another needs its slot.
    idle: Mutex<Vec<Weak<dyn IdleConnections>>>,
}

/// Admission of one request; held until its response body ends.
#[derive(Debug)]
pub struct RequestPermit(Option<Arc<ServicePool>>);

impl RequestPermit {
    /// A permit that counts nothing (no `maxRequests`).
    pub const fn unlimited() -> Self {
        RequestPermit(None)
    }
}

impl Drop for RequestPermit {
    fn drop(&mut self) {
        if let Some(pool) = &self.0 {
            pool.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One request waiting for a connection; counts in `maxPendingRequests` until dropped.
#[derive(Debug)]
pub struct Pending(Arc<ServicePool>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The answer of [`ServicePool::try_connection`].
#[derive(Debug)]
pub enum Slot {
    /// A connection may be made; it holds the permit (if any) until it closes.
    Free(Option<OwnedSemaphorePermit>),
    /// `maxConnections` are open.
    Full,
}

impl ServicePool {
    /// Pool state with nothing in flight.
    pub fn new(spec: PoolSpec, observer: Arc<BreakerObserver>) -> Self {
        let connections = spec.max_connections.map(|n| {
            let n = usize::try_from(n.get()).unwrap_or(Semaphore::MAX_PERMITS);
            Arc::new(Semaphore::new(n.min(Semaphore::MAX_PERMITS)))
        });
        ServicePool {
            spec,
            observer,
            in_flight: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            connections,
            released: Notify::new(),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// The limits.
    pub fn spec(&self) -> &PoolSpec {
        &self.spec
    }

    /// Requests admitted and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Admits a request unless `maxRequests` are in flight (in dry run: admits it and
    /// records the refusal it would have been).
    pub fn admit(self: &Arc<Self>) -> Result<RequestPermit, Overloaded> {
        let Some(max) = self.spec.max_requests else {
            return Ok(RequestPermit::unlimited());
        };
        let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
        let permit = RequestPermit(Some(self.clone()));
        if before >= max.get() as usize {
            self.refuse(PoolLimit::MaxRequests)?;
        }
        Ok(permit)
    }

    /// A slot for a new connection, if `maxConnections` allows one (in dry run always,
    /// recording the refusal it would have been).
    pub fn try_connection(&self) -> Slot {
        let Some(sem) = &self.connections else {
            return Slot::Free(None);
        };
        match sem.clone().try_acquire_owned() {
            Ok(permit) => Slot::Free(Some(permit)),
            Err(_) if self.observer.dry_run() => {
                self.observer.would_refuse(PoolLimit::MaxConnections);
                Slot::Free(None)
            }
            Err(_) => Slot::Full,
        }
    }

    /// Refuses a request at `maxConnections` that may not wait (HTTP/2, whose endpoint
    /// has a single connection to share).
    pub fn refuse_connection(&self) -> Overloaded {
        self.observer.refused(PoolLimit::MaxConnections);
        Overloaded(PoolLimit::MaxConnections)
    }

    /// Counts a request as waiting for a connection, unless `maxPendingRequests` wait
    /// already.
    pub fn enter_pending(self: &Arc<Self>) -> Result<Pending, Overloaded> {
        let before = self.pending.fetch_add(1, Ordering::Relaxed);
        let pending = Pending(self.clone());
        if let Some(max) = self.spec.max_pending_requests
            && before >= max as usize
        {
            // maxConnections was reached, so refusing here refuses for that reason too;
            // the label names the limit that could have let it wait.
            self.refuse(PoolLimit::MaxPendingRequests)?;
        }
        Ok(pending)
    }

    /// Waits until a connection closes and its slot is free. Callers also wait on
    /// [`ServicePool::released`] for an idle connection of their own endpoint.
    pub async fn connection_freed(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone()?.acquire_owned().await.ok()
    }

    /// The signal of a connection going idle.
    pub fn released(&self) -> &Notify {
        &self.released
    }

    /// Registers an endpoint pool whose idle connections count against `maxConnections`.
    pub fn register(&self, pool: Weak<dyn IdleConnections>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|w| w.strong_count() > 0);
        idle.push(pool);
    }

    /// Closes one idle connection of another endpoint, so that its slot frees; a request
    /// waiting at `maxConnections` would otherwise wait for the idle timeout.
    pub fn close_one_idle(&self) -> bool {
        let pools: Vec<Arc<dyn IdleConnections>> = self
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        pools.iter().any(|p| p.close_one_idle())
    }

    fn refuse(&self, limit: PoolLimit) -> Result<(), Overloaded> {
        if self.observer.dry_run() {
            self.observer.would_refuse(limit);
            Ok(())
        } else {
            self.observer.refused(limit);
            Err(Overloaded(limit))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;
    use crate::metrics::{Metrics, ServiceLabel};

    fn pool(spec: PoolSpec, dry_run: bool) -> (Arc<ServicePool>, Metrics) {
        let metrics = Metrics::new();
        let observer = Arc::new(BreakerObserver::new(
            &metrics,
            ServiceLabel(Arc::from("db")),
            dry_run,
        ));
        (Arc::new(ServicePool::new(spec, observer)), metrics)
    }

    #[test]
    fn pool_admits_max_requests_and_refuses_the_next_until_one_ends() {
        let (p, metrics) = pool(
            PoolSpec {
                max_requests: NonZeroU32::new(2),
                ..PoolSpec::default()
            },
            false,
        );
        let a = p.admit().unwrap();
        let _b = p.admit().unwrap();
        assert_eq!(p.admit().unwrap_err(), Overloaded(PoolLimit::MaxRequests));
        assert_eq!(p.in_flight(), 2, "a refusal leaves no count behind");
        drop(a);
        let _c = p.admit().unwrap();
        let text = metrics.encode().unwrap();
        assert!(
            text.contains("weft_breaker_overloaded_total{service=\"db\",limit=\"max_requests\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn pool_pending_limit_zero_refuses_every_wait() {
        let (p, _) = pool(
            PoolSpec {
                max_connections: NonZeroU32::new(1),
                max_pending_requests: Some(0),
                ..PoolSpec::default()
            },
            false,
        );
        let Slot::Free(Some(_held)) = p.try_connection() else {
            panic!("the first connection is free")
        };
        assert!(matches!(p.try_connection(), Slot::Full));
        assert_eq!(
            p.enter_pending().unwrap_err(),
            Overloaded(PoolLimit::MaxPendingRequests)
        );
    }

    #[test]
    fn pool_dry_run_admits_everything_and_counts_what_it_would_refuse() {
        let (p, metrics) = pool(
            PoolSpec {
                max_requests: NonZeroU32::new(1),
                max_connections: NonZeroU32::new(1),
                ..PoolSpec::default()
            },
            true,
        );
        let _a = p.admit().unwrap();
        let _b = p.admit().unwrap();
        let _c1 = p.try_connection();
        assert!(matches!(p.try_connection(), Slot::Free(None)));
        let text = metrics.encode().unwrap();
        assert!(
            text.contains("weft_dry_run_decisions_total{service=\"db\",kind=\"overloaded\"} 2"),
            "{text}"
        );
        assert!(!text.contains("weft_breaker_overloaded_total{"), "{text}");
    }
}
