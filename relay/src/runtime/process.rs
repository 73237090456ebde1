//! Starting and stopping a relay process: listeners, NATS, signals, file watching.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::edge::Edge;
use crate::edge::tls::{TlsAcceptor, TlsError};
use crate::fanout::Hub;
use crate::metrics::Metrics;
use crate::nats::{NatsError, Report};
use crate::state::{Relay, Settings};

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Key files.
    #[error(transparent)]
    Keys(#[from] crate::state::SettingsError),
    /// NATS options.
    #[error(transparent)]
    Nats(#[from] NatsError),
    /// TLS files.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signal(std::io::Error),
    /// The NATS client stopped for good while the relay ran (it drained first).
    #[error("the NATS client stopped for good; the relay drained and exits to be restarted")]
    NatsClientFailed,
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A started relay.
#[derive(Debug)]
pub struct Running {
    /// Shared state.
    pub relay: Arc<Relay>,
    /// Bound client address.
    pub client_addr: SocketAddr,
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    /// The TLS acceptor, if serving wss.
    pub tls: Option<TlsAcceptor>,
    /// The edge: admission's counters.
    pub edge: Arc<Edge>,
    tasks: Vec<JoinHandle<()>>,
}

/// Binds with a listen backlog as deep as the kernel allows (`net.core.somaxconn` caps it, as
/// Go servers do): `TcpListener::bind` asks for 128, and a burst of connects (256 handshakes in
/// flight in the idle benchmark) overflowed it: the kernel dropped the SYNs (`ListenOverflows`)
/// and those clients waited for their 1-second SYN retransmit.
async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let listen = || {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| StartError::Bind { addr, source })
}

/// Asked of `listen(2)`; the kernel lowers it to `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 65_535;

/// Starts listeners and the NATS connection from a validated config.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::new());
    let connected = Arc::new(AtomicBool::new(false));
    // Keys first: a relay that cannot verify tokens does not connect to anything.
    let settings = Settings::new(config)?;
    let config = settings.config.clone();
    let tls = match &config.tls {
        Some(t) => Some(TlsAcceptor::new(crate::edge::tls::load(
            &t.cert_file,
            &t.key_file,
        )?)),
        None => None,
    };
    let (signals_tx, mut signals_rx) = tokio::sync::mpsc::channel(256);
    let client =
        crate::nats::connect(&config.nats, metrics.clone(), connected.clone(), signals_tx).await?;
    let hub = Arc::new(Hub::new(
        client,
        metrics.clone(),
        config.limits.max_message_bytes as usize,
    ));
    let client_listener = bind(config.listen.client).await?;
    let admin_listener = bind(config.listen.admin).await?;
    let client_addr = client_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.listen.client,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.listen.admin,
            source,
        })?;
    let registry = config.registry.as_ref().map(|r| {
        crate::registry::Registry::start(
            r,
            &Relay::name_for(&config),
            config.limits.max_fleet_connections_per_subject > 0,
            config.events.as_ref().map(crate::events::Emitter::new),
            hub.client().clone(),
            metrics.clone(),
        )
    });
    let relay = Arc::new(Relay::new(settings, hub, metrics, connected).with_registry(registry));
    let edge = Arc::new(Edge::new(relay.clone()));
    // What the NATS connection reports: refused subscriptions end the hub's entries for
    // those subjects; a reconnection makes resumable channels read what they missed.
    let refusals = {
        let relay = relay.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = relay.shutdown.cancelled() => break,
                    s = signals_rx.recv() => match s {
                        Some(Report::Refused(subject)) => relay.hub.refused(&subject),
                        Some(Report::Reconnected) => relay.hub.resync(),
                        None => break,
                    },
                }
            }
        })
    };
    let history = tokio::spawn({
        let relay = relay.clone();
        let hub = relay.hub.clone();
        super::upkeep::maintain(relay, Duration::from_secs(60), move |stream| {
            hub.reset_stream(stream)
        })
    });
    let supervisor = tokio::spawn(crate::nats::supervise(
        relay.hub.client().clone(),
        relay.metrics.clone(),
        relay.nats_connected.clone(),
        relay.nats_failed.clone(),
        relay.shutdown.clone(),
        relay
            .settings()
            .config
            .nats
            .urls
            .first()
            .cloned()
            .unwrap_or_default(),
    ));
    let control = tokio::spawn(super::control::serve(relay.clone()));
    let revocations = tokio::spawn(super::revocations::watch(relay.clone()));
    let server_subs = tokio::spawn(super::serversubs::watch(relay.clone()));
    // SSE POSTs other relays forward to this one (docs/protocol.md section 9).
    let forwarded = tokio::spawn(crate::edge::sse::forward::serve(
        relay.clone(),
        edge.sessions.clone(),
    ));
    let tasks = vec![
        refusals,
        history,
        supervisor,
        control,
        revocations,
        server_subs,
        forwarded,
        tokio::spawn(crate::edge::listener::serve(
            client_listener,
            edge.clone(),
            tls.clone(),
        )),
        tokio::spawn(super::admin::serve(admin_listener, relay.clone())),
    ];
    tracing::info!(client = %client_addr, admin = %admin_addr, "wsrelay listening");
    Ok(Running {
        relay,
        client_addr,
        admin_addr,
        tls,
        edge,
        tasks,
    })
}

