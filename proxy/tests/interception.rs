//! Interception end to end: the real `weft-proxy init` installs the redirect in a pod
//! namespace, the real `weft-proxy run` (standalone, file config) runs there as UID 5150,
//! and real TCP flows between the pod's application, its proxy and a peer namespace.
//!
//! ```text
//!   peer ns                                  pod ns (weft-proxy init ran here)
//!   198.18.250.1 fd00:77::1  ◀── veth ──▶  198.18.250.2 fd00:77::2
//!   "peer"  :80 (HTTP)                   weft-proxy run (UID 5150) :15001 :15006 :15021
//!   "mysql" :3306 (skipped port)         app :8080 on every address, "skipped" :9005,
//!                                        "private" on 127.0.0.1:8081 and [::1]:8081 only,
//!                                        "banner" :7000 (speaks first)
//!   service "web" = 198.19.0.10:80, [fd00:96::10]:80 ─▶ endpoint 198.18.250.1:80
//! ```
//!
//! The listeners answer with the addresses they saw (see `netns/mod.rs`), so each assertion
//! says where a connection landed and from where; the proxy's `/metrics` says what it
//! carried. Built with `harness = false` (see `netns::main`).

// Helpers below panic on failed setup, which fails the test that called them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod netns;

use std::{
    fs::File,
    path::Path,
    process::{Command, ExitCode, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use netns::{
    BIN, PEER4, PEER6, POD4, POD6, PROXY_UID, Pair, Process, Test, http_get, read_line, sh_ok,
};

/// The flags the injector passes (the admin port and 9005 skip the proxy inbound; 3306
/// skips it outbound).
const INIT_FLAGS: &[&str] = &[
    "--inbound-port=15006",
    "--outbound-port=15001",
    "--proxy-uid=5150",
    "--skip-inbound-ports=15021,9005",
    "--skip-outbound-ports=3306",
];

fn main() -> ExitCode {
    netns::main(&[
        Test {
            name: "init_and_run_carry_outbound_and_inbound_traffic",
            netns: true,
            run: init_and_run_carry_outbound_and_inbound_traffic,
        },
        Test {
            name: "inbound_reaches_only_what_the_app_serves_on_the_pod_address",
            netns: true,
            run: inbound_reaches_only_what_the_app_serves_on_the_pod_address,
        },
        Test {
            name: "a_declared_opaque_port_lets_the_app_speak_first",
            netns: true,
            run: a_declared_opaque_port_lets_the_app_speak_first,
        },
        Test {
            name: "rewritten_probes_reach_the_app_on_the_pod_address_not_the_inbound_listener",
            netns: true,
            run: rewritten_probes_reach_the_app_on_the_pod_address_not_the_inbound_listener,
        },
        Test {
            name: "a_connection_dialled_straight_to_a_proxy_port_is_closed_not_looped",
            netns: true,
            run: a_connection_dialled_straight_to_a_proxy_port_is_closed_not_looped,
        },
        Test {
            name: "hand_offs_to_the_app_share_source_ports_across_destinations",
            netns: true,
            run: hand_offs_to_the_app_share_source_ports_across_destinations,
        },
        Test {
            name: "every_variable_the_injector_sets_is_a_proxy_setting",
            netns: false,
            run: every_variable_the_injector_sets_is_a_proxy_setting,
        },
        Test {
            name: "bad_local_port_lists_stop_the_proxy_at_startup",
            netns: false,
            run: bad_local_port_lists_stop_the_proxy_at_startup,
        },
    ])
}

// ---- the pod ----

/// A pair of namespaces with the redirect installed in the pod and a route out (so that
/// the cluster addresses, which only the proxy knows, are routable before redirection).
fn pod() -> (Pair, tempfile::TempDir) {
    let pair = Pair::new();
    sh_ok(&[
        "ip", "-n", &pair.pod, "route", "add", "default", "via", PEER4,
    ]);
    sh_ok(&[
        "ip", "-n", &pair.pod, "-6", "route", "add", "default", "via", PEER6,
    ]);
    pair.init_ok(INIT_FLAGS);
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    // A long detection timeout, so that a connection waiting on detection is plain to see.
    let config = serde_json::json!({
        "apiVersion": "weft.dev/proxy/v1alpha1",
        "kind": "ProxyConfig",
        "detectTimeout": "20s",
        "services": [{
            "name": "web",
            "addresses": ["198.19.0.10:80", "[fd00:96::10]:80"],
            "endpoints": [{"address": format!("{PEER4}:80")}],
        }],
    });
    let path = dir.path().join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    set_mode(&path, 0o644);
    (pair, dir)
}

/// The sidecar: `weft-proxy run` in the pod as the proxy's UID, with `env` added. Its log
/// is printed if the test fails.
struct Sidecar {
    process: Option<Process>,
    log: std::path::PathBuf,
}

impl Sidecar {
    fn start(pair: &Pair, dir: &Path, env: &[(&str, &str)]) -> Sidecar {
        static STARTS: AtomicU32 = AtomicU32::new(0);
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        let log = dir.join(format!("proxy-{n}.log"));
        let log_file = File::create(&log).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &pair.pod, "setpriv"])
            .arg(format!("--reuid={PROXY_UID}"))
            .arg(format!("--regid={PROXY_UID}"))
            .arg("--clear-groups")
            .arg(BIN)
            .args(["run", "--config"])
            .arg(dir.join("config.json"))
            .args([
                "--outbound-addr=[::]:15001",
                "--inbound-addr=[::]:15006",
                "--admin-addr=[::]:15021",
            ])
            .env("WEFT_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let sidecar = Sidecar {
            process: Some(Process(cmd.spawn().unwrap())),
            log,
        };
        let started = Instant::now();
        loop {
            let (out, _) = pair.bash_once(&pair.pod, None, &http_get("127.0.0.1", 15021, "/ready"));
            if out.starts_with("HTTP/1.1 200") {
                return sidecar;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "sidecar not ready within 15 s:\n{}",
                std::fs::read_to_string(&sidecar.log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        self.process = None;
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.process = None;
        if thread::panicking() {
            eprintln!(
                "---- sidecar log ----\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// The proxy's metrics, read in the pod from its admin port.
fn metrics(pair: &Pair) -> String {
    pair.bash_once(&pair.pod, None, &http_get("127.0.0.1", 15021, "/metrics"))
        .0
}

/// The value of one series (`name{labels}`), 0 when the proxy has not created it.
#[track_caller]
fn series(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// The HTTP response a `GET /` from `ns` to `host:port` gets.
fn get(pair: &Pair, ns: &str, host: &str, port: u16) -> String {
    pair.bash_once(ns, None, &http_get(host, port, "/")).0
}

#[track_caller]
fn assert_ok_from(response: &str, body_start: &str) {
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert!(
        body.starts_with(body_start),
        "expected a body starting {body_start:?}:\n{response}"
    );
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

// ---- the tests ----

fn init_and_run_carry_outbound_and_inbound_traffic() {
    let (mut pair, dir) = pod();
    let (pod_ns, peer_ns) = (pair.pod.clone(), pair.peer.clone());
    pair.spawn_listener(&pod_ns, "app/http=8080;skipped/http=9005");
    pair.spawn_listener(&peer_ns, "peer/http=80;mysql=3306");
    // A fresh IPv6 link takes a moment to carry traffic: wait for it (the proxy's UID
    // reaches the peer directly, retrying).
    pair.proxy_dials(PEER6, 3306);
    let _sidecar = Sidecar::start(&pair, dir.path(), &[]);

    // Outbound through the service's cluster addresses, IPv4 and IPv6: the proxy picks the
    // endpoint and dials it as UID 5150, which is not redirected again (the peer sees the
    // pod's address, not a loop).
    let out = get(&pair, &pod_ns, "198.19.0.10", 80);
    assert_ok_from(&out, &format!("peer dst={PEER4}:80 src={POD4}:"));
    let out = get(&pair, &pod_ns, "fd00:96::10", 80);
    assert_ok_from(&out, &format!("peer dst={PEER4}:80 src={POD4}:"));
    // Outbound to an address no service claims: passed through unchanged.
    let out = get(&pair, &pod_ns, PEER6, 80);
    assert_ok_from(&out, &format!("peer dst=[{PEER6}]:80 src=[{POD6}]:"));
    // A skipped outbound port goes straight out.
    let line = pair.app_dials(PEER4, 3306);
    assert!(
        line.starts_with(&format!("mysql dst={PEER4}:3306 src={POD4}:")),
        "{line}"
    );

    // Inbound, IPv4 and IPv6: the peer dials the pod; the proxy hands the connection to
    // the app on the address the peer dialled, from its loopback source.
    let out = get(&pair, &peer_ns, POD4, 8080);
    assert_ok_from(&out, &format!("app dst={POD4}:8080 src=127.0.0.6:"));
    let out = get(&pair, &peer_ns, POD6, 8080);
    assert_ok_from(&out, &format!("app dst=[{POD6}]:8080 src=[::6]:"));
    // A skipped inbound port reaches the app directly: it sees the peer itself.
    let out = get(&pair, &peer_ns, POD4, 9005);
    assert_ok_from(&out, &format!("skipped dst={POD4}:9005 src={PEER4}:"));

    // The proxy carried exactly the application's connections: three outbound (the skipped
    // port is not among them, nor are the proxy's own upstream connections, which a
    // missing UID exemption would have sent back to its outbound listener) and two inbound
    // (not the skipped port).
    let m = metrics(&pair);
    for (s, want) in [
        (
            r#"weft_requests_total{direction="outbound",service="web"}"#,
            2,
        ),
        (
            r#"weft_tcp_connections_opened_total{direction="outbound"}"#,
            3,
        ),
        (
            r#"weft_requests_total{direction="inbound",service="local"}"#,
            2,
        ),
        (
            r#"weft_tcp_connections_opened_total{direction="inbound"}"#,
            2,
        ),
    ] {
        assert_eq!(series(&m, s), want, "{s} in\n{m}");
    }
}

fn inbound_reaches_only_what_the_app_serves_on_the_pod_address() {
    let (mut pair, dir) = pod();
    let (pod_ns, peer_ns) = (pair.pod.clone(), pair.peer.clone());
    pair.spawn_listener(
        &pod_ns,
        "app/http=8080;private/http=127.0.0.1:8081,[::1]:8081",
    );
    let mut sidecar = Sidecar::start(&pair, dir.path(), &[]);

    // What listens on localhost only is private to the pod: the proxy finds nothing on the
    // pod's address and answers 502 itself.
    for host in [POD4, POD6] {
        let out = get(&pair, &peer_ns, host, 8081);
        assert!(out.starts_with("HTTP/1.1 502"), "{host}: {out}");
        assert!(out.contains("weft-error: connect_failed"), "{host}: {out}");
        assert!(!out.contains("private"), "{host}: {out}");
    }
    // What listens on every address is served.
    let out = get(&pair, &peer_ns, POD4, 8080);
    assert_ok_from(&out, &format!("app dst={POD4}:8080 src=127.0.0.6:"));
    let m = metrics(&pair);
    let refused = r#"weft_errors_total{direction="inbound",reason="connect_failed"}"#;
    assert_eq!(series(&m, refused), 2, "{m}");

    // Opting the port in sends it to loopback; the other ports are unchanged.
    sidecar.stop();
    let _sidecar = Sidecar::start(
        &pair,
        dir.path(),
        &[("WEFT_INBOUND_LOOPBACK_PORTS", "8081")],
    );
    let out = get(&pair, &peer_ns, POD4, 8081);
    assert_ok_from(&out, "private dst=127.0.0.1:8081 src=127.0.0.1:");
    let out = get(&pair, &peer_ns, POD6, 8081);
    assert_ok_from(&out, "private dst=[::1]:8081 src=[::1]:");
    let out = get(&pair, &peer_ns, POD4, 8080);
    assert_ok_from(&out, &format!("app dst={POD4}:8080 src=127.0.0.6:"));
}

/// A connection dialled to a listener's own port was not redirected: its original
/// destination is the listener itself, and passing it on would reach the same listener
/// again, without end. The listeners bind `[::]`, so an IPv4 connection's local address is
/// IPv4-mapped while its original destination is plain IPv4; both forms are the same
/// address. From the application (`127.0.0.1:15001`, as a misconfigured `http_proxy`
/// would) and from the peer (the pod's address on either listener port), each connection
/// is closed at once, and the proxy opens no more.
fn a_connection_dialled_straight_to_a_proxy_port_is_closed_not_looped() {
    let (mut pair, dir) = pod();
    let (pod_ns, peer_ns) = (pair.pod.clone(), pair.peer.clone());
    pair.spawn_listener(&pod_ns, "app/http=8080");
    let _sidecar = Sidecar::start(&pair, dir.path(), &[]);

    let dials = [
        (pod_ns.as_str(), "127.0.0.1", 15001),
        (pod_ns.as_str(), "::1", 15001),
        (peer_ns.as_str(), POD4, 15006),
        (peer_ns.as_str(), POD6, 15006),
    ];
    for (ns, host, port) in dials {
        let started = Instant::now();
        let out = get(&pair, ns, host, port);
        assert!(out.is_empty(), "{host}:{port}: {out}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{host}:{port}: closed after {:?}",
            started.elapsed()
        );
    }
    // The peer dialling the outbound port: redirected to the inbound listener, which hands
    // it to "the application" on that port, which is the outbound listener, from the
    // inbound source, so not redirected: closed there, and answered 502.
    let out = get(&pair, &peer_ns, POD4, 15001);
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    // Let a loop, had one started, run on.
    thread::sleep(Duration::from_millis(500));
    let m = metrics(&pair);
    let opened = series(
        &m,
        r#"weft_tcp_connections_opened_total{direction="outbound"}"#,
    ) + series(
        &m,
        r#"weft_tcp_connections_opened_total{direction="inbound"}"#,
    );
    assert!(opened <= 6, "{opened} connections opened for 5 dials:\n{m}");
    // The proxy still serves.
    let out = get(&pair, &peer_ns, POD4, 8080);
    assert_ok_from(&out, &format!("app dst={POD4}:8080 src=127.0.0.6:"));
}

/// The kubelet's probes, rewritten to the admin port, go from the proxy to the pod's own
/// address as the kubelet's would (`WEFT_POD_IP`), past the redirect: a TCP probe of a
/// port nothing listens on fails (the inbound listener, had the redirect caught it, would
/// have accepted it), an HTTP probe gets the application's answer, and neither counts as
/// an inbound request.
fn rewritten_probes_reach_the_app_on_the_pod_address_not_the_inbound_listener() {
    let (mut pair, dir) = pod();
    let pod_ns = pair.pod.clone();
    pair.spawn_listener(&pod_ns, "app/http=8080;private/http=127.0.0.1:8081");
    let probes = r#"{
        "app/readyz": {"handler": "httpGet", "port": 8080, "path": "/"},
        "app/livez": {"handler": "tcpSocket", "port": 8080},
        "gone/readyz": {"handler": "tcpSocket", "port": 8090},
        "private/readyz": {"handler": "tcpSocket", "port": 8081}
    }"#;
    let _sidecar = Sidecar::start(
        &pair,
        dir.path(),
        &[("WEFT_APP_PROBES", probes), ("WEFT_POD_IP", POD4)],
    );
    let probe = |path: &str| {
        pair.bash_once(&pod_ns, None, &http_get("127.0.0.1", 15021, path))
            .0
    };
    let out = probe("/app-health/app/readyz");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let out = probe("/app-health/app/livez");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let out = probe("/app-health/gone/readyz");
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(out.contains(&format!("{POD4}:8090")), "{out}");
    // Listening on localhost only: the kubelet's probe of the pod address would fail too.
    let out = probe("/app-health/private/readyz");
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    let m = metrics(&pair);
    assert!(
        !m.lines()
            .any(|l| l.starts_with("weft_requests_total{") && l.contains(r#"direction="inbound""#)),
        "a probe went through the inbound listener:\n{m}"
    );
}

/// The proxy's connections to the application all leave from `127.0.0.6`. When the proxy
/// closes one first (a TCP probe, an opaque client going away), its port stays in
/// `TIME_WAIT` for a minute. A port chosen at `bind` must be free for every destination,
/// so those ports were lost to all of them; chosen at `connect`, a port is only lost to
/// the destination it was used with. With ten source ports in the pod, 24 TCP probes
/// across three application ports (eight each) all pass.
fn hand_offs_to_the_app_share_source_ports_across_destinations() {
    let (mut pair, dir) = pod();
    let pod_ns = pair.pod.clone();
    sh_ok(&[
        "ip",
        "netns",
        "exec",
        &pod_ns,
        "sysctl",
        "-qw",
        "net.ipv4.ip_local_port_range=40000 40009",
    ]);
    // HTTP listeners wait for a request, so the probe's connection is closed by the proxy.
    pair.spawn_listener(&pod_ns, "a/http=8080;b/http=8081;c/http=8082");
    let probes = r#"{
        "a/readyz": {"handler": "tcpSocket", "port": 8080},
        "b/readyz": {"handler": "tcpSocket", "port": 8081},
        "c/readyz": {"handler": "tcpSocket", "port": 8082}
    }"#;
    let _sidecar = Sidecar::start(
        &pair,
        dir.path(),
        &[("WEFT_APP_PROBES", probes), ("WEFT_POD_IP", POD4)],
    );
    let mut failed = Vec::new();
    for i in 0..24 {
        let path = format!("/app-health/{}/readyz", ["a", "b", "c"][i % 3]);
        let out = pair
            .bash_once(&pod_ns, None, &http_get("127.0.0.1", 15021, &path))
            .0;
        if !out.starts_with("HTTP/1.1 200") {
            failed.push(format!(
                "{i} {path}: {}",
                out.lines().last().unwrap_or_default()
            ));
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

fn a_declared_opaque_port_lets_the_app_speak_first() {
    let (mut pair, dir) = pod();
    let (pod_ns, peer_ns) = (pair.pod.clone(), pair.peer.clone());
    // Speaks first: writes its line on accept and reads nothing.
    pair.spawn_listener(&pod_ns, "banner=7000");
    let mut sidecar = Sidecar::start(&pair, dir.path(), &[]);

    // Undeclared, the proxy waits for the client's first bytes to detect the protocol
    // (20 s here), and the client waits for the server's: nothing arrives.
    let (out, _) = pair.bash_once(&peer_ns, None, &read_line(POD4, 7000, 3));
    assert_eq!(out, "", "detection should hold a server-first protocol");

    // Declared opaque, the bytes flow at once, both ways.
    sidecar.stop();
    let _sidecar = Sidecar::start(
        &pair,
        dir.path(),
        &[("WEFT_OPAQUE_PORTS", "7000,9000-9010")],
    );
    for (host, want) in [
        (POD4, format!("banner dst={POD4}:7000 src=127.0.0.6:")),
        (POD6, format!("banner dst=[{POD6}]:7000 src=[::6]:")),
    ] {
        let started = Instant::now();
        let (out, err) = pair.bash_once(&peer_ns, None, &read_line(host, 7000, 3));
        assert!(out.starts_with(&want), "{host}: {out:?} {err}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{host}: took {:?}",
            started.elapsed()
        );
    }
    let m = metrics(&pair);
    let s = r#"weft_tcp_connections_opened_total{direction="inbound"}"#;
    assert_eq!(series(&m, s), 2, "{m}");
}

fn bad_local_port_lists_stop_the_proxy_at_startup() {
    for (var, value, needle) in [
        (
            "WEFT_OPAQUE_PORTS",
            "mysql",
            "for '--opaque-ports <OPAQUE_PORTS>': \"mysql\" is not a port",
        ),
        (
            "WEFT_INBOUND_LOOPBACK_PORTS",
            "9010-9000",
            "'--inbound-loopback-ports <INBOUND_LOOPBACK_PORTS>': \"9010-9000\": the range's start is after its end",
        ),
        ("WEFT_INBOUND_LOOPBACK_PORTS", "0", "\"0\" is not a port"),
        (
            "WEFT_TRACE_SAMPLING",
            "1.5",
            "\"1.5\": expected a probability from 0 to 1",
        ),
        (
            "WEFT_TRACE_COLLECTOR",
            "https://otel:4317",
            "only plain-text OTLP/gRPC (http://) is supported",
        ),
        (
            "WEFT_APP_PROBES",
            r#"{"web/readyz":{"port":0,"path":"/healthz"}}"#,
            "probe \"web/readyz\": port 0",
        ),
        (
            "WEFT_MESH_HTTP1",
            "mux",
            "\"mux\" is not multiplexed or sessions",
        ),
        (
            "WEFT_HTTP1_IDLE_TIMEOUT",
            "1.5s",
            "units are h, m, s and ms",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            "apiVersion: weft.dev/proxy/v1alpha1\nkind: ProxyConfig\n",
        )
        .unwrap();
        let mut child = Command::new(BIN)
            .args([
                "run",
                "--no-transparent",
                "--admin-addr=127.0.0.1:0",
                "--config",
            ])
            .arg(&config)
            .env(var, value)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A proxy that accepted the value would serve until killed.
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{var}={value} accepted: the proxy started");
            }
            thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value} accepted");
        assert!(stderr.contains(needle), "{var}={value}: {stderr}");
    }
}

/// The variables `inject/src/sidecar.rs` sets on the proxy container (its test
/// `the_proxy_gets_only_variables_it_reads` holds the same list): each must be a setting of
/// `weft-proxy run`, not a value nobody reads. The port lists' effect is shown above; the
/// others select the operator stream (`operator/tests/processes.rs` runs the proxy with them
/// as flags).
fn every_variable_the_injector_sets_is_a_proxy_setting() {
    let out = Command::new(BIN).args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "WEFT_POD_NAME",
        "WEFT_POD_NAMESPACE",
        "WEFT_OPERATOR_ADDR",
        "WEFT_TOKEN_FILE",
        "WEFT_LOG",
        "WEFT_OUTBOUND_ADDR",
        "WEFT_INBOUND_ADDR",
        "WEFT_ADMIN_ADDR",
        "WEFT_OPAQUE_PORTS",
        "WEFT_INBOUND_LOOPBACK_PORTS",
        "WEFT_ACCESS_LOG",
        "WEFT_MESH_HTTP1",
        "WEFT_APP_IDLE_TIMEOUT",
        "WEFT_UPSTREAM_IDLE_TIMEOUT",
        "WEFT_HTTP1_IDLE_TIMEOUT",
        "WEFT_HTTP2_IDLE_TIMEOUT",
        "WEFT_TRACE_COLLECTOR",
        "WEFT_TRACE_SAMPLING",
        "WEFT_TRACE_SERVICE_NAME",
        "WEFT_IDENTITY_ADDR",
        "WEFT_IDENTITY_SERVER_NAME",
        "WEFT_TRUST_ROOTS",
        "WEFT_OPERATOR_SERVER_NAME",
        "WEFT_APP_PROBES",
        "WEFT_POD_IP",
    ] {
        assert!(
            help.contains(&format!("[env: {var}=")),
            "{var} not read:\n{help}"
        );
    }
}
