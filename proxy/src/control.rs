//! The operator as config source: a `weft.push.v1` subscription (see `docs/protocol.md`).
//!
//! ```text
//! operator ──TLS 1.3 (verified against the mesh trust root, the latest certificate
//!            answer's bundle with identity on, and the operator's name; plain text only
//!            for a proxy given no trust root)──HTTP/2 stream of Update
//!            frames──▶ ControlClient
//!     full / delta ─▶ received services (the operator's view of this stream)
//!                  ─▶ ProxyConfig ─▶ ConfigStore::apply (the file source's validation + swap)
//!                        ok  ─▶ Ack {version, enforcement: what it enforces of the resources}
//!                        err ─▶ Nack {version, reason}; the active config stays
//!                               (a ServiceConfig field this proxy does not know is an error)
//! stream ends / cannot connect ─▶ jittered exponential backoff, reconnect, full resync;
//!                                 the last good config keeps serving meanwhile
//! ```

use std::{collections::BTreeMap, convert::Infallible, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, header::AUTHORIZATION};
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use weft_api::{
    proxy_config::{
        InboundConfig, PROXY_CONFIG_API_VERSION, PROXY_CONFIG_KIND, ProxyConfig, ServiceConfig,
    },
    push::{
        self, Ack, ClientMessage, FEATURE_ENDPOINT_DELTAS, FEATURES_HEADER, FrameDecoder, Nack,
        POD_HEADER, ResourceRef, SUBSCRIBE_PATH, ServerMessage, Update,
    },
};

use crate::{enforce, identity::TlsFailure, store::ConfigStore};

/// How long the TLS handshake with the operator may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How the proxy verifies the operator's push server: TLS 1.3 only, the certificate
/// checked against the mesh trust root and for the operator Service's DNS name, the same
/// checks as at the identity endpoint. A proxy that has one never subscribes in plain
/// text.
#[derive(Clone)]
pub struct OperatorTls {
    config: Arc<rustls::ClientConfig>,
    server_name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for OperatorTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl OperatorTls {
    /// Verifies the operator against `roots` (the mesh trust root) and `server_name`.
    pub fn new(
        roots: rustls::RootCertStore,
        server_name: rustls::pki_types::ServerName<'static>,
    ) -> Result<Self, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        Self::with_verifier(verifier, server_name)
    }

    /// Verifies the operator with `verifier` and for `server_name`: with identity on,
    /// [`crate::identity::IdentityStore::operator_verifier`], so that the config stream
    /// follows the trust bundle of each certificate answer (a root rotation).
    pub fn with_verifier(
        verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
        server_name: rustls::pki_types::ServerName<'static>,
    ) -> Result<Self, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(OperatorTls {
            config: Arc::new(config),
            server_name,
        })
    }

    /// The name the operator's certificate must carry.
    pub fn server_name(&self) -> &rustls::pki_types::ServerName<'static> {
        &self.server_name
    }
}

/// Where and as whom to subscribe.
#[derive(Clone, Debug)]
pub struct ControlConfig {
    /// The operator's push server, `host:port`.
    pub operator_addr: String,
    /// This pod, as `namespace/name`.
    pub pod: String,
    /// The projected ServiceAccount token, re-read on every connect (the kubelet rotates
    /// it). `None` sends no token.
    pub token_file: Option<PathBuf>,
    /// The most services this proxy accepts in one config; a larger config is rejected
    /// (NACKed) and the active one kept. `None`: no limit.
    pub max_services: Option<usize>,
    /// First reconnect delay (before jitter).
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// How long one TCP connect to the operator may take. Without it a connect to an
    /// address that silently drops packets (a Service still routing to a deleted
    /// operator pod) waits for the kernel's SYN retries, over a minute, during which the
    /// proxy neither reconnects nor gets config.
    pub connect_timeout: Duration,
    /// TLS with the operator; `None` subscribes in plain text (an operator without
    /// identity).
    pub tls: Option<OperatorTls>,
}

