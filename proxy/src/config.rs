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
pub const MAX_WEIGHT: u32 = wire::MAX_ENDPOINT_WEIGHT;

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
    /// Ports that skip detection.
    opaque_ports: PortSet,
    /// The services, in file order.
    pub services: Vec<Arc<Service>>,
    /// The rate limit on requests to this proxy's own workload, validated.
    pub inbound_rate_limit: Option<wire::RateLimitConfig>,
    /// Which transports inbound clients may use (`permissive` when the config says none).
    pub inbound_mtls: wire::MtlsMode,
    /// Inbound authorization; `None` when no policy applies (everything is allowed).
    pub authorization: Option<Arc<crate::authz::Authorizer>>,
    by_name: HashMap<String, usize>,
    by_addr: HashMap<SocketAddr, usize>,
    /// Meshed endpoint addresses: (service, endpoint) of the first service listing each.
    by_meshed_endpoint: HashMap<SocketAddr, (usize, usize)>,
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
    /// How HTTP requests to the service are routed; `None`: all to `endpoints`.
    pub route: Option<Arc<crate::rules::Route>>,
    /// The retry budget of the service's requests (rules without their own share it).
    pub retry_budget: crate::retry::BudgetSpec,
    /// Circuit breaking (outlier ejection, pool limits), when the service has a Breaker.
    pub breaker: Option<crate::breaker::BreakerSpec>,
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
    /// The identity the endpoint must present over mutual TLS; `None`: not meshed, plain text.
    pub identity: Option<String>,
}

impl Config {
    /// Validates a wire config, and then what it asks of this proxy's request limits: a
    /// Route rule whose header edits alone pass them is refused, since every request it
    /// took would be refused `431` after the edits. How the proxy accepts a config.
    pub fn validate_within(
        raw: &wire::ProxyConfig,
        limits: &crate::limits::Limits,
    ) -> Result<Config, ConfigError> {
        let config = Config::validate(raw)?;
        let problems: Vec<String> = config
            .services
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, s, s.route.as_ref()?)))
            .flat_map(|(i, s, route)| {
                route.edits_beyond(limits, &format!("services[{i}] ({:?}).route", s.name))
            })
            .collect();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Validates a wire config completely, apart from the proxy's own limits
    /// ([`Config::validate_within`]): what a config means, whichever proxy reads it.
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
        let mut opaque_ports = PortSet::default();
        for port in raw.opaque_ports.as_deref().unwrap_or(&DEFAULT_OPAQUE_PORTS) {
            if *port == 0 {
                problems.push("opaquePorts: port 0 is not a port".to_owned());
            }
            opaque_ports.insert(*port);
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
            let retry_budget = match crate::retry::BudgetSpec::from_wire(
                s.retry_budget.as_ref(),
                &format!("{at}.retryBudget"),
            ) {
                Ok(b) => b,
                Err(p) => {
                    problems.extend(p);
                    crate::retry::BudgetSpec::default()
                }
            };
            let breaker = s.breaker.as_ref().and_then(|b| {
                crate::breaker::BreakerSpec::from_wire(b, &format!("{at}.breaker"))
                    .map_err(|p| problems.extend(p))
                    .ok()
            });
            services.push(Service {
                name: s.name.clone(),
                addresses,
                opaque: s.protocol == wire::Protocol::Opaque,
                balancer: s.balancer,
                response_timeout,
                connect_timeout: svc_connect_timeout,
                endpoints,
                route: None,
                retry_budget,
                breaker,
            });
        }
        // Routes name other services as backends: compiled once every name is known.
        for (i, s) in raw.services.iter().enumerate() {
            let Some(route) = &s.route else { continue };
            let at = format!("services[{i}] ({:?}).route", s.name);
            match crate::rules::Route::from_wire(route, &at, &by_name) {
                Ok(r) => {
                    if let Some(svc) = services.get_mut(i) {
                        svc.route = Some(Arc::new(r));
                    }
                }
                Err(p) => problems.extend(p),
            }
        }
        let services: Vec<Arc<Service>> = services.into_iter().map(Arc::new).collect();
        // A service with cluster addresses first: it is where the pod's port is declared
        // opaque or not, and where its Breaker's state lives; an address-less (headless)
        // one only lists pods that no other service does.
        let mut by_meshed_endpoint = HashMap::new();
        let mut ordered: Vec<(usize, &Arc<Service>)> = services.iter().enumerate().collect();
        ordered.sort_by_key(|(_, s)| s.addresses.is_empty());
        for (i, s) in ordered {
            for (j, e) in s.endpoints.iter().enumerate() {
                if e.identity.is_some() {
                    by_meshed_endpoint.entry(e.addr).or_insert((i, j));
                }
            }
        }
        let inbound_mtls = raw
            .inbound
            .as_ref()
            .and_then(|i| i.mtls)
            .unwrap_or_default();
        let authorization = match raw.inbound.as_ref().map(|i| i.authorization.as_slice()) {
            None | Some([]) => None,
            Some(policies) => {
                match crate::authz::Authorizer::from_wire(policies, "inbound.authorization") {
                    Ok(a) => Some(Arc::new(a)),
                    Err(p) => {
                        problems.extend(p);
                        None
                    }
                }
            }
        };
        let inbound_rate_limit = raw.inbound.as_ref().and_then(|i| i.rate_limit.as_ref());
        if let Some(limit) = inbound_rate_limit
            && let Err(p) = crate::ratelimit::RateLimiter::from_wire(limit, "inbound.rateLimit")
        {
            problems.extend(p);
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
            inbound_rate_limit: inbound_rate_limit.cloned(),
            inbound_mtls,
            authorization,
            by_name,
            by_addr,
            by_meshed_endpoint,
        })
    }

    /// The service claiming this cluster address, if any.
    pub fn service_for_addr(&self, addr: SocketAddr) -> Option<(usize, &Arc<Service>)> {
        let i = *self.by_addr.get(&addr)?;
        self.services.get(i).map(|s| (i, s))
    }

    /// The meshed endpoint at this address, as indices of its service and of it there: the
    /// first service listing it (every service gives a pod the same identity).
    pub fn meshed_endpoint(&self, addr: SocketAddr) -> Option<(usize, usize)> {
        self.by_meshed_endpoint.get(&addr).copied()
    }

    /// The service with this name, if any.
    pub fn service_by_name(&self, name: &str) -> Option<(usize, &Arc<Service>)> {
        let i = *self.by_name.get(name)?;
        self.services.get(i).map(|s| (i, s))
    }

    /// Whether connections to this port skip detection.
    pub fn is_opaque_port(&self, port: u16) -> bool {
        self.opaque_ports.contains(port)
    }
}

