//! `kubectl weft check` against the test bed's real API server.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::PostParams};
use weft_e2e::shared;

#[tokio::test]
async fn check_reports_missing_pieces_and_unmeshed_pods() {
    let client = shared::client().await.unwrap();
    shared::install_crds(&client).await.unwrap();
    let ns = shared::namespace(&client, "check").await.unwrap();
    // No webhook is registered in this test bed: an opted-in pod is created unmeshed.
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "missed", "annotations": {"weft.dev/inject": "enabled"}},
        "spec": {"containers": [{"name": "app", "image": "weft.invalid/app:1"}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-weft"))
        .arg("check")
        .env("KUBECONFIG", shared::testbed().kubeconfig())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("ok    CRD routes.weft.dev is established"),
        "{stdout}"
    );
    assert!(
        stdout.contains("FAIL  injection webhook weft-injector is not registered"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "WARN  pod {ns}/missed opted in (pod) but runs without the proxy"
        )),
        "{stdout}"
    );
    assert!(
        !out.status.success(),
        "a failed check exits non-zero: {stderr}"
    );
}
