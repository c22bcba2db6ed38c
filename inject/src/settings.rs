//! The mesh's injection settings as they live in the cluster: the ConfigMap
//! [`CONFIG_MAP`] in the operator's namespace, one key per setting. The Helm chart owns it;
//! the operator reads it at startup and the webhook injects with it, and `kubectl weft
//! inject` reads the same object, so a manifest injected by hand gets what the webhook
//! would give it.
//!
//! ```text
//! ConfigMap weft-inject-config ──data──▶ apply(base, data) ──▶ InjectConfig ─▶ inject()
//!   (chart-owned)                         (every key validated; unknown keys refused)
//! ```
//!
//! A key that is absent keeps the base value (the built-in default, or the operator's
//! flag); an empty value clears an optional setting (`proxyCpuLimit: ""` means no limit).

use std::collections::BTreeMap;

use crate::{InjectConfig, annotations::is_quantity};

/// Name of the ConfigMap (in the operator's namespace) holding the injection settings.
pub const CONFIG_MAP: &str = "weft-inject-config";

/// The proxy image (also runs `weft-proxy init`).
pub const PROXY_IMAGE: &str = "proxyImage";
/// The proxy version recorded on injected pods (`weft.dev/proxy-version`).
pub const PROXY_VERSION: &str = "proxyVersion";
/// `Always`, `IfNotPresent` or `Never`; empty for the cluster's default.
pub const IMAGE_PULL_POLICY: &str = "imagePullPolicy";
/// Where redirected outbound traffic arrives.
pub const OUTBOUND_PORT: &str = "outboundPort";
/// Where redirected inbound traffic arrives.
pub const INBOUND_PORT: &str = "inboundPort";
/// The proxy's admin port (probes, metrics).
pub const ADMIN_PORT: &str = "adminPort";
/// The UID the proxy runs as.
pub const PROXY_UID: &str = "proxyUid";
/// `host:port` of the operator's config-distribution server.
pub const OPERATOR_ADDR: &str = "operatorAddr";
/// The SPIFFE trust domain (must equal the operator's `--trust-domain`).
pub const TRUST_DOMAIN: &str = "trustDomain";
/// The proxy's default CPU request.
pub const PROXY_CPU_REQUEST: &str = "proxyCpuRequest";
/// The proxy's default CPU limit.
pub const PROXY_CPU_LIMIT: &str = "proxyCpuLimit";
/// The proxy's default memory request.
pub const PROXY_MEMORY_REQUEST: &str = "proxyMemoryRequest";
/// The proxy's default memory limit.
pub const PROXY_MEMORY_LIMIT: &str = "proxyMemoryLimit";
/// Namespaces never injected, comma-separated.
pub const EXCLUDED_NAMESPACES: &str = "excludedNamespaces";
/// Lifetime of the projected ServiceAccount token, in seconds (at least 600, the
/// API server's minimum).
pub const TOKEN_EXPIRATION_SECONDS: &str = "tokenExpirationSeconds";
/// The proxy's log filter (`WEFT_LOG`).
pub const LOG_LEVEL: &str = "logLevel";
/// The mesh-wide OTLP/gRPC collector (`host:port`) every injected proxy sends spans to,
/// unless its pod's `weft.dev/trace-collector` says otherwise; empty: none.
pub const TRACE_COLLECTOR: &str = "traceCollector";
/// The mesh-wide sampling probability (0 to 1) of the traces proxies start, unless a
/// pod's `weft.dev/trace-sampling` says otherwise; empty: the proxy's default (0.01).
/// Needs [`TRACE_COLLECTOR`].
pub const TRACE_SAMPLING: &str = "traceSampling";
/// How every injected proxy carries HTTP/1 to meshed endpoints, `multiplexed` or
/// `sessions`, unless its pod's `weft.dev/mesh-http1` says otherwise; empty: the proxy's
/// default (`multiplexed`).
pub const MESH_HTTP1: &str = "meshHttp1";

