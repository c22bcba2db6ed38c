//! Certificates as `check` reads them: PEM bundles, how long each certificate lives, and
//! whether a TLS server's chain verifies against a given bundle (the webhook's `caBundle`).

use std::{sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use x509_parser::prelude::{FromDer, X509Certificate};

/// What `check` needs to know of one certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject, as `CN=…` text.
    pub subject: String,
    /// Not valid before (seconds since the epoch).
    pub not_before: i64,
    /// Not valid after (seconds since the epoch).
    pub not_after: i64,
}

/// Why a PEM bundle could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// Not PEM, or a certificate inside does not parse.
    #[error("not a PEM certificate bundle: {0}")]
    Malformed(String),
    /// No certificate in it.
    #[error("no certificate in the bundle")]
    Empty,
}

/// The DER certificates of a PEM bundle, in order.
pub fn pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let mut reader = pem;
    let certs = rustls_pemfile::certs(&mut reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Malformed(e.to_string()))?;
    if certs.is_empty() {
        return Err(PemError::Empty);
    }
    Ok(certs)
}

/// Subject and validity of each certificate of a PEM bundle, in order.
pub fn pem_infos(pem: &[u8]) -> Result<Vec<CertInfo>, PemError> {
    pem_certs(pem)?
        .iter()
        .map(|der| {
            let (_, cert) = X509Certificate::from_der(der.as_ref())
                .map_err(|e| PemError::Malformed(e.to_string()))?;
            Ok(CertInfo {
                subject: cert.subject().to_string(),
                not_before: cert.validity().not_before.timestamp(),
                not_after: cert.validity().not_after.timestamp(),
            })
        })
        .collect()
}

/// Why a TLS server's certificate was not verified.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The bundle holds nothing usable as a root.
    #[error("caBundle: {0}")]
    Bundle(String),
    /// The host is not a DNS name or IP address.
    #[error("{0:?} is not a valid server name")]
    ServerName(String),
    /// No TCP connection.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The handshake failed: mostly, the chain does not verify against the bundle.
    #[error("TLS handshake with {addr}: {source}")]
    Handshake {
        /// Where.
        addr: String,
        /// Why (rustls's reason, such as `invalid peer certificate: UnknownIssuer`).
        #[source]
        source: std::io::Error,
    },
    /// Nothing within the time allowed.
    #[error("{0}: no TLS handshake within 10s")]
    Timeout(String),
}

/// Connects to `host:port`, verifies the server's chain against `bundle` (PEM) for the name
/// `host` (DNS name or IP, as the API server does for a webhook URL), and returns the
/// server's leaf certificate.
pub async fn verify_server(host: &str, port: u16, bundle: &[u8]) -> Result<CertInfo, VerifyError> {
    let mut roots = rustls::RootCertStore::empty();
    for der in pem_certs(bundle).map_err(|e| VerifyError::Bundle(e.to_string()))? {
        roots
            .add(der)
            .map_err(|e| VerifyError::Bundle(e.to_string()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| VerifyError::Bundle(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
        .map_err(|_| VerifyError::ServerName(host.to_owned()))?;
    let addr = format!("{host}:{port}");
    let work = async {
        let tcp = TcpStream::connect(&addr)
            .await
            .map_err(|source| VerifyError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|source| VerifyError::Handshake {
                addr: addr.clone(),
                source,
            })?;
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|der| X509Certificate::from_der(der.as_ref()).ok())
            .map(|(_, c)| CertInfo {
                subject: c.subject().to_string(),
                not_before: c.validity().not_before.timestamp(),
                not_after: c.validity().not_after.timestamp(),
            });
        leaf.ok_or_else(|| VerifyError::Bundle("the server sent no certificate".to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| VerifyError::Timeout(addr.clone()))?
}

/// Whole days from `now` to `t` (negative when `t` is past).
pub fn days_until(t: i64, now: i64) -> i64 {
    (t - now).div_euclid(86_400)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_is_read_in_order_and_garbage_is_refused() {
        let mut a = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        a.distinguished_name
            .push(rcgen::DnType::CommonName, "first root");
        let key = rcgen::KeyPair::generate().unwrap();
        let first = a.self_signed(&key).unwrap().pem();
        let mut b = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        b.distinguished_name
            .push(rcgen::DnType::CommonName, "second root");
        let second = b.self_signed(&key).unwrap().pem();
        let infos = pem_infos(format!("{first}{second}").as_bytes()).unwrap();
        assert_eq!(infos.len(), 2);
        assert_eq!(infos[0].subject, "CN=first root");
        assert_eq!(infos[1].subject, "CN=second root");
        assert!(matches!(pem_infos(b"hello"), Err(PemError::Empty)));
    }

    #[test]
    fn days_round_down_and_go_negative_once_past() {
        assert_eq!(days_until(86_400 * 60, 0), 60);
        assert_eq!(days_until(86_400 * 60 - 1, 0), 59);
        assert_eq!(days_until(0, 1), -1);
    }
}
