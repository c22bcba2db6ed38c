//! The inbound rate limit: a token bucket per workload or per client, checked once per
//! request before it reaches the application.
//!
//! ```text
//! request from client ──check(client, now)──▶ bucket (capacity burst, refill rps) ──▶ Allow
//!                                                 │ empty                              │
//!                                                 ▼                                    ▼
//!                               Limited { retry_after } / DryRunLimited ──▶ 429 + Retry-After
//! ```
//!
//! Tokens are counted in integer units of a billionth of a token, so a refill of
//! `requestsPerSecond` tokens a second adds exactly `requestsPerSecond` units per elapsed
//! nanosecond: no rounding, no drift however long a bucket lives.
//!
//! A per-client limit keys its buckets by the client's mesh identity when the connection
//! carries one (mutual TLS), else by its source address ([`ClientKey`]): every replica of
//! a calling workload shares one bucket once it is identified, and a plain-text client
//! is counted by address.
//!
//! Per-client buckets live in a map of at most [`MAX_CLIENTS`] entries. A new client that
//! finds it full first evicts every full bucket (a full bucket is what a new client gets
//! anyway, so nothing is lost), then, if that frees less than a batch, the least recently
//! used buckets. A flood of distinct addresses therefore costs bounded memory; its price
//! is that an evicted client comes back with a full bucket.

use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroU32,
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use http::HeaderValue;
use weft_api::traffic::{self as wire, RateLimitPer};

/// The largest `burst` accepted (and so the largest `requestsPerSecond`).
pub const MAX_BURST: u32 = 10_000_000;
/// The most clients tracked at once by a per-client limit.
pub const MAX_CLIENTS: usize = 65_536;
/// Buckets freed at least per eviction, so that a flood pays for one scan of the map per
/// this many new clients rather than per new client.
const EVICT_BATCH: usize = MAX_CLIENTS / 16;
/// Units per token: one token is `1e9` units, refilled at `requestsPerSecond` units/ns.
const UNITS_PER_TOKEN: u64 = 1_000_000_000;

/// What a per-client limit counts a request against.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClientKey {
    /// The client's verified mesh identity (SPIFFE ID).
    Identity(std::sync::Arc<str>),
    /// The client's source address (plain text, no identity).
    Addr(IpAddr),
}

impl From<IpAddr> for ClientKey {
    fn from(ip: IpAddr) -> Self {
        ClientKey::Addr(ip)
    }
}

/// A validated rate limit: `1 ≤ requestsPerSecond ≤ burst ≤ 10,000,000`. Compared with
/// `==` so that a config update that leaves it unchanged keeps its buckets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimitSpec {
    name: String,
    requests_per_second: NonZeroU32,
    burst: NonZeroU32,
    per: RateLimitPer,
    dry_run: bool,
}

impl RateLimitSpec {
    /// Validates a rate limit; `field` names it, such as `inbound.rateLimit`.
    pub fn from_wire(w: &wire::RateLimitConfig, field: &str) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let rps = NonZeroU32::new(w.requests_per_second);
        if rps.is_none() {
            problems.push(format!("{field}.requestsPerSecond must be at least 1"));
        }
        if w.burst < w.requests_per_second {
            problems.push(format!(
                "{field}.burst: {} is less than requestsPerSecond {}",
                w.burst, w.requests_per_second
            ));
        }
        if w.burst > MAX_BURST {
            problems.push(format!("{field}.burst: {} exceeds {MAX_BURST}", w.burst));
        }
        match (rps, NonZeroU32::new(w.burst)) {
            (Some(requests_per_second), Some(burst)) if problems.is_empty() => Ok(RateLimitSpec {
                name: w.name.clone(),
                requests_per_second,
                burst,
                per: w.per,
                dry_run: w.dry_run,
            }),
            _ => Err(problems),
        }
    }

    /// The Policy this was compiled from, as `namespace/name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tokens added per second.
    pub fn requests_per_second(&self) -> u32 {
        self.requests_per_second.get()
    }

    /// The bucket's capacity.
    pub fn burst(&self) -> u32 {
        self.burst.get()
    }

    /// One bucket for the workload, or one per client.
    pub fn per(&self) -> RateLimitPer {
        self.per
    }

    /// Whether the limit only reports.
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    fn capacity(&self) -> u64 {
        u64::from(self.burst.get()) * UNITS_PER_TOKEN
    }
}

/// What [`RateLimiter::check`] decided for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateDecision {
    /// A token was taken: let the request through.
    Allow,
    /// The bucket is empty: refuse; a token will be available after `retry_after`.
    Limited {
        /// Time until the bucket holds one token (see [`retry_after_header`]).
        retry_after: Duration,
    },
    /// The bucket is empty but the limit is in dry run: let the request through and
    /// record that it would have been refused. No token is taken, so the limit goes on
    /// to say what an enforcing one would.
    DryRunLimited,
}

