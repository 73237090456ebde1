//! A real Prometheus for the observability test: the chart's PodMonitors turned into the
//! scrape config the Prometheus Operator would generate from them (kubernetes_sd on pods,
//! keep by selector labels and port name, the standard target labels, then the monitor's
//! own relabelings), the API server's /metrics as a static target, and a tiny client for
//! its HTTP API.
//!
//! The conversion follows prometheus-operator's `generatePodMonitorConfig`: job
//! `podMonitor/<ns>/<name>/<i>`, keep `__meta_kubernetes_pod_label_<label>` = value for each
//! `selector.matchLabels`, keep `__meta_kubernetes_pod_container_port_name` = port, drop
//! Failed/Succeeded pods, then `namespace`, `container`, `pod`, `job` (`<ns>/<name>`) and
//! `endpoint` labels, then `relabelings`; `honorLabels` -> `honor_labels`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::tools::tool;

/// A Prometheus label name made from a Kubernetes label key (`app.kubernetes.io/name` ->
/// `app_kubernetes_io_name`), as service discovery names its meta labels.
pub fn sanitize(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Where the discovery reads the cluster from.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// A kubeconfig file (kubernetes_sd's `kubeconfig_file`).
    pub kubeconfig: PathBuf,
}

/// The scrape configs the Prometheus Operator would generate from the PodMonitors among
/// `objects` (rendered chart objects).
pub fn pod_monitor_scrape_configs(objects: &[Value], cluster: &Cluster) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for o in objects.iter().filter(|o| o["kind"] == "PodMonitor") {
        let ns = o["metadata"]["namespace"]
            .as_str()
            .context("PodMonitor namespace")?;
        let name = o["metadata"]["name"].as_str().context("PodMonitor name")?;
        let spec = &o["spec"];
        let mut sd = json!({ "role": "pod", "kubeconfig_file": cluster.kubeconfig });
        let nsel = &spec["namespaceSelector"];
        if nsel["any"] != json!(true) {
            let names = match nsel["matchNames"].as_array() {
                Some(n) => n.clone(),
                None => vec![json!(ns)],
            };
            sd["namespaces"] = json!({ "names": names });
        }
        let endpoints = spec["podMetricsEndpoints"]
            .as_array()
            .context("podMetricsEndpoints")?;
        for (i, ep) in endpoints.iter().enumerate() {
            let mut relabel = Vec::new();
            relabel.push(
                json!({ "source_labels": ["job"], "target_label": "__tmp_prometheus_job_name" }),
            );
            relabel.push(json!({ "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)", "action": "drop" }));
            for (k, v) in spec["selector"]["matchLabels"]
                .as_object()
                .into_iter()
                .flatten()
            {
                let v = v.as_str().context("matchLabels value")?;
                relabel.push(json!({
                    "source_labels": [format!("__meta_kubernetes_pod_label_{}", sanitize(k)),
                                      format!("__meta_kubernetes_pod_labelpresent_{}", sanitize(k))],
                    "regex": format!("({});true", regex_escape(v)),
                    "action": "keep",
                }));
            }
            ensure!(
                spec["selector"]["matchExpressions"].is_null(),
                "matchExpressions are not converted"
            );
            let port = ep["port"].as_str().context("podMetricsEndpoints[].port")?;
            relabel.push(json!({ "source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": regex_escape(port), "action": "keep" }));
            for (src, target) in [
                ("__meta_kubernetes_namespace", "namespace"),
                ("__meta_kubernetes_pod_container_name", "container"),
                ("__meta_kubernetes_pod_name", "pod"),
            ] {
                relabel.push(json!({ "source_labels": [src], "target_label": target }));
            }
            relabel.push(json!({ "target_label": "job", "replacement": format!("{ns}/{name}") }));
            relabel.push(json!({ "target_label": "endpoint", "replacement": port }));
            for r in ep["relabelings"].as_array().into_iter().flatten() {
                let mut c = serde_json::Map::new();
                for (k, v) in r.as_object().context("relabeling")? {
                    let key = match k.as_str() {
                        "sourceLabels" => "source_labels",
                        "targetLabel" => "target_label",
                        other => other,
                    };
                    c.insert(key.to_string(), v.clone());
                }
                relabel.push(Value::Object(c));
            }
            let mut job = json!({
                "job_name": format!("podMonitor/{ns}/{name}/{i}"),
                "honor_labels": ep["honorLabels"] == json!(true),
                "kubernetes_sd_configs": [sd.clone()],
                "metrics_path": ep["path"].as_str().unwrap_or("/metrics"),
                "relabel_configs": relabel,
            });
            for (from, to) in [
                ("interval", "scrape_interval"),
                ("scrapeTimeout", "scrape_timeout"),
            ] {
                if let Some(v) = ep[from].as_str() {
                    job[to] = json!(v);
                }
            }
            out.push(job);
        }
    }
    ensure!(!out.is_empty(), "no PodMonitor among the rendered objects");
    Ok(out)
}

fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The API server's own /metrics (for `aggregator_unavailable_apiservice`), with the
/// kubeconfig's CA and client certificate files.
pub fn apiserver_scrape_config(server: &str, ca: &Path, cert: &Path, key: &Path) -> Value {
    let host = server
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    json!({
        "job_name": "apiserver",
        "scheme": "https",
        "static_configs": [{ "targets": [host] }],
        "tls_config": { "ca_file": ca, "cert_file": cert, "key_file": key },
    })
}

/// A Prometheus server on loopback, stopped on drop.
#[derive(Debug)]
pub struct Server {
    child: Child,
    /// Its HTTP API.
    pub addr: SocketAddr,
    /// Its log.
    pub log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `prometheus` (the pinned build) with `config` (JSON is YAML) in `dir`, on a
    /// free loopback port; ready when `/-/ready` answers 200.
    pub async fn start(dir: &Path, config: &Value) -> Result<Self> {
        let bin = tool("prometheus");
        ensure!(
            bin.is_file(),
            "no pinned prometheus at {} (e2e/cluster/tools.sh prometheus builds it)",
            bin.display()
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, serde_json::to_vec_pretty(config)?)?;
        let check = Command::new(tool("promtool"))
            .args(["check", "config", "--syntax-only"])
            .arg(&config_file)
            .output()?;
        ensure!(
            check.status.success(),
            "promtool check config: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = dir.join("prometheus.log");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--storage.tsdb.retention.time=2h")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting prometheus")?;
        let server = Self { child, addr, log };
        for _ in 0..100 {
            if let Ok((200, _)) = http_get(server.addr, "/-/ready").await {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("prometheus did not get ready; see {}", server.log.display())
    }

    /// `GET /api/v1/<path>?<params>`: the `data` of a successful answer.
    pub async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value> {
        let query: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encode(v)))
            .collect();
        let (status, body) =
            http_get(self.addr, &format!("/api/v1/{path}?{}", query.join("&"))).await?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("prometheus answered {status}: {body}"))?;
        ensure!(v["status"] == "success", "prometheus: {body}");
        Ok(v["data"].clone())
    }

    /// An instant query: its result list.
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>> {
        let data = self.api("query", &[("query", expr)]).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }
}

/// Percent-encodes a query parameter value.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A bounded HTTP/1.0 GET: status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let limit = Duration::from_secs(10);
    let mut s = tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timeout")??;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut raw))
        .await
        .context("read timeout")??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_monitor_becomes_the_operators_scrape_config() {
        let pm = json!({
            "kind": "PodMonitor",
            "metadata": { "name": "r-relays", "namespace": "mon" },
            "spec": {
                "selector": { "matchLabels": { "app.kubernetes.io/name": "wsrelay" } },
                "namespaceSelector": { "any": true },
                "podMetricsEndpoints": [{
                    "port": "admin", "path": "/metrics", "interval": "5s", "honorLabels": true,
                    "relabelings": [{ "sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"], "targetLabel": "gateway" }]
                }]
            }
        });
        let c = pod_monitor_scrape_configs(
            &[pm],
            &Cluster {
                kubeconfig: "/k".into(),
            },
        )
        .unwrap();
        let job = &c[0];
        assert_eq!(job["job_name"], "podMonitor/mon/r-relays/0");
        assert_eq!(job["honor_labels"], true);
        assert_eq!(job["scrape_interval"], "5s");
        assert!(job["kubernetes_sd_configs"][0]["namespaces"].is_null());
        let r = job["relabel_configs"].as_array().unwrap();
        assert!(r.contains(&json!({
            "source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name", "__meta_kubernetes_pod_labelpresent_app_kubernetes_io_name"],
            "regex": "(wsrelay);true", "action": "keep"
        })));
        assert!(r.contains(&json!({ "target_label": "job", "replacement": "mon/r-relays" })));
        assert_eq!(
            r.last().unwrap(),
            &json!({ "source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"], "target_label": "gateway" })
        );
        assert_eq!(percent_encode("a b{x=\"1\"}"), "a%20b%7Bx%3D%221%22%7D");
    }
}
