//! What the network-namespace tests share: a small test runner, a "pod" and a "peer"
//! namespace joined by a veth pair, and listeners run inside them.
//!
//! ```text
//!   peer ns                                    pod ns
//!   198.18.250.1  fd00:77::1    ◀──── veth ────▶  198.18.250.2  fd00:77::2
//!   198.18.251.1  fd00:77:1::1
//! ```
//!
//! The test files that use this module are built with `harness = false`: their `main`
//! calls [`main`], which either runs their tests (a libtest-like runner: name filters,
//! `--exact`, `--skip`, `--list`, `--test-threads`) or, when this binary was re-run inside
//! a namespace with [`HELPER_ENV`] set, serves listeners there. That way the listeners are
//! this very binary, no test needs unsafe code to enter a namespace, and the helper is not
//! reported as a test.
//!
//! Every listener answers each connection with one line,
//! `NAME dst=LOCAL src=PEER orig=ORIGINAL`, where ORIGINAL is what `SO_ORIGINAL_DST`
//! reports (`none` when the connection was not redirected). A plain listener writes the
//! line as soon as it accepts (the server speaks first); an `http` listener reads a request
//! head first and answers with the line as the body of a `200`.
//!
//! Needs root, `ip`, `iptables`/`ip6tables` (nft and legacy), `setpriv` and `bash`. With
//! `WEFT_SKIP_NETNS` set, each test that needs them prints
//! `SKIPPED (WEFT_SKIP_NETNS): NAME` and does not run; CI (`.ci/run`) refuses to run with it
//! set.

// Helpers below panic on failed setup, which fails the test that called them.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout
)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, ExitCode, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::Duration,
};

/// The proxy binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_weft-proxy");
/// Set in a re-run of the test binary to make it serve listeners: `NAME[/http]=ADDR,...;...`,
/// where ADDR is a port (meaning `[::]:PORT`, IPv4 and IPv6) or `ip:port`.
pub const HELPER_ENV: &str = "WEFT_NETNS_TEST_LISTEN";
/// The proxy's UID, as `weft-proxy init` exempts it.
pub const PROXY_UID: &str = "5150";
/// The variable that skips the tests needing namespaces (never in CI).
pub const SKIP_ENV: &str = "WEFT_SKIP_NETNS";

/// The pod's IPv4 address.
pub const POD4: &str = "198.18.250.2";
/// The peer's IPv4 address.
pub const PEER4: &str = "198.18.250.1";
/// A second address of the peer, in a network the pod reaches through it.
pub const FAR4: &str = "198.18.251.1";
/// The pod's IPv6 address.
pub const POD6: &str = "fd00:77::2";
/// The peer's IPv6 address.
pub const PEER6: &str = "fd00:77::1";
/// A second IPv6 address of the peer, in a network the pod reaches through it.
pub const FAR6: &str = "fd00:77:1::1";

// ---- the runner ----

/// One test of a `harness = false` test binary.
pub struct Test {
    /// Its name, for filters and the report.
    pub name: &'static str,
    /// Whether it needs namespaces (and so is skipped, loudly, under [`SKIP_ENV`]).
    pub netns: bool,
    /// The test; it fails by panicking.
    pub run: fn(),
}

