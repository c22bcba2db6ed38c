//! The application's probes, performed by the admin listener for the kubelet.
//!
//! Injection points each application container's `httpGet`, `grpc` and `tcpSocket` probe
//! at the admin port (`/app-health/<container>/<livez|readyz|startupz>`) and hands the
//! original to the proxy in `WEFT_APP_PROBES`, so that a `Strict` Policy, which refuses
//! the kubelet's plain-text, identity-less requests on the inbound listener, does not
//! make the pod unready, and so that a TCP probe, which the inbound proxy would accept
//! itself, says whether the *application* accepts connections. The admin port is outside
//! the redirect and outside Policy; what it answers here is fixed by the pod's own spec:
//! one probe, to the application, whose verdict (and nothing else) goes back.
//!
//! The probe goes where the kubelet's would: to the pod's own address (`WEFT_POD_IP`, from
//! the downward API), so an application listening on that address alone passes and one
//! listening on localhost alone fails, as without the mesh. It is dialled exactly as the
//! inbound side hands a connection to the application ([`crate::server::inbound_target`]):
//! from `127.0.0.6` (`::6`), which the redirect lets through, so it reaches the
//! application and not the inbound listener (which would accept a TCP probe itself, and
//! refuse a plain-text one under `Strict`). A port the pod opted in to
//! `weft.dev/inbound-loopback-ports` is probed on loopback, as the inbound side forwards
//! it there; without `WEFT_POD_IP` (a proxy run by hand) every probe goes to loopback.
//!
//! ```text
//!  WEFT_APP_PROBES (JSON) ──parse once──▶ AppProbes ──▶ Proxy::app_probes
//!  kubelet ─GET /app-health/web/readyz─▶ admin ─▶ AppProbe::check ─▶ app on <pod IP>:<port>
//!     httpGet    GET <path>                      → the app's status code
//!     grpc       grpc.health.v1.Health/Check     → 200 only for SERVING
//!     tcpSocket  connect                         → 200 once accepted
//!          ◀── or 503 + reason (refused, timed out, not HTTP, not SERVING) ──┘
//! ```
//!
//! The connection goes from the proxy's UID, which `init` exempts from the redirect, so
//! it reaches the application directly. A probe with `scheme: HTTPS` is sent over TLS
//! (1.2 or 1.3) without verifying the application's certificate, as the kubelet does; a
//! gRPC probe is plain-text HTTP/2, as the kubelet's is. Redirects are never followed (a
//! 3xx is the answer, which the kubelet counts as success, as it does a redirect off the
//! pod), and an HTTP response body is never read: only its head, bounded like the admin
//! listener's.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
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

use crate::{
    LocalPorts,
    limits::ADMIN_MAX_HEADER_BYTES,
    server::{Dial, inbound_target},
    upstream::{ConnectError, connect_from},
};

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
    /// The handler is none the proxy performs.
    #[error("probe {key:?}: handler {handler:?} is not httpGet, grpc or tcpSocket")]
    Handler {
        /// The probe.
        key: String,
        /// The handler.
        handler: String,
    },
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
/// the injector needs (`original`) are ignored. `handler` absent is `httpGet` (JSON
/// written before gRPC and TCP probes were rewritten).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    port: u16,
    #[serde(default)]
    handler: Option<String>,
    #[serde(default)]
    timeout_seconds: Option<u32>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    headers: Vec<WireHeader>,
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    service: Option<String>,
}

#[derive(Deserialize)]
struct WireHeader {
    name: String,
    value: String,
}

/// One application probe, validated.
#[derive(Clone, Debug)]
pub struct AppProbe {
    /// The application's port.
    pub port: NonZeroU16,
    /// Where the application is probed and from where: the pod's address, or loopback
    /// (see the module documentation); loopback until [`AppProbes::aimed_at`] says
    /// otherwise.
    pub dial: Dial,
    /// How long the application may take to answer (for TCP: to accept).
    pub timeout: Duration,
    /// What to do on that port.
    pub check: Check,
}

