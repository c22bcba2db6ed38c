//! ACK reports shared between replicas. A proxy streams from one replica, but status is
//! written by the Lease holder alone: each replica publishes the state of the proxies
//! connected to it in a ConfigMap beside the Lease, and every replica watches the others',
//! so `Programmed` and `/proxies` count every proxy, whichever replica serves it.
//!
//! ```text
//! replica A: Registry ─publish─▶ ConfigMap weft-acks-A ─┐
//! replica B: Registry ─publish─▶ ConfigMap weft-acks-B ─┼─watch─▶ Peers ─merge─▶ status, /proxies
//! ```
//!
//! A report is rewritten when its proxies' state changes (at most every
//! [`SETTLE`]) and at least every heartbeat period; a report not rewritten for the
//! `max_age` given to [`Peers::new`] belongs to a replica that is gone and is ignored. A replica that
//! shuts down deletes its report.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weft_api::push::ResourceRef;

use super::FIELD_MANAGER;
use crate::{
    index::{ObjectKey, ProxyView, shared::SharedIndex},
    push::{ProxyState, Registry},
};

/// The label that marks a ConfigMap as a replica's ACK report.
pub const REPORT_LABEL: &str = "weft.dev/ack-report";
/// The data key holding the report's JSON.
const DATA_KEY: &str = "report.json";
/// How long a burst of ACKs may settle before the report is rewritten: at most one write
/// per second per replica, however busy the mesh.
pub const SETTLE: Duration = Duration::from_secs(1);

/// One replica's report: the proxies streaming from it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// The replica (its Lease identity).
    pub replica: String,
    /// When the report was written, in seconds since the epoch.
    pub updated: u64,
    /// The connected proxies' state.
    pub proxies: Vec<ReportedProxy>,
}

/// One proxy in a report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportedProxy {
    /// What the proxy runs, as the replica serving it knows.
    #[serde(flatten)]
    pub state: ProxyState,
    /// The Weft resources (with generations) that replica wants the proxy to run. The
    /// status writer computes what a proxy needs from its own index, in the same read as
    /// each resource's generation (this report lags a change by a second or more); it uses
    /// these only for a pod its index does not know yet.
    pub needs: BTreeSet<ResourceRef>,
}

