//! The hub: one NATS subscription per distinct subject, shared by every local client
//! subscribed to it, reference-counted and removed with the last one.
//!
//! Each NATS message is encoded once per (subject, channel) and the same bytes are queued
//! to every recipient. async-nats resubscribes by itself after a reconnect.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::outbox::{Frame, Push};
use crate::protocol::{encode_message, encode_unsubscribed};
use crate::relay::ConnShared;

/// Subject of the round-trip request used to confirm a SUB (no one answers it).
const SYNC_SUBJECT: &str = "_WSRELAY.sync";

/// How long a subscribe waits for NATS to confirm the SUB before answering 503.
const CONFIRM_WITHIN: Duration = Duration::from_secs(2);

/// Why an entry ended when NATS refused it.
const REFUSED: &str = "refused by NATS";

/// A connection's id, unique in the process.
pub type ConnId = u64;

/// One local subscription: a connection and the channel name it subscribed with. A
/// connection may reach one subject through two channels (two bindings), and each gets
/// every message under its own name.
type SubKey = (ConnId, Arc<str>);

#[derive(Debug, Clone)]
struct Subscriber {
    conn: Arc<ConnShared>,
    channel: Arc<str>,
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
}

/// Why a subscription could not be put in place (the client hears 503).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// NATS refused, failed or did not confirm the subscription in time.
    #[error("NATS subscription {0}")]
    Unavailable(&'static str),
}

