//! Traffic policy on real pods, with the demo application: `web-v1` and `web-v2`
//! Deployments behind `web` (and a Service each), and a client pod whose
//! `weft-demo-app load` sends through its proxy and counts what came back, by status and
//! by the server (`x-demo-server`) and pod (`x-demo-pod`) that answered.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    process::Child,
    time::Duration,
};

use anyhow::{Context, bail, ensure};
use serde_json::Value;

use crate::{
    Ctx,
    basic::{READY, service_account},
    install::image_ref,
    kube::{Kube, eventually, metric},
};

/// A Deployment `name` of the demo app serving as `name`, labelled `app: <app>` and
/// `version: <name>`, run as ServiceAccount `sa`.
pub fn demo_deployment(ns: &str, name: &str, app: &str, sa: &str, replicas: u32) -> String {
    let image = image_ref("weft-demo-app");
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: {ns}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: {app}, version: {name}}}
  template:
    metadata:
      labels: {{app: {app}, version: {name}}}
    spec:
      serviceAccountName: {sa}
      terminationGracePeriodSeconds: 5
      containers:
      - name: app
        image: {image}
        imagePullPolicy: Never
        args: ["serve", "--listen", "0.0.0.0:8080", "--name", "{name}"]
        ports:
        - containerPort: 8080
        readinessProbe:
          httpGet: {{path: /healthz, port: 8080}}
          periodSeconds: 1
---
"#
    )
}

/// A Service `name` on port 80 to port 8080 of the pods matching `selector`.
fn service(ns: &str, name: &str, selector: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {ns}
spec:
  selector: {{{selector}}}
  ports:
  - name: http
    port: 80
    targetPort: 8080
---
"#
    )
}

/// The demo: `web-v1` (×`v1`) and `web-v2` (×`v2`) as ServiceAccount `web`, Services
/// `web` (both), `web-v1` and `web-v2`, and one client Deployment per ServiceAccount in
/// `clients` (named after it, label `app: <sa>`); waits until every pod is Ready.
pub fn deploy_demo(
    kube: &Kube,
    ns: &str,
    v1: u32,
    v2: u32,
    clients: &[&str],
) -> anyhow::Result<()> {
    let mut yaml = service_account(ns, "web");
    yaml.push_str("---\n");
    yaml.push_str(&demo_deployment(ns, "web-v1", "web", "web", v1));
    if v2 > 0 {
        yaml.push_str(&demo_deployment(ns, "web-v2", "web", "web", v2));
    }
    yaml.push_str(&service(ns, "web", "app: web"));
    yaml.push_str(&service(ns, "web-v1", "app: web, version: web-v1"));
    yaml.push_str(&service(ns, "web-v2", "app: web, version: web-v2"));
    for sa in clients {
        yaml.push_str(&service_account(ns, sa));
        yaml.push_str("---\n");
        yaml.push_str(&demo_deployment(ns, sa, sa, sa, 1));
    }
    kube.apply(&yaml)?;
    kube.wait_ready(ns, "app=web", READY)?;
    for sa in clients {
        kube.wait_ready(ns, &format!("app={sa}"), READY)?;
    }
    Ok(())
}

/// What one `weft-demo-app load` run counted (its final line's totals).
#[derive(Debug)]
pub struct Load {
    /// Requests sent.
    pub sent: u64,
    /// Requests answered 2xx.
    pub ok: u64,
    /// Answers by status code.
    pub status: BTreeMap<String, u64>,
    /// Requests that got no answer, by kind.
    pub errors: BTreeMap<String, u64>,
    /// Answers by `x-demo-server`.
    pub servers: BTreeMap<String, u64>,
    /// Answers by `x-demo-pod`.
    pub pods: BTreeMap<String, u64>,
    /// Proxy answers by `weft-error` code.
    pub weft_errors: BTreeMap<String, u64>,
}

impl Load {
    /// The totals of a final (or report) line.
    fn parse(line: &Value) -> anyhow::Result<Self> {
        let t = if line["total"].is_object() {
            &line["total"]
        } else {
            line
        };
        let map = |v: &Value| -> BTreeMap<String, u64> {
            v.as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| v.as_u64().map(|n| (k.clone(), n)))
                .collect()
        };
        Ok(Load {
            sent: t["sent"]
                .as_u64()
                .with_context(|| format!("no sent in {line}"))?,
            ok: t["ok"]
                .as_u64()
                .with_context(|| format!("no ok in {line}"))?,
            status: map(&t["status"]),
            errors: map(&t["errors"]),
            servers: map(&t["servers"]),
            pods: map(&t["pods"]),
            weft_errors: map(&t["weft_errors"]),
        })
    }

    /// Answers from `server`.
    pub fn from(&self, server: &str) -> u64 {
        self.servers.get(server).copied().unwrap_or(0)
    }

    /// Requests without an answer.
    pub fn unanswered(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// The final line among `weft-demo-app load`'s stdout.
fn final_line(stdout: &str) -> anyhow::Result<Load> {
    let line = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["type"] == "final")
        .with_context(|| format!("load printed no final line:\n{stdout}"))?;
    Load::parse(&line)
}

