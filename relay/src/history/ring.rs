//! The retained messages of one resumable channel, kept in memory by the hub entry that
//! delivers it, and the decision a resume takes from them. Pure: no I/O, no clock (times
//! are passed in).
//!
//! The stream removes a channel's messages oldest first (its per-channel count, its age
//! limit), and the ring mirrors those limits, so "nothing after position P was removed" can
//! be proved from what is held: see [`Ring::decide`].

use std::collections::VecDeque;

use bytes::Bytes;

/// One message of a resumable channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its stream sequence: the position.
    pub seq: u64,
    /// When it was stored, milliseconds since the epoch (for the age limit).
    pub at_ms: u64,
    /// The NATS payload.
    pub payload: Bytes,
}

/// The limits the ring mirrors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Newest messages kept per channel (the stream's `max_msgs_per_subject`).
    pub max_messages: usize,
    /// Oldest age kept, in milliseconds (the stream's `max_age`).
    pub max_age_ms: u64,
    /// Bytes of payload kept in memory for the channel. Beyond it the oldest leave the ring
    /// (and a resume from before them is answered `recovered: false`).
    pub max_bytes: usize,
}

/// What a resume from a position can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Recovered: these messages (all after the position, in order) are what was missed.
    Replay(Vec<Stored>),
    /// The ring cannot tell: recovered only if the stream still holds the message at the
    /// position (see [`Ring::decide_with_stream`]).
    AskStream,
    /// Not recovered.
    Lost,
}

/// Retained messages of one channel, in position order.
#[derive(Debug, Clone)]
pub struct Ring {
    msgs: VecDeque<Stored>,
    bytes: usize,
    limits: Limits,
    /// Highest position ever removed from the ring (0: none).
    evicted_upto: u64,
    /// Highest position seen (appended or read).
    last_seen: u64,
    /// Set by [`Ring::load`]: the stream's last sequence when the ring was made complete.
    /// Every message of the channel after it has been appended since.
    live_since: Option<u64>,
}

/// What to do with a live message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Deliver it; `prev` is the position delivered before it on this channel.
    Deliver {
        /// The previous delivered position.
        prev: u64,
    },
    /// Already delivered (a duplicate, or read by a gap fill first).
    Duplicate,
    /// Messages before it were missed: read the stream after `after` first.
    Gap {
        /// The last position delivered.
        after: u64,
    },
}

impl Ring {
    /// Classifies a live message and, when it is to be delivered, appends it.
    pub fn accept(&mut self, m: &Stored, prev: u64, now: u64) -> Arrival {
        let last = self.last_seen();
        if m.seq <= last {
            return Arrival::Duplicate;
        }
        let known = last.max(self.head());
        if self.is_loaded() && prev > known {
            return Arrival::Gap { after: last };
        }
        self.append(m.clone(), now);
        Arrival::Deliver { prev: last }
    }

    /// An empty, not yet loaded ring.
    pub fn new(limits: Limits) -> Self {
        Self {
            msgs: VecDeque::new(),
            bytes: 0,
            limits,
            evicted_upto: 0,
            last_seen: 0,
            live_since: None,
        }
    }

    /// Whether [`Ring::load`] ran: the ring then holds every retained message.
    pub fn is_loaded(&self) -> bool {
        self.live_since.is_some()
    }

    /// The highest position seen, 0 for none.
    pub fn last_seen(&self) -> u64 {
        self.last_seen
    }

    /// The position a subscriber starts from when it does not resume (or is not recovered):
    /// every message it will receive has a larger one.
    pub fn head(&self) -> u64 {
        self.last_seen.max(self.live_since.unwrap_or(0))
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.msgs.len()
    }

    /// Whether no message is held.
    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Appends a message seen live. Returns false (and keeps nothing) for a position not
    /// above the last one seen: a duplicate or a stale republish.
    pub fn append(&mut self, m: Stored, now_ms: u64) -> bool {
        if m.seq <= self.last_seen {
            return false;
        }
        self.last_seen = m.seq;
        self.bytes += m.payload.len();
        self.msgs.push_back(m);
        self.evict(now_ms);
        true
    }

    /// Makes the ring complete: merges the channel's retained messages read from the stream
    /// (`read`, in position order) with what was appended live meanwhile; `stream_last` is
    /// the stream's last sequence, read after the live subscription was in place.
    pub fn load(&mut self, read: Vec<Stored>, stream_last: u64, now_ms: u64) {
        let mut merged: Vec<Stored> = Vec::with_capacity(read.len() + self.msgs.len());
        let mut live = std::mem::take(&mut self.msgs).into_iter().peekable();
        for m in read {
            while live.peek().is_some_and(|l| l.seq < m.seq) {
                merged.extend(live.next());
            }
            if live.peek().is_some_and(|l| l.seq == m.seq) {
                continue;
            }
            if m.seq > self.evicted_upto {
                merged.push(m);
            }
        }
        merged.extend(live);
        self.bytes = merged.iter().map(|m| m.payload.len()).sum();
        self.last_seen = self.last_seen.max(merged.last().map_or(0, |m| m.seq));
        self.msgs = merged.into();
        self.live_since = Some(stream_last);
        self.evict(now_ms);
    }

