//! Endpoint choice, without I/O: peak-EWMA latency estimates, power of two choices, and
//! weighted round robin. The runtime ([`crate::store`]) owns one [`Picker`] per service and
//! one [`PeakEwma`] per endpoint, and calls in here once per request.
//!
//! ```text
//! request ──Picker::pick(cost of endpoint i)──▶ index ──(response headers)──▶ PeakEwma::observe
//! ```
//!
//! Peak EWMA (as in Finagle, Linkerd and tower): an endpoint's latency estimate jumps up at
//! once to any slower observation and decays toward faster ones with time constant
//! [`DEFAULT_DECAY`]; a new endpoint starts at [`DEFAULT_SEED`]. The cost of an endpoint is
//! `estimate × (in-flight + 1) ÷ weight`. P2C samples two distinct endpoints, each with
//! probability proportional to its weight, and takes the cheaper.

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
/// until the penalty decays.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// A peak-sensitive exponentially weighted moving average of latency.
#[derive(Debug, Clone)]
pub struct PeakEwma {
    estimate_ns: f64,
    stamp: Instant,
    decay_ns: f64,
}

impl PeakEwma {
    /// An estimate starting at `seed`.
    pub fn new(seed: Duration, decay: Duration, now: Instant) -> Self {
        PeakEwma {
            estimate_ns: seed.as_nanos() as f64,
            stamp: now,
            decay_ns: decay.as_nanos().max(1) as f64,
        }
    }

    /// Records one observed latency.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
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

/// The P2C cost of an endpoint.
pub fn cost(estimate_ns: f64, in_flight: usize, weight: u32) -> f64 {
    (estimate_ns + 1.0) * (in_flight as f64 + 1.0) / f64::from(weight.max(1))
}

/// How a service picks among its endpoints.
#[derive(Debug)]
pub enum Picker {
    /// Power of two weighted random choices, cheaper wins.
    P2c {
        /// Running sums of weights, for weighted sampling.
        cumulative: Vec<u64>,
    },
    /// Smooth weighted round robin over a precomputed schedule.
    RoundRobin {
        /// Endpoint indices in the order they are served.
        schedule: Vec<u32>,
        /// The next position in `schedule`.
        next: AtomicUsize,
    },
}

/// The most entries a round-robin schedule holds; larger weight sums are scaled down.
const MAX_SCHEDULE: u64 = 4096;

impl Picker {
    /// A P2C picker over endpoints with these weights.
    pub fn p2c(weights: &[u32]) -> Self {
        let mut sum = 0u64;
        let cumulative = weights
            .iter()
            .map(|w| {
                sum += u64::from((*w).max(1));
                sum
            })
            .collect();
        Picker::P2c { cumulative }
    }

    /// A round-robin picker over endpoints with these weights, interleaved smoothly (as
    /// nginx does) so that a heavy endpoint's turns are spread out.
    pub fn round_robin(weights: &[u32]) -> Self {
        let g = weights.iter().fold(0u64, |g, w| gcd(g, u64::from(*w)));
        let mut w: Vec<u64> = weights.iter().map(|x| u64::from(*x) / g.max(1)).collect();
        let total: u64 = w.iter().sum();
        if total > MAX_SCHEDULE {
            for x in &mut w {
                *x = (*x * MAX_SCHEDULE / total).max(1);
            }
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

    /// Picks an endpoint index, never `exclude` unless it is the only one. `cost(i)` is
    /// called only by P2C. `None` when there are no endpoints.
    pub fn pick<R: Rng + ?Sized>(
        &self,
        rng: &mut R,
        exclude: Option<usize>,
        cost: impl Fn(usize) -> f64,
    ) -> Option<usize> {
        match self {
            Picker::P2c { cumulative } => {
                let n = cumulative.len();
                let total = *cumulative.last()?;
                if n == 1 {
                    return Some(0);
                }
                let sample = |rng: &mut R| {
                    let x = rng.random_range(0..total);
                    cumulative.partition_point(|c| *c <= x)
                };
                // Bounded retries to draw distinct, non-excluded candidates; with weights
                // skewed enough we settle for what we have.
                let mut a = sample(rng);
                for _ in 0..8 {
                    if Some(a) != exclude {
                        break;
                    }
                    a = sample(rng);
                }
                let mut b = sample(rng);
                for _ in 0..8 {
                    if b != a && Some(b) != exclude {
                        break;
                    }
                    b = sample(rng);
                }
                if Some(b) == exclude || b == a {
                    return Some(a);
                }
                Some(if cost(b) < cost(a) { b } else { a })
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
    fn round_robin_respects_weights_and_interleaves() {
        let p = Picker::round_robin(&[3, 1]);
        let mut rng = StdRng::seed_from_u64(1);
        let picks: Vec<usize> = (0..8)
            .map(|_| p.pick(&mut rng, None, |_| 0.0).unwrap())
            .collect();
        assert_eq!(picks.iter().filter(|i| **i == 0).count(), 6);
        // Smooth: the light endpoint is not starved for a whole cycle.
        assert_eq!(&picks[..4].iter().filter(|i| **i == 1).count(), &1);
        let p = Picker::round_robin(&[1, 1, 1]);
        let picks: Vec<usize> = (0..3)
            .map(|_| p.pick(&mut rng, Some(1), |_| 0.0).unwrap())
            .collect();
        assert!(!picks.contains(&1));
    }

    #[test]
    fn p2c_spreads_by_weight_when_costs_are_equal() {
        let p = Picker::p2c(&[1, 3]);
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = [0u32; 2];
        for _ in 0..10_000 {
            counts[p
                .pick(&mut rng, None, |i| cost(30e6, 0, [1, 3][i]))
                .unwrap()] += 1;
        }
        // Two candidates are always distinct here, so the cheaper per weight wins.
        assert!(counts[1] > counts[0] * 2, "{counts:?}");
    }

    #[test]
    fn p2c_avoids_the_slow_endpoint_and_the_excluded_one() {
        let p = Picker::p2c(&[1, 1, 1]);
        let mut rng = StdRng::seed_from_u64(3);
        let est = [1e6, 1e6, 500e6];
        let mut slow = 0;
        for _ in 0..3000 {
            let i = p.pick(&mut rng, None, |i| cost(est[i], 0, 1)).unwrap();
            if i == 2 {
                slow += 1;
            }
            assert_ne!(p.pick(&mut rng, Some(0), |i| cost(est[i], 0, 1)), Some(0));
        }
        assert_eq!(slow, 0, "P2C never prefers a slower candidate");
        assert_eq!(Picker::p2c(&[]).pick(&mut rng, None, |_| 0.0), None);
    }

    #[test]
    fn in_flight_requests_raise_cost() {
        assert!(cost(10e6, 5, 1) > cost(10e6, 0, 1));
        assert!(cost(10e6, 0, 2) < cost(10e6, 0, 1));
    }
}
