//! The index shared between the watch tasks that write it and the push sessions that read
//! it, and the one `tokio::sync::watch` channel per subscribed pod.
//!
//! ```text
//! watch tasks ──update(|index| index.apply(..))──▶ Index ──Affected──▶ for each subscribed pod
//!                                                                   that the change touches:
//!                                       watch::Sender<Option<ProxyView>>::send_if_modified
//!                                                     │ (wakes the pod's sessions only when
//!                                                     ▼  its view really changed)
//!                                           push sessions (coalesce: they read the latest)
//! ```
//!
//! Locks are plain mutexes held for synchronous work only, never across an `.await`;
//! order: index, then subscribers. A change holds the index (and, while it refreshes
//! views, the subscribers) for as long as it computes: seconds for a re-list of
//! thousands of pods. So that this never stalls the runtime:
//!
//! - async code changes the index through [`SharedIndex::update_async`], which runs the
//!   change on tokio's blocking pool;
//! - async code reads through the `*_async` methods ([`SharedIndex::read_async`],
//!   [`SharedIndex::subscribe_async`], ...), which *await* the index: a waiter is a
//!   parked task woken when the index lock is released (`IndexLock`), holding no thread,
//!   however many wait. Holding the index, they find the subscribers free or held for a
//!   moment (a change takes them only under the index), so they lock those plainly;
//! - the webhook, which must answer within the API server's timeout, does not wait at
//!   all: [`SharedIndex::try_read`], else it asks the API server;
//! - the synchronous methods remain for synchronous callers (tests, benchmarks, the
//!   change itself on the blocking pool). On a runtime worker they wait in
//!   `block_in_place` (see `lock_waiting`), which keeps one OS thread per waiter: no
//!   operator code calls them from a worker while a re-list may run.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    ops::{Deref, DerefMut},
    sync::{Arc, Mutex, MutexGuard, TryLockError},
    time::Instant,
};

use tokio::sync::{Notify, watch};

use super::{Affected, Comparisons, Index, Kind, ObjectKey, ProxyView, Refresh};
use crate::metrics::Metrics;

/// How many change timestamps are remembered for the change-to-ACK histogram: enough for
/// every version a lagging proxy might still acknowledge at a thousand changes a second.
const CHANGE_TIMES: usize = 4096;

/// The index, its subscribers, and what the status writer and health checks need to know.
#[derive(Debug)]
pub struct SharedIndex {
    index: IndexLock,
    /// By pod, so that a namespace's are a range ([`candidates`]).
    subscribers: Mutex<Subscribers>,
    synced: Mutex<BTreeSet<Kind>>,
    change_times: Mutex<VecDeque<(u64, Instant)>>,
    changed: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

/// Why [`SharedIndex::update_async`] did not apply a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotApplied {
    /// The change panicked (a bug) part way: what it left is repaired only by a full
    /// re-list of its kind, which the watch that made it then starts.
    #[error("the index change panicked")]
    Panicked,
    /// The runtime is shutting down: the change never ran.
    #[error("the runtime is shutting down")]
    ShuttingDown,
}

/// The views one change repaired ([`Refresh::Repaired`]), for its one warning.
#[derive(Debug, Default)]
struct Repaired {
    count: usize,
    /// The first [`Repaired::NAMED`] pods, enough to start looking.
    first: Vec<String>,
}

impl Repaired {
    /// How many pods the warning names.
    const NAMED: usize = 5;

    fn add(&mut self, pod: &ObjectKey) {
        self.count += 1;
        if self.first.len() < Self::NAMED {
            self.first.push(pod.to_string());
        }
    }
}

/// Each subscribed pod's channel.
type Subscribers = BTreeMap<ObjectKey, watch::Sender<Option<ProxyView>>>;

/// The subscribers a change that reported `affected` may touch, each once: those of the
/// pods it names, those of the namespaces it changed or re-listed, and those whose pods
/// may see other namespaces than their own ([`Index::seeing_others`]). No other
/// subscriber's pod sees a namespace the change touched, so [`Index::is_affected`] would
/// say no to it; asking each of 10,000 subscribers cost 2–9 ms per change, however few
/// the change touched.
fn candidates<'a>(
    index: &'a Index,
    subscribers: &'a Subscribers,
    affected: &'a Affected,
) -> impl Iterator<Item = (&'a ObjectKey, &'a watch::Sender<Option<ProxyView>>)> + 'a {
    let (seeing_namespaces, seeing_pods) = index.seeing_others();
    let swept: BTreeSet<&str> = affected
        .namespaces
        .iter()
        .chain(&affected.relisted)
        .map(String::as_str)
        .chain(seeing_namespaces)
        .collect();
    let single: BTreeSet<&ObjectKey> = affected
        .pods
        .iter()
        .chain(seeing_pods)
        .filter(|pod| !swept.contains(pod.namespace.as_str()))
        .collect();
    swept
        .into_iter()
        .flat_map(move |ns| super::in_ns(subscribers, ns))
        .chain(
            single
                .into_iter()
                .filter_map(move |pod| subscribers.get_key_value(pod)),
        )
}

