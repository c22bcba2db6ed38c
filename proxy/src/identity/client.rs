//! Gets the proxy's certificate from the operator's identity endpoint and keeps it fresh.
//!
//! ```text
//! key pair (ECDSA P-256, generated here, never sent) ─▶ CSR ─▶ POST /weft.identity.v1/certify
//!   over TLS verified against the last answer's trust bundle (before the first:
//!   --trust-root-file / --trust-roots), Bearer <ServiceAccount token>
//!   ─▶ CertifyResponse ─▶ IdentityStore::install (swap) ─▶ sleep until 65–75 % of the lifetime
//!   on failure: jittered exponential backoff; the old certificate stays until it expires
//! ```

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Request, StatusCode, header::AUTHORIZATION};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use tokio_util::sync::CancellationToken;
use weft_api::identity::{CERTIFY_PATH, CertifyRequest, CertifyResponse, IdentityError};

use super::{CertError, Certified, IdentityStore};
use crate::metrics::Metrics;

/// The header naming the pod (`<namespace>/<name>`), as on the push stream.
const POD_HEADER: &str = "weft-pod";
/// The longest one certificate request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest response read (a chain and a bundle are a few KiB).
const MAX_RESPONSE_BYTES: usize = 256 * 1024;
/// Backoff after a failed request: doubling from the first, up to the last.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Where and how to ask for a certificate, validated at startup.
#[derive(Clone, Debug)]
pub struct IdentityClientConfig {
    /// The operator's identity endpoint, `host:port`.
    pub addr: String,
    /// The name the endpoint's certificate must carry.
    pub server_name: ServerName<'static>,
    /// The roots the endpoint's certificate is verified against (the mesh trust root)
    /// until the first answer; from then on, the latest answer's trust bundle.
    pub trust_roots: RootCertStore,
    /// The projected ServiceAccount token, read afresh for every request (it rotates).
    pub token_file: Option<PathBuf>,
    /// This pod, `<namespace>/<name>`.
    pub pod: String,
    /// The SPIFFE ID this proxy expects, when it knows it.
    pub expected: Option<String>,
}

