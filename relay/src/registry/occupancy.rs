//! Channel occupancy (docs/backend.md, *Occupied and Vacated*): `Occupied` when a channel gets
//! its first subscriber across the fleet, `Vacated` when its last one leaves.
//!
//! Each relay counts its own subscriptions per channel; when its count leaves or reaches 0 it
//! adds itself to, or removes itself from, the set of relays in `occ.<chan>`, by a write that
//! JetStream takes only if the key is still as the relay read it (its last sequence). The
//! write that makes the set non-empty says `Occupied`, the one that empties it (a delete)
//! says `Vacated`, each with the write's sequence in its message id: whichever relay's write
//! won, the event is said once. A dead relay is taken out of every set by whoever purges it.
//! A relay that dies between its write and its event loses that one event.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::keys::{self, VALUE_VERSION};
use super::{
    DELETE_MARKER_TTL, REQUEST_WITHIN, Registry, RegistryError, is_removal, now_ms, request_err,
    stream_name,
};
use crate::events::{Event, EventType};

/// Tries of one change of a set when other relays change it at the same time.
const TRIES: usize = 16;

/// The value of `occ.<chan>`: the relays with a subscriber to the channel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Occupants {
    /// [`VALUE_VERSION`].
    pub v: u32,
    /// Relay key tokens.
    pub relays: BTreeSet<String>,
}

/// This relay's subscriptions per channel, and the changes of its membership to make, in
/// order.
#[derive(Debug)]
pub struct Counts {
    counts: Mutex<HashMap<String, u32>>,
    changes: Mutex<Option<mpsc::UnboundedSender<(String, bool)>>>,
}

impl Counts {
    /// Counts and the receiver of the changes for [`Registry::occupancy_loop`].
    pub fn new() -> (Self, mpsc::UnboundedReceiver<(String, bool)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                counts: Mutex::new(HashMap::new()),
                changes: Mutex::new(Some(tx)),
            },
            rx,
        )
    }

    /// One subscription to `channel` more (`up`) or less.
    fn count(&self, channel: &str, up: bool) {
        let change = {
            let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            let n = c.entry(channel.to_owned()).or_default();
            *n = if up {
                n.saturating_add(1)
            } else {
                n.saturating_sub(1)
            };
            match (*n, up) {
                (1, true) => true,
                (0, false) => {
                    c.remove(channel);
                    true
                }
                _ => false,
            }
        };
        if change
            && let Some(tx) = self
                .changes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
        {
            let _ = tx.send((channel.to_owned(), up));
        }
    }

    /// No more changes: the loop ends once it made those queued.
    pub fn close(&self) {
        drop(
            self.changes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
    }
}

/// Held by a subscription while it lasts (attached to it): its channel counted.
#[derive(Debug)]
pub struct Occupying {
    registry: Arc<Registry>,
    channel: String,
}

impl Drop for Occupying {
    fn drop(&mut self) {
        if let Some(c) = &self.registry.occupancy {
            c.count(&self.channel, false);
        }
    }
}

impl Registry {
    /// A subscription to `channel` started on this relay: counted while the returned guard
    /// lives; `None` when occupancy events are off.
    pub fn occupying(self: &Arc<Self>, channel: &str) -> Option<Occupying> {
        let counts = self.occupancy.as_ref()?;
        counts.count(channel, true);
        Some(Occupying {
            registry: self.clone(),
            channel: channel.to_owned(),
        })
    }

    /// Makes this relay's membership changes in order, until [`Counts::close`].
    pub(super) async fn occupancy_loop(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<(String, bool)>,
    ) {
        while let Some((channel, add)) = rx.recv().await {
            if let Err(e) = self.occupy(&channel, &self.relay, add).await {
                tracing::debug!(error = %e, "occupancy: membership not changed");
            }
        }
    }

