//! Status users can trust: `Accepted`, `ResolvedRefs`, `Programmed` and
//! `observedGeneration` on every Route, Policy and Breaker, and Events for rejections.
//!
//! ```text
//! Index::resource_state ─┐ (Accepted, ResolvedRefs: sans-IO, in the index)
//! desired views ─────────┼─▶ programmed() ─▶ Computed ─▶ StatusWriter (Lease holder only)
//! Registry (ACK / NACK) ─┘                                 │ only when Computed changed
//!                                                          ▼
//!                                      PATCH .../status, Event on a new False condition
//! ```
//!
//! `Programmed` counts the connected proxies that need the resource (their config carries
//! it, as this replica's index says in the same read as the resource's generation, so a
//! resource just created is never needed by nobody for a moment), how many of them
//! acknowledged a version carrying its current generation, and how
//! many of those reported in their ACK that they *enforce* it (the proxy decides, from the
//! requirements sent with the resource: see [`crate::index::requires`]) — on every
//! replica: proxies streaming from other replicas are known from their ACK reports
//! ([`reports`]). Acknowledged but not enforced is `Programmed=False`, reason
//! `NotEnforced`: the resource is accepted, but no data plane applies it. A resource no
//! connected proxy needs is `Programmed=False`, reason `NoProxies`: nothing enforces it.
//!
//! A resource deleted and re-created under its name is another object: what was written
//! is keyed by its UID too, and acknowledgements of the deleted object do not count for
//! the new one ([`Incarnation`]).

pub mod lease;
pub mod reports;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::ObjectReference,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weft_api::push::ResourceRef;
use weft_crds::{
    Breaker, Policy, Route,
    status::{ACCEPTED, PROGRAMMED, RESOLVED_REFS},
};

use crate::{
    index::{CondState, Kind, ObjectKey, ProxyView, ResourceState, reasons, shared::SharedIndex},
    push::{ProxyState, Registry},
};
use reports::Peers;

/// The field manager of status writes.
pub const FIELD_MANAGER: &str = "weft-operator";

/// How many pod names a `Programmed` message lists.
const NAMED: usize = 3;

/// `Programmed` for one resource at `generation`: True when every connected proxy that
/// needs it acknowledged a version carrying this generation *and* reported that it enforces
/// it. A proxy that acknowledged it without enforcing all of it (it lacks a feature the
/// resource uses, or does not report enforcement) makes it `NotEnforced`, naming the fields.
/// When no connected proxy needs it, False (`NoProxies`): nothing enforces it.
pub fn programmed(
    kind: Kind,
    key: &ObjectKey,
    generation: i64,
    views: &[(ObjectKey, Option<ProxyView>)],
    proxies: &BTreeMap<ObjectKey, ProxyState>,
) -> CondState {
    programmed_with(kind, key, generation, views, proxies, &|_, _| false)
}

