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

use crate::build::{Desired, INSTANCE_LABEL, MANAGED_BY_LABEL, MANAGER};
use crate::error::Error;

/// Applies every object of `desired` and deletes what is no longer desired. Returns the
/// Deployment as the API server stored it, for the status stage.
pub async fn apply(
    client: &Client,
    desired: &Desired,
    owner_uid: &str,
) -> Result<Deployment, Error> {
    let d = desired;
    ssa(client, &d.service_account).await?;
    // The ConfigMap goes before the Deployment, so new pods never start without their config.
    ssa(client, &d.config_map).await?;
    let deployment = ssa(client, &d.deployment).await?;
    ssa(client, &d.service).await?;
    ssa(client, &d.pdb).await?;
    ssa(client, &d.network_policy).await?;
    let namespace = d.deployment.namespace().unwrap_or_default();
    let instance = d.deployment.name_any();
    match &d.hpa {
        Some(hpa) => {
            ssa(client, hpa).await?;
        }
        // Every other child always exists under the gateway's own name; only the HPA comes
        // and goes with spec.autoscaling.
        None => {
            sweep::<HorizontalPodAutoscaler>(client, &namespace, &instance, owner_uid).await?;
        }
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
