//! The benchmark harness behind `docs/benchmarks.md`: open-loop constant-rate HTTP load
//! with latency measured from each request's intended start (no coordinated omission),
//! against a 1 KiB backend directly, through one `weft-proxy`, through two in a chain, and
//! through HAProxy as a reference; plus closed-loop maximum throughput, proxy CPU time per
//! request (a chain's proxies together), RSS idle and with 1,000 open connections, and the
//! raw loopback TCP round trip to an echo server on its own thread (back to back, and paced
//! as each open-loop run's load: the reference for the chain's added latency).
//!
//! ```sh
//! cargo build --release -p weft-proxy --bin weft-proxy   # alone, or it gets tokio's test-util
//! cargo build --release -p weft-proxy --example bench
//! target/release/examples/bench [SECONDS_PER_RUN]      # default 10
//! ```
//!
//! Only loopback addresses are used. HAProxy is optional (skipped when `haproxy` is not on
//! PATH).
//!
//! To iterate on one figure, `WEFT_BENCH_PARTS` selects parts (comma-separated, from
//! `rtt,open,max,rss`; default all) and `WEFT_BENCH_PATHS` selects paths by name (from
//! `direct,weft,baseline,chain,chain-in,mtls,haproxy`; default all). The output format
//! stays the same. `WEFT_BENCH_CONNECTIONS` sets how many connections the open and closed
//! loops use (default 16).
//!
//! `chain-in` and `mtls` are the sidecar chain as it runs in a cluster: a client sidecar
//! (forward listener) → a server sidecar's inbound listener (`--inbound-forward`) → the
//! backend. Both paths go through the same server sidecar, which has a mesh certificate
//! (and so accepts plain text and mutual TLS on one port); `chain-in`'s client sidecar
//! has no identity and speaks plain text, `mtls`'s has one and its endpoint is meshed.
//! The certificates come from an identity endpoint the harness serves itself (a test CA,
//! `/weft.identity.v1/certify` over TLS, no token check). `WEFT_BENCH_PROXY=/path` runs
//! every proxy from that binary instead of the one beside the harness (to measure an
//! older proxy with this harness). `mtls-sessions`, only when named in `WEFT_BENCH_PATHS`,
//! is `mtls` with a client sidecar run with `--mesh-http1 sessions` (HTTP/1 in TLS
//! sessions of its own rather than on the mux).
//!
//! The `overload` part measures a Breaker's `maxRequests` under 2× overload: a backend
//! with a fixed 20 ms service time behind a proxy with `maxRequests: 20` (capacity
//! 1,000 requests/s), loaded open-loop over HTTP/2 first at 500/s (10 in flight, N/2) and
//! then at 2,000/s (40 offered in flight, 2N); it prints p50/p99 of the admitted requests
//! and the share refused. `WEFT_BENCH_PARTS=overload` runs it alone.
//!
//! `WEFT_BENCH_WEIGHTS` (such as `9,1` or `1,1`) gives the single proxy's service one
//! backend per weight, with those endpoint weights, so that its balancer compares two
//! candidates on every request (the chain's second proxy reads the same config; HAProxy
//! keeps one backend); unset, one endpoint.
//!
//! `WEFT_BENCH_BASELINE=/path/to/weft-proxy` adds the path `baseline`: the single-proxy
//! setup of `weft` run with that binary instead (for example a release build of the commit
//! before a change), started with the other proxies and measured right after `weft` for
//! each protocol, against the same backend with the same load. It reads the same config
//! without the Route of `WEFT_BENCH_ROUTE` (an older proxy may not know Routes).
//!
//! `WEFT_BENCH_ACCESS_LOG=json` (or `text`) runs the `weft` path's proxy with its access
//! log on (lines written to a discarded stdout); with `WEFT_BENCH_BASELINE` set to the same
//! binary, `baseline` is the same proxy with the log off, measured in the same run.
//!
//! `WEFT_BENCH_TRACE=P` (a sampling probability, 0 to 1) runs the `weft` path's proxy with
//! tracing on, exporting to an OTLP/gRPC sink in this process that counts and discards
//! the spans (its count is printed at the end); the load sends no trace headers, so `P`
//! is the share of requests whose span is recorded and exported, and `0` measures
//! propagation alone. With `WEFT_BENCH_BASELINE` set to the same binary, `baseline` is the
//! same proxy with tracing off, measured in the same run.
//!
//! `WEFT_BENCH_ROUTE=N` (1 to 32) gives the single proxy's service a Route of N rules that
//! all send to the service itself. Rule `i` matches on the path regex
//! `^/api/v[0-9]+/(orders|rI)/[0-9]+$` and the exact header `x-bench-rule: rI`, and the
//! load then requests `/api/v1/orders/12345` with `x-bench-rule: rN` on every path. Every
//! rule's regex matches that path, so only the header tells the rules apart and the last
//! rule takes the request; each rule before it costs a header comparison, plus a full
//! regex run where the proxy tries the regex first (since `c2525f0` it tries exact headers
//! first, so only the last rule's regex runs). `WEFT_BENCH_ROUTE=N:none` sends
//! `x-bench-rule: none` instead: no rule takes the request, which goes to the service's
//! own endpoints.
//!
//! `WEFT_BENCH_PARTS=rounds` (only when named) measures issue 9's chain-latency targets
//! with the drift of a shared machine spread evenly over the paths: `WEFT_BENCH_ROUNDS`
//! rounds (default 10) at 1,000 requests/s, each round measuring, per protocol, the
//! back-to-back and paced round trips and the paths `direct`, `chain-in`, `mtls` and
//! `mtls-sessions` (as selected) for `SECONDS_PER_RUN` each after 1 s of warm-up, in an
//! order rotated every round. It prints each round's p50s, each chain's added p50 in
//! multiples of that round's paced round trip, and each mTLS chain's p50 minus the plain
//! chain's; then the median and range over the rounds, and the p50, p99 and p99.9 of all
//! rounds' samples together.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

