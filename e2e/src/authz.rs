//! The example authorization backend (examples/authz-backend) on the node, for a gateway whose
//! binding has `authorize.request` (docs/protocol.md section 3): its image, a Deployment of
//! it, and a client that asks for channels through the gateway's Service.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::SinkExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use wsrelay_testkit::client::{Request, read_value};

use crate::repo_root;

/// How long one connect-and-ask attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The backend's image: `E2E_AUTHZ_IMAGE`, else `AUTHZ_EXAMPLE_IMAGE` of images/images.env
/// tagged with the workspace version, as images/build.sh names it (and the node imports it).
pub fn example_image() -> Result<String> {
    if let Ok(image) = std::env::var("E2E_AUTHZ_IMAGE") {
        return Ok(image);
    }
    let path = repo_root().join("images/images.env");
    let env =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let name = env
        .lines()
        .find_map(|l| l.strip_prefix("AUTHZ_EXAMPLE_IMAGE="))
        .with_context(|| format!("no AUTHZ_EXAMPLE_IMAGE= in {}", path.display()))?;
    Ok(format!("{}:{}", name.trim(), env!("CARGO_PKG_VERSION")))
}

/// Creates Deployment `name` of the example backend: one replica serving `subject` for the
/// relays, reaching NATS at `nats_url`, deciding from `rooms` (`alice:1;bob:1,2`). The image
/// is never pulled: there is no registry, the node has it.
pub async fn deploy_backend(
    client: &Client,
    ns: &str,
    name: &str,
    nats_url: &str,
    subject: &str,
    rooms: &str,
) -> Result<()> {
    let labels =
        json!({ "app.kubernetes.io/name": "authz-example", "app.kubernetes.io/instance": name });
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": { "name": name, "labels": labels },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": labels },
            "template": {
                "metadata": { "labels": labels },
                "spec": {
                    "automountServiceAccountToken": false,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "seccompProfile": { "type": "RuntimeDefault" }
                    },
                    "containers": [{
                        "name": "authz",
                        "image": example_image()?,
                        "imagePullPolicy": "Never",
                        "args": ["-subject", subject],
                        "env": [
                            { "name": "NATS_URL", "value": nats_url },
                            { "name": "ROOMS", "value": rooms }
                        ],
                        "resources": {
                            "requests": { "cpu": "10m", "memory": "16Mi" },
                            "limits": { "memory": "64Mi" }
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": { "drop": ["ALL"] }
                        }
                    }]
                }
            }
        }
    }))?;
    Api::<Deployment>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &deployment)
        .await
        .with_context(|| format!("creating Deployment {name}"))?;
    Ok(())
}

/// Connects to `url` (`ws://host:port/ws`) with `token`, subscribes to each of `channels` in
/// turn on that one connection, and returns the replies (`ok` or `error` frames, as sent).
/// An error when the connection is refused or closed, or an attempt takes over 10 s.
pub async fn subscribe_replies(url: &str, token: &str, channels: &[&str]) -> Result<Vec<Value>> {
    tokio::time::timeout(ATTEMPT_TIMEOUT, async {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}?token={token}"))
            .await
            .context("WebSocket handshake")?;
        let welcome = read_value(&mut ws).await?;
        if welcome["type"] != "welcome" {
            bail!("expected welcome, got {welcome}");
        }
        let mut replies = Vec::new();
        for (id, channel) in (1..).zip(channels) {
            ws.send(Message::text(Request::subscribe(id, channel).to_text()))
                .await?;
            let reply = loop {
                let v = read_value(&mut ws).await?;
                if (v["type"] == "ok" || v["type"] == "error") && v["id"] == id {
                    break v;
                }
            };
            replies.push(reply);
        }
        let _ = ws.close(None).await;
        Ok(replies)
    })
    .await
    .context("connect and subscribe timed out")?
}
