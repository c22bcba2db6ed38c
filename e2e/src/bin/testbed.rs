//! `weft-testbed`: start and stop a real Kubernetes control plane on loopback.
//!
//! ```text
//! weft-testbed build           # build (or find cached) Kubernetes and node binaries, Helm
//! weft-testbed up              # start; writes .testbed/kubeconfig and .testbed/env
//! weft-testbed up --node       # the same, plus a real node (kubelet, containerd, CoreDNS)
//! source .testbed/env          # KUBECONFIG and a matching kubectl on PATH
//! weft-testbed down            # stop everything and remove .testbed/
//! ```

use std::{fs, path::PathBuf, time::Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use weft_e2e::{
    Binaries, HELM_VERSION, Helm, KUBERNETES_VERSION, TestBed,
    node::{self, Node},
    testbed::stop_dir,
};

#[derive(Parser)]
#[command(
    about = "Run a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager) on loopback"
)]
struct Cli {
    /// Where the running test bed keeps its state (PKI, data, logs, kubeconfig).
    #[arg(
        long,
        env = "WEFT_TESTBED_DIR",
        default_value = ".testbed",
        global = true
    )]
    dir: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the Kubernetes binaries, the node's binaries and Helm (or find them in the
    /// cache) and print where.
    Build,
    /// Start the control plane in the background and wait until it is ready.
    Up {
        /// Also run a real node (kubelet, kube-proxy, kube-scheduler, containerd, CoreDNS):
        /// needs root; one per machine.
        #[arg(long)]
        node: bool,
    },
    /// Stop the control plane (and the node, if one runs) and remove their state.
    Down,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube_client=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();

    match cli.command {
        Cmd::Build => {
            let started = Instant::now();
            let bins = Binaries::ensure()?;
            eprintln!(
                "Kubernetes {KUBERNETES_VERSION} binaries in {} ({:.1?})",
                bins.dir().display(),
                started.elapsed()
            );
            let started = Instant::now();
            let node_bins = node::NodeBinaries::ensure()?;
            eprintln!(
                "node binaries (containerd, runc, crictl, CoreDNS, pause) in {} ({:.1?})",
                node_bins.dir().display(),
                started.elapsed()
            );
            let started = Instant::now();
            let helm = Helm::ensure()?;
            eprintln!(
                "Helm {HELM_VERSION} at {} ({:.1?})",
                helm.path().display(),
                started.elapsed()
            );
        }
        Cmd::Up { node } => {
            let dir = std::path::absolute(&cli.dir)?;
            let started = Instant::now();
            // Detached: what these hold keeps running after this process exits.
            let node_handle = if node {
                Some(Node::start_detached(&dir)?)
            } else {
                None
            };
            let bed_handle = match node_handle {
                Some(_) => None,
                None => Some(TestBed::start_detached(&dir)?),
            };
            let bed = node_handle
                .as_ref()
                .map(Node::testbed)
                .or(bed_handle.as_ref())
                .context("no test bed was started")?;
            let env = format!(
                "export KUBECONFIG={}\nexport PATH={}:$PATH\n",
                bed.kubeconfig().display(),
                bed.binaries().dir().display()
            );
            let env_file = dir.join("env");
            fs::write(&env_file, env).with_context(|| format!("writing {}", env_file.display()))?;
            let what = if node {
                "test bed with node"
            } else {
                "test bed"
            };
            eprintln!(
                "{what} up at {} in {:.1?} (Kubernetes {KUBERNETES_VERSION})\n  source {}   # sets KUBECONFIG and puts kubectl on PATH\n  logs: {}/*.log",
                bed.server(),
                started.elapsed(),
                env_file.display(),
                dir.display()
            );
        }
        Cmd::Down => {
            let dir = std::path::absolute(&cli.dir)?;
            if node::node_root().exists() {
                node::down(Some(&dir))?;
            } else {
                stop_dir(&dir)?;
            }
            eprintln!("test bed down");
        }
    }
    Ok(())
}
