//! The operator's HTTPS servers (the injection webhook, the identity endpoint): TLS with
//! tokio-rustls, HTTP/2 or HTTP/1.1 by ALPN, bounded connections, graceful shutdown.
//!
//! ```text
//!  listener ─accept─▶ address's place (≤ max_connections_per_address, if set)
//!     └─▶ connection slot (≤ max_connections; either full: closed at once, counted)
//!     └─▶ TLS handshake (≤ 10 s) ─▶ hyper auto (h2 | http/1.1; headers ≤ 10 s) ─▶ Handler
//!     └─▶ no request in progress for IDLE_TIMEOUT (10 s: before the first, between them)
//!           ─▶ closed gracefully (GOAWAY / no keep-alive), dropped ≤ 1 s later
//!  shutdown ─▶ stop accepting ─▶ in-flight requests answered (≤ 5 s) ─▶ connections dropped
//! ```
//!
//! A connection holds its slot from accept to close, TLS handshake included, so a client
//! that connects and sends nothing holds one for at most 10 s (handshake) + 10 s (idle)
//! + 1 s (an HTTP/2 client that does not answer the close).

use std::{
    convert::Infallible,
    future::Future,
    net::{IpAddr, SocketAddr},
    num::NonZeroUsize,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, watch},
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::rate::{KeyedSlots, OwnedKeyedSlot};

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests may take to finish after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection closed for idleness may take to go: an HTTP/2 client answers
/// the GOAWAY's PING within a round trip. A request that slipped in before the GOAWAY
/// gets [`DRAIN_TIMEOUT`] more.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long an HTTP/1.1 client may take to send a request's headers (a client trickling
/// them would otherwise hold its connection open for ever).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may have no request in progress before it is closed: from the
/// end of its TLS handshake to its first request's head, and between requests. Without
/// it, a client that completes the handshake and sends nothing (hyper waits for the first
/// bytes to tell HTTP/2 from HTTP/1.1 without a timeout), or an idle HTTP/2 connection,
/// holds its slot for ever. Kubernetes' API server allows 32 s for a request head and
/// keeps idle connections 90 s; Weft's clients send one request per connection (proxies)
/// or reconnect cheaply (the API server calling the webhook), so 10 s is plenty.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections a server holds at once unless told otherwise (`--identity-max-connections`
/// for the identity endpoint): proxies hold one only while asking for a certificate, the
/// API server a few to the webhook; a few KiB to tens of KiB each.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// How often, at most, refused connections are logged (each is counted).
const REFUSED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How a server bounds its connections.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnLimits {
    /// Connections open at once (TLS handshakes included); more are closed as soon as
    /// accepted, and counted.
    pub max_connections: usize,
    /// Connections one client address holds at once, so that one client cannot take
    /// every slot; more from it are closed as soon as accepted, and counted. `None`: no
    /// bound per address.
    pub max_connections_per_address: Option<NonZeroUsize>,
    /// See [`IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: None,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

/// A server's connection counts; clones share them.
#[derive(Clone, Debug, Default)]
pub struct ConnMetrics {
    /// Connections open now.
    pub open: Gauge,
    /// Connections closed at accept because `max_connections` were open.
    pub refused: Counter,
    /// Connections closed at accept because their address held
    /// `max_connections_per_address`.
    pub refused_per_address: Counter,
    /// TLS handshakes that failed, by [`handshake_failure`] reason.
    pub handshake_failures: Family<ReasonLabel, Counter>,
}

/// The `reason` label of a failed TLS handshake.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// See [`handshake_failure`].
    pub reason: &'static str,
}

/// Why a TLS handshake failed, as a metric label: `timeout` (no handshake within
/// 10 s), `closed` (the client went away, as a TCP probe does),
/// `certificate` (the client refused this server's certificate, as one trusting another
/// root does, or a client certificate was refused or missing), `incompatible` (no
/// common TLS version, cipher suite or ALPN protocol: a client below TLS 1.3, say), or
/// `other` (not TLS, or a malformed message).
pub fn handshake_failure(error: &std::io::Error) -> &'static str {
    if let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        use rustls::AlertDescription as Alert;
        return match tls {
            rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
                "certificate"
            }
            // The client refused this server's certificate: it trusts another root (a
            // trust-root rotation gone wrong), or the certificate expired.
            rustls::Error::AlertReceived(
                Alert::BadCertificate
                | Alert::UnknownCA
                | Alert::CertificateUnknown
                | Alert::CertificateExpired
                | Alert::CertificateRevoked
                | Alert::UnsupportedCertificate
                | Alert::DecryptError,
            ) => "certificate",
            rustls::Error::PeerIncompatible(_)
            | rustls::Error::NoApplicationProtocol
            | rustls::Error::AlertReceived(
                Alert::ProtocolVersion | Alert::HandshakeFailure | Alert::NoApplicationProtocol,
            ) => "incompatible",
            _ => "other",
        };
    }
    match error.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::BrokenPipe => "closed",
        _ => "other",
    }
}