/// [`programmed`], where a proxy for which `stale(pod, state)` holds has not acknowledged
/// this object yet, whatever it acknowledged: its acknowledgements predate the object (one
/// deleted and re-created under the same name, whose generation starts over, is another
/// object; see [`Incarnation`]).
pub fn programmed_with(
    kind: Kind,
    key: &ObjectKey,
    generation: i64,
    views: &[(ObjectKey, Option<ProxyView>)],
    proxies: &BTreeMap<ObjectKey, ProxyState>,
    stale: &dyn Fn(&ObjectKey, &ProxyState) -> bool,
) -> CondState {
    let kind_name = kind.as_str();
    let this = |r: &ResourceRef| {
        r.kind == kind_name
            && r.namespace == key.namespace
            && r.name == key.name
            && r.generation == generation
    };
    let mut need = 0usize;
    let mut enforced = 0usize;
    let mut lagging = Vec::new();
    let mut rejected = Vec::new();
    // What is not enforced (one line per distinct answer) and by which pods.
    let mut not_enforced: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (pod, view) in views {
        let Some(view) = view else { continue };
        let needs = view
            .resources
            .iter()
            .any(|r| r.kind == kind_name && r.namespace == key.namespace && r.name == key.name);
        let Some(state) = proxies.get(pod).filter(|s| s.streams > 0) else {
            continue;
        };
        if !needs {
            continue;
        }
        need += 1;
        if !state.acked_resources.iter().any(this) || stale(pod, state) {
            match &state.nack {
                Some(n) => rejected.push(format!("{pod} ({})", n.reason)),
                None => lagging.push(pod.to_string()),
            }
            continue;
        }
        let gap = match &state.enforcement {
            None => {
                Some("this proxy does not report what it enforces (an older weft-proxy)".to_owned())
            }
            Some(e) if e.enforced.iter().any(this) => None,
            Some(e) => Some(match e.not_enforced.iter().find(|n| this(&n.resource)) {
                Some(n) => format!("{}: not enforced by {}", n.fields.join(", "), e.proxy),
                None => format!("not reported as enforced by {}", e.proxy),
            }),
        };
        match gap {
            None => enforced += 1,
            Some(gap) => not_enforced.entry(gap).or_default().push(pod.to_string()),
        }
    }
    if need == 0 {
        // Vacuously every proxy has it, but nothing enforces it: True would read as
        // "in force" to whoever waits for it.
        let who = match kind {
            Kind::Policy => "the meshed pods it selects".to_owned(),
            _ => format!("meshed pods that see namespace {}", key.namespace),
        };
        return CondState {
            ok: false,
            reason: reasons::NO_PROXIES,
            message: format!(
                "no connected proxy needs this {kind_name}, so nothing enforces it yet; it is sent to the proxies of {who} and is Programmed once they acknowledge it"
            ),
        };
    }
    let acked = need - lagging.len() - rejected.len();
    let mut message = format!("generation {generation} acknowledged by {acked} of {need} proxies");
    if enforced == need {
        message.push_str(", and enforced by all");
    }
    if !not_enforced.is_empty() {
        message.push_str(&format!("; enforced by {enforced} of {need}"));
        for (gap, pods) in &not_enforced {
            let shown: Vec<&str> = pods.iter().take(NAMED).map(String::as_str).collect();
            message.push_str(&format!(
                "; {gap} ({} {}: {})",
                pods.len(),
                if pods.len() == 1 { "proxy" } else { "proxies" },
                shown.join(", ")
            ));
        }
    }
    if !rejected.is_empty() {
        let shown: Vec<&str> = rejected.iter().take(NAMED).map(String::as_str).collect();
        message.push_str(&format!(
            "; rejected by {}: {}",
            rejected.len(),
            shown.join(", ")
        ));
    }
    if !lagging.is_empty() {
        let shown: Vec<&str> = lagging.iter().take(NAMED).map(String::as_str).collect();
        message.push_str(&format!(
            "; waiting for {}: {}",
            lagging.len(),
            shown.join(", ")
        ));
    }
    // A rejection needs the user now; what is not enforced stays so once everyone caught
    // up, so it is said before Pending.
    let reason = if !rejected.is_empty() {
        reasons::REJECTED
    } else if !not_enforced.is_empty() {
        reasons::NOT_ENFORCED
    } else if !lagging.is_empty() {
        reasons::PENDING
    } else {
        reasons::PROGRAMMED
    };
    CondState {
        ok: enforced == need,
        reason,
        message,
    }
}

/// The status the operator wants one resource to have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Computed {
    /// The object described (`metadata.uid`): a re-created object gets its own status
    /// even when it computes to the same conditions as the deleted one.
    pub uid: Option<String>,
    /// The generation described.
    pub generation: i64,
    /// Rules (Routes only).
    pub rule_count: Option<u32>,
    /// `(type, state)` for Accepted, ResolvedRefs and Programmed.
    pub conditions: Vec<(&'static str, CondState)>,
}

/// Computes the status of one resource, or `None` when the index does not hold it.
/// `views` must have been read with the index in the state `index` is in now (see
/// [`SharedIndex::read_with_views`]); the status writer reads both at once.
pub fn compute(
    index: &SharedIndex,
    kind: Kind,
    key: &ObjectKey,
    views: &[(ObjectKey, Option<ProxyView>)],
    proxies: &BTreeMap<ObjectKey, ProxyState>,
) -> Option<Computed> {
    let state = index.read(|i| i.resource_state(kind, key))?;
    Some(compute_from(kind, key, state, views, proxies, &|_, _| {
        false
    }))
}

