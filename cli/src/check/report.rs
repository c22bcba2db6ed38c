//! The findings of `kubectl weft check` and how they are printed: a line per check for
//! people, a stable JSON document (`--output json`, schema in docs/operating.md) for tools.

use std::fmt::Write as _;

use serde::Serialize;

/// Version of the JSON document's schema; raised only when a field changes meaning or
/// goes away (new fields may appear without it).
pub const SCHEMA_VERSION: u32 = 1;

/// How one check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Works as it should.
    Ok,
    /// Works, but something needs attention soon.
    Warn,
    /// Broken: `check` exits 1.
    Fail,
}

/// One named check, its outcome, and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable name (`webhook-serving`), the key scripts match on.
    pub name: &'static str,
    /// The outcome.
    pub status: Status,
    /// What was found, in one or a few lines.
    pub message: String,
    /// What to do (for `warn` and `fail`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Finding {
    /// A check that passed.
    pub fn ok(name: &'static str, message: impl Into<String>) -> Self {
        Finding {
            name,
            status: Status::Ok,
            message: message.into(),
            hint: None,
        }
    }

    /// A check that warns, with what to do.
    pub fn warn(name: &'static str, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Finding {
            name,
            status: Status::Warn,
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    /// A check that failed, with what to do.
    pub fn fail(name: &'static str, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Finding {
            name,
            status: Status::Fail,
            message: message.into(),
            hint: Some(hint.into()),
        }
    }
}

/// Every check that ran, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The findings, one per check.
    pub checks: Vec<Finding>,
}

#[derive(Serialize)]
struct Counts {
    ok: usize,
    warn: usize,
    fail: usize,
}

#[derive(Serialize)]
struct Document<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    /// `pre` (before install) or `post`.
    phase: &'a str,
    checks: &'a [Finding],
    summary: Counts,
}

impl Report {
    /// Adds a finding.
    pub fn push(&mut self, finding: Finding) {
        self.checks.push(finding);
    }

    fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|f| f.status == status).count()
    }

    /// Checks that failed.
    pub fn failures(&self) -> usize {
        self.count(Status::Fail)
    }

    /// Checks that warned.
    pub fn warnings(&self) -> usize {
        self.count(Status::Warn)
    }

    /// The finding of the check `name`, if it ran.
    pub fn get(&self, name: &str) -> Option<&Finding> {
        self.checks.iter().find(|f| f.name == name)
    }

    /// One block per check (`ok`/`WARN`/`FAIL`, name, message; the hint below), then a
    /// summary line.
    pub fn to_text(&self) -> String {
        let width = self.checks.iter().map(|f| f.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for f in &self.checks {
            let tag = match f.status {
                Status::Ok => "ok  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            let mut lines = f.message.lines();
            let _ = writeln!(
                out,
                "{tag}  {:<width$}  {}",
                f.name,
                lines.next().unwrap_or_default()
            );
            for more in lines {
                let _ = writeln!(out, "      {:<width$}  {more}", "");
            }
            if let Some(hint) = &f.hint {
                let _ = writeln!(out, "      {:<width$}  hint: {hint}", "");
            }
        }
        let _ = writeln!(
            out,
            "{} checks: {} ok, {} warning(s), {} failed",
            self.checks.len(),
            self.count(Status::Ok),
            self.warnings(),
            self.failures()
        );
        out
    }

    /// The JSON document (`phase` is `pre` or `post`).
    pub fn to_json(&self, phase: &str) -> String {
        let doc = Document {
            schema_version: SCHEMA_VERSION,
            phase,
            checks: &self.checks,
            summary: Counts {
                ok: self.count(Status::Ok),
                warn: self.warnings(),
                fail: self.failures(),
            },
        };
        serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_names_each_check_with_its_hint_and_json_keeps_the_schema() {
        let mut r = Report::default();
        r.push(Finding::ok("crds", "3 CRDs at v1alpha1"));
        r.push(Finding::fail(
            "trust-root",
            "expires in 30 days\nroot CN=x",
            "rotate it",
        ));
        let text = r.to_text();
        assert_eq!(
            text,
            "ok    crds        3 CRDs at v1alpha1\n\
             FAIL  trust-root  expires in 30 days\n\
             \x20                 root CN=x\n\
             \x20                 hint: rotate it\n\
             2 checks: 1 ok, 0 warning(s), 1 failed\n"
        );
        let json: serde_json::Value = serde_json::from_str(&r.to_json("post")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "schemaVersion": 1, "phase": "post",
                "checks": [
                    {"name": "crds", "status": "ok", "message": "3 CRDs at v1alpha1"},
                    {"name": "trust-root", "status": "fail", "message": "expires in 30 days\nroot CN=x", "hint": "rotate it"}
                ],
                "summary": {"ok": 1, "warn": 0, "fail": 1}
            })
        );
        assert_eq!(r.failures(), 1);
    }
}
