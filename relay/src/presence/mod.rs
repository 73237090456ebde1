//! Presence (docs/protocol.md section 10): every subscriber of a binding with `presence` is
//! a member of the channel, written to the connection registry; each relay watches the
//! channels its local subscribers are on and tells those that asked (`presence: true`) the
//! members, then their joins and leaves.
//!
//! - [`members`]: one channel's members from the registry's entries, with the grace, the
//!   event threshold and the occupancy pacing (pure);
//! - [`entry`]: a membership's value in the registry and its `info` (pure);
//! - [`watcher`]: one channel's ordered consumer, its members and local subscribers, the
//!   fan-out of events;
//! - here: the relay's watchers (one per channel with local subscribers), and
//!   [`Membership`], which a subscription holds for as long as it lasts.

pub mod entry;
pub mod members;
pub mod watcher;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use tokio::sync::oneshot;

use crate::config::Presence as PresenceConfig;
use crate::conn::Conn;
use crate::metrics::Metrics;
use crate::registry::{Registry, RegistryError, keys};
use members::Policy;
use watcher::Watcher;

/// How long a `presence: true` subscribe (or a `presence` request) waits for the registry
/// to store the membership and the channel's watcher to have read it, before 503.
pub const SNAPSHOT_WITHIN: Duration = Duration::from_secs(5);

/// Members in the snapshot of a `presence: true` subscribe's `ok`.
pub const FIRST_PAGE: usize = 100;

/// A binding's presence settings as the members' policy.
pub fn policy(p: &PresenceConfig) -> Policy {
    Policy {
        events: p.events,
        max_members_with_events: p.max_members_with_events as usize,
        leave_grace: Duration::from_secs(p.leave_grace_seconds),
    }
}

/// The relay's presence: its watchers by channel.
#[derive(Debug)]
pub struct Presences {
    registry: Arc<Registry>,
    js: jetstream::Context,
    metrics: Arc<Metrics>,
    watchers: Mutex<HashMap<String, Arc<Watcher>>>,
    serials: AtomicU64,
}

/// A connection's membership of a channel, held by its subscription
/// (`crate::conn::Attached`): dropping it deletes the registry entry and leaves the
/// channel's watcher (stopped with its last local subscriber).
#[derive(Debug)]
pub struct Membership {
    presences: Arc<Presences>,
    handle: Handle,
    kv_key: String,
}

/// What a subscribe needs of its membership once the membership is held by the
/// subscription: the watcher and its place there.
#[derive(Debug, Clone)]
pub struct Handle {
    /// The channel's watcher.
    pub watcher: Arc<Watcher>,
    serial: u64,
}

impl Handle {
    /// Queues `ok` with the first page of members, and from then on the events.
    pub fn answer(&self, conn: &Conn, ok: String) {
        self.watcher.answer(self.serial, conn, ok, FIRST_PAGE);
    }
}

impl Presences {
    /// The presence of a relay with `registry`; watchers read it over `client`.
    pub fn new(registry: Arc<Registry>, client: async_nats::Client, metrics: Arc<Metrics>) -> Self {
        Self {
            registry,
            js: jetstream::new(client),
            metrics,
            watchers: Mutex::new(HashMap::new()),
            serials: AtomicU64::new(0),
        }
    }

    fn watchers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Watcher>>> {
        self.watchers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The watcher of `channel`, while it has local subscribers.
    pub fn watcher(&self, channel: &str) -> Option<Arc<Watcher>> {
        self.watchers().get(channel).cloned()
    }

    /// Makes `conn` a member of `channel` as `key` with `info` (a JSON object's text): a
    /// local subscriber of the channel's watcher (started by the first), and its entry
    /// written to the registry. With `acked`, also the stream sequence the entry was
    /// stored at, once it is.
    pub fn join(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        channel: &str,
        policy: Policy,
        key: &str,
        info: &str,
        acked: bool,
    ) -> (
        Membership,
        Handle,
        Option<oneshot::Receiver<Result<u64, RegistryError>>>,
    ) {
        let serial = self.serials.fetch_add(1, Ordering::Relaxed);
        let watcher = {
            let mut map = self.watchers();
            let w = map
                .entry(channel.to_owned())
                .or_insert_with(|| self.start(channel, policy))
                .clone();
            w.add_local(serial, conn.clone());
            w
        };
        let kv_key = keys::presence_key(channel, self.registry.relay(), conn.id);
        let value = Bytes::from(entry::value(channel, key, info, crate::history::now_ms()));
        let ack = if acked {
            Some(self.registry.put_acked(kv_key.clone(), value))
        } else {
            self.registry.put(kv_key.clone(), value);
            None
        };
        let handle = Handle { watcher, serial };
        let membership = Membership {
            presences: self.clone(),
            handle: handle.clone(),
            kv_key,
        };
        (membership, handle, ack)
    }

    fn start(&self, channel: &str, policy: Policy) -> Arc<Watcher> {
        let w = Arc::new(Watcher::new(channel, policy));
        self.metrics.presence_watchers.inc();
        let (js, bucket, metrics) = (
            self.js.clone(),
            self.registry.bucket().to_owned(),
            self.metrics.clone(),
        );
        let run = w.clone();
        tokio::spawn(async move {
            let m = metrics.clone();
            // A panic ends this watcher, not the process; its subscribers keep their
            // subscriptions (and hear no more presence).
            let _ = crate::task::catch("presence", &m, run.run(js, bucket, metrics)).await;
        });
        w
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let p = &self.presences;
        p.registry.delete(std::mem::take(&mut self.kv_key));
        let mut map = p.watchers();
        let w = &self.handle.watcher;
        if w.remove_local(self.handle.serial)
            && map.get(w.channel()).is_some_and(|m| Arc::ptr_eq(m, w))
        {
            map.remove(w.channel());
            w.stop();
            p.metrics.presence_watchers.dec();
        }
    }
}
