//! Admission latency of the injection webhook under a steady stream of pod creations,
//! against the test bed's real API server (which calls the webhook over TLS).
//!
//! `cargo bench -p weft-operator --bench admission` (env `RATE`, `SECONDS` to change the
//! load; defaults 50 pods/s for 20 s). Open loop: creations are started on schedule
//! whether or not earlier ones have finished, so slow answers cannot hide by slowing the
//! load. Prints what the API server measured for the webhook call (its own histogram),
//! what the webhook measured, and the end-to-end pod-creation latency.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    missing_docs
)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::PostParams};
use serde_json::json;
use support::*;
use weft_e2e::shared;
use weft_operator::webhook::FailurePolicy;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Sums a histogram's bucket counts from Prometheus text, for series whose labels contain
/// all of `filters`: (le, cumulative count) pairs.
fn buckets(metrics: &str, family: &str, filters: &[&str]) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(&format!("{family}_bucket{{")) else {
            continue;
        };
        if !filters.iter().all(|f| rest.contains(f)) {
            continue;
        }
        let Some(le) = rest.split("le=\"").nth(1).and_then(|s| s.split('"').next()) else {
            continue;
        };
        let le: f64 = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap()
        };
        let count: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        match out.iter_mut().find(|(l, _)| *l == le) {
            Some(slot) => slot.1 += count,
            None => out.push((le, count)),
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

fn diff(after: &[(f64, f64)], before: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|(le, c)| {
            (
                *le,
                c - before
                    .iter()
                    .find(|(l, _)| l == le)
                    .map(|b| b.1)
                    .unwrap_or(0.0),
            )
        })
        .collect()
}

fn report(name: &str, b: &[(f64, f64)]) {
    let total = b.last().map(|x| x.1).unwrap_or(0.0);
    print!("{name}: {total} calls;");
    for (le, c) in b.iter().filter(|(le, _)| le.is_finite() && *le <= 0.1) {
        print!(
            " <= {:.1} ms: {:.2} %;",
            le * 1000.0,
            100.0 * c / total.max(1.0)
        );
    }
    println!();
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let rate = env_u64("RATE", 50);
    let seconds = env_u64("SECONDS", 20);
    let client = shared::client().await.unwrap();
    let ns = scoped_namespace(&client, "bench-admission", None).await;
    let hook = start_webhook(&client, &ns, FailurePolicy::Fail).await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let metrics_text = || async {
        let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
        client.request_text(req).await.unwrap()
    };
    let family = "apiserver_admission_webhook_admission_duration_seconds";
    let filter = "name=\"pod-annotation.inject.weft.dev\"";
    let before = buckets(&metrics_text().await, family, &[filter]);

    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let pods = pods.clone();
        tasks.push(tokio::spawn(async move {
            let began = Instant::now();
            let created = pods
                .create(
                    &PostParams::default(),
                    &pod(&format!("bench-{i}"), json!({"weft.dev/inject": "enabled"})),
                )
                .await;
            (
                began.elapsed(),
                created.map(|p| has_proxy(&p)).unwrap_or(false),
            )
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut injected = 0;
    for t in tasks {
        let (d, ok) = t.await.unwrap();
        latencies.push(d);
        injected += usize::from(ok);
    }
    let elapsed = start.elapsed();
    latencies.sort();
    let after = buckets(&metrics_text().await, family, &[filter]);

    println!(
        "admission benchmark: {total} pod creations at {rate}/s over {elapsed:.1?}; {injected} injected"
    );
    report(
        "API server's measure of the webhook call",
        &diff(&after, &before),
    );
    let ours = {
        let mut registry = prometheus_client::registry::Registry::default();
        hook.metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        buckets(&text, "weft_webhook_admission_duration_seconds", &[])
    };
    report("webhook's own measure (parse to answer)", &ours);
    println!(
        "pod creation end to end (API server, webhook, etcd): p50 {:.2?} p99 {:.2?} max {:.2?}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
    hook.stop().await;
}
