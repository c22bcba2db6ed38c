//! Annotation keys, label keys, container names and environment variables of injection,
//! in one place: the webhook, `kubectl weft` and the docs all use these.

/// Pod annotation or label, and namespace label: `enabled` opts in, `disabled` opts out.
pub const INJECT: &str = "weft.dev/inject";
/// The value of [`INJECT`] that opts in.
pub const ENABLED: &str = "enabled";
/// The value of [`INJECT`] that opts out.
pub const DISABLED: &str = "disabled";

/// Pod annotation recording the injected proxy version (its presence means injected).
pub const PROXY_VERSION: &str = "weft.dev/proxy-version";
/// Pod label set on injected pods, so the operator can watch only meshed pods.
pub const MESHED_LABEL: &str = "weft.dev/meshed";

/// Pod annotation: inbound ports not redirected to the proxy (comma-separated).
pub const SKIP_INBOUND_PORTS: &str = "weft.dev/skip-inbound-ports";
/// Pod annotation: outbound ports not redirected to the proxy (comma-separated).
pub const SKIP_OUTBOUND_PORTS: &str = "weft.dev/skip-outbound-ports";
/// Pod annotation: outbound destination CIDRs not redirected (comma-separated).
pub const SKIP_OUTBOUND_CIDRS: &str = "weft.dev/skip-outbound-cidrs";
/// Pod annotation: the pod's own ports whose inbound connections are opaque TCP (no
/// protocol detection; for server-speaks-first protocols). On a Service: its ports whose
/// connections from meshed clients are opaque TCP (read by the operator's index).
pub const OPAQUE_PORTS: &str = "weft.dev/opaque-ports";
/// Pod annotation: the pod's own ports that the proxy forwards inbound connections to on
/// loopback rather than on the pod's address (for an app listening on localhost only).
pub const INBOUND_LOOPBACK_PORTS: &str = "weft.dev/inbound-loopback-ports";
/// Pod annotation: `json` or `text` turns on the proxy's access log (one line per HTTP
/// request on its stdout); absent, no access log.
pub const ACCESS_LOG: &str = "weft.dev/access-log";
/// Pod annotation: how the proxy carries the pod's HTTP/1 requests to meshed endpoints:
/// `multiplexed` (the default: on one HTTP/2 connection per endpoint) or `sessions`
/// (HTTP/1.1 in pooled mutual TLS sessions of their own).
pub const MESH_HTTP1: &str = "weft.dev/mesh-http1";
/// Pod annotation: how long the proxy keeps an unused connection to the pod's own
/// application (`--app-idle-timeout`, default 1 s), a duration such as `500ms` or `3s`;
/// keep it below the application's keep-alive timeout.
pub const APP_IDLE_TIMEOUT: &str = "weft.dev/app-idle-timeout";
/// Pod annotation: how long the proxy keeps an unused outbound connection to a service's
/// endpoint or a peer proxy (`--upstream-idle-timeout`, default 90 s).
pub const UPSTREAM_IDLE_TIMEOUT: &str = "weft.dev/upstream-idle-timeout";
/// Pod annotation: how long the proxy keeps a kept-alive HTTP/1 client connection that
/// waits for its next request (`--http1-idle-timeout`, default 1 h).
pub const HTTP1_IDLE_TIMEOUT: &str = "weft.dev/http1-idle-timeout";
/// Pod annotation: how long the proxy keeps an HTTP/2 client connection that carries no
/// stream (`--http2-idle-timeout`, default 1 h).
pub const HTTP2_IDLE_TIMEOUT: &str = "weft.dev/http2-idle-timeout";
/// Pod annotation: the proxy's log filter (`WEFT_LOG`), such as `warn` or
/// `info,weft_proxy=debug`, instead of the mesh-wide setting; changeable later while the
/// proxy runs (`kubectl weft log-level`).
pub const PROXY_LOG_LEVEL: &str = "weft.dev/proxy-log-level";
/// The timeout annotations, each with the proxy's environment variable it sets.
pub const TIMEOUTS: [(&str, &str); 4] = [
    (APP_IDLE_TIMEOUT, env::APP_IDLE_TIMEOUT),
    (UPSTREAM_IDLE_TIMEOUT, env::UPSTREAM_IDLE_TIMEOUT),
    (HTTP1_IDLE_TIMEOUT, env::HTTP1_IDLE_TIMEOUT),
    (HTTP2_IDLE_TIMEOUT, env::HTTP2_IDLE_TIMEOUT),
];
/// Pod or Namespace annotation, read by the operator: the namespaces whose Services the
/// pod's proxy receives besides its own, comma-separated; `*` for every namespace.
pub const VISIBLE_NAMESPACES: &str = "weft.dev/visible-namespaces";
/// Pod annotation: an OTLP/gRPC collector (`host:port`) turns on the proxy's tracing
/// (trace context propagated, spans exported there); absent, the mesh-wide
/// `traceCollector` setting if any, else no tracing; `disabled`, no tracing.
pub const TRACE_COLLECTOR: &str = "weft.dev/trace-collector";
/// Pod annotation: the probability (0 to 1) that the proxy records a trace it starts
/// (needs a collector, the pod's or the mesh's); absent, the mesh-wide `traceSampling`
/// setting if any, else the proxy's default (0.01).
pub const TRACE_SAMPLING: &str = "weft.dev/trace-sampling";
/// Pod label naming the application (Kubernetes' recommended label): the
/// `service.name` of the proxy's spans.
pub const APP_NAME_LABEL: &str = "app.kubernetes.io/name";
/// Pod label naming the application, the older convention, used when
/// [`APP_NAME_LABEL`] is absent.
pub const APP_LABEL: &str = "app";

