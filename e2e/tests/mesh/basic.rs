//! Injection, the sidecar's lifecycle, mutual TLS and opting out, with the node's busybox
//! image: `web` is busybox's httpd behind a Service, clients send with nc.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use weft_e2e::{mesh::service_manifest, node::TEST_IMAGE};

use crate::{
    Ctx,
    kube::{Kube, eventually, metric, proxy_env, spiffe},
};

/// How long pods may take to become Ready (image already imported; the proxy's startup
/// probe waits for its config and certificate).
pub const READY: Duration = Duration::from_secs(120);

/// A ServiceAccount.
pub fn service_account(ns: &str, name: &str) -> String {
    format!("apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {name}\n  namespace: {ns}\n")
}

/// The pod template of a busybox httpd answering `/` with `body`, on port 8080, run as
/// ServiceAccount `sa`, its proxy writing a JSON access log.
fn httpd_template(labels: &str, sa: &str, body: &str) -> String {
    format!(
        r#"    metadata:
      labels: {{{labels}}}
      annotations:
        weft.dev/access-log: json
    spec:
      serviceAccountName: {sa}
      terminationGracePeriodSeconds: 2
      containers:
      - name: main
        image: {TEST_IMAGE}
        imagePullPolicy: Never
        command: ["sh", "-c", "mkdir -p /www && echo {body} > /www/index.html && cp /www/index.html /www/first-request && exec httpd -f -p 8080 -h /www"]
        ports:
        - containerPort: 8080
        readinessProbe:
          tcpSocket: {{port: 8080}}
          periodSeconds: 1
"#
    )
}

/// ServiceAccount `web`, a one-replica Deployment `web` (busybox httpd answering
/// `hello-from-web`) and Service `web` (port 80).
pub fn web(ns: &str) -> String {
    format!(
        r#"{sa}---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: {ns}
spec:
  replicas: 1
  selector:
    matchLabels: {{app: web}}
  template:
{template}---
{service}"#,
        sa = service_account(ns, "web"),
        template = httpd_template("app: web", "web", "hello-from-web"),
        service = service_manifest(ns, "web", "app: web"),
    )
}

/// A long-running busybox pod `name` (container `main`) as ServiceAccount `sa`, with extra
/// pod annotations, its proxy (if any) writing a JSON access log.
pub fn client(ns: &str, name: &str, sa: &str, annotations: &str) -> String {
    format!(
        r#"{sa_yaml}---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  labels: {{app: {name}}}
  annotations:
    weft.dev/access-log: json{annotations}
spec:
  serviceAccountName: {sa}
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {TEST_IMAGE}
    imagePullPolicy: Never
    command: ["sh", "-c", "exec sleep 3600"]
"#,
        sa_yaml = service_account(ns, sa),
    )
}

/// The names of a pod's init containers, in order.
fn init_names(pod: &Value) -> Vec<String> {
    pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect()
}

/// Checks that `pod` carries the injected init container and native-sidecar proxy.
pub fn assert_injected(pod: &Value) -> anyhow::Result<()> {
    let name = &pod["metadata"]["name"];
    let inits = init_names(pod);
    ensure!(
        inits == ["weft-init", "weft-proxy"],
        "pod {name}: init containers {inits:?}, expected weft-init then weft-proxy"
    );
    let proxy = &pod["spec"]["initContainers"][1];
    ensure!(
        proxy["restartPolicy"] == "Always",
        "pod {name}: weft-proxy is not a native sidecar: {proxy}"
    );
    ensure!(
        pod["metadata"]["labels"]["weft.dev/meshed"].is_string(),
        "pod {name} has no weft.dev/meshed label: {}",
        pod["metadata"]["labels"]
    );
    Ok(())
}

/// The status of the container `name` among a pod's init or app containers.
fn status<'a>(pod: &'a Value, name: &str) -> anyhow::Result<&'a Value> {
    pod["status"]["initContainerStatuses"]
        .as_array()
        .into_iter()
        .chain(pod["status"]["containerStatuses"].as_array())
        .flatten()
        .find(|s| s["name"] == name)
        .with_context(|| format!("no status for container {name}: {}", pod["status"]))
}

