//! `serve --tcp-listen`: a TCP port that a `tcpSocket` probe can see go down and come back.
//!
//! A `tcpSocket` probe only connects, so the only thing it can notice is whether anything
//! listens. This port therefore follows the fail file by opening and closing its listening
//! socket: while the file exists there is no socket at all (a connect gets a RST:
//! connection refused); once it is gone the socket is bound again. The file is looked at
//! every [`POLL`], so either change shows within that bound.
//!
//! ```text
//!   no fail file ─▶ bind ─▶ accept ─▶ echo each connection (until EOF or IDLE)
//!        ▲                    │ every POLL: fail file?
//!        │                    ▼ yes
//!        └── every POLL ── listener dropped: connect refused
//! ```
//!
//! Accepted connections get back what they send (an echo, so a test can tell this port
//! answered and not a proxy in front of it) and are closed after [`IDLE`] without data.
//! Connections accepted before a close keep going. Each opening and closing is logged at
//! `info`, with the first connection after each opening (its peer shows who connected: the
//! kubelet from the node, or a Weft proxy from the pod's own address).

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::Instrument;

use crate::serve::failing;

/// How often the fail file is looked at: the bound on how long a `fail` or `recover`
/// takes to close or reopen the port.
pub const POLL: Duration = Duration::from_millis(200);

/// How long an accepted connection may stay silent before it is closed, so that clients
/// which connect and never send or close do not pile up.
const IDLE: Duration = Duration::from_secs(30);

/// Serves on `listener` (bound by `serve` at startup, so that a bad address stops it there;
/// `None` when it started failing), then opens `addr` while the fail file is absent and
/// closes it while it exists, until the process ends. A bind that fails later (the address
/// taken meanwhile) is retried at each poll and logged once.
pub async fn run(addr: SocketAddr, mut listener: Option<TcpListener>, fail_file: Arc<PathBuf>) {
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut bind_failed = false;
    loop {
        if let Some(open) = listener.take() {
            tracing::info!("tcp port open");
            serve_until_failing(&open, &fail_file, &mut poll).await;
            drop(open);
            tracing::info!("tcp port closed: failing");
        }
        poll.tick().await;
        if failing(&fail_file).await.is_some() {
            continue;
        }
        match TcpListener::bind(addr).await {
            Ok(l) => {
                listener = Some(l);
                bind_failed = false;
            }
            Err(error) if !bind_failed => {
                tracing::warn!(%error, "tcp port: bind failed, retrying");
                bind_failed = true;
            }
            Err(_) => {}
        }
    }
}

/// Accepts on `listener` until a poll finds the fail file.
async fn serve_until_failing(
    listener: &TcpListener,
    fail_file: &std::path::Path,
    poll: &mut tokio::time::Interval,
) {
    let mut first = true;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if first {
                        tracing::info!(%peer, "tcp port: first connection since it opened");
                        first = false;
                    } else {
                        tracing::debug!(%peer, "tcp port: connection");
                    }
                    tokio::spawn(
                        echo(stream).instrument(tracing::debug_span!("tcp_echo", %peer)),
                    );
                }
                Err(error) => {
                    tracing::warn!(%error, "tcp port: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = poll.tick() => {
                if failing(fail_file).await.is_some() {
                    return;
                }
            }
        }
    }
}

/// Sends back what `stream` sends until it closes, fails, or stays silent for [`IDLE`].
async fn echo(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        let n = match tokio::time::timeout(IDLE, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => return,
            Ok(Ok(n)) => n,
            Ok(Err(error)) => {
                tracing::debug!(%error, "read failed");
                return;
            }
        };
        if let Err(error) = stream.write_all(&buf[..n]).await {
            tracing::debug!(%error, "write failed");
            return;
        }
    }
}
