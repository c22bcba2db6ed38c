//! What the benchmark harnesses (`bench.rs`, `icount.rs`) share: the servers they measure
//! the proxy against, each on a thread and runtime of its own as a separate process would
//! be. Only loopback addresses are used.

use std::{future::Future, net::SocketAddr};

use bytes::Bytes;
use http_body_util::Full;
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

/// The backend: 1 KiB for any request, HTTP/1.1 and HTTP/2.
pub fn start_backend() -> SocketAddr {
    let body = Bytes::from(vec![b'x'; 1024]);
    serve_on_own_thread(move |s| {
        let body = body.clone();
        async move {
            let svc = hyper::service::service_fn(move |_req| {
                let body = body.clone();
                async move { Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(body))) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        }
    })
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
