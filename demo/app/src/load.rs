//! `load`: GETs at a steady rate to one target, and a JSON report line per interval.
//!
//! Open loop: a request starts on every tick whatever the earlier ones are doing, up to a
//! cap on requests in flight; a tick that finds the cap reached is counted as `skipped`, so
//! a slow target shows as errors instead of as a lower rate. The generator never retries:
//! what it reports is what the mesh gave it.

use std::{
    collections::BTreeMap,
    io::Write,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::{
    net::TcpStream,
    sync::{Semaphore, mpsc},
};

use crate::duration;

/// What `load` sends, where, and for how long.
#[derive(clap::Args)]
pub struct Args {
    /// Where to send: `http://HOST[:PORT][/PATH]`.
    #[arg(long, value_parser = parse_target)]
    target: Target,
    /// Requests per second (1–10000).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    rps: u32,
    /// How often to print a report line.
    #[arg(long, default_value = "5s", value_parser = duration::parse)]
    report_every: Duration,
    /// Stop after this many requests.
    #[arg(long)]
    count: Option<u64>,
    /// Stop after this long.
    #[arg(long, value_parser = duration::parse)]
    duration: Option<Duration>,
    /// How long a request may take before it counts as a timeout.
    #[arg(long, default_value = "2s", value_parser = duration::parse)]
    timeout: Duration,
    /// Most requests in flight at once (1–1000).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1000))]
    concurrency: u32,
}

/// A validated target.
#[derive(Clone, Debug)]
struct Target {
    host: String,
    port: u16,
    authority: String,
    path: String,
}

fn parse_target(text: &str) -> Result<Target, String> {
    let uri: Uri = text.parse().map_err(|e| format!("{text:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{text:?}: only http:// targets (the mesh adds TLS)"
        ));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("{text:?}: no host"))?;
    Ok(Target {
        host: authority.host().to_owned(),
        port: authority.port_u16().unwrap_or(80),
        authority: authority.as_str().to_owned(),
        path: uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".to_owned()),
    })
}

/// What became of one request.
#[derive(Debug)]
enum Outcome {
    Answered {
        status: u16,
        server: Option<String>,
        pod: Option<String>,
        weft_error: Option<String>,
        latency: Duration,
    },
    Failed(&'static str),
}

/// Counters over a window or since the start.
#[derive(Default, Serialize)]
struct Counters {
    sent: u64,
    ok: u64,
    status: BTreeMap<String, u64>,
    errors: BTreeMap<&'static str, u64>,
    servers: BTreeMap<String, u64>,
    pods: BTreeMap<String, u64>,
    weft_errors: BTreeMap<String, u64>,
}

impl Counters {
    fn record(&mut self, outcome: &Outcome) {
        self.sent += 1;
        match outcome {
            Outcome::Answered {
                status,
                server,
                pod,
                weft_error,
                ..
            } => {
                if (200..300).contains(status) {
                    self.ok += 1;
                }
                *self.status.entry(status.to_string()).or_default() += 1;
                for (map, key) in [
                    (&mut self.servers, server),
                    (&mut self.pods, pod),
                    (&mut self.weft_errors, weft_error),
                ] {
                    if let Some(key) = key {
                        *map.entry(key.clone()).or_default() += 1;
                    }
                }
            }
            Outcome::Failed(kind) => *self.errors.entry(kind).or_default() += 1,
        }
    }
}

/// One line of output.
#[derive(Serialize)]
struct Report<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    window_s: f64,
    #[serde(flatten)]
    window: &'a Counters,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    total: &'a Counters,
}

/// Sends until told to stop; true when every request got a 2xx.
pub async fn run(args: Args) -> anyhow::Result<bool> {
    let pool = Arc::new(Pool::new(args.target.clone()));
    let permits = Arc::new(Semaphore::new(args.concurrency as usize));
    let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rps)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut report = tokio::time::interval_at(
        tokio::time::Instant::now() + args.report_every,
        args.report_every,
    );
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tracing::info!(target = %args.target.authority, path = %args.target.path, rps = args.rps, "sending");

    let mut stats = Stats::new();
    let mut issued = 0u64;
    loop {
        if args.count.is_some_and(|c| issued >= c) {
            break;
        }
        tokio::select! {
            _ = tick.tick() => {
                issued += 1;
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let (pool, tx, timeout) = (pool.clone(), tx.clone(), args.timeout);
                        tokio::spawn(async move {
                            let outcome = match tokio::time::timeout(timeout, pool.get()).await {
                                Ok(o) => o,
                                Err(_) => Outcome::Failed("timeout"),
                            };
                            let _ = tx.send(outcome);
                            drop(permit);
                        });
                    }
                    Err(_) => stats.record(Outcome::Failed("skipped")),
                }
            }
            Some(o) = rx.recv() => stats.record(o),
            _ = report.tick() => {
                stats.report("report")?;
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping");
                break;
            }
            _ = async { if let Some(d) = deadline { tokio::time::sleep_until(d).await } else { std::future::pending().await } } => break,
        }
    }
    drop(tx);
    // Requests in flight finish within their timeout; a little more lets their outcome in.
    let drain = tokio::time::sleep(args.timeout + Duration::from_millis(500));
    tokio::pin!(drain);
    loop {
        tokio::select! {
            o = rx.recv() => match o {
                Some(o) => stats.record(o),
                None => break,
            },
            _ = &mut drain => break,
        }
    }
    stats.report("final")?;
    Ok(stats.total.sent > 0 && stats.total.ok == stats.total.sent)
}

