//! The connection registry (docs/design/presence.md): a JetStream KV bucket shared by the
//! relays of a gateway, where each relay keeps one lease for itself (`relay.<relay>`,
//! refreshed every third of `leaseSeconds`, with a per-message TTL) and one entry per open
//! connection (`conn.<relay>.<conn>`). A relay that exits deletes its keys; a relay that
//! died is purged by `POST /registry/forget` or, when its lease expires, by the live relay
//! whose name sorts first. Deletes, never a stream purge: watchers see every removal.
//!
//! - [`keys`]: the key layout and the values (pure);
//! - here: the bucket's stream configuration (pure), and [`Registry`], the I/O: an ordered
//!   writer, the lease, the lease watch, purges.
//!
//! Nothing here decides readiness: a registry outage is logged and counted, and the relay
//! keeps serving.

pub mod keys;
mod occupancy;
mod resume;
pub mod server_subs;
mod subjects;

pub use occupancy::Occupying;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::kv::Operation;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Registry as RegistryConfig;
use crate::events::{
    Emitter, Event, EventType, Outgoing, RELAY_LOST, connection_id, is_relay_name,
};
use crate::metrics::{Kind, Metrics, Reason};
use keys::{ConnEntry, Ended, Lease, VALUE_VERSION};

/// Bound on one KV request (a write's acknowledgement, a consumer's creation).
pub const REQUEST_WITHIN: Duration = Duration::from_secs(5);

/// Bound on a purge: listing a relay's keys and deleting them.
pub const PURGE_WITHIN: Duration = Duration::from_secs(30);

/// Bound on the registry's part of a shutdown: the writer's queue flushed, then the purge.
pub const SHUTDOWN_WITHIN: Duration = Duration::from_secs(10);

/// Writes waiting for the writer; beyond it a write is dropped and counted as a failure
/// (the entry comes back at the next reassertion).
pub const QUEUE_LEN: usize = 65_536;

/// Writes sent and not yet acknowledged by JetStream.
const IN_FLIGHT: usize = 256;

/// Pause before the lease watch starts again after an error.
const WATCH_RETRY: Duration = Duration::from_secs(2);

/// How long an expired lease's delete marker stays in the bucket: long enough for a
/// watcher that reconnects to still see it.
pub const MARKER_TTL: Duration = Duration::from_secs(60);

/// The name of the bucket's stream.
pub fn stream_name(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The bucket's stream configuration, as a KV client would create it (history 1, rollups,
/// direct gets) plus per-message TTLs and delete markers for expired leases. Created and
/// updated with the history streams, by `runtime::upkeep`. Pure.
pub fn bucket_config(r: &RegistryConfig) -> stream::Config {
    stream::Config {
        name: stream_name(&r.bucket),
        description: Some("wsrelay connection registry; managed by the relays".into()),
        subjects: vec![format!("$KV.{}.>", r.bucket)],
        max_messages_per_subject: 1,
        max_bytes: i64::try_from(r.max_bytes).unwrap_or(i64::MAX),
        max_message_size: 64 * 1024,
        storage: stream::StorageType::File,
        num_replicas: usize::from(r.replicas),
        discard: stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        allow_message_ttl: true,
        subject_delete_marker_ttl: Some(MARKER_TTL),
        ..Default::default()
    }
}

/// Why a registry request failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// JetStream refused or failed.
    #[error("registry {op}: {message}")]
    Request {
        /// What was asked.
        op: &'static str,
        /// Why.
        message: String,
    },
    /// JetStream did not answer within the bound.
    #[error("registry {op}: JetStream did not answer")]
    Timeout {
        /// What was asked.
        op: &'static str,
    },
}

fn request_err(op: &'static str) -> impl Fn(String) -> RegistryError {
    move |message| RegistryError::Request { op, message }
}

/// Why a relay's entries were purged (the `reason` of `wsrelay_registry_purges_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeCause {
    /// The relay's own, at its exit.
    Shutdown,
    /// `POST /registry/forget`.
    Forget,
    /// Its lease expired.
    LeaseExpired,
}

impl PurgeCause {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Shutdown => "shutdown",
            Self::Forget => "forget",
            Self::LeaseExpired => "lease_expired",
        }
    }
}

/// One write, in the order the relay made them; a put may ask for its stream sequence.
#[derive(Debug)]
enum Write {
    Put(
        String,
        Bytes,
        Option<oneshot::Sender<Result<u64, RegistryError>>>,
    ),
    /// A key and, when this relay wrote it, the value it held (carried by the marker).
    Delete(String, Option<Bytes>),
    /// A lifecycle event (`crate::events`), in order with the entries it concerns.
    Event(Outgoing),
}

/// What an acknowledgement the writer awaits is for, to count it.
#[derive(Debug, Clone, Copy)]
enum Acked {
    Put,
    Delete,
    Event(EventType),
}

/// The header of a delete marker that carries the deleted entry's value (base64): a watcher
/// that starts after the delete still learns whose connection went, and when.
pub const WAS_HEADER: &str = "Wsrelay-Was";

