//! The services one proxy may call, held as one shared map per visible namespace: a view
//! costs a pointer per namespace instead of a copy of every service, and a namespace that
//! did not change is recognised by pointer comparison.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use weft_api::proxy_config::ServiceConfig;

/// One namespace's services, each keyed by its own config name, shared by the index and
/// every view of it.
pub type NsServices = Arc<BTreeMap<String, Arc<ServiceConfig>>>;

/// The services of a view: one [`NsServices`] per namespace. Config names
/// (`<service>.<namespace>.<port>`) are unique across namespaces.
#[derive(Clone, Debug, Default)]
pub struct ServiceSet {
    by_ns: BTreeMap<String, NsServices>,
}

impl ServiceSet {
    /// Adds namespace `ns`'s services (sharing the map).
    pub fn insert_namespace(&mut self, ns: &str, services: &NsServices) {
        self.by_ns.insert(ns.to_owned(), services.clone());
    }

    /// The namespaces and their maps.
    pub fn namespaces(&self) -> impl Iterator<Item = (&String, &NsServices)> {
        self.by_ns.iter()
    }

    /// One namespace's map.
    pub fn namespace(&self, ns: &str) -> Option<&NsServices> {
        self.by_ns.get(ns)
    }

    /// Every service, by namespace, then by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<ServiceConfig>)> {
        self.by_ns.values().flat_map(|m| m.iter())
    }

    /// Every service config.
    pub fn values(&self) -> impl Iterator<Item = &Arc<ServiceConfig>> {
        self.iter().map(|(_, v)| v)
    }

    /// The service named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<ServiceConfig>> {
        self.by_ns.values().find_map(|m| m.get(name))
    }

    /// Whether a service named `name` is in the set.
    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// How many services.
    pub fn len(&self) -> usize {
        self.by_ns.values().map(|m| m.len()).sum()
    }

    /// Whether there is no service.
    pub fn is_empty(&self) -> bool {
        self.by_ns.values().all(|m| m.is_empty())
    }

    /// Whether two sets hold the same configs (shared maps and configs compare by
    /// pointer). A config is keyed by its own name, so one shared config is under the
    /// same name in both maps: of a namespace's thousand configs, mostly shared when one
    /// changed, only those that are not compare their names.
    pub fn same(&self, other: &ServiceSet) -> bool {
        self.same_with(other, &mut |x, y| same_map(x, y))
    }

    /// [`ServiceSet::same`], reusing the comparisons of namespaces' maps already made in
    /// `made`.
    pub fn same_remembered(&self, other: &ServiceSet, made: &mut Comparisons) -> bool {
        self.same_with(other, &mut |x, y| made.same(x, y))
    }

    fn same_with(
        &self,
        other: &ServiceSet,
        same_maps: &mut impl FnMut(&NsServices, &NsServices) -> bool,
    ) -> bool {
        self.by_ns.len() == other.by_ns.len()
            && self
                .by_ns
                .iter()
                .zip(other.by_ns.iter())
                .all(|((a, x), (b, y))| a == b && (Arc::ptr_eq(x, y) || same_maps(x, y)))
    }
}

/// Whether two namespaces' maps hold the same configs, compared one by one (shared configs
/// by pointer).
fn same_map(x: &NsServices, y: &NsServices) -> bool {
    x.len() == y.len()
        && x.iter().zip(y.iter()).all(|((m, p), (n, q))| {
            // The pointer comparison skips the names, which is sound only while each
            // key is its config's name.
            debug_assert!(
                *m == p.name && *n == q.name,
                "configs {} and {} keyed as {m} and {n}",
                p.name,
                q.name
            );
            Arc::ptr_eq(p, q) || (m == n && p == q)
        })
}

/// The comparisons of two namespaces' maps made while refreshing the views of one
/// change, by the maps' addresses. Every view that sees a changed namespace compares
/// the map it held with the one the index holds now, mostly the same two: compared once,
/// not once per view (10,000 comparisons of 1,000 configs each when a pod changes in a
/// namespace of 10,000 pods and 1,000 Services). Each entry keeps both maps, so that
/// neither address is reused by another map while the comparisons are kept.
#[derive(Debug, Default)]
pub struct Comparisons {
    made: HashMap<(usize, usize), (NsServices, NsServices, bool)>,
}

impl Comparisons {
    /// Whether `x` and `y` hold the same configs ([`ServiceSet::same`]), compared once.
    fn same(&mut self, x: &NsServices, y: &NsServices) -> bool {
        let key = (Arc::as_ptr(x) as usize, Arc::as_ptr(y) as usize);
        self.made
            .entry(key)
            .or_insert_with(|| (x.clone(), y.clone(), same_map(x, y)))
            .2
    }
}
