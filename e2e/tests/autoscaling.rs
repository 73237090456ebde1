//! Autoscaling on connection count, on the local cluster: the operator's custom metrics API
//! (run in-process on the host end of a veth pair) registered as an aggregated API, serving
//! the open-connection counts of two real relay processes that real WebSocket clients are
//! connected to. The relays run inside a network namespace of the test's own, because pod
//! IPs and endpoint addresses cannot be loopback.
//!
//! Needs root (network namespaces) and the local cluster (`make cluster-up`); skipped, with
//! a message, when not root.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::{CancellationToken, DropGuard};
use wsrelay_e2e::netns::{self, NetNs};
use wsrelay_e2e::pki;
use wsrelay_e2e::tools::{kubectl, tool};
use wsrelay_e2e::{eventually, repo_root, unique_name, wait_limit, with_namespace};
use wsrelay_operator::api::WebsocketGateway;
use wsrelay_operator::metrics_api::{self, CONNECTIONS_METRIC, MetricsApiConfig};

/// Connections the test opens to each relay.
const CONNECTIONS: [usize; 2] = [3, 5];
const RELAY_CLIENT_PORT: u16 = 8080;
const RELAY_ADMIN_PORT: u16 = 9090;
const SERVICE: &str = "wsrelay-metrics-api";
const GATEWAY: &str = "scaled";
const APISERVICE_VERSIONS: [(&str, i32); 2] = [("v1beta2", 200), ("v1beta1", 100)];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_metrics_api_serves_live_relay_connection_counts() -> Result<()> {
    if !netns::is_root() {
        // As the fleet test: `make test` with a node (E2E_REQUIRE_NODE=1) must not pass
        // with this suite skipped.
        if std::env::var("E2E_REQUIRE_NODE").is_ok_and(|v| v == "1") {
            bail!(
                "E2E_REQUIRE_NODE=1 but the autoscaling e2e test needs root (network namespaces)"
            );
        }
        eprintln!("SKIPPED: the autoscaling e2e test needs root (network namespaces)");
        return Ok(());
    }
    let relay = relay_binary()?;
    with_namespace("autoscale", |client, ns| async move {
        scenario(client, ns, relay).await
    })
    .await
}

