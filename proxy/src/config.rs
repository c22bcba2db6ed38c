//! Validation: turns a wire [`ProxyConfig`] into a [`Config`] that cannot hold an invalid
//! state (parsed addresses, non-zero weights, unique names and claims, concrete durations).
//!
//! ```text
//! weft_api::ProxyConfig ──Config::validate──▶ Config ──store::Snapshot::build──▶ runtime
//! ```
//!
//! Validation collects every problem rather than stopping at the first, so a rejected file
//! tells its author all that is wrong at once.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    num::NonZeroU32,
    sync::Arc,
    time::Duration,
};

use weft_api::proxy_config::{
    self as wire, DEFAULT_OPAQUE_PORTS, PROXY_CONFIG_API_VERSION, PROXY_CONFIG_KIND,
};

/// Detection timeout when the config does not set one.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Connect timeout when neither the config nor the service sets one.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The largest endpoint weight accepted.
pub const MAX_WEIGHT: u32 = 10_000;

/// A rejected config, with every problem found.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid config: {}", .problems.join("; "))]
pub struct ConfigError {
    /// One human-readable sentence per problem, naming the field.
    pub problems: Vec<String>,
}

/// A validated proxy configuration.
#[derive(Debug)]
pub struct Config {
    /// The author's label, if any.
    pub version: Option<String>,
    /// How long detection waits for a client's first bytes.
    pub detect_timeout: Duration,
    /// Connect timeout for destinations that are not services (passthrough, inbound).
    pub connect_timeout: Duration,
    /// Ports that skip detection, as a bitmap indexed by port.
    opaque_ports: Box<[u64; 1024]>,
    /// The services, in file order.
    pub services: Vec<Arc<Service>>,
    by_name: HashMap<String, usize>,
    by_addr: HashMap<SocketAddr, usize>,
}

/// A validated service.
#[derive(Debug)]
pub struct Service {
    /// Unique name and metric label.
    pub name: String,
    /// Addresses the outbound listener maps to this service.
    pub addresses: Vec<SocketAddr>,
    /// `true` when connections skip detection.
    pub opaque: bool,
    /// The balancing algorithm.
    pub balancer: wire::Balancer,
    /// Response-header timeout for HTTP requests; `None` waits as long as the client does.
    pub response_timeout: Option<Duration>,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// The endpoints; addresses are unique within the service.
    pub endpoints: Vec<Endpoint>,
}

/// A validated endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Relative share of traffic.
    pub weight: NonZeroU32,
    /// Free-form labels, such as `zone`.
    pub labels: BTreeMap<String, String>,
    /// The identity the endpoint is expected to present (used once mTLS exists).
    pub identity: Option<String>,
}

impl Config {
    /// Validates a wire config completely.
    pub fn validate(raw: &wire::ProxyConfig) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        if raw.api_version != PROXY_CONFIG_API_VERSION {
            problems.push(format!(
                "apiVersion is {:?}, this proxy reads {PROXY_CONFIG_API_VERSION:?}",
                raw.api_version
            ));
        }
        if raw.kind != PROXY_CONFIG_KIND {
            problems.push(format!(
                "kind is {:?}, expected {PROXY_CONFIG_KIND:?}",
                raw.kind
            ));
        }
        if let Some(v) = &raw.version
            && (v.is_empty() || v.len() > 128 || v.chars().any(|c| c.is_control()))
        {
            problems.push("version must be 1 to 128 printable characters".to_owned());
        }
        let detect_timeout = positive(
            &mut problems,
            "detectTimeout",
            raw.detect_timeout.as_ref(),
            DEFAULT_DETECT_TIMEOUT,
        );
        let connect_timeout = positive(
            &mut problems,
            "connectTimeout",
            raw.connect_timeout.as_ref(),
            DEFAULT_CONNECT_TIMEOUT,
        );
        let mut opaque_ports = Box::new([0u64; 1024]);
        for port in raw.opaque_ports.as_deref().unwrap_or(&DEFAULT_OPAQUE_PORTS) {
            if *port == 0 {
                problems.push("opaquePorts: port 0 is not a port".to_owned());
            }
            opaque_ports[usize::from(*port) / 64] |= 1 << (port % 64);
        }

