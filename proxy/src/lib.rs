//! `weft-proxy`: Weft's sidecar proxy.
//!
//! ```text
//!   app ──▶ outbound :15001 ─┐                          ┌─▶ endpoints (pooled, P2C/RR)
//!                            ├─ server ─▶ detect ─▶ http ┤
//! peers ──▶ inbound :15006 ──┘               └──▶ opaque TCP ──▶ destination
//!
//!  config file / SIGHUP ──▶ source ──▶ store (validate, swap Arc<Snapshot>)
//!  admin :15021 ──▶ /live /ready /metrics /config /app-health/<container>/<kind>
//! ```
//!
//! Modules, one concern each: [`config`] (validation), [`store`] (active snapshot),
//! [`balance`] (endpoint choice, no I/O), [`detect`], [`http`], [`server`], [`upstream`],
//! [`orig_dst`], [`metrics`], [`errors`], [`limits`], [`admin`], [`source`], [`shutdown`],
//! [`control`] (the operator's push stream), [`enforce`] (what it enforces of the resources),
//! [`route`] (the routing stages: normalize, match, rewrite, edit headers, split, fault),
//! [`retry`] (retry policy, backoff and budget), [`ratelimit`] (inbound token buckets),
//! [`identity`] (the proxy's certificate and mutual TLS between proxies), [`authz`]
//! (inbound authorization and the mTLS mode), [`trace`] (trace context and span export),
//! [`app_probe`] (the application's HTTP, gRPC and TCP probes, performed on the admin port).

use std::sync::{Arc, atomic::AtomicBool};

use tokio_util::sync::CancellationToken;

pub mod access_log;
pub mod admin;
pub mod app_probe;
pub mod authz;
pub mod balance;
pub mod breaker;
pub mod config;
pub mod control;
pub mod detect;
pub mod enforce;
pub mod errors;
pub mod head_timer;
pub mod http;
pub mod identity;
pub mod init;
pub mod limits;
pub mod log_level;
pub mod metrics;
pub mod mux;
pub mod orig_dst;
pub mod pipeline;
pub mod ratelimit;
pub mod retry;
pub mod route;
pub mod rules;
pub mod server;
pub mod shutdown;
pub mod sockopt;
pub mod source;
pub mod store;
pub mod stream_idle;
pub mod tap;
pub mod trace;
pub mod traffic_metrics;
pub mod upstream;

/// What this pod says about its own ports: read once at startup from flags or the
/// environment (the injector writes them from pod annotations). Unlike the config, which
/// describes the mesh and may change, these describe the application beside the proxy.
#[derive(Clone, Debug, Default)]
pub struct LocalPorts {
    /// Inbound ports whose connections skip protocol detection, besides the config's
    /// opaque ports: the application speaks first on them (`WEFT_OPAQUE_PORTS`).
    pub opaque: config::PortSet,
    /// Inbound ports forwarded to loopback rather than to the pod's own address, for an
    /// application that listens on localhost only and should be reachable anyway
    /// (`WEFT_INBOUND_LOOPBACK_PORTS`). Empty by default: a localhost-only listener is
    /// private to the pod.
    pub loopback: config::PortSet,
}

/// What every listener of one proxy process shares.
#[derive(Debug)]
pub struct Proxy {
    /// The active configuration.
    pub store: Arc<store::ConfigStore>,
    /// This pod's own port settings.
    pub local: LocalPorts,
    /// Every metric.
    pub metrics: Arc<metrics::Metrics>,
    /// Cancelled when shutdown begins, so `/ready` fails while the proxy drains.
    pub draining: CancellationToken,
    /// What the transparent listeners do with connections accepted before the first config.
    pub before_config: server::BeforeConfig,
    /// Set once the first connection handled without a config has been logged, so that a
    /// proxy waiting for its operator logs the fallback once rather than per connection.
    pub(crate) before_config_logged: AtomicBool,
    /// Limits on what peers control.
    pub limits: limits::Limits,
    /// The access log, when this pod asked for one (set once, at startup).
    pub access_log: std::sync::OnceLock<Arc<access_log::AccessLog>>,
    /// The tracer, when this pod sends spans to a collector (set once, at startup).
    pub tracer: std::sync::OnceLock<Arc<trace::Tracer>>,
    /// The application's HTTP probes the admin listener repeats for the kubelet
    /// (`WEFT_APP_PROBES`, set once, at startup); none when unset.
    pub app_probes: std::sync::OnceLock<Arc<app_probe::AppProbes>>,
    /// The process's log filter, changeable on the admin port (set once, at startup, by
    /// the binary that installed the subscriber); none in a process that has no such
    /// subscriber.
    pub log_control: std::sync::OnceLock<log_level::LogControl>,
    /// The taps open on the admin port (`/tap`), which finished requests are offered to.
    pub taps: Arc<tap::Taps>,
    /// The proxy's mesh identity, when configured (`--identity-addr`): inbound TLS from
    /// peer proxies is terminated and outbound connections to meshed endpoints use mTLS.
    pub identity: Option<Arc<identity::IdentityStore>>,
}

impl Proxy {
    /// A proxy with fresh metrics, the default limits and no config (not ready), passing
    /// connections through until its first config ([`server::BeforeConfig::Passthrough`]).
    pub fn new() -> Arc<Self> {
        Self::with_limits(limits::Limits::default())
    }

    /// A proxy with fresh metrics, these limits and no config (not ready).
    pub fn with_limits(limits: limits::Limits) -> Arc<Self> {
        Self::with_local(
            limits,
            server::BeforeConfig::default(),
            LocalPorts::default(),
        )
    }

    /// A proxy with fresh metrics, these limits and no config, handling connections
    /// accepted before its first config as `before_config` says, with this pod's own port
    /// settings.
    pub fn with_local(
        limits: limits::Limits,
        before_config: server::BeforeConfig,
        local: LocalPorts,
    ) -> Arc<Self> {
        Self::with_identity(limits, before_config, local, None)
    }

    /// A proxy as [`Proxy::with_local`] makes it, with a mesh identity when given.
    pub fn with_identity(
        limits: limits::Limits,
        before_config: server::BeforeConfig,
        local: LocalPorts,
        identity: Option<Arc<identity::IdentityStore>>,
    ) -> Arc<Self> {
        let metrics = Arc::new(metrics::Metrics::new());
        if let Some(id) = &identity {
            id.count_outbound_sessions(metrics.tls.clone());
        }
        Arc::new(Proxy {
            store: Arc::new(
                store::ConfigStore::new(metrics.clone())
                    .with_limits(limits)
                    .with_identity(identity.clone()),
            ),
            identity,
            local,
            metrics,
            draining: CancellationToken::new(),
            before_config,
            before_config_logged: AtomicBool::new(false),
            limits,
            access_log: std::sync::OnceLock::new(),
            tracer: std::sync::OnceLock::new(),
            app_probes: std::sync::OnceLock::new(),
            log_control: std::sync::OnceLock::new(),
            taps: Arc::new(tap::Taps::default()),
        })
    }
}
