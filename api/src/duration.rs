//! Durations in the Gateway API format (`250ms`, `10s`, `1h30m`).
//!
//! The same grammar is enforced three times, and must stay in step: by [`DURATION_PATTERN`]
//! in the CRD schema (so the API server rejects bad input), by CEL's `duration()` in
//! cross-field rules, and by [`Duration::from_str`] wherever Weft reads one.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The regular expression a duration string must match: one to four `<number><unit>`
/// parts, units `h`, `m`, `s`, `ms`, numbers of at most five digits (Gateway API GEP-2257).
pub const DURATION_PATTERN: &str = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$";

/// The longest duration string [`DURATION_PATTERN`] admits, used as the schema's
/// `maxLength` so that CEL cost estimates stay bounded.
pub const DURATION_MAX_LEN: u32 = 28;

/// A non-negative span of time written in the Gateway API duration format.
///
/// Keeps the text it was parsed from so that round trips through YAML are byte-for-byte.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Duration {
    value: std::time::Duration,
    text: String,
}

/// Why a string is not a valid duration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    /// The string was empty.
    #[error("duration is empty; use a number and a unit, such as 250ms, 10s or 1h")]
    Empty,
    /// A number was missing, or had more than five digits.
    #[error("duration {0:?}: each part needs a number of 1 to 5 digits, such as 250ms or 1h30m")]
    BadNumber(String),
    /// A unit other than `h`, `m`, `s` or `ms`.
    #[error("duration {0:?}: units are h, m, s and ms, such as 250ms or 1h30m")]
    BadUnit(String),
    /// More than four `<number><unit>` parts.
    #[error("duration {0:?}: at most four parts, such as 1h2m3s4ms")]
    TooManyParts(String),
}

impl Duration {
    /// The span as a standard library duration.
    pub fn as_std(&self) -> std::time::Duration {
        self.value
    }

    /// The text this duration was written as.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl From<std::time::Duration> for Duration {
    /// Formats a standard duration in the Gateway API format (`1h2m3s4ms`), truncated to
    /// whole milliseconds and capped at 99999 hours.
    fn from(value: std::time::Duration) -> Self {
        let ms = u64::try_from(value.as_millis()).unwrap_or(u64::MAX);
        let ms = ms.min(99_999 * 3_600_000);
        let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
        let (m, rest) = (rest / 60_000, rest % 60_000);
        let (s, ms_part) = (rest / 1000, rest % 1000);
        let mut text = String::new();
        for (n, unit) in [(h, "h"), (m, "m"), (s, "s"), (ms_part, "ms")] {
            if n > 0 {
                text.push_str(&format!("{n}{unit}"));
            }
        }
        if text.is_empty() {
            text.push_str("0s");
        }
        Duration {
            value: std::time::Duration::from_millis(ms),
            text,
        }
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(DurationError::Empty);
        }
        let bytes = s.as_bytes();
        let mut i = 0;
        let mut parts = 0;
        let mut total = std::time::Duration::ZERO;
        while i < bytes.len() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            let digits = &s[start..i];
            if digits.is_empty() || digits.len() > 5 {
                return Err(DurationError::BadNumber(s.to_owned()));
            }
            // At most five digits, so this always fits.
            let n: u64 = digits
                .parse()
                .map_err(|_| DurationError::BadNumber(s.to_owned()))?;
            let unit_start = i;
            while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
                i += 1;
            }
            let part = match &s[unit_start..i] {
                "h" => std::time::Duration::from_secs(n * 3600),
                "m" => std::time::Duration::from_secs(n * 60),
                "s" => std::time::Duration::from_secs(n),
                "ms" => std::time::Duration::from_millis(n),
                _ => return Err(DurationError::BadUnit(s.to_owned())),
            };
            parts += 1;
            if parts > 4 {
                return Err(DurationError::TooManyParts(s.to_owned()));
            }
            total += part;
        }
        Ok(Duration {
            value: total,
            text: s.to_owned(),
        })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "schema")]