impl ControlConfig {
    /// A config with the default backoff (100 ms doubling to 10 s), a 5 s connect timeout
    /// and no service limit.
    pub fn new(operator_addr: impl Into<String>, pod: impl Into<String>) -> Self {
        ControlConfig {
            operator_addr: operator_addr.into(),
            pod: pod.into(),
            token_file: None,
            max_services: None,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// What the client has seen, for `/ready`, tests and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControlStatus {
    /// A stream is open.
    pub connected: bool,
    /// The latest version acknowledged.
    pub acked: Option<u64>,
    /// The latest version rejected, with the reason.
    pub nacked: Option<(u64, String)>,
    /// Streams opened so far.
    pub connects: u64,
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// TCP connect or HTTP/2 handshake failed.
    #[error("connect to {addr}")]
    Connect {
        /// The operator's address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake with the operator failed: its certificate does not lead to this
    /// proxy's trust root, does not carry the expected name, or the handshake broke.
    #[error(
        "TLS with the operator at {addr} failed ({reason}): is the trust root the mesh's, and the operator's server name on its certificate?"
    )]
    Tls {
        /// The operator's address.
        addr: String,
        /// What failed, as the metric's label ([`tls_reason`]).
        reason: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// HTTP/2 failed.
    #[error("http/2")]
    Http(#[from] hyper::Error),
    /// The operator refused the subscription.
    #[error("operator answered {status}: {body}")]
    Refused {
        /// The HTTP status.
        status: http::StatusCode,
        /// The operator's explanation.
        body: String,
    },
    /// The token file could not be read.
    #[error("read token {path}")]
    Token {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The operator sent something unreadable.
    #[error("protocol: {0}")]
    Protocol(#[from] push::FrameError),
    /// The operator closed the stream.
    #[error("operator closed the stream")]
    Closed,
    /// The operator sent an update this proxy cannot read; it was NACKed, and the proxy
    /// resubscribes since its state no longer matches the operator's.
    #[error("update not understood; NACKed and resubscribing")]
    Unreadable(#[source] serde_json::Error),
    /// The operator sent endpoint changes for a service this stream never carried: the
    /// two sides disagree on the stream's state, so the proxy resubscribes for a full
    /// snapshot.
    #[error("endpoint changes for {0}, which this stream never carried")]
    UnknownService(String),
}

impl ControlError {
    /// The `reason` label of `weft_control_stream_failures_total`.
    pub const fn reason(&self) -> &'static str {
        match self {
            ControlError::Connect { .. } => "connect",
            ControlError::Tls { reason, .. } => reason,
            ControlError::Http(_) => "http",
            ControlError::Refused { .. } => "refused",
            ControlError::Token { .. } => "token",
            ControlError::Protocol(_) => "protocol",
            ControlError::Closed => "closed",
            ControlError::Unreadable(_) => "unreadable",
            ControlError::UnknownService(_) => "unknown_service",
        }
    }
}

/// Subscribes to the operator and applies what it sends.
#[derive(Debug)]
pub struct ControlClient {
    config: ControlConfig,
    store: Arc<ConfigStore>,
    status: watch::Sender<ControlStatus>,
}

impl ControlClient {
    /// A client applying to `store`.
    pub fn new(config: ControlConfig, store: Arc<ConfigStore>) -> Self {
        ControlClient {
            config,
            store,
            status: watch::channel(ControlStatus::default()).0,
        }
    }

    /// Follows the client's status.
    pub fn status(&self) -> watch::Receiver<ControlStatus> {
        self.status.subscribe()
    }

    /// Subscribes, and re-subscribes after every failure with jittered exponential
    /// backoff, until `shutdown`. The store keeps its last good config throughout.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut attempt: u32 = 0;
        loop {
            let started = tokio::time::Instant::now();
            let result = tokio::select! {
                () = shutdown.cancelled() => return,
                r = self.stream() => r,
            };
            self.status.send_modify(|s| s.connected = false);
            let error = match result {
                Ok(()) => ControlError::Closed,
                Err(e) => e,
            };
            self.store.metrics().control_stream_failure(error.reason());
            // A stream that lived a while was a success: start the backoff over.
            if started.elapsed() > self.config.backoff_max {
                attempt = 0;
            }
            let cap = self
                .config
                .backoff_base
                .saturating_mul(1u32 << attempt.min(16))
                .min(self.config.backoff_max);
            let delay = cap.mul_f64(rand::rng().random_range(0.0..=1.0));
            attempt = attempt.saturating_add(1);
            tracing::warn!(error = %error, cause = ?std::error::Error::source(&error).map(|e| e.to_string()), ?delay, "operator stream ended; keeping the active config and reconnecting");
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn stream(&self) -> Result<(), ControlError> {
        let addr = &self.config.operator_addr;
        let token = match &self.config.token_file {
            None => None,
            Some(path) => Some(
                tokio::fs::read_to_string(path)
                    .await
                    .map_err(|source| ControlError::Token {
                        path: path.clone(),
                        source,
                    })?
                    .trim()
                    .to_owned(),
            ),
        };
        let connect = tokio::net::TcpStream::connect(addr.as_str());
        let tcp = match tokio::time::timeout(self.config.connect_timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect timed out after {:?}", self.config.connect_timeout),
            )),
        }
        .map_err(|source| ControlError::Connect {
            addr: addr.clone(),
            source,
        })?;
        let _ = tcp.set_nodelay(true);
        let (mut sender, _conn) = match &self.config.tls {
            None => handshake(TokioIo::new(tcp)).await?,
            Some(tls) => {
                let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                let tls_err = |source| ControlError::Tls {
                    addr: addr.clone(),
                    reason: tls_reason(&source),
                    source,
                };
                let stream = match tokio::time::timeout(
                    TLS_HANDSHAKE_TIMEOUT,
                    connector.connect(tls.server_name.clone(), tcp),
                )
                .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return Err(tls_err(e)),
                    Err(_) => {
                        return Err(tls_err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "TLS handshake timed out",
                        )));
                    }
                };
                handshake(TokioIo::new(stream)).await?
            }
        };

        // Answers are small and one per update; 16 leaves room for a burst while the
        // operator reads slowly, and the client waits rather than drop one.
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        let body = ChannelBody(rx);
        let scheme = if self.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let mut req = Request::post(format!("{scheme}://{addr}{SUBSCRIBE_PATH}"))
            .header(POD_HEADER, &self.config.pod)
            .header(
                FEATURES_HEADER,
                format!("{FEATURE_ENDPOINT_DELTAS},{}", push::FEATURE_TRAFFIC_POLICY),
            );
        if let Some(token) = token {
            req = req.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req.body(body).map_err(|e| ControlError::Refused {
            status: http::StatusCode::BAD_REQUEST,
            body: e.to_string(),
        })?;
        let resp = sender.send_request(req).await?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
                .unwrap_or_default();
            return Err(ControlError::Refused { status, body });
        }
        self.status.send_modify(|s| {
            s.connected = true;
            s.connects += 1;
        });
        tracing::info!(operator = %addr, tls = self.config.tls.is_some(), "subscribed to the operator");
        let mut body = resp.into_body();
        let mut decoder = FrameDecoder::default();
        let mut received = Received::default();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            decoder.extend(&data);
            while let Some(read) = decoder.next_frame(|frame| self.answer(&mut received, frame))? {
                let (answer, unreadable) = read?;
                let bytes = push::encode(&answer).unwrap_or_default();
                if tx.send(Bytes::from(bytes)).await.is_err() {
                    return Err(ControlError::Closed);
                }
                if let Some(error) = unreadable {
                    // The update was refused without being applied, so this stream's
                    // state is no longer the operator's: end the request body after the
                    // NACK (the operator reads it, then ends the stream) and resubscribe.
                    drop(tx);
                    let drain = async { while body.frame().await.is_some() {} };
                    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
                    return Err(ControlError::Unreadable(error));
                }
            }
        }
        Ok(())
    }

