//! Outlier ejection, without I/O: each endpoint of a service counts its 5xx responses and
//! failed connects in a row; at the threshold it is ejected from balancing for a time that
//! grows with each ejection, unless the service already has as many endpoints ejected as
//! `maxEjectedPercent` allows.
//!
//! ```text
//! response/connect ──record_at(i, outcome, now)──▶ counts ──threshold──▶ eject (lock, cap)
//! pick ──is_ejected_at(i, now)──▶ skip while ejected; a lapsed ejection returns here
//! ```
//!
//! The per-request work is atomics only: a success stores zeros (when not zero already),
//! a failure adds one, and a pick reads one counter ([`OutlierDetector::any_ejected`]) to
//! learn that nothing is ejected. The lock is taken only to eject or return an endpoint, so
//! that two ejections racing can never both fit under the cap.
//!
//! Ejections are tracked per service *lineage*: a config update that keeps the service's
//! Breaker keeps its detector and, per address, its endpoints' entries.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use super::spec::OutlierSpec;

/// What became of one request to an endpoint, as outlier detection counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response that is not a 5xx.
    Success,
    /// A 5xx response, or a failure the proxy answers as one (reset, response timeout).
    ServerError,
    /// The connection to the endpoint could not be made.
    ConnectFailure,
}

impl Outcome {
    /// The outcome a response with `status` counts as.
    pub fn of_status(status: http::StatusCode) -> Self {
        if status.is_server_error() {
            Outcome::ServerError
        } else {
            Outcome::Success
        }
    }
}

/// What a failure led to, for the caller to count and log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing changed beyond the counts.
    Counted,
    /// The endpoint is ejected for this long.
    Ejected(Duration),
    /// Dry run: the endpoint would have been ejected for this long.
    WouldEject(Duration),
    /// The endpoint reached its threshold but the cap left no room.
    Capped,
}

/// The outlier state of one endpoint of one service.
#[derive(Debug, Default)]
pub struct EndpointOutlier {
    consecutive_5xx: AtomicU32,
    consecutive_connect: AtomicU32,
    /// When the ejection ends, as nanoseconds after the detector's `base` plus one; 0 when
    /// the endpoint is not ejected.
    until: AtomicU64,
    /// Set once the endpoint left the service: it is never ejected again.
    retired: AtomicBool,
    history: Mutex<History>,
}

#[derive(Debug, Default)]
struct History {
    /// The ejection multiplier: how many times the endpoint has been ejected, less one per
    /// `interval` it then stayed in.
    times: u32,
    /// When it last returned from an ejection.
    returned: Option<Instant>,
}

/// Outlier ejection for one service lineage.
#[derive(Debug)]
pub struct OutlierDetector {
    spec: OutlierSpec,
    dry_run: bool,
    base: Instant,
    /// Serialises ejections and returns, so that the cap holds.
    lock: Mutex<()>,
    /// Entries with an ejection set, lapsed ones included until they are returned.
    ejected: AtomicUsize,
}

impl OutlierDetector {
    /// A detector with nothing ejected.
    pub fn new(spec: OutlierSpec, dry_run: bool) -> Self {
        OutlierDetector {
            spec,
            dry_run,
            base: Instant::now(),
            lock: Mutex::new(()),
            ejected: AtomicUsize::new(0),
        }
    }

    /// Whether picks must look for ejected endpoints; false in dry run, where nothing is
    /// ejected for real.
    pub fn any_ejected(&self) -> bool {
        !self.dry_run && self.ejected.load(Ordering::Relaxed) > 0
    }

    /// Endpoints with an ejection in force (or lapsed and not yet returned), dry run's
    /// would-be ejections included.
    pub fn ejected(&self) -> usize {
        self.ejected.load(Ordering::Relaxed)
    }

    /// Counts `outcome` for `endpoints[i]` and ejects it if that makes its threshold.
    pub fn record_at(
        &self,
        endpoints: &[std::sync::Arc<EndpointOutlier>],
        i: usize,
        outcome: Outcome,
        now: Instant,
    ) -> Verdict {
        let Some(e) = endpoints.get(i) else {
            return Verdict::Counted;
        };
        let (count, other, threshold) = match outcome {
            Outcome::Success => {
                reset(&e.consecutive_5xx);
                reset(&e.consecutive_connect);
                return Verdict::Counted;
            }
            Outcome::ServerError => (
                &e.consecutive_5xx,
                &e.consecutive_connect,
                self.spec.consecutive_5xx,
            ),
            Outcome::ConnectFailure => (
                &e.consecutive_connect,
                &e.consecutive_5xx,
                self.spec.consecutive_connect_failures,
            ),
        };
        // A 5xx proves the connect works and a failed connect says nothing of responses:
        // "in a row" means without the other kind of failure in between.
        reset(other);
        if count.fetch_add(1, Ordering::Relaxed).saturating_add(1) < threshold {
            return Verdict::Counted;
        }
        self.eject(endpoints, i, now)
    }

