//! The chart's monitoring against a real Prometheus and the local fleet (issue 16).
//!
//! - installs the chart (operator, metrics API) and a gateway with autoscaling, like the
//!   fleet test;
//! - renders the chart's PodMonitors (`monitoring.podMonitor.enabled`) and turns them into the
//!   scrape config the Prometheus Operator generates from them (`wsrelay_e2e::prometheus`:
//!   kubernetes_sd on pods through the local API server, the same keep rules, target labels
//!   and relabelings), plus the API server's own /metrics as a static target;
//! - starts the pinned Prometheus (built from the Go module proxy by `e2e/cluster/tools.sh
//!   prometheus`) on loopback with a 5 s scrape interval, and checks it scrapes both operator
//!   pods and every relay pod;
//! - runs load: 10 clients through the Service (the HPA scales to 3 pods), a publisher at
//!   20/s, a handshake with a bad token every 2 s;
//! - while it runs, executes every PromQL expression of the dashboard
//!   (`charts/wsrelay-operator/dashboards/wsrelay.json`; `$namespace` and `$gateway` set to
//!   this test's gateway, `$__rate_interval` to 30s) until each returns at least one series,
//!   and fails naming those that never do; executes every alert expression of
//!   `monitoring/alerts.yaml` (each must evaluate; which fire is printed);
//! - writes the dashboard's queries over the load window (query_range) to
//!   `target/observability/dashboard-data.json`, from which `e2e/prometheus/plot.py` draws
//!   docs/operations/dashboard.png.
//!
//! Needs the node (pod IPs routed from this machine); without one it says SKIPPED, unless
//! `E2E_REQUIRE_NODE=1`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use wsrelay_e2e::gateway;
use wsrelay_e2e::prometheus::{self, Cluster, Server};
use wsrelay_e2e::subscriber::{self, Subscriber, Target};
use wsrelay_e2e::tools::{helm, run};
use wsrelay_e2e::{eventually, kubeconfig_path, nats_url, repo_root, with_namespace};
use wsrelay_operator::api::WebsocketGateway;

const RELEASE: &str = "wsrelay";
const GATEWAY: &str = "obs";
const HMAC_KEY: &str = "e2e-observability-hmac-key-32-bytes!!";
const CLIENTS: usize = 10;
const PUBLISH_PER_SECOND: u64 = 20;
/// How long the dashboard's expressions may take to all return a series under load.
const QUERY_DEADLINE: Duration = Duration::from_secs(240);
/// Seconds of load the plot data covers at least (a rolling update happens in it).
const PLOT_SECONDS: u64 = 90;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_fleet_and_every_dashboard_query_returns_series() -> Result<()> {
    let client = wsrelay_e2e::client().await?;
    if !gateway::node_or_skip(&client, "observability e2e").await? {
        return Ok(());
    }
    with_namespace("obs", |client, ns| async move {
        let subject = format!("e2e.{ns}.orders");
        let outcome = scenario(client, ns).await;
        // The relays create the history stream and nobody else removes it: JetStream reserves
        // its maxBytes (256 MiB) until then, and a few runs' leftovers filled the local server.
        if let Ok(url) = nats_url() {
            wsrelay_e2e::resumable::delete_stream_of(&url, &subject).await;
        }
        outcome
    })
    .await
}

/// Uninstalls the chart on drop, pass or fail.
struct Release(String);

