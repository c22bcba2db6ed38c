//! Leadership for status writes: a `coordination.k8s.io/v1` Lease. Every replica serves
//! streams; only the holder writes status and Events.
//!
//! This follows client-go's leader election, so that neither clock skew nor a hung API
//! call can make two replicas write status at once:
//!
//! - **Observed time, not timestamps.** A candidate never compares the holder's
//!   `renewTime` with its own wall clock. It remembers when it last saw the Lease record
//!   change, on its own monotonic clock, and takes the Lease only once the record has not
//!   changed for `leaseDurationSeconds` from then ([`Observer`]).
//! - **Renew deadline.** The holder renews every `retry_period`; if no renewal has
//!   succeeded for `renew_deadline` (shorter than the duration), counted from when the
//!   last successful renewal was *sent*, it steps down (stops writing status) at once,
//!   even while a request still hangs.
//!
//! ```text
//! holder:     renew sent ──ok── … ──────────── t0 + renew_deadline: steps down
//! candidate:        sees the record change ── … ── + lease_duration: may take it
//! ```
//!
//! The candidate sees the last renewal only after the holder sent it, and
//! `renew_deadline < lease_duration`, so the holder has stepped down before the candidate
//! may take over. Writes use the Lease's `resourceVersion`, so two candidates never both
//! win.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

/// Where the Lease lives, who we are, and the timing of the election.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a Lease holds without renewal, as candidates observe it (client-go: 15 s).
    pub duration: Duration,
    /// How long the holder keeps writing status without a successful renewal before it
    /// steps down; shorter than `duration` (client-go: 10 s).
    pub renew_deadline: Duration,
    /// How often the holder renews and candidates retry (client-go: 2 s).
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// A config with `duration` and client-go's proportions: renew deadline two thirds
    /// of it, retry period two fifteenths (15 s → 10 s and 2 s).
    pub fn new(namespace: String, name: String, identity: String, duration: Duration) -> Self {
        LeaseConfig {
            namespace,
            name,
            identity,
            duration,
            renew_deadline: duration * 2 / 3,
            retry_period: duration * 2 / 15,
        }
    }

    /// Why these timings cannot guarantee a single writer, if they cannot.
    pub fn validate(&self) -> Result<(), String> {
        // The Lease records whole seconds: a shorter or fractional duration would be
        // written as less than what this replica waits, and others would take over early.
        if self.duration.as_secs() == 0 || self.duration.subsec_nanos() != 0 {
            return Err(format!(
                "the lease duration ({:?}) must be a whole number of seconds, at least 1 s",
                self.duration
            ));
        }
        if self.retry_period.is_zero() {
            return Err("the retry period must be positive".into());
        }
        if self.renew_deadline <= self.retry_period {
            return Err(format!(
                "the renew deadline ({:?}) must be longer than the retry period ({:?})",
                self.renew_deadline, self.retry_period
            ));
        }
        if self.duration <= self.renew_deadline {
            return Err(format!(
                "the lease duration ({:?}) must be longer than the renew deadline ({:?})",
                self.duration, self.renew_deadline
            ));
        }
        Ok(())
    }
}

/// What a candidate knows of the Lease record: the last version it saw and when, on its
/// own monotonic clock.
#[derive(Debug, Default)]
pub struct Observer {
    last: Option<(LeaseSpec, Instant)>,
}

/// What to do with the Lease as it stands.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Write ourselves in as holder (renewal, free Lease, or expired holder).
    Hold {
        /// Another replica held it (the transition is counted).
        takeover: bool,
    },
    /// Another replica holds it, and it has not expired as far as we observed.
    Wait,
}

