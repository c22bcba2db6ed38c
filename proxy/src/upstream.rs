//! Connections to one endpoint: a connector with a connect timeout, and pooled HTTP
//! connections (HTTP/1 keep-alive, HTTP/2 multiplexed) that always dial that endpoint while
//! leaving `Host` / `:authority` as the client sent it.
//!
//! One [`Upstream`] lives in each endpoint's runtime state and survives config swaps that
//! keep the endpoint, so pooled connections are reused across reloads.
//!
//! To a meshed endpoint (mutual TLS), HTTP/1 requests share the HTTP/2 connection too
//! ([`crate::mux`]); only upgrades and `CONNECT` use the HTTP/1 pool there, unless the
//! proxy carries HTTP/1 in sessions of its own ([`crate::identity::Http1Transport`]).
//!
//! The endpoints of a service with a Breaker's connection-pool limits have pools of their
//! own, which share one [`ServicePool`]: `maxConnections` counts their connections (a
//! request finding none free waits, as one of at most `maxPendingRequests`, for an idle
//! connection or a free slot), and `maxRequestsPerConnection` retires a connection after
//! that many requests.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    net::{TcpSocket, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tracing::Instrument;

use crate::{
    breaker::{
        Overloaded, ServicePool,
        pool::{IdleConnections, Slot},
    },
    http::RequestHead,
    identity::{
        ClientTls, HandshakeError, Inner, TlsFailure,
        session::{PeerSession, SessionEvent, session_event},
    },
    metrics::Resends,
    shutdown::SESSION_END_GRACE,
};

/// The request body sent upstream: the client's, streamed, with its idle timeout.
pub type UpstreamBody = crate::http::RequestBody;

/// Why a TCP connection to an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The connect timeout elapsed.
    #[error("connect to {addr} timed out after {timeout:?}")]
    Timeout {
        /// The endpoint.
        addr: SocketAddr,
        /// The timeout that elapsed.
        timeout: Duration,
    },
    /// The connect failed, for example it was refused.
    #[error("connect to {addr}")]
    Io {
        /// The endpoint.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// The mutual TLS handshake with a meshed endpoint failed (never retried in plain
    /// text).
    #[error(transparent)]
    Tls(#[from] HandshakeError),
}

impl ConnectError {
    /// The TLS failure, if the handshake is what failed.
    pub fn tls_failure(&self) -> Option<TlsFailure> {
        match self {
            ConnectError::Tls(e) => Some(e.failure),
            _ => None,
        }
    }
}

/// A connection to an endpoint: plain TCP, or mutual TLS to a meshed endpoint.
#[derive(Debug)]
pub enum UpstreamIo {
    /// Plain TCP.
    Plain(TcpStream),
    /// Mutual TLS.
    Tls(Box<TlsIo>),
}

/// A mutual TLS connection to an upstream proxy, which its session's task may cut
/// ([`Cut`]).
#[derive(Debug)]
pub struct TlsIo {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    cut: Option<Arc<Cut>>,
}

impl Drop for TlsIo {
    fn drop(&mut self) {
        if let Some(cut) = &self.cut {
            cut.gone.notify_one();
        }
    }
}

/// How a session's task cuts an HTTP/2 connection that hyper drives in a task of its own
/// (so dropping hyper's handle does not close it), and learns when the connection is
/// gone: every read and write fails once [`Cut::sever`] has been called.
#[derive(Debug, Default)]
struct Cut {
    severed: AtomicBool,
    /// The task last left waiting on the socket, woken by [`Cut::sever`].
    waiting: atomic_waker::AtomicWaker,
    /// Notified when the connection's IO is dropped.
    gone: tokio::sync::Notify,
}

impl Cut {
    fn sever(&self) {
        self.severed.store(true, Ordering::Release);
        self.waiting.wake();
    }

    fn severed(&self) -> bool {
        self.severed.load(Ordering::Acquire)
    }

    /// `poll`, unless severed; a wait also leaves the task's waker for [`Cut::sever`].
    fn guard<T>(
        cut: Option<&Cut>,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let Some(cut) = cut else {
            return poll(cx);
        };
        if cut.severed() {
            return Poll::Ready(Err(severed()));
        }
        let polled = poll(cx);
        if polled.is_pending() {
            // Lock-free, and no clone while the task's waker stays the same: this is on
            // every read and write that waits.
            cut.waiting.register(cx.waker());
            // Severed in between: the waker above may have come too late to be woken.
            if cut.severed() {
                return Poll::Ready(Err(severed()));
            }
        }
        polled
    }
}

fn severed() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "mutual TLS session cut: still busy past its end's grace",
    )
}

impl UpstreamIo {
    /// Makes a mutual TLS connection cuttable by its session's task; none for plain TCP.
    fn cuttable(&mut self) -> Option<Arc<Cut>> {
        match self {
            UpstreamIo::Plain(_) => None,
            UpstreamIo::Tls(io) => Some(io.cut.get_or_insert_with(Arc::default).clone()),
        }
    }
}

impl tokio::io::AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Cut::guard(s.cut.as_deref(), cx, |cx| {
                Pin::new(&mut s.stream).poll_read(cx, buf)
            }),
        }
    }
}

impl tokio::io::AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Cut::guard(s.cut.as_deref(), cx, |cx| {
                Pin::new(&mut s.stream).poll_write(cx, buf)
            }),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Cut::guard(s.cut.as_deref(), cx, |cx| {
                Pin::new(&mut s.stream).poll_write_vectored(cx, bufs)
            }),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Cut::guard(s.cut.as_deref(), cx, |cx| {
                Pin::new(&mut s.stream).poll_flush(cx)
            }),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(&mut s.stream).poll_shutdown(cx),
        }
    }
}

/// Connects to `addr` (from `source` when given) and, for a meshed endpoint, runs the
/// mutual TLS handshake announcing `inner`; each step within `timeout`. A mutual TLS
/// connection comes with its session's life: the caller ends it when
/// [`PeerSession::ended`] says so.
pub async fn connect_io(
    addr: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
    tls: Option<&ClientTls>,
    inner: Inner,
) -> Result<(UpstreamIo, Option<PeerSession>), ConnectError> {
    let stream = connect_from(addr, source, timeout).await?;
    match tls {
        None => Ok((UpstreamIo::Plain(stream), None)),
        Some(tls) => {
            let trust = tls.trust_watch();
            let s = tls.handshake(stream, addr, inner, timeout).await?;
            let session = tls.peer_session(&s, trust);
            let io = TlsIo {
                stream: s,
                cut: None,
            };
            Ok((UpstreamIo::Tls(Box::new(io)), session))
        }
    }
}

/// Connects to one endpoint with a timeout.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    connect_from(addr, None, timeout).await
}

