//! Listeners: accept connections, work out where each one goes, detect its protocol, and
//! hand it to the HTTP or opaque-TCP path. Every server takes an already-bound listener
//! and a shutdown token (so tests bind `127.0.0.1:0`), and returns once it has stopped
//! accepting and every connection it accepted has finished.
//!
//! ```text
//!            ┌ Outbound: SO_ORIGINAL_DST ─▶ service claiming it? ─no──▶ opaque passthrough
//! accept ──▶ ┤                                   └yes─┐
//!            ├ Forward(name): the named service ──────┼─▶ opaque port/service? ─▶ opaque TCP
//!            └ Inbound: SO_ORIGINAL_DST ─▶ same ip:port ──┘        └no─▶ detect ─▶ HTTP/1, HTTP/2
//!                        (from 127.0.0.6 / ::6; 127.0.0.1:port for opted-in loopback ports)
//! ```
//!
//! Before the first config there is nothing to match against: transparent connections
//! are passed through as plain TCP or refused, as [`BeforeConfig`] says, and counted.
//! A connection's task lives as long as the connection, tunnels included (an HTTP/1
//! upgrade or `CONNECT` is spliced in the same task), so the listener's drain waits for all
//! of it.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    LocalPorts, Proxy,
    config::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_DETECT_TIMEOUT},
    detect::{self, PrefixedIo, Protocol},
    errors::ErrorCode,
    http::{HttpConn, HttpTarget},
    identity::{
        Inner,
        inbound::{self, InboundTls, SniffError, Sniffed},
        session::{PeerSession, session_end},
    },
    limits::Limit,
    metrics::{ConnectionGuard, Direction, ServiceLabel},
    orig_dst,
    store::{EndpointState, ServiceState, Snapshot},
    upstream,
};

/// What a listener does with the connections it accepts.
#[derive(Clone, Debug)]
pub enum ListenerKind {
    /// Transparent outbound (the application's connections, redirected by iptables).
    Outbound,
    /// Transparent inbound (other pods' connections to the application).
    Inbound,
    /// Non-transparent: every connection goes to the named service (outbound direction).
    Forward(Arc<str>),
    /// Non-transparent inbound: every connection goes to the application at this address,
    /// as the transparent inbound listener sends it (inbound direction: the workload's rate
    /// limit applies), for a workload whose traffic is not redirected by iptables.
    InboundTo(SocketAddr),
}

impl ListenerKind {
    fn direction(&self) -> Direction {
        match self {
            ListenerKind::Inbound | ListenerKind::InboundTo(_) => Direction::Inbound,
            _ => Direction::Outbound,
        }
    }
}

/// Accepts connections until `shutdown`, then waits for the accepted ones to finish.
/// HTTP connections finish their in-flight requests and close; upgraded connections,
/// `CONNECT` tunnels and opaque TCP connections run until either side closes (the caller
/// bounds the wait with its grace period).
pub async fn serve(
    listener: TcpListener,
    kind: ListenerKind,
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, ?kind, "listening");
    // One permit per open connection: past the limit a new connection is closed at once
    // (as Envoy's listener connection limit does) rather than left waiting in the backlog.
    let slots = Arc::new(Semaphore::new(
        proxy.limits.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    let limit = match kind.direction() {
        Direction::Inbound => Limit::InboundConnections,
        Direction::Outbound => Limit::OutboundConnections,
    };
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    proxy.metrics.limit_refused(limit);
                    tracing::debug!(%peer, "connection limit reached; closing");
                    drop(stream);
                    continue;
                };
                let span =
                    tracing::debug_span!("conn", %peer, direction = kind.direction().as_str());
                let accepted = span.in_scope(|| {
                    handle(stream, kind.clone(), proxy.clone(), shutdown.clone(), slot)
                });
                tracker.spawn(accepted.instrument(span));
            }
            Err(error) => {
                // Out of file descriptors and the like: back off briefly, keep serving.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    drop(listener);
    tracing::info!(?addr, open = tracker.len(), "stopped accepting; draining");
    tracker.close();
    tracker.wait().await;
    tracing::info!(?addr, "drained");
}

