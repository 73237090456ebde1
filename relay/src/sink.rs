//! A WebSocket connection's write half, shared by its writer task and the hub's fan-out.
//!
//! The writer task drains the connection's queue. But a message for a connection whose queue
//! is empty and whose writer is idle (nearly every message of a personal channel) is written
//! by the fan-out itself, at once: one task wake-up and one poll of the writer fewer per
//! delivery (see [`deliver`]). What cannot be written at once stays in tungstenite's buffer,
//! and the flush is handed to the writer: its waker is the one registered with the socket.
//!
//! Order is kept by the outbox: the fan-out writes only when nothing is queued and the writer
//! holds nothing it took (`Outbox::claim_direct`), and everything pushed meanwhile is queued
//! behind. Frames from both go through one lock into tungstenite, whole.

use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use futures::Sink;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::metrics::Metrics;
use crate::outbox::{Frame, Push, Release};
use crate::relay::ConnShared;

type WsSink = Pin<Box<dyn Sink<Message, Error = tungstenite::Error> + Send>>;

/// The write half, locked for each poll (never across an await).
pub struct SharedSink(Mutex<Option<WsSink>>);

impl std::fmt::Debug for SharedSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedSink")
    }
}

/// What one attempt to write at once did.
#[derive(Debug)]
pub enum Written {
    /// Written and flushed to the socket.
    Flushed,
    /// Taken, but part of it waits in the buffer: the writer must flush.
    Buffered,
    /// Not taken (the sink is busy or gone): queue it.
    NotTaken(Message),
    /// The sink failed: the writer's next flush finds out and ends the connection.
    Failed,
}

fn sink_error() -> tungstenite::Error {
    tungstenite::Error::AlreadyClosed
}

impl SharedSink {
    /// Shares `sink`.
    pub fn new(sink: impl Sink<Message, Error = tungstenite::Error> + Send + 'static) -> Self {
        Self(Mutex::new(Some(Box::pin(sink))))
    }

    fn lock(&self) -> MutexGuard<'_, Option<WsSink>> {
        // A panic while holding this lock leaves tungstenite's state as it was.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops the write half (the socket closes once the read half is gone too).
    pub fn release(&self) {
        drop(self.lock().take());
    }

    fn poll_feed(
        &self,
        cx: &mut Context<'_>,
        msg: &mut Option<Message>,
    ) -> Poll<Result<(), tungstenite::Error>> {
        let mut guard = self.lock();
        let Some(s) = guard.as_mut() else {
            return Poll::Ready(Err(sink_error()));
        };
        match s.as_mut().poll_ready(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        match msg.take() {
            Some(m) => Poll::Ready(s.as_mut().start_send(m)),
            None => Poll::Ready(Ok(())),
        }
    }

    /// Buffers `msg` (waiting for room).
    pub async fn feed(&self, msg: Message) -> Result<(), tungstenite::Error> {
        let mut msg = Some(msg);
        std::future::poll_fn(|cx| self.poll_feed(cx, &mut msg)).await
    }

    /// Writes out what is buffered.
    pub async fn flush(&self) -> Result<(), tungstenite::Error> {
        std::future::poll_fn(|cx| match self.lock().as_mut() {
            Some(s) => s.as_mut().poll_flush(cx),
            None => Poll::Ready(Err(sink_error())),
        })
        .await
    }

    /// Feeds and flushes `msg`.
    pub async fn send(&self, msg: Message) -> Result<(), tungstenite::Error> {
        self.feed(msg).await?;
        self.flush().await
    }

    /// Writes `msg` (and a ping after it when `ping`) without waiting; `waker` (the
    /// writer's) is woken when a flush left to the writer can go on. The second value says
    /// the ping was not taken.
    pub fn write_now(&self, ping: bool, msg: Message, waker: &Waker) -> (Written, bool) {
        let mut cx = Context::from_waker(waker);
        let mut guard = self.lock();
        let Some(s) = guard.as_mut() else {
            return (Written::NotTaken(msg), ping);
        };
        // Not ready: the reader holds the stream (its lock), or earlier bytes wait.
        if !matches!(s.as_mut().poll_ready(&mut cx), Poll::Ready(Ok(()))) {
            return (Written::NotTaken(msg), ping);
        }
        if s.as_mut().start_send(msg).is_err() {
            return (Written::Failed, ping);
        }
        // Each item needs its own `poll_ready` (a split sink holds one item at a time).
        let ping_owed = ping
            && !(matches!(s.as_mut().poll_ready(&mut cx), Poll::Ready(Ok(())))
                && s.as_mut()
                    .start_send(Message::Ping(Default::default()))
                    .is_ok());
        let written = match s.as_mut().poll_flush(&mut cx) {
            Poll::Ready(Ok(())) => Written::Flushed,
            Poll::Pending => Written::Buffered,
            Poll::Ready(Err(_)) => Written::Failed,
        };
        (written, ping_owed)
    }
}

/// What became of a delivered frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Written by the caller, at once.
    Written,
    /// Queued for the writer (or refused), as [`Push`] says.
    Queued(Push),
}

