//! A connection's write half, shared by its writer task and the fan-outs that write at once
//! (`Conn::deliver`): any `Sink<Message>` (a WebSocket's, or the SSE transport's). Frames
//! from both go through one lock into the sink, whole; what a fan-out cannot flush at once
//! is flushed by the writer, whose waker is the one registered with the socket.

use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use futures::Sink;
use tokio_tungstenite::tungstenite::{self, Message};

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
