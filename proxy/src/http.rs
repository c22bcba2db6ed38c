//! HTTP proxying, per request: each request on a downstream connection (HTTP/1.1 or
//! HTTP/2) resolves its service in the active snapshot, picks an endpoint, and is sent over
//! that endpoint's pool with the same HTTP version.
//!
//! ```text
//! downstream conn ──hyper server──▶ Request ──resolve (snapshot)──▶ ServiceState
//!      ──pick endpoint──▶ strip hop-by-hop ──▶ Upstream pool ──▶ Response (+ weft-error)
//! ```
//!
//! Before a request is proxied it is checked ([`check_request`]): the request-validity
//! rules a proxy must enforce (RFC 9112 §3.2 `Host`, RFC 9113 §8.3.1 `:authority`) and the
//! size limits of [`Limits`], in one pass over the header fields; what hyper's parsers
//! already refuse (conflicting `Content-Length`, `Transfer-Encoding` whose last coding is
//! not chunked, invalid field names and values) is not checked twice, what they let
//! through (`gzip, chunked`, `chunked` twice, an empty `Host`) is refused here.
//!
//! Failures the proxy answers itself carry a `weft-error` header ([`ErrorCode`]). Without a
//! Route's retry policy, a request whose connect failed (so it was never sent) goes to
//! another endpoint, at most twice; nothing else is retried.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    str::FromStr,
    sync::{Arc, Mutex, OnceLock},
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri, Version,
    header::{CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE},
    uri::{Authority, Scheme},
};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::{
    access_log::{self, AccessLog},
    detect::Protocol,
    errors::{ERROR_HEADER, ErrorCode},
    head_timer::{HeadTimer, HeadWatch, Watched},
    limits::{Limit, Limits},
    metrics::{ClientLabel, Direction, Metrics, RequestMetrics, ServiceLabel},
    pipeline::{Attempts, Exchange},
    store::{ConfigStore, EndpointState, InFlight, ServiceState, Snapshot},
    stream_idle::StreamExecutor,
    upstream::Lease,
};

/// The response body the proxy sends downstream: the upstream's, or its own error text.
pub type ProxyBody = Either<TrackedBody, Full<Bytes>>;

/// Where the requests of one downstream connection go.
#[derive(Debug)]
pub enum HttpTarget {
    /// The service with this name in the active config, resolved per request.
    Named(Arc<str>),
    /// The service claiming this address in the active config, resolved per request.
    ClusterAddr(SocketAddr),
    /// One fixed endpoint (the local application, for inbound traffic).
    Fixed(Arc<EndpointState>),
}

/// The header carrying a verified client's identity to the application (inbound).
pub const FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// What every request of one downstream connection shares.
#[derive(Debug)]
pub struct HttpConn {
    /// The active config.
    pub store: Arc<ConfigStore>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Inbound or outbound.
    pub direction: Direction,
    /// Where requests go.
    pub target: HttpTarget,
    /// Label used for `Fixed` targets.
    pub fixed_label: ServiceLabel,
    /// Limits on the connection and its requests.
    pub limits: Limits,
    /// The request series of `Fixed` targets, looked up on the connection's first request.
    fixed_metrics: OnceLock<RequestMetrics>,
    /// The tunnel an HTTP/1 request opened (an upgrade or a `CONNECT`), spliced by the
    /// connection's own task once hyper hands the socket over.
    pub(crate) tunnel: Mutex<Option<Tunnel>>,
    /// The client's address, which a per-client rate limit counts by.
    pub client: Option<std::net::IpAddr>,
    /// The client's mesh identity (SPIFFE ID) when the connection is mutual TLS with a
    /// verified client certificate; `None` for plain text (an unauthenticated client).
    pub client_identity: Option<Arc<str>>,
    /// `x-forwarded-client-cert` for [`Self::client_identity`], built once per connection
    /// rather than formatted on every request.
    forwarded_client_cert: Option<HeaderValue>,
    /// Where each request's access-log line goes, when the pod asked for them.
    pub access_log: Option<Arc<AccessLog>>,
    /// Whether the connection arrived over mutual TLS from a peer proxy (with or without
    /// a client certificate): a Strict policy refuses plain text.
    pub client_tls: bool,
    /// Whether the connection is a peer proxy's mux session ([`crate::mux`]): its HTTP/1
    /// requests, carried as HTTP/2, are restored to HTTP/1 before the application.
    pub mux: bool,
    /// The tracer, when the pod sends spans to a collector.
    pub tracer: Option<Arc<crate::trace::Tracer>>,
    /// The proxy's taps: while one is open, each request's line is offered to them.
    pub taps: Option<Arc<crate::tap::Taps>>,
}

impl HttpConn {
    /// What the requests of one connection to `target` share.
    pub fn new(
        store: Arc<ConfigStore>,
        metrics: Arc<Metrics>,
        direction: Direction,
        target: HttpTarget,
        fixed_label: ServiceLabel,
        limits: Limits,
    ) -> Self {
        HttpConn {
            store,
            metrics,
            direction,
            target,
            fixed_label,
            limits,
            fixed_metrics: OnceLock::new(),
            tunnel: Mutex::new(None),
            client: None,
            client_identity: None,
            forwarded_client_cert: None,
            access_log: None,
            client_tls: false,
            mux: false,
            tracer: None,
            taps: None,
        }
    }

    /// The same, writing an access-log line per request to `log`.
    pub fn with_access_log(mut self, log: Arc<AccessLog>) -> Self {
        self.access_log = Some(log);
        self
    }

    /// The same, for a client that presented mesh identity `identity` over mutual TLS.
    pub fn with_client_identity(mut self, identity: Arc<str>) -> Self {
        self.set_client_identity(Some(identity));
        self
    }

    /// The same, for a connection that arrived over mutual TLS, with the client's
    /// identity if it presented a certificate.
    pub fn with_tls(mut self, identity: Option<Arc<str>>) -> Self {
        self.client_tls = true;
        self.set_client_identity(identity);
        self
    }

    fn set_client_identity(&mut self, identity: Option<Arc<str>>) {
        self.forwarded_client_cert = identity
            .as_ref()
            .and_then(|id| HeaderValue::from_str(&format!("URI={id}")).ok());
        self.client_identity = identity;
    }

    /// The same, for a peer proxy's mux session (ALPN `weft-mux`).
    pub fn with_mux(mut self) -> Self {
        self.mux = true;
        self
    }

    /// The same, for a connection from `client`.
    pub fn with_client(mut self, client: std::net::IpAddr) -> Self {
        self.client = Some(client);
        self
    }

    /// Tells the application who called: `x-forwarded-client-cert: URI=<SPIFFE ID>`
    /// (Envoy's format) for a verified client. A header of that name that the client sent
    /// itself is removed on arrival, before the checks ([`HttpConn::handle_request`]), so
    /// the application can trust it; this one is added after them and after the
    /// hop-by-hop fields went, so that it neither pushes a request over a limit the client
    /// kept to nor can be named away by the client's `Connection`.
    fn forward_client_identity<B>(&self, req: &mut Request<B>) {
        if let Some(v) = &self.forwarded_client_cert {
            req.headers_mut().insert(FORWARDED_CLIENT_CERT, v.clone());
        }
    }

