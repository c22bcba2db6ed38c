//! The mutating admission webhook: the API server sends it every pod creation that may
//! have opted in, and it answers with the injection as a JSONPatch.
//!
//! ```text
//!  start: CA Secret ──▶ serving cert (renewed at 2/3 of its life) ──▶ CertStore
//!         registration (MutatingWebhookConfiguration with caBundle = CA)
//!         (in the operator: retried with backoff until it succeeds; readiness gate opens)
//!  serve: API server ──TLS──▶ server ──▶ review::parse ─▶ namespace labels ─▶ review::admit
//!         watch of the CA Secret ──▶ rotation: caBundle = new + old CA, then CertStore
//!         from the new CA (renewal and the bundle repair follow it); caBundle = new CA
//!         alone once the old one expires
//! ```

pub mod registration;
pub mod review;
mod rotation;
pub mod server;
pub mod settings;
pub mod tls;

use std::{net::IpAddr, sync::Arc, time::Duration};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, reflector, watcher},
};
use tokio::net::TcpListener;

use crate::{ca, index::shared::SharedIndex, inject::InjectConfig};
pub use registration::{FailurePolicy, Registration, Target};
pub use server::{CaChange, Handler, NamespaceLabels, WebhookMetrics};
pub use tls::CertStore;

/// Everything the webhook needs to run.
#[derive(Clone, Debug)]
pub struct WebhookSettings {
    /// What to inject.
    pub inject: InjectConfig,
    /// How the API server is told about the webhook.
    pub registration: Registration,
    /// Namespace of the CA Secret.
    pub ca_namespace: String,
    /// Name of the CA Secret.
    pub ca_secret: String,
    /// DNS names in the serving certificate (the Service's names).
    pub dns_names: Vec<String>,
    /// IP addresses in the serving certificate.
    pub ips: Vec<IpAddr>,
    /// Lifetime of a serving certificate; it is renewed at two thirds of it.
    pub cert_lifetime: Duration,
    /// How often pods are scanned for ones that opted in but run unmeshed.
    pub audit_interval: Duration,
}

/// The shortest serving-certificate lifetime the operator accepts
/// (`--webhook-cert-lifetime`): the certificate is renewed at two thirds of it, so a
/// shorter one would have the webhook issue keys almost without pause.
pub const MIN_CERT_LIFETIME: Duration = Duration::from_secs(60);

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The CA could not be loaded or used.
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    /// The serving certificate was unusable.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Registering the webhook with the API server failed.
    #[error("registering the webhook: {0}")]
    Register(#[source] kube::Error),
}

/// Loads the CA, issues a serving certificate, registers the webhook and serves it on
/// `listener` until `shutdown`, renewing the certificate before it expires and following
/// the CA Secret when it changes. Namespace labels come from a watch of its own.
pub async fn run(
    client: Client,
    settings: WebhookSettings,
    listener: TcpListener,
    metrics: WebhookMetrics,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), WebhookError> {
    run_with(client, settings, None, listener, metrics, shutdown).await
}

/// As [`run`]; with `index` (the operator's, watching every namespace), namespace labels
/// are read from it instead of a second Namespace watch. A start-up that fails is returned
/// as the error ([`run_retrying`] retries it instead).
pub async fn run_with(
    client: Client,
    settings: WebhookSettings,
    index: Option<Arc<SharedIndex>>,
    listener: TcpListener,
    metrics: WebhookMetrics,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), WebhookError> {
    let (ca, certs) = start(&client, &settings).await?;
    serve_started(
        client, settings, index, listener, metrics, ca, certs, shutdown,
    )
    .await;
    Ok(())
}

/// The wait before start-up try `attempt + 1` after `attempt` failed ones: 1 s, doubling,
/// at most [`START_BACKOFF_MAX`].
pub fn start_backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.min(5)).min(START_BACKOFF_MAX)
}

