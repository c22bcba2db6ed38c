//! Live request tapping: the admin port's `/tap` streams one JSON line per request the
//! proxy finishes, as its access log would write it, to a loopback client
//! (`kubectl weft tap`), whether or not the pod has an access log.
//!
//! ```text
//! request path ──open() == 0? done (one relaxed load)
//!              └─ else, at the end of the response body: offer(&Entry)
//!                    ──matching taps──▶ bounded queue per tap (1,024) ──▶ /tap body
//!                                       full: dropped, counted, reported at the end
//! ```
//!
//! A tap is bounded three ways, so a forgotten one ends by itself: at most [`MAX_TAPS`]
//! open at once (429 beyond), at most `max` requests (default [`DEFAULT_MAX_EVENTS`]) and
//! at most `duration` (default [`DEFAULT_DURATION`]). Its last line says why it ended and
//! how many lines a slow reader cost: `{"tapEnd":{"events":…,"dropped":…,"why":…}}`.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

use crate::access_log::Entry;

/// Taps open at once on one proxy; one more is refused (429).
pub const MAX_TAPS: usize = 4;

/// Requests a tap shows when it does not say.
pub const DEFAULT_MAX_EVENTS: u64 = 1_000;

/// The most requests one tap may ask for.
pub const MAX_EVENTS: u64 = 100_000;

/// How long a tap lasts when it does not say.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(60);

/// The longest a tap may last.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 60);

/// Lines queued for one tap's reader; more are dropped and counted.
pub const QUEUE: usize = 1_024;

/// The longest filter value (authority, path prefix, method) a tap takes.
const MAX_VALUE_LEN: usize = 1_024;

/// Why a tap was not opened; the admin port answers 400, or 429 for [`TapError::TooMany`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TapError {
    /// A query parameter `/tap` does not take.
    #[error(
        "unknown parameter {0:?}; /tap takes direction, method, authority, path, max and duration"
    )]
    UnknownParam(String),
    /// A parameter's value does not parse.
    #[error("{param}={value:?}: {why}")]
    BadValue {
        /// The parameter.
        param: &'static str,
        /// Its value, as given.
        value: String,
        /// What it should be.
        why: String,
    },
    /// [`MAX_TAPS`] taps are open already.
    #[error("{MAX_TAPS} taps are open on this proxy already; try again when one ends")]
    TooMany,
}

/// Which requests a tap shows: each condition given must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// `inbound` or `outbound`.
    pub direction: Option<&'static str>,
    /// The method, exactly (`GET`).
    pub method: Option<String>,
    /// The authority exactly, or its host without the port.
    pub authority: Option<String>,
    /// A prefix of the path (as the client sent it, without the query).
    pub path: Option<String>,
}

impl Filter {
    /// Whether `entry` is one of the requests this filter shows.
    pub fn matches(&self, entry: &Entry) -> bool {
        self.direction.is_none_or(|d| d == entry.direction)
            && self.method.as_ref().is_none_or(|m| *m == entry.method)
            && self.authority.as_ref().is_none_or(|a| {
                *a == entry.authority
                    || entry
                        .authority
                        .rsplit_once(':')
                        .is_some_and(|(host, port)| {
                            host == a && port.bytes().all(|b| b.is_ascii_digit())
                        })
            })
            && self
                .path
                .as_ref()
                .is_none_or(|p| entry.path.starts_with(p.as_str()))
    }
}

/// What one `/tap` asks for, parsed from its query string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapRequest {
    /// Which requests.
    pub filter: Filter,
    /// How many at most.
    pub max: u64,
    /// For how long at most.
    pub duration: Duration,
}

