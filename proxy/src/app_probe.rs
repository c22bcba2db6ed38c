//! The application's HTTP probes, repeated by the admin listener for the kubelet.
//!
//! Injection points each application container's `httpGet` probe at the admin port
//! (`/app-health/<container>/<livez|readyz|startupz>`) and hands the original to the
//! proxy in `WEFT_APP_PROBES`, so that a `Strict` Policy, which refuses the kubelet's
//! plain-text, identity-less requests on the inbound listener, does not make the pod
//! unready. The admin port is outside the redirect and outside Policy; what it answers
//! here is fixed by the pod's own spec: one request per probe, to the application on
//! loopback, whose status code (and nothing else) goes back.
//!
//! ```text
//!  WEFT_APP_PROBES (JSON) ──parse once──▶ AppProbes ──▶ Proxy::app_probes
//!  kubelet ─GET /app-health/web/readyz─▶ admin ─▶ AppProbe::check ─GET 127.0.0.1:8080/healthz─▶ app
//!          ◀── the app's status, or 503 + reason (refused, timed out, not HTTP) ──┘
//! ```
//!
//! The connection goes from the proxy's UID, which `init` exempts from the redirect, so
//! it reaches the application directly. A probe with `scheme: HTTPS` is sent over TLS
//! (1.2 or 1.3) without verifying the application's certificate, as the kubelet does. Redirects are never followed (a 3xx is the
//! answer, which the kubelet counts as success, as it does a redirect off the pod), and
//! the response body is never read: only its head, bounded like the admin listener's.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    num::NonZeroU16,
    str::FromStr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, header::HOST,
    uri::PathAndQuery,
};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use serde::Deserialize;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use crate::limits::ADMIN_MAX_HEADER_BYTES;

/// The admin path prefix of rewritten probes (the injector's `probes::PATH_PREFIX`).
pub const PATH_PREFIX: &str = "/app-health/";

/// The probe timeout when the JSON gives none (the kubelet's default).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// Why `WEFT_APP_PROBES` cannot be used; the proxy refuses to start with it.
#[derive(Debug, thiserror::Error)]
pub enum AppProbesError {
    /// Not the JSON the injector writes.
    #[error("not a JSON object of probes: {0}")]
    Json(#[from] serde_json::Error),
    /// A key is not `<container>/<livez|readyz|startupz>`.
    #[error("probe {0:?}: the key is not <container>/<livez|readyz|startupz>")]
    Key(String),
    /// The port is 0.
    #[error("probe {0:?}: port 0")]
    Port(String),
    /// The scheme is neither HTTP nor HTTPS.
    #[error("probe {key:?}: scheme {scheme:?} is not HTTP or HTTPS")]
    Scheme {
        /// The probe.
        key: String,
        /// The scheme.
        scheme: String,
    },
    /// The path is not an HTTP path (and query).
    #[error("probe {key:?}: path {path:?} is not an absolute HTTP path")]
    Path {
        /// The probe.
        key: String,
        /// The path.
        path: String,
    },
    /// A header name or value is not valid HTTP.
    #[error("probe {key:?}: header {name:?} is not a valid HTTP header")]
    Header {
        /// The probe.
        key: String,
        /// The header name.
        name: String,
    },
}

/// The JSON shape the injector writes (`inject/src/probes.rs`, `AppProbe`); fields only
/// the injector needs (`original`) are ignored.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    port: u16,
    path: String,
    #[serde(default)]
    headers: Vec<WireHeader>,
    #[serde(default)]
    timeout_seconds: Option<u32>,
    #[serde(default)]
    scheme: Option<String>,
}

#[derive(Deserialize)]
struct WireHeader {
    name: String,
    value: String,
}

/// One application probe, validated.
#[derive(Clone, Debug)]
pub struct AppProbe {
    /// The application's port on loopback.
    pub port: NonZeroU16,
    /// What to request.
    pub path: PathAndQuery,
    /// Headers the probe sets; a `Host` among them replaces the default.
    pub headers: HeaderMap,
    /// How long the application may take to answer.
    pub timeout: Duration,
    /// Over TLS (`scheme: HTTPS`), the application's certificate unverified.
    pub https: bool,
}

/// Every probe of this pod, by `<container>/<kind>`, from `WEFT_APP_PROBES`.
#[derive(Clone, Debug, Default)]
pub struct AppProbes {
    probes: HashMap<String, AppProbe>,
}

