//! Per-pod options read from `weft.dev/*` annotations, validated before anything is
//! injected so that a typo is a clear error, not a broken pod.

use std::{collections::BTreeMap, net::IpAddr};

use super::{InjectConfig, InjectError, keys};

/// What a pod's annotations ask of its proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodOptions {
    /// Inbound ports that bypass the proxy (the admin port always does).
    pub skip_inbound_ports: Vec<PortRange>,
    /// Outbound ports that bypass the proxy.
    pub skip_outbound_ports: Vec<PortRange>,
    /// Outbound destinations that bypass the proxy.
    pub skip_outbound_cidrs: Vec<String>,
    /// The pod's ports whose inbound connections are opaque TCP.
    pub opaque_ports: Vec<PortRange>,
    /// The pod's ports whose inbound connections go to loopback, not the pod's address.
    pub inbound_loopback_ports: Vec<PortRange>,
    /// Proxy resources after annotation overrides.
    pub resources: super::ProxyResources,
    /// The access-log format (`json` or `text`), when the pod asks for one.
    pub access_log: Option<&'static str>,
    /// How the proxy carries HTTP/1 to meshed endpoints (`multiplexed` or `sessions`),
    /// when the pod or the mesh-wide setting says.
    pub mesh_http1: Option<&'static str>,
    /// Tracing, when the pod names a collector.
    pub trace: Option<TraceOptions>,
    /// The pod said `weft.dev/rewrite-probes: "false"`: its HTTP probes stay as written.
    pub keep_probes: bool,
    /// The proxy timeouts the pod sets ([`keys::TIMEOUTS`]): each environment variable
    /// with its validated value.
    pub timeouts: Vec<(&'static str, String)>,
    /// The proxy's log filter: the pod's `weft.dev/proxy-log-level`, else the mesh-wide
    /// setting.
    pub log_level: weft_api::LogFilter,
}

/// What a pod asks of the proxy's tracing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceOptions {
    /// The OTLP/gRPC collector, `host:port` (or `http://host:port`).
    pub collector: String,
    /// The sampling probability as written (validated: 0 to 1).
    pub sampling: Option<String>,
    /// The spans' `service.name`: the pod's application label, when it has one.
    pub service_name: Option<String>,
}

/// A port or an inclusive range of ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub start: u16,
    /// Last port (equal to `start` for a single port).
    pub end: u16,
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl PodOptions {
    /// Reads and validates the pod's annotations.
    pub fn from_annotations(
        annotations: Option<&BTreeMap<String, String>>,
        cfg: &InjectConfig,
    ) -> Result<Self, InjectError> {
        let get = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
        let mut resources = cfg.resources.clone();
        for (key, slot) in [
            (keys::PROXY_CPU_REQUEST, &mut resources.cpu_request),
            (keys::PROXY_CPU_LIMIT, &mut resources.cpu_limit),
            (keys::PROXY_MEMORY_REQUEST, &mut resources.memory_request),
            (keys::PROXY_MEMORY_LIMIT, &mut resources.memory_limit),
        ] {
            if let Some(value) = get(key) {
                if !is_quantity(value) {
                    return Err(InjectError::BadAnnotation {
                        key,
                        reason: format!(
                            "{value:?} is not a Kubernetes quantity such as 100m or 64Mi"
                        ),
                    });
                }
                *slot = Some(value.to_owned());
            }
        }
        Ok(PodOptions {
            skip_inbound_ports: ports(keys::SKIP_INBOUND_PORTS, get(keys::SKIP_INBOUND_PORTS))?,
            skip_outbound_ports: ports(keys::SKIP_OUTBOUND_PORTS, get(keys::SKIP_OUTBOUND_PORTS))?,
            skip_outbound_cidrs: cidrs(keys::SKIP_OUTBOUND_CIDRS, get(keys::SKIP_OUTBOUND_CIDRS))?,
            opaque_ports: ports(keys::OPAQUE_PORTS, get(keys::OPAQUE_PORTS))?,
            inbound_loopback_ports: ports(
                keys::INBOUND_LOOPBACK_PORTS,
                get(keys::INBOUND_LOOPBACK_PORTS),
            )?,
            resources,
            access_log: match get(keys::ACCESS_LOG) {
                None => None,
                Some("json") => Some("json"),
                Some("text") => Some("text"),
                Some(other) => {
                    return Err(InjectError::BadAnnotation {
                        key: keys::ACCESS_LOG,
                        reason: format!("{other:?} is not json or text"),
                    });
                }
            },
            mesh_http1: match get(keys::MESH_HTTP1) {
                None => cfg.mesh_http1,
                Some(v) => Some(mesh_http1(v).map_err(|reason| InjectError::BadAnnotation {
                    key: keys::MESH_HTTP1,
                    reason,
                })?),
            },
            trace: trace(
                get(keys::TRACE_COLLECTOR),
                get(keys::TRACE_SAMPLING),
                cfg.tracing.as_ref(),
            )?,
            timeouts: timeouts(get)?,
            log_level: match get(keys::PROXY_LOG_LEVEL) {
                None => cfg.log_level.clone(),
                Some(v) => {
                    weft_api::LogFilter::parse(v).map_err(|e| InjectError::BadAnnotation {
                        key: keys::PROXY_LOG_LEVEL,
                        reason: e.to_string(),
                    })?
                }
            },
            keep_probes: match get(keys::REWRITE_PROBES) {
                None | Some("true") => false,
                Some("false") => true,
                Some(other) => {
                    return Err(InjectError::BadAnnotation {
                        key: keys::REWRITE_PROBES,
                        reason: format!("{other:?} is not \"true\" or \"false\""),
                    });
                }
            },
        })
    }
}

