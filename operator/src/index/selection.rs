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
    collections::{BTreeSet, HashMap, HashSet, hash_map::Entry},
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

    /// Records that each Policy of `selected` selects the pods at the given positions of
    /// `pods` (ascending), as [`Selection::insert`] of each pair would, in one pass: the
    /// first list of 1,000 Policies among 10,000 pods relates ~1.7 million pairs, and
    /// inserting them one by one (two key lookups and two ordered-set insertions each)
    /// was most of that list's seconds. Each key is looked up once, and each set built
    /// at once from its sorted members.
    pub fn insert_many(&mut self, pods: &[&ObjectKey], selected: &[(&ObjectKey, Vec<usize>)]) {
        // Each pod's one allocation, looked up (or made) once, on first use.
        let mut pod_keys: Vec<Option<Arc<ObjectKey>>> = vec![None; pods.len()];
        // The Policies to add to each pod's set, in the order `selected` gives them.
        let mut added: Vec<Vec<Arc<ObjectKey>>> = vec![Vec::new(); pods.len()];
        for (policy, positions) in selected {
            let positions: Vec<usize> = positions
                .iter()
                .copied()
                .filter(|&at| at < pods.len())
                .collect();
            if positions.is_empty() {
                continue;
            }
            let policy = shared(&self.by_policy, policy);
            let mut members = Vec::with_capacity(positions.len());
            for at in positions {
                let pod = pod_keys[at]
                    .get_or_insert_with(|| shared(&self.by_pod, pods[at]))
                    .clone();
                members.push(pod);
                added[at].push(policy.clone());
            }
            match self.by_policy.entry(policy) {
                Entry::Occupied(mut e) => e.get_mut().extend(members),
                Entry::Vacant(e) => {
                    e.insert(members.into_iter().collect());
                }
            }
        }
        for (pod, policies) in pod_keys.into_iter().zip(added) {
            let Some(pod) = pod else { continue };
            match self.by_pod.entry(pod) {
                Entry::Occupied(mut e) => e.get_mut().extend(policies),
                Entry::Vacant(e) => {
                    e.insert(policies.into_iter().collect());
                }
            }
        }
    }

    /// The pods one of `policies` selects, each once (in no particular order): what a
    /// re-list of changed Policies reports, without comparing keys to merge each one's
    /// thousands of pods.
    pub fn pods_of_any<'a, 'b>(
        &'a self,
        policies: impl IntoIterator<Item = &'b ObjectKey>,
    ) -> Vec<&'a ObjectKey> {
        // Each pod's key is one allocation shared by every set holding it, so its address
        // tells it apart.
        let mut seen: HashSet<*const ObjectKey> = HashSet::new();
        let mut pods = Vec::new();
        for policy in policies {
            for pod in self.by_policy.get(policy).into_iter().flatten() {
                if seen.insert(Arc::as_ptr(pod)) {
                    pods.push(&**pod);
                }
            }
        }
        pods
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

    /// (pod, Policy) or (Policy, pod) pairs.
    type Pairs = BTreeSet<(ObjectKey, ObjectKey)>;

    /// Both directions of a selection as (pod, Policy) and (Policy, pod) pairs.
    fn pairs(s: &Selection) -> (Pairs, Pairs) {
        let by_pod = s
            .by_pod
            .iter()
            .flat_map(|(pod, ps)| ps.iter().map(|p| ((**pod).clone(), (**p).clone())))
            .collect();
        let by_policy = s
            .by_policy
            .iter()
            .flat_map(|(p, pods)| pods.iter().map(|pod| ((**p).clone(), (**pod).clone())))
            .collect();
        (by_pod, by_policy)
    }

    #[test]
    fn inserting_many_is_inserting_each_pair_and_shares_each_key() {
        let k = |n: &str| ObjectKey::new("ns", n);
        let (a, b, c) = (k("a"), k("b"), k("c"));
        let (p, q, r) = (k("p"), k("q"), k("r"));
        // Some pairs there before, on both sides.
        let mut one_by_one = Selection::default();
        one_by_one.insert(&p, &a);
        one_by_one.insert(&r, &c);
        let mut at_once = Selection::default();
        at_once.insert(&p, &a);
        at_once.insert(&r, &c);
        let pods = [&a, &b, &c];
        // An index past the pods is ignored, a Policy selecting none recorded nowhere.
        let selected = [(&p, vec![0, 1]), (&q, vec![1, 2, 7]), (&k("none"), vec![])];
        for (policy, positions) in &selected {
            for &at in positions {
                if let Some(pod) = pods.get(at) {
                    one_by_one.insert(policy, pod);
                }
            }
        }
        at_once.insert_many(&pods, &selected);
        assert_eq!(pairs(&at_once), pairs(&one_by_one));
        assert_eq!(at_once.policies(&b).collect::<Vec<_>>(), vec![&p, &q]);
        assert_eq!(at_once.pods(&q).collect::<Vec<_>>(), vec![&b, &c]);
        assert!(!at_once.by_policy.contains_key(&k("none")));
        // One allocation per key, whichever direction holds it.
        for (pod, policies) in &at_once.by_pod {
            for policy in policies {
                let (held, pods) = at_once.by_policy.get_key_value(&**policy).unwrap();
                assert!(Arc::ptr_eq(held, policy));
                assert!(pods.iter().any(|p| Arc::ptr_eq(p, pod)));
            }
        }
        let mut any = at_once.pods_of_any([&p, &q, &k("none")]);
        any.sort();
        assert_eq!(any, vec![&a, &b, &c]);
        assert_eq!(at_once.pods_of_any([&r, &r]), vec![&c]);
    }
}
