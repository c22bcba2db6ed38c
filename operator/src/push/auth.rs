//! Who is subscribing: the pod's projected ServiceAccount token, checked with the API
//! server's TokenReview, must belong to the ServiceAccount the pod runs as (and, for tokens
//! bound to a pod, to that very pod).
//!
//! The push port takes connections from anyone who can reach it, so it must not turn
//! requests into TokenReviews without limit:
//!
//! ```text
//! token ─▶ accepted cache (1 min, never past the token's exp) ─hit─▶ identity
//!    └──▶ refusal cache (hash of the token, 10 s) ─hit─▶ 401, no TokenReview
//!    └──▶ one review per token at a time (others wait for its verdict)
//!           └──▶ per-source token bucket ─empty─▶ 429
//!           └──▶ in-flight TokenReviews (semaphore) ─full for 1 s─▶ 503
//!           └──▶ TokenReview ─▶ verdict cached (accepted or refused)
//! ```
//!
//! An accepted token is remembered until its own `exp` if that comes first: a token the
//! API server accepted moments before its expiry must be asked about again once expired
//! (the API server still allows its minute of leeway; the cache adds none).
//!
//! Every refusal is counted by reason (`weft_operator_push_refusals_total`), every
//! TokenReview by result (`weft_operator_token_reviews_total`).

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use http::StatusCode;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};
use tokio::sync::{OnceCell, Semaphore};

use crate::{metrics::Metrics, rate::KeyedBuckets};

/// The `extra` key in which the API server names the pod a token is bound to.
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

/// Rate-limit buckets kept at most (one per source address); idle ones go first.
const SOURCES_MAX: usize = 65_536;

/// How the push port bounds the TokenReviews its callers can cause. The defaults are the
/// operator's (`docs/operator.md` lists the flags that change them).
#[derive(Clone, Debug, PartialEq)]
pub struct AuthLimits {
    /// How long an accepted token's identity is reused, at most: never past the token's
    /// own `exp`.
    pub accepted_ttl: Duration,
    /// How long a refused token is refused without asking the API server again.
    pub refused_ttl: Duration,
    /// Entries per cache at most (accepted and refused each); expired entries are dropped
    /// first, and the cache is cleared if that is not enough.
    pub cache_max: usize,
    /// TokenReviews one source address may cause per second, sustained.
    pub source_rate: f64,
    /// TokenReviews one source address may cause in a burst.
    pub source_burst: u32,
    /// TokenReviews in flight at once, over all sources.
    pub max_in_flight: usize,
    /// How long a subscription waits for an in-flight slot before it is refused (503).
    pub in_flight_wait: Duration,
    /// How long one TokenReview may take before the subscription is refused (503).
    pub review_timeout: Duration,
}

impl Default for AuthLimits {
    fn default() -> Self {
        AuthLimits {
            accepted_ttl: Duration::from_secs(60),
            refused_ttl: Duration::from_secs(10),
            cache_max: 100_000,
            // A proxy reviews once per reconnect and reconnects with backoff; 20 proxies
            // behind one address (a node's SNAT) restarting together fit in the burst.
            source_rate: 5.0,
            source_burst: 20,
            max_in_flight: 32,
            in_flight_wait: Duration::from_secs(1),
            review_timeout: Duration::from_secs(10),
        }
    }
}

/// The identity a token proves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenIdentity {
    /// The ServiceAccount's namespace.
    pub namespace: String,
    /// The ServiceAccount's name.
    pub service_account: String,
    /// The pod the token is bound to, for projected tokens.
    pub pod: Option<String>,
}

