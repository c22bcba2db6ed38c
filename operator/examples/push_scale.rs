//! Scale benchmark of the config push path (not a test: it measures and prints).
//!
//! One process: the real index, push server and session code on loopback, fed with
//! synthetic cluster objects through the same conversions the watches use, and many
//! lightweight subscribers (raw HTTP/2 streams that decode each update and ACK it at
//! once; 100 subscriptions share one connection to stay within file-descriptor limits),
//! run in a child process so that the RSS and CPU measured are the operator's alone.
//! Subscribers are trusted by their pod header (no TokenReview: there is no API server),
//! through the `insecure-test-auth` authenticator, which examples and tests get from the
//! package's dev-dependency on itself and release builds of the operator lack.
//! Latencies are measured from the index update to the last affected ACK arriving at the
//! operator.
//!
//! ```sh
//! cargo run --release -p weft-operator --example push_scale -- 1000
//! cargo run --release -p weft-operator --example push_scale -- 10000
//! ```
//!
//! Mesh: 10 namespaces × 100 Services × 1 EndpointSlice of 10 endpoints (1,000 Services,
//! 10,000 endpoints); subscribers spread evenly over the namespaces, each seeing its own.
//! `WEFT_PUSH_SCALE_POD_ADDRESSES=1` gives every subscriber's pod an address and a
//! declared port that no Service lists (so each is sent by address to its namespace).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::api::DynamicObject;
use serde_json::json;
use tokio::{net::TcpListener, sync::mpsc};
use tokio_util::sync::CancellationToken;
use weft_api::push::{self, Ack, ClientMessage, FrameDecoder, ServerMessage};
use weft_operator::{
    index::{Index, Kind, ObjectKey, model, shared::SharedIndex},
    metrics::Metrics,
    push::{Authenticator, PushServer, Registry},
};
use weft_proxy::control::ChannelBody;

const NAMESPACES: usize = 10;
const SERVICES_PER_NS: usize = 100;
const ENDPOINTS_PER_SERVICE: usize = 10;
const CHANGES: usize = 50;
const PER_CONNECTION: usize = 100;

#[derive(Default)]
struct Stats {
    acked: AtomicU64,
    bytes: AtomicU64,
    updates: AtomicU64,
    first_update_bytes: AtomicU64,
    /// The subscription ended (with the reason printed to stderr).
    ended: std::sync::atomic::AtomicBool,
}

/// How long any phase may take before the benchmark gives up and says why: it never
/// waits forever.
const PHASE_LIMIT: Duration = Duration::from_secs(180);

fn slice(ns: usize, svc: usize, generation: u64) -> EndpointSlice {
    let endpoints: Vec<_> = (0..ENDPOINTS_PER_SERVICE)
        .map(|e| {
            let last = if e == 0 { generation % 250 } else { e as u64 };
            json!({"addresses": [format!("10.{ns}.{svc}.{last}")], "conditions": {"ready": true},
                   "targetRef": {"kind": "Pod", "name": format!("svc{svc}-{e}")}, "zone": "z1"})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc{svc}-abc"), "namespace": format!("ns{ns}"),
                     "labels": {"kubernetes.io/service-name": format!("svc{svc}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": endpoints,
    }))
    .unwrap()
}

fn route(timeout_ms: u64) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "Route",
        "metadata": {"name": "r", "namespace": "ns0", "generation": timeout_ms, "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"service": {"name": "svc0"}, "rules": [{"backends": [{"name": "svc0"}], "timeout": format!("{timeout_ms}ms")}]},
    }))
    .unwrap()
}

type Objects = Vec<(ObjectKey, weft_operator::index::Object)>;

