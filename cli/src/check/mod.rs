//! `kubectl weft check`: can Weft be installed here (`--pre`), and is the installed mesh
//! healthy. Each check is named, passes, warns or fails, and says what to do.
//!
//! ```text
//! API server ─┬─ CRDs ─────────────── compared with the CRDs this binary was built with
//!             ├─ Deployment, Lease ── operator replicas ready, status writer alive
//!             ├─ webhook config ───── caBundle ─▶ TLS to the webhook URL (chain verified)
//!             │                       dry-run pod ─▶ the API server calls the webhook
//!             ├─ Secret weft-identity  trust root valid ≥ 60 days
//!             ├─ pods ─────────────── opted in but unmeshed; misspelt annotations
//!             └─ Namespaces, Services  weft.dev/ metadata Weft does not read
//! operator /proxies, /version ─────── each meshed pod's proxy in sync, not older
//! ```
//!
//! Reading and judging are kept apart: the `evaluate_*` functions are plain code over what
//! was read (and the time), tested without a cluster.

pub mod certs;
pub mod pre;
pub mod report;

use std::{
    collections::BTreeMap,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use k8s_openapi::{
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration, apps::v1::Deployment,
        coordination::v1::Lease, core::v1::Pod, core::v1::Secret,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement,
};
use kube::{Api, Client, api::PostParams};
use weft_api::proxy_status::{OperatorVersion, ProxyRow};
use weft_inject::{InjectConfig, keys, settings::CONFIG_MAP};

pub use report::{Finding, Report, Status};

/// The trust root must stay valid at least this long: rotating it is a staged procedure
/// (docs/identity.md, "Rotating the root") that needs weeks, not days.
pub const TRUST_ROOT_MIN_DAYS: i64 = 60;

/// Names of the checks, as they appear in the output and the JSON (stable).
pub mod names {
    /// `--pre`: the API server's version.
    pub const KUBERNETES_VERSION: &str = "kubernetes-version";
    /// `--pre`: init containers with `restartPolicy: Always` are kept.
    pub const NATIVE_SIDECARS: &str = "native-sidecars";
    /// `--pre`: the caller may create what installing creates.
    pub const PERMISSIONS: &str = "permissions";
    /// Weft's CRDs installed, established, at the versions this binary knows.
    pub const CRDS: &str = "crds";
    /// The operator's Deployment has its replicas ready.
    pub const OPERATOR_REPLICAS: &str = "operator-replicas";
    /// A replica holds the status Lease and renews it.
    pub const OPERATOR_LEASE: &str = "operator-lease";
    /// The injection webhook is registered with a usable caBundle.
    pub const WEBHOOK_REGISTERED: &str = "webhook-registered";
    /// The webhook answers with a certificate its caBundle verifies, and injects.
    pub const WEBHOOK_SERVING: &str = "webhook-serving";
    /// The injection settings ConfigMap is readable and valid.
    pub const INJECT_SETTINGS: &str = "inject-settings";
    /// The identity trust root is valid long enough.
    pub const TRUST_ROOT: &str = "trust-root";
    /// Every meshed pod's proxy runs the desired config and is not older than the operator.
    pub const PROXIES: &str = "proxies";
    /// No pod opted in and runs without the proxy.
    pub const UNMESHED_PODS: &str = "unmeshed-pods";
    /// No pod carries a `weft.dev/` annotation Weft does not read, or a `weft.dev/inject`
    /// that says neither `enabled` nor `disabled`.
    pub const POD_ANNOTATIONS: &str = "pod-annotations";
    /// No Namespace or Service carries `weft.dev/` metadata Weft does not read there.
    pub const NAMESPACE_SERVICE_ANNOTATIONS: &str = "ns-svc-annotations";
}

/// How the report is printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A line per check, hints below.
    #[default]
    Text,
    /// One JSON document (schema in docs/operating.md).
    Json,
}

/// Flags of `kubectl weft check`.
#[derive(Clone, Debug, clap::Args)]
pub struct CheckArgs {
    /// Before installing: Kubernetes version, native sidecar support, the caller's
    /// permissions.
    #[arg(long)]
    pub pre: bool,
    /// `text` or `json`.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: Output,
    /// Only pods in this namespace for the pod checks (proxies, unmeshed pods); default:
    /// every namespace.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// The operator's namespace (Deployment, Lease, Secrets, injection settings).
    #[arg(long, env = "WEFT_NAMESPACE", default_value = "weft-system")]
    pub operator_namespace: String,
    /// Name of the operator's MutatingWebhookConfiguration.
    #[arg(long, default_value = "weft-injector")]
    pub webhook: String,
    /// Name of the operator's Deployment.
    #[arg(long, default_value = "weft-operator")]
    pub operator_deployment: String,
    /// Name of the Lease that elects the status writer.
    #[arg(long, default_value = "weft-operator")]
    pub lease_name: String,
    /// Name of the Secret holding the identity trust root.
    #[arg(long, default_value = "weft-identity")]
    pub identity_secret: String,
    /// The operator's Service and admin port name, through the API server's service proxy.
    #[arg(long, default_value = crate::admin::DEFAULT_OPERATOR_SERVICE)]
    pub operator_service: String,
    /// Read the operator's admin endpoint directly (`http://host:port`) instead.
    #[arg(long)]
    pub operator_url: Option<String>,
    /// Namespace of the dry-run pods the API server is asked to admit (nothing is
    /// created): the webhook probe, and `--pre`'s native-sidecar probe.
    #[arg(long, default_value = "default")]
    pub probe_namespace: String,
}

