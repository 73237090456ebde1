//! The SSE transport: a session's sink and stream over HTTP. The sink writes the relay's
//! frames as `data:` events into the response body, its heartbeat pings as SSE comments, and
//! its close frame as a `close` event; the stream yields the frames POSTed to the session,
//! a pong for each heartbeat the body took (an open event stream is a live client: it keeps
//! the session from idling out, as a WebSocket client's pong does), and the client's
//! leaving (the body dropped) as a close. No bridge task, no in-memory socket: the session
//! loop (`crate::session::run`) drives both.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::body::Bytes;
use futures::{Sink, Stream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::{CancellationToken, PollSender, WaitForCancellationFutureOwned};

use std::collections::BTreeMap;

use crate::protocol::{Position, close};
use crate::signal::Signal;

/// One SSE event holding `text` (split into `data:` lines: a frame's payload may hold line
/// breaks, which EventSource joins back with `\n`, equivalent JSON whitespace).
pub fn event(name: Option<&str>, text: &str) -> Bytes {
    event_with_id(name, None, text)
}

/// One SSE event with an `id:` line when `id` is given (an id holds no line break: the
/// relay writes it, `super::event_id`).
fn event_with_id(name: Option<&str>, id: Option<&str>, text: &str) -> Bytes {
    let mut out = String::with_capacity(text.len() + 16);
    if let Some(n) = name {
        out.push_str("event: ");
        out.push_str(n);
        out.push('\n');
    }
    if let Some(id) = id {
        out.push_str("id: ");
        out.push_str(id);
        out.push('\n');
    }
    for line in text.split(['\n', '\r']) {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

/// The `close` event: the close frame's code and reason.
pub fn close_event(code: u16, reason: &str) -> Bytes {
    event(
        Some("close"),
        &serde_json::json!({ "code": code, "reason": reason }).to_string(),
    )
}

/// The heartbeat: an SSE comment, which EventSource ignores.
const HEARTBEAT: &[u8] = b": ping\n\n";

/// What the sink tells the stream.
#[derive(Debug, Default)]
struct Shared {
    /// A heartbeat was handed to the body: the stream answers it with a pong.
    pong: Signal,
    pong_owed: AtomicBool,
    /// The close event was written: the stream ends (nothing more is read).
    closed: AtomicBool,
}

/// Builds a session's transport: the sink over the response body's channel, the stream over
/// the POST inbox. `gone` is cancelled when the response body is dropped (the client left).
/// `ids`: the session is auto-subscribed, and its events carry ids to resume from.
pub fn transport(
    body: mpsc::Sender<Bytes>,
    inbox: mpsc::Receiver<Message>,
    gone: CancellationToken,
    ids: bool,
) -> (SseSink, SseStream) {
    let shared = Arc::new(Shared::default());
    (
        SseSink {
            body: PollSender::new(body),
            shared: shared.clone(),
            positions: ids.then(BTreeMap::new),
        },
        SseStream {
            inbox,
            gone: Box::pin(gone.cancelled_owned()),
            left: false,
            shared,
        },
    )
}

/// The relay-to-client half.
#[derive(Debug)]
pub struct SseSink {
    body: PollSender<Bytes>,
    shared: Arc<Shared>,
    /// With event ids: the last position of each auto-subscribed resumable channel, as the
    /// frames written so far put them (their `subscribed`, then each `message`).
    positions: Option<BTreeMap<String, (String, u64)>>,
}

impl SseSink {
    /// The event id to write with `frame`: the positions after it, when it moved one.
    fn id_after(&mut self, frame: &str) -> Option<String> {
        let positions = self.positions.as_mut()?;
        match crate::protocol::position_of(frame)? {
            Position::Subscribed {
                channel,
                epoch,
                seq,
            } if super::event_id::carries(&channel) => {
                positions.insert(channel, (epoch, seq));
            }
            Position::Message { channel, seq } => match positions.get_mut(&channel) {
                Some(at) => at.1 = seq,
                None => return None,
            },
            Position::Subscribed { .. } => return None,
        }
        Some(super::event_id::encode(positions))
    }
}

impl Sink<Message> for SseSink {
    type Error = tungstenite::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // A body nobody reads any more takes everything: the stream reports the client's
        // leaving, and the session ends as a WebSocket's does when its client goes.
        match self.body.poll_reserve(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn start_send(mut self: Pin<&mut Self>, msg: Message) -> Result<(), Self::Error> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(tungstenite::Error::AlreadyClosed);
        }
        let chunk = match &msg {
            Message::Text(t) => {
                let id = self.id_after(t.as_str());
                event_with_id(None, id.as_deref(), t.as_str())
            }
            Message::Ping(_) => Bytes::from_static(HEARTBEAT),
            Message::Close(frame) => {
                let (code, reason) = frame
                    .as_ref()
                    .map(|f| (u16::from(f.code), f.reason.as_str()))
                    .unwrap_or((close::NORMAL, ""));
                close_event(code, reason)
            }
            // The relay sends no other kind.
            Message::Binary(_) | Message::Pong(_) | Message::Frame(_) => return Ok(()),
        };
        let sent = self.body.send_item(chunk).is_ok();
        match msg {
            Message::Ping(_) if sent => {
                self.shared.pong_owed.store(true, Ordering::Release);
                self.shared.pong.notify();
            }
            Message::Close(_) => {
                self.shared.closed.store(true, Ordering::Release);
                self.shared.pong.notify();
                // The body ends after the close event.
                self.body.close();
            }
            _ => {}
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each chunk is handed to the response body as it is sent; hyper writes it out.
        Poll::Ready(Ok(()))
    }

    fn poll_close(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Result<(), Self::Error>> {
        self.body.close();
        Poll::Ready(Ok(()))
    }
}

/// The client-to-relay half.
pub struct SseStream {
    inbox: mpsc::Receiver<Message>,
    gone: Pin<Box<WaitForCancellationFutureOwned>>,
    left: bool,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SseStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SseStream")
    }
}

impl Stream for SseStream {
    type Item = Result<Message, tungstenite::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.left || self.shared.closed.load(Ordering::Acquire) {
            return Poll::Ready(None);
        }
        if self.gone.as_mut().poll(cx).is_ready() {
            // The client left: a WebSocket client would have sent its close.
            self.left = true;
            return Poll::Ready(Some(Ok(Message::Close(None))));
        }
        if self.shared.pong.poll_wait(cx).is_ready() {
            if self.shared.closed.load(Ordering::Acquire) {
                return Poll::Ready(None);
            }
            if self.shared.pong_owed.swap(false, Ordering::AcqRel) {
                return Poll::Ready(Some(Ok(Message::Pong(Default::default()))));
            }
        }
        self.inbox.poll_recv(cx).map(|m| m.map(Ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;

    #[tokio::test]
    async fn frames_become_events_heartbeats_pongs_and_a_close_ends_both_halves() {
        let (body_tx, mut body_rx) = mpsc::channel(8);
        let (inbox_tx, inbox_rx) = mpsc::channel(8);
        let gone = CancellationToken::new();
        let (mut sink, mut stream) = transport(body_tx, inbox_rx, gone.clone(), false);

        sink.send(Message::text("{\"a\":\n1}")).await.unwrap();
        assert_eq!(
            &body_rx.recv().await.unwrap()[..],
            b"data: {\"a\":\ndata: 1}\n\n"
        );
        sink.send(Message::Ping(Default::default())).await.unwrap();
        assert_eq!(&body_rx.recv().await.unwrap()[..], HEARTBEAT);
        assert!(matches!(stream.next().await, Some(Ok(Message::Pong(_)))));
        inbox_tx.send(Message::text("posted")).await.unwrap();
        assert_eq!(
            stream.next().await.unwrap().unwrap(),
            Message::text("posted")
        );

        let frame = CloseFrame {
            code: 4000.into(),
            reason: "idle timeout".into(),
        };
        sink.send(Message::Close(Some(frame))).await.unwrap();
        assert_eq!(
            &body_rx.recv().await.unwrap()[..],
            &close_event(4000, "idle timeout")[..]
        );
        assert!(
            body_rx.recv().await.is_none(),
            "the body ends after the close event"
        );
        assert!(
            stream.next().await.is_none(),
            "the stream ends after the close"
        );
        assert!(sink.send(Message::text("late")).await.is_err());
    }

    #[tokio::test]
    async fn an_auto_subscribed_sessions_events_carry_the_positions_to_resume_from() {
        let (body_tx, mut body_rx) = mpsc::channel(8);
        let (_inbox_tx, inbox_rx) = mpsc::channel(8);
        let (mut sink, _stream) = transport(body_tx, inbox_rx, CancellationToken::new(), true);
        let mut next = async || String::from_utf8(body_rx.recv().await.unwrap().to_vec()).unwrap();
        let subscribed = r#"{"type":"subscribed","channel":"n","auto":true,"epoch":"e1","seq":4}"#;
        sink.send(Message::text(subscribed)).await.unwrap();
        assert_eq!(next().await, format!("id: n:e1:4\ndata: {subscribed}\n\n"));
        let m = crate::protocol::encode_message_at("n", b"1", Some((9, 4)));
        sink.send(Message::text(m.clone())).await.unwrap();
        assert_eq!(next().await, format!("id: n:e1:9\ndata: {m}\n\n"));
        // Frames of other channels and without positions carry none.
        let other = crate::protocol::encode_message_at("o", b"1", Some((10, 9)));
        sink.send(Message::text(other.clone())).await.unwrap();
        assert_eq!(next().await, format!("data: {other}\n\n"));
        sink.send(Message::text("{\"type\":\"pong\"}"))
            .await
            .unwrap();
        assert_eq!(next().await, "data: {\"type\":\"pong\"}\n\n");
    }

    #[tokio::test]
    async fn the_client_leaving_reads_as_a_close() {
        let (body_tx, body_rx) = mpsc::channel(8);
        let (_inbox_tx, inbox_rx) = mpsc::channel(8);
        let gone = CancellationToken::new();
        let (mut sink, mut stream) = transport(body_tx, inbox_rx, gone.clone(), false);
        drop(body_rx);
        gone.cancel();
        assert!(matches!(
            stream.next().await,
            Some(Ok(Message::Close(None)))
        ));
        assert!(stream.next().await.is_none());
        // Writes after the client left go nowhere, without failing the writer first.
        sink.send(Message::text("x")).await.unwrap();
    }

    /// The session over this transport, with a relay that needs no NATS server.
    async fn session(
        idle: u64,
        ping: u64,
    ) -> (
        Arc<crate::state::Relay>,
        mpsc::Receiver<Bytes>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
        mpsc::Sender<Message>,
    ) {
        let mut c = crate::config::Config::example("nats://127.0.0.1:1");
        c.limits.idle_timeout_seconds = idle;
        c.limits.ping_interval_seconds = ping;
        let relay = crate::state::Relay::unconnected(c).await;
        let outbox = Arc::new(crate::conn::outbox::Outbox::new(
            64,
            crate::config::SlowConsumerPolicy::Disconnect,
        ));
        let conn = relay.register(outbox, None, None);
        let (body_tx, body_rx) = mpsc::channel(16);
        let (inbox_tx, inbox_rx) = mpsc::channel(16);
        let gone = CancellationToken::new();
        let (sink, stream) = transport(body_tx, inbox_rx, gone.clone(), false);
        let task = tokio::spawn(crate::session::run(
            sink,
            stream,
            relay.clone(),
            conn,
            None,
            crate::session::Welcome::default(),
        ));
        (relay, body_rx, gone, task, inbox_tx)
    }

    /// Chunks until the body ends, bounded.
    async fn body_until_end(
        rx: &mut mpsc::Receiver<Bytes>,
        within: std::time::Duration,
    ) -> Vec<Bytes> {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(within, async {
            while let Some(b) = rx.recv().await {
                out.push(b);
            }
        })
        .await;
        out
    }

    #[tokio::test]
    async fn a_session_whose_stream_takes_heartbeats_is_not_idle_and_one_that_gets_none_is_closed()
    {
        // Heartbeats every second, idle after two: the pongs the transport gives for them
        // keep the session open.
        let (relay, mut body, _gone, task, _inbox) = session(2, 1).await;
        let seen = body_until_end(&mut body, std::time::Duration::from_secs(5)).await;
        assert!(
            !task.is_finished(),
            "closed while its stream took heartbeats: {seen:?}"
        );
        assert!(
            seen.iter().filter(|b| &b[..] == HEARTBEAT).count() >= 3,
            "{seen:?}"
        );
        assert_eq!(relay.connections().len(), 1);

        // No heartbeat before the idle timeout: closed with 4000, the close event last.
        let (relay, mut body, _gone, task, _inbox) = session(1, 60).await;
        let seen = body_until_end(&mut body, std::time::Duration::from_secs(20)).await;
        assert_eq!(
            seen.last().map(|b| &b[..]),
            Some(&close_event(4000, "idle timeout")[..])
        );
        tokio::time::timeout(std::time::Duration::from_secs(20), task)
            .await
            .unwrap()
            .unwrap();
        assert!(relay.connections().is_empty());
    }

    #[tokio::test]
    async fn a_client_that_leaves_ends_its_session_as_a_normal_close() {
        let (relay, body, gone, task, _inbox) = session(60, 60).await;
        drop(body);
        gone.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(20), task)
            .await
            .unwrap()
            .unwrap();
        let normal = relay
            .metrics
            .closed
            .get_or_create(&crate::metrics::Reason { reason: "normal" })
            .get();
        assert_eq!(normal, 1);
        assert!(relay.connections().is_empty());
    }
}