/// What a probe does, one per Kubernetes probe handler the injector rewrites.
#[derive(Clone, Debug)]
pub enum Check {
    /// `httpGet`: one request; the application's status is the answer.
    Http(HttpCheck),
    /// `grpc`: `grpc.health.v1.Health/Check` for this service (`""`: the whole server);
    /// 200 only for `SERVING`.
    Grpc {
        /// The service name asked about.
        service: String,
    },
    /// `tcpSocket`: 200 when the application accepts a connection in time.
    Tcp,
}

/// An `httpGet` probe's request.
#[derive(Clone, Debug)]
pub struct HttpCheck {
    /// What to request.
    pub path: PathAndQuery,
    /// Headers the probe sets; a `Host` among them replaces the default.
    pub headers: HeaderMap,
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
            let timeout = w
                .timeout_seconds
                .filter(|s| *s > 0)
                .map_or(DEFAULT_TIMEOUT, |s| Duration::from_secs(u64::from(s)));
            let check = match w.handler.as_deref() {
                None | Some("httpGet") => Check::Http(HttpCheck::parse(&key, w)?),
                Some("grpc") => Check::Grpc {
                    service: w.service.unwrap_or_default(),
                },
                Some("tcpSocket") => Check::Tcp,
                Some(other) => {
                    return Err(AppProbesError::Handler {
                        handler: other.to_owned(),
                        key,
                    });
                }
            };
            probes.insert(
                key,
                AppProbe {
                    port,
                    dial: Dial::direct(SocketAddr::new(
                        IpAddr::V4(Ipv4Addr::LOCALHOST),
                        port.get(),
                    )),
                    timeout,
                    check,
                },
            );
        }
        Ok(AppProbes { probes })
    }
}

/// A probe's path as the kubelet sends it: a space, a control character, a non-ASCII
/// character (each UTF-8 byte) or a character a URI may not hold is percent-encoded, the
/// rest (`?`, `%`, `/` among them) is kept. The kubelet accepts such paths, so refusing
/// them would keep the proxy, and with it the pod, from starting.
fn escape_path(raw: &str) -> std::borrow::Cow<'_, str> {
    let keep = |b: u8| b.is_ascii_graphic() && !b"\"<>\\^`{|}".contains(&b);
    if raw.bytes().all(keep) {
        return std::borrow::Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(raw.len() + 8);
    for b in raw.bytes() {
        if keep(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    std::borrow::Cow::Owned(out)
}

impl HttpCheck {
    /// The request of an `httpGet` probe, validated.
    fn parse(key: &str, w: Wire) -> Result<Self, AppProbesError> {
        let raw = w.path.unwrap_or_default();
        let path = match PathAndQuery::from_str(&escape_path(&raw)) {
            Ok(p) if raw.starts_with('/') => p,
            _ => {
                return Err(AppProbesError::Path {
                    key: key.to_owned(),
                    path: raw,
                });
            }
        };
        let mut headers = HeaderMap::new();
        for h in w.headers {
            match (
                HeaderName::from_bytes(h.name.as_bytes()),
                // The kubelet sends a value's UTF-8 bytes as they are (obs-text).
                HeaderValue::from_bytes(h.value.as_bytes()),
            ) {
                (Ok(n), Ok(v)) => {
                    headers.append(n, v);
                }
                _ => {
                    return Err(AppProbesError::Header {
                        key: key.to_owned(),
                        name: h.name,
                    });
                }
            }
        }
        let https = match w.scheme.as_deref() {
            None => false,
            Some(s) if s.eq_ignore_ascii_case("HTTP") => false,
            Some(s) if s.eq_ignore_ascii_case("HTTPS") => true,
            Some(other) => {
                return Err(AppProbesError::Scheme {
                    key: key.to_owned(),
                    scheme: other.to_owned(),
                });
            }
        };
        Ok(HttpCheck {
            path,
            headers,
            https,
        })
    }
}

impl AppProbes {
    /// Aims every probe at the pod's address `pod_ip`, where the kubelet's probe would
    /// go, dialled as the inbound side dials the application (from its relay source, or
    /// to loopback for the pod's `inbound-loopback-ports`). Without `pod_ip` all go to
    /// 127.0.0.1.
    pub fn aimed_at(mut self, pod_ip: Option<IpAddr>, local: &LocalPorts) -> Self {
        if let Some(ip) = pod_ip {
            for probe in self.probes.values_mut() {
                probe.dial = inbound_target(SocketAddr::new(ip, probe.port.get()), local);
            }
        }
        self
    }

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

/// A probe the application passed; the admin listener answers with [`Passed::status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Passed {
    /// `httpGet`: the application's own status (the kubelet judges it, 2xx and 3xx
    /// passing).
    Http(StatusCode),
    /// `grpc`: the health service answered `SERVING`.
    Serving,
    /// `tcpSocket`: the application accepted the connection.
    Accepted,
}

impl Passed {
    /// The status the kubelet gets.
    pub fn status(self) -> StatusCode {
        match self {
            Passed::Http(status) => status,
            Passed::Serving | Passed::Accepted => StatusCode::OK,
        }
    }
}

impl std::fmt::Display for Passed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Passed::Http(status) => write!(f, "application answered {}", status.as_u16()),
            Passed::Serving => f.write_str("application is SERVING"),
            Passed::Accepted => f.write_str("application accepted the connection"),
        }
    }
}