/// Pod annotation: `"false"` keeps the application's HTTP probes as written instead of
/// pointing them at the proxy's admin port (see [`crate::probes`]); `"true"` or absent,
/// they are rewritten.
pub const REWRITE_PROBES: &str = "weft.dev/rewrite-probes";

/// Pod annotation: the proxy's CPU request (a Kubernetes quantity).
pub const PROXY_CPU_REQUEST: &str = "weft.dev/proxy-cpu-request";
/// Pod annotation: the proxy's CPU limit.
pub const PROXY_CPU_LIMIT: &str = "weft.dev/proxy-cpu-limit";
/// Pod annotation: the proxy's memory request.
pub const PROXY_MEMORY_REQUEST: &str = "weft.dev/proxy-memory-request";
/// Pod annotation: the proxy's memory limit.
pub const PROXY_MEMORY_LIMIT: &str = "weft.dev/proxy-memory-limit";

/// Annotation kubectl reads to pick the container for `logs` and `exec`.
pub const DEFAULT_CONTAINER: &str = "kubectl.kubernetes.io/default-container";

/// Name of the sidecar proxy container (a native sidecar init container).
pub const PROXY_CONTAINER: &str = "weft-proxy";
/// Name of the init container that installs the traffic redirect.
pub const INIT_CONTAINER: &str = "weft-init";
/// Name of the projected token volume.
pub const TOKEN_VOLUME: &str = "weft-token";
/// Where the proxy finds its projected ServiceAccount token.
pub const TOKEN_DIR: &str = "/var/run/secrets/weft.dev/serviceaccount";

