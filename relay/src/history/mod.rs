//! Resumable channels (docs/protocol.md section 8): bindings with `history` keep their
//! messages in a JetStream stream; live messages reach the relay republished by the stream
//! with their position; a client that resumes gets what it missed from the entry's ring,
//! read from the stream once per relay and channel.
//!
//! - [`ring`]: the retained messages of one channel and the resume decision (pure);
//! - [`stream`]: the stream's configuration and the JetStream reads (I/O);
//! - here: [`Resumable`], one live channel's history as the hub uses it, and [`Streams`],
//!   the epochs of the streams the relay keeps in place.

pub mod ring;
pub mod stream;

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

use async_nats::HeaderMap;

use crate::config::{Config, History};
use crate::template::parse_subject_template;
pub use ring::Arrival;
use ring::{Decision, Limits, Ring, Stored};

pub use crate::clock::now_ms;

/// Payload bytes a relay keeps in memory for one resumable channel.
pub const RING_BYTES: usize = 4 << 20;

/// The epochs of the streams this relay keeps in place (stream name to epoch), once
/// JetStream confirmed them.
#[derive(Debug, Default)]
pub struct Streams {
    epochs: RwLock<HashMap<String, String>>,
}

impl Streams {
    /// The stream's epoch, if it is in place.
    pub fn epoch(&self, stream: &str) -> Option<String> {
        self.epochs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(stream)
            .cloned()
    }

    /// Records the epoch; returns the previous one when it changed (the stream was
    /// recreated: every position of the old one is void).
    pub fn set(&self, stream: &str, epoch: String) -> Option<String> {
        let mut g = self
            .epochs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match g.insert(stream.to_owned(), epoch.clone()) {
            Some(old) if old != epoch => Some(old),
            _ => None,
        }
    }

    /// How many streams are in place.
    pub fn ready(&self) -> usize {
        self.epochs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

/// The stream configurations a config asks for (one per binding with history).
pub fn wanted_streams(config: &Config) -> Vec<async_nats::jetstream::stream::Config> {
    let mut out: Vec<async_nats::jetstream::stream::Config> = Vec::new();
    for b in &config.bindings {
        let (Some(h), Ok(tokens)) = (&b.history, parse_subject_template(&b.subject)) else {
            continue;
        };
        if out.iter().any(|c| c.name == h.stream) {
            continue;
        }
        let filter = crate::config::subject_filter(&tokens);
        out.push(stream::stream_config(
            h,
            &filter,
            config.limits.max_message_bytes,
        ));
    }
    out
}

/// A live message as the stream republished it: its position, and the position of the
/// previous message on its subject (`0`: none held).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// `Nats-Sequence`.
    pub seq: u64,
    /// `Nats-Last-Sequence`.
    pub prev: u64,
}

/// Reads the republish headers. Pure.
pub fn position(headers: Option<&HeaderMap>) -> Option<Position> {
    let h = headers?;
    let seq = h.get("Nats-Sequence")?.as_str().parse().ok()?;
    let prev = h
        .get("Nats-Last-Sequence")
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or(0);
    Some(Position { seq, prev })
}

/// One live resumable channel: which stream and subject it reads, and its ring.
#[derive(Debug)]
pub struct Resumable {
    /// The stream.
    pub stream: String,
    /// The subject of the channel in the stream (what the stream captured).
    pub subject: String,
    /// Window per channel (the stream's `max_msgs_per_subject`).
    pub max_messages: usize,
    ring: Mutex<Ring>,
    /// Loads are made once per entry, whoever asks first.
    loading: tokio::sync::Mutex<()>,
}

/// How a resume ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Recovered from `from`: `replay` follows, then live messages.
    Recovered {
        /// The client's position.
        from: u64,
        /// What it missed, in order.
        replay: Vec<Stored>,
    },
    /// Not recovered (or not asked): live from `head`.
    Fresh {
        /// The position live delivery starts after.
        head: u64,
        /// Whether a resume was asked (then `recovered: false` is said).
        asked: bool,
    },
}

