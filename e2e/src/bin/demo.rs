//! `weft-demo` (`make demo`): Weft on a cluster, shown step by step.
//!
//! ```text
//! make demo                        # images/build, kubectl-weft, then this
//! cargo run -p weft-e2e --bin weft-demo
//! KUBECONFIG=~/.kube/config cargo run -p weft-e2e --bin weft-demo   # your cluster
//! ```
//!
//! Without `KUBECONFIG` it brings up the test bed's node (as `weft-testbed up --node`,
//! same state directory) and leaves it running for you to explore; `weft-testbed down`
//! removes it. With `KUBECONFIG` it uses that cluster and imports no images.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, bail};
use clap::Parser;
use weft_e2e::{
    Helm,
    demo::{self, Demo, Narrator, Report},
    mesh::{self, Cluster, ImageArchives},
    node::Node,
};

#[derive(Parser)]
#[command(
    about = "Weft's demo: install the mesh, mesh a small application, then show mTLS, traffic splits, a Breaker, a Policy and golden metrics"
)]
struct Cli {
    /// Where the local node's control plane keeps its state (the same directory as
    /// `weft-testbed up --node`, so `weft-testbed down` removes what the demo started).
    #[arg(long, env = "WEFT_TESTBED_DIR", default_value = ".testbed")]
    dir: PathBuf,
    /// Use this cluster instead of bringing up the local node (images are not imported:
    /// its nodes must be able to pull them, or have them already).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,kube_client=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let mut narrator = Narrator::new(Box::new(std::io::stdout()));
    let started = Instant::now();
    let kubectl_weft = std::env::current_exe()
        .ok()
        .and_then(|exe| demo::find_kubectl_weft(&exe));

    narrator.progress("preparing Helm (built from the Go module proxy once, then cached)");
    let helm = Helm::ensure()?;
    // Keep the node (a detached one outlives this process) while the demo runs.
    let (cluster, node, local) = match &cli.kubeconfig {
        Some(kubeconfig) => {
            narrator.step("Your cluster (KUBECONFIG)");
            narrator.say(&format!(
                "Using {}. This demo does not import images there: its nodes must pull or already have\n  \
                 {}\n  {}\n  {}",
                kubeconfig.display(),
                mesh::image_ref("weft-proxy"),
                mesh::image_ref("weft-operator"),
                mesh::image_ref("weft-demo-app"),
            ));
            let cluster = Cluster::new(kubeconfig.clone(), PathBuf::from("kubectl"));
            (cluster, None, false)
        }
        None => {
            if !running_as_root() {
                bail!(
                    "the local node needs root (containerd, kubelet, iptables): run as root, or set KUBECONFIG to a cluster of yours"
                );
            }
            let archives = ImageArchives::find()?;
            let dir = std::path::absolute(&cli.dir)?;
            narrator.step("The test bed's node");
            narrator.progress(
                "bringing up the control plane and the node (warm: about 15 s; the first run builds Kubernetes and the node's binaries: about 25 min)",
            );
            let node = Node::start_detached(&dir)?;
            let env = format!(
                "export KUBECONFIG={}\nexport PATH={}:$PATH\n",
                node.testbed().kubeconfig().display(),
                node.testbed().binaries().dir().display()
            );
            fs::write(dir.join("env"), env).context("writing the test bed's env file")?;
            narrator.progress("node ready");
            narrator.say(&format!(
                "kubectl for this cluster: source {}",
                dir.join("env").display()
            ));
            narrator.kubectl_setup = Some(format!("source {}", dir.join("env").display()));
            narrator.progress(
                "importing the proxy, operator and demo images into the node's containerd",
            );
            mesh::import_images(&node, &archives)?;
            narrator.progress("images imported");
            narrator.see("kubectl get node -o jsonpath='{.items[0].status.images[*].names}'");
            (Cluster::of_node(&node), Some(node), true)
        }
    };

    let helm_home = helm_home(&cli, local)?;
    let release = helm
        .command(&helm_home, cluster.kubeconfig())
        .args(["status", mesh::RELEASE, "-n", mesh::NAMESPACE])
        .output()?;
    if release.status.success() {
        narrator.step("Installing Weft with Helm");
        narrator.say(&format!(
            "The release {} is already installed in {}: using it as it is.",
            mesh::RELEASE,
            mesh::NAMESPACE
        ));
    } else if local {
        demo::install(&mut narrator, &cluster, &helm, &helm_home, &[])?;
    } else {
        demo::install(
            &mut narrator,
            &cluster,
            &helm,
            &helm_home,
            &[
                "operator.image.pullPolicy=IfNotPresent",
                "proxy.image.pullPolicy=IfNotPresent",
            ],
        )?;
    }

    let mut demo = Demo::new(&cluster, &mut narrator, kubectl_weft);
    if let Some(node) = &node {
        demo = demo.with_kubectl_dir(node.testbed().binaries().dir().to_path_buf());
    }
    let report = demo.run()?;
    finish(&mut narrator, &report, local, &cli, started);
    if !report.problems.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

/// Helm's caches for the demo: beside the test bed's state, or under `~/.cache/weft`.
fn helm_home(cli: &Cli, local: bool) -> anyhow::Result<PathBuf> {
    let dir = if local {
        std::path::absolute(&cli.dir)?.join("helm")
    } else {
        weft_e2e::binaries::cache_root().join("demo-helm")
    };
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid() == 0
    }
}

fn finish(narrator: &mut Narrator, report: &Report, local: bool, cli: &Cli, started: Instant) {
    narrator.step("Done");
    narrator.say(&format!(
        "The demo took {:.0} s.",
        started.elapsed().as_secs_f64()
    ));
    if report.problems.is_empty() {
        narrator.say("Everything was observed as expected.");
    } else {
        narrator.say("Observed not as expected:");
        for p in &report.problems {
            narrator.say(&format!("  - {p}"));
        }
    }
    narrator.say("Explore: the client keeps sending 20 requests per second.");
    if let Some(setup) = narrator.kubectl_setup.clone() {
        narrator.see(&setup);
    }
    narrator
        .see("kubectl -n weft-demo get pods,routes.weft.dev,breakers.weft.dev,policies.weft.dev");
    narrator.see("kubectl -n weft-demo logs deploy/client -c app -f");
    narrator.see("kubectl delete -f demo/manifests/policy.yaml   # and watch the intruder get in");
    narrator.see("kubectl weft stat deploy -n weft-demo --watch");
    narrator.say("More in docs/demo.md. Tear down:");
    if local {
        narrator.see(&format!(
            "cargo run -p weft-e2e --bin weft-testbed -- --dir {} down",
            display_dir(&cli.dir)
        ));
    } else {
        narrator.see("kubectl delete namespace weft-demo");
        narrator.see("helm uninstall weft -n weft-system");
    }
}

fn display_dir(dir: &Path) -> String {
    dir.display().to_string()
}