/// The name of `replica`'s report.
pub fn report_name(replica: &str) -> String {
    format!("weft-acks-{replica}")
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The other replicas' latest reports.
#[derive(Debug)]
pub struct Peers {
    own: String,
    max_age: Duration,
    reports: Mutex<BTreeMap<String, Report>>,
    changed: watch::Sender<u64>,
}

impl Peers {
    /// Reports of replicas other than `own`, ignored once older than `max_age`.
    pub fn new(own: impl Into<String>, max_age: Duration) -> Self {
        Peers {
            own: own.into(),
            max_age,
            reports: Mutex::new(BTreeMap::new()),
            changed: watch::channel(0).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Report>> {
        self.reports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes when a peer's report changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn set(&self, reports: impl IntoIterator<Item = Report>, replace: bool) {
        {
            let mut map = self.lock();
            if replace {
                map.clear();
            }
            for r in reports {
                if r.replica != self.own {
                    map.insert(r.replica.clone(), r);
                }
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    fn remove(&self, replica: &str) {
        self.lock().remove(replica);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Adds the peers' fresh reports to `proxies` (this replica's registry) and `views`
    /// (what this replica wants its subscribers to run): a proxy with an open stream wins
    /// over one without; between two open streams (a proxy that just moved), the one
    /// heard from last. A peer's proxy comes with the resources that peer wants it to run.
    pub fn merge(
        &self,
        proxies: &mut BTreeMap<ObjectKey, ProxyState>,
        views: &mut Vec<(ObjectKey, Option<ProxyView>)>,
        now: u64,
    ) {
        let max_age = self.max_age.as_secs();
        let mut taken = BTreeMap::new();
        for report in self.lock().values() {
            if now.saturating_sub(report.updated) > max_age {
                continue;
            }
            for p in &report.proxies {
                let Some(key) = ObjectKey::parse(&p.state.pod) else {
                    continue;
                };
                let take = match proxies.get(&key) {
                    None => true,
                    Some(mine) => {
                        (mine.streams == 0 && p.state.streams > 0)
                            || (mine.streams > 0
                                && p.state.streams > 0
                                && p.state.last_seen > mine.last_seen)
                    }
                };
                if take {
                    proxies.insert(key.clone(), p.state.clone());
                    taken.insert(key, p.needs.clone());
                }
            }
        }
        if taken.is_empty() {
            return;
        }
        views.retain(|(k, _)| !taken.contains_key(k));
        views.extend(taken.into_iter().map(|(k, resources)| {
            (
                k,
                Some(ProxyView {
                    resources,
                    ..ProxyView::default()
                }),
            )
        }));
    }

    /// [`Peers::merge`] at the current time.
    pub fn merge_now(
        &self,
        proxies: &mut BTreeMap<ObjectKey, ProxyState>,
        views: &mut Vec<(ObjectKey, Option<ProxyView>)>,
    ) {
        self.merge(proxies, views, now_secs());
    }
}

fn parse(cm: &ConfigMap) -> Option<Report> {
    let text = cm.data.as_ref()?.get(DATA_KEY)?;
    match serde_json::from_str(text) {
        Ok(r) => Some(r),
        Err(error) => {
            tracing::warn!(configmap = %cm.name_any(), %error, "unreadable ACK report skipped");
            None
        }
    }
}

/// Follows the ACK reports in `namespace` into `peers` until `shutdown`.
pub async fn watch_peers(
    client: Client,
    namespace: String,
    peers: Arc<Peers>,
    shutdown: CancellationToken,
) {
    let api = Api::<ConfigMap>::namespaced(client, &namespace);
    let config = watcher::Config::default().labels(REPORT_LABEL);
    let stream = watcher::watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    let mut relist = Vec::new();
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            e = stream.next() => e,
        };
        match event {
            None => return,
            Some(Ok(watcher::Event::Apply(cm))) => peers.set(parse(&cm), false),
            Some(Ok(watcher::Event::Delete(cm))) => {
                if let Some(r) = parse(&cm) {
                    peers.remove(&r.replica);
                }
            }
            Some(Ok(watcher::Event::Init)) => relist.clear(),
            Some(Ok(watcher::Event::InitApply(cm))) => relist.extend(parse(&cm)),
            Some(Ok(watcher::Event::InitDone)) => peers.set(std::mem::take(&mut relist), true),
            Some(Err(error)) => tracing::warn!(%error, "ACK report watch failed; retrying"),
        }
    }
}

/// Publishes this replica's report in `namespace` whenever `changes` fires (settled for
/// [`SETTLE`]) and at least every `heartbeat`, until `shutdown`; then deletes it.
pub async fn publish(
    client: Client,
    namespace: String,
    replica: String,
    registry: Arc<Registry>,
    index: Arc<SharedIndex>,
    heartbeat: Duration,
    shutdown: CancellationToken,
) {
    let api = Api::<ConfigMap>::namespaced(client, &namespace);
    let name = report_name(&replica);
    let mut changes = index.changes();
    let mut last: Option<(Vec<ReportedProxy>, tokio::time::Instant)> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = changes.changed() => tokio::time::sleep(SETTLE).await,
            () = tokio::time::sleep(heartbeat) => {}
        }
        changes.borrow_and_update();
        let views: BTreeMap<ObjectKey, Option<ProxyView>> =
            index.desired_views_async().await.into_iter().collect();
        let proxies: Vec<ReportedProxy> = registry
            .snapshot()
            .into_iter()
            .filter(|(_, p)| p.streams > 0)
            .map(|(key, state)| ReportedProxy {
                needs: views
                    .get(&key)
                    .and_then(|v| v.as_ref())
                    .map(|v| v.resources.iter().map(ResourceRef::bare).collect())
                    .unwrap_or_default(),
                state,
            })
            .collect();
        let due = last
            .as_ref()
            .is_none_or(|(sent, at)| *sent != proxies || at.elapsed() >= heartbeat.mul_f32(0.9));
        if !due {
            continue;
        }
        let report = Report {
            replica: replica.clone(),
            updated: now_secs(),
            proxies: proxies.clone(),
        };
        let Ok(text) = serde_json::to_string(&report) else {
            continue;
        };
        let cm = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "labels": {REPORT_LABEL: "true"}},
            "data": {DATA_KEY: text},
        });
        match api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&cm),
            )
            .await
        {
            Ok(_) => last = Some((proxies, tokio::time::Instant::now())),
            Err(error) => tracing::warn!(%error, report = %name, "ACK report not written"),
        }
    }
    if let Err(error) = api.delete(&name, &DeleteParams::default()).await {
        tracing::debug!(%error, report = %name, "ACK report not deleted");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(pod: &str, streams: u32, acked: u64, last_seen: u64) -> ProxyState {
        ProxyState {
            pod: pod.into(),
            streams,
            acked_version: Some(acked),
            last_seen,
            ..ProxyState::default()
        }
    }

    fn report(replica: &str, updated: u64, proxies: Vec<ProxyState>) -> Report {
        Report {
            replica: replica.into(),
            updated,
            proxies: proxies
                .into_iter()
                .map(|state| ReportedProxy {
                    needs: BTreeSet::from([route("web", 3)]),
                    state,
                })
                .collect(),
        }
    }

    fn route(name: &str, generation: i64) -> ResourceRef {
        ResourceRef {
            kind: "Route".into(),
            namespace: "ns".into(),
            name: name.into(),
            generation,
            requires: vec![weft_api::push::Requirement {
                feature: weft_api::push::feature::ROUTE_BACKENDS.into(),
                field: "spec.rules[0].backends".into(),
            }],
        }
    }

    #[test]
    fn fresh_peer_reports_add_their_proxies_and_connected_streams_win() {
        let peers = Peers::new("a", Duration::from_secs(30));
        peers.set(
            [
                report(
                    "b",
                    1000,
                    vec![state("ns/p1", 1, 7, 990), state("ns/p2", 1, 5, 995)],
                ),
                // Gone for longer than max_age: ignored.
                report("c", 900, vec![state("ns/p3", 1, 9, 900)]),
                // Our own report, seen through the watch: ignored.
                report("a", 1000, vec![state("ns/p4", 1, 9, 1000)]),
            ],
            true,
        );
        let p = |name: &str| ObjectKey::new("ns", name);
        let mut proxies = BTreeMap::from([
            // Disconnected here, connected at b: b's state wins.
            (p("p1"), state("ns/p1", 0, 6, 999)),
            // Connected here and at b, heard from here last: ours wins.
            (p("p2"), state("ns/p2", 1, 6, 999)),
        ]);
        let mut views = vec![(p("p1"), None), (p("p2"), None)];
        peers.merge(&mut proxies, &mut views, 1005);
        let acked = |name: &str| proxies.get(&p(name)).and_then(|s| s.acked_version);
        assert_eq!(acked("p1"), Some(7));
        assert_eq!(acked("p2"), Some(6));
        assert_eq!(acked("p3"), None);
        assert_eq!(acked("p4"), None);
        // p1's view is now what b wants it to run; p2's stays ours.
        let view = |name: &str| views.iter().find(|(k, _)| *k == p(name)).unwrap().1.clone();
        assert_eq!(
            view("p1").unwrap().resources,
            BTreeSet::from([route("web", 3)])
        );
        assert!(view("p2").is_none());
        assert_eq!(views.len(), 2);

        peers.remove("b");
        let mut none = BTreeMap::new();
        peers.merge(&mut none, &mut Vec::new(), 1005);
        assert!(none.is_empty());
    }

    #[test]
    fn a_report_survives_a_json_round_trip_with_its_acknowledged_resources() {
        let mut p = state("ns/p1", 1, 7, 990);
        p.acked_resources.insert(route("web", 3));
        // What the proxy enforces travels too: the status writer may be another replica.
        p.enforcement = Some(weft_api::push::Enforcement {
            proxy: "weft-proxy 0.1.0".into(),
            enforced: vec![route("web", 3).bare()],
            not_enforced: Vec::new(),
        });
        let r = report("b", 1000, vec![p]);
        let text = serde_json::to_string(&r).unwrap();
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "weft-acks-b"},
            "data": {DATA_KEY: text},
        }))
        .unwrap();
        assert_eq!(parse(&cm), Some(r));
        let garbage: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "weft-acks-x"},
            "data": {DATA_KEY: "{not json"},
        }))
        .unwrap();
        assert_eq!(parse(&garbage), None);
    }
}
