//! A connection's one writer task: drains the outbox in batches (feed many, flush once),
//! sends the heartbeat pings, and carries out the close the outbox holds. Every write is
//! bounded by the write timeout and raced against the kill signal.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::conn::Conn;
use crate::conn::close::{CLOSE_FRAME_WITHIN, Cause, End, KILLED_CLOSE_WITHIN};
use crate::conn::outbox::Frame;
use crate::conn::sink::SharedSink;
use crate::metrics::Metrics;
use crate::protocol;

/// Frames taken from the queue per write batch.
const BATCH: usize = 64;

/// One sink call (`feed` of a frame, or `flush`) bounded by the write timeout. The call is
/// polled once first: a write that completes at once (nearly all of them) neither reads the
/// clock nor creates a timer; one that has to wait gets `within` from then.
async fn bounded<F>(within: Duration, call: F) -> Result<(), End>
where
    F: std::future::Future<Output = Result<(), tungstenite::Error>>,
{
    let mut call = std::pin::pin!(call);
    let at_once = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match call.as_mut().poll(cx) {
            std::task::Poll::Ready(r) => Some(r),
            std::task::Poll::Pending => None,
        })
    })
    .await;
    let done = match at_once {
        Some(r) => Ok(r),
        None => tokio::time::timeout(within, call).await,
    };
    match done {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(write_end(&e)),
        Err(_) => Err(End::WriteTimeout),
    }
}

/// A failed write's end. The kernel's TCP user timeout (set to the write timeout, see
/// `edge::listener::tune_socket`) ends a write to a peer that takes no bytes with ETIMEDOUT,
/// at the moment our own deadline would: the same cause, so the same label, whichever fires
/// first.
fn write_end(e: &tungstenite::Error) -> End {
    match e {
        tungstenite::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            End::WriteTimeout
        }
        _ => End::WriteError,
    }
}

/// Writes until the connection closes; returns how it ended.
pub(super) async fn write_loop(
    sink: &SharedSink,
    conn: &Conn,
    metrics: &Metrics,
    ping_every: Duration,
    write_timeout: Duration,
) -> End {
    let outbox = &conn.outbox;
    // The ping schedule lives in the outbox: a fan-out that writes a message itself sends a
    // due ping with it, and so does a batch here. Pings must keep flowing under load: the
    // client's pongs are what keep a receive-only client within the idle timeout.
    outbox.start_pings(ping_every);
    let ping = tokio::time::sleep(ping_every);
    tokio::pin!(ping);
    let mut received: Vec<Instant> = Vec::new();
    // The batch being written: the queue's own buffer, swapped out (`Outbox::take_into`).
    let mut frames: VecDeque<Frame> = VecDeque::new();
    // Created once: a fresh one per batch registered and unregistered a waiter per message.
    let killed = outbox.killed();
    tokio::pin!(killed);
    loop {
        let mut send_ping = false;
        tokio::select! {
            // The queue first: under load it is nearly always ready, and then the ping
            // timer is not polled (nor a branch order drawn at random) per delivery.
            biased;
            () = outbox.wait() => {}
            () = &mut ping => send_ping = true,
        }
        if send_ping {
            // Unless a message took the ping with it since: the timer only wakes the writer
            // when the outbox's schedule says.
            match outbox.take_ping(Instant::now()) {
                Ok(next) => ping.as_mut().reset(next.into()),
                Err(due) => {
                    ping.as_mut().reset(due.into());
                    continue;
                }
            }
            // Every write, the ping included, is bounded by the write timeout and raced
            // against the kill signal: a peer that stopped taking bytes must not hold the
            // connection (its permit, its subscriptions, its share of the connection
            // gauge) past either.
            let write = async {
                bounded(write_timeout, sink.feed(Message::Ping(Default::default()))).await?;
                bounded(write_timeout, sink.flush()).await
            };
            let r = tokio::select! {
                biased;
                r = write => r,
                () = &mut killed => {
                    return send_close(sink, outbox.close_request(), KILLED_CLOSE_WITHIN).await;
                }
            };
            if let Err(e) = r {
                return e;
            }
            continue;
        }
        // Batch after batch until a look finds nothing: an empty look marks the writer idle
        // (fan-outs may then write themselves).
        loop {
            let batch = outbox.take_into(BATCH, &mut frames);
            if batch.is_idle(frames.len()) {
                break;
            }
            let dropped = batch.dropped;
            received.clear();
            received.extend(frames.iter().filter_map(|f| f.received));
            // A busy connection's ping rides with a batch (its newest message's arrival
            // time stands for the clock: one read fewer per delivery).
            let ping_now = match received.last().map(|t| outbox.take_ping(*t)) {
                Some(Ok(next)) => {
                    ping.as_mut().reset(next.into());
                    true
                }
                _ => false,
            };
            let write = async {
                let mut wrote = batch.flush;
                if ping_now {
                    bounded(write_timeout, sink.feed(Message::Ping(Default::default()))).await?;
                }
                for (channel, count) in &dropped {
                    let notice = Message::text(protocol::encode_dropped(channel, *count));
                    bounded(write_timeout, sink.feed(notice)).await?;
                    wrote = true;
                }
                for f in frames.drain(..) {
                    bounded(write_timeout, sink.feed(f.msg)).await?;
                    wrote = true;
                }
                if wrote {
                    bounded(write_timeout, sink.flush()).await?;
                }
                Ok::<bool, End>(wrote)
            };
            // The write first: one that completes at once never looks at `killed`.
            let wrote = tokio::select! {
                biased;
                r = write => r,
                () = &mut killed => {
                    // Blocked on a full socket and told to stop: try a close frame
                    // briefly, then drop the connection.
                    return send_close(sink, outbox.close_request(), KILLED_CLOSE_WITHIN).await;
                }
            };
            match wrote {
                Err(e) => return e,
                Ok(true) => {
                    let now = Instant::now();
                    for t in &received {
                        metrics
                            .delivery_latency
                            .observe(now.saturating_duration_since(*t).as_secs_f64());
                    }
                    metrics.delivered.inc_by(received.len() as u64);
                }
                Ok(false) => {}
            }
            if let Some(c) = batch.close {
                return send_close(sink, Some(c), CLOSE_FRAME_WITHIN).await;
            }
        }
        // Going idle: keep no buffer (memory per idle connection; `Outbox::take_into`
        // swaps buffers, so the queue's next push allocates one: once per wake-up).
        frames = VecDeque::new();
    }
}

async fn send_close(sink: &SharedSink, cause: Option<Cause>, within: Duration) -> End {
    let Some(cause) = cause else {
        return End::Other;
    };
    if cause.sends_frame() {
        let frame = CloseFrame {
            code: CloseCode::from(cause.code()),
            reason: cause.reason().into(),
        };
        let _ = tokio::time::timeout(within, sink.send(Message::Close(Some(frame)))).await;
    }
    End::Closed(cause)
}