/// The one pod of `ns` matching `selector`.
fn one_pod(kube: &Kube, ns: &str, selector: &str) -> anyhow::Result<Value> {
    let pods = kube.pods(ns, selector)?;
    match pods.as_slice() {
        [pod] => Ok(pod.clone()),
        _ => bail!("{} pods match {selector} in {ns}, expected one", pods.len()),
    }
}

/// A Job `name` in `ns` whose container `main` (ServiceAccount `sa`) runs `script` once.
fn job(ns: &str, name: &str, sa: &str, script: &str) -> String {
    format!(
        r#"{sa_yaml}---
apiVersion: batch/v1
kind: Job
metadata:
  name: {name}
  namespace: {ns}
spec:
  backoffLimit: 0
  template:
    metadata:
      labels: {{job: {name}}}
    spec:
      serviceAccountName: {sa}
      restartPolicy: Never
      terminationGracePeriodSeconds: 2
      containers:
      - name: main
        image: {TEST_IMAGE}
        imagePullPolicy: Never
        command: ["sh", "-c", {script:?}]
"#,
        sa_yaml = service_account(ns, sa),
    )
}

/// A shell line sending one GET of `path` to `web` and exiting 0 only on a 200.
fn get_web_once(path: &str) -> String {
    format!(
        "out=$( (printf 'GET {path} HTTP/1.1\\r\\nHost: web\\r\\nConnection: close\\r\\n\\r\\n'; sleep 2) | nc web 80 ); echo \"$out\"; echo \"$out\" | grep -q '200 OK'"
    )
}

/// Waits until Job `name` succeeded; fails at once if it failed (a failed Job stays so).
fn wait_job(kube: &Kube, ns: &str, name: &str, timeout: Duration) -> anyhow::Result<()> {
    eventually(timeout, || {
        let job = kube.json(&["-n", ns, "get", "job", name])?;
        let st = &job["status"];
        if st["succeeded"].as_i64() == Some(1) {
            return Ok(Ok(()));
        }
        if st["failed"].as_i64().unwrap_or(0) > 0 {
            return Ok(Err(anyhow::anyhow!("job {name} failed: {st}")));
        }
        bail!("job {name} has not completed: {st}")
    })?
}

/// 1. The webhook injects Deployment, StatefulSet and Job pods; they run with the proxy,
///    and the Job completes (the native sidecar does not keep it alive).
pub fn injection_into_deployment_statefulset_and_job(ctx: &Ctx) -> anyhow::Result<()> {
    let kube = &ctx.kube;
    let ns = ctx.namespace("inject", true)?;
    kube.apply(&web(&ns))?;
    kube.apply(&format!(
        r#"{sa}---
apiVersion: v1
kind: Service
metadata:
  name: db
  namespace: {ns}
spec:
  clusterIP: None
  selector: {{app: db}}
  ports:
  - port: 8080
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: db
  namespace: {ns}
spec:
  serviceName: db
  replicas: 1
  selector:
    matchLabels: {{app: db}}
  template:
{template}"#,
        sa = service_account(&ns, "db"),
        template = httpd_template("app: db", "db", "hello-from-db"),
    ))?;
    kube.wait_ready(&ns, "app=web", READY)?;
    kube.wait_ready(&ns, "app=db", READY)?;
    // The Job calls web through the mesh, then ends.
    kube.apply(&job(&ns, "once", "client", &get_web_once("/")))?;
    wait_job(kube, &ns, "once", Duration::from_secs(90))?;

    for selector in ["app=web", "app=db", "job=once"] {
        let pod = one_pod(kube, &ns, selector)?;
        assert_injected(&pod)?;
    }
    // The running workloads' proxies are up and ready.
    for selector in ["app=web", "app=db"] {
        let pod = one_pod(kube, &ns, selector)?;
        let proxy = status(&pod, "weft-proxy")?;
        ensure!(
            proxy["ready"] == true && proxy["state"]["running"].is_object(),
            "{selector}: weft-proxy not running and ready: {proxy}"
        );
    }
    // The Job's pod succeeded, its proxy stopped with it, and its request was answered.
    let pod = one_pod(kube, &ns, "job=once")?;
    ensure!(
        pod["status"]["phase"] == "Succeeded",
        "job pod phase {}",
        pod["status"]["phase"]
    );
    let proxy = status(&pod, "weft-proxy")?;
    ensure!(
        proxy["state"]["terminated"].is_object(),
        "the Job's proxy did not stop: {proxy}"
    );
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let log = kube.logs(&ns, name, "main")?;
    ensure!(
        log.contains("200 OK") && log.contains("hello-from-web"),
        "the Job's request: {log}"
    );
    // The StatefulSet's pod answers through its proxy too, by its stable name.
    let client = kube.pod_names(&ns, "app=web")?;
    let web_pod = client.first().context("no web pod")?;
    let answer = eventually(Duration::from_secs(20), || {
        let text = kube.http_get(&ns, web_pod, &format!("db-0.db.{ns}"), 8080, "/")?;
        ensure!(text.contains("200 OK"), "db-0 answered: {text}");
        Ok(text)
    })?;
    ensure!(answer.contains("hello-from-db"), "{answer}");
    Ok(())
}

