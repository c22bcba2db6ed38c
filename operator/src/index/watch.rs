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
//!
//! A change that panics (a bug) may leave the index half changed, and kube's watcher
//! lists again only when its watch desyncs, which may be hours away: so the watch of
//! that kind starts over (a new `watcher()`, whose first events are a full list that
//! replaces what the index holds of the kind), after a delay that doubles with each
//! panic in a row, and counts it in `weft_operator_index_change_panics_total{kind}`.

use std::{fmt::Debug, sync::Arc, time::Duration};

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
    shared::{NotApplied, SharedIndex},
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

/// What a watch does after an event, from what became of the index change it made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// Takes the next event.
    Continue,
    /// Starts over with a new watcher, whose full list replaces what the change left.
    Restart,
    /// Stops: the runtime is shutting down.
    Stop,
}

impl Next {
    fn after(change: Result<(), NotApplied>) -> Next {
        match change {
            Ok(()) => Next::Continue,
            Err(NotApplied::Panicked) => Next::Restart,
            Err(NotApplied::ShuttingDown) => Next::Stop,
        }
    }
}

/// The delay before a watch starts over after a panicking change: doubling from
/// [`RestartDelay::FIRST`] to [`RestartDelay::MAX`] while changes keep panicking (a
/// change that panics on every list must not turn into a list a second against the API
/// server), back to the first once a list is applied.
#[derive(Debug, Default)]
struct RestartDelay {
    next: Option<Duration>,
}

impl RestartDelay {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(60);

    /// The delay before this restart.
    fn next(&mut self) -> Duration {
        let delay = self.next.unwrap_or(Self::FIRST);
        self.next = Some((delay * 2).min(Self::MAX));
        delay
    }

    /// A list was applied: the next restart waits the first delay.
    fn reset(&mut self) {
        self.next = None;
    }
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
        let mut delay = RestartDelay::default();
        loop {
            let stream = watcher::watcher(api.clone(), config.clone()).default_backoff();
            futures::pin_mut!(stream);
            let mut relist: Vec<(ObjectKey, Object)> = Vec::new();
            let next = loop {
                let event = tokio::select! {
                    () = shutdown.cancelled() => return,
                    e = stream.next() => e,
                };
                let change = match event {
                    None => return,
                    Some(Ok(Event::Apply(obj))) => {
                        let (key, object) = convert(&obj);
                        index.update_async(move |i| i.apply(key, object)).await
                    }
                    Some(Ok(Event::Delete(obj))) => {
                        let (key, _) = convert(&obj);
                        index.update_async(move |i| i.delete(kind, &key)).await
                    }
                    Some(Ok(Event::Init)) => {
                        relist.clear();
                        Ok(())
                    }
                    Some(Ok(Event::InitApply(obj))) => {
                        relist.push(convert(&obj));
                        Ok(())
                    }
                    Some(Ok(Event::InitDone)) => {
                        let applied = relisted(&index, kind, std::mem::take(&mut relist)).await;
                        if applied.is_ok() {
                            delay.reset();
                        }
                        applied
                    }
                    Some(Err(error)) => {
                        index.metrics().watch_error(kind);
                        tracing::warn!(%error, "watch failed; retrying with backoff");
                        Ok(())
                    }
                };
                match Next::after(change) {
                    Next::Continue => {}
                    next => break next,
                }
            };
            if next == Next::Stop {
                return;
            }
            // `update_async` logged the panic. Only a full list replaces what the change
            // left half done; the watcher would list again only on a desync.
            index.metrics().index_change_panic(kind);
            let wait = delay.next();
            tracing::warn!(
                delay = ?wait,
                "an index change panicked; watching again from a full list"
            );
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
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
) -> Result<(), NotApplied> {
    tracing::info!(objects = objects.len(), "listed");
    let applied = index.update_async(move |i| i.replace(kind, objects)).await;
    match applied {
        Ok(()) => index.mark_synced(kind),
        // A first list that did not complete leaves the operator unready (push sessions
        // refused, no status written) rather than serving from an index it never saw
        // whole, until the watch's next full list (it starts over) is applied.
        Err(_) => tracing::warn!("re-list not applied; the kind is not marked synced by it"),
    }
    applied
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change that panicked starts the watch over (a full list follows); one never run
    /// because the runtime is shutting down stops it; an applied one goes on.
    #[test]
    fn a_panicking_change_starts_the_watch_over() {
        assert_eq!(Next::after(Ok(())), Next::Continue);
        assert_eq!(Next::after(Err(NotApplied::Panicked)), Next::Restart);
        assert_eq!(Next::after(Err(NotApplied::ShuttingDown)), Next::Stop);
    }

    /// Restarts after panics in a row wait longer each time, up to a minute; an applied
    /// list brings the wait back to a second.
    #[test]
    fn restarts_back_off_until_a_list_is_applied() {
        let mut delay = RestartDelay::default();
        let waits: Vec<u64> = (0..8).map(|_| delay.next().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        delay.reset();
        assert_eq!(delay.next(), RestartDelay::FIRST);
    }

    /// A first list whose change panics (a bug, here made to) is listed again: the watch
    /// starts over and the next full list is applied, so that the kind is synced (the
    /// replica ready) within seconds, not at the watch's next desync; the panic is counted.
    /// Against the test bed's real API server.
    #[test]
    fn a_first_list_that_panicked_is_listed_again() {
        use k8s_openapi::api::core::v1::Namespace;

        use crate::{index::Index, metrics::Metrics};

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let client = runtime.block_on(weft_e2e::shared::client()).unwrap();
        let index = SharedIndex::new(Index::new("cluster.local"), Arc::new(Metrics::new()));
        index.panic_next_replace();
        let shutdown = CancellationToken::new();
        let watch = runtime.spawn(watch_kind(
            Api::<Namespace>::all(client),
            watcher::Config::default(),
            Kind::Namespace,
            model::namespace,
            index.clone(),
            shutdown.clone(),
        ));
        // Polled from this thread, not with the runtime's timer.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !index.is_kind_synced(Kind::Namespace) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let panics = index
            .metrics()
            .encode()
            .lines()
            .find(|l| l.starts_with("weft_operator_index_change_panics_total"))
            .map(str::to_owned);
        shutdown.cancel();
        runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), watch).await })
            .expect("the watch stops on shutdown")
            .unwrap();
        assert!(
            index.is_kind_synced(Kind::Namespace),
            "the list that panicked was not listed again within 30 s"
        );
        let panics = panics.expect("the panic counted");
        assert!(
            panics.contains(r#"kind="Namespace""#) && panics.ends_with(" 1"),
            "{panics}"
        );
    }
}
