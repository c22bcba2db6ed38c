//! Endpoint choice, without I/O: peak-EWMA latency estimates, power of two choices, and
//! weighted round robin. The runtime ([`crate::store`]) owns one [`Picker`] per service and
//! one [`PeakEwma`] per endpoint, and calls in here once per request.
//!
//! ```text
//! request ──Picker::pick(load of endpoint i)──▶ index ──(response headers)──▶ PeakEwma::observe
//! ```
//!
//! Peak EWMA (as in Finagle, Linkerd and tower): an endpoint's latency estimate jumps up at
//! once to any slower observation and decays toward faster ones with time constant
//! [`DEFAULT_DECAY`]; a new endpoint starts at [`DEFAULT_SEED`].
//!
//! # Failures cost
//!
//! Latency alone makes an endpoint that fails fast look like the best one: a pod answering
//! 500 in 0.2 ms beats one answering 200 in 5 ms, and P2C sends it most requests. So a
//! failure ([`is_failure`]: a 5xx, a gRPC error status of the 5xx kind, a reset, a per-try
//! timeout) that is at least the [`FAILURES_BEFORE_PENALTY`]th in a row is recorded as
//! [`FAILURE_FACTOR`] times the endpoint's current estimate (never less than the failure's
//! own latency, never more than [`FAILURE_PENALTY`] from the multiplying). Repeated, the
//! estimate climbs geometrically until the endpoint loses its comparisons, whatever the
//! latency scale; from then on it is tried again only when its estimate has decayed below
//! the competition (about `DEFAULT_DECAY × ln FAILURE_FACTOR` ≈ 14 s later; longer when
//! the penalty multiplied the seed), and one success brings it back. A lone failure between
//! successes costs nothing beyond its latency, so an application's occasional 500 does not
//! inflate every endpoint's estimate. With unequal weights a failing endpoint, like a slow
//! one, keeps the picks where it is drawn twice (below). This only biases the choice;
//! ejecting an endpoint is the Breaker's outlier detection.
//!
//! # Power of two choices, with weights
//!
//! P2C draws two candidates and sends the request to the cheaper. Weights must decide the
//! share of traffic when endpoints are equally fast, and latency must decide it when they
//! are not; dividing the cost by the weight on top of weighted sampling (this module's
//! first version) counts the weight twice, and at equal latency the lighter endpoint of a
//! 9 : 1 pair then never wins a comparison. So:
//!
//! - **Equal weights:** classic P2C. Two *distinct* endpoints are drawn uniformly and the
//!   one with the lower `cost = (estimate + 1 ns) × (in-flight + 1)` wins.
//! - **Unequal weights:** both candidates are drawn independently, each with probability
//!   proportional to its weight (*with* replacement: when the same endpoint is drawn twice
//!   it is the pick). The first draw wins unless the second is clearly better: its latency
//!   estimate differs from the first's by more than [`WEIGHTED_LATENCY_BAND`] (2×) and
//!   its `cost = (estimate + 1 ns) × (1 + in-flight × w̄ / wᵢ)` is lower. Endpoint `i`
//!   therefore gets exactly `wᵢ / Σw` of the picks among endpoints that are not clearly
//!   apart, however their estimates wobble; drawing two *distinct* endpoints instead
//!   would compare a 9 : 1 pair on every request and let the estimates alone decide. The
//!   in-flight count is divided by the endpoint's weight relative to the mean weight `w̄`,
//!   since an endpoint meant to carry nine times the traffic carries nine times the
//!   concurrent requests at the same latency. A clearly slower endpoint loses every
//!   comparison it is drawn into and keeps only the picks where it is drawn twice,
//!   `(wᵢ / Σw)²` of the traffic: the price of honouring weights at all.
//!
//! Weights for splitting traffic between Services belong in a weighted-random stage in
//! front of the balancer; endpoint weights here are for endpoints of one Service.

use std::{
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use rand::Rng;

/// The latency estimate of an endpoint nothing is known about yet (Linkerd's default).
pub const DEFAULT_SEED: Duration = Duration::from_millis(30);
/// The EWMA time constant: older observations weigh `e^(-age/decay)` (Linkerd's default).
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);
/// The latency recorded for an endpoint whose connection failed, so that P2C avoids it
/// until the penalty decays; also the most a failed response's penalty multiplies up to.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);
/// How many times its current estimate a penalised failure counts as. Above
/// [`WEIGHTED_LATENCY_BAND`], so that a penalised endpoint leaves the band in which weights
/// decide; small, so that it is tried again within `DEFAULT_DECAY × ln 4` ≈ 14 s.
pub const FAILURE_FACTOR: f64 = 4.0;
/// Consecutive failures before a failure costs more than its latency: the first of a run
/// may be the request's fault (a 500 for a bad input), a second in a row hints at the pod.
pub const FAILURES_BEFORE_PENALTY: u32 = 2;

