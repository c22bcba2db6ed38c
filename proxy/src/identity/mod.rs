//! The proxy's mesh identity and mutual TLS between proxies.
//!
//! ```text
//!  operator ──certify──▶ client (renews at 65–75 %) ──install──▶ IdentityStore (ArcSwap<Certified>)
//!                                                                │ read per handshake
//!        outbound: ClientTls (one per meshed endpoint) ◀────────┤ cert resolver, trust bundle
//!        inbound:  server_config() (one per proxy)     ◀────────┘ cert resolver, client verifier
//! ```
//!
//! A renewal swaps a new [`Certified`] in: handshakes from then on use it, connections
//! already established keep going until their peer's chain stops verifying, by time or
//! because the new bundle no longer trusts it ([`session`]). Peers are verified against the trust bundle of the
//! certificate in use, and by their SPIFFE ID (the certificate's one URI SAN): outbound,
//! exactly the identity the config says the endpoint has ([`ClientTls`]); inbound, any
//! mesh identity, which authorization then reads.
//!
//! TLS 1.3 only, ring provider, no session resumption (every connection presents and
//! verifies a certificate, so a rotated trust bundle applies to the next connection).
//! ALPN says what travels inside the session ([`ALPN_MUX`], [`ALPN_HTTP1`], [`ALPN_H2`],
//! [`ALPN_TCP`]); see `docs/protocol.md` and [`crate::mux`].
//!
//! The trust bundle of each certificate answer replaces the proxy's trust roots
//! everywhere: peers in both directions, and the operator itself (identity endpoint and
//! config stream, [`IdentityStore::operator_verifier`]); the roots the proxy was started
//! with (`--trust-roots`) serve only until the first answer. That is what lets a root
//! rotation (`docs/identity.md`) reach running proxies without restarting them.
//!
//! Only the roots of the bundle within their own validity at a handshake's time are
//! trusted by it (webpki does not check a trust anchor's dates; Go and BoringSSL do): an
//! old root left in the bundle after a rotation stops anchoring chains at its end, and a
//! root not valid yet starts when it is. The set trusted is kept with the interval of
//! time it holds for ([`TrustBundle`]); a handshake outside that interval rebuilds it.
//! When no root is valid, the operator alone is verified against every root of the bundle
//! whatever its dates, so that a renewal can still bring a valid one.

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error as TlsError,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
    client::{
        ResolvesClientCert, Resumption, WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime},
    server::{
        ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert,
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use tokio::net::TcpStream;

pub mod client;
pub mod inbound;
pub mod session;

/// ALPN of a session carrying one HTTP/2 connection that multiplexes every HTTP/1 and
/// HTTP/2 request to the peer; an HTTP/1 request carries its version in
/// [`crate::mux::ORIG_PROTO`] so that the far side restores it (see [`crate::mux`]).
pub const ALPN_MUX: &[u8] = b"weft-mux";
/// ALPN of a session carrying one HTTP/1.1 connection (upgrades and `CONNECT`, which
/// become byte streams, and peers older than [`ALPN_MUX`]).
pub const ALPN_HTTP1: &[u8] = b"weft-http1";
/// ALPN of a session carrying one HTTP/2 connection of the client's own HTTP/2 requests
/// (prior knowledge): what peers older than [`ALPN_MUX`] send; still accepted inbound.
pub const ALPN_H2: &[u8] = b"weft-h2";
/// ALPN of a session carrying opaque TCP bytes.
pub const ALPN_TCP: &[u8] = b"weft-tcp";
/// Every ALPN protocol of the mesh; a ClientHello offering none of them is not a peer
/// proxy's (an application's own TLS), and passes through untouched.
pub const ALPN_ALL: [&[u8]; 4] = [ALPN_MUX, ALPN_H2, ALPN_HTTP1, ALPN_TCP];

/// Why a certificate, key or trust bundle could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The PEM did not parse.
    #[error("invalid PEM")]
    Pem(#[source] io::Error),
    /// The chain holds no certificate.
    #[error("the certificate chain is empty")]
    NoCertificate,
    /// The key PEM holds no private key.
    #[error("no private key")]
    NoKey,
    /// The trust bundle holds no usable root.
    #[error("the trust bundle has no usable root")]
    NoRoots,
    /// Every root of the trust bundle has expired or is not valid yet: no chain can be
    /// trusted now.
    #[error("no root of the trust bundle is valid now (each has expired or is not valid yet)")]
    NoValidRoot,
    /// The certificate does not parse, or carries no single SPIFFE ID.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The certificate names another identity than the one asked for.
    #[error("the certificate is for {got}, not {want} as asked")]
    WrongIdentity {
        /// The SPIFFE ID in the certificate.
        got: String,
        /// The SPIFFE ID asked for.
        want: String,
    },
    /// The certificate's public key is not the private key's: it could never complete
    /// a handshake.
    #[error("the certificate's public key is not the key it was asked for")]
    KeyMismatch,
    /// rustls refused the key or a root of the bundle.
    #[error("{what}")]
    Tls {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: TlsError,
    },
    /// The chain does not lead from the leaf to a root of the bundle valid now, or a
    /// certificate on the way does not parse, is not valid now or is not for TLS.
    #[error("the certificate does not verify against the trust bundle")]
    Untrusted(#[source] webpki::Error),
}

/// A certified key: the leaf and chain the operator issued, the key generated here, and
/// the trust bundle that came with them.
pub struct Certified {
    /// The SPIFFE ID the certificate carries.
    pub identity: Arc<str>,
    /// Start of the leaf's validity.
    pub not_before: SystemTime,
    /// When the chain stops verifying: the end of the validity of the leaf, or of an
    /// intermediate or the root it leads to if one ends first. Renewal and readiness
    /// follow it.
    pub not_after: SystemTime,
    /// When this proxy installed it: renewal is timed from here, not from `not_before`,
    /// which the operator backdates for clock skew.
    pub installed_at: SystemTime,
    /// The share of the lifetime after which to renew, drawn at install from
    /// [`RENEW_FRACTION`], so that proxies given certificates at once do not renew at once.
    renew_fraction: f64,
    /// SHA-256 fingerprint of the bundle's root the chain leads to (colon-separated hex,
    /// as `openssl x509 -fingerprint -sha256` prints it): which root this proxy is on.
    pub chain_root: String,
    /// SHA-256 fingerprints of every root of the trust bundle, in the answer's order.
    pub trust_roots: Vec<String>,
    key: Arc<CertifiedKey>,
    /// The bundle's roots, and the verifiers of peers and of the operator built on those
    /// of them valid at the latest handshake.
    trust: TrustBundle,
}

impl std::fmt::Debug for Certified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certified")
            .field("identity", &self.identity)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Certified {
    /// Seconds since the Unix epoch at which the leaf expires.
    pub fn not_after_unix(&self) -> u64 {
        self.not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    /// When to renew: at 65–75 % of the lifetime (drawn once per certificate), counted
    /// from when it was installed if that is later than `not_before` (the operator
    /// backdates certificates by minutes, which for a short lifetime would put the
    /// renewal in the past and renew in a loop).
    pub fn renew_at(&self) -> SystemTime {
        let start = self.not_before.max(self.installed_at);
        let life = self.not_after.duration_since(start).unwrap_or_default();
        start + life.mul_f64(self.renew_fraction)
    }
}

/// The range the share of a certificate's lifetime after which it is renewed is drawn
/// from. Without the spread, pods started together (a rollout, a node's restart) renew
/// together, and every certificate capped at one issuer's end renews in the same second;
/// Istio spreads renewals the same way.
pub const RENEW_FRACTION: std::ops::RangeInclusive<f64> = 0.65..=0.75;

/// One root of a trust bundle, with its validity (seconds since the Unix epoch, both
/// ends included, as webpki judges certificates).
struct BundleRoot {
    anchor: TrustAnchor<'static>,
    not_before: u64,
    not_after: u64,
    /// The root's subject as its certificate encodes it, which a chain's issuer names
    /// must equal byte for byte ([`session`] finds paths by name).
    subject: Box<[u8]>,
    /// What makes copies of one root the same anchor (subject, key and name
    /// constraints), hashed: sessions keep it instead of their peer's chain.
    key: session::RootKey,
}

impl BundleRoot {
    fn valid_at(&self, now: u64) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

/// A certificate answer's trust bundle: every root with its validity, and the set of
/// them trusted at the latest handshake. A certificate stays installed for hours, during
/// which a root may expire or become valid; so each handshake asks [`TrustBundle::at`]
/// for its own `now`, which answers the current set with two comparisons while `now`
/// stays within the interval it holds for, and otherwise rebuilds it.
struct TrustBundle {
    roots: Vec<BundleRoot>,
    provider: Arc<CryptoProvider>,
    trusted: ArcSwap<Trusted>,
    /// Whether the operator's fallback to every root ([`OperatorVerifier`]) was warned
    /// about since the proxy entered that state: one WARN per entry, whichever sets the
    /// handshakes built meanwhile.
    fallback_warned: std::sync::atomic::AtomicBool,
}

/// How far ahead of a handshake's `now` a stored set may start and still be taken for one
/// stored by a handshake racing over the same boundary (kept, not replaced); a set
/// starting further ahead means the clock went back, and is replaced.
const RACE_WINDOW_SECS: u64 = 5;

impl TrustBundle {
    /// The roots trusted at `now`, and the verifiers built on them.
    fn at(&self, now: UnixTime) -> Result<Arc<Trusted>, TlsError> {
        let now = now.as_secs();
        let loaded = self.trusted.load_full();
        if loaded.holds_at(now) {
            return Ok(loaded);
        }
        let fresh = Arc::new(
            Trusted::at(&self.roots, now, &self.provider)
                .map_err(|e| TlsError::General(format!("trust bundle verifiers: {e}")))?,
        );
        Ok(self.keep(loaded, fresh, now).0)
    }

    /// Stores `fresh`, the set at `now`, in place of `loaded`, the set found not to hold
    /// then, unless handshakes racing over a boundary stored another meanwhile: one that
    /// holds at `now` is kept and used; one of a later time than `now` is kept, and
    /// `fresh` serves this handshake only (so a handshake whose `now` was read before the
    /// boundary does not put back the stale set); one of an earlier time is replaced.
    /// Answers the set to use, and whether the stored roots changed (then logged).
    fn keep(&self, loaded: Arc<Trusted>, fresh: Arc<Trusted>, now: u64) -> (Arc<Trusted>, bool) {
        let later = |set: &Trusted| set.from > now && set.from - now <= RACE_WINDOW_SECS;
        let mut expected = loaded;
        loop {
            if later(&expected) {
                return (fresh, false);
            }
            let stored = arc_swap::Guard::into_inner(
                self.trusted.compare_and_swap(&expected, fresh.clone()),
            );
            if Arc::ptr_eq(&stored, &expected) {
                let changed = stored.roots.roots != fresh.roots.roots;
                if changed {
                    tracing::info!(
                        trusted = fresh.roots.len(),
                        bundle = self.roots.len(),
                        "trusted roots of the bundle changed"
                    );
                }
                return (fresh, changed);
            }
            if stored.holds_at(now) {
                return (stored, false);
            }
            expected = stored;
        }
    }
}

/// The roots of a bundle valid from `from` until before `until` (seconds since the Unix
/// epoch), and the verifiers built on them; none when no root is valid then (rustls
/// refuses to build a verifier without a root).
struct Trusted {
    from: u64,
    until: u64,
    roots: Arc<RootCertStore>,
    client: Option<Arc<dyn ClientCertVerifier>>,
    /// Verifies the operator (by DNS name): against `roots`, or when none is valid then,
    /// against every root of the bundle whatever its dates ([`OperatorVerifier`]).
    operator: Arc<WebPkiServerVerifier>,
}

impl Trusted {
    /// The roots of `bundle` valid at `now`, over the longest interval around `now`
    /// without a root's start or end.
    fn at(
        bundle: &[BundleRoot],
        now: u64,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Trusted, rustls::server::VerifierBuilderError> {
        let (mut from, mut until) = (0, u64::MAX);
        let mut roots = RootCertStore::empty();
        for root in bundle {
            if root.valid_at(now) {
                roots.roots.push(root.anchor.clone());
                from = from.max(root.not_before);
                until = until.min(root.not_after.saturating_add(1));
            } else if now < root.not_before {
                until = until.min(root.not_before);
            } else {
                from = from.max(root.not_after.saturating_add(1));
            }
        }
        let roots = Arc::new(roots);
        let (client, operator_roots) = if roots.is_empty() {
            // With no root valid, the operator is still verified (by every root, as
            // before roots' dates were checked), so that a renewal can bring a bundle
            // with a valid root: otherwise the proxy could never reach it again.
            let all = RootCertStore {
                roots: bundle.iter().map(|root| root.anchor.clone()).collect(),
            };
            (None, Arc::new(all))
        } else {
            let client =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .allow_unauthenticated()
                    .build()?;
            (Some(client), roots.clone())
        };
        let operator =
            WebPkiServerVerifier::builder_with_provider(operator_roots, provider.clone())
                .build()?;
        Ok(Trusted {
            from,
            until,
            roots,
            client,
            operator,
        })
    }

    /// Whether `operator` is the fallback to every root of the bundle: none is valid.
    fn operator_unchecked(&self) -> bool {
        self.roots.is_empty()
    }

    fn holds_at(&self, now: u64) -> bool {
        self.from <= now && now < self.until
    }
}

/// No root of the bundle is valid at the handshake's time.
#[derive(thiserror::Error)]
#[error("no root of the trust bundle is valid now (each has expired or is not valid yet)")]
struct NoValidRoot;

impl std::fmt::Debug for NoValidRoot {
    // rustls prints a `CertificateError::Other` by its `Debug`: this is what logs show.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Refuses the peer for [`NoValidRoot`]: classified `no_local_identity` by
/// [`TlsFailure::of`], as the fault is this proxy's (its bundle or its clock), not the
/// peer's.
fn no_valid_root() -> TlsError {
    TlsError::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(NoValidRoot))))
}

/// The proxy's current certified key, swapped atomically by renewal and read by every
/// handshake.
pub struct IdentityStore {
    current: Arc<ArcSwapOption<Certified>>,
    provider: Arc<CryptoProvider>,
    server: Arc<ServerConfig>,
    /// Counts outbound sessions established (`weft_tls_sessions_total{direction="outbound"}`),
    /// once the proxy's metrics are handed over.
    outbound_sessions: std::sync::OnceLock<crate::metrics::TlsMetrics>,
    /// How HTTP/1 requests travel to meshed endpoints.
    http1: Http1Transport,
    /// Bumped when an install changes the bundle's roots: open sessions re-verify their
    /// peer then ([`session::PeerSession::ended`]).
    trust_changes: tokio::sync::watch::Sender<u64>,
    /// Why the last attempt to get a certificate failed, for `/ready`.
    last_error: Mutex<Option<String>>,
}

impl std::fmt::Debug for IdentityStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityStore")
            .field("current", &self.current.load())
            .finish_non_exhaustive()
    }
}

/// The ring provider, shared by every config.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl IdentityStore {
    /// A store without a certificate: inbound TLS handshakes fail and outbound ones are
    /// not attempted until [`IdentityStore::install`]. HTTP/1 requests to meshed
    /// endpoints are multiplexed.
    pub fn new() -> Result<Arc<Self>, CertError> {
        Self::with_http1(Http1Transport::Multiplexed)
    }

    /// A store as [`IdentityStore::new`] makes it, whose outbound HTTP/1 requests to
    /// meshed endpoints travel as `http1` says.
    pub fn with_http1(http1: Http1Transport) -> Result<Arc<Self>, CertError> {
        let provider = provider();
        let current: Arc<ArcSwapOption<Certified>> = Arc::new(ArcSwapOption::const_empty());
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| CertError::Tls {
                what: "TLS 1.3 server config",
                source,
            })?
            .with_client_cert_verifier(Arc::new(MeshClientVerifier {
                current: current.clone(),
                provider: provider.clone(),
            }))
            .with_cert_resolver(Arc::new(Resolver(current.clone())));
        server.alpn_protocols = ALPN_ALL.iter().map(|p| p.to_vec()).collect();
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        Ok(Arc::new(IdentityStore {
            current,
            provider,
            server: Arc::new(server),
            outbound_sessions: std::sync::OnceLock::new(),
            http1,
            trust_changes: tokio::sync::watch::Sender::new(0),
            last_error: Mutex::new(None),
        }))
    }

    /// Counts each outbound session established from now on in `metrics`; the first
    /// metrics given win (a store belongs to one proxy).
    pub fn count_outbound_sessions(&self, metrics: crate::metrics::TlsMetrics) {
        let _ = self.outbound_sessions.set(metrics);
    }

    /// The certified key in use, if any.
    pub fn current(&self) -> Option<Arc<Certified>> {
        self.current.load_full()
    }

    /// Verifies and swaps in a certificate chain (PEM, leaf first), its private key and
    /// the trust bundle (PEM). The chain must verify against the bundle now, carry one
    /// SPIFFE ID and certify `key`'s public key; on error nothing changes.
    pub fn install(
        &self,
        chain_pem: &str,
        key: PrivateKeyDer<'static>,
        bundle_pem: &str,
    ) -> Result<Arc<Certified>, CertError> {
        self.install_for(None, chain_pem, key, bundle_pem)
    }

    /// [`IdentityStore::install`] of a certificate asked for as `want`: one for another
    /// SPIFFE ID is refused ([`CertError::WrongIdentity`]).
    pub fn install_for(
        &self,
        want: Option<&str>,
        chain_pem: &str,
        key: PrivateKeyDer<'static>,
        bundle_pem: &str,
    ) -> Result<Arc<Certified>, CertError> {
        let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(CertError::Pem)?;
        let leaf = chain.first().ok_or(CertError::NoCertificate)?;
        let bundle: Vec<CertificateDer<'static>> =
            rustls_pemfile::certs(&mut bundle_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(CertError::Pem)?;
        let mut roots = Vec::with_capacity(bundle.len());
        for der in &bundle {
            let mut one = RootCertStore::empty();
            one.add(der.clone()).map_err(|source| CertError::Tls {
                what: "trust bundle",
                source,
            })?;
            let unparsed =
                || CertError::Certificate("a root of the trust bundle does not parse".to_owned());
            let (_, x509) = x509_parser::parse_x509_certificate(der).map_err(|_| unparsed())?;
            let (not_before, not_after) = dates(&x509);
            let subject: Box<[u8]> = x509.subject().as_raw().into();
            roots.extend(one.roots.into_iter().map(|anchor| BundleRoot {
                key: session::RootKey::of(&anchor),
                subject: subject.clone(),
                anchor,
                not_before,
                not_after,
            }));
        }
        if roots.is_empty() {
            return Err(CertError::NoRoots);
        }
        let now = UnixTime::now();
        let trusted = Trusted::at(&roots, now.as_secs(), &self.provider)
            .map_err(|e| CertError::Certificate(format!("verifiers: {e}")))?;
        let (identity, not_before, leaf_not_after) = describe(leaf)?;
        if let Some(want) = want
            && *identity != *want
        {
            return Err(CertError::WrongIdentity {
                got: identity.to_string(),
                want: want.to_owned(),
            });
        }
        if trusted.roots.is_empty() {
            return Err(CertError::NoValidRoot);
        }
        // webpki's verified path says which root the chain leads to (during a rotation
        // the bundle holds two) and which certificates of the PEM are on it: one left in
        // the PEM but off the path (an old intermediate) must not time renewal. Only the
        // roots valid now are offered: webpki does not check an anchor's dates.
        let end_entity = webpki::EndEntityCert::try_from(leaf).map_err(CertError::Untrusted)?;
        let path = end_entity
            .verify_for_usage(
                self.provider.signature_verification_algorithms.all,
                &trusted.roots.roots,
                &chain[1..],
                now,
                webpki::KeyUsage::server_auth(),
                None,
                None,
            )
            .map_err(CertError::Untrusted)?;
        let anchor = path.anchor();
        // Of two copies of the root (one re-issued with a later end), the later of those
        // valid now counts: the path names the anchor, not which copy of it, and a copy
        // not valid yet does not make the chain last (none valid now: of them all).
        let copies = bundle
            .iter()
            .filter(|root| {
                webpki::anchor_from_trusted_cert(root).is_ok_and(|a| {
                    a.subject == anchor.subject
                        && a.subject_public_key_info == anchor.subject_public_key_info
                })
            })
            .collect::<Vec<_>>();
        let valid_now = copies
            .iter()
            .copied()
            .filter(|root| {
                validity(root)
                    .is_some_and(|(from, until)| from <= now.as_secs() && now.as_secs() <= until)
            })
            .collect::<Vec<_>>();
        let root = if valid_now.is_empty() {
            copies
        } else {
            valid_now
        }
        .into_iter()
        .max_by_key(|root| expiry(root));
        let chain_root = root.map(|root| fingerprint(root)).unwrap_or_default();
        let trust_roots = bundle.iter().map(|r| fingerprint(r)).collect();
        // The chain verifies until the first certificate on its path expires: an
        // intermediate (or the root) ending before the leaf ends it, and renewal is timed
        // by it.
        let not_after = path
            .intermediate_certificates()
            .filter_map(|cert| expiry(&cert.der()))
            .chain(root.and_then(expiry))
            .fold(leaf_not_after, SystemTime::min);
        let signer = self
            .provider
            .key_provider
            .load_private_key(key)
            .map_err(|source| CertError::Tls {
                what: "private key",
                source,
            })?;
        let key = CertifiedKey::new(chain, signer);
        match key.keys_match() {
            // A signer that cannot tell its public key (none of the ring provider's) is
            // let through: the handshake would then be the first to tell.
            Ok(()) | Err(TlsError::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(TlsError::InconsistentKeys(_)) => return Err(CertError::KeyMismatch),
            Err(source) => {
                return Err(CertError::Tls {
                    what: "certificate",
                    source,
                });
            }
        }
        let certified = Arc::new(Certified {
            identity,
            not_before,
            not_after,
            installed_at: SystemTime::now(),
            renew_fraction: rand::random_range(RENEW_FRACTION),
            chain_root,
            trust_roots,
            key: Arc::new(key),
            trust: TrustBundle {
                roots,
                provider: self.provider.clone(),
                trusted: ArcSwap::from_pointee(trusted),
                fallback_warned: std::sync::atomic::AtomicBool::new(false),
            },
        });
        let previous = self.current.swap(Some(certified.clone()));
        // Stored first, then told: a session re-verifying reads the new bundle. Only a
        // change of roots can withdraw trust; a renewal under the same bundle wakes none.
        if previous.is_some_and(|p| !same_roots(&p.trust_roots, &certified.trust_roots)) {
            self.trust_changes.send_modify(|g| *g = g.wrapping_add(1));
        }
        *self.error_slot() = None;
        Ok(certified)
    }

    /// [`IdentityStore::install`] with the key in PEM (PKCS#8, SEC1 or PKCS#1).
    pub fn install_pem(
        &self,
        chain_pem: &str,
        key_pem: &str,
        bundle_pem: &str,
    ) -> Result<Arc<Certified>, CertError> {
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .map_err(CertError::Pem)?
            .ok_or(CertError::NoKey)?;
        self.install(chain_pem, key, bundle_pem)
    }

    fn error_slot(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records why getting a certificate failed, shown by `/ready` while there is none.
    pub fn set_error(&self, why: String) {
        *self.error_slot() = Some(why);
    }

    /// `Ok` when a certificate is installed and not expired; otherwise why not.
    pub fn readiness(&self) -> Result<(), String> {
        match self.current() {
            Some(c) if c.not_after > SystemTime::now() => Ok(()),
            Some(c) => Err(format!(
                "certificate for {} expired at {} (unix); renewal failing: {}",
                c.identity,
                c.not_after_unix(),
                self.error_slot().as_deref().unwrap_or("no attempt yet")
            )),
            None => Err(format!(
                "no certificate yet: {}",
                self.error_slot()
                    .as_deref()
                    .unwrap_or("first request in progress")
            )),
        }
    }

    /// What sessions re-verify their peer against, and the subscription that wakes them,
    /// having seen the trust as it is now: take it before the handshake.
    pub(crate) fn trust_watch(&self) -> session::TrustWatch {
        session::TrustWatch {
            current: self.current.clone(),
            provider: self.provider.clone(),
            changes: self.trust_changes.subscribe(),
            seen: self.current.load_full(),
        }
    }

    /// The life of a session whose peer presented `chain` (leaf first), judged as the
    /// inbound verifier judges clients (any mesh identity): until the chain stops
    /// verifying ([`session::PeerSession`]); none without a certificate.
    /// `trust` is [`IdentityStore::trust_watch`] taken before the handshake.
    pub(crate) fn peer_session(
        &self,
        direction: crate::metrics::Direction,
        chain: Option<&[CertificateDer<'_>]>,
        trust: session::TrustWatch,
    ) -> Option<session::PeerSession> {
        session::PeerSession::new(direction, chain, None, trust)
    }

    /// The inbound side's TLS config: TLS 1.3, the current certificate, a client
    /// certificate requested (not required) and verified against the current bundle.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// A verifier for the operator's own certificate (identity endpoint, config stream):
    /// against the trust bundle of the certificate in use, or `bootstrap` (the roots the
    /// proxy was started with) until the first is installed. So once a rotation's bundle
    /// has arrived, the operator may serve a certificate from the new root.
    pub fn operator_verifier(
        &self,
        bootstrap: RootCertStore,
    ) -> Result<Arc<OperatorVerifier>, CertError> {
        let bootstrap =
            WebPkiServerVerifier::builder_with_provider(Arc::new(bootstrap), self.provider.clone())
                .build()
                .map_err(|e| CertError::Certificate(format!("operator verifier: {e}")))?;
        Ok(Arc::new(OperatorVerifier {
            current: self.current.clone(),
            bootstrap,
        }))
    }

    /// The outbound side's TLS configs for an endpoint that must present `expected`.
    pub fn client_tls(&self, expected: Arc<str>) -> Result<Arc<ClientTls>, CertError> {
        let verifier = Arc::new(MeshServerVerifier {
            expected: expected.clone(),
            current: self.current.clone(),
            provider: self.provider.clone(),
        });
        let resolver = Arc::new(Resolver(self.current.clone()));
        let config = |alpn: &[u8]| -> Result<Arc<ClientConfig>, CertError> {
            let mut c = ClientConfig::builder_with_provider(self.provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|source| CertError::Tls {
                    what: "TLS 1.3 client config",
                    source,
                })?
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone())
                .with_client_cert_resolver(resolver.clone());
            c.alpn_protocols = vec![alpn.to_vec()];
            c.resumption = Resumption::disabled();
            Ok(Arc::new(c))
        };
        Ok(Arc::new(ClientTls {
            identity: expected,
            http1: config(ALPN_HTTP1)?,
            h2: config(ALPN_H2)?,
            mux: config(ALPN_MUX)?,
            tcp: config(ALPN_TCP)?,
            current: self.current.clone(),
            sessions: self.outbound_sessions.get().cloned(),
            http1_transport: self.http1,
            trust: self.trust_watch(),
        }))
    }
}

/// What travels inside an outbound TLS session, announced by ALPN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inner {
    /// One HTTP/1.1 connection.
    Http1,
    /// One HTTP/2 connection of HTTP/2 requests only (peers older than [`ALPN_MUX`]).
    H2,
    /// One HTTP/2 connection multiplexing HTTP/1 and HTTP/2 requests ([`ALPN_MUX`]).
    Mux,
    /// Opaque TCP.
    Tcp,
}

impl Inner {
    /// The `protocol` label of `weft_tls_sessions_total`: `mux`, `http1`, `h2` or `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Inner::Http1 => "http1",
            Inner::H2 => "h2",
            Inner::Mux => "mux",
            Inner::Tcp => "tcp",
        }
    }
}