impl schemars::JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": DURATION_MAX_LEN,
            "description": "A duration in the Gateway API format: 1 to 4 parts of a number (up to 5 digits) and a unit h, m, s or ms, such as 250ms, 10s or 1h30m."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<std::time::Duration, DurationError> {
        s.parse::<Duration>().map(|d| d.as_std())
    }

    #[test]
    fn accepts_gateway_api_examples() {
        assert_eq!(parse("250ms"), Ok(std::time::Duration::from_millis(250)));
        assert_eq!(parse("10s"), Ok(std::time::Duration::from_secs(10)));
        assert_eq!(parse("1h"), Ok(std::time::Duration::from_secs(3600)));
        assert_eq!(
            parse("1h30m5s20ms"),
            Ok(std::time::Duration::from_millis(5_405_020))
        );
        assert_eq!(parse("0s"), Ok(std::time::Duration::ZERO));
    }

    #[test]
    fn rejects_what_the_schema_rejects() {
        assert_eq!(parse(""), Err(DurationError::Empty));
        assert!(matches!(parse("10"), Err(DurationError::BadUnit(_))));
        assert!(matches!(
            parse("10 parsecs"),
            Err(DurationError::BadUnit(_))
        ));
        assert!(matches!(parse("1.5s"), Err(DurationError::BadUnit(_))));
        assert!(matches!(parse("s"), Err(DurationError::BadNumber(_))));
        assert!(matches!(parse("123456s"), Err(DurationError::BadNumber(_))));
        assert!(matches!(parse("-1s"), Err(DurationError::BadNumber(_))));
        assert!(matches!(
            parse("1h1m1s1ms1ms"),
            Err(DurationError::TooManyParts(_))
        ));
    }

    #[test]
    fn round_trips_text_through_serde() {
        let d: Duration = serde_json::from_str("\"1h30m\"").unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"1h30m\"");
        assert!(serde_json::from_str::<Duration>("\"10 parsecs\"").is_err());
    }

    #[test]
    fn formats_std_durations() {
        assert_eq!(
            Duration::from(std::time::Duration::from_secs(3)).as_str(),
            "3s"
        );
        assert_eq!(
            Duration::from(std::time::Duration::from_millis(3_723_004)).as_str(),
            "1h2m3s4ms"
        );
    }
    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Strings the schema's [`DURATION_PATTERN`] admits, written out as its parts.
        fn valid_text() -> impl Strategy<Value = (String, std::time::Duration)> {
            let part = (0u64..=99_999, 0usize..4, 1usize..=5).prop_map(|(n, unit, width)| {
                let digits = format!("{n:0width$}");
                let (unit, ms) = [("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)][unit];
                (format!("{digits}{unit}"), n * ms)
            });
            proptest::collection::vec(part, 1..=4).prop_map(|parts| {
                let text: String = parts.iter().map(|(t, _)| t.as_str()).collect();
                let ms = parts.iter().map(|(_, ms)| ms).sum();
                (text, std::time::Duration::from_millis(ms))
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_text_parses_or_is_rejected_without_panicking(s in "\\PC{0,40}|[0-9hms]{0,40}") {
                if let Ok(d) = s.parse::<Duration>() {
                    // Anything accepted is within the schema's limits.
                    prop_assert!(d.as_str().len() <= DURATION_MAX_LEN as usize);
                    prop_assert!(d.as_std() <= std::time::Duration::from_secs(4 * 99_999 * 3600));
                }
            }

            #[test]
            fn every_string_the_schema_admits_parses_to_its_value((text, value) in valid_text()) {
                let d: Duration = text.parse().map_err(|e| TestCaseError::fail(format!("{e}")))?;
                prop_assert_eq!(d.as_std(), value);
                prop_assert!(text.len() <= DURATION_MAX_LEN as usize);
            }

            #[test]
            fn display_then_parse_round_trips((text, _) in valid_text()) {
                let d: Duration = text.parse().map_err(|e| TestCaseError::fail(format!("{e}")))?;
                let again: Duration = d.to_string().parse().map_err(|e| TestCaseError::fail(format!("{e}")))?;
                prop_assert_eq!(&again, &d);
                prop_assert_eq!(again.to_string(), d.to_string());
            }

            #[test]
            fn a_std_duration_formats_to_text_that_parses_back(ms in 0u64..=2 * 99_999 * 3_600_000) {
                let d = Duration::from(std::time::Duration::from_millis(ms));
                let back: Duration = d.to_string().parse().map_err(|e| TestCaseError::fail(format!("{e}")))?;
                prop_assert_eq!(back.as_std(), std::time::Duration::from_millis(ms.min(99_999 * 3_600_000)));
                prop_assert_eq!(back, d);
            }
        }
    }
}
