//! The `weft-proxy` binary: flags and environment, runtime, signals. Everything else lives
//! in the library.

use std::{net::SocketAddr, num::NonZeroUsize, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::Notify,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use weft_proxy::{
    LocalPorts, Proxy,
    config::PortSet,
    limits::{self, Limits},
    log_level::LogControl,
    server::ListenerKind,
    shutdown::{self, ListenerGroup},
    source::{self, FileSource},
    upstream::IdleTimeout,
};

/// Weft's sidecar proxy.
#[derive(Parser, Debug)]
#[command(name = "weft-proxy", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at startup: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy.
    Run(RunArgs),
    /// Install the pod's traffic-redirect rules (the init container), then exit.
    Init(weft_proxy::init::InitArgs),
}

/// A non-transparent listener: `ADDR=SERVICE`.
#[derive(Clone, Debug)]
struct Forward {
    addr: SocketAddr,
    service: String,
}

fn parse_inbound_forward(s: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let (listen, app) = s.split_once('=').ok_or_else(|| {
        format!("{s:?}: expected LISTEN=APP, such as 0.0.0.0:8081=127.0.0.1:8080")
    })?;
    let parse = |a: &str| {
        a.parse::<SocketAddr>()
            .map_err(|_| format!("{a:?} is not ip:port"))
    };
    Ok((parse(listen)?, parse(app)?))
}