/// Plans one accepted connection and returns its task, which serves it until it ends;
/// `slot`, its place under the listener's connection limit, is given back then.
fn handle(
    stream: TcpStream,
    kind: ListenerKind,
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> Accepted {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    let direction = kind.direction();
    let guard = proxy.metrics.connection(direction);
    let plan = match proxy.store.load() {
        Some(snapshot) => plan(&snapshot, &kind, &stream, &proxy.local),
        None => plan_before_config(&proxy, &kind, &stream),
    };
    let Some(Plan {
        route,
        opaque,
        detect_timeout,
        connect_timeout,
    }) = plan
    else {
        return Accepted {
            stage: Stage::Done,
            _slot: slot,
        };
    };

    let io = CountingIo {
        inner: stream,
        guard,
    };
    let conn = Conn {
        route,
        detect_timeout,
        connect_timeout,
        proxy,
        direction,
        peer,
        shutdown,
    };
    let identity = match direction {
        Direction::Inbound => conn.proxy.identity.clone(),
        Direction::Outbound => None,
    };
    let stage = match identity {
        None => Stage::Serving(Box::pin(conn.serve(
            io,
            opaque.then_some(Protocol::Opaque),
            None,
            None,
        ))),
        Some(identity) => {
            // A peer proxy's mutual TLS and plain text share the port: the first bytes
            // tell.
            let handshake_timeout = detect_timeout.max(TLS_HANDSHAKE_TIMEOUT);
            // Before the handshake: a change of trust during it wakes the session at once.
            let trust = identity.trust_watch();
            let sniffing = identity.clone();
            let sniff = Box::pin(async move {
                inbound::sniff(io, &sniffing, detect_timeout, handshake_timeout).await
            });
            Stage::Sniffing(Box::new(Sniffing {
                sniff,
                conn,
                identity,
                trust,
                opaque,
            }))
        }
    };
    Accepted { stage, _slot: slot }
}

/// One accepted connection's task. Each stage is boxed where it starts and the task holds
/// only the box of the stage the connection is in: an idle connection keeps its HTTP
/// server and TLS session, not room for the handshake, detection, the other protocol's
/// server or what planned it (an `async fn` would keep every local it ever had, several
/// hundred bytes, for as long as the connection stays open).
struct Accepted {
    stage: Stage,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

enum Stage {
    /// Inbound with an identity: telling mutual TLS from plain text (and the handshake).
    Sniffing(Box<Sniffing>),
    Serving(Pin<Box<dyn Future<Output = ()> + Send>>),
    Done,
}

/// What an inbound connection needs once its first bytes have told what it carries.
struct Sniffing {
    sniff: Pin<Box<dyn Future<Output = Result<Sniffed<CountingIo>, SniffError>> + Send>>,
    conn: Conn,
    identity: Arc<crate::identity::IdentityStore>,
    trust: crate::identity::session::TrustWatch,
    opaque: bool,
}

impl Sniffing {
    /// How to serve the connection now that `sniffed` says what it carries; none when it
    /// is refused or gone.
    fn then(self, sniffed: Result<Sniffed<CountingIo>, SniffError>) -> Stage {
        let Sniffing {
            conn,
            identity,
            trust,
            opaque,
            ..
        } = self;
        let direction = conn.direction;
        match sniffed {
            Ok(Sniffed::Tls(tls, info)) => {
                conn.proxy.metrics.tls.session(direction, info.inner);
                tracing::debug!(client_identity = ?info.identity, inner = ?info.inner, "mutual TLS");
                let protocol = match info.inner {
                    _ if opaque => Some(Protocol::Opaque),
                    Some(Inner::Tcp) => Some(Protocol::Opaque),
                    Some(Inner::Http1) => Some(Protocol::Http1),
                    Some(Inner::H2 | Inner::Mux) => Some(Protocol::Http2),
                    None => None,
                };
                // The session lives while the client's chain verifies.
                let life = identity
                    .peer_session(direction, tls.get_ref().1.peer_certificates(), trust)
                    .map(Box::new);
                Stage::Serving(Box::pin(conn.serve(tls, protocol, Some(info), life)))
            }
            Ok(Sniffed::Plain { io, silent }) => {
                // A client that sent nothing within the detect timeout speaks second.
                let protocol = (opaque || silent).then_some(Protocol::Opaque);
                Stage::Serving(Box::pin(conn.serve(io, protocol, None, None)))
            }
            Err(SniffError::Refused { failure, source }) => {
                conn.proxy.metrics.tls.refused(direction, failure);
                tracing::info!(
                    peer = ?conn.peer,
                    reason = failure.as_str(),
                    error = %source,
                    "inbound TLS handshake refused"
                );
                Stage::Done
            }
            Err(SniffError::Io(error)) => {
                tracing::debug!(%error, "connection failed before its first bytes");
                Stage::Done
            }
        }
    }
}

impl Future for Accepted {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        // Bounded: at most one stage change per turn, and stages only move forward.
        loop {
            match &mut this.stage {
                Stage::Sniffing(s) => {
                    let sniffed = std::task::ready!(s.sniff.as_mut().poll(cx));
                    if let Stage::Sniffing(s) = std::mem::replace(&mut this.stage, Stage::Done) {
                        this.stage = s.then(sniffed);
                    }
                }
                Stage::Serving(serving) => {
                    std::task::ready!(serving.as_mut().poll(cx));
                    this.stage = Stage::Done;
                }
                Stage::Done => return Poll::Ready(()),
            }
        }
    }
}

/// The longest an inbound TLS handshake may take (at least the detect timeout).
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// One accepted connection, planned, waiting for its protocol.
struct Conn {
    route: Route,
    detect_timeout: Duration,
    connect_timeout: Duration,
    proxy: Arc<Proxy>,
    direction: Direction,
    peer: Option<SocketAddr>,
    shutdown: CancellationToken,
}

impl Conn {
    /// Detects the protocol unless known, and serves the connection; `tls` is the
    /// inbound mutual TLS session the bytes arrived in, if any, and `life` how long its
    /// client's certificate chain lets it live.
    async fn serve<I>(
        self,
        mut io: I,
        protocol: Option<Protocol>,
        tls: Option<InboundTls>,
        life: Option<Box<PeerSession>>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            route,
            detect_timeout,
            connect_timeout,
            proxy,
            direction,
            peer,
            shutdown,
        } = self;
        let (protocol, prefix) = match protocol {
            Some(p) => (p, bytes::Bytes::new()),
            // Boxed: its buffer and timer live only until the protocol is known.
            None => match Box::pin(detect::detect(&mut io, detect_timeout)).await {
                Ok(d) => d,
                Err(error) => {
                    tracing::debug!(%error, "connection failed during detection");
                    return;
                }
            },
        };
        tracing::debug!(?protocol, "detected");
        let io = PrefixedIo::new(prefix, io);

        match protocol {
            Protocol::Http1 | Protocol::Http2 => {
                let (target, fixed_label) = match route {
                    Route::Service(s, target) => (target, s.label.clone()),
                    Route::Addr(dial, label) => (
                        HttpTarget::Fixed(Arc::new(EndpointState::from_source(
                            dial.addr,
                            dial.source,
                            connect_timeout,
                            match direction {
                                Direction::Inbound => proxy.limits.app_pools(),
                                Direction::Outbound => proxy.limits.upstream_pools(),
                            },
                        ))),
                        label,
                    ),
                    Route::Missing(name) => (HttpTarget::Named(name.clone()), ServiceLabel(name)),
                    Route::Endpoint(e, label) => (HttpTarget::Fixed(e), label),
                };
                let conn = http_conn(&proxy, direction, target, fixed_label, peer, tls);
                match life {
                    None => crate::http::serve(io, protocol, conn, shutdown).await,
                    Some(life) => {
                        serve_http_session(io, protocol, conn, shutdown, *life, &proxy).await;
                    }
                }
            }
            Protocol::Opaque => {
                let identity = tls.as_ref().and_then(|t| t.identity.as_deref());
                if direction == Direction::Inbound
                    && !admit_opaque(&proxy, &route, tls.is_some(), identity)
                {
                    return;
                }
                let life = life.map(|l| *l);
                Box::pin(proxy_opaque(
                    io,
                    route,
                    connect_timeout,
                    &proxy,
                    direction,
                    life,
                ))
                .await
            }
        }
    }
}

