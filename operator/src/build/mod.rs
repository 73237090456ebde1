//! The build stage: from a validated gateway to the objects that should exist.
//!
//! Everything here is pure (no client, no clock, no randomness), so the same gateway always
//! yields the same objects; the golden tests in `operator/tests/golden.rs` pin them down.

mod config;
mod network;
mod scaling;
mod workload;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use kube::api::ObjectMeta;
use kube::core::Resource;

use crate::api::WebsocketGateway;

pub use config::{
    CONFIG_FILE, CONFIG_KEY, config_hash, events_stream, gateway_subject, registry_bucket,
    relay_config, relay_control, relay_events, relay_registry, render_config, secret_path,
};
pub use scaling::{CONNECTIONS_METRIC, HANDOVER_MANAGER, applies_replicas, replicas_handover};

/// The field manager of every server-side apply the operator makes.
pub const MANAGER: &str = "wsrelay-operator";
/// Label naming the gateway an object belongs to.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// Label marking objects this operator manages (the orphan sweep lists by it).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Pod-template annotation carrying the hash of the relay config, so a config change rolls
/// the pods (the relay would otherwise keep running the old config).
pub const CONFIG_HASH_ANNOTATION: &str = "wsrelay.dev/config-hash";
/// Container port of the WebSocket listener.
pub const CLIENT_PORT: i32 = 8080;
/// Container port of the admin listener (`/live`, `/ready`, `/metrics`).
pub const ADMIN_PORT: i32 = 9090;
/// HTTP path of the WebSocket endpoint.
pub const WS_PATH: &str = "/ws";
/// Seconds the pod gets beyond the drain grace period, so the kubelet never kills a relay
/// that is still letting its clients go.
pub const TERMINATION_SLACK_SECONDS: i64 = 15;

/// Why the desired objects could not be built. Only a bug or a spec the API server should
/// have refused leads here.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The gateway lacks its name, namespace or uid (it was never stored by the API server).
    #[error("gateway has no {0}")]
    MissingMetadata(&'static str),
    /// The relay config could not be serialised.
    #[error("rendering the relay config: {0}")]
    RenderConfig(#[from] serde_json::Error),
    /// The relay refuses the config the spec maps to.
    #[error("the relay would refuse this config: {0}")]
    InvalidConfig(#[from] wsrelay_config::ValidationErrors),
}

/// Every object a gateway should have. `hpa` is absent when autoscaling is off; the apply
/// stage deletes an HPA left from before.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub service_account: ServiceAccount,
    pub config_map: ConfigMap,
    pub deployment: Deployment,
    pub service: Service,
    pub hpa: Option<HorizontalPodAutoscaler>,
    pub pdb: PodDisruptionBudget,
    pub network_policy: NetworkPolicy,
}

impl Desired {
    /// The objects as YAML documents, in apply order (for golden files and `kubectl diff`).
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        let mut docs = vec![
            serde_yaml::to_string(&self.service_account)?,
            serde_yaml::to_string(&self.config_map)?,
            serde_yaml::to_string(&self.deployment)?,
            serde_yaml::to_string(&self.service)?,
        ];
        if let Some(hpa) = &self.hpa {
            docs.push(serde_yaml::to_string(hpa)?);
        }
        docs.push(serde_yaml::to_string(&self.pdb)?);
        docs.push(serde_yaml::to_string(&self.network_policy)?);
        Ok(docs
            .into_iter()
            .map(|d| format!("---\n{d}"))
            .collect::<String>())
    }
}

/// What the build needs beside the gateway: a digest of the Secrets it reads and facts of
/// this installation of the operator.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    /// From [`crate::validate::restart_secrets_digest`]: joins the config in the pod
    /// template's hash, so that rotating a Secret the relay reads only at start rolls the
    /// relays. Empty: none.
    pub restart_digest: String,
    /// Who may reach the relays' unauthenticated admin port (`/metrics`, `/ready`): the
    /// operator's own pods (it scrapes the connection count) and the monitoring the
    /// installation names (operator flag `--relay-admin-peers`, chart value
    /// `relayAdminAccess.from`). Empty: nobody but the node (kubelet probes, which a
    /// NetworkPolicy cannot block).
    pub admin_peers: Vec<NetworkPolicyPeer>,
}

