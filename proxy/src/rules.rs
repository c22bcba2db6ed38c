//! A service's Route, validated once at config load into the stages a request meets:
//! each rule's matches, weighted backends, timeouts, retry policy, fault, mirror, header
//! edits and rewrite. Backends and mirrors are services of the same config, by index.
//!
//! ```text
//! wire::RouteConfig ──Route::from_wire──▶ Route { rules: [Rule { matches, split, ... }] }
//!                                            │ first_match (route::matching)
//!                                            ▼ per request: pipeline.rs
//! ```

use std::{collections::HashMap, sync::Arc, time::Duration};

use weft_api::proxy_config as wire;

use crate::{
    limits::Limits,
    retry::{BudgetSpec, RetryPolicy},
    route::{
        fault::Fault,
        headers::HeaderEdits,
        matching::{MatchInput, RequestMatch, first_match},
        rewrite::Rewrite,
        split::Split,
    },
};

/// The most rules a Route may have (as the CRD allows).
pub const MAX_RULES: usize = 32;

/// A service's compiled Route.
#[derive(Debug)]
pub struct Route {
    /// `namespace/name` of the Route: the `route` metric label.
    pub name: Arc<str>,
    /// The rules, in order.
    pub rules: Vec<Rule>,
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// The rule's name, or its index: the `rule` metric label.
    pub label: Arc<str>,
    /// Empty: every request.
    pub matches: Vec<RequestMatch>,
    /// The weighted backends; empty: the service's own endpoints.
    pub backends: Vec<Target>,
    /// Picks a backend by weight; `None` when `backends` is empty or every weight is 0.
    pub split: Option<Split>,
    /// Deadline of the whole request, retries included.
    pub timeout: Option<Duration>,
    /// Deadline of each attempt.
    pub per_try_timeout: Option<Duration>,
    /// Which failures are retried, how often and how far apart.
    pub retry: Option<RetryPolicy>,
    /// The rule's own retry budget; the service's when `None`.
    pub budget: Option<BudgetSpec>,
    /// Injected delays and aborts.
    pub fault: Option<Fault>,
    /// Copies of a share of requests.
    pub mirror: Option<Mirror>,
    /// Edits to the request's headers.
    pub request_headers: Option<HeaderEdits>,
    /// Edits to the response's headers.
    pub response_headers: Option<HeaderEdits>,
    /// The path rewrite.
    pub rewrite: Option<Rewrite>,
}

/// Where a backend's share of requests goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The service at this index of the config.
    Service(usize),
    /// A backend whose Service does not exist, described for the error log.
    Missing(Arc<str>),
    /// No backend: every one of the rule's backends has weight 0.
    Drained,
}

/// A mirror: the service that receives copies, and the share of requests copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mirror {
    /// The index of the mirror's service in the config.
    pub service: usize,
    /// Share of requests, 0 to 100.
    pub percentage: u32,
}

impl Route {
    /// Validates a wire route; `services` maps the config's service names to indexes.
    pub fn from_wire(
        w: &wire::RouteConfig,
        at: &str,
        services: &HashMap<String, usize>,
    ) -> Result<Route, Vec<String>> {
        let mut problems = Vec::new();
        if w.name.is_empty() || w.name.len() > 253 || w.name.chars().any(char::is_control) {
            problems.push(format!("{at}.name must be 1 to 253 printable characters"));
        }
        if w.rules.len() > MAX_RULES {
            problems.push(format!(
                "{at}.rules: {} rules; at most {MAX_RULES}",
                w.rules.len()
            ));
        }
        let mut rules = Vec::with_capacity(w.rules.len());
        for (i, r) in w.rules.iter().enumerate() {
            match Rule::from_wire(r, i, &format!("{at}.rules[{i}]"), services) {
                Ok(rule) => rules.push(rule),
                Err(p) => problems.extend(p),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Route {
            name: Arc::from(w.name.as_str()),
            rules,
        })
    }

    /// Problems of the rules whose request header edits alone pass this proxy's request
    /// limits: the proxy checks a request again after editing it, so every request such a
    /// rule takes would be refused `431` here. `at` is the Route's path in the config.
    pub fn edits_beyond(&self, limits: &Limits, at: &str) -> Vec<String> {
        let mut problems = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let Some(edits) = &rule.request_headers else {
                continue;
            };
            let field = format!("{at}.rules[{i}].requestHeaders");
            let (mut count, mut bytes) = (0usize, 0usize);
            for (name, value) in edits.written() {
                let line = name.as_str().len() + value.len();
                if line > limits.max_header_line_bytes {
                    problems.push(format!(
                        "{field}: the field {name} is {line} bytes, above the proxy's \
                         limit of {} bytes on one field (--max-header-line-bytes): every \
                         request the rule takes would be refused 431",
                        limits.max_header_line_bytes
                    ));
                }
                count += 1;
                bytes += line;
            }
            if count > limits.max_request_headers_count {
                problems.push(format!(
                    "{field}: set and add write {count} fields, above the proxy's limit of \
                     {} fields on a request (--max-request-headers-count): every request \
                     the rule takes would be refused 431",
                    limits.max_request_headers_count
                ));
            }
            if bytes > limits.max_request_headers_bytes {
                problems.push(format!(
                    "{field}: set and add write {bytes} bytes of fields, above the proxy's \
                     limit of {} bytes on a request's fields (--max-request-headers-bytes): \
                     every request the rule takes would be refused 431",
                    limits.max_request_headers_bytes
                ));
            }
        }
        problems
    }

