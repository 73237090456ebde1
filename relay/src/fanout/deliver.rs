//! Fan-out: a message encoded once per channel name and handed to every live subscriber of
//! a subject (`Conn::deliver`: written at once or queued), and the paced variants that never
//! apply the slow-consumer policy (replays, gap fills).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::entry::{SubjectEntry, read};
use crate::conn::outbox::{Frame, Push};
use crate::conn::{Conn, Delivery};
use crate::history::ring::Stored;
use crate::metrics::Metrics;
use crate::protocol::{encode_message, encode_message_at};

/// Subscribers of a subject up to which its fan-out writes to idle connections itself
/// (`Conn::deliver`). Above, the writes stay with the connections' writer tasks: one task
/// writing to thousands of sockets in a row would hold one worker and delay the last.
const DIRECT_FAN_OUT: usize = 4;

/// How much of a replay a client's queue took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Queued {
    /// All of it; the position of the last message queued.
    All(u64),
    /// Up to this position: no room for the next one yet.
    Upto(u64),
    /// The connection is closing.
    Closing,
}

/// Queues `msgs` (what follows `prev`, in order) to `conn` as far as its queue has room,
/// never applying the slow-consumer policy.
pub(super) fn queue_replay(
    conn: &Conn,
    channel: &Arc<str>,
    mut prev: u64,
    msgs: &[Stored],
) -> Queued {
    let received = Instant::now();
    for s in msgs {
        let frame = Frame {
            msg: Message::text(encode_message_at(channel, &s.payload, Some((s.seq, prev)))),
            received: Some(received),
            channel: Some(channel.clone()),
        };
        match conn.outbox.try_push_message(frame) {
            Ok(true) => prev = s.seq,
            Ok(false) => return Queued::Closing,
            Err(_) => return Queued::Upto(prev),
        }
    }
    Queued::All(prev)
}

pub(super) fn fan_out(entry: &SubjectEntry, payload: &[u8], metrics: &Metrics, max_payload: usize) {
    fan_out_encoded(entry, payload, metrics, max_payload, |channel| {
        encode_message(channel, payload)
    });
}

/// Fans out a message of a resumable channel, with its position and the previous one.
pub(super) fn fan_out_at(
    entry: &SubjectEntry,
    m: &Stored,
    prev: u64,
    metrics: &Metrics,
    max_payload: usize,
) {
    fan_out_encoded(entry, &m.payload, metrics, max_payload, |channel| {
        encode_message_at(channel, &m.payload, Some((m.seq, prev)))
    });
}

/// A subscriber left behind by a paced fan-out: its connection, channel, serial, and the
/// last position it was given.
pub(super) type Behind = (Arc<Conn>, Arc<str>, u64, u64);

/// Fans out a message a gap fill read, never applying the slow-consumer policy: a
/// subscriber whose queue has no room leaves live delivery and is returned (it holds
/// everything up to `prev`). Called under the ring's lock.
pub(super) fn fan_out_paced(entry: &SubjectEntry, m: &Stored, prev: u64) -> Vec<Behind> {
    let mut behind = Vec::new();
    let subs = read(&entry.subscribers);
    for sub in subs.values() {
        if !sub.live.load(Ordering::Acquire) {
            continue;
        }
        let one = [m.clone()];
        if let Queued::Upto(_) = queue_replay(&sub.conn, &sub.channel, prev, &one) {
            sub.live.store(false, Ordering::Release);
            behind.push((sub.conn.clone(), sub.channel.clone(), sub.serial, prev));
        }
    }
    behind
}

fn fan_out_encoded(
    entry: &SubjectEntry,
    payload: &[u8],
    metrics: &Metrics,
    max_payload: usize,
    encode: impl Fn(&str) -> String,
) {
    let received = Instant::now();
    let subs = read(&entry.subscribers);
    if payload.len() > max_payload {
        metrics.drop_msgs("too_large", subs.len() as u64);
        return;
    }
    // Usually every subscriber of a subject uses the same channel name: encode once per
    // distinct channel and share the bytes. The first encoding is held apart, so the usual
    // message allocates nothing but its frame.
    let mut first: Option<(&Arc<str>, Utf8Bytes)> = None;
    let mut others: Vec<(&Arc<str>, Utf8Bytes)> = Vec::new();
    let (mut dropped, mut slow) = (0u64, 0u64);
    // A subject with few subscribers (a personal channel) writes to each idle connection
    // itself; a broadcast leaves the writes to the connections' writers, which the runtime
    // spreads over its workers.
    let direct = subs.len() <= DIRECT_FAN_OUT;
    for sub in subs.values() {
        if !sub.live.load(Ordering::Acquire) {
            continue;
        }
        let bytes = match &first {
            None => {
                let b = Utf8Bytes::from(encode(&sub.channel));
                first = Some((&sub.channel, b.clone()));
                b
            }
            Some((c, b)) if **c == sub.channel => b.clone(),
            Some(_) => match others.iter().find(|(c, _)| **c == sub.channel) {
                Some((_, b)) => b.clone(),
                None => {
                    let b = Utf8Bytes::from(encode(&sub.channel));
                    others.push((&sub.channel, b.clone()));
                    b
                }
            },
        };
        let frame = Frame {
            msg: Message::Text(bytes),
            received: Some(received),
            channel: Some(sub.channel.clone()),
        };
        deliver_one(&sub.conn, frame, direct, metrics, &mut dropped, &mut slow);
    }
    count_losses(metrics, dropped, slow);
}

/// One frame to one connection, its loss tallied (`dropped`: the oldest queued message
/// dropped for it; `slow`: the connection closed as a slow consumer).
#[inline]
fn deliver_one(
    conn: &Conn,
    frame: Frame,
    direct: bool,
    metrics: &Metrics,
    dropped: &mut u64,
    slow: &mut u64,
) {
    match conn.deliver(frame, direct, metrics) {
        Delivery::Written | Delivery::Queued(Push::Queued | Push::Closed) => {}
        Delivery::Queued(Push::DroppedOldest) => *dropped += 1,
        Delivery::Queued(Push::Overflow) => *slow += 1,
    }
}

fn count_losses(metrics: &Metrics, dropped: u64, slow: u64) {
    if dropped > 0 {
        metrics.drop_msgs("slow_consumer_drop_oldest", dropped);
    }
    if slow > 0 {
        metrics.slow_consumers.inc_by(slow);
        metrics.drop_msgs("slow_consumer_disconnect", slow);
    }
}

/// Fans out one frame of `channel` encoded once (a presence event) to `conns` the way a
/// message goes: written at once or queued, under the slow-consumer policy.
pub fn fan_out_frame<'a>(
    conns: impl ExactSizeIterator<Item = &'a Arc<Conn>>,
    channel: &Arc<str>,
    text: String,
    metrics: &Metrics,
) {
    let received = Instant::now();
    let direct = conns.len() <= DIRECT_FAN_OUT;
    let bytes = Utf8Bytes::from(text);
    let (mut dropped, mut slow) = (0u64, 0u64);
    for conn in conns {
        let frame = Frame {
            msg: Message::Text(bytes.clone()),
            received: Some(received),
            channel: Some(channel.clone()),
        };
        deliver_one(conn, frame, direct, metrics, &mut dropped, &mut slow);
    }
    count_losses(metrics, dropped, slow);
}
