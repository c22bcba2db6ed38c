//! Golden tests for `kubectl weft inject` and `uninject` on realistic manifests. Run with
//! `UPDATE_GOLDEN=1` to rewrite the expected files after a deliberate change, and review
//! the diff.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fs,
    path::{Path, PathBuf},
};

use kubectl_weft::manifest::{Action, process};
use weft_inject::InjectConfig;

fn cfg() -> InjectConfig {
    InjectConfig {
        proxy_image: "registry.example/weft-proxy:0.1.0".to_owned(),
        proxy_version: "0.1.0".to_owned(),
        ..InjectConfig::default()
    }
}

fn golden(dir: &Path, name: &str, actual: &str) {
    let path = dir.join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::write(&path, actual).unwrap();
    }
    let want = fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} missing: run with UPDATE_GOLDEN=1", path.display()));
    assert!(
        want == actual,
        "{} differs from the output:\n{actual}",
        path.display()
    );
}

fn check(input: &str, injected: &str) -> Vec<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let text = fs::read_to_string(dir.join(input)).unwrap();
    let (out, reports) = process(&text, Action::Inject, &cfg()).unwrap();
    golden(&dir, injected, &out);

    // Injecting again changes nothing.
    let (again, _) = process(&out, Action::Inject, &cfg()).unwrap();
    assert_eq!(again, out, "a second inject changed {input}");

    // Uninjecting gives back documents equal to the input's.
    let (back, _) = process(&out, Action::Uninject, &cfg()).unwrap();
    let parse = |s: &str| -> Vec<serde_yaml::Value> {
        if s.trim_start().starts_with('{') {
            vec![serde_yaml::from_str(s).unwrap()]
        } else {
            serde_yaml::Deserializer::from_str(s)
                .map(|d| serde::Deserialize::deserialize(d).unwrap())
                .filter(|v: &serde_yaml::Value| !v.is_null())
                .collect()
        }
    };
    assert_eq!(
        parse(&back),
        parse(&text),
        "uninject did not restore {input}"
    );
    reports
        .into_iter()
        .map(|r| format!("{} {}", r.object, r.result))
        .collect()
}

#[test]
fn deployment_with_a_service() {
    let reports = check("deployment.yaml", "deployment.injected.yaml");
    assert_eq!(reports, ["deployment/web injected"]);
    let out = fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/deployment.injected.yaml"),
    )
    .unwrap();
    // The Service document is untouched, byte for byte.
    assert!(
        out.ends_with(
            &fs::read_to_string(
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/deployment.yaml")
            )
            .unwrap()
            .split("---\n")
            .nth(1)
            .unwrap()
            .to_owned()
        )
    );
    assert!(out.contains("--skip-outbound-cidrs=169.254.169.254/32"));
    assert!(out.contains("WEFT_OPAQUE_PORTS"));
}

#[test]
fn cronjob_statefulset_daemonset_and_others() {
    let reports = check("workloads.yaml", "workloads.injected.yaml");
    assert_eq!(
        reports,
        [
            "cronjob/report injected",
            "statefulset/cache skipped (pod opted out with weft.dev/inject: disabled)",
            "daemonset/node-agent skipped (pod uses hostNetwork)",
        ]
    );
}

#[test]
fn json_list() {
    let reports = check("list.json", "list.injected.json");
    assert_eq!(reports, ["pod/solo injected", "job/once injected"]);
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    for input in [
        "kind: Pod\nspec: [1, 2",
        "{\"kind\": \"Pod\", ",
        "kind: Deployment\nspec:\n  template:\n    spec:\n      containers: 7\n",
    ] {
        assert!(process(input, Action::Inject, &cfg()).is_err(), "{input}");
    }
}

#[test]
fn a_pod_that_cannot_be_meshed_is_an_error_naming_it() {
    let input = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: clash\nspec:\n  containers:\n  - name: app\n    image: x\n    ports:\n    - containerPort: 15021\n";
    let err = process(input, Action::Inject, &cfg())
        .unwrap_err()
        .to_string();
    assert!(err.contains("pod/clash") && err.contains("15021"), "{err}");
}

#[test]
fn a_misspelt_annotation_is_reported_as_a_warning() {
    let input = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: typo\n  annotations:\n    weft.dev/opaque-port: \"3306\"\nspec:\n  containers:\n  - name: app\n    image: x\n";
    let (_, reports) = process(input, Action::Inject, &cfg()).unwrap();
    let lines: Vec<String> = reports
        .iter()
        .map(|r| format!("{} {}", r.object, r.result))
        .collect();
    assert_eq!(
        lines,
        [
            "pod/typo warning: annotation weft.dev/opaque-port is not one Weft reads, so it does nothing; did you mean weft.dev/opaque-ports?",
            "pod/typo injected",
        ]
    );
}
