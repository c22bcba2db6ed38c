//! The Helm chart (`charts/weft`) with the real Helm (built by the test bed from the Go
//! module proxy) against the test bed's real API server.
//!
//! ```text
//! helm lint --strict ─ helm template (default / non-default values) ─▶ kubectl apply --dry-run=server
//! helm install ─▶ every object exists ─▶ weft-operator process with the Deployment's env
//!                 and the chart ServiceAccount's token ─▶ webhook injects, status, no `forbidden`
//! helm upgrade ─▶ Deployment changed, webhook keeps its caBundle ─▶ restarted operator injects the new image
//! helm uninstall ─▶ chart objects gone; CRDs and meshed pods stay; pods create without the webhook
//! ```
//!
//! No kubelet exists yet, so the Deployment never gets pods: the test starts the operator
//! as a process with the rendered container's environment, listening on loopback (the
//! rendered `0.0.0.0` becomes `127.0.0.1`), and the API server calls its webhook at the
//! URL the chart's `webhook.url` value gives (the test bed's API server cannot reach
//! Services). A "rollout" is the test stopping that process and starting one from the
//! upgraded Deployment.
//!
//! `weft-proxy` and `kubectl-weft` are other packages' binaries: `cargo test --workspace`
//! builds them (run `cargo build -p weft-proxy -p kubectl-weft` first when testing this
//! package alone).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, ensure};
use k8s_openapi::{
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        apps::v1::Deployment,
        authentication::v1::TokenRequest,
        core::v1::{ConfigMap, Namespace, Pod, ServiceAccount},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use support::{has_proxy, mesh::*, processes::*};
use weft_e2e::{Helm, shared, shared::eventually};

/// The chart's directory.
fn chart() -> PathBuf {
    weft_e2e::repo_root().join("charts/weft")
}

fn helm() -> Helm {
    Helm::ensure().expect("building or finding helm")
}

/// Runs `cmd`; its stdout on success, else an error with its stderr.
fn run(mut cmd: Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// A `helm` command with its own home under `dir`, against the test bed.
fn helm_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = helm().command(&dir.join("helm"), &shared::testbed().kubeconfig());
    cmd.args(args);
    cmd
}

/// `values` written as a values file (JSON is YAML) in `dir`.
fn values_file(dir: &Path, name: &str, values: &Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(values).unwrap()).unwrap();
    path
}

/// The documents of a multi-document YAML stream, as JSON (empty documents skipped).
fn documents(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|d| Value::deserialize(d).ok())
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in the rendered chart"))
}

/// A values set that changes every group from its default.
fn non_default_values() -> Value {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(2));
    let root = params.self_signed(&key).unwrap();
    json!({
        "fullnameOverride": "mesh",
        "trustDomain": "example.org",
        "mesh": {"mtlsMode": "Strict"},
        "operator": {
            "replicas": 3,
            "image": {"repository": "registry.example/weft-operator", "tag": "9.9.9", "pullPolicy": "Always"},
            "imagePullSecrets": [{"name": "pull"}],
            "logLevel": "debug",
            "ports": {"push": 9090, "identity": 16012, "webhook": 9443, "admin": 9080},
            "leaderElection": {"leaseName": "mesh-leader", "leaseDuration": "20s"},
            "watchNamespace": "shop",
            "extraEnv": [{"name": "WEFT_PUSH_ACK_TIMEOUT", "value": "45s"}],
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
            "priorityClassName": "system-cluster-critical",
            "topologySpread": {"enabled": false},
            "podDisruptionBudget": {"enabled": true, "maxUnavailable": "50%"}
        },
        "serviceAccount": {"name": "mesh-sa", "annotations": {"example.org/role": "weft"}},
        "webhook": {
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
            "annotationOptIn": false,
            "namespaceSelector": {"key": "mesh", "value": "prod"},
            "certLifetime": "48h",
            "caSecret": "mesh-ca"
        },
        "identity": {
            "certLifetime": "12h",
            "secretName": "mesh-root",
            "trustRoot": {"caCrt": root.pem(), "caKey": key.serialize_pem()}
        },
        "proxy": {
            "image": {"repository": "registry.example/weft-proxy", "tag": "9.9.9", "pullPolicy": "IfNotPresent"},
            "logLevel": "weft_proxy=debug",
            "resources": {"cpuRequest": "50m", "cpuLimit": "1", "memoryRequest": "32Mi", "memoryLimit": ""},
            "ports": {"outbound": 16001, "inbound": 16006, "admin": 16021},
            "uid": 7000,
            "tokenExpirationSeconds": 7200,
            "excludedNamespaces": ["monitoring"],
            "tracing": {"collector": "otel-collector.observability:4317", "sampling": 0.25},
            "meshHttp1": "sessions"
        },
        "metrics": {"service": {"enabled": false}}
    })
}

