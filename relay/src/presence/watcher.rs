//! One channel's watcher on this relay: an ordered consumer on the registry's
//! `pres.<chan>.>` (the last entry of each key, then live), applied in stream order to the
//! channel's [`Members`], whose events are encoded once and fanned out to the local
//! subscribers that asked for them. Started by the channel's first local subscriber (of a
//! presence binding), stopped with the last ([`super::Presences`]).
//!
//! Locks: the watcher's `inner` is taken after a connection's subscription map and the
//! presences' map, never before them; under it only outboxes (and sockets) are touched.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::entry;
use super::members::{Event, Members, Page, Policy};
use crate::conn::Conn;
use crate::fanout::deliver::fan_out_frame;
use crate::metrics::{Kind, Metrics};
use crate::protocol::{encode_member_event, encode_occupancy, encode_presence};
use crate::registry::{REQUEST_WITHIN, stream_name};

/// Pause before a failed watch starts again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How far the watcher has read the channel's entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// The stream sequence of the last entry applied.
    pub applied: u64,
    /// It has read every entry that existed when it (re)started.
    pub current: bool,
}

/// A local subscriber of the channel.
#[derive(Debug)]
struct Local {
    conn: Arc<Conn>,
    /// It subscribed with `presence: true` and its `ok` (with the snapshot) is queued: it
    /// hears the events from now on.
    events: bool,
}

#[derive(Debug)]
struct Inner {
    members: Members,
    /// By the serial of their membership.
    locals: HashMap<u64, Local>,
    /// The members counted in `wsrelay_presence_members`.
    counted: usize,
}

/// One channel's watcher.
#[derive(Debug)]
pub struct Watcher {
    channel: Arc<str>,
    inner: Mutex<Inner>,
    progress: watch::Sender<Progress>,
    stop: CancellationToken,
}

impl Watcher {
    pub(super) fn new(channel: &str, policy: Policy) -> Self {
        Self {
            channel: Arc::from(channel),
            inner: Mutex::new(Inner {
                members: Members::new(policy),
                locals: HashMap::new(),
                counted: 0,
            }),
            progress: watch::Sender::new(Progress::default()),
            stop: CancellationToken::new(),
        }
    }