/// Every key [`apply`] understands, for error messages and docs.
pub const KEYS: [&str; 19] = [
    PROXY_IMAGE,
    PROXY_VERSION,
    IMAGE_PULL_POLICY,
    OUTBOUND_PORT,
    INBOUND_PORT,
    ADMIN_PORT,
    PROXY_UID,
    OPERATOR_ADDR,
    TRUST_DOMAIN,
    PROXY_CPU_REQUEST,
    PROXY_CPU_LIMIT,
    PROXY_MEMORY_REQUEST,
    PROXY_MEMORY_LIMIT,
    EXCLUDED_NAMESPACES,
    TOKEN_EXPIRATION_SECONDS,
    LOG_LEVEL,
    TRACE_COLLECTOR,
    TRACE_SAMPLING,
    MESH_HTTP1,
];

/// A setting that cannot be used. Injecting with a half-read configuration would give
/// pods settings nobody chose, so one bad key rejects the whole ConfigMap.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// A key this version does not know (a typo, or a setting of a newer version).
    #[error("unknown setting {key:?}; known settings: {known}", known = KEYS.join(", "))]
    Unknown {
        /// The key.
        key: String,
    },
    /// A known key with a value that cannot be used.
    #[error("setting {key}: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What is wrong with the value.
        reason: String,
    },
}

/// Applies the ConfigMap's `data` to `base`: each present key replaces the base value.
pub fn apply(
    base: &InjectConfig,
    data: &BTreeMap<String, String>,
) -> Result<InjectConfig, SettingsError> {
    let mut cfg = base.clone();
    // The two tracing keys make one setting: read both, then combine.
    let mut trace_collector: Option<Option<String>> = None;
    let mut trace_sampling: Option<Option<String>> = None;
    for (key, value) in data {
        let value = value.trim();
        match key.as_str() {
            PROXY_IMAGE => cfg.proxy_image = required(PROXY_IMAGE, value)?,
            PROXY_VERSION => cfg.proxy_version = required(PROXY_VERSION, value)?,
            IMAGE_PULL_POLICY => {
                cfg.image_pull_policy = match value {
                    "" => None,
                    "Always" | "IfNotPresent" | "Never" => Some(value.to_owned()),
                    _ => {
                        return Err(invalid(
                            IMAGE_PULL_POLICY,
                            format!("{value:?} is not Always, IfNotPresent or Never"),
                        ));
                    }
                }
            }
            OUTBOUND_PORT => cfg.ports.outbound = port(OUTBOUND_PORT, value)?,
            INBOUND_PORT => cfg.ports.inbound = port(INBOUND_PORT, value)?,
            ADMIN_PORT => cfg.ports.admin = port(ADMIN_PORT, value)?,
            PROXY_UID => {
                cfg.proxy_uid = value
                    .parse::<i64>()
                    .ok()
                    .filter(|uid| (1..=i64::from(u32::MAX)).contains(uid))
                    .ok_or_else(|| {
                        invalid(PROXY_UID, format!("{value:?} is not a non-root UID"))
                    })?;
            }
            OPERATOR_ADDR => {
                let addr = required(OPERATOR_ADDR, value)?;
                if !addr
                    .rsplit_once(':')
                    .is_some_and(|(host, p)| !host.is_empty() && p.parse::<u16>().is_ok())
                {
                    return Err(invalid(
                        OPERATOR_ADDR,
                        format!("{value:?} is not host:port"),
                    ));
                }
                cfg.operator_addr = addr;
            }
            TRUST_DOMAIN => cfg.trust_domain = required(TRUST_DOMAIN, value)?,
            PROXY_CPU_REQUEST => cfg.resources.cpu_request = quantity(PROXY_CPU_REQUEST, value)?,
            PROXY_CPU_LIMIT => cfg.resources.cpu_limit = quantity(PROXY_CPU_LIMIT, value)?,
            PROXY_MEMORY_REQUEST => {
                cfg.resources.memory_request = quantity(PROXY_MEMORY_REQUEST, value)?;
            }
            PROXY_MEMORY_LIMIT => {
                cfg.resources.memory_limit = quantity(PROXY_MEMORY_LIMIT, value)?;
            }
            EXCLUDED_NAMESPACES => {
                cfg.excluded_namespaces = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            TOKEN_EXPIRATION_SECONDS => {
                cfg.token_expiration_seconds = value
                    .parse::<i64>()
                    .ok()
                    .filter(|s| *s >= 600)
                    .ok_or_else(|| {
                        invalid(
                            TOKEN_EXPIRATION_SECONDS,
                            format!("{value:?} is not a number of seconds >= 600"),
                        )
                    })?;
            }
            LOG_LEVEL => {
                cfg.log_level = weft_api::LogFilter::parse(value)
                    .map_err(|e| invalid(LOG_LEVEL, e.to_string()))?;
            }
            TRACE_COLLECTOR => {
                if let Some(reason) = crate::annotations::collector_problem(value)
                    && !value.is_empty()
                {
                    return Err(invalid(TRACE_COLLECTOR, reason));
                }
                trace_collector = Some((!value.is_empty()).then(|| value.to_owned()));
            }
            TRACE_SAMPLING => {
                if let Some(reason) = crate::annotations::sampling_problem(value)
                    && !value.is_empty()
                {
                    return Err(invalid(TRACE_SAMPLING, reason));
                }
                trace_sampling = Some((!value.is_empty()).then(|| value.to_owned()));
            }
            MESH_HTTP1 => {
                cfg.mesh_http1 = match value {
                    "" => None,
                    v => Some(
                        crate::annotations::mesh_http1(v).map_err(|r| invalid(MESH_HTTP1, r))?,
                    ),
                };
            }
            _ => return Err(SettingsError::Unknown { key: key.clone() }),
        }
    }
    if trace_collector.is_some() || trace_sampling.is_some() {
        let base = cfg.tracing.take();
        let collector = match trace_collector {
            Some(c) => c,
            None => base.as_ref().map(|t| t.collector.clone()),
        };
        let sampling = match trace_sampling {
            Some(p) => p,
            None => base.and_then(|t| t.sampling),
        };
        cfg.tracing = match (collector, sampling) {
            (Some(collector), sampling) => Some(crate::InjectTracing {
                collector,
                sampling,
            }),
            (None, None) => None,
            (None, Some(_)) => {
                return Err(invalid(
                    TRACE_SAMPLING,
                    format!("needs {TRACE_COLLECTOR} (where spans go)"),
                ));
            }
        };
    }
    Ok(cfg)
}

fn invalid(key: &'static str, reason: String) -> SettingsError {
    SettingsError::Invalid { key, reason }
}

fn required(key: &'static str, value: &str) -> Result<String, SettingsError> {
    if value.is_empty() {
        return Err(invalid(key, "must not be empty".to_owned()));
    }
    Ok(value.to_owned())
}

fn port(key: &'static str, value: &str) -> Result<u16, SettingsError> {
    value
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| invalid(key, format!("{value:?} is not a port (1-65535)")))
}