impl Drop for Release {
    fn drop(&mut self) {
        let mut c = helm();
        c.args([
            "uninstall",
            RELEASE,
            "--namespace",
            &self.0,
            "--wait",
            "--timeout",
            "60s",
        ]);
        if let Err(e) = run(c) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// The rendered monitoring objects of the chart for namespace `ns`.
fn rendered_monitors(ns: &str) -> Result<Vec<Value>> {
    let mut c = helm();
    c.args(["template", RELEASE])
        .arg(repo_root().join("charts/wsrelay-operator"))
        .args([
            "--namespace",
            ns,
            "--show-only",
            "templates/monitoring.yaml",
        ])
        .args(["--set", "monitoring.podMonitor.enabled=true"])
        .args(["--set", "monitoring.podMonitor.interval=5s"])
        .args(["--set", "monitoring.podMonitor.scrapeTimeout=4s"]);
    let out = run(c).context("helm template (monitoring)")?;
    let text = String::from_utf8(out.stdout)?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// The API server's address and the kubeconfig's CA and client certificate files.
fn apiserver_files() -> Result<(String, String, String, String)> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig_path())?;
    let cluster = kc
        .clusters
        .first()
        .and_then(|c| c.cluster.clone())
        .context("kubeconfig without a cluster")?;
    let user = kc
        .auth_infos
        .first()
        .and_then(|a| a.auth_info.clone())
        .context("kubeconfig without a user")?;
    Ok((
        cluster.server.context("server")?,
        cluster
            .certificate_authority
            .context("the observability test needs certificate-authority as a file")?,
        user.client_certificate
            .context("the observability test needs client-certificate as a file")?,
        user.client_key
            .context("the observability test needs client-key as a file")?,
    ))
}

/// Every `expr` of the dashboard JSON, with its variables set for this test.
fn dashboard_exprs(ns: &str) -> Result<Vec<(String, String)>> {
    let path = repo_root().join("charts/wsrelay-operator/dashboards/wsrelay.json");
    let d: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let mut out = Vec::new();
    for p in d["panels"].as_array().context("panels")? {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().context("expr")?;
            let expr = expr
                .replace("$__rate_interval", "30s")
                .replace("$namespace", ns)
                .replace("$gateway", GATEWAY);
            out.push((p["title"].as_str().unwrap_or("").to_string(), expr));
        }
    }
    ensure!(!out.is_empty(), "no expr in {}", path.display());
    Ok(out)
}

/// Every alert expression of monitoring/alerts.yaml.
fn alert_exprs() -> Result<Vec<(String, String)>> {
    let path = repo_root().join("charts/wsrelay-operator/monitoring/alerts.yaml");
    let v: Value = serde_yaml::from_slice(&std::fs::read(&path)?)?;
    let mut out = Vec::new();
    for g in v["groups"].as_array().context("groups")? {
        for r in g["rules"].as_array().context("rules")? {
            out.push((
                r["alert"].as_str().context("alert")?.to_string(),
                r["expr"].as_str().context("expr")?.to_string(),
            ));
        }
    }
    Ok(out)
}

