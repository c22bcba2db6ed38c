//! `kubectl weft proxy-status`: each meshed pod, the config version its proxy runs, whether
//! that is the version the operator wants it to run, how many of the Weft resources in it
//! the proxy reports it enforces, and when the operator last heard from it.
//!
//! ```text
//! API server: pods labelled weft.dev/meshed ─┐
//! operator /proxies (through the API server's ├─▶ join by pod ─▶ table
//!   service proxy, or --operator-url)  ───────┘
//! ```

use std::{
    collections::BTreeMap,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, ResourceExt, api::ListParams};
use weft_api::proxy_status::ProxyRow;
use weft_inject::keys::MESHED_LABEL;

use crate::admin::OperatorAdmin;

/// Flags of `kubectl weft proxy-status`.
#[derive(Debug, clap::Args)]
pub struct ProxyStatusArgs {
    /// Only pods in this namespace (default: every namespace).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// The operator's namespace.
    #[arg(long, default_value = "weft-system")]
    pub operator_namespace: String,
    /// The operator's Service and admin port name, reached through the API server's
    /// service proxy.
    #[arg(long, default_value = crate::admin::DEFAULT_OPERATOR_SERVICE)]
    pub operator_service: String,
    /// Read the operator's admin endpoint directly (`http://host:port`) instead.
    #[arg(long)]
    pub operator_url: Option<String>,
}

/// Runs the command, printing the table to stdout.
pub async fn run(args: ProxyStatusArgs) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("build a Kubernetes client (KUBECONFIG)")?;
    let rows = fetch_from(
        &args.operator_namespace,
        &args.operator_service,
        args.operator_url.as_deref(),
    )
    .await?;
    let pods = meshed_pods(&client, args.namespace.as_deref()).await?;
    let table = render(
        &pods,
        &in_namespace(rows, args.namespace.as_deref()),
        now_secs(),
    );
    std::io::Write::write_all(&mut std::io::stdout(), table.as_bytes())?;
    Ok(())
}

/// `namespace/name` of every meshed pod.
pub async fn meshed_pods(client: &Client, namespace: Option<&str>) -> anyhow::Result<Vec<String>> {
    let api: Api<Pod> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let list = api
        .list(&ListParams::default().labels(MESHED_LABEL))
        .await
        .context("list meshed pods")?;
    Ok(list
        .items
        .iter()
        .map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()))
        .collect())
}

/// The operator's rows of proxies in `namespace` (all with `None`): `/proxies` lists
/// every namespace's, and `-n` must limit them as it limits the meshed pods.
pub fn in_namespace(rows: Vec<ProxyRow>, namespace: Option<&str>) -> Vec<ProxyRow> {
    match namespace {
        None => rows,
        Some(ns) => rows
            .into_iter()
            .filter(|r| r.pod.split_once('/').is_some_and(|(n, _)| n == ns))
            .collect(),
    }
}

/// The operator's `/proxies` at `url` when given, else through Service `service`
/// (`NAME` or `NAME:PORT`) in `namespace`: the flags every command shares.
pub async fn fetch_from(
    namespace: &str,
    service: &str,
    url: Option<&str>,
) -> anyhow::Result<Vec<ProxyRow>> {
    fetch(&OperatorAdmin::new(namespace, service, url).await?).await
}

