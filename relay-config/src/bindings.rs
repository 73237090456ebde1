//! Bindings: client channels to NATS subjects.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{Config, ValidationError};
use crate::template::{TemplateToken, parse_subject_template, parse_template};

/// Direction a binding allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Direction {
    /// Clients may subscribe (NATS to client).
    #[default]
    Subscribe,
    /// Clients may publish (client to NATS).
    Publish,
    /// Both.
    Both,
}

impl Direction {
    /// Whether subscribing is allowed.
    pub fn allows_subscribe(self) -> bool {
        matches!(self, Self::Subscribe | Self::Both)
    }
    /// Whether publishing is allowed.
    pub fn allows_publish(self) -> bool {
        matches!(self, Self::Publish | Self::Both)
    }
}

/// Maps client-facing channels to a NATS subject.
///
/// A channel pattern is dot-separated tokens, each either a literal or a whole-token
/// placeholder `{name}` that matches one client-chosen token (`orders.{id}`). A subject
/// template is dot-separated tokens, each a literal, a placeholder from the channel pattern
/// (`{id}`) or a JWT claim (`{claims.sub}`, `{claims.org.id}` for nested claims). A value
/// substituted into a subject is refused if it is empty or holds `.`, `*`, `>` or whitespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Binding {
    /// Client-facing channel pattern, e.g. `orders.{id}` or `notifications`.
    pub channel: String,
    /// NATS subject template, e.g. `orders.{id}` or `users.{claims.sub}.notify`.
    pub subject: String,
    /// What clients may do on it. Default `subscribe`.
    #[serde(default)]
    pub direction: Direction,
    /// Keep history: the binding's channels become resumable (docs/protocol.md section 8).
    /// Absent: messages are delivered only while a client is connected (at most once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<History>,
    /// Who may use the binding's channels beyond what the templates decide: a subscription
    /// token, a CEL rule, a backend request (docs/protocol.md section 3). Absent: anyone
    /// the templates admit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorize: Option<super::Authorize>,
    /// Who is in the binding's channels (docs/protocol.md section 10). Absent: no presence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<super::Presence>,
    /// Subscribe SSE sessions (and WebSockets that ask) to the binding's channel right after
    /// their `welcome`, with no `subscribe` from the client (docs/protocol.md section 9,
    /// *Streams without a client*), when its `authorize` allows: for clients with no SDK (a
    /// bare EventSource, `curl -N`). Only for a channel the client chooses nothing of (no
    /// placeholder: `notifications`, its subject filled from claims), that allows
    /// `subscribe`, and that no earlier binding's pattern takes. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_subscribe: bool,
}

/// The history of a resumable binding: a NATS JetStream stream that captures the binding's
/// subjects, created and kept up to date by the relays (idempotently: every relay applies
/// the same configuration). Backends keep publishing with core NATS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct History {
    /// Name of the JetStream stream (letters, digits, `-`, `_`; at most 64). One stream per
    /// binding; the operator names it after the gateway.
    pub stream: String,
    /// Newest messages kept per channel (the stream's `max_msgs_per_subject`). Default 100.
    #[serde(default = "default_history_messages")]
    pub max_messages: u32,
    /// Oldest message kept, in seconds (the stream's `max_age`). Default 300. JetStream's
    /// duplicate window for client publishes with a `msgId` is the shorter of this and 120 s.
    #[serde(default = "default_history_age")]
    pub max_age_seconds: u64,
    /// Bytes the whole stream keeps, every channel of the binding together (the stream's
    /// `max_bytes`): beyond it the stream's oldest messages go first, whatever their channel.
    /// Clients choose channel names, so without it the stream would grow with every new
    /// channel. Reserved on the NATS servers' JetStream storage. Between `maxMessageBytes`
    /// and 1 TiB. Default 268435456 (256 MiB).
    #[serde(default = "default_history_bytes")]
    pub max_bytes: u64,
    /// Stream replicas in a NATS cluster (1, 3 or 5). Default 1.
    #[serde(default = "default_history_replicas")]
    pub replicas: u8,
}

fn default_history_messages() -> u32 {
    100
}
fn default_history_age() -> u64 {
    300
}
/// 256 MiB: a few hundred busy channels of 100 messages of 1 KiB, or 40 of 100 messages of
/// 64 KiB; small enough to fit a modest JetStream file store.
pub const DEFAULT_HISTORY_BYTES: u64 = 256 << 20;
/// Upper bound of `history.maxBytes`.
pub const MAX_HISTORY_BYTES: u64 = 1 << 40;
fn default_history_bytes() -> u64 {
    DEFAULT_HISTORY_BYTES
}
fn default_history_replicas() -> u8 {
    1
}