fn parse_forward(s: &str) -> Result<Forward, String> {
    let (addr, service) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ADDR=SERVICE, such as 127.0.0.1:8080=web"))?;
    let addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not ip:port"))?;
    if service.is_empty() {
        return Err("the service name is empty".to_owned());
    }
    Ok(Forward {
        addr,
        service: service.to_owned(),
    })
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Config file: YAML, or JSON when the name ends in `.json`. Re-read when it changes
    /// and on SIGHUP. Exactly one of this and --operator-addr.
    #[arg(
        long,
        env = "WEFT_CONFIG",
        required_unless_present = "operator_addr",
        conflicts_with = "operator_addr"
    )]
    config: Option<PathBuf>,
    /// The operator's config push server (`host:port`): config comes from there instead
    /// of a file, with --pod-namespace, --pod-name and --token-file.
    #[arg(long, env = "WEFT_OPERATOR_ADDR", requires_all = ["pod_namespace", "pod_name"])]
    operator_addr: Option<String>,
    /// This pod's namespace (for --operator-addr).
    #[arg(long, env = "WEFT_POD_NAMESPACE")]
    pod_namespace: Option<String>,
    /// This pod's name (for --operator-addr).
    #[arg(long, env = "WEFT_POD_NAME")]
    pod_name: Option<String>,
    /// The projected ServiceAccount token presented to the operator.
    #[arg(long, env = "WEFT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The operator's identity endpoint (`host:port`): turns on the proxy's identity and
    /// mutual TLS. Without it the proxy speaks plain text only. Needs
    /// --identity-server-name, and --trust-root-file or --trust-roots.
    #[arg(long, env = "WEFT_IDENTITY_ADDR", requires = "identity_server_name")]
    identity_addr: Option<String>,
    /// The DNS name the identity endpoint's certificate carries.
    #[arg(long, env = "WEFT_IDENTITY_SERVER_NAME")]
    identity_server_name: Option<String>,
    /// The DNS name the operator's push server certificate carries (default:
    /// --identity-server-name). With a trust root, the config stream is TLS 1.3 verified
    /// against it and this name, never plain text.
    #[arg(long, env = "WEFT_OPERATOR_SERVER_NAME")]
    operator_server_name: Option<String>,
    /// The mesh trust root (PEM) the operator's certificates (identity endpoint, push
    /// server) are verified against.
    #[arg(long, env = "WEFT_TRUST_ROOT_FILE", conflicts_with = "trust_roots")]
    trust_root_file: Option<PathBuf>,
    /// The mesh trust root as PEM text (the injector sets it from the operator's trust
    /// bundle), instead of --trust-root-file.
    #[arg(long, env = "WEFT_TRUST_ROOTS")]
    trust_roots: Option<String>,
    /// The SPIFFE ID this proxy asks for; the operator refuses a request whose token is
    /// another ServiceAccount's.
    #[arg(long, env = "WEFT_IDENTITY")]
    identity: Option<String>,
    /// Transparent outbound listener (the application's redirected connections).
    #[arg(long, env = "WEFT_OUTBOUND_ADDR", default_value = "0.0.0.0:15001")]
    outbound_addr: SocketAddr,
    /// Transparent inbound listener (other pods' redirected connections).
    #[arg(long, env = "WEFT_INBOUND_ADDR", default_value = "0.0.0.0:15006")]
    inbound_addr: SocketAddr,
    /// Admin listener: /live, /ready, /metrics, /config.
    #[arg(long, env = "WEFT_ADMIN_ADDR", default_value = "0.0.0.0:15021")]
    admin_addr: SocketAddr,
    /// Do not open the transparent listeners (standalone use with --forward only).
    #[arg(long, env = "WEFT_NO_TRANSPARENT")]
    no_transparent: bool,
    /// A non-transparent listener sending every connection to a service, as ADDR=SERVICE.
    /// Repeatable.
    #[arg(long = "forward", value_parser = parse_forward)]
    forward: Vec<Forward>,
    /// A non-transparent inbound listener sending every connection to the application, as
    /// LISTEN=APP (such as 0.0.0.0:8081=127.0.0.1:8080), treated as the transparent
    /// inbound listener treats redirected connections (the workload's rate limit applies).
    /// For workloads without the iptables redirect. Repeatable.
    #[arg(long = "inbound-forward", value_parser = parse_inbound_forward)]
    inbound_forward: Vec<(SocketAddr, SocketAddr)>,
    /// Inbound ports of the application whose protocol speaks first (the server sends
    /// before the client, such as MySQL or SMTP): their connections skip protocol
    /// detection, on top of the config's opaque ports. Such as `3306,9000-9010`; set by
    /// the injector from the pod annotation `weft.dev/opaque-ports`.
    #[arg(long, env = "WEFT_OPAQUE_PORTS", default_value = "")]
    opaque_ports: PortSet,
    /// Inbound ports forwarded to the application on 127.0.0.1 (or ::1) rather than on
    /// the pod's own address, for an application that listens on localhost only yet must
    /// be reachable from other pods. Empty by default: what listens on localhost alone
    /// stays private to the pod. Set by the injector from the pod annotation
    /// `weft.dev/inbound-loopback-ports`.
    #[arg(long, env = "WEFT_INBOUND_LOOPBACK_PORTS", default_value = "")]
    inbound_loopback_ports: PortSet,
    /// How HTTP/1 requests travel to meshed endpoints: `multiplexed` (the default: on the
    /// one HTTP/2 connection to each endpoint) or `sessions` (HTTP/1.1 in pooled TLS
    /// sessions of their own: less latency and CPU per request, one connection per
    /// request in flight). Set by the injector from the pod annotation `weft.dev/mesh-http1`.
    #[arg(long, env = "WEFT_MESH_HTTP1", default_value = "multiplexed")]
    mesh_http1: weft_proxy::identity::Http1Transport,
    /// Writes one access-log line per HTTP request to stdout, as `json` or `text`. Off
    /// when unset. Set by the injector from the pod annotation `weft.dev/access-log`.
    #[arg(long, env = "WEFT_ACCESS_LOG")]
    access_log: Option<weft_proxy::access_log::Format>,
    /// An OTLP/gRPC collector (`host:port`, plain-text HTTP/2) to send spans to: turns on
    /// tracing (trace context propagated, one span per request). Off when unset. Set by
    /// the injector from the pod annotation `weft.dev/trace-collector`.
    #[arg(long, env = "WEFT_TRACE_COLLECTOR")]
    trace_collector: Option<weft_proxy::trace::Collector>,
    /// The probability (0 to 1) of recording a trace the proxy starts; a request that
    /// carries a sampling decision keeps it. Set by the injector from the pod annotation
    /// `weft.dev/trace-sampling`.
    #[arg(long, env = "WEFT_TRACE_SAMPLING", default_value_t = weft_proxy::trace::Sampling::default())]
    trace_sampling: weft_proxy::trace::Sampling,
    /// The `service.name` of this proxy's spans.
    #[arg(long, env = "WEFT_TRACE_SERVICE_NAME", default_value = "weft-proxy")]
    trace_service_name: String,
    /// The application's HTTP, gRPC and TCP probes (JSON, written by the injector), which
    /// the admin listener performs against the application for
    /// `/app-health/<container>/<livez|readyz|startupz>`. Validated at startup.
    #[arg(long, env = "WEFT_APP_PROBES", default_value = "")]
    app_probes: weft_proxy::app_probe::AppProbes,
    /// The pod's own address (the downward API's `status.podIP`), where the application's
    /// probes go, as the kubelet's would; ports in `--inbound-loopback-ports` are probed
    /// on loopback. Unset: every probe goes to 127.0.0.1. Set by the injector.
    #[arg(long, env = "WEFT_POD_IP")]
    pod_ip: Option<std::net::IpAddr>,
    /// Runtime worker threads. Every pod pays for them; one suits most sidecars.
    #[arg(long, env = "WEFT_WORKERS", default_value = "1")]
    workers: NonZeroUsize,
    /// What the transparent listeners do before the first config arrives: `passthrough`
    /// (outbound to the original destination, inbound to the application, as plain TCP) or
    /// `refuse` (close). Either way each connection is counted in
    /// `weft_before_config_connections_total`.
    #[arg(long, env = "WEFT_BEFORE_CONFIG", default_value = "passthrough")]
    before_config: weft_proxy::server::BeforeConfig,
    /// After SIGTERM, how long in-flight work (requests, upgraded connections, CONNECT
    /// tunnels, opaque TCP) may take before the proxy closes it and exits.
    #[arg(long, env = "WEFT_SHUTDOWN_GRACE", default_value = "30s")]
    shutdown_grace: weft_api::Duration,
    /// How often the config file's modification time is checked.
    #[arg(long, env = "WEFT_RELOAD_INTERVAL", default_value = "1s")]
    reload_interval: weft_api::Duration,
    /// Log filter, in `tracing_subscriber::EnvFilter` syntax, every directive a level or
    /// `target=level` (`warn,weft_proxy=debug`); changeable while running on the admin
    /// port's `/log-level`.
    #[arg(long, env = "WEFT_LOG", default_value = "info")]
    log: weft_api::LogFilter,
    /// Log format.
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Limits on what peers control (docs/proxy.md, "Limits", says why each default).
#[derive(clap::Args, Debug)]
struct LimitArgs {
    /// Open connections per transparent or forward listener; more are closed at once.
    #[arg(long, env = "WEFT_MAX_CONNECTIONS", default_value_t = limits::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Open connections on the admin listener.
    #[arg(long, env = "WEFT_MAX_ADMIN_CONNECTIONS", default_value_t = limits::DEFAULT_MAX_ADMIN_CONNECTIONS)]
    max_admin_connections: usize,
    /// HTTP/1 connections to one endpoint.
    #[arg(long, env = "WEFT_MAX_HTTP1_CONNECTIONS_PER_ENDPOINT", default_value_t = limits::DEFAULT_MAX_HTTP1_CONNECTIONS_PER_ENDPOINT)]
    max_http1_connections_per_endpoint: usize,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS advertised to clients.
    #[arg(long, env = "WEFT_HTTP2_MAX_CONCURRENT_STREAMS", default_value_t = limits::DEFAULT_HTTP2_MAX_CONCURRENT_STREAMS)]
    http2_max_concurrent_streams: u32,
    /// Interval of HTTP/2 keep-alive pings to clients.
    #[arg(long, env = "WEFT_HTTP2_KEEPALIVE_INTERVAL", default_value = "60s")]
    http2_keepalive_interval: weft_api::Duration,
    /// How long an HTTP/2 keep-alive ping may go unanswered before the connection closes.
    #[arg(long, env = "WEFT_HTTP2_KEEPALIVE_TIMEOUT", default_value = "20s")]
    http2_keepalive_timeout: weft_api::Duration,
    /// HTTP/2 streams a client may reset before they are accepted, before GOAWAY.
    #[arg(long, env = "WEFT_HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS", default_value_t = limits::DEFAULT_HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS)]
    http2_max_pending_accept_reset_streams: usize,
    /// HTTP/2 streams the proxy may reset for the client's errors, before GOAWAY.
    #[arg(long, env = "WEFT_HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS", default_value_t = limits::DEFAULT_HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS)]
    http2_max_local_error_reset_streams: usize,
    /// How long an HTTP/1 request head may take, from its first byte.
    #[arg(long, env = "WEFT_HEADER_READ_TIMEOUT", default_value = "30s")]
    header_read_timeout: weft_api::Duration,
    /// How long a kept-alive HTTP/1 client connection may wait for its next request.
    #[arg(long, env = "WEFT_HTTP1_IDLE_TIMEOUT", default_value = "1h")]
    http1_idle_timeout: weft_api::Duration,
    /// How long an HTTP/2 client connection may carry no stream before it is closed.
    #[arg(long, env = "WEFT_HTTP2_IDLE_TIMEOUT", default_value = "1h")]
    http2_idle_timeout: weft_api::Duration,
    /// The same on the admin listener.
    #[arg(long, env = "WEFT_ADMIN_HEADER_READ_TIMEOUT", default_value = "10s")]
    admin_header_read_timeout: weft_api::Duration,
    /// How long an opaque TCP connection may carry no byte before it is closed.
    #[arg(long, env = "WEFT_OPAQUE_IDLE_TIMEOUT", default_value = "1h")]
    opaque_idle_timeout: weft_api::Duration,
    /// How long a client may pause in the middle of a request body.
    #[arg(long, env = "WEFT_REQUEST_BODY_IDLE_TIMEOUT", default_value = "5m")]
    request_body_idle_timeout: weft_api::Duration,
    /// How long an outbound upstream connection (to a service's endpoint, or a mutual TLS
    /// session to a peer proxy) may sit unused before it is closed.
    #[arg(long, env = "WEFT_UPSTREAM_IDLE_TIMEOUT", default_value = "90s")]
    upstream_idle_timeout: weft_api::Duration,
    /// How long an inbound connection to the local application may sit unused before it is
    /// closed; keep it below the application's keep-alive timeout.
    #[arg(long, env = "WEFT_APP_IDLE_TIMEOUT", default_value = "1s")]
    app_idle_timeout: weft_api::Duration,
    /// Total bytes of a request's header names and values (431 above).
    #[arg(long, env = "WEFT_MAX_REQUEST_HEADERS_BYTES", default_value_t = limits::DEFAULT_MAX_REQUEST_HEADERS_BYTES)]
    max_request_headers_bytes: usize,
    /// Bytes of one header field's name and value (431 above).
    #[arg(long, env = "WEFT_MAX_HEADER_LINE_BYTES", default_value_t = limits::DEFAULT_MAX_HEADER_LINE_BYTES)]
    max_header_line_bytes: usize,
    /// Bytes of the request target (414 above).
    #[arg(long, env = "WEFT_MAX_REQUEST_TARGET_BYTES", default_value_t = limits::DEFAULT_MAX_REQUEST_TARGET_BYTES)]
    max_request_target_bytes: usize,
    /// Header fields per request (431 above).
    #[arg(long, env = "WEFT_MAX_REQUEST_HEADERS_COUNT", default_value_t = limits::DEFAULT_MAX_REQUEST_HEADERS_COUNT)]
    max_request_headers_count: usize,
}

