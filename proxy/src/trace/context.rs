//! Trace context on the wire, without I/O: reading W3C `traceparent`/`tracestate` and B3
//! (single `b3` and multi `x-b3-*` headers) from a request, and writing the context of the
//! proxy's own span back into it.
//!
//! ```text
//! incoming headers ──Incoming::read──▶ Incoming { trace id, parent span, sampled?, formats }
//!      ──Hop::continue_or_start──▶ Hop { trace id, this hop's span id, parent, sampled }
//!      ──Hop::write──▶ outgoing headers: traceparent always, B3 in the forms that came in
//! ```
//!
//! Precedence when several are present: `traceparent`, then `b3`, then `x-b3-*` (a
//! malformed one is ignored, as if absent). `tracestate` is passed on untouched, and
//! removed when the context did not come from a valid `traceparent` (W3C says so).

use http::{HeaderMap, HeaderName, HeaderValue};

/// W3C trace context.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// W3C vendor state, carried with `traceparent`.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// B3, single-header form.
pub const B3: HeaderName = HeaderName::from_static("b3");
/// B3 multi-header: the trace id.
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
/// B3 multi-header: the caller's span id.
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
/// B3 multi-header: the caller's parent span id.
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
/// B3 multi-header: the sampling decision (`1`/`0`).
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
/// B3 multi-header: `1` is the debug flag (sampled, and forced).
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// A 128-bit trace id; never all zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// A 64-bit span id; never all zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    /// A random id.
    pub fn random(rng: &mut impl rand::Rng) -> Self {
        loop {
            let id: [u8; 16] = rng.random();
            if id != [0; 16] {
                return TraceId(id);
            }
        }
    }

    /// Lower-case hex, 32 digits.
    pub fn to_hex(self) -> String {
        hex(&self.0)
    }
}

impl SpanId {
    /// A random id.
    pub fn random(rng: &mut impl rand::Rng) -> Self {
        loop {
            let id: [u8; 8] = rng.random();
            if id != [0; 8] {
                return SpanId(id);
            }
        }
    }

    /// Lower-case hex, 16 digits.
    pub fn to_hex(self) -> String {
        hex(&self.0)
    }
}

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Display for SpanId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// What the caller decided about sampling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampled {
    /// Record this trace.
    Yes,
    /// Do not record it.
    No,
    /// B3's debug flag: record it, whatever the sampling rate.
    Debug,
    /// No decision (B3 lets the receiver decide): the proxy's sampling rate does.
    Deferred,
}

/// The trace context a request arrived with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Incoming {
    /// The trace and the caller's span, when the request carried valid ids.
    pub ids: Option<(TraceId, SpanId)>,
    /// The caller's decision.
    pub sampled: Sampled,
    /// Whether the context came from a valid `traceparent` (so `tracestate` goes on).
    pub w3c: bool,
    /// Whether a `b3` header was present: the proxy writes it back.
    pub b3_single: bool,
    /// Whether `x-b3-*` headers were present: the proxy writes them back.
    pub b3_multi: bool,
}

impl Incoming {
    /// Reads the context of `headers`; none found is `ids: None, sampled: Deferred`.
    pub fn read(headers: &HeaderMap) -> Incoming {
        let b3_single = headers.contains_key(B3);
        let b3_multi = headers.contains_key(B3_TRACE_ID)
            || headers.contains_key(B3_SAMPLED)
            || headers.contains_key(B3_FLAGS);
        let mut incoming = Incoming {
            ids: None,
            sampled: Sampled::Deferred,
            w3c: false,
            b3_single,
            b3_multi,
        };
        if let Some((trace, span, sampled)) = headers
            .get(TRACEPARENT)
            .and_then(|v| parse_traceparent(v.as_bytes()))
        {
            incoming.ids = Some((trace, span));
            incoming.sampled = sampled;
            incoming.w3c = true;
            // W3C has no debug flag: B3's, when it came along, is kept.
            if sampled == Sampled::Yes && b3_debug(headers) {
                incoming.sampled = Sampled::Debug;
            }
            return incoming;
        }
        if b3_single
            && let Some((ids, sampled)) = headers.get(B3).and_then(|v| parse_b3(v.as_bytes()))
        {
            incoming.ids = ids;
            incoming.sampled = sampled;
            return incoming;
        }
        if b3_multi {
            let (ids, sampled) = parse_b3_multi(headers);
            incoming.ids = ids;
            incoming.sampled = sampled;
        }
        incoming
    }
}

