//! How long an established mutual TLS session may live: until the peer's verified chain
//! stops verifying, by time or by a change of what this proxy trusts.
//!
//! ```text
//! trust watch taken ─▶ handshake (rustls verifies) ─▶ PeerSession::new: parse the chain once
//!   one path by names (leaf ▸ presented issuer ▸ … ▸ one bundle root):   Peer::Path
//!       keeps the root's key and the path's end: deadline = earliest end (leaf,
//!       intermediates, root) + 1 s, exact
//!   several (a rotation's two roots of one name, an old intermediate sent along): Peer::Chain
//!       keeps the chain: deadline = a lower bound (leaf, presented certificates and
//!       bundle roots valid now), the chain verified when it comes
//!   session task: select { serve, PeerSession::ended() }
//!        ├ deadline reached ─▶ judged again: later end (a root re-issued) ─▶ keep waiting
//!        │                                   none ─▶ peer_certificate_expired
//!        ├ outbound: own certificate's end − 2 s ─▶ local_certificate_expired
//!        └ trust changed (install of a bundle with other roots) ─▶ judged again:
//!             Path: its root still trusted ─▶ keep waiting; Chain: verified ─▶ ok / untrusted
//! ```
//!
//! A chain verified by rustls passes through certificates whose names link it: each
//! certificate's issuer is the subject of the next, up to a root of the bundle. Where
//! only one such path exists among the certificates presented and the roots trusted, it is
//! the path rustls verified, and the session needs of the chain only that path's end and
//! its root's key (32 bytes): while a root with that key stays trusted, the chain still
//! verifies. Where several exist (rustls does not say which one it took), the chain is kept
//! and verified again when that matters, as a second verification at the handshake would
//! cost it a signature check (about 15 % of its CPU).
//!
//! Each side judges its peer: the inbound side the client's chain (any mesh identity), the
//! outbound side the server's (the identity the config expects). The outbound side also
//! retires a session shortly before the certificate it presented ends, which is when the
//! inbound side ends it: so its pool has moved to a new session before the peer's GOAWAY,
//! and no request races it. What a session does when
//! [`PeerSession::ended`] answers is its owner's business: HTTP sessions end gracefully
//! within [`crate::shutdown::SESSION_END_GRACE`], opaque TCP is closed.
//!
//! Cost: each presented certificate parsed once at the handshake; per session a root's key
//! (or, with several paths, the chain: about a kilobyte), one timer and one `watch`
//! receiver; nothing per request beyond the owner's one atomic load.

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
    pki_types::{CertificateDer, TrustAnchor, UnixTime},
};
use tokio::sync::watch;
use x509_parser::certificate::X509Certificate;

use super::{BundleRoot, Certified, dates, peer_identity, spiffe_id_of, validity};
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

/// What a session's owner is told by [`PeerSession::next`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// Outbound only: a new session would present newer certificates (this proxy's
    /// renewed one, or the peer's, which it renews by now): new requests should open one,
    /// while those on this session go on until it ends.
    Retire,
    /// The session ends, and why.
    End(EndReason),
}

/// How often an outbound session due for retirement by this proxy's renewal time looks
/// again until the renewed certificate is installed: a retirement before that would open
/// the new session with the same certificate.
pub const OWN_RETIRE_RECHECK: Duration = Duration::from_secs(10);

/// What makes two copies of a root one trust anchor for webpki (its subject, key and name
/// constraints), as a SHA-256 digest: what a session keeps of the root its peer's chain
/// leads to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct RootKey([u8; 32]);

impl RootKey {
    /// The key of `anchor`.
    pub(crate) fn of(anchor: &TrustAnchor<'_>) -> RootKey {
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        // Each part with its length, so that no two different anchors hash the same bytes.
        for part in [
            anchor.subject.as_ref(),
            anchor.subject_public_key_info.as_ref(),
            anchor.name_constraints.as_deref().unwrap_or_default(),
        ] {
            digest.update(&(part.len() as u64).to_be_bytes());
            digest.update(part);
        }
        let mut key = [0; 32];
        key.copy_from_slice(digest.finish().as_ref());
        RootKey(key)
    }
}

