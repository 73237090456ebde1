//! One session: a connection served over any transport that gives a `Sink<Message>` and a
//! `Stream` of `Message`s (the WebSocket, the SSE transport, or channels in a unit test).
//! A reader handles the client's frames and requests ([`reader`], [`requests`]); one writer
//! task drains the connection's queue, feeding many frames and flushing once ([`writer`]).
//! While the writer is idle with nothing queued, a fan-out may write a message itself
//! (`Conn::deliver`).
//!
//! Closing follows one sequence, described in `conn::close` and docs/protocol.md section 6:
//! whoever decides asks the outbox with a `Cause`; the writer flushes or is killed, sends the
//! close frame (bounded), and ends; the reader lingers for the client's close reply
//! (bounded); [`run`] unregisters and counts the close under its label.

pub mod auto;
pub mod reader;
pub mod requests;
pub mod server_subs;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use futures::{Sink, Stream};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use crate::conn::Conn;
use crate::conn::close::{Cause, End};
use crate::conn::sink::SharedSink;
use crate::metrics::Reason;
use crate::protocol;
use crate::state::Relay;

/// What the `welcome` says besides the relay's limits.
#[derive(Debug, Default)]
pub struct Welcome {
    /// What the connect step's backend replied.
    pub data: Option<Arc<str>>,
    /// Whether the connection the client named was resumed (when it named one).
    pub resumed: Option<bool>,
    /// The auto-subscriptions to make after it, when the connection asked for them.
    pub auto: Option<auto::AutoSubscribe>,
}

/// Runs a registered connection to its end over `sink` and `stream`, then unregisters it.
pub async fn run<Si, St>(
    sink: Si,
    stream: St,
    relay: Arc<Relay>,
    conn: Arc<Conn>,
    expires_at: Option<u64>,
    welcome: Welcome,
) where
    Si: Sink<Message, Error = tungstenite::Error> + Send + 'static,
    St: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let settings = relay.settings();
    let limits = settings.config.limits.clone();
    drop(settings);
    let sink = Arc::new(SharedSink::new(sink));
    conn.attach_sink(sink.clone());
    // The user's server-side subscriptions: named in the `welcome`, each confirmed next by
    // its `subscribed` frame (a client that had one and does not find it here knows it ended).
    let server_channels = server_subs::channels_for(&relay, &conn);
    conn.outbox
        .push_reply(Message::text(protocol::with_server_channels(
            protocol::with_data(
                protocol::encode_welcome(
                    limits.max_message_bytes,
                    conn.is_anonymous(),
                    &crate::events::connection_id(&relay.name, conn.id),
                    welcome.resumed,
                ),
                welcome.data.as_deref(),
            ),
            &server_channels,
        )));
    server_subs::on_admit(&relay, &conn, server_channels);
    if let Some(a) = welcome.auto {
        auto::on_admit(&relay, &conn, a);
    }
    let done = CancellationToken::new();
    // The writer is a task of its own: joined with the reader in one task, every delivery's
    // wake-up also polled the reader (its socket, idle and expiry timers, cancellation),
    // which cost more than the delivery's own user-space work. This task still waits for it.
    let writer = tokio::spawn({
        let (conn, relay, done) = (conn.clone(), relay.clone(), done.clone());
        let ping_every = Duration::from_secs(limits.ping_interval_seconds);
        let write_timeout = Duration::from_secs(limits.write_timeout_seconds);
        async move {
            let end = crate::task::catch(
                "writer",
                &relay.metrics,
                writer::write_loop(&sink, &conn, &relay.metrics, ping_every, write_timeout),
            )
            .await
            .unwrap_or(End::Closed(Cause::Internal));
            // The socket closes once both halves are gone: not kept open by fan-outs that
            // still hold the connection.
            sink.release();
            done.cancel();
            end
        }
    });
    // Whatever ended the reader, make sure the writer ends too (a no-op when a close was
    // requested already: the first request wins). A panic in a request's handling ends
    // this connection with 1011 and nothing else.
    let read = crate::task::catch(
        "reader",
        &relay.metrics,
        reader::read_loop(
            stream,
            &conn,
            &relay,
            &done,
            Duration::from_secs(limits.idle_timeout_seconds),
            expires_at,
        ),
    );
    let cause = match read.await {
        Some(()) => Cause::PeerGone,
        None => Cause::Internal,
    };
    conn.outbox.close(cause);
    let end = writer.await.unwrap_or(End::Closed(Cause::Internal));
    relay.unregister(&conn, end);
    relay
        .metrics
        .closed
        .get_or_create(&Reason {
            reason: end.label(),
        })
        .inc();
    tracing::debug!(conn = conn.id, reason = end.label(), "connection closed");
}