/// The timeout annotations the pod sets, as the proxy's environment variables. A value
/// the proxy would refuse at start (not a duration in its syntax, or zero) is refused
/// here, so that it cannot leave the pod with a proxy that never starts.
fn timeouts<'a>(
    get: impl Fn(&str) -> Option<&'a str>,
) -> Result<Vec<(&'static str, String)>, InjectError> {
    let mut set = Vec::new();
    for (key, env) in keys::TIMEOUTS {
        let Some(value) = get(key) else { continue };
        let parsed: weft_api::Duration =
            value.trim().parse().map_err(|e: weft_api::DurationError| {
                InjectError::BadAnnotation {
                    key,
                    reason: e.to_string(),
                }
            })?;
        if parsed.as_std().is_zero() {
            return Err(InjectError::BadAnnotation {
                key,
                reason: format!("{value:?} is zero; a timeout must be greater than zero"),
            });
        }
        set.push((env, value.trim().to_owned()));
    }
    Ok(set)
}

/// `v` as a value of `--mesh-http1` (the annotation's and the mesh setting's rule), or why
/// it is not one.
pub fn mesh_http1(v: &str) -> Result<&'static str, String> {
    match v {
        "multiplexed" => Ok("multiplexed"),
        "sessions" => Ok("sessions"),
        other => Err(format!("{other:?} is not multiplexed or sessions")),
    }
}

/// Why `p` is not a sampling probability, if it is not (the annotation's and the mesh
/// setting's rule).
pub fn sampling_problem(p: &str) -> Option<String> {
    let ok = p
        .trim()
        .parse::<f64>()
        .is_ok_and(|p| (0.0..=1.0).contains(&p));
    (!ok).then(|| format!("{p:?} is not a probability from 0 to 1, such as 0.01"))
}

/// Why `collector` is not a collector address the proxy accepts, if it is not: plain-text
/// OTLP/gRPC at `[http://]host:port` (the annotation's and the mesh setting's rule).
pub fn collector_problem(collector: &str) -> Option<String> {
    let address = collector.strip_prefix("http://").unwrap_or(collector);
    let port = address
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty() && !host.contains(['/', ' ']))
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .filter(|p| *p > 0);
    (address.contains("://") || port.is_none()).then(|| {
        format!(
            "{collector:?} is not host:port (plain-text OTLP/gRPC), such as otel-collector.observability:4317"
        )
    })
}

