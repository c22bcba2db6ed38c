//! Who governs a Service port when several resources claim it: Routes and Breakers each
//! govern one Service (and one port, or every port), and of two that overlap **the older
//! wins** (creation time, then name, as in the Gateway API). The same order settles two
//! Policies that rate-limit one pod.
//!
//! ```text
//! resources of one kind in a namespace ──claimants(service)──▶ oldest first
//!         settle(applies): skips those that govern nothing; each other one loses to
//!                          the oldest older *winner* it overlaps, if any
//!         conflict(key)  : the older overlapping winner `key` loses to, if any
//!         losers(key)    : the newer overlapping ones `key` wins over
//!         winner(port)   : the one that applies to a port
//! ```

use std::collections::BTreeMap;

use weft_crds::{BreakerSpec, RouteSpec, common::ServiceRef};

use super::{
    in_ns,
    model::{ObjectKey, Parsed, ResourceMeta},
};

/// A resource that governs one Service (or one of its ports).
pub trait Governs {
    /// The Service (and port) it governs.
    fn governs(&self) -> &ServiceRef;
}

impl Governs for RouteSpec {
    fn governs(&self) -> &ServiceRef {
        &self.service
    }
}

impl Governs for BreakerSpec {
    fn governs(&self) -> &ServiceRef {
        &self.service
    }
}

/// Resources of one kind, as the index keeps them.
pub type Resources<T> = BTreeMap<ObjectKey, (ResourceMeta, Parsed<T>)>;

/// The order that settles a conflict: older first, then by name.
pub fn age_order(
    a: (&ObjectKey, &ResourceMeta),
    b: (&ObjectKey, &ResourceMeta),
) -> std::cmp::Ordering {
    (a.1.created.as_ref().map(|t| t.0), &a.0.name)
        .cmp(&(b.1.created.as_ref().map(|t| t.0), &b.0.name))
}

/// Whether two port selections overlap (an omitted port means every port).
fn ports_overlap(a: Option<u16>, b: Option<u16>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

/// The valid resources that govern `service` in `ns`, oldest first.
pub fn claimants<'a, T: Governs>(
    map: &'a Resources<T>,
    ns: &str,
    service: &str,
) -> Vec<(&'a ObjectKey, &'a ResourceMeta, &'a T)> {
    let mut out: Vec<_> = in_ns(map, ns)
        .filter_map(|(k, (meta, spec))| match spec {
            Parsed::Valid(s) if s.governs().name == service => Some((k, meta, s)),
            _ => None,
        })
        .collect();
    out.sort_by(|a, b| age_order((a.0, a.1), (b.0, b.1)));
    out
}

/// Whether a resource governing this Service (port) governs anything at all: its Service
/// and port exist, with a cluster IP, and not every port it governs is opaque. One that
/// governs nothing neither wins nor loses a conflict.
pub type Applies<'a> = &'a dyn Fn(&ServiceRef) -> bool;

/// Settles the resources that govern `service` in `ns`, oldest first: each that governs
/// something (`applies`), with the older one it loses to, if any. Only a resource that
/// wins (governs something and loses to nobody) can beat a newer one: an older one that
/// governs nothing, or lost itself, takes nothing from it.
fn settle<'a, T: Governs>(
    map: &'a Resources<T>,
    ns: &str,
    service: &str,
    applies: Applies<'_>,
) -> Vec<(&'a ObjectKey, &'a T, Option<&'a ObjectKey>)> {
    let mut winners: Vec<(&ObjectKey, &T)> = Vec::new();
    let mut out = Vec::new();
    for (k, _, s) in claimants(map, ns, service) {
        if !applies(s.governs()) {
            continue;
        }
        let lost_to = winners
            .iter()
            .find(|(_, w)| ports_overlap(w.governs().port, s.governs().port))
            .map(|(w, _)| *w);
        if lost_to.is_none() {
            winners.push((k, s));
        }
        out.push((k, s, lost_to));
    }
    out
}

/// The older resource that `key` conflicts with (and loses to), if any.
pub fn conflict<T: Governs>(
    map: &Resources<T>,
    key: &ObjectKey,
    applies: Applies<'_>,
) -> Option<ObjectKey> {
    let (_, Parsed::Valid(spec)) = map.get(key)? else {
        return None;
    };
    settle(map, &key.namespace, &spec.governs().name, applies)
        .into_iter()
        .find(|(k, _, _)| *k == key)
        .and_then(|(_, _, lost_to)| lost_to.cloned())
}

/// The newer resources that lose to `key`.
pub fn losers<T: Governs>(
    map: &Resources<T>,
    key: &ObjectKey,
    applies: Applies<'_>,
) -> Vec<ObjectKey> {
    let Some((_, Parsed::Valid(spec))) = map.get(key) else {
        return Vec::new();
    };
    settle(map, &key.namespace, &spec.governs().name, applies)
        .into_iter()
        .filter(|(_, _, lost_to)| *lost_to == Some(key))
        .map(|(k, _, _)| k.clone())
        .collect()
}

/// The resource that applies to `service`'s `port`: the oldest of those that govern the
/// port and lose to nobody.
pub fn winner<'a, T: Governs>(
    map: &'a Resources<T>,
    ns: &str,
    service: &str,
    port: u16,
    applies: Applies<'_>,
) -> Option<(&'a ObjectKey, &'a T)> {
    settle(map, ns, service, applies)
        .into_iter()
        .find(|(_, s, lost_to)| lost_to.is_none() && s.governs().port.is_none_or(|p| p == port))
        .map(|(k, s, _)| (k, s))
}
