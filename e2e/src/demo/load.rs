//! The demo client's report lines (`weft-demo-app load`, one JSON object per window on
//! its stdout) and the sums the demo judges them by. Plain code over strings, so it is
//! tested without a cluster.

use std::collections::BTreeMap;

use serde::Deserialize;

/// One line of `weft-demo-app load`: a window's counts (`"type":"report"`) or the run's
/// total at its end (`"type":"final"`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct LoadReport {
    /// `report` or `final`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Requests sent in the window.
    pub sent: u64,
    /// Of those, answered with a 2xx.
    pub ok: u64,
    /// Answers by HTTP status.
    pub status: BTreeMap<String, u64>,
    /// Requests that got no answer, by cause (`connect`, `timeout`, `other`).
    pub errors: BTreeMap<String, u64>,
    /// Answers by the `x-demo-server` header (the version that served them).
    pub servers: BTreeMap<String, u64>,
    /// Answers by the `x-demo-pod` header (the pod that served them).
    pub pods: BTreeMap<String, u64>,
    /// Answers carrying a `weft-error` header, by its value (the proxy answered itself).
    pub weft_errors: BTreeMap<String, u64>,
    /// Median latency in the window, in milliseconds (none when nothing was answered).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency in the window, in milliseconds.
    pub p99_ms: Option<f64>,
}

impl LoadReport {
    /// The report lines in a container's log, in order; other lines (the app's own logs on
    /// stderr, which `kubectl logs` mixes in) are skipped.
    pub fn parse_log(log: &str) -> Vec<LoadReport> {
        log.lines()
            .filter(|l| l.trim_start().starts_with('{'))
            .filter_map(|l| serde_json::from_str::<LoadReport>(l.trim()).ok())
            .filter(|r| r.kind == "report" || r.kind == "final")
            .collect()
    }

    /// The whole run's counts from the stdout of a `weft-demo-app load` that ended (every
    /// window added up: each request is counted in exactly one); `None` when the run
    /// printed no final line, that is, did not finish.
    pub fn run_total(stdout: &str) -> Option<LoadReport> {
        let reports = LoadReport::parse_log(stdout);
        reports
            .iter()
            .any(|r| r.kind == "final")
            .then(|| LoadReport::sum(&reports))
    }

    /// The counts of several windows added up.
    pub fn sum<'a>(reports: impl IntoIterator<Item = &'a LoadReport>) -> LoadReport {
        let mut total = LoadReport {
            kind: "sum".to_owned(),
            ..Default::default()
        };
        let add = |into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>| {
            for (k, v) in from {
                *into.entry(k.clone()).or_default() += v;
            }
        };
        for r in reports {
            total.sent += r.sent;
            total.ok += r.ok;
            add(&mut total.status, &r.status);
            add(&mut total.errors, &r.errors);
            add(&mut total.servers, &r.servers);
            add(&mut total.pods, &r.pods);
            add(&mut total.weft_errors, &r.weft_errors);
            // Percentiles do not add up: the sum keeps the worst window's.
            total.p50_ms = max_of(total.p50_ms, r.p50_ms);
            total.p99_ms = max_of(total.p99_ms, r.p99_ms);
        }
        total
    }

    /// The share of requests sent that got a 2xx (1.0 when none were sent).
    pub fn success_rate(&self) -> f64 {
        if self.sent == 0 {
            1.0
        } else {
            self.ok as f64 / self.sent as f64
        }
    }

    /// Answers with this HTTP status.
    pub fn status_count(&self, status: u16) -> u64 {
        self.status.get(&status.to_string()).copied().unwrap_or(0)
    }

    /// Requests that got no answer at all (refused connections, timeouts, skipped).
    pub fn unanswered(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Answers carrying `weft-error: <code>` (the proxy answered itself).
    pub fn weft_error_count(&self, code: &str) -> u64 {
        self.weft_errors.get(code).copied().unwrap_or(0)
    }

    /// Answers served by this version (`web-v1`).
    pub fn served_by(&self, server: &str) -> u64 {
        self.servers.get(server).copied().unwrap_or(0)
    }
}

fn max_of(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// A traffic split as the client observed it, against what the Route asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    /// Answers from web-v1.
    pub v1: u64,
    /// Answers from web-v2.
    pub v2: u64,
    /// The share of web-v2 the Route asks for (0.1 for 90/10).
    pub expected_v2: f64,
    /// How far the observed share may be from the expected one and still count as right.
    pub tolerance: f64,
}