/// Connects to one endpoint with a timeout, from `source` (port chosen by the kernel) when
/// given. The inbound side dials the pod's own address from a loopback source, which the
/// redirect rules recognise and let through (see `docs/interception.md`).
pub async fn connect_from(
    addr: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let connecting = async {
        match source {
            None => TcpStream::connect(addr).await,
            Some(ip) => {
                let socket = if addr.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                // All hand-offs to the application leave from one source address: a port
                // picked at `bind` must be free for every destination, so ports left in
                // `TIME_WAIT` where the proxy closed first would run it out of ports.
                if let Err(error) = crate::sockopt::bind_address_no_port(&socket) {
                    tracing::debug!(%error, "IP_BIND_ADDRESS_NO_PORT not set");
                }
                socket.bind(SocketAddr::new(ip, 0))?;
                socket.connect(addr).await
            }
        }
    };
    match tokio::time::timeout(timeout, connecting).await {
        Err(_) => Err(ConnectError::Timeout { addr, timeout }),
        Ok(Err(source)) => Err(ConnectError::Io { addr, source }),
        Ok(Ok(stream)) => {
            // Small requests and responses must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    }
}

/// How long an upstream connection may sit unused before it is closed; never zero, since
/// a zero timer would fire again at once for as long as a request holds the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdleTimeout(Duration);

impl IdleTimeout {
    /// 90 s ([`crate::limits::DEFAULT_UPSTREAM_IDLE_TIMEOUT`] says why).
    pub const DEFAULT: IdleTimeout = IdleTimeout(Duration::from_secs(90));
    /// 1 s, for connections to the local application
    /// ([`crate::limits::DEFAULT_APP_IDLE_TIMEOUT`] says why).
    pub const APP_DEFAULT: IdleTimeout = IdleTimeout(Duration::from_secs(1));

    /// `timeout`, unless it is zero.
    pub const fn new(timeout: Duration) -> Option<IdleTimeout> {
        if timeout.is_zero() {
            None
        } else {
            Some(IdleTimeout(timeout))
        }
    }

    /// The timeout.
    pub const fn get(self) -> Duration {
        self.0
    }
}

impl Default for IdleTimeout {
    fn default() -> Self {
        IdleTimeout::DEFAULT
    }
}

/// What one endpoint's pools are built with: process limits (flags), the same for every
/// endpoint ([`crate::limits::Limits::upstream_pools`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolLimits {
    /// HTTP/1 connections to the endpoint at once.
    pub max_http1: usize,
    /// How long a connection may sit unused before it is closed.
    pub idle_timeout: IdleTimeout,
}

impl Default for PoolLimits {
    fn default() -> Self {
        PoolLimits {
            max_http1: crate::limits::DEFAULT_MAX_HTTP1_CONNECTIONS_PER_ENDPOINT,
            idle_timeout: IdleTimeout::DEFAULT,
        }
    }
}

/// The largest response head an HTTP/2 upstream (an application, or a peer proxy's mux)
/// may send, as HTTP/2 counts it (names and values plus 32 bytes a field). It is above
/// what hyper's HTTP/1 client reads (a 408 KiB buffer, 100 fields), so that a head the
/// proxy passes on over HTTP/1 is not refused when it crosses HTTP/2: hyper's own
/// default, 16 KiB, answered heads with large cookies or policies 502.
pub const MAX_RESPONSE_HEADER_LIST_SIZE: u32 = 512 * 1024;

/// Why a request could not be sent upstream or got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made, so nothing was sent (the request may go elsewhere).
    #[error("connect failed")]
    Connect {
        /// Whether the connect timeout elapsed (rather than, say, a refusal).
        timeout: bool,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
        /// The request, untouched, so that it can go to another endpoint without having
        /// been copied beforehand.
        unsent: Option<Box<http::Request<UpstreamBody>>>,
    },
    /// The endpoint has as many HTTP/1 connections as allowed and none is idle, so nothing
    /// was sent (the request may go elsewhere).
    #[error("the endpoint's HTTP/1 connection limit is reached")]
    ConnectionLimit {
        /// The request, untouched.
        unsent: Option<Box<http::Request<UpstreamBody>>>,
    },
    /// The connection broke or spoke invalid HTTP before a response.
    #[error("upstream request failed")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A connection-pool limit of the service's Breaker refused the request, so nothing
    /// was sent; the limit is the service's, so no other endpoint may take it either.
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
}

impl SendError {
    /// Whether nothing was sent because no connection could be made (including
    /// [`SendError::ConnectionLimit`]).
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            SendError::Connect { .. } | SendError::ConnectionLimit { .. }
        )
    }

    /// Whether nothing was sent because the endpoint's connection limit is reached.
    pub fn is_connection_limit(&self) -> bool {
        matches!(self, SendError::ConnectionLimit { .. })
    }

    /// Whether the connect timeout elapsed.
    pub fn is_connect_timeout(&self) -> bool {
        matches!(self, SendError::Connect { timeout: true, .. })
    }

    /// Whether an HTTP/2 upstream did not process the stream (RFC 9113 §8.7): it refused
    /// it (`REFUSED_STREAM`), or its `GOAWAY` named a last stream below it, or had already
    /// closed the connection to new streams when this one was to be opened.
    pub fn refused_stream(&self) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if let Some(h2) = e.downcast_ref::<h2::Error>()
                && (h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                    || (h2.is_go_away() && h2.is_remote()))
            {
                return true;
            }
            cause = e.source();
        }
        false
    }

    /// The request that was not sent because no connection could be made.
    pub fn take_unsent(&mut self) -> Option<http::Request<UpstreamBody>> {
        match self {
            SendError::Connect { unsent, .. } | SendError::ConnectionLimit { unsent } => {
                unsent.take().map(|r| *r)
            }
            SendError::Failed(_) | SendError::Overloaded(_) => None,
        }
    }

    fn with_unsent(mut self, req: http::Request<UpstreamBody>) -> Self {
        if let SendError::Connect { unsent, .. } | SendError::ConnectionLimit { unsent } = &mut self
        {
            *unsent = Some(Box::new(req));
        }
        self
    }
}

impl SendError {
    /// The TLS failure, if no connection could be made because the handshake failed.
    pub fn tls_failure(&self) -> Option<TlsFailure> {
        match self {
            SendError::Connect { source, .. } => source
                .downcast_ref::<ConnectError>()
                .and_then(ConnectError::tls_failure),
            _ => None,
        }
    }
}

impl From<ConnectError> for SendError {
    fn from(error: ConnectError) -> Self {
        SendError::Connect {
            timeout: matches!(error, ConnectError::Timeout { .. }),
            source: Box::new(error),
            unsent: None,
        }
    }
}

/// Pooled connections to one endpoint: HTTP/1.1 keep-alive connections ([`Http1Pool`]) and
/// one multiplexed HTTP/2 connection ([`Http2Conn`]).
#[derive(Clone, Debug)]
pub struct Upstream {
    /// The endpoint.
    pub addr: SocketAddr,
    /// The connect timeout the pools were built with.
    pub connect_timeout: Duration,
    http1: Arc<Http1Pool>,
    http2: Arc<Http2Conn>,
    tls: Option<Arc<ClientTls>>,
}

impl Upstream {
    /// Pools for `addr` within `limits`; no connection is made until a request needs one.
    pub fn new(addr: SocketAddr, connect_timeout: Duration, limits: PoolLimits) -> Self {
        Self::from_source(addr, None, connect_timeout, limits)
    }

    /// Pools as [`Upstream::new`] makes them, whose connections are made from `source`
    /// when given (see [`connect_from`]).
    pub fn from_source(
        addr: SocketAddr,
        source: Option<IpAddr>,
        connect_timeout: Duration,
        limits: PoolLimits,
    ) -> Self {
        Self::for_service(addr, source, connect_timeout, limits, None, None)
    }

