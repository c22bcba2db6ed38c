//! `weft-operator`: the control plane binary. Flags and environment are read here, once;
//! everything else lives in the library ([`weft_operator::mesh::run`]).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};
use tokio_util::sync::CancellationToken;
use weft_operator::{
    identity,
    inject::InjectConfig,
    mesh::{self, Settings},
    push::{AuthLimits, Authenticator},
    status::lease::LeaseConfig,
    webhook::{self, Registration, Target, WebhookMetrics, WebhookSettings},
};

/// Weft's control plane: watches the mesh, pushes config to every proxy, writes status.
#[derive(Parser, Debug)]
#[command(name = "weft-operator", version, about)]
struct Args {
    /// Where proxies subscribe to their config (HTTP/2, `weft.push.v1`): over TLS 1.3
    /// with a certificate from the mesh trust root whenever the identity endpoint is on,
    /// in plain text only with --no-identity.
    #[arg(long, env = "WEFT_PUSH_ADDR", default_value = "0.0.0.0:8090")]
    push_addr: SocketAddr,
    /// Admin listener: /healthz, /readyz, /metrics, /proxies, /version.
    #[arg(long, env = "WEFT_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    admin_addr: SocketAddr,
    /// The SPIFFE trust domain of workload identities.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The mesh-wide mTLS mode, for pods no Policy selects: `permissive` (plain text and
    /// mutual TLS accepted inbound; clients originate mTLS to meshed pods), `strict`
    /// (plain text refused inbound; needs the identity endpoint) or `disabled` (clients
    /// never originate mTLS). A namespace-wide Policy (`target.selector: {}`) overrides it
    /// in its namespace, and a workload's Policy overrides both.
    #[arg(
        long,
        env = "WEFT_MESH_MTLS_MODE",
        value_enum,
        default_value = "permissive"
    )]
    mesh_mtls_mode: MeshMtlsMode,
    /// The audience proxies' projected ServiceAccount tokens must carry.
    #[arg(long, env = "WEFT_TOKEN_AUDIENCE", default_value = "weft")]
    token_audience: String,
    /// Namespace of the Lease that elects the status writer (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "weft-system")]
    lease_namespace: String,
    /// Name of that Lease.
    #[arg(long, env = "WEFT_LEASE_NAME", default_value = "weft-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (its pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long the Lease holds without renewal.
    #[arg(long, env = "WEFT_LEASE_DURATION", default_value = "15s")]
    lease_duration: weft_api::Duration,
    /// How long the Lease holder keeps writing status without a successful renewal
    /// before it steps down; shorter than the duration (default: two thirds of it).
    #[arg(long, env = "WEFT_LEASE_RENEW_DEADLINE")]
    lease_renew_deadline: Option<weft_api::Duration>,
    /// How often the holder renews and the other replicas retry (default: two
    /// fifteenths of the duration, 2s for 15s).
    #[arg(long, env = "WEFT_LEASE_RETRY_PERIOD")]
    lease_retry_period: Option<weft_api::Duration>,
    #[command(flatten)]
    push: PushArgs,
    /// Watch only this namespace (default: the whole cluster).
    #[arg(long, env = "WEFT_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Log filter, in `tracing_subscriber::EnvFilter` syntax, every directive a level or
    /// `target=level` (`info,weft_operator=debug`).
    #[arg(long, env = "WEFT_LOG", default_value = "info")]
    log: weft_api::LogFilter,
    #[command(flatten)]
    webhook: WebhookArgs,
    #[command(flatten)]
    identity_ca: IdentityArgs,
}

/// `--mesh-mtls-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum MeshMtlsMode {
    Strict,
    Permissive,
    Disabled,
}

impl From<MeshMtlsMode> for weft_api::proxy_config::MtlsMode {
    fn from(m: MeshMtlsMode) -> Self {
        match m {
            MeshMtlsMode::Strict => Self::Strict,
            MeshMtlsMode::Permissive => Self::Permissive,
            MeshMtlsMode::Disabled => Self::Disabled,
        }
    }
}

