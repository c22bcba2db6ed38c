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
    /// subject and extensions are ignored: the operator issues for the identity the token
    /// proves.
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
    /// The TokenReview or the signing failed (503): retry with backoff.
    pub const UNAVAILABLE: &str = "unavailable";
}
