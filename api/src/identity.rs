//! The identity protocol between `weft-proxy` and `weft-operator` (`weft.identity.v1`):
//! a proxy proves who it is with its projected ServiceAccount token and gets a short-lived
//! certificate for its SPIFFE identity, signed by the mesh's issuing CA.
//!
//! ```text
//! proxy                                                    operator (identity port, TLS
//!   key pair generated locally, never leaves the pod        with a certificate from the
//!   POST /weft.identity.v1/certify ────────────────────▶    mesh root)
//!     authorization: Bearer <SA token, audience weft>        TokenReview; the identity
//!     weft-pod: <namespace>/<name>                           asked for must be the token's
//!     body: CertifyRequest { csr (PEM) }                     ServiceAccount's
//!   ◀──── 200 CertifyResponse { certificate chain, trust bundle, expiry }
//!   ◀──── 4xx/5xx IdentityError { reason, message }
//! ```
//!
//! Exactly, as the operator serves it (`weft-operator --identity-addr`, default port 15012):
//!
//! - TLS 1.3 only, ALPN `h2` or `http/1.1`; the serving certificate chains to the trust
//!   root (a proxy verifies it against the trust bundle it was given, e.g. at injection)
//!   and names the operator Service (`weft-operator.<ns>.svc` and variants by default).
//! - `POST` [`CERTIFY_PATH`], headers `authorization: Bearer <token>` (required) and
//!   `weft-pod: <namespace>/<name>` ([`crate::push::POD_HEADER`], required), body JSON
//!   [`CertifyRequest`] of at most [`MAX_REQUEST_BYTES`].
//! - 200 with [`CertifyResponse`]; any other status with [`IdentityError`]: 400
//!   `bad_request` (also 404 for another method or path), 401 `token_invalid`, 403
//!   `not_a_service_account` or `identity_mismatch`, 413 `too_large`, 429 `rate_limited` or
//!   `source_in_flight` (with `Retry-After` in seconds), 503 `unavailable`. Retry 429 and 503 with backoff;
//!   the others will not change by retrying with the same request.
//! - The token's namespace must be `weft-pod`'s, and a token bound to a pod must be bound
//!   to `weft-pod`'s pod. The CSR's self-signature must verify; its subject and DNS/IP
//!   names are ignored, but a URI SAN it asks for must be the token's SPIFFE ID.
//! - The leaf has an empty subject, that SPIFFE ID as its only (critical) SAN, EKU client
//!   and server auth, and lives the operator's `--identity-lifetime` (24 h by default), or
//!   less if the issuing CA expires sooner: read `not_after`, not the lifetime.
//!
//! The identity of a ServiceAccount `sa` in namespace `ns` is
//! `spiffe://<trust domain>/ns/<ns>/sa/<sa>` ([`spiffe_id`]), carried as the certificate's
//! only URI SAN.

use serde::{Deserialize, Serialize};

/// The request path of a certificate request.
pub const CERTIFY_PATH: &str = "/weft.identity.v1/certify";

/// The trust domain when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The lifetime of an issued certificate when none is configured (24 h).
pub const DEFAULT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The largest certificate request body the operator reads (a CSR is about 1 KiB).
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// The SPIFFE ID of ServiceAccount `sa` in namespace `ns`.
pub fn spiffe_id(trust_domain: &str, ns: &str, sa: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}")
}

/// A proxy's certificate request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertifyRequest {
    /// A PKCS#10 certificate signing request in PEM, for the key the proxy generated. Its
    /// subject and extensions are ignored (the operator issues for the identity the token
    /// proves), except that a URI SAN in it must be that identity (`identity_mismatch`).
    pub csr: String,
    /// The SPIFFE ID the proxy expects, when it knows it: refused (`identity_mismatch`)
    /// if it is not the token's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// An issued certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertifyResponse {
    /// The SPIFFE ID the certificate carries.
    pub identity: String,
    /// The leaf certificate, then the issuing intermediates, in PEM.
    pub certificate_chain: String,
    /// The trust roots peers' certificates are verified against, in PEM.
    pub trust_bundle: String,
    /// When the leaf expires, as seconds since the Unix epoch.
    pub not_after: u64,
}

/// Why a certificate request was refused (the body of every non-200 answer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityError {
    /// A stable reason code, such as `token_invalid` ([`reason`]).
    pub reason: String,
    /// What happened, for logs.
    pub message: String,
}

/// The reason codes of [`IdentityError`], also the `reason` label of the operator's
/// refusal metric.
pub mod reason {
    /// No bearer token, or the TokenReview did not authenticate it (401).
    pub const TOKEN_INVALID: &str = "token_invalid";
    /// The token is not a ServiceAccount's, or not for the `weft` audience (403).
    pub const NOT_A_SERVICE_ACCOUNT: &str = "not_a_service_account";
    /// The identity asked for (or the `weft-pod` namespace) is not the token's (403).
    pub const IDENTITY_MISMATCH: &str = "identity_mismatch";
    /// The body is not a request, or the CSR does not parse or is not self-signed (400).
    pub const BAD_REQUEST: &str = "bad_request";
    /// The body is larger than [`super::MAX_REQUEST_BYTES`] (413).
    pub const TOO_LARGE: &str = "too_large";
    /// Too many requests for this identity, or in flight (429, with `Retry-After`).
    pub const RATE_LIMITED: &str = "rate_limited";
    /// This source address already has as many requests in flight as it may (429, with
    /// `Retry-After`, at once): the operator's `--identity-in-flight-per-source`.
    pub const SOURCE_IN_FLIGHT: &str = "source_in_flight";
    /// The TokenReview or the signing failed (503): retry with backoff.
    pub const UNAVAILABLE: &str = "unavailable";
    /// The CSR's key, or the hash its self-signature uses with it, is not one the mesh's
    /// peers accept (400): ECDSA P-256/SHA-256, P-384/SHA-384, Ed25519, RSA 2048-8192.
    pub const UNSUPPORTED_KEY: &str = "unsupported_key";
    /// So many TokenReviews are in flight that no slot came within its wait (503, with
    /// `Retry-After`): retry.
    pub const REVIEWS_BUSY: &str = "reviews_busy";
}