/// Runs the checks `args` ask for against the cluster `client` talks to.
pub async fn run(client: &Client, args: &CheckArgs) -> Report {
    if args.pre {
        return pre::run(client, args).await;
    }
    let now = now_secs();
    let mut report = Report::default();
    report.push(crds(client).await);
    report.push(operator_replicas(client, args).await);
    report.push(operator_lease(client, args, now).await);
    let hook = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get_opt(&args.webhook)
        .await;
    report.push(evaluate_webhook_registration(&args.webhook, &hook, now));
    report.push(webhook_serving(client, args, &hook).await);
    let cfg = match crate::settings::from_cluster(client, &args.operator_namespace, CONFIG_MAP)
        .await
    {
        Ok((cfg, source)) => {
            report.push(Finding::ok(names::INJECT_SETTINGS, source.to_string()));
            cfg
        }
        Err(e) => {
            report.push(Finding::fail(
                names::INJECT_SETTINGS,
                e.to_string(),
                format!(
                    "fix ConfigMap {}/{CONFIG_MAP} (docs/injection.md#settings): the webhook reads it",
                    args.operator_namespace
                ),
            ));
            InjectConfig::for_operator(&args.operator_namespace, crate::settings::OPERATOR_SERVICE)
        }
    };
    report.push(trust_root(client, args, now).await);
    report.push(proxies(client, args).await);
    // Judged against the registration as it is (its selectors, so an operator's namespace
    // scope too): without one, as the chart registers it (pods may opt in by annotation).
    let entries = match &hook {
        Ok(Some(hook)) => live_entries(hook),
        _ => weft_inject::selection::entries(true, &cfg.excluded_namespaces, None),
    };
    let (unmeshed, annotations) = pods(client, args, &cfg, &entries).await;
    report.push(unmeshed);
    report.push(annotations);
    report.push(namespace_service_annotations(client, args).await);
    report
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// CRDs

async fn crds(client: &Client) -> Finding {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let mut found = Vec::new();
    for (_, built) in weft_crds::all() {
        let name = built.metadata.name.clone().unwrap_or_default();
        match api.get_opt(&name).await {
            Ok(cluster) => found.push((built, cluster)),
            Err(e) => {
                return Finding::fail(
                    names::CRDS,
                    format!("reading CRD {name}: {e}"),
                    "check that you may get customresourcedefinitions",
                );
            }
        }
    }
    evaluate_crds(&found)
}

/// Judges the cluster's CRDs (`None`: absent) against those this binary was built with:
/// each must exist, be established, serve every version built in, and store the same one.
/// A schema that differs only warns: the resources still work, validation may differ.
pub fn evaluate_crds(
    pairs: &[(CustomResourceDefinition, Option<CustomResourceDefinition>)],
) -> Finding {
    let mut problems = Vec::new();
    let mut drift = Vec::new();
    let mut versions = Vec::new();
    for (built, cluster) in pairs {
        let name = built.metadata.name.clone().unwrap_or_default();
        let Some(cluster) = cluster else {
            problems.push(format!("{name} is missing"));
            continue;
        };
        if !weft_crds::is_established(cluster) {
            problems.push(format!("{name} is not established"));
        }
        for v in &built.spec.versions {
            versions.push(v.name.clone());
            match cluster.spec.versions.iter().find(|c| c.name == v.name) {
                None => problems.push(format!("{name} has no version {}", v.name)),
                Some(c) if !c.served => {
                    problems.push(format!("{name} does not serve version {}", v.name));
                }
                Some(c) => {
                    if v.storage && !c.storage {
                        problems.push(format!(
                            "{name} stores another version than {} (the one this release stores)",
                            v.name
                        ));
                    }
                    let schema = |s: &Option<_>| serde_json::to_value(s).unwrap_or_default();
                    if schema(&v.schema) != schema(&c.schema) {
                        drift.push(format!("{name} {}", v.name));
                    }
                }
            }
        }
    }
    versions.sort();
    versions.dedup();
    let apply = format!(
        "kubectl apply -f crds/ (the CRDs of Weft {}, which the operator of this release expects)",
        env!("CARGO_PKG_VERSION")
    );
    if !problems.is_empty() {
        return Finding::fail(names::CRDS, problems.join("\n"), apply);
    }
    let names: Vec<String> = pairs
        .iter()
        .filter_map(|(b, _)| b.metadata.name.clone())
        .collect();
    let summary = format!(
        "{} established, serving {}",
        names.join(", "),
        versions.join(", ")
    );
    if drift.is_empty() {
        Finding::ok(names::CRDS, summary)
    } else {
        Finding::warn(
            names::CRDS,
            format!(
                "{summary}; the schema differs from this release's: {}",
                drift.join(", ")
            ),
            apply,
        )
    }
}

// ---------------------------------------------------------------------------------------
// The operator: replicas and Lease

async fn operator_replicas(client: &Client, args: &CheckArgs) -> Finding {
    let got = Api::<Deployment>::namespaced(client.clone(), &args.operator_namespace)
        .get_opt(&args.operator_deployment)
        .await;
    let at = format!("{}/{}", args.operator_namespace, args.operator_deployment);
    match got {
        Err(e) => Finding::fail(
            names::OPERATOR_REPLICAS,
            format!("reading Deployment {at}: {e}"),
            "check that you may get deployments in the operator's namespace (--operator-namespace)",
        ),
        Ok(d) => evaluate_replicas(&at, d.as_ref()),
    }
}

/// Judges the operator's Deployment `at` by its status as its controller wrote it: all
/// wanted replicas ready is ok, some is a warning, none is a failure.
pub fn evaluate_replicas(at: &str, d: Option<&Deployment>) -> Finding {
    let Some(d) = d else {
        return Finding::fail(
            names::OPERATOR_REPLICAS,
            format!("Deployment {at} not found"),
            "install Weft (helm install weft charts/weft -n weft-system), or pass --operator-namespace/--operator-deployment",
        );
    };
    let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let status = d.status.clone().unwrap_or_default();
    let ready = status.ready_replicas.unwrap_or(0);
    let logs = format!(
        "kubectl -n {} describe deploy/{} and kubectl -n {} logs deploy/{}",
        d.metadata.namespace.clone().unwrap_or_default(),
        d.metadata.name.clone().unwrap_or_default(),
        d.metadata.namespace.clone().unwrap_or_default(),
        d.metadata.name.clone().unwrap_or_default(),
    );
    if wanted == 0 {
        return Finding::fail(
            names::OPERATOR_REPLICAS,
            format!("Deployment {at} is scaled to 0"),
            format!(
                "scale it up: kubectl scale deploy/{} --replicas=2",
                at.rsplit('/').next().unwrap_or(at)
            ),
        );
    }
    if ready == 0 {
        Finding::fail(
            names::OPERATOR_REPLICAS,
            format!("Deployment {at}: 0 of {wanted} replicas ready"),
            logs,
        )
    } else if ready < wanted {
        Finding::warn(
            names::OPERATOR_REPLICAS,
            format!("Deployment {at}: {ready} of {wanted} replicas ready"),
            logs,
        )
    } else {
        Finding::ok(
            names::OPERATOR_REPLICAS,
            format!("Deployment {at}: {ready} of {wanted} replicas ready"),
        )
    }
}

async fn operator_lease(client: &Client, args: &CheckArgs, now: i64) -> Finding {
    let at = format!("{}/{}", args.operator_namespace, args.lease_name);
    match Api::<Lease>::namespaced(client.clone(), &args.operator_namespace)
        .get_opt(&args.lease_name)
        .await
    {
        Err(e) => Finding::fail(
            names::OPERATOR_LEASE,
            format!("reading Lease {at}: {e}"),
            "check that you may get leases in the operator's namespace",
        ),
        Ok(l) => evaluate_lease(&at, l.as_ref(), now),
    }
}

/// Slack allowed between this machine's clock and the holder's when judging a renewal.
const CLOCK_SLACK_SECS: i64 = 5;

/// Judges the status Lease `at`: held, and renewed within its duration (plus a few seconds
/// of clock difference) before `now`. The operator itself never trusts wall clocks across
/// machines; a one-shot check has to, so it allows slack and says what it compared.
pub fn evaluate_lease(at: &str, lease: Option<&Lease>, now: i64) -> Finding {
    let spec = lease.and_then(|l| l.spec.clone()).unwrap_or_default();
    let holder = spec.holder_identity.filter(|h| !h.is_empty());
    let Some(holder) = holder else {
        return Finding::fail(
            names::OPERATOR_LEASE,
            format!(
                "no operator replica holds Lease {at}: Route, Policy and Breaker status is not written"
            ),
            "check that the operator runs (operator-replicas) and its logs for \"lease\"",
        );
    };
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    let Some(renewed) = spec.renew_time.map(|t| t.0.as_second()) else {
        return Finding::fail(
            names::OPERATOR_LEASE,
            format!("Lease {at} is held by {holder} but was never renewed"),
            "check the operator's logs for \"lease\"",
        );
    };
    let ago = now - renewed;
    if ago > duration + CLOCK_SLACK_SECS {
        Finding::fail(
            names::OPERATOR_LEASE,
            format!(
                "Lease {at} is held by {holder}, last renewed {ago}s ago (duration {duration}s): that replica is gone or hung, and nobody writes status until another takes over"
            ),
            format!(
                "check that {holder} runs; another replica takes the Lease {duration}s after the last renewal it saw"
            ),
        )
    } else {
        Finding::ok(
            names::OPERATOR_LEASE,
            format!("Lease {at} is held by {holder}, renewed within its {duration}s"),
        )
    }
}

// ---------------------------------------------------------------------------------------
// The webhook

/// Judges the webhook's registration: present, with a caBundle of certificates valid now.
/// An expired certificate beside one that is not only warns: it is the CA served before a
/// rotation, which a running operator drops from the bundle when it expires.
pub fn evaluate_webhook_registration(
    name: &str,
    got: &Result<Option<MutatingWebhookConfiguration>, kube::Error>,
    now: i64,
) -> Finding {
    let hook = match got {
        Err(e) => {
            return Finding::fail(
                names::WEBHOOK_REGISTERED,
                format!("reading MutatingWebhookConfiguration {name}: {e}"),
                "check that you may get mutatingwebhookconfigurations",
            );
        }
        Ok(None) => {
            return Finding::fail(
                names::WEBHOOK_REGISTERED,
                format!("injection webhook {name} is not registered: no pod is being injected"),
                "the operator registers it at start: check that it runs (and without --no-webhook), or pass --webhook NAME",
            );
        }
        Ok(Some(h)) => h,
    };
    let hooks = hook.webhooks.clone().unwrap_or_default();
    if hooks.is_empty() {
        return Finding::fail(
            names::WEBHOOK_REGISTERED,
            format!("{name} has no webhooks"),
            "restart the operator: it rewrites the configuration at start",
        );
    }
    // Expired certificates kept beside a valid one, as "webhook: subject".
    let mut lingering = Vec::new();
    for h in &hooks {
        let bundle = h
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.clone())
            .unwrap_or_default();
        if bundle.is_empty() {
            return Finding::fail(
                names::WEBHOOK_REGISTERED,
                format!(
                    "webhook {} of {name} has no caBundle: the API server cannot verify it",
                    h.name
                ),
                "restart the operator: it writes its CA into caBundle at start",
            );
        }
        match certs::pem_infos(&bundle) {
            Err(e) => {
                return Finding::fail(
                    names::WEBHOOK_REGISTERED,
                    format!("the caBundle of webhook {} of {name}: {e}", h.name),
                    "restart the operator: it writes its CA into caBundle at start",
                );
            }
            Ok(infos) => {
                let (expired, valid): (Vec<_>, Vec<_>) =
                    infos.iter().partition(|c| c.not_after < now);
                if valid.is_empty()
                    && let Some(expired) = expired.first()
                {
                    return Finding::fail(
                        names::WEBHOOK_REGISTERED,
                        format!(
                            "the caBundle of webhook {} of {name} holds only expired certificates ({})",
                            h.name, expired.subject
                        ),
                        "delete Secret weft-ca in the operator's namespace and restart the operator: it creates a new CA and rewrites caBundle",
                    );
                }
                lingering.extend(
                    expired
                        .iter()
                        .map(|c| format!("webhook {}: {}", h.name, c.subject)),
                );
            }
        }
    }
    if !lingering.is_empty() {
        return Finding::warn(
            names::WEBHOOK_REGISTERED,
            format!(
                "the caBundle of {name} holds an expired certificate beside a valid one ({}): the CA served before the last change of weft-ca, harmless since the API server verifies against the valid one",
                lingering.join(", ")
            ),
            "it leaves at the bundle's next rewrite: a running operator drops it a second after it expires; if it stays, restart the operator (kubectl rollout restart deployment/weft-operator), which rewrites caBundle with its CA alone (no need for a new CA)",
        );
    }
    let policy = hooks[0].failure_policy.clone().unwrap_or_default();
    Finding::ok(
        names::WEBHOOK_REGISTERED,
        format!(
            "injection webhook {name} is registered ({} webhooks, failurePolicy {policy}), caBundle valid",
            hooks.len()
        ),
    )
}

