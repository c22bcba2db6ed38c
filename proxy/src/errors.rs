//! The proxy's error vocabulary: every failure the proxy answers for itself is classified
//! once, here, into an HTTP status, a stable reason code sent in the `weft-error` response
//! header, and the `reason` label of `weft_errors_total`.
//!
//! Codes are part of the proxy's public contract: add new ones, never rename old ones.

use http::StatusCode;

/// The response header that carries [`ErrorCode::as_str`] on responses the proxy generated.
pub const ERROR_HEADER: &str = "weft-error";
/// The response header by which an inbound proxy tells the peer proxy that sent a request
/// over mutual TLS that the request never reached the application: the connect to it
/// failed, timed out or hit the connection limit, or the application refused its stream
/// ([`ErrorCode::never_sent`]). The inbound
/// proxy sets it on those answers of its own only, and removes it from every response of
/// the application, so that the application cannot forge it; the outbound proxy trusts
/// it only from a meshed endpoint and removes it from every response, so that no
/// application sees it. Its value is `1`; its presence is what counts.
pub const UNSENT_HEADER: http::HeaderName = http::HeaderName::from_static("weft-unsent");
/// The response header naming the Policy (`namespace/name`) that denied a request
/// ([`ErrorCode::Forbidden`]).
pub const POLICY_HEADER: &str = "weft-policy";

/// Why the proxy, rather than the upstream, produced a response or dropped a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The destination service has no endpoints in the active config (503).
    NoEndpoints,
    /// A forward listener names a service the active config does not have (503).
    ServiceNotFound,
    /// Connecting to the chosen endpoint failed, for example it refused (502).
    ConnectFailed,
    /// Connecting to the chosen endpoint took longer than the connect timeout (504).
    ConnectTimeout,
    /// The upstream did not send response headers within the service's timeout (504), or
    /// its body was still streaming at that deadline (cut).
    ResponseTimeout,
    /// The upstream connection broke or spoke invalid HTTP before a response (502).
    UpstreamFailed,
    /// The endpoint has as many HTTP/1 connections as allowed, all busy (503).
    UpstreamConnectionLimit,
    /// The HTTP/2 upstream did not process the request (503): it refused the stream
    /// (`REFUSED_STREAM`) or was going away (`GOAWAY`) and left it out.
    UpstreamRefused,
    /// The request breaks a rule of RFC 9110/9112/9113 a proxy must enforce, such as a
    /// missing, repeated or invalid `Host` (400).
    InvalidRequest,
    /// The request target is longer than the limit (414).
    RequestTargetTooLong,
    /// The header fields, one of them, or their count exceed a limit (431).
    RequestHeadersTooLarge,
    /// The client paused in the middle of the request body for longer than allowed (408).
    RequestBodyTimeout,
    /// The client's request body broke off: its framing was malformed (a bad chunk), or the
    /// client's connection or stream failed before the body ended (400). The failed
    /// attempt is the client's doing: it is neither retried nor held against the endpoint.
    RequestBodyIncomplete,
    /// The Route rule picked a backend whose Service does not exist (500), as Gateway API
    /// answers a backend reference that does not resolve.
    BackendNotFound,
    /// A Route rule's fault injection aborted the request (its configured status; 503 is
    /// what [`ErrorCode::status`] gives, for a fault that names none).
    FaultInjected,
    /// The workload's rate limit refused the request (429, with `Retry-After`).
    RateLimited,
    /// Every attempt the Route rule allowed ran past its `perTryTimeout` (504).
    PerTryTimeout,
    /// A connection-pool limit of the service's Breaker (`maxRequests`, `maxConnections`,
    /// `maxPendingRequests`) is reached; refused at once, nothing was sent (503).
    Overloaded,
    /// The meshed endpoint's certificate does not lead to the mesh's trust bundle: signed
    /// by another CA, or not a mesh certificate at all (502).
    TlsPeerUntrusted,
    /// The meshed endpoint's certificate has expired (502).
    TlsPeerExpired,
    /// The meshed endpoint's certificate is not valid yet (502), a clock skew or a
    /// certificate issued for the future.
    TlsPeerNotYetValid,
    /// The meshed endpoint presented a trusted certificate for another identity than the
    /// config says it has (502); never retried in plain text.
    TlsIdentityMismatch,
    /// The mutual TLS handshake with the meshed endpoint failed otherwise: it refused this
    /// proxy's certificate, spoke no TLS 1.3, or this proxy has no certificate yet (502).
    TlsHandshakeFailed,
    /// A Policy's authorization denied the request (403; gRPC `PERMISSION_DENIED`); the
    /// `weft-policy` header names the Policy.
    Forbidden,
    /// The workload's mTLS mode is `strict` and the client spoke plain text, without a
    /// mesh identity (403; gRPC `UNAUTHENTICATED`).
    MtlsRequired,
    /// The workload's mTLS mode is `strict` and the client spoke TLS but presented no
    /// client certificate, so it has no mesh identity (403; gRPC `UNAUTHENTICATED`).
    ClientCertificateRequired,
}

