//! Weft on the test bed's real node, end to end: the images built by `make images`
//! imported into the node's containerd, the chart installed with `helm install`, and real
//! pods whose traffic goes through the injected init container's interception and the
//! native-sidecar proxy.
//!
//! ```text
//!  Node::start_attached ─▶ import images ─▶ helm install ─▶ scenario 1 ─▶ … ─▶ helm uninstall
//!                                                             │ own namespace(s), labelled
//!                                                             │ weft-e2e/scenario=<name>
//!                                                             └─ failure: dump, go on
//!  drop(node) ─▶ nothing left ─▶ fail with every failed scenario's name and error
//! ```
//!
//! One `#[test]` runs every scenario on one node (bringing a node up takes tens of
//! seconds, and there is one per machine): a failing scenario is recorded with what its
//! namespace held and the run goes on, so one broken scenario does not hide the others.
//! The scenarios that disturb the whole mesh (the operator down, `helm uninstall`) run
//! last. Needs root and the images (`make images`); `#[ignore]`d, run by `make node-test`.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod basic;
mod control;
mod install;
mod kube;
mod traffic;

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::bail;
use weft_e2e::{Helm, node::Node, shared::init_tracing};

use kube::Kube;

/// What every scenario gets: kubectl for the node's cluster, Helm and its home.
pub struct Ctx<'a> {
    /// The node (for its control plane's logs).
    pub node: &'a Node,
    /// kubectl against the node's cluster.
    pub kube: Kube,
    /// The Helm binary.
    pub helm: Helm,
    /// Helm's cache, config and data directory for this run.
    pub helm_home: PathBuf,
    /// The scenario running now (namespaces are labelled with it).
    scenario: std::cell::RefCell<&'static str>,
}