/// The HTTP side of one accepted connection. Built here, not in [`Conn::serve`]: there
/// the value under construction (about 600 bytes) would keep its place in the
/// connection's future for as long as the connection stays open.
fn http_conn(
    proxy: &Proxy,
    direction: Direction,
    target: HttpTarget,
    fixed_label: ServiceLabel,
    peer: Option<SocketAddr>,
    tls: Option<InboundTls>,
) -> Arc<HttpConn> {
    let mut conn = HttpConn::new(
        proxy.store.clone(),
        proxy.metrics.clone(),
        direction,
        target,
        fixed_label,
        proxy.limits,
    );
    if let Some(peer) = peer {
        conn = conn.with_client(peer.ip());
    }
    if let Some(log) = proxy.access_log.get() {
        conn = conn.with_access_log(log.clone());
    }
    if let Some(tracer) = proxy.tracer.get() {
        conn.tracer = Some(tracer.clone());
    }
    conn.taps = Some(proxy.taps.clone());
    if let Some(tls) = tls {
        if tls.inner == Some(Inner::Mux) {
            conn = conn.with_mux();
        }
        conn = conn.with_tls(tls.identity);
    }
    Arc::new(conn)
}

/// Serves an HTTP connection that arrived in a mutual TLS session until it ends, or until
/// the client's certificate chain stops verifying (`life`): then, as at shutdown, hyper
/// stops it gracefully (HTTP/2: GOAWAY, streams in flight finish; HTTP/1: closed after
/// the response in progress), and whatever is still in flight
/// [`crate::shutdown::SESSION_END_GRACE`] later is cut.
///
/// Not an `async fn`: one would hold `life` twice (its argument and the local it moves
/// into), as long as the session lasts; the block uses its capture in place.
#[allow(clippy::manual_async_fn)]
fn serve_http_session<I>(
    io: I,
    protocol: Protocol,
    conn: Arc<HttpConn>,
    shutdown: CancellationToken,
    mut life: PeerSession,
    proxy: &Proxy,
) -> impl Future<Output = ()> + Send + '_
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async move {
        // A token of its own, cancelled by the proxy's shutdown or by this session's end.
        let stop = shutdown.child_token();
        let serving = crate::http::serve(io, protocol, conn, stop.clone());
        tokio::pin!(serving);
        let reason = tokio::select! {
            () = serving.as_mut() => return,
            reason = life.ended() => reason,
        };
        life.record(reason, Some(&proxy.metrics.tls));
        stop.cancel();
        if tokio::time::timeout(crate::shutdown::SESSION_END_GRACE, serving)
            .await
            .is_err()
        {
            tracing::debug!("closing a mutual TLS session still busy past its end's grace");
        }
    }
}

