//! Lifecycle events for the backend (docs/backend.md): what one holds, its subject, its
//! message id, and the stream that keeps them. Pure. The registry's ordered writer sends them
//! (`crate::registry`), each after the registry entry it concerns and before that entry's
//! removal, on the relay's one NATS connection: so a relay that dies has either said
//! `Disconnected` or left the entry from which a survivor says it (`relay_lost`), and a
//! `Connected` whose entry was lost cannot have been sent.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::stream;
use bytes::Bytes;
use serde::Serialize;

pub use crate::config::EventType;
use crate::config::Events as EventsConfig;

/// The `reason` of a `Disconnected` a survivor says for a relay that died.
pub const RELAY_LOST: &str = "relay_lost";

/// One event, as published (camelCase JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Its type.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The connection token's `sub` (absent: anonymous).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// The token's `iss`, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// `<relay>/<id>`, as in the `Wsrelay-Connection` header of the connection's publishes
    /// (empty, and absent from the JSON, for a channel's `Occupied` and `Vacated`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub connection: String,
    /// The connection this one resumed (`Resumed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// The relay that served it.
    pub relay: String,
    /// The channel (`Subscribed`, `Unsubscribed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// A server-side subscription (`Subscribed`, `Unsubscribed`): the backend's, not the
    /// client's own.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub by_server: bool,
    /// Why it ended (`Disconnected`: the close's reason label, or `relay_lost`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The WebSocket close code the relay sent (`Disconnected`, when it sent one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close_code: Option<u16>,
    /// When, in milliseconds since the epoch.
    pub at: u64,
    /// How long the connection or subscription lasted (`Disconnected`, `Unsubscribed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// `Occupied`, `Vacated`: the registry write that made it so, which orders a channel's
    /// events (relays publish them independently: the stream may hold them out of order).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
}

/// `<relay>/<id>`: a connection's id across the fleet.
pub fn connection_id(relay: &str, id: u64) -> String {
    format!("{relay}/{id}")
}

/// Whether `name` can be a relay's (pod) name: 1 to 253 of letters, digits, `-`, `.`, `_`,
/// `=`. Pure.
pub fn is_relay_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._=".contains(c))
}

/// The relay name and number of a connection id (`<relay>/<digits>`), if `s` is one. Pure.
pub fn parse_connection_id(s: &str) -> Option<(&str, u64)> {
    let (relay, n) = s.rsplit_once('/')?;
    if !is_relay_name(relay) || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((relay, n.parse().ok()?))
}

/// An event ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// `<events.subject>.<Type>`.
    pub subject: String,
    /// The `Nats-Msg-Id` header: `<connection>:<Type>`, and for a subscription event its
    /// serial in the connection (a channel may be subscribed to again), so the stream
    /// stores each event once however often it is said. A `Resumed` carries the id of the
    /// previous connection's `Disconnected`: the stream stores one of the two, the first.
    pub msg_id: String,
    /// The JSON.
    pub payload: Bytes,
    /// For the metrics.
    pub kind: EventType,
}

impl Outgoing {
    /// Its headers.
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", self.msg_id.as_str());
        h
    }
}

/// What the relay publishes, and where: the `events` section of the config, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitter {
    subject: String,
    types: BTreeSet<EventType>,
    /// The stream, when durable.
    stream: Option<String>,
    grace: Duration,
}

impl Emitter {
    /// From the config's `events` section.
    pub fn new(c: &EventsConfig) -> Self {
        Self {
            subject: c.subject.clone(),
            types: c.types.iter().copied().collect(),
            stream: c.durable.as_ref().map(|d| d.stream.clone()),
            grace: Duration::from_secs(c.grace_seconds),
        }
    }

    /// Whether events go to a stream (published with an acknowledgement) rather than as
    /// plain messages.
    pub fn durable(&self) -> bool {
        self.stream.is_some()
    }

    /// The stream, when durable.
    pub fn stream(&self) -> Option<&str> {
        self.stream.as_deref()
    }

    /// How long a `Disconnected` waits for a resume (`graceSeconds`; zero: none).
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Whether `kind` is published at all.
    pub fn wants(&self, kind: EventType) -> bool {
        self.types.contains(&kind)
    }

    /// `event` ready to send (`serial`: a subscription's serial in its connection), or
    /// `None` when its type is not published.
    pub fn outgoing(&self, event: &Event, serial: Option<u64>) -> Option<Outgoing> {
        if !self.wants(event.kind) {
            return None;
        }
        let name = event.kind.name();
        let msg_id = match (serial, &event.previous) {
            (_, Some(previous)) => format!("{previous}:{}", EventType::Disconnected.name()),
            // A channel's: the channel (base64url) and the registry write that made it so.
            (Some(n), None) if event.connection.is_empty() => {
                use base64::Engine;
                let channel = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(event.channel.as_deref().unwrap_or_default());
                format!("{channel}:{name}:{n}")
            }
            (Some(n), None) => format!("{}:{name}:{n}", event.connection),
            (None, None) => format!("{}:{name}", event.connection),
        };
        Some(Outgoing {
            subject: format!("{}.{name}", self.subject),
            msg_id,
            payload: Bytes::from(serde_json::to_vec(event).ok()?),
            kind: event.kind,
        })
    }
}

