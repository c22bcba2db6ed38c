//! Graceful shutdown, in the order a draining pod needs:
//!
//! ```text
//! SIGTERM ─▶ /ready fails ─▶ inbound group stops accepting, drains in-flight requests
//!            (outbound group still serves the application meanwhile)
//!         ─▶ outbound group stops accepting, drains ─▶ exit
//! all within one grace period
//! ```

use std::{sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    Proxy,
    server::{self, ListenerKind},
};

/// Listeners that stop together.
#[derive(Debug, Default)]
pub struct ListenerGroup {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl ListenerGroup {
    /// An empty group.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts serving `listener` as part of this group.
    pub fn spawn(&mut self, listener: TcpListener, kind: ListenerKind, proxy: Arc<Proxy>) {
        self.tasks.push(tokio::spawn(server::serve(
            listener,
            kind,
            proxy,
            self.stop.clone(),
        )));
    }

    /// Stops accepting and waits until every accepted connection has finished.
    pub async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            if let Err(error) = t.await {
                tracing::warn!(%error, "listener task failed");
            }
        }
    }
}

/// Drains `inbound` first, then `outbound`, within `grace`. Returns whether everything
/// drained in time (if not, the caller exits anyway and open connections are cut).
pub async fn drain(
    proxy: &Proxy,
    inbound: ListenerGroup,
    outbound: ListenerGroup,
    grace: Duration,
) -> bool {
    tracing::info!(?grace, "shutdown: draining");
    proxy.draining.cancel();
    let deadline = tokio::time::Instant::now() + grace;
    let inbound_done = tokio::time::timeout_at(deadline, inbound.stop())
        .await
        .is_ok();
    let outbound_done = tokio::time::timeout_at(deadline, outbound.stop())
        .await
        .is_ok();
    if inbound_done && outbound_done {
        tracing::info!("shutdown: drained");
        true
    } else {
        tracing::warn!("shutdown: grace period expired with connections still open");
        false
    }
}

/// How long the HTTP work in flight on a mutual TLS session may go on after the session
/// had to end ([`crate::identity::session`]: its peer's certificate expired, or its trust
/// was withdrawn) before the connection is closed: the default of the drain's grace
/// (`--shutdown-grace`), which is not handed to the listeners.
pub const SESSION_END_GRACE: Duration = Duration::from_secs(30);