async fn webhook_serving(
    client: &Client,
    args: &CheckArgs,
    got: &Result<Option<MutatingWebhookConfiguration>, kube::Error>,
) -> Finding {
    let Ok(Some(hook)) = got else {
        return Finding::fail(
            names::WEBHOOK_SERVING,
            "not checked: the webhook is not registered",
            "see webhook-registered",
        );
    };
    let Some(first) = hook.webhooks.as_ref().and_then(|h| h.first()) else {
        return Finding::fail(
            names::WEBHOOK_SERVING,
            "not checked: the configuration has no webhooks",
            "see webhook-registered",
        );
    };
    let bundle = first
        .client_config
        .ca_bundle
        .as_ref()
        .map(|b| b.0.clone())
        .unwrap_or_default();
    let restart = "the caBundle must hold the CA that issued the webhook's serving certificate: restart the operator, which rewrites caBundle with its CA (Secret weft-ca) at start";
    let mut told = Vec::new();
    // A URL is reached from here as the API server reaches it, so the chain is verified
    // directly. A Service is not reachable from outside the cluster; there, the dry-run
    // below is the proof: the API server verifies the webhook against caBundle itself.
    if let Some(url) = &first.client_config.url {
        match split_https_url(url) {
            None => {
                return Finding::fail(
                    names::WEBHOOK_SERVING,
                    format!("webhook URL {url} is not https://HOST:PORT/…"),
                    "restart the operator with a valid --webhook-url",
                );
            }
            Some((host, port)) => match certs::verify_server(&host, port, &bundle).await {
                Ok(leaf) => told.push(format!(
                    "{url}: serving certificate {} verifies against caBundle",
                    leaf.subject
                )),
                Err(e @ certs::VerifyError::Handshake { .. }) => {
                    return Finding::fail(
                        names::WEBHOOK_SERVING,
                        format!(
                            "{url}: the serving certificate does not verify against caBundle: {e}"
                        ),
                        restart,
                    );
                }
                Err(e) => {
                    return Finding::fail(
                        names::WEBHOOK_SERVING,
                        format!("{url}: not reachable: {e}"),
                        "check that the operator runs and serves the webhook (--webhook-addr)",
                    );
                }
            },
        }
    }
    match probe_injection(client, &args.probe_namespace).await {
        Ok(true) => {
            told.push(format!(
                "the API server called it for a dry-run pod in namespace {} and got the proxy injected",
                args.probe_namespace
            ));
            Finding::ok(names::WEBHOOK_SERVING, told.join("\n"))
        }
        Ok(false) => {
            told.push(format!(
                "a dry-run pod labelled {}={} in namespace {} came back without the proxy: the API server could not call the webhook, or failed to verify it against caBundle (failurePolicy Ignore hides which)",
                keys::INJECT,
                keys::ENABLED,
                args.probe_namespace
            ));
            Finding::fail(
                names::WEBHOOK_SERVING,
                told.join("\n"),
                format!(
                    "{restart}; also check the API server's log for \"failed calling webhook\", and that namespace {} is not excluded from injection (or pass --probe-namespace)",
                    args.probe_namespace
                ),
            )
        }
        Err(kube::Error::Api(e)) if e.code == 403 => {
            told.push(format!(
                "not asked to inject: you may not create pods in namespace {}, even as a dry run",
                args.probe_namespace
            ));
            Finding::warn(
                names::WEBHOOK_SERVING,
                told.join("\n"),
                "run as a user who may, or pass --probe-namespace NS (nothing is created)",
            )
        }
        Err(e) => {
            told.push(format!(
                "the API server refused a dry-run pod in namespace {}: {e}",
                args.probe_namespace
            ));
            Finding::fail(names::WEBHOOK_SERVING, told.join("\n"), restart)
        }
    }
}