/// Why a probe got no answer from the application, or not the one that passes: the admin
/// listener answers 503 with this as the body.
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
    /// No HTTP/2 connection could be set up with the application (`grpc`); the text is
    /// tonic's error with its causes.
    #[error("gRPC connection with the application: {0}")]
    GrpcConnect(String),
    /// The health call failed: no health service (`Unimplemented`), an unknown service
    /// (`NotFound`), or the application does not speak gRPC.
    #[error("gRPC health check failed: {code:?}: {message}")]
    GrpcStatus {
        /// The call's gRPC status code.
        code: tonic::Code,
        /// Its message.
        message: String,
    },
    /// The health service answered, with a status other than `SERVING`.
    #[error("gRPC health status {0}")]
    NotServing(&'static str),
}

impl AppProbe {
    /// Performs the probe against the application as [`AppProbe::dial`] says. `user_agent` is
    /// the kubelet's, passed on (HTTP and gRPC) so that the application sees what it would
    /// without the mesh.
    pub async fn check(&self, user_agent: Option<&HeaderValue>) -> Result<Passed, ProbeError> {
        let Dial { addr, source } = self.dial;
        let ip = addr.ip();
        let probe = async {
            let stream = match connect_from(addr, source, self.timeout).await {
                Ok(s) => s,
                Err(ConnectError::Io { addr, source }) => {
                    return Err(ProbeError::Connect { addr, source });
                }
                // Timed out; a plain connect has no TLS to fail.
                Err(_) => return Err(ProbeError::Timeout(self.timeout)),
            };
            match &self.check {
                Check::Http(http) => http.request(stream, ip, self.port, user_agent).await,
                Check::Grpc { service } => grpc_health(stream, addr, service, user_agent).await,
                // Connected is the answer; dropping the stream closes it, as the
                // kubelet's probe does.
                Check::Tcp => Ok(Passed::Accepted),
            }
        };
        match tokio::time::timeout(self.timeout, probe).await {
            Ok(r) => r,
            Err(_) => Err(ProbeError::Timeout(self.timeout)),
        }
    }
}

impl HttpCheck {
    /// The request on a connected `stream`, over TLS for HTTPS probes.
    async fn request(
        &self,
        stream: TcpStream,
        ip: IpAddr,
        port: NonZeroU16,
        user_agent: Option<&HeaderValue>,
    ) -> Result<Passed, ProbeError> {
        if !self.https {
            return self.exchange(stream, ip, port, user_agent).await;
        }
        let tls = tokio_rustls::TlsConnector::from(insecure_tls().map_err(ProbeError::TlsConfig)?)
            .connect(ServerName::from(ip), stream)
            .await
            .map_err(ProbeError::Tls)?;
        self.exchange(tls, ip, port, user_agent).await
    }

    /// One request on `io` (plain or TLS); the response's status.
    async fn exchange<I>(
        &self,
        io: I,
        ip: IpAddr,
        port: NonZeroU16,
        user_agent: Option<&HeaderValue>,
    ) -> Result<Passed, ProbeError>
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
            .header(HOST, std::net::SocketAddr::new(ip, port.get()).to_string())
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
        let status = tokio::select! {
            r = send.as_mut() => r?.status(),
            r = conn.as_mut() => {
                r?;
                send.await?.status()
            }
        };
        Ok(Passed::Http(status))
    }
}

