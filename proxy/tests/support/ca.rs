//! A test certificate authority for the mesh's mutual TLS tests: a root made with rcgen,
//! leaves for SPIFFE identities with chosen validity, and identity stores holding them.

use std::{sync::Arc, time::SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use weft_proxy::identity::IdentityStore;

/// A test certificate authority.
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    /// The root certificate, PEM.
    pub pem: String,
}

impl Ca {
    /// A fresh self-signed root named `name`.
    pub fn new(name: &str) -> Ca {
        Ca::self_signed(Ca::root_params(name))
    }

    /// A fresh self-signed root named `name`, valid from `from` to `until` (relative to
    /// now, in seconds).
    pub fn valid_between(name: &str, from: i64, until: i64) -> Ca {
        let mut params = Ca::root_params(name);
        let now = time_now();
        params.not_before = now + time::Duration::seconds(from);
        params.not_after = now + time::Duration::seconds(until);
        Ca::self_signed(params)
    }

    fn root_params(name: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
    }

    fn self_signed(params: CertificateParams) -> Ca {
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            params,
            key,
        }
    }

    /// A leaf for `id`, valid from `from` to `until` (relative to now, in seconds).
    pub fn issue_at(&self, id: &str, from: i64, until: i64) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time_now();
        params.not_before = now + time::Duration::seconds(from);
        params.not_after = now + time::Duration::seconds(until);
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        Leaf {
            chain: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }

    /// A leaf for `id`, valid from a minute ago for an hour.
    pub fn issue(&self, id: &str) -> Leaf {
        self.issue_at(id, -60, 3600)
    }

    /// An identity store holding a fresh certificate for `id`.
    pub fn store(&self, id: &str) -> Arc<IdentityStore> {
        let store = IdentityStore::new().unwrap();
        self.install(&store, id);
        store
    }

    /// Installs a fresh certificate for `id` in `store`.
    pub fn install(&self, store: &IdentityStore, id: &str) {
        self.install_with_bundle(store, id, &self.pem);
    }

    /// An identity store holding a fresh certificate for `id`, with trust bundle `bundle`
    /// (PEM, which must hold this root).
    pub fn store_with_bundle(&self, id: &str, bundle: &str) -> Arc<IdentityStore> {
        let store = IdentityStore::new().unwrap();
        self.install_with_bundle(&store, id, bundle);
        store
    }

    fn install_with_bundle(&self, store: &IdentityStore, id: &str, bundle: &str) {
        let leaf = self.issue(id);
        store.install_pem(&leaf.chain, &leaf.key, bundle).unwrap();
    }
}

pub fn time_now() -> time::OffsetDateTime {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap()
}

/// An issued leaf: its chain and key, PEM and DER.
pub struct Leaf {
    pub chain: String,
    pub key: String,
    pub der: CertificateDer<'static>,
    pub key_der: Vec<u8>,
}

impl Leaf {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone().into())
    }

    /// A TLS 1.3 server presenting this leaf and the root `ca_pem`, asking for no client
    /// certificate, offering `alpn`: a bare peer that is not a Weft proxy.
    pub fn server_config(&self, ca_pem: &str, alpn: &[&[u8]]) -> rustls::ServerConfig {
        let mut chain = vec![self.der.clone()];
        chain.extend(rustls_pemfile::certs(&mut ca_pem.as_bytes()).map(|c| c.unwrap()));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, self.key())
        .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }

    /// When the leaf stops verifying: a second after its `notAfter` (X.509 times are whole
    /// seconds, and webpki accepts `notAfter` itself), read from the certificate rather
    /// than computed from when it was asked for, which may be most of a second off.
    pub fn ends(&self) -> std::time::SystemTime {
        let (_, x509) = x509_parser::parse_x509_certificate(&self.der).unwrap();
        let secs = u64::try_from(x509.validity().not_after.timestamp()).unwrap();
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs + 1)
    }
}