/// Why a subscription was refused.
#[derive(Clone, Debug, thiserror::Error)]
pub enum AuthError {
    /// No bearer token.
    #[error("no bearer token in the authorization header")]
    NoToken,
    /// The API server did not authenticate the token.
    #[error("token not authenticated: {0}")]
    Rejected(String),
    /// The token is valid but not a ServiceAccount's, or not for the audience asked for.
    #[error("token not accepted: {0}")]
    NotForUs(String),
    /// The API server refused this token moments ago; it is not asked again yet.
    #[error("token not authenticated (cached verdict): {0}")]
    CachedRejection(String),
    /// The source address caused too many TokenReviews.
    #[error("too many authentication attempts from this address; retry later")]
    RateLimited,
    /// Too many TokenReviews are in flight.
    #[error("too many authentications in progress; retry later")]
    Busy,
    /// The TokenReview call failed.
    #[error("TokenReview failed")]
    Review(#[source] Arc<kube::Error>),
    /// The TokenReview call took too long.
    #[error("TokenReview timed out")]
    ReviewTimeout,
}

impl AuthError {
    /// The label of `weft_operator_push_refusals_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::NoToken => "no_token",
            AuthError::Rejected(_) | AuthError::NotForUs(_) => "token_rejected",
            AuthError::CachedRejection(_) => "token_rejected_cached",
            AuthError::RateLimited => "rate_limited",
            AuthError::Busy => "reviews_busy",
            AuthError::Review(_) | AuthError::ReviewTimeout => "review_failed",
        }
    }

    /// The HTTP status the subscriber gets: 401 for a bad token, 429 and 503 for refusals
    /// the proxy should retry later.
    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::NoToken
            | AuthError::Rejected(_)
            | AuthError::NotForUs(_)
            | AuthError::CachedRejection(_) => StatusCode::UNAUTHORIZED,
            AuthError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            AuthError::Busy | AuthError::Review(_) | AuthError::ReviewTimeout => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }
}

/// Checks subscriber tokens.
pub enum Authenticator {
    /// TokenReview against the API server, bounded as the module says.
    TokenReview(Box<TokenReviewer>),
    /// Trusts the pod header without a token. Only for in-process benchmarks and tests:
    /// it exists only with the `insecure-test-auth` feature, which release builds of the
    /// operator do not enable (`.ci/run` checks the binary).
    #[cfg(any(test, feature = "insecure-test-auth"))]
    InsecureTrustPodHeader,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Authenticator::TokenReview(r) => f
                .debug_struct("TokenReview")
                .field("audiences", &r.audiences)
                .field("limits", &r.limits)
                .finish(),
            #[cfg(any(test, feature = "insecure-test-auth"))]
            Authenticator::InsecureTrustPodHeader => f.write_str("InsecureTrustPodHeader"),
        }
    }
}

impl Authenticator {
    /// TokenReview with `audiences` and the default [`AuthLimits`].
    pub fn token_review(client: Client, audiences: Vec<String>) -> Self {
        Self::token_review_with(client, audiences, AuthLimits::default())
    }

    /// TokenReview with `audiences` and `limits`.
    pub fn token_review_with(client: Client, audiences: Vec<String>, limits: AuthLimits) -> Self {
        Authenticator::TokenReview(Box::new(TokenReviewer::new(client, audiences, limits)))
    }

    /// The identity `token` proves, or `None` when this authenticator trusts headers.
    /// `source` is the subscriber's address, for the per-source rate limit.
    pub async fn authenticate(
        &self,
        token: Option<&str>,
        source: IpAddr,
        metrics: &Metrics,
    ) -> Result<Option<TokenIdentity>, AuthError> {
        match self {
            Authenticator::TokenReview(r) => r.authenticate(token, source, metrics).await.map(Some),
            #[cfg(any(test, feature = "insecure-test-auth"))]
            Authenticator::InsecureTrustPodHeader => {
                // `.ci/run` looks for this text in the release binary: it must not be there.
                tracing::trace!("insecure-test-auth: trusting the pod header without a token");
                Ok(None)
            }
        }
    }
}

type Verdict = Result<TokenIdentity, AuthError>;

