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
//! order: index, then subscribers.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use tokio::sync::watch;

use super::{Affected, Index, Kind, ObjectKey, ProxyView};
use crate::metrics::Metrics;

/// How many change timestamps are remembered for the change-to-ACK histogram: enough for
/// every version a lagging proxy might still acknowledge at a thousand changes a second.
const CHANGE_TIMES: usize = 4096;

/// The index, its subscribers, and what the status writer and health checks need to know.
#[derive(Debug)]
pub struct SharedIndex {
    index: Mutex<Index>,
    subscribers: Mutex<HashMap<ObjectKey, watch::Sender<Option<ProxyView>>>>,
    synced: Mutex<BTreeSet<Kind>>,
    change_times: Mutex<VecDeque<(u64, Instant)>>,
    changed: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SharedIndex {
    /// Shares `index`, reporting to `metrics`.
    pub fn new(index: Index, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(SharedIndex {
            index: Mutex::new(index),
            subscribers: Mutex::new(HashMap::new()),
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

    /// Changes the index and wakes the subscribers whose view changed.
    pub fn update(&self, change: impl FnOnce(&mut Index) -> Affected) {
        let index = &mut *lock(&self.index);
        let affected = change(index);
        for kind in Kind::ALL {
            self.metrics.index_objects(kind, index.len(kind));
        }
        if affected.is_empty() {
            return;
        }
        {
            let mut times = lock(&self.change_times);
            times.push_back((index.version(), Instant::now()));
            while times.len() > CHANGE_TIMES {
                times.pop_front();
            }
        }
        let subscribers = lock(&self.subscribers);
        for (pod, tx) in subscribers.iter() {
            if !index.is_affected(pod, &affected) {
                continue;
            }
            let fresh = index.view(pod);
            tx.send_if_modified(|current| match (current.as_mut(), fresh) {
                (Some(cur), Some(new)) if cur.same_content(&new) => false,
                (None, None) => false,
                (cur, new) => {
                    let _ = cur;
                    *current = new;
                    true
                }
            });
        }
        drop(subscribers);
        self.changed.send_modify(|n| *n += 1);
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

    /// A receiver of `pod`'s view: the current one at once, then each change.
    pub fn subscribe(&self, pod: &ObjectKey) -> watch::Receiver<Option<ProxyView>> {
        let index = lock(&self.index);
        let mut subscribers = lock(&self.subscribers);
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

    /// Forgets `pod`'s channel once no session holds a receiver.
    pub fn unsubscribe(&self, pod: &ObjectKey) {
        let mut subscribers = lock(&self.subscribers);
        if subscribers
            .get(pod)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            subscribers.remove(pod);
        }
        self.metrics.subscribers(subscribers.len());
    }

    /// The view each subscribed pod should run now.
    pub fn desired_views(&self) -> Vec<(ObjectKey, Option<ProxyView>)> {
        lock(&self.subscribers)
            .iter()
            .map(|(k, tx)| (k.clone(), tx.borrow().clone()))
            .collect()
    }

    /// Reads the index.
    pub fn read<T>(&self, f: impl FnOnce(&Index) -> T) -> T {
        f(&lock(&self.index))
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
}