/// The outbound TLS configs of one meshed endpoint, one per ALPN protocol, sharing the
/// verifier that requires the endpoint's identity.
pub struct ClientTls {
    /// The identity the endpoint must present.
    pub identity: Arc<str>,
    http1: Arc<ClientConfig>,
    h2: Arc<ClientConfig>,
    mux: Arc<ClientConfig>,
    tcp: Arc<ClientConfig>,
    current: Arc<ArcSwapOption<Certified>>,
    sessions: Option<crate::metrics::TlsMetrics>,
    http1_transport: Http1Transport,
    /// What its sessions re-verify the endpoint against.
    trust: session::TrustWatch,
}

/// How a proxy's HTTP/1 requests (other than upgrades and `CONNECT`, which always have a
/// TLS session of their own) travel to meshed endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Http1Transport {
    /// On the one HTTP/2 connection to the endpoint, with its HTTP/2 requests
    /// ([`ALPN_MUX`]); restored to HTTP/1 at the far side.
    #[default]
    Multiplexed,
    /// As HTTP/1.1 in TLS sessions of their own ([`ALPN_HTTP1`]), pooled and kept alive
    /// like plain-text connections: less work per request, one connection per request
    /// in flight.
    Sessions,
}

impl std::str::FromStr for Http1Transport {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "multiplexed" => Ok(Http1Transport::Multiplexed),
            "sessions" => Ok(Http1Transport::Sessions),
            other => Err(format!("{other:?} is not multiplexed or sessions")),
        }
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// An outbound TLS handshake that failed, classified.
#[derive(Debug, thiserror::Error)]
#[error("TLS to {addr} ({failure:?})")]
pub struct HandshakeError {
    /// The endpoint.
    pub addr: SocketAddr,
    /// What went wrong.
    pub failure: TlsFailure,
    /// The cause.
    #[source]
    pub source: io::Error,
}

