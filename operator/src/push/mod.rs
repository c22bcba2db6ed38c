//! The config distribution server (`weft.push.v1`, see `docs/protocol.md`).
//!
//! ```text
//!  proxy ──TLS 1.3 (serve_tls; plain text with identity off: serve)──▶ HTTP/2
//!        POST /weft.push.v1/subscribe (bearer token, weft-pod: ns/name)
//!     auth::Authenticator (TokenReview) ─▶ SharedIndex::subscribe(pod) ─▶ watch::Receiver
//!     session: loop {
//!        view changed?  ─▶ diff against what this stream sent ─▶ Update frame (full first)
//!        client frame   ─▶ Ack / Nack ─▶ Registry (what each proxy runs) ─▶ status, CLI
//!     }
//! ```
//!
//! A slow subscriber never blocks others or the index: the index only replaces the value
//! in the pod's watch channel, and the session, when it is ready to send again, diffs the
//! latest view against what it last sent. Intermediate versions are skipped, not queued.
//!
//! A stream never stalls silently: a session whose update the connection has not taken,
//! or whose proxy has not answered (ACK or NACK) a version, within
//! [`PushServer::ack_timeout`] counts a stall (`weft_operator_push_stalls_total`) and
//! closes the proxy's connection. Closing the connection, not only the stream, is what
//! frees a transport stall: HTTP/2 flow control is shared by the connection's streams and
//! hyper does not poll a response body while the stream waits for window, so a proxy that
//! stopped reading can only be cut off. The proxy reconnects and gets a full snapshot.

pub mod auth;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    convert::Infallible,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header::AUTHORIZATION};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;
use weft_api::{
    proxy_config::{InboundConfig, ServiceConfig},
    push::{
        self, ClientMessage, EndpointDelta, Enforcement, FEATURE_ENDPOINT_DELTAS,
        FEATURE_TRAFFIC_POLICY, FEATURES_HEADER, FrameDecoder, POD_HEADER, ResourceRef,
        SUBSCRIBE_PATH, ServerMessage, Update, feature,
    },
};

use crate::index::{ObjectKey, ProxyView, ServiceSet, shared::SharedIndex};
pub use auth::{AuthLimits, Authenticator};

/// The default of [`PushServer::ack_timeout`].
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// What the operator knows about one proxy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProxyState {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// Open streams from this pod (0: disconnected).
    pub streams: u32,
    /// The latest version sent.
    pub sent_version: Option<u64>,
    /// The latest version acknowledged (the one the proxy runs).
    pub acked_version: Option<u64>,
    /// Bytes of updates sent to this proxy, over all its streams.
    pub bytes_sent: u64,
    /// The latest rejection, if it is newer than the latest acknowledgement.
    pub nack: Option<NackState>,
    /// When the proxy last sent anything or was sent anything, in seconds since the epoch.
    pub last_seen: u64,
    /// The resources (with generations) in the acknowledged version.
    pub acked_resources: BTreeSet<ResourceRef>,
    /// What the proxy said it enforces of them. `None`: it did not say (a proxy older
    /// than the report), so none of them count as enforced.
    pub enforcement: Option<Enforcement>,
}

/// A rejected version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NackState {
    /// The version rejected.
    pub version: u64,
    /// The proxy's reason.
    pub reason: String,
}

