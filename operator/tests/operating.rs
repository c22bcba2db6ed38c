//! `kubectl weft stat` and `kubectl weft explain` against the test bed: a real API server, a
//! `weft-operator` process and `weft-proxy` processes carrying HTTP traffic to a backend on
//! a test host, under a Route whose first rule aborts `/fail` with 503.
//!
//! `stat`'s numbers must equal, exactly, the requests the test sent during its window
//! (count and status mix), per view: a Deployment's inbound requests, its outbound requests
//! to a Service, and a Route with, per rule, its requests, status mix, rates and events.
//! `explain`'s output is compared with golden files (`tests/golden/`, rewritten with
//! `WEFT_UPDATE_GOLDEN=1`), volatile parts (namespace, addresses, versions) masked.
//!
//! The proxies' admin endpoints are read with `--admin-url`: the bed has no kubelet and its
//! pod IPs are only API fields, and the API server's pod proxy refuses loopback pod IPs
//! ("address not allowed": `pkg/registry/core/pod/strategy.go` admits global unicast
//! addresses only), so the pod-proxy path itself is not exercised here.
//!
//! Needs the `weft-proxy` and `kubectl-weft` binaries: `cargo build -p weft-proxy -p
//! kubectl-weft` first when testing this package alone.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{net::SocketAddr, process::Stdio, time::Duration};

use anyhow::ensure;
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Service};
use kube::api::PostParams;
use serde_json::{Value, json};
use support::{mesh::*, processes::*};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use weft_e2e::shared::{self, eventually};

/// A Deployment selecting `app` (the bed runs no controllers: its pods are the test's).
async fn deployment(bed: &Bed, name: &str, app: &str) {
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"selector": {"matchLabels": {"app": app}},
                 "template": {"metadata": {"labels": {"app": app}},
                              "spec": {"containers": [{"name": "app", "image": "weft.invalid/app:1"}]}}}
    }))
    .unwrap();
    bed.api::<Deployment>()
        .create(&PostParams::default(), &d)
        .await
        .unwrap();
}

/// `kubectl-weft` with the bed's kubeconfig.
fn kubectl_weft(args: &[String]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(sibling_binary("kubectl-weft"));
    cmd.env("KUBECONFIG", shared::testbed().kubeconfig())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// A running `stat`, after its first scrape.
struct Stat {
    child: tokio::process::Child,
    stderr: String,
}

impl Stat {
    /// Starts `kubectl weft stat ARGS` and waits for it to say it took its first scrape.
    async fn start(args: Vec<String>) -> Stat {
        let mut child = kubectl_weft(&args).spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut stderr = String::new();
        let first = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                stderr.push_str(&line);
                stderr.push('\n');
                if line.starts_with("scraped") {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            matches!(first, Ok(true)),
            "stat {args:?} did not scrape: {stderr}"
        );
        Stat { child, stderr }
    }

    async fn output(mut self) -> String {
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .await
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "stat failed: {}\n{out}", self.stderr);
        out
    }
}

/// `n` GETs of `path` through `addr`, each answered with `status`.
async fn send(addr: SocketAddr, path: &str, n: usize, status: u16) {
    for _ in 0..n {
        let r = http_request(addr, path).await.unwrap();
        assert_eq!(r.status, status, "{path}: {r:?}");
    }
}

/// Compares `actual` with the golden file `name`, or rewrites it with
/// `WEFT_UPDATE_GOLDEN=1`.
fn golden(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("WEFT_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (WEFT_UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(
        actual, expected,
        "{name} differs from the golden file (WEFT_UPDATE_GOLDEN=1 rewrites it)"
    );
}

