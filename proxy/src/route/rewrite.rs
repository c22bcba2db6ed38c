//! Path rewrites, with Gateway API's `URLRewrite` semantics. The rewritten path replaces the
//! path only: the caller keeps the request's query string and appends it.
//!
//! ```text
//! replacePrefixMatch "/v2", matched prefix "/api":  /api/x ─▶ /v2/x    /api ─▶ /v2
//! replacePrefixMatch "/",   matched prefix "/api":  /api/x ─▶ /x       /api ─▶ /
//! replaceFullPath "/health":                        /anything ─▶ /health
//! ```
//!
//! Replacements are normalized at load and kept without a trailing slash, and the path
//! after a matched prefix is empty or starts with `/`, so a rewrite of a normalized path
//! never produces `//`.

use std::str::FromStr;

use http::uri::PathAndQuery;
use weft_api::traffic as wire;

use super::normalize::normalize_path;

/// A validated path rewrite.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rewrite {
    /// Replaces the prefix the request matched with this (normalized; empty for `/`).
    ReplacePrefixMatch(String),
    /// Replaces the whole path with this (normalized).
    ReplaceFullPath(String),
}

impl Rewrite {
    /// Validates a wire rewrite; `field` is its path in the config, such as
    /// `route.rules[2].rewrite`, and starts every problem reported.
    ///
    /// Whether the rule's entries all match on a path prefix, as `replacePrefixMatch`
    /// needs, is for the caller to check: it sees the whole rule.
    pub fn from_wire(w: &wire::RewriteConfig, field: &str) -> Result<Self, Vec<String>> {
        match w {
            wire::RewriteConfig::ReplacePrefixMatch(p) => {
                // Gateway API accepts "" for "/": the prefix is then removed.
                let path = if p.is_empty() { "/" } else { p };
                let normal = replacement(path, &format!("{field}.replacePrefixMatch"))?;
                let trimmed = normal.strip_suffix('/').unwrap_or(&normal);
                Ok(Rewrite::ReplacePrefixMatch(trimmed.to_owned()))
            }
            wire::RewriteConfig::ReplaceFullPath(p) => {
                let normal = replacement(p, &format!("{field}.replaceFullPath"))?;
                Ok(Rewrite::ReplaceFullPath(normal))
            }
        }
    }

    /// The rewritten path of a request whose normalized path is `path` and which matched
    /// on `matched_prefix` ([`RequestMatch::prefix`](super::matching::RequestMatch::prefix)).
    ///
    /// `ReplacePrefixMatch` without a matched prefix, or with one `path` does not start
    /// with, returns `path` unchanged: config validation only allows it on rules whose
    /// entries all match on a prefix, so this does not happen. The query string is not part
    /// of `path`; the caller keeps it.
    pub fn apply(&self, path: &str, matched_prefix: Option<&str>) -> String {
        match self {
            Rewrite::ReplaceFullPath(full) => full.clone(),
            Rewrite::ReplacePrefixMatch(replacement) => {
                let Some(rest) = matched_prefix.and_then(|prefix| after_prefix(path, prefix))
                else {
                    return path.to_owned();
                };
                let mut out = String::with_capacity(replacement.len() + rest.len() + 1);
                out.push_str(replacement);
                out.push_str(rest);
                if out.is_empty() {
                    out.push('/');
                }
                out
            }
        }
    }
}

/// What follows `prefix` in `path` on a segment boundary: empty or starting with `/`.
fn after_prefix<'p>(path: &'p str, prefix: &str) -> Option<&'p str> {
    if prefix == "/" {
        return path.starts_with('/').then_some(path);
    }
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    path.strip_prefix(prefix)
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// A replacement path, checked to be a valid absolute URI path without query or fragment,
/// and normalized.
fn replacement(path: &str, field: &str) -> Result<String, Vec<String>> {
    let problem = if !path.starts_with('/') {
        "must start with '/'"
    } else if path.len() > super::matching::MAX_PATH_LEN {
        "is longer than 1024 bytes"
    } else if path.contains(['?', '#']) {
        "must not contain '?' or '#'"
    } else if PathAndQuery::from_str(path).is_err() || !path.is_ascii() {
        "is not a valid URI path (percent-encode spaces and non-ASCII characters)"
    } else {
        return Ok(normalize_path(path).into_owned());
    };
    Err(vec![format!("{field}: {path:?} {problem}")])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(to: &str) -> Rewrite {
        Rewrite::from_wire(&wire::RewriteConfig::ReplacePrefixMatch(to.into()), "r").unwrap()
    }

    #[test]
    fn replace_prefix_match_follows_gateway_api() {
        // Gateway API's HTTPPathModifier table, and the root prefix.
        let cases = [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            ("/api/x", "/api", "/v2", "/v2/x"),
            ("/api", "/api", "/v2", "/v2"),
            ("/api/x", "/api", "/", "/x"),
            ("/api", "/api", "/", "/"),
            ("/x/y", "/", "/v2", "/v2/x/y"),
            ("/x", "/", "/", "/x"),
        ];
        for (path, matched, to, want) in cases {
            assert_eq!(
                prefix(to).apply(path, Some(matched)),
                want,
                "{path} matched {matched} replaced by {to}"
            );
        }
    }

    #[test]
    fn replace_prefix_match_without_a_matching_prefix_changes_nothing() {
        assert_eq!(prefix("/v2").apply("/api/x", None), "/api/x");
        assert_eq!(prefix("/v2").apply("/apix", Some("/api")), "/apix");
    }

    #[test]
    fn replace_full_path_replaces_everything() {
        let full = Rewrite::from_wire(
            &wire::RewriteConfig::ReplaceFullPath("/health/".into()),
            "r",
        )
        .unwrap();
        assert_eq!(full.apply("/api/x", Some("/api")), "/health/");
        assert_eq!(full.apply("/", None), "/health/");
    }

    #[test]
    fn replacements_are_normalized() {
        assert_eq!(
            prefix("//v2/./x/"),
            Rewrite::ReplacePrefixMatch("/v2/x".into())
        );
    }

    #[test]
    fn invalid_replacements_are_refused_naming_the_field() {
        let at = "route.rules[0].rewrite";
        for (w, field) in [
            (
                wire::RewriteConfig::ReplacePrefixMatch("v2".into()),
                "replacePrefixMatch",
            ),
            (
                wire::RewriteConfig::ReplaceFullPath("/a?b".into()),
                "replaceFullPath",
            ),
            (
                wire::RewriteConfig::ReplaceFullPath("/a b".into()),
                "replaceFullPath",
            ),
            (
                wire::RewriteConfig::ReplaceFullPath("/é".into()),
                "replaceFullPath",
            ),
            (
                wire::RewriteConfig::ReplaceFullPath(String::new()),
                "replaceFullPath",
            ),
        ] {
            let found = Rewrite::from_wire(&w, at).unwrap_err();
            assert!(
                found[0].starts_with(&format!("{at}.{field}: ")),
                "{found:?}"
            );
        }
    }
}
