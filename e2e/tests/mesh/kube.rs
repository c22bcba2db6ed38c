//! kubectl as a user drives it: apply, wait, get JSON, exec, logs, and the API server's pod
//! proxy for a proxy's admin port. Synchronous (each call is one kubectl process) so the
//! scenarios read as the commands a user would type.

use std::{
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::Value;
use weft_e2e::mesh::Cluster;

/// The admin port the injector gives proxies (charts/weft values `proxy.ports.admin`).
pub const ADMIN_PORT: u16 = 15021;
/// The chart's trust domain (values `trustDomain`).
pub const TRUST_DOMAIN: &str = "cluster.local";

/// kubectl against one cluster: `weft_e2e::mesh::Cluster`'s commands, plus what the
/// scenarios read (JSON, pods, exec, the pod proxy, logs, a dump on failure).
#[derive(Clone, Debug)]
pub struct Kube {
    cluster: Cluster,
}

impl Kube {
    /// kubectl for `cluster`.
    pub fn new(cluster: Cluster) -> Self {
        Kube { cluster }
    }

    /// The cluster's kubeconfig.
    pub fn kubeconfig(&self) -> &std::path::Path {
        self.cluster.kubeconfig()
    }

    /// A kubectl command for the cluster.
    pub fn cmd(&self) -> Command {
        self.cluster.kubectl()
    }

    /// Runs kubectl with `args`: its stdout, or an error with both streams.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.output(args)?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs kubectl with `args` and returns whatever it did.
    pub fn output(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.cmd()
            .args(args)
            .output()
            .with_context(|| format!("spawning kubectl {}", args.join(" ")))
    }

    /// Starts kubectl with `args` in the background, stdout piped, stderr to `stderr`.
    pub fn spawn(&self, args: &[&str], stderr: std::fs::File) -> anyhow::Result<Child> {
        self.cmd()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("spawning kubectl {}", args.join(" ")))
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        self.cluster
            .apply(yaml)
            .with_context(|| format!("--- manifest ---\n{yaml}"))
    }

    /// `kubectl get ... -o json`, parsed.
    pub fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-o", "json"]);
        let text = self.run(&all)?;
        serde_json::from_str(&text).context("kubectl printed no JSON")
    }

    /// The pods of `ns` matching `selector`, as JSON objects.
    pub fn pods(&self, ns: &str, selector: &str) -> anyhow::Result<Vec<Value>> {
        let list = self.json(&["-n", ns, "get", "pods", "-l", selector])?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    /// The names of the running (not terminating) pods of `ns` matching `selector`.
    pub fn pod_names(&self, ns: &str, selector: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .pods(ns, selector)?
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
            .collect())
    }

    /// Waits until every pod of `ns` matching `selector` is Ready (at least one exists).
    pub fn wait_ready(&self, ns: &str, selector: &str, timeout: Duration) -> anyhow::Result<()> {
        eventually(timeout, || {
            let pods = self.pods(ns, selector)?;
            if pods.is_empty() {
                bail!("no pod matches {selector} in {ns}");
            }
            for p in &pods {
                if !is_ready(p) {
                    bail!(
                        "pod {} is not Ready: {}",
                        p["metadata"]["name"],
                        p["status"]
                    );
                }
            }
            Ok(())
        })
    }

    /// `kubectl rollout status` of `what` (such as `deploy/web`).
    pub fn rollout(&self, ns: &str, what: &str, timeout: Duration) -> anyhow::Result<()> {
        self.cluster.wait_rollout(ns, what, timeout)
    }

    /// Runs `cmd` in container `container` of `pod`: its stdout, or an error.
    pub fn exec(
        &self,
        ns: &str,
        pod: &str,
        container: &str,
        cmd: &[&str],
    ) -> anyhow::Result<String> {
        let mut args = vec!["-n", ns, "exec", pod, "-c", container, "--"];
        args.extend(cmd);
        self.run(&args)
    }

    /// A GET of `path` sent from `pod` (a busybox container `main`) to `host`, through
    /// whatever the pod's network does with it: the raw response. busybox's wget crashes
    /// in pods, so the request is written with nc; the sleep keeps nc's input open until
    /// the answer came back.
    pub fn http_get(
        &self,
        ns: &str,
        pod: &str,
        host: &str,
        port: u16,
        path: &str,
    ) -> anyhow::Result<String> {
        let script = format!(
            "(printf 'GET {path} HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n'; sleep 2) | nc {host} {port}"
        );
        self.exec(ns, pod, "main", &["sh", "-c", &script])
    }

    /// A proxy's admin endpoint (`/metrics`, `/config`) read through the API server's pod
    /// proxy, as a user without port-forward would.
    pub fn proxy_admin(&self, ns: &str, pod: &str, path: &str) -> anyhow::Result<String> {
        self.run(&[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/{ns}/pods/{pod}:{ADMIN_PORT}/proxy{path}"),
        ])
    }

    /// The logs of `container` in `pod`.
    pub fn logs(&self, ns: &str, pod: &str, container: &str) -> anyhow::Result<String> {
        self.run(&["-n", ns, "logs", pod, "-c", container])
    }

    /// The access-log line `pod`'s proxy wrote for a request to `path`, in `direction`
    /// (`inbound` or `outbound`) when given; an error listing the log when there is none.
    pub fn logged_request(
        &self,
        ns: &str,
        pod: &str,
        path: &str,
        direction: Option<&str>,
    ) -> anyhow::Result<Value> {
        let lines = access_log(&self.logs(ns, pod, "weft-proxy")?);
        lines
            .iter()
            .find(|l| l["path"] == path && direction.is_none_or(|d| l["direction"] == d))
            .cloned()
            .with_context(|| format!("{pod}'s proxy logged no {path}: {lines:?}"))
    }

    /// What a failing scenario leaves for its reader: pods, events and the proxies' last
    /// log lines in `ns`.
    pub fn dump(&self, ns: &str) -> String {
        let mut text = String::new();
        for args in [
            vec![
                "-n",
                ns,
                "get",
                "pods,svc,endpointslices,jobs",
                "-o",
                "wide",
            ],
            vec!["-n", ns, "get", "events", "--sort-by=.lastTimestamp"],
        ] {
            match self.output(&args) {
                Ok(out) => {
                    text.push_str(&String::from_utf8_lossy(&out.stdout));
                    text.push_str(&String::from_utf8_lossy(&out.stderr));
                }
                Err(e) => text.push_str(&format!("{e:#}\n")),
            }
        }
        for pod in self.pod_names(ns, "weft.dev/meshed").unwrap_or_default() {
            if let Ok(out) = self.output(&["-n", ns, "logs", &pod, "-c", "weft-proxy", "--tail=40"])
            {
                text.push_str(&format!(
                    "--- {pod} weft-proxy ---\n{}",
                    String::from_utf8_lossy(&out.stdout)
                ));
            }
        }
        text
    }
}

/// Whether a pod (its JSON) has the condition `Ready` true.
pub fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// Retries `f` every 500 ms until it succeeds or `timeout` passes, then returns its last
/// error.
pub fn eventually<T>(
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > timeout => {
                return Err(e.context(format!("still failing after {timeout:?}")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// The sum of the samples of `name` in Prometheus text `text` whose labels include every
/// pair of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// The value of the injected proxy's environment variable `name` in a pod's `spec`.
pub fn proxy_env<'a>(spec: &'a Value, name: &str) -> Option<&'a str> {
    spec["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] == "weft-proxy")
        .flat_map(|c| c["env"].as_array().into_iter().flatten())
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
}

/// The SPIFFE ID of ServiceAccount `sa` in namespace `ns`.
pub fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}")
}

/// The JSON lines of an access log (a proxy's stdout), skipping anything else.
pub fn access_log(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter(|v| v.get("direction").is_some())
        .collect()
}
