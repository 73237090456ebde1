//! A connection's bounded send queue, filled by the hub and the reader, drained by the
//! connection's single writer task.
//!
//! A plain `VecDeque` under a short lock rather than a channel, because the drop-oldest
//! policy needs to remove from the front. An idle connection's queue holds no allocation.
//!
//! Three limits decide when the slow-consumer policy applies to a pushed message:
//! - `limits.sendQueueLen`: messages queued on this connection;
//! - `limits.sendQueueBytes`: bytes queued on this connection;
//! - `limits.maxQueuedBytes`: bytes queued on all connections of the process
//!   ([`QueueBudget`]). When a push would take the total above it, the push meets the policy
//!   only if its connection holds more than its fair share of the budget (the budget divided
//!   by the open connections): the backlogged connections pay, and a connection that keeps
//!   up (a few frames queued at most, usually none) is never punished for the others. The
//!   total can then pass the budget by what connections below their share still add; each
//!   such connection stops at its share.
//!
//! A message pushed to an empty queue is always queued (one message of up to
//! `maxMessageBytes`, plus its envelope, is never refused by a byte limit). Bytes are counted
//! per queue as if each held its own copy; a message's encoded bytes are shared by all its
//! recipients, so the memory really held is at most the count.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::signal::Signal;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::close::Cause;
use crate::config::SlowConsumerPolicy;
use crate::metrics::LimitHit;

/// One frame waiting to be written.
#[derive(Debug)]
pub struct Frame {
    /// The WebSocket message (shares its bytes with other connections' frames).
    pub msg: Message,
    /// When the NATS message arrived (for the latency histogram); `None` for replies.
    pub received: Option<Instant>,
    /// The channel a message was delivered on (named in a `dropped` notice); `None` for
    /// replies.
    pub channel: Option<Arc<str>>,
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

/// The process-wide budget of queued bytes (`limits.maxQueuedBytes`), shared by every
/// connection's [`Outbox`]. Its count is the `wsrelay_queued_bytes` gauge itself.
#[derive(Debug)]
pub struct QueueBudget {
    used: Gauge,
    limit: AtomicU64,
    hits: Family<LimitHit, Counter>,
    /// Outboxes drawing on the budget (open connections).
    queues: std::sync::atomic::AtomicUsize,
    /// `wsrelay_messages_dropped_total{reason="slow_consumer_drop_oldest"}`: a byte limit can
    /// drop more than one message for one push; the hub counts one per push, this the rest.
    dropped_extra: Counter,
    /// `wsrelay_slow_consumers_total`, for the overflows of replies (the hub counts those of
    /// messages).
    slow_consumers: Counter,
}

impl QueueBudget {
    /// A budget of `limit` bytes counted into `used`; limit hits counted into `hits`.
    pub fn new(
        limit: u64,
        used: Gauge,
        hits: Family<LimitHit, Counter>,
        dropped_extra: Counter,
        slow_consumers: Counter,
    ) -> Self {
        Self {
            used,
            limit: AtomicU64::new(limit),
            hits,
            queues: std::sync::atomic::AtomicUsize::new(0),
            dropped_extra,
            slow_consumers,
        }
    }

    /// A budget without a limit (tests, tools).
    pub fn unlimited() -> Self {
        Self::new(
            u64::MAX,
            Gauge::default(),
            Family::default(),
            Counter::default(),
            Counter::default(),
        )
    }

    /// Changes the limit (config reload); queues above it shrink as their clients read.
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Bytes queued on all connections now.
    pub fn used(&self) -> u64 {
        u64::try_from(self.used.get()).unwrap_or(0)
    }

    fn would_exceed(&self, add: usize) -> bool {
        self.used().saturating_add(add as u64) > self.limit.load(Ordering::Relaxed)
    }

    /// The budget divided by the open connections.
    fn fair_share(&self) -> u64 {
        let n = self.queues.load(Ordering::Relaxed).max(1) as u64;
        self.limit.load(Ordering::Relaxed) / n
    }

    fn add(&self, n: usize) {
        self.used.inc_by(i64::try_from(n).unwrap_or(i64::MAX));
    }

