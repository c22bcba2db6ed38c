//! Inbound authorization: the Policies compiled into this proxy's `inbound.authorization`,
//! validated once from the wire and evaluated per request (HTTP) or per connection (opaque
//! TCP) on the inbound side, before the rate limit.
//!
//! ```text
//! InboundConfig.authorization ──Authorizer::from_wire──▶ Authorizer (validated)
//!
//! request ─▶ Subject { identity, port, http: (normalized path, method) }
//!            │ every policy applies:
//!            │   any matching deny rule          ─▶ Deny(policy)
//!            │   else any matching allow rule    ─▶ Allow
//!            │   else any policy defaults deny   ─▶ Deny(policy)
//!            │   else                            ─▶ Allow
//!            ▼
//!         Verdict::Allow | Deny { policy } | DryRunDeny { policy }
//! ```
//!
//! Dry-run policies are evaluated alongside and never change the outcome: when the
//! enforcing policies allow and the dry-run ones would deny, the verdict says which
//! policy would have (counted and logged by the caller).
//!
//! Paths are matched after [`normalize_path`] with the routing matcher
//! ([`RequestMatch`]), so `//admin`, `/./admin`, `/%61dmin` and `/x/../admin` are
//! `/admin`, and matching is case-sensitive (`/ADMIN` is another path). For an opaque TCP
//! connection there is no path or method: an `allow` rule that names paths or methods does
//! not match it, and a `deny` rule ignores them (it matches on its ports and clients), so
//! HTTP-only conditions can never open an opaque port, only close it (as Istio does).

use std::sync::Arc;

use http::{HeaderMap, Method};
use weft_api::traffic::{self as wire, AuthzAction, MtlsMode};

use crate::errors::ErrorCode;
use crate::route::{
    matching::{METHODS, MatchInput, RequestMatch},
    normalize::normalize_path,
};

/// The most policies one proxy accepts.
pub const MAX_POLICIES: usize = 64;
/// The most rules in one policy (the Policy CRD's limit).
pub const MAX_RULES: usize = 64;
/// The most `from` or `to` entries in one rule, and the most values in one field of an
/// entry (the Policy CRD's limits).
pub const MAX_ENTRIES: usize = 16;
/// The longest SPIFFE ID or prefix, in bytes.
pub const MAX_ID_LEN: usize = 2048;

/// The validated authorization of one proxy's workload: every policy applies.
#[derive(Debug, Default)]
pub struct Authorizer {
    policies: Vec<Policy>,
}

#[derive(Debug)]
struct Policy {
    name: Arc<str>,
    default_deny: bool,
    dry_run: bool,
    rules: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    deny: bool,
    /// Empty: every client.
    from: Vec<Source>,
    /// Empty: every request.
    to: Vec<Destination>,
}

#[derive(Debug)]
struct Source {
    identities: Vec<Box<str>>,
    prefixes: Vec<Box<str>>,
    unauthenticated: bool,
}

#[derive(Debug)]
struct Destination {
    ports: Vec<u16>,
    /// Path-only match entries of the routing matcher; empty: every path.
    paths: Vec<RequestMatch>,
    methods: Vec<Method>,
}

/// What a request or connection is, as authorization sees it.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    /// The client's verified mesh identity (SPIFFE ID); `None`: unauthenticated.
    pub identity: Option<&'a str>,
    /// The workload port the client connected to (the original destination port, or the
    /// application port of an `--inbound-forward` listener).
    pub port: u16,
    /// For HTTP: the path, already normalized with [`normalize_path`], and the method.
    /// `None` for an opaque TCP connection.
    pub http: Option<(&'a str, &'a Method)>,
}

/// The outcome for one request or connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through.
    Allow,
    /// Refuse it; `policy` (`namespace/name`) decided.
    Deny {
        /// The deciding policy.
        policy: Arc<str>,
    },
    /// Let it through, but dry-run `policy` would have refused it.
    DryRunDeny {
        /// The dry-run policy that would have refused.
        policy: Arc<str>,
    },
}