impl ConnMetrics {
    /// Registers `<prefix>_connections`, `<prefix>_connections_refused(_total)` and
    /// `<prefix>_tls_handshake_failures(_total){reason}`.
    pub fn register(&self, registry: &mut Registry, prefix: &str) {
        registry.register(
            format!("{prefix}_connections"),
            "Connections open (TLS handshakes included)",
            self.open.clone(),
        );
        registry.register(
            format!("{prefix}_connections_refused"),
            "Connections closed at accept because the server held as many as it may",
            self.refused.clone(),
        );
        registry.register(
            format!("{prefix}_tls_handshake_failures"),
            "TLS handshakes that failed, by reason: timeout, closed, certificate, incompatible, other",
            self.handshake_failures.clone(),
        );
    }

    /// Registers `<prefix>_connections_refused_per_address(_total)`, for a server whose
    /// [`ConnLimits`] may bound each address.
    pub fn register_per_address(&self, registry: &mut Registry, prefix: &str) {
        registry.register(
            format!("{prefix}_connections_refused_per_address"),
            "Connections closed at accept because their client address held as many as one may",
            self.refused_per_address.clone(),
        );
    }
}

/// Answers one request; `peer` is the client's address.
pub trait Handler: Send + Sync + 'static {
    /// The answer to `req`.
    fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;
}

/// Serves `handler` over TLS (`config`) on `listener` until `shutdown` completes, then
/// closes every connection gracefully: in-flight requests are answered, idle keep-alive
/// connections are closed so clients go elsewhere. `name` labels the logs. Connections are
/// bounded by `limits` and counted in `metrics`.
pub async fn serve_with<H: Handler>(
    name: &'static str,
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    handler: Arc<H>,
    limits: ConnLimits,
    metrics: ConnMetrics,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(config);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_address = limits
        .max_connections_per_address
        .map(|max| Arc::new(KeyedSlots::new(max)));
    let stop = CancellationToken::new();
    let mut refused = RefusedLog::default();
    let mut refused_per_address = RefusedLog::default();
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(server = name, %error, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Checked first, so that an address over its share never takes a server slot.
        let address_slot = match &per_address {
            None => None,
            Some(places) => {
                let address = peer.ip().to_canonical();
                match places.try_hold_owned(address) {
                    Some(place) => Some(place),
                    None => {
                        metrics.refused_per_address.inc();
                        if let Some(n) = refused_per_address.refused() {
                            tracing::warn!(
                                server = name,
                                refused = n,
                                latest = %address,
                                max_connections_per_address = places.max(),
                                "connections refused from addresses holding their share \
                                 (refused: since the last line, from any address; latest: \
                                 the address refused now)"
                            );
                        }
                        continue;
                    }
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closed before any TLS work: a flood of connections costs an accept each.
            metrics.refused.inc();
            if let Some(n) = refused.refused() {
                tracing::warn!(
                    server = name,
                    refused = n,
                    max_connections = limits.max_connections,
                    "connection limit reached: closing new connections"
                );
            }
            continue;
        };
        // Answers are small and latency-bound: do not let Nagle hold them back.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(server = name, %error, %peer, "setting TCP_NODELAY");
        }
        let conn = Connection {
            name,
            peer,
            acceptor: acceptor.clone(),
            idle_timeout: limits.idle_timeout,
            stop: stop.clone(),
            _slot: slot,
            _address_slot: address_slot,
            _open: Open::new(&metrics.open),
            handshake_failures: metrics.handshake_failures.clone(),
        };
        connections.spawn(conn.serve(tcp, handler.clone()));
        // Forget connections that have finished, so the set does not grow forever.
        while connections.try_join_next().is_some() {}
    }
    // Ask every connection to finish its in-flight requests and close, then drop any
    // that do not (or are still in their TLS handshake, holding no request).
    stop.cancel();
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            server = name,
            "connections still open after the drain timeout"
        );
    }
    connections.abort_all();
}

