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
pub enum Signal {
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
    signals: tokio::sync::mpsc::Sender<Signal>,
) -> Result<async_nats::Client, NatsError> {
    let m = metrics.clone();
    let flag = connected.clone();
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
            async move {
                match event {
                    Event::Connected => {
                        let again = m.nats_disconnects.get() > 0;
                        flag.store(true, Ordering::SeqCst);
                        m.nats_connected.set(1);
                        tracing::info!("NATS connected");
                        if again && signals.try_send(Signal::Reconnected).is_err() {
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
                        if crate::hub::refused_subject(&e).is_some() =>
                    {
                        if let Some(subject) = crate::hub::refused_subject(&e) {
                            // Bounded: a flood of refusals beyond it is only logged.
                            if signals
                                .try_send(Signal::Refused(subject.to_owned()))
                                .is_err()
                            {
                                tracing::warn!(%subject, "NATS refusal not forwarded");
                            }
                        }
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