fn quantity(key: &'static str, value: &str) -> Result<Option<String>, SettingsError> {
    match value {
        "" => Ok(None),
        v if is_quantity(v) => Ok(Some(v.to_owned())),
        v => Err(invalid(
            key,
            format!("{v:?} is not a Kubernetes quantity such as 100m or 64Mi"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn present_keys_replace_the_base_and_absent_keys_keep_it() {
        let base = InjectConfig::default();
        let cfg = apply(
            &base,
            &data(&[
                (PROXY_IMAGE, "registry.example/weft-proxy:9"),
                (LOG_LEVEL, "debug"),
                (INBOUND_PORT, "16006"),
                (PROXY_CPU_LIMIT, "1"),
                (PROXY_MEMORY_LIMIT, ""),
                (EXCLUDED_NAMESPACES, "kube-system, mesh ,"),
                (IMAGE_PULL_POLICY, "IfNotPresent"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.proxy_image, "registry.example/weft-proxy:9");
        assert_eq!(cfg.log_level.as_str(), "debug");
        assert_eq!(cfg.ports.inbound, 16006);
        assert_eq!(cfg.ports.outbound, base.ports.outbound);
        assert_eq!(cfg.resources.cpu_limit.as_deref(), Some("1"));
        assert_eq!(cfg.resources.memory_limit, None);
        assert_eq!(cfg.resources.memory_request, base.resources.memory_request);
        assert_eq!(cfg.excluded_namespaces, ["kube-system", "mesh"]);
        assert_eq!(cfg.image_pull_policy.as_deref(), Some("IfNotPresent"));
        assert_eq!(cfg.trust_domain, base.trust_domain);
        assert_eq!(apply(&base, &BTreeMap::new()).unwrap(), base);
    }

    #[test]
    fn bad_or_unknown_keys_are_refused_by_name() {
        let base = InjectConfig::default();
        for (key, value) in [
            (INBOUND_PORT, "0"),
            (ADMIN_PORT, "http"),
            (PROXY_UID, "0"),
            (PROXY_IMAGE, " "),
            (OPERATOR_ADDR, "weft-operator"),
            (PROXY_MEMORY_REQUEST, "lots"),
            (IMAGE_PULL_POLICY, "Sometimes"),
            (TOKEN_EXPIRATION_SECONDS, "60"),
            (TRACE_COLLECTOR, "https://otel:4317"),
            (TRACE_COLLECTOR, "otel"),
            (TRACE_SAMPLING, "1.5"),
            (TRACE_SAMPLING, "0.1"),
            (MESH_HTTP1, "mux"),
            (LOG_LEVEL, "degub"),
            (LOG_LEVEL, ""),
        ] {
            let err = apply(&base, &data(&[(key, value)])).unwrap_err();
            assert!(
                err.to_string().starts_with(&format!("setting {key}: ")),
                "{err}"
            );
        }
        let err = apply(&base, &data(&[("proxyImg", "x")])).unwrap_err();
        assert_eq!(
            err,
            SettingsError::Unknown {
                key: "proxyImg".to_owned()
            }
        );
    }

    #[test]
    fn the_tracing_keys_make_one_mesh_wide_default() {
        let base = InjectConfig::default();
        assert_eq!(base.tracing, None);
        let cfg = apply(
            &base,
            &data(&[
                (TRACE_COLLECTOR, "otel.observability:4317"),
                (TRACE_SAMPLING, "0.2"),
            ]),
        )
        .unwrap();
        let tracing = crate::InjectTracing {
            collector: "otel.observability:4317".into(),
            sampling: Some("0.2".into()),
        };
        assert_eq!(cfg.tracing.as_ref(), Some(&tracing));
        let cfg = apply(
            &base,
            &data(&[(TRACE_COLLECTOR, "otel:4317"), (TRACE_SAMPLING, "")]),
        )
        .unwrap();
        assert_eq!(cfg.tracing.unwrap().sampling, None);
        // Empty values, as the chart renders its defaults: no tracing.
        let cfg = apply(&base, &data(&[(TRACE_COLLECTOR, ""), (TRACE_SAMPLING, "")])).unwrap();
        assert_eq!(cfg.tracing, None);
    }

    #[test]
    fn mesh_http1_sets_the_mesh_wide_transport_and_empty_keeps_the_proxy_default() {
        let base = InjectConfig::default();
        assert_eq!(base.mesh_http1, None);
        let cfg = apply(&base, &data(&[(MESH_HTTP1, "sessions")])).unwrap();
        assert_eq!(cfg.mesh_http1, Some("sessions"));
        let cfg = apply(&cfg, &data(&[(MESH_HTTP1, "")])).unwrap();
        assert_eq!(cfg.mesh_http1, None);
    }

    #[test]
    fn every_listed_key_is_understood() {
        let base = InjectConfig::default();
        let defaults = [
            base.proxy_image.clone(),
            base.proxy_version.clone(),
            String::new(),
            base.ports.outbound.to_string(),
            base.ports.inbound.to_string(),
            base.ports.admin.to_string(),
            base.proxy_uid.to_string(),
            base.operator_addr.clone(),
            base.trust_domain.clone(),
            "10m".to_owned(),
            String::new(),
            "20Mi".to_owned(),
            "128Mi".to_owned(),
            base.excluded_namespaces.join(","),
            base.token_expiration_seconds.to_string(),
            base.log_level.to_string(),
            String::new(),
            String::new(),
            String::new(),
        ];
        let all: BTreeMap<String, String> =
            KEYS.iter().map(|k| (*k).to_owned()).zip(defaults).collect();
        assert_eq!(apply(&base, &all).unwrap(), base);
    }
}