    /// Drops what the stream no longer keeps (count, age) and what exceeds the memory cap.
    pub fn evict(&mut self, now_ms: u64) {
        let l = self.limits;
        while let Some(front) = self.msgs.front() {
            let too_many = self.msgs.len() > l.max_messages;
            let too_old = now_ms.saturating_sub(front.at_ms) > l.max_age_ms;
            let too_big = self.bytes > l.max_bytes;
            if !(too_many || too_old || too_big) {
                break;
            }
            self.bytes -= front.payload.len();
            self.evicted_upto = self.evicted_upto.max(front.seq);
            self.msgs.pop_front();
        }
    }

    /// What follows `pos` for a subscriber that holds every message up to it (a paced
    /// replay or gap fill resuming): `None` when the ring dropped a message after `pos`
    /// meanwhile (the subscriber can no longer be given a gap-free chain from here).
    pub fn continue_after(&self, pos: u64) -> Option<Vec<Stored>> {
        (self.evicted_upto <= pos).then(|| self.after(pos))
    }

    fn after(&self, pos: u64) -> Vec<Stored> {
        let start = self.msgs.partition_point(|m| m.seq <= pos);
        self.msgs.range(start..).cloned().collect()
    }

    /// Decides a resume from `pos` with what the ring holds. Call on a loaded ring, after
    /// [`Ring::evict`].
    ///
    /// - `pos` is a message held: the stream still holds it, so (oldest first) it holds
    ///   everything newer, and so does the ring: recovered.
    /// - `pos` is at or after the point where the ring became complete, and nothing after it
    ///   left the ring: recovered.
    /// - otherwise the stream must tell whether it still holds the message at `pos`.
    pub fn decide(&self, pos: u64) -> Decision {
        if self.evicted_upto > pos {
            return Decision::Lost;
        }
        // A position beyond the head may be another relay's (the stream moved on with
        // other channels): only the stream can tell.
        if pos <= self.head()
            && (self.msgs.binary_search_by_key(&pos, |m| m.seq).is_ok()
                || self.live_since.is_some_and(|s| pos >= s))
        {
            return Decision::Replay(self.after(pos));
        }
        // Position 0 (an `ok` on a stream that had no message yet) included: the stream
        // answers whether it ever removed a message.
        Decision::AskStream
    }