impl Authorizer {
    /// Validates the wire policies; `field` names the list (`inbound.authorization`) and
    /// starts every problem reported.
    pub fn from_wire(w: &[wire::AuthorizationConfig], field: &str) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        if w.len() > MAX_POLICIES {
            problems.push(format!(
                "{field}: {} policies, at most {MAX_POLICIES}",
                w.len()
            ));
        }
        let mut policies = Vec::with_capacity(w.len());
        for (i, p) in w.iter().enumerate() {
            let at = format!("{field}[{i}]");
            if p.name.is_empty() || p.name.len() > 253 || p.name.chars().any(char::is_control) {
                problems.push(format!("{at}.name: must be 1 to 253 printable characters"));
            }
            if w[..i].iter().any(|o| o.name == p.name) {
                problems.push(format!(
                    "{at}.name: {:?} is used by an earlier policy",
                    p.name
                ));
            }
            if p.rules.len() > MAX_RULES {
                problems.push(format!(
                    "{at}.rules: {} rules, at most {MAX_RULES}",
                    p.rules.len()
                ));
            }
            let rules = p
                .rules
                .iter()
                .enumerate()
                .filter_map(|(j, r)| rule(r, &format!("{at}.rules[{j}]"), &mut problems))
                .collect();
            policies.push(Policy {
                name: Arc::from(p.name.as_str()),
                default_deny: p.default_action == AuthzAction::Deny,
                dry_run: p.dry_run,
                rules,
            });
        }
        if problems.is_empty() {
            Ok(Authorizer { policies })
        } else {
            Err(problems)
        }
    }

    /// Whether there is no policy (everything is allowed).
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policies' names (`namespace/name`), in config order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.policies.iter().map(|p| &*p.name)
    }

    /// Decides for one request or connection.
    pub fn decide(&self, subject: &Subject<'_>) -> Verdict {
        let headers = HeaderMap::new();
        let input = subject.http.map(|(path, method)| MatchInput {
            path,
            query: None,
            method,
            headers: &headers,
        });
        // Deny rules judge the path without regard to ASCII case (see `destination`);
        // lowercased once, and only when it has capitals.
        let lower = subject
            .http
            .filter(|(path, _)| path.bytes().any(|b| b.is_ascii_uppercase()))
            .map(|(path, _)| path.to_ascii_lowercase());
        let deny_input = match (&input, &lower) {
            (Some(i), Some(lower)) => Some(MatchInput { path: lower, ..*i }),
            _ => input,
        };
        // One pass over every policy, enforcing and dry-run alike.
        let mut deny: Option<&Arc<str>> = None;
        let mut dry_deny: Option<&Arc<str>> = None;
        let (mut allow, mut dry_allow) = (false, false);
        let mut default_deny: Option<&Arc<str>> = None;
        let mut dry_default_deny: Option<&Arc<str>> = None;
        for p in &self.policies {
            for r in &p.rules {
                if (r.deny
                    && if p.dry_run {
                        dry_deny.is_some()
                    } else {
                        deny.is_some()
                    })
                    || !r.matches(
                        subject,
                        if r.deny {
                            deny_input.as_ref()
                        } else {
                            input.as_ref()
                        },
                    )
                {
                    continue;
                }
                match (r.deny, p.dry_run) {
                    (true, false) => deny = Some(&p.name),
                    (true, true) => dry_deny = Some(&p.name),
                    (false, false) => allow = true,
                    (false, true) => dry_allow = true,
                }
            }
            if p.default_deny {
                let slot = if p.dry_run {
                    &mut dry_default_deny
                } else {
                    &mut default_deny
                };
                slot.get_or_insert(&p.name);
            }
        }
        if let Some(policy) = deny {
            return Verdict::Deny {
                policy: policy.clone(),
            };
        }
        if !allow && let Some(policy) = default_deny {
            return Verdict::Deny {
                policy: policy.clone(),
            };
        }
        // The enforcing policies allow: would the dry-run ones, added, deny?
        if let Some(policy) = dry_deny {
            return Verdict::DryRunDeny {
                policy: policy.clone(),
            };
        }
        if !allow
            && !dry_allow
            && let Some(policy) = dry_default_deny
        {
            return Verdict::DryRunDeny {
                policy: policy.clone(),
            };
        }
        Verdict::Allow
    }
}

