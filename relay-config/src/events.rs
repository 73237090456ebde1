//! What the backend hears of the connections (lifecycle events) and how it acts on them (the
//! control service), both over NATS (docs/backend.md).

use serde::{Deserialize, Serialize};

use super::{Config, ValidationError};

/// Lifecycle events: the relays publish one JSON message per event on
/// `<subject>.<Type>`. Needs the connection registry (`registry`): it is what lets a
/// surviving relay say `Disconnected` for the connections of a relay that died.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Events {
    /// The subject prefix, fixed (no wildcards): an event goes to `<subject>.<Type>`. The
    /// operator renders `<spec.events.subject>.<namespace>.<gateway>`.
    pub subject: String,
    /// The types published. Default: the connections' ([`EventType::CONNECTIONS`]); a
    /// channel's `Occupied` and `Vacated` only when named (each costs the relays a registry
    /// round trip when a channel gains or loses its last subscriber on one of them).
    #[serde(default = "default_event_types")]
    pub types: Vec<EventType>,
    /// Also store them in a JetStream stream (at least once, duplicates removed by message
    /// id). Absent: plain NATS messages, heard by whoever is subscribed at the time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable: Option<DurableEvents>,
    /// How long a relay waits before it says a connection's `Disconnected`: a client that
    /// connects again within it naming the old connection (`?resume=`) makes the new one's
    /// relay say `Resumed` instead of the pair. 0 (default): said at once. At most 60;
    /// above 0 it needs `durable` and the types `Connected`, `Disconnected` and `Resumed`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub grace_seconds: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The largest `events.graceSeconds`.
pub const MAX_GRACE_SECONDS: u64 = 60;

/// One kind of lifecycle event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EventType {
    /// A connection was admitted (after the upgrade).
    Connected,
    /// A connection was admitted that resumes one that ended within `graceSeconds`: said
    /// instead of the old one's `Disconnected` and the new one's `Connected`.
    Resumed,
    /// A connection ended, for whatever reason, its relay's death included.
    Disconnected,
    /// A subscription was confirmed (its `ok` sent).
    Subscribed,
    /// A subscription ended while its connection stayed.
    Unsubscribed,
    /// A channel got its first subscriber across the relays.
    Occupied,
    /// A channel lost its last subscriber across the relays.
    Vacated,
}

impl EventType {
    /// Every type, in the order a connection's events come.
    pub const ALL: [Self; 7] = [
        Self::Connected,
        Self::Resumed,
        Self::Subscribed,
        Self::Unsubscribed,
        Self::Disconnected,
        Self::Occupied,
        Self::Vacated,
    ];

    /// The connections' types: the default.
    pub const CONNECTIONS: [Self; 5] = [
        Self::Connected,
        Self::Resumed,
        Self::Subscribed,
        Self::Unsubscribed,
        Self::Disconnected,
    ];

    /// Its name on the wire and in the subject.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Connected => "Connected",
            Self::Resumed => "Resumed",
            Self::Disconnected => "Disconnected",
            Self::Subscribed => "Subscribed",
            Self::Unsubscribed => "Unsubscribed",
            Self::Occupied => "Occupied",
            Self::Vacated => "Vacated",
        }
    }
}

fn default_event_types() -> Vec<EventType> {
    EventType::CONNECTIONS.to_vec()
}

/// The JetStream stream that keeps the events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DurableEvents {
    /// The stream's name (letters, digits, `-`, `_`; at most 64). The relays create and
    /// update it; the operator names it after the gateway.
    pub stream: String,
    /// How long an event is kept. Between 60 and 31536000 (a year). Default 86400.
    #[serde(default = "default_max_age_seconds")]
    pub max_age_seconds: u64,
    /// Stream replicas in a NATS cluster (1, 3 or 5). Default 1.
    #[serde(default = "default_replicas")]
    pub replicas: u8,
    /// Bytes the stream keeps (the oldest events go first). Between 1 MiB and 1 TiB.
    /// Default 268435456 (256 MiB).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// The stream's duplicate window: an event published twice within it (a relay that
    /// said `Disconnected` and died before it removed the connection's registry entry, and
    /// the survivor that says it again) is stored once. At least twice the registry's
    /// lease, at most `maxAgeSeconds`. Default 300.
    #[serde(default = "default_duplicate_window_seconds")]
    pub duplicate_window_seconds: u64,
}

fn default_max_age_seconds() -> u64 {
    86_400
}
fn default_replicas() -> u8 {
    1
}
fn default_max_bytes() -> u64 {
    256 << 20
}
fn default_duplicate_window_seconds() -> u64 {
    300
}

/// Bounds of `events.durable.maxAgeSeconds`.
pub const EVENT_AGE_SECONDS: (u64, u64) = (60, 31_536_000);
/// Bounds of `events.durable.maxBytes`.
pub const EVENT_BYTES: (u64, u64) = (1 << 20, 1 << 40);

/// The control service: every relay serves the NATS service `wsrelay_control` (the NATS
/// micro conventions: `$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`) with its endpoints on
/// `<subject>.<endpoint>`, and answers for the whole fleet. Needs the connection registry
/// (`registry`): it is how the relay that takes a command knows how many relays to ask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Control {
    /// The subject prefix, fixed (no wildcards). The operator renders
    /// `<spec.control.subject>.<namespace>.<gateway>`.
    pub subject: String,
}