/// Whether `name` can name a JetStream stream (and a subject token of the republish prefix).
fn is_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The subject filter a binding's stream captures: the subject template with every
/// placeholder and claim as `*` (`users.{claims.sub}.notify` -> `users.*.notify`). Pure.
pub fn subject_filter(tokens: &[TemplateToken]) -> String {
    tokens
        .iter()
        .map(|t| match t {
            TemplateToken::Literal(l) => l.as_str(),
            TemplateToken::Var(_) | TemplateToken::Claim(_) => "*",
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Whether the channel pattern `pattern` takes the channel `channel` (all literal tokens).
/// Pure.
fn pattern_takes(pattern: &[TemplateToken], channel: &[TemplateToken]) -> bool {
    pattern.len() == channel.len()
        && pattern.iter().zip(channel).all(|(p, c)| match (p, c) {
            (TemplateToken::Var(_), _) => true,
            (TemplateToken::Literal(p), TemplateToken::Literal(c)) => p == c,
            _ => false,
        })
}

impl Config {
    /// `bindings[i].autoSubscribe`: its channel (`channel`, parsed) needs no client input,
    /// allows subscribe, and is not taken by an earlier binding (the first that matches wins).
    fn validate_auto_subscribe(
        &self,
        i: usize,
        channel: Option<&[TemplateToken]>,
        errs: &mut Vec<ValidationError>,
    ) {
        let b = &self.bindings[i];
        let field = format!("bindings[{i}].autoSubscribe");
        if !b.direction.allows_subscribe() {
            errs.push(ValidationError::invalid(
                field.clone(),
                "needs a binding clients may subscribe to (direction subscribe or both)",
            ));
        }
        let Some(channel) = channel else {
            return;
        };
        if let Some(TemplateToken::Var(v)) =
            channel.iter().find(|t| matches!(t, TemplateToken::Var(_)))
        {
            errs.push(ValidationError::invalid(
                field,
                format!(
                    "the channel {:?} has the placeholder {{{v}}}, which the client would choose: an auto-subscribed channel must be a fixed name (fill the subject from claims instead, e.g. channel 'notifications', subject 'users.{{claims.sub}}.notify')",
                    b.channel
                ),
            ));
            return;
        }
        if let Some(j) = self.bindings[..i].iter().position(|e| {
            e.direction.allows_subscribe()
                && parse_template(&e.channel, true).is_ok_and(|p| pattern_takes(&p, channel))
        }) {
            errs.push(ValidationError::Conflict {
                field,
                other: format!("bindings[{j}].channel"),
                reason: format!(
                    "{:?} is taken by the earlier binding's pattern {:?} (the first binding that matches a channel wins)",
                    b.channel, self.bindings[j].channel
                ),
            });
        }
    }

    pub(super) fn validate_bindings(&self, errs: &mut Vec<ValidationError>) {
        if self.bindings.is_empty() {
            errs.push(ValidationError::Required {
                field: "bindings".into(),
            });
        }
        let mut channels = BTreeSet::new();
        // Stream name -> subject filter, to refuse one stream for two filters and one filter
        // in two streams (JetStream refuses overlapping streams).
        let mut streams: Vec<(&str, String)> = Vec::new();
        for (i, b) in self.bindings.iter().enumerate() {
            if let Some(h) = &b.history {
                let field = |f: &str| format!("bindings[{i}].history.{f}");
                if !is_stream_name(&h.stream) {
                    errs.push(ValidationError::invalid(
                        field("stream"),
                        format!(
                            "{:?} is not a stream name (letters, digits, '-', '_'; 1 to 64)",
                            h.stream
                        ),
                    ));
                }
                if h.max_messages == 0 {
                    errs.push(ValidationError::invalid(
                        field("maxMessages"),
                        "must be at least 1",
                    ));
                }
                if h.max_age_seconds == 0 {
                    errs.push(ValidationError::invalid(
                        field("maxAgeSeconds"),
                        "must be at least 1",
                    ));
                }
                if h.max_bytes > MAX_HISTORY_BYTES {
                    errs.push(ValidationError::invalid(
                        field("maxBytes"),
                        format!("must be at most {MAX_HISTORY_BYTES} (1 TiB)"),
                    ));
                }
                if h.max_bytes < u64::from(self.limits.max_message_bytes) {
                    errs.push(ValidationError::Conflict {
                        field: field("maxBytes"),
                        other: "limits.maxMessageBytes".into(),
                        reason: format!(
                            "the stream ({} bytes) must hold at least one message of the largest size ({})",
                            h.max_bytes, self.limits.max_message_bytes
                        ),
                    });
                }
                if h.max_messages > self.limits.send_queue_len {
                    errs.push(ValidationError::Conflict {
                        field: field("maxMessages"),
                        other: "limits.sendQueueLen".into(),
                        reason: format!(
                            "a full replay ({}) must fit in a connection's send queue ({})",
                            h.max_messages, self.limits.send_queue_len
                        ),
                    });
                }
                if ![1, 3, 5].contains(&h.replicas) {
                    errs.push(ValidationError::invalid(
                        field("replicas"),
                        "must be 1, 3 or 5",
                    ));
                }
                if let Ok(tokens) = parse_subject_template(&b.subject) {
                    let filter = subject_filter(&tokens);
                    for (stream, other) in &streams {
                        if *stream == h.stream && *other != filter {
                            errs.push(ValidationError::invalid(
                                field("stream"),
                                format!(
                                    "stream {stream:?} already holds {other:?}; give each binding with history a stream of its own"
                                ),
                            ));
                        } else if *stream != h.stream && *other == filter {
                            errs.push(ValidationError::invalid(
                                field("stream"),
                                format!(
                                    "subjects {filter:?} are already kept by stream {stream:?}; JetStream refuses two streams on the same subjects"
                                ),
                            ));
                        }
                    }
                    streams.push((&h.stream, filter));
                }
            }
            let channel = match parse_template(&b.channel, true) {
                Ok(t) => Some(t),
                Err(e) => {
                    errs.push(ValidationError::invalid(
                        format!("bindings[{i}].channel"),
                        format!("{:?}: {e}", b.channel),
                    ));
                    None
                }
            };
            if b.auto_subscribe {
                self.validate_auto_subscribe(i, channel.as_deref(), errs);
            }
            for dir in [b.direction.allows_subscribe(), b.direction.allows_publish()]
                .iter()
                .zip(["subscribe", "publish"])
                .filter(|(on, _)| **on)
                .map(|(_, d)| d)
            {
                if !channels.insert((b.channel.as_str(), dir)) {
                    errs.push(ValidationError::invalid(
                        format!("bindings[{i}].channel"),
                        format!("{:?} is bound twice for {dir}", b.channel),
                    ));
                }
            }
            match parse_subject_template(&b.subject) {
                Ok(subject) => {
                    match subject.first() {
                        Some(TemplateToken::Literal(first))
                            if first.starts_with('$')
                                || first == "_INBOX"
                                || first == super::RELAY_SUBJECT_PREFIX =>
                        {
                            errs.push(ValidationError::invalid(
                                format!("bindings[{i}].subject"),
                                format!(
                                    "{:?} is in a namespace NATS or the relay reserves ('$...', '_INBOX', '_WSRELAY')",
                                    b.subject
                                ),
                            ));
                        }
                        Some(TemplateToken::Literal(_)) => {}
                        _ => errs.push(ValidationError::invalid(
                            format!("bindings[{i}].subject"),
                            format!(
                                "{:?} must start with a literal token (a placeholder first could reach '$JS.', '$SYS.' or '_INBOX.')",
                                b.subject
                            ),
                        )),
                    }
                    for tok in &subject {
                        match tok {
                            TemplateToken::Var(v) => {
                                if let Some(ch) = &channel
                                    && !ch.contains(&TemplateToken::Var(v.clone()))
                                {
                                    errs.push(ValidationError::invalid(
                                        format!("bindings[{i}].subject"),
                                        format!(
                                            "{{{v}}} is not a placeholder of the channel {:?}",
                                            b.channel
                                        ),
                                    ));
                                }
                            }
                            TemplateToken::Claim(path) => {
                                if self.auth.jwt.is_none() {
                                    errs.push(ValidationError::Conflict {
                                        field: format!("bindings[{i}].subject"),
                                        other: "auth.jwt".into(),
                                        reason: format!(
                                            "uses {{claims.{}}} but no JWT is configured",
                                            path.join(".")
                                        ),
                                    });
                                }
                            }
                            TemplateToken::Literal(_) => {}
                        }
                    }
                }
                Err(e) => errs.push(ValidationError::invalid(
                    format!("bindings[{i}].subject"),
                    format!("{:?}: {e}", b.subject),
                )),
            }
        }
    }
}
