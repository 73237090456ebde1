//! The relay's one NATS connection: options from the config, state into metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::{ConnectOptions, Event};

use crate::config::Nats;
use crate::metrics::Metrics;

/// Why the NATS connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// A credentials file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// async-nats refused the options or the connection.
    #[error("NATS: {0}")]
    Connect(String),
}

fn read_trimmed(p: &std::path::Path) -> Result<String, NatsError> {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_owned())
        .map_err(|source| NatsError::Read {
            path: p.display().to_string(),
            source,
        })
}

/// What the NATS connection reports to the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The server refused this connection's subscription to the subject (the hub ends it).
    Refused(String),
    /// The connection is up again after a loss (republished messages may have been lost:
    /// resumable channels read what they missed).
    Reconnected,
}

/// Connects (in the background: the relay starts even while NATS is down, and reports
/// not ready). `connected` mirrors the connection state; refusals and reconnections are
/// sent to `signals`.
pub async fn connect(
    cfg: &Nats,
    metrics: Arc<Metrics>,
    connected: Arc<AtomicBool>,
    signals: tokio::sync::mpsc::Sender<Report>,
) -> Result<async_nats::Client, NatsError> {
    let m = metrics.clone();
    let flag = connected.clone();
    let diagnosis = Arc::new(Diagnosis {
        urls: cfg.urls.clone(),
        metrics: metrics.clone(),
        connected: connected.clone(),
        probing: AtomicBool::new(false),
        last: std::sync::Mutex::new(None),
    });
    let mut opts = ConnectOptions::new()
        .name(&cfg.name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .ping_interval(Duration::from_secs(10))
        .reconnect_delay_callback(|attempts| {
            // 0, 100 ms, 200 ms ... capped at 2 s: a restarted NATS is found quickly.
            Duration::from_millis((attempts as u64).saturating_mul(100).min(2_000))
        })
        .event_callback(move |event| {
            let m = m.clone();
            let flag = flag.clone();
            let signals = signals.clone();
            let diagnosis = diagnosis.clone();
            async move {
                match event {
                    Event::Connected => {
                        let again = m.nats_disconnects.get() > 0;
                        flag.store(true, Ordering::SeqCst);
                        m.nats_connected.set(1);
                        m.nats_last_error.clear();
                        tracing::info!("NATS connected");
                        if again && signals.try_send(Report::Reconnected).is_err() {
                            tracing::warn!("NATS reconnection not forwarded");
                        }
                    }
                    Event::Disconnected => {
                        flag.store(false, Ordering::SeqCst);
                        m.nats_connected.set(0);
                        m.nats_disconnects.inc();
                        tracing::warn!("NATS disconnected");
                    }
                    Event::Closed => {
                        flag.store(false, Ordering::SeqCst);
                        m.nats_connected.set(0);
                    }
                    Event::ServerError(async_nats::ServerError::Other(e))
                        if refused_subject(&e).is_some() =>
                    {
                        if let Some(subject) = refused_subject(&e) {
                            // Bounded: a flood of refusals beyond it is only logged.
                            if signals
                                .try_send(Report::Refused(subject.to_owned()))
                                .is_err()
                            {
                                tracing::warn!(%subject, "NATS refusal not forwarded");
                            }
                        }
                    }
                    // async-nats says only the kind ("IO error"): find the server and the cause.
                    Event::ClientError(async_nats::ClientError::Other(kind)) => {
                        diagnosis.failed(kind);
                    }
                    Event::ServerError(async_nats::ServerError::AuthorizationViolation) => {
                        diagnosis.failed("authorization violation".into());
                    }
                    other => tracing::info!(event = %other, "NATS event"),
                }
            }
        });
    let c = &cfg.credentials;
    if let Some(p) = &c.token_file {
        opts = opts.token(read_trimmed(p)?);
    }
    if let (Some(u), Some(p)) = (&c.user_file, &c.password_file) {
        opts = opts.user_and_password(read_trimmed(u)?, read_trimmed(p)?);
    }
    if let Some(p) = &c.nkey_seed_file {
        opts = opts.nkey(read_trimmed(p)?);
    }
    if let Some(p) = &c.creds_file {
        opts = opts
            .credentials_file(p)
            .await
            .map_err(|source| NatsError::Read {
                path: p.display().to_string(),
                source,
            })?;
    }
    if let Some(tls) = &cfg.tls {
        opts = opts.require_tls(true);
        if let Some(ca) = &tls.ca_file {
            opts = opts.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
    }
    let urls: Vec<async_nats::ServerAddr> = cfg
        .urls
        .iter()
        .map(|u| u.parse())
        .collect::<Result<_, _>>()
        .map_err(|e: std::io::Error| NatsError::Connect(e.to_string()))?;
    opts.connect(urls)
        .await
        .map_err(|e| NatsError::Connect(e.to_string()))
}

/// How often the NATS client's own connection task is checked for life.
pub const SUPERVISE_EVERY: Duration = Duration::from_secs(1);

/// Watches the NATS client until `stop`: its connection task answers a flush (or, while it
/// reconnects, keeps it waiting); an error means the task itself is gone (a bug in the client,
/// or a panic it could not survive), and a client without it never reconnects. Then the relay
/// stops being ready, says why in `wsrelay_nats_client_failed` and `wsrelay_nats_last_error`
/// (which the operator turns into `Degraded`), and `failed` is cancelled: the process drains
/// and exits, to be started again with a new client.
pub async fn supervise(
    client: async_nats::Client,
    metrics: Arc<Metrics>,
    connected: Arc<AtomicBool>,
    failed: tokio_util::sync::CancellationToken,
    stop: tokio_util::sync::CancellationToken,
    server: String,
) {
    let mut tick = tokio::time::interval(SUPERVISE_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(Err(e)) = tokio::time::timeout(SUPERVISE_EVERY, client.flush()).await else {
            continue;
        };
        if stop.is_cancelled() {
            return;
        }
        connected.store(false, Ordering::SeqCst);
        metrics.nats_connected.set(0);
        metrics.nats_client_failed.set(1);
        metrics.nats_failed(display_url(&server), "NATS client failed".into());
        tracing::error!(error = %e, "the NATS client stopped for good; draining to restart");
        failed.cancel();
        return;
    }
}

/// Finds out which server cannot be reached and why, after async-nats reported a failed
/// connection attempt (it names neither): a TCP connect to each configured server, one
/// probe at a time. The outcome goes to the log (once per change or minute) and to
/// `wsrelay_nats_last_error`, which the operator reads.
struct Diagnosis {
    urls: Vec<String>,
    metrics: Arc<Metrics>,
    connected: Arc<AtomicBool>,
    probing: AtomicBool,
    last: std::sync::Mutex<Option<(String, &'static str, std::time::Instant)>>,
}

/// How long one probe of one server may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// A failure that does not change is logged again after this long.
const RELOG_AFTER: Duration = Duration::from_secs(60);

impl Diagnosis {
    fn failed(self: &Arc<Self>, kind: String) {
        if self.probing.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let (server, error) = match probe(&me.urls).await {
                Some(found) => found,
                None => (
                    me.urls.first().map(|u| display_url(u)).unwrap_or_default(),
                    nats_cause(&kind),
                ),
            };
            // Connected meanwhile: the failure is history.
            if !me.connected.load(Ordering::SeqCst) {
                me.metrics.nats_failed(server.clone(), error.to_string());
                let mut last = me.last.lock().unwrap_or_else(|p| p.into_inner());
                let repeat = last.as_ref().is_some_and(|(s, e, at)| {
                    *s == server && *e == error && at.elapsed() < RELOG_AFTER
                });
                if repeat {
                    tracing::debug!(%server, error, nats_error = %kind, "NATS unreachable");
                } else {
                    tracing::warn!(%server, error, nats_error = %kind, "NATS unreachable");
                    *last = Some((server, error, std::time::Instant::now()));
                }
            }
            me.probing.store(false, Ordering::SeqCst);
        });
    }
}

/// A configured server URL as a log, a metric label or a status may show it: scheme, host
/// and port, never a user, password or token (`nats://user:pw@host:4222` -> `nats://host:4222`).
pub fn display_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("nats", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{host}")
}

/// `host:port` to dial for a server URL (NATS' default port 4222 when none is given).
fn dial_address(url: &str) -> String {
    let shown = display_url(url);
    let hostport = shown.split_once("://").map_or(shown.as_str(), |(_, h)| h);
    match hostport.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            hostport.to_string()
        }
        _ => format!("{hostport}:4222"),
    }
}

