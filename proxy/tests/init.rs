//! `weft-proxy init` for real: each test makes two network namespaces of its own — a "pod"
//! and a "peer" joined by a veth pair — runs `weft-proxy init` in the pod, and sends real
//! TCP (IPv4 and IPv6) to see where it lands. Traffic never leaves those namespaces.
//!
//! ```text
//!   peer ns                                    pod ns (weft-proxy init ran here)
//!   10.77.0.1  fd00:77::1    ◀──── veth ────▶  10.77.0.2  fd00:77::2
//!   10.77.1.1  fd00:77:1::1  (a skipped CIDR)  listeners: inbound :15006, outbound :15001,
//!   listener "peer" :80 :3306                            app :8080 :9005, admin :15021
//! ```
//!
//! Every listener answers each connection with one line, `NAME dst=LOCAL orig=ORIGINAL`,
//! where ORIGINAL is what `SO_ORIGINAL_DST` reports (`none` when the connection was not
//! redirected). The listeners are this very test binary, re-run inside a namespace by
//! `ip netns exec` with [`HELPER_ENV`] set (see [`listener_helper`]), so no test needs
//! unsafe code to enter a namespace.
//!
//! Needs root, `ip`, `iptables`/`ip6tables` (nft and legacy), `setpriv` and `bash`. Set
//! `WEFT_SKIP_NETNS=1` to skip explicitly where those are unavailable.

// Helpers below panic on failed setup, which fails the test that called them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_weft-proxy");
/// Set in a re-run of this binary to make [`listener_helper`] serve: `NAME=PORT,PORT;...`.
const HELPER_ENV: &str = "WEFT_INIT_TEST_LISTEN";
const PROXY_UID: &str = "5150";

const POD4: &str = "10.77.0.2";
const PEER4: &str = "10.77.0.1";
const FAR4: &str = "10.77.1.1";
const POD6: &str = "fd00:77::2";
const PEER6: &str = "fd00:77::1";
const FAR6: &str = "fd00:77:1::1";

/// The flags the injector passes, with skip lists that the tests exercise.
const INIT_FLAGS: &[&str] = &[
    "--inbound-port=15006",
    "--outbound-port=15001",
    "--proxy-uid=5150",
    "--skip-inbound-ports=15021,9000-9010",
    "--skip-outbound-ports=25,3306",
    "--skip-outbound-cidrs=169.254.169.254/32,10.77.1.0/24,fd00:77:1::/64",
];

// ---- the listener, run inside a namespace ----

/// Not a test of its own: a no-op unless [`HELPER_ENV`] is set, in which case this process
/// was started inside a namespace to serve the listeners it names, for at most a minute.
#[test]
fn listener_helper() {
    let Ok(spec) = std::env::var(HELPER_ENV) else {
        return;
    };
    for group in spec.split(';') {
        let (name, ports) = group.split_once('=').unwrap();
        for port in ports.split(',') {
            // `[::]` takes IPv4 too (as mapped addresses): one socket per port.
            let listener = TcpListener::bind(("::", port.parse::<u16>().unwrap())).unwrap();
            let name = name.to_owned();
            thread::spawn(move || serve(listener, &name));
        }
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "WEFT-READY").unwrap();
    out.flush().unwrap();
    drop(out);
    // Bounded: the test kills this process long before.
    thread::sleep(Duration::from_secs(60));
}

fn serve(listener: TcpListener, name: &str) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let raw = stream.local_addr().unwrap();
        let local = SocketAddr::new(raw.ip().to_canonical(), raw.port());
        let orig = match weft_proxy::orig_dst::original_dst(&stream, raw) {
            Ok(o) if SocketAddr::new(o.ip().to_canonical(), o.port()) != local => o.to_string(),
            _ => "none".to_owned(),
        };
        let _ = writeln!(stream, "{name} dst={local} orig={orig}");
    }
}

// ---- the namespaces ----

fn skip() -> bool {
    if std::env::var_os("WEFT_SKIP_NETNS").is_some() {
        eprintln!("WEFT_SKIP_NETNS is set: skipping the network-namespace test");
        return true;
    }
    false
}