/// Spaces the logging of refused connections to at most one line every
/// [`REFUSED_LOG_INTERVAL`], which says how many.
#[derive(Default)]
struct RefusedLog {
    last: Option<Instant>,
    unlogged: u64,
}

impl RefusedLog {
    /// Counts one refusal; `Some(n)` when a line is due, `n` refusals since the last.
    fn refused(&mut self) -> Option<u64> {
        self.unlogged += 1;
        if self
            .last
            .is_some_and(|at| at.elapsed() < REFUSED_LOG_INTERVAL)
        {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// Counts one open connection in a gauge while it lives.
struct Open(Gauge);

impl Open {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Open(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts one request in progress on its connection while it lives (its handler's future
/// holds it, so a request whose client went away stops counting too).
struct Busy(Arc<watch::Sender<usize>>);

impl Busy {
    fn new(requests: &Arc<watch::Sender<usize>>) -> Self {
        requests.send_modify(|n| *n += 1);
        Busy(requests.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Completes once `requests` has stayed at zero for `timeout`.
async fn idle_for(requests: &mut watch::Receiver<usize>, timeout: Duration) {
    loop {
        if requests.wait_for(|n| *n == 0).await.is_err() {
            // The service is gone: so is the connection, which ends on its own.
            return std::future::pending().await;
        }
        match tokio::time::timeout(timeout, requests.changed()).await {
            Err(_) => return,
            Ok(Ok(())) => {}
            Ok(Err(_)) => return std::future::pending().await,
        }
    }
}

/// One accepted connection and what it holds.
struct Connection {
    name: &'static str,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    idle_timeout: Duration,
    stop: CancellationToken,
    /// Its place among the server's `max_connections`.
    _slot: OwnedSemaphorePermit,
    /// Its place among its address's `max_connections_per_address`, if bounded.
    _address_slot: Option<OwnedKeyedSlot<IpAddr>>,
    _open: Open,
    handshake_failures: Family<ReasonLabel, Counter>,
}

impl Connection {
    async fn serve<H: Handler>(self, tcp: TcpStream, handler: Arc<H>) {
        let (name, peer) = (self.name, self.peer);
        let tls = tokio::select! {
            () = self.stop.cancelled() => return,
            tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp)) => tls,
        };
        let tls = match tls {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                let reason = handshake_failure(&error);
                self.handshake_failures
                    .get_or_create(&ReasonLabel { reason })
                    .inc();
                tracing::debug!(server = name, %error, reason, %peer, "TLS handshake failed");
                return;
            }
            Err(_) => {
                self.handshake_failures
                    .get_or_create(&ReasonLabel { reason: "timeout" })
                    .inc();
                tracing::debug!(server = name, %peer, "TLS handshake timed out");
                return;
            }
        };
        let (requests, in_progress) = watch::channel(0usize);
        let requests = Arc::new(requests);
        let service = service_fn(move |req| {
            let handler = handler.clone();
            let busy = Busy::new(&requests);
            async move {
                let _busy = busy;
                Ok::<_, Infallible>(handler.handle(req, peer).await)
            }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT);
        builder.http2().timer(TokioTimer::new());
        let conn = builder.serve_connection(TokioIo::new(tls), service);
        tokio::pin!(conn);
        let mut idle_rx = in_progress.clone();
        let idle = idle_for(&mut idle_rx, self.idle_timeout);
        tokio::pin!(idle);
        // Set once the connection is asked to close: it is dropped if still open then.
        let mut closing: Option<tokio::time::Instant> = None;
        // Whether an idle close already gave a request that slipped in its time.
        let mut extended = false;
        loop {
            let deadline = closing.unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                ended = conn.as_mut() => {
                    if let Err(error) = ended {
                        tracing::debug!(server = name, %error, %peer, "connection ended with an error");
                    }
                    return;
                }
                () = self.stop.cancelled(), if closing.is_none() => {
                    conn.as_mut().graceful_shutdown();
                    closing = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                }
                () = &mut idle, if closing.is_none() => {
                    tracing::debug!(server = name, %peer, "closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    closing = Some(tokio::time::Instant::now() + IDLE_CLOSE_GRACE);
                }
                () = tokio::time::sleep_until(deadline), if closing.is_some() => {
                    if !extended && *in_progress.borrow() > 0 && !self.stop.is_cancelled() {
                        extended = true;
                        closing = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                        continue;
                    }
                    tracing::debug!(server = name, %peer, "dropping a connection that did not close");
                    return;
                }
            }
        }
    }
}