/// The status of one resource in `state` (`Accepted`, `ResolvedRefs` and the generation,
/// read with `views` from one index state).
pub fn compute_from(
    kind: Kind,
    key: &ObjectKey,
    state: ResourceState,
    views: &[(ObjectKey, Option<ProxyView>)],
    proxies: &BTreeMap<ObjectKey, ProxyState>,
    stale: &dyn Fn(&ObjectKey, &ProxyState) -> bool,
) -> Computed {
    let programmed = if state.accepted.ok {
        programmed_with(kind, key, state.generation, views, proxies, stale)
    } else {
        CondState {
            ok: false,
            reason: reasons::NOT_ACCEPTED,
            message: format!("not programmed: {}", state.accepted.message),
        }
    };
    Computed {
        uid: state.uid,
        generation: state.generation,
        rule_count: state.rule_count,
        conditions: vec![
            (ACCEPTED, state.accepted),
            (RESOLVED_REFS, state.resolved_refs),
            (PROGRAMMED, programmed),
        ],
    }
}

/// Kubernetes conditions for `computed`, keeping `lastTransitionTime` of conditions whose
/// status did not change.
pub fn conditions(computed: &Computed, previous: &[Condition], now: Timestamp) -> Vec<Condition> {
    computed
        .conditions
        .iter()
        .map(|(type_, c)| {
            let status = if c.ok { "True" } else { "False" };
            let since = previous
                .iter()
                .find(|p| p.type_ == *type_ && p.status == status)
                .map(|p| p.last_transition_time.clone())
                .unwrap_or(Time(now));
            Condition {
                type_: (*type_).to_owned(),
                status: status.to_owned(),
                reason: c.reason.to_owned(),
                message: c.message.chars().take(32 * 1024).collect(),
                observed_generation: Some(computed.generation),
                last_transition_time: since,
            }
        })
        .collect()
}

fn api_resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::Policy => ApiResource::erase::<Policy>(&()),
        Kind::Breaker => ApiResource::erase::<Breaker>(&()),
        _ => ApiResource::erase::<Route>(&()),
    }
}

/// How long the writer remembers which object a deleted resource's name last named, so
/// that one re-created under that name a pass or more later is still told apart.
const REMEMBER_GONE: Duration = Duration::from_secs(600);

/// Which object (`metadata.uid`) a resource name last named and, once it was re-created,
/// which proxies' acknowledgements predate the new object.
///
/// Proxies acknowledge resources by kind, name and generation (the wire carries no UID),
/// and a re-created object starts over at generation 1, so an acknowledgement of the
/// deleted object would count for its successor. When the writer sees a new UID for a
/// name, it notes for each connected proxy what its acknowledgement must reach before it
/// counts ([`Floor`]); until then the proxy is waited for (`Pending`).
#[derive(Debug)]
struct Incarnation {
    uid: Option<String>,
    /// When a pass last saw the resource.
    seen: Instant,
    /// Proxies whose acknowledgements do not count for this object yet.
    floors: HashMap<ObjectKey, Floor>,
}

/// What a proxy must acknowledge before its acknowledgements count for a re-created
/// resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Floor {
    /// A proxy streaming from this replica: the version of the view this replica sends it
    /// now, which carries the new object (this replica's versions, which its
    /// acknowledgements use too), or a later one.
    AtLeast(u64),
    /// A proxy streaming from another replica, whose versions this replica cannot compare
    /// with its own: any version other than the one it had acknowledged.
    Past(Option<u64>),
}

impl Floor {
    fn reached(self, acked: Option<u64>) -> bool {
        match self {
            Floor::AtLeast(v) => acked.is_some_and(|a| a >= v),
            Floor::Past(v) => acked != v,
        }
    }
}

