//! Which failed attempts a rule retries, and how many times.
//!
//! `retryOn` names, as Envoy reads them (an attempt either fails before a response, as a
//! [`Failure`], or ends with a response the policy inspects):
//!
//! | retryOn              | failures retried                          | responses retried           |
//! |----------------------|-------------------------------------------|-----------------------------|
//! | `connect-failure`    | ConnectFailed                             |                             |
//! | `refused-stream`     | RefusedStream                             |                             |
//! | `reset`              | Reset, RefusedStream                      |                             |
//! | `5xx`                | ConnectFailed, RefusedStream, Reset, PerTryTimeout | 500–599            |
//! | `gateway-error`      | ConnectFailed, RefusedStream, Reset, PerTryTimeout | 502, 503, 504      |
//! | `unavailable`        |                                           | `grpc-status: 14` in headers |
//! | `resource-exhausted` |                                           | `grpc-status: 8` in headers |
//!
//! `5xx` and `gateway-error` cover failures before a response because the proxy would
//! answer those itself with a 502, 503 or 504 (a per-try timeout is a 504 the proxy
//! made); a refused stream is a kind of reset. gRPC statuses are read from the response
//! headers only: a trailers-only response is the one gRPC failure a proxy can retry
//! before it has streamed any of the body to the client.

use http::{HeaderMap, HeaderName, StatusCode};
use weft_api::traffic::{self as wire, RetryOn};

use super::{Backoff, BudgetSpec};

/// The most retries a rule may ask for.
pub const MAX_ATTEMPTS: u32 = 10;

/// The gRPC response header carrying the call's status code (a parsed name: a `&str`
/// key is parsed again on every lookup).
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// gRPC `UNAVAILABLE`.
const GRPC_UNAVAILABLE: u32 = 14;
/// gRPC `RESOURCE_EXHAUSTED`.
const GRPC_RESOURCE_EXHAUSTED: u32 = 8;

/// How an attempt ended when it ended without a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Failure {
    /// No connection to the endpoint could be made; the request was not sent.
    ConnectFailed,
    /// The HTTP/2 stream was refused (`REFUSED_STREAM`): the endpoint did not process it.
    RefusedStream,
    /// The connection or stream reset before a response started.
    Reset,
    /// The attempt's own deadline passed before a response started.
    PerTryTimeout,
}

/// A validated retry policy of one rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    attempts: u32,
    /// The `retryOn` names as a set of bits, one per [`RetryOn`]; duplicates collapse.
    retry_on: u8,
    backoff: Backoff,
    /// The rule's own budget; `None` uses the service's.
    budget: Option<BudgetSpec>,
}