impl Rule {
    fn matches(&self, subject: &Subject<'_>, input: Option<&MatchInput<'_>>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(subject.identity)))
            && (self.to.is_empty()
                || self
                    .to
                    .iter()
                    .any(|d| d.matches(subject.port, input, self.deny)))
    }
}

impl Source {
    fn matches(&self, identity: Option<&str>) -> bool {
        match identity {
            None => self.unauthenticated,
            Some(id) => {
                self.identities.iter().any(|x| **x == *id)
                    || self.prefixes.iter().any(|p| id.starts_with(&**p))
            }
        }
    }
}

impl Destination {
    /// `deny`: the rule denies, so HTTP-only conditions are ignored for opaque TCP (fail
    /// closed); an allow rule with them does not match opaque TCP.
    fn matches(&self, port: u16, input: Option<&MatchInput<'_>>, deny: bool) -> bool {
        if !self.ports.is_empty() && !self.ports.contains(&port) {
            return false;
        }
        let Some(input) = input else {
            return deny || (self.paths.is_empty() && self.methods.is_empty());
        };
        (self.methods.is_empty() || self.methods.contains(input.method))
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(input)))
    }
}

fn rule(w: &wire::AuthzRuleConfig, at: &str, problems: &mut Vec<String>) -> Option<Rule> {
    let before = problems.len();
    for (name, len) in [("from", w.from.len()), ("to", w.to.len())] {
        if len > MAX_ENTRIES {
            problems.push(format!("{at}.{name}: {len} entries, at most {MAX_ENTRIES}"));
        }
    }
    let from: Vec<Source> = w
        .from
        .iter()
        .enumerate()
        .map(|(k, s)| source(s, &format!("{at}.from[{k}]"), problems))
        .collect();
    let deny = w.action == AuthzAction::Deny;
    let to: Vec<Destination> =
        w.to.iter()
            .enumerate()
            .map(|(k, d)| destination(d, deny, &format!("{at}.to[{k}]"), problems))
            .collect();
    (problems.len() == before).then_some(Rule { deny, from, to })
}

/// A SPIFFE ID (`spiffe://<trust domain>/<path>`) as the identity CA issues them: ASCII,
/// no whitespace, query or fragment.
fn spiffe_problem(id: &str) -> Option<&'static str> {
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return Some("must start with spiffe://");
    };
    if id.len() > MAX_ID_LEN {
        return Some("is longer than 2048 bytes");
    }
    if rest.is_empty() || rest.starts_with('/') {
        return Some("has no trust domain");
    }
    if !rest
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/'))
    {
        return Some("may hold only letters, digits, '.', '-', '_' and '/'");
    }
    None
}

fn source(w: &wire::AuthzSourceConfig, at: &str, problems: &mut Vec<String>) -> Source {
    if w.identities.is_empty() && w.identity_prefixes.is_empty() && !w.unauthenticated {
        problems.push(format!(
            "{at}: matches no client; set identities, identityPrefixes or unauthenticated"
        ));
    }
    for (name, len) in [
        ("identities", w.identities.len()),
        ("identityPrefixes", w.identity_prefixes.len()),
    ] {
        // Namespaces and ServiceAccounts compile into these: a little more room.
        if len > 4 * MAX_ENTRIES {
            problems.push(format!(
                "{at}.{name}: {len} entries, at most {}",
                4 * MAX_ENTRIES
            ));
        }
    }
    for (k, id) in w.identities.iter().enumerate() {
        if let Some(p) = spiffe_problem(id) {
            problems.push(format!("{at}.identities[{k}]: {id:?} {p}"));
        } else if id.ends_with('/') {
            problems.push(format!(
                "{at}.identities[{k}]: {id:?} ends with '/', which no identity does \
                 (a prefix belongs in identityPrefixes)"
            ));
        }
    }
    for (k, prefix) in w.identity_prefixes.iter().enumerate() {
        if let Some(p) = spiffe_problem(prefix) {
            problems.push(format!("{at}.identityPrefixes[{k}]: {prefix:?} {p}"));
        } else if !prefix.ends_with('/') || !prefix["spiffe://".len()..].contains('/') {
            // Without the slash, `.../ns/shop` would also take `.../ns/shopping`.
            problems.push(format!(
                "{at}.identityPrefixes[{k}]: {prefix:?} must end with '/' after the trust \
                 domain, such as spiffe://cluster.local/ns/shop/sa/"
            ));
        }
    }
    Source {
        identities: w.identities.iter().map(|s| s.as_str().into()).collect(),
        prefixes: w
            .identity_prefixes
            .iter()
            .map(|s| s.as_str().into())
            .collect(),
        unauthenticated: w.unauthenticated,
    }
}