    pub(crate) fn tunnel_slot(&self) -> std::sync::MutexGuard<'_, Option<Tunnel>> {
        self.tunnel
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Removes `x-forwarded-client-cert` as a client sent it, and every field a CGI-style
/// server (WSGI, Rack, PHP and others that turn names into `HTTP_X_FORWARDED_CLIENT_CERT`)
/// would read as the same: the name with `_` in place of any `-`. One pass over the
/// names, no allocation unless such a field is there.
fn remove_forwarded_client_cert(headers: &mut HeaderMap) {
    headers.remove(FORWARDED_CLIENT_CERT);
    const OURS: &[u8] = b"x-forwarded-client-cert";
    let reads_as_it = |name: &HeaderName| {
        let name = name.as_str().as_bytes();
        name.len() == OURS.len()
            && name.contains(&b'_')
            && name
                .iter()
                .zip(OURS)
                .all(|(a, b)| a == b || (*a == b'_' && *b == b'-'))
    };
    while let Some(alias) = headers.keys().find(|n| reads_as_it(n)).cloned() {
        headers.remove(&alias);
    }
}

/// `Box::pin(make())`, but with the box allocated before `make` runs, so that the
/// future can be written straight into it: `Box::pin(future)` builds the future on the
/// stack and then copies all of it (the per-request future is about 9 KiB in a release
/// build) into the box, on every request.
#[inline(always)]
fn boxed_in_place<F, M: FnOnce() -> F>(make: M) -> Pin<Box<F>> {
    let slot = Box::new_uninit();
    Box::into_pin(Box::write(slot, make()))
}

/// Serves one downstream HTTP connection until it ends; on `shutdown`, finishes the
/// requests in flight and closes (HTTP/1: after the current response; HTTP/2: GOAWAY).
/// An HTTP/1 connection that switched protocols (`Upgrade`, `CONNECT`) is then spliced
/// to its upstream until either side closes: shutdown does not interrupt it, so draining
/// waits for it as for a request in flight (up to the grace period, when the process
/// exits).
pub async fn serve<I>(io: I, protocol: Protocol, conn: Arc<HttpConn>, shutdown: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = conn.clone();
    let limits = conn.limits;
    // A peer proxy's mux session carries the requests its application would have sent on
    // connections of their own: each session may hold as many at once as the listener
    // accepts connections (per session, not in all), not only the stream limit of one
    // client's HTTP/2 connection, or the requests past that limit would wait in the peer
    // for a stream to end (a long poll may hold one for minutes).
    let max_streams = if conn.mux {
        let per_listener = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
        limits.http2_max_concurrent_streams.max(per_listener)
    } else {
        limits.http2_max_concurrent_streams
    };
    let metrics = conn.metrics.clone();
    let direction = conn.direction;
    let svc = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        // Boxed so that hyper moves a pointer, not the whole request state, each time it
        // moves the future (into its dispatcher, and for HTTP/2 into a spawned task).
        boxed_in_place(move || async move { Ok::<_, Infallible>(conn.handle(req).await) })
    });
    // Set for HTTP/1: tells an idle close from a slow head.
    let mut head_watch = None;
    let result = match protocol {
        Protocol::Http2 => {
            let exec = StreamExecutor::default();
            let streams = exec.streams();
            let c = hyper::server::conn::http2::Builder::new(exec)
                .timer(TokioTimer::new())
                .max_concurrent_streams(max_streams)
                .max_header_list_size(limits.http2_header_list_size())
                .keep_alive_interval(limits.http2_keepalive_interval)
                .keep_alive_timeout(limits.http2_keepalive_timeout)
                .max_pending_accept_reset_streams(limits.http2_max_pending_accept_reset_streams)
                .max_local_error_reset_streams(limits.http2_max_local_error_reset_streams)
                .serve_connection(TokioIo::new(io), svc);
            // Boxed, as the HTTP/1 one below: the connection's task then holds only the
            // server of the version it speaks (each is several KiB), for as long as the
            // connection stays open.
            let mut c = Box::pin(c);
            tokio::select! {
                r = c.as_mut() => r,
                () = shutdown.cancelled() => {
                    c.as_mut().graceful_shutdown();
                    c.await
                }
                () = streams.idle(limits.http2_idle_timeout) => {
                    tracing::debug!(
                        timeout = ?limits.http2_idle_timeout,
                        "closing an idle http/2 connection"
                    );
                    c.as_mut().graceful_shutdown();
                    c.await
                }
            }
        }
        _ => {
            let watch = Arc::new(HeadWatch::default());
            let io = TokioIo::new(Watched::new(io, watch.clone()));
            let timer = HeadTimer::new(
                watch.clone(),
                limits.header_read_timeout,
                limits.http1_idle_timeout,
            );
            head_watch = Some(watch);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(timer)
                .header_read_timeout(limits.header_read_timeout)
                .max_header_size(limits.http1_hard_head_bytes())
                // A client that closes while its request waits for the answer cancels
                // it upstream (Linkerd, Envoy and nginx do the same). hyper's default:
                // shutting down only the sending side (`nc`) reads as the same end of
                // stream, so such a client gets no answer, as with those proxies.
                .half_close(false);
            // Above hyper's 100 the field array moves from the stack to the heap, which
            // costs every request: only then is it raised.
            if limits.max_request_headers_count > HYPER_H1_MAX_HEADERS {
                builder.max_headers(limits.max_request_headers_count);
            }
            let mut c = Box::pin(builder.serve_connection(io, svc).with_upgrades());
            tokio::select! {
                r = c.as_mut() => r,
                () = shutdown.cancelled() => {
                    c.as_mut().graceful_shutdown();
                    c.await
                }
            }
        }
    };
    if let Err(error) = result {
        // Refusals by hyper itself (it answered 400/414/431 or closed without a response):
        // counted here, the one place they become visible.
        let idle_expired = head_watch.as_ref().is_some_and(|w| w.idle_expired());
        if error.is_timeout() && !idle_expired {
            metrics.limit_refused(Limit::HeaderReadTimeout);
        } else if error.is_parse_too_large() {
            metrics.limit_refused(Limit::RequestHead);
            metrics.error(direction, ErrorCode::RequestHeadersTooLarge);
        } else if error.is_parse() {
            metrics.error(direction, ErrorCode::InvalidRequest);
        }
        tracing::debug!(%error, idle_expired, "http connection ended with an error");
    }
    // Taken out of the slot first: the guard must not be held across the splice.
    let tunnel = shared.tunnel_slot().take();
    if let Some(tunnel) = tunnel {
        // Boxed: the splice's state (both upgrades, the copy and its idle timer) is
        // needed by upgraded connections only, not held in every connection's task.
        Box::pin(tunnel.splice()).await;
    }
}

/// hyper's HTTP/1 default of header fields per request, kept on the stack.
const HYPER_H1_MAX_HEADERS: usize = 100;

/// Why a request was refused before being proxied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The answer.
    pub code: ErrorCode,
    /// The limit that bit, if a limit (rather than a validity rule) refused it.
    pub limit: Option<Limit>,
}

impl Refusal {
    const fn invalid() -> Self {
        Refusal {
            code: ErrorCode::InvalidRequest,
            limit: None,
        }
    }

    const fn limit(code: ErrorCode, limit: Limit) -> Self {
        Refusal {
            code,
            limit: Some(limit),
        }
    }
}

/// Checks a request the proxy is about to forward: sizes against `limits`, then
/// `Transfer-Encoding` (exactly one coding, `chunked`), then the `Host` rules. HTTP/1.1
/// (RFC 9112 §3.2): exactly one `Host`, with a valid, non-empty value (an HTTP/1.0
/// request may omit it). HTTP/2 (RFC 9113 §8.3.1): at most one `Host`, equal to
/// `:authority` when both are present. An absolute-form target's authority replaces
/// `Host` later ([`to_origin_form`]), as RFC 9112 §3.2.2 requires.
///
/// One pass over the fields, no allocation: this runs on every request.
pub fn check_request<B>(req: &Request<B>, limits: &Limits) -> Result<(), Refusal> {
    let uri = req.uri();
    let target = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.scheme_str().map_or(0, |s| s.len() + 3);
    if target > limits.max_request_target_bytes {
        return Err(Refusal::limit(
            ErrorCode::RequestTargetTooLong,
            Limit::RequestTargetBytes,
        ));
    }
    let headers = req.headers();
    if headers.len() > limits.max_request_headers_count {
        return Err(Refusal::limit(
            ErrorCode::RequestHeadersTooLarge,
            Limit::RequestHeadersCount,
        ));
    }
    let mut total = 0usize;
    let mut host = None;
    let mut hosts = 0u32;
    let mut codings = Codings::default();
    for (name, value) in headers {
        let line = name.as_str().len() + value.len();
        if line > limits.max_header_line_bytes {
            return Err(Refusal::limit(
                ErrorCode::RequestHeadersTooLarge,
                Limit::HeaderLineBytes,
            ));
        }
        total += line;
        if name == HOST {
            hosts += 1;
            host = Some(value);
        } else if name == TRANSFER_ENCODING {
            codings.add(value);
        }
    }
    if total > limits.max_request_headers_bytes {
        return Err(Refusal::limit(
            ErrorCode::RequestHeadersTooLarge,
            Limit::RequestHeadersBytes,
        ));
    }
    // hyper reads a body as chunked when the last coding is `chunked`, and would forward
    // the decoded bytes with the other codings (`gzip, chunked`) or a second `chunked`
    // silently dropped, since the proxy redoes the framing per hop: a body another hop
    // would read differently. RFC 9112 §6.1 lets a server refuse a coding it does not
    // understand (501; nginx and Envoy do), and forbids applying `chunked` twice.
    if !codings.carried() {
        return Err(Refusal::invalid());
    }
    // A target's userinfo (`http://user@cart/`) is deprecated and refused by recipients
    // (RFC 9110 §4.2.4, RFC 9113 §8.3.1); it would become `Host` or `:authority`.
    if hosts > 1 || uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(Refusal::invalid());
    }
    match host {
        Some(h) if !valid_host(h.as_bytes()) => return Err(Refusal::invalid()),
        None if req.version() == Version::HTTP_11 => return Err(Refusal::invalid()),
        Some(h) if req.version() == Version::HTTP_2 => {
            if let Some(authority) = uri.authority()
                && !authority
                    .as_str()
                    .as_bytes()
                    .eq_ignore_ascii_case(h.as_bytes())
            {
                return Err(Refusal::invalid());
            }
        }
        _ => {}
    }
    Ok(())
}

/// The transfer codings a message's `Transfer-Encoding` fields name, as far as the proxy
/// cares: it re-frames every body per hop, so it can carry a message whose only coding is
/// one `chunked` (or none), and no other.
#[derive(Debug, Default)]
pub(crate) struct Codings {
    chunked: u32,
    other: bool,
}

impl Codings {
    /// Adds one field value's codings (RFC 9110 §5.6.1: empty list elements are ignored).
    pub(crate) fn add(&mut self, value: &HeaderValue) {
        for coding in value.as_bytes().split(|&b| b == b',') {
            match coding.trim_ascii() {
                b"" => {}
                c if c.eq_ignore_ascii_case(b"chunked") => self.chunked += 1,
                _ => self.other = true,
            }
        }
    }

