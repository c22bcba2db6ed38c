//! The mesh-wide settings injection uses, with defaults suited to a sidecar. The cluster
//! keeps them in a ConfigMap (see [`crate::settings`]); the operator's flags set some
//! defaults.

/// Settings for injection, the same for every pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectConfig {
    /// The proxy image (also runs `weft-proxy init`).
    pub proxy_image: String,
    /// The proxy version recorded on injected pods.
    pub proxy_version: String,
    /// Image pull policy for the proxy image; the cluster's default when `None`.
    pub image_pull_policy: Option<String>,
    /// The proxy's ports.
    pub ports: ProxyPorts,
    /// The UID the proxy runs as; its own traffic bypasses the redirect.
    pub proxy_uid: i64,
    /// `host:port` of the operator's config-distribution server.
    pub operator_addr: String,
    /// The SPIFFE trust domain.
    pub trust_domain: String,
    /// Default proxy resources (pods may override them by annotation).
    pub resources: ProxyResources,
    /// Namespaces never injected (kube-system and the operator's own).
    pub excluded_namespaces: Vec<String>,
    /// Lifetime of the projected token; the kubelet refreshes it at 80 %.
    pub token_expiration_seconds: i64,
    /// The proxy's log filter (pods may override it by annotation).
    pub log_level: weft_api::LogFilter,
    /// Where injected proxies get their mesh certificate; `None`: they run without one
    /// (plain text only).
    pub identity: Option<InjectIdentity>,
    /// The mesh-wide tracing default: every injected proxy exports spans to this collector
    /// unless its pod's annotations say otherwise; `None`: tracing only where pods ask.
    pub tracing: Option<InjectTracing>,
    /// The mesh-wide way injected proxies carry HTTP/1 to meshed endpoints
    /// (`multiplexed` or `sessions`), unless a pod's `weft.dev/mesh-http1` says otherwise;
    /// `None`: the proxy's default (`multiplexed`).
    pub mesh_http1: Option<&'static str>,
}

/// Where injected proxies send spans, mesh-wide (pods override either part by annotation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectTracing {
    /// The OTLP/gRPC collector, `host:port` (or `http://host:port`), validated as the
    /// `weft.dev/trace-collector` annotation is.
    pub collector: String,
    /// The sampling probability as written (0 to 1); `None`: the proxy's default.
    pub sampling: Option<String>,
}

/// What an injected proxy needs to obtain its certificate from the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectIdentity {
    /// `host:port` of the operator's identity endpoint.
    pub addr: String,
    /// The DNS name on that endpoint's certificate, which the push server's carries too.
    pub server_name: String,
    /// The mesh trust root(s), PEM: the endpoint's certificate and peers' are verified
    /// against them.
    pub trust_roots: String,
}

/// The proxy's listening ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyPorts {
    /// Where redirected outbound traffic arrives.
    pub outbound: u16,
    /// Where redirected inbound traffic arrives.
    pub inbound: u16,
    /// Health, readiness and metrics.
    pub admin: u16,
}

impl Default for ProxyPorts {
    fn default() -> Self {
        ProxyPorts {
            outbound: 15001,
            inbound: 15006,
            admin: 15021,
        }
    }
}

/// Kubernetes resource quantities for the proxy container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyResources {
    /// CPU request.
    pub cpu_request: Option<String>,
    /// CPU limit (none by default: throttling a proxy adds latency to every request).
    pub cpu_limit: Option<String>,
    /// Memory request.
    pub memory_request: Option<String>,
    /// Memory limit.
    pub memory_limit: Option<String>,
}

impl Default for ProxyResources {
    fn default() -> Self {
        ProxyResources {
            cpu_request: Some("10m".to_owned()),
            cpu_limit: None,
            memory_request: Some("20Mi".to_owned()),
            memory_limit: Some("128Mi".to_owned()),
        }
    }
}

impl InjectConfig {
    /// The defaults for an operator running in `namespace` behind the Service `service`:
    /// proxies subscribe to that Service's port 8090, and neither `kube-system` nor the
    /// operator's own namespace is injected. `Default` is this for `weft-system` and
    /// `weft-operator`.
    pub fn for_operator(namespace: &str, service: &str) -> Self {
        InjectConfig {
            operator_addr: format!("{service}.{namespace}.svc:8090"),
            excluded_namespaces: vec!["kube-system".to_owned(), namespace.to_owned()],
            ..InjectConfig::default()
        }
    }
}

impl Default for InjectConfig {
    fn default() -> Self {
        InjectConfig {
            proxy_image: format!("ghcr.io/weft-mesh/weft-proxy:{}", env!("CARGO_PKG_VERSION")),
            proxy_version: env!("CARGO_PKG_VERSION").to_owned(),
            image_pull_policy: None,
            ports: ProxyPorts::default(),
            proxy_uid: 5150,
            operator_addr: "weft-operator.weft-system.svc:8090".to_owned(),
            trust_domain: "cluster.local".to_owned(),
            resources: ProxyResources::default(),
            excluded_namespaces: vec!["kube-system".to_owned(), "weft-system".to_owned()],
            token_expiration_seconds: 3600,
            log_level: weft_api::LogFilter::default(),
            identity: None,
            tracing: None,
            mesh_http1: None,
        }
    }
}