/// The gRPC status field, as a parsed name: looked up on every response, and a `&str` key
/// is parsed (and lowercased) again on each lookup.
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// Whether a response counts as a failure for the latency estimate: any 5xx (as for the
/// Breaker's outlier detection), or a trailers-only gRPC response whose `grpc-status` is
/// one gRPC maps to a 5xx (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL,
/// UNAVAILABLE, DATA_LOSS). A status in trailers after a body is not seen: the estimate is
/// updated when the response head arrives.
pub fn is_failure(status: http::StatusCode, headers: &http::HeaderMap) -> bool {
    if status.is_server_error() {
        return true;
    }
    let grpc = headers
        .get(&GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok());
    matches!(grpc, Some(2 | 4 | 12 | 13 | 14 | 15))
}

/// A peak-sensitive exponentially weighted moving average of latency.
#[derive(Debug, Clone)]
pub struct PeakEwma {
    estimate_ns: f64,
    stamp: Instant,
    decay_ns: f64,
    /// Failures since the last success.
    failures: u32,
}

impl PeakEwma {
    /// An estimate starting at `seed`.
    pub fn new(seed: Duration, decay: Duration, now: Instant) -> Self {
        PeakEwma {
            estimate_ns: seed.as_nanos() as f64,
            stamp: now,
            decay_ns: decay.as_nanos().max(1) as f64,
            failures: 0,
        }
    }

    /// Records the latency of a successful request.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        self.failures = 0;
        self.record(rtt.as_nanos() as f64, now);
    }

    /// Records a request that failed after `rtt` (see the module documentation).
    pub fn observe_failure(&mut self, rtt: Duration, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let rtt = rtt.as_nanos() as f64;
        if self.failures < FAILURES_BEFORE_PENALTY {
            self.record(rtt, now);
            return;
        }
        let current = self.estimate_ns(now);
        let penalty = (current * FAILURE_FACTOR)
            .min(FAILURE_PENALTY.as_nanos() as f64)
            .max(rtt);
        if penalty > current {
            self.estimate_ns = penalty;
            self.stamp = self.stamp.max(now);
        } else {
            // Already above the cap: the failure counts as its latency.
            self.record(rtt, now);
        }
    }

    /// Records a failed connection: the estimate jumps to [`FAILURE_PENALTY`].
    pub fn observe_connect_failure(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        self.record(FAILURE_PENALTY.as_nanos() as f64, now);
    }

    fn record(&mut self, rtt: f64, now: Instant) {
        if rtt > self.estimate_ns {
            self.estimate_ns = rtt;
        } else {
            let w = self.weight(now);
            self.estimate_ns = self.estimate_ns * w + rtt * (1.0 - w);
        }
        self.stamp = self.stamp.max(now);
    }

    /// The estimate as of `now`, decayed toward zero for the time without observations, so
    /// that a penalised endpoint is tried again eventually.
    pub fn estimate_ns(&self, now: Instant) -> f64 {
        self.estimate_ns * self.weight(now)
    }

    fn weight(&self, now: Instant) -> f64 {
        let age = now.saturating_duration_since(self.stamp).as_nanos() as f64;
        (-age / self.decay_ns).exp()
    }
}

/// What the balancer needs to know about an endpoint to compare it with another.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    /// The latency estimate, in nanoseconds.
    pub estimate_ns: f64,
    /// Requests (or connections) in flight to the endpoint.
    pub in_flight: usize,
}

/// The P2C cost of an endpoint: its latency estimate times its queue, where the queue is
/// counted relative to the endpoint's share (`in_flight_scale` is the mean weight divided
/// by the endpoint's weight; 1 when weights are equal). Lower is better.
pub fn cost(load: Load, in_flight_scale: f64) -> f64 {
    (load.estimate_ns + 1.0) * (1.0 + load.in_flight as f64 * in_flight_scale)
}

