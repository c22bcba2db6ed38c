//! The demo a newcomer runs first (`make demo`): Weft installed with Helm on a cluster, the
//! demo application meshed, then one step per feature, each printing what it observed and
//! the command that shows it, and returning it so a test can assert it.
//!
//! ```text
//!  weft-demo (bin) ─▶ local node or KUBECONFIG ─▶ images ─▶ helm install ─┐
//!  tests/demo.rs ──▶ attached node ─────────────▶ images ─▶ helm install ─┤
//!                                                                         ▼
//!  Demo::run: app ─▶ sidecars ─▶ identities ─▶ 90/10 ─▶ 50/50 ─▶ breaker ─▶ policy ─▶ stat ─▶ tap
//!                         (each reads the client's report lines, the proxies' logs or metrics)
//! ```
//!
//! The manifests are the files in `demo/manifests/`, embedded, so what the demo applies is
//! what a user applies by hand.

pub mod load;

use std::{
    io::Read,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::Value;

pub use load::{LoadReport, Split};

use crate::{Helm, mesh::Cluster};

/// The demo's namespace (labelled for injection).
pub const NAMESPACE: &str = "weft-demo";

/// The demo application's manifests, in the order they apply: namespace, ServiceAccounts,
/// web-v1, web-v2, Services, client.
pub const APP_MANIFESTS: [(&str, &str); 6] = [
    (
        "app/00-namespace.yaml",
        include_str!("../../../demo/manifests/app/00-namespace.yaml"),
    ),
    (
        "app/10-serviceaccounts.yaml",
        include_str!("../../../demo/manifests/app/10-serviceaccounts.yaml"),
    ),
    (
        "app/20-web-v1.yaml",
        include_str!("../../../demo/manifests/app/20-web-v1.yaml"),
    ),
    (
        "app/21-web-v2.yaml",
        include_str!("../../../demo/manifests/app/21-web-v2.yaml"),
    ),
    (
        "app/30-services.yaml",
        include_str!("../../../demo/manifests/app/30-services.yaml"),
    ),
    (
        "app/40-client.yaml",
        include_str!("../../../demo/manifests/app/40-client.yaml"),
    ),
];
/// The Route sending 90 % of `web`'s requests to web-v1 and 10 % to web-v2.
pub const ROUTE_90_10: &str = include_str!("../../../demo/manifests/route-90-10.yaml");
/// The same Route at 50/50.
pub const ROUTE_50_50: &str = include_str!("../../../demo/manifests/route-50-50.yaml");
/// Outlier detection on web-v2.
pub const BREAKER: &str = include_str!("../../../demo/manifests/breaker.yaml");
/// Only the `client` ServiceAccount may call the web pods.
pub const POLICY: &str = include_str!("../../../demo/manifests/policy.yaml");
/// A pod of another ServiceAccount calling `web`.
pub const INTRUDER: &str = include_str!("../../../demo/manifests/intruder.yaml");

/// The proxies' admin port (metrics), reached through the API server's pod proxy.
const ADMIN_PORT: u16 = 15021;
/// The injected proxy's container name.
const PROXY_CONTAINER: &str = "weft-proxy";
/// How far an observed split may be from the Route's weights (absolute share of web-v2):
/// with eight 5-second windows at 20 requests per second (800 requests), a 90/10 split's
/// standard deviation is 1.1 points and a 50/50 split's 1.8 points, so 7 points is about
/// four standard deviations at 50/50 (runs here saw web-v2 between 45.3 % and 50.3 % at
/// 50/50, a little under half on average).
pub const SPLIT_TOLERANCE: f64 = 0.07;
/// Report windows (5 s each) counted per split.
const SPLIT_WINDOWS: usize = 8;
/// How long a Deployment may take to roll out (image already on the node).
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a Weft resource may take to be acknowledged and enforced by every proxy.
const PROGRAMMED_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a kubectl-weft command may take (they read a few proxies' admin endpoints).
const KUBECTL_WEFT_TIMEOUT: Duration = Duration::from_secs(30);
/// The operator's admin endpoint as the chart exposes it (the Service and port name
/// kubectl-weft reads `/proxies` from; passed explicitly so that the commands the demo
/// prints say where it is).
const OPERATOR_SERVICE: &str = "weft-operator-metrics:http-metrics";
/// How long the client's proxy may take to eject a failing web-v2 pod: it needs 5 failed
/// answers from that pod, and its balancer steers away from a pod that fails (counting
/// its failures), so they can take a while (7–36 s in runs here).
const EJECTION_TIMEOUT: Duration = Duration::from_secs(120);

/// Writes the demo's narration: step headers, what was observed, and the commands that
/// show it, with the elapsed time on progress lines.
pub struct Narrator {
    out: Box<dyn Write + Send>,
    started: Instant,
    /// How a printed command reaches the cluster (`source .testbed/env` first, or nothing).
    pub kubectl_setup: Option<String>,
}

impl Narrator {
    /// Narrates to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Narrator {
            out,
            started: Instant::now(),
            kubectl_setup: None,
        }
    }

    /// A step's header.
    pub fn step(&mut self, title: &str) {
        let _ = writeln!(self.out, "\n== {title}");
    }

    /// Text, indented under the current step.
    pub fn say(&mut self, text: &str) {
        for line in text.lines() {
            let _ = writeln!(self.out, "   {line}");
        }
        let _ = self.out.flush();
    }

    /// The command that shows the user what the step just showed.
    pub fn see(&mut self, command: &str) {
        let _ = writeln!(self.out, "   $ {command}");
        let _ = self.out.flush();
    }

    /// A progress line before a long step, with the time since the demo started.
    pub fn progress(&mut self, what: &str) {
        let _ = writeln!(
            self.out,
            "[{:>4}s] {what}",
            self.started.elapsed().as_secs()
        );
        let _ = self.out.flush();
    }

    /// Seconds since the demo started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Which pods got which containers.
#[derive(Clone, Debug, PartialEq)]
pub struct InjectedPod {
    /// The pod's name.
    pub pod: String,
    /// Its init containers, native sidecars included (`weft-init`, `weft-proxy`).
    pub init_containers: Vec<String>,
    /// Its containers.
    pub containers: Vec<String>,
}

impl InjectedPod {
    /// Whether the pod runs Weft's proxy.
    pub fn meshed(&self) -> bool {
        self.init_containers.iter().any(|c| c == PROXY_CONTAINER)
    }
}

/// The mesh identities the proxies reported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Identities {
    /// The certificate identity the client's proxy installed.
    pub client_certificate: Option<String>,
    /// The certificate identity a web-v1 pod's proxy installed.
    pub web_certificate: Option<String>,
    /// The client identity a web-v1 pod's proxy verified on a request (its access log's
    /// `source_identity`): the proof the request came over mutual TLS.
    pub web_saw_client: Option<String>,
    /// The identity the client's proxy required of the web pod it sent a request to (its
    /// access log's `destination_identity`).
    pub client_required_web: Option<String>,
}