impl Ctx<'_> {
    /// Creates a namespace for the running scenario, named `<prefix>-<random>`, labelled
    /// for injection when `inject`; returns its name.
    pub fn namespace(&self, prefix: &str, inject: bool) -> anyhow::Result<String> {
        let name = format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff);
        let mut labels = format!("\n    weft-e2e/scenario: {}", self.scenario.borrow());
        if inject {
            labels.push_str("\n    weft.dev/inject: enabled");
        }
        self.kube.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:{labels}\n"
        ))?;
        Ok(name)
    }

    /// The namespaces the running scenario created.
    fn scenario_namespaces(&self) -> Vec<String> {
        let selector = format!("weft-e2e/scenario={}", self.scenario.borrow());
        self.kube
            .json(&["get", "namespaces", "-l", &selector])
            .map(|l| {
                l["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A named scenario.
type Scenario = (&'static str, fn(&Ctx) -> anyhow::Result<()>);

/// In priority order; the ones that disturb the whole mesh last.
const SCENARIOS: &[Scenario] = &[
    (
        "injection",
        basic::injection_into_deployment_statefulset_and_job,
    ),
    (
        "ordering",
        basic::proxy_starts_before_and_stops_after_the_app,
    ),
    ("mtls", basic::mtls_between_pods_with_their_identities),
    ("opt-out", basic::a_pod_annotated_disabled_bypasses_the_mesh),
    (
        "log-level",
        basic::a_proxys_log_level_is_set_by_annotation_and_changed_by_kubectl_weft,
    ),
    (
        "tap",
        basic::kubectl_weft_tap_shows_live_requests_with_both_identities,
    ),
    ("split", traffic::a_route_splits_within_tolerance),
    ("retries", traffic::retries_hide_a_failing_pod),
    ("breaker", traffic::a_breaker_ejects_a_failing_pod),
    ("policy", traffic::a_policy_denies_and_allows_as_written),
    (
        "policy-probes",
        traffic::a_policy_keeps_the_kubelets_probes_passing,
    ),
    (
        "grpc-probes",
        traffic::grpc_probes_pass_under_strict_and_follow_the_app,
    ),
    (
        "tcp-probes",
        traffic::tcp_probes_pass_under_strict_and_follow_the_app,
    ),
    (
        "strict-namespace",
        traffic::a_strict_namespace_policy_refuses_plain_text,
    ),
    (
        "rolling-update",
        traffic::a_rolling_update_under_load_loses_no_request,
    ),
    (
        "operator-upgrade",
        control::helm_upgrade_rolls_the_operator_without_a_lost_request,
    ),
    (
        "operator-down",
        control::traffic_flows_without_the_operator_and_config_arrives_after,
    ),
    (
        "uninstall",
        control::helm_uninstall_leaves_workloads_serving,
    ),
];

#[test]
#[ignore = "needs root, the node and the images from `make images`: make node-test"]
fn weft_on_a_real_node() -> anyhow::Result<()> {
    init_tracing();
    let only: Option<Vec<String>> = std::env::var("WEFT_MESH_SCENARIOS")
        .ok()
        .map(|s| s.split(',').map(|s| s.trim().to_owned()).collect());
    let run_started = Instant::now();
    let archives = weft_e2e::mesh::ImageArchives::find()?;
    let helm = Helm::ensure()?;

    let t = Instant::now();
    let node = Node::start_attached()?;
    let node_up = t.elapsed();
    let kube = Kube::new(weft_e2e::mesh::Cluster::of_node(&node));
    let helm_home = node.testbed().dir().join("helm-home");
    let ctx = Ctx {
        node: &node,
        kube,
        helm,
        helm_home,
        scenario: std::cell::RefCell::new("install"),
    };

    let t = Instant::now();
    weft_e2e::mesh::import_images(&node, &archives)?;
    let imported = t.elapsed();
    let t = Instant::now();
    install::install_weft(&ctx)?;
    let installed = t.elapsed();

    let mut timings: Vec<(String, Duration, Option<String>)> = Vec::new();
    for (name, scenario) in SCENARIOS {
        if let Some(only) = &only
            && !only.iter().any(|o| o == name)
        {
            continue;
        }
        *ctx.scenario.borrow_mut() = name;
        tracing::info!(scenario = name, "scenario starts");
        let t = Instant::now();
        let result = match catch_unwind(AssertUnwindSafe(|| scenario(&ctx))) {
            Ok(r) => r,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "panicked".to_owned());
                Err(anyhow::anyhow!("panicked: {msg}"))
            }
        };
        let elapsed = t.elapsed();
        let failure = result.err().map(|e| {
            let mut text = format!("{e:#}");
            for ns in ctx.scenario_namespaces() {
                text.push_str(&format!("\n=== namespace {ns} ===\n{}", ctx.kube.dump(&ns)));
            }
            text.push_str(&format!(
                "\n=== weft-system ===\n{}",
                ctx.kube.dump(install::NAMESPACE)
            ));
            let operator = install::operator_deployment();
            if let Ok(out) =
                ctx.kube
                    .output(&["-n", install::NAMESPACE, "logs", &operator, "--tail=40"])
            {
                text.push_str(&format!(
                    "--- operator ---\n{}",
                    String::from_utf8_lossy(&out.stdout)
                ));
            }
            text
        });
        match &failure {
            None => tracing::info!(scenario = name, ?elapsed, "scenario passed"),
            Some(f) => tracing::error!(scenario = name, ?elapsed, failure = %f, "scenario failed"),
        }
        // The scenario's pods would otherwise compete for the node's two cores.
        for ns in ctx.scenario_namespaces() {
            let _ = ctx
                .kube
                .output(&["delete", "namespace", &ns, "--wait=false"]);
        }
        timings.push(((*name).to_owned(), elapsed, failure));
    }

    let root = node.root().to_path_buf();
    let t = Instant::now();
    drop(ctx);
    drop(node);
    let down = t.elapsed();

    let mut summary = format!(
        "node up {node_up:.1?}, images imported {imported:.1?}, helm install {installed:.1?}\n"
    );
    for (name, elapsed, failure) in &timings {
        let verdict = if failure.is_some() { "FAILED" } else { "ok" };
        summary.push_str(&format!("  {name:<16} {elapsed:>8.1?}  {verdict}\n"));
    }
    summary.push_str(&format!(
        "node down {down:.1?}; whole run {:.1?}",
        run_started.elapsed()
    ));
    eprintln!("{summary}");
    assert!(
        !root.exists(),
        "{} remains after the node went",
        root.display()
    );

    let failed: Vec<String> = timings
        .into_iter()
        .filter_map(|(name, _, f)| f.map(|f| format!("--- {name} ---\n{f}")))
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} scenario(s) failed:\n{}\n\n{summary}",
            failed.len(),
            failed.join("\n\n")
        );
    }
    Ok(())
}