impl LimitArgs {
    /// Validated limits: zero would refuse everything, so it is an error, not a value.
    fn limits(&self) -> anyhow::Result<Limits> {
        let counts = [
            ("--max-connections", self.max_connections),
            ("--max-admin-connections", self.max_admin_connections),
            (
                "--max-http1-connections-per-endpoint",
                self.max_http1_connections_per_endpoint,
            ),
            (
                "--http2-max-concurrent-streams",
                self.http2_max_concurrent_streams as usize,
            ),
            (
                "--max-request-headers-bytes",
                self.max_request_headers_bytes,
            ),
            ("--max-header-line-bytes", self.max_header_line_bytes),
            ("--max-request-target-bytes", self.max_request_target_bytes),
            (
                "--max-request-headers-count",
                self.max_request_headers_count,
            ),
        ];
        for (flag, value) in counts {
            if value == 0 {
                anyhow::bail!("{flag} must be greater than zero");
            }
        }
        let durations = [
            ("--http2-keepalive-interval", &self.http2_keepalive_interval),
            ("--http2-keepalive-timeout", &self.http2_keepalive_timeout),
            ("--header-read-timeout", &self.header_read_timeout),
            ("--http1-idle-timeout", &self.http1_idle_timeout),
            ("--http2-idle-timeout", &self.http2_idle_timeout),
            (
                "--admin-header-read-timeout",
                &self.admin_header_read_timeout,
            ),
            ("--opaque-idle-timeout", &self.opaque_idle_timeout),
            (
                "--request-body-idle-timeout",
                &self.request_body_idle_timeout,
            ),
        ];
        for (flag, value) in durations {
            if value.as_std().is_zero() {
                anyhow::bail!("{flag} must be greater than zero");
            }
        }
        let upstream_idle_timeout = IdleTimeout::new(self.upstream_idle_timeout.as_std())
            .context("--upstream-idle-timeout must be greater than zero")?;
        let app_idle_timeout = IdleTimeout::new(self.app_idle_timeout.as_std())
            .context("--app-idle-timeout must be greater than zero")?;
        Ok(Limits {
            max_connections: self.max_connections,
            max_admin_connections: self.max_admin_connections,
            max_http1_connections_per_endpoint: self.max_http1_connections_per_endpoint,
            http2_max_concurrent_streams: self.http2_max_concurrent_streams,
            http2_keepalive_interval: self.http2_keepalive_interval.as_std(),
            http2_keepalive_timeout: self.http2_keepalive_timeout.as_std(),
            http2_max_pending_accept_reset_streams: self.http2_max_pending_accept_reset_streams,
            http2_max_local_error_reset_streams: self.http2_max_local_error_reset_streams,
            header_read_timeout: self.header_read_timeout.as_std(),
            http1_idle_timeout: self.http1_idle_timeout.as_std(),
            http2_idle_timeout: self.http2_idle_timeout.as_std(),
            admin_header_read_timeout: self.admin_header_read_timeout.as_std(),
            opaque_idle_timeout: self.opaque_idle_timeout.as_std(),
            request_body_idle_timeout: self.request_body_idle_timeout.as_std(),
            upstream_idle_timeout,
            app_idle_timeout,
            max_request_headers_bytes: self.max_request_headers_bytes,
            max_header_line_bytes: self.max_header_line_bytes,
            max_request_target_bytes: self.max_request_target_bytes,
            max_request_headers_count: self.max_request_headers_count,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
        Command::Init(args) => Ok(weft_proxy::init::main(args)?),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(args.log.env_filter())
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: `kubectl logs` and log collectors
        // read a file or a pipe, where they are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let log_control = match args.log_format {
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let control = LogControl::new(args.log.clone(), builder.reload_handle());
            builder.init();
            control
        }
        LogFormat::Json => {
            let builder = builder.json().with_filter_reloading();
            let control = LogControl::new(args.log.clone(), builder.reload_handle());
            builder.init();
            control
        }
    };
    if args.reload_interval.as_std().is_zero() {
        anyhow::bail!("--reload-interval must be greater than zero");
    }
    let limits = args.limits.limits()?;
    let roots = trust_roots(&args)?;
    let identity = identity_config(&args, roots.as_ref())?;
    let store = match &identity {
        Some(_) => Some(weft_proxy::identity::IdentityStore::with_http1(
            args.mesh_http1,
        )?),
        None => None,
    };
    let operator_tls = operator_tls(&args, roots.as_ref(), store.as_deref())?;

    // Validate the config before binding anything, so a bad file fails fast and clearly.
    let initial = match &args.config {
        Some(path) => {
            let initial = source::load(path)?;
            weft_proxy::config::Config::validate_within(&initial, &limits)
                .with_context(|| format!("{}", path.display()))?;
            Some(initial)
        }
        None => None,
    };

    // One worker (the default) runs on the current-thread scheduler: it does the same work
    // on one thread without the multi-thread scheduler's cross-thread bookkeeping, which
    // costs CPU on every task wake-up and so on every request.
    let mut builder = if args.workers.get() == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(args.workers.get());
        b
    };
    let runtime = builder
        .thread_name("weft-proxy")
        .enable_all()
        .build()
        .context("start the runtime")?;
    runtime.block_on(serve(
        args,
        initial,
        limits,
        identity,
        store,
        operator_tls,
        log_control,
    ))
}

