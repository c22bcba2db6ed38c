//! Traffic policy on real pods, with the demo application: `web-v1` and `web-v2`
//! Deployments behind `web` (and a Service each), and a client pod whose
//! `weft-demo-app load` sends through its proxy and counts what came back, by status and
//! by the server (`x-demo-server`) and pod (`x-demo-pod`) that answered: its report lines
//! are read with `weft_e2e::demo::LoadReport`, as the demo reads them.

use std::{
    io::{BufRead, BufReader},
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use weft_e2e::{
    demo::{LoadReport, Split},
    mesh::service_manifest,
};

use crate::{
    Ctx,
    basic::{READY, service_account},
    install::image_ref,
    kube::{ADMIN_PORT, Kube, eventually, is_ready, metric, proxy_env},
};

/// How the demo app's pods tell the kubelet they are ready (every second).
#[derive(Clone, Copy, Debug)]
pub enum Readiness {
    /// `httpGet: {path: /healthz, port: 8080}`: passes whenever the server runs.
    Http,
    /// `grpc: {port: 8081}` to `serve --grpc-health-listen` (SERVING, NOT_SERVING while
    /// `weft-demo-app fail`ing), unready after 2 failures.
    Grpc {
        /// `false`: the pod is annotated `weft.dev/rewrite-probes: "false"`, so the
        /// kubelet calls the app's port itself, through the inbound listener.
        rewrite: bool,
    },
    /// `tcpSocket: {port: 8082}` to `serve --tcp-listen` (an echo port, closed while
    /// `weft-demo-app fail`ing), unready after 2 failures.
    Tcp {
        /// `false`: annotated `weft.dev/rewrite-probes: "false"`, as for [`Readiness::Grpc`].
        rewrite: bool,
    },
}

/// The demo app's gRPC health port under [`Readiness::Grpc`].
pub const GRPC_HEALTH_PORT: u16 = 8081;

/// The demo app's TCP echo port under [`Readiness::Tcp`].
pub const TCP_PORT: u16 = 8082;

/// A readiness probe of a port `serve` opens only when asked (gRPC and TCP).
struct PortProbe {
    /// `serve`'s flag opening the port.
    flag: &'static str,
    port: u16,
    /// The probe's handler as Kubernetes and `WEFT_APP_PROBES` name it.
    handler: &'static str,
    /// `false`: the pod opts out of the probe rewrite.
    rewrite: bool,
}

impl Readiness {
    /// The port probe this readiness uses, `None` for the HTTP one on the server's port.
    fn port_probe(self) -> Option<PortProbe> {
        let (flag, port, handler, rewrite) = match self {
            Readiness::Http => return None,
            Readiness::Grpc { rewrite } => {
                ("--grpc-health-listen", GRPC_HEALTH_PORT, "grpc", rewrite)
            }
            Readiness::Tcp { rewrite } => ("--tcp-listen", TCP_PORT, "tcpSocket", rewrite),
        };
        Some(PortProbe {
            flag,
            port,
            handler,
            rewrite,
        })
    }
}

/// A Deployment `name` of the demo app serving as `name`, labelled `app: <app>` and
/// `version: <name>`, run as ServiceAccount `sa`, with an HTTP readiness probe.
pub fn demo_deployment(ns: &str, name: &str, app: &str, sa: &str, replicas: u32) -> String {
    demo_deployment_probed(ns, name, app, sa, replicas, Readiness::Http)
}

/// [`demo_deployment`] with the readiness probe `readiness`.
pub fn demo_deployment_probed(
    ns: &str,
    name: &str,
    app: &str,
    sa: &str,
    replicas: u32,
    readiness: Readiness,
) -> String {
    let image = image_ref("weft-demo-app");
    let (args, port, probe, annotations) = match readiness.port_probe() {
        None => (
            String::new(),
            String::new(),
            "httpGet: {path: /healthz, port: 8080}".to_owned(),
            "",
        ),
        Some(PortProbe {
            flag,
            port,
            handler,
            rewrite,
        }) => (
            format!(r#", "{flag}", "0.0.0.0:{port}""#),
            format!("\n        - containerPort: {port}"),
            format!("{handler}: {{port: {port}}}\n          failureThreshold: 2"),
            if rewrite {
                ""
            } else {
                "\n      annotations: {weft.dev/rewrite-probes: \"false\"}"
            },
        ),
    };
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
      labels: {{app: {app}, version: {name}}}{annotations}
    spec:
      serviceAccountName: {sa}
      terminationGracePeriodSeconds: 5
      containers:
      - name: app
        image: {image}
        imagePullPolicy: Never
        args: ["serve", "--listen", "0.0.0.0:8080", "--name", "{name}"{args}]
        ports:
        - containerPort: 8080{port}
        readinessProbe:
          {probe}
          periodSeconds: 1
---
"#
    )
}

/// The demo application in one scenario's namespace: what every traffic scenario does to
/// it (deploy, send load from a client's pod, apply a resource and wait for the proxies
/// to have it, make a pod fail, read a client's proxy's metrics).
pub struct Demo<'a> {
    /// kubectl for the node's cluster.
    pub kube: &'a Kube,
    /// The namespace the demo runs in.
    pub ns: String,
}