mod support;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};
use support::{Proc, free_addr, serve_on_own_thread, start_backend, start_echo};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::Request;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use weft_api::traffic::{
    BackendConfig, MatchConfig, PathMatchConfig, RouteConfig, RuleConfig, ValueMatchConfig,
    ValueMatchKind,
};

/// Connections the open and closed loops use: `WEFT_BENCH_CONNECTIONS`, default 16.
static CONNECTIONS: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
    std::env::var("WEFT_BENCH_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(16)
});

/// What the load requests with `WEFT_BENCH_ROUTE`: a path every rule's regex matches.
const ROUTE_PATH: &str = "/api/v1/orders/12345";
/// The same target in the absolute form the HTTP/2 client sends.
const ROUTE_URI_H2: &str = "http://web/api/v1/orders/12345";
/// The header the Route's rules match on.
const ROUTE_HEADER: &str = "x-bench-rule";
/// Set from `WEFT_BENCH_ROUTE`: the `x-bench-rule` value the load sends with
/// [`ROUTE_PATH`]. Unset: the load requests `/` without it.
static ROUTE_HIT: OnceLock<String> = OnceLock::new();

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proto {
    H1,
    H2,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

/// A backend that answers after `delay`, as a service with a fixed service time and room
/// for any concurrency, on its own thread.
fn start_slow_backend(delay: Duration) -> SocketAddr {
    serve_on_own_thread(move |s| async move {
        let svc = hyper::service::service_fn(move |_req| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(
                b"ok",
            ))))
        });
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(s), svc)
            .await;
    })
}

/// The `overload` part: admitted latency and refused share at N/2 and 2N offered
/// concurrency against a proxy with `maxRequests: N`.
async fn overload(bin: &Path, dir: &Path, secs: u64) {
    const MAX_REQUESTS: u64 = 20;
    const SERVICE_TIME: Duration = Duration::from_millis(20);
    let backend = start_slow_backend(SERVICE_TIME);
    let cfg = dir.join("overload.yaml");
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: weft.dev/proxy/v1alpha1\nkind: ProxyConfig\nservices:\n- name: web\n  endpoints:\n  - address: {backend}\n  breaker:\n    name: bench/web\n    connectionPool:\n      maxRequests: {MAX_REQUESTS}\n"
        ),
    )
    .unwrap();
    let (_proxy, addr) = start_weft(bin, &cfg, "web").await;
    let capacity = MAX_REQUESTS * 1000 / SERVICE_TIME.as_millis() as u64;
    println!(
        "## Overload: maxRequests {MAX_REQUESTS}, service time {} ms (capacity {capacity}/s), HTTP/2, {secs} s per row\n",
        SERVICE_TIME.as_millis()
    );
    println!("| offered | in flight offered | admitted p50 ms | admitted p99 ms | refused |");
    println!("| --- | --- | --- | --- | --- |");
    for (label, rate) in [("N/2", capacity / 2), ("2N", capacity * 2)] {
        let r = open_loop(addr, Proto::H2, rate, secs).await;
        println!(
            "| {rate}/s | {label} | {} | {} | {:.1} % |",
            ms(r.hist.value_at_quantile(0.5)),
            ms(r.hist.value_at_quantile(0.99)),
            r.errors as f64 * 100.0 / r.sent as f64
        );
    }
    println!();
}

async fn raw_rtt(addr: SocketAddr, n: usize) -> Histogram<u64> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut h = hist();
    let mut b = [7u8; 1];
    for i in 0..n + 1000 {
        let t = Instant::now();
        s.write_all(&b).await.unwrap();
        s.read_exact(&mut b).await.unwrap();
        if i >= 1000 {
            h.record(t.elapsed().as_micros().max(1) as u64).unwrap();
        }
    }
    h
}

type H1Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;
type H2Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

enum Conn {
    H1(H1Sender),
    H2(H2Sender),
}

async fn connect(addr: SocketAddr, proto: Proto) -> Conn {
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let io = TokioIo::new(s);
    match proto {
        Proto::H1 => {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Conn::H1(send)
        }
        Proto::H2 => {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            Conn::H2(send)
        }
    }
}

fn request(proto: Proto) -> Request<Empty<Bytes>> {
    let hit = ROUTE_HIT.get();
    let builder = match proto {
        Proto::H1 => {
            Request::get(if hit.is_some() { ROUTE_PATH } else { "/" }).header("host", "web")
        }
        Proto::H2 => Request::get(if hit.is_some() {
            ROUTE_URI_H2
        } else {
            "http://web/"
        })
        .version(http::Version::HTTP_2),
    };
    match hit {
        Some(value) => builder.header(ROUTE_HEADER, value.as_str()),
        None => builder,
    }
    .body(Empty::new())
    .unwrap()
}

async fn h1_once(send: &mut H1Sender) -> bool {
    if send.ready().await.is_err() {
        return false;
    }
    match send.send_request(request(Proto::H1)).await {
        Ok(r) => r.status().is_success() && r.into_body().collect().await.is_ok(),
        Err(_) => false,
    }
}

async fn h2_once(mut send: H2Sender) -> bool {
    if send.ready().await.is_err() {
        return false;
    }
    match send.send_request(request(Proto::H2)).await {
        Ok(r) => r.status().is_success() && r.into_body().collect().await.is_ok(),
        Err(_) => false,
    }
}

struct OpenLoop {
    hist: Histogram<u64>,
    errors: u64,
    sent: u64,
    elapsed: Duration,
}