#[test]
fn the_chart_lints_strictly_with_default_and_other_values() {
    let dir = tempfile::tempdir().unwrap();
    let chart = chart();
    let chart = chart.to_str().unwrap();
    run(helm_cmd(dir.path(), &["lint", "--strict", chart])).unwrap();
    let values = values_file(dir.path(), "values.json", &non_default_values());
    run(helm_cmd(
        dir.path(),
        &["lint", "--strict", chart, "-f", values.to_str().unwrap()],
    ))
    .unwrap();
}

#[test]
fn a_wrong_value_fails_at_install_time_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let chart = chart();
    for (set, says) in [
        ("webhook.failurePolicy=Sometimes", "/webhook/failurePolicy"),
        ("operator.replicas=0", "/operator/replicas"),
        ("proxy.imgae.tag=1", "imgae"),
        ("proxy.resources.cpuLimit=lots", "/proxy/resources/cpuLimit"),
        ("operator.runAsUser=0", "/operator/runAsUser"),
        ("proxy.tracing.collector=otel", "/proxy/tracing/collector"),
        (
            "proxy.tracing.collector=https://otel:4317",
            "/proxy/tracing/collector",
        ),
        (
            "proxy.tracing.sampling=0.5",
            "proxy.tracing.sampling needs proxy.tracing.collector",
        ),
        (
            "identity.trustRoot.caCrt=not-alone",
            "caCrt needs caKey, or tlsCrt and tlsKey",
        ),
        ("mesh.mtlsMode=strict", "/mesh/mtlsMode"),
        ("proxy.meshHttp1=mux", "/proxy/meshHttp1"),
        (
            "mesh.mtlsMode=Strict,identity.enabled=false",
            "mesh.mtlsMode Strict needs identity.enabled",
        ),
    ] {
        let err = run(helm_cmd(
            dir.path(),
            &["template", "weft", chart.to_str().unwrap(), "--set", set],
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains(says), "--set {set}: {err}");
    }
}

/// The value of the operator container's environment variable `name` in `deployment`.
fn operator_env<'a>(deployment: &'a Value, name: &str) -> Option<&'a Value> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| &e["value"])
}

#[test]
fn the_mesh_mtls_mode_reaches_the_operator_as_its_flag() {
    let dir = tempfile::tempdir().unwrap();
    let chart = chart();
    let chart = chart.to_str().unwrap();
    for (set, flag) in [
        (None, "permissive"),
        (Some("mesh.mtlsMode=Permissive"), "permissive"),
        (Some("mesh.mtlsMode=Strict"), "strict"),
        // Disabled needs no certificates, so it renders without the identity endpoint too.
        (
            Some("mesh.mtlsMode=Disabled,identity.enabled=false"),
            "disabled",
        ),
    ] {
        let mut args = vec!["template", "weft", chart];
        if let Some(set) = set {
            args.extend(["--set", set]);
        }
        let docs = documents(&run(helm_cmd(dir.path(), &args)).unwrap());
        let dep = find(&docs, "Deployment");
        // The value `weft-operator --mesh-mtls-mode` takes (clap's lower-case names).
        assert_eq!(
            operator_env(dep, "WEFT_MESH_MTLS_MODE"),
            Some(&json!(flag)),
            "--set {set:?}"
        );
    }
}

