//! The browser client against a gateway on the node (issue 12): headless Debian Chromium runs a
//! page that uses the built SDK (clients/js/dist) and connects through the gateway's Service
//! with a JWT, subscribes to a resumable channel (a binding with history) while NATS messages
//! are published at a steady rate; a second page whose WebSocket is blocked does the same over
//! the SSE fallback (the Service has `sessionAffinity: None`: its stream and each POST may reach
//! any pod, and a POST that reaches another pod than the session's is forwarded to it over
//! NATS), and publishes 100 messages before the first disruption and 100 after the last, none
//! of its POSTs refused with 404. Then, in turn:
//! 1. the relay processes holding the pages' connections are killed with SIGKILL (found from
//!    this machine's pid namespace by their containers' cgroups; kubelet restarts the
//!    containers; on a cluster whose processes this machine cannot see, the pods are
//!    force-deleted instead);
//! 2. the pods holding the connections are deleted (a graceful drain, as a rollout or a node
//!    drain does).
//!
//! After each the page must reconnect by itself and resume with `recovered: true`; at the end
//! every message published must have arrived once, in order, with an unbroken position chain.
//! The browser side is clients/js/test/browser/gateway.e2e.mjs (the same harness as the SDK's
//! own browser suite, run with node); this test creates the gateway, runs the script, and
//! disrupts the pods when it says `DISRUPT <n>`.
//!
//! The operator runs in this process (the current code, scoped to the test's namespace); the
//! relays are the node's imported image. Needs node, Chromium (`make deps`) and the built SDK
//! (`make sdk`); without a Ready node the test says SKIPPED, unless `E2E_REQUIRE_NODE=1`.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use wsrelay_e2e::gateway;
use wsrelay_e2e::operator::{Operator, install_crd};
use wsrelay_e2e::{eventually, nats_url, repo_root, resumable, with_namespace};
use wsrelay_operator::api::WebsocketGateway;