impl Observer {
    /// Notes the record as read at `now` and decides. `fallback` is the duration used when
    /// the record names none.
    pub fn decide(
        &mut self,
        spec: &LeaseSpec,
        identity: &str,
        now: Instant,
        fallback: Duration,
    ) -> Decision {
        let changed = self.last.as_ref().is_none_or(|(seen, _)| seen != spec);
        if changed {
            self.last = Some((spec.clone(), now));
        }
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        match holder {
            None => Decision::Hold { takeover: false },
            Some(h) if h == identity => Decision::Hold { takeover: false },
            Some(_) => {
                let duration = spec
                    .lease_duration_seconds
                    .and_then(|s| u64::try_from(s).ok())
                    .map_or(fallback, Duration::from_secs);
                let seen_at = self.last.as_ref().map_or(now, |(_, at)| *at);
                if now.saturating_duration_since(seen_at) >= duration {
                    Decision::Hold { takeover: true }
                } else {
                    Decision::Wait
                }
            }
        }
    }
}

/// Keeps trying to hold the Lease until `shutdown`; `leader` says whether we hold it.
pub async fn run(
    client: Client,
    config: LeaseConfig,
    leader: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let api = Api::<Lease>::namespaced(client, &config.namespace);
    let mut observer = Observer::default();
    // When the last successful renewal was sent, while we hold the Lease.
    let mut renewed_at: Option<Instant> = None;
    let set = |held: bool| {
        leader.send_if_modified(|l| {
            let changed = *l != held;
            if changed {
                tracing::info!(leader = held, lease = %config.name, "leadership changed");
            }
            *l = held;
            changed
        });
    };
    loop {
        let sent = Instant::now();
        // A holder's attempt may take until its renew deadline, when it must step down
        // whatever the request is doing; a candidate's as long as a renewal may.
        let deadline = match renewed_at {
            Some(at) => at + config.renew_deadline,
            None => sent + config.renew_deadline,
        };
        let attempt = tokio::select! {
            () = shutdown.cancelled() => break,
            r = tokio::time::timeout_at(deadline, try_hold(&api, &config, &mut observer)) => r,
        };
        match attempt {
            Ok(Ok(true)) => {
                renewed_at = Some(sent);
                set(true);
            }
            Ok(Ok(false)) => {
                renewed_at = None;
                set(false);
            }
            Ok(Err(error)) => tracing::warn!(%error, "lease update failed"),
            Err(_) => tracing::warn!("lease update timed out"),
        }
        if let Some(at) = renewed_at
            && Instant::now() >= at + config.renew_deadline
        {
            tracing::warn!(
                renew_deadline = ?config.renew_deadline,
                "could not renew the lease in time; stepping down"
            );
            renewed_at = None;
            set(false);
        }
        // Sleep one retry period, but wake at the renew deadline to step down on time.
        let wake = match renewed_at {
            Some(at) => (Instant::now() + config.retry_period).min(at + config.renew_deadline),
            None => Instant::now() + config.retry_period,
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep_until(wake) => {}
        }
        if let Some(at) = renewed_at
            && Instant::now() >= at + config.renew_deadline
        {
            tracing::warn!("renew deadline reached; stepping down");
            renewed_at = None;
            set(false);
        }
    }
    // Step down on shutdown so another replica takes over at once.
    let was_leader = *leader.borrow();
    leader.send_replace(false);
    if was_leader {
        let release = async {
            if let Ok(mut lease) = api.get(&config.name).await
                && let Some(spec) = lease.spec.as_mut()
                && spec.holder_identity.as_deref() == Some(config.identity.as_str())
            {
                spec.holder_identity = None;
                let _ = api
                    .replace(&config.name, &PostParams::default(), &lease)
                    .await;
            }
        };
        let _ = tokio::time::timeout(config.renew_deadline, release).await;
    }
}

