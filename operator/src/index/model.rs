//! The index's own model of cluster objects, and the conversions into it.
//!
//! Kubernetes objects carry far more than the mesh needs; each kind is reduced here, once,
//! at the edge, to the few fields the index reads. Conversions never fail on odd input:
//! what cannot be used (an unparsable IP, a port out of range) is dropped.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, Time},
};
use kube::ResourceExt;
use weft_api::proxy_config::DEFAULT_OPAQUE_PORTS;
use weft_crds::{BreakerSpec, PolicySpec, RouteSpec};

/// Pod label that marks a pod as meshed (set by the injector). The Pod watch selects on
/// it, so unmeshed pods cost the operator nothing.
pub const MESHED_LABEL: &str = "weft.dev/meshed";

/// Pod or Namespace annotation: the namespaces whose Services a proxy receives, besides
/// its own, comma-separated; `*` for every namespace. The pod's annotation wins over its
/// namespace's.
pub const VISIBLE_NAMESPACES_ANNOTATION: &str = crate::inject::keys::VISIBLE_NAMESPACES;

/// Service port `appProtocol` values that make the proxy skip protocol detection.
pub const OPAQUE_APP_PROTOCOLS: [&str; 2] = ["tcp", "weft.dev/opaque"];

/// A namespaced object's identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// The namespace.
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl ObjectKey {
    /// A key from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Parses `namespace/name`.
    pub fn parse(s: &str) -> Option<Self> {
        let (ns, name) = s.split_once('/')?;
        (!ns.is_empty() && !name.is_empty() && !name.contains('/')).then(|| Self::new(ns, name))
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The kinds the index holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// core/v1 Namespace (cluster-scoped; keyed with an empty namespace).
    Namespace,
    /// core/v1 Service.
    Service,
    /// discovery/v1 EndpointSlice.
    EndpointSlice,
    /// core/v1 Pod, meshed ones only.
    Pod,
    /// weft.dev Route.
    Route,
    /// weft.dev Policy.
    Policy,
    /// weft.dev Breaker.
    Breaker,
}

impl Kind {
    /// Every kind, in a stable order.
    pub const ALL: [Kind; 7] = [
        Kind::Namespace,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::Route,
        Kind::Policy,
        Kind::Breaker,
    ];

    /// Whether this is one of Weft's own resources (Route, Policy, Breaker), which carry a
    /// status the operator writes.
    pub fn is_weft(self) -> bool {
        matches!(self, Kind::Route | Kind::Policy | Kind::Breaker)
    }

    /// The Kubernetes kind name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::Route => "Route",
            Kind::Policy => "Policy",
            Kind::Breaker => "Breaker",
        }
    }
}

/// What the index keeps of a Namespace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NamespaceModel {
    /// The value of [`VISIBLE_NAMESPACES_ANNOTATION`], if set.
    pub visible: Option<String>,
    /// The value of the injection label `weft.dev/inject`, if set (read by the webhook).
    pub inject: Option<String>,
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq)]
pub struct ServicePort {
    /// The port's name (empty when unnamed), matched against EndpointSlice port names.
    pub name: String,
    /// The Service port.
    pub port: u16,
    /// Whether connections skip protocol detection: the port is one of the
    /// [`DEFAULT_OPAQUE_PORTS`] every proxy treats as opaque (the operator sends no
    /// `opaquePorts` of its own), its `appProtocol` is one of [`OPAQUE_APP_PROTOCOLS`], or
    /// the Service's `weft.dev/opaque-ports` annotation lists it.
    pub opaque: bool,
}

impl ServicePort {
    /// How proxies treat the port's connections.
    pub fn protocol(&self) -> weft_api::proxy_config::Protocol {
        if self.opaque {
            weft_api::proxy_config::Protocol::Opaque
        } else {
            weft_api::proxy_config::Protocol::Detect
        }
    }
}