impl Running {
    /// Reloads the config from `path` (see `reload::reload`); returns the subscriptions it
    /// ended.
    pub fn reload(&self, path: &Path) -> Result<usize, super::reload::ReloadError> {
        super::reload::reload(&self.relay, &self.edge, path)
    }

    /// Drains and stops (what SIGTERM does).
    pub async fn drain(self) {
        let grace = Duration::from_secs(self.relay.settings().config.drain.grace_period_seconds);
        super::drain::drain(&self.relay, grace).await;
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
        }
    }
}

/// Content fingerprint of a file (ConfigMap and Secret updates swap symlinks, so the
/// content, not the mtime, is what counts).
fn fingerprint(path: &Path) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

/// Runs the relay from a config file until SIGTERM/SIGINT, reloading on SIGHUP and when
/// the file (or the TLS files) change. Returns after the drain.
pub async fn run(config_path: PathBuf, config: Config) -> Result<(), StartError> {
    use tokio::signal::unix::{SignalKind, signal};
    let running = start(config).await?;
    let relay = running.relay.clone();
    let mut term = signal(SignalKind::terminate()).map_err(StartError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(StartError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(StartError::Signal)?;
    let tls_paths = relay
        .settings()
        .config
        .tls
        .as_ref()
        .map(|t| (t.cert_file.clone(), t.key_file.clone()));
    // The config file and the JWT key files it names: a change to any of them reloads (a
    // rotated Secret updates the key file in place, and the relay picks the new key up
    // without dropping connections).
    let watched = |relay: &Relay| -> Vec<Option<u64>> {
        let live = relay.settings();
        let key = live.config.auth.jwt.as_ref().map(|j| &j.key);
        std::iter::once(config_path.as_path())
            .chain(key.and_then(|k| k.hmac_secret_file.as_deref()))
            .chain(key.and_then(|k| k.public_key_file.as_deref()))
            .map(fingerprint)
            .collect()
    };
    let mut seen_config = watched(&relay);
    let mut seen_tls = tls_paths
        .as_ref()
        .map(|(c, k)| (fingerprint(c), fingerprint(k)));
    let mut poll = tokio::time::interval(Duration::from_secs(2));
    loop {
        let mut do_reload = false;
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            () = relay.nats_failed.cancelled() => break,
            _ = hup.recv() => { tracing::info!("SIGHUP"); do_reload = true; }
            _ = poll.tick() => {
                let now = watched(&relay);
                if now.iter().all(Option::is_some) && now != seen_config {
                    tracing::info!("config or key file changed");
                    do_reload = true;
                }
                if let (Some((c, k)), Some(acceptor)) = (&tls_paths, &running.tls) {
                    let now = (fingerprint(c), fingerprint(k));
                    if Some(now) != seen_tls {
                        match crate::edge::tls::load(c, k) {
                            Ok(cfg) => {
                                acceptor.replace(cfg);
                                tracing::info!("TLS certificate reloaded");
                                seen_tls = Some(now);
                            }
                            Err(e) => tracing::warn!(error = %e, "TLS reload failed; keeping the old certificate"),
                        }
                    }
                }
            }
        }
        if do_reload {
            if let Err(e) = running.reload(&config_path) {
                tracing::error!(error = %e, "config reload refused; the old config stays in force");
            }
            // After the reload: the new config may name other key files.
            seen_config = watched(&relay);
        }
    }
    let failed = relay.nats_failed.is_cancelled();
    tracing::info!(nats_client_failed = failed, "draining");
    running.drain().await;
    if failed {
        return Err(StartError::NatsClientFailed);
    }
    Ok(())
}