/// The entry point of a test binary using this module: serves listeners when re-run as the
/// helper, else runs the selected tests in parallel and reports like libtest.
pub fn main(tests: &[Test]) -> ExitCode {
    if let Ok(spec) = std::env::var(HELPER_ENV) {
        serve_listeners(&spec);
        return ExitCode::SUCCESS;
    }
    let mut filters = Vec::new();
    let mut skips = Vec::new();
    let (mut exact, mut list) = (false, false);
    let mut threads = thread::available_parallelism().map_or(2, |n| n.get());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--exact" => exact = true,
            "--list" => list = true,
            "--skip" => skips.extend(args.next()),
            "--test-threads" => {
                threads = args.next().and_then(|n| n.parse().ok()).unwrap_or(threads)
            }
            a if a.starts_with("--test-threads=") => {
                threads = a["--test-threads=".len()..].parse().unwrap_or(threads)
            }
            // Output is never captured here; other libtest flags change nothing.
            a if a.starts_with('-') => {}
            a => filters.push(a.to_owned()),
        }
    }
    let matches = |name: &str, pattern: &str| {
        if exact {
            name == pattern
        } else {
            name.contains(pattern)
        }
    };
    let selected: Vec<&Test> = tests
        .iter()
        .filter(|t| filters.is_empty() || filters.iter().any(|f| matches(t.name, f)))
        .filter(|t| !skips.iter().any(|s| matches(t.name, s)))
        .collect();
    if list {
        for t in &selected {
            println!("{}: test", t.name);
        }
        return ExitCode::SUCCESS;
    }
    println!("\nrunning {} tests", selected.len());
    let skip_netns = std::env::var_os(SKIP_ENV).is_some();
    let queue = Mutex::new(selected.into_iter());
    let failed = Mutex::new(Vec::new());
    let (passed, skipped) = (AtomicU32::new(0), AtomicU32::new(0));
    thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let Some(t) = queue.lock().unwrap().next() else {
                        return;
                    };
                    if t.netns && skip_netns {
                        eprintln!("SKIPPED ({SKIP_ENV}): {}", t.name);
                        println!("test {} ... skipped", t.name);
                        skipped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let outcome = thread::Builder::new()
                        .name(t.name.to_owned())
                        .spawn(t.run)
                        .unwrap()
                        .join();
                    if outcome.is_ok() {
                        println!("test {} ... ok", t.name);
                        passed.fetch_add(1, Ordering::Relaxed);
                    } else {
                        println!("test {} ... FAILED", t.name);
                        failed.lock().unwrap().push(t.name);
                    }
                }
            });
        }
    });
    let failed = failed.into_inner().unwrap();
    let (passed, skipped) = (passed.into_inner(), skipped.into_inner());
    if !failed.is_empty() {
        println!("\nfailures:");
        for name in &failed {
            println!("    {name}");
        }
    }
    println!(
        "\ntest result: {}. {passed} passed; {} failed; {skipped} skipped\n",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

// ---- the listeners, run inside a namespace ----

fn serve_listeners(spec: &str) {
    for group in spec.split(';') {
        let (name, addrs) = group.split_once('=').unwrap();
        let (name, http) = match name.strip_suffix("/http") {
            Some(n) => (n, true),
            None => (name, false),
        };
        for addr in addrs.split(',') {
            let addr: SocketAddr = match addr.parse::<u16>() {
                // `[::]` takes IPv4 too (as mapped addresses): one socket per port.
                Ok(port) => SocketAddr::from(([0u16; 8], port)),
                Err(_) => addr.parse().unwrap(),
            };
            let listener = TcpListener::bind(addr).unwrap();
            let name = name.to_owned();
            thread::spawn(move || serve(listener, &name, http));
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "WEFT-READY").unwrap();
    out.flush().unwrap();
    drop(out);
    // Bounded: the test kills this process long before.
    thread::sleep(Duration::from_secs(120));
}

fn serve(listener: TcpListener, name: &str, http: bool) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let name = name.to_owned();
        thread::spawn(move || answer(stream, &name, http));
    }
}

fn answer(mut stream: TcpStream, name: &str, http: bool) {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let raw = stream.local_addr().unwrap();
    let local = canonical(raw);
    let peer = stream
        .peer_addr()
        .map_or("?".to_owned(), |a| canonical(a).to_string());
    let orig = match weft_proxy::orig_dst::original_dst(&stream, raw) {
        Ok(o) if canonical(o) != local => o.to_string(),
        _ => "none".to_owned(),
    };
    let line = format!("{name} dst={local} src={peer} orig={orig}\n");
    if !http {
        let _ = stream.write_all(line.as_bytes());
        return;
    }
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{line}",
        line.len()
    );
}

// ---- the namespaces ----