/// `(host, port)` of an `https://` URL (port 443 when none is given).
fn split_https_url(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split(['/', '?']).next()?;
    if authority.is_empty() {
        return None;
    }
    // `[::1]:8443`, `host:8443`, `host`.
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && (!h.starts_with('[') || h.ends_with(']')) => {
            (h.to_owned(), p.parse().ok()?)
        }
        _ => (authority.to_owned(), 443),
    };
    Some((host, port))
}

/// Asks the API server to admit, without creating it, a pod that opted in; whether the
/// answer carries the proxy.
async fn probe_injection(client: &Client, namespace: &str) -> Result<bool, kube::Error> {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"generateName": "weft-check-", "labels": {keys::INJECT: keys::ENABLED}},
        "spec": {"containers": [{"name": "app", "image": "weft.invalid/check:1"}]}
    }))
    .map_err(kube::Error::SerdeError)?;
    let params = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let admitted = Api::<Pod>::namespaced(client.clone(), namespace)
        .create(&params, &pod)
        .await?;
    Ok(admitted
        .spec
        .and_then(|s| s.init_containers)
        .is_some_and(|c| c.iter().any(|c| c.name == keys::PROXY_CONTAINER)))
}

// ---------------------------------------------------------------------------------------
// The trust root

async fn trust_root(client: &Client, args: &CheckArgs, now: i64) -> Finding {
    let at = format!("{}/{}", args.operator_namespace, args.identity_secret);
    match Api::<Secret>::namespaced(client.clone(), &args.operator_namespace)
        .get_opt(&args.identity_secret)
        .await
    {
        Err(e) => Finding::fail(
            names::TRUST_ROOT,
            format!("reading Secret {at}: {e}"),
            "check that you may get secrets in the operator's namespace",
        ),
        Ok(s) => evaluate_trust_root(&at, s.as_ref(), now),
    }
}

