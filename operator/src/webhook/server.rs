//! The webhook's HTTPS server: TLS with a swappable certificate, `POST /inject` for
//! AdmissionReviews, `GET /healthz`, `GET /metrics` (also merged into the operator's admin
//! `/metrics`). Bodies are capped; every request gets an answer.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    core::PartialObjectMeta,
    runtime::reflector::{ObjectRef, Store},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::net::TcpListener;

use super::{review, tls::CertStore};
use crate::{
    index::shared::SharedIndex,
    inject::{InjectConfig, keys},
};

/// The largest AdmissionReview accepted (the API server's own request limit is 3 MiB).
const MAX_BODY: usize = 8 * 1024 * 1024;

/// Label set of the admission counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Label set of the CA-change counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// What the webhook did about a change of its CA Secret while serving: the `result` of
/// `weft_webhook_ca_changes_total`. Each replica counts what it did itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaChange {
    /// Another CA replaced the one served from: the bundle trusts both, and the webhook
    /// serves from the new one.
    Followed,
    /// The Secret was deleted: a new CA was generated (by this replica, or by another that
    /// created the Secret first, whose CA it took) and the webhook serves from it.
    Generated,
    /// The Secret held no usable CA: the webhook kept serving from the one it had. Counted
    /// once per version of the Secret.
    Refused,
}

impl CaChange {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CaChange::Followed => "followed",
            CaChange::Generated => "generated",
            CaChange::Refused => "refused",
        }
    }
}

/// The webhook's metrics.
#[derive(Clone, Debug)]
pub struct WebhookMetrics {
    admissions: Family<OutcomeLabels, Counter>,
    ca_changes: Family<ResultLabels, Counter>,
    latency: Histogram,
    /// Pods that opted in but run without the proxy (see `inject::audit`).
    pub unmeshed: Gauge,
    /// The webhook server's connections and failed TLS handshakes.
    pub connections: crate::https::ConnMetrics,
}

impl Default for WebhookMetrics {
    fn default() -> Self {
        // Every result from the start, at zero: an alert on its increase sees the first.
        let ca_changes = Family::<ResultLabels, Counter>::default();
        for change in [CaChange::Followed, CaChange::Generated, CaChange::Refused] {
            drop(ca_changes.get_or_create(&ResultLabels {
                result: change.as_str(),
            }));
        }
        WebhookMetrics {
            admissions: Family::default(),
            ca_changes,
            latency: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
            ]),
            unmeshed: Gauge::default(),
            connections: crate::https::ConnMetrics::default(),
        }
    }
}

impl WebhookMetrics {
    /// Registers the metrics under `weft_webhook_*`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "weft_webhook_admissions",
            "Pod admissions by outcome (injected, denied, invalid, or why skipped)",
            self.admissions.clone(),
        );
        registry.register(
            "weft_webhook_admission_duration_seconds",
            "Time to answer one AdmissionReview",
            self.latency.clone(),
        );
        registry.register(
            "weft_unmeshed_pods",
            "Pods that opted in to the mesh but run without the proxy (created while the webhook was unreachable); restart them",
            self.unmeshed.clone(),
        );
        registry.register(
            "weft_webhook_ca_changes",
            "Changes of the webhook's CA Secret acted on, by result: followed (another CA), generated (a new CA after a deletion), refused (no usable CA)",
            self.ca_changes.clone(),
        );
        // A failed handshake is the one trace of an API server that does not trust the
        // webhook's certificate (a stale caBundle): its call fails before any request.
        self.connections.register(registry, "weft_webhook");
    }

    /// How many admissions ended with this outcome label.
    pub fn count(&self, outcome: &'static str) -> u64 {
        self.admissions
            .get_or_create(&OutcomeLabels { outcome })
            .get()
    }

    /// How many changes of the CA Secret ended with `change`.
    pub fn ca_changes(&self, change: CaChange) -> u64 {
        self.ca_changes
            .get_or_create(&ResultLabels {
                result: change.as_str(),
            })
            .get()
    }

    /// Counts one change of the CA Secret that ended with `change`.
    pub(crate) fn ca_changed(&self, change: CaChange) {
        self.ca_changes
            .get_or_create(&ResultLabels {
                result: change.as_str(),
            })
            .inc();
    }
}

/// The outcome label of an admission answered with HTTP 500 because the pod's namespace
/// could not be read.
const NAMESPACE_UNREADABLE: &str = "namespace_unreadable";

/// A namespace that neither the index (or store) nor the API could tell about.
#[derive(Debug, thiserror::Error)]
#[error("reading the labels of namespace {namespace}: {source}")]
pub struct NamespaceLookupError {
    namespace: String,
    #[source]
    source: kube::Error,
}

