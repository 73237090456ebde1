//! The whole product on a cluster with a node, as a user meets it: install the Helm chart,
//! declare a gateway, connect real WebSocket clients with JWTs through the gateway's
//! Service, publish on NATS, let the HPA scale the fleet on connection count, roll the fleet
//! while clients stay subscribed, delete everything. Through the rollout, what plain-channel
//! clients lose is reported, not asserted (at-most-once by design); clients of a resumable
//! channel (a binding with history, src/resumable.rs) must lose nothing. A binding that asks
//! the application's backend (`authorize.request`) is answered by the example backend
//! (examples/authz-backend, src/authz.rs) running as a Deployment beside the fleet.
//!
//! The same code runs on the local node (`make cluster-up NODE=1`) and on kind
//! (`make kind-e2e`). What differs between the two comes from the environment:
//! - `NATS_URL`: where this test publishes (default: the local cluster's NATS);
//! - `E2E_GATEWAY_NATS_URL`: where relay pods reach NATS (default: `.cluster/node/nats-url`);
//! - `E2E_SERVICE_ACCESS`: `cluster-ip` (this machine routes the Service range into the
//!   node, the default) or `node-port` (the node's InternalIP and the Service's node port,
//!   for kind);
//! - `E2E_HELM_ARGS`: extra `helm install` arguments (image overrides, for instance).
//!
//! Without a Ready node the test prints why it is SKIPPED and returns, unless
//! `E2E_REQUIRE_NODE=1` (as `make test` sets when it brought a node up), when that fails it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use wsrelay_e2e::operator::install_chart_crd;
use wsrelay_e2e::resumable::{self, Feed, Published};
use wsrelay_e2e::subscriber::{self, Subscriber, Target};
use wsrelay_e2e::tools::{helm, kubectl, run};
use wsrelay_e2e::{authz, gateway};
use wsrelay_e2e::{eventually, nats_url, repo_root, with_namespace};
use wsrelay_operator::api::WebsocketGateway;
use wsrelay_operator::build::INSTANCE_LABEL;

const RELEASE: &str = "wsrelay";
const GATEWAY: &str = "fleet";
const HMAC_KEY: &str = "e2e-fleet-hmac-key-of-at-least-32-bytes!";
/// Connections per pod the HPA aims at; the test opens enough for three pods.
const TARGET_PER_POD: i64 = 4;
const FIRST_CLIENTS: usize = 10;
/// Clients opened once the new pods are Ready. kube-proxy picks an endpoint at random, so
/// the chance that all of them still land on the first pod is (1/3)^8, about 1 in 6,500.
const LATER_CLIENTS: usize = 8;
const MAX_REPLICAS: i32 = 3;
/// Publications per second while the fleet rolls (on each of the two channels).
const PUBLISH_RATE: u64 = 20;
/// Clients on the resumable channel (`orders`, a binding with history), opened before the
/// rollout; they are not counted by the scaling checks above.
const RESUMABLE_CLIENTS: usize = 12;
/// The example authorization backend's Deployment, and who may join which room.
const AUTHZ_BACKEND: &str = "authz-example";
const ROOMS: &str = "alice:1;bob:1,2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_gateway_clients_scaling_rollout_and_delete() -> Result<()> {
    let client = wsrelay_e2e::client().await?;
    if !gateway::node_or_skip(&client, "fleet e2e").await? {
        return Ok(());
    }
    with_namespace(
        "fleet",
        |client, ns| async move { scenario(client, ns).await },
    )
    .await
}

/// Uninstalls the chart on drop, pass or fail, so no APIService is left pointing at an
/// operator that is gone (that would break discovery for the whole cluster).
struct Release {
    namespace: String,
    uninstalled: bool,
}

