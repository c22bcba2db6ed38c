//! Limits on everything a peer controls the count or size of: accepted connections per
//! listener, upstream HTTP/1 connections per endpoint, HTTP/2 streams and header lists,
//! request heads, and how long a connection or request body may stay silent (an
//! upstream connection unused included).
//!
//! ```text
//! flags / env (main) ──▶ Limits (in Proxy) ──▶ server (accept), http (per request),
//!                                               admin, store ─▶ upstream (per endpoint)
//! a limit bites ──▶ weft_limit_refusals_total{limit} (+ weft_errors_total when answered)
//! ```
//!
//! Every default is explicit here and in `docs/proxy.md` ("Limits"), with the reason for
//! its value. Limits are per process (flags), not per config: they protect the proxy
//! itself, whichever config is active.

use std::time::Duration;

use crate::upstream::{IdleTimeout, PoolLimits};

/// Accepted connections per transparent or forward listener before new ones are closed.
/// Envoy has no per-listener default (its overload manager is opt-in); 10,000 is far above
/// what one pod's application opens or receives, and bounds the file descriptors
/// (two per proxied connection) well below a container's usual `nofile` of 65,536+.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Accepted admin connections: the kubelet's probes and a Prometheus scrape need a few.
pub const DEFAULT_MAX_ADMIN_CONNECTIONS: usize = 64;
/// HTTP/1 connections to one endpoint (Envoy's default circuit-breaker `max_connections`
/// is 1,024 per cluster; per endpoint is stricter only for one-endpoint services).
pub const DEFAULT_MAX_HTTP1_CONNECTIONS_PER_ENDPOINT: usize = 1_024;
/// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` advertised to clients. Above RFC 9113's
/// recommended minimum of 100 so that a gRPC client multiplexing every call over one
/// connection is not throttled; bounded so that one connection cannot start unbounded
/// work (Go's server uses 250, Envoy 2³¹ − 1, hyper 200).
pub const DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS: u32 = 1_000;
/// How often an HTTP/2 server connection pings its client, to find dead peers.
pub const DEFAULT_HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
/// How long a ping may stay unacknowledged before the connection is closed.
pub const DEFAULT_HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Streams a client may open and reset before the proxy accepts them, before GOAWAY
/// (the "rapid reset" attack, CVE-2023-44487; h2's default).
pub const DEFAULT_HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams the proxy may reset because of the client's protocol errors before GOAWAY
/// (RUSTSEC-2024-0003; hyper's default).
pub const DEFAULT_HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1_024;
/// How long an HTTP/1 client may take to send a request head, from its first byte.
/// nginx's `client_header_timeout` is 60 s, hyper's default 30 s; a sidecar's clients are
/// local or proxies, so 30 s it is.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a kept-alive HTTP/1 client connection may wait for its next request with
/// nothing sent before the proxy closes it: Envoy's downstream `idle_timeout` default,
/// longer than the idle pools of common clients (Go 90 s, OkHttp 5 min) and of a peer
/// proxy (90 s), so that they, not the proxy, close first, and none of their requests
/// meets the proxy's close.
pub const DEFAULT_HTTP1_IDLE_TIMEOUT: Duration = Duration::from_secs(3_600);
/// How long an HTTP/2 client connection may carry no stream before the proxy closes it
/// (with GOAWAY, so that no request meets the close): Envoy's downstream `idle_timeout`
/// default, as for HTTP/1; gRPC clients close their own idle channels after 30 min.
pub const DEFAULT_HTTP2_IDLE_TIMEOUT: Duration = Duration::from_secs(3_600);
/// The admin listener's header read timeout: probes and scrapes send their head at once.
pub const DEFAULT_ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an opaque TCP connection may carry no byte either way before it is closed
/// (Envoy's `tcp_proxy` default `idle_timeout`).
pub const DEFAULT_OPAQUE_IDLE_TIMEOUT: Duration = Duration::from_secs(3_600);
/// How long an outbound upstream connection (pooled HTTP/1, HTTP/2, or a mutual TLS
/// session to a peer proxy) may sit unused before the proxy closes it: 90 s, what it was
/// before it was a flag, between Envoy's 1 h (`common_http_protocol_options.idle_timeout`)
/// and Linkerd's 3 s for HTTP/1 pools. A peer proxy keeps its sessions open longer than
/// any application's keep-alive, so reusing them is safe; an off-mesh server closing
/// first is covered by the unsent-request retry.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: IdleTimeout = IdleTimeout::DEFAULT;
/// How long the inbound proxy's connection to its own application may sit unused before
/// the proxy closes it: 1 s, below the keep-alive timeouts of common servers (gunicorn
/// 2 s, Node.js and uvicorn 5 s, Apache 5 s), so that the proxy closes first. When the
/// application closes an idle connection just as the proxy writes a request on it, the
/// request may have reached the application and cannot be retried safely: the client
/// gets a 502 (Envoy's well-known `503 UC` with Node.js). A new loopback connection costs
/// tens of microseconds.
pub const DEFAULT_APP_IDLE_TIMEOUT: IdleTimeout = IdleTimeout::APP_DEFAULT;
/// How long a client may pause in the middle of a request body (Envoy's
/// `stream_idle_timeout` default).
pub const DEFAULT_REQUEST_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Total size of a request's header fields, names plus values (Envoy's
/// `max_request_headers_kb` default of 60 KiB).
pub const DEFAULT_MAX_REQUEST_HEADERS_BYTES: usize = 60 * 1024;
/// One header field, name plus value (twice nginx's 8 KiB `large_client_header_buffers`
/// line, since tokens and cookies grow).
pub const DEFAULT_MAX_HEADER_LINE_BYTES: usize = 16 * 1024;
/// The request target (nginx answers 414 above 8 KiB; Envoy's limit is the whole head).
pub const DEFAULT_MAX_REQUEST_TARGET_BYTES: usize = 8 * 1024;
/// Header fields per request (Envoy's `max_headers_count` and hyper's HTTP/1 default).
pub const DEFAULT_MAX_REQUEST_HEADERS_COUNT: usize = 100;
/// The admin listener's request head size: its requests are a few hundred bytes.
pub const ADMIN_MAX_HEADER_BYTES: usize = 8 * 1024;

