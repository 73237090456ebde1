//! Leader election over a `coordination.k8s.io/v1` Lease, so that two operator replicas
//! never reconcile at once. kube-runtime ships none; this follows client-go's
//! `tools/leaderelection`:
//!
//! - **Expiry is judged only by time observed locally.** A candidate notes, on its own
//!   monotonic clock, when it saw the lease record change; the holder's term has run out
//!   when `leaseDurationSeconds` have passed on that clock without a change. The holder's
//!   `renewTime` is written for people and never compared with our wall clock: the two
//!   clocks may disagree by any amount, and only their rates need to agree.
//! - **Every API call is bounded.** The leader renews every retry period; each attempt (a
//!   GET and a PUT) is cut off at the renew deadline counted from the start of the last
//!   successful renewal, so a partitioned leader whose calls hang notices in time. Candidates'
//!   attempts are bounded by the renew deadline too.
//! - **Work stops before the lease can pass on.** A standby cannot take the lease before a
//!   lease duration has passed since the leader's last successful renewal began (it saw the
//!   renewal at or after that moment). A leader that could not renew by the renew deadline
//!   (2/3 of the lease duration) cancels the controller and gives in-flight reconciles
//!   [`LeaseConfig::stop_grace`] (half of what is left, the other half being margin for
//!   clock-rate differences) before it aborts them.
//! - **Then the process exits.** [`run_as_leader`] returns [`LeaderError`] when leadership is
//!   lost (or the controller stopped while leading), and the binary exits non-zero; the
//!   kubelet restarts it and it comes back as a candidate, with fresh caches and no
//!   lingering task. Exiting, as client-go's users do (`OnStoppedLeading` is fatal in
//!   kube-controller-manager), is the one guarantee that covers tasks the controller may have
//!   spawned and connections it left open, not only the controller future itself.
//!
//! Writes carry the resourceVersion they read, so two candidates racing for the lease cannot
//! both win (the loser gets 409 Conflict). As in client-go there is no fencing: a write
//! already on the wire when the leader steps down may still land. The reconciler's writes are
//! idempotent server-side applies that the next leader repeats.
//!
//! Crates considered instead: `kube-leader-election` compares the holder's `renewTime` with
//! the local wall clock (its README: "volatile to datetime skew") and leaves renew timeouts
//! and stepping down to the caller; `kube-lease-manager` also judges expiry from timestamps
//! in the lease, with a configured skew allowance. Neither judges expiry by local observation
//! nor bounds the work of a leader that lost its lease, which are the properties needed here.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::time::Instant;
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
    /// A leader that could not renew for this long (from the start of its last successful
    /// renewal) steps down; every renewal attempt is cut off by then.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }
    /// How long in-flight reconciles may run on after the renew deadline before they are
    /// aborted: half the gap to the lease duration, the rest is margin for clocks that run
    /// at slightly different rates.
    pub fn stop_grace(&self) -> Duration {
        self.lease_duration.saturating_sub(self.renew_deadline()) / 2
    }
    fn lease(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Why this replica stopped leading. The binary exits non-zero on it (see the module doc).
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// No renewal succeeded within the renew deadline (the API server is unreachable or
    /// slow); the controller was stopped before the lease could pass to another replica.
    #[error(
        "lost the lease {lease}: not renewed within the renew deadline of {deadline:?} ({last_error})"
    )]
    RenewDeadline {
        lease: String,
        deadline: Duration,
        last_error: String,
    },
    /// Another replica holds the lease.
    #[error("lost the lease {lease} to {holder}")]
    Taken { lease: String, holder: String },
    /// The controller ended on its own while this replica led; the lease was released.
    #[error("the controller stopped while leading (lease {lease} released)")]
    WorkEnded { lease: String },
}

/// A candidate's knowledge of the lease: the record it last saw and when, on its own clock,
/// it saw that record change.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    record: Option<LeaseSpec>,
    at: Option<Instant>,
}