/// Subject to local subscribers.
#[derive(Debug)]
pub struct Hub {
    client: async_nats::Client,
    subjects: Mutex<HashMap<String, Arc<SubjectEntry>>>,
    metrics: Arc<Metrics>,
    max_payload: usize,
    tasks: TaskTracker,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Hub {
    /// A hub over `client`; NATS payloads above `max_payload` bytes are dropped.
    pub fn new(client: async_nats::Client, metrics: Arc<Metrics>, max_payload: usize) -> Self {
        Self {
            client,
            subjects: Mutex::new(HashMap::new()),
            metrics,
            max_payload,
            tasks: TaskTracker::new(),
        }
    }

    /// The NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Distinct subjects subscribed.
    pub fn subject_count(&self) -> usize {
        lock(&self.subjects).len()
    }

    /// Adds `conn` as a subscriber of `subject`, delivering as `channel`. Returns once the
    /// NATS subscription is confirmed by a round trip through the server, so a message
    /// published after the client's `ok` is delivered; or an error (and `conn` is not
    /// subscribed) when NATS refuses, fails or does not confirm within 2 s.
    pub async fn subscribe(
        self: &Arc<Self>,
        subject: &str,
        conn: &Arc<ConnShared>,
        channel: &str,
    ) -> Result<(), SubscribeError> {
        let channel: Arc<str> = Arc::from(channel);
        let key = (conn.id, channel.clone());
        let (entry, mut state) = {
            let mut subjects = lock(&self.subjects);
            let entry = subjects
                .entry(subject.to_owned())
                .or_insert_with(|| self.start_subject(subject))
                .clone();
            write(&entry.subscribers).insert(
                key.clone(),
                Subscriber {
                    conn: conn.clone(),
                    channel,
                },
            );
            let state = entry.state.subscribe();
            (entry, state)
        };
        let settled =
            tokio::time::timeout(CONFIRM_WITHIN, state.wait_for(|s| *s != State::Pending)).await;
        let outcome = match settled {
            Ok(Ok(s)) => match &*s {
                State::Live => Ok(()),
                State::Ended(why) => Err(SubscribeError::Unavailable(why)),
                State::Pending => Err(SubscribeError::Unavailable("not confirmed")),
            },
            Ok(Err(_)) => Err(SubscribeError::Unavailable("ended")),
            Err(_) => Err(SubscribeError::Unavailable("not confirmed in time")),
        };
        if outcome.is_err() {
            // Not confirmed: this subscriber leaves, and an entry that never went live is
            // ended so the next subscriber starts afresh instead of joining a dead one.
            write(&entry.subscribers).remove(&key);
            if *entry.state.borrow() == State::Pending {
                self.end(subject, &entry, "not confirmed in time");
            } else {
                self.release_if_empty(subject, &entry);
            }
        }
        outcome
    }

    fn start_subject(self: &Arc<Self>, subject: &str) -> Arc<SubjectEntry> {
        let (state, _) = watch::channel(State::Pending);
        let entry = Arc::new(SubjectEntry {
            subscribers: RwLock::new(HashMap::new()),
            cancel: CancellationToken::new(),
            state,
        });
        self.metrics.nats_subscriptions.inc();
        self.tasks
            .spawn(self.clone().run_subject(subject.to_owned(), entry.clone()));
        entry
    }

    /// Removes `conn`'s subscription to `subject` under `channel`; the NATS subscription
    /// goes with the last subscriber.
    pub fn unsubscribe(&self, subject: &str, conn: ConnId, channel: &str) {
        let Some(entry) = lock(&self.subjects).get(subject).cloned() else {
            return;
        };
        write(&entry.subscribers).remove(&(conn, Arc::from(channel)));
        self.release_if_empty(subject, &entry);
    }

    fn release_if_empty(&self, subject: &str, entry: &Arc<SubjectEntry>) {
        let mut subjects = lock(&self.subjects);
        // Checked under the map lock: a subscriber joining concurrently holds it too.
        if entry
            .subscribers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
            && subjects.get(subject).is_some_and(|e| Arc::ptr_eq(e, entry))
        {
            subjects.remove(subject);
            entry.cancel.cancel();
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

    /// Ends a subject: out of the map, its task stopped. Subscribers waiting for the
    /// confirmation hear the reason as an error; live ones lose the channel and get an
    /// `unsubscribed` notice, so no client stays subscribed to nothing.
    fn end(&self, subject: &str, entry: &Arc<SubjectEntry>, why: &'static str) {
        {
            let mut subjects = lock(&self.subjects);
            if subjects.get(subject).is_some_and(|e| Arc::ptr_eq(e, entry)) {
                subjects.remove(subject);
                self.metrics.nats_subscriptions.dec();
            }
        }
        entry.cancel.cancel();
        let was = entry.state.send_replace(State::Ended(why));
        let subscribers: Vec<Subscriber> =
            write(&entry.subscribers).drain().map(|(_, s)| s).collect();
        if was != State::Live {
            // Their `subscribe` calls answer the error.
            return;
        }
        for s in subscribers {
            let mut subs = s.conn.subs();
            if subs.get(&*s.channel).map(String::as_str) == Some(subject) {
                subs.remove(&*s.channel);
                drop(subs);
                s.conn.outbox.push_reply(Message::text(encode_unsubscribed(
                    &s.channel,
                    notice_reason(why),
                )));
            }
        }
    }

    /// Stops every subject task (at shutdown) and waits for them, bounded.
    pub async fn close(&self, within: Duration) {
        for entry in lock(&self.subjects).values() {
            entry.cancel.cancel();
        }
        self.tasks.close();
        let _ = tokio::time::timeout(within, self.tasks.wait()).await;
    }

    async fn run_subject(self: Arc<Self>, subject: String, entry: Arc<SubjectEntry>) {
        let mut sub = match self.client.subscribe(subject.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(%subject, error = %e, "NATS subscribe failed");
                self.end(&subject, &entry, "failed");
                return;
            }
        };
        // Wait for a round trip through the server on this connection, so the SUB has been
        // processed before the client hears `ok`: a request nobody answers comes back as
        // "no responders" after the server has handled everything sent before it. Bounded:
        // while NATS is unreachable the subscribe answers 503 rather than a hopeful `ok`.
        let confirmed = tokio::select! {
            () = entry.cancel.cancelled() => false,
            r = tokio::time::timeout(
                CONFIRM_WITHIN,
                self.client.request(SYNC_SUBJECT, bytes::Bytes::new()),
            ) => r.is_ok(),
        };
        if !confirmed {
            self.end(&subject, &entry, "not confirmed in time");
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
        tracing::debug!(%subject, "NATS subscribed");
        let ended = loop {
            let msg = tokio::select! {
                () = entry.cancel.cancelled() => break false,
                m = sub.next() => match m {
                    Some(m) => m,
                    None => break true,
                },
            };
            fan_out(&entry, &msg.payload, &self.metrics, self.max_payload);
        };
        if ended {
            // The client closed the subscription under us: tell its subscribers.
            tracing::warn!(%subject, "NATS subscription ended");
            self.end(&subject, &entry, "ended");
        }
        let _ = sub.unsubscribe().await;
        tracing::debug!(%subject, "NATS unsubscribed");
    }
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
    let received = Instant::now();
    let subs = entry
        .subscribers
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if payload.len() > max_payload {
        metrics.drop_msgs("too_large", subs.len() as u64);
        return;
    }
    // Usually every subscriber of a subject uses the same channel name: encode once per
    // distinct channel and share the bytes.
    let mut encoded: Vec<(&Arc<str>, Utf8Bytes)> = Vec::with_capacity(1);
    let (mut dropped, mut slow) = (0u64, 0u64);
    for sub in subs.values() {
        let bytes = match encoded.iter().find(|(c, _)| **c == sub.channel) {
            Some((_, b)) => b.clone(),
            None => {
                let b = Utf8Bytes::from(encode_message(&sub.channel, payload));
                encoded.push((&sub.channel, b.clone()));
                b
            }
        };
        match sub.conn.outbox.push_message(Frame {
            msg: Message::Text(bytes),
            received: Some(received),
        }) {
            Push::Queued | Push::Closed => {}
            Push::DroppedOldest => dropped += 1,
            Push::Overflow => slow += 1,
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
