//! The test bed's PKI: a throwaway CA, the API server's serving certificate, an admin
//! client certificate and the service-account signing key, written as PEM files.

use std::{fs, net::IpAddr, path::Path};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// Paths of the PEM files [`write_pki`] creates, relative to the state directory.
pub mod files {
    /// The CA certificate clients trust and the API server uses for client auth.
    pub const CA_CERT: &str = "ca.crt";
    /// The CA's private key (for tests that sign more certificates, such as a webhook's).
    pub const CA_KEY: &str = "ca.key";
    /// The API server's serving certificate.
    pub const SERVING_CERT: &str = "apiserver.crt";
    /// The API server's serving key.
    pub const SERVING_KEY: &str = "apiserver.key";
    /// The admin client certificate (group `system:masters`).
    pub const ADMIN_CERT: &str = "admin.crt";
    /// The admin client key.
    pub const ADMIN_KEY: &str = "admin.key";
    /// The service-account token signing key (private; the public half is derived).
    pub const SA_KEY: &str = "sa.key";
    /// The service-account token verification key.
    pub const SA_PUB: &str = "sa.pub";
    /// The kubelet's serving certificate (for `kubectl logs`/`exec` through the API server).
    pub const KUBELET_CERT: &str = "kubelet.crt";
    /// The kubelet's serving key.
    pub const KUBELET_KEY: &str = "kubelet.key";
}

/// The PEM text of the CA and admin credentials, for kubeconfigs.
pub struct Pki {
    /// CA certificate.
    pub ca_cert: String,
    /// Admin client certificate.
    pub admin_cert: String,
    /// Admin client key.
    pub admin_key: String,
}

/// Generates the test bed's PKI into `dir`.
pub fn write_pki(dir: &Path) -> anyhow::Result<Pki> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = dn("weft-testbed-ca", None);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;

    let mut serving = CertificateParams::new(vec![
        "localhost".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        "kubernetes.default.svc.cluster.local".to_owned(),
    ])?;
    // The node's host address is where pods reach the API server (the `kubernetes`
    // Service's endpoint), so the certificate names it whether or not a node runs.
    for ip in ["127.0.0.1", "::1", "198.19.0.1", crate::node::HOST_IP] {
        let ip: IpAddr = ip.parse().context("parsing a fixed address")?;
        serving.subject_alt_names.push(SanType::IpAddress(ip));
    }
    serving.distinguished_name = dn("kube-apiserver", None);
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_key = KeyPair::generate()?;
    let serving_cert = serving.signed_by(&serving_key, &ca)?;

    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin.distinguished_name = dn("weft-testbed-admin", Some("system:masters"));
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_key = KeyPair::generate()?;
    let admin_cert = admin.signed_by(&admin_key, &ca)?;

    let mut kubelet = CertificateParams::new(vec![crate::node::NODE_NAME.to_owned()])?;
    let host_ip: IpAddr = crate::node::HOST_IP
        .parse()
        .context("parsing the node address")?;
    kubelet.subject_alt_names.push(SanType::IpAddress(host_ip));
    kubelet.distinguished_name = dn(crate::node::NODE_NAME, None);
    kubelet.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let kubelet_key = KeyPair::generate()?;
    let kubelet_cert = kubelet.signed_by(&kubelet_key, &ca)?;

    let sa_key = KeyPair::generate()?;

    let pki = Pki {
        ca_cert: ca.pem(),
        admin_cert: admin_cert.pem(),
        admin_key: admin_key.serialize_pem(),
    };
    for (name, body) in [
        (files::CA_CERT, pki.ca_cert.clone()),
        (files::CA_KEY, ca_key_pem),
        (files::SERVING_CERT, serving_cert.pem()),
        (files::SERVING_KEY, serving_key.serialize_pem()),
        (files::ADMIN_CERT, pki.admin_cert.clone()),
        (files::ADMIN_KEY, pki.admin_key.clone()),
        (files::SA_KEY, sa_key.serialize_pem()),
        (files::SA_PUB, sa_key.public_key_pem()),
        (files::KUBELET_CERT, kubelet_cert.pem()),
        (files::KUBELET_KEY, kubelet_key.serialize_pem()),
    ] {
        let path = dir.join(name);
        fs::write(&path, body).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(pki)
}

fn dn(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(org) = organization {
        dn.push(DnType::OrganizationName, org);
    }
    dn
}