/// Whether an inbound opaque TCP connection from `identity` (over TLS: `tls`) to the
/// application may open
/// under the workload's mTLS mode and authorization; a refused one is closed, counted
/// (`weft_errors_total{reason}`, and `weft_authz_denials_total{policy}` for a Policy's
/// denial) and logged.
fn admit_opaque(proxy: &Proxy, route: &Route, tls: bool, identity: Option<&str>) -> bool {
    let Some(snapshot) = proxy.store.load() else {
        return true;
    };
    let config = &snapshot.config;
    if let Some(code) = crate::authz::mtls_refusal(config.inbound_mtls, tls, identity) {
        tracing::debug!(
            reason = code.as_str(),
            "opaque connection without a mesh identity closed: mTLS is strict"
        );
        proxy.metrics.error(Direction::Inbound, code);
        return false;
    }
    let Some(authz) = &config.authorization else {
        return true;
    };
    let port = match route {
        Route::Addr(dial, _) => dial.addr.port(),
        Route::Service(..) | Route::Missing(_) | Route::Endpoint(..) => 0,
    };
    match authz.decide(&crate::authz::Subject {
        identity,
        port,
        http: None,
    }) {
        crate::authz::Verdict::Allow => true,
        crate::authz::Verdict::DryRunDeny { policy } => {
            proxy.metrics.traffic.authz_dry_run(
                &ServiceLabel::local(),
                &policy,
                identity,
                None,
                None,
            );
            true
        }
        crate::authz::Verdict::Deny { policy } => {
            proxy
                .metrics
                .traffic
                .authz_denied(&policy, identity, None, None);
            proxy
                .metrics
                .error(Direction::Inbound, ErrorCode::Forbidden);
            false
        }
    }
}

/// Where one accepted connection goes and how it is handled, decided once at accept.
struct Plan {
    route: Route,
    /// Skip protocol detection and proxy bytes as they are.
    opaque: bool,
    detect_timeout: Duration,
    connect_timeout: Duration,
}

