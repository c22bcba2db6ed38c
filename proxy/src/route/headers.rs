//! Header edits of a rule, on requests or responses: names and values parsed once at load,
//! then applied in the order remove, set, add.
//!
//! Headers the proxy owns or that decide message framing cannot be edited: a rule that
//! could remove `content-length` or add `transfer-encoding` could desynchronize the proxy
//! and its peer about where a message ends (request smuggling), and `weft-error` is how
//! clients tell the proxy's own answers from the application's.

use http::{HeaderMap, HeaderName, HeaderValue};
use weft_api::traffic as wire;

use crate::errors::ERROR_HEADER;

/// The most entries in each of `set`, `add` and `remove` (as Gateway API).
pub const MAX_EDITS: usize = 16;

/// Names no rule may edit: hop-by-hop and framing headers, `host` (routing uses it) and
/// the proxy's own `weft-error`. Pseudo-headers (`:path`, ...) are refused too.
pub const RESERVED: [&str; 10] = [
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    ERROR_HEADER,
];

/// Validated header edits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderEdits {
    /// Validates wire edits; `field` is their path in the config, such as
    /// `route.rules[2].requestHeaders`, and starts every problem reported.
    pub fn from_wire(w: &wire::HeaderEditsConfig, field: &str) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        for (list, len) in [
            ("set", w.set.len()),
            ("add", w.add.len()),
            ("remove", w.remove.len()),
        ] {
            if len > MAX_EDITS {
                problems.push(format!(
                    "{field}.{list}: {len} entries, at most {MAX_EDITS}"
                ));
            }
        }

        let mut remove: Vec<HeaderName> = Vec::with_capacity(w.remove.len());
        for (i, raw) in w.remove.iter().enumerate() {
            let at = format!("{field}.remove[{i}]");
            if let Some(name) = editable_name(raw, &at, &mut problems) {
                if remove.contains(&name) {
                    problems.push(format!(
                        "{at}: {name} is already removed by an earlier entry"
                    ));
                }
                remove.push(name);
            }
        }

        let mut set: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(w.set.len());
        for (i, h) in w.set.iter().enumerate() {
            let at = format!("{field}.set[{i}]");
            let Some((name, value)) = edit(h, &at, &mut problems) else {
                continue;
            };
            if set.iter().any(|(n, _)| *n == name) {
                problems.push(format!(
                    "{at}.name: {name} is already set by an earlier entry (names are \
                     case-insensitive); use add for several values"
                ));
            }
            if remove.contains(&name) {
                problems.push(format!(
                    "{at}.name: {name} is both set and removed; set alone replaces it"
                ));
            }
            set.push((name, value));
        }

        let mut add = Vec::with_capacity(w.add.len());
        for (i, h) in w.add.iter().enumerate() {
            if let Some(pair) = edit(h, &format!("{field}.add[{i}]"), &mut problems) {
                add.push(pair);
            }
        }

        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(HeaderEdits { remove, set, add })
    }

    /// Applies the edits: removes, then sets (replacing every value), then appends.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }

    /// The fields the edits put in every message they apply to: each `set`, then each
    /// `add`, with its value.
    pub fn written(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.set.iter().chain(&self.add).map(|(n, v)| (n, v))
    }

    /// Whether there is nothing to do, so the caller can skip the headers entirely.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

fn edit(
    h: &wire::HeaderConfig,
    at: &str,
    problems: &mut Vec<String>,
) -> Option<(HeaderName, HeaderValue)> {
    let name = editable_name(&h.name, &format!("{at}.name"), problems);
    let value = match HeaderValue::from_str(&h.value) {
        Ok(value) => Some(value),
        Err(_) => {
            problems.push(format!(
                "{at}.value: {:?} is not a valid header value (visible ASCII, spaces and \
                 tabs, no line breaks)",
                h.value
            ));
            None
        }
    };
    Some((name?, value?))
}

