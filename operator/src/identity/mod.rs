//! The mesh's identity CA and the endpoint proxies get their certificates from.
//!
//! ```text
//!  start: Secret (ca.crt, ca.key | tls.crt + tls.key) ─▶ ca::IdentityCa ─▶ serving cert
//!         for the operator's Service names (renewed at 2/3 of its life) ─▶ CertStore
//!  serve: proxy ──TLS 1.3 (h2 | http/1.1)──▶ https::serve ─▶ server::IdentityServer
//!            token ─▶ TokenReview ─▶ checks ─▶ IdentityCa::issue ─▶ chain + trust bundle
//! ```
//!
//! The protocol is [`weft_api::identity`]; the Secret layout, limits and rotation are in
//! `docs/identity.md`.

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

/// Serves `server` on `listener` until `shutdown`, renewing the serving certificate
/// before it expires.
pub async fn serve(
    listener: TcpListener,
    server: Arc<IdentityServer>,
    serving: ServingSettings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), IdentityStartError> {
    let certs = serving_store(server.ca(), &serving)?;
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        root_fingerprint = %server.ca().root_fingerprint(),
        dns_names = ?serving.dns_names,
        "identity endpoint serving"
    );
    let renew = renew_forever(server.ca().clone(), certs.clone(), serving);
    tokio::select! {
        _ = crate::https::serve("identity", listener, certs.server_config_tls13(), server, shutdown) => {}
        _ = renew => {}
    }
    Ok(())
}

async fn renew_forever(ca: Arc<IdentityCa>, certs: CertStore, serving: ServingSettings) {
    let mut wait = serving.lifetime * 2 / 3;
    loop {
        tokio::time::sleep(wait).await;
        let renewed = ca
            .issue_serving(&serving.dns_names, serving.lifetime)
            .map_err(IdentityStartError::from)
            .and_then(|leaf| Ok(certs.replace(&leaf.chain_pem, &leaf.key_pem)?));
        match renewed {
            Ok(()) => {
                tracing::info!("renewed the identity endpoint's serving certificate");
                wait = serving.lifetime * 2 / 3;
            }
            Err(error) => {
                tracing::warn!(%error, "renewing the identity endpoint's serving certificate");
                wait = Duration::from_secs(5).min(serving.lifetime / 10);
            }
        }
    }
}