/// Where the webhook reads namespaces' injection labels.
#[derive(Clone)]
pub enum NamespaceLabels {
    /// The webhook's own metadata watch (a reflector store).
    Store(Store<PartialObjectMeta<Namespace>>),
    /// The operator's index, which already watches every namespace: one watch per kind.
    Index(Arc<SharedIndex>),
}

/// Answers AdmissionReviews.
pub struct Handler {
    inject: InjectConfig,
    namespaces: NamespaceLabels,
    client: Client,
    metrics: WebhookMetrics,
}

impl Handler {
    /// A handler reading namespace labels from `namespaces`, falling back to the API for
    /// a namespace not seen there yet.
    pub fn new(
        inject: InjectConfig,
        namespaces: NamespaceLabels,
        client: Client,
        metrics: WebhookMetrics,
    ) -> Self {
        Handler {
            inject,
            namespaces,
            client,
            metrics,
        }
    }

    /// Whether namespace `name` opted in, from the index or store, else from the API. An
    /// API read that fails is an error, never "not opted in": the caller answers it so that
    /// the registration's failure policy decides.
    async fn namespace_opted_in(&self, name: &str) -> Result<bool, NamespaceLookupError> {
        let known = match &self.namespaces {
            NamespaceLabels::Store(store) => store
                .get(&ObjectRef::new(name))
                .map(|ns| ns.metadata.labels.clone()),
            // Never waits for the index: a re-list holds it for seconds, past the API
            // server's timeout for this call (after which, with `failurePolicy: Ignore`, the
            // pod is admitted without the proxy). While a change holds it, the API answers.
            NamespaceLabels::Index(index) => index
                .try_read(|i| {
                    i.namespace_inject_label(name).map(|label| {
                        label.map(|v| BTreeMap::from([(keys::INJECT.to_owned(), v.to_owned())]))
                    })
                })
                .unwrap_or_else(|| {
                    tracing::debug!(
                        namespace = name,
                        "index busy; reading the namespace from the API"
                    );
                    None
                }),
        };
        let labels = match known {
            Some(labels) => labels,
            None => match Api::<Namespace>::all(self.client.clone())
                .get_metadata_opt(name)
                .await
            {
                Ok(Some(ns)) => ns.metadata.labels,
                Ok(None) => None,
                Err(source) => {
                    return Err(NamespaceLookupError {
                        namespace: name.to_owned(),
                        source,
                    });
                }
            },
        };
        Ok(crate::inject::namespace_opted_in(labels.as_ref()))
    }

    /// Answers one AdmissionReview body with the JSON review to send back, or with the
    /// error to answer as HTTP 500 when the pod's namespace could not be read (so that the
    /// API server applies the registration's failure policy: `Fail` refuses the pod,
    /// `Ignore` admits it without the proxy).
    pub async fn review(&self, body: &[u8]) -> Result<Vec<u8>, NamespaceLookupError> {
        let started = Instant::now();
        let (answer, outcome) = match review::parse(body) {
            Err(answer) => *answer,
            Ok(req) => {
                let ns = review::namespace(&req);
                match self.namespace_opted_in(&ns).await {
                    Ok(opted_in) => review::admit(&req, opted_in, &self.inject),
                    Err(error) => {
                        self.count(NAMESPACE_UNREADABLE, started);
                        tracing::warn!(%error, "answering an admission with an error");
                        return Err(error);
                    }
                }
            }
        };
        self.count(outcome.as_str(), started);
        match &outcome {
            review::Outcome::Denied(e) => {
                tracing::info!(reason = %e, "denied a pod that cannot be injected")
            }
            review::Outcome::Invalid(e) => tracing::warn!(reason = %e, "invalid admission request"),
            other => tracing::debug!(outcome = other.as_str(), "admission"),
        }
        // An AdmissionReview always serializes; an empty body would still be answered.
        Ok(serde_json::to_vec(&answer).unwrap_or_default())
    }

    fn count(&self, outcome: &'static str, started: Instant) {
        self.metrics
            .admissions
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        self.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok"),
            (&Method::GET, "/metrics") => {
                let mut registry = Registry::default();
                self.metrics.register(&mut registry);
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => {
                        let mut resp = Response::new(Full::new(Bytes::from(body)));
                        resp.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static(
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            ),
                        );
                        resp
                    }
                    Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed"),
                }
            }
            (&Method::POST, "/inject") => {
                let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => {
                        return match self.review(format!("body: {e}").as_bytes()).await {
                            Ok(answer) => json(StatusCode::PAYLOAD_TOO_LARGE, answer),
                            Err(e) => error(e),
                        };
                    }
                };
                match self.review(&body).await {
                    Ok(answer) => json(StatusCode::OK, answer),
                    Err(e) => error(e),
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found"),
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp
}