impl Drop for Release {
    fn drop(&mut self) {
        if self.uninstalled {
            return;
        }
        let mut c = helm();
        c.args([
            "uninstall",
            RELEASE,
            "--namespace",
            &self.namespace,
            "--wait",
            "--timeout",
            "60s",
        ]);
        if let Err(e) = run(c) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// Seconds since `start`, for the figures the test prints.
fn secs(start: Instant) -> String {
    format!("{:.1}s", start.elapsed().as_secs_f64())
}

async fn scenario(client: Client, ns: String) -> Result<()> {
    let t0 = Instant::now();

    // --- install the chart -> operator Ready ---
    let mut release = install_chart(&ns)?;
    // helm installs the chart's CRD only where there is none: a cluster that has an older
    // one would prune the fields this gateway uses (`authorize`). Apply the chart's copy.
    install_chart_crd(&client).await?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let operator = operator_deployment(&deployments).await?;
    gateway::wait_available(&deployments, &operator, 2).await?;
    eprintln!("FIGURE operator Ready (2 replicas): {}", secs(t0));
    wait_apiservices_available().await?;
    eprintln!("FIGURE metrics APIServices Available: {}", secs(t0));
    // The backend starts beside the relays, so it costs the scenario no time of its own.
    authz::deploy_backend(
        &client,
        &ns,
        AUTHZ_BACKEND,
        &gateway::gateway_nats_url()?,
        &authz_subject(&ns),
        ROOMS,
    )
    .await?;

    // --- apply a gateway -> relay pods Ready ---
    let t1 = Instant::now();
    let gateways = Api::<WebsocketGateway>::namespaced(client.clone(), &ns);
    create_gateway(&client, &ns).await?;
    gateway::wait_available(&deployments, GATEWAY, 1).await?;
    eprintln!(
        "FIGURE gateway applied -> first relay pod Ready: {}",
        secs(t1)
    );
    let url = gateway::service_url(&client, &ns, GATEWAY).await?;
    eprintln!("relays reached at {url}");

    // --- a client with a JWT connects through the Service; a NATS message arrives ---
    let nats = async_nats::connect(nats_url()?)
        .await
        .context("connecting to NATS")?;
    let subject = format!("e2e.{ns}.news");
    let target = Target {
        url: url.clone(),
        token: token("alice")?,
        channel: "news".into(),
    };
    // kube-proxy programs a new endpoint within a second or so of the EndpointSlice listing
    // it; until then the Service answers "no route to host". A client retries, and so do we.
    gateway::wait_endpoints_ready(&client, &ns, GATEWAY, 1).await?;
    let first = eventually("a first client to connect through the Service", || async {
        match subscriber::start(target.clone()).await {
            Ok(s) => Ok(Some(s)),
            Err(e) => {
                tracing::info!("not yet: {e:#}");
                Ok(None)
            }
        }
    })
    .await?;
    let seq = Arc::new(AtomicU64::new(0));
    publish_until_received(&nats, &subject, &seq, &first).await?;
    eprintln!(
        "FIGURE first message through NATS -> relay -> client: {}",
        secs(t0)
    );

    // A bad token is refused through the Service too, with the close code the SDK reads
    // (the CRD's default `auth.refuseAfterUpgrade: true`), not an HTTP 401 a browser
    // would only see as 1006.
    let bad = Target {
        token: "not-a-jwt".into(),
        ..target.clone()
    };
    let refused = subscriber::connect_and_subscribe(&bad).await;
    ensure!(
        refused
            .as_ref()
            .err()
            .is_some_and(|e| format!("{e:#}").contains("4401")),
        "a bad token should be closed with 4401, got {:?}",
        refused.map(|_| ())
    );

    // One identity holds at most `limits.maxConnectionsPerSubject` (2 here) connections on
    // a pod: alice's second connection through the Service is admitted, her third refused
    // with 4429. There is one relay pod at this point (minReplicas 1, two connections are
    // below the autoscaler's target), so all three reach the same pod.
    let second = subscriber::connect_and_subscribe(&target)
        .await
        .context("alice's second connection, within maxConnectionsPerSubject")?;
    let third = subscriber::connect_and_subscribe(&target).await;
    ensure!(
        third.as_ref().err().is_some_and(|e| {
            let e = format!("{e:#}");
            e.contains("4429") && e.contains("too many connections for this token subject")
        }),
        "alice's third connection should be closed with 4429, got {:?}",
        third.map(|_| ())
    );
    // Her second goes again, so the scaling checks below count only their own clients.
    drop(second);

    // --- a binding that asks the backend: alice may join room 1 (with the backend's data in
    // the ok), not room 2 (403 with the backend's reason) ---
    let t_rooms = Instant::now();
    gateway::wait_available(&deployments, AUTHZ_BACKEND, 1).await?;
    let alice = token("alice")?;
    // Retried while not yet decided: until the backend has subscribed NATS has no responders
    // (503, not cached); until the relay has seen her second connection go, a third one of
    // hers is refused (4429).
    let replies = eventually("alice's rooms answered by the backend", || async {
        match authz::subscribe_replies(&url, &alice, &["rooms.1", "rooms.2"]).await {
            Ok(r) if r.iter().all(|r| r["code"] != 503) => Ok(Some(r)),
            Ok(r) => {
                tracing::info!("backend not serving yet: {r:?}");
                Ok(None)
            }
            Err(e) => {
                tracing::info!("not yet: {e:#}");
                Ok(None)
            }
        }
    })
    .await?;
    let (room1, room2) = (&replies[0], &replies[1]);
    ensure!(
        room1["type"] == "ok" && room1["data"] == json!({ "room": "1", "members": 2 }),
        "alice should join room 1 with the backend's data, got {room1}"
    );
    ensure!(
        room2["type"] == "error"
            && room2["code"] == 403
            && room2["reason"] == "not a member of room 2",
        "alice should be refused room 2 with the backend's reason, got {room2}"
    );
    eprintln!(
        "FIGURE backend authorization through the Service (room 1 ok, room 2 403): {}",
        secs(t_rooms)
    );

    // --- enough connections -> the HPA raises replicas -> new pods take new connections ---
    let t2 = Instant::now();
    let mut clients: Vec<Subscriber> = vec![first];
    clients.extend(open_clients(&target, "user", FIRST_CLIENTS - 1).await?);
    let hpas = Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), &ns);
    eventually("the HPA to ask for more relays", || async {
        let h = hpas.get(GATEWAY).await?;
        let desired = h.status.as_ref().map_or(0, |s| s.desired_replicas);
        Ok((desired > 1).then_some(()))
    })
    .await?;
    eprintln!(
        "FIGURE {FIRST_CLIENTS} connections -> HPA desires more: {}",
        secs(t2)
    );
    gateway::wait_available(&deployments, GATEWAY, MAX_REPLICAS).await?;
    eprintln!("FIGURE -> {MAX_REPLICAS} relay pods Ready: {}", secs(t2));
    gateway::wait_endpoints_ready(&client, &ns, GATEWAY, MAX_REPLICAS as usize).await?;
    // kube-proxy programs the new endpoints within its sync period (1 s by default) of
    // the EndpointSlice change; there is nothing to watch for that, so give it two.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before: BTreeMap<String, i64> = pod_connections(&ns).await?;
    clients.extend(open_clients(&target, "late", LATER_CLIENTS).await?);
    let total = (FIRST_CLIENTS + LATER_CLIENTS) as i64;
    let after = eventually("the metrics API to count every connection", || async {
        let per_pod = pod_connections(&ns).await?;
        Ok((per_pod.values().sum::<i64>() == total).then_some(per_pod))
    })
    .await?;
    eprintln!("connections per relay pod before the later clients: {before:?}, after: {after:?}");
    let new_pods_took_some = after
        .iter()
        .any(|(pod, n)| *n > 0 && before.get(pod).copied().unwrap_or(0) == 0);
    ensure!(
        new_pods_took_some,
        "no pod added by the HPA took a new connection: before {before:?}, after {after:?}"
    );
    let gw = gateways.get(GATEWAY).await?;
    eprintln!("gateway status: {}", serde_json::to_string(&gw.status)?);