/// `text` with each of `volatile` replaced by its mask.
fn mask(text: &str, volatile: &[(String, &str)]) -> String {
    let mut out = text.to_owned();
    for (v, m) in volatile {
        out = out.replace(v.as_str(), m);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_counts_exactly_the_requests_sent_and_explain_walks_the_route() {
    let bed = Bed::new("operating").await;
    let ns = bed.ns.clone();
    let dir = tempfile::tempdir().unwrap();
    let mesh = PlainMesh::start(&bed, dir.path()).await;
    let (push, op_admin, backend, operator) = (mesh.push, mesh.admin, mesh.backend, &mesh.operator);
    deployment(&bed, "client", "client").await;
    deployment(&bed, "web", "web").await;
    let svc = format!("web.{ns}.80");
    let mut proxies = Vec::new();
    for (name, app, ip, inbound) in [
        ("client-0", "client", "198.18.240.70", None),
        ("client-1", "client", "198.18.240.71", None),
        ("web-0", "web", "198.18.240.72", Some(backend)),
    ] {
        bed.service_account(name).await;
        let pod = bed.pod(name, name, app, ip).await;
        let p = ProxyProc::start_with_app(&bed, push, &pod, &svc, dir.path(), inbound).await;
        p.until_answered("hello", operator).await;
        proxies.push((name, p));
    }
    bed.route(
        "web",
        json!({"service": {"name": "web"}, "rules": [
            {"name": "fail", "matches": [{"path": {"prefix": "/fail"}}],
             "backends": [{"name": "web"}],
             "fault": {"abort": {"httpStatus": 503, "percentage": 100}}},
            {"name": "rest", "backends": [{"name": "web"}], "timeout": "3s",
             "retries": {"attempts": 2, "retryOn": ["5xx"]}}]}),
    )
    .await;
    for (_, p) in &proxies {
        eventually(WAIT, || async {
            let r = http_request(p.forward, "/fail").await?;
            ensure!(r.status == 503, "{r:?}");
            Ok(())
        })
        .await
        .unwrap();
    }
    bed.route_programmed("web", 3).await;

    let admin_urls: Vec<String> = proxies
        .iter()
        .flat_map(|(name, p)| {
            [
                "--admin-url".to_owned(),
                format!("{ns}/{name}=http://{}", p.admin),
            ]
        })
        .collect();
    let stat = |target: &str, extra: &[&str]| {
        let mut args: Vec<String> = ["stat", target, "-n", &ns, "--window", "6s"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args.extend(admin_urls.iter().cloned());
        Stat::start(args)
    };
    // Three views, measured over the same traffic.
    let outbound = stat("deploy/client", &["--to", "svc/web", "-o", "json"]).await;
    let inbound = stat("deploy/web", &["-o", "json"]).await;
    let route = stat("route/web", &["--from", "deploy/client"]).await;
    let route_json = stat("route/web", &["--from", "deploy/client", "-o", "json"]).await;
    let (c0, c1, w0) = (&proxies[0].1, &proxies[1].1, &proxies[2].1);
    send(c0.forward, "/", 30, 200).await;
    send(c0.forward, "/fail/now", 10, 503).await;
    send(c1.forward, "/", 20, 200).await;
    send(w0.inbound.unwrap(), "/", 25, 200).await;

    let out: Value = serde_json::from_str(&outbound.output().await).unwrap();
    let row = &out["rows"][0];
    assert_eq!(row["name"], "client", "{out:#}");
    assert_eq!(row["direction"], "outbound", "{out:#}");
    assert_eq!(row["meshed"], 2, "{out:#}");
    let s = &row["stats"];
    assert_eq!(s["requests"], 60, "{out:#}");
    assert_eq!(s["responses"], json!({"2xx": 50, "5xx": 10}), "{out:#}");
    assert_eq!(s["success_rate"].as_f64().unwrap(), 50.0 / 60.0, "{out:#}");
    let window = out["window_seconds"].as_f64().unwrap();
    assert!((6.0..8.0).contains(&window), "{out:#}");
    assert!(
        (s["rps"].as_f64().unwrap() - 60.0 / window).abs() < 1e-9,
        "{out:#}"
    );
    let (p50, p99) = (
        s["p50_seconds"].as_f64().unwrap(),
        s["p99_seconds"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 < 5.0, "{out:#}");

    let out: Value = serde_json::from_str(&inbound.output().await).unwrap();
    let s = &out["rows"][0]["stats"];
    assert_eq!(out["rows"][0]["direction"], "inbound", "{out:#}");
    assert_eq!(s["requests"], 25, "{out:#}");
    assert_eq!(s["responses"], json!({"2xx": 25}), "{out:#}");
    assert_eq!(s["success_rate"], 1.0, "{out:#}");

    // The Route's row, then one per rule: `fail` took the 10 requests to /fail/now (all
    // aborted with 503), `rest` the 50 others.
    let table = route.output().await;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "{table}");
    let cells = |i: usize| -> Vec<&str> { lines[i].split_whitespace().collect() };
    assert_eq!(
        [cells(1)[1], cells(1)[2], cells(1)[4], cells(1)[6]],
        ["route/web", "outbound", "83.33%", "60"],
        "{table}"
    );
    assert_eq!(
        lines[4], "route/web rule fail: fault_injected=10",
        "{table}"
    );
    let out: Value = serde_json::from_str(&route_json.output().await).unwrap();
    let s = &out["rows"][0]["stats"];
    assert_eq!(s["requests"], 60, "{out:#}");
    let window = out["window_seconds"].as_f64().unwrap();
    let rules = s["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 2, "{out:#}");
    for (rule, name, requests, responses, success, events) in [
        (
            &rules[0],
            "fail",
            10,
            json!({"5xx": 10}),
            0.0,
            json!({"fault_injected": 10}),
        ),
        (&rules[1], "rest", 50, json!({"2xx": 50}), 1.0, json!({})),
    ] {
        assert_eq!(rule["rule"], name, "{out:#}");
        assert_eq!(rule["requests"], requests, "{out:#}");
        assert_eq!(rule["responses"], responses, "{out:#}");
        assert_eq!(rule["success_rate"], success, "{out:#}");
        assert_eq!(rule["events"], events, "{out:#}");
        assert!(
            (rule["rps"].as_f64().unwrap() - f64::from(requests) / window).abs() < 1e-9,
            "{out:#}"
        );
        let (p50, p99) = (
            rule["p50_seconds"].as_f64().unwrap(),
            rule["p99_seconds"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= p99 && p99 < 5.0, "{out:#}");
    }
    // The table's rule rows say the same.
    assert_eq!(
        [cells(2)[1], cells(2)[4], cells(2)[6]],
        ["rule/fail", "0.00%", "10"],
        "{table}"
    );
    assert_eq!(
        [cells(3)[1], cells(3)[4], cells(3)[6]],
        ["rule/rest", "100.00%", "50"],
        "{table}"
    );

    // explain, from client-0's proxy, for a request the first rule takes and one it does not.
    let explain = |dest: &str, extra: &[&str]| {
        let mut args: Vec<String> = [
            "explain",
            "client-0",
            dest,
            "-n",
            &ns,
            "--admin-url",
            &format!("http://{}", c0.admin),
            "--operator-url",
            &format!("http://{op_admin}"),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        async move {
            let out = kubectl_weft(&args).output().await.unwrap();
            assert!(
                out.status.success(),
                "explain {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        }
    };
    let config: Value =
        serde_json::from_str(&http_get(c0.admin, "/config").await.unwrap().1).unwrap();
    let cluster_ip = bed
        .api::<Service>()
        .get("web")
        .await
        .unwrap()
        .spec
        .unwrap()
        .cluster_ip
        .unwrap();
    let volatile = [
        (backend.to_string(), "BACKEND"),
        (format!("{cluster_ip}:80"), "CLUSTER_IP:80"),
        (
            format!(
                "version {} (generation",
                config["version"].as_str().unwrap()
            ),
            "version V (generation",
        ),
        (
            format!("(generation {} of", config["generation"]),
            "(generation G of",
        ),
        (backend.ip().to_string(), "BACKEND_IP"),
        (ns.clone(), "NS"),
    ];
    let mut text = explain(&format!("http://web.{ns}/fail/now"), &[]).await;
    text.push_str("---\n");
    text.push_str(&explain("web:80", &["--path", "/api?x=1", "-X", "post"]).await);

    // The destination's side: a Policy on web's pods closes /admin and limits the rate;
    // explain reads web-0's proxy's config and runs its authorization.
    let policy: weft_crds::Policy = serde_json::from_value(json!({
        "metadata": {"name": "web-admin"},
        "spec": {"target": {"selector": {"matchLabels": {"app": "web"}}},
                 "mtls": {"mode": "Permissive"},
                 "defaultAction": "Allow",
                 "rules": [{"action": "Deny", "to": [{"paths": [{"prefix": "/admin"}]}]}],
                 "rateLimit": {"requestsPerSecond": 500, "burst": 1000}}
    }))
    .unwrap();
    bed.api::<weft_crds::Policy>()
        .patch(
            "web-admin",
            &kube::api::PatchParams::apply("weft-test").force(),
            &kube::api::Patch::Apply(&policy),
        )
        .await
        .unwrap();
    eventually(WAIT, || async {
        let (_, body) = http_get(w0.admin, "/config").await?;
        ensure!(body.contains(&format!("{ns}/web-admin")), "{body}");
        Ok(())
    })
    .await
    .unwrap();
    let w0_config: Value =
        serde_json::from_str(&http_get(w0.admin, "/config").await.unwrap().1).unwrap();
    let to_web0 = [
        "--to-pod",
        "web-0",
        "--to-admin-url",
        &format!("http://{}", w0.admin),
    ];
    let denied = explain(&format!("http://web.{ns}/admin/users"), &to_web0).await;
    text.push_str("---\n");
    text.push_str(&denied);
    let mut json_args = to_web0.to_vec();
    json_args.extend(["-o", "json"]);
    let allowed: Value =
        serde_json::from_str(&explain(&format!("http://web.{ns}/api"), &json_args).await).unwrap();
    let d = &allowed["destination"];
    assert_eq!(d["pod"], format!("{ns}/web-0"), "{allowed:#}");
    assert_eq!(d["verdict"], "allowed", "{allowed:#}");
    assert_eq!(
        d["policies"],
        json!([format!("{ns}/web-admin")]),
        "{allowed:#}"
    );
    assert_eq!(d["mtlsMode"], "permissive", "{allowed:#}");
    assert!(
        d["rateLimit"]
            .as_str()
            .unwrap()
            .contains("500 requests/s, burst 1000"),
        "{allowed:#}"
    );
    assert_eq!(allowed["schemaVersion"], 1);
    assert_eq!(allowed["steps"][0]["title"], "destination", "{allowed:#}");
    // What explain says, the destination proxy does.
    let r = http_request(w0.inbound.unwrap(), "/admin/users")
        .await
        .unwrap();
    assert_eq!(
        (r.status, r.header("weft-error")),
        (403, Some("forbidden")),
        "{r:?}"
    );
    let r = http_request(w0.inbound.unwrap(), "/api").await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    // The operator's versions move with the bed's other resources: mask them too.
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("operator: acked version") {
                let state = l.rsplit_once(": ").map_or("", |(_, s)| s);
                format!("operator: acked version A, desired D: {state}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    let text = text.replace(
        &format!(
            "(proxy config version {})",
            w0_config["version"].as_str().unwrap()
        ),
        "(proxy config version W)",
    );
    golden("explain.txt", &mask(&text, &volatile));

    // `tap deploy/client`: both of the Deployment's pods tapped at once (web-0, another
    // Deployment's, is not), each line naming its pod.
    let mut args: Vec<String> = [
        "tap",
        "deploy/client",
        "-n",
        &ns,
        "--path",
        "/tapdeploy",
        "--max",
        "1",
        "--for",
        "30s",
        "-o",
        "json",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(admin_urls.iter().cloned());
    let tap_dir = dir.path().join("tap");
    std::fs::create_dir_all(&tap_dir).unwrap();
    let tap =
        tokio::spawn(
            async move { kubectl_weft_within(&args, &tap_dir, Duration::from_secs(40)).await },
        );
    let mut rounds = 0;
    while !tap.is_finished() && rounds < 200 {
        for (_, p) in &proxies {
            let _ = http_request(p.forward, "/tapdeploy/x").await;
        }
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, out, err, _) = tap.await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut pods: Vec<(&str, bool)> = lines
        .iter()
        .map(|l| (l["pod"].as_str().unwrap(), l.get("tapEnd").is_some()))
        .collect();
    pods.sort_unstable();
    let (c0, c1) = (format!("{ns}/client-0"), format!("{ns}/client-1"));
    assert_eq!(
        pods,
        [
            (&c0[..], false),
            (&c0[..], true),
            (&c1[..], false),
            (&c1[..], true)
        ],
        "{out}"
    );
    for l in &lines {
        if l.get("tapEnd").is_none() {
            assert_eq!(
                (l["path"].as_str(), l["status"].as_u64()),
                (Some("/tapdeploy/x"), Some(200)),
                "{l}"
            );
        }
    }

    // `top deploy/client`: the two pods' requests summed per row, the busiest first, the
    // Route's aborted ones failing.
    let mut args: Vec<String> = [
        "top",
        "deploy/client",
        "-n",
        &ns,
        "--for",
        "5s",
        "-o",
        "json",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(admin_urls.iter().cloned());
    let top_dir = dir.path().join("top");
    std::fs::create_dir_all(&top_dir).unwrap();
    let top = {
        let top_dir = top_dir.clone();
        tokio::spawn(
            async move { kubectl_weft_within(&args, &top_dir, Duration::from_secs(30)).await },
        )
    };
    eventually(Duration::from_secs(20), || async {
        let err = std::fs::read_to_string(top_dir.join("kubectl-weft.err")).unwrap_or_default();
        ensure!(err.matches("# tapping ").count() == 2, "{err}");
        Ok(())
    })
    .await
    .unwrap();
    let (c0, c1) = (&proxies[0].1, &proxies[1].1);
    send(c0.forward, "/top/a", 6, 200).await;
    send(c1.forward, "/top/a", 3, 200).await;
    send(c1.forward, "/fail/top", 4, 503).await;
    let (code, out, err, _) = top.await.unwrap();
    assert_eq!(code, Some(0), "{err}");
    let out: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(out["requests"], 13, "{out:#}");
    let rows = out["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{out:#}");
    for (row, path, requests, success) in [
        (&rows[0], "/top/a", 9, 1.0),
        (&rows[1], "/fail/top", 4, 0.0),
    ] {
        assert_eq!(
            (
                row["direction"].as_str(),
                row["method"].as_str(),
                row["path"].as_str(),
                row["requests"].as_u64(),
                row["success_rate"].as_f64()
            ),
            (
                Some("outbound"),
                Some("GET"),
                Some(path),
                Some(requests),
                Some(success)
            ),
            "{out:#}"
        );
        let (p50, max) = (
            row["p50_ms"].as_f64().unwrap(),
            row["max_ms"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= max && max < 5_000.0, "{out:#}");
    }
    for pod in [format!("{ns}/client-0"), format!("{ns}/client-1")] {
        assert_eq!(out["pods"][&pod]["why"], "duration", "{out:#}");
        assert_eq!(out["pods"][&pod]["dropped"], 0, "{out:#}");
    }

    drop(proxies);
    drop(mesh);
    bed.cleanup().await;
}

/// Runs `kubectl weft ARGS` for at most `limit`: its exit code (`None`: killed at the
/// limit), stdout and stderr (through files, so a killed run still shows what it said),
/// and how long it ran.
async fn kubectl_weft_within(
    args: &[String],
    dir: &std::path::Path,
    limit: Duration,
) -> (Option<i32>, String, String, Duration) {
    let (out, err) = (dir.join("kubectl-weft.out"), dir.join("kubectl-weft.err"));
    let mut child = kubectl_weft(args)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let code = match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => Some(status.unwrap().code().unwrap_or(-1)),
        Err(_) => {
            let pid = child.id().unwrap_or_default();
            let ss = std::process::Command::new("ss")
                .args(["-tnp"])
                .output()
                .unwrap();
            let mine: Vec<String> = String::from_utf8_lossy(&ss.stdout)
                .lines()
                .filter(|l| l.contains(&format!("pid={pid},")))
                .map(str::to_owned)
                .collect();
            // Where it was waiting, for the failure message's reader.
            eprintln!("kubectl-weft (pid {pid}) killed at {limit:?}; its sockets: {mine:#?}");
            child.kill().await.unwrap();
            None
        }
    };
    let took = started.elapsed();
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    (code, read(&out), read(&err), took)
}

/// A Service of `ports` (`[{"name": ..., "port": ...}]`) selecting `selector` (none: its
/// endpoints are the test's).
async fn plain_service(bed: &Bed, name: &str, selector: Option<Value>, ports: Value) {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"selector": selector, "ports": ports}
    }))
    .unwrap();
    bed.api::<Service>()
        .create(&PostParams::default(), &svc)
        .await
        .unwrap();
}

/// With the operator's admin Service unable to answer, `explain` and `proxy-status` come
/// back within their 10 s bound and name the Service and the command to check it, instead
/// of waiting on the API server's service proxy: a Service without endpoints (no operator
/// pod Ready: the API server answers 503, which the Kubernetes client would retry for
/// minutes), and one whose only endpoint accepts connections but never answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_and_proxy_status_give_up_on_an_operator_service_that_does_not_answer() {
    let bed = Bed::new("no-operator").await;
    let ns = bed.ns.clone();
    let dir = tempfile::tempdir().unwrap();
    let mesh = PlainMesh::start(&bed, dir.path()).await;
    let operator = &mesh.operator;
    bed.service_account("client-0").await;
    let pod = bed
        .pod("client-0", "client-0", "client", "198.18.240.80")
        .await;
    let proxy = ProxyProc::start(&bed, mesh.push, &pod, &format!("web.{ns}.80"), dir.path()).await;
    proxy.until_answered("hello", operator).await;

    let admin_port = json!([{"name": "http-metrics", "port": 80, "targetPort": 9090}]);
    plain_service(
        &bed,
        "no-endpoints",
        Some(json!({"app": "nobody"})),
        admin_port.clone(),
    )
    .await;
    // Accepted by the kernel (the listen backlog), never read nor answered. On a test
    // host's near end: the API server refuses loopback endpoints, and proxies only to an
    // address of the pod an endpoint's targetRef names.
    let host = TestHost::new();
    let silent = std::net::TcpListener::bind((host.near(), 0)).unwrap();
    bed.pod(
        "silent-operator",
        "client-0",
        "silent-operator",
        &host.near().to_string(),
    )
    .await;
    plain_service(&bed, "silent", None, admin_port).await;
    let endpoints: k8s_openapi::api::core::v1::Endpoints = serde_json::from_value(json!({
        "metadata": {"name": "silent"},
        "subsets": [{"addresses": [{"ip": host.near().to_string(),
                                    "targetRef": {"kind": "Pod", "name": "silent-operator", "namespace": ns}}],
                     "ports": [{"name": "http-metrics", "port": silent.local_addr().unwrap().port()}]}]
    }))
    .unwrap();
    bed.api::<k8s_openapi::api::core::v1::Endpoints>()
        .create(&PostParams::default(), &endpoints)
        .await
        .unwrap();

    // The bound is 10 s; a process start and the proxy's /config read come on top.
    let limit = Duration::from_secs(20);
    for (service, why) in [
        ("no-endpoints", "refused /proxies"),
        ("silent", "did not answer /proxies within 10s"),
    ] {
        let operator_flags = [
            "--operator-namespace".to_owned(),
            ns.clone(),
            "--operator-service".to_owned(),
            format!("{service}:http-metrics"),
        ];
        let hint = format!("`kubectl -n {ns} get endpoints {service}`");
        let said = format!("Service {ns}/{service}:http-metrics");

        let mut args: Vec<String> = ["explain", "client-0", "web:80", "-n", &ns, "--admin-url"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.push(format!("http://{}", proxy.admin));
        args.extend(operator_flags.iter().cloned());
        let (code, stdout, stderr, took) = kubectl_weft_within(&args, dir.path(), limit * 2).await;
        assert_eq!(
            code,
            Some(0),
            "explain against {service} ({took:?}):\n{stdout}\n{stderr}"
        );
        let line = stdout
            .lines()
            .find(|l| l.starts_with("operator: not asked"))
            .unwrap_or_else(|| panic!("explain says nothing of the operator:\n{stdout}"));
        assert!(
            line.contains(&said) && line.contains(why) && line.contains(&hint),
            "explain against {service}: {line}"
        );
        assert!(took < limit, "explain against {service} took {took:?}");
        eprintln!("explain against {service}: {took:.1?}: {line}");

        let mut args = vec!["proxy-status".to_owned(), "-n".to_owned(), ns.clone()];
        args.extend(operator_flags.iter().cloned());
        let (code, _, stderr, took) = kubectl_weft_within(&args, dir.path(), limit * 2).await;
        assert!(
            code.is_some_and(|c| c != 0),
            "proxy-status against {service} ({code:?}, {took:?}): {stderr}"
        );
        assert!(
            stderr.contains(&said) && stderr.contains(why) && stderr.contains(&hint),
            "proxy-status against {service}: {stderr}"
        );
        assert!(took < limit, "proxy-status against {service} took {took:?}");
        eprintln!("proxy-status against {service}: {took:.1?}");
    }
    drop((proxy, mesh, silent, host));
    bed.cleanup().await;
}

/// `kubectl weft log-level` against a running `weft-proxy` process (through `--admin-url`,
/// as the bed has no kubelet to port-forward to): shown, changed, a typo refused before it
/// reaches the proxy, and a change the proxy's own log shows.
/// A `weft-proxy` process with no services, logging at `info`, whose admin port answers:
/// the process, its admin address, and its forward listener (for `web`, which its config
/// lacks, so the proxy answers every request there itself).
async fn proxy_without_services(dir: &std::path::Path) -> (Proc, SocketAddr, SocketAddr) {
    let config = dir.join("proxy.yaml");
    std::fs::write(
        &config,
        "apiVersion: weft.dev/proxy/v1alpha1\nkind: ProxyConfig\nservices: []\n",
    )
    .unwrap();
    let (admin, forward) = (free_addr(), free_addr());
    let mut cmd = std::process::Command::new(sibling_binary("weft-proxy"));
    cmd.args(["run", "--no-transparent", "--log", "info", "--config"])
        .arg(&config)
        .arg("--admin-addr")
        .arg(admin.to_string())
        .arg("--forward")
        .arg(format!("{forward}=web"));
    let proxy = Proc::spawn("proxy", cmd, dir);
    eventually(Duration::from_secs(10), || async {
        std::net::TcpStream::connect(admin)?;
        anyhow::Ok(())
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "the proxy's admin port does not answer: {e}\n{}",
            proxy.log_tail()
        )
    });
    (proxy, admin, forward)
}

#[tokio::test]
async fn log_level_shows_and_changes_a_running_proxys_filter() {
    let dir = tempfile::tempdir().unwrap();
    let (proxy, admin, _) = proxy_without_services(dir.path()).await;
    let url = format!("http://{admin}");
    let run = |extra: &[&str]| {
        let mut args: Vec<String> = ["log-level", "web-0", "-n", "shop", "--admin-url", &url]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let dir = dir.path().to_owned();
        async move { kubectl_weft_within(&args, &dir, Duration::from_secs(20)).await }
    };

    let (code, out, err, _) = run(&[]).await;
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "shop/web-0: info\n"),
        "{err}"
    );

    let (code, out, err, _) = run(&["warn,weft_proxy=debug"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("shop/web-0: info -> warn,weft_proxy=debug (until the proxy restarts"),
        "{out}"
    );
    let (code, out, err, _) = run(&[]).await;
    assert_eq!(
        (code, out.as_str()),
        (Some(0), "shop/web-0: warn,weft_proxy=debug\n"),
        "{err}"
    );

    let (code, out, err, _) = run(&["degub"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(err.contains("\"degub\" names no level"), "{err}");
    let (_, out, _, _) = run(&[]).await;
    assert_eq!(out, "shop/web-0: warn,weft_proxy=debug\n", "unchanged");

    let log = std::fs::read_to_string(&proxy.log).unwrap();
    assert!(
        log.contains("log filter changed") && log.contains("to=warn,weft_proxy=debug"),
        "{}",
        proxy.log_tail()
    );

    // For a while: the proxy goes back by itself to the filter it had for good.
    let (code, _, err, _) = run(&["--for", "2s"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("give the FILTER"), "{err}");
    let (code, _, err, _) = run(&["debug", "--for", "25h"]).await;
    assert_eq!(code, Some(1));
    assert!(err.contains("at most 24h"), "{err}");
    let (code, out, err, _) = run(&["debug", "--for", "2s"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("shop/web-0: warn,weft_proxy=debug -> debug (for ")
            && out.ends_with(" more, then warn,weft_proxy=debug)\n"),
        "{out}"
    );
    eventually(Duration::from_secs(10), || async {
        let (_, out, _, _) = run(&[]).await;
        ensure!(out == "shop/web-0: warn,weft_proxy=debug\n", "{out}");
        Ok(())
    })
    .await
    .unwrap();
}

/// `kubectl weft tap` against a running `weft-proxy` process (through `--admin-url`): the
/// requests it handles, filtered by path, a line each, in text and as JSON, ending after
/// `--max`; a bad flag refused by name before anything is opened.
#[tokio::test]
async fn tap_shows_a_running_proxys_requests_as_they_finish() {
    let dir = tempfile::tempdir().unwrap();
    let (proxy, admin, forward) = proxy_without_services(dir.path()).await;
    let url = format!("http://{admin}");
    for output in ["text", "json"] {
        let args: Vec<String> = [
            "tap",
            "web-0",
            "-n",
            "shop",
            "--admin-url",
            &url,
            "--path",
            "/tapped",
            "--max",
            "2",
            "-o",
            output,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let run_dir = dir.path().join(output);
        std::fs::create_dir_all(&run_dir).unwrap();
        let tap = tokio::spawn(async move {
            kubectl_weft_within(&args, &run_dir, Duration::from_secs(30)).await
        });
        // Until the tap has seen its two: requests sent before it opened are not shown.
        let mut sent = 0;
        while !tap.is_finished() && sent < 200 {
            let _ = http_request(forward, "/other").await;
            let _ = http_request(forward, &format!("/tapped/{sent}")).await;
            sent += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (code, out, err, _) = tap.await.unwrap();
        assert_eq!(code, Some(0), "{err}\n{}", proxy.log_tail());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "two requests and the end: {out}");
        let requests = &lines[..2];
        let end = lines[lines.len() - 1];
        for line in requests {
            if output == "json" {
                let v: Value = serde_json::from_str(line).unwrap();
                assert!(
                    v["path"].as_str().unwrap().starts_with("/tapped/"),
                    "{line}"
                );
                assert_eq!(
                    (v["method"].as_str(), v["direction"].as_str()),
                    (Some("GET"), Some("outbound"))
                );
                assert!(v["reason"].is_string(), "the proxy answered itself: {line}");
            } else {
                assert!(
                    line.contains(" outbound GET ") && line.contains("/tapped/"),
                    "{line}"
                );
                assert!(line.contains(" weft-error="), "{line}");
            }
        }
        if output == "json" {
            let v: Value = serde_json::from_str(end).unwrap();
            assert_eq!(
                v["tapEnd"],
                json!({"events": 2, "dropped": 0, "why": "max"})
            );
        } else {
            assert_eq!(
                end,
                "# tap of shop/web-0 ended: 2 request(s) shown; its --max requests were shown"
            );
        }
    }

    let args: Vec<String> = ["tap", "web-0", "--admin-url", &url, "--for", "2h"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let (code, _, err, _) = kubectl_weft_within(&args, dir.path(), Duration::from_secs(20)).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("--for \"2h\"") && err.contains("at most 30m"),
        "{err}"
    );
}