async fn scenario(client: Client, ns: String) -> Result<()> {
    let t0 = Instant::now();
    // --- the chart and a gateway ---
    let mut c = helm();
    c.args(["install", RELEASE])
        .arg(repo_root().join("charts/wsrelay-operator"))
        .args(["--namespace", &ns, "--wait=false"]);
    if let Ok(extra) = std::env::var("E2E_HELM_ARGS") {
        c.args(extra.split_whitespace());
    }
    run(c).context("helm install")?;
    let _release = Release(ns.clone());
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    gateway::wait_available(&deployments, "wsrelay-wsrelay-operator", 2).await?;
    create_gateway(&client, &ns).await?;
    gateway::wait_available(&deployments, GATEWAY, 1).await?;
    gateway::wait_endpoints_ready(&client, &ns, GATEWAY, 1).await?;
    let url = gateway::service_url(&client, &ns, GATEWAY).await?;
    eprintln!(
        "FIGURE operator and first relay Ready: {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    // --- Prometheus, scraping like the rendered PodMonitors ---
    let monitors = rendered_monitors(&ns)?;
    let cluster = Cluster {
        kubeconfig: kubeconfig_path(),
    };
    let mut scrape = prometheus::pod_monitor_scrape_configs(&monitors, &cluster)?;
    let (server, ca, cert, key) = apiserver_files()?;
    scrape.push(prometheus::apiserver_scrape_config(
        &server,
        ca.as_ref(),
        cert.as_ref(),
        key.as_ref(),
    ));
    let config = json!({
        "global": { "scrape_interval": "5s", "scrape_timeout": "4s", "evaluation_interval": "5s" },
        "scrape_configs": scrape,
    });
    let dir = std::env::temp_dir().join(format!("wsrelay-obs-{ns}"));
    std::fs::create_dir_all(&dir)?;
    let _dir = RemoveDir(dir.clone());
    let prom = Server::start(&dir, &config).await?;
    eprintln!(
        "prometheus on {} (config {})",
        prom.addr,
        dir.join("prometheus.yml").display()
    );

    // --- load ---
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let nats = async_nats::connect(nats_url()?)
        .await
        .context("connecting to NATS")?;
    let subject = format!("e2e.{ns}.news");
    let publisher = {
        let (stop, published, nats, subject) = (
            stop.clone(),
            published.clone(),
            nats.clone(),
            subject.clone(),
        );
        tokio::spawn(async move {
            let every = Duration::from_millis(1000 / PUBLISH_PER_SECOND);
            // Bounded: at most the query deadline plus slack.
            let end = Instant::now() + QUERY_DEADLINE + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                let n = published.fetch_add(1, Ordering::Relaxed);
                let _ = nats
                    .publish(subject.clone(), json!({ "seq": n }).to_string().into())
                    .await;
                tokio::time::sleep(every).await;
            }
        })
    };
    let target = Target {
        url: url.clone(),
        token: token("user0")?,
        channel: "news".into(),
    };
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
    let mut clients: Vec<Subscriber> = vec![first];
    for i in 1..CLIENTS {
        let t = Target {
            token: token(&format!("user{i}"))?,
            ..target.clone()
        };
        clients.push(subscriber::start(t).await?);
    }
    let refusals = {
        let (stop, bad) = (
            stop.clone(),
            Target {
                token: "not-a-jwt".into(),
                ..target.clone()
            },
        );
        tokio::spawn(async move {
            for _ in 0..200 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let _ = subscriber::connect_and_subscribe(&bad).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };
    let load_start = unix_now();

    // --- targets: both operator replicas and every relay pod are scraped ---
    let targets = eventually(
        "Prometheus to scrape the operator pods and the relay pods",
        || async {
            let data = prom.api("targets", &[("state", "active")]).await?;
            let mut up: BTreeMap<String, usize> = BTreeMap::new();
            for t in data["activeTargets"].as_array().into_iter().flatten() {
                let labels = &t["labels"];
                if t["health"] == "up" && labels["namespace"] == ns.as_str() {
                    *up.entry(labels["job"].as_str().unwrap_or("").to_string())
                        .or_default() += 1;
                }
            }
            let operator = up
                .get(&format!("{ns}/wsrelay-wsrelay-operator"))
                .copied()
                .unwrap_or(0);
            let relays = up
                .get(&format!("{ns}/wsrelay-wsrelay-operator-relays"))
                .copied()
                .unwrap_or(0);
            Ok((operator == 2 && relays >= 1).then_some(up))
        },
    )
    .await?;
    eprintln!("FIGURE targets up in this namespace: {targets:?}");
    let gateway_label = prom
        .query(&format!("wsrelay_connections{{namespace=\"{ns}\"}}"))
        .await?;
    ensure!(
        gateway_label
            .iter()
            .all(|s| s["metric"]["gateway"] == GATEWAY),
        "relay series without gateway=\"{GATEWAY}\": {gateway_label:?}"
    );

    // --- every dashboard query returns a series while the load runs ---
    let exprs = dashboard_exprs(&ns)?;
    let started = Instant::now();
    let mut missing: Vec<(String, String)>;
    loop {
        missing = Vec::new();
        for (title, expr) in &exprs {
            let result = prom
                .query(expr)
                .await
                .with_context(|| format!("{title}: {expr}"))?;
            // A series whose only value is NaN (a quantile of nothing) does not count.
            let finite = result.iter().any(|s| {
                s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(f64::is_finite)
            });
            if !finite {
                missing.push((title.clone(), expr.clone()));
            }
        }
        if missing.is_empty() || started.elapsed() > QUERY_DEADLINE {
            break;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    eprintln!(
        "FIGURE dashboard: {} of {} expressions returned series, {:.0}s after the first pass ({} clients, {} published at {PUBLISH_PER_SECOND}/s)",
        exprs.len() - missing.len(),
        exprs.len(),
        started.elapsed().as_secs_f64(),
        clients.len(),
        published.load(Ordering::Relaxed)
    );
    // Each alert expression evaluates against the live data.
    for (alert, expr) in alert_exprs()? {
        let result = prom
            .query(&expr)
            .await
            .with_context(|| format!("{alert}: {expr}"))?;
        let here: Vec<&Value> = result
            .iter()
            .filter(|s| {
                s["metric"]["namespace"].is_null() || s["metric"]["namespace"] == ns.as_str()
            })
            .collect();
        eprintln!(
            "alert {alert}: {} series (condition true now, before `for`)",
            here.len()
        );
    }
    // The API server is scraped too (the custom metrics API alert reads it): available.
    let api = prom
        .query("aggregator_unavailable_apiservice{name=\"v1beta2.custom.metrics.k8s.io\"}")
        .await?;
    ensure!(
        api.iter().any(|s| s["value"][1] == "0"),
        "the API server's aggregator_unavailable_apiservice for v1beta2.custom.metrics.k8s.io is not 0: {api:?}"
    );
    // For the plot: a rolling update under load (the drain panels move), then the data of
    // every panel over at least PLOT_SECONDS of load.
    let gateways = Api::<WebsocketGateway>::namespaced(client.clone(), &ns);
    gateways
        .patch(
            GATEWAY,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "drain": { "gracePeriodSeconds": 8 } } })),
        )
        .await?;
    let until = load_start + PLOT_SECONDS;
    let wait = until.saturating_sub(unix_now());
    tokio::time::sleep(Duration::from_secs(wait.max(20))).await;
    let load_end = unix_now();
    write_plot_data(&prom, &exprs, load_start - 30, load_end).await?;

    stop.store(true, Ordering::Relaxed);
    let _ = publisher.await;
    let _ = refusals.await;
    drop(clients);
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|(t, e)| format!("  {t}: {e}")).collect();
        bail!(
            "{} dashboard expressions returned no series within {:?}:\n{}",
            missing.len(),
            QUERY_DEADLINE,
            list.join("\n")
        );
    }
    Ok(())
}