    /// The answer to one frame from the operator, and — for an update this proxy cannot
    /// even read, such as one with a value it does not know (a new balancer) — why: it is
    /// NACKed by version, naming the problem, rather than dropped silently.
    fn answer(
        &self,
        received: &mut Received,
        frame: &[u8],
    ) -> Result<(ClientMessage, Option<serde_json::Error>), ControlError> {
        #[derive(serde::Deserialize)]
        struct Versioned {
            version: u64,
        }
        match serde_json::from_slice::<ServerMessage>(frame) {
            Ok(ServerMessage::Update(update)) => Ok((self.apply(received, update)?, None)),
            Err(error) => match serde_json::from_slice::<Versioned>(frame) {
                Ok(Versioned { version }) => {
                    self.store.metrics().config_rejected();
                    let reason =
                        format!("update not understood by {}: {error}", enforce::PROXY_AGENT);
                    Ok((self.reject(version, reason), Some(error)))
                }
                Err(_) => Err(push::FrameError::Json(error).into()),
            },
        }
    }

    /// A NACK of `version`: the active config stays.
    fn reject(&self, version: u64, reason: String) -> ClientMessage {
        tracing::warn!(version, %reason, "config from the operator rejected; keeping the active config");
        self.status
            .send_modify(|s| s.nacked = Some((version, reason.clone())));
        ClientMessage::Nack(Nack {
            version,
            reason,
            active_version: self
                .store
                .load()
                .and_then(|s| s.version.parse::<u64>().ok()),
        })
    }

