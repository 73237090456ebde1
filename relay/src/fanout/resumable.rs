//! Resumable channels in the hub: a subscriber joins under the ring's lock (the `ok`, the
//! replay and the first live message cannot interleave, so nothing is lost or doubled); a
//! republished message is offered to the ring and fanned out under it; a gap is filled from
//! the stream; a replay or fill the client's queue cannot take at once is paced.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::deliver::{Behind, Queued, fan_out_at, fan_out_paced, queue_replay};
use super::entry::{SubKey, SubjectEntry, Target, read, write};
use super::{EndReason, Hub, SubscribeError};
use crate::conn::Conn;
use crate::conn::close::Cause;
use crate::history::ring::Stored;
use crate::history::{self, Arrival, Resumable, Start, stream};
use crate::protocol::{RequestId, Since, encode_ok_position, with_data};

/// How long a gap fill retries JetStream before the channel's subscribers are told to
/// subscribe again.
const FILL_WITHIN: Duration = Duration::from_secs(10);

/// A paced replay (or gap fill) waits this long at first for its client's queue to take
/// more, doubling up to [`PACE_MAX`] while it does not.
const PACE_MIN: Duration = Duration::from_millis(2);
const PACE_MAX: Duration = Duration::from_millis(100);

/// A paced replay whose client's queue took nothing for this long gives up: the client is
/// closed as a slow consumer (and counted).
const PACE_STALL: Duration = Duration::from_secs(30);

