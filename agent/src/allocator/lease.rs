//! Leader election through a coordination.k8s.io/v1 Lease, as client-go's leaderelection does
//! it: the holder renews the Lease; a candidate takes it over only when it has seen the same
//! record unchanged for the Lease's whole duration (by its own clock, so clock skew between
//! nodes does not matter); a leader that cannot renew within the renew deadline (shorter than
//! the duration) stops leading before anyone else may start.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt as _},
};
use tokio::{sync::watch, time::Instant};
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This process, as the Lease's holderIdentity.
    pub identity: String,
    pub duration: Duration,
    /// A leader that could not renew for this long stops leading (< `duration`).
    pub renew_deadline: Duration,
    /// How often to renew or try to acquire.
    pub retry_period: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("Lease {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

/// What this candidate last saw of the Lease, and when it changed.
struct Observed {
    record: (Option<String>, Option<Timestamp>),
    since: Instant,
    duration: Duration,
}

/// Takes part in the election until `leading` has no receiver; `leading` says whether this
/// process leads now. On the way out a leader gives the Lease up, so a standby need not wait
/// for it to expire.
pub async fn elect(client: Client, config: LeaseConfig, leading: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut observed: Option<Observed> = None;
    let mut renewed: Option<Instant> = None;
    loop {
        let attempt = Instant::now();
        match try_acquire_or_renew(&api, &config, &mut observed).await {
            Ok(true) => {
                renewed = Some(attempt);
                leading.send_if_modified(|leads| {
                    if !*leads {
                        info!(lease = %config.name, identity = %config.identity, "leading");
                    }
                    !std::mem::replace(leads, true)
                });
            }
            Ok(false) => {
                renewed = None;
                leading.send_if_modified(|leads| {
                    if *leads {
                        warn!(lease = %config.name, "another allocator holds the Lease; standing by");
                    }
                    std::mem::replace(leads, false)
                });
            }
            Err(err) => {
                let lapsed = renewed.is_none_or(|at| at.elapsed() >= config.renew_deadline);
                if lapsed {
                    leading.send_if_modified(|leads| {
                        if *leads {
                            warn!(%err, "cannot renew the Lease within the deadline; standing by");
                        }
                        std::mem::replace(leads, false)
                    });
                } else {
                    warn!(%err, "cannot reach the Lease; retrying");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(config.retry_period) => {}
            () = leading.closed() => break,
        }
    }
    if renewed.is_some() {
        release(&api, &config).await;
    }
}

async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observed: &mut Option<Observed>,
) -> Result<bool, LeaseError> {
    let failed = |source| LeaseError::Api {
        namespace: config.namespace.clone(),
        name: config.name.clone(),
        source,
    };
    let now = Timestamp::now();
    let duration_seconds = i32::try_from(config.duration.as_secs().max(1)).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&config.name).await.map_err(failed)? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                namespace: Some(config.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(duration_seconds),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(err) => Err(failed(err)),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let record = (holder.clone(), spec.renew_time.as_ref().map(|t| t.0));
    let duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(config.duration, Duration::from_secs);
    if observed.as_ref().is_none_or(|o| o.record != record) {
        *observed = Some(Observed {
            record,
            since: Instant::now(),
            duration,
        });
    }
    let mine = holder.as_deref() == Some(config.identity.as_str());
    let expired = observed
        .as_ref()
        .is_some_and(|o| o.since.elapsed() >= o.duration);
    if !(mine || holder.is_none() || expired) {
        return Ok(false);
    }
    let transitions = spec.lease_transitions.unwrap_or(0);
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(duration_seconds),
        acquire_time: if mine {
            spec.acquire_time
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if mine {
            transitions
        } else {
            transitions.saturating_add(1)
        }),
        ..spec
    });
    // The resourceVersion read above makes this a compare-and-swap: of two candidates taking
    // over at once, one gets 409 Conflict.
    match api
        .replace(&lease.name_any(), &PostParams::default(), &lease)
        .await
    {
        Ok(_) => {
            *observed = None;
            Ok(true)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(err) => Err(failed(err)),
    }
}

/// Gives the Lease up (holder cleared, 1 s duration), as client-go does on a clean exit.
async fn release(api: &Api<Lease>, config: &LeaseConfig) {
    let Ok(Some(mut lease)) = api.get_opt(&config.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    match api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => info!(lease = %config.name, "gave up the Lease"),
        Err(err) => warn!(%err, "cannot give up the Lease; the standby waits for it to expire"),
    }
}