/// What the index keeps of a Service.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceModel {
    /// Cluster IPs; empty for headless and ExternalName Services.
    pub cluster_ips: Vec<IpAddr>,
    /// TCP ports.
    pub ports: Vec<ServicePort>,
    /// The pod selector, for Policies that target a Service.
    pub selector: Option<BTreeMap<String, String>>,
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceEndpoint {
    /// Addresses (IPv4 or IPv6 slices only).
    pub addresses: Vec<IpAddr>,
    /// Ready for new connections: ready, and not terminating.
    pub ready: bool,
    /// The backing pod's name, when the target is a Pod.
    pub pod: Option<String>,
    /// The topology zone.
    pub zone: Option<String>,
}

/// What the index keeps of an EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SliceModel {
    /// The Service the slice belongs to (`kubernetes.io/service-name`).
    pub service: String,
    /// (port name, port number) pairs.
    pub ports: Vec<(String, u16)>,
    /// The endpoints.
    pub endpoints: Vec<SliceEndpoint>,
}

/// What the index keeps of a meshed Pod.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodModel {
    /// The ServiceAccount the pod runs as (and whose token it presents).
    pub service_account: String,
    /// Labels, for Policy selectors.
    pub labels: BTreeMap<String, String>,
    /// The value of [`VISIBLE_NAMESPACES_ANNOTATION`], if set.
    pub visible: Option<String>,
    /// Inbound ports the pod's redirect leaves to the application (the proxy's admin port
    /// and `weft.dev/skip-inbound-ports`): no proxy answers there, so no client may
    /// originate mutual TLS to them.
    pub skip_inbound: Vec<crate::inject::annotations::PortRange>,
    /// The proxy's admin port (`WEFT_ADMIN_ADDR` of its container), always skipped.
    pub admin_port: Option<u16>,
    /// The pod's own addresses while it holds them: none on the host's network or once
    /// it has finished, when its address may already be another pod's.
    pub ips: Vec<IpAddr>,
    /// The TCP ports its application's containers declare (`containerPort`), where
    /// meshed clients dialling the pod by address originate mutual TLS.
    pub ports: Vec<u16>,
    /// The ports its proxy takes as opaque TCP inbound (`weft.dev/opaque-ports`), which
    /// clients dialling the pod by address then forward without detection too.
    pub opaque: Vec<crate::inject::annotations::PortRange>,
}

impl PodModel {
    /// Whether connections to the pod's `port` reach its proxy (are not skipped).
    pub fn intercepts(&self, port: u16) -> bool {
        !self
            .skip_inbound
            .iter()
            .any(|r| (r.start..=r.end).contains(&port))
    }

    /// Whether the pod's proxy takes connections to `port` as opaque TCP.
    pub fn is_opaque(&self, port: u16) -> bool {
        self.opaque
            .iter()
            .any(|r| (r.start..=r.end).contains(&port))
    }

    /// The skipped ports that are the application's (all but the proxy's admin port):
    /// there, neither the pod's mTLS mode nor its authorization applies.
    pub fn app_skipped(&self) -> impl Iterator<Item = &crate::inject::annotations::PortRange> {
        self.skip_inbound
            .iter()
            .filter(|r| !(r.start == r.end && Some(r.start) == self.admin_port))
    }
}

/// Metadata the index keeps of a Weft resource.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResourceMeta {
    /// `metadata.generation`.
    pub generation: i64,
    /// `metadata.creationTimestamp`: the older of two conflicting Routes wins.
    pub created: Option<Time>,
    /// `metadata.uid`: tells an object from one deleted and re-created under its name,
    /// whose generation starts over (the status writer must not take one for the other).
    pub uid: Option<String>,
}

/// A Weft resource's spec, or why it could not be read.
#[derive(Clone, Debug, PartialEq)]
pub enum Parsed<T> {
    /// The spec, as the API server stored it.
    Valid(T),
    /// The object did not deserialize; the message says why.
    Invalid(String),
}