    /// Pools as [`Upstream::from_source`] makes them, under the connection-pool limits of
    /// `service` when given (its pools must then serve that service alone), whose
    /// connections are mutual TLS when `tls` is given.
    pub fn for_service(
        addr: SocketAddr,
        source: Option<IpAddr>,
        connect_timeout: Duration,
        limits: PoolLimits,
        service: Option<Arc<ServicePool>>,
        tls: Option<Arc<ClientTls>>,
    ) -> Self {
        let http1 = Arc::new(Http1Pool {
            addr,
            source,
            tls: tls.clone(),
            connect_timeout,
            idle_timeout: limits.idle_timeout,
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(limits.max_http1.min(Semaphore::MAX_PERMITS))),
            service: service.clone(),
            closes_kept_alive: AtomicBool::new(false),
            learnt_idle: AtomicU64::new(0),
        });
        if let Some(s) = &service {
            let weak: Weak<dyn IdleConnections> = Arc::downgrade(&http1) as _;
            s.register(weak);
        }
        Upstream {
            addr,
            connect_timeout,
            http1,
            http2: Arc::new(Http2Conn {
                addr,
                source,
                tls: tls.clone(),
                connect_timeout,
                idle_timeout: limits.idle_timeout,
                current: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
                service,
                refuses: AtomicBool::new(false),
            }),
            tls,
        }
    }

    /// The mutual TLS this endpoint's connections use, if it is meshed.
    pub fn tls(&self) -> Option<&Arc<ClientTls>> {
        self.tls.as_ref()
    }

    /// Whether the endpoint's HTTP/2 connection has left a stream unprocessed (refused it,
    /// or went away without it), or the endpoint ended a connection in use by itself (its
    /// GOAWAY as it shuts down or after an idle timeout, or a close): a request to it may
    /// then keep a copy of its head, to go out again on a new connection should a stream
    /// be left unprocessed.
    pub fn refuses_streams(&self) -> bool {
        self.http2.refuses.load(Ordering::Relaxed)
    }

    /// A connection for opaque TCP: mutual TLS (announcing opaque bytes) when meshed, with
    /// its session's life, which the caller must close the connection at.
    pub async fn connect_opaque(&self) -> Result<(UpstreamIo, Option<PeerSession>), ConnectError> {
        connect_io(
            self.addr,
            None,
            self.connect_timeout,
            self.tls.as_deref(),
            Inner::Tcp,
        )
        .await
    }

    /// Sends a request over the pool matching its version. An HTTP/1 request must already
    /// be in the form an origin server expects (origin-form target, `Host` set), an
    /// HTTP/2 request must have an absolute URI; the returned [`Lease`] must be released
    /// once the response body has ended, to reuse its connection.
    ///
    /// To a meshed endpoint, HTTP/1 requests other than upgrades and `CONNECT` travel on
    /// the endpoint's one HTTP/2 connection too ([`crate::mux`]), and their responses come
    /// back as HTTP/1.1; a request not sent (connect failed) comes back in HTTP/1 form.
    /// With [`crate::identity::Http1Transport::Sessions`] they take the HTTP/1 pool, in
    /// TLS sessions of their own. An HTTP/1 request the pool sends again on another
    /// connection is counted in `resends`.
    pub async fn send(
        &self,
        mut req: http::Request<UpstreamBody>,
        resends: &Resends,
    ) -> Result<(http::Response<Incoming>, Option<Lease>), SendError> {
        if req.version() == http::Version::HTTP_2 {
            if self.tls.is_some() {
                // Only this proxy may say a request was HTTP/1.
                req.headers_mut().remove(crate::mux::ORIG_PROTO);
            }
            Ok((Http2Conn::send(&self.http2, req).await?, None))
        } else if self.tls.as_ref().is_some_and(|t| t.multiplexes_http1())
            && crate::mux::can_mux(&req)
        {
            let addr = self.addr;
            crate::mux::to_mux(&mut req, &|| crate::mux::authority_of(addr));
            match Http2Conn::send(&self.http2, req).await {
                Ok(mut resp) => {
                    crate::mux::response_to_http1(&mut resp);
                    Ok((resp, None))
                }
                Err(mut error) => {
                    // Another endpoint may take it, and may not be meshed.
                    if let Some(mut unsent) = error.take_unsent() {
                        crate::mux::restore(&mut unsent);
                        error = error.with_unsent(unsent);
                    }
                    Err(error)
                }
            }
        } else {
            let (resp, lease) = Http1Pool::send(&self.http1, req, resends).await?;
            Ok((resp, Some(lease)))
        }
    }
}

/// The one multiplexed HTTP/2 connection to an endpoint, shared by every HTTP/2 request to
/// it. It is made when a request needs it (one connect at a time; concurrent requests wait
/// for it), replaced once closed, and let go after its [`IdleTimeout`] without a new
/// request (hyper then closes it when its last stream ends).
#[derive(Debug)]
pub struct Http2Conn {
    addr: SocketAddr,
    source: Option<IpAddr>,
    tls: Option<Arc<ClientTls>>,
    connect_timeout: Duration,
    idle_timeout: IdleTimeout,
    current: Mutex<Option<Http2Shared>>,
    connecting: tokio::sync::Mutex<()>,
    service: Option<Arc<ServicePool>>,
    /// Set once a stream was left unprocessed, or the endpoint ended a connection in use
    /// by itself ([`Upstream::refuses_streams`]).
    refuses: AtomicBool,
}

#[derive(Clone, Debug)]
struct Http2Shared {
    sender: hyper::client::conn::http2::SendRequest<UpstreamBody>,
    last_used: Arc<IdleClock>,
    /// Streams opened on the connection, for `maxRequestsPerConnection`.
    streams: Arc<std::sync::atomic::AtomicU32>,
}