/// Builds every desired object of `gw` with default [`Options`].
pub fn build(gw: &WebsocketGateway) -> Result<Desired, BuildError> {
    build_with(gw, &Options::default())
}

/// Builds every desired object of `gw`.
pub fn build_with(gw: &WebsocketGateway, options: &Options) -> Result<Desired, BuildError> {
    let ctx = Ctx::new(gw)?;
    let config = relay_config(&gw.spec, &ctx.namespace, &ctx.name);
    config.validate()?;
    let rendered = render_config(&config)?;
    let restart_digest = &options.restart_digest;
    let hash = if restart_digest.is_empty() {
        config_hash(&rendered)
    } else {
        config_hash(&format!("{rendered}\n# secrets {restart_digest}"))
    };
    Ok(Desired {
        service_account: workload::service_account(&ctx),
        config_map: workload::config_map(&ctx, rendered),
        deployment: workload::deployment(&ctx, gw, &hash),
        service: network::service(&ctx, gw),
        hpa: scaling::hpa(&ctx, gw),
        pdb: scaling::pdb(&ctx),
        network_policy: network::network_policy(&ctx, &options.admin_peers),
    })
}

/// The name every child object of the gateway shares.
pub fn child_name(gw: &WebsocketGateway) -> String {
    gw.name_any()
}

/// The labels that select a gateway's relay pods.
pub fn selector_labels(gw_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "wsrelay".to_string()),
        (INSTANCE_LABEL.to_string(), gw_name.to_string()),
    ])
}