/// An RFC 3339 timestamp of a container state, in whole seconds since the epoch (the
/// precision the kubelet reports).
fn seconds(v: &Value) -> anyhow::Result<i64> {
    let text = v
        .as_str()
        .with_context(|| format!("not a timestamp: {v}"))?;
    // 2026-11-30T16:40:12Z
    let (date, time) = text
        .trim_end_matches('Z')
        .split_once('T')
        .with_context(|| format!("not a timestamp: {text}"))?;
    let d: Vec<i64> = date.split('-').filter_map(|p| p.parse().ok()).collect();
    let t: Vec<i64> = time.split(':').filter_map(|p| p.parse().ok()).collect();
    ensure!(d.len() == 3 && t.len() == 3, "not a timestamp: {text}");
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m, day) = (d[0] - i64::from(d[1] <= 2), d[1], d[2]);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2])
}

/// 2. The proxy starts before the application and stops after it: the init container
///    finished before the proxy started, the proxy started before the app, the app's
///    very first request went out through the proxy with mutual TLS (so interception was
///    in place when it started), and the app finished before the proxy did.
pub fn proxy_starts_before_and_stops_after_the_app(ctx: &Ctx) -> anyhow::Result<()> {
    let kube = &ctx.kube;
    let ns = ctx.namespace("order", true)?;
    kube.apply(&web(&ns))?;
    kube.wait_ready(&ns, "app=web", READY)?;
    // The Job's first command is its request: no retry, no wait.
    kube.apply(&job(
        &ns,
        "first",
        "client",
        &get_web_once("/first-request"),
    ))?;
    wait_job(kube, &ns, "first", Duration::from_secs(90))?;

    let pod = one_pod(kube, &ns, "job=first")?;
    let init = status(&pod, "weft-init")?;
    let proxy = status(&pod, "weft-proxy")?;
    let app = status(&pod, "main")?;
    let init_done = &init["state"]["terminated"];
    ensure!(init_done["exitCode"] == 0, "weft-init: {init}");
    let proxy_end = &proxy["state"]["terminated"];
    let app_end = &app["state"]["terminated"];
    ensure!(app_end["exitCode"] == 0, "the app: {app}");
    ensure!(proxy_end.is_object(), "the proxy did not stop: {proxy}");
    let (init_finished, proxy_started, app_started, app_finished, proxy_finished) = (
        seconds(&init_done["finishedAt"])?,
        seconds(&proxy_end["startedAt"])?,
        seconds(&app_end["startedAt"])?,
        seconds(&app_end["finishedAt"])?,
        seconds(&proxy_end["finishedAt"])?,
    );
    ensure!(
        init_finished <= proxy_started
            && proxy_started <= app_started
            && app_finished <= proxy_finished,
        "order (seconds): init finished {init_finished}, proxy started {proxy_started}, app \
         started {app_started}, app finished {app_finished}, proxy finished {proxy_finished}"
    );
    // The kubelet started the app only once the proxy's startup probe passed: the app's
    // first request was already the proxy's, sent over mutual TLS as ServiceAccount
    // client (the web proxy's access log says who called).
    let web_pod = one_pod(kube, &ns, "app=web")?;
    let web_name = web_pod["metadata"]["name"].as_str().unwrap_or_default();
    let first = kube.logged_request(&ns, web_name, "/first-request", None)?;
    ensure!(
        first["source_identity"] == spiffe(&ns, "client") && first["status"] == 200,
        "the Job's first request did not arrive over mTLS from its proxy: {first}"
    );

    // And for a Deployment's pod: the proxy started before the app, and on deletion the
    // app stops first (the proxy is still running when the app has exited).
    let proxy = status(&web_pod, "weft-proxy")?;
    let app = status(&web_pod, "main")?;
    let (proxy_started, app_started) = (
        seconds(&proxy["state"]["running"]["startedAt"])?,
        seconds(&app["state"]["running"]["startedAt"])?,
    );
    ensure!(
        proxy_started <= app_started,
        "web: proxy started {proxy_started}, app {app_started}"
    );
    Ok(())
}

