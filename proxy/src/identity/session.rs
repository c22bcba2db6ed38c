//! How long an established mutual TLS session may live: until the peer's verified chain
//! stops verifying, by time or by a change of what this proxy trusts.
//!
//! ```text
//! trust watch taken ─▶ handshake (rustls verifies) ─▶ PeerSession::new: deadline = a lower
//!                                    bound (leaf, presented intermediates and bundle roots
//!                                    valid now: parsing, no signature)
//!   session task: select { serve, PeerSession::ended() }
//!                                   ├ lower bound reached ─▶ verify the chain now: ok ─▶
//!                                   │     deadline = earliest notAfter on the path (leaf,
//!                                   │     intermediates, bundle root) + 1 s; keep waiting
//!                                   ├ deadline reached ─────────────▶ peer_certificate_expired
//!                                   ├ outbound: own certificate's end − 2 s ─▶ local_certificate_expired
//!                                   └ trust changed (install of a bundle with other roots)
//!                                        └ re-verify now: ok ─▶ new deadline, keep waiting
//!                                                         err ─▶ untrusted
//! ```
//!
//! Each side judges its peer: the inbound side the client's chain (any mesh identity), the
//! outbound side the server's (the identity the config expects). The outbound side also
//! retires a session shortly before the certificate it presented ends, which is when the
//! inbound side ends it: so its pool has moved to a new session before the peer's GOAWAY,
//! and no request races it. What a session does when
//! [`PeerSession::ended`] answers is its owner's business: HTTP sessions end gracefully
//! within [`crate::shutdown::SESSION_END_GRACE`], opaque TCP is closed.
//!
//! Cost: the chain the peer presented is kept per session (about a kilobyte) to re-verify
//! it; the wait is one timer and one `watch` receiver per session; nothing per request
//! beyond the owner's one atomic load; no signature check at the handshake beyond
//! rustls's own (the path is verified when the lower bound comes, or trust changes).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwapOption;
use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, UnixTime},
};
use tokio::sync::watch;

use super::{Certified, peer_identity, validity};
use crate::metrics::{Direction, TlsMetrics};

/// Why an established session was ended; the `reason` label of
/// `weft_tls_sessions_ended_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// A certificate of the peer's verified chain (leaf, intermediate or the bundle root it
    /// leads to) reached its end.
    PeerCertificateExpired,
    /// A newly installed trust bundle no longer trusts the peer's chain.
    Untrusted,
    /// Outbound only: the certificate this proxy presented in the session is about to end
    /// ([`LOCAL_END_MARGIN`] before the peer ends the session for it), so the session is
    /// retired first and no request races the peer's GOAWAY.
    LocalCertificateExpired,
}

impl EndReason {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            EndReason::PeerCertificateExpired => "peer_certificate_expired",
            EndReason::Untrusted => "untrusted",
            EndReason::LocalCertificateExpired => "local_certificate_expired",
        }
    }
}

/// What a session needs to re-verify its peer: the certificate in use (its trust bundle),
/// the crypto provider and a subscription to changes of the trusted roots.
#[derive(Clone)]
pub(crate) struct TrustWatch {
    pub(crate) current: Arc<ArcSwapOption<Certified>>,
    pub(crate) provider: Arc<CryptoProvider>,
    pub(crate) changes: watch::Receiver<u64>,
    /// The end of this side's certificate when the watch was taken (before the
    /// handshake): the certificate the handshake presented, or a later one.
    pub(crate) own_end: Option<SystemTime>,
}

impl TrustWatch {
    /// This watch, having seen the trust as it is now. Taken before a handshake and given
    /// to [`PeerSession::new`] after it, so that a change of trust in between (which the
    /// handshake's verifier may not have seen) wakes the session to re-verify at once.
    pub(crate) fn seen_now(&self) -> TrustWatch {
        let mut watch = self.clone();
        watch.changes.borrow_and_update();
        watch.own_end = self.current.load().as_ref().map(|c| c.not_after);
        watch
    }
}