/// A set of TCP ports, as a bitmap: one load and a mask per lookup on the connection path.
/// Parses from the list format of the injector and `weft-proxy init`
/// (`3306,9000-9010`; empty means none).
#[derive(Clone, PartialEq, Eq)]
pub struct PortSet(Box<[u64; 1024]>);

impl Default for PortSet {
    fn default() -> Self {
        PortSet(Box::new([0; 1024]))
    }
}

impl PortSet {
    /// Adds `port`.
    pub fn insert(&mut self, port: u16) {
        self.0[usize::from(port) / 64] |= 1 << (port % 64);
    }

    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        self.0[usize::from(port) / 64] & (1 << (port % 64)) != 0
    }

    /// Whether no port is in the set.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// The ports in the set, in order.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        (0..=u16::MAX).filter(|p| self.contains(*p))
    }
}

impl std::str::FromStr for PortSet {
    type Err = crate::init::rules::ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let list: crate::init::rules::PortList = s.parse()?;
        let mut set = PortSet::default();
        for range in list.0 {
            for port in range.ports() {
                set.insert(port);
            }
        }
        Ok(set)
    }
}

/// Shown as the list it parses from (`3306,9000-9010`), so a wide range stays short.
impl std::fmt::Debug for PortSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ports = self.iter().peekable();
        let mut first = true;
        while let Some(start) = ports.next() {
            let mut end = start;
            while ports.peek() == Some(&end.wrapping_add(1)) && end != u16::MAX {
                end = ports.next().unwrap_or(end);
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
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
pub(crate) mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Config, ConfigError> {
        let raw: wire::ProxyConfig = serde_yaml::from_str(yaml).unwrap();
        Config::validate(&raw)
    }

    const HEADER: &str = "apiVersion: weft.dev/proxy/v1alpha1\nkind: ProxyConfig\n";

    /// A config whose one service's Route has a rule setting `set` and adding `add`
    /// request fields, each value `value_len` bytes.
    fn edits(set: usize, add: usize, value_len: usize) -> wire::ProxyConfig {
        let field = |kind: &str, i: usize| serde_json::json!({"name": format!("x-{kind}-{i}"), "value": "v".repeat(value_len)});
        serde_json::from_value(serde_json::json!({
            "apiVersion": "weft.dev/proxy/v1alpha1", "kind": "ProxyConfig",
            "services": [{"name": "web", "endpoints": [{"address": "127.0.0.2:80"}],
                "route": {"name": "shop/web", "rules": [{}, {"requestHeaders": {
                    "set": (0..set).map(|i| field("set", i)).collect::<Vec<_>>(),
                    "add": (0..add).map(|i| field("add", i)).collect::<Vec<_>>(),
                }}]}}],
        }))
        .unwrap()
    }

    /// A rule whose request edits alone pass the proxy's limits would have every request
    /// it takes refused 431: the proxy refuses the config, naming the rule, the figure and
    /// the flag. The same config is valid as such, and for a proxy with room for it.
    #[test]
    fn route_edits_beyond_the_request_limits_are_refused_by_the_proxy() {
        let limits = crate::limits::Limits::default();
        // 16 + 16 fields of 2 KiB: 64 KiB, above the default 60 KiB.
        let big = edits(16, 16, 2048);
        assert!(Config::validate(&big).is_ok());
        let err = Config::validate_within(&big, &limits).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        // Names: ten of 7 bytes and six of 8, twice; values 32 × 2,048.
        assert!(
            err.problems[0].starts_with(
                "services[0] (\"web\").route.rules[1].requestHeaders: set and add write \
                 65772 bytes of fields, above the proxy's limit of 61440 bytes"
            ),
            "{err}"
        );
        assert!(
            err.problems[0].contains("--max-request-headers-bytes"),
            "{err}"
        );
        assert!(err.problems[0].contains("431"), "{err}");
        let roomy = crate::limits::Limits {
            max_request_headers_bytes: 128 * 1024,
            ..limits
        };
        assert!(Config::validate_within(&big, &roomy).is_ok());
        // Half of it fits.
        assert!(Config::validate_within(&edits(8, 8, 2048), &limits).is_ok());

        let few = crate::limits::Limits {
            max_request_headers_count: 10,
            max_header_line_bytes: 1000,
            ..limits
        };
        let err = Config::validate_within(&edits(6, 6, 1024), &few).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("set and add write 12 fields"), "{text}");
        assert!(text.contains("--max-request-headers-count"), "{text}");
        assert!(text.contains("the field x-set-0 is 1031 bytes"), "{text}");
        assert!(text.contains("--max-header-line-bytes"), "{text}");
        assert!(Config::validate_within(&edits(5, 5, 900), &few).is_ok());
    }

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
    fn meshed_endpoints_are_found_by_address_in_the_first_service_listing_them() {
        let c = parse(&format!(
            "{HEADER}services:\n\
             - name: kafka\n  addresses: ['198.19.0.10:9092']\n  endpoints:\n\
             \x20 - {{address: '198.18.0.5:9092', identity: 'spiffe://cluster.local/ns/q/sa/kafka'}}\n\
             \x20 - {{address: '198.18.0.6:9092'}}\n\
             - name: kafka-admin\n  addresses: ['198.19.0.11:9092']\n  endpoints:\n\
             \x20 - {{address: '198.18.0.7:9092', identity: 'spiffe://cluster.local/ns/q/sa/kafka'}}\n\
             \x20 - {{address: '198.18.0.5:9092', identity: 'spiffe://cluster.local/ns/q/sa/kafka'}}\n"
        ))
        .unwrap();
        let at = |a: &str| c.meshed_endpoint(a.parse().unwrap());
        assert_eq!(at("198.18.0.5:9092"), Some((0, 0)));
        assert_eq!(at("198.18.0.7:9092"), Some((1, 0)));
        // Not meshed, another port of a meshed pod, a service's own address.
        assert_eq!(at("198.18.0.6:9092"), None);
        assert_eq!(at("198.18.0.5:9093"), None);
        assert_eq!(at("198.19.0.10:9092"), None);
    }

    #[test]
    fn a_headless_service_lists_a_meshed_endpoint_only_where_no_service_with_addresses_does() {
        // `kafka-headless.q.9092` sorts before `kafka.q.9092`, as the operator sends them.
        let c = parse(&format!(
            "{HEADER}services:\n\
             - name: kafka-headless.q.9092\n  addresses: []\n  endpoints:\n\
             \x20 - {{address: '198.18.0.5:9092', identity: 'spiffe://cluster.local/ns/q/sa/kafka'}}\n\
             \x20 - {{address: '198.18.0.8:9092', identity: 'spiffe://cluster.local/ns/q/sa/kafka'}}\n\
             - name: kafka.q.9092\n  addresses: ['198.19.0.10:9092']\n  protocol: opaque\n  endpoints:\n\
             \x20 - {{address: '198.18.0.5:9092', identity: 'spiffe://cluster.local/ns/q/sa/kafka'}}\n"
        ))
        .unwrap();
        let at = |a: &str| c.meshed_endpoint(a.parse().unwrap());
        assert_eq!(
            at("198.18.0.5:9092"),
            Some((1, 0)),
            "the cluster IP's service"
        );
        assert_eq!(
            at("198.18.0.8:9092"),
            Some((0, 1)),
            "listed by the headless one alone"
        );
    }

    #[test]
    fn explicit_opaque_ports_replace_the_defaults() {
        let c = parse(&format!("{HEADER}opaquePorts: [8000, 65535]\n")).unwrap();
        assert!(c.is_opaque_port(8000));
        assert!(c.is_opaque_port(65535));
        assert!(!c.is_opaque_port(3306));
    }

    #[test]
    fn port_sets_parse_the_injectors_lists() {
        let set: PortSet = "3306, 9000-9002,65535".parse().unwrap();
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            [3306, 9000, 9001, 9002, 65535]
        );
        assert!(!set.contains(80));
        assert_eq!(format!("{set:?}"), "3306,9000-9002,65535");
        assert!("".parse::<PortSet>().unwrap().is_empty());
        for bad in ["mysql", "0", "70000", "9010-9000"] {
            assert!(bad.parse::<PortSet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_service_or_endpoint_field_this_proxy_does_not_know_is_refused_by_name() {
        let err = parse(&format!(
            "{HEADER}services:\n- name: web\n  localityFailover: true\n  endpoints:\n  - address: 127.0.0.2:8080\n    zoneHint: a\n"
        ))
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("services[0] (\"web\"): unknown field \"localityFailover\""),
            "{text}"
        );
        assert!(
            text.contains("services[0] (\"web\").endpoints[0]: unknown field \"zoneHint\""),
            "{text}"
        );
        assert!(text.contains("cannot enforce it"), "{text}");
    }

    #[test]
    fn a_breaker_is_validated_with_its_field_path() {
        let c = parse(&format!(
            "{HEADER}services:\n- name: db\n  breaker:\n    name: shop/db\n    connectionPool: {{maxRequests: 4}}\n  endpoints:\n  - address: 127.0.0.2:8080\n"
        ))
        .unwrap();
        let spec = c.services[0].breaker.as_ref().unwrap();
        assert_eq!(
            spec.pool.and_then(|p| p.max_requests).map(|n| n.get()),
            Some(4)
        );
        let err = parse(&format!(
            "{HEADER}services:\n- name: db\n  breaker:\n    name: shop/db\n    outlierDetection: {{consecutive5xx: 5, consecutiveConnectFailures: 5, interval: 10s, baseEjectionTime: 1m, maxEjectionTime: 30s, maxEjectedPercent: 50}}\n"
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains(
                "services[0] (\"db\").breaker.outlierDetection.baseEjectionTime: 1m exceeds maxEjectionTime 30s"
            ),
            "{err}"
        );
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
    pub(crate) mod properties {
        //! Arbitrary configs, shared with the store's property test.
        use super::*;
        use proptest::prelude::*;
        use serde_json::{Value, json};

        fn duration() -> impl Strategy<Value = Option<Value>> {
            proptest::option::of(prop_oneof![
                Just("0s".to_owned()),
                Just("0ms".to_owned()),
                "[0-9]{1,3}(ms|s)",
                "[0-9]{1,5}h[0-9]{1,5}m",
            ])
            .prop_map(|d| d.map(Value::from))
        }

        fn address() -> impl Strategy<Value = String> {
            prop_oneof![
                (1u8..4, 0u16..3).prop_map(|(h, p)| format!("127.0.0.{h}:{p}")),
                (0u16..3).prop_map(|p| format!("[::1]:{p}")),
                Just("10.96.0.1:80".to_owned()),
                "[ -~]{0,12}",
            ]
        }

        fn endpoint() -> impl Strategy<Value = Value> {
            (
                address(),
                proptest::option::of(prop_oneof![
                    0u32..4,
                    Just(MAX_WEIGHT),
                    Just(MAX_WEIGHT + 1),
                    any::<u32>()
                ]),
            )
                .prop_map(|(address, weight)| {
                    let mut e = json!({"address": address});
                    if let Some(w) = weight {
                        e["weight"] = json!(w);
                    }
                    e
                })
        }

        fn service() -> impl Strategy<Value = Value> {
            (
                prop_oneof!["[a-c]{1,2}", "[ -~]{0,6}", Just("x".repeat(254))],
                proptest::collection::vec(address(), 0..3),
                any::<bool>(),
                any::<bool>(),
                duration(),
                duration(),
                proptest::collection::vec(endpoint(), 0..5),
            )
                .prop_map(
                    |(name, addresses, opaque, rr, timeout, connect, endpoints)| {
                        let mut s = json!({
                            "name": name,
                            "addresses": addresses,
                            "protocol": if opaque { "opaque" } else { "detect" },
                            "balancer": if rr { "roundRobin" } else { "peakEwma" },
                            "endpoints": endpoints,
                        });
                        if let Some(t) = timeout {
                            s["timeout"] = t;
                        }
                        if let Some(t) = connect {
                            s["connectTimeout"] = t;
                        }
                        s
                    },
                )
        }

        /// Wire configs, valid or not in every field validation checks.
        pub(crate) fn raw_config() -> impl Strategy<Value = wire::ProxyConfig> {
            (
                prop_oneof![4 => Just(PROXY_CONFIG_API_VERSION.to_owned()), 1 => "[ -~]{0,8}"],
                prop_oneof![4 => Just(PROXY_CONFIG_KIND.to_owned()), 1 => "[ -~]{0,8}"],
                proptest::option::of(prop_oneof![
                    "[ -~]{0,8}",
                    "\\PC{0,4}[\\x00-\\x1f]",
                    Just("v".repeat(129))
                ]),
                duration(),
                duration(),
                proptest::option::of(proptest::collection::vec(
                    prop_oneof![Just(0u16), any::<u16>()],
                    0..4,
                )),
                proptest::collection::vec(service(), 0..4),
            )
                .prop_filter_map(
                    "not a wire config",
                    |(api, kind, version, detect, connect, opaque, services)| {
                        let mut c = json!({"apiVersion": api, "kind": kind, "services": services});
                        if let Some(v) = version {
                            c["version"] = json!(v);
                        }
                        if let Some(d) = detect {
                            c["detectTimeout"] = d;
                        }
                        if let Some(d) = connect {
                            c["connectTimeout"] = d;
                        }
                        if let Some(o) = opaque {
                            c["opaquePorts"] = json!(o);
                        }
                        serde_json::from_value(c).ok()
                    },
                )
        }

        /// Whether a problem starts with the path of the field it is about.
        fn names_a_field(problem: &str) -> bool {
            const TOP: [&str; 6] = [
                "apiVersion ",
                "kind ",
                "version ",
                "detectTimeout ",
                "connectTimeout ",
                "opaquePorts: ",
            ];
            if TOP.iter().any(|f| problem.starts_with(f)) {
                return true;
            }
            let Some(rest) = problem.strip_prefix("services[") else {
                return false;
            };
            let Some((index, rest)) = rest.split_once("] (") else {
                return false;
            };
            if index.parse::<usize>().is_err() {
                return false;
            }
            // Skip the quoted name (Debug-escaped, so a quote inside is `\"`), then
            // `: <field> ...` or `.<field>...`.
            let mut chars = rest.char_indices();
            if chars.next().map(|(_, c)| c) != Some('"') {
                return false;
            }
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let Some(field) = end.and_then(|i| rest[i + 1..].strip_prefix(')')) else {
                return false;
            };
            [
                ": name ",
                ": address ",
                ".timeout ",
                ".connectTimeout ",
                ".endpoints[",
                ".breaker",
            ]
            .iter()
            .any(|f| field.starts_with(f))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_config_is_accepted_or_rejected_with_problems_naming_fields(raw in raw_config()) {
                match Config::validate(&raw) {
                    Ok(c) => {
                        prop_assert_eq!(c.services.len(), raw.services.len());
                        for s in &c.services {
                            for e in &s.endpoints {
                                prop_assert!(e.weight.get() <= MAX_WEIGHT);
                            }
                        }
                    }
                    Err(e) => {
                        prop_assert!(!e.problems.is_empty());
                        for p in &e.problems {
                            prop_assert!(names_a_field(p), "{p:?} names no field");
                        }
                    }
                }
            }
        }
    }
}
