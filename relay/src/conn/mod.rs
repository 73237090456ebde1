//! One open connection, whatever its transport, and nothing else: its identity, its
//! subscription map (this module holds the only code that changes it), its send queue
//! ([`outbox`]), how it closes ([`close`]), and its write half ([`sink`]) with the one
//! decision a fan-out makes per message: write now, or queue ([`Conn::deliver`]).

pub mod close;
pub mod outbox;
pub mod sink;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Instant;

use serde_json::{Map, Value};

use crate::metrics::Metrics;
use outbox::{Frame, Outbox, Push, Release};
use sink::{SharedSink, Written};

/// A connection's id, unique in the process.
pub type ConnId = u64;

/// What the rest of the relay knows about one open connection.
#[derive(Debug)]
pub struct Conn {
    /// Process-unique id.
    pub id: ConnId,
    /// When it opened, in milliseconds since the epoch.
    pub connected_at: u64,
    /// Its send queue.
    pub outbox: Arc<Outbox>,
    /// JWT claims; `None` when anonymous. A `refresh` replaces them ([`Conn::claims`]).
    claims: RwLock<Option<Arc<Map<String, Value>>>>,
    /// Channel to what it is subscribed to, for each subscription.
    subs: Mutex<HashMap<String, Held>>,
    /// Its write half, for fan-outs that write at once ([`Conn::deliver`]); set when its
    /// session starts (unset before: messages are queued).
    sink: OnceLock<Arc<SharedSink>>,
    /// Set when the connection ends, before its subscriptions are dropped: what is attached
    /// to them can tell a subscription that ended from one its connection took along.
    ended: Arc<AtomicBool>,
    /// Subscriptions made so far (each one's serial, for the lifecycle events' ids).
    serials: AtomicU64,
}

/// One subscription as the connection holds it.
#[derive(Debug)]
struct Held {
    /// The key (NATS subject) it is a subscription to.
    key: String,
    /// When its subscription token expires (Unix seconds); `None` without one.
    token_expires_at: Option<u64>,
    /// What ends with the subscription ([`Conn::attach`]).
    attached: Vec<Attached>,
    /// A server-side subscription (the backend's `subscribe`): the client cannot end it.
    by_server: bool,
}

impl Held {
    /// A new subscription to `key`, the client's own or (`by_server`) the backend's.
    fn new(key: &str, by_server: bool) -> Self {
        Self {
            key: key.to_owned(),
            token_expires_at: None,
            attached: Vec::new(),
            by_server,
        }
    }
}

/// Something that lives as long as a subscription (a presence membership): dropped with it,
/// whichever of the many ways the subscription ends (unsubscribe, close, expiry, a reload,
/// a refusal, NATS), so none of them can forget it. Dropped under the subscription map's
/// lock: a subscription to the same channel again is added only after its `Drop` ran.
pub struct Attached(pub Box<dyn Send + Sync>);

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Attached")
    }
}

/// Why a subscription could not be added to a connection's map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddError {
    /// The connection holds the channel already.
    #[error("already subscribed")]
    AlreadySubscribed,
    /// The connection holds `limits.maxSubscriptionsPerConnection` channels.
    #[error("too many subscriptions")]
    TooMany,
    /// The connection ended.
    #[error("the connection ended")]
    Ended,
}

/// What [`Conn::add_server_subscription`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerAdd {
    /// Recorded a new subscription: the caller sets it up.
    New,
    /// The client's own subscription to the channel is server-side from now on.
    TakenOver,
    /// It was server-side already.
    Held,
}

/// What became of a delivered frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Written by the caller, at once.
    Written,
    /// Queued for the writer (or refused), as [`Push`] says.
    Queued(Push),
}

impl Conn {
    /// A connection with `id`, its queue and its identity; not yet subscribed to anything.
    pub fn new(id: ConnId, outbox: Arc<Outbox>, claims: Option<Map<String, Value>>) -> Self {
        Self {
            id,
            connected_at: crate::clock::now_ms(),
            outbox,
            claims: RwLock::new(claims.map(Arc::new)),
            subs: Mutex::new(HashMap::new()),
            sink: OnceLock::new(),
            ended: Arc::new(AtomicBool::new(false)),
            serials: AtomicU64::new(0),
        }
    }

    /// The connection's claims now; `None` when anonymous.
    pub fn claims(&self) -> Option<Arc<Map<String, Value>>> {
        self.claims
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether the connection is anonymous (it never gets claims later).
    pub fn is_anonymous(&self) -> bool {
        self.claims().is_none()
    }

    /// Replaces the claims (a `refresh` of the same identity).
    pub fn set_claims(&self, claims: Map<String, Value>) {
        *self
            .claims
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(claims));
    }

