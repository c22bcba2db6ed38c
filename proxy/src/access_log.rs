//! Access logs: one line per request, JSON or text, off unless the pod asks for them
//! (annotation `weft.dev/access-log`, which the injector turns into `WEFT_ACCESS_LOG`).
//!
//! ```text
//! request path ──try_send(Entry)──▶ bounded queue (4,096) ──writer thread──▶ stdout
//!                  full: dropped and counted (weft_access_log_dropped_total)
//! ```
//!
//! The request path never waits for the log: it hands a plain [`Entry`] to a bounded
//! queue, and a thread of its own wakes every [`FLUSH_INTERVAL`] to format and write what
//! has queued, so a slow or blocked stdout costs lines (counted), never latency.

use std::{
    io::Write,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel},
    },
    time::{Duration, SystemTime},
};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::metrics::Direction;

/// Lines waiting for the writer; more are dropped.
pub const QUEUE: usize = 4096;

/// How lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// `key=value` pairs, space-separated (logfmt).
    Text,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(Format::Json),
            "text" => Ok(Format::Text),
            other => Err(format!("{other:?}: expected json or text")),
        }
    }
}

/// One request, as logged.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Entry {
    /// When the request arrived, RFC 3339 in UTC.
    #[serde(rename = "timestamp")]
    pub start: Timestamp,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The client's mesh identity, when it presented one over mutual TLS.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "shared_str")]
    pub source_identity: Option<Arc<str>>,
    /// The client's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_addr: Option<IpAddr>,
    /// The identity the chosen endpoint is expected to have (from the config).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_identity: Option<String>,
    /// The request method.
    pub method: String,
    /// `Host` or `:authority`.
    pub authority: String,
    /// The path, without the query string (which may carry secrets).
    pub path: String,
    /// The status sent to the client; 0 when none was (the client went away first).
    pub status: u16,
    /// From the request's arrival to the end of its response body, in milliseconds.
    pub duration_ms: f64,
    /// Request body bytes read from the client.
    pub bytes_in: u64,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    /// The endpoint of the last attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<SocketAddr>,
    /// Attempts sent upstream (0 when the proxy answered itself first).
    pub attempts: u32,
    /// The `weft-error` reason, when the proxy answered itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The request's trace: with tracing on, the one the proxy continued or started;
    /// otherwise the W3C `traceparent` trace id, or B3's `x-b3-traceid`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

fn shared_str<S: serde::Serializer>(v: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_str(v),
        None => s.serialize_none(),
    }
}

/// A point in time, written as RFC 3339 in UTC with milliseconds.
#[derive(Clone, Copy, Debug)]
pub struct Timestamp(pub SystemTime);