impl TapRequest {
    /// Parses `/tap`'s query string (`direction=inbound&path=%2Fapi&max=50&duration=5m`),
    /// percent-decoded; every parameter is optional, a repeated one counts last.
    pub fn parse(query: Option<&str>) -> Result<TapRequest, TapError> {
        let mut tap = TapRequest {
            filter: Filter::default(),
            max: DEFAULT_MAX_EVENTS,
            duration: DEFAULT_DURATION,
        };
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (key, raw) = pair.split_once('=').unwrap_or((pair, ""));
            let value = |param: &'static str| -> Result<String, TapError> {
                let bad = |why: &str| TapError::BadValue {
                    param,
                    value: raw.to_owned(),
                    why: why.to_owned(),
                };
                let v = percent_decode(raw).ok_or_else(|| bad("not percent-encoded UTF-8"))?;
                if v.is_empty() {
                    return Err(bad("empty; leave the parameter out instead"));
                }
                if v.len() > MAX_VALUE_LEN {
                    return Err(bad(&format!("longer than {MAX_VALUE_LEN} bytes")));
                }
                Ok(v)
            };
            match key {
                "direction" => {
                    let v = value("direction")?;
                    tap.filter.direction = Some(match v.as_str() {
                        "inbound" => "inbound",
                        "outbound" => "outbound",
                        _ => {
                            return Err(TapError::BadValue {
                                param: "direction",
                                value: v,
                                why: "inbound or outbound".to_owned(),
                            });
                        }
                    });
                }
                "method" => {
                    let v = value("method")?;
                    if http::Method::from_bytes(v.as_bytes()).is_err() {
                        return Err(TapError::BadValue {
                            param: "method",
                            value: v,
                            why: "not an HTTP method".to_owned(),
                        });
                    }
                    tap.filter.method = Some(v);
                }
                "authority" => tap.filter.authority = Some(value("authority")?),
                "path" => {
                    let v = value("path")?;
                    if !v.starts_with('/') {
                        return Err(TapError::BadValue {
                            param: "path",
                            value: v,
                            why: "a path prefix starts with /".to_owned(),
                        });
                    }
                    tap.filter.path = Some(v);
                }
                "max" => {
                    let v = value("max")?;
                    tap.max = v
                        .parse::<u64>()
                        .ok()
                        .filter(|n| (1..=MAX_EVENTS).contains(n))
                        .ok_or_else(|| TapError::BadValue {
                            param: "max",
                            value: v,
                            why: format!("a number of requests from 1 to {MAX_EVENTS}"),
                        })?;
                }
                "duration" => {
                    let v = value("duration")?;
                    let d = v
                        .parse::<weft_api::Duration>()
                        .map_err(|e| TapError::BadValue {
                            param: "duration",
                            value: v.clone(),
                            why: e.to_string(),
                        })?
                        .as_std();
                    if d.is_zero() || d > MAX_DURATION {
                        return Err(TapError::BadValue {
                            param: "duration",
                            value: v,
                            why: format!(
                                "more than zero and at most {}",
                                weft_api::Duration::from(MAX_DURATION).as_str()
                            ),
                        });
                    }
                    tap.duration = d;
                }
                other => return Err(TapError::UnknownParam(other.to_owned())),
            }
        }
        Ok(tap)
    }
}

/// `%XX` decoded; `None` for a malformed escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// What a tap's reader and the request path share: its counts.
#[derive(Debug, Default)]
struct Counts {
    /// Requests that matched (queued or dropped).
    matched: AtomicU64,
    /// Requests that matched while the queue was full.
    dropped: AtomicU64,
}

/// One open tap, as the request path sees it.
#[derive(Debug)]
struct Sink {
    id: u64,
    filter: Filter,
    max: u64,
    tx: mpsc::Sender<Bytes>,
    counts: Arc<Counts>,
}

/// The proxy's open taps.
#[derive(Debug, Default)]
pub struct Taps {
    /// `sinks.len()`, read without the lock: the request path's only cost with no tap open.
    open: AtomicUsize,
    sinks: Mutex<Vec<Sink>>,
    next_id: AtomicU64,
}

impl Taps {
    /// Whether any tap is open: requests started while none is are not offered.
    #[inline]
    pub fn active(&self) -> bool {
        self.open.load(Ordering::Relaxed) != 0
    }

    /// Taps open now.
    pub fn open_count(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Opens a tap: the body that streams its lines until it ends (`draining`: the proxy
    /// shutting down ends it too).
    pub fn open(
        self: &Arc<Self>,
        request: TapRequest,
        draining: tokio_util::sync::CancellationToken,
    ) -> Result<TapBody, TapError> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let counts = Arc::new(Counts::default());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut sinks = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
            if sinks.len() >= MAX_TAPS {
                return Err(TapError::TooMany);
            }
            sinks.push(Sink {
                id,
                filter: request.filter,
                max: request.max,
                tx,
                counts: counts.clone(),
            });
            self.open.store(sinks.len(), Ordering::Relaxed);
        }
        Ok(TapBody {
            rx,
            deadline: Box::pin(tokio::time::sleep(request.duration)),
            draining: Box::pin(draining.cancelled_owned()),
            counts,
            taps: self.clone(),
            id,
            sent: 0,
            ended: false,
        })
    }

