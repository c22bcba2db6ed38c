//! `serve`: an HTTP/1.1 server that says who answered and fails on demand, and
//! optionally the gRPC health service of [`crate::grpc_health`] and the TCP echo port of
//! [`crate::tcp_echo`] beside it.

use std::{convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::Instrument;

/// How long a connection may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Where `serve` listens.
pub struct Listen {
    /// The HTTP/1.1 server's address.
    pub http: SocketAddr,
    /// The gRPC health service's address, when it is wanted.
    pub grpc_health: Option<SocketAddr>,
    /// The TCP echo port's address (closed while failing), when it is wanted.
    pub tcp: Option<SocketAddr>,
}

/// Who this server is, as reported in every answer.
struct Identity {
    name: String,
    pod: String,
    fail_file: Arc<PathBuf>,
}

/// Serves until the process is stopped: after SIGTERM (the kubelet's way) it goes on
/// serving for `drain`, then exits. A pod's removal from its Service's endpoints reaches
/// clients (kube-proxy, or a mesh's proxies) a moment after the kubelet's SIGTERM, so an
/// application that exits at once refuses the requests sent in that moment; Kubernetes'
/// advice is to keep serving briefly, as this does.
pub async fn run(
    listen: Listen,
    name: String,
    fail_file: PathBuf,
    drain: Duration,
) -> anyhow::Result<()> {
    let listener = bind(listen.http).await?;
    let grpc_health = match listen.grpc_health {
        Some(addr) => Some((addr, bind(addr).await?)),
        None => None,
    };
    // Bound now, so that a bad address stops `serve` before it says it serves; not while
    // the fail file exists (the port is closed then).
    let fail_file = Arc::new(fail_file);
    let tcp = match listen.tcp {
        Some(addr) if failing(&fail_file).await.is_some() => Some((addr, None)),
        Some(addr) => Some((addr, Some(bind(addr).await?))),
        None => None,
    };
    let id = Arc::new(Identity {
        name,
        pod: pod_name(),
        fail_file,
    });
    if let Some((addr, listener)) = tcp {
        tracing::info!(listen = %addr, "serving TCP echo");
        tokio::spawn(
            crate::tcp_echo::run(addr, listener, id.fail_file.clone())
                .instrument(tracing::info_span!("tcp_echo", listen = %addr)),
        );
    }
    if let Some((addr, listener)) = grpc_health {
        tracing::info!(listen = %addr, "serving gRPC health checks");
        tokio::spawn(
            crate::grpc_health::run(listener, id.fail_file.clone())
                .instrument(tracing::info_span!("grpc_health", listen = %addr)),
        );
    }
    tracing::info!(listen = %listen.http, name = %id.name, pod = %id.pod, "serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut stop_at = None;
    loop {
        let drained = async {
            match stop_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = term.recv(), if stop_at.is_none() => {
                tracing::info!(?drain, "SIGTERM: serving on while clients learn the pod is going, then stopping");
                stop_at = Some(tokio::time::Instant::now() + drain);
                continue;
            }
            () = drained => {
                tracing::info!("stopping");
                return Ok(());
            }
        };
        let id = id.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(id.clone(), req));
            if let Err(e) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {addr}: {e}"))
}

async fn answer(
    id: Arc<Identity>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = if req.uri().path() == "/healthz" {
        (StatusCode::OK, "ok\n".to_owned())
    } else if let Some(status) = failing(&id.fail_file).await {
        (status, "failing\n".to_owned())
    } else {
        (StatusCode::OK, format!("{} {}\n", id.name, id.pod))
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    for (name, value) in [("x-demo-server", &id.name), ("x-demo-pod", &id.pod)] {
        if let Ok(value) = value.parse() {
            headers.insert(name, value);
        }
    }
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    Ok(response)
}

/// The status to fail with, when the fail file exists.
pub async fn failing(file: &std::path::Path) -> Option<StatusCode> {
    let text = tokio::fs::read_to_string(file).await.ok()?;
    Some(
        text.trim()
            .parse::<u16>()
            .ok()
            .and_then(|code| StatusCode::from_u16(code).ok())
            .filter(|s| s.is_server_error())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
    )
}

/// The pod's name: Kubernetes sets `HOSTNAME` to it.
fn pod_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}