/// Sends `rate` requests per second for `secs` over [`CONNECTIONS`] connections; each request's latency
/// counts from when it should have started (no coordinated omission). A dedicated OS
/// thread paces the schedule with `nanosleep`, since the runtime's timer only has
/// millisecond resolution and would add its own lateness to every sample.
async fn open_loop(addr: SocketAddr, proto: Proto, rate: u64, secs: u64) -> OpenLoop {
    let total = rate * secs;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let hist = Arc::new(Mutex::new(hist()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut queues = Vec::new();
    let mut workers = Vec::new();
    for _ in 0..*CONNECTIONS {
        let conn = connect(addr, proto).await;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        queues.push(tx);
        let hist = hist.clone();
        let errors = errors.clone();
        workers.push(tokio::spawn(async move {
            match conn {
                Conn::H1(mut send) => {
                    let mut local = self::hist();
                    while let Some(intended) = rx.recv().await {
                        if h1_once(&mut send).await {
                            local
                                .record(intended.elapsed().as_micros().max(1) as u64)
                                .unwrap();
                        } else {
                            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    hist.lock().unwrap().add(local).unwrap();
                }
                Conn::H2(send) => {
                    let mut tasks = Vec::new();
                    while let Some(intended) = rx.recv().await {
                        let send = send.clone();
                        let hist = hist.clone();
                        let errors = errors.clone();
                        tasks.push(tokio::spawn(async move {
                            if h2_once(send).await {
                                hist.lock()
                                    .unwrap()
                                    .record(intended.elapsed().as_micros().max(1) as u64)
                                    .unwrap();
                            } else {
                                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }));
                    }
                    for t in tasks {
                        t.await.unwrap();
                    }
                }
            }
        }));
    }
    let (start, pacer) = pace(queues, total, interval);
    for w in workers {
        w.await.unwrap();
    }
    pacer.join().unwrap();
    let elapsed = start.elapsed();
    let hist = hist.lock().unwrap().clone();
    OpenLoop {
        hist,
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        sent: total,
        elapsed,
    }
}

/// Starts the open loop's schedule on its own OS thread: `total` start instants `interval`
/// apart, dealt round-robin to `queues`. Returns the first instant and the thread.
fn pace(
    queues: Vec<tokio::sync::mpsc::UnboundedSender<Instant>>,
    total: u64,
    interval: Duration,
) -> (Instant, std::thread::JoinHandle<()>) {
    let start = Instant::now() + Duration::from_millis(10);
    let pacer = std::thread::spawn(move || {
        for i in 0..total {
            let intended = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
            let _ = queues[(i as usize) % queues.len()].send(intended);
        }
    });
    (start, pacer)
}

/// The raw loopback round trip paced as the open loop's requests are: 1 byte over each
/// of [`CONNECTIONS`] connections to the echo server, `rate` per second for `secs`. Returns the round
/// trips measured from each write, so each one starts with both ends idle, as a
/// request's hops do at these rates.
async fn paced_rtt(addr: SocketAddr, rate: u64, secs: u64) -> Histogram<u64> {
    let hist = Arc::new(Mutex::new(hist()));
    let mut queues = Vec::new();
    let mut workers = Vec::new();
    for _ in 0..*CONNECTIONS {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
        queues.push(tx);
        let hist = hist.clone();
        workers.push(tokio::spawn(async move {
            let mut local = self::hist();
            let mut b = [7u8; 1];
            while rx.recv().await.is_some() {
                let t = Instant::now();
                s.write_all(&b).await.unwrap();
                s.read_exact(&mut b).await.unwrap();
                local.record(t.elapsed().as_micros().max(1) as u64).unwrap();
            }
            hist.lock().unwrap().add(local).unwrap();
        }));
    }
    let (_, pacer) = pace(
        queues,
        rate * secs,
        Duration::from_secs_f64(1.0 / rate as f64),
    );
    for w in workers {
        w.await.unwrap();
    }
    pacer.join().unwrap();
    hist.lock().unwrap().clone()
}

/// Closed loop: as many requests as [`CONNECTIONS`] connections (HTTP/2: 4 streams each) complete in
/// `secs`. Returns completed requests.
async fn max_throughput(addr: SocketAddr, proto: Proto, secs: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..*CONNECTIONS {
        match connect(addr, proto).await {
            Conn::H1(mut send) => {
                let done = done.clone();
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < deadline {
                        if h1_once(&mut send).await {
                            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        } else {
                            return;
                        }
                    }
                }));
            }
            Conn::H2(send) => {
                for _ in 0..4 {
                    let send = send.clone();
                    let done = done.clone();
                    tasks.push(tokio::spawn(async move {
                        while Instant::now() < deadline {
                            if h2_once(send.clone()).await {
                                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            } else {
                                return;
                            }
                        }
                    }));
                }
            }
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(std::sync::atomic::Ordering::Relaxed)
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the full line: 11 and 12 after the comm.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn wait_listening(addr: SocketAddr) {
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{addr} never listened");
}

fn cfg_yaml(services: &[(&str, SocketAddr)]) -> String {
    let mut yaml =
        String::from("apiVersion: weft.dev/proxy/v1alpha1\nkind: ProxyConfig\nservices:\n");
    for (svc, ep) in services {
        yaml.push_str(&format!("- name: {svc}\n  endpoints:\n  - address: {ep}\n"));
    }
    yaml
}

fn write_cfg(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, yaml).unwrap();
    path
}

/// `WEFT_BENCH_ROUTE`'s Route for service `svc`: `n` rules, each on its own path regex
/// (all of which match [`ROUTE_PATH`]) and `x-bench-rule` value, each sending to `svc`.
fn bench_route(svc: &str, n: usize) -> RouteConfig {
    let rules = (1..=n)
        .map(|i| RuleConfig {
            matches: vec![MatchConfig {
                path: Some(PathMatchConfig::Regex(format!(
                    "^/api/v[0-9]+/(orders|r{i})/[0-9]+$"
                ))),
                headers: vec![ValueMatchConfig {
                    name: ROUTE_HEADER.into(),
                    value: format!("r{i}"),
                    kind: ValueMatchKind::Exact,
                }],
                ..MatchConfig::default()
            }],
            backends: vec![BackendConfig {
                service: Some(svc.into()),
                display: None,
                weight: 1,
            }],
            ..RuleConfig::default()
        })
        .collect();
    RouteConfig {
        name: "bench/route".into(),
        rules,
    }
}

async fn start_weft(bin: &Path, cfg: &Path, service: &str) -> (Proc, SocketAddr) {
    start_weft_with(bin, cfg, service, &[]).await
}

async fn start_weft_with(
    bin: &Path,
    cfg: &Path,
    service: &str,
    extra: &[String],
) -> (Proc, SocketAddr) {
    let listen = free_addr().await;
    let admin = free_addr().await;
    let child = Command::new(bin)
        .args(["run", "--no-transparent", "--log", "warn", "--workers", "1"])
        .arg("--config")
        .arg(cfg)
        .arg("--forward")
        .arg(format!("{listen}={service}"))
        .arg("--admin-addr")
        .arg(admin.to_string())
        .args(extra)
        .stdin(Stdio::null())
        // Access-log lines, when on, go to stdout: written, then discarded.
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(listen).await;
    (Proc { child }, listen)
}

/// An OTLP/gRPC collector that counts the spans it receives and keeps none of them.
async fn span_sink() -> (SocketAddr, Arc<std::sync::atomic::AtomicU64>) {
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    };
    struct Sink(Arc<std::sync::atomic::AtomicU64>);
    #[tonic::async_trait]
    impl TraceService for Sink {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let n: usize = request
                .get_ref()
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            self.0
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let service = TraceServiceServer::new(Sink(count.clone()));
    // On its own thread: the load generator's runtime must not serve it.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener.into_std().unwrap()).unwrap();
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await;
        });
    });
    (addr, count)
}