impl RetryPolicy {
    /// Validates a rule's retries: `attempts` 0 to 10, `retryOn` not empty (repeated names
    /// count once), the backoff and the rule's own budget. `field` names the retries
    /// themselves, such as `route.rules[1].retries`.
    pub fn from_wire(w: &wire::RetryConfig, field: &str) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        if w.attempts > MAX_ATTEMPTS {
            problems.push(format!(
                "{field}.attempts: {} exceeds {MAX_ATTEMPTS}",
                w.attempts
            ));
        }
        if w.retry_on.is_empty() {
            problems.push(format!("{field}.retryOn must name at least one failure"));
        }
        let retry_on = w.retry_on.iter().fold(0, |set, &on| set | bit(on));
        let backoff = Backoff::from_wire(w.backoff.as_ref(), &format!("{field}.backoff"))
            .map_err(|p| problems.extend(p))
            .ok();
        let budget = w
            .budget
            .as_ref()
            .map(|b| BudgetSpec::from_wire(Some(b), &format!("{field}.budget")))
            .transpose()
            .map_err(|p| problems.extend(p))
            .ok();
        match (backoff, budget) {
            (Some(backoff), Some(budget)) if problems.is_empty() => Ok(RetryPolicy {
                attempts: w.attempts,
                retry_on,
                backoff,
                budget,
            }),
            _ => Err(problems),
        }
    }

    /// Retries after the first attempt, 0 to 10.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The wait before each retry.
    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// The rule's own budget, if it has one; otherwise its service's budget applies.
    pub fn budget(&self) -> Option<&BudgetSpec> {
        self.budget.as_ref()
    }

    /// Whether `retryOn` names `on`.
    pub fn retries_on(&self, on: RetryOn) -> bool {
        self.retry_on & bit(on) != 0
    }

    /// Whether an attempt that ended with `f` is retried (see the module's table).
    pub fn retry_on_failure(&self, f: Failure) -> bool {
        let any = |names: &[RetryOn]| names.iter().any(|&on| self.retries_on(on));
        let gateway = any(&[RetryOn::ServerError, RetryOn::GatewayError]);
        match f {
            Failure::ConnectFailed => gateway || self.retries_on(RetryOn::ConnectFailure),
            Failure::RefusedStream => gateway || any(&[RetryOn::RefusedStream, RetryOn::Reset]),
            Failure::Reset => gateway || self.retries_on(RetryOn::Reset),
            Failure::PerTryTimeout => gateway,
        }
    }

    /// Whether an attempt answered with this status and these response headers (not
    /// trailers) is retried (see the module's table).
    pub fn retry_on_response(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        let code = status.as_u16();
        if self.retries_on(RetryOn::ServerError) && (500..=599).contains(&code) {
            return true;
        }
        if self.retries_on(RetryOn::GatewayError) && matches!(code, 502..=504) {
            return true;
        }
        // Most policies name no gRPC status: spare them the header lookup.
        if self.retry_on & (bit(RetryOn::Unavailable) | bit(RetryOn::ResourceExhausted)) == 0 {
            return false;
        }
        match grpc_status(headers) {
            Some(GRPC_UNAVAILABLE) => self.retries_on(RetryOn::Unavailable),
            Some(GRPC_RESOURCE_EXHAUSTED) => self.retries_on(RetryOn::ResourceExhausted),
            _ => false,
        }
    }
}

fn bit(on: RetryOn) -> u8 {
    1 << match on {
        RetryOn::ServerError => 0,
        RetryOn::GatewayError => 1,
        RetryOn::ConnectFailure => 2,
        RetryOn::RefusedStream => 3,
        RetryOn::Reset => 4,
        RetryOn::Unavailable => 5,
        RetryOn::ResourceExhausted => 6,
    }
}