/// What the index keeps of a Route.
pub type RouteModel = (ResourceMeta, Parsed<RouteSpec>);
/// What the index keeps of a Policy.
pub type PolicyModel = (ResourceMeta, Parsed<PolicySpec>);
/// What the index keeps of a Breaker.
pub type BreakerModel = (ResourceMeta, Parsed<BreakerSpec>);

/// One object of any kind, converted.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    /// A Namespace.
    Namespace(NamespaceModel),
    /// A Service.
    Service(ServiceModel),
    /// An EndpointSlice.
    EndpointSlice(SliceModel),
    /// A meshed Pod.
    Pod(PodModel),
    /// A Route.
    Route(RouteModel),
    /// A Policy.
    Policy(PolicyModel),
    /// A Breaker.
    Breaker(BreakerModel),
}

impl Object {
    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Pod(_) => Kind::Pod,
            Object::Route(_) => Kind::Route,
            Object::Policy(_) => Kind::Policy,
            Object::Breaker(_) => Kind::Breaker,
        }
    }
}

fn key_of<K: kube::Resource>(obj: &K) -> ObjectKey {
    ObjectKey::new(obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Converts a Namespace.
pub fn namespace(ns: &Namespace) -> (ObjectKey, Object) {
    (
        ObjectKey::new("", ns.name_any()),
        Object::Namespace(NamespaceModel {
            visible: ns.annotations().get(VISIBLE_NAMESPACES_ANNOTATION).cloned(),
            inject: ns.labels().get(crate::inject::keys::INJECT).cloned(),
        }),
    )
}

/// Converts a Service.
pub fn service(svc: &Service) -> (ObjectKey, Object) {
    let spec = svc.spec.clone().unwrap_or_default();
    let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = &spec.cluster_ip
    {
        ips.push(ip.clone());
    }
    let cluster_ips = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
    let key = key_of(svc);
    let annotated = opaque_ports_annotation(&key, svc);
    let ports = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok().filter(|p| *p != 0)?;
            Some(ServicePort {
                name: p.name.unwrap_or_default(),
                port,
                // The operator sends no `opaquePorts`, so every proxy also forwards the
                // default ones as bytes, whatever the Service says.
                opaque: DEFAULT_OPAQUE_PORTS.contains(&port)
                    || p.app_protocol
                        .as_deref()
                        .is_some_and(|a| OPAQUE_APP_PROTOCOLS.contains(&a))
                    || annotated.iter().any(|r| (r.start..=r.end).contains(&port)),
            })
        })
        .collect();
    (
        key,
        Object::Service(ServiceModel {
            cluster_ips,
            ports,
            selector: spec.selector,
        }),
    )
}

/// The port ranges of a Service's `weft.dev/opaque-ports` annotation, in the pod
/// annotation's format. A malformed value is dropped with a warning (the ports are then
/// detected, which costs server-first protocols the detection timeout, nothing more).
fn opaque_ports_annotation(
    key: &ObjectKey,
    svc: &Service,
) -> Vec<crate::inject::annotations::PortRange> {
    let k = crate::inject::keys::OPAQUE_PORTS;
    match crate::inject::annotations::ports(k, svc.annotations().get(k).map(String::as_str)) {
        Ok(ranges) => ranges,
        Err(error) => {
            tracing::warn!(service = %key, %error, "annotation ignored");
            Vec::new()
        }
    }
}