#[cfg(test)]
mod tests {
    //! A session over channels, no socket and no NATS server (the client retries a closed
    //! loopback port): what needs no NATS round trip.
    use super::*;
    use crate::config::{Config, SlowConsumerPolicy};
    use crate::conn::outbox::Outbox;
    use futures::channel::mpsc;
    use futures::{SinkExt, StreamExt};
    use serde_json::{Value, json};

    async fn relay(config: Config) -> Arc<Relay> {
        Relay::unconnected(config).await
    }

    /// A registered connection and its session's far ends: what the session writes, and
    /// where the test writes as the client.
    fn open(
        relay: &Arc<Relay>,
    ) -> (
        mpsc::Receiver<Message>,
        mpsc::Sender<Message>,
        tokio::task::JoinHandle<()>,
    ) {
        let (to_client, from_session) = mpsc::channel::<Message>(64);
        let (to_session, from_client) = mpsc::channel::<Message>(64);
        let outbox = Arc::new(Outbox::new(64, SlowConsumerPolicy::Disconnect));
        let conn = relay.register(outbox, None, None);
        let sink = to_client.sink_map_err(|_| tungstenite::Error::ConnectionClosed);
        let stream = from_client.map(Ok);
        let task = tokio::spawn(run(
            sink,
            stream,
            relay.clone(),
            conn,
            None,
            Welcome::default(),
        ));
        (from_session, to_session, task)
    }

    async fn next_json(rx: &mut mpsc::Receiver<Message>) -> Value {
        let within = Duration::from_secs(20);
        loop {
            match tokio::time::timeout(within, rx.next()).await {
                Ok(Some(Message::Text(t))) => return serde_json::from_str(&t).expect("JSON"),
                Ok(Some(_)) => {}
                other => panic!("no frame: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn requests_are_answered_and_a_client_close_ends_the_session() {
        let relay = relay(Config::example("nats://127.0.0.1:1")).await;
        let (mut rx, mut tx, task) = open(&relay);
        assert_eq!(next_json(&mut rx).await["type"], "welcome");

        tx.send(Message::text(r#"{"type":"ping","id":1}"#))
            .await
            .unwrap();
        assert_eq!(next_json(&mut rx).await, json!({"type": "pong", "id": 1}));

        tx.send(Message::text("not json")).await.unwrap();
        let e = next_json(&mut rx).await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_u64()),
            (Some("error"), Some(400))
        );

        tx.send(Message::Binary(vec![1, 2].into())).await.unwrap();
        assert_eq!(next_json(&mut rx).await["code"], 400);

        tx.send(Message::text(
            r#"{"type":"unsubscribe","id":2,"channel":"public.a"}"#,
        ))
        .await
        .unwrap();
        assert_eq!(next_json(&mut rx).await["code"], 404, "not subscribed");

        // A publish with NATS down: 503, and counted as a drop.
        let mut c = Config::example("nats://127.0.0.1:1");
        c.bindings[0].direction = crate::config::Direction::Both;
        let relay2 = self::relay(c).await;
        let (mut rx2, mut tx2, task2) = open(&relay2);
        next_json(&mut rx2).await;
        tx2.send(Message::text(
            r#"{"type":"publish","id":3,"channel":"public.a","payload":{}}"#,
        ))
        .await
        .unwrap();
        let e = next_json(&mut rx2).await;
        assert_eq!(
            (e["code"].as_u64(), e["reason"].as_str()),
            (Some(503), Some("NATS unavailable"))
        );
        drop(tx2);
        tokio::time::timeout(Duration::from_secs(20), task2)
            .await
            .unwrap()
            .unwrap();

        // The client's close: the session ends, unregistered, counted as `normal`.
        tx.send(Message::Close(None)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .unwrap()
            .unwrap();
        assert!(relay.connections().is_empty());
        let normal = relay
            .metrics
            .closed
            .get_or_create(&Reason { reason: "normal" })
            .get();
        assert_eq!(normal, 1);
    }

    #[tokio::test]
    async fn an_idle_client_is_closed_with_4000_after_its_queue_is_discarded() {
        let mut c = Config::example("nats://127.0.0.1:1");
        c.limits.idle_timeout_seconds = 1;
        c.limits.ping_interval_seconds = 60;
        let relay = relay(c).await;
        let (mut rx, tx, task) = open(&relay);
        assert_eq!(next_json(&mut rx).await["type"], "welcome");
        let close = tokio::time::timeout(Duration::from_secs(20), rx.next())
            .await
            .unwrap();
        match close {
            Some(Message::Close(Some(f))) => {
                assert_eq!(u16::from(f.code), 4000);
                assert_eq!(f.reason.as_str(), "idle timeout");
            }
            other => panic!("expected a close frame, got {other:?}"),
        }
        drop(tx);
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .unwrap()
            .unwrap();
        let idle = relay
            .metrics
            .closed
            .get_or_create(&Reason { reason: "idle" })
            .get();
        assert_eq!(idle, 1);
    }
}