#[tokio::test]
async fn rendered_manifests_are_accepted_by_the_api_server() {
    let client = shared::client().await.unwrap();
    let ns = shared::namespace(&client, "chart-dry").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let chart = chart();
    let other = values_file(dir.path(), "values.json", &non_default_values());
    for (name, values) in [("default", None), ("non-default", Some(&other))] {
        let mut args = vec![
            "template",
            "dry",
            chart.to_str().unwrap(),
            "--namespace",
            &ns,
        ];
        if let Some(v) = values {
            args.extend(["-f", v.to_str().unwrap()]);
        }
        let rendered = run(helm_cmd(dir.path(), &args)).unwrap();
        let docs = documents(&rendered);
        // Without prometheus-operator's CRDs the API server would refuse a ServiceMonitor:
        // it is off unless asked for.
        assert!(docs.iter().all(|d| d["kind"] != "ServiceMonitor"), "{name}");
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, &rendered).unwrap();
        let mut kubectl = shared::testbed().kubectl();
        kubectl
            .args(["apply", "--dry-run=server", "-n", &ns, "-f"])
            .arg(&file);
        let out = run(kubectl).unwrap_or_else(|e| panic!("{name} values: {e:#}"));
        assert_eq!(
            out.lines().count(),
            docs.len(),
            "{name}: every object accepted:\n{out}"
        );
        // The injection settings the chart renders are ones the operator accepts.
        let cm = find(&docs, "ConfigMap");
        let data: std::collections::BTreeMap<String, String> =
            serde_json::from_value(cm["data"].clone()).unwrap();
        let base = weft_operator::inject::InjectConfig::default();
        let settings = weft_operator::inject::settings::apply(&base, &data)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if values.is_none() {
            assert_eq!(settings.tracing, None, "no tracing unless asked for");
            assert_eq!(settings.mesh_http1, None, "the proxy's default transport");
        }
        if values.is_some() {
            assert_eq!(
                settings.tracing,
                Some(weft_operator::inject::InjectTracing {
                    collector: "otel-collector.observability:4317".to_owned(),
                    sampling: Some("0.25".to_owned()),
                })
            );
            assert_eq!(settings.mesh_http1, Some("sessions"));
            let dep = find(&docs, "Deployment");
            assert_eq!(dep["spec"]["replicas"], 3);
            assert_eq!(
                operator_env(dep, "WEFT_MESH_MTLS_MODE"),
                Some(&json!("strict"))
            );
            let cm = find(&docs, "ConfigMap");
            assert_eq!(
                cm["data"]["proxyImage"],
                "registry.example/weft-proxy:9.9.9"
            );
            assert_eq!(
                cm["data"]["excludedNamespaces"],
                format!("kube-system,{ns},monitoring")
            );
            let secret = find(&docs, "Secret");
            assert_eq!(secret["metadata"]["name"], "mesh-root");
            let mwc = find(&docs, "MutatingWebhookConfiguration");
            assert_eq!(mwc["webhooks"].as_array().unwrap().len(), 2);
        }
    }
    // The monitoring objects render when asked for. The dashboard's ConfigMap is applied;
    // the ServiceMonitor and PodMonitor are not (no prometheus-operator CRDs here).
    let rendered = run(helm_cmd(
        dir.path(),
        &[
            "template",
            "dry",
            chart.to_str().unwrap(),
            "--namespace",
            &ns,
            "--set",
            "metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true,metrics.grafanaDashboard.enabled=true",
        ],
    ))
    .unwrap();
    let docs = documents(&rendered);
    let sm = find(&docs, "ServiceMonitor");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "http-metrics");
    let pm = find(&docs, "PodMonitor");
    assert_eq!(
        pm["spec"]["selector"]["matchLabels"][weft_operator::inject::keys::MESHED_LABEL],
        "true"
    );
    let dashboard = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["labels"]["grafana_dashboard"] == "1")
        .expect("the dashboard ConfigMap");
    let json: Value =
        serde_json::from_str(dashboard["data"]["weft-mesh.json"].as_str().unwrap()).unwrap();
    assert_eq!(json["uid"], "weft-mesh");
    let file = dir.path().join("dashboard.yaml");
    std::fs::write(&file, serde_json::to_string(dashboard).unwrap()).unwrap();
    let mut kubectl = shared::testbed().kubectl();
    kubectl
        .args(["apply", "--dry-run=server", "-n", &ns, "-f"])
        .arg(&file);
    run(kubectl).unwrap();
}