    /// Finishes a [`Decision::AskStream`]: `held` is what the stream answered for the
    /// message at `pos` (`None`: gone; `Some(true)`: a message of this channel; `Some(false)`:
    /// of another channel). A message of another channel still held proves no age or
    /// stream-wide removal after `pos`; fewer than `max_messages` of this channel after it
    /// prove no per-channel removal.
    pub fn decide_with_stream(&self, pos: u64, held: Option<bool>) -> Decision {
        if self.evicted_upto > pos {
            return Decision::Lost;
        }
        match held {
            Some(true) => Decision::Replay(self.after(pos)),
            Some(false) => {
                let after = self.after(pos);
                if after.len() < self.limits.max_messages {
                    Decision::Replay(after)
                } else {
                    Decision::Lost
                }
            }
            None => Decision::Lost,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_messages: 3,
        max_age_ms: 60_000,
        max_bytes: 1 << 20,
    };

    fn m(seq: u64) -> Stored {
        Stored {
            seq,
            at_ms: 1_000,
            payload: Bytes::from(format!("m{seq}")),
        }
    }

    fn seqs(d: &Decision) -> Vec<u64> {
        match d {
            Decision::Replay(v) => v.iter().map(|m| m.seq).collect(),
            other => panic!("not a replay: {other:?}"),
        }
    }

    #[test]
    fn load_merges_read_and_live_without_duplicates() {
        let mut r = Ring::new(LIMITS);
        assert!(r.append(m(10), 1_000));
        assert!(r.append(m(12), 1_000));
        assert!(!r.append(m(12), 1_000), "duplicate");
        r.load(vec![m(4), m(10)], 11, 1_000);
        assert!(r.is_loaded());
        assert_eq!(seqs(&r.decide(4)), [10, 12]);
        assert_eq!(r.head(), 12);
    }

    #[test]
    fn a_paced_subscriber_continues_until_the_ring_drops_what_it_needs() {
        let mut r = Ring::new(LIMITS);
        r.load(vec![m(3), m(7)], 9, 1_000);
        let seqs = |v: Option<Vec<Stored>>| v.map(|v| v.iter().map(|m| m.seq).collect::<Vec<_>>());
        assert_eq!(seqs(r.continue_after(3)), Some(vec![7]));
        r.append(m(11), 1_000);
        r.append(m(12), 1_000);
        // 3 left the ring (3 messages at most): from 3 on is still whole, before it is not.
        assert_eq!(seqs(r.continue_after(3)), Some(vec![7, 11, 12]));
        assert_eq!(seqs(r.continue_after(2)), None);
        r.append(m(13), 1_000);
        assert_eq!(seqs(r.continue_after(3)), None, "7 is gone");
        assert_eq!(seqs(r.continue_after(7)), Some(vec![11, 12, 13]));
    }

    #[test]
    fn a_held_position_replays_what_follows() {
        let mut r = Ring::new(LIMITS);
        r.load(vec![m(3), m(7)], 9, 1_000);
        r.append(m(11), 1_000);
        assert_eq!(seqs(&r.decide(3)), [7, 11]);
        assert_eq!(seqs(&r.decide(7)), [11]);
        assert_eq!(seqs(&r.decide(11)), Vec::<u64>::new());
        // At or after the point of completeness: everything after was seen live.
        assert_eq!(seqs(&r.decide(9)), [11]);
        assert_eq!(seqs(&r.decide(10)), [11]);
    }

    #[test]
    fn positions_the_ring_cannot_prove() {
        let mut r = Ring::new(LIMITS);
        r.load(vec![m(3), m(7)], 9, 1_000);
        // Before the first held message, not a held one: ask the stream.
        assert_eq!(r.decide(2), Decision::AskStream);
        assert_eq!(r.decide(5), Decision::AskStream);
        assert_eq!(
            r.decide(0),
            Decision::AskStream,
            "the stream tells (first sequence)"
        );
        // Beyond anything seen here: another relay's position, or garbage; the stream tells.
        assert_eq!(r.decide(100), Decision::AskStream);
        assert_eq!(
            seqs(&r.decide_with_stream(100, Some(false))),
            Vec::<u64>::new()
        );
        assert_eq!(r.decide_with_stream(100, None), Decision::Lost);
        // The stream's answer settles it.
        assert_eq!(seqs(&r.decide_with_stream(5, Some(false))), [7]);
        assert_eq!(seqs(&r.decide_with_stream(2, Some(false))), [3, 7]);
        assert_eq!(r.decide_with_stream(5, None), Decision::Lost);
    }

    #[test]
    fn a_full_window_after_a_foreign_position_is_not_proof() {
        let mut r = Ring::new(LIMITS);
        r.load(vec![m(3), m(5), m(7)], 9, 1_000);
        // Three (the window) of this channel after position 2: one may have been removed.
        assert_eq!(r.decide_with_stream(2, Some(false)), Decision::Lost);
        // Position 3 is this channel's own message: held, so nothing newer was removed.
        assert_eq!(seqs(&r.decide(3)), [5, 7]);
    }

    #[test]
    fn eviction_by_count_age_and_bytes_is_remembered() {
        let mut r = Ring::new(LIMITS);
        r.load(vec![], 0, 1_000);
        for s in [1, 2, 3, 4] {
            r.append(m(s), 1_000);
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.decide(0), Decision::Lost, "1 was removed");
        // 1 is gone, but nothing after it: a client that had 1 misses only what is held.
        assert_eq!(seqs(&r.decide(1)), [2, 3, 4]);
        assert_eq!(seqs(&r.decide(2)), [3, 4]);
        r.evict(1_000 + 60_001);
        assert!(r.is_empty());
        assert_eq!(r.decide(3), Decision::Lost);
        assert_eq!(
            seqs(&r.decide(4)),
            Vec::<u64>::new(),
            "4 was the last: nothing missed"
        );
        let mut small = Ring::new(Limits {
            max_bytes: 4,
            ..LIMITS
        });
        small.load(vec![], 0, 1_000);
        small.append(m(1), 1_000);
        small.append(m(2), 1_000);
        assert_eq!(small.len(), 2);
        small.append(m(3), 1_000);
        assert_eq!(small.len(), 2);
        assert_eq!(
            small.decide(0),
            Decision::Lost,
            "1 left the ring for memory"
        );
        assert_eq!(seqs(&small.decide(1)), [2, 3]);
    }

    #[test]
    fn position_zero_is_decided_by_the_stream() {
        // The ring was made after the client's `ok` at 0 (its entry left and came back).
        let mut r = Ring::new(LIMITS);
        r.load(vec![m(2), m(4)], 5, 1_000);
        assert_eq!(r.decide(0), Decision::AskStream);
        // The stream never removed a message, and fewer than the window follow: recovered.
        assert_eq!(seqs(&r.decide_with_stream(0, Some(false))), [2, 4]);
        // It removed some: lost.
        assert_eq!(r.decide_with_stream(0, None), Decision::Lost);
        let mut full = Ring::new(LIMITS);
        full.load(vec![m(1), m(2), m(3)], 3, 1_000);
        assert_eq!(full.decide_with_stream(0, Some(false)), Decision::Lost);
    }

    #[test]
    fn an_unloaded_ring_proves_only_live_positions() {
        let mut r = Ring::new(LIMITS);
        r.append(m(20), 1_000);
        r.append(m(21), 1_000);
        assert_eq!(seqs(&r.decide(20)), [21]);
        assert_eq!(r.decide(19), Decision::AskStream);
    }
}
