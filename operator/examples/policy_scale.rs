//! Scale benchmark of Policies in the index (not a test: it measures and prints).
//!
//! One thread, no network: the real [`Index`] behind the real [`SharedIndex`], fed with
//! synthetic cluster objects through the same conversions the watches use, and one
//! subscription (a `watch` receiver, as each push session holds) per meshed pod. What it
//! measures is what the watch tasks pay per event, under the index lock: the index change,
//! the namespace rebuilt, and each touched subscriber's view recomputed and compared.
//! Encoding and sending the changed views is the push sessions' work, proportional to the
//! subscribers whose view changed (printed), and measured by `push_scale`.
//!
//! ```sh
//! cargo run --release -p weft-operator --example policy_scale -- 1000
//! ```
//!
//! The argument is the number of Policies (default 0). Mesh, by environment:
//! `WEFT_POLICY_SCALE_PODS` meshed pods (default 10,000) in `WEFT_POLICY_SCALE_NAMESPACES`
//! namespaces (default 100). Each namespace has one Service per 10 of its pods (selector
//! `app=a<k>`), with one EndpointSlice listing its 10 pods ready at 8080; each pod also
//! declares 9090, which no Service lists, so every pod is in its namespace's
//! `pods.<namespace>` config too. Policies are spread evenly over the namespaces; of each
//! ten: one namespace-wide (empty selector, allow by default), six selecting one Service's
//! pods by label with an allow rule (deny by default), two targeting a Service with a rate
//! limit, one selecting by a `tier In (..)` expression, Permissive.
//!
//! Each re-list (a watch's `replace`, under the index lock like every change) is printed
//! with how long a change issued from a second thread while it runs (once it holds the
//! lock) waited for that lock: how long the re-list holds up every other change and
//! push. That change is empty, so that it alters no view the re-list's count reads; a
//! real one then adds its own cost (those printed below).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::api::DynamicObject;
use serde_json::json;
use tokio::sync::watch;
use weft_operator::{
    index::{Affected, Index, Kind, Object, ObjectKey, ProxyView, model, shared::SharedIndex},
    metrics::Metrics,
};

/// Pods behind each Service.
const PODS_PER_SERVICE: usize = 10;
/// Changes measured of each kind, unless `WEFT_POLICY_SCALE_CHANGES` says otherwise.
const CHANGES: usize = 50;

struct Mesh {
    pods: usize,
    namespaces: usize,
    policies: usize,
}

impl Mesh {
    fn pods_per_ns(&self) -> usize {
        self.pods / self.namespaces
    }

    fn services_per_ns(&self) -> usize {
        (self.pods_per_ns() / PODS_PER_SERVICE).max(1)
    }

    /// The Policies of namespace `ns`: the remainder goes to the first namespaces.
    fn policies_in(&self, ns: usize) -> usize {
        self.policies / self.namespaces + usize::from(ns < self.policies % self.namespaces)
    }
}

fn ip(prefix: u8, n: usize) -> String {
    format!(
        "{prefix}.{}.{}.{}",
        (n >> 16) & 255,
        (n >> 8) & 255,
        n & 255
    )
}

fn pod(mesh: &Mesh, ns: usize, p: usize, global: usize) -> (ObjectKey, Object) {
    let app = p / PODS_PER_SERVICE % mesh.services_per_ns();
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": format!("pod{p}"), "namespace": format!("ns{ns}"),
                     "labels": {"app": format!("a{app}"), "tier": format!("t{}", p % 3)}},
        "spec": {"serviceAccountName": format!("sa{app}"),
                 "containers": [{"name": "app", "ports": [{"containerPort": 8080}, {"containerPort": 9090}]}]},
        "status": {"phase": "Running", "podIPs": [{"ip": ip(10, global)}]},
    }))
    .unwrap();
    model::pod(&p)
}

