//! The controller: watches gateways, their children and the Secrets they use, and runs the
//! pipeline fetch -> validate -> build -> apply -> status for each gateway that changed.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::api::WebsocketGateway;
use crate::build::{MANAGED_BY_LABEL, MANAGER, build_with};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::status::{self, Degradation};
use crate::validate::{restart_secrets_digest, secret_names, validate};
use crate::{apply, fetch};

/// A gateway whose spec and Secrets are unchanged is fully re-applied at least this often,
/// which bounds how long a child someone edited or deleted stays wrong.
const FULL_APPLY_EVERY: Duration = Duration::from_secs(60);

/// The last full apply of one gateway.
#[derive(Debug)]
struct Applied {
    /// uid, generation and the resourceVersions of the Secrets it used.
    fingerprint: String,
    at: Instant,
}

/// What a full apply depends on: the gateway's identity and spec generation, and the
/// versions of the Secrets it reads.
fn fingerprint(
    gw: &WebsocketGateway,
    secrets: &std::collections::BTreeMap<String, Option<k8s_openapi::api::core::v1::Secret>>,
) -> String {
    let mut f = format!(
        "{}/{}",
        gw.uid().unwrap_or_default(),
        gw.metadata.generation.unwrap_or(0)
    );
    for (name, secret) in secrets {
        let version = secret
            .as_ref()
            .and_then(|s| s.metadata.resource_version.as_deref())
            .unwrap_or("-");
        f.push_str(&format!(" {name}@{version}"));
    }
    f
}

/// How often a healthy gateway is reconciled even when nothing changed (drift repair).
const RESYNC: Duration = Duration::from_secs(60);
/// First retry after a failure; doubles per consecutive failure up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per gateway, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// What was last fully applied per gateway, so that the reconciles its children's
    /// status updates trigger (the Deployment, HPA and PDB controllers write status several
    /// times per rollout) cost a status refresh, not a full server-side apply.
    applied: Mutex<HashMap<String, Applied>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: MANAGER.to_string(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            failures: Mutex::new(HashMap::new()),
            applied: Mutex::new(HashMap::new()),
        }
    }

    fn key(gw: &WebsocketGateway) -> String {
        format!("{}/{}", gw.namespace().unwrap_or_default(), gw.name_any())
    }

    /// Records one more failure and returns how long to wait before the next try.
    fn backoff(&self, gw: &WebsocketGateway) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(Self::key(gw)).or_insert(0);
        *n = n.saturating_add(1);
        backoff_for(*n)
    }

    /// Whether `fingerprint` was fully applied less than [`FULL_APPLY_EVERY`] ago.
    fn recently_applied(&self, gw: &WebsocketGateway, fingerprint: &str) -> bool {
        let applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        applied
            .get(&Self::key(gw))
            .is_some_and(|a| a.fingerprint == fingerprint && a.at.elapsed() < FULL_APPLY_EVERY)
    }

    fn record_applied(&self, gw: &WebsocketGateway, fingerprint: Option<String>) {
        let mut applied = self.applied.lock().unwrap_or_else(|p| p.into_inner());
        match fingerprint {
            Some(fingerprint) => {
                applied.insert(
                    Self::key(gw),
                    Applied {
                        fingerprint,
                        at: Instant::now(),
                    },
                );
            }
            None => {
                applied.remove(&Self::key(gw));
            }
        }
    }

    fn succeeded(&self, gw: &WebsocketGateway) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(&Self::key(gw));
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

async fn reconcile(gw: Arc<WebsocketGateway>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    // Work from a fresh read, not the watch cache: right after an API server restart a
    // watch can lag (410 Gone and relists) for minutes, and a reconcile of a stale spec
    // would look like success. One GET per reconcile buys convergence within RESYNC.
    let api = Api::<WebsocketGateway>::namespaced(
        ctx.client.clone(),
        &gw.namespace().unwrap_or_default(),
    );
    let gw = match api.get_opt(&gw.name_any()).await {
        Ok(Some(fresh)) => Arc::new(fresh),
        Ok(None) => return Ok(Action::await_change()),
        Err(source) => {
            let e = Error::Fetch {
                name: format!("WebsocketGateway {}", gw.name_any()),
                source,
            };
            ctx.metrics.failed(e.category());
            return Err(e);
        }
    };
    let result = pipeline(&gw, &ctx).await;
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(_) => {
            ctx.succeeded(&gw);
            tracing::debug!(gateway = %Context::key(&gw), elapsed = ?started.elapsed(), "reconciled");
        }
        Err(e) => {
            ctx.metrics.failed(e.category());
            if e.is_user_error() {
                report_user_error(&gw, &ctx, e).await;
            }
        }
    }
    result
}