impl Http2Conn {
    async fn send(
        this: &Arc<Self>,
        mut req: http::Request<UpstreamBody>,
    ) -> Result<http::Response<Incoming>, SendError> {
        loop {
            let (mut shared, reused) = match this.shared() {
                Some(s) => (s, true),
                None => match this.connect().await {
                    Ok(connected) => connected,
                    Err(error) => return Err(error.with_unsent(req)),
                },
            };
            if shared.last_used.over() {
                // The session is retired or its peer chain no longer verifies (its task
                // may not have run yet): no new request on it.
                this.forget(&shared.last_used);
                if reused {
                    continue;
                }
                // A fresh one already ended raced a trust change; nothing was sent, so
                // the request may go elsewhere. One already retired (this proxy's
                // renewed certificate came during its handshake) is still good for the
                // request that opened it; the next takes a new session.
                if shared.last_used.ended() {
                    return Err(SendError::Connect {
                        timeout: false,
                        source: "the new session's peer certificate chain no longer verifies"
                            .into(),
                        unsent: Some(Box::new(req)),
                    });
                }
            }
            shared.last_used.idle();
            if let Some(max) = this
                .service
                .as_ref()
                .and_then(|s| s.spec().max_requests_per_connection)
            {
                // The connection's last request retires it, so the next one opens a
                // fresh connection while this one finishes its streams and closes.
                let n = shared
                    .streams
                    .fetch_add(1, Ordering::Relaxed)
                    .saturating_add(1);
                if n >= max.get() {
                    this.forget(&shared.last_used);
                }
                if n > max.get() {
                    continue;
                }
            }
            match shared.sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut error) => match error.take_message() {
                    // Not sent: the connection closed under us; a new one may take it.
                    Some(unsent) if reused => {
                        tracing::debug!(error = %error.error(), "http2 connection closed; retrying");
                        this.forget(&shared.last_used);
                        req = unsent;
                    }
                    _ => {
                        let error = error.into_error();
                        if went_away(&error) {
                            // The peer is going away (its shutdown, or the end of the
                            // session's certificate): the stream was refused unprocessed,
                            // and a retry of it must take a new session, not this one.
                            this.forget(&shared.last_used);
                        }
                        let failed = SendError::Failed(Box::new(error));
                        if failed.refused_stream() {
                            this.learn_refuses("left a stream unprocessed");
                        }
                        return Err(failed);
                    }
                },
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Http2Shared>> {
        self.current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The current connection, if it is open.
    fn shared(&self) -> Option<Http2Shared> {
        let mut current = self.lock();
        match current.as_ref() {
            Some(s) if !s.sender.is_closed() => Some(s.clone()),
            Some(_) => {
                *current = None;
                None
            }
            None => None,
        }
    }

    /// Notes that the endpoint leaves streams unprocessed, or may (`what` it did first).
    fn learn_refuses(&self, what: &'static str) {
        learn_once(
            &self.refuses,
            self.addr,
            what,
            "the endpoint ends HTTP/2 connections by itself: a request it leaves unprocessed will go out once more on a new connection",
        );
    }

    /// Whether the connection `clock` belongs to is the one new requests go on.
    fn is_current(&self, clock: &Arc<IdleClock>) -> bool {
        self.lock()
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(&s.last_used, clock))
    }

    /// Drops the connection `clock` belongs to as the current one, unless it was
    /// replaced already.
    fn forget(&self, clock: &Arc<IdleClock>) {
        let mut current = self.lock();
        if current
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(&s.last_used, clock))
        {
            *current = None;
        }
    }

    /// Connects, unless a concurrent request did so while this one waited its turn; the
    /// flag says whether the connection was made by someone else (and so may have closed).
    async fn connect(self: &Arc<Self>) -> Result<(Http2Shared, bool), SendError> {
        let _turn = self.connecting.lock().await;
        if let Some(s) = self.shared() {
            return Ok((s, true));
        }
        // HTTP/2 has one connection per endpoint: maxConnections caps the endpoints with
        // one, and a request at the cap is refused rather than queued behind another
        // endpoint's streams.
        let service_slot = match self.service.as_ref().map(|s| (s, s.try_connection())) {
            None => None,
            Some((_, Slot::Free(permit))) => permit,
            Some((s, Slot::Full)) => return Err(s.refuse_connection().into()),
        };
        let (mut stream, session) = connect_io(
            self.addr,
            self.source,
            self.connect_timeout,
            self.tls.as_deref(),
            // Both HTTP versions share it (see `crate::mux`).
            Inner::Mux,
        )
        .await?;
        let cut = session.as_ref().and_then(|_| stream.cuttable());
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_RESPONSE_HEADER_LIST_SIZE)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|error| SendError::Failed(Box::new(error)))?;
        let shared = Http2Shared {
            sender,
            last_used: Arc::new(IdleClock::new()),
            streams: Arc::default(),
        };
        if session.as_ref().is_some_and(PeerSession::has_ended) {
            shared.last_used.end_now();
        }
        let metrics = self.tls.as_ref().and_then(|t| t.metrics().cloned());
        let span = tracing::debug_span!("upstream", addr = %self.addr, protocol = "h2");
        tokio::spawn(
            run_http2_connection(
                conn,
                shared.last_used.clone(),
                self.idle_timeout,
                Arc::downgrade(self),
                service_slot,
                session.map(|s| (s, metrics)),
                cut,
            )
            .instrument(span),
        );
        *self.lock() = Some(shared.clone());
        Ok((shared, false))
    }
}

/// Sets `flag`, a habit of `endpoint` learnt from `what` it did; the first time, logs
/// `then`, what the proxy does about it from now on.
fn learn_once(flag: &AtomicBool, endpoint: SocketAddr, what: &'static str, then: &'static str) {
    if !flag.swap(true, Ordering::Relaxed) {
        tracing::info!(%endpoint, what, "{then}");
    }
}