/// The identity CA and its endpoint.
#[derive(clap::Args, Debug)]
struct IdentityArgs {
    /// Where proxies get their certificates (HTTP/2 or HTTP/1.1 over TLS 1.3,
    /// `weft.identity.v1`).
    #[arg(long, env = "WEFT_IDENTITY_ADDR", default_value = "0.0.0.0:15012")]
    identity_addr: SocketAddr,
    /// Do not serve the identity endpoint (nor read or create the identity Secret). The
    /// push server then serves plain text, and injected proxies get no trust root.
    #[arg(long, env = "WEFT_NO_IDENTITY")]
    no_identity: bool,
    /// The Secret (in the operator's namespace) holding the mesh's trust root; generated
    /// if absent. Layout in docs/identity.md.
    #[arg(long, env = "WEFT_IDENTITY_SECRET", default_value = "weft-identity")]
    identity_secret: String,
    /// Lifetime of proxies' certificates (at most the issuing CA's remaining life).
    #[arg(long, env = "WEFT_IDENTITY_LIFETIME", default_value = "24h")]
    identity_lifetime: weft_api::Duration,
    /// DNS names of the endpoint's serving certificate, comma-separated (default: the
    /// operator Service's names, `<service>.<namespace>.svc` and its variants).
    #[arg(long, env = "WEFT_IDENTITY_DNS_NAMES", value_delimiter = ',')]
    identity_dns_names: Vec<String>,
    /// Certificate requests answered at once; more wait up to 2s, then get 429.
    #[arg(long, env = "WEFT_IDENTITY_IN_FLIGHT", default_value = "256", value_parser = clap::value_parser!(u32).range(1..))]
    identity_in_flight: u32,
    /// Certificate requests one source address may have in progress at once (a proxy
    /// sends one at a time); more are refused at once with 429 `source_in_flight`. 0: no
    /// per-source bound (clients behind one NAT address, a load test from one host).
    #[arg(long, env = "WEFT_IDENTITY_IN_FLIGHT_PER_SOURCE", default_value = "4")]
    identity_in_flight_per_source: u32,
    /// Connections the identity endpoint holds open at once (TLS handshakes included);
    /// more are closed as soon as accepted, counted in
    /// `weft_operator_identity_connections_refused_total`. Connections with no request in
    /// progress are closed after 10 s.
    #[arg(long, env = "WEFT_IDENTITY_MAX_CONNECTIONS", default_value = "1024", value_parser = clap::value_parser!(u32).range(1..))]
    identity_max_connections: u32,
    /// Connections one client address may hold open at the identity endpoint at once;
    /// more from it are closed as soon as accepted, counted in
    /// `weft_operator_identity_connections_refused_per_address_total`. 0: no bound per
    /// address.
    #[arg(
        long,
        env = "WEFT_IDENTITY_MAX_CONNECTIONS_PER_ADDRESS",
        default_value = "64"
    )]
    identity_max_connections_per_address: u32,
    /// Certificates one identity (per pod) may get per second, sustained.
    #[arg(long, env = "WEFT_IDENTITY_RATE", default_value = "0.1")]
    identity_rate: f64,
    /// Certificates one identity (per pod) may get in a burst.
    #[arg(long, env = "WEFT_IDENTITY_BURST", default_value = "10", value_parser = clap::value_parser!(u32).range(1..))]
    identity_burst: u32,
    /// TokenReviews one source address may cause per second at the identity endpoint.
    #[arg(long, env = "WEFT_IDENTITY_REVIEWS_PER_SOURCE", default_value = "20")]
    identity_reviews_per_source: f64,
    /// TokenReviews one source address may cause in a burst at the identity endpoint.
    #[arg(long, env = "WEFT_IDENTITY_REVIEW_BURST", default_value = "200", value_parser = clap::value_parser!(u32).range(1..))]
    identity_review_burst: u32,
}

/// The push server's limits.
#[derive(clap::Args, Debug)]
struct PushArgs {
    /// How long a proxy may take to receive and acknowledge (or reject) an update before
    /// its connection is closed as stalled; it reconnects and resyncs.
    #[arg(long, env = "WEFT_PUSH_ACK_TIMEOUT", default_value = "30s")]
    push_ack_timeout: weft_api::Duration,
    /// How long a token the API server refused is refused without asking again.
    #[arg(long, env = "WEFT_PUSH_REFUSED_TOKEN_TTL", default_value = "10s")]
    push_refused_token_ttl: weft_api::Duration,
    /// TokenReviews one source address may cause per second, sustained.
    #[arg(long, env = "WEFT_PUSH_REVIEWS_PER_SOURCE", default_value = "5")]
    push_reviews_per_source: f64,
    /// TokenReviews one source address may cause in a burst.
    #[arg(long, env = "WEFT_PUSH_REVIEW_BURST", default_value = "20", value_parser = clap::value_parser!(u32).range(1..))]
    push_review_burst: u32,
    /// TokenReviews in flight at once, over all sources.
    #[arg(long, env = "WEFT_PUSH_REVIEWS_IN_FLIGHT", default_value = "32", value_parser = clap::value_parser!(u32).range(1..))]
    push_reviews_in_flight: u32,
}