/// The plan for a connection under the active config; `None` closes the connection.
fn plan(
    snapshot: &Snapshot,
    kind: &ListenerKind,
    stream: &TcpStream,
    local: &LocalPorts,
) -> Option<Plan> {
    let config = &snapshot.config;
    let (route, opaque) = match kind {
        ListenerKind::Outbound => {
            let orig = original_dst(stream)?;
            match snapshot.service_for_addr(orig) {
                Some(svc) => (
                    Route::Service(svc.clone(), HttpTarget::ClusterAddr(orig)),
                    svc.spec.opaque || config.is_opaque_port(orig.port()),
                ),
                None => match snapshot.meshed_endpoint_for_addr(orig) {
                    // A meshed pod dialled by its address (a headless Service's name, a
                    // StatefulSet peer, the pod itself): mutual TLS, as to a service's
                    // endpoint, so that a `Strict` pod takes it. HTTP is detected as for
                    // the service, so the peer's per-request policy still applies.
                    // Its requests count under the config listing it (a Service's, or
                    // `pods.<namespace>`), not as passthrough: they are meshed traffic.
                    Some((svc, endpoint)) => (
                        Route::Endpoint(endpoint.clone(), svc.label.clone()),
                        svc.spec.opaque || config.is_opaque_port(orig.port()),
                    ),
                    // Nobody claims it: forward unchanged.
                    None => (
                        Route::Addr(Dial::direct(orig), ServiceLabel::passthrough()),
                        true,
                    ),
                },
            }
        }
        ListenerKind::Inbound => {
            let orig = original_dst(stream)?;
            let port = orig.port();
            (
                Route::Addr(inbound_target(orig, local), ServiceLabel::local()),
                config.is_opaque_port(port) || local.opaque.contains(port),
            )
        }
        ListenerKind::InboundTo(app) => (
            Route::Addr(Dial::direct(*app), ServiceLabel::local()),
            config.is_opaque_port(app.port()) || local.opaque.contains(app.port()),
        ),
        ListenerKind::Forward(name) => match snapshot.service_by_name(name) {
            Some(svc) => (
                Route::Service(svc.clone(), HttpTarget::Named(name.clone())),
                svc.spec.opaque,
            ),
            // Not (or no longer) configured: HTTP clients get a 503 with a reason per
            // request; opaque connections are closed.
            None => (Route::Missing(name.clone()), false),
        },
    };
    let connect_timeout = match &route {
        Route::Service(s, _) => s.spec.connect_timeout,
        Route::Addr(..) | Route::Missing(_) | Route::Endpoint(..) => config.connect_timeout,
    };
    Some(Plan {
        route,
        opaque,
        detect_timeout: config.detect_timeout,
        connect_timeout,
    })
}

/// The plan for a connection accepted before the first config: with
/// [`BeforeConfig::Passthrough`], transparent connections go where they were going, as
/// plain TCP (outbound to the original destination, inbound to the application), so a
/// sidecar that starts while the operator is unreachable does not cut its pod off the
/// network; with [`BeforeConfig::Refuse`] they are closed. Either way each one is counted,
/// and the first one logged. A forward listener's service is unknown without a config,
/// so its HTTP requests get 503 `service_not_found`, as when the service is missing.
fn plan_before_config(proxy: &Proxy, kind: &ListenerKind, stream: &TcpStream) -> Option<Plan> {
    let direction = kind.direction();
    let route = match kind {
        ListenerKind::Forward(name) => Route::Missing(name.clone()),
        ListenerKind::InboundTo(app) => {
            proxy
                .metrics
                .before_config(direction, proxy.before_config.as_str());
            if proxy.before_config == BeforeConfig::Refuse {
                return None;
            }
            Route::Addr(Dial::direct(*app), ServiceLabel::local())
        }
        ListenerKind::Outbound | ListenerKind::Inbound => {
            let orig = original_dst(stream)?;
            let action = proxy.before_config.as_str();
            proxy.metrics.before_config(direction, action);
            if !proxy.before_config_logged.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    setting = action,
                    "no config yet: connections are {} until the first config arrives \
                     (WEFT_BEFORE_CONFIG); counted in weft_before_config_connections_total",
                    match proxy.before_config {
                        BeforeConfig::Passthrough => "passed through unchanged",
                        BeforeConfig::Refuse => "refused",
                    }
                );
            }
            match (proxy.before_config, kind) {
                (BeforeConfig::Refuse, _) => {
                    tracing::debug!(%orig, "no config yet; refusing the connection");
                    return None;
                }
                (BeforeConfig::Passthrough, ListenerKind::Inbound) => {
                    tracing::debug!(%orig, "no config yet; forwarding to the application");
                    Route::Addr(inbound_target(orig, &proxy.local), ServiceLabel::local())
                }
                (BeforeConfig::Passthrough, _) => {
                    tracing::debug!(%orig, "no config yet; passing the connection through");
                    Route::Addr(Dial::direct(orig), ServiceLabel::passthrough())
                }
            }
        }
    };
    let opaque = !matches!(route, Route::Missing(_));
    Some(Plan {
        route,
        opaque,
        detect_timeout: DEFAULT_DETECT_TIMEOUT,
        connect_timeout: DEFAULT_CONNECT_TIMEOUT,
    })
}

