//! Instructions per request through one `weft-proxy`, counted by valgrind's callgrind: a
//! figure that stays the same however busy the machine is, unlike CPU time (see
//! `docs/benchmarks.md`).
//!
//! ```sh
//! cargo build --release -p weft-proxy --bin weft-proxy   # alone, or it gets tokio's test-util
//! cargo build --release -p weft-proxy --example icount
//! target/release/examples/icount [REQUESTS] [PROXY_BINARY...]   # 20000; the one beside
//! ```
//!
//! For each proxy binary, protocol (HTTP/1.1, HTTP/2) and config (no Route; a Route of one
//! rule, as `WEFT_BENCH_ROUTE=1` in `bench.rs`; an inbound listener), it starts the proxy under callgrind with a
//! 1 KiB backend of its own, warms it up with 1,000 requests, zeroes the counters
//! (`callgrind_control -z`), sends `REQUESTS` requests one after the other over one
//! connection (HTTP/2: one stream at a time), dumps the counters (`callgrind_control -d`)
//! and prints the instructions counted between zero and dump divided by `REQUESTS`. The
//! dumps stay in a directory it prints, for `callgrind_annotate`. One connection and one
//! request at a time keep the count repeatable: with more in flight, how many requests
//! one wake-up serves depends on timing, and so does the count.
//!
//! `WEFT_ICOUNT_CONNECTIONS=C` spreads the requests over C connections loaded at once (as
//! `bench.rs`'s closed loop does with 16), for counts that depend on timing: how many
//! requests one wake-up serves. `WEFT_ICOUNT_TOOL=perf` runs the proxy natively and
//! counts syscalls, context switches and CPU time (task-clock) per request with
//! `perf stat` instead: the kernel's share, which callgrind does not see.
//!
//! `WEFT_ICOUNT_CONFIGS` selects configs (`plain,route,inbound,mux`; default all;
//! `inbound` is an `--inbound-forward` listener to the backend, plain text; `mux` is the
//! sidecar chain with mutual TLS: a client sidecar (forward listener) → the `weft-mux`
//! session → a server sidecar (inbound listener) → the backend, both proxies with
//! certificates from an identity endpoint this harness serves, counted each on its own
//! line) and `WEFT_ICOUNT_PROTOS` protocols (`h1,h2`; default
//! both). `WEFT_ICOUNT_MUX_ENDPOINTS=2` gives the `mux` client sidecar's service two meshed
//! endpoints (two inbound listeners of the same server sidecar), as a service that can
//! retry has. Only loopback addresses are used.
//!
//! `WEFT_ICOUNT_GRPC=1` makes each request a unary gRPC call, as a gRPC client sends it:
//! HTTP/2 `POST` with `content-type: application/grpc` and `te: trailers`, a body of one
//! 50-byte message (5-byte prefix included) and no `content-length`; the backend
//! answers 200 with one message (1 KiB of body) and `grpc-status: 0` in trailers, which
//! the harness checks. gRPC is HTTP/2 only, so this skips the H1 rows. With `mux` and
//! `WEFT_ICOUNT_MUX_ENDPOINTS=2`, the client sidecar keeps a copy of such a call's head
//! and body for a peer retry (`pipeline.rs`, `teed`); with one endpoint it does not.
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
    time::Duration,
};
use support::{Frames, Proc, frames, free_addr, grpc_message, start_backend};