/// With unequal weights, how many times slower than the other candidate an endpoint's
/// latency estimate must be before latency, rather than the weighted draw, decides.
///
/// Peak-EWMA estimates of equally fast endpoints differ by their number of samples alone:
/// an endpoint with nine times the requests sees nine times the latency peaks, and a peak
/// takes seconds to decay. Compared exactly, the estimates of a 9 : 1 pair of equal
/// loopback backends gave the light one 18 % of requests from one client (with the
/// in-flight term as the only tie-breaker, 14 % from four). Within this factor the first
/// draw wins, so shares follow weights; an endpoint twice as slow, or penalised for a failed
/// connect, still loses every comparison it is drawn into.
pub const WEIGHTED_LATENCY_BAND: f64 = 2.0;

fn similar(a_ns: f64, b_ns: f64) -> bool {
    let (a, b) = (a_ns + 1.0, b_ns + 1.0);
    a <= b * WEIGHTED_LATENCY_BAND && b <= a * WEIGHTED_LATENCY_BAND
}

/// How a service picks among its endpoints.
#[derive(Debug)]
pub enum Picker {
    /// Power of two choices, cheaper wins (see the module documentation for the weights).
    P2c {
        /// Running sums of weights, for weighted sampling.
        cumulative: Vec<u64>,
        /// Mean weight ÷ each endpoint's weight; empty when all weights are equal, which
        /// is also when the two candidates are drawn distinct.
        in_flight_scale: Vec<f64>,
    },
    /// Smooth weighted round robin over a precomputed schedule.
    RoundRobin {
        /// Endpoint indices in the order they are served.
        schedule: Vec<u32>,
        /// The next position in `schedule`.
        next: AtomicUsize,
    },
    /// Weighted random: the round-robin balancer's form when the weights' sum is too large
    /// for a schedule. Shares are exact in expectation, whatever the weights.
    Random {
        /// Running sums of weights, for weighted sampling.
        cumulative: Vec<u64>,
    },
}

/// The most entries a round-robin schedule holds; larger weight sums are drawn at random
/// instead ([`Picker::Random`]), since scaling them down would distort the shares.
const MAX_SCHEDULE: u64 = 4096;

impl Picker {
    /// A P2C picker over endpoints with these weights.
    pub fn p2c(weights: &[u32]) -> Self {
        let mut sum = 0u64;
        let cumulative: Vec<u64> = weights
            .iter()
            .map(|w| {
                sum += u64::from((*w).max(1));
                sum
            })
            .collect();
        let first = weights.first().map(|w| (*w).max(1));
        let equal = weights.iter().all(|w| Some((*w).max(1)) == first);
        let in_flight_scale = if equal {
            Vec::new()
        } else {
            let mean = sum as f64 / weights.len() as f64;
            weights
                .iter()
                .map(|w| mean / f64::from((*w).max(1)))
                .collect()
        };
        Picker::P2c {
            cumulative,
            in_flight_scale,
        }
    }

    /// A round-robin picker over endpoints with these weights, interleaved smoothly (as
    /// nginx does) so that a heavy endpoint's turns are spread out.
    pub fn round_robin(weights: &[u32]) -> Self {
        let g = weights.iter().fold(0u64, |g, w| gcd(g, u64::from(*w)));
        let w: Vec<u64> = weights.iter().map(|x| u64::from(*x) / g.max(1)).collect();
        let total: u64 = w.iter().sum();
        if total > MAX_SCHEDULE {
            let mut sum = 0u64;
            let cumulative = w
                .iter()
                .map(|x| {
                    sum += (*x).max(1);
                    sum
                })
                .collect();
            return Picker::Random { cumulative };
        }
        let total: i64 = w.iter().map(|x| *x as i64).sum();
        let mut current = vec![0i64; w.len()];
        let mut schedule = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for i in 0..w.len() {
                current[i] += w[i] as i64;
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            schedule.push(best as u32);
        }
        Picker::RoundRobin {
            schedule,
            next: AtomicUsize::new(0),
        }
    }

