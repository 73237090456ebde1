//! Gathering the connection gauge from the relay pods themselves: one plain HTTP GET of
//! `/metrics` on each pod's admin port, all pods concurrently, each bounded by a timeout,
//! results kept for a short time so that the HPA controller, `kubectl get --raw` and the
//! status of the gateway asking at once cost one scrape per pod.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::prom;
use crate::build::ADMIN_PORT;

/// The name of the relay's container port serving `/metrics` (the operator renders it).
pub const ADMIN_PORT_NAME: &str = "admin";
/// A relay's `/metrics` is a few kilobytes; anything past this is not a relay.
const MAX_BODY: u64 = 1 << 20;

/// Where and whom to scrape: one relay pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub uid: String,
    pub addr: SocketAddr,
}

/// The label every relay pod carries (the operator's selector labels), and its value.
pub const RELAY_LABEL: (&str, &str) = ("app.kubernetes.io/name", "wsrelay");

/// The relay pods worth scraping among `pods`: relay pods (by label: the caller chooses the
/// selector, and the operator must not be made to fetch other pods' ports), running, with
/// an IP, not being deleted.
/// A pod left out here is simply absent from the metric list; the HPA controller treats a
/// pod without a metric conservatively (as if it were at the target when scaling down, and
/// at zero when scaling up), so missing pods never cause a scale-down by themselves.
pub fn targets(pods: &[Pod]) -> Vec<Target> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(RELAY_LABEL.0))
                .is_some_and(|v| v == RELAY_LABEL.1)
        })
        .filter_map(|p| {
            let status = p.status.as_ref()?;
            if status.phase.as_deref() != Some("Running") {
                return None;
            }
            let ip: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
            Some(Target {
                name: p.name_any(),
                uid: p.metadata.uid.clone().unwrap_or_default(),
                addr: SocketAddr::new(ip, admin_port(p)),
            })
        })
        .collect()
}

/// The pod's admin port: the container port named `admin`, else the relay's default.
pub fn admin_port(pod: &Pod) -> u16 {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(ADMIN_PORT_NAME))
        .map(|p| p.container_port)
        .unwrap_or(ADMIN_PORT)
        .try_into()
        .unwrap_or(9090)
}

/// Why one pod's value could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ScrapeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connecting or reading: {0}")]
    Io(String),
    #[error("HTTP status {0}")]
    Status(String),
    #[error("no {0} sample in the exposition")]
    NoSample(&'static str),
}

/// Counters of the scrapes, for the operator's `/metrics`.
#[derive(Debug, Clone)]
pub struct ScrapeMetrics {
    /// Scrapes that produced a value.
    pub ok: Counter,
    /// Pods left out of an answer because they did not answer (timeout, refused, bad body).
    pub failed: Counter,
    /// Time one pod's scrape took (successful or not).
    pub duration: Histogram,
}

impl Default for ScrapeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ScrapeMetrics {
    pub fn new() -> Self {
        Self {
            ok: Counter::default(),
            failed: Counter::default(),
            // 0.5 ms .. ~4 s
            duration: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
        }
    }

    /// Registers the counters under `registry` (names prefixed `metrics_api_`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "metrics_api_scrapes",
            "Relay /metrics scrapes that produced a connection count",
            self.ok.clone(),
        );
        registry.register(
            "metrics_api_scrape_failures",
            "Relay pods left out of a custom metrics answer because their /metrics did not answer in time or had no gauge",
            self.failed.clone(),
        );
        registry.register(
            "metrics_api_scrape_duration_seconds",
            "Time one relay /metrics scrape took",
            self.duration.clone(),
        );
    }
}

/// What one relay reports about itself on `/metrics`, besides its connection count: what
/// the gateway's status shows when the relays cannot do their job.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    /// The connection gauge (the scraper's metric).
    pub connections: i64,
    /// `wsrelay_nats_connected`, when the relay exports it.
    pub nats_connected: Option<bool>,
    /// `wsrelay_nats_last_error{server,error}`: the server it cannot reach, and why.
    pub nats_error: Option<(String, String)>,
    /// `wsrelay_config_rejected`: its last config reload was refused.
    pub config_rejected: bool,
    /// `wsrelay_history_streams_ready`, when exported.
    pub history_streams_ready: Option<i64>,
    /// `wsrelay_history_stream_error{stream,error}`: a history stream the relay could not
    /// create or update, and JetStream's answer.
    pub history_error: Option<(String, String)>,
    /// `wsrelay_jwks_fetch_failing`: its last fetch of the JWKS document failed.
    pub jwks_failing: bool,
    /// `wsrelay_authorize_requests_total` and `wsrelay_authorize_failures_total` as they
    /// stand (counters since the relay started), when it exports either.
    pub authorize: Option<AuthorizeCounts>,
    /// How much those counters grew over this relay's last complete window of at least
    /// [`AUTHORIZE_WINDOW`] (filled by the [`Scraper`], which remembers earlier scrapes;
    /// None until one window has passed, or after the counters went back: a restart).
    pub authorize_window: Option<AuthorizeCounts>,
    /// `wsrelay_rebalancing`: the relay is shedding connections for a rebalance round
    /// (`POST /rebalance`), so it refuses new ones and reads not Ready on purpose.
    pub rebalancing: bool,
}

