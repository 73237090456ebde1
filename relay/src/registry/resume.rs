//! Resumes (docs/backend.md, *Resumes*): a connection that ended waits `events.graceSeconds`
//! in its entry (with how it ended) before its `Disconnected` is said; a client that comes
//! back within it naming the old connection makes the new connection's relay say `Resumed`
//! instead of that `Disconnected` and its own `Connected`.
//!
//! The events stream decides which, once: `Resumed` carries the message id of the old
//! connection's `Disconnected`, so the stream stores the first of the two and acknowledges
//! the other as a duplicate, naming the sequence of the one it kept. An entry that names the
//! connection it resumes (`resumes`) is unsettled until its relay learned the outcome and
//! wrote it again without; whoever ends an unsettled entry (its relay, or the survivor that
//! purges a dead relay) settles it first, so every chain of connections starts with one
//! `Connected` and ends with one `Disconnected`.

use std::time::Duration;

use async_nats::jetstream::publish::PublishAck;

use super::keys::{self, ConnEntry};
use super::{
    REQUEST_WITHIN, Registry, RegistryError, is_removal, lifecycle, name_of, now_ms, request_err,
};
use crate::events::{EventType, parse_connection_id};

/// How long a resume waits, once, for the old connection's relay to write that it ended (a
/// client may reconnect before its old relay finished closing it).
const ENDING_WAIT: Duration = Duration::from_millis(250);

/// Tries of a claim whose outcome is unknown (no acknowledgement) when ending an entry.
const CLAIM_TRIES: usize = 3;

impl Registry {
    /// How long a `Disconnected` waits for a resume (zero: resumes are off).
    pub fn grace(&self) -> Duration {
        self.events
            .as_ref()
            .map_or(Duration::ZERO, crate::events::Emitter::grace)
    }

    /// Whether a connection of (`sub`, `iss`) may resume `previous`: resumes are on, it is
    /// not anonymous, and `previous` ended at most `graceSeconds` ago with the same
    /// identity (its relay saw it end; if it has not yet, this waits for it once).
    pub async fn may_resume(&self, sub: Option<&str>, iss: Option<&str>, previous: &str) -> bool {
        let grace = self.grace();
        if grace.is_zero() || sub.is_none() {
            return false;
        }
        let Some((relay, n)) = parse_connection_id(previous) else {
            return false;
        };
        let key = keys::conn_key(&keys::relay_token(relay), n);
        for first in [true, false] {
            let entry = match self.read(&key).await {
                Ok(Some(e)) => e,
                Ok(None) => return false,
                Err(e) => {
                    tracing::debug!(error = %e, "resume: the previous connection not read");
                    return false;
                }
            };
            if entry.sub.as_deref() != sub || entry.iss.as_deref() != iss {
                return false;
            }
            match &entry.ended {
                Some(ended) => {
                    let limit = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
                    return now_ms().saturating_sub(ended.at) <= limit;
                }
                None if first => tokio::time::sleep(ENDING_WAIT).await,
                None => {}
            }
        }
        false
    }

    /// The connection entry at `key`, if the bucket holds one.
    async fn read(&self, key: &str) -> Result<Option<ConnEntry>, RegistryError> {
        let err = request_err("read");
        let fut = async {
            let stream = self
                .js
                .get_stream_no_info(super::stream_name(&self.bucket))
                .await
                .map_err(|e| err(e.to_string()))?;
            match stream
                .get_last_raw_message_by_subject(&self.subject(key))
                .await
            {
                Ok(m) if is_removal(Some(&m.headers)) => Ok(None),
                Ok(m) => Ok(serde_json::from_slice(&m.payload).ok()),
                Err(e)
                    if e.kind()
                        == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                {
                    Ok(None)
                }
                Err(e) => Err(err(e.to_string())),
            }
        };
        tokio::time::timeout(REQUEST_WITHIN, fut)
            .await
            .map_err(|_| RegistryError::Timeout { op: "read" })?
    }

    /// Settles the connection `id` just opened to resume another ([`Registry::opened`]):
    /// says `Resumed`, or `Connected` when the old connection was said to end or was
    /// resumed already; writes the entry again without `resumes`. Whether it resumed;
    /// `false` too when the outcome is unknown (NATS did not answer): the entry then stays
    /// unsettled, for whoever ends it.
    pub async fn settle_opened(&self, id: u64) -> bool {
        let Some(entry) = self.entry(id) else {
            return false;
        };
        let Ok(resumed) = self.claim(&entry, id, &self.name).await else {
            return false;
        };
        if !resumed {
            self.say(&lifecycle(
                &entry,
                id,
                &self.name,
                EventType::Connected,
                entry.connected_at,
            ));
        }
        // As it is now (it may have ended meanwhile), settled.
        if let Some(mut now) = self.entry(id) {
            now.resumes = None;
            self.write_entry(id, &now);
        }
        resumed
    }