/// The TokenReview authenticator and its caches and limits.
pub struct TokenReviewer {
    client: Client,
    audiences: Vec<String>,
    limits: AuthLimits,
    /// Accepted tokens, by the token itself (a hash collision here would let one token
    /// pass for another), each with the instant it stops being answered from here
    /// ([`accepted_until`]).
    accepted: Mutex<HashMap<String, (TokenIdentity, Instant)>>,
    /// Refused tokens, by a keyed hash of the token (no token kept in memory for
    /// attackers' garbage; a collision only delays a genuine token by `refused_ttl`),
    /// each with the instant it stops being answered from here.
    refused: Mutex<HashMap<u64, (AuthError, Instant)>>,
    /// The key of that hash, random per process.
    hasher: RandomState,
    /// Reviews in progress, by the token itself: concurrent subscriptions with one token
    /// wait for one verdict.
    in_progress: InProgress,
    /// TokenReviews left per source address (see [`bucket_key`]).
    sources: KeyedBuckets<IpAddr>,
    in_flight: Semaphore,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

type InProgress = Mutex<HashMap<String, Arc<OnceCell<Verdict>>>>;

/// One caller waiting for the verdict on a token in [`TokenReviewer::in_progress`]. The
/// entry goes when the verdict is in or the last waiter goes, however it goes: a caller
/// dropped mid-review (its HTTP/2 stream reset, its connection closed) must not leave its
/// token in the map for ever.
struct Waiter<'a> {
    in_progress: &'a InProgress,
    token: &'a str,
    /// `None` only while dropping. Every clone of the map's `Arc` is made and dropped
    /// with the map locked, so its strong count, read under the lock, counts the waiters.
    cell: Option<Arc<OnceCell<Verdict>>>,
}

impl<'a> Waiter<'a> {
    /// Joins the review of `token` in `in_progress`, starting its entry if there is none.
    fn join(in_progress: &'a InProgress, token: &'a str) -> Self {
        let cell = lock(in_progress)
            .entry(token.to_owned())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        Waiter {
            in_progress,
            token,
            cell: Some(cell),
        }
    }

    fn cell(&self) -> &OnceCell<Verdict> {
        // Set from `join` until `drop`.
        self.cell.as_deref().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut in_progress = lock(self.in_progress);
        let Some(cell) = self.cell.take() else {
            return;
        };
        // The map's reference and this one: no one else is waiting. Or the verdict is
        // in: later callers find it in the caches, or review again.
        if in_progress
            .get(self.token)
            .is_some_and(|c| Arc::ptr_eq(c, &cell))
            && (cell.initialized() || Arc::strong_count(&cell) == 2)
        {
            in_progress.remove(self.token);
        }
        // Dropped with the map locked (see `cell`).
        drop(cell);
    }
}

/// Makes room in a cache that reached `max`: entries whose deadline is not after `now`
/// go, then everything.
fn make_room<K, V>(map: &mut HashMap<K, (V, Instant)>, max: usize, now: Instant) {
    if map.len() < max {
        return;
    }
    map.retain(|_, (_, until)| now < *until);
    if map.len() >= max {
        map.clear();
    }
}

/// The `exp` claim of the JWT `token`, its signature unchecked: read only from tokens the
/// API server has just accepted, whose claims are therefore authentic. `None` when there
/// is no readable `exp` (legacy secret-based tokens carry none).
fn token_expiry(token: &str) -> Option<SystemTime> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let json = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
    // A NumericDate, which RFC 7519 allows to be fractional.
    let exp = claims.as_object()?.get("exp")?.as_f64()?;
    UNIX_EPOCH.checked_add(Duration::try_from_secs_f64(exp).ok()?)
}