/// The least time over which the increase of a relay's authorization counters is taken:
/// the operator keeps the counters of one earlier scrape per pod (it has no time series),
/// and a gateway at rest is looked at once a [`crate::controller::RESYNC`], so each of
/// those scrapes closes a window.
pub const AUTHORIZE_WINDOW: Duration = Duration::from_secs(60);

/// A relay's backend authorization requests (`wsrelay_authorize_requests_total`, every
/// `op`) and those that failed, by reason (`wsrelay_authorize_failures_total{reason}`,
/// every `op`). `rule_error` is left out: a rule that fails is no backend request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthorizeCounts {
    /// Backend requests sent.
    pub requests: u64,
    /// Failed ones by reason (`timeout`, `no_responders`, `unavailable`, `bad_reply`).
    pub failures: BTreeMap<String, u64>,
}

impl AuthorizeCounts {
    /// Reads the two counter families; None when the relay exports neither.
    fn parse(body: &str) -> Option<Self> {
        let requests = prom::samples(body, "wsrelay_authorize_requests_total");
        let failures = prom::samples(body, "wsrelay_authorize_failures_total");
        if requests.is_empty() && failures.is_empty() {
            return None;
        }
        let count = |v: f64| u64::try_from(prom::as_count(v)).unwrap_or(0);
        let mut by_reason = BTreeMap::new();
        for (labels, v) in failures {
            let reason = labels
                .iter()
                .find(|(k, _)| k == "reason")
                .map(|(_, r)| r.clone())
                .unwrap_or_default();
            if reason == "rule_error" {
                continue;
            }
            *by_reason.entry(reason).or_insert(0) += count(v);
        }
        Some(Self {
            requests: requests.into_iter().map(|(_, v)| count(v)).sum(),
            failures: by_reason,
        })
    }

    /// All failures, whatever the reason.
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// The growth since `earlier`; None when a counter went back (the relay restarted).
    fn since(&self, earlier: &Self) -> Option<Self> {
        let requests = self.requests.checked_sub(earlier.requests)?;
        let mut failures = BTreeMap::new();
        for (reason, n) in &self.failures {
            let before = earlier.failures.get(reason).copied().unwrap_or(0);
            failures.insert(reason.clone(), n.checked_sub(before)?);
        }
        // A reason that disappeared is a reset too (a counter never goes away on its own).
        if earlier
            .failures
            .keys()
            .any(|r| !self.failures.contains_key(r))
        {
            return None;
        }
        Some(Self { requests, failures })
    }

    /// Adds `other` in (summing relays).
    pub fn add(&mut self, other: &Self) {
        self.requests += other.requests;
        for (reason, n) in &other.failures {
            *self.failures.entry(reason.clone()).or_insert(0) += n;
        }
    }
}

/// One pod's authorization counters at the start of its current window, and the growth over
/// its last complete one.
#[derive(Debug, Clone)]
struct Window {
    started: Instant,
    at_start: AuthorizeCounts,
    last: Option<AuthorizeCounts>,
    seen: Instant,
}

/// Per pod (`uid/name`), the authorization counters' windows.
#[derive(Debug, Default)]
struct Windows(HashMap<String, Window>);

impl Windows {
    /// Records `now`'s totals of `pod` and answers the growth over its last complete window.
    fn observe(
        &mut self,
        pod: &str,
        totals: &AuthorizeCounts,
        now: Instant,
    ) -> Option<AuthorizeCounts> {
        // Forget pods not scraped for several windows (deleted, rescheduled).
        self.0
            .retain(|_, w| now.saturating_duration_since(w.seen) < AUTHORIZE_WINDOW * 5);
        let fresh = || Window {
            started: now,
            at_start: totals.clone(),
            last: None,
            seen: now,
        };
        let w = self.0.entry(pod.to_string()).or_insert_with(fresh);
        w.seen = now;
        match totals.since(&w.at_start) {
            None => *w = fresh(),
            Some(growth) if now.saturating_duration_since(w.started) >= AUTHORIZE_WINDOW => {
                w.last = Some(growth);
                w.started = now;
                w.at_start = totals.clone();
            }
            Some(_) => {}
        }
        w.last.clone()
    }
}