/// Whether a message of the bucket marks its key gone: a KV delete or purge, or a marker the
/// server left when a TTL expired.
pub fn is_removal(headers: Option<&HeaderMap>) -> bool {
    headers
        .is_some_and(|h| h.get("KV-Operation").is_some() || h.get("Nats-Marker-Reason").is_some())
}

/// How long a delete marker stays in the bucket (its `Nats-TTL`): past the longest leave
/// grace (300 s), so a watcher starting within a member's grace sees the departure; then it
/// expires, so markers do not pile up in the bucket.
pub const DELETE_MARKER_TTL: Duration = Duration::from_secs(360);

/// Milliseconds since the epoch, now.
fn now_ms() -> u64 {
    crate::clock::now_ms()
}

/// A connection's lifecycle event of `kind` at `at`, from its registry entry; a
/// `Disconnected` of an entry that says how it ended says that (and when). Pure.
pub fn lifecycle(entry: &ConnEntry, id: u64, relay: &str, kind: EventType, at: u64) -> Event {
    let ending = matches!(kind, EventType::Disconnected);
    let ended = entry.ended.as_ref().filter(|_| ending);
    let at = ended.map_or(at, |e| e.at);
    Event {
        kind,
        sub: entry.sub.clone(),
        iss: entry.iss.clone(),
        connection: connection_id(relay, id),
        previous: None,
        relay: relay.to_owned(),
        channel: None,
        by_server: false,
        reason: ended.map(|e| e.reason.clone()),
        close_code: ended.and_then(|e| e.close_code),
        at,
        duration_ms: ending.then(|| at.saturating_sub(entry.connected_at)),
        revision: None,
    }
}

/// The relay name of an entry found under the key token `token`: the one the entry names
/// if it is a relay name (it goes into events' message-id headers), else the token. Pure.
fn name_of(entry: &ConnEntry, token: &str) -> String {
    entry
        .relay
        .clone()
        .filter(|n| is_relay_name(n))
        .unwrap_or_else(|| token.to_owned())
}

/// The relay that purges a dead one: the live relay whose name sorts first. Pure.
pub fn purger<'a>(live: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    live.into_iter().min()
}