impl ClientTls {
    /// The life of a session this side established over `stream`: until the endpoint's
    /// chain stops verifying for its expected identity ([`session::PeerSession`]).
    /// `trust` is [`ClientTls::trust_watch`] taken before the handshake.
    pub(crate) fn peer_session(
        &self,
        stream: &tokio_rustls::client::TlsStream<TcpStream>,
        trust: session::TrustWatch,
    ) -> Option<session::PeerSession> {
        session::PeerSession::new(
            crate::metrics::Direction::Outbound,
            stream.get_ref().1.peer_certificates(),
            Some(self.identity.clone()),
            trust,
        )
    }

    /// What a session re-verifies its peer against, having seen the trust as it is now:
    /// take it before the handshake.
    pub(crate) fn trust_watch(&self) -> session::TrustWatch {
        self.trust.seen_now()
    }

    /// The metrics its sessions count into, once the proxy's are handed over.
    pub fn metrics(&self) -> Option<&crate::metrics::TlsMetrics> {
        self.sessions.as_ref()
    }

    /// Whether HTTP/1 requests to this endpoint share its HTTP/2 connection.
    pub fn multiplexes_http1(&self) -> bool {
        self.http1_transport == Http1Transport::Multiplexed
    }

    /// Runs the TLS handshake over `stream` (already connected to `addr`), announcing
    /// `inner`, within `timeout`.
    pub async fn handshake(
        &self,
        stream: TcpStream,
        addr: SocketAddr,
        inner: Inner,
        timeout: Duration,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, HandshakeError> {
        if self.current.load().is_none() {
            return Err(HandshakeError {
                addr,
                failure: TlsFailure::NoIdentity,
                source: io::Error::other("this proxy has no certificate yet"),
            });
        }
        let config = match inner {
            Inner::Http1 => &self.http1,
            Inner::H2 => &self.h2,
            Inner::Mux => &self.mux,
            Inner::Tcp => &self.tcp,
        };
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        // The verifier checks the URI SAN, not this name; an IP name sends no SNI.
        let name = ServerName::IpAddress(addr.ip().into());
        match tokio::time::timeout(timeout, connector.connect(name, stream)).await {
            Ok(Ok(s)) => {
                if let Some(m) = &self.sessions {
                    m.session(crate::metrics::Direction::Outbound, Some(inner));
                }
                Ok(s)
            }
            Ok(Err(source)) => Err(HandshakeError {
                addr,
                failure: TlsFailure::of_io(&source),
                source,
            }),
            Err(_) => Err(HandshakeError {
                addr,
                failure: TlsFailure::Handshake,
                source: io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"),
            }),
        }
    }
}

/// Why a TLS handshake with a peer failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFailure {
    /// The peer's chain does not lead to the trust bundle (another CA, a bad signature).
    Untrusted,
    /// The peer's certificate has expired.
    Expired,
    /// The peer's certificate is not valid yet.
    NotYetValid,
    /// The peer's certificate is trusted but names another identity than expected.
    IdentityMismatch,
    /// The peer's certificate is trusted but carries no SPIFFE ID.
    NoPeerIdentity,
    /// The peer offered no TLS version this side accepts (below 1.3).
    ProtocolVersion,
    /// This proxy cannot do mutual TLS now: it has no certificate yet, or no root of its
    /// trust bundle is valid now (all expired, or its clock is before their start), so it
    /// would refuse every peer; the peer is not to blame.
    NoIdentity,
    /// Anything else: an alert from the peer, a broken connection, a timeout.
    Handshake,
}

