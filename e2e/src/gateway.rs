//! Helpers for the tests that run a gateway's relay pods on a node and reach them through the
//! gateway's Service as clients do (tests/fleet.rs, tests/chaos.rs): is there a Ready node,
//! where pods reach NATS, the Service's URL, ready endpoints, the relay pods, a rollout, JWTs.

use std::collections::BTreeSet;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use wsrelay_operator::build::INSTANCE_LABEL;

use crate::{eventually, repo_root};

/// Why relay pods cannot run here, if they cannot: no node, or none Ready.
pub async fn no_node(client: &Client) -> Result<Option<String>> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    if nodes.items.is_empty() {
        return Ok(Some("the cluster has no node".into()));
    }
    let ready = nodes.items.iter().any(|n| {
        n.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    });
    Ok((!ready).then(|| "no node of the cluster is Ready".into()))
}

/// `Ok(true)` when a test that needs a node should run; `Ok(false)` (after saying SKIPPED)
/// when there is none and `E2E_REQUIRE_NODE` is not `1`; an error when it is.
pub async fn node_or_skip(client: &Client, test: &str) -> Result<bool> {
    let Some(reason) = no_node(client).await? else {
        return Ok(true);
    };
    if std::env::var("E2E_REQUIRE_NODE").is_ok_and(|v| v == "1") {
        bail!("E2E_REQUIRE_NODE=1 but {reason}");
    }
    eprintln!("SKIPPED {test}: {reason} (start one with `make cluster-up NODE=1`)");
    Ok(false)
}

/// Waits until Deployment `name` has at least `replicas` ready replicas.
pub async fn wait_available(api: &Api<Deployment>, name: &str, replicas: i32) -> Result<()> {
    eventually(
        &format!("Deployment {name} with {replicas} ready replicas"),
        || async {
            let Some(d) = api.get_opt(name).await? else {
                return Ok(None);
            };
            let ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
            Ok((ready >= replicas).then_some(()))
        },
    )
    .await
}

/// How the test reaches a Service.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Access {
    /// This machine routes the Service range into the node (the local node).
    ClusterIp,
    /// The node's InternalIP and the Service's node port (kind).
    NodePort,
}

/// `E2E_SERVICE_ACCESS`: `node-port`, else the ClusterIP.
pub fn service_access() -> Access {
    match std::env::var("E2E_SERVICE_ACCESS").as_deref() {
        Ok("node-port") => Access::NodePort,
        _ => Access::ClusterIp,
    }
}

/// The Service type a gateway should ask for under [`service_access`].
pub fn service_type() -> &'static str {
    match service_access() {
        Access::NodePort => "NodePort",
        Access::ClusterIp => "ClusterIP",
    }
}

/// Where relay pods reach NATS: `E2E_GATEWAY_NATS_URL`, else what the local node wrote.
pub fn gateway_nats_url() -> Result<String> {
    if let Ok(v) = std::env::var("E2E_GATEWAY_NATS_URL") {
        return Ok(v);
    }
    let path = repo_root().join(".cluster/node/nats-url");
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (set E2E_GATEWAY_NATS_URL)", path.display()))?
        .trim()
        .to_string())
}

/// The WebSocket URL of gateway `name` through its Service.
pub async fn service_url(client: &Client, ns: &str, name: &str) -> Result<String> {
    let services = Api::<Service>::namespaced(client.clone(), ns);
    let svc = eventually("the gateway's Service", || async {
        services.get_opt(name).await.map_err(Into::into)
    })
    .await?;
    let spec = svc.spec.context("Service without spec")?;
    let port = spec
        .ports
        .as_ref()
        .and_then(|p| p.first())
        .context("Service without ports")?;
    match service_access() {
        Access::ClusterIp => {
            let ip = spec.cluster_ip.context("Service without a ClusterIP")?;
            Ok(format!("ws://{ip}:{}/ws", port.port))
        }
        Access::NodePort => {
            let node_port = port.node_port.context("Service without a node port")?;
            let nodes = Api::<Node>::all(client.clone())
                .list(&ListParams::default())
                .await?;
            let ip = nodes
                .items
                .iter()
                .flat_map(|n| n.status.iter().flat_map(|s| s.addresses.iter().flatten()))
                .find(|a| a.type_ == "InternalIP")
                .context("no node has an InternalIP")?
                .address
                .clone();
            Ok(format!("ws://{ip}:{node_port}/ws"))
        }
    }
}

/// Waits until the EndpointSlices of Service `name` list `n` ready endpoints.
pub async fn wait_endpoints_ready(client: &Client, ns: &str, name: &str, n: usize) -> Result<()> {
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={name}"));
    eventually(
        &format!("{n} ready endpoints behind Service {name}"),
        || async {
            let ready = slices
                .list(&lp)
                .await?
                .items
                .iter()
                .flat_map(|s| s.endpoints.iter().flatten())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false))
                .count();
            Ok((ready >= n).then_some(()))
        },
    )
    .await
}