    /// Applies one update to what was received on this stream and, through the store, to
    /// the proxy.
    fn apply(
        &self,
        received: &mut Received,
        update: Update,
    ) -> Result<ClientMessage, ControlError> {
        let Received {
            services: received,
            resources,
            inbound,
        } = received;
        if update.full {
            received.clear();
            *inbound = None;
        }
        if let Some(i) = update.inbound {
            *inbound = Some(i);
        }
        if let Some(r) = update.resources {
            *resources = r;
        }
        for s in update.services {
            received.insert(s.name.clone(), s);
        }
        for delta in &update.endpoints {
            let svc = received
                .get_mut(&delta.service)
                .ok_or_else(|| ControlError::UnknownService(delta.service.clone()))?;
            delta.apply(svc);
        }
        for name in &update.removed {
            received.remove(name);
        }
        let version = update.version;
        let raw = ProxyConfig {
            api_version: PROXY_CONFIG_API_VERSION.to_owned(),
            kind: PROXY_CONFIG_KIND.to_owned(),
            version: Some(version.to_string()),
            detect_timeout: None,
            connect_timeout: None,
            opaque_ports: None,
            services: received.values().cloned().collect(),
            inbound: inbound.clone(),
        };
        let rejected = |reason: String| self.reject(version, reason);
        if let Some(max) = self.config.max_services
            && raw.services.len() > max
        {
            self.store.metrics().config_rejected();
            return Ok(rejected(format!(
                "config has {} services; this proxy accepts at most {max}",
                raw.services.len()
            )));
        }
        Ok(match self.store.apply(raw) {
            Ok(_) => {
                self.status.send_modify(|s| {
                    s.acked = Some(version);
                    s.nacked = None;
                });
                ClientMessage::Ack(Ack {
                    version,
                    enforcement: Some(enforce::report_with_identity(
                        resources.iter(),
                        self.store.has_identity(),
                    )),
                })
            }
            Err(e) => rejected(e.to_string()),
        })
    }
}

/// What one stream has delivered: the operator's view of this proxy, which deltas apply to.
#[derive(Debug, Default)]
struct Received {
    services: BTreeMap<String, ServiceConfig>,
    /// The resources the latest update said the config implements.
    resources: Vec<ResourceRef>,
    /// The inbound settings, as the latest update that carried them said.
    inbound: Option<InboundConfig>,
}

/// The label of a failed TLS handshake with the operator: `tls_wrong_name` when the
/// certificate is trusted but not for the operator's name, else by [`TlsFailure`].
fn tls_reason(error: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    match error.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => "tls_wrong_name",
        _ => match TlsFailure::of_io(error) {
            TlsFailure::Untrusted => "tls_untrusted",
            TlsFailure::Expired => "tls_expired",
            TlsFailure::NotYetValid => "tls_not_yet_valid",
            TlsFailure::ProtocolVersion => "tls_protocol_version",
            _ => "tls_handshake",
        },
    }
}

/// The HTTP/2 handshake over `io`; the connection is driven by a task that ends when the
/// returned guard is dropped.
async fn handshake<IO>(
    io: TokioIo<IO>,
) -> Result<
    (
        hyper::client::conn::http2::SendRequest<ChannelBody>,
        AbortOnDrop,
    ),
    ControlError,
>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20))
        .handshake(io)
        .await?;
    let task = tokio::spawn(async move {
        if let Err(error) = conn.await {
            tracing::debug!(%error, "operator connection ended");
        }
    });
    Ok((sender, AbortOnDrop(task)))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The request body: the client's answers, as they are produced.
