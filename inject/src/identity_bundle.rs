//! The public half of the mesh's identity, which the operator publishes so that a manifest
//! injected by hand (`kubectl weft inject`) gets what the webhook gives a pod: the ConfigMap
//! [`CONFIG_MAP`] in the operator's namespace holds the trust bundle and where the identity
//! endpoint is.
//!
//! ```text
//! operator start ──to_data(identity)──▶ ConfigMap weft-identity-bundle ──from_data──▶ kubectl weft inject
//!  (every replica, server-side apply;      ca.crt, identityAddr, serverName
//!   deleted when started --no-identity)
//! ```
//!
//! Nothing here is secret: the bundle travels in every injected pod's spec, as Linkerd's
//! trust anchors do; the CA's keys stay in their Secret.

use std::collections::BTreeMap;

use crate::{InjectIdentity, settings::SettingsError};

/// Name of the ConfigMap (in the operator's namespace) the operator publishes.
pub const CONFIG_MAP: &str = "weft-identity-bundle";
/// The mesh trust bundle, PEM.
pub const TRUST_ROOTS: &str = "ca.crt";
/// `host:port` of the identity endpoint.
pub const ADDR: &str = "identityAddr";
/// The DNS name on the endpoint's certificate (the push server's carries it too).
pub const SERVER_NAME: &str = "serverName";

/// The ConfigMap's `data` for `identity`.
pub fn to_data(identity: &InjectIdentity) -> BTreeMap<String, String> {
    BTreeMap::from([
        (TRUST_ROOTS.to_owned(), identity.trust_roots.clone()),
        (ADDR.to_owned(), identity.addr.clone()),
        (SERVER_NAME.to_owned(), identity.server_name.clone()),
    ])
}

/// Reads what [`to_data`] wrote, refusing a bundle that injected proxies could not use.
pub fn from_data(data: &BTreeMap<String, String>) -> Result<InjectIdentity, SettingsError> {
    let get = |key: &'static str| match data.get(key).map(|v| v.trim()) {
        Some(v) if !v.is_empty() => Ok(v.to_owned()),
        _ => Err(SettingsError::Invalid {
            key,
            reason: "missing or empty".to_owned(),
        }),
    };
    let trust_roots = get(TRUST_ROOTS)?;
    if !trust_roots.contains("-----BEGIN CERTIFICATE-----") {
        return Err(SettingsError::Invalid {
            key: TRUST_ROOTS,
            reason: "holds no PEM certificate".to_owned(),
        });
    }
    let addr = get(ADDR)?;
    if !addr
        .rsplit_once(':')
        .is_some_and(|(host, p)| !host.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
    {
        return Err(SettingsError::Invalid {
            key: ADDR,
            reason: format!("{addr:?} is not host:port"),
        });
    }
    let server_name = get(SERVER_NAME)?;
    // The proxy needs the bundle's line breaks; keep the value as written, trimmed only
    // of surrounding blank space.
    Ok(InjectIdentity {
        addr,
        server_name,
        trust_roots: format!("{trust_roots}\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> InjectIdentity {
        InjectIdentity {
            addr: "weft-operator.weft-system.svc:15012".to_owned(),
            server_name: "weft-operator.weft-system.svc".to_owned(),
            trust_roots: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
                .to_owned(),
        }
    }

    #[test]
    fn what_the_operator_writes_reads_back_the_same() {
        assert_eq!(from_data(&to_data(&identity())).unwrap(), identity());
    }

    #[test]
    fn an_unusable_bundle_is_refused_naming_the_key() {
        for (key, value, says) in [
            (TRUST_ROOTS, "", "ca.crt: missing or empty"),
            (TRUST_ROOTS, "not pem", "ca.crt: holds no PEM certificate"),
            (
                ADDR,
                "weft-operator",
                "identityAddr: \"weft-operator\" is not host:port",
            ),
            (ADDR, "host:0", "is not host:port"),
            (SERVER_NAME, " ", "serverName: missing or empty"),
        ] {
            let mut data = to_data(&identity());
            data.insert(key.to_owned(), value.to_owned());
            let err = from_data(&data).unwrap_err().to_string();
            assert!(err.contains(says), "{key}={value:?}: {err}");
        }
        let mut data = to_data(&identity());
        data.remove(ADDR);
        assert!(from_data(&data).is_err());
    }
}