/// Notes which object `key` names now (see [`Incarnation`]) and returns its record; on a
/// new UID, every connected proxy gets a floor. `local` holds the (streams, last seen) of
/// this replica's own proxies, to tell them from peers' in `proxies`.
fn note_incarnation<'a>(
    incarnations: &'a mut HashMap<(Kind, ObjectKey), Incarnation>,
    id: (Kind, ObjectKey),
    uid: Option<&String>,
    views: &[(ObjectKey, Option<ProxyView>)],
    proxies: &BTreeMap<ObjectKey, ProxyState>,
    local: &HashMap<ObjectKey, (u32, u64)>,
) -> &'a Incarnation {
    let now = Instant::now();
    let inc = incarnations.entry(id).or_insert_with(|| Incarnation {
        uid: uid.cloned(),
        seen: now,
        floors: HashMap::new(),
    });
    inc.seen = now;
    if inc.uid.as_ref() != uid {
        inc.uid = uid.cloned();
        let sent: HashMap<&ObjectKey, u64> = views
            .iter()
            .filter_map(|(pod, v)| v.as_ref().map(|v| (pod, v.version)))
            .collect();
        inc.floors = proxies
            .iter()
            .filter(|(_, s)| s.streams > 0)
            .map(|(pod, s)| {
                let mine = local.get(pod) == Some(&(s.streams, s.last_seen));
                let floor = match sent.get(pod) {
                    Some(v) if mine => Floor::AtLeast(*v),
                    _ => Floor::Past(s.acked_version),
                };
                (pod.clone(), floor)
            })
            .collect();
    }
    inc.floors.retain(|pod, floor| {
        proxies
            .get(pod)
            .is_some_and(|s| s.streams > 0 && !floor.reached(s.acked_version))
    });
    inc
}

/// Writes status while this replica holds the Lease.
pub struct StatusWriter {
    client: Client,
    index: Arc<SharedIndex>,
    registry: Arc<Registry>,
    peers: Arc<Peers>,
    leader: watch::Receiver<bool>,
    recorder: Recorder,
    /// What was last written, by resource; the object's UID is part of it.
    written: HashMap<(Kind, ObjectKey), Computed>,
    /// Which object each resource name names (see [`Incarnation`]).
    incarnations: HashMap<(Kind, ObjectKey), Incarnation>,
}

