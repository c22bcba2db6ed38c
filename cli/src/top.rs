//! `kubectl weft top POD|deploy/NAME`: the busiest requests through a meshed pod's (or a
//! Deployment's) proxy over a while, from its admin port's `/tap`: per direction, method,
//! authority, path and peer identity, how many, how many succeeded and how long they took
//! (Linkerd's `viz top`, with nothing to install).
//!
//! ```text
//! flags ─▶ the proxy's own TapRequest::parse ─▶ one tap per pod (tap.rs' Pods)
//!       ─▶ each finished request into its row ─▶ the table at the end of --for
//!          (redrawn every 2s on a terminal; Ctrl-C ends it early, with what it saw)
//! ```
//!
//! Each request is counted once, by the proxy that tapped it: a Deployment's pods are
//! tapped at once and their requests summed per row. A request answered 5xx, or not
//! answered at all (the client went away first), is a failure; gRPC's status is not
//! looked at (a gRPC error answered 200 is a success here, as in `stat`).

use std::{
    collections::BTreeMap,
    io::{IsTerminal, Write},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::bail;
use serde::Serialize;
use serde_json::Value;

use crate::{
    admin::PodTarget,
    tap::{Pods, TapScope},
};

/// Flags of `kubectl weft top`.
#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// Whose requests (a Deployment's pods' summed), which, and how the proxies are reached.
    #[command(flatten)]
    pub scope: TapScope,
    /// How long to count (`10s`, `5m`; at most 30m).
    #[arg(long = "for", default_value = "10s")]
    pub duration: String,
    /// Rows shown, the busiest first.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Output: `text` (a table) or `json`.
    #[arg(short = 'o', long, default_value = "text")]
    pub output: String,
}

/// Runs the command: counts until every pod's tap ends (or Ctrl-C), then prints the table.
pub async fn run(args: TopArgs) -> anyhow::Result<()> {
    let json = match args.output.as_str() {
        "json" => true,
        "text" => false,
        other => bail!("-o {other}: expected text or json"),
    };
    if args.limit == 0 {
        bail!("--limit 0: at least one row");
    }
    // Every matching request for the whole window.
    let path = args
        .scope
        .path_and_query(weft_proxy::tap::MAX_EVENTS, &args.duration)?;
    let target: PodTarget = args.scope.target.parse()?;
    let pods = Pods::find(&target, &args.scope).await?;
    let top = Arc::new(Mutex::new(Top::new(pods.len())));
    let started = Instant::now();
    let counting = {
        let top = top.clone();
        let duration = args.duration.clone();
        pods.tap(
            &path,
            move |pod| {
                let _ = writeln!(std::io::stderr(), "# tapping {pod} for {duration}");
            },
            move |_, pod, line| {
                top.lock().unwrap_or_else(|p| p.into_inner()).add(pod, line);
                Ok(())
            },
        )
    };
    tokio::pin!(counting);
    let live = !json && std::io::stdout().is_terminal();
    let mut redraw = tokio::time::interval(Duration::from_secs(2));
    redraw.tick().await;
    let (result, interrupted) = loop {
        tokio::select! {
            r = &mut counting => break (r, false),
            _ = tokio::signal::ctrl_c() => break (Ok(()), true),
            _ = redraw.tick(), if live => {
                let table = top.lock().unwrap_or_else(|p| p.into_inner())
                    .text(args.limit, started.elapsed(), false);
                let mut out = std::io::stdout().lock();
                // Clear the screen, then the table from its top-left corner.
                let _ = write!(out, "\x1b[2J\x1b[H{table}").and_then(|()| out.flush());
            }
        }
    };
    let top = top.lock().unwrap_or_else(|p| p.into_inner());
    let out = if json {
        serde_json::to_string_pretty(&top.json(args.limit, started.elapsed()))? + "\n"
    } else {
        let clear = if live { "\x1b[2J\x1b[H" } else { "" };
        format!(
            "{clear}{}",
            top.text(args.limit, started.elapsed(), interrupted)
        )
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes())?;
    stdout.flush()?;
    result
}

/// What makes requests one row: the same direction, method, authority, path and peer.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Key {
    /// `inbound` or `outbound`.
    pub direction: String,
    /// The request's method.
    pub method: String,
    /// The request's authority.
    pub authority: String,
    /// The request's path, without its query.
    pub path: String,
    /// The client's identity inbound, the endpoint's outbound; none for plain text.
    pub peer: Option<String>,
}

/// One row's requests so far.
#[derive(Debug, Default)]
struct Seen {
    durations_ms: Vec<f64>,
    failed: u64,
}

/// How one pod's tap ended, from its last line.
#[derive(Debug, Serialize)]
struct Ended {
    shown: u64,
    dropped: u64,
    why: String,
}

/// The requests counted so far, per row, and how each pod's tap ended.
#[derive(Debug, Default)]
pub struct Top {
    pods: usize,
    rows: BTreeMap<Key, Seen>,
    ended: BTreeMap<String, Ended>,
    unreadable: u64,
}