impl TlsFailure {
    /// The label of `weft_tls_refused_total` and the log field.
    pub const fn as_str(self) -> &'static str {
        match self {
            TlsFailure::Untrusted => "untrusted",
            TlsFailure::Expired => "expired",
            TlsFailure::NotYetValid => "not_yet_valid",
            TlsFailure::IdentityMismatch => "identity_mismatch",
            TlsFailure::NoPeerIdentity => "no_peer_identity",
            TlsFailure::ProtocolVersion => "protocol_version",
            TlsFailure::NoIdentity => "no_local_identity",
            TlsFailure::Handshake => "handshake_failed",
        }
    }

    /// Classifies the error of a tokio-rustls handshake.
    pub fn of_io(error: &io::Error) -> TlsFailure {
        match error.get_ref().and_then(|e| e.downcast_ref::<TlsError>()) {
            Some(e) => TlsFailure::of(e),
            None => TlsFailure::Handshake,
        }
    }

    /// Classifies a rustls error.
    pub fn of(error: &TlsError) -> TlsFailure {
        match error {
            TlsError::InvalidCertificate(c) => match c {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    TlsFailure::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    TlsFailure::NotYetValid
                }
                CertificateError::Other(OtherError(e)) => match e.downcast_ref::<PeerIdentity>() {
                    Some(PeerIdentity::Mismatch { .. }) => TlsFailure::IdentityMismatch,
                    Some(PeerIdentity::Missing) => TlsFailure::NoPeerIdentity,
                    None if e.is::<NoValidRoot>() => TlsFailure::NoIdentity,
                    None => TlsFailure::Untrusted,
                },
                _ => TlsFailure::Untrusted,
            },
            TlsError::PeerIncompatible(_) => TlsFailure::ProtocolVersion,
            _ => TlsFailure::Handshake,
        }
    }

    /// The reason code the outbound side answers with.
    pub const fn code(self) -> crate::errors::ErrorCode {
        use crate::errors::ErrorCode;
        match self {
            TlsFailure::Untrusted => ErrorCode::TlsPeerUntrusted,
            TlsFailure::Expired => ErrorCode::TlsPeerExpired,
            TlsFailure::NotYetValid => ErrorCode::TlsPeerNotYetValid,
            TlsFailure::IdentityMismatch | TlsFailure::NoPeerIdentity => {
                ErrorCode::TlsIdentityMismatch
            }
            TlsFailure::ProtocolVersion | TlsFailure::NoIdentity | TlsFailure::Handshake => {
                ErrorCode::TlsHandshakeFailed
            }
        }
    }
}