impl ErrorCode {
    /// Every code, for tests and documentation.
    pub const ALL: [ErrorCode; 26] = [
        ErrorCode::NoEndpoints,
        ErrorCode::ServiceNotFound,
        ErrorCode::ConnectFailed,
        ErrorCode::ConnectTimeout,
        ErrorCode::ResponseTimeout,
        ErrorCode::UpstreamFailed,
        ErrorCode::UpstreamConnectionLimit,
        ErrorCode::UpstreamRefused,
        ErrorCode::InvalidRequest,
        ErrorCode::RequestTargetTooLong,
        ErrorCode::RequestHeadersTooLarge,
        ErrorCode::RequestBodyTimeout,
        ErrorCode::RequestBodyIncomplete,
        ErrorCode::BackendNotFound,
        ErrorCode::FaultInjected,
        ErrorCode::RateLimited,
        ErrorCode::PerTryTimeout,
        ErrorCode::Overloaded,
        ErrorCode::TlsPeerUntrusted,
        ErrorCode::TlsPeerExpired,
        ErrorCode::TlsPeerNotYetValid,
        ErrorCode::TlsIdentityMismatch,
        ErrorCode::TlsHandshakeFailed,
        ErrorCode::Forbidden,
        ErrorCode::MtlsRequired,
        ErrorCode::ClientCertificateRequired,
    ];

    /// The stable text sent in the `weft-error` header and used as the metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NoEndpoints => "no_endpoints",
            ErrorCode::ServiceNotFound => "service_not_found",
            ErrorCode::ConnectFailed => "connect_failed",
            ErrorCode::ConnectTimeout => "connect_timeout",
            ErrorCode::ResponseTimeout => "response_timeout",
            ErrorCode::UpstreamFailed => "upstream_failed",
            ErrorCode::UpstreamConnectionLimit => "upstream_connection_limit",
            ErrorCode::UpstreamRefused => "upstream_refused",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::RequestTargetTooLong => "request_target_too_long",
            ErrorCode::RequestHeadersTooLarge => "request_headers_too_large",
            ErrorCode::RequestBodyTimeout => "request_body_timeout",
            ErrorCode::RequestBodyIncomplete => "request_body_incomplete",
            ErrorCode::BackendNotFound => "backend_not_found",
            ErrorCode::FaultInjected => "fault_injected",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::PerTryTimeout => "per_try_timeout",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::TlsPeerUntrusted => "tls_peer_untrusted",
            ErrorCode::TlsPeerExpired => "tls_peer_expired",
            ErrorCode::TlsPeerNotYetValid => "tls_peer_not_yet_valid",
            ErrorCode::TlsIdentityMismatch => "tls_identity_mismatch",
            ErrorCode::TlsHandshakeFailed => "tls_handshake_failed",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::MtlsRequired => "mtls_required",
            ErrorCode::ClientCertificateRequired => "client_certificate_required",
        }
    }

    /// The HTTP status the proxy answers with.
    pub const fn status(self) -> StatusCode {
        match self {
            ErrorCode::NoEndpoints
            | ErrorCode::ServiceNotFound
            | ErrorCode::UpstreamConnectionLimit
            | ErrorCode::UpstreamRefused
            | ErrorCode::FaultInjected
            | ErrorCode::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::BackendNotFound => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Forbidden
            | ErrorCode::MtlsRequired
            | ErrorCode::ClientCertificateRequired => StatusCode::FORBIDDEN,
            ErrorCode::InvalidRequest | ErrorCode::RequestBodyIncomplete => StatusCode::BAD_REQUEST,
            ErrorCode::RequestTargetTooLong => StatusCode::URI_TOO_LONG,
            ErrorCode::RequestHeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorCode::RequestBodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::ConnectFailed
            | ErrorCode::UpstreamFailed
            | ErrorCode::TlsPeerUntrusted
            | ErrorCode::TlsPeerExpired
            | ErrorCode::TlsPeerNotYetValid
            | ErrorCode::TlsIdentityMismatch
            | ErrorCode::TlsHandshakeFailed => StatusCode::BAD_GATEWAY,
            ErrorCode::ConnectTimeout | ErrorCode::ResponseTimeout | ErrorCode::PerTryTimeout => {
                StatusCode::GATEWAY_TIMEOUT
            }
        }
    }
}