const GATEWAY: &str = "browser";
/// The key the SDK harness signs the page's tokens with (iss https://issuer.test, aud wsrelay).
const HMAC_KEY: &str = "e2e-browser-hmac-key-of-at-least-32-bytes";
const REPLICAS: i32 = 2;
/// The whole browser run, disruptions included, must end within this.
const SCRIPT_LIMIT: Duration = Duration::from_secs(420);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_sdk_resumes_through_the_service_across_relay_kill_and_pod_delete() -> Result<()> {
    let client = wsrelay_e2e::client().await?;
    if !gateway::node_or_skip(&client, "browser e2e").await? {
        return Ok(());
    }
    let script = repo_root().join("clients/js/test/browser/gateway.e2e.mjs");
    let sdk = repo_root().join("clients/js/dist/esm/index.js");
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let missing: Vec<String> = [
        (!sdk.is_file()).then(|| format!("{} (make sdk)", sdk.display())),
        (!chromium.is_file()).then(|| format!("{} (make deps, or CHROMIUM)", chromium.display())),
        Command::new("node")
            .arg("--version")
            .output()
            .is_err()
            .then(|| "node".to_string()),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !missing.is_empty() {
        if std::env::var("E2E_REQUIRE_NODE").is_ok_and(|v| v == "1") {
            bail!("the browser e2e needs {}", missing.join(", "));
        }
        eprintln!("SKIPPED browser e2e: missing {}", missing.join(", "));
        return Ok(());
    }
    with_namespace("browser", |client, ns| async move {
        install_crd(&client).await?;
        let operator = Operator::start(client.clone(), &ns, None);
        let outcome = scenario(&client, &ns, &script).await;
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
    format!("e2e.{ns}.feed")
}

fn pub_prefix(ns: &str) -> String {
    format!("e2e.{ns}.pub")
}

async fn scenario(client: &Client, ns: &str, script: &std::path::Path) -> Result<()> {
    let t0 = Instant::now();
    create_gateway(client, ns).await?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    gateway::wait_available(&deployments, GATEWAY, REPLICAS).await?;
    gateway::wait_endpoints_ready(client, ns, GATEWAY, REPLICAS as usize).await?;
    let url = gateway::service_url(client, ns, GATEWAY).await?;
    eprintln!(
        "{REPLICAS} relay pods Ready in {:.1}s, Service at {url}",
        t0.elapsed().as_secs_f64()
    );

    // The relays create the history stream: wait until it stores a message (on another
    // channel than the page's).
    let nats = async_nats::connect(nats_url()?)
        .await
        .context("connecting to NATS")?;
    let js = async_nats::jetstream::new(nats);
    let warm = resumable::Feed {
        channel: "feed.0".into(),
        subject: format!("{}.0", subject_prefix(ns)),
    };
    let published = resumable::Published::default();
    eventually("the history stream to store a message", || async {
        Ok(resumable::publish_acked(&js, &warm, 0, &published)
            .await
            .ok())
    })
    .await?;

    let mut node = Command::new("node");
    node.arg(script)
        .current_dir(repo_root().join("clients/js"))
        .env("WSRELAY_E2E_URL", &url)
        .env("WSRELAY_E2E_HMAC_KEY", HMAC_KEY)
        .env("WSRELAY_E2E_NATS_URL", nats_url()?)
        .env("WSRELAY_E2E_SUBJECT", format!("{}.1", subject_prefix(ns)))
        .env("WSRELAY_E2E_CHANNEL", "feed.1")
        .env("WSRELAY_E2E_ROUNDS", "2")
        .env("WSRELAY_E2E_SSE", "1")
        .env("WSRELAY_E2E_PUB_CHANNEL", "pub.1")
        .env("WSRELAY_E2E_PUB_SUBJECT", format!("{}.1", pub_prefix(ns)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = Script::spawn(node)?;
    let deadline = Instant::now() + SCRIPT_LIMIT;
    let outcome = drive(client, ns, &mut child, deadline).await;
    if outcome.is_err() {
        child.kill();
    }
    let status = child.finish(deadline).await;
    outcome?;
    let status = status?;
    let figures = child
        .figures
        .clone()
        .context("the browser script printed no FIGURES line")?;
    eprintln!("FIGURE browser e2e: {figures}");
    ensure!(
        status.success(),
        "the browser script failed ({status}): {figures}"
    );
    let clients = figures["clients"]
        .as_array()
        .context("FIGURES without clients")?;
    ensure!(
        clients.len() == 2,
        "a WebSocket and an SSE client: {figures}"
    );
    ensure!(
        figures["ssePosts"]["byStatus"].get("404").is_none()
            && figures["ssePosts"]["total"].as_u64() >= Some(200)
            && figures["ssePublished"] == 200,
        "the SSE page's POSTs: 200 publishes and more, none refused with 404: {figures}"
    );
    for c in clients {
        ensure!(c["lost"] == 0 && c["duplicates"] == 0, "{c}");
        ensure!(
            c["resumes"].as_array().map(Vec::len) == Some(2),
            "two disruptions felt: {c}"
        );
    }
    // With no affinity, the POSTs after the last disruption reached both pods: some went to
    // the relay without the session, which forwarded them (counted by the relays there now).
    let mut forwarded = 0.0;
    for pod in gateway::relay_pod_objects(client, ns, GATEWAY).await? {
        forwarded += gateway::relay_metric(
            &pod,
            "wsrelay_sse_posts_forwarded_total{reason=\"answered\"}",
        )
        .await
        .unwrap_or(0.0);
    }
    eprintln!(
        "FIGURE browser e2e: {forwarded} SSE POSTs forwarded to the session's relay by the relays running now"
    );
    ensure!(
        forwarded > 0.0,
        "no SSE POST was forwarded: the test did not exercise a POST landing on the wrong pod"
    );
    Ok(())
}

/// Answers the script's `DISRUPT <n>` lines until it prints `FIGURES` or exits.
async fn drive(client: &Client, ns: &str, child: &mut Script, deadline: Instant) -> Result<()> {
    loop {
        let Some(line) = child.next_line(deadline).await? else {
            return Ok(()); // the script ended; its status says how
        };
        if let Some(round) = line.strip_prefix("DISRUPT ") {
            let round: u32 = round.trim().parse().context("DISRUPT <n>")?;
            let what = match round {
                1 => kill_relays_with_pages(client, ns).await?,
                _ => delete_pods_with_pages(client, ns).await?,
            };
            eprintln!("round {round}: {what}");
            child.answer(&format!("DISRUPTED {round}"))?;
        } else if let Some(json) = line.strip_prefix("FIGURES ") {
            child.figures = Some(serde_json::from_str(json).context("FIGURES")?);
        }
    }
}

/// The relay pods holding the pages' two connections (one pod or two: the Service balances
/// each connection on its own). Waited for: after a disruption the pages may still be
/// reconnecting, or be on a restarted relay that is not Ready yet.
async fn pods_with_pages(client: &Client, ns: &str) -> Result<Vec<Pod>> {
    let last = std::sync::atomic::AtomicI64::new(0);
    let found = wsrelay_e2e::eventually("both pages' connections on Ready relay pods", || {
        let last = &last;
        async move {
            let pods = gateway::relay_pods_by_connections(client, ns, GATEWAY).await?;
            let total: i64 = pods.iter().map(|(_, n)| n).sum();
            last.store(total, std::sync::atomic::Ordering::Relaxed);
            // More than the two pages' connections would be someone else's: not waited out.
            ensure!(
                total <= 2,
                "the relay pods have {total} connections, more than the pages'"
            );
            Ok((total == 2).then(|| {
                pods.into_iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(p, _)| p)
                    .collect()
            }))
        }
    })
    .await;
    found.with_context(|| {
        let n = last.load(std::sync::atomic::Ordering::Relaxed);
        format!("the relay pods have {n} connections, not the pages' two")
    })
}

/// Round 1: SIGKILL to the relay process of each pod with a page's connection, or a force
/// delete of the pod when this machine cannot see the node's processes (not root, or not the
/// local node).
async fn kill_relays_with_pages(client: &Client, ns: &str) -> Result<String> {
    let mut done = Vec::new();
    for victim in pods_with_pages(client, ns).await? {
        let pid = gateway::container_id(&victim).and_then(|c| gateway::host_pid_of(&c, "wsrelay"));
        match pid {
            Ok(pid) => {
                let mut kill = Command::new("kill");
                kill.args(["-KILL", &pid.to_string()]);
                wsrelay_e2e::tools::run(kill).context("SIGKILL to the relay process")?;
                done.push(format!(
                    "relay process {pid} of pod {} killed with SIGKILL",
                    victim.name_any()
                ));
            }
            Err(e) => {
                gateway::force_delete_pod(client, ns, &victim.name_any()).await?;
                done.push(format!(
                    "pod {} force-deleted (no relay process to kill here: {e:#})",
                    victim.name_any()
                ));
            }
        }
    }
    Ok(done.join("; "))
}

/// Round 2: the pods with the connections deleted with their grace period (the relays drain).
async fn delete_pods_with_pages(client: &Client, ns: &str) -> Result<String> {
    let mut done = Vec::new();
    for victim in pods_with_pages(client, ns).await? {
        Api::<Pod>::namespaced(client.clone(), ns)
            .delete(&victim.name_any(), &DeleteParams::default())
            .await?;
        done.push(format!("pod {} deleted (drain)", victim.name_any()));
    }
    Ok(done.join("; "))
}

async fn create_gateway(client: &Client, ns: &str) -> Result<()> {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "browser-jwt" },
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
                "hmacSecretRef": { "name": "browser-jwt", "key": "hmac" },
                "issuer": "https://issuer.test",
                "audiences": ["wsrelay"],
                // What the SDK sends: the subprotocol (WebSocket), the query (SSE fallback).
                "tokenSources": [{ "from": "Subprotocol" }, { "from": "Query", "name": "token" }]
            } },
            "bindings": [{
                "channel": "feed.{id}",
                "subject": format!("{}.{{id}}", subject_prefix(ns)),
                "history": { "maxMessages": 1000, "maxAgeSeconds": 600 }
            }, {
                // Where the SSE page publishes (a POST each).
                "channel": "pub.{id}",
                "subject": format!("{}.{{id}}", pub_prefix(ns)),
                "direction": "Publish"
            }],
            // The SSE page publishes 100 messages one after the other (a POST each).
            "limits": { "sendQueueLength": 2000, "publishRatePerSecond": 1000, "publishBurst": 200 },
            "drain": { "gracePeriodSeconds": 5 },
            // The default, spelled out: the SSE client's stream and POSTs may reach any pod.
            "service": { "type": gateway::service_type(), "port": 80, "sessionAffinity": "None" },
            "resources": { "requests": { "cpu": "10m", "memory": "16Mi" } }
        }
    }))?;
    wsrelay_e2e::operator::create_gateway(client, ns, &gw).await?;
    Ok(())
}