impl FromStr for AppProbes {
    type Err = AppProbesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Ok(AppProbes::default());
        }
        let wire: HashMap<String, Wire> = serde_json::from_str(s)?;
        let mut probes = HashMap::with_capacity(wire.len());
        for (key, w) in wire {
            let valid_key = key.split_once('/').is_some_and(|(c, kind)| {
                !c.is_empty() && !c.contains('/') && matches!(kind, "livez" | "readyz" | "startupz")
            });
            if !valid_key {
                return Err(AppProbesError::Key(key));
            }
            let Some(port) = NonZeroU16::new(w.port) else {
                return Err(AppProbesError::Port(key));
            };
            let path = match PathAndQuery::from_str(&w.path) {
                Ok(p) if w.path.starts_with('/') => p,
                _ => return Err(AppProbesError::Path { key, path: w.path }),
            };
            let mut headers = HeaderMap::new();
            for h in w.headers {
                match (
                    HeaderName::from_bytes(h.name.as_bytes()),
                    HeaderValue::from_str(&h.value),
                ) {
                    (Ok(n), Ok(v)) => {
                        headers.append(n, v);
                    }
                    _ => return Err(AppProbesError::Header { key, name: h.name }),
                }
            }
            let https = match w.scheme.as_deref() {
                None => false,
                Some(s) if s.eq_ignore_ascii_case("HTTP") => false,
                Some(s) if s.eq_ignore_ascii_case("HTTPS") => true,
                Some(other) => {
                    return Err(AppProbesError::Scheme {
                        key,
                        scheme: other.to_owned(),
                    });
                }
            };
            let timeout = w
                .timeout_seconds
                .filter(|s| *s > 0)
                .map_or(DEFAULT_TIMEOUT, |s| Duration::from_secs(u64::from(s)));
            probes.insert(
                key,
                AppProbe {
                    port,
                    path,
                    headers,
                    timeout,
                    https,
                },
            );
        }
        Ok(AppProbes { probes })
    }
}

impl AppProbes {
    /// The probe an admin path names (`/app-health/<container>/<kind>`), if any.
    pub fn for_path(&self, path: &str) -> Option<&AppProbe> {
        path.strip_prefix(PATH_PREFIX)
            .and_then(|key| self.probes.get(key))
    }

    /// How many probes there are.
    pub fn len(&self) -> usize {
        self.probes.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.probes.is_empty()
    }
}

