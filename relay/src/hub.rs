//! The hub: one NATS subscription per distinct subject, shared by every local client
//! subscribed to it, reference-counted and removed with the last one.
//!
//! Each NATS message is encoded once per (subject, channel) and the same bytes are queued
//! to every recipient. async-nats resubscribes by itself after a reconnect.
//!
//! A resumable channel's entry subscribes to the subject its stream republishes to (every
//! message then carries its position), keeps the channel's retained messages in a ring
//! (`crate::history`), and joins a subscriber under the ring's lock: the `ok`, the replay and
//! the first live message cannot interleave, so nothing is lost or doubled.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::authz::Resolved;
use crate::config::History;
use crate::history::ring::{Ring, Stored};
use crate::history::{self, Live, Resumable, Start, Streams, stream};
use crate::metrics::Metrics;
use crate::outbox::{Frame, Push};
use crate::protocol::{
    RequestId, Since, encode_message, encode_message_at, encode_ok, encode_ok_not_recovered,
    encode_ok_position, encode_unsubscribed,
};
use crate::relay::ConnShared;
use crate::signal::Signal;
use crate::sink::{self, Delivery};

/// How long a subscribe waits for NATS to confirm the SUB before answering 503.
const CONFIRM_WITHIN: Duration = Duration::from_secs(2);

/// How long a gap fill retries JetStream before the channel's subscribers are told to
/// subscribe again.
const FILL_WITHIN: Duration = Duration::from_secs(10);

/// A paced replay (or gap fill) waits this long at first for its client's queue to take
/// more, doubling up to [`PACE_MAX`] while it does not.
const PACE_MIN: Duration = Duration::from_millis(2);
const PACE_MAX: Duration = Duration::from_millis(100);

/// A paced replay whose client's queue took nothing for this long gives up: the client is
/// closed as a slow consumer (and counted).
const PACE_STALL: Duration = Duration::from_secs(30);

/// Why an entry ended when NATS refused it.
const REFUSED: &str = "refused by NATS";

/// Subscribers of a subject up to which its fan-out writes to idle connections itself
/// (`sink::deliver`). Above, the writes stay with the connections' writer tasks: one task
/// writing to thousands of sockets in a row would hold one worker and delay the last.
const DIRECT_FAN_OUT: usize = 4;

/// A connection's id, unique in the process.
pub type ConnId = u64;

/// One local subscription: a connection and the channel name it subscribed with. A
/// connection may reach one subject through two channels (two bindings), and each gets
/// every message under its own name.
type SubKey = (ConnId, Arc<str>);

#[derive(Debug)]
struct Subscriber {
    conn: Arc<ConnShared>,
    channel: Arc<str>,
    /// Receives live messages (a resumable subscriber is joined, not yet live, until its
    /// replay is queued).
    live: AtomicBool,
    /// Unique in the hub: a paced replay serves this subscriber, not a later one of the
    /// same connection and channel.
    serial: u64,
}

impl Subscriber {
    /// The relay ended this subscription to `key`: the connection forgets it (unless it has
    /// subscribed to the channel again since) and hears an `unsubscribed` notice.
    fn unsubscribed(&self, key: &str, reason: &str) {
        let mut subs = self.conn.subs();
        if subs.get(&*self.channel).map(String::as_str) == Some(key) {
            subs.remove(&*self.channel);
            drop(subs);
            self.conn
                .outbox
                .push_reply(Message::text(encode_unsubscribed(&self.channel, reason)));
        }
    }
}

/// Where a subject's NATS subscription stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// SUB sent, not yet confirmed by a round trip.
    Pending,
    /// In place: messages flow.
    Live,
    /// Refused, failed or ended; the entry has left the map.
    Ended(&'static str),
}

#[derive(Debug)]
struct SubjectEntry {
    subscribers: RwLock<HashMap<SubKey, Subscriber>>,
    cancel: CancellationToken,
    state: watch::Sender<State>,
    /// Set for a resumable channel.
    resumable: Option<Arc<Resumable>>,
    /// Set to make a resumable entry's task read what it may have missed (NATS
    /// reconnected).
    resync: AtomicBool,
    /// Wakes the entry's task for `cancel` or `resync`. Polled before every message: a
    /// `Signal` costs two atomic swaps there, where the token's and a `Notify`'s waiters took
    /// a lock each (about 500 instructions per delivery).
    control: Signal,
}

