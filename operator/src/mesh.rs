//! The control plane's wiring: watches → index → push server, the status writer behind
//! a Lease, and the admin listener. The binary and the tests both start it through
//! [`run`], on listeners they bound.
//!
//! ```text
//!            ┌── index::watch (7 watches) ──▶ SharedIndex ◀── push::serve (proxies)
//! run(..) ───┼── status::lease ──leader──▶ status::StatusWriter ◀── Peers
//!            ├── status::reports: publish this replica's ACKs, watch the peers' ──┘
//!            └── admin: /healthz /readyz (index synced) /readyz/webhook /metrics /proxies /version
//! ```

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Response, StatusCode, header::CONTENT_TYPE};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use kube::Client;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;
pub use weft_api::proxy_status::ProxyRow;

use crate::{
    index::{Index, ObjectKey, shared::SharedIndex},
    metrics::Metrics,
    push::{self, Authenticator, PushServer, Registry},
    readiness::Readiness,
    status::{
        StatusWriter, lease,
        reports::{self, Peers},
    },
};

/// What [`run`] needs besides the client.
#[derive(Debug)]
pub struct Settings {
    /// The push server's listener.
    pub push: TcpListener,
    /// The push server's TLS (a serving certificate from the mesh CA,
    /// [`crate::identity::push_tls`]); `None` serves plain text, only for an operator
    /// without identity.
    pub push_tls: Option<Arc<rustls::ServerConfig>>,
    /// The admin listener (`/healthz`, `/readyz`, `/metrics`, `/proxies`, `/version`).
    pub admin: Option<TcpListener>,
    /// The SPIFFE trust domain of endpoint identities.
    pub trust_domain: String,
    /// The mesh-wide mTLS mode: that of pods no Policy selects (namespace-wide and
    /// workload Policies override it).
    pub mesh_mtls: weft_api::proxy_config::MtlsMode,
    /// How subscribers are authenticated.
    pub auth: Authenticator,
    /// How long a proxy may take to receive and answer an update before its connection
    /// is closed as stalled ([`push::DEFAULT_ACK_TIMEOUT`] in the operator).
    pub push_ack_timeout: Duration,
    /// The Lease that elects the status writer; `None` writes no status.
    pub lease: Option<lease::LeaseConfig>,
    /// Only this namespace is watched (for tests and single-namespace installs); `None`
    /// watches the whole cluster.
    pub namespace: Option<String>,
}

/// Handles to a running control plane.
#[derive(Clone, Debug)]
pub struct Handles {
    /// The index.
    pub index: Arc<SharedIndex>,
    /// What each proxy runs.
    pub registry: Arc<Registry>,
    /// The operator's metrics (served at `/metrics` on the admin listener).
    pub metrics: Arc<Metrics>,
    /// The other replicas' proxies, from their ACK reports.
    pub peers: Arc<Peers>,
    /// Parts besides the index that `/readyz` waits for (the webhook takes a gate).
    pub readiness: Arc<Readiness>,
}

/// Starts the control plane; it runs until `shutdown`, and the returned task ends when
/// every part has stopped.
pub fn run(
    client: Client,
    settings: Settings,
    shutdown: CancellationToken,
) -> (Handles, tokio::task::JoinHandle<()>) {
    let metrics = Arc::new(Metrics::new());
    let index = SharedIndex::new(
        Index::new(settings.trust_domain.clone()).with_mesh_mtls(settings.mesh_mtls),
        metrics.clone(),
    );
    let registry = Arc::new(Registry::default());
    let peers = Arc::new(match &settings.lease {
        // A replica that has not rewritten its report for two Lease durations is gone.
        Some(l) => Peers::new(l.identity.clone(), l.duration * 2),
        None => Peers::new(String::new(), Duration::ZERO),
    });
    let handles = Handles {
        index: index.clone(),
        registry: registry.clone(),
        metrics: metrics.clone(),
        peers: peers.clone(),
        readiness: Arc::new(Readiness::default()),
    };
    let tracker = TaskTracker::new();
    tracker.spawn(
        crate::index::watch::run(
            client.clone(),
            index.clone(),
            settings.namespace.clone(),
            shutdown.clone(),
        )
        .instrument(tracing::info_span!("watches")),
    );
    let server = Arc::new(PushServer {
        index: index.clone(),
        registry: registry.clone(),
        auth: settings.auth,
        ack_timeout: settings.push_ack_timeout,
    });
    let push_task = {
        let shutdown = shutdown.clone();
        async move {
            match settings.push_tls {
                Some(tls) => push::serve_tls(settings.push, server, tls, shutdown).await,
                None => push::serve(settings.push, server, shutdown).await,
            }
        }
    };
    tracker.spawn(push_task.instrument(tracing::info_span!("push")));
    if let Some(lease_config) = settings.lease {
        let (leader_tx, leader_rx) = watch::channel(false);
        let instance = lease_config.identity.clone();
        tracker.spawn(
            reports::publish(
                client.clone(),
                lease_config.namespace.clone(),
                instance.clone(),
                registry.clone(),
                index.clone(),
                lease_config.duration / 3,
                shutdown.clone(),
            )
            .instrument(tracing::info_span!("ack_report")),
        );
        tracker.spawn(
            reports::watch_peers(
                client.clone(),
                lease_config.namespace.clone(),
                peers.clone(),
                shutdown.clone(),
            )
            .instrument(tracing::info_span!("peers")),
        );
        tracker.spawn(
            lease::run(client.clone(), lease_config, leader_tx, shutdown.clone())
                .instrument(tracing::info_span!("lease")),
        );
        let writer = StatusWriter::new(
            client,
            index.clone(),
            registry.clone(),
            peers,
            leader_rx,
            instance,
        );
        tracker.spawn(
            writer
                .run(shutdown.clone())
                .instrument(tracing::info_span!("status")),
        );
    }
    if let Some(admin) = settings.admin {
        tracker.spawn(
            serve_admin(admin, handles.clone(), metrics, shutdown.clone())
                .instrument(tracing::info_span!("admin")),
        );
    }
    tracker.close();
    let done = tokio::spawn(async move { tracker.wait().await });
    (handles, done)
}