    /// Picks an endpoint index, never `exclude` unless it is the only one. `load(i)` is
    /// called only by P2C, and only when two different candidates are compared. `None`
    /// when there are no endpoints.
    pub fn pick<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        exclude: Option<usize>,
        load: impl Fn(usize) -> Load,
    ) -> Option<usize> {
        match self {
            Picker::P2c {
                cumulative,
                in_flight_scale,
            } => {
                let n = cumulative.len();
                if n <= 1 {
                    return (n == 1).then_some(0);
                }
                // The excluded endpoint is left out of the draw rather than redrawn, so
                // that a heavy excluded endpoint cannot exhaust a bounded number of
                // retries.
                let exclude = exclude.filter(|i| *i < n);
                let a = draw(rng, cumulative, exclude, None);
                let b = if in_flight_scale.is_empty() {
                    draw(rng, cumulative, exclude, Some(a))
                } else {
                    draw(rng, cumulative, exclude, None)
                };
                Some(cheaper(a, b, in_flight_scale, load))
            }
            Picker::Random { cumulative } => {
                let n = cumulative.len();
                if n <= 1 {
                    return (n == 1).then_some(0);
                }
                Some(draw(rng, cumulative, exclude.filter(|i| *i < n), None))
            }
            Picker::RoundRobin { schedule, next } => {
                if schedule.is_empty() {
                    return None;
                }
                let len = schedule.len();
                let mut pos = next.fetch_add(1, Ordering::Relaxed);
                let mut i = schedule[pos % len] as usize;
                if Some(i) == exclude {
                    for _ in 0..len {
                        pos = next.fetch_add(1, Ordering::Relaxed);
                        i = schedule[pos % len] as usize;
                        if Some(i) != exclude {
                            break;
                        }
                    }
                }
                Some(i)
            }
        }
    }
}

impl Picker {
    /// Picks as [`Picker::pick`] does, among the endpoints `allowed` admits (those not
    /// ejected and not excluded); `None` when it admits none. Slower than `pick` (the
    /// allowed weights are summed per call), so it serves only while some endpoint is
    /// ejected.
    pub fn pick_allowed<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        allowed: impl Fn(usize) -> bool,
        load: impl Fn(usize) -> Load,
    ) -> Option<usize> {
        match self {
            Picker::P2c {
                cumulative,
                in_flight_scale,
            } => {
                let a = draw_allowed(rng, cumulative, &allowed, None)?;
                // Distinct candidates with equal weights, independent draws otherwise, as
                // in `pick`.
                let distinct = in_flight_scale.is_empty().then_some(a);
                let b = draw_allowed(rng, cumulative, &allowed, distinct).unwrap_or(a);
                Some(cheaper(a, b, in_flight_scale, load))
            }
            Picker::Random { cumulative } => draw_allowed(rng, cumulative, &allowed, None),
            Picker::RoundRobin { schedule, next } => {
                let len = schedule.len();
                (0..len)
                    .map(|_| schedule[next.fetch_add(1, Ordering::Relaxed) % len] as usize)
                    .find(|i| allowed(*i))
            }
        }
    }
}

/// P2C's choice between candidates `a` and `b` (see the module documentation).
fn cheaper(a: usize, b: usize, in_flight_scale: &[f64], load: impl Fn(usize) -> Load) -> usize {
    if a == b {
        return a;
    }
    let (la, lb) = (load(a), load(b));
    if !in_flight_scale.is_empty() && similar(la.estimate_ns, lb.estimate_ns) {
        // Weights decide between endpoints that are not clearly apart.
        return a;
    }
    let scale = |i: usize| in_flight_scale.get(i).copied().unwrap_or(1.0);
    // Ties go to the first draw, which keeps shares equal to weights when costs are equal.
    if cost(lb, scale(b)) < cost(la, scale(a)) {
        b
    } else {
        a
    }
}

/// Draws an index `allowed` admits (other than `not`) with probability proportional to its
/// weight; `None` when there is none.
fn draw_allowed<R: Rng + ?Sized>(
    rng: &mut R,
    cumulative: &[u64],
    allowed: &impl Fn(usize) -> bool,
    not: Option<usize>,
) -> Option<usize> {
    let weight = |i: usize| cumulative[i] - if i == 0 { 0 } else { cumulative[i - 1] };
    let ok = |i: usize| Some(i) != not && allowed(i);
    let total: u64 = (0..cumulative.len()).filter(|i| ok(*i)).map(weight).sum();
    if total == 0 {
        return None;
    }
    let mut x = rng.random_range(0..total);
    let mut last = None;
    for i in (0..cumulative.len()).filter(|i| ok(*i)) {
        let w = weight(i);
        if x < w {
            return Some(i);
        }
        x -= w;
        last = Some(i);
    }
    // An endpoint returned from ejection between the two passes.
    last
}

