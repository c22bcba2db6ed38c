//! Transparent interception for real: a network namespace ("the pod") joined to the test
//! by a veth pair, iptables `REDIRECT` rules like the ones `weft-proxy init` will install,
//! and the proxy binary running inside as UID 5150, so `SO_ORIGINAL_DST` (IPv4 and IPv6)
//! is exercised in both directions.
//!
//! Needs root, `ip`, `iptables`/`ip6tables`, `setpriv` and `bash`. Built with
//! `harness = false` (see `netns::main`), so `WEFT_SKIP_NETNS=1` reports each test skipped,
//! not passed; CI refuses to run with it set.
//!
//! ```text
//!  test process (host ns)                         pod ns (created here)
//!  backend "web" 198.18.X.1:B  ◀───────────────┐    app: bash /dev/tcp ─▶ 198.19.0.10:80
//!  backend "app" 198.18.X.1:C  ◀──────┐        │       └ OUTPUT REDIRECT ─▶ proxy :15001
//!  client ─▶ 198.18.X.2:8080 ───veth──┼──▶ PREROUTING REDIRECT ─▶ proxy :15006 ─▶ 198.18.X.2:8080
//!                                   └──────────── "app" (weft-proxy --forward [::]:8080)
//! ```

// Helpers below panic on failed setup, which fails the test that called them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod netns;
mod support;

use std::{path::Path, process::Stdio, time::Duration};

use support::*;
use tokio::process::Command;

const PROXY_UID: &str = "5150";

fn sh(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes the namespace (and with it the veth pair and its rules) when dropped.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

fn in_ns<'a>(ns: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    v
}

/// Runs a bash one-liner inside the pod as root (so its traffic is redirected).
async fn pod_bash(ns: &str, script: &str) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        Command::new("ip")
            .args(["netns", "exec", ns, "bash", "-c", script])
            .output(),
    )
    .await
    .expect("pod command finished within 10 s")
    .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn http_get(addr: &str) -> String {
    // bash's /dev/tcp wants host and port separately; IPv6 hosts go bare.
    let (host, port) = addr.rsplit_once(':').unwrap();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    format!(
        "exec 3<>/dev/tcp/{host}/{port} && printf 'GET / HTTP/1.1\\r\\nHost: web.shop\\r\\nConnection: close\\r\\n\\r\\n' >&3 && timeout 5 cat <&3"
    )
}

/// Runs `weft-proxy run ARGS` inside the pod as the proxy's UID, with `env` set.
fn spawn_in_pod(ns: &str, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Child {
    Command::new("ip")
        .args(["netns", "exec", ns, "setpriv"])
        .arg(format!("--reuid={PROXY_UID}"))
        .arg(format!("--regid={PROXY_UID}"))
        .arg("--clear-groups")
        .arg(env!("CARGO_BIN_EXE_weft-proxy"))
        .arg("run")
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// A network namespace ("the pod") joined to the test by a veth pair, with the
/// interception rules a sidecar's init container installs; deleted when dropped.
struct Pod {
    ns: String,
    host_ip: String,
    pod_ip: String,
    host_ip6: String,
    pod_ip6: String,
    _guard: Netns,
}

impl Pod {
    /// The `k`-th pod of this test process (names and subnets include the process id, so
    /// parallel tests and runs do not collide).
    fn create(k: u32) -> Pod {
        let id = (std::process::id() + k) % 100 + 20;
        let ns = format!("weft-test-{}-{k}", std::process::id());
        let host_if = format!("wfh{id}");
        let pod_if = format!("wfp{id}");
        let host_ip = format!("198.18.{id}.1");
        let pod_ip = format!("198.18.{id}.2");
        let host_ip6 = format!("fd00:{id}::1");
        let pod_ip6 = format!("fd00:{id}::2");
        sh(&["ip", "netns", "add", &ns]);
        let guard = Netns(ns.clone());
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &pod_if,
        ]);
        sh(&["ip", "link", "set", &pod_if, "netns", &ns]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            &host_if,
        ]);
        sh(&[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{host_ip6}/64"),
            "dev",
            &host_if,
            "nodad",
        ]);
        sh(&["ip", "link", "set", &host_if, "up"]);
        for cmd in [
            vec!["ip", "link", "set", "lo", "up"],
            // What `weft-proxy init` adds: the inbound side's IPv6 source address.
            vec!["ip", "-6", "addr", "add", "::6/128", "dev", "lo"],
            vec![
                "ip",
                "addr",
                "add",
                &*format!("{pod_ip}/24"),
                "dev",
                &pod_if,
            ],
            vec![
                "ip",
                "-6",
                "addr",
                "add",
                &*format!("{pod_ip6}/64"),
                "dev",
                &pod_if,
                "nodad",
            ],
            vec!["ip", "link", "set", &pod_if, "up"],
            vec!["ip", "route", "add", "default", "via", &host_ip],
            vec!["ip", "-6", "route", "add", "default", "via", &host_ip6],
        ] {
            sh(&in_ns(&ns, &cmd));
        }
        // The rules a sidecar's init container installs: everything inbound except the admin
        // port to 15006; everything outbound, except loopback and the proxy's own UID, to
        // 15001.
        for ipt in ["iptables", "ip6tables"] {
            for rule in [
                &[
                    "-A",
                    "PREROUTING",
                    "-p",
                    "tcp",
                    "--dport",
                    "15021",
                    "-j",
                    "RETURN",
                ][..],
                &[
                    "-A",
                    "PREROUTING",
                    "-p",
                    "tcp",
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    "15006",
                ],
                &["-A", "OUTPUT", "-p", "tcp", "-o", "lo", "-j", "RETURN"],
                &[
                    "-A",
                    "OUTPUT",
                    "-p",
                    "tcp",
                    "-m",
                    "owner",
                    "--uid-owner",
                    PROXY_UID,
                    "-j",
                    "RETURN",
                ],
                &[
                    "-A",
                    "OUTPUT",
                    "-p",
                    "tcp",
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    "15001",
                ],
            ] {
                let mut cmd = vec![ipt, "-t", "nat"];
                cmd.extend_from_slice(rule);
                sh(&in_ns(&ns, &cmd));
            }
        }
        Pod {
            ns,
            host_ip,
            pod_ip,
            host_ip6,
            pod_ip6,
            _guard: guard,
        }
    }
}