/// 3. Two meshed pods talk over mutual TLS with their ServiceAccounts' identities, seen in
///    the server proxy's metrics (through the API server's pod proxy) and both proxies'
///    access logs; a client annotated `weft.dev/mesh-http1: sessions` reaches the same
///    server in a `weft-http1` session rather than on the mux; a client in a namespace
///    without injection reaches the same server in plain text.
pub fn mtls_between_pods_with_their_identities(ctx: &Ctx) -> anyhow::Result<()> {
    let kube = &ctx.kube;
    let ns = ctx.namespace("mtls", true)?;
    let plain_ns = ctx.namespace("plain", false)?;
    kube.apply(&web(&ns))?;
    kube.apply(&client(&ns, "client", "client", ""))?;
    kube.apply(&client(
        &ns,
        "sessions",
        "client",
        "\n    weft.dev/mesh-http1: sessions",
    ))?;
    kube.apply(&client(&plain_ns, "outsider", "outsider", ""))?;
    kube.wait_ready(&ns, "app=web", READY)?;
    kube.wait_ready(&ns, "app=client", READY)?;
    kube.wait_ready(&ns, "app=sessions", READY)?;
    kube.wait_ready(&plain_ns, "app=outsider", READY)?;
    let outsider = one_pod(kube, &plain_ns, "app=outsider")?;
    ensure!(
        init_names(&outsider).is_empty(),
        "a pod in a namespace without injection got {:?}",
        init_names(&outsider)
    );
    let web_pod = kube.pod_names(&ns, "app=web")?.remove(0);

    // Inbound mTLS sessions web's proxy has accepted, all or of one `protocol`.
    let sessions_of = |kube: &Kube, protocol: Option<&str>| -> anyhow::Result<f64> {
        let text = kube.proxy_admin(&ns, &web_pod, "/metrics")?;
        let mut labels = vec![("direction", "inbound")];
        labels.extend(protocol.map(|p| ("protocol", p)));
        Ok(metric(&text, "weft_tls_sessions_total", &labels))
    };
    let sessions = |kube: &Kube| sessions_of(kube, None);
    let before = sessions_of(kube, Some("mux"))?;
    let answer = kube.http_get(&ns, "client", "web", 80, "/mtls-check")?;
    ensure!(answer.contains("404") || answer.contains("200"), "{answer}");
    let answer = kube.http_get(&ns, "client", "web", 80, "/")?;
    ensure!(
        answer.contains("200 OK") && answer.contains("hello-from-web"),
        "client → web: {answer}"
    );
    let after = sessions_of(kube, Some("mux"))?;
    ensure!(
        after > before,
        "web's proxy counted no new inbound mTLS mux session ({before} → {after})"
    );

    // The annotated client's HTTP/1 takes a `weft-http1` session of its own.
    let sessions_pod = one_pod(kube, &ns, "app=sessions")?;
    let transport = proxy_env(&sessions_pod["spec"], "WEFT_MESH_HTTP1");
    ensure!(
        transport == Some("sessions"),
        "the annotated pod's proxy got WEFT_MESH_HTTP1 {transport:?}"
    );
    let (mux_before, http1_before) = (
        sessions_of(kube, Some("mux"))?,
        sessions_of(kube, Some("http1"))?,
    );
    let answer = kube.http_get(&ns, "sessions", "web", 80, "/sessions-check")?;
    ensure!(answer.contains("HTTP/1.1 404"), "sessions → web: {answer}");
    let (mux_after, http1_after) = (
        sessions_of(kube, Some("mux"))?,
        sessions_of(kube, Some("http1"))?,
    );
    ensure!(
        http1_after > http1_before && mux_after == mux_before,
        "the annotated client's request: http1 sessions {http1_before} → {http1_after}, \
         mux sessions {mux_before} → {mux_after}"
    );
    let line = kube.logged_request(&ns, &web_pod, "/sessions-check", None)?;
    ensure!(
        line["source_identity"] == spiffe(&ns, "client"),
        "web saw the annotated client as {}",
        line["source_identity"]
    );

    // Each side knows the other's identity.
    let line = kube.logged_request(&ns, &web_pod, "/mtls-check", Some("inbound"))?;
    ensure!(
        line["source_identity"] == spiffe(&ns, "client"),
        "web saw the client as {}",
        line["source_identity"]
    );
    let line = kube.logged_request(&ns, "client", "/mtls-check", Some("outbound"))?;
    ensure!(
        line["destination_identity"] == spiffe(&ns, "web"),
        "the client expected web as {}",
        line["destination_identity"]
    );

    // A client outside the mesh: plain text, no identity, no TLS session.
    let before = sessions(kube)?;
    let answer = kube.http_get(
        &plain_ns,
        "outsider",
        &format!("web.{ns}.svc.cluster.local"),
        80,
        "/plain-check",
    )?;
    ensure!(answer.contains("HTTP/1.1 404"), "outsider → web: {answer}");
    let after = sessions(kube)?;
    ensure!(
        after == before,
        "a plain-text client counted as an mTLS session ({before} → {after})"
    );
    let line = kube.logged_request(&ns, &web_pod, "/plain-check", None)?;
    ensure!(
        line["source_identity"].is_null(),
        "a plain-text client had an identity: {line}"
    );
    Ok(())
}