/// The operator's `/proxies`: what it knows of each connected proxy.
pub async fn fetch(admin: &OperatorAdmin) -> anyhow::Result<Vec<ProxyRow>> {
    let text = admin.get("/proxies").await?;
    serde_json::from_str(&text).context("the operator's /proxies answer")
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn ago(now: u64, then: u64) -> String {
    let s = now.saturating_sub(then);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

/// "n of m": of the resources in the version the proxy runs, how many it reports it
/// enforces; "? of m" when it does not report it, so nothing is claimed.
fn enforced(r: &ProxyRow) -> String {
    match &r.not_enforced {
        None => format!("? of {}", r.resources),
        Some(not) => format!(
            "{} of {}",
            r.resources.saturating_sub(not.len()),
            r.resources
        ),
    }
}

/// The table: one line per meshed pod (and per proxy the operator knows that is not in
/// `pods`), sorted by pod.
pub fn render(pods: &[String], rows: &[ProxyRow], now: u64) -> String {
    let by_pod: BTreeMap<&str, &ProxyRow> = rows.iter().map(|r| (r.pod.as_str(), r)).collect();
    let mut names: Vec<&str> = pods.iter().map(String::as_str).collect();
    names.extend(rows.iter().map(|r| r.pod.as_str()));
    names.sort_unstable();
    names.dedup();
    let mut lines = vec![[
        "NAMESPACE".to_owned(),
        "POD".to_owned(),
        "VERSION".to_owned(),
        "DESIRED".to_owned(),
        "STATUS".to_owned(),
        "ENFORCED".to_owned(),
        "LAST SEEN".to_owned(),
    ]];
    for pod in names {
        let (ns, name) = pod.split_once('/').unwrap_or(("", pod));
        let line = match by_pod.get(pod) {
            None => [
                ns.to_owned(),
                name.to_owned(),
                "-".into(),
                "-".into(),
                "NOT CONNECTED".into(),
                "-".into(),
                "never".into(),
            ],
            Some(r) => {
                let status = if !r.connected {
                    "DISCONNECTED".to_owned()
                } else if let Some(reason) = &r.rejected {
                    format!("REJECTED ({reason})")
                } else if r.in_sync {
                    "SYNCED".to_owned()
                } else {
                    "STALE".to_owned()
                };
                let v = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
                [
                    ns.to_owned(),
                    name.to_owned(),
                    v(r.acked_version),
                    v(r.desired_version),
                    status,
                    enforced(r),
                    format!("{} ago", ago(now, r.last_seen)),
                ]
            }
        };
        lines.push(line);
    }
    crate::table::render(&lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(pod: &str, acked: u64, desired: u64, rejected: Option<&str>) -> ProxyRow {
        ProxyRow {
            pod: pod.into(),
            connected: true,
            desired_version: Some(desired),
            acked_version: Some(acked),
            in_sync: acked == desired && rejected.is_none(),
            rejected: rejected.map(str::to_owned),
            last_seen: 990,
            resources: 3,
            not_enforced: Some(vec!["Breaker shop/db".to_owned()]),
            proxy: Some("weft-proxy 0.1.0".to_owned()),
        }
    }

    /// `-n shop` lists shop's proxies only, though the operator reports every namespace's
    /// (a connected proxy whose pod is not listed still gets a line, so the rows must be
    /// limited too, not only the pods).
    #[test]
    fn a_namespace_limits_the_operators_rows_too() {
        let rows = vec![
            row("shop/a", 4, 4, None),
            row("other/b", 4, 4, None),
            row("shopping/c", 4, 4, None),
        ];
        let pods = vec!["shop/a".to_owned()];
        let out = render(&pods, &in_namespace(rows.clone(), Some("shop")), 1000);
        assert!(out.contains("shop ") && out.contains(" a "), "{out}");
        assert!(!out.contains("other") && !out.contains("shopping"), "{out}");
        assert_eq!(in_namespace(rows, None).len(), 3);
    }

    #[test]
    fn every_meshed_pod_gets_a_line_saying_whether_it_is_in_sync() {
        let pods = vec![
            "shop/a".to_owned(),
            "shop/b".to_owned(),
            "shop/c".to_owned(),
        ];
        let mut old_proxy = row("shop/b", 5, 7, Some("version 7: too big"));
        old_proxy.not_enforced = None;
        let rows = vec![row("shop/a", 7, 7, None), old_proxy];
        let out = render(&pods, &rows, 1000);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE"));
        assert!(
            lines[1].contains("SYNCED") && lines[1].contains("10s ago"),
            "{out}"
        );
        assert!(lines[1].contains("2 of 3"), "{out}");
        assert!(lines[2].contains("REJECTED (version 7: too big)"), "{out}");
        assert!(
            lines[2].contains("? of 3"),
            "a proxy that does not say claims nothing: {out}"
        );
        assert!(lines[3].contains("NOT CONNECTED"), "{out}");
    }
}