/// Every proxy's state, by pod.
#[derive(Debug, Default)]
pub struct Registry {
    proxies: Mutex<HashMap<ObjectKey, ProxyState>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<ObjectKey, ProxyState>> {
        self.proxies.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with(&self, pod: &ObjectKey, f: impl FnOnce(&mut ProxyState)) {
        let mut map = self.lock();
        let state = map.entry(pod.clone()).or_insert_with(|| ProxyState {
            pod: pod.to_string(),
            ..ProxyState::default()
        });
        state.last_seen = now_secs();
        f(state);
    }

    /// A copy of every proxy's state.
    pub fn snapshot(&self) -> BTreeMap<ObjectKey, ProxyState> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The lowest version acknowledged among `pods` (`None` if one has acknowledged
    /// nothing), and the bytes sent to them in total: a cheap check for benchmarks and
    /// rollouts, without copying the registry.
    pub fn acked_by(&self, pods: &[ObjectKey]) -> (Option<u64>, u64) {
        let map = self.lock();
        let mut min = Some(u64::MAX);
        let mut bytes = 0;
        for pod in pods {
            let state = map.get(pod);
            bytes += state.map_or(0, |s| s.bytes_sent);
            min = match (min, state.and_then(|s| s.acked_version)) {
                (Some(m), Some(v)) => Some(m.min(v)),
                _ => None,
            };
        }
        (min, bytes)
    }

    /// Forgets disconnected proxies for which `keep` is false.
    pub fn retain_disconnected(&self, keep: impl Fn(&ObjectKey) -> bool) {
        self.lock().retain(|k, v| v.streams > 0 || keep(k));
    }
}

/// The distribution server's shared state.
#[derive(Debug)]
pub struct PushServer {
    /// The index sessions read.
    pub index: Arc<SharedIndex>,
    /// What each proxy runs.
    pub registry: Arc<Registry>,
    /// Checks subscriber tokens.
    pub auth: Authenticator,
    /// How long a proxy may take to receive an update and answer it before its connection
    /// is closed as stalled ([`DEFAULT_ACK_TIMEOUT`] in the operator).
    pub ack_timeout: Duration,
}

type Body = BoxBody<Bytes, Infallible>;

fn plain(status: StatusCode, text: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(text.into())).boxed());
    *r.status_mut() = status;
    r
}

/// How long a proxy may take to finish the TLS handshake on the push listener.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves subscriptions on `listener` in plain-text HTTP/2 until `shutdown`, which also
/// ends every stream so proxies reconnect elsewhere. Only for an operator that serves no
/// identity: with a mesh CA the operator uses [`serve_tls`], and proxies given the trust
/// root never fall back to plain text.
pub async fn serve(listener: TcpListener, server: Arc<PushServer>, shutdown: CancellationToken) {
    tracing::warn!(
        addr = ?listener.local_addr().ok(),
        "push server listening in plain text (identity is off): config streams are neither encrypted nor verified"
    );
    serve_with(listener, server, None, shutdown).await
}

/// Serves subscriptions as [`serve`] does, over TLS (`tls`: TLS 1.3, ALPN `h2`, a
/// serving certificate from the mesh CA; see [`crate::identity::push_tls`]). A connection
/// whose handshake fails or takes longer than 10 s is closed and counted
/// (`weft_operator_push_refusals_total{reason="tls_handshake"}`).
pub async fn serve_tls(
    listener: TcpListener,
    server: Arc<PushServer>,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) {
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        "push server listening over TLS 1.3 with a certificate from the mesh trust root"
    );
    serve_with(
        listener,
        server,
        Some(tokio_rustls::TlsAcceptor::from(tls)),
        shutdown,
    )
    .await
}

async fn serve_with(
    listener: TcpListener,
    server: Arc<PushServer>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        tracker.spawn(
            async move {
                match tls {
                    None => serve_conn(TokioIo::new(stream), peer, server, shutdown).await,
                    Some(acceptor) => {
                        let handshake = tokio::select! {
                            () = shutdown.cancelled() => return,
                            r = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => r,
                        };
                        match handshake {
                            Ok(Ok(tls)) => {
                                serve_conn(TokioIo::new(tls), peer, server, shutdown).await
                            }
                            Ok(Err(error)) => {
                                server.index.metrics().push_refusal("tls_handshake");
                                tracing::debug!(%error, "TLS handshake failed");
                            }
                            Err(_) => {
                                server.index.metrics().push_refusal("tls_handshake");
                                tracing::debug!("TLS handshake timed out");
                            }
                        }
                    }
                }
            }
            .instrument(tracing::info_span!("push_conn", %peer)),
        );
    }
    tracker.close();
    tracker.wait().await;
}

/// Serves one connection's HTTP/2 until it ends, stalls or `shutdown`.
async fn serve_conn<IO>(
    io: TokioIo<IO>,
    peer: std::net::SocketAddr,
    server: Arc<PushServer>,
    shutdown: CancellationToken,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Cancelled by a session that finds its stream stalled: the connection is dropped.
    let stalled = CancellationToken::new();
    let svc = hyper::service::service_fn({
        let shutdown = shutdown.clone();
        let stalled = stalled.clone();
        move |req| {
            let conn = Conn {
                server: server.clone(),
                shutdown: shutdown.clone(),
                stalled: stalled.clone(),
                source: peer.ip(),
            };
            async move { Ok::<_, Infallible>(handle(req, conn).await) }
        }
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20))
        .serve_connection(io, svc);
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        () = stalled.cancelled() => {
            tracing::warn!("closing a stalled push connection");
            return;
        }
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn => r,
                () = stalled.cancelled() => return,
            }
        }
    };
    if let Err(error) = r {
        tracing::debug!(%error, "push connection ended");
    }
}