/// The relay binary: `WSRELAY_BIN`, else built here (debug, into the current target dir).
fn relay_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("WSRELAY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(repo_root())
        .args([
            "build",
            "-q",
            "-p",
            "wsrelay",
            "--features",
            "server",
            "--bin",
            "wsrelay",
        ])
        .status()
        .context("building the relay")?;
    ensure!(status.success(), "building the relay failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    Ok(target.join("debug/wsrelay"))
}

fn nats_server_binary() -> PathBuf {
    std::env::var_os("NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| tool("nats-server"))
}

/// Deletes the APIServices on drop, panic or not, before the namespace goes: an
/// unavailable aggregated API would otherwise break discovery for the whole cluster (and
/// stall namespace deletion).
struct ApiServiceGuard(Vec<String>);

impl Drop for ApiServiceGuard {
    fn drop(&mut self) {
        for name in &self.0 {
            let out = kubectl()
                .args([
                    "delete",
                    "apiservice",
                    name,
                    "--ignore-not-found",
                    "--wait=false",
                    "--request-timeout=20s",
                ])
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "deleting APIService {name}: {}",
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => eprintln!("deleting APIService {name}: {e}"),
            }
        }
    }
}

/// A CA, a serving certificate for the Service's DNS name (what the API server checks) and
/// the host address, and a client certificate from a CA that is not the front proxy's.
fn make_certificates(dir: &Path, dns: &str, ip: Ipv4Addr) -> Result<()> {
    pki::ca(dir, "serving-ca", "wsrelay-e2e-metrics-api-ca")?;
    pki::leaf(
        dir,
        "serving",
        "serving-ca",
        dns,
        &pki::server_ext(&format!("DNS:{dns},IP:{ip}")),
    )?;
    pki::ca(dir, "rogue-ca", "not-the-front-proxy-ca")?;
    pki::leaf(
        dir,
        "rogue-client",
        "rogue-ca",
        "front-proxy-client",
        "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
    )?;
    Ok(())
}

/// One HTTP GET of `path` on `addr` (plain HTTP/1.0): status and body.
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timeout")??;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut raw))
        .await
        .context("read timeout")??;
    let text = String::from_utf8_lossy(&raw).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// `curl` straight to the operator's port (bypassing the API server): the HTTP status, or
/// None when the TLS handshake was refused.
fn curl_status(url: &str, extra: &[&str]) -> Result<Option<u16>> {
    let out = Command::new("curl")
        .args([
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .args(extra)
        .arg(url)
        .output()
        .context("running curl")?;
    let code: u16 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    Ok((code != 0).then_some(code))
}

/// The relay pods' labels: what the operator's Deployment gives them.
fn relay_labels() -> Value {
    serde_json::to_value(wsrelay_operator::build::selector_labels(GATEWAY)).unwrap_or_default()
}

/// `kubectl get --raw PATH` with the cluster's admin kubeconfig: what a person would run.
async fn raw_get(_client: &Client, path: &str) -> Result<Value> {
    let path = path.to_string();
    let out = tokio::task::spawn_blocking(move || {
        kubectl()
            .args(["get", "--raw", &path, "--request-timeout=20s"])
            .output()
    })
    .await??;
    ensure!(
        out.status.success(),
        "kubectl get --raw: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// name -> value of a MetricValueList.
fn values_of(list: &Value) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            (
                i["describedObject"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                i["value"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

async fn scenario(client: Client, ns: String, relay_bin: PathBuf) -> Result<()> {
    let work = std::env::temp_dir().join(unique_name("wsrelay-autoscale"));
    std::fs::create_dir_all(&work)?;

    // --- test hosts: a namespace with two relay addresses; NATS on the host end ---
    let mut net = NetNs::create(CONNECTIONS.len() as u8)?;
    let nats_port = {
        let l = std::net::TcpListener::bind((net.host_addr, 0))?;
        l.local_addr()?.port()
    };
    let host = net.host_addr.to_string();
    let nats_args = ["-a", host.as_str(), "-p", &nats_port.to_string()];
    net.spawn_host(
        "nats-server",
        &nats_server_binary(),
        &nats_args,
        &work.join("nats.log"),
    )?;
    let relay_addrs = net.addrs.clone();
    for (i, addr) in relay_addrs.iter().enumerate() {
        let config = work.join(format!("relay-{i}.yaml"));
        std::fs::write(
            &config,
            format!(
                "listen: {{client: \"{addr}:{RELAY_CLIENT_PORT}\", admin: \"{addr}:{RELAY_ADMIN_PORT}\", path: /ws}}\n\
                 nats: {{urls: [\"nats://{}:{nats_port}\"]}}\n\
                 auth: {{allowAnonymous: true}}\n\
                 bindings: [{{channel: \"public.{{topic}}\", subject: \"public.{{topic}}\", direction: subscribe}}]\n\
                 drain: {{gracePeriodSeconds: 1}}\n",
                net.host_addr
            ),
        )?;
        let config = config.to_string_lossy().to_string();
        net.spawn_inside(
            &format!("relay {addr}"),
            &relay_bin,
            &["run", "--config", &config],
            &work.join(format!("relay-{i}.log")),
        )?;
    }
    for addr in &relay_addrs {
        let admin = SocketAddr::from((*addr, RELAY_ADMIN_PORT));
        eventually(&format!("relay {addr} ready"), || async {
            net_check(admin).await
        })
        .await?;
    }
    net.check_running()?;

    // --- real clients: 3 and 5 WebSocket connections ---
    let mut sockets = Vec::new();
    for (addr, n) in relay_addrs.iter().zip(CONNECTIONS) {
        for _ in 0..n {
            let url = format!("ws://{addr}:{RELAY_CLIENT_PORT}/ws");
            let (ws, _) = tokio::time::timeout(
                Duration::from_secs(10),
                tokio_tungstenite::connect_async(url.as_str()),
            )
            .await
            .with_context(|| format!("connecting to {url}"))?
            .with_context(|| format!("connecting to {url}"))?;
            sockets.push(ws);
        }
    }
    for (addr, n) in relay_addrs.iter().zip(CONNECTIONS) {
        let admin = SocketAddr::from((*addr, RELAY_ADMIN_PORT));
        eventually(
            &format!("relay {addr} counting {n} connections"),
            || async {
                let (_, body) = http_get(admin, "/metrics").await?;
                let line = format!("{CONNECTIONS_METRIC} {n}");
                Ok(body.lines().any(|l| l.trim() == line).then_some(()))
            },
        )
        .await?;
    }

    // --- the operator's metrics API on the host end of the veth ---
    let dns = format!("{SERVICE}.{ns}.svc");
    make_certificates(&work, &dns, net.host_addr)?;
    let listener = tokio::net::TcpListener::bind((net.host_addr, 0)).await?;
    let api_port = listener.local_addr()?.port();
    let shutdown = CancellationToken::new();
    let _stop_api: DropGuard = shutdown.clone().drop_guard();
    let config = MetricsApiConfig {
        addr: listener.local_addr()?,
        cert: work.join("serving.crt"),
        key: work.join("serving.key"),
        scrape_timeout: metrics_api::DEFAULT_SCRAPE_TIMEOUT,
        cache_ttl: metrics_api::DEFAULT_CACHE_TTL,
        limits: metrics_api::tls::Limits::default(),
    };
    let api_task = tokio::spawn(metrics_api::serve_on(
        listener,
        client.clone(),
        config,
        shutdown.clone(),
    ));

    // --- its registration: Service + EndpointSlice (no selector: not a pod) + APIServices ---
    let services = Api::<Service>::namespaced(client.clone(), &ns);
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": { "name": SERVICE },
                "spec": { "ports": [{ "name": "https", "port": 443, "targetPort": api_port, "protocol": "TCP" }] }
            }))?,
        )
        .await?;
    Api::<EndpointSlice>::namespaced(client.clone(), &ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {
                    "name": format!("{SERVICE}-host"),
                    "labels": {
                        "kubernetes.io/service-name": SERVICE,
                        "endpointslice.kubernetes.io/managed-by": "e2e.wsrelay.dev"
                    }
                },
                "addressType": "IPv4",
                "endpoints": [{ "addresses": [net.host_addr.to_string()], "conditions": { "ready": true } }],
                "ports": [{ "name": "https", "port": api_port, "protocol": "TCP" }]
            }))?,
        )
        .await?;
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apiregistration.k8s.io", "v1", "APIService"),
        "apiservices",
    );
    let apiservices = Api::<DynamicObject>::all_with(client.clone(), &ar);
    let ca_bundle = serde_json::to_value(ByteString(std::fs::read(work.join("serving-ca.crt"))?))?;
    let mut guard = ApiServiceGuard(Vec::new());
    for (version, priority) in APISERVICE_VERSIONS {
        let name = format!("{version}.custom.metrics.k8s.io");
        if let Some(existing) = apiservices.get_opt(&name).await? {
            // The APIService is a cluster-wide singleton. One of this test's (labelled with
            // its namespace) is either a concurrent run's, which is waited out, or left by a
            // run killed before its guard ran, whose namespace is gone: that one points at
            // an address that no longer answers and would break discovery (and namespace
            // deletion) for the whole cluster, so it goes. Anything else is not ours.
            let owner = existing
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(wsrelay_e2e::TEST_LABEL))
                .cloned();
            let Some(owner) = owner else {
                bail!(
                    "APIService {name} already exists and is not this test's (another metrics adapter?): the test cannot register its own"
                );
            };
            let live = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
                .get_opt(&owner)
                .await?
                .is_some_and(|n| n.metadata.deletion_timestamp.is_none());
            if live {
                eprintln!(
                    "APIService {name} belongs to a concurrent run (namespace {owner}): waiting for it"
                );
            } else {
                eprintln!("deleting APIService {name} left by a killed run (namespace {owner})");
                drop(ApiServiceGuard(vec![name.clone()]));
            }
            eventually(&format!("APIService {name} gone"), || async {
                Ok(apiservices.get_opt(&name).await?.is_none().then_some(()))
            })
            .await?;
        }
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": { "name": name, "labels": { wsrelay_e2e::TEST_LABEL: ns } },
            "spec": {
                "group": "custom.metrics.k8s.io",
                "version": version,
                "service": { "name": SERVICE, "namespace": ns, "port": 443 },
                "caBundle": ca_bundle,
                "groupPriorityMinimum": 100,
                "versionPriority": priority
            }
        }))?;
        guard.0.push(name.clone());
        apiservices.create(&PostParams::default(), &obj).await?;
    }

    // --- pod objects for the relays (no kubelet: the test reports their status) ---
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let mut pod_names = Vec::new();
    for (i, addr) in relay_addrs.iter().enumerate() {
        let name = format!("{GATEWAY}-relay-{i}");
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": { "name": name, "labels": relay_labels() },
                "spec": {
                    // No scheduler picks these up; they stand for relays that run elsewhere.
                    "schedulerName": "wsrelay-e2e-none",
                    "containers": [{
                        "name": "relay",
                        "image": "wsrelay:e2e",
                        "ports": [
                            { "name": "ws", "containerPort": RELAY_CLIENT_PORT },
                            { "name": "admin", "containerPort": RELAY_ADMIN_PORT }
                        ]
                    }]
                }
            }))?,
        )
        .await?;
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let ready = |t: &str| json!({ "type": t, "status": "True", "lastTransitionTime": now });
        pods.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "status": {
                    "phase": "Running",
                    "podIP": addr.to_string(),
                    "podIPs": [{ "ip": addr.to_string() }],
                    "startTime": now,
                    "conditions": [ready("PodScheduled"), ready("Initialized"), ready("ContainersReady"), ready("Ready")]
                }
            })),
        )
        .await
        .with_context(|| format!("setting the status of pod {name}"))?;
        pod_names.push(name);
    }

    // --- the APIService becomes Available ---
    let started = Instant::now();
    for (version, _) in APISERVICE_VERSIONS {
        let name = format!("{version}.custom.metrics.k8s.io");
        let last = eventually(&format!("APIService {name} Available"), || async {
            if api_task.is_finished() {
                bail!("the metrics API stopped");
            }
            let obj = apiservices.get(&name).await?;
            let available = obj.data["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Available")
                .cloned();
            Ok(available.filter(|c| c["status"] == "True"))
        })
        .await
        .with_context(|| {
            format!(
                "APIService {name}: see the condition with kubectl get apiservice {name} -o yaml"
            )
        })?;
        eprintln!("APIService {name}: {last}");
    }
    eprintln!("APIServices Available after {:?}", started.elapsed());

    // --- through the real API server: the counts of the real relays ---
    let selector = wsrelay_operator::build::selector_string(GATEWAY);
    let path = |version: &str, who: &str| {
        format!(
            "/apis/custom.metrics.k8s.io/{version}/namespaces/{ns}/pods/{who}/{CONNECTIONS_METRIC}?labelSelector={}",
            selector
                .replace('/', "%2F")
                .replace('=', "%3D")
                .replace(',', "%2C")
        )
    };
    let expected: Vec<(String, String)> = pod_names
        .iter()
        .zip(CONNECTIONS)
        .map(|(n, c)| (n.clone(), c.to_string()))
        .collect();
    let discovery = raw_get(&client, "/apis/custom.metrics.k8s.io/v1beta2").await?;
    eprintln!("discovery: {discovery}");
    ensure!(
        discovery["resources"][0]["name"] == format!("pods/{CONNECTIONS_METRIC}"),
        "discovery lists pods/{CONNECTIONS_METRIC}: {discovery}"
    );
    let list = eventually("the metric through the API server", || async {
        let list = raw_get(&client, &path("v1beta2", "*")).await?;
        Ok((values_of(&list) == expected).then_some(list))
    })
    .await?;
    eprintln!("GET {} -> {list}", path("v1beta2", "*"));
    let one = raw_get(&client, &path("v1beta2", &pod_names[1])).await?;
    ensure!(values_of(&one) == expected[1..], "per-object form: {one}");
    let old = raw_get(&client, &path("v1beta1", "*")).await?;
    ensure!(values_of(&old) == expected, "v1beta1: {old}");
    ensure!(
        old["items"][0]["metricName"] == CONNECTIONS_METRIC,
        "v1beta1 shape: {old}"
    );

    // Latency through the API server once the cache has expired (a fresh scrape of both).
    tokio::time::sleep(metrics_api::DEFAULT_CACHE_TTL + Duration::from_millis(200)).await;
    let t = Instant::now();
    raw_get(&client, &path("v1beta2", "*")).await?;
    let cold = t.elapsed();
    let t = Instant::now();
    raw_get(&client, &path("v1beta2", "*")).await?;
    let warm = t.elapsed();
    eprintln!(
        "FIGURES: GET through kube-apiserver with fresh scrape {cold:?}, from cache {warm:?}"
    );

    // --- straight to the operator: refused without the front proxy's certificate ---
    let direct = format!(
        "https://{}:{api_port}{}",
        net.host_addr,
        path("v1beta2", "*")
    );
    let anonymous = curl_status(&direct, &[])?;
    ensure!(
        anonymous == Some(401),
        "no client certificate: {anonymous:?}"
    );
    let rogue_crt = work.join("rogue-client.crt").to_string_lossy().to_string();
    let rogue_key = work.join("rogue-client.key").to_string_lossy().to_string();
    let rogue = curl_status(
        &direct,
        &[
            "--cert",
            &rogue_crt,
            "--key",
            &rogue_key,
            "-H",
            "X-Remote-User: system:admin",
            "-H",
            "X-Remote-Group: system:masters",
        ],
    )?;
    ensure!(
        rogue.is_none() || rogue == Some(401),
        "certificate from another CA: {rogue:?}"
    );
    eprintln!(
        "direct, no certificate: HTTP {anonymous:?}; certificate from another CA: {}",
        rogue.map_or("TLS handshake refused".to_string(), |c| format!("HTTP {c}"))
    );
    let pki = repo_root().join(".cluster/pki");
    if pki.join("front-proxy-client.crt").is_file() {
        let crt = pki
            .join("front-proxy-client.crt")
            .to_string_lossy()
            .to_string();
        let key = pki
            .join("front-proxy-client.key")
            .to_string_lossy()
            .to_string();
        let nobody = curl_status(
            &direct,
            &[
                "--cert",
                &crt,
                "--key",
                &key,
                "-H",
                "X-Remote-User: wsrelay-e2e-nobody",
            ],
        )?;
        ensure!(
            nobody == Some(403),
            "front proxy acting for a user without RBAC: {nobody:?}"
        );
        let no_user = curl_status(&direct, &["--cert", &crt, "--key", &key])?;
        ensure!(
            no_user == Some(401),
            "front proxy naming no user: {no_user:?}"
        );
        eprintln!(
            "direct, front proxy cert for an unprivileged user: HTTP 403; naming no user: HTTP 401"
        );
        // The operator's own scrape figures (on its /metrics, authorized like the rest).
        let out = Command::new("curl")
            .args(["-sk", "--max-time", "10", "--cert", &crt, "--key", &key])
            .args([
                "-H",
                "X-Remote-User: wsrelay-e2e-admin",
                "-H",
                "X-Remote-Group: system:masters",
            ])
            .arg(format!("https://{}:{api_port}/metrics", net.host_addr))
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let figure = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        let (sum, count) = (
            figure("wsrelay_operator_metrics_api_scrape_duration_seconds_sum"),
            figure("wsrelay_operator_metrics_api_scrape_duration_seconds_count"),
        );
        // Failures are not asserted to be 0: an HPA of an earlier run whose namespace is
        // still terminating may ask this server about pods whose relays are gone.
        ensure!(count >= 2.0, "the relays were scraped: {text}");
        let failures = figure("wsrelay_operator_metrics_api_scrape_failures_total");
        eprintln!("scrape failures so far: {failures}");
        eprintln!(
            "FIGURES: {count} relay scrapes, mean {:.2} ms each",
            sum / count * 1000.0
        );
    }

    // --- the HPA controller: the HPA the operator renders, on a Deployment selecting the pods ---
    hpa_part(&client, &ns).await?;

    // --- the gateway's status.connections: the fleet total the status stage writes ---
    let total = fleet_total(&client, &ns, &selector).await?;
    ensure!(total == 8, "fleet total of 3 + 5: {total:?}");

    // --- a relay that stops answering is left out of the list, not reported as 0 ---
    net.stop(&format!("relay {}", relay_addrs[1]))?;
    let rest = eventually("the stopped relay left out", || async {
        let list = raw_get(&client, &path("v1beta2", "*")).await?;
        Ok((values_of(&list) == expected[..1]).then_some(list))
    })
    .await?;
    eprintln!("after stopping relay {}: {rest}", relay_addrs[1]);
    let total = eventually("the fleet total without the stopped relay", || async {
        let total = fleet_total(&client, &ns, &selector).await?;
        Ok((total == 3).then_some(total))
    })
    .await?;
    eprintln!("fleet total (status.connections) after stopping one relay: {total:?}");

    drop(sockets);
    // Unscheduled pods go at once; nothing then refers to the test hosts' addresses.
    for name in &pod_names {
        pods.delete(name, &Default::default()).await?;
    }
    shutdown.cancel();
    drop(guard);
    let _ = tokio::time::timeout(Duration::from_secs(10), api_task).await;
    net.check_running()?;
    drop(net);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