/// The first configured server a TCP connect fails to, and why; None when all answer
/// (then the failure is above TCP: TLS, authentication, the NATS handshake).
async fn probe(urls: &[String]) -> Option<(String, &'static str)> {
    for url in urls {
        let addr = dial_address(url);
        let outcome = tokio::time::timeout(PROBE_TIMEOUT, async {
            let resolved: Vec<std::net::SocketAddr> = tokio::net::lookup_host(&addr)
                .await
                .map_err(|_| "name not resolved")?
                .collect();
            let mut last = "name not resolved";
            for a in resolved {
                match tokio::net::TcpStream::connect(a).await {
                    Ok(_) => return Ok(()),
                    Err(e) => last = io_cause(&e),
                }
            }
            Err(last)
        })
        .await
        .unwrap_or(Err("connection timed out"));
        if let Err(cause) = outcome {
            return Some((display_url(url), cause));
        }
    }
    None
}

/// A bounded description of a failed TCP connect.
pub fn io_cause(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionRefused => "connection refused",
        ErrorKind::TimedOut => "connection timed out",
        ErrorKind::HostUnreachable => "host unreachable",
        ErrorKind::NetworkUnreachable => "network unreachable",
        ErrorKind::ConnectionReset => "connection reset",
        ErrorKind::AddrNotAvailable => "address not available",
        ErrorKind::PermissionDenied => "permission denied",
        _ => "connection failed",
    }
}

