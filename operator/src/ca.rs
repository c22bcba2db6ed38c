//! The operator's certificate authority: kept in a Secret (generated on first start when
//! absent), it signs the webhook's serving certificate and, later, proxies' identities.
//!
//! Several replicas may start at once: each tries to create the Secret, and whoever loses
//! the race reads the winner's, so all replicas share one CA. While the webhook serves it
//! keeps watching the Secret (`webhook::rotation`), which reads it with [`from_secret`] and
//! re-creates a deleted one with [`create`], under the same race.

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
    #[error(
        "Secret {name} does not hold a usable CA certificate and key in tls.crt and tls.key: {reason}"
    )]
    Malformed {
        /// The Secret's name.
        name: String,
        /// What is wrong with it.
        #[source]
        reason: Unusable,
    },
    /// The Secret's CA is outside its validity: every certificate it signed would be
    /// refused by the API server.
    #[error(
        "Secret {name}: its CA certificate is valid from {} to {}, not now; delete the Secret for the operator to generate a new CA (the webhook's caBundle follows), or supply a valid one (check this machine's clock too)",
        rfc3339(*.not_before),
        rfc3339(*.not_after)
    )]
    OutOfValidity {
        /// The Secret's name.
        name: String,
        /// The certificate's notBefore: a CA refused for starting later becomes usable
        /// then, without a change of the Secret.
        not_before: SystemTime,
        /// The certificate's notAfter.
        not_after: SystemTime,
    },
    /// The CA expired while the operator ran: nothing it signs is valid any more.
    #[error(
        "the CA certificate expired at {not_after}; delete its Secret for the operator to generate a new CA, or supply a valid one"
    )]
    Expired {
        /// The certificate's notAfter (RFC 3339).
        not_after: String,
    },
}