/// The events' stream, as the relays create and update it (with the history streams,
/// by `runtime::upkeep`). Pure.
pub fn stream_config(c: &EventsConfig) -> Option<stream::Config> {
    let d = c.durable.as_ref()?;
    Some(stream::Config {
        name: d.stream.clone(),
        description: Some("wsrelay lifecycle events; managed by the relays".into()),
        subjects: vec![format!("{}.*", c.subject)],
        max_age: Duration::from_secs(d.max_age_seconds),
        max_bytes: i64::try_from(d.max_bytes).unwrap_or(i64::MAX),
        max_message_size: 16 * 1024,
        storage: stream::StorageType::File,
        num_replicas: usize::from(d.replicas),
        discard: stream::DiscardPolicy::Old,
        duplicate_window: Duration::from_secs(d.duplicate_window_seconds),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(types: &str, durable: bool) -> EventsConfig {
        let d = if durable {
            r#","durable":{"stream":"EV"}"#
        } else {
            ""
        };
        serde_json::from_str(&format!(
            r#"{{"subject":"wsrelay.events.ns.gw"{types}{d}}}"#
        ))
        .unwrap()
    }

    fn disconnected() -> Event {
        Event {
            kind: EventType::Disconnected,
            sub: Some("u1".into()),
            iss: None,
            connection: connection_id("wsrelay-0", 7),
            previous: None,
            relay: "wsrelay-0".into(),
            channel: None,
            by_server: false,
            reason: Some(RELAY_LOST.into()),
            close_code: None,
            at: 5,
            duration_ms: Some(3),
            revision: None,
        }
    }

    #[test]
    fn an_event_is_camel_case_json_on_its_types_subject_with_one_id() {
        let e = Emitter::new(&config("", true));
        assert!(e.durable());
        let o = e.outgoing(&disconnected(), None).unwrap();
        assert_eq!(o.subject, "wsrelay.events.ns.gw.Disconnected");
        assert_eq!(o.msg_id, "wsrelay-0/7:Disconnected");
        assert_eq!(
            std::str::from_utf8(&o.payload).unwrap(),
            r#"{"type":"Disconnected","sub":"u1","connection":"wsrelay-0/7","relay":"wsrelay-0","reason":"relay_lost","at":5,"durationMs":3}"#
        );
        let mut s = disconnected();
        s.kind = EventType::Subscribed;
        s.channel = Some("orders.42".into());
        let o = e.outgoing(&s, Some(2)).unwrap();
        assert_eq!(o.msg_id, "wsrelay-0/7:Subscribed:2");
        assert_eq!(o.headers().get("Nats-Msg-Id").unwrap().as_str(), o.msg_id);
        let mut r = disconnected();
        r.kind = EventType::Resumed;
        r.connection = connection_id("wsrelay-1", 9);
        r.previous = Some(connection_id("wsrelay-0", 7));
        let o = e.outgoing(&r, None).unwrap();
        assert_eq!(o.subject, "wsrelay.events.ns.gw.Resumed");
        assert_eq!(
            o.msg_id, "wsrelay-0/7:Disconnected",
            "one of a connection's Disconnected and its Resumed is stored"
        );
        let mut occupied = disconnected();
        occupied.kind = EventType::Occupied;
        occupied.connection = String::new();
        occupied.sub = None;
        occupied.channel = Some("rooms.a b".into());
        assert!(
            e.outgoing(&occupied, Some(41)).is_none(),
            "not a default type"
        );
        let e = Emitter::new(&config(r#","types":["Occupied"]"#, true));
        let o = e.outgoing(&occupied, Some(41)).unwrap();
        assert_eq!(o.subject, "wsrelay.events.ns.gw.Occupied");
        assert_eq!(
            o.msg_id, "cm9vbXMuYSBi:Occupied:41",
            "the channel and the write"
        );
        let v: serde_json::Value = serde_json::from_slice(&o.payload).unwrap();
        assert!(v.get("connection").is_none(), "{v}");
    }

    #[test]
    fn a_connection_id_is_a_relay_name_and_digits() {
        assert_eq!(
            parse_connection_id(&connection_id("chat-7f.x_2", 17)),
            Some(("chat-7f.x_2", 17))
        );
        for bad in [
            "",
            "/1",
            "r/",
            "r/+1",
            "r/-1",
            "r/1a",
            "r 1/2",
            "r/99999999999999999999",
            "a\nb/1",
        ] {
            assert_eq!(parse_connection_id(bad), None, "{bad:?}");
        }
        assert!(parse_connection_id(&format!("{}/1", "r".repeat(254))).is_none());
    }

    #[test]
    fn only_the_named_types_are_published() {
        let e = Emitter::new(&config(r#","types":["Connected"]"#, false));
        assert!(!e.durable());
        assert!(e.outgoing(&disconnected(), None).is_none());
        let mut c = disconnected();
        c.kind = EventType::Connected;
        assert!(e.outgoing(&c, None).is_some());
    }

    #[test]
    fn the_stream_holds_the_types_subjects_and_removes_duplicates() {
        let s = stream_config(&config("", true)).unwrap();
        assert_eq!(s.name, "EV");
        assert_eq!(s.subjects, ["wsrelay.events.ns.gw.*"]);
        assert_eq!(s.duplicate_window, Duration::from_secs(300));
        assert_eq!(s.max_age, Duration::from_secs(86_400));
        assert!(stream_config(&config("", false)).is_none());
    }
}