/// What a request needs to know about its connection.
struct Conn {
    server: Arc<PushServer>,
    shutdown: CancellationToken,
    /// Closes the connection (see the module's doc on stalls).
    stalled: CancellationToken,
    /// The peer's address, for the per-source TokenReview limit.
    source: IpAddr,
}

async fn handle(req: Request<Incoming>, conn: Conn) -> Response<Body> {
    let Conn {
        server,
        shutdown,
        stalled,
        source,
    } = conn;
    let metrics = server.index.metrics().clone();
    if req.uri().path() != SUBSCRIBE_PATH || req.method() != http::Method::POST {
        metrics.push_refusal("not_found");
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    let Some(pod) = req
        .headers()
        .get(POD_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(ObjectKey::parse)
    else {
        metrics.push_refusal("bad_request");
        return plain(
            StatusCode::BAD_REQUEST,
            format!("the {POD_HEADER} header must name the pod as namespace/name\n"),
        );
    };
    if !server.index.is_synced() {
        metrics.push_refusal("not_synced");
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "the operator's index is not synced yet\n",
        );
    }
    let token = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match server.auth.authenticate(token, source, &metrics).await {
        Err(error) => {
            metrics.push_refusal(error.reason());
            // Refusals a flood causes are logged at debug: the metric counts them.
            match error {
                auth::AuthError::RateLimited
                | auth::AuthError::CachedRejection(_)
                | auth::AuthError::Busy => {
                    tracing::debug!(%pod, %source, %error, "subscription refused")
                }
                _ => tracing::warn!(%pod, %source, %error, "subscription refused"),
            }
            let mut r = plain(error.status(), format!("{error}\n"));
            if error.status() == StatusCode::TOO_MANY_REQUESTS {
                r.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    http::HeaderValue::from_static("1"),
                );
            }
            return r;
        }
        Ok(Some(id)) => {
            let sa = server
                .index
                .read_async(|i| i.pod_service_account(&pod).map(str::to_owned))
                .await;
            let problem = if id.namespace != pod.namespace {
                Some(format!(
                    "token is for namespace {}, pod is in {}",
                    id.namespace, pod.namespace
                ))
            } else if id.pod.as_ref().is_some_and(|p| *p != pod.name) {
                Some(format!("token is bound to another pod ({:?})", id.pod))
            } else {
                match sa {
                    None => Some(format!("{pod} is not a meshed pod the operator knows")),
                    Some(sa) if sa != id.service_account => Some(format!(
                        "{pod} runs as ServiceAccount {sa}, the token is for {}",
                        id.service_account
                    )),
                    Some(_) => None,
                }
            };
            if let Some(problem) = problem {
                metrics.push_refusal("identity_mismatch");
                tracing::warn!(%pod, %problem, "subscription refused");
                return plain(StatusCode::FORBIDDEN, format!("{problem}\n"));
            }
        }
        Ok(None) => {}
    }

    // Bounded at one frame: a session waits for its stream to take the previous update
    // before diffing again, so what it sends next is the latest view.
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let features: Vec<String> = req
        .headers()
        .get_all(FEATURES_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|f| f.trim().to_owned())
        .collect();
    let has = |name: &str| features.iter().any(|f| f == name);
    let (endpoint_deltas, traffic_policy) =
        (has(FEATURE_ENDPOINT_DELTAS), has(FEATURE_TRAFFIC_POLICY));
    let sent = Sent {
        endpoint_deltas,
        traffic_policy,
        ..Sent::default()
    };
    let views = server.index.subscribe_async(&pod).await;
    let body = req.into_body();
    let span = tracing::info_span!("push_session", %pod, endpoint_deltas, traffic_policy);
    let ends = Ends { shutdown, stalled };
    tokio::spawn(session(pod, views, body, tx, server, sent, ends).instrument(span));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-weft-push-v1"),
    );
    r
}

