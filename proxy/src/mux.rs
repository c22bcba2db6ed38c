//! HTTP/1 requests carried over the one HTTP/2 connection between two proxies, and
//! restored to HTTP/1 at the far side.
//!
//! ```text
//!  app ─HTTP/1─▶ outbound ── to_mux: HTTP/2 stream, `weft-orig-proto: HTTP/1.1`, ─▶ inbound
//!                 proxy        Host → :authority (ALPN weft-mux, mutual TLS)        proxy
//!                                                                                     │ restore:
//!  app ◀─HTTP/1── HTTP/1.1 request, Host from :authority, origin-form target ◀───────┘
//! ```
//!
//! Every HTTP request from one proxy to one meshed endpoint travels on one HTTP/2
//! connection in a mutual TLS session whose ALPN is [`crate::identity::ALPN_MUX`]. The
//! client's own HTTP/2 requests go as they are; an HTTP/1 request becomes an HTTP/2 stream
//! carrying its version in [`ORIG_PROTO`], and the inbound proxy turns it back into the
//! HTTP/1 request the application expects. What HTTP/1 says per connection needs no
//! carrying: hop-by-hop fields are removed before either hop (as for any proxied request),
//! and the body's framing follows from `content-length`, which HTTP/2 keeps: with it the
//! far side sends a length, without it `chunked`.
//!
//! Requests that turn the connection into a byte stream (`Upgrade`, such as WebSocket, and
//! `CONNECT`) are not multiplexed: they keep a TLS session of their own (ALPN
//! `weft-http1`), as Linkerd's orig-proto upgrade also leaves them on HTTP/1. A tunnel
//! lives as long as the application wants, so it gains nothing from sharing a connection,
//! and an HTTP/2 stream would add per-stream flow control to every byte of it.

use std::str::FromStr;

use http::{
    HeaderName, HeaderValue, Method, Request, Response, Uri, Version,
    header::{HOST, TRANSFER_ENCODING, UPGRADE},
    uri::{Authority, PathAndQuery, Scheme},
};

/// The request header that carries an HTTP/1 request's version across the mux
/// connection: `HTTP/1.1` or `HTTP/1.0`. The inbound side honours it only on a
/// [`crate::identity::ALPN_MUX`] session and removes it before the application.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("weft-orig-proto");

/// Whether an HTTP/1 request may travel multiplexed: anything but an upgrade or a
/// `CONNECT`, whose connection becomes a tunnel.
pub fn can_mux<B>(req: &Request<B>) -> bool {
    req.version() <= Version::HTTP_11
        && req.method() != Method::CONNECT
        && !req.headers().contains_key(UPGRADE)
}

/// Turns an HTTP/1 request in origin form (as the HTTP/1 pool takes it: `Host` set) into
/// the HTTP/2 request that carries it: version 2, `:authority` from `Host` (or
/// `fallback`, the endpoint, when `Host` is not an authority, in which case `Host` stays
/// as a field), and [`ORIG_PROTO`]. [`restore`] undoes it.
pub fn to_mux<B>(req: &mut Request<B>, fallback: &dyn Fn() -> Option<Authority>) {
    let orig = if req.version() == Version::HTTP_10 {
        HeaderValue::from_static("HTTP/1.0")
    } else {
        HeaderValue::from_static("HTTP/1.1")
    };
    let from_host = req
        .headers()
        .get(HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok());
    let authority = match from_host {
        Some(a) => {
            req.headers_mut().remove(HOST);
            Some(a)
        }
        None => fallback(),
    };
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = authority;
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    // HTTP/2 frames the body itself (DATA frames, END_STREAM) and refuses the field.
    req.headers_mut().remove(TRANSFER_ENCODING);
    req.headers_mut().insert(ORIG_PROTO, orig);
    *req.version_mut() = Version::HTTP_2;
}

/// Restores the HTTP/1 request an HTTP/2 request from a mux session carries, when it
/// carries one ([`ORIG_PROTO`] present and valid, not `CONNECT`): its version, `Host`
/// from `:authority` unless it came as a field, an origin-form target, and
/// `Transfer-Encoding: chunked` for an HTTP/1.1 body without a length
/// ([`crate::http::keep_http1_body`]). The header is removed in every case. Returns
/// whether the request was restored.
pub fn restore<B: http_body::Body>(req: &mut Request<B>) -> bool {
    let Some(orig) = req.headers_mut().remove(ORIG_PROTO) else {
        return false;
    };
    let version = match orig.as_bytes() {
        b"HTTP/1.1" => Version::HTTP_11,
        b"HTTP/1.0" => Version::HTTP_10,
        _ => return false,
    };
    if req.version() != Version::HTTP_2 || req.method() == Method::CONNECT {
        return false;
    }
    if !req.headers().contains_key(HOST)
        && let Some(a) = req.uri().authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        req.headers_mut().insert(HOST, v);
    }
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from(path);
    *req.version_mut() = version;
    crate::http::keep_http1_body(req);
    true
}

