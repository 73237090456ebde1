//! The state shared by every part of a running relay.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::authz::Authorizer;
use crate::config::Config;
use crate::hub::{ConnId, Hub};
use crate::limits::{ConnCounter, InFlight};
use crate::metrics::Metrics;
use crate::outbox::{Outbox, QueueBudget};
use crate::slots::Slots;

/// What the rest of the relay knows about one open connection.
#[derive(Debug)]
pub struct ConnShared {
    /// Process-unique id.
    pub id: ConnId,
    /// Its send queue.
    pub outbox: Arc<Outbox>,
    /// Channel to NATS subject, for each subscription.
    pub subs: Mutex<HashMap<String, String>>,
    /// JWT claims; `None` when anonymous.
    pub claims: Option<Map<String, Value>>,
    /// Its WebSocket write half, for fan-outs that write at once (`sink::deliver`); set by
    /// `connection::run` (unset before: messages are queued).
    pub sink: std::sync::OnceLock<Arc<crate::sink::SharedSink>>,
}

impl ConnShared {
    /// Locks the subscription map.
    pub fn subs(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.subs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The parts of the config that can change on reload, swapped as one.
#[derive(Debug)]
pub struct Live {
    /// The config in force.
    pub config: Arc<Config>,
    /// Its compiled bindings.
    pub authz: Arc<Authorizer>,
    /// Its authentication settings and keys.
    pub authn: Arc<Authenticator>,
}

/// Shared state of a running relay.
#[derive(Debug)]
pub struct Relay {
    live: RwLock<Arc<Live>>,
    /// Subject fan-out.
    pub hub: Arc<Hub>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// True while the NATS connection is up.
    pub nats_connected: Arc<AtomicBool>,
    /// True from SIGTERM on.
    pub draining: AtomicBool,
    /// Cancelled when the NATS client stopped for good (`crate::nats::supervise`).
    pub nats_failed: CancellationToken,
    /// Open-connection slots (`limits.maxConnections`).
    pub slots: Arc<Slots>,
    /// Bytes queued on all connections (`limits.maxQueuedBytes`).
    pub queue_budget: Arc<QueueBudget>,
    /// Open connections per client address (`limits.maxConnectionsPerIp`).
    pub per_ip: Arc<ConnCounter<std::net::IpAddr>>,
    /// Open connections per token `sub` (`limits.maxConnectionsPerSubject`).
    pub per_subject: Arc<ConnCounter<String>>,
    /// HTTP handshakes in flight (`limits.maxHandshakesInFlight`).
    pub handshakes: InFlight,
    /// TCP connections in their handshake per client address
    /// (`limits.maxHandshakesInFlightPerIp`).
    pub handshakes_per_ip: Arc<ConnCounter<std::net::IpAddr>>,
    /// Tracks every connection task (and the HTTP handshakes), so none outlives shutdown.
    pub tracker: TaskTracker,
    /// Cancelled when the relay stops: ends accept loops and the admin server.
    pub shutdown: CancellationToken,
    /// This relay's name in the `Wsrelay-Connection` header of client publishes: the pod
    /// name (`HOSTNAME`), else the NATS connection name.
    pub name: String,
    conns: Mutex<HashMap<ConnId, Arc<ConnShared>>>,
    next_id: AtomicU64,
}

impl Relay {
    /// Assembles the state.
    pub fn new(
        live: Live,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        nats_connected: Arc<AtomicBool>,
    ) -> Self {
        let max = live.config.limits.max_connections as usize;
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
        let name = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| live.config.nats.name.clone());
        metrics
            .drain_grace
            .set(live.config.drain.grace_period_seconds as i64);
        Self {
            name,
            live: RwLock::new(Arc::new(live)),
            hub,
            metrics,
            nats_connected,
            draining: AtomicBool::new(false),
            nats_failed: CancellationToken::new(),
            slots: Arc::new(Slots::new(max)),
            queue_budget,
            per_ip: Arc::default(),
            per_subject: Arc::default(),
            handshakes: InFlight::default(),
            handshakes_per_ip: Arc::default(),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    /// The config, bindings and authenticator in force.
    pub fn live(&self) -> Arc<Live> {
        self.live
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces them (config reload); returns the previous ones. The process-wide queue
    /// budget takes the new `maxQueuedBytes` at once.
    pub fn swap_live(&self, live: Live) -> Arc<Live> {
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

    /// Registers a new connection.
    pub fn register(
        &self,
        outbox: Arc<Outbox>,
        claims: Option<Map<String, Value>>,
    ) -> Arc<ConnShared> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(ConnShared {
            id,
            outbox,
            subs: Mutex::new(HashMap::new()),
            claims,
            sink: std::sync::OnceLock::new(),
        });
        self.conns_lock().insert(id, conn.clone());
        self.metrics.connections.inc();
        conn
    }

    /// Forgets a closed connection and drops its subscriptions.
    pub fn unregister(&self, conn: &ConnShared) {
        let subs: Vec<(String, String)> = conn.subs().drain().collect();
        for (channel, subject) in subs {
            self.hub.unsubscribe(&subject, conn.id, &channel);
        }
        if self.conns_lock().remove(&conn.id).is_some() {
            self.metrics.connections.dec();
        }
    }

    /// A snapshot of the open connections.
    pub fn connections(&self) -> Vec<Arc<ConnShared>> {
        self.conns_lock().values().cloned().collect()
    }

    fn conns_lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnId, Arc<ConnShared>>> {
        self.conns
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
