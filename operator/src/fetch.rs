//! The fetch stage: read every object the gateway refers to. Only this stage and
//! [`crate::apply`] talk to the API server.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::error::Error;

/// The named Secrets of `namespace`; `None` for one that does not exist (the validate stage
/// turns that into a user-facing error, a failed request into a transient one).
pub async fn secrets(
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
