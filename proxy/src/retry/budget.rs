//! The retry budget: retries may add at most a share of recent traffic, plus a floor, so
//! that an outage does not multiply the load on the service that is failing (Finagle's and
//! Linkerd's `RetryBudget`).
//!
//! ```text
//! original request ──deposit(now)──▶ ┌ ring of 10 slots over ttl ┐
//! retry ────────────withdraw(now)──▶ │ deposits, withdrawals     │ ──▶ Allowed / Exhausted
//!                                    └───────────────────────────┘
//! allowed in window = minRetriesPerSecond × ttl + percent/100 × deposits − withdrawals
//! ```
//!
//! The window slides in steps of a tenth of `ttl`: a deposit or withdrawal counts for
//! between 0.9 × ttl and ttl after it happened. Counting per slot keeps the state a fixed
//! 160 bytes whatever the traffic, at the price of that step.

use std::{
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use weft_api::traffic as wire;

/// The share of recent requests retries may add when unset.
pub const DEFAULT_PERCENT: u32 = 20;
/// Retries per second allowed whatever the ratio when unset.
pub const DEFAULT_MIN_RETRIES_PER_SECOND: u32 = 10;
/// The window requests are counted over when unset.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// The shortest window accepted.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// The longest window accepted.
pub const MAX_TTL: Duration = Duration::from_secs(60);
/// The largest `minRetriesPerSecond` accepted.
pub const MAX_MIN_RETRIES_PER_SECOND: u32 = 10_000;

/// Slots in the window's ring: the window slides in steps of `ttl / SLOTS`.
const SLOTS: usize = 10;

/// Budget arithmetic is done in units of 1/100,000 of a retry, so that the floor
/// (`min × ttl`, ttl in milliseconds) and the ratio (`percent / 100`) are both exact
/// integers: the floor is `min × ttl_ms × 100` units, a deposit earns `percent × 1000`.
const UNITS_PER_RETRY: u128 = 100_000;

/// A validated retry budget: `percent ≤ 100`, `1s ≤ ttl ≤ 60s`, `minRetriesPerSecond ≤
/// 10,000`. Compared with `==` so that a config update that leaves a budget unchanged
/// keeps its counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetSpec {
    percent: u32,
    min_retries_per_second: u32,
    ttl: Duration,
    dry_run: bool,
}

impl Default for BudgetSpec {
    /// 20 % of requests plus 10 retries per second over 10s, enforced.
    fn default() -> Self {
        BudgetSpec {
            percent: DEFAULT_PERCENT,
            min_retries_per_second: DEFAULT_MIN_RETRIES_PER_SECOND,
            ttl: DEFAULT_TTL,
            dry_run: false,
        }
    }
}

impl BudgetSpec {
    /// Validates a budget; `None` is the default. `field` names the budget itself, such as
    /// `services[0].retryBudget`.
    pub fn from_wire(
        w: Option<&wire::RetryBudgetConfig>,
        field: &str,
    ) -> Result<Self, Vec<String>> {
        let Some(w) = w else {
            return Ok(BudgetSpec::default());
        };
        let mut problems = Vec::new();
        if w.percent > 100 {
            problems.push(format!("{field}.percent: {} exceeds 100", w.percent));
        }
        if w.min_retries_per_second > MAX_MIN_RETRIES_PER_SECOND {
            problems.push(format!(
                "{field}.minRetriesPerSecond: {} exceeds {MAX_MIN_RETRIES_PER_SECOND}",
                w.min_retries_per_second
            ));
        }
        let ttl = w.ttl.as_ref().map_or(DEFAULT_TTL, |d| d.as_std());
        if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
            let text = w.ttl.as_ref().map(|d| d.to_string()).unwrap_or_default();
            problems.push(format!("{field}.ttl: {text} is outside 1s to 60s"));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(BudgetSpec {
            percent: w.percent,
            min_retries_per_second: w.min_retries_per_second,
            ttl,
            dry_run: w.dry_run,
        })
    }

    /// Share of the window's requests that retries may add, 0 to 100.
    pub fn percent(&self) -> u32 {
        self.percent
    }