/// What the Breaker step observed.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerOutcome {
    /// The web-v2 pod made to fail.
    pub failing_pod: String,
    /// Requests that failed (non-2xx or no answer) from making it fail until the ejection.
    pub failures_before_ejection: u64,
    /// Seconds from making it fail to the client's proxy counting an ejection.
    pub seconds_to_ejection: f64,
    /// The client proxy's `weft_breaker_ejected_endpoints` for web-v2 after the ejection.
    pub ejected_endpoints: f64,
    /// The client's windows after the ejection, added up.
    pub after: LoadReport,
}

impl BreakerOutcome {
    /// Requests the failing pod answered after its ejection.
    pub fn failing_pod_requests_after(&self) -> u64 {
        self.after.pods.get(&self.failing_pod).copied().unwrap_or(0)
    }
}

/// What the Policy step observed.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyOutcome {
    /// The intruder's final report line (every request it sent, by status).
    pub intruder: LoadReport,
    /// The client's windows while the Policy was in force, added up.
    pub client: LoadReport,
    /// The web pods' `weft_authz_denials_total`, summed.
    pub denials_counted: f64,
}

/// Everything the demo observed, for a test to assert.
#[derive(Clone, Debug)]
pub struct Report {
    /// The demo's pods and their containers.
    pub injected: Vec<InjectedPod>,
    /// Both sides' identities.
    pub identities: Identities,
    /// The split with no Route (the Service's own balancing over three pods).
    pub baseline: LoadReport,
    /// The split at 90/10.
    pub split_90_10: Split,
    /// The split at 50/50.
    pub split_50_50: Split,
    /// The Breaker step.
    pub breaker: BreakerOutcome,
    /// The Policy step.
    pub policy: PolicyOutcome,
    /// `kubectl weft stat deploy -n weft-demo`, when kubectl-weft was found.
    pub stat: Option<String>,
    /// `kubectl weft tap deploy/web-v1 …`: a few of web-v1's requests, live, when
    /// kubectl-weft was found.
    pub tap: Option<String>,
    /// What the demo observed that was off (an empty list: everything as expected).
    pub problems: Vec<String>,
}

/// Installs Weft with Helm (`weft_e2e::mesh::install_weft`), with a progress line.
pub fn install(
    narrator: &mut Narrator,
    cluster: &Cluster,
    helm: &Helm,
    helm_home: &Path,
    set: &[&str],
) -> anyhow::Result<()> {
    narrator.step("Installing Weft with Helm");
    narrator.progress(
        "helm install weft charts/weft -n weft-system --create-namespace --wait (the operator's 2 replicas and the webhook)",
    );
    crate::mesh::install_weft(cluster, helm, helm_home, set).context(
        "installing Weft: see `kubectl -n weft-system get pods` and `kubectl -n weft-system logs deploy/weft-operator` \
         (an operator image older than charts/weft can refuse the chart's settings: rebuild with `make images`)",
    )?;
    narrator.progress("Weft installed");
    narrator.see("helm list -n weft-system");
    narrator.see("kubectl -n weft-system get pods");
    Ok(())
}

/// The demo's steps, on a cluster where Weft is installed.
pub struct Demo<'a> {
    cluster: &'a Cluster,
    narrator: &'a mut Narrator,
    kubectl_weft: Option<PathBuf>,
    kubectl_dir: Option<PathBuf>,
    problems: Vec<String>,
}