/// The tracing annotations over the mesh's default: each of the collector
/// (`[http://]host:port`, or `disabled` to turn the mesh default off for this pod) and the
/// sampling probability is the pod's when it sets it, else the mesh's; a sampling
/// probability with no collector from either means nothing and is refused.
fn trace(
    collector: Option<&str>,
    sampling: Option<&str>,
    mesh: Option<&crate::InjectTracing>,
) -> Result<Option<TraceOptions>, InjectError> {
    if let Some(p) = sampling
        && let Some(reason) = sampling_problem(p)
    {
        return Err(InjectError::BadAnnotation {
            key: keys::TRACE_SAMPLING,
            reason,
        });
    }
    if collector.map(str::trim) == Some(keys::DISABLED) {
        return Ok(None);
    }
    if let Some(c) = collector
        && let Some(reason) = collector_problem(c)
    {
        return Err(InjectError::BadAnnotation {
            key: keys::TRACE_COLLECTOR,
            reason,
        });
    }
    let Some(collector) = collector.or(mesh.map(|m| m.collector.as_str())) else {
        if sampling.is_some() {
            return Err(InjectError::BadAnnotation {
                key: keys::TRACE_SAMPLING,
                reason: format!(
                    "needs {} (where spans go), or a mesh-wide traceCollector",
                    keys::TRACE_COLLECTOR
                ),
            });
        }
        return Ok(None);
    };
    let sampling = sampling
        .map(|s| s.trim().to_owned())
        .or_else(|| mesh.and_then(|m| m.sampling.clone()));
    Ok(Some(TraceOptions {
        collector: collector.to_owned(),
        sampling,
        service_name: None,
    }))
}

/// Joins ranges as `a,b-c`, the format `weft-proxy init` and the proxy read.
pub fn join(ranges: &[PortRange]) -> String {
    ranges
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses a port-list annotation (`3306,9000-9010`); `None` is the empty list.
pub fn ports(key: &'static str, value: Option<&str>) -> Result<Vec<PortRange>, InjectError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let bad = |reason: String| InjectError::BadAnnotation { key, reason };
    let port = |s: &str| -> Result<u16, InjectError> {
        match s.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(bad(format!("{s:?} is not a port (1-65535)"))),
        }
    };
    let mut out = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let range = match item.split_once('-') {
            Some((a, b)) => {
                let (start, end) = (port(a)?, port(b)?);
                if start > end {
                    return Err(bad(format!("range {item:?} is backwards")));
                }
                PortRange { start, end }
            }
            None => {
                let p = port(item)?;
                PortRange { start: p, end: p }
            }
        };
        out.push(range);
    }
    Ok(out)
}

fn cidrs(key: &'static str, value: Option<&str>) -> Result<Vec<String>, InjectError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (addr, len) = item.split_once('/').unwrap_or((item, ""));
        let ip: IpAddr = addr.parse().map_err(|_| InjectError::BadAnnotation {
            key,
            reason: format!("{item:?} is not a CIDR such as 10.0.0.0/8"),
        })?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len: u8 = if len.is_empty() {
            max
        } else {
            len.parse()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| InjectError::BadAnnotation {
                    key,
                    reason: format!("{item:?} has a bad prefix length"),
                })?
        };
        out.push(format!("{ip}/{len}"));
    }
    Ok(out)
}