/// Whether `error` says the HTTP/2 peer sent GOAWAY and left this stream out of it.
fn went_away(error: &hyper::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(h2) = e.downcast_ref::<h2::Error>()
            && h2.is_go_away()
            && h2.is_remote()
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// Drives one upstream HTTP/2 connection until it ends. After `idle_timeout` without a
/// new request it stops being the endpoint's shared connection; hyper then closes it
/// once its last stream (and its last sender) is gone.
///
/// A mutual TLS session (`session`: the session, the metrics its end counts into, and the
/// [`Cut`] of its connection) also stops being shared when it is retired or its peer's
/// chain stops verifying: new requests then open a new session (a fresh handshake), while
/// those on it finish, after its end for at most [`SESSION_END_GRACE`], after which it is
/// cut. hyper drives the connection in a task of its own, which outlives `conn` (done
/// once every sender is gone) while streams are open: so this task, which holds the
/// session, lasts until the connection's IO is dropped.
async fn run_http2_connection(
    conn: hyper::client::conn::http2::Connection<TokioIo<UpstreamIo>, UpstreamBody, TokioExecutor>,
    last_used: Arc<IdleClock>,
    idle_timeout: IdleTimeout,
    owner: Weak<Http2Conn>,
    // Held until the connection ends: it counts against the service's maxConnections.
    _service_slot: Option<OwnedSemaphorePermit>,
    session: Option<(PeerSession, Option<crate::metrics::TlsMetrics>)>,
    cut: Option<Arc<Cut>>,
) {
    // Dropped once done: hyper's connection task starts closing the connection only then.
    let mut conn = Some(Box::pin(conn));
    // The idle timer while shared; once the session has ended, its grace; once cut, the
    // wait for hyper to let the IO go.
    let idle_timeout = idle_timeout.get();
    let sleep = tokio::time::sleep(idle_timeout);
    tokio::pin!(sleep);
    let mut shared = true;
    let (mut session, metrics) = match session {
        Some((s, m)) => (Some(s), m),
        None => (None, None),
    };
    let unshare = |owner: &Weak<Http2Conn>| {
        if let Some(owner) = owner.upgrade() {
            owner.forget(&last_used);
        }
    };
    let (mut ended, mut retired) = (false, false);
    loop {
        tokio::select! {
            biased;
            () = io_gone(cut.as_deref()) => {
                record_unseen_end(&session, ended || retired, &last_used, metrics.as_ref());
                return;
            }
            result = dispatch(&mut conn) => {
                if let Err(error) = result {
                    tracing::debug!(%error, "upstream connection ended with an error");
                }
                if shared
                    && let Some(owner) = owner.upgrade()
                    && owner.is_current(&last_used)
                {
                    // Ended by the endpoint (its GOAWAY, or a close) while new requests
                    // still went on it: this proxy lets it go only once it stops being
                    // current. An endpoint that does so will one day leave a request
                    // unprocessed as the connection ends: learnt before that happens.
                    owner.learn_refuses("ended a connection in use by itself");
                }
                conn = None;
                if cut.is_none() {
                    record_unseen_end(&session, ended || retired, &last_used, metrics.as_ref());
                    return;
                }
                // Streams may still be open in hyper's connection task: the session goes
                // on until its IO is gone.
                shared = false;
                unshare(&owner);
            }
            event = session_event(&mut session), if !ended => {
                // Either way no new request goes on the session; the streams on it go on,
                // after its end for SESSION_END_GRACE at most.
                unshare(&owner);
                shared = false;
                match event {
                    SessionEvent::Retire => {
                        tracing::debug!("mutual TLS session retired: newer certificates to present");
                        last_used.retire_now();
                        retired = true;
                    }
                    SessionEvent::End(reason) => {
                        last_used.end_now();
                        if let Some(s) = &session {
                            s.record(reason, metrics.as_ref());
                        }
                        ended = true;
                        sleep.as_mut().reset(tokio::time::Instant::now() + SESSION_END_GRACE);
                    }
                }
            }
            () = sleep.as_mut(), if shared || ended => {
                if ended {
                    match cut.as_deref() {
                        Some(c) if !c.severed() => {
                            tracing::debug!("cutting a mutual TLS session still busy past its end's grace");
                            c.sever();
                            // A severed IO fails at hyper's next poll, which lets it go.
                            sleep.as_mut().reset(tokio::time::Instant::now() + CUT_WAIT);
                        }
                        _ => return,
                    }
                    continue;
                }
                let now = tokio::time::Instant::now();
                let since = last_used.idle_since().unwrap_or(now);
                if now.saturating_duration_since(since) >= idle_timeout {
                    unshare(&owner);
                    shared = false;
                } else {
                    sleep.as_mut().reset(since + idle_timeout);
                }
            }
        }
    }
}

/// How long a session's task waits for hyper to drop a connection it has cut, before it
/// stops waiting (the cut stands either way).
const CUT_WAIT: Duration = Duration::from_secs(5);

/// `conn` run to its end; never once it is gone.
async fn dispatch<F: Future + Unpin>(conn: &mut Option<F>) -> F::Output {
    match conn {
        Some(c) => c.await,
        None => std::future::pending().await,
    }
}

/// Waits until the IO `cut` guards is dropped; never without one.
async fn io_gone(cut: Option<&Cut>) {
    match cut {
        Some(c) => c.gone.notified().await,
        None => std::future::pending().await,
    }
}

/// Counts and logs the end of a session that closed before its task recorded the end:
/// one that had ended at its start ([`PeerSession::has_ended`]), which the request path
/// let go ([`IdleClock::over`]) and whose connection then finished first.
fn record_unseen_end(
    session: &Option<PeerSession>,
    recorded: bool,
    clock: &IdleClock,
    metrics: Option<&crate::metrics::TlsMetrics>,
) {
    if let Some(s) = session
        && !recorded
        && clock.over()
    {
        // Only an end at the start makes `over` true before the task has recorded one.
        s.record(s.due_reason(), metrics);
    }
}

/// HTTP/1.1 keep-alive connections to one endpoint.
///
/// A connection is lent to one request at a time and comes back ([`Lease::release`]) when
/// that request's response body has ended, provided its request body has been sent too;
/// a connection lent while either body still streams would hold the next request behind
/// it. Idle connections are reused most recently used first, and each closes itself after
/// its [`IdleTimeout`] unused.
///
/// Connections are bounded ([`crate::limits::Limits::max_http1_connections_per_endpoint`]):
/// each holds a permit of `slots` until its task ends, and a request finding no idle
/// connection and no permit fails at once with [`SendError::ConnectionLimit`] rather than
/// queueing (an HTTP/1 connection carries one request at a time, so the limit is the
/// endpoint's concurrency from this proxy).
///
/// This replaces hyper-util's general client, whose per-request work (pool keys from the
/// URI, the URI rewritten to origin-form, a spawned task per request to return the
/// connection) was a large share of the proxy's CPU time per request.
#[derive(Debug)]
pub struct Http1Pool {
    addr: SocketAddr,
    source: Option<IpAddr>,
    tls: Option<Arc<ClientTls>>,
    connect_timeout: Duration,
    idle_timeout: IdleTimeout,
    idle: Mutex<Vec<Lease>>,
    slots: Arc<Semaphore>,
    service: Option<Arc<ServicePool>>,
    /// Set once the endpoint has closed a kept-alive connection by itself, idle in the pool
    /// or under a request: from then on, a request that is safe to repeat keeps a copy of
    /// its head to go out again should its connection close as it goes out. An endpoint
    /// that never closes one costs no copy.
    closes_kept_alive: AtomicBool,
    /// How long a connection may sit idle before the endpoint closes it, as learnt from
    /// the shortest idle close it was seen to make (at least [`LEARNT_IDLE_FLOOR`]), less
    /// the margin of an announced one ([`usable_idle`]), in nanoseconds plus one; 0 while
    /// none was seen. Connections idle longer are not sent on, as for an announced timeout.
    learnt_idle: AtomicU64,
}

impl IdleConnections for Http1Pool {
    fn close_one_idle(&self) -> bool {
        // Dropping the lease drops the connection's only sender: hyper closes it, and its
        // task's end frees the slot.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop()
            .is_some()
    }
}

impl Http1Pool {
    async fn send(
        pool: &Arc<Self>,
        mut req: http::Request<UpstreamBody>,
        resends: &Resends,
    ) -> Result<(http::Response<Incoming>, Lease), SendError> {
        loop {
            let (mut lease, reused) = match pool.checkout().await {
                Some(lease) => (lease, true),
                None => match pool.connect_within_limits().await {
                    Ok(acquired) => acquired,
                    Err(error) => return Err(error.with_unsent(req)),
                },
            };
            lease.body = req.body().watch().cloned();
            // A kept-alive connection the application closes as the request goes out (its
            // idle timeout, or a close it did not announce) fails the request unanswered.
            // A request that is safe to repeat goes out again on another connection, as
            // RFC 9110 §9.2.2 allows and Go's client does, once the endpoint is known to
            // close kept-alive connections by itself (before, the copy would cost every
            // request for a race well-behaved applications never run); a fresh connection
            // failing is a real failure, answered as such.
            let head =
                (reused && pool.closes_kept_alive.load(Ordering::Relaxed) && replayable(&req))
                    .then(|| RequestHead::of(&req));
            match lease.sender.try_send_request(req).await {
                Ok(resp) => {
                    lease.uses = lease.uses.saturating_add(1);
                    return Ok((resp, lease));
                }
                Err(mut error) => match (error.take_message(), head) {
                    // Not sent: a reused connection closed under us (the server's idle
                    // timeout raced this request). Another connection may take it, as
                    // hyper-util's client does.
                    (Some(unsent), _) if reused => {
                        tracing::debug!(error = %error.error(), "idle connection closed; retrying");
                        pool.learn_closes_kept_alive(
                            "closed a kept-alive connection as a request went out",
                        );
                        resends.unwritten.inc();
                        req = unsent;
                    }
                    (None, head) if reused && closed_unanswered(error.error()) => {
                        pool.learn_closes_kept_alive(
                            "closed a kept-alive connection under a request",
                        );
                        let Some(head) = head else {
                            tracing::debug!(error = %error.error(), "kept-alive connection closed unanswered");
                            return Err(SendError::Failed(Box::new(error.into_error())));
                        };
                        tracing::debug!(error = %error.error(), method = %head.method(), "kept-alive connection closed unanswered; sending again");
                        resends.unanswered.inc();
                        req = head.request(bytes::Bytes::new());
                    }
                    _ => return Err(SendError::Failed(Box::new(error.into_error()))),
                },
            }
        }
    }

    /// Notes that the endpoint closes kept-alive connections by itself (`what` it did
    /// first).
    fn learn_closes_kept_alive(&self, what: &'static str) {
        learn_once(
            &self.closes_kept_alive,
            self.addr,
            what,
            "the endpoint closes kept-alive connections by itself: a request safe to repeat will go out again should its connection close as it goes out (an application keep-alive timeout longer than the proxy's idle timeout avoids the race)",
        );
    }

    /// Notes that the endpoint closed a connection idle for `after`: its idle timeout, as
    /// far as the pool can tell, so that connections idle that long (less a margin) are
    /// not sent on, and no request, safe to repeat or not, meets such a close again. A
    /// close after less than [`LEARNT_IDLE_FLOOR`] teaches only that the endpoint closes.
    fn learn_idle_timeout(&self, after: Duration) {
        if after < LEARNT_IDLE_FLOOR {
            return;
        }
        let usable = usable_idle(after);
        let nanos = u64::try_from(usable.as_nanos()).unwrap_or(u64::MAX - 1) + 1;
        // Only ever shorter, also when two connections' closes are learnt at once.
        let Ok(before) =
            self.learnt_idle
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |before| {
                    (before == 0 || nanos < before).then_some(nanos)
                })
        else {
            return;
        };
        // Once at info: later, shorter closes only refine it.
        if before == 0 {
            tracing::info!(
                endpoint = %self.addr,
                idle = ?after,
                reused_within = ?usable,
                "the endpoint closes connections idle this long: longer idle ones are not sent on"
            );
        } else {
            tracing::debug!(endpoint = %self.addr, idle = ?after, reused_within = ?usable, "shorter idle close");
        }
    }

    /// An idle connection that is (or becomes) ready for a request, if any.
    async fn checkout(&self) -> Option<Lease> {
        loop {
            let mut lease = self
                .idle
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .pop()?;
            if lease.sender.is_closed()
                || lease.clock.over()
                || lease.clock.past_server_idle()
                || lease.clock.idle_past(&self.learnt_idle)
            {
                if let Some(after) = lease.clock.closed_idle_after() {
                    // An endpoint that closes idle connections itself will one day close
                    // one just as a request goes out on it: learnt before that happens.
                    self.learn_closes_kept_alive("closed an idle kept-alive connection");
                    self.learn_idle_timeout(after);
                }
                // Dropped: an ended session closes with its only sender.
                continue;
            }
            // A connection released at the end of a response body becomes ready once its
            // task has finished that response, which is at most a poll away.
            if lease.sender.is_ready() || lease.sender.ready().await.is_ok() {
                lease.clock.busy();
                return Some(lease);
            }
        }
    }

    /// A new connection, or an idle one that a request waiting at the service's
    /// `maxConnections` was handed (the flag says which: true for a reused one).
    async fn connect_within_limits(self: &Arc<Self>) -> Result<(Lease, bool), SendError> {
        let Some(service) = &self.service else {
            return Ok((self.connect(None).await?, false));
        };
        let service_slot = match service.try_connection() {
            Slot::Free(permit) => permit,
            Slot::Full => {
                let _pending = service.enter_pending()?;
                loop {
                    // Registered before looking, so that a release in between wakes us.
                    let released = service.released().notified();
                    tokio::pin!(released);
                    released.as_mut().enable();
                    if let Some(lease) = self.checkout().await {
                        return Ok((lease, true));
                    }
                    if let Slot::Free(permit) = service.try_connection() {
                        break permit;
                    }
                    // Another endpoint's idle connection holds the slot this one needs.
                    service.close_one_idle();
                    tokio::select! {
                        permit = service.connection_freed() => break permit,
                        () = released => {}
                    }
                }
            }
        };
        Ok((self.connect(service_slot).await?, false))
    }

    async fn connect(
        self: &Arc<Self>,
        service_slot: Option<OwnedSemaphorePermit>,
    ) -> Result<Lease, SendError> {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return Err(SendError::ConnectionLimit { unsent: None });
        };
        let (stream, session) = connect_io(
            self.addr,
            self.source,
            self.connect_timeout,
            self.tls.as_deref(),
            Inner::Http1,
        )
        .await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|error| SendError::Failed(Box::new(error)))?;
        let clock = Arc::new(IdleClock::new());
        if session.as_ref().is_some_and(PeerSession::has_ended) {
            clock.end_now();
        }
        let metrics = self.tls.as_ref().and_then(|t| t.metrics().cloned());
        let span = tracing::debug_span!("upstream", addr = %self.addr);
        tokio::spawn(
            run_http1_connection(
                conn,
                clock.clone(),
                self.idle_timeout,
                (slot, service_slot),
                session.map(|s| (s, metrics)),
            )
            .instrument(span),
        );
        Ok(Lease {
            sender,
            clock,
            pool: Arc::downgrade(self),
            uses: 0,
            body: None,
        })
    }
}

