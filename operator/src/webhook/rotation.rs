//! Re-reads the webhook's CA Secret while the webhook serves, so that a CA regenerated
//! (the Secret deleted) or replaced by a user reaches every running replica, not only the
//! ones started after: otherwise the registration's `caBundle` would match some replicas
//! and the API server's calls to the others would fail TLS until they restart.
//!
//! ```text
//!  watch of the Secret (by name) ─▶ ca::from_secret ─▶ step(current, observed)
//!     Keep     the same CA (or a relist): nothing
//!     Refuse   garbage, expired, key not the certificate's: warn once, keep serving;
//!              a CA not valid yet on this clock is read again once it is
//!     Create   deleted: ca::create (a replica that loses the race reads the winner's)
//!     Rotate   another CA: caBundle := new + old (JSON patch; a deleted registration
//!              stays deleted) ─▶ serving certificate re-issued from the new CA
//!              ─▶ Trust sent to the renewal (follows the new CA) and the bundle repair
//!              ─▶ caBundle checked again (the repair may have written the old Trust's)
//!  timer at the old CA's expiry ─▶ caBundle := new alone
//! ```
//!
//! Each replica counts what it did in `weft_webhook_ca_changes_total{result}`: `refused`
//! (once per version of the Secret), and, once the webhook serves from the new CA,
//! `generated` (the CA a Create put into the Secret or found there, also when the rotation
//! to it failed once and succeeded from a later read) or `followed` (any other CA).
//!
//! The bundle keeps the CA served before the rotation beside the new one until that CA
//! expires, when every replica that rotated rewrites it without (each computes the same
//! bundle, so they agree), or until a replica restarts (it then applies its own CA alone):
//! a replica that has not yet seen the change, or a connection the API server opened
//! before it, still verifies. Only the one previous CA is kept.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio::{sync::watch, time::Instant};

use super::{
    CaChange, CertStore, START_BACKOFF_MAX, WebhookMetrics, WebhookSettings, start_backoff,
};
use crate::ca::{self, Ca, CaError};

/// Between writing a new bundle and serving from the new CA: the API server reads its
/// webhook configurations through an informer, so it trusts the new CA a moment after the
/// write returns; serving from it before then would fail its calls to this replica.
const BUNDLE_SETTLE: Duration = Duration::from_secs(1);

/// Past a certificate's edge of validity before acting on it: the timer and the wall clock
/// differ, and tokio rounds a deadline up only to the millisecond.
const CLOCK_MARGIN: Duration = Duration::from_secs(1);

/// The CAs the webhook trusts: the one it serves from, and the one it served from before
/// the last rotation.
#[derive(Clone)]
pub(super) struct Trust {
    /// Signs the serving certificate, now and at each renewal.
    pub(super) ca: Arc<Ca>,
    /// The CA before the last rotation, kept in the bundle for replicas still serving from
    /// it.
    pub(super) previous: Option<Arc<Ca>>,
}

impl Trust {
    /// Trust in `ca` alone, as at start.
    pub(super) fn new(ca: Ca) -> Self {
        Trust {
            ca: Arc::new(ca),
            previous: None,
        }
    }

    /// The `caBundle` (PEM): the current CA first, then the previous one unless it has
    /// expired by `now` (nothing it signed verifies any more) or is the same certificate.
    pub(super) fn bundle(&self, now: SystemTime) -> String {
        let mut bundle = pem_line(self.ca.cert_pem());
        if let Some(old) = &self.previous
            && self.previous_left(now).is_some()
        {
            bundle.push_str(&pem_line(old.cert_pem()));
        }
        bundle
    }

    /// How long from `now` the previous CA stays in [`Trust::bundle`]: `None` when it is
    /// not there (none kept, the same certificate as the current, or expired).
    fn previous_left(&self, now: SystemTime) -> Option<Duration> {
        let old = self.previous.as_ref()?;
        if old.same_certificate(&self.ca) {
            return None;
        }
        old.not_after()
            .duration_since(now)
            .ok()
            .filter(|left| !left.is_zero())
    }

    /// The trust after rotating to `next`: the CA served until now becomes the previous.
    fn rotated(&self, next: impl Into<Arc<Ca>>) -> Self {
        Trust {
            ca: next.into(),
            previous: Some(self.ca.clone()),
        }
    }
}

/// `pem` ending with one newline, so that two concatenate into a valid bundle.
fn pem_line(pem: &str) -> String {
    let mut s = pem.trim_end().to_owned();
    s.push('\n');
    s
}