        let mut services = Vec::with_capacity(raw.services.len());
        let mut by_name = HashMap::new();
        let mut by_addr: HashMap<SocketAddr, usize> = HashMap::new();
        for (i, s) in raw.services.iter().enumerate() {
            let at = format!("services[{i}] ({:?})", s.name);
            if !valid_name(&s.name) {
                problems.push(format!(
                    "{at}: name must be 1 to 253 letters, digits, '-', '.' or '_'"
                ));
            }
            if by_name.insert(s.name.clone(), i).is_some() {
                problems.push(format!("{at}: name is used by an earlier service"));
            }
            unknown_fields(&mut problems, &at, &s.unknown);
            let mut addresses = Vec::new();
            for a in &s.addresses {
                match a.parse::<SocketAddr>() {
                    Ok(addr) => {
                        if let Some(other) = by_addr.insert(addr, i) {
                            problems.push(format!(
                                "{at}: address {addr} is already claimed by services[{other}]"
                            ));
                        }
                        addresses.push(addr);
                    }
                    Err(_) => problems.push(format!(
                        "{at}: address {a:?} is not ip:port (such as 10.96.0.10:80)"
                    )),
                }
            }
            let response_timeout = s
                .timeout
                .as_ref()
                .map(|t| positive(&mut problems, &format!("{at}.timeout"), Some(t), t.as_std()));
            let svc_connect_timeout = positive(
                &mut problems,
                &format!("{at}.connectTimeout"),
                s.connect_timeout.as_ref(),
                connect_timeout,
            );
            let mut endpoints: Vec<Endpoint> = Vec::with_capacity(s.endpoints.len());
            for (j, e) in s.endpoints.iter().enumerate() {
                let eat = format!("{at}.endpoints[{j}]");
                unknown_fields(&mut problems, &eat, &e.unknown);
                let addr = match e.address.parse::<SocketAddr>() {
                    Ok(a) if a.port() != 0 => a,
                    _ => {
                        problems.push(format!(
                            "{eat}: address {:?} is not ip:port with a non-zero port",
                            e.address
                        ));
                        continue;
                    }
                };
                if endpoints.iter().any(|x| x.addr == addr) {
                    problems.push(format!("{eat}: address {addr} is listed twice"));
                }
                let w = e.weight.unwrap_or(1);
                let weight = match NonZeroU32::new(w) {
                    Some(w) if w.get() <= MAX_WEIGHT => w,
                    _ => {
                        problems.push(format!("{eat}: weight {w} is not within 1..={MAX_WEIGHT}"));
                        NonZeroU32::MIN
                    }
                };
                endpoints.push(Endpoint {
                    addr,
                    weight,
                    labels: e.labels.clone(),
                    identity: e.identity.clone(),
                });
            }
            services.push(Arc::new(Service {
                name: s.name.clone(),
                addresses,
                opaque: s.protocol == wire::Protocol::Opaque,
                balancer: s.balancer,
                response_timeout,
                connect_timeout: svc_connect_timeout,
                endpoints,
            }));
        }

        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        Ok(Config {
            version: raw.version.clone(),
            detect_timeout,
            connect_timeout,
            opaque_ports,
            services,
            by_name,
            by_addr,
        })
    }

    /// The service claiming this cluster address, if any.
    pub fn service_for_addr(&self, addr: SocketAddr) -> Option<(usize, &Arc<Service>)> {
        let i = *self.by_addr.get(&addr)?;
        self.services.get(i).map(|s| (i, s))
    }

    /// The service with this name, if any.
    pub fn service_by_name(&self, name: &str) -> Option<(usize, &Arc<Service>)> {
        let i = *self.by_name.get(name)?;
        self.services.get(i).map(|s| (i, s))
    }

    /// Whether connections to this port skip detection.
    pub fn is_opaque_port(&self, port: u16) -> bool {
        self.opaque_ports[usize::from(port) / 64] & (1 << (port % 64)) != 0
    }
}