impl Default for Timestamp {
    fn default() -> Self {
        Timestamp(SystemTime::UNIX_EPOCH)
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let since = self
            .0
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = since.as_secs();
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (y, m, d) = civil_from_days(i64::try_from(days).unwrap_or(0));
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            since.subsec_millis()
        )
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`), so the log needs no date library.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

impl Entry {
    /// The line, without its newline.
    pub fn format(&self, format: Format) -> String {
        let mut out = Vec::with_capacity(256);
        let _ = self.write_to(&mut out, format);
        out.pop();
        String::from_utf8(out).unwrap_or_default()
    }

    /// Writes the line and its newline to `out`, formatting in place.
    pub fn write_to(&self, out: &mut impl Write, format: Format) -> std::io::Result<()> {
        match format {
            Format::Json => {
                serde_json::to_writer(&mut *out, self)?;
            }
            Format::Text => {
                let mut first = true;
                let mut pair = |k: &str, v: &dyn std::fmt::Display| -> std::io::Result<()> {
                    let v = v.to_string();
                    let sep = if first { "" } else { " " };
                    first = false;
                    if v.is_empty() || v.contains([' ', '"', '=']) {
                        write!(out, "{sep}{k}={v:?}")
                    } else {
                        write!(out, "{sep}{k}={v}")
                    }
                };
                pair("timestamp", &self.start)?;
                pair("direction", &self.direction)?;
                if let Some(s) = &self.source_identity {
                    pair("source_identity", s)?;
                }
                if let Some(s) = &self.source_addr {
                    pair("source_addr", s)?;
                }
                if let Some(d) = &self.destination_identity {
                    pair("destination_identity", d)?;
                }
                pair("method", &self.method)?;
                pair("authority", &self.authority)?;
                pair("path", &self.path)?;
                pair("status", &self.status)?;
                pair("duration_ms", &format_args!("{:.3}", self.duration_ms))?;
                pair("bytes_in", &self.bytes_in)?;
                pair("bytes_out", &self.bytes_out)?;
                if let Some(u) = &self.upstream {
                    pair("upstream", u)?;
                }
                pair("attempts", &self.attempts)?;
                if let Some(r) = &self.reason {
                    pair("reason", r)?;
                }
                if let Some(t) = &self.trace_id {
                    pair("trace_id", t)?;
                }
            }
        }
        out.write_all(b"\n")
    }
}

/// The trace id of a request: W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), else
/// B3's `x-b3-traceid`; `None` when neither is present and well formed.
pub fn trace_id(headers: &http::HeaderMap) -> Option<String> {
    if let Some(tp) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        let mut parts = tp.split('-');
        if let (Some(_version), Some(id)) = (parts.next(), parts.next())
            && id.len() == 32
            && id.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Some(id.to_owned());
        }
    }
    headers
        .get("x-b3-traceid")
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            (id.len() == 16 || id.len() == 32) && id.bytes().all(|b| b.is_ascii_hexdigit())
        })
        .map(str::to_owned)
}

/// The access log of one proxy: a bounded queue and the thread that writes it.
#[derive(Debug)]
pub struct AccessLog {
    tx: SyncSender<Entry>,
    written: Counter,
    dropped: Counter,
}

impl AccessLog {
    /// Starts the writer thread, writing `format` lines to `out`; `written` and `dropped`
    /// count the lines.
    pub fn start(
        format: Format,
        out: Box<dyn Write + Send>,
        written: Counter,
        dropped: Counter,
    ) -> std::io::Result<Arc<AccessLog>> {
        let (tx, rx) = sync_channel(QUEUE);
        let counted = written.clone();
        std::thread::Builder::new()
            .name("weft-access-log".to_owned())
            .spawn(move || write_lines(rx, format, out, &counted))?;
        Ok(Arc::new(AccessLog {
            tx,
            written,
            dropped,
        }))
    }

    /// Queues one line; when the queue is full, drops it and counts it. Never waits.
    pub fn log(&self, entry: Entry) {
        match self.tx.try_send(entry) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }

    /// Lines written so far.
    pub fn written(&self) -> u64 {
        self.written.get()
    }
}

/// How long the writer sleeps between batches. The request path never wakes it: a thread
/// woken per line (a futex and a context switch per request) would cost more than the
/// line itself.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(20);

fn write_lines(rx: Receiver<Entry>, format: Format, out: Box<dyn Write + Send>, written: &Counter) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    loop {
        std::thread::sleep(FLUSH_INTERVAL);
        let mut n = 0u64;
        let ended = loop {
            match rx.try_recv() {
                Ok(entry) => {
                    if entry.write_to(&mut out, format).is_ok() {
                        n += 1;
                    }
                }
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        if n > 0 && out.flush().is_ok() {
            written.inc_by(n);
        }
        if ended {
            return;
        }
    }
}

/// What a request's path learns for its log line and its span while it runs.
#[derive(Debug, Default)]
pub struct Trail {
    /// Attempts sent upstream.
    pub attempts: u32,
    /// The last attempt's endpoint.
    pub upstream: Option<SocketAddr>,
    /// The identity that endpoint is expected to have.
    pub destination_identity: Option<String>,
    /// The Route and rule the request matched (for the span).
    pub route: Option<(Arc<str>, Arc<str>)>,
    /// Each attempt, when the request's span is recorded.
    pub events: Option<Vec<crate::trace::AttemptEvent>>,
    /// The trace context to write into the request once it has passed the checks.
    pub propagate: Option<crate::trace::Propagate>,
}

/// A request's [`Trail`] and its [`Pending`] line and span while it waits for its answer.
/// Dropped with the pending part still in it, the client went away first (and the request
/// was cancelled upstream): the line is written with status 0 and the span ended, with
/// the attempts made so far.
#[derive(Debug)]
pub struct Waiting {
    /// Filled in by the request's stages.
    pub trail: Trail,
    /// Taken out once the answer is there.
    pub pending: Option<Pending>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut pending) = self.pending.take() {
            pending.record(&mut self.trail, 0, None, None);
            pending.finish(0);
        }
    }
}

/// A request's line and where it goes once complete.
#[derive(Debug)]
pub struct Line {
    /// The line so far.
    pub entry: Entry,
    /// The pod's access log, when it has one.
    pub log: Option<Arc<AccessLog>>,
    /// The proxy's taps, when one was open as the request arrived.
    pub taps: Option<Arc<crate::tap::Taps>>,
}

/// What waits for the end of a response body: the log line (for `bytes_out` and the
/// duration) and the span.
#[derive(Debug)]
pub struct Pending {
    /// The line so far, and where it goes, with an access log or a tap open.
    pub line: Option<Line>,
    /// The span, when the request is sampled.
    pub span: Option<crate::trace::OpenSpan>,
    /// When the request arrived.
    pub started: std::time::Instant,
    /// Request body bytes, counted while the upstream reads them.
    pub bytes_in: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl Pending {
    /// Records the answer (`status` 0: none, the client went away first), its `weft-error`
    /// reason and the peer's identity, and what the request's stages left in `trail`, into
    /// the line and the span.
    pub fn record(
        &mut self,
        trail: &mut Trail,
        status: u16,
        reason: Option<String>,
        peer_identity: Option<String>,
    ) {
        if let Some(span) = &mut self.span {
            let r = &mut span.record;
            r.status = status;
            r.reason.clone_from(&reason);
            r.attempts = trail.attempts;
            r.upstream = trail.upstream;
            r.peer_identity = peer_identity;
            r.route = trail.route.take();
            r.events = trail.events.take().unwrap_or_default();
        }
        if let Some(Line { entry, .. }) = &mut self.line {
            entry.status = status;
            entry.reason = reason;
            entry.attempts = trail.attempts;
            entry.upstream = trail.upstream;
            entry.destination_identity = trail.destination_identity.take();
        }
    }

    /// Completes and queues the line, with `bytes_out` response body bytes sent, and
    /// ends the span.
    pub fn finish(self, bytes_out: u64) {
        if let Some(Line {
            mut entry,
            log,
            taps,
        }) = self.line
        {
            entry.bytes_out = bytes_out;
            entry.duration_ms = elapsed_ms(self.started.elapsed());
            if let Some(n) = &self.bytes_in {
                entry.bytes_in = n.load(std::sync::atomic::Ordering::Relaxed);
            }
            if let Some(taps) = taps {
                taps.offer(&entry);
            }
            if let Some(log) = log {
                log.log(entry);
            }
        }
        if let Some(span) = self.span {
            span.finish();
        }
    }
}

fn elapsed_ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The `direction` field.
pub fn direction(d: Direction) -> &'static str {
    d.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_000_000_123);
        assert_eq!(Timestamp(t).to_string(), "2026-11-30T00:53:20.123Z");
        assert_eq!(
            Timestamp(SystemTime::UNIX_EPOCH).to_string(),
            "1970-01-01T00:00:00.000Z"
        );
        // A leap day.
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(Timestamp(leap).to_string(), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn trace_ids_come_from_traceparent_then_b3() {
        let mut h = http::HeaderMap::new();
        assert_eq!(trace_id(&h), None);
        h.insert("x-b3-traceid", "463ac35c9f6413ad".parse().unwrap());
        assert_eq!(trace_id(&h).as_deref(), Some("463ac35c9f6413ad"));
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            trace_id(&h).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        h.insert("traceparent", "garbage".parse().unwrap());
        assert_eq!(trace_id(&h).as_deref(), Some("463ac35c9f6413ad"));
    }

    #[test]
    fn text_lines_quote_what_would_split_them() {
        let e = Entry {
            direction: "inbound",
            method: "GET".into(),
            authority: "web".into(),
            path: "/a b".into(),
            status: 200,
            reason: Some("rate_limited".into()),
            ..Entry::default()
        };
        let line = e.format(Format::Text);
        assert!(line.contains(r#"path="/a b""#), "{line}");
        assert!(line.contains("reason=rate_limited"), "{line}");
        let json: serde_json::Value = serde_json::from_str(&e.format(Format::Json)).unwrap();
        assert_eq!(json["status"], 200);
        assert_eq!(json["path"], "/a b");
        assert!(json.get("upstream").is_none());
    }

    /// A sink that is never read stalls the writer: lines beyond the queue are dropped and
    /// counted, and logging returns at once.
    #[test]
    fn a_stalled_writer_costs_lines_not_waiting() {
        struct Stalled(std::sync::mpsc::Receiver<()>);
        impl Write for Stalled {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                let _ = self.0.recv();
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (release, wait) = std::sync::mpsc::channel();
        let dropped = Counter::default();
        let log = AccessLog::start(
            Format::Json,
            Box::new(Stalled(wait)),
            Counter::default(),
            dropped.clone(),
        )
        .unwrap();
        let started = std::time::Instant::now();
        for _ in 0..(QUEUE * 4) {
            log.log(Entry::default());
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(dropped.get() >= QUEUE as u64, "dropped {}", dropped.get());
        drop(release);
    }
}
