//! `kubectl weft log-level POD|deploy/NAME [FILTER] [--for DURATION]`: shows a meshed
//! pod's proxy log filter, or replaces it while the proxy runs (for good, or for a
//! while), so that a proxy can be made verbose without restarting its pod (which would
//! lose the state being looked at).
//!
//! ```text
//! FILTER, --for ─▶ LogFilter::parse, the duration (refused here, before anything is touched)
//! deploy/NAME ─▶ its running meshed pods (at most 10), one after another
//! kubectl port-forward (or --admin-url) ─▶ GET /log-level, PUT /log-level[?for=D] ─▶ the proxy
//! ```
//!
//! The proxy takes a new filter from loopback peers only; a port-forward's connections
//! arrive on the pod's loopback and are authorized by the caller's RBAC
//! (`pods/portforward`), as for `kubectl exec`. A change lasts until the proxy restarts,
//! or with `--for` that long, after which the proxy goes back by itself to the filter it
//! had for good; the `weft.dev/proxy-log-level` annotation sets the filter a proxy starts
//! with.

use std::io::Write;

use anyhow::{Context, bail};
use weft_api::LogFilter;

use crate::admin::{PodAdmin, PodTarget, call_direct};

/// Flags of `kubectl weft log-level`.
#[derive(Debug, clap::Args)]
pub struct LogLevelArgs {
    /// Whose proxy's filter is shown or changed: a meshed pod (`web-0`, `pod/web-0`), or
    /// a Deployment's running meshed pods (`deploy/web`, at most 10).
    pub target: String,
    /// The new filter: a level (`debug`) or levels per target (`warn,weft_proxy=debug`);
    /// without it, the filter in force is shown.
    pub filter: Option<String>,
    /// Make the change for this long only (`10m`, at most `24h`), after which each proxy
    /// goes back by itself to the filter it had for good.
    #[arg(long = "for")]
    pub duration: Option<String>,
    /// The pod's namespace.
    #[arg(short = 'n', long, default_value = "default")]
    pub namespace: String,
    /// The proxies' admin port.
    #[arg(long, default_value_t = 15021)]
    pub admin_port: u16,
    /// Reach a proxy's admin endpoint here instead of running `kubectl port-forward`:
    /// `http://127.0.0.1:PORT` (an existing port-forward) for a pod target, or
    /// `NAMESPACE/POD=http://127.0.0.1:PORT`, repeated, for any.
    #[arg(long)]
    pub admin_url: Vec<String>,
}

/// Runs the command: a line on stdout per pod, the filter in force (and the one before
/// it); an error naming each pod that could not be read or changed.
pub async fn run(args: LogLevelArgs) -> anyhow::Result<()> {
    let new = args
        .filter
        .as_deref()
        .map(LogFilter::parse)
        .transpose()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let duration = match (&args.duration, &new) {
        (None, _) => None,
        (Some(_), None) => bail!("--for makes a change temporary: give the FILTER to set too"),
        (Some(d), Some(_)) => {
            let parsed = d
                .parse::<weft_api::Duration>()
                .map_err(|e| anyhow::anyhow!("--for {d}: {e}"))?;
            let limit = weft_proxy::log_level::MAX_TEMPORARY;
            if parsed.as_std().is_zero() || parsed.as_std() > limit {
                bail!("--for {d}: more than zero and at most 24h");
            }
            Some(parsed)
        }
    };
    let target: PodTarget = args.target.parse()?;
    let urls = target.admin_urls(&args.namespace, &args.admin_url)?;
    let mut failed = 0;
    for pod in target.pods(&args.namespace).await? {
        let key = format!("{}/{pod}", args.namespace);
        let url = urls.get(&args.namespace, &pod);
        let result = async {
            let admin = PodAdmin::open(&args.namespace, &pod, args.admin_port, url).await?;
            let answer = async {
                let before = call_direct(admin.url(), "GET", "/log-level", None).await?;
                let Some(new) = &new else {
                    return anyhow::Ok(line(&key, before.trim(), None, None));
                };
                let path = match &duration {
                    Some(d) => format!("/log-level?for={}", d.as_str()),
                    None => "/log-level".to_owned(),
                };
                let now = call_direct(admin.url(), "PUT", &path, Some(new.as_str())).await?;
                anyhow::Ok(line(
                    &key,
                    before.trim(),
                    Some(now.trim()),
                    duration.as_ref(),
                ))
            }
            .await;
            admin.close().await;
            answer
        }
        .await
        .with_context(|| format!("log-level of {key}"));
        match result {
            Ok(text) => std::io::stdout().write_all(format!("{text}\n").as_bytes())?,
            Err(e) => {
                failed += 1;
                let _ = writeln!(std::io::stderr(), "error: {e:#}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} pod(s) could not be reached");
    }
    Ok(())
}

/// What the command prints for pod `key`: the filter in force, or the change.
fn line(
    key: &str,
    before: &str,
    now: Option<&str>,
    temporary: Option<&weft_api::Duration>,
) -> String {
    match (now, temporary) {
        (None, _) => format!("{key}: {before}"),
        (Some(now), None) => format!(
            "{key}: {before} -> {now} (until the proxy restarts; the weft.dev/proxy-log-level annotation sets the filter it starts with)"
        ),
        (Some(now), Some(_)) => format!("{key}: {before} -> {now}"),
    }
}