/// Whether a request may go out again after its connection closed unanswered: a safe
/// method, or one carrying an idempotency key (as Go's client has it; other idempotent
/// methods are not, since applications often give `PUT` and `DELETE` side effects), with
/// no body to send.
fn replayable(req: &http::Request<UpstreamBody>) -> bool {
    use http_body::Body as _;
    (req.method().is_safe()
        || req.headers().contains_key("idempotency-key")
        || req.headers().contains_key("x-idempotency-key"))
        && req.body().is_end_stream()
}

/// Whether a sent request's connection ended before any answer: closed (cleanly, or with
/// a reset) rather than spoke invalid HTTP or timed out.
fn closed_unanswered(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() || error.is_canceled() || error.is_closed() {
        return true;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            );
        }
        cause = e.source();
    }
    false
}

/// Drives one upstream HTTP/1 connection until it ends, or until it has been idle in its
/// pool for `idle_timeout`.
///
/// A mutual TLS session (`session`, with the metrics its end counts into) is also
/// retired, or ends when its peer's chain stops verifying: closed then if unused;
/// otherwise its request finishes, its request body included when the answer came first
/// (the lease is not taken back, so the connection closes after it), after an end within
/// [`SESSION_END_GRACE`]. An upgraded connection (a tunnel) has left this task and is not
/// cut by it.
async fn run_http1_connection(
    conn: hyper::client::conn::http1::Connection<TokioIo<UpstreamIo>, UpstreamBody>,
    clock: Arc<IdleClock>,
    idle_timeout: IdleTimeout,
    // Held until the connection ends: it counts against the endpoint's limit (and the
    // service's maxConnections) till then.
    _slots: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
    session: Option<(PeerSession, Option<crate::metrics::TlsMetrics>)>,
) {
    // Upgrades (101 Switching Protocols) hand the socket to the request that asked.
    let conn = conn.with_upgrades();
    tokio::pin!(conn);
    let idle_timeout = idle_timeout.get();
    let sleep = tokio::time::sleep(idle_timeout);
    tokio::pin!(sleep);
    let (mut session, metrics) = match session {
        Some((s, m)) => (Some(s), m),
        None => (None, None),
    };
    let (mut ended, mut retired) = (false, false);
    loop {
        tokio::select! {
            biased;
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "upstream connection ended with an error");
                }
                if clock.unused() && !clock.past_server_idle() {
                    // Ended in the pool by the endpoint, before the idle timeout it
                    // announced, if any: this proxy lets a connection go from the branches
                    // below, or by dropping its lease.
                    clock.closed_idle();
                }
                record_unseen_end(&session, ended || retired, &clock, metrics.as_ref());
                return;
            }
            event = session_event(&mut session), if !ended => {
                // Either way the lease is not taken back: the request on the connection,
                // if any, finishes (after the session's end, within SESSION_END_GRACE),
                // including a request body still streaming after its answer.
                let reason = match event {
                    SessionEvent::Retire => {
                        tracing::debug!("mutual TLS session retired: newer certificates to present");
                        clock.retire_now();
                        retired = true;
                        None
                    }
                    SessionEvent::End(reason) => {
                        clock.end_now();
                        Some(reason)
                    }
                };
                if let (Some(s), Some(reason)) = (&session, reason) {
                    s.record(reason, metrics.as_ref());
                }
                if clock.unused() {
                    return;
                }
                if reason.is_some() {
                    ended = true;
                    sleep.as_mut().reset(tokio::time::Instant::now() + SESSION_END_GRACE);
                }
            }
            () = sleep.as_mut() => {
                if ended {
                    tracing::debug!("closing a mutual TLS session still busy past its end's grace");
                    return;
                }
                let now = tokio::time::Instant::now();
                match clock.idle_since() {
                    // A request body still streaming after its answer is the request's
                    // time, not idle time: the body's own idle timeout bounds it, and the
                    // connection closes after it (its lease was not taken back). Cut here,
                    // an upload outliving its early answer by the idle timeout was lost.
                    Some(_) if clock.draining() => sleep.as_mut().reset(now + idle_timeout),
                    Some(since) if now.saturating_duration_since(since) >= idle_timeout => {
                        tracing::debug!("closing idle upstream connection");
                        return;
                    }
                    Some(since) => sleep.as_mut().reset(since + idle_timeout),
                    None => sleep.as_mut().reset(now + idle_timeout),
                }
            }
        }
    }
}