/// What the transparent listeners do with the connections they accept before the proxy's
/// first config (the `WEFT_BEFORE_CONFIG` setting).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BeforeConfig {
    /// Outbound connections go to their original destination and inbound ones to the
    /// application, as plain TCP (no detection, no balancing): the pod keeps its network
    /// while the operator is unreachable. The default.
    #[default]
    Passthrough,
    /// Connections are closed (and counted) until a config arrives, for pods that must
    /// never carry traffic the mesh has not vetted.
    Refuse,
}

impl BeforeConfig {
    /// The setting's value, also the `action` label of its metric.
    pub const fn as_str(self) -> &'static str {
        match self {
            BeforeConfig::Passthrough => "passthrough",
            BeforeConfig::Refuse => "refuse",
        }
    }
}

impl std::fmt::Display for BeforeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `WEFT_BEFORE_CONFIG` value that is neither `passthrough` nor `refuse`.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a before-config behaviour; expected passthrough or refuse")]
pub struct BeforeConfigError(String);

impl std::str::FromStr for BeforeConfig {
    type Err = BeforeConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "passthrough" => Ok(BeforeConfig::Passthrough),
            "refuse" => Ok(BeforeConfig::Refuse),
            other => Err(BeforeConfigError(other.to_owned())),
        }
    }
}

/// The destination of one accepted connection.
enum Route {
    /// A configured service (and how its HTTP requests find it again per request).
    Service(Arc<ServiceState>, HttpTarget),
    /// A fixed address: passthrough, or the application in this pod.
    Addr(Dial, ServiceLabel),
    /// A meshed endpoint dialled by its own address, not a service's: over mutual TLS to
    /// the identity the config gives it (HTTP on the mux, else opaque bytes), labelled in
    /// metrics by the config that lists it.
    Endpoint(Arc<EndpointState>, ServiceLabel),
    /// A forward listener's service that is not in the config.
    Missing(Arc<str>),
}

fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    match orig_dst::original_dst(stream, local) {
        // A listener on `[::]` sees an IPv4 client at an IPv4-mapped address, while the
        // original destination is plain IPv4: both are the same address.
        Ok(orig)
            if orig.port() == local.port()
                && orig.ip().to_canonical() == local.ip().to_canonical() =>
        {
            // Dialled the proxy's own port directly: forwarding would loop.
            tracing::debug!(%orig, "connection was not redirected; closing");
            None
        }
        Ok(orig) => Some(orig),
        Err(error) => {
            tracing::debug!(%error, "no original destination; closing");
            None
        }
    }
}

/// The source address of the inbound side's connections to the pod's own IPv4 address.
/// `weft-proxy init` lets connections from it (and the proxy's UID) through, so they reach
/// the application instead of being redirected to the inbound listener again; the
/// application sees it as the peer, as with Istio's `127.0.0.6`.
pub const INBOUND_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// The same for IPv6: `::6`, which `weft-proxy init` adds to `lo` (IPv6 has no loopback
/// range, and `::1` as source would not hear the application's refusals), as Istio does.
pub const INBOUND_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// Where a connection to a fixed address goes, and from where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dial {
    /// The destination.
    pub addr: SocketAddr,
    /// The source address to dial from; `None` lets the kernel choose.
    pub source: Option<IpAddr>,
}

impl Dial {
    /// To `addr`, from wherever the kernel chooses.
    pub fn direct(addr: SocketAddr) -> Self {
        Dial { addr, source: None }
    }
}

