//! A subject's entry in the hub: its subscribers (connection and channel), where its NATS
//! subscription stands, its history ring for a resumable channel, and why it ended.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::authz::Resolved;
use crate::config::History;
use crate::conn::{Conn, ConnId};
use crate::history::{Resumable, stream};
use crate::protocol::encode_unsubscribed;
use crate::signal::Signal;

/// One local subscription: a connection and the channel name it subscribed with. A
/// connection may reach one subject through two channels (two bindings), and each gets
/// every message under its own name.
pub(super) type SubKey = (ConnId, Arc<str>);

#[derive(Debug)]
pub(super) struct Subscriber {
    pub(super) conn: Arc<Conn>,
    pub(super) channel: Arc<str>,
    /// Receives live messages (a resumable subscriber is joined, not yet live, until its
    /// replay is queued).
    pub(super) live: AtomicBool,
    /// Unique in the hub: a paced replay serves this subscriber, not a later one of the
    /// same connection and channel.
    pub(super) serial: u64,
}

impl Subscriber {
    /// The relay ended this subscription to `key`: the connection forgets it (unless it has
    /// subscribed to the channel again since) and hears an `unsubscribed` notice.
    pub(super) fn unsubscribed(&self, key: &str, reason: &str) {
        if self.conn.remove_if(&self.channel, key) {
            self.conn
                .outbox
                .push_reply(Message::text(encode_unsubscribed(&self.channel, reason)));
        }
    }
}

/// Where a subject's NATS subscription stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum State {
    /// SUB sent, not yet confirmed by a round trip.
    Pending,
    /// In place: messages flow.
    Live,
    /// Refused, failed or ended; the entry has left the map.
    Ended(super::EndReason),
}

#[derive(Debug)]
pub(super) struct SubjectEntry {
    pub(super) subscribers: RwLock<HashMap<SubKey, Subscriber>>,
    pub(super) cancel: CancellationToken,
    pub(super) state: watch::Sender<State>,
    /// Set for a resumable channel.
    pub(super) resumable: Option<Arc<Resumable>>,
    /// Set to make a resumable entry's task read what it may have missed (NATS
    /// reconnected).
    pub(super) resync: AtomicBool,
    /// Wakes the entry's task for `cancel` or `resync`. Polled before every message: a
    /// `Signal` costs two atomic swaps there, where the token's and a `Notify`'s waiters took
    /// a lock each (about 500 instructions per delivery).
    pub(super) control: Signal,
}

impl SubjectEntry {
    /// Stops the entry's task.
    pub(super) fn stop(&self) {
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

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(super) fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(super) fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}