/// Locks `m`, recovering from poisoning: a change cut short by a panic leaves what the
/// full re-list that its watch then starts repairs. For locks only ever held for a
/// moment.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// [`lock`] for the index and the subscribers, which a change holds while it computes
/// (seconds for a large re-list), for the synchronous methods. Uncontended it costs a
/// `try_lock`; else, on a worker of a multi-thread runtime, the wait runs in
/// [`tokio::task::block_in_place`], which hands the worker's other tasks to another
/// thread instead of stalling them behind the re-list. Each such waiter keeps an OS
/// thread from the blocking pool (`max_blocking_threads`, 512 by default): past that the
/// runtime stalls again. Async code therefore awaits the index instead
/// ([`IndexLock::lock_async`]); no operator code waits here on a worker.
fn lock_waiting<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.try_lock() {
        Ok(guard) => return guard,
        Err(TryLockError::Poisoned(p)) => return p.into_inner(),
        Err(TryLockError::WouldBlock) => {}
    }
    // Off a runtime, on the blocking pool or in `block_on`, `block_in_place` just runs the
    // wait. A current-thread runtime has no other thread to hand its tasks to (and
    // `block_in_place` panics there): the wait blocks it, as any blocking call would.
    // The flavor is the handle's: a current-thread runtime's thread that has entered a
    // multi-thread runtime's handle reads as multi-thread, and `block_in_place` would
    // panic there; no operator code enters one runtime's handle from another's thread.
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(|| lock(m))
    } else {
        lock(m)
    }
}

/// The index's mutex, which async code can await: every release wakes the tasks waiting
/// for it ([`IndexLock::lock_async`]), so that an async waiter is a parked task, not a
/// blocked thread, however long a re-list holds the index.
#[derive(Debug)]
struct IndexLock {
    index: Mutex<Index>,
    released: Notify,
}

/// The index, locked; dropping it wakes the async waiters.
struct IndexGuard<'a> {
    /// `None` only while dropping: released before the waiters are woken.
    guard: Option<MutexGuard<'a, Index>>,
    released: &'a Notify,
}

impl Deref for IndexGuard<'_> {
    type Target = Index;

    fn deref(&self) -> &Index {
        self.guard.as_deref().unwrap_or_else(|| unreachable!())
    }
}

impl DerefMut for IndexGuard<'_> {
    fn deref_mut(&mut self) -> &mut Index {
        self.guard.as_deref_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for IndexGuard<'_> {
    fn drop(&mut self) {
        // Also on a panicking change's unwind: its waiters take the poisoned lock.
        drop(self.guard.take());
        self.released.notify_waiters();
    }
}

impl IndexLock {
    fn new(index: Index) -> Self {
        IndexLock {
            index: Mutex::new(index),
            released: Notify::new(),
        }
    }

    fn guard<'a>(&'a self, guard: MutexGuard<'a, Index>) -> IndexGuard<'a> {
        IndexGuard {
            guard: Some(guard),
            released: &self.released,
        }
    }

    /// Locks the index on the calling thread (see [`lock_waiting`]).
    fn lock(&self) -> IndexGuard<'_> {
        self.guard(lock_waiting(&self.index))
    }

    /// The index if no one holds it, else `None` at once.
    fn try_lock(&self) -> Option<IndexGuard<'_>> {
        match self.index.try_lock() {
            Ok(guard) => Some(self.guard(guard)),
            Err(TryLockError::Poisoned(p)) => Some(self.guard(p.into_inner())),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Awaits the index: the task parks until a holder releases it, then tries again.
    async fn lock_async(&self) -> IndexGuard<'_> {
        loop {
            // Registered before the attempt, so that a release between a failed attempt
            // and the await still wakes this task.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(guard) = self.try_lock() {
                return guard;
            }
            released.await;
        }
    }

    /// The index for a test to set its hooks, through a guard that wakes async waiters
    /// on release like any other.
    #[cfg(test)]
    fn get_mut(&self) -> IndexGuard<'_> {
        self.lock()
    }
}