/// What a session needs to re-verify its peer: the certificate in use (its trust bundle),
/// the crypto provider and a subscription to changes of the trusted roots.
#[derive(Clone)]
pub(crate) struct TrustWatch {
    pub(crate) current: Arc<ArcSwapOption<Certified>>,
    pub(crate) provider: Arc<CryptoProvider>,
    pub(crate) changes: watch::Receiver<u64>,
    /// The certificate in use when the watch was taken (before the handshake): the one
    /// the handshake presented and judged its peer by, unless an install came between.
    /// Let go once the session has started.
    pub(crate) seen: Option<Arc<Certified>>,
}

impl TrustWatch {
    /// This watch, having seen the trust as it is now. Taken before a handshake and given
    /// to [`PeerSession::new`] after it, so that a change of trust in between (which the
    /// handshake's verifier may not have seen) wakes the session to re-verify at once.
    pub(crate) fn seen_now(&self) -> TrustWatch {
        let mut watch = self.clone();
        watch.changes.borrow_and_update();
        watch.seen = self.current.load_full();
        watch
    }
}

/// What a session keeps of its peer's chain to judge it again.
enum Peer {
    /// The only path the chain can take by names: its end without the root (last second,
    /// Unix), and the root it leads to.
    Path { last: u64, root: RootKey },
    /// Several paths were possible: the chain (leaf first), verified when the deadline (a
    /// lower bound until `exact`) comes or trust changes.
    Chain {
        chain: Box<[CertificateDer<'static>]>,
        /// Outbound: the identity the peer must present (and server-auth usage); inbound:
        /// none (any mesh identity, client-auth usage), as the handshake's verifiers judge.
        expected: Option<Arc<str>>,
        /// Whether the deadline comes from a verification of the chain.
        exact: bool,
    },
}

/// One established session's peer: what is kept of its chain, and when that chain stops
/// verifying.
pub struct PeerSession {
    peer: Peer,
    /// The peer's SPIFFE ID, for the log line.
    identity: Option<Arc<str>>,
    /// The first time the chain no longer verifies, or (a [`Peer::Chain`] not verified
    /// yet) a time no later than that.
    deadline: SystemTime,
    /// Outbound: when to retire the session because of this proxy's own certificate (see
    /// [`EndReason::LocalCertificateExpired`]).
    local_end: Option<SystemTime>,
    /// Outbound: when the peer has renewed the certificate it presented (the end of
    /// [`super::RENEW_FRACTION`] of its life, and a little more), at which the session is
    /// retired ([`SessionEvent::Retire`]); none once retired, or past at the start.
    peer_retire: Option<SystemTime>,
    /// Outbound: when to retire the session for this proxy's own renewal, once a renewed
    /// certificate is installed (looked at again every [`OWN_RETIRE_RECHECK`] until then).
    own_retire: Option<SystemTime>,
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
    /// verified it; `expected` as for [`Peer::Chain`]; `trust` taken before that
    /// handshake ([`TrustWatch::seen_now`]). `None` when the peer presented no certificate
    /// (nothing to expire or withdraw).
    pub(crate) fn new(
        direction: Direction,
        chain: Option<&[CertificateDer<'_>]>,
        expected: Option<Arc<str>>,
        mut trust: TrustWatch,
    ) -> Option<PeerSession> {
        let seen = trust.seen.take();
        let current = trust.current.load_full();
        // Whether an install came between the watch and now: then the handshake may have
        // judged the peer by other roots than `current`'s, so the path by names (found
        // against `current`) says nothing of it; the chain is kept and verified now.
        let installed_since = match (&seen, &current) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            (a, b) => a.is_some() != b.is_some(),
        };
        // The end of the certificate this side presented (outbound: the peer ends the
        // session then). Already within the margin, it is not used: the new session must
        // carry requests until the peer ends it (no renewal came in time).
        // Read before the handshake too: a renewal during it must not move the end of the
        // certificate it presented later.
        let own = match (&seen, &current) {
            (Some(a), Some(b)) => Some(a.not_after.min(b.not_after)),
            (a, b) => a.as_ref().or(b.as_ref()).map(|c| c.not_after),
        };
        let local_end = expected
            .as_ref()
            .and(own)
            .map(|end| end + Duration::from_secs(1))
            .and_then(|end| end.checked_sub(LOCAL_END_MARGIN))
            .filter(|end| *end > SystemTime::now());
        let chain = chain.filter(|c| !c.is_empty())?;
        let parsed: Vec<Option<X509Certificate<'_>>> = chain
            .iter()
            .map(|c| x509_parser::parse_x509_certificate(c).ok().map(|(_, x)| x))
            .collect();
        let leaf = parsed.first()?.as_ref();
        let identity = leaf.and_then(spiffe_id_of);
        let now = UnixTime::now().as_secs();
        // Retired when a new session would present newer certificates: so that requests
        // made after a renewal do not ride a session that ends with the old certificate
        // (a long stream started on it would be cut then).
        let (peer_retire, own_retire) = if expected.is_some() {
            let future = |t: SystemTime| (t > SystemTime::now()).then_some(t);
            let peer = leaf
                .map(dates)
                .and_then(|(from, until)| peer_renewed_by(from, until))
                .and_then(future);
            // Renewed during the handshake: the session presented the old certificate,
            // and is retired at once (the first look finds the renewal installed).
            let own = if installed_since && own != current.as_ref().map(|c| c.not_after) {
                Some(SystemTime::now())
            } else {
                current.as_ref().map(|c| c.renew_at()).and_then(future)
            };
            (peer, own)
        } else {
            (None, None)
        };
        let path = current
            .as_ref()
            .filter(|_| !installed_since)
            .and_then(|c| only_path(&parsed, &c.trust.roots, now));
        let (peer, deadline, ended) = match (&current, path) {
            (None, _) => (
                Peer::Path {
                    last: 0,
                    root: RootKey([0; 32]),
                },
                SystemTime::now(),
                Some(EndReason::Untrusted),
            ),
            (Some(c), Some((last, root))) => {
                let peer = Peer::Path { last, root };
                match judge_path(c, last, root, now) {
                    Ok(deadline) => (peer, deadline, None),
                    Err(reason) => (peer, SystemTime::now(), Some(reason)),
                }
            }
            (Some(c), None) => {
                let bound = lower_bound(c, &parsed, now);
                let chain: Box<[CertificateDer<'static>]> =
                    chain.iter().map(|c| c.clone().into_owned()).collect();
                (
                    Peer::Chain {
                        chain,
                        expected,
                        exact: false,
                    },
                    // No end known (nothing parsed): verified at once, which tells.
                    time_after(bound).unwrap_or_else(SystemTime::now),
                    None,
                )
            }
        };
        drop(parsed);
        let mut session = PeerSession {
            peer,
            identity,
            deadline,
            local_end,
            peer_retire,
            own_retire,
            direction,
            trust,
            ended,
            store_gone: false,
        };
        // Trust changed, or a certificate was installed, during the handshake (rare):
        // judged now, before any request.
        let changed = session.trust.changes.has_changed().unwrap_or(false);
        if session.ended.is_none() && (changed || installed_since) {
            session.trust.changes.borrow_and_update();
            session.judge_now();
        }
        Some(session)
    }

    /// The peer's SPIFFE ID.
    pub fn identity(&self) -> Option<&Arc<str>> {
        self.identity.as_ref()
    }

    /// The first time the peer's chain no longer verifies, or until a chain kept whole has
    /// been verified, a time no later than that ([`PeerSession::new`]).
    pub fn deadline(&self) -> SystemTime {
        self.deadline
    }

    /// Why the session ends at [`PeerSession::deadline`] (or has ended).
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
    /// at which a kept chain is verified.
    fn wake_instant(&self) -> tokio::time::Instant {
        let at = [self.peer_retire, self.own_retire]
            .into_iter()
            .flatten()
            .fold(self.end().0, SystemTime::min);
        instant_of(at)
    }

    /// When a retirement is due and the session has not ended yet: whether to retire now
    /// (for this proxy's own renewal, only once the renewed certificate is installed;
    /// until then the time moves on by [`OWN_RETIRE_RECHECK`]).
    fn retire_now(&mut self, now: SystemTime) -> bool {
        if self.peer_retire.is_some_and(|t| t <= now) {
            self.peer_retire = None;
            self.own_retire = None;
            return true;
        }
        if self.own_retire.is_none_or(|t| t > now) {
            return false;
        }
        // The certificate this side presented ends at `local_end` + margin − 1 s; a
        // renewed one ends later.
        let presented = self
            .local_end
            .map(|l| l + LOCAL_END_MARGIN - Duration::from_secs(1));
        let renewed = match (self.trust.current.load().as_ref(), presented) {
            (Some(c), Some(presented)) => c.not_after > presented,
            _ => false,
        };
        if renewed {
            self.peer_retire = None;
            self.own_retire = None;
        } else {
            self.own_retire = Some(now + OWN_RETIRE_RECHECK).filter(|_| presented.is_some());
        }
        renewed
    }

    /// Whether the session had to end before it began (trust changed during its
    /// handshake): its owner must not send on it.
    pub fn has_ended(&self) -> bool {
        self.ended.is_some()
    }

    /// Judges the peer's chain again against the trust of the certificate in use, now:
    /// sets the new deadline, or why the session ends.
    fn judge_now(&mut self) {
        let Some(current) = self.trust.current.load_full() else {
            self.ended = Some(EndReason::Untrusted);
            return;
        };
        let now = UnixTime::now();
        let judged = match &mut self.peer {
            Peer::Path { last, root } => judge_path(&current, *last, *root, now.as_secs()),
            Peer::Chain {
                chain,
                expected,
                exact,
            } => {
                let judged = verify_chain(
                    &current,
                    &self.trust.provider,
                    chain,
                    expected.as_deref(),
                    now,
                )
                .map(|last| time_after(last).unwrap_or_else(no_end));
                *exact = judged.is_ok();
                judged
            }
        };
        match judged {
            Ok(deadline) => self.deadline = deadline,
            Err(reason) => self.ended = Some(reason),
        }
    }

    /// Waits until the session must end, and says why: the deadline passed, or the
    /// trusted roots changed and the chain no longer verifies (a change it survives may
    /// move the deadline). A retirement ([`SessionEvent::Retire`]) is passed over: for
    /// owners whose work cannot move to another session. Cancel-safe: its state lives in
    /// `self`.
    pub async fn ended(&mut self) -> EndReason {
        // Bounded: a session is retired at most once.
        loop {
            if let SessionEvent::End(reason) = self.next().await {
                return reason;
            }
        }
    }

    /// Waits for what the session's owner must act on next: its retirement (outbound, at
    /// most once, before its end) or its end, as [`PeerSession::ended`] says.
    /// Cancel-safe: its state lives in `self`.
    pub async fn next(&mut self) -> SessionEvent {
        // Bounded: each turn waits for the deadline, a retirement's time or a change of
        // trust, and ends the session unless judging it again moves the deadline later.
        loop {
            if let Some(reason) = self.ended {
                return SessionEvent::End(reason);
            }
            let at = self.wake_instant();
            tokio::select! {
                () = tokio::time::sleep_until(at) => {
                    // Rechecked by the wall clock, which certificates follow: set back
                    // meanwhile, the chain is still valid and the wait goes on.
                    let now = SystemTime::now();
                    let (end, reason) = self.end();
                    if now < end {
                        if self.retire_now(now) {
                            return SessionEvent::Retire;
                        }
                        continue;
                    }
                    if reason == EndReason::LocalCertificateExpired {
                        self.ended = Some(reason);
                        continue;
                    }
                    // The deadline came: a root re-issued meanwhile with a later end, or
                    // (a kept chain) the lower bound's own end being off the path, may
                    // carry the chain on; a chain that no longer verifies does so by a
                    // certificate's end (a change of trust wakes the other branch).
                    let before = self.deadline;
                    self.judge_now();
                    if self.ended.is_some() || self.deadline <= before {
                        self.ended = Some(EndReason::PeerCertificateExpired);
                    }
                }
                changed = self.trust.changes.changed(), if !self.store_gone => {
                    if changed.is_err() {
                        self.store_gone = true;
                        continue;
                    }
                    self.judge_now();
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

/// [`PeerSession::next`] of `session`; never, when there is none.
pub async fn session_event(session: &mut Option<PeerSession>) -> SessionEvent {
    match session {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// When a peer whose certificate is valid from `from` to `until` (Unix seconds) has
/// renewed it: at the end of [`super::RENEW_FRACTION`] of the life it counts from its
/// install (which comes after `from`: issuers backdate it, the operator by 5 minutes),
/// and a twentieth of the life later (at most a minute) for the renewal to arrive.
fn peer_renewed_by(from: u64, until: u64) -> Option<SystemTime> {
    let life = Duration::from_secs(until.checked_sub(from)?);
    let backdated = (life / 20).min(BACKDATE_ALLOWANCE);
    let renewed = backdated + (life - backdated).mul_f64(*super::RENEW_FRACTION.end());
    let slack = (life / 20).min(Duration::from_secs(60));
    UNIX_EPOCH.checked_add(Duration::from_secs(from) + renewed + slack)
}

/// How far before its install a peer's certificate may start: the operator backdates
/// `notBefore` by 5 minutes for clocks that differ.
const BACKDATE_ALLOWANCE: Duration = Duration::from_secs(300);

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
    let root_end = latest_copy_end(
        &certified.trust.roots,
        RootKey::of(path.anchor()),
        now.as_secs(),
    );
    let leaf_end = validity(leaf).map(|(_, until)| until);
    let ends = path
        .intermediate_certificates()
        .filter_map(|c| validity(&c.der()).map(|(_, until)| until));
    Ok(earliest_end(leaf_end, ends, root_end))
}

/// The end (last second, Unix) of the latest-ending copy of the root `key` among `roots`
/// valid at `now`; none when no copy is.
fn latest_copy_end(roots: &[BundleRoot], key: RootKey, now: u64) -> Option<u64> {
    roots
        .iter()
        .filter(|r| r.key == key && r.valid_at(now))
        .map(|r| r.not_after)
        .max()
}

/// The only path by names from `chain`'s leaf (parsed, leaf first; `None` where a
/// certificate does not parse) through its other certificates valid at `now` to a root of
/// `roots` valid then, if there is exactly one: the earliest end (last second, Unix) of the
/// leaf and the intermediates on it, and the root's key. rustls verified some such path,
/// so when only one exists it is that one. `None` when at some step several certificates
/// or roots (copies of one root count once) could be next, or none could.
fn only_path(
    chain: &[Option<X509Certificate<'_>>],
    roots: &[BundleRoot],
    now: u64,
) -> Option<(u64, RootKey)> {
    let (leaf, presented) = chain.split_first()?;
    let leaf = leaf.as_ref()?;
    // One that does not parse could be next at any step.
    if presented.iter().any(Option::is_none) {
        return None;
    }
    let valid_now = |c: &X509Certificate<'_>| {
        let (from, until) = dates(c);
        from <= now && now <= until
    };
    let mut last = dates(leaf).1;
    let mut issuer = leaf.issuer().as_raw();
    // Each step but the last takes a presented certificate: more steps than there are
    // certificates is a loop.
    for _ in 0..=presented.len() {
        let mut next_roots = roots
            .iter()
            .filter(|r| r.valid_at(now) && *r.subject == *issuer);
        let root = next_roots.next().map(|r| r.key);
        if root.is_some_and(|key| next_roots.any(|r| r.key != key)) {
            return None;
        }
        let mut next_certs = presented
            .iter()
            .flatten()
            .filter(|c| c.subject().as_raw() == issuer && valid_now(c));
        let cert = next_certs.next();
        if next_certs.next().is_some() {
            return None;
        }
        match (root, cert) {
            (Some(key), None) => return Some((last, key)),
            (None, Some(c)) => {
                last = last.min(dates(c).1);
                issuer = c.issuer().as_raw();
            }
            _ => return None,
        }
    }
    None
}

/// When a chain whose only path ([`only_path`]) ends at `last` without its root and leads
/// to `root` stops verifying against `certified`'s bundle, judged at `now`: the second
/// after the earlier of `last` and the end of the root's latest copy valid now. Why it
/// already has: no copy of the root trusted now (untrusted; or expired, when the bundle
/// still holds one), or `last` past.
fn judge_path(
    certified: &Certified,
    last: u64,
    root: RootKey,
    now: u64,
) -> Result<SystemTime, EndReason> {
    let roots = &certified.trust.roots;
    let Some(root_end) = latest_copy_end(roots, root, now) else {
        return Err(if roots.iter().any(|r| r.key == root) {
            EndReason::PeerCertificateExpired
        } else {
            EndReason::Untrusted
        });
    };
    if last < now {
        return Err(EndReason::PeerCertificateExpired);
    }
    Ok(time_after(last.min(root_end)).unwrap_or_else(no_end))
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
/// (parsed, leaf first) verifies against `certified`'s bundle at `now`: the earliest end of
/// the leaf, of each presented certificate valid now (one that is not cannot be on a path
/// verified now) and of each root of the bundle valid now (the trusted set). Parsing
/// only, no signature: what a path is made of is learnt when this time comes.
fn lower_bound(certified: &Certified, chain: &[Option<X509Certificate<'_>>], now: u64) -> u64 {
    let mut certs = chain.iter().map(|c| c.as_ref().map(dates));
    let leaf = certs.next().flatten().map(|(_, until)| until);
    let intermediates = certs
        .flatten()
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
            let (der, key, pem) = leaf_between(self, id, -60, until);
            (pem, der, key)
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

    fn kept_chain(session: &PeerSession) -> Option<bool> {
        match &session.peer {
            Peer::Path { .. } => None,
            Peer::Chain { exact, .. } => Some(*exact),
        }
    }

    fn near_time(got: SystemTime, want_unix: u64) {
        assert_near(unix_of(got), want_unix);
    }

    #[test]
    fn with_one_path_by_names_a_session_keeps_its_roots_key_and_ends_with_the_path() {
        let root = Ca::root("root", 900);
        let issuer = root.intermediate("issuer", 600);
        let s = store(&root, &root.pem);
        let session = |chain: &[CertificateDer<'_>]| {
            s.peer_session(Direction::Inbound, Some(chain), s.trust_watch())
                .unwrap()
        };
        // The leaf ends first.
        let (_, leaf, _) = issuer.leaf(PEER, 300);
        let one = session(&[leaf, issuer.der.clone()]);
        assert_eq!(kept_chain(&one), None, "one path: the chain is not kept");
        near_time(one.deadline(), unix(now_plus(300)) + 1);
        // The intermediate ends first.
        let (_, leaf, _) = issuer.leaf(PEER, 3600);
        let one = session(&[leaf.clone(), issuer.der.clone()]);
        assert_eq!(kept_chain(&one), None);
        assert_eq!(unix_of(one.deadline()), issuer_end(&issuer) + 1);
        // Sent along with its root: the root is a second way up, so the chain is kept.
        let with_root = session(&[leaf, issuer.der.clone(), root.der.clone()]);
        assert_eq!(kept_chain(&with_root), Some(false));
        // The root ends first.
        let short = Ca::root("short root", 120);
        let s = store(&short, &short.pem);
        let (_, leaf, _) = short.leaf(PEER, 3600);
        let one = s
            .peer_session(Direction::Inbound, Some(&[leaf]), s.trust_watch())
            .unwrap();
        assert_eq!(kept_chain(&one), None);
        near_time(one.deadline(), unix(now_plus(120)) + 1);
    }

    #[tokio::test]
    async fn an_old_intermediate_of_the_same_name_sent_along_keeps_the_chain_and_ends_nothing() {
        let root = Ca::root("root", 3600);
        let issuer = root.intermediate("issuer", 1800);
        // Same name, another key, ending in 2 s: sent along, but it signed nothing here.
        let stale = root.intermediate("issuer", 2);
        let s = store(&root, &root.pem);
        let (_, leaf, _) = issuer.leaf(PEER, 3000);
        let chain = [leaf, stale.der.clone(), issuer.der.clone()];
        let mut session = s
            .peer_session(Direction::Inbound, Some(&chain), s.trust_watch())
            .unwrap();
        assert_eq!(
            kept_chain(&session),
            Some(false),
            "two paths: the chain is kept"
        );
        assert!(
            unix_of(session.deadline()) <= issuer_end(&stale) + 1,
            "the lower bound"
        );
        let waited = tokio::time::timeout(Duration::from_secs(5), session.ended()).await;
        assert!(
            waited.is_err(),
            "ended at the old intermediate's end: {waited:?}"
        );
        assert_eq!(unix_of(session.deadline()), issuer_end(&issuer) + 1);
        assert_eq!(kept_chain(&session), Some(true), "verified");
    }

    #[tokio::test]
    async fn a_root_ending_before_the_leaf_that_the_chain_does_not_pass_through_ends_nothing() {
        // During a rotation the bundle holds two roots of one name; the old one, ending
        // in 2 s, is not the one the peer's chain verifies by. Two paths by names: the
        // session's first deadline is the old root's end, where its chain is verified and
        // its real end (the leaf's) learnt.
        let (old, new) = (Ca::root("root", 2), Ca::root("root", 3600));
        let s = store(&new, &format!("{}{}", old.pem, new.pem));
        let (_, from_new, _) = new.leaf(PEER, 600);
        let leaf_end = unix(now_plus(600)) + 1;
        let mut session = s
            .peer_session(Direction::Inbound, Some(&[from_new]), s.trust_watch())
            .unwrap();
        assert!(unix_of(session.deadline()) <= unix(now_plus(2)) + 1);
        assert_eq!(kept_chain(&session), Some(false), "not verified yet");
        let waited = tokio::time::timeout(Duration::from_secs(5), session.ended()).await;
        assert!(waited.is_err(), "ended at the old root's end: {waited:?}");
        near_time(session.deadline(), leaf_end);
        assert_eq!(kept_chain(&session), Some(true), "verified");
        // Roots of different names: one path, its end known at once.
        let (a, b) = (Ca::root("root A", 2), Ca::root("root B", 3600));
        let s = store(&b, &format!("{}{}", a.pem, b.pem));
        let (_, from_b, _) = b.leaf(PEER, 600);
        let session = s
            .peer_session(Direction::Inbound, Some(&[from_b]), s.trust_watch())
            .unwrap();
        assert_eq!(kept_chain(&session), None);
        near_time(session.deadline(), unix(now_plus(600)) + 1);
    }

    #[tokio::test]
    async fn a_copy_of_the_root_with_a_later_end_carries_a_session_past_the_first_copys_end() {
        let key = KeyPair::generate().unwrap();
        let copy = |until: i64| {
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, "root");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            params.not_before = now_plus(-60);
            params.not_after = now_plus(until);
            let cert = params.self_signed(&key).unwrap();
            Ca {
                pem: cert.pem(),
                der: cert.der().clone(),
                params,
                key: KeyPair::from_pem(&key.serialize_pem()).unwrap(),
            }
        };
        let (first, later) = (copy(2), copy(3600));
        let s = store(&first, &first.pem);
        let (_, leaf, _) = first.leaf(PEER, 600);
        let leaf_end = unix(now_plus(600)) + 1;
        let mut session = s
            .peer_session(Direction::Inbound, Some(&[leaf]), s.trust_watch())
            .unwrap();
        assert_eq!(kept_chain(&session), None);
        near_time(session.deadline(), unix(now_plus(2)) + 1);
        // The re-issued copy arrives with a renewal: the same anchor, a later end.
        let (pem, _, own_key) = later.leaf("spiffe://cluster.local/ns/a/sa/me", 3600);
        s.install_pem(&pem, &own_key, &format!("{}{}", first.pem, later.pem))
            .unwrap();
        let waited = tokio::time::timeout(Duration::from_secs(5), session.ended()).await;
        assert!(waited.is_err(), "ended at the first copy's end: {waited:?}");
        near_time(session.deadline(), leaf_end);
    }

    /// A leaf for `id` valid from `from` to `until` seconds from now (DER, key PEM, PEM).
    fn leaf_between(
        ca: &Ca,
        id: &str,
        from: i64,
        until: i64,
    ) -> (CertificateDer<'static>, String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = now_plus(from);
        params.not_after = now_plus(until);
        let cert = params
            .signed_by(&key, &Issuer::from_params(&ca.params, &ca.key))
            .unwrap();
        (cert.der().clone(), key.serialize_pem(), cert.pem())
    }

    fn outbound(store: &IdentityStore, peer: &CertificateDer<'_>) -> PeerSession {
        PeerSession::new(
            Direction::Outbound,
            Some(std::slice::from_ref(peer)),
            Some(Arc::from(PEER)),
            store.trust_watch(),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn outbound_a_session_is_retired_once_the_peer_has_renewed_and_ends_with_its_chain() {
        let root = Ca::root("root", 3600);
        let s = store(&root, &root.pem);
        // Ten seconds of life, six gone: renewed by about 7.6 s (and 0.5 s of slack), so
        // retired in about 2 s, and ended at its end, in about 4.
        let (peer, _, _) = leaf_between(&root, PEER, -6, 4);
        let mut session = outbound(&s, &peer);
        let retire = session.peer_retire.expect("a retirement ahead");
        near_time(retire, unix(now_plus(2)));
        let started = tokio::time::Instant::now();
        let event = tokio::time::timeout(Duration::from_secs(4), session.next()).await;
        assert_eq!(event.ok(), Some(SessionEvent::Retire));
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "not before its time"
        );
        let event = tokio::time::timeout(Duration::from_secs(5), session.next()).await;
        assert_eq!(
            event.ok(),
            Some(SessionEvent::End(EndReason::PeerCertificateExpired)),
            "retired once, then ended"
        );
        // Inbound sessions are never retired; nor one whose peer was past renewing at
        // its start (its new session would bring the same certificate).
        let (late, _, _) = leaf_between(&root, PEER, -9, 1);
        assert_eq!(outbound(&s, &late).peer_retire, None);
        let inbound = s
            .peer_session(Direction::Inbound, Some(&[peer]), s.trust_watch())
            .unwrap();
        assert_eq!((inbound.peer_retire, inbound.own_retire), (None, None));
    }

    #[tokio::test]
    async fn outbound_a_session_is_retired_for_this_proxys_renewal_only_once_it_is_installed() {
        let root = Ca::root("root", 3600);
        let (_, peer, _) = root.leaf(PEER, 3600);
        let own = |until: i64| {
            let store = IdentityStore::new().unwrap();
            let (_, key, pem) = leaf_between(&root, "spiffe://cluster.local/ns/a/sa/me", 0, until);
            store.install_pem(&pem, &key, &root.pem).unwrap();
            store
        };
        // Renewal due at 65–75 % of 8 s; the renewed certificate is installed at once.
        let s = own(8);
        let mut session = outbound(&s, &peer);
        let due = session.own_retire.expect("retirement at renewal");
        let renew_at = s.current().unwrap().renew_at();
        assert_eq!(due, renew_at);
        let (_, key, pem) = leaf_between(&root, "spiffe://cluster.local/ns/a/sa/me", 0, 3600);
        s.install_pem(&pem, &key, &root.pem).unwrap();
        let event = tokio::time::timeout(Duration::from_secs(7), session.next()).await;
        assert_eq!(event.ok(), Some(SessionEvent::Retire));
        assert!(SystemTime::now() >= renew_at);
        // No renewal installed: not retired at the renewal time (a new session would
        // present the same certificate), but ended before the certificate's end.
        let s = own(4);
        let mut session = outbound(&s, &peer);
        assert!(session.own_retire.is_some());
        let event = tokio::time::timeout(Duration::from_secs(6), session.next()).await;
        assert_eq!(
            event.ok(),
            Some(SessionEvent::End(EndReason::LocalCertificateExpired))
        );
    }

    /// A session whose peer chains to the root the store trusted before the handshake,
    /// while an install of another root (`other_name`, or the same name) came during it.
    async fn judged_after_an_install_during_the_handshake(other_name: &str) -> PeerSession {
        let (old, new) = (Ca::root("root", 3600), Ca::root(other_name, 3600));
        let s = store(&old, &old.pem);
        let (_, from_old, _) = old.leaf(PEER, 3600);
        // Taken before the handshake; the new root alone installed before the session
        // starts.
        let before = s.trust_watch();
        let (pem, _, key) = new.leaf("spiffe://cluster.local/ns/a/sa/me", 3600);
        s.install_pem(&pem, &key, &new.pem).unwrap();
        s.peer_session(Direction::Inbound, Some(&[from_old]), before)
            .unwrap()
    }

    #[tokio::test]
    async fn a_trust_change_during_the_handshake_wakes_the_session_at_once() {
        let mut session = judged_after_an_install_during_the_handshake("other root").await;
        let ended = tokio::time::timeout(Duration::from_millis(500), session.ended()).await;
        assert_eq!(ended.ok(), Some(EndReason::Untrusted));
    }

    #[tokio::test]
    async fn an_install_during_the_handshake_of_a_root_of_the_same_name_ends_the_session() {
        // The operator's roots all share one name: found after the install, the path by
        // names would lead to the new root, which the handshake did not use.
        let mut session = judged_after_an_install_during_the_handshake("root").await;
        assert!(kept_chain(&session).is_some(), "not judged by names");
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