/// Environment the proxy reads (set by injection). Each one changes what the proxy does;
/// `proxy/tests/interception.rs` shows it.
pub mod env {
    /// The pod's name.
    pub const POD_NAME: &str = "WEFT_POD_NAME";
    /// The pod's namespace.
    pub const POD_NAMESPACE: &str = "WEFT_POD_NAMESPACE";
    /// Address (`host:port`) of the operator's config-distribution server.
    pub const OPERATOR_ADDR: &str = "WEFT_OPERATOR_ADDR";
    /// Path of the projected ServiceAccount token (audience `weft`).
    pub const TOKEN_FILE: &str = "WEFT_TOKEN_FILE";
    /// The pod's ports whose inbound connections skip protocol detection.
    pub const OPAQUE_PORTS: &str = "WEFT_OPAQUE_PORTS";
    /// The pod's ports whose inbound connections go to loopback.
    pub const INBOUND_LOOPBACK_PORTS: &str = "WEFT_INBOUND_LOOPBACK_PORTS";
    /// The proxy's log filter.
    pub const LOG: &str = "WEFT_LOG";
    /// The proxy's access-log format (`json` or `text`).
    pub const ACCESS_LOG: &str = "WEFT_ACCESS_LOG";
    /// How the proxy carries HTTP/1 to meshed endpoints (`multiplexed` or `sessions`).
    pub const MESH_HTTP1: &str = "WEFT_MESH_HTTP1";
    /// How long an unused connection to the application stays open.
    pub const APP_IDLE_TIMEOUT: &str = "WEFT_APP_IDLE_TIMEOUT";
    /// How long an unused outbound connection stays open.
    pub const UPSTREAM_IDLE_TIMEOUT: &str = "WEFT_UPSTREAM_IDLE_TIMEOUT";
    /// How long a kept-alive HTTP/1 client connection may wait for its next request.
    pub const HTTP1_IDLE_TIMEOUT: &str = "WEFT_HTTP1_IDLE_TIMEOUT";
    /// How long an HTTP/2 client connection may carry no stream.
    pub const HTTP2_IDLE_TIMEOUT: &str = "WEFT_HTTP2_IDLE_TIMEOUT";
    /// The OTLP/gRPC collector the proxy sends spans to.
    pub const TRACE_COLLECTOR: &str = "WEFT_TRACE_COLLECTOR";
    /// The probability of recording a trace the proxy starts.
    pub const TRACE_SAMPLING: &str = "WEFT_TRACE_SAMPLING";
    /// The `service.name` of the proxy's spans.
    pub const TRACE_SERVICE_NAME: &str = "WEFT_TRACE_SERVICE_NAME";
    /// The operator's identity endpoint (`host:port`).
    pub const IDENTITY_ADDR: &str = "WEFT_IDENTITY_ADDR";
    /// The DNS name on the identity endpoint's certificate.
    pub const IDENTITY_SERVER_NAME: &str = "WEFT_IDENTITY_SERVER_NAME";
    /// The mesh trust root(s), PEM.
    pub const TRUST_ROOTS: &str = "WEFT_TRUST_ROOTS";
    /// The DNS name on the operator's push server certificate (the config stream is TLS
    /// verified against the trust root whenever the proxy has one).
    pub const OPERATOR_SERVER_NAME: &str = "WEFT_OPERATOR_SERVER_NAME";
    /// Where the proxy's outbound listener binds: the port `init` redirects outbound to.
    pub const OUTBOUND_ADDR: &str = "WEFT_OUTBOUND_ADDR";
    /// Where the proxy's inbound listener binds: the port `init` redirects inbound to.
    pub const INBOUND_ADDR: &str = "WEFT_INBOUND_ADDR";
    /// Where the proxy's admin listener binds: the port the probes use.
    pub const ADMIN_ADDR: &str = "WEFT_ADMIN_ADDR";
    /// The application's original HTTP probes (JSON), which the proxy's admin port
    /// repeats against the application for `/app-health/<container>/<kind>`.
    pub const APP_PROBES: &str = "WEFT_APP_PROBES";
    /// The pod's own address (`status.podIP`), where the application's probes go.
    pub const POD_IP: &str = "WEFT_POD_IP";
}

/// Every `weft.dev/` annotation a pod may carry: those injection reads or writes, and the
/// operator's. Any other is a typo or from another version, and does nothing.
pub const POD_ANNOTATIONS: [&str; 22] = [
    INJECT,
    PROXY_VERSION,
    SKIP_INBOUND_PORTS,
    SKIP_OUTBOUND_PORTS,
    SKIP_OUTBOUND_CIDRS,
    OPAQUE_PORTS,
    INBOUND_LOOPBACK_PORTS,
    ACCESS_LOG,
    MESH_HTTP1,
    APP_IDLE_TIMEOUT,
    UPSTREAM_IDLE_TIMEOUT,
    HTTP1_IDLE_TIMEOUT,
    HTTP2_IDLE_TIMEOUT,
    PROXY_LOG_LEVEL,
    TRACE_COLLECTOR,
    TRACE_SAMPLING,
    REWRITE_PROBES,
    PROXY_CPU_REQUEST,
    PROXY_CPU_LIMIT,
    PROXY_MEMORY_REQUEST,
    PROXY_MEMORY_LIMIT,
    VISIBLE_NAMESPACES,
];

/// Every `weft.dev/` annotation a Namespace may carry. A Namespace opts in with the
/// *label* `weft.dev/inject` (the webhook's namespace selector reads labels only).
pub const NAMESPACE_ANNOTATIONS: [&str; 1] = [VISIBLE_NAMESPACES];

/// Every `weft.dev/` annotation a Service may carry.
pub const SERVICE_ANNOTATIONS: [&str; 1] = [OPAQUE_PORTS];