/// fetch -> validate -> build -> apply -> status.
async fn pipeline(gw: &WebsocketGateway, ctx: &Context) -> Result<Action, Error> {
    // A gateway being deleted is the garbage collector's business: applying children now
    // would only re-create what it is removing.
    if gw.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = gw.namespace().unwrap_or_default();
    let secrets = fetch::secrets(&ctx.client, &namespace, &secret_names(gw)).await?;
    if let Err(e) = validate(gw, &secrets) {
        ctx.record_applied(gw, None);
        return Err(e.into());
    }
    let fingerprint = fingerprint(gw, &secrets);
    if ctx.recently_applied(gw, &fingerprint) {
        // Nothing the children depend on changed: refresh the status only. A missing
        // Deployment means someone deleted it: fall through to a full apply.
        let deployment = Api::<Deployment>::namespaced(ctx.client.clone(), &namespace)
            .get_opt(&gw.name_any())
            .await
            .map_err(|source| Error::Fetch {
                name: format!("Deployment {}", gw.name_any()),
                source,
            })?;
        if let Some(deployment) = deployment {
            let status = status::compute(gw, Some(&deployment), None, &now());
            write_status(&ctx.client, gw, status).await?;
            return Ok(Action::requeue(RESYNC));
        }
    }
    ctx.record_applied(gw, None);
    let desired = build_with(gw, &restart_secrets_digest(gw, &secrets))?;
    let uid = gw.uid().unwrap_or_default();
    let deployment = apply::apply(&ctx.client, &desired, &uid).await?;
    ctx.record_applied(gw, Some(fingerprint));
    let was_degraded = status::is_degraded(gw);
    let status = status::compute(gw, Some(&deployment), None, &now());
    write_status(&ctx.client, gw, status).await?;
    if was_degraded {
        publish(
            ctx,
            gw,
            EventType::Normal,
            "Recovered",
            "the gateway's spec and Secrets are usable again".into(),
        )
        .await;
    }
    Ok(Action::requeue(RESYNC))
}

/// A person must act: say so in the Degraded condition and in an Event.
async fn report_user_error(gw: &WebsocketGateway, ctx: &Context, e: &Error) {
    tracing::warn!(gateway = %Context::key(gw), reason = e.category(), "{e}");
    let degradation = Degradation {
        reason: e.category().to_string(),
        message: e.to_string(),
    };
    // Keep reporting the Deployment that runs (it still serves with the previous config).
    let namespace = gw.namespace().unwrap_or_default();
    let deployment = Api::<Deployment>::namespaced(ctx.client.clone(), &namespace)
        .get_opt(&gw.name_any())
        .await
        .ok()
        .flatten();
    let status = status::compute(gw, deployment.as_ref(), Some(&degradation), &now());
    if let Err(err) = write_status(&ctx.client, gw, status).await {
        tracing::warn!(gateway = %Context::key(gw), "could not mark the gateway Degraded: {err}");
    }
    publish(ctx, gw, EventType::Warning, e.category(), e.to_string()).await;
}

async fn publish(
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
    mut status: crate::api::WebsocketGatewayStatus,
) -> Result<(), Error> {
    // The fleet total of open connections, from the relays' own /metrics; the last value
    // stays when the pods cannot be listed.
    let selector = crate::build::selector_string(&gw.name_any());
    let namespace = gw.namespace().unwrap_or_default();
    if let Some(total) = crate::metrics_api::fleet_connections(client, &namespace, &selector).await
    {
        status.connections = total;
    }
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

fn error_policy(gw: Arc<WebsocketGateway>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff(&gw);
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
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    // Plain list+watch, which every API server version serves. After an API server
    // restart these watches may lag (410 Gone, relists with backoff); reconcile() reads
    // the gateway afresh and RESYNC bounds how long a missed event can go unnoticed.
    let base = watcher::Config::default();
    let owned = base
        .clone()
        .labels(&format!("{MANAGED_BY_LABEL}={MANAGER}"));
    let controller = Controller::new(api::<WebsocketGateway>(&client, ns), base.clone())
        // Creating seven children fires seven watch events, and our own status write one more;
        // coalesce a burst into one reconcile.
        .with_config(ControllerConfig::default().debounce(Duration::from_millis(500)));
    let store = controller.store();
    controller
        .owns(api::<Deployment>(&client, ns), owned.clone())
        .owns(api::<ConfigMap>(&client, ns), owned.clone())
        .owns(api::<Service>(&client, ns), owned.clone())
        .owns(api::<ServiceAccount>(&client, ns), owned.clone())
        .owns(api::<HorizontalPodAutoscaler>(&client, ns), owned.clone())
        .owns(api::<PodDisruptionBudget>(&client, ns), owned.clone())
        .owns(api::<NetworkPolicy>(&client, ns), owned)
        // A Secret that appears or changes wakes the gateways that use it, so a gateway
        // Degraded for a missing Secret recovers at once, not at its next backoff.
        .watches(
            api::<Secret>(&client, ns),
            base.clone(),
            move |secret: Secret| {
                let ns = secret.namespace();
                let name = secret.name_any();
                store
                    .state()
                    .into_iter()
                    .filter(|gw| gw.namespace() == ns && secret_names(gw).contains(&name))
                    .map(|gw| ObjectRef::from_obj(gw.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::trace!(gateway = %obj, "reconcile done"),
                Err(e) => tracing::debug!("controller: {e}"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff_for(1), Duration::from_secs(2));
        assert_eq!(backoff_for(2), Duration::from_secs(4));
        assert_eq!(backoff_for(5), Duration::from_secs(32));
        assert_eq!(backoff_for(9), MAX_BACKOFF);
        assert_eq!(backoff_for(u32::MAX), MAX_BACKOFF);
    }
}
