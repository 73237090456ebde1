//! Resumable channels under chaos, on the node (issue 11): a gateway whose binding keeps
//! history, two relay pods, a publisher at a fixed rate, 200 WebSocket clients through the
//! gateway's Service that behave like the SDK (src/resumable.rs: keep {epoch, last seq},
//! resume with `since` after a close or a drain, resubscribe after `unavailable`). Then, one
//! after the other:
//! (a) a rolling update (a relay config change),
//! (b) a relay pod deleted with grace period 0 (`kubectl delete --grace-period=0 --force`),
//! (c) the relay process of a pod killed with SIGKILL (found from this machine's pid
//!     namespace by its container's cgroup; kubelet restarts the container);
//! (d) rebalancing (issue 28): 400 more clients (600 on 2 pods), then 4 replicas and
//!     `spec.rebalance` on: within `stableSeconds` + `overSeconds` + 30 s of the new pods'
//!     readiness every pod holds the mean within the tolerance, no client moved twice;
//! (e) the busiest of the 4 relays SIGKILLed: the fleet returns to balance on its own.
//!
//! Each client checks the position chain of every message (`seq` above the last, `prev` equal
//! to it). After each case, once every client has caught up with the stream, the test compares
//! what each client received with what the stream stored on its channel (the publisher uses
//! JetStream acks, so it knows every stored position): the test fails on any message lost,
//! duplicated, reordered or misrouted, on any `recovered: false`, and on a client that gave up.
//! It prints per case: clients, messages, lost, duplicated, reconnect-to-caught-up p50/p99.
//!
//! The operator runs in this process (the current code, scoped to the test's namespace); the
//! relays are the node's imported image (`make images`, node-up.sh). Without a Ready node the
//! test says SKIPPED, unless `E2E_REQUIRE_NODE=1`. It needs the local node (as root): it reads
//! each relay's connection count from its pod IP and finds the relay process in this
//! machine's /proc, which a kind cluster does not offer (`make kind-e2e` runs the fleet suite).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use wsrelay_e2e::gateway::{self, hs256_token};
use wsrelay_e2e::operator::{Operator, install_crd};
use wsrelay_e2e::resumable::{self, CaseFigures, Feed, Published, ResumableClient};
use wsrelay_e2e::{eventually, nats_url, with_namespace};
use wsrelay_operator::api::WebsocketGateway;

const GATEWAY: &str = "chaos";
const HMAC_KEY: &str = "e2e-chaos-hmac-key-of-at-least-32-bytes!!";
const REPLICAS: i32 = 2;
const CLIENTS: usize = 200;
/// Case (d): clients in all, and relay pods after the scale-up.
const SCALED_CLIENTS: usize = 600;
const SCALED_REPLICAS: i32 = 4;
/// The gateway's `spec.rebalance` from case (d) on.
const TOLERANCE_PERCENT: u32 = 25;
const STABLE_SECONDS: u32 = 10;
const OVER_SECONDS: u32 = 20;
const CHANNELS: usize = 5;
/// Messages a second in all, round-robin over the channels.
const PUBLISH_RATE: u64 = 50;
/// History per channel: at 10 messages a second per channel, 100 s of outage.
const HISTORY_MESSAGES: i32 = 1000;
/// After a case's disruption is over, publishing goes on this long before the case ends.
const SETTLE: Duration = Duration::from_secs(4);
/// How long clients may take to catch up with the stream at the end of a case.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_resumable_clients_survive_rollout_pod_delete_and_sigkill() -> Result<()> {
    let client = wsrelay_e2e::client().await?;
    if !gateway::node_or_skip(&client, "chaos e2e").await? {
        return Ok(());
    }
    with_namespace("chaos", |client, ns| async move {
        install_crd(&client).await?;
        let operator = Operator::start(client.clone(), &ns, None);
        let outcome = scenario(&client, &ns).await;
        let stopped = operator.stop().await;
        if let Ok(url) = nats_url() {
            resumable::delete_stream_of(&url, &format!("{}.0", subject_prefix(&ns))).await;
        }
        outcome?;
        stopped
    })
    .await
}

fn subject_prefix(ns: &str) -> String {
    format!("e2e.{ns}.room")
}