/// The current window's counters and latencies, and the totals.
struct Stats {
    window: Counters,
    latencies: Vec<f64>,
    window_start: Instant,
    total: Counters,
}

impl Stats {
    fn new() -> Self {
        Stats {
            window: Counters::default(),
            latencies: Vec::new(),
            window_start: Instant::now(),
            total: Counters::default(),
        }
    }

    fn record(&mut self, o: Outcome) {
        if let Outcome::Answered { latency, .. } = &o {
            self.latencies.push(latency.as_secs_f64() * 1e3);
        }
        self.window.record(&o);
        self.total.record(&o);
    }

    /// Prints the window as one line and starts the next.
    fn report(&mut self, kind: &'static str) -> anyhow::Result<()> {
        print_report(
            kind,
            self.window_start.elapsed(),
            &self.window,
            &mut self.latencies,
            &self.total,
        )?;
        self.window = Counters::default();
        self.window_start = Instant::now();
        Ok(())
    }
}

fn print_report(
    kind: &'static str,
    elapsed: Duration,
    window: &Counters,
    latencies: &mut Vec<f64>,
    total: &Counters,
) -> anyhow::Result<()> {
    latencies.sort_by(f64::total_cmp);
    let line = serde_json::to_string(&Report {
        kind,
        window_s: (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        window,
        p50_ms: quantile(latencies, 0.5),
        p99_ms: quantile(latencies, 0.99),
        total,
    })?;
    latencies.clear();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// The `q` quantile of sorted values (nearest rank), rounded to microseconds.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some((sorted[rank - 1] * 1000.0).round() / 1000.0)
}

/// HTTP/1.1 connections to the target, kept open between requests.
struct Pool {
    target: Target,
    idle: Mutex<Vec<SendRequest<Empty<Bytes>>>>,
}

impl Pool {
    fn new(target: Target) -> Self {
        Pool {
            target,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Sends one GET on an idle connection or a new one.
    async fn get(&self) -> Outcome {
        let started = Instant::now();
        let Ok(mut sender) = self.sender().await else {
            return Outcome::Failed("connect");
        };
        let req = Request::get(self.target.path.as_str())
            .header(header::HOST, self.target.authority.as_str())
            .header(header::USER_AGENT, "weft-demo-app")
            .body(Empty::new());
        let Ok(req) = req else {
            return Outcome::Failed("other");
        };
        let response = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "request failed");
                return Outcome::Failed("other");
            }
        };
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (server, pod, weft_error) = (
            header("x-demo-server"),
            header("x-demo-pod"),
            header("weft-error"),
        );
        let status = response.status().as_u16();
        if response.into_body().collect().await.is_err() {
            return Outcome::Failed("other");
        }
        self.put_idle(sender);
        Outcome::Answered {
            status,
            server,
            pod,
            weft_error,
            latency: started.elapsed(),
        }
    }

    /// An open connection from the pool, ready for a request, or a new one.
    async fn sender(&self) -> Result<SendRequest<Empty<Bytes>>, ()> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match idle {
                Some(mut s) => {
                    if s.ready().await.is_ok() {
                        return Ok(s);
                    }
                }
                None => return self.connect().await,
            }
        }
    }

    fn put_idle(&self, sender: SendRequest<Empty<Bytes>>) {
        if !sender.is_closed() {
            self.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(sender);
        }
    }

    async fn connect(&self) -> Result<SendRequest<Empty<Bytes>>, ()> {
        let addr = (self.target.host.as_str(), self.target.port);
        let stream = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(host = %self.target.host, error = %e, "connect failed");
                return Err(());
            }
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(|e| {
            tracing::debug!(error = %e, "handshake failed");
        })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_validated() {
        let t = parse_target("http://web").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("web", 80, "/"));
        let t = parse_target("http://web-v1.demo:8080/a?b=1").unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.authority.as_str(),
                t.path.as_str()
            ),
            ("web-v1.demo", 8080, "web-v1.demo:8080", "/a?b=1")
        );
        for bad in ["web", "https://web", "http://", "ftp://web/"] {
            assert!(parse_target(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