/// Judges the identity Secret `at`: its signing root (the first certificate of `ca.crt`)
/// must be valid now and for [`TRUST_ROOT_MIN_DAYS`] more; a supplied issuer (`tls.crt`)
/// must be valid now (the operator does not renew it).
pub fn evaluate_trust_root(at: &str, secret: Option<&Secret>, now: i64) -> Finding {
    let Some(secret) = secret else {
        return Finding::warn(
            names::TRUST_ROOT,
            format!("Secret {at} does not exist: proxies get no certificates, so no mutual TLS"),
            "the operator creates it at start unless run with --no-identity (or another --identity-secret): check that it runs",
        );
    };
    let data = secret.data.clone().unwrap_or_default();
    let rotate =
        "rotate the trust root before it expires (docs/identity.md, \"Rotating the root\")";
    let Some(ca) = data.get("ca.crt") else {
        return Finding::fail(
            names::TRUST_ROOT,
            format!("Secret {at} has no ca.crt"),
            "restore the Secret (layout in docs/identity.md) and restart the operator",
        );
    };
    let roots = match certs::pem_infos(&ca.0) {
        Ok(r) => r,
        Err(e) => {
            return Finding::fail(
                names::TRUST_ROOT,
                format!("ca.crt of Secret {at}: {e}"),
                "restore the Secret (layout in docs/identity.md) and restart the operator",
            );
        }
    };
    let root = &roots[0];
    let days = certs::days_until(root.not_after, now);
    let mut lines = vec![format!(
        "signing root {} valid until {} ({days} days)",
        root.subject,
        date(root.not_after)
    )];
    if let Some(issuer) = data
        .get("tls.crt")
        .and_then(|c| certs::pem_infos(&c.0).ok())
        .and_then(|c| c.into_iter().next())
    {
        let idays = certs::days_until(issuer.not_after, now);
        if issuer.not_after <= now {
            return Finding::fail(
                names::TRUST_ROOT,
                format!(
                    "the supplied issuing CA {} (tls.crt of Secret {at}) expired on {}: no certificate can be issued",
                    issuer.subject,
                    date(issuer.not_after)
                ),
                "put a new issuing CA in tls.crt/tls.key and restart the operator (docs/identity.md)",
            );
        }
        lines.push(format!(
            "issuing CA {} (tls.crt) valid until {} ({idays} days; the operator does not renew it)",
            issuer.subject,
            date(issuer.not_after)
        ));
    }
    if root.not_before > now + CLOCK_SLACK_SECS {
        return Finding::fail(
            names::TRUST_ROOT,
            format!(
                "signing root {} of Secret {at} is not valid before {}",
                root.subject,
                date(root.not_before)
            ),
            "check this machine's clock and the Secret",
        );
    }
    if root.not_after <= now {
        lines[0] = format!(
            "signing root {} of Secret {at} expired on {}: proxies' certificates no longer verify",
            root.subject,
            date(root.not_after)
        );
        return Finding::fail(names::TRUST_ROOT, lines.join("\n"), rotate);
    }
    if days < TRUST_ROOT_MIN_DAYS {
        lines[0] = format!(
            "signing root {} of Secret {at} expires in {days} days (on {}), under {TRUST_ROOT_MIN_DAYS}",
            root.subject,
            date(root.not_after)
        );
        return Finding::fail(names::TRUST_ROOT, lines.join("\n"), rotate);
    }
    if let Some(other) = roots[1..].iter().find(|r| r.not_after <= now) {
        lines.push(format!(
            "another root in the bundle, {}, has expired",
            other.subject
        ));
        return Finding::warn(
            names::TRUST_ROOT,
            lines.join("\n"),
            "remove expired roots from ca.crt (docs/identity.md, \"Rotating the root\")",
        );
    }
    Finding::ok(names::TRUST_ROOT, lines.join("\n"))
}