async fn scenario(client: &Client, ns: &str) -> Result<()> {
    let t0 = Instant::now();
    create_gateway(client, ns).await?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    gateway::wait_available(&deployments, GATEWAY, REPLICAS).await?;
    gateway::wait_endpoints_ready(client, ns, GATEWAY, REPLICAS as usize).await?;
    let url = gateway::service_url(client, ns, GATEWAY).await?;
    eprintln!(
        "{REPLICAS} relay pods Ready in {:.1}s, reached at {url}",
        t0.elapsed().as_secs_f64()
    );

    // --- the stream is in place (the relays create it): every channel takes a message ---
    let nats = async_nats::connect(nats_url()?)
        .await
        .context("connecting to NATS")?;
    let js = async_nats::jetstream::new(nats);
    let feeds: Vec<Feed> = (0..CHANNELS)
        .map(|i| Feed {
            channel: format!("room.{i}"),
            subject: format!("{}.{i}", subject_prefix(ns)),
        })
        .collect();
    let published = Arc::new(Published::default());
    let counter = Arc::new(AtomicU64::new(0));
    for feed in &feeds {
        eventually("the history stream to store a message", || async {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            match resumable::publish_acked(&js, feed, n, &published).await {
                Ok(_) => Ok(Some(())),
                Err(e) => {
                    tracing::info!("stream not there yet: {e:#}");
                    Ok(None)
                }
            }
        })
        .await?;
    }

    // --- 200 clients through the Service ---
    let t1 = Instant::now();
    let channels: Vec<String> = feeds.iter().map(|f| f.channel.clone()).collect();
    let mut clients = resumable::open_clients(
        &url,
        &channels,
        CLIENTS,
        |i| hs256_token(HMAC_KEY, &format!("client{i}")),
        &published,
        16,
    )
    .await?;
    eprintln!(
        "{CLIENTS} clients subscribed on {CHANNELS} resumable channels in {:.1}s",
        t1.elapsed().as_secs_f64()
    );

    let stop = CancellationToken::new();
    let publisher = tokio::spawn(resumable::publish_steadily(
        js.clone(),
        feeds.clone(),
        PUBLISH_RATE,
        published.clone(),
        counter.clone(),
        stop.clone(),
    ));
    let start = published.heads();
    let mut results: Vec<(&str, CaseFigures)> = Vec::new();

    // --- steady state: nothing happens, everything arrives ---
    let from = published.heads();
    tokio::time::sleep(SETTLE).await;
    results.push((
        "steady",
        finish_case("steady", &clients, &published, &from).await,
    ));

    // --- (a) a rolling update ---
    let from = published.heads();
    let old = gateway::relay_pods(client, ns, GATEWAY).await?;
    let t = Instant::now();
    Api::<WebsocketGateway>::namespaced(client.clone(), ns)
        .patch(
            GATEWAY,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "limits": { "publishRatePerSecond": 7 } } })),
        )
        .await?;
    gateway::wait_rollout(client, ns, GATEWAY, &old).await?;
    gateway::wait_endpoints_ready(client, ns, GATEWAY, REPLICAS as usize).await?;
    eprintln!(
        "(a) rollout of {} pods: {:.1}s",
        old.len(),
        t.elapsed().as_secs_f64()
    );
    tokio::time::sleep(SETTLE).await;
    results.push((
        "(a) rolling update",
        finish_case("(a) rolling update", &clients, &published, &from).await,
    ));

    // --- (b) a relay pod deleted with grace period 0 ---
    let from = published.heads();
    let victim = busiest_pod(client, ns, "(b)").await?;
    let victim_addr = gateway::pod_port(&victim, "ws")?;
    let t = Instant::now();
    gateway::force_delete_pod(client, ns, &victim.name_any()).await?;
    // The API object is gone at once; the container dies when kubelet gets to it.
    eventually("the force-deleted relay to stop serving", || async {
        Ok((!serves(victim_addr).await).then_some(()))
    })
    .await?;
    let down = t.elapsed();
    eventually("a replacement relay pod", || async {
        let pods = gateway::relay_pods(client, ns, GATEWAY).await?;
        Ok((pods.len() == REPLICAS as usize && !pods.contains(&victim.name_any())).then_some(()))
    })
    .await?;
    gateway::wait_available(&deployments, GATEWAY, REPLICAS).await?;
    gateway::wait_endpoints_ready(client, ns, GATEWAY, REPLICAS as usize).await?;
    eprintln!(
        "(b) pod {} force-deleted: stopped serving after {:.1}s, replacement Ready after {:.1}s",
        victim.name_any(),
        down.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    tokio::time::sleep(SETTLE).await;
    results.push((
        "(b) pod force-deleted",
        finish_case("(b) pod force-deleted", &clients, &published, &from).await,
    ));

    // --- (c) the relay process of a pod killed with SIGKILL ---
    let from = published.heads();
    sigkill_busiest(client, ns, "(c)", REPLICAS).await?;
    tokio::time::sleep(SETTLE).await;
    results.push((
        "(c) relay SIGKILL",
        finish_case("(c) relay SIGKILL", &clients, &published, &from).await,
    ));

    // --- (d) rebalancing after a scale-up: 600 clients on 2 pods, then 4 pods ---
    let more = resumable::open_clients(
        &url,
        &channels,
        SCALED_CLIENTS - CLIENTS,
        |i| hs256_token(HMAC_KEY, &format!("client{}", CLIENTS + i)),
        &published,
        16,
    )
    .await?;
    clients.extend(more);
    let from = published.heads();
    let moved_before = moves(&clients);
    counts(client, ns, "(d) before the scale-up").await?;
    let t = Instant::now();
    Api::<WebsocketGateway>::namespaced(client.clone(), ns)
        .patch(
            GATEWAY,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": {
                "replicas": SCALED_REPLICAS,
                "rebalance": {
                    "enabled": true,
                    "tolerancePercent": TOLERANCE_PERCENT,
                    "stableSeconds": STABLE_SECONDS,
                    "overSeconds": OVER_SECONDS,
                    "maxMovesPerSecond": 100
                }
            } })),
        )
        .await?;
    gateway::wait_available(&deployments, GATEWAY, SCALED_REPLICAS).await?;
    gateway::wait_endpoints_ready(client, ns, GATEWAY, SCALED_REPLICAS as usize).await?;
    let scaled = t.elapsed();
    counts(client, ns, "(d) scaled up").await?;
    let balanced = wait_balanced(client, ns, SCALED_CLIENTS).await?;
    eprintln!(
        "(d) {SCALED_REPLICAS} pods Ready {:.1}s after the scale-up; balanced {:.1}s after that: {balanced}",
        scaled.as_secs_f64(),
        (t.elapsed() - scaled).as_secs_f64()
    );
    tokio::time::sleep(SETTLE).await;
    let figures = finish_case("(d) rebalance after scale-up", &clients, &published, &from).await;
    once_each("(d)", &clients, &moved_before, figures.counters.moves)?;
    results.push(("(d) rebalance after scale-up", figures));

    // --- (e) a relay SIGKILLed under the same load: back to balance on its own ---
    let from = published.heads();
    let moved_before = moves(&clients);
    let t = Instant::now();
    sigkill_busiest(client, ns, "(e)", SCALED_REPLICAS).await?;
    let back = t.elapsed();
    counts(client, ns, "(e) relay back").await?;
    let balanced = wait_balanced(client, ns, SCALED_CLIENTS).await?;
    eprintln!(
        "(e) balanced {:.1}s after the killed relay was Ready again: {balanced}",
        (t.elapsed() - back).as_secs_f64()
    );
    tokio::time::sleep(SETTLE).await;
    let figures = finish_case("(e) rebalance after SIGKILL", &clients, &published, &from).await;
    once_each("(e)", &clients, &moved_before, figures.counters.moves)?;
    results.push(("(e) rebalance after SIGKILL", figures));

    // --- the whole run: every client has everything stored since its first subscribe ---
    stop.cancel();
    let stored = publisher.await?;
    let errors = published.errors.load(std::sync::atomic::Ordering::Relaxed);
    let whole = resumable::tally(
        &clients,
        &published,
        &start,
        &published.heads(),
        CATCH_UP_LIMIT,
    )
    .await;
    eprintln!(
        "whole run: {stored} messages published at {PUBLISH_RATE}/s, {errors} not acknowledged by JetStream; lost {}, foreign {}",
        whole.lost, whole.foreign
    );
    eprintln!(
        "FIGURE chaos summary (case | clients | messages | lost | duplicated | moved | reconnect-to-caught-up p50 / p99):"
    );
    for (name, f) in &results {
        let (p50, p99, _) = resumable::percentiles(&f.counters.catchups);
        eprintln!(
            "FIGURE | {name} | {} | {} | {} | {} | {} | {:.0} ms / {:.0} ms |",
            f.clients,
            f.messages,
            f.lost,
            f.counters.duplicates,
            f.counters.moves,
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }

    let mut failures = Vec::new();
    for (name, f) in results.iter().chain([("whole run", whole)].iter()) {
        if f.failed() {
            failures.push(format!(
                "{name}: lost {}, duplicated {}, chain breaks {}, recovered:false {}, foreign {}, behind {}, gave up {:?}; {:?}",
                f.lost,
                f.counters.duplicates,
                f.counters.chain_breaks,
                f.counters.not_recovered,
                f.foreign,
                f.behind,
                f.gave_up,
                f.anomalies
            ));
        }
    }
    ensure!(
        errors == 0,
        "{errors} publishes were not acknowledged by JetStream: the test cannot tell what was stored"
    );
    ensure!(
        failures.is_empty(),
        "resumable channels broke their promise:\n{}",
        failures.join("\n")
    );
    // Each disruption must have been felt, or the case proved nothing.
    for (name, f) in &results[1..] {
        ensure!(
            f.counters.resubscribes > 0,
            "{name}: no client had to resume; the case did not disrupt anything"
        );
    }
    Ok(())
}