use bytes::Bytes;
use http::Request;
use http_body::Frame;
use http_body_util::{BodyExt, Either, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// What the load requests under the Route: the path its rule's regex matches.
const ROUTE_PATH: &str = "/api/v1/orders/12345";
const WARMUP: usize = 1000;
/// The path of the gRPC calls (`WEFT_ICOUNT_GRPC`) when no Route is to match.
const GRPC_PATH: &str = "/icount.v1.Echo/Call";
/// The length of a gRPC call's message after its 5-byte prefix: 50 bytes in all.
const GRPC_MESSAGE: u32 = 45;

/// A request's body: none (`GET`), or a gRPC call's message streamed with no length
/// announced.
type ReqBody = Either<Empty<Bytes>, Frames>;

/// `WEFT_ICOUNT_GRPC`: whether each request is a unary gRPC call (read once: it is asked
/// for every request).
fn grpc() -> bool {
    static GRPC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GRPC.get_or_init(|| match std::env::var("WEFT_ICOUNT_GRPC").as_deref() {
        Err(_) | Ok("0") => false,
        Ok("1") => true,
        Ok(other) => panic!("WEFT_ICOUNT_GRPC is 0 or 1, not {other}"),
    })
}

/// What the proxy is set up as.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Setup {
    /// A forward listener to service `web`, no Route.
    Plain,
    /// The same with a one-rule Route.
    Route,
    /// An inbound listener to the backend (`--inbound-forward`), as a server sidecar's
    /// for plain-text clients.
    Inbound,
    /// Two proxies: a client sidecar whose endpoint is meshed, the `weft-mux` session,
    /// a server sidecar in front of the backend.
    Mux,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proto {
    H1,
    H2,
}

/// The proxy's config: service `web` on the backend, with a one-rule Route when `route`
/// (the same Route as `bench.rs`'s `WEFT_BENCH_ROUTE=1`). JSON, which the proxy reads as
/// YAML: YAML would spell the path match's enum as a tag.
fn config(backend: SocketAddr, route: bool) -> String {
    let route = if route {
        r#", "route": {"name": "bench/route", "rules": [{"matches": [{"path": {"regex": "^/api/v[0-9]+/(orders|r1)/[0-9]+$"}, "headers": [{"name": "x-bench-rule", "value": "r1"}]}], "backends": [{"service": "web", "weight": 1}]}]}"#
    } else {
        ""
    };
    format!(
        r#"{{"apiVersion": "weft.dev/proxy/v1alpha1", "kind": "ProxyConfig", "services": [{{"name": "web", "endpoints": [{{"address": "{backend}"}}]{route}}}]}}"#
    )
}

fn request(proto: Proto, route: bool) -> Request<ReqBody> {
    let grpc = grpc();
    let path = match (route, grpc) {
        (true, _) => ROUTE_PATH,
        (false, true) => GRPC_PATH,
        (false, false) => "/",
    };
    let builder = match proto {
        Proto::H1 => Request::get(path).header("host", "web"),
        Proto::H2 => Request::get(format!("http://web{path}")).version(http::Version::HTTP_2),
    };
    let builder = if route {
        builder.header("x-bench-rule", "r1")
    } else {
        builder
    };
    if grpc {
        assert_eq!(proto, Proto::H2, "gRPC is HTTP/2 only");
        return builder
            .method(http::Method::POST)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Either::Right(frames(vec![Frame::data(grpc_message(
                GRPC_MESSAGE,
            ))])))
            .unwrap();
    }
    builder.body(Either::Left(Empty::new())).unwrap()
}

/// Sends `n` requests one after the other over `conn`; panics on any failure, since a
/// failed request would make the count meaningless.
async fn send(conn: &mut Conn, proto: Proto, route: bool, n: usize) {
    for _ in 0..n {
        let resp = match conn {
            Conn::H1(s) => {
                s.ready().await.unwrap();
                s.send_request(request(proto, route)).await.unwrap()
            }
            Conn::H2(s) => {
                s.ready().await.unwrap();
                s.send_request(request(proto, route)).await.unwrap()
            }
        };
        assert!(resp.status().is_success(), "status {}", resp.status());
        let body = resp.into_body().collect().await.unwrap();
        if grpc() {
            let status = body.trailers().and_then(|t| t.get("grpc-status"));
            assert_eq!(status.map(|s| s.as_bytes()), Some(&b"0"[..]), "grpc-status");
        }
        assert_eq!(body.to_bytes().len(), 1024);
    }
}

/// Sends `n` requests spread evenly over `conns`, each connection one request at a time,
/// all connections at once.
async fn load(conns: &mut [Conn], proto: Proto, route: bool, n: usize) {
    let each = n / conns.len();
    futures::future::join_all(conns.iter_mut().map(|c| send(c, proto, route, each))).await;
}

/// `WEFT_ICOUNT_CONNECTIONS`: how many connections carry the load at once (default 1).
fn connections() -> usize {
    std::env::var("WEFT_ICOUNT_CONNECTIONS")
        .map(|c| c.parse().unwrap())
        .unwrap_or(1)
}