async fn start_haproxy(dir: &Path, backend: SocketAddr) -> Option<(Proc, SocketAddr, SocketAddr)> {
    let h1 = free_addr().await;
    let h2 = free_addr().await;
    let cfg = format!(
        "global\n  nbthread 1\n  maxconn 8192\ndefaults\n  mode http\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n  http-reuse always\nfrontend h1\n  bind {h1}\n  default_backend web\nfrontend h2\n  bind {h2} proto h2\n  default_backend web\nbackend web\n  server b1 {backend}\n"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).unwrap();
    let child = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .ok()?;
    wait_listening(h1).await;
    Some((Proc { child }, h1, h2))
}

/// One protocol's figures from [`chain_rounds`]: per round the round trips and each path's
/// p50 (µs), and each path's samples of all rounds together.
#[derive(Default)]
struct Rounds {
    rtt_b2b: Vec<u64>,
    rtt_paced: Vec<u64>,
    p50: std::collections::BTreeMap<&'static str, Vec<u64>>,
    all: std::collections::BTreeMap<&'static str, Histogram<u64>>,
    errors: u64,
}

/// The median and range of `v`, formatted with `f`.
fn spread(v: &[f64], f: impl Fn(f64) -> String) -> String {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match (v.first(), v.last()) {
        (Some(lo), Some(hi)) => {
            let n = v.len();
            let median = if n % 2 == 1 {
                v[n / 2]
            } else {
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            };
            format!("{} ({} – {})", f(median), f(*lo), f(*hi))
        }
        _ => String::new(),
    }
}

