//! `kubectl weft inject` injects with the settings the cluster's webhook uses (the
//! ConfigMap `weft-inject-config` in the operator's namespace), against the test bed's real
//! API server; offline it uses the built-in defaults or a given file.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    io::Write,
    process::{Command, Output, Stdio},
};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use weft_e2e::shared;
use weft_inject::{InjectConfig, identity_bundle, settings};

const POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  annotations:
    weft.dev/inject: enabled
spec:
  containers:
    - name: app
      image: weft.invalid/app:1
";

fn inject(args: &[&str], kubeconfig: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kubectl-weft"))
        .arg("inject")
        .args(args)
        .args(["-f", "-"])
        .env("KUBECONFIG", kubeconfig)
        .env_remove("WEFT_PROXY_IMAGE")
        .env_remove("WEFT_NAMESPACE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(POD.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// The injected proxy container of a successful run.
fn proxy(out: &Output) -> Container {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "inject failed: {stderr}");
    let pod: Pod = serde_yaml::from_slice(&out.stdout).unwrap();
    let inits = pod.spec.unwrap().init_containers.unwrap();
    inits.into_iter().find(|c| c.name == "weft-proxy").unwrap()
}

fn env(c: &Container, name: &str) -> String {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
        .unwrap_or_else(|| panic!("{name} not set on {}", c.name))
}

async fn config_map(client: &Client, ns: &str, data: &[(&str, &str)]) {
    named_config_map(client, ns, settings::CONFIG_MAP, data).await;
}

async fn named_config_map(client: &Client, ns: &str, name: &str, data: &[(&str, &str)]) {
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..Default::default()
    };
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
}

#[tokio::test]
async fn inject_uses_the_clusters_settings_and_offline_the_defaults() {
    let client = shared::client().await.unwrap();
    let kubeconfig = shared::testbed().kubeconfig();
    let kubeconfig = kubeconfig.to_str().unwrap();
    // The "operator's namespace": where the chart puts the settings.
    let ns = shared::namespace(&client, "weft-op").await.unwrap();
    config_map(
        &client,
        &ns,
        &[
            (
                settings::PROXY_IMAGE,
                "registry.test/weft-proxy:from-cluster",
            ),
            (settings::LOG_LEVEL, "debug"),
        ],
    )
    .await;
    let defaults = InjectConfig::default();

    let out = inject(&["--operator-namespace", &ns], kubeconfig);
    let from_cluster = proxy(&out);
    assert_eq!(
        from_cluster.image.as_deref(),
        Some("registry.test/weft-proxy:from-cluster")
    );
    assert_eq!(env(&from_cluster, "WEFT_LOG"), "debug");
    // What the ConfigMap leaves out is what the operator in that namespace would use.
    assert_eq!(
        env(&from_cluster, "WEFT_OPERATOR_ADDR"),
        format!("weft-operator.{ns}.svc:8090")
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("ConfigMap {ns}/{}", settings::CONFIG_MAP)),
        "{stderr}"
    );

    // Offline: the built-in defaults, and no cluster is asked (the kubeconfig is bogus).
    let nowhere = "/nonexistent/kubeconfig";
    let offline = proxy(&inject(&["--offline"], nowhere));
    assert_eq!(
        offline.image.as_deref(),
        Some(defaults.proxy_image.as_str())
    );
    assert_eq!(env(&offline, "WEFT_LOG"), defaults.log_level.as_str());

    // Without --offline, no cluster is an error that names the way out.
    let out = inject(&[], nowhere);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--offline"),
        "{stderr}"
    );

    // A settings file, as `kubectl get configmap -o yaml` prints it, without a cluster.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("settings.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: weft-inject-config\ndata:\n  logLevel: trace\n",
    )
    .unwrap();
    let from_file = proxy(&inject(&["--config", file.to_str().unwrap()], nowhere));
    assert_eq!(env(&from_file, "WEFT_LOG"), "trace");
    assert_eq!(
        from_file.image.as_deref(),
        Some(defaults.proxy_image.as_str())
    );

    // An explicit flag wins over the cluster's setting.
    let flagged = proxy(&inject(
        &[
            "--operator-namespace",
            &ns,
            "--proxy-image",
            "r.test/p:flag",
        ],
        kubeconfig,
    ));
    assert_eq!(flagged.image.as_deref(), Some("r.test/p:flag"));
    assert_eq!(env(&flagged, "WEFT_LOG"), "debug");
}

#[tokio::test]
async fn a_missing_configmap_means_defaults_and_a_bad_one_is_refused() {
    let client = shared::client().await.unwrap();
    let kubeconfig = shared::testbed().kubeconfig();
    let kubeconfig = kubeconfig.to_str().unwrap();

    let empty = shared::namespace(&client, "weft-op-none").await.unwrap();
    let out = inject(&["--operator-namespace", &empty], kubeconfig);
    let c = proxy(&out);
    assert_eq!(
        c.image.as_deref(),
        Some(InjectConfig::default().proxy_image.as_str())
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no ConfigMap"), "{stderr}");

    let bad = shared::namespace(&client, "weft-op-bad").await.unwrap();
    config_map(&client, &bad, &[("proxyImg", "typo/p:1")]).await;
    let out = inject(&["--operator-namespace", &bad], kubeconfig);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("unknown setting \"proxyImg\""),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing is written on error");

    // The operator's identity bundle is checked as strictly: a proxy given an unusable one
    // would never get a certificate.
    let bad_bundle = shared::namespace(&client, "weft-op-bundle").await.unwrap();
    named_config_map(
        &client,
        &bad_bundle,
        identity_bundle::CONFIG_MAP,
        &[
            (
                identity_bundle::TRUST_ROOTS,
                "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            ),
            (identity_bundle::ADDR, "weft-operator"),
            (
                identity_bundle::SERVER_NAME,
                "weft-operator.weft-system.svc",
            ),
        ],
    )
    .await;
    let out = inject(&["--operator-namespace", &bad_bundle], kubeconfig);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains(&format!("{bad_bundle}/{}", identity_bundle::CONFIG_MAP))
            && stderr.contains("identityAddr"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing is written on error");
}

/// With several files, an error in any of them writes nothing to stdout: not the
/// injected first file, so that `kubectl weft inject -f a.yaml -f bad.yaml > out.yaml`
/// never leaves half an answer.
#[test]
fn a_bad_file_among_several_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("a.yaml");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&good, POD).unwrap();
    std::fs::write(&bad, "kind: Pod\nmetadata: [not, a, map\n").unwrap();
    let run = |files: &[&std::path::Path]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kubectl-weft"));
        cmd.args(["inject", "--offline"]);
        for f in files {
            cmd.arg("-f").arg(f);
        }
        cmd.env_remove("WEFT_PROXY_IMAGE").output().unwrap()
    };
    let ok = run(&[&good]);
    assert!(ok.status.success() && !ok.stdout.is_empty());
    let out = run(&[&good, &bad]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("bad.yaml"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "wrote {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