    /// The codings of every `Transfer-Encoding` field in `headers`.
    pub(crate) fn of(headers: &HeaderMap) -> Codings {
        let mut codings = Codings::default();
        for value in headers.get_all(TRANSFER_ENCODING) {
            codings.add(value);
        }
        codings
    }

    /// Whether the body can go on with its meaning intact once hyper has decoded the
    /// final `chunked` and the next hop frames it anew: no other coding (whose mention
    /// would be lost), and `chunked` at most once (RFC 9112 §6.1 forbids applying it twice).
    pub(crate) fn carried(&self) -> bool {
        !self.other && self.chunked <= 1
    }
}

/// Whether a `Host` value is `uri-host [ ":" port ]` (RFC 9110 §7.2): registered-name,
/// IPv4 or bracketed IP-literal characters only; no userinfo, no whitespace, no path. The
/// empty value is not: it stands for a target without an authority, and an `http` target
/// has one (RFC 9110 §4.2.1: a recipient rejects an empty host), so the request would
/// reach the application with no authority, or with the endpoint's address in
/// `:authority` across the mux (nginx refuses it too).
fn valid_host(value: &[u8]) -> bool {
    !value.is_empty()
        && value.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b':'
                        | b'['
                        | b']'
                )
        })
}

enum Dest {
    /// A service of the active snapshot (kept, since Route backends are its services).
    Service(Arc<Snapshot>, Arc<ServiceState>),
    Fixed(Arc<EndpointState>),
}

impl HttpConn {
    /// Where this request goes, in the active snapshot; on failure, the error and the label
    /// to count it under.
    fn resolve(&self) -> Result<Dest, (ErrorCode, ServiceLabel)> {
        let snapshot = self.store.load();
        let found = match &self.target {
            HttpTarget::Fixed(e) => return Ok(Dest::Fixed(e.clone())),
            HttpTarget::Named(name) => snapshot
                .as_ref()
                .and_then(|s| s.service_by_name(name).cloned())
                .ok_or_else(|| (ErrorCode::ServiceNotFound, ServiceLabel(name.clone()))),
            HttpTarget::ClusterAddr(addr) => snapshot
                .as_ref()
                .and_then(|s| s.service_for_addr(*addr).cloned())
                .ok_or_else(|| (ErrorCode::ServiceNotFound, ServiceLabel::unknown())),
        }?;
        match snapshot {
            Some(snapshot) => Ok(Dest::Service(snapshot, found)),
            None => Err((ErrorCode::ServiceNotFound, ServiceLabel::unknown())),
        }
    }

    fn request_metrics<'a>(&'a self, dest: &'a Dest) -> &'a RequestMetrics {
        match dest {
            Dest::Service(_, s) => s.request_metrics(&self.metrics, self.direction),
            Dest::Fixed(_) => {
                self.fixed_metrics
                    .get_or_init(|| match (self.direction, &self.client_identity) {
                        (Direction::Inbound, Some(id)) => self.metrics.for_client_requests(
                            &self.fixed_label,
                            ClientLabel::identified(id.clone()),
                        ),
                        _ => self.metrics.for_requests(self.direction, &self.fixed_label),
                    })
            }
        }
    }

    fn fallback_authority(&self) -> Option<Authority> {
        match &self.target {
            HttpTarget::Named(n) => Authority::from_str(n).ok(),
            HttpTarget::ClusterAddr(a) => Authority::from_str(&a.to_string()).ok(),
            HttpTarget::Fixed(e) => Authority::from_str(&e.addr.to_string()).ok(),
        }
    }