/// The proxy's limits; [`Limits::default`] holds the documented defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Accepted connections per transparent or forward listener.
    pub max_connections: usize,
    /// Accepted connections on the admin listener.
    pub max_admin_connections: usize,
    /// HTTP/1 connections to one endpoint; a request that would need one more is answered
    /// 503 `upstream_connection_limit` (or tried on another endpoint).
    pub max_http1_connections_per_endpoint: usize,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` advertised to clients.
    pub http2_max_concurrent_streams: u32,
    /// Interval of HTTP/2 keep-alive pings to clients.
    pub http2_keepalive_interval: Duration,
    /// How long a keep-alive ping may go unanswered.
    pub http2_keepalive_timeout: Duration,
    /// h2's limit on streams reset by the client before being accepted.
    pub http2_max_pending_accept_reset_streams: usize,
    /// hyper's limit on streams reset because of the client's errors.
    pub http2_max_local_error_reset_streams: usize,
    /// How long an HTTP/1 request head may take to arrive, from its first byte.
    pub header_read_timeout: Duration,
    /// How long a kept-alive HTTP/1 client connection may wait for its next request.
    pub http1_idle_timeout: Duration,
    /// How long an HTTP/2 client connection may carry no stream.
    pub http2_idle_timeout: Duration,
    /// The same on the admin listener.
    pub admin_header_read_timeout: Duration,
    /// How long an opaque TCP connection may be silent both ways.
    pub opaque_idle_timeout: Duration,
    /// How long a request body may pause between two chunks.
    pub request_body_idle_timeout: Duration,
    /// How long an outbound upstream connection may sit unused before it is closed.
    pub upstream_idle_timeout: IdleTimeout,
    /// How long a connection to the local application may sit unused before it is closed.
    pub app_idle_timeout: IdleTimeout,
    /// Total bytes of a request's header names and values.
    pub max_request_headers_bytes: usize,
    /// Bytes of one header field's name and value.
    pub max_header_line_bytes: usize,
    /// Bytes of the request target.
    pub max_request_target_bytes: usize,
    /// Header fields per request.
    pub max_request_headers_count: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_admin_connections: DEFAULT_MAX_ADMIN_CONNECTIONS,
            max_http1_connections_per_endpoint: DEFAULT_MAX_HTTP1_CONNECTIONS_PER_ENDPOINT,
            http2_max_concurrent_streams: DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS,
            http2_keepalive_interval: DEFAULT_HTTP2_KEEPALIVE_INTERVAL,
            http2_keepalive_timeout: DEFAULT_HTTP2_KEEPALIVE_TIMEOUT,
            http2_max_pending_accept_reset_streams: DEFAULT_HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS,
            http2_max_local_error_reset_streams: DEFAULT_HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            http1_idle_timeout: DEFAULT_HTTP1_IDLE_TIMEOUT,
            http2_idle_timeout: DEFAULT_HTTP2_IDLE_TIMEOUT,
            admin_header_read_timeout: DEFAULT_ADMIN_HEADER_READ_TIMEOUT,
            opaque_idle_timeout: DEFAULT_OPAQUE_IDLE_TIMEOUT,
            request_body_idle_timeout: DEFAULT_REQUEST_BODY_IDLE_TIMEOUT,
            upstream_idle_timeout: DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            app_idle_timeout: DEFAULT_APP_IDLE_TIMEOUT,
            max_request_headers_bytes: DEFAULT_MAX_REQUEST_HEADERS_BYTES,
            max_header_line_bytes: DEFAULT_MAX_HEADER_LINE_BYTES,
            max_request_target_bytes: DEFAULT_MAX_REQUEST_TARGET_BYTES,
            max_request_headers_count: DEFAULT_MAX_REQUEST_HEADERS_COUNT,
        }
    }
}

impl Limits {
    /// What each endpoint's connection pools are built with.
    pub fn upstream_pools(&self) -> PoolLimits {
        PoolLimits {
            max_http1: self.max_http1_connections_per_endpoint,
            idle_timeout: self.upstream_idle_timeout,
        }
    }

    /// What the inbound proxy's connection pools to the local application are built with.
    pub fn app_pools(&self) -> PoolLimits {
        PoolLimits {
            max_http1: self.max_http1_connections_per_endpoint,
            idle_timeout: self.app_idle_timeout,
        }
    }

    /// The size hyper's HTTP/1 parser stops at (431 without a `weft-error` header): the
    /// request line and every header line with their delimiters, which the per-request
    /// check cannot see. Set above the limits the proxy answers itself, so that a head
    /// within them always reaches the precise check.
    pub fn http1_hard_head_bytes(&self) -> usize {
        // Twice the answered limits, plus ": " and CRLF per field and a request line: a
        // client twice over a limit still gets the precise answer, and a connection's
        // head buffer stays well under hyper's default of ~400 KB.
        let per_field = 4usize.saturating_mul(self.max_request_headers_count);
        self.max_request_headers_bytes
            .saturating_add(self.max_request_target_bytes)
            .saturating_mul(2)
            .saturating_add(per_field)
            .saturating_add(1024)
            // hyper's minimum buffer.
            .max(8192)
    }

    /// HTTP/2's `SETTINGS_MAX_HEADER_LIST_SIZE`, which counts 32 bytes per field on top of
    /// names and values (RFC 9113 §6.5.2); above it h2 refuses the stream itself.
    pub fn http2_header_list_size(&self) -> u32 {
        let per_field = 32usize.saturating_mul(self.max_request_headers_count.saturating_add(8));
        let total = self
            .max_request_headers_bytes
            .saturating_add(self.max_request_target_bytes)
            .saturating_mul(2)
            .saturating_add(per_field)
            .saturating_add(1024);
        u32::try_from(total).unwrap_or(u32::MAX)
    }
}

/// Which limit refused something: the `limit` label of `weft_limit_refusals_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// An inbound listener's connection limit.
    InboundConnections,
    /// An outbound or forward listener's connection limit.
    OutboundConnections,
    /// The admin listener's connection limit.
    AdminConnections,
    /// HTTP/1 connections to one endpoint.
    UpstreamHttp1Connections,
    /// The HTTP/1 header read timeout.
    HeaderReadTimeout,
    /// The opaque TCP idle timeout.
    OpaqueIdleTimeout,
    /// The request body idle timeout.
    RequestBodyIdleTimeout,
    /// Total header bytes.
    RequestHeadersBytes,
    /// hyper's hard stop on an HTTP/1 request head (bytes, or more than 100 fields), or
    /// h2's on a header list: the peer gets a bare 431 or a refused stream.
    RequestHead,
    /// One header field's size.
    HeaderLineBytes,
    /// The request target's size.
    RequestTargetBytes,
    /// The number of header fields.
    RequestHeadersCount,
}