fn main() -> std::process::ExitCode {
    fn block_on(test: impl std::future::Future<Output = ()>) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(test)
    }
    netns::main(&[
        netns::Test {
            name: "transparent_outbound_and_inbound_in_a_network_namespace",
            netns: true,
            run: || block_on(transparent_outbound_and_inbound_in_a_network_namespace()),
        },
        netns::Test {
            name: "before_the_first_config_traffic_passes_through_or_is_refused_and_counted",
            netns: true,
            run: || {
                block_on(before_the_first_config_traffic_passes_through_or_is_refused_and_counted())
            },
        },
        netns::Test {
            name: "admin_config_is_served_to_loopback_peers_only",
            netns: true,
            run: || block_on(admin_config_is_served_to_loopback_peers_only()),
        },
    ])
}

async fn transparent_outbound_and_inbound_in_a_network_namespace() {
    let pod = Pod::create(0);
    let (ns, host_ip, pod_ip) = (&pod.ns, &pod.host_ip, &pod.pod_ip);
    let (host_ip6, pod_ip6) = (&pod.host_ip6, &pod.pod_ip6);

    let web = Backend::start(host_ip, "web").await;
    let app_backend = Backend::start(host_ip, "app").await;
    let (banner, _banner_task) = tcp_backend(host_ip6, "banner").await;

    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    let sidecar_cfg = dir.path().join("sidecar.yaml");
    let mut cfg = config(&[("web", &[web.addr])]);
    cfg["services"][0]["addresses"] = serde_json::json!(["198.19.0.10:80", "[fd00:96::10]:80"]);
    write_config(&sidecar_cfg, &cfg);
    set_mode(&sidecar_cfg, 0o644);

    let admin = format!("{pod_ip}:15021");
    let _sidecar = spawn_in_pod(
        ns,
        &[
            "--config",
            sidecar_cfg.to_str().unwrap(),
            "--outbound-addr",
            "[::]:15001",
            "--inbound-addr",
            "[::]:15006",
            "--admin-addr",
            &admin,
        ],
        &[],
    );
    let _app = app_in_pod(ns, dir.path(), app_backend.addr);
    let client = h1_client();
    wait_for_status(&format!("http://{admin}/ready"), 200, "sidecar ready").await;

    // Outbound, IPv4: the app dials the cluster IP; the sidecar picks a "web" endpoint.
    let out = pod_bash(ns, &http_get("198.19.0.10:80")).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.to_lowercase().contains("x-backend: web"), "{out}");
    assert!(
        out.to_lowercase().contains("x-seen-host: web.shop"),
        "{out}"
    );

    // Outbound, IPv6: IP6T_SO_ORIGINAL_DST finds the v6 cluster address.
    let out = pod_bash(ns, &http_get("[fd00:96::10]:80")).await;
    assert!(out.to_lowercase().contains("x-backend: web"), "{out}");

    // Outbound passthrough over IPv6: nobody claims this server-speaks-first address, so
    // the bytes flow unchanged and at once (no detection wait).
    let (h, p) = (host_ip6.clone(), banner.port());
    let out = pod_bash(
        ns,
        &format!("exec 3<>/dev/tcp/{h}/{p} && timeout 5 head -c 26 <&3"),
    )
    .await;
    assert_eq!(out, "220 hello, I speak first\r\n");

    // Inbound: the test dials the pod's address on the app's port; the sidecar's inbound
    // listener gets it and forwards to the same address in the pod.
    let (resp, body) = get(&client, &format!("http://{pod_ip}:8080/")).await;
    assert_eq!(resp.status(), http::StatusCode::OK);
    assert_eq!(body, "hello from app");
    let (resp, body) = get(&client, &format!("http://[{pod_ip6}]:8080/")).await;
    assert_eq!(resp.status(), http::StatusCode::OK);
    assert_eq!(body, "hello from app");

    let (_, metrics) = get(&client, &format!("http://{admin}/metrics")).await;
    for needle in [
        r#"weft_requests_total{direction="outbound",service="web"} 2"#,
        r#"weft_tcp_connections_opened_total{direction="outbound"} 3"#,
        r#"weft_requests_total{direction="inbound",service="local"} 2"#,
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    assert_eq!(web.hits(), 2);
    assert_eq!(app_backend.hits(), 2);
}

