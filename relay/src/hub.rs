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
use crate::outbox::{Frame, Outbox, Push};
use crate::protocol::encode_message;

/// Subject of the round-trip request used to confirm a SUB (no one answers it).
const SYNC_SUBJECT: &str = "_WSRELAY.sync";

/// A connection's id, unique in the process.
pub type ConnId = u64;

#[derive(Debug, Clone)]
struct Subscriber {
    outbox: Arc<Outbox>,
    channel: Arc<str>,
}

#[derive(Debug)]
struct SubjectEntry {
    subscribers: RwLock<HashMap<ConnId, Subscriber>>,
    cancel: CancellationToken,
    ready: watch::Receiver<bool>,
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
    /// NATS subscription is in place (bounded wait), so a message published after the
    /// client's `ok` is delivered.
    pub async fn subscribe(&self, subject: &str, conn: ConnId, channel: &str, outbox: Arc<Outbox>) {
        let mut ready = {
            let mut subjects = lock(&self.subjects);
            let entry = subjects.entry(subject.to_owned()).or_insert_with(|| {
                let (tx, rx) = watch::channel(false);
                let entry = Arc::new(SubjectEntry {
                    subscribers: RwLock::new(HashMap::new()),
                    cancel: CancellationToken::new(),
                    ready: rx,
                });
                self.metrics.nats_subscriptions.inc();
                self.tasks.spawn(run_subject(
                    self.client.clone(),
                    subject.to_owned(),
                    entry.clone(),
                    tx,
                    self.metrics.clone(),
                    self.max_payload,
                ));
                entry
            });
            entry
                .subscribers
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(
                    conn,
                    Subscriber {
                        outbox,
                        channel: Arc::from(channel),
                    },
                );
            entry.ready.clone()
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|r| *r)).await;
    }

    /// Removes `conn` from `subject`; the NATS subscription goes with the last subscriber.
    pub fn unsubscribe(&self, subject: &str, conn: ConnId) {
        let mut subjects = lock(&self.subjects);
        let Some(entry) = subjects.get(subject) else {
            return;
        };
        let empty = {
            let mut subs = entry
                .subscribers
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            subs.remove(&conn);
            subs.is_empty()
        };
        if empty {
            entry.cancel.cancel();
            subjects.remove(subject);
            self.metrics.nats_subscriptions.dec();
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
}

async fn run_subject(
    client: async_nats::Client,
    subject: String,
    entry: Arc<SubjectEntry>,
    ready: watch::Sender<bool>,
    metrics: Arc<Metrics>,
    max_payload: usize,
) {
    let mut sub = match client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(%subject, error = %e, "NATS subscribe failed");
            let _ = ready.send(true);
            return;
        }
    };
    // Wait for a round trip through the server on this connection, so the SUB has been
    // processed before the client hears `ok`: a request nobody answers comes back as
    // "no responders" after the server has handled everything sent before it. Bounded, so
    // the `ok` is not held while NATS is down (the SUB is re-sent on reconnect).
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        client.request(SYNC_SUBJECT, bytes::Bytes::new()),
    )
    .await;
    let _ = ready.send(true);
    tracing::debug!(%subject, "NATS subscribed");
    loop {
        let msg = tokio::select! {
            () = entry.cancel.cancelled() => break,
            m = sub.next() => match m {
                Some(m) => m,
                None => break,
            },
        };
        fan_out(&entry, &msg.payload, &metrics, max_payload);
    }
    let _ = sub.unsubscribe().await;
    tracing::debug!(%subject, "NATS unsubscribed");
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
        match sub.outbox.push_message(Frame {
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