impl Observed {
    /// Notes `record` as read at `now`. The clock restarts only when the record changed
    /// (a holder that renews changes its `renewTime`, so the record changes on every renewal).
    pub fn observe(&mut self, record: &LeaseSpec, now: Instant) {
        if self.record.as_ref() != Some(record) {
            self.record = Some(record.clone());
            self.at = Some(now);
        }
    }

    /// Whether the holder's term has run out at `now`: the record's `leaseDurationSeconds`
    /// have passed on our clock since we saw it change. Never compares the holder's
    /// timestamps with our wall clock.
    pub fn expired(&self, now: Instant) -> bool {
        let (Some(record), Some(at)) = (&self.record, self.at) else {
            return true;
        };
        let seconds = record.lease_duration_seconds.unwrap_or(0).max(1);
        let duration = Duration::from_secs(u64::try_from(seconds).unwrap_or(1));
        now.saturating_duration_since(at) >= duration
    }
}

/// What a replica does with the lease record it just read.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// It is ours: renew it.
    Renew,
    /// It is free, released or expired: take it.
    Take,
    /// Someone else holds it and its term has not run out.
    Wait { holder: String },
}

/// Decides from the lease `record` (already passed to [`Observed::observe`]) at `now`.
pub fn decide(record: &LeaseSpec, me: &str, observed: &Observed, now: Instant) -> Decision {
    match record.holder_identity.as_deref().filter(|h| !h.is_empty()) {
        Some(holder) if holder == me => Decision::Renew,
        Some(holder) if !observed.expired(now) => Decision::Wait {
            holder: holder.to_string(),
        },
        _ => Decision::Take,
    }
}

/// How one attempt ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// This replica holds the lease (took or renewed it).
    Leading,
    /// Another replica holds it.
    HeldBy(String),
    /// Someone wrote the lease between our read and our write; try again.
    Conflict,
}

