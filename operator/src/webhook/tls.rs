//! The webhook's serving certificate, swappable while serving so that renewal needs no
//! restart: new handshakes get the new certificate, open connections keep theirs.

use std::sync::{Arc, RwLock};

use rustls::{
    crypto::ring::sign::any_supported_type,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The PEM did not contain a certificate or a key.
    #[error("bad PEM: {0}")]
    Pem(String),
    /// rustls rejected the key.
    #[error("unusable key: {0}")]
    Key(#[from] rustls::Error),
}

/// Holds the current certificate; cheap to clone.
#[derive(Clone, Debug)]
pub struct CertStore {
    current: Arc<RwLock<Arc<CertifiedKey>>>,
}

impl CertStore {
    /// A store serving this certificate chain and key (PEM).
    pub fn new(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        Ok(CertStore {
            current: Arc::new(RwLock::new(Arc::new(certified_key(cert_pem, key_pem)?))),
        })
    }

    /// Replaces the certificate for new handshakes.
    pub fn replace(&self, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let key = Arc::new(certified_key(cert_pem, key_pem)?);
        match self.current.write() {
            Ok(mut slot) => *slot = key,
            Err(poisoned) => *poisoned.into_inner() = key,
        }
        Ok(())
    }

    /// A rustls server config resolving to this store, offering HTTP/2 and HTTP/1.1.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server_config_with(rustls::DEFAULT_VERSIONS)
    }

    /// As [`CertStore::server_config`], TLS 1.3 only (the identity endpoint's).
    pub fn server_config_tls13(&self) -> Arc<rustls::ServerConfig> {
        self.server_config_with(&[&rustls::version::TLS13])
    }

    fn server_config_with(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = match rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
        {
            Ok(b) => b
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(self.clone())),
            // The ring provider supports the default versions; this cannot fail in practice.
            Err(_) => rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(self.clone())),
        };
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match self.current.read() {
            Ok(key) => Some(key.clone()),
            Err(poisoned) => Some(poisoned.into_inner().clone()),
        }
    }
}

fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, TlsError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Pem("no certificate".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    Ok(CertifiedKey::new(certs, any_supported_type(&key)?))
}