/// The label selector of a gateway's relay pods as a string (status.selector).
pub fn selector_string(gw_name: &str) -> String {
    selector_labels(gw_name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Where clients connect: the Service's cluster DNS name.
pub fn endpoint(gw: &WebsocketGateway) -> Option<String> {
    let ns = gw.namespace()?;
    let scheme = if gw.spec.tls.is_some() { "wss" } else { "ws" };
    Some(format!(
        "{scheme}://{}.{ns}.svc:{}{WS_PATH}",
        child_name(gw),
        gw.spec.service.port
    ))
}

/// What every builder needs: names, labels and the owner reference.
pub(crate) struct Ctx {
    pub name: String,
    pub namespace: String,
    pub owner: k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
}

impl Ctx {
    fn new(gw: &WebsocketGateway) -> Result<Self, BuildError> {
        let namespace = gw
            .metadata
            .namespace
            .clone()
            .ok_or(BuildError::MissingMetadata("namespace"))?;
        if gw.metadata.name.is_none() {
            return Err(BuildError::MissingMetadata("name"));
        }
        let mut owner = gw
            .controller_owner_ref(&())
            .ok_or(BuildError::MissingMetadata("uid"))?;
        // Foreground deletion of the gateway waits for its children (needs RBAC `update` on
        // websocketgateways/finalizers where OwnerReferencesPermissionEnforcement is on).
        owner.block_owner_deletion = Some(true);
        Ok(Self {
            name: child_name(gw),
            namespace,
            owner,
        })
    }

    /// Labels on every child object: the selector labels plus the manager.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = selector_labels(&self.name);
        labels.insert(
            "app.kubernetes.io/component".to_string(),
            "relay".to_string(),
        );
        labels.insert(MANAGED_BY_LABEL.to_string(), MANAGER.to_string());
        labels
    }

    /// Metadata of a child object: same name and namespace as the gateway, our labels, and
    /// the gateway as controlling owner (so the garbage collector removes it with the gateway).
    pub fn meta(&self) -> ObjectMeta {
        ObjectMeta {
            name: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels()),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// Deserialises an object the builders wrote as JSON (it reads like the YAML it becomes).
/// Every builder path is covered by the golden tests, so a mistake here fails a test, never
/// a reconcile.
fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).expect("builder JSON matches the Kubernetes type")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway() -> WebsocketGateway {
        serde_yaml::from_str(include_str!("../../tests/fixtures/minimal.yaml"))
            .expect("fixture parses")
    }

    #[test]
    fn the_restart_digest_changes_the_pod_template_and_nothing_else() {
        let gw = gateway();
        let plain = build(&gw).expect("builds");
        let rotated = build_with(
            &gw,
            &Options {
                restart_digest: "0123456789abcdef".into(),
                ..Options::default()
            },
        )
        .expect("builds");
        let annotations = |d: &Desired| {
            d.deployment
                .spec
                .template
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.clone())
                .unwrap_or_default()
        };
        assert_ne!(annotations(&plain), annotations(&rotated));
        assert_eq!(plain.config_map, rotated.config_map);
        assert_eq!(plain.service, rotated.service);
        assert_eq!(
            build_with(&gw, &Options::default())
                .expect("builds")
                .deployment,
            plain.deployment
        );
    }

    /// What anyone with the built-in `view` role reads (the Deployment's pod-template
    /// annotation, every other child) holds nothing derived from Secret data: the same
    /// objects whatever the NATS password, other objects when the Secret's version moves.
    #[test]
    fn the_built_objects_depend_on_secret_versions_never_on_secret_data() {
        use k8s_openapi::ByteString;
        use k8s_openapi::api::core::v1::Secret;
        use std::collections::BTreeMap;

        let gw: WebsocketGateway =
            serde_yaml::from_str(include_str!("../../tests/fixtures/full.yaml")).expect("fixture");
        let names = crate::validate::secret_names(&gw);
        let secrets = |version: &str, value: &str| -> BTreeMap<String, Option<Secret>> {
            let keys = ["token", "ca.crt", "tls.crt", "tls.key", "hmac"];
            names
                .iter()
                .map(|name| {
                    let secret: Secret = serde_json::from_value(serde_json::json!({
                        "metadata": { "name": name, "uid": format!("uid-{name}"), "resourceVersion": version },
                    }))
                    .expect("secret");
                    let data = keys
                        .iter()
                        .map(|k| (k.to_string(), ByteString(value.as_bytes().to_vec())))
                        .collect();
                    (name.clone(), Some(Secret { data: Some(data), ..secret }))
                })
                .collect()
        };
        let built = |secrets: &BTreeMap<String, Option<Secret>>| {
            let options = Options {
                restart_digest: crate::validate::restart_secrets_digest(&gw, secrets),
                ..Options::default()
            };
            build_with(&gw, &options)
                .expect("builds")
                .to_yaml()
                .expect("yaml")
        };
        let hunter = built(&secrets("41", "hunter2-hunter2-hunter2-hunter2-x"));
        let other = built(&secrets("41", "correct-horse-battery-staple-0000"));
        assert_eq!(hunter, other, "the built objects depend on Secret data");
        assert!(
            !hunter.contains("hunter2"),
            "Secret data in the built objects"
        );
        let rotated = built(&secrets("42", "hunter2-hunter2-hunter2-hunter2-x"));
        assert_ne!(hunter, rotated, "a new Secret version must roll the relays");
        let annotation = |yaml: &str| {
            yaml.lines()
                .find(|l| l.contains(CONFIG_HASH_ANNOTATION))
                .map(str::to_string)
        };
        assert!(annotation(&hunter).is_some());
        assert_ne!(annotation(&hunter), annotation(&rotated));
    }

    #[test]
    fn every_child_is_owned_by_the_gateway() {
        let d = build(&gateway()).expect("builds");
        let metas = [
            &d.service_account.metadata,
            &d.config_map.metadata,
            &d.deployment.metadata,
            &d.service.metadata,
            &d.pdb.metadata,
            &d.network_policy.metadata,
        ];
        for meta in metas {
            let owners = meta.owner_references.as_ref().expect("owner refs");
            assert_eq!(owners.len(), 1);
            assert_eq!(owners[0].kind, "WebsocketGateway");
            assert_eq!(owners[0].controller, Some(true));
        }
    }

    #[test]
    fn a_gateway_without_uid_is_refused() {
        let mut gw = gateway();
        gw.metadata.uid = None;
        assert!(matches!(
            build(&gw),
            Err(BuildError::MissingMetadata("uid"))
        ));
    }

    #[test]
    fn selector_string_lists_the_selector_labels() {
        assert_eq!(
            selector_string("chat"),
            "app.kubernetes.io/instance=chat,app.kubernetes.io/name=wsrelay"
        );
    }
}