/// What is wrong with a certificate and key offered as a CA: each would have the webhook
/// serve certificates the API server cannot verify.
#[derive(Debug, thiserror::Error)]
pub enum Unusable {
    /// A field is missing or is not text.
    #[error("{0} is missing or not PEM text")]
    Missing(&'static str),
    /// The certificate does not parse.
    #[error("tls.crt holds no certificate that parses")]
    Certificate,
    /// The key does not parse.
    #[error("tls.key holds no private key that parses: {0}")]
    Key(#[source] rcgen::Error),
    /// The key is another certificate's: what it signs would not chain to this one.
    #[error("tls.key is not the private key of the certificate in tls.crt")]
    KeyMismatch,
    /// The certificate may not sign others (no `basicConstraints` CA:TRUE).
    #[error("the certificate in tls.crt is not a CA")]
    NotCa,
    /// rcgen could not use the certificate as an issuer.
    #[error("the certificate cannot issue: {0}")]
    Issuer(#[source] rcgen::Error),
}

/// A CA that can sign leaf certificates.
pub struct Ca {
    cert_pem: String,
    /// The certificate itself, to tell whether a Secret holds this CA or another one
    /// whatever its PEM's line breaks.
    cert_der: Vec<u8>,
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
        let cert_der = cert.der().to_vec();
        Ok((
            Ca {
                issuer: Issuer::new(params, key),
                cert_pem,
                cert_der,
                not_after,
                not_before,
            },
            key_pem,
        ))
    }

    /// Loads a CA from its certificate and key, refusing a certificate that is no CA or a
    /// key that is not its own (validity is [`from_secret`]'s to check, against the clock).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Unusable> {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| Unusable::Certificate)?;
        let key = KeyPair::from_pem(key_pem).map_err(Unusable::Key)?;
        let (_, x509) =
            x509_parser::parse_x509_certificate(&der).map_err(|_| Unusable::Certificate)?;
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(Unusable::KeyMismatch);
        }
        if !x509.is_ca() {
            return Err(Unusable::NotCa);
        }
        let at = |t: &x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
        };
        let not_after = at(&x509.validity().not_after);
        let not_before = at(&x509.validity().not_before);
        Ok(Ca {
            issuer: Issuer::from_ca_cert_der(&der, key).map_err(Unusable::Issuer)?,
            cert_pem: cert_pem.to_owned(),
            cert_der: der.to_vec(),
            not_after,
            not_before,
        })
    }

    /// Whether `other` is the same CA certificate (the key is the certificate's, checked
    /// at load).
    pub fn same_certificate(&self, other: &Ca) -> bool {
        self.cert_der == other.cert_der
    }

    /// Refuses a CA outside its validity at `now`, naming Secret `name`.
    fn check_validity(&self, name: &str, now: SystemTime) -> Result<(), CaError> {
        if self.not_before <= now && now < self.not_after {
            return Ok(());
        }
        Err(CaError::OutOfValidity {
            name: name.to_owned(),
            not_before: self.not_before,
            not_after: self.not_after,
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
pub(crate) fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}

/// Loads the CA from Secret `namespace/name`, creating it first if it does not exist.
pub async fn load_or_create(client: Client, namespace: &str, name: &str) -> Result<Ca, CaError> {
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    if let Some(secret) = secrets.get_opt(name).await? {
        return from_secret(&secret, name);
    }
    create(client, namespace, name).await
}

/// Generates a CA into a new Secret `namespace/name`; when another replica created the
/// Secret first (409), its CA is read and returned instead, so that all share one.
pub async fn create(client: Client, namespace: &str, name: &str) -> Result<Ca, CaError> {
    let secrets = Api::<Secret>::namespaced(client, namespace);
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

/// The CA held by Secret `name`, checked as at start: both fields present, the key the
/// certificate's, the certificate a CA and valid now.
pub fn from_secret(secret: &Secret, name: &str) -> Result<Ca, CaError> {
    let malformed = |reason| CaError::Malformed {
        name: name.to_owned(),
        reason,
    };
    let field = |k: &'static str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .ok_or(Unusable::Missing(k))
    };
    let cert_pem = field(CERT_KEY).map_err(malformed)?;
    let key_pem = field(KEY_KEY).map_err(malformed)?;
    let ca = Ca::from_pem(&cert_pem, &key_pem).map_err(malformed)?;
    ca.check_validity(name, SystemTime::now())?;
    Ok(ca)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A CA valid from `from` to `to` around now.
    pub(crate) fn ca_between(from: time::Duration, to: time::Duration) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + from;
        params.not_after = now + to;
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca::from_pem(&cert.pem(), &key.serialize_pem()).unwrap()
    }

    /// A CA that expired (or is not valid yet) signs serving certificates the API server
    /// refuses: the webhook would start and inject nothing. It is refused at load, with
    /// the way out.
    #[test]
    fn a_ca_outside_its_validity_is_refused_at_load_with_the_way_out() {
        let ca = ca_between;
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

    /// A Secret with these fields, as the API server would return it.
    fn secret(fields: &[(&str, &str)]) -> Secret {
        Secret {
            data: Some(
                fields
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    /// What the watch of the Secret accepts is what start-up accepts: a certificate that
    /// is a CA, its own key, valid now. Anything else names the Secret and why.
    #[test]
    fn a_secret_is_read_only_with_a_ca_certificate_and_its_own_key() {
        let (ca, key) = Ca::generate("weft-root-ca").unwrap();
        let read = from_secret(
            &secret(&[(CERT_KEY, ca.cert_pem()), (KEY_KEY, &key)]),
            "weft-ca",
        )
        .unwrap();
        assert!(read.same_certificate(&ca));
        let (other, other_key) = Ca::generate("another").unwrap();
        assert!(!other.same_certificate(&ca));

        let leaf = ca
            .issue_serving(&["weft.test".to_owned()], &[], Duration::from_secs(600))
            .unwrap();
        let refused = [
            (vec![(CERT_KEY, "garbage"), (KEY_KEY, "garbage")], "tls.crt"),
            (vec![(CERT_KEY, ca.cert_pem())], "tls.key is missing"),
            (
                vec![(CERT_KEY, ca.cert_pem()), (KEY_KEY, "garbage")],
                "tls.key",
            ),
            (
                vec![(CERT_KEY, ca.cert_pem()), (KEY_KEY, &other_key)],
                "not the private key",
            ),
            (
                vec![(CERT_KEY, &leaf.cert_pem), (KEY_KEY, &leaf.key_pem)],
                "not a CA",
            ),
        ];
        for (fields, why) in refused {
            let error = from_secret(&secret(&fields), "weft-ca").err().unwrap();
            let text = error.to_string();
            assert!(
                matches!(error, CaError::Malformed { .. })
                    && text.contains("Secret weft-ca")
                    && text.contains(why),
                "{why}: {text}"
            );
        }
    }
}