    fn subs(&self) -> MutexGuard<'_, HashMap<String, Held>> {
        self.subs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The keys (NATS subjects) of its subscriptions.
    pub fn keys(&self) -> Vec<String> {
        self.subs().values().map(|h| h.key.clone()).collect()
    }

    /// Records a subscription to `key` as `channel`, at most `max` of them.
    pub fn add_subscription(&self, channel: &str, key: &str, max: usize) -> Result<(), AddError> {
        let mut subs = self.subs();
        if subs.contains_key(channel) {
            return Err(AddError::AlreadySubscribed);
        }
        if subs.len() >= max {
            return Err(AddError::TooMany);
        }
        subs.insert(channel.to_owned(), Held::new(key, false));
        Ok(())
    }

    /// Records a server-side subscription to `key` as `channel` (at most `max` in all), or
    /// makes the client's own subscription to `channel` server-side. Refused once the
    /// connection ended (its subscriptions were taken).
    pub fn add_server_subscription(
        &self,
        channel: &str,
        key: &str,
        max: usize,
    ) -> Result<ServerAdd, AddError> {
        let mut subs = self.subs();
        if self.ended.load(Ordering::SeqCst) {
            return Err(AddError::Ended);
        }
        if let Some(h) = subs.get_mut(channel) {
            if h.by_server {
                return Ok(ServerAdd::Held);
            }
            h.by_server = true;
            // A server-side subscription has no token to expire.
            h.token_expires_at = None;
            return Ok(ServerAdd::TakenOver);
        }
        if subs.len() >= max {
            return Err(AddError::TooMany);
        }
        subs.insert(channel.to_owned(), Held::new(key, true));
        Ok(ServerAdd::New)
    }

    /// Whether the connection holds `channel` as a server-side subscription.
    pub fn is_server_held(&self, channel: &str) -> bool {
        self.subs().get(channel).is_some_and(|h| h.by_server)
    }

    /// Forgets `channel` when it is a server-side subscription; returns its key.
    pub fn remove_server_subscription(&self, channel: &str) -> Option<String> {
        let mut subs = self.subs();
        if !subs.get(channel).is_some_and(|h| h.by_server) {
            return None;
        }
        subs.remove(channel).map(|h| h.key)
    }

    /// Attaches `what` to `channel`'s subscription to `key` (see [`Attached`]); gives it
    /// back when the connection no longer holds that subscription.
    pub fn attach(&self, channel: &str, key: &str, what: Attached) -> Result<(), Attached> {
        match self.subs().get_mut(channel) {
            Some(h) if h.key == key => {
                h.attached.push(what);
                Ok(())
            }
            _ => Err(what),
        }
    }

    /// Sets when `channel`'s subscription token expires, if it is (still) a subscription to
    /// `key`; returns whether it was.
    pub fn set_token_expiry(&self, channel: &str, key: &str, expires_at: u64) -> bool {
        match self.subs().get_mut(channel) {
            Some(h) if h.key == key => {
                h.token_expires_at = Some(expires_at);
                true
            }
            _ => false,
        }
    }

    /// When `channel`'s subscription token expires: `None` when the connection does not
    /// hold the channel, `Some(None)` when it holds it without a token.
    pub fn token_expiry(&self, channel: &str) -> Option<Option<u64>> {
        self.subs().get(channel).map(|h| h.token_expires_at)
    }

    /// The earliest subscription-token expiry (Unix seconds), if any subscription has one.
    pub fn next_token_expiry(&self) -> Option<u64> {
        self.subs()
            .values()
            .filter_map(|h| h.token_expires_at)
            .min()
    }

    /// Forgets the subscriptions whose token expired at or before `now`; returns them as
    /// (channel, key).
    pub fn take_expired(&self, now: u64) -> Vec<(String, String)> {
        let mut subs = self.subs();
        let expired: Vec<String> = subs
            .iter()
            .filter(|(_, h)| h.token_expires_at.is_some_and(|e| e <= now))
            .map(|(c, _)| c.clone())
            .collect();
        expired
            .into_iter()
            .filter_map(|c| subs.remove(&c).map(|h| (c, h.key)))
            .collect()
    }

    /// Whether `channel` is (still) a subscription to `key`: a reload or the hub may have
    /// ended it meanwhile, and the client may have subscribed to it again since.
    pub fn holds(&self, channel: &str, key: &str) -> bool {
        self.subs().get(channel).is_some_and(|h| h.key == key)
    }

