//! What the benchmark harnesses (`bench.rs`, `icount.rs`) share: the servers they measure
//! the proxy against, each on a thread and runtime of its own as a separate process would
//! be, and the ports and process handles of the proxies they start. Only loopback
//! addresses are used.

use std::{convert::Infallible, future::Future, net::SocketAddr, process::Child};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Serves each connection accepted on `127.0.0.2` with `serve`, on a thread of its own with
/// a single-threaded runtime. Returns the address.
pub fn serve_on_own_thread<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = TcpListener::bind("127.0.0.2:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            loop {
                let (s, _) = l.accept().await.unwrap();
                let _ = s.set_nodelay(true);
                tokio::spawn(serve(s));
            }
        });
    });
    rx.recv().unwrap()
}

/// A body of the frames given, of no known size (so HTTP/2 sends no `content-length`), as
/// a gRPC peer streams its messages and trailers.
pub type Frames =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// A body of `frames`.
pub fn frames(frames: Vec<Frame<Bytes>>) -> Frames {
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = frames.into_iter().map(Ok).collect();
    StreamBody::new(futures::stream::iter(frames))
}

/// One gRPC message of `len` bytes after its 5-byte prefix (not compressed, big-endian
/// length), as gRPC frames messages in an HTTP/2 body.
pub fn grpc_message(len: u32) -> Bytes {
    let mut m = Vec::with_capacity(5 + len as usize);
    m.push(0);
    m.extend_from_slice(&len.to_be_bytes());
    m.resize(5 + len as usize, b'x');
    Bytes::from(m)
}

/// The backend: 1 KiB for any request, HTTP/1.1 and HTTP/2. A gRPC request
/// (`content-type: application/grpc`) is read whole and answered as a gRPC server answers
/// a unary call: one message (1 KiB of body with its prefix) and `grpc-status` trailers,
/// `0` when the request's body was one whole message, `3` (INVALID_ARGUMENT) when not.
pub fn start_backend() -> SocketAddr {
    let body = Bytes::from(vec![b'x'; 1024]);
    serve_on_own_thread(move |s| {
        let body = body.clone();
        async move {
            let svc = hyper::service::service_fn(move |req| answer(req, body.clone()));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        }
    })
}

async fn answer(
    req: Request<hyper::body::Incoming>,
    body: Bytes,
) -> Result<Response<Either<Full<Bytes>, Frames>>, Infallible> {
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !grpc {
        return Ok(Response::new(Either::Left(Full::new(body))));
    }
    let whole = match req.into_body().collect().await {
        Ok(b) => {
            let b = b.to_bytes();
            b.len() >= 5
                && b[0] == 0
                && u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize == b.len() - 5
        }
        Err(_) => false,
    };
    let mut trailers = HeaderMap::new();
    trailers.insert(
        "grpc-status",
        HeaderValue::from_static(if whole { "0" } else { "3" }),
    );
    let mut resp = Response::new(Either::Right(frames(vec![
        Frame::data(grpc_message(body.len() as u32 - 5)),
        Frame::trailers(trailers),
    ])));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    Ok(resp)
}

/// A TCP echo server, one byte at a time: the raw round trip's other end.
#[allow(dead_code)] // icount.rs has no use for it
pub fn start_echo() -> SocketAddr {
    serve_on_own_thread(|mut s| async move {
        let mut b = [0u8; 1];
        while s.read_exact(&mut b).await.is_ok() {
            if s.write_all(&b).await.is_err() {
                return;
            }
        }
    })
}

/// A port free now on a loopback address of this run's own, 127.0.0.2 to 127.0.0.251 by
/// process id. The proxy binds it a moment later, so another process could take the port
/// in between; off 127.0.0.1 that is far less likely, since other tests' listeners and the
/// source ends of their loopback connections sit on 127.0.0.1.
pub async fn free_addr() -> SocketAddr {
    let host = std::net::Ipv4Addr::new(127, 0, 0, 2 + (std::process::id() % 250) as u8);
    TcpListener::bind((host, 0))
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A child process, killed when dropped.
pub struct Proc {
    /// The process.
    pub child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