    /// Adds `relay` to the occupants of `channel`, or removes it, and says `Occupied` or
    /// `Vacated` when that made the set non-empty or empty.
    async fn occupy(&self, channel: &str, relay: &str, add: bool) -> Result<(), RegistryError> {
        let key = format!("occ.{}", keys::channel_token(channel));
        for _ in 0..TRIES {
            let (seq, mut occupants) = self.occupants(&key).await?;
            let was_empty = occupants.relays.is_empty();
            let changed = if add {
                occupants.relays.insert(relay.to_owned())
            } else {
                occupants.relays.remove(relay)
            };
            if !changed {
                return Ok(());
            }
            let mut h = HeaderMap::new();
            h.insert(
                "Nats-Expected-Last-Subject-Sequence",
                seq.to_string().as_str(),
            );
            let value = if occupants.relays.is_empty() {
                h.insert("KV-Operation", "DEL");
                h.insert("Nats-TTL", DELETE_MARKER_TTL.as_secs().to_string().as_str());
                Bytes::new()
            } else {
                occupants.v = VALUE_VERSION;
                Bytes::from(serde_json::to_vec(&occupants).unwrap_or_default())
            };
            let sent = tokio::time::timeout(REQUEST_WITHIN, async {
                self.js
                    .publish_with_headers(self.subject(&key), h, value)
                    .await?
                    .await
            })
            .await
            .map_err(|_| RegistryError::Timeout { op: "occupancy" })?;
            match sent {
                Ok(ack) => {
                    let kind = match (was_empty, occupants.relays.is_empty()) {
                        (true, false) => EventType::Occupied,
                        (false, true) => EventType::Vacated,
                        _ => return Ok(()),
                    };
                    self.say_channel(kind, channel, ack.sequence);
                    return Ok(());
                }
                // Another relay changed the set since it was read: read it again.
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {}
                Err(e) => return Err(request_err("occupancy")(e.to_string())),
            }
        }
        Err(request_err("occupancy")(format!(
            "the set changed {TRIES} times while this relay tried to change it"
        )))
    }

    /// The last sequence of `key` (0: none) and the occupants it names.
    async fn occupants(&self, key: &str) -> Result<(u64, Occupants), RegistryError> {
        let err = request_err("occupancy");
        let fut = async {
            let stream = self
                .js
                .get_stream_no_info(stream_name(&self.bucket))
                .await
                .map_err(|e| err(e.to_string()))?;
            match stream
                .get_last_raw_message_by_subject(&self.subject(key))
                .await
            {
                Ok(m) if is_removal(Some(&m.headers)) => Ok((m.sequence, Occupants::default())),
                Ok(m) => Ok((
                    m.sequence,
                    serde_json::from_slice(&m.payload).unwrap_or_default(),
                )),
                Err(e)
                    if e.kind()
                        == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                {
                    Ok((0, Occupants::default()))
                }
                Err(e) => Err(err(e.to_string())),
            }
        };
        tokio::time::timeout(REQUEST_WITHIN, fut)
            .await
            .map_err(|_| RegistryError::Timeout { op: "occupancy" })?
    }

    /// Says `Occupied` or `Vacated` of `channel`, the set's write at `seq` making it so.
    fn say_channel(&self, kind: EventType, channel: &str, seq: u64) {
        let event = Event {
            kind,
            sub: None,
            iss: None,
            connection: String::new(),
            previous: None,
            relay: self.name.clone(),
            channel: Some(channel.to_owned()),
            by_server: false,
            reason: None,
            close_code: None,
            at: now_ms(),
            duration_ms: None,
            revision: Some(seq),
        };
        self.event(&event, Some(seq));
    }

    /// Takes `relay` (a dead one, or this relay's previous run) out of every channel's
    /// occupants; returns how many sets it was in.
    pub(super) async fn vacate(&self, relay: &str) -> Result<usize, RegistryError> {
        if self.occupancy.is_none() {
            return Ok(0);
        }
        let channels: Vec<String> = self
            .values(&["occ.>".to_owned()])
            .await?
            .into_iter()
            .filter(|(_, v)| {
                serde_json::from_slice::<Occupants>(v).is_ok_and(|o| o.relays.contains(relay))
            })
            .filter_map(|(k, _)| k.strip_prefix("occ.").and_then(keys::channel_of))
            .collect();
        for channel in &channels {
            self.occupy(channel, relay, false).await?;
        }
        Ok(channels.len())
    }
}