    fn sub(&self, n: usize) {
        if n > 0 {
            self.used.dec_by(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    fn hit(&self, limit: &'static str) {
        self.hits.get_or_create(&LimitHit { limit }).inc();
    }
}

#[derive(Debug, Default)]
struct Inner {
    queue: VecDeque<Frame>,
    /// Messages (not replies) in `queue`.
    messages: usize,
    /// Bytes of every frame in `queue` (messages and replies).
    bytes: usize,
    /// Messages dropped (drop-oldest) since the last batch, per channel, in the order the
    /// channels first lost one.
    dropped_unreported: Vec<(Arc<str>, u64)>,
    close: Option<Cause>,
    /// The writer found nothing at its last look and holds nothing it took: a fan-out may
    /// write a message itself (`claim_direct`).
    writer_idle: bool,
    /// A fan-out is writing (between `claim_direct` and `release_direct`).
    direct: bool,
    /// A fan-out's write left bytes in the sink's buffer: the writer flushes them.
    flush_owed: bool,
    /// When the next ping is due, and the interval (`start_pings`); `None` before.
    ping: Option<(Instant, std::time::Duration)>,
}

/// How a fan-out's write (`Outbox::claim_direct`) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Written and flushed.
    Done,
    /// Written (or failed) with a flush left for the writer.
    FlushOwed,
    /// Nothing taken; the message is queued next.
    NotTaken,
}

/// Extra room for replies beyond the queue's limits (this many frames, and
/// [`REPLY_ROOM_BYTES`] bytes), so a client whose queue is full of messages still gets its
/// replies; a client that makes requests without reading still hits it and is closed (4008).
const REPLY_ROOM: usize = 64;
/// See [`REPLY_ROOM`].
const REPLY_ROOM_BYTES: usize = 64 * 1024;

/// The bounded send queue of one connection.
#[derive(Debug)]
pub struct Outbox {
    inner: Mutex<Inner>,
    notify: Arc<Signal>,
    /// Wakes the writer (`notify`), for sinks a fan-out's write registers with.
    waker: std::task::Waker,
    capacity: usize,
    max_bytes: usize,
    budget: Arc<QueueBudget>,
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
    /// Messages dropped (drop-oldest) since the last batch, per channel: tell the client.
    pub dropped: Vec<(Arc<str>, u64)>,
    /// Close after writing (or instead of writing, when `flush_first` is false).
    pub close: Option<Cause>,
    /// A fan-out's write left bytes to flush.
    pub flush: bool,
}

impl Batch {
    /// Nothing to write, flush or close.
    pub fn is_idle(&self, frames: usize) -> bool {
        frames == 0 && self.dropped.is_empty() && self.close.is_none() && !self.flush
    }
}

/// Counts one message dropped on `channel` (messages always carry theirs).
fn count_drop(counts: &mut Vec<(Arc<str>, u64)>, channel: Option<Arc<str>>) {
    let channel = channel.unwrap_or_else(|| Arc::from(""));
    match counts.iter_mut().find(|(c, _)| *c == channel) {
        Some((_, n)) => *n += 1,
        None => counts.push((channel, 1)),
    }
}

/// The ping schedule, shared by the writer and fan-outs that write themselves: `Ok(next)`
/// takes the ping due at `now` and schedules the next; `Err(due)` when none is due yet (or
/// pings have not started: then in an interval, never at once).
fn next_ping(g: &mut Inner, now: Instant) -> Result<Instant, Instant> {
    match &mut g.ping {
        Some((due, every)) if now >= *due => {
            *due = now + *every;
            Ok(*due)
        }
        Some((due, _)) => Err(*due),
        None => Err(now + std::time::Duration::from_secs(1)),
    }
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    // A panic while holding this lock cannot leave the queue inconsistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Outbox {
    /// An empty queue of `capacity` messages and no byte limit.
    pub fn new(capacity: usize, policy: SlowConsumerPolicy) -> Self {
        Self::with_budget(
            capacity,
            usize::MAX,
            policy,
            Arc::new(QueueBudget::unlimited()),
        )
    }

    /// An empty queue of at most `capacity` messages and `max_bytes` bytes, drawing on the
    /// process-wide `budget`.
    pub fn with_budget(
        capacity: usize,
        max_bytes: usize,
        policy: SlowConsumerPolicy,
        budget: Arc<QueueBudget>,
    ) -> Self {
        budget.queues.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Signal::default());
        Self {
            inner: Mutex::new(Inner::default()),
            waker: std::task::Waker::from(notify.clone()),
            notify,
            capacity: capacity.max(1),
            max_bytes: max_bytes.max(1),
            budget,
            policy,
            kill: CancellationToken::new(),
        }
    }

    /// The limit a push of `len` bytes would break, if any. A push to an empty queue breaks
    /// none: one message always fits.
    fn over(&self, g: &Inner, len: usize) -> Option<&'static str> {
        if g.messages >= self.capacity {
            Some("messages")
        } else if g.queue.is_empty() {
            None
        } else if g.bytes.saturating_add(len) > self.max_bytes {
            Some("bytes")
        } else if self.budget.would_exceed(len) && g.bytes as u64 > self.budget.fair_share() {
            Some("process_bytes")
        } else {
            None
        }
    }

