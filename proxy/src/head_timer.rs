//! How long an HTTP/1 client connection may wait for a request head, in two parts: while
//! it waits for its next request with nothing sent it may stay idle for the idle timeout
//! (`--http1-idle-timeout`, 1 h), and once a head's first byte has arrived the head must
//! be complete within the header read timeout (`--header-read-timeout`, 30 s).
//!
//! hyper's HTTP/1 server has one timer for both: it arms `header_read_timeout` whenever
//! it starts to read a head, so it also closes a kept-alive connection idle that long.
//! Common client pools keep idle connections for longer (Go's 90 s, OkHttp's 5 min, a
//! peer proxy's 90 s), and a request they write just as that close comes fails.
//!
//! ```text
//! hyper arms a sleep ──▶ HeadSleep: idle deadline ──first read (Watched)──▶ head deadline
//! ```
//!
//! [`HeadTimer`] is the [`Timer`] given to hyper's HTTP/1 server, which uses its timer
//! for nothing but the header read timeout (hyper 1.x). Its sleeps run the idle timeout
//! until [`Watched`], the connection's reading side, has read a byte since the sleep was
//! armed, and the header read timeout from then on. A head that arrives in one read, as
//! nearly all do, never needs the switch: hyper drops the sleep once the head is parsed.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use hyper::rt::{Sleep, Timer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a connection's [`Watched`] reading side and its [`HeadTimer`] share.
#[derive(Debug, Default)]
pub struct HeadWatch {
    /// Reads that returned bytes. Written by the connection's task only.
    reads: AtomicU64,
    /// Set when a sleep ended before any byte of its head came: the idle timeout, not a
    /// slow head, closed the connection.
    idle_expired: AtomicBool,
}

impl HeadWatch {
    /// Whether the connection was closed for sitting idle between requests, rather than
    /// for a head that took too long.
    pub fn idle_expired(&self) -> bool {
        self.idle_expired.load(Ordering::Relaxed)
    }

    fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }
}

/// A connection's I/O whose reads are seen by its [`HeadTimer`].
#[derive(Debug)]
pub struct Watched<I> {
    io: I,
    watch: Arc<HeadWatch>,
}

impl<I> Watched<I> {
    /// Wraps `io`, reporting its reads to `watch`.
    pub fn new(io: I, watch: Arc<HeadWatch>) -> Self {
        Watched { io, watch }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            // One writer (this task): a load and a store, no read-modify-write.
            let reads = &this.watch.reads;
            reads.store(reads.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The timer of one HTTP/1 client connection's server: each sleep hyper arms for a
/// request head runs `idle` until the head's first byte, then `head` from that byte.
#[derive(Clone, Debug)]
pub struct HeadTimer {
    watch: Arc<HeadWatch>,
    head: Duration,
    idle: Duration,
}

impl HeadTimer {
    /// A timer for the connection `watch` watches. `head` must be the header read timeout
    /// hyper is given: its deadlines are `head` after the moment it arms a sleep.
    pub fn new(watch: Arc<HeadWatch>, head: Duration, idle: Duration) -> Self {
        HeadTimer { watch, head, idle }
    }
}

impl Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        // hyper's deadline is its `now() + head`: the idle one is taken from the same
        // moment, without reading the clock again.
        let idle_deadline = deadline
            .checked_sub(self.head)
            .map_or(deadline, |armed| armed + self.idle);
        Box::pin(HeadSleep {
            reads_at_arm: self.watch.reads(),
            watch: self.watch.clone(),
            head: Some(self.head),
            sleep: tokio::time::sleep_until(idle_deadline.into()),
        })
    }
}

pin_project_lite::pin_project! {
    /// One wait for a request head.
    struct HeadSleep {
        watch: Arc<HeadWatch>,
        reads_at_arm: u64,
        // The header read timeout, until the head's first byte starts it.
        head: Option<Duration>,
        #[pin]
        sleep: tokio::time::Sleep,
    }
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        // hyper polls the sleep each time it reads part of a head without completing it,
        // so the first such poll after a read is when the head began.
        if let Some(head) = *this.head
            && this.watch.reads() != *this.reads_at_arm
        {
            *this.head = None;
            this.sleep
                .as_mut()
                .reset(tokio::time::Instant::now() + head);
        }
        ready!(this.sleep.poll(cx));
        if this.head.is_some() {
            this.watch.idle_expired.store(true, Ordering::Relaxed);
        }
        Poll::Ready(())
    }
}

impl Sleep for HeadSleep {}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connection's watch and its timer: 30 s for a head, `idle` between heads.
    fn timer(idle: Duration) -> (Arc<HeadWatch>, HeadTimer) {
        let watch = Arc::new(HeadWatch::default());
        let timer = HeadTimer::new(watch.clone(), Duration::from_secs(30), idle);
        (watch, timer)
    }

    /// Arms a sleep as hyper does: at its `now() + head`.
    fn arm(timer: &HeadTimer) -> Pin<Box<dyn Sleep>> {
        timer.sleep_until(Instant::now() + timer.head)
    }

    fn is_ready(sleep: &mut Pin<Box<dyn Sleep>>) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        sleep.as_mut().poll(&mut cx).is_ready()
    }

    #[tokio::test(start_paused = true)]
    async fn a_sleep_with_nothing_read_runs_the_idle_timeout() {
        let (watch, timer) = timer(Duration::from_secs(3_600));
        let mut sleep = arm(&timer);
        assert!(!is_ready(&mut sleep));
        tokio::time::advance(Duration::from_secs(3_599)).await;
        assert!(!is_ready(&mut sleep), "still idle, past the head timeout");
        assert!(!watch.idle_expired());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(is_ready(&mut sleep));
        assert!(watch.idle_expired(), "ended idle");
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_runs_the_head_timeout_from_its_first_read() {
        let (mut client, server) = tokio::io::duplex(64);
        let (watch, timer) = timer(Duration::from_secs(3_600));
        let mut server = Watched::new(server, watch.clone());
        let mut sleep = arm(&timer);
        assert!(!is_ready(&mut sleep));
        tokio::time::advance(Duration::from_secs(600)).await;
        client
            .write_all(b"GET / HT")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut buf = [0u8; 64];
        let n = server
            .read(&mut buf)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n, 8);
        assert!(!is_ready(&mut sleep), "the head timeout starts now");
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(!is_ready(&mut sleep));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(
            is_ready(&mut sleep),
            "30 s after the first byte, not 1 h after arming"
        );
        assert!(!watch.idle_expired(), "a slow head, not an idle connection");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_timeout_below_the_head_timeout_is_kept() {
        let (watch, timer) = timer(Duration::from_secs(5));
        let mut sleep = arm(&timer);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(is_ready(&mut sleep));
        assert!(watch.idle_expired());
    }
}
