//! The state shared by every part of a running relay: the settings in force (swapped as one
//! on reload), the hub, the metrics, the open connections, and the relay's lifecycle
//! (ready, draining, NATS failed, shutdown). Admission's counters live with the edge.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::{Access, AccessError};
use crate::auth::{Authenticator, KeyLoadError};
use crate::authz::Authorizer;
use crate::config::Config;
use crate::conn::close::End;
use crate::conn::outbox::{Outbox, QueueBudget};
use crate::conn::{Conn, ConnId};
use crate::fanout::Hub;
use crate::metrics::Metrics;
use crate::presence::Presences;
use crate::registry::Registry;

/// The parts of the config that can change on reload, swapped as one.
#[derive(Debug)]
pub struct Settings {
    /// The config in force.
    pub config: Arc<Config>,
    /// Its compiled bindings.
    pub authz: Arc<Authorizer>,
    /// Its authentication settings and keys.
    pub authn: Arc<Authenticator>,
    /// Its bindings' checks and the connect step (with their decision caches).
    pub access: Arc<Access>,
}

/// Why settings could not be built from a config.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The connection tokens' keys.
    #[error(transparent)]
    Keys(#[from] KeyLoadError),
    /// A binding's checks (its own subscription-token keys).
    #[error(transparent)]
    Access(#[from] AccessError),
}

impl Settings {
    /// Compiles `config`'s bindings and checks and loads its keys.
    pub fn new(config: Config) -> Result<Self, SettingsError> {
        let authn = Arc::new(Authenticator::new(&config.auth)?);
        let authz = Arc::new(Authorizer::new(&config.bindings));
        let access = Arc::new(Access::new(&config, authz.clone(), authn.clone())?);
        Ok(Self {
            authn,
            authz,
            access,
            config: Arc::new(config),
        })
    }
}

/// Shared state of a running relay.
#[derive(Debug)]
pub struct Relay {
    live: RwLock<Arc<Settings>>,
    /// Subject fan-out.
    pub hub: Arc<Hub>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// True while the NATS connection is up.
    pub nats_connected: Arc<AtomicBool>,
    /// True from SIGTERM on.
    pub draining: AtomicBool,
    /// True while a rebalancing round sheds connections (`runtime::rebalance`): not ready,
    /// new connections refused, the open ones served.
    pub shedding: AtomicBool,
    /// Cancelled when the NATS client stopped for good (`crate::nats::supervise`).
    pub nats_failed: CancellationToken,
    /// Bytes queued on all connections (`limits.maxQueuedBytes`).
    pub queue_budget: Arc<QueueBudget>,
    /// Tracks every connection task (and the HTTP handshakes), so none outlives shutdown.
    pub tracker: TaskTracker,
    /// Cancelled when the relay stops: ends accept loops and the admin server.
    pub shutdown: CancellationToken,
    /// This relay's name in the `Wsrelay-Connection` header of client publishes: the pod
    /// name (`HOSTNAME`), else the NATS connection name.
    pub name: String,
    /// The connection registry, when the config has one (set at start; a reload does not
    /// change it).
    pub registry: Option<Arc<Registry>>,
    /// Presence's watchers, with the registry.
    pub presence: Option<Arc<Presences>>,
    /// The tokens the backend revoked (kept by `runtime::revocations`).
    pub revoked: crate::access::revoked::Revoked,
    /// Whether the revocations present at the start were read (`/ready` waits for it when
    /// the config has `control`).
    pub revocations_read: AtomicBool,
    /// The backend's server-side subscriptions (kept by `runtime::serversubs`).
    pub server_subs: crate::registry::server_subs::ServerSubs,
    /// Whether the server-side subscriptions present at the start were read (`/ready` waits
    /// for it when the config has `control`).
    pub server_subs_read: AtomicBool,
    /// The lifecycle events' stream, when the config at start has durable events.
    pub events_stream: Option<async_nats::jetstream::stream::Config>,
    conns: Mutex<HashMap<ConnId, Arc<Conn>>>,
    next_id: AtomicU64,
}

impl Relay {
    /// Assembles the state.
    pub fn new(
        live: Settings,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        nats_connected: Arc<AtomicBool>,
    ) -> Self {
        let queue_budget = Arc::new(QueueBudget::new(
            live.config.limits.max_queued_bytes,
            metrics.queued_bytes.clone(),
            metrics.queue_limit_hits.clone(),
            metrics
                .dropped
                .get_or_create(&crate::metrics::Reason {
                    reason: "slow_consumer_drop_oldest",
                })
                .clone(),
            metrics.slow_consumers.clone(),
        ));
        let name = Self::name_for(&live.config);
        metrics
            .drain_grace
            .set(live.config.drain.grace_period_seconds as i64);
        Self {
            name,
            registry: None,
            presence: None,
            revoked: crate::access::revoked::Revoked::default(),
            revocations_read: AtomicBool::new(false),
            server_subs: crate::registry::server_subs::ServerSubs::default(),
            server_subs_read: AtomicBool::new(false),
            events_stream: live
                .config
                .events
                .as_ref()
                .and_then(crate::events::stream_config),
            live: RwLock::new(Arc::new(live)),
            hub,
            metrics,
            nats_connected,
            draining: AtomicBool::new(false),
            shedding: AtomicBool::new(false),
            nats_failed: CancellationToken::new(),
            queue_budget,
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            conns: Mutex::new(HashMap::new()),
            // Unique across this pod's container restarts too, which keep its name: the
            // lifecycle events' message ids (`<relay>/<id>:<Type>`) must not repeat an earlier
            // run's. A thousand per millisecond of the earlier run's life would be needed to.
            next_id: AtomicU64::new(crate::clock::now_ms().saturating_mul(1000).max(1)),
        }
    }

    /// The relay's name: the pod name (`HOSTNAME`), else the NATS connection name.
    pub fn name_for(config: &Config) -> String {
        if let Some(n) = config.registry.as_ref().and_then(|r| r.relay_name.clone()) {
            return n;
        }
        std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| config.nats.name.clone())
    }

    /// With the connection registry (before the state is shared).
    #[must_use]
    pub fn with_registry(mut self, registry: Option<Arc<Registry>>) -> Self {
        self.presence = registry.as_ref().map(|r| {
            Arc::new(Presences::new(
                r.clone(),
                self.hub.client().clone(),
                self.metrics.clone(),
            ))
        });
        self.registry = registry;
        self
    }

    /// The config, bindings and authenticator in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.live
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces them (config reload); returns the previous ones. The process-wide queue
    /// budget takes the new `maxQueuedBytes` at once.
    pub fn swap_settings(&self, live: Settings) -> Arc<Settings> {
        self.queue_budget
            .set_limit(live.config.limits.max_queued_bytes);
        self.metrics
            .drain_grace
            .set(live.config.drain.grace_period_seconds as i64);
        let mut g = self
            .live
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        std::mem::replace(&mut *g, Arc::new(live))
    }

    /// What access checks reach: the NATS client, whether it is connected, the metrics.
    pub fn link(&self) -> crate::access::Link<'_> {
        crate::access::Link {
            nats: self.hub.client(),
            connected: self.nats_connected.load(Ordering::SeqCst),
            metrics: &self.metrics,
        }
    }

    /// Ready: NATS up and not draining.
    pub fn is_ready(&self) -> bool {
        self.nats_connected.load(Ordering::SeqCst)
            && !self.draining.load(Ordering::SeqCst)
            && !self.nats_failed.is_cancelled()
    }

    /// Whether the relay is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Whether a rebalancing round is shedding this relay's connections.
    pub fn is_shedding(&self) -> bool {
        self.shedding.load(Ordering::SeqCst)
    }

    /// Registers a new connection; `resumes`: the connection it resumes, checked by
    /// [`Relay::may_resume`] (then `Registry::settle_opened` settles it).
    pub fn register(
        &self,
        outbox: Arc<Outbox>,
        claims: Option<Map<String, Value>>,
        resumes: Option<&str>,
    ) -> Arc<Conn> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Some(r) = &self.registry {
            let claim = |k: &str| {
                claims
                    .as_ref()
                    .and_then(|c| c.get(k))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            r.opened(id, claim("sub"), claim("iss"), resumes);
        }
        let conn = Arc::new(Conn::new(id, outbox, claims));
        self.conns_lock().insert(id, conn.clone());
        self.metrics.connections.inc();
        conn
    }

    /// Forgets a closed connection and drops its subscriptions; `end`: how it ended.
    pub fn unregister(&self, conn: &Conn, end: End) {
        for (channel, subject) in conn.take_subscriptions() {
            self.hub.unsubscribe(&subject, conn.id, &channel);
        }
        if self.conns_lock().remove(&conn.id).is_some() {
            self.metrics.connections.dec();
            if let Some(r) = &self.registry {
                let (code, resumable) = match end {
                    End::Closed(c) => (c.sends_frame().then(|| c.code()), c.resumable()),
                    _ => (None, true),
                };
                r.closed(conn.id, end.label(), code, resumable);
            }
        }
    }

    /// Whether a connection with `claims` may resume `previous` (docs/backend.md,
    /// *Resumes*): asks the registry, when there is one.
    pub async fn may_resume(&self, claims: Option<&Map<String, Value>>, previous: &str) -> bool {
        let Some(r) = &self.registry else {
            return false;
        };
        let claim = |k: &str| claims.and_then(|c| c.get(k)).and_then(Value::as_str);
        r.may_resume(claim("sub"), claim("iss"), previous).await
    }

    /// A snapshot of the open connections.
    pub fn connections(&self) -> Vec<Arc<Conn>> {
        self.conns_lock().values().cloned().collect()
    }

    fn conns_lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnId, Arc<Conn>>> {
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
impl Relay {
    /// A relay whose NATS client has no server (it retries a closed loopback port), for unit
    /// tests of what needs no NATS round trip.
    pub(crate) async fn unconnected(config: Config) -> Arc<Self> {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("127.0.0.1:1")
            .await
            .expect("a client that retries");
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(client, metrics.clone(), 1 << 20));
        let settings = Settings::new(config).expect("keys");
        Arc::new(Self::new(
            settings,
            hub,
            metrics,
            Arc::new(AtomicBool::new(false)),
        ))
    }
}