/// Delivers a message frame to `conn`: written at once when its writer is idle with nothing
/// queued and `direct` allows (the fan-out's choice), else queued. The frame's arrival time
/// stands for the clock (a due ping goes with it).
pub fn deliver(conn: &ConnShared, frame: Frame, direct: bool, metrics: &Metrics) -> Delivery {
    let outbox = &conn.outbox;
    let Some(sink) = conn.sink.get().filter(|_| direct) else {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SlowConsumerPolicy;
    use crate::outbox::Outbox;
    use futures::StreamExt;
    use std::sync::Arc;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    fn frame(text: &str) -> Frame {
        Frame {
            msg: Message::text(text),
            received: Some(Instant::now()),
            channel: Some(Arc::from("c")),
        }
    }

    #[tokio::test]
    async fn an_idle_connection_is_written_at_once_and_a_busy_one_queued() {
        let (server_io, client_io) = tokio::io::duplex(64 * 1024);
        let server = WebSocketStream::from_raw_socket(server_io, Role::Server, None).await;
        let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        let (sink, _stream) = server.split();
        let conn = ConnShared {
            id: 1,
            outbox: Arc::new(Outbox::new(8, SlowConsumerPolicy::DropOldest)),
            subs: Default::default(),
            claims: None,
            sink: std::sync::OnceLock::new(),
        };
        conn.sink.set(Arc::new(SharedSink::new(sink))).unwrap();
        let metrics = Metrics::new();

        // The writer has not looked at its queue yet: queued.
        assert_eq!(
            deliver(&conn, frame("1"), true, &metrics),
            Delivery::Queued(Push::Queued)
        );
        assert_eq!(conn.outbox.take(8).frames.len(), 1);
        assert!(conn.outbox.take(8).is_idle(0), "the writer goes idle");
        // Idle: written by the caller, with the ping that is due.
        conn.outbox.start_pings(std::time::Duration::ZERO);
        assert_eq!(
            deliver(&conn, frame("2"), true, &metrics),
            Delivery::Written
        );
        assert_eq!(client.next().await.unwrap().unwrap(), Message::text("2"));
        assert!(matches!(
            client.next().await.unwrap().unwrap(),
            Message::Ping(_)
        ));
        assert_eq!(metrics.delivered.get(), 1);
        // The fan-out may decline (a broadcast): queued.
        assert_eq!(
            deliver(&conn, frame("3"), false, &metrics),
            Delivery::Queued(Push::Queued)
        );
        // Something queued: queued behind it, never ahead.
        assert_eq!(
            deliver(&conn, frame("4"), true, &metrics),
            Delivery::Queued(Push::Queued)
        );
        assert_eq!(conn.outbox.take(8).frames.len(), 2);
    }
}