/// What one stream has sent so far, to compute the next delta.
#[derive(Default)]
struct Sent {
    services: ServiceSet,
    resources: Option<BTreeSet<ResourceRef>>,
    version: Option<u64>,
    /// The inbound settings sent (`None`: none).
    inbound: Option<InboundConfig>,
    /// The proxy applies per-endpoint deltas ([`FEATURE_ENDPOINT_DELTAS`]).
    endpoint_deltas: bool,
    /// The proxy enforces traffic policy ([`FEATURE_TRAFFIC_POLICY`]); without it, the
    /// fields of that feature are stripped (see [`strip_traffic_policy`]).
    traffic_policy: bool,
}

/// A service as a proxy without [`FEATURE_TRAFFIC_POLICY`] may receive it: it would NACK
/// (as an unknown field) or silently ignore a route, budget or breaker.
fn strip_traffic_policy(cfg: &ServiceConfig) -> ServiceConfig {
    ServiceConfig {
        route: None,
        retry_budget: None,
        breaker: None,
        ..cfg.clone()
    }
}

/// A resource as a proxy without [`FEATURE_TRAFFIC_POLICY`] is told it: the parts that
/// need the stripped fields require that feature instead, which such a proxy does not
/// have, so it reports them not enforced and `Programmed` does not count it. A Policy's
/// mTLS mode and authorization travel in the stripped `inbound` too.
fn without_traffic_policy(r: &ResourceRef) -> ResourceRef {
    let mut r = r.clone();
    let inbound = [feature::POLICY_MTLS, feature::POLICY_AUTHORIZATION];
    for req in &mut r.requires {
        let f = req.feature.as_str();
        if feature::TRAFFIC_POLICY.contains(&f) || inbound.contains(&f) {
            req.feature = FEATURE_TRAFFIC_POLICY.to_owned();
        }
    }
    r
}

impl Sent {
    /// The update that brings the proxy from what was sent to `view`, if anything changed.
    fn diff(&mut self, view: &ProxyView) -> Option<Update> {
        let full = self.version.is_none();
        if !full && self.version == Some(view.version) {
            return None;
        }
        let mut services = Vec::new();
        let mut endpoints = Vec::new();
        let mut removed = Vec::new();
        let wire = |cfg: &ServiceConfig| {
            if self.traffic_policy {
                cfg.clone()
            } else {
                strip_traffic_policy(cfg)
            }
        };
        for (ns, map) in view.services.namespaces() {
            let old_map = self.services.namespace(ns);
            if full {
                services.extend(map.values().map(|cfg| wire(cfg)));
                continue;
            }
            // A namespace whose map is the one sent last has not changed at all.
            if old_map.is_some_and(|o| Arc::ptr_eq(o, map)) {
                continue;
            }
            for (name, cfg) in map.iter() {
                let old = old_map.and_then(|o| o.get(name));
                if old.is_some_and(|old| Arc::ptr_eq(old, cfg) || old == cfg) {
                    continue;
                }
                let (cfg, old) = (wire(cfg), old.map(|o| wire(o)));
                if old.as_ref() == Some(&cfg) {
                    // Only stripped fields changed: nothing this proxy receives.
                    continue;
                }
                match old.filter(|_| self.endpoint_deltas) {
                    Some(old) => match EndpointDelta::between(&old, &cfg) {
                        Some(delta) => endpoints.push(delta),
                        None => services.push(cfg),
                    },
                    None => services.push(cfg),
                }
            }
        }
        if !full {
            for (ns, old_map) in self.services.namespaces() {
                let new_map = view.services.namespace(ns);
                if new_map.is_some_and(|n| Arc::ptr_eq(n, old_map)) {
                    continue;
                }
                removed.extend(
                    old_map
                        .keys()
                        .filter(|k| !new_map.is_some_and(|n| n.contains_key(*k)))
                        .cloned(),
                );
            }
        }
        let resources = (self.resources.as_ref() != Some(&view.resources)).then(|| {
            view.resources
                .iter()
                .map(|r| {
                    if self.traffic_policy {
                        r.clone()
                    } else {
                        without_traffic_policy(r)
                    }
                })
                .collect::<Vec<_>>()
        });
        // In a full update absent means none; in a delta absent means unchanged, and an
        // empty object clears what was sent.
        let inbound = if !self.traffic_policy {
            None
        } else if full {
            view.inbound.clone()
        } else if self.inbound != view.inbound {
            Some(view.inbound.clone().unwrap_or_default())
        } else {
            None
        };
        self.version = Some(view.version);
        if !full
            && services.is_empty()
            && endpoints.is_empty()
            && removed.is_empty()
            && resources.is_none()
            && inbound.is_none()
        {
            return None;
        }
        self.services = view.services.clone();
        self.resources = Some(view.resources.clone());
        self.inbound = view.inbound.clone();
        Some(Update {
            version: view.version,
            full,
            services,
            removed,
            resources,
            endpoints,
            inbound,
        })
    }
}