impl SharedIndex {
    /// Shares `index`, reporting to `metrics`.
    pub fn new(index: Index, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(SharedIndex {
            index: IndexLock::new(index),
            subscribers: Mutex::new(BTreeMap::new()),
            synced: Mutex::new(BTreeSet::new()),
            change_times: Mutex::new(VecDeque::new()),
            changed: watch::channel(0).0,
            metrics,
        })
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Changes the index and wakes the subscribers whose view changed, and whoever
    /// follows [`SharedIndex::changes`] when a view or a Weft resource's status may have.
    /// Runs the change on the calling thread: async code calls
    /// [`SharedIndex::update_async`].
    pub fn update(&self, change: impl FnOnce(&mut Index) -> Affected) {
        let index = &mut *self.index.lock();
        let affected = change(index);
        for kind in Kind::ALL {
            self.metrics.index_objects(kind, index.len(kind));
        }
        if affected.is_empty() && affected.relisted.is_empty() {
            // No view changed, but a Route, Policy or Breaker did (one that does not parse,
            // or selects nothing), or a Service one names: its status is written on this
            // wake, not the status writer's timer.
            if affected.statuses {
                self.notify();
            }
            return;
        }
        if !affected.is_empty() {
            self.record_change(index.version());
        }
        let mut any_changed = false;
        let mut repaired = Repaired::default();
        let mut comparisons = Comparisons::default();
        let subscribers = lock_waiting(&self.subscribers);
        for (pod, tx) in candidates(index, &subscribers, &affected) {
            if !index.is_affected(pod, &affected) {
                continue;
            }
            // From the view it holds: one whose pod the change did not name keeps its
            // Policy part unless a re-list went over its namespace (see
            // `Index::refresh_view`).
            any_changed |= tx.send_if_modified(|current| {
                let refresh = index.refresh_view(pod, &affected, current, &mut comparisons);
                if refresh == Refresh::Repaired {
                    repaired.add(pod);
                }
                refresh.changed()
            });
        }
        drop(subscribers);
        // One line per re-list, not per view: a report that missed a whole namespace's
        // pods would otherwise log thousands.
        if repaired.count > 0 {
            tracing::warn!(
                count = repaired.count,
                pods = ?repaired.first,
                "a re-list repaired stale Policy parts of views"
            );
        }
        // A re-list that changed no object but some view (a repair) is a change too:
        // else the repaired view's acknowledgement would be timed from an older change,
        // perhaps hours old, in the change-to-ACK histogram.
        if affected.is_empty() && any_changed {
            self.record_change(index.version());
        }
        if !affected.is_empty() || any_changed || affected.statuses {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// [`SharedIndex::update`] on tokio's blocking pool, for async code (the watch tasks):
    /// a re-list holds the index for seconds of synchronous work, which on a runtime
    /// worker would stall every task queued behind it. Completes once the change is
    /// applied, so that one caller's changes apply in order. A change that panicked is
    /// logged here; the index takes the next change (its lock's poison is ignored), but
    /// what the change left half done stays until a re-list of its kind replaces it: the
    /// watch starts over on [`NotApplied::Panicked`] (see `watch::watch_kind`).
    pub async fn update_async(
        self: &Arc<Self>,
        change: impl FnOnce(&mut Index) -> Affected + Send + 'static,
    ) -> Result<(), NotApplied> {
        let shared = self.clone();
        // What the change logs (a repair warning) keeps the caller's span (the watch's kind).
        let span = tracing::Span::current();
        let task = tokio::task::spawn_blocking(move || span.in_scope(|| shared.update(change)));
        match task.await {
            Ok(()) => Ok(()),
            Err(error) if error.is_panic() => {
                let panic = error.into_panic();
                let message = panic
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("(a panic without a message)");
                tracing::error!(panic = message, "index change panicked");
                Err(NotApplied::Panicked)
            }
            Err(_) => {
                tracing::debug!("index change not run: the runtime is shutting down");
                Err(NotApplied::ShuttingDown)
            }
        }
    }

    /// Records that the change producing `version` was seen now, for
    /// [`SharedIndex::changed_at`].
    fn record_change(&self, version: u64) {
        let mut times = lock(&self.change_times);
        times.push_back((version, Instant::now()));
        while times.len() > CHANGE_TIMES {
            times.pop_front();
        }
    }

    /// When the change that produced `version` (or the latest before it) was seen.
    pub fn changed_at(&self, version: u64) -> Option<Instant> {
        let times = lock(&self.change_times);
        times
            .iter()
            .rev()
            .find(|(v, _)| *v <= version)
            .map(|(_, t)| *t)
    }

    /// A receiver of `pod`'s view: the current one at once, then each change. For
    /// synchronous callers; async code calls [`SharedIndex::subscribe_async`].
    pub fn subscribe(&self, pod: &ObjectKey) -> watch::Receiver<Option<ProxyView>> {
        let index = self.index.lock();
        self.subscribe_locked(&index, pod)
    }

    /// [`SharedIndex::subscribe`] awaiting the index (see the module's doc).
    pub async fn subscribe_async(&self, pod: &ObjectKey) -> watch::Receiver<Option<ProxyView>> {
        let index = self.index.lock_async().await;
        self.subscribe_locked(&index, pod)
    }

    fn subscribe_locked(
        &self,
        index: &Index,
        pod: &ObjectKey,
    ) -> watch::Receiver<Option<ProxyView>> {
        let mut subscribers = lock_waiting(&self.subscribers);
        let rx = match subscribers.get(pod) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(index.view(pod));
                subscribers.insert(pod.clone(), tx);
                rx
            }
        };
        self.metrics.subscribers(subscribers.len());
        rx
    }

    /// Forgets `pod`'s channel once no session holds a receiver. For synchronous callers;
    /// async code calls [`SharedIndex::unsubscribe_async`].
    pub fn unsubscribe(&self, pod: &ObjectKey) {
        self.unsubscribe_locked(pod);
    }

    /// [`SharedIndex::unsubscribe`] awaiting the index first: a change holds the
    /// subscribers only under the index, so that they are then free in a moment.
    pub async fn unsubscribe_async(&self, pod: &ObjectKey) {
        let _index = self.index.lock_async().await;
        self.unsubscribe_locked(pod);
    }

    fn unsubscribe_locked(&self, pod: &ObjectKey) {
        let mut subscribers = lock_waiting(&self.subscribers);
        if subscribers
            .get(pod)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            subscribers.remove(pod);
        }
        self.metrics.subscribers(subscribers.len());
    }

    /// The view each subscribed pod should run now. For synchronous callers; async code
    /// calls [`SharedIndex::desired_views_async`].
    pub fn desired_views(&self) -> Vec<(ObjectKey, Option<ProxyView>)> {
        self.desired_views_locked()
    }

    /// [`SharedIndex::desired_views`] awaiting the index first (see
    /// [`SharedIndex::unsubscribe_async`]).
    pub async fn desired_views_async(&self) -> Vec<(ObjectKey, Option<ProxyView>)> {
        let _index = self.index.lock_async().await;
        self.desired_views_locked()
    }

    fn desired_views_locked(&self) -> Vec<(ObjectKey, Option<ProxyView>)> {
        lock_waiting(&self.subscribers)
            .iter()
            .map(|(k, tx)| (k.clone(), tx.borrow().clone()))
            .collect()
    }

    /// Reads the index together with the view each of `pods` should run, all at one
    /// instant (under the index lock): the status writer compares a resource's generation
    /// with the proxies that need it, and the two must come from the same index state, or a
    /// resource just created reads as needed by nobody. A subscribed pod's view is its
    /// channel's (kept equal to [`Index::view`] under this lock); another pod's, such as
    /// one streaming from another replica, is computed. `None`: the index does not know
    /// the pod. For synchronous callers; async code calls
    /// [`SharedIndex::read_with_views_async`].
    pub fn read_with_views<T>(
        &self,
        pods: impl IntoIterator<Item = ObjectKey>,
        f: impl FnOnce(&Index, Vec<(ObjectKey, Option<ProxyView>)>) -> T,
    ) -> T {
        let index = self.index.lock();
        self.read_with_views_locked(&index, pods, f)
    }