/// Draws an index with probability proportional to its weight, leaving out up to two
/// indices (`cumulative` holds at least two entries). When everything is left out, the
/// first index not left out by `skip` alone is returned so that a caller always gets an
/// endpoint: with two endpoints, one excluded and the other already drawn, the answer is
/// the other one again.
fn draw<R: Rng + ?Sized>(
    rng: &mut R,
    cumulative: &[u64],
    skip: Option<usize>,
    also: Option<usize>,
) -> usize {
    let range = |i: usize| {
        let lo = if i == 0 { 0 } else { cumulative[i - 1] };
        (lo, cumulative[i])
    };
    let mut gaps: [(u64, u64); 2] = [(0, 0); 2];
    let mut k = 0;
    for i in [skip, also].into_iter().flatten() {
        if k == 1 && gaps[0] == range(i) {
            continue;
        }
        gaps[k] = range(i);
        k += 1;
    }
    let gaps = &mut gaps[..k];
    gaps.sort_unstable();
    let total = cumulative.last().copied().unwrap_or(0);
    let left_out: u64 = gaps.iter().map(|(lo, hi)| hi - lo).sum();
    if left_out >= total {
        return also.unwrap_or(0);
    }
    let mut x = rng.random_range(0..total - left_out);
    for (lo, hi) in gaps.iter() {
        if x >= *lo {
            x += hi - lo;
        }
    }
    cumulative.partition_point(|c| *c <= x)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(DEFAULT_SEED, DEFAULT_DECAY, t0);
        assert!((e.estimate_ns(t0) - 30e6).abs() < 1.0);
        e.observe(Duration::from_millis(200), t0);
        assert!(
            (e.estimate_ns(t0) - 200e6).abs() < 1.0,
            "peak taken at once"
        );
        // One decay constant later, a 10 ms observation pulls the estimate most of the way.
        let t1 = t0 + DEFAULT_DECAY;
        e.observe(Duration::from_millis(10), t1);
        let expect = 200e6 * (-1f64).exp() + 10e6 * (1.0 - (-1f64).exp());
        assert!((e.estimate_ns(t1) - expect).abs() < 1e3);
        // Idle, it decays toward zero.
        assert!(e.estimate_ns(t1 + DEFAULT_DECAY * 5) < expect / 100.0);
    }

    #[test]
    fn a_run_of_failures_multiplies_the_estimate_and_a_success_ends_it() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut e = PeakEwma::new(ms(1), DEFAULT_DECAY, t0);
        // The first failure of a run counts as its latency only.
        e.observe_failure(Duration::from_micros(200), t0);
        assert!(e.estimate_ns(t0) < 1.1e6, "{}", e.estimate_ns(t0));
        // From the second on, each one multiplies the estimate.
        let before = e.estimate_ns(t0);
        e.observe_failure(Duration::from_micros(200), t0);
        assert!((e.estimate_ns(t0) - before * FAILURE_FACTOR).abs() < 1.0);
        for _ in 0..20 {
            e.observe_failure(Duration::from_micros(200), t0);
        }
        assert_eq!(
            e.estimate_ns(t0),
            FAILURE_PENALTY.as_nanos() as f64,
            "capped, not overflowing"
        );
        // A failure slower than the cap counts as what it took.
        e.observe_failure(Duration::from_secs(3), t0);
        assert_eq!(e.estimate_ns(t0), 3e9);
        // After a success, a lone failure costs nothing beyond its latency again.
        let mut e = PeakEwma::new(ms(5), DEFAULT_DECAY, t0);
        for i in 0..100u32 {
            let t = t0 + ms(10) * i;
            if i % 10 == 0 {
                e.observe_failure(Duration::from_micros(200), t);
            } else {
                e.observe(ms(5), t);
            }
        }
        assert!(
            e.estimate_ns(t0 + ms(1000)) <= 5.0e6,
            "{}",
            e.estimate_ns(t0)
        );
    }

    #[test]
    fn failures_are_5xx_and_5xx_kind_grpc_statuses() {
        use http::{HeaderMap, HeaderValue, StatusCode};
        let none = HeaderMap::new();
        for code in [500, 501, 502, 503, 504, 599] {
            assert!(
                is_failure(StatusCode::from_u16(code).unwrap(), &none),
                "{code}"
            );
        }
        for code in [200, 204, 301, 404, 429] {
            assert!(
                !is_failure(StatusCode::from_u16(code).unwrap(), &none),
                "{code}"
            );
        }
        let grpc = |status: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-status", HeaderValue::from_static(status));
            is_failure(StatusCode::OK, &h)
        };
        for status in ["2", "4", "12", "13", "14", "15"] {
            assert!(grpc(status), "grpc-status {status}");
        }
        for status in ["0", "1", "3", "5", "7", "8", "16", "x"] {
            assert!(!grpc(status), "grpc-status {status}");
        }
    }

    /// One client sending requests back to back for `secs` simulated seconds: endpoint 0
    /// answers in `took[0]`, the others in `took[1]`, and
    /// `fails(t)` says whether endpoint 0 fails at `t`. Returns the picks and when
    /// endpoint 0 was picked.
    fn simulate(
        weights: &[u32],
        took: [Duration; 2],
        fails: impl Fn(Duration) -> bool,
        secs: u64,
    ) -> (usize, Vec<Duration>) {
        let p = Picker::p2c(weights);
        let mut rng = StdRng::seed_from_u64(21);
        let t0 = Instant::now();
        let mut ewma: Vec<PeakEwma> = weights
            .iter()
            .map(|_| PeakEwma::new(DEFAULT_SEED, DEFAULT_DECAY, t0))
            .collect();
        let (mut t, mut picks, mut to_first) = (Duration::ZERO, 0, Vec::new());
        while t < Duration::from_secs(secs) {
            let now = t0 + t;
            let i = p
                .pick(&mut rng, None, |i| Load {
                    estimate_ns: ewma[i].estimate_ns(now),
                    in_flight: 0,
                })
                .unwrap();
            let took = took[i.min(1)];
            t += took;
            if i == 0 {
                to_first.push(t);
                if fails(t) {
                    ewma[0].observe_failure(took, t0 + t);
                    picks += 1;
                    continue;
                }
            }
            ewma[i].observe(took, t0 + t);
            picks += 1;
        }
        (picks, to_first)
    }

    #[test]
    fn p2c_steers_away_from_an_endpoint_that_fails_fast_and_back_when_it_recovers() {
        // Equal weights only: with unequal ones a failing endpoint keeps the picks where it
        // is drawn twice, (wᵢ / Σw)² (see the module documentation).
        let (fast, slow) = (Duration::from_micros(200), Duration::from_millis(5));
        for weights in [&[1u32, 1][..], &[1, 1, 1]] {
            // Failing for 60 s: a few requests while its estimate climbs, then one probe
            // every ~14 s.
            let (total, failing) = simulate(weights, [fast, slow], |_| true, 60);
            assert!(
                failing.len() <= 20,
                "{weights:?}: the failing endpoint got {} of {total}",
                failing.len()
            );
            // Recovered at 30 s, just after a probe: it is tried again DEFAULT_DECAY × ln 4
            // (≈ 14 s) after that probe, a little later while the healthy endpoint's
            // estimate is still falling from the seed (15.7 s here); then, being faster,
            // it takes most requests.
            let recovered = Duration::from_secs(30);
            let (_, picked) = simulate(weights, [fast, slow], |t| t < recovered, 60);
            let back = picked.iter().find(|t| **t >= recovered).copied();
            assert!(
                back.is_some_and(|t| t - recovered <= Duration::from_secs(20)),
                "{weights:?}: first request after recovery at {back:?}"
            );
            let after = picked.iter().filter(|t| **t >= recovered).count();
            assert!(after > 1000, "{weights:?}: {after} requests after recovery");
        }
    }

    #[test]
    fn round_robin_respects_weights_and_interleaves() {
        let p = Picker::round_robin(&[3, 1]);
        let mut rng = StdRng::seed_from_u64(1);
        let picks: Vec<usize> = (0..8)
            .map(|_| p.pick(&mut rng, None, |_| unreachable!()).unwrap())
            .collect();
        assert_eq!(picks.iter().filter(|i| **i == 0).count(), 6);
        // Smooth: the light endpoint is not starved for a whole cycle.
        assert_eq!(&picks[..4].iter().filter(|i| **i == 1).count(), &1);
        let p = Picker::round_robin(&[1, 1, 1]);
        let picks: Vec<usize> = (0..3)
            .map(|_| p.pick(&mut rng, Some(1), |_| unreachable!()).unwrap())
            .collect();
        assert!(!picks.contains(&1));
    }

    #[test]
    fn round_robin_keeps_exact_shares_when_weights_are_too_large_for_a_schedule() {
        // The operator's flattening of a 1 % backend on 1,000 endpoints beside a 99 % one on
        // a single endpoint: scaled down to a 4,096-entry schedule, the light backend got
        // about 20 %.
        let mut weights = vec![1u32; 1000];
        weights.push(99_000);
        let p = Picker::round_robin(&weights);
        let mut rng = StdRng::seed_from_u64(5);
        let picks = 100_000;
        let heavy = (0..picks)
            .filter(|_| p.pick(&mut rng, None, |_| unreachable!()) == Some(1000))
            .count();
        let share = heavy as f64 / f64::from(picks);
        assert!(
            (share - 0.99).abs() < 0.005,
            "heavy endpoint's share {share}"
        );
        // A retry still goes elsewhere.
        assert!((0..1000).all(|_| p.pick(&mut rng, Some(1000), |_| unreachable!()) != Some(1000)));
    }

    /// Each endpoint's share of `picks` picks, against its weight's share.
    fn shares(
        p: &Picker,
        weights: &[u32],
        picks: u32,
        mut load: impl FnMut(&[u32]) -> Vec<Load>,
    ) -> Vec<(f64, f64)> {
        let mut rng = StdRng::seed_from_u64(11);
        let mut counts = vec![0u32; weights.len()];
        for _ in 0..picks {
            let loads = load(&counts);
            counts[p.pick(&mut rng, None, |i| loads[i]).unwrap()] += 1;
        }
        let total: u32 = weights.iter().sum();
        counts
            .iter()
            .zip(weights)
            .map(|(c, w)| {
                (
                    f64::from(*c) / f64::from(picks),
                    f64::from(*w) / f64::from(total),
                )
            })
            .collect()
    }

    const WEIGHT_SETS: &[&[u32]] = &[
        &[9, 1],
        &[1, 9],
        &[1, 1],
        &[1, 1, 1],
        &[5, 3, 2],
        &[1, 1000],
        &[1000, 1, 1],
    ];

    #[test]
    fn p2c_shares_match_weights_when_costs_are_equal() {
        let flat = Load {
            estimate_ns: 30e6,
            in_flight: 0,
        };
        for weights in WEIGHT_SETS {
            let p = Picker::p2c(weights);
            for (got, want) in shares(&p, weights, 10_000, |_| vec![flat; weights.len()]) {
                assert!(
                    (got - want).abs() <= 0.02,
                    "{weights:?}: share {got} for weight share {want}"
                );
            }
        }
    }

    #[test]
    fn p2c_shares_match_weights_when_latency_differs_only_by_noise() {
        // Equal latency as a proxy sees it: estimates that differ from pick to pick, with
        // neither endpoint favoured.
        let mut noise = StdRng::seed_from_u64(5);
        for weights in WEIGHT_SETS {
            let p = Picker::p2c(weights);
            let got = shares(&p, weights, 10_000, |_| {
                (0..weights.len())
                    .map(|_| Load {
                        estimate_ns: 30e6 * noise.random_range(0.8..1.2),
                        in_flight: 0,
                    })
                    .collect()
            });
            for (got, want) in got {
                assert!(
                    (got - want).abs() <= 0.02,
                    "{weights:?}: share {got} for weight share {want}"
                );
            }
        }
    }

    #[test]
    fn p2c_shares_match_weights_under_concurrent_load() {
        // Eight clients, each sending its next request when its last one completes, every
        // request taking the same time: requests complete in the order they started.
        for weights in WEIGHT_SETS {
            let p = Picker::p2c(weights);
            let mut rng = StdRng::seed_from_u64(9);
            let mut in_flight = vec![0usize; weights.len()];
            let mut queue: std::collections::VecDeque<usize> = std::collections::VecDeque::new();
            let mut counts = vec![0u32; weights.len()];
            for n in 0..10_000 + 8 {
                if queue.len() == 8 {
                    let done = queue.pop_front().unwrap();
                    in_flight[done] -= 1;
                }
                let i = p
                    .pick(&mut rng, None, |i| Load {
                        estimate_ns: 30e6,
                        in_flight: in_flight[i],
                    })
                    .unwrap();
                in_flight[i] += 1;
                queue.push_back(i);
                if n >= 8 {
                    counts[i] += 1;
                }
            }
            let total: u32 = weights.iter().sum();
            for (c, w) in counts.iter().zip(*weights) {
                let (got, want) = (f64::from(*c) / 10_000.0, f64::from(*w) / f64::from(total));
                assert!(
                    (got - want).abs() <= 0.02,
                    "{weights:?}: share {got} for weight share {want}"
                );
            }
        }
    }

    #[test]
    fn p2c_avoids_the_slow_endpoint_and_the_excluded_one() {
        let p = Picker::p2c(&[1, 1, 1]);
        let mut rng = StdRng::seed_from_u64(3);
        let est = [1e6, 1e6, 500e6];
        let load = |i: usize| Load {
            estimate_ns: est[i],
            in_flight: 0,
        };
        let mut slow = 0;
        for _ in 0..3000 {
            let i = p.pick(&mut rng, None, load).unwrap();
            if i == 2 {
                slow += 1;
            }
            assert_ne!(p.pick(&mut rng, Some(0), load), Some(0));
        }
        assert_eq!(
            slow, 0,
            "with equal weights P2C never prefers a slower candidate"
        );
        assert_eq!(Picker::p2c(&[]).pick(&mut rng, None, load), None);
        assert_eq!(
            Picker::p2c(&[4]).pick(&mut rng, Some(0), load),
            Some(0),
            "the only one"
        );
    }

    #[test]
    fn weighted_p2c_still_prefers_the_faster_endpoint_of_equal_weight() {
        // Endpoints 0 and 1 have equal weight, 0 is 50 times slower: it keeps only the
        // picks where it is drawn twice, (3/7)² ≈ 18 % instead of 3/7 ≈ 43 %.
        let weights = [3, 3, 1];
        let p = Picker::p2c(&weights);
        let est = [50e6, 1e6, 1e6];
        let got = shares(&p, &weights, 10_000, |_| {
            (0..3)
                .map(|i| Load {
                    estimate_ns: est[i],
                    in_flight: 0,
                })
                .collect()
        });
        assert!((got[0].0 - (3.0f64 / 7.0).powi(2)).abs() <= 0.02, "{got:?}");
        assert!(got[1].0 > got[0].0 * 2.0, "{got:?}");
    }

    #[test]
    fn with_unequal_weights_latency_overrules_weights_only_beyond_the_band() {
        let weights = [1, 1, 2];
        let p = Picker::p2c(&weights);
        for (slowdown, want) in [(1.5, 0.25), (1.9, 0.25), (2.5, 0.25 * 0.25), (50.0, 0.0625)] {
            let est = [1e6 * slowdown, 1e6, 1e6];
            let got = shares(&p, &weights, 10_000, |_| {
                (0..3)
                    .map(|i| Load {
                        estimate_ns: est[i],
                        in_flight: 0,
                    })
                    .collect()
            });
            assert!(
                (got[0].0 - want).abs() <= 0.02,
                "{slowdown}× slower: {got:?}"
            );
        }
    }

    #[test]
    fn a_heavy_excluded_endpoint_is_never_picked() {
        let mut rng = StdRng::seed_from_u64(4);
        let load = |_| Load {
            estimate_ns: 1e6,
            in_flight: 0,
        };
        for weights in [&[1000u32, 1][..], &[1000, 1, 1], &[1, 1]] {
            let p = Picker::p2c(weights);
            for _ in 0..1000 {
                assert_ne!(p.pick(&mut rng, Some(0), load), Some(0), "{weights:?}");
            }
        }
    }

    #[test]
    fn pick_allowed_never_picks_what_is_not_allowed_and_keeps_weights() {
        let mut rng = StdRng::seed_from_u64(8);
        let flat = |_| Load {
            estimate_ns: 1e6,
            in_flight: 0,
        };
        for p in [
            Picker::p2c(&[1, 1, 1]),
            Picker::p2c(&[3, 1, 1]),
            Picker::round_robin(&[1, 2, 1]),
            Picker::round_robin(&[5000, 1, 5000]),
        ] {
            let mut counts = [0u32; 3];
            for _ in 0..3000 {
                let i = p.pick_allowed(&mut rng, |i| i != 1, flat).unwrap();
                counts[i] += 1;
            }
            assert_eq!(counts[1], 0, "{p:?}");
            assert!(counts[0] > 0 && counts[2] > 0, "{p:?}: {counts:?}");
            assert_eq!(p.pick_allowed(&mut rng, |_| false, flat), None);
        }
        let p = Picker::p2c(&[1, 1, 1]);
        let mut counts = [0u32; 3];
        for _ in 0..3000 {
            counts[p.pick_allowed(&mut rng, |i| i != 1, flat).unwrap()] += 1;
        }
        assert!(counts[0].abs_diff(counts[2]) < 300, "{counts:?}");
    }

    #[test]
    fn in_flight_requests_raise_cost_relative_to_weight() {
        let idle = Load {
            estimate_ns: 10e6,
            in_flight: 0,
        };
        let busy = Load {
            estimate_ns: 10e6,
            in_flight: 5,
        };
        assert!(cost(busy, 1.0) > cost(idle, 1.0));
        // Five requests on an endpoint meant to carry five times the mean share count as one.
        assert_eq!(
            cost(busy, 0.2),
            cost(
                Load {
                    in_flight: 1,
                    ..busy
                },
                1.0
            )
        );
    }
}