/// Until when a token accepted at `now` (`wall` on the wall clock) is answered from the
/// cache: `ttl` at most, and never past its `exp`. `None`, not cached, when it has already
/// expired: the API server accepts a token until a minute past its `exp`, and each such
/// use is asked about again.
fn accepted_until(
    now: Instant,
    wall: SystemTime,
    ttl: Duration,
    exp: Option<SystemTime>,
) -> Option<Instant> {
    let left = match exp {
        None => ttl,
        // An `exp` at or before `wall` leaves nothing (an error for one before it).
        Some(exp) => exp.duration_since(wall).ok()?.min(ttl),
    };
    if left.is_zero() {
        return None;
    }
    now.checked_add(left)
}

impl TokenReviewer {
    /// A reviewer asking for `audiences`, within `limits`.
    pub fn new(client: Client, audiences: Vec<String>, limits: AuthLimits) -> Self {
        TokenReviewer {
            sources: KeyedBuckets::new(limits.source_rate, limits.source_burst, SOURCES_MAX),
            client,
            audiences,
            in_flight: Semaphore::new(limits.max_in_flight.max(1)),
            limits,
            accepted: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            hasher: RandomState::new(),
            in_progress: Mutex::new(HashMap::new()),
        }
    }

    /// The identity `token` proves; `source` is the caller's address, for the per-source
    /// limit. TokenReviews are counted in `metrics`.
    pub async fn authenticate(
        &self,
        token: Option<&str>,
        source: IpAddr,
        metrics: &Metrics,
    ) -> Verdict {
        let token = token.ok_or(AuthError::NoToken)?;
        if let Some((id, until)) = lock(&self.accepted).get(token)
            && Instant::now() < *until
        {
            return Ok(id.clone());
        }
        let key = self.hasher.hash_one(token);
        if let Some((error, until)) = lock(&self.refused).get(&key)
            && Instant::now() < *until
        {
            return Err(match error {
                // Still the same kind of refusal, for callers that tell them apart.
                AuthError::NotForUs(r) => AuthError::NotForUs(r.clone()),
                AuthError::Rejected(r) | AuthError::CachedRejection(r) => {
                    AuthError::CachedRejection(r.clone())
                }
                other => AuthError::CachedRejection(other.to_string()),
            });
        }
        // Keyed by the token itself, not its hash: waiters take the reviewer's identity,
        // which must never be another token's. (It is held only while the review runs.)
        let waiter = Waiter::join(&self.in_progress, token);
        waiter
            .cell()
            .get_or_init(|| self.review(token, key, source, metrics))
            .await
            .clone()
    }

    /// Asks the API server, within the limits, and caches the verdict.
    async fn review(&self, token: &str, key: u64, source: IpAddr, metrics: &Metrics) -> Verdict {
        if !self.take_source_token(source) {
            return Err(AuthError::RateLimited);
        }
        let Ok(Ok(_permit)) =
            tokio::time::timeout(self.limits.in_flight_wait, self.in_flight.acquire()).await
        else {
            return Err(AuthError::Busy);
        };
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(self.audiences.clone()),
            },
            ..Default::default()
        };
        let call = Api::<TokenReview>::all(self.client.clone());
        let out = match tokio::time::timeout(
            self.limits.review_timeout,
            call.create(&PostParams::default(), &review),
        )
        .await
        {
            Ok(Ok(out)) => out,
            Ok(Err(error)) => {
                metrics.token_review("error");
                return Err(AuthError::Review(Arc::new(error)));
            }
            Err(_) => {
                metrics.token_review("error");
                return Err(AuthError::ReviewTimeout);
            }
        };
        let verdict = identity(out);
        metrics.token_review(if verdict.is_ok() {
            "authenticated"
        } else {
            "rejected"
        });
        match &verdict {
            Ok(id) => self.remember_accepted(token, id),
            Err(error) => {
                let now = Instant::now();
                if let Some(until) = now.checked_add(self.limits.refused_ttl) {
                    let mut refused = lock(&self.refused);
                    make_room(&mut refused, self.limits.cache_max, now);
                    refused.insert(key, (error.clone(), until));
                }
            }
        }
        verdict
    }

    /// Caches `id`, which the API server has just accepted `token` for, until
    /// [`accepted_until`].
    fn remember_accepted(&self, token: &str, id: &TokenIdentity) {
        let now = Instant::now();
        let until = accepted_until(
            now,
            SystemTime::now(),
            self.limits.accepted_ttl,
            token_expiry(token),
        );
        let mut accepted = lock(&self.accepted);
        match until {
            Some(until) => {
                make_room(&mut accepted, self.limits.cache_max, now);
                accepted.insert(token.to_owned(), (id.clone(), until));
            }
            // An entry from before its expiry is dead weight now.
            None => {
                accepted.remove(token);
            }
        }
    }

    /// Takes one token from `source`'s bucket; false when it is empty.
    fn take_source_token(&self, source: IpAddr) -> bool {
        self.sources.take(bucket_key(source))
    }
}