/// Whether `s` is a fixed subject prefix the relays may publish or serve under, leaving
/// room for the longest suffix they append (`.fleet.connections`).
fn is_prefix_subject(s: &str) -> bool {
    s.len() <= 200 && super::authorize::is_request_subject(s)
}

fn is_stream_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl Config {
    pub(super) fn validate_events(&self, errs: &mut Vec<ValidationError>) {
        let needs_registry = |field: &str, errs: &mut Vec<ValidationError>| {
            if self.registry.is_none() {
                errs.push(ValidationError::Conflict {
                    field: field.into(),
                    other: "registry".into(),
                    reason: "needs the connection registry: configure `registry`".into(),
                });
            }
        };
        let subject = |field: &str, s: &str, errs: &mut Vec<ValidationError>| {
            if !is_prefix_subject(s) {
                errs.push(ValidationError::invalid(
                    field,
                    format!(
                        "{s:?} is not a fixed NATS subject (dot-separated names of letters, digits, '-', '_'; at most 200 bytes; not '$...', '_INBOX' or '_WSRELAY')"
                    ),
                ));
            }
        };
        if let Some(c) = &self.control {
            needs_registry("control", errs);
            subject("control.subject", &c.subject, errs);
        }
        let Some(e) = &self.events else {
            return;
        };
        needs_registry("events", errs);
        subject("events.subject", &e.subject, errs);
        if let Some(c) = &self.control
            && (c.subject == e.subject
                || c.subject.starts_with(&format!("{}.", e.subject))
                || e.subject.starts_with(&format!("{}.", c.subject)))
        {
            errs.push(ValidationError::Conflict {
                field: "events.subject".into(),
                other: "control.subject".into(),
                reason: "one is within the other: events would reach the control service".into(),
            });
        }
        let mut types = e.types.clone();
        types.sort();
        types.dedup();
        if types.len() != e.types.len() {
            errs.push(ValidationError::invalid(
                "events.types",
                "a type is named twice",
            ));
        }
        if e.grace_seconds > 0 {
            let needed = [
                EventType::Connected,
                EventType::Disconnected,
                EventType::Resumed,
            ];
            if e.grace_seconds > MAX_GRACE_SECONDS {
                errs.push(ValidationError::invalid(
                    "events.graceSeconds",
                    format!("must be at most {MAX_GRACE_SECONDS}"),
                ));
            } else if e.durable.is_none() {
                errs.push(ValidationError::invalid(
                    "events.graceSeconds",
                    "needs events.durable: the stream decides, once, whether a connection ended or was resumed",
                ));
            } else if !needed.iter().all(|t| e.types.contains(t)) {
                errs.push(ValidationError::invalid(
                    "events.graceSeconds",
                    "needs the types Connected, Disconnected and Resumed",
                ));
            }
        }
        let Some(d) = &e.durable else {
            return;
        };
        if !is_stream_name(&d.stream) {
            errs.push(ValidationError::invalid(
                "events.durable.stream",
                format!(
                    "{:?} is not a stream name (letters, digits, '-', '_'; 1 to 64)",
                    d.stream
                ),
            ));
        }
        let (lo, hi) = EVENT_AGE_SECONDS;
        if !(lo..=hi).contains(&d.max_age_seconds) {
            errs.push(ValidationError::invalid(
                "events.durable.maxAgeSeconds",
                format!("must be between {lo} and {hi}"),
            ));
        }
        if ![1, 3, 5].contains(&d.replicas) {
            errs.push(ValidationError::invalid(
                "events.durable.replicas",
                "must be 1, 3 or 5",
            ));
        }
        let (lo, hi) = EVENT_BYTES;
        if !(lo..=hi).contains(&d.max_bytes) {
            errs.push(ValidationError::invalid(
                "events.durable.maxBytes",
                "must be between 1048576 (1 MiB) and 1099511627776 (1 TiB)",
            ));
        }
        let lease = self.registry.as_ref().map_or(0, |r| r.lease_seconds);
        let least = 2 * lease + e.grace_seconds;
        if d.duplicate_window_seconds < least || d.duplicate_window_seconds > d.max_age_seconds {
            errs.push(ValidationError::invalid(
                "events.durable.duplicateWindowSeconds",
                format!(
                    "must be at least twice registry.leaseSeconds plus graceSeconds ({least}) and at most maxAgeSeconds ({})",
                    d.max_age_seconds
                ),
            ));
        }
        let taken = self
            .bindings
            .iter()
            .filter_map(|b| b.history.as_ref())
            .map(|h| h.stream.clone())
            .chain(self.registry.iter().map(|r| format!("KV_{}", r.bucket)));
        for s in taken {
            if s == d.stream {
                errs.push(ValidationError::Conflict {
                    field: "events.durable.stream".into(),
                    other: "bindings[].history.stream or registry.bucket".into(),
                    reason: format!("the stream {s:?} is already in use"),
                });
            }
        }
    }
}
