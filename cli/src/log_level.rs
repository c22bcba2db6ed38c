//! `kubectl weft log-level POD [FILTER]`: shows a meshed pod's proxy log filter, or
//! replaces it while the proxy runs, so that one proxy can be made verbose for a while
//! without restarting its pod (which would lose the state being looked at).
//!
//! ```text
//! FILTER ─▶ LogFilter::parse (refused here, before anything is touched)
//! kubectl port-forward (or --admin-url) ─▶ GET /log-level, PUT /log-level ─▶ the proxy
//! ```
//!
//! The proxy takes a new filter from loopback peers only; a port-forward's connections
//! arrive on the pod's loopback and are authorized by the caller's RBAC
//! (`pods/portforward`), as for `kubectl exec`. The change lasts until the proxy restarts;
//! the `weft.dev/proxy-log-level` annotation sets the filter a proxy starts with.

use weft_api::LogFilter;

use crate::admin::{PodAdmin, call_direct};

/// Flags of `kubectl weft log-level`.
#[derive(Debug, clap::Args)]
pub struct LogLevelArgs {
    /// The meshed pod whose proxy's filter is shown or changed.
    pub pod: String,
    /// The new filter: a level (`debug`) or levels per target (`warn,weft_proxy=debug`);
    /// without it, the filter in force is shown.
    pub filter: Option<String>,
    /// The pod's namespace.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// The proxies' admin port.
    #[arg(long, default_value_t = 15021)]
    pub admin_port: u16,
    /// Reach the proxy's admin endpoint here (`http://127.0.0.1:PORT`, an existing
    /// port-forward) instead of running `kubectl port-forward`.
    #[arg(long)]
    pub admin_url: Option<String>,
}

/// Runs the command: one line on stdout, the filter in force (and the one before it).
pub async fn run(args: LogLevelArgs) -> anyhow::Result<()> {
    let new = args
        .filter
        .as_deref()
        .map(LogFilter::parse)
        .transpose()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let admin = PodAdmin::open(
        &args.namespace,
        &args.pod,
        args.admin_port,
        args.admin_url.as_deref(),
    )
    .await?;
    let answer = async {
        let before = call_direct(admin.url(), "GET", "/log-level", None).await?;
        let Some(new) = &new else {
            return anyhow::Ok(line(&args, before.trim(), None));
        };
        let now = call_direct(admin.url(), "PUT", "/log-level", Some(new.as_str())).await?;
        anyhow::Ok(line(&args, before.trim(), Some(now.trim())))
    }
    .await;
    admin.close().await;
    let line = answer?;
    std::io::Write::write_all(&mut std::io::stdout(), format!("{line}\n").as_bytes())?;
    Ok(())
}

/// What the command prints: the filter in force, or the change.
fn line(args: &LogLevelArgs, before: &str, now: Option<&str>) -> String {
    let pod = format!("{}/{}", args.namespace, args.pod);
    match now {
        None => format!("{pod}: {before}"),
        Some(now) => format!(
            "{pod}: {before} -> {now} (until the proxy restarts; the weft.dev/proxy-log-level annotation sets the filter it starts with)"
        ),
    }
}