/// The target of an inbound connection whose original destination was `orig`: that very
/// address (the pod's own), so that a peer reaches exactly what the application exposes
/// to the network and never a localhost-only listener; or loopback for the ports the pod
/// opted in to ([`LocalPorts::loopback`]).
pub fn inbound_target(orig: SocketAddr, local: &LocalPorts) -> Dial {
    let ip = orig.ip().to_canonical();
    if local.loopback.contains(orig.port()) {
        let lo = match ip {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        return Dial::direct(SocketAddr::new(lo, orig.port()));
    }
    let source = match ip {
        IpAddr::V4(_) => IpAddr::V4(INBOUND_SOURCE_V4),
        IpAddr::V6(_) => IpAddr::V6(INBOUND_SOURCE_V6),
    };
    Dial {
        addr: SocketAddr::new(ip, orig.port()),
        source: Some(source),
    }
}

/// Proxies bytes both ways; when one side shuts down its write half, the other side's
/// write half is shut down too (half-close), and the connection ends when both have.
///
/// A mutual TLS session on either side (`life` inbound, the upstream's outbound) is closed
/// when its peer's chain stops verifying: opaque bytes have no graceful end.
async fn proxy_opaque<I: AsyncRead + AsyncWrite + Unpin>(
    mut io: I,
    route: Route,
    connect_timeout: Duration,
    proxy: &Proxy,
    direction: Direction,
    life: Option<PeerSession>,
) {
    let (mut upstream, _in_flight, upstream_life) = match route {
        Route::Missing(name) => {
            tracing::debug!(service = %name, "service not in the config; closing");
            proxy.metrics.error(direction, ErrorCode::ServiceNotFound);
            return;
        }
        Route::Addr(dial, _) => {
            match upstream::connect_from(dial.addr, dial.source, connect_timeout).await {
                Ok(s) => (upstream::UpstreamIo::Plain(s), None, None),
                Err(error) => {
                    tracing::debug!(%error, "opaque connect failed");
                    proxy.metrics.error(direction, connect_code(&error));
                    return;
                }
            }
        }
        Route::Endpoint(endpoint, _) => {
            let in_flight = endpoint.start();
            match endpoint.upstream.connect_opaque().await {
                Ok((s, l)) => (s, Some(in_flight), l),
                Err(error) => {
                    endpoint.penalize();
                    tracing::debug!(%error, "opaque connect to a meshed endpoint failed");
                    if let Some(failure) = error.tls_failure() {
                        proxy.metrics.tls.refused(direction, failure);
                    }
                    proxy.metrics.error(direction, connect_code(&error));
                    return;
                }
            }
        }
        Route::Service(svc, _) => {
            let mut exclude = None;
            let mut connected = None;
            // A connect failure is retried once on another endpoint: nothing was sent yet.
            for _ in 0..2 {
                let Some((i, endpoint)) = svc.pick(exclude) else {
                    proxy.metrics.error(direction, ErrorCode::NoEndpoints);
                    return;
                };
                let in_flight = endpoint.start();
                match endpoint.upstream.connect_opaque().await {
                    Ok((s, l)) => {
                        connected = Some((s, Some(in_flight), l));
                        break;
                    }
                    Err(error) => {
                        endpoint.penalize();
                        tracing::debug!(%error, "opaque connect failed");
                        if let Some(failure) = error.tls_failure() {
                            proxy.metrics.tls.refused(direction, failure);
                        }
                        proxy.metrics.error(direction, connect_code(&error));
                        if svc.endpoints.len() < 2 {
                            break;
                        }
                        exclude = Some(i);
                    }
                }
            }
            match connected {
                Some(c) => c,
                None => return,
            }
        }
    };
    // At most one side is a mutual TLS session: inbound, the client's; outbound, the
    // endpoint's.
    let mut life = life.or(upstream_life);
    let spliced = tokio::select! {
        r = splice_until_idle(&mut io, &mut upstream, proxy.limits.opaque_idle_timeout) => r,
        reason = session_end(&mut life) => {
            if let Some(l) = &life {
                l.record(reason, Some(&proxy.metrics.tls));
            }
            return;
        }
    };
    match spliced {
        Ok(Some((up, down))) => tracing::debug!(up, down, "opaque connection closed"),
        Ok(None) => {
            proxy.metrics.limit_refused(Limit::OpaqueIdleTimeout);
            tracing::debug!("opaque connection idle; closed");
        }
        Err(error) => tracing::debug!(%error, "opaque connection ended with an error"),
    }
}

fn connect_code(error: &upstream::ConnectError) -> ErrorCode {
    match error {
        upstream::ConnectError::Timeout { .. } => ErrorCode::ConnectTimeout,
        upstream::ConnectError::Io { .. } => ErrorCode::ConnectFailed,
        upstream::ConnectError::Tls(e) => e.failure.code(),
    }
}

/// An accepted socket that counts its bytes into the connection's metrics.
struct CountingIo {
    inner: TcpStream,
    guard: ConnectionGuard,
}

impl AsyncRead for CountingIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.guard.read.inc_by(n as u64);
        }
        r
    }
}