/// The inbound rate limit of this proxy's workload.
#[derive(Debug)]
pub struct RateLimiter {
    spec: RateLimitSpec,
    buckets: Buckets,
}

#[derive(Debug)]
enum Buckets {
    /// Created full at the first request.
    Workload(Mutex<Option<Bucket>>),
    Client(Mutex<ClientBuckets>),
}

#[derive(Debug, Default)]
struct ClientBuckets {
    map: HashMap<ClientKey, Bucket>,
    /// Buckets dropped to keep the map bounded, since this limiter was made.
    evictions: u64,
}

/// One token bucket, in units of [`UNITS_PER_TOKEN`] per token.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    level: u64,
    /// When `level` was last brought up to date; also the bucket's last use.
    stamp: Instant,
}

impl RateLimiter {
    /// Validates a rate limit and makes its (empty) set of buckets; `field` names it,
    /// such as `inbound.rateLimit`.
    pub fn from_wire(w: &wire::RateLimitConfig, field: &str) -> Result<RateLimiter, Vec<String>> {
        Ok(RateLimiter::new(RateLimitSpec::from_wire(w, field)?))
    }

    /// A limiter for a validated spec, with no buckets yet.
    pub fn new(spec: RateLimitSpec) -> RateLimiter {
        let buckets = match spec.per {
            RateLimitPer::Workload => Buckets::Workload(Mutex::new(None)),
            RateLimitPer::Client => Buckets::Client(Mutex::new(ClientBuckets::default())),
        };
        RateLimiter { spec, buckets }
    }

    /// What this limiter enforces.
    pub fn spec(&self) -> &RateLimitSpec {
        &self.spec
    }

    /// Whether `w` describes exactly this limit, so that an update may keep its buckets.
    pub fn spec_eq(&self, w: &wire::RateLimitConfig) -> bool {
        let s = &self.spec;
        s.name == w.name
            && s.requests_per_second.get() == w.requests_per_second
            && s.burst.get() == w.burst
            && s.per == w.per
            && s.dry_run == w.dry_run
    }

    /// The Policy this was compiled from, the `policy` metric label.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Takes a token for one request from `client` (ignored by a per-workload limit).
    pub fn check(&self, client: impl Into<ClientKey>, now: Instant) -> RateDecision {
        let taken = match &self.buckets {
            Buckets::Workload(bucket) => lock(bucket)
                .get_or_insert_with(|| Bucket::full(&self.spec, now))
                .take(&self.spec, now),
            Buckets::Client(clients) => {
                let client = client.into();
                let mut clients = lock(clients);
                if clients.map.len() >= MAX_CLIENTS && !clients.map.contains_key(&client) {
                    clients.evict(&self.spec, now);
                }
                clients
                    .map
                    .entry(client)
                    .or_insert_with(|| Bucket::full(&self.spec, now))
                    .take(&self.spec, now)
            }
        };
        match taken {
            Ok(()) => RateDecision::Allow,
            Err(_) if self.spec.dry_run => RateDecision::DryRunLimited,
            Err(retry_after) => RateDecision::Limited { retry_after },
        }
    }

    /// Clients with a bucket now; at most [`MAX_CLIENTS`], 0 for a per-workload limit.
    pub fn tracked_clients(&self) -> usize {
        match &self.buckets {
            Buckets::Workload(_) => 0,
            Buckets::Client(clients) => lock(clients).map.len(),
        }
    }

    /// Client buckets dropped to keep the map bounded, for the evictions metric.
    pub fn evictions(&self) -> u64 {
        match &self.buckets {
            Buckets::Workload(_) => 0,
            Buckets::Client(clients) => lock(clients).evictions,
        }
    }
}

/// The `Retry-After` value for a wait: whole seconds rounded up, at least 1, since the
/// header cannot say less and a client told 0 would retry at once.
pub fn retry_after_header(d: Duration) -> HeaderValue {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Bucket state is a pair of integers updated together; a panic elsewhere while the
    // lock was held leaves nothing half-written.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Bucket {
    fn full(spec: &RateLimitSpec, now: Instant) -> Bucket {
        Bucket {
            level: spec.capacity(),
            stamp: now,
        }
    }

    /// The level at `now`, without changing the bucket. An instant older than the stamp
    /// (callers race to the lock) adds nothing.
    fn level_at(&self, spec: &RateLimitSpec, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.stamp).as_nanos();
        let added = elapsed.saturating_mul(u128::from(spec.requests_per_second.get()));
        let level = u128::from(self.level).saturating_add(added);
        // Capped at the capacity, which is a u64.
        u64::try_from(level.min(u128::from(spec.capacity()))).unwrap_or(u64::MAX)
    }

    /// Takes one token, or says how long until one is there.
    fn take(&mut self, spec: &RateLimitSpec, now: Instant) -> Result<(), Duration> {
        self.level = self.level_at(spec, now);
        self.stamp = self.stamp.max(now);
        if self.level >= UNITS_PER_TOKEN {
            self.level -= UNITS_PER_TOKEN;
            return Ok(());
        }
        let missing = UNITS_PER_TOKEN - self.level;
        Err(Duration::from_nanos(
            missing.div_ceil(u64::from(spec.requests_per_second.get())),
        ))
    }
}