/// The address whose bucket a source draws from: an IPv6 host usually has a whole /64
/// to pick addresses from, so it gets one bucket for it; IPv4-mapped addresses count as
/// the IPv4 address.
fn bucket_key(source: IpAddr) -> IpAddr {
    match source {
        IpAddr::V4(_) => source,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from_bits(
                v6.to_bits() & !u128::from(u64::MAX),
            )),
        },
    }
}

/// The identity a TokenReview's answer proves, or why it proves none.
fn identity(out: TokenReview) -> Verdict {
    let status = out.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        let error = status.error.unwrap_or_else(|| "not authenticated".into());
        // The API server authenticates a token for another audience no differently from
        // garbage, and says so only in this message ("token audiences [...] is invalid for
        // the target audiences [...]"); it only changes the reason reported.
        return Err(if error.contains("is invalid for the target audiences") {
            AuthError::NotForUs(error)
        } else {
            AuthError::Rejected(error)
        });
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let Some(rest) = username.strip_prefix("system:serviceaccount:") else {
        return Err(AuthError::NotForUs(format!(
            "{username} is not a ServiceAccount"
        )));
    };
    let Some((namespace, sa)) = rest.split_once(':') else {
        return Err(AuthError::Rejected(format!("malformed user {username}")));
    };
    Ok(TokenIdentity {
        namespace: namespace.to_owned(),
        service_account: sa.to_owned(),
        pod: user
            .extra
            .as_ref()
            .and_then(|e| e.get(POD_NAME_EXTRA))
            .and_then(|v| v.first().cloned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reviewer(limits: AuthLimits) -> TokenReviewer {
        // Never called: these tests stop before any TokenReview.
        let config = kube::Config::new("https://127.0.0.1:9".parse().unwrap());
        TokenReviewer::new(Client::try_from(config).unwrap(), vec![], limits)
    }

    #[tokio::test]
    async fn each_source_gets_its_burst_then_its_rate() {
        let r = reviewer(AuthLimits {
            source_rate: 1000.0,
            source_burst: 3,
            ..AuthLimits::default()
        });
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let taken = (0..10).filter(|_| r.take_source_token(a)).count();
        // The burst, plus what 1000/s refills during the loop (well under a token).
        assert!((3..=4).contains(&taken), "{taken}");
        assert!(r.take_source_token(b), "another source has its own bucket");
        std::thread::sleep(Duration::from_millis(5));
        assert!(r.take_source_token(a), "the bucket refills at the rate");
    }

    #[tokio::test]
    async fn callers_that_give_up_during_a_review_leave_no_token_behind() {
        // An API server address that takes connections and never answers: every review
        // hangs until its caller gives up. (This checks the map of reviews in progress,
        // not Kubernetes.)
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let config = kube::Config::new(url.parse().unwrap());
        let r = TokenReviewer::new(
            Client::try_from(config).unwrap(),
            vec![],
            AuthLimits {
                source_rate: 1e6,
                source_burst: 1_000_000,
                max_in_flight: 1000,
                ..AuthLimits::default()
            },
        );
        let metrics = Metrics::new();
        let source: IpAddr = "192.0.2.1".parse().unwrap();
        let give_up = Duration::from_millis(50);
        // Distinct tokens, each dropped mid-review (as a reset HTTP/2 stream drops it).
        let tokens: Vec<String> = (0..200).map(|i| format!("token-{i}")).collect();
        let asks = tokens
            .iter()
            .map(|t| tokio::time::timeout(give_up, r.authenticate(Some(t), source, &metrics)));
        for answer in futures::future::join_all(asks).await {
            assert!(answer.is_err(), "the review never answers: {answer:?}");
        }
        assert_eq!(lock(&r.in_progress).len(), 0, "entries left behind");

        // Two waiters on one token: the first gives up, the second still waits on the
        // same review, whose entry stays until the second goes too.
        let mut second = Box::pin(r.authenticate(Some("shared"), source, &metrics));
        let first = tokio::time::timeout(give_up, r.authenticate(Some("shared"), source, &metrics));
        let (first, second_waits) =
            tokio::join!(first, tokio::time::timeout(give_up * 2, second.as_mut()));
        assert!(first.is_err() && second_waits.is_err());
        assert_eq!(lock(&r.in_progress).len(), 1, "the second still waits");
        drop(second);
        assert_eq!(lock(&r.in_progress).len(), 0, "the last waiter is gone");
    }

    #[test]
    fn an_ipv6_slash_64_is_one_source_and_mapped_ipv4_is_ipv4() {
        let key = |s: &str| bucket_key(s.parse().unwrap());
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
    }

    #[tokio::test]
    async fn a_refused_token_is_refused_from_the_cache_without_a_review() {
        let r = reviewer(AuthLimits::default());
        let metrics = Metrics::new();
        let key = r.hasher.hash_one("bad");
        let until = Instant::now() + Duration::from_secs(10);
        lock(&r.refused).insert(key, (AuthError::Rejected("expired".into()), until));
        let source: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..100 {
            let e = r
                .authenticate(Some("bad"), source, &metrics)
                .await
                .unwrap_err();
            assert!(
                matches!(e, AuthError::CachedRejection(ref m) if m == "expired"),
                "{e}"
            );
            assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
        }
        assert!(
            !metrics.encode().contains("token_reviews_total{"),
            "no TokenReview was attempted"
        );
        // Keyed by hash: the token itself is not kept.
        assert!(lock(&r.refused).keys().all(|k| *k == key));
    }

    #[test]
    fn a_full_cache_drops_expired_entries_first() {
        let now = Instant::now();
        let (past, later) = (now - Duration::from_secs(1), now + Duration::from_secs(10));
        let mut map: HashMap<u64, ((), Instant)> = (0..4)
            .map(|i| (i, ((), if i < 2 { past } else { later })))
            .collect();
        make_room(&mut map, 4, now);
        assert_eq!(map.len(), 2);
        make_room(&mut map, 2, now);
        assert!(map.is_empty(), "nothing expired: cleared");
    }

    /// A JWT with `claims` (the header and signature do not matter to the cache).
    fn jwt(claims: serde_json::Value) -> String {
        let claims = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        format!("eyJhbGciOiJFUzI1NiJ9.{claims}.c2ln")
    }

    /// Seconds since the epoch, `offset` from now.
    fn unix(offset: f64) -> f64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
            + offset
    }

    #[test]
    fn the_expiry_is_read_from_the_claims_and_none_without_a_readable_one() {
        let at = |secs: u64| Some(UNIX_EPOCH + Duration::from_secs(secs));
        let exp = |claims| token_expiry(&jwt(claims));
        assert_eq!(
            exp(serde_json::json!({"exp": 1_700_000_000})),
            at(1_700_000_000)
        );
        assert_eq!(
            exp(serde_json::json!({"exp": 1.5})),
            Some(UNIX_EPOCH + Duration::from_millis(1500))
        );
        // A legacy secret-based token: no `exp`.
        assert_eq!(
            exp(serde_json::json!({"sub": "system:serviceaccount:a:b"})),
            None
        );
        for unreadable in [
            serde_json::json!({"exp": "1700000000"}),
            serde_json::json!({"exp": -1}),
            serde_json::json!({"exp": 1e300}),
            serde_json::json!([1]),
        ] {
            assert_eq!(exp(unreadable.clone()), None, "{unreadable}");
        }
        for not_a_jwt in [
            "",
            "opaque",
            "a.b",
            "a.!!!.c",
            "a.e30.c.d",
            "a.bm90IGpzb24.c",
        ] {
            assert_eq!(token_expiry(not_a_jwt), None, "{not_a_jwt}");
        }
    }

    #[test]
    fn an_accepted_token_is_cached_for_the_ttl_or_until_its_exp_whichever_is_sooner() {
        let (now, wall, ttl) = (Instant::now(), SystemTime::now(), Duration::from_secs(60));
        let s = Duration::from_secs;
        let until = |exp: Option<SystemTime>| accepted_until(now, wall, ttl, exp);
        assert_eq!(until(Some(wall + s(4))), Some(now + s(4)), "exp first");
        assert_eq!(until(Some(wall + s(600))), Some(now + ttl), "the ttl first");
        assert_eq!(until(None), Some(now + ttl), "no exp: the ttl");
        assert_eq!(until(Some(wall)), None, "expired this instant: not cached");
        assert_eq!(until(Some(wall - s(30))), None, "expired: not cached");
    }

    #[tokio::test]
    async fn an_accepted_token_is_answered_from_the_cache_until_its_exp_and_then_reviewed() {
        // Every review fails: nothing listens on the discard port.
        let r = reviewer(AuthLimits::default());
        let metrics = Metrics::new();
        let source: IpAddr = "127.0.0.1".parse().unwrap();
        let id = TokenIdentity {
            namespace: "shop".into(),
            service_account: "web".into(),
            pod: Some("web-1".into()),
        };
        let lasting = jwt(serde_json::json!({"exp": unix(600.0)}));
        let legacy = jwt(serde_json::json!({"sub": "system:serviceaccount:shop:web"}));
        let expiring = jwt(serde_json::json!({"exp": unix(0.3)}));
        let expired = jwt(serde_json::json!({"exp": unix(-10.0)}));
        for token in [&lasting, &legacy, &expiring, &expired] {
            r.remember_accepted(token, &id);
        }
        let answer = |token: &str| {
            let token = token.to_owned();
            let (r, metrics) = (&r, &metrics);
            async move { r.authenticate(Some(&token), source, metrics).await }
        };
        // Accepted (by the API server, in its minute of leeway) after its exp: asked again.
        let e = answer(&expired).await.unwrap_err();
        assert!(matches!(e, AuthError::Review(_)), "{e}");
        for token in [&lasting, &legacy, &expiring] {
            assert_eq!(answer(token).await.unwrap(), id, "from the cache");
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        let e = answer(&expiring).await.unwrap_err();
        assert!(
            matches!(e, AuthError::Review(_)),
            "past its exp: asked again, {e}"
        );
        for token in [&lasting, &legacy] {
            assert_eq!(answer(token).await.unwrap(), id, "still from the cache");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_token_is_read_without_panic(token in ".{0,200}") {
            let _ = token_expiry(&token);
        }

        #[test]
        fn any_whole_second_exp_is_read_back(secs in 0u64..=u64::from(u32::MAX) * 4) {
            let token = jwt(serde_json::json!({"exp": secs, "aud": ["weft"]}));
            proptest::prop_assert_eq!(
                token_expiry(&token),
                Some(UNIX_EPOCH + Duration::from_secs(secs))
            );
        }
    }
}