/// Ends a case: takes the stream heads, waits for the clients to catch up, counts, prints.
async fn finish_case(
    name: &str,
    clients: &[ResumableClient],
    published: &Published,
    from: &BTreeMap<String, u64>,
) -> CaseFigures {
    let to = published.heads();
    let f = resumable::tally(clients, published, from, &to, CATCH_UP_LIMIT).await;
    eprintln!("{}", f.line(&format!("chaos {name}")));
    for a in &f.anomalies {
        eprintln!("  {a}");
    }
    f
}

async fn create_gateway(client: &Client, ns: &str) -> Result<()> {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "chaos-jwt" },
        "stringData": { "hmac": HMAC_KEY }
    }))?;
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await?;
    let gw: WebsocketGateway = serde_json::from_value(json!({
        "apiVersion": "wsrelay.dev/v1alpha1",
        "kind": "WebsocketGateway",
        "metadata": { "name": GATEWAY },
        "spec": {
            "replicas": REPLICAS,
            "nats": { "urls": [gateway::gateway_nats_url()?] },
            "auth": { "jwt": {
                "hmacSecretRef": { "name": "chaos-jwt", "key": "hmac" },
                "tokenSources": [{ "from": "Query", "name": "token" }]
            } },
            "bindings": [{
                "channel": "room.{id}",
                "subject": format!("{}.{{id}}", subject_prefix(ns)),
                "history": { "maxMessages": HISTORY_MESSAGES, "maxAgeSeconds": 600 }
            }],
            "limits": { "sendQueueLength": 2 * HISTORY_MESSAGES },
            "drain": { "gracePeriodSeconds": 5 },
            "service": { "type": gateway::service_type(), "port": 80 },
            "resources": { "requests": { "cpu": "10m", "memory": "16Mi" } }
        }
    }))?;
    wsrelay_e2e::operator::create_gateway(client, ns, &gw).await?;
    Ok(())
}