/// 4. A pod annotated `weft.dev/inject: disabled` in an injected namespace runs without
///    the proxy, and its requests reach meshed pods in plain text; a meshed pod's port
///    that `weft.dev/skip-inbound-ports` leaves to its application is reached in plain
///    text by meshed clients.
pub fn a_pod_annotated_disabled_bypasses_the_mesh(ctx: &Ctx) -> anyhow::Result<()> {
    let kube = &ctx.kube;
    let ns = ctx.namespace("optout", true)?;
    kube.apply(&web(&ns))?;
    kube.apply(&client(
        &ns,
        "bypass",
        "bypass",
        "\n    weft.dev/inject: disabled",
    ))?;
    kube.wait_ready(&ns, "app=web", READY)?;
    kube.wait_ready(&ns, "app=bypass", READY)?;
    let pod = one_pod(kube, &ns, "app=bypass")?;
    ensure!(
        init_names(&pod).is_empty()
            && pod["spec"]["containers"].as_array().map(Vec::len) == Some(1),
        "the opted-out pod was injected: {}",
        pod["spec"]
    );
    ensure!(
        pod["metadata"]["labels"]["weft.dev/meshed"].is_null(),
        "the opted-out pod is labelled meshed"
    );
    let answer = kube.http_get(&ns, "bypass", "web", 80, "/bypass-check")?;
    ensure!(answer.contains("HTTP/1.1 404"), "bypass → web: {answer}");
    let web_pod = kube.pod_names(&ns, "app=web")?.remove(0);
    let line = kube.logged_request(&ns, &web_pod, "/bypass-check", None)?;
    ensure!(
        line["source_identity"].is_null() && line["direction"] == "inbound",
        "the opted-out pod's request arrived with an identity: {line}"
    );

    // A meshed pod whose application answers a port itself (skip-inbound-ports): a meshed
    // client's proxy must reach it in plain text, as no proxy there speaks mutual TLS.
    kube.apply(&format!(
        r#"{sa}---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: skipper
  namespace: {ns}
spec:
  replicas: 1
  selector:
    matchLabels: {{app: skipper}}
  template:
{template}---
{service}"#,
        sa = service_account(&ns, "skipper"),
        template = httpd_template("app: skipper", "skipper", "hello-from-skipper").replace(
            "weft.dev/access-log: json",
            "weft.dev/access-log: json\n        weft.dev/skip-inbound-ports: \"8080\"",
        ),
        service = service_manifest(&ns, "skipper", "app: skipper"),
    ))?;
    kube.apply(&client(&ns, "caller", "caller", ""))?;
    kube.wait_ready(&ns, "app=skipper", READY)?;
    kube.wait_ready(&ns, "app=caller", READY)?;
    assert_injected(&one_pod(kube, &ns, "app=skipper")?)?;
    let answer = kube.http_get(&ns, "caller", "skipper", 80, "/")?;
    ensure!(
        answer.contains("HTTP/1.1 200") && answer.contains("hello-from-skipper"),
        "meshed caller → skipper's skipped port: {answer}"
    );
    Ok(())
}