/// When a pooled connection became idle (HTTP/1) or was last used (HTTP/2), shared between
/// the pool and the connection's task (which lets it go once idle too long) without a lock.
/// On tokio's clock, as the connection's timer is.
#[derive(Debug)]
struct IdleClock {
    base: tokio::time::Instant,
    /// Nanoseconds after `base` plus one when the connection became idle; 0 while lent.
    idle_since: AtomicU64,
    /// [`OPEN`], or [`RETIRED`] or [`ENDED`] once the connection's mutual TLS session is
    /// (its task saw the event, or trust changed during its handshake): checked before
    /// each request, one load. The outbound retirement's 2 s margin before the own
    /// certificate's end covers the moment until its task's timer runs.
    session: AtomicU8,
    /// Set when an HTTP/1 connection was let go while its request body still streams
    /// ([`Lease::release`]): idle to the pool's eyes, but not to be closed at its
    /// session's retirement, and given its end's grace.
    draining: AtomicBool,
    /// Set when an HTTP/1 connection ended while unused in its pool, not by this proxy
    /// (the endpoint closed, or reset, a kept-alive connection by itself), to how long it
    /// had been idle then, in nanoseconds plus one; 0 otherwise.
    closed_idle_after: AtomicU64,
    /// How long an HTTP/1 connection may sit idle before its server closes it, as the
    /// server announced (`Keep-Alive: timeout`) less a margin, in nanoseconds plus one; 0
    /// when it announced none.
    server_idle: AtomicU64,
}

impl IdleClock {
    fn new() -> Self {
        IdleClock {
            base: tokio::time::Instant::now(),
            idle_since: AtomicU64::new(0),
            session: AtomicU8::new(OPEN),
            draining: AtomicBool::new(false),
            closed_idle_after: AtomicU64::new(0),
            server_idle: AtomicU64::new(0),
        }
    }

    /// Let go by its request while that request's body still streams: idle to the pool,
    /// yet still carrying the body, which its idle timer leaves alone.
    fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.idle();
    }

    /// Idle with nothing on it: in the pool (or about to be closed).
    fn unused(&self) -> bool {
        self.idle_since().is_some() && !self.draining()
    }

    /// Let go while its request's body still streams ([`IdleClock::drain`]).
    fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The session has ended.
    fn end_now(&self) {
        self.session.store(ENDED, Ordering::Relaxed);
    }

    /// The session is retired (unless it has ended already).
    fn retire_now(&self) {
        self.session.fetch_max(RETIRED, Ordering::Relaxed);
    }

    /// Whether the session is retired or has ended: no new request may go on it.
    fn over(&self) -> bool {
        self.session.load(Ordering::Relaxed) != OPEN
    }

    /// Whether the session has ended: nothing more may go on it.
    fn ended(&self) -> bool {
        self.session.load(Ordering::Relaxed) == ENDED
    }

    fn busy(&self) {
        self.idle_since.store(0, Ordering::Relaxed);
    }

    fn idle(&self) {
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.idle_since.store(nanos + 1, Ordering::Relaxed);
    }

    /// Whether the connection has been idle for as long as its server said it would keep
    /// it (less the margin): sent on now, a request could meet the server's close.
    fn past_server_idle(&self) -> bool {
        self.idle_past(&self.server_idle)
    }

    /// Whether the connection has been idle for at least `limit` (nanoseconds plus one; 0:
    /// no limit). One load when there is none.
    fn idle_past(&self, limit: &AtomicU64) -> bool {
        match limit.load(Ordering::Relaxed) {
            0 => false,
            n => self
                .idle_since()
                .is_some_and(|since| since.elapsed() >= Duration::from_nanos(n - 1)),
        }
    }

    /// The connection ended while unused in its pool, not by this proxy.
    fn closed_idle(&self) {
        let idle = self
            .idle_since()
            .map_or(Duration::ZERO, |since| since.elapsed());
        let nanos = u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX - 1);
        self.closed_idle_after.store(nanos + 1, Ordering::Relaxed);
    }

    /// How long the connection had been idle when its endpoint closed it, if it did.
    fn closed_idle_after(&self) -> Option<Duration> {
        match self.closed_idle_after.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n - 1)),
        }
    }

    fn idle_since(&self) -> Option<tokio::time::Instant> {
        match self.idle_since.load(Ordering::Relaxed) {
            0 => None,
            n => Some(self.base + Duration::from_nanos(n - 1)),
        }
    }
}

/// How long before the idle timeout a server announced the pool stops sending on its
/// connection: a request must reach the server before its timer fires, over a network
/// and past a busy server's accept loop.
pub const SERVER_IDLE_MARGIN: Duration = Duration::from_secs(1);