/// A trusted peer certificate whose identity is not acceptable.
#[derive(Debug, thiserror::Error)]
enum PeerIdentity {
    #[error("the peer presents {got}, expected {expected}")]
    Mismatch { expected: Arc<str>, got: Arc<str> },
    #[error("the peer's certificate carries no SPIFFE ID")]
    Missing,
}

/// Whether two bundles (their roots' fingerprints) hold the same roots, whatever the order.
fn same_roots(a: &[String], b: &[String]) -> bool {
    let sorted = |x: &[String]| {
        let mut v = x.to_vec();
        v.sort_unstable();
        v.dedup();
        v
    };
    sorted(a) == sorted(b)
}

/// The SPIFFE ID (the single `spiffe://` URI SAN) and validity of a certificate.
fn describe(cert: &CertificateDer<'_>) -> Result<(Arc<str>, SystemTime, SystemTime), CertError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| CertError::Certificate(format!("does not parse: {e}")))?;
    let identity = spiffe_id_of(&x509)
        .ok_or_else(|| CertError::Certificate("carries no single spiffe:// URI SAN".to_owned()))?;
    let validity = x509.validity();
    let at = |t: &x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).unwrap_or(0);
        UNIX_EPOCH + Duration::from_secs(secs)
    };
    Ok((identity, at(&validity.not_before), at(&validity.not_after)))
}

/// A certificate's validity in seconds since the Unix epoch (a time before it counts as
/// the epoch), if it parses.
fn validity(cert: &CertificateDer<'_>) -> Option<(u64, u64)> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(dates(&x509))
}

/// A parsed certificate's validity, as [`validity`] answers it.
fn dates(x509: &x509_parser::certificate::X509Certificate<'_>) -> (u64, u64) {
    let secs = |t: &x509_parser::time::ASN1Time| u64::try_from(t.timestamp()).unwrap_or(0);
    let v = x509.validity();
    (secs(&v.not_before), secs(&v.not_after))
}

/// When a certificate expires, if it parses.
fn expiry(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    let secs = u64::try_from(x509.validity().not_after.timestamp()).unwrap_or(0);
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

fn spiffe_id_of(x509: &x509_parser::certificate::X509Certificate<'_>) -> Option<Arc<str>> {
    let san = x509.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(u), None) if u.starts_with("spiffe://") => Some(Arc::from(u)),
        _ => None,
    }
}

/// The SPIFFE ID of a DER certificate, if it carries exactly one.
pub fn peer_identity(cert: &CertificateDer<'_>) -> Option<Arc<str>> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    spiffe_id_of(&x509)
}