/// The injection webhook's settings.
#[derive(clap::Args, Debug)]
struct WebhookArgs {
    /// Do not serve or register the injection webhook.
    #[arg(long, env = "WEFT_NO_WEBHOOK")]
    no_webhook: bool,
    /// Where the webhook serves HTTPS.
    #[arg(long, env = "WEFT_WEBHOOK_ADDR", default_value = "0.0.0.0:8443")]
    webhook_addr: SocketAddr,
    /// Name of the MutatingWebhookConfiguration the operator owns.
    #[arg(long, env = "WEFT_WEBHOOK_NAME", default_value = "weft-injector")]
    webhook_name: String,
    /// The Service in front of the operator (in its namespace), port 443.
    #[arg(long, env = "WEFT_WEBHOOK_SERVICE", default_value = "weft-operator")]
    webhook_service: String,
    /// Call the webhook at this URL instead of through the Service (outside a cluster).
    #[arg(long, env = "WEFT_WEBHOOK_URL")]
    webhook_url: Option<String>,
    /// What pod creation does when the webhook is unreachable: Ignore or Fail.
    #[arg(
        long,
        env = "WEFT_WEBHOOK_FAILURE_POLICY",
        value_enum,
        default_value = "ignore"
    )]
    webhook_failure_policy: webhook::FailurePolicy,
    /// How long the API server waits for the webhook, in seconds (1-30).
    #[arg(long, env = "WEFT_WEBHOOK_TIMEOUT", default_value = "3", value_parser = clap::value_parser!(i32).range(1..=30))]
    webhook_timeout: i32,
    /// Let pods opt in by annotation (costs one webhook call per pod in unlabelled namespaces).
    #[arg(long, env = "WEFT_WEBHOOK_ANNOTATION_OPT_IN", default_value = "true", action = clap::ArgAction::Set)]
    webhook_annotation_opt_in: bool,
    /// Lifetime of the webhook's serving certificate (renewed at two thirds); at least 1m.
    #[arg(long, env = "WEFT_WEBHOOK_CERT_LIFETIME", default_value = "24h")]
    webhook_cert_lifetime: weft_api::Duration,
    /// The Secret (in the operator's namespace) holding the mesh CA; created if absent.
    #[arg(long, env = "WEFT_CA_SECRET", default_value = "weft-ca")]
    ca_secret: String,
    /// The proxy image injected into pods.
    #[arg(long, env = "WEFT_PROXY_IMAGE")]
    proxy_image: Option<String>,
    /// `host:port` injected proxies subscribe to (default: the Service, port 8090).
    #[arg(long, env = "WEFT_INJECT_OPERATOR_ADDR")]
    inject_operator_addr: Option<String>,
    /// Serve only namespaces carrying this label, as `key=value` (default: every
    /// namespace that opted in), so that the API server never calls this webhook for others.
    #[arg(long, env = "WEFT_WEBHOOK_NAMESPACE_SCOPE", value_parser = parse_label)]
    webhook_namespace_scope: Option<(String, String)>,
}

