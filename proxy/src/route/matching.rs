//! Request matching: which rule of a route takes a request. Each wire
//! [`MatchConfig`](wire::MatchConfig) is validated once into a [`RequestMatch`] (configured
//! paths normalized, methods parsed, regular expressions compiled with size limits); per
//! request, [`first_match`] walks the rules in order and stops at the first that takes it.
//!
//! ```text
//! request ──(normalized path, query, method, headers)──▶ MatchInput
//!   rules[0].matches ─┐
//!   rules[1].matches ─┼─first_match──▶ Some((rule, Some(entry)))  or  None
//!   ...               ┘
//! ```
//!
//! Within one entry every condition that is set must hold; cheap ones are tried first
//! (method, exact and prefix paths, headers with exact values before those with regular
//! expressions, the path regex, and last the query string, which has to be parsed).

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use regex::bytes::{Regex, RegexBuilder};
use weft_api::traffic as wire;

use super::normalize::normalize_path;

/// The largest compiled form of one regular expression (the `regex` crate's
/// `size_limit`): enough for any realistic route, small enough that a pathological pattern
/// (`(a{1000}){1000}`) is refused at load instead of costing memory and time per request.
pub const REGEX_SIZE_LIMIT: usize = 64 * 1024;
/// The deepest nesting of groups and repetitions in one regular expression.
pub const REGEX_NEST_LIMIT: u32 = 32;
/// The longest regular expression, in bytes.
pub const MAX_REGEX_LEN: usize = 1024;
/// The longest configured exact or prefix path, in bytes.
pub const MAX_PATH_LEN: usize = 1024;
/// The most header conditions, and the most query conditions, in one entry (as Gateway API).
pub const MAX_VALUE_MATCHES: usize = 16;

/// The methods a route may match on (Gateway API's `HTTPMethod`).
pub(crate) const METHODS: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::CONNECT,
    Method::OPTIONS,
    Method::TRACE,
    Method::PATCH,
];

/// One validated match entry: a request matches when every condition set here holds.
#[derive(Clone, Debug)]
pub struct RequestMatch {
    path: Option<PathMatch>,
    method: Option<Method>,
    headers: Vec<HeaderMatch>,
    query: Vec<QueryMatch>,
}

/// What a request is matched on, borrowed from it.
#[derive(Clone, Copy, Debug)]
pub struct MatchInput<'a> {
    /// The path, already normalized with [`normalize_path`].
    pub path: &'a str,
    /// The query string without the `?`, if the target had one.
    pub query: Option<&'a str>,
    /// The request method.
    pub method: &'a Method,
    /// The request headers.
    pub headers: &'a HeaderMap,
}

#[derive(Clone, Debug)]
enum PathMatch {
    Exact(Box<str>),
    /// Normalized, without a trailing slash except for the root `/`.
    Prefix(Box<str>),
    Regex(Regex),
}

#[derive(Clone, Debug)]
struct HeaderMatch {
    name: HeaderName,
    value: ValueMatch,
}

#[derive(Clone, Debug)]
struct QueryMatch {
    name: Box<str>,
    value: ValueMatch,
}

#[derive(Clone, Debug)]
enum ValueMatch {
    Exact(Box<[u8]>),
    Regex(Regex),
}

impl ValueMatch {
    fn matches(&self, value: &[u8]) -> bool {
        match self {
            ValueMatch::Exact(want) => **want == *value,
            ValueMatch::Regex(re) => re.is_match(value),
        }
    }
}

impl RequestMatch {
    /// Validates one wire entry; `field` is its path in the config, such as
    /// `route.rules[2].matches[0]`, and starts every problem reported.
    pub fn from_wire(w: &wire::MatchConfig, field: &str) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let path = w
            .path
            .as_ref()
            .and_then(|p| path_match(p, &format!("{field}.path"), &mut problems));
        let method = w.method.as_deref().and_then(|m| {
            let method = METHODS.iter().find(|known| known.as_str() == m).cloned();
            if method.is_none() {
                problems.push(format!(
                    "{field}.method: {m:?} is not one of GET, HEAD, POST, PUT, DELETE, \
                     CONNECT, OPTIONS, TRACE, PATCH (methods are case-sensitive)"
                ));
            }
            method
        });