    // --- resumable clients join: the same fleet, a binding with history ---
    let js = async_nats::jetstream::new(nats.clone());
    let orders = Feed {
        channel: "orders".into(),
        subject: format!("e2e.{ns}.orders"),
    };
    let published = Arc::new(Published::default());
    let counter = Arc::new(AtomicU64::new(0));
    eventually("the orders history stream to store a message", || async {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        match resumable::publish_acked(&js, &orders, n, &published).await {
            Ok(_) => Ok(Some(())),
            Err(e) => {
                tracing::info!("stream not there yet: {e:#}");
                Ok(None)
            }
        }
    })
    .await?;
    let resumable_clients = resumable::open_clients(
        &url,
        std::slice::from_ref(&orders.channel),
        RESUMABLE_CLIENTS,
        |i| token(&format!("resumer{i}")),
        &published,
        4,
    )
    .await?;

    // --- change the gateway -> rolling update drains old pods; clients reconnect ---
    let t3 = Instant::now();
    let old_pods = gateway::relay_pods(&client, &ns, GATEWAY).await?;
    let stop = CancellationToken::new();
    let publisher = tokio::spawn(publish_steadily(
        nats.clone(),
        subject.clone(),
        seq.clone(),
        stop.clone(),
    ));
    let resumable_publisher = tokio::spawn(resumable::publish_steadily(
        js.clone(),
        vec![orders.clone()],
        PUBLISH_RATE,
        published.clone(),
        counter.clone(),
        stop.clone(),
    ));
    let first_seq = seq.load(Ordering::SeqCst) + 1;
    let orders_from = published.heads();
    tokio::time::sleep(Duration::from_secs(1)).await;
    gateways
        .patch(
            GATEWAY,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "limits": { "publishRatePerSecond": 7 } } })),
        )
        .await?;
    gateway::wait_rollout(&client, &ns, GATEWAY, &old_pods).await?;
    eprintln!("FIGURE rollout of {} pods: {}", old_pods.len(), secs(t3));
    // Let the last reconnections settle, then stop publishing and count.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let last_seq = publisher.await??;
    resumable_publisher.await?;
    let published_plain: Vec<u64> = (first_seq..=last_seq).collect();
    // The last messages are still on their way to the clients when the publisher stops:
    // wait for them (bounded) rather than for a fixed second, before counting and checking.
    let tail: Vec<u64> = published_plain.iter().rev().take(5).copied().collect();
    let tail_by = Instant::now() + Duration::from_secs(30);
    while Instant::now() < tail_by
        && !clients.iter().all(|c| {
            let got = c.stats.received();
            tail.iter().all(|s| got.contains(s))
        })
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut lost = Vec::new();
    for c in &clients {
        lost.push(c.stats.missing(published_plain.iter().copied()));
    }
    let drains: u32 = clients
        .iter()
        .map(|c| c.stats.drains.load(Ordering::Relaxed))
        .sum();
    let unexpected: u32 = clients
        .iter()
        .map(|c| c.stats.unexpected_closes.load(Ordering::Relaxed))
        .sum();
    let lost_total: usize = lost.iter().sum();
    // Plain channels are at-most-once by design (docs/protocol.md): a message published while
    // a client is between two relays is not delivered to it. The count is reported, not
    // asserted.
    eprintln!(
        "FIGURE rollout, plain channel (at-most-once, not asserted): {} messages published to {} clients, {} deliveries lost ({:.3}%), per client {lost:?}; drain notices {drains}, closes without notice {unexpected}",
        published_plain.len(),
        clients.len(),
        lost_total,
        100.0 * lost_total as f64 / (published_plain.len() * clients.len()).max(1) as f64
    );
    ensure!(
        drains as usize >= clients.len(),
        "every client was on an old pod, so each should have had a drain notice; got {drains}"
    );
    // Every client is subscribed again on a new pod: the last messages reached all of them.
    for (i, c) in clients.iter().enumerate() {
        let got = c.stats.received();
        ensure!(
            tail.iter().all(|s| got.contains(s)),
            "client {i} is not receiving after the rollout (last seqs {tail:?})"
        );
    }
    // Resumable channels promise more: every message the stream stored, once, in order.
    let resumed = resumable::tally(
        &resumable_clients,
        &published,
        &orders_from,
        &published.heads(),
        Duration::from_secs(30),
    )
    .await;
    eprintln!("{}", resumed.line("fleet rollout, resumable channel"));
    let publish_errors = published.errors.load(Ordering::Relaxed);
    ensure!(
        publish_errors == 0,
        "{publish_errors} publishes on the resumable channel were not acknowledged by JetStream"
    );
    ensure!(
        !resumed.failed(),
        "the rollout broke the resumable channel: lost {}, duplicated {}, chain breaks {}, recovered:false {}, foreign {}, behind {}, gave up {:?}; {:?}",
        resumed.lost,
        resumed.counters.duplicates,
        resumed.counters.chain_breaks,
        resumed.counters.not_recovered,
        resumed.foreign,
        resumed.behind,
        resumed.gave_up,
        resumed.anomalies
    );
    ensure!(
        resumed.counters.resubscribes as usize >= resumable_clients.len(),
        "every resumable client was on an old pod and should have resumed; {} resumes",
        resumed.counters.resubscribes
    );

    // --- delete -> nothing left ---
    let t4 = Instant::now();
    drop(clients);
    drop(resumable_clients);
    gateways.delete(GATEWAY, &Default::default()).await?;
    wait_nothing_left(&client, &ns).await?;
    eprintln!(
        "FIGURE gateway deleted -> all its objects gone: {}",
        secs(t4)
    );
    let mut c = helm();
    c.args([
        "uninstall",
        RELEASE,
        "--namespace",
        &ns,
        "--wait",
        "--timeout",
        "120s",
    ]);
    run(c)?;
    release.uninstalled = true;
    resumable::delete_stream_of(&nats_url()?, &format!("e2e.{ns}.orders")).await;
    let leftovers = chart_leftovers(&ns)?;
    ensure!(
        leftovers.is_empty(),
        "after helm uninstall these remain: {leftovers:?}"
    );
    eprintln!("FIGURE whole scenario: {}", secs(t0));
    Ok(())
}