impl Limit {
    /// Every limit, for tests and documentation.
    pub const ALL: [Limit; 12] = [
        Limit::InboundConnections,
        Limit::OutboundConnections,
        Limit::AdminConnections,
        Limit::UpstreamHttp1Connections,
        Limit::HeaderReadTimeout,
        Limit::OpaqueIdleTimeout,
        Limit::RequestBodyIdleTimeout,
        Limit::RequestHeadersBytes,
        Limit::RequestHead,
        Limit::HeaderLineBytes,
        Limit::RequestTargetBytes,
        Limit::RequestHeadersCount,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Limit::InboundConnections => "inbound_connections",
            Limit::OutboundConnections => "outbound_connections",
            Limit::AdminConnections => "admin_connections",
            Limit::UpstreamHttp1Connections => "upstream_http1_connections",
            Limit::HeaderReadTimeout => "header_read_timeout",
            Limit::OpaqueIdleTimeout => "opaque_idle_timeout",
            Limit::RequestBodyIdleTimeout => "request_body_idle_timeout",
            Limit::RequestHeadersBytes => "request_headers_bytes",
            Limit::RequestHead => "request_head",
            Limit::HeaderLineBytes => "header_line_bytes",
            Limit::RequestTargetBytes => "request_target_bytes",
            Limit::RequestHeadersCount => "request_headers_count",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_stops_sit_above_the_answered_limits() {
        let l = Limits::default();
        assert!(
            l.http1_hard_head_bytes() > l.max_request_headers_bytes + l.max_request_target_bytes
        );
        assert!(l.http2_header_list_size() as usize > l.max_request_headers_bytes);
        let names: std::collections::HashSet<_> = Limit::ALL.iter().map(|l| l.as_str()).collect();
        assert_eq!(names.len(), Limit::ALL.len());
    }
}