    /// Retries per second allowed whatever the ratio.
    pub fn min_retries_per_second(&self) -> u32 {
        self.min_retries_per_second
    }

    /// The window deposits and withdrawals are counted over.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Whether an exhausted budget only reports, and lets the retry happen.
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// Whether one more retry fits in a window holding these counts. Pure arithmetic, so
    /// the edge cases (percent 0 with no floor, counts near `u64::MAX`) are tested alone.
    fn allows(&self, deposits: u64, withdrawals: u64) -> bool {
        // u128 holds every product here: each factor is at most 64 bits wide and the
        // constants are small, so nothing saturates before the comparison.
        let ttl_ms = self.ttl.as_millis();
        let floor = u128::from(self.min_retries_per_second) * ttl_ms * 100;
        let earned = u128::from(self.percent) * 1000 * u128::from(deposits);
        let spent = u128::from(withdrawals) * UNITS_PER_RETRY;
        floor + earned >= spent + UNITS_PER_RETRY
    }
}

/// What [`RetryBudget::withdraw`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Withdrawal {
    /// The retry fits in the budget, and was counted.
    Allowed,
    /// The budget is spent: do not retry.
    Exhausted,
    /// The budget would refuse, but is in dry run: retry, and record that it would have
    /// refused. Not counted, so the budget goes on to say what an enforcing one would.
    DryRunExhausted,
}

/// One service's or rule's retry budget, shared by all its requests.
#[derive(Debug)]
pub struct RetryBudget {
    spec: BudgetSpec,
    slot_width: Duration,
    window: Mutex<Window>,
}

#[derive(Debug, Default)]
struct Window {
    /// The instant slot numbers count from: the first one this budget saw.
    origin: Option<Instant>,
    /// The number of the newest slot, counted from `origin`.
    head: u64,
    slots: [Slot; SLOTS],
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    deposits: u64,
    withdrawals: u64,
}

impl RetryBudget {
    /// An empty budget: only the floor is available until requests deposit.
    pub fn new(spec: BudgetSpec) -> Self {
        let slot_width = spec.ttl / SLOTS as u32;
        RetryBudget {
            spec,
            slot_width,
            window: Mutex::new(Window::default()),
        }
    }

    /// What this budget enforces.
    pub fn spec(&self) -> &BudgetSpec {
        &self.spec
    }

    /// Counts one original request (not a retry).
    pub fn deposit(&self, now: Instant) {
        let mut window = self.lock();
        let slot = window.advance(now, self.slot_width);
        slot.deposits = slot.deposits.saturating_add(1);
    }

