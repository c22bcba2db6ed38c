//! `kubectl weft`: Weft's kubectl plugin. Install the binary on `PATH` as `kubectl-weft`.
//!
//! ```text
//! kubectl weft inject -f deploy.yaml | kubectl apply -f -
//! kubectl get deploy web -o yaml | kubectl weft inject -f - | kubectl apply -f -
//! kubectl weft uninject -f injected.yaml
//! kubectl weft inject --offline -f deploy.yaml            # no cluster: built-in defaults
//! kubectl weft inject --config settings.yaml -f deploy.yaml
//! kubectl weft stat deploy/web -n shop --window 10s
//! kubectl weft explain client-7d9 http://web.shop/api -n shop -H x-user=1
//! kubectl weft tap web-0 -n shop --direction inbound --path /api --for 5m
//! kubectl weft top deploy/web -n shop --for 30s
//! kubectl weft check --pre                                # before installing
//! kubectl weft check -o json                              # after
//! ```

use std::{
    fs,
    io::{Read, Write},
    path::PathBuf,
};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use kubectl_weft::manifest::{self, Action};
use kubectl_weft::settings::{self, Source};
use weft_inject::InjectConfig;

#[derive(Parser)]
#[command(
    name = "kubectl weft",
    about = "Weft service mesh: inject proxies, inspect the mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Add the Weft proxy to Pods and pod templates (Deployments, StatefulSets, DaemonSets,
    /// ReplicaSets, Jobs, CronJobs, Lists) read from files or stdin; write them to stdout.
    Inject(InjectArgs),
    /// Remove what `inject` (or the webhook) added.
    Uninject(FileArgs),
    /// Check the cluster before installing (`--pre`), or the installed mesh: each check
    /// passes, warns or fails with a hint; exits 1 when one fails.
    Check(kubectl_weft::check::CheckArgs),
    /// Each meshed pod's proxy: the config version it runs, whether it is in sync, when
    /// the operator last heard from it.
    ProxyStatus(kubectl_weft::proxy_status::ProxyStatusArgs),
    /// Success rate, requests per second and latency of deployments, pods, Services and
    /// Routes, from the proxies' own metrics (two scrapes, `--window` apart).
    Stat(kubectl_weft::stat::StatArgs),
    /// What a pod's proxy does with a request to DESTINATION, step by step, from its
    /// active config.
    Explain(kubectl_weft::explain::ExplainArgs),
    /// Show a meshed pod's (or a Deployment's) proxy log filter, or change it while the
    /// proxy runs, until it restarts or `--for` a while:
    /// `kubectl weft log-level deploy/web warn,weft_proxy=debug --for 10m`.
    LogLevel(kubectl_weft::log_level::LogLevelArgs),
    /// The requests a meshed pod's (or a Deployment's) proxy handles, live, a line each
    /// as they finish: `kubectl weft tap deploy/web -n shop --path /api --for 5m`.
    Tap(kubectl_weft::tap::TapArgs),
    /// The busiest requests through a meshed pod's (or a Deployment's) proxy over a while,
    /// with their success rate and latency: `kubectl weft top deploy/web -n shop --for 30s`.
    Top(kubectl_weft::top::TopArgs),
}

#[derive(Args)]
struct FileArgs {
    /// Manifest files (YAML or JSON, one or many documents); `-` reads stdin.
    #[arg(short = 'f', long = "filename", required = true)]
    files: Vec<PathBuf>,
}