impl Report {
    /// Reads a relay's exposition; `metric` is the connection gauge, which must be there.
    pub fn parse(body: &str, metric: &'static str) -> Result<Self, ScrapeError> {
        let connections = prom::gauge(body, metric)
            .map(prom::as_count)
            .ok_or(ScrapeError::NoSample(metric))?;
        let labelled = |metric: &str, a: &str, b: &str| {
            prom::samples(body, metric)
                .into_iter()
                .find(|(_, v)| *v > 0.0)
                .map(|(labels, _)| {
                    let get = |k: &str| {
                        labels
                            .iter()
                            .find(|(name, _)| name == k)
                            .map(|(_, v)| v.clone())
                            .unwrap_or_default()
                    };
                    (get(a), get(b))
                })
        };
        let nats_error = labelled("wsrelay_nats_last_error", "server", "error");
        Ok(Self {
            connections,
            nats_connected: prom::gauge(body, "wsrelay_nats_connected").map(|v| v > 0.0),
            nats_error,
            config_rejected: prom::gauge(body, "wsrelay_config_rejected").is_some_and(|v| v > 0.0),
            history_streams_ready: prom::gauge(body, "wsrelay_history_streams_ready")
                .map(prom::as_count),
            history_error: labelled("wsrelay_history_stream_error", "stream", "error"),
            jwks_failing: prom::gauge(body, "wsrelay_jwks_fetch_failing").is_some_and(|v| v > 0.0),
            authorize: AuthorizeCounts::parse(body),
            authorize_window: None,
            rebalancing: prom::gauge(body, "wsrelay_rebalancing").is_some_and(|v| v > 0.0),
        })
    }
}

/// A cached outcome of one pod's scrape.
#[derive(Debug, Clone)]
struct Cached {
    at: Instant,
    addr: SocketAddr,
    value: Result<(Report, String), ScrapeError>,
}

/// Scrapes relays, with a per-pod cache.
#[derive(Debug, Clone)]
pub struct Scraper {
    pub metric: &'static str,
    pub timeout: Duration,
    pub ttl: Duration,
    pub metrics: ScrapeMetrics,
    cache: Arc<Mutex<HashMap<String, Cached>>>,
    windows: Arc<Mutex<Windows>>,
}

/// One pod's value, as served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scraped {
    pub name: String,
    pub value: i64,
    pub timestamp: String,
}

impl Scraper {
    pub fn new(metric: &'static str, timeout: Duration, ttl: Duration) -> Self {
        Self::with_metrics(metric, timeout, ttl, ScrapeMetrics::new())
    }

    /// As [`Scraper::new`], counting into `metrics` (shared with the operator's registry).
    pub fn with_metrics(
        metric: &'static str,
        timeout: Duration,
        ttl: Duration,
        metrics: ScrapeMetrics,
    ) -> Self {
        Self {
            metric,
            timeout,
            ttl,
            metrics,
            cache: Arc::default(),
            windows: Arc::default(),
        }
    }

    /// The values of every target that answered, in target order. Failures (also cached,
    /// so a dead pod does not cost a timeout per request) are logged and left out.
    pub async fn values(&self, targets: &[Target]) -> Vec<Scraped> {
        let outcomes = futures::future::join_all(targets.iter().map(|t| self.value(t))).await;
        // Forget pods that have not been asked about for a while (deleted, rescheduled).
        {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let keep = self.ttl * 10;
            cache.retain(|_, c| c.at.elapsed() < keep);
        }
        targets
            .iter()
            .zip(outcomes)
            .filter_map(|(t, outcome)| match outcome {
                Ok((value, timestamp)) => Some(Scraped {
                    name: t.name.clone(),
                    value,
                    timestamp,
                }),
                Err(e) => {
                    tracing::debug!(pod = %t.name, addr = %t.addr, error = %e, "relay left out of the metric");
                    None
                }
            })
            .collect()
    }

    /// The sum over the targets that answered: a gateway's `status.connections`.
    pub async fn total(&self, targets: &[Target]) -> i64 {
        self.values(targets).await.iter().map(|s| s.value).sum()
    }

