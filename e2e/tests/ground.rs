//! Proof that the test ground is a real Kubernetes control plane and a real NATS server:
//! controllers act, garbage collection runs, CEL validation and RBAC are enforced, and NATS
//! delivers messages over both its client port and its WebSocket listener.

use std::time::Duration;

use anyhow::{Context, Result};
use futures::{SinkExt, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams,
};
use kube::runtime::conditions;
use kube::{Api, Client};
use serde_json::json;
use wsrelay_e2e::{eventually, unique_name, wait_for, with_namespace};

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "metadata": { "name": name },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                // No node carries this label, with or without the node tier, so the
                // scheduler has to mark the pods Unschedulable (and nothing pulls the image).
                "spec": {
                    "nodeSelector": { "e2e.wsrelay.dev/no-such-node": "true" },
                    "containers": [{ "name": "main", "image": "example.invalid/none:1" }]
                }
            }
        }
    }))
    .expect("valid Deployment")
}

async fn pods_of(client: &Client, ns: &str, app: &str) -> Result<Vec<Pod>> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    Ok(pods
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await?
        .items)
}

#[tokio::test]
async fn deployment_controller_creates_replicaset_and_pods() -> Result<()> {
    with_namespace("ground-deploy", |client, ns| async move {
        let deploys = Api::<Deployment>::namespaced(client.clone(), &ns);
        deploys
            .create(&PostParams::default(), &deployment("web", 2))
            .await?;

        let rs = eventually("a ReplicaSet owned by the Deployment", || async {
            let list = Api::<ReplicaSet>::namespaced(client.clone(), &ns)
                .list(&ListParams::default())
                .await?;
            Ok(list.items.into_iter().find(|rs| {
                rs.metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.kind == "Deployment" && o.name == "web")
            }))
        })
        .await?;
        assert_eq!(rs.spec.replicas, Some(2));

        // The ReplicaSet controller creates the pods; with no node that matches them the
        // scheduler marks them Unschedulable, which proves it ran.
        let pods = eventually(
            "two pods of the ReplicaSet, seen by the scheduler",
            || async {
                let pods = pods_of(&client, &ns, "web").await?;
                let scheduler_saw_all = pods.iter().all(|pod| {
                    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
                    conditions
                        .into_iter()
                        .flatten()
                        .any(|c| c.type_ == "PodScheduled" && c.status == "False")
                });
                Ok((pods.len() == 2 && scheduler_saw_all).then_some(pods))
            },
        )
        .await?;
        for pod in &pods {
            let scheduled = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .into_iter()
                .flatten();
            let reason = scheduled
                .filter(|c| c.type_ == "PodScheduled")
                .find_map(|c| c.reason.clone());
            assert_eq!(reason.as_deref(), Some("Unschedulable"));
            let owner = &pod
                .metadata
                .owner_references
                .as_ref()
                .expect("pod has an owner")[0];
            assert_eq!(owner.kind, "ReplicaSet");
            assert_eq!(Some(&owner.name), rs.metadata.name.as_ref());
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn deleting_the_owner_garbage_collects_dependents() -> Result<()> {
    with_namespace("ground-gc", |client, ns| async move {
        let deploys = Api::<Deployment>::namespaced(client.clone(), &ns);
        deploys
            .create(&PostParams::default(), &deployment("gc", 1))
            .await?;
        eventually("the pod", || async {
            Ok(pods_of(&client, &ns, "gc").await?.pop())
        })
        .await?;

        // Background propagation: only the garbage collector removes the dependents.
        deploys.delete("gc", &DeleteParams::background()).await?;
        eventually("the ReplicaSet and pod to be garbage-collected", || async {
            let rs = Api::<ReplicaSet>::namespaced(client.clone(), &ns)
                .list(&ListParams::default())
                .await?;
            let pods = pods_of(&client, &ns, "gc").await?;
            Ok((rs.items.is_empty() && pods.is_empty()).then_some(()))
        })
        .await
    })
    .await
}

#[tokio::test]
async fn crd_validation_rule_rejects_bad_object_with_its_message() -> Result<()> {
    with_namespace("ground-cel", |client, ns| async move {
        // A group of its own so parallel runs never share the CRD.
        let group = format!("{}.e2e.wsrelay.dev", unique_name("g"));
        let crd: CustomResourceDefinition = serde_json::from_value(json!({
            "metadata": { "name": format!("ranges.{group}") },
            "spec": {
                "group": group,
                "scope": "Namespaced",
                "names": { "plural": "ranges", "singular": "range", "kind": "Range" },
                "versions": [{
                    "name": "v1", "served": true, "storage": true,
                    "schema": { "openAPIV3Schema": {
                        "type": "object",
                        "properties": { "spec": {
                            "type": "object",
                            "properties": {
                                "min": { "type": "integer" },
                                "max": { "type": "integer" }
                            },
                            "x-kubernetes-validations": [{
                                "rule": "self.min <= self.max",
                                "message": "min must not be greater than max"
                            }]
                        }}
                    }}
                }]
            }
        }))?;
        let crds = Api::<CustomResourceDefinition>::all(client.clone());
        let name = crd.metadata.name.clone().expect("named");
        crds.create(&PostParams::default(), &crd).await?;
        let result = async {
            wait_for(&crds, &name, conditions::is_crd_established()).await?;
            let gvk = GroupVersionKind::gvk(&group, "v1", "Range");
            let api = Api::<DynamicObject>::namespaced_with(
                client.clone(),
                &ns,
                &ApiResource::from_gvk(&gvk),
            );
            let object = |min: i64, max: i64| -> Result<DynamicObject> {
                Ok(serde_json::from_value(json!({
                    "apiVersion": format!("{group}/v1"), "kind": "Range",
                    "metadata": { "name": format!("r{min}-{max}") },
                    "spec": { "min": min, "max": max }
                }))?)
            };
            // Discovery of a just-established CRD can lag a moment: retry until a good object goes in.
            eventually("the CRD to serve objects", || async {
                Ok(api
                    .create(&PostParams::default(), &object(1, 2)?)
                    .await
                    .ok())
            })
            .await?;
            let err = api
                .create(&PostParams::default(), &object(3, 2)?)
                .await
                .expect_err("the API server must refuse min > max");
            let kube::Error::Api(status) = err else {
                panic!("expected an API error, got {err}")
            };
            assert_eq!(status.code, 422, "{status:?}");
            assert!(
                status.message.contains("min must not be greater than max"),
                "message: {}",
                status.message
            );
            Ok::<_, anyhow::Error>(())
        }
        .await;
        crds.delete(&name, &DeleteParams::default()).await?;
        result
    })
    .await
}

#[tokio::test]
async fn rbac_denies_an_unprivileged_service_account() -> Result<()> {
    with_namespace("ground-rbac", |client, ns| async move {
        let sas = Api::<ServiceAccount>::namespaced(client.clone(), &ns);
        let sa: ServiceAccount =
            serde_json::from_value(json!({ "metadata": { "name": "nobody" } }))?;
        sas.create(&PostParams::default(), &sa).await?;

        // A real token, signed by the API server's service-account key, used as the only credential.
        let request: TokenRequest = serde_json::from_value(json!({ "spec": { "audiences": [] } }))?;
        let token = sas
            .create_token_request("nobody", &PostParams::default(), &request)
            .await?
            .status
            .context("token request has a status")?
            .token
            .context("token request returned a token")?;
        let mut config = wsrelay_e2e::config().await?;
        config.auth_info = kube::config::AuthInfo {
            token: Some(token.into()),
            ..Default::default()
        };
        let as_sa = Client::try_from(config)?;

        // Authenticated (it may ask who it is) ...
        let pods = Api::<Pod>::namespaced(as_sa.clone(), &ns);
        let err = pods
            .list(&ListParams::default())
            .await
            .expect_err("RBAC must deny listing pods");
        let kube::Error::Api(status) = err else {
            panic!("expected an API error, got {err}")
        };
        // ... but not authorized: 403 with the service account named, not 401.
        assert_eq!(status.code, 403, "{status:?}");
        assert!(
            status
                .message
                .contains(&format!("system:serviceaccount:{ns}:nobody")),
            "message: {}",
            status.message
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn nats_delivers_a_message() -> Result<()> {
    wsrelay_e2e::init_tracing();
    let nats = async_nats::connect(wsrelay_e2e::nats_url()?).await?;
    let subject = format!("e2e.{}", unique_name("ground"));
    let mut sub = nats.subscribe(subject.clone()).await?;
    nats.flush().await?;
    nats.publish(subject.clone(), "hello".into()).await?;
    let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .context("no message within 10s")?
        .context("subscription ended")?;
    assert_eq!(msg.subject.as_str(), subject);
    assert_eq!(&msg.payload[..], b"hello");

    // JetStream is on: the account info call fails when it is not.
    let js = async_nats::jetstream::new(nats);
    js.query_account()
        .await
        .context("JetStream must be enabled")?;
    Ok(())
}

#[tokio::test]
async fn nats_websocket_listener_relays_to_a_websocket_client() -> Result<()> {
    use tokio_tungstenite::tungstenite::Message;
    wsrelay_e2e::init_tracing();
    let (mut ws, _) = tokio_tungstenite::connect_async(wsrelay_e2e::nats_ws_url()?).await?;
    let next_text = async |ws: &mut tokio_tungstenite::WebSocketStream<_>| -> Result<String> {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .context("timeout")?
            {
                Some(Ok(Message::Text(t))) => return Ok(t.to_string()),
                Some(Ok(Message::Binary(b))) => return Ok(String::from_utf8(b.to_vec())?),
                Some(Ok(_)) => continue,
                other => anyhow::bail!("websocket ended: {other:?}"),
            }
        }
    };
    let info = next_text(&mut ws).await?;
    assert!(info.starts_with("INFO "), "{info}");

    let subject = format!("e2e.{}", unique_name("ws"));
    ws.send(Message::text(format!(
        "CONNECT {{\"verbose\":false}}\r\nSUB {subject} 1\r\nPING\r\n"
    )))
    .await?;
    assert!(next_text(&mut ws).await?.contains("PONG"));

    // Published over the plain client port, received on the WebSocket.
    let nats = async_nats::connect(wsrelay_e2e::nats_url()?).await?;
    nats.publish(subject.clone(), "over-ws".into()).await?;
    nats.flush().await?;
    let mut got = String::new();
    while !got.contains("over-ws") {
        got.push_str(&next_text(&mut ws).await?);
    }
    assert!(got.contains(&format!("MSG {subject} 1 7")), "{got}");
    Ok(())
}