/// Why a certificate request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The trust root file could not be read or holds no certificate.
    #[error("trust root {path}: {why}")]
    TrustRoot {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The token file could not be read.
    #[error("token file {path}")]
    Token {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Connecting or the TLS handshake with the endpoint failed.
    #[error("connect to the identity endpoint {addr}")]
    Connect {
        /// The endpoint.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("identity request")]
    Http(#[from] hyper::Error),
    /// The request took longer than allowed.
    #[error("identity request timed out after {0:?}")]
    Timeout(Duration),
    /// The operator refused, with its reason.
    #[error("refused with {status}: {reason}: {message}")]
    Refused {
        /// The HTTP status.
        status: StatusCode,
        /// The operator's reason code (`weft_api::identity::reason`).
        reason: String,
        /// The operator's message.
        message: String,
    },
    /// The answer is not a certificate response.
    #[error("invalid response: {0}")]
    BadResponse(String),
    /// Generating the key or the CSR failed.
    #[error("key or CSR generation")]
    Key(#[from] rcgen::Error),
    /// The certificate could not be installed.
    #[error("issued certificate")]
    Cert(#[from] CertError),
}

impl IdentityClientConfig {
    /// Reads the trust root PEM file.
    pub fn read_trust_roots(path: &std::path::Path) -> Result<RootCertStore, ClientError> {
        let pem = std::fs::read(path).map_err(|e| ClientError::TrustRoot {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        Self::parse_trust_roots(&pem, path)
    }

    /// The trust roots in `pem` (certificates in PEM); `from` names where they came from
    /// in errors (a file, or the environment variable that carried them).
    pub fn parse_trust_roots(
        pem: &[u8],
        from: &std::path::Path,
    ) -> Result<RootCertStore, ClientError> {
        let bad = |why: String| ClientError::TrustRoot {
            path: from.to_owned(),
            why,
        };
        let mut roots = RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            roots
                .add(cert.map_err(|e| bad(e.to_string()))?)
                .map_err(|e| bad(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(bad("no certificate in the file".to_owned()));
        }
        Ok(roots)
    }
}

/// Requests certificates and installs them in an [`IdentityStore`].
pub struct IdentityClient {
    config: IdentityClientConfig,
    tls: Arc<ClientConfig>,
    store: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
}

impl IdentityClient {
    /// A client for `config`, installing into `store` and counting into `metrics`.
    pub fn new(
        config: IdentityClientConfig,
        store: Arc<IdentityStore>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ClientError> {
        // The endpoint is verified against the latest answer's bundle once there is one:
        // after a root rotation's "sign with B" step the operator serves from B.
        let verifier = store.operator_verifier(config.trust_roots.clone())?;
        let mut tls = ClientConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::BadResponse(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(IdentityClient {
            config,
            tls: Arc::new(tls),
            store,
            metrics,
        })
    }

    /// Gets a certificate, renews it at 65–75 % of its lifetime, and retries failures
    /// with jittered backoff, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        loop {
            let wait = match self.certify_once().await {
                Ok(c) => {
                    failures = 0;
                    tracing::info!(
                        identity = %c.identity,
                        not_after = c.not_after_unix(),
                        "certificate installed"
                    );
                    c.renew_at()
                        .duration_since(SystemTime::now())
                        .unwrap_or_default()
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    self.metrics.tls.renewal(false, None);
                    self.store.set_error(error.to_string());
                    let keeping = self.store.current().map(|c| c.not_after_unix());
                    tracing::warn!(
                        error = %error,
                        source = ?std::error::Error::source(&error).map(ToString::to_string),
                        failures,
                        keeping_until = ?keeping,
                        "certificate request failed; retrying"
                    );
                    backoff(failures)
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One certificate request: a fresh key, a CSR, the operator's answer installed.
    pub async fn certify_once(&self) -> Result<Arc<Certified>, ClientError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::default();
        if let Some(id) = &self.config.expected {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(id.clone().try_into()?));
        }
        let csr = params.serialize_request(&key)?.pem()?;
        let body = serde_json::to_vec(&CertifyRequest {
            csr,
            identity: self.config.expected.clone(),
        })
        .map_err(|e| ClientError::BadResponse(e.to_string()))?;
        let answer = tokio::time::timeout(REQUEST_TIMEOUT, self.post(body))
            .await
            .map_err(|_| ClientError::Timeout(REQUEST_TIMEOUT))??;
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        // The identity asked for, else the one the operator says it issued: a chain for
        // another, or for another key than `key`, is refused and asked for again.
        let want = self.config.expected.as_deref().unwrap_or(&answer.identity);
        let certified = self.store.install_for(
            Some(want),
            &answer.certificate_chain,
            key_der,
            &answer.trust_bundle,
        )?;
        self.metrics
            .tls
            .renewal(true, Some(certified.not_after_unix()));
        Ok(certified)
    }

    async fn post(&self, body: Vec<u8>) -> Result<CertifyResponse, ClientError> {
        let token = match &self.config.token_file {
            None => None,
            Some(path) => Some(
                tokio::fs::read_to_string(path)
                    .await
                    .map_err(|source| ClientError::Token {
                        path: path.clone(),
                        source,
                    })?
                    .trim()
                    .to_owned(),
            ),
        };
        let addr = &self.config.addr;
        let connect_err = |source| ClientError::Connect {
            addr: addr.clone(),
            source,
        };
        let tcp = tokio::net::TcpStream::connect(addr.as_str())
            .await
            .map_err(connect_err)?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(self.config.server_name.clone(), tcp)
            .await
            .map_err(connect_err)?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let mut req = Request::post(format!("https://{addr}{CERTIFY_PATH}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(POD_HEADER, &self.config.pod);
        if let Some(token) = token {
            req = req.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let mut req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::BadResponse(e.to_string()))?;
        let io = TokioIo::new(tls);
        let resp = if h2 {
            let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await?;
            tokio::spawn(conn);
            sender.send_request(req).await?
        } else {
            *req.version_mut() = http::Version::HTTP_11;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            // Origin-form target for HTTP/1.1.
            *req.uri_mut() = http::Uri::from_static(CERTIFY_PATH);
            req.headers_mut().insert(
                http::header::HOST,
                http::HeaderValue::from_str(addr)
                    .map_err(|e| ClientError::BadResponse(e.to_string()))?,
            );
            sender.send_request(req).await?
        };
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| ClientError::BadResponse(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let (reason, message) = match serde_json::from_slice::<IdentityError>(&bytes) {
                Ok(e) => (e.reason, e.message),
                Err(_) => (
                    "unknown".to_owned(),
                    String::from_utf8_lossy(&bytes).chars().take(200).collect(),
                ),
            };
            return Err(ClientError::Refused {
                status,
                reason,
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadResponse(e.to_string()))
    }
}

/// Exponential backoff with jitter: a random duration between half and all of
/// `BACKOFF_MIN × 2^(failures-1)`, capped at `BACKOFF_MAX`.
fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let full = BACKOFF_MIN.saturating_mul(1 << exp).min(BACKOFF_MAX);
    let jitter: f64 = rand::random_range(0.5..=1.0);
    full.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_jittered_and_capped() {
        for _ in 0..100 {
            let first = backoff(1);
            assert!(
                first >= BACKOFF_MIN / 2 && first <= BACKOFF_MIN,
                "{first:?}"
            );
            let late = backoff(40);
            assert!(late >= BACKOFF_MAX / 2 && late <= BACKOFF_MAX, "{late:?}");
        }
    }
}
