//! `kubectl weft check` against the test bed: a real API server, a `weft-operator` process
//! serving the injection webhook (registered at a loopback URL) and the identity endpoint,
//! and `weft-proxy` processes subscribed to it.
//!
//! A healthy install passes every check (text output compared with a golden file, volatile
//! parts masked); then one thing at a time is broken — the operator's ready replicas, a CRD
//! version, the webhook's caBundle, a pod left unmeshed, a trust root expiring soon, a proxy
//! out of sync — and exactly that check must fail, with its hint and exit code 1, and pass
//! again once repaired.
//!
//! The bed has no kubelet and no controller manager, so nothing ever sets a Deployment's
//! ready replicas: the test writes the operator Deployment's status as the Deployment
//! controller would for a ready replica (and later as it would for none). `check` reads that
//! status like any other; nothing in it knows about the test.
//!
//! This file is its own test binary, so its test bed is its own: the webhook it registers
//! (cluster-wide) and the CRD it breaks concern no other test.
//!
//! Needs the `weft-proxy` and `kubectl-weft` binaries: `cargo build -p weft-proxy -p
//! kubectl-weft` first when testing this package alone.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use anyhow::{Context, ensure};
use k8s_openapi::{
    ByteString,
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        apps::v1::Deployment,
        core::v1::{Namespace, Pod, Secret},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use support::{mesh::*, processes::*};
use weft_e2e::shared::{self, eventually};

/// The operator as its own process, with the injection webhook on (at a loopback URL) and
/// the identity endpoint on loopback; its namespace is the bed's.
fn start_operator_with_webhook(
    bed: &Bed,
    push: SocketAddr,
    admin: SocketAddr,
    webhook: SocketAddr,
    dir: &Path,
) -> Proc {
    let mut cmd = operator_command(&bed.ns, push, admin, free_addr(), 1);
    cmd.args(["--webhook-addr", &webhook.to_string()])
        .args(["--webhook-url", &format!("https://{webhook}/inject")])
        .args(["--webhook-name", &webhook_name(bed)]);
    Proc::spawn("operator-1", cmd, dir)
}

fn webhook_name(bed: &Bed) -> String {
    format!("weft-injector-{}", bed.ns)
}

/// What one run of `kubectl weft check` gave.
struct Run {
    code: i32,
    text: String,
    json: Value,
}

impl Run {
    /// Names of the checks with `status`.
    fn with(&self, status: &str) -> Vec<String> {
        self.json["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["status"] == status)
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect()
    }

    fn check(&self, name: &str) -> &Value {
        self.json["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name}: {}", self.text))
    }
}

/// Runs `check` twice over the same state: once as text, once as JSON.
fn run_check(bed: &Bed, admin: SocketAddr) -> Run {
    let run = |extra: &[&str]| {
        let out = Command::new(sibling_binary("kubectl-weft"))
            .env("KUBECONFIG", shared::testbed().kubeconfig())
            .args(["check", "--operator-namespace", &bed.ns])
            .args(["--webhook", &webhook_name(bed)])
            .args(["--operator-url", &format!("http://{admin}")])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, text) = run(&[]);
    let (json_code, json) = run(&["-o", "json"]);
    assert_eq!(
        code, json_code,
        "text and JSON runs disagree:\n{text}\n{json}"
    );
    Run {
        code,
        text,
        json: serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}")),
    }
}

/// Waits until `check` fails exactly `name` (or, with `None`, fails nothing) and returns
/// that run; fails the test with the last run otherwise.
async fn until_only(bed: &Bed, admin: SocketAddr, name: Option<&str>, logs: &[&Proc]) -> Run {
    let want: Vec<String> = name.map(str::to_owned).into_iter().collect();
    let mut last = None;
    let found = eventually(Duration::from_secs(40), || {
        let run = run_check(bed, admin);
        let failed = run.with("fail");
        let ok = failed == want;
        last = Some(run.text.clone());
        let want = want.clone();
        async move {
            ensure!(ok, "failing {failed:?}, want {want:?}:\n{}", run.text);
            Ok(run)
        }
    })
    .await;
    found.unwrap_or_else(|e| {
        let logs: Vec<String> = logs.iter().map(|p| p.log_tail()).collect();
        panic!("{e:#}\n{}\n{}", last.unwrap_or_default(), logs.join("\n"))
    })
}

