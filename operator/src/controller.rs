//! The controller: watches gateways, their children and the relay pods, and runs the
//! pipeline for each gateway that changed or whose resync is due:
//! [`fetch::observe`] (the watch caches, and a GET of each Secret the gateway names) ->
//! [`validate`] -> [`build_with`] -> [`apply::apply`] -> [`status::compute`] ->
//! [`write_status`]. Only the first and the last two stages do I/O.
//!
//! Secrets are not watched: a watch needs `list` and `watch` on Secrets, which RBAC cannot
//! narrow to metadata, so the operator's role could read every Secret of every namespace.
//! A change to a Secret a gateway names is instead seen by the gateway's next reconcile,
//! at most [`RESYNC`] later ([`SECRET_RECHECK`] for a gateway failing on its Secrets).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tracing::Instrument;

use crate::api::{CONDITION_READY, WebsocketGateway, WebsocketGatewayStatus};
use crate::build::{MANAGED_BY_LABEL, MANAGER, Options, applies_replicas, build_with};
use crate::error::Error;
use crate::fetch::{Caches, Children, Observed};
use crate::forget::Forgetter;
use crate::metrics::Metrics;
use crate::metrics_api::scrape::Scraper;
use crate::rebalance::{Rebalancer, TRIGGER_BUFFER};
use crate::stages::{self, Stages};
use crate::status::{self, Degradation};
use crate::validate::{restart_secrets_digest, validate};
use crate::{apply, fetch};

/// A gateway whose spec, Secrets and children are unchanged is still fully re-applied this
/// often, which bounds how long a child someone edited behind the watch's back (a Service,
/// a ConfigMap: changes the fingerprint does not see) stays wrong. Everything else
/// re-applies on change.
const FULL_APPLY_EVERY: Duration = Duration::from_secs(600);
/// How often a gateway is reconciled when nothing changed: a status refresh (the fleet's
/// connection count moves without any watch event) and a GET of each Secret it names, which
/// is how a rotated Secret is noticed (Secrets are not watched): this bounds the time from a
/// Secret write to the new pod template. Otherwise from the caches: no other API request
/// unless the status changed.
pub const RESYNC: Duration = Duration::from_secs(60);
/// The longest wait before a gateway that failed on its Secrets (one missing, a key missing
/// or unusable) is looked at again, whatever its backoff: with no watch on Secrets, only a
/// reconcile sees the fix. Each try costs a GET per named Secret and a patch of the
/// gateway's Event series (the status is written only when it changes).
pub const SECRET_RECHECK: Duration = RESYNC;
/// How often a gateway that is not Ready is looked at when nothing changed: the relays'
/// reports (NATS unreachable, say) reach its status within this.
const NOT_READY_RESYNC: Duration = Duration::from_secs(10);
/// Reconciles running at once (of different gateways; one gateway is never reconciled
/// twice at a time). Bounds the burst of API requests after a restart or a relist.
pub const CONCURRENCY: u16 = 8;
/// First retry after a failure; doubles per consecutive failure up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The last full apply of one gateway.
#[derive(Debug)]
struct Applied {
    /// What it depended on ([`fingerprint`]).
    fingerprint: String,
    /// The Deployment's generation and replica count it left (or last saw the HPA set): a
    /// newer generation with the same count means someone edited the Deployment's spec.
    deployment_generation: i64,
    deployment_replicas: Option<i32>,
    at: Instant,
}

/// What a full apply depends on: the gateway's identity and spec generation, and the
/// versions of the Secrets it reads.
fn fingerprint(o: &Observed) -> String {
    let gw = &o.gateway;
    let mut f = format!(
        "{}/{}",
        gw.uid().unwrap_or_default(),
        gw.metadata.generation.unwrap_or(0)
    );
    for (name, secret) in &o.secrets {
        let version = secret
            .as_ref()
            .and_then(|s| s.metadata.resource_version.as_deref())
            .unwrap_or("-");
        f.push_str(&format!(" {name}@{version}"));
    }
    f
}