fn positive(
    problems: &mut Vec<String>,
    field: &str,
    value: Option<&weft_api::Duration>,
    default: Duration,
) -> Duration {
    match value {
        None => default,
        Some(d) if d.as_std().is_zero() => {
            problems.push(format!("{field} must be greater than zero"));
            default
        }
        Some(d) => d.as_std(),
    }
}

/// A field this proxy does not know is one it cannot enforce: the config is refused, not
/// half-applied (the operator sends new fields only to proxies that announced them).
fn unknown_fields(
    problems: &mut Vec<String>,
    at: &str,
    unknown: &BTreeMap<String, serde_json::Value>,
) {
    for field in unknown.keys() {
        problems.push(format!(
            "{at}: unknown field {field:?}: {} cannot enforce it",
            crate::enforce::PROXY_AGENT
        ));
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Config, ConfigError> {
        let raw: wire::ProxyConfig = serde_yaml::from_str(yaml).unwrap();
        Config::validate(&raw)
    }

    const HEADER: &str = "apiVersion: weft.dev/proxy/v1alpha1\nkind: ProxyConfig\n";

    #[test]
    fn accepts_a_full_config_and_applies_defaults() {
        let c = parse(&format!(
            "{HEADER}services:\n- name: web\n  addresses: ['10.96.0.10:80', '[fd00::1]:80']\n  endpoints:\n  - address: 127.0.0.2:8080\n    weight: 3\n  - address: '[::1]:8080'\n"
        ))
        .unwrap();
        assert_eq!(c.detect_timeout, DEFAULT_DETECT_TIMEOUT);
        let (_, web) = c
            .service_for_addr("10.96.0.10:80".parse().unwrap())
            .unwrap();
        assert_eq!(web.name, "web");
        assert!(
            c.service_for_addr("[fd00::1]:80".parse().unwrap())
                .is_some()
        );
        assert_eq!(web.endpoints[0].weight.get(), 3);
        assert_eq!(web.endpoints[1].weight.get(), 1);
        assert_eq!(web.response_timeout, None);
        for p in DEFAULT_OPAQUE_PORTS {
            assert!(c.is_opaque_port(p));
        }
        assert!(!c.is_opaque_port(80));
    }

    #[test]
    fn explicit_opaque_ports_replace_the_defaults() {
        let c = parse(&format!("{HEADER}opaquePorts: [8000, 65535]\n")).unwrap();
        assert!(c.is_opaque_port(8000));
        assert!(c.is_opaque_port(65535));
        assert!(!c.is_opaque_port(3306));
    }

    #[test]
    fn a_service_or_endpoint_field_this_proxy_does_not_know_is_refused_by_name() {
        let err = parse(&format!(
            "{HEADER}services:\n- name: web\n  retryBudget: 20\n  endpoints:\n  - address: 127.0.0.2:8080\n    zoneHint: a\n"
        ))
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("services[0] (\"web\"): unknown field \"retryBudget\""),
            "{text}"
        );
        assert!(
            text.contains("services[0] (\"web\").endpoints[0]: unknown field \"zoneHint\""),
            "{text}"
        );
        assert!(text.contains("cannot enforce it"), "{text}");
    }

    #[test]
    fn reports_every_problem_at_once() {
        let err = parse(
            "apiVersion: v0\nkind: ProxyConfig\ndetectTimeout: 0s\nservices:\n- name: 'bad name'\n  addresses: ['nope']\n  endpoints:\n  - address: 127.0.0.1:0\n  - address: 127.0.0.1:1\n    weight: 0\n- name: a\n  addresses: ['10.0.0.1:80']\n- name: a\n  addresses: ['10.0.0.1:80']\n",
        )
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            "apiVersion",
            "detectTimeout must be greater than zero",
            "name must be",
            "\"nope\" is not ip:port",
            "non-zero port",
            "weight 0",
            "name is used by an earlier service",
            "already claimed",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in {text}");
        }
    }
}