impl ErrorCode {
    /// Whether the proxy answers with this code because the request never reached the
    /// application: no connection could be had (refused, timed out, or the endpoint's
    /// connection limit left none), or the HTTP/2 application refused its stream unread.
    /// Any endpoint may take it. (The `tls_*` codes mean that too, but arise only between
    /// proxies, never in front of an application.)
    pub const fn never_sent(self) -> bool {
        matches!(
            self,
            ErrorCode::ConnectFailed
                | ErrorCode::ConnectTimeout
                | ErrorCode::UpstreamConnectionLimit
                | ErrorCode::UpstreamRefused
        )
    }

    /// The gRPC status code sent (as `grpc-status`) when the request was gRPC: gRPC
    /// clients read errors from `grpc-status`, not from the HTTP status.
    pub const fn grpc_status(self) -> u8 {
        match self {
            // DEADLINE_EXCEEDED
            ErrorCode::ResponseTimeout
            | ErrorCode::RequestBodyTimeout
            | ErrorCode::PerTryTimeout => 4,
            // PERMISSION_DENIED, as gRPC maps HTTP 403.
            ErrorCode::Forbidden => 7,
            // UNAUTHENTICATED: the client presented no identity at all.
            ErrorCode::MtlsRequired | ErrorCode::ClientCertificateRequired => 16,
            // INTERNAL: a configuration error, not worth a client's retry.
            ErrorCode::BackendNotFound => 13,
            // INTERNAL, as gRPC maps HTTP 400.
            ErrorCode::InvalidRequest | ErrorCode::RequestBodyIncomplete => 13,
            // RESOURCE_EXHAUSTED
            ErrorCode::RequestTargetTooLong
            | ErrorCode::RequestHeadersTooLarge
            | ErrorCode::RateLimited => 8,
            // UNAVAILABLE: nothing was processed, the client may retry.
            ErrorCode::NoEndpoints
            | ErrorCode::ServiceNotFound
            | ErrorCode::ConnectFailed
            | ErrorCode::ConnectTimeout
            | ErrorCode::UpstreamFailed
            | ErrorCode::UpstreamConnectionLimit
            | ErrorCode::UpstreamRefused
            | ErrorCode::FaultInjected
            | ErrorCode::Overloaded
            | ErrorCode::TlsPeerUntrusted
            | ErrorCode::TlsPeerExpired
            | ErrorCode::TlsPeerNotYetValid
            | ErrorCode::TlsIdentityMismatch
            | ErrorCode::TlsHandshakeFailed => 14,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code has its section in `docs/errors.md` (cause and what to do), that section
    /// states the status the proxy answers with, and the page names no code that does not
    /// exist; and some test of the proxy produces the code and checks for it by name.
    #[test]
    fn every_code_is_documented_and_produced_by_a_test() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let doc = std::fs::read_to_string(dir.join("../docs/errors.md")).unwrap();
        let sections: Vec<&str> = doc.split("\n## ").skip(1).collect();
        for code in ErrorCode::ALL {
            let heading = format!("`{}`", code.as_str());
            let section = sections
                .iter()
                .find(|s| s.lines().next() == Some(heading.as_str()))
                .unwrap_or_else(|| panic!("docs/errors.md has no section for {code}"));
            let status = format!("{} · gRPC {}", code.status().as_u16(), code.grpc_status());
            assert!(
                section.contains(&status),
                "{code}: section lacks {status:?}"
            );
            assert!(
                section.contains("**Cause:**") && section.contains("**What to do:**"),
                "{code}: section lacks cause or what to do"
            );
        }
        assert_eq!(
            sections.len(),
            ErrorCode::ALL.len(),
            "a section for no code"
        );

        let tests: String = std::fs::read_dir(dir.join("tests"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "rs"))
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        for code in ErrorCode::ALL {
            assert!(
                tests.contains(&format!("\"{}\"", code.as_str()))
                    || tests.contains(&format!("weft-error: {}", code.as_str())),
                "no test in proxy/tests checks for {code}"
            );
        }
    }

    /// Only the codes of a connect that never happened, or of a stream the application
    /// never processed, let a peer proxy send the request elsewhere; a broken connection
    /// or a timeout after sending does not.
    #[test]
    fn never_sent_means_the_application_never_processed_it() {
        let never: Vec<&str> = ErrorCode::ALL
            .into_iter()
            .filter(|c| c.never_sent())
            .map(ErrorCode::as_str)
            .collect();
        assert_eq!(
            never,
            [
                "connect_failed",
                "connect_timeout",
                "upstream_connection_limit",
                "upstream_refused"
            ]
        );
    }

    #[test]
    fn codes_are_distinct_header_safe_tokens() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "duplicate {code}");
            assert!(http::HeaderValue::from_str(code.as_str()).is_ok());
            assert!(
                code.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_')
            );
            assert!(code.status().is_server_error() || code.status().is_client_error());
        }
    }
}