/// The first pod of Deployment `client` (label `app: <client>`).
fn client_pod(kube: &Kube, ns: &str, client: &str) -> anyhow::Result<String> {
    kube.pod_names(ns, &format!("app={client}"))?
        .into_iter()
        .next()
        .with_context(|| format!("no {client} pod"))
}

/// Runs `weft-demo-app load --target <target> <args>` in `client`'s pod and returns its
/// totals, whatever its exit status (1 when an answer was not 2xx).
pub fn load(
    kube: &Kube,
    ns: &str,
    client: &str,
    target: &str,
    args: &[&str],
) -> anyhow::Result<Load> {
    let pod = client_pod(kube, ns, client)?;
    let mut all = vec![
        "-n",
        ns,
        "exec",
        &pod,
        "-c",
        "app",
        "--",
        "weft-demo-app",
        "load",
        "--target",
        target,
    ];
    all.extend(args);
    let out = kube.output(&all)?;
    final_line(&String::from_utf8_lossy(&out.stdout)).with_context(|| {
        format!(
            "kubectl exec load ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A `load` running in the background (`kubectl exec` of it).
pub struct Background {
    child: Child,
}

impl Background {
    /// Starts `weft-demo-app load --target <target> <args>` in `client`'s pod.
    pub fn start(
        ctx: &Ctx,
        ns: &str,
        client: &str,
        target: &str,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let pod = client_pod(&ctx.kube, ns, client)?;
        let mut all = vec![
            "-n",
            ns,
            "exec",
            &pod,
            "-c",
            "app",
            "--",
            "weft-demo-app",
            "load",
            "--target",
            target,
        ];
        all.extend(args);
        let stderr = std::fs::File::create(
            ctx.node
                .testbed()
                .dir()
                .join(format!("load-{ns}-{client}.log")),
        )?;
        Ok(Background {
            child: ctx.kube.spawn(&all, stderr)?,
        })
    }

    /// Waits for the run to end (it must have been given `--count` or `--duration`) and
    /// returns its totals.
    pub fn finish(mut self) -> anyhow::Result<Load> {
        let stdout = self.child.stdout.take().context("load stdout")?;
        let mut text = String::new();
        for line in BufReader::new(stdout).lines() {
            text.push_str(&line?);
            text.push('\n');
        }
        let _ = self.child.wait();
        final_line(&text)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the operator reports `kind/name` Programmed for its current generation by
/// at least one connected proxy (operators before the `NoProxies` reason also said
/// Programmed, vacuously, when no connected proxy needed the resource).
pub fn wait_programmed(kube: &Kube, ns: &str, what: &str) -> anyhow::Result<()> {
    eventually(Duration::from_secs(60), || {
        let obj = kube.json(&["-n", ns, "get", what])?;
        let generation = &obj["metadata"]["generation"];
        let st = &obj["status"];
        let programmed = st["conditions"].as_array().into_iter().flatten().any(|c| {
            c["type"] == "Programmed"
                && c["status"] == "True"
                && c["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("acknowledged by"))
        });
        if st["observedGeneration"] == *generation && programmed {
            Ok(())
        } else {
            bail!("{what} is not Programmed at generation {generation}: {st}")
        }
    })
}

/// A Route of `web` (port 80) sending `v1`:`v2` to web-v1 and web-v2, with `extra` YAML
/// appended to its one rule.
pub fn split_route(ns: &str, v1: u32, v2: u32, extra: &str) -> String {
    format!(
        r#"apiVersion: weft.dev/v1alpha1
kind: Route
metadata:
  name: web
  namespace: {ns}
spec:
  service:
    name: web
    port: 80
  rules:
  - name: split
    backends:
    - name: web-v1
      port: 80
      weight: {v1}
    - name: web-v2
      port: 80
      weight: {v2}
{extra}"#
    )
}

/// The share of `load`'s answers that came from web-v2.
fn v2_share(load: &Load) -> f64 {
    load.from("web-v2") as f64 / load.sent.max(1) as f64
}

/// A `load` run that must have got a 2xx for every request.
fn all_ok(load: &Load, what: &str) -> anyhow::Result<()> {
    ensure!(
        load.sent > 0 && load.ok == load.sent && load.unanswered() == 0,
        "{what}: {} of {} answered 2xx: {load:?}",
        load.ok,
        load.sent
    );
    Ok(())
}

/// 5a. A Route splits 90/10, then 50/50, and the answers follow within tolerance.
pub fn a_route_splits_within_tolerance(ctx: &Ctx) -> anyhow::Result<()> {
    let kube = &ctx.kube;
    let ns = ctx.namespace("split", true)?;
    deploy_demo(kube, &ns, 1, 1, &["client"])?;
    // 400 requests: the web-v2 count is binomial, σ = 1.5 points at 10 %, 2.5 at 50 %;
    // the tolerances below are over 3 σ.
    let run = |kube: &Kube| {
        load(
            kube,
            &ns,
            "client",
            "http://web/split",
            &["--count", "400", "--rps", "80"],
        )
    };

    kube.apply(&split_route(&ns, 90, 10, ""))?;
    wait_programmed(kube, &ns, "route/web")?;
    let l = run(kube)?;
    all_ok(&l, "90/10")?;
    ensure!(
        l.from("web-v1") + l.from("web-v2") == l.sent,
        "answers from neither web-v1 nor web-v2: {l:?}"
    );
    let share = v2_share(&l);
    tracing::info!(sent = l.sent, web_v2 = l.from("web-v2"), "90/10");
    ensure!(
        (0.05..=0.15).contains(&share),
        "90/10 split sent {:.1} % to web-v2: {l:?}",
        share * 100.0
    );

    kube.apply(&split_route(&ns, 50, 50, ""))?;
    wait_programmed(kube, &ns, "route/web")?;
    let l = run(kube)?;
    all_ok(&l, "50/50")?;
    let share = v2_share(&l);
    tracing::info!(sent = l.sent, web_v2 = l.from("web-v2"), "50/50");
    ensure!(
        (0.40..=0.60).contains(&share),
        "50/50 split sent {:.1} % to web-v2: {l:?}",
        share * 100.0
    );
    Ok(())
}

/// Makes the one pod of `deploy` answer 500 to everything but probes.
fn make_fail(kube: &Kube, ns: &str, deploy: &str) -> anyhow::Result<String> {
    let pods = kube.pod_names(ns, &format!("version={deploy}"))?;
    let [pod] = pods.as_slice() else {
        bail!("{deploy} has {} pods, expected one", pods.len());
    };
    kube.exec(ns, pod, "app", &["weft-demo-app", "fail"])?;
    Ok(pod.clone())
}

/// The client proxy's metrics.
fn client_metrics(kube: &Kube, ns: &str, client: &str) -> anyhow::Result<String> {
    let pod = client_pod(kube, ns, client)?;
    kube.proxy_admin(ns, &pod, "/metrics")
}

/// 5b. With one of web's two pods failing, a Route's retries hide the failures: without
///     them some requests get 500; with them every request gets a 2xx, and the client's
///     proxy counted the retries it made.
pub fn retries_hide_a_failing_pod(ctx: &Ctx) -> anyhow::Result<()> {
    let kube = &ctx.kube;
    let ns = ctx.namespace("retry", true)?;
    deploy_demo(kube, &ns, 1, 1, &["client"])?;
    make_fail(kube, &ns, "web-v2")?;
    // Long enough runs for the balancer to try the failing pod several times: P2C
    // prefers the endpoint with the lower latency estimate, and the failing one is
    // tried again only as its estimate decays (10 s time constant).
    let args = ["--duration", "20s", "--rps", "20"];

    // No Route: the failing pod's 500s reach the client.
    let l = load(kube, &ns, "client", "http://web/retry", &args)?;
    let leaked = l.status.get("500").copied().unwrap_or(0);
    ensure!(
        leaked > 0,
        "the failing pod's errors did not show without retries: {l:?}"
    );
    tracing::info!(sent = l.sent, errors = leaked, "without retries");

    let route = format!(
        r#"apiVersion: weft.dev/v1alpha1
kind: Route
metadata:
  name: web
  namespace: {ns}
spec:
  service:
    name: web
    port: 80
  rules:
  - name: retry
    backends:
    - name: web
      port: 80
    retries:
      attempts: 2
      retryOn: [5xx]
      budget:
        percent: 100
        minRetriesPerSecond: 100
"#
    );
    kube.apply(&route)?;
    wait_programmed(kube, &ns, "route/web")?;
    let before = metric(
        &client_metrics(kube, &ns, "client")?,
        "weft_route_events_total",
        &[("event", "retry")],
    );
    let l = load(kube, &ns, "client", "http://web/retry", &args)?;
    all_ok(&l, "with retries")?;
    let after = metric(
        &client_metrics(kube, &ns, "client")?,
        "weft_route_events_total",
        &[("event", "retry")],
    );
    ensure!(
        after > before,
        "every request succeeded but the client's proxy counted no retry ({before} → {after})"
    );
    tracing::info!(
        sent = l.sent,
        retries = after - before,
        "with retries: every request 2xx"
    );
    Ok(())
}

/// 5c. A Breaker ejects web's failing pod after consecutive 5xx: from then on every
///     request goes to the healthy pod and gets a 2xx, for longer than the balancer
///     alone would keep away from the failing pod.
pub fn a_breaker_ejects_a_failing_pod(ctx: &Ctx) -> anyhow::Result<()> {
    let kube = &ctx.kube;
    let ns = ctx.namespace("breaker", true)?;
    deploy_demo(kube, &ns, 1, 1, &["client"])?;
    kube.apply(&format!(
        r#"apiVersion: weft.dev/v1alpha1
kind: Breaker
metadata:
  name: web
  namespace: {ns}
spec:
  service:
    name: web
    port: 80
  outlierDetection:
    consecutive5xx: 3
    interval: 10s
    baseEjectionTime: 5m
    maxEjectionTime: 10m
    maxEjectedPercent: 50
"#
    ))?;
    wait_programmed(kube, &ns, "breaker/web")?;
    let failing = make_fail(kube, &ns, "web-v2")?;

    // Traffic until the failing pod has answered 500 three times in a row. The balancer
    // (P2C over latency) tries it only now and then, so this takes a few seconds.
    let started = std::time::Instant::now();
    let mut errors = 0;
    eventually(Duration::from_secs(90), || {
        let l = load(
            kube,
            &ns,
            "client",
            "http://web/breaker",
            &["--duration", "5s", "--rps", "20"],
        )?;
        errors += l.status.get("500").copied().unwrap_or(0);
        let text = client_metrics(kube, &ns, "client")?;
        ensure!(
            metric(&text, "weft_breaker_ejections_total", &[]) >= 1.0
                && metric(&text, "weft_breaker_ejected_endpoints", &[]) == 1.0,
            "no ejection yet ({errors} errors so far)"
        );
        Ok(())
    })?;
    ensure!(
        errors >= 3,
        "ejected after only {errors} 500s (threshold 3)"
    );
    tracing::info!(errors, elapsed = ?started.elapsed(), "failing pod ejected");
    // Ejected for 5 minutes: 20 s of traffic all to web-v1, all 2xx. Without the
    // ejection the balancer would have tried the failing pod again within that time.
    let l = load(
        kube,
        &ns,
        "client",
        "http://web/breaker",
        &["--duration", "20s", "--rps", "20"],
    )?;
    all_ok(&l, "after the ejection")?;
    ensure!(
        !l.pods.contains_key(&failing) && l.from("web-v1") == l.sent,
        "the ejected pod {failing} still got requests: {l:?}"
    );
    Ok(())
}

/// The Policy of the policy scenarios: web admits ServiceAccount `client` for GETs under
/// `/allowed`, denies the rest; `probes` adds what keeps the kubelet's HTTP probes passing
/// today (plain text admitted, unauthenticated GETs of `/healthz` allowed).
fn web_policy(ns: &str, probes: bool) -> String {
    let (mode, probe_rule) = if probes {
        (
            "Permissive",
            "\n  - action: Allow\n    from:\n    - unauthenticated: true\n    to:\n    - methods: [GET]\n      paths:\n      - exact: /healthz",
        )
    } else {
        ("Strict", "")
    };
    format!(
        r#"apiVersion: weft.dev/v1alpha1
kind: Policy
metadata:
  name: web
  namespace: {ns}
spec:
  target:
    service: web
  mtls:
    mode: {mode}
  defaultAction: Deny
  rules:
  - action: Allow
    from:
    - serviceAccounts:
      - name: client
    to:
    - methods: [GET]
      paths:
      - prefix: /allowed{probe_rule}
"#
    )
}

/// 5d. A Policy on web allows ServiceAccount `client` to GET under `/allowed` and denies
///     everything else: the client's other paths and another ServiceAccount get 403 with
///     `weft-error: forbidden`, and web's proxy counts the denials. (The Policy also
///     admits the kubelet's probes explicitly: see `policy_keeps_probes_passing`.)
pub fn a_policy_denies_and_allows_as_written(ctx: &Ctx) -> anyhow::Result<()> {
    let kube = &ctx.kube;
    let ns = ctx.namespace("policy", true)?;
    deploy_demo(kube, &ns, 1, 0, &["client", "intruder"])?;
    let args = ["--count", "20", "--rps", "20"];
    // Before the Policy both may call.
    all_ok(
        &load(kube, &ns, "intruder", "http://web/allowed/x", &args)?,
        "intruder, no Policy",
    )?;

    kube.apply(&web_policy(&ns, true))?;
    wait_programmed(kube, &ns, "policy/web")?;

    let l = load(kube, &ns, "client", "http://web/allowed/x", &args)?;
    all_ok(&l, "client GET /allowed/x")?;
    let denied = |l: &Load, what: &str| -> anyhow::Result<()> {
        ensure!(
            l.status.get("403").copied() == Some(l.sent)
                && l.weft_errors.get("forbidden").copied() == Some(l.sent),
            "{what}: expected every request refused 403 forbidden: {l:?}"
        );
        Ok(())
    };
    denied(
        &load(kube, &ns, "client", "http://web/other", &args)?,
        "client GET /other",
    )?;
    denied(
        &load(kube, &ns, "intruder", "http://web/allowed/x", &args)?,
        "intruder GET /allowed/x",
    )?;

    let web = kube.pod_names(&ns, "app=web")?.remove(0);
    let text = kube.proxy_admin(&ns, &web, "/metrics")?;
    let denials = metric(&text, "weft_authz_denials_total", &[]);
    ensure!(
        denials >= 40.0,
        "web's proxy counted {denials} denials, expected at least 40"
    );
    // The pod stayed in service throughout.
    kube.wait_ready(&ns, "app=web", Duration::from_secs(1))?;
    Ok(())
}

/// 5e. A Policy written as a user writes it (default Strict mTLS, deny by default, one
///     allow rule for a client) leaves the protected pods Ready: the kubelet's HTTP
///     readiness probes, plain text from the node, still pass, as they do under Linkerd's
///     and Istio's policies.
pub fn a_policy_keeps_the_kubelets_probes_passing(ctx: &Ctx) -> anyhow::Result<()> {
    let kube = &ctx.kube;
    let ns = ctx.namespace("probes", true)?;
    deploy_demo(kube, &ns, 1, 0, &["client"])?;
    kube.apply(&web_policy(&ns, false))?;
    wait_programmed(kube, &ns, "policy/web")?;
    // Readiness probes run every second and fail after 3; give them 10 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        kube.wait_ready(&ns, "app=web", Duration::from_secs(0))
            .with_context(|| {
                let events = kube
                    .run(&[
                        "-n",
                        &ns,
                        "get",
                        "events",
                        "--field-selector",
                        "reason=Unhealthy",
                    ])
                    .unwrap_or_default();
                format!("web went unready under the Policy:\n{events}")
            })?;
        std::thread::sleep(Duration::from_secs(1));
    }
    let l = load(
        kube,
        &ns,
        "client",
        "http://web/allowed/x",
        &["--count", "20", "--rps", "20"],
    )?;
    all_ok(&l, "client GET /allowed/x")
}

/// 6. A rolling update of web under constant load loses no request: every request the
///    load generator sent during the rollout got a 2xx, and both old and new pods
///    answered.
pub fn a_rolling_update_under_load_loses_no_request(ctx: &Ctx) -> anyhow::Result<()> {
    let kube = &ctx.kube;
    let ns = ctx.namespace("rollout", true)?;
    deploy_demo(kube, &ns, 2, 0, &["client"])?;
    let old: Vec<String> = kube.pod_names(&ns, "app=web")?;
    let bg = Background::start(
        ctx,
        &ns,
        "client",
        "http://web/rollout",
        &["--duration", "45s", "--rps", "20"],
    )?;
    std::thread::sleep(Duration::from_secs(5));
    kube.run(&["-n", &ns, "rollout", "restart", "deploy/web-v1"])?;
    kube.rollout(&ns, "deploy/web-v1", Duration::from_secs(120))?;
    let new: Vec<String> = kube
        .pod_names(&ns, "app=web")?
        .into_iter()
        .filter(|p| !old.contains(p))
        .collect();
    let l = bg.finish()?;
    tracing::info!(sent = l.sent, ok = l.ok, "load through the rolling update");
    ensure!(
        l.sent >= 800,
        "the load sent only {} requests: {l:?}",
        l.sent
    );
    all_ok(&l, "during the rolling update")?;
    ensure!(
        old.iter().any(|p| l.pods.contains_key(p)) && new.iter().any(|p| l.pods.contains_key(p)),
        "the load did not span the update (old {old:?}, new {new:?}): {l:?}"
    );
    Ok(())
}