/// A dashboard panel that queries a metric nobody exports shows "No data" forever: every
/// metric the dashboard names is in docs/metrics.md (which a test of the operator's
/// metrics keeps true),
/// or is the kubelet's cAdvisor metric of the proxy container.
#[test]
fn every_dashboard_query_uses_an_exported_metric() {
    let text = std::fs::read_to_string(chart().join("dashboards/weft-mesh.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let documented =
        std::fs::read_to_string(weft_e2e::repo_root().join("docs/metrics.md")).unwrap();
    let cadvisor = [
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
    ];
    let mut exprs = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(e)) = m.get("expr") {
                    out.push(e.clone());
                }
                m.values().for_each(|v| walk(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut exprs);
    assert!(exprs.len() >= 15, "{} queries", exprs.len());
    let mut names = std::collections::BTreeSet::new();
    for e in &exprs {
        for word in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("weft_") || word.starts_with("container_") {
                names.insert(word.to_owned());
            }
        }
        if e.contains("container_") {
            assert!(
                e.contains(&format!(
                    "container=\"{}\"",
                    weft_operator::inject::keys::PROXY_CONTAINER
                )),
                "{e}"
            );
        }
    }
    for name in &names {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            documented.contains(&format!("`{base}`")) || cadvisor.contains(&name.as_str()),
            "the dashboard queries {name}, which docs/metrics.md does not list"
        );
    }
}

/// The loopback ports the operator process listens on, given to the chart as its ports.
struct Ports {
    push: SocketAddr,
    identity: SocketAddr,
    webhook: SocketAddr,
    admin: SocketAddr,
}

/// The values of the install test: loopback-reachable webhook, this test's namespaces only.
fn install_values(ports: &Ports, scope: &str, proxy_tag: &str, failure_policy: &str) -> Value {
    json!({
        "operator": {
            "ports": {
                "push": ports.push.port(), "identity": ports.identity.port(),
                "webhook": ports.webhook.port(), "admin": ports.admin.port()
            },
            "leaderElection": {"leaseDuration": "5s"}
        },
        "webhook": {
            "url": format!("https://127.0.0.1:{}/inject", ports.webhook.port()),
            "namespaceSelector": {"key": "weft.dev/chart-test", "value": scope},
            "failurePolicy": failure_policy
        },
        "proxy": {
            "image": {"repository": "registry.example/weft-proxy", "tag": proxy_tag},
            "logLevel": "weft_proxy=debug",
            "resources": {"cpuLimit": "500m", "memoryLimit": "96Mi"},
            "ports": {"admin": 15121},
            "tracing": {"collector": "otel.observability:4317", "sampling": 0.1}
        }
    })
}

/// A kubeconfig that authenticates with `token` (the chart ServiceAccount's).
fn token_kubeconfig(dir: &Path, token: &str) -> PathBuf {
    let bed = shared::testbed();
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "testbed", "cluster": {
            "server": bed.server(),
            "certificate-authority": bed.dir().join("ca.crt"),
        }}],
        "users": [{"name": "weft-operator", "user": {"token": token}}],
        "contexts": [{"name": "weft", "context": {"cluster": "testbed", "user": "weft-operator"}}],
        "current-context": "weft",
    });
    let path = dir.join("operator.kubeconfig");
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    path
}

