//! The hub: one NATS subscription per distinct subject, shared by every local client
//! subscribed to it, reference-counted and removed with the last one. Each NATS message is
//! encoded once per (subject, channel) and the same bytes go to every recipient. async-nats
//! resubscribes by itself after a reconnect.
//!
//! - here: the subject map, subscribe and unsubscribe, each subject's task (NATS
//!   subscription, confirmation, its messages), how an entry ends;
//! - [`entry`]: one subject's entry and its subscribers;
//! - [`resumable`]: joining a resumable channel, live messages through the ring, gap
//!   fills, paced replays;
//! - [`deliver`]: the fan-out to the subscribers.
//!
//! The path of a message on a resumable channel, from NATS to the socket:
//! `fanout/mod.rs` (the subject's task takes it from the NATS subscription) →
//! `fanout/resumable.rs` (`Hub::deliver`: its position; `offer` locks the channel's ring,
//! `history/mod.rs`, and asks it, `history/ring.rs` `Ring::accept`: next, duplicate or gap)
//! → `fanout/deliver.rs` (`fan_out_at`: encoded once per channel, then per subscriber) →
//! `conn/mod.rs` (`Conn::deliver`: when the connection's writer is idle with nothing queued,
//! `conn/outbox.rs` grants the write, `conn/sink.rs` writes it at once, and the outbox is
//! told how it went; else the outbox queues it). A queued frame is then taken by
//! `session/writer.rs` and written to the sink. Each file is entered once, none from a file
//! it called; only the outbox is asked twice, by `Conn::deliver`, before and after the
//! write (one outbox call wrapping the write cost more CPU per delivery: see
//! docs/before-after.md). A plain channel's message skips `resumable.rs` and `history/`.

pub mod deliver;
pub mod entry;
pub mod resumable;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::Poll;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use entry::Target;
use entry::{State, SubjectEntry, Subscriber, lock, read, write};

use crate::conn::{Conn, ConnId};
use crate::history::{Resumable, Streams};
use crate::metrics::Metrics;
use crate::protocol::{RequestId, Since, encode_ok, encode_ok_not_recovered, with_data};
use crate::signal::Signal;

/// How long a subscribe waits for NATS to confirm the SUB before answering 503.
const CONFIRM_WITHIN: Duration = Duration::from_secs(2);

/// Why a subject's entry ended (its NATS subscription is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EndReason {
    /// NATS refused the subscription (permissions).
    #[error("refused by NATS")]
    Refused,
    /// The NATS subscribe failed, or the subject's task panicked.
    #[error("failed")]
    Failed,
    /// NATS did not confirm the SUB in time.
    #[error("not confirmed in time")]
    NotConfirmed,
    /// The NATS subscription ended.
    #[error("ended")]
    Ended,
    /// The stream no longer holds messages the channel missed.
    #[error("history hole")]
    HistoryHole,
    /// JetStream did not answer a gap fill in time.
    #[error("history unavailable")]
    HistoryUnavailable,
    /// The channel's stream was recreated (its positions are void).
    #[error("history stream recreated")]
    StreamRecreated,
}

impl EndReason {
    /// The `reason` of the `unsubscribed` notice: `forbidden` when NATS refused the subject
    /// (a retry would be refused again), `unavailable` otherwise (a later subscribe may
    /// succeed).
    pub fn notice(self) -> &'static str {
        match self {
            Self::Refused => "forbidden",
            _ => "unavailable",
        }
    }
}

/// Why a subscription could not be put in place (the client hears 503).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// NATS refused, failed or did not confirm the subscription in time.
    #[error("NATS subscription {0}")]
    Unavailable(EndReason),
    /// JetStream did not answer for the channel's history.
    #[error("history unavailable: {0}")]
    History(String),
    /// A config reload ended the subscription while it was being set up.
    #[error("the subscription ended while it was being set up")]
    Ended,
}

/// Queues a subscribe's `ok` in the hub's place, given its text: presence adds the
/// channel's members to it, atomically with registering the subscriber for their events.
pub type Answer<'a> = &'a (dyn Fn(String) + Send + Sync);