    /// A close that does not flush: what is queued will never be written, so its bytes go
    /// back to the budget now rather than when the connection's task ends.
    fn discard(&self, g: &mut Inner) {
        g.queue.clear();
        g.messages = 0;
        self.budget.sub(std::mem::take(&mut g.bytes));
    }

    /// Queues a message (subject to the slow-consumer policy, see the module doc).
    pub fn push_message(&self, frame: Frame) -> Push {
        let len = frame.msg.len();
        let mut g = lock(&self.inner);
        if g.close.is_some() {
            return Push::Closed;
        }
        let mut result = Push::Queued;
        if let Some(limit) = self.over(&g, len) {
            self.budget.hit(limit);
            match self.policy {
                SlowConsumerPolicy::Disconnect => {
                    g.close = Some(Cause::SlowConsumer);
                    self.discard(&mut g);
                    drop(g);
                    self.kill.cancel();
                    self.notify.notify();
                    return Push::Overflow;
                }
                SlowConsumerPolicy::DropOldest => {
                    // Oldest messages first (never replies), until the new one fits.
                    let mut dropped = 0u64;
                    while self.over(&g, len).is_some() {
                        let Some(pos) = g.queue.iter().position(|f| f.received.is_some()) else {
                            break;
                        };
                        if let Some(old) = g.queue.remove(pos) {
                            let n = old.msg.len();
                            g.bytes -= n;
                            self.budget.sub(n);
                            count_drop(&mut g.dropped_unreported, old.channel);
                        }
                        g.messages -= 1;
                        dropped += 1;
                    }
                    if dropped > 0 {
                        result = Push::DroppedOldest;
                        self.budget.dropped_extra.inc_by(dropped - 1);
                    }
                }
            }
        }
        self.enqueue(g, frame, len);
        result
    }

    /// Appends a message frame of `len` bytes, counts it and wakes the writer.
    fn enqueue(&self, mut g: std::sync::MutexGuard<'_, Inner>, frame: Frame, len: usize) {
        g.queue.push_back(frame);
        g.messages += 1;
        g.bytes += len;
        self.budget.add(len);
        drop(g);
        self.notify.notify();
    }

    /// Queues a message only if no limit would be broken (the slow-consumer policy is never
    /// applied): a replay paced against the client's reading. `Err` gives the frame back
    /// when there is no room yet, `Ok(false)` when the connection is closing.
    pub fn try_push_message(&self, frame: Frame) -> Result<bool, Frame> {
        let len = frame.msg.len();
        let g = lock(&self.inner);
        if g.close.is_some() {
            return Ok(false);
        }
        if self.over(&g, len).is_some() {
            return Err(frame);
        }
        self.enqueue(g, frame, len);
        Ok(true)
    }

    /// Queues a reply or notice. Returns false (and asks for a close) if the client makes
    /// requests without reading its replies.
    pub fn push_reply(&self, msg: Message) -> bool {
        let mut g = lock(&self.inner);
        if g.close.is_some() {
            return false;
        }
        let len = msg.len();
        // Replies count against the byte limit too: each holds memory like a message.
        let over_bytes = !g.queue.is_empty()
            && g.bytes.saturating_add(len) > self.max_bytes.saturating_add(REPLY_ROOM_BYTES);
        if g.queue.len() >= self.capacity + REPLY_ROOM || over_bytes {
            self.budget.hit("replies");
            self.budget.slow_consumers.inc();
            g.close = Some(Cause::SlowConsumer);
            self.discard(&mut g);
            drop(g);
            self.kill.cancel();
            self.notify.notify();
            return false;
        }
        g.queue.push_back(Frame {
            msg,
            received: None,
            channel: None,
        });
        g.bytes += len;
        self.budget.add(len);
        drop(g);
        self.notify.notify();
        true
    }

    /// Asks the writer to close; the first request wins.
    pub fn close(&self, cause: Cause) {
        let mut g = lock(&self.inner);
        if g.close.is_none() {
            if !cause.flush_first() {
                self.discard(&mut g);
                self.kill.cancel();
            }
            g.close = Some(cause);
        }
        drop(g);
        self.notify.notify();
    }

