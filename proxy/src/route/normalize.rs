//! Path normalization: the one spelling of a path that routes match against, so that
//! `/%61pi`, `/./api` and `//api` cannot slip past a rule written for `/api`.
//!
//! ```text
//! "/a//b/./%7Ec/../%2f" ──normalize_path──▶ "/a/b/%2F"
//! ```
//!
//! In order: percent-escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded,
//! other escapes get uppercase hex (`%2f` → `%2F`, never decoded: `%2F` is data, not a
//! separator), a `%` that starts no escape becomes `%25`, then empty segments (`//`) are
//! dropped and dot segments removed (RFC 3986 §5.2.4) in one pass over the segments. A
//! trailing slash is kept. Matching stays case-sensitive.

use std::borrow::Cow;

/// The normalized form of `path` (the path part of a request target, without the query):
/// borrowed when `path` is already normal, which is the common case.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    if is_normal(path) {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    Cow::Owned(remove_dot_segments(&decoded))
}

/// Whether `normalize_path` would return `path` unchanged; allocation-free.
fn is_normal(path: &str) -> bool {
    let bytes = path.as_bytes();
    let mut i = 0;
    while let Some(off) = bytes[i..].iter().position(|b| *b == b'%') {
        let at = i + off;
        match escape_at(bytes, at) {
            Some((byte, upper)) if upper && !is_unreserved(byte) => i = at + 3,
            _ => return false,
        }
    }
    let mut segments = path.split('/').peekable();
    let mut first = true;
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        // An empty first segment is the leading slash, an empty last one the trailing slash.
        if (segment.is_empty() && !first && !last) || segment == "." || segment == ".." {
            return false;
        }
        first = false;
    }
    true
}

/// The byte a well-formed `%XX` escape at `at` stands for, and whether its hex digits are
/// already uppercase.
fn escape_at(bytes: &[u8], at: usize) -> Option<(u8, bool)> {
    let hi = *bytes.get(at + 1)?;
    let lo = *bytes.get(at + 2)?;
    let value = (hex(hi)? << 4) | hex(lo)?;
    let upper = !hi.is_ascii_lowercase() && !lo.is_ascii_lowercase();
    Some((value, upper))
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §2.3.
pub(crate) fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes unreserved escapes, uppercases the others, and escapes a stray `%` as `%25`
/// (otherwise `%%341` would decode to `%41`, and normalizing twice would differ from once).
fn decode_unreserved(path: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len() + 4);
    let mut start = 0;
    let mut i = 0;
    while let Some(off) = bytes[i..].iter().position(|b| *b == b'%') {
        let at = i + off;
        // `%` is ASCII, so `at` is a char boundary.
        out.push_str(&path[start..at]);
        match escape_at(bytes, at) {
            Some((byte, _)) if is_unreserved(byte) => {
                out.push(char::from(byte));
                i = at + 3;
            }
            Some((byte, _)) => {
                out.push('%');
                out.push(char::from(HEX[usize::from(byte >> 4)]));
                out.push(char::from(HEX[usize::from(byte & 0xf)]));
                i = at + 3;
            }
            None => {
                out.push_str("%25");
                i = at + 1;
            }
        }
        start = i;
    }
    out.push_str(&path[start..]);
    out
}

/// Drops empty and `.` segments and lets `..` remove the segment before it (never above
/// the root); keeps a leading and a trailing slash.
fn remove_dot_segments(path: &str) -> String {
    let absolute = path.starts_with('/');
    let body = if absolute { &path[1..] } else { path };
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing = false;
    for segment in body.split('/') {
        // A path ending in `/`, `/.` or `/..` names a directory: keep it one.
        trailing = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                kept.pop();
            }
            s => kept.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    if absolute {
        out.push('/');
    }
    for (i, segment) in kept.iter().enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(segment);
    }
    if trailing && !kept.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn clean_paths_are_borrowed() {
        for path in [
            "/",
            "/api",
            "/api/",
            "/api/v1/orders/42",
            "/a%2Fb",
            "/API",
            "",
            "*",
        ] {
            assert!(
                matches!(normalize_path(path), Cow::Borrowed(_)),
                "{path} was copied"
            );
        }
    }

    #[test]
    fn paths_are_normalized() {
        let cases = [
            ("/%61pi", "/api"),
            ("/%7Euser/%2d", "/~user/-"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2Fb", "/a%2Fb"),
            ("/%e2%82%ac", "/%E2%82%AC"),
            ("/./api", "/api"),
            ("/api/..", "/"),
            ("/api/.", "/api/"),
            ("/../x", "/x"),
            ("/a/b/../../../c", "/c"),
            ("//api", "/api"),
            ("/api//v1///x", "/api/v1/x"),
            ("/api/v1/../v2/", "/api/v2/"),
            ("/%2E%2E/secret", "/secret"),
            ("/a/%2e/b", "/a/b"),
            ("/100%", "/100%25"),
            ("/%zz", "/%25zz"),
            ("/%%341", "/%2541"),
            ("/API", "/API"),
            ("/..", "/"),
            ("//", "/"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_path(input), want, "normalize_path({input:?})");
        }
    }

    fn has_bad_segment(path: &str) -> bool {
        path.contains("//")
            || path.contains("/./")
            || path.contains("/../")
            || path.ends_with("/.")
            || path.ends_with("/..")
    }

    proptest! {
        #[test]
        fn normalizing_is_idempotent_and_leaves_no_dot_or_empty_segments(
            path in "(/|/\\.|/\\.\\.|/%[0-9a-fA-F]{2}|%|/[a-zA-Z0-9._~-]{0,4}|/é)*",
        ) {
            let once = normalize_path(&path).into_owned();
            let twice = normalize_path(&once);
            prop_assert_eq!(&once, &*twice);
            prop_assert!(matches!(twice, Cow::Borrowed(_)));
            prop_assert!(!has_bad_segment(&once), "{:?} -> {:?}", path, once);
        }

        #[test]
        fn any_string_normalizes_without_panicking(path in any::<String>()) {
            let once = normalize_path(&path).into_owned();
            prop_assert_eq!(&once, &*normalize_path(&once));
        }
    }
}