/// The longest wait between two start-up tries of [`run_retrying`].
pub const START_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// As [`run_with`], for the operator: a start-up that fails (the CA Secret cannot be read
/// or is malformed, the registration is refused, the API server blips) is logged and
/// retried after [`start_backoff`], keeping `listener`, until it succeeds or `shutdown`
/// completes. `gate` is opened once the webhook serves, and dropped (pending again) when
/// it stops, so the operator's `/readyz` says whether the webhook is serving.
#[allow(clippy::too_many_arguments)]
pub async fn run_retrying(
    client: Client,
    settings: WebhookSettings,
    index: Option<Arc<SharedIndex>>,
    listener: TcpListener,
    metrics: WebhookMetrics,
    gate: crate::readiness::Gate,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown.fuse());
    let mut attempt = 0u32;
    let (ca, certs) = loop {
        let result = tokio::select! {
            () = &mut shutdown => return,
            r = start(&client, &settings) => r,
        };
        match result {
            Ok(started) => break started,
            Err(error) => {
                attempt = attempt.saturating_add(1);
                let retry_in = start_backoff(attempt - 1);
                tracing::error!(%error, attempt, ?retry_in, "the injection webhook could not start");
                tokio::select! {
                    () = &mut shutdown => return,
                    () = tokio::time::sleep(retry_in) => {}
                }
            }
        }
    };
    if attempt > 0 {
        tracing::info!(attempt = attempt + 1, "the injection webhook started");
    }
    gate.open();
    serve_started(
        client, settings, index, listener, metrics, ca, certs, shutdown,
    )
    .await;
    drop(gate);
}

/// Loads the CA, issues a serving certificate and registers the webhook.
async fn start(
    client: &Client,
    settings: &WebhookSettings,
) -> Result<(ca::Ca, CertStore), WebhookError> {
    let ca =
        ca::load_or_create(client.clone(), &settings.ca_namespace, &settings.ca_secret).await?;
    let leaf = ca.issue_serving(&settings.dns_names, &settings.ips, settings.cert_lifetime)?;
    let certs = CertStore::new(&leaf.cert_pem, &leaf.key_pem)?;
    settings
        .registration
        .apply(client.clone(), ca.cert_pem())
        .await
        .map_err(WebhookError::Register)?;
    Ok((ca, certs))
}