    /// Whether a close was requested.
    pub fn is_closing(&self) -> bool {
        lock(&self.inner).close.is_some()
    }

    /// Takes up to `max` frames.
    pub fn take(&self, max: usize) -> Batch {
        let mut frames = VecDeque::new();
        let mut batch = self.take_into(max, &mut frames);
        batch.frames = frames.into();
        batch
    }

    /// Takes up to `max` frames into `frames` (cleared first; the writer calls this once per
    /// wake-up); the returned batch's own `frames` is empty. When the whole queue fits, the
    /// two buffers are swapped rather than frames moved: the queue keeps the caller's (empty)
    /// buffer, so a writer that drops its buffer when it goes idle leaves an idle connection
    /// holding no frame buffer at all (704 bytes each otherwise, for one buffer here and one
    /// in the writer, both grown by the welcome frame).
    ///
    /// While a fan-out writes, nothing is taken (it wakes the writer when done, if anything
    /// waits). A batch with nothing in it marks the writer idle: fan-outs may write.
    pub fn take_into(&self, max: usize, frames: &mut VecDeque<Frame>) -> Batch {
        frames.clear();
        let mut g = lock(&self.inner);
        if g.direct {
            return Batch::default();
        }
        if g.queue.len() <= max {
            std::mem::swap(frames, &mut g.queue);
        } else {
            frames.extend(g.queue.drain(..max));
        }
        g.messages -= frames.iter().filter(|f| f.received.is_some()).count();
        let taken: usize = frames.iter().map(|f| f.msg.len()).sum();
        g.bytes -= taken;
        self.budget.sub(taken);
        let dropped = std::mem::take(&mut g.dropped_unreported);
        let close = match &g.close {
            Some(c) if !c.flush_first() || g.queue.is_empty() => Some(*c),
            _ => None,
        };
        let flush = std::mem::take(&mut g.flush_owed);
        let batch = Batch {
            frames: Vec::new(),
            dropped,
            close,
            flush,
        };
        g.writer_idle = batch.is_idle(frames.len());
        drop(g);
        if batch.close.as_ref().is_some_and(|c| !c.flush_first()) {
            frames.clear();
        }
        batch
    }

    /// Claims the sink for a fan-out's write of one message: only when nothing is queued,
    /// the writer is idle, no other fan-out writes and no close was asked for. `Some(ping)`
    /// when claimed: `ping` says a ping is due (`now` stands for the clock) and goes with
    /// the message. Every claim is followed by a [`Outbox::release_direct`].
    pub fn claim_direct(&self, now: Instant) -> Option<bool> {
        let mut g = lock(&self.inner);
        if !g.writer_idle || g.direct || g.flush_owed || g.close.is_some() || !g.queue.is_empty() {
            return None;
        }
        g.direct = true;
        Some(next_ping(&mut g, now).is_ok())
    }

    /// Ends a fan-out's write; wakes the writer when it has something to do. `ping_owed`:
    /// the claim's ping was not sent, and is due again.
    pub fn release_direct(&self, how: Release, ping_owed: bool) {
        let mut g = lock(&self.inner);
        g.direct = false;
        if how == Release::FlushOwed {
            g.flush_owed = true;
        }
        if ping_owed && let Some((due, _)) = &mut g.ping {
            *due = Instant::now();
        }
        let wake = g.flush_owed || !g.queue.is_empty() || g.close.is_some();
        drop(g);
        if wake {
            self.notify.notify();
        }
    }

    /// Starts the ping schedule: the first is due `every` from now.
    pub fn start_pings(&self, every: std::time::Duration) {
        lock(&self.inner).ping = Some((Instant::now() + every, every));
    }

    /// `Ok(next)` when a ping is due at `now` (the next one is then scheduled at `next`);
    /// `Err(due)` when it is not yet.
    pub fn take_ping(&self, now: Instant) -> Result<Instant, Instant> {
        next_ping(&mut lock(&self.inner), now)
    }

    /// Wakes the writer: the waker a fan-out's write leaves with the sink.
    pub fn waker(&self) -> &std::task::Waker {
        &self.waker
    }

    /// Resolves when a close that must not wait for the queue was requested.
    pub async fn killed(&self) {
        self.kill.cancelled().await;
    }

    /// The close request, if any.
    pub fn close_request(&self) -> Option<Cause> {
        lock(&self.inner).close
    }