fn service(ns: usize, s: usize, global: usize) -> (ObjectKey, Object) {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": format!("a{s}"), "namespace": format!("ns{ns}")},
        "spec": {"clusterIP": ip(172, global), "selector": {"app": format!("a{s}")},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    model::service(&svc)
}

/// Service `a<s>`'s slice: its pods' addresses, ready except `not_ready` (an index into
/// them).
fn slice(mesh: &Mesh, ns: usize, s: usize, not_ready: Option<usize>) -> (ObjectKey, Object) {
    let endpoints: Vec<_> = (0..PODS_PER_SERVICE)
        .filter_map(|e| {
            let p = s * PODS_PER_SERVICE + e;
            (p < mesh.pods_per_ns()).then(|| {
                json!({"addresses": [ip(10, ns * mesh.pods_per_ns() + p)],
                       "conditions": {"ready": not_ready != Some(e)},
                       "targetRef": {"kind": "Pod", "name": format!("pod{p}"), "namespace": format!("ns{ns}")}})
            })
        })
        .collect();
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": format!("a{s}-x"), "namespace": format!("ns{ns}"),
                     "labels": {"kubernetes.io/service-name": format!("a{s}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": endpoints,
    }))
    .unwrap();
    model::endpoint_slice(&slice)
}

/// Policy `q` of namespace `ns`, at `generation` (which also sets its rate, so that each
/// generation is another spec).
fn policy(mesh: &Mesh, ns: usize, q: usize, generation: i64) -> (ObjectKey, Object) {
    let app = format!("a{}", q % mesh.services_per_ns());
    let spec = match q % 10 {
        0 => json!({"target": {"selector": {}}, "defaultAction": "Allow",
                    "rateLimit": {"requestsPerSecond": 1000 + generation}}),
        1..=6 => json!({"target": {"selector": {"matchLabels": {"app": app}}},
                        "rules": [{"action": "Allow", "from": [{"namespaces": [format!("ns{ns}")]}],
                                   "to": [{"ports": [8080]}]}],
                        "rateLimit": {"requestsPerSecond": 1000 + generation}}),
        7 | 8 => json!({"target": {"service": app}, "defaultAction": "Allow",
                        "rateLimit": {"requestsPerSecond": 100 + generation, "per": "ClientIdentity"}}),
        _ => json!({"target": {"selector": {"matchExpressions": [
                        {"key": "tier", "operator": "In", "values": ["t0", "t1"]}]}},
                    "mtls": {"mode": "Permissive"}, "defaultAction": "Allow",
                    "rateLimit": {"requestsPerSecond": 10 + generation}}),
    };
    let o: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "Policy",
        "metadata": {"name": format!("p{q}"), "namespace": format!("ns{ns}"), "generation": generation,
                     "creationTimestamp": format!("2026-01-01T00:{:02}:{:02}Z", q / 60 % 60, q % 60)},
        "spec": spec,
    }))
    .unwrap();
    model::weft_resource(Kind::Policy, &o)
}

type Objects = Vec<(ObjectKey, Object)>;

/// The mesh as the watches would list it: (Services, slices, pods, Policies).
fn objects(mesh: &Mesh, generation: i64) -> (Objects, Objects, Objects, Objects) {
    let (mut services, mut slices, mut pods, mut policies) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ns in 0..mesh.namespaces {
        for s in 0..mesh.services_per_ns() {
            services.push(service(ns, s, ns * mesh.services_per_ns() + s));
            slices.push(slice(mesh, ns, s, None));
        }
        for p in 0..mesh.pods_per_ns() {
            pods.push(pod(mesh, ns, p, ns * mesh.pods_per_ns() + p));
        }
        for q in 0..mesh.policies_in(ns) {
            policies.push(policy(mesh, ns, q, generation));
        }
    }
    (services, slices, pods, policies)
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// This thread's time on a CPU (the first field of its schedstat, in nanoseconds): the
/// benchmark runs on one thread, so it is the operator work measured. The kernel of these
/// machines advances it by whole scheduler ticks (4 ms), so it is only exact summed over
/// many changes; single changes are also timed by the wall clock, which on a busy machine
/// includes time the thread waited for a core.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    Duration::from_nanos(
        stat.split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
    )
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

struct Subscribers {
    keys: Vec<ObjectKey>,
    receivers: Vec<watch::Receiver<Option<ProxyView>>>,
}

impl Subscribers {
    /// How many views changed since the last call (and marks them seen).
    fn changed(&mut self) -> usize {
        self.receivers
            .iter_mut()
            .filter(|rx| rx.has_changed().unwrap_or(false))
            .map(|rx| rx.borrow_and_update().is_some())
            .count()
    }
}