/// Converts an EndpointSlice. Slices of address type FQDN carry no IPs and convert to a
/// slice without endpoints.
pub fn endpoint_slice(slice: &EndpointSlice) -> (ObjectKey, Object) {
    let service = slice
        .labels()
        .get("kubernetes.io/service-name")
        .cloned()
        .unwrap_or_default();
    let ip_family = matches!(slice.address_type.as_str(), "IPv4" | "IPv6");
    let ports = slice
        .ports
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            Some((
                p.name.unwrap_or_default(),
                u16::try_from(p.port?).ok().filter(|p| *p != 0)?,
            ))
        })
        .collect();
    let endpoints = if ip_family {
        slice
            .endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.clone().unwrap_or_default();
                SliceEndpoint {
                    addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                    ready: c.ready.unwrap_or(true) && !c.terminating.unwrap_or(false),
                    pod: e
                        .target_ref
                        .as_ref()
                        .filter(|r| r.kind.as_deref() == Some("Pod"))
                        .and_then(|r| r.name.clone()),
                    zone: e.zone.clone(),
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    (
        key_of(slice),
        Object::EndpointSlice(SliceModel {
            service,
            ports,
            endpoints,
        }),
    )
}

/// Converts a Pod.
pub fn pod(pod: &Pod) -> (ObjectKey, Object) {
    let spec = pod.spec.clone().unwrap_or_default();
    (
        key_of(pod),
        Object::Pod(PodModel {
            service_account: spec
                .service_account_name
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
            labels: pod.labels().clone(),
            visible: pod
                .annotations()
                .get(VISIBLE_NAMESPACES_ANNOTATION)
                .cloned(),
            skip_inbound: skipped_inbound_ports(&key_of(pod), &spec),
            admin_port: admin_port(&spec),
            ips: pod_ips(pod, &spec),
            ports: declared_ports(&spec),
            opaque: opaque_ports(&key_of(pod), &spec),
        }),
    )
}

/// The pod's addresses, or none when they are not its own: on the host's network (the
/// node's), or once the pod has finished and its address is free for another pod.
fn pod_ips(pod: &Pod, spec: &k8s_openapi::api::core::v1::PodSpec) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let finished = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    if finished || spec.host_network == Some(true) {
        return Vec::new();
    }
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .chain(status.pod_ip.as_deref())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    ips.sort_unstable();
    ips.dedup();
    ips
}

/// The TCP ports the pod's application containers declare, sorted and without repeats;
/// the proxy's own are left out.
fn declared_ports(spec: &k8s_openapi::api::core::v1::PodSpec) -> Vec<u16> {
    let mut ports: Vec<u16> = spec
        .containers
        .iter()
        // Sidecars (init containers that keep running) serve; other init containers
        // have exited by the time anyone dials the pod.
        .chain(
            spec.init_containers
                .iter()
                .flatten()
                .filter(|c| c.restart_policy.as_deref() == Some("Always")),
        )
        .filter(|c| c.name != crate::inject::keys::PROXY_CONTAINER)
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .filter_map(|p| u16::try_from(p.container_port).ok().filter(|p| *p != 0))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The admin port the pod's proxy listens on, from its container's environment.
fn admin_port(spec: &k8s_openapi::api::core::v1::PodSpec) -> Option<u16> {
    proxy_env(spec, crate::inject::keys::env::ADMIN_ADDR)
        .and_then(|v| v.parse::<std::net::SocketAddr>().ok())
        .map(|a| a.port())
}

/// The ports the pod's proxy was told to take as opaque inbound, from its container's
/// environment (which, unlike the annotation it was written from, cannot change).
fn opaque_ports(
    key: &ObjectKey,
    spec: &k8s_openapi::api::core::v1::PodSpec,
) -> Vec<crate::inject::annotations::PortRange> {
    let value = proxy_env(spec, crate::inject::keys::env::OPAQUE_PORTS);
    match crate::inject::annotations::ports(crate::inject::keys::OPAQUE_PORTS, value) {
        Ok(ranges) => ranges,
        Err(error) => {
            tracing::warn!(pod = %key, %error, "unreadable opaque ports on the pod's proxy; clients dialling it by address will detect every port");
            Vec::new()
        }
    }
}

/// The value of variable `name` in the pod's proxy container.
fn proxy_env<'a>(spec: &'a k8s_openapi::api::core::v1::PodSpec, name: &str) -> Option<&'a str> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .filter(|c| c.name == crate::inject::keys::PROXY_CONTAINER)
        .flat_map(|c| c.env.iter().flatten())
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