/// The shortest idle close an endpoint's idle timeout is learnt from: a shorter one may be
/// a restart's or a shutdown's close of every connection, which says nothing of how long
/// the endpoint keeps them, and would stop the pool from reusing connections at all.
pub const LEARNT_IDLE_FLOOR: Duration = Duration::from_secs(1);

/// How long a connection whose server closes it after `timeout` idle may still be sent
/// on: `timeout` less [`SERVER_IDLE_MARGIN`], or half of a timeout shorter than twice it.
fn usable_idle(timeout: Duration) -> Duration {
    timeout.saturating_sub(SERVER_IDLE_MARGIN).max(timeout / 2)
}

/// [`IdleClock::session`]: a plain connection, or a mutual TLS session that goes on.
const OPEN: u8 = 0;
/// [`IdleClock::session`]: retired, so new requests take a new session; still valid.
const RETIRED: u8 = 1;
/// [`IdleClock::session`]: ended.
const ENDED: u8 = 2;

/// An HTTP/1 connection lent to one request.
#[derive(Debug)]
pub struct Lease {
    sender: hyper::client::conn::http1::SendRequest<UpstreamBody>,
    clock: Arc<IdleClock>,
    // Weak: a lease outliving its endpoint (removed from the config) just closes.
    pool: Weak<Http1Pool>,
    /// Requests sent on the connection, for `maxRequestsPerConnection`.
    uses: u32,
    /// The client's body of the request the connection carries, when it streams: the
    /// connection is busy until that body is all sent, whenever the response ends.
    body: Option<crate::http::BodyWatch>,
}

impl Lease {
    /// Notes the idle timeout the connection's server announced in its response
    /// (`Keep-Alive: timeout`): the pool sends nothing more on it once it has been idle
    /// that long less a margin ([`SERVER_IDLE_MARGIN`], or half of a shorter timeout), so
    /// no request meets the server's close, as Node.js's and undici's clients do. Without
    /// it a connection stays for the pool's own idle timeout.
    pub fn server_idle_timeout(&self, announced: Duration) {
        let usable = usable_idle(announced);
        let nanos = u64::try_from(usable.as_nanos()).unwrap_or(u64::MAX - 1);
        self.clock.server_idle.store(nanos + 1, Ordering::Relaxed);
    }

    /// Returns the connection to its pool; call only once the response body has ended
    /// (otherwise drop the lease, which closes the connection once the request is done).
    ///
    /// A connection whose request body is still streaming (the application answered
    /// before reading it all, as with an early `401`, `413` or `417`) is not returned: the
    /// next request would wait on it until that client finished its body, which may be
    /// never. Dropped, it closes once the body is sent (or cut), or, should neither the
    /// client finish nor the application read or close, when its idle timer
    /// ([`IdleTimeout`]) runs out, as for an idle pooled connection.
    pub fn release(self) {
        if self.sender.is_closed() || self.clock.over() {
            // An ended session is not taken back: dropped, it closes.
            return;
        }
        if self.body.as_ref().is_some_and(|b| !b.over()) {
            self.clock.drain();
            return;
        }
        if let Some(pool) = self.pool.upgrade() {
            if let Some(service) = &pool.service {
                if service
                    .spec()
                    .max_requests_per_connection
                    .is_some_and(|max| self.uses >= max.get())
                {
                    // Retired: dropped here, so hyper closes it and its slot frees.
                    return;
                }
                self.clock.idle();
                pool.idle
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(self);
                service.released().notify_waiters();
                return;
            }
            self.clock.idle();
            pool.idle
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(self);
        }
    }
}

#[cfg(test)]
mod tests {
    // Test code: a failed unwrap is a failed test.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use bytes::Bytes;
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
        sync::mpsc,
        time::Instant,
    };

    use super::*;

    /// A backend that reports each connection it accepts and, by the paused clock, when
    /// each one is closed by the proxy: HTTP/2 by hyper, HTTP/1 answering every request
    /// `200` with an empty body.
    async fn backend(http2: bool) -> (SocketAddr, mpsc::UnboundedReceiver<Event>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tx.send(Event::Accepted).unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    if http2 {
                        let service = hyper::service::service_fn(|_req| async {
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Empty::<Bytes>::new(),
                            ))
                        });
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tcp), service)
                            .await;
                    } else {
                        answer_http1(tcp).await;
                    }
                    let _ = tx.send(Event::Closed(Instant::now()));
                });
            }
        });
        (addr, rx)
    }

    #[derive(Debug)]
    enum Event {
        Accepted,
        Closed(Instant),
    }

    /// Answers each HTTP/1 request head on `tcp` until the client closes it.
    async fn answer_http1(mut tcp: TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                buf.drain(..end + 4);
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                if tcp.write_all(answer).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Sends one bodiless request to `upstream`, reads its response to the end and
    /// returns its connection to the pool.
    async fn get(upstream: &Upstream, version: http::Version) {
        let uri = if version == http::Version::HTTP_2 {
            format!("http://{}/", upstream.addr)
        } else {
            "/".to_owned()
        };
        let req = http::Request::builder()
            .version(version)
            .uri(uri)
            .header(http::header::HOST, upstream.addr.to_string())
            .body(UpstreamBody::buffered(Bytes::new()))
            .unwrap();
        let (resp, lease) = upstream.send(req, &Resends::default()).await.unwrap();
        assert_eq!(resp.status(), http::StatusCode::OK);
        resp.into_body().collect().await.unwrap();
        if let Some(lease) = lease {
            lease.release();
        }
    }

    /// A connection left unused in its pool is closed once its [`IdleTimeout`] has passed
    /// since its last request, and a request before then keeps it (the clock is paused: no
    /// real wait). The timeout is not the default, so that pools ignoring it would show.
    async fn an_unused_connection_closes_after_the_idle_timeout(version: http::Version) {
        const IDLE_TIMEOUT: Duration = Duration::from_secs(40);
        let (addr, mut events) = backend(version == http::Version::HTTP_2).await;
        let limits = PoolLimits {
            max_http1: 8,
            idle_timeout: IdleTimeout::new(IDLE_TIMEOUT).unwrap(),
        };
        let upstream = Upstream::new(addr, Duration::from_secs(1), limits);
        get(&upstream, version).await;
        assert!(matches!(events.recv().await, Some(Event::Accepted)));
        tokio::time::sleep(IDLE_TIMEOUT - Duration::from_secs(30)).await;
        get(&upstream, version).await;
        let last_used = Instant::now();
        let closed = tokio::time::timeout(IDLE_TIMEOUT * 3, events.recv())
            .await
            .expect("the idle connection is never closed");
        let Some(Event::Closed(at)) = closed else {
            panic!("{closed:?}: the second request did not reuse the first connection");
        };
        let idle = at - last_used;
        assert!(
            idle >= IDLE_TIMEOUT && idle < IDLE_TIMEOUT + Duration::from_secs(2),
            "{version:?}: closed {idle:?} after its last request, expected {IDLE_TIMEOUT:?}"
        );
        drop(upstream);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unused_http1_connection_closes_after_the_idle_timeout() {
        an_unused_connection_closes_after_the_idle_timeout(http::Version::HTTP_11).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_unused_http2_connection_closes_after_the_idle_timeout() {
        an_unused_connection_closes_after_the_idle_timeout(http::Version::HTTP_2).await;
    }
}
