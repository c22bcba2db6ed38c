//! The demo (`make demo`): its manifests pass the real API server's validation, and the
//! whole demo, run against the test bed's node, shows what it says it shows.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context, bail};
use weft_e2e::{
    Helm,
    demo::{self, Demo, NAMESPACE, Narrator},
    mesh::{self, Cluster, ImageArchives},
    node::Node,
    repo_root,
    shared::{self, init_tracing},
};

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().context("spawning")?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `kubectl apply --dry-run=server` of every file in `demo/manifests/`: the API server
/// validates them against the installed CRDs (strict field validation, CEL rules) without
/// keeping them, so a manifest that drifted from the CRDs or Kubernetes' schemas fails.
#[tokio::test]
async fn the_demo_manifests_pass_the_api_servers_validation() -> anyhow::Result<()> {
    let client = shared::client().await?;
    shared::install_crds(&client).await?;
    let bed = shared::testbed();
    let manifests = repo_root().join("demo/manifests");
    // The namespace and ServiceAccounts for real: the dry run of objects in the namespace
    // needs it to exist, and of a pod its ServiceAccount.
    for file in ["app/00-namespace.yaml", "app/10-serviceaccounts.yaml"] {
        run(bed
            .kubectl()
            .arg("apply")
            .arg("-f")
            .arg(manifests.join(file)))?;
    }
    let dry_run = |path: &Path| {
        run(bed
            .kubectl()
            .args(["apply", "--dry-run=server", "-f"])
            .arg(path))
    };
    let app = dry_run(&manifests.join("app"))?;
    for object in [
        "namespace/weft-demo",
        "serviceaccount/web",
        "serviceaccount/client",
        "serviceaccount/intruder",
        "deployment.apps/web-v1",
        "deployment.apps/web-v2",
        "deployment.apps/client",
        "service/web",
        "service/web-v1",
        "service/web-v2",
    ] {
        assert!(
            app.lines()
                .any(|l| l.starts_with(object) && l.ends_with("(server dry run)")),
            "{object} missing from the dry run:\n{app}"
        );
    }
    for (file, object) in [
        ("route-90-10.yaml", "route.weft.dev/web"),
        ("route-50-50.yaml", "route.weft.dev/web"),
        ("breaker.yaml", "breaker.weft.dev/web-v2"),
        ("policy.yaml", "policy.weft.dev/web"),
        ("intruder.yaml", "pod/intruder"),
    ] {
        let out = dry_run(&manifests.join(file))?;
        assert!(
            out.starts_with(object) && out.trim_end().ends_with("(server dry run)"),
            "{file}: {out}"
        );
    }
    // The same check refuses a Route the CRD forbids, so it can fail.
    let bad = demo::ROUTE_90_10.replace("weight: 10", "weight: -10");
    let dir = tempdir()?;
    let bad_file = dir.join("bad-route.yaml");
    std::fs::write(&bad_file, bad)?;
    let err = dry_run(&bad_file).expect_err("a negative weight passed the dry run");
    assert!(format!("{err:#}").contains("weight"), "{err:#}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("weft-demo-test-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The whole demo, non-interactively, on the test bed's node (attached: removed at the
/// end): Weft installed with Helm from the built images, the demo application meshed,
/// and each step's observation asserted. Needs root, `make images` (with the demo app's
/// image) and kubectl-weft built (`cargo build -p kubectl-weft`).
#[test]
#[ignore = "needs root, the images (make images) and kubectl-weft; run by .ci/run"]
fn the_demo_runs_on_the_node_and_shows_what_it_says() -> anyhow::Result<()> {
    init_tracing();
    let started = Instant::now();
    let archives = ImageArchives::find()?;
    let helm = Helm::ensure()?;
    let node = Node::start_attached()?;
    let node_up = started.elapsed();
    mesh::import_images(&node, &archives)?;
    let cluster = Cluster::of_node(&node);
    let helm_home = node.testbed().dir().join("helm");
    std::fs::create_dir_all(&helm_home)?;
    let kubectl_weft = std::env::current_exe()
        .ok()
        .and_then(|exe| demo::find_kubectl_weft(&exe))
        .context("kubectl-weft is not built beside this test: cargo build -p kubectl-weft")?;

    // The narration goes to the test's output, as a user would read it.
    let mut narrator = Narrator::new(Box::new(std::io::stderr()));
    let demo_started = Instant::now();
    demo::install(&mut narrator, &cluster, &helm, &helm_home, &[])?;
    let report = Demo::new(&cluster, &mut narrator, Some(kubectl_weft))
        .with_kubectl_dir(node.testbed().binaries().dir().to_path_buf())
        .run();
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            let pods = cluster
                .run(&["get", "pods", "-A", "-o", "wide"])
                .unwrap_or_default();
            return Err(e.context(format!("pods:\n{pods}")));
        }
    };
    eprintln!(
        "node up in {node_up:.1?}; demo (install to end) {:.1?}; total {:.1?}",
        demo_started.elapsed(),
        started.elapsed()
    );

    // Every demo pod runs the proxy as a native sidecar beside its app.
    assert_eq!(report.injected.len(), 4, "{:?}", report.injected);
    for pod in &report.injected {
        assert!(pod.meshed(), "{pod:?}");
        assert_eq!(pod.containers, ["app"], "{pod:?}");
    }
    // mTLS: the server's proxy verified the client's identity, and the client's proxy
    // required the server's.
    let ids = &report.identities;
    assert_eq!(
        ids.web_saw_client.as_deref(),
        Some(format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/client").as_str()),
        "{ids:?}"
    );
    assert_eq!(
        ids.client_required_web.as_deref(),
        Some(format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/web").as_str()),
        "{ids:?}"
    );
    // Splits within tolerance.
    for split in [&report.split_90_10, &report.split_50_50] {
        assert!(
            split.within_tolerance(),
            "expected web-v2 {:.0} %, observed {}",
            split.expected_v2 * 100.0,
            split.describe()
        );
        assert!(split.v1 + split.v2 >= 700, "{split:?}");
    }
    // The failing pod hurt the client, was ejected, and the client recovered.
    let b = &report.breaker;
    assert!(b.failures_before_ejection > 0, "{b:?}");
    assert!(b.ejected_endpoints >= 1.0, "{b:?}");
    assert_eq!(b.failing_pod_requests_after(), 0, "{b:?}");
    assert!(b.after.sent >= 150, "{b:?}");
    assert!(b.after.success_rate() >= 0.99, "{b:?}");
    // The Policy refused the intruder and let the client through.
    let p = &report.policy;
    assert!(p.intruder.sent >= 20, "{p:?}");
    assert_eq!(p.intruder.status_count(403), p.intruder.sent, "{p:?}");
    assert_eq!(
        p.intruder.weft_errors.get("forbidden").copied(),
        Some(p.intruder.sent),
        "{p:?}"
    );
    assert!(
        p.client.sent >= 150 && p.client.ok == p.client.sent,
        "{p:?}"
    );
    assert!(p.denials_counted >= p.intruder.sent as f64, "{p:?}");
    // Golden metrics name the demo's deployments.
    let stat = report.stat.as_deref().unwrap_or_default();
    for deploy in ["web-v1", "web-v2", "client"] {
        assert!(stat.contains(deploy), "{stat}");
    }
    // The tap shows web-v1's requests from the client's identity, then its end.
    let tap = report.tap.as_deref().unwrap_or_default();
    assert!(
        tap.contains(" inbound  GET ")
            && tap.contains(" 200 ")
            && tap.contains("from spiffe://cluster.local/ns/weft-demo/sa/client")
            && tap.contains("ended: 5 request(s) shown"),
        "{tap}"
    );
    assert!(report.problems.is_empty(), "{:?}", report.problems);

    // Dropping the attached node removes everything it created.
    drop(node);
    Ok(())
}