/// The relay pod with the most connections, after printing every pod's count.
async fn busiest_pod(client: &Client, ns: &str, case: &str) -> Result<Pod> {
    let pods = gateway::relay_pods_by_connections(client, ns, GATEWAY).await?;
    let counts: Vec<String> = pods
        .iter()
        .map(|(p, n)| format!("{} {n}", p.name_any()))
        .collect();
    eprintln!("{case}: connections per relay pod: {}", counts.join(", "));
    let (pod, n) = pods.into_iter().next().context("no Ready relay pod")?;
    ensure!(n > 0, "{case}: no relay pod has a connection");
    Ok(pod)
}

/// Whether something accepts TCP connections at `addr` (within a second).
async fn serves(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// SIGKILLs the relay process of the busiest pod (found in this machine's pid namespace by its
/// container's cgroup) and waits until kubelet restarted it and `replicas` endpoints are
/// Ready again.
async fn sigkill_busiest(client: &Client, ns: &str, case: &str, replicas: i32) -> Result<()> {
    let victim = busiest_pod(client, ns, case).await?;
    let restarts = restart_count(&victim);
    let container = gateway::container_id(&victim)?;
    let pid = gateway::host_pid_of(&container, "wsrelay")?;
    let t = Instant::now();
    let mut kill = std::process::Command::new("kill");
    kill.args(["-KILL", &pid.to_string()]);
    wsrelay_e2e::tools::run(kill).context("SIGKILL to the relay process")?;
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let victim_name = victim.name_any();
    eventually(
        "the killed relay's container to restart and be Ready",
        || async {
            let p = pods.get(&victim_name).await?;
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            Ok((restart_count(&p) > restarts && ready).then_some(()))
        },
    )
    .await?;
    gateway::wait_endpoints_ready(client, ns, GATEWAY, replicas as usize).await?;
    eprintln!(
        "{case} relay process {pid} of pod {victim_name} killed with SIGKILL: container restarted and Ready after {:.1}s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Prints every Ready relay pod's connections; returns them.
async fn counts(client: &Client, ns: &str, when: &str) -> Result<Vec<i64>> {
    let pods = gateway::relay_pods_by_connections(client, ns, GATEWAY).await?;
    let line: Vec<String> = pods
        .iter()
        .map(|(p, n)| format!("{} {n}", p.name_any()))
        .collect();
    eprintln!("{when}: connections per relay pod: {}", line.join(", "));
    Ok(pods.into_iter().map(|(_, n)| n).collect())
}

/// Whether every one of `counts` is within the tolerance of their mean, and they add up to
/// `total` (every client connected).
fn balanced(counts: &[i64], pods: usize, total: usize) -> bool {
    let sum: i64 = counts.iter().sum();
    if counts.len() != pods || sum != total as i64 {
        return false;
    }
    let mean = sum as f64 / pods as f64;
    let tolerance = mean * f64::from(TOLERANCE_PERCENT) / 100.0;
    counts.iter().all(|n| (*n as f64 - mean).abs() <= tolerance)
}

/// Waits, at most `overSeconds` + 30 s after the relays' readiness plus the time the
/// imbalance must last (`stableSeconds`), for the fleet to be balanced; returns the counts.
async fn wait_balanced(client: &Client, ns: &str, total: usize) -> Result<String> {
    let limit = Duration::from_secs(u64::from(OVER_SECONDS + STABLE_SECONDS) + 30);
    let deadline = Instant::now() + limit;
    let mut last = Vec::new();
    while Instant::now() < deadline {
        if let Ok(pods) = gateway::relay_pods_by_connections(client, ns, GATEWAY).await {
            last = pods.iter().map(|(_, n)| *n).collect();
            if balanced(&last, SCALED_REPLICAS as usize, total) {
                return Ok(format!("{last:?}"));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!(
        "the fleet was not balanced within {limit:?} (every pod within {TOLERANCE_PERCENT}% of the mean, {total} connections): last counts {last:?}"
    )
}

/// Each client's `rebalance` drains so far.
fn moves(clients: &[ResumableClient]) -> Vec<u64> {
    clients.iter().map(|c| c.record().moves).collect()
}

/// Checks that the case moved some clients and none twice.
fn once_each(case: &str, clients: &[ResumableClient], before: &[u64], moved: u64) -> Result<()> {
    let twice = clients
        .iter()
        .enumerate()
        .filter(|(i, c)| c.record().moves > before.get(*i).copied().unwrap_or(0) + 1)
        .count();
    eprintln!("{case}: {moved} clients moved, {twice} of them more than once");
    ensure!(moved > 0, "{case}: no client was moved");
    ensure!(
        twice == 0,
        "{case}: {twice} clients were moved more than once"
    );
    Ok(())
}

fn restart_count(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |c| c.iter().map(|c| c.restart_count).sum())
}