/// A rule's destination. A deny rule's paths match without regard to ASCII case (exact
/// and prefix paths lowercased, matched against the lowercased request path; regular
/// expressions with `(?i)`), so an application that treats `/ADMIN` as `/admin` cannot be
/// reached past a rule that denies `/admin`. Allow rules stay case-sensitive: they open
/// exactly the paths they name.
fn destination(
    w: &wire::AuthzDestinationConfig,
    deny: bool,
    at: &str,
    problems: &mut Vec<String>,
) -> Destination {
    for (name, len) in [
        ("ports", w.ports.len()),
        ("paths", w.paths.len()),
        ("methods", w.methods.len()),
    ] {
        if len > MAX_ENTRIES {
            problems.push(format!("{at}.{name}: {len} entries, at most {MAX_ENTRIES}"));
        }
    }
    if w.ports.contains(&0) {
        problems.push(format!("{at}.ports: 0 is not a port"));
    }
    let paths = w
        .paths
        .iter()
        .enumerate()
        .filter_map(|(k, p)| {
            let path = match (deny, p) {
                (false, p) => p.clone(),
                (true, wire::PathMatchConfig::Exact(x)) => {
                    wire::PathMatchConfig::Exact(x.to_ascii_lowercase())
                }
                (true, wire::PathMatchConfig::Prefix(x)) => {
                    wire::PathMatchConfig::Prefix(x.to_ascii_lowercase())
                }
                (true, wire::PathMatchConfig::Regex(x)) => {
                    wire::PathMatchConfig::Regex(format!("(?i){x}"))
                }
            };
            let entry = wire::MatchConfig {
                path: Some(path),
                ..wire::MatchConfig::default()
            };
            // The matcher names the field `<at>.paths[k].path.<kind>`; say `<at>.paths[k]`.
            RequestMatch::from_wire(&entry, &format!("{at}.paths[{k}]"))
                .map_err(|ps| {
                    problems.extend(ps.into_iter().map(|p| p.replacen(".path.", ".", 1)));
                })
                .ok()
        })
        .collect();
    let methods = w
        .methods
        .iter()
        .enumerate()
        .filter_map(|(k, m)| {
            let found = METHODS.iter().find(|known| known.as_str() == m).cloned();
            if found.is_none() {
                problems.push(format!(
                    "{at}.methods[{k}]: {m:?} is not one of GET, HEAD, POST, PUT, DELETE, \
                     CONNECT, OPTIONS, TRACE, PATCH (methods are case-sensitive)"
                ));
            }
            found
        })
        .collect();
    Destination {
        ports: w.ports.clone(),
        paths,
        methods,
    }
}

/// Which transports the inbound side accepts, and what a client gets when refused.
pub fn mtls_refuses(mode: MtlsMode, identity: Option<&str>) -> bool {
    mode == MtlsMode::Strict && identity.is_none()
}

/// Why the workload's mTLS mode refuses a client, if it does: under `strict`, a client
/// without a mesh identity is refused, as `mtls_required` when it spoke plain text and as
/// `client_certificate_required` when it spoke TLS without a certificate (`tls`).
pub fn mtls_refusal(mode: MtlsMode, tls: bool, identity: Option<&str>) -> Option<ErrorCode> {
    match mtls_refuses(mode, identity) {
        false => None,
        true if tls => Some(ErrorCode::ClientCertificateRequired),
        true => Some(ErrorCode::MtlsRequired),
    }
}

/// The normalized path of a request target, for [`Subject::http`].
pub fn normal_path(path: &str) -> std::borrow::Cow<'_, str> {
    normalize_path(path)
}

#[cfg(test)]
mod tests;