impl<'a> Demo<'a> {
    /// A new injected namespace `<prefix>-<random>` with the demo in it: `web-v1`
    /// (×`v1`) and `web-v2` (×`v2`) as ServiceAccount `web`, Services `web` (both),
    /// `web-v1` and `web-v2`, and one client Deployment per ServiceAccount in `clients`
    /// (see [`Demo::add_clients`]); returns once every pod is Ready.
    pub fn deploy(
        ctx: &'a Ctx,
        prefix: &str,
        v1: u32,
        v2: u32,
        clients: &[&str],
    ) -> anyhow::Result<Self> {
        Self::deploy_probed(ctx, prefix, v1, v2, clients, Readiness::Http)
    }

    /// [`Demo::deploy`] with web's pods probed for readiness as `readiness` says.
    pub fn deploy_probed(
        ctx: &'a Ctx,
        prefix: &str,
        v1: u32,
        v2: u32,
        clients: &[&str],
        readiness: Readiness,
    ) -> anyhow::Result<Self> {
        let demo = Demo::in_new_namespace(ctx, prefix, true)?;
        let ns = &demo.ns;
        let mut yaml = service_account(ns, "web");
        yaml.push_str("---\n");
        yaml.push_str(&demo_deployment_probed(
            ns, "web-v1", "web", "web", v1, readiness,
        ));
        if v2 > 0 {
            yaml.push_str(&demo_deployment_probed(
                ns, "web-v2", "web", "web", v2, readiness,
            ));
        }
        yaml.push_str(&service_manifest(ns, "web", "app: web"));
        yaml.push_str(&service_manifest(ns, "web-v1", "app: web, version: web-v1"));
        yaml.push_str(&service_manifest(ns, "web-v2", "app: web, version: web-v2"));
        demo.kube.apply(&yaml)?;
        demo.add_clients(clients)?;
        demo.kube.wait_ready(ns, "app=web", READY)?;
        Ok(demo)
    }

    /// A new namespace `<prefix>-<random>` (injected when `inject`) holding only the
    /// client Deployments of `clients`, Ready: clients of another namespace's `web`.
    pub fn clients_only(
        ctx: &'a Ctx,
        prefix: &str,
        inject: bool,
        clients: &[&str],
    ) -> anyhow::Result<Self> {
        let demo = Demo::in_new_namespace(ctx, prefix, inject)?;
        demo.add_clients(clients)?;
        Ok(demo)
    }

    /// Nothing deployed yet, in a new namespace `<prefix>-<random>` of the scenario.
    fn in_new_namespace(ctx: &'a Ctx, prefix: &str, inject: bool) -> anyhow::Result<Self> {
        Ok(Demo {
            kube: &ctx.kube,
            ns: ctx.namespace(prefix, inject)?,
        })
    }

    /// One client Deployment per ServiceAccount in `clients` (named after it, label
    /// `app: <sa>`, the demo app idling as a server); returns once they are Ready.
    pub fn add_clients(&self, clients: &[&str]) -> anyhow::Result<()> {
        if clients.is_empty() {
            return Ok(());
        }
        let mut yaml = String::new();
        for sa in clients {
            yaml.push_str(&service_account(&self.ns, sa));
            yaml.push_str("---\n");
            yaml.push_str(&demo_deployment(&self.ns, sa, sa, sa, 1));
        }
        self.kube.apply(&yaml)?;
        for sa in clients {
            self.kube
                .wait_ready(&self.ns, &format!("app={sa}"), READY)?;
        }
        Ok(())
    }

    /// The first pod of Deployment `client` (label `app: <client>`).
    fn client_pod(&self, client: &str) -> anyhow::Result<String> {
        self.kube
            .pod_names(&self.ns, &format!("app={client}"))?
            .into_iter()
            .next()
            .with_context(|| format!("no {client} pod in {}", self.ns))
    }