/// The response to a multiplexed HTTP/1 request, as its HTTP/1 client reads it.
pub fn response_to_http1<B>(resp: &mut Response<B>) {
    *resp.version_mut() = Version::HTTP_11;
}

/// The authority of `addr`, the fallback of [`to_mux`].
pub fn authority_of(addr: std::net::SocketAddr) -> Option<Authority> {
    Authority::from_str(&addr.to_string()).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn h1(target: &str, host: Option<&str>) -> Request<String> {
        let mut b = Request::get(target).version(Version::HTTP_11);
        if let Some(h) = host {
            b = b.header(HOST, h);
        }
        b.header("x-app", "1").body(String::new()).unwrap()
    }

    fn none() -> Option<Authority> {
        Authority::from_str("198.18.0.7:8080").ok()
    }

    /// A body still streaming, of unknown length.
    struct Streamed;

    impl http_body::Body for Streamed {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
            std::task::Poll::Pending
        }
    }

    #[test]
    fn an_http1_request_survives_the_round_trip() {
        for host in ["cart", "cart.shop.svc:8080", "[::1]:80", "Cart.Example"] {
            let mut req = h1("/items?id=1", Some(host));
            assert!(can_mux(&req));
            to_mux(&mut req, &none);
            assert_eq!(req.version(), Version::HTTP_2);
            assert_eq!(req.uri().authority().unwrap().as_str(), host);
            assert_eq!(req.uri().scheme(), Some(&Scheme::HTTP));
            assert!(
                req.headers().get(HOST).is_none(),
                "Host travels as :authority"
            );
            assert_eq!(req.headers()[ORIG_PROTO], "HTTP/1.1");
            assert!(restore(&mut req));
            assert_eq!(req.version(), Version::HTTP_11);
            assert_eq!(req.uri().to_string(), "/items?id=1");
            assert_eq!(req.headers()[HOST], host);
            assert_eq!(req.headers()["x-app"], "1");
            assert!(req.headers().get(ORIG_PROTO).is_none());
        }
    }

    #[test]
    fn http_1_0_keeps_its_version() {
        let mut req = h1("/", Some("cart"));
        *req.version_mut() = Version::HTTP_10;
        to_mux(&mut req, &none);
        assert!(restore(&mut req));
        assert_eq!(req.version(), Version::HTTP_10);
    }

    #[test]
    fn a_host_that_is_no_authority_stays_a_field() {
        let mut req = h1("/", Some("a b"));
        to_mux(&mut req, &none);
        assert_eq!(req.uri().authority().unwrap().as_str(), "198.18.0.7:8080");
        assert_eq!(req.headers()[HOST], "a b");
        assert!(restore(&mut req));
        assert_eq!(req.headers()[HOST], "a b");
    }

    #[test]
    fn upgrades_and_connect_are_not_multiplexed() {
        let mut up = h1("/ws", Some("cart"));
        up.headers_mut()
            .insert(UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!can_mux(&up));
        let connect = Request::connect("db:5432").body(()).unwrap();
        assert!(!can_mux(&connect));
        let h2 = Request::get("http://cart/")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        assert!(!can_mux(&h2));
    }

    #[test]
    fn restore_ignores_requests_without_or_with_a_bad_marker() {
        let mut req = Request::get("http://cart/x")
            .version(Version::HTTP_2)
            .body(String::new())
            .unwrap();
        assert!(!restore(&mut req));
        assert_eq!(req.version(), Version::HTTP_2);
        req.headers_mut()
            .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/3"));
        assert!(!restore(&mut req));
        assert_eq!(req.version(), Version::HTTP_2);
        assert!(req.headers().get(ORIG_PROTO).is_none(), "removed anyway");
        let mut connect = Request::connect("db:5432")
            .version(Version::HTTP_2)
            .header(ORIG_PROTO, "HTTP/1.1")
            .body(String::new())
            .unwrap();
        assert!(!restore(&mut connect));
    }

    /// The mux carries no `Transfer-Encoding`; a body that came without a length goes on
    /// `chunked` (hyper's HTTP/1 client would send a `GET` without it), one with a length
    /// keeps it, and an ended one gets no framing.
    #[test]
    fn a_body_without_a_length_is_restored_chunked() {
        let mut req = h1("/search", Some("cart")).map(|_| Streamed);
        req.headers_mut()
            .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        to_mux(&mut req, &none);
        assert!(req.headers().get(TRANSFER_ENCODING).is_none());
        assert!(restore(&mut req));
        assert_eq!(req.headers()[TRANSFER_ENCODING], "chunked");

        let mut req = h1("/search", Some("cart"));
        *req.body_mut() = "q".to_string();
        req.headers_mut()
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("1"));
        to_mux(&mut req, &none);
        assert!(restore(&mut req));
        assert!(req.headers().get(TRANSFER_ENCODING).is_none());

        let mut req = h1("/", Some("cart"));
        to_mux(&mut req, &none);
        assert!(restore(&mut req));
        assert!(req.headers().get(TRANSFER_ENCODING).is_none());
    }
}
