//! The operator publishes the public half of the mesh identity (ConfigMap
//! `weft-identity-bundle`) and `kubectl weft inject` injects with it, so a pod injected by
//! hand gets the trust bundle and identity endpoint the webhook would give it: a real
//! `weft-operator` process and the real `kubectl-weft` binary against the test bed's API
//! server.
//!
//! Needs the `kubectl-weft` binary: `cargo build -p kubectl-weft` first when testing this
//! package alone.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use support::{mesh::*, processes::*};
use weft_e2e::shared::{self, eventually};
use weft_inject::identity_bundle;

const IDENTITY_NAME: &str = "weft-operator.bundle.test";

const POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: web
  annotations:
    weft.dev/inject: enabled
spec:
  containers:
    - name: app
      image: weft.invalid/app:1
";

fn inject(ns: &str) -> Output {
    let mut child = Command::new(sibling_binary("kubectl-weft"))
        .env("KUBECONFIG", shared::testbed().kubeconfig())
        .args(["inject", "--operator-namespace", ns, "-f", "-"])
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

/// The injected proxy container, and what `inject` said on stderr.
fn injected_proxy(ns: &str) -> (Container, String) {
    let out = inject(ns);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "inject failed: {stderr}");
    let pod: Pod = serde_yaml::from_slice(&out.stdout).unwrap();
    let proxy = pod
        .spec
        .unwrap()
        .init_containers
        .unwrap()
        .into_iter()
        .find(|c| c.name == "weft-proxy")
        .unwrap();
    (proxy, stderr)
}

fn env(c: &Container, name: &str) -> Option<String> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_publishes_its_trust_bundle_and_kubectl_weft_inject_uses_it() {
    let bed = Bed::new("identity-bundle").await;
    let dir = tempfile::tempdir().unwrap();
    let identity = free_addr();
    let operator = start_operator_with(
        &bed,
        free_addr(),
        free_addr(),
        identity,
        dir.path(),
        1,
        &["--identity-dns-names", IDENTITY_NAME],
    );

    let config_maps = bed.api::<ConfigMap>();
    let data = eventually(WAIT, || async {
        let cm = config_maps.get_opt(identity_bundle::CONFIG_MAP).await?;
        cm.and_then(|cm| cm.data)
            .context("no identity bundle published yet")
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail()));
    let secret = bed.api::<Secret>().get("weft-identity").await.unwrap();
    let root = String::from_utf8(secret.data.unwrap()["ca.crt"].0.clone()).unwrap();
    // The bundle is the Secret's public half: the roots, never a key.
    assert_eq!(data[identity_bundle::TRUST_ROOTS].trim(), root.trim());
    assert!(!data.values().any(|v| v.contains("PRIVATE KEY")));
    let addr = format!("{IDENTITY_NAME}:{}", identity.port());
    assert_eq!(data[identity_bundle::ADDR], addr);
    assert_eq!(data[identity_bundle::SERVER_NAME], IDENTITY_NAME);

    // A hand-injected pod gets what the webhook gives one.
    let (proxy, stderr) = injected_proxy(&bed.ns);
    assert_eq!(
        env(&proxy, "WEFT_IDENTITY_ADDR").as_deref(),
        Some(addr.as_str())
    );
    assert_eq!(
        env(&proxy, "WEFT_IDENTITY_SERVER_NAME").as_deref(),
        Some(IDENTITY_NAME)
    );
    assert_eq!(
        env(&proxy, "WEFT_TRUST_ROOTS").map(|r| r.trim().to_owned()),
        Some(root.trim().to_owned())
    );
    assert!(
        stderr.contains(&format!("identity: proxies get certificates from {addr}")),
        "{stderr}"
    );

    // Restarted without identity, the operator withdraws the bundle, and hand-injected pods
    // are told they will speak plain text.
    drop(operator);
    let operator = start_operator(&bed, free_addr(), free_addr(), dir.path(), 2);
    eventually(WAIT, || async {
        let cm = config_maps.get_opt(identity_bundle::CONFIG_MAP).await?;
        ensure!(cm.is_none(), "the bundle is still published");
        Ok(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", operator.log_tail()));
    let (proxy, stderr) = injected_proxy(&bed.ns);
    assert_eq!(env(&proxy, "WEFT_TRUST_ROOTS"), None);
    assert_eq!(env(&proxy, "WEFT_IDENTITY_ADDR"), None);
    assert!(stderr.contains("no identity"), "{stderr}");
}