impl<'a> Demo<'a> {
    /// A demo on `cluster`; `kubectl_weft` is the plugin's binary (for `stat` and
    /// `explain`), when built.
    pub fn new(
        cluster: &'a Cluster,
        narrator: &'a mut Narrator,
        kubectl_weft: Option<PathBuf>,
    ) -> Self {
        Demo {
            cluster,
            narrator,
            kubectl_weft,
            kubectl_dir: None,
            problems: Vec::new(),
        }
    }

    /// Puts `dir` first on the `PATH` of kubectl-weft, which runs `kubectl port-forward`
    /// (the test bed's kubectl, matching its API server).
    pub fn with_kubectl_dir(mut self, dir: PathBuf) -> Self {
        self.kubectl_dir = Some(dir);
        self
    }

    /// Runs every step in turn. A step that cannot go on (a wait that timed out) fails
    /// the demo; an observation that is off (a split outside its tolerance) is said
    /// plainly and listed in [`Report::problems`].
    pub fn run(mut self) -> anyhow::Result<Report> {
        self.deploy_app()?;
        let injected = self.sidecars()?;
        let identities = self.identities()?;
        let baseline = self.baseline()?;
        let split_90_10 = self.split(ROUTE_90_10, "route-90-10.yaml", 0.10)?;
        let split_50_50 = self.split(ROUTE_50_50, "route-50-50.yaml", 0.50)?;
        let breaker = self.breaker()?;
        let policy = self.policy()?;
        let stat = self.stat()?;
        let tap = self.tap();
        Ok(Report {
            injected,
            identities,
            baseline,
            split_90_10,
            split_50_50,
            breaker,
            policy,
            stat,
            tap,
            problems: self.problems,
        })
    }

    fn problem(&mut self, text: String) {
        self.narrator.say(&format!("NOT AS EXPECTED: {text}"));
        self.problems.push(text);
    }

    fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.cluster.run(args)
    }

    fn deploy_app(&mut self) -> anyhow::Result<()> {
        self.narrator.step("1. The demo application");
        if self
            .kubectl(&["get", "namespace", NAMESPACE, "-o", "name"])
            .is_ok()
        {
            self.narrator.progress(&format!(
                "deleting the namespace {NAMESPACE} left by an earlier run (up to 2 minutes)"
            ));
            self.kubectl(&[
                "delete",
                "namespace",
                NAMESPACE,
                "--wait=true",
                "--timeout=120s",
            ])
            .context(
                "the namespace weft-demo from an earlier run was not deleted within 2 minutes",
            )?;
        }
        let all: Vec<&str> = APP_MANIFESTS.iter().map(|(_, y)| *y).collect();
        self.cluster.apply(&all.join("\n---\n"))?;
        self.narrator.say(
            "Namespace weft-demo (labelled weft.dev/inject=enabled), Deployments web-v1 (1 pod),\n\
             web-v2 (2 pods) and client (20 requests per second to http://web), Services web,\n\
             web-v1 and web-v2. The same files apply by hand:",
        );
        self.narrator.see("kubectl apply -f demo/manifests/app/");
        for deploy in ["web-v1", "web-v2", "client"] {
            self.narrator
                .progress(&format!("waiting for deploy/{deploy} to be ready"));
            self.cluster
                .wait_rollout(NAMESPACE, &format!("deploy/{deploy}"), ROLLOUT_TIMEOUT)
                .with_context(|| {
                    format!(
                        "deploy/{deploy} in {NAMESPACE} did not roll out within {ROLLOUT_TIMEOUT:?}; see `kubectl -n {NAMESPACE} describe pods`"
                    )
                })?;
        }
        self.narrator.progress("the demo application is running");
        Ok(())
    }

    fn sidecars(&mut self) -> anyhow::Result<Vec<InjectedPod>> {
        self.narrator.step("2. Sidecars injected");
        let pods = self.kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "pods",
            "-l",
            "app in (web,client)",
            "-o",
            "json",
        ])?;
        let pods: Value = serde_json::from_str(&pods).context("kubectl get pods -o json")?;
        let names = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|c| c["name"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut injected = Vec::new();
        for pod in pods["items"].as_array().into_iter().flatten() {
            if pod["metadata"]["deletionTimestamp"].is_string() {
                continue;
            }
            injected.push(InjectedPod {
                pod: pod["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                init_containers: names(&pod["spec"]["initContainers"]),
                containers: names(&pod["spec"]["containers"]),
            });
        }
        injected.sort_by(|a, b| a.pod.cmp(&b.pod));
        self.narrator.say(
            "The webhook added two init containers to every pod: weft-init (the iptables\n\
             redirect) and weft-proxy (a native sidecar: it starts first and stops last).",
        );
        for p in &injected {
            self.narrator.say(&format!(
                "{:<28} init: {:<22} containers: {}",
                p.pod,
                p.init_containers.join(","),
                p.containers.join(",")
            ));
        }
        if let Some(p) = injected.iter().find(|p| !p.meshed()) {
            let text = format!("pod {} has no weft-proxy container", p.pod);
            self.problem(text);
        }
        self.narrator.see(&format!(
            "kubectl -n {NAMESPACE} get pods -o custom-columns=POD:.metadata.name,INIT:.spec.initContainers[*].name,CONTAINERS:.spec.containers[*].name"
        ));
        Ok(injected)
    }

    /// A running pod's name for a label selector.
    fn pod(&self, selector: &str) -> anyhow::Result<String> {
        let names = self.kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "pods",
            "-l",
            selector,
            "--field-selector=status.phase=Running",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])?;
        names
            .split_whitespace()
            .next()
            .map(str::to_owned)
            .with_context(|| format!("no running pod with labels {selector} in {NAMESPACE}"))
    }

    fn identities(&mut self) -> anyhow::Result<Identities> {
        self.narrator.step("3. Mutual TLS identities");
        let web = self.pod("app=web,version=v1")?;
        let client = self.pod("app=client")?;
        let started = Instant::now();
        let mut ids = Identities::default();
        // The access logs fill as the client sends; the first requests may predate the
        // web pod's certificate, so look until a verified identity shows up.
        loop {
            let web_log = self.kubectl(&[
                "-n",
                NAMESPACE,
                "logs",
                &web,
                "-c",
                PROXY_CONTAINER,
                "--tail=400",
            ])?;
            let client_log = self.kubectl(&[
                "-n",
                NAMESPACE,
                "logs",
                &client,
                "-c",
                PROXY_CONTAINER,
                "--tail=400",
            ])?;
            ids.web_certificate = certificate_identity(&web_log);
            ids.client_certificate = certificate_identity(&client_log);
            ids.web_saw_client = access_log_field(&web_log, "inbound", "source_identity");
            ids.client_required_web =
                access_log_field(&client_log, "outbound", "destination_identity");
            let complete = ids.web_saw_client.is_some() && ids.client_required_web.is_some();
            if complete || started.elapsed() > Duration::from_secs(30) {
                break;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "(not seen)".to_owned());
        self.narrator.say(&format!(
            "Each proxy proved its ServiceAccount to the operator and got a SPIFFE certificate:\n  \
             client's proxy: {}\n  web-v1's proxy: {}\n\
             A request from client to web, as each side's proxy logged it (access log):\n  \
             client's proxy required the web pod to be {}\n  \
             web-v1's proxy verified the caller as     {}",
            show(&ids.client_certificate),
            show(&ids.web_certificate),
            show(&ids.client_required_web),
            show(&ids.web_saw_client),
        ));
        match &ids.web_saw_client {
            Some(id) if id.ends_with(&format!("/ns/{NAMESPACE}/sa/client")) => {}
            other => {
                let text = format!(
                    "web-v1's proxy did not log a request verified as the client's identity (saw {other:?})"
                );
                self.problem(text);
            }
        }
        self.narrator.see(&format!(
            "kubectl -n {NAMESPACE} logs deploy/web-v1 -c weft-proxy | grep -m3 source_identity"
        ));
        self.narrator.see(&format!(
            "kubectl -n {NAMESPACE} logs deploy/client -c weft-proxy | grep 'certificate installed'"
        ));
        Ok(ids)
    }

    /// The client's report lines so far.
    fn reports(&self) -> anyhow::Result<Vec<LoadReport>> {
        let log = self.kubectl(&["-n", NAMESPACE, "logs", "deploy/client", "-c", "app"])?;
        Ok(LoadReport::parse_log(&log))
    }

    /// The `n` full report windows after `mark` (the number of report lines when the
    /// change was in force): the window in progress at `mark` is skipped, as it mixes
    /// before and after.
    fn windows_after(&mut self, mark: usize, n: usize) -> anyhow::Result<Vec<LoadReport>> {
        let timeout = Duration::from_secs(5 * (n as u64 + 1) + 30);
        let started = Instant::now();
        loop {
            let reports = self.reports()?;
            if reports.len() > mark + n {
                return Ok(reports[mark + 1..=mark + n].to_vec());
            }
            if started.elapsed() > timeout {
                bail!(
                    "the client printed {} report lines in {timeout:?}, {} expected (one every 5 s): is it running? `kubectl -n {NAMESPACE} logs deploy/client -c app`",
                    reports.len().saturating_sub(mark),
                    n + 1
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    fn baseline(&mut self) -> anyhow::Result<LoadReport> {
        self.narrator.step("4. Traffic with no Route");
        self.narrator
            .progress("counting 2 windows of the client's reports (10 s)");
        let mark = self.reports()?.len();
        let windows = self.windows_after(mark, 2)?;
        let sum = LoadReport::sum(&windows);
        self.narrator.say(&format!(
            "The client's proxy picks one of `web`'s three pods per request, by power of two\n\
             choices over each pod's latency (peak EWMA), so the faster pods get more:\n  \
             {} requests, {} ok; web-v1 {}, web-v2 {}; p99 {:.1} ms (worst window)",
            sum.sent,
            sum.ok,
            sum.served_by("web-v1"),
            sum.served_by("web-v2"),
            sum.p99_ms.unwrap_or(0.0)
        ));
        self.narrator
            .say("The client's report lines, one every 5 s:");
        self.narrator.see(&format!(
            "kubectl -n {NAMESPACE} logs deploy/client -c app -f"
        ));
        Ok(sum)
    }

    /// Waits until the Weft resource `kind/name` is `Programmed` for its current
    /// generation: every proxy that needs it acknowledged it and enforces it.
    fn wait_programmed(&mut self, kind: &str, name: &str) -> anyhow::Result<()> {
        self.narrator.progress(&format!(
            "waiting for {kind} {name} to be programmed in every proxy that needs it"
        ));
        let started = Instant::now();
        let mut last = String::from("no Programmed condition yet");
        while started.elapsed() < PROGRAMMED_TIMEOUT {
            let obj = self.kubectl(&["-n", NAMESPACE, "get", kind, name, "-o", "json"])?;
            let obj: Value = serde_json::from_str(&obj)?;
            let generation = obj["metadata"]["generation"].as_i64();
            let cond = obj["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Programmed"));
            if let Some(c) = cond {
                let observed = c["observedGeneration"]
                    .as_i64()
                    .or(obj["status"]["observedGeneration"].as_i64());
                last = format!(
                    "Programmed={} ({}): {}",
                    c["status"].as_str().unwrap_or("?"),
                    c["reason"].as_str().unwrap_or("?"),
                    c["message"].as_str().unwrap_or("")
                );
                if c["status"] == "True" && observed == generation {
                    self.narrator.say(&last);
                    return self.wait_in_sync();
                }
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        bail!(
            "{kind} {name} in {NAMESPACE} was not programmed within {PROGRAMMED_TIMEOUT:?}: {last}; see `kubectl -n {NAMESPACE} describe {kind} {name}`"
        )
    }

    /// Waits until every proxy in the namespace has acknowledged the operator's latest
    /// config for it (the operator's `/proxies`, as `kubectl weft proxy-status` reads it).
    /// Kept from when `Programmed` could read True right after a resource was created,
    /// before the proxies streaming from the other replica had it; the operator no longer
    /// does (operator/tests/push.rs,
    /// `programmed_is_never_true_before_every_proxy_that_needs_a_new_resource_has_it`), so
    /// this wait can go once the demo has run on the node without needing it.
    fn wait_in_sync(&mut self) -> anyhow::Result<()> {
        let path = format!(
            "/api/v1/namespaces/{}/services/{OPERATOR_SERVICE}/proxy/proxies",
            crate::mesh::NAMESPACE
        );
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < PROGRAMMED_TIMEOUT {
            match self.kubectl(&["get", "--raw", &path]) {
                Ok(text) => {
                    let rows: Vec<Value> = serde_json::from_str(&text).unwrap_or_default();
                    let ours: Vec<&Value> = rows
                        .iter()
                        .filter(|r| {
                            r["pod"]
                                .as_str()
                                .is_some_and(|p| p.starts_with(&format!("{NAMESPACE}/")))
                        })
                        .collect();
                    let synced = ours
                        .iter()
                        .filter(|r| r["connected"] == true && r["inSync"] == true)
                        .count();
                    last = format!("{synced} of {} proxies in sync", ours.len());
                    if !ours.is_empty() && synced == ours.len() {
                        self.narrator.say(&format!(
                            "all {synced} proxies in {NAMESPACE} acknowledged the operator's latest config"
                        ));
                        return Ok(());
                    }
                }
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        bail!(
            "the proxies in {NAMESPACE} did not all acknowledge the operator's latest config within {PROGRAMMED_TIMEOUT:?} ({last}); see `kubectl weft proxy-status -n {NAMESPACE} --operator-service {OPERATOR_SERVICE}`"
        )
    }

    fn split(&mut self, yaml: &str, file: &str, expected_v2: f64) -> anyhow::Result<Split> {
        let label = format!(
            "{:.0}/{:.0}",
            (1.0 - expected_v2) * 100.0,
            expected_v2 * 100.0
        );
        self.narrator.step(&format!(
            "{}. A Route splitting {label}",
            5 + (expected_v2 > 0.2) as u8
        ));
        self.narrator
            .see(&format!("kubectl apply -f demo/manifests/{file}"));
        self.cluster.apply(yaml)?;
        self.wait_programmed("routes.weft.dev", "web")?;
        let mark = self.reports()?.len();
        self.narrator.progress(&format!(
            "counting {SPLIT_WINDOWS} windows of the client's reports ({} s)",
            SPLIT_WINDOWS * 5
        ));
        let windows = self.windows_after(mark, SPLIT_WINDOWS)?;
        let sum = LoadReport::sum(&windows);
        let split = Split::observe(&sum, expected_v2, SPLIT_TOLERANCE);
        self.narrator.say(&format!(
            "observed {} of {} answers: {}; the Route asks for web-v2 {:.0} % (tolerance ±{:.0} points)",
            split.v1 + split.v2,
            sum.sent,
            split.describe(),
            expected_v2 * 100.0,
            SPLIT_TOLERANCE * 100.0
        ));
        if split.within_tolerance() {
            self.narrator.say("within tolerance.");
        } else {
            let text = format!(
                "the {label} split was observed as {}, outside ±{:.0} points",
                split.describe(),
                SPLIT_TOLERANCE * 100.0
            );
            self.problem(text);
        }
        if sum.ok != sum.sent {
            let text = format!(
                "during the {label} split {} of {} requests failed: {:?} {:?}",
                sum.sent - sum.ok,
                sum.sent,
                sum.status,
                sum.errors
            );
            self.problem(text);
        }
        self.narrator.see(&format!(
            "kubectl -n {NAMESPACE} get routes.weft.dev web   # Programmed: which proxies enforce it"
        ));
        Ok(split)
    }

    /// A pod's proxy metrics, through the API server's pod proxy.
    fn metrics(&self, pod: &str) -> anyhow::Result<String> {
        self.kubectl(&[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/{NAMESPACE}/pods/{pod}:{ADMIN_PORT}/proxy/metrics"),
        ])
    }

    fn breaker(&mut self) -> anyhow::Result<BreakerOutcome> {
        self.narrator.step("7. A Breaker ejecting a failing pod");
        self.narrator
            .see("kubectl apply -f demo/manifests/breaker.yaml");
        self.cluster.apply(BREAKER)?;
        self.wait_programmed("breakers.weft.dev", "web-v2")?;
        let client = self.pod("app=client")?;
        let failing = self.pod("app=web,version=v2")?;
        let prefix = format!("web-v2.{NAMESPACE}.");
        let ejections_before = metric_sum(
            &self.metrics(&client)?,
            "weft_breaker_ejections_total",
            &prefix,
        );
        let mark = self.reports()?.len();
        let fail_cmd =
            format!("kubectl -n {NAMESPACE} exec {failing} -c app -- weft-demo-app fail");
        self.narrator
            .say(&format!("Making {failing} answer 500 to every request:"));
        self.narrator.see(&fail_cmd);
        self.kubectl(&[
            "-n",
            NAMESPACE,
            "exec",
            &failing,
            "-c",
            "app",
            "--",
            "weft-demo-app",
            "fail",
        ])?;
        let failed_at = Instant::now();
        self.narrator.progress(&format!(
            "waiting for the client's proxy to eject {failing} (5 server errors in a row)"
        ));
        let (ejected_endpoints, seconds_to_ejection) = loop {
            let metrics = self.metrics(&client)?;
            let ejections = metric_sum(&metrics, "weft_breaker_ejections_total", &prefix);
            if ejections > ejections_before {
                break (
                    metric_sum(&metrics, "weft_breaker_ejected_endpoints", &prefix),
                    failed_at.elapsed().as_secs_f64(),
                );
            }
            if failed_at.elapsed() > EJECTION_TIMEOUT {
                bail!(
                    "the client's proxy ejected no web-v2 endpoint within {EJECTION_TIMEOUT:?} of {failing} failing (weft_breaker_ejections_total{{service=~\"{prefix}*\"}} stayed at {ejections}); see `kubectl -n {NAMESPACE} logs deploy/client -c app`"
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let ejected_mark = self.reports()?.len();
        self.narrator.progress(&format!(
            "ejected after {seconds_to_ejection:.1} s; counting 2 windows of the client's reports (10 s)"
        ));
        let after = LoadReport::sum(&self.windows_after(ejected_mark, 2)?);
        let reports = self.reports()?;
        let during = LoadReport::sum(reports.get(mark..=ejected_mark).unwrap_or_default());
        let outcome = BreakerOutcome {
            failing_pod: failing.clone(),
            failures_before_ejection: during.sent - during.ok,
            seconds_to_ejection,
            ejected_endpoints,
            after,
        };
        self.narrator.say(&format!(
            "before the ejection the client saw {} failed requests; the client's proxy now reports\n\
             {} web-v2 endpoint(s) ejected. In the next 10 s: {} requests, success rate {:.1} %,\n\
             {} of them answered by {failing}.",
            outcome.failures_before_ejection,
            outcome.ejected_endpoints,
            outcome.after.sent,
            outcome.after.success_rate() * 100.0,
            outcome.failing_pod_requests_after()
        ));
        if outcome.after.success_rate() < 0.99 || outcome.failing_pod_requests_after() > 0 {
            let text = format!(
                "after the ejection the client's success rate is {:.1} % and {failing} still answered {} requests",
                outcome.after.success_rate() * 100.0,
                outcome.failing_pod_requests_after()
            );
            self.problem(text);
        }
        self.narrator.see(&format!(
            "kubectl get --raw /api/v1/namespaces/{NAMESPACE}/pods/{client}:{ADMIN_PORT}/proxy/metrics | grep weft_breaker"
        ));
        if let Some(explain) = self.kubectl_weft_output(&[
            "explain",
            &client,
            "http://web-v2/",
            "-n",
            NAMESPACE,
            "--operator-service",
            OPERATOR_SERVICE,
        ]) {
            for line in explain.lines().filter(|l| l.contains("eject")) {
                self.narrator.say(line.trim());
            }
        }
        self.narrator.see(&format!(
            "kubectl weft explain {client} http://web-v2/ -n {NAMESPACE} --operator-service {OPERATOR_SERVICE}"
        ));
        // The pod recovers; the proxy lets it back in when its ejection time is up.
        self.kubectl(&[
            "-n",
            NAMESPACE,
            "exec",
            &failing,
            "-c",
            "app",
            "--",
            "weft-demo-app",
            "recover",
        ])?;
        self.narrator.say(&format!(
            "{failing} recovered (`weft-demo-app recover`); it rejoins when its 60 s ejection ends."
        ));
        Ok(outcome)
    }

    fn policy(&mut self) -> anyhow::Result<PolicyOutcome> {
        self.narrator
            .step("8. A Policy refusing an unauthorized client");
        self.narrator
            .see("kubectl apply -f demo/manifests/policy.yaml");
        self.cluster.apply(POLICY)?;
        self.wait_programmed("policies.weft.dev", "web")?;
        let mark = self.reports()?.len();
        let _ = self.kubectl(&[
            "-n",
            NAMESPACE,
            "delete",
            "pod",
            "intruder",
            "--ignore-not-found",
            "--wait=true",
        ]);
        self.narrator
            .see("kubectl apply -f demo/manifests/intruder.yaml");
        self.cluster.apply(INTRUDER)?;
        self.narrator
            .progress("waiting for the intruder pod to send its 20 requests and exit");
        let started = Instant::now();
        loop {
            let phase = self.kubectl(&[
                "-n",
                NAMESPACE,
                "get",
                "pod",
                "intruder",
                "-o",
                "jsonpath={.status.phase}",
            ])?;
            if phase == "Succeeded" || phase == "Failed" {
                break;
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!(
                    "the intruder pod did not finish within 120 s (phase {phase:?}); see `kubectl -n {NAMESPACE} describe pod intruder`"
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        let log = self.kubectl(&["-n", NAMESPACE, "logs", "intruder", "-c", "app"])?;
        let intruder = LoadReport::parse_log(&log)
            .into_iter()
            .rfind(|r| r.kind == "final")
            .with_context(|| format!("the intruder printed no final report line:\n{log}"))?;
        let client = LoadReport::sum(&self.windows_after(mark, 2)?);
        let mut denials_counted = 0.0;
        for pod in self
            .kubectl(&[
                "-n",
                NAMESPACE,
                "get",
                "pods",
                "-l",
                "app=web",
                "-o",
                "jsonpath={.items[*].metadata.name}",
            ])?
            .split_whitespace()
        {
            if let Ok(m) = self.metrics(pod) {
                denials_counted += metric_sum(&m, "weft_authz_denials_total", "");
            }
        }
        let outcome = PolicyOutcome {
            intruder,
            client,
            denials_counted,
        };
        self.narrator.say(&format!(
            "intruder (ServiceAccount intruder): {} requests, answers by status {:?}, weft-error {:?}\n\
             client (ServiceAccount client):     {} requests, {} ok (answers by status {:?})\n\
             the web pods' proxies counted {} denials (weft_authz_denials_total).",
            outcome.intruder.sent,
            outcome.intruder.status,
            outcome.intruder.weft_errors,
            outcome.client.sent,
            outcome.client.ok,
            outcome.client.status,
            outcome.denials_counted
        ));
        let refused = outcome.intruder.status_count(403);
        if outcome.intruder.sent == 0 || refused != outcome.intruder.sent {
            let text = format!(
                "the intruder's {} requests were not all refused with 403 ({:?})",
                outcome.intruder.sent, outcome.intruder.status
            );
            self.problem(text);
        }
        if outcome.client.sent == 0 || outcome.client.ok != outcome.client.sent {
            let text = format!(
                "the client was not served every request under the Policy ({} of {} ok, {:?})",
                outcome.client.ok, outcome.client.sent, outcome.client.status
            );
            self.problem(text);
        }
        self.narrator
            .see(&format!("kubectl -n {NAMESPACE} logs intruder -c app"));
        self.narrator.see(&format!(
            "kubectl -n {NAMESPACE} logs deploy/web-v1 -c weft-proxy | grep forbidden"
        ));
        Ok(outcome)
    }

    fn stat(&mut self) -> anyhow::Result<Option<String>> {
        self.narrator
            .step("9. Golden metrics: success rate, requests per second, latency");
        let out = self.kubectl_weft_output(&["stat", "deploy", "-n", NAMESPACE, "--window", "5s"]);
        match &out {
            Some(table) => self.narrator.say(table),
            None => self.narrator.say(
                "kubectl-weft was not found beside this binary: build it with `cargo build -p kubectl-weft`",
            ),
        }
        self.narrator.say(
            "kubectl finds plugins on PATH: put the built binary there, for example\n  \
             export PATH=\"${CARGO_TARGET_DIR:-target}/debug:$PATH\"",
        );
        self.narrator
            .see(&format!("kubectl weft stat deploy -n {NAMESPACE}"));
        self.narrator.see(&format!(
            "kubectl weft stat deploy/client -n {NAMESPACE} --to svc/web --watch"
        ));
        self.narrator.see(&format!(
            "kubectl weft proxy-status -n {NAMESPACE} --operator-service {OPERATOR_SERVICE}"
        ));
        Ok(out)
    }

    fn tap(&mut self) -> Option<String> {
        self.narrator
            .step("10. Live requests: who calls web-v1, and how it went");
        let args = [
            "tap",
            "deploy/web-v1",
            "-n",
            NAMESPACE,
            "--direction",
            "inbound",
            "--max",
            "5",
            "--for",
            "20s",
        ];
        let out = self.kubectl_weft_output(&args);
        if let Some(lines) = &out {
            self.narrator.say(lines);
            self.narrator.say(
                "Each line is one request web-v1's proxy answered, as it finished: status, \
                 latency and the client's mesh identity, verified over mutual TLS.",
            );
        }
        self.narrator.see(&format!(
            "kubectl weft tap deploy/web-v1 -n {NAMESPACE} --path / --for 5m"
        ));
        out
    }

    /// Runs the kubectl-weft binary against the cluster, for at most
    /// [`KUBECTL_WEFT_TIMEOUT`]; `None` (with the reason said) when it is missing, fails or
    /// takes longer.
    fn kubectl_weft_output(&mut self, args: &[&str]) -> Option<String> {
        let bin = self.kubectl_weft.clone()?;
        let mut cmd = Command::new(&bin);
        cmd.args(args)
            .env("KUBECONFIG", self.cluster.kubeconfig())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = &self.kubectl_dir {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let mut dirs = vec![dir.clone()];
            dirs.extend(std::env::split_paths(&path));
            if let Ok(joined) = std::env::join_paths(dirs) {
                cmd.env("PATH", joined);
            }
        }
        let what = format!("kubectl weft {}", args.join(" "));
        match run_bounded(cmd, KUBECTL_WEFT_TIMEOUT) {
            Ok(out) if out.status.success() => {
                Some(String::from_utf8_lossy(&out.stdout).into_owned())
            }
            Ok(out) => {
                self.narrator.say(&format!(
                    "{what} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
                None
            }
            Err(e) => {
                self.narrator.say(&format!("{what}: {e:#}"));
                None
            }
        }
    }
}

/// Runs `cmd` (its output piped) for at most `timeout`, killing it after that.
fn run_bounded(mut cmd: Command, timeout: Duration) -> anyhow::Result<Output> {
    let mut child = cmd.spawn().context("spawning")?;
    // Drained on threads, so a child that writes much cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("no answer within {timeout:?}; stopped");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// The identity in a proxy's `certificate installed identity=spiffe://…` log line.
pub fn certificate_identity(log: &str) -> Option<String> {
    log.lines()
        .filter(|l| l.contains("certificate installed"))
        .find_map(|l| {
            let start = l.find("spiffe://")?;
            let id: String = l[start..]
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '"' && *c != ',')
                .collect();
            Some(id)
        })
}

/// `field` of the last access-log line of `direction` that has it.
pub fn access_log_field(log: &str, direction: &str, field: &str) -> Option<String> {
    log.lines()
        .rev()
        .filter(|l| l.trim_start().starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter(|v| v["direction"] == direction)
        .find_map(|v| v[field].as_str().map(str::to_owned))
}

/// The sum of a metric's series whose `service` label starts with `service_prefix` (every
/// series when the prefix is empty), from Prometheus text.
pub fn metric_sum(text: &str, name: &str, service_prefix: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => {
                    let (labels, value) = r.split_once('}')?;
                    (labels, value)
                }
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            if !service_prefix.is_empty() {
                let service = labels
                    .split(',')
                    .find_map(|kv| kv.trim().strip_prefix("service=\""))
                    .map(|v| v.trim_end_matches('"'))?;
                if !service.starts_with(service_prefix) {
                    return None;
                }
            }
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

/// The kubectl-weft binary built beside `exe` (in the same target directory), if any.
pub fn find_kubectl_weft(exe: &Path) -> Option<PathBuf> {
    exe.ancestors()
        .skip(1)
        .take(3)
        .map(|d| d.join("kubectl-weft"))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_read_from_proxy_logs() {
        let log = "2026-11-30T17:00:01Z  INFO weft_proxy::identity::client: certificate installed identity=spiffe://cluster.local/ns/weft-demo/sa/web not_after=1764612001\n\
            {\"direction\":\"inbound\",\"status\":200}\n\
            {\"direction\":\"inbound\",\"source_identity\":\"spiffe://cluster.local/ns/weft-demo/sa/client\",\"status\":200}\n\
            {\"direction\":\"outbound\",\"destination_identity\":\"spiffe://cluster.local/ns/weft-demo/sa/web\"}\n";
        assert_eq!(
            certificate_identity(log).as_deref(),
            Some("spiffe://cluster.local/ns/weft-demo/sa/web")
        );
        assert_eq!(
            access_log_field(log, "inbound", "source_identity").as_deref(),
            Some("spiffe://cluster.local/ns/weft-demo/sa/client")
        );
        assert_eq!(
            access_log_field(log, "outbound", "destination_identity").as_deref(),
            Some("spiffe://cluster.local/ns/weft-demo/sa/web")
        );
        assert_eq!(access_log_field(log, "outbound", "source_identity"), None);
    }

    #[test]
    fn metric_series_are_summed_by_service_prefix() {
        let text = "# TYPE weft_breaker_ejections_total counter\n\
            weft_breaker_ejections_total{service=\"web-v2.weft-demo.80\"} 2\n\
            weft_breaker_ejections_total{service=\"web-v1.weft-demo.80\"} 5\n\
            weft_breaker_ejections_total_other{service=\"web-v2.weft-demo.80\"} 7\n\
            weft_authz_denials_total{policy=\"weft-demo/web\"} 20\n";
        assert_eq!(
            metric_sum(text, "weft_breaker_ejections_total", "web-v2.weft-demo."),
            2.0
        );
        assert_eq!(metric_sum(text, "weft_authz_denials_total", ""), 20.0);
        assert_eq!(
            metric_sum(text, "weft_breaker_ejected_endpoints", "web-v2."),
            0.0
        );
    }

    #[test]
    fn the_embedded_manifests_pin_the_demo_image_of_this_version() {
        let image = crate::mesh::image_ref("weft-demo-app");
        for (name, yaml) in APP_MANIFESTS
            .iter()
            .copied()
            .chain([("intruder.yaml", INTRUDER)])
        {
            for line in yaml
                .lines()
                .filter(|l| l.trim_start().starts_with("image:"))
            {
                assert_eq!(line.trim(), format!("image: {image}"), "{name}");
            }
        }
    }
}
