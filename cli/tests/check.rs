//! `kubectl weft check` against the test bed's real API server, without an operator: what
//! is missing is named, and `--pre` judges the cluster and the caller before installing.
//! (The installed, healthy mesh and each way of breaking it: operator/tests/check.rs.)

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::Path, process::Command};

use k8s_openapi::api::{
    authentication::v1::TokenRequest,
    core::v1::{Pod, ServiceAccount},
};
use kube::{Api, api::PostParams};
use serde_json::{Value, json};
use weft_e2e::shared;

/// `kubectl weft check ARGS -o json` with `kubeconfig`: exit code and the document.
fn check(kubeconfig: &Path, args: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-weft"))
        .arg("check")
        .args(args)
        .args(["-o", "json"])
        .env("KUBECONFIG", kubeconfig)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let doc = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), doc)
}

fn finding<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {doc:#}"))
}

#[tokio::test]
async fn without_an_operator_check_names_what_is_missing_and_the_unmeshed_pod() {
    let client = shared::client().await.unwrap();
    shared::install_crds(&client).await.unwrap();
    let ns = shared::namespace(&client, "check").await.unwrap();
    // No webhook is registered in this test bed: an opted-in pod is created unmeshed.
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "missed", "annotations": {"weft.dev/inject": "enabled"}},
        "spec": {"containers": [{"name": "app", "image": "weft.invalid/app:1"}]}
    }))
    .unwrap();
    Api::<Pod>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();

    let kubeconfig = shared::testbed().kubeconfig();
    let (code, doc) = check(&kubeconfig, &["-n", &ns]);
    assert_eq!(code, 1, "a failed check exits 1: {doc:#}");
    assert_eq!(finding(&doc, "crds")["status"], "ok", "{doc:#}");
    let hook = finding(&doc, "webhook-registered");
    assert_eq!(hook["status"], "fail", "{doc:#}");
    assert_eq!(
        hook["message"],
        "injection webhook weft-injector is not registered: no pod is being injected"
    );
    assert_eq!(
        finding(&doc, "operator-replicas")["status"],
        "fail",
        "{doc:#}"
    );
    let unmeshed = finding(&doc, "unmeshed-pods");
    assert_eq!(unmeshed["status"], "fail", "{doc:#}");
    assert!(
        unmeshed["message"]
            .as_str()
            .unwrap()
            .contains(&format!("{ns}/missed (opted in by pod)")),
        "{doc:#}"
    );
    assert!(unmeshed["hint"].as_str().unwrap().contains("restart them"));
    assert_eq!(
        doc["summary"]["fail"],
        doc["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["status"] == "fail")
            .count()
    );
}

#[tokio::test]
async fn pre_passes_for_an_administrator_and_names_what_a_powerless_user_may_not_do() {
    let client = shared::client().await.unwrap();
    let bed = shared::testbed();
    let (code, doc) = check(&bed.kubeconfig(), &["--pre"]);
    assert_eq!(doc["phase"], "pre");
    assert_eq!(code, 0, "{doc:#}");
    let names: Vec<&str> = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["kubernetes-version", "native-sidecars", "permissions"]
    );
    assert!(
        doc["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["status"] == "ok"),
        "{doc:#}"
    );
    assert!(
        finding(&doc, "kubernetes-version")["message"]
            .as_str()
            .unwrap()
            .starts_with("Kubernetes v1.34"),
        "{doc:#}"
    );

    // A ServiceAccount no role is bound to, through a kubeconfig with its token.
    let ns = shared::namespace(&client, "check-pre").await.unwrap();
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "nobody"}})).unwrap();
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), &ns);
    sas.create(&PostParams::default(), &sa).await.unwrap();
    let req: TokenRequest =
        serde_json::from_value(json!({"spec": {"expirationSeconds": 600}})).unwrap();
    let token = sas
        .create_subresource::<TokenRequest, TokenRequest>(
            "token",
            "nobody",
            &PostParams::default(),
            &req,
        )
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(bed.kubeconfig()).unwrap()).unwrap();
    for user in config["users"].as_sequence_mut().unwrap() {
        user["user"] = serde_yaml::to_value(json!({"token": token})).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let nobody = dir.path().join("kubeconfig");
    std::fs::write(&nobody, serde_yaml::to_string(&config).unwrap()).unwrap();

    let (code, doc) = check(&nobody, &["--pre"]);
    assert_eq!(code, 1, "{doc:#}");
    let perms = finding(&doc, "permissions");
    assert_eq!(perms["status"], "fail", "{doc:#}");
    let message = perms["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "you may not: create customresourcedefinitions.apiextensions.k8s.io, create namespaces,"
        ),
        "{doc:#}"
    );
    assert!(message.contains("create secrets in weft-system"), "{doc:#}");
    assert!(
        perms["hint"]
            .as_str()
            .unwrap()
            .contains("cluster administrator")
    );
    // Not allowed to ask either: said, not claimed either way.
    let sidecars = finding(&doc, "native-sidecars");
    assert_eq!(sidecars["status"], "warn", "{doc:#}");
    assert!(
        sidecars["message"]
            .as_str()
            .unwrap()
            .starts_with("not checked"),
        "{doc:#}"
    );
}
