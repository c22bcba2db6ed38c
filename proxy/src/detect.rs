//! Protocol detection: read a connection's first bytes (with a timeout), classify them as
//! HTTP/1.x, HTTP/2 prior knowledge (which includes gRPC) or anything else, and hand the
//! bytes back through [`PrefixedIo`] so that whoever serves the connection sees them again.
//!
//! ```text
//! client bytes ──read until decided or timeout──▶ Protocol + buffered prefix
//!                                                  └─▶ PrefixedIo(prefix, socket)
//! ```
//!
//! Detection stops as soon as the bytes decide: the 24-byte HTTP/2 preface, or an HTTP/1
//! request line, or any byte that cannot start either. A client that sends nothing within
//! the timeout is treated as opaque TCP.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The most bytes detection reads before deciding "opaque": an HTTP/1 request line
/// longer than this is not worth waiting for.
pub const MAX_DETECT_BYTES: usize = 8 * 1024;

/// What a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP/1 request line (`HTTP/d.d`): 1.0 and 1.1 are served, other versions
    /// refused by the HTTP path.
    Http1,
    /// HTTP/2 with prior knowledge (h2c), including gRPC.
    Http2,
    /// Anything else: proxied as bytes.
    Opaque,
}

/// Classifies a prefix; `None` means more bytes are needed.
pub fn classify(bytes: &[u8]) -> Option<Protocol> {
    if bytes.is_empty() {
        return None;
    }
    if bytes.len() >= H2_PREFACE.len() && bytes.starts_with(H2_PREFACE) {
        return Some(Protocol::Http2);
    }
    if H2_PREFACE.starts_with(bytes) {
        // "PRI" could still become an h2 preface (or, in theory, an HTTP/1 PRI request).
        return None;
    }
    // Detection reads no more than this: whatever is undecided by then is decided now.
    let full = bytes.len() >= MAX_DETECT_BYTES;
    // RFC 9112 §2.2: a server should ignore empty lines before the request line, and
    // hyper's parser skips them. Detection does too, or such a request would go to the
    // application as opaque bytes, past every HTTP rule.
    let mut bytes = bytes;
    while let Some(rest) = bytes
        .strip_prefix(b"\r\n")
        .or_else(|| bytes.strip_prefix(b"\n"))
    {
        bytes = rest;
    }
    if bytes.is_empty() || bytes == b"\r" {
        return full.then_some(Protocol::Opaque);
    }
    // An HTTP/1 request line: method SP request-target SP HTTP-version CRLF, where a bare
    // LF ends a line too (RFC 9112 §2.2 lets a recipient accept it, and hyper does).
    let method_end = bytes.iter().position(|b| *b == b' ');
    let method = &bytes[..method_end.unwrap_or(bytes.len())];
    if method.is_empty() || method.len() > 16 || !method.iter().all(|b| is_tchar(*b)) {
        return Some(Protocol::Opaque);
    }
    match bytes.iter().position(|b| *b == b'\n') {
        Some(eol) => {
            let line = &bytes[..eol];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            // Any `HTTP/d.d`, so that the HTTP path answers a version it does not serve
            // (400) rather than passing the request to the application as bytes, past
            // every HTTP rule.
            if is_http_version(line.get(line.len().saturating_sub(9)..).unwrap_or(line)) {
                Some(Protocol::Http1)
            } else {
                Some(Protocol::Opaque)
            }
        }
        // A request line longer than detection waits for is still HTTP/1 when it reads as
        // one so far (method, one space, target characters): treating it as opaque would
        // forward it raw, past every HTTP rule and limit, where the HTTP path answers 414.
        None if full => {
            let target = method_end.and_then(|end| bytes.get(end + 1..));
            if target.is_some_and(|t| t.iter().all(|b| b.is_ascii_graphic())) {
                Some(Protocol::Http1)
            } else {
                Some(Protocol::Opaque)
            }
        }
        None => None,
    }
}

