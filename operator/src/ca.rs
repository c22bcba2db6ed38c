//! The operator's certificate authority: kept in a Secret (generated on first start when
//! absent), it signs the webhook's serving certificate and, later, proxies' identities.
//!
//! Several replicas may start at once: each tries to create the Secret, and whoever loses
//! the race reads the winner's, so all replicas share one CA.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, SystemTime},
};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Keys of the CA Secret (`kubernetes.io/tls` layout).
const CERT_KEY: &str = "tls.crt";
const KEY_KEY: &str = "tls.key";

/// Why the CA could not be loaded, created or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Generating or signing a certificate failed.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// Talking to the API server failed.
    #[error("reading or writing the CA Secret: {0}")]
    Kube(#[from] kube::Error),
    /// The Secret exists but does not hold a usable CA.
    #[error("Secret {0} does not hold a CA certificate and key in tls.crt and tls.key")]
    Malformed(String),
    /// The Secret's CA is outside its validity: every certificate it signed would be
    /// refused by the API server.
    #[error(
        "Secret {name}: its CA certificate is valid from {not_before} to {not_after}, not now; delete the Secret for the operator to generate a new CA (the webhook's caBundle follows), or supply a valid one (check this machine's clock too)"
    )]
    OutOfValidity {
        /// The Secret's name.
        name: String,
        /// The certificate's notBefore (RFC 3339).
        not_before: String,
        /// The certificate's notAfter (RFC 3339).
        not_after: String,
    },
    /// The CA expired while the operator ran: nothing it signs is valid any more.
    #[error(
        "the CA certificate expired at {not_after}; delete its Secret and restart the operator for a new CA, or supply a valid one"
    )]
    Expired {
        /// The certificate's notAfter (RFC 3339).
        not_after: String,
    },
}

/// A CA that can sign leaf certificates.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// When the CA certificate expires: no leaf it signs lasts longer (the API server
    /// would refuse it past then anyway).
    not_after: SystemTime,
    /// When the CA certificate starts being valid.
    not_before: SystemTime,
}

/// A signed leaf certificate and its key, in PEM.
#[derive(Clone, Debug)]
pub struct Leaf {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
    /// When it stops being valid.
    pub not_after: SystemTime,
}

impl Ca {
    /// Generates a new self-signed CA.
    pub fn generate(common_name: &str) -> Result<(Self, String), CaError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "weft.dev");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let not_after = SystemTime::from(params.not_after);
        let not_before = SystemTime::from(params.not_before);
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok((
            Ca {
                issuer: Issuer::new(params, key),
                cert_pem,
                not_after,
                not_before,
            },
            key_pem,
        ))
    }

    /// Loads a CA from its certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let key = KeyPair::from_pem(key_pem)?;
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
        let at = |t: &x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
        };
        let not_after = at(&x509.validity().not_after);
        let not_before = at(&x509.validity().not_before);
        Ok(Ca {
            issuer: Issuer::from_ca_cert_der(&der, key)?,
            cert_pem: cert_pem.to_owned(),
            not_after,
            not_before,
        })
    }

    /// Refuses a CA outside its validity at `now`, naming Secret `name`.
    fn check_validity(&self, name: &str, now: SystemTime) -> Result<(), CaError> {
        if self.not_before <= now && now < self.not_after {
            return Ok(());
        }
        Err(CaError::OutOfValidity {
            name: name.to_owned(),
            not_before: rfc3339(self.not_before),
            not_after: rfc3339(self.not_after),
        })
    }

    /// The CA certificate, for trust bundles (the webhook's `caBundle`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// When the CA certificate expires: no certificate it signs lasts longer.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Signs a TLS serving certificate for these names and addresses; refused once the CA
    /// has expired (the certificate would be expired too).
    pub fn issue_serving(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        lifetime: Duration,
    ) -> Result<Leaf, CaError> {
        if SystemTime::now() >= self.not_after {
            return Err(CaError::Expired {
                not_after: rfc3339(self.not_after),
            });
        }
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            dns_names
                .first()
                .map(String::as_str)
                .unwrap_or("weft-operator"),
        );
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        // A little slack for clocks that disagree.
        params.not_before = time::OffsetDateTime::from(now - Duration::from_secs(5 * 60));
        // Never past the CA's own expiry: the API server would refuse the leaf from then.
        let not_after = now
            .checked_add(lifetime)
            .map_or(self.not_after, |t| t.min(self.not_after));
        params.not_after = time::OffsetDateTime::from(not_after);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after,
        })
    }
}