/// Why a probe got no answer from the application: the admin listener answers 503 with
/// this as the body.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Nothing accepted the connection.
    #[error("connect to the application at {addr}: {source}")]
    Connect {
        /// Where.
        addr: std::net::SocketAddr,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The application did not answer within the probe's timeout.
    #[error("the application did not answer within {0:?}")]
    Timeout(Duration),
    /// The TLS handshake with the application failed (`scheme: HTTPS`).
    #[error("TLS with the application: {0}")]
    Tls(#[source] std::io::Error),
    /// The TLS client could not be set up (cannot happen with ring's provider).
    #[error("TLS client: {0}")]
    TlsConfig(#[source] rustls::Error),
    /// The application answered something other than an HTTP/1 response head.
    #[error("the application's answer is not HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built (cannot happen with validated probes).
    #[error("building the probe request: {0}")]
    Request(#[from] http::Error),
}

impl AppProbe {
    /// Sends the probe to the application on `127.0.0.1` and returns its status code.
    /// `user_agent` is the kubelet's, passed on so that the application sees what it
    /// would without the mesh.
    pub async fn check(&self, user_agent: Option<&HeaderValue>) -> Result<StatusCode, ProbeError> {
        self.check_at(Ipv4Addr::LOCALHOST, user_agent).await
    }

    async fn check_at(
        &self,
        ip: Ipv4Addr,
        user_agent: Option<&HeaderValue>,
    ) -> Result<StatusCode, ProbeError> {
        match tokio::time::timeout(self.timeout, self.request(ip, user_agent)).await {
            Ok(r) => r,
            Err(_) => Err(ProbeError::Timeout(self.timeout)),
        }
    }

    async fn request(
        &self,
        ip: Ipv4Addr,
        user_agent: Option<&HeaderValue>,
    ) -> Result<StatusCode, ProbeError> {
        let addr = std::net::SocketAddr::from((ip, self.port.get()));
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ProbeError::Connect { addr, source })?;
        if !self.https {
            return self.exchange(stream, ip, user_agent).await;
        }
        let tls = tokio_rustls::TlsConnector::from(insecure_tls().map_err(ProbeError::TlsConfig)?)
            .connect(ServerName::from(IpAddr::V4(ip)), stream)
            .await
            .map_err(ProbeError::Tls)?;
        self.exchange(tls, ip, user_agent).await
    }

    /// One request on `io` (plain or TLS); the response's status.
    async fn exchange<I>(
        &self,
        io: I,
        ip: Ipv4Addr,
        user_agent: Option<&HeaderValue>,
    ) -> Result<StatusCode, ProbeError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(ADMIN_MAX_HEADER_BYTES.max(8192))
            .handshake::<_, Empty<Bytes>>(TokioIo::new(io))
            .await?;
        // Driven here rather than spawned, so that the timeout above, dropping this
        // future, closes the connection too.
        let mut conn = std::pin::pin!(conn);
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(self.path.clone())
            .header(HOST, format!("{ip}:{}", self.port))
            .header(http::header::ACCEPT, "*/*")
            .header(http::header::CONNECTION, "close");
        if let Some(ua) = user_agent {
            req = req.header(http::header::USER_AGENT, ua);
        }
        let mut req = req.body(Empty::new())?;
        for name in self.headers.keys() {
            req.headers_mut().remove(name);
        }
        for (name, value) in &self.headers {
            req.headers_mut().append(name, value.clone());
        }
        // The body is never read: the status is the answer. The connection may finish
        // (the application closing it after its answer) before the response is picked
        // up; if it finished without one, the request fails with hyper's reason.
        let mut send = std::pin::pin!(sender.send_request(req));
        tokio::select! {
            r = send.as_mut() => Ok(r?.status()),
            r = conn.as_mut() => {
                r?;
                Ok(send.await?.status())
            }
        }
    }
}

/// The TLS client of HTTPS probes: TLS 1.2 or 1.3, any certificate (the kubelet does not
/// verify its probes' certificates either: the application's certificate is for its
/// clients, and a probe only asks whether it answers).
fn insecure_tls() -> Result<Arc<ClientConfig>, rustls::Error> {
    static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    if let Some(c) = CONFIG.get() {
        return Ok(c.clone());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // TLS 1.3 and 1.2, as the kubelet offers.
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(CONFIG.get_or_init(|| Arc::new(config)).clone())
}

/// Accepts any server certificate, still checking the handshake's signature with it.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON `inject/src/probes.rs` writes (its test
    /// `the_proxy_gets_port_path_headers_and_timeout` asserts this exact string).
    const FROM_INJECTOR: &str = r#"{"app/readyz":{"port":8080,"path":"/ready","headers":[{"name":"X-Probe","value":"kubelet"}],"timeoutSeconds":1,"original":{"httpHeaders":[{"name":"X-Probe","value":"kubelet"}],"path":"/ready","port":8080}}}"#;

    #[test]
    fn parses_what_the_injector_writes() {
        let probes: AppProbes = FROM_INJECTOR.parse().unwrap();
        assert_eq!(probes.len(), 1);
        let p = probes.for_path("/app-health/app/readyz").unwrap();
        assert_eq!(p.port.get(), 8080);
        assert_eq!(p.path.as_str(), "/ready");
        assert_eq!(p.headers["x-probe"], "kubelet");
        assert_eq!(p.timeout, Duration::from_secs(1));
        assert!(!p.https);
        assert!(probes.for_path("/app-health/app/livez").is_none());
        assert!(probes.for_path("/app-health/app").is_none());
        assert!("".parse::<AppProbes>().unwrap().is_empty());
    }

    #[test]
    fn refuses_what_it_cannot_send() {
        for (json, needle) in [
            ("[]", "JSON"),
            (r#"{"app/ready":{"port":1,"path":"/"}}"#, "key"),
            (r#"{"/readyz":{"port":1,"path":"/"}}"#, "key"),
            (r#"{"app/readyz":{"port":0,"path":"/"}}"#, "port 0"),
            (r#"{"app/readyz":{"port":70000,"path":"/"}}"#, "JSON"),
            (r#"{"app/readyz":{"port":1,"path":"healthz"}}"#, "path"),
            (r#"{"app/readyz":{"port":1,"path":"/a b"}}"#, "path"),
            (
                r#"{"app/readyz":{"port":1,"path":"/","scheme":"FTP"}}"#,
                "scheme",
            ),
            (
                r#"{"app/readyz":{"port":1,"path":"/","headers":[{"name":"a b","value":"x"}]}}"#,
                "header",
            ),
        ] {
            let err = json.parse::<AppProbes>().unwrap_err().to_string();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }
}
