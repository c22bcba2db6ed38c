//! The proxy's log filter (`--log`, `WEFT_LOG`, the `weft.dev/proxy-log-level`
//! annotation, `PUT /log-level`): `tracing_subscriber`'s `EnvFilter` syntax, a
//! comma-separated list of `level` and `target=level` directives (`warn,weft_proxy=debug`),
//! checked more strictly than `EnvFilter` itself.
//!
//! `EnvFilter` reads a bare word that is not a level as a target to log at `trace`, and
//! turns every other target off: a typo such as `degub` would be accepted and silence the
//! proxy. Here each directive must be a level or say its level after `=`, so the typo is an
//! error naming it, at admission, at start and on the admin port alike.

use std::{fmt, str::FromStr};

use tracing_subscriber::EnvFilter;

/// The longest filter accepted: real ones are a few directives.
pub const MAX_LEN: usize = 1_024;

/// The levels a directive may name, most verbose last.
pub const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// A log filter that parsed: every directive a level or `target=level`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogFilter(String);

/// Why a log filter was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogFilterError {
    /// Nothing but spaces and commas.
    #[error("a log filter must name a level, such as info or warn,weft_proxy=debug")]
    Empty,
    /// Longer than [`MAX_LEN`].
    #[error("a log filter must be at most {MAX_LEN} bytes, not {0}")]
    TooLong(usize),
    /// A directive that names no level: a typo of one, or a target without one.
    #[error(
        "{directive:?} names no level (off, error, warn, info, debug, trace); a target needs its level, as in {target}=debug"
    )]
    NoLevel {
        /// The directive as written.
        directive: String,
        /// What it names besides a level.
        target: String,
    },
    /// `EnvFilter` refused it (a bad level after `=`, a malformed span or field).
    #[error("{0}")]
    Syntax(String),
}

impl LogFilter {
    /// Parses `filter` (spaces around directives are dropped).
    pub fn parse(filter: &str) -> Result<LogFilter, LogFilterError> {
        if filter.len() > MAX_LEN {
            return Err(LogFilterError::TooLong(filter.len()));
        }
        let directives: Vec<&str> = filter
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .collect();
        if directives.is_empty() {
            return Err(LogFilterError::Empty);
        }
        let is_level = |s: &str| LEVELS.iter().any(|l| s.eq_ignore_ascii_case(l));
        for d in &directives {
            // A `=` inside a span's fields (`[conn{peer=x}]`) is not the level's.
            let (target, level) = match d.rsplit_once('=') {
                Some((t, l)) if !l.contains(['}', ']']) => (t, l),
                _ => (*d, ""),
            };
            if !is_level(level) && !is_level(d) {
                return Err(LogFilterError::NoLevel {
                    directive: (*d).to_owned(),
                    target: target.to_owned(),
                });
            }
        }
        let filter = directives.join(",");
        EnvFilter::builder()
            .parse(&filter)
            .map_err(|e| LogFilterError::Syntax(e.to_string()))?;
        Ok(LogFilter(filter))
    }

    /// The filter as written, directives joined by `,`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The filter `tracing_subscriber` applies.
    pub fn env_filter(&self) -> EnvFilter {
        // Checked in `parse`: nothing is dropped here.
        EnvFilter::builder().parse_lossy(&self.0)
    }
}

impl Default for LogFilter {
    /// `info`, the proxy's default.
    fn default() -> Self {
        LogFilter("info".to_owned())
    }
}

impl FromStr for LogFilter {
    type Err = LogFilterError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LogFilter::parse(s)
    }
}

impl fmt::Display for LogFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_target_levels_parse_and_keep_their_text() {
        for (given, kept) in [
            ("info", "info"),
            ("WARN", "WARN"),
            ("warn,weft_proxy=debug", "warn,weft_proxy=debug"),
            (" info , hyper=off ,", "info,hyper=off"),
            ("weft_proxy::upstream=trace", "weft_proxy::upstream=trace"),
            ("info,[conn]=debug", "info,[conn]=debug"),
        ] {
            let f = LogFilter::parse(given).unwrap_or_else(|e| panic!("{given:?}: {e}"));
            assert_eq!(f.as_str(), kept);
            assert_eq!(f.to_string(), kept);
        }
        assert_eq!(LogFilter::default().as_str(), "info");
    }

    #[test]
    fn a_word_that_is_not_a_level_is_refused_by_name() {
        for (given, directive, target) in [
            ("degub", "degub", "degub"),
            ("info,weft_proxy", "weft_proxy", "weft_proxy"),
            ("information", "information", "information"),
            ("weft_proxy=", "weft_proxy=", "weft_proxy"),
            ("warn,hyper=lots", "hyper=lots", "hyper"),
            ("[conn{peer=x}]", "[conn{peer=x}]", "[conn{peer=x}]"),
        ] {
            let e = LogFilter::parse(given).unwrap_err();
            let want = LogFilterError::NoLevel {
                directive: directive.to_owned(),
                target: target.to_owned(),
            };
            assert_eq!(e, want, "{given}");
            assert!(e.to_string().contains(&format!("{target}=debug")), "{e}");
        }
    }

    #[test]
    fn empty_long_and_malformed_filters_are_refused() {
        assert_eq!(LogFilter::parse(" , "), Err(LogFilterError::Empty));
        assert_eq!(LogFilter::parse(""), Err(LogFilterError::Empty));
        let long = "a=info,".repeat(200);
        assert_eq!(
            LogFilter::parse(&long),
            Err(LogFilterError::TooLong(long.len()))
        );
        for bad in ["[conn{=debug", "[conn{peer=x}=debug"] {
            assert!(
                matches!(LogFilter::parse(bad), Err(LogFilterError::Syntax(_))),
                "{bad}: {:?}",
                LogFilter::parse(bad)
            );
        }
    }
}