    /// Hands a finished request's line to every open tap it matches; a tap that has seen
    /// its `max` is closed (its reader ends once it has read what is queued).
    pub fn offer(&self, entry: &Entry) {
        let mut sinks = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
        let mut line: Option<Bytes> = None;
        let mut full = false;
        for sink in sinks.iter() {
            if !sink.filter.matches(entry) {
                continue;
            }
            let n = sink.counts.matched.fetch_add(1, Ordering::Relaxed) + 1;
            full |= n >= sink.max;
            let line = match &line {
                Some(l) => l.clone(),
                None => {
                    let mut buf = Vec::with_capacity(320);
                    if serde_json::to_writer(&mut buf, entry).is_err() {
                        return;
                    }
                    buf.push(b'\n');
                    line.insert(Bytes::from(buf)).clone()
                }
            };
            if sink.tx.try_send(line).is_err() {
                sink.counts.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        if full {
            sinks.retain(|s| s.counts.matched.load(Ordering::Relaxed) < s.max);
            self.open.store(sinks.len(), Ordering::Relaxed);
        }
    }

    fn close(&self, id: u64) {
        let mut sinks = self.sinks.lock().unwrap_or_else(|p| p.into_inner());
        sinks.retain(|s| s.id != id);
        self.open.store(sinks.len(), Ordering::Relaxed);
    }
}

/// Why a tap ended, as its last line says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    Max,
    Duration,
    Shutdown,
}

impl Why {
    fn as_str(self) -> &'static str {
        match self {
            Why::Max => "max",
            Why::Duration => "duration",
            Why::Shutdown => "shutdown",
        }
    }
}

/// The body of a `/tap` answer: the lines as requests finish, then the end line. Dropped
/// (the reader went away), it closes its tap.
pub struct TapBody {
    rx: mpsc::Receiver<Bytes>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    draining: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    counts: Arc<Counts>,
    taps: Arc<Taps>,
    id: u64,
    sent: u64,
    ended: bool,
}

impl TapBody {
    fn end(&mut self, why: Why) -> Bytes {
        self.ended = true;
        self.taps.close(self.id);
        // What arrived before the end is still the reader's.
        let mut out = BytesMut::new();
        while let Ok(line) = self.rx.try_recv() {
            self.sent += 1;
            out.extend_from_slice(&line);
        }
        let end = serde_json::json!({"tapEnd": {
            "events": self.sent,
            "dropped": self.counts.dropped.load(Ordering::Relaxed),
            "why": why.as_str(),
        }});
        out.extend_from_slice(end.to_string().as_bytes());
        out.extend_from_slice(b"\n");
        out.freeze()
    }
}

impl Drop for TapBody {
    fn drop(&mut self) {
        if !self.ended {
            self.taps.close(self.id);
        }
    }
}

