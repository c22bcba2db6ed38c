//! The wait before a retry: exponential, capped, with jitter.
//!
//! ```text
//! retry n ──▶ cap = min(max, base × 2^(n−1)) ──▶ wait uniform in [cap/2, cap]
//! ```
//!
//! Jitter keeps clients that failed together from retrying together. Half the cap is kept
//! fixed ("equal jitter") rather than drawing from `[0, cap]` ("full jitter"): a retry
//! that may fire at once gives an overloaded upstream no time to recover, while `[cap/2,
//! cap]` still spreads a synchronized wave over half the interval. `base` is thus the
//! first wait's upper bound and `max` the longest wait, as `BackoffConfig` describes them.

use std::time::Duration;

use rand::Rng;
use weft_api::traffic as wire;

/// The first wait's upper bound when a rule sets no backoff.
pub const DEFAULT_BASE: Duration = Duration::from_millis(25);
/// The longest wait when a rule sets no backoff.
pub const DEFAULT_MAX: Duration = Duration::from_millis(250);

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// A validated backoff: `0 < base ≤ max`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: DEFAULT_BASE,
            max: DEFAULT_MAX,
        }
    }
}

impl Backoff {
    /// Validates a rule's backoff; `None` is the default (25ms up to 250ms). `field` names
    /// the backoff itself, such as `route.rules[1].retries.backoff`.
    pub fn from_wire(w: Option<&wire::BackoffConfig>, field: &str) -> Result<Self, Vec<String>> {
        let Some(w) = w else {
            return Ok(Backoff::default());
        };
        let mut problems = Vec::new();
        if w.base.as_std().is_zero() {
            problems.push(format!("{field}.base must be greater than zero"));
        }
        if w.max.as_std().is_zero() {
            problems.push(format!("{field}.max must be greater than zero"));
        }
        if w.base.as_std() > w.max.as_std() {
            problems.push(format!("{field}: base {} exceeds max {}", w.base, w.max));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Backoff {
            base: w.base.as_std(),
            max: w.max.as_std(),
        })
    }

    /// The first wait's upper bound.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The longest wait.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The upper bound of the wait before retry number `retry` (1 for the first retry; 0
    /// is read as 1): `min(max, base × 2^(retry−1))`, saturating rather than overflowing.
    pub fn cap(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1);
        let base = self.base.as_nanos();
        let max = self.max.as_nanos();
        // A shift of 64 or more already exceeds any u128 `max` for a nonzero base.
        let cap = if doublings >= 64 {
            max
        } else {
            base.saturating_mul(1u128 << doublings).min(max)
        };
        from_nanos(cap)
    }

    /// The wait before retry number `retry` (1 for the first retry): uniform in
    /// `[cap/2, cap]` with `cap` as [`Backoff::cap`].
    pub fn delay<R: Rng + ?Sized>(&self, retry: u32, rng: &mut R) -> Duration {
        let cap = self.cap(retry).as_nanos();
        let low = cap / 2;
        from_nanos(rng.random_range(low..=cap))
    }
}

/// A duration from nanoseconds; every value here is at most a validated `max`, which
/// fits `Duration`, so the seconds never truncate.
fn from_nanos(nanos: u128) -> Duration {
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // The remainder is below 10^9, which fits u32.
    let sub = (nanos % NANOS_PER_SEC) as u32;
    Duration::new(secs, sub)
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    fn wire(base: &str, max: &str) -> wire::BackoffConfig {
        wire::BackoffConfig {
            base: base.parse().unwrap(),
            max: max.parse().unwrap(),
        }
    }

    fn backoff(base: &str, max: &str) -> Backoff {
        Backoff::from_wire(Some(&wire(base, max)), "b").unwrap()
    }

    #[test]
    fn absent_backoff_is_25ms_up_to_250ms() {
        let b = Backoff::from_wire(None, "b").unwrap();
        assert_eq!((b.base(), b.max()), (DEFAULT_BASE, DEFAULT_MAX));
    }

    #[test]
    fn base_above_max_and_zero_durations_are_refused_by_field() {
        let err = Backoff::from_wire(Some(&wire("2s", "1s")), "route.rules[1].retries.backoff");
        assert_eq!(
            err.unwrap_err(),
            ["route.rules[1].retries.backoff: base 2s exceeds max 1s"]
        );
        let err = Backoff::from_wire(Some(&wire("0s", "0ms")), "b").unwrap_err();
        assert_eq!(
            err,
            [
                "b.base must be greater than zero",
                "b.max must be greater than zero"
            ]
        );
        assert!(Backoff::from_wire(Some(&wire("1s", "1s")), "b").is_ok());
    }

    #[test]
    fn the_cap_doubles_from_base_until_max() {
        let b = backoff("25ms", "250ms");
        let caps: Vec<u64> = (0..=6).map(|n| b.cap(n).as_millis() as u64).collect();
        assert_eq!(caps, [25, 25, 50, 100, 200, 250, 250]);
    }

    #[test]
    fn the_cap_saturates_at_max_for_any_retry_number() {
        let b = backoff("99999h99999h99999h99999h", "99999h99999h99999h99999h");
        for n in [1, 2, 63, 64, 65, 127, 128, u32::MAX] {
            assert_eq!(b.cap(n), b.max(), "retry {n}");
        }
        let b = backoff("1ms", "10s");
        for n in [30, 64, 65, 200, u32::MAX] {
            assert_eq!(b.cap(n), Duration::from_secs(10), "retry {n}");
        }
    }

    #[test]
    fn every_delay_is_within_half_the_cap_and_the_cap_over_many_draws() {
        let b = backoff("25ms", "250ms");
        let mut rng = StdRng::seed_from_u64(7);
        for retry in 0..=12 {
            let cap = b.cap(retry);
            let (mut lowest, mut highest) = (Duration::MAX, Duration::ZERO);
            for _ in 0..10_000 {
                let d = b.delay(retry, &mut rng);
                assert!(
                    d >= cap / 2 && d <= cap,
                    "retry {retry}: {d:?} outside cap {cap:?}"
                );
                lowest = lowest.min(d);
                highest = highest.max(d);
            }
            // The draws cover the interval rather than sitting at one point.
            let span = cap - cap / 2;
            assert!(
                lowest < cap / 2 + span / 10,
                "retry {retry}: lowest {lowest:?}"
            );
            assert!(
                highest > cap - span / 10,
                "retry {retry}: highest {highest:?}"
            );
        }
    }

    #[test]
    fn a_huge_max_draws_without_overflow() {
        let b = backoff("1ms", "99999h99999h99999h99999h");
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..1000 {
            let d = b.delay(u32::MAX, &mut rng);
            assert!(d >= b.max() / 2 && d <= b.max());
        }
    }
}