    /// [`SharedIndex::read_with_views`] awaiting the index.
    pub async fn read_with_views_async<T>(
        &self,
        pods: impl IntoIterator<Item = ObjectKey>,
        f: impl FnOnce(&Index, Vec<(ObjectKey, Option<ProxyView>)>) -> T,
    ) -> T {
        let index = self.index.lock_async().await;
        self.read_with_views_locked(&index, pods, f)
    }

    fn read_with_views_locked<T>(
        &self,
        index: &Index,
        pods: impl IntoIterator<Item = ObjectKey>,
        f: impl FnOnce(&Index, Vec<(ObjectKey, Option<ProxyView>)>) -> T,
    ) -> T {
        let views = {
            let subscribers = lock_waiting(&self.subscribers);
            pods.into_iter()
                .map(|pod| {
                    let view = match subscribers.get(&pod) {
                        Some(tx) => tx.borrow().clone(),
                        None => index.view(&pod),
                    };
                    (pod, view)
                })
                .collect()
        };
        f(index, views)
    }

    /// Reads the index. For synchronous callers; async code calls
    /// [`SharedIndex::read_async`] (or, when it must not wait at all,
    /// [`SharedIndex::try_read`]).
    pub fn read<T>(&self, f: impl FnOnce(&Index) -> T) -> T {
        f(&self.index.lock())
    }

    /// Reads the index once it is free, awaiting (not blocking a thread) while a change
    /// holds it.
    pub async fn read_async<T>(&self, f: impl FnOnce(&Index) -> T) -> T {
        let index = self.index.lock_async().await;
        f(&index)
    }

    /// Reads the index if no change holds it now, else `None` at once: for the webhook,
    /// which must answer within the API server's timeout while a re-list may hold the
    /// index for seconds.
    pub fn try_read<T>(&self, f: impl FnOnce(&Index) -> T) -> Option<T> {
        self.index.try_lock().map(|index| f(&index))
    }

