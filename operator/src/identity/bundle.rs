//! Publishes the public half of the mesh identity, the ConfigMap of
//! [`weft_inject::identity_bundle`], so that `kubectl weft inject` gives a manifest the
//! identity the webhook gives a pod. Every replica writes the same content at start
//! (server-side apply, so replicas and restarts converge); an operator started without
//! identity removes it, so hand-injected pods do not ask an endpoint that is not served.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams},
};
use weft_inject::{InjectIdentity, identity_bundle};

use crate::status::FIELD_MANAGER;

/// Writes (or, for `None`, deletes) the bundle ConfigMap in `namespace`.
pub async fn publish(
    client: &Client,
    namespace: &str,
    identity: Option<&InjectIdentity>,
) -> Result<(), kube::Error> {
    let api = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    let Some(identity) = identity else {
        return match api
            .delete(identity_bundle::CONFIG_MAP, &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e),
        };
    };
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(identity_bundle::CONFIG_MAP.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                FIELD_MANAGER.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(identity_bundle::to_data(identity)),
        ..ConfigMap::default()
    };
    api.patch(
        identity_bundle::CONFIG_MAP,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await
    .map(|_| ())
}
