//! The MutatingWebhookConfiguration the operator owns: who the API server calls, with
//! which CA bundle, for which pods, and what happens when the operator is down.
//!
//! Three entries, disjoint by construction, so that the API server only calls the
//! webhook for pods that may have opted in (their selectors are
//! `weft_inject::selection::entries`, which the unmeshed-pod audit evaluates too):
//!
//! | entry | namespaces | pods |
//! | --- | --- | --- |
//! | `namespace.inject.weft.dev` | labelled `weft.dev/inject=enabled` | not labelled `weft.dev/inject=disabled` |
//! | `pod-label.inject.weft.dev` | not labelled enabled, not excluded | labelled `weft.dev/inject=enabled` |
//! | `pod-annotation.inject.weft.dev` (optional) | not labelled, not excluded | no `weft.dev/inject` label |
//!
//! The third entry exists because a pod annotation cannot be selected on: with it, every
//! pod in an unlabelled namespace costs one webhook call (answered in well under a
//! millisecond). Turn it off (`--webhook-annotation-opt-in=false`) to opt in by labels only.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::admissionregistration::v1::{
        MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
        WebhookClientConfig,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams},
};

use crate::inject::selection;

/// The field manager the operator applies its objects with.
pub const FIELD_MANAGER: &str = "weft-operator";

/// Where the API server reaches the webhook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Through a Service (in a cluster).
    Service {
        /// The Service's namespace.
        namespace: String,
        /// The Service's name.
        name: String,
        /// The Service port.
        port: i32,
    },
    /// At a URL (the test bed, where the API server runs outside the cluster).
    Url(String),
}

/// What happens to pod creation when the webhook cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FailurePolicy {
    /// Pods are created without the proxy (they show in `kubectl weft check`).
    #[default]
    Ignore,
    /// Pod creation fails until the webhook is back.
    Fail,
}

/// Writes of a bundle [`Registration::replace_bundles`] tries: each loses only to another
/// writer, replicas rotating together converge in a few, and more would mean a writer that
/// never stops.
const REPLACE_TRIES: u32 = 5;

/// Settings of the webhook registration.
#[derive(Clone, Debug)]
pub struct Registration {
    /// Name of the MutatingWebhookConfiguration.
    pub name: String,
    /// Where the API server calls.
    pub target: Target,
    /// `Ignore` (default) or `Fail`.
    pub failure_policy: FailurePolicy,
    /// How long the API server waits for an answer (1–30 s).
    pub timeout_seconds: i32,
    /// Whether pods may opt in by annotation (see the module docs for the cost).
    pub annotation_opt_in: bool,
    /// Namespaces never sent to the webhook.
    pub excluded_namespaces: Vec<String>,
    /// When set, only namespaces carrying this label (key, value) are served, so that two
    /// operators (say, during an upgrade, or in tests) can each own a set of namespaces.
    pub namespace_scope: Option<(String, String)>,
}