#[derive(Args)]
struct InjectArgs {
    #[command(flatten)]
    files: FileArgs,
    /// Inject with the built-in defaults instead of the cluster's settings (no cluster
    /// needed).
    #[arg(long, conflicts_with = "config")]
    offline: bool,
    /// Inject with the settings in this file (the `weft-inject-config` ConfigMap as YAML,
    /// or a map of its keys) instead of the cluster's; no cluster needed.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The operator's namespace, where the ConfigMap `weft-inject-config` holds the
    /// injection settings the webhook uses.
    #[arg(long, env = "WEFT_NAMESPACE", default_value = "weft-system")]
    operator_namespace: String,
    /// The proxy image (overrides the settings).
    #[arg(long, env = "WEFT_PROXY_IMAGE")]
    proxy_image: Option<String>,
    /// The proxy version recorded on the pod (overrides the settings).
    #[arg(long)]
    proxy_version: Option<String>,
    /// `host:port` of the operator's config server (overrides the settings).
    #[arg(long)]
    operator_addr: Option<String>,
    /// The mesh's trust domain (overrides the settings).
    #[arg(long)]
    trust_domain: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (files, action, cfg) = match cli.command {
        Cmd::Check(args) => return check(&args),
        Cmd::ProxyStatus(args) => {
            return tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(kubectl_weft::proxy_status::run(args));
        }
        Cmd::Stat(args) => {
            return tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(kubectl_weft::stat::run(args));
        }
        Cmd::Explain(args) => {
            return tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(kubectl_weft::explain::run(args));
        }
        Cmd::LogLevel(args) => {
            return tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(kubectl_weft::log_level::run(args));
        }
        Cmd::Tap(args) => {
            return tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(kubectl_weft::tap::run(args));
        }
        Cmd::Top(args) => {
            return tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(kubectl_weft::top::run(args));
        }
        Cmd::Inject(args) => {
            let (mut cfg, source) = inject_settings(&args)?;
            writeln!(std::io::stderr(), "{source}")?;
            let from_cluster = !args.offline && args.config.is_none();
            writeln!(
                std::io::stderr(),
                "{}",
                settings::identity_line(
                    &cfg,
                    from_cluster.then_some(args.operator_namespace.as_str())
                )
            )?;
            if let Some(v) = args.proxy_image {
                cfg.proxy_image = v;
            }
            if let Some(v) = args.proxy_version {
                cfg.proxy_version = v;
            }
            if let Some(v) = args.operator_addr {
                cfg.operator_addr = v;
            }
            if let Some(v) = args.trust_domain {
                cfg.trust_domain = v;
            }
            (args.files.files, Action::Inject, cfg)
        }
        Cmd::Uninject(args) => (args.files, Action::Uninject, InjectConfig::default()),
    };
    // Every file is processed before anything is written: an error in any file leaves
    // stdout empty, so `... > out.yaml` never holds half an answer.
    let mut output = String::new();
    let mut report = String::new();
    for (i, file) in files.iter().enumerate() {
        let input = if file.as_os_str() == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading stdin")?;
            s
        } else {
            fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
        };
        let (out, reports) = manifest::process(&input, action, &cfg)
            .with_context(|| format!("{}", file.display()))?;
        if i > 0 && !out.starts_with("---") {
            output.push_str("---\n");
        }
        output.push_str(&out);
        for r in reports {
            report.push_str(&format!("{} {}\n", r.object, r.result));
        }
    }
    std::io::stdout().lock().write_all(output.as_bytes())?;
    std::io::stderr().lock().write_all(report.as_bytes())?;
    Ok(())
}

/// The settings `inject` uses before its explicit flags: the cluster's unless told otherwise.
fn inject_settings(args: &InjectArgs) -> anyhow::Result<(InjectConfig, Source)> {
    if args.offline {
        return Ok((InjectConfig::default(), Source::Defaults));
    }
    if let Some(path) = &args.config {
        return Ok(settings::from_file(path)?);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = kube::Client::try_default().await.context(
            "connecting to the cluster (KUBECONFIG) for its injection settings; pass --offline or --config FILE to inject without one",
        )?;
        settings::from_cluster(
            &client,
            &args.operator_namespace,
            weft_inject::settings::CONFIG_MAP,
        )
        .await
        .context("the cluster's injection settings (--offline or --config FILE inject without them)")
    })
}

fn check(args: &kubectl_weft::check::CheckArgs) -> anyhow::Result<()> {
    use kubectl_weft::check::Output;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the cluster (KUBECONFIG)")?;
        anyhow::Ok(kubectl_weft::check::run(&client, args).await)
    })?;
    let text = match args.output {
        Output::Text => report.to_text(),
        Output::Json => report.to_json(if args.pre { "pre" } else { "post" }),
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    if report.failures() > 0 {
        // The report said what failed; the exit code is for scripts.
        std::process::exit(1);
    }
    Ok(())
}
