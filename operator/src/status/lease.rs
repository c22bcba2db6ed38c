//! Leadership for status writes: a `coordination.k8s.io/v1` Lease. Every replica serves
//! streams; only the holder writes status and Events.
//!
//! The holder renews every `duration / 3`; another replica takes the Lease once it has
//! not been renewed for `duration`. Writes use the Lease's `resourceVersion`, so two
//! replicas never both win.

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
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Where the Lease lives and who we are.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a Lease holds without renewal.
    pub duration: Duration,
}

/// Keeps trying to hold the Lease until `shutdown`; `leader` says whether we hold it.
pub async fn run(
    client: Client,
    config: LeaseConfig,
    leader: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let api = Api::<Lease>::namespaced(client, &config.namespace);
    let period = config.duration / 3;
    loop {
        let held = match try_hold(&api, &config).await {
            Ok(held) => held,
            Err(error) => {
                tracing::warn!(%error, "lease update failed");
                false
            }
        };
        leader.send_if_modified(|l| {
            let changed = *l != held;
            if changed {
                tracing::info!(leader = held, lease = %config.name, "leadership changed");
            }
            *l = held;
            changed
        });
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(period) => {}
        }
    }
    // Step down on shutdown so another replica takes over at once.
    if *leader.borrow()
        && let Ok(mut lease) = api.get(&config.name).await
        && let Some(spec) = lease.spec.as_mut()
    {
        spec.holder_identity = None;
        let _ = api
            .replace(&config.name, &PostParams::default(), &lease)
            .await;
    }
    leader.send_replace(false);
}

async fn try_hold(api: &Api<Lease>, config: &LeaseConfig) -> Result<bool, kube::Error> {
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
    let ours = spec.holder_identity.as_deref() == Some(config.identity.as_str());
    let expired = spec.holder_identity.is_none()
        || spec.renew_time.as_ref().is_none_or(|t| {
            let age = now.duration_since(t.0);
            age.as_secs_f64() > f64::from(spec.lease_duration_seconds.unwrap_or(secs))
        });
    if !ours && !expired {
        return Ok(false);
    }
    lease.spec = Some(LeaseSpec {
        acquire_time: if ours {
            spec.acquire_time
        } else {
            mine.acquire_time
        },
        lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!ours)),
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