/// A request body fed from a channel, one data frame per message: how a subscriber
/// streams its answers to the operator (also used by the operator's tests and benchmark).
#[derive(Debug)]
pub struct ChannelBody(pub mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> ControlClient {
        ControlClient::new(
            ControlConfig::new("127.0.0.1:1", "shop/a"),
            crate::Proxy::new().store.clone(),
        )
    }

    /// Found on the test bed's node: with the operator's pod deleted, a reconnect went to
    /// an address that dropped its SYNs and hung for 38 s, so config changed meanwhile
    /// arrived half a minute after the operator was back. A listener whose accept queue
    /// is full drops SYNs the same way.
    #[tokio::test]
    async fn a_connect_that_hangs_fails_after_the_connect_timeout() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        // Fill the accept queue (never accepted) until a connect no longer completes.
        let mut held = Vec::new();
        for _ in 0..16 {
            match tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(s)) => held.push(s),
                _ => break,
            }
        }
        assert!(held.len() < 16, "the accept queue never filled");
        let mut config = ControlConfig::new(addr.to_string(), "shop/a");
        config.connect_timeout = Duration::from_millis(300);
        let client = ControlClient::new(config, crate::Proxy::new().store.clone());
        let started = std::time::Instant::now();
        let error = client.stream().await.unwrap_err();
        assert!(
            matches!(&error, ControlError::Connect { source, .. } if source.kind() == std::io::ErrorKind::TimedOut),
            "{error:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(error.reason(), "connect");
        drop(listener);
    }

    fn update(json: serde_json::Value) -> Update {
        let ServerMessage::Update(u) = serde_json::from_value(json).unwrap();
        u
    }

    #[test]
    fn a_service_field_this_proxy_does_not_know_is_nacked_by_name_and_a_fix_is_acked() {
        let client = client();
        let mut received = Received::default();
        let first = client
            .apply(
                &mut received,
                update(serde_json::json!({"type": "update", "version": 1, "full": true,
                    "services": [{"name": "web.shop.80", "endpoints": [{"address": "198.18.0.1:80"}]}]})),
            )
            .unwrap();
        assert!(matches!(first, ClientMessage::Ack(_)), "{first:?}");
        // A newer operator adds a field this proxy cannot enforce: refused, not ignored.
        let answer = client
            .apply(
                &mut received,
                update(serde_json::json!({"type": "update", "version": 2,
                    "services": [{"name": "web.shop.80", "localityFailover": {"enabled": true},
                                  "endpoints": [{"address": "198.18.0.1:80"}]}]})),
            )
            .unwrap();
        let ClientMessage::Nack(nack) = answer else {
            panic!("expected a NACK, got {answer:?}");
        };
        assert_eq!(nack.version, 2);
        assert_eq!(nack.active_version, Some(1));
        assert!(
            nack.reason.contains("unknown field \"localityFailover\""),
            "{}",
            nack.reason
        );
        assert_eq!(
            client.store.load().unwrap().version,
            "1",
            "the active config stays"
        );
        // Replacing the service without the field fixes it.
        let fixed = client
            .apply(
                &mut received,
                update(serde_json::json!({"type": "update", "version": 3,
                    "services": [{"name": "web.shop.80", "endpoints": [{"address": "198.18.0.2:80"}]}]})),
            )
            .unwrap();
        assert!(
            matches!(fixed, ClientMessage::Ack(Ack { version: 3, .. })),
            "{fixed:?}"
        );
    }

    #[test]
    fn an_update_with_a_value_this_proxy_does_not_know_is_nacked_naming_it() {
        let client = client();
        let mut received = Received::default();
        let frame = serde_json::to_vec(
            &serde_json::json!({"type": "update", "version": 7, "full": true,
            "services": [{"name": "web.shop.80", "balancer": "leastRequest"}]}),
        )
        .unwrap();
        let (answer, unreadable) = client.answer(&mut received, &frame).unwrap();
        let ClientMessage::Nack(nack) = answer else {
            panic!("expected a NACK, got {answer:?}");
        };
        assert_eq!(nack.version, 7);
        assert!(nack.reason.contains("leastRequest"), "{}", nack.reason);
        assert!(unreadable.is_some(), "the stream resubscribes");
        assert!(client.store.load().is_none(), "nothing was applied");
        // Without even a version there is nothing to answer: the stream ends.
        assert!(client.answer(&mut received, b"{\"type\": 1}").is_err());
    }

    #[test]
    fn an_ack_reports_which_resources_of_the_stream_are_enforced() {
        let client = client();
        let mut received = Received::default();
        let answer = client
            .apply(
                &mut received,
                update(serde_json::json!({"type": "update", "version": 1, "full": true,
                    "resources": [
                        {"kind": "Route", "namespace": "shop", "name": "split", "generation": 2,
                         "requires": [{"feature": "route.backends", "field": "spec.rules[0].backends"}]},
                        {"kind": "Policy", "namespace": "shop", "name": "db", "generation": 1,
                         "requires": [{"feature": "policy.mtls", "field": "spec.mtls.mode"}]}
                    ]})),
            )
            .unwrap();
        let ClientMessage::Ack(Ack {
            enforcement: Some(first),
            ..
        }) = answer
        else {
            panic!("expected an ACK with a report, got {answer:?}");
        };
        assert_eq!(first.enforced.len(), 1);
        assert_eq!(first.enforced[0].name, "split");
        assert_eq!(first.not_enforced[0].resource.name, "db");
        assert_eq!(first.not_enforced[0].fields, ["spec.mtls.mode"]);
        // A delta without `resources` leaves them as they were on the stream.
        let answer = client
            .apply(
                &mut received,
                update(serde_json::json!({"type": "update", "version": 2,
                    "services": [{"name": "web.shop.80"}]})),
            )
            .unwrap();
        let ClientMessage::Ack(Ack {
            enforcement: Some(second),
            ..
        }) = answer
        else {
            panic!("expected an ACK with a report, got {answer:?}");
        };
        assert_eq!(second, first);
    }
}