/// One row of the table.
#[derive(Debug, Serialize, PartialEq)]
pub struct Row {
    /// Which requests.
    #[serde(flatten)]
    pub key: Key,
    /// How many.
    pub requests: u64,
    /// The share not failed: answered, and not 5xx.
    pub success_rate: f64,
    /// The median duration, in milliseconds.
    pub p50_ms: f64,
    /// The 99th percentile duration (nearest rank), in milliseconds.
    pub p99_ms: f64,
    /// The longest, in milliseconds.
    pub max_ms: f64,
}

impl Top {
    /// Nothing counted yet, from `pods` pods.
    pub fn new(pods: usize) -> Top {
        Top {
            pods,
            ..Top::default()
        }
    }

    /// Counts one of `pod`'s tap lines: a request into its row, or the tap's end.
    pub fn add(&mut self, pod: &str, line: &str) {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            self.unreadable += 1;
            return;
        };
        if let Some(end) = v.get("tapEnd") {
            let n = |key: &str| end.get(key).and_then(Value::as_u64).unwrap_or_default();
            let why = end.get("why").and_then(Value::as_str).unwrap_or("unknown");
            self.ended.insert(
                pod.to_owned(),
                Ended {
                    shown: n("events"),
                    dropped: n("dropped"),
                    why: why.to_owned(),
                },
            );
            return;
        }
        let s = |key: &str| {
            v.get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let direction = s("direction");
        let peer = if direction == "inbound" {
            s("source_identity")
        } else {
            s("destination_identity")
        };
        let key = Key {
            direction,
            method: s("method"),
            authority: s("authority"),
            path: s("path"),
            peer: (!peer.is_empty()).then_some(peer),
        };
        let status = v.get("status").and_then(Value::as_u64).unwrap_or_default();
        let seen = self.rows.entry(key).or_default();
        seen.durations_ms
            .push(v.get("duration_ms").and_then(Value::as_f64).unwrap_or(0.0));
        if !(100..500).contains(&status) {
            seen.failed += 1;
        }
    }

    /// Every row, the busiest first (ties in key order).
    pub fn rows(&self) -> Vec<Row> {
        let mut rows: Vec<Row> = self
            .rows
            .iter()
            .map(|(key, seen)| {
                let mut d = seen.durations_ms.clone();
                d.sort_by(f64::total_cmp);
                let requests = d.len() as u64;
                Row {
                    key: key.clone(),
                    requests,
                    success_rate: (requests - seen.failed) as f64 / requests as f64,
                    p50_ms: nearest_rank(&d, 0.5),
                    p99_ms: nearest_rank(&d, 0.99),
                    max_ms: d.last().copied().unwrap_or(0.0),
                }
            })
            .collect();
        // A stable sort keeps the map's key order among equals.
        rows.sort_by_key(|r| std::cmp::Reverse(r.requests));
        rows
    }

    fn requests(&self) -> u64 {
        self.rows
            .values()
            .map(|s| s.durations_ms.len() as u64)
            .sum()
    }

    fn dropped(&self) -> u64 {
        self.ended.values().map(|e| e.dropped).sum()
    }

    /// The table, at most `limit` rows, then a line on what it covers.
    pub fn text(&self, limit: usize, took: Duration, interrupted: bool) -> String {
        let rows = self.rows();
        let mut table = vec![
            [
                "DIRECTION",
                "METHOD",
                "AUTHORITY",
                "PATH",
                "PEER",
                "REQUESTS",
                "SUCCESS",
                "P50",
                "P99",
                "MAX",
            ]
            .map(str::to_owned),
        ];
        for r in rows.iter().take(limit) {
            table.push([
                r.key.direction.clone(),
                r.key.method.clone(),
                r.key.authority.clone(),
                r.key.path.clone(),
                r.key.peer.clone().unwrap_or_else(|| "-".to_owned()),
                r.requests.to_string(),
                format!("{:.2}%", r.success_rate * 100.0),
                ms(r.p50_ms),
                ms(r.p99_ms),
                ms(r.max_ms),
            ]);
        }
        let mut out = if rows.is_empty() {
            String::new()
        } else {
            crate::table::render(&table)
        };
        out.push_str(&format!(
            "# {} request(s) in {:.1}s from {} pod(s)",
            self.requests(),
            took.as_secs_f64(),
            self.pods,
        ));
        if interrupted {
            out.push_str(" (interrupted)");
        }
        if rows.len() > limit {
            out.push_str(&format!(
                "; {} more row(s) not shown (--limit {limit})",
                rows.len() - limit
            ));
        }
        let dropped = self.dropped();
        if dropped > 0 {
            out.push_str(&format!(
                "; {dropped} more came faster than they were read and are not counted"
            ));
        }
        let at_max: Vec<&str> = self
            .ended
            .iter()
            .filter(|(_, e)| e.why == "max")
            .map(|(pod, _)| pod.as_str())
            .collect();
        if !at_max.is_empty() {
            out.push_str(&format!(
                "; stopped early at {} requests: {}",
                weft_proxy::tap::MAX_EVENTS,
                at_max.join(", ")
            ));
        }
        if self.unreadable > 0 {
            out.push_str(&format!("; {} unreadable line(s)", self.unreadable));
        }
        out.push('\n');
        out
    }