impl Hub {
    /// A resumable channel: complete the ring (once per entry), decide the resume (asking
    /// the stream only when the ring cannot tell), then, under the ring's lock, queue the
    /// `ok`, the replay, and make the subscriber live. A replay the client's queue cannot
    /// take at once is paced ([`Hub::catch_up`]): never a slow-consumer close.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn join_resumable(
        self: &Arc<Self>,
        entry: &Arc<SubjectEntry>,
        res: &Resumable,
        target: &Target,
        conn: &Arc<Conn>,
        channel: &str,
        id: Option<&RequestId>,
        since: Option<&Since>,
        data: Option<&str>,
        answer: Option<super::Answer<'_>>,
    ) -> Result<(), SubscribeError> {
        let m = &self.metrics;
        let unavailable = |e: stream::StreamError| {
            m.history(&m.history_reads, "error");
            if since.is_some() {
                m.history(&m.history_resumes, "unavailable");
            }
            SubscribeError::History(e.to_string())
        };
        if res.ensure_loaded(&self.client).await.map_err(unavailable)? {
            m.history(&m.history_reads, "load");
        }
        let Some(epoch) = self.streams.epoch(&res.stream) else {
            if since.is_some() {
                m.history(&m.history_resumes, "unavailable");
            }
            return Err(SubscribeError::History(format!(
                "stream {} is not in place yet",
                res.stream
            )));
        };
        let asked = since.map(|s| (s.epoch.as_str(), s.seq));
        let held = res
            .check(&self.client, &epoch, asked)
            .await
            .map_err(unavailable)?;
        if held.is_some() {
            m.history(&m.history_reads, "check");
        }
        let paced = res.with_ring(|ring| {
            let start = Resumable::decide(ring, &epoch, asked, held);
            let subs = read(&entry.subscribers);
            if !conn.holds(channel, &target.key) {
                return Err(SubscribeError::Ended);
            }
            let (pos, recovered, replay) = match start {
                Start::Recovered { from, replay } => (from, Some(true), replay),
                Start::Fresh { head, asked } => (head, asked.then_some(false), Vec::new()),
            };
            if since.is_some() {
                let outcome = if recovered == Some(true) {
                    "recovered"
                } else {
                    "not_recovered"
                };
                m.history(&m.history_resumes, outcome);
            }
            super::queue_ok(
                conn,
                with_data(encode_ok_position(id, &epoch, pos, recovered), data),
                answer,
            );
            let name: Arc<str> = Arc::from(channel);
            let Some(sub) = subs.get(&(conn.id, name.clone())) else {
                return Ok(None);
            };
            match queue_replay(conn, &name, pos, &replay) {
                Queued::All(_) => {
                    sub.live.store(true, Ordering::Release);
                    Ok(None)
                }
                Queued::Upto(prev) => Ok(Some((name, sub.serial, prev))),
                Queued::Closing => Ok(None),
            }
        })?;
        if let Some((name, serial, prev)) = paced {
            self.pace(entry, &target.key, conn, name, serial, prev);
        }
        Ok(())
    }

    /// Starts a paced catch-up for a subscriber the client's queue could not take at once.
    pub(super) fn pace(
        self: &Arc<Self>,
        entry: &Arc<SubjectEntry>,
        key: &str,
        conn: &Arc<Conn>,
        channel: Arc<str>,
        serial: u64,
        prev: u64,
    ) {
        self.tasks.spawn(self.clone().catch_up(
            entry.clone(),
            key.to_owned(),
            conn.clone(),
            channel,
            serial,
            prev,
        ));
    }

    /// A subscriber joined but not live, that holds every message of the channel up to
    /// `prev`: queues what follows from the ring as its client's queue empties, then makes
    /// it live, both under the ring's lock (live messages are appended under it, so none is
    /// lost or doubled in between). The ring dropping a message it still needs ends the
    /// subscription with an `unsubscribed` notice (`unavailable`): the client subscribes
    /// again from its position, and the stream decides. A client that takes nothing for
    /// [`PACE_STALL`] is closed as a slow consumer.
    pub(super) async fn catch_up(
        self: Arc<Self>,
        entry: Arc<SubjectEntry>,
        key: String,
        conn: Arc<Conn>,
        channel: Arc<str>,
        serial: u64,
        mut prev: u64,
    ) {
        let Some(res) = entry.resumable.clone() else {
            return;
        };
        let sub_key: SubKey = (conn.id, channel.clone());
        let mut pause = PACE_MIN;
        let mut progress_at = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = entry.cancel.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
            let step = res.with_ring(|ring| {
                let subs = read(&entry.subscribers);
                let Some(sub) = subs.get(&sub_key).filter(|s| s.serial == serial) else {
                    return Some(Queued::Closing);
                };
                let rest = ring.continue_after(prev)?;
                let queued = queue_replay(&conn, &channel, prev, &rest);
                if let Queued::All(_) = queued {
                    sub.live.store(true, Ordering::Release);
                }
                Some(queued)
            });
            match step {
                Some(Queued::All(_) | Queued::Closing) => return,
                Some(Queued::Upto(p)) if p > prev => {
                    prev = p;
                    pause = PACE_MIN;
                    progress_at = tokio::time::Instant::now();
                }
                Some(Queued::Upto(_)) => {
                    if progress_at.elapsed() >= PACE_STALL {
                        tracing::info!(conn = conn.id, %channel, "paced replay: the client took nothing; closing it as a slow consumer");
                        self.metrics.slow_consumers.inc();
                        conn.outbox.close(Cause::SlowConsumer);
                        return;
                    }
                    pause = (pause * 2).min(PACE_MAX);
                }
                None => {
                    tracing::debug!(conn = conn.id, %channel, after = prev, "paced replay: the ring no longer holds what follows; the client subscribes again");
                    self.leave(&key, &entry, &sub_key, serial);
                    return;
                }
            }
        }
    }

    /// Ends one subscriber (the one `serial` names) with an `unsubscribed` notice
    /// (`unavailable`): it subscribes again from its position.
    pub(super) fn leave(
        &self,
        key: &str,
        entry: &Arc<SubjectEntry>,
        sub_key: &SubKey,
        serial: u64,
    ) {
        let removed = {
            let mut subs = write(&entry.subscribers);
            if subs.get(sub_key).is_some_and(|s| s.serial == serial) {
                subs.remove(sub_key)
            } else {
                None
            }
        };
        if let Some(s) = removed {
            s.unsubscribed(key, "unavailable");
        }
        self.release_if_empty(key, entry);
    }

    /// Delivers a republished message of a resumable channel, reading the stream first when
    /// messages before it were missed. An error ends the entry (its subscribers resubscribe
    /// with their position, and the stream decides).
    pub(super) async fn deliver(
        self: &Arc<Self>,
        key: &str,
        entry: &Arc<SubjectEntry>,
        res: &Resumable,
        msg: async_nats::Message,
    ) -> Result<(), EndReason> {
        let Some(pos) = history::position(msg.headers.as_ref()) else {
            tracing::warn!(subject = %msg.subject, "a republished message without Nats-Sequence");
            return Ok(());
        };
        let now = history::now_ms();
        let m = Stored {
            seq: pos.seq,
            at_ms: now,
            payload: msg.payload,
        };
        if let Arrival::Gap { .. } = self.offer(entry, res, &m, pos.prev, now, None) {
            self.fill(key, entry, res, Some(m.seq)).await?;
            // Paced like the fill before it: it may find the queues the fill filled.
            let mut behind = Vec::new();
            let verdict = self.offer(
                entry,
                res,
                &m,
                pos.prev,
                history::now_ms(),
                Some(&mut behind),
            );
            self.pace_all(key, entry, behind);
            if let Arrival::Gap { after } = verdict {
                // The stream no longer holds what came before: never skip silently.
                tracing::warn!(stream = %res.stream, subject = %res.subject, after, "history hole the stream cannot fill");
                self.metrics.history(&self.metrics.history_gaps, "lost");
                return Err(EndReason::HistoryHole);
            }
            self.metrics.history(&self.metrics.history_gaps, "filled");
        }
        Ok(())
    }

    /// Reads the messages after the last one delivered (and before `before`) from the
    /// stream and delivers them, paced: a subscriber whose queue cannot take them (a big
    /// channel after a NATS reconnect) catches up from the ring ([`Hub::catch_up`]) instead
    /// of being closed as a slow consumer.
    pub(super) async fn fill(
        self: &Arc<Self>,
        key: &str,
        entry: &Arc<SubjectEntry>,
        res: &Resumable,
        before: Option<u64>,
    ) -> Result<(), EndReason> {
        let after = res.with_ring(|r| r.last_seen());
        // JetStream may be briefly unable to answer (a NATS server lost, the stream's leader
        // being re-elected): retry with backoff, bounded, before giving the entry up.
        let mut pause = Duration::from_millis(100);
        let give_up = tokio::time::Instant::now() + FILL_WITHIN;
        let read = loop {
            self.metrics.history(&self.metrics.history_reads, "fill");
            match stream::read_after(
                &self.client,
                &res.stream,
                &res.subject,
                after,
                before,
                res.max_messages,
            )
            .await
            {
                Ok(read) => break read,
                Err(e) => {
                    self.metrics.history(&self.metrics.history_reads, "error");
                    if tokio::time::Instant::now() + pause > give_up {
                        tracing::warn!(error = %e, "history fill failed; giving the channel up");
                        return Err(EndReason::HistoryUnavailable);
                    }
                    tracing::debug!(error = %e, "history fill failed; retrying");
                    tokio::select! {
                        () = entry.cancel.cancelled() => return Ok(()),
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        };
        let now = history::now_ms();
        let mut behind = Vec::new();
        for m in &read {
            // Read from the stream: in order after `after`, so no hole check.
            self.offer(entry, res, m, 0, now, Some(&mut behind));
        }
        self.pace_all(key, entry, behind);
        Ok(())
    }

    pub(super) fn pace_all(
        self: &Arc<Self>,
        key: &str,
        entry: &Arc<SubjectEntry>,
        behind: Vec<Behind>,
    ) {
        for (conn, channel, serial, prev) in behind {
            self.pace(entry, key, &conn, channel, serial, prev);
        }
    }

    /// Offers a message to a resumable entry: appended and fanned out under the ring lock
    /// when it is the next one. With `behind`, the fan-out is paced: a subscriber whose
    /// queue has no room leaves live delivery and is listed there, to catch up.
    pub(super) fn offer(
        &self,
        entry: &SubjectEntry,
        res: &Resumable,
        m: &Stored,
        prev: u64,
        now: u64,
        behind: Option<&mut Vec<Behind>>,
    ) -> Arrival {
        // The fan-out runs under the ring's lock, after the append.
        let mut ring = res.ring();
        let verdict = ring.accept(m, prev, now);
        if let Arrival::Deliver { prev } = verdict {
            match behind {
                None => fan_out_at(entry, m, prev, &self.metrics, self.max_payload),
                Some(_) if m.payload.len() > self.max_payload => {
                    let n = read(&entry.subscribers).len() as u64;
                    self.metrics.drop_msgs("too_large", n);
                }
                Some(behind) => behind.extend(fan_out_paced(entry, m, prev)),
            }
        }
        drop(ring);
        verdict
    }
}