impl SubjectEntry {
    /// Stops the entry's task.
    fn stop(&self) {
        self.cancel.cancel();
        self.control.notify();
    }
}

/// What a subscription is to: the key is the NATS subject the hub subscribes to (the
/// republish subject for a resumable channel); `history` is the binding's, with the
/// channel's subject in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The NATS subject subscribed to; a connection's subscription map holds it.
    pub key: String,
    /// For a resumable channel: its binding's history and its subject in the stream.
    pub history: Option<(History, String)>,
}

impl Target {
    /// The target of a resolved channel. Pure.
    pub fn of(r: &Resolved) -> Self {
        match &r.history {
            None => Self {
                key: r.subject.clone(),
                history: None,
            },
            Some(h) => Self {
                key: stream::republish_subject(&h.stream, &r.subject),
                history: Some((h.clone(), r.subject.clone())),
            },
        }
    }
}

/// Why a subscription could not be put in place (the client hears 503).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// NATS refused, failed or did not confirm the subscription in time.
    #[error("NATS subscription {0}")]
    Unavailable(&'static str),
    /// JetStream did not answer for the channel's history.
    #[error("history unavailable: {0}")]
    History(String),
    /// A config reload ended the subscription while it was being set up.
    #[error("the subscription ended while it was being set up")]
    Ended,
}