/// What ends a session besides its proxy: operator shutdown, and the connection's
/// stall switch.
struct Ends {
    shutdown: CancellationToken,
    stalled: CancellationToken,
}

/// A version sent and not yet answered.
struct Pending {
    version: u64,
    resources: BTreeSet<ResourceRef>,
    /// Sent as a delta (counts in the change-to-ACK histogram when acknowledged).
    delta: bool,
    /// When the connection took it: the ACK timeout runs from here.
    sent_at: Instant,
}

async fn session(
    pod: ObjectKey,
    mut views: watch::Receiver<Option<ProxyView>>,
    mut body: Incoming,
    tx: mpsc::Sender<Result<Frame<Bytes>, Infallible>>,
    server: Arc<PushServer>,
    mut sent: Sent,
    ends: Ends,
) {
    let registry = &server.registry;
    let metrics = server.index.metrics().clone();
    let ack_timeout = server.ack_timeout;
    registry.with(&pod, |s| s.streams += 1);
    tracing::info!("proxy subscribed");
    let mut pending: VecDeque<Pending> = VecDeque::new();
    // The oldest unanswered version and when it was sent. Kept apart from `pending`,
    // which drops its oldest entries past 64: a proxy that never answers while updates
    // keep coming must still reach the deadline.
    let mut unanswered: Option<(u64, Instant)> = None;
    let mut decoder = FrameDecoder::default();
    'session: loop {
        let view = views.borrow_and_update().clone();
        if let Some(view) = view {
            let delta = sent.version.is_some();
            if let Some(update) = sent.diff(&view) {
                let version = update.version;
                let bytes = match push::encode(&ServerMessage::Update(update)) {
                    Ok(b) => b,
                    Err(error) => {
                        tracing::error!(%error, "cannot encode an update");
                        break;
                    }
                };
                let len = bytes.len();
                // The channel holds one frame: waiting here means the connection has not
                // taken the previous update (the proxy does not read, or the connection's
                // flow-control window is exhausted). That too is a stall.
                let send = tx.send(Ok(Frame::data(Bytes::from(bytes))));
                match tokio::time::timeout(ack_timeout, send).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break,
                    Err(_) => {
                        stall(&metrics, &ends, version, "the connection took no update");
                        break;
                    }
                }
                metrics.pushed(len);
                registry.with(&pod, |s| {
                    s.sent_version = Some(version);
                    s.bytes_sent += len as u64;
                });
                // Kept without requirements: the registry and the ACK reports only need
                // to know which resources a version carries.
                let sent_at = Instant::now();
                pending.push_back(Pending {
                    version,
                    resources: view.resources.iter().map(ResourceRef::bare).collect(),
                    delta,
                    sent_at,
                });
                unanswered.get_or_insert((version, sent_at));
                // A proxy that never answers is cut off by the ACK timeout; until then
                // this must not grow without bound.
                while pending.len() > 64 {
                    pending.pop_front();
                }
                tracing::debug!(version, bytes = len, delta, "update sent");
            }
        }
        // The oldest unanswered version decides when the proxy counts as stalled.
        let deadline = unanswered.map(|(v, at)| (v, at + ack_timeout));
        tokio::select! {
            () = ends.shutdown.cancelled() => break,
            () = ends.stalled.cancelled() => break,
            () = async {
                match deadline {
                    Some((_, at)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let version = deadline.map_or(0, |(v, _)| v);
                stall(&metrics, &ends, version, "no answer to a version");
                break;
            }
            r = views.changed() => if r.is_err() { break },
            frame = body.frame() => {
                let data = match frame {
                    None | Some(Err(_)) => break,
                    Some(Ok(f)) => match f.into_data() {
                        Ok(d) => d,
                        Err(_) => continue,
                    },
                };
                decoder.extend(&data);
                loop {
                    let message = match decoder.next::<ClientMessage>() {
                        Ok(Some(m)) => m,
                        Ok(None) => break,
                        Err(error) => {
                            tracing::warn!(%error, "malformed message from proxy; closing");
                            break 'session;
                        }
                    };
                    if answer(&pod, message, &mut pending, &server, &metrics) {
                        unanswered = pending.front().map(|p| (p.version, p.sent_at));
                    }
                }
            }
        }
    }
    registry.with(&pod, |s| s.streams = s.streams.saturating_sub(1));
    drop(views);
    server.index.unsubscribe_async(&pod).await;
    server.index.notify();
    tracing::info!("proxy stream ended");
}