fn install_chart(ns: &str) -> Result<Release> {
    let chart = repo_root().join("charts/wsrelay-operator");
    let mut c = helm();
    c.args(["install", RELEASE])
        .arg(&chart)
        .args(["--namespace", ns, "--wait=false"]);
    if let Ok(extra) = std::env::var("E2E_HELM_ARGS") {
        c.args(extra.split_whitespace());
    }
    run(c).context("helm install")?;
    Ok(Release {
        namespace: ns.to_string(),
        uninstalled: false,
    })
}

/// The chart's operator Deployment (found by its label, whatever the chart names it).
async fn operator_deployment(deployments: &Api<Deployment>) -> Result<String> {
    let list = deployments
        .list(&ListParams::default().labels("app.kubernetes.io/name=wsrelay-operator"))
        .await?;
    let d = list
        .items
        .first()
        .context("the chart made no Deployment labelled app.kubernetes.io/name=wsrelay-operator")?;
    Ok(d.name_any())
}

async fn wait_apiservices_available() -> Result<()> {
    eventually("the custom metrics APIServices to be Available", || async {
        let out = tokio::task::spawn_blocking(|| {
            let mut c = kubectl();
            c.args([
                "get",
                "apiservice",
                "v1beta2.custom.metrics.k8s.io",
                "-o",
                "json",
            ]);
            c.output()
        })
        .await??;
        if !out.status.success() {
            return Ok(None);
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let available = v["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Available" && c["status"] == "True");
        Ok(available.then_some(()))
    })
    .await
}

async fn create_gateway(client: &Client, ns: &str) -> Result<()> {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "fleet-jwt" },
        "stringData": { "hmac": HMAC_KEY }
    }))?;
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await?;
    let gateway_nats = gateway::gateway_nats_url()?;
    let gw: WebsocketGateway = serde_json::from_value(json!({
        "apiVersion": "wsrelay.dev/v1alpha1",
        "kind": "WebsocketGateway",
        "metadata": { "name": GATEWAY },
        "spec": {
            "nats": { "urls": [gateway_nats] },
            "auth": { "jwt": {
                "hmacSecretRef": { "name": "fleet-jwt", "key": "hmac" },
                "tokenSources": [{ "from": "Query", "name": "token" }]
            } },
            "bindings": [
                { "channel": "news", "subject": format!("e2e.{ns}.news") },
                {
                    "channel": "orders",
                    "subject": format!("e2e.{ns}.orders"),
                    "history": { "maxMessages": 200, "maxAgeSeconds": 300 }
                },
                {
                    "channel": "rooms.{room}",
                    "subject": format!("e2e.{ns}.rooms.{{room}}"),
                    "authorize": { "request": { "subject": authz_subject(ns), "timeoutMs": 2000 } }
                }
            ],
            "autoscaling": {
                "minReplicas": 1,
                "maxReplicas": MAX_REPLICAS,
                "targetConnectionsPerPod": TARGET_PER_POD,
                "scaleDownStabilizationSeconds": 300
            },
            "limits": { "maxConnectionsPerSubject": 2 },
            "drain": { "gracePeriodSeconds": 6 },
            "service": { "type": gateway::service_type(), "port": 80 },
            "resources": { "requests": { "cpu": "10m", "memory": "16Mi" } }
        }
    }))?;
    wsrelay_e2e::operator::create_gateway(client, ns, &gw).await?;
    Ok(())
}