/// The relay pods of gateway `name` that are not terminating.
pub async fn relay_pods(client: &Client, ns: &str, name: &str) -> Result<BTreeSet<String>> {
    Ok(relay_pod_objects(client, ns, name)
        .await?
        .iter()
        .map(|p| p.name_any())
        .collect())
}

/// The relay pod objects of gateway `name` that are not terminating.
pub async fn relay_pod_objects(client: &Client, ns: &str, name: &str) -> Result<Vec<Pod>> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("{INSTANCE_LABEL}={name}")))
        .await?;
    Ok(pods
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect())
}

/// Waits until a rollout of gateway `name` replaced every pod of `old_pods` and its
/// Deployment is fully updated and ready.
pub async fn wait_rollout(
    client: &Client,
    ns: &str,
    name: &str,
    old_pods: &BTreeSet<String>,
) -> Result<()> {
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    eventually("the rollout to replace every relay pod", || async {
        let pods = relay_pods(client, ns, name).await?;
        let replaced = pods.is_disjoint(old_pods) && !pods.is_empty();
        let d = deployments.get(name).await?;
        let s = d.status.unwrap_or_default();
        let done = s.updated_replicas == s.replicas
            && s.ready_replicas == s.replicas
            && s.replicas.unwrap_or(0) > 0;
        Ok((replaced && done).then_some(()))
    })
    .await
}

/// An HS256 JWT for `sub` signed with `key`, valid for an hour.
pub fn hs256_token(key: &str, sub: &str) -> Result<String> {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({ "sub": sub, "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
    )?)
}

/// The address of a pod's container port named `port` (`ws`, `admin`), on the pod's IP.
pub fn pod_port(pod: &Pod, port: &str) -> Result<std::net::SocketAddr> {
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .context("pod without an IP")?;
    let number = pod
        .spec
        .as_ref()
        .into_iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(port))
        .with_context(|| format!("no container port named {port}"))?
        .container_port;
    Ok(std::net::SocketAddr::new(
        ip.parse()?,
        u16::try_from(number)?,
    ))
}

/// The value of an unlabelled metric (a gauge such as `wsrelay_connections`) on a relay
/// pod's admin port, read straight from the pod IP (this machine routes the pod range).
pub async fn relay_metric(pod: &Pod, metric: &str) -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = pod_port(pod, "admin")?;
    let limit = std::time::Duration::from_secs(3);
    let mut s = tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timeout")??;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut raw))
        .await
        .context("read timeout")??;
    let text = String::from_utf8_lossy(&raw);
    text.lines()
        .find_map(|l| {
            let (name, value) = l.split_once(' ')?;
            (name == metric).then(|| value.trim().parse::<f64>().ok())?
        })
        .with_context(|| format!("{addr}/metrics has no {metric}"))
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The Ready relay pods of gateway `name` with their open connections, busiest first.
pub async fn relay_pods_by_connections(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Vec<(Pod, i64)>> {
    let mut out = Vec::new();
    for pod in relay_pod_objects(client, ns, name).await? {
        if !is_ready(&pod) {
            continue;
        }
        let n = relay_metric(&pod, "wsrelay_connections").await? as i64;
        out.push((pod, n));
    }
    out.sort_by_key(|(p, n)| (-n, p.name_any()));
    Ok(out)
}

/// The containerd id of the pod's (only) container.
pub fn container_id(pod: &Pod) -> Result<String> {
    let id = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.container_id.clone())
        .context("pod without a container id")?;
    Ok(id.rsplit("://").next().unwrap_or(&id).to_string())
}

/// The pid, in this machine's pid namespace, of the process named `comm` whose cgroup is the
/// container's. The node's processes live in a pid namespace below this one, so they are
/// visible here; the cgroup path names the container id, so nothing else can match.
pub fn host_pid_of(container: &str, comm: &str) -> Result<u32> {
    ensure!(
        container.len() >= 12,
        "container id {container:?} is too short to match on"
    );
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cgroup) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            continue;
        };
        if !cgroup.contains(container) {
            continue;
        }
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if name.trim() == comm {
            found.push(pid);
        }
    }
    match found.as_slice() {
        [pid] => Ok(*pid),
        [] => bail!("no process {comm} in a cgroup of container {container}"),
        many => bail!("several processes {comm} in container {container}: {many:?}"),
    }
}

/// Deletes pod `name` with grace period 0 (`kubectl delete --grace-period=0 --force`): the
/// object is gone at once, its containers die when kubelet gets to them.
pub async fn force_delete_pod(client: &Client, ns: &str, name: &str) -> Result<()> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .delete(
            name,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            },
        )
        .await
        .with_context(|| format!("force-deleting pod {ns}/{name}"))?;
    Ok(())
}