/// `grpc.health.v1.Health/Check` for `service` over the connected `stream`, in plain-text
/// HTTP/2 as the kubelet calls it. The connection is handed to tonic as the only one its
/// channel may use, so that a refused connection is reported like the other probes' and
/// the channel never dials anything else.
async fn grpc_health(
    stream: TcpStream,
    addr: std::net::SocketAddr,
    service: &str,
    user_agent: Option<&HeaderValue>,
) -> Result<Passed, ProbeError> {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };

    let mut endpoint = tonic::transport::Endpoint::from(
        http::Uri::builder()
            .scheme("http")
            .authority(addr.to_string())
            .path_and_query("/")
            .build()?,
    );
    if let Some(ua) = user_agent {
        // A User-Agent that is a valid header value is a valid user agent for tonic.
        endpoint = endpoint
            .user_agent(ua.clone())
            .map_err(|e| ProbeError::GrpcConnect(chain(&e)))?;
    }
    let mut stream = Some(stream);
    let connector = tower::service_fn(move |_: http::Uri| {
        let taken = stream.take();
        async move {
            taken.map(TokioIo::new).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "the probe's one connection is closed",
                )
            })
        }
    });
    let channel = endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| ProbeError::GrpcConnect(chain(&e)))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|status| ProbeError::GrpcStatus {
            code: status.code(),
            // A transport failure (an application that is not HTTP/2) is only
            // "transport error" without its causes.
            message: causes(
                status.message().to_owned(),
                std::error::Error::source(&status),
            ),
        })?;
    match ServingStatus::try_from(response.get_ref().status) {
        Ok(ServingStatus::Serving) => Ok(Passed::Serving),
        Ok(other) => Err(ProbeError::NotServing(other.as_str_name())),
        Err(_) => Err(ProbeError::NotServing("(not a known status)")),
    }
}

/// An error and its causes on one line (tonic's transport errors say little on their
/// own).
fn chain(error: &dyn std::error::Error) -> String {
    causes(error.to_string(), error.source())
}