/// The mesh trust root, from --trust-root-file or --trust-roots, if given.
fn trust_roots(args: &RunArgs) -> anyhow::Result<Option<rustls::RootCertStore>> {
    use weft_proxy::identity::client::IdentityClientConfig as Client;
    Ok(match (&args.trust_root_file, &args.trust_roots) {
        (Some(file), _) => Some(Client::read_trust_roots(file)?),
        (None, Some(pem)) => Some(Client::parse_trust_roots(
            pem.as_bytes(),
            std::path::Path::new("WEFT_TRUST_ROOTS"),
        )?),
        (None, None) => None,
    })
}

/// How the config stream verifies the operator: with a trust root, TLS for the operator's
/// name (with identity on, against the latest certificate answer's bundle once there is
/// one); without one, plain text (an operator without identity).
fn operator_tls(
    args: &RunArgs,
    roots: Option<&rustls::RootCertStore>,
    identity: Option<&weft_proxy::identity::IdentityStore>,
) -> anyhow::Result<Option<weft_proxy::control::OperatorTls>> {
    let (Some(_), Some(roots)) = (&args.operator_addr, roots) else {
        return Ok(None);
    };
    let Some(name) = args
        .operator_server_name
        .as_ref()
        .or(args.identity_server_name.as_ref())
    else {
        anyhow::bail!(
            "--operator-addr with a trust root needs --operator-server-name (or --identity-server-name): a proxy given the mesh root subscribes only over TLS"
        );
    };
    let server_name = rustls::pki_types::ServerName::try_from(name.clone())
        .with_context(|| format!("--operator-server-name {name:?}"))?;
    let tls = match identity {
        Some(store) => weft_proxy::control::OperatorTls::with_verifier(
            store.operator_verifier(roots.clone())?,
            server_name,
        ),
        None => weft_proxy::control::OperatorTls::new(roots.clone(), server_name),
    };
    Ok(Some(tls.context("the TLS settings of the config stream")?))
}