/// Queues the `ok`: by `answer` when given, else as a reply.
fn queue_ok(conn: &Conn, ok: String, answer: Option<Answer<'_>>) {
    match answer {
        Some(a) => a(ok),
        None => {
            conn.outbox.push_reply(Message::text(ok));
        }
    }
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

    /// Whether `key` is a resumable channel's subscription here: a client that leaves it
    /// resumes it elsewhere without a loss. False for a key not (or no longer) subscribed.
    pub fn is_resumable(&self, key: &str) -> bool {
        lock(&self.subjects)
            .get(key)
            .is_some_and(|e| e.resumable.is_some())
    }

    /// Subscribes `conn` to `target` as `channel` and queues the `ok` (for a resumable
    /// channel with its epoch and position, then the replay `since` asked for). Returns once
    /// the NATS subscription is confirmed by a round trip through the server, so a message
    /// published after the `ok` is delivered; or an error (and `conn` is not subscribed)
    /// when NATS refuses, fails or does not confirm within 2 s, or JetStream does not answer.
    /// `answer` queues the `ok` in the hub's place (see [`Answer`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn subscribe(
        self: &Arc<Self>,
        target: &Target,
        conn: &Arc<Conn>,
        channel: &str,
        id: Option<&RequestId>,
        since: Option<&Since>,
        data: Option<&str>,
        answer: Option<Answer<'_>>,
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
                    State::Ended(why) => Err(SubscribeError::Unavailable(*why)),
                    State::Pending => Err(SubscribeError::Unavailable(EndReason::NotConfirmed)),
                },
                Ok(Err(_)) => Err(SubscribeError::Unavailable(EndReason::Ended)),
                Err(_) => Err(SubscribeError::Unavailable(EndReason::NotConfirmed)),
            }
        };
        if outcome.is_ok() {
            outcome = match &entry.resumable {
                None => self.join_plain(&entry, target, conn, &channel, id, since, data, answer),
                Some(res) => {
                    self.join_resumable(
                        &entry, res, target, conn, &channel, id, since, data, answer,
                    )
                    .await
                }
            };
        }
        if outcome.is_err() {
            // Not joined: this subscriber leaves, and an entry that never went live is
            // ended so the next subscriber starts afresh instead of joining a dead one.
            write(&entry.subscribers).remove(&key);
            if *entry.state.borrow() == State::Pending {
                self.end(&target.key, &entry, EndReason::NotConfirmed);
            } else {
                self.release_if_empty(&target.key, &entry);
            }
        }
        outcome
    }

    /// A plain channel: the subscriber is live already; queue the `ok` unless a reload
    /// ended the subscription meanwhile.
    #[allow(clippy::too_many_arguments)]
    fn join_plain(
        &self,
        entry: &SubjectEntry,
        target: &Target,
        conn: &Conn,
        channel: &str,
        id: Option<&RequestId>,
        since: Option<&Since>,
        data: Option<&str>,
        answer: Option<Answer<'_>>,
    ) -> Result<(), SubscribeError> {
        let _subs = read(&entry.subscribers);
        if !conn.holds(channel, &target.key) {
            return Err(SubscribeError::Ended);
        }
        // A resume asked of a channel without history: nothing can be recovered.
        let ok = if since.is_some() {
            encode_ok_not_recovered(id)
        } else {
            encode_ok(id)
        };
        queue_ok(conn, with_data(ok, data), answer);
        Ok(())
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
                hub.end(&key, &e, EndReason::Failed);
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
            self.end(subject, &entry, EndReason::Refused);
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
            self.end(&key, &entry, EndReason::StreamRecreated);
        }
    }

    /// Ends a subject: out of the map, its task stopped. Subscribers waiting for the
    /// confirmation hear the reason as an error; live ones lose the channel and get an
    /// `unsubscribed` notice, so no client stays subscribed to nothing.
    fn end(&self, key: &str, entry: &Arc<SubjectEntry>, why: EndReason) {
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
            s.unsubscribed(key, why.notice());
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
                self.end(&key, &entry, EndReason::Failed);
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
            self.end(&key, &entry, EndReason::NotConfirmed);
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
                Some(None) => break Some(EndReason::Ended),
                Some(Some(m)) => m,
            };
            match &entry.resumable {
                None => deliver::fan_out(&entry, &msg.payload, &self.metrics, self.max_payload),
                Some(res) => {
                    if let Err(why) = self.deliver(&key, &entry, res, msg).await {
                        break Some(why);
                    }
                }
            }
        };
        if let Some(why) = ended {
            tracing::warn!(subject = %key, %why, "NATS subscription ended");
            self.end(&key, &entry, why);
        }
        let _ = sub.unsubscribe().await;
        tracing::debug!(subject = %key, "NATS unsubscribed");
    }
}