/// The `weft-operator` binary: this package's, or `$WEFT_TEST_OPERATOR_BIN` (a copy taken
/// right after building, where several checkouts share one target directory and its
/// `target/debug/weft-operator` is whoever built last).
fn operator_bin() -> PathBuf {
    std::env::var_os("WEFT_TEST_OPERATOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_weft-operator")))
}

/// Starts `weft-operator` as the rendered Deployment's container would run: its args and
/// env (fieldRefs resolved as the kubelet would for pod `pod`), listeners on loopback, and
/// the API credentials of `kubeconfig`.
fn start_rendered_operator(
    deployment: &Deployment,
    ns: &str,
    pod: &str,
    kubeconfig: &Path,
    dir: &Path,
) -> Proc {
    let spec = deployment.spec.as_ref().unwrap();
    let pod_spec = spec.template.spec.as_ref().unwrap();
    let container = &pod_spec.containers[0];
    assert!(
        container.command.is_none(),
        "the chart runs the image's entrypoint (weft-operator)"
    );
    // The operator ignores environment variables it does not know: a misspelt one in the
    // chart would silently do nothing. Every variable the chart sets is one of its flags'.
    let mut help = Command::new(operator_bin());
    help.arg("--help");
    let help = run(help).unwrap();
    for var in container.env.iter().flatten() {
        assert!(
            help.contains(&format!("[env: {}=", var.name)),
            "the chart sets {}, which weft-operator does not read (or target/debug/weft-operator is another branch's build: rebuild it)",
            var.name
        );
    }
    let mut cmd = Command::new(operator_bin());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("KUBECONFIG", kubeconfig)
        .args(container.args.clone().unwrap_or_default());
    for var in container.env.clone().unwrap_or_default() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => v.replace("0.0.0.0:", "127.0.0.1:"),
            (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("metadata.name") => pod.to_owned(),
                Some("metadata.namespace") => ns.to_owned(),
                other => panic!("env {} from {other:?}: not resolved by this test", var.name),
            },
            (None, None) => String::new(),
        };
        cmd.env(&var.name, value);
    }
    Proc::spawn(pod, cmd, dir)
}

async fn ready(admin: SocketAddr, operator: &Proc) {
    eventually(Duration::from_secs(60), || async move {
        let (status, body) = http_get(admin, "/readyz").await?;
        ensure!(status == 200, "/readyz {status}: {body}");
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail()));
}

fn forbidden_lines(operator: &Proc) -> Vec<String> {
    std::fs::read_to_string(&operator.log)
        .unwrap()
        .lines()
        .filter(|l| l.to_lowercase().contains("forbidden"))
        .map(str::to_owned)
        .collect()
}

/// `kubectl get -f <manifest> -o name`: the objects of the manifest that exist.
fn existing(manifest: &Path) -> Vec<String> {
    let mut kubectl = shared::testbed().kubectl();
    kubectl
        .args(["get", "--ignore-not-found", "-o", "name", "-f"])
        .arg(manifest);
    run(kubectl)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect()
}

/// The live webhooks with the operator's caBundle taken out, and whether each had one.
fn webhooks_without_ca(mwc: &MutatingWebhookConfiguration) -> (Value, bool) {
    let mut hooks = serde_json::to_value(mwc.webhooks.clone().unwrap_or_default()).unwrap();
    let mut all_have_ca = true;
    for h in hooks.as_array_mut().unwrap() {
        let cc = h["clientConfig"].as_object_mut().unwrap();
        all_have_ca &= cc.remove("caBundle").is_some_and(|b| b != "");
    }
    (hooks, all_have_ca)
}

async fn create_pod(client: &kube::Client, ns: &str, name: &str) -> Pod {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "app", "image": "weft.invalid/app:1"}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap()
}

fn proxy_container(pod: &Pod) -> k8s_openapi::api::core::v1::Container {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .and_then(|c| {
            c.iter()
                .find(|c| c.name == weft_operator::inject::keys::PROXY_CONTAINER)
        })
        .cloned()
        .expect("no proxy container")
}

fn proxy_image(pod: &Pod) -> Option<String> {
    proxy_container(pod).image
}