/// `text` followed by `cause` and its own causes, each once (tonic repeats "transport
/// error" at two levels).
fn causes(mut text: String, mut cause: Option<&dyn std::error::Error>) -> String {
    let mut last = text.clone();
    while let Some(e) = cause {
        let part = e.to_string();
        if part != last {
            text.push_str(": ");
            text.push_str(&part);
        }
        last = part;
        cause = e.source();
    }
    text
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
    const FROM_INJECTOR: &str = r#"{"app/readyz":{"port":8080,"timeoutSeconds":1,"handler":"httpGet","path":"/ready","headers":[{"name":"X-Probe","value":"kubelet"}],"original":{"httpHeaders":[{"name":"X-Probe","value":"kubelet"}],"path":"/ready","port":8080}}}"#;

    /// gRPC and TCP probes as `inject/src/probes.rs` writes them (its test
    /// `the_proxy_gets_grpc_service_and_tcp_port` asserts this exact string).
    const GRPC_AND_TCP_FROM_INJECTOR: &str = r#"{"app/livez":{"port":5432,"timeoutSeconds":1,"handler":"tcpSocket","original":{"port":"db"}},"app/readyz":{"port":9090,"timeoutSeconds":2,"handler":"grpc","service":"shop.Cart","original":{"port":9090,"service":"shop.Cart"}}}"#;

    fn http(p: &AppProbe) -> &HttpCheck {
        match &p.check {
            Check::Http(h) => h,
            other => panic!("not HTTP: {other:?}"),
        }
    }

    #[test]
    fn parses_what_the_injector_writes() {
        let probes: AppProbes = FROM_INJECTOR.parse().unwrap();
        assert_eq!(probes.len(), 1);
        let p = probes.for_path("/app-health/app/readyz").unwrap();
        assert_eq!(p.port.get(), 8080);
        assert_eq!(http(p).path.as_str(), "/ready");
        assert_eq!(http(p).headers["x-probe"], "kubelet");
        assert_eq!(p.timeout, Duration::from_secs(1));
        assert!(!http(p).https);
        assert!(probes.for_path("/app-health/app/livez").is_none());
        assert!(probes.for_path("/app-health/app").is_none());
        assert!("".parse::<AppProbes>().unwrap().is_empty());
    }

    /// What the kubelet accepts and sends, percent-encoded where a URI needs it, rather
    /// than a refusal that would keep the sidecar from starting.
    #[test]
    fn paths_and_header_values_the_kubelet_accepts_are_taken() {
        let probes: AppProbes = r#"{"a/readyz":{"port":8080,"handler":"httpGet","path":"/health check/é?x=a b","headers":[{"name":"X-Who","value":"kübelet"}]}}"#
            .parse()
            .unwrap();
        let p = probes.for_path("/app-health/a/readyz").unwrap();
        assert_eq!(http(p).path.as_str(), "/health%20check/%C3%A9?x=a%20b");
        assert_eq!(http(p).headers["x-who"].as_bytes(), "kübelet".as_bytes());
        // Already encoded, or plain: unchanged.
        assert_eq!(escape_path("/a%20b?c=d&e=/f"), "/a%20b?c=d&e=/f");
        // Still refused: a path that is not absolute, a header name that is not a token.
        assert!(
            r#"{"a/readyz":{"port":1,"handler":"httpGet","path":"ready"}}"#
                .parse::<AppProbes>()
                .is_err()
        );
        assert!(r#"{"a/readyz":{"port":1,"handler":"httpGet","path":"/","headers":[{"name":"a b","value":"c"}]}}"#
            .parse::<AppProbes>()
            .is_err());
    }

    #[test]
    fn parses_grpc_and_tcp_probes() {
        let probes: AppProbes = GRPC_AND_TCP_FROM_INJECTOR.parse().unwrap();
        let ready = probes.for_path("/app-health/app/readyz").unwrap();
        assert_eq!(
            (ready.port.get(), ready.timeout),
            (9090, Duration::from_secs(2))
        );
        assert!(matches!(&ready.check, Check::Grpc { service } if service == "shop.Cart"));
        let live = probes.for_path("/app-health/app/livez").unwrap();
        assert_eq!(
            (live.port.get(), live.timeout),
            (5432, Duration::from_secs(1))
        );
        assert!(matches!(live.check, Check::Tcp));
        // No service asks about the whole server.
        let whole: AppProbes = r#"{"a/readyz":{"port":1,"handler":"grpc"}}"#.parse().unwrap();
        let p = whole.for_path("/app-health/a/readyz").unwrap();
        assert!(matches!(&p.check, Check::Grpc { service } if service.is_empty()));
    }

    /// JSON written before the `handler` tag existed holds HTTP probes.
    #[test]
    fn json_without_a_handler_is_http() {
        let probes: AppProbes =
            r#"{"app/readyz":{"port":8080,"path":"/ready","timeoutSeconds":3}}"#
                .parse()
                .unwrap();
        let p = probes.for_path("/app-health/app/readyz").unwrap();
        assert_eq!(http(p).path.as_str(), "/ready");
        assert_eq!(p.timeout, Duration::from_secs(3));
    }

    #[test]
    fn refuses_what_it_cannot_send() {
        for (json, needle) in [
            ("[]", "JSON"),
            (r#"{"app/ready":{"port":1,"path":"/"}}"#, "key"),
            (r#"{"/readyz":{"port":1,"path":"/"}}"#, "key"),
            (r#"{"app/readyz":{"port":0,"path":"/"}}"#, "port 0"),
            (
                r#"{"app/readyz":{"port":0,"handler":"tcpSocket"}}"#,
                "port 0",
            ),
            (r#"{"app/readyz":{"port":70000,"path":"/"}}"#, "JSON"),
            (r#"{"app/readyz":{"port":1,"path":"healthz"}}"#, "path"),
            (r#"{"app/readyz":{"port":1}}"#, "path"),
            (r#"{"app/readyz":{"port":1,"handler":"exec"}}"#, "handler"),
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