fn lock(m: &Mutex<Ring>) -> std::sync::MutexGuard<'_, Ring> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Resumable {
    /// A channel of the binding whose history is `h`, on `subject`.
    pub fn new(h: &History, subject: &str) -> Self {
        Self {
            stream: h.stream.clone(),
            subject: subject.to_owned(),
            max_messages: h.max_messages as usize,
            ring: Mutex::new(Ring::new(Limits {
                max_messages: h.max_messages as usize,
                max_age_ms: h.max_age_seconds.saturating_mul(1000),
                max_bytes: RING_BYTES,
            })),
            loading: tokio::sync::Mutex::new(()),
        }
    }

    /// The ring, locked: the hub delivers and joins under this lock, so a resume and live
    /// delivery never interleave.
    pub fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        lock(&self.ring)
    }

    /// Runs `f` with the ring locked ([`Resumable::ring`]).
    pub fn with_ring<T>(&self, f: impl FnOnce(&mut Ring) -> T) -> T {
        f(&mut self.ring())
    }

    /// Makes the ring complete (once per entry; later callers wait for the first). Returns
    /// whether this call read the stream.
    pub async fn ensure_loaded(
        &self,
        client: &async_nats::Client,
    ) -> Result<bool, stream::StreamError> {
        let _one = self.loading.lock().await;
        if lock(&self.ring).is_loaded() {
            return Ok(false);
        }
        let js = async_nats::jetstream::new(client.clone());
        let last = stream::last_sequence(&js, &self.stream).await?;
        let read = stream::read_after(
            client,
            &self.stream,
            &self.subject,
            0,
            None,
            self.max_messages,
        )
        .await?;
        lock(&self.ring).load(read, last, now_ms());
        Ok(true)
    }

    /// What the stream says of the client's position, when the ring alone cannot decide a
    /// resume (`None`: no question to ask). `since` is the client's `(epoch, position)`,
    /// `epoch` the stream's.
    pub async fn check(
        &self,
        client: &async_nats::Client,
        epoch: &str,
        since: Option<(&str, u64)>,
    ) -> Result<Option<Option<bool>>, stream::StreamError> {
        let Some((their_epoch, pos)) = since else {
            return Ok(None);
        };
        if their_epoch != epoch {
            return Ok(None);
        }
        let ask = {
            let mut ring = lock(&self.ring);
            ring.evict(now_ms());
            ring.decide(pos) == Decision::AskStream
        };
        if !ask {
            return Ok(None);
        }
        if pos == 0 {
            // No message sits at 0: what proves nothing was removed after it is a stream
            // that never removed any (its first message is still the first ever stored).
            let js = async_nats::jetstream::new(client.clone());
            let first = stream::first_sequence(&js, &self.stream).await?;
            return Ok(Some((first <= 1).then_some(false)));
        }
        stream::held(client, &self.stream, pos, &self.subject)
            .await
            .map(Some)
    }

    /// Decides a (re)subscribe with the ring locked (so the replay and live delivery cannot
    /// interleave); `held` is what [`Resumable::check`] returned. Pure.
    pub fn decide(
        ring: &mut Ring,
        epoch: &str,
        since: Option<(&str, u64)>,
        held: Option<Option<bool>>,
    ) -> Start {
        let Some((their_epoch, pos)) = since else {
            return Start::Fresh {
                head: ring.head(),
                asked: false,
            };
        };
        if their_epoch != epoch {
            return Start::Fresh {
                head: ring.head(),
                asked: true,
            };
        }
        ring.evict(now_ms());
        let decision = match (ring.decide(pos), held) {
            (Decision::AskStream, Some(held)) => ring.decide_with_stream(pos, held),
            (d, _) => d,
        };
        match decision {
            Decision::Replay(replay) => Start::Recovered { from: pos, replay },
            Decision::Lost | Decision::AskStream => Start::Fresh {
                head: ring.head(),
                asked: true,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn m(seq: u64) -> Stored {
        Stored {
            seq,
            at_ms: now_ms(),
            payload: Bytes::from_static(b"x"),
        }
    }

    fn ring() -> Ring {
        Ring::new(Limits {
            max_messages: 10,
            max_age_ms: u64::MAX,
            max_bytes: 1 << 20,
        })
    }

    #[test]
    fn live_messages_are_chained_deduplicated_and_gaps_found() {
        let mut r = ring();
        r.load(vec![m(2)], 5, 0);
        assert_eq!(r.accept(&m(6), 2, 0), Arrival::Deliver { prev: 2 });
        assert_eq!(r.accept(&m(6), 2, 0), Arrival::Duplicate);
        assert_eq!(r.accept(&m(4), 0, 0), Arrival::Duplicate);
        // 9 says the message before it was 8, which was never seen: read after 6 first.
        assert_eq!(r.accept(&m(9), 8, 0), Arrival::Gap { after: 6 });
        assert_eq!(r.accept(&m(8), 6, 0), Arrival::Deliver { prev: 6 });
        assert_eq!(r.accept(&m(9), 8, 0), Arrival::Deliver { prev: 8 });
        // prev 0: the previous one was removed from the stream; nothing to fill.
        assert_eq!(r.accept(&m(12), 0, 0), Arrival::Deliver { prev: 9 });
    }

    #[test]
    fn resumes_are_decided_by_epoch_and_ring() {
        let mut r = ring();
        r.load(vec![m(3), m(7)], 9, now_ms());
        assert_eq!(
            Resumable::decide(&mut r, "e", None, None),
            Start::Fresh {
                head: 9,
                asked: false
            }
        );
        assert_eq!(
            Resumable::decide(&mut r, "e", Some(("old", 3)), None),
            Start::Fresh {
                head: 9,
                asked: true
            }
        );
        match Resumable::decide(&mut r, "e", Some(("e", 3)), None) {
            Start::Recovered { from, replay } => {
                assert_eq!(from, 3);
                assert_eq!(replay.iter().map(|m| m.seq).collect::<Vec<_>>(), [7]);
            }
            other => panic!("{other:?}"),
        }
        // Position 5 is not held: without the stream's answer it is not recovered.
        assert!(matches!(
            Resumable::decide(&mut r, "e", Some(("e", 5)), None),
            Start::Fresh { asked: true, .. }
        ));
        assert!(matches!(
            Resumable::decide(&mut r, "e", Some(("e", 5)), Some(Some(false))),
            Start::Recovered { from: 5, .. }
        ));
    }

    #[test]
    fn republish_headers_are_read() {
        let mut h = HeaderMap::new();
        h.insert("Nats-Sequence", "17");
        h.insert("Nats-Last-Sequence", "11");
        assert_eq!(position(Some(&h)), Some(Position { seq: 17, prev: 11 }));
        let mut h = HeaderMap::new();
        h.insert("Nats-Sequence", "3");
        assert_eq!(position(Some(&h)), Some(Position { seq: 3, prev: 0 }));
        assert_eq!(position(None), None);
        let mut h = HeaderMap::new();
        h.insert("Nats-Sequence", "x");
        assert_eq!(position(Some(&h)), None);
    }

    #[test]
    fn epochs_report_recreation() {
        let s = Streams::default();
        assert_eq!(s.set("A", "e1".into()), None);
        assert_eq!(s.set("A", "e1".into()), None);
        assert_eq!(s.set("A", "e2".into()), Some("e1".into()));
        assert_eq!(s.epoch("A").as_deref(), Some("e2"));
        assert_eq!(s.ready(), 1);
    }
}