/// A bounded description of a failure async-nats reported (its `ConnectErrorKind` text)
/// when TCP itself works.
pub fn nats_cause(kind: &str) -> &'static str {
    match kind {
        "timed out" => "NATS handshake timed out",
        "TLS error" => "TLS error",
        "authorization violation" => "authorization violation",
        "failed signing nonce" => "authentication failed",
        "DNS error" => "name not resolved",
        "failed to parse server or server list" => "invalid server URL",
        _ => "connection failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(
            display_url("nats://user:secret@nats.example:4222"),
            "nats://nats.example:4222"
        );
        assert_eq!(
            display_url("tls://tok@10.0.0.1:4443/x?y"),
            "tls://10.0.0.1:4443"
        );
        assert_eq!(display_url("nats.example"), "nats://nats.example");
        assert_eq!(dial_address("nats://u:p@nats.example"), "nats.example:4222");
        assert_eq!(dial_address("nats://[::1]:4000"), "[::1]:4000");
        assert_eq!(dial_address("nats://[::1]"), "[::1]:4222");
    }

    #[tokio::test]
    async fn a_probe_names_the_server_that_refuses_and_why() {
        let open = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let closed_port = closed.local_addr().expect("addr").port();
        drop(closed);
        let up = format!(
            "nats://127.0.0.1:{}",
            open.local_addr().expect("addr").port()
        );
        let down = format!("nats://a:b@127.0.0.1:{closed_port}");
        assert_eq!(probe(std::slice::from_ref(&up)).await, None);
        assert_eq!(
            probe(&[up, down]).await,
            Some((
                format!("nats://127.0.0.1:{closed_port}"),
                "connection refused"
            ))
        );
        assert_eq!(
            probe(&["nats://nats.invalid:4222".to_string()]).await,
            Some(("nats://nats.invalid:4222".to_string(), "name not resolved"))
        );
    }

    /// The relay's own connection to a port nothing listens on: the metric names it.
    #[tokio::test]
    async fn an_unreachable_server_shows_in_the_metrics() {
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = closed.local_addr().expect("addr").port();
        drop(closed);
        let cfg: Nats = serde_json::from_value(serde_json::json!({
            "urls": [format!("nats://127.0.0.1:{port}")]
        }))
        .expect("config");
        let metrics = Arc::new(Metrics::new());
        let (tx, _rx) = tokio::sync::mpsc::channel(8);
        let _client = connect(&cfg, metrics.clone(), Arc::new(AtomicBool::new(false)), tx)
            .await
            .expect("connects in the background");
        let want = format!(
            "wsrelay_nats_last_error{{server=\"nats://127.0.0.1:{port}\",error=\"connection refused\"}} 1"
        );
        for _ in 0..100 {
            if metrics.encode().contains(&want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{want} not in {}", metrics.encode());
    }
}

/// The subject a NATS permissions-violation error names for a subscription
/// (`Permissions Violation for Subscription to "private.x"`), if it is one. Pure.
pub fn refused_subject(error: &str) -> Option<&str> {
    let rest = error
        .split_once("Permissions Violation for Subscription to ")?
        .1;
    let rest = rest.trim_start_matches(['"', '\'']);
    let end = rest.find(['"', '\'', ' ']).unwrap_or(rest.len());
    Some(&rest[..end]).filter(|s| !s.is_empty())
}

#[cfg(test)]
mod refused_tests {
    use super::*;

    #[test]
    fn refused_subjects_are_read_from_server_errors() {
        assert_eq!(
            refused_subject("Permissions Violation for Subscription to \"private.x\""),
            Some("private.x")
        );
        assert_eq!(
            refused_subject(
                "nats: Permissions Violation for Subscription to \"a.b\" using queue \"q\""
            ),
            Some("a.b")
        );
        assert_eq!(
            refused_subject("Permissions Violation for Publish to \"x\""),
            None
        );
        assert_eq!(refused_subject("authorization violation"), None);
    }
}