/// Whether the Deployment's spec moved since `last` through someone else than the HPA: a
/// newer generation, unless autoscaling is on and the replica count is what changed (then
/// it was the HPA scaling; an edit in the same generation waits for the slow resync).
fn deployment_edited(o: &Observed, last: &Applied) -> bool {
    let Some(deployment) = &o.deployment else {
        return true;
    };
    let generation = deployment.metadata.generation.unwrap_or(0);
    let scaled = o.gateway.spec.autoscaling.is_some()
        && deployment.spec.replicas != last.deployment_replicas;
    generation > last.deployment_generation && !scaled
}

/// Whether the children need a full apply now, or a status refresh is enough.
fn needs_apply(o: &Observed, last: Option<&Applied>) -> bool {
    let Some(last) = last else { return true };
    let Some(deployment) = &o.deployment else {
        return true;
    };
    // The replica count is still ours although autoscaling is on: hand it over.
    let handover = o.gateway.spec.autoscaling.is_some() && applies_replicas(deployment, MANAGER);
    handover
        || (o.gateway.spec.autoscaling.is_some() != o.hpa.is_some())
        || !o.missing.is_empty()
        || last.fingerprint != fingerprint(o)
        || deployment_edited(o, last)
        || last.at.elapsed() >= FULL_APPLY_EVERY
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Consecutive failed tries per gateway and when the next is due, for exponential
    /// backoff.
    failures: Mutex<HashMap<String, (u32, Instant)>>,
    /// What was last fully applied per gateway, so that the reconciles its children's
    /// status updates trigger (the Deployment, HPA and PDB controllers write status several
    /// times per rollout) cost a status refresh, not a full server-side apply.
    applied: Mutex<HashMap<String, Applied>>,
    /// Who may reach the relays' admin port ([`crate::build::Options::admin_peers`]).
    admin_peers: Vec<NetworkPolicyPeer>,
    /// The one scraper of the relays' `/metrics` (shared with the custom metrics API, so a
    /// pod is asked once per cache period whoever asks).
    scraper: Scraper,
    /// The label every Secret a gateway names must carry (`--secret-label`), if any.
    secret_label: Option<crate::validate::SecretLabel>,
    /// The rebalancer's last decision per gateway, shown by the status stage as the
    /// `Rebalancing` condition.
    pub rebalance: Arc<crate::rebalance::Summaries>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        instance: Option<String>,
        admin_peers: Vec<NetworkPolicyPeer>,
        scraper: Scraper,
        secret_label: Option<crate::validate::SecretLabel>,
    ) -> Self {
        let reporter = Reporter {
            controller: MANAGER.to_string(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            failures: Mutex::new(HashMap::new()),
            applied: Mutex::new(HashMap::new()),
            admin_peers,
            scraper,
            secret_label,
            metrics,
            rebalance: Arc::default(),
        }
    }

    /// The one relay scraper (the rebalancer reads the counts through it too).
    pub(crate) fn scraper(&self) -> &Scraper {
        &self.scraper
    }

    /// `namespace/name`: how a gateway is keyed in the per-gateway maps.
    pub fn key(gw: &WebsocketGateway) -> String {
        format!("{}/{}", gw.namespace().unwrap_or_default(), gw.name_any())
    }

    /// Records one more failure and returns how long to wait before the next try.
    fn backoff(&self, gw: &WebsocketGateway) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let key = Self::key(gw);
        let (tries, due) = next_try(failures.get(&key).copied(), Instant::now());
        failures.insert(key, (tries, due));
        backoff_for(tries)
    }

    fn needs_apply(&self, o: &Observed) -> bool {
        let applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        needs_apply(o, applied.get(&Self::key(&o.gateway)))
    }

    fn record_applied(&self, o: &Observed, deployment: Option<&Deployment>) {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        let key = Self::key(&o.gateway);
        match deployment {
            Some(d) => {
                applied.insert(
                    key,
                    Applied {
                        fingerprint: fingerprint(o),
                        deployment_generation: d.metadata.generation.unwrap_or(0),
                        deployment_replicas: d.spec.replicas,
                        at: Instant::now(),
                    },
                );
            }
            None => {
                applied.remove(&key);
            }
        }
    }

    /// The HPA scaled the Deployment: remember its new generation and count, so that the
    /// next change is judged against them.
    fn note_scaled(&self, o: &Observed) {
        let Some(d) = &o.deployment else { return };
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(last) = applied.get_mut(&Self::key(&o.gateway)) {
            let generation = d.metadata.generation.unwrap_or(0);
            if generation > last.deployment_generation {
                last.deployment_generation = generation;
                last.deployment_replicas = d.spec.replicas;
            }
        }
    }

    fn succeeded(&self, gw: &WebsocketGateway) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(&Self::key(gw));
    }
}