/// An HTTP 500 with the reason: to the API server, a failed call, which the registration's
/// failure policy decides.
fn error(e: NamespaceLookupError) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(e.to_string())));
    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    resp
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

impl crate::https::Handler for Handler {
    async fn handle(&self, req: Request<Incoming>, _peer: SocketAddr) -> Response<Full<Bytes>> {
        Handler::handle(self, req).await
    }
}

/// Serves the webhook on `listener` until `shutdown` completes, then closes every
/// connection gracefully (in-flight admissions are answered, idle keep-alive connections
/// are closed so the API server stops sending here). Connections are bounded by the
/// default [`crate::https::ConnLimits`] (no bound per address: the clients are the API
/// servers) and counted in `metrics`.
pub async fn serve(
    listener: TcpListener,
    certs: CertStore,
    handler: Arc<Handler>,
    metrics: crate::https::ConnMetrics,
    shutdown: impl std::future::Future<Output = ()>,
) {
    crate::https::serve_with(
        "webhook",
        listener,
        certs.server_config(),
        handler,
        crate::https::ConnLimits::default(),
        metrics,
        shutdown,
    )
    .await
}

#[cfg(test)]
mod tests {
    // Test code: a failed unwrap is a failed test.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Patch, PatchParams};
    use serde_json::json;

    use super::*;
    use crate::{
        index::{Index, Kind, model},
        metrics::Metrics,
    };

    /// The API server's timeout for calling the webhook (the registration's default): an
    /// answer later than this is no answer, and with `failurePolicy: Ignore` the pod is
    /// admitted without the proxy.
    const API_SERVER_TIMEOUT: Duration = Duration::from_secs(3);

    /// In whole-cluster mode the webhook reads namespace labels from the index, which a
    /// re-list holds for seconds. An admission of a pod in a labelled namespace made while
    /// a re-list holds the index (paused inside `Index::replace`) is answered, injected,
    /// well within the API server's timeout: the webhook does not wait for the index but
    /// reads the namespace from the API (the test bed's real API server). It waited for the
    /// whole re-list before.
    #[test]
    fn an_admission_during_a_relist_is_answered_without_waiting_for_it() {
        // First, so that it is dropped last: the sender that releases the re-list goes
        // first, even when an assertion fails.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (client, ns) = runtime.block_on(async {
            let client = weft_e2e::shared::client().await.unwrap();
            let ns = weft_e2e::shared::namespace(&client, "inject-relist")
                .await
                .unwrap();
            let labels = json!({"metadata": {"labels": {keys::INJECT: "enabled"}}});
            let ns = Api::<Namespace>::all(client.clone())
                .patch(&ns, &PatchParams::default(), &Patch::Merge(&labels))
                .await
                .unwrap();
            (client, ns)
        });
        let shared = SharedIndex::new(Index::new("cluster.local"), Arc::new(Metrics::new()));
        let (key, object) = model::namespace(&ns);
        shared.update(|i| i.apply(key, object));
        let name = ns.metadata.name.clone().unwrap();
        assert_eq!(
            shared.read(|i| i
                .namespace_inject_label(&name)
                .map(|l| l.map(str::to_owned))),
            Some(Some("enabled".to_owned())),
            "the index knows the namespace's label"
        );
        let (entered, release) = shared.pause_next_replace();
        let relist = runtime.spawn({
            let shared = shared.clone();
            async move {
                shared
                    .update_async(|i| i.replace(Kind::Pod, Vec::new()))
                    .await
            }
        });
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("the re-list reaches Index::replace");

        let metrics = WebhookMetrics::default();
        let handler = Handler::new(
            InjectConfig::default(),
            NamespaceLabels::Index(shared.clone()),
            client,
            metrics.clone(),
        );
        let body = serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": name,
                "operation": "CREATE",
                "userInfo": {"username": "admin"},
                "object": {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"generateName": "web-"},
                    "spec": {"containers": [{"name": "web", "image": "nginx"}]}
                },
                "dryRun": false,
            }
        }))
        .unwrap();
        let (answered_tx, answered) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            let answer = handler.review(&body).await.map_err(|e| e.to_string());
            let _ = answered_tx.send(answer);
        });
        // From this thread, not the runtime's timer.
        let answer = answered
            .recv_timeout(API_SERVER_TIMEOUT)
            .expect("the admission waited for the re-list past the API server's timeout")
            .unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(answer["response"]["allowed"], true, "{answer}");
        assert_eq!(answer["response"]["patchType"], "JSONPatch", "{answer}");
        assert_eq!(metrics.count("injected"), 1);

        release.send(()).unwrap();
        let applied = runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), relist).await })
            .expect("the re-list completes")
            .unwrap();
        assert_eq!(applied, Ok(()));
    }
}