        let mut headers: Vec<HeaderMatch> = Vec::with_capacity(w.headers.len());
        if w.headers.len() > MAX_VALUE_MATCHES {
            problems.push(format!(
                "{field}.headers: {} entries, at most {MAX_VALUE_MATCHES}",
                w.headers.len()
            ));
        }
        for (i, h) in w.headers.iter().enumerate() {
            let at = format!("{field}.headers[{i}]");
            let name = match HeaderName::from_bytes(h.name.as_bytes()) {
                Ok(name) => name,
                Err(_) => {
                    problems.push(format!("{at}.name: {:?} is not a header name", h.name));
                    continue;
                }
            };
            if headers.iter().any(|other| other.name == name) {
                problems.push(format!(
                    "{at}.name: {name} is matched by an earlier entry (names are \
                     case-insensitive); one condition per header"
                ));
            }
            if h.kind == wire::ValueMatchKind::Exact && HeaderValue::from_str(&h.value).is_err() {
                problems.push(format!(
                    "{at}.value: {:?} is not a valid header value, so it never matches",
                    h.value
                ));
            }
            if let Some(value) = value_match(h, &format!("{at}.value"), &mut problems) {
                headers.push(HeaderMatch { name, value });
            }
        }

        let mut query: Vec<QueryMatch> = Vec::with_capacity(w.query_params.len());
        if w.query_params.len() > MAX_VALUE_MATCHES {
            problems.push(format!(
                "{field}.queryParams: {} entries, at most {MAX_VALUE_MATCHES}",
                w.query_params.len()
            ));
        }
        for (i, q) in w.query_params.iter().enumerate() {
            let at = format!("{field}.queryParams[{i}]");
            if q.name.is_empty() {
                problems.push(format!("{at}.name: must not be empty"));
            }
            if query.iter().any(|other| *other.name == *q.name) {
                problems.push(format!(
                    "{at}.name: {:?} is matched by an earlier entry; one condition per \
                     parameter",
                    q.name
                ));
            }
            if let Some(value) = value_match(q, &format!("{at}.value"), &mut problems) {
                query.push(QueryMatch {
                    name: q.name.as_str().into(),
                    value,
                });
            }
        }

        if !problems.is_empty() {
            return Err(problems);
        }
        // Exact values first: a lookup and a compare reject most requests before any regex.
        headers.sort_by_key(|h| matches!(h.value, ValueMatch::Regex(_)));
        Ok(RequestMatch {
            path,
            method,
            headers,
            query,
        })
    }

    /// Whether the request satisfies every condition of this entry.
    pub fn matches(&self, input: &MatchInput<'_>) -> bool {
        if let Some(method) = &self.method
            && method != input.method
        {
            return false;
        }
        let (cheap_path, regex_path) = match &self.path {
            None => (true, None),
            Some(PathMatch::Exact(want)) => (**want == *input.path, None),
            Some(PathMatch::Prefix(prefix)) => (has_prefix(input.path, prefix), None),
            Some(PathMatch::Regex(re)) => (true, Some(re)),
        };
        cheap_path
            && self.headers.iter().all(|h| {
                input
                    .headers
                    .get_all(&h.name)
                    .iter()
                    .any(|v| h.value.matches(v.as_bytes()))
            })
            && regex_path.is_none_or(|re| re.is_match(input.path.as_bytes()))
            && self.query.iter().all(|q| {
                input.query.is_some_and(|query| {
                    query_pairs(query)
                        .any(|(name, value)| *name == *q.name.as_bytes() && q.value.matches(&value))
                })
            })
    }

    /// The path prefix this entry matches on (normalized, no trailing slash except for
    /// `/`): what a `replacePrefixMatch` rewrite replaces.
    pub fn prefix(&self) -> Option<&str> {
        match &self.path {
            Some(PathMatch::Prefix(prefix)) => Some(prefix),
            _ => None,
        }
    }
}

/// The first rule that takes the request, as `(rule index, entry index)`: a rule with no
/// entries takes every request (entry `None`); otherwise its first matching entry does.
pub fn first_match<'a>(
    rules: impl IntoIterator<Item = &'a [RequestMatch]>,
    input: &MatchInput<'_>,
) -> Option<(usize, Option<usize>)> {
    rules.into_iter().enumerate().find_map(|(rule, entries)| {
        if entries.is_empty() {
            return Some((rule, None));
        }
        entries
            .iter()
            .position(|entry| entry.matches(input))
            .map(|entry| (rule, Some(entry)))
    })
}

/// Prefix on segment boundaries: `/api` takes `/api`, `/api/` and `/api/x`, not `/apix`.
fn has_prefix(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The `name=value` pairs of a query string, percent-decoded (`+` is a space); a pair
/// without `=` has an empty value.
fn query_pairs(query: &str) -> impl Iterator<Item = (Cow<'_, [u8]>, Cow<'_, [u8]>)> {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        (form_decode(name), form_decode(value))
    })
}