    /// Proxies one request: the checks every request gets, then the stages of
    /// [`crate::pipeline`]; with an access log, one line per request once its response
    /// body has been sent (or its client went away); with a tracer, the request carries
    /// this hop's trace context upstream and, when sampled, one span per request ends
    /// with its response body.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let observed = self.access_log.is_some()
            || self.tracer.is_some()
            || self.taps.as_ref().is_some_and(|t| t.active());
        let mut resp = if observed {
            self.handle_observed(req).await
        } else {
            self.handle_request(req, None).await
        };
        // A proxy answers in its own HTTP version (RFC 9110, section 6.2): an HTTP/1.0
        // application's answer reaches an HTTP/1.1 client as HTTP/1.1, so a body of
        // unknown length is chunked on a connection that stays open, rather than ended by
        // closing it. hyper still answers an HTTP/1.0 client in HTTP/1.0.
        if resp.version() == Version::HTTP_10 {
            *resp.version_mut() = Version::HTTP_11;
        }
        resp
    }

    /// [`HttpConn::handle`] with an access log, a tracer or a tap open.
    async fn handle_observed(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let taps = self.taps.as_ref().filter(|t| t.active()).cloned();
        let started = Instant::now();
        let now = std::time::SystemTime::now();
        let mut trail = access_log::Trail::default();
        let hop = self.tracer.as_ref().map(|tracer| {
            let (incoming, hop) = tracer.begin(req.headers());
            trail.propagate = Some(crate::trace::Propagate { incoming, hop });
            hop
        });
        let uri = req.uri();
        let authority = || {
            uri.authority()
                .map(|a| a.as_str().to_owned())
                .or_else(|| {
                    req.headers()
                        .get(HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_owned)
                })
                .unwrap_or_default()
        };
        let span = match (&self.tracer, hop) {
            (Some(tracer), Some(hop)) if hop.sampled => {
                trail.events = Some(Vec::new());
                Some(crate::trace::OpenSpan::new(
                    tracer.clone(),
                    hop,
                    self.direction,
                    now,
                    started,
                    req.method().clone(),
                    authority(),
                    uri.path().to_owned(),
                ))
            }
            _ => None,
        };
        let line = (self.access_log.is_some() || taps.is_some()).then(|| {
            let entry = access_log::Entry {
                start: access_log::Timestamp(now),
                direction: self.direction.as_str(),
                source_identity: self.client_identity.clone(),
                source_addr: self.client,
                method: req.method().to_string(),
                authority: authority(),
                path: uri.path().to_owned(),
                trace_id: match hop {
                    Some(hop) => Some(hop.trace_id.to_hex()),
                    None => access_log::trace_id(req.headers()),
                },
                ..access_log::Entry::default()
            };
            access_log::Line {
                entry,
                log: self.access_log.clone(),
                taps,
            }
        });
        let bytes_in = line
            .is_some()
            .then(|| Arc::new(std::sync::atomic::AtomicU64::new(0)));
        // Owns what the line and the span need while the request waits for its answer,
        // so that a client going away (which drops this future) still leaves them.
        let mut waiting = access_log::Waiting {
            trail,
            pending: Some(access_log::Pending {
                line,
                span,
                started,
                bytes_in: bytes_in.clone(),
            }),
        };
        let mut resp = self
            .handle_request(req, Some((&mut waiting.trail, bytes_in)))
            .await;
        let Some(mut pending) = waiting.pending.take() else {
            return resp;
        };
        let status = resp.status().as_u16();
        let reason = resp
            .headers()
            .get(ERROR_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // Only the span records it.
        let peer_identity = pending.span.as_ref().and_then(|_| match self.direction {
            Direction::Inbound => self.client_identity.as_deref().map(str::to_owned),
            Direction::Outbound => waiting.trail.destination_identity.clone(),
        });
        pending.record(&mut waiting.trail, status, reason, peer_identity);
        match resp.body_mut() {
            Either::Left(tracked) => tracked.log = Some(Box::new(pending)),
            Either::Right(full) => pending.finish(full.size_hint().exact().unwrap_or(0)),
        }
        resp
    }

    /// [`HttpConn::handle`] without the access log and span; `trail` collects what they
    /// need, and carries the trace context to write into the request.
    async fn handle_request(
        &self,
        mut req: Request<Incoming>,
        trail: Option<(
            &mut access_log::Trail,
            Option<Arc<std::sync::atomic::AtomicU64>>,
        )>,
    ) -> Response<ProxyBody> {
        let (mut trail, bytes_in) = match trail {
            Some((t, n)) => (Some(t), n),
            None => (None, None),
        };
        let start = Instant::now();
        let grpc = is_grpc(&req);
        let dest = match self.resolve() {
            Ok(d) => d,
            Err((code, label)) => {
                let labels = self.metrics.for_requests(self.direction, &label);
                labels.request();
                return self.fail(&labels, code, grpc, start);
            }
        };
        let labels = self.request_metrics(&dest);
        // A request a Route may take is counted once its rule is known, under that rule
        // (`outbound`); one refused before then, here, under the service.
        let routed = matches!(&dest, Dest::Service(_, s) if s.route.is_some());
        let count_refused = || {
            if routed {
                labels.request();
            }
        };
        if !routed {
            labels.request();
        }
        if self.direction == Direction::Inbound {
            if self.mux {
                crate::mux::restore(&mut req);
            } else {
                // Honoured from peer proxies' mux sessions only.
                req.headers_mut().remove(crate::mux::ORIG_PROTO);
            }
            // Only this proxy says who called (added back below, past the checks).
            remove_forwarded_client_cert(req.headers_mut());
        }
        // The outbound proxy checks a request as it forwards it, with the trace context it
        // writes: the next proxy, which checks what it receives, then never refuses what
        // this one accepted. Inbound, after the checks below: a client's request within
        // the limits is not refused for the context a proxy adds toward its application.
        let mut propagate = trail.as_deref_mut().and_then(|t| t.propagate.take());
        if self.direction == Direction::Outbound
            && let Some(p) = propagate.take()
        {
            p.write(req.headers_mut());
        }
        if let Err(refusal) = check_request(&req, &self.limits) {
            tracing::debug!(reason = refusal.code.as_str(), "request refused");
            if let Some(limit) = refusal.limit {
                self.metrics.limit_refused(limit);
            }
            count_refused();
            let mut resp = self.fail(labels, refusal.code, grpc, start);
            if req.version() <= Version::HTTP_11 {
                // After a request the proxy would not forward, its framing cannot be
                // trusted either: close, as nginx and Envoy do.
                resp.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            return resp;
        }
        if let Some(p) = propagate {
            p.write(req.headers_mut());
        }
        if let Some(refused) = self.authorize(&mut req, labels, grpc, start) {
            count_refused();
            return refused;
        }
        if let Some(refused) = self.rate_limit(labels, grpc, start) {
            count_refused();
            return refused;
        }

        if req.headers().contains_key(UPGRADE) {
            drop_h2c_upgrade(req.headers_mut());
        }
        let upgrade = is_upgrade(&req);
        // RFC 9110 §9.3.6: CONNECT goes to the destination as it is (authority-form), and
        // a 2xx answer turns both connections into one tunnel, as a 101 does for Upgrade.
        let connect = req.method() == Method::CONNECT && req.version() <= Version::HTTP_11;
        let on_upgrade = (upgrade || connect).then(|| hyper::upgrade::on(&mut req));
        // Read before `Connection` goes: a client that closes after this request needs no
        // body discarded to keep its connection in step (see below).
        let keep_in_step = req.version() == Version::HTTP_11
            && !self.mux
            && !req.body().is_end_stream()
            && !connection_has(req.headers(), "close");
        strip_hop_by_hop(req.headers_mut(), upgrade);
        if self.direction == Direction::Inbound {
            self.forward_client_identity(&mut req);
        }
        if !upgrade && !connect {
            keep_http1_body(&mut req);
        }
        if req.version() == Version::HTTP_2 {
            absolutize(&mut req, || self.fallback_authority());
        } else {
            to_origin_form(&mut req, || self.fallback_authority());
        }

        let (parts, body) = req.into_parts();
        // gRPC streams over HTTP/2 may legitimately stay silent for long (a watch); they
        // are bounded by HTTP/2's stream limit and keep-alive pings instead. Over HTTP/1 a
        // content type alone must not buy a client an unbounded connection.
        let exempt = grpc && parts.version == Version::HTTP_2;
        let idle = (!exempt && !body.is_end_stream())
            .then(|| (self.limits.request_body_idle_timeout, self.metrics.clone()));
        let body_watch = (!body.is_end_stream()).then(BodyWatch::default);
        let mut body = RequestBody::new(body, idle, body_watch.clone());
        // A peer proxy's mux session is HTTP/2 below the HTTP/1 requests it restores. A
        // connection the client closes after this request keeps nothing in step, and a
        // body that had ended on arrival leaves nothing to discard.
        if keep_in_step {
            let expects_continue = parts
                .headers
                .get(http::header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
            body = body.discarding_the_rest(expects_continue);
        }
        if let Some(n) = bytes_in {
            body = body.counting(n);
        }
        let head = parts.method == Method::HEAD;
        let request = Request::from_parts(parts, body);
        let mut exchange = Exchange {
            start,
            head,
            grpc,
            labels,
            upgrade,
            connect,
            on_upgrade,
            trail,
            body_watch,
        };
        match &dest {
            Dest::Fixed(endpoint) => {
                let plan = Attempts::single(endpoint, None);
                self.send(plan, request, &mut exchange).await
            }
            Dest::Service(snapshot, service) => {
                self.outbound(snapshot, service, request, &mut exchange)
                    .await
            }
        }
    }

    /// Answers a request with `code`'s error response, counted under `labels`.
    pub(crate) fn fail(
        &self,
        labels: &RequestMetrics,
        code: ErrorCode,
        grpc: bool,
        start: Instant,
    ) -> Response<ProxyBody> {
        self.metrics.error(self.direction, code);
        // Metrics record the HTTP status the failure means, even when gRPC framing sends 200.
        labels.response(code.status(), secs(start));
        if grpc {
            grpc_error_response(code)
        } else {
            error_response(code)
        }
    }
}

fn secs(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

/// A response the proxy makes itself for `code`.
pub fn error_response(code: ErrorCode) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(format!(
        "weft-proxy: {code}\n"
    )))));
    *resp.status_mut() = code.status();
    let h = resp.headers_mut();
    h.insert(ERROR_HEADER, HeaderValue::from_static(code.as_str()));
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A gRPC "trailers-only" response for `code`: HTTP 200 with `grpc-status` and
/// `grpc-message` in the headers, so gRPC clients see a proper status.
pub fn grpc_error_response(code: ErrorCode) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
    let h = resp.headers_mut();
    h.insert(ERROR_HEADER, HeaderValue::from_static(code.as_str()));
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(
        "grpc-status",
        HeaderValue::from(u16::from(code.grpc_status())),
    );
    h.insert("grpc-message", HeaderValue::from_static(code.as_str()));
    resp
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Both halves of a connection that switched protocols (`101` to an `Upgrade`, `2xx` to a
/// `CONNECT`). The endpoint counts it in flight until the tunnel closes.
#[derive(Debug)]
pub(crate) struct Tunnel {
    pub(crate) downstream: hyper::upgrade::OnUpgrade,
    pub(crate) upstream: hyper::upgrade::OnUpgrade,
    /// Like an opaque connection, a tunnel that moves no byte for this long is closed.
    pub(crate) idle: Duration,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) _in_flight: InFlight,
}

impl Tunnel {
    /// Copies bytes both ways until both sides have closed, or until it is idle.
    async fn splice(self) {
        let (d, u) = tokio::join!(self.downstream, self.upstream);
        match (d, u) {
            (Ok(d), Ok(u)) => {
                let mut d = TokioIo::new(d);
                let mut u = TokioIo::new(u);
                match crate::server::splice_until_idle(&mut d, &mut u, self.idle).await {
                    Ok(Some((up, down))) => tracing::debug!(up, down, "tunnel closed"),
                    Ok(None) => {
                        self.metrics.limit_refused(Limit::OpaqueIdleTimeout);
                        tracing::debug!("tunnel idle; closed");
                    }
                    Err(error) => tracing::debug!(%error, "tunnel ended with an error"),
                }
            }
            (Err(error), _) | (_, Err(error)) => {
                tracing::debug!(%error, "upgrade failed");
            }
        }
    }
}

/// Whether an HTTP/1 request asks to switch protocols (`Connection: upgrade` + `Upgrade`).
fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() <= Version::HTTP_11
        && req.headers().contains_key(UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop fields (RFC 9110 §7.6.1): `Connection` and every field it names,
/// `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`, and `TE` unless it is
/// exactly `trailers` (which gRPC needs end to end). With `keep_upgrade`, `Upgrade` and
/// `Connection: upgrade` stay, so that the next hop can switch protocols too. Returns the
/// `Keep-Alive` field removed, if any: in a response, the idle timeout its server keeps
/// the connection for ([`keep_alive_timeout`]).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) -> Option<HeaderValue> {
    // Most messages carry none of these: one pass over the few fields present is cheaper
    // than a hashed lookup per hop-by-hop name, twice per request.
    if !keep_upgrade && !headers.keys().any(is_hop_by_hop) {
        return None;
    }
    let keep_alive = headers.remove("keep-alive");
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            if keep_upgrade && name == UPGRADE {
                continue;
            }
            if name == TE || name == HOST {
                // Never let a client strip these through `Connection`; TE is handled below.
                continue;
            }
            headers.remove(&name);
        }
        headers.remove(CONNECTION);
    }
    for name in ["keep-alive", "proxy-connection"] {
        headers.remove(name);
    }
    if headers.remove(TRANSFER_ENCODING).is_some() {
        // A message framed by Transfer-Encoding that names a length too is read as
        // chunked; an intermediary removes the length before forwarding it (RFC 9112
        // §6.3). hyper's server does so for requests, its client not for responses.
        headers.remove(http::header::CONTENT_LENGTH);
    }
    if headers.contains_key(TE) {
        keep_te_trailers(headers);
    }
    if keep_upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(UPGRADE);
    }
    keep_alive
}

/// The idle timeout an HTTP/1 server announces in a response's `Keep-Alive` field
/// (`timeout=5`, as Node.js and Apache send), if the field names a valid one: the server
/// closes the connection once idle that long, so a client must not send on it then.
pub fn keep_alive_timeout(value: &HeaderValue) -> Option<Duration> {
    value.to_str().ok()?.split(',').find_map(|param| {
        let (name, seconds) = param.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("timeout") {
            return None;
        }
        let seconds: u64 = seconds.trim().trim_matches('"').parse().ok()?;
        // A day is longer than any pool keeps a connection idle.
        Some(Duration::from_secs(seconds.min(86_400)))
    })
}