/// The subject the example backend serves for this test's relays (a namespace of its own).
fn authz_subject(ns: &str) -> String {
    format!("e2e.{ns}.authz")
}

/// Opens `n` subscribers like `target`, each with a token of its own (`{prefix}{i}`).
async fn open_clients(target: &Target, prefix: &str, n: usize) -> Result<Vec<Subscriber>> {
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let own = Target {
            token: token(&format!("{prefix}{i}"))?,
            ..target.clone()
        };
        clients.push(subscriber::start(own).await?);
    }
    Ok(clients)
}

/// An HS256 JWT for `sub`, valid for an hour.
fn token(sub: &str) -> Result<String> {
    gateway::hs256_token(HMAC_KEY, sub)
}

async fn publish(nats: &async_nats::Client, subject: &str, seq: &AtomicU64) -> Result<u64> {
    let n = seq.fetch_add(1, Ordering::SeqCst) + 1;
    nats.publish(subject.to_string(), json!({ "seq": n }).to_string().into())
        .await?;
    nats.flush().await?;
    Ok(n)
}

/// Publishes once a second until `sub` received one of the messages.
async fn publish_until_received(
    nats: &async_nats::Client,
    subject: &str,
    seq: &AtomicU64,
    sub: &Subscriber,
) -> Result<()> {
    eventually(
        "a message published on NATS to reach the WebSocket client",
        || async {
            publish(nats, subject, seq).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok((!sub.stats.received().is_empty()).then_some(()))
        },
    )
    .await
}

