//! A connection's bounded send queue, filled by the hub and the reader, drained by the
//! connection's single writer task.
//!
//! A plain `VecDeque` under a short lock rather than a channel, because the drop-oldest
//! policy needs to remove from the front. An idle connection's queue holds no allocation.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::config::SlowConsumerPolicy;

/// One frame waiting to be written.
#[derive(Debug)]
pub struct Frame {
    /// The WebSocket message (shares its bytes with other connections' frames).
    pub msg: Message,
    /// When the NATS message arrived (for the latency histogram); `None` for replies.
    pub received: Option<Instant>,
}

/// What happened to a pushed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued.
    Queued,
    /// Queued after dropping the oldest queued message (policy `dropOldest`).
    DroppedOldest,
    /// Queue full under policy `disconnect`: the connection is being closed.
    Overflow,
    /// The connection is closing; nothing was queued.
    Closed,
}

/// A close requested by anyone; the writer sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseRequest {
    /// WebSocket close code.
    pub code: u16,
    /// Close reason (short, for people).
    pub reason: &'static str,
    /// Write what is queued before closing (drain), or not (slow consumer).
    pub flush_first: bool,
}

#[derive(Debug, Default)]
struct Inner {
    queue: VecDeque<Frame>,
    /// Messages (not replies) in `queue`.
    messages: usize,
    dropped_unreported: u64,
    close: Option<CloseRequest>,
}

/// Extra room for replies beyond the message capacity, so replies are not dropped; a
/// client that makes requests without reading still hits it and is closed.
const REPLY_ROOM: usize = 64;

/// The bounded send queue of one connection.
#[derive(Debug)]
pub struct Outbox {
    inner: Mutex<Inner>,
    notify: Notify,
    capacity: usize,
    policy: SlowConsumerPolicy,
    /// Cancelled by a close that must not wait for the queue (slow consumer): interrupts
    /// a writer blocked on a full socket.
    kill: CancellationToken,
}

