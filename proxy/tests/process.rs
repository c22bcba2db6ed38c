//! The proxy binary as a child process: config file reload (mtime and SIGHUP), invalid
//! configs, the admin listener, and SIGTERM drain.

mod support;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use support::*;
use tokio::io::AsyncReadExt;

async fn served_by(p: &ChildProxy) -> String {
    let (resp, _) = get(&h1_client(), &format!("http://{}/", p.forward)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    header(&resp, "x-backend").to_owned()
}

/// Starts the proxy on the config file at `path` with `extra` flags, which must make it
/// exit unsuccessfully within 10 s: what it wrote to stderr.
async fn fails_to_start(path: &std::path::Path, extra: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_weft-proxy"))
            .args(["run", "--no-transparent", "--admin-addr", "127.0.0.1:0"])
            .args(extra)
            .arg("--config")
            .arg(path)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("the proxy did not exit within 10 s"))
    .unwrap_or_else(|e| panic!("the proxy did not run: {e}"));
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn file_changes_are_applied_and_an_invalid_file_keeps_the_old_config() {
    let a = Backend::start("127.0.0.2", "a").await;
    let b = Backend::start("127.0.0.3", "b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    let mut cfg = config(&[("web", &[a.addr])]);
    cfg["version"] = "one".into();
    write_config(&path, &cfg);
    let p = ChildProxy::start(&path, &["--reload-interval", "50ms"]).await;
    assert_eq!(served_by(&p).await, "a");

    // Invalid: the proxy says why and keeps serving with "one".
    std::fs::write(
        &path,
        "apiVersion: weft.dev/proxy/v1alpha1\nkind: ProxyConfig\nservices:\n- name: web\n  endpoints:\n  - address: nowhere\n",
    )
    .unwrap();
    eventually(Duration::from_secs(5), "rejection counted", || async {
        p.metrics().await.contains("weft_config_rejected_total 1")
    })
    .await;
    assert_eq!(served_by(&p).await, "a");
    let (_, cfg_json) = get(&h1_client(), &format!("http://{}/config", p.admin)).await;
    let v: serde_json::Value = serde_json::from_str(&cfg_json).unwrap();
    assert_eq!(v["version"], "one");

    // Unparseable YAML is rejected the same way.
    std::fs::write(&path, "services: [unclosed").unwrap();
    eventually(
        Duration::from_secs(5),
        "second rejection counted",
        || async { p.metrics().await.contains("weft_config_rejected_total 2") },
    )
    .await;
    assert_eq!(served_by(&p).await, "a");

    // Valid again: switches to b.
    let mut cfg = config(&[("web", &[b.addr])]);
    cfg["version"] = "two".into();
    write_config(&path, &cfg);
    eventually(Duration::from_secs(5), "b serves", || async {
        served_by(&p).await == "b"
    })
    .await;
    let (_, cfg_json) = get(&h1_client(), &format!("http://{}/config", p.admin)).await;
    let v: serde_json::Value = serde_json::from_str(&cfg_json).unwrap();
    assert_eq!(v["version"], "two");
    assert_eq!(
        v["config"]["services"][0]["endpoints"][0]["address"],
        b.addr.to_string()
    );
    let metrics = p.metrics().await;
    assert!(
        metrics.contains(r#"weft_config_info{version="two"} 1"#),
        "{metrics}"
    );
    assert!(!metrics.contains(r#"version="one""#), "{metrics}");
}

#[tokio::test]
async fn sighup_reloads_the_file() {
    let a = Backend::start("127.0.0.2", "a").await;
    let b = Backend::start("127.0.0.3", "b").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.json");
    std::fs::write(&path, config(&[("web", &[a.addr])]).to_string()).unwrap();
    // Polling is effectively off: only SIGHUP can trigger the reload.
    let p = ChildProxy::start(&path, &["--reload-interval", "1h"]).await;
    assert_eq!(served_by(&p).await, "a");
    std::fs::write(&path, config(&[("web", &[b.addr])]).to_string()).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(served_by(&p).await, "a", "no reload without the signal");
    p.signal("HUP");
    eventually(Duration::from_secs(5), "b serves after SIGHUP", || async {
        served_by(&p).await == "b"
    })
    .await;
}

#[tokio::test]
async fn an_invalid_config_at_startup_exits_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    std::fs::write(
        &path,
        "apiVersion: weft.dev/proxy/v1alpha1\nkind: ProxyConfig\nservices:\n- name: web\n  endpoints:\n  - address: 127.0.0.1:80\n    weight: 0\n",
    )
    .unwrap();
    let stderr = fails_to_start(&path, &[]).await;
    assert!(
        stderr.contains("weight 0 is not within 1..=1000000"),
        "{stderr}"
    );
    assert!(stderr.contains("proxy.yaml"), "{stderr}");
}

/// A Route rule whose request edits alone pass the proxy's request limits would have every
/// request it takes refused 431 after the edits: the proxy refuses such a config by its
/// own flags, at start with the reason, and on reload keeps the config it has. A proxy
/// with room for the edits applies the same file, and the edits reach the application.
#[tokio::test]
async fn a_route_whose_edits_pass_the_proxys_request_limits_is_refused() {
    let a = Backend::start("127.0.0.2", "a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    let plain = config(&[("web", &[a.addr])]);
    write_config(&path, &plain);
    let tight_flags = [
        "--reload-interval",
        "50ms",
        "--max-request-headers-count",
        "10",
    ];
    let tight = ChildProxy::start(&path, &tight_flags).await;
    let roomy = ChildProxy::start(&path, &["--reload-interval", "50ms"]).await;

    let mut routed = plain.clone();
    routed["version"] = "routed".into();
    let add: Vec<_> = (0..12)
        .map(|i| serde_json::json!({"name": format!("x-edit-{i}"), "value": "v"}))
        .collect();
    routed["services"][0]["route"] = serde_json::json!({
        "name": "shop/web", "rules": [{"requestHeaders": {"add": add}}],
    });
    write_config(&path, &routed);

    eventually(
        Duration::from_secs(5),
        "the roomy proxy applies it",
        || async {
            roomy
                .metrics()
                .await
                .contains(r#"weft_config_info{version="routed"} 1"#)
        },
    )
    .await;
    let (resp, _) = get(&h1_client(), &format!("http://{}/", roomy.forward)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        header(&resp, "x-seen-headers").contains("x-edit-11"),
        "{resp:?}"
    );

    eventually(
        Duration::from_secs(5),
        "the tight proxy refuses it",
        || async {
            tight
                .metrics()
                .await
                .contains("weft_config_rejected_total 1")
        },
    )
    .await;
    let (resp, _) = get(&h1_client(), &format!("http://{}/", tight.forward)).await;
    assert_eq!(resp.status(), StatusCode::OK, "{resp:?}");
    assert!(
        !header(&resp, "x-seen-headers").contains("x-edit"),
        "{resp:?}"
    );
    let (_, cfg_json) = get(&h1_client(), &format!("http://{}/config", tight.admin)).await;
    let v: serde_json::Value = serde_json::from_str(&cfg_json).unwrap();
    assert_ne!(v["version"], "routed", "{v}");
    assert_eq!(v["generation"], 1, "{v}");

    // At start, the reason.
    let stderr = fails_to_start(&path, &["--max-request-headers-count", "10"]).await;
    assert!(
        stderr.contains(
            "route.rules[0].requestHeaders: set and add write 12 fields, above the proxy's \
             limit of 10 fields on a request (--max-request-headers-count): every request \
             the rule takes would be refused 431"
        ),
        "{stderr}"
    );
}

#[tokio::test]
async fn admin_reports_liveness_readiness_and_metrics() {
    let a = Backend::start("127.0.0.2", "a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    write_config(&path, &config(&[("web", &[a.addr])]));
    let p = ChildProxy::start(&path, &[]).await;
    let client = h1_client();
    let (live, _) = get(&client, &format!("http://{}/live", p.admin)).await;
    assert_eq!(live.status(), StatusCode::OK);
    served_by(&p).await;
    let (resp, text) = get(&client, &format!("http://{}/metrics", p.admin)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        text.contains(r#"weft_requests_total{direction="outbound",service="web"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("weft_config_last_update_timestamp_seconds"),
        "{text}"
    );
    let (missing, _) = get(&client, &format!("http://{}/nope", p.admin)).await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let a = Backend::start_slow("127.0.0.2", "a", 700).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    write_config(&path, &config(&[("web", &[a.addr])]));
    let mut p = ChildProxy::start(&path, &["--shutdown-grace", "10s"]).await;

    let mut requests = Vec::new();
    for _ in 0..20 {
        let url = format!("http://{}/", p.forward);
        requests.push(tokio::spawn(async move {
            // A fresh connection per request, so each one is surely accepted.
            let resp = h1_client()
                .request(Request::get(url).body(full("")).unwrap())
                .await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
        }));
    }
    let a = Arc::new(a);
    let a2 = a.clone();
    eventually(
        Duration::from_secs(5),
        "all 20 requests reached the backend",
        || {
            let n = a2.hits();
            async move { n == 20 }
        },
    )
    .await;
    let signalled = Instant::now();
    p.signal("TERM");
    // Readiness fails while draining, so the endpoint is taken out of rotation.
    let ready = format!("http://{}/ready", p.admin);
    eventually(Duration::from_millis(500), "/ready fails while draining", || {
        let ready = ready.clone();
        async move { get(&h1_client(), &ready).await.0.status() == StatusCode::SERVICE_UNAVAILABLE }
    })
    .await;
    // New connections are refused soon after the signal.
    let forward = p.forward;
    eventually(Duration::from_secs(5), "listener closed", || async move {
        tokio::net::TcpStream::connect(forward).await.is_err()
    })
    .await;
    for r in requests {
        let (status, body) = r
            .await
            .unwrap()
            .expect("every accepted request is answered");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"hello from a");
    }
    // The process exits once drained, well before the 10 s grace period.
    let mut exited = None;
    for _ in 0..100 {
        if let Some(status) = p.child.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = exited.expect("exited within 5 s");
    assert!(status.success(), "{status:?}");
    assert!(signalled.elapsed() < Duration::from_secs(6));
}

/// A child proxy whose `--forward` listener (service `web`) reaches an HTTP backend that
/// echoes on upgraded connections and CONNECT tunnels, plus a second forward listener
/// (service `tcp`, opaque) reaching a TCP echo server; with the three long-lived
/// connections a drain must wait for ([`Streams`]), each checked to carry bytes.
struct Tunnels {
    proxy: ChildProxy,
    _backend: Backend,
    _tcp: Task,
    _dir: tempfile::TempDir,
}

/// The client ends of an upgraded connection, a CONNECT tunnel and an opaque connection.
struct Streams {
    upgraded: tokio::net::TcpStream,
    connect: tokio::net::TcpStream,
    opaque: tokio::net::TcpStream,
}

// Test setup: a failed step should panic the test that called it.
#[allow(clippy::unwrap_used)]
impl Tunnels {
    async fn open(grace: &str) -> (Tunnels, Streams) {
        let backend = Backend::start("127.0.0.2", "a").await;
        let (tcp, tcp_task) = tcp_backend("127.0.0.3", "banner").await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.yaml");
        let mut cfg = config(&[("web", &[backend.addr]), ("tcp", &[tcp])]);
        cfg["services"][1]["protocol"] = "opaque".into();
        write_config(&path, &cfg);
        let tcp_listener = format!("127.0.0.1:{}", free_port().await);
        let proxy = ChildProxy::start(
            &path,
            &[
                "--shutdown-grace",
                grace,
                "--forward",
                &format!("{tcp_listener}=tcp"),
            ],
        )
        .await;
        let mut upgraded = open_upgrade(proxy.forward).await;
        echo_roundtrip(&mut upgraded, b"upgraded, before").await;
        let (mut connect, _) = open_connect(proxy.forward, "db.example:5432").await;
        echo_roundtrip(&mut connect, b"tunnelled, before").await;
        let mut opaque = support::connect(tcp_listener.parse().unwrap()).await;
        let mut banner = [0u8; 26];
        tokio::time::timeout(Duration::from_secs(5), opaque.read_exact(&mut banner))
            .await
            .unwrap()
            .unwrap();
        echo_roundtrip(&mut opaque, b"opaque, before").await;
        let tunnels = Tunnels {
            proxy,
            _backend: backend,
            _tcp: tcp_task,
            _dir: dir,
        };
        let streams = Streams {
            upgraded,
            connect,
            opaque,
        };
        (tunnels, streams)
    }

    /// Sends SIGTERM and waits until the drain has begun (the forward listener refuses).
    async fn terminate(&self) -> Instant {
        let signalled = Instant::now();
        self.proxy.signal("TERM");
        let forward = self.proxy.forward;
        eventually(Duration::from_secs(5), "listener closed", || async move {
            tokio::net::TcpStream::connect(forward).await.is_err()
        })
        .await;
        signalled
    }

    async fn exit_status(&mut self, within: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Some(status) = self.proxy.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the proxy did not exit within {within:?}");
    }
}

#[tokio::test]
async fn sigterm_waits_for_upgraded_connections_connect_tunnels_and_opaque_tcp() {
    let (mut t, mut s) = Tunnels::open("30s").await;
    let signalled = t.terminate().await;
    // Draining: every tunnel keeps carrying bytes both ways, for as long as it lasts.
    for round in 0..3 {
        let msg = format!("round {round} while draining");
        echo_roundtrip(&mut s.upgraded, msg.as_bytes()).await;
        echo_roundtrip(&mut s.connect, msg.as_bytes()).await;
        echo_roundtrip(&mut s.opaque, msg.as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        t.proxy.child.try_wait().unwrap().is_none(),
        "the proxy exited while tunnels were open"
    );
    // The clients close one by one; each tunnel left keeps the proxy draining (and
    // working) until the last has closed, long before the 30 s grace period.
    drop(s.opaque);
    tokio::time::sleep(Duration::from_millis(300)).await;
    echo_roundtrip(&mut s.upgraded, b"upgraded, after the opaque one closed").await;
    echo_roundtrip(&mut s.connect, b"tunnelled, after the opaque one closed").await;
    drop(s.upgraded);
    tokio::time::sleep(Duration::from_millis(300)).await;
    echo_roundtrip(&mut s.connect, b"tunnelled, the last one open").await;
    assert!(
        t.proxy.child.try_wait().unwrap().is_none(),
        "the proxy exited while a tunnel was open"
    );
    drop(s.connect);
    let status = t.exit_status(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    assert!(signalled.elapsed() < Duration::from_secs(15));
}

#[tokio::test]
async fn tunnels_still_open_when_the_grace_period_ends_are_closed() {
    let (mut t, mut s) = Tunnels::open("2s").await;
    let signalled = t.terminate().await;
    echo_roundtrip(&mut s.upgraded, b"within the grace period").await;
    echo_roundtrip(&mut s.connect, b"within the grace period").await;
    echo_roundtrip(&mut s.opaque, b"within the grace period").await;
    for (name, s) in [
        ("upgraded", &mut s.upgraded),
        ("connect", &mut s.connect),
        ("opaque", &mut s.opaque),
    ] {
        assert!(
            closed_within(s, Duration::from_secs(10)).await,
            "{name} connection not closed after the grace period"
        );
        assert!(
            signalled.elapsed() >= Duration::from_millis(1900),
            "{name} connection closed before the grace period ended: {:?}",
            signalled.elapsed()
        );
    }
    let status = t.exit_status(Duration::from_secs(5)).await;
    assert!(status.success(), "{status:?}");
}

/// Authorization denials, as an operator reads them from the proxy's log: one structured
/// line naming the Policy, the client, path and method, at most once a second however
/// many requests are denied, while the metric counts every one.
#[tokio::test]
async fn denials_are_logged_as_one_json_line_a_second_and_counted_each() {
    let app = Backend::start("127.0.0.2", "app").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    // YAML spells the path match's kind as a tag.
    let yaml = [
        "apiVersion: weft.dev/proxy/v1alpha1",
        "kind: ProxyConfig",
        "services: []",
        "inbound:",
        "  authorization:",
        "  - name: shop/no-admin",
        "    defaultAction: allow",
        "    rules:",
        "    - action: deny",
        "      to:",
        "      - paths: [!prefix /admin]",
    ];
    std::fs::write(&path, yaml.join("\n")).unwrap();
    let inbound: std::net::SocketAddr = format!("127.0.0.1:{}", free_port().await).parse().unwrap();
    let log_path = dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port().await).parse().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_weft-proxy"))
        .arg("run")
        .arg("--config")
        .arg(&path)
        .args(["--no-transparent", "--log", "info", "--log-format", "json"])
        .arg("--inbound-forward")
        .arg(format!("{inbound}={}", app.addr))
        .arg("--admin-addr")
        .arg(admin.to_string())
        .stdin(std::process::Stdio::null())
        .stderr(log.try_clone().unwrap())
        .stdout(log)
        .spawn()
        .unwrap();
    let client = h1_client();
    eventually(
        Duration::from_secs(10),
        "the inbound listener serves",
        || {
            let client = client.clone();
            async move {
                client
                    .request(
                        Request::get(format!("http://{inbound}/"))
                            .body(full(""))
                            .unwrap(),
                    )
                    .await
                    .is_ok_and(|r| r.status() == StatusCode::OK)
            }
        },
    )
    .await;

    // 200 denials as fast as they go: well under two seconds here.
    let started = Instant::now();
    for i in 0..200 {
        let (resp, _) = get(&client, &format!("http://{inbound}/admin/{i}")).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    }
    let seconds = started.elapsed().as_secs() + 1;
    let (_, metrics) = get(&client, &format!("http://{admin}/metrics")).await;
    let _ = child.kill();
    let _ = child.wait();

    assert!(
        metrics.contains("weft_authz_denials_total{policy=\"shop/no-admin\"} 200"),
        "{metrics}"
    );
    let text = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.contains("authorization denied"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        !lines.is_empty() && lines.len() as u64 <= seconds + 1,
        "{} lines in about {seconds} s:\n{text}",
        lines.len()
    );
    let fields = &lines[0]["fields"];
    assert_eq!(fields["policy"], "shop/no-admin", "{}", lines[0]);
    assert_eq!(fields["client"], "unauthenticated", "{}", lines[0]);
    assert_eq!(fields["method"], "GET", "{}", lines[0]);
    assert!(
        fields["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("/admin/")),
        "{}",
        lines[0]
    );
}

/// A config file with no services, in a directory of its own (kept while the result is).
#[allow(clippy::unwrap_used)]
fn empty_config() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.yaml");
    write_config(&path, &config(&[]));
    (dir, path)
}

/// `req` to the admin listener `admin` from a socket bound to `from`: the answer, and the
/// task driving its connection (which the answer's body needs).
#[allow(clippy::unwrap_used)]
async fn admin_send(
    admin: std::net::SocketAddr,
    from: std::net::IpAddr,
    req: Request<Body>,
) -> (http::Response<hyper::body::Incoming>, Task) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    let stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(admin))
        .await
        .unwrap()
        .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake::<_, Body>(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    let conn = Task(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    (resp, conn)
}

/// `method` `path` on the admin listener `admin` with `body`, from a socket bound to
/// `from`: the status and body.
#[allow(clippy::unwrap_used)]
async fn admin_call(
    admin: std::net::SocketAddr,
    from: std::net::IpAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "admin")
        .body(full(body.to_owned()))
        .unwrap();
    let (resp, _conn) = admin_send(admin, from, req).await;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_log_filter_is_changed_while_running_from_loopback_only() {
    let app = Backend::start("127.0.0.2", "app").await;
    let (dir, path) = empty_config();
    let log_path = dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let (_child, inbound, admin) = inbound_proxy(&path, app.addr, Some(log)).await;
    // A new client each time: a new connection, whose detection logs at debug.
    let served = || async move {
        h1_client()
            .request(
                Request::get(format!("http://{inbound}/"))
                    .body(full(""))
                    .unwrap(),
            )
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK)
    };
    eventually(
        Duration::from_secs(10),
        "the inbound listener serves",
        served,
    )
    .await;
    let log_text = || std::fs::read_to_string(&log_path).unwrap();
    // Debug lines of the connection's handling: none at `warn`.
    assert!(!log_text().contains("detected"), "{}", log_text());

    let loopback: std::net::IpAddr = [127, 0, 0, 1].into();
    assert_eq!(
        admin_call(admin, loopback, "GET", "/log-level", "").await,
        (200, "warn\n".to_owned())
    );
    // What the inbound listener forwards from: another pod's connection, not the pod's.
    let relayed: std::net::IpAddr = [127, 0, 0, 6].into();
    let (status, body) = admin_call(admin, relayed, "PUT", "/log-level", "debug").await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = admin_call(admin, loopback, "PUT", "/log-level", "degub").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("\"degub\" names no level"), "{body}");
    let (status, body) = admin_call(
        admin,
        loopback,
        "PUT",
        "/log-level",
        "x".repeat(4096).as_str(),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(
        admin_call(admin, relayed, "GET", "/log-level", "").await,
        (200, "warn\n".to_owned()),
        "a refused filter changes nothing"
    );

    let (status, body) = admin_call(
        admin,
        loopback,
        "PUT",
        "/log-level",
        "warn,weft_proxy=debug\n",
    )
    .await;
    assert_eq!((status, &body[..]), (200, "warn,weft_proxy=debug\n"));
    assert!(served().await);
    eventually(
        Duration::from_secs(5),
        "the connection's debug lines are written",
        || async { log_text().contains("detected") },
    )
    .await;
    assert!(log_text().contains("log filter changed"), "{}", log_text());

    // A temporary change goes back to the lasting filter by itself.
    for (query, says) in [
        ("?for=0s", "more than zero"),
        ("?for=25h", "at most 24h"),
        ("?for=soon", "duration"),
        ("?level=debug", "one parameter"),
    ] {
        let path = format!("/log-level{query}");
        let (status, body) = admin_call(admin, loopback, "PUT", &path, "debug").await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(says), "{query}: {body}");
    }
    let (status, body) = admin_call(admin, loopback, "PUT", "/log-level?for=2s", "trace").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with("trace (for 1s more, then warn,weft_proxy=debug)")
            || body.starts_with("trace (for 2s more, then warn,weft_proxy=debug)"),
        "{body}"
    );
    eventually(
        Duration::from_secs(10),
        "the temporary filter ends by itself",
        || async {
            admin_call(admin, loopback, "GET", "/log-level", "").await
                == (200, "warn,weft_proxy=debug\n".to_owned())
        },
    )
    .await;
    assert!(
        log_text().contains("temporary log filter ended"),
        "{}",
        log_text()
    );
}

/// Kills the child process when dropped.
struct Killed(std::process::Child);

/// A `weft-proxy` with the config at `config` (no transparent interception), forwarding
/// its inbound port to `app`, logging at `warn` to `stderr` (inherited when none): the
/// process, killed when dropped, and its inbound and admin addresses.
#[allow(clippy::unwrap_used)]
async fn inbound_proxy(
    config: &std::path::Path,
    app: std::net::SocketAddr,
    stderr: Option<std::fs::File>,
) -> (Killed, std::net::SocketAddr, std::net::SocketAddr) {
    let inbound: std::net::SocketAddr = format!("127.0.0.1:{}", free_port().await).parse().unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port().await).parse().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_weft-proxy"));
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .args(["--no-transparent", "--log", "warn"])
        .arg("--inbound-forward")
        .arg(format!("{inbound}={app}"))
        .arg("--admin-addr")
        .arg(admin.to_string())
        .stdin(std::process::Stdio::null());
    if let Some(stderr) = stderr {
        cmd.stderr(stderr);
    }
    (Killed(cmd.spawn().unwrap()), inbound, admin)
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_log_filter_naming_no_level_stops_the_proxy_at_start() {
    let (_dir, path) = empty_config();
    let stderr = fails_to_start(&path, &["--log", "info,degub"]).await;
    assert!(stderr.contains("\"degub\" names no level"), "{stderr}");
}

/// A `/tap` answer being read: its status, and its body as it streams.
struct OpenTap {
    status: u16,
    body: hyper::body::Incoming,
    _conn: Task,
}

impl OpenTap {
    /// Opens `path` (`/tap?…`) on the admin listener `admin` from a socket bound to `from`.
    #[allow(clippy::unwrap_used)]
    async fn open(admin: std::net::SocketAddr, from: std::net::IpAddr, path: &str) -> OpenTap {
        let req = Request::get(path)
            .header("host", "admin")
            .body(full(""))
            .unwrap();
        let (resp, _conn) = admin_send(admin, from, req).await;
        OpenTap {
            status: resp.status().as_u16(),
            body: resp.into_body(),
            _conn,
        }
    }

    /// The body to its end (within 10 s), as JSON lines.
    #[allow(clippy::unwrap_used)]
    async fn lines(self) -> Vec<serde_json::Value> {
        let body = tokio::time::timeout(Duration::from_secs(10), self.body.collect())
            .await
            .unwrap_or_else(|_| panic!("the tap did not end within 10 s"))
            .unwrap()
            .to_bytes();
        std::str::from_utf8(&body)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    }
}

/// `/tap` streams the requests the proxy finishes, filtered, to loopback clients only, and
/// ends by itself; a pod without an access log is tapped all the same.
#[tokio::test]
async fn requests_are_tapped_live_from_loopback_only_and_taps_end_by_themselves() {
    let app = Backend::start("127.0.0.2", "app").await;
    let (_dir, path) = empty_config();
    let (_child, inbound, admin) = inbound_proxy(&path, app.addr, None).await;
    let client = h1_client();
    let send = |method: &'static str, path: &'static str| {
        let client = client.clone();
        async move {
            let req = Request::builder()
                .method(method)
                .uri(format!("http://{inbound}{path}"))
                .body(full("hello"))
                .unwrap();
            client
                .request(req)
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK)
        }
    };
    eventually(
        Duration::from_secs(10),
        "the inbound listener serves",
        || send("GET", "/"),
    )
    .await;
    let loopback: std::net::IpAddr = [127, 0, 0, 1].into();
    let relayed: std::net::IpAddr = [127, 0, 0, 6].into();

    let tap = OpenTap::open(admin, loopback, "/tap?path=%2Ftapped&method=POST&max=2").await;
    assert_eq!(tap.status, 200);
    assert!(send("POST", "/tapped/1").await);
    assert!(send("GET", "/tapped/get").await, "another method");
    assert!(send("POST", "/other").await, "another path");
    assert!(send("POST", "/tapped/2").await);
    assert!(send("POST", "/tapped/3").await, "after the tap's max");
    let lines = tap.lines().await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (line, path) in lines.iter().zip(["/tapped/1", "/tapped/2"]) {
        assert_eq!(line["path"], path, "{line}");
        assert_eq!(line["method"], "POST");
        assert_eq!(line["direction"], "inbound");
        assert_eq!(line["status"], 200);
        assert_eq!(line["bytes_in"], 5, "{line}");
        assert_eq!(line["upstream"], app.addr.to_string(), "{line}");
    }
    assert_eq!(
        lines[2]["tapEnd"],
        serde_json::json!({"events": 2, "dropped": 0, "why": "max"})
    );

    // A tap whose time runs out says so, with what it saw.
    let tap = OpenTap::open(admin, loopback, "/tap?duration=500ms").await;
    assert!(send("GET", "/timed").await);
    let lines = tap.lines().await;
    assert_eq!(
        lines.last().unwrap()["tapEnd"]["why"],
        "duration",
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l["path"] == "/timed"), "{lines:?}");

    // Another pod's connection (what the inbound listener forwards from), bad parameters,
    // and more taps than allowed are refused, each saying why.
    let refused = OpenTap::open(admin, relayed, "/tap").await;
    assert_eq!(refused.status, 403);
    let bad = OpenTap::open(admin, loopback, "/tap?max=0").await;
    assert_eq!(bad.status, 400);
    let bad = OpenTap::open(admin, loopback, "/tap?status=500").await;
    assert_eq!(bad.status, 400);
    let mut open = Vec::new();
    for _ in 0..weft_proxy::tap::MAX_TAPS {
        let tap = OpenTap::open(admin, loopback, "/tap?duration=1m").await;
        assert_eq!(tap.status, 200);
        open.push(tap);
    }
    let over = OpenTap::open(admin, loopback, "/tap").await;
    assert_eq!(over.status, 429);
    // A reader that goes away frees its place.
    drop(open.pop());
    eventually(
        Duration::from_secs(5),
        "a freed place is taken again",
        || async {
            OpenTap::open(admin, loopback, "/tap?duration=1m")
                .await
                .status
                == 200
        },
    )
    .await;
}