fn identity_error(e: PeerIdentity) -> TlsError {
    TlsError::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Serves the current certified key to both sides of handshakes.
#[derive(Debug)]
struct Resolver(Arc<ArcSwapOption<Certified>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load().as_ref().map(|c| c.key.clone())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.load().as_ref().map(|c| c.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies a server (the peer an outbound connection reaches): its chain against the
/// current bundle, then its SPIFFE ID against the one expected of that endpoint.
#[derive(Debug)]
struct MeshServerVerifier {
    expected: Arc<str>,
    current: Arc<ArcSwapOption<Certified>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let current = self
            .current
            .load_full()
            .ok_or_else(|| TlsError::General("no trust bundle yet".to_owned()))?;
        let trusted = current.trust.at(now)?;
        if trusted.roots.is_empty() {
            return Err(no_valid_root());
        }
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &trusted.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match peer_identity(end_entity) {
            Some(got) if got == self.expected => Ok(ServerCertVerified::assertion()),
            Some(got) => Err(identity_error(PeerIdentity::Mismatch {
                expected: self.expected.clone(),
                got,
            })),
            None => Err(identity_error(PeerIdentity::Missing)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies the operator's certificate (a DNS name, webpki rules) against the trust bundle
/// of the certificate in use, or the roots the proxy started with before it has one; see
/// [`IdentityStore::operator_verifier`].
#[derive(Debug)]
pub struct OperatorVerifier {
    current: Arc<ArcSwapOption<Certified>>,
    bootstrap: Arc<WebPkiServerVerifier>,
}

impl OperatorVerifier {
    /// The verifier of the roots trusted at `now`; when no root of the bundle is valid
    /// then, of every root of the bundle (with a WARN once each time the proxy enters
    /// that state), so that the proxy can still renew: peers keep the strict rule.
    fn verifier(&self, now: UnixTime) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
        let Some(c) = self.current.load_full() else {
            return Ok(self.bootstrap.clone());
        };
        let trusted = c.trust.at(now)?;
        let warned = &c.trust.fallback_warned;
        if !trusted.operator_unchecked() {
            warned.store(false, std::sync::atomic::Ordering::Relaxed);
        } else if !warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                bundle = c.trust.roots.len(),
                "no root of the trust bundle is valid now (each has expired or is not valid \
                 yet): the operator is verified against every root of the bundle whatever its \
                 dates, until a renewal brings a valid root; peers are refused"
            );
        }
        Ok(trusted.operator.clone())
    }
}

impl ServerCertVerifier for OperatorVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        self.verifier(now)?
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.bootstrap.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.bootstrap.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.bootstrap.supported_verify_schemes()
    }
}

/// SHA-256 of a certificate, colon-separated upper-case hex (as `openssl x509
/// -fingerprint -sha256` and the operator's log print it).
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Verifies a client certificate (optional) against the current bundle, and requires a
/// SPIFFE ID in it.
#[derive(Debug)]
struct MeshClientVerifier {
    current: Arc<ArcSwapOption<Certified>>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // Strict mode refuses unauthenticated clients after the handshake, by Policy.
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        let current = self
            .current
            .load_full()
            .ok_or_else(|| TlsError::General("no trust bundle yet".to_owned()))?;
        current
            .trust
            .at(now)?
            .client
            .as_ref()
            .ok_or_else(no_valid_root)?
            .verify_client_cert(end_entity, intermediates, now)?;
        match peer_identity(end_entity) {
            Some(_) => Ok(ClientCertVerified::assertion()),
            None => Err(identity_error(PeerIdentity::Missing)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
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

    /// The DNS name the operator's certificates carry in these tests.
    const OPERATOR: &str = "weft-operator.test";

    struct Ca {
        params: CertificateParams,
        key: KeyPair,
        pem: String,
        der: CertificateDer<'static>,
    }

    impl Ca {
        fn new(name: &str) -> Ca {
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            Ca::self_signed(params)
        }

        /// A root named `name`, valid from `from` to `until` seconds from now.
        fn valid_between(name: &str, from: i64, until: i64) -> Ca {
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now + time::Duration::seconds(from);
            params.not_after = now + time::Duration::seconds(until);
            Ca::self_signed(params)
        }

        fn self_signed(params: CertificateParams) -> Ca {
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            Ca {
                pem: cert.pem(),
                der: cert.der().clone(),
                params,
                key,
            }
        }

        /// A leaf with `san`, valid from `from` to `until` seconds from now: (chain, key).
        fn issue(&self, san: SanType, from: i64, until: i64) -> (String, String) {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![san];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now + time::Duration::seconds(from);
            params.not_after = now + time::Duration::seconds(until);
            let cert = params
                .signed_by(&key, &Issuer::from_params(&self.params, &self.key))
                .unwrap();
            (cert.pem(), key.serialize_pem())
        }

        /// An intermediate CA named `name` signed by this one, valid from a minute ago to
        /// `until` seconds from now.
        fn intermediate(&self, name: &str, until: i64) -> Ca {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::seconds(60);
            params.not_after = now + time::Duration::seconds(until);
            let cert = params
                .signed_by(&key, &Issuer::from_params(&self.params, &self.key))
                .unwrap();
            Ca {
                pem: cert.pem(),
                der: cert.der().clone(),
                params,
                key,
            }
        }

        /// The end of this CA's validity.
        fn not_after(&self) -> SystemTime {
            let secs = self.params.not_after.unix_timestamp();
            UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap())
        }

        /// Installs a mesh certificate from this CA with trust bundle `bundle`.
        fn install(&self, store: &IdentityStore, bundle: &str) -> Arc<Certified> {
            let id = SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap());
            let (chain, key) = self.issue(id, -60, 3600);
            store.install_pem(&chain, &key, bundle).unwrap()
        }

        /// The operator's serving certificate, from this CA.
        fn operator_cert(&self) -> CertificateDer<'static> {
            let (chain, _) = self.issue(SanType::DnsName(OPERATOR.try_into().unwrap()), -60, 3600);
            rustls_pemfile::certs(&mut chain.as_bytes())
                .next()
                .unwrap()
                .unwrap()
        }
    }

    fn trusts_operator(verifier: &OperatorVerifier, ca: &Ca) -> bool {
        verifier
            .verify_server_cert(
                &ca.operator_cert(),
                &[],
                &ServerName::try_from(OPERATOR).unwrap(),
                &[],
                UnixTime::now(),
            )
            .is_ok()
    }

    /// The SPIFFE ID of the peers in these tests.
    const PEER: &str = "spiffe://cluster.local/ns/a/sa/peer";

    /// A time `secs` from now, as rustls hands it to verifiers.
    fn in_secs(secs: i64) -> UnixTime {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let secs = now.as_secs().checked_add_signed(secs).unwrap();
        UnixTime::since_unix_epoch(Duration::from_secs(secs))
    }

    /// The three verifiers of peers and of the operator that trust `store`'s bundle.
    struct Verifiers {
        server: MeshServerVerifier,
        client: MeshClientVerifier,
        operator: Arc<OperatorVerifier>,
    }

    impl Verifiers {
        fn of(store: &IdentityStore) -> Verifiers {
            // The proxy's start-up roots: a root nobody's certificate chains to.
            let mut bootstrap = RootCertStore::empty();
            bootstrap.add(Ca::new("bootstrap").der).unwrap();
            Verifiers {
                server: MeshServerVerifier {
                    expected: Arc::from(PEER),
                    current: store.current.clone(),
                    provider: store.provider.clone(),
                },
                client: MeshClientVerifier {
                    current: store.current.clone(),
                    provider: store.provider.clone(),
                },
                operator: store.operator_verifier(bootstrap).unwrap(),
            }
        }

        /// What each verifier (outbound peer, inbound peer, operator) says at `now` of a
        /// certificate from `ca`, valid from a minute ago for an hour.
        fn verdicts(&self, ca: &Ca, now: UnixTime) -> [Result<(), TlsError>; 3] {
            let (chain, _) = ca.issue(SanType::URI(PEER.try_into().unwrap()), -60, 3600);
            let peer = rustls_pemfile::certs(&mut chain.as_bytes())
                .next()
                .unwrap()
                .unwrap();
            let ip = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
            let operator = ServerName::try_from(OPERATOR).unwrap();
            [
                self.server
                    .verify_server_cert(&peer, &[], &ip, &[], now)
                    .map(drop),
                self.client.verify_client_cert(&peer, &[], now).map(drop),
                self.operator
                    .verify_server_cert(&ca.operator_cert(), &[], &operator, &[], now)
                    .map(drop),
            ]
        }

        /// Whether all three verifiers trust a certificate from `ca` at `now`; panics if
        /// they disagree, or refuse it for another reason than an untrusted chain.
        fn trust(&self, ca: &Ca, now: UnixTime) -> bool {
            let verdicts = self.verdicts(ca, now);
            for v in &verdicts {
                if let Err(e) = v {
                    assert_eq!(TlsFailure::of(e), TlsFailure::Untrusted, "{e}");
                }
            }
            let ok = verdicts.iter().map(Result::is_ok).collect::<Vec<_>>();
            assert!(ok.iter().all(|&o| o == ok[0]), "{verdicts:?}");
            ok[0]
        }
    }

    #[test]
    fn a_root_of_the_bundle_outside_its_validity_anchors_no_peer() {
        let current = Ca::new("root current");
        // Left in the bundle after a rotation, ended an hour ago; and one not valid for
        // another hour. Peers' own certificates from both are valid now.
        let old = Ca::valid_between("root old", -7200, -3600);
        let next = Ca::valid_between("root next", 3600, 7200);
        let store = IdentityStore::new().unwrap();
        current.install(&store, &format!("{}{}{}", current.pem, old.pem, next.pem));
        let v = Verifiers::of(&store);
        let now = UnixTime::now();
        assert!(v.trust(&current, now), "a peer of the current root");
        assert!(!v.trust(&old, now), "a peer of the expired root");
        assert!(!v.trust(&next, now), "a peer of the root not valid yet");
        for e in v.verdicts(&old, now) {
            assert!(
                matches!(
                    e,
                    Err(TlsError::InvalidCertificate(
                        CertificateError::UnknownIssuer
                    ))
                ),
                "{e:?}"
            );
        }
    }

    #[test]
    fn roots_are_trusted_by_their_validity_at_each_handshakes_time() {
        let current = Ca::new("root current");
        // Ends in 10 minutes; starts in 5.
        let ending = Ca::valid_between("root ending", -3600, 600);
        let starting = Ca::valid_between("root starting", 300, 7200);
        let store = IdentityStore::new().unwrap();
        let c = current.install(
            &store,
            &format!("{}{}{}", current.pem, ending.pem, starting.pem),
        );
        let v = Verifiers::of(&store);
        let trusted = |now: UnixTime| {
            [
                v.trust(&current, now),
                v.trust(&ending, now),
                v.trust(&starting, now),
            ]
        };
        assert_eq!(trusted(in_secs(0)), [true, true, false], "at install");
        assert_eq!(trusted(in_secs(400)), [true, true, true], "both");
        assert_eq!(trusted(in_secs(700)), [true, false, true], "ending ended");
        // A clock set back is judged by its own time too.
        assert_eq!(trusted(in_secs(0)), [true, true, false], "back at install");
        // The certificate in use, its roots and its timing are the installed ones.
        assert!(Arc::ptr_eq(&store.current().unwrap(), &c));
        assert_eq!(c.chain_root, fingerprint(&current.der));
        assert_eq!(c.trust_roots.len(), 3);
    }

    #[test]
    fn when_no_root_is_valid_any_more_peers_are_refused_and_the_operator_verified_by_every_root() {
        let root = Ca::valid_between("root A", -3600, 600);
        let store = IdentityStore::new().unwrap();
        root.install(&store, &root.pem);
        let v = Verifiers::of(&store);
        assert!(v.trust(&root, in_secs(0)));
        let later = in_secs(700);
        let [server, client, operator] = v.verdicts(&root, later);
        for e in [server, client] {
            let e = e.unwrap_err();
            assert!(
                e.to_string()
                    .contains("no root of the trust bundle is valid now"),
                "{e}"
            );
            // This proxy's fault, not the peer's: `no_local_identity`, outbound
            // `tls_handshake_failed`, not `untrusted`.
            assert_eq!(TlsFailure::of(&e), TlsFailure::NoIdentity, "{e}");
            assert_eq!(
                TlsFailure::of(&e).code(),
                crate::errors::ErrorCode::TlsHandshakeFailed
            );
        }
        // The operator is still verified, against the expired root, so that a renewal can
        // bring a bundle with a valid one (the admin re-issuing A with later dates); a
        // certificate from another root is still refused.
        operator.expect("the operator, from the only root, past its end");
        let other = Ca::new("root B");
        let e = v
            .operator
            .verify_server_cert(
                &other.operator_cert(),
                &[],
                &ServerName::try_from(OPERATOR).unwrap(),
                &[],
                later,
            )
            .unwrap_err();
        assert_eq!(TlsFailure::of(&e), TlsFailure::Untrusted, "{e}");
        assert!(v.trust(&root, in_secs(0)), "until its end it was trusted");
    }

    /// Counts, on the thread it is the default subscriber of, the WARNs that the operator is
    /// verified against every root of the bundle.
    #[derive(Clone, Default)]
    struct FallbackWarnings(Arc<std::sync::atomic::AtomicUsize>);

    impl FallbackWarnings {
        fn count(&self) -> usize {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for FallbackWarnings {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Fallback(bool);
            impl tracing::field::Visit for Fallback {
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    if field.name() == "message" {
                        self.0 = format!("{value:?}").contains("verified against every root");
                    }
                }
            }
            if *event.metadata().level() != tracing::Level::WARN {
                return;
            }
            let mut fallback = Fallback(false);
            event.record(&mut fallback);
            if fallback.0 {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    #[test]
    fn the_operator_fallback_warns_once_each_time_the_proxy_enters_it() {
        use tracing_subscriber::layer::SubscriberExt as _;
        // A ends in 10 minutes; B is valid from 15 to 20 minutes: no root of the bundle is
        // valid from 10 to 15 minutes, nor after 20.
        let a = Ca::valid_between("root A", -3600, 600);
        let b = Ca::valid_between("root B", 900, 1200);
        let store = IdentityStore::new().unwrap();
        a.install(&store, &format!("{}{}", a.pem, b.pem));
        let v = Verifiers::of(&store);
        let operator = a.operator_cert();
        let name = ServerName::try_from(OPERATOR).unwrap();
        let warnings = FallbackWarnings::default();
        let subscriber = tracing_subscriber::registry().with(warnings.clone());
        tracing::subscriber::with_default(subscriber, || {
            // tracing caches a warning's interest once, when first reached, from the
            // reaching thread's subscriber alone while only one is registered: another
            // test's thread with none could cache "no one" after this one is set up. So the
            // warning is reached first through a store of its own, then asked again.
            let warm = IdentityStore::new().unwrap();
            a.install(&warm, &format!("{}{}", a.pem, b.pem));
            let _ = Verifiers::of(&warm).operator.verify_server_cert(
                &operator,
                &[],
                &name,
                &[],
                in_secs(700),
            );
            tracing::callsite::rebuild_interest_cache();
            let before = warnings.count();
            let mut seen = Vec::new();
            // (seconds from now, whether A's operator is trusted then)
            for (secs, trusted) in [
                (0, true),
                (700, true),
                (800, true),
                (1000, false),
                (1300, true),
                (1400, true),
            ] {
                let verdict =
                    v.operator
                        .verify_server_cert(&operator, &[], &name, &[], in_secs(secs));
                assert_eq!(verdict.is_ok(), trusted, "at +{secs} s: {verdict:?}");
                seen.push(warnings.count() - before);
            }
            // Entering the fallback (+700 s) warns; staying in it (+800 s) does not; B
            // valid (+1000 s) leaves it; entering it again (+1300 s) warns again, once.
            assert_eq!(seen, [0, 1, 1, 1, 2, 2]);
        });
    }

    #[test]
    fn handshakes_racing_over_a_boundary_keep_the_set_of_the_present_and_log_a_change_once() {
        let current = Ca::new("root current");
        let ending = Ca::valid_between("root ending", -3600, 600);
        let store = IdentityStore::new().unwrap();
        let c = current.install(&store, &format!("{}{}", current.pem, ending.pem));
        let trust = &c.trust;
        let secs = |t: i64| in_secs(t).as_secs();
        let build = |t: i64| Arc::new(Trusted::at(&trust.roots, secs(t), &trust.provider).unwrap());
        // Three handshakes loaded the set of install, which does not hold after the end.
        let at_install = trust.trusted.load_full();
        let after = build(700);
        let (used, changed) = trust.keep(at_install.clone(), after.clone(), secs(700));
        assert!(
            Arc::ptr_eq(&used, &after) && changed,
            "the first stores and logs"
        );
        // The second, at the same time, uses the set stored: no rebuild stored, no log.
        let (used, changed) = trust.keep(at_install.clone(), build(700), secs(700));
        assert!(Arc::ptr_eq(&used, &after) && !changed, "the second uses it");
        // The third read its time just before the end: its own set serves it, the set
        // of the present stays stored.
        let before = build(599);
        let (used, changed) = trust.keep(at_install.clone(), before.clone(), secs(599));
        assert!(
            Arc::ptr_eq(&used, &before) && !changed,
            "the third uses its own"
        );
        assert!(
            Arc::ptr_eq(&trust.trusted.load_full(), &after),
            "present kept"
        );
        // Also when the set of the present was loaded first, before its CAS.
        let (used, changed) = trust.keep(after.clone(), build(599), secs(599));
        assert!(!Arc::ptr_eq(&used, &after) && !changed, "its own again");
        assert!(
            Arc::ptr_eq(&trust.trusted.load_full(), &after),
            "kept again"
        );
        // A time further back than a race allows is a clock set back: its set replaces.
        let back = build(500);
        let (used, changed) = trust.keep(at_install, back.clone(), secs(500));
        assert!(Arc::ptr_eq(&used, &back) && changed, "the clock went back");
        assert!(Arc::ptr_eq(&trust.trusted.load_full(), &back), "stored");
    }

    #[test]
    fn crossing_a_boundary_that_leaves_the_trusted_roots_the_same_logs_no_change() {
        let current = Ca::new("root current");
        // Valid only from 5 to 6 minutes after install: at install and at +500 s the
        // trusted roots are the same, over two intervals.
        let brief = Ca::valid_between("root brief", 300, 360);
        let store = IdentityStore::new().unwrap();
        let c = current.install(&store, &format!("{}{}", current.pem, brief.pem));
        let trust = &c.trust;
        let now = in_secs(500).as_secs();
        let loaded = trust.trusted.load_full();
        assert!(!loaded.holds_at(now));
        let fresh = Arc::new(Trusted::at(&trust.roots, now, &trust.provider).unwrap());
        let (used, changed) = trust.keep(loaded, fresh.clone(), now);
        assert!(Arc::ptr_eq(&used, &fresh), "rebuilt and stored");
        assert!(!changed, "the same roots: no INFO line");
        assert!(Arc::ptr_eq(&trust.trusted.load_full(), &fresh));
    }

    #[test]
    fn a_root_is_trusted_from_its_not_before_to_its_not_after_both_included() {
        let current = Ca::new("root current");
        let ending = Ca::valid_between("root ending", -3600, 600);
        let starting = Ca::valid_between("root starting", 300, 7200);
        let store = IdentityStore::new().unwrap();
        current.install(
            &store,
            &format!("{}{}{}", current.pem, ending.pem, starting.pem),
        );
        let v = Verifiers::of(&store);
        let (_, not_after) = validity(&ending.der).unwrap();
        let (not_before, _) = validity(&starting.der).unwrap();
        let at = |secs: u64| UnixTime::since_unix_epoch(Duration::from_secs(secs));
        // In this order both the rebuilt set and the one kept between boundaries judge
        // each second.
        assert!(!v.trust(&starting, at(not_before - 1)), "not_before - 1 s");
        assert!(v.trust(&starting, at(not_before)), "not_before");
        assert!(v.trust(&ending, at(not_after)), "not_after");
        assert!(!v.trust(&ending, at(not_after + 1)), "not_after + 1 s");
        // And each on a set rebuilt from the other side.
        assert!(v.trust(&ending, at(not_after)), "not_after, back");
        assert!(
            !v.trust(&starting, at(not_before - 1)),
            "not_before - 1 s, back"
        );
        assert!(v.trust(&starting, at(not_before)), "not_before, again");
        assert!(
            !v.trust(&ending, at(not_after + 1)),
            "not_after + 1 s, again"
        );
        assert!(
            v.trust(&current, at(not_after + 1)),
            "the current root throughout"
        );
    }

    #[test]
    fn an_install_needs_its_chain_to_lead_to_a_root_valid_now() {
        let current = Ca::new("root current");
        let old = Ca::valid_between("root old", -7200, -3600);
        let next = Ca::valid_between("root next", 3600, 7200);
        let store = IdentityStore::new().unwrap();
        let id = || SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap());
        let both = format!("{}{}", current.pem, old.pem);
        // A chain to the expired root: webpki would take its anchor whatever its dates.
        let (chain, key) = old.issue(id(), -60, 3600);
        let e = store.install_pem(&chain, &key, &both).unwrap_err();
        assert!(
            matches!(e, CertError::Untrusted(webpki::Error::UnknownIssuer)),
            "{e:?}"
        );
        // A bundle of which no root is valid now.
        for (ca, bundle) in [
            (&old, &old.pem),
            (&next, &format!("{}{}", old.pem, next.pem)),
        ] {
            let (chain, key) = ca.issue(id(), -60, 3600);
            let e = store.install_pem(&chain, &key, bundle).unwrap_err();
            assert!(matches!(e, CertError::NoValidRoot), "{e:?}");
        }
        assert!(store.current().is_none(), "nothing installed");
        let c = current.install(&store, &both);
        assert_eq!(c.chain_root, fingerprint(&current.der));
    }

    #[test]
    fn the_operator_is_verified_against_the_latest_bundle_once_there_is_one() {
        let (a, b) = (Ca::new("root A"), Ca::new("root B"));
        let store = IdentityStore::new().unwrap();
        let mut bootstrap = RootCertStore::empty();
        bootstrap.add(a.der.clone()).unwrap();
        let verifier = store.operator_verifier(bootstrap).unwrap();
        // Before any certificate: the roots the proxy was started with.
        assert!(trusts_operator(&verifier, &a));
        assert!(!trusts_operator(&verifier, &b));
        // Rotation step 1: the answer's bundle holds A and B.
        a.install(&store, &format!("{}{}", a.pem, b.pem));
        assert!(trusts_operator(&verifier, &a));
        assert!(trusts_operator(&verifier, &b), "B trusted from the bundle");
        // Step 3: B alone; A is no longer trusted, though the proxy started with it.
        b.install(&store, &b.pem);
        assert!(trusts_operator(&verifier, &b));
        assert!(!trusts_operator(&verifier, &a), "A dropped with the bundle");
    }

    #[test]
    fn a_certificate_names_the_root_its_chain_leads_to_and_the_bundle() {
        let (a, b) = (Ca::new("root A"), Ca::new("root B"));
        let store = IdentityStore::new().unwrap();
        let c = b.install(&store, &format!("{}{}", a.pem, b.pem));
        assert_eq!(c.chain_root, fingerprint(&b.der));
        assert_eq!(c.trust_roots, [fingerprint(&a.der), fingerprint(&b.der)]);
        assert_eq!(c.chain_root.len(), 32 * 3 - 1, "{}", c.chain_root);
    }

    #[test]
    fn an_answer_for_another_key_or_identity_is_refused_and_the_certificate_in_use_kept() {
        let a = Ca::new("root A");
        let store = IdentityStore::new().unwrap();
        let asked = "spiffe://cluster.local/ns/a/sa/b";
        let kept = a.install(&store, &a.pem);
        let id = || SanType::URI(asked.try_into().unwrap());
        let (chain, key) = a.issue(id(), -60, 3600);
        let key_der = |pem: &str| {
            rustls_pemfile::private_key(&mut pem.as_bytes())
                .unwrap()
                .unwrap()
        };
        // A chain for another key pair than the one the proxy generated.
        let (_, other_key) = a.issue(id(), -60, 3600);
        let e = store
            .install_for(Some(asked), &chain, key_der(&other_key), &a.pem)
            .err()
            .unwrap();
        assert!(matches!(e, CertError::KeyMismatch), "{e}");
        // A chain for another identity than the one asked for.
        let other = "spiffe://cluster.local/ns/a/sa/c";
        let (chain_c, key_c) = a.issue(SanType::URI(other.try_into().unwrap()), -60, 3600);
        let e = store
            .install_for(Some(asked), &chain_c, key_der(&key_c), &a.pem)
            .err()
            .unwrap();
        assert!(
            matches!(&e, CertError::WrongIdentity { got, want } if got == other && want == asked),
            "{e}"
        );
        let current = store.current().unwrap();
        assert!(
            Arc::ptr_eq(&current, &kept),
            "the certificate in use is kept"
        );
        // Its own key and identity: installed.
        let c = store
            .install_for(Some(asked), &chain, key_der(&key), &a.pem)
            .unwrap();
        assert_eq!(&*c.identity, asked);
    }

    #[test]
    fn a_certificate_whose_intermediate_ends_first_lasts_and_renews_by_the_intermediate() {
        let root = Ca::new("root A");
        // An intermediate valid for 10 minutes more, and a leaf from it for an hour: the
        // chain stops verifying with the intermediate.
        let issuer = root.intermediate("issuer", 600);
        let id = SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap());
        let (leaf, leaf_key) = issuer.issue(id, -60, 3600);
        let store = IdentityStore::new().unwrap();
        let c = store
            .install_pem(&format!("{leaf}{}", issuer.pem), &leaf_key, &root.pem)
            .unwrap();
        let ends = issuer.not_after();
        assert_eq!(c.not_after, ends, "the chain ends with its intermediate");
        let wait = c.renew_at().duration_since(SystemTime::now()).unwrap();
        assert!(
            wait > Duration::from_secs(385) && wait <= Duration::from_secs(450),
            "renews in {wait:?}, at 65–75 % of what the intermediate leaves"
        );
    }

    #[test]
    fn certificates_in_the_pem_but_off_the_verified_path_do_not_end_the_chain() {
        let root = Ca::new("root A");
        let issuer = root.intermediate("issuer", 1800);
        // Left in the PEM, each ending within 5 minutes: the intermediate the issuer
        // replaced (same name, same root, another key: it did not sign the leaf), and a CA
        // the chain has nothing to do with.
        let old_issuer = root.intermediate("issuer", 300);
        let unrelated = Ca::new("root B").intermediate("other", 240);
        let id = SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap());
        let (leaf, leaf_key) = issuer.issue(id, -60, 3600);
        let store = IdentityStore::new().unwrap();
        let c = store
            .install_pem(
                &format!("{leaf}{}{}{}", old_issuer.pem, issuer.pem, unrelated.pem),
                &leaf_key,
                &root.pem,
            )
            .unwrap();
        assert_eq!(
            c.not_after,
            issuer.not_after(),
            "the chain ends with the intermediate on its path"
        );
        assert_eq!(c.chain_root, fingerprint(&root.der));
    }

    #[test]
    fn of_two_copies_of_the_root_the_later_one_times_the_chain() {
        let root = Ca::new("root A");
        // The same root (name and key) as first issued, ending in 10 minutes, left in the
        // bundle before its re-issued copy.
        let mut params = root.params.clone();
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::seconds(600);
        let first = params.self_signed(&root.key).unwrap();
        let id = SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap());
        let (leaf, leaf_key) = root.issue(id, -60, 3600);
        let store = IdentityStore::new().unwrap();
        let c = store
            .install_pem(&leaf, &leaf_key, &format!("{}{}", first.pem(), root.pem))
            .unwrap();
        let left = c.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(
            left > Duration::from_secs(3000),
            "the leaf's end, not the old copy's: {left:?}"
        );
        assert_eq!(c.chain_root, fingerprint(&root.der), "the later copy");
    }

    #[test]
    fn a_copy_of_the_root_not_valid_yet_does_not_time_the_chain() {
        let root = Ca::valid_between("root A", -3600, 600);
        // The same root (name and key) re-issued ahead of the current copy's end, valid
        // from 5 minutes on for 10 hours: until it starts, the current copy ends the chain.
        let mut params = root.params.clone();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(300);
        params.not_after = now + time::Duration::seconds(36000);
        let next = params.self_signed(&root.key).unwrap();
        let id = SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap());
        let (leaf, leaf_key) = root.issue(id, -60, 3600);
        let store = IdentityStore::new().unwrap();
        let c = store
            .install_pem(&leaf, &leaf_key, &format!("{}{}", next.pem(), root.pem))
            .unwrap();
        assert_eq!(c.chain_root, fingerprint(&root.der), "the copy valid now");
        let left = c.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(
            left <= Duration::from_secs(600),
            "the current copy's end, not the re-issued one's: {left:?}"
        );
    }

    #[test]
    fn a_backdated_short_certificate_is_renewed_at_65_to_75_percent_of_what_is_left() {
        let a = Ca::new("root A");
        let store = IdentityStore::new().unwrap();
        // What the operator issues for a 1-minute lifetime: valid from 5 minutes ago.
        let id = SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap());
        let (chain, key) = a.issue(id, -300, 60);
        let c = store.install_pem(&chain, &key, &a.pem).unwrap();
        let wait = c.renew_at().duration_since(SystemTime::now()).unwrap();
        assert!(
            wait > Duration::from_secs(37) && wait <= Duration::from_secs(45),
            "renews in {wait:?}"
        );
    }

    #[test]
    fn proxies_given_the_same_chain_at_once_renew_at_different_times() {
        let a = Ca::new("root A");
        // Certificates capped at one issuer's end all end in the same second.
        let issuer = a.intermediate("issuer", 1000);
        let id = SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().unwrap());
        let (chain, key) = issuer.issue(id, -60, 3600);
        let chain = format!("{chain}{}", issuer.pem);
        let renewals: Vec<Duration> = (0..40)
            .map(|_| {
                let c = IdentityStore::new()
                    .unwrap()
                    .install_pem(&chain, &key, &a.pem)
                    .unwrap();
                let life = c.not_after.duration_since(c.installed_at).unwrap();
                let wait = c.renew_at().duration_since(c.installed_at).unwrap();
                assert!(
                    wait >= life.mul_f64(0.65) && wait <= life.mul_f64(0.75),
                    "{wait:?} of {life:?}"
                );
                wait
            })
            .collect();
        let first = renewals.iter().min().unwrap();
        let last = renewals.iter().max().unwrap();
        // 40 draws from 100 s of spread: all within 30 s of each other has a chance
        // below 1e-17.
        assert!(
            *last - *first > Duration::from_secs(30),
            "renewals spread over {:?}",
            *last - *first
        );
    }
}