impl AsyncWrite for CountingIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.guard.written.inc_by(*n as u64);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.guard.written.inc_by(*n as u64);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copies bytes both ways like [`tokio::io::copy_bidirectional`] (half-close included) until
/// both sides have closed, or until no byte has moved either way for `idle`: then it
/// returns `Ok(None)` and the caller drops both sockets.
pub async fn splice_until_idle<A, B>(
    a: &mut A,
    b: &mut B,
    idle: Duration,
) -> io::Result<Option<(u64, u64)>>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    // Reads bump a counter; a watcher samples it four times per period, so the connection
    // closes between `idle` and 1.25 × `idle` after its last byte, without reading the
    // clock per read.
    let moved = AtomicU64::new(0);
    let mut a = Activity {
        io: a,
        moved: &moved,
    };
    let mut b = Activity {
        io: b,
        moved: &moved,
    };
    let tick = (idle / 4).max(Duration::from_millis(1));
    let watch = async {
        let mut last = 0;
        let mut quiet = Duration::ZERO;
        loop {
            tokio::time::sleep(tick).await;
            let now = moved.load(Ordering::Relaxed);
            if now == last {
                quiet += tick;
                if quiet >= idle {
                    return;
                }
            } else {
                last = now;
                quiet = Duration::ZERO;
            }
        }
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut a, &mut b) => r.map(Some),
        () = watch => Ok(None),
    }
}

/// A socket whose reads count as activity for [`splice_until_idle`].
struct Activity<'a, T: ?Sized> {
    io: &'a mut T,
    moved: &'a AtomicU64,
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Activity<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Activity<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every open connection holds its task's future, which is as large as its largest
    /// state: each stage is boxed where it starts so that an idle connection does not
    /// carry room for the handshake, detection and both HTTP servers (22.9 KiB per
    /// connection before, see docs/benchmarks.md), nor what planned it (640 bytes as an
    /// `async fn`). The bound has room for small growth.
    #[tokio::test]
    async fn an_accepted_connections_task_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let proxy = Proxy::with_identity(
            crate::limits::Limits::default(),
            BeforeConfig::default(),
            LocalPorts::default(),
            Some(crate::identity::IdentityStore::new().unwrap()),
        );
        let task = handle(
            stream,
            ListenerKind::InboundTo(addr),
            proxy,
            CancellationToken::new(),
            Arc::new(tokio::sync::Semaphore::new(1))
                .try_acquire_owned()
                .unwrap(),
        );
        let size = std::mem::size_of_val(&task);
        assert!(size <= 64, "the connection task's future is {size} bytes");
    }

    #[test]
    fn before_config_parses_its_two_values_and_names_them_on_error() {
        for v in [BeforeConfig::Passthrough, BeforeConfig::Refuse] {
            assert_eq!(v.as_str().parse::<BeforeConfig>().ok(), Some(v));
        }
        assert_eq!(BeforeConfig::default(), BeforeConfig::Passthrough);
        let err = "Refuse".parse::<BeforeConfig>().unwrap_err().to_string();
        assert!(err.contains("passthrough or refuse"), "{err}");
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn inbound_goes_to_the_original_destination_from_a_loopback_source() {
        let local = LocalPorts::default();
        let t = inbound_target(addr("198.18.0.7:8080"), &local);
        assert_eq!(t.addr, addr("198.18.0.7:8080"));
        assert_eq!(t.source, Some(IpAddr::V4(INBOUND_SOURCE_V4)));
        // An IPv4 connection accepted on a dual-stack listener.
        let t = inbound_target(addr("[::ffff:198.18.0.7]:8080"), &local);
        assert_eq!(t.addr, addr("198.18.0.7:8080"));
        assert_eq!(t.source, Some(IpAddr::V4(INBOUND_SOURCE_V4)));
        let t = inbound_target(addr("[fd00::7]:8080"), &local);
        assert_eq!(t.addr, addr("[fd00::7]:8080"));
        assert_eq!(t.source, Some(IpAddr::V6(INBOUND_SOURCE_V6)));
    }

    #[test]
    fn opted_in_ports_go_to_loopback() {
        let local = LocalPorts {
            loopback: "9090".parse().unwrap(),
            ..LocalPorts::default()
        };
        let t = inbound_target(addr("198.18.0.7:9090"), &local);
        assert_eq!((t.addr, t.source), (addr("127.0.0.1:9090"), None));
        let t = inbound_target(addr("[fd00::7]:9090"), &local);
        assert_eq!((t.addr, t.source), (addr("[::1]:9090"), None));
        let t = inbound_target(addr("198.18.0.7:9091"), &local);
        assert_eq!(t.addr, addr("198.18.0.7:9091"));
    }
}