impl ClientBuckets {
    /// Frees room for at least [`EVICT_BATCH`] new clients: full buckets first, then the
    /// least recently used.
    fn evict(&mut self, spec: &RateLimitSpec, now: Instant) {
        let before = self.map.len();
        let capacity = spec.capacity();
        self.map.retain(|_, b| b.level_at(spec, now) < capacity);
        let keep = MAX_CLIENTS - EVICT_BATCH;
        if self.map.len() > keep {
            let mut by_use: Vec<(Instant, ClientKey)> =
                self.map.iter().map(|(k, b)| (b.stamp, k.clone())).collect();
            let excess = by_use.len() - keep;
            by_use.select_nth_unstable(excess - 1);
            for (_, key) in &by_use[..excess] {
                self.map.remove(key);
            }
        }
        self.evictions += (before - self.map.len()) as u64;
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn wire(rps: u32, burst: u32, per: RateLimitPer, dry_run: bool) -> wire::RateLimitConfig {
        wire::RateLimitConfig {
            name: "shop/web".into(),
            requests_per_second: rps,
            burst,
            per,
            dry_run,
        }
    }

    fn limiter(rps: u32, burst: u32, per: RateLimitPer) -> RateLimiter {
        RateLimiter::from_wire(&wire(rps, burst, per, false), "rl").unwrap()
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    fn allowed(limiter: &RateLimiter, client: IpAddr, now: Instant, n: u32) -> u32 {
        (0..n)
            .filter(|_| limiter.check(client, now) == RateDecision::Allow)
            .count() as u32
    }

    #[test]
    fn out_of_range_fields_are_refused_by_field() {
        let problems = |rps, burst| {
            RateLimiter::from_wire(
                &wire(rps, burst, RateLimitPer::Workload, false),
                "inbound.rateLimit",
            )
            .unwrap_err()
        };
        assert_eq!(
            problems(0, 0),
            ["inbound.rateLimit.requestsPerSecond must be at least 1"]
        );
        assert_eq!(
            problems(10, 5),
            ["inbound.rateLimit.burst: 5 is less than requestsPerSecond 10"]
        );
        assert_eq!(
            problems(1, MAX_BURST + 1),
            ["inbound.rateLimit.burst: 10000001 exceeds 10000000"]
        );
        assert!(
            RateLimiter::from_wire(
                &wire(MAX_BURST, MAX_BURST, RateLimitPer::Client, true),
                "rl"
            )
            .is_ok()
        );
    }

    #[test]
    fn an_unchanged_spec_is_recognized_so_buckets_can_be_kept() {
        let w = wire(10, 20, RateLimitPer::Client, false);
        let l = RateLimiter::from_wire(&w, "rl").unwrap();
        assert_eq!(l.name(), "shop/web");
        assert!(l.spec_eq(&w));
        assert_eq!(l.spec(), &RateLimitSpec::from_wire(&w, "rl").unwrap());
        assert!(!l.spec_eq(&wire(10, 21, RateLimitPer::Client, false)));
        assert!(!l.spec_eq(&wire(10, 20, RateLimitPer::Workload, false)));
        assert!(!l.spec_eq(&wire(10, 20, RateLimitPer::Client, true)));
    }

    #[test]
    fn a_burst_is_allowed_then_exactly_the_refill_rate() {
        let l = limiter(10, 20, RateLimitPer::Workload);
        let t0 = Instant::now();
        assert_eq!(allowed(&l, ip(1), t0, 25), 20);
        // One request a millisecond for a minute: exactly 10 a second get through.
        let mut through = 0;
        for ms in 1..=60_000 {
            through += allowed(&l, ip(1), t0 + Duration::from_millis(ms), 1);
        }
        assert_eq!(through, 600);
    }

    #[test]
    fn a_rate_that_does_not_divide_a_second_does_not_drift_over_an_hour() {
        let l = limiter(3, 3, RateLimitPer::Workload);
        let t0 = Instant::now();
        let mut through = 0;
        let mut t = Duration::ZERO;
        while t <= Duration::from_secs(3600) {
            through += allowed(&l, ip(1), t0 + t, 2);
            t += Duration::from_millis(7);
        }
        let last = t - Duration::from_millis(7);
        // The burst, then one token every third of a second, to the nanosecond.
        let earned = (3 * last.as_nanos() / 1_000_000_000) as u32;
        assert_eq!(through, 3 + earned);
    }

    #[test]
    fn a_limited_request_is_told_when_the_next_token_comes() {
        let l = limiter(1, 1, RateLimitPer::Workload);
        let t0 = Instant::now();
        assert_eq!(l.check(ip(1), t0), RateDecision::Allow);
        assert_eq!(
            l.check(ip(1), t0),
            RateDecision::Limited {
                retry_after: Duration::from_secs(1)
            }
        );
        assert_eq!(
            l.check(ip(1), t0 + Duration::from_millis(400)),
            RateDecision::Limited {
                retry_after: Duration::from_millis(600)
            }
        );
        let l = limiter(3, 3, RateLimitPer::Workload);
        allowed(&l, ip(1), t0, 3);
        assert_eq!(
            l.check(ip(1), t0),
            RateDecision::Limited {
                retry_after: Duration::from_nanos(333_333_334)
            }
        );
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
        let header = |d| retry_after_header(d).to_str().unwrap().to_owned();
        assert_eq!(header(Duration::ZERO), "1");
        assert_eq!(header(Duration::from_nanos(333_333_334)), "1");
        assert_eq!(header(Duration::from_secs(1)), "1");
        assert_eq!(header(Duration::from_millis(1200)), "2");
        assert_eq!(header(Duration::from_secs(2)), "2");
    }

    #[test]
    fn per_client_buckets_are_isolated_and_a_workload_bucket_is_shared() {
        let t0 = Instant::now();
        let per_client = limiter(1, 2, RateLimitPer::Client);
        assert_eq!(allowed(&per_client, ip(1), t0, 5), 2);
        assert_eq!(allowed(&per_client, ip(2), t0, 5), 2);
        assert_eq!(per_client.tracked_clients(), 2);

        let workload = limiter(1, 2, RateLimitPer::Workload);
        assert_eq!(allowed(&workload, ip(1), t0, 5), 2);
        assert_eq!(allowed(&workload, ip(2), t0, 5), 0);
        assert_eq!(workload.tracked_clients(), 0);
    }

    #[test]
    fn the_client_map_stays_bounded_under_200000_distinct_clients() {
        let l = limiter(1, 1, RateLimitPer::Client);
        let t0 = Instant::now();
        for n in 0..200_000u32 {
            let now = t0 + Duration::from_micros(u64::from(n));
            assert_eq!(l.check(ip(n), now), RateDecision::Allow);
            assert!(l.tracked_clients() <= MAX_CLIENTS);
        }
        assert_eq!(
            l.evictions(),
            200_000 - l.tracked_clients() as u64,
            "every bucket dropped is counted"
        );
        // The most recent clients kept their (empty) buckets.
        let now = t0 + Duration::from_micros(200_000);
        assert!(matches!(
            l.check(ip(199_999), now),
            RateDecision::Limited { .. }
        ));
    }

    #[test]
    fn full_buckets_are_evicted_before_a_client_that_still_owes_tokens() {
        let l = limiter(1, 10, RateLimitPer::Client);
        let t0 = Instant::now();
        for n in 1..MAX_CLIENTS as u32 {
            l.check(ip(n), t0);
        }
        // Client 0 drains its bucket after all the others have refilled theirs.
        let later = t0 + Duration::from_secs(20);
        assert_eq!(allowed(&l, ip(0), later, 11), 10);
        assert_eq!(l.tracked_clients(), MAX_CLIENTS);

        assert_eq!(l.check(ip(MAX_CLIENTS as u32), later), RateDecision::Allow);
        assert_eq!(l.evictions(), MAX_CLIENTS as u64 - 1);
        assert!(matches!(
            l.check(ip(0), later),
            RateDecision::Limited { .. }
        ));
    }

    #[test]
    fn dry_run_never_limits_but_reports_what_would_be() {
        let l = RateLimiter::from_wire(&wire(1, 1, RateLimitPer::Workload, true), "rl").unwrap();
        let t0 = Instant::now();
        assert_eq!(l.check(ip(1), t0), RateDecision::Allow);
        for _ in 0..100 {
            assert_eq!(l.check(ip(1), t0), RateDecision::DryRunLimited);
        }
        // Reports took no token: the next one is there one second later, as it would be.
        assert_eq!(
            l.check(ip(1), t0 + Duration::from_secs(1)),
            RateDecision::Allow
        );
    }

    #[test]
    fn a_limiter_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RateLimiter>();
    }
}