/// `kubectl-weft` (built beside this test) with the cluster's kubeconfig and the bed's
/// `kubectl` first on its `PATH` (it runs `kubectl port-forward`).
fn kubectl_weft(ctx: &Ctx) -> anyhow::Result<std::process::Command> {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| weft_e2e::demo::find_kubectl_weft(&exe))
        .context("kubectl-weft is not built beside this test: cargo build -p kubectl-weft")?;
    let path = std::env::join_paths(
        std::iter::once(ctx.node.testbed().binaries().dir().to_path_buf()).chain(
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
        ),
    )?;
    let mut cmd = std::process::Command::new(binary);
    cmd.env("KUBECONFIG", ctx.kube.kubeconfig())
        .env("PATH", path)
        .stdin(std::process::Stdio::null());
    Ok(cmd)
}

/// `kubectl weft tap`, through a real `kubectl port-forward` to each pod's proxy, shows
/// the same request live on both sides of a mutual TLS hop: the server's proxy (tapped as
/// `deploy/web`) names the client's identity, the client's proxy the endpoint and the
/// identity it verified. `kubectl weft top deploy/web` then counts three requests in one
/// row, with the client's identity.
pub fn kubectl_weft_tap_shows_live_requests_with_both_identities(ctx: &Ctx) -> anyhow::Result<()> {
    let kube = &ctx.kube;
    let ns = ctx.namespace("tap", true)?;
    kube.apply(&web(&ns))?;
    kube.apply(&client(&ns, "talker", "talker", ""))?;
    kube.wait_ready(&ns, "app=web", READY)?;
    kube.wait_ready(&ns, "app=talker", READY)?;
    let web_pod = one_pod(kube, &ns, "app=web")?["metadata"]["name"]
        .as_str()
        .context("web's pod has no name")?
        .to_owned();
    let tap = |pod: &str, direction: &str| -> anyhow::Result<std::process::Child> {
        let mut cmd = kubectl_weft(ctx)?;
        cmd.args(["tap", pod, "-n", &ns, "--direction", direction])
            .args([
                "--path",
                "/index.html",
                "--max",
                "1",
                "--for",
                "2m",
                "-o",
                "json",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        Ok(cmd.spawn()?)
    };
    // web by its Deployment (its pods listed through the API server), talker by name.
    let mut taps = [tap("deploy/web", "inbound")?, tap("talker", "outbound")?];
    // Requests until both taps have seen theirs (a request before a tap opened is not
    // shown); each takes about 2 s.
    let started = std::time::Instant::now();
    loop {
        let mut done = true;
        for t in &mut taps {
            done &= t.try_wait()?.is_some();
        }
        if done {
            break;
        }
        if started.elapsed() > Duration::from_secs(90) {
            for t in &mut taps {
                let _ = t.kill();
            }
            bail!("the taps did not each see a request within 90 s");
        }
        let answer = kube.http_get(&ns, "talker", "web", 80, "/index.html")?;
        ensure!(answer.contains("hello-from-web"), "talker → web: {answer}");
    }
    let [inbound, outbound] = taps.map(|t| t.wait_with_output());
    let (inbound, outbound) = (inbound?, outbound?);
    let lines = |out: &std::process::Output, side: &str| -> anyhow::Result<Vec<Value>> {
        ensure!(
            out.status.success(),
            "kubectl weft tap ({side}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        ensure!(
            lines.len() == 2 && lines[1]["tapEnd"]["why"] == "max",
            "kubectl weft tap ({side}): {lines:?}"
        );
        Ok(lines)
    };
    let (inbound, outbound) = (lines(&inbound, "inbound")?, lines(&outbound, "outbound")?);
    let (i, o) = (&inbound[0], &outbound[0]);
    ensure!(
        i["direction"] == "inbound"
            && i["pod"] == format!("{ns}/{web_pod}").as_str()
            && i["status"] == 200
            && i["path"] == "/index.html"
            && i["source_identity"] == spiffe(&ns, "talker").as_str(),
        "web's proxy: {i}"
    );
    ensure!(
        o["direction"] == "outbound"
            && o["status"] == 200
            && o["authority"]
                .as_str()
                .is_some_and(|a| a.starts_with("web"))
            && o["destination_identity"] == spiffe(&ns, "web").as_str(),
        "talker's proxy: {o}"
    );

    // `top deploy/web`: the requests counted over its window, through the same port-forward.
    let mut top = kubectl_weft(ctx)?
        .args(["top", "deploy/web", "-n", &ns, "--direction", "inbound"])
        .args(["--path", "/index.html", "--for", "25s", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut stderr = std::io::BufReader::new(top.stderr.take().context("top's stderr")?);
    let mut said = String::new();
    // Until its tap is open: a request before it would not be counted.
    while !said.contains("# tapping ") {
        if std::io::BufRead::read_line(&mut stderr, &mut said)? == 0 {
            let _ = top.kill();
            bail!("kubectl weft top ended before its tap opened: {said}");
        }
    }
    for _ in 0..3 {
        let answer = kube.http_get(&ns, "talker", "web", 80, "/index.html")?;
        ensure!(answer.contains("hello-from-web"), "talker → web: {answer}");
    }
    let out = top.wait_with_output()?;
    std::io::Read::read_to_string(&mut stderr, &mut said)?;
    ensure!(out.status.success(), "kubectl weft top: {said}");
    let table: Value = serde_json::from_slice(&out.stdout)?;
    let row = &table["rows"][0];
    ensure!(
        table["requests"] == 3
            && row["requests"] == 3
            && row["success_rate"] == 1.0
            && row["path"] == "/index.html"
            && row["peer"] == spiffe(&ns, "talker").as_str()
            && table["pods"][format!("{ns}/{web_pod}")]["why"] == "duration",
        "kubectl weft top: {table:#}"
    );
    Ok(())
}

/// `weft.dev/proxy-log-level` sets the filter a proxy starts with, and `kubectl weft
/// log-level` changes it while the pod runs, through a real `kubectl port-forward` to the
/// kubelet (the path the bed's process tests cannot take): the proxy's own log, read with
/// `kubectl logs`, shows the change and the `debug` lines it did not write before.
pub fn a_proxys_log_level_is_set_by_annotation_and_changed_by_kubectl_weft(
    ctx: &Ctx,
) -> anyhow::Result<()> {
    let kube = &ctx.kube;
    let ns = ctx.namespace("loglevel", true)?;
    kube.apply(&web(&ns))?;
    kube.apply(&client(
        &ns,
        "talker",
        "talker",
        "\n    weft.dev/proxy-log-level: warn",
    ))?;
    kube.wait_ready(&ns, "app=web", READY)?;
    kube.wait_ready(&ns, "app=talker", READY)?;
    let pod = one_pod(kube, &ns, "app=talker")?;
    ensure!(
        proxy_env(&pod["spec"], "WEFT_LOG") == Some("warn"),
        "the annotation did not set the proxy's filter: {}",
        pod["spec"]["initContainers"]
    );

    let log_level = |extra: &[&str]| -> anyhow::Result<String> {
        let out = kubectl_weft(ctx)?
            .args(["log-level", "talker", "-n", &ns])
            .args(extra)
            .output()?;
        ensure!(
            out.status.success(),
            "kubectl weft log-level {extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let shown = log_level(&[])?;
    ensure!(shown == format!("{ns}/talker: warn\n"), "shown: {shown:?}");
    let before = kube.logs(&ns, "talker", "weft-proxy")?;
    ensure!(
        !before.contains(" DEBUG "),
        "debug lines at warn:\n{before}"
    );

    let changed = log_level(&["warn,weft_proxy=debug"])?;
    ensure!(
        changed.starts_with(&format!("{ns}/talker: warn -> warn,weft_proxy=debug")),
        "changed: {changed:?}"
    );
    let answer = kube.http_get(&ns, "talker", "web", 80, "/")?;
    ensure!(answer.contains("hello-from-web"), "talker → web: {answer}");
    eventually(Duration::from_secs(20), || {
        let log = kube.logs(&ns, "talker", "weft-proxy")?;
        ensure!(
            log.contains("log filter changed") && log.contains(" DEBUG "),
            "no change or debug line in the proxy's log:\n{log}"
        );
        Ok(())
    })
}
