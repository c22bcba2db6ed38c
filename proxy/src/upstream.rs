//! Connections to one endpoint: a connector with a connect timeout, and pooled HTTP
//! clients (HTTP/1 keep-alive, HTTP/2 multiplexed) that always dial that endpoint while
//! leaving the request's URI, and so `Host` / `:authority`, as the client sent it.
//!
//! One [`Upstream`] lives in each endpoint's runtime state and survives config swaps that
//! keep the endpoint, so pooled connections are reused across reloads.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::net::TcpStream;

/// The request body sent upstream: the client's body, or nothing (for a replayed request).
pub type UpstreamBody = Either<Incoming, Empty<Bytes>>;

/// Why a TCP connection to an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The connect timeout elapsed.
    #[error("connect to {addr} timed out after {timeout:?}")]
    Timeout {
        /// The endpoint.
        addr: SocketAddr,
        /// The timeout that elapsed.
        timeout: Duration,
    },
    /// The connect failed, for example it was refused.
    #[error("connect to {addr}")]
    Io {
        /// The endpoint.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: io::Error,
    },
}

/// Connects to one endpoint with a timeout.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Err(ConnectError::Timeout { addr, timeout }),
        Ok(Err(source)) => Err(ConnectError::Io { addr, source }),
        Ok(Ok(stream)) => {
            // Small requests and responses must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    }
}

/// A hyper connector that ignores the URI and dials its endpoint.
#[derive(Clone, Debug)]
pub struct EndpointConnector {
    addr: SocketAddr,
    timeout: Duration,
}

impl tower::Service<http::Uri> for EndpointConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (addr, timeout) = (self.addr, self.timeout);
        Box::pin(async move { connect(addr, timeout).await.map(TokioIo::new) })
    }
}

/// Pooled HTTP clients for one endpoint.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// The endpoint.
    pub addr: SocketAddr,
    /// The connect timeout the clients were built with.
    pub connect_timeout: Duration,
    http1: Client<EndpointConnector, UpstreamBody>,
    http2: Client<EndpointConnector, UpstreamBody>,
}

impl Upstream {
    /// Clients for `addr`; no connection is made until a request needs one.
    pub fn new(addr: SocketAddr, connect_timeout: Duration) -> Self {
        let connector = EndpointConnector {
            addr,
            timeout: connect_timeout,
        };
        let http1 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_only(true)
            .build(connector);
        Upstream {
            addr,
            connect_timeout,
            http1,
            http2,
        }
    }

    /// Sends a request over the pool matching its version.
    pub async fn send(
        &self,
        req: http::Request<UpstreamBody>,
    ) -> Result<http::Response<Incoming>, hyper_util::client::legacy::Error> {
        if req.version() == http::Version::HTTP_2 {
            self.http2.request(req).await
        } else {
            self.http1.request(req).await
        }
    }
}

/// Whether a client error is a connect timeout (walking its sources).
pub fn is_connect_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut depth = 0;
    while let Some(e) = cur {
        if let Some(ConnectError::Timeout { .. }) = e.downcast_ref::<ConnectError>() {
            return true;
        }
        depth += 1;
        if depth > 16 {
            break;
        }
        cur = e.source();
    }
    false
}
