//! Where `kubectl weft inject` gets the mesh's injection settings: from the cluster, the
//! same ConfigMap the operator's webhook injects with (see `weft_inject::settings`), or,
//! offline, from the built-in defaults or a file.
//!
//! ```text
//! --offline            built-in defaults ─┐
//! --config FILE        defaults + FILE ───┼─▶ + explicit flags (--proxy-image …) ─▶ InjectConfig
//! (default) cluster    defaults + ConfigMap ┘
//!                      + identity from ConfigMap weft-identity-bundle (cluster only)
//! ```

use std::{collections::BTreeMap, path::Path};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};
use weft_inject::{
    InjectConfig, InjectIdentity, identity_bundle,
    settings::{self, SettingsError},
};

/// The Service name the operator's defaults assume (`--webhook-service` of the operator).
pub const OPERATOR_SERVICE: &str = "weft-operator";

/// Where the settings came from, to say so on stderr.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The cluster's ConfigMap `namespace/name`.
    ConfigMap(String),
    /// The cluster has no such ConfigMap: the operator injects with its built-in defaults,
    /// and so does the CLI.
    NoConfigMap(String),
    /// A file given with `--config`.
    File(String),
    /// `--offline`: the built-in defaults.
    Defaults,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::ConfigMap(at) => write!(f, "injection settings from ConfigMap {at}"),
            Source::NoConfigMap(at) => write!(
                f,
                "no ConfigMap {at}: the built-in injection settings apply, as in the operator"
            ),
            Source::File(path) => write!(f, "injection settings from {path}"),
            Source::Defaults => write!(f, "offline: injecting with the built-in defaults"),
        }
    }
}

/// Why the settings could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The API server could not be asked.
    #[error("reading ConfigMap {at}: {source}")]
    Cluster {
        /// `namespace/name`.
        at: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// A file could not be read or is not YAML of the expected shape.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A setting is invalid (the webhook refuses the same ConfigMap at start-up).
    #[error("{at}: {source}")]
    Invalid {
        /// Where the setting was read.
        at: String,
        /// Which setting, and why.
        #[source]
        source: SettingsError,
    },
}

/// Reads the settings from the ConfigMap `name` in the operator's `namespace`.
pub async fn from_cluster(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<(InjectConfig, Source), LoadError> {
    let at = format!("{namespace}/{name}");
    let base = InjectConfig::for_operator(namespace, OPERATOR_SERVICE);
    let found = Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|source| LoadError::Cluster {
            at: at.clone(),
            source,
        })?;
    let (mut cfg, source) = match found {
        None => (base, Source::NoConfigMap(at)),
        Some(cm) => {
            let cfg = settings::apply(&base, &cm.data.unwrap_or_default()).map_err(|source| {
                LoadError::Invalid {
                    at: at.clone(),
                    source,
                }
            })?;
            (cfg, Source::ConfigMap(at))
        }
    };
    cfg.identity = identity_from_cluster(client, namespace).await?;
    Ok((cfg, source))
}

/// The identity the operator published ([`identity_bundle`]), or `None` when it serves
/// none (or is older than the bundle).
async fn identity_from_cluster(
    client: &Client,
    namespace: &str,
) -> Result<Option<InjectIdentity>, LoadError> {
    let at = format!("{namespace}/{}", identity_bundle::CONFIG_MAP);
    let found = Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get_opt(identity_bundle::CONFIG_MAP)
        .await
        .map_err(|source| LoadError::Cluster {
            at: at.clone(),
            source,
        })?;
    found
        .map(|cm| identity_bundle::from_data(&cm.data.unwrap_or_default()))
        .transpose()
        .map_err(|source| LoadError::Invalid { at, source })
}

/// One line for stderr saying whether injected proxies will get a mesh certificate.
pub fn identity_line(cfg: &InjectConfig, namespace: Option<&str>) -> String {
    match (&cfg.identity, namespace) {
        (Some(id), Some(ns)) => format!(
            "identity: proxies get certificates from {} (ConfigMap {ns}/{}) and speak mutual TLS",
            id.addr,
            identity_bundle::CONFIG_MAP
        ),
        (Some(id), None) => format!("identity: proxies get certificates from {}", id.addr),
        (None, Some(ns)) => format!(
            "no identity: ConfigMap {ns}/{} is absent (the operator serves no identity, or is older), so injected proxies speak plain text only",
            identity_bundle::CONFIG_MAP
        ),
        (None, None) => "no identity: injected without the cluster's trust bundle, so proxies speak plain text only; inject against the cluster for mutual TLS".to_owned(),
    }
}

/// Reads the settings from a file: the ConfigMap itself (as `kubectl get configmap -o yaml`
/// or `helm template` print it) or a plain mapping of settings, applied to the defaults.
pub fn from_file(path: &Path) -> Result<(InjectConfig, Source), LoadError> {
    let shown = path.display().to_string();
    let bad = |reason: String| LoadError::File {
        path: shown.clone(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let data = parse_file(&text).map_err(bad)?;
    let cfg =
        settings::apply(&InjectConfig::default(), &data).map_err(|source| LoadError::Invalid {
            at: shown.clone(),
            source,
        })?;
    Ok((cfg, Source::File(shown)))
}

/// The settings in a file's text: a ConfigMap's `data`, or the top-level mapping.
fn parse_file(text: &str) -> Result<BTreeMap<String, String>, String> {
    let doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let map = match doc.get("kind").and_then(serde_yaml::Value::as_str) {
        Some("ConfigMap") => match doc.get("data") {
            Some(data) => data,
            None => return Ok(BTreeMap::new()),
        },
        Some(kind) => return Err(format!("a {kind}, not a ConfigMap or a map of settings")),
        None => &doc,
    };
    let map = map
        .as_mapping()
        .ok_or_else(|| "not a map of settings".to_owned())?;
    let mut out = BTreeMap::new();
    for (k, v) in map {
        let key = k
            .as_str()
            .ok_or_else(|| format!("key {k:?} is not a string"))?;
        // A hand-written file may say `inboundPort: 16006`; a ConfigMap holds strings.
        let value = match v {
            serde_yaml::Value::String(s) => s.clone(),
            serde_yaml::Value::Number(n) => n.to_string(),
            serde_yaml::Value::Bool(b) => b.to_string(),
            serde_yaml::Value::Null => String::new(),
            _ => return Err(format!("{key}: not a string or a number")),
        };
        out.insert(key.to_owned(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_may_hold_the_configmap_or_just_the_settings() {
        let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: weft-inject-config\ndata:\n  proxyImage: r/p:1\n  inboundPort: \"16006\"\n";
        let plain = "proxyImage: r/p:1\ninboundPort: 16006\n";
        for text in [cm, plain] {
            let data = parse_file(text).unwrap();
            assert_eq!(data["proxyImage"], "r/p:1");
            assert_eq!(data["inboundPort"], "16006");
        }
        assert!(parse_file("kind: Deployment\n").is_err());
        assert!(parse_file("- a\n").is_err());
    }
}