/// The identity client's settings, validated before anything is bound.
fn identity_config(
    args: &RunArgs,
    roots: Option<&rustls::RootCertStore>,
) -> anyhow::Result<Option<weft_proxy::identity::client::IdentityClientConfig>> {
    let Some(addr) = &args.identity_addr else {
        return Ok(None);
    };
    let Some(name) = &args.identity_server_name else {
        anyhow::bail!("--identity-addr needs --identity-server-name");
    };
    let server_name = rustls::pki_types::ServerName::try_from(name.clone())
        .with_context(|| format!("--identity-server-name {name:?}"))?;
    let Some(trust_roots) = roots.cloned() else {
        anyhow::bail!("--identity-addr needs --trust-root-file or --trust-roots")
    };
    Ok(Some(weft_proxy::identity::client::IdentityClientConfig {
        addr: addr.clone(),
        server_name,
        trust_roots,
        token_file: args.token_file.clone(),
        pod: format!(
            "{}/{}",
            args.pod_namespace.as_deref().unwrap_or_default(),
            args.pod_name.as_deref().unwrap_or_default()
        ),
        expected: args.identity.clone(),
    }))
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    match TcpListener::bind(addr).await {
        // Injection binds `[::]` so that IPv4 and IPv6 both reach the proxy; on a node whose
        // kernel has no IPv6 at all, the IPv4 wildcard is what is left.
        Err(error)
            if addr.ip() == std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                && error.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
        {
            let v4 = SocketAddr::from(([0, 0, 0, 0], addr.port()));
            tracing::warn!(%addr, %v4, "no IPv6 on this host; listening on IPv4 only");
            TcpListener::bind(v4)
                .await
                .with_context(|| format!("bind the {what} listener on {v4}"))
        }
        other => other.with_context(|| format!("bind the {what} listener on {addr}")),
    }
}