async fn net_check(admin: SocketAddr) -> Result<Option<()>> {
    Ok(match http_get(admin, "/ready").await {
        Ok((200, _)) => Some(()),
        _ => None,
    })
}

/// Creates the Deployment and HPA the operator renders for an autoscaled gateway (owner
/// references dropped: no gateway object exists, and the garbage collector would delete
/// them) and reports what the HPA controller makes of the metric. The Deployment's own pods
/// cannot even be created (the rendered ServiceAccount does not exist here), so the pods the
/// Deployment's selector matches are exactly the two relay pods; the HPA status is printed
/// and its current average checked.
async fn hpa_part(client: &Client, ns: &str) -> Result<()> {
    let gw: WebsocketGateway = serde_json::from_value(json!({
        "apiVersion": "wsrelay.dev/v1alpha1",
        "kind": "WebsocketGateway",
        "metadata": { "name": GATEWAY, "namespace": ns, "uid": "00000000-0000-4000-8000-000000000005", "generation": 1 },
        "spec": {
            "nats": { "urls": ["nats://nats.invalid:4222"] },
            "auth": { "allowAnonymous": true },
            "bindings": [{ "channel": "public.{topic}", "subject": "public.{topic}" }],
            "autoscaling": { "minReplicas": 1, "maxReplicas": 10, "targetConnectionsPerPod": 2, "scaleDownStabilizationSeconds": 300 }
        }
    }))?;
    let desired = wsrelay_operator::build::build(&gw)?;
    let mut deployment: Deployment = desired.deployment;
    deployment.metadata.owner_references = None;
    let mut hpa: HorizontalPodAutoscaler = desired.hpa.context("autoscaling renders an HPA")?;
    hpa.metadata.owner_references = None;
    eprintln!("rendered HPA spec: {}", serde_json::to_string(&hpa.spec)?);
    Api::<Deployment>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &deployment)
        .await?;
    let hpas = Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), ns);
    hpas.create(&PostParams::default(), &hpa).await?;

    // Bounded: the controller syncs every 5 s here; give it a few rounds.
    let limit = wait_limit().min(Duration::from_secs(60));
    let created = Instant::now();
    let deadline = created + limit;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let h = hpas.get(GATEWAY).await?;
        last = serde_json::to_value(&h.status)?;
        let has_value = last["currentMetrics"].as_array().is_some_and(|m| {
            m.iter()
                .any(|m| !m["pods"]["current"]["averageValue"].is_null())
        });
        if has_value {
            break;
        }
    }
    eprintln!(
        "HPA STATUS after {:?}: {}",
        created.elapsed(),
        serde_json::to_string_pretty(&last)?
    );
    // Gone before the namespace is: a terminating namespace's HPA would otherwise keep
    // asking whichever metrics API is registered next about relays that no longer exist.
    hpas.delete(GATEWAY, &Default::default()).await?;
    // The controller read the metric: the average over the two relays, (3 + 5) / 2.
    let average = &last["currentMetrics"][0]["pods"]["current"]["averageValue"];
    ensure!(
        *average == "4",
        "the HPA controller did not report the relays' average (4) within {limit:?}: {last}"
    );
    // And acted on it: 2 pods at an average of 4 for a target of 2 per pod want 4.
    ensure!(
        last["desiredReplicas"] == 4,
        "the HPA controller did not want 4 replicas for an average of 4 at a target of 2: {last}"
    );
    Ok(())
}

/// The fleet total of open connections as the status stage computes it: the relay pods the
/// selector matches, scraped by the operator's scraper (no cache, so each call is fresh).
async fn fleet_total(client: &Client, ns: &str, selector: &str) -> Result<i64> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&kube::api::ListParams::default().labels(selector))
        .await?;
    let scraper = metrics_api::Scraper::new(
        CONNECTIONS_METRIC,
        metrics_api::DEFAULT_SCRAPE_TIMEOUT,
        Duration::ZERO,
    );
    Ok(scraper
        .total(&metrics_api::scrape::targets(&pods.items))
        .await)
}