/// What the writer takes in one go.
#[derive(Debug, Default)]
pub struct Batch {
    /// Frames to write, in order.
    pub frames: Vec<Frame>,
    /// Messages dropped (drop-oldest) since the last batch: tell the client.
    pub dropped: u64,
    /// Close after writing (or instead of writing, when `flush_first` is false).
    pub close: Option<CloseRequest>,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    // A panic while holding this lock cannot leave the queue inconsistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Outbox {
    /// An empty queue of `capacity` messages.
    pub fn new(capacity: usize, policy: SlowConsumerPolicy) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            capacity: capacity.max(1),
            policy,
            kill: CancellationToken::new(),
        }
    }

    /// Queues a message (subject to the slow-consumer policy).
    pub fn push_message(&self, frame: Frame) -> Push {
        let mut g = lock(&self.inner);
        if g.close.is_some() {
            return Push::Closed;
        }
        let mut result = Push::Queued;
        if g.messages >= self.capacity {
            match self.policy {
                SlowConsumerPolicy::Disconnect => {
                    g.close = Some(CloseRequest {
                        code: crate::protocol::close::SLOW_CONSUMER,
                        reason: "slow consumer",
                        flush_first: false,
                    });
                    drop(g);
                    self.kill.cancel();
                    self.notify.notify_one();
                    return Push::Overflow;
                }
                SlowConsumerPolicy::DropOldest => {
                    if let Some(pos) = g.queue.iter().position(|f| f.received.is_some()) {
                        g.queue.remove(pos);
                        g.messages -= 1;
                        g.dropped_unreported += 1;
                        result = Push::DroppedOldest;
                    }
                }
            }
        }
        g.queue.push_back(frame);
        g.messages += 1;
        drop(g);
        self.notify.notify_one();
        result
    }

    /// Queues a reply or notice. Returns false (and asks for a close) if the client makes
    /// requests without reading its replies.
    pub fn push_reply(&self, msg: Message) -> bool {
        let mut g = lock(&self.inner);
        if g.close.is_some() {
            return false;
        }
        if g.queue.len() >= self.capacity + REPLY_ROOM {
            g.close = Some(CloseRequest {
                code: crate::protocol::close::SLOW_CONSUMER,
                reason: "slow consumer",
                flush_first: false,
            });
            drop(g);
            self.kill.cancel();
            self.notify.notify_one();
            return false;
        }
        g.queue.push_back(Frame {
            msg,
            received: None,
        });
        drop(g);
        self.notify.notify_one();
        true
    }

    /// Asks the writer to close; the first request wins.
    pub fn close(&self, req: CloseRequest) {
        let mut g = lock(&self.inner);
        if g.close.is_none() {
            if !req.flush_first {
                self.kill.cancel();
            }
            g.close = Some(req);
        }
        drop(g);
        self.notify.notify_one();
    }

    /// Whether a close was requested.
    pub fn is_closing(&self) -> bool {
        lock(&self.inner).close.is_some()
    }

    /// Takes up to `max` frames.
    pub fn take(&self, max: usize) -> Batch {
        let mut frames = Vec::new();
        let mut batch = self.take_into(max, &mut frames);
        batch.frames = frames;
        batch
    }

    /// Takes up to `max` frames into `frames` (cleared first, its allocation reused: the
    /// writer calls this once per wake-up); the returned batch's own `frames` is empty.
    pub fn take_into(&self, max: usize, frames: &mut Vec<Frame>) -> Batch {
        frames.clear();
        let mut g = lock(&self.inner);
        let n = g.queue.len().min(max);
        frames.extend(g.queue.drain(..n));
        g.messages -= frames.iter().filter(|f| f.received.is_some()).count();
        let dropped = std::mem::take(&mut g.dropped_unreported);
        let close = match &g.close {
            Some(c) if !c.flush_first || g.queue.is_empty() => Some(c.clone()),
            _ => None,
        };
        drop(g);
        if close.as_ref().is_some_and(|c| !c.flush_first) {
            frames.clear();
        }
        Batch {
            frames: Vec::new(),
            dropped,
            close,
        }
    }

    /// Resolves when a close that must not wait for the queue was requested.
    pub async fn killed(&self) {
        self.kill.cancelled().await;
    }

    /// The close request, if any.
    pub fn close_request(&self) -> Option<CloseRequest> {
        lock(&self.inner).close.clone()
    }

    /// Waits until something was pushed or a close was requested.
    pub async fn wait(&self) {
        self.notify.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: usize) -> Frame {
        Frame {
            msg: Message::Text(i.to_string().into()),
            received: Some(Instant::now()),
        }
    }

    fn texts(b: &Batch) -> Vec<String> {
        b.frames
            .iter()
            .map(|f| match &f.msg {
                Message::Text(t) => t.to_string(),
                _ => String::new(),
            })
            .collect()
    }

    #[test]
    fn drop_oldest_keeps_replies_and_counts() {
        let o = Outbox::new(2, SlowConsumerPolicy::DropOldest);
        assert_eq!(o.push_message(msg(1)), Push::Queued);
        assert!(o.push_reply(Message::Text("r".into())));
        assert_eq!(o.push_message(msg(2)), Push::Queued);
        assert_eq!(o.push_message(msg(3)), Push::DroppedOldest);
        assert_eq!(o.push_message(msg(4)), Push::DroppedOldest);
        let b = o.take(100);
        assert_eq!(texts(&b), ["r", "3", "4"]);
        assert_eq!(b.dropped, 2);
        assert!(b.close.is_none());
        assert_eq!(o.take(100).dropped, 0);
    }

    #[test]
    fn disconnect_policy_closes_without_flushing() {
        let o = Outbox::new(2, SlowConsumerPolicy::Disconnect);
        o.push_message(msg(1));
        o.push_message(msg(2));
        assert_eq!(o.push_message(msg(3)), Push::Overflow);
        assert_eq!(o.push_message(msg(4)), Push::Closed);
        let b = o.take(100);
        assert!(b.frames.is_empty());
        assert_eq!(b.close.unwrap().code, 4008);
    }

    #[test]
    fn drain_close_flushes_first() {
        let o = Outbox::new(10, SlowConsumerPolicy::Disconnect);
        o.push_message(msg(1));
        o.push_message(msg(2));
        o.push_reply(Message::Text("drain".into()));
        o.close(CloseRequest {
            code: 1012,
            reason: "drain",
            flush_first: true,
        });
        let b = o.take(2);
        assert_eq!(texts(&b), ["1", "2"]);
        assert!(b.close.is_none());
        let b = o.take(2);
        assert_eq!(texts(&b), ["drain"]);
        assert_eq!(b.close.unwrap().code, 1012);
    }
}