/// `YYYY-MM-DD` (UTC) of a time in seconds since the epoch.
fn date(secs: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.strftime("%Y-%m-%d").to_string())
        .unwrap_or_else(|_| secs.to_string())
}

// ---------------------------------------------------------------------------------------
// Proxies

async fn proxies(client: &Client, args: &CheckArgs) -> Finding {
    let pods = match crate::proxy_status::meshed_pods(client, args.namespace.as_deref()).await {
        Ok(p) => p,
        Err(e) => {
            return Finding::fail(
                names::PROXIES,
                format!("{e:#}"),
                "check that you may list pods",
            );
        }
    };
    let fetched = async {
        let admin = crate::admin::OperatorAdmin::new(
            &args.operator_namespace,
            &args.operator_service,
            args.operator_url.as_deref(),
        )
        .await?;
        let rows = crate::proxy_status::fetch(&admin).await?;
        let version: OperatorVersion = serde_json::from_str(&admin.get("/version").await?)
            .context("the operator's /version answer")?;
        anyhow::Ok((rows, version.version))
    }
    .await;
    match fetched {
        Ok((rows, version)) => evaluate_proxies(&pods, &rows, &version),
        Err(e) => Finding::fail(
            names::PROXIES,
            format!("cannot ask the operator which proxies are in sync: {e:#}"),
            "check that the operator runs (operator-replicas) and that you may get services/proxy in its namespace, or pass --operator-url",
        ),
    }
}

/// A version as `(major, minor, patch)`; a pre-release suffix is ignored.
fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let core = v.trim().split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

/// At most this many pods are named per problem; the rest are counted.
const NAMED_PODS: usize = 5;

/// Judges each meshed pod (`namespace/name`) by the operator's rows: its proxy must be
/// connected, run the version the operator wants (not rejected), and not be older than
/// `operator_version`.
pub fn evaluate_proxies(pods: &[String], rows: &[ProxyRow], operator_version: &str) -> Finding {
    let by_pod: BTreeMap<&str, &ProxyRow> = rows.iter().map(|r| (r.pod.as_str(), r)).collect();
    let want = parse_version(operator_version);
    let mut problems: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let mut unknown_version = Vec::new();
    for pod in pods {
        let Some(r) = by_pod.get(pod.as_str()) else {
            problems
                .entry("not connected to the operator")
                .or_default()
                .push(pod.clone());
            continue;
        };
        if !r.connected {
            problems
                .entry("disconnected from the operator")
                .or_default()
                .push(pod.clone());
        } else if let Some(reason) = &r.rejected {
            problems
                .entry("rejected its config")
                .or_default()
                .push(format!("{pod} ({reason})"));
        } else if !r.in_sync {
            let v = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
            problems.entry("out of sync").or_default().push(format!(
                "{pod} (runs version {}, the operator wants {})",
                v(r.acked_version),
                v(r.desired_version)
            ));
        }
        let running = r
            .proxy
            .as_deref()
            .and_then(|p| p.rsplit(' ').next())
            .and_then(parse_version);
        match (running, want) {
            (Some(have), Some(want)) if have < want => {
                problems
                    .entry("older than the operator")
                    .or_default()
                    .push(format!(
                        "{pod} ({})",
                        r.proxy.as_deref().unwrap_or_default()
                    ));
            }
            (None, _) if r.connected => unknown_version.push(pod.clone()),
            _ => {}
        }
    }
    let name_some = |pods: &[String]| {
        let mut s = pods[..pods.len().min(NAMED_PODS)].join(", ");
        if pods.len() > NAMED_PODS {
            s.push_str(&format!(" and {} more", pods.len() - NAMED_PODS));
        }
        s
    };
    if !problems.is_empty() {
        let lines: Vec<String> = problems
            .iter()
            .map(|(what, pods)| format!("{} proxy(ies) {what}: {}", pods.len(), name_some(pods)))
            .collect();
        let mut hints = Vec::new();
        if problems.contains_key("older than the operator") {
            hints.push("restart older pods (kubectl rollout restart) so that they are injected with the current proxy".to_owned());
        }
        if problems.keys().any(|k| *k != "older than the operator") {
            hints.push("kubectl weft proxy-status shows each proxy; a proxy that stays out of sync or disconnected: kubectl logs POD -c weft-proxy (a rejection names its reason)".to_owned());
        }
        return Finding::fail(names::PROXIES, lines.join("\n"), hints.join("; "));
    }
    let summary = format!(
        "{} meshed pod(s): every proxy in sync and not older than the operator ({operator_version})",
        pods.len()
    );
    if unknown_version.is_empty() {
        Finding::ok(names::PROXIES, summary)
    } else {
        Finding::warn(
            names::PROXIES,
            format!(
                "{} meshed pod(s) in sync; {} did not report their version (older than {operator_version}?): {}",
                pods.len(),
                unknown_version.len(),
                name_some(&unknown_version)
            ),
            "restart them (kubectl rollout restart) so that they run the current proxy",
        )
    }
}