impl Registration {
    /// The entries' selectors, namespace scope included: the registration is built from
    /// them, and the unmeshed-pod audit judges pods by them.
    pub fn entries(&self) -> Vec<selection::Entry> {
        selection::entries(
            self.annotation_opt_in,
            &self.excluded_namespaces,
            self.namespace_scope
                .as_ref()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
    }

    /// The object to apply, with `ca_bundle` (PEM) as the trust root for the webhook.
    pub fn object(&self, ca_bundle: &str) -> MutatingWebhookConfiguration {
        let client_config = match &self.target {
            Target::Service {
                namespace,
                name,
                port,
            } => WebhookClientConfig {
                service: Some(ServiceReference {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    path: Some("/inject".to_owned()),
                    port: Some(*port),
                }),
                ca_bundle: Some(ByteString(ca_bundle.as_bytes().to_vec())),
                url: None,
            },
            Target::Url(url) => WebhookClientConfig {
                url: Some(url.clone()),
                ca_bundle: Some(ByteString(ca_bundle.as_bytes().to_vec())),
                service: None,
            },
        };
        let entry =
            |name: &str, ns: Vec<LabelSelectorRequirement>, pods: LabelSelector| MutatingWebhook {
                name: name.to_owned(),
                client_config: client_config.clone(),
                admission_review_versions: vec!["v1".to_owned()],
                side_effects: "None".to_owned(),
                failure_policy: Some(
                    match self.failure_policy {
                        FailurePolicy::Ignore => "Ignore",
                        FailurePolicy::Fail => "Fail",
                    }
                    .to_owned(),
                ),
                timeout_seconds: Some(self.timeout_seconds),
                match_policy: Some("Equivalent".to_owned()),
                reinvocation_policy: Some("Never".to_owned()),
                rules: Some(vec![RuleWithOperations {
                    api_groups: Some(vec![String::new()]),
                    api_versions: Some(vec!["v1".to_owned()]),
                    operations: Some(vec!["CREATE".to_owned()]),
                    resources: Some(vec!["pods".to_owned()]),
                    scope: Some("Namespaced".to_owned()),
                }]),
                namespace_selector: Some(LabelSelector {
                    match_expressions: Some(ns),
                    ..Default::default()
                }),
                object_selector: Some(pods),
                ..Default::default()
            };
        let webhooks = self
            .entries()
            .into_iter()
            .map(|e| entry(&e.name, e.namespaces, e.pods))
            .collect();
        MutatingWebhookConfiguration {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/part-of".to_owned(),
                    "weft".to_owned(),
                )])),
                ..Default::default()
            },
            webhooks: Some(webhooks),
        }
    }

    /// Applies the configuration (server-side apply; repeating it is harmless).
    pub async fn apply(&self, client: Client, ca_bundle: &str) -> Result<(), kube::Error> {
        let api = Api::<MutatingWebhookConfiguration>::all(client);
        let mut obj = self.object(ca_bundle);
        obj.metadata.managed_fields = None;
        let body = serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": obj.metadata,
            "webhooks": obj.webhooks,
        });
        api.patch(
            &self.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
        Ok(())
    }

    /// The indices, in `live`, of this registration's webhooks whose bundle is not
    /// `ca_bundle`: what a change of CA rewrites.
    pub fn stale_bundles(
        &self,
        live: &MutatingWebhookConfiguration,
        ca_bundle: &str,
    ) -> Vec<usize> {
        self.ours_where(live, |bundle| bundle != Some(ca_bundle.as_bytes()))
    }

    /// Writes `ca_bundle` into every one of this registration's webhooks whose bundle
    /// differs, as [`Registration::restore_bundles`] does: a deleted registration stays
    /// deleted (nothing to do), and one changed under the write is read again and retried.
    /// `Ok` only when the bundles are `ca_bundle` (or the registration is gone): after
    /// [`REPLACE_TRIES`] writes lost to another writer, the last conflict is the error, and
    /// the caller tries again later.
    pub async fn replace_bundles(
        &self,
        client: Client,
        ca_bundle: &str,
    ) -> Result<(), kube::Error> {
        let api = Api::<MutatingWebhookConfiguration>::all(client.clone());
        let mut attempt = 1;
        // No way out but a return: a loop that ran out of tries cannot fall into an `Ok`.
        loop {
            let Some(live) = api.get_opt(&self.name).await? else {
                return Ok(());
            };
            let stale = self.stale_bundles(&live, ca_bundle);
            if stale.is_empty() {
                return Ok(());
            }
            match self
                .restore_bundles(client.clone(), ca_bundle, &live, &stale)
                .await
            {
                Ok(()) => return Ok(()),
                Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
                Err(kube::Error::Api(e))
                    if matches!(e.code, 409 | 422) && attempt < REPLACE_TRIES =>
                {
                    tracing::debug!(error = %e, attempt, "the registration changed under the bundle's write; reading it again");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The names of this registration's webhooks.
    fn webhook_names(&self) -> Vec<String> {
        self.object("")
            .webhooks
            .into_iter()
            .flatten()
            .map(|w| w.name)
            .collect()
    }

    /// The indices, in `live`, of this registration's webhooks that have lost their CA
    /// bundle (none, or empty): what another client leaves when it rewrites the object
    /// without one (a GitOps sync of the chart's manifest, which has no bundle, or a hand
    /// edit), after which the API server can no longer call the webhook. A bundle of
    /// another CA is not counted: it is another replica's, and replicas that held
    /// different CAs must not rewrite each other's without end.
    pub fn missing_bundles(&self, live: &MutatingWebhookConfiguration) -> Vec<usize> {
        self.ours_where(live, |bundle| bundle.is_none_or(<[u8]>::is_empty))
    }

    /// The indices, in `live`, of this registration's webhooks whose bundle (`None` when
    /// the field is absent) meets `pick`; another party's webhooks in the object are never
    /// counted.
    fn ours_where(
        &self,
        live: &MutatingWebhookConfiguration,
        pick: impl Fn(Option<&[u8]>) -> bool,
    ) -> Vec<usize> {
        let ours = self.webhook_names();
        live.webhooks
            .iter()
            .flatten()
            .enumerate()
            .filter(|(_, w)| {
                ours.contains(&w.name)
                    && pick(w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()))
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Writes `ca_bundle` into the webhooks at `indices` of `live`, by a JSON patch that
    /// first tests its UID and resource version: it fails (404, or 422 on a changed
    /// object, whose indices may no longer be the same webhooks) rather than re-create an
    /// object that was deleted (`helm uninstall` deletes it, and a webhook left behind
    /// with `failurePolicy: Fail` would block pod creation), which a server-side apply
    /// would do whatever `resourceVersion` it carries.
    pub async fn restore_bundles(
        &self,
        client: Client,
        ca_bundle: &str,
        live: &MutatingWebhookConfiguration,
        indices: &[usize],
    ) -> Result<(), kube::Error> {
        use base64::Engine as _;
        let encoded = base64::engine::general_purpose::STANDARD.encode(ca_bundle);
        let mut ops = vec![
            serde_json::json!({"op": "test", "path": "/metadata/uid", "value": live.metadata.uid}),
            serde_json::json!({"op": "test", "path": "/metadata/resourceVersion",
                               "value": live.metadata.resource_version}),
        ];
        ops.extend(indices.iter().map(|i| {
            serde_json::json!({
                "op": "add",
                "path": format!("/webhooks/{i}/clientConfig/caBundle"),
                "value": encoded,
            })
        }));
        let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))
            .map_err(kube::Error::SerdeError)?;
        Api::<MutatingWebhookConfiguration>::all(client)
            .patch(
                &self.name,
                &PatchParams::default(),
                &Patch::Json::<()>(patch),
            )
            .await?;
        Ok(())
    }

    /// Removes the configuration (so pods are created without calling a webhook that is
    /// gone for good).
    pub async fn delete(&self, client: Client) -> Result<(), kube::Error> {
        let api = Api::<MutatingWebhookConfiguration>::all(client);
        match api.delete(&self.name, &Default::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration() -> Registration {
        Registration {
            name: "weft-injector".to_owned(),
            target: Target::Url("https://127.0.0.1:8443/inject".to_owned()),
            failure_policy: FailurePolicy::Ignore,
            timeout_seconds: 3,
            annotation_opt_in: true,
            excluded_namespaces: Vec::new(),
            namespace_scope: None,
        }
    }

    /// A registration that changes under every write of the bundle (each patch answered
    /// 422, as a failed `test` of the resource version is): `replace_bundles` reads and
    /// writes it [`REPLACE_TRIES`] times, then fails with the last conflict, rather than
    /// report a bundle written that was not.
    #[tokio::test]
    async fn a_bundle_that_loses_every_write_is_an_error_not_a_success() {
        use std::sync::{
            Arc,
            atomic::{AtomicU32, Ordering},
        };

        use bytes::Bytes;
        use http_body_util::Full;
        use hyper_util::rt::TokioIo;

        let r = registration();
        let mut live = r.object("old");
        live.metadata.uid = Some("0d6e5d4c-uid".to_owned());
        live.metadata.resource_version = Some("7".to_owned());
        let live = serde_json::to_string(&live).unwrap();
        let conflict = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "the server rejected our request due to an error in our request",
            "reason": "Invalid", "code": 422,
        })
        .to_string();
        let (gets, patches) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn({
            let (gets, patches) = (gets.clone(), patches.clone());
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (live, conflict) = (live.clone(), conflict.clone());
                    let (gets, patches) = (gets.clone(), patches.clone());
                    let svc = hyper::service::service_fn(move |req: http::Request<_>| {
                        let (status, body) = if req.method() == http::Method::PATCH {
                            patches.fetch_add(1, Ordering::SeqCst);
                            (422, conflict.clone())
                        } else {
                            gets.fetch_add(1, Ordering::SeqCst);
                            (200, live.clone())
                        };
                        let resp = http::Response::builder()
                            .status(status)
                            .header(http::header::CONTENT_TYPE, "application/json")
                            .body(Full::new(Bytes::from(body)));
                        async move { resp }
                    });
                    tokio::spawn(
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc),
                    );
                }
            }
        });
        let config = kube::Config::new(url.parse().unwrap());
        let client = Client::try_from(config).unwrap();

        let result = r.replace_bundles(client, "new").await;
        server.abort();
        match result {
            Err(kube::Error::Api(e)) => assert_eq!(e.code, 422),
            other => panic!("expected the last conflict, got {other:?}"),
        }
        assert_eq!(patches.load(Ordering::SeqCst), REPLACE_TRIES);
        assert_eq!(gets.load(Ordering::SeqCst), REPLACE_TRIES);
    }

    /// A change of CA rewrites every bundle of ours that is not the new one, empty ones
    /// included, and never a webhook another party added to the object; the repair after
    /// a GitOps sync counts only the empty ones, so it never undoes a two-CA bundle.
    #[test]
    fn a_new_bundle_replaces_each_of_ours_that_differs_and_the_repair_only_empty_ones() {
        let r = registration();
        let mut live = r.object("old");
        let webhooks = live.webhooks.as_mut().unwrap();
        let ours = webhooks.len();
        webhooks[0].client_config.ca_bundle = None;
        webhooks[1].client_config.ca_bundle = Some(ByteString(b"new+old".to_vec()));
        let mut foreign = webhooks[0].clone();
        foreign.name = "someone-else.example.com".to_owned();
        webhooks.push(foreign);

        let mut stale = vec![0];
        stale.extend(2..ours);
        assert_eq!(r.stale_bundles(&live, "new+old"), stale);
        assert_eq!(r.missing_bundles(&live), [0]);
        let fresh = r.object("new+old");
        assert!(r.stale_bundles(&fresh, "new+old").is_empty());
    }
}