/// The failed-try count and the next try's time after a failure at `now`, given the previous
/// ones. A failure before the scheduled retry (a reconcile an event woke: the children's
/// status updates come in bursts) is the same try again, not a new one: counted, a burst of
/// events doubled the delay up to its cap within seconds, and a gateway whose cause was fixed
/// (a quota lifted) then waited the full 5 minutes. Pure.
pub fn next_try(prev: Option<(u32, Instant)>, now: Instant) -> (u32, Instant) {
    let tries = match prev {
        Some((n, due)) if now < due => n,
        Some((n, _)) => n.saturating_add(1),
        None => 1,
    };
    (tries, now + backoff_for(tries))
}

/// When to retry after `error`, given the backoff: a gateway failing on its Secrets is
/// looked at again within [`SECRET_RECHECK`], since nothing else would wake it when the
/// Secret is fixed (Secrets are not watched). Pure.
pub fn retry_delay(error: &Error, backoff: Duration) -> Duration {
    match error {
        Error::Validate(_) => backoff.min(SECRET_RECHECK),
        _ => backoff,
    }
}

/// Delay before retry number `failures` (1-based): 2s, 4s, 8s ... capped at 5 minutes, so a
/// broken gateway never spins the operator.
pub fn backoff_for(failures: u32) -> Duration {
    let factor = 1u32
        .checked_shl(failures.saturating_sub(1))
        .unwrap_or(u32::MAX);
    BASE_BACKOFF.saturating_mul(factor).min(MAX_BACKOFF)
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// The context plus the watch caches of one controller run.
struct Reconciler {
    ctx: Arc<Context>,
    caches: Caches,
}

/// One reconcile, in its span with the stage timings ([`crate::stages`]).
async fn reconcile(gw: Arc<WebsocketGateway>, r: Arc<Reconciler>) -> Result<Action, Error> {
    let span = stages::reconcile_span(&Context::key(&gw));
    let mut stages = Stages::new(span.clone(), r.ctx.metrics.clone());
    let result = reconcile_stages(gw, r, &mut stages).instrument(span).await;
    stages.finish(result.as_ref().err().map(Error::category));
    result
}

async fn reconcile_stages(
    gw: Arc<WebsocketGateway>,
    r: Arc<Reconciler>,
    stages: &mut Stages,
) -> Result<Action, Error> {
    let ctx = &r.ctx;
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    // A gateway being deleted is the garbage collector's business: applying children now
    // would only re-create what it is removing.
    if gw.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let result = match fetch::observe(&ctx.client, &r.caches, &ctx.scraper, gw.clone()).await {
        Ok(observed) => pipeline(&observed, ctx, stages)
            .await
            .map_err(|e| (e, Some(observed))),
        Err(e) => Err((e, None)),
    };
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(action) => {
            ctx.succeeded(&gw);
            tracing::debug!(gateway = %Context::key(&gw), elapsed = ?started.elapsed(), "reconciled");
            Ok(action)
        }
        Err((e, observed)) => {
            ctx.metrics.failed(e.category());
            if e.is_user_error()
                && let Some(observed) = observed
            {
                report_user_error(&observed, ctx, &e).await;
            }
            Err(e)
        }
    }
}

