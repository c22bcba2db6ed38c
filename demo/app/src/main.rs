//! `weft-demo-app`: the application of Weft's demo and node tests.
//!
//! - `serve` answers every request with its own name and pod, and fails on demand (a file
//!   that `fail` creates and `recover` removes, so `kubectl exec` can switch it in an image
//!   without a shell), and optionally answers the gRPC health check a `grpc` probe calls
//!   (`--grpc-health-listen`: SERVING, NOT_SERVING while failing), and optionally echoes on a
//!   TCP port that is closed while failing, for a `tcpSocket` probe (`--tcp-listen`);
//! - `load` sends GETs at a steady rate and prints one JSON report line per interval: status
//!   codes, which server and pod answered, Weft's error reasons, latency.

mod duration;
mod grpc_health;
mod load;
mod serve;
mod tcp_echo;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// The file whose presence makes `serve` fail; it holds the status code to answer with.
const FAIL_FILE: &str = "/tmp/weft-demo-fail";

#[derive(Parser)]
#[command(
    version,
    about = "Weft's demo application: a server that can be made to fail, and a load generator"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve HTTP/1.1: every path answers `<name> <pod>`, `/healthz` always 200.
    Serve {
        /// The address to listen on.
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// The name this server reports (`x-demo-server` and the body), e.g. `web-v1`.
        #[arg(long)]
        name: String,
        /// While this file exists, every request but `/healthz` is answered with the status
        /// it holds (500 when empty).
        #[arg(long, default_value = FAIL_FILE)]
        fail_file: PathBuf,
        /// How long to go on serving after SIGTERM before exiting, while the pod's removal
        /// from its Service reaches the clients (keep it under the pod's
        /// `terminationGracePeriodSeconds`).
        #[arg(long, default_value = "3s", value_parser = duration::parse)]
        drain: std::time::Duration,
        /// Also serve `grpc.health.v1.Health/Check` on this address, in plain-text HTTP/2
        /// as the kubelet's `grpc` probe calls it: SERVING, NOT_SERVING while the fail file
        /// exists, whatever service the request names. Off when not given.
        #[arg(long)]
        grpc_health_listen: Option<SocketAddr>,
        /// Also echo back what TCP connections send on this address, for a `tcpSocket`
        /// probe: the listening socket is closed (connect refused) while the fail file
        /// exists and reopened once it is gone, each within 200 ms. Off when not given.
        #[arg(long)]
        tcp_listen: Option<SocketAddr>,
    },
    /// Make the `serve` in this container fail (create the fail file).
    Fail {
        /// The status code to answer with while failing (500–599).
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u16).range(500..600))]
        status: u16,
        /// The fail file `serve` watches.
        #[arg(long, default_value = FAIL_FILE)]
        fail_file: PathBuf,
    },
    /// Make the `serve` in this container answer normally again (remove the fail file).
    Recover {
        /// The fail file `serve` watches.
        #[arg(long, default_value = FAIL_FILE)]
        fail_file: PathBuf,
    },
    /// Send GETs at a steady rate and print a JSON report line per interval.
    Load(load::Args),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve {
            listen,
            name,
            fail_file,
            drain,
            grpc_health_listen,
            tcp_listen,
        } => runtime().and_then(|rt| {
            rt.block_on(serve::run(
                serve::Listen {
                    http: listen,
                    grpc_health: grpc_health_listen,
                    tcp: tcp_listen,
                },
                name,
                fail_file,
                drain,
            ))
        }),
        Cmd::Fail { status, fail_file } => std::fs::write(&fail_file, status.to_string())
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", fail_file.display())),
        Cmd::Recover { fail_file } => match std::fs::remove_file(&fail_file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(anyhow::anyhow!("removing {}: {e}", fail_file.display()))
            }
            _ => Ok(()),
        },
        Cmd::Load(args) => {
            return match runtime().and_then(|rt| rt.block_on(load::run(args))) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "load failed");
                    ExitCode::from(2)
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "failed");
            ExitCode::from(2)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}
