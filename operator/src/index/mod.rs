//! The mesh index: one in-memory model of the cluster, and from it the config each proxy
//! needs. Plain synchronous code; the watch layer ([`crate::watch`]) feeds it and the push
//! server ([`crate::push`]) reads it.
//!
//! ```text
//! watch events ──model::convert──▶ Index::apply / delete / replace
//!                                      │ rebuild only the namespace the object lives in
//!                                      ▼
//!                 outbound[ns] : Arc<name ─▶ Arc<ServiceConfig>> (both kept by pointer when unchanged)
//!                 resources[ns]: Routes and Breakers programmed there, each with what
//!                                enforcing it takes (requires::route / breaker / policy)
//!                                      │
//!                  Affected { namespaces, pods } ──▶ only subscribers that see one of them
//!                  Affected { statuses } ─────────▶ the status writer, woken even where no
//!                                      │            view changed (a Weft resource changed,
//!                                      │            or a Service one names)
//!                                      ▼
//!                 Index::view(pod) ─▶ ProxyView (services it may call + resources it runs)
//! ```
//!
//! What a proxy receives: the Services of its own namespace and of the namespaces its pod
//! (or namespace) lists in [`model::VISIBLE_NAMESPACES_ANNOTATION`], one
//! [`ServiceConfig`] per Service port, named `<service>.<namespace>.<port>`, with the
//! ready endpoints (terminating ones are drained: they get no new requests), the SPIFFE
//! identity of meshed endpoints, the Route and the Breaker that win for that port, compiled
//! ([`compile`]); and, for the proxy's own pod, the rate limit of the oldest Policy that
//! selects it and sets one.
//!
//! Every dependency of a Service's config (its EndpointSlices, its Routes and Breakers,
//! their backends, the pods behind the endpoints) lives in the Service's own namespace, so a
//! change to one object rebuilds that namespace only and reports it as affected only when
//! some config really changed. Within it, an EndpointSlice, pod or Policy change computes
//! again only the configs of the Services whose endpoints it touches (a slice's Service;
//! the Services listing a pod whose model or mTLS mode changed) and the entries of the
//! pods configs at the addresses it touches; the other configs and entries are kept
//! without being computed again (`Dirty`). A
//! Service, Route or Breaker change, a re-list, or a change in which Policies are refused
//! rebuilds every config of the namespace.
//!
//! A resource's status ([`Index::resource_state`]) is read by the status writer, which
//! [`shared::SharedIndex::update`] wakes for any change that may alter a view, and for
//! one that alters none but sets [`Affected::statuses`]: a Route, Policy or Breaker added,
//! changed or removed, or a Service one of them names (its status reads that Service even
//! where no proxy has it, e.g. a headless one). Otherwise the writer runs on its 5 s timer.
//!
//! Which Policies select which pods is kept in [`selection`], updated by the one pod, Policy
//! or Service that changed, so that a rebuild and each view look it up instead of
//! evaluating every Policy of the namespace against every pod there. A re-list of
//! Policies (the first list too) selects once at its end, for all the Policies it
//! applied (`Index::settle_selection`). A Policy change
//! reports the pods it selected or selects; the whole namespace only when the rebuild finds
//! a config changed (a Disabled mode strips identities), and every pod of it when a Policy
//! is refused (or accepted again).
//!
//! A subscriber's view is brought up to date from the one it holds
//! (`Index::refresh_view`): the part its pod's Policies make of it (their references and
//! the inbound config) is recomputed only for the pods a change reports in
//! [`Affected::pods`], since nothing else feeds it; for the others, whose namespaces'
//! services changed, only those are. A re-list of a kind that feeds the Policy part
//! rebuilds the namespaces it went over (their services, Routes and Breakers, refusals
//! and mTLS modes) and computes every view there again from the index
//! ([`Affected::relisted`]), so that a report that missed a pod leaves its view stale
//! until the next re-list at most. Which Policies select which pods is not evaluated
//! again (pods × Policies, seconds at 10,000 pods): a change cut short while re-selecting
//! leaves it wrong until the Policy's target, the pod or the Service it targets changes.

pub mod compile;
pub mod conflict;
pub mod model;
pub mod requires;
pub mod selection;
pub mod services;
pub mod shared;
pub mod validate;
pub mod watch;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use weft_api::proxy_config::MtlsMode;
use weft_api::{
    proxy_config::{Balancer, EndpointConfig, InboundConfig, Protocol, ServiceConfig},
    push::ResourceRef,
};
use weft_crds::{common::ServiceRef, policy::Action};

use model::{
    BreakerModel, NamespaceModel, Parsed, PodModel, PolicyModel, RouteModel, ServiceModel,
    SliceModel, selector_matches,
};
pub use model::{Kind, Object, ObjectKey};
pub use services::{Comparisons, NsServices, ServiceSet};

/// The config one proxy needs, as the index computes it.
#[derive(Clone, Debug, Default)]
pub struct ProxyView {
    /// The index version at which this view last changed.
    pub version: u64,
    /// The services the proxy may call, one shared map per visible namespace.
    pub services: ServiceSet,
    /// The Weft resources (with generations) this view implements.
    pub resources: BTreeSet<ResourceRef>,
    /// The proxy's inbound settings when Policies select its pod: the rate limit, the
    /// strictest mTLS mode and every Policy's authorization.
    pub inbound: Option<InboundConfig>,
}

impl ProxyView {
    /// Whether two views carry the same config (versions aside).
    pub fn same_content(&self, other: &ProxyView) -> bool {
        self.resources == other.resources
            && self.inbound == other.inbound
            && self.services.same(&other.services)
    }
}

/// What a change touched: subscribers that see one of `namespaces`, or whose pod is in
/// `pods`, may need a new view; nobody else does. With `statuses`, some Weft resource's
/// status may have changed even where no view did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Affected {
    /// Namespaces whose outbound services or resources changed.
    pub namespaces: BTreeSet<String>,
    /// Of `namespaces`, those whose programmed Routes or Breakers changed. A view whose
    /// pod sees none of them keeps their references as it holds them, unread
    /// ([`Index::refresh_view`]).
    pub resources: BTreeSet<String>,
    /// Pods whose own view inputs (labels, visibility, the Policies selecting them and
    /// their refusals) may have changed. A subscriber whose pod is not here keeps the
    /// Policy part of its view.
    pub pods: BTreeSet<ObjectKey>,
    /// Whether a Route, Policy or Breaker was added, changed or removed, or a Service one
    /// of them names (governs, targets, sends to or mirrors to). Its status may change
    /// where no proxy's view does (one that does not parse, a Policy that selects no pod,
    /// a Route whose headless Service appears in a namespace without pods), so the status
    /// writer is woken for it while no config is pushed.
    pub statuses: bool,
    /// Namespaces a re-list ([`Index::replace`]) of a kind feeding the Policy part of
    /// views went over: every subscriber whose pod is in one has its view computed again
    /// from the index, not updated from the one it holds. A kept Policy part is only as
    /// right as every change's report of `pods`; a report that missed a pod, or a change
    /// cut short by a panic (the index lock recovers from poisoning) after it changed the
    /// index and before the subscribers were refreshed, would leave it stale until the
    /// pod is named again. A re-list repairs it at the latest, and rebuilds these
    /// namespaces' derived state first, but not which Policies select which pods (see
    /// [`Index::replace`]). `is_empty` ignores it (only a stale view changes), but it
    /// takes a new version: a push session sends nothing for a view at the version it
    /// last sent, which a view gone stale may well carry.
    pub relisted: BTreeSet<String>,
}

impl Affected {
    /// Whether no proxy's view may have changed (`statuses` and `relisted` aside).
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.pods.is_empty()
    }

    /// Adds another change.
    pub fn merge(&mut self, other: Affected) {
        self.namespaces.extend(other.namespaces);
        self.resources.extend(other.resources);
        self.pods.extend(other.pods);
        self.statuses |= other.statuses;
        self.relisted.extend(other.relisted);
    }
}

/// A status condition as the index computes it (sans timestamps).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CondState {
    /// `True` or `False`.
    pub ok: bool,
    /// A CamelCase reason.
    pub reason: &'static str,
    /// For people.
    pub message: String,
}

impl CondState {
    fn yes(reason: &'static str, message: impl Into<String>) -> Self {
        CondState {
            ok: true,
            reason,
            message: message.into(),
        }
    }
    fn no(reason: &'static str, message: impl Into<String>) -> Self {
        CondState {
            ok: false,
            reason,
            message: message.into(),
        }
    }
}

/// Condition reasons, in one place.
pub mod reasons {
    /// Accepted=True.
    pub const ACCEPTED: &str = "Accepted";
    /// Accepted=False: the spec did not deserialize.
    pub const INVALID: &str = "Invalid";
    /// Accepted=False: an older Route (or Breaker) governs the same Service port.
    pub const CONFLICTED: &str = "Conflicted";
    /// Accepted=False: a pod this Policy selects is already selected by as many Policies
    /// that send authorization (rules, a `Deny` default or `dryRun`) as a proxy accepts
    /// (`weft_proxy::authz::MAX_POLICIES`), all older; the proxy would refuse its whole
    /// config, so this Policy is not applied anywhere.
    pub const TOO_MANY_POLICIES: &str = "TooManyPolicies";
    /// Accepted=False: the Service the Route or Breaker governs does not exist (or lacks
    /// the port), so there is nothing to program.
    pub const SERVICE_NOT_FOUND: &str = "ServiceNotFound";
    /// Accepted=False: the Service the Route or Breaker governs is headless
    /// (`clusterIP: None`) or ExternalName. It has no cluster IP, so no proxy has it as a
    /// service: connections to it go to pod addresses (or another name) that no Route or
    /// Breaker is attached to. As in Linkerd, and Gateway API's GEP-1426 for mesh routes.
    pub const UNSUPPORTED_SERVICE: &str = "UnsupportedService";
    /// Accepted=False: every port the Route or Breaker governs is opaque (one of the
    /// proxies' default opaque ports, `appProtocol: tcp`, or listed in
    /// `weft.dev/opaque-ports`). Proxies forward an opaque port's
    /// connections as bytes, with no request to route, split or limit, so neither a Route
    /// nor a Breaker applies there; none is sent for such a port.
    pub const OPAQUE_PORT: &str = "OpaquePort";
    /// ResolvedRefs=True.
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    /// ResolvedRefs=False.
    pub const BACKEND_NOT_FOUND: &str = "BackendNotFound";
    /// Programmed=True.
    pub const PROGRAMMED: &str = "Programmed";
    /// Programmed=False: some proxies have not acknowledged the generation yet.
    pub const PENDING: &str = "Pending";
    /// Programmed=False: no connected proxy needs the resource, so no data plane enforces
    /// it (not a success a user should read as one; no Event: nothing is wrong).
    pub const NO_PROXIES: &str = "NoProxies";
    /// Programmed=False: a proxy rejected the config.
    pub const REJECTED: &str = "Rejected";
    /// Programmed=False: the proxies acknowledged the generation but do not enforce all
    /// of it (they lack a feature it uses); the message names the fields.
    pub const NOT_ENFORCED: &str = "NotEnforced";
    /// Programmed=False: the resource is not accepted, so nothing is programmed.
    pub const NOT_ACCEPTED: &str = "NotAccepted";
}

/// The `Accepted` and `ResolvedRefs` state of one resource at one generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceState {
    /// The object described (`metadata.uid`): one re-created under the same name is
    /// another object, whose generation starts over.
    pub uid: Option<String>,
    /// The generation described.
    pub generation: i64,
    /// Rules in the spec (Routes only).
    pub rule_count: Option<u32>,
    /// `Accepted`.
    pub accepted: CondState,
    /// `ResolvedRefs`.
    pub resolved_refs: CondState,
}