    /// Forgets `channel` when it is a subscription to `key`; returns whether it was.
    pub fn remove_if(&self, channel: &str, key: &str) -> bool {
        let mut subs = self.subs();
        let held = subs.get(channel).is_some_and(|h| h.key == key);
        if held {
            subs.remove(channel);
        }
        held
    }

    /// Forgets `channel`; returns the key it was a subscription to.
    pub fn remove_subscription(&self, channel: &str) -> Option<String> {
        self.subs().remove(channel).map(|h| h.key)
    }

    /// Forgets every subscription (the connection closed); returns them as (channel, key).
    pub fn take_subscriptions(&self) -> Vec<(String, String)> {
        self.ended.store(true, Ordering::SeqCst);
        self.subs().drain().map(|(c, h)| (c, h.key)).collect()
    }

    /// A flag set once the connection ends (before its subscriptions are dropped).
    pub fn ended(&self) -> Arc<AtomicBool> {
        self.ended.clone()
    }

    /// The next subscription serial of this connection (1, 2, ...).
    pub fn next_serial(&self) -> u64 {
        self.serials.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The server-side subscriptions now, as (channel, key).
    pub fn server_subscriptions(&self) -> Vec<(String, String)> {
        self.subs()
            .iter()
            .filter(|(_, h)| h.by_server)
            .map(|(c, h)| (c.clone(), h.key.clone()))
            .collect()
    }

    /// The subscriptions now, as (channel, key).
    pub fn subscriptions(&self) -> Vec<(String, String)> {
        self.subs()
            .iter()
            .map(|(c, h)| (c.clone(), h.key.clone()))
            .collect()
    }

    /// Hands fan-outs the write half (once, when the session starts).
    pub fn attach_sink(&self, sink: Arc<SharedSink>) {
        let _ = self.sink.set(sink);
    }

    /// Delivers a message frame: written at once when the writer is idle with nothing
    /// queued and `direct` allows (the fan-out's choice), else queued. The frame's arrival
    /// time stands for the clock (a due ping goes with it).
    ///
    /// A message for a connection whose queue is empty and whose writer is idle (nearly
    /// every message of a personal channel) is written by the fan-out itself: one task
    /// wake-up and one poll of the writer fewer per delivery. What cannot be written at once
    /// stays in the sink's buffer, and the flush is handed to the writer. Order is kept by
    /// the outbox: the fan-out writes only when nothing is queued and the writer holds
    /// nothing it took (`Outbox::claim_direct`), and everything pushed meanwhile is queued
    /// behind.
    pub fn deliver(&self, frame: Frame, direct: bool, metrics: &Metrics) -> Delivery {
        let outbox = &self.outbox;
        let Some(sink) = self.sink.get().filter(|_| direct) else {
            return Delivery::Queued(outbox.push_message(frame));
        };
        let received = frame.received;
        let Some(ping) = outbox.claim_direct(received.unwrap_or_else(Instant::now)) else {
            return Delivery::Queued(outbox.push_message(frame));
        };
        let (written, ping_owed) = sink.write_now(ping, frame.msg, outbox.waker());
        match written {
            Written::NotTaken(msg) => {
                outbox.release_direct(Release::NotTaken, ping_owed);
                Delivery::Queued(outbox.push_message(Frame { msg, ..frame }))
            }
            written => {
                let how = match written {
                    Written::Flushed => Release::Done,
                    _ => Release::FlushOwed,
                };
                outbox.release_direct(how, ping_owed);
                if !matches!(written, Written::Failed) {
                    if let Some(t) = received {
                        metrics
                            .delivery_latency
                            .observe(Instant::now().saturating_duration_since(t).as_secs_f64());
                    }
                    metrics.delivered.inc();
                }
                Delivery::Written
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlowConsumerPolicy;
    use futures::StreamExt;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;

    fn frame(text: &str) -> Frame {
        Frame {
            msg: Message::text(text),
            received: Some(Instant::now()),
            channel: Some(Arc::from("c")),
        }
    }

    #[test]
    fn the_subscription_map_refuses_a_second_subscribe_and_more_than_the_maximum() {
        let conn = Conn::new(
            1,
            Arc::new(Outbox::new(8, SlowConsumerPolicy::DropOldest)),
            None,
        );
        assert_eq!(conn.add_subscription("a", "s.a", 2), Ok(()));
        assert_eq!(
            conn.add_subscription("a", "s.a", 2),
            Err(AddError::AlreadySubscribed)
        );
        assert_eq!(conn.add_subscription("b", "s.b", 2), Ok(()));
        assert_eq!(conn.add_subscription("c", "s.c", 2), Err(AddError::TooMany));
        assert!(conn.holds("a", "s.a"));
        assert!(!conn.remove_if("a", "s.other"), "another key: kept");
        assert!(conn.remove_if("a", "s.a"));
        assert!(!conn.holds("a", "s.a"));
        assert_eq!(conn.remove_subscription("b"), Some("s.b".into()));
        assert!(conn.take_subscriptions().is_empty());
    }

    /// Counts its drops.
    struct Probe(Arc<std::sync::atomic::AtomicUsize>);

    impl Drop for Probe {
        fn drop(&mut self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn what_is_attached_to_a_subscription_ends_with_it_whatever_ends_it() {
        let conn = Conn::new(
            1,
            Arc::new(Outbox::new(8, SlowConsumerPolicy::DropOldest)),
            None,
        );
        let dropped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let probe = || Attached(Box::new(Probe(dropped.clone())));
        let count = || dropped.load(std::sync::atomic::Ordering::SeqCst);
        for c in ["a", "b", "c", "d", "e"] {
            conn.add_subscription(c, &format!("s.{c}"), 8).unwrap();
            assert!(conn.attach(c, &format!("s.{c}"), probe()).is_ok());
        }
        // Not held (another key, or no such channel): given back, and dropped by the caller.
        assert!(conn.attach("a", "s.other", probe()).is_err());
        assert!(conn.attach("z", "s.z", probe()).is_err());
        assert_eq!(count(), 2);
        assert!(
            conn.remove_if("a", "s.a"),
            "unsubscribe, or ended by the relay"
        );
        assert_eq!(count(), 3);
        assert_eq!(conn.remove_subscription("b"), Some("s.b".into()));
        assert_eq!(count(), 4);
        conn.set_token_expiry("c", "s.c", 10);
        assert_eq!(conn.take_expired(10).len(), 1, "its token expired");
        assert_eq!(count(), 5);
        assert_eq!(conn.take_subscriptions().len(), 2, "the connection closed");
        assert_eq!(count(), 7);
    }

    #[test]
    fn subscription_tokens_expire_one_by_one() {
        let conn = Conn::new(
            1,
            Arc::new(Outbox::new(8, SlowConsumerPolicy::DropOldest)),
            None,
        );
        for c in ["a", "b", "c"] {
            conn.add_subscription(c, &format!("s.{c}"), 8).unwrap();
        }
        assert!(conn.set_token_expiry("a", "s.a", 100));
        assert!(conn.set_token_expiry("b", "s.b", 200));
        assert!(!conn.set_token_expiry("c", "s.other", 50), "another key");
        assert_eq!(conn.next_token_expiry(), Some(100));
        assert_eq!(conn.token_expiry("c"), Some(None));
        assert_eq!(conn.token_expiry("d"), None);
        assert_eq!(conn.take_expired(150), vec![("a".into(), "s.a".into())]);
        assert_eq!(conn.next_token_expiry(), Some(200));
        assert!(conn.holds("b", "s.b") && conn.holds("c", "s.c"));
    }

    #[tokio::test]
    async fn an_idle_connection_is_written_at_once_and_a_busy_one_queued() {
        let (server_io, client_io) = tokio::io::duplex(64 * 1024);
        let server = WebSocketStream::from_raw_socket(server_io, Role::Server, None).await;
        let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        let (sink, _stream) = server.split();
        let conn = Conn::new(
            1,
            Arc::new(Outbox::new(8, SlowConsumerPolicy::DropOldest)),
            None,
        );
        conn.attach_sink(Arc::new(SharedSink::new(sink)));
        let metrics = Metrics::new();

        // The writer has not looked at its queue yet: queued.
        assert_eq!(
            conn.deliver(frame("1"), true, &metrics),
            Delivery::Queued(Push::Queued)
        );
        assert_eq!(conn.outbox.take(8).frames.len(), 1);
        assert!(conn.outbox.take(8).is_idle(0), "the writer goes idle");
        // Idle: written by the caller, with the ping that is due.
        conn.outbox.start_pings(std::time::Duration::ZERO);
        assert_eq!(conn.deliver(frame("2"), true, &metrics), Delivery::Written);
        assert_eq!(client.next().await.unwrap().unwrap(), Message::text("2"));
        assert!(matches!(
            client.next().await.unwrap().unwrap(),
            Message::Ping(_)
        ));
        assert_eq!(metrics.delivered.get(), 1);
        // The fan-out may decline (a broadcast): queued.
        assert_eq!(
            conn.deliver(frame("3"), false, &metrics),
            Delivery::Queued(Push::Queued)
        );
        // Something queued: queued behind it, never ahead.
        assert_eq!(
            conn.deliver(frame("4"), true, &metrics),
            Delivery::Queued(Push::Queued)
        );
        assert_eq!(conn.outbox.take(8).frames.len(), 2);
    }
}