// ---------------------------------------------------------------------------------------
// Unmeshed pods

/// The selectors of a live registration's entries, as the API server applies them: its
/// namespace selector's labels and expressions, and its object selector.
pub fn live_entries(hook: &MutatingWebhookConfiguration) -> Vec<weft_inject::selection::Entry> {
    hook.webhooks
        .iter()
        .flatten()
        .map(|w| {
            let selector = w.namespace_selector.clone().unwrap_or_default();
            let namespaces = selector
                .match_labels
                .unwrap_or_default()
                .into_iter()
                .map(|(key, value)| LabelSelectorRequirement {
                    key,
                    operator: "In".to_owned(),
                    values: Some(vec![value]),
                })
                .chain(selector.match_expressions.unwrap_or_default())
                .collect();
            weft_inject::selection::Entry {
                name: w.name.clone(),
                namespaces,
                pods: w.object_selector.clone().unwrap_or_default(),
            }
        })
        .collect()
}

/// The `unmeshed-pods` and `pod-annotations` findings, from one scan of the pods.
async fn pods(
    client: &Client,
    args: &CheckArgs,
    cfg: &InjectConfig,
    entries: &[weft_inject::selection::Entry],
) -> (Finding, Finding) {
    let scan = match weft_inject::audit::scan(client, cfg, entries).await {
        Ok(scan) => scan,
        Err(e) => {
            let fail = |name| {
                Finding::fail(
                    name,
                    format!("listing pods: {e}"),
                    "check that you may list pods and namespaces",
                )
            };
            return (fail(names::UNMESHED_PODS), fail(names::POD_ANNOTATIONS));
        }
    };
    let in_scope = |namespace: &str| args.namespace.as_ref().is_none_or(|n| n == namespace);
    (
        unmeshed(
            scan.unmeshed
                .into_iter()
                .filter(|u| in_scope(&u.namespace))
                .collect(),
        ),
        misannotated(
            scan.misannotated
                .into_iter()
                .filter(|m| in_scope(&m.namespace))
                .collect(),
        ),
    )
}

fn unmeshed(found: Vec<weft_inject::audit::Unmeshed>) -> Finding {
    if found.is_empty() {
        return Finding::ok(
            names::UNMESHED_PODS,
            "every pod that opted in runs with the proxy",
        );
    }
    let found: Vec<String> = found
        .into_iter()
        .map(|u| format!("{}/{} (opted in by {})", u.namespace, u.name, u.opted_in_by))
        .collect();
    Finding::fail(
        names::UNMESHED_PODS,
        format!(
            "{} pod(s) opted in but run without the proxy (created while the webhook was unreachable, or before opting in): {}",
            found.len(),
            found.join(", ")
        ),
        "restart them (kubectl rollout restart deploy/NAME, or delete the pod) so that the webhook injects the proxy",
    )
}

/// The `ns-svc-annotations` finding: Namespaces (and Services) in scope, read
/// by their metadata only.
async fn namespace_service_annotations(client: &Client, args: &CheckArgs) -> Finding {
    use k8s_openapi::api::core::v1::{Namespace, Service};
    use kube::api::{ListParams, PartialObjectMeta};
    let read = async {
        let namespaces = Api::<PartialObjectMeta<Namespace>>::all(client.clone())
            .list(&ListParams::default())
            .await?;
        let services = match &args.namespace {
            Some(ns) => Api::<PartialObjectMeta<Service>>::namespaced(client.clone(), ns),
            None => Api::<PartialObjectMeta<Service>>::all(client.clone()),
        }
        .list(&ListParams::default())
        .await?;
        Ok::<_, kube::Error>((namespaces.items, services.items))
    };
    match read.await {
        Ok((namespaces, services)) => {
            let in_scope = |n: &PartialObjectMeta<Namespace>| {
                args.namespace.is_none() || n.metadata.name == args.namespace
            };
            let namespaces: Vec<_> = namespaces
                .into_iter()
                .filter(in_scope)
                .map(|n| n.metadata)
                .collect();
            let services: Vec<_> = services.into_iter().map(|s| s.metadata).collect();
            evaluate_namespace_service_annotations(&namespaces, &services)
        }
        Err(e) => Finding::fail(
            names::NAMESPACE_SERVICE_ANNOTATIONS,
            format!("listing namespaces and services: {e}"),
            "check that you may list namespaces and services",
        ),
    }
}