/// One replica's view of the lease.
#[derive(Debug)]
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Observed,
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: Observed::default(),
        }
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// One attempt to take or renew the lease. Not bounded in time by itself: callers
    /// bound it ([`run_as_leader`] does).
    pub async fn try_acquire_or_renew(&mut self) -> Result<Outcome, kube::Error> {
        // For people and the other replicas' records only; expiry is never judged by it.
        let now = MicroTime(Timestamp::now());
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
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(stored) => {
                    self.observe(&stored);
                    Ok(Outcome::Leading)
                }
                Err(e) if conflict(&e) => Ok(Outcome::Conflict),
                Err(e) => Err(e),
            };
        };

        let record = lease.spec.clone().unwrap_or_default();
        self.observed.observe(&record, Instant::now());
        let mut spec = record.clone();
        match decide(&record, &me, &self.observed, Instant::now()) {
            Decision::Wait { holder } => return Ok(Outcome::HeldBy(holder)),
            Decision::Renew => spec.renew_time = Some(now),
            Decision::Take => {
                spec.holder_identity = Some(me);
                spec.acquire_time = Some(now.clone());
                spec.renew_time = Some(now);
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
        }
        spec.lease_duration_seconds = Some(self.duration_seconds());
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(stored) => {
                self.observe(&stored);
                Ok(Outcome::Leading)
            }
            Err(e) if conflict(&e) => Ok(Outcome::Conflict),
            Err(e) => Err(e),
        }
    }

    fn observe(&mut self, lease: &Lease) {
        self.observed
            .observe(&lease.spec.clone().unwrap_or_default(), Instant::now());
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

/// Why the leading phase ended.
enum End {
    Shutdown,
    WorkEnded,
    Lost(LeaderError),
}

/// Runs `work` while this replica leads, until `shutdown` or until leadership is lost.
/// `work` gets a token that is cancelled when it must stop; it is aborted if it has not
/// stopped by the time the lease could pass to another replica (see the module doc).
///
/// Returns `Ok(())` after a shutdown (the lease released), and [`LeaderError`] once this
/// replica stopped leading for any other reason; `work` has stopped by then. It is not
/// started again: the caller exits and the process comes back as a candidate.
pub async fn run_as_leader<F, Fut>(
    client: Client,
    config: LeaseConfig,
    metrics: &Metrics,
    shutdown: CancellationToken,
    work: F,
) -> Result<(), LeaderError>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut elector = LeaderElector::new(client, config.clone());
    let retry = config.retry_period();
    let deadline = config.renew_deadline();

    // Candidate: try now, then every retry period. `renewed` is when the successful attempt
    // began: whatever it wrote was written after that.
    let mut renewed = loop {
        let started = Instant::now();
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            attempt = tokio::time::timeout(deadline, elector.try_acquire_or_renew()) => attempt,
        };
        match attempt {
            Ok(Ok(Outcome::Leading)) => break started,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("leader election: {e}"),
            Err(_) => tracing::warn!("leader election: no answer within {deadline:?}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(retry) => {}
        }
    };
    tracing::info!(identity = %config.identity, lease = %config.lease(), "became leader");
    metrics.leader.set(1);
    let token = shutdown.child_token();
    let mut handle = tokio::spawn(work(token.clone()));
    // If this future is dropped (the process is going down hard, or a test simulates a
    // crash), the controller must not outlive it as a leaderless zombie.
    let _abort_on_drop = AbortOnDrop(handle.abort_handle());

    let mut last_error = String::from("no renewal attempted");
    let end = loop {
        let step_down_at = renewed + deadline;
        tokio::select! {
            _ = shutdown.cancelled() => break End::Shutdown,
            _ = &mut handle => break End::WorkEnded,
            _ = tokio::time::sleep_until((Instant::now() + retry).min(step_down_at)) => {}
        }
        let started = Instant::now();
        if started >= step_down_at {
            break End::Lost(LeaderError::RenewDeadline {
                lease: config.lease(),
                deadline,
                last_error,
            });
        }
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => break End::Shutdown,
            _ = &mut handle => break End::WorkEnded,
            attempt = tokio::time::timeout_at(step_down_at, elector.try_acquire_or_renew()) => attempt,
        };
        match attempt {
            Ok(Ok(Outcome::Leading)) => renewed = started,
            Ok(Ok(Outcome::HeldBy(holder))) => {
                break End::Lost(LeaderError::Taken {
                    lease: config.lease(),
                    holder,
                });
            }
            Ok(Ok(Outcome::Conflict)) => last_error = "409 Conflict".into(),
            Ok(Err(e)) => {
                tracing::warn!("renewing the lease: {e}");
                last_error = e.to_string();
            }
            Err(_) => {
                break End::Lost(LeaderError::RenewDeadline {
                    lease: config.lease(),
                    deadline,
                    last_error: "the last attempt hung until the deadline".into(),
                });
            }
        }
    };

    // Stop the work: cancelled now, aborted if still running when the lease could pass on.
    token.cancel();
    metrics.leader.set(0);
    if let End::Lost(e) = &end {
        tracing::error!(identity = %config.identity, "{e}; stopping the controller");
    }
    if !matches!(end, End::WorkEnded) {
        let stop_by = renewed + deadline + config.stop_grace();
        if tokio::time::timeout_at(stop_by, &mut handle).await.is_err() {
            handle.abort();
            let _ = (&mut handle).await;
            tracing::warn!("aborted in-flight reconciles that did not finish in time");
        }
    }
    tracing::info!(identity = %config.identity, "stopped leading");

    match end {
        End::Lost(e) => Err(e),
        End::Shutdown | End::WorkEnded => {
            match tokio::time::timeout(deadline, elector.release()).await {
                Ok(Ok(())) => tracing::info!("released the lease"),
                Ok(Err(e)) => tracing::warn!("releasing the lease: {e}"),
                Err(_) => tracing::warn!("releasing the lease: no answer within {deadline:?}"),
            }
            match end {
                End::WorkEnded => Err(LeaderError::WorkEnded {
                    lease: config.lease(),
                }),
                _ => Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(holder: Option<&str>, renew: Timestamp, seconds: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(seconds),
            renew_time: Some(MicroTime(renew)),
            ..LeaseSpec::default()
        }
    }

    fn hour() -> k8s_openapi::jiff::SignedDuration {
        k8s_openapi::jiff::SignedDuration::from_hours(1)
    }

    #[test]
    fn a_lease_just_seen_to_change_is_held_whatever_its_renew_time_says() {
        // The holder's clock is an hour behind ours: its renewTime looks long expired.
        let t0 = Instant::now();
        let lease = record(Some("a"), Timestamp::now() - hour(), 15);
        let mut observed = Observed::default();
        observed.observe(&lease, t0);
        assert_eq!(
            decide(&lease, "b", &observed, t0 + Duration::from_secs(1)),
            Decision::Wait { holder: "a".into() }
        );
    }

    #[test]
    fn a_lease_unchanged_for_its_duration_on_our_clock_has_expired_whatever_its_renew_time_says() {
        // The holder's clock is an hour ahead: its renewTime looks fresh for an hour.
        let t0 = Instant::now();
        let lease = record(Some("a"), Timestamp::now() + hour(), 15);
        let mut observed = Observed::default();
        observed.observe(&lease, t0);
        // Seen again, unchanged: the clock does not restart.
        observed.observe(&lease, t0 + Duration::from_secs(10));
        let held = Decision::Wait { holder: "a".into() };
        assert_eq!(
            decide(&lease, "b", &observed, t0 + Duration::from_millis(14_999)),
            held
        );
        assert_eq!(
            decide(&lease, "b", &observed, t0 + Duration::from_secs(15)),
            Decision::Take
        );
    }

    #[test]
    fn every_change_of_the_record_restarts_the_clock() {
        let t0 = Instant::now();
        let mut observed = Observed::default();
        observed.observe(&record(Some("a"), Timestamp::now(), 6), t0);
        // The holder renewed (a new renewTime) at 5 s by our clock.
        let renewed = record(
            Some("a"),
            Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(5),
            6,
        );
        observed.observe(&renewed, t0 + Duration::from_secs(5));
        assert!(!observed.expired(t0 + Duration::from_secs(10)));
        assert!(observed.expired(t0 + Duration::from_secs(11)));
    }

    #[test]
    fn the_record_s_own_duration_counts_and_an_unseen_lease_is_not_trusted() {
        let t0 = Instant::now();
        let mut observed = Observed::default();
        assert!(
            observed.expired(t0),
            "nothing observed: nothing to wait for"
        );
        observed.observe(&record(Some("a"), Timestamp::now(), 60), t0);
        assert!(!observed.expired(t0 + Duration::from_secs(59)));
        assert!(observed.expired(t0 + Duration::from_secs(60)));
    }

    #[test]
    fn a_free_or_released_lease_is_taken_and_our_own_is_renewed() {
        let t0 = Instant::now();
        let mut observed = Observed::default();
        for lease in [
            record(None, Timestamp::now(), 15),
            record(Some(""), Timestamp::now(), 1),
        ] {
            observed.observe(&lease, t0);
            assert_eq!(decide(&lease, "b", &observed, t0), Decision::Take);
        }
        let ours = record(Some("b"), Timestamp::now(), 15);
        observed.observe(&ours, t0);
        assert_eq!(decide(&ours, "b", &observed, t0), Decision::Renew);
    }

    #[test]
    fn a_leader_stops_its_work_before_its_lease_can_pass_on() {
        for seconds in [3, 6, 15, 60, 137, 600] {
            let config = LeaseConfig {
                namespace: "ns".into(),
                name: "lease".into(),
                identity: "a".into(),
                lease_duration: Duration::from_secs(seconds),
            };
            let (retry, deadline) = (config.retry_period(), config.renew_deadline());
            assert!(
                retry * 2 < deadline,
                "{seconds}: at least two renewals per deadline"
            );
            let stop_by = deadline + config.stop_grace();
            assert!(
                stop_by < config.lease_duration,
                "{seconds}: work stops at {stop_by:?}"
            );
            assert!(config.lease_duration - stop_by >= config.lease_duration / 10);
        }
    }

    /// An in-memory Lease API for one lease, shared by several replicas; each replica's
    /// calls can be made to hang, as a network partition would.
    mod fake {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};

        use axum::extract::State;
        use axum::http::header::CONTENT_TYPE;
        use axum::http::{Method, StatusCode};
        use axum::response::{IntoResponse, Response};
        use k8s_openapi::api::coordination::v1::Lease;

        #[derive(Debug, Default)]
        pub struct Store {
            lease: Mutex<Option<Lease>>,
            version: Mutex<u64>,
        }

        #[derive(Clone)]
        struct Replica {
            store: Arc<Store>,
            partitioned: Arc<AtomicBool>,
        }

        fn json(value: &impl serde::Serialize) -> Response {
            let body = serde_json::to_vec(value).unwrap_or_default();
            ([(CONTENT_TYPE, "application/json")], body).into_response()
        }

        fn status(code: StatusCode, reason: &str) -> Response {
            let body = serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": reason, "reason": reason, "code": code.as_u16(),
            });
            (code, json(&body)).into_response()
        }

        async fn handle(
            State(replica): State<Replica>,
            method: Method,
            body: axum::body::Bytes,
        ) -> Response {
            if replica.partitioned.load(Ordering::SeqCst) {
                return std::future::pending().await;
            }
            let store = &replica.store;
            let mut lease = store.lease.lock().unwrap();
            let mut version = store.version.lock().unwrap();
            match method {
                Method::GET => match lease.as_ref() {
                    Some(l) => json(l).into_response(),
                    None => status(StatusCode::NOT_FOUND, "NotFound"),
                },
                Method::POST | Method::PUT => {
                    let Ok(mut new): Result<Lease, _> = serde_json::from_slice(&body) else {
                        return status(StatusCode::BAD_REQUEST, "BadRequest");
                    };
                    let current = lease.as_ref().map(|l| l.metadata.resource_version.clone());
                    let ok = match (&method, current) {
                        (&Method::POST, None) => true,
                        (&Method::PUT, Some(v)) => v == new.metadata.resource_version,
                        _ => false,
                    };
                    if !ok {
                        return status(StatusCode::CONFLICT, "Conflict");
                    }
                    *version += 1;
                    new.metadata.resource_version = Some(version.to_string());
                    *lease = Some(new.clone());
                    json(&new).into_response()
                }
                _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
            }
        }

        /// A client of `store` for one replica, and the switch that partitions it.
        pub fn client(store: &Arc<Store>) -> (kube::Client, Arc<AtomicBool>) {
            let partitioned = Arc::new(AtomicBool::new(false));
            let replica = Replica {
                store: store.clone(),
                partitioned: partitioned.clone(),
            };
            let router = axum::Router::new().fallback(handle).with_state(replica);
            (kube::Client::new(router, "default"), partitioned)
        }

        pub fn holder(store: &Store) -> Option<String> {
            store
                .lease
                .lock()
                .unwrap()
                .as_ref()
                .and_then(|l| l.spec.as_ref())
                .and_then(|s| s.holder_identity.clone())
        }
    }

    /// Runs a replica against the fake API; its work records when it started and when it
    /// stopped (cancelled or aborted: either drops it).
    struct Spans(std::sync::Mutex<Vec<(Instant, Option<Instant>)>>);

    struct Stopped<'a>(&'a Spans, usize);
    impl Drop for Stopped<'_> {
        fn drop(&mut self) {
            self.0.0.lock().unwrap()[self.1].1 = Some(Instant::now());
        }
    }

    fn replica(
        store: &std::sync::Arc<fake::Store>,
        identity: &str,
        spans: &'static Spans,
    ) -> (
        tokio::task::JoinHandle<Result<(), LeaderError>>,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        CancellationToken,
    ) {
        let (client, partitioned) = fake::client(store);
        let config = LeaseConfig {
            namespace: "default".into(),
            name: "lease".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(6),
        };
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            let metrics = Metrics::new();
            run_as_leader(client, config, &metrics, stop, move |token| async move {
                let index = {
                    let mut spans = spans.0.lock().unwrap();
                    spans.push((Instant::now(), None));
                    spans.len() - 1
                };
                let _stopped = Stopped(spans, index);
                // A reconcile that hangs on the partitioned API and ignores the token.
                let _ = token;
                std::future::pending::<()>().await;
            })
            .await
        });
        (task, partitioned, shutdown)
    }

    /// The partition test of the e2e suite, in-process against the fake API (6 s lease:
    /// renew deadline 4 s, stop grace 1 s), with a reconcile that ignores its token, so that
    /// only the abort can stop it. On a paused clock: the fake API answers in-process, so
    /// time moves only when every task waits on a timer, and the bounds below are exact on
    /// any load (in real time, two busy cores delayed renewals and stops past them).
    #[tokio::test(start_paused = true)]
    async fn a_partitioned_leader_stops_its_work_before_a_standby_starts() {
        static SPANS: Spans = Spans(std::sync::Mutex::new(Vec::new()));
        let store = std::sync::Arc::new(fake::Store::default());
        let (a, a_partitioned, _a_shutdown) = replica(&store, "a", &SPANS);
        // A takes the free lease at once; on a loaded machine "at once" can take seconds.
        for _ in 0..200 {
            if fake::holder(&store).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(fake::holder(&store).as_deref(), Some("a"));
        let (b, _, b_shutdown) = replica(&store, "b", &SPANS);
        // B stands by while A renews, past a lease duration.
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert_eq!(fake::holder(&store).as_deref(), Some("a"));
        assert_eq!(SPANS.0.lock().unwrap().len(), 1);

        let partitioned = Instant::now();
        a_partitioned.store(true, std::sync::atomic::Ordering::SeqCst);
        let lost = tokio::time::timeout(Duration::from_secs(30), a)
            .await
            .expect("the partitioned leader gives up")
            .expect("no panic");
        let a_returned = Instant::now();
        assert!(
            matches!(lost, Err(LeaderError::RenewDeadline { .. })),
            "{lost:?}"
        );
        for _ in 0..300 {
            if SPANS.0.lock().unwrap().len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let spans = SPANS.0.lock().unwrap().clone();
        assert_eq!(spans.len(), 2, "the standby took over: {spans:?}");
        let a_stopped = spans[0].1.expect("A's work stopped");
        let b_started = spans[1].0;
        assert!(a_stopped <= a_returned);
        assert!(
            a_stopped < b_started,
            "A stopped {:?} after the partition, B started {:?} after it",
            a_stopped - partitioned,
            b_started - partitioned
        );
        // A stops by its last renewal + renew deadline + stop grace (5 s), and its last
        // renewal was at most a retry period (1.2 s) before the partition; B waits a lease
        // duration (6 s) from when it saw that renewal, which was no earlier than A began it.
        assert!(a_stopped - partitioned <= Duration::from_millis(5_500));
        assert!(b_started - a_stopped >= Duration::from_millis(500));
        b_shutdown.cancel();
        assert!(b.await.expect("no panic").is_ok());
        assert_eq!(fake::holder(&store), None, "released on shutdown");
    }
}