    /// The same as JSON: the rows (at most `limit`), and each pod's tap's end.
    pub fn json(&self, limit: usize, took: Duration) -> Value {
        let rows = self.rows();
        serde_json::json!({
            "window_seconds": took.as_secs_f64(),
            "requests": self.requests(),
            "rows": rows.iter().take(limit).collect::<Vec<_>>(),
            "rows_not_shown": rows.len().saturating_sub(limit),
            "pods": self.ended,
        })
    }
}

/// The `q` quantile of sorted `d` by nearest rank; 0 for none.
fn nearest_rank(d: &[f64], q: f64) -> f64 {
    if d.is_empty() {
        return 0.0;
    }
    let rank = (q * d.len() as f64).ceil() as usize;
    d[rank.clamp(1, d.len()) - 1]
}

/// A duration in milliseconds as the table shows it.
fn ms(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.2}s", v / 1000.0)
    } else {
        format!("{v:.1}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(direction: &str, path: &str, status: u16, ms: f64, peer: Option<&str>) -> String {
        let mut v = serde_json::json!({
            "timestamp": "2026-12-05T01:02:03.456Z",
            "direction": direction,
            "method": "GET",
            "authority": "web.shop",
            "path": path,
            "status": status,
            "duration_ms": ms,
        });
        if let Some(peer) = peer {
            let field = if direction == "inbound" {
                "source_identity"
            } else {
                "destination_identity"
            };
            v[field] = peer.into();
        }
        v.to_string()
    }

    #[test]
    fn requests_are_counted_per_row_busiest_first_with_failures_and_quantiles() {
        let mut top = Top::new(2);
        let web = Some("spiffe://cluster.local/ns/shop/sa/web");
        for i in 0..100 {
            top.add(
                "shop/c-0",
                &line("outbound", "/api", 200, f64::from(i + 1), web),
            );
        }
        for status in [503, 0, 404] {
            top.add("shop/c-1", &line("outbound", "/fail", status, 2.0, web));
        }
        top.add("shop/c-1", &line("inbound", "/api", 200, 1.0, None));
        top.add("shop/c-1", "not json");
        top.add(
            "shop/c-0",
            r#"{"tapEnd":{"events":100,"dropped":0,"why":"duration"}}"#,
        );
        top.add(
            "shop/c-1",
            r#"{"tapEnd":{"events":4,"dropped":7,"why":"max"}}"#,
        );

        let rows = top.rows();
        assert_eq!(rows.len(), 3);
        let api = &rows[0];
        assert_eq!(
            (api.key.path.as_str(), api.key.peer.as_deref(), api.requests),
            ("/api", web, 100)
        );
        assert_eq!(api.success_rate, 1.0);
        assert_eq!((api.p50_ms, api.p99_ms, api.max_ms), (50.0, 99.0, 100.0));
        // 503 and no answer fail; 404 is the application's answer, not a failure.
        assert_eq!(rows[1].key.path, "/fail");
        assert!((rows[1].success_rate - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(
            (rows[2].key.direction.as_str(), rows[2].key.peer.as_deref()),
            ("inbound", None)
        );

        let text = top.text(2, Duration::from_secs(10), false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[0].starts_with("DIRECTION   METHOD   AUTHORITY"),
            "{text}"
        );
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "outbound",
                "GET",
                "web.shop",
                "/api",
                "spiffe://cluster.local/ns/shop/sa/web",
                "100",
                "100.00%",
                "50.0ms",
                "99.0ms",
                "100.0ms"
            ]
        );
        assert_eq!(lines[2].split_whitespace().nth(6), Some("33.33%"));
        assert_eq!(
            lines[3],
            "# 104 request(s) in 10.0s from 2 pod(s); 1 more row(s) not shown (--limit 2); \
             7 more came faster than they were read and are not counted; \
             stopped early at 100000 requests: shop/c-1; 1 unreadable line(s)"
        );

        let json = top.json(1, Duration::from_secs(10));
        assert_eq!(json["requests"], 104);
        assert_eq!(json["rows_not_shown"], 2);
        assert_eq!(json["rows"][0]["path"], "/api");
        assert_eq!(json["rows"][0]["requests"], 100);
        assert_eq!(json["rows"][0]["p99_ms"], 99.0);
        assert_eq!(json["pods"]["shop/c-1"]["dropped"], 7);
    }

    #[test]
    fn nothing_seen_says_so() {
        let top = Top::new(1);
        assert_eq!(
            top.text(20, Duration::from_millis(2500), true),
            "# 0 request(s) in 2.5s from 1 pod(s) (interrupted)\n"
        );
        assert_eq!(nearest_rank(&[], 0.5), 0.0);
        assert_eq!(nearest_rank(&[3.0], 0.99), 3.0);
        assert_eq!(ms(1234.0), "1.23s");
    }
}