    /// The reports of the targets that answered, by pod name, in target order (same cache
    /// as [`Scraper::values`]: one scrape per pod and period whoever asks).
    pub async fn reports(&self, targets: &[Target]) -> Vec<(String, Report)> {
        let outcomes = futures::future::join_all(targets.iter().map(|t| self.report(t))).await;
        targets
            .iter()
            .zip(outcomes)
            .filter_map(|(t, r)| r.ok().map(|(report, _)| (t.name.clone(), report)))
            .collect()
    }

    async fn value(&self, target: &Target) -> Result<(i64, String), ScrapeError> {
        self.report(target)
            .await
            .map(|(report, at)| (report.connections, at))
    }

    async fn report(&self, target: &Target) -> Result<(Report, String), ScrapeError> {
        let key = format!("{}/{}", target.uid, target.name);
        if let Some(hit) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .filter(|c| c.at.elapsed() < self.ttl && c.addr == target.addr)
        {
            return hit.value.clone();
        }
        let started = Instant::now();
        let value = match tokio::time::timeout(self.timeout, scrape(target.addr)).await {
            Err(_) => Err(ScrapeError::Timeout(self.timeout)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(body)) => Report::parse(&body, self.metric),
        }
        .map(|mut v| {
            if let Some(totals) = &v.authorize {
                v.authorize_window = self
                    .windows
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .observe(&key, totals, Instant::now());
            }
            (v, now_rfc3339())
        });
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        match &value {
            Ok(_) => {
                self.metrics.ok.inc();
            }
            Err(e) => {
                self.metrics.failed.inc();
                tracing::warn!(pod = %target.name, addr = %target.addr, error = %e, "relay /metrics did not answer");
            }
        };
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(
            key,
            Cached {
                at: Instant::now(),
                addr: target.addr,
                value: value.clone(),
            },
        );
        value
    }
}

