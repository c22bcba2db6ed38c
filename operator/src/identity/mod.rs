//! The mesh's identity CA and the endpoint proxies get their certificates from.
//!
//! ```text
//!  start: Secret (ca.crt, ca.key | tls.crt + tls.key) ─▶ ca::IdentityCa ─▶ serving cert
//!         for the operator's Service names (renewed at 2/3 of its life) ─▶ CertStore
//!         (shared with the push server: push_tls)
//!  serve: proxy ──TLS 1.3 (h2 | http/1.1)──▶ https::serve_with ─▶ server::IdentityServer
//!            token ─▶ TokenReview ─▶ checks ─▶ IdentityCa::issue ─▶ chain + trust bundle
//! ```
//!
//! The protocol is [`weft_api::identity`]; the Secret layout, limits and rotation are in
//! `docs/identity.md`.

pub mod bundle;
pub mod ca;
pub mod server;

use std::{sync::Arc, time::Duration};

use tokio::net::TcpListener;

pub use ca::{IdentityCa, IdentityCaError};
pub use server::{IdentityLimits, IdentityServer};

use crate::webhook::{CertStore, tls::TlsError};

/// The default identity port (Istio's istiod serves its CA on the same one).
pub const DEFAULT_PORT: u16 = 15012;
/// The default name of the identity Secret.
pub const DEFAULT_SECRET: &str = "weft-identity";

/// Why the identity endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum IdentityStartError {
    /// The CA could not be loaded or used.
    #[error(transparent)]
    Ca(#[from] IdentityCaError),
    /// The serving certificate was unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The endpoint's serving certificate.
#[derive(Clone, Debug)]
pub struct ServingSettings {
    /// DNS names in it (the operator Service's names).
    pub dns_names: Vec<String>,
    /// Its lifetime; it is renewed at two thirds of it.
    pub lifetime: Duration,
}

/// A serving certificate issued from `ca` and a store serving it over TLS 1.3.
pub fn serving_store(
    ca: &IdentityCa,
    serving: &ServingSettings,
) -> Result<CertStore, IdentityStartError> {
    let leaf = ca.issue_serving(&serving.dns_names, serving.lifetime)?;
    Ok(CertStore::new(&leaf.chain_pem, &leaf.key_pem)?)
}

/// The push server's TLS config over `certs`: TLS 1.3 only, ALPN `h2` only (the
/// subscription is HTTP/2). Proxies verify the certificate against the mesh trust root
/// and the operator Service's name, as they do at the identity endpoint.
pub fn push_tls(certs: &CertStore) -> Arc<rustls::ServerConfig> {
    let mut config = (*certs.server_config_tls13()).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Serves `server` on `listener` until `shutdown`, renewing the serving certificate
/// before it expires.
pub async fn serve(
    listener: TcpListener,
    server: Arc<IdentityServer>,
    serving: ServingSettings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), IdentityStartError> {
    let certs = serving_store(server.ca(), &serving)?;
    let renew = renew_serving(server.ca().clone(), certs.clone(), serving.clone());
    tokio::select! {
        () = serve_with(listener, server, &certs, &serving, shutdown) => {}
        () = renew => {}
    }
    Ok(())
}

/// Serves `server` on `listener` with the serving certificate in `certs` (issued for
/// `serving`), until `shutdown`; renewing `certs` is the caller's ([`renew_serving`]), so
/// the push server can share them.
pub async fn serve_with(
    listener: TcpListener,
    server: Arc<IdentityServer>,
    certs: &CertStore,
    serving: &ServingSettings,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        root_fingerprint = %server.ca().root_fingerprint(),
        dns_names = ?serving.dns_names,
        "identity endpoint serving"
    );
    let (limits, metrics) = (server.conn_limits(), server.conn_metrics());
    crate::https::serve_with(
        "identity",
        listener,
        certs.server_config_tls13(),
        server,
        limits,
        metrics,
        shutdown,
    )
    .await
}

/// Renews the serving certificate in `certs` from `ca` at two thirds of its lifetime
/// (retrying failures every few seconds), forever.
pub async fn renew_serving(ca: Arc<IdentityCa>, certs: CertStore, serving: ServingSettings) {
    let mut wait = serving.lifetime * 2 / 3;
    loop {
        tokio::time::sleep(wait).await;
        let renewed = ca
            .issue_serving(&serving.dns_names, serving.lifetime)
            .map_err(IdentityStartError::from)
            .and_then(|leaf| Ok(certs.replace(&leaf.chain_pem, &leaf.key_pem)?));
        match renewed {
            Ok(()) => {
                tracing::info!(
                    "renewed the operator's serving certificate (identity endpoint, push server)"
                );
                wait = serving.lifetime * 2 / 3;
            }
            Err(error) => {
                tracing::warn!(%error, "renewing the operator's serving certificate");
                wait = Duration::from_secs(5).min(serving.lifetime / 10);
            }
        }
    }
}
