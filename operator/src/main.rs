//! `weft-operator`: the control plane binary. Flags and environment are read here, once;
//! everything else lives in the library ([`weft_operator::mesh::run`]).

use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};
use tokio_util::sync::CancellationToken;
use weft_operator::{
    mesh::{self, Settings},
    push::Authenticator,
    status::lease::LeaseConfig,
};

/// Weft's control plane: watches the mesh, pushes config to every proxy, writes status.
#[derive(Parser, Debug)]
#[command(name = "weft-operator", version, about)]
struct Args {
    /// Where proxies subscribe to their config (HTTP/2, `weft.push.v1`).
    #[arg(long, env = "WEFT_PUSH_ADDR", default_value = "0.0.0.0:8090")]
    push_addr: SocketAddr,
    /// Admin listener: /healthz, /readyz, /metrics, /proxies.
    #[arg(long, env = "WEFT_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    admin_addr: SocketAddr,
    /// The SPIFFE trust domain of workload identities.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The audience proxies' projected ServiceAccount tokens must carry.
    #[arg(long, env = "WEFT_TOKEN_AUDIENCE", default_value = "weft")]
    token_audience: String,
    /// Namespace of the Lease that elects the status writer (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "weft-system")]
    lease_namespace: String,
    /// Name of that Lease.
    #[arg(long, env = "WEFT_LEASE_NAME", default_value = "weft-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (its pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long the Lease holds without renewal.
    #[arg(long, env = "WEFT_LEASE_DURATION", default_value = "15s")]
    lease_duration: weft_api::Duration,
    /// Watch only this namespace (default: the whole cluster).
    #[arg(long, env = "WEFT_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Log filter, in `tracing_subscriber::EnvFilter` syntax.
    #[arg(long, env = "WEFT_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .with_context(|| format!("--log {:?}", args.log))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if args.lease_duration.as_std() < Duration::from_secs(3) {
        anyhow::bail!("--lease-duration must be at least 3s");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("weft-operator")
        .enable_all()
        .build()
        .context("start the runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("build a Kubernetes client (in-cluster config or KUBECONFIG)")?;
    let push = TcpListener::bind(args.push_addr)
        .await
        .with_context(|| format!("bind the push listener on {}", args.push_addr))?;
    let admin = TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("bind the admin listener on {}", args.admin_addr))?;
    let identity = match args.identity {
        Some(i) => i,
        None => format!("weft-operator-{:08x}", rand::random::<u32>()),
    };
    let settings = Settings {
        push,
        admin: Some(admin),
        trust_domain: args.trust_domain,
        auth: Authenticator::token_review(client.clone(), vec![args.token_audience]),
        lease: Some(LeaseConfig {
            namespace: args.lease_namespace,
            name: args.lease_name,
            identity,
            duration: args.lease_duration.as_std(),
        }),
        namespace: args.watch_namespace,
    };
    let shutdown = CancellationToken::new();
    let (_handles, done) = mesh::run(client, settings, shutdown.clone());
    let mut sigterm = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), done).await;
    Ok(())
}
