//! The fetch stage: everything a reconcile looks at, gathered into one [`Observed`] value.
//! Only this stage and [`crate::apply`] talk to the outside (the API server and the relays'
//! `/metrics`); validate, build and status are pure functions of what it returns.
//!
//! Most of it comes from the controller's watch caches ([`Caches`]): the relay Deployment,
//! the HPA, the relay pods, the metadata of the other children. The few Secrets a gateway
//! names are read with a GET on every reconcile, in the gateway's namespace: Secrets are
//! not watched, because a watch needs `list` and `watch` on every Secret the operator may
//! see (RBAC cannot narrow them to metadata), while a GET needs only `get`, and only the
//! Secrets named are ever asked for. The periodic resync ([`crate::controller::RESYNC`])
//! is what notices a rotated Secret.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};

use crate::api::WebsocketGateway;
use crate::build::selector_labels;
use crate::error::Error;
use crate::metrics_api::scrape::{self, Scraper};
use crate::validate::secret_names;

/// The controller's watch caches (reflector stores), filled by the watches that also
/// trigger reconciles.
#[derive(Clone)]
pub struct Caches {
    /// Relay Deployments (label `app.kubernetes.io/managed-by=wsrelay-operator`).
    pub deployments: Store<Deployment>,
    /// The HPAs of autoscaled gateways (same label).
    pub hpas: Store<HorizontalPodAutoscaler>,
    /// Relay pods (same label), for the connection total.
    pub pods: Store<Pod>,
    /// Metadata of the other children.
    pub children: Children,
}

/// Metadata of the children every gateway has besides its Deployment (same label).
#[derive(Clone)]
pub struct Children {
    pub config_maps: Store<PartialObjectMeta<ConfigMap>>,
    pub services: Store<PartialObjectMeta<Service>>,
    pub service_accounts: Store<PartialObjectMeta<ServiceAccount>>,
    pub pdbs: Store<PartialObjectMeta<PodDisruptionBudget>>,
    pub network_policies: Store<PartialObjectMeta<NetworkPolicy>>,
}

impl std::fmt::Debug for Children {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Children")
            .field("services", &self.services.len())
            .finish_non_exhaustive()
    }
}

impl Children {
    /// The kinds of the children named `name` in `namespace` that do not exist.
    fn missing(&self, namespace: &str, name: &str) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if self
            .config_maps
            .get(&ObjectRef::new(name).within(namespace))
            .is_none()
        {
            missing.push("ConfigMap");
        }
        if self
            .services
            .get(&ObjectRef::new(name).within(namespace))
            .is_none()
        {
            missing.push("Service");
        }
        if self
            .service_accounts
            .get(&ObjectRef::new(name).within(namespace))
            .is_none()
        {
            missing.push("ServiceAccount");
        }
        if self
            .pdbs
            .get(&ObjectRef::new(name).within(namespace))
            .is_none()
        {
            missing.push("PodDisruptionBudget");
        }
        if self
            .network_policies
            .get(&ObjectRef::new(name).within(namespace))
            .is_none()
        {
            missing.push("NetworkPolicy");
        }
        missing
    }
}

/// How long a reconcile waits for the caches' first list.
const READY_WAIT: Duration = Duration::from_secs(10);

impl Caches {
    /// Waits (at most [`READY_WAIT`]) until every cache has listed once: right after a
    /// start, an empty cache would read as "no Deployment", and the replica handover, which
    /// needs the live Deployment, would be skipped.
    pub(crate) async fn ready(&self) -> Result<(), Error> {
        let all = async {
            let c = &self.children;
            let _ = futures::join!(
                self.deployments.wait_until_ready(),
                self.hpas.wait_until_ready(),
                self.pods.wait_until_ready(),
                c.config_maps.wait_until_ready(),
                c.services.wait_until_ready(),
                c.service_accounts.wait_until_ready(),
                c.pdbs.wait_until_ready(),
                c.network_policies.wait_until_ready(),
            );
        };
        tokio::time::timeout(READY_WAIT, all)
            .await
            .map_err(|_| Error::CachesNotReady(READY_WAIT))
    }
}

impl std::fmt::Debug for Caches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caches")
            .field("deployments", &self.deployments.len())
            .field("hpas", &self.hpas.len())
            .field("pods", &self.pods.len())
            .field("children", &self.children)
            .finish()
    }
}

/// Everything one reconcile of one gateway looks at.
#[derive(Debug, Clone)]
pub struct Observed {
    /// The gateway as the watch cache has it.
    pub gateway: Arc<WebsocketGateway>,
    /// The Secrets it names; `None` for one that does not exist.
    pub secrets: BTreeMap<String, Option<Secret>>,
    /// Its relay Deployment (None: not created yet, or deleted by someone).
    pub deployment: Option<Arc<Deployment>>,
    /// Its HPA.
    pub hpa: Option<Arc<HorizontalPodAutoscaler>>,
    /// The kinds of its other children that do not exist (deleted by someone).
    pub missing: Vec<&'static str>,
    /// Open connections summed over the running relay pods that answered their scrape.
    pub connections: i64,
    /// What the running relay pods that answered report about themselves, by pod name.
    pub relays: Vec<(String, scrape::Report)>,
    /// Relay pods not Ready because they shed connections for a rebalance round (they
    /// report `wsrelay_rebalancing 1`): unready on purpose, for the round only.
    pub shedding: i32,
}

/// Gathers what the reconcile of `gw` needs.
pub async fn observe(
    client: &Client,
    caches: &Caches,
    scraper: &Scraper,
    gw: Arc<WebsocketGateway>,
) -> Result<Observed, Error> {
    caches.ready().await?;
    let namespace = gw.namespace().unwrap_or_default();
    let name = gw.name_any();
    let secrets = secrets(client, &namespace, &secret_names(&gw)).await?;
    let deployment = caches
        .deployments
        .get(&ObjectRef::new(&name).within(&namespace));
    let hpa = caches.hpas.get(&ObjectRef::new(&name).within(&namespace));
    let missing = caches.children.missing(&namespace, &name);
    let pods = gateway_pods(&caches.pods, &namespace, &name);
    let targets = scrape::targets(&pods);
    let relays = scraper.reports(&targets).await;
    let connections = relays.iter().map(|(_, r)| r.connections).sum();
    let shedding = crate::rebalance::observe::pod_views(&pods, &relays)
        .iter()
        .filter(|p| p.shedding && !p.ready)
        .count();
    Ok(Observed {
        gateway: gw,
        secrets,
        deployment,
        hpa,
        missing,
        connections,
        relays,
        shedding: i32::try_from(shedding).unwrap_or(i32::MAX),
    })
}

/// The relay pods of gateway `name` in `namespace`, from the pod cache (by its selector
/// labels).
pub fn gateway_pods(pods: &Store<Pod>, namespace: &str, name: &str) -> Vec<Pod> {
    let selector = selector_labels(name);
    pods.state()
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace))
        .filter(|p| {
            let labels = p.labels();
            selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .map(|p| Pod::clone(p))
        .collect()
}

/// The named Secrets of `namespace`, each read with a GET; `None` for one that does not
/// exist (the validate stage turns that into a user-facing error, a failed request into a
/// transient one).
async fn secrets(
    client: &Client,
    namespace: &str,
    names: &[String],
) -> Result<BTreeMap<String, Option<Secret>>, Error> {
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    let mut out = BTreeMap::new();
    for name in names {
        let secret = api.get_opt(name).await.map_err(|source| Error::Fetch {
            name: format!("Secret {name}"),
            source,
        })?;
        out.insert(name.clone(), secret);
    }
    Ok(out)
}