/// The registry of one relay.
#[derive(Debug)]
pub struct Registry {
    bucket: String,
    stream: stream::Config,
    /// This relay's name, as in its connections' ids (`<name>/<id>`).
    name: String,
    /// [`keys::relay_token`] of the name: the relay in the keys.
    relay: String,
    /// The lifecycle events published, when the config has `events`.
    events: Option<Emitter>,
    /// The relays whose lease is live, as the lease watch last saw them.
    live: Mutex<BTreeSet<String>>,
    lease: Duration,
    started: u64,
    js: jetstream::Context,
    metrics: Arc<Metrics>,
    writes: Mutex<Option<mpsc::Sender<Write>>>,
    /// This relay's entries (open connections, presence memberships) by key, to write them
    /// again when they may be gone (the bucket recreated, the lease expired while NATS was
    /// away).
    entries: Mutex<HashMap<String, Bytes>>,
    /// Whether the leftovers of this relay's previous run (a container restart keeps the
    /// pod name) were deleted: done once, the first time the bucket is in place.
    swept: std::sync::atomic::AtomicBool,
    /// Wakes the lease loop to write the lease now (the bucket just came into place).
    lease_now: tokio::sync::Notify,
    /// The connections that ended and wait `events.graceSeconds` for a resume before
    /// their `Disconnected` is said: shutdown waits for them.
    pending: tokio_util::task::TaskTracker,
    /// This relay's open connections per token subject, when it counts them
    /// (`limits.maxFleetConnectionsPerSubject`).
    subjects: Option<Mutex<HashMap<String, u32>>>,
    /// This relay's subscriptions per channel, when `Occupied` or `Vacated` are published.
    occupancy: Option<occupancy::Counts>,
    occupancy_task: Mutex<Option<JoinHandle<()>>>,
    stop: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Registry {
    /// Starts the registry of the relay `name` (made a key token): its writer, its lease and
    /// its lease watch. The bucket itself is put in place by `runtime::upkeep`, which calls
    /// [`Registry::bucket_ready`].
    pub fn start(
        config: &RegistryConfig,
        name: &str,
        count_subjects: bool,
        events: Option<Emitter>,
        client: async_nats::Client,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(QUEUE_LEN);
        let occupied = events
            .as_ref()
            .is_some_and(|e| e.wants(EventType::Occupied) || e.wants(EventType::Vacated));
        let (occupancy, changes) = if occupied {
            let (c, rx) = occupancy::Counts::new();
            (Some(c), Some(rx))
        } else {
            (None, None)
        };
        let registry = Arc::new(Self {
            bucket: config.bucket.clone(),
            stream: bucket_config(config),
            name: name.to_owned(),
            relay: keys::relay_token(name),
            events,
            live: Mutex::new(BTreeSet::new()),
            lease: Duration::from_secs(config.lease_seconds),
            started: now_ms(),
            js: jetstream::new(client),
            metrics,
            writes: Mutex::new(Some(tx)),
            entries: Mutex::new(HashMap::new()),
            swept: std::sync::atomic::AtomicBool::new(false),
            lease_now: tokio::sync::Notify::new(),
            pending: tokio_util::task::TaskTracker::new(),
            subjects: count_subjects.then(|| Mutex::new(HashMap::new())),
            occupancy,
            occupancy_task: Mutex::new(None),
            stop: CancellationToken::new(),
            tasks: Mutex::new(Vec::new()),
        });
        let tasks = vec![
            tokio::spawn(registry.clone().write_loop(rx)),
            tokio::spawn(registry.clone().lease_loop()),
            tokio::spawn(registry.clone().watch_loop()),
        ];
        *registry.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        if let Some(rx) = changes {
            *registry
                .occupancy_task
                .lock()
                .unwrap_or_else(|p| p.into_inner()) =
                Some(tokio::spawn(registry.clone().occupancy_loop(rx)));
        }
        registry
    }

    /// This relay's name in the keys.
    pub fn relay(&self) -> &str {
        &self.relay
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The bucket's stream configuration (for `runtime::upkeep`).
    pub fn stream_config(&self) -> &stream::Config {
        &self.stream
    }

    fn subject(&self, key: &str) -> String {
        format!("$KV.{}.{key}", self.bucket)
    }

    fn queue(&self, w: Write) {
        let g = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let refused = match g.as_ref() {
            Some(tx) => tx.try_send(w).err().map(|e| e.into_inner()),
            None => Some(w),
        };
        if let Some(w) = refused {
            match &w {
                Write::Event(o) => self.event_failed(o.kind),
                _ => {
                    self.metrics.registry_write_failures.inc();
                }
            }
            if let Write::Put(_, _, Some(ack)) = w {
                let _ = ack.send(Err(RegistryError::Request {
                    op: "write",
                    message: "the registry's write queue is full or closed".into(),
                }));
            }
        }
    }

    /// This relay's name, as in its connections' ids.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The lifecycle events published, if any.
    pub fn events(&self) -> Option<&Emitter> {
        self.events.as_ref()
    }

    /// How many relays hold a live lease, this one included (at least 1).
    pub fn live_relays(&self) -> usize {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.len() + usize::from(!live.contains(&self.relay))
    }

    /// A connection opened: writes `conn.<relay>.<id>`, then says `Connected`; or, when
    /// it resumes `resumes` (checked by [`Registry::may_resume`]), writes the entry naming
    /// it and says nothing yet: [`Registry::settle_opened`] decides.
    pub fn opened(&self, id: u64, sub: Option<String>, iss: Option<String>, resumes: Option<&str>) {
        let value = ConnEntry {
            v: VALUE_VERSION,
            sub,
            iss,
            connected_at: now_ms(),
            relay: Some(self.name.clone()),
            ended: None,
            resumes: resumes.map(str::to_owned),
        };
        self.write_entry(id, &value);
        if let Some(sub) = &value.sub {
            self.count_subject(sub, true);
        }
        if resumes.is_none() {
            self.say(&lifecycle(
                &value,
                id,
                &self.name,
                EventType::Connected,
                value.connected_at,
            ));
        }
    }

    /// Writes this relay's entry of connection `id`.
    fn write_entry(&self, id: u64, entry: &ConnEntry) {
        if let Ok(json) = serde_json::to_vec(entry) {
            self.put(keys::conn_key(&self.relay, id), Bytes::from(json));
        }
    }

    /// This relay's entry of connection `id`, while it has one.
    fn entry(&self, id: u64) -> Option<ConnEntry> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&keys::conn_key(&self.relay, id))
            .and_then(|v| serde_json::from_slice::<ConnEntry>(v).ok())
    }

    /// A connection closed: says `Disconnected` (why, and the close code the relay sent),
    /// then deletes `conn.<relay>.<id>`. With `events.graceSeconds` and a close the client
    /// may come back from (`resumable`), the entry is kept that long with how it ended, for
    /// a resume (`resume`).
    pub fn closed(
        self: &Arc<Self>,
        id: u64,
        reason: &'static str,
        close_code: Option<u16>,
        resumable: bool,
    ) {
        let Some(mut entry) = self.entry(id) else {
            self.delete(keys::conn_key(&self.relay, id));
            return;
        };
        if let Some(sub) = &entry.sub {
            self.count_subject(sub, false);
        }
        entry.ended = Some(Ended {
            at: now_ms(),
            reason: reason.to_owned(),
            close_code,
        });
        let grace = if resumable {
            self.grace()
        } else {
            Duration::ZERO
        };
        if grace.is_zero() && entry.resumes.is_none() {
            self.say_ended(id, &entry);
            return;
        }
        self.write_entry(id, &entry);
        let me = self.clone();
        self.pending.spawn(async move {
            tokio::time::sleep(grace).await;
            me.end(id).await;
        });
    }