/// Asserts a run that fails `name` exits 1 and gives `hint` (a part of it).
fn assert_fails(run: &Run, name: &str, message: &str, hint: &str) {
    assert_eq!(run.code, 1, "{}", run.text);
    let c = run.check(name);
    assert_eq!(c["status"], "fail", "{}", run.text);
    assert!(
        c["message"].as_str().unwrap().contains(message),
        "{name} message: {}",
        run.text
    );
    assert!(
        c["hint"].as_str().unwrap().contains(hint),
        "{name} hint: {}",
        run.text
    );
    assert!(
        run.text.contains(&format!("FAIL  {name}")),
        "the text output names it: {}",
        run.text
    );
}

/// `text` with what changes between runs masked: the namespace, addresses, the release's
/// version, dates and day counts.
fn mask(text: &str, bed: &Bed, addrs: &[(SocketAddr, &str)]) -> String {
    let mut out = text
        .replace(&bed.ns, "NS")
        .replace(&format!("({})", env!("CARGO_PKG_VERSION")), "(VERSION)");
    for (a, m) in addrs {
        out = out.replace(&a.to_string(), m);
    }
    // Dates (YYYY-MM-DD) and "(N days" from certificates issued during the run.
    let bytes = out.as_bytes();
    let mut masked = String::new();
    let mut i = 0;
    while i < bytes.len() {
        let is_date = i + 10 <= bytes.len()
            && bytes[i..i + 10].iter().enumerate().all(|(k, b)| match k {
                4 | 7 => *b == b'-',
                _ => b.is_ascii_digit(),
            });
        if is_date {
            masked.push_str("YYYY-MM-DD");
            i += 10;
            continue;
        }
        if out[i..].starts_with("(") {
            let digits = out[i + 1..]
                .chars()
                .take_while(char::is_ascii_digit)
                .count();
            if digits > 0 && out[i + 1 + digits..].starts_with(" days") {
                masked.push_str("(N");
                i += 1 + digits;
                continue;
            }
        }
        let ch = out[i..].chars().next().unwrap();
        masked.push(ch);
        i += ch.len_utf8();
    }
    masked
}

/// Compares `actual` with the golden file `name`, or rewrites it with
/// `WEFT_UPDATE_GOLDEN=1`.
fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("WEFT_UPDATE_GOLDEN").is_some() {
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

/// A self-signed CA certificate (PEM) valid from a day ago for `days` more days.
fn root_valid_for(days: i64) -> String {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "weft identity root");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(days);
    p.self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap()
        .pem()
}