/// `WEFT_BENCH_PARTS=rounds`: the chain-latency figures of issue 9, interleaved (see the
/// module docs).
async fn chain_rounds(
    echo: SocketAddr,
    targets: &[(&'static str, Proto, SocketAddr)],
    rounds: usize,
    secs: u64,
) {
    const RATE: u64 = 1000;
    const PATHS: [(&str, &str); 4] = [
        ("direct", "direct"),
        ("sidecar chain, plain", "plain"),
        ("sidecar chain, mTLS", "mTLS"),
        (
            "sidecar chain, mTLS, HTTP/1 sessions",
            "mTLS, HTTP/1 sessions",
        ),
    ];
    let mut by_proto = [Rounds::default(), Rounds::default()];
    for round in 0..rounds {
        for (p, proto) in [Proto::H1, Proto::H2].into_iter().enumerate() {
            let figures = &mut by_proto[p];
            figures
                .rtt_b2b
                .push(raw_rtt(echo, 5_000).await.value_at_quantile(0.5));
            // Slot 0 is the paced round trip; the rest are the paths, in a rotated order.
            let mut slots: Vec<Option<(&'static str, SocketAddr)>> = vec![None];
            for (name, _) in PATHS {
                if let Some((n, _, addr)) =
                    targets.iter().find(|(n, pr, _)| *n == name && *pr == proto)
                {
                    slots.push(Some((*n, *addr)));
                }
            }
            let len = slots.len();
            slots.rotate_left(round % len);
            for slot in slots {
                match slot {
                    None => {
                        let _ = paced_rtt(echo, RATE, 1).await;
                        let h = paced_rtt(echo, RATE, secs).await;
                        figures.rtt_paced.push(h.value_at_quantile(0.5));
                    }
                    Some((name, addr)) => {
                        let _ = open_loop(addr, proto, RATE, 1).await;
                        let r = open_loop(addr, proto, RATE, secs).await;
                        figures.errors += r.errors;
                        figures
                            .p50
                            .entry(name)
                            .or_default()
                            .push(r.hist.value_at_quantile(0.5));
                        figures
                            .all
                            .entry(name)
                            .or_insert_with(hist)
                            .add(&r.hist)
                            .unwrap();
                    }
                }
            }
        }
    }

    println!(
        "## Chain latency in {rounds} interleaved rounds, {RATE} requests/s, {} connections, {secs} s per path and round\n",
        *CONNECTIONS
    );
    for (proto, figures) in [Proto::H1, Proto::H2].iter().zip(&by_proto) {
        // The paths measured, and the chains among them (all but `direct`).
        let paths: Vec<(&str, &str)> = PATHS
            .into_iter()
            .filter(|(name, _)| figures.p50.contains_key(name))
            .collect();
        let chains = &paths[paths.iter().position(|(n, _)| *n != "direct").unwrap_or(0)..];
        let p50 = |name: &str, r: usize| figures.p50.get(name).map(|v| v[r] as f64);
        let mtls_paths: Vec<(&str, &str)> = chains
            .iter()
            .copied()
            .filter(|(n, _)| n.contains("mTLS"))
            .collect();
        println!("### {proto:?}\n");
        let mut head = String::from("| round | RTT back to back | RTT paced |");
        for (_, short) in &paths {
            head.push_str(&format!(" {short} |"));
        }
        for (_, short) in chains {
            head.push_str(&format!(" {short} added × paced RTT |"));
        }
        for (_, short) in &mtls_paths {
            head.push_str(&format!(" {short} − plain µs |"));
        }
        println!("{head}");
        println!(
            "|{}",
            " --- |".repeat(3 + paths.len() + chains.len() + mtls_paths.len())
        );
        // Per chain: its added p50 in paced round trips, its added p50 in back-to-back
        // round trips, and (mTLS chains) its difference from the plain chain.
        let mut added: Vec<Vec<f64>> = vec![Vec::new(); chains.len()];
        let mut added_b2b: Vec<Vec<f64>> = vec![Vec::new(); chains.len()];
        let mut diff: Vec<Vec<f64>> = vec![Vec::new(); mtls_paths.len()];
        for r in 0..rounds {
            let (b2b, paced) = (figures.rtt_b2b[r] as f64, figures.rtt_paced[r] as f64);
            let mut row = format!(
                "| {} | {:.3} | {:.3} |",
                r + 1,
                b2b / 1000.0,
                paced / 1000.0
            );
            for (name, _) in &paths {
                row.push_str(&format!(" {:.3} |", p50(name, r).unwrap_or(0.0) / 1000.0));
            }
            let direct = p50("direct", r);
            for (i, (name, _)) in chains.iter().enumerate() {
                match (p50(name, r), direct) {
                    (Some(v), Some(d)) => {
                        added[i].push((v - d) / paced);
                        added_b2b[i].push((v - d) / b2b);
                        row.push_str(&format!(" {:.1} × |", (v - d) / paced));
                    }
                    _ => row.push_str(" |"),
                }
            }
            for (i, (name, _)) in mtls_paths.iter().enumerate() {
                match (p50(name, r), p50("sidecar chain, plain", r)) {
                    (Some(m), Some(p)) => {
                        diff[i].push(m - p);
                        row.push_str(&format!(" {:+.0} |", m - p));
                    }
                    _ => row.push_str(" |"),
                }
            }
            println!("{row}");
        }
        let times = |v: f64| format!("{v:.1} ×");
        println!("\nMedian (range) over the rounds:\n");
        for (i, (_, short)) in chains.iter().enumerate() {
            println!(
                "- {short}: adds {} the paced round trip, {} the back-to-back one",
                spread(&added[i], times),
                spread(&added_b2b[i], times)
            );
        }
        for (i, (_, short)) in mtls_paths.iter().enumerate() {
            println!(
                "- {short} − plain: {} µs",
                spread(&diff[i], |v| format!("{v:+.0}"))
            );
        }
        println!("- errors: {}\n", figures.errors);
        println!("| path | p50 ms | p99 ms | p99.9 ms | samples |");
        println!("| --- | --- | --- | --- | --- |");
        for (name, short) in &paths {
            if let Some(h) = figures.all.get(name) {
                println!(
                    "| {short} | {} | {} | {} | {} |",
                    ms(h.value_at_quantile(0.5)),
                    ms(h.value_at_quantile(0.99)),
                    ms(h.value_at_quantile(0.999)),
                    h.len()
                );
            }
        }
        println!();
    }
}

/// Whether the comma-separated list in env `var` names `name` (unset: no).
fn named(var: &str, name: &str) -> bool {
    std::env::var(var).is_ok_and(|list| list.split(',').any(|p| p.trim() == name))
}

/// Whether `name` is selected by the comma-separated list in env `var` (unset: all).
fn selected(var: &str, name: &str) -> bool {
    match std::env::var(var) {
        Ok(list) => list.split(',').any(|p| p.trim() == name),
        Err(_) => true,
    }
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let bin = match std::env::var_os("WEFT_BENCH_PROXY") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("weft-proxy"),
    };
    assert!(
        bin.exists(),
        "build it first: cargo build --release -p weft-proxy --bin weft-proxy"
    );
    let dir = tempfile::tempdir().unwrap();

    if selected("WEFT_BENCH_PARTS", "overload") {
        overload(&bin, dir.path(), secs).await;
        if std::env::var("WEFT_BENCH_PARTS").is_ok_and(|p| p.trim() == "overload") {
            return;
        }
    }

    let backend = start_backend();
    let echo = start_echo();

    if selected("WEFT_BENCH_PARTS", "rtt") {
        let rtt = raw_rtt(echo, 20_000).await;
        println!("## Raw loopback TCP round trip (1 byte, 20,000 samples)\n");
        println!(
            "p50 {} ms, p99 {} ms, p99.9 {} ms\n",
            ms(rtt.value_at_quantile(0.5)),
            ms(rtt.value_at_quantile(0.99)),
            ms(rtt.value_at_quantile(0.999))
        );
    }

    // The single proxy's config (its one service `web`), without a Route.
    let single_yaml = match std::env::var("WEFT_BENCH_WEIGHTS") {
        Ok(list) => {
            let weights: Vec<u32> = list.split(',').map(|w| w.trim().parse().unwrap()).collect();
            let mut yaml = String::from(
                "apiVersion: weft.dev/proxy/v1alpha1\nkind: ProxyConfig\nservices:\n- name: web\n  endpoints:\n",
            );
            for (i, w) in weights.iter().enumerate() {
                let ep = if i == 0 { backend } else { start_backend() };
                yaml.push_str(&format!("  - address: {ep}\n    weight: {w}\n"));
            }
            yaml
        }
        Err(_) => cfg_yaml(&[("web", backend)]),
    };
    let baseline_cfg = write_cfg(dir.path(), "baseline.yaml", &single_yaml);
    let single_cfg = match std::env::var("WEFT_BENCH_ROUTE") {
        Ok(spec) => {
            let (n, hit) = match spec.split_once(':') {
                Some((n, "none")) => (n, false),
                None => (spec.as_str(), true),
                Some(_) => panic!("WEFT_BENCH_ROUTE is N or N:none, not {spec:?}"),
            };
            let n: usize = n.trim().parse().unwrap();
            assert!((1..=32).contains(&n), "WEFT_BENCH_ROUTE: 1 to 32 rules");
            let value = if hit { format!("r{n}") } else { "none".into() };
            ROUTE_HIT.set(value).unwrap();
            // As JSON: serde_yaml spells the Route's enums (the path match) as YAML tags.
            let mut doc: serde_json::Value = serde_yaml::from_str(&single_yaml).unwrap();
            doc["services"][0]["route"] = serde_json::to_value(bench_route("web", n)).unwrap();
            write_cfg(dir.path(), "single.json", &doc.to_string())
        }
        Err(_) => write_cfg(dir.path(), "single.yaml", &single_yaml),
    };
    // `WEFT_BENCH_ACCESS_LOG=json|text` turns the access log on for the `weft` path only,
    // so that `baseline` pointing at the same binary measures it off in the same run.
    let mut access_log: Vec<String> = std::env::var("WEFT_BENCH_ACCESS_LOG")
        .map(|f| vec!["--access-log".to_owned(), f])
        .unwrap_or_default();
    let spans = match std::env::var("WEFT_BENCH_TRACE") {
        Ok(p) => {
            let (sink, count) = span_sink().await;
            access_log.extend([
                "--trace-collector".to_owned(),
                sink.to_string(),
                "--trace-sampling".to_owned(),
                p,
            ]);
            Some(count)
        }
        Err(_) => None,
    };
    let (single, single_addr) = start_weft_with(&bin, &single_cfg, "web", &access_log).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = rss_kib(single.child.id());
    let baseline = match std::env::var_os("WEFT_BENCH_BASELINE") {
        Some(other) => Some(start_weft(Path::new(&other), &baseline_cfg, "web").await),
        None => None,
    };
    // Chain: client → sidecar 1 → sidecar 2 → backend.
    let (chain2, chain2_addr) = start_weft(&bin, &single_cfg, "web").await;
    let hop_cfg = write_cfg(dir.path(), "hop.yaml", &cfg_yaml(&[("hop", chain2_addr)]));
    let (chain1, chain1_addr) = start_weft(&bin, &hop_cfg, "hop").await;
    // The sidecar chain, plain and mutual TLS, through one server sidecar with identity.
    let mesh = mesh::Mesh::start(dir.path()).await;
    let empty_cfg = write_cfg(
        dir.path(),
        "empty.yaml",
        "apiVersion: weft.dev/proxy/v1alpha1\nkind: ProxyConfig\nservices: []\n",
    );
    let (server_sidecar, server_in) = mesh
        .start_inbound(&bin, &empty_cfg, backend, mesh::SERVER_ID)
        .await;
    let plain_hop = write_cfg(
        dir.path(),
        "hop-plain.yaml",
        &cfg_yaml(&[("hop", server_in)]),
    );
    let (plain_client, plain_client_addr) = start_weft(&bin, &plain_hop, "hop").await;
    let mtls_hop = write_cfg(
        dir.path(),
        "hop-mtls.yaml",
        &format!(
            "{}    identity: {}\n",
            cfg_yaml(&[("hop", server_in)]),
            mesh::SERVER_ID
        ),
    );
    let (mtls_client, mtls_client_addr) = mesh
        .start_forward(&bin, &mtls_hop, "hop", mesh::CLIENT_ID)
        .await;
    // Only when named: a proxy from before `--mesh-http1` would not start.
    let sessions_client = if named("WEFT_BENCH_PATHS", "mtls-sessions") {
        Some(
            mesh.start_forward_with(
                &bin,
                &mtls_hop,
                "hop",
                mesh::CLIENT_ID,
                &["--mesh-http1", "sessions"],
            )
            .await,
        )
    } else {
        None
    };
    for addr in [plain_client_addr, mtls_client_addr]
        .into_iter()
        .chain(sessions_client.as_ref().map(|(_, a)| *a))
    {
        mesh::wait_serving(addr).await;
    }
    let haproxy = start_haproxy(dir.path(), backend).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let haproxy_idle = haproxy.as_ref().map(|(p, _, _)| rss_kib(p.child.id()));

    let mut targets: Vec<(&str, Proto, SocketAddr)> = Vec::new();
    for proto in [Proto::H1, Proto::H2] {
        targets.push(("direct", proto, backend));
        targets.push(("weft", proto, single_addr));
        if let Some((_, addr)) = &baseline {
            targets.push(("baseline", proto, *addr));
        }
        targets.push(("weft chain (2 proxies)", proto, chain1_addr));
        targets.push(("sidecar chain, plain", proto, plain_client_addr));
        targets.push(("sidecar chain, mTLS", proto, mtls_client_addr));
        if let Some((_, addr)) = &sessions_client {
            targets.push(("sidecar chain, mTLS, HTTP/1 sessions", proto, *addr));
        }
        if let Some((_, h1, h2)) = &haproxy {
            targets.push(("haproxy", proto, if proto == Proto::H1 { *h1 } else { *h2 }));
        }
    }
    targets.retain(|(name, _, _)| {
        let short = match *name {
            n if n.starts_with("weft chain") => "chain",
            "sidecar chain, plain" => "chain-in",
            "sidecar chain, mTLS" => "mtls",
            "sidecar chain, mTLS, HTTP/1 sessions" => "mtls-sessions",
            n => n,
        };
        selected("WEFT_BENCH_PATHS", short)
    });

    if named("WEFT_BENCH_PARTS", "rounds") {
        let rounds = std::env::var("WEFT_BENCH_ROUNDS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(10);
        chain_rounds(echo, &targets, rounds, secs).await;
    }

    let open_rates: &[u64] = if selected("WEFT_BENCH_PARTS", "open") {
        println!(
            "## Open loop, {} connections, 1 KiB responses, {secs} s per run\n",
            *CONNECTIONS
        );
        println!(
            "| path | protocol | rate (req/s) | p50 ms | p99 ms | p99.9 ms | max ms | errors |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
        &[1000, 5000]
    } else {
        &[]
    };
    for &rate in open_rates {
        let _ = paced_rtt(echo, rate, 1).await;
        let rtt = paced_rtt(echo, rate, secs).await;
        println!(
            "| raw loopback round trip, 1 byte, paced | TCP | {rate} | {} | {} | {} | {} | 0 |",
            ms(rtt.value_at_quantile(0.5)),
            ms(rtt.value_at_quantile(0.99)),
            ms(rtt.value_at_quantile(0.999)),
            ms(rtt.max()),
        );
        for (name, proto, addr) in &targets {
            // Warm up pools and estimates, then measure.
            let _ = open_loop(*addr, *proto, rate, 1).await;
            let r = open_loop(*addr, *proto, rate, secs).await;
            let h = &r.hist;
            println!(
                "| {name} | {proto:?} | {rate} ({:.0} achieved) | {} | {} | {} | {} | {} |",
                r.sent as f64 / r.elapsed.as_secs_f64(),
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.99)),
                ms(h.value_at_quantile(0.999)),
                ms(h.max()),
                r.errors
            );
        }
    }

    let max_targets: &[(&str, Proto, SocketAddr)] = if selected("WEFT_BENCH_PARTS", "max") {
        println!(
            "\n## Closed loop maximum throughput ({secs} s; HTTP/2: 4 streams per connection)\n"
        );
        println!("| path | protocol | req/s | proxy CPU µs/req | proxy CPU s / wall s |");
        println!("| --- | --- | --- | --- | --- |");
        &targets
    } else {
        &[]
    };
    // The processes whose CPU a path's requests cost: a chain's proxies together.
    let server_pid = server_sidecar.child.id();
    let path_pids = |name: &str| -> Vec<u32> {
        match name {
            "weft" => vec![single.child.id()],
            "baseline" => baseline.iter().map(|(p, _)| p.child.id()).collect(),
            "haproxy" => haproxy.iter().map(|(p, _, _)| p.child.id()).collect(),
            n if n.starts_with("weft chain") => vec![chain1.child.id(), chain2.child.id()],
            "sidecar chain, plain" => vec![plain_client.child.id(), server_pid],
            "sidecar chain, mTLS" => vec![mtls_client.child.id(), server_pid],
            "sidecar chain, mTLS, HTTP/1 sessions" => sessions_client
                .iter()
                .map(|(p, _)| p.child.id())
                .chain([server_pid])
                .collect(),
            _ => Vec::new(),
        }
    };
    for (name, proto, addr) in max_targets {
        let pids = path_pids(name);
        let cpu = || pids.iter().map(|&pid| cpu_seconds(pid)).sum::<f64>();
        let cpu0 = cpu();
        let t = Instant::now();
        let n = max_throughput(*addr, *proto, secs).await;
        let wall = t.elapsed().as_secs_f64();
        let (per_req, util) = if pids.is_empty() {
            ("".into(), "".into())
        } else {
            let used = cpu() - cpu0;
            (
                format!("{:.1}", used * 1e6 / n as f64),
                format!("{:.2}", used / wall),
            )
        };
        println!(
            "| {name} | {proto:?} | {:.0} | {per_req} | {util} |",
            n as f64 / wall
        );
    }

    if let Some(count) = &spans {
        // The last export waits for the proxy's next flush.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        println!(
            "\nspans received by the OTLP sink: {}",
            count.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    if selected("WEFT_BENCH_PARTS", "rss") {
        // RSS with 1,000 open connections, each having carried one HTTP/1.1 request.
        let mut held = Vec::new();
        for _ in 0..1000 {
            if let Conn::H1(mut send) = connect(single_addr, Proto::H1).await {
                assert!(h1_once(&mut send).await);
                held.push(send);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let busy_rss = rss_kib(single.child.id());
        let mut haproxy_rss = String::new();
        if let (Some((p, h1, _)), Some(idle)) = (&haproxy, haproxy_idle) {
            let mut held_h = Vec::new();
            for _ in 0..1000 {
                if let Conn::H1(mut send) = connect(*h1, Proto::H1).await {
                    assert!(h1_once(&mut send).await);
                    held_h.push(send);
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            haproxy_rss = format!(
                "| haproxy | {:.1} | {:.1} |\n",
                idle as f64 / 1024.0,
                rss_kib(p.child.id()) as f64 / 1024.0
            );
        }
        println!("\n## Resident memory (MiB)\n");
        println!("| process | idle (after start) | after the runs, with 1,000 open connections |");
        println!("| --- | --- | --- |");
        println!(
            "| weft-proxy | {:.1} | {:.1} |",
            idle_rss as f64 / 1024.0,
            busy_rss as f64 / 1024.0
        );
        print!("{haproxy_rss}");
        drop(held);
    }
    drop((chain1, chain2, single, baseline));
    drop((
        plain_client,
        mtls_client,
        sessions_client,
        server_sidecar,
        mesh,
    ));
}

/// The mesh of the sidecar-chain paths: a test CA and an identity endpoint that issues
/// its certificates to the proxies.
mod mesh {
    use std::{
        net::SocketAddr,
        path::{Path, PathBuf},
        process::{Command, Stdio},
        sync::Arc,
        time::Duration,
    };

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
        ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    };
    use tokio::net::TcpListener;
    use weft_api::identity::{CertifyRequest, CertifyResponse};

    use super::{Proc, free_addr, wait_listening};

    /// The client sidecar's identity.
    pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";
    /// The server sidecar's identity.
    pub const SERVER_ID: &str = "spiffe://cluster.local/ns/bench/sa/server";
    /// The name the identity endpoint's certificate carries.
    const SERVER_NAME: &str = "identity.bench";

    pub struct Mesh {
        addr: SocketAddr,
        root: PathBuf,
        _task: tokio::task::JoinHandle<()>,
    }

    impl Mesh {
        /// A CA (its root written to `dir`) and the identity endpoint, on loopback.
        pub async fn start(dir: &Path) -> Mesh {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params
                .distinguished_name
                .push(DnType::CommonName, "bench mesh root");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let root_pem = params.self_signed(&key).unwrap().pem();
            let root = dir.join("mesh-root.pem");
            std::fs::write(&root, &root_pem).unwrap();
            let issuer = Arc::new(Issuer::new(params, key));

            // The endpoint's own certificate, for SERVER_NAME.
            let serving_key = KeyPair::generate().unwrap();
            let serving = CertificateParams::new(vec![SERVER_NAME.to_owned()])
                .unwrap()
                .signed_by(&serving_key, &issuer)
                .unwrap();
            let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![serving.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(serving_key.serialize_der().into()),
            )
            .unwrap();
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let task = tokio::spawn(async move {
                while let Ok((s, _)) = listener.accept().await {
                    let (acceptor, issuer, root_pem) =
                        (acceptor.clone(), issuer.clone(), root_pem.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(s).await else {
                            return;
                        };
                        let svc = hyper::service::service_fn(move |req| {
                            certify(req, issuer.clone(), root_pem.clone())
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                    });
                }
            });
            Mesh {
                addr,
                root,
                _task: task,
            }
        }

        fn identity_args(&self, id: &str) -> Vec<String> {
            vec![
                "--identity-addr".into(),
                self.addr.to_string(),
                "--identity-server-name".into(),
                SERVER_NAME.into(),
                "--trust-root-file".into(),
                self.root.display().to_string(),
                "--identity".into(),
                id.into(),
            ]
        }

        /// A server sidecar with identity `id`: an inbound listener in front of `app`.
        pub async fn start_inbound(
            &self,
            bin: &Path,
            cfg: &Path,
            app: SocketAddr,
            id: &str,
        ) -> (Proc, SocketAddr) {
            let listen = free_addr().await;
            let admin = free_addr().await;
            let child = Command::new(bin)
                .args(["run", "--no-transparent", "--log", "warn", "--workers", "1"])
                .arg("--config")
                .arg(cfg)
                .arg("--inbound-forward")
                .arg(format!("{listen}={app}"))
                .arg("--admin-addr")
                .arg(admin.to_string())
                .args(self.identity_args(id))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            wait_listening(listen).await;
            wait_ready(admin).await;
            (Proc { child }, listen)
        }

        /// A client sidecar with identity `id`: a forward listener for `service`.
        pub async fn start_forward(
            &self,
            bin: &Path,
            cfg: &Path,
            service: &str,
            id: &str,
        ) -> (Proc, SocketAddr) {
            self.start_forward_with(bin, cfg, service, id, &[]).await
        }

        /// A client sidecar as [`Mesh::start_forward`] starts it, with `extra` arguments.
        pub async fn start_forward_with(
            &self,
            bin: &Path,
            cfg: &Path,
            service: &str,
            id: &str,
            extra: &[&str],
        ) -> (Proc, SocketAddr) {
            let mut args = self.identity_args(id);
            args.extend(extra.iter().map(|a| (*a).to_owned()));
            super::start_weft_with(bin, cfg, service, &args).await
        }
    }

    /// Waits until `/ready` answers 200 (the proxy has its certificate).
    async fn wait_ready(admin: SocketAddr) {
        wait_listening(admin).await;
        for _ in 0..200 {
            let s = tokio::net::TcpStream::connect(admin).await.unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = http::Request::get("/ready")
                .header("host", "admin")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            if send
                .send_request(req)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{admin}: never ready");
    }

    /// Waits until a request through `addr` succeeds (the chain is up end to end).
    pub async fn wait_serving(addr: SocketAddr) {
        for _ in 0..200 {
            if let super::Conn::H1(mut send) = super::connect(addr, super::Proto::H1).await
                && super::h1_once(&mut send).await
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{addr}: no request got through");
    }

    /// Issues a certificate for the identity a request asks for (nothing is checked: the
    /// harness trusts its own proxies).
    async fn certify(
        req: http::Request<hyper::body::Incoming>,
        issuer: Arc<Issuer<'static, KeyPair>>,
        root_pem: String,
    ) -> Result<http::Response<Full<Bytes>>, std::convert::Infallible> {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let ask: CertifyRequest = serde_json::from_slice(&body).unwrap();
        let id = ask.identity.unwrap();
        let csr = CertificateSigningRequestParams::from_pem(&ask.csr).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.clone().try_into().unwrap())];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let now_t = time::OffsetDateTime::from_unix_timestamp(now as i64).unwrap();
        params.not_before = now_t - time::Duration::minutes(5);
        params.not_after = now_t + time::Duration::hours(24);
        let cert = params.signed_by(&csr.public_key, &issuer).unwrap();
        let answer = CertifyResponse {
            identity: id,
            certificate_chain: cert.pem(),
            trust_bundle: root_pem,
            not_after: now + 24 * 3600,
        };
        Ok(http::Response::new(Full::new(Bytes::from(
            serde_json::to_vec(&answer).unwrap(),
        ))))
    }
}