/// Runs a command and returns its output (whatever its status).
pub fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Runs a command that must succeed and returns its standard output.
pub fn sh_ok(args: &[&str]) -> String {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A process inside a namespace, killed when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A pod namespace and a peer namespace joined by a veth pair, both deleted when dropped
/// (with them go the veth pair and every rule), even when the test fails.
pub struct Pair {
    /// The pod namespace's name.
    pub pod: String,
    /// The peer namespace's name.
    pub peer: String,
    /// Processes to kill before the namespaces go.
    pub processes: Vec<Process>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.processes.clear();
        for ns in [&self.pod, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Pair {
    /// Two fresh namespaces, named after this process and a counter.
    pub fn new() -> Pair {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        let pair = Pair {
            pod: format!("weft-init-pod-{id}"),
            peer: format!("weft-init-peer-{id}"),
            processes: Vec::new(),
        };
        sh_ok(&["ip", "netns", "add", &pair.pod]);
        sh_ok(&["ip", "netns", "add", &pair.peer]);
        let (pod, peer) = (pair.pod.as_str(), pair.peer.as_str());
        sh_ok(&[
            "ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", peer,
        ]);
        for (ns, addrs) in [
            (pod, &[format!("{POD4}/24"), format!("{POD6}/64")][..]),
            (
                peer,
                &[
                    format!("{PEER4}/24"),
                    format!("{FAR4}/24"),
                    format!("{PEER6}/64"),
                    format!("{FAR6}/64"),
                ][..],
            ),
        ] {
            sh_ok(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            for a in addrs {
                // No duplicate address detection: IPv6 addresses work at once.
                let nodad: &[&str] = if a.contains(':') { &["nodad"] } else { &[] };
                sh_ok(&[&["ip", "-n", ns, "addr", "add", a, "dev", "eth0"], nodad].concat());
            }
            sh_ok(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
        }
        sh_ok(&[
            "ip",
            "-n",
            pod,
            "route",
            "add",
            "198.18.251.0/24",
            "via",
            PEER4,
        ]);
        sh_ok(&[
            "ip",
            "-n",
            pod,
            "-6",
            "route",
            "add",
            "fd00:77:1::/64",
            "via",
            PEER6,
        ]);
        pair
    }

    /// Runs `weft-proxy init ARGS` in the pod (as root with every capability, unless
    /// `prefix` says otherwise) and returns its output.
    pub fn init(&self, prefix: &[&str], args: &[&str]) -> Output {
        let mut cmd = vec!["ip", "netns", "exec", &self.pod];
        cmd.extend_from_slice(prefix);
        cmd.extend_from_slice(&[BIN, "init"]);
        cmd.extend_from_slice(args);
        sh(&cmd)
    }

    /// Runs `weft-proxy init ARGS` in the pod; it must succeed.
    pub fn init_ok(&self, args: &[&str]) {
        let out = self.init(&[], args);
        assert!(
            out.status.success(),
            "weft-proxy init {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts listeners (see [`HELPER_ENV`] for `spec`) in `ns` and waits until they are
    /// bound.
    pub fn spawn_listener(&mut self, ns: &str, spec: &str) {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(exe)
            .env(HELPER_ENV, spec)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        self.processes.push(Process(child));
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.trim_end().ends_with("WEFT-READY") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("listeners {spec:?} in {ns} not ready within 20 s"));
    }

    /// Runs a bash script in `ns` (as root, or as `uid`) with a 15 s bound, once, and
    /// returns its standard output and standard error.
    pub fn bash_once(&self, ns: &str, uid: Option<&str>, script: &str) -> (String, String) {
        let mut cmd: Vec<String> = ["timeout", "15", "ip", "netns", "exec", ns]
            .map(String::from)
            .into();
        if let Some(uid) = uid {
            cmd.extend([
                "setpriv".into(),
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
            ]);
        }
        cmd.extend(["bash".into(), "-c".into(), script.to_owned()]);
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let out = sh(&args);
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Connects from `ns` to `host:port` (as root, or as `uid`) and returns the line the
    /// listener that got the connection answered. Retries briefly while nothing answers
    /// (a link that is still coming up), at most 5 times.
    pub fn connect(&self, ns: &str, uid: Option<&str>, host: &str, port: u16) -> String {
        let mut last = String::new();
        for _ in 0..5 {
            let (out, err) = self.bash_once(ns, uid, &read_line(host, port, 5));
            let line = out.trim().to_owned();
            if !line.is_empty() {
                return line;
            }
            last = err;
            thread::sleep(Duration::from_millis(200));
        }
        panic!("no answer from {host}:{port} in {ns}: {last}");
    }

    /// The peer connects to `host:port`.
    pub fn peer_dials(&self, host: &str, port: u16) -> String {
        self.connect(&self.peer, None, host, port)
    }

    /// The application (root in the pod) connects to `host:port`.
    pub fn app_dials(&self, host: &str, port: u16) -> String {
        self.connect(&self.pod, None, host, port)
    }

    /// A process with the proxy's UID in the pod connects to `host:port`.
    pub fn proxy_dials(&self, host: &str, port: u16) -> String {
        self.connect(&self.pod, Some(PROXY_UID), host, port)
    }

    /// `iptables-save` and `ip6tables-save` of the pod (all tables), without the comment
    /// lines that carry timestamps.
    pub fn save(&self, backend: &str) -> String {
        let mut all = String::new();
        for stem in ["iptables", "ip6tables"] {
            let program = format!("{stem}-{backend}-save");
            let out = sh_ok(&["ip", "netns", "exec", &self.pod, &program]);
            for line in out.lines().filter(|l| !l.starts_with('#')) {
                all.push_str(line);
                all.push('\n');
            }
        }
        all
    }
}

/// A bash script that connects to `host:port` and prints the first line it receives
/// within `secs` seconds, sending nothing.
pub fn read_line(host: &str, port: u16, secs: u32) -> String {
    format!("exec 3<>/dev/tcp/{host}/{port} && timeout {secs} head -n 1 <&3")
}

/// A bash script that sends `GET PATH` over HTTP/1.1 to `host:port` and prints the
/// response (status line, headers and body) as it arrives within 5 s.
pub fn http_get(host: &str, port: u16, path: &str) -> String {
    format!(
        "exec 3<>/dev/tcp/{host}/{port} && printf 'GET {path} HTTP/1.1\\r\\nHost: weft.test\\r\\nConnection: close\\r\\n\\r\\n' >&3 && timeout 5 cat <&3"
    )
}

/// Asserts that `line` came from listener `name` and saw `orig` as original destination.
#[track_caller]
pub fn assert_landed(line: &str, name: &str, orig: &str) {
    assert!(
        line.starts_with(&format!("{name} ")) && line.ends_with(&format!(" orig={orig}")),
        "expected listener {name:?} with orig={orig}, got {line:?}"
    );
}

/// `[host]:port`.
pub fn v6(host: &str, port: u16) -> String {
    format!("[{host}]:{port}")
}