    /// Whether `endpoints[i]` is ejected at `now`; an ejection that has lapsed ends here.
    /// Always false in dry run.
    pub fn is_ejected_at(
        &self,
        endpoints: &[std::sync::Arc<EndpointOutlier>],
        i: usize,
        now: Instant,
    ) -> bool {
        let Some(e) = endpoints.get(i) else {
            return false;
        };
        let until = e.until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if self.nanos(now) < until {
            return !self.dry_run;
        }
        let _turn = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.end_lapsed(e, now);
        false
    }

    /// Ends the ejections of `endpoints` that have lapsed at `now`.
    pub fn sweep(&self, endpoints: &[std::sync::Arc<EndpointOutlier>], now: Instant) {
        if self.ejected.load(Ordering::Relaxed) == 0 {
            return;
        }
        let _turn = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        for e in endpoints {
            self.end_lapsed(e, now);
        }
    }

    /// Marks an endpoint that left the service: its ejection ends and no new one starts.
    pub fn retire(&self, e: &EndpointOutlier) {
        let _turn = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        e.retired.store(true, Ordering::Relaxed);
        if e.until.swap(0, Ordering::Relaxed) != 0 {
            self.ejected.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn eject(
        &self,
        endpoints: &[std::sync::Arc<EndpointOutlier>],
        i: usize,
        now: Instant,
    ) -> Verdict {
        let _turn = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let e = &endpoints[i];
        if e.retired.load(Ordering::Relaxed) {
            return Verdict::Counted;
        }
        let mut live = 0;
        for other in endpoints {
            self.end_lapsed(other, now);
            if other.until.load(Ordering::Relaxed) != 0 {
                live += 1;
            }
        }
        if e.until.load(Ordering::Relaxed) != 0 {
            // Ejected already: failures counted while it drains its in-flight requests.
            return Verdict::Counted;
        }
        let allowed = endpoints.len() * usize::from(self.spec.max_ejected_percent) / 100;
        if live + 1 > allowed {
            return Verdict::Capped;
        }
        let mut h = e.history.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(returned) = h.returned {
            let quiet = now.saturating_duration_since(returned);
            let intervals = quiet.as_nanos() / self.spec.interval.as_nanos().max(1);
            h.times = h
                .times
                .saturating_sub(u32::try_from(intervals).unwrap_or(u32::MAX));
        }
        h.times = h.times.saturating_add(1);
        let length = self
            .spec
            .base_ejection_time
            .saturating_mul(h.times)
            .min(self.spec.max_ejection_time);
        e.until
            .store(self.nanos(now + length).max(1), Ordering::Relaxed);
        self.ejected.fetch_add(1, Ordering::Relaxed);
        // It must fail `threshold` times again after it returns.
        e.consecutive_5xx.store(0, Ordering::Relaxed);
        e.consecutive_connect.store(0, Ordering::Relaxed);
        if self.dry_run {
            Verdict::WouldEject(length)
        } else {
            Verdict::Ejected(length)
        }
    }

    /// Ends `e`'s ejection if it has lapsed; the caller holds `lock`.
    fn end_lapsed(&self, e: &EndpointOutlier, now: Instant) {
        let until = e.until.load(Ordering::Relaxed);
        if until != 0 && self.nanos(now) >= until {
            e.until.store(0, Ordering::Relaxed);
            self.ejected.fetch_sub(1, Ordering::Relaxed);
            e.history.lock().unwrap_or_else(|p| p.into_inner()).returned = Some(now);
        }
    }

    fn nanos(&self, t: Instant) -> u64 {
        let ns = t.saturating_duration_since(self.base).as_nanos();
        u64::try_from(ns).unwrap_or(u64::MAX - 1) + 1
    }
}

fn reset(count: &AtomicU32) {
    // Read first: most responses succeed, and a store to a shared line costs more.
    if count.load(Ordering::Relaxed) != 0 {
        count.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn spec(percent: u8) -> OutlierSpec {
        OutlierSpec {
            consecutive_5xx: 5,
            consecutive_connect_failures: 3,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(100),
            max_ejected_percent: percent,
        }
    }

    fn endpoints(n: usize) -> Vec<Arc<EndpointOutlier>> {
        (0..n).map(|_| Arc::default()).collect()
    }

    /// Records `n` outcomes and returns the last verdict.
    fn fail(
        d: &OutlierDetector,
        e: &[Arc<EndpointOutlier>],
        i: usize,
        outcome: Outcome,
        n: u32,
        now: Instant,
    ) -> Verdict {
        (0..n).fold(Verdict::Counted, |_, _| d.record_at(e, i, outcome, now))
    }

    #[test]
    fn outlier_consecutive_failures_eject_at_the_threshold() {
        let d = OutlierDetector::new(spec(100), false);
        let e = endpoints(3);
        let t = Instant::now();
        assert_eq!(
            fail(&d, &e, 0, Outcome::ServerError, 4, t),
            Verdict::Counted
        );
        assert!(!d.is_ejected_at(&e, 0, t));
        assert_eq!(
            d.record_at(&e, 0, Outcome::ServerError, t),
            Verdict::Ejected(Duration::from_secs(30))
        );
        assert!(d.is_ejected_at(&e, 0, t) && d.any_ejected());
        assert_eq!(
            fail(&d, &e, 1, Outcome::ConnectFailure, 3, t),
            Verdict::Ejected(Duration::from_secs(30)),
            "connect failures have their own threshold"
        );
        assert_eq!(d.ejected(), 2);
    }

    #[test]
    fn outlier_success_or_the_other_kind_of_failure_resets_the_count() {
        let d = OutlierDetector::new(spec(100), false);
        let e = endpoints(2);
        let t = Instant::now();
        for _ in 0..3 {
            fail(&d, &e, 0, Outcome::ServerError, 4, t);
            d.record_at(&e, 0, Outcome::Success, t);
        }
        fail(&d, &e, 0, Outcome::ServerError, 4, t);
        d.record_at(&e, 0, Outcome::ConnectFailure, t);
        assert_eq!(
            fail(&d, &e, 0, Outcome::ServerError, 4, t),
            Verdict::Counted
        );
        assert!(!d.is_ejected_at(&e, 0, t));
    }

    #[test]
    fn outlier_ejection_time_grows_with_each_ejection_up_to_the_cap_and_ends() {
        let d = OutlierDetector::new(spec(100), false);
        let e = endpoints(2);
        let mut t = Instant::now();
        for want in [30, 60, 90, 100, 100] {
            let want = Duration::from_secs(want);
            assert_eq!(
                fail(&d, &e, 0, Outcome::ServerError, 5, t),
                Verdict::Ejected(want)
            );
            assert!(d.is_ejected_at(&e, 0, t + want - Duration::from_millis(1)));
            t += want;
            assert!(!d.is_ejected_at(&e, 0, t), "back after {want:?}");
            assert_eq!(d.ejected(), 0);
        }
    }

    #[test]
    fn outlier_multiplier_decays_by_one_per_quiet_interval() {
        let d = OutlierDetector::new(spec(100), false);
        let e = endpoints(2);
        let mut t = Instant::now();
        fail(&d, &e, 0, Outcome::ServerError, 5, t);
        t += Duration::from_secs(30);
        assert!(!d.is_ejected_at(&e, 0, t));
        fail(&d, &e, 0, Outcome::ServerError, 5, t);
        t += Duration::from_secs(60);
        assert!(!d.is_ejected_at(&e, 0, t));
        // Two ejections, then 10 s (one interval) in: the multiplier drops from 2 to 1.
        t += Duration::from_secs(10);
        assert_eq!(
            fail(&d, &e, 0, Outcome::ServerError, 5, t),
            Verdict::Ejected(Duration::from_secs(60))
        );
    }

    #[test]
    fn outlier_cap_of_50_percent_never_ejects_the_only_endpoint() {
        let d = OutlierDetector::new(spec(50), false);
        let e = endpoints(1);
        let t = Instant::now();
        assert_eq!(
            fail(&d, &e, 0, Outcome::ServerError, 50, t),
            Verdict::Capped
        );
        assert!(!d.is_ejected_at(&e, 0, t));
        assert_eq!(d.ejected(), 0);
    }

    #[test]
    fn outlier_cap_of_50_percent_ejects_one_of_three_and_the_next_once_it_returns() {
        let d = OutlierDetector::new(spec(50), false);
        let e = endpoints(3);
        let t = Instant::now();
        assert!(matches!(
            fail(&d, &e, 0, Outcome::ServerError, 5, t),
            Verdict::Ejected(_)
        ));
        assert_eq!(fail(&d, &e, 1, Outcome::ServerError, 5, t), Verdict::Capped);
        assert_eq!(d.ejected(), 1);
        // Endpoint 1 kept failing; once 0 is back, its next failure ejects it.
        let later = t + Duration::from_secs(30);
        assert!(!d.is_ejected_at(&e, 0, later));
        assert!(matches!(
            d.record_at(&e, 1, Outcome::ServerError, later),
            Verdict::Ejected(_)
        ));
        assert_eq!(d.ejected(), 1);
    }

    #[test]
    fn outlier_dry_run_decides_but_ejects_nothing() {
        let d = OutlierDetector::new(spec(50), true);
        let e = endpoints(3);
        let t = Instant::now();
        assert_eq!(
            fail(&d, &e, 0, Outcome::ServerError, 5, t),
            Verdict::WouldEject(Duration::from_secs(30))
        );
        assert!(!d.is_ejected_at(&e, 0, t));
        assert!(!d.any_ejected());
        // The cap is simulated too: a second would-be ejection is capped.
        assert_eq!(fail(&d, &e, 1, Outcome::ServerError, 5, t), Verdict::Capped);
    }

    #[test]
    fn outlier_retired_endpoint_returns_and_stays() {
        let d = OutlierDetector::new(spec(100), false);
        let e = endpoints(2);
        let t = Instant::now();
        fail(&d, &e, 0, Outcome::ServerError, 5, t);
        d.retire(&e[0]);
        assert_eq!(d.ejected(), 0);
        assert_eq!(
            fail(&d, &e, 0, Outcome::ServerError, 5, t),
            Verdict::Counted
        );
    }
}