/// A `key=value` label with a non-empty key.
fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(args.log.env_filter())
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: `kubectl logs` and log collectors
        // read a file or a pipe, where they are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if args.lease_duration.as_std() < Duration::from_secs(3) {
        anyhow::bail!("--lease-duration must be at least 3s");
    }
    if !(args.push.push_reviews_per_source.is_finite() && args.push.push_reviews_per_source > 0.0) {
        anyhow::bail!("--push-reviews-per-source must be a positive number");
    }
    if args.push.push_ack_timeout.as_std() < Duration::from_secs(1) {
        anyhow::bail!("--push-ack-timeout must be at least 1s");
    }
    if args.webhook.webhook_cert_lifetime.as_std() < webhook::MIN_CERT_LIFETIME {
        anyhow::bail!(
            "--webhook-cert-lifetime must be at least 1m (the serving certificate is renewed at two thirds of it)"
        );
    }
    let id = &args.identity_ca;
    if args.mesh_mtls_mode == MeshMtlsMode::Strict && id.no_identity {
        anyhow::bail!(
            "--mesh-mtls-mode strict needs the identity endpoint: without certificates every proxy would refuse all traffic (drop --no-identity)"
        );
    }
    if id.identity_lifetime.as_std() < Duration::from_secs(60) {
        anyhow::bail!("--identity-lifetime must be at least 1m");
    }
    for (flag, v) in [
        ("--identity-rate", id.identity_rate),
        (
            "--identity-reviews-per-source",
            id.identity_reviews_per_source,
        ),
    ] {
        if !(v.is_finite() && v > 0.0) {
            anyhow::bail!("{flag} must be a positive number");
        }
    }
    if let Some(bad) = id
        .identity_dns_names
        .iter()
        .find(|n| rustls::pki_types::ServerName::try_from(n.as_str()).is_err())
    {
        anyhow::bail!("--identity-dns-names: {bad:?} is not a DNS name");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("weft-operator")
        .enable_all()
        .build()
        .context("start the runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let identity = match &args.identity {
        Some(i) => i.clone(),
        None => format!("weft-operator-{:08x}", rand::random::<u32>()),
    };
    let lease = lease_config(&args, identity)?;
    let client = kube::Client::try_default()
        .await
        .context("build a Kubernetes client (in-cluster config or KUBECONFIG)")?;
    let push = TcpListener::bind(args.push_addr)
        .await
        .with_context(|| format!("bind the push listener on {}", args.push_addr))?;
    let admin = TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("bind the admin listener on {}", args.admin_addr))?;
    let webhook_listener = match args.webhook.no_webhook {
        true => None,
        false => Some(
            TcpListener::bind(args.webhook.webhook_addr)
                .await
                .with_context(|| {
                    format!("bind the webhook listener on {}", args.webhook.webhook_addr)
                })?,
        ),
    };
    let identity_listener = match args.identity_ca.no_identity {
        true => None,
        false => Some(
            TcpListener::bind(args.identity_ca.identity_addr)
                .await
                .with_context(|| {
                    format!(
                        "bind the identity listener on {}",
                        args.identity_ca.identity_addr
                    )
                })?,
        ),
    };
    // Before anything serves: a Secret that holds no usable root stops the operator here,
    // with the reason, rather than leaving proxies without certificates.
    let identity_ca = match identity_listener {
        None => None,
        Some(_) => Some(Arc::new(
            identity::ca::load_or_create(
                client.clone(),
                &args.lease_namespace,
                &args.identity_ca.identity_secret,
            )
            .await
            .context("load the identity trust root")?,
        )),
    };
    let mut webhook_settings =
        webhook_settings(&args.webhook, &args.lease_namespace, &args.trust_domain);
    if !args.webhook.no_webhook {
        webhook_settings.inject = inject_settings(
            &client,
            &args.webhook,
            &args.lease_namespace,
            &args.trust_domain,
            &webhook_settings.inject,
        )
        .await?;
        // The API server must not even call the webhook for namespaces it never injects.
        webhook_settings.registration.excluded_namespaces =
            webhook_settings.inject.excluded_namespaces.clone();
    }
    let (trust_domain, audience) = (args.trust_domain.clone(), args.token_audience.clone());
    let serving = identity::ServingSettings {
        dns_names: match args.identity_ca.identity_dns_names.is_empty() {
            false => args.identity_ca.identity_dns_names.clone(),
            true => service_names(&args.webhook.webhook_service, &args.lease_namespace),
        },
        lifetime: Duration::from_secs(24 * 3600),
    };
    // Injected proxies get their certificates from this operator: where, under which
    // name, and the root to trust (public; it travels in the pod spec as Linkerd's does).
    if let (Some(ca), Some(name)) = (&identity_ca, serving.dns_names.first()) {
        webhook_settings.inject.identity = Some(weft_operator::inject::InjectIdentity {
            addr: format!("{name}:{}", args.identity_ca.identity_addr.port()),
            server_name: name.clone(),
            trust_roots: ca.trust_bundle().to_owned(),
        });
    }
    // Not fatal: without it only `kubectl weft inject` lacks identity, and says so.
    match identity::bundle::publish(
        &client,
        &args.lease_namespace,
        webhook_settings.inject.identity.as_ref(),
    )
    .await
    {
        Ok(()) => tracing::info!(
            configmap = weft_operator::inject::identity_bundle::CONFIG_MAP,
            identity = webhook_settings.inject.identity.is_some(),
            "published the identity bundle for kubectl weft inject"
        ),
        Err(error) => tracing::warn!(
            %error,
            configmap = weft_operator::inject::identity_bundle::CONFIG_MAP,
            "could not publish the identity bundle; kubectl weft inject will inject without identity"
        ),
    }
    // One serving certificate from the mesh CA, for the operator Service's names, serves
    // both the identity endpoint and the push server: proxies verify both against the
    // trust root they were given.
    let serving_certs = match &identity_ca {
        Some(ca) => Some(
            identity::serving_store(ca, &serving)
                .context("issue the operator's serving certificate")?,
        ),
        None => None,
    };
    let push_tls = serving_certs.as_ref().map(identity::push_tls);
    let settings = Settings {
        push,
        push_tls,
        admin: Some(admin),
        trust_domain: args.trust_domain,
        mesh_mtls: args.mesh_mtls_mode.into(),
        auth: Authenticator::token_review_with(
            client.clone(),
            vec![args.token_audience],
            AuthLimits {
                refused_ttl: args.push.push_refused_token_ttl.as_std(),
                source_rate: args.push.push_reviews_per_source,
                source_burst: args.push.push_review_burst,
                max_in_flight: args.push.push_reviews_in_flight as usize,
                ..AuthLimits::default()
            },
        ),
        push_ack_timeout: args.push.push_ack_timeout.as_std(),
        lease: Some(lease),
        namespace: args.watch_namespace,
    };
    tracing::info!(mode = ?settings.mesh_mtls, "mesh-wide mTLS default (namespace-wide and workload Policies override it)");
    let shutdown = CancellationToken::new();
    let whole_cluster = settings.namespace.is_none();
    let (handles, done) = mesh::run(client.clone(), settings, shutdown.clone());
    let identity_server = identity_ca.map(|ca| {
        let id = &args.identity_ca;
        Arc::new(identity::IdentityServer::new(
            ca,
            client.clone(),
            audience,
            trust_domain,
            id.identity_lifetime.as_std(),
            identity::IdentityLimits {
                max_in_flight: id.identity_in_flight as usize,
                max_in_flight_per_source: std::num::NonZeroUsize::new(
                    id.identity_in_flight_per_source as usize,
                ),
                per_identity_rate: id.identity_rate,
                per_identity_burst: id.identity_burst,
                max_connections: id.identity_max_connections as usize,
                max_connections_per_address: std::num::NonZeroUsize::new(
                    id.identity_max_connections_per_address as usize,
                ),
                auth: AuthLimits {
                    source_rate: id.identity_reviews_per_source,
                    source_burst: id.identity_review_burst,
                    ..identity::IdentityLimits::default().auth
                },
                ..identity::IdentityLimits::default()
            },
            handles.metrics.clone(),
        ))
    });
    let identity_task = match (identity_server, identity_listener, serving_certs) {
        (Some(server), Some(listener), Some(certs)) => {
            let token = shutdown.clone();
            Some(tokio::spawn(async move {
                let renew =
                    identity::renew_serving(server.ca().clone(), certs.clone(), serving.clone());
                tokio::select! {
                    () = identity::serve_with(listener, server, &certs, &serving, token.cancelled_owned()) => {}
                    () = renew => {}
                }
            }))
        }
        _ => None,
    };
    let webhook_metrics = WebhookMetrics::default();
    let webhook_task = webhook_listener.map(|listener| {
        let (client, token) = (client.clone(), shutdown.clone());
        let metrics = webhook_metrics.clone();
        // The index watches every namespace unless --watch-namespace narrows it; then the
        // webhook needs a Namespace watch of its own.
        let index = whole_cluster.then(|| handles.index.clone());
        // `/readyz` says 503 until the webhook serves: its start-up is retried with backoff.
        let gate = handles.readiness.gate("webhook");
        tokio::spawn(webhook::run_retrying(
            client,
            webhook_settings,
            index,
            listener,
            metrics,
            gate,
            token.cancelled_owned(),
        ))
    });
    if webhook_task.is_some() {
        let mut registry = prometheus_client::registry::Registry::default();
        webhook_metrics.register(&mut registry);
        handles.metrics.add_registry(registry);
    }
    let mut sigterm = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), done).await;
    if let Some(task) = webhook_task {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    if let Some(task) = identity_task {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    Ok(())
}

/// The injection settings: the flags' values, then the chart's ConfigMap over them.
async fn inject_settings(
    client: &kube::Client,
    args: &WebhookArgs,
    namespace: &str,
    trust_domain: &str,
    base: &InjectConfig,
) -> anyhow::Result<InjectConfig> {
    use weft_operator::inject::settings as keys;

    let loaded = webhook::settings::load(client, namespace, keys::CONFIG_MAP, base).await?;
    let cfg = loaded.config;
    if cfg.trust_domain != trust_domain {
        anyhow::bail!(
            "ConfigMap {namespace}/{}: {} {:?} differs from --trust-domain {trust_domain:?}; proxies would ask for identities the CA does not issue",
            keys::CONFIG_MAP,
            keys::TRUST_DOMAIN,
            cfg.trust_domain
        );
    }
    // `kubectl weft inject` reads the ConfigMap, not these flags: say so when they would
    // make its output differ from the webhook's.
    let defaults = InjectConfig::for_operator(namespace, "weft-operator");
    for (changed, key) in [
        (cfg.proxy_image != defaults.proxy_image, keys::PROXY_IMAGE),
        (
            cfg.operator_addr != defaults.operator_addr,
            keys::OPERATOR_ADDR,
        ),
        (
            cfg.trust_domain != defaults.trust_domain,
            keys::TRUST_DOMAIN,
        ),
    ] {
        if changed && !loaded.keys.iter().any(|k| k == key) {
            tracing::warn!(
                setting = key,
                configmap = keys::CONFIG_MAP,
                "injection setting comes from a flag, which kubectl weft inject cannot see; set it in the ConfigMap"
            );
        }
    }
    tracing::info!(
        configmap = keys::CONFIG_MAP,
        found = loaded.found,
        settings = ?loaded.keys,
        proxy_image = %cfg.proxy_image,
        webhook = %args.webhook_name,
        "injection settings"
    );
    Ok(cfg)
}

fn lease_config(args: &Args, identity: String) -> anyhow::Result<LeaseConfig> {
    let mut lease = LeaseConfig::new(
        args.lease_namespace.clone(),
        args.lease_name.clone(),
        identity,
        args.lease_duration.as_std(),
    );
    if let Some(d) = &args.lease_renew_deadline {
        lease.renew_deadline = d.as_std();
    }
    if let Some(p) = &args.lease_retry_period {
        lease.retry_period = p.as_std();
    }
    lease.validate().map_err(|e| {
        anyhow::anyhow!("--lease-duration, --lease-renew-deadline, --lease-retry-period: {e}")
    })?;
    Ok(lease)
}

/// The DNS names of the operator's Service `service` in `namespace`.
fn service_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

fn webhook_settings(args: &WebhookArgs, namespace: &str, trust_domain: &str) -> WebhookSettings {
    let service = format!("{}.{namespace}.svc", args.webhook_service);
    let target = match &args.webhook_url {
        Some(url) => Target::Url(url.clone()),
        None => Target::Service {
            namespace: namespace.to_owned(),
            name: args.webhook_service.clone(),
            port: 443,
        },
    };
    let mut inject = InjectConfig {
        trust_domain: trust_domain.to_owned(),
        ..InjectConfig::for_operator(namespace, &args.webhook_service)
    };
    if let Some(addr) = &args.inject_operator_addr {
        inject.operator_addr = addr.clone();
    }
    if let Some(image) = &args.proxy_image {
        inject.proxy_image = image.clone();
    }
    let excluded_namespaces = inject.excluded_namespaces.clone();
    WebhookSettings {
        inject,
        registration: Registration {
            name: args.webhook_name.clone(),
            target,
            failure_policy: args.webhook_failure_policy,
            timeout_seconds: args.webhook_timeout,
            annotation_opt_in: args.webhook_annotation_opt_in,
            excluded_namespaces,
            namespace_scope: args.webhook_namespace_scope.clone(),
        },
        ca_namespace: namespace.to_owned(),
        ca_secret: args.ca_secret.clone(),
        dns_names: vec![
            service.clone(),
            format!("{}.{namespace}", args.webhook_service),
            format!("{service}.cluster.local"),
        ],
        ips: vec![std::net::IpAddr::from([127, 0, 0, 1])],
        cert_lifetime: args.webhook_cert_lifetime.as_std(),
        audit_interval: Duration::from_secs(60),
    }
}