    /// `kubectl exec` of `weft-demo-app load --target <target> <args>` in `client`'s pod.
    fn load_command(
        &self,
        client: &str,
        target: &str,
        args: &[&str],
    ) -> anyhow::Result<Vec<String>> {
        let pod = self.client_pod(client)?;
        let mut all: Vec<String> = [
            "-n",
            &self.ns,
            "exec",
            &pod,
            "-c",
            "app",
            "--",
            "weft-demo-app",
            "load",
            "--target",
            target,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        all.extend(args.iter().map(|s| (*s).to_owned()));
        Ok(all)
    }

    /// Runs `weft-demo-app load --target <target> <args>` in `client`'s pod and returns
    /// the run's totals, whatever its exit status (1 when an answer was not 2xx).
    pub fn load(&self, client: &str, target: &str, args: &[&str]) -> anyhow::Result<LoadReport> {
        let command = self.load_command(client, target, args)?;
        let out = self
            .kube
            .output(&command.iter().map(String::as_str).collect::<Vec<_>>())?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        LoadReport::run_total(&stdout).with_context(|| {
            format!(
                "load printed no final line ({}):\n{stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Starts `weft-demo-app load --target <target> <args>` in `client`'s pod in the
    /// background (its stderr goes to the test bed's directory).
    pub fn start_load(
        &self,
        ctx: &Ctx,
        client: &str,
        target: &str,
        args: &[&str],
    ) -> anyhow::Result<Background> {
        let command = self.load_command(client, target, args)?;
        let stderr = std::fs::File::create(
            ctx.node
                .testbed()
                .dir()
                .join(format!("load-{}-{client}.log", self.ns)),
        )?;
        Ok(Background {
            child: self.kube.spawn(
                &command.iter().map(String::as_str).collect::<Vec<_>>(),
                stderr,
            )?,
        })
    }

    /// `kubectl apply` of `yaml`, then waits until the operator reports `what`
    /// (`route/web`) Programmed by a connected proxy: see [`wait_programmed`].
    pub fn apply_programmed(&self, yaml: &str, what: &str) -> anyhow::Result<()> {
        self.kube.apply(yaml)?;
        wait_programmed(self.kube, &self.ns, what)
    }

    /// Makes the one pod of `deploy` answer 500 to everything but probes; returns its name.
    pub fn make_fail(&self, deploy: &str) -> anyhow::Result<String> {
        let pods = self
            .kube
            .pod_names(&self.ns, &format!("version={deploy}"))?;
        let [pod] = pods.as_slice() else {
            bail!("{deploy} has {} pods, expected one", pods.len());
        };
        self.kube
            .exec(&self.ns, pod, "app", &["weft-demo-app", "fail"])?;
        Ok(pod.clone())
    }

    /// The metrics of `client`'s proxy.
    pub fn client_metrics(&self, client: &str) -> anyhow::Result<String> {
        let pod = self.client_pod(client)?;
        self.kube.proxy_admin(&self.ns, &pod, "/metrics")
    }
}

/// A `load` running in the background (`kubectl exec` of it).
pub struct Background {
    child: Child,
}

impl Background {
    /// Waits for the run to end (it must have been given `--count` or `--duration`) and
    /// returns its totals.
    pub fn finish(mut self) -> anyhow::Result<LoadReport> {
        let stdout = self.child.stdout.take().context("load stdout")?;
        let mut text = String::new();
        for line in BufReader::new(stdout).lines() {
            text.push_str(&line?);
            text.push('\n');
        }
        let _ = self.child.wait();
        LoadReport::run_total(&text).with_context(|| format!("load printed no final line:\n{text}"))
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
    for_web(
        "Route",
        ns,
        &format!(
            r#"  rules:
  - name: split
    backends:
    - name: web-v1
      port: 80
      weight: {v1}
    - name: web-v2
      port: 80
      weight: {v2}
{extra}"#
        ),
    )
}

/// A Weft resource of `kind` named `web` for Service `web` (port 80), the rest of its
/// spec `rest` (YAML indented by two spaces).
fn for_web(kind: &str, ns: &str, rest: &str) -> String {
    format!(
        r#"apiVersion: weft.dev/v1alpha1
kind: {kind}
metadata:
  name: web
  namespace: {ns}
spec:
  service:
    name: web
    port: 80
{rest}"#
    )
}

/// A `load` run that must have got a 2xx for every request.
pub fn all_ok(load: &LoadReport, what: &str) -> anyhow::Result<()> {
    ensure!(
        load.sent > 0 && load.ok == load.sent && load.unanswered() == 0,
        "{what}: {} of {} answered 2xx: {load:?}",
        load.ok,
        load.sent
    );
    Ok(())
}

/// A `load` run whose every request the proxy refused itself with `status` and
/// `weft-error: <code>`.
fn all_refused(load: &LoadReport, status: u16, code: &str, what: &str) -> anyhow::Result<()> {
    ensure!(
        load.sent > 0
            && load.status_count(status) == load.sent
            && load.weft_error_count(code) == load.sent,
        "{what}: expected every request refused {status} {code}: {load:?}"
    );
    Ok(())
}

/// 5a. A Route splits 90/10, then 50/50, and the answers follow within tolerance.
pub fn a_route_splits_within_tolerance(ctx: &Ctx) -> anyhow::Result<()> {
    let demo = Demo::deploy(ctx, "split", 1, 1, &["client"])?;
    // 400 requests: the web-v2 count is binomial, σ = 1.5 points at 10 %, 2.5 at 50 %;
    // the tolerances below are over 3 σ.
    for (v1, v2, tolerance) in [(90, 10, 0.05), (50, 50, 0.10)] {
        let what = format!("{v1}/{v2}");
        demo.apply_programmed(&split_route(&demo.ns, v1, v2, ""), "route/web")?;
        let l = demo.load(
            "client",
            "http://web/split",
            &["--count", "400", "--rps", "80"],
        )?;
        all_ok(&l, &what)?;
        ensure!(
            l.served_by("web-v1") + l.served_by("web-v2") == l.sent,
            "{what}: answers from neither web-v1 nor web-v2: {l:?}"
        );
        let split = Split::observe(&l, f64::from(v2) / 100.0, tolerance);
        tracing::info!(sent = l.sent, split = %split.describe(), "{what}");
        ensure!(
            split.within_tolerance(),
            "{what} split: {}: {l:?}",
            split.describe()
        );
    }
    Ok(())
}

/// 5b. With one of web's two pods failing, a Route's retries hide the failures: without
///     them some requests get 500; with them every request gets a 2xx, and the client's
///     proxy counted the retries it made.
pub fn retries_hide_a_failing_pod(ctx: &Ctx) -> anyhow::Result<()> {
    let demo = Demo::deploy(ctx, "retry", 1, 1, &["client"])?;
    demo.make_fail("web-v2")?;
    // Long enough runs for the balancer to try the failing pod several times: P2C
    // prefers the endpoint with the lower latency estimate, and the failing one is
    // tried again only as its estimate decays (10 s time constant).
    let args = ["--duration", "20s", "--rps", "20"];

    // No Route: the failing pod's 500s reach the client.
    let l = demo.load("client", "http://web/retry", &args)?;
    let leaked = l.status_count(500);
    ensure!(
        leaked > 0,
        "the failing pod's errors did not show without retries: {l:?}"
    );
    tracing::info!(sent = l.sent, errors = leaked, "without retries");

    let route = for_web(
        "Route",
        &demo.ns,
        r#"  rules:
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
"#,
    );
    demo.apply_programmed(&route, "route/web")?;
    let retries = || -> anyhow::Result<f64> {
        Ok(metric(
            &demo.client_metrics("client")?,
            "weft_route_events_total",
            &[("event", "retry")],
        ))
    };
    let before = retries()?;
    // Once the failing pod has failed, the balancer keeps away from it, so one run may
    // not try it at all (a CI run saw 0 retries in 400 requests). Up to three runs, each
    // of which must be all 2xx, until the proxy has retried at least once.
    let (mut after, mut sent) = (before, 0);
    for run in 1..=3 {
        let l = demo.load("client", "http://web/retry", &args)?;
        all_ok(&l, &format!("with retries, run {run}"))?;
        sent += l.sent;
        after = retries()?;
        if after > before {
            break;
        }
    }
    ensure!(
        after > before,
        "every request succeeded but in three runs the client's proxy counted no retry ({before} → {after})"
    );
    tracing::info!(
        sent,
        retries = after - before,
        "with retries: every request 2xx"
    );
    Ok(())
}

/// 5c. A Breaker ejects web's failing pod after consecutive 5xx: from then on every
///     request goes to the healthy pod and gets a 2xx, for longer than the balancer
///     alone would keep away from the failing pod.
pub fn a_breaker_ejects_a_failing_pod(ctx: &Ctx) -> anyhow::Result<()> {
    let demo = Demo::deploy(ctx, "breaker", 1, 1, &["client"])?;
    demo.apply_programmed(
        &for_web(
            "Breaker",
            &demo.ns,
            r#"  outlierDetection:
    consecutive5xx: 3
    interval: 10s
    baseEjectionTime: 5m
    maxEjectionTime: 10m
    maxEjectedPercent: 50
"#,
        ),
        "breaker/web",
    )?;
    let failing = demo.make_fail("web-v2")?;

    // Traffic until the failing pod has answered 500 three times in a row. The balancer
    // (P2C over latency) tries it only now and then, so this takes a few seconds.
    let started = Instant::now();
    let mut errors = 0;
    eventually(Duration::from_secs(90), || {
        let l = demo.load(
            "client",
            "http://web/breaker",
            &["--duration", "5s", "--rps", "20"],
        )?;
        errors += l.status_count(500);
        let text = demo.client_metrics("client")?;
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
    let l = demo.load(
        "client",
        "http://web/breaker",
        &["--duration", "20s", "--rps", "20"],
    )?;
    all_ok(&l, "after the ejection")?;
    ensure!(
        !l.pods.contains_key(&failing) && l.served_by("web-v1") == l.sent,
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

/// 20 requests at 20 per second: enough to see every one refused or answered.
const BURST: [&str; 4] = ["--count", "20", "--rps", "20"];

/// 5d. A Policy on web allows ServiceAccount `client` to GET under `/allowed` and denies
///     everything else: the client's other paths and another ServiceAccount get 403 with
///     `weft-error: forbidden`, and web's proxy counts the denials. (The Policy also
///     admits the kubelet's probes explicitly: see `policy_keeps_probes_passing`.)
pub fn a_policy_denies_and_allows_as_written(ctx: &Ctx) -> anyhow::Result<()> {
    let demo = Demo::deploy(ctx, "policy", 1, 0, &["client", "intruder"])?;
    let (kube, ns) = (demo.kube, &demo.ns);
    // Before the Policy both may call.
    all_ok(
        &demo.load("intruder", "http://web/allowed/x", &BURST)?,
        "intruder, no Policy",
    )?;

    demo.apply_programmed(&web_policy(ns, true), "policy/web")?;

    let l = demo.load("client", "http://web/allowed/x", &BURST)?;
    all_ok(&l, "client GET /allowed/x")?;
    for (client, target) in [
        ("client", "http://web/other"),
        ("intruder", "http://web/allowed/x"),
    ] {
        all_refused(
            &demo.load(client, target, &BURST)?,
            403,
            "forbidden",
            &format!("{client} GET {target}"),
        )?;
    }

    let web = kube.pod_names(ns, "app=web")?.remove(0);
    let text = kube.proxy_admin(ns, &web, "/metrics")?;
    let denials = metric(&text, "weft_authz_denials_total", &[]);
    ensure!(
        denials >= 40.0,
        "web's proxy counted {denials} denials, expected at least 40"
    );
    // The pod stayed in service throughout.
    kube.wait_ready(ns, "app=web", Duration::from_secs(1))?;
    Ok(())
}

/// 5e. A Policy written as a user writes it (default Strict mTLS, deny by default, one
///     allow rule for a client) leaves the protected pods Ready: the kubelet's HTTP
///     readiness probes, plain text from the node, still pass, as they do under Linkerd's
///     and Istio's policies.
pub fn a_policy_keeps_the_kubelets_probes_passing(ctx: &Ctx) -> anyhow::Result<()> {
    let demo = Demo::deploy(ctx, "probes", 1, 0, &["client"])?;
    let (kube, ns) = (demo.kube, &demo.ns);
    demo.apply_programmed(&web_policy(ns, false), "policy/web")?;
    // Readiness probes run every second and fail after 3; give them 10 s.
    stays_ready(kube, ns, "app=web", Duration::from_secs(10))?;
    let l = demo.load("client", "http://web/allowed/x", &BURST)?;
    all_ok(&l, "client GET /allowed/x")
}

/// Checks every second for `time` that the pods of `ns` matching `selector` stay Ready;
/// fails with the kubelet's `Unhealthy` events when one is not.
fn stays_ready(kube: &Kube, ns: &str, selector: &str, time: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + time;
    while Instant::now() < deadline {
        kube.wait_ready(ns, selector, Duration::from_secs(0))
            .with_context(|| {
                format!(
                    "{selector} went unready under the Policy:\n{}",
                    unhealthy_events(kube, ns)
                )
            })?;
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok(())
}

/// The kubelet's `Unhealthy` events (failed probes) in `ns`, as `kubectl get` prints them.
fn unhealthy_events(kube: &Kube, ns: &str) -> String {
    kube.run(&[
        "-n",
        ns,
        "get",
        "events",
        "--field-selector",
        "reason=Unhealthy",
    ])
    .unwrap_or_default()
}

/// The admin path the injector points the app container's readiness probe at.
const APP_READYZ: &str = "/app-health/app/readyz";

/// How long a readiness change may take to show: the probes run every second and 2
/// failures (1 success) flip it; the rest is the kubelet's and the API server's pace.
const READINESS_FLIP: Duration = Duration::from_secs(15);

/// What the probe scenarios start from: in a new namespace `<prefix>-<random>`, web (one
/// pod) and `as-written` (one pod, the control) probed with `probed(true)` and
/// `probed(false)` (the probe left as written), both Ready; web's probe as injected
/// checked ([`probe_rewritten`]); then the namespace-wide Strict Policy Programmed.
/// Returns the demo and web's pod.
fn probes_under_strict<'a>(
    ctx: &'a Ctx,
    prefix: &str,
    probed: fn(bool) -> Readiness,
) -> anyhow::Result<(Demo<'a>, String)> {
    let demo = Demo::deploy_probed(ctx, prefix, 1, 0, &[], probed(true))?;
    let (kube, ns) = (demo.kube, &demo.ns);
    kube.apply(&demo_deployment_probed(
        ns,
        "as-written",
        "as-written",
        "web",
        1,
        probed(false),
    ))?;
    kube.wait_ready(ns, "app=as-written", READY)?;
    let pod = only_pod(kube, ns, "app=web")?;
    let spec = kube.json(&["-n", ns, "get", "pod", &pod])?;
    probe_rewritten(&spec["spec"], probed(true))?;
    demo.apply_programmed(&namespace_strict_policy(ns), NAMESPACE_STRICT)?;
    Ok((demo, pod))
}

/// The one pod of `ns` matching `selector`.
fn only_pod(kube: &Kube, ns: &str, selector: &str) -> anyhow::Result<String> {
    let mut pods = kube.pod_names(ns, selector)?;
    ensure!(pods.len() == 1, "{selector}: {pods:?}, expected one pod");
    Ok(pods.remove(0))
}

/// Runs `weft-demo-app <cmd>` (`fail`, `recover`) in `pod`'s app container and waits
/// until the pod is Ready (`ready`) or NotReady; returns how long that took.
fn switch_until(
    kube: &Kube,
    ns: &str,
    pod: &str,
    cmd: &str,
    ready: bool,
) -> anyhow::Result<Duration> {
    kube.exec(ns, pod, "app", &["weft-demo-app", cmd])?;
    let switched = Instant::now();
    eventually(READINESS_FLIP, || {
        let p = kube.json(&["-n", ns, "get", "pod", pod])?;
        ensure!(
            is_ready(&p) == ready,
            "{pod} not {} after `{cmd}`:\n{}",
            if ready { "Ready" } else { "NotReady" },
            unhealthy_events(kube, ns)
        );
        Ok(())
    })?;
    Ok(switched.elapsed())
}

/// 5e'. A gRPC readiness probe works through the injected proxy under a namespace's
///     Strict Policy: injection rewrote it to the proxy's admin port, the pod stays
///     Ready, and the proxy's `grpc.health.v1.Health/Check` follows the app:
///     `weft-demo-app fail` (NOT_SERVING) makes the pod NotReady, `recover` Ready again.
///     The same probe left as written (`weft.dev/rewrite-probes: "false"`), the kubelet's
///     plain-text HTTP/2 to the app's port, passes under the mesh default and fails
///     under Strict: what the rewrite is for.
pub fn grpc_probes_pass_under_strict_and_follow_the_app(ctx: &Ctx) -> anyhow::Result<()> {
    let (demo, pod) =
        probes_under_strict(ctx, "grpc-probes", |rewrite| Readiness::Grpc { rewrite })?;
    let (kube, ns, pod) = (demo.kube, &demo.ns, pod.as_str());
    // The probe left as written now reaches the inbound listener in plain text, refused.
    eventually(READINESS_FLIP, || {
        for p in kube.pods(ns, "app=as-written")? {
            ensure!(
                !is_ready(&p),
                "{} still Ready under Strict",
                p["metadata"]["name"]
            );
        }
        Ok(())
    })?;
    // Two probes fail in 2 s: 5 s under Strict is enough for a refused probe to show.
    stays_ready(kube, ns, "app=web", Duration::from_secs(5))?;
    let verdict = kube.proxy_admin(ns, pod, APP_READYZ)?;
    ensure!(
        verdict.contains("application is SERVING"),
        "the proxy's gRPC check of the app: {verdict}"
    );

    let unready_after = switch_until(kube, ns, pod, "fail", false)?;
    // The app logs each change of answer with the caller's User-Agent: the kubelet's
    // probe, performed by the proxy, reached it and was told NOT_SERVING (the API
    // server's pod proxy does not pass the admin port's 503 body on to kubectl).
    let log = kube.logs(ns, pod, "app")?;
    let told = log
        .lines()
        .filter(|l| l.contains("answer changed"))
        .collect::<Vec<_>>();
    ensure!(
        told.len() == 2
            && told[1].contains("NOT_SERVING")
            && told.iter().all(|l| l.contains("kube-probe/")),
        "the app's gRPC health answers (SERVING, then NOT_SERVING to the kubelet's probe):\n{log}"
    );

    let ready_after = switch_until(kube, ns, pod, "recover", true)?;
    tracing::info!(
        ?unready_after,
        ?ready_after,
        "the gRPC readiness probe followed the app"
    );
    Ok(())
}

/// 5e''. A TCP readiness probe works through the injected proxy under a namespace's
///      Strict Policy: injection rewrote it to the proxy's admin port, whose check
///      connects to the app's port; `weft-demo-app fail` (the port closed) makes the pod
///      NotReady, `recover` Ready again. The control, the same probe left as written
///      (`weft.dev/rewrite-probes: "false"`), stays Ready under Strict and even with its
///      app's port closed: the redirect hands the kubelet's connect to the proxy's
///      inbound listener, which accepts it, and a TCP probe asks nothing more. That lie is
///      what the rewrite is for.
pub fn tcp_probes_pass_under_strict_and_follow_the_app(ctx: &Ctx) -> anyhow::Result<()> {
    let (demo, pod) = probes_under_strict(ctx, "tcp-probes", |rewrite| Readiness::Tcp { rewrite })?;
    let (kube, ns, pod) = (demo.kube, &demo.ns, pod.as_str());
    let control = only_pod(kube, ns, "app=as-written")?;
    // A connect carries no bytes for Strict to refuse: both stay Ready.
    stays_ready(kube, ns, "app in (web, as-written)", Duration::from_secs(5))?;
    let verdict = kube.proxy_admin(ns, pod, APP_READYZ)?;
    ensure!(
        verdict.contains("application accepted the connection"),
        "the proxy's TCP check of the app: {verdict}"
    );

    // The control's app closes its port first, so it has been closed at least as long
    // as web's takes to show.
    kube.exec(ns, &control, "app", &["weft-demo-app", "fail"])?;
    let control_failed = Instant::now();
    let unready_after = switch_until(kube, ns, pod, "fail", false)?;
    // Five more probe periods, more than twice the failure threshold.
    stays_ready(kube, ns, "app=as-written", Duration::from_secs(5))
        .context("the unrewritten TCP probe with its app's port closed")?;
    let control_closed_for = control_failed.elapsed();
    // Both apps really closed their port (no listening socket: connect refused).
    let mut logs = Vec::new();
    for p in [pod, control.as_str()] {
        let log = kube.logs(ns, p, "app")?;
        ensure!(
            log.contains("tcp port closed: failing"),
            "{p}'s app did not close its TCP port:\n{log}"
        );
        logs.push(log);
    }
    // Web's app was connected to from the proxy's hand-off address (the rewritten probe),
    // not from the node.
    ensure!(
        logs[0]
            .lines()
            .any(|l| l.contains("first connection since it opened") && l.contains("127.0.0.6:")),
        "web's app log, without the proxy's probe connection:\n{}",
        logs[0]
    );

    let ready_after = switch_until(kube, ns, pod, "recover", true)?;
    kube.exec(ns, &control, "app", &["weft-demo-app", "recover"])?;
    tracing::info!(
        ?unready_after,
        ?ready_after,
        ?control_closed_for,
        web_app_log = %logs[0],
        control_app_log = %logs[1],
        "the TCP readiness probe followed the app; the unrewritten one stayed Ready"
    );
    Ok(())
}

/// Checks that injection pointed the app container's readiness probe (`readiness`'s port
/// probe) at the proxy's admin port, with no handler left for the kubelet to reach the
/// app's port with, and handed the original to the proxy in `WEFT_APP_PROBES`,
/// thresholds kept.
fn probe_rewritten(spec: &serde_json::Value, readiness: Readiness) -> anyhow::Result<()> {
    let PortProbe { handler, port, .. } = readiness
        .port_probe()
        .context("only port probes are checked")?;
    let app = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "app")
        .context("no app container")?;
    let probe = &app["readinessProbe"];
    ensure!(
        probe[handler].is_null()
            && probe["httpGet"]["path"] == APP_READYZ
            && probe["httpGet"]["port"] == ADMIN_PORT
            && probe["periodSeconds"] == 1
            && probe["failureThreshold"] == 2,
        "the app's readiness probe as injected: {probe}"
    );
    let originals =
        proxy_env(spec, "WEFT_APP_PROBES").context("the proxy has no WEFT_APP_PROBES")?;
    let originals: serde_json::Value = serde_json::from_str(originals)?;
    let original = &originals["app/readyz"];
    ensure!(
        original["handler"] == handler && original["port"] == port,
        "WEFT_APP_PROBES: {originals}"
    );
    Ok(())
}

/// The Policy of [`namespace_strict_policy`].
const NAMESPACE_STRICT: &str = "policy/namespace-strict";

/// A Policy for every pod of `ns` (`target.selector: {}`, no workload named) refusing
/// plain text (`mtls.mode: Strict`) and allowing every authenticated caller.
fn namespace_strict_policy(ns: &str) -> String {
    format!(
        r#"apiVersion: weft.dev/v1alpha1
kind: Policy
metadata:
  name: namespace-strict
  namespace: {ns}
spec:
  target:
    selector: {{}}
  mtls:
    mode: Strict
  defaultAction: Allow
"#
    )
}

/// 5f. A namespace-wide Policy (`target.selector: {}`, no workload named) in `Strict`
///     mode refuses an unmeshed client's plain text (403 `mtls_required` from web's
///     proxy) while a meshed client in another namespace, over mTLS, still gets 200, by
///     web's Service and by web's pod address, also once only a headless Service lists
///     the pod and once no Service does; deleting the Policy lets the unmeshed client through again.
pub fn a_strict_namespace_policy_refuses_plain_text(ctx: &Ctx) -> anyhow::Result<()> {
    let demo = Demo::deploy(ctx, "strict", 1, 0, &[])?;
    let ns = &demo.ns;
    // A proxy receives the Services of its own namespace and of those its Namespace's
    // `weft.dev/visible-namespaces` lists (docs/operator.md): without it the meshed
    // client's proxy passes the request to web through, in plain text.
    let meshed = Demo::in_new_namespace(ctx, "meshed", true)?;
    meshed.kube.run(&[
        "annotate",
        "namespace",
        &meshed.ns,
        &format!("weft.dev/visible-namespaces={ns}"),
    ])?;
    meshed.add_clients(&["client"])?;
    let plain = Demo::clients_only(ctx, "plain", false, &["client"])?;
    let target = format!("http://web.{ns}/strict");
    // Under the mesh default (Permissive) plain text is admitted.
    all_ok(
        &plain.load("client", &target, &BURST)?,
        "unmeshed client, no Policy",
    )?;

    demo.apply_programmed(&namespace_strict_policy(ns), NAMESPACE_STRICT)?;
    all_refused(
        &plain.load("client", &target, &BURST)?,
        403,
        "mtls_required",
        "unmeshed client under the namespace's Strict Policy",
    )?;
    all_ok(
        &meshed.load("client", &target, &BURST)?,
        "meshed client of another namespace under the Strict Policy",
    )?;
    // The same client dialling web's pod by its address, as through a headless Service's
    // name or to a StatefulSet peer: its proxy knows the address as a meshed endpoint of
    // web and originates mutual TLS to it too, so Strict takes it.
    let web = only_pod(demo.kube, ns, "app=web")?;
    let ip = demo.kube.run(&[
        "-n",
        ns,
        "get",
        "pod",
        &web,
        "-o",
        "jsonpath={.status.podIP}",
    ])?;
    all_ok(
        &meshed.load(
            "client",
            &format!("http://{}:8080/strict", ip.trim()),
            &BURST,
        )?,
        "meshed client dialling web's pod address under the Strict Policy",
    )?;
    // With only a headless Service left to list web's pod (a StatefulSet's usual
    // Service), the client's proxy still knows the address as meshed.
    let by_ip = format!("http://{}:8080/strict", ip.trim());
    demo.kube.apply(&format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web-peers\n  namespace: {ns}\nspec:\n  clusterIP: None\n  selector: {{app: web}}\n  ports:\n  - name: http\n    port: 8080\n"
    ))?;
    demo.kube
        .run(&["-n", ns, "delete", "service", "web", "web-v1", "web-v2"])?;
    // Load only once the client's proxy has the new config: before it, web's Service
    // still gives mutual TLS, and the step would pass without testing the headless one.
    client_has_only(
        &meshed,
        &format!("web-peers.{ns}."),
        &["web", "web-v1", "web-v2"].map(|s| format!("{s}.{ns}.")),
    )?;
    let before = outbound_requests(&meshed.client_metrics("client")?, "passthrough\"");
    eventually(Duration::from_secs(30), || {
        all_ok(
            &meshed.load("client", &by_ip, &BURST)?,
            "meshed client dialling web's pod address, listed by a headless Service alone, under the Strict Policy",
        )
    })?;
    // Counted as meshed traffic to the config that lists the pod, not as passthrough.
    client_counted(&meshed, &format!("web-peers.{ns}."), before)?;
    // With no Service at all (a Job's workers, a driver's executors), the client's proxy
    // knows web's pod by the port it declares (`containerPort: 8080`).
    demo.kube
        .run(&["-n", ns, "delete", "service", "web-peers"])?;
    client_has_only(
        &meshed,
        &format!("pods.{ns}\""),
        &[format!("web-peers.{ns}.")],
    )?;
    let before = outbound_requests(&meshed.client_metrics("client")?, "passthrough\"");
    eventually(Duration::from_secs(30), || {
        all_ok(
            &meshed.load("client", &by_ip, &BURST)?,
            "meshed client dialling web's pod address, listed by no Service, under the Strict Policy",
        )
    })?;
    client_counted(&meshed, &format!("pods.{ns}\""), before)?;

    demo.kube.run(&["-n", ns, "delete", NAMESPACE_STRICT])?;
    // The operator pushes web's proxy its mode without the Policy (the mesh default).
    eventually(Duration::from_secs(30), || {
        all_ok(
            &plain.load("client", &by_ip, &BURST)?,
            "unmeshed client after the Policy's deletion",
        )
    })?;
    Ok(())
}

/// Waits until `demo`'s client proxy has a service whose label starts with `present`
/// and none starting with any of `gone` (by its `weft_service_endpoints` gauges).
fn client_has_only(demo: &Demo, present: &str, gone: &[String]) -> anyhow::Result<()> {
    eventually(Duration::from_secs(30), || {
        let metrics = demo.client_metrics("client")?;
        let services: Vec<&str> = metrics
            .lines()
            .filter_map(|l| l.strip_prefix("weft_service_endpoints{service=\""))
            .collect();
        ensure!(
            services.iter().any(|s| s.starts_with(present))
                && !services
                    .iter()
                    .any(|s| gone.iter().any(|g| s.starts_with(g.as_str()))),
            "the client's proxy has services {services:?}: waiting for {present}… and none of {gone:?}"
        );
        Ok(())
    })
}

/// Checks that `demo`'s client proxy counted outbound requests under a service label
/// starting with `label`, and no more as passthrough than the `passthrough` it had
/// counted before.
fn client_counted(demo: &Demo, label: &str, passthrough: f64) -> anyhow::Result<()> {
    let metrics = demo.client_metrics("client")?;
    let counted = outbound_requests(&metrics, label);
    let now = outbound_requests(&metrics, "passthrough\"");
    ensure!(
        counted > 0.0 && now == passthrough,
        "the client's proxy counted {counted} outbound requests under service {label}… and \
         {} more as passthrough",
        now - passthrough
    );
    Ok(())
}

/// The outbound requests a proxy's `metrics` count under service labels starting with
/// `label`, whatever the order of the labels.
fn outbound_requests(metrics: &str, label: &str) -> f64 {
    let service = format!("service=\"{label}");
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("weft_requests_total{")
                && l.contains("direction=\"outbound\"")
                && l.contains(&service)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// 6. A rolling update of web under constant load loses no request: every request the
///    load generator sent during the rollout got a 2xx, and both old and new pods
///    answered.
pub fn a_rolling_update_under_load_loses_no_request(ctx: &Ctx) -> anyhow::Result<()> {
    let demo = Demo::deploy(ctx, "rollout", 2, 0, &["client"])?;
    let (kube, ns) = (demo.kube, &demo.ns);
    let old: Vec<String> = kube.pod_names(ns, "app=web")?;
    let bg = demo.start_load(
        ctx,
        "client",
        "http://web/rollout",
        &["--duration", "45s", "--rps", "20"],
    )?;
    std::thread::sleep(Duration::from_secs(5));
    kube.run(&["-n", ns, "rollout", "restart", "deploy/web-v1"])?;
    kube.rollout(ns, "deploy/web-v1", Duration::from_secs(120))?;
    let new: Vec<String> = kube
        .pod_names(ns, "app=web")?
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