/// One change measured.
struct Sample {
    cpu: Duration,
    wall: Duration,
    /// Subscribers whose view was recomputed (`Index::is_affected`).
    touched: usize,
    /// Subscribers whose view changed (woken).
    changed: usize,
    /// The wall time of asking every subscriber whether the change touches it, as
    /// `SharedIndex::update` did until it asked only those the change may touch (its
    /// pods', its namespaces', and pods that see other namespaces): what that saves, not
    /// a part of `wall` any more.
    scan: Duration,
}

/// Applies `change` through the shared index and measures it.
fn measure(
    shared: &SharedIndex,
    subs: &mut Subscribers,
    change: impl FnOnce(&mut Index) -> Affected,
) -> Sample {
    let seen = Mutex::new((Affected::default(), Duration::ZERO, Duration::ZERO));
    let (cpu_before, wall_before) = (cpu(), Instant::now());
    shared.update(|i| {
        let affected = change(i);
        // Keeping a copy for the count below is the benchmark's work, not the operator's.
        let (c, w) = (cpu(), Instant::now());
        let copy = affected.clone();
        *seen.lock().unwrap() = (copy, cpu() - c, w.elapsed());
        affected
    });
    let (wall, spent) = (wall_before.elapsed(), cpu() - cpu_before);
    let (affected, copy_cpu, copy_wall) = seen.into_inner().unwrap();
    let t = Instant::now();
    let touched = shared.read(|i| {
        subs.keys
            .iter()
            .filter(|k| i.is_affected(k, &affected))
            .count()
    });
    let scan = t.elapsed();
    Sample {
        scan,
        cpu: spent.saturating_sub(copy_cpu),
        wall: wall.saturating_sub(copy_wall),
        touched,
        changed: subs.changed(),
    }
}

fn report(what: &str, mut samples: Vec<Sample>) {
    let n = samples.len();
    let cpu: Duration = samples.iter().map(|s| s.cpu).sum();
    let touched = samples.iter().map(|s| s.touched).sum::<usize>() as f64 / n as f64;
    let changed = samples.iter().map(|s| s.changed).sum::<usize>() as f64 / n as f64;
    let scan: Duration = samples.iter().map(|s| s.scan).sum();
    samples.sort_by_key(|s| s.wall);
    println!(
        "{what}: per change CPU mean {}, wall p50 {} max {} (asking every subscriber: {}); subscribers touched {touched:.0}, views changed {changed:.0} (of {n} changes)",
        ms(cpu / n as u32),
        ms(samples[n / 2].wall),
        ms(samples[n - 1].wall),
        ms(scan / n as u32),
    );
}

/// Re-lists `kind` with `objects`, measured, while a second thread issues an empty
/// change as soon as the re-list holds the index lock; prints both.
fn relist(what: &str, shared: &SharedIndex, subs: &mut Subscribers, kind: Kind, objects: Objects) {
    let n = objects.len();
    let started = AtomicBool::new(false);
    let (s, waited) = std::thread::scope(|scope| {
        let concurrent = scope.spawn(|| {
            while !started.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
            let t = Instant::now();
            shared.update(|_| Affected::default());
            t.elapsed()
        });
        let s = measure(shared, subs, |i| {
            started.store(true, Ordering::Release);
            i.replace(kind, objects)
        });
        (s, concurrent.join().unwrap())
    });
    println!(
        "re-list of {n} {}, {what}: {} (wall); subscribers touched {}, views changed {}; a change issued during it waited {} for the lock",
        kind.as_str(),
        ms(s.wall),
        s.touched,
        s.changed,
        ms(waited),
    );
}