/// `application/x-www-form-urlencoded` decoding, borrowed when there is nothing to decode;
/// a `%` that starts no escape stays as it is.
fn form_decode(s: &str) -> Cow<'_, [u8]> {
    let bytes = s.as_bytes();
    if !bytes.iter().any(|b| matches!(b, b'%' | b'+')) {
        return Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(b) = hex {
                    out.push(b);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(out)
}

fn path_match(
    w: &wire::PathMatchConfig,
    field: &str,
    problems: &mut Vec<String>,
) -> Option<PathMatch> {
    match w {
        wire::PathMatchConfig::Exact(path) => {
            let at = format!("{field}.exact");
            configured_path(path, &at, problems).map(|p| PathMatch::Exact(normalize_path(p).into()))
        }
        wire::PathMatchConfig::Prefix(path) => {
            let at = format!("{field}.prefix");
            configured_path(path, &at, problems).map(|p| {
                let normal = normalize_path(p);
                // `/api/` takes `/api` too, as Gateway API says: compare without the slash.
                let trimmed = match normal.strip_suffix('/') {
                    Some(t) if !t.is_empty() => t,
                    _ => &normal,
                };
                PathMatch::Prefix(trimmed.into())
            })
        }
        wire::PathMatchConfig::Regex(re) => {
            compile(re, &format!("{field}.regex"), problems).map(PathMatch::Regex)
        }
    }
}

/// A configured exact or prefix path, checked for what can never match a request path.
fn configured_path<'p>(path: &'p str, field: &str, problems: &mut Vec<String>) -> Option<&'p str> {
    let problem = if !path.starts_with('/') {
        "must start with '/'"
    } else if path.len() > MAX_PATH_LEN {
        "is longer than 1024 bytes"
    } else if path.contains(['?', '#']) {
        "must not contain '?' or '#' (match query parameters with queryParams)"
    } else if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        "must not contain whitespace or control characters"
    } else {
        return Some(path);
    };
    problems.push(format!("{field}: {path:?} {problem}"));
    None
}

fn value_match(
    w: &wire::ValueMatchConfig,
    field: &str,
    problems: &mut Vec<String>,
) -> Option<ValueMatch> {
    match w.kind {
        wire::ValueMatchKind::Exact => Some(ValueMatch::Exact(w.value.as_bytes().into())),
        wire::ValueMatchKind::Regex => compile(&w.value, field, problems).map(ValueMatch::Regex),
    }
}

/// Compiles `pattern` to match whole values only, within the size and nesting limits.
fn compile(pattern: &str, field: &str, problems: &mut Vec<String>) -> Option<Regex> {
    if pattern.len() > MAX_REGEX_LEN {
        problems.push(format!(
            "{field}: the regular expression is {} bytes, at most {MAX_REGEX_LEN}",
            pattern.len()
        ));
        return None;
    }
    let anchored = format!("^(?:{pattern})$");
    match RegexBuilder::new(&anchored)
        .size_limit(REGEX_SIZE_LIMIT)
        .nest_limit(REGEX_NEST_LIMIT)
        .build()
    {
        Ok(re) => Some(re),
        Err(regex::Error::CompiledTooBig(_)) => {
            problems.push(format!(
                "{field}: {pattern:?} compiles to more than {} KiB; simplify it (large \
                 repetition counts and Unicode classes such as \\w cost the most; \
                 (?-u:\\w) or [0-9] are smaller)",
                REGEX_SIZE_LIMIT / 1024
            ));
            None
        }
        Err(error) => {
            problems.push(format!(
                "{field}: {pattern:?} is not a valid regular expression: {}",
                one_line(&error.to_string())
            ));
            None
        }
    }
}