/// validate -> build -> apply (when something changed) -> status.
async fn pipeline(o: &Observed, ctx: &Context, stages: &mut Stages) -> Result<Action, Error> {
    stages.done("fetch");
    let gw = o.gateway.as_ref();
    let valid = validate(gw, &o.secrets, ctx.secret_label.as_ref());
    stages.done("validate");
    if let Err(e) = valid {
        ctx.record_applied(o, None);
        return Err(e.into());
    }
    let was_degraded = status::degraded_reason(gw);
    let deployment = if ctx.needs_apply(o) {
        ctx.record_applied(o, None);
        let options = Options {
            restart_digest: restart_secrets_digest(gw, &o.secrets),
            admin_peers: ctx.admin_peers.clone(),
        };
        let desired = build_with(gw, &options)?;
        stages.done("build");
        let uid = gw.uid().unwrap_or_default();
        let applied = apply::apply(&ctx.client, &desired, &uid, o.deployment.as_deref()).await?;
        stages.done("apply");
        ctx.record_applied(o, Some(&applied));
        tracing::info!(gateway = %Context::key(gw), "applied");
        Some(applied)
    } else {
        ctx.note_scaled(o);
        None
    };
    stages.skip();
    let deployment = deployment.as_ref().or(o.deployment.as_deref());
    // What the relays report (NATS unreachable, a refused reload, missing history streams).
    let problem = status::relay_problem(gw, &o.relays);
    let at = now();
    let mut status = status::compute_with(
        gw,
        deployment,
        o.connections,
        o.shedding,
        problem.as_ref(),
        &at,
    );
    status.conditions.extend(rebalancing(ctx, gw, &at));
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == CONDITION_READY && c.status == "True");
    write_status(&ctx.client, gw, status).await?;
    stages.done("status");
    match (&problem, was_degraded) {
        (Some(p), previous) if previous.as_deref() != Some(p.reason.as_str()) => {
            tracing::warn!(gateway = %Context::key(gw), reason = %p.reason, "{}", p.message);
            publish(ctx, gw, EventType::Warning, &p.reason, p.message.clone()).await;
        }
        (None, Some(_)) => {
            publish(
                ctx,
                gw,
                EventType::Normal,
                "Recovered",
                "the gateway's spec, its Secrets, its children and its relays are in order again"
                    .into(),
            )
            .await;
        }
        _ => {}
    }
    // Not Ready: look again soon (what the relays report moves without a watch event).
    Ok(Action::requeue(if ready {
        RESYNC
    } else {
        NOT_READY_RESYNC
    }))
}

/// A person must act: say so in the Degraded condition and in an Event.
async fn report_user_error(o: &Observed, ctx: &Context, e: &Error) {
    let gw = o.gateway.as_ref();
    tracing::warn!(gateway = %Context::key(gw), reason = e.category(), "{e}");
    let degradation = Degradation {
        reason: e.category().to_string(),
        message: e.to_string(),
    };
    // Keep reporting the Deployment that runs (it still serves with the previous config).
    let at = now();
    let mut status = status::compute_with(
        gw,
        o.deployment.as_deref(),
        o.connections,
        o.shedding,
        Some(&degradation),
        &at,
    );
    status.conditions.extend(rebalancing(ctx, gw, &at));
    if let Err(err) = write_status(&ctx.client, gw, status).await {
        tracing::warn!(gateway = %Context::key(gw), "could not mark the gateway Degraded: {err}");
    }
    publish(ctx, gw, EventType::Warning, e.category(), e.to_string()).await;
}

/// The `Rebalancing` condition from the rebalancer's last decision for `gw`.
fn rebalancing(
    ctx: &Context,
    gw: &WebsocketGateway,
    at: &Time,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    status::rebalancing(gw, ctx.rebalance.get(&Context::key(gw)).as_ref(), at)
}

/// An Event on the gateway (a failure to publish is logged: Events are best effort).
pub(crate) async fn publish(
    ctx: &Context,
    gw: &WebsocketGateway,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&event, &gw.object_ref(&())).await {
        tracing::warn!(gateway = %Context::key(gw), "could not publish an Event: {err}");
    }
}

/// Writes the status (server-side apply on the status subresource), unless it is unchanged:
/// a write would wake this controller's own watch for nothing.
async fn write_status(
    client: &Client,
    gw: &WebsocketGateway,
    status: WebsocketGatewayStatus,
) -> Result<(), Error> {
    if gw.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api =
        Api::<WebsocketGateway>::namespaced(client.clone(), &gw.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": WebsocketGateway::api_version(&()),
        "kind": WebsocketGateway::kind(&()),
        "status": status,
    });
    api.patch_status(
        &gw.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await
    .map_err(Error::Status)?;
    Ok(())
}