fn main() {
    let policies: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    let env = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let mesh = Mesh {
        pods: env("WEFT_POLICY_SCALE_PODS", 10_000),
        namespaces: env("WEFT_POLICY_SCALE_NAMESPACES", 100).max(1),
        policies,
    };
    println!(
        "mesh: {} pods in {} namespaces ({} per namespace, {} Services of {PODS_PER_SERVICE} pods each), {} Policies",
        mesh.pods_per_ns() * mesh.namespaces,
        mesh.namespaces,
        mesh.pods_per_ns(),
        mesh.services_per_ns(),
        mesh.policies
    );
    let rss_start = rss_kib();

    // The first list of each kind into an empty index, in the order the watches usually
    // finish (the Policies last: the costliest order for them, each namespace then
    // rebuilt with its pods already there).
    let (services, slices, pods, policy_objects) = objects(&mesh, 1);
    let mut index = Index::new("cluster.local");
    let mut list_total = Duration::ZERO;
    for (kind, objects) in [
        (Kind::Service, services),
        (Kind::EndpointSlice, slices),
        (Kind::Pod, pods),
        (Kind::Policy, policy_objects),
    ] {
        let n = objects.len();
        let t = Instant::now();
        index.replace(kind, objects);
        let spent = t.elapsed();
        list_total += spent;
        println!("first list of {n} {}: {}", kind.as_str(), ms(spent));
    }
    println!("first list, all kinds: {} (wall)", ms(list_total));
    let metrics = Arc::new(Metrics::new());
    let shared = SharedIndex::new(index, metrics);
    for kind in Kind::ALL {
        shared.mark_synced(kind);
    }
    let rss_index = rss_kib();

    // One subscription per pod, each computing its first view.
    let keys: Vec<ObjectKey> = shared.read(|i| i.pod_keys().cloned().collect());
    let t = Instant::now();
    let receivers: Vec<_> = keys.iter().map(|k| shared.subscribe(k)).collect();
    println!(
        "{} subscribers' first views: {} (wall)",
        keys.len(),
        ms(t.elapsed())
    );
    let rss_subscribed = rss_kib();
    let mut subs = Subscribers { keys, receivers };
    subs.changed();

    // A watch's re-list after a desync: every object listed again, nothing changed.
    let (services, slices, pods, policy_objects) = objects(&mesh, 1);
    for (kind, objects) in [
        (Kind::Service, services),
        (Kind::EndpointSlice, slices),
        (Kind::Pod, pods),
        (Kind::Policy, policy_objects),
    ] {
        relist("nothing changed", &shared, &mut subs, kind, objects);
    }
    // A Policy re-list in which every Policy changed (each one's next generation).
    let (_, _, _, policy_objects) = objects(&mesh, 2);
    relist(
        "every one changed",
        &shared,
        &mut subs,
        Kind::Policy,
        policy_objects,
    );

    // Single changes, all in ns0 (any namespace is alike), each measured alone.
    let changes = env("WEFT_POLICY_SCALE_CHANGES", CHANGES).max(1);
    let extra = mesh.pods_per_ns() * mesh.namespaces;
    let (mut added, mut deleted) = (Vec::new(), Vec::new());
    for n in 0..changes {
        let (k, o) = pod(&mesh, 0, mesh.pods_per_ns() + n, extra + n);
        added.push(measure(&shared, &mut subs, |i| i.apply(k.clone(), o)));
        deleted.push(measure(&shared, &mut subs, |i| i.delete(Kind::Pod, &k)));
    }
    report("pod added (ns0)", added);
    report("pod deleted (ns0)", deleted);

    let mut ready = Vec::new();
    for n in 0..changes {
        let s = n % mesh.services_per_ns();
        let (k, o) = slice(&mesh, 0, s, Some(n % PODS_PER_SERVICE));
        ready.push(measure(&shared, &mut subs, |i| i.apply(k, o)));
        let (k, o) = slice(&mesh, 0, s, None);
        ready.push(measure(&shared, &mut subs, |i| i.apply(k, o)));
    }
    report(
        "EndpointSlice change: an endpoint's readiness flipped (ns0)",
        ready,
    );

    let in_ns0 = mesh.policies_in(0);
    if in_ns0 == 0 {
        println!("Policy change: no Policy in ns0");
    } else {
        // Of each ten Policies, the first is namespace-wide (q % 10 == 0), the next six
        // select by label.
        for (what, pick) in [
            ("Policy change, selecting by label (ns0)", 1usize),
            ("Policy change, namespace-wide (ns0)", 0),
        ] {
            let qs: Vec<usize> = (0..in_ns0)
                .filter(|q| (q % 10 == 0) == (pick == 0))
                .collect();
            if qs.is_empty() {
                println!("{what}: none in ns0");
                continue;
            }
            let mut samples = Vec::new();
            for n in 0..changes {
                let (k, o) = policy(&mesh, 0, qs[n % qs.len()], 3 + n as i64);
                samples.push(measure(&shared, &mut subs, |i| i.apply(k, o)));
            }
            report(what, samples);
        }
    }

    println!(
        "RSS: {rss_start} KiB at start, {rss_index} KiB with the index, {rss_subscribed} KiB with {} subscribers",
        subs.keys.len()
    );
}