async fn try_hold(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observer: &mut Observer,
) -> Result<bool, kube::Error> {
    // Only written into the record, never compared: `renewTime` is for humans and
    // other tools; leadership is decided by observed time.
    let now = Timestamp::now();
    let secs = i32::try_from(config.duration.as_secs()).unwrap_or(i32::MAX);
    let mine = LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(secs),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        ..LeaseSpec::default()
    };
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(mine),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let takeover = match observer.decide(&spec, &config.identity, Instant::now(), config.duration) {
        Decision::Wait => return Ok(false),
        Decision::Hold { takeover } => takeover,
    };
    let ours = spec.holder_identity.as_deref() == Some(config.identity.as_str());
    if takeover {
        tracing::info!(holder = ?spec.holder_identity, "lease not renewed for its duration; taking it");
    }
    lease.spec = Some(LeaseSpec {
        acquire_time: if ours {
            spec.acquire_time
        } else {
            mine.acquire_time
        },
        lease_transitions: Some(
            spec.lease_transitions
                .unwrap_or(0)
                .saturating_add(i32::from(!ours)),
        ),
        ..mine
    });
    match api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: &str, renew: &str) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(renew.parse().unwrap())),
            ..LeaseSpec::default()
        }
    }

    const D: Duration = Duration::from_secs(15);

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_renew_time_in_the_past_does_not_expire_a_lease_just_seen() {
        let mut observer = Observer::default();
        let t0 = Instant::now();
        // The holder's clock is a year behind ours: a wall-clock comparison would call
        // the Lease long expired.
        let spec = held_by("other", "2025-01-01T00:00:00Z");
        assert_eq!(observer.decide(&spec, "me", t0, D), Decision::Wait);
        assert_eq!(observer.decide(&spec, "me", t0 + D - MS, D), Decision::Wait);
        // The holder renews (with its skewed clock): the record changed, the wait restarts.
        let t1 = t0 + Duration::from_secs(10);
        let renewed = held_by("other", "2025-01-01T00:00:14Z");
        assert_eq!(observer.decide(&renewed, "me", t1, D), Decision::Wait);
        assert_eq!(
            observer.decide(&renewed, "me", t1 + D - MS, D),
            Decision::Wait
        );
        assert_eq!(
            observer.decide(&renewed, "me", t1 + D, D),
            Decision::Hold { takeover: true }
        );
    }

    #[test]
    fn a_renew_time_in_the_future_does_not_keep_a_dead_holder() {
        let mut observer = Observer::default();
        let t0 = Instant::now();
        // The holder's clock is a year ahead: a wall-clock comparison would never expire it.
        let spec = held_by("other", "2099-01-01T00:00:00Z");
        assert_eq!(observer.decide(&spec, "me", t0, D), Decision::Wait);
        assert_eq!(
            observer.decide(&spec, "me", t0 + D, D),
            Decision::Hold { takeover: true }
        );
    }

    #[test]
    fn our_own_or_a_released_lease_is_held_at_once() {
        let mut observer = Observer::default();
        let t0 = Instant::now();
        let ours = held_by("me", "2099-01-01T00:00:00Z");
        assert_eq!(
            observer.decide(&ours, "me", t0, D),
            Decision::Hold { takeover: false }
        );
        let released = LeaseSpec {
            holder_identity: None,
            ..held_by("x", "2025-01-01T00:00:00Z")
        };
        assert_eq!(
            observer.decide(&released, "me", t0, D),
            Decision::Hold { takeover: false }
        );
    }

    #[test]
    fn the_default_timings_are_client_gos_and_bad_ones_are_refused() {
        let c = LeaseConfig::new("ns".into(), "l".into(), "me".into(), D);
        assert_eq!(c.renew_deadline, Duration::from_secs(10));
        assert_eq!(c.retry_period, Duration::from_secs(2));
        assert!(c.validate().is_ok());
        let bad = LeaseConfig {
            renew_deadline: D,
            ..c.clone()
        };
        assert!(bad.validate().is_err());
        let bad = LeaseConfig {
            retry_period: c.renew_deadline,
            ..c.clone()
        };
        assert!(bad.validate().is_err());
        // The Lease holds whole seconds: 1.5 s would be written as 1 s.
        let bad = LeaseConfig {
            duration: Duration::from_millis(1500),
            renew_deadline: Duration::from_secs(1),
            retry_period: Duration::from_millis(200),
            ..c
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .contains("whole number of seconds")
        );
    }
}