/// Subject to local subscribers.
#[derive(Debug)]
pub struct Hub {
    client: async_nats::Client,
    /// Confirms SUBs by a round trip no other NATS client can answer or delay.
    confirm: crate::confirm::Confirmer,
    subjects: Mutex<HashMap<String, Arc<SubjectEntry>>>,
    metrics: Arc<Metrics>,
    max_payload: usize,
    tasks: TaskTracker,
    streams: Streams,
    serials: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Hub {
    /// A hub over `client`; NATS payloads above `max_payload` bytes are dropped.
    pub fn new(client: async_nats::Client, metrics: Arc<Metrics>, max_payload: usize) -> Self {
        Self {
            confirm: crate::confirm::Confirmer::new(
                client.clone(),
                crate::config::RELAY_SUBJECT_PREFIX,
            ),
            client,
            subjects: Mutex::new(HashMap::new()),
            metrics,
            max_payload,
            tasks: TaskTracker::new(),
            streams: Streams::default(),
            serials: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The epochs of the history streams in place.
    pub fn streams(&self) -> &Streams {
        &self.streams
    }

    /// Distinct subjects subscribed.
    pub fn subject_count(&self) -> usize {
        lock(&self.subjects).len()
    }

    /// Subscribes `conn` to `target` as `channel` and queues the `ok` (for a resumable
    /// channel with its epoch and position, then the replay `since` asked for). Returns once
    /// the NATS subscription is confirmed by a round trip through the server, so a message
    /// published after the `ok` is delivered; or an error (and `conn` is not subscribed)
    /// when NATS refuses, fails or does not confirm within 2 s, or JetStream does not answer.
    pub async fn subscribe(
        self: &Arc<Self>,
        target: &Target,
        conn: &Arc<ConnShared>,
        channel: &str,
        id: Option<&RequestId>,
        since: Option<&Since>,
    ) -> Result<(), SubscribeError> {
        let channel: Arc<str> = Arc::from(channel);
        let key = (conn.id, channel.clone());
        let (entry, mut state) = {
            let mut subjects = lock(&self.subjects);
            let entry = subjects
                .entry(target.key.clone())
                .or_insert_with(|| self.start_subject(target))
                .clone();
            write(&entry.subscribers).insert(
                key.clone(),
                Subscriber {
                    conn: conn.clone(),
                    channel: channel.clone(),
                    live: AtomicBool::new(entry.resumable.is_none()),
                    serial: self.serials.fetch_add(1, Ordering::Relaxed),
                },
            );
            let state = entry.state.subscribe();
            (entry, state)
        };
        // In a block of its own: the watch's read guard must be gone before the next await.
        let mut outcome = {
            let settled =
                tokio::time::timeout(CONFIRM_WITHIN, state.wait_for(|s| *s != State::Pending))
                    .await;
            match settled {
                Ok(Ok(s)) => match &*s {
                    State::Live => Ok(()),
                    State::Ended(why) => Err(SubscribeError::Unavailable(why)),
                    State::Pending => Err(SubscribeError::Unavailable("not confirmed")),
                },
                Ok(Err(_)) => Err(SubscribeError::Unavailable("ended")),
                Err(_) => Err(SubscribeError::Unavailable("not confirmed in time")),
            }
        };
        if outcome.is_ok() {
            outcome = match &entry.resumable {
                None => self.join_plain(&entry, target, conn, &channel, id, since),
                Some(res) => {
                    self.join_resumable(&entry, res, target, conn, &channel, id, since)
                        .await
                }
            };
        }
        if outcome.is_err() {
            // Not joined: this subscriber leaves, and an entry that never went live is
            // ended so the next subscriber starts afresh instead of joining a dead one.
            write(&entry.subscribers).remove(&key);
            if *entry.state.borrow() == State::Pending {
                self.end(&target.key, &entry, "not confirmed in time");
            } else {
                self.release_if_empty(&target.key, &entry);
            }
        }
        outcome
    }

    /// A plain channel: the subscriber is live already; queue the `ok` unless a reload
    /// ended the subscription meanwhile.
    fn join_plain(
        &self,
        entry: &SubjectEntry,
        target: &Target,
        conn: &ConnShared,
        channel: &str,
        id: Option<&RequestId>,
        since: Option<&Since>,
    ) -> Result<(), SubscribeError> {
        let _subs = read(&entry.subscribers);
        if conn.subs().get(channel) != Some(&target.key) {
            return Err(SubscribeError::Ended);
        }
        // A resume asked of a channel without history: nothing can be recovered.
        let ok = if since.is_some() {
            encode_ok_not_recovered(id)
        } else {
            encode_ok(id)
        };
        conn.outbox.push_reply(Message::text(ok));
        Ok(())
    }

    /// A resumable channel: complete the ring (once per entry), decide the resume (asking
    /// the stream only when the ring cannot tell), then, under the ring's lock, queue the
    /// `ok`, the replay, and make the subscriber live. A replay the client's queue cannot
    /// take at once is paced ([`Hub::catch_up`]): never a slow-consumer close.
    #[allow(clippy::too_many_arguments)]
    async fn join_resumable(
        self: &Arc<Self>,
        entry: &Arc<SubjectEntry>,
        res: &Resumable,
        target: &Target,
        conn: &Arc<ConnShared>,
        channel: &str,
        id: Option<&RequestId>,
        since: Option<&Since>,
    ) -> Result<(), SubscribeError> {
        let m = &self.metrics;
        let unavailable = |e: stream::StreamError| {
            m.history(&m.history_reads, "error");
            if since.is_some() {
                m.history(&m.history_resumes, "unavailable");
            }
            SubscribeError::History(e.to_string())
        };
        if res.ensure_loaded(&self.client).await.map_err(unavailable)? {
            m.history(&m.history_reads, "load");
        }
        let Some(epoch) = self.streams.epoch(&res.stream) else {
            if since.is_some() {
                m.history(&m.history_resumes, "unavailable");
            }
            return Err(SubscribeError::History(format!(
                "stream {} is not in place yet",
                res.stream
            )));
        };
        let asked = since.map(|s| (s.epoch.as_str(), s.seq));
        let held = res
            .check(&self.client, &epoch, asked)
            .await
            .map_err(unavailable)?;
        if held.is_some() {
            m.history(&m.history_reads, "check");
        }
        let paced = res.with_ring(|ring| {
            let start = Resumable::decide(ring, &epoch, asked, held);
            let subs = read(&entry.subscribers);
            if conn.subs().get(channel) != Some(&target.key) {
                return Err(SubscribeError::Ended);
            }
            let (pos, recovered, replay) = match start {
                Start::Recovered { from, replay } => (from, Some(true), replay),
                Start::Fresh { head, asked } => (head, asked.then_some(false), Vec::new()),
            };
            if since.is_some() {
                let outcome = if recovered == Some(true) {
                    "recovered"
                } else {
                    "not_recovered"
                };
                m.history(&m.history_resumes, outcome);
            }
            conn.outbox.push_reply(Message::text(encode_ok_position(
                id, &epoch, pos, recovered,
            )));
            let name: Arc<str> = Arc::from(channel);
            let Some(sub) = subs.get(&(conn.id, name.clone())) else {
                return Ok(None);
            };
            match queue_replay(conn, &name, pos, &replay) {
                Queued::All(_) => {
                    sub.live.store(true, Ordering::Release);
                    Ok(None)
                }
                Queued::Upto(prev) => Ok(Some((name, sub.serial, prev))),
                Queued::Closing => Ok(None),
            }
        })?;
        if let Some((name, serial, prev)) = paced {
            self.pace(entry, &target.key, conn, name, serial, prev);
        }
        Ok(())
    }

    /// Starts a paced catch-up for a subscriber the client's queue could not take at once.
    fn pace(
        self: &Arc<Self>,
        entry: &Arc<SubjectEntry>,
        key: &str,
        conn: &Arc<ConnShared>,
        channel: Arc<str>,
        serial: u64,
        prev: u64,
    ) {
        self.tasks.spawn(self.clone().catch_up(
            entry.clone(),
            key.to_owned(),
            conn.clone(),
            channel,
            serial,
            prev,
        ));
    }

    /// A subscriber joined but not live, that holds every message of the channel up to
    /// `prev`: queues what follows from the ring as its client's queue empties, then makes
    /// it live, both under the ring's lock (live messages are appended under it, so none is
    /// lost or doubled in between). The ring dropping a message it still needs ends the
    /// subscription with an `unsubscribed` notice (`unavailable`): the client subscribes
    /// again from its position, and the stream decides. A client that takes nothing for
    /// [`PACE_STALL`] is closed as a slow consumer.
    async fn catch_up(
        self: Arc<Self>,
        entry: Arc<SubjectEntry>,
        key: String,
        conn: Arc<ConnShared>,
        channel: Arc<str>,
        serial: u64,
        mut prev: u64,
    ) {
        let Some(res) = entry.resumable.clone() else {
            return;
        };
        let sub_key: SubKey = (conn.id, channel.clone());
        let mut pause = PACE_MIN;
        let mut progress_at = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = entry.cancel.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
            let step = res.with_ring(|ring| {
                let subs = read(&entry.subscribers);
                let Some(sub) = subs.get(&sub_key).filter(|s| s.serial == serial) else {
                    return Some(Queued::Closing);
                };
                let rest = ring.continue_after(prev)?;
                let queued = queue_replay(&conn, &channel, prev, &rest);
                if let Queued::All(_) = queued {
                    sub.live.store(true, Ordering::Release);
                }
                Some(queued)
            });
            match step {
                Some(Queued::All(_) | Queued::Closing) => return,
                Some(Queued::Upto(p)) if p > prev => {
                    prev = p;
                    pause = PACE_MIN;
                    progress_at = tokio::time::Instant::now();
                }
                Some(Queued::Upto(_)) => {
                    if progress_at.elapsed() >= PACE_STALL {
                        tracing::info!(conn = conn.id, %channel, "paced replay: the client took nothing; closing it as a slow consumer");
                        self.metrics.slow_consumers.inc();
                        conn.outbox
                            .close(crate::outbox::Cause::SlowConsumer.request());
                        return;
                    }
                    pause = (pause * 2).min(PACE_MAX);
                }
                None => {
                    tracing::debug!(conn = conn.id, %channel, after = prev, "paced replay: the ring no longer holds what follows; the client subscribes again");
                    self.leave(&key, &entry, &sub_key, serial);
                    return;
                }
            }
        }
    }

    /// Ends one subscriber (the one `serial` names) with an `unsubscribed` notice
    /// (`unavailable`): it subscribes again from its position.
    fn leave(&self, key: &str, entry: &Arc<SubjectEntry>, sub_key: &SubKey, serial: u64) {
        let removed = {
            let mut subs = write(&entry.subscribers);
            if subs.get(sub_key).is_some_and(|s| s.serial == serial) {
                subs.remove(sub_key)
            } else {
                None
            }
        };
        if let Some(s) = removed {
            s.unsubscribed(key, "unavailable");
        }
        self.release_if_empty(key, entry);
    }

    fn start_subject(self: &Arc<Self>, target: &Target) -> Arc<SubjectEntry> {
        let (state, _) = watch::channel(State::Pending);
        let entry = Arc::new(SubjectEntry {
            subscribers: RwLock::new(HashMap::new()),
            cancel: CancellationToken::new(),
            state,
            resumable: target
                .history
                .as_ref()
                .map(|(h, subject)| Arc::new(Resumable::new(h, subject))),
            resync: AtomicBool::new(false),
            control: Signal::default(),
        });
        self.metrics.nats_subscriptions.inc();
        let (hub, key, e) = (self.clone(), target.key.clone(), entry.clone());
        self.tasks.spawn(async move {
            // A panic ends this subject's entry (its subscribers hear `unsubscribed`), not the
            // process.
            let run = hub.clone().run_subject(key.clone(), e.clone());
            if crate::task::catch("subject", &hub.metrics, run)
                .await
                .is_none()
            {
                hub.end(&key, &e, "failed");
            }
        });
        entry
    }

    /// Removes `conn`'s subscription to `key` under `channel`; the NATS subscription goes
    /// with the last subscriber.
    pub fn unsubscribe(&self, key: &str, conn: ConnId, channel: &str) {
        let Some(entry) = lock(&self.subjects).get(key).cloned() else {
            return;
        };
        write(&entry.subscribers).remove(&(conn, Arc::from(channel)));
        self.release_if_empty(key, &entry);
    }

    fn release_if_empty(&self, key: &str, entry: &Arc<SubjectEntry>) {
        let mut subjects = lock(&self.subjects);
        // Checked under the map lock: a subscriber joining concurrently holds it too.
        if read(&entry.subscribers).is_empty()
            && subjects.get(key).is_some_and(|e| Arc::ptr_eq(e, entry))
        {
            subjects.remove(key);
            entry.stop();
            self.metrics.nats_subscriptions.dec();
        }
    }

    /// NATS refused the subscription to `subject` (a permissions violation reported by the
    /// server, which arrives on its own, possibly after the confirming round trip).
    pub fn refused(&self, subject: &str) {
        let entry = lock(&self.subjects).get(subject).cloned();
        if let Some(entry) = entry {
            tracing::warn!(%subject, "NATS refused the subscription (permissions)");
            self.end(subject, &entry, REFUSED);
        }
    }

    /// NATS reconnected: republished messages sent meanwhile are lost, so every resumable
    /// channel reads what it missed from its stream.
    pub fn resync(&self) {
        for entry in lock(&self.subjects).values() {
            if entry.resumable.is_some() {
                entry.resync.store(true, Ordering::Release);
                entry.control.notify();
            }
        }
    }

    /// A history stream was recreated (new epoch): its channels' positions are void. Their
    /// subscribers are told to subscribe again (and then hear `recovered: false`).
    pub fn reset_stream(&self, name: &str) {
        let ended: Vec<(String, Arc<SubjectEntry>)> = lock(&self.subjects)
            .iter()
            .filter(|(_, e)| e.resumable.as_ref().is_some_and(|r| r.stream == name))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        for (key, entry) in ended {
            self.end(&key, &entry, "history stream recreated");
        }
    }

    /// Ends a subject: out of the map, its task stopped. Subscribers waiting for the
    /// confirmation hear the reason as an error; live ones lose the channel and get an
    /// `unsubscribed` notice, so no client stays subscribed to nothing.
    fn end(&self, key: &str, entry: &Arc<SubjectEntry>, why: &'static str) {
        {
            let mut subjects = lock(&self.subjects);
            if subjects.get(key).is_some_and(|e| Arc::ptr_eq(e, entry)) {
                subjects.remove(key);
                self.metrics.nats_subscriptions.dec();
            }
        }
        entry.stop();
        let was = entry.state.send_replace(State::Ended(why));
        let subscribers: Vec<Subscriber> =
            write(&entry.subscribers).drain().map(|(_, s)| s).collect();
        if was != State::Live {
            // Their `subscribe` calls answer the error.
            return;
        }
        for s in subscribers {
            s.unsubscribed(key, notice_reason(why));
        }
    }

    /// Stops every subject task (at shutdown) and waits for them, bounded.
    pub async fn close(&self, within: Duration) {
        for entry in lock(&self.subjects).values() {
            entry.stop();
        }
        self.tasks.close();
        let _ = tokio::time::timeout(within, self.tasks.wait()).await;
    }

    async fn run_subject(self: Arc<Self>, key: String, entry: Arc<SubjectEntry>) {
        let mut sub = match self.client.subscribe(key.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(subject = %key, error = %e, "NATS subscribe failed");
                self.end(&key, &entry, "failed");
                return;
            }
        };
        // Wait for a round trip through the server on this connection, so the SUB has been
        // processed before the client hears `ok` (`crate::confirm`). Bounded: while NATS is
        // unreachable the subscribe answers 503 rather than a hopeful `ok`.
        let confirmed = tokio::select! {
            () = entry.cancel.cancelled() => false,
            r = tokio::time::timeout(CONFIRM_WITHIN, self.confirm.round_trip()) => {
                matches!(r, Ok(Ok(())))
            }
        };
        if !confirmed {
            self.end(&key, &entry, "not confirmed in time");
            let _ = sub.unsubscribe().await;
            return;
        }
        // Unless a refusal ended it meanwhile.
        entry.state.send_if_modified(|s| {
            let pending = *s == State::Pending;
            if pending {
                *s = State::Live;
            }
            pending
        });
        tracing::debug!(subject = %key, "NATS subscribed");
        let ended = loop {
            // The control signal first (a stop or a resync is not kept waiting behind a
            // stream of messages), then the next message.
            let next = std::future::poll_fn(|cx| {
                if entry.control.poll_wait(cx).is_ready() {
                    return Poll::Ready(None);
                }
                sub.poll_next_unpin(cx).map(Some)
            })
            .await;
            let msg = match next {
                None => {
                    if entry.cancel.is_cancelled() {
                        break None;
                    }
                    if entry.resync.swap(false, Ordering::AcqRel)
                        && let Some(res) = &entry.resumable
                        && let Err(why) = self.fill(&key, &entry, res, None).await
                    {
                        break Some(why);
                    }
                    continue;
                }
                Some(None) => break Some("ended"),
                Some(Some(m)) => m,
            };
            match &entry.resumable {
                None => fan_out(&entry, &msg.payload, &self.metrics, self.max_payload),
                Some(res) => {
                    if let Err(why) = self.deliver(&key, &entry, res, msg).await {
                        break Some(why);
                    }
                }
            }
        };
        if let Some(why) = ended {
            tracing::warn!(subject = %key, why, "NATS subscription ended");
            self.end(&key, &entry, why);
        }
        let _ = sub.unsubscribe().await;
        tracing::debug!(subject = %key, "NATS unsubscribed");
    }

    /// Delivers a republished message of a resumable channel, reading the stream first when
    /// messages before it were missed. An error ends the entry (its subscribers resubscribe
    /// with their position, and the stream decides).
    async fn deliver(
        self: &Arc<Self>,
        key: &str,
        entry: &Arc<SubjectEntry>,
        res: &Resumable,
        msg: async_nats::Message,
    ) -> Result<(), &'static str> {
        let Some(pos) = history::position(msg.headers.as_ref()) else {
            tracing::warn!(subject = %msg.subject, "a republished message without Nats-Sequence");
            return Ok(());
        };
        let now = history::now_ms();
        let m = Stored {
            seq: pos.seq,
            at_ms: now,
            payload: msg.payload,
        };
        if let Live::Gap { .. } = self.offer(entry, res, &m, pos.prev, now, None) {
            self.fill(key, entry, res, Some(m.seq)).await?;
            // Paced like the fill before it: it may find the queues the fill filled.
            let mut behind = Vec::new();
            let verdict = self.offer(
                entry,
                res,
                &m,
                pos.prev,
                history::now_ms(),
                Some(&mut behind),
            );
            self.pace_all(key, entry, behind);
            if let Live::Gap { after } = verdict {
                // The stream no longer holds what came before: never skip silently.
                tracing::warn!(stream = %res.stream, subject = %res.subject, after, "history hole the stream cannot fill");
                self.metrics.history(&self.metrics.history_gaps, "lost");
                return Err("history hole");
            }
            self.metrics.history(&self.metrics.history_gaps, "filled");
        }
        Ok(())
    }