/// Sends SIGSTOP or SIGCONT to a process.
fn signal(pid: i32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_a_healthy_install_and_fails_exactly_what_is_broken() {
    let bed = Bed::new("check").await;
    let ns = bed.ns.clone();
    let dir = tempfile::tempdir().unwrap();
    let (push, admin, webhook) = (free_addr(), free_addr(), free_addr());
    let operator = start_operator_with_webhook(&bed, push, admin, webhook, dir.path());

    // The operator's Deployment. The bed's controller manager creates its ReplicaSet and
    // pod, but there is no kubelet: the test plays the kubelet and writes the pod's status
    // (running and ready, or not ready), and the real ReplicaSet and Deployment controllers
    // turn that into the Deployment's ready replicas, which `check` reads.
    let deploy: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "weft-operator"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "weft-operator"}},
                 "template": {"metadata": {"labels": {"app": "weft-operator"}},
                              "spec": {"containers": [{"name": "operator", "image": "weft.invalid/operator:1"}]}}}
    }))
    .unwrap();
    bed.api::<Deployment>()
        .create(&PostParams::default(), &deploy)
        .await
        .unwrap();
    let operator_pod = eventually(WAIT, || async {
        let list = bed
            .api::<Pod>()
            .list(&kube::api::ListParams::default().labels("app=weft-operator"))
            .await?;
        let pod = list.items.first().context("no operator pod yet")?;
        Ok(pod.metadata.name.clone().unwrap())
    })
    .await
    .unwrap();
    let set_ready = |ready: bool| {
        let pods = bed.api::<Pod>();
        let name = operator_pod.clone();
        async move {
            let status = json!({"status": {
                "phase": "Running", "podIP": "198.18.241.10", "podIPs": [{"ip": "198.18.241.10"}],
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Ready", "status": if ready { "True" } else { "False" }},
                ],
            }});
            pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .unwrap();
        }
    };
    set_ready(true).await;

    // Two meshed pods with their proxies, subscribed to the operator.
    let (backend, _host) = backend().await;
    service_to(&bed, "web", backend).await;
    let svc = format!("web.{ns}.80");
    // The operator serves identity, so its push port is TLS from the mesh root: proxies
    // take the root from the identity Secret and verify the operator's default name (its
    // Service's, `weft-operator.<namespace>.svc`).
    let root = dir.path().join("trust-root.pem");
    write_trust_root(&bed, &operator, &root).await;
    let options = ProxyOptions {
        operator_root: Some((root, format!("weft-operator.{ns}.svc"))),
        ..ProxyOptions::default()
    };
    let mut proxies = Vec::new();
    for (name, ip) in [("client-0", "198.18.241.70"), ("client-1", "198.18.241.71")] {
        bed.service_account(name).await;
        let pod = bed.pod(name, name, "client", ip).await;
        let p = ProxyProc::start_with(&bed, push, &pod, &svc, dir.path(), &options).await;
        p.until_answered("hello", &operator).await;
        proxies.push(p);
    }
    let logs = [&operator, &proxies[0].proc, &proxies[1].proc];

    // Healthy: every check passes.
    let healthy = until_only(&bed, admin, None, &logs).await;
    assert_eq!(healthy.code, 0, "{}", healthy.text);
    assert_eq!(
        healthy.with("warn"),
        Vec::<String>::new(),
        "{}",
        healthy.text
    );
    assert_eq!(
        healthy.json["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        [
            "crds",
            "operator-replicas",
            "operator-lease",
            "webhook-registered",
            "webhook-serving",
            "inject-settings",
            "trust-root",
            "proxies",
            "unmeshed-pods",
            "pod-annotations",
            "ns-svc-annotations"
        ]
    );
    assert_eq!(healthy.json["schemaVersion"], 1);
    assert_eq!(
        healthy.json["summary"],
        json!({"ok": 11, "warn": 0, "fail": 0})
    );
    golden(
        "check.txt",
        &mask(
            &healthy.text,
            &bed,
            &[(webhook, "WEBHOOK_ADDR"), (admin, "ADMIN_ADDR")],
        ),
    );

    // 1. No ready replica.
    set_ready(false).await;
    let run = until_only(&bed, admin, Some("operator-replicas"), &logs).await;
    assert_fails(
        &run,
        "operator-replicas",
        "0 of 1 replicas ready",
        &format!("kubectl -n {ns} describe deploy/weft-operator"),
    );
    set_ready(true).await;
    until_only(&bed, admin, None, &logs).await;

    // 2. A CRD no longer serves the version this release uses.
    let crds = Api::<CustomResourceDefinition>::all(bed.client.clone());
    let mut routes = crds.get("routes.weft.dev").await.unwrap();
    routes.spec.versions[0].served = false;
    routes.metadata.managed_fields = None;
    crds.replace("routes.weft.dev", &PostParams::default(), &routes)
        .await
        .unwrap();
    let run = until_only(&bed, admin, Some("crds"), &logs).await;
    assert_fails(
        &run,
        "crds",
        "routes.weft.dev does not serve version v1alpha1",
        "kubectl apply -f crds/",
    );
    shared::install_crds(&bed.client).await.unwrap();
    until_only(&bed, admin, None, &logs).await;

    // 3. The webhook's caBundle is another CA's.
    let hooks = Api::<MutatingWebhookConfiguration>::all(bed.client.clone());
    let original = hooks.get(&webhook_name(&bed)).await.unwrap();
    let (other_ca, _) = weft_operator::ca::Ca::generate("another CA").unwrap();
    let mut wrong = original.clone();
    for h in wrong.webhooks.as_mut().unwrap() {
        h.client_config.ca_bundle = Some(ByteString(other_ca.cert_pem().as_bytes().to_vec()));
    }
    hooks
        .replace(&webhook_name(&bed), &PostParams::default(), &wrong)
        .await
        .unwrap();
    let run = until_only(&bed, admin, Some("webhook-serving"), &logs).await;
    assert_fails(
        &run,
        "webhook-serving",
        "the serving certificate does not verify against caBundle",
        "restart the operator",
    );
    let mut fixed = hooks.get(&webhook_name(&bed)).await.unwrap();
    fixed.webhooks = original.webhooks.clone();
    hooks
        .replace(&webhook_name(&bed), &PostParams::default(), &fixed)
        .await
        .unwrap();
    until_only(&bed, admin, None, &logs).await;

    // 4. A pod that opted in after it was created: it runs without the proxy. (The
    // operator's namespace is never injected, so the pod lives in another.)
    let apps = shared::namespace(&bed.client, "check-apps").await.unwrap();
    let pods = Api::<Pod>::namespaced(bed.client.clone(), &apps);
    let late: Pod = serde_json::from_value(json!({
        "metadata": {"name": "late"},
        "spec": {"containers": [{"name": "app", "image": "weft.invalid/app:1"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &late).await.unwrap();
    let opt_in = json!({"metadata": {"annotations": {"weft.dev/inject": "enabled"}}});
    pods.patch("late", &PatchParams::default(), &Patch::Merge(&opt_in))
        .await
        .unwrap();
    let run = until_only(&bed, admin, Some("unmeshed-pods"), &logs).await;
    assert_fails(
        &run,
        "unmeshed-pods",
        &format!("{apps}/late (opted in by pod)"),
        "restart them",
    );
    pods.delete("late", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    until_only(&bed, admin, None, &logs).await;

    // 4b. A pod whose annotation is misspelt: it does nothing, which check says (a warning:
    // the pod works, without what the annotation meant).
    let typo: Pod = serde_json::from_value(json!({
        "metadata": {"name": "typo", "annotations": {"weft.dev/opaque-port": "3306"}},
        "spec": {"containers": [{"name": "app", "image": "weft.invalid/app:1"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &typo).await.unwrap();
    let run = run_check(&bed, admin);
    assert_eq!(run.code, 0, "a warning only: {}", run.text);
    assert!(
        run.with("warn").contains(&"pod-annotations".to_owned()),
        "{}",
        run.text
    );
    let c = run.check("pod-annotations");
    assert!(
        c["message"].as_str().unwrap().contains(&format!(
            "{apps}/typo: weft.dev/opaque-port (did you mean weft.dev/opaque-ports?)"
        )),
        "{}",
        run.text
    );
    pods.delete("typo", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();

    // 4c. A Namespace opted in the way Linkerd's are, by annotation: Weft's webhook selects
    // Namespaces by label, so nothing would be injected there; check says so.
    let namespaces = kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(bed.client.clone());
    let annotated = format!("{}-annotated", bed.ns);
    let linkerd_style: k8s_openapi::api::core::v1::Namespace = serde_json::from_value(json!({
        "metadata": {"name": annotated, "annotations": {"weft.dev/inject": "enabled"}}
    }))
    .unwrap();
    namespaces
        .create(&PostParams::default(), &linkerd_style)
        .await
        .unwrap();
    let run = run_check(&bed, admin);
    assert_eq!(run.code, 0, "a warning only: {}", run.text);
    let c = run.check("ns-svc-annotations");
    assert_eq!(c["status"], "warn", "{}", run.text);
    assert!(
        c["message"].as_str().unwrap().contains(&format!(
            "namespace {annotated}: weft.dev/inject is an annotation, but Namespaces opt in by label (kubectl label namespace {annotated} weft.dev/inject=enabled)"
        )),
        "{}",
        run.text
    );
    namespaces
        .delete(&annotated, &DeleteParams::default())
        .await
        .unwrap();

    // 5. A trust root that expires in 30 days.
    let secrets = bed.api::<Secret>();
    let identity = secrets.get("weft-identity").await.unwrap();
    let mut soon = identity.clone();
    soon.data.as_mut().unwrap().insert(
        "ca.crt".to_owned(),
        ByteString(root_valid_for(30).into_bytes()),
    );
    soon.metadata.managed_fields = None;
    secrets
        .replace("weft-identity", &PostParams::default(), &soon)
        .await
        .unwrap();
    let run = until_only(&bed, admin, Some("trust-root"), &logs).await;
    assert!(
        run.check("trust-root")["message"]
            .as_str()
            .unwrap()
            .contains("days (on "),
        "{}",
        run.text
    );
    assert_fails(
        &run,
        "trust-root",
        "weft-identity expires in",
        "Rotating the root",
    );
    let mut restored = secrets.get("weft-identity").await.unwrap();
    restored.data = identity.data.clone();
    secrets
        .replace("weft-identity", &PostParams::default(), &restored)
        .await
        .unwrap();
    until_only(&bed, admin, None, &logs).await;

    // 6. A proxy that does not take the next config: stopped, while a new Service changes
    // every proxy's config.
    let stopped = proxies[1].proc.pid();
    signal(stopped, "-STOP");
    bed.service("other", "other").await;
    let run = until_only(&bed, admin, Some("proxies"), &logs).await;
    signal(stopped, "-CONT");
    let c = run.check("proxies")["message"].as_str().unwrap().to_owned();
    assert!(
        c.contains(&format!("{ns}/client-1")) && !c.contains(&format!("{ns}/client-0")),
        "only the stopped proxy is named: {}",
        run.text
    );
    assert_fails(
        &run,
        "proxies",
        "",
        "kubectl weft proxy-status shows each proxy",
    );
    until_only(&bed, admin, None, &logs).await;

    Api::<Namespace>::all(bed.client.clone())
        .delete(&apps, &DeleteParams::default())
        .await
        .context("deleting the apps namespace")
        .unwrap();
}