/// Counts a stall and closes the connection it happened on.
fn stall(metrics: &crate::metrics::Metrics, ends: &Ends, version: u64, what: &'static str) {
    metrics.push_stall();
    tracing::warn!(
        version,
        what,
        "push stream stalled; closing the connection so the proxy resyncs"
    );
    ends.stalled.cancel();
}

/// Records the proxy's answer; false when it answers no pending version.
fn answer(
    pod: &ObjectKey,
    message: ClientMessage,
    pending: &mut VecDeque<Pending>,
    server: &PushServer,
    metrics: &crate::metrics::Metrics,
) -> bool {
    let version = match &message {
        ClientMessage::Ack(a) => a.version,
        ClientMessage::Nack(n) => n.version,
    };
    let Some(Pending {
        resources, delta, ..
    }) = pending
        .iter()
        .position(|p| p.version == version)
        .and_then(|pos| pending.remove(pos))
    else {
        tracing::debug!(version, "answer for a version not pending; ignored");
        return false;
    };
    pending.retain(|p| p.version > version);
    match message {
        ClientMessage::Ack(ack) => {
            if delta && let Some(at) = server.index.changed_at(version) {
                metrics.change_acked(at.elapsed());
            }
            server.registry.with(pod, |s| {
                s.acked_version = Some(version);
                s.acked_resources = resources;
                s.enforcement = ack.enforcement.map(|e| bounded(e, &s.acked_resources));
                s.nack = None;
            });
            tracing::debug!(version, "ack");
        }
        ClientMessage::Nack(n) => {
            metrics.nack();
            tracing::warn!(version, reason = %n.reason, "proxy rejected config");
            server.registry.with(pod, |s| {
                s.nack = Some(NackState {
                    version,
                    reason: n.reason.clone(),
                })
            });
        }
    }
    server.index.notify();
    true
}

/// The most fields a proxy may name as not enforced for one resource, and the longest text
/// kept of each string in its report.
const MAX_REPORTED_FIELDS: usize = 64;
const MAX_REPORTED_TEXT: usize = 256;

/// Keeps of a proxy's enforcement report only what concerns the resources of the version it
/// acknowledged, once each and within bounds: the report is stored per proxy and
/// republished in this replica's ACK report, so a proxy must not be able to grow either.
fn bounded(report: Enforcement, resources: &BTreeSet<ResourceRef>) -> Enforcement {
    let clip = |s: String| {
        if s.len() > MAX_REPORTED_TEXT {
            s.chars().take(MAX_REPORTED_TEXT).collect()
        } else {
            s
        }
    };
    let enforced: BTreeSet<ResourceRef> = report
        .enforced
        .into_iter()
        .filter(|r| resources.contains(r))
        .collect();
    let mut seen = BTreeSet::new();
    let not_enforced = report
        .not_enforced
        .into_iter()
        .filter(|n| resources.contains(&n.resource) && seen.insert(n.resource.clone()))
        .map(|mut n| {
            n.fields.truncate(MAX_REPORTED_FIELDS);
            n.fields = n.fields.into_iter().map(clip).collect();
            n
        })
        .collect();
    Enforcement {
        proxy: clip(report.proxy),
        enforced: enforced.into_iter().collect(),
        not_enforced,
    }
}

#[cfg(test)]
mod tests {
    use weft_api::proxy_config::ServiceConfig;

    use super::*;
    use crate::index::NsServices;

    #[test]
    fn a_proxys_enforcement_report_is_cut_to_the_resources_it_acknowledged() {
        let route = |name: &str| ResourceRef {
            kind: "Route".into(),
            namespace: "shop".into(),
            name: name.into(),
            generation: 1,
            requires: Vec::new(),
        };
        let acked: BTreeSet<ResourceRef> = [route("web")].into_iter().collect();
        let report = Enforcement {
            proxy: "x".repeat(10_000),
            enforced: vec![route("web"), route("web"), route("invented")],
            not_enforced: vec![
                weft_api::push::NotEnforced {
                    resource: route("web"),
                    fields: vec!["f".repeat(1_000); 1_000],
                },
                weft_api::push::NotEnforced {
                    resource: route("other"),
                    fields: vec!["spec".into()],
                },
            ],
        };
        let kept = bounded(report, &acked);
        assert_eq!(kept.proxy.len(), MAX_REPORTED_TEXT);
        assert_eq!(kept.enforced, vec![route("web")]);
        assert_eq!(kept.not_enforced.len(), 1);
        assert_eq!(kept.not_enforced[0].fields.len(), MAX_REPORTED_FIELDS);
        assert!(
            kept.not_enforced[0]
                .fields
                .iter()
                .all(|f| f.len() == MAX_REPORTED_TEXT)
        );
    }

