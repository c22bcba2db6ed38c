//! How long an HTTP/2 client connection may carry no stream before the proxy closes it
//! (`--http2-idle-timeout`, 1 h, Envoy's downstream `idle_timeout`). hyper's HTTP/2
//! server has no such timeout: its keep-alive pings find dead clients only, so a live
//! client that keeps an unused connection would hold its connection slot for good.
//!
//! ```text
//! hyper spawns a stream ──▶ StreamExecutor: one more started, one more active
//!                           stream's task ends ──▶ one less active
//! idle(): every quarter of the timeout, a look at both counts; four looks in a row
//!         with nothing active and nothing started ──▶ GOAWAY (graceful)
//! ```
//!
//! hyper runs every stream of an HTTP/2 server connection, from its request to the end of
//! its response body (and an extended `CONNECT` tunnel, after it), as a task it hands to
//! the connection's executor: counting the tasks of [`StreamExecutor`] counts the streams,
//! without touching requests or bodies. The check looks at the counts rather than reading
//! the clock when a stream ends, so a request costs two atomic additions and no clock; the
//! close comes between the timeout and a quarter more after the last stream ended.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// Looks at the counts per timeout: the close comes at most `1 / QUIET_LOOKS` of the
/// timeout late.
const QUIET_LOOKS: u32 = 4;

/// The streams of one HTTP/2 server connection: how many are active, and how many have
/// started, in one word (active in the low 32 bits, started above, wrapping), so that a
/// stream's start is one atomic addition and one look sees both.
#[derive(Debug, Default)]
pub struct Streams(AtomicU64);

const ONE_ACTIVE: u64 = 1;
const ONE_STARTED: u64 = 1 << 32;
const ACTIVE: u64 = u32::MAX as u64;

impl Streams {
    fn start(self: &Arc<Self>) -> Active {
        self.0
            .fetch_add(ONE_STARTED + ONE_ACTIVE, Ordering::Relaxed);
        Active(self.clone())
    }

    fn look(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Streams running now.
    pub fn active(&self) -> u64 {
        self.look() & ACTIVE
    }

    /// Resolves once the connection has had no stream for `timeout` (to a quarter more);
    /// never, while streams come and go.
    pub async fn idle(&self, timeout: Duration) {
        let period = timeout / QUIET_LOOKS;
        let mut last = self.look();
        let mut quiet = 0;
        loop {
            tokio::time::sleep(period).await;
            let now = self.look();
            // Nothing active at either look, and nothing started between them: no stream
            // ran in the whole period.
            if now == last && now & ACTIVE == 0 {
                quiet += 1;
                if quiet == QUIET_LOOKS {
                    return;
                }
            } else {
                quiet = 0;
                last = now;
            }
        }
    }
}

/// One active stream; dropped when its task ends, however it ends.
struct Active(Arc<Streams>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.0.fetch_sub(ONE_ACTIVE, Ordering::Relaxed);
    }
}

/// The executor given to hyper's HTTP/2 server: spawns each stream's task on tokio, as
/// `TokioExecutor` does, counted in its connection's [`Streams`].
#[derive(Clone, Debug, Default)]
pub struct StreamExecutor {
    streams: Arc<Streams>,
}

impl StreamExecutor {
    /// The counts of the streams this executor runs.
    pub fn streams(&self) -> Arc<Streams> {
        self.streams.clone()
    }
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Counted {
            fut,
            _active: self.streams.start(),
        });
    }
}

pin_project_lite::pin_project! {
    /// A stream's task, counted active until it is dropped. A plain struct rather than an
    /// `async` block, which would hold the task twice over (captured, then awaited) and
    /// copy it at its first poll: about 2,000 instructions per stream, measured.
    struct Counted<F> {
        #[pin]
        fut: F,
        _active: Active,
    }
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        self.project().fut.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;

    async fn settle() {
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_found_idle_within_a_quarter_past_the_timeout() {
        let exec = StreamExecutor::default();
        let streams = exec.streams();
        let started = tokio::time::Instant::now();
        streams.idle(Duration::from_secs(60)).await;
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(60), "{took:?}");
        assert!(took <= Duration::from_secs(75), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_running_past_the_timeout_keeps_the_connection() {
        let exec = StreamExecutor::default();
        let streams = exec.streams();
        let (done, ended) = tokio::sync::oneshot::channel::<()>();
        exec.execute(async move {
            let _ = ended.await;
        });
        settle().await;
        assert_eq!(streams.active(), 1);
        let idle = streams.idle(Duration::from_secs(60));
        tokio::pin!(idle);
        let held = tokio::time::timeout(Duration::from_secs(300), idle.as_mut()).await;
        assert!(held.is_err(), "found idle with a stream running");
        let ended_at = tokio::time::Instant::now();
        drop(done);
        settle().await;
        assert_eq!(streams.active(), 0);
        idle.await;
        let took = ended_at.elapsed();
        assert!(took >= Duration::from_secs(60), "{took:?}");
        assert!(took <= Duration::from_secs(75), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn short_streams_between_looks_keep_the_connection() {
        let exec = StreamExecutor::default();
        let streams = exec.streams();
        let idle = streams.idle(Duration::from_secs(60));
        tokio::pin!(idle);
        // A stream that starts and ends between two looks, every 50 s: never 60 s idle.
        for _ in 0..6 {
            let held = tokio::time::timeout(Duration::from_secs(50), idle.as_mut()).await;
            assert!(
                held.is_err(),
                "found idle although a stream ran within 60 s"
            );
            exec.execute(async {});
            settle().await;
            assert_eq!(streams.active(), 0);
        }
        let last = tokio::time::Instant::now();
        idle.await;
        assert!(last.elapsed() >= Duration::from_secs(60));
    }
}
