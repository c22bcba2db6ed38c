//! Helpers shared by the webhook tests and the admission benchmark: a webhook per
//! namespace, scoped by a namespace label so tests cannot see each other's webhooks.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeMap, net::IpAddr, sync::Arc, time::Duration};

use anyhow::ensure;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use serde_json::json;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use weft_e2e::shared::{self, eventually};
use weft_operator::{
    index::shared::SharedIndex,
    inject::{InjectConfig, keys},
    webhook::{self, FailurePolicy, Registration, Target, WebhookMetrics, WebhookSettings},
};

pub mod mesh;
pub mod processes;

pub const SCOPE_LABEL: &str = "e2e.weft.dev/webhook";

pub struct Webhook {
    pub stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<()>,
    pub metrics: WebhookMetrics,
}

impl Webhook {
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
        self.task.abort();
    }
}

/// A test's own namespace served by its own webhook, and the API for the namespace's pods:
/// what most webhook tests start with.
pub struct Injecting {
    /// A client of the test bed (this test's runtime).
    pub client: Client,
    /// The namespace only this webhook serves.
    pub ns: String,
    /// The webhook.
    pub hook: Webhook,
    /// The webhook's port on loopback.
    pub port: u16,
    /// The namespace's pods.
    pub pods: Api<Pod>,
}

impl Injecting {
    /// A namespace `<prefix>-…` (not labelled for injection) and a webhook with a one-hour
    /// certificate and failure policy `policy`, called by the API server.
    pub async fn start(prefix: &str, policy: FailurePolicy) -> Injecting {
        Injecting::start_with(prefix, policy, Duration::from_secs(3600)).await
    }

    /// As [`Injecting::start`], with the webhook's certificate living `cert_lifetime`.
    pub async fn start_with(
        prefix: &str,
        policy: FailurePolicy,
        cert_lifetime: Duration,
    ) -> Injecting {
        let client = shared::client().await.unwrap();
        let ns = scoped_namespace(&client, prefix, None).await;
        let (hook, port) = start_webhook_with(&client, &ns, policy, cert_lifetime).await;
        Injecting::of(client, ns, hook, port)
    }

    /// As [`Injecting::start`] (failure policy Fail), injecting with `inject` instead of
    /// the tests' settings.
    pub async fn start_injecting(prefix: &str, inject: InjectConfig) -> Injecting {
        let client = shared::client().await.unwrap();
        let ns = scoped_namespace(&client, prefix, None).await;
        let (hook, port) = start_webhook_full(
            &client,
            &ns,
            FailurePolicy::Fail,
            Duration::from_secs(3600),
            None,
            Some(inject),
        )
        .await;
        Injecting::of(client, ns, hook, port)
    }

    fn of(client: Client, ns: String, hook: Webhook, port: u16) -> Injecting {
        let pods = Api::<Pod>::namespaced(client.clone(), &ns);
        Injecting {
            client,
            ns,
            hook,
            port,
            pods,
        }
    }

    /// Creates pod `name` (see [`pod`]) with `annotations`, as the API server admits it.
    pub async fn create(&self, name: &str, annotations: serde_json::Value) -> Pod {
        self.create_pod(&pod(name, annotations)).await.unwrap()
    }

    /// Creates `pod`: as the API server admitted it, or its refusal.
    pub async fn create_pod(&self, pod: &Pod) -> Result<Pod, kube::Error> {
        self.pods.create(&PostParams::default(), pod).await
    }
}

/// A fresh namespace, labelled so that only this test's webhook serves it.
pub async fn scoped_namespace(client: &Client, prefix: &str, inject_label: Option<&str>) -> String {
    let ns = shared::namespace(client, prefix).await.unwrap();
    let mut labels = BTreeMap::from([(SCOPE_LABEL.to_owned(), ns.clone())]);
    if let Some(v) = inject_label {
        labels.insert(keys::INJECT.to_owned(), v.to_owned());
    }
    let patch = json!({"metadata": {"labels": labels}});
    Api::<Namespace>::all(client.clone())
        .patch(&ns, &Default::default(), &kube::api::Patch::Merge(&patch))
        .await
        .unwrap();
    ns
}