    /// Asks for one retry; an allowed one is counted against the window.
    pub fn withdraw(&self, now: Instant) -> Withdrawal {
        let mut window = self.lock();
        window.advance(now, self.slot_width);
        let (deposits, withdrawals) = window.totals();
        if self.spec.allows(deposits, withdrawals) {
            let slot = window.current();
            slot.withdrawals = slot.withdrawals.saturating_add(1);
            Withdrawal::Allowed
        } else if self.spec.dry_run {
            Withdrawal::DryRunExhausted
        } else {
            Withdrawal::Exhausted
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        // The window holds only counters, each always valid; a panic elsewhere while the
        // lock was held leaves nothing half-updated that matters.
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Window {
    /// Moves the ring to the slot of `now`, clearing slots that left the window, and
    /// returns that slot. An instant older than the newest seen (callers race to the lock)
    /// counts in the newest slot rather than moving the window back.
    fn advance(&mut self, now: Instant, width: Duration) -> &mut Slot {
        let origin = *self.origin.get_or_insert(now);
        let elapsed = now.saturating_duration_since(origin).as_nanos();
        let index = u64::try_from(elapsed / width.as_nanos().max(1)).unwrap_or(u64::MAX);
        if index > self.head {
            let stale = (index - self.head).min(SLOTS as u64);
            for step in 1..=stale {
                let n = self.head.wrapping_add(step);
                self.slots[(n % SLOTS as u64) as usize] = Slot::default();
            }
            self.head = index;
        }
        self.current()
    }

    fn current(&mut self) -> &mut Slot {
        &mut self.slots[(self.head % SLOTS as u64) as usize]
    }

    fn totals(&self) -> (u64, u64) {
        self.slots.iter().fold((0u64, 0u64), |(d, w), s| {
            (
                d.saturating_add(s.deposits),
                w.saturating_add(s.withdrawals),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(percent: u32, min: u32, ttl: &str, dry_run: bool) -> BudgetSpec {
        let w = wire::RetryBudgetConfig {
            percent,
            min_retries_per_second: min,
            ttl: Some(ttl.parse().unwrap()),
            dry_run,
        };
        BudgetSpec::from_wire(Some(&w), "budget").unwrap()
    }

    /// Sends `requests` originals at `now`, each retried up to `attempts` times while
    /// the budget allows (every attempt fails), and returns the retries made.
    fn outage(budget: &RetryBudget, now: Instant, requests: u64, attempts: u32) -> u64 {
        let mut retries = 0;
        for _ in 0..requests {
            budget.deposit(now);
            for _ in 0..attempts {
                if budget.withdraw(now) != Withdrawal::Allowed {
                    break;
                }
                retries += 1;
            }
        }
        retries
    }

    #[test]
    fn absent_budget_is_20_percent_plus_10_per_second_over_10s() {
        let s = BudgetSpec::from_wire(None, "b").unwrap();
        assert_eq!(s, BudgetSpec::default());
        assert_eq!(
            (
                s.percent(),
                s.min_retries_per_second(),
                s.ttl(),
                s.dry_run()
            ),
            (20, 10, Duration::from_secs(10), false)
        );
        let wire_default = wire::RetryBudgetConfig::default();
        assert_eq!(BudgetSpec::from_wire(Some(&wire_default), "b").unwrap(), s);
    }

    #[test]
    fn out_of_range_fields_are_refused_by_field() {
        let w = wire::RetryBudgetConfig {
            percent: 101,
            min_retries_per_second: 10_001,
            ttl: Some("61s".parse().unwrap()),
            dry_run: false,
        };
        assert_eq!(
            BudgetSpec::from_wire(Some(&w), "services[0].retryBudget").unwrap_err(),
            [
                "services[0].retryBudget.percent: 101 exceeds 100",
                "services[0].retryBudget.minRetriesPerSecond: 10001 exceeds 10000",
                "services[0].retryBudget.ttl: 61s is outside 1s to 60s",
            ]
        );
        let short = wire::RetryBudgetConfig {
            ttl: Some("999ms".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(
            BudgetSpec::from_wire(Some(&short), "b").unwrap_err(),
            ["b.ttl: 999ms is outside 1s to 60s"]
        );
        assert!(
            BudgetSpec::from_wire(
                Some(&wire::RetryBudgetConfig {
                    percent: 100,
                    min_retries_per_second: 10_000,
                    ttl: Some("60s".parse().unwrap()),
                    dry_run: true,
                }),
                "b"
            )
            .is_ok()
        );
    }

    #[test]
    fn a_full_outage_amplifies_load_by_at_most_one_plus_the_ratio_plus_the_floor() {
        let budget = RetryBudget::new(spec(20, 10, "10s", false));
        let now = Instant::now();
        let requests = 1000;
        let retries = outage(&budget, now, requests, 10);
        let floor = 10 * 10;
        assert!(retries <= floor + requests / 5, "{retries} retries");
        // The budget is used, not merely respected: the bound is also reached.
        assert!(retries >= floor + requests / 5 - 1, "{retries} retries");
        let amplification = (requests + retries) as f64 / requests as f64;
        assert!(amplification <= 1.0 + 0.2 + floor as f64 / requests as f64);
    }

    #[test]
    fn a_sustained_outage_stays_within_the_ratio_and_the_floor_per_second() {
        let budget = RetryBudget::new(spec(20, 10, "10s", false));
        let t0 = Instant::now();
        let (mut requests, mut retries) = (0, 0);
        // 100 requests a second for two minutes, every attempt failing.
        for tick in 0..1200 {
            let now = t0 + Duration::from_millis(100 * tick);
            retries += outage(&budget, now, 10, 10);
            requests += 10;
        }
        // Each of the twelve disjoint windows allows at most its floor (10/s × 10s) plus a
        // fifth of its deposits.
        let bound = requests / 5 + 12 * 10 * 10;
        assert!(
            retries <= bound,
            "{retries} retries for {requests} requests"
        );
        assert!(
            retries >= requests / 5,
            "{retries} retries for {requests} requests"
        );
    }

    #[test]
    fn deposits_expire_after_the_ttl() {
        let budget = RetryBudget::new(spec(100, 0, "10s", false));
        let t0 = Instant::now();
        for _ in 0..5 {
            budget.deposit(t0);
        }
        // Still in the window just before the ttl: they pay for a retry.
        let before = t0 + Duration::from_secs(9);
        assert_eq!(budget.withdraw(before), Withdrawal::Allowed);
        // At the ttl they have left it, and with no floor nothing pays for one.
        assert_eq!(
            budget.withdraw(t0 + Duration::from_secs(10)),
            Withdrawal::Exhausted
        );
    }

    #[test]
    fn withdrawals_expire_after_the_ttl_so_the_floor_refills() {
        let budget = RetryBudget::new(spec(0, 1, "1s", false));
        let t0 = Instant::now();
        assert_eq!(budget.withdraw(t0), Withdrawal::Allowed);
        assert_eq!(budget.withdraw(t0), Withdrawal::Exhausted);
        assert_eq!(
            budget.withdraw(t0 + Duration::from_millis(850)),
            Withdrawal::Exhausted
        );
        assert_eq!(
            budget.withdraw(t0 + Duration::from_secs(1)),
            Withdrawal::Allowed
        );
    }

    #[test]
    fn an_instant_older_than_the_newest_counts_in_the_newest_slot() {
        let budget = RetryBudget::new(spec(100, 0, "1s", false));
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(5);
        budget.deposit(t1);
        budget.deposit(t0);
        assert_eq!(budget.withdraw(t1), Withdrawal::Allowed);
        assert_eq!(budget.withdraw(t1), Withdrawal::Allowed);
        assert_eq!(budget.withdraw(t1), Withdrawal::Exhausted);
    }

    #[test]
    fn percent_zero_with_no_floor_never_allows_a_retry() {
        let budget = RetryBudget::new(spec(0, 0, "10s", false));
        let now = Instant::now();
        assert_eq!(outage(&budget, now, 1000, 10), 0);
        assert!(!budget.spec().allows(u64::MAX, 0));
    }

    #[test]
    fn huge_counts_do_not_overflow() {
        let s = spec(100, MAX_MIN_RETRIES_PER_SECOND, "60s", false);
        assert!(s.allows(u64::MAX, u64::MAX - 1));
        assert!(s.allows(u64::MAX, u64::MAX));
        assert!(!spec(100, 0, "1s", false).allows(u64::MAX, u64::MAX));
        assert!(!spec(20, 0, "1s", false).allows(u64::MAX, u64::MAX));
        assert!(spec(1, 0, "1s", false).allows(u64::MAX, u64::MAX / 100 - 1));
    }

    #[test]
    fn dry_run_reports_exhaustion_and_counts_only_what_an_enforcing_budget_would() {
        let budget = RetryBudget::new(spec(0, 1, "1s", true));
        let now = Instant::now();
        assert_eq!(budget.withdraw(now), Withdrawal::Allowed);
        assert_eq!(budget.withdraw(now), Withdrawal::DryRunExhausted);
        assert_eq!(budget.withdraw(now), Withdrawal::DryRunExhausted);
        // An enforcing budget would be whole again one ttl later; so is this one.
        assert_eq!(
            budget.withdraw(now + Duration::from_secs(1)),
            Withdrawal::Allowed
        );
    }

    #[test]
    fn a_budget_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RetryBudget>();
    }
}