/// The mesh, converted as the watches would convert it: (Services, slices, pods).
fn objects(subscribers: usize) -> (Objects, Objects, Objects) {
    let (mut services, mut slices, mut pods) = (Vec::new(), Vec::new(), Vec::new());
    for ns in 0..NAMESPACES {
        for svc in 0..SERVICES_PER_NS {
            let s: Service = serde_json::from_value(json!({
                "metadata": {"name": format!("svc{svc}"), "namespace": format!("ns{ns}")},
                "spec": {"clusterIP": format!("198.19.{ns}.{svc}"), "ports": [{"name": "http", "port": 80}]}
            }))
            .unwrap();
            services.push(model::service(&s));
            slices.push(model::endpoint_slice(&slice(ns, svc, 1)));
        }
    }
    // With WEFT_PUSH_SCALE_POD_ADDRESSES set, each subscriber's pod has an address and
    // declares port 8080, which no Service lists: every one of them is then in its
    // namespace's `pods.<ns>` config, the most that config can carry.
    let addressed = std::env::var_os("WEFT_PUSH_SCALE_POD_ADDRESSES").is_some();
    for i in 0..subscribers {
        let mut p = json!({
            "metadata": {"name": format!("pod{i}"), "namespace": format!("ns{}", i % NAMESPACES)},
            "spec": {"serviceAccountName": "app", "containers": []}
        });
        if addressed {
            p["spec"]["containers"] = json!([{"name": "app", "ports": [{"containerPort": 8080}]}]);
            p["status"] = json!({"phase": "Running",
                                 "podIPs": [{"ip": format!("198.18.{}.{}", i / 250, i % 250 + 1)}]});
        }
        let p: Pod = serde_json::from_value(p).unwrap();
        pods.push(model::pod(&p));
    }
    (services, slices, pods)
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    fields
        .get(11)
        .and_then(|u| u.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
}

async fn subscribe(
    sender: hyper::client::conn::http2::SendRequest<ChannelBody>,
    addr: String,
    pod: String,
    stats: Arc<Stats>,
) {
    let result = stream(sender, addr, &pod, &stats).await;
    stats.ended.store(true, Ordering::Release);
    if let Err(e) = result {
        eprintln!("subscriber {pod}: {e}");
    }
}

async fn stream(
    mut sender: hyper::client::conn::http2::SendRequest<ChannelBody>,
    addr: String,
    pod: &str,
    stats: &Stats,
) -> Result<(), String> {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let req = http::Request::post(format!("http://{addr}{}", push::SUBSCRIBE_PATH))
        .header(push::POD_HEADER, pod)
        .header(push::FEATURES_HEADER, push::FEATURE_ENDPOINT_DELTAS)
        .body(ChannelBody(rx))
        .map_err(|e| e.to_string())?;
    sender.ready().await.map_err(|e| format!("ready: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e:?}"))?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut decoder = FrameDecoder::default();
    let mut pending_bytes = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e:?}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending_bytes += data.len() as u64;
        decoder.extend(&data);
        while let Some(ServerMessage::Update(u)) = decoder.next::<ServerMessage>().unwrap() {
            stats.bytes.fetch_add(pending_bytes, Ordering::Relaxed);
            if stats.updates.fetch_add(1, Ordering::Relaxed) == 0 {
                stats
                    .first_update_bytes
                    .store(pending_bytes, Ordering::Relaxed);
            }
            pending_bytes = 0;
            let ack = push::encode(&ClientMessage::Ack(Ack {
                version: u.version,
                enforcement: None,
            }))
            .unwrap();
            if tx.send(Bytes::from(ack)).await.is_err() {
                return Err("answer channel closed".into());
            }
            stats.acked.store(u.version, Ordering::Release);
        }
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Waits until every subscriber in `affected` acknowledged `version`, reporting progress
/// every 10 s on stderr and exiting the process after [`PHASE_LIMIT`].
async fn wait_acked(stats: &[Arc<Stats>], affected: &[usize], version: u64) {
    let start = Instant::now();
    let mut next_report = Duration::from_secs(10);
    loop {
        let lagging: Vec<usize> = affected
            .iter()
            .copied()
            .filter(|i| stats[*i].acked.load(Ordering::Acquire) < version)
            .collect();
        if lagging.is_empty() {
            return;
        }
        if start.elapsed() >= next_report {
            let ended = lagging
                .iter()
                .filter(|i| stats[**i].ended.load(Ordering::Acquire))
                .count();
            let first: Vec<String> = lagging
                .iter()
                .take(5)
                .map(|i| {
                    format!(
                        "pod{i} (updates {})",
                        stats[*i].updates.load(Ordering::Relaxed)
                    )
                })
                .collect();
            eprintln!(
                "after {:?}: {} subscribers have not acknowledged version {version} ({ended} of them ended); first: {first:?}",
                start.elapsed(),
                lagging.len()
            );
            next_report += Duration::from_secs(10);
            if start.elapsed() >= PHASE_LIMIT {
                eprintln!("giving up");
                std::process::exit(2);
            }
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Child mode: `push_scale --clients ADDR N` runs the subscribers, prints `ready` once
/// each has its full snapshot, and exits when stdin closes.
async fn clients(addr: String, subscribers: usize) {
    let stats: Vec<Arc<Stats>> = (0..subscribers)
        .map(|_| Arc::new(Stats::default()))
        .collect();
    for chunk in (0..subscribers).collect::<Vec<_>>().chunks(PER_CONNECTION) {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        for i in chunk {
            let pod = format!("ns{}/pod{i}", i % NAMESPACES);
            tokio::spawn(subscribe(
                sender.clone(),
                addr.clone(),
                pod,
                stats[*i].clone(),
            ));
        }
    }
    let all: Vec<usize> = (0..subscribers).collect();
    wait_acked(&stats, &all, 1).await;
    println!("ready");
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)
    })
    .await;
}

/// The operator's stall and refusal counters, for the report.
fn stalls(metrics: &Metrics) -> String {
    let text = metrics.encode();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("weft_operator_push_stalls_total")
                || l.starts_with("weft_operator_push_refusals_total")
        })
        .collect();
    format!("operator: {}", lines.join(", "))
}

