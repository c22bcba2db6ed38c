//! Standalone mode's config source: a YAML (or `.json`) file, re-read when its
//! modification time or size changes (polled) and on SIGHUP.
//!
//! ```text
//! file ──poll mtime / SIGHUP──▶ parse ──▶ ConfigStore::apply ──▶ active snapshot
//!                                 └─ parse or validation error: logged, counted, old config stays
//! ```

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use weft_api::proxy_config::ProxyConfig;

use crate::{config::ConfigError, store::ConfigStore};

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The file could not be read.
    #[error("read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a well-formed config document.
    #[error("parse {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The document parsed but is not a valid config.
    #[error("{path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        #[source]
        source: ConfigError,
    },
}

/// Parses a config document: JSON when the file name ends in `.json`, YAML otherwise.
/// Also returns the paths of top-level fields the format does not know (such as
/// `servces`): they are ignored, but in a file they are usually typos. Unknown fields of a
/// service or an endpoint (such as `services.0.endpionts`) are kept in the config, and
/// validation rejects them by name.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<(ProxyConfig, Vec<String>), SourceError> {
    let json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let mut unknown = Vec::new();
    let mut note = |p: serde_ignored::Path<'_>| unknown.push(p.to_string());
    let parsed = if json {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        serde_ignored::deserialize(&mut de, &mut note).map_err(|e| e.to_string())
    } else {
        match serde_yaml::Deserializer::from_slice(bytes).next() {
            Some(de) => serde_ignored::deserialize(de, &mut note).map_err(|e| e.to_string()),
            None => Err("the file holds no YAML document".to_owned()),
        }
    };
    let parsed = parsed.map_err(|message| SourceError::Parse {
        path: path.to_owned(),
        message,
    })?;
    Ok((parsed, unknown))
}

/// Reads and parses a config file, warning about unknown fields.
pub fn load(path: &Path) -> Result<ProxyConfig, SourceError> {
    let bytes = std::fs::read(path).map_err(|source| SourceError::Read {
        path: path.to_owned(),
        source,
    })?;
    let (config, unknown) = parse(path, &bytes)?;
    for field in unknown {
        tracing::warn!(path = %path.display(), %field, "unknown config field ignored (a typo?)");
    }
    Ok(config)
}

/// Watches one file and applies it to a store.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    store: Arc<ConfigStore>,
    seen: Option<(SystemTime, u64)>,
}

impl FileSource {
    /// A source for `path`; call [`FileSource::reload`] for the first load.
    pub fn new(path: PathBuf, store: Arc<ConfigStore>) -> Self {
        FileSource {
            path,
            store,
            seen: None,
        }
    }

    fn stamp(&self) -> Option<(SystemTime, u64)> {
        let m = std::fs::metadata(&self.path).ok()?;
        Some((m.modified().ok()?, m.len()))
    }

    /// Records the file's current modification time and size as already applied.
    pub fn mark_seen(&mut self) {
        self.seen = self.stamp();
    }

    /// Reads, validates and applies the file now. Returns the new generation.
    pub fn reload(&mut self) -> Result<u64, SourceError> {
        self.seen = self.stamp();
        let raw = load(&self.path)?;
        match self.store.apply(raw) {
            Ok(s) => Ok(s.generation),
            Err(source) => Err(SourceError::Invalid {
                path: self.path.clone(),
                source,
            }),
        }
    }

    fn reload_and_log(&mut self, why: &'static str) {
        match self.reload() {
            Ok(generation) => tracing::info!(why, generation, "config file reloaded"),
            Err(error) => {
                if !matches!(error, SourceError::Invalid { .. }) {
                    // Validation failures are counted by the store; count the rest here.
                    self.store.metrics().config_rejected();
                }
                tracing::error!(why, error = %error, "config file rejected; keeping the active config");
            }
        }
    }

    /// Polls the file every `interval` and reloads it when it changed or when `hup` is
    /// notified, until `shutdown`.
    pub async fn run(mut self, interval: Duration, hup: Arc<Notify>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = hup.notified() => self.reload_and_log("sighup"),
                _ = tick.tick() => {
                    let now = self.stamp();
                    if now.is_some() && now != self.seen {
                        self.reload_and_log("file changed");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_yaml_and_json_and_names_unknown_fields() {
        let yaml = b"apiVersion: weft.dev/proxy/v1alpha1\nkind: ProxyConfig\nservices:\n- name: web\n  endpionts: []\n";
        let (c, unknown) = parse(Path::new("p.yaml"), yaml).unwrap();
        assert_eq!(c.services[0].name, "web");
        assert!(unknown.is_empty(), "{unknown:?}");
        assert!(c.services[0].unknown.contains_key("endpionts"));
        let err = crate::config::Config::validate(&c).unwrap_err();
        assert!(
            err.to_string().contains("unknown field \"endpionts\""),
            "{err}"
        );

        let json =
            br#"{"apiVersion": "weft.dev/proxy/v1alpha1", "kind": "ProxyConfig", "servces": []}"#;
        let (_, unknown) = parse(Path::new("p.json"), json).unwrap();
        assert_eq!(unknown, vec!["servces".to_owned()]);

        let err = parse(Path::new("p.yaml"), b"services: [unclosed").unwrap_err();
        assert!(err.to_string().starts_with("parse p.yaml: "), "{err}");
        assert!(parse(Path::new("p.yaml"), b"").is_err());
    }
}