/// Whether `s` looks like a Kubernetes resource quantity (`100m`, `0.5`, `64Mi`, `1G`).
pub(crate) fn is_quantity(s: &str) -> bool {
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let number_ok = !number.is_empty()
        && number.matches('.').count() <= 1
        && !number.starts_with('.')
        && !number.ends_with('.');
    let suffix_ok = matches!(
        suffix,
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    );
    number_ok && suffix_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> Result<PodOptions, InjectError> {
        let map = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        PodOptions::from_annotations(Some(&map), &InjectConfig::default())
    }

    #[test]
    fn reads_ports_ranges_and_cidrs() {
        let o = opts(&[
            (keys::SKIP_INBOUND_PORTS, "8080, 9000-9010"),
            (keys::SKIP_OUTBOUND_CIDRS, "10.0.0.0/8,fd00::/8,192.0.2.7"),
            (keys::OPAQUE_PORTS, "3306"),
            (keys::INBOUND_LOOPBACK_PORTS, "9090,9100-9101"),
        ])
        .unwrap();
        assert_eq!(join(&o.inbound_loopback_ports), "9090,9100-9101");
        assert_eq!(join(&o.skip_inbound_ports), "8080,9000-9010");
        assert_eq!(
            o.skip_outbound_cidrs,
            ["10.0.0.0/8", "fd00::/8", "192.0.2.7/32"]
        );
        assert_eq!(join(&o.opaque_ports), "3306");
    }

    #[test]
    fn rejects_bad_values_naming_the_annotation() {
        for (key, value) in [
            (keys::SKIP_INBOUND_PORTS, "http"),
            (keys::SKIP_OUTBOUND_PORTS, "70000"),
            (keys::SKIP_OUTBOUND_PORTS, "90-80"),
            (keys::SKIP_OUTBOUND_CIDRS, "10.0.0.0/33"),
            (keys::SKIP_OUTBOUND_CIDRS, "example.com"),
            (keys::PROXY_MEMORY_LIMIT, "lots"),
            (keys::OPAQUE_PORTS, "mysql"),
            (keys::INBOUND_LOOPBACK_PORTS, "0"),
            (keys::ACCESS_LOG, "yaml"),
            (keys::MESH_HTTP1, "mux"),
            (keys::TRACE_COLLECTOR, "https://otel:4317"),
            (keys::TRACE_COLLECTOR, "otel"),
            (keys::TRACE_COLLECTOR, "otel:4317/v1/traces"),
            (keys::TRACE_SAMPLING, "1.5"),
            (keys::TRACE_SAMPLING, "0.1"),
            (keys::APP_IDLE_TIMEOUT, "3"),
            (keys::APP_IDLE_TIMEOUT, "0s"),
            (keys::UPSTREAM_IDLE_TIMEOUT, "1.5s"),
            (keys::UPSTREAM_IDLE_TIMEOUT, "2d"),
            (keys::HTTP1_IDLE_TIMEOUT, ""),
            (keys::HTTP1_IDLE_TIMEOUT, "0ms"),
            (keys::HTTP2_IDLE_TIMEOUT, "-1m"),
            (keys::PROXY_LOG_LEVEL, "degub"),
            (keys::PROXY_LOG_LEVEL, ""),
            (keys::PROXY_LOG_LEVEL, "info,weft_proxy"),
        ] {
            let err = opts(&[(key, value)]).unwrap_err();
            assert!(
                err.to_string().starts_with(&format!("annotation {key}:")),
                "{err}"
            );
        }
    }

    #[test]
    fn the_log_level_is_the_pods_else_the_meshs() {
        assert_eq!(opts(&[]).unwrap().log_level.as_str(), "info");
        let o = opts(&[(keys::PROXY_LOG_LEVEL, "warn, weft_proxy=debug")]).unwrap();
        assert_eq!(o.log_level.as_str(), "warn,weft_proxy=debug");
        let mesh = InjectConfig {
            log_level: weft_api::LogFilter::parse("debug").unwrap(),
            ..InjectConfig::default()
        };
        let o = PodOptions::from_annotations(None, &mesh).unwrap();
        assert_eq!(o.log_level.as_str(), "debug");
        let err = opts(&[(keys::PROXY_LOG_LEVEL, "degub")]).unwrap_err();
        assert!(
            err.to_string().contains("\"degub\" names no level"),
            "{err}"
        );
    }

    #[test]
    fn timeouts_become_the_proxys_variables_in_its_syntax() {
        assert_eq!(opts(&[]).unwrap().timeouts, []);
        let o = opts(&[
            (keys::HTTP1_IDLE_TIMEOUT, "10m"),
            (keys::APP_IDLE_TIMEOUT, " 500ms "),
            (keys::UPSTREAM_IDLE_TIMEOUT, "1m30s"),
            (keys::HTTP2_IDLE_TIMEOUT, "2h"),
        ])
        .unwrap();
        assert_eq!(
            o.timeouts,
            [
                (keys::env::APP_IDLE_TIMEOUT, "500ms".to_owned()),
                (keys::env::UPSTREAM_IDLE_TIMEOUT, "1m30s".to_owned()),
                (keys::env::HTTP1_IDLE_TIMEOUT, "10m".to_owned()),
                (keys::env::HTTP2_IDLE_TIMEOUT, "2h".to_owned()),
            ]
        );
    }

    #[test]
    fn tracing_needs_a_collector_and_takes_a_sampling_probability() {
        assert_eq!(opts(&[]).unwrap().trace, None);
        let o = opts(&[
            (keys::TRACE_COLLECTOR, "otel-collector.observability:4317"),
            (keys::TRACE_SAMPLING, "0.25"),
        ])
        .unwrap();
        let t = o.trace.unwrap();
        assert_eq!(t.collector, "otel-collector.observability:4317");
        assert_eq!(t.sampling.as_deref(), Some("0.25"));
        let o = opts(&[(keys::TRACE_COLLECTOR, "http://10.0.0.9:4317")]).unwrap();
        assert_eq!(o.trace.unwrap().sampling, None);
    }

    #[test]
    fn mesh_http1_comes_from_the_pod_else_the_mesh_setting() {
        let mesh = InjectConfig {
            mesh_http1: Some("sessions"),
            ..InjectConfig::default()
        };
        let with = |pairs: &[(&str, &str)], cfg: &InjectConfig| {
            let map: BTreeMap<String, String> = pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            PodOptions::from_annotations(Some(&map), cfg).map(|o| o.mesh_http1)
        };
        assert_eq!(with(&[], &InjectConfig::default()), Ok(None));
        assert_eq!(with(&[], &mesh), Ok(Some("sessions")));
        assert_eq!(
            with(&[(keys::MESH_HTTP1, "multiplexed")], &mesh),
            Ok(Some("multiplexed"))
        );
        assert!(with(&[(keys::MESH_HTTP1, "Sessions")], &mesh).is_err());
    }

    #[test]
    fn the_mesh_default_traces_every_pod_and_each_annotation_overrides_its_part() {
        let mesh = InjectConfig {
            tracing: Some(crate::InjectTracing {
                collector: "otel.observability:4317".into(),
                sampling: Some("0.05".into()),
            }),
            ..InjectConfig::default()
        };
        let with = |pairs: &[(&str, &str)]| {
            let map: BTreeMap<String, String> = pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            PodOptions::from_annotations(Some(&map), &mesh).map(|o| o.trace)
        };
        let t = |collector: &str, sampling: Option<&str>| {
            Some(TraceOptions {
                collector: collector.into(),
                sampling: sampling.map(str::to_owned),
                service_name: None,
            })
        };
        assert_eq!(with(&[]), Ok(t("otel.observability:4317", Some("0.05"))));
        assert_eq!(
            with(&[(keys::TRACE_COLLECTOR, "mine:4317")]),
            Ok(t("mine:4317", Some("0.05")))
        );
        assert_eq!(
            with(&[(keys::TRACE_SAMPLING, "1")]),
            Ok(t("otel.observability:4317", Some("1")))
        );
        assert_eq!(with(&[(keys::TRACE_COLLECTOR, "disabled")]), Ok(None));
        // A bad annotation is refused, mesh default or not.
        assert!(with(&[(keys::TRACE_COLLECTOR, "otel")]).is_err());
        assert!(with(&[(keys::TRACE_SAMPLING, "2")]).is_err());
        // Without a mesh default, `disabled` is simply no tracing.
        assert_eq!(
            opts(&[(keys::TRACE_COLLECTOR, "disabled")]).unwrap().trace,
            None
        );
    }

    #[test]
    fn resource_annotations_override_defaults() {
        let o = opts(&[
            (keys::PROXY_CPU_LIMIT, "500m"),
            (keys::PROXY_MEMORY_REQUEST, "32Mi"),
        ])
        .unwrap();
        assert_eq!(o.resources.cpu_limit.as_deref(), Some("500m"));
        assert_eq!(o.resources.memory_request.as_deref(), Some("32Mi"));
        assert_eq!(o.resources.cpu_request.as_deref(), Some("10m"));
    }
}