fn error_policy(gw: Arc<WebsocketGateway>, error: &Error, r: Arc<Reconciler>) -> Action {
    let delay = retry_delay(error, r.ctx.backoff(&gw));
    if !error.is_user_error() {
        tracing::warn!(gateway = %Context::key(&gw), category = error.category(), retry_in = ?delay, "reconcile failed: {error}");
    }
    Action::requeue(delay)
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs the controller until `shutdown` resolves (in-flight reconciles finish first).
/// `namespace` restricts every watch to one namespace.
/// The controller's merged trigger stream gets no backoff of its own: each stream backs off
/// on its own errors. A shared one (kube-runtime's default) stops polling *every* stream
/// after *any* stream's error and grows with each: after an API server restart each of the
/// watches (eleven then) answers one 410 (its resource version is older than the new server's
/// cache) and the shared pause grew to a minute and more, while the gateway watch, never
/// polled, left the cache the reconcile reads stale; the operator kept applying the spec it
/// had before the restart.
struct NoSharedBackoff;

impl Iterator for NoSharedBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(Duration::ZERO)
    }
}

impl kube::runtime::utils::Backoff for NoSharedBackoff {
    fn reset(&mut self) {}
}

pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let base = watcher::Config::default();
    // The children and pods the operator made carry its managed-by label: only those are
    // watched.
    let owned = base
        .clone()
        .labels(&format!("{MANAGED_BY_LABEL}={MANAGER}"));
    // The gateway watch backs off on its own errors, like every other stream below.
    let (gateways, gateways_w) = reflector::store::<WebsocketGateway>();
    let gateway_events = reflector::reflector(
        gateways_w,
        watcher(api::<WebsocketGateway>(&client, ns), base.clone()),
    )
    .default_backoff()
    .applied_objects();
    let controller = Controller::for_stream(gateway_events, gateways.clone())
        // Creating seven children fires seven watch events, and our own status write one more;
        // coalesce a burst into one reconcile.
        .with_config(
            ControllerConfig::default()
                .debounce(Duration::from_millis(500))
                .concurrency(CONCURRENCY),
        )
        .trigger_backoff(NoSharedBackoff);

    // Caches the fetch stage reads from, filled by the streams that also wake the gateways.
    let (deployments, deployments_w) = reflector::store::<Deployment>();
    let (hpas, hpas_w) = reflector::store::<HorizontalPodAutoscaler>();
    let (pods, pods_w) = reflector::store::<Pod>();
    // The operator's per-gateway series come from these caches while this controller runs.
    let _exported = ctx.metrics.gateways.attach(crate::gateway_metrics::Caches {
        gateways: gateways.clone(),
        hpas: hpas.clone(),
        pods: pods.clone(),
    });
    let deployment_events = reflector::reflector(
        deployments_w,
        watcher(api::<Deployment>(&client, ns), owned.clone()),
    )
    .default_backoff()
    .touched_objects();
    let hpa_events = reflector::reflector(
        hpas_w,
        watcher(api::<HorizontalPodAutoscaler>(&client, ns), owned.clone()),
    )
    .default_backoff()
    .touched_objects();
    // After each pod event (the cache already holds it), the relays lost since the previous
    // view are forgotten by a live relay of their gateway, if it keeps a registry. One
    // forgetter per run, and no view before the cache's first full list (Init and InitApply
    // do not change what the cache shows; InitDone does): a cache that is still empty, this
    // run's or after a leadership change, must never read as every relay gone.
    let forget = {
        let forgetter = Arc::new(Forgetter::new(ctx.metrics.forgets.clone()));
        let pods = pods.clone();
        let gateways = gateways.clone();
        move |event: &Result<watcher::Event<Pod>, watcher::Error>| {
            if !crate::forget::shows_a_view(event) {
                return;
            }
            let view = pods.state();
            let forgets = forgetter.observe(view.iter().map(AsRef::as_ref), |ns, name| {
                gateways
                    .get(&ObjectRef::new(name).within(ns))
                    .is_some_and(|gw| crate::build::relay_registry(&gw.spec, ns, name).is_some())
            });
            forgetter.spawn(forgets);
        }
    };
    let pod_events = reflector::reflector(pods_w, watcher(api::<Pod>(&client, ns), owned.clone()))
        .default_backoff()
        .inspect(forget)
        .touched_objects();
    // The other children: their metadata is enough (wake the gateway, see one deleted).
    fn meta<K>(
        client: &Client,
        ns: Option<&str>,
        config: &watcher::Config,
        writer: reflector::store::Writer<PartialObjectMeta<K>>,
    ) -> impl futures::Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
    where
        K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        // An Api of PartialObjectMeta makes metadata-only requests.
        reflector::reflector(
            writer,
            watcher(api::<PartialObjectMeta<K>>(client, ns), config.clone()),
        )
        .default_backoff()
        .touched_objects()
    }
    let (config_maps, config_maps_w) = reflector::store();
    let (services, services_w) = reflector::store();
    let (service_accounts, service_accounts_w) = reflector::store();
    let (pdbs, pdbs_w) = reflector::store();
    let (network_policies, network_policies_w) = reflector::store();

    let caches = Caches {
        deployments,
        hpas,
        pods,
        children: Children {
            config_maps,
            services,
            service_accounts,
            pdbs,
            network_policies,
        },
    };
    // The rebalancer runs as long as this controller (so in the leader only), on the same
    // caches; it wakes a gateway's reconcile when its Rebalancing condition changes.
    let (rebalanced, rebalanced_rx) = futures::channel::mpsc::channel(TRIGGER_BUFFER);
    let rebalancer = tokio::spawn(
        Rebalancer::new(ctx.clone(), gateways.clone(), caches.clone(), rebalanced).run(),
    );
    let reconciler = Arc::new(Reconciler {
        ctx: ctx.clone(),
        caches,
    });
    controller
        .owns_stream(deployment_events)
        .owns_stream(hpa_events)
        .owns_stream(meta::<ConfigMap>(&client, ns, &owned, config_maps_w))
        .owns_stream(meta::<Service>(&client, ns, &owned, services_w))
        .owns_stream(meta::<ServiceAccount>(
            &client,
            ns,
            &owned,
            service_accounts_w,
        ))
        .owns_stream(meta::<PodDisruptionBudget>(&client, ns, &owned, pdbs_w))
        .owns_stream(meta::<NetworkPolicy>(
            &client,
            ns,
            &owned,
            network_policies_w,
        ))
        // Pods wake nothing (their Deployment's status does); the stream fills the cache.
        .watches_stream(pod_events, |_pod| Vec::<ObjectRef<WebsocketGateway>>::new())
        .reconcile_on(rebalanced_rx)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, reconciler)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::trace!(gateway = %obj, "reconcile done"),
                Err(e) => tracing::debug!("controller: {e}"),
            }
        })
        .await;
    rebalancer.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(autoscaling: bool, generation: i64, managers: serde_json::Value) -> Observed {
        let mut gw: WebsocketGateway =
            serde_yaml::from_str(include_str!("../tests/fixtures/minimal.yaml")).expect("fixture");
        if autoscaling {
            gw.spec.replicas = None;
            gw.spec.autoscaling = Some(
                serde_json::from_value(
                    json!({ "minReplicas": 2, "maxReplicas": 4, "targetConnectionsPerPod": 100 }),
                )
                .expect("autoscaling"),
            );
        }
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": { "name": "ticker", "generation": generation, "managedFields": managers },
            "spec": { "replicas": 2, "selector": {}, "template": {} }
        }))
        .expect("deployment");
        Observed {
            gateway: Arc::new(gw),
            secrets: Default::default(),
            deployment: Some(Arc::new(deployment)),
            hpa: None,
            missing: Vec::new(),
            connections: 0,
            relays: Vec::new(),
            shedding: 0,
        }
    }

    /// At rest (nothing changed since the last apply) a reconcile refreshes the status only;
    /// a spec change, a Deployment edited by someone, a deleted child, a pending replica
    /// handover or the slow resync re-apply.
    #[test]
    fn only_a_change_or_the_slow_resync_re_applies() {
        let o = observed(false, 3, json!([]));
        let last = Applied {
            fingerprint: fingerprint(&o),
            deployment_generation: 3,
            deployment_replicas: Some(2),
            at: Instant::now(),
        };
        assert!(!needs_apply(&o, Some(&last)));
        let mut service_deleted = observed(false, 3, json!([]));
        service_deleted.missing = vec!["Service"];
        assert!(needs_apply(&service_deleted, Some(&last)));
        assert!(needs_apply(&o, None));
        assert!(needs_apply(&observed(false, 4, json!([])), Some(&last)));
        let mut gone = observed(false, 3, json!([]));
        gone.deployment = None;
        assert!(needs_apply(&gone, Some(&last)));
        let mut edited = observed(false, 3, json!([]));
        Arc::make_mut(&mut edited.gateway).metadata.generation = Some(9);
        assert!(needs_apply(&edited, Some(&last)));
        let stale = Applied {
            at: Instant::now() - FULL_APPLY_EVERY,
            ..Applied {
                fingerprint: fingerprint(&o),
                deployment_generation: 3,
                deployment_replicas: Some(2),
                at: Instant::now(),
            }
        };
        assert!(needs_apply(&o, Some(&stale)));
        // Autoscaling on, the HPA missing: apply. The replica count still applied by the
        // operator: apply (the handover).
        let auto = observed(true, 3, json!([]));
        let last_auto = Applied {
            fingerprint: fingerprint(&auto),
            deployment_generation: 3,
            deployment_replicas: Some(1),
            at: Instant::now(),
        };
        assert!(needs_apply(&auto, Some(&last_auto)));
        // With its HPA: the HPA scaling (a newer generation, another count) is no edit.
        let mut scaled = observed(true, 4, json!([]));
        scaled.hpa = Some(Arc::new(
            serde_json::from_value(json!({ "spec": { "maxReplicas": 4, "scaleTargetRef": { "kind": "Deployment", "name": "ticker" } } }))
                .expect("hpa"),
        ));
        assert!(!needs_apply(&scaled, Some(&last_auto)));
        let owned = observed(
            true,
            3,
            json!([{ "manager": MANAGER, "operation": "Apply", "fieldsType": "FieldsV1",
                     "fieldsV1": { "f:spec": { "f:replicas": {} } } }]),
        );
        assert!(needs_apply(&owned, Some(&last_auto)));
    }

    #[test]
    fn failures_before_the_retry_is_due_are_the_same_try() {
        let t0 = Instant::now();
        let (n, due) = next_try(None, t0);
        assert_eq!((n, due), (1, t0 + Duration::from_secs(2)));
        // An event woke the reconcile 1 s later, and it failed again: still try 1.
        let (n, due) = next_try(Some((n, due)), t0 + Duration::from_secs(1));
        assert_eq!((n, due), (1, t0 + Duration::from_secs(3)));
        // The retry itself failed: try 2, 4 s.
        let (n, due) = next_try(Some((n, due)), due);
        assert_eq!((n, due), (2, t0 + Duration::from_secs(7)));
    }

    /// Secrets are not watched: a gateway failing on a Secret is looked at again within
    /// SECRET_RECHECK however long its backoff has grown, so a fixed Secret is noticed;
    /// other failures keep their backoff.
    #[test]
    fn a_gateway_failing_on_its_secrets_is_rechecked_within_the_resync() {
        let missing = Error::Validate(crate::validate::ValidateError::SecretNotFound {
            name: "chat-nats".into(),
        });
        assert_eq!(retry_delay(&missing, MAX_BACKOFF), SECRET_RECHECK);
        assert_eq!(retry_delay(&missing, BASE_BACKOFF), BASE_BACKOFF);
        assert!(SECRET_RECHECK <= RESYNC);
        let transient = Error::CachesNotReady(Duration::from_secs(10));
        assert_eq!(retry_delay(&transient, MAX_BACKOFF), MAX_BACKOFF);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff_for(1), Duration::from_secs(2));
        assert_eq!(backoff_for(2), Duration::from_secs(4));
        assert_eq!(backoff_for(5), Duration::from_secs(32));
        assert_eq!(backoff_for(9), MAX_BACKOFF);
        assert_eq!(backoff_for(u32::MAX), MAX_BACKOFF);
    }
}