/// One established session's peer: its chain, and when that chain stops verifying.
pub struct PeerSession {
    /// The chain the peer presented, leaf first.
    chain: Box<[CertificateDer<'static>]>,
    /// Outbound: the identity the peer must present (and server-auth usage); inbound: none
    /// (any mesh identity, client-auth usage), as the handshake's verifiers judge.
    expected: Option<Arc<str>>,
    /// The peer's SPIFFE ID, for the log line.
    identity: Option<Arc<str>>,
    /// The first time the chain no longer verifies (`exact`), or a time no later than
    /// that: the earliest end among the certificates the chain may pass through.
    deadline: SystemTime,
    /// Whether `deadline` comes from a verification of the chain; until then it is a
    /// lower bound, at which the chain is verified to learn the real one.
    exact: bool,
    /// Outbound: when to retire the session because of this proxy's own certificate (see
    /// [`EndReason::LocalCertificateExpired`]).
    local_end: Option<SystemTime>,
    direction: Direction,
    trust: TrustWatch,
    /// Set when the chain did not verify even at the session's start (a trust change
    /// raced the handshake): [`PeerSession::ended`] answers at once.
    ended: Option<EndReason>,
    /// The store was dropped: no more trust changes, only the deadline.
    store_gone: bool,
}

impl std::fmt::Debug for PeerSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSession")
            .field("identity", &self.identity)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl PeerSession {
    /// The session of a peer that presented `chain` (leaf first) in a handshake that just
    /// verified it; `expected` as for [`PeerSession::expected`]; `trust` taken before that
    /// handshake ([`TrustWatch::seen_now`]). `None` when the peer presented no certificate
    /// (nothing to expire or withdraw).
    ///
    /// The handshake verified the chain, but rustls does not say by which path, so the
    /// deadline starts as a lower bound, the earliest end of the leaf, of the presented
    /// intermediates valid now and of the bundle's roots valid now, and the chain is
    /// verified only when that comes (usually the leaf's own end): a second verification
    /// here would cost each handshake a signature check (about 15 % of its CPU).
    pub(crate) fn new(
        direction: Direction,
        chain: Option<&[CertificateDer<'_>]>,
        expected: Option<Arc<str>>,
        trust: TrustWatch,
    ) -> Option<PeerSession> {
        // The end of the certificate this side presented (outbound: the peer ends the
        // session then). Already within the margin, it is not used: the new session must
        // carry requests until the peer ends it (no renewal came in time).
        // Read before the handshake too: a renewal during it must not move the end of the
        // certificate it presented later.
        let now_own = trust.current.load().as_ref().map(|c| c.not_after);
        let own = match (trust.own_end, now_own) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let local_end = expected
            .as_ref()
            .and(own)
            .map(|end| end + Duration::from_secs(1))
            .and_then(|end| end.checked_sub(LOCAL_END_MARGIN))
            .filter(|end| *end > SystemTime::now());
        let chain: Box<[CertificateDer<'static>]> = chain
            .filter(|c| !c.is_empty())?
            .iter()
            .map(|c| c.clone().into_owned())
            .collect();
        let identity = chain.first().and_then(peer_identity);
        let current = trust.current.load_full();
        let now = UnixTime::now().as_secs();
        let (deadline, ended) = match &current {
            Some(c) => (
                // No end known (nothing parsed): verified at once, which tells.
                time_after(lower_bound(c, &chain, now)).unwrap_or_else(SystemTime::now),
                None,
            ),
            None => (SystemTime::now(), Some(EndReason::Untrusted)),
        };
        let mut session = PeerSession {
            chain,
            expected,
            identity,
            deadline,
            exact: false,
            local_end,
            direction,
            trust,
            ended,
            store_gone: false,
        };
        // Trust changed during the handshake (rare): judged now, before any request.
        if session.ended.is_none() && session.trust.changes.has_changed().unwrap_or(false) {
            session.trust.changes.borrow_and_update();
            match session.verify(UnixTime::now()) {
                Ok(deadline) => {
                    session.deadline = deadline;
                    session.exact = true;
                }
                Err(reason) => session.ended = Some(reason),
            }
        }
        Some(session)
    }

    /// The peer's SPIFFE ID.
    pub fn identity(&self) -> Option<&Arc<str>> {
        self.identity.as_ref()
    }

    /// The first time the peer's chain no longer verifies, or until the chain has been
    /// verified, a time no later than that ([`PeerSession::new`]).
    pub fn deadline(&self) -> SystemTime {
        self.deadline
    }

    /// Why the session ends at [`PeerSession::deadline_instant`] (or has ended).
    pub fn due_reason(&self) -> EndReason {
        self.ended.unwrap_or(self.end().1)
    }

    /// When the session ends and why, if nothing changes: the peer's chain's end, or
    /// earlier the retirement for this side's own certificate.
    fn end(&self) -> (SystemTime, EndReason) {
        match self.local_end {
            Some(local) if local < self.deadline => (local, EndReason::LocalCertificateExpired),
            _ => (self.deadline, EndReason::PeerCertificateExpired),
        }
    }

    /// When to look at the session again, on tokio's clock: its end, or the lower bound
    /// at which its chain is verified.
    fn wake_instant(&self) -> tokio::time::Instant {
        instant_of(self.end().0)
    }

    /// Whether the session had to end before it began (trust changed during its
    /// handshake): its owner must not send on it.
    pub fn has_ended(&self) -> bool {
        self.ended.is_some()
    }

    /// Verifies the chain against the trust of the certificate in use at `now`, by the
    /// handshake's rules; answers the new deadline.
    fn verify(&self, now: UnixTime) -> Result<SystemTime, EndReason> {
        let current = self.trust.current.load_full().ok_or(EndReason::Untrusted)?;
        verify_chain(
            &current,
            &self.trust.provider,
            &self.chain,
            self.expected.as_deref(),
            now,
        )
        .map(|last| time_after(last).unwrap_or_else(no_end))
    }

    /// Waits until the session must end, and says why: the deadline passed, or the
    /// trusted roots changed and the chain no longer verifies (a change it survives may
    /// move the deadline). Cancel-safe: its state lives in `self`.
    pub async fn ended(&mut self) -> EndReason {
        if let Some(reason) = self.ended {
            return reason;
        }
        // Bounded: each turn waits for the deadline or a change of trust.
        loop {
            let at = self.wake_instant();
            tokio::select! {
                () = tokio::time::sleep_until(at) => {
                    // Rechecked by the wall clock, which certificates follow: set back
                    // meanwhile, the chain is still valid and the wait goes on.
                    let (end, reason) = self.end();
                    if SystemTime::now() < end {
                        continue;
                    }
                    if reason == EndReason::PeerCertificateExpired && !self.exact {
                        // The lower bound came: the chain's real end is learnt now. Trust
                        // did not change (that wakes the other branch), so a chain that no
                        // longer verifies does so by a certificate's end.
                        match self.verify(UnixTime::now()) {
                            Ok(deadline) => {
                                self.deadline = deadline;
                                self.exact = true;
                                continue;
                            }
                            Err(_) => {
                                self.ended = Some(reason);
                                return reason;
                            }
                        }
                    }
                    self.ended = Some(reason);
                    return reason;
                }
                changed = self.trust.changes.changed(), if !self.store_gone => {
                    if changed.is_err() {
                        self.store_gone = true;
                        continue;
                    }
                    match self.verify(UnixTime::now()) {
                        Ok(deadline) => {
                            if deadline != self.deadline || !self.exact {
                                self.deadline = deadline;
                                self.exact = true;
                            }
                        }
                        Err(reason) => {
                            self.ended = Some(reason);
                            return reason;
                        }
                    }
                }
            }
        }
    }

    /// Counts the session's end in `metrics` and logs it (INFO, at most
    /// [`LOG_LINES_PER_SECOND`] lines a second across the proxy: a withdrawn root can end
    /// thousands at once).
    pub fn record(&self, reason: EndReason, metrics: Option<&TlsMetrics>) {
        if let Some(m) = metrics {
            m.ended(self.direction, reason);
        }
        if let Some(suppressed) = LOG_LIMIT.admit() {
            tracing::info!(
                direction = self.direction.as_str(),
                peer_identity = self.identity.as_deref().unwrap_or("-"),
                reason = reason.as_str(),
                suppressed,
                "mutual TLS session ended (see reason)"
            );
        } else {
            tracing::debug!(
                direction = self.direction.as_str(),
                peer_identity = self.identity.as_deref().unwrap_or("-"),
                reason = reason.as_str(),
                "mutual TLS session ended"
            );
        }
    }
}

/// Waits for `session` to end; never, when there is none (a plain-text connection, or a
/// peer without a certificate).
pub async fn session_end(session: &mut Option<PeerSession>) -> EndReason {
    match session {
        Some(s) => s.ended().await,
        None => std::future::pending().await,
    }
}

/// How long before this proxy's own certificate ends its outbound sessions are retired
/// ([`EndReason::LocalCertificateExpired`]): room for the clocks of two nodes to differ,
/// so that the peer's GOAWAY at that end finds the session already out of the pool.
pub const LOCAL_END_MARGIN: Duration = Duration::from_secs(2);

/// How many session-end lines are logged at INFO per second; the rest go to DEBUG and
/// the next INFO line says how many were left out.
pub const LOG_LINES_PER_SECOND: u64 = 5;

static LOG_LIMIT: LogLimit = LogLimit {
    second: AtomicU64::new(0),
    count: AtomicU64::new(0),
    suppressed: AtomicU64::new(0),
};

/// A per-second budget of log lines, without a lock.
struct LogLimit {
    second: AtomicU64,
    count: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimit {
    /// `Some(lines left out since the last admitted one)` when a line may be logged now.
    fn admit(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < LOG_LINES_PER_SECOND {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Verifies `chain` (leaf first) against the roots of `certified`'s bundle trusted at
/// `now`, as the handshake's verifiers do: server-auth and exactly `expected` when given
/// (outbound), client-auth and any SPIFFE ID otherwise (inbound). Answers the last second
/// (Unix) at which the chain verifies: the earliest end of the leaf, the intermediates on
/// the verified path, and the bundle root it leads to.
pub(crate) fn verify_chain(
    certified: &Certified,
    provider: &CryptoProvider,
    chain: &[CertificateDer<'_>],
    expected: Option<&str>,
    now: UnixTime,
) -> Result<u64, EndReason> {
    let (leaf, intermediates) = chain.split_first().ok_or(EndReason::Untrusted)?;
    let trusted = certified.trust.at(now).map_err(|_| EndReason::Untrusted)?;
    let end_entity = webpki::EndEntityCert::try_from(leaf).map_err(|_| EndReason::Untrusted)?;
    let usage = if expected.is_some() {
        webpki::KeyUsage::server_auth()
    } else {
        webpki::KeyUsage::client_auth()
    };
    let path = end_entity
        .verify_for_usage(
            provider.signature_verification_algorithms.all,
            &trusted.roots.roots,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| match e {
            webpki::Error::CertExpired { .. } => EndReason::PeerCertificateExpired,
            _ => EndReason::Untrusted,
        })?;
    match (peer_identity(leaf), expected) {
        (None, _) => return Err(EndReason::Untrusted),
        (Some(got), Some(want)) if *got != *want => return Err(EndReason::Untrusted),
        _ => {}
    }
    // The path names the anchor, not which copy of it: of the bundle's copies valid now
    // (one re-issued with a later end), the chain verifies until the last one ends, as
    // the trusted set is rebuilt at each root's end.
    let anchor = path.anchor();
    let secs = now.as_secs();
    let root_end = certified
        .trust
        .roots
        .iter()
        .filter(|r| {
            r.valid_at(secs)
                && r.anchor.subject == anchor.subject
                && r.anchor.subject_public_key_info == anchor.subject_public_key_info
        })
        .map(|r| r.not_after)
        .max();
    let leaf_end = validity(leaf).map(|(_, until)| until);
    let ends = path
        .intermediate_certificates()
        .filter_map(|c| validity(&c.der()).map(|(_, until)| until));
    Ok(earliest_end(leaf_end, ends, root_end))
}

/// The second after `last` (Unix seconds), when a chain verifying until `last` stops;
/// `None` when that is beyond what the clock can hold (no end known).
fn time_after(last: u64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_secs(last.checked_add(1)?))
}

/// The deadline of a chain that verifies but whose end cannot be read (year 2106).
fn no_end() -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(u64::from(u32::MAX)))
        .unwrap_or(UNIX_EPOCH)
}

/// `at` on tokio's clock (now, if it has passed).
fn instant_of(at: SystemTime) -> tokio::time::Instant {
    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::Instant::now() + left
}

/// A time (the last second, Unix) no later than the end of any path by which `chain`
/// (leaf first) verifies against `certified`'s bundle at `now`: the earliest end of the
/// leaf, of each presented certificate valid now (one that is not cannot be on a path
/// verified now) and of each root of the bundle valid now (the trusted set). Parsing
/// only, no signature: what a path is made of is learnt when this time comes.
fn lower_bound(certified: &Certified, chain: &[CertificateDer<'_>], now: u64) -> u64 {
    let mut certs = chain.iter().filter_map(validity);
    let leaf = certs.next().map(|(_, until)| until);
    let intermediates = certs
        .filter(|(from, until)| *from <= now && now <= *until)
        .map(|(_, until)| until);
    let root = certified
        .trust
        .roots
        .iter()
        .filter(|r| r.valid_at(now))
        .map(|r| r.not_after)
        .min();
    earliest_end(leaf, intermediates, root)
}

/// The earliest of the ends given (a certificate that does not parse counts as none:
/// webpki verified it, so it has an end, which its parse failing cannot tell).
fn earliest_end(
    leaf: Option<u64>,
    intermediates: impl Iterator<Item = u64>,
    root: Option<u64>,
) -> u64 {
    leaf.into_iter()
        .chain(intermediates)
        .chain(root)
        .min()
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    // Test code: a failed unwrap is a failed test.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };

    use super::*;
    use crate::identity::IdentityStore;

    const PEER: &str = "spiffe://cluster.local/ns/a/sa/peer";

    struct Ca {
        params: CertificateParams,
        key: KeyPair,
        pem: String,
        der: CertificateDer<'static>,
    }

    fn now_plus(secs: i64) -> time::OffsetDateTime {
        time::OffsetDateTime::now_utc() + time::Duration::seconds(secs)
    }

    fn unix(t: time::OffsetDateTime) -> u64 {
        u64::try_from(t.unix_timestamp()).unwrap()
    }

    fn unix_of(t: SystemTime) -> u64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    /// Times computed from "now" after a certificate was made may be a second later than
    /// those it carries (a second may begin in between).
    fn assert_near(got: u64, want: u64) {
        assert!(got.abs_diff(want) <= 1, "{got} is not {want}");
    }

    impl Ca {
        fn root(name: &str, until: i64) -> Ca {
            Ca::made(name, until, None, IsCa::Ca(BasicConstraints::Unconstrained))
        }

        fn intermediate(&self, name: &str, until: i64) -> Ca {
            Ca::made(
                name,
                until,
                Some(self),
                IsCa::Ca(BasicConstraints::Constrained(0)),
            )
        }

        fn made(name: &str, until: i64, issuer: Option<&Ca>, ca: IsCa) -> Ca {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = ca;
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            params.not_before = now_plus(-60);
            params.not_after = now_plus(until);
            let cert = match issuer {
                Some(i) => params
                    .signed_by(&key, &Issuer::from_params(&i.params, &i.key))
                    .unwrap(),
                None => params.self_signed(&key).unwrap(),
            };
            Ca {
                pem: cert.pem(),
                der: cert.der().clone(),
                params,
                key,
            }
        }

        /// A leaf for `id` valid `until` seconds from now: (PEM, DER, key PEM).
        fn leaf(&self, id: &str, until: i64) -> (String, CertificateDer<'static>, String) {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            params.not_before = now_plus(-60);
            params.not_after = now_plus(until);
            let cert = params
                .signed_by(&key, &Issuer::from_params(&self.params, &self.key))
                .unwrap();
            (cert.pem(), cert.der().clone(), key.serialize_pem())
        }
    }

    /// A store trusting `bundle`, with a certificate of its own from `own`.
    fn store(own: &Ca, bundle: &str) -> Arc<IdentityStore> {
        let store = IdentityStore::new().unwrap();
        let (pem, _, key) = own.leaf("spiffe://cluster.local/ns/a/sa/me", 3600);
        store.install_pem(&pem, &key, bundle).unwrap();
        store
    }

    fn end(store: &IdentityStore, chain: &[CertificateDer<'_>], expected: Option<&str>) -> u64 {
        let c = store.current().unwrap();
        verify_chain(&c, &store.provider, chain, expected, UnixTime::now()).unwrap()
    }

    #[test]
    fn the_chain_ends_with_the_first_of_leaf_intermediate_and_root_to_end() {
        let root = Ca::root("root", 900);
        let issuer = root.intermediate("issuer", 600);
        let s = store(&root, &root.pem);
        // The leaf first.
        let (_, leaf, _) = issuer.leaf(PEER, 300);
        let chain = [leaf, issuer.der.clone()];
        assert_near(end(&s, &chain, Some(PEER)), unix(now_plus(300)));
        assert_near(end(&s, &chain, None), unix(now_plus(300)));
        // The intermediate first.
        let (_, leaf, _) = issuer.leaf(PEER, 3600);
        let chain = [leaf, issuer.der.clone()];
        assert_eq!(end(&s, &chain, Some(PEER)), issuer_end(&issuer));
        // The root first.
        let short = Ca::root("short root", 120);
        let s = store(&short, &short.pem);
        let (_, leaf, _) = short.leaf(PEER, 3600);
        assert_near(end(&s, &[leaf], Some(PEER)), unix(now_plus(120)));
    }

    fn issuer_end(ca: &Ca) -> u64 {
        unix(ca.params.not_after)
    }

    #[test]
    fn an_intermediate_off_the_verified_path_does_not_end_the_chain() {
        let root = Ca::root("root", 3600);
        let issuer = root.intermediate("issuer", 1800);
        // Same name, another key, ending sooner: sent along, but it signed nothing here.
        let stale = root.intermediate("issuer", 60);
        let s = store(&root, &root.pem);
        let (_, leaf, _) = issuer.leaf(PEER, 3000);
        let chain = [leaf, stale.der.clone(), issuer.der.clone()];
        assert_eq!(end(&s, &chain, Some(PEER)), issuer_end(&issuer));
    }

    #[test]
    fn a_chain_is_refused_as_the_handshake_would_refuse_it() {
        let (a, b) = (Ca::root("root A", 3600), Ca::root("root B", 3600));
        let s = store(&a, &a.pem);
        let c = s.current().unwrap();
        let verify = |chain: &[CertificateDer<'_>], expected: Option<&str>| {
            verify_chain(&c, &s.provider, chain, expected, UnixTime::now())
        };
        let (_, from_b, _) = b.leaf(PEER, 3600);
        assert_eq!(verify(&[from_b], None), Err(EndReason::Untrusted));
        let (_, from_a, _) = a.leaf(PEER, 3600);
        assert!(verify(std::slice::from_ref(&from_a), Some(PEER)).is_ok());
        assert_eq!(
            verify(
                std::slice::from_ref(&from_a),
                Some("spiffe://cluster.local/ns/a/sa/other")
            ),
            Err(EndReason::Untrusted),
            "outbound: the expected identity only"
        );
        let later = UnixTime::since_unix_epoch(Duration::from_secs(unix(now_plus(7200))));
        assert_eq!(
            verify_chain(&c, &s.provider, &[from_a], None, later),
            Err(EndReason::PeerCertificateExpired),
            "past the chain's end"
        );
        assert_eq!(verify(&[], None), Err(EndReason::Untrusted));
        let _ = a.der;
    }

    #[tokio::test]
    async fn a_session_ends_when_an_install_withdraws_its_root_and_not_otherwise() {
        let (a, b) = (Ca::root("root A", 3600), Ca::root("root B", 3600));
        let s = store(&a, &format!("{}{}", a.pem, b.pem));
        let (_, from_a, _) = a.leaf(PEER, 3600);
        let (_, from_b, _) = b.leaf(PEER, 3600);
        let mut on_a = s
            .peer_session(Direction::Inbound, Some(&[from_a]), s.trust_watch())
            .unwrap();
        let mut on_b = s
            .peer_session(Direction::Inbound, Some(&[from_b]), s.trust_watch())
            .unwrap();
        assert_near(unix_of(on_a.deadline()), unix(now_plus(3600)) + 1);
        // A renewal with the same bundle: nothing to re-verify.
        let (pem, _, key) = a.leaf("spiffe://cluster.local/ns/a/sa/me", 3600);
        s.install_pem(&pem, &key, &format!("{}{}", a.pem, b.pem))
            .unwrap();
        let quick = Duration::from_millis(100);
        assert!(tokio::time::timeout(quick, on_a.ended()).await.is_err());
        // Step 3 of a rotation: B alone.
        let (pem, _, key) = b.leaf("spiffe://cluster.local/ns/a/sa/me", 3600);
        s.install_pem(&pem, &key, &b.pem).unwrap();
        let ended = tokio::time::timeout(quick, on_a.ended()).await;
        assert_eq!(ended.ok(), Some(EndReason::Untrusted));
        assert!(
            tokio::time::timeout(quick, on_b.ended()).await.is_err(),
            "B's peer stays"
        );
    }

    #[tokio::test]
    async fn a_session_ends_at_its_deadline() {
        let root = Ca::root("root", 3600);
        let s = store(&root, &root.pem);
        let (_, leaf, _) = root.leaf(PEER, 1);
        let mut session = s
            .peer_session(Direction::Outbound, Some(&[leaf]), s.trust_watch())
            .unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(4), session.ended()).await;
        assert_eq!(ended.ok(), Some(EndReason::PeerCertificateExpired));
        assert!(SystemTime::now() >= session.deadline());
    }

    #[test]
    fn outbound_a_session_is_retired_before_this_sides_own_certificate_ends() {
        let root = Ca::root("root", 3600);
        let (_, peer, _) = root.leaf(PEER, 3600);
        let outbound = |own_until: i64| {
            let store = IdentityStore::new().unwrap();
            let (pem, _, key) = root.leaf("spiffe://cluster.local/ns/a/sa/me", own_until);
            store.install_pem(&pem, &key, &root.pem).unwrap();
            let expected = Some(Arc::from(PEER));
            let trust = store.trust_watch();
            PeerSession::new(
                Direction::Outbound,
                Some(std::slice::from_ref(&peer)),
                expected,
                trust,
            )
            .unwrap()
        };
        let s = outbound(600);
        let (at, reason) = s.end();
        assert_eq!(reason, EndReason::LocalCertificateExpired);
        let own_end = unix(now_plus(600)) + 1;
        assert_near(unix_of(at + LOCAL_END_MARGIN), own_end);
        // Within the margin already: the peer ends the session, not this side.
        assert_eq!(outbound(1).end().1, EndReason::PeerCertificateExpired);
        // Inbound sessions are judged by the peer's chain only.
        let store = store(&root, &root.pem);
        let s = store
            .peer_session(Direction::Inbound, Some(&[peer]), store.trust_watch())
            .unwrap();
        assert_eq!(s.end().1, EndReason::PeerCertificateExpired);
    }

    #[tokio::test]
    async fn a_root_ending_before_the_leaf_that_the_chain_does_not_pass_through_ends_nothing() {
        // A, ending in 2 s, is still in the bundle beside B, by which the peer's chain
        // verifies: the session's first deadline is A's end, where its chain is verified
        // and its real end (the leaf's) learnt.
        let (a, b) = (Ca::root("root A", 2), Ca::root("root B", 3600));
        let s = store(&b, &format!("{}{}", a.pem, b.pem));
        let (_, from_b, _) = b.leaf(PEER, 600);
        let leaf_end = UNIX_EPOCH + Duration::from_secs(unix(now_plus(600)) + 1);
        let mut session = s
            .peer_session(Direction::Inbound, Some(&[from_b]), s.trust_watch())
            .unwrap();
        assert!(session.deadline() <= UNIX_EPOCH + Duration::from_secs(unix(now_plus(2)) + 1));
        assert!(!session.exact, "not verified yet");
        let waited = tokio::time::timeout(Duration::from_secs(5), session.ended()).await;
        assert!(waited.is_err(), "ended at A's end: {waited:?}");
        let error = session
            .deadline()
            .duration_since(leaf_end)
            .unwrap_or_else(|e| e.duration());
        assert!(
            error <= Duration::from_secs(1),
            "the leaf's end, once verified: {:?}",
            session.deadline()
        );
        assert!(session.exact, "verified");
    }

    #[tokio::test]
    async fn a_trust_change_during_the_handshake_wakes_the_session_at_once() {
        let (a, b) = (Ca::root("root A", 3600), Ca::root("root B", 3600));
        let s = store(&a, &a.pem);
        let (_, from_a, _) = a.leaf(PEER, 3600);
        // Taken before the handshake; B alone installed before the session starts.
        let before = s.trust_watch();
        let (pem, _, key) = b.leaf("spiffe://cluster.local/ns/a/sa/me", 3600);
        s.install_pem(&pem, &key, &b.pem).unwrap();
        let mut session = s
            .peer_session(Direction::Inbound, Some(&[from_a]), before)
            .unwrap();
        let ended = tokio::time::timeout(Duration::from_millis(500), session.ended()).await;
        assert_eq!(ended.ok(), Some(EndReason::Untrusted));
    }

    #[test]
    fn earliest_end_takes_the_minimum_of_what_is_known() {
        assert_eq!(earliest_end(Some(5), [7, 3].into_iter(), Some(9)), 3);
        assert_eq!(earliest_end(Some(5), std::iter::empty(), None), 5);
        assert_eq!(earliest_end(None, std::iter::empty(), Some(2)), 2);
        assert_eq!(earliest_end(None, std::iter::empty(), None), u64::MAX);
    }

    #[test]
    fn at_most_a_few_lines_a_second_are_logged() {
        let limit = LogLimit {
            second: AtomicU64::new(0),
            count: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        };
        let admitted = (0..100).filter(|_| limit.admit().is_some()).count() as u64;
        // Two seconds may have begun meanwhile.
        assert!(
            (LOG_LINES_PER_SECOND..=2 * LOG_LINES_PER_SECOND).contains(&admitted),
            "{admitted}"
        );
    }
}
