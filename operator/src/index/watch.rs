//! The watch layer: one kube-runtime watcher per kind, shared by every consumer, feeding
//! the [`SharedIndex`].
//!
//! ```text
//! API server ──watch──▶ watcher (backoff, re-list on desync) ──Event──▶ model::convert
//!     Apply / Delete ──▶ Index::apply / delete
//!     Init, InitApply.., InitDone ──▶ Index::replace (what vanished meanwhile is deleted)
//! ```
//!
//! Weft's own resources are watched as dynamic objects and converted one by one, so a
//! resource that does not deserialize is kept as invalid (and reported in its status)
//! instead of failing the whole list.
//!
//! Every change runs on tokio's blocking pool ([`SharedIndex::update_async`]): a re-list
//! of thousands of pods is seconds of synchronous work, which on a runtime worker would
//! stop probes, the webhook and push sessions for as long. Each watch awaits its change
//! before it takes the next event, so its changes apply in order.

use std::{fmt::Debug, sync::Arc};

use futures::{StreamExt, future::BoxFuture};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject},
    runtime::{
        WatchStreamExt,
        watcher::{self, Event},
    },
};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use weft_crds::{Breaker, Policy, Route};

use super::{
    Kind, Object, ObjectKey,
    model::{self, MESHED_LABEL},
    shared::SharedIndex,
};

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs every watch until `shutdown`; with `namespace`, only that namespace is watched.
pub async fn run(
    client: Client,
    index: Arc<SharedIndex>,
    namespace: Option<String>,
    shutdown: CancellationToken,
) {
    let all = watcher::Config::default();
    let ns = namespace.as_deref();
    let namespaces = match ns {
        Some(ns) => watcher::Config::default().fields(&format!("metadata.name={ns}")),
        None => all.clone(),
    };
    let tasks: Vec<BoxFuture<'static, ()>> = vec![
        Box::pin(watch_kind(
            Api::<Namespace>::all(client.clone()),
            namespaces,
            Kind::Namespace,
            model::namespace,
            index.clone(),
            shutdown.clone(),
        )),
        Box::pin(watch_kind(
            api::<Service>(&client, ns),
            all.clone(),
            Kind::Service,
            model::service,
            index.clone(),
            shutdown.clone(),
        )),
        Box::pin(watch_kind(
            api::<EndpointSlice>(&client, ns),
            all.clone(),
            Kind::EndpointSlice,
            model::endpoint_slice,
            index.clone(),
            shutdown.clone(),
        )),
        Box::pin(watch_kind(
            api::<Pod>(&client, ns),
            watcher::Config::default().labels(MESHED_LABEL),
            Kind::Pod,
            model::pod,
            index.clone(),
            shutdown.clone(),
        )),
        Box::pin(watch_weft::<Route>(
            client.clone(),
            namespace.clone(),
            Kind::Route,
            index.clone(),
            shutdown.clone(),
        )),
        Box::pin(watch_weft::<Policy>(
            client.clone(),
            namespace.clone(),
            Kind::Policy,
            index.clone(),
            shutdown.clone(),
        )),
        Box::pin(watch_weft::<Breaker>(
            client,
            namespace.clone(),
            Kind::Breaker,
            index,
            shutdown,
        )),
    ];
    futures::future::join_all(tasks).await;
}

async fn watch_weft<K>(
    client: Client,
    namespace: Option<String>,
    kind: Kind,
    index: Arc<SharedIndex>,
    shutdown: CancellationToken,
) where
    K: Resource<DynamicType = ()>,
{
    let ar = ApiResource::erase::<K>(&());
    let api = match &namespace {
        Some(ns) => Api::<DynamicObject>::namespaced_with(client, ns, &ar),
        None => Api::<DynamicObject>::all_with(client, &ar),
    };
    watch_kind(
        api,
        watcher::Config::default(),
        kind,
        move |o: &DynamicObject| model::weft_resource(kind, o),
        index,
        shutdown,
    )
    .await;
}

/// Watches one kind into the index until `shutdown`.
pub async fn watch_kind<K, F>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    convert: F,
    index: Arc<SharedIndex>,
    shutdown: CancellationToken,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    F: Fn(&K) -> (ObjectKey, Object) + Send,
{
    let span = tracing::info_span!("watch", kind = kind.as_str());
    async move {
        let stream = watcher::watcher(api, config).default_backoff();
        futures::pin_mut!(stream);
        let mut relist: Vec<(ObjectKey, Object)> = Vec::new();
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => return,
                e = stream.next() => e,
            };
            match event {
                None => return,
                // A change that panicked is logged by `update_async`; the watch goes on,
                // and the next change or re-list repairs what it left.
                Some(Ok(Event::Apply(obj))) => {
                    let (key, object) = convert(&obj);
                    index.update_async(move |i| i.apply(key, object)).await;
                }
                Some(Ok(Event::Delete(obj))) => {
                    let (key, _) = convert(&obj);
                    index.update_async(move |i| i.delete(kind, &key)).await;
                }
                Some(Ok(Event::Init)) => relist.clear(),
                Some(Ok(Event::InitApply(obj))) => relist.push(convert(&obj)),
                Some(Ok(Event::InitDone)) => {
                    relisted(&index, kind, std::mem::take(&mut relist)).await;
                }
                Some(Err(error)) => {
                    index.metrics().watch_error(kind);
                    tracing::warn!(%error, "watch failed; retrying with backoff");
                }
            }
        }
    }
    .instrument(span)
    .await;
}

/// Applies a list of `kind` in place of what the index holds (what vanished meanwhile is
/// deleted), then marks the kind synced: what a watch does at `InitDone`.
pub(super) async fn relisted(
    index: &Arc<SharedIndex>,
    kind: Kind,
    objects: Vec<(ObjectKey, Object)>,
) {
    tracing::info!(objects = objects.len(), "listed");
    if index.update_async(move |i| i.replace(kind, objects)).await {
        index.mark_synced(kind);
    } else {
        // A first list that did not complete leaves the operator unready (push sessions
        // refused, no status written) rather than serving from an index it never saw whole.
        tracing::warn!("re-list not applied; the kind is not marked synced by it");
    }
}