impl Body for TapBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(first)) => {
                this.sent += 1;
                // What else is queued goes in the same frame: one write, not one per line.
                let mut out = BytesMut::from(&first[..]);
                while out.len() < 64 * 1024 {
                    match this.rx.try_recv() {
                        Ok(line) => {
                            this.sent += 1;
                            out.extend_from_slice(&line);
                        }
                        Err(_) => break,
                    }
                }
                return Poll::Ready(Some(Ok(Frame::data(out.freeze()))));
            }
            // Closed by `offer` once `max` requests matched, and all of them read.
            Poll::Ready(None) => return Poll::Ready(Some(Ok(Frame::data(this.end(Why::Max))))),
            Poll::Pending => {}
        }
        if this.draining.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Ok(Frame::data(this.end(Why::Shutdown)))));
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Ok(Frame::data(this.end(Why::Duration)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn entry(direction: &'static str, method: &str, authority: &str, path: &str) -> Entry {
        Entry {
            direction,
            method: method.to_owned(),
            authority: authority.to_owned(),
            path: path.to_owned(),
            status: 200,
            ..Entry::default()
        }
    }

    #[test]
    fn queries_parse_with_defaults_and_bad_values_are_named() {
        let t = TapRequest::parse(None).unwrap();
        assert_eq!(t.max, DEFAULT_MAX_EVENTS);
        assert_eq!(t.duration, DEFAULT_DURATION);
        assert_eq!(t.filter, Filter::default());

        let t = TapRequest::parse(Some(
            "direction=inbound&method=POST&authority=web.shop&path=%2Fapi%20v1&max=5&duration=1m30s",
        ))
        .unwrap();
        assert_eq!(t.filter.direction, Some("inbound"));
        assert_eq!(t.filter.method.as_deref(), Some("POST"));
        assert_eq!(t.filter.authority.as_deref(), Some("web.shop"));
        assert_eq!(t.filter.path.as_deref(), Some("/api v1"));
        assert_eq!((t.max, t.duration), (5, Duration::from_secs(90)));

        for (query, says) in [
            ("direction=sideways", "inbound or outbound"),
            ("max=0", "from 1 to 100000"),
            ("max=100001", "from 1 to 100000"),
            ("max=-1", "from 1 to"),
            ("duration=0s", "more than zero"),
            ("duration=31m", "at most 30m"),
            ("duration=5", "duration"),
            ("path=api", "starts with /"),
            ("method=GE%20T", "not an HTTP method"),
            ("path=%2", "percent-encoded"),
            ("path=%FF", "percent-encoded"),
            ("authority=", "empty"),
        ] {
            let e = TapRequest::parse(Some(query)).unwrap_err().to_string();
            assert!(e.contains(says), "{query}: {e}");
        }
        assert_eq!(
            TapRequest::parse(Some("status=500")),
            Err(TapError::UnknownParam("status".to_owned()))
        );
        let long = format!("path=/{}", "a".repeat(MAX_VALUE_LEN));
        assert!(TapRequest::parse(Some(&long)).is_err());
    }

    #[test]
    fn filters_match_every_condition_given() {
        let e = entry("inbound", "GET", "web.shop:8080", "/api/items");
        let all = Filter::default();
        assert!(all.matches(&e));
        let f = |direction, method: &str, authority: &str, path: &str| Filter {
            direction,
            method: (!method.is_empty()).then(|| method.to_owned()),
            authority: (!authority.is_empty()).then(|| authority.to_owned()),
            path: (!path.is_empty()).then(|| path.to_owned()),
        };
        assert!(f(Some("inbound"), "GET", "web.shop", "/api").matches(&e));
        assert!(f(None, "", "web.shop:8080", "/api/items").matches(&e));
        assert!(!f(Some("outbound"), "", "", "").matches(&e));
        assert!(!f(None, "POST", "", "").matches(&e));
        assert!(!f(None, "", "web", "").matches(&e));
        assert!(!f(None, "", "web.shop:80", "").matches(&e));
        assert!(!f(None, "", "", "/apx").matches(&e));
    }

    async fn read_all(mut body: TapBody) -> String {
        let mut out = String::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            out.push_str(std::str::from_utf8(frame.data_ref().unwrap()).unwrap());
        }
        out
    }

    /// A tap shows what matches, ends after `max` with its count, and leaves the proxy
    /// with no tap open (so requests are no longer offered).
    #[tokio::test]
    async fn a_tap_ends_at_its_max_and_closes_itself() {
        let taps = Arc::new(Taps::default());
        let body = taps
            .open(
                TapRequest::parse(Some("method=GET&max=2")).unwrap(),
                tokio_util::sync::CancellationToken::new(),
            )
            .unwrap();
        assert!(taps.active());
        taps.offer(&entry("outbound", "POST", "a", "/skipped"));
        taps.offer(&entry("outbound", "GET", "a", "/one"));
        taps.offer(&entry("inbound", "GET", "a", "/two"));
        assert!(!taps.active(), "closed once max requests matched");
        taps.offer(&entry("inbound", "GET", "a", "/three"));
        let text = read_all(body).await;
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0]["path"], "/one");
        assert_eq!(lines[1]["path"], "/two");
        assert_eq!(
            lines[2]["tapEnd"],
            serde_json::json!({"events": 2, "dropped": 0, "why": "max"})
        );
    }

    /// Beyond [`MAX_TAPS`] a tap is refused; a reader that goes away frees its place; a
    /// reader that does not read costs lines (counted), never a wait.
    #[tokio::test(start_paused = true)]
    async fn taps_are_bounded_in_number_time_and_queue() {
        let taps = Arc::new(Taps::default());
        let token = tokio_util::sync::CancellationToken::new();
        let open = |q: &str| taps.open(TapRequest::parse(Some(q)).unwrap(), token.clone());
        let mut bodies: Vec<TapBody> = (0..MAX_TAPS).map(|_| open("max=100000").unwrap()).collect();
        assert_eq!(open("").err(), Some(TapError::TooMany));
        drop(bodies.pop());
        assert_eq!(taps.open_count(), MAX_TAPS - 1);
        let slow = open("duration=2s&max=5000").unwrap();
        for _ in 0..(QUEUE + 10) {
            taps.offer(&entry("inbound", "GET", "a", "/"));
        }
        let text = read_all(slow).await;
        let end: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(
            end["tapEnd"],
            serde_json::json!({"events": QUEUE, "dropped": 10, "why": "duration"})
        );
        assert_eq!(taps.open_count(), MAX_TAPS - 1);

        token.cancel();
        for body in bodies {
            let text = read_all(body).await;
            assert!(text.ends_with("\"why\":\"shutdown\"}}\n"), "{text}");
        }
        assert!(!taps.active());
    }
}
