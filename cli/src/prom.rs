//! A small reader of the Prometheus and OpenMetrics text formats, as the proxies' `/metrics`
//! writes them, and the arithmetic `kubectl weft stat` does on two scrapes: counter deltas
//! and histogram quantiles interpolated linearly within buckets, as Prometheus's
//! `histogram_quantile` does.
//!
//! ```text
//! /metrics text ──parse──▶ [Sample] ──(scrape 1 − scrape 0)──▶ deltas ──▶ quantile(q, buckets)
//! ```

use std::collections::BTreeMap;

/// One line of the exposition: a series and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The metric name, with its suffix (`_total`, `_bucket`, …).
    pub name: String,
    /// The labels, by name.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, or `""` when absent.
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// A line that is neither a comment nor a sample.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("metrics line {line}: {reason}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Parses the text format: `# ...` lines and blank lines are skipped, every other line is
/// `name{label="value",...} value [timestamp]`.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |reason| ParseError {
            line: i + 1,
            reason,
        };
        let name_end = line
            .find(|c: char| c == '{' || c.is_ascii_whitespace())
            .ok_or(err("no value"))?;
        let name = &line[..name_end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(err("bad metric name"));
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(after) = rest.strip_prefix('{') {
            rest = parse_labels(after, &mut labels).ok_or(err("bad labels"))?;
        }
        let value = rest
            .split_ascii_whitespace()
            .next()
            .ok_or(err("no value"))?;
        let value = parse_value(value).ok_or(err("bad value"))?;
        out.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(out)
}

/// Reads `a="x",b="y"}` into `labels`; returns what follows the `}`.
fn parse_labels<'a>(mut s: &'a str, labels: &mut BTreeMap<String, String>) -> Option<&'a str> {
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Some(rest);
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim();
        if key.is_empty() {
            return None;
        }
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        s = s[end + 1..].trim_start();
        if let Some(rest) = s.strip_prefix(',') {
            s = rest;
        }
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// The increase of a counter between two scrapes; a counter that went down was reset
/// (the proxy restarted), and everything it counts since is new.
pub fn increase(before: f64, after: f64) -> f64 {
    if after >= before {
        after - before
    } else {
        after
    }
}

/// The `q`-quantile (0 ≤ q ≤ 1) of a histogram given as `(upper bound, cumulative count)`
/// buckets, the last one `+Inf`, interpolating linearly within the bucket the rank falls
/// in, exactly as Prometheus's `histogram_quantile`. `None` when there are no
/// observations.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let mut b: Vec<(f64, f64)> = buckets.to_vec();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    let &(last_le, total) = b.last()?;
    if last_le != f64::INFINITY || b.len() < 2 || total <= 0.0 || !q.is_finite() {
        return None;
    }
    let q = q.clamp(0.0, 1.0);
    // Cumulative counts from different series may disagree slightly; make them monotone.
    let mut highest = 0.0f64;
    for bucket in &mut b {
        highest = highest.max(bucket.1);
        bucket.1 = highest;
    }
    let rank = q * total;
    let i = b.iter().position(|&(_, c)| c >= rank)?;
    if i == b.len() - 1 {
        // In the +Inf bucket: the highest finite bound is the best answer there is.
        return Some(b[b.len() - 2].0);
    }
    if i == 0 && b[0].0 <= 0.0 {
        return Some(b[0].0);
    }
    let (start, below) = if i == 0 { (0.0, 0.0) } else { b[i - 1] };
    let (end, count) = b[i];
    let in_bucket = count - below;
    if in_bucket <= 0.0 {
        return Some(end);
    }
    Some(start + (end - start) * ((rank - below) / in_bucket))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_proxy_writes() {
        let text = r#"# HELP weft_requests HTTP requests received
# TYPE weft_requests counter
weft_requests_total{direction="outbound",service="web.shop.80"} 40
weft_request_duration_seconds_bucket{direction="outbound",service="web.shop.80",le="0.0005"} 3
weft_request_duration_seconds_bucket{le="+Inf",direction="outbound",service="web.shop.80"} 40
weft_config_info{version="a \"b\" \\c\nd"} 1
weft_config_last_update_timestamp_seconds 1.7e9 1700000000
# EOF
"#;
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(s[0].name, "weft_requests_total");
        assert_eq!(s[0].label("service"), "web.shop.80");
        assert_eq!(s[0].value, 40.0);
        assert_eq!(s[2].label("le"), "+Inf");
        assert_eq!(s[3].label("version"), "a \"b\" \\c\nd");
        assert_eq!(s[4].value, 1.7e9);
        assert_eq!(parse_value("+Inf"), Some(f64::INFINITY));
    }

    #[test]
    fn refuses_lines_that_are_not_samples() {
        for bad in [
            "x{a=\"1\" 3",
            "x{a=1} 3",
            "x{a=\"1\"}",
            "x abc",
            "{a=\"1\"} 3",
            "x-y 1",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quantiles_interpolate_within_buckets_as_prometheus_does() {
        // 10 observations ≤ 1, 10 more ≤ 2, none above.
        let b = [(1.0, 10.0), (2.0, 20.0), (4.0, 20.0), (f64::INFINITY, 20.0)];
        assert_eq!(quantile(0.5, &b), Some(1.0));
        assert_eq!(quantile(0.25, &b), Some(0.5));
        assert_eq!(quantile(0.75, &b), Some(1.5));
        assert_eq!(quantile(0.95, &b), Some(1.9));
        assert_eq!(quantile(1.0, &b), Some(2.0));
        // Observations above the highest bound: the highest bound.
        let b = [(1.0, 1.0), (f64::INFINITY, 10.0)];
        assert_eq!(quantile(0.99, &b), Some(1.0));
        assert_eq!(quantile(0.5, &[(1.0, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(quantile(0.5, &[(1.0, 3.0)]), None, "no +Inf bucket");
    }

    #[test]
    fn a_counter_that_went_down_was_reset() {
        assert_eq!(increase(10.0, 15.0), 5.0);
        assert_eq!(increase(10.0, 4.0), 4.0);
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_text(text in "\\PC{0,200}") {
            let _ = parse(&text);
        }

        #[test]
        fn quantiles_stay_within_the_bounds(counts in proptest::collection::vec(0u32..50, 1..8), q in 0.0f64..=1.0) {
            let mut cum = 0.0;
            let mut b: Vec<(f64, f64)> = counts.iter().enumerate().map(|(i, c)| {
                cum += f64::from(*c);
                (f64::from(1u32 << i), cum)
            }).collect();
            b.push((f64::INFINITY, cum));
            if let Some(v) = quantile(q, &b) {
                proptest::prop_assert!((0.0..=f64::from(1u32 << (counts.len() - 1))).contains(&v), "{v}");
            }
        }
    }
}
