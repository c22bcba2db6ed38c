//! Fault injection: a rule may delay a share of its requests and answer a share with an
//! error of its choosing, to test how clients cope. The decision is drawn per request,
//! before the request is sent anywhere; delay and abort are drawn independently, so a
//! request may be delayed and then aborted.
//!
//! ```text
//! Fault ──decide(rng)──▶ FaultDecision { delay: Some(100ms)?, abort: Some(503 / 14)? }
//! ```

use std::time::Duration;

use http::StatusCode;
use rand::Rng;
use weft_api::traffic as wire;

/// Validated fault injection of one rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    delay: Option<(Duration, Percent)>,
    abort: Option<(Abort, Percent)>,
}

/// What to do to one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultDecision {
    /// Wait this long before going on.
    pub delay: Option<Duration>,
    /// Answer with this error instead of sending the request.
    pub abort: Option<Abort>,
}

/// An injected error answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Abort {
    /// The HTTP status, for HTTP requests.
    pub status: StatusCode,
    /// The gRPC status code (0 to 16), for gRPC requests.
    pub grpc_status: u8,
}

/// A share of requests, 0 to 100 %.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Percent(u32);

impl Percent {
    fn from_wire(value: u32, field: &str, problems: &mut Vec<String>) -> Percent {
        if value > 100 {
            problems.push(format!(
                "{field}: {value} is not a percentage from 0 to 100"
            ));
        }
        Percent(value.min(100))
    }

    /// Whether this request is in the share; draws nothing at 0 and 100.
    fn hit<R: Rng + ?Sized>(self, rng: &mut R) -> bool {
        match self.0 {
            0 => false,
            100.. => true,
            p => rng.random_range(0..100) < p,
        }
    }
}

impl Fault {
    /// Validates a wire fault; `field` is its path in the config, such as
    /// `route.rules[2].fault`, and starts every problem reported.
    pub fn from_wire(w: &wire::FaultConfig, field: &str) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let delay = w.delay.as_ref().map(|d| {
            let pct = Percent::from_wire(
                d.percentage,
                &format!("{field}.delay.percentage"),
                &mut problems,
            );
            (d.fixed_delay.as_std(), pct)
        });
        let abort = w.abort.as_ref().and_then(|a| {
            let at = format!("{field}.abort");
            let pct = Percent::from_wire(a.percentage, &format!("{at}.percentage"), &mut problems);
            let status = match StatusCode::from_u16(a.http_status) {
                Ok(s) if (200..=599).contains(&a.http_status) => Some(s),
                _ => {
                    problems.push(format!(
                        "{at}.httpStatus: {} is not a status from 200 to 599",
                        a.http_status
                    ));
                    None
                }
            };
            let grpc_status = match a.grpc_status {
                Some(g) if g > 16 => {
                    problems.push(format!(
                        "{at}.grpcStatus: {g} is not a gRPC code from 0 to 16"
                    ));
                    None
                }
                Some(g) => Some(g),
                None => status.map(grpc_status_for),
            };
            Some((
                Abort {
                    status: status?,
                    grpc_status: grpc_status?,
                },
                pct,
            ))
        });
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Fault { delay, abort })
    }

    /// Draws what happens to one request.
    pub fn decide<R: Rng + ?Sized>(&self, rng: &mut R) -> FaultDecision {
        FaultDecision {
            delay: self.delay.and_then(|(d, pct)| pct.hit(rng).then_some(d)),
            abort: self.abort.and_then(|(a, pct)| pct.hit(rng).then_some(a)),
        }
    }
}

/// The gRPC status a gRPC client reports for an HTTP status without `grpc-status`
/// (gRPC's doc/http-grpc-status-mapping.md).
pub fn grpc_status_for(status: StatusCode) -> u8 {
    match status.as_u16() {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    fn fault(json: serde_json::Value) -> Result<Fault, Vec<String>> {
        let w: wire::FaultConfig = serde_json::from_value(json).unwrap();
        Fault::from_wire(&w, "route.rules[3].fault")
    }

    fn shares(f: &Fault) -> (f64, f64) {
        let mut rng = StdRng::seed_from_u64(3);
        let (mut delayed, mut aborted) = (0u32, 0u32);
        for _ in 0..10_000 {
            let d = f.decide(&mut rng);
            delayed += u32::from(d.delay.is_some());
            aborted += u32::from(d.abort.is_some());
        }
        (f64::from(delayed) / 100.0, f64::from(aborted) / 100.0)
    }

    #[test]
    fn percentages_hold() {
        for (delay_pct, abort_pct) in [(0, 100), (100, 0), (10, 50), (1, 99), (33, 67)] {
            let f = fault(serde_json::json!({
                "delay": {"fixedDelay": "100ms", "percentage": delay_pct},
                "abort": {"httpStatus": 503, "percentage": abort_pct},
            }))
            .unwrap();
            let (delayed, aborted) = shares(&f);
            for (got, want) in [(delayed, delay_pct), (aborted, abort_pct)] {
                let want = f64::from(want);
                if want == 0.0 || want == 100.0 {
                    assert_eq!(got, want, "0 is never, 100 always");
                } else {
                    assert!((got - want).abs() <= 2.0, "got {got}%, want {want}%");
                }
            }
        }
    }

    #[test]
    fn decisions_carry_the_configured_delay_and_status() {
        let f = fault(serde_json::json!({
            "delay": {"fixedDelay": "1s500ms", "percentage": 100},
            "abort": {"httpStatus": 418, "grpcStatus": 8, "percentage": 100},
        }))
        .unwrap();
        let d = f.decide(&mut rand::rng());
        assert_eq!(d.delay, Some(Duration::from_millis(1500)));
        assert_eq!(
            d.abort,
            Some(Abort {
                status: StatusCode::IM_A_TEAPOT,
                grpc_status: 8
            })
        );
        let none = fault(serde_json::json!({})).unwrap();
        assert_eq!(none.decide(&mut rand::rng()), FaultDecision::default());
    }

    #[test]
    fn grpc_status_derives_from_http_status() {
        for (http, grpc) in [
            (400, 13),
            (401, 16),
            (403, 7),
            (404, 12),
            (429, 14),
            (502, 14),
            (503, 14),
            (504, 14),
            (500, 2),
            (200, 2),
        ] {
            let f = fault(serde_json::json!({"abort": {"httpStatus": http, "percentage": 100}}))
                .unwrap();
            let abort = f.decide(&mut rand::rng()).abort.unwrap();
            assert_eq!((abort.status.as_u16(), abort.grpc_status), (http, grpc));
        }
    }

    #[test]
    fn out_of_range_values_are_refused_naming_the_field() {
        let found = fault(serde_json::json!({
            "delay": {"fixedDelay": "1s", "percentage": 101},
            "abort": {"httpStatus": 600, "grpcStatus": 17, "percentage": 200},
        }))
        .unwrap_err();
        let at = "route.rules[3].fault";
        let fields: Vec<&str> = found
            .iter()
            .map(|p| p.split(": ").next().unwrap())
            .collect();
        assert_eq!(
            fields,
            [
                format!("{at}.delay.percentage"),
                format!("{at}.abort.percentage"),
                format!("{at}.abort.httpStatus"),
                format!("{at}.abort.grpcStatus"),
            ]
        );
        assert!(fault(serde_json::json!({"abort": {"httpStatus": 199, "percentage": 1}})).is_err());
    }
}