fn editable_name(raw: &str, at: &str, problems: &mut Vec<String>) -> Option<HeaderName> {
    if raw.starts_with(':') {
        problems.push(format!(
            "{at}: {raw:?} is a pseudo-header; the proxy owns the request line and status"
        ));
        return None;
    }
    let Ok(name) = HeaderName::from_bytes(raw.as_bytes()) else {
        problems.push(format!("{at}: {raw:?} is not a header name"));
        return None;
    };
    if RESERVED.contains(&name.as_str()) {
        problems.push(format!(
            "{at}: {name} cannot be edited: the proxy owns it or it decides message framing"
        ));
        return None;
    }
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edits(json: serde_json::Value) -> Result<HeaderEdits, Vec<String>> {
        let w: wire::HeaderEditsConfig = serde_json::from_value(json).unwrap();
        HeaderEdits::from_wire(&w, "route.rules[1].requestHeaders")
    }

    #[test]
    fn edits_apply_in_the_order_remove_set_add() {
        let e = edits(serde_json::json!({
            "remove": ["X-Debug", "x-gone"],
            "set": [{"name": "X-Env", "value": "prod"}],
            "add": [{"name": "x-env", "value": "extra"}, {"name": "x-debug", "value": "0"}],
        }))
        .unwrap();
        assert!(!e.is_empty());
        let mut headers = HeaderMap::new();
        headers.append("x-debug", HeaderValue::from_static("1"));
        headers.append("x-env", HeaderValue::from_static("dev"));
        headers.append("x-env", HeaderValue::from_static("test"));
        headers.append("x-keep", HeaderValue::from_static("k"));
        e.apply(&mut headers);
        let all = |n: &str| -> Vec<&str> {
            headers
                .get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect()
        };
        assert_eq!(all("x-env"), ["prod", "extra"]);
        assert_eq!(all("x-debug"), ["0"], "added after the removal");
        assert_eq!(all("x-keep"), ["k"]);
        assert_eq!(headers.len(), 4);
    }

    #[test]
    fn no_edits_is_empty() {
        assert!(edits(serde_json::json!({})).unwrap().is_empty());
    }

    #[test]
    fn reserved_names_are_refused_naming_the_field() {
        for name in [
            "Host",
            "connection",
            "keep-alive",
            "proxy-connection",
            "Transfer-Encoding",
            "te",
            "trailer",
            "upgrade",
            "content-length",
            "weft-error",
            ":authority",
        ] {
            let found = edits(serde_json::json!({
                "set": [{"name": name, "value": "x"}],
                "add": [{"name": name, "value": "x"}],
                "remove": [name],
            }))
            .unwrap_err();
            let at = "route.rules[1].requestHeaders";
            assert_eq!(
                found
                    .iter()
                    .map(|p| p.split(": ").next().unwrap())
                    .collect::<Vec<_>>(),
                [
                    format!("{at}.remove[0]"),
                    format!("{at}.set[0].name"),
                    format!("{at}.add[0].name")
                ],
                "{name}: {found:#?}"
            );
        }
    }

    #[test]
    fn conflicting_or_invalid_edits_are_refused() {
        let found = edits(serde_json::json!({
            "set": [{"name": "x-a", "value": "1"}, {"name": "X-A", "value": "2"},
                    {"name": "x-b", "value": "1"}, {"name": "x-c", "value": "line\nbreak"}],
            "add": [{"name": "bad name", "value": "1"}],
            "remove": ["x-b", "x-z", "X-Z"],
        }))
        .unwrap_err();
        let at = "route.rules[1].requestHeaders";
        let fields: Vec<&str> = found
            .iter()
            .map(|p| p.split(": ").next().unwrap())
            .collect();
        let want = [
            format!("{at}.remove[2]"),
            format!("{at}.set[1].name"),
            format!("{at}.set[2].name"),
            format!("{at}.set[3].value"),
            format!("{at}.add[0].name"),
        ];
        assert_eq!(fields, want, "{found:#?}");
        let many: Vec<String> = (0..17).map(|i| format!("x-{i}")).collect();
        let found = edits(serde_json::json!({ "remove": many })).unwrap_err();
        assert!(
            found[0].starts_with(&format!("{at}.remove: 17 entries")),
            "{found:?}"
        );
    }
}