/// The `grpc-status` of a trailers-only response; `None` when absent or not a number.
fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn wire(attempts: u32, retry_on: &[RetryOn]) -> wire::RetryConfig {
        wire::RetryConfig {
            attempts,
            retry_on: retry_on.to_vec(),
            backoff: None,
            budget: None,
        }
    }

    fn policy(retry_on: &[RetryOn]) -> RetryPolicy {
        RetryPolicy::from_wire(&wire(2, retry_on), "r").unwrap()
    }

    fn grpc(status: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        h.insert(GRPC_STATUS, HeaderValue::from_str(status).unwrap());
        h
    }

    const FAILURES: [Failure; 4] = [
        Failure::ConnectFailed,
        Failure::RefusedStream,
        Failure::Reset,
        Failure::PerTryTimeout,
    ];

    fn retried_failures(p: &RetryPolicy) -> Vec<Failure> {
        FAILURES
            .into_iter()
            .filter(|&f| p.retry_on_failure(f))
            .collect()
    }

    #[test]
    fn a_valid_policy_keeps_attempts_backoff_and_budget() {
        let mut w = wire(3, &[RetryOn::ServerError, RetryOn::ServerError]);
        w.budget = Some(wire::RetryBudgetConfig {
            percent: 5,
            ..Default::default()
        });
        let p = RetryPolicy::from_wire(&w, "r").unwrap();
        assert_eq!(p.attempts(), 3);
        assert_eq!(p.backoff(), &Backoff::default());
        assert_eq!(p.budget().map(BudgetSpec::percent), Some(5));
        assert!(p.retries_on(RetryOn::ServerError));
        assert!(!p.retries_on(RetryOn::GatewayError));
        assert_eq!(policy(&[RetryOn::Reset]).budget(), None);
        assert!(RetryPolicy::from_wire(&wire(0, &[RetryOn::Reset]), "r").is_ok());
    }

    #[test]
    fn every_problem_is_reported_under_the_field_path() {
        let mut w = wire(11, &[]);
        w.backoff = Some(wire::BackoffConfig {
            base: "2s".parse().unwrap(),
            max: "1s".parse().unwrap(),
        });
        w.budget = Some(wire::RetryBudgetConfig {
            percent: 101,
            ..Default::default()
        });
        assert_eq!(
            RetryPolicy::from_wire(&w, "route.rules[1].retries").unwrap_err(),
            [
                "route.rules[1].retries.attempts: 11 exceeds 10",
                "route.rules[1].retries.retryOn must name at least one failure",
                "route.rules[1].retries.backoff: base 2s exceeds max 1s",
                "route.rules[1].retries.budget.percent: 101 exceeds 100",
            ]
        );
    }

    #[test]
    fn each_failure_is_retried_by_its_own_name() {
        use Failure::*;
        assert_eq!(
            retried_failures(&policy(&[RetryOn::ConnectFailure])),
            [ConnectFailed]
        );
        assert_eq!(
            retried_failures(&policy(&[RetryOn::RefusedStream])),
            [RefusedStream]
        );
        assert_eq!(
            retried_failures(&policy(&[RetryOn::Reset])),
            [RefusedStream, Reset]
        );
        assert_eq!(
            retried_failures(&policy(&[RetryOn::Unavailable, RetryOn::ResourceExhausted])),
            []
        );
    }

    #[test]
    fn server_and_gateway_errors_retry_every_failure_as_envoy_does() {
        for on in [RetryOn::ServerError, RetryOn::GatewayError] {
            assert_eq!(retried_failures(&policy(&[on])), FAILURES, "{on:?}");
        }
    }

    #[test]
    fn server_error_retries_any_5xx_and_gateway_error_only_502_to_504() {
        let empty = HeaderMap::new();
        let retried = |p: &RetryPolicy| -> Vec<u16> {
            (100..=599)
                .filter(|&c| p.retry_on_response(StatusCode::from_u16(c).unwrap(), &empty))
                .collect()
        };
        assert_eq!(
            retried(&policy(&[RetryOn::ServerError])),
            (500..=599).collect::<Vec<_>>()
        );
        assert_eq!(retried(&policy(&[RetryOn::GatewayError])), [502, 503, 504]);
        assert_eq!(retried(&policy(&[RetryOn::Reset])), Vec::<u16>::new());
    }

    #[test]
    fn grpc_statuses_are_read_from_trailers_only_response_headers() {
        let unavailable = policy(&[RetryOn::Unavailable]);
        let exhausted = policy(&[RetryOn::ResourceExhausted]);
        let ok = StatusCode::OK;
        assert!(unavailable.retry_on_response(ok, &grpc("14")));
        assert!(!unavailable.retry_on_response(ok, &grpc("8")));
        assert!(exhausted.retry_on_response(ok, &grpc("8")));
        assert!(!exhausted.retry_on_response(ok, &grpc("14")));
        // No status in the headers: the call's status comes in trailers, too late.
        assert!(!unavailable.retry_on_response(ok, &HeaderMap::new()));
        assert!(!unavailable.retry_on_response(ok, &grpc("0")));
        assert!(!unavailable.retry_on_response(ok, &grpc("fourteen")));
        assert!(!policy(&[RetryOn::ServerError]).retry_on_response(ok, &grpc("14")));
    }
}
