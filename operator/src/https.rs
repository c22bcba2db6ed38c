//! The operator's HTTPS servers (the injection webhook, the identity endpoint): TLS with
//! tokio-rustls, HTTP/2 or HTTP/1.1 by ALPN, a bounded handshake, graceful shutdown.
//!
//! ```text
//!  listener ─accept─▶ TLS handshake (≤ 10 s) ─▶ hyper auto (h2 | http/1.1; headers ≤ 10 s) ─▶ Handler
//!  shutdown ─▶ stop accepting ─▶ in-flight requests answered (≤ 5 s) ─▶ connections dropped
//! ```

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests may take to finish after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an HTTP/1.1 client may take to send a request's headers (a client trickling
/// them would otherwise hold its connection open for ever).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers one request; `peer` is the client's address.
pub trait Handler: Send + Sync + 'static {
    /// The answer to `req`.
    fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;
}

/// Serves `handler` over TLS (`config`) on `listener` until `shutdown` completes, then
/// closes every connection gracefully: in-flight requests are answered, idle keep-alive
/// connections are closed so clients go elsewhere. `name` labels the logs.
pub async fn serve<H: Handler>(
    name: &'static str,
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    handler: Arc<H>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(config);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    tracing::warn!(server = name, %error, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Answers are small and latency-bound: do not let Nagle hold them back.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(server = name, %error, %peer, "setting TCP_NODELAY");
        }
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        let watcher = graceful.watcher();
        connections.spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(server = name, %error, %peer, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(server = name, %peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler.handle(req, peer).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder
                .serve_connection(TokioIo::new(tls), service)
                .into_owned();
            if let Err(error) = watcher.watch(conn).await {
                tracing::debug!(server = name, %error, %peer, "connection ended with an error");
            }
        });
        // Forget connections that have finished, so the set does not grow forever.
        while connections.try_join_next().is_some() {}
    }
    // Ask every connection to finish its in-flight requests and close, then drop any
    // that do not (or are still in their TLS handshake, holding no request).
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            server = name,
            "connections still open after the drain timeout"
        );
    }
    connections.abort_all();
}