    /// Records that the first list of `kind` has been applied.
    pub fn mark_synced(&self, kind: Kind) {
        lock(&self.synced).insert(kind);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Whether every kind has been listed once.
    pub fn is_synced(&self) -> bool {
        lock(&self.synced).len() == Kind::ALL.len()
    }

    /// A receiver that is marked changed on every change to the index or to a proxy's
    /// acknowledgements (see [`SharedIndex::notify`]); changes are never missed.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Wakes whoever follows [`SharedIndex::changes`] (the status writer) without an index
    /// change: a proxy acknowledged or rejected a version.
    pub fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Makes the next [`Index::replace`] panic in the middle (see
    /// `Index::panic_mid_replace`), as a bug there would.
    #[cfg(test)]
    pub(crate) fn panic_next_replace(&self) {
        self.index.get_mut().panic_mid_replace = true;
    }

    /// Whether the first list of `kind` has been applied.
    #[cfg(test)]
    pub(crate) fn is_kind_synced(&self, kind: Kind) -> bool {
        lock(&self.synced).contains(&kind)
    }

    /// Holds the next [`Index::replace`] in the middle (see `Index::pause_mid_replace`),
    /// with the index locked: the first receiver gets a message once it is held there, a
    /// message on the sender (or dropping it) lets it go on. For tests of what waits for
    /// a re-list.
    #[cfg(test)]
    pub(crate) fn pause_next_replace(
        &self,
    ) -> (std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>) {
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        self.index.get_mut().pause_mid_replace = Some((entered_tx, release_rx));
        (entered, release)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::index::{Kind, model};

    fn pod(name: &str) -> (ObjectKey, super::super::Object) {
        let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "labels": {"app": "client"}},
            "spec": {"serviceAccountName": "client", "containers": []}
        }))
        .unwrap();
        model::pod(&p)
    }

    fn policy(name: &str, spec: serde_json::Value) -> (ObjectKey, super::super::Object) {
        let o: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "Policy",
            "metadata": {"name": name, "namespace": "shop", "generation": 1},
            "spec": spec,
        }))
        .unwrap();
        model::weft_resource(Kind::Policy, &o)
    }

    /// A change to one namespace reaches the subscribers of the pods that see it from
    /// another, by their own annotation or their namespace's, and only while they do:
    /// the change asks only those besides the namespace's own (`candidates`).
    #[test]
    fn a_change_reaches_the_pods_that_see_its_namespace_from_another() {
        let shared = SharedIndex::new(Index::new("cluster.local"), Arc::new(Metrics::new()));
        let other_pod = |name: &str, visible: Option<&str>| {
            let mut meta = json!({"name": name, "namespace": "other"});
            if let Some(v) = visible {
                meta["annotations"] = json!({"weft.dev/visible-namespaces": v});
            }
            let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(
                json!({"metadata": meta, "spec": {"serviceAccountName": "sa", "containers": []}}),
            )
            .unwrap();
            model::pod(&p)
        };
        let namespace = |visible: Option<&str>| {
            let mut meta = json!({"name": "other"});
            if let Some(v) = visible {
                meta["annotations"] = json!({"weft.dev/visible-namespaces": v});
            }
            let n: k8s_openapi::api::core::v1::Namespace =
                serde_json::from_value(json!({"metadata": meta})).unwrap();
            model::namespace(&n)
        };
        let service = |n: u8| {
            let s: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
                "metadata": {"name": format!("web{n}"), "namespace": "shop"},
                "spec": {"clusterIP": format!("198.19.0.{n}"), "ports": [{"name": "http", "port": 80}]}
            }))
            .unwrap();
            model::service(&s)
        };
        let (annotated, pa) = other_pod("annotated", Some("shop"));
        let (everything, pe) = other_pod("everything", Some("*"));
        let (plain, pp) = other_pod("plain", None);
        for (k, o) in [
            (annotated.clone(), pa),
            (everything.clone(), pe),
            (plain.clone(), pp),
        ] {
            shared.update(|i| i.apply(k, o));
        }
        let mut rxs: Vec<_> = [&annotated, &everything, &plain]
            .into_iter()
            .map(|k| shared.subscribe(k))
            .collect();
        // A Service added to shop: which subscribers were woken, each with it in its view.
        let mut n = 0;
        let mut woken = |rxs: &mut Vec<watch::Receiver<Option<ProxyView>>>| {
            for rx in rxs.iter_mut() {
                rx.borrow_and_update();
            }
            n += 1;
            let (k, o) = service(n);
            shared.update(|i| i.apply(k, o));
            let name = format!("web{n}.shop.80");
            rxs.iter_mut()
                .map(|rx| {
                    let changed = rx.has_changed().unwrap();
                    let has = rx
                        .borrow_and_update()
                        .as_ref()
                        .is_some_and(|v| v.services.contains_key(&name));
                    assert_eq!(changed, has, "{name}");
                    has
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            woken(&mut rxs),
            [true, true, false],
            "by the pods' annotations"
        );
        // The pod's annotation removed: it no longer sees shop.
        let (k, o) = other_pod("annotated", None);
        shared.update(|i| i.apply(k, o));
        assert_eq!(woken(&mut rxs), [false, true, false], "annotation removed");
        // Its namespace's annotation: every pod there without one of its own.
        let (k, o) = namespace(Some("shop"));
        shared.update(|i| i.apply(k, o));
        assert_eq!(woken(&mut rxs), [true, true, true], "by the namespace's");
        let (k, o) = namespace(None);
        shared.update(|i| i.apply(k, o));
        assert_eq!(
            woken(&mut rxs),
            [false, true, false],
            "the namespace's removed"
        );
        // A deleted pod's subscriber sees nothing.
        shared.update(|i| i.delete(Kind::Pod, &everything));
        assert!(rxs[1].borrow_and_update().is_none());
        assert_eq!(woken(&mut rxs), [false, false, false], "pod deleted");
    }

    /// A Policy whose change alters no proxy's view (it does not parse, or selects no
    /// pod) still wakes the status writer, which has its status to write, and pushes
    /// nothing; the same object applied again wakes nobody.
    #[test]
    fn a_weft_resource_change_no_view_sees_wakes_the_status_writer_only() {
        let shared = SharedIndex::new(Index::new("cluster.local"), Arc::new(Metrics::new()));
        let (a, pa) = pod("a");
        shared.update(|i| i.apply(a.clone(), pa));
        let mut view = shared.subscribe(&a);
        let mut changes = shared.changes();
        let version = shared.read(Index::version);
        let invalid = policy("invalid", json!({"target": 5}));
        let none = policy(
            "none",
            json!({"target": {"selector": {"matchLabels": {"app": "nobody"}}},
                   "mtls": {"mode": "Disabled"}, "defaultAction": "Deny"}),
        );
        let mut changes_of = |change: &dyn Fn(&mut Index) -> Affected| {
            changes.borrow_and_update();
            view.borrow_and_update();
            shared.update(change);
            (changes.has_changed().unwrap(), view.has_changed().unwrap())
        };
        for (k, o) in [invalid, none] {
            let apply = |i: &mut Index| i.apply(k.clone(), o.clone());
            assert_eq!(changes_of(&apply), (true, false), "{k} applied");
            assert_eq!(changes_of(&apply), (false, false), "{k} applied again");
            let delete = |i: &mut Index| i.delete(Kind::Policy, &k);
            assert_eq!(changes_of(&delete), (true, false), "{k} deleted");
            assert_eq!(changes_of(&delete), (false, false), "{k} deleted again");
        }
        assert_eq!(shared.read(Index::version), version, "no config changed");
    }

    /// A view gone stale (here its rate limit) is repaired by the next re-list of a kind
    /// that feeds the Policy part (pods, Services, Policies), even one that finds nothing
    /// changed: the subscriber is woken with the view computed afresh, at a version newer
    /// than the stale one's (a push session skips a version it sent). Stale either way:
    /// a change cut short by a panic after it changed the index, before the subscribers
    /// were refreshed, or a change whose report missed the pod (the held view edited
    /// unseen, at the current version). A second re-list, nothing stale, wakes nobody.
    #[test]
    fn a_relist_repairs_a_view_gone_stale() {
        let shared = SharedIndex::new(Index::new("cluster.local"), Arc::new(Metrics::new()));
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "metadata": {"name": "client", "namespace": "shop"},
            "spec": {"clusterIP": "198.19.0.11", "clusterIPs": ["198.19.0.11"],
                     "selector": {"app": "client"}, "ports": [{"name": "http", "port": 80}]}
        }))
        .unwrap();
        let limit = |rps: u32| {
            policy(
                "limit",
                json!({"target": {"selector": {"matchLabels": {"app": "client"}}},
                       "defaultAction": "Allow", "rateLimit": {"requestsPerSecond": rps}}),
            )
        };
        let (a, pa) = pod("a");
        let listed = |kind: Kind, rps: u32| match kind {
            Kind::Pod => vec![(a.clone(), pa.clone())],
            Kind::Service => vec![model::service(&svc)],
            Kind::Policy => vec![limit(rps)],
            _ => Vec::new(),
        };
        let mut rps = 1;
        for kind in [Kind::Service, Kind::Pod, Kind::Policy] {
            shared.update(|i| i.replace(kind, listed(kind, rps)));
        }
        let mut rx = shared.subscribe(&a);
        let rate = |view: &Option<ProxyView>| {
            view.as_ref()
                .and_then(|v| v.inbound.as_ref())
                .and_then(|b| b.rate_limit.as_ref())
                .map(|r| r.requests_per_second)
        };
        assert_eq!(rate(&rx.borrow_and_update()), Some(rps));
        for kind in [Kind::Pod, Kind::Service, Kind::Policy] {
            for cut_short in [true, false] {
                if cut_short {
                    rps += 1;
                    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        shared.update(|i| {
                            let (k, o) = limit(rps);
                            i.apply(k, o);
                            panic!("cut short before the subscribers are refreshed");
                        })
                    }));
                    assert!(panicked.is_err());
                } else {
                    lock(&shared.subscribers)[&a].send_if_modified(|view| {
                        let inbound = view.as_mut().and_then(|v| v.inbound.as_mut());
                        if let Some(limit) = inbound.and_then(|b| b.rate_limit.as_mut()) {
                            limit.requests_per_second = 0;
                        }
                        false
                    });
                }
                let what = format!("{kind:?}, cut short: {cut_short}");
                let stale = rx.borrow_and_update().clone();
                assert_ne!(rate(&stale), Some(rps), "{what}: not stale");
                shared.update(|i| i.replace(kind, listed(kind, rps)));
                assert!(rx.has_changed().unwrap(), "{what}: not woken");
                let held = rx.borrow_and_update().clone();
                assert_eq!(rate(&held), Some(rps), "{what}");
                let fresh = shared.read(|i| i.view(&a));
                let (stale, held, fresh) = (stale.unwrap(), held.unwrap(), fresh.unwrap());
                assert!(
                    held.same_content(&fresh),
                    "{what}: {held:?} is not {fresh:?}"
                );
                assert!(held.version > stale.version, "{what}: {held:?}");
                shared.update(|i| i.replace(kind, listed(kind, rps)));
                assert!(!rx.has_changed().unwrap(), "{what}: a second re-list");
            }
        }
    }

    /// A shared index of `n` pods of `shop` under a Policy that rate-limits them all,
    /// and the pods as a re-list gives them.
    fn limited(n: usize) -> (Arc<SharedIndex>, Vec<(ObjectKey, super::super::Object)>) {
        let shared = SharedIndex::new(Index::new("cluster.local"), Arc::new(Metrics::new()));
        let pods: Vec<_> = (0..n).map(|k| pod(&format!("p{k}"))).collect();
        let (k, o) = policy(
            "limit",
            json!({"target": {"selector": {"matchLabels": {"app": "client"}}},
                   "defaultAction": "Allow", "rateLimit": {"requestsPerSecond": 5}}),
        );
        shared.update(|i| i.apply(k, o));
        shared.update(|i| i.replace(Kind::Pod, pods.clone()));
        (shared, pods)
    }

    /// Edits the rate limit of the view `pod`'s subscriber holds, unseen: its Policy part
    /// gone stale, as a report that missed the pod leaves it.
    fn stale(shared: &SharedIndex, pod: &ObjectKey) {
        lock(&shared.subscribers)[pod].send_if_modified(|view| {
            let inbound = view.as_mut().and_then(|v| v.inbound.as_mut());
            if let Some(limit) = inbound.and_then(|b| b.rate_limit.as_mut()) {
                limit.requests_per_second = 0;
            }
            false
        });
    }

    /// A re-list that repairs a view and changes no object is a change for the
    /// change-to-ACK histogram: the repaired view's acknowledgement is timed from the
    /// re-list, not from the older change its version would otherwise fall back to.
    #[test]
    fn a_repair_is_timed_from_the_relist() {
        let (shared, pods) = limited(1);
        let a = pods[0].0.clone();
        let mut rx = shared.subscribe(&a);
        rx.borrow_and_update();
        stale(&shared, &a);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let relisted = Instant::now();
        shared.update(|i| i.replace(Kind::Pod, pods.clone()));
        assert!(rx.has_changed().unwrap(), "not repaired");
        let version = rx.borrow_and_update().as_ref().unwrap().version;
        let seen = shared.changed_at(version).unwrap();
        assert!(
            seen >= relisted,
            "timed from {:?} before the re-list",
            relisted - seen
        );
    }

    /// What the repair warnings said: each one's `count` and `pods` fields.
    #[derive(Clone, Default)]
    struct Warnings(Arc<Mutex<Vec<Warned>>>);

    /// One warning's `count` and `pods`.
    type Warned = (Option<u64>, String);

    struct Fields(Option<u64>, String);

    impl tracing::field::Visit for Fields {
        fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
            if field.name() == "count" {
                self.0 = Some(value);
            }
        }
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            if field.name() == "pods" {
                self.1 = format!("{value:?}");
            }
        }
    }

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            if *event.metadata().level() == tracing::Level::WARN {
                let mut fields = Fields(None, String::new());
                event.record(&mut fields);
                lock(&self.0).push((fields.0, fields.1));
            }
        }
    }

    /// The views one re-list repairs are warned of once, with their number and the first
    /// five pods, not once per view.
    #[test]
    fn a_relist_warns_once_of_the_views_it_repaired() {
        use tracing_subscriber::layer::SubscriberExt;
        let (shared, pods) = limited(7);
        let mut receivers: Vec<_> = pods.iter().map(|(k, _)| shared.subscribe(k)).collect();
        for (k, _) in &pods {
            stale(&shared, k);
        }
        let warnings = Warnings::default();
        let subscriber = tracing_subscriber::registry().with(warnings.clone());
        tracing::subscriber::with_default(subscriber, || {
            // tracing caches a callsite's interest once, when first reached, and with one
            // subscriber registered it asks the reaching thread's: a test on another
            // thread with none (several repair views) can cache "no one" after this
            // subscriber is set up, and the warning was not seen (once in ten full runs).
            // So the warning is reached first (a repair of its own), then asked again
            // here; a callsite already reached is asked again only by such a rebuild.
            let (warm, warm_pods) = limited(1);
            let _held = warm.subscribe(&warm_pods[0].0);
            stale(&warm, &warm_pods[0].0);
            warm.update(|i| i.replace(Kind::Pod, warm_pods.clone()));
            tracing::callsite::rebuild_interest_cache();
            lock(&warnings.0).clear();
            shared.update(|i| i.replace(Kind::Pod, pods.clone()));
        });
        assert!(receivers.iter_mut().all(|rx| rx.has_changed().unwrap()));
        let warnings = lock(&warnings.0).clone();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        let (count, named) = &warnings[0];
        assert_eq!(*count, Some(7), "{warnings:?}");
        assert_eq!(named.matches("shop/p").count(), 5, "{warnings:?}");
    }

    /// A Service change that alters no view but a Route's status (its headless Service
    /// appears in a namespace without pods: `ServiceNotFound` becomes
    /// `UnsupportedService`) wakes the status writer at once; one that no resource names
    /// does not.
    #[test]
    fn a_service_change_only_a_status_sees_wakes_the_status_writer() {
        let shared = SharedIndex::new(Index::new("cluster.local"), Arc::new(Metrics::new()));
        let route: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "Route",
            "metadata": {"name": "r", "namespace": "empty", "generation": 1},
            "spec": {"service": {"name": "db"}, "rules": [{"backends": [{"name": "db"}]}]},
        }))
        .unwrap();
        shared.update(|i| {
            let (k, o) = model::weft_resource(Kind::Route, &route);
            i.apply(k, o)
        });
        let headless = |name: &str| {
            let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "empty"},
                "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}
            }))
            .unwrap();
            model::service(&svc)
        };
        let reason = || {
            shared.read(|i| {
                i.resource_state(Kind::Route, &ObjectKey::new("empty", "r"))
                    .map(|s| s.accepted.reason)
            })
        };
        assert_eq!(reason(), Some(super::super::reasons::SERVICE_NOT_FOUND));
        let mut changes = shared.changes();
        for (name, wakes) in [("other", false), ("db", true)] {
            changes.borrow_and_update();
            let (k, o) = headless(name);
            shared.update(|i| i.apply(k, o));
            assert_eq!(changes.has_changed().unwrap(), wakes, "{name}");
        }
        assert_eq!(reason(), Some(super::super::reasons::UNSUPPORTED_SERVICE));
    }

    /// The views read with the index are those of the same index state: a Route just
    /// applied is in the views of subscribed pods and of pods that are not (a peer's),
    /// at the generation the index holds, never a view from before it.
    #[test]
    fn views_read_with_the_index_carry_the_generation_it_holds() {
        let shared = SharedIndex::new(Index::new("cluster.local"), Arc::new(Metrics::new()));
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "198.19.0.10", "clusterIPs": ["198.19.0.10"],
                     "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]}
        }))
        .unwrap();
        shared.update(|i| {
            let (k, o) = model::service(&svc);
            i.apply(k, o)
        });
        let (a, pa) = pod("a");
        let (b, pb) = pod("b");
        shared.update(|i| i.apply(a.clone(), pa));
        shared.update(|i| i.apply(b.clone(), pb));
        let _rx = shared.subscribe(&a);
        for generation in [1, 2] {
            let route: kube::api::DynamicObject = serde_json::from_value(json!({
                "apiVersion": "weft.dev/v1alpha1", "kind": "Route",
                "metadata": {"name": "web", "namespace": "shop", "generation": generation},
                "spec": {"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}]}]},
            }))
            .unwrap();
            shared.update(|i| {
                let (k, o) = model::weft_resource(Kind::Route, &route);
                i.apply(k, o)
            });
            let unknown = ObjectKey::new("shop", "gone");
            let (held, views) =
                shared.read_with_views([a.clone(), b.clone(), unknown.clone()], |i, views| {
                    let state = i.resource_state(Kind::Route, &ObjectKey::new("shop", "web"));
                    (state.map(|s| s.generation), views)
                });
            assert_eq!(held, Some(generation));
            for (pod, view) in &views {
                if *pod == unknown {
                    assert!(view.is_none(), "{pod}: {view:?}");
                    continue;
                }
                let gens: Vec<i64> = view
                    .as_ref()
                    .unwrap()
                    .resources
                    .iter()
                    .filter(|r| r.kind == "Route" && r.name == "web")
                    .map(|r| r.generation)
                    .collect();
                assert_eq!(gens, vec![generation], "{pod}");
            }
        }
    }

    /// How long the runtime tests wait for what must happen, only so that a stalled
    /// runtime fails the test instead of hanging it: the assertion is that it happens.
    const HANG_GUARD: std::time::Duration = std::time::Duration::from_secs(10);

    /// Whether a task spawned on `runtime` runs. Waited for from this thread, not with
    /// the runtime's timer: a runtime whose only worker is blocked never fires it.
    fn runs(runtime: &tokio::runtime::Runtime) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        runtime.spawn(async move { tx.send(()) });
        rx.recv_timeout(HANG_GUARD).is_ok()
    }

    /// A re-list that holds the index (paused inside `Index::replace`) on a runtime of one
    /// worker, as in a pod limited to one CPU, leaves the runtime serving: the watch's
    /// re-list runs on the blocking pool, so an unrelated task runs; a push session
    /// subscribing meanwhile awaits the re-list without holding the worker (another task
    /// runs while it waits) and then receives the view the re-list made.
    #[test]
    fn a_relist_holding_the_index_leaves_the_runtime_serving() {
        // First, so that it is dropped last: the channels that release the re-list go
        // first, even when an assertion fails.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (shared, mut pods) = limited(2);
        let (late, late_pod) = pod("late");
        pods.push((late.clone(), late_pod));
        assert!(shared.read(|i| i.view(&late)).is_none());
        let (entered, release) = shared.pause_next_replace();

        let relist = runtime.spawn({
            let shared = shared.clone();
            async move { crate::index::watch::relisted(&shared, Kind::Pod, pods).await }
        });
        entered
            .recv_timeout(HANG_GUARD)
            .expect("the re-list reaches Index::replace");
        assert!(
            runs(&runtime),
            "no task runs while a re-list holds the index"
        );

        let (started_tx, started) = std::sync::mpsc::channel();
        let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
        runtime.spawn({
            let (shared, late) = (shared.clone(), late.clone());
            async move {
                let _ = started_tx.send(());
                let _ = subscribed_tx.send(shared.subscribe_async(&late).await);
            }
        });
        started
            .recv_timeout(HANG_GUARD)
            .expect("the subscribing task starts");
        assert!(
            runs(&runtime),
            "no task runs while a subscribe waits for the re-list"
        );
        assert!(
            subscribed.try_recv().is_err(),
            "subscribed while the re-list held the index"
        );

        release.send(()).unwrap();
        let rx = subscribed
            .recv_timeout(HANG_GUARD)
            .expect("the subscribe completes once the re-list is applied");
        runtime
            .block_on(async { tokio::time::timeout(HANG_GUARD, relist).await })
            .expect("the re-list completes")
            .unwrap()
            .unwrap();
        let held = rx.borrow().clone().expect("a view of the listed pod");
        let fresh = shared.read(|i| i.view(&late)).unwrap();
        assert!(held.same_content(&fresh), "{held:?} is not {fresh:?}");
        assert!(
            lock(&shared.synced).contains(&Kind::Pod),
            "not marked synced"
        );
    }

    /// A change that panics on the blocking pool is reported to its caller, which goes
    /// on; the index (its lock poisoned) takes the next change. A re-list cut short so
    /// does not mark its kind synced.
    #[test]
    fn a_change_that_panics_on_the_blocking_pool_is_survived() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (shared, pods) = limited(1);
        let applied = runtime.block_on(shared.update_async(|_| panic!("a bug in a change")));
        assert_eq!(applied, Err(NotApplied::Panicked));
        shared.index.get_mut().panic_mid_replace = true;
        let relisted = runtime.block_on(crate::index::watch::relisted(
            &shared,
            Kind::Pod,
            pods.clone(),
        ));
        assert_eq!(relisted, Err(NotApplied::Panicked));
        assert!(!lock(&shared.synced).contains(&Kind::Pod), "marked synced");
        let version = shared.read(Index::version);
        let (k, o) = pod("after");
        assert_eq!(
            runtime.block_on(shared.update_async(move |i| i.apply(k, o))),
            Ok(())
        );
        assert!(
            shared.read(Index::version) > version,
            "the next change not applied"
        );
        let relisted = runtime.block_on(crate::index::watch::relisted(&shared, Kind::Pod, pods));
        assert_eq!(relisted, Ok(()));
        assert!(
            lock(&shared.synced).contains(&Kind::Pod),
            "not marked synced"
        );
    }

    /// The reviewer's repro: async readers waiting for a re-list take no thread, so that
    /// more of them than the blocking pool has threads (here 20 against a cap of 8; 600
    /// against the default 512 in production) leave the runtime serving, and each reads
    /// once the re-list is applied. Waiting in `block_in_place`, each held a thread, and
    /// past the cap the runtime ran no new task.
    #[test]
    fn async_readers_past_the_blocking_pool_cap_leave_the_runtime_serving() {
        const READERS: usize = 20;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(8)
            .enable_all()
            .build()
            .unwrap();
        let (shared, pods) = limited(2);
        let version = shared.read(Index::version);
        let (entered, release) = shared.pause_next_replace();
        let relist = runtime.spawn({
            let shared = shared.clone();
            async move { crate::index::watch::relisted(&shared, Kind::Pod, pods).await }
        });
        entered
            .recv_timeout(HANG_GUARD)
            .expect("the re-list reaches Index::replace");
        let (read_tx, read) = std::sync::mpsc::channel();
        for _ in 0..READERS {
            let (shared, read_tx) = (shared.clone(), read_tx.clone());
            runtime.spawn(async move {
                let _ = read_tx.send(shared.read_async(|i| i.version()).await);
            });
        }
        assert!(
            runs(&runtime),
            "no task runs while {READERS} readers wait for the re-list"
        );
        assert!(
            read.try_recv().is_err(),
            "read while the re-list held the index"
        );

        release.send(()).unwrap();
        for _ in 0..READERS {
            let read = read
                .recv_timeout(HANG_GUARD)
                .expect("each reader reads once the re-list is applied");
            assert!(read >= version, "read version {read}, before {version}");
        }
        runtime
            .block_on(async { tokio::time::timeout(HANG_GUARD, relist).await })
            .expect("the re-list completes")
            .unwrap()
            .unwrap();
    }

    /// What the webhook reads while a re-list holds the index: nothing, at once
    /// ([`SharedIndex::try_read`]); once the re-list is applied, the index.
    #[test]
    fn try_read_does_not_wait_for_a_relist() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (shared, pods) = limited(1);
        assert!(shared.try_read(Index::version).is_some());
        let (entered, release) = shared.pause_next_replace();
        let relist = runtime.spawn({
            let shared = shared.clone();
            async move { crate::index::watch::relisted(&shared, Kind::Pod, pods).await }
        });
        entered
            .recv_timeout(HANG_GUARD)
            .expect("the re-list reaches Index::replace");
        assert!(shared.try_read(Index::version).is_none());
        release.send(()).unwrap();
        runtime
            .block_on(async { tokio::time::timeout(HANG_GUARD, relist).await })
            .expect("the re-list completes")
            .unwrap()
            .unwrap();
        assert!(shared.try_read(Index::version).is_some());
    }
}