    /// Waits until something was pushed or a close was requested.
    pub async fn wait(&self) {
        self.notify.wait().await;
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        lock(&self.inner).bytes
    }
}

impl Drop for Outbox {
    /// Frames left behind by a closed connection give their bytes back to the budget.
    fn drop(&mut self) {
        let g = lock(&self.inner);
        self.budget.sub(g.bytes);
        self.budget.queues.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: usize) -> Frame {
        on("c", i)
    }

    fn on(channel: &str, i: usize) -> Frame {
        Frame {
            msg: Message::Text(i.to_string().into()),
            received: Some(Instant::now()),
            channel: Some(Arc::from(channel)),
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
    fn unread_replies_count_against_the_byte_limit() {
        let o = Outbox::with_budget(
            10_000,
            1000,
            SlowConsumerPolicy::DropOldest,
            Arc::new(QueueBudget::unlimited()),
        );
        let reply = || Message::Text("r".repeat(100).into());
        let mut queued = 0;
        while o.push_reply(reply()) {
            queued += 1;
            assert!(
                queued <= 1000,
                "replies are bounded by bytes, not only by count"
            );
        }
        // The limit plus the replies' room, and not a frame more.
        assert_eq!(queued, (1000 + REPLY_ROOM_BYTES) / 100);
        assert_eq!(o.close_request().map(|c| c.code()), Some(4008));
        assert_eq!(o.queued_bytes(), 0, "a slow consumer's queue is discarded");
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
        assert_eq!(b.dropped, [(Arc::from("c"), 2)]);
        assert!(b.close.is_none());
        assert!(o.take(100).dropped.is_empty());
    }

    #[test]
    fn drops_are_counted_per_channel() {
        let o = Outbox::new(2, SlowConsumerPolicy::DropOldest);
        o.push_message(on("a", 1));
        o.push_message(on("b", 2));
        o.push_message(on("b", 3)); // drops a:1
        o.push_message(on("a", 4)); // drops b:2
        o.push_message(on("a", 5)); // drops b:3
        let b = o.take(100);
        assert_eq!(texts(&b), ["4", "5"]);
        assert_eq!(b.dropped, [(Arc::from("a"), 1), (Arc::from("b"), 2)]);
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
        assert_eq!(b.close.unwrap().code(), 4008);
    }

    fn budget(limit: u64) -> Arc<QueueBudget> {
        Arc::new(QueueBudget::new(
            limit,
            Gauge::default(),
            Family::default(),
            Counter::default(),
            Counter::default(),
        ))
    }

    fn sized(n: usize) -> Frame {
        Frame {
            msg: Message::Text("x".repeat(n).into()),
            received: Some(Instant::now()),
            channel: Some(Arc::from("c")),
        }
    }

    #[test]
    fn byte_limit_applies_the_policy_but_one_message_always_fits() {
        let b = budget(u64::MAX);
        let o = Outbox::with_budget(100, 250, SlowConsumerPolicy::Disconnect, b.clone());
        // Larger than the limit, into an empty queue: queued.
        assert_eq!(o.push_message(sized(300)), Push::Queued);
        assert_eq!(b.used(), 300);
        assert_eq!(o.push_message(sized(1)), Push::Overflow);
        assert_eq!(
            b.used(),
            0,
            "a disconnected outbox returns its bytes at once"
        );
        drop(o);

        let o = Outbox::with_budget(100, 250, SlowConsumerPolicy::DropOldest, b.clone());
        for _ in 0..2 {
            assert_eq!(o.push_message(sized(100)), Push::Queued);
        }
        // 200 + 200 > 250: both older messages go.
        assert_eq!(o.push_message(sized(200)), Push::DroppedOldest);
        assert_eq!(o.queued_bytes(), 200);
        let batch = o.take(10);
        assert_eq!(batch.dropped, [(Arc::from("c"), 2)]);
        assert_eq!(b.used(), 0);
        assert_eq!(b.dropped_extra.get(), 1);
        assert_eq!(b.hits.get_or_create(&LimitHit { limit: "bytes" }).get(), 2);
    }

    #[test]
    fn exhausted_budget_spares_connections_that_keep_up() {
        let b = budget(1000);
        let behind = Outbox::with_budget(100, 10_000, SlowConsumerPolicy::Disconnect, b.clone());
        let keeping_up =
            Outbox::with_budget(100, 10_000, SlowConsumerPolicy::Disconnect, b.clone());
        for _ in 0..9 {
            assert_eq!(behind.push_message(sized(100)), Push::Queued);
        }
        // 900 of 1000 used. The connection that keeps up is served, even with something
        // queued, while it holds less than its share (1000 / 2)...
        assert_eq!(keeping_up.push_message(sized(200)), Push::Queued);
        assert_eq!(keeping_up.push_message(sized(200)), Push::Queued);
        let _ = keeping_up.take(10);
        // ...the one that is behind meets the policy.
        assert_eq!(behind.push_message(sized(200)), Push::Overflow);
        assert_eq!(b.used(), 0);
        assert_eq!(
            b.hits
                .get_or_create(&LimitHit {
                    limit: "process_bytes"
                })
                .get(),
            1
        );
        assert_eq!(keeping_up.push_message(sized(200)), Push::Queued);
    }

    #[test]
    fn drain_close_flushes_first() {
        let o = Outbox::new(10, SlowConsumerPolicy::Disconnect);
        o.push_message(msg(1));
        o.push_message(msg(2));
        o.push_reply(Message::Text("drain".into()));
        o.close(Cause::Drain);
        let b = o.take(2);
        assert_eq!(texts(&b), ["1", "2"]);
        assert!(b.close.is_none());
        let b = o.take(2);
        assert_eq!(texts(&b), ["drain"]);
        assert_eq!(b.close.unwrap().code(), 1012);
    }

    #[test]
    fn a_fan_out_writes_itself_only_while_the_writer_is_idle_and_nothing_is_queued() {
        let o = Outbox::new(10, SlowConsumerPolicy::DropOldest);
        // The writer has not looked yet (it has the welcome to write).
        assert_eq!(o.claim_direct(Instant::now()), None);
        assert!(o.take(10).is_idle(0), "an empty look");
        assert_eq!(o.claim_direct(Instant::now()), Some(false));
        // While the fan-out writes: another is refused, the writer takes nothing, and what
        // is pushed is queued behind, for the writer.
        assert_eq!(o.claim_direct(Instant::now()), None);
        assert_eq!(o.push_message(msg(1)), Push::Queued);
        assert!(
            o.take(10).frames.is_empty(),
            "nothing taken during a direct write"
        );
        o.release_direct(Release::Done, false);
        assert_eq!(o.claim_direct(Instant::now()), None, "a message is queued");
        let b = o.take(10);
        assert_eq!(texts(&b), ["1"]);
        assert_eq!(
            o.claim_direct(Instant::now()),
            None,
            "the writer holds what it took until its next look"
        );
        assert!(o.take(10).is_idle(0));
        assert_eq!(o.claim_direct(Instant::now()), Some(false));
        o.release_direct(Release::Done, false);
    }

    #[test]
    fn a_flush_left_by_a_fan_out_goes_to_the_writer_before_any_other_fan_out_writes() {
        let o = Outbox::new(10, SlowConsumerPolicy::DropOldest);
        let _ = o.take(10);
        assert!(o.claim_direct(Instant::now()).is_some());
        o.release_direct(Release::FlushOwed, false);
        assert_eq!(o.claim_direct(Instant::now()), None);
        let b = o.take(10);
        assert!(b.flush && b.frames.is_empty() && !b.is_idle(0));
        assert!(o.take(10).is_idle(0));
        assert!(o.claim_direct(Instant::now()).is_some());
        o.release_direct(Release::Done, false);
    }

    #[test]
    fn a_close_stops_fan_outs_from_writing() {
        let o = Outbox::new(10, SlowConsumerPolicy::DropOldest);
        let _ = o.take(10);
        o.close(Cause::Drain);
        assert_eq!(o.claim_direct(Instant::now()), None);
        assert_eq!(o.push_message(msg(1)), Push::Closed);
    }

    #[test]
    fn a_due_ping_goes_with_one_write_and_is_given_back_when_nothing_was_written() {
        let o = Outbox::new(10, SlowConsumerPolicy::DropOldest);
        let every = std::time::Duration::from_secs(20);
        o.start_pings(every);
        let _ = o.take(10);
        let t0 = Instant::now();
        assert_eq!(o.claim_direct(t0), Some(false), "not due yet");
        o.release_direct(Release::Done, false);
        let later = t0 + every * 2;
        assert_eq!(o.claim_direct(later), Some(true));
        o.release_direct(Release::NotTaken, true);
        assert!(o.take_ping(Instant::now()).is_ok(), "still owed");
        assert!(o.take_ping(Instant::now()).is_err(), "and then scheduled");
        assert_eq!(o.claim_direct(later), Some(true));
        o.release_direct(Release::Done, false);
        assert_eq!(o.take_ping(later), Err(later + every));
    }
}