fn sh(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn sh_ok(args: &[&str]) -> String {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A listener process inside a namespace, killed when dropped.
struct Listener(Child);

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A pod namespace and a peer namespace joined by a veth pair, both deleted when dropped
/// (with them go the veth pair and every rule), even when the test fails.
struct Pair {
    pod: String,
    peer: String,
    listeners: Vec<Listener>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.listeners.clear();
        for ns in [&self.pod, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Pair {
    fn new() -> Pair {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        let pair = Pair {
            pod: format!("weft-init-pod-{id}"),
            peer: format!("weft-init-peer-{id}"),
            listeners: Vec::new(),
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
            "10.77.1.0/24",
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
    fn init(&self, prefix: &[&str], args: &[&str]) -> Output {
        let mut cmd = vec!["ip", "netns", "exec", &self.pod];
        cmd.extend_from_slice(prefix);
        cmd.extend_from_slice(&[BIN, "init"]);
        cmd.extend_from_slice(args);
        sh(&cmd)
    }

    fn init_ok(&self, args: &[&str]) {
        let out = self.init(&[], args);
        assert!(
            out.status.success(),
            "weft-proxy init {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the listeners of the diagram and waits until they are bound.
    fn listen(&mut self) {
        let pod = self.pod.clone();
        let peer = self.peer.clone();
        self.spawn_listener(
            &pod,
            "inbound=15006;outbound=15001;app=8080,9005;admin=15021",
        );
        self.spawn_listener(&peer, "peer=80,3306");
    }

    fn spawn_listener(&mut self, ns: &str, spec: &str) {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(exe)
            .args([
                "--exact",
                "listener_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER_ENV, spec)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        self.listeners.push(Listener(child));
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

    /// Connects from `ns` to `host:port` (as root, or as `uid`) and returns the line the
    /// listener that got the connection answered. Retries briefly while nothing answers
    /// (a link that is still coming up), at most 5 times.
    fn connect(&self, ns: &str, uid: Option<&str>, host: &str, port: u16) -> String {
        let mut cmd: Vec<String> = ["timeout", "10", "ip", "netns", "exec", ns]
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
        cmd.extend([
            "bash".into(),
            "-c".into(),
            format!("exec 3<>/dev/tcp/{host}/{port} && timeout 5 head -n 1 <&3"),
        ]);
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let mut last = String::new();
        for _ in 0..5 {
            let out = sh(&args);
            let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if !line.is_empty() {
                return line;
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            thread::sleep(Duration::from_millis(200));
        }
        panic!("no answer from {host}:{port} in {ns}: {last}");
    }

    fn peer_dials(&self, host: &str, port: u16) -> String {
        self.connect(&self.peer, None, host, port)
    }

    fn app_dials(&self, host: &str, port: u16) -> String {
        self.connect(&self.pod, None, host, port)
    }

    fn proxy_dials(&self, host: &str, port: u16) -> String {
        self.connect(&self.pod, Some(PROXY_UID), host, port)
    }

    /// `iptables-save` and `ip6tables-save` of the pod (all tables), without the comment
    /// lines that carry timestamps.
    fn save(&self, backend: &str) -> String {
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

/// Asserts that `line` came from listener `name` and saw `orig` as original destination.
#[track_caller]
fn assert_landed(line: &str, name: &str, orig: &str) {
    assert!(
        line.starts_with(&format!("{name} ")) && line.ends_with(&format!(" orig={orig}")),
        "expected listener {name:?} with orig={orig}, got {line:?}"
    );
}

fn v6(host: &str, port: u16) -> String {
    format!("[{host}]:{port}")
}

// ---- the tests ----

#[test]
fn inbound_tcp_is_redirected_to_the_inbound_port_with_its_original_destination() {
    if skip() {
        return;
    }
    let mut pair = Pair::new();
    pair.init_ok(INIT_FLAGS);
    pair.listen();
    assert_landed(
        &pair.peer_dials(POD4, 8080),
        "inbound",
        &format!("{POD4}:8080"),
    );
    assert_landed(&pair.peer_dials(POD6, 8080), "inbound", &v6(POD6, 8080));
    // A port with no listener at all is still redirected: the proxy decides.
    assert_landed(
        &pair.peer_dials(POD4, 4444),
        "inbound",
        &format!("{POD4}:4444"),
    );
}

#[test]
fn outbound_tcp_is_redirected_to_the_outbound_port_with_its_original_destination() {
    if skip() {
        return;
    }
    let mut pair = Pair::new();
    pair.init_ok(INIT_FLAGS);
    pair.listen();
    assert_landed(
        &pair.app_dials(PEER4, 80),
        "outbound",
        &format!("{PEER4}:80"),
    );
    assert_landed(&pair.app_dials(PEER6, 80), "outbound", &v6(PEER6, 80));
}

#[test]
fn skipped_ports_and_cidrs_bypass_the_proxy() {
    if skip() {
        return;
    }
    let mut pair = Pair::new();
    pair.init_ok(INIT_FLAGS);
    pair.listen();
    // Inbound: the admin port and a port inside a skipped range reach the pod directly.
    assert_landed(&pair.peer_dials(POD4, 15021), "admin", "none");
    assert_landed(&pair.peer_dials(POD6, 15021), "admin", "none");
    assert_landed(&pair.peer_dials(POD4, 9005), "app", "none");
    assert_landed(&pair.peer_dials(POD6, 9005), "app", "none");
    // Outbound: a skipped port, and addresses in the skipped IPv4 and IPv6 networks.
    assert_landed(&pair.app_dials(PEER4, 3306), "peer", "none");
    assert_landed(&pair.app_dials(PEER6, 3306), "peer", "none");
    assert_landed(&pair.app_dials(FAR4, 80), "peer", "none");
    assert_landed(&pair.app_dials(FAR6, 80), "peer", "none");
    // The skipped networks do not leak into the neighbouring addresses.
    assert_landed(
        &pair.app_dials(PEER4, 80),
        "outbound",
        &format!("{PEER4}:80"),
    );
    assert_landed(&pair.app_dials(PEER6, 80), "outbound", &v6(PEER6, 80));
}

#[test]
fn the_proxy_uid_is_not_redirected_and_loopback_stays_local() {
    if skip() {
        return;
    }
    let mut pair = Pair::new();
    pair.init_ok(INIT_FLAGS);
    pair.listen();
    // The proxy's own outbound connections go where they were sent: no loop.
    assert_landed(&pair.proxy_dials(PEER4, 80), "peer", "none");
    assert_landed(&pair.proxy_dials(PEER6, 80), "peer", "none");
    // The proxy's inbound side dials the app over loopback: straight through.
    assert_landed(&pair.proxy_dials("127.0.0.1", 8080), "app", "none");
    assert_landed(&pair.proxy_dials("::1", 8080), "app", "none");
    // The app dialling loopback stays local too.
    assert_landed(&pair.app_dials("127.0.0.1", 8080), "app", "none");
    assert_landed(&pair.app_dials("::1", 8080), "app", "none");
    // The app dialling its own pod address is outbound traffic like any other...
    assert_landed(
        &pair.app_dials(POD4, 8080),
        "outbound",
        &format!("{POD4}:8080"),
    );
    assert_landed(&pair.app_dials(POD6, 8080), "outbound", &v6(POD6, 8080));
    // ...and the proxy dialling its own pod address (an endpoint it balanced to) goes
    // through the inbound side, as a peer's connection would.
    assert_landed(
        &pair.proxy_dials(POD4, 8080),
        "inbound",
        &format!("{POD4}:8080"),
    );
    assert_landed(&pair.proxy_dials(POD6, 8080), "inbound", &v6(POD6, 8080));
    // Except on skipped inbound ports.
    assert_landed(&pair.proxy_dials(POD4, 15021), "admin", "none");
}

#[test]
fn the_legacy_backend_redirects_too() {
    if skip() {
        return;
    }
    let mut pair = Pair::new();
    let mut flags = INIT_FLAGS.to_vec();
    flags.push("--backend=legacy");
    pair.init_ok(&flags);
    assert!(
        pair.save("legacy")
            .contains("-A OUTPUT -p tcp -j WEFT_OUTBOUND")
    );
    assert!(!pair.save("nft").contains("WEFT_"), "nft untouched");
    pair.listen();
    assert_landed(
        &pair.peer_dials(POD4, 8080),
        "inbound",
        &format!("{POD4}:8080"),
    );
    assert_landed(&pair.app_dials(PEER6, 80), "outbound", &v6(PEER6, 80));
    assert_landed(&pair.proxy_dials(PEER4, 80), "peer", "none");
    assert_landed(&pair.app_dials(FAR4, 80), "peer", "none");
}

#[test]
fn a_second_run_changes_nothing() {
    if skip() {
        return;
    }
    for backend in ["nft", "legacy"] {
        let pair = Pair::new();
        let mut flags = INIT_FLAGS.to_vec();
        let choice = format!("--backend={backend}");
        flags.push(&choice);
        pair.init_ok(&flags);
        let first = pair.save(backend);
        assert!(
            first.contains("-A PREROUTING -p tcp -j WEFT_INBOUND"),
            "{first}"
        );
        assert!(
            first.contains("-A WEFT_OUTBOUND -d 10.77.1.0/24 -p tcp -j RETURN"),
            "{first}"
        );
        assert!(
            first.contains("-A WEFT_OUTBOUND -d fd00:77:1::/64 -p tcp -j RETURN"),
            "{first}"
        );
        pair.init_ok(&flags);
        assert_eq!(
            pair.save(backend),
            first,
            "{backend}: a re-run changed the rules"
        );

        // Different flags replace Weft's rules rather than adding to them, and the
        // original flags bring back exactly the original table.
        pair.init_ok(&["--skip-inbound-ports=15021", &choice]);
        let other = pair.save(backend);
        assert_ne!(other, first);
        assert!(!other.contains("3306"), "{other}");
        assert_eq!(other.matches("-j WEFT_INBOUND\n").count(), 2 + 2, "{other}");
        pair.init_ok(&flags);
        assert_eq!(
            pair.save(backend),
            first,
            "{backend}: flags changed and back"
        );
    }
}

#[test]
fn auto_prefers_nft_but_keeps_to_the_backend_an_earlier_run_used() {
    if skip() {
        return;
    }
    let pair = Pair::new();
    pair.init_ok(INIT_FLAGS);
    assert!(pair.save("nft").contains("WEFT_OUTBOUND"));
    // Probing did not create a legacy nat table (reading one would).
    let names = sh_ok(&[
        "ip",
        "netns",
        "exec",
        &pair.pod,
        "cat",
        "/proc/net/ip_tables_names",
    ]);
    assert!(!names.lines().any(|t| t == "nat"), "{names}");
    assert!(!pair.save("legacy").contains("WEFT_"));

    let pair = Pair::new();
    let mut flags = INIT_FLAGS.to_vec();
    flags.push("--backend=legacy");
    pair.init_ok(&flags);
    let legacy = pair.save("legacy");
    pair.init_ok(INIT_FLAGS);
    assert_eq!(pair.save("legacy"), legacy, "auto re-ran on legacy");
    assert!(!pair.save("nft").contains("WEFT_"), "no second copy in nft");
}

#[test]
fn plain_iptables_names_serve_when_the_suffixed_ones_are_missing() {
    if skip() {
        return;
    }
    // An image with a single iptables: only `iptables-save` and friends, here the nft
    // implementation under its plain names, on a PATH without the suffixed ones.
    let multi = sh_ok(&["sh", "-c", "command -v iptables-nft-save"]);
    let multi = std::fs::canonicalize(multi.trim()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "iptables-save",
        "iptables-restore",
        "ip6tables-save",
        "ip6tables-restore",
    ] {
        std::os::unix::fs::symlink(&multi, dir.path().join(name)).unwrap();
    }
    let path = format!("PATH={}", dir.path().display());
    let pair = Pair::new();
    let out = pair.init(&["env", &path], INIT_FLAGS);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nft = pair.save("nft");
    assert_eq!(
        nft.matches("-A OUTPUT -p tcp -j WEFT_OUTBOUND").count(),
        2,
        "{nft}"
    );
    // Plain names that are nft do not pass for legacy.
    let mut flags = INIT_FLAGS.to_vec();
    flags.push("--backend=legacy");
    let out = pair.init(&["env", &path], &flags);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no working iptables backend")
            && stderr.contains("`iptables-legacy-save -t nat` is not installed"),
        "{stderr}"
    );
}

#[test]
fn dry_run_prints_the_rules_and_changes_nothing() {
    if skip() {
        return;
    }
    let pair = Pair::new();
    let before = (pair.save("nft"), pair.save("legacy"));
    let mut flags = INIT_FLAGS.to_vec();
    flags.push("--dry-run");
    let out = pair.init(&[], &flags);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!((pair.save("nft"), pair.save("legacy")), before);
    let printed = String::from_utf8(out.stdout).unwrap();
    for line in [
        "-A WEFT_INBOUND -p tcp --dport 9000:9010 -j RETURN",
        "-A WEFT_OUTBOUND -p tcp -d 169.254.169.254/32 -j RETURN",
        "-A WEFT_OUTBOUND -p tcp -d fd00:77:1::/64 -j RETURN",
        "-A WEFT_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A PREROUTING -p tcp -j WEFT_INBOUND",
    ] {
        assert!(printed.contains(line), "missing {line:?} in\n{printed}");
    }
    // What it prints is valid restore input: the kernel's parser accepts each half.
    let (v4, v6) = printed.split_at(printed.find("# IPv6").unwrap());
    for (program, input) in [("iptables-nft-restore", v4), ("ip6tables-nft-restore", v6)] {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &pair.pod, program, "--test", "--noflush"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{program} --test rejected:\n{input}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!((pair.save("nft"), pair.save("legacy")), before);
}

const PERMISSION_MESSAGE: &str = "weft-proxy init: permission denied changing iptables; \
                                  the init container needs NET_ADMIN and NET_RAW";

#[test]
fn lacking_permission_fails_with_a_clear_message() {
    if skip() {
        return;
    }
    let pair = Pair::new();
    let before = pair.save("nft");
    for (what, prefix, backend) in [
        (
            "an unprivileged user",
            &[
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
            ][..],
            "--backend=auto",
        ),
        (
            "root without NET_ADMIN and NET_RAW",
            &["setpriv", "--bounding-set=-net_admin,-net_raw"][..],
            "--backend=auto",
        ),
        (
            "root without NET_ADMIN, legacy",
            &["setpriv", "--bounding-set=-net_admin,-net_raw"][..],
            "--backend=legacy",
        ),
    ] {
        let started = Instant::now();
        let mut flags = INIT_FLAGS.to_vec();
        flags.push(backend);
        let out = pair.init(prefix, &flags);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: succeeded\n{stderr}");
        assert!(
            stderr.contains(PERMISSION_MESSAGE),
            "{what}: unclear error:\n{stderr}"
        );
        assert!(started.elapsed() < Duration::from_secs(20), "{what}: slow");
    }
    assert_eq!(pair.save("nft"), before);
}

#[test]
fn bad_flags_are_rejected_before_anything_is_touched() {
    // No namespace needed: these fail in flag parsing, before iptables runs.
    for (flag, needle) in [
        (
            "--skip-inbound-ports=15021,70000",
            "\"70000\" is not a port",
        ),
        ("--skip-inbound-ports=9010-9000", "start is after its end"),
        ("--skip-outbound-ports=smtp", "\"smtp\" is not a port"),
        ("--skip-outbound-cidrs=10.0.0.0/33", "prefix length"),
        (
            "--skip-outbound-cidrs=10.0.0/8",
            "not an IPv4 or IPv6 address",
        ),
        ("--inbound-port=0", "--inbound-port"),
        ("--proxy-uid=-1", "--proxy-uid"),
        ("--backend=iptables", "--backend"),
        ("--outbound-port=15006", "must differ"),
    ] {
        let out = Command::new(BIN)
            .args(["init", "--dry-run", flag])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} accepted");
        assert!(stderr.contains(needle), "{flag}: {stderr}");
        assert!(out.stdout.is_empty(), "{flag}: printed rules anyway");
    }
}