/// The "application": listens on the pod's port 8080 (IPv4 and IPv6) and answers with
/// `backend` (a `weft-proxy --forward` of its own, outside interception as UID 5150).
fn app_in_pod(ns: &str, dir: &Path, backend: std::net::SocketAddr) -> tokio::process::Child {
    let app_cfg = dir.join("app.yaml");
    write_config(&app_cfg, &config(&[("web", &[backend])]));
    set_mode(&app_cfg, 0o644);
    spawn_in_pod(
        ns,
        &[
            "--config",
            app_cfg.to_str().unwrap(),
            "--no-transparent",
            "--forward",
            "[::]:8080=web",
            "--admin-addr",
            "127.0.0.1:15022",
        ],
        &[],
    )
}

/// Waits until a GET of `url` answers `status`.
async fn wait_for_status(url: &str, status: u16, what: &str) {
    let client = h1_client();
    eventually(Duration::from_secs(10), what, || {
        let (client, url) = (client.clone(), url.to_owned());
        async move {
            match client
                .request(http::Request::get(url).body(full("")).unwrap())
                .await
            {
                Ok(r) => r.status().as_u16() == status,
                Err(_) => false,
            }
        }
    })
    .await;
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

async fn before_the_first_config_traffic_passes_through_or_is_refused_and_counted() {
    let pod = Pod::create(1);
    let (ns, host_ip, pod_ip) = (&pod.ns, &pod.host_ip, &pod.pod_ip);
    let web = Backend::start(host_ip, "web").await;
    let app_backend = Backend::start(host_ip, "app").await;
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    let _app = app_in_pod(ns, dir.path(), app_backend.addr);

    // The sidecar's operator is unreachable (nothing listens on the pod's port 9), so no
    // config ever arrives.
    let admin = format!("{pod_ip}:15021");
    let sidecar = |env: &[(&str, &str)]| {
        spawn_in_pod(
            ns,
            &[
                "--operator-addr",
                "127.0.0.1:9",
                "--pod-namespace",
                "shop",
                "--pod-name",
                "web-0",
                "--outbound-addr",
                "[::]:15001",
                "--inbound-addr",
                "[::]:15006",
                "--admin-addr",
                &admin,
            ],
            env,
        )
    };
    let client = h1_client();
    let metric = |direction: &str, action: &str| {
        format!(
            r#"weft_before_config_connections_total{{direction="{direction}",action="{action}"}} 1"#
        )
    };

    // The application listens before anything is sent to it (a request that arrived
    // first was reset, and failed this test once in CI).
    let up = pod_bash(
        ns,
        "for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null && { echo up; exit 0; }; sleep 0.05; done; echo down",
    )
    .await;
    assert_eq!(
        up.trim(),
        "up",
        "the pod's application never listened on 8080"
    );

    // Default (passthrough): the application reaches the destination it dialled, and
    // other pods reach the application, while /ready stays 503 until a first config.
    let mut passthrough = sidecar(&[]);
    wait_for_status(&format!("http://{admin}/live"), 200, "sidecar live").await;
    let (ready, _) = get(&client, &format!("http://{admin}/ready")).await;
    assert_eq!(ready.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    let out = pod_bash(ns, &http_get(&web.addr.to_string())).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.to_lowercase().contains("x-backend: web"), "{out}");
    let (resp, body) = get(&client, &format!("http://{pod_ip}:8080/")).await;
    assert_eq!(resp.status(), http::StatusCode::OK);
    assert_eq!(body, "hello from app");
    let (_, metrics) = get(&client, &format!("http://{admin}/metrics")).await;
    for needle in [
        metric("outbound", "passthrough"),
        metric("inbound", "passthrough"),
    ] {
        assert!(metrics.contains(&needle), "missing {needle} in\n{metrics}");
    }
    assert_eq!((web.hits(), app_backend.hits()), (1, 1));
    passthrough.kill().await.unwrap();

    // WEFT_BEFORE_CONFIG=refuse: both directions are closed, and counted.
    let _refuse = sidecar(&[("WEFT_BEFORE_CONFIG", "refuse")]);
    // A fresh client: the first one's pooled connections went to the sidecar just killed.
    let client = h1_client();
    wait_for_status(&format!("http://{admin}/live"), 200, "sidecar live").await;
    let out = pod_bash(ns, &http_get(&web.addr.to_string())).await;
    assert_eq!(out, "", "an outbound connection was not refused");
    let inbound = tokio::time::timeout(
        Duration::from_secs(5),
        client.request(
            http::Request::get(format!("http://{pod_ip}:8080/"))
                .body(full(""))
                .unwrap(),
        ),
    )
    .await
    .expect("refused at once");
    assert!(inbound.is_err(), "an inbound connection was not refused");
    let (_, metrics) = get(&client, &format!("http://{admin}/metrics")).await;
    for needle in [metric("outbound", "refuse"), metric("inbound", "refuse")] {
        assert!(metrics.contains(&needle), "missing {needle} in\n{metrics}");
    }
    assert_eq!((web.hits(), app_backend.hits()), (1, 1));
}

/// `GET path` over bash's `/dev/tcp` inside the namespace; the status line.
fn admin_get(addr: &str, path: &str) -> String {
    let (host, port) = addr.rsplit_once(':').unwrap();
    format!(
        "exec 3<>/dev/tcp/{host}/{port} && printf 'GET {path} HTTP/1.1\\r\\nHost: a\\r\\nConnection: close\\r\\n\\r\\n' >&3 && timeout 5 cat <&3"
    )
}

async fn admin_config_is_served_to_loopback_peers_only() {
    // A pod whose own address (198.18.X.1, on lo so no veth is needed) is not loopback:
    // connecting to it from inside the pod makes it the peer address, exactly as a
    // neighbouring pod's address would be.
    let id = std::process::id() % 250 + 1;
    let ns = format!("weft-admin-{}", std::process::id());
    let pod_ip = format!("198.18.{id}.1");
    sh(&["ip", "netns", "add", &ns]);
    let _guard = Netns(ns.clone());
    sh(&in_ns(&ns, &["ip", "link", "set", "lo", "up"]));
    sh(&in_ns(
        &ns,
        &["ip", "addr", "add", &format!("{pod_ip}/32"), "dev", "lo"],
    ));

    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), 0o755);
    let cfg = dir.path().join("sidecar.yaml");
    write_config(
        &cfg,
        &config(&[("web", &["198.18.240.3:80".parse().unwrap()])]),
    );
    set_mode(&cfg, 0o644);
    let _sidecar = spawn_in_pod(
        &ns,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--no-transparent",
            "--admin-addr",
            "0.0.0.0:15021",
        ],
        &[],
    );

    let local = "127.0.0.1:15021";
    let remote = format!("{pod_ip}:15021");
    let start = std::time::Instant::now();
    while !pod_bash(&ns, &admin_get(local, "/ready"))
        .await
        .starts_with("HTTP/1.1 200")
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "sidecar not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let out = pod_bash(&ns, &admin_get(local, "/config")).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("198.18.240.3:80"), "{out}");

    let out = pod_bash(&ns, &admin_get(&remote, "/config")).await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.contains("loopback clients only"), "{out}");
    assert!(!out.contains("198.18.240.3"), "{out}");
    // What the kubelet and Prometheus need stays open to them.
    for path in ["/live", "/ready", "/metrics"] {
        let out = pod_bash(&ns, &admin_get(&remote, path)).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{path}: {out}");
    }
}