    /// The rule that takes a request with its index, and the index of the match entry
    /// that matched it (`None` for a rule without matches); `None` when no rule does.
    pub fn find(&self, input: &MatchInput<'_>) -> Option<(usize, &Rule, Option<usize>)> {
        let (i, m) = first_match(self.rules.iter().map(|r| r.matches.as_slice()), input)?;
        self.rules.get(i).map(|r| (i, r, m))
    }
}

/// Collects one stage's problems, keeping the stage when it validated.
fn stage<T>(problems: &mut Vec<String>, result: Result<T, Vec<String>>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(p) => {
            problems.extend(p);
            None
        }
    }
}

fn duration(
    problems: &mut Vec<String>,
    field: String,
    d: Option<&weft_api::Duration>,
) -> Option<Duration> {
    let d = d?.as_std();
    if d.is_zero() {
        problems.push(format!("{field} must be greater than zero"));
        return None;
    }
    Some(d)
}

impl Rule {
    fn from_wire(
        w: &wire::RuleConfig,
        index: usize,
        at: &str,
        services: &HashMap<String, usize>,
    ) -> Result<Rule, Vec<String>> {
        let mut problems = Vec::new();
        let label: Arc<str> = match &w.name {
            Some(n)
                if !n.is_empty() && n.len() <= 63 && n.chars().all(|c| c.is_ascii_graphic()) =>
            {
                Arc::from(n.as_str())
            }
            Some(_) => {
                problems.push(format!(
                    "{at}.name must be 1 to 63 visible ASCII characters"
                ));
                Arc::from("")
            }
            None => Arc::from(index.to_string()),
        };
        let mut matches = Vec::with_capacity(w.matches.len());
        for (j, m) in w.matches.iter().enumerate() {
            if let Some(m) = stage(
                &mut problems,
                RequestMatch::from_wire(m, &format!("{at}.matches[{j}]")),
            ) {
                matches.push(m);
            }
        }
        let mut backends = Vec::with_capacity(w.backends.len());
        let mut weights = Vec::with_capacity(w.backends.len());
        for (j, b) in w.backends.iter().enumerate() {
            let bat = format!("{at}.backends[{j}]");
            if b.weight > wire::MAX_ENDPOINT_WEIGHT {
                problems.push(format!(
                    "{bat}.weight {} is above {}",
                    b.weight,
                    wire::MAX_ENDPOINT_WEIGHT
                ));
            }
            weights.push(b.weight);
            backends.push(match &b.service {
                Some(name) => match services.get(name) {
                    Some(i) => Target::Service(*i),
                    None => {
                        problems.push(format!(
                            "{bat}.service {name:?} names no service in this config"
                        ));
                        Target::Missing(Arc::from(name.as_str()))
                    }
                },
                None => Target::Missing(Arc::from(
                    b.display
                        .as_deref()
                        .unwrap_or("a backend that does not resolve"),
                )),
            });
        }
        // Every weight 0 is no config error (a Route can drain all its backends): the
        // rule's requests are answered 500, as Gateway API answers a rule without a backend.
        let split = Split::new(&weights);
        let timeout = duration(&mut problems, format!("{at}.timeout"), w.timeout.as_ref());
        let per_try_timeout = duration(
            &mut problems,
            format!("{at}.perTryTimeout"),
            w.per_try_timeout.as_ref(),
        );
        if let (Some(t), Some(p)) = (timeout, per_try_timeout)
            && p > t
        {
            problems.push(format!("{at}.perTryTimeout must not exceed timeout"));
        }
        let retry = w.retries.as_ref().and_then(|r| {
            stage(
                &mut problems,
                RetryPolicy::from_wire(r, &format!("{at}.retries")),
            )
        });
        let budget = retry.as_ref().and_then(|r| r.budget().cloned());
        let fault = w
            .fault
            .as_ref()
            .and_then(|f| stage(&mut problems, Fault::from_wire(f, &format!("{at}.fault"))));
        let mirror = match &w.mirror {
            None => None,
            Some(m) => {
                if m.percentage > 100 {
                    problems.push(format!("{at}.mirror.percentage must be 0 to 100"));
                }
                match &m.service {
                    None => None,
                    Some(name) => match services.get(name) {
                        Some(i) => Some(Mirror {
                            service: *i,
                            percentage: m.percentage.min(100),
                        }),
                        None => {
                            problems.push(format!(
                                "{at}.mirror.service {name:?} names no service in this config"
                            ));
                            None
                        }
                    },
                }
            }
        };
        let request_headers = w.request_headers.as_ref().and_then(|h| {
            stage(
                &mut problems,
                HeaderEdits::from_wire(h, &format!("{at}.requestHeaders")),
            )
        });
        let response_headers = w.response_headers.as_ref().and_then(|h| {
            stage(
                &mut problems,
                HeaderEdits::from_wire(h, &format!("{at}.responseHeaders")),
            )
        });
        let rewrite = w.rewrite.as_ref().and_then(|r| {
            stage(
                &mut problems,
                Rewrite::from_wire(r, &format!("{at}.rewrite")),
            )
        });
        if matches!(w.rewrite, Some(wire::RewriteConfig::ReplacePrefixMatch(_)))
            && (matches.is_empty() || matches.iter().any(|m| m.prefix().is_none()))
        {
            problems.push(format!(
                "{at}.rewrite.replacePrefixMatch needs every match of the rule to have a path prefix"
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Rule {
            label,
            matches,
            backends,
            split,
            timeout,
            per_try_timeout,
            retry,
            budget,
            fault,
            mirror,
            request_headers,
            response_headers,
            rewrite,
        })
    }
}