/// Publishes at [`PUBLISH_RATE`] until stopped; returns the last sequence number.
async fn publish_steadily(
    nats: async_nats::Client,
    subject: String,
    seq: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Result<u64> {
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / PUBLISH_RATE));
    let mut last = seq.load(Ordering::SeqCst);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(last),
            _ = tick.tick() => last = publish(&nats, &subject, &seq).await?,
        }
    }
}

/// Open connections per relay pod, as the custom metrics API reports them (the same values
/// the HPA reads).
async fn pod_connections(ns: &str) -> Result<BTreeMap<String, i64>> {
    let selector = format!("{INSTANCE_LABEL}={GATEWAY}");
    let path = format!(
        "/apis/custom.metrics.k8s.io/v1beta2/namespaces/{ns}/pods/*/{}?labelSelector={selector}",
        wsrelay_operator::metrics_api::CONNECTIONS_METRIC
    );
    let out = tokio::task::spawn_blocking(move || {
        let mut c = kubectl();
        c.args(["get", "--raw", &path, "--request-timeout=20s"]);
        run(c)
    })
    .await??;
    let list: Value = serde_json::from_slice(&out.stdout)?;
    let mut per_pod = BTreeMap::new();
    for item in list["items"].as_array().into_iter().flatten() {
        let pod = item["describedObject"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let value = item["value"]
            .as_str()
            .unwrap_or("0")
            .parse::<i64>()
            .unwrap_or(0);
        per_pod.insert(pod, value);
    }
    Ok(per_pod)
}

/// Waits until no object the operator made for the gateway remains, pods included.
async fn wait_nothing_left(client: &Client, ns: &str) -> Result<()> {
    let lp = ListParams::default().labels(&format!("{INSTANCE_LABEL}={GATEWAY}"));
    eventually("every object of the deleted gateway to be gone", || async {
        let mut left = Vec::new();
        left.extend(names::<Deployment>(client, ns, &lp).await?);
        left.extend(names::<Service>(client, ns, &lp).await?);
        left.extend(names::<HorizontalPodAutoscaler>(client, ns, &lp).await?);
        left.extend(names::<ConfigMap>(client, ns, &lp).await?);
        left.extend(names::<ServiceAccount>(client, ns, &lp).await?);
        left.extend(names::<PodDisruptionBudget>(client, ns, &lp).await?);
        left.extend(names::<NetworkPolicy>(client, ns, &lp).await?);
        left.extend(names::<Pod>(client, ns, &lp).await?);
        if !left.is_empty() {
            tracing::info!(?left, "waiting for the gateway's objects to go");
        }
        Ok(left.is_empty().then_some(()))
    })
    .await
}

async fn names<K>(client: &Client, ns: &str, lp: &ListParams) -> Result<Vec<String>>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    let kind = K::kind(&Default::default()).to_string();
    let list = Api::<K>::namespaced(client.clone(), ns).list(lp).await?;
    Ok(list
        .items
        .iter()
        .map(|o| format!("{kind}/{}", o.name_any()))
        .collect())
}

/// Objects of the release that outlive `helm uninstall` (CRDs excepted: Helm keeps them by
/// design, so gateways elsewhere in the cluster are not deleted with the chart).
fn chart_leftovers(ns: &str) -> Result<Vec<String>> {
    let selector = format!("app.kubernetes.io/instance={RELEASE}");
    let mut left = Vec::new();
    for (kinds, namespaced) in [
        (
            "deployments,services,serviceaccounts,secrets,configmaps,roles,rolebindings,poddisruptionbudgets",
            true,
        ),
        (
            "clusterroles,clusterrolebindings,apiservices,validatingwebhookconfigurations",
            false,
        ),
    ] {
        let mut c = kubectl();
        c.args(["get", kinds, "-l", &selector, "-o", "name"]);
        if namespaced {
            c.args(["--namespace", ns]);
        }
        let out = run(c)?;
        left.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string),
        );
    }
    // The extension-apiserver-authentication-reader binding lives in kube-system.
    let mut c = kubectl();
    c.args([
        "get",
        "rolebindings",
        "-n",
        "kube-system",
        "-l",
        &selector,
        "-o",
        "name",
    ]);
    let out = run(c)?;
    left.extend(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string),
    );
    Ok(left)
}
