//! Where the webhook's injection settings come from: the ConfigMap
//! `weft-inject-config` in the operator's namespace (owned by the Helm chart), applied over
//! the defaults the operator's flags give. `kubectl weft inject` reads the same ConfigMap,
//! so a manifest injected by hand matches what the webhook would inject.
//!
//! Read once at start-up: a changed ConfigMap takes effect when the operator restarts (the
//! chart rolls the Deployment when the ConfigMap's content changes).

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};

use crate::inject::{
    InjectConfig,
    settings::{self, SettingsError},
};

/// What [`load`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// The settings to inject with.
    pub config: InjectConfig,
    /// The keys the ConfigMap set (empty when there is no ConfigMap).
    pub keys: Vec<String>,
    /// Whether the ConfigMap exists.
    pub found: bool,
}

/// Why the settings could not be loaded. The operator refuses to start rather than
/// inject with settings nobody chose.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The API server could not be asked.
    #[error("reading ConfigMap {namespace}/{name}: {source}")]
    Read {
        /// The operator's namespace.
        namespace: String,
        /// The ConfigMap's name.
        name: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// A setting is invalid.
    #[error("ConfigMap {namespace}/{name}: {source}")]
    Invalid {
        /// The operator's namespace.
        namespace: String,
        /// The ConfigMap's name.
        name: String,
        /// Which setting, and why.
        #[source]
        source: SettingsError,
    },
}

/// Reads the ConfigMap `name` in `namespace` and applies it to `base`; no ConfigMap means
/// `base` unchanged.
pub async fn load(
    client: &Client,
    namespace: &str,
    name: &str,
    base: &InjectConfig,
) -> Result<Loaded, LoadError> {
    let found = Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(|source| LoadError::Read {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source,
        })?;
    let Some(cm) = found else {
        return Ok(Loaded {
            config: base.clone(),
            keys: Vec::new(),
            found: false,
        });
    };
    let data = cm.data.unwrap_or_default();
    let config = settings::apply(base, &data).map_err(|source| LoadError::Invalid {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    })?;
    Ok(Loaded {
        config,
        keys: data.into_keys().collect(),
        found: true,
    })
}