    /// Says the `Disconnected` of this relay's connection `id` from its `entry`, then
    /// deletes the entry.
    fn say_ended(&self, id: u64, entry: &ConnEntry) {
        self.say(&lifecycle(
            entry,
            id,
            &self.name,
            EventType::Disconnected,
            now_ms(),
        ));
        self.delete(keys::conn_key(&self.relay, id));
    }

    /// This relay's open connection `id`'s event of `kind`, now, from its entry; `None`
    /// without events or without the entry.
    pub fn conn_event(&self, id: u64, kind: EventType) -> Option<Event> {
        self.events.as_ref()?;
        let entry = self.entry(id)?;
        Some(lifecycle(&entry, id, &self.name, kind, now_ms()))
    }

    /// Publishes a lifecycle event, in order with this relay's registry writes (a no-op
    /// without `events`, or for a type not published). `serial`: a subscription's serial.
    pub fn event(&self, event: &Event, serial: Option<u64>) {
        if let Some(o) = self.events.as_ref().and_then(|e| e.outgoing(event, serial)) {
            self.queue(Write::Event(o));
        }
    }

    fn say(&self, event: &Event) {
        self.event(event, None);
    }

    /// Writes one of this relay's entries (a key under `conn.<relay>.` or
    /// `pres.<chan>.<relay>.`), in order with its other writes; it is written again
    /// whenever the registry may have lost it, until [`Registry::delete`].
    pub fn put(&self, key: String, value: Bytes) {
        self.remember(&key, &value);
        self.queue(Write::Put(key, value, None));
    }

    /// [`Registry::put`], and the stream sequence of the write once JetStream stored it
    /// (an error if it did not, within [`REQUEST_WITHIN`]): a watcher that has seen this
    /// sequence has seen the entry.
    pub fn put_acked(
        &self,
        key: String,
        value: Bytes,
    ) -> oneshot::Receiver<Result<u64, RegistryError>> {
        let (tx, rx) = oneshot::channel();
        self.remember(&key, &value);
        self.queue(Write::Put(key, value, Some(tx)));
        rx
    }

    /// Deletes one of this relay's entries, in order with its other writes.
    pub fn delete(&self, key: String) {
        let was = self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
        self.queue(Write::Delete(key, was));
    }