pub async fn ensure_namespace(client: &Client, name: &str) {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        ..Default::default()
    };
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating namespace {name}: {e}"),
    }
}

pub fn settings(ns: &str, port: u16, policy: FailurePolicy) -> WebhookSettings {
    WebhookSettings {
        inject: InjectConfig {
            proxy_image: "weft.invalid/weft-proxy:test".to_owned(),
            proxy_version: "0.1.0-test".to_owned(),
            ..InjectConfig::default()
        },
        registration: Registration {
            name: format!("weft-injector-{ns}"),
            target: Target::Url(format!("https://127.0.0.1:{port}/inject")),
            failure_policy: policy,
            timeout_seconds: 5,
            annotation_opt_in: true,
            excluded_namespaces: vec!["kube-system".to_owned(), "weft-system".to_owned()],
            namespace_scope: Some((SCOPE_LABEL.to_owned(), ns.to_owned())),
        },
        ca_namespace: "weft-system".to_owned(),
        ca_secret: "weft-ca".to_owned(),
        dns_names: vec!["localhost".to_owned()],
        ips: vec![IpAddr::from([127, 0, 0, 1])],
        cert_lifetime: Duration::from_secs(3600),
        audit_interval: Duration::from_secs(1),
    }
}

/// Starts a webhook for `ns` and waits until the API server calls it.
pub async fn start_webhook(client: &Client, ns: &str, policy: FailurePolicy) -> Webhook {
    start_webhook_with(client, ns, policy, Duration::from_secs(3600))
        .await
        .0
}

/// Like [`start_webhook`], with a given certificate lifetime; also returns the port.
pub async fn start_webhook_with(
    client: &Client,
    ns: &str,
    policy: FailurePolicy,
    cert_lifetime: Duration,
) -> (Webhook, u16) {
    start_webhook_full(client, ns, policy, cert_lifetime, None, None).await
}

/// Like [`start_webhook`], reading namespace labels from the operator's `index`.
pub async fn start_webhook_sharing(client: &Client, ns: &str, index: Arc<SharedIndex>) -> Webhook {
    start_webhook_full(
        client,
        ns,
        FailurePolicy::Fail,
        Duration::from_secs(3600),
        Some(index),
        None,
    )
    .await
    .0
}

async fn start_webhook_full(
    client: &Client,
    ns: &str,
    policy: FailurePolicy,
    cert_lifetime: Duration,
    index: Option<Arc<SharedIndex>>,
    inject: Option<InjectConfig>,
) -> (Webhook, u16) {
    ensure_namespace(client, "weft-system").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = oneshot::channel::<()>();
    let metrics = WebhookMetrics::default();
    let task = tokio::spawn({
        let client = client.clone();
        let mut settings = settings(ns, port, policy);
        settings.cert_lifetime = cert_lifetime;
        if let Some(inject) = inject {
            settings.inject = inject;
        }
        let metrics = metrics.clone();
        async move {
            webhook::run_with(client, settings, index, listener, metrics, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        }
    });
    // The API server picks up new webhook configurations asynchronously: dry-run a pod
    // creation until it comes back injected.
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    eventually(Duration::from_secs(30), || {
        let pods = pods.clone();
        async move {
            let probe = pod("probe", json!({"weft.dev/inject": "enabled"}));
            let created = pods
                .create(
                    &PostParams {
                        dry_run: true,
                        ..Default::default()
                    },
                    &probe,
                )
                .await?;
            ensure!(has_proxy(&created), "webhook not called yet");
            Ok(())
        }
    })
    .await
    .unwrap();
    (
        Webhook {
            stop: Some(stop),
            task,
            metrics,
        },
        port,
    )
}

pub fn pod(name: &str, annotations: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "weft.invalid/app:1", "ports": [{"containerPort": 8080}]}]}
    }))
    .unwrap()
}

pub fn has_proxy(pod: &Pod) -> bool {
    init_names(pod).iter().any(|n| n == keys::PROXY_CONTAINER)
}

pub fn init_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .map(|c| c.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default()
}