/// The in-memory model of the mesh.
#[derive(Debug)]
pub struct Index {
    trust_domain: String,
    /// The mode of pods no Policy selects ([`Index::with_mesh_mtls`]).
    mesh_mtls: MtlsMode,
    /// How many Policies that send authorization a proxy accepts for its pod
    /// (`weft_proxy::authz::MAX_POLICIES`); smaller only in tests, so that a property test
    /// of a few objects reaches [`reasons::TOO_MANY_POLICIES`].
    max_policies: usize,
    namespaces: HashMap<String, NamespaceModel>,
    services: BTreeMap<ObjectKey, ServiceModel>,
    slices: BTreeMap<ObjectKey, SliceModel>,
    pods: BTreeMap<ObjectKey, PodModel>,
    routes: BTreeMap<ObjectKey, RouteModel>,
    policies: BTreeMap<ObjectKey, PolicyModel>,
    breakers: BTreeMap<ObjectKey, BreakerModel>,
    outbound: BTreeMap<String, NsServices>,
    ns_resources: BTreeMap<String, BTreeSet<ResourceRef>>,
    /// Per namespace, the Policies refused because a pod they select already has as many
    /// authorization policies as a proxy accepts ([`reasons::TOO_MANY_POLICIES`]), each
    /// with that pod. Empty unless a namespace has that many such Policies.
    refused_policies: BTreeMap<String, BTreeMap<ObjectKey, ObjectKey>>,
    /// Cluster addresses claimed by services of more than one namespace, with those
    /// namespaces (stale state only: a cluster IP belongs to one Service). Empty in a
    /// consistent cluster, so views pay nothing for it.
    contested: BTreeMap<String, BTreeSet<String>>,
    /// Which namespaces' services claim each cluster address.
    claims: HashMap<String, BTreeSet<String>>,
    /// Which meshed pods hold each pod address: more than one only in stale state (a
    /// pod gone unseen whose address another pod already has), when no one's is sent.
    pod_addresses: HashMap<IpAddr, BTreeSet<ObjectKey>>,
    /// The pods annotated with the namespaces they see
    /// ([`model::VISIBLE_NAMESPACES_ANNOTATION`]): with those of namespaces annotated so,
    /// the only ones a change to another namespace than theirs can touch
    /// ([`Index::seeing_others`]).
    seeing_pods: BTreeSet<ObjectKey>,
    /// Which valid Policies select which pods, updated by the change that alters it: a
    /// namespace's rebuild and each view read it, where evaluating every Policy against
    /// every pod of the namespace made one change cost pods × Policies.
    selection: selection::Selection,
    /// Per pod, the mTLS mode its Policies give it, computed when first read and
    /// forgotten when the pod's selection, one of its Policies or its namespace's
    /// refusals change: every endpoint's identity reads it at each rebuild of the
    /// namespace, and with namespace-wide Policies a pod has hundreds to combine (and to
    /// look up), which made a rebuild cost endpoints × Policies per pod. A mutex because
    /// identities are read through `&self`; the index's own lock is held anyway.
    policy_modes: Mutex<HashMap<ObjectKey, MtlsMode>>,
    /// The Policies a re-list in progress applied, whose selection it settles once at
    /// its end ([`Index::settle_selection`]), each with whether its target changed (so
    /// that it is evaluated again) or only its spec (so that the pods it selects are
    /// reported). Evaluating each Policy against every pod of its namespace as it was
    /// applied, and merging the pods each one reported, made the first list of 1,000
    /// Policies among 10,000 pods take seconds. A re-list cut short by a panic leaves
    /// them to the next change, which settles them before its rebuild.
    owed_selection: BTreeMap<ObjectKey, bool>,
    version: u64,
    /// Whether a change defers its namespaces' rebuild to the end of the
    /// [`Index::replace`] in progress. Set and reset by [`Deferring`], so that a re-list
    /// cut short by a panic (the index lock recovers from poisoning) does not leave every
    /// later change deferred: unrebuilt and at an unchanged version, which push sessions
    /// would not send.
    deferring: bool,
    /// Namespaces whose rebuild is owed: those a re-list in progress touched, or those a
    /// re-list cut short by a panic left, which the next change rebuilds with its own.
    deferred: BTreeSet<String>,
    /// Panics in the middle of the next [`Index::replace`], after its objects are applied
    /// and before the rebuild, as a bug there would: tests hold what it leaves behind.
    #[cfg(test)]
    panic_mid_replace: bool,
    /// Holds the next [`Index::replace`] at the same point: it sends on the first channel,
    /// then waits on the second, so that tests can hold a re-list in progress (and the
    /// index lock with it) for as long as they need.
    #[cfg(test)]
    pause_mid_replace: Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>,
}

/// [`Index`] while a re-list defers its rebuilds ([`Index::deferring`]); dropping it,
/// even while unwinding from a panic, ends that.
struct Deferring<'a>(&'a mut Index);

impl<'a> Deferring<'a> {
    fn start(index: &'a mut Index) -> Self {
        index.deferring = true;
        Deferring(index)
    }
}

impl Drop for Deferring<'_> {
    fn drop(&mut self) {
        self.0.deferring = false;
    }
}

impl std::ops::Deref for Deferring<'_> {
    type Target = Index;
    fn deref(&self) -> &Index {
        self.0
    }
}

impl std::ops::DerefMut for Deferring<'_> {
    fn deref_mut(&mut self) -> &mut Index {
        self.0
    }
}

/// Which of a namespace's configs a change may have altered, so that its rebuild
/// ([`Index::rebuild`]) computes only those again and keeps the others' `Arc`s
/// untouched: in a namespace of 1,000 Services and 10,000 pods, computing every config
/// again (and comparing each with the one before) was half of a pod's change.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Dirty {
    /// Every config: a Service, Route or Breaker changed (their configs read each other:
    /// backends, conflicts, which Service keeps a cluster address claimed twice), a
    /// re-list went over the namespace, or which Policies are refused changed (every
    /// pod's mTLS mode, so every endpoint's identity, may have).
    All,
    /// Some configs: those of `services` (by name), whose EndpointSlices changed or
    /// which list a pod whose model or mTLS mode changed, and the entries of the
    /// namespace's pods configs ([`pods_config_name`]) at `addresses`: the addresses of
    /// the pods that changed (before and after) and of the endpoints that changed or
    /// name such a pod, the only ones whose entry (its pod, identity, whether a Service
    /// lists it, whether a Service makes it opaque) can have changed.
    Parts {
        /// Services whose configs are computed again.
        services: BTreeSet<String>,
        /// Pod addresses whose pods-config entries are computed again.
        addresses: BTreeSet<IpAddr>,
    },
}

impl Dirty {
    /// Nothing yet.
    fn none() -> Self {
        Dirty::Parts {
            services: BTreeSet::new(),
            addresses: BTreeSet::new(),
        }
    }

    /// Adds what `other` marks.
    fn merge(&mut self, other: Dirty) {
        match (self, other) {
            (Dirty::All, _) => {}
            (this, Dirty::All) => *this = Dirty::All,
            (
                Dirty::Parts {
                    services,
                    addresses,
                },
                Dirty::Parts {
                    services: more_services,
                    addresses: more_addresses,
                },
            ) => {
                services.extend(more_services);
                addresses.extend(more_addresses);
            }
        }
    }

    /// Marks the pods-config entries at `ips`.
    fn with_addresses(mut self, ips: impl IntoIterator<Item = IpAddr>) -> Self {
        if let Dirty::Parts { addresses, .. } = &mut self {
            addresses.extend(ips);
        }
        self
    }

    /// Only the pods-config entries at `ips`: another namespace's pod took or left an
    /// address a pod here holds, which only those entries read (`Index::pod_addresses`).
    fn pods_at(ips: impl IntoIterator<Item = IpAddr>) -> Self {
        Dirty::none().with_addresses(ips)
    }
}

/// How many addresses a change may mark before its namespace's pods configs are computed
/// whole rather than patched: patching looks each kept entry's address up among them.
const PATCHED_ADDRESSES: usize = 32;

/// Whether `address` (`ip:port` or `[ip]:port`, as [`SocketAddr`] writes it) is at one
/// of `ips`.
fn at_any(address: &str, ips: &[String]) -> bool {
    ips.iter()
        .any(|prefix| address.starts_with(prefix.as_str()))
}

/// How [`SocketAddr`] writes `ip` before the port, colon included.
fn address_prefix(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:"),
        IpAddr::V6(v6) => format!("[{v6}]:"),
    }
}

/// The entries of `map` in namespace `ns`, in key order.
fn in_ns<'a, V>(
    map: &'a BTreeMap<ObjectKey, V>,
    ns: &str,
) -> impl Iterator<Item = (&'a ObjectKey, &'a V)> + 'a + use<'a, V> {
    let ns = ns.to_owned();
    map.range(ObjectKey::new(ns.clone(), "")..)
        .take_while(move |(k, _)| k.namespace == ns)
}

impl Index {
    /// An empty index; endpoint identities are SPIFFE IDs in `trust_domain`.
    pub fn new(trust_domain: impl Into<String>) -> Self {
        Index {
            trust_domain: trust_domain.into(),
            mesh_mtls: MtlsMode::Permissive,
            max_policies: weft_proxy::authz::MAX_POLICIES,
            namespaces: HashMap::new(),
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            pods: BTreeMap::new(),
            routes: BTreeMap::new(),
            policies: BTreeMap::new(),
            breakers: BTreeMap::new(),
            outbound: BTreeMap::new(),
            ns_resources: BTreeMap::new(),
            refused_policies: BTreeMap::new(),
            contested: BTreeMap::new(),
            claims: HashMap::new(),
            pod_addresses: HashMap::new(),
            seeing_pods: BTreeSet::new(),
            selection: selection::Selection::default(),
            policy_modes: Mutex::new(HashMap::new()),
            owed_selection: BTreeMap::new(),
            version: 0,
            deferring: false,
            deferred: BTreeSet::new(),
            #[cfg(test)]
            panic_mid_replace: false,
            #[cfg(test)]
            pause_mid_replace: None,
        }
    }

    /// Sets the mesh-wide mTLS mode: that of pods no Policy selects, below namespace-wide
    /// and workload Policies (`Permissive` unless set). Set before anything is applied:
    /// views built earlier keep the old default.
    pub fn with_mesh_mtls(mut self, mode: MtlsMode) -> Self {
        self.mesh_mtls = mode;
        // Modes kept per pod were computed with the old default.
        lock(&mut self.policy_modes).clear();
        self
    }

    /// Refuses Policies beyond `max` per pod instead of the proxy's limit. Set before
    /// anything is applied.
    #[cfg(test)]
    fn with_max_policies(mut self, max: usize) -> Self {
        self.max_policies = max;
        self
    }

    /// The version of the latest change; views carry the version they changed at.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// How many objects of `kind` the index holds.
    pub fn len(&self, kind: Kind) -> usize {
        match kind {
            Kind::Namespace => self.namespaces.len(),
            Kind::Service => self.services.len(),
            Kind::EndpointSlice => self.slices.len(),
            Kind::Pod => self.pods.len(),
            Kind::Route => self.routes.len(),
            Kind::Policy => self.policies.len(),
            Kind::Breaker => self.breakers.len(),
        }
    }

    /// Whether the index holds no object at all.
    pub fn is_empty(&self) -> bool {
        Kind::ALL.iter().all(|k| self.len(*k) == 0)
    }

    /// Adds or replaces one object.
    pub fn apply(&mut self, key: ObjectKey, object: Object) -> Affected {
        let ns = key.namespace.clone();
        let mut statuses = object.kind().is_weft();
        let mut pods = BTreeSet::new();
        // Services, Routes and Breakers feed each other's configs: every one is rebuilt.
        let mut dirty = Dirty::All;
        match object {
            Object::Namespace(m) => {
                // Only visibility shapes proxies' config; the injection label is the
                // webhook's alone.
                let same_visibility = self
                    .namespaces
                    .get(&key.name)
                    .is_some_and(|old| old.visible == m.visible);
                self.namespaces.insert(key.name.clone(), m);
                if same_visibility {
                    return Affected::default();
                }
                pods.extend(in_ns(&self.pods, &key.name).map(|(k, _)| k.clone()));
                return self.finish(std::iter::empty(), pods);
            }
            Object::Service(m) => {
                if self.services.get(&key) == Some(&m) {
                    return Affected::default();
                }
                // A resource's status can change with the Service where no config does (a
                // headless Service its Route governs appears), e.g. in a namespace with
                // no pods, where nothing else would wake the status writer.
                statuses = self.names_service(&key);
                self.services.insert(key.clone(), m);
                self.reselect_service(&key);
                pods.extend(in_ns(&self.pods, &ns).map(|(k, _)| k.clone()));
            }
            Object::EndpointSlice(m) => {
                if self.slices.get(&key) == Some(&m) {
                    return Affected::default();
                }
                // The configs of the Service it belonged to and of the one it belongs to
                // (its `kubernetes.io/service-name` label may have changed).
                // Its endpoints' addresses before and after: whether a Service lists
                // them (or makes them opaque) may have changed in the pods configs.
                let old = self.slices.get(&key);
                let services = old
                    .map(|old| old.service.clone())
                    .into_iter()
                    .chain(Some(m.service.clone()))
                    .collect();
                let addresses = old
                    .into_iter()
                    .chain(Some(&m))
                    .flat_map(|s| &s.endpoints)
                    .flat_map(|e| e.addresses.iter().copied())
                    .collect();
                dirty = Dirty::Parts {
                    services,
                    addresses,
                };
                self.slices.insert(key, m);
            }
            Object::Pod(m) => {
                if self.pods.get(&key) == Some(&m) {
                    return Affected::default();
                }
                let old = self
                    .pods
                    .get(&key)
                    .map(|p| p.ips.clone())
                    .unwrap_or_default();
                let others = self.move_pod_addresses(&key, &old, &m.ips);
                let new_ips = m.ips.clone();
                pods.insert(key.clone());
                if m.visible.is_some() {
                    self.seeing_pods.insert(key.clone());
                } else {
                    self.seeing_pods.remove(&key);
                }
                self.pods.insert(key.clone(), m);
                self.reselect_pod(&key);
                // Its identity (account, ports, mode) is in the configs listing it, and
                // its addresses in the pods configs; nothing else here reads it.
                let moved: Vec<IpAddr> = old.iter().chain(&new_ips).copied().collect();
                let dirty = self
                    .listing(&ns, &pods)
                    .with_addresses(moved.iter().copied());
                return self.finish(
                    std::iter::once((ns, dirty)).chain(
                        others
                            .into_iter()
                            .map(|o| (o, Dirty::pods_at(moved.iter().copied()))),
                    ),
                    pods,
                );
            }
            Object::Route(m) => {
                if self.routes.get(&key) == Some(&m) {
                    return Affected::default();
                }
                self.routes.insert(key, m);
            }
            Object::Policy(m) => {
                if self.policies.get(&key) == Some(&m) {
                    return Affected::default();
                }
                // Which pods a Policy selects reads its target alone (with the pods and
                // Services, which did not change with it): a valid Policy whose target
                // stayed selects the pods it did. Evaluating it against every pod of the
                // namespace again made a re-list of a thousand changed Policies among
                // 10,000 pods hold the index lock for seconds more.
                let same_target = matches!(
                    (self.policies.get(&key), &m),
                    (Some((_, Parsed::Valid(old))), (_, Parsed::Valid(new))) if old.target == new.target
                );
                self.policies.insert(key.clone(), m);
                if self.deferring {
                    // The re-list selects, and reports the pods, once for all its
                    // Policies; it rebuilds the namespace whole anyway.
                    *self.owed_selection.entry(key).or_default() |= !same_target;
                    return Affected {
                        statuses,
                        ..self.finish(Some((ns, Dirty::All)), pods)
                    };
                }
                // Only the pods it selected or selects now see it in their views; should
                // refusing it (or its mTLS mode in their identities) change more, the
                // namespace's rebuild reports more: every pod of it (a refusal), the
                // namespace (an identity).
                pods = if same_target {
                    let kept: BTreeSet<ObjectKey> = self.selection.pods(&key).cloned().collect();
                    // Its spec changed, so each of its pods may run another mode.
                    self.forget_policy_modes(&kept);
                    kept
                } else {
                    self.reselect_policy(&key)
                };
                // A Policy reaches configs only through the modes of the pods it
                // selected or selects (their identities), or by being refused, which
                // the rebuild finds and then rebuilds every config.
                dirty = self.listing(&ns, &pods);
            }
            Object::Breaker(m) => {
                if self.breakers.get(&key) == Some(&m) {
                    return Affected::default();
                }
                self.breakers.insert(key, m);
            }
        }
        Affected {
            statuses,
            ..self.finish(Some((ns, dirty)), pods)
        }
    }