impl Split {
    /// The split in `reports` between `web-v1` and `web-v2`.
    pub fn observe(reports: &LoadReport, expected_v2: f64, tolerance: f64) -> Split {
        Split {
            v1: reports.served_by("web-v1"),
            v2: reports.served_by("web-v2"),
            expected_v2,
            tolerance,
        }
    }

    /// web-v2's observed share of the answers from either version.
    pub fn observed_v2(&self) -> f64 {
        let n = self.v1 + self.v2;
        if n == 0 {
            0.0
        } else {
            self.v2 as f64 / n as f64
        }
    }

    /// Whether the observed share is within the tolerance (and anything was observed).
    pub fn within_tolerance(&self) -> bool {
        self.v1 + self.v2 > 0 && (self.observed_v2() - self.expected_v2).abs() <= self.tolerance
    }

    /// `web-v1 89.7 % (538) / web-v2 10.3 % (62)`.
    pub fn describe(&self) -> String {
        let v2 = self.observed_v2() * 100.0;
        format!(
            "web-v1 {:.1} % ({}) / web-v2 {:.1} % ({})",
            100.0 - v2,
            self.v1,
            v2,
            self.v2
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = r#"2026-11-30T17:00:00Z INFO load: starting target=http://web
{"type":"report","window_s":5.0,"sent":100,"ok":97,"status":{"200":97,"500":3},"errors":{"connect":0,"timeout":0,"other":0},"servers":{"web-v1":90,"web-v2":10},"pods":{"web-v1-a":90,"web-v2-b":7,"web-v2-c":3},"p50_ms":1.2,"p99_ms":4.5,"total":{"sent":100}}
not json at all
{"type":"report","sent":100,"ok":100,"status":{"200":100},"servers":{"web-v1":88,"web-v2":12},"weft_errors":{},"p50_ms":2.0,"p99_ms":3.0}
{"type":"final","sent":20,"ok":0,"status":{"403":20},"weft_errors":{"forbidden":20},"p50_ms":null}
"#;

    #[test]
    fn report_lines_are_read_and_other_lines_skipped() {
        let reports = LoadReport::parse_log(LOG);
        assert_eq!(reports.len(), 3);
        assert_eq!(reports[0].pods.get("web-v2-c"), Some(&3));
        assert_eq!(reports[2].kind, "final");
        assert_eq!(reports[2].weft_errors.get("forbidden"), Some(&20));
    }

    #[test]
    fn windows_add_up_and_the_split_is_judged_against_the_tolerance() {
        let reports = LoadReport::parse_log(LOG);
        let sum = LoadReport::sum(&reports[..2]);
        assert_eq!((sum.sent, sum.ok), (200, 197));
        assert_eq!(sum.status_count(500), 3);
        assert!((sum.success_rate() - 0.985).abs() < 1e-9);
        let split = Split::observe(&sum, 0.1, 0.05);
        assert_eq!((split.v1, split.v2), (178, 22));
        assert!(split.within_tolerance(), "{}", split.describe());
        assert!(!Split::observe(&sum, 0.5, 0.05).within_tolerance());
        assert_eq!(sum.unanswered(), 0);
        // Nothing observed is never "within tolerance".
        assert!(!Split::observe(&LoadReport::default(), 0.0, 0.05).within_tolerance());
    }

    #[test]
    fn a_finished_runs_total_adds_up_every_window_and_an_unfinished_run_has_none() {
        let total = LoadReport::run_total(LOG).unwrap();
        assert_eq!((total.sent, total.ok), (220, 197));
        assert_eq!(total.status_count(403), 20);
        assert_eq!(total.weft_error_count("forbidden"), 20);
        assert_eq!(total.served_by("web-v2"), 22);
        let unfinished: String = LOG.lines().take(3).map(|l| format!("{l}\n")).collect();
        assert_eq!(LoadReport::run_total(&unfinished), None);
        let refused = r#"{"type":"final","sent":3,"ok":0,"errors":{"connect":2,"timeout":1}}"#;
        assert_eq!(LoadReport::run_total(refused).unwrap().unanswered(), 3);
    }
}