/// This proxy's span of one request: its ids and whether it is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hop {
    /// The trace, continued or started here.
    pub trace_id: TraceId,
    /// This hop's span.
    pub span_id: SpanId,
    /// The caller's span, when the trace was continued.
    pub parent: Option<SpanId>,
    /// Whether the trace is recorded (exported).
    pub sampled: bool,
    /// B3's debug flag, carried on.
    pub debug: bool,
}

impl Hop {
    /// Continues the incoming trace, or starts one. The caller's sampling decision holds
    /// when it made one; otherwise the trace is recorded with probability `rate`.
    pub fn continue_or_start(incoming: &Incoming, rate: f64, rng: &mut impl rand::Rng) -> Hop {
        let (sampled, debug) = match incoming.sampled {
            Sampled::Yes => (true, false),
            Sampled::No => (false, false),
            Sampled::Debug => (true, true),
            Sampled::Deferred if rate <= 0.0 => (false, false),
            Sampled::Deferred if rate >= 1.0 => (true, false),
            Sampled::Deferred => (rng.random::<f64>() < rate, false),
        };
        let (trace_id, parent) = match incoming.ids {
            Some((t, s)) => (t, Some(s)),
            None => (TraceId::random(rng), None),
        };
        Hop {
            trace_id,
            span_id: SpanId::random(rng),
            parent,
            sampled,
            debug,
        }
    }