async fn wait_registry(registry: &Registry, pods: &[ObjectKey], version: u64) {
    let start = Instant::now();
    loop {
        if registry.acked_by(pods).0.is_some_and(|v| v >= version) {
            return;
        }
        assert!(
            start.elapsed() < PHASE_LIMIT,
            "version {version} not acknowledged by every affected subscriber after {PHASE_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--clients") {
        clients(args[2].clone(), args[3].parse().unwrap()).await;
        return;
    }
    let subscribers: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let rss_start = rss_kib();
    let t = Instant::now();
    let mut index = Index::new("cluster.local");
    let (services, slices, pods) = objects(subscribers);
    index.replace(Kind::Service, services);
    index.replace(Kind::EndpointSlice, slices);
    index.replace(Kind::Pod, pods);
    println!(
        "index: {} services, {} endpoint slices ({} endpoints), {} pods, listed in {:?}",
        index.len(Kind::Service),
        index.len(Kind::EndpointSlice),
        index.len(Kind::EndpointSlice) * ENDPOINTS_PER_SERVICE,
        index.len(Kind::Pod),
        t.elapsed()
    );
    let metrics = Arc::new(Metrics::new());
    let shared = SharedIndex::new(index, metrics.clone());
    for kind in Kind::ALL {
        shared.mark_synced(kind);
    }
    let registry = Arc::new(Registry::default());
    let server = Arc::new(PushServer {
        index: shared.clone(),
        registry: registry.clone(),
        auth: Authenticator::InsecureTrustPodHeader,
        // 100 subscribers share each connection here (a proxy has its own), so the last
        // snapshots on a connection wait for the 99 before them: at 10,000 subscribers on
        // two busy cores that is over 20 s. A real stall is infinite; 120 s still reports
        // one (in weft_operator_push_stalls_total, printed below) before PHASE_LIMIT.
        ack_timeout: Duration::from_secs(120),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    tokio::spawn(weft_operator::push::serve(listener, server, stop.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_index = rss_kib();

    // The subscribers run in a child process, so this process's RSS and CPU are the
    // operator's alone.
    let t = Instant::now();
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--clients", &addr, &subscribers.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let read = tokio::time::timeout(
        PHASE_LIMIT + Duration::from_secs(10),
        tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line),
    )
    .await;
    let Ok(read) = read else {
        panic!(
            "the subscribers did not have their snapshots in time (see their stderr above); {}",
            stalls(&metrics)
        );
    };
    read.unwrap();
    assert_eq!(
        line.trim(),
        "ready",
        "the subscriber process failed (see stderr)"
    );
    let connect_time = t.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_subscribed = rss_kib();
    let all: Vec<ObjectKey> = (0..subscribers)
        .map(|i| ObjectKey::new(format!("ns{}", i % NAMESPACES), format!("pod{i}")))
        .collect();
    let (_, full_total) = registry.acked_by(&all);
    let full = full_total / subscribers as u64;
    println!(
        "{subscribers} subscribers connected and ACKed their full snapshot in {connect_time:?}; full snapshot {full} bytes per subscriber"
    );

    let affected: Vec<ObjectKey> = all
        .iter()
        .filter(|k| k.namespace == "ns0")
        .cloned()
        .collect();
    let unaffected: Vec<ObjectKey> = all
        .iter()
        .filter(|k| k.namespace != "ns0")
        .cloned()
        .collect();
    for (what, route_change) in [("EndpointSlice change", false), ("Route change", true)] {
        let (_, affected_before) = registry.acked_by(&affected);
        let (_, unaffected_before) = registry.acked_by(&unaffected);
        let cpu_before = cpu_ticks();
        let mut latencies = Vec::with_capacity(CHANGES);
        for n in 0..CHANGES {
            let t0 = Instant::now();
            if route_change {
                let (k, o) = model::weft_resource(Kind::Route, &route(1000 + n as u64));
                shared.update(|i| i.apply(k, o));
            } else {
                let (k, o) = model::endpoint_slice(&slice(0, n % SERVICES_PER_NS, 2 + n as u64));
                shared.update(|i| i.apply(k, o));
            }
            let version = shared.read(|i| i.version());
            wait_registry(&registry, &affected, version).await;
            latencies.push(t0.elapsed());
        }
        let cpu = cpu_ticks() - cpu_before;
        latencies.sort();
        let (_, affected_after) = registry.acked_by(&affected);
        let (_, unaffected_after) = registry.acked_by(&unaffected);
        let per_affected =
            (affected_after - affected_before) as f64 / (affected.len() * CHANGES) as f64;
        println!(
            "{what}: {} affected subscribers; change → all affected ACKed p50 {:?} p99 {:?} max {:?}; \
             {per_affected:.0} bytes per change per affected subscriber ({:.4} of a full snapshot); \
             {} bytes to the {} unaffected subscribers; operator CPU {:.1} ms per change",
            affected.len(),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            latencies.last().unwrap(),
            per_affected / full as f64,
            unaffected_after - unaffected_before,
            unaffected.len(),
            cpu as f64 * 10.0 / CHANGES as f64,
        );
    }
    println!(
        "operator RSS: {rss_start} KiB at start, {rss_index} KiB with the index, {rss_subscribed} KiB with {subscribers} subscribers: {:.1} KiB per subscriber",
        (rss_subscribed - rss_index) as f64 / subscribers as f64
    );
    println!("{}", stalls(&metrics));
    drop(child.stdin.take());
    let _ = child.wait().await;
    stop.cancel();
}