/// `t` as RFC 3339, for messages.
fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}

/// Loads the CA from Secret `namespace/name`, creating it first if it does not exist.
pub async fn load_or_create(client: Client, namespace: &str, name: &str) -> Result<Ca, CaError> {
    let secrets = Api::<Secret>::namespaced(client, namespace);
    if let Some(secret) = secrets.get_opt(name).await? {
        return from_secret(&secret, name);
    }
    let (ca, key_pem) = Ca::generate("weft-root-ca")?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_owned(),
                "weft".to_owned(),
            )])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            (
                CERT_KEY.to_owned(),
                ByteString(ca.cert_pem().as_bytes().to_vec()),
            ),
            (KEY_KEY.to_owned(), ByteString(key_pem.into_bytes())),
        ])),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(%namespace, %name, "generated a new CA");
            Ok(ca)
        }
        // Another replica won the race: use its CA.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let secret = secrets.get(name).await?;
            from_secret(&secret, name)
        }
        Err(e) => Err(e.into()),
    }
}

fn from_secret(secret: &Secret, name: &str) -> Result<Ca, CaError> {
    let field = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .ok_or_else(|| CaError::Malformed(name.to_owned()))
    };
    let ca = Ca::from_pem(&field(CERT_KEY)?, &field(KEY_KEY)?)
        .map_err(|_| CaError::Malformed(name.to_owned()))?;
    ca.check_validity(name, SystemTime::now())?;
    Ok(ca)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA that expired (or is not valid yet) signs serving certificates the API server
    /// refuses: the webhook would start and inject nothing. It is refused at load, with
    /// the way out.
    #[test]
    fn a_ca_outside_its_validity_is_refused_at_load_with_the_way_out() {
        let ca = |from: time::Duration, to: time::Duration| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now + from;
            params.not_after = now + to;
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            Ca::from_pem(&cert.pem(), &key.serialize_pem()).unwrap()
        };
        let now = SystemTime::now();
        let hour = time::Duration::hours(1);
        assert!(ca(-hour, hour).check_validity("weft-ca", now).is_ok());
        // One that expires while the operator runs signs nothing more.
        assert!(matches!(
            ca(-2 * hour, -hour).issue_serving(
                &["weft.test".to_owned()],
                &[],
                Duration::from_secs(60)
            ),
            Err(CaError::Expired { .. })
        ));
        for (from, to) in [(-2 * hour, -hour), (hour, 2 * hour)] {
            let error = ca(from, to).check_validity("weft-ca", now).unwrap_err();
            let text = error.to_string();
            assert!(
                matches!(error, CaError::OutOfValidity { .. })
                    && text.contains("Secret weft-ca")
                    && text.contains("delete the Secret"),
                "{text}"
            );
        }
    }

    #[test]
    fn a_serving_certificate_never_outlives_its_ca() {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::hours(2);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca = Ca::from_pem(&cert.pem(), &key.serialize_pem()).unwrap();
        let leaf = ca
            .issue_serving(
                &["weft.test".to_owned()],
                &[],
                Duration::from_secs(24 * 3600),
            )
            .unwrap();
        let ca_end = SystemTime::from(params.not_after);
        assert!(
            leaf.not_after <= ca_end,
            "{:?} > {ca_end:?}",
            leaf.not_after
        );
        let der = rustls_pemfile::certs(&mut leaf.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            x509.validity().not_after.timestamp(),
            params.not_after.unix_timestamp(),
            "the certificate says what Leaf::not_after says"
        );
    }
}