/// Removes a directory on drop.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The range of every dashboard query over [from, to], for e2e/prometheus/plot.py.
async fn write_plot_data(
    prom: &Server,
    exprs: &[(String, String)],
    from: u64,
    to: u64,
) -> Result<()> {
    let mut panels: Vec<Value> = Vec::new();
    for (title, expr) in exprs {
        let data = prom
            .api(
                "query_range",
                &[
                    ("query", expr),
                    ("start", &from.to_string()),
                    ("end", &to.to_string()),
                    ("step", "5"),
                ],
            )
            .await?;
        panels.push(json!({ "title": title, "expr": expr, "result": data["result"] }));
    }
    let dir = repo_root().join("target/observability");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("dashboard-data.json");
    std::fs::write(
        &file,
        serde_json::to_vec_pretty(&json!({ "from": from, "to": to, "queries": panels }))?,
    )?;
    eprintln!("wrote {}", file.display());
    Ok(())
}

async fn create_gateway(client: &Client, ns: &str) -> Result<()> {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "obs-jwt" },
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
            "nats": { "urls": [gateway::gateway_nats_url()?] },
            "auth": { "jwt": {
                "hmacSecretRef": { "name": "obs-jwt", "key": "hmac" },
                "tokenSources": [{ "from": "Query", "name": "token" }]
            } },
            "bindings": [
                { "channel": "news", "subject": format!("e2e.{ns}.news") },
                {
                    "channel": "orders",
                    "subject": format!("e2e.{ns}.orders"),
                    "history": { "maxMessages": 100, "maxAgeSeconds": 300 }
                }
            ],
            "autoscaling": {
                "minReplicas": 1,
                "maxReplicas": 3,
                "targetConnectionsPerPod": 4,
                "scaleDownStabilizationSeconds": 300
            },
            "drain": { "gracePeriodSeconds": 6 },
            "service": { "type": gateway::service_type(), "port": 80 },
            "resources": { "requests": { "cpu": "10m", "memory": "16Mi" } }
        }
    }))?;
    wsrelay_e2e::operator::create_gateway(client, ns, &gw).await?;
    Ok(())
}

fn token(sub: &str) -> Result<String> {
    gateway::hs256_token(HMAC_KEY, sub)
}