    /// Removes one object.
    pub fn delete(&mut self, kind: Kind, key: &ObjectKey) -> Affected {
        let ns = key.namespace.clone();
        let mut pods = BTreeSet::new();
        // As in `apply`: Services, Routes and Breakers rebuild every config.
        let mut dirty = Dirty::All;
        let removed = match kind {
            Kind::Namespace => {
                if self.namespaces.remove(&key.name).is_none() {
                    return Affected::default();
                }
                pods.extend(in_ns(&self.pods, &key.name).map(|(k, _)| k.clone()));
                return self.finish(std::iter::empty(), pods);
            }
            Kind::Service => {
                pods.extend(in_ns(&self.pods, &ns).map(|(k, _)| k.clone()));
                let removed = self.services.remove(key).is_some();
                if removed {
                    self.reselect_service(key);
                }
                removed
            }
            Kind::EndpointSlice => match self.slices.remove(key) {
                Some(old) => {
                    dirty = Dirty::Parts {
                        addresses: old
                            .endpoints
                            .iter()
                            .flat_map(|e| e.addresses.iter().copied())
                            .collect(),
                        services: BTreeSet::from([old.service]),
                    };
                    true
                }
                None => false,
            },
            Kind::Pod => {
                let Some(removed) = self.pods.remove(key) else {
                    return Affected::default();
                };
                self.seeing_pods.remove(key);
                let others = self.move_pod_addresses(key, &removed.ips, &[]);
                self.selection.remove_pod(key);
                self.forget_policy_modes([key]);
                pods.insert(key.clone());
                // Endpoints that name it lose its identity.
                let dirty = self
                    .listing(&ns, &pods)
                    .with_addresses(removed.ips.iter().copied());
                return self.finish(
                    std::iter::once((ns, dirty)).chain(
                        others
                            .into_iter()
                            .map(|o| (o, Dirty::pods_at(removed.ips.iter().copied()))),
                    ),
                    pods,
                );
            }
            Kind::Route => self.routes.remove(key).is_some(),
            Kind::Policy => {
                let removed = self.policies.remove(key).is_some();
                // Gone, it selects nothing: nothing is owed for it but what it selected.
                self.owed_selection.remove(key);
                pods = self.selection.remove_policy(key);
                self.forget_policy_modes(&pods);
                dirty = self.listing(&ns, &pods);
                removed
            }
            Kind::Breaker => self.breakers.remove(key).is_some(),
        };
        if !removed {
            return Affected::default();
        }
        // As in `apply`: the statuses of the resources that name a Service read it.
        let statuses = kind.is_weft() || (kind == Kind::Service && self.names_service(key));
        Affected {
            statuses,
            ..self.finish(Some((ns, dirty)), pods)
        }
    }

    /// Replaces every object of `kind` with `objects` (after a watch's re-list): objects
    /// missing from the list are deleted, the rest applied. When `kind` feeds the Policy
    /// part of views, the namespaces of the objects listed or deleted are rebuilt even
    /// where nothing changed (their outbound services, Routes and Breakers, refused
    /// Policies, mTLS modes), and reported in [`Affected::relisted`], so that their
    /// subscribers' views are computed again from the index.
    ///
    /// Not repaired: which Policies select which pods ([`selection`]). Only a change to
    /// a Policy's target, to a pod or to a Service Policies target re-selects; evaluating
    /// every Policy against every pod again on each re-list would cost ~10 million
    /// selector matches at 10,000 pods and 1,000 Policies in a namespace.
    pub fn replace(&mut self, kind: Kind, objects: Vec<(ObjectKey, Object)>) -> Affected {
        let keep: BTreeSet<&ObjectKey> = objects.iter().map(|(k, _)| k).collect();
        let existing: Vec<ObjectKey> = match kind {
            Kind::Namespace => self
                .namespaces
                .keys()
                .map(|n| ObjectKey::new("", n.clone()))
                .collect(),
            Kind::Service => self.services.keys().cloned().collect(),
            Kind::EndpointSlice => self.slices.keys().cloned().collect(),
            Kind::Pod => self.pods.keys().cloned().collect(),
            Kind::Route => self.routes.keys().cloned().collect(),
            Kind::Policy => self.policies.keys().cloned().collect(),
            Kind::Breaker => self.breakers.keys().cloned().collect(),
        };
        let mut relisted: BTreeSet<String> = BTreeSet::new();
        if feeds_policy_part(kind) {
            for key in existing.iter().chain(keep.iter().copied()) {
                if !relisted.contains(&key.namespace) {
                    relisted.insert(key.namespace.clone());
                }
            }
        }
        let stale: Vec<ObjectKey> = existing.into_iter().filter(|k| !keep.contains(k)).collect();
        // Apply everything first and rebuild each touched namespace once: a re-list of
        // thousands of objects must not rebuild a namespace per object. Namespaces owed
        // by a re-list cut short are kept, not overwritten, and rebuilt here too.
        let mut affected = Affected::default();
        {
            let mut index = Deferring::start(self);
            for key in stale {
                affected.merge(index.delete(kind, &key));
            }
            for (key, object) in objects {
                if object.kind() == kind {
                    affected.merge(index.apply(key, object));
                }
            }
            #[cfg(test)]
            if std::mem::take(&mut index.panic_mid_replace) {
                panic!("cut short in the middle of a re-list");
            }
            #[cfg(test)]
            if let Some((entered, release)) = index.pause_mid_replace.take() {
                // A test that is gone (its end of either channel dropped) holds nothing.
                let _ = entered.send(());
                let _ = release.recv();
            }
        }
        // Which pods the Policies listed select, once for them all, before the rebuild
        // reads it (refusals, modes).
        let (selected, settled) = self.settle_selection();
        affected.pods.extend(selected);
        let mut owed = std::mem::take(&mut self.deferred);
        owed.extend(settled);
        // The relisted namespaces are rebuilt even where no object changed: an object
        // found unchanged returns early from `apply`, so without this a re-list would
        // rebuild views from the namespace's cached outbound services, resources,
        // refusals and mTLS modes, whatever a change cut short by a panic left of them.
        // About 0.5 s at 10,000 pods and 1,000 Policies in one namespace, next to some
        // 2 s for computing its views again (`policy_scale`).
        // One pass over the kept modes, not one per namespace: a re-list may go over
        // hundreds of namespaces.
        lock(&mut self.policy_modes).retain(|pod, _| !relisted.contains(&pod.namespace));
        owed.extend(relisted.iter().cloned());
        for ns in owed {
            self.rebuild(&ns, Dirty::All, &mut affected);
        }
        if !affected.is_empty() || !relisted.is_empty() {
            self.version += 1;
        }
        affected.relisted = relisted;
        affected
    }

    /// Records that pod `key` holds `new` addresses instead of `old`; returns the other
    /// namespaces whose pods share any of them, whose configs change with it.
    fn move_pod_addresses(
        &mut self,
        key: &ObjectKey,
        old: &[IpAddr],
        new: &[IpAddr],
    ) -> BTreeSet<String> {
        let mut touched = BTreeSet::new();
        for ip in old.iter().filter(|ip| !new.contains(ip)) {
            if let Some(holders) = self.pod_addresses.get_mut(ip) {
                holders.remove(key);
                touched.extend(holders.iter().map(|k| k.namespace.clone()));
                if holders.is_empty() {
                    self.pod_addresses.remove(ip);
                }
            }
        }
        for ip in new.iter().filter(|ip| !old.contains(ip)) {
            let holders = self.pod_addresses.entry(*ip).or_default();
            if let Some(other) = holders.iter().next() {
                tracing::warn!(
                    address = %ip,
                    pod = %key,
                    holder = %other,
                    "two meshed pods hold one address; neither is sent by it until one goes"
                );
            }
            touched.extend(holders.iter().map(|k| k.namespace.clone()));
            holders.insert(key.clone());
        }
        touched.remove(&key.namespace);
        touched
    }

    /// What a change to `pods` (of `ns`: their models, or the Policies that decide their
    /// mTLS modes) may alter: the configs of the Services of `ns` that list one of them
    /// as an endpoint's pod, whose identity there the pod's model and mode decide, and
    /// the pods-config entries at those endpoints' addresses (whether a Service lists
    /// them with an identity) and at the pods' own (their identities, ports). The
    /// caller adds the addresses a pod held before. While a re-list defers its
    /// rebuilds, which rebuild every config, it looks nothing up.
    fn listing(&self, ns: &str, pods: &BTreeSet<ObjectKey>) -> Dirty {
        if self.deferring {
            return Dirty::All;
        }
        let names: HashSet<&str> = pods
            .iter()
            .filter(|k| k.namespace == ns)
            .map(|k| k.name.as_str())
            .collect();
        let mut services = BTreeSet::new();
        let mut addresses: BTreeSet<IpAddr> = pods
            .iter()
            .filter_map(|k| self.pods.get(k))
            .flat_map(|p| p.ips.iter().copied())
            .collect();
        if names.is_empty() {
            return Dirty::Parts {
                services,
                addresses,
            };
        }
        for (_, slice) in in_ns(&self.slices, ns) {
            for e in &slice.endpoints {
                if e.pod.as_deref().is_some_and(|p| names.contains(p)) {
                    if !services.contains(&slice.service) {
                        services.insert(slice.service.clone());
                    }
                    addresses.extend(e.addresses.iter().copied());
                }
            }
        }
        Dirty::Parts {
            services,
            addresses,
        }
    }