/// The rows of `/proxies`, sorted by pod: this replica's proxies and its peers'.
pub async fn proxy_rows(handles: &Handles) -> Vec<ProxyRow> {
    let desired: std::collections::HashMap<ObjectKey, Option<u64>> = handles
        .index
        .desired_views_async()
        .await
        .into_iter()
        .map(|(k, v)| (k, v.map(|v| v.version)))
        .collect();
    let local = handles.registry.snapshot();
    let mut proxies = local.clone();
    handles.peers.merge_now(&mut proxies, &mut Vec::new());
    proxies
        .into_iter()
        .map(|(key, s)| {
            // Versions are numbered by the replica that serves the proxy: for a peer's
            // proxy, the version that replica sent it last is the one it wants.
            let desired_version = if local.get(&key) == Some(&s) {
                desired.get(&key).copied().flatten()
            } else {
                s.sent_version
            };
            ProxyRow {
                pod: s.pod,
                connected: s.streams > 0,
                desired_version,
                acked_version: s.acked_version,
                in_sync: s.streams > 0
                    && desired_version.is_some()
                    && desired_version == s.acked_version,
                rejected: s
                    .nack
                    .map(|n| format!("version {}: {}", n.version, n.reason)),
                last_seen: s.last_seen,
                resources: s.acked_resources.len(),
                proxy: s.enforcement.as_ref().map(|e| e.proxy.clone()),
                not_enforced: s.enforcement.map(|e| {
                    e.not_enforced
                        .iter()
                        .map(|n| {
                            let r = &n.resource;
                            format!("{} {}/{}", r.kind, r.namespace, r.name)
                        })
                        .collect()
                }),
            }
        })
        .collect()
}

async fn serve_admin(
    listener: TcpListener,
    handles: Handles,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    tracing::info!(addr = ?listener.local_addr().ok(), "admin listening");
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handles = handles.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (handles, metrics) = (handles.clone(), metrics.clone());
                    async move {
                        let (status, ctype, body) = match req.uri().path() {
                            "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
                            "/readyz" if !handles.index.is_synced() => (
                                StatusCode::SERVICE_UNAVAILABLE,
                                "text/plain",
                                "index not synced\n".to_owned(),
                            ),
                            // The Service carrying config push and identity follows this:
                            // a webhook that cannot start must not take those out too.
                            "/readyz" => match handles.readiness.waiting_for() {
                                waiting if waiting.is_empty() => {
                                    (StatusCode::OK, "text/plain", "ok\n".to_owned())
                                }
                                waiting => (
                                    StatusCode::OK,
                                    "text/plain",
                                    format!("ok; not serving yet: {}\n", waiting.join(", ")),
                                ),
                            },
                            "/readyz/webhook"
                                if handles.readiness.waiting_for().contains(&"webhook") =>
                            {
                                (
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    "text/plain",
                                    "webhook not serving\n".to_owned(),
                                )
                            }
                            "/readyz/webhook" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
                            "/metrics" => (
                                StatusCode::OK,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                metrics.encode(),
                            ),
                            "/version" => (
                                StatusCode::OK,
                                "application/json",
                                serde_json::to_string(&weft_api::proxy_status::OperatorVersion {
                                    version: env!("CARGO_PKG_VERSION").to_owned(),
                                })
                                .unwrap_or_default(),
                            ),
                            "/proxies" => (
                                StatusCode::OK,
                                "application/json",
                                serde_json::to_string(&proxy_rows(&handles).await)
                                    .unwrap_or_default(),
                            ),
                            _ => (
                                StatusCode::NOT_FOUND,
                                "text/plain",
                                "not found\n".to_owned(),
                            ),
                        };
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = status;
                        r.headers_mut()
                            .insert(CONTENT_TYPE, http::HeaderValue::from_static(ctype));
                        Ok::<_, Infallible>(r)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