/// Objects named in a metadata finding; the count says how many more.
const MISANNOTATED_SHOWN: usize = 10;

/// Judges Namespaces' and Services' `weft.dev/` metadata: on a Namespace, Weft reads the
/// label `weft.dev/inject` (`enabled` or `disabled`) and the annotation
/// `weft.dev/visible-namespaces`; on a Service, the annotation `weft.dev/opaque-ports`.
/// Anything else does nothing, which is a warning: `weft.dev/inject` written as a
/// Namespace *annotation* (as Linkerd's is) injects nothing.
pub fn evaluate_namespace_service_annotations(
    namespaces: &[kube::api::ObjectMeta],
    services: &[kube::api::ObjectMeta],
) -> Finding {
    let mut found = Vec::new();
    for n in namespaces {
        let name = n.name.clone().unwrap_or_default();
        let mut problems = Vec::new();
        let annotations = n.annotations.as_ref();
        if annotations.is_some_and(|a| a.contains_key(keys::INJECT)) {
            problems.push(format!(
                "{} is an annotation, but Namespaces opt in by label (kubectl label namespace {name} {}=enabled)",
                keys::INJECT,
                keys::INJECT
            ));
        }
        problems.extend(
            weft_inject::unknown_among(annotations, &keys::NAMESPACE_ANNOTATIONS)
                .into_iter()
                .filter(|u| u.key != keys::INJECT)
                .map(|u| described(&u)),
        );
        if let Some(v) = n.labels.as_ref().and_then(|l| l.get(keys::INJECT))
            && v != keys::ENABLED
            && v != keys::DISABLED
        {
            problems.push(format!(
                "label {}={v} is neither {} nor {}, so it does nothing",
                keys::INJECT,
                keys::ENABLED,
                keys::DISABLED
            ));
        }
        if !problems.is_empty() {
            found.push(format!("namespace {name}: {}", problems.join(", ")));
        }
    }
    for s in services {
        let unknown =
            weft_inject::unknown_among(s.annotations.as_ref(), &keys::SERVICE_ANNOTATIONS);
        if !unknown.is_empty() {
            let keys: Vec<String> = unknown.iter().map(described).collect();
            found.push(format!(
                "service {}/{}: {}",
                s.namespace.clone().unwrap_or_default(),
                s.name.clone().unwrap_or_default(),
                keys.join(", ")
            ));
        }
    }
    if found.is_empty() {
        return Finding::ok(
            names::NAMESPACE_SERVICE_ANNOTATIONS,
            "no Namespace or Service carries weft.dev/ metadata Weft does not read",
        );
    }
    let total = found.len();
    if total > MISANNOTATED_SHOWN {
        found.truncate(MISANNOTATED_SHOWN);
        found.push(format!("and {} more", total - MISANNOTATED_SHOWN));
    }
    Finding::warn(
        names::NAMESPACE_SERVICE_ANNOTATIONS,
        format!(
            "{total} Namespace(s) or Service(s) carry weft.dev/ metadata Weft does not read there, which does nothing: {}",
            found.join("; ")
        ),
        format!(
            "on a Namespace Weft reads the label {} (enabled or disabled) and the annotation {}; on a Service, the annotation {} (docs/injection.md)",
            keys::INJECT,
            keys::VISIBLE_NAMESPACES,
            keys::OPAQUE_PORTS
        ),
    )
}

/// An unknown key, with the key it likely meant.
fn described(u: &weft_inject::UnknownAnnotation) -> String {
    match u.likely {
        Some(known) => format!("{} (did you mean {known}?)", u.key),
        None => u.key.clone(),
    }
}

fn misannotated(found: Vec<weft_inject::audit::Misannotated>) -> Finding {
    if found.is_empty() {
        return Finding::ok(
            names::POD_ANNOTATIONS,
            "no pod carries a weft.dev/ annotation or label that does nothing",
        );
    }
    let total = found.len();
    let mut shown: Vec<String> = found
        .into_iter()
        .take(MISANNOTATED_SHOWN)
        .map(|m| {
            let keys: Vec<String> = m
                .unknown
                .iter()
                .map(described)
                .chain(m.inject_value.clone())
                .collect();
            format!("{}/{}: {}", m.namespace, m.name, keys.join(", "))
        })
        .collect();
    if total > MISANNOTATED_SHOWN {
        shown.push(format!("and {} more", total - MISANNOTATED_SHOWN));
    }
    Finding::warn(
        names::POD_ANNOTATIONS,
        format!(
            "{total} pod(s) carry weft.dev/ annotations or labels that do nothing: {}",
            shown.join("; ")
        ),
        "fix the annotation in the pod template (docs/injection.md lists them) and restart the pods",
    )
}

#[cfg(test)]
mod tests;