    fn service(name: &str, addrs: &[&str]) -> Arc<ServiceConfig> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "name": name,
                "endpoints": addrs.iter().map(|a| serde_json::json!({"address": a})).collect::<Vec<_>>(),
            }))
            .unwrap(),
        )
    }

    fn view(version: u64, services: &[Arc<ServiceConfig>]) -> ProxyView {
        let mut set = ServiceSet::default();
        set.insert_namespace(
            "shop",
            &Arc::new(
                services
                    .iter()
                    .map(|s| (s.name.clone(), s.clone()))
                    .collect(),
            ),
        );
        ProxyView {
            version,
            services: set,
            ..ProxyView::default()
        }
    }

    const WEB: [&str; 3] = ["198.18.100.1:80", "198.18.100.2:80", "198.18.100.3:80"];

    #[test]
    fn an_endpoint_change_goes_as_an_endpoint_delta_to_proxies_that_take_them() {
        let api = service("api.shop.80", &["198.18.101.1:80"]);
        let mut sent = Sent {
            endpoint_deltas: true,
            ..Sent::default()
        };
        let first = sent
            .diff(&view(1, &[api.clone(), service("web.shop.80", &WEB)]))
            .unwrap();
        assert!(first.full && first.services.len() == 2 && first.endpoints.is_empty());

        let web = service(
            "web.shop.80",
            &["198.18.100.1:80", "198.18.100.3:80", "198.18.100.4:80"],
        );
        let next = sent.diff(&view(2, &[api, web.clone()])).unwrap();
        assert!(!next.full);
        assert!(next.services.is_empty(), "{next:?}");
        assert_eq!(next.endpoints.len(), 1);
        let mut applied = first.services[1].clone();
        next.endpoints[0].apply(&mut applied);
        assert_eq!(applied, *web);
    }

    #[test]
    fn unchanged_namespaces_are_skipped_and_a_namespace_out_of_view_is_removed() {
        let shop: NsServices = Arc::new(
            [service("web.shop.80", &WEB), service("api.shop.80", &WEB)]
                .into_iter()
                .map(|s| (s.name.clone(), s))
                .collect(),
        );
        let other: NsServices = Arc::new(
            [service("db.other.80", &["198.18.109.1:80"])]
                .into_iter()
                .map(|s| (s.name.clone(), s))
                .collect(),
        );
        let both = |shop: &NsServices, other: Option<&NsServices>, version| {
            let mut set = ServiceSet::default();
            set.insert_namespace("shop", shop);
            if let Some(o) = other {
                set.insert_namespace("other", o);
            }
            ProxyView {
                version,
                services: set,
                ..ProxyView::default()
            }
        };
        let mut sent = Sent::default();
        assert_eq!(
            sent.diff(&both(&shop, Some(&other), 1))
                .unwrap()
                .services
                .len(),
            3
        );
        // `other` changes; `shop` is the same map: only db is sent.
        let other2: NsServices = Arc::new(
            [service("db.other.80", &["198.18.109.2:80"])]
                .into_iter()
                .map(|s| (s.name.clone(), s))
                .collect(),
        );
        let next = sent.diff(&both(&shop, Some(&other2), 2)).unwrap();
        let names: Vec<&str> = next.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["db.other.80"]);
        // `other` leaves the view: its services are removed.
        let next = sent.diff(&both(&shop, None, 3)).unwrap();
        assert_eq!(next.removed, ["db.other.80"]);
        assert!(next.services.is_empty());
    }

    #[test]
    fn proxies_without_the_feature_get_the_whole_service() {
        let mut sent = Sent::default();
        sent.diff(&view(1, &[service("web.shop.80", &WEB)]))
            .unwrap();
        let web = service("web.shop.80", &["198.18.100.1:80", "198.18.100.2:80"]);
        let next = sent.diff(&view(2, std::slice::from_ref(&web))).unwrap();
        assert!(next.endpoints.is_empty());
        assert_eq!(next.services, vec![(*web).clone()]);
        assert_eq!(
            sent.diff(&view(2, &[web])),
            None,
            "nothing new, nothing sent"
        );
    }

    /// A view of one service `web.shop.80` with a route named `route`, a Route resource
    /// needing `route.backends`, and a rate limit of `rps` (none when 0).
    fn traffic_view(version: u64, route: &str, rps: u32) -> ProxyView {
        let mut web = (*service("web.shop.80", &WEB)).clone();
        web.route = Some(weft_api::proxy_config::RouteConfig {
            name: route.into(),
            rules: Vec::new(),
        });
        web.breaker = Some(weft_api::proxy_config::BreakerConfig {
            name: "shop/b".into(),
            outlier_detection: None,
            connection_pool: None,
            dry_run: false,
        });
        let mut v = view(version, &[Arc::new(web)]);
        v.resources.insert(ResourceRef {
            kind: "Route".into(),
            namespace: "shop".into(),
            name: "web".into(),
            generation: 1,
            requires: vec![
                weft_api::push::Requirement {
                    feature: feature::ROUTE_BACKENDS.into(),
                    field: "spec.rules[0].backends".into(),
                },
                weft_api::push::Requirement {
                    feature: feature::POLICY_MTLS.into(),
                    field: "spec.mtls.mode".into(),
                },
            ],
        });
        v.inbound = (rps > 0).then(|| InboundConfig {
            rate_limit: Some(weft_api::proxy_config::RateLimitConfig {
                name: "shop/limit".into(),
                requests_per_second: rps,
                burst: rps,
                per: Default::default(),
                dry_run: false,
            }),
            ..InboundConfig::default()
        });
        v
    }

    #[test]
    fn traffic_policy_goes_only_to_proxies_that_list_the_feature() {
        // Without the feature: no route, breaker or inbound, and the resource's parts that
        // need them require the feature, so the proxy reports them not enforced.
        let mut old = Sent::default();
        let first = old.diff(&traffic_view(1, "shop/web", 5)).unwrap();
        assert_eq!(first.services[0].route, None);
        assert_eq!(first.services[0].breaker, None);
        assert_eq!(first.inbound, None);
        let resources = first.resources.unwrap();
        let features: Vec<&str> = resources[0]
            .requires
            .iter()
            .map(|r| r.feature.as_str())
            .collect();
        assert_eq!(features, [FEATURE_TRAFFIC_POLICY, FEATURE_TRAFFIC_POLICY]);
        let report = weft_proxy::enforce::report(&resources);
        assert!(report.enforced.is_empty(), "{report:?}");
        // A change in stripped fields alone sends nothing.
        assert_eq!(old.diff(&traffic_view(2, "shop/other", 9)), None);

        // With it: everything, and the inbound settings follow their changes.
        let mut new = Sent {
            traffic_policy: true,
            ..Sent::default()
        };
        let first = new.diff(&traffic_view(1, "shop/web", 5)).unwrap();
        assert!(first.full);
        assert_eq!(
            first.services[0].route.as_ref().map(|r| r.name.as_str()),
            Some("shop/web")
        );
        assert!(first.services[0].breaker.is_some());
        assert_eq!(
            first
                .inbound
                .and_then(|i| i.rate_limit)
                .map(|r| r.requests_per_second),
            Some(5)
        );
        assert_eq!(
            first.resources.unwrap()[0].requires[0].feature,
            feature::ROUTE_BACKENDS
        );
        let changed = new.diff(&traffic_view(2, "shop/web", 9)).unwrap();
        assert!(changed.services.is_empty() && changed.resources.is_none());
        assert_eq!(
            changed
                .inbound
                .and_then(|i| i.rate_limit)
                .map(|r| r.requests_per_second),
            Some(9)
        );
        let cleared = new.diff(&traffic_view(3, "shop/web", 0)).unwrap();
        assert_eq!(
            cleared.inbound,
            Some(InboundConfig::default()),
            "an empty object clears it"
        );
        let rerouted = new.diff(&traffic_view(4, "shop/v2", 0)).unwrap();
        assert_eq!(rerouted.inbound, None, "absent in a delta: unchanged");
        assert_eq!(rerouted.services.len(), 1);
    }
}
