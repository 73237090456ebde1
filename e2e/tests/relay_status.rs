//! What a gateway says when its relays cannot do their job, on the local cluster with its
//! node (relay pods must run): a gateway whose NATS URL nothing listens on (a loopback port
//! inside the relay pods) is Degraded with reason `NatsUnreachable`, a message naming the
//! URL and the cause, a Warning Event of that reason, and Ready=False saying why.
//!
//! The CRD is installed from the Helm chart's own copy (charts/wsrelay-operator/crds/).
//! Without a Ready node the test prints why it is SKIPPED, unless `E2E_REQUIRE_NODE=1`.

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use wsrelay_e2e::operator::{Operator, condition, create_gateway, example, install_chart_crd};
use wsrelay_e2e::{eventually, with_namespace};
use wsrelay_operator::api::WebsocketGateway;

/// Inside a relay pod, nothing listens here: every connect is refused at once.
const UNREACHABLE: &str = "nats://127.0.0.1:1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_nats_is_on_the_gateway_status_with_url_and_cause() -> Result<()> {
    let client = wsrelay_e2e::client().await?;
    if let Some(reason) = no_node(&client).await? {
        if std::env::var("E2E_REQUIRE_NODE").is_ok_and(|v| v == "1") {
            bail!("E2E_REQUIRE_NODE=1 but {reason}");
        }
        eprintln!("SKIPPED relay status e2e: {reason} (start one with `make cluster-up NODE=1`)");
        return Ok(());
    }
    with_namespace("natsdown", |client, ns| async move {
        install_chart_crd(&client).await?;
        let _operator = Operator::start(client.clone(), &ns, None);
        let (secrets, mut gw) = example()?;
        let secret_api = Api::<Secret>::namespaced(client.clone(), &ns);
        for s in &secrets {
            secret_api.create(&PostParams::default(), s).await?;
        }
        gw.spec.nats.urls = vec![UNREACHABLE.to_string()];
        gw.spec.autoscaling = None;
        gw.spec.replicas = Some(2);
        let name = gw.metadata.name.clone().unwrap_or_default();
        create_gateway(&client, &ns, &gw).await?;
        let gateways = Api::<WebsocketGateway>::namespaced(client.clone(), &ns);
        let degraded = eventually("Degraded NatsUnreachable on the gateway", || async {
            let gw = gateways.get(&name).await?;
            Ok(condition(&gw, "Degraded")
                .filter(|c| c.status == "True" && c.reason == "NatsUnreachable")
                .cloned()
                .map(|c| (c, gw.clone())))
        })
        .await?;
        let (c, gw) = degraded;
        eprintln!("Degraded: {} {}", c.reason, c.message);
        let want = format!("{UNREACHABLE}: connection refused");
        if !c.message.contains(&want) {
            bail!("the Degraded message does not say {want:?}: {}", c.message);
        }
        let ready = condition(&gw, "Ready").cloned();
        eprintln!("Ready: {ready:?}");
        match ready {
            Some(r) if r.status == "False" && r.message.contains("NatsUnreachable") => {}
            other => bail!("Ready should be False and point at NatsUnreachable: {other:?}"),
        }
        let events = Api::<Event>::namespaced(client.clone(), &ns);
        eventually("a Warning Event NatsUnreachable", || async {
            let list = events.list(&ListParams::default()).await?;
            Ok(list
                .items
                .iter()
                .find(|e| {
                    e.reason.as_deref() == Some("NatsUnreachable")
                        && e.type_.as_deref() == Some("Warning")
                        && e.note.as_deref().is_some_and(|n| n.contains(UNREACHABLE))
                })
                .map(|_| ()))
        })
        .await?;
        Ok(())
    })
    .await
}

/// Why relay pods cannot run here, if they cannot: no node, or none Ready.
async fn no_node(client: &Client) -> Result<Option<String>> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let ready = nodes.items.iter().any(|n| {
        n.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    });
    Ok(match (nodes.items.is_empty(), ready) {
        (true, _) => Some("the cluster has no node".into()),
        (false, false) => Some("no node of the cluster is Ready".into()),
        _ => None,
    })
}
