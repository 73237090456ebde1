//! The apply stage: server-side apply of every desired object with one field manager, then
//! removal of children that are no longer desired.

use std::fmt::Debug;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::core::NamespaceResourceScope;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::build::{
    Desired, HANDOVER_MANAGER, INSTANCE_LABEL, MANAGED_BY_LABEL, MANAGER, replicas_handover,
};
use crate::error::Error;

/// Applies every object of `desired` and deletes what is no longer desired. `live` is the
/// Deployment as last seen (None: not created yet), for the replica handover. Returns the
/// Deployment as the API server stored it, for the status stage.
///
/// The replica count changes hands without a jump either way:
/// - autoscaling switched on: a second field manager first claims the live `spec.replicas`
///   ([`replicas_handover`]), so dropping it from our apply leaves the count alone until the
///   HPA scales (without that the Deployment fell back to 1 replica);
/// - autoscaling switched off: the HPA is deleted before the Deployment gets its fixed
///   count, so the HPA cannot scale it once more in between.
pub async fn apply(
    client: &Client,
    desired: &Desired,
    owner_uid: &str,
    live: Option<&Deployment>,
) -> Result<Deployment, Error> {
    let d = desired;
    let namespace = d.deployment.namespace().unwrap_or_default();
    let instance = d.deployment.name_any();
    ssa(client, &d.service_account).await?;
    // The ConfigMap goes before the Deployment, so new pods never start without their config.
    ssa(client, &d.config_map).await?;
    // Every other child always exists under the gateway's own name; only the HPA comes
    // and goes with spec.autoscaling.
    if d.hpa.is_none() {
        sweep::<HorizontalPodAutoscaler>(client, &namespace, &instance, owner_uid).await?;
    }
    if let Some(handover) = replicas_handover(&d.deployment, live) {
        tracing::info!(deployment = %instance, %namespace, replicas = ?handover["spec"]["replicas"], "handing spec.replicas over to the HorizontalPodAutoscaler");
        Api::<Deployment>::namespaced(client.clone(), &namespace)
            .patch(
                &instance,
                &PatchParams::apply(HANDOVER_MANAGER).force(),
                &Patch::Apply(&handover),
            )
            .await
            .map_err(|source| Error::Apply {
                kind: "Deployment",
                name: instance.clone(),
                source,
            })?;
    }
    let deployment = ssa(client, &d.deployment).await?;
    ssa(client, &d.service).await?;
    ssa(client, &d.pdb).await?;
    ssa(client, &d.network_policy).await?;
    if let Some(hpa) = &d.hpa {
        ssa(client, hpa).await?;
    }
    Ok(deployment)
}

/// Server-side apply with our field manager. `force` takes over fields another manager set
/// (someone's `kubectl edit`): the gateway spec is the source of truth.
async fn ssa<K>(client: &Client, obj: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let name = obj.name_any();
    let api = Api::<K>::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(|source| Error::Apply {
        kind: kind_name::<K>(),
        name,
        source,
    })
}

/// Deletes every `K` this operator made for the gateway (by label and owner uid).
async fn sweep<K>(
    client: &Client,
    namespace: &str,
    instance: &str,
    owner_uid: &str,
) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api = Api::<K>::namespaced(client.clone(), namespace);
    let selector = format!("{INSTANCE_LABEL}={instance},{MANAGED_BY_LABEL}={MANAGER}");
    let cleanup = |source| Error::Cleanup {
        kind: kind_name::<K>(),
        source,
    };
    let list = api
        .list_metadata(&ListParams::default().labels(&selector))
        .await
        .map_err(cleanup)?;
    for obj in list.items {
        let ours = obj.owner_references().iter().any(|o| o.uid == owner_uid);
        if !ours {
            continue;
        }
        match api
            .delete(&obj.name_any(), &DeleteParams::background())
            .await
        {
            Ok(_) => {
                tracing::info!(kind = kind_name::<K>(), name = %obj.name_any(), "deleted object no longer desired")
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(cleanup(e)),
        }
    }
    Ok(())
}

fn kind_name<K: Resource<DynamicType = ()>>() -> &'static str {
    // Kinds of k8s-openapi types are static strings; `kind(&())` returns a Cow of one.
    match K::kind(&()) {
        std::borrow::Cow::Borrowed(s) => s,
        std::borrow::Cow::Owned(_) => "object",
    }
}