/// Gives an HTTP/1.1 request whose body has no length `Transfer-Encoding: chunked`, the
/// framing it goes on with: hyper's HTTP/1 client frames a body of unknown length as
/// chunked only for methods other than `GET`, `HEAD` and `CONNECT`, and sends those with
/// no body at all, dropping a chunked `GET` body (or one that crossed the mux, which
/// carries no length when the client sent none). A body that has ended (none, or an
/// HTTP/2 stream ended with its head) and one of known length (hyper sends its
/// `content-length`) keep theirs.
pub(crate) fn keep_http1_body<B: Body>(req: &mut Request<B>) {
    if req.version() == Version::HTTP_11
        && !req.body().is_end_stream()
        && req.body().size_hint().exact().is_none()
        && !req.headers().contains_key(http::header::CONTENT_LENGTH)
    {
        req.headers_mut()
            .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
}

/// Removes from a trailers frame what never belongs in trailers and would go wrong on the
/// next hop: the connection-specific fields (`Connection`, `Keep-Alive`,
/// `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`, `TE`), with which h2 refuses to
/// send trailers at all (RFC 9113 §8.2.2) and hyper then leaves the stream open, so the
/// request would hang on the mux until the far side's body idle timeout, while HTTP/1
/// passed some of them on; and the fields only the mesh sets (`x-forwarded-client-cert`,
/// `weft-orig-proto`), so that no trailer can stand in for them. Other frames pass as
/// they are.
fn strip_trailer_fields(mut frame: Frame<Bytes>) -> Frame<Bytes> {
    if let Some(trailers) = frame.trailers_mut()
        && trailers
            .keys()
            .any(|n| is_hop_by_hop(n) || n == FORWARDED_CLIENT_CERT || n == crate::mux::ORIG_PROTO)
    {
        for name in [
            CONNECTION,
            TE,
            TRANSFER_ENCODING,
            UPGRADE,
            FORWARDED_CLIENT_CERT,
        ] {
            trailers.remove(name);
        }
        for name in ["keep-alive", "proxy-connection"] {
            trailers.remove(name);
        }
        trailers.remove(crate::mux::ORIG_PROTO);
    }
    frame
}

/// Leaves one `Content-Length` with one value in a message hyper accepted with a list of
/// the same number (`3, 3`, or two fields), as RFC 9110 §8.6 lets a recipient do. Passed on
/// as it came, a client that refuses such a list (Node's parser does) would fail, and one
/// that reads it otherwise could disagree on where the body ends.
pub(crate) fn single_content_length(headers: &mut HeaderMap) {
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return;
    };
    if values.next().is_none() && !first.as_bytes().contains(&b',') {
        return;
    }
    // hyper read the message by it, so every value is the same number.
    let single = first
        .as_bytes()
        .split(|b| *b == b',')
        .next()
        .map(<[u8]>::trim_ascii)
        .and_then(|v| HeaderValue::from_bytes(v).ok());
    match single {
        Some(v) => {
            headers.insert(http::header::CONTENT_LENGTH, v);
        }
        None => {
            headers.remove(http::header::CONTENT_LENGTH);
        }
    }
}

/// Leaves `TE: trailers`, as one field, when any `TE` field names `trailers`, and no `TE`
/// otherwise: the rest of `TE` is about this hop, and HTTP/2 allows nothing else (RFC
/// 9113 §8.2.2), where h2 would refuse the request. A later field must not ride along
/// behind a first `trailers`.
fn keep_te_trailers(headers: &mut HeaderMap) {
    let mut values = headers.get_all(TE).iter();
    let first = values.next();
    if first.is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
        && values.next().is_none()
    {
        return;
    }
    let trailers = headers
        .get_all(TE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"));
    if trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    } else {
        headers.remove(TE);
    }
}

/// Removes an offer to switch to `h2c` (RFC 7540 §3.2, removed from RFC 9113) from a
/// request's `Upgrade`, with its `HTTP2-Settings`, keeping any other protocol offered.
/// Passed on, an application that accepts it would answer `101` and take HTTP/2 requests
/// inside the tunnel, past every per-request rule of the proxy (authorization, routes,
/// limits): "h2c smuggling". Envoy drops the offer too; a client that wants HTTP/2 to a
/// meshed application sends it with prior knowledge, which the proxy serves.
fn drop_h2c_upgrade(headers: &mut HeaderMap) {
    let is_h2c = |t: &str| {
        let t = t.trim();
        t.eq_ignore_ascii_case("h2c")
            || t.as_bytes()
                .get(..4)
                .is_some_and(|p| p.eq_ignore_ascii_case(b"h2c/"))
    };
    let offered: Vec<String> = headers
        .get_all(UPGRADE)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    if !offered.iter().flat_map(|v| v.split(',')).any(is_h2c) {
        return;
    }
    let others: Vec<&str> = offered
        .iter()
        .flat_map(|v| v.split(','))
        .filter(|t| !is_h2c(t) && !t.trim().is_empty())
        .map(str::trim)
        .collect();
    headers.remove(UPGRADE);
    headers.remove("http2-settings");
    if let Ok(v) = HeaderValue::from_str(&others.join(", "))
        && !others.is_empty()
    {
        headers.insert(UPGRADE, v);
    }
}

/// Whether `name` is one of the fixed hop-by-hop fields; fields named by `Connection` only
/// matter when `Connection` itself is present, which this also reports.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION
        || name == TE
        || name == TRANSFER_ENCODING
        || name == UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Puts an HTTP/1 request in the form an origin server expects, as a client does: `Host`
/// set when missing (from the URI's authority, or the target) and replaced by the target's
/// authority for an absolute-form target (RFC 9112 §3.2.2: a proxy ignores the received
/// `Host` then), and the request target in origin-form (authority-form for `CONNECT`).
fn to_origin_form<B>(req: &mut Request<B>, fallback: impl FnOnce() -> Option<Authority>) {
    let absolute = req.uri().scheme().is_some() && req.uri().authority().is_some();
    if (absolute || !req.headers().contains_key(HOST))
        && let Some(authority) = req.uri().authority().cloned().or_else(fallback)
    {
        // The port is left out when it is the default for `http`, as clients do.
        let value = match authority.port_u16() {
            Some(80) => HeaderValue::from_str(authority.host()),
            _ => HeaderValue::from_str(authority.as_str()),
        };
        if let Ok(value) = value {
            req.headers_mut().insert(HOST, value);
        }
    }
    let uri = req.uri();
    if uri.scheme().is_none() && uri.authority().is_none() {
        return;
    }
    let target = if req.method() == http::Method::CONNECT {
        uri.authority().map(|a| {
            let mut parts = http::uri::Parts::default();
            parts.authority = Some(a.clone());
            Uri::from_parts(parts)
        })
    } else {
        let mut parts = http::uri::Parts::default();
        parts.path_and_query = Some(
            uri.path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
        Some(Uri::from_parts(parts))
    };
    if let Some(Ok(target)) = target {
        *req.uri_mut() = target;
    }
}

/// Gives an HTTP/2 request without `:scheme` or `:authority` an absolute URI built from its
/// `Host` (or the target, when it has none), which the HTTP/2 client needs; `Host` itself
/// is untouched.
fn absolutize<B>(req: &mut Request<B>, fallback: impl FnOnce() -> Option<Authority>) {
    if req.uri().authority().is_some() && req.uri().scheme().is_some() {
        return;
    }
    let authority = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| Authority::from_str(h).ok())
        .or_else(fallback);
    let Some(authority) = authority else { return };
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
}

/// An upstream response body that keeps its endpoint's in-flight count until it ends, so
/// that P2C sees long responses as load, and hands its HTTP/1 connection back to the pool
/// once it has been read to the end. A service's timeout covers the body too: past the
/// deadline the body ends with [`ResponseBodyError::Deadline`], which resets the stream
/// (HTTP/2) or closes the connection (HTTP/1) downstream, and drops the upstream one.
#[derive(Debug)]
pub struct TrackedBody {
    pub(crate) inner: Incoming,
    pub(crate) _in_flight: InFlight,
    pub(crate) lease: Option<Lease>,
    pub(crate) ended: bool,
    /// The request's deadline, when its service has a timeout (one allocation then, none
    /// otherwise), with what counts its expiry.
    pub(crate) deadline: Option<(Pin<Box<tokio::time::Sleep>>, Arc<Metrics>, Direction)>,
    /// The request's access-log line and span, finished when the body ends or is dropped.
    pub(crate) log: Option<Box<access_log::Pending>>,
    /// Body bytes sent so far (counted only with an access log).
    pub(crate) bytes: u64,
    /// The upstream's failure, held back while the rest of the runtime's ready tasks run:
    /// see `poll_frame`.
    pub(crate) failed: Option<HeldBack>,
}

/// An upstream body's failure held back until the runtime's other ready tasks have run
/// (`tokio::task::yield_now`'s turn), so that downstream writes what it has first.
pub(crate) struct HeldBack {
    error: hyper::Error,
    turn: Pin<Box<dyn Future<Output = ()> + Send + Sync>>,
}