    /// Reads the messages after the last one delivered (and before `before`) from the
    /// stream and delivers them, paced: a subscriber whose queue cannot take them (a big
    /// channel after a NATS reconnect) catches up from the ring ([`Hub::catch_up`]) instead
    /// of being closed as a slow consumer.
    async fn fill(
        self: &Arc<Self>,
        key: &str,
        entry: &Arc<SubjectEntry>,
        res: &Resumable,
        before: Option<u64>,
    ) -> Result<(), &'static str> {
        let after = res.with_ring(|r| r.last_seen());
        // JetStream may be briefly unable to answer (a NATS server lost, the stream's leader
        // being re-elected): retry with backoff, bounded, before giving the entry up.
        let mut pause = Duration::from_millis(100);
        let give_up = tokio::time::Instant::now() + FILL_WITHIN;
        let read = loop {
            self.metrics.history(&self.metrics.history_reads, "fill");
            match stream::read_after(
                &self.client,
                &res.stream,
                &res.subject,
                after,
                before,
                res.max_messages,
            )
            .await
            {
                Ok(read) => break read,
                Err(e) => {
                    self.metrics.history(&self.metrics.history_reads, "error");
                    if tokio::time::Instant::now() + pause > give_up {
                        tracing::warn!(error = %e, "history fill failed; giving the channel up");
                        return Err("history unavailable");
                    }
                    tracing::debug!(error = %e, "history fill failed; retrying");
                    tokio::select! {
                        () = entry.cancel.cancelled() => return Ok(()),
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        };
        let now = history::now_ms();
        let mut behind = Vec::new();
        for m in &read {
            // Read from the stream: in order after `after`, so no hole check.
            self.offer(entry, res, m, 0, now, Some(&mut behind));
        }
        self.pace_all(key, entry, behind);
        Ok(())
    }

    fn pace_all(self: &Arc<Self>, key: &str, entry: &Arc<SubjectEntry>, behind: Vec<Behind>) {
        for (conn, channel, serial, prev) in behind {
            self.pace(entry, key, &conn, channel, serial, prev);
        }
    }

    /// Offers a message to a resumable entry: appended and fanned out under the ring lock
    /// when it is the next one. With `behind`, the fan-out is paced: a subscriber whose
    /// queue has no room leaves live delivery and is listed there, to catch up.
    fn offer(
        &self,
        entry: &SubjectEntry,
        res: &Resumable,
        m: &Stored,
        prev: u64,
        now: u64,
        behind: Option<&mut Vec<Behind>>,
    ) -> Live {
        res.with_ring(|ring: &mut Ring| {
            let verdict = Resumable::accept(ring, m, prev, now);
            if let Live::Deliver { prev } = verdict {
                match behind {
                    None => fan_out_at(entry, m, prev, &self.metrics, self.max_payload),
                    Some(_) if m.payload.len() > self.max_payload => {
                        let n = read(&entry.subscribers).len() as u64;
                        self.metrics.drop_msgs("too_large", n);
                    }
                    Some(behind) => behind.extend(fan_out_paced(entry, m, prev)),
                }
            }
            verdict
        })
    }
}

/// How much of a replay a client's queue took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queued {
    /// All of it; the position of the last message queued.
    All(u64),
    /// Up to this position: no room for the next one yet.
    Upto(u64),
    /// The connection is closing.
    Closing,
}

/// Queues `msgs` (what follows `prev`, in order) to `conn` as far as its queue has room,
/// never applying the slow-consumer policy.
fn queue_replay(conn: &ConnShared, channel: &Arc<str>, mut prev: u64, msgs: &[Stored]) -> Queued {
    let received = Instant::now();
    for s in msgs {
        let frame = Frame {
            msg: Message::text(encode_message_at(channel, &s.payload, Some((s.seq, prev)))),
            received: Some(received),
            channel: Some(channel.clone()),
        };
        match conn.outbox.try_push_message(frame) {
            Ok(true) => prev = s.seq,
            Ok(false) => return Queued::Closing,
            Err(_) => return Queued::Upto(prev),
        }
    }
    Queued::All(prev)
}

/// The `reason` of the `unsubscribed` notice: `forbidden` when NATS refused the subject (a
/// retry would be refused again), `unavailable` otherwise (a later subscribe may succeed).
fn notice_reason(why: &str) -> &'static str {
    if why == REFUSED {
        "forbidden"
    } else {
        "unavailable"
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

fn fan_out(entry: &SubjectEntry, payload: &[u8], metrics: &Metrics, max_payload: usize) {
    fan_out_encoded(entry, payload, metrics, max_payload, |channel| {
        encode_message(channel, payload)
    });
}

/// Fans out a message of a resumable channel, with its position and the previous one.
fn fan_out_at(entry: &SubjectEntry, m: &Stored, prev: u64, metrics: &Metrics, max_payload: usize) {
    fan_out_encoded(entry, &m.payload, metrics, max_payload, |channel| {
        encode_message_at(channel, &m.payload, Some((m.seq, prev)))
    });
}

/// A subscriber left behind by a paced fan-out: its connection, channel, serial, and the
/// last position it was given.
type Behind = (Arc<ConnShared>, Arc<str>, u64, u64);

/// Fans out a message a gap fill read, never applying the slow-consumer policy: a
/// subscriber whose queue has no room leaves live delivery and is returned (it holds
/// everything up to `prev`). Called under the ring's lock.
fn fan_out_paced(entry: &SubjectEntry, m: &Stored, prev: u64) -> Vec<Behind> {
    let mut behind = Vec::new();
    let subs = read(&entry.subscribers);
    for sub in subs.values() {
        if !sub.live.load(Ordering::Acquire) {
            continue;
        }
        let one = [m.clone()];
        if let Queued::Upto(_) = queue_replay(&sub.conn, &sub.channel, prev, &one) {
            sub.live.store(false, Ordering::Release);
            behind.push((sub.conn.clone(), sub.channel.clone(), sub.serial, prev));
        }
    }
    behind
}

fn fan_out_encoded(
    entry: &SubjectEntry,
    payload: &[u8],
    metrics: &Metrics,
    max_payload: usize,
    encode: impl Fn(&str) -> String,
) {
    let received = Instant::now();
    let subs = read(&entry.subscribers);
    if payload.len() > max_payload {
        metrics.drop_msgs("too_large", subs.len() as u64);
        return;
    }
    // Usually every subscriber of a subject uses the same channel name: encode once per
    // distinct channel and share the bytes. The first encoding is held apart, so the usual
    // message allocates nothing but its frame.
    let mut first: Option<(&Arc<str>, Utf8Bytes)> = None;
    let mut others: Vec<(&Arc<str>, Utf8Bytes)> = Vec::new();
    let (mut dropped, mut slow) = (0u64, 0u64);
    // A subject with few subscribers (a personal channel) writes to each idle connection
    // itself; a broadcast leaves the writes to the connections' writers, which the runtime
    // spreads over its workers.
    let direct = subs.len() <= DIRECT_FAN_OUT;
    for sub in subs.values() {
        if !sub.live.load(Ordering::Acquire) {
            continue;
        }
        let bytes = match &first {
            None => {
                let b = Utf8Bytes::from(encode(&sub.channel));
                first = Some((&sub.channel, b.clone()));
                b
            }
            Some((c, b)) if **c == sub.channel => b.clone(),
            Some(_) => match others.iter().find(|(c, _)| **c == sub.channel) {
                Some((_, b)) => b.clone(),
                None => {
                    let b = Utf8Bytes::from(encode(&sub.channel));
                    others.push((&sub.channel, b.clone()));
                    b
                }
            },
        };
        let frame = Frame {
            msg: Message::Text(bytes),
            received: Some(received),
            channel: Some(sub.channel.clone()),
        };
        match sink::deliver(&sub.conn, frame, direct, metrics) {
            Delivery::Written | Delivery::Queued(Push::Queued | Push::Closed) => {}
            Delivery::Queued(Push::DroppedOldest) => dropped += 1,
            Delivery::Queued(Push::Overflow) => slow += 1,
        }
    }
    if dropped > 0 {
        metrics.drop_msgs("slow_consumer_drop_oldest", dropped);
    }
    if slow > 0 {
        metrics.slow_consumers.inc_by(slow);
        metrics.drop_msgs("slow_consumer_disconnect", slow);
    }
}

#[cfg(test)]
mod tests {
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