/// What the Secret was seen to hold.
enum Observed {
    /// No Secret by that name.
    Absent,
    /// A Secret, read by [`ca::from_secret`] (boxed: a CA is large beside an absence).
    Read(Box<Result<Ca, CaError>>),
}

/// What to do about what was observed.
enum Step {
    /// The CA served already: nothing.
    Keep,
    /// Not a usable CA: say why, and keep serving from the current one.
    Refuse(CaError),
    /// Deleted: generate a new one, as at start.
    Create,
    /// Another CA: trust it beside the current one, then serve from it.
    Rotate(Box<Ca>),
}

/// The step for `observed` while serving from `current`.
fn step(current: &Ca, observed: Observed) -> Step {
    match observed {
        Observed::Absent => Step::Create,
        Observed::Read(read) => match *read {
            Err(error) => Step::Refuse(error),
            Ok(ca) if ca.same_certificate(current) => Step::Keep,
            Ok(ca) => Step::Rotate(Box::new(ca)),
        },
    }
}

/// Why a rotation did not complete; it is tried again.
#[derive(Debug, thiserror::Error)]
enum RotateError {
    /// The new CA could not issue, or a new Secret could not be created.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The issued certificate was unusable.
    #[error(transparent)]
    Tls(#[from] super::tls::TlsError),
    /// The registration's bundle could not be written.
    #[error("writing the webhook's caBundle: {0}")]
    Bundle(#[source] kube::Error),
}

/// When to read the Secret again after refusing what it holds, measured from `now`: a CA
/// refused only for starting later (cert-manager does not backdate, and this node's clock
/// may lag the issuer's by a second) becomes usable without the Secret changing, so it is
/// read again once valid, at most [`START_BACKOFF_MAX`] apart as start-up tries. Anything
/// else waits for the Secret to change.
fn refused_retry(error: &CaError, now: SystemTime) -> Option<Duration> {
    match error {
        CaError::OutOfValidity {
            not_before,
            not_after,
            ..
        } if now < *not_after && not_before < not_after => Some(
            not_before
                .duration_since(now)
                .unwrap_or_default()
                .saturating_add(CLOCK_MARGIN)
                .min(START_BACKOFF_MAX),
        ),
        _ => None,
    }
}

/// When to check the bundle again after it was made to match `trust` at `now`: once the
/// previous CA it holds has expired, so that it is rewritten without it (nothing else
/// writes the bundle while the CA stays the same); never when it holds no previous CA.
fn recheck_after(trust: &Trust, now: SystemTime) -> Option<Duration> {
    trust
        .previous_left(now)
        .map(|left| left.saturating_add(CLOCK_MARGIN))
}

/// Watches Secret `settings.ca_namespace/ca_secret` and acts on each change as the module
/// docs say, forever. `trust` holds the current CAs; `certs` is what the webhook serves;
/// each rotation done and each version refused is counted in `metrics`.
pub(super) async fn watch_ca(
    client: Client,
    settings: WebhookSettings,
    trust: watch::Sender<Trust>,
    certs: CertStore,
    metrics: WebhookMetrics,
) {
    let (namespace, name) = (settings.ca_namespace.as_str(), settings.ca_secret.as_str());
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = std::pin::pin!(watcher::watcher(api.clone(), config).default_backoff());
    // Whether the current listing found the Secret: a relist after a dropped watch reports
    // a deletion it missed only as an absence.
    let mut listed = false;
    // The resource version last refused, so that a relist does not repeat the warning.
    let mut refused: Option<String> = None;
    // A step that failed (the API server, the registration) is retried from a fresh read;
    // so is a CA refused for not being valid yet.
    let mut retry: Option<(Instant, u32)> = None;
    // When to make the bundle match `trust` again (right after a rotation, then when the
    // previous CA expires), and the failed writes since the last one that succeeded.
    let mut recheck: Option<(Instant, u32)> = None;
    // The CA a Create put into the Secret (or found there, created by another replica),
    // until the webhook serves from it: a rotation to it that failed is retried from a
    // fresh read, which finds it as another CA (Rotate), and is still counted `generated`.
    let mut created: Option<Arc<Ca>> = None;
    loop {
        let observed = tokio::select! {
            event = events.next() => match event {
                Some(Ok(watcher::Event::Init)) => { listed = false; continue }
                Some(Ok(watcher::Event::InitApply(s))) => { listed = true; Some(s) }
                Some(Ok(watcher::Event::Apply(s))) => Some(s),
                Some(Ok(watcher::Event::InitDone)) if listed => continue,
                Some(Ok(watcher::Event::InitDone | watcher::Event::Delete(_))) => None,
                Some(Err(error)) => {
                    tracing::warn!(%error, %namespace, secret = %name, "watching the webhook's CA Secret");
                    continue;
                }
                None => return,
            },
            () = until(recheck.map(|(at, _)| at)) => {
                let failures = recheck.map_or(0, |(_, n)| n);
                recheck = match check_bundle(&client, &settings, &trust).await {
                    // A CA may claim to last millennia: past what an Instant holds, never.
                    Ok(next) => next.and_then(|wait| Instant::now().checked_add(wait)).map(|at| (at, 0)),
                    Err(error) => {
                        let wait = start_backoff(failures);
                        tracing::warn!(%error, webhook = %settings.registration.name, retry_in = ?wait, "writing the webhook's caBundle");
                        Some((Instant::now() + wait, failures.saturating_add(1)))
                    }
                };
                continue;
            }
            () = until(retry.map(|(at, _)| at)) => match api.get_opt(name).await {
                Ok(s) => s,
                Err(error) => {
                    tracing::warn!(%error, %namespace, secret = %name, "reading the webhook's CA Secret");
                    retry = retry.map(|(_, n)| (Instant::now() + start_backoff(n), n.saturating_add(1)));
                    continue;
                }
            },
        };
        let version = observed
            .as_ref()
            .and_then(|s| s.metadata.resource_version.clone());
        let current = trust.borrow().ca.clone();
        let outcome = match step(&current, read(observed.as_ref(), name)) {
            Step::Keep => {
                // The Secret holds the CA served again: no creation is pending any more.
                created = None;
                Ok(Followed::Nothing)
            }
            Step::Refuse(error) => {
                if refused != version {
                    tracing::warn!(%error, %namespace, secret = %name, "the webhook's CA Secret holds no usable CA; serving from the current CA");
                    metrics.ca_changed(CaChange::Refused);
                    refused = version;
                }
                Ok(refused_retry(&error, SystemTime::now())
                    .map_or(Followed::Nothing, Followed::ReadAgain))
            }
            Step::Create => {
                tracing::warn!(%namespace, secret = %name, "the webhook's CA Secret is gone (deleted); generating a new CA");
                match ca::create(client.clone(), namespace, name).await {
                    Ok(ca) if ca.same_certificate(&current) => {
                        // Already served: nothing is pending.
                        created = None;
                        Ok(Followed::Nothing)
                    }
                    Ok(ca) => {
                        let ca = Arc::new(ca);
                        created = Some(ca.clone());
                        rotate(&client, &settings, &trust, &certs, ca).await
                    }
                    Err(error) => Err(RotateError::Ca(error)),
                }
            }
            Step::Rotate(ca) => rotate(&client, &settings, &trust, &certs, Arc::new(*ca)).await,
        };
        if let Ok(Followed::Rotated) = &outcome {
            let served = trust.borrow().ca.clone();
            metrics.ca_changed(change_counted(created.take().as_deref(), &served));
        }
        retry = match outcome {
            Ok(Followed::Nothing) => None,
            Ok(Followed::ReadAgain(wait)) => Some((Instant::now() + wait, 0)),
            Ok(Followed::Rotated) => {
                // While the rotation waited for the bundle to settle, the repair of an
                // emptied bundle wrote the Trust of then (the old CA alone), and this
                // replica now serves from the new one: check the bundle again at once.
                recheck = Some((Instant::now(), 0));
                None
            }
            Err(error) => {
                let n = retry.map_or(0, |(_, n)| n);
                let wait = start_backoff(n);
                tracing::warn!(%error, %namespace, secret = %name, retry_in = ?wait, "could not follow the webhook's CA Secret; still serving from the current CA");
                Some((Instant::now() + wait, n.saturating_add(1)))
            }
        };
    }
}

/// How a rotation that ended serving from `served` is counted: `generated` when it is the
/// CA the last Create put into (or found in) the Secret, whichever read of the Secret the
/// rotation that succeeded started from; `followed` otherwise.
fn change_counted(created: Option<&Ca>, served: &Ca) -> CaChange {
    match created {
        Some(created) if created.same_certificate(served) => CaChange::Generated,
        _ => CaChange::Followed,
    }
}

/// What following the Secret did, when it did not fail.
enum Followed {
    /// Nothing to do, or nothing more until the Secret changes.
    Nothing,
    /// Refused a CA that becomes usable by itself: read the Secret again after this.
    ReadAgain(Duration),
    /// Serving from a new CA.
    Rotated,
}

/// Writes the bundle `trust` holds now into the registration if it differs, and returns
/// when to do so again (see [`recheck_after`]).
async fn check_bundle(
    client: &Client,
    settings: &WebhookSettings,
    trust: &watch::Sender<Trust>,
) -> Result<Option<Duration>, kube::Error> {
    let now = SystemTime::now();
    // Cloned out: the channel's lock is not held across the write.
    let current = trust.borrow().clone();
    settings
        .registration
        .replace_bundles(client.clone(), &current.bundle(now))
        .await?;
    let next = recheck_after(&current, now);
    if let Some(old) = &current.previous
        && next.is_none()
        && old.not_after() <= now
    {
        tracing::info!(
            namespace = %settings.ca_namespace,
            secret = %settings.ca_secret,
            expired = %ca::rfc3339(old.not_after()),
            "the webhook's previous CA expired; caBundle holds the current CA alone"
        );
    }
    Ok(next)
}

/// Completes at `at`, or never.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What `secret` (named `name`) holds.
fn read(secret: Option<&Secret>, name: &str) -> Observed {
    match secret {
        None => Observed::Absent,
        Some(s) => Observed::Read(Box::new(ca::from_secret(s, name))),
    }
}

/// Moves the webhook to `next`: the bundle first trusts both CAs, then the serving
/// certificate comes from `next`. Nothing changes when `next` cannot issue.
async fn rotate(
    client: &Client,
    settings: &WebhookSettings,
    trust: &watch::Sender<Trust>,
    certs: &CertStore,
    next: Arc<Ca>,
) -> Result<Followed, RotateError> {
    let leaf = next.issue_serving(&settings.dns_names, &settings.ips, settings.cert_lifetime)?;
    let rotated = trust.borrow().rotated(next);
    let bundle = rotated.bundle(SystemTime::now());
    settings
        .registration
        .replace_bundles(client.clone(), &bundle)
        .await
        .map_err(RotateError::Bundle)?;
    tokio::time::sleep(BUNDLE_SETTLE).await;
    certs.replace(&leaf.cert_pem, &leaf.key_pem)?;
    let previous_expires = rotated
        .previous
        .as_ref()
        .map(|p| ca::rfc3339(p.not_after()));
    trust.send_replace(rotated);
    tracing::info!(
        namespace = %settings.ca_namespace,
        secret = %settings.ca_secret,
        previous_trusted_until = ?previous_expires,
        "the webhook's CA changed; serving from the new CA, caBundle trusts both"
    );
    Ok(Followed::Rotated)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    use crate::ca::tests::ca_between;

    fn generated() -> Ca {
        Ca::generate("test").unwrap().0
    }

    /// The same CA as `ca`, loaded again (as the watch reads it back from the Secret).
    fn again(ca: &Ca, key_pem: &str) -> Ca {
        Ca::from_pem(ca.cert_pem(), key_pem).unwrap()
    }

    #[test]
    fn the_same_ca_is_kept_another_rotated_to_and_a_deleted_one_recreated() {
        let (current, key) = Ca::generate("current").unwrap();
        assert!(matches!(
            step(
                &current,
                Observed::Read(Box::new(Ok(again(&current, &key))))
            ),
            Step::Keep
        ));
        assert!(matches!(
            step(&current, Observed::Read(Box::new(Ok(generated())))),
            Step::Rotate(_)
        ));
        assert!(matches!(step(&current, Observed::Absent), Step::Create));
        let refused = CaError::Malformed {
            name: "weft-ca".to_owned(),
            reason: ca::Unusable::Certificate,
        };
        assert!(matches!(
            step(&current, Observed::Read(Box::new(Err(refused)))),
            Step::Refuse(_)
        ));
    }

    #[test]
    fn after_a_rotation_the_bundle_trusts_the_new_ca_first_and_the_old_one() {
        let start = Trust::new(generated());
        let now = SystemTime::now();
        assert_eq!(start.bundle(now), pem_line(start.ca.cert_pem()));
        let next = generated();
        let next_pem = next.cert_pem().to_owned();
        let rotated = start.rotated(next);
        assert_eq!(
            rotated.bundle(now),
            format!("{}{}", pem_line(&next_pem), pem_line(start.ca.cert_pem()))
        );
        // Two certificates that both parse: a valid bundle.
        let parsed = rustls_pemfile::certs(&mut rotated.bundle(now).as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(parsed.len(), 2);
        // Only the one previous CA: a second rotation drops the first.
        let third = rotated.rotated(generated());
        let bundle = third.bundle(now);
        assert!(bundle.contains(next_pem.trim_end()));
        assert!(!bundle.contains(start.ca.cert_pem().trim_end()));
    }

    #[test]
    fn an_expired_previous_ca_leaves_the_bundle() {
        let hour = time::Duration::hours(1);
        let old = Trust::new(ca_between(-hour, hour));
        let rotated = old.rotated(generated());
        let now = SystemTime::now();
        assert!(rotated.bundle(now).contains(old.ca.cert_pem().trim_end()));
        let later = now + Duration::from_secs(2 * 3600);
        assert_eq!(rotated.bundle(later), pem_line(rotated.ca.cert_pem()));
    }

    /// A CA refused only for starting a moment later on this clock is read again once it
    /// has started (no change of the Secret would wake the watch), at most 30 s apart as at
    /// start-up; an expired or malformed one waits for the Secret to change.
    #[test]
    fn a_ca_not_valid_yet_is_read_again_once_it_is_and_nothing_else_is() {
        let now = SystemTime::now();
        let year = Duration::from_secs(365 * 86_400);
        let out_of_validity = |not_before, not_after| CaError::OutOfValidity {
            name: "weft-ca".to_owned(),
            not_before,
            not_after,
        };
        let early = out_of_validity(now + Duration::from_millis(500), now + year);
        assert_eq!(
            refused_retry(&early, now),
            Some(Duration::from_millis(1500))
        );
        // Valid since it was refused: read again after the margin alone.
        let started = out_of_validity(now - Duration::from_secs(1), now + year);
        assert_eq!(refused_retry(&started, now), Some(CLOCK_MARGIN));
        let next_year = out_of_validity(now + year, now + 2 * year);
        assert_eq!(refused_retry(&next_year, now), Some(START_BACKOFF_MAX));
        let expired = out_of_validity(now - year, now - Duration::from_secs(1));
        assert_eq!(refused_retry(&expired, now), None);
        let inverted = out_of_validity(now + year, now + Duration::from_secs(1));
        assert_eq!(refused_retry(&inverted, now), None);
        let malformed = CaError::Malformed {
            name: "weft-ca".to_owned(),
            reason: ca::Unusable::NotCa,
        };
        assert_eq!(refused_retry(&malformed, now), None);
    }

    /// After a rotation the bundle is checked again when the previous CA expires, so that
    /// it leaves the bundle then; with no previous CA in the bundle, never.
    #[test]
    fn the_bundle_is_checked_again_when_the_previous_ca_expires() {
        let hour = time::Duration::hours(1);
        let start = Trust::new(ca_between(-hour, hour));
        let now = SystemTime::now();
        assert_eq!(recheck_after(&start, now), None);
        let rotated = start.rotated(generated());
        let wait = recheck_after(&rotated, now).unwrap();
        let expiry = start.ca.not_after().duration_since(now).unwrap();
        assert_eq!(wait, expiry + CLOCK_MARGIN);
        // At that time the bundle no longer holds it, and nothing more is due.
        let then = now + wait;
        assert_eq!(rotated.bundle(then), pem_line(rotated.ca.cert_pem()));
        assert_eq!(recheck_after(&rotated, then), None);
        let (ca, key) = Ca::generate("same").unwrap();
        let same = Trust::new(again(&ca, &key)).rotated(ca);
        assert_eq!(recheck_after(&same, now), None);
    }

    /// A rotation to the CA a Create wrote counts `generated` whichever read it succeeded
    /// from (a failed first try is retried from the Secret, read as another CA); to any
    /// other CA, `followed`.
    #[test]
    fn a_rotation_to_the_created_ca_counts_generated_and_any_other_followed() {
        let (created, key) = Ca::generate("created").unwrap();
        let read_back = again(&created, &key);
        assert!(matches!(
            change_counted(Some(&created), &read_back),
            CaChange::Generated
        ));
        assert!(matches!(
            change_counted(Some(&created), &generated()),
            CaChange::Followed
        ));
        assert!(matches!(
            change_counted(None, &read_back),
            CaChange::Followed
        ));
    }

    #[test]
    fn rotating_to_the_same_certificate_lists_it_once() {
        let (ca, key) = Ca::generate("same").unwrap();
        let trust = Trust::new(again(&ca, &key));
        let rotated = trust.rotated(ca);
        assert_eq!(
            rotated.bundle(SystemTime::now()),
            pem_line(rotated.ca.cert_pem())
        );
    }
}