/// The node script: its stdout read line by line on a thread, its stdin for answers.
struct Script {
    child: Child,
    lines: mpsc::Receiver<String>,
    figures: Option<Value>,
}

impl Script {
    fn spawn(mut command: Command) -> Result<Self> {
        let mut child = command.spawn().context("starting node")?;
        let stdout = child.stdout.take().context("node's stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            figures: None,
        })
    }

    /// The next line, `None` once the script closed its stdout; fails past `deadline`.
    async fn next_line(&mut self, deadline: Instant) -> Result<Option<String>> {
        loop {
            match self.lines.try_recv() {
                Ok(line) => return Ok(Some(line)),
                Err(mpsc::TryRecvError::Disconnected) => return Ok(None),
                Err(mpsc::TryRecvError::Empty) => {}
            }
            ensure!(
                Instant::now() < deadline,
                "the browser script did not finish within {SCRIPT_LIMIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn answer(&mut self, line: &str) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("node's stdin")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// Waits for the script to exit (killing it past `deadline`), then reads what it printed last.
    fn kill(&mut self) {
        let _ = self.child.kill();
    }

    async fn finish(&mut self, deadline: Instant) -> Result<std::process::ExitStatus> {
        drop(self.child.stdin.take());
        loop {
            if let Some(status) = self.child.try_wait()? {
                // The reader thread ends at the script's end of output, which has come.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(1)) {
                    if let Some(json) = line.strip_prefix("FIGURES ") {
                        self.figures = serde_json::from_str(json).ok();
                    }
                }
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("the browser script did not finish within {SCRIPT_LIMIT:?}: killed");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