/// The inbound ports the pod's init container was told to skip. They are read from its
/// arguments, not the pod's annotation: the rules were installed from them when the pod
/// started, and unlike annotations a pod's containers cannot change afterwards.
fn skipped_inbound_ports(
    key: &ObjectKey,
    spec: &k8s_openapi::api::core::v1::PodSpec,
) -> Vec<crate::inject::annotations::PortRange> {
    const FLAG: &str = "--skip-inbound-ports";
    const ENV: &str = "WEFT_INIT_SKIP_INBOUND_PORTS";
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == crate::inject::keys::INIT_CONTAINER);
    // As `weft-proxy init` reads it: `--flag=value`, `--flag value`, else its variable.
    let args = init.and_then(|c| c.args.as_deref()).unwrap_or_default();
    let value = args
        .iter()
        .enumerate()
        .find_map(|(i, a)| match a.strip_prefix(FLAG)? {
            "" => args.get(i + 1).map(String::as_str),
            rest => rest.strip_prefix('='),
        })
        .or_else(|| {
            init.and_then(|c| c.env.as_deref())
                .unwrap_or_default()
                .iter()
                .find(|e| e.name == ENV)
                .and_then(|e| e.value.as_deref())
        });
    match crate::inject::annotations::ports(crate::inject::keys::SKIP_INBOUND_PORTS, value) {
        Ok(ranges) => ranges,
        Err(error) => {
            tracing::warn!(pod = %key, %error, "unreadable --skip-inbound-ports on the pod's init container; clients will originate mutual TLS to every port");
            Vec::new()
        }
    }
}

/// Converts a Weft resource read as a dynamic object: a spec that does not deserialize
/// becomes [`Parsed::Invalid`] instead of an error, so one bad object never stops a watch.
pub fn weft_resource(kind: Kind, obj: &kube::api::DynamicObject) -> (ObjectKey, Object) {
    let meta = ResourceMeta {
        generation: obj.metadata.generation.unwrap_or(0),
        created: obj.metadata.creation_timestamp.clone(),
        uid: obj.metadata.uid.clone(),
    };
    let spec = obj.data.get("spec").cloned().unwrap_or_default();
    fn parse<T: for<'de> serde::Deserialize<'de>>(v: serde_json::Value) -> Parsed<T> {
        match serde_json::from_value(v) {
            Ok(s) => Parsed::Valid(s),
            Err(e) => Parsed::Invalid(format!("spec does not parse: {e}")),
        }
    }
    let key = key_of(obj);
    // A spec that parses but that a proxy would refuse is invalid too, naming the fields.
    fn checked<T>(
        parsed: Parsed<T>,
        check: impl FnOnce(&T) -> Result<(), Vec<String>>,
    ) -> Parsed<T> {
        match parsed {
            Parsed::Valid(s) => match check(&s) {
                Ok(()) => Parsed::Valid(s),
                Err(problems) => Parsed::Invalid(problems.join("; ")),
            },
            invalid => invalid,
        }
    }
    let object = match kind {
        Kind::Policy => Object::Policy((
            meta,
            checked(parse(spec), |s| super::validate::policy(&key, s)),
        )),
        Kind::Breaker => Object::Breaker((
            meta,
            checked(parse(spec), |s| super::validate::breaker(&key, s)),
        )),
        _ => Object::Route((
            meta,
            checked(parse(spec), |s| super::validate::route(&key, s)),
        )),
    };
    if let Object::Route((_, Parsed::Invalid(e)))
    | Object::Policy((_, Parsed::Invalid(e)))
    | Object::Breaker((_, Parsed::Invalid(e))) = &object
    {
        tracing::warn!(kind = kind.as_str(), %key, error = %e, "resource skipped; reported in its status");
    }
    (key, object)
}

/// Whether `labels` satisfy a Kubernetes label selector (`matchLabels` and
/// `matchExpressions`). An empty selector selects everything.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = selector.match_expressions.iter().flatten().all(|e| {
        // Borrowed, not cloned: a re-selection evaluates a selector against every pod
        // of its namespace.
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}
