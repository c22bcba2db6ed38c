//! Which valid Policies select which meshed pods, kept up to date as objects change, so
//! that a view, an endpoint's identity or the `TooManyPolicies` check looks the answer up
//! instead of evaluating every Policy of a namespace against every pod there.
//!
//! ```text
//! Pod applied / deleted     ──▶ that pod against its namespace's Policies
//! Policy applied / deleted  ──▶ that Policy against its namespace's pods
//! Service applied / deleted ──▶ the Policies that target it by name, against the pods
//!                               ▼
//!            by_pod: pod ─▶ Policies      by_policy: Policy ─▶ pods
//! ```
//!
//! [`super::Index`] decides what selects what (`Index::selects`); this only holds the
//! answers, in both directions, and keeps the two equal. Both sides are ordered by key, as
//! the index's maps are, so that what is read from here comes in the order a scan of
//! those maps gave.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use super::ObjectKey;

/// The relation "Policy selects pod", for valid Policies (whether one is refused for
/// `TooManyPolicies` is the index's to apply on top).
///
/// A namespace-wide Policy relates to every pod of its namespace, so the relation holds
/// pods × such Policies pairs: each key is allocated once and shared by both directions
/// (an `Arc`), so that a pair costs two pointers rather than two copies of two names.
#[derive(Debug, Default)]
pub struct Selection {
    by_pod: HashMap<Arc<ObjectKey>, BTreeSet<Arc<ObjectKey>>>,
    by_policy: HashMap<Arc<ObjectKey>, BTreeSet<Arc<ObjectKey>>>,
}

impl Selection {
    /// The Policies that select `pod`, by key.
    pub fn policies<'a>(
        &'a self,
        pod: &ObjectKey,
    ) -> impl Iterator<Item = &'a ObjectKey> + use<'a> {
        self.by_pod.get(pod).into_iter().flatten().map(|k| &**k)
    }

    /// How many Policies select `pod`.
    pub fn count(&self, pod: &ObjectKey) -> usize {
        self.by_pod.get(pod).map_or(0, BTreeSet::len)
    }

    /// The pods `policy` selects, by key.
    pub fn pods<'a>(&'a self, policy: &ObjectKey) -> impl Iterator<Item = &'a ObjectKey> + use<'a> {
        self.by_policy
            .get(policy)
            .into_iter()
            .flatten()
            .map(|k| &**k)
    }

    /// Records that `policy` selects `pod`.
    pub fn insert(&mut self, policy: &ObjectKey, pod: &ObjectKey) {
        let pod = shared(&self.by_pod, pod);
        let policy = shared(&self.by_policy, policy);
        self.by_pod
            .entry(pod.clone())
            .or_default()
            .insert(policy.clone());
        self.by_policy.entry(policy).or_default().insert(pod);
    }

    /// The pods some Policy selects, and the Policies that select some pod: the keys of
    /// both directions, for tests to hold against the index's live objects.
    #[cfg(test)]
    pub fn keys(&self) -> (BTreeSet<&ObjectKey>, BTreeSet<&ObjectKey>) {
        (
            self.by_pod.keys().map(|k| &**k).collect(),
            self.by_policy.keys().map(|k| &**k).collect(),
        )
    }

    /// Forgets every Policy selecting `pod`; returns them.
    pub fn remove_pod(&mut self, pod: &ObjectKey) -> BTreeSet<ObjectKey> {
        let policies = self.by_pod.remove(pod).unwrap_or_default();
        for policy in &policies {
            remove_from(&mut self.by_policy, policy, pod);
        }
        policies.into_iter().map(|k| (*k).clone()).collect()
    }

    /// Forgets every pod `policy` selects; returns them.
    pub fn remove_policy(&mut self, policy: &ObjectKey) -> BTreeSet<ObjectKey> {
        let pods = self.by_policy.remove(policy).unwrap_or_default();
        for pod in &pods {
            remove_from(&mut self.by_pod, pod, policy);
        }
        pods.into_iter().map(|k| (*k).clone()).collect()
    }
}

/// The one allocation of `key`: the map's own when it holds the key, else a new one.
fn shared(
    map: &HashMap<Arc<ObjectKey>, BTreeSet<Arc<ObjectKey>>>,
    key: &ObjectKey,
) -> Arc<ObjectKey> {
    map.get_key_value(key)
        .map_or_else(|| Arc::new(key.clone()), |(k, _)| k.clone())
}

/// Removes `value` from `key`'s set, and the set once empty (so that the maps do not keep
/// an entry per pod or Policy ever seen).
fn remove_from(
    map: &mut HashMap<Arc<ObjectKey>, BTreeSet<Arc<ObjectKey>>>,
    key: &ObjectKey,
    value: &ObjectKey,
) {
    if let Some(set) = map.get_mut(key) {
        set.remove(value);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_directions_stay_equal_and_empty_sets_are_dropped() {
        let mut s = Selection::default();
        let (p, q) = (ObjectKey::new("ns", "p"), ObjectKey::new("ns", "q"));
        let (a, b) = (ObjectKey::new("ns", "a"), ObjectKey::new("ns", "b"));
        s.insert(&p, &a);
        s.insert(&p, &b);
        s.insert(&q, &a);
        assert_eq!(s.policies(&a).collect::<Vec<_>>(), vec![&p, &q]);
        assert_eq!(s.pods(&p).collect::<Vec<_>>(), vec![&a, &b]);
        assert_eq!(s.remove_pod(&a), BTreeSet::from([p.clone(), q.clone()]));
        assert_eq!(s.pods(&p).collect::<Vec<_>>(), vec![&b]);
        assert_eq!(s.pods(&q).count(), 0);
        assert!(!s.by_policy.contains_key(&q));
        assert_eq!(s.remove_policy(&p), BTreeSet::from([b.clone()]));
        assert!(s.by_pod.is_empty() && s.by_policy.is_empty());
    }
}