/// Whether `tail` is ` HTTP/d.d`.
fn is_http_version(tail: &[u8]) -> bool {
    matches!(tail, [b' ', b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
        if major.is_ascii_digit() && minor.is_ascii_digit())
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reads from `io` until [`classify`] decides, EOF, or `timeout`. Returns the protocol and
/// every byte read.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    timeout: Duration,
) -> io::Result<(Protocol, Bytes)> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_elapsed) => return Ok((Protocol::Opaque, buf.freeze())),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => {
                let p = classify(&buf).unwrap_or(Protocol::Opaque);
                return Ok((p, buf.freeze()));
            }
            Ok(Ok(_)) => {
                if let Some(p) = classify(&buf) {
                    return Ok((p, buf.freeze()));
                }
            }
        }
    }
}

/// A connection whose first bytes were already read: reads replay them, then continue
/// from the socket; writes go straight to the socket.
#[derive(Debug)]
pub struct PrefixedIo<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> PrefixedIo<I> {
    /// Replays `prefix` before reading from `inner`.
    pub fn new(prefix: Bytes, inner: I) -> Self {
        PrefixedIo { prefix, inner }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for PrefixedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // Release the detection buffer: the connection may stay open for hours.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn classifies_requests_and_other_bytes() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: a\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"POST /x?y HTTP/1.0\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"PRI * HTTP"), None);
        assert_eq!(classify(b"GET /long"), None);
        assert_eq!(
            classify(b"\x16\x03\x01\x02\x00"),
            Some(Protocol::Opaque),
            "TLS"
        );
        assert_eq!(
            classify(b"*1\r\n$4\r\nPING\r\n"),
            Some(Protocol::Opaque),
            "Redis"
        );
        assert_eq!(classify(b"GET / SPDY/3\r\n"), Some(Protocol::Opaque));
        assert_eq!(
            classify(b"GET / HTTP/1.1\nHost: a\n"),
            Some(Protocol::Http1),
            "bare LF"
        );
        assert_eq!(
            classify(b"GET / HTTP/1.2\r\n"),
            Some(Protocol::Http1),
            "a version the HTTP path refuses"
        );
        assert_eq!(classify(b"GET / HTTP/1.1x\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"GET /\n"), Some(Protocol::Opaque), "HTTP/0.9");
        assert_eq!(classify(b""), None);
    }

    /// Empty lines before the request line are skipped, as hyper's parser skips them; a
    /// lone CR is not an empty line.
    #[test]
    fn empty_lines_before_a_request_line_are_skipped() {
        assert_eq!(classify(b"\r\nGET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(
            classify(b"\r\n\n\r\nGET / HTTP/1.1\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"\r\n"), None);
        assert_eq!(classify(b"\r\n\r"), None);
        assert_eq!(classify(b"\rGET / HTTP/1.1\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"\r\n\x16\x03\x01"), Some(Protocol::Opaque));
        assert_eq!(
            classify(&b"\r\n".repeat(MAX_DETECT_BYTES / 2)),
            Some(Protocol::Opaque),
            "nothing but empty lines, as far as detection reads"
        );
        let mut long = b"\r\nGET /".to_vec();
        long.resize(MAX_DETECT_BYTES + 10, b'a');
        assert_eq!(classify(&long), Some(Protocol::Http1));
    }

    #[test]
    fn a_request_line_longer_than_detection_waits_for_is_still_http1() {
        let mut long = b"GET /".to_vec();
        long.resize(MAX_DETECT_BYTES + 10, b'a');
        assert_eq!(classify(&long), Some(Protocol::Http1));
        // Not a request line: a second space, or control bytes.
        let mut two = b"GET /a ".to_vec();
        two.resize(MAX_DETECT_BYTES + 10, b'a');
        assert_eq!(classify(&two), Some(Protocol::Opaque));
        let mut bin = b"GET ".to_vec();
        bin.resize(MAX_DETECT_BYTES + 10, 0);
        assert_eq!(classify(&bin), Some(Protocol::Opaque));
    }

    #[tokio::test]
    async fn times_out_to_opaque_when_the_client_is_silent() {
        tokio::time::pause();
        let (mut client, mut server) = tokio::io::duplex(64);
        let t = tokio::spawn(async move { detect(&mut server, Duration::from_millis(300)).await });
        client.write_all(b"GE").await.unwrap();
        let (p, prefix) = t.await.unwrap().unwrap();
        assert_eq!(p, Protocol::Opaque);
        assert_eq!(&prefix[..], b"GE");
    }

    #[tokio::test]
    async fn replays_the_prefix_before_the_rest() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b" world").await.unwrap();
        drop(client);
        let mut io = PrefixedIo::new(Bytes::from_static(b"hello"), server);
        let mut out = String::new();
        io.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }
    mod properties {
        use super::*;
        use proptest::prelude::*;
        use std::collections::VecDeque;

        /// A client that delivers its bytes in exactly the given chunks, one per read,
        /// then either closes (`eof`) or goes silent.
        struct Chunks {
            chunks: VecDeque<Vec<u8>>,
            eof: bool,
        }

        impl AsyncRead for Chunks {
            fn poll_read(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                let Some(mut chunk) = self.chunks.pop_front() else {
                    return if self.eof {
                        Poll::Ready(Ok(()))
                    } else {
                        Poll::Pending
                    };
                };
                let n = chunk.len().min(buf.remaining());
                buf.put_slice(&chunk[..n]);
                if n < chunk.len() {
                    self.chunks.push_front(chunk.split_off(n));
                }
                Poll::Ready(Ok(()))
            }
        }

        /// Splits `bytes` at the given cut points.
        fn chunked(bytes: &[u8], cuts: &[usize]) -> VecDeque<Vec<u8>> {
            let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            cuts.push(0);
            cuts.push(bytes.len());
            cuts.sort_unstable();
            cuts.dedup();
            cuts.windows(2)
                .map(|w| bytes[w[0]..w[1]].to_vec())
                .collect()
        }

        /// Inputs that reach every branch: requests, prefaces, their prefixes and
        /// corruptions, and noise, up to past [`MAX_DETECT_BYTES`].
        fn input() -> impl Strategy<Value = Vec<u8>> {
            let line = "[A-Z]{1,8} /[ -~]{0,40} HTTP/1\\.[01]\r\n[ -~]{0,20}";
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..64),
                line.prop_map(String::into_bytes),
                (0..=H2_PREFACE.len() + 8, any::<u8>()).prop_map(|(n, b)| {
                    let mut v = H2_PREFACE.to_vec();
                    v.push(b);
                    v.truncate(n);
                    v
                }),
                (0usize..12_000, proptest::option::of(0usize..12_000)).prop_map(|(len, crlf)| {
                    let mut v = b"GET /".to_vec();
                    v.resize(len.max(5), b'a');
                    if let Some(at) = crlf {
                        let at = at.min(v.len());
                        v.splice(at..at, b" HTTP/1.1\r\n".iter().copied());
                    }
                    v
                }),
            ]
        }

        async fn run(bytes: &[u8], cuts: &[usize], eof: bool) -> (Protocol, Vec<u8>) {
            let mut client = Chunks {
                chunks: chunked(bytes, cuts),
                eof,
            };
            let (p, prefix) = detect(&mut client, Duration::from_millis(300))
                .await
                .unwrap();
            assert!(
                bytes.starts_with(&prefix),
                "the prefix is what the client sent"
            );
            let mut replayed = vec![0; bytes.len()];
            PrefixedIo::new(prefix, client)
                .read_exact(&mut replayed)
                .await
                .unwrap();
            (p, replayed)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_bytes_in_any_chunks_get_one_decision_and_replay_exactly(
                bytes in input(),
                cuts in proptest::collection::vec(any::<usize>(), 0..8),
                eof in any::<bool>(),
            ) {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .start_paused(true)
                    .build()
                    .unwrap();
                let (p, replayed) = rt.block_on(run(&bytes, &cuts, eof));
                prop_assert_eq!(&replayed, &bytes);
                // However the bytes arrive, the decision is the one made on all of them at
                // once.
                let (whole, _) = rt.block_on(run(&bytes, &[], eof));
                prop_assert_eq!(p, whole);
            }
        }
    }
}