    /// The channel.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn add_local(&self, serial: u64, conn: Arc<Conn>) {
        self.lock().locals.insert(
            serial,
            Local {
                conn,
                events: false,
            },
        );
    }

    /// Removes a local subscriber; returns whether none is left.
    pub(super) fn remove_local(&self, serial: u64) -> bool {
        let mut g = self.lock();
        g.locals.remove(&serial);
        g.locals.is_empty()
    }

    pub(super) fn stop(&self) {
        self.stop.cancel();
    }

    /// Waits (at most `within`) until the watcher has applied stream sequence `seq` (0: until
    /// it has read what existed when it started); whether it did.
    pub async fn applied(&self, seq: u64, within: Duration) -> bool {
        let mut rx = self.progress.subscribe();
        tokio::time::timeout(within, rx.wait_for(|p| p.current && p.applied >= seq))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Queues `ok` with a page of members: under the lock events are applied under, so the
    /// page reflects every event queued before it and none queued after.
    pub fn answer_page(&self, conn: &Conn, ok: String, after: Option<&str>, limit: usize) {
        let g = self.lock();
        let page = encode_page(&g.members.page(after, limit));
        conn.outbox
            .push_reply(tokio_tungstenite::tungstenite::Message::text(
                crate::protocol::with_presence(ok, &page),
            ));
    }

    /// Queues `ok` with the first page of members, and from then on the events, to the
    /// local subscriber `serial`: under the lock events are applied under, so the snapshot
    /// and the events that follow it are one sequence.
    pub fn answer(&self, serial: u64, conn: &Conn, ok: String, first: usize) {
        let mut g = self.lock();
        let page = encode_page(&g.members.page(None, first));
        conn.outbox
            .push_reply(tokio_tungstenite::tungstenite::Message::text(
                crate::protocol::with_presence(ok, &page),
            ));
        if let Some(l) = g.locals.get_mut(&serial) {
            l.events = true;
        }
    }

    /// Runs until stopped: watches, and after an error watches again from the start,
    /// turning the difference into events.
    pub(super) async fn run(
        self: Arc<Self>,
        js: jetstream::Context,
        bucket: String,
        metrics: Arc<Metrics>,
    ) {
        loop {
            match self.watch(&js, &bucket, &metrics).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::debug!(channel = %self.channel, error = %e, "presence watch ended; starting again");
                    self.progress.send_modify(|p| p.current = false);
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => break,
                () = tokio::time::sleep(RETRY_AFTER) => {}
            }
        }
        let mut g = self.lock();
        metrics.presence_members.dec_by(g.counted as i64);
        g.counted = 0;
    }

    async fn watch(
        &self,
        js: &jetstream::Context,
        bucket: &str,
        metrics: &Metrics,
    ) -> Result<(), String> {
        let prefix = format!(
            "$KV.{bucket}.pres.{}.",
            crate::registry::keys::channel_token(&self.channel)
        );
        let open = async {
            let stream = js
                .get_stream(stream_name(bucket))
                .await
                .map_err(|e| e.to_string())?;
            let consumer = stream
                .create_consumer(consumer::push::OrderedConfig {
                    deliver_subject: js.client().new_inbox(),
                    filter_subject: format!("{prefix}>"),
                    deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                    replay_policy: consumer::ReplayPolicy::Instant,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            let pending = consumer.cached_info().num_pending;
            let messages = consumer.messages().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((pending, messages))
        };
        let (pending, mut messages) = tokio::time::timeout(REQUEST_WITHIN, open)
            .await
            .map_err(|_| "JetStream did not answer".to_owned())??;
        // What existed at the start, gathered, then compared with what the members hold
        // (empty the first time; stale after an error): the difference is applied.
        let mut start: Option<HashMap<String, Seen>> = Some(HashMap::new());
        let mut last = 0u64;
        if pending == 0 {
            self.reconcile(start.take().unwrap_or_default(), last, metrics);
        }
        loop {
            let due = self.lock().members.next_due();
            let sleep = async {
                match due {
                    Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                    None => std::future::pending().await,
                }
            };
            let m = tokio::select! {
                () = self.stop.cancelled() => return Ok(()),
                () = sleep => {
                    self.apply(metrics, |m, now| m.tick(now));
                    continue;
                }
                m = messages.next() => m,
            };
            let m = m
                .ok_or_else(|| "the watch ended".to_owned())?
                .map_err(|e| e.to_string())?;
            let info = m.info().map_err(|e| e.to_string())?;
            let (seq, left) = (info.stream_sequence, info.pending);
            let Some(conn) = m.subject.strip_prefix(prefix.as_str()) else {
                continue;
            };
            let published_ms =
                u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
            let seen = seen(m.headers.as_ref(), &m.payload, published_ms);
            last = seq;
            match &mut start {
                Some(s) => {
                    s.insert(conn.to_owned(), seen);
                    if left == 0 {
                        self.reconcile(start.take().unwrap_or_default(), last, metrics);
                    }
                }
                None => {
                    let conn = conn.to_owned();
                    self.apply(metrics, |members, now| seen.apply(members, &conn, now));
                    self.progress.send_modify(|p| p.applied = seq);
                }
            }
        }
    }

    /// The entries read at a (re)start replace what the members held.
    fn reconcile(&self, entries: HashMap<String, Seen>, last: u64, metrics: &Metrics) {
        self.apply(metrics, |members, now| {
            let present: HashSet<&str> = entries
                .iter()
                .filter(|(_, v)| matches!(v, Seen::Present(..)))
                .map(|(k, _)| k.as_str())
                .collect();
            let gone: Vec<String> = members
                .conns()
                .filter(|c| !present.contains(c))
                .map(str::to_owned)
                .collect();
            let mut out = Vec::new();
            for c in gone {
                out.extend(members.delete(&c, now));
            }
            for (c, v) in &entries {
                if let Seen::Present(key, info) = v {
                    out.extend(members.put(c, key, info, now));
                }
            }
            // Departures after the present ones: a member with a connection is no departure.
            for (c, v) in &entries {
                if let Seen::Departed(..) = v {
                    out.extend(v.apply(members, c, now));
                }
            }
            out
        });
        // The sequences of the stream read now (a recreated bucket starts again from 1).
        self.progress.send_modify(|p| {
            p.applied = last;
            p.current = true;
        });
    }

    /// Applies a change to the members and fans its events out, under the lock.
    fn apply(&self, metrics: &Metrics, change: impl FnOnce(&mut Members, Instant) -> Vec<Event>) {
        let mut g = self.lock();
        let events = change(&mut g.members, Instant::now());
        let users = g.members.users();
        if users != g.counted {
            metrics
                .presence_members
                .inc_by(users as i64 - g.counted as i64);
            g.counted = users;
        }
        if events.is_empty() {
            return;
        }
        let to: Vec<&Arc<Conn>> = g
            .locals
            .values()
            .filter(|l| l.events)
            .map(|l| &l.conn)
            .collect();
        if to.is_empty() {
            return;
        }
        for e in events {
            let (kind, text) = match &e {
                Event::Join(m) => (
                    "join",
                    encode_member_event("join", &self.channel, &m.key, &m.info),
                ),
                Event::Leave(m) => (
                    "leave",
                    encode_member_event("leave", &self.channel, &m.key, &m.info),
                ),
                Event::Occupancy {
                    clients,
                    users,
                    events,
                } => (
                    "occupancy",
                    encode_occupancy(&self.channel, *clients, *users, *events),
                ),
            };
            metrics
                .presence_events
                .get_or_create(&Kind { event: kind })
                .inc_by(to.len() as u64);
            fan_out_frame(to.iter().copied(), &self.channel, text, metrics);
        }
    }
}

/// What one message of the watch says about its KV key (a connection's membership).
#[derive(Debug)]
enum Seen {
    /// It holds this member (key, info).
    Present(String, String),
    /// It was deleted, and held this member (key, info) until then (the marker says so).
    Departed(String, String, Instant),
    /// It is gone (a purge's marker, an expired one, or a value this relay cannot read).
    Gone,
}

impl Seen {
    fn apply(&self, members: &mut Members, conn: &str, now: Instant) -> Vec<Event> {
        match self {
            Self::Present(key, info) => members.put(conn, key, info, now),
            // A connection this view held: a plain departure. One it never held: a member
            // that may be in its grace elsewhere.
            Self::Departed(key, info, at) if !members.holds(conn) => {
                members.departed(key, info, *at, now)
            }
            Self::Departed(..) | Self::Gone => members.delete(conn, now),
        }
    }
}

/// Reads one message of the watch: a value, or a delete marker (with the departed entry's
/// value when the relay that wrote it deleted it: [`crate::registry::WAS_HEADER`]).
fn seen(headers: Option<&async_nats::HeaderMap>, payload: &[u8], published_ms: u64) -> Seen {
    if !crate::registry::is_removal(headers) {
        return entry::read(payload).map_or(Seen::Gone, |(k, i)| Seen::Present(k, i));
    }
    let was = headers
        .and_then(|h| h.get(crate::registry::WAS_HEADER))
        .and_then(|v| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str())
                .ok()
        })
        .and_then(|v| entry::read(&v));
    match was {
        Some((key, info)) => {
            // When it went, on this relay's clock: the marker's age by the wall clock.
            let age = Duration::from_millis(crate::clock::now_ms().saturating_sub(published_ms));
            let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
            Seen::Departed(key, info, at)
        }
        None => Seen::Gone,
    }
}

/// A page as the `presence` of an `ok`.
fn encode_page(p: &Page) -> String {
    encode_presence(
        p.members.iter().map(|(m, n)| (&*m.key, &*m.info, *n)),
        p.clients,
        p.users,
        p.events,
        p.next.as_deref(),
    )
}