enum Conn {
    H1(hyper::client::conn::http1::SendRequest<ReqBody>),
    H2(hyper::client::conn::http2::SendRequest<ReqBody>),
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

fn callgrind_control(flag: &str, pid: u32) {
    let out = Command::new("callgrind_control")
        .arg(flag)
        .arg(pid.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "callgrind_control {flag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The total instruction count (`summary:` or `totals:` line) of a callgrind dump.
fn total_ir(path: &Path) -> u64 {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no total in {}", path.display()))
}

/// What is counted per request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tool {
    /// Instructions in user space, by callgrind.
    Callgrind,
    /// Syscalls, context switches and CPU time (task-clock) by `perf stat`, the proxy
    /// running natively: what callgrind does not see (the kernel's share).
    Perf,
}

/// One measurement: the proxy (under callgrind, or native and watched by `perf stat`),
/// warm-up, `n` requests counted, counts divided by `n`.
async fn measure(
    tool: Tool,
    bin: &Path,
    out_dir: &Path,
    label: &str,
    proto: Proto,
    setup: Setup,
    n: usize,
) -> Vec<f64> {
    let backend = start_backend();
    let cfg = out_dir.join(format!("{label}.json"));
    let route = setup == Setup::Route;
    std::fs::write(&cfg, config(backend, route)).unwrap();
    let listen = free_addr().await;
    let admin = free_addr().await;
    let out_file = out_dir.join(format!("callgrind.{label}"));
    let child = proxy_command(tool, bin, &out_file)
        .arg("--config")
        .arg(&cfg)
        .args(match setup {
            Setup::Inbound => [
                "--inbound-forward".to_owned(),
                format!("{listen}={backend}"),
            ],
            _ => ["--forward".to_owned(), format!("{listen}=web")],
        })
        .arg("--admin-addr")
        .arg(admin.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(out_dir.join(format!("{label}.stderr"))).unwrap())
        .spawn()
        .unwrap();
    let proc = Proc { child };
    let pid = proc.child.id();
    // Under valgrind the proxy takes seconds to start.
    let mut listening = false;
    for _ in 0..600 {
        if TcpStream::connect(listen).await.is_ok() {
            listening = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(listening, "{label}: the proxy never listened on {listen}");
    let mut conns = Vec::new();
    for _ in 0..connections() {
        conns.push(connect(listen, proto).await);
    }
    load(&mut conns, proto, route, WARMUP).await;
    let per = match tool {
        Tool::Callgrind => {
            callgrind_control("-z", pid);
            load(&mut conns, proto, route, n).await;
            callgrind_control("-d", pid);
            let dump = PathBuf::from(format!("{}.1", out_file.display()));
            vec![total_ir(&dump) as f64 / n as f64]
        }
        Tool::Perf => {
            let stat_file = out_dir.join(format!("perf.{label}"));
            let mut perf = perf_stat(pid, &stat_file);
            // With `WEFT_ICOUNT_RECORD` set, `perf record` samples where the CPU time goes
            // (software clock: this VM has no hardware counters), for `perf report`.
            let record = std::env::var_os("WEFT_ICOUNT_RECORD").map(|_| {
                let child = Command::new("perf")
                    .args(["record", "-e", "cpu-clock", "-F", "4000", "-p"])
                    .arg(pid.to_string())
                    .arg("-o")
                    .arg(out_dir.join(format!("perf.data.{label}")))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                Proc { child }
            });
            // perf attaches asynchronously; counting a little idle time is harmless.
            tokio::time::sleep(Duration::from_millis(500)).await;
            load(&mut conns, proto, route, n).await;
            if let Some(mut record) = record {
                interrupt(&mut record);
            }
            interrupt(&mut perf);
            perf_counts(&stat_file)
                .into_iter()
                .map(|c| c / n as f64)
                .collect()
        }
    };
    drop(conns);
    drop(proc);
    per
}

/// `bin run` on one worker thread, under callgrind (dumping to `out_file`) or natively
/// for `perf`; the caller adds the listeners and config.
fn proxy_command(tool: Tool, bin: &Path, out_file: &Path) -> Command {
    let mut cmd = match tool {
        Tool::Callgrind => {
            let mut c = Command::new("valgrind");
            c.arg("--tool=callgrind")
                .arg(format!("--callgrind-out-file={}", out_file.display()))
                .arg(bin);
            c
        }
        Tool::Perf => Command::new(bin),
    };
    cmd.args(["run", "--no-transparent", "--log", "warn", "--workers", "1"]);
    cmd
}

/// Starts `perf stat` counting [`PERF_EVENTS`] in process `pid` into `file`.
fn perf_stat(pid: u32, file: &Path) -> Proc {
    let child = Command::new("perf")
        .args(["stat", "-x", ",", "-e", PERF_EVENTS, "-p"])
        .arg(pid.to_string())
        .arg("-o")
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Proc { child }
}

/// Stops a `perf` child with SIGINT, on which it writes what it counted, and waits for it.
fn interrupt(perf: &mut Proc) {
    let killed = Command::new("kill")
        .args(["-INT", &perf.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let _ = perf.child.wait();
}

/// `perf stat`'s events, in the order [`perf_counts`] returns them.
const PERF_EVENTS: &str = "raw_syscalls:sys_enter,context-switches,task-clock";

/// The counts of a `perf stat -x ,` output file, in [`PERF_EVENTS`]'s order (task-clock
/// in µs).
fn perf_counts(path: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(path).unwrap();
    PERF_EVENTS
        .split(',')
        .map(|ev| {
            let line = text
                .lines()
                .find(|l| l.split(',').nth(2).is_some_and(|e| e == ev))
                .unwrap_or_else(|| panic!("no {ev} in {}", path.display()));
            let v: f64 = line.split(',').next().unwrap().parse().unwrap();
            // task-clock is in milliseconds.
            if ev == "task-clock" { v * 1000.0 } else { v }
        })
        .collect()
}

fn selected(var: &str, name: &str) -> bool {
    match std::env::var(var) {
        Ok(list) => list.split(',').any(|p| p.trim() == name),
        Err(_) => true,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse().unwrap()).unwrap_or(20_000);
    let mut bins: Vec<PathBuf> = args.map(PathBuf::from).collect();
    if bins.is_empty() {
        let me = std::env::current_exe().unwrap();
        bins.push(me.parent().unwrap().parent().unwrap().join("weft-proxy"));
    }
    let out_dir = std::env::temp_dir().join(format!("weft-icount-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    println!("callgrind dumps in {}\n", out_dir.display());
    let tool = match std::env::var("WEFT_ICOUNT_TOOL").as_deref() {
        Ok("perf") => Tool::Perf,
        Ok("callgrind") | Err(_) => Tool::Callgrind,
        Ok(other) => panic!("WEFT_ICOUNT_TOOL is callgrind or perf, not {other}"),
    };
    match tool {
        Tool::Callgrind => {
            println!(
                "## Instructions per request, {n} requests one at a time over one connection\n"
            );
            println!("| proxy | protocol | config | instructions/request |");
            println!("| --- | --- | --- | --- |");
        }
        Tool::Perf => {
            println!("## Per request, {n} requests one at a time over one connection\n");
            println!(
                "| proxy | protocol | config | syscalls/request | context switches/request | CPU µs/request |"
            );
            println!("| --- | --- | --- | --- | --- | --- |");
        }
    }
    for proto in [Proto::H1, Proto::H2] {
        let pname = if proto == Proto::H1 { "h1" } else { "h2" };
        // gRPC runs over HTTP/2 only.
        if !selected("WEFT_ICOUNT_PROTOS", pname) || (grpc() && proto == Proto::H1) {
            continue;
        }
        for (cname, setup) in [
            ("plain", Setup::Plain),
            ("route", Setup::Route),
            ("inbound", Setup::Inbound),
            ("mux", Setup::Mux),
        ] {
            if !selected("WEFT_ICOUNT_CONFIGS", cname) {
                continue;
            }
            let shown = if grpc() {
                "H2 gRPC".to_owned()
            } else {
                format!("{proto:?}")
            };
            for (i, bin) in bins.iter().enumerate() {
                let label = format!("{i}-{pname}-{cname}");
                if setup == Setup::Mux {
                    let [client, server] =
                        mux::measure(tool, bin, &out_dir, &label, proto, n).await;
                    for (side, per) in [("client sidecar", client), ("server sidecar", server)] {
                        println!(
                            "| {} | {shown} | {cname}: {side} | {} |",
                            bin.display(),
                            columns(tool, &per)
                        );
                    }
                    continue;
                }
                let per = measure(tool, bin, &out_dir, &label, proto, setup, n).await;
                println!(
                    "| {} | {shown} | {cname} | {} |",
                    bin.display(),
                    columns(tool, &per)
                );
            }
        }
    }
}

/// One row's figures, as the table's header for `tool` names them.
fn columns(tool: Tool, per: &[f64]) -> String {
    match tool {
        Tool::Callgrind => format!("{:.0}", per[0]),
        Tool::Perf => format!("{:.2} | {:.2} | {:.1}", per[0], per[1], per[2]),
    }
}

/// The `mux` setup: two proxies (under callgrind, or native for `perf`) with mutual TLS
/// between them, and the identity endpoint that issues their certificates (a test CA; nothing is checked: the
/// harness trusts its own proxies).
mod mux {
    use std::{
        net::SocketAddr,
        path::{Path, PathBuf},
        process::Stdio,
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
    use tokio::net::{TcpListener, TcpStream};
    use weft_api::identity::{CertifyRequest, CertifyResponse};

    use super::{
        Conn, Proc, Proto, Tool, WARMUP, callgrind_control, connect, free_addr, interrupt, load,
        perf_counts, perf_stat, start_backend, total_ir,
    };

    const CLIENT_ID: &str = "spiffe://cluster.local/ns/icount/sa/client";
    const SERVER_ID: &str = "spiffe://cluster.local/ns/icount/sa/server";
    /// The name the identity endpoint's certificate carries.
    const SERVER_NAME: &str = "identity.icount";

    /// Counts per request in the client sidecar and in the server sidecar, as
    /// [`super::measure`] gives them for one proxy.
    pub async fn measure(
        tool: Tool,
        bin: &Path,
        out_dir: &Path,
        label: &str,
        proto: Proto,
        n: usize,
    ) -> [Vec<f64>; 2] {
        let backend = start_backend();
        let (identity, root) = identity_endpoint(out_dir, label).await;
        let id_args = |id: &str| {
            vec![
                "--identity-addr".to_owned(),
                identity.to_string(),
                "--identity-server-name".to_owned(),
                SERVER_NAME.to_owned(),
                "--trust-root-file".to_owned(),
                root.display().to_string(),
                "--identity".to_owned(),
                id.to_owned(),
            ]
        };
        let empty = out_dir.join(format!("{label}-server.json"));
        std::fs::write(
            &empty,
            r#"{"apiVersion": "weft.dev/proxy/v1alpha1", "kind": "ProxyConfig", "services": []}"#,
        )
        .unwrap();
        let server_in = free_addr().await;
        let mut args = vec![
            "--inbound-forward".to_owned(),
            format!("{server_in}={backend}"),
        ];
        let second = match std::env::var("WEFT_ICOUNT_MUX_ENDPOINTS").as_deref() {
            Err(_) | Ok("1") => None,
            Ok("2") => Some(free_addr().await),
            Ok(other) => panic!("WEFT_ICOUNT_MUX_ENDPOINTS is 1 or 2, not {other}"),
        };
        let mut endpoints = format!(r#"{{"address": "{server_in}", "identity": "{SERVER_ID}"}}"#);
        if let Some(second) = second {
            args.extend([
                "--inbound-forward".to_owned(),
                format!("{second}={backend}"),
            ]);
            endpoints.push_str(&format!(
                r#", {{"address": "{second}", "identity": "{SERVER_ID}"}}"#
            ));
        }
        args.extend(id_args(SERVER_ID));
        let (server, server_out) = start(
            tool,
            bin,
            out_dir,
            &format!("{label}-server"),
            &empty,
            &args,
        )
        .await;
        let cfg = out_dir.join(format!("{label}-client.json"));
        std::fs::write(
            &cfg,
            format!(
                r#"{{"apiVersion": "weft.dev/proxy/v1alpha1", "kind": "ProxyConfig", "services": [{{"name": "web", "endpoints": [{endpoints}]}}]}}"#
            ),
        )
        .unwrap();
        let listen = free_addr().await;
        let mut args = vec!["--forward".to_owned(), format!("{listen}=web")];
        args.extend(id_args(CLIENT_ID));
        let (client, client_out) =
            start(tool, bin, out_dir, &format!("{label}-client"), &cfg, &args).await;
        wait_listening(listen).await;
        wait_listening(server_in).await;
        if let Some(second) = second {
            wait_listening(second).await;
        }
        // Both proxies fetch a certificate first (slow under valgrind): until then the
        // client sidecar answers 503. Fresh connections until one request gets through.
        let mut through = false;
        for _ in 0..600 {
            let mut c = connect(listen, proto).await;
            let ok = match &mut c {
                Conn::H1(s) => s.send_request(super::request(proto, false)).await,
                Conn::H2(s) => s.send_request(super::request(proto, false)).await,
            }
            .is_ok_and(|r| r.status().is_success());
            if ok {
                through = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(through, "{label}: no request got through the two proxies");
        let mut conns = Vec::new();
        for _ in 0..super::connections() {
            conns.push(connect(listen, proto).await);
        }
        load(&mut conns, proto, false, WARMUP).await;
        let (cpid, spid) = (client.child.id(), server.child.id());
        let counts = match tool {
            Tool::Callgrind => {
                callgrind_control("-z", cpid);
                callgrind_control("-z", spid);
                load(&mut conns, proto, false, n).await;
                callgrind_control("-d", cpid);
                callgrind_control("-d", spid);
                let per = |out: &PathBuf| {
                    vec![total_ir(Path::new(&format!("{}.1", out.display()))) as f64 / n as f64]
                };
                [per(&client_out), per(&server_out)]
            }
            Tool::Perf => {
                let files = [
                    out_dir.join(format!("perf.{label}-client")),
                    out_dir.join(format!("perf.{label}-server")),
                ];
                let mut perfs = [perf_stat(cpid, &files[0]), perf_stat(spid, &files[1])];
                // perf attaches asynchronously; counting a little idle time is harmless.
                tokio::time::sleep(Duration::from_millis(500)).await;
                load(&mut conns, proto, false, n).await;
                for p in &mut perfs {
                    interrupt(p);
                }
                files.map(|f| perf_counts(&f).into_iter().map(|c| c / n as f64).collect())
            }
        };
        drop(conns);
        drop((client, server));
        counts
    }

    /// Starts `bin run` with `cfg` and `args`, under callgrind or natively for `perf`;
    /// returns it and its callgrind dump path.
    async fn start(
        tool: Tool,
        bin: &Path,
        out_dir: &Path,
        label: &str,
        cfg: &Path,
        args: &[String],
    ) -> (Proc, PathBuf) {
        let out_file = out_dir.join(format!("callgrind.{label}"));
        let admin = free_addr().await;
        let child = super::proxy_command(tool, bin, &out_file)
            .arg("--config")
            .arg(cfg)
            .args(args)
            .arg("--admin-addr")
            .arg(admin.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(out_dir.join(format!("{label}.stderr"))).unwrap())
            .spawn()
            .unwrap();
        (Proc { child }, out_file)
    }

    async fn wait_listening(addr: SocketAddr) {
        // Under valgrind a proxy takes seconds to start.
        for _ in 0..600 {
            if TcpStream::connect(addr).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("nothing listens on {addr}");
    }

    /// A CA (its root written to `out_dir`) and the identity endpoint on loopback, serving
    /// `/weft.identity.v1/certify` over TLS.
    async fn identity_endpoint(out_dir: &Path, label: &str) -> (SocketAddr, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "icount mesh root");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let root_pem = params.self_signed(&key).unwrap().pem();
        let root = out_dir.join(format!("{label}-root.pem"));
        std::fs::write(&root, &root_pem).unwrap();
        let issuer = Arc::new(Issuer::new(params, key));
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
        tokio::spawn(async move {
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
        (addr, root)
    }

    /// Issues a certificate for the identity a request asks for.
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