impl std::fmt::Debug for HeldBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldBack")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

/// Why a response body ended early.
#[derive(Debug, thiserror::Error)]
pub enum ResponseBodyError {
    /// The upstream connection failed mid-body.
    #[error(transparent)]
    Upstream(#[from] hyper::Error),
    /// The service's timeout expired before the body ended.
    #[error("the service's timeout expired while the response body was streaming")]
    Deadline,
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if let Some(line) = self.log.take() {
            line.finish(self.bytes);
        }
        // A body dropped before its end leaves the connection mid-response: hyper closes
        // it, so it must not go back to the pool.
        if (self.ended || self.inner.is_end_stream())
            && let Some(lease) = self.lease.take()
        {
            lease.release();
        }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        // Ended from the start for an answer to HEAD (see `pipeline`'s `respond`).
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some((sleep, metrics, direction)) = &mut self.deadline
            && sleep.as_mut().poll(cx).is_ready()
        {
            metrics.error(*direction, ErrorCode::ResponseTimeout);
            tracing::debug!("response timeout while streaming the body");
            self.deadline = None;
            // Not `ended`: the upstream connection is mid-response and must not be reused.
            return Poll::Ready(Some(Err(ResponseBodyError::Deadline)));
        }
        if let Some(held) = &mut self.failed {
            ready!(held.turn.as_mut().poll(cx));
            if let Some(held) = self.failed.take() {
                return Poll::Ready(Some(Err(ResponseBodyError::Upstream(held.error))));
            }
        }
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        match frame {
            Poll::Ready(None) => self.ended = true,
            Poll::Ready(Some(Ok(ref f))) if self.log.is_some() => {
                self.bytes += f.data_ref().map_or(0, |d| d.len() as u64);
            }
            Poll::Ready(Some(Err(error))) => {
                // Downstream, hyper stops at a body's error without writing out what it
                // holds: the head and the last bytes, when the failure came with them (an
                // application that wrote and closed at once, a stream reset right behind
                // its data). An HTTP/1 server writes them if the body is pending once; an
                // HTTP/2 server's connection task, which writes the stream's frames before
                // the reset can drop them, must run first. So the failure waits for a
                // yield's turn, and the client gets what the application sent, then the
                // broken end, as it does when the failure comes in a later read.
                let mut held = HeldBack {
                    error,
                    turn: Box::pin(tokio::task::yield_now()),
                };
                if held.turn.as_mut().poll(cx).is_pending() {
                    self.failed = Some(held);
                    return Poll::Pending;
                }
                return Poll::Ready(Some(Err(ResponseBodyError::Upstream(held.error))));
            }
            _ => {}
        }
        frame.map(|f| f.map(|r| r.map(strip_trailer_fields).map_err(ResponseBodyError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // Kept for an answer to HEAD too: a hint of 0 would have hyper add a
        // `content-length: 0` where the application said nothing of the length.
        self.inner.size_hint()
    }
}

/// The parts of a request needed to send it again (a retry, a mirror, or a bodiless
/// request resent after its pooled connection closed unanswered).
#[derive(Debug)]
pub(crate) struct RequestHead {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl RequestHead {
    /// A copy of `req`'s head.
    pub(crate) fn of<B>(req: &Request<B>) -> RequestHead {
        RequestHead {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        }
    }

    /// The request's method.
    pub(crate) fn method(&self) -> &Method {
        &self.method
    }

    /// The request again, with `body`.
    pub(crate) fn request(&self, body: Bytes) -> Request<RequestBody> {
        let mut req = Request::new(RequestBody::buffered(body));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// A request body on its way upstream: the client's, streamed, or a copy of one that was
/// read whole so that it can be sent again (a retry) or twice (a mirror). While the client
/// sends a streamed body, a pause between two frames longer than the idle timeout ends it
/// with [`RequestBodyError::IdleTimeout`], so a client that stops half-way does not hold an
/// upstream connection forever. Empty bodies (most requests) carry no timer; a body
/// allocates its timer the first time it has to wait for the client.
#[derive(Debug)]
pub struct RequestBody {
    inner: BodyInner,
    idle: Option<IdleTimer>,
    /// Data bytes read from the client, for the access log.
    counted: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// Where the body says how it fails and how far it got, for the pipeline and the pool.
    watch: Option<BodyWatch>,
    /// Whether what the upstream leaves unread of the client's body is read and discarded
    /// ([`RequestBody::discarding_the_rest`]).
    discard: Discard,
}

/// When a request body's unread rest is discarded on drop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Discard {
    /// Never: the connection closes, or needs nothing read (HTTP/2, the mux).
    Never,
    /// Whatever was read of it.
    Always,
    /// Only once something read it: the client waits for `100 Continue` before it sends
    /// the body, and if nothing read it, hyper never told the client to send it.
    OnceRead,
}

/// The most of a client's HTTP/1 request body the proxy reads and discards, once the
/// upstream stopped taking it, to keep the client's connection in step (Go's `net/http`
/// reads the same amount of a body its handler left, for the same reason); past it, the
/// connection closes after the answer.
pub const DISCARD_LIMIT: u64 = 256 * 1024;

/// How long the proxy keeps reading a request body it discards ([`DISCARD_LIMIT`]).
pub const DISCARD_TIME: Duration = Duration::from_secs(10);

/// How a client's request body is doing, shared between the body (which the upstream's
/// client reads, out of the pipeline's sight) and those who judge an attempt or a
/// connection by it:
///
/// - its failure: the body's error reaches the pipeline as an upstream failure, and over
///   HTTP/2 without the body's error as its cause; this tells the pipeline the client is to
///   blame, so that it neither retries nor holds the failure against the endpoint;
/// - whether the proxy is waiting on the client for more of it: an attempt that times out
///   then timed out on the client, not on the endpoint;
/// - whether it has ended: an HTTP/1 connection whose application answered before the
///   body was all sent (an early `401`, `413` or `417`) is still busy sending it, and must
///   not be lent to another request meanwhile.
#[derive(Clone, Debug, Default)]
pub(crate) struct BodyWatch(Arc<BodyState>);

#[derive(Debug, Default)]
struct BodyState {
    fault: OnceLock<ErrorCode>,
    /// What the body's last poll saw: [`BodyWatch::UNREAD`] (none yet),
    /// [`BodyWatch::FLOWING`], [`BodyWatch::AWAITING_CLIENT`] or [`BodyWatch::ENDED`].
    progress: std::sync::atomic::AtomicU8,
}

impl BodyWatch {
    /// Nothing polled the body yet.
    const UNREAD: u8 = 0;
    /// The last poll gave a frame, and more is to come.
    const FLOWING: u8 = 3;
    /// The last poll found nothing: the proxy waits on the client for the next frame.
    const AWAITING_CLIENT: u8 = 1;
    /// The client's body has been read to its end.
    const ENDED: u8 = 2;

    /// The answer owed for the body's failure, once it has failed.
    pub(crate) fn code(&self) -> Option<ErrorCode> {
        self.0.fault.get().copied()
    }

    /// Whether the body's reader is waiting for the client to send more of it (rather
    /// than for the upstream to take what was read, or for nothing at all).
    pub(crate) fn awaiting_client(&self) -> bool {
        self.progress() == Self::AWAITING_CLIENT && self.code().is_none()
    }

    /// Whether the body is over: read to its end, or failed.
    pub(crate) fn over(&self) -> bool {
        self.progress() == Self::ENDED || self.code().is_some()
    }

    /// Whether anything polled the body yet.
    fn read(&self) -> bool {
        self.progress() != Self::UNREAD
    }

    fn progress(&self) -> u8 {
        self.0.progress.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set(&self, progress: u8) {
        self.0
            .progress
            .store(progress, std::sync::atomic::Ordering::Relaxed);
    }
}

#[derive(Debug)]
enum BodyInner {
    Stream(Incoming),
    /// The whole body, until it is sent; `None` once sent (or when empty).
    Buffered(Option<Bytes>),
    /// Streamed, keeping a copy of what it read ([`RequestBody::tee`]).
    Tee(Incoming, Arc<BodyCopy>),
}

/// What a teed request body ([`RequestBody::tee`]) read from its client, so that the
/// request can be sent again when a peer proxy answers that it never sent it, although its
/// body streamed (a gRPC client sends no `content-length`).
#[derive(Debug)]
pub(crate) struct BodyCopy {
    limit: u64,
    state: Mutex<CopyState>,
}

#[derive(Debug)]
enum CopyState {
    /// The body is still being read; its data so far.
    Reading { chunks: Vec<Bytes>, len: u64 },
    /// The body ended: all of its data.
    Whole(Bytes),
    /// No copy: the body outgrew the limit, carried trailers, or failed.
    Abandoned,
}

impl BodyCopy {
    /// The whole body, once it has ended within the limit.
    pub(crate) fn whole(&self) -> Option<Bytes> {
        match &*self.state.lock().unwrap_or_else(|p| p.into_inner()) {
            CopyState::Whole(b) => Some(b.clone()),
            CopyState::Reading { .. } | CopyState::Abandoned => None,
        }
    }

    /// Records what one poll of the body gave; `ended` when the body has no more frames.
    fn record(&self, frame: Option<&Result<Frame<Bytes>, hyper::Error>>, ended: bool) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let CopyState::Reading { chunks, len } = &mut *state else {
            return;
        };
        match frame {
            Some(Ok(f)) => match f.data_ref() {
                Some(data) => {
                    *len = len.saturating_add(data.len() as u64);
                    if *len > self.limit {
                        *state = CopyState::Abandoned;
                        return;
                    }
                    chunks.push(data.clone());
                }
                // Trailers: a copy of the data alone would not be the same request.
                None => {
                    *state = CopyState::Abandoned;
                    return;
                }
            },
            Some(Err(_)) => {
                *state = CopyState::Abandoned;
                return;
            }
            None => {}
        }
        if ended || frame.is_none() {
            let whole = match chunks.as_slice() {
                [] => Bytes::new(),
                [one] => one.clone(),
                many => Bytes::from(many.concat()),
            };
            *state = CopyState::Whole(whole);
        }
    }
}

#[derive(Debug)]
struct IdleTimer {
    timeout: std::time::Duration,
    metrics: Arc<Metrics>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether `sleep` runs from the last frame; cleared by each frame and set again, from
    /// the current time, by the first poll that has to wait.
    armed: bool,
}

impl RequestBody {
    /// Wraps `inner`; with `idle`, a pause longer than its duration ends the body, counted
    /// in the metrics given; how it fares is noted in `watch`.
    pub(crate) fn new(
        inner: Incoming,
        idle: Option<(std::time::Duration, Arc<Metrics>)>,
        watch: Option<BodyWatch>,
    ) -> Self {
        RequestBody {
            inner: BodyInner::Stream(inner),
            idle: idle.map(|(timeout, metrics)| IdleTimer {
                timeout,
                metrics,
                sleep: None,
                armed: false,
            }),
            counted: None,
            watch,
            discard: Discard::Never,
        }
    }

    /// The same body, whose rest, if the upstream lets go of it before its end (the
    /// application answered early and closed, or the attempt was given up), is read from
    /// the client and discarded, up to [`DISCARD_LIMIT`] within [`DISCARD_TIME`]: an
    /// HTTP/1 client that was told `100 Continue`, or was already sending, sends its body
    /// anyway, and hyper closes a connection whose request body was left unread, so that
    /// client's next request on it would fail. For an HTTP/1 client connection only (an
    /// HTTP/2 stream's rest is refused by a reset, which costs the connection nothing).
    /// With `expects_continue` (the request asked `Expect: 100-continue`), only once
    /// something read the body: before that, hyper never told the client to send it, and
    /// closing the connection after the answer is what RFC 9110 expects.
    pub(crate) fn discarding_the_rest(mut self, expects_continue: bool) -> Self {
        self.discard = if expects_continue {
            Discard::OnceRead
        } else {
            Discard::Always
        };
        self
    }

    /// The same body, adding the data bytes it reads from the client to `n`.
    pub fn counting(mut self, n: Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.counted = Some(n);
        self
    }

    /// The same body, keeping a copy of the data it streams while that stays within
    /// `limit` bytes: [`BodyCopy::whole`] gives it once the body has ended.
    pub(crate) fn tee(mut self, limit: u64) -> (Self, Arc<BodyCopy>) {
        let copy = Arc::new(BodyCopy {
            limit,
            state: Mutex::new(CopyState::Reading {
                chunks: Vec::new(),
                len: 0,
            }),
        });
        self.inner = match std::mem::replace(&mut self.inner, BodyInner::Buffered(None)) {
            BodyInner::Stream(inner) => BodyInner::Tee(inner, copy.clone()),
            BodyInner::Buffered(bytes) => {
                if let Ok(mut state) = copy.state.lock() {
                    *state = CopyState::Whole(bytes.clone().unwrap_or_default());
                }
                BodyInner::Buffered(bytes)
            }
            tee @ BodyInner::Tee(..) => tee,
        };
        (self, copy)
    }

    /// A body that was read whole.
    pub fn buffered(bytes: Bytes) -> Self {
        RequestBody {
            inner: BodyInner::Buffered((!bytes.is_empty()).then_some(bytes)),
            idle: None,
            counted: None,
            watch: None,
            discard: Discard::Never,
        }
    }

    /// How the body fares, when it is the client's and had not ended on arrival (`None`
    /// for a body read whole, or empty: nothing of it waits on the client).
    pub(crate) fn watch(&self) -> Option<&BodyWatch> {
        self.watch.as_ref()
    }

    /// Notes `error` in the shared watch, and returns it.
    fn failed(&self, error: RequestBodyError) -> RequestBodyError {
        if let Some(w) = &self.watch {
            let _ = w.0.fault.set(error.code());
        }
        error
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let unread = || !self.watch.as_ref().is_some_and(BodyWatch::read);
        match self.discard {
            Discard::Never => return,
            Discard::OnceRead if unread() => return,
            Discard::OnceRead | Discard::Always => {}
        }
        let (BodyInner::Stream(inner) | BodyInner::Tee(inner, _)) =
            std::mem::replace(&mut self.inner, BodyInner::Buffered(None))
        else {
            return;
        };
        if inner.is_end_stream() || self.watch.as_ref().is_some_and(BodyWatch::over) {
            return;
        }
        // More than the limit still to come: not worth reading, the connection closes.
        if inner.size_hint().lower() > DISCARD_LIMIT {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let span = tracing::debug_span!("discard_request_body");
        runtime.spawn(tracing::Instrument::instrument(discard(inner), span));
    }
}

/// Reads the rest of a request body nobody will send on, within [`DISCARD_LIMIT`] and
/// [`DISCARD_TIME`]; dropping it earlier (too long, too slow, failed) lets hyper close the
/// client's connection after its answer.
async fn discard(mut body: Incoming) {
    use http_body_util::BodyExt as _;
    let reading = async {
        let mut read = 0u64;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return false;
            };
            read = read.saturating_add(frame.data_ref().map_or(0, |d| d.len() as u64));
            if read > DISCARD_LIMIT {
                return false;
            }
        }
        true
    };
    match tokio::time::timeout(DISCARD_TIME, reading).await {
        Ok(true) => tracing::debug!("discarded the rest of a request body"),
        Ok(false) | Err(_) => tracing::debug!("request body not discarded; its connection closes"),
    }
}

/// Why a request body ended early.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    /// The client paused longer than the request body idle timeout.
    #[error("the client sent no request body data within the idle timeout")]
    IdleTimeout,
    /// The client's connection or stream failed.
    #[error("reading the request body")]
    Client(#[source] hyper::Error),
}

impl RequestBodyError {
    /// The proxy's answer to a request whose body failed this way.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            RequestBodyError::IdleTimeout => ErrorCode::RequestBodyTimeout,
            RequestBodyError::Client(_) => ErrorCode::RequestBodyIncomplete,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let this = &mut *self;
        // Once the pipeline has let go of the copy (a real answer came), nobody will ask
        // for it: a stream that keeps sending after the answer (bidirectional gRPC) streams
        // on without one, and what was copied is freed.
        if let BodyInner::Tee(_, copy) = &this.inner
            && Arc::strong_count(copy) == 1
            && let BodyInner::Tee(inner, _) =
                std::mem::replace(&mut this.inner, BodyInner::Buffered(None))
        {
            this.inner = BodyInner::Stream(inner);
        }
        let polled = match &mut this.inner {
            BodyInner::Buffered(bytes) => {
                return Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b))));
            }
            BodyInner::Stream(inner) => Pin::new(inner).poll_frame(cx),
            BodyInner::Tee(inner, copy) => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                if let Poll::Ready(frame) = &polled {
                    copy.record(frame.as_ref(), inner.is_end_stream());
                }
                polled
            }
        };
        match polled {
            Poll::Ready(frame) => {
                if let Some(idle) = this.idle.as_mut() {
                    idle.armed = false;
                }
                if let (Some(n), Some(Ok(f))) = (&this.counted, &frame) {
                    let len = f.data_ref().map_or(0, |d| d.len() as u64);
                    n.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
                }
                if let Some(w) = &this.watch {
                    // A reader may stop at a frame after which the body says it has ended,
                    // and hyper's HTTP/1 client stops at trailers, the body's last frame.
                    let ended = frame.is_none()
                        || matches!(&frame, Some(Ok(f)) if f.is_trailers())
                        || this.is_end_stream();
                    w.set(if ended {
                        BodyWatch::ENDED
                    } else {
                        BodyWatch::FLOWING
                    });
                }
                Poll::Ready(frame.map(|f| {
                    f.map(strip_trailer_fields)
                        .map_err(|e| this.failed(RequestBodyError::Client(e)))
                }))
            }
            Poll::Pending => {
                if let Some(w) = &this.watch {
                    w.set(BodyWatch::AWAITING_CLIENT);
                }
                let Some(idle) = this.idle.as_mut() else {
                    return Poll::Pending;
                };
                let deadline = tokio::time::Instant::now() + idle.timeout;
                let sleep = idle
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !idle.armed {
                    sleep.as_mut().reset(deadline);
                    idle.armed = true;
                }
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        idle.metrics.limit_refused(Limit::RequestBodyIdleTimeout);
                        tracing::debug!(timeout = ?idle.timeout, "request body idle; cutting it");
                        // Stop the timer: the body has ended for good.
                        this.idle = None;
                        Poll::Ready(Some(Err(this.failed(RequestBodyError::IdleTimeout))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            BodyInner::Stream(inner) | BodyInner::Tee(inner, _) => inner.is_end_stream(),
            BodyInner::Buffered(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            BodyInner::Stream(inner) | BodyInner::Tee(inner, _) => inner.size_hint(),
            BodyInner::Buffered(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(limit: u64) -> BodyCopy {
        BodyCopy {
            limit,
            state: Mutex::new(CopyState::Reading {
                chunks: Vec::new(),
                len: 0,
            }),
        }
    }

    fn data(b: &'static [u8]) -> Result<Frame<Bytes>, hyper::Error> {
        Ok(Frame::data(Bytes::from_static(b)))
    }

    /// A teed body's copy is whole only once the body ended, within the limit, without
    /// trailers: anything less would send another request than the client's.
    #[test]
    fn a_body_copy_is_whole_only_when_the_body_ended_within_the_limit() {
        let c = copy(8);
        c.record(Some(&data(b"abc")), false);
        assert_eq!(c.whole(), None, "still reading");
        c.record(Some(&data(b"de")), false);
        c.record(None, true);
        assert_eq!(c.whole().as_deref(), Some(&b"abcde"[..]));

        // The end seen with the last data frame (HTTP/2 END_STREAM on DATA).
        let c = copy(8);
        c.record(Some(&data(b"abc")), true);
        assert_eq!(c.whole().as_deref(), Some(&b"abc"[..]));

        let c = copy(4);
        c.record(Some(&data(b"abc")), false);
        c.record(Some(&data(b"de")), true);
        assert_eq!(c.whole(), None, "over the limit");

        let c = copy(8);
        c.record(Some(&data(b"abc")), false);
        c.record(Some(&Ok(Frame::trailers(HeaderMap::new()))), true);
        assert_eq!(c.whole(), None, "trailers");
    }

    #[test]
    fn strips_hop_by_hop_fields_and_the_ones_connection_names() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(TE, HeaderValue::from_static("gzip"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(HOST, HeaderValue::from_static("web"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        let keep_alive = strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(h.contains_key(HOST) && h.contains_key("x-keep"));
        assert_eq!(
            keep_alive.as_ref().and_then(keep_alive_timeout),
            Some(Duration::from_secs(5))
        );
    }

    /// The idle timeout a server announces is read as Node.js and Apache write it, in any
    /// case and order; anything else announces none.
    #[test]
    fn a_keep_alive_field_announces_the_servers_idle_timeout() {
        let secs = |v: &'static str| keep_alive_timeout(&HeaderValue::from_static(v));
        assert_eq!(secs("timeout=5"), Some(Duration::from_secs(5)));
        assert_eq!(secs("timeout=5, max=100"), Some(Duration::from_secs(5)));
        assert_eq!(secs("max=100, Timeout = 15"), Some(Duration::from_secs(15)));
        assert_eq!(secs("timeout=\"7\""), Some(Duration::from_secs(7)));
        assert_eq!(secs("timeout=0"), Some(Duration::ZERO));
        assert_eq!(
            secs("timeout=99999999999"),
            Some(Duration::from_secs(86_400))
        );
        for none in [
            "max=100",
            "timeout",
            "timeout=",
            "timeout=-1",
            "timeout=1.5",
            "timeouts=5",
            "",
        ] {
            assert_eq!(secs(none), None, "{none:?}");
        }
        let mut h = HeaderMap::new();
        h.insert("x-other", HeaderValue::from_static("1"));
        assert_eq!(strip_hop_by_hop(&mut h, false), None);
    }

    #[test]
    fn keeps_te_trailers_and_upgrade_when_upgrading() {
        let mut h = HeaderMap::new();
        h.insert(TE, HeaderValue::from_static("trailers"));
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[TE], "trailers");
        assert_eq!(h[UPGRADE], "websocket");
        assert_eq!(h[CONNECTION], "upgrade");
    }

    /// `TE` goes on as `trailers` alone, or not at all: never a later value behind a
    /// first `trailers` (which h2 would refuse over the mux).
    #[test]
    fn te_goes_on_as_trailers_alone() {
        for (values, kept) in [
            (&["trailers"][..], Some("trailers")),
            (&["trailers", "gzip"], Some("trailers")),
            (&["gzip", "Trailers"], Some("trailers")),
            (&["gzip, trailers;q=1"], None),
            (&["deflate, trailers"], Some("trailers")),
            (&["gzip"], None),
        ] {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(TE, HeaderValue::from_str(v).unwrap());
            }
            strip_hop_by_hop(&mut h, false);
            let got: Vec<&HeaderValue> = h.get_all(TE).iter().collect();
            assert_eq!(got, kept.into_iter().collect::<Vec<_>>(), "{values:?}");
        }
    }

    /// An offer to switch to h2c is dropped, with its settings, whatever its case or
    /// version; other protocols offered beside it stay.
    #[test]
    fn an_h2c_upgrade_offer_is_dropped() {
        for (upgrade, left) in [
            ("h2c", None),
            ("H2C", None),
            ("h2c/1, websocket", Some("websocket")),
            ("websocket, h2c", Some("websocket")),
            ("websocket", Some("websocket")),
            ("h2cé", Some("h2cé")),
        ] {
            let mut h = HeaderMap::new();
            h.insert(
                CONNECTION,
                HeaderValue::from_static("Upgrade, HTTP2-Settings"),
            );
            h.insert(
                UPGRADE,
                HeaderValue::from_bytes(upgrade.as_bytes()).unwrap(),
            );
            h.insert(
                "http2-settings",
                HeaderValue::from_static("AAMAAABkAAQAAP__"),
            );
            drop_h2c_upgrade(&mut h);
            let got = h
                .get(UPGRADE)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            assert_eq!(got.as_deref(), left, "{upgrade}");
            let h2c = left != Some(upgrade);
            assert_eq!(h.contains_key("http2-settings"), !h2c, "{upgrade}");
        }
    }

    /// A list of one length, in one field or several, goes on as that length alone.
    #[test]
    fn one_content_length_goes_on() {
        for (values, left) in [
            (&["3"][..], "3"),
            (&["3, 3"], "3"),
            (&["3", "3"], "3"),
            (&[" 3 ,3"], "3"),
        ] {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(
                    http::header::CONTENT_LENGTH,
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            single_content_length(&mut h);
            let got: Vec<&HeaderValue> = h.get_all(http::header::CONTENT_LENGTH).iter().collect();
            assert_eq!(got, [left], "{values:?}");
        }
    }

    #[test]
    fn absolutizes_from_host_and_keeps_it() {
        let mut req = Request::builder()
            .uri("/a?b=1")
            .header(HOST, "web.shop:8080")
            .body(())
            .unwrap();
        absolutize(&mut req, || None);
        assert_eq!(req.uri().to_string(), "http://web.shop:8080/a?b=1");
        assert_eq!(req.headers()[HOST], "web.shop:8080");
    }

    #[test]
    fn http1_targets_become_origin_form_with_host_set() {
        let mut req = Request::builder()
            .uri("http://web.shop:8080/a?b=1")
            .body(())
            .unwrap();
        to_origin_form(&mut req, || None);
        assert_eq!(req.uri().to_string(), "/a?b=1");
        assert_eq!(req.headers()[HOST], "web.shop:8080");

        // Host is kept; a missing one comes from the target, default port left out.
        let mut req = Request::builder()
            .uri("/x")
            .header(HOST, "kept")
            .body(())
            .unwrap();
        to_origin_form(&mut req, || Authority::from_str("other").ok());
        assert_eq!(req.uri().to_string(), "/x");
        assert_eq!(req.headers()[HOST], "kept");
        let mut req = Request::builder().uri("/x").body(()).unwrap();
        to_origin_form(&mut req, || Authority::from_str("web.shop:80").ok());
        assert_eq!(req.headers()[HOST], "web.shop");

        let mut req = Request::builder()
            .method(http::Method::CONNECT)
            .uri("example.com:443")
            .body(())
            .unwrap();
        to_origin_form(&mut req, || None);
        assert_eq!(req.uri().to_string(), "example.com:443");
    }

    #[test]
    fn a_forged_client_identity_is_removed_under_every_name_that_reads_as_it() {
        let mut h = HeaderMap::new();
        for name in [
            "x-forwarded-client-cert",
            "x_forwarded_client_cert",
            "x-forwarded_client-cert",
            "x_forwarded_client_certs",
            "x-forwarded-client",
        ] {
            h.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static("URI=spiffe://evil"),
            );
        }
        remove_forwarded_client_cert(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["x-forwarded-client", "x_forwarded_client_certs"]);
        assert_eq!(FORWARDED_CLIENT_CERT.as_str(), "x-forwarded-client-cert");
    }

    #[test]
    fn error_responses_carry_the_code() {
        let r = error_response(ErrorCode::NoEndpoints);
        assert_eq!(r.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[ERROR_HEADER], "no_endpoints");
    }
}