/// Serves a started webhook until `shutdown` (or one of its parts ends).
#[allow(clippy::too_many_arguments)]
async fn serve_started(
    client: Client,
    settings: WebhookSettings,
    index: Option<Arc<SharedIndex>>,
    listener: TcpListener,
    metrics: WebhookMetrics,
    ca: ca::Ca,
    certs: CertStore,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (labels, namespaces) = match index {
        Some(index) => (
            NamespaceLabels::Index(index),
            futures::future::pending().boxed(),
        ),
        None => {
            let (store, writer) = reflector::store();
            let watch = watcher::watcher(
                Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff()
            .reflect(writer)
            .for_each(|event| async move {
                if let Err(error) = event {
                    tracing::warn!(%error, "namespace watch");
                }
            });
            (NamespaceLabels::Store(store), watch.boxed())
        }
    };
    let (trust, trusted) = tokio::sync::watch::channel(rotation::Trust::new(ca));
    let registered = keep_registered(client.clone(), settings.clone(), trusted.clone());
    let renew = renew_forever(trusted, certs.clone(), settings.clone());
    let rotate = rotation::watch_ca(
        client.clone(),
        settings.clone(),
        trust,
        certs.clone(),
        metrics.clone(),
    );
    let audit = audit_forever(client.clone(), settings.clone(), metrics.clone());
    let connections = metrics.connections.clone();
    let handler = Arc::new(Handler::new(
        settings.inject.clone(),
        labels,
        client,
        metrics,
    ));
    tracing::info!(addr = ?listener.local_addr().ok(), "webhook serving");
    tokio::select! {
        _ = server::serve(listener, certs, handler, connections, shutdown) => {}
        _ = namespaces => tracing::warn!("namespace watch ended"),
        _ = renew => {}
        _ = audit => {}
        _ = registered => {}
        _ = rotate => tracing::warn!("the CA Secret's watch ended"),
    }
}

/// The least time between two repairs of the registration, so that another controller
/// that keeps rewriting it is not fought in a tight loop.
const REPAIR_INTERVAL: Duration = Duration::from_secs(5);

/// Watches the MutatingWebhookConfiguration and writes the CA bundle back into its
/// webhooks when another client removed it: as Istio's webhook patcher does, since a GitOps
/// sync of the chart (whose manifest has no bundle) would otherwise leave the API server
/// unable to call the webhook until the operator restarts. A deleted configuration is left
/// deleted, and a bundle of another CA (another replica's, or one a rotation wrote with
/// two CAs) is left as it is; the bundle restored is the current one of `trust` (a
/// rotation checks the bundle again once it publishes a new one, as this may have
/// restored the one before).
async fn keep_registered(
    client: Client,
    settings: WebhookSettings,
    trust: tokio::sync::watch::Receiver<rotation::Trust>,
) {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let registration = &settings.registration;
    let api = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let config = watcher::Config::default().fields(&format!("metadata.name={}", registration.name));
    let mut events = std::pin::pin!(watcher::watcher(api, config).default_backoff());
    let mut last_repair: Option<tokio::time::Instant> = None;
    while let Some(event) = events.next().await {
        let live = match event {
            Ok(watcher::Event::Apply(live) | watcher::Event::InitApply(live)) => live,
            Ok(_) => continue,
            Err(error) => {
                tracing::warn!(%error, "watching the webhook's registration");
                continue;
            }
        };
        let missing = registration.missing_bundles(&live);
        if missing.is_empty() || live.metadata.uid.is_none() {
            continue;
        }
        if let Some(at) = last_repair {
            tokio::time::sleep_until(at + REPAIR_INTERVAL).await;
        }
        last_repair = Some(tokio::time::Instant::now());
        tracing::warn!(name = %registration.name, webhooks = missing.len(), "the webhook's registration lost its CA bundle (rewritten by another client); restoring it");
        let ca_bundle = trust.borrow().bundle(std::time::SystemTime::now());
        match registration
            .restore_bundles(client.clone(), &ca_bundle, &live, &missing)
            .await
        {
            Ok(()) => {}
            // Deleted, or changed since (its own event follows): nothing to restore here.
            Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409 | 422) => {
                tracing::debug!(error = %e, "the registration changed before its bundle was restored");
            }
            Err(error) => tracing::warn!(%error, "restoring the webhook's registration"),
        }
    }
}

/// When to renew a serving certificate of `lifetime` issued now by a CA that expires at
/// `ca_not_after`: at two thirds of what the certificate really lasts, which the CA's
/// expiry may cut short.
fn renewal_wait(lifetime: Duration, ca_not_after: std::time::SystemTime) -> Duration {
    let left = ca_not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    lifetime.min(left) * 2 / 3
}

/// Re-issues the serving certificate at two thirds of its lifetime, forever, from the CA
/// `trust` holds now. A failed renewal is retried every few seconds while the old
/// certificate is still valid; a rotation (which issues a certificate of its own) starts
/// the count again.
async fn renew_forever(
    mut trust: tokio::sync::watch::Receiver<rotation::Trust>,
    certs: CertStore,
    settings: WebhookSettings,
) {
    let ca_not_after =
        |t: &tokio::sync::watch::Receiver<rotation::Trust>| t.borrow().ca.not_after();
    let mut wait = renewal_wait(settings.cert_lifetime, ca_not_after(&trust));
    let mut rotations = true;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            changed = trust.changed(), if rotations => {
                match changed {
                    Ok(()) => wait = renewal_wait(settings.cert_lifetime, ca_not_after(&trust)),
                    // No more rotations: renew on the timer alone.
                    Err(_) => rotations = false,
                }
                continue;
            }
        }
        let ca = trust.borrow().ca.clone();
        match ca
            .issue_serving(&settings.dns_names, &settings.ips, settings.cert_lifetime)
            .map_err(WebhookError::from)
            .and_then(|leaf| Ok(certs.replace(&leaf.cert_pem, &leaf.key_pem)?))
        {
            Ok(()) => {
                tracing::info!("renewed the webhook's serving certificate");
                wait = renewal_wait(settings.cert_lifetime, ca.not_after());
            }
            Err(error) => {
                tracing::warn!(%error, "renewing the webhook's serving certificate");
                // Never a busy loop, whatever lifetime a caller gave.
                wait = Duration::from_secs(5)
                    .min(settings.cert_lifetime / 10)
                    .max(Duration::from_millis(100));
            }
        }
    }
}