impl StatusWriter {
    /// A writer reporting Events as `instance` of the operator; `peers` holds the other
    /// replicas' proxies.
    pub fn new(
        client: Client,
        index: Arc<SharedIndex>,
        registry: Arc<Registry>,
        peers: Arc<Peers>,
        leader: watch::Receiver<bool>,
        instance: String,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.to_owned(),
                instance: Some(instance),
            },
        );
        StatusWriter {
            client,
            index,
            registry,
            peers,
            leader,
            recorder,
            written: HashMap::new(),
            incarnations: HashMap::new(),
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut changes = self.index.changes();
        let mut peer_changes = self.peers.changes();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = changes.changed() => {}
                _ = peer_changes.changed() => {}
                _ = self.leader.changed() => {}
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            // Let a burst of changes (a re-list, many ACKs) settle into one pass.
            tokio::time::sleep(Duration::from_millis(100)).await;
            changes.borrow_and_update();
            peer_changes.borrow_and_update();
            if !*self.leader.borrow_and_update() {
                self.written.clear();
                continue;
            }
            if !self.index.is_synced() {
                continue;
            }
            self.pass().await;
        }
    }

    /// Reads what every proxy acknowledged, then the index at one instant: each
    /// resource's generation together with what every connected proxy (on this replica or
    /// another) should run per this index, and writes what changed.
    async fn pass(&mut self) {
        // Acknowledgements first: one that arrives after this read is counted next pass,
        // and none can be for a generation the index read below has not reached.
        let mut proxies = self.registry.snapshot();
        let local: HashMap<ObjectKey, (u32, u64)> = proxies
            .iter()
            .map(|(k, s)| (k.clone(), (s.streams, s.last_seen)))
            .collect();
        let mut reported = Vec::new();
        self.peers.merge_now(&mut proxies, &mut reported);
        let reported: HashMap<ObjectKey, Option<ProxyView>> = reported.into_iter().collect();
        let connected: Vec<ObjectKey> = proxies
            .iter()
            .filter(|(_, s)| s.streams > 0)
            .map(|(k, _)| k.clone())
            .collect();
        // What a peer's proxy needs comes from this index, not from the peer's report: the
        // report is rewritten a second or more after a change, and until then it would
        // leave a new resource's proxies uncounted ("1 of 1" where 4 need it). A pod this
        // index does not know yet keeps what its replica reported.
        let (views, states) = self
            .index
            .read_with_views_async(connected, |i, mut views| {
                for (pod, view) in &mut views {
                    if view.is_none()
                        && let Some(r) = reported.get(pod)
                    {
                        view.clone_from(r);
                    }
                }
                let mut states = Vec::new();
                for kind in [Kind::Route, Kind::Policy, Kind::Breaker] {
                    for key in i.resource_keys(kind) {
                        if let Some(state) = i.resource_state(kind, &key) {
                            states.push((kind, key, state));
                        }
                    }
                }
                (views, states)
            })
            .await;
        // The index first, then the registry, in one read: waiting for the index (a
        // re-list holds it for seconds) while holding the registry would stall every push
        // session's bookkeeping behind the re-list.
        let registry = &self.registry;
        self.index
            .read_async(|i| {
                registry.retain_disconnected(|pod| i.pod_service_account(pod).is_some());
            })
            .await;
        let mut seen = Vec::new();
        for (kind, key, state) in states {
            let inc = note_incarnation(
                &mut self.incarnations,
                (kind, key.clone()),
                state.uid.as_ref(),
                &views,
                &proxies,
                &local,
            );
            let stale = |pod: &ObjectKey, s: &ProxyState| {
                inc.floors
                    .get(pod)
                    .is_some_and(|f| !f.reached(s.acked_version))
            };
            let computed = compute_from(kind, &key, state, &views, &proxies, &stale);
            seen.push((kind, key.clone()));
            if self.written.get(&(kind, key.clone())) == Some(&computed) {
                continue;
            }
            // Leadership can end during a pass (the renew deadline passed): not one
            // more write after that.
            if !*self.leader.borrow() {
                return;
            }
            match self.write(kind, &key, &computed).await {
                Ok(true) => {
                    self.written.insert((kind, key), computed);
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(kind = kind.as_str(), %key, %error, "status write failed")
                }
            }
        }
        let seen: std::collections::HashSet<_> = seen.into_iter().collect();
        self.written.retain(|k, _| seen.contains(k));
        self.incarnations
            .retain(|_, inc| inc.seen.elapsed() < REMEMBER_GONE);
    }

    /// Writes one status; `Ok(false)` when the object changed meanwhile (a newer
    /// generation, or gone) and the next pass will catch up.
    async fn write(
        &self,
        kind: Kind,
        key: &ObjectKey,
        computed: &Computed,
    ) -> Result<bool, kube::Error> {
        let ar = api_resource(kind);
        let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), &key.namespace, &ar);
        let Some(obj) = api.get_opt(&key.name).await? else {
            return Ok(false);
        };
        if obj.metadata.generation != Some(computed.generation)
            || (computed.uid.is_some() && obj.metadata.uid != computed.uid)
        {
            return Ok(false);
        }
        let previous: Vec<Condition> = obj
            .data
            .get("status")
            .and_then(|s| s.get("conditions"))
            .and_then(|c| serde_json::from_value(c.clone()).ok())
            .unwrap_or_default();
        let conditions = conditions(computed, &previous, Timestamp::now());
        let mut status = json!({
            "observedGeneration": computed.generation,
            "conditions": conditions,
        });
        if let Some(n) = computed.rule_count {
            status["ruleCount"] = json!(n);
        }
        api.patch_status(
            &key.name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await?;
        tracing::debug!(kind = kind.as_str(), %key, "status written");

        // An Event for each condition that has just turned False.
        let reference = ObjectReference {
            api_version: Some(Route::api_version(&()).into_owned()),
            kind: Some(kind.as_str().to_owned()),
            name: Some(key.name.clone()),
            namespace: Some(key.namespace.clone()),
            uid: obj.metadata.uid.clone(),
            ..ObjectReference::default()
        };
        for (type_, c) in &computed.conditions {
            let was_false = previous
                .iter()
                .any(|p| p.type_ == *type_ && p.status == "False" && p.reason == c.reason);
            if c.ok
                || was_false
                || c.reason == reasons::PENDING
                || c.reason == reasons::NOT_ACCEPTED
                || c.reason == reasons::NO_PROXIES
            {
                continue;
            }
            let event = Event {
                type_: EventType::Warning,
                reason: c.reason.to_owned(),
                note: Some(c.message.chars().take(1000).collect()),
                action: format!("Set{type_}"),
                secondary: None,
            };
            if let Err(error) = self.recorder.publish(&event, &reference).await {
                tracing::warn!(%key, %error, "event not recorded");
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::{index::Object, push::NackState};

    fn r(name: &str, generation: i64) -> ResourceRef {
        ResourceRef {
            kind: "Route".into(),
            namespace: "shop".into(),
            name: name.into(),
            generation,
            requires: Vec::new(),
        }
    }

    fn view(refs: &[ResourceRef]) -> Option<ProxyView> {
        Some(ProxyView {
            resources: refs.iter().cloned().collect(),
            ..ProxyView::default()
        })
    }

    /// A proxy that acknowledged `acked` and, as the real proxy decides, enforces what it
    /// has the features for.
    fn proxy(acked: &[ResourceRef], nack: Option<&str>, streams: u32) -> ProxyState {
        ProxyState {
            streams,
            acked_resources: acked.iter().cloned().collect::<BTreeSet<_>>(),
            enforcement: Some(weft_proxy::enforce::report(acked)),
            nack: nack.map(|n| NackState {
                version: 9,
                reason: n.into(),
            }),
            ..ProxyState::default()
        }
    }

    fn object(kind: Kind, name: &str, spec: serde_json::Value) -> (ObjectKey, Object) {
        let o: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": kind.as_str(),
            "metadata": {"name": name, "namespace": "shop", "generation": 4,
                         "creationTimestamp": "2025-01-01T00:00:00Z"},
            "spec": spec,
        }))
        .unwrap();
        crate::index::model::weft_resource(kind, &o)
    }

    type Views = Vec<(ObjectKey, Option<ProxyView>)>;

    /// Namespace `shop` with Service web, three meshed client pods selected by a Policy, and
    /// the given resources; the views the operator wants for the pods, and the pods' proxies
    /// having acknowledged them all, each telling what it enforces as weft-proxy does.
    fn acked_by_all(
        resources: Vec<(ObjectKey, Object)>,
    ) -> (Views, BTreeMap<ObjectKey, ProxyState>) {
        let mut index = crate::index::Index::new("cluster.local");
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "198.19.0.10", "clusterIPs": ["198.19.0.10"],
                     "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]}
        }))
        .unwrap();
        let (k, o) = crate::index::model::service(&svc);
        index.apply(k, o);
        let mut pods = Vec::new();
        for name in ["a", "b", "c"] {
            let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "shop", "labels": {"app": "client"}},
                "spec": {"serviceAccountName": "client", "containers": []}
            }))
            .unwrap();
            let (k, o) = crate::index::model::pod(&p);
            index.apply(k.clone(), o);
            pods.push(k);
        }
        for (k, o) in resources {
            index.apply(k, o);
        }
        let views: Vec<(ObjectKey, Option<ProxyView>)> =
            pods.iter().map(|p| (p.clone(), index.view(p))).collect();
        let proxies = views
            .iter()
            .map(|(pod, view)| {
                let acked: Vec<ResourceRef> = view
                    .as_ref()
                    .map(|v| v.resources.iter().cloned().collect())
                    .unwrap_or_default();
                (pod.clone(), proxy(&acked, None, 1))
            })
            .collect();
        (views, proxies)
    }

    #[test]
    fn resources_acked_by_every_proxy_but_not_enforced_are_not_programmed() {
        let cases = [
            (
                object(
                    Kind::Policy,
                    "rules",
                    json!({"target": {"selector": {"matchLabels": {"app": "client"}}},
                           "mtls": {"mode": "Permissive"}, "defaultAction": "Allow",
                           "rules": [{"action": "Deny", "to": [{"paths": [{"prefix": "/admin"}]}]}],
                           "rateLimit": {"requestsPerSecond": 10}}),
                ),
                // Rules and the rate limit are enforced; the mode waits for mTLS.
                "spec.mtls.mode: not enforced by weft-proxy",
            ),
            (
                object(
                    Kind::Policy,
                    "strict",
                    json!({"target": {"selector": {"matchLabels": {"app": "client"}}}}),
                ),
                "spec.mtls.mode: not enforced by weft-proxy",
            ),
        ];
        for ((key, object), want) in cases {
            let kind = object.kind();
            let (views, proxies) = acked_by_all(vec![(key.clone(), object)]);
            let c = programmed(kind, &key, 4, &views, &proxies);
            assert!(!c.ok, "{kind:?}: {c:?}");
            assert_eq!(c.reason, reasons::NOT_ENFORCED, "{kind:?}: {c:?}");
            assert!(
                c.message
                    .contains("acknowledged by 3 of 3 proxies; enforced by 0 of 3"),
                "{kind:?}: {}",
                c.message
            );
            assert!(c.message.contains(want), "{kind:?}: {}", c.message);
            assert!(
                c.message.contains("(3 proxies: shop/a, shop/b, shop/c)"),
                "{}",
                c.message
            );
        }
    }

    #[test]
    fn a_catch_all_split_with_a_timeout_acked_by_every_proxy_is_programmed() {
        let (key, route) = object(
            Kind::Route,
            "split",
            json!({"service": {"name": "web"}, "rules": [
                {"backends": [{"name": "web", "weight": 90}, {"name": "web", "port": 80, "weight": 10}],
                 "timeout": "5s"},
                // Behind the catch-all: no request reaches it, so it asks nothing.
                {"matches": [{"method": "GET"}], "backends": [{"name": "web"}]}
            ]}),
        );
        let (views, mut proxies) = acked_by_all(vec![(key.clone(), route)]);
        let c = programmed(Kind::Route, &key, 4, &views, &proxies);
        assert!(c.ok, "{c:?}");
        assert_eq!(c.reason, reasons::PROGRAMMED);
        assert_eq!(
            c.message,
            "generation 4 acknowledged by 3 of 3 proxies, and enforced by all"
        );

        // A proxy that does not report enforcement (older than the report) counts as not
        // enforcing: status claims only what a proxy said.
        let a = ObjectKey::new("shop", "a");
        if let Some(s) = proxies.get_mut(&a) {
            s.enforcement = None;
        }
        let c = programmed(Kind::Route, &key, 4, &views, &proxies);
        assert!(!c.ok);
        assert_eq!(c.reason, reasons::NOT_ENFORCED);
        assert!(
            c.message.contains("enforced by 2 of 3")
                && c.message.contains("does not report what it enforces")
                && c.message.contains("(1 proxy: shop/a)"),
            "{}",
            c.message
        );
    }

    #[test]
    fn programmed_counts_only_proxies_that_need_the_resource() {
        let key = ObjectKey::new("shop", "web");
        let pods: Vec<ObjectKey> = ["a", "b", "c", "d"]
            .iter()
            .map(|p| ObjectKey::new("shop", *p))
            .collect();
        let views = vec![
            (pods[0].clone(), view(&[r("web", 2)])),
            (pods[1].clone(), view(&[r("web", 2)])),
            (pods[2].clone(), view(&[r("web", 2)])),
            (pods[3].clone(), view(&[])),
        ];
        let mut proxies = BTreeMap::from([
            (pods[0].clone(), proxy(&[r("web", 2)], None, 1)),
            (pods[1].clone(), proxy(&[r("web", 1)], None, 1)),
            (pods[2].clone(), proxy(&[r("web", 1)], Some("too big"), 1)),
            (pods[3].clone(), proxy(&[], None, 1)),
        ]);
        let c = programmed(Kind::Route, &key, 2, &views, &proxies);
        assert!(!c.ok);
        assert_eq!(c.reason, reasons::REJECTED);
        assert!(c.message.contains("1 of 3"), "{}", c.message);
        assert!(c.message.contains("shop/c (too big)"), "{}", c.message);
        assert!(c.message.contains("waiting for 1: shop/b"), "{}", c.message);

        proxies.insert(pods[1].clone(), proxy(&[r("web", 2)], None, 1));
        proxies.insert(pods[2].clone(), proxy(&[r("web", 2)], None, 1));
        let c = programmed(Kind::Route, &key, 2, &views, &proxies);
        assert!(c.ok, "{c:?}");
        assert!(c.message.contains("3 of 3"), "{}", c.message);
    }

    #[test]
    fn a_resource_no_connected_proxy_needs_is_not_programmed() {
        let key = ObjectKey::new("shop", "web");
        let a = ObjectKey::new("shop", "a");
        // A connected proxy whose view does not carry the Route, and a pod that needs it
        // but whose proxy is not connected: nobody that needs it is connected.
        let views = vec![
            (a.clone(), view(&[])),
            (ObjectKey::new("shop", "b"), view(&[r("web", 2)])),
        ];
        let proxies = BTreeMap::from([
            (a, proxy(&[], None, 1)),
            (ObjectKey::new("shop", "b"), proxy(&[], None, 0)),
        ]);
        let c = programmed(Kind::Route, &key, 2, &views, &proxies);
        assert!(!c.ok, "{c:?}");
        assert_eq!(c.reason, reasons::NO_PROXIES);
        assert!(
            c.message.starts_with(
                "no connected proxy needs this Route, so nothing enforces it yet; it is sent to the proxies of meshed pods that see namespace shop"
            ),
            "{}",
            c.message
        );
        let c = programmed(Kind::Policy, &key, 2, &[], &BTreeMap::new());
        assert_eq!(c.reason, reasons::NO_PROXIES);
        assert!(
            c.message.contains("the meshed pods it selects"),
            "{}",
            c.message
        );
    }

    #[test]
    fn acks_of_a_deleted_object_do_not_count_for_one_recreated_under_its_name() {
        let key = ObjectKey::new("shop", "web");
        // `a` streams from this replica, which sends it version 7; `b` from another.
        let (a, b) = (ObjectKey::new("shop", "a"), ObjectKey::new("shop", "b"));
        let mut views = vec![
            (a.clone(), view(&[r("web", 1)])),
            (b.clone(), view(&[r("web", 1)])),
        ];
        if let Some(v) = views[0].1.as_mut() {
            v.version = 7;
        }
        let acked = |version: u64, last_seen: u64| ProxyState {
            acked_version: Some(version),
            last_seen,
            ..proxy(&[r("web", 1)], None, 1)
        };
        let mut proxies = BTreeMap::from([(a.clone(), acked(5, 10)), (b.clone(), acked(40, 11))]);
        let local = HashMap::from([(a.clone(), (1, 10))]);
        let mut incarnations = HashMap::new();
        let id = (Kind::Route, key.clone());
        let (old, new) = ("uid-old".to_owned(), "uid-new".to_owned());
        let counted = |inc: &Incarnation, proxies: &BTreeMap<ObjectKey, ProxyState>| {
            let stale = |pod: &ObjectKey, s: &ProxyState| {
                inc.floors
                    .get(pod)
                    .is_some_and(|f| !f.reached(s.acked_version))
            };
            programmed_with(Kind::Route, &key, 1, &views, proxies, &stale)
        };

        let inc = note_incarnation(
            &mut incarnations,
            id.clone(),
            Some(&old),
            &views,
            &proxies,
            &local,
        );
        assert!(
            counted(inc, &proxies).ok,
            "the object first seen: its acks count"
        );

        // Deleted and re-created at generation 1: the acks of the old one do not count.
        let inc = note_incarnation(
            &mut incarnations,
            id.clone(),
            Some(&new),
            &views,
            &proxies,
            &local,
        );
        let c = counted(inc, &proxies);
        assert_eq!(c.reason, reasons::PENDING, "{c:?}");
        assert!(
            c.message.contains("acknowledged by 0 of 2"),
            "{}",
            c.message
        );

        // `a` acknowledges the view carrying the new object; `b` a newer version.
        proxies.insert(a.clone(), acked(7, 10));
        let inc = note_incarnation(
            &mut incarnations,
            id.clone(),
            Some(&new),
            &views,
            &proxies,
            &local,
        );
        let c = counted(inc, &proxies);
        assert!(
            c.message.contains("acknowledged by 1 of 2")
                && c.message.contains("waiting for 1: shop/b"),
            "{}",
            c.message
        );
        proxies.insert(b.clone(), acked(41, 12));
        let inc = note_incarnation(&mut incarnations, id, Some(&new), &views, &proxies, &local);
        assert!(inc.floors.is_empty());
        assert!(counted(inc, &proxies).ok);
    }

    #[test]
    fn transition_times_survive_unchanged_conditions() {
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        let t1 = Timestamp::from_second(1_800_000_000).unwrap();
        let ok = |ok| CondState {
            ok,
            reason: "R",
            message: "m".into(),
        };
        let first = Computed {
            uid: None,
            generation: 1,
            rule_count: None,
            conditions: vec![(ACCEPTED, ok(true)), (PROGRAMMED, ok(false))],
        };
        let before = conditions(&first, &[], t0);
        let second = Computed {
            generation: 2,
            conditions: vec![(ACCEPTED, ok(true)), (PROGRAMMED, ok(true))],
            ..first
        };
        let after = conditions(&second, &before, t1);
        assert_eq!(after[0].last_transition_time, Time(t0));
        assert_eq!(after[1].last_transition_time, Time(t1));
        assert_eq!(after[1].observed_generation, Some(2));
    }
}