    /// The `traceparent` of requests this hop sends: this hop's span as the parent.
    pub fn traceparent(&self) -> HeaderValue {
        let mut buf = [0u8; 55];
        buf[..3].copy_from_slice(b"00-");
        hex_into(&self.trace_id.0, &mut buf[3..35]);
        buf[35] = b'-';
        hex_into(&self.span_id.0, &mut buf[36..52]);
        buf[52..].copy_from_slice(if self.sampled { b"-01" } else { b"-00" });
        // Hex digits and dashes only: always a valid header value.
        HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// Writes this hop's context into the headers of the request it sends on:
    /// `traceparent` always, B3 in each form the request arrived with.
    pub fn write(&self, incoming: &Incoming, headers: &mut HeaderMap) {
        headers.insert(TRACEPARENT, self.traceparent());
        if !incoming.w3c {
            headers.remove(TRACESTATE);
        }
        let trace = b3_trace_hex(self.trace_id);
        let span = self.span_id.to_hex();
        let state = match (self.debug, self.sampled) {
            (true, _) => "d",
            (false, true) => "1",
            (false, false) => "0",
        };
        if incoming.b3_single {
            let value = match self.parent {
                Some(p) => format!("{trace}-{span}-{state}-{}", p.to_hex()),
                None => format!("{trace}-{span}-{state}"),
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(B3, v);
            }
        }
        if incoming.b3_multi {
            if let Ok(v) = HeaderValue::from_str(&trace) {
                headers.insert(B3_TRACE_ID, v);
            }
            if let Ok(v) = HeaderValue::from_str(&span) {
                headers.insert(B3_SPAN_ID, v);
            }
            match self
                .parent
                .and_then(|p| HeaderValue::from_str(&p.to_hex()).ok())
            {
                Some(v) => {
                    headers.insert(B3_PARENT_SPAN_ID, v);
                }
                None => {
                    headers.remove(B3_PARENT_SPAN_ID);
                }
            }
            if self.debug {
                // Debug implies sampled; B3 says not to send both.
                headers.insert(B3_FLAGS, HeaderValue::from_static("1"));
                headers.remove(B3_SAMPLED);
            } else {
                headers.remove(B3_FLAGS);
                headers.insert(B3_SAMPLED, HeaderValue::from_static(state));
            }
        }
    }
}

/// B3 trace ids are written in 16 digits when the high half is zero (a 64-bit id, as
/// older Zipkin tracers send), else 32.
fn b3_trace_hex(id: TraceId) -> String {
    if id.0[..8] == [0; 8] {
        hex(&id.0[8..])
    } else {
        hex(&id.0)
    }
}

/// `version-traceid-parentid-flags`, version 00 exactly 55 bytes; a later version may
/// append fields after a dash (W3C: parse the part it knows). Lower-case hex only; zero
/// ids and version `ff` are invalid.
fn parse_traceparent(v: &[u8]) -> Option<(TraceId, SpanId, Sampled)> {
    if v.len() < 55 {
        return None;
    }
    let version = unhex::<1>(&v[0..2])?;
    if version[0] == 0xff || (version[0] == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let trace = TraceId(unhex::<16>(&v[3..35])?);
    let span = SpanId(unhex::<8>(&v[36..52])?);
    let flags = unhex::<1>(&v[53..55])?[0];
    if trace.0 == [0; 16] || span.0 == [0; 8] {
        return None;
    }
    let sampled = if flags & 1 == 1 {
        Sampled::Yes
    } else {
        Sampled::No
    };
    Some((trace, span, sampled))
}

type B3Context = (Option<(TraceId, SpanId)>, Sampled);

/// `b3: {traceid}-{spanid}[-{sampled}[-{parentspanid}]]`, or the decision alone
/// (`0`, `1`, `d`).
fn parse_b3(v: &[u8]) -> Option<B3Context> {
    let v = std::str::from_utf8(v).ok()?;
    let mut parts = v.split('-');
    let first = parts.next()?;
    let Some(second) = parts.next() else {
        return Some((None, b3_state(first)?));
    };
    let trace = b3_trace_id(first)?;
    let span = SpanId(unhex::<8>(second.as_bytes())?);
    let sampled = match parts.next() {
        Some(s) => b3_state(s)?,
        None => Sampled::Deferred,
    };
    if let Some(parent) = parts.next() {
        unhex::<8>(parent.as_bytes())?;
    }
    if parts.next().is_some() || span.0 == [0; 8] {
        return None;
    }
    Some((Some((trace, span)), sampled))
}

/// Whether B3 headers carry the debug flag.
fn b3_debug(headers: &HeaderMap) -> bool {
    let single = headers
        .get(B3)
        .and_then(|v| parse_b3(v.as_bytes()))
        .is_some_and(|(_, s)| s == Sampled::Debug);
    single || headers.get(B3_FLAGS).is_some_and(|v| v == "1")
}

fn b3_state(s: &str) -> Option<Sampled> {
    match s {
        "1" => Some(Sampled::Yes),
        "0" => Some(Sampled::No),
        "d" => Some(Sampled::Debug),
        _ => None,
    }
}

fn b3_trace_id(s: &str) -> Option<TraceId> {
    let mut id = [0u8; 16];
    match s.len() {
        32 => id = unhex::<16>(s.as_bytes())?,
        16 => id[8..].copy_from_slice(&unhex::<8>(s.as_bytes())?),
        _ => return None,
    }
    (id != [0; 16]).then_some(TraceId(id))
}

fn parse_b3_multi(headers: &HeaderMap) -> B3Context {
    let get = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let sampled = if get(&B3_FLAGS) == Some("1") {
        Sampled::Debug
    } else {
        match get(&B3_SAMPLED) {
            Some("1" | "true") => Sampled::Yes,
            Some("0" | "false") => Sampled::No,
            _ => Sampled::Deferred,
        }
    };
    let ids = get(&B3_TRACE_ID)
        .and_then(b3_trace_id)
        .zip(get(&B3_SPAN_ID).and_then(|s| unhex::<8>(s.as_bytes())))
        .filter(|(_, s)| *s != [0; 8])
        .map(|(t, s)| (t, SpanId(s)));
    (ids, sampled)
}

/// Lower-case hex of exactly `2 * N` digits.
fn unhex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    hex_into(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_traceparent() {
        let i = Incoming::read(&headers(&[("traceparent", TP)]));
        let (t, s) = i.ids.unwrap();
        assert_eq!(t.to_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(s.to_hex(), "00f067aa0ba902b7");
        assert_eq!(i.sampled, Sampled::Yes);
        assert!(i.w3c);
        let i = Incoming::read(&headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )]));
        assert_eq!(i.sampled, Sampled::No);
        // A later version may add fields.
        let i = Incoming::read(&headers(&[(
            "traceparent",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        )]));
        assert!(i.ids.is_some());
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "garbage",
        ] {
            let i = Incoming::read(&headers(&[("traceparent", bad)]));
            assert_eq!(i.ids, None, "{bad}");
            assert!(!i.w3c, "{bad}");
        }
    }

    #[test]
    fn reads_b3_single_and_multi() {
        let i = Incoming::read(&headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )]));
        assert_eq!(
            i.ids.unwrap().0.to_hex(),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        assert_eq!(i.sampled, Sampled::Yes);
        assert!(i.b3_single && !i.b3_multi && !i.w3c);
        assert_eq!(
            Incoming::read(&headers(&[("b3", "0")])).sampled,
            Sampled::No
        );
        assert_eq!(Incoming::read(&headers(&[("b3", "d")])).ids, None);
        let i = Incoming::read(&headers(&[("b3", "463ac35c9f6413ad-e457b5a2e4d86bd1")]));
        assert_eq!(i.sampled, Sampled::Deferred);
        assert_eq!(
            i.ids.unwrap().0.to_hex(),
            "0000000000000000463ac35c9f6413ad"
        );

        let i = Incoming::read(&headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-flags", "1"),
        ]));
        assert_eq!(i.ids.unwrap().1.to_hex(), "a2fb4a1d1a96d312");
        assert_eq!(i.sampled, Sampled::Debug);
        assert!(i.b3_multi);
        let i = Incoming::read(&headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "false"),
        ]));
        assert_eq!(i.sampled, Sampled::No);
    }

    #[test]
    fn traceparent_wins_over_b3() {
        let i = Incoming::read(&headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("traceparent", TP),
        ]));
        assert_eq!(
            i.ids.unwrap().0.to_hex(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(i.w3c && i.b3_multi);
    }

    #[test]
    fn decisions_hold_and_the_rate_decides_the_rest() {
        let mut rng = rand::rng();
        let sampled = Incoming::read(&headers(&[("traceparent", TP)]));
        assert!(Hop::continue_or_start(&sampled, 0.0, &mut rng).sampled);
        let none = Incoming::read(&HeaderMap::new());
        assert!(!Hop::continue_or_start(&none, 0.0, &mut rng).sampled);
        assert!(Hop::continue_or_start(&none, 1.0, &mut rng).sampled);
        let n = (0..10_000)
            .filter(|_| Hop::continue_or_start(&none, 0.1, &mut rng).sampled)
            .count();
        assert!((700..1300).contains(&n), "{n} of 10000 at 0.1");
        let hop = Hop::continue_or_start(&sampled, 0.0, &mut rng);
        assert_eq!(hop.parent.unwrap().to_hex(), "00f067aa0ba902b7");
        assert_ne!(hop.span_id, hop.parent.unwrap());
    }

    #[test]
    fn writes_traceparent_and_the_b3_forms_that_came_in() {
        let mut h = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "1"),
            ("tracestate", "stale=1"),
        ]);
        let i = Incoming::read(&h);
        let hop = Hop::continue_or_start(&i, 0.0, &mut rand::rng());
        hop.write(&i, &mut h);
        let span = hop.span_id.to_hex();
        assert_eq!(
            h["traceparent"],
            format!("00-0000000000000000463ac35c9f6413ad-{span}-01").as_str()
        );
        assert_eq!(h["x-b3-traceid"], "463ac35c9f6413ad");
        assert_eq!(h["x-b3-spanid"], span.as_str());
        assert_eq!(h["x-b3-parentspanid"], "a2fb4a1d1a96d312");
        assert_eq!(h["x-b3-sampled"], "1");
        assert!(!h.contains_key("b3"));
        // Not from a valid traceparent: the vendor state does not belong to this trace.
        assert!(!h.contains_key("tracestate"));

        let mut h = headers(&[("traceparent", TP), ("tracestate", "v=1"), ("b3", "1")]);
        let i = Incoming::read(&h);
        let hop = Hop::continue_or_start(&i, 0.0, &mut rand::rng());
        hop.write(&i, &mut h);
        assert_eq!(h["tracestate"], "v=1");
        assert_eq!(
            h["b3"],
            format!(
                "4bf92f3577b34da6a3ce929d0e0e4736-{}-1-00f067aa0ba902b7",
                hop.span_id
            )
            .as_str()
        );
        // What the proxy writes, it reads back as the same context.
        let again = Incoming::read(&h);
        assert_eq!(again.ids, Some((hop.trace_id, hop.span_id)));
    }
}