    fn finish(
        &mut self,
        namespaces: impl IntoIterator<Item = (String, Dirty)>,
        pods: BTreeSet<ObjectKey>,
    ) -> Affected {
        let mut affected = Affected {
            pods,
            ..Affected::default()
        };
        if self.deferring {
            // Rebuilt whole at the end of the re-list.
            self.deferred
                .extend(namespaces.into_iter().map(|(ns, _)| ns));
            return affected;
        }
        // With those a re-list cut short left owed (normally none), rebuilt whole: what
        // changed in them is not known. So is the selection of the Policies it applied.
        let (selected, settled) = self.settle_selection();
        affected.pods.extend(selected);
        let mut owed: BTreeMap<String, Dirty> = std::mem::take(&mut self.deferred)
            .into_iter()
            .chain(settled)
            .map(|ns| (ns, Dirty::All))
            .collect();
        for (ns, dirty) in namespaces {
            match owed.entry(ns) {
                std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().merge(dirty),
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(dirty);
                }
            }
        }
        for (ns, dirty) in owed {
            self.rebuild(&ns, dirty, &mut affected);
        }
        if !affected.is_empty() {
            self.version += 1;
        }
        affected
    }

    /// Recomputes one namespace's outbound configs and resources, and which of its
    /// Policies are refused, and adds to `affected` what that changed: the namespace when
    /// a config or resource did, each of its pods when the refusals did (a refused Policy
    /// leaves every pod's Policy part, which [`Index::refresh_view`] keeps unless the pod
    /// is reported). Unchanged configs keep their `Arc`, so comparisons downstream are
    /// cheap; of the Service configs, only those `dirty` marks are computed again (all of
    /// them when the refusals changed).
    fn rebuild(&mut self, ns: &str, dirty: Dirty, affected: &mut Affected) {
        // Which Policies are refused first: each endpoint's identity below (its mTLS mode)
        // and every view read the Policies that are not, so with the refusal set of before
        // this change a Policy refused by it (or accepted again) would still count (or
        // not) until the namespace's next rebuild. It reads only Policies and selection.
        let refused = self.too_many_policies(ns);
        let refused_changed = self.refused_policies.get(ns).unwrap_or(&BTreeMap::new()) != &refused;
        if refused.is_empty() {
            self.refused_policies.remove(ns);
        } else {
            self.refused_policies.insert(ns.to_owned(), refused);
        }
        if refused_changed {
            // A refused Policy counts in no pod's mode, so every mode of `ns` may change.
            self.forget_namespace_modes(ns);
        }
        let whole = match &dirty {
            Dirty::All => true,
            Dirty::Parts { addresses, .. } => addresses.len() > PATCHED_ADDRESSES,
        };
        if whole || refused_changed {
            // Computed whole (or nearly), the configs read every endpoint's mode, and
            // the change may have forgotten many (a namespace-wide Policy's).
            self.fill_policy_modes(ns);
        }
        let old = self.outbound.get(ns).cloned();
        let patched = match (&dirty, &old) {
            (
                Dirty::Parts {
                    services,
                    addresses,
                },
                Some(old),
            ) if !refused_changed => self.patched_configs(ns, old, services, addresses),
            _ => None,
        };
        let patched_only = patched.is_some();
        let fresh = match patched {
            Some(fresh) => fresh,
            None => self.namespace_configs(ns, old.as_ref()),
        };
        // Tests hold every patched map against one computed whole, so that a change
        // whose `Dirty` misses a config it altered fails there rather than leaving a
        // stale endpoint or identity in every view of the namespace.
        #[cfg(test)]
        if patched_only {
            let whole = self.namespace_configs(ns, None);
            let flat = |m: &BTreeMap<String, Arc<ServiceConfig>>| -> Vec<(String, ServiceConfig)> {
                m.iter().map(|(k, v)| (k.clone(), (**v).clone())).collect()
            };
            assert_eq!(
                flat(&fresh),
                flat(&whole),
                "a partial rebuild of {ns} ({dirty:?}) is not a whole one"
            );
        }
        let mut resources = BTreeSet::new();
        for (key, (meta, spec)) in in_ns(&self.routes, ns) {
            if let Parsed::Valid(spec) = spec
                && self.governs(ns, &spec.service)
                && conflict::conflict(&self.routes, key, &|s| self.governs(ns, s)).is_none()
            {
                resources.insert(resource_ref(
                    "Route",
                    key,
                    meta.generation,
                    requires::route(spec),
                ));
            }
        }
        for (key, (meta, spec)) in in_ns(&self.breakers, ns) {
            if let Parsed::Valid(spec) = spec
                && self.governs(ns, &spec.service)
                && conflict::conflict(&self.breakers, key, &|s| self.governs(ns, s)).is_none()
            {
                resources.insert(resource_ref(
                    "Breaker",
                    key,
                    meta.generation,
                    requires::breaker(spec),
                ));
            }
        }
        // Every config equal to the one before is that one (its `Arc`), so pointers
        // tell which changed: comparing each config's content again cost a pass over
        // every endpoint of the namespace.
        let services_changed = match &old {
            Some(o) => !same_configs(o, &fresh),
            None => !fresh.is_empty(),
        };
        let resources_changed = match self.ns_resources.get(ns) {
            Some(r) => *r != resources,
            None => !resources.is_empty(),
        };
        // A patched map's cluster addresses are those it had: they come from the
        // Services alone, and a Service's change rebuilds every config.
        if services_changed && !patched_only {
            self.update_claims(ns, old.as_deref(), &fresh);
        }
        if fresh.is_empty() {
            self.outbound.remove(ns);
        } else if services_changed {
            // Unchanged, the namespace keeps its map, so views compare it by pointer.
            self.outbound.insert(ns.to_owned(), Arc::new(fresh));
        }
        if resources.is_empty() {
            self.ns_resources.remove(ns);
        } else {
            self.ns_resources.insert(ns.to_owned(), resources);
        }
        if services_changed || resources_changed {
            affected.namespaces.insert(ns.to_owned());
        }
        if resources_changed {
            affected.resources.insert(ns.to_owned());
        }
        if refused_changed {
            // Refusing a Policy (or accepting one again) changes the Policy part of every
            // pod it selects, all in `ns`: as their own inputs, not their namespace's
            // services, so that their views recompute it.
            affected
                .pods
                .extend(in_ns(&self.pods, ns).map(|(k, _)| k.clone()));
        }
    }

    /// Every config of `ns`: each Service port's, then the pods configs. A config equal to
    /// the one of `old` under its name is that one (its `Arc`).
    fn namespace_configs(
        &self,
        ns: &str,
        old: Option<&NsServices>,
    ) -> BTreeMap<String, Arc<ServiceConfig>> {
        let mut fresh: BTreeMap<String, Arc<ServiceConfig>> = BTreeMap::new();
        // A proxy rejects a whole config in which two services claim one address, so a
        // cluster IP listed by two Services (stale state, or a Service recreated before
        // the old one's deletion was seen) stays with the first by name.
        let mut claimed: HashMap<String, String> = HashMap::new();
        let slices = self.slices_by_service(ns);
        for (key, svc) in in_ns(&self.services, ns) {
            let slices = slices.get(key.name.as_str()).map_or(&[][..], Vec::as_slice);
            for mut config in self.service_configs(key, svc, slices) {
                config.addresses.retain(|a| match claimed.get(a) {
                    Some(owner) => {
                        tracing::warn!(
                            service = %config.name,
                            address = %a,
                            claimed_by = %owner,
                            "cluster address claimed by two services; left with the first"
                        );
                        false
                    }
                    None => {
                        claimed.insert(a.clone(), config.name.clone());
                        true
                    }
                });
                let config = reuse(old, config);
                fresh.insert(config.name.clone(), config);
            }
        }
        for config in self.pods_configs(ns, &fresh) {
            let config = reuse(old, config);
            fresh.insert(config.name.clone(), config);
        }
        fresh
    }

    /// `old`, the configs of `ns`, with those of `services` and the pods configs computed
    /// again, the others kept as they are; `None` when that cannot give what
    /// [`Index::namespace_configs`] would, and the namespace must be rebuilt whole.
    ///
    /// Only a Service's change moves its configs' cluster addresses, or which Service
    /// keeps an address two claim, and it rebuilds every config: so a config computed
    /// again here keeps the addresses it had (as its Service's first config ever, it
    /// had none to keep, and the namespace is rebuilt whole). The pods configs read every
    /// Service's endpoints, so they come after.
    fn patched_configs(
        &self,
        ns: &str,
        old: &NsServices,
        services: &BTreeSet<String>,
        addresses: &BTreeSet<IpAddr>,
    ) -> Option<BTreeMap<String, Arc<ServiceConfig>>> {
        let mut fresh: BTreeMap<String, Arc<ServiceConfig>> = (**old).clone();
        for protocol in [Protocol::Detect, Protocol::Opaque] {
            fresh.remove(&pods_config_name(ns, protocol));
        }
        let slices = if services.is_empty() {
            HashMap::new()
        } else {
            self.slices_by_service(ns)
        };
        for name in services {
            let key = ObjectKey::new(ns, name.clone());
            // A slice may name a Service that does not exist: it has no configs.
            let Some(svc) = self.services.get(&key) else {
                continue;
            };
            for port in &svc.ports {
                fresh.remove(&config_name(&key, port.port));
            }
            let slices = slices.get(name.as_str()).map_or(&[][..], Vec::as_slice);
            for mut config in self.service_configs(&key, svc, slices) {
                match old.get(&config.name) {
                    Some(prev) => config.addresses.clone_from(&prev.addresses),
                    None if config.addresses.is_empty() => {}
                    None => return None,
                }
                let config = reuse(Some(old), config);
                fresh.insert(config.name.clone(), config);
            }
        }
        let pods = if addresses.len() > PATCHED_ADDRESSES {
            self.pods_configs(ns, &fresh)
        } else {
            self.patched_pods_configs(ns, old, &fresh, addresses)
        };
        for config in pods {
            let config = reuse(Some(old), config);
            fresh.insert(config.name.clone(), config);
        }
        Some(fresh)
    }

    /// The Policies of `ns` that a proxy could not take: oldest first (creation time, then
    /// name), each Policy that sends authorization is accepted unless a pod it selects
    /// already has as many accepted ones as a proxy takes; each refused one with that pod.
    fn too_many_policies(&self, ns: &str) -> BTreeMap<ObjectKey, ObjectKey> {
        let max = self.max_policies;
        let mut sending: Vec<(&ObjectKey, &model::ResourceMeta, &weft_crds::PolicySpec)> =
            in_ns(&self.policies, ns)
                .filter_map(|(k, (meta, spec))| match spec {
                    Parsed::Valid(p) if sends_authorization(p) => Some((k, meta, p)),
                    _ => None,
                })
                .collect();
        let mut refused = BTreeMap::new();
        if sending.len() <= max {
            return refused;
        }
        sending.sort_by(|a, b| conflict::age_order((a.0, a.1), (b.0, b.1)));
        let mut counts: HashMap<&ObjectKey, usize> = HashMap::new();
        for (key, _, _) in sending {
            let pods: Vec<&ObjectKey> = self.selection.pods(key).collect();
            if let Some(full) = pods
                .iter()
                .find(|p| counts.get(*p).is_some_and(|n| *n >= max))
            {
                refused.insert(key.clone(), (*full).clone());
                continue;
            }
            for p in pods {
                *counts.entry(p).or_default() += 1;
            }
        }
        refused
    }

    /// Records which cluster addresses namespace `ns` claims now.
    fn update_claims(
        &mut self,
        ns: &str,
        old: Option<&BTreeMap<String, Arc<ServiceConfig>>>,
        fresh: &BTreeMap<String, Arc<ServiceConfig>>,
    ) {
        let addresses = |m: Option<&BTreeMap<String, Arc<ServiceConfig>>>| -> BTreeSet<String> {
            m.into_iter()
                .flat_map(|m| m.values())
                .flat_map(|c| c.addresses.iter().cloned())
                .collect()
        };
        let (before, after) = (addresses(old), addresses(Some(fresh)));
        for a in before.symmetric_difference(&after) {
            let owners = self.claims.entry(a.clone()).or_default();
            if after.contains(a) {
                owners.insert(ns.to_owned());
            } else {
                owners.remove(ns);
            }
            match owners.len() {
                0 => {
                    self.claims.remove(a);
                    self.contested.remove(a);
                }
                1 => {
                    self.contested.remove(a);
                }
                _ => {
                    tracing::warn!(address = %a, namespaces = ?owners, "cluster address claimed in two namespaces; proxies that see both get it for the first");
                    self.contested.insert(a.clone(), owners.clone());
                }
            }
        }
    }

    /// Leaves each contested address (see [`Index::contested`]) with the first of the
    /// view's namespaces that claims it, so that the proxy accepts the config.
    fn settle_contested(&self, services: &mut ServiceSet) {
        let mut drop: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (address, owners) in &self.contested {
            let mut seen = owners.iter().filter(|ns| services.namespace(ns).is_some());
            seen.next();
            for ns in seen {
                drop.entry(ns.as_str())
                    .or_default()
                    .insert(address.as_str());
            }
        }
        for (ns, addresses) in drop {
            let Some(map) = services.namespace(ns) else {
                continue;
            };
            let settled: BTreeMap<String, Arc<ServiceConfig>> = map
                .iter()
                .map(|(name, c)| {
                    if c.addresses.iter().any(|a| addresses.contains(a.as_str())) {
                        let mut c = (**c).clone();
                        c.addresses.retain(|a| !addresses.contains(a.as_str()));
                        (name.clone(), Arc::new(c))
                    } else {
                        (name.clone(), c.clone())
                    }
                })
                .collect();
            services.insert_namespace(ns, &Arc::new(settled));
        }
    }

    /// The older resource of the same kind that `key` conflicts with (a Route or Breaker
    /// governing the same Service port), if any; see [`conflict`].
    pub fn conflict(&self, kind: Kind, key: &ObjectKey) -> Option<ObjectKey> {
        let ns = key.namespace.as_str();
        match kind {
            Kind::Route => conflict::conflict(&self.routes, key, &|s| self.governs(ns, s)),
            Kind::Breaker => conflict::conflict(&self.breakers, key, &|s| self.governs(ns, s)),
            _ => None,
        }
    }

    /// The newer resources of the same kind that lose to `key`.
    pub fn losers(&self, kind: Kind, key: &ObjectKey) -> Vec<ObjectKey> {
        let ns = key.namespace.as_str();
        match kind {
            Kind::Route => conflict::losers(&self.routes, key, &|s| self.governs(ns, s)),
            Kind::Breaker => conflict::losers(&self.breakers, key, &|s| self.governs(ns, s)),
            _ => Vec::new(),
        }
    }

    /// Whether a Route or Breaker governing `service` in `ns` governs anything (see
    /// [`Index::governed_problem`]).
    fn governs(&self, ns: &str, service: &ServiceRef) -> bool {
        self.governed_problem(ns, service, Kind::Route).is_none()
    }

    /// Why a Route or Breaker (`kind`) governing `service` in `ns` governs nothing, as its
    /// `Accepted=False` condition, if it does not: the Service (or its port) does not
    /// exist, or it has no cluster IP (headless, ExternalName), so that no proxy has a
    /// service config for it to attach to ([`Index::service_configs`]).
    fn governed_problem(&self, ns: &str, service: &ServiceRef, kind: Kind) -> Option<CondState> {
        let kind_name = kind.as_str();
        if let Some(missing) = self
            .missing_services(ns, &[(service.name.clone(), service.port)])
            .into_iter()
            .next()
        {
            return Some(CondState::no(
                reasons::SERVICE_NOT_FOUND,
                format!("{missing}: there is nothing for this {kind_name} to govern"),
            ));
        }
        let svc = self
            .services
            .get(&ObjectKey::new(ns, service.name.clone()))?;
        if svc.cluster_ips.is_empty() {
            return Some(CondState::no(
                reasons::UNSUPPORTED_SERVICE,
                format!(
                    "Service {ns}/{} is headless (clusterIP: None) or ExternalName: it has no cluster IP, so clients connect to pod addresses (or another name) directly and no proxy applies a {kind_name} to it; give the Service a cluster IP, or point the {kind_name} at one that has one",
                    service.name
                ),
            ));
        }
        let opaque = self.opaque_ports(ns, service);
        let governed = svc
            .ports
            .iter()
            .filter(|p| service.port.is_none_or(|port| port == p.port))
            .count();
        if !opaque.is_empty() && opaque.len() == governed {
            return Some(CondState::no(
                reasons::OPAQUE_PORT,
                format!(
                    "Service {ns}/{} {} {} opaque (a port proxies treat as opaque by default, appProtocol tcp or weft.dev/opaque, or the weft.dev/opaque-ports annotation): proxies forward its connections as bytes, with no request to route or limit, so no {kind_name} applies there",
                    service.name,
                    ports_phrase(&opaque),
                    if opaque.len() == 1 { "is" } else { "are" },
                ),
            ));
        }
        None
    }

    /// The opaque ports among those a Route or Breaker governing `service` governs: no
    /// Route or Breaker is sent for them ([`Index::service_configs`]).
    fn opaque_ports(&self, ns: &str, service: &ServiceRef) -> Vec<u16> {
        self.services
            .get(&ObjectKey::new(ns, service.name.clone()))
            .map(|svc| {
                svc.ports
                    .iter()
                    .filter(|p| p.opaque && service.port.is_none_or(|port| port == p.port))
                    .map(|p| p.port)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The config name of Service `name`'s `port` in `ns`, when proxies that see `ns` have
    /// it (the Service exists with that port and has cluster IPs).
    fn service_port_config(&self, ns: &str, name: &str, port: u16) -> Option<String> {
        let key = ObjectKey::new(ns, name);
        let svc = self.services.get(&key)?;
        (!svc.cluster_ips.is_empty() && svc.ports.iter().any(|p| p.port == port))
            .then(|| config_name(&key, port))
    }

    /// The identity clients expect of an endpoint's pod at `port` (see
    /// [`Index::pod_identity`]); `None` also for an endpoint of no meshed pod.
    fn endpoint_identity(&self, ns: &str, pod: Option<&String>, port: u16) -> Option<String> {
        // One key and one lookup per endpoint: a rebuild asks this of each of its
        // namespace's endpoints and pods (20,000 at 10,000 pods).
        let key = ObjectKey::new(ns, pod?.clone());
        let model = self.pods.get(&key)?;
        self.pod_identity(&key, model, port)
    }

    /// The identity clients expect of meshed pod `key` at `port`, or `None` when no
    /// client may originate mutual TLS there: the pod's redirect skips `port` (no proxy
    /// answers), or its mTLS mode ([`compile::mtls`]: its Policies', else the mesh
    /// default) is `Disabled`.
    fn pod_identity(&self, key: &ObjectKey, pod: &PodModel, port: u16) -> Option<String> {
        if !pod.intercepts(port) || self.policy_mode(key) == MtlsMode::Disabled {
            return None;
        }
        Some(format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, key.namespace, pod.service_account
        ))
    }

    /// The EndpointSlices of `ns` by the Service they belong to, each Service's in the
    /// order of their keys: gathered once per rebuild, since looking each Service's up
    /// among all of the namespace's made a rebuild cost Services × slices (a million
    /// comparisons at 1,000 Services).
    fn slices_by_service(&self, ns: &str) -> HashMap<&str, Vec<&SliceModel>> {
        let mut by_service: HashMap<&str, Vec<&SliceModel>> = HashMap::new();
        for (_, slice) in in_ns(&self.slices, ns) {
            by_service
                .entry(slice.service.as_str())
                .or_default()
                .push(slice);
        }
        by_service
    }

    /// The endpoints of one Service port, by address, from the Service's `slices`: the
    /// ready ones, or with `all` those not ready and terminating too.
    fn endpoints(
        &self,
        ns: &str,
        service: &str,
        port: u16,
        all: bool,
        slices: &[&SliceModel],
    ) -> BTreeMap<String, EndpointConfig> {
        let mut out = BTreeMap::new();
        let key = ObjectKey::new(ns, service);
        let Some(svc) = self.services.get(&key) else {
            return out;
        };
        let Some(sp) = svc.ports.iter().find(|p| p.port == port) else {
            return out;
        };
        for slice in slices {
            let Some((_, target)) = slice.ports.iter().find(|(name, _)| *name == sp.name) else {
                continue;
            };
            for ep in slice.endpoints.iter().filter(|e| all || e.ready) {
                for ip in &ep.addresses {
                    let address = SocketAddr::new(*ip, *target).to_string();
                    out.insert(
                        address.clone(),
                        EndpointConfig {
                            address,
                            weight: None,
                            labels: ep
                                .zone
                                .iter()
                                .map(|z| ("zone".to_owned(), z.clone()))
                                .collect(),
                            identity: self.endpoint_identity(ns, ep.pod.as_ref(), *target),
                            unknown: BTreeMap::new(),
                        },
                    );
                }
            }
        }
        out
    }

    /// The configs of Service `key`'s ports, its endpoints from `slices` (its
    /// EndpointSlices).
    fn service_configs(
        &self,
        key: &ObjectKey,
        svc: &ServiceModel,
        slices: &[&SliceModel],
    ) -> Vec<ServiceConfig> {
        if svc.cluster_ips.is_empty() {
            return self.headless_configs(key, svc, slices);
        }
        let ns = key.namespace.as_str();
        let applies: conflict::Applies<'_> = &|s| self.governs(ns, s);
        svc.ports
            .iter()
            .map(|p| {
                // An opaque port's connections are forwarded as bytes: the proxy applies
                // no Route or Breaker there, so none is sent (and status says so).
                let route = conflict::winner(&self.routes, ns, &key.name, p.port, applies)
                    .filter(|_| !p.opaque)
                    .map(|(rk, r)| {
                        compile::route(rk, r, p.port, |name, port| {
                            self.service_port_config(ns, name, port)
                        })
                    });
                let breaker = conflict::winner(&self.breakers, ns, &key.name, p.port, applies)
                    .filter(|_| !p.opaque)
                    .map(|(bk, b)| compile::breaker(bk, b));
                ServiceConfig {
                    name: config_name(key, p.port),
                    addresses: svc
                        .cluster_ips
                        .iter()
                        .map(|ip| SocketAddr::new(*ip, p.port).to_string())
                        .collect(),
                    protocol: p.protocol(),
                    // A Route's split is the proxy's weighted backend stage, before
                    // balancing, so the endpoints stay the Service's own and latency-aware.
                    balancer: Balancer::default(),
                    // A Route's timeouts live in its rules.
                    timeout: None,
                    connect_timeout: None,
                    endpoints: self
                        .endpoints(ns, &key.name, p.port, false, slices)
                        .into_values()
                        .collect(),
                    route,
                    // Rules carry their own budgets; the proxy's default covers the rest.
                    retry_budget: None,
                    breaker,
                    unknown: BTreeMap::new(),
                }
            })
            .collect()
    }

    /// The configs of a Service without cluster IPs (headless): no addresses, and only its
    /// meshed endpoints. Clients reach such pods by their own addresses (a StatefulSet's
    /// peers, a headless name's DNS answers); listing them lets a proxy originate mutual
    /// TLS there, as to a cluster IP's endpoints. No Route or Breaker applies (status says
    /// `UnsupportedService`); a Service with no ports gives no address to key them by.
    fn headless_configs(
        &self,
        key: &ObjectKey,
        svc: &ServiceModel,
        slices: &[&SliceModel],
    ) -> Vec<ServiceConfig> {
        let ns = key.namespace.as_str();
        svc.ports
            .iter()
            .filter_map(|p| {
                // Not ready or terminating too: a pod's identity does not depend on its
                // readiness, and StatefulSet peers dial each other while bootstrapping or
                // draining, when a Strict peer would refuse their plain text.
                let endpoints: Vec<EndpointConfig> = self
                    .endpoints(ns, &key.name, p.port, true, slices)
                    .into_values()
                    .filter(|e| e.identity.is_some())
                    .collect();
                address_less(config_name(key, p.port), p.protocol(), endpoints)
            })
            .collect()
    }

    /// The meshed pods of `ns` at the ports they declare and no Service of `configs`
    /// lists, as address-less configs ([`pods_config_name`]: one for the ports their
    /// proxies detect, one for those they take as opaque): a client's proxy finds them by
    /// address, as a headless Service's pods, and originates mutual TLS, so a pod dialled
    /// straight at its address (a Job's workers, a driver and its executors) is reached as
    /// a Strict pod requires. An address two meshed pods hold, in any namespaces (one of
    /// them stale), is left out at every port: which identity it has is not known.
    fn pods_configs(
        &self,
        ns: &str,
        configs: &BTreeMap<String, Arc<ServiceConfig>>,
    ) -> Vec<ServiceConfig> {
        let listed: HashSet<&str> = configs
            .values()
            .flat_map(|c| &c.endpoints)
            .filter(|e| e.identity.is_some())
            .map(|e| e.address.as_str())
            .collect();
        // A port that a Service declares opaque stays opaque while that Service does not
        // list the pod (not ready): a server-speaks-first protocol must not wait out
        // detection by turns.
        let service_opaque = self.service_opaque(ns, |_| true);
        let mut found: BTreeMap<String, (bool, EndpointConfig)> = BTreeMap::new();
        for (key, pod) in in_ns(&self.pods, ns) {
            self.pod_entries(
                key,
                pod,
                |_| true,
                &|a| listed.contains(a),
                &service_opaque,
                &mut found,
            );
        }
        let (opaque, detected): (Vec<_>, Vec<_>) = found.into_values().partition(|(o, _)| *o);
        [(Protocol::Detect, detected), (Protocol::Opaque, opaque)]
            .into_iter()
            .map(|(protocol, endpoints)| {
                (protocol, endpoints.into_iter().map(|(_, e)| e).collect())
            })
            .filter_map(|(protocol, endpoints)| pods_config(ns, protocol, endpoints))
            .collect()
    }

    /// [`Index::pods_configs`] from the pods configs of `old`, with the entries at
    /// `addresses` computed again and the others kept: a pod's change in a namespace of
    /// 10,000 pods alters a few of its 10,000 entries, whose computing (addresses and
    /// identities written, every Service's endpoints gathered) cost a third of the change.
    /// `configs` holds the namespace's Service configs as they are now.
    fn patched_pods_configs(
        &self,
        ns: &str,
        old: &NsServices,
        configs: &BTreeMap<String, Arc<ServiceConfig>>,
        addresses: &BTreeSet<IpAddr>,
    ) -> Vec<ServiceConfig> {
        let prefixes: Vec<String> = addresses.iter().map(|ip| address_prefix(*ip)).collect();
        // Which of those addresses a Service lists with an identity: only a Service
        // whose slices have an endpoint there can.
        let mut listing: BTreeSet<&str> = BTreeSet::new();
        for (_, slice) in in_ns(&self.slices, ns) {
            if slice
                .endpoints
                .iter()
                .any(|e| e.addresses.iter().any(|ip| addresses.contains(ip)))
            {
                listing.insert(slice.service.as_str());
            }
        }
        let mut listed: HashSet<&str> = HashSet::new();
        for service in listing {
            let key = ObjectKey::new(ns, service);
            let Some(svc) = self.services.get(&key) else {
                continue;
            };
            for port in &svc.ports {
                let Some(config) = configs.get(&config_name(&key, port.port)) else {
                    continue;
                };
                listed.extend(
                    config
                        .endpoints
                        .iter()
                        .filter(|e| e.identity.is_some() && at_any(&e.address, &prefixes))
                        .map(|e| e.address.as_str()),
                );
            }
        }
        let service_opaque = self.service_opaque(ns, |ip| addresses.contains(&ip));
        let mut found: BTreeMap<String, (bool, EndpointConfig)> = BTreeMap::new();
        for ip in addresses {
            // As in `pods_configs`: an address two meshed pods hold is nobody's.
            let Some(holders) = self.pod_addresses.get(ip) else {
                continue;
            };
            let mut holders = holders.iter();
            let (Some(holder), None) = (holders.next(), holders.next()) else {
                continue;
            };
            let Some(pod) = self.pods.get(holder).filter(|_| holder.namespace == ns) else {
                continue;
            };
            self.pod_entries(
                holder,
                pod,
                |at| at == *ip,
                &|a| listed.contains(a),
                &service_opaque,
                &mut found,
            );
        }
        [Protocol::Detect, Protocol::Opaque]
            .into_iter()
            .filter_map(|protocol| {
                let mut endpoints: Vec<EndpointConfig> = old
                    .get(&pods_config_name(ns, protocol))
                    .map(|c| {
                        c.endpoints
                            .iter()
                            .filter(|e| !at_any(&e.address, &prefixes))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                let opaque = protocol == Protocol::Opaque;
                for (_, endpoint) in found.values().filter(|(o, _)| *o == opaque) {
                    // Both sorted by address, as `pods_configs` leaves them.
                    let at = endpoints
                        .binary_search_by(|e| e.address.cmp(&endpoint.address))
                        .unwrap_or_else(|at| at);
                    endpoints.insert(at, endpoint.clone());
                }
                pods_config(ns, protocol, endpoints)
            })
            .collect()
    }

    /// The addresses of `ns`'s endpoints (at `ips` only) at a port their Service declares
    /// opaque: a port that a Service declares opaque stays opaque while that Service does
    /// not list the pod (not ready), since a server-speaks-first protocol must not wait
    /// out detection by turns.
    fn service_opaque(&self, ns: &str, ips: impl Fn(IpAddr) -> bool) -> HashSet<String> {
        let mut service_opaque: HashSet<String> = HashSet::new();
        for (_, slice) in in_ns(&self.slices, ns) {
            let Some(svc) = self
                .services
                .get(&ObjectKey::new(ns, slice.service.clone()))
            else {
                continue;
            };
            for port in svc.ports.iter().filter(|p| p.opaque) {
                let Some((_, target)) = slice.ports.iter().find(|(name, _)| *name == port.name)
                else {
                    continue;
                };
                for ip in slice.endpoints.iter().flat_map(|e| &e.addresses) {
                    if ips(*ip) {
                        service_opaque.insert(SocketAddr::new(*ip, *target).to_string());
                    }
                }
            }
        }
        service_opaque
    }

    /// The pods-config entries of meshed pod `key` at those of its addresses `at`
    /// accepts, into `found` by address, each with whether its port is opaque: one per
    /// port it declares and its proxy intercepts and address no other meshed pod holds,
    /// unless a Service lists it (`listed`), and none when clients may not originate
    /// mutual TLS to it ([`Index::pod_identity`]).
    fn pod_entries(
        &self,
        key: &ObjectKey,
        pod: &PodModel,
        at: impl Fn(IpAddr) -> bool,
        listed: &dyn Fn(&str) -> bool,
        service_opaque: &HashSet<String>,
        found: &mut BTreeMap<String, (bool, EndpointConfig)>,
    ) {
        let mut ports = pod.ports.iter().copied().filter(|p| pod.intercepts(*p));
        let Some(first) = ports.next() else { return };
        let ips: Vec<IpAddr> = pod
            .ips
            .iter()
            .copied()
            .filter(|ip| at(*ip) && self.pod_addresses.get(ip).is_none_or(|h| h.len() == 1))
            .collect();
        if ips.is_empty() {
            return;
        }
        let Some(identity) = self.pod_identity(key, pod, first) else {
            return;
        };
        for port in std::iter::once(first).chain(ports) {
            for ip in &ips {
                let address = SocketAddr::new(*ip, port).to_string();
                if listed(&address) {
                    continue;
                }
                let endpoint = EndpointConfig {
                    address: address.clone(),
                    weight: None,
                    labels: BTreeMap::new(),
                    identity: Some(identity.clone()),
                    unknown: BTreeMap::new(),
                };
                let opaque = pod.is_opaque(port) || service_opaque.contains(&address);
                found.insert(address, (opaque, endpoint));
            }
        }
    }

    fn visible_namespaces(&self, pod_key: &ObjectKey, pod: &PodModel) -> Visible {
        let spec = pod.visible.clone().or_else(|| {
            self.namespaces
                .get(&pod_key.namespace)
                .and_then(|n| n.visible.clone())
        });
        let mut names = BTreeSet::from([pod_key.namespace.clone()]);
        for part in spec.iter().flat_map(|s| s.split(',')).map(str::trim) {
            if part == "*" {
                return Visible::All;
            }
            if !part.is_empty() {
                names.insert(part.to_owned());
            }
        }
        Visible::Some(names)
    }

    /// The namespaces whose pods may see others than their own (annotated with
    /// [`model::VISIBLE_NAMESPACES_ANNOTATION`]), and the pods that may (annotated
    /// themselves): besides the pods and namespaces a change names, the only subscribers
    /// [`Index::is_affected`] can find touched, so that a change need not ask every one.
    pub fn seeing_others(&self) -> (impl Iterator<Item = &str>, &BTreeSet<ObjectKey>) {
        let namespaces = self
            .namespaces
            .iter()
            .filter(|(_, m)| m.visible.is_some())
            .map(|(name, _)| name.as_str());
        (namespaces, &self.seeing_pods)
    }

    /// Whether a subscriber for `pod` may need a new view after `affected`.
    pub fn is_affected(&self, pod: &ObjectKey, affected: &Affected) -> bool {
        if affected.pods.contains(pod) || affected.relisted.contains(&pod.namespace) {
            return true;
        }
        if affected.namespaces.is_empty() {
            return false;
        }
        self.pods
            .get(pod)
            .is_some_and(|m| self.sees_any(pod, m, &affected.namespaces))
    }

    /// Whether `pod` sees one of `namespaces` ([`Index::visible_namespaces`]), without
    /// collecting what it sees: every change asks it of every subscriber, 10,000 sets
    /// built and dropped per change in a mesh of 10,000 pods.
    fn sees_any(&self, pod_key: &ObjectKey, pod: &PodModel, namespaces: &BTreeSet<String>) -> bool {
        if namespaces.contains(&pod_key.namespace) {
            return true;
        }
        let spec = pod.visible.as_deref().or_else(|| {
            self.namespaces
                .get(&pod_key.namespace)
                .and_then(|n| n.visible.as_deref())
        });
        let mut seen = false;
        for part in spec.iter().flat_map(|s| s.split(',')).map(str::trim) {
            // `*` anywhere in the list means every namespace.
            if part == "*" {
                return true;
            }
            seen |= !part.is_empty() && namespaces.contains(part);
        }
        seen
    }

    /// The config `pod` needs now, or `None` when the index does not know the pod (not
    /// meshed, or not seen yet).
    pub fn view(&self, pod_key: &ObjectKey) -> Option<ProxyView> {
        let pod = self.pods.get(pod_key)?;
        let (services, ns_resources) = self.outbound_part(pod_key, pod);
        let (policies, inbound) = self.policy_part(pod_key);
        // Collected at once, not inserted one by one: the set is built from the sorted
        // references in one pass (the Policies' come in key order), where inserting a
        // pod's hundreds of Policy references compared each with a dozen others.
        let resources = ns_resources.into_iter().cloned().chain(policies).collect();
        Some(ProxyView {
            version: self.version,
            services,
            resources,
            inbound,
        })
    }

    /// Brings `current`, the view a subscriber of `pod_key` holds, up to date after a
    /// change that reported `affected`, to what [`Index::view`] gives now; returns whether
    /// it changed (and leaves it untouched when not), and whether that repaired a stale
    /// Policy part. `current` must be the view as of the change before, as
    /// [`shared::SharedIndex`] keeps it.
    ///
    /// A pod that `affected` does not name kept every input of its Policy part (the
    /// Policies that select it, their refusals, its labels; the mesh default and trust
    /// domain are fixed once the index is shared, [`Index::with_mesh_mtls`] taking it by
    /// value): the Policy references and `inbound` it holds are reused, and only the
    /// services and the Routes and Breakers of its namespaces are recomputed. Compiling
    /// ~170 Policies per pod made an endpoint's change in a namespace of 10,000 pods cost
    /// seconds. A re-list of its namespace ([`Affected::relisted`]) computes it all
    /// again from the index. `comparisons` holds the namespaces' service maps compared
    /// for the change's other views, each pair compared once for them all.
    fn refresh_view(
        &self,
        pod_key: &ObjectKey,
        affected: &Affected,
        current: &mut Option<ProxyView>,
        comparisons: &mut Comparisons,
    ) -> Refresh {
        let named = affected.pods.contains(pod_key);
        let relisted = affected.relisted.contains(&pod_key.namespace);
        let (Some(held), Some(pod), false) =
            (current.as_mut(), self.pods.get(pod_key), named || relisted)
        else {
            let fresh = self.view(pod_key);
            return match (current.as_ref(), fresh.as_ref()) {
                (Some(cur), Some(new)) if cur.same_content(new) => Refresh::Same,
                (None, None) => Refresh::Same,
                (cur, new) => {
                    // Only a report that missed the pod (or a change cut short) leaves a
                    // Policy part for a re-list to repair: a bug to hear of, which the
                    // caller logs once for all the views a re-list repaired.
                    let repaired = !named
                        && matches!((cur, new), (Some(cur), Some(new)) if !same_policy_part(cur, new));
                    *current = fresh;
                    if repaired {
                        Refresh::Repaired
                    } else {
                        Refresh::Changed
                    }
                }
            };
        };
        let (services, ns_resources) = self.outbound_part(pod_key, pod);
        // Only a namespace whose Routes or Breakers changed alters the view's references
        // to them: else they are left unread. Walking each view's set of ~170 references
        // from both ends, for each of 10,000 views, was a third of a pod's change in one
        // namespace of 10,000 pods once the rebuild was patched (memory, not work: each
        // view's set is cold).
        let resources_same = (affected.resources.is_empty()
            || !self.sees_any(pod_key, pod, &affected.resources))
            || other_than_policies(&held.resources).eq(ns_resources.iter().copied());
        let services_same = held.services.same_remembered(&services, comparisons);
        if !resources_same {
            let policy = Kind::Policy.as_str();
            held.resources.retain(|r| r.kind == policy);
            held.resources.extend(ns_resources.into_iter().cloned());
        }
        if !services_same {
            held.services = services;
        }
        let changed = !(resources_same && services_same);
        if changed {
            held.version = self.version;
        }
        // Tests hold every reused Policy part against one computed afresh, so that a
        // change that leaves a pod out of `affected.pods` while its Policy part changed
        // fails there rather than keeping a stale authorization, limit or mode.
        #[cfg(test)]
        {
            let fresh = self.view(pod_key).unwrap_or_default();
            assert_eq!(held.inbound, fresh.inbound, "stale inbound of {pod_key}");
            assert_eq!(
                held.resources, fresh.resources,
                "stale resources of {pod_key}"
            );
            assert!(held.same_content(&fresh), "stale view of {pod_key}");
        }
        if changed {
            Refresh::Changed
        } else {
            Refresh::Same
        }
    }

    /// What `pod` may call and what of its namespaces' it implements: the services of the
    /// namespaces it sees, and their programmed Routes and Breakers.
    fn outbound_part(
        &self,
        pod_key: &ObjectKey,
        pod: &PodModel,
    ) -> (ServiceSet, BTreeSet<&ResourceRef>) {
        let mut services = ServiceSet::default();
        let mut resources = BTreeSet::new();
        let mut add_ns = |ns: &str| {
            if let Some(s) = self.outbound.get(ns) {
                services.insert_namespace(ns, s);
            }
            if let Some(r) = self.ns_resources.get(ns) {
                resources.extend(r.iter());
            }
        };
        match self.visible_namespaces(pod_key, pod) {
            Visible::All => {
                let all: BTreeSet<&String> = self
                    .outbound
                    .keys()
                    .chain(self.ns_resources.keys())
                    .collect();
                for ns in all {
                    add_ns(ns);
                }
            }
            Visible::Some(names) => {
                for ns in &names {
                    add_ns(ns);
                }
            }
        }
        if !self.contested.is_empty() {
            self.settle_contested(&mut services);
        }
        (services, resources)
    }

    /// What the Policies selecting `pod_key` make of its view: a reference to each (with
    /// what enforcing it on this pod takes), in key order, and the inbound config. It
    /// reads only the pod's selection, its namespace's Policies and refusals, and the
    /// mesh default, which is why [`Index::refresh_view`] may keep it.
    fn policy_part(&self, pod_key: &ObjectKey) -> (Vec<ResourceRef>, Option<InboundConfig>) {
        // Of the Policies that rate-limit this pod, the oldest wins (creation time, then
        // name), as conflicting Routes do.
        // Sized for them all at once: grown as collected, the vector of a pod's ~170
        // Policies was reallocated eight times per view.
        let mut selecting: Vec<(&ObjectKey, &model::ResourceMeta, &weft_crds::PolicySpec)> =
            Vec::with_capacity(self.selection.count(pod_key));
        selecting.extend(self.selecting(pod_key));
        let limit = selecting
            .iter()
            .filter_map(|(k, meta, spec)| spec.rate_limit.as_ref().map(|rl| (*k, *meta, rl)))
            .min_by(|a, b| conflict::age_order((a.0, a.1), (b.0, b.1)));
        // The mode this pod runs, and whether workload Policies decide it (over
        // namespace-wide ones): see `compile::mtls`.
        let mode = compile::mtls(self.mesh_mtls, selecting.iter().map(|(_, _, spec)| *spec));
        let workload_decides = selecting
            .iter()
            .any(|(_, _, spec)| !compile::namespace_wide(spec));
        let mut references = Vec::with_capacity(selecting.len());
        for (key, meta, spec) in &selecting {
            let mut requires = requires::policy(spec);
            // An overridden part is not applied on this pod: its requirement names a
            // feature no proxy has, so `Programmed` does not claim it. A rate limit is
            // overridden by an older Policy's; a mode by a workload Policy (for a
            // namespace-wide one) or a stricter one of its level.
            let limit_overridden = limit.is_some_and(|(winner, _, _)| winner != *key);
            let mode_overridden = compile::namespace_wide(spec) == workload_decides
                || mtls_mode(spec.mtls.mode) != mode;
            for r in &mut requires {
                if (r.feature == weft_api::push::feature::POLICY_RATE_LIMIT && limit_overridden)
                    || (r.feature == weft_api::push::feature::POLICY_MTLS && mode_overridden)
                {
                    r.feature = requires::OVERRIDDEN.to_owned();
                }
            }
            references.push(resource_ref("Policy", key, meta.generation, requires));
        }
        // A pod no Policy selects gets the mesh default, sent only when it is not the
        // proxy's own (Permissive).
        let inbound = !selecting.is_empty() || self.mesh_mtls != MtlsMode::Permissive;
        let inbound = inbound.then(|| InboundConfig {
            rate_limit: limit.map(|(key, _, rl)| compile::rate_limit(key, rl)),
            mtls: Some(mode),
            // Every Policy applies (deny wins across them); one that allows everything
            // and denies nothing changes no decision and is not sent.
            authorization: selecting
                .iter()
                .filter(|(_, _, spec)| sends_authorization(spec))
                .map(|(key, _, spec)| compile::authorization(key, spec, &self.trust_domain))
                .collect(),
        });
        (references, inbound)
    }

    /// The valid Policies that select a pod (by label selector, or through a Service whose
    /// selector matches the pod).
    pub fn policies_for(&self, pod_key: &ObjectKey) -> Vec<ObjectKey> {
        self.selecting(pod_key).map(|(k, _, _)| k.clone()).collect()
    }

    /// The Policies [`Index::policies_for`] lists, with their metadata and specs, without
    /// copying a key: each endpoint's identity and each view read them.
    fn selecting<'a>(
        &'a self,
        pod_key: &ObjectKey,
    ) -> impl Iterator<
        Item = (
            &'a ObjectKey,
            &'a model::ResourceMeta,
            &'a weft_crds::PolicySpec,
        ),
    > + use<'a> {
        let refused = self.refused_policies.get(&pod_key.namespace);
        self.selection
            .policies(pod_key)
            .filter(move |k| !refused.is_some_and(|r| r.contains_key(*k)))
            .filter_map(|k| match self.policies.get_key_value(k) {
                Some((k, (meta, Parsed::Valid(spec)))) => Some((k, meta, spec)),
                _ => None,
            })
    }

    /// Re-evaluates which Policies select pod `key`, after it was applied: its own
    /// namespace's Policies, against it alone.
    fn reselect_pod(&mut self, key: &ObjectKey) {
        self.selection.remove_pod(key);
        self.forget_policy_modes([key]);
        let Some(pod) = self.pods.get(key) else {
            return;
        };
        let selecting: Vec<ObjectKey> = in_ns(&self.policies, &key.namespace)
            .filter(|(_, (_, spec))| matches!(spec, Parsed::Valid(p) if self.selects(p, key, pod)))
            .map(|(k, _)| k.clone())
            .collect();
        for policy in &selecting {
            self.selection.insert(policy, key);
        }
    }

    /// Re-evaluates which pods Policy `key` selects, after it was applied: it alone,
    /// against its namespace's pods. Returns the pods it selected before or selects now,
    /// whose views it may change.
    fn reselect_policy(&mut self, key: &ObjectKey) -> BTreeSet<ObjectKey> {
        let mut touched = self.selection.remove_policy(key);
        if let Some((_, Parsed::Valid(spec))) = self.policies.get(key) {
            let selected: Vec<ObjectKey> = in_ns(&self.pods, &key.namespace)
                .filter(|(k, pod)| self.selects(spec, k, pod))
                .map(|(k, _)| k.clone())
                .collect();
            for pod in selected {
                self.selection.insert(key, &pod);
                touched.insert(pod);
            }
        }
        // The Policy's spec may have changed even where its pods did not: each pod it
        // selected or selects may run another mode.
        self.forget_policy_modes(&touched);
        touched
    }

    /// Settles what [`Index::owed_selection`] owes: re-selects the Policies whose target
    /// changed, each namespace's at once against its pods, and returns the pods those
    /// Policies selected before or select now and those the others select (their views
    /// may change), with the namespaces of them all. Forgets those pods' kept mTLS modes.
    ///
    /// Candidates are found through the pods' labels: a Policy that requires labels
    /// (its `matchLabels`, or the selector of the Service it targets) is evaluated only
    /// against the pods carrying the rarest of them, where evaluating each of 1,000
    /// Policies against every one of 10,000 pods made ten million evaluations.
    fn settle_selection(&mut self) -> (BTreeSet<ObjectKey>, BTreeSet<String>) {
        let owed = std::mem::take(&mut self.owed_selection);
        let mut touched = BTreeSet::new();
        let mut namespaces = BTreeSet::new();
        let mut by_ns: BTreeMap<String, Vec<(ObjectKey, bool)>> = BTreeMap::new();
        for (policy, reselect) in owed {
            by_ns
                .entry(policy.namespace.clone())
                .or_default()
                .push((policy, reselect));
        }
        for (ns, owed) in by_ns {
            // What the Policies whose target changed selected before.
            for (policy, _) in owed.iter().filter(|(_, reselect)| *reselect) {
                touched.extend(self.selection.remove_policy(policy));
            }
            let pods: Vec<(&ObjectKey, &PodModel)> = in_ns(&self.pods, &ns).collect();
            let mut postings: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
            if owed.iter().any(|(_, reselect)| *reselect) {
                for (at, (_, pod)) in pods.iter().enumerate() {
                    for (k, v) in &pod.labels {
                        postings.entry((k, v)).or_default().push(at);
                    }
                }
            }
            let everyone: Vec<usize> = (0..pods.len()).collect();
            let mut selected: Vec<(&ObjectKey, Vec<usize>)> = Vec::new();
            for (policy, _) in owed.iter().filter(|(_, reselect)| *reselect) {
                let Some((_, Parsed::Valid(spec))) = self.policies.get(policy) else {
                    continue;
                };
                let required: Vec<(&str, &str)> =
                    match (&spec.target.selector, &spec.target.service) {
                        (Some(sel), _) => sel
                            .match_labels
                            .iter()
                            .flatten()
                            .map(|(k, v)| (k.as_str(), v.as_str()))
                            .collect(),
                        (None, Some(svc)) => self
                            .services
                            .get(&ObjectKey::new(ns.clone(), svc.clone()))
                            .and_then(|s| s.selector.as_ref())
                            .into_iter()
                            .flatten()
                            .map(|(k, v)| (k.as_str(), v.as_str()))
                            .collect(),
                        (None, None) => continue,
                    };
                // No required label: every pod is a candidate (an empty selector selects
                // them all; an empty Service selector none, which `selects` decides).
                let candidates: &[usize] = if required.is_empty() {
                    &everyone
                } else {
                    required
                        .iter()
                        .map(|pair| postings.get(pair).map_or(&[][..], Vec::as_slice))
                        .min_by_key(|c| c.len())
                        .unwrap_or(&[])
                };
                let chosen: Vec<usize> = candidates
                    .iter()
                    .copied()
                    .filter(|&at| {
                        pods.get(at)
                            .is_some_and(|(key, pod)| self.selects(spec, key, pod))
                    })
                    .collect();
                selected.push((policy, chosen));
            }
            let keys: Vec<&ObjectKey> = pods.iter().map(|(k, _)| *k).collect();
            // A pod with a Policy whose target changed, or a Policy whose spec did.
            let mut marked = vec![false; keys.len()];
            for (_, chosen) in &selected {
                for &at in chosen {
                    marked[at] = true;
                }
            }
            touched.extend(
                keys.iter()
                    .zip(&marked)
                    .filter(|(_, m)| **m)
                    .map(|(k, _)| (*k).clone()),
            );
            touched.extend(
                self.selection
                    .pods_of_any(
                        owed.iter()
                            .filter(|(_, reselect)| !*reselect)
                            .map(|(policy, _)| policy),
                    )
                    .into_iter()
                    .cloned(),
            );
            self.selection.insert_many(&keys, &selected);
            namespaces.insert(ns);
        }
        self.forget_policy_modes(&touched);
        (touched, namespaces)
    }

    /// Forgets the mTLS mode kept for each of `pods`, whose Policies changed.
    fn forget_policy_modes<'a>(&mut self, pods: impl IntoIterator<Item = &'a ObjectKey>) {
        let modes = lock(&mut self.policy_modes);
        for pod in pods {
            modes.remove(pod);
        }
    }

    /// Forgets the mTLS mode kept for every pod of `ns`.
    fn forget_namespace_modes(&mut self, ns: &str) {
        lock(&mut self.policy_modes).retain(|pod, _| pod.namespace != ns);
    }

    /// The mTLS mode `pod_key` runs ([`compile::mtls`] of the Policies that select it and
    /// are not refused): kept from an earlier read unless they changed since
    /// ([`Index::forget_policy_modes`]).
    fn policy_mode(&self, pod_key: &ObjectKey) -> MtlsMode {
        let cached = self
            .policy_modes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(pod_key)
            .copied();
        if let Some(mode) = cached {
            // Tests hold every mode read against one computed afresh, so that a change
            // that forgets to forget one fails there rather than sending a stale identity.
            #[cfg(test)]
            assert_eq!(
                mode,
                self.compute_policy_mode(pod_key),
                "stale mTLS mode of {pod_key}"
            );
            return mode;
        }
        let mode = self.compute_policy_mode(pod_key);
        self.policy_modes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pod_key.clone(), mode);
        mode
    }

    /// Keeps the mTLS mode of every pod of `ns` that has none kept, when more than a few
    /// lack one (after a re-list, a namespace-wide Policy's change, a refusal): computed
    /// Policy by Policy, each added to the pods it selects, where computing each pod's
    /// alone looked each of its Policies up by key, ~1.7 million lookups for 10,000 pods
    /// with ~170 Policies each, half of the first list of 1,000 Policies. Kept modes stay
    /// as they are, so that tests still hold each against one computed afresh.
    fn fill_policy_modes(&self, ns: &str) {
        /// Below this many pods without a mode, each is computed when read.
        const FEW: usize = 64;
        let mut modes = self.policy_modes.lock().unwrap_or_else(|p| p.into_inner());
        let missing = in_ns(&self.pods, ns)
            .filter(|(k, _)| !modes.contains_key(*k))
            .take(FEW + 1)
            .count();
        if missing <= FEW {
            return;
        }
        let refused = self.refused_policies.get(ns);
        // By the address of the selection's key: one allocation per pod, shared by every
        // Policy selecting it, so that a pod's levels are found without hashing its name.
        let mut levels: HashMap<*const ObjectKey, (&ObjectKey, compile::MtlsLevels)> =
            HashMap::new();
        for (key, (_, spec)) in in_ns(&self.policies, ns) {
            let Parsed::Valid(spec) = spec else { continue };
            if refused.is_some_and(|r| r.contains_key(key)) {
                continue;
            }
            for pod in self.selection.pods(key) {
                levels
                    .entry(std::ptr::from_ref(pod))
                    .or_insert_with(|| (pod, compile::MtlsLevels::default()))
                    .1
                    .add(spec);
            }
        }
        for (pod, levels) in levels.into_values() {
            if !modes.contains_key(pod) {
                modes.insert(pod.clone(), levels.mode(self.mesh_mtls));
            }
        }
        // The pods no Policy selects run the mesh's default.
        for (pod, _) in in_ns(&self.pods, ns) {
            if !modes.contains_key(pod) {
                modes.insert(pod.clone(), self.mesh_mtls);
            }
        }
    }

    /// Computes [`Index::policy_mode`].
    fn compute_policy_mode(&self, pod_key: &ObjectKey) -> MtlsMode {
        let specs = self.selecting(pod_key).map(|(_, _, spec)| spec);
        compile::mtls(self.mesh_mtls, specs)
    }

    /// Whether a valid Route, Breaker or Policy of `key`'s namespace names Service `key`
    /// (as the Service it governs or targets, a backend or a mirror): the resources whose
    /// status ([`Index::resource_state`]) reads that Service, since references never
    /// leave their namespace and an invalid resource reads none. (A Service's selector
    /// also moves which pods Policies select, and so their refusals and skipped-port
    /// phrases, but only where the namespace has pods, which the change reports anyway.)
    fn names_service(&self, key: &ObjectKey) -> bool {
        let ns = key.namespace.as_str();
        let name = key.name.as_str();
        let routes = in_ns(&self.routes, ns).any(|(_, (_, spec))| match spec {
            Parsed::Valid(r) => {
                r.service.name == name
                    || r.rules.iter().any(|rule| {
                        rule.backends.iter().any(|b| b.name == name)
                            || rule.mirror.as_ref().is_some_and(|m| m.service.name == name)
                    })
            }
            Parsed::Invalid(_) => false,
        });
        routes
            || in_ns(&self.breakers, ns)
                .any(|(_, (_, spec))| matches!(spec, Parsed::Valid(b) if b.service.name == name))
            || in_ns(&self.policies, ns).any(|(_, (_, spec))| {
                matches!(spec, Parsed::Valid(p) if p.target.service.as_deref() == Some(name))
            })
    }

    /// Re-evaluates the Policies that select pods through Service `key` (a `service`
    /// target without a selector), after the Service was applied or deleted: its selector
    /// decides which pods they select.
    fn reselect_service(&mut self, key: &ObjectKey) {
        let targeting: Vec<ObjectKey> = in_ns(&self.policies, &key.namespace)
            .filter(|(_, (_, spec))| {
                matches!(spec, Parsed::Valid(p)
                    if p.target.selector.is_none() && p.target.service.as_deref() == Some(key.name.as_str()))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for policy in &targeting {
            self.reselect_policy(policy);
        }
    }

    /// What a Policy's `Accepted` message says of the ports its pods leave to their
    /// applications (`weft.dev/skip-inbound-ports`), where no proxy enforces it: empty
    /// when none of its pods skips one. Ports only, not pod names, so that the message
    /// (and the status write) does not change with every rollout.
    fn skipped_ports_phrase(&self, policy: &ObjectKey) -> String {
        let ranges: BTreeSet<(u16, u16)> = self
            .selection
            .pods(policy)
            .filter_map(|k| self.pods.get(k))
            .flat_map(|pod| pod.app_skipped().map(|r| (r.start, r.end)))
            .collect();
        if ranges.is_empty() {
            return String::new();
        }
        let list: Vec<String> = ranges
            .iter()
            .map(|&(start, end)| crate::inject::annotations::PortRange { start, end }.to_string())
            .collect();
        format!(
            "; not enforced on the ports its pods leave to their application (weft.dev/skip-inbound-ports), which no proxy sees: {}",
            list.join(", ")
        )
    }

    /// Whether Policy `p` selects `pod` (by label selector, or through a Service whose
    /// selector matches the pod).
    fn selects(&self, p: &weft_crds::PolicySpec, pod_key: &ObjectKey, pod: &PodModel) -> bool {
        match (&p.target.selector, &p.target.service) {
            (Some(sel), _) => selector_matches(sel, &pod.labels),
            (None, Some(svc)) => self
                .services
                .get(&ObjectKey::new(pod_key.namespace.clone(), svc.clone()))
                .and_then(|s| s.selector.as_ref())
                .is_some_and(|sel| {
                    !sel.is_empty() && sel.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
                }),
            (None, None) => false,
        }
    }

    /// The keys of every resource of a Weft kind.
    pub fn resource_keys(&self, kind: Kind) -> Vec<ObjectKey> {
        match kind {
            Kind::Route => self.routes.keys().cloned().collect(),
            Kind::Policy => self.policies.keys().cloned().collect(),
            Kind::Breaker => self.breakers.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    fn missing_services(&self, ns: &str, names: &[(String, Option<u16>)]) -> Vec<String> {
        let mut missing = Vec::new();
        for (name, port) in names {
            match self.services.get(&ObjectKey::new(ns, name.clone())) {
                None => missing.push(format!("Service {ns}/{name} not found")),
                Some(svc) => {
                    if let Some(port) = port
                        && !svc.ports.iter().any(|p| p.port == *port)
                    {
                        missing.push(format!("Service {ns}/{name} has no port {port}"));
                    }
                }
            }
        }
        // Each missing Service once, in the order the spec names them.
        let mut seen = BTreeSet::new();
        missing.retain(|m| seen.insert(m.clone()));
        missing
    }

    /// The ports a Route governing `service` routes: the Service's ports it names that are
    /// not opaque, or the port it names when the Service does not exist. A backend without
    /// a port is sent each of them ([`compile::route`]).
    fn routed_ports(&self, ns: &str, service: &ServiceRef) -> Vec<u16> {
        match self.services.get(&ObjectKey::new(ns, service.name.clone())) {
            Some(svc) => svc
                .ports
                .iter()
                .filter(|p| !p.opaque && service.port.is_none_or(|port| port == p.port))
                .map(|p| p.port)
                .collect(),
            None => service.port.into_iter().collect(),
        }
    }

    /// Why a backend (or mirror) Service `name`, sent `ports`, does not resolve to a proxy
    /// config ([`Index::service_port_config`]), one line per problem: the Service does not
    /// exist, has no cluster IP, or lacks one of the ports. A proxy answers such a
    /// backend's share 500 `backend_not_found`.
    fn unresolved_backend(&self, ns: &str, name: &str, ports: &[u16]) -> Vec<String> {
        let Some(svc) = self.services.get(&ObjectKey::new(ns, name)) else {
            return vec![format!("Service {ns}/{name} not found")];
        };
        if svc.cluster_ips.is_empty() {
            return vec![format!(
                "Service {ns}/{name} is headless or ExternalName: it has no cluster IP for proxies to send to"
            )];
        }
        ports
            .iter()
            .filter(|port| !svc.ports.iter().any(|p| p.port == **port))
            .map(|port| format!("Service {ns}/{name} has no port {port}"))
            .collect()
    }

    /// `Accepted` and `ResolvedRefs` for a Weft resource, or `None` when it is unknown.
    pub fn resource_state(&self, kind: Kind, key: &ObjectKey) -> Option<ResourceState> {
        let ns = key.namespace.as_str();
        // The Service a Route or Breaker governs: without it the resource is not accepted.
        let mut governed: Option<ServiceRef> = None;
        // A Route's backends and mirrors, resolved as the proxy config resolves them.
        let mut backends: Vec<(&String, Option<u16>)> = Vec::new();
        let (generation, invalid, refs, rule_count) = match kind {
            Kind::Route => {
                let (meta, spec) = self.routes.get(key)?;
                match spec {
                    Parsed::Invalid(e) => (meta.generation, Some(e.clone()), Vec::new(), None),
                    Parsed::Valid(s) => {
                        governed = Some(s.service.clone());
                        let refs = vec![(s.service.name.clone(), s.service.port)];
                        for rule in &s.rules {
                            backends.extend(rule.backends.iter().map(|b| (&b.name, b.port)));
                            if let Some(m) = &rule.mirror {
                                backends.push((&m.service.name, m.service.port));
                            }
                        }
                        let count = u32::try_from(s.rules.len()).ok();
                        (meta.generation, None, refs, count)
                    }
                }
            }
            Kind::Policy => {
                let (meta, spec) = self.policies.get(key)?;
                match spec {
                    Parsed::Invalid(e) => (meta.generation, Some(e.clone()), Vec::new(), None),
                    Parsed::Valid(p) => {
                        let refs = p.target.service.iter().map(|s| (s.clone(), None)).collect();
                        (meta.generation, None, refs, None)
                    }
                }
            }
            Kind::Breaker => {
                let (meta, spec) = self.breakers.get(key)?;
                match spec {
                    Parsed::Invalid(e) => (meta.generation, Some(e.clone()), Vec::new(), None),
                    Parsed::Valid(b) => {
                        governed = Some(b.service.clone());
                        (
                            meta.generation,
                            None,
                            vec![(b.service.name.clone(), b.service.port)],
                            None,
                        )
                    }
                }
            }
            _ => return None,
        };
        let uid = match kind {
            Kind::Route => self.routes.get(key).and_then(|(m, _)| m.uid.clone()),
            Kind::Policy => self.policies.get(key).and_then(|(m, _)| m.uid.clone()),
            _ => self.breakers.get(key).and_then(|(m, _)| m.uid.clone()),
        };
        let kind_name = kind.as_str();
        let accepted = if let Some(e) = invalid {
            CondState::no(reasons::INVALID, e)
        } else if let Some(problem) = governed
            .as_ref()
            .and_then(|s| self.governed_problem(ns, s, kind))
        {
            problem
        } else if let Some(pod) = self
            .refused_policies
            .get(ns)
            .and_then(|r| r.get(key))
            .filter(|_| kind == Kind::Policy)
        {
            CondState::no(
                reasons::TOO_MANY_POLICIES,
                format!(
                    "pod {pod} is already selected by {} older Policies that send authorization (rules, a Deny default or dryRun), as many as a proxy accepts; this Policy is not applied anywhere (older ones win, creation time then name)",
                    self.max_policies
                ),
            )
        } else if let Some(winner) = self.conflict(kind, key) {
            CondState::no(
                reasons::CONFLICTED,
                format!(
                    "conflicts with {kind_name} {} for the same Service port; the older {kind_name} wins (creation time, then name)",
                    winner.name
                ),
            )
        } else {
            let losers = self.losers(kind, key);
            let mut msg = if losers.is_empty() {
                format!("{kind_name} is valid")
            } else {
                let names: Vec<&str> = losers.iter().map(|k| k.name.as_str()).collect();
                format!(
                    "{kind_name} is valid; it wins over conflicting {kind_name}(s) {} (older ones win)",
                    names.join(", ")
                )
            };
            if kind == Kind::Policy {
                // Only valid Policies select pods, so an invalid one gets no phrase.
                msg.push_str(&self.skipped_ports_phrase(key));
            }
            if let Some(s) = &governed {
                let opaque = self.opaque_ports(ns, s);
                if !opaque.is_empty() {
                    msg.push_str(&format!(
                        "; not applied on the opaque {} of Service {ns}/{} (forwarded as bytes)",
                        ports_phrase(&opaque),
                        s.name,
                    ));
                }
            }
            CondState::yes(reasons::ACCEPTED, msg)
        };
        let mut missing = self.missing_services(ns, &refs);
        if let Some(governed) = &governed {
            let routed = self.routed_ports(ns, governed);
            for (name, port) in backends {
                let ports = match port {
                    Some(p) => vec![p],
                    None => routed.clone(),
                };
                for m in self.unresolved_backend(ns, name, &ports) {
                    if !missing.contains(&m) {
                        missing.push(m);
                    }
                }
            }
        }
        let resolved_refs = if missing.is_empty() {
            CondState::yes(reasons::RESOLVED_REFS, "every referenced Service exists")
        } else {
            CondState::no(reasons::BACKEND_NOT_FOUND, missing.join("; "))
        };
        Some(ResourceState {
            uid,
            generation,
            rule_count,
            accepted,
            resolved_refs,
        })
    }

    /// The meshed pods the index knows.
    pub fn pod_keys(&self) -> impl Iterator<Item = &ObjectKey> {
        self.pods.keys()
    }

    /// The injection label of namespace `name`: `None` when the index does not hold the
    /// namespace, `Some(None)` when it has no such label.
    pub fn namespace_inject_label(&self, name: &str) -> Option<Option<&str>> {
        self.namespaces.get(name).map(|m| m.inject.as_deref())
    }

    /// The ServiceAccount of a meshed pod.
    pub fn pod_service_account(&self, pod: &ObjectKey) -> Option<&str> {
        self.pods.get(pod).map(|p| p.service_account.as_str())
    }
}

enum Visible {
    All,
    Some(BTreeSet<String>),
}

/// The references of `resources` to other kinds than Policy (the Routes and Breakers of
/// a view's namespaces), without walking the Policies' (a pod has hundreds where every
/// Policy of its namespace selects it): references sort by kind first, so the others
/// are those before the first Policy's and after the last one's.
fn other_than_policies(resources: &BTreeSet<ResourceRef>) -> impl Iterator<Item = &ResourceRef> {
    let policy = Kind::Policy.as_str();
    let after: Vec<&ResourceRef> = resources
        .iter()
        .rev()
        .take_while(|r| r.kind.as_str() > policy)
        .collect();
    resources
        .iter()
        .take_while(move |r| r.kind.as_str() < policy)
        .chain(after.into_iter().rev())
}

/// `config`, or the config of `old` under its name when that one is equal: unchanged
/// configs stay the same `Arc`, which views and [`same_configs`] compare by pointer.
fn reuse(old: Option<&NsServices>, config: ServiceConfig) -> Arc<ServiceConfig> {
    match old.and_then(|o| o.get(&config.name)) {
        Some(prev) if **prev == config => prev.clone(),
        _ => Arc::new(config),
    }
}

/// Whether `fresh` holds the configs of `old`, by name and pointer: a rebuild keeps the
/// `Arc` of every config equal to the one before ([`reuse`]), so a config that is not the
/// same `Arc` is a changed one.
fn same_configs(
    old: &BTreeMap<String, Arc<ServiceConfig>>,
    fresh: &BTreeMap<String, Arc<ServiceConfig>>,
) -> bool {
    old.len() == fresh.len()
        && old
            .iter()
            .zip(fresh)
            .all(|((a, x), (b, y))| Arc::ptr_eq(x, y) && a == b)
}

/// Whether a re-list of `kind` may find a view's Policy part stale, as it reads objects
/// of that kind: the pods' labels, the Policies, and the Services that Policies select
/// pods through. No wildcard, so that a new kind is placed here knowingly.
fn feeds_policy_part(kind: Kind) -> bool {
    match kind {
        Kind::Pod | Kind::Policy | Kind::Service => true,
        // Visibility, endpoints, Routes and Breakers shape only the services and Routes
        // and Breakers of a view, which every refresh recomputes.
        Kind::Namespace | Kind::EndpointSlice | Kind::Route | Kind::Breaker => false,
    }
}

/// What [`Index::refresh_view`] made of a held view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refresh {
    /// It was up to date, and is left untouched.
    Same,
    /// It changed.
    Changed,
    /// It changed, and its Policy part was stale: a change's report missed the pod, or
    /// one was cut short by a panic, and a re-list repaired it.
    Repaired,
}

impl Refresh {
    /// Whether the view changed.
    fn changed(self) -> bool {
        self != Refresh::Same
    }
}

/// Whether two views carry the same Policy part: the Policy references and `inbound`.
fn same_policy_part(a: &ProxyView, b: &ProxyView) -> bool {
    let policy = Kind::Policy.as_str();
    a.inbound == b.inbound
        && a.resources
            .iter()
            .filter(|r| r.kind == policy)
            .eq(b.resources.iter().filter(|r| r.kind == policy))
}

/// What a mutex holds, through `&mut` access, which needs no lock (a poisoned one
/// still holds modes that are each whole).
fn lock<T>(m: &mut Mutex<T>) -> &mut T {
    m.get_mut().unwrap_or_else(|p| p.into_inner())
}

/// Whether a Policy is sent as an authorization policy: one that allows everything and
/// denies nothing, not in dry run, changes no decision and is not.
fn sends_authorization(spec: &weft_crds::PolicySpec) -> bool {
    spec.dry_run || !spec.rules.is_empty() || spec.default_action == Action::Deny
}

/// `port 5432` or `ports 5432, 6379`.
fn ports_phrase(ports: &[u16]) -> String {
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    let s = if list.len() == 1 { "" } else { "s" };
    format!("port{s} {}", list.join(", "))
}

/// The proxy config name of one Service port: `<service>.<namespace>.<port>`.
pub fn config_name(key: &ObjectKey, port: u16) -> String {
    format!("{}.{}.{port}", key.name, key.namespace)
}

/// Namespace `ns`'s pods config for `protocol` with `endpoints`, if it has any.
fn pods_config(
    ns: &str,
    protocol: Protocol,
    endpoints: Vec<EndpointConfig>,
) -> Option<ServiceConfig> {
    address_less(pods_config_name(ns, protocol), protocol, endpoints)
}

/// A config that no address selects and no policy shapes, named `name`, with `endpoints`
/// (none if they are empty): the pods configs, and a headless Service's per port.
fn address_less(
    name: String,
    protocol: Protocol,
    endpoints: Vec<EndpointConfig>,
) -> Option<ServiceConfig> {
    (!endpoints.is_empty()).then(|| ServiceConfig {
        name,
        addresses: Vec::new(),
        protocol,
        balancer: Balancer::default(),
        timeout: None,
        connect_timeout: None,
        endpoints,
        route: None,
        retry_budget: None,
        breaker: None,
        unknown: BTreeMap::new(),
    })
}

/// The name of namespace `ns`'s config of meshed pods that no Service lists, at the
/// ports their proxies detect (`pods.<ns>`) or take as opaque (`pods.<ns>.opaque`).
pub fn pods_config_name(ns: &str, protocol: Protocol) -> String {
    let prefix = weft_api::proxy_config::PODS_CONFIG_PREFIX;
    match protocol {
        Protocol::Detect => format!("{prefix}{ns}"),
        Protocol::Opaque => format!("{prefix}{ns}.opaque"),
    }
}

fn resource_ref(
    kind: &str,
    key: &ObjectKey,
    generation: i64,
    requires: Vec<weft_api::push::Requirement>,
) -> ResourceRef {
    ResourceRef {
        kind: kind.to_owned(),
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        generation,
        requires,
    }
}

#[cfg(test)]
mod tests;

fn mtls_mode(m: weft_crds::policy::MtlsMode) -> MtlsMode {
    match m {
        weft_crds::policy::MtlsMode::Strict => MtlsMode::Strict,
        weft_crds::policy::MtlsMode::Permissive => MtlsMode::Permissive,
        weft_crds::policy::MtlsMode::Disabled => MtlsMode::Disabled,
    }
}

/// Orders modes from the least to the most strict: of several Policies on one pod, the
/// strictest mode wins.
fn strictness(m: MtlsMode) -> u8 {
    match m {
        MtlsMode::Disabled => 0,
        MtlsMode::Permissive => 1,
        MtlsMode::Strict => 2,
    }
}