#[tokio::test]
async fn install_runs_the_operator_with_chart_rbac_then_upgrade_and_uninstall() {
    let started = std::time::Instant::now();
    // The release namespace, and a namespace the release meshes.
    let release = Bed::new("chart").await;
    let mesh = Bed::new("chart-mesh").await;
    let client = release.client.clone();
    let ns = release.ns.clone();
    Api::<Namespace>::all(client.clone())
        .patch(
            &mesh.ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                "weft.dev/inject": "enabled", "weft.dev/chart-test": &ns,
            }}})),
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let chart = chart();
    let chart = chart.to_str().unwrap();
    let ports = Ports {
        push: free_addr(),
        identity: free_addr(),
        webhook: free_addr(),
        admin: free_addr(),
    };

    // helm install: every object of the release exists.
    let v1 = values_file(
        dir.path(),
        "v1.json",
        &install_values(&ports, &ns, "t1", "Ignore"),
    );
    let t = std::time::Instant::now();
    run(helm_cmd(
        dir.path(),
        &[
            "install",
            "weft",
            chart,
            "-n",
            &ns,
            "-f",
            v1.to_str().unwrap(),
        ],
    ))
    .unwrap();
    eprintln!("helm install: {:?}", t.elapsed());
    let manifest_text = run(helm_cmd(
        dir.path(),
        &["get", "manifest", "weft", "-n", &ns],
    ))
    .unwrap();
    let manifest = dir.path().join("manifest.yaml");
    std::fs::write(&manifest, &manifest_text).unwrap();
    let docs = documents(&manifest_text);
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "MutatingWebhookConfiguration",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    assert_eq!(existing(&manifest).len(), docs.len(), "{kinds:?}");
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in ["routes.weft.dev", "policies.weft.dev", "breakers.weft.dev"] {
        crds.get(crd).await.unwrap();
    }

    // The operator, as the Deployment would run it, under the chart's ServiceAccount.
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let deployment = deployments.get("weft-operator").await.unwrap();
    let sa = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .service_account_name
        .clone()
        .unwrap();
    let request: TokenRequest =
        serde_json::from_value(json!({"spec": {"expirationSeconds": 3600}})).unwrap();
    let token = Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create_subresource::<TokenRequest, TokenRequest>(
            "token",
            &sa,
            &PostParams::default(),
            &request,
        )
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let kubeconfig = token_kubeconfig(dir.path(), &token);
    let operator =
        start_rendered_operator(&deployment, &ns, "weft-operator-a", &kubeconfig, dir.path());
    ready(ports.admin, &operator).await;

    // The webhook is registered: the chart's object, with the operator's caBundle, and
    // otherwise exactly what the chart rendered (the two must not fight over it).
    let mwcs = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let rendered_hooks = find(&docs, "MutatingWebhookConfiguration")["webhooks"].clone();
    eventually(WAIT, || {
        let mwcs = mwcs.clone();
        let rendered_hooks = rendered_hooks.clone();
        async move {
            let live = mwcs.get("weft-injector").await?;
            let (hooks, has_ca) = webhooks_without_ca(&live);
            ensure!(has_ca, "no caBundle yet");
            ensure!(
                hooks == rendered_hooks,
                "live webhooks differ from the chart's:\n{hooks:#}\nchart:\n{rendered_hooks:#}"
            );
            Ok(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail()));

    // Injecting, with the chart's proxy settings.
    let pod = create_pod(&client, &mesh.ns, "app-1").await;
    assert!(has_proxy(&pod), "{}", operator.log_tail());
    assert_eq!(
        proxy_image(&pod).as_deref(),
        Some("registry.example/weft-proxy:t1")
    );
    // The other proxy values reach the injected container too.
    let proxy = proxy_container(&pod);
    let env: Vec<(String, Option<String>)> = proxy
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect();
    assert!(
        env.contains(&("WEFT_LOG".to_owned(), Some("weft_proxy=debug".to_owned()))),
        "{env:?}"
    );
    // The mesh-wide tracing values, on a pod without tracing annotations.
    for (name, value) in [
        ("WEFT_TRACE_COLLECTOR", "otel.observability:4317"),
        ("WEFT_TRACE_SAMPLING", "0.1"),
    ] {
        assert!(
            env.contains(&(name.to_owned(), Some(value.to_owned()))),
            "{name}: {env:?}"
        );
    }
    let limits = proxy.resources.as_ref().unwrap().limits.clone().unwrap();
    assert_eq!(limits["cpu"].0, "500m");
    assert_eq!(limits["memory"].0, "96Mi");
    assert_eq!(proxy.ports.as_ref().unwrap()[0].container_port, 15121);
    // What NOTES.txt tells users to run passes against this install, but for the checks
    // this test bed cannot satisfy: it has no kubelet here, so the chart's Deployment never
    // gets a ready replica (the operator runs as a process instead), and with no pods its
    // Service has no endpoints: the operator's admin address is given directly.
    let operator_url = format!("http://{}", ports.admin);
    let mut check = Command::new(sibling_binary("kubectl-weft"));
    check
        .env("KUBECONFIG", shared::testbed().kubeconfig())
        .args([
            "check",
            "--operator-namespace",
            &ns,
            "--webhook",
            "weft-injector",
            "--operator-url",
            &operator_url,
            "--probe-namespace",
            &mesh.ns,
            "-o",
            "json",
        ]);
    let report = Command::output(&mut check).unwrap();
    let report: Value = serde_json::from_slice(&report.stdout).unwrap();
    for finding in report["checks"].as_array().unwrap() {
        // Likewise no kubelet runs pod app-1, so its injected proxy never connects.
        let expected = match finding["name"].as_str() {
            Some("operator-replicas") => "fail",
            Some("proxies") => {
                let message = finding["message"].as_str().unwrap_or_default();
                assert!(message.contains("not connected"), "{report:#}");
                assert!(message.contains("/app-1"), "{report:#}");
                "fail"
            }
            _ => "ok",
        };
        assert_eq!(finding["status"], expected, "{report:#}");
    }
    assert!(
        report["checks"].as_array().unwrap().len() >= 9,
        "{report:#}"
    );

    // Status written (by the Lease holder), Events recorded, and a proxy subscribed with a
    // pod-bound token (TokenReview) reported in this replica's ACK report ConfigMap.
    mesh.service("web", "web").await;
    mesh.route(
        "web",
        json!({"service": {"name": "web"}, "rules": [{"backends": [{"name": "web"}]}]}),
    )
    .await;
    mesh.route(
        "ghost",
        json!({"service": {"name": "ghost"}, "rules": [{"backends": [{"name": "ghost"}]}]}),
    )
    .await;
    mesh.route_condition("web", "Accepted", "True").await;
    mesh.route_condition("ghost", "ResolvedRefs", "False").await;
    mesh.service_account("web").await;
    let proxied = mesh.pod("web-1", "web", "web", "192.0.2.10").await;
    // The operator serves identity, so its push port is TLS: the proxy takes the trust
    // root and the operator's name as the injector gave them to app-1's proxy.
    let injected = |name: &str| {
        env.iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{name} not injected: {env:?}"))
    };
    let root = dir.path().join("trust-root.pem");
    std::fs::write(&root, injected("WEFT_TRUST_ROOTS")).unwrap();
    let proxy = ProxyProc::start_with(
        &mesh,
        ports.push,
        &proxied,
        "web",
        dir.path(),
        &ProxyOptions {
            operator_root: Some((root, injected("WEFT_OPERATOR_SERVER_NAME"))),
            ..ProxyOptions::default()
        },
    )
    .await;
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &ns);
    eventually(WAIT, || {
        let configmaps = configmaps.clone();
        async move {
            let reports = configmaps
                .list(&ListParams::default().labels("weft.dev/ack-report"))
                .await?;
            let text = serde_json::to_string(&reports.items)?;
            ensure!(text.contains("web-1"), "no report of web-1 in {text}");
            Ok(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", operator.log_tail(), proxy.proc.log_tail()));
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &mesh.ns);
    eventually(WAIT, || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await?;
            ensure!(
                list.items
                    .iter()
                    .any(|e| e.reporting_controller.as_deref() == Some("weft-operator")),
                "no Event from weft-operator yet"
            );
            Ok(())
        }
    })
    .await
    .unwrap();
    let forbidden = forbidden_lines(&operator);
    assert!(
        forbidden.is_empty(),
        "the chart's RBAC refused the operator:\n{}",
        forbidden.join("\n")
    );

    // helm upgrade with changed values: the Deployment changes (a rollout), and the
    // operator's caBundle survives Helm's patch of the webhook configuration.
    let before = deployment.spec.clone().unwrap().template;
    let v2 = values_file(
        dir.path(),
        "v2.json",
        &install_values(&ports, &ns, "t2", "Fail"),
    );
    let t = std::time::Instant::now();
    run(helm_cmd(
        dir.path(),
        &[
            "upgrade",
            "weft",
            chart,
            "-n",
            &ns,
            "-f",
            v2.to_str().unwrap(),
        ],
    ))
    .unwrap();
    eprintln!("helm upgrade: {:?}", t.elapsed());
    let upgraded = deployments.get("weft-operator").await.unwrap();
    let after = upgraded.spec.clone().unwrap().template;
    assert_ne!(
        before.metadata.as_ref().unwrap().annotations,
        after.metadata.as_ref().unwrap().annotations,
        "the injection settings' checksum rolls the pods"
    );
    let live = mwcs.get("weft-injector").await.unwrap();
    let (_, has_ca) = webhooks_without_ca(&live);
    assert!(has_ca, "helm upgrade removed the operator's caBundle");
    assert!(
        live.webhooks
            .unwrap()
            .iter()
            .all(|h| h.failure_policy.as_deref() == Some("Fail"))
    );
    // The rollout, by hand: the old replica stops, a new one starts from the new template.
    drop(proxy);
    drop(operator);
    let operator =
        start_rendered_operator(&upgraded, &ns, "weft-operator-b", &kubeconfig, dir.path());
    ready(ports.admin, &operator).await;
    let pod = create_pod(&client, &mesh.ns, "app-2").await;
    assert_eq!(
        proxy_image(&pod).as_deref(),
        Some("registry.example/weft-proxy:t2"),
        "{}",
        operator.log_tail()
    );
    let forbidden = forbidden_lines(&operator);
    assert!(forbidden.is_empty(), "{}", forbidden.join("\n"));

    // helm uninstall: the release's objects go (so does the webhook, or pods in meshed
    // namespaces could not be created with failurePolicy Fail); CRDs and pods stay.
    drop(operator);
    let t = std::time::Instant::now();
    run(helm_cmd(dir.path(), &["uninstall", "weft", "-n", &ns])).unwrap();
    eprintln!("helm uninstall: {:?}", t.elapsed());
    eventually(WAIT, || {
        let manifest = manifest.clone();
        async move {
            let left = existing(&manifest);
            ensure!(left.is_empty(), "still there: {left:?}");
            Ok(())
        }
    })
    .await
    .unwrap();
    for crd in ["routes.weft.dev", "policies.weft.dev", "breakers.weft.dev"] {
        crds.get(crd).await.unwrap();
    }
    let pods = Api::<Pod>::namespaced(client.clone(), &mesh.ns);
    for name in ["app-1", "app-2", "web-1"] {
        pods.get(name).await.unwrap();
    }
    let pod = create_pod(&client, &mesh.ns, "app-3").await;
    assert!(!has_proxy(&pod));
    // What the operator created at run time stays: the trust root (so a reinstall keeps
    // it) and the webhook's CA.
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns);
    secrets.get("weft-identity").await.unwrap();
    secrets.get("weft-ca").await.unwrap();
    eprintln!(
        "chart install/upgrade/uninstall test: {:?}",
        started.elapsed()
    );
}
