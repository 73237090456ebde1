//! Leader election over a `coordination.k8s.io/v1` Lease, so two operator replicas never
//! reconcile at once. kube-runtime ships none; this follows client-go's algorithm:
//! a candidate takes the lease when it is free or its holder has not renewed it for a lease
//! duration; the leader renews it every retry period and steps down when it cannot renew
//! within the renew deadline. Every write carries the resourceVersion it read, so two
//! candidates racing for the lease cannot both win (the loser gets 409 Conflict).

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Where the lease lives and how long it lasts.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a lease holds without renewal.
    pub lease_duration: Duration,
}

impl LeaseConfig {
    /// The leader renews this often, and candidates retry this often.
    pub fn retry_period(&self) -> Duration {
        self.lease_duration / 5
    }
    /// A leader that could not renew for this long steps down, before its lease can expire
    /// under it and another replica takes over.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }
}

/// One replica's view of the lease.
#[derive(Debug)]
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The lease version last seen and when it was first seen, to judge expiry by our own
    /// clock rather than only the holder's timestamps.
    observed: Option<(String, Instant)>,
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
        }
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// One attempt to take or renew the lease; `Ok(true)` when this replica holds it.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let me = self.config.identity.clone();
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(self.duration_seconds()),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };

        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let seen_at = match &self.observed {
            Some((v, at)) if *v == version => *at,
            _ => {
                let at = Instant::now();
                self.observed = Some((version, at));
                at
            }
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let held_for = Duration::from_secs(
            u64::try_from(
                spec.lease_duration_seconds
                    .unwrap_or(self.duration_seconds())
                    .max(1),
            )
            .unwrap_or(1),
        );
        if holder.as_deref() == Some(me.as_str()) {
            spec.renew_time = Some(MicroTime(now));
        } else {
            let stale_by_our_clock = seen_at.elapsed() > held_for;
            let stale_by_its_clock = spec.renew_time.as_ref().is_none_or(|t| {
                t.0.saturating_add(
                    SignedDuration::try_from(held_for).unwrap_or(SignedDuration::MAX),
                )
                .is_ok_and(|expiry| expiry < now)
            });
            if holder.is_some() && !stale_by_our_clock && !stale_by_its_clock {
                return Ok(false);
            }
            spec.holder_identity = Some(me);
            spec.acquire_time = Some(MicroTime(now));
            spec.renew_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(self.duration_seconds());
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up (on graceful shutdown) so a standby takes over at once instead of
    /// waiting for it to expire.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            return Ok(());
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(spec);
        self.api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `work` only while this replica leads, until `shutdown`. `work` gets a token that is
/// cancelled when leadership is lost or on shutdown; it is started again if leadership
/// comes back.
pub async fn run_as_leader<F, Fut>(
    client: Client,
    config: LeaseConfig,
    metrics: &Metrics,
    shutdown: CancellationToken,
    mut work: F,
) where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut elector = LeaderElector::new(client, config.clone());
    let retry = config.retry_period();
    loop {
        // Candidate: try now, then every retry period.
        loop {
            match elector.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::warn!("leader election: {e}"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(retry) => {}
            }
        }
        tracing::info!(identity = %config.identity, lease = %config.name, "became leader");
        metrics.leader.set(1);
        let token = shutdown.child_token();
        let mut handle = tokio::spawn(work(token.clone()));
        // If this future is dropped (the process is going down hard, or a test simulates a
        // crash), the controller must not outlive it as a leaderless zombie.
        let _abort_on_drop = AbortOnDrop(handle.abort_handle());
        let mut renewed = Instant::now();
        let lost = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break false,
                _ = &mut handle => {
                    tracing::warn!("controller stopped while leading");
                    break true;
                }
                _ = tokio::time::sleep(retry) => {}
            }
            match elector.try_acquire_or_renew().await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => break true,
                Err(e) if renewed.elapsed() < config.renew_deadline() => {
                    tracing::warn!("renewing the lease: {e}");
                }
                Err(e) => {
                    tracing::warn!("could not renew the lease within the deadline: {e}");
                    break true;
                }
            }
        };
        token.cancel();
        // In-flight reconciles finish; bounded, since a lost leader must stop writing.
        if tokio::time::timeout(config.renew_deadline(), &mut handle)
            .await
            .is_err()
        {
            handle.abort();
        }
        metrics.leader.set(0);
        if !lost {
            if let Err(e) = elector.release().await {
                tracing::warn!("releasing the lease: {e}");
            }
            tracing::info!("released the lease");
            return;
        }
        tracing::warn!(identity = %config.identity, "lost leadership; standing by");
    }
}