async fn serve(
    args: RunArgs,
    initial: Option<weft_api::proxy_config::ProxyConfig>,
    limits: Limits,
    identity: Option<weft_proxy::identity::client::IdentityClientConfig>,
    store: Option<Arc<weft_proxy::identity::IdentityStore>>,
    operator_tls: Option<weft_proxy::control::OperatorTls>,
    log_control: LogControl,
) -> anyhow::Result<()> {
    tracing::info!(
        opaque_ports = ?args.opaque_ports,
        inbound_loopback_ports = ?args.inbound_loopback_ports,
        "inbound port settings"
    );
    let local = LocalPorts {
        opaque: args.opaque_ports.clone(),
        loopback: args.inbound_loopback_ports.clone(),
    };
    let proxy = Proxy::with_identity(limits, args.before_config, local, store.clone());
    let _ = proxy.log_control.set(log_control);
    if let Some(format) = args.access_log {
        let log = weft_proxy::access_log::AccessLog::start(
            format,
            Box::new(std::io::stdout()),
            proxy.metrics.access_log_lines.clone(),
            proxy.metrics.access_log_dropped.clone(),
        )?;
        let _ = proxy.access_log.set(log);
    }
    if let Some(initial) = initial {
        proxy.store.apply(initial)?;
    }
    if !args.app_probes.is_empty() {
        tracing::info!(
            probes = args.app_probes.len(),
            pod_ip = ?args.pod_ip,
            "application probes on the admin port"
        );
        let probes = args.app_probes.clone().aimed_at(args.pod_ip, &proxy.local);
        let _ = proxy.app_probes.set(Arc::new(probes));
    }

    let admin_stop = CancellationToken::new();
    let trace_task = match &args.trace_collector {
        Some(collector) => {
            let mut resource = vec![("service.name", args.trace_service_name.clone())];
            if let Some(ns) = &args.pod_namespace {
                resource.push(("k8s.namespace.name", ns.clone()));
            }
            if let Some(pod) = &args.pod_name {
                resource.push(("k8s.pod.name", pod.clone()));
            }
            let (tracer, exporter) = weft_proxy::trace::Tracer::new(
                weft_proxy::trace::TraceConfig {
                    collector: collector.clone(),
                    sampling: args.trace_sampling,
                    resource,
                },
                proxy.metrics.trace.clone(),
            );
            let _ = proxy.tracer.set(tracer);
            tracing::info!(%collector, sampling = %args.trace_sampling, "tracing on");
            Some(tokio::spawn(
                exporter
                    .run(admin_stop.clone())
                    .instrument(tracing::info_span!("trace_export")),
            ))
        }
        None => None,
    };
    let admin = bind(args.admin_addr, "admin").await?;
    let mut inbound = ListenerGroup::new();
    let mut outbound = ListenerGroup::new();
    if !args.no_transparent {
        let l = bind(args.inbound_addr, "inbound").await?;
        inbound.spawn(l, ListenerKind::Inbound, proxy.clone());
        let l = bind(args.outbound_addr, "outbound").await?;
        outbound.spawn(l, ListenerKind::Outbound, proxy.clone());
    }
    for f in &args.forward {
        let l = bind(f.addr, "forward").await?;
        // Forward listeners stand in for a service's own port: they drain first, like
        // inbound.
        inbound.spawn(
            l,
            ListenerKind::Forward(Arc::from(f.service.as_str())),
            proxy.clone(),
        );
    }
    for (listen, app) in &args.inbound_forward {
        let l = bind(*listen, "inbound forward").await?;
        inbound.spawn(l, ListenerKind::InboundTo(*app), proxy.clone());
    }
    let identity_task = match (identity, store.clone()) {
        (Some(config), Some(store)) => {
            tracing::info!(addr = %config.addr, "identity on: mutual TLS with meshed peers");
            let client = weft_proxy::identity::client::IdentityClient::new(
                config,
                store,
                proxy.metrics.clone(),
            )?;
            Some(tokio::spawn(client.run(admin_stop.clone())))
        }
        _ => {
            tracing::info!("identity off (no --identity-addr): plain text only");
            None
        }
    };
    let admin_task = tokio::spawn(weft_proxy::admin::serve(
        admin,
        proxy.clone(),
        admin_stop.clone(),
    ));

    let hup = Arc::new(Notify::new());
    let mut sighup = signal(SignalKind::hangup()).context("install the SIGHUP handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    let watch_task = match (&args.config, &args.operator_addr) {
        (Some(path), _) => {
            let mut watcher = FileSource::new(path.clone(), proxy.store.clone());
            // The initial load above already applied this file; record its stamp without
            // applying it again.
            watcher.mark_seen();
            tokio::spawn(watcher.run(
                args.reload_interval.as_std(),
                hup.clone(),
                admin_stop.clone(),
            ))
        }
        (None, operator) => {
            let mut control = weft_proxy::control::ControlConfig::new(
                operator.clone().unwrap_or_default(),
                format!(
                    "{}/{}",
                    args.pod_namespace.as_deref().unwrap_or_default(),
                    args.pod_name.as_deref().unwrap_or_default()
                ),
            );
            control.token_file = args.token_file.clone();
            match &operator_tls {
                Some(tls) => tracing::info!(
                    server_name = ?tls.server_name(),
                    "config stream over TLS 1.3, verified against the mesh trust root"
                ),
                None => tracing::warn!(
                    "config stream in plain text (no trust root given): only for an operator without identity"
                ),
            }
            control.tls = operator_tls;
            let client = weft_proxy::control::ControlClient::new(control, proxy.store.clone());
            let stop = admin_stop.clone();
            let certificate = store.clone();
            tokio::spawn(async move {
                // With identity on, subscribe once the first certificate is in: every ACK
                // reports what the proxy enforces, and before its certificate it cannot
                // enforce a Policy's mTLS mode (an earlier ACK would say so until the next
                // update, however long that takes).
                if let Some(identity) = certificate {
                    while identity.current().is_none() {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                        }
                    }
                }
                client.run(stop).await
            })
        }
    };

    loop {
        tokio::select! {
            _ = sighup.recv() => hup.notify_one(),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }

    shutdown::drain(&proxy, inbound, outbound, args.shutdown_grace.as_std()).await;
    admin_stop.cancel();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), admin_task).await;
    let _ = watch_task.await;
    if let Some(t) = identity_task {
        let _ = t.await;
    }
    if let Some(t) = trace_task {
        // The last spans go out once, within one export timeout.
        let _ = tokio::time::timeout(weft_proxy::trace::export::EXPORT_TIMEOUT, t).await;
    }
    Ok(())
}