    /// Says the `Disconnected` of this relay's connection `id` after its grace (settling a
    /// resume it still names), then deletes its entry.
    pub(super) async fn end(&self, id: u64) {
        let Some(entry) = self.entry(id) else {
            return;
        };
        self.settle_unsettled(&entry, id, &self.name).await;
        self.say_ended(id, &entry);
    }

    /// Settles the unsettled connection entries among a dead relay's (or a previous run's)
    /// `entries`, before their `Disconnected` is said.
    pub(super) async fn settle_leftovers(&self, entries: &[(String, bytes::Bytes)]) {
        for (key, value) in entries {
            let Some((token, id)) = keys::conn_of(key) else {
                continue;
            };
            let Ok(entry) = serde_json::from_slice::<ConnEntry>(value) else {
                continue;
            };
            if entry.resumes.is_some() {
                self.settle_unsettled(&entry, id, &name_of(&entry, token))
                    .await;
            }
        }
    }

    /// For an entry that still names the connection it resumes: says `Resumed` or
    /// `Connected`, whichever the stream has not already decided against, and waits for
    /// it; a claim that gets no answer is tried again, then taken as not resumed.
    async fn settle_unsettled(&self, entry: &ConnEntry, id: u64, name: &str) {
        if entry.resumes.is_none() {
            return;
        }
        let mut resumed = false;
        for _ in 0..CLAIM_TRIES {
            match self.claim(entry, id, name).await {
                Ok(r) => {
                    resumed = r;
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "resume: claim not answered"),
            }
        }
        if !resumed
            && let Some(o) = self.events.as_ref().and_then(|ev| {
                ev.outgoing(
                    &lifecycle(entry, id, name, EventType::Connected, entry.connected_at),
                    None,
                )
            })
        {
            // Sent and awaited here, before the `Disconnected` that follows.
            if let Err(e) = self.publish_acked(&o).await {
                tracing::debug!(error = %e, "resume: Connected not stored");
                self.event_failed(EventType::Connected);
            } else {
                self.event_published(EventType::Connected);
            }
        }
    }

    /// Publishes the `Resumed` of connection `id` (of relay `name`) resuming
    /// `entry.resumes`, and learns from the stream whether it is the one stored for the
    /// old connection's end: its own acknowledgement, or the duplicate's that names an
    /// earlier copy of this same claim.
    async fn claim(&self, entry: &ConnEntry, id: u64, name: &str) -> Result<bool, RegistryError> {
        let (Some(events), Some(previous)) = (self.events.as_ref(), entry.resumes.as_deref())
        else {
            return Ok(false);
        };
        let mut e = lifecycle(entry, id, name, EventType::Resumed, entry.connected_at);
        e.previous = Some(previous.to_owned());
        let Some(o) = events.outgoing(&e, None) else {
            return Ok(false);
        };
        let ack = self.publish_acked(&o).await?;
        if !ack.duplicate {
            self.event_published(EventType::Resumed);
            return Ok(true);
        }
        let stream = events.stream().unwrap_or_default();
        let err = request_err("claim");
        let kept = tokio::time::timeout(REQUEST_WITHIN, async {
            self.js
                .get_stream_no_info(stream)
                .await
                .map_err(|e| err(e.to_string()))?
                .get_raw_message(ack.sequence)
                .await
                .map_err(|e| err(e.to_string()))
        })
        .await
        .map_err(|_| RegistryError::Timeout { op: "claim" })??;
        let kept: serde_json::Value = serde_json::from_slice(&kept.payload).unwrap_or_default();
        Ok(kept["type"] == EventType::Resumed.name() && kept["connection"] == e.connection)
    }

    /// Publishes an event to the stream and waits for its acknowledgement.
    async fn publish_acked(
        &self,
        o: &crate::events::Outgoing,
    ) -> Result<PublishAck, RegistryError> {
        let err = request_err("event");
        let fut = async {
            self.js
                .publish_with_headers(o.subject.clone(), o.headers(), o.payload.clone())
                .await
                .map_err(|e| err(e.to_string()))?
                .await
                .map_err(|e| err(e.to_string()))
        };
        tokio::time::timeout(REQUEST_WITHIN, fut)
            .await
            .map_err(|_| RegistryError::Timeout { op: "event" })?
    }
}