    fn remember(&self, key: &str, value: &Bytes) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_owned(), value.clone());
    }

    /// The bucket is (again) in place: the lease and every open connection's entry are
    /// written again, in case the bucket is new or lost them. The first time, the entries
    /// a previous run of this relay left (same pod name, a container restart) are deleted
    /// first, so watchers see those connections leave.
    pub async fn bucket_ready(&self, ready: bool) {
        let was = self.metrics.registry_ready.set(i64::from(ready)) == 1;
        if ready && !self.swept.swap(true, std::sync::atomic::Ordering::SeqCst) {
            match self.sweep_leftovers().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    keys = n,
                    "registry: deleted what a previous run of this relay left"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "registry: leftovers of a previous run not deleted")
                }
            }
        }
        if ready && !was {
            self.lease_now.notify_one();
            self.reassert();
        }
    }

    /// Whether the bucket has been in place at least once since the start (`/ready` waits
    /// for it).
    pub fn was_in_place(&self) -> bool {
        self.swept.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Deletes this relay's keys in the bucket that this run did not write.
    async fn sweep_leftovers(&self) -> Result<usize, RegistryError> {
        let found = self.entries_of(&self.relay).await?;
        let mine: Vec<(String, Bytes)> = {
            let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            found
                .into_iter()
                .filter(|(k, _)| !e.contains_key(k))
                .collect()
        };
        let n = mine.len();
        self.settle_leftovers(&mine).await;
        // Before any subscription of this run: the channels the previous run held.
        if let Err(e) = self.vacate(&self.relay).await {
            tracing::warn!(error = %e, "registry: a previous run's channels not vacated");
        }
        for (key, value) in mine {
            if let Some(o) = self.lost(&key, &value) {
                self.queue(Write::Event(o));
            }
            self.queue(Write::Delete(key, None));
        }
        if n > 0 {
            self.metrics
                .registry_purges
                .get_or_create(&Reason { reason: "restart" })
                .inc();
        }
        Ok(n)
    }

    /// Writes every entry of this relay again.
    fn reassert(&self) {
        let entries: Vec<(String, Bytes)> = self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        tracing::info!(
            entries = entries.len(),
            "registry: writing this relay's entries"
        );
        for (k, v) in entries {
            self.queue(Write::Put(k, v, None));
        }
    }

    fn event_failed(&self, kind: EventType) {
        self.metrics
            .events_failed
            .get_or_create(&Kind { event: kind.name() })
            .inc();
    }

    fn event_published(&self, kind: EventType) {
        self.metrics
            .events_published
            .get_or_create(&Kind { event: kind.name() })
            .inc();
    }

    /// Sends one write; its acknowledgement, if it has one, is awaited by the caller (an
    /// event that goes to no stream has none).
    async fn send(
        &self,
        w: Write,
    ) -> Result<Option<jetstream::context::PublishAckFuture>, RegistryError> {
        let sent = match w {
            Write::Event(o) if !self.events.as_ref().is_some_and(Emitter::durable) => {
                return self
                    .js
                    .client()
                    .publish_with_headers(o.subject.clone(), o.headers(), o.payload)
                    .await
                    .map(|()| None)
                    .map_err(|e| request_err("event")(e.to_string()));
            }
            Write::Event(o) => {
                self.js
                    .publish_with_headers(o.subject.clone(), o.headers(), o.payload)
                    .await
            }
            Write::Put(key, value, _) => self.js.publish(self.subject(&key), value).await,
            Write::Delete(key, was) => {
                let mut h = HeaderMap::new();
                h.insert("KV-Operation", "DEL");
                h.insert("Nats-TTL", DELETE_MARKER_TTL.as_secs().to_string().as_str());
                if let Some(was) = was {
                    use base64::Engine;
                    let was = base64::engine::general_purpose::STANDARD.encode(was);
                    h.insert(WAS_HEADER, was.as_str());
                }
                self.js
                    .publish_with_headers(self.subject(&key), h, Bytes::new())
                    .await
            }
        };
        sent.map(Some).map_err(|e| RegistryError::Request {
            op: "write",
            message: e.to_string(),
        })
    }

    /// Sends the writes in order, up to [`IN_FLIGHT`] unacknowledged; ends when the queue
    /// is closed (shutdown) and every acknowledgement came or timed out.
    async fn write_loop(self: Arc<Self>, mut rx: mpsc::Receiver<Write>) {
        let mut acks = FuturesUnordered::new();
        let mut open = true;
        while open || !acks.is_empty() {
            tokio::select! {
                w = rx.recv(), if open && acks.len() < IN_FLIGHT => match w {
                    Some(mut w) => {
                        let (what, reply) = match &mut w {
                            Write::Put(_, _, reply) => (Acked::Put, reply.take()),
                            Write::Delete(..) => (Acked::Delete, None),
                            Write::Event(o) => (Acked::Event(o.kind), None),
                        };
                        match self.send(w).await {
                            Ok(Some(ack)) => acks.push(async move {
                                (what, reply, tokio::time::timeout(REQUEST_WITHIN, ack.into_future()).await)
                            }),
                            Ok(None) => {
                                if let Acked::Event(kind) = what {
                                    self.event_published(kind);
                                }
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "registry write not sent");
                                match what {
                                    Acked::Event(kind) => self.event_failed(kind),
                                    _ => {
                    self.metrics.registry_write_failures.inc();
                }
                                }
                                if let Some(reply) = reply {
                                    let _ = reply.send(Err(e));
                                }
                            }
                        }
                    }
                    None => open = false,
                },
                Some((what, reply, r)) = acks.next(), if !acks.is_empty() => {
                    let failed = |e: &dyn std::fmt::Display| {
                        tracing::debug!(error = %e, "registry write refused or not acknowledged");
                        match what {
                            Acked::Event(kind) => self.event_failed(kind),
                            _ => {
                    self.metrics.registry_write_failures.inc();
                }
                        }
                    };
                    let done = match r {
                        Ok(Ok(ack)) => {
                            match what {
                                Acked::Put => {
                                    self.metrics.registry_keys_written.inc();
                                }
                                Acked::Delete => {
                                    self.metrics.registry_keys_deleted.inc();
                                }
                                Acked::Event(kind) => self.event_published(kind),
                            }
                            Ok(ack.sequence)
                        }
                        Ok(Err(e)) => {
                            failed(&e);
                            Err(request_err("write")(e.to_string()))
                        }
                        Err(_) => {
                            failed(&"no acknowledgement");
                            Err(RegistryError::Timeout { op: "write" })
                        }
                    };
                    if let Some(reply) = reply {
                        let _ = reply.send(done);
                    }
                }
            }
        }
    }

    /// Writes the lease (with its TTL) and waits for the acknowledgement.
    async fn write_lease(&self) -> Result<(), RegistryError> {
        let lease = Lease {
            v: VALUE_VERSION,
            started: self.started,
            lease_seconds: self.lease.as_secs(),
        };
        let value = serde_json::to_vec(&lease).unwrap_or_default();
        self.publish_ttl(
            "lease",
            &keys::lease_key(&self.relay),
            value.into(),
            self.lease,
        )
        .await
    }

    /// Refreshes the lease every third of its lifetime until the registry stops.
    async fn lease_loop(self: Arc<Self>) {
        let every = self.lease / 3;
        let mut failing = false;
        loop {
            match self.write_lease().await {
                Ok(()) => {
                    self.metrics.registry_keys_written.inc();
                    if failing {
                        tracing::info!("registry lease written again");
                        // The lease may have expired meanwhile and the entries been purged.
                        self.reassert();
                    }
                    failing = false;
                }
                Err(e) => {
                    self.metrics.registry_lease_failures.inc();
                    if !failing {
                        tracing::warn!(error = %e, "registry lease not written; the relay keeps serving");
                    }
                    failing = true;
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
                () = self.lease_now.notified() => {}
            }
        }
    }

    /// Watches every lease: an expired one (a TTL delete marker) makes the live relay whose
    /// name sorts first purge the dead relay's entries. This relay's own lease purged or
    /// deleted by someone else makes it write its entries again.
    async fn watch_loop(self: Arc<Self>) {
        loop {
            if let Err(e) = self.watch_once().await {
                tracing::debug!(error = %e, "registry lease watch ended; starting again");
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(WATCH_RETRY) => {}
            }
        }
    }

    async fn watch_once(&self) -> Result<(), RegistryError> {
        let kv = tokio::time::timeout(REQUEST_WITHIN, self.js.get_key_value(&self.bucket))
            .await
            .map_err(|_| RegistryError::Timeout { op: "watch" })?
            .map_err(|e| request_err("watch")(e.to_string()))?;
        let mut watch = tokio::time::timeout(REQUEST_WITHIN, kv.watch_with_history("relay.*"))
            .await
            .map_err(|_| RegistryError::Timeout { op: "watch" })?
            .map_err(|e| request_err("watch")(e.to_string()))?;
        let mut live: BTreeSet<String> = BTreeSet::new();
        // Leases found expired while catching up: judged once every live lease is known.
        let mut expired: Vec<String> = Vec::new();
        loop {
            let entry = tokio::select! {
                () = self.stop.cancelled() => return Ok(()),
                e = watch.next() => e,
            };
            let Some(entry) = entry else {
                return Err(request_err("watch")("the watch ended".into()));
            };
            let entry = entry.map_err(|e| request_err("watch")(e.to_string()))?;
            let Some(owner) = keys::lease_owner(&entry.key) else {
                continue;
            };
            let owner = owner.to_owned();
            match entry.operation {
                Operation::Put => {
                    live.insert(owner);
                }
                Operation::Delete | Operation::Purge if owner == self.relay => {
                    if !self.stop.is_cancelled() {
                        tracing::warn!(
                            "registry: this relay's lease was removed by another; writing its entries again"
                        );
                        let _ = self.write_lease().await;
                        self.reassert();
                    }
                }
                // A relay that exits deletes its own entries, then its lease.
                Operation::Delete => {
                    live.remove(&owner);
                }
                // A TTL delete marker: the lease expired.
                Operation::Purge => {
                    live.remove(&owner);
                    expired.push(owner);
                }
            }
            if !entry.seen_current {
                continue;
            }
            self.live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone_from(&live);
            self.metrics
                .registry_live_relays
                .set(i64::try_from(live.len()).unwrap_or(i64::MAX));
            let first = purger(
                live.iter()
                    .map(String::as_str)
                    .chain(std::iter::once(self.relay.as_str())),
            ) == Some(self.relay.as_str());
            for dead in std::mem::take(&mut expired) {
                if first {
                    self.purge_expired(&dead).await;
                }
            }
        }
    }

    async fn purge_expired(&self, relay: &str) {
        tracing::warn!(relay = %relay, "registry: lease expired; purging its entries");
        match self.purge(relay, PurgeCause::LeaseExpired).await {
            Ok(n) => tracing::info!(relay = %relay, keys = n, "registry: purged"),
            Err(e) => tracing::warn!(relay = %relay, error = %e, "registry: purge failed"),
        }
    }

    /// The `Disconnected {reason: relay_lost}` for the entry `key` of a relay that is gone,
    /// if it is a connection's and events are published. Its message id is the one the
    /// relay would have used: a stream stores it once, whoever said it.
    fn lost(&self, key: &str, value: &[u8]) -> Option<Outgoing> {
        let events = self.events.as_ref()?;
        let (token, id) = keys::conn_of(key)?;
        let entry: ConnEntry = serde_json::from_slice(value).ok()?;
        // The name goes into the event's message-id header: one read from the bucket is
        // taken only if it is a relay name.
        let name = name_of(&entry, token);
        let mut e = lifecycle(&entry, id, &name, EventType::Disconnected, now_ms());
        if entry.ended.is_none() {
            e.reason = Some(RELAY_LOST.into());
        }
        events.outgoing(&e, None)
    }

    /// The entries of `relay` (its lease aside) that hold a value: an ordered consumer on
    /// the relay's filters, read to its end.
    async fn entries_of(&self, relay: &str) -> Result<Vec<(String, Bytes)>, RegistryError> {
        self.values(&keys::relay_filters(relay)).await
    }

    /// Every key under `filters` that holds a value, with it: an ordered consumer on the
    /// last message per key, read to its end.
    async fn values(&self, filters: &[String]) -> Result<Vec<(String, Bytes)>, RegistryError> {
        let err = request_err("list");
        let prefix = format!("$KV.{}.", self.bucket);
        let stream = self
            .js
            .get_stream_no_info(stream_name(&self.bucket))
            .await
            .map_err(|e| err(e.to_string()))?;
        let consumer = stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: self.js.client().new_inbox(),
                filter_subjects: filters.iter().map(|f| format!("{prefix}{f}")).collect(),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                replay_policy: consumer::ReplayPolicy::Instant,
                ..Default::default()
            })
            .await
            .map_err(|e| err(e.to_string()))?;
        let mut out = Vec::new();
        if consumer.cached_info().num_pending == 0 {
            return Ok(out);
        }
        let mut messages = consumer.messages().await.map_err(|e| err(e.to_string()))?;
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| err(e.to_string()))?;
            if !is_removal(m.headers.as_ref())
                && let Some(key) = m.subject.strip_prefix(prefix.as_str())
            {
                out.push((key.to_owned(), m.payload.clone()));
            }
            let pending = m.info().map_err(|e| err(e.to_string()))?.pending;
            if pending == 0 {
                break;
            }
        }
        Ok(out)
    }

    /// Writes `key` now, outside this relay's entries (it outlives the relay), with a TTL
    /// after which the server removes it; waits for the acknowledgement.
    pub async fn put_ttl(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<(), RegistryError> {
        self.publish_ttl("put", key, value, ttl).await
    }

    /// Writes `key` now, outside this relay's entries and without a TTL (it stays until
    /// [`Registry::remove_kept`]); waits for the acknowledgement.
    pub async fn put_kept(&self, key: &str, value: Bytes) -> Result<(), RegistryError> {
        self.publish_ttl("put", key, value, Duration::ZERO).await
    }

    /// Deletes `key`, one not among this relay's entries (a delete marker that expires);
    /// waits for the acknowledgement.
    pub async fn remove_kept(&self, key: &str) -> Result<(), RegistryError> {
        let fut = async {
            self.send(Write::Delete(key.to_owned(), None))
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "no acknowledgement".to_owned())?
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(REQUEST_WITHIN, fut).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(m)) => Err(request_err("delete")(m)),
            Err(_) => Err(RegistryError::Timeout { op: "delete" }),
        }
    }

    /// Publishes `key` with a `Nats-TTL` (none for [`Duration::ZERO`]) and waits for the acknowledgement, within
    /// [`REQUEST_WITHIN`]; `op` names it in errors.
    async fn publish_ttl(
        &self,
        op: &'static str,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<(), RegistryError> {
        let mut h = HeaderMap::new();
        if !ttl.is_zero() {
            h.insert("Nats-TTL", ttl.as_secs().max(1).to_string().as_str());
        }
        let fut = async {
            self.js
                .publish_with_headers(self.subject(key), h, value)
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(REQUEST_WITHIN, fut).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(m)) => Err(request_err(op)(m)),
            Err(_) => Err(RegistryError::Timeout { op }),
        }
    }

    /// Watches the keys under `filter` (e.g. `rev.>`): each one's last value first (how many
    /// are pending then is returned), then every change; a removal has no value.
    pub async fn watch(
        &self,
        filter: &str,
    ) -> Result<
        (
            u64,
            impl futures::Stream<Item = Result<(String, Option<Bytes>), RegistryError>> + use<>,
        ),
        RegistryError,
    > {
        let err = request_err("watch");
        let prefix = format!("$KV.{}.", self.bucket);
        let stream = tokio::time::timeout(
            REQUEST_WITHIN,
            self.js.get_stream(stream_name(&self.bucket)),
        )
        .await
        .map_err(|_| RegistryError::Timeout { op: "watch" })?
        .map_err(|e| err(e.to_string()))?;
        let consumer = stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: self.js.client().new_inbox(),
                filter_subject: format!("{prefix}{filter}"),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                replay_policy: consumer::ReplayPolicy::Instant,
                ..Default::default()
            })
            .await
            .map_err(|e| err(e.to_string()))?;
        let pending = consumer.cached_info().num_pending;
        let messages = consumer.messages().await.map_err(|e| err(e.to_string()))?;
        let changes = messages.map(move |m| {
            let m = m.map_err(|e| request_err("watch")(e.to_string()))?;
            let key = m
                .subject
                .strip_prefix(prefix.as_str())
                .unwrap_or_default()
                .to_owned();
            let value = (!is_removal(m.headers.as_ref())).then(|| m.payload.clone());
            Ok((key, value))
        });
        Ok((pending, changes))
    }

    /// Sends `writes` (events, deletes) outside the ordered queue, up to [`IN_FLIGHT`]
    /// unacknowledged, and waits for every acknowledgement; counts them. The first refusal
    /// ends it.
    async fn send_all(&self, writes: impl Iterator<Item = Write>) -> Result<(), RegistryError> {
        let mut acks = FuturesUnordered::new();
        let settle = |what: Acked,
                      r: Result<
            jetstream::publish::PublishAck,
            jetstream::context::PublishError,
        >| {
            match (what, r) {
                (Acked::Event(kind), Ok(_)) => self.event_published(kind),
                (Acked::Event(kind), Err(_)) => self.event_failed(kind),
                (_, Ok(_)) => {
                    self.metrics.registry_keys_deleted.inc();
                }
                (_, Err(e)) => return Err(request_err("purge")(e.to_string())),
            }
            Ok(())
        };
        for w in writes {
            let what = match &w {
                Write::Event(o) => Acked::Event(o.kind),
                Write::Put(..) => Acked::Put,
                Write::Delete(..) => Acked::Delete,
            };
            match self.send(w).await {
                Ok(Some(ack)) => acks.push(async move { (what, ack.into_future().await) }),
                Ok(None) => {
                    if let Acked::Event(kind) = what {
                        self.event_published(kind);
                    }
                }
                Err(e) if matches!(what, Acked::Event(_)) => {
                    tracing::debug!(error = %e, "event not sent");
                    if let Acked::Event(kind) = what {
                        self.event_failed(kind);
                    }
                }
                Err(e) => return Err(e),
            }
            if acks.len() >= IN_FLIGHT
                && let Some((what, r)) = acks.next().await
            {
                settle(what, r)?;
            }
        }
        while let Some((what, r)) = acks.next().await {
            settle(what, r)?;
        }
        Ok(())
    }

    /// Deletes every entry of `relay` (a KV delete per key: watchers see each one), and
    /// for `forget` its lease too; returns how many keys it deleted. Bounded by
    /// [`PURGE_WITHIN`]; idempotent.
    pub async fn purge(&self, relay: &str, cause: PurgeCause) -> Result<usize, RegistryError> {
        let fut = async {
            let entries = self.entries_of(relay).await?;
            self.settle_leftovers(&entries).await;
            // Every `Disconnected` is stored before any entry goes, as the relay itself
            // would have said them: a purger that dies half way leaves the entries for the
            // next, whose events the stream's duplicate window removes.
            let events = entries
                .iter()
                .filter_map(|(k, v)| self.lost(k, v))
                .map(Write::Event);
            self.send_all(events).await?;
            self.vacate(relay).await?;
            let mut keys: Vec<String> = entries.into_iter().map(|(k, _)| k).collect();
            if cause != PurgeCause::LeaseExpired {
                // Last: while entries remain, the lease says who they belong to.
                keys.push(keys::lease_key(relay));
            }
            let n = keys.len();
            self.send_all(keys.into_iter().map(|k| Write::Delete(k, None)))
                .await?;
            Ok(n)
        };
        let n = tokio::time::timeout(PURGE_WITHIN, fut)
            .await
            .map_err(|_| RegistryError::Timeout { op: "purge" })??;
        self.metrics
            .registry_purges
            .get_or_create(&Reason {
                reason: cause.label(),
            })
            .inc();
        Ok(n)
    }

    /// At the relay's exit, after its connections closed: stops the lease and the watch,
    /// flushes the queued writes, deletes whatever entry of this relay is left, then its
    /// lease. Bounded by [`SHUTDOWN_WITHIN`].
    pub async fn shutdown(&self) {
        // The connections in their grace first: a client of this relay may resume on
        // another within it. Those still waiting are said by the purge below.
        self.pending.close();
        if tokio::time::timeout(self.grace() + Duration::from_secs(1), self.pending.wait())
            .await
            .is_err()
        {
            tracing::warn!("registry: connections in their grace not all said before the exit");
        }
        // The channels this relay's connections left: vacated in order, before the writer
        // stops (the purge below takes this relay out of whatever sets are left).
        if let Some(c) = &self.occupancy {
            c.close();
        }
        let occupancy = self
            .occupancy_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = occupancy
            && tokio::time::timeout(SHUTDOWN_WITHIN, t).await.is_err()
        {
            tracing::warn!("registry: vacating this relay's channels timed out");
        }
        self.stop.cancel();
        drop(self.writes.lock().unwrap_or_else(|p| p.into_inner()).take());
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let fut = async {
            for t in tasks {
                let _ = t.await;
            }
            self.purge(&self.relay, PurgeCause::Shutdown).await
        };
        match tokio::time::timeout(SHUTDOWN_WITHIN, fut).await {
            Ok(Ok(n)) => tracing::info!(keys = n, "registry: this relay's keys deleted"),
            Ok(Err(e)) => tracing::warn!(error = %e, "registry: this relay's keys not deleted"),
            Err(_) => tracing::warn!("registry: deleting this relay's keys timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_is_a_kv_stream_with_ttls_and_markers() {
        let r: RegistryConfig =
            serde_json::from_str(r#"{"bucket": "REG", "replicas": 3, "maxBytes": 2097152}"#)
                .unwrap();
        let c = bucket_config(&r);
        assert_eq!(c.name, "KV_REG");
        assert_eq!(c.subjects, ["$KV.REG.>"]);
        assert_eq!(c.max_messages_per_subject, 1);
        assert_eq!((c.num_replicas, c.max_bytes), (3, 2_097_152));
        assert!(c.allow_message_ttl && c.allow_direct && c.allow_rollup && c.deny_delete);
        assert_eq!(c.subject_delete_marker_ttl, Some(MARKER_TTL));
    }

    #[test]
    fn the_first_live_name_purges() {
        assert_eq!(purger(["r2", "r1", "r3"]), Some("r1"));
        assert_eq!(purger(Vec::<&str>::new()), None);
    }
}