fn now_rfc3339() -> String {
    serde_json::to_value(Time(Timestamp::now()))
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// One HTTP/1.0 GET of `/metrics`: the connection closes after the answer, so reading to
/// the end is the whole response, and no HTTP client library is needed.
async fn scrape(addr: SocketAddr) -> Result<String, ScrapeError> {
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n");
    let (status, line, body) = exchange(addr, &request).await?;
    if status != 200 {
        return Err(ScrapeError::Status(line));
    }
    Ok(body)
}

/// One HTTP/1.0 POST of `path` to a relay's admin port (the operator's `/registry/forget`
/// without a body, `/rebalance` with a JSON one), like [`scrape`]: the status code and the
/// answer's body. Unbounded in time: the caller bounds it.
pub async fn post(
    addr: SocketAddr,
    path: &str,
    json: Option<&serde_json::Value>,
) -> Result<(u16, String), ScrapeError> {
    let body = json.map(|j| j.to_string()).unwrap_or_default();
    let content_type = if json.is_some() {
        "Content-Type: application/json\r\n"
    } else {
        ""
    };
    let request = format!(
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\n{content_type}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, _, answer) = exchange(addr, &request).await?;
    Ok((status, answer))
}

/// Sends `request`, reads the response to its end (at most [`MAX_BODY`]): the status code,
/// the status line and the body.
async fn exchange(addr: SocketAddr, request: &str) -> Result<(u16, String, String), ScrapeError> {
    let io = |e: std::io::Error| ScrapeError::Io(e.to_string());
    let mut stream = TcpStream::connect(addr).await.map_err(io)?;
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    let mut raw = Vec::new();
    stream
        .take(MAX_BODY)
        .read_to_end(&mut raw)
        .await
        .map_err(io)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| ScrapeError::Io("no HTTP header".into()))?;
    let line = head.lines().next().unwrap_or_default().to_string();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ScrapeError::Status(line.clone()))?;
    Ok((status, line, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tokio::net::TcpListener;

    fn pod(name: &str, phase: &str, ip: Option<&str>, admin: Option<i32>) -> Pod {
        let ports = admin
            .map(|p| json!([{ "name": "admin", "containerPort": p }]))
            .unwrap_or(json!([]));
        serde_json::from_value(json!({
            "metadata": { "name": name, "uid": format!("uid-{name}"), "labels": { "app.kubernetes.io/name": "wsrelay" } },
            "spec": { "containers": [{ "name": "relay", "ports": ports }] },
            "status": { "phase": phase, "podIP": ip }
        }))
        .expect("pod")
    }

    #[test]
    fn only_running_relay_pods_with_an_ip_are_targets() {
        let mut deleting = pod("d", "Running", Some("10.0.0.4"), None);
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        let pods = [
            pod("a", "Running", Some("10.0.0.1"), Some(9191)),
            pod("b", "Pending", None, None),
            pod("c", "Running", None, None),
            deleting,
            pod("e", "Running", Some("10.0.0.5"), None),
        ];
        let mut stranger = pod("s", "Running", Some("10.0.0.6"), None);
        stranger.metadata.labels = None;
        let pods: Vec<Pod> = pods.into_iter().chain([stranger]).collect();
        let t = targets(&pods);
        assert_eq!(
            t.iter().map(|t| t.addr.to_string()).collect::<Vec<_>>(),
            ["10.0.0.1:9191", "10.0.0.5:9090"]
        );
        assert_eq!(t[0].name, "a");
    }

    /// A fake relay admin port that answers `/metrics` with `body` (or never, when None).
    async fn fake_relay(
        body: Option<&'static str>,
    ) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    match body {
                        Some(b) => {
                            let _ = s
                                .write_all(
                                    format!(
                                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{b}"
                                    )
                                    .as_bytes(),
                                )
                                .await;
                        }
                        None => tokio::time::sleep(Duration::from_secs(30)).await,
                    }
                });
            }
        });
        (addr, hits)
    }

    fn target(name: &str, addr: SocketAddr) -> Target {
        Target {
            name: name.into(),
            uid: format!("uid-{name}"),
            addr,
        }
    }

    #[tokio::test]
    async fn answering_pods_are_listed_silent_ones_left_out_and_counted() {
        let (a, _) = fake_relay(Some(
            "# TYPE wsrelay_connections gauge\nwsrelay_connections 3\n",
        ))
        .await;
        let (b, _) = fake_relay(Some("wsrelay_connections 5\n")).await;
        let (silent, _) = fake_relay(None).await;
        let (no_gauge, _) = fake_relay(Some("other 1\n")).await;
        let scraper = Scraper::new(
            "wsrelay_connections",
            Duration::from_millis(300),
            Duration::from_secs(5),
        );
        let started = Instant::now();
        let values = scraper
            .values(&[
                target("a", a),
                target("silent", silent),
                target("b", b),
                target("no-gauge", no_gauge),
            ])
            .await;
        // Concurrent: the silent pod costs one timeout, not one per pod.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            values
                .iter()
                .map(|v| (v.name.as_str(), v.value))
                .collect::<Vec<_>>(),
            [("a", 3), ("b", 5)]
        );
        assert!(!values[0].timestamp.is_empty());
        assert_eq!(scraper.metrics.ok.get(), 2);
        assert_eq!(scraper.metrics.failed.get(), 2);
        assert_eq!(scraper.total(&[target("a", a), target("b", b)]).await, 8);
    }

    #[test]
    fn a_report_carries_what_the_relay_says_about_nats_config_and_history() {
        let body = "wsrelay_connections 2\nwsrelay_nats_connected 0\n\
            wsrelay_nats_last_error{server=\"nats://10.0.0.9:4222\",error=\"connection refused\"} 1\n\
            wsrelay_config_rejected 1\nwsrelay_history_streams_ready 1\n\
            wsrelay_jwks_fetch_failing 1\n\
            wsrelay_history_stream_error{stream=\"wsrelay_a_b_1\",error=\"insufficient storage resources available (code 500, error code 10047)\"} 1\n";
        let r = Report::parse(body, "wsrelay_connections").expect("report");
        assert_eq!(
            r,
            Report {
                connections: 2,
                nats_connected: Some(false),
                nats_error: Some(("nats://10.0.0.9:4222".into(), "connection refused".into())),
                config_rejected: true,
                history_streams_ready: Some(1),
                history_error: Some((
                    "wsrelay_a_b_1".into(),
                    "insufficient storage resources available (code 500, error code 10047)".into()
                )),
                jwks_failing: true,
                authorize: None,
                authorize_window: None,
                rebalancing: false,
            }
        );
        // A relay shedding for a rebalance round says so; the moved counter is no gauge.
        let shedding = Report::parse(
            "wsrelay_connections 9\nwsrelay_rebalance_moved_total 4\nwsrelay_rebalancing 1\n",
            "wsrelay_connections",
        )
        .expect("shedding");
        assert!(shedding.rebalancing);
        let done = Report::parse(
            "wsrelay_connections 9\nwsrelay_rebalancing 0\n",
            "wsrelay_connections",
        )
        .expect("done");
        assert!(!done.rebalancing);
        // An older relay: only the connection gauge.
        let old = Report::parse("wsrelay_connections 4\n", "wsrelay_connections").expect("old");
        assert_eq!(
            (old.connections, old.nats_connected, old.nats_error),
            (4, None, None)
        );
        assert!(Report::parse("x 1\n", "wsrelay_connections").is_err());
    }

    #[test]
    fn authorization_counters_are_summed_over_ops_without_rule_errors() {
        let body = "wsrelay_connections 1\n\
            # TYPE wsrelay_authorize_requests_total counter\n\
            wsrelay_authorize_requests_total{op=\"subscribe\"} 10\n\
            wsrelay_authorize_requests_total{op=\"connect\"} 5\n\
            wsrelay_authorize_failures_total{op=\"subscribe\",reason=\"timeout\"} 3\n\
            wsrelay_authorize_failures_total{op=\"connect\",reason=\"timeout\"} 1\n\
            wsrelay_authorize_failures_total{op=\"publish\",reason=\"no_responders\"} 2\n\
            wsrelay_authorize_failures_total{op=\"subscribe\",reason=\"rule_error\"} 7\n";
        let r = Report::parse(body, "wsrelay_connections").expect("report");
        let counts = r.authorize.expect("counters");
        assert_eq!(counts.requests, 15);
        assert_eq!(
            counts.failures,
            BTreeMap::from([("no_responders".into(), 2), ("timeout".into(), 4)])
        );
        assert_eq!(counts.failed(), 6);
        assert_eq!(r.authorize_window, None, "the scraper fills it");
        // A relay without authorization (or an older one) exports neither family.
        let plain = Report::parse("wsrelay_connections 1\n", "wsrelay_connections").expect("r");
        assert_eq!(plain.authorize, None);
    }

    /// The growth of a pod's counters is taken over windows of at least
    /// [`AUTHORIZE_WINDOW`]; the last complete one is answered until the next closes, and a
    /// counter that goes back (a restart) starts over.
    #[test]
    fn authorization_windows_close_after_the_window_and_restart_on_a_reset() {
        let counts = |requests: u64, timeout: u64| AuthorizeCounts {
            requests,
            failures: BTreeMap::from([("timeout".to_string(), timeout)]),
        };
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut w = Windows::default();
        assert_eq!(w.observe("uid/a", &counts(10, 0), at(0)), None);
        assert_eq!(w.observe("uid/a", &counts(20, 5), at(30)), None, "open");
        assert_eq!(
            w.observe("uid/a", &counts(50, 25), at(61)),
            Some(counts(40, 25))
        );
        assert_eq!(
            w.observe("uid/a", &counts(60, 25), at(90)),
            Some(counts(40, 25)),
            "the last complete window until the next closes"
        );
        assert_eq!(
            w.observe("uid/a", &counts(70, 25), at(122)),
            Some(counts(20, 0))
        );
        // Another pod has windows of its own.
        assert_eq!(w.observe("uid/b", &counts(1, 1), at(122)), None);
        // The relay restarted in place: its counters went back.
        assert_eq!(w.observe("uid/a", &counts(3, 1), at(130)), None);
        assert_eq!(
            w.observe("uid/a", &counts(9, 1), at(191)),
            Some(counts(6, 0))
        );
        // A reason that appears for the first time grows from zero.
        let mut more = counts(19, 1);
        more.failures.insert("bad_reply".into(), 4);
        let mut want = counts(10, 0);
        want.failures.insert("bad_reply".into(), 4);
        assert_eq!(w.observe("uid/a", &more, at(252)), Some(want));
        // A pod not scraped for long is forgotten.
        assert_eq!(w.observe("uid/c", &counts(0, 0), at(1000)), None);
        assert!(!w.0.contains_key("uid/b"));
    }

    #[tokio::test]
    async fn values_are_cached_for_the_ttl() {
        let (a, hits) = fake_relay(Some("wsrelay_connections 1\n")).await;
        let scraper = Scraper::new(
            "wsrelay_connections",
            Duration::from_millis(500),
            Duration::from_secs(60),
        );
        for _ in 0..3 {
            assert_eq!(scraper.total(&[target("a", a)]).await, 1);
        }
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        let fresh = Scraper::new(
            "wsrelay_connections",
            Duration::from_millis(500),
            Duration::ZERO,
        );
        fresh.total(&[target("a", a)]).await;
        fresh.total(&[target("a", a)]).await;
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 3);
    }
}