/// The regex crate's syntax errors are multi-line drawings; a problem is one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| matches!(c, '^' | '~' | '-' | ' ')))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(json: serde_json::Value) -> RequestMatch {
        let w: wire::MatchConfig = serde_json::from_value(json).unwrap();
        RequestMatch::from_wire(&w, "m").unwrap()
    }

    fn problems(json: serde_json::Value) -> Vec<String> {
        let w: wire::MatchConfig = serde_json::from_value(json).unwrap();
        RequestMatch::from_wire(&w, "route.rules[2].matches[0]").unwrap_err()
    }

    struct Req {
        path: &'static str,
        query: Option<&'static str>,
        method: Method,
        headers: HeaderMap,
    }

    fn req(target: &'static str) -> Req {
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        Req {
            path,
            query,
            method: Method::GET,
            headers: HeaderMap::new(),
        }
    }

    impl Req {
        fn header(mut self, name: &'static str, value: &'static str) -> Self {
            self.headers.append(name, HeaderValue::from_static(value));
            self
        }
        fn method(mut self, method: Method) -> Self {
            self.method = method;
            self
        }
        fn input(&self) -> MatchInput<'_> {
            MatchInput {
                path: self.path,
                query: self.query,
                method: &self.method,
                headers: &self.headers,
            }
        }
    }

    fn takes(m: &RequestMatch, r: Req) -> bool {
        m.matches(&r.input())
    }

    #[test]
    fn exact_paths_match_the_normalized_path_only() {
        let m = entry(serde_json::json!({"path": {"exact": "/api/./v1"}}));
        assert!(takes(&m, req("/api/v1")));
        assert!(!takes(&m, req("/api/v1/")));
        assert!(!takes(&m, req("/API/v1")));
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        let m = entry(serde_json::json!({"path": {"prefix": "/api"}}));
        assert_eq!(m.prefix(), Some("/api"));
        for path in ["/api", "/api/", "/api/x"] {
            assert!(takes(&m, req(path)), "{path}");
        }
        for path in ["/apix", "/ap", "/", "/x/api"] {
            assert!(!takes(&m, req(path)), "{path}");
        }
    }

    #[test]
    fn a_prefix_with_a_trailing_slash_also_takes_the_bare_path() {
        let m = entry(serde_json::json!({"path": {"prefix": "/api/"}}));
        assert_eq!(m.prefix(), Some("/api"));
        for path in ["/api", "/api/", "/api/x"] {
            assert!(takes(&m, req(path)), "{path}");
        }
        assert!(!takes(&m, req("/apix")));
    }

    #[test]
    fn the_root_prefix_takes_everything() {
        let m = entry(serde_json::json!({"path": {"prefix": "/"}}));
        assert_eq!(m.prefix(), Some("/"));
        assert!(takes(&m, req("/")));
        assert!(takes(&m, req("/anything/at/all")));
    }

    #[test]
    fn regexes_match_the_whole_path() {
        let m = entry(serde_json::json!({"path": {"regex": "/api/v[0-9]+/orders/[0-9]+"}}));
        assert!(takes(&m, req("/api/v2/orders/42")));
        assert!(!takes(&m, req("/api/v2/orders/42/items")));
        assert!(!takes(&m, req("/x/api/v2/orders/42")));
        assert_eq!(m.prefix(), None);
        let alternation = entry(serde_json::json!({"path": {"regex": "/a|/b"}}));
        assert!(
            !takes(&alternation, req("/a/x")),
            "anchoring covers every branch"
        );
    }

    #[test]
    fn methods_compare_exactly() {
        let m = entry(serde_json::json!({"method": "POST"}));
        assert!(takes(&m, req("/").method(Method::POST)));
        assert!(!takes(&m, req("/")));
    }

    #[test]
    fn headers_match_by_case_insensitive_name_and_any_value() {
        let m = entry(serde_json::json!({"headers": [
            {"name": "X-Canary", "value": "yes"},
            {"name": "x-user", "value": "[a-z]+-[0-9]+", "type": "regex"},
        ]}));
        let both = || req("/").header("x-canary", "yes").header("x-user", "ann-1");
        assert!(takes(&m, both()));
        assert!(takes(&m, both().header("x-canary", "no")));
        assert!(takes(
            &m,
            req("/")
                .header("x-canary", "no")
                .header("x-canary", "yes")
                .header("x-user", "b-2")
        ));
        assert!(!takes(&m, req("/").header("x-canary", "yes")));
        assert!(!takes(
            &m,
            req("/").header("x-canary", "YES").header("x-user", "ann-1")
        ));
        assert!(!takes(
            &m,
            req("/")
                .header("x-canary", "yes")
                .header("x-user", "ann-1x!")
        ));
    }

    #[test]
    fn query_parameters_are_decoded_and_any_occurrence_counts() {
        let m = entry(serde_json::json!({"queryParams": [
            {"name": "q", "value": "a b/c"},
            {"name": "v", "value": "[0-9]+", "type": "regex"},
        ]}));
        assert!(takes(&m, req("/?q=a+b%2Fc&v=12")));
        assert!(takes(&m, req("/?v=x&q=a%20b/c&v=3")));
        assert!(
            !takes(&m, req("/?Q=a+b%2Fc&v=12")),
            "names are case-sensitive"
        );
        assert!(!takes(&m, req("/?q=a+b%2Fc&v=1x")));
        assert!(!takes(&m, req("/")));
        let flag = entry(serde_json::json!({"queryParams": [{"name": "debug", "value": ""}]}));
        assert!(takes(&flag, req("/?debug")));
        assert!(takes(&flag, req("/?x=1&debug=")));
    }

    #[test]
    fn every_condition_of_an_entry_must_hold() {
        let m = entry(serde_json::json!({
            "path": {"prefix": "/api"}, "method": "GET",
            "headers": [{"name": "x-a", "value": "1"}],
            "queryParams": [{"name": "b", "value": "2"}],
        }));
        assert!(takes(&m, req("/api/x?b=2").header("x-a", "1")));
        assert!(!takes(&m, req("/api/x?b=2")));
        assert!(!takes(&m, req("/api/x").header("x-a", "1")));
        assert!(!takes(&m, req("/web?b=2").header("x-a", "1")));
        assert!(!takes(
            &m,
            req("/api/x?b=2").header("x-a", "1").method(Method::PUT)
        ));
    }

    #[test]
    fn first_match_finds_the_first_rule_and_entry() {
        let api = entry(serde_json::json!({"path": {"prefix": "/api"}}));
        let web = entry(serde_json::json!({"path": {"prefix": "/web"}}));
        let post = entry(serde_json::json!({"method": "POST"}));
        let rules: Vec<Vec<RequestMatch>> =
            vec![vec![api.clone()], vec![web, post], vec![], vec![api]];
        let find = |r: Req| first_match(rules.iter().map(Vec::as_slice), &r.input());
        assert_eq!(find(req("/api/x")), Some((0, Some(0))));
        assert_eq!(find(req("/web")), Some((1, Some(0))));
        assert_eq!(find(req("/x").method(Method::POST)), Some((1, Some(1))));
        assert_eq!(find(req("/x")), Some((2, None)));
        let none: Vec<Vec<RequestMatch>> = vec![vec![entry(serde_json::json!({"method": "PUT"}))]];
        assert_eq!(
            first_match(none.iter().map(Vec::as_slice), &req("/").input()),
            None
        );
    }

    #[test]
    fn bad_entries_are_refused_naming_each_field() {
        let found = problems(serde_json::json!({
            "path": {"regex": "(unclosed"},
            "method": "get",
            "headers": [{"name": "bad name", "value": "1"},
                        {"name": "x-a", "value": "a\u{1}"},
                        {"name": "X-B", "value": "1"}, {"name": "x-b", "value": "2"}],
            "queryParams": [{"name": "v", "value": "[", "type": "regex"}],
        }));
        let at = "route.rules[2].matches[0]";
        for prefix in [
            format!("{at}.path.regex: "),
            format!("{at}.method: "),
            format!("{at}.headers[0].name: "),
            format!("{at}.headers[1].value: "),
            format!("{at}.headers[3].name: "),
            format!("{at}.queryParams[0].value: "),
        ] {
            assert!(
                found.iter().any(|p| p.starts_with(&prefix)),
                "no problem starts with {prefix:?}: {found:#?}"
            );
        }
        assert_eq!(found.len(), 6, "{found:#?}");
        assert!(found.iter().all(|p| !p.contains('\n')), "{found:#?}");

        for (path, field) in [
            (serde_json::json!({"exact": "api"}), "path.exact"),
            (serde_json::json!({"prefix": "/a?b=1"}), "path.prefix"),
            (serde_json::json!({"prefix": "/a b"}), "path.prefix"),
        ] {
            let found = problems(serde_json::json!({ "path": path }));
            assert!(
                found[0].starts_with(&format!("{at}.{field}: ")),
                "{found:?}"
            );
        }
    }

    #[test]
    fn regexes_too_large_or_too_deep_are_refused() {
        let found = problems(serde_json::json!({"path": {"regex": "(a{1000}){1000}"}}));
        assert!(found[0].contains("KiB"), "{found:?}");
        let deep = format!("{}a{}", "(".repeat(100), ")".repeat(100));
        let found = problems(serde_json::json!({"path": {"regex": deep}}));
        assert!(
            found[0].starts_with("route.rules[2].matches[0].path.regex: "),
            "{found:?}"
        );
        let long = "a".repeat(MAX_REGEX_LEN + 1);
        assert!(!problems(serde_json::json!({"path": {"regex": long}})).is_empty());
    }

    #[test]
    fn ordinary_regexes_fit_the_size_limit() {
        for re in [
            "/api/v[0-9]+/orders/[0-9]+",
            "/users/[^/]+/profile",
            "/[a-zA-Z0-9_-]{1,64}/items/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            "/(?:en|de|fr)/.*",
            r"/\d+",
            r"/\w+",
        ] {
            entry(serde_json::json!({"path": {"regex": re}}));
        }
    }
}