/// Counts, every `audit_interval`, the pods that opted in but run without the proxy, into
/// the `weft_unmeshed_pods` gauge, and logs each newly found one once; logs once, too, each
/// pod with `weft.dev/` annotations Weft does not read (the webhook's warning about one a
/// controller created reached only the controller).
async fn audit_forever(client: Client, settings: WebhookSettings, metrics: WebhookMetrics) {
    let mut reported = std::collections::BTreeSet::new();
    let mut misannotated_reported = std::collections::BTreeSet::new();
    // The registration's own selectors, scope included: a pod it never sends is not missed.
    let entries = settings.registration.entries();
    loop {
        match crate::inject::audit::scan(&client, &settings.inject, &entries).await {
            Ok(scan) => {
                let found = scan.unmeshed;
                metrics
                    .unmeshed
                    .set(i64::try_from(found.len()).unwrap_or(i64::MAX));
                let unmeshed = found
                    .iter()
                    .map(|u| (format!("{}/{}", u.namespace, u.name), ()));
                for (pod, ()) in newly_found(&mut reported, unmeshed) {
                    tracing::warn!(%pod, "pod opted in to the mesh but runs without the proxy; restart it");
                }
                let misannotated = scan
                    .misannotated
                    .into_iter()
                    .map(|m| (format!("{}/{}", m.namespace, m.name), m));
                for (pod, m) in newly_found(&mut misannotated_reported, misannotated) {
                    for unknown in m.unknown {
                        tracing::warn!(%pod, "{unknown}");
                    }
                    if let Some(problem) = m.inject_value {
                        tracing::warn!(%pod, "{problem}");
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "scanning pods for unmeshed ones"),
        }
        tokio::time::sleep(settings.audit_interval).await;
    }
}

/// The pods of `found` (by `namespace/name`, with what to say of each) not in `reported`,
/// which then holds exactly those of `found`: each pod is reported once while it stays.
fn newly_found<T>(
    reported: &mut std::collections::BTreeSet<String>,
    found: impl IntoIterator<Item = (String, T)>,
) -> Vec<(String, T)> {
    let mut now = std::collections::BTreeSet::new();
    let mut new = Vec::new();
    for (pod, what) in found {
        if !reported.contains(&pod) {
            new.push((pod.clone(), what));
        }
        now.insert(pod);
    }
    *reported = now;
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_is_reported_once_while_it_stays_and_again_after_it_left() {
        let mut reported = std::collections::BTreeSet::new();
        let pods = |names: &[&str]| {
            names
                .iter()
                .map(|n| (n.to_string(), ()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            newly_found(&mut reported, pods(&["a/x", "a/y"])),
            pods(&["a/x", "a/y"])
        );
        assert_eq!(newly_found(&mut reported, pods(&["a/y"])), pods(&[]));
        assert_eq!(
            newly_found(&mut reported, pods(&["a/x", "a/y"])),
            pods(&["a/x"])
        );
    }

    #[test]
    fn a_certificate_the_cas_expiry_cuts_short_is_renewed_by_its_real_end() {
        let hour = Duration::from_secs(3600);
        let now = std::time::SystemTime::now();
        assert_eq!(renewal_wait(3 * hour, now + 365 * 24 * hour), 2 * hour);
        let cut = renewal_wait(3 * hour, now + 30 * 60 * Duration::from_secs(1));
        assert!(cut <= 20 * Duration::from_secs(60) && cut > 19 * Duration::from_secs(60));
        assert_eq!(renewal_wait(3 * hour, now - hour), Duration::ZERO);
    }

    #[test]
    fn start_up_tries_back_off_from_one_second_to_at_most_thirty() {
        let waits: Vec<u64> = (0..8).map(|a| start_backoff(a).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(start_backoff(u32::MAX), START_BACKOFF_MAX);
    }
}
