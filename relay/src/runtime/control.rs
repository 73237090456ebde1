//! The control service (docs/backend.md): the backend commands the fleet over NATS. Every
//! relay serves the NATS service [`SERVICE_NAME`] (the NATS micro conventions: found with
//! `$SRV.PING`, `$SRV.INFO`), whose endpoints `<control.subject>.disconnect`, `.connections`,
//! `.revoke`, `.invalidate`, `.subscribe`, `.unsubscribe` and `.channels` share one queue
//! group: one relay takes each command. It
//! asks every relay on `<control.subject>.fleet.<command>` (each relay, itself included,
//! subscribes to it), gathers their answers until as many as the registry has live leases
//! answered, or [`GATHER_WITHIN`], and replies with the sum.
//!
//! - parsing and checking a command, which connections it selects, and adding up the answers
//!   are pure ([`parse`], [`Selector::selects`], [`Tally`]);
//! - here too: the NATS part, and carrying a command out on this relay's connections.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::service::ServiceExt;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::access::revoked::Revocation;
use crate::conn::close::Cause;
use crate::events::connection_id;
use crate::metrics::{Command, Kind};
use crate::registry::keys::{self, ServerSub};
use crate::state::Relay;

use super::serversubs;

/// The NATS service's name (every gateway's relays serve it; `$SRV.INFO.wsrelay_control`
/// lists them, each with its endpoints' subjects).
pub const SERVICE_NAME: &str = "wsrelay_control";

/// The service's version: that of the commands' JSON.
pub const SERVICE_VERSION: &str = "1.0.0";

/// How long the relay that took a command waits for the others' answers.
pub const GATHER_WITHIN: Duration = Duration::from_secs(2);

/// Most connections one `connections` answer lists (per relay, and in all).
pub const MAX_LISTED: usize = 1000;

/// Most channels one `channels` answer lists (per relay, and in all).
pub const MAX_CHANNELS: usize = 1000;

/// Longest `channel` or `prefix` a command may name, in bytes (the longest channel).
pub const MAX_CHANNEL_BYTES: usize = crate::authz::MAX_CHANNEL_LEN;

/// Longest `sub` or `iss` a command may name, in bytes.
pub const MAX_CLAIM_BYTES: usize = 256;

/// Commands taken at once by one relay (each waits up to [`GATHER_WITHIN`]).
const CONCURRENT: usize = 64;

/// A command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Close the selected connections.
    Disconnect,
    /// List them.
    Connections,
    /// Revoke one token (its `jti`): refused at handshakes and refreshes, its connections
    /// closed with 4409.
    Revoke,
    /// Revoke every token of a `sub` issued before a time.
    Invalidate,
    /// Subscribe a user's connections, present and future, to a channel (server-side).
    Subscribe,
    /// End a server-side subscription.
    Unsubscribe,
    /// List the channels subscribed to, with their counts.
    Channels,
}

impl Verb {
    /// Every one, in the order of the docs.
    pub const ALL: [Self; 7] = [
        Self::Disconnect,
        Self::Connections,
        Self::Revoke,
        Self::Invalidate,
        Self::Subscribe,
        Self::Unsubscribe,
        Self::Channels,
    ];

    /// The endpoint's name, the last token of its subjects.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Disconnect => "disconnect",
            Self::Connections => "connections",
            Self::Revoke => "revoke",
            Self::Invalidate => "invalidate",
            Self::Subscribe => "subscribe",
            Self::Unsubscribe => "unsubscribe",
            Self::Channels => "channels",
        }
    }

    /// `subscribe`, `unsubscribe`: a server-side subscription's.
    fn server_side(self) -> bool {
        matches!(self, Self::Subscribe | Self::Unsubscribe)
    }

    fn revokes(self) -> bool {
        matches!(self, Self::Revoke | Self::Invalidate)
    }

    fn of(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }
}

/// The body of a command (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    /// The connections whose token has this `sub`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// With `sub`: only those whose token also has this `iss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// The one connection with this id (`<relay>/<id>`, as in the events and the
    /// `Wsrelay-Connection` header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<String>,
    /// `disconnect` only: whether the client may reconnect (close code 4100) or must not
    /// (4101). Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect: Option<bool>,
    /// `revoke`: the token's `jti`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// `invalidate`: the tokens of `sub` (and `iss`) whose `iat` is before this (Unix
    /// seconds), or that have no `iat`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_before: Option<u64>,
    /// `revoke`, `invalidate`: until when it holds (Unix seconds), at most a year away: the
    /// revoked tokens' `exp`. Required by `revoke`; `invalidate` defaults to a day from now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
    /// `subscribe`, `unsubscribe`: the channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// `channels`: only those starting with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// Longest a revocation holds.
pub const MAX_REVOCATION: Duration = Duration::from_secs(366 * 86_400);

/// How long an `invalidate` without `until` holds.
pub const DEFAULT_INVALIDATION: Duration = Duration::from_secs(86_400);

/// Why a command is refused (answered with the service error code 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// Not the documented JSON.
    #[error("not a command: {0}")]
    Json(String),
    /// Selects nothing by name.
    #[error("name `sub` or `connection`")]
    NoTarget,
    /// A field this command does not take.
    #[error("{0}: not a field of this command")]
    NotHere(&'static str),
    /// A field out of bounds.
    #[error("{field}: {reason}")]
    Field {
        /// The field.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
}

fn claim_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_CLAIM_BYTES && !s.chars().any(char::is_control)
}

/// Whether `s` is a connection id: `<relay>/<id>`.
fn connection_ok(s: &str) -> bool {
    crate::events::parse_connection_id(s).is_some()
}

/// Reads and checks a command's body. Pure.
pub fn parse(verb: Verb, body: &[u8]) -> Result<Selector, Invalid> {
    let json = |e: serde_json::Error| {
        let mut m = e.to_string();
        m.truncate(200);
        Invalid::Json(m)
    };
    let v: Value = serde_json::from_slice(body).map_err(json)?;
    if !v.is_object() {
        return Err(Invalid::Json("a JSON object is expected".into()));
    }
    let s: Selector = serde_json::from_value(v).map_err(json)?;
    let field = |field, reason| Err(Invalid::Field { field, reason });
    let not_here = |verb: Verb| {
        let listing = verb == Verb::Channels;
        let has = [
            ("sub", s.sub.is_some() && (verb == Verb::Revoke || listing)),
            ("iss", s.iss.is_some() && (verb == Verb::Revoke || listing)),
            (
                "connection",
                s.connection.is_some() && (verb.revokes() || verb.server_side() || listing),
            ),
            ("channel", s.channel.is_some() && !verb.server_side()),
            ("prefix", s.prefix.is_some() && !listing),
            (
                "reconnect",
                s.reconnect.is_some() && verb != Verb::Disconnect,
            ),
            ("jti", s.jti.is_some() && verb != Verb::Revoke),
            (
                "issuedBefore",
                s.issued_before.is_some() && verb != Verb::Invalidate,
            ),
            ("until", s.until.is_some() && !verb.revokes()),
        ];
        has.into_iter().find(|(_, h)| *h).map(|(f, _)| f)
    };
    if let Some(f) = not_here(verb) {
        return Err(Invalid::NotHere(f));
    }
    match verb {
        Verb::Revoke => {
            if !s.jti.as_deref().is_some_and(claim_ok) {
                return field("jti", "required: 1 to 256 bytes, no control characters");
            }
            if s.until.is_none() {
                return field("until", "required: when the token expires (Unix seconds)");
            }
        }
        Verb::Invalidate => {
            if s.sub.is_none() || s.issued_before.is_none() {
                return field("issuedBefore", "required, with `sub`");
            }
        }
        Verb::Disconnect | Verb::Connections => {
            if s.sub.is_none() && s.connection.is_none() {
                return Err(Invalid::NoTarget);
            }
        }
        Verb::Subscribe | Verb::Unsubscribe => {
            if s.sub.is_none() {
                return field("sub", "required: the user whose connections it concerns");
            }
            if !s
                .channel
                .as_deref()
                .is_some_and(|c| claim_ok(c) && c.len() <= MAX_CHANNEL_BYTES)
            {
                return field("channel", "required: 1 to 256 bytes, no control characters");
            }
        }
        Verb::Channels => {
            if s.prefix
                .as_deref()
                .is_some_and(|p| p.len() > MAX_CHANNEL_BYTES || p.chars().any(char::is_control))
            {
                return field("prefix", "at most 256 bytes, no control characters");
            }
        }
    }
    if let Some(until) = s.until {
        let now = crate::clock::now_secs();
        if until <= now || until > now + MAX_REVOCATION.as_secs() {
            return field("until", "in the future, at most a year away (Unix seconds)");
        }
    }
    if s.sub.as_deref().is_some_and(|v| !claim_ok(v)) {
        return field("sub", "1 to 256 bytes, no control characters");
    }
    if s.iss.as_deref().is_some_and(|v| !claim_ok(v)) {
        return field("iss", "1 to 256 bytes, no control characters");
    }
    if s.iss.is_some() && s.sub.is_none() {
        return field("iss", "narrows `sub`: name `sub` too");
    }
    if s.connection.as_deref().is_some_and(|v| !connection_ok(v)) {
        return field("connection", "`<relay>/<id>`, as in the events");
    }
    Ok(s)
}

impl Selector {
    /// The revocation a `revoke` or `invalidate` stores, and its registry key.
    pub fn revocation(&self, verb: Verb) -> Option<(String, Revocation)> {
        let until = self
            .until
            .unwrap_or_else(|| crate::clock::now_secs() + DEFAULT_INVALIDATION.as_secs());
        let r = Revocation {
            v: 1,
            jti: self.jti.clone(),
            sub: self.sub.clone(),
            iss: self.iss.clone(),
            issued_before: self.issued_before,
            until,
        };
        match verb {
            Verb::Revoke => Some((keys::revoked_jti_key(self.jti.as_deref()?), r)),
            Verb::Invalidate => Some((
                keys::invalidated_sub_key(self.sub.as_deref()?, self.iss.as_deref()),
                r,
            )),
            Verb::Disconnect
            | Verb::Connections
            | Verb::Subscribe
            | Verb::Unsubscribe
            | Verb::Channels => None,
        }
    }

    /// The server-side subscription a `subscribe` or `unsubscribe` names, and its registry
    /// key.
    pub fn server_sub(&self, verb: Verb) -> Option<(String, ServerSub)> {
        if !verb.server_side() {
            return None;
        }
        let (sub, channel) = (self.sub.clone()?, self.channel.clone()?);
        let key = keys::server_sub_key(&sub, self.iss.as_deref(), &channel);
        Some((
            key,
            ServerSub {
                v: keys::VALUE_VERSION,
                sub,
                iss: self.iss.clone(),
                channel,
                at: crate::clock::now_ms(),
            },
        ))
    }
}

impl Selector {
    /// Whether the connection `id` (`<relay>/<n>`) with `claims` is one it names: each
    /// field it has must match. Pure.
    pub fn selects(&self, id: &str, claims: Option<&Map<String, Value>>) -> bool {
        let claim = |k: &str| claims.and_then(|c| c.get(k)).and_then(Value::as_str);
        self.connection.as_deref().is_none_or(|c| c == id)
            && self.sub.as_deref().is_none_or(|s| claim("sub") == Some(s))
            && self.iss.as_deref().is_none_or(|s| claim("iss") == Some(s))
    }
}

/// One connection in a `connections` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listed {
    /// `<relay>/<id>`.
    pub connection: String,
    /// Its token's `sub`, `iss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Its token's `iss`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// When it opened, in milliseconds since the epoch.
    pub connected_at: u64,
    /// Its channels, sorted.
    pub channels: Vec<String>,
}

/// One channel in a `channels` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelCount {
    /// The channel.
    pub channel: String,
    /// How many connections are subscribed to it.
    pub subscribers: usize,
}

/// One relay's answer to a fleet request.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Answer {
    /// The relay.
    pub relay: String,
    /// How many of its connections the command reached.
    pub connections: usize,
    /// `connections`: them (at most [`MAX_LISTED`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listed: Vec<Listed>,
    /// `channels`: its channels, sorted (at most [`MAX_CHANNELS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<ChannelCount>,
    /// `channels`: it had more than it listed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// The reply to the backend: the answers added up.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tally {
    /// Connections the command reached, across the relays that answered.
    pub reached: usize,
    /// Relays that answered.
    pub relays: usize,
    /// Relays with a live lease when the command came: fewer answers than this means some
    /// relay did not answer within the bound (its connections are not counted).
    pub expected: usize,
    /// `connections`: the connections, sorted by id (at most [`MAX_LISTED`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<Vec<Listed>>,
    /// `channels`: the channels, sorted, with their counts summed over the relays (at most
    /// [`MAX_CHANNELS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<ChannelCount>>,
    /// `connections`, `channels`: true when more were found than listed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

impl Tally {
    /// Starts a tally for `verb`, expecting `expected` relays.
    pub fn new(verb: Verb, expected: usize) -> Self {
        Self {
            expected,
            connections: (verb == Verb::Connections).then(Vec::new),
            channels: (verb == Verb::Channels).then(Vec::new),
            ..Self::default()
        }
    }

    /// Adds one relay's answer (a relay answering twice counts once). Pure.
    pub fn add(&mut self, a: Answer, seen: &mut Vec<String>) {
        if seen.contains(&a.relay) {
            return;
        }
        seen.push(a.relay);
        self.relays += 1;
        self.reached += a.connections;
        if let Some(list) = &mut self.connections {
            if a.listed.len() < a.connections {
                self.truncated = true;
            }
            list.extend(a.listed);
            list.sort_by(|x, y| x.connection.cmp(&y.connection));
            if list.len() > MAX_LISTED {
                list.truncate(MAX_LISTED);
                self.truncated = true;
            }
        }
        if let Some(list) = &mut self.channels {
            // Each relay lists its first channels by name: the first of the union are
            // among them, so the counts of those kept are whole.
            self.truncated |= a.truncated;
            let mut merged: std::collections::BTreeMap<String, usize> = std::mem::take(list)
                .into_iter()
                .map(|c| (c.channel, c.subscribers))
                .collect();
            for c in a.channels {
                *merged.entry(c.channel).or_default() += c.subscribers;
            }
            if merged.len() > MAX_CHANNELS {
                self.truncated = true;
            }
            *list = merged
                .into_iter()
                .take(MAX_CHANNELS)
                .map(|(channel, subscribers)| ChannelCount {
                    channel,
                    subscribers,
                })
                .collect();
        }
    }

    /// Whether every expected relay answered.
    pub fn complete(&self) -> bool {
        self.relays >= self.expected
    }
}

/// This relay's channels starting with `prefix`: the first [`MAX_CHANNELS`] by name with
/// their subscribers, how many subscriptions matched, and whether some were left out.
fn channels(relay: &Relay, prefix: &str) -> (Vec<ChannelCount>, usize, bool) {
    let mut counts: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    let mut matched = 0;
    for conn in relay.connections() {
        for (channel, _) in conn.subscriptions() {
            if channel.starts_with(prefix) {
                matched += 1;
                *counts.entry(channel).or_default() += 1;
            }
        }
    }
    let truncated = counts.len() > MAX_CHANNELS;
    let list = counts
        .into_iter()
        .take(MAX_CHANNELS)
        .map(|(channel, subscribers)| ChannelCount {
            channel,
            subscribers,
        })
        .collect();
    (list, matched, truncated)
}

/// Carries `verb` out on this relay's own connections.
pub async fn apply(relay: &Relay, verb: Verb, s: &Selector) -> Answer {
    let mut answer = Answer {
        relay: relay.name.clone(),
        connections: 0,
        listed: Vec::new(),
        channels: Vec::new(),
        truncated: false,
    };
    let applied = || {
        relay
            .metrics
            .control_applied
            .get_or_create(&Kind { event: verb.name() })
            .inc();
    };
    if let Some((_, r)) = s.revocation(verb) {
        answer.connections = super::revocations::close_covered(relay, &r);
        applied();
        return answer;
    }
    // Kept here too, not only by the watch (which may not have read the key yet): a
    // connection this relay admits from now on is served by it.
    if let Some((key, sub)) = s.server_sub(verb) {
        answer.connections = if verb == Verb::Subscribe {
            relay.server_subs.set(&key, Some(sub.clone()));
            serversubs::subscribe_live(relay, &sub).await
        } else {
            relay.server_subs.set(&key, None);
            serversubs::unsubscribe_live(relay, &sub)
        };
        applied();
        return answer;
    }
    if verb == Verb::Channels {
        let (list, matched, truncated) = channels(relay, s.prefix.as_deref().unwrap_or_default());
        answer.channels = list;
        answer.connections = matched;
        answer.truncated = truncated;
        applied();
        return answer;
    }
    for conn in relay.connections() {
        let id = connection_id(&relay.name, conn.id);
        let claims = conn.claims();
        // One that is closing already (its close frame sent) is gone for the backend.
        if conn.outbox.close_request().is_some() || !s.selects(&id, claims.as_deref()) {
            continue;
        }
        answer.connections += 1;
        match verb {
            Verb::Disconnect => conn.outbox.close(if s.reconnect.unwrap_or(true) {
                Cause::Disconnect
            } else {
                Cause::DisconnectFinal
            }),
            Verb::Connections if answer.listed.len() < MAX_LISTED => {
                let claim = |k: &str| {
                    claims
                        .as_deref()
                        .and_then(|c| c.get(k))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                };
                let mut channels: Vec<String> =
                    conn.subscriptions().into_iter().map(|(c, _)| c).collect();
                channels.sort();
                answer.listed.push(Listed {
                    connection: id,
                    sub: claim("sub"),
                    iss: claim("iss"),
                    connected_at: conn.connected_at,
                    channels,
                });
            }
            Verb::Connections
            | Verb::Revoke
            | Verb::Invalidate
            | Verb::Subscribe
            | Verb::Unsubscribe
            | Verb::Channels => {}
        }
    }
    applied();
    answer
}

/// Serves the control service and the fleet requests until the relay stops; nothing when
/// the config has no `control` (or no registry).
pub async fn serve(relay: Arc<Relay>) {
    let Some(prefix) = relay
        .settings()
        .config
        .control
        .as_ref()
        .map(|c| c.subject.clone())
    else {
        return;
    };
    if relay.registry.is_none() {
        return;
    }
    // Retried until NATS takes the subscriptions: the relay may start before NATS answers.
    loop {
        match serve_once(&relay, &prefix).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, "control service not started; retrying"),
        }
        tokio::select! {
            () = relay.shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

async fn serve_once(relay: &Arc<Relay>, prefix: &str) -> Result<(), async_nats::Error> {
    let client = relay.hub.client().clone();
    let fleet = client.subscribe(format!("{prefix}.fleet.*")).await?;
    let service = client
        .service_builder()
        .description(
            "wsrelay: disconnect and list a gateway's connections, revoke tokens, subscribe users to channels (docs/backend.md)",
        )
        .metadata(HashMap::from([("subject".to_owned(), prefix.to_owned())]))
        .start(SERVICE_NAME, SERVICE_VERSION)
        .await?;
    let mut endpoints = Vec::new();
    for verb in Verb::ALL {
        let ep = service
            .endpoint_builder()
            .name(verb.name())
            .add(format!("{prefix}.{}", verb.name()))
            .await?;
        endpoints.push(ep.map(move |r| (verb, r)));
    }
    tracing::info!(subject = %prefix, "control service started");
    let commands =
        futures::stream::select_all(endpoints).for_each_concurrent(CONCURRENT, |(verb, req)| {
            let relay = relay.clone();
            let prefix = prefix.to_owned();
            async move { take(&relay, &prefix, verb, req).await }
        });
    let answers = fleet.for_each_concurrent(CONCURRENT, |m| {
        let relay = relay.clone();
        async move { answer(&relay, m).await }
    });
    tokio::select! {
        () = relay.shutdown.cancelled() => {}
        () = commands => {}
        () = answers => {}
    }
    let _ = service.stop().await;
    Ok(())
}

/// Answers one fleet request for the relay that took the command.
async fn answer(relay: &Relay, m: async_nats::Message) {
    let Some(reply) = m.reply else { return };
    let Some(verb) = m.subject.rsplit('.').next().and_then(Verb::of) else {
        return;
    };
    let Ok(s) = parse(verb, &m.payload) else {
        return;
    };
    let a = apply(relay, verb, &s).await;
    if let Ok(body) = serde_json::to_vec(&a) {
        let _ = relay.hub.client().publish(reply, Bytes::from(body)).await;
    }
}

/// Takes one command from the backend: checks it, asks the fleet, replies with the tally.
async fn take(relay: &Relay, prefix: &str, verb: Verb, req: async_nats::service::Request) {
    let count = |outcome: &'static str| {
        relay
            .metrics
            .control_commands
            .get_or_create(&Command {
                command: verb.name(),
                outcome,
            })
            .inc();
    };
    let s = match parse(verb, &req.message.payload) {
        Ok(s) => s,
        Err(e) => {
            count("invalid");
            let _ = req
                .respond(Err(async_nats::service::error::Error {
                    status: e.to_string(),
                    code: 400,
                }))
                .await;
            return;
        }
    };
    let gathered = match carry_out(relay, prefix, verb, &s).await {
        Ok(tally) => Ok(tally),
        Err(Failed::Refused(code, status)) => {
            count("invalid");
            let _ = req
                .respond(Err(async_nats::service::error::Error { status, code }))
                .await;
            return;
        }
        Err(Failed::Fleet(e)) => Err(e),
    };
    match gathered {
        Ok(tally) => {
            count(if tally.complete() { "ok" } else { "partial" });
            tracing::info!(
                command = verb.name(),
                reached = tally.reached,
                relays = tally.relays,
                expected = tally.expected,
                "control command"
            );
            let body = serde_json::to_vec(&tally).unwrap_or_default();
            let _ = req.respond(Ok(Bytes::from(body))).await;
        }
        Err(e) => {
            count("error");
            let _ = req
                .respond(Err(async_nats::service::error::Error {
                    status: format!("the fleet could not be asked: {e}"),
                    code: 503,
                }))
                .await;
        }
    }
}

/// Why a checked command was not carried out.
enum Failed {
    /// Refused before anything was done (a service error code, and why).
    Refused(usize, String),
    /// The fleet could not be asked, or what it did could not be stored.
    Fleet(async_nats::Error),
}

/// Carries a checked command out: asks the fleet, and stores or removes what it keeps in the
/// registry (revocations, server-side subscriptions).
async fn carry_out(relay: &Relay, prefix: &str, verb: Verb, s: &Selector) -> Result<Tally, Failed> {
    let stored = |what: &'static str| {
        move |e: crate::registry::RegistryError| -> Failed {
            Failed::Fleet(format!("the {what} was not stored: {e}").into())
        }
    };
    // Revocations: the connections closed first (and counted), then the revocation stored
    // for later handshakes, refreshes and relays.
    if let (Some((key, r)), Some(registry)) = (s.revocation(verb), &relay.registry) {
        let tally = gather(relay, prefix, verb, s)
            .await
            .map_err(Failed::Fleet)?;
        let ttl = r.until.saturating_sub(crate::clock::now_secs());
        let value = Bytes::from(serde_json::to_vec(&r).unwrap_or_default());
        registry
            .put_ttl(&key, value, Duration::from_secs(ttl))
            .await
            .map_err(stored("revocation"))?;
        return Ok(tally);
    }
    let (Some((key, sub)), Some(registry)) = (s.server_sub(verb), &relay.registry) else {
        return gather(relay, prefix, verb, s).await.map_err(Failed::Fleet);
    };
    if verb == Verb::Unsubscribe {
        // The fleet ends them first (and counts them), then the key goes; every relay's
        // watch ends what the fleet request missed.
        let tally = gather(relay, prefix, verb, s)
            .await
            .map_err(Failed::Fleet)?;
        registry
            .remove_kept(&key)
            .await
            .map_err(|e| Failed::Fleet(format!("the subscription was not removed: {e}").into()))?;
        return Ok(tally);
    }
    // Subscribe: the channel must map to a binding that allows subscribe (the claims each
    // connection has decide the rest), and the user have room; stored first, so a connection
    // admitted from now on gets it.
    let mut claims = Map::new();
    claims.insert("sub".into(), Value::String(sub.sub.clone()));
    if let Some(iss) = &sub.iss {
        claims.insert("iss".into(), Value::String(iss.clone()));
    }
    let resolved = relay.settings().authz.resolve_binding(
        &sub.channel,
        crate::authz::Operation::Subscribe,
        Some(&claims),
    );
    match resolved {
        Ok(_)
        | Err(
            crate::authz::AuthzError::MissingClaim { .. }
            | crate::authz::AuthzError::InvalidClaim { .. },
        ) => {}
        Err(e) => return Err(Failed::Refused(400, e.to_string())),
    }
    let (n, has) = relay.server_subs.count(&sub.sub, &key);
    if !has && n >= serversubs::MAX_PER_SUB {
        return Err(Failed::Refused(
            409,
            format!(
                "sub has {} server-side channels (the most)",
                serversubs::MAX_PER_SUB
            ),
        ));
    }
    let value = Bytes::from(serde_json::to_vec(&sub).unwrap_or_default());
    registry
        .put_kept(&key, value)
        .await
        .map_err(stored("subscription"))?;
    gather(relay, prefix, verb, s).await.map_err(Failed::Fleet)
}

/// Asks every relay (this one included) and adds up their answers, until as many as hold a
/// live lease answered or [`GATHER_WITHIN`] passed.
async fn gather(
    relay: &Relay,
    prefix: &str,
    verb: Verb,
    s: &Selector,
) -> Result<Tally, async_nats::Error> {
    let client = relay.hub.client();
    let expected = relay.registry.as_ref().map_or(1, |r| r.live_relays());
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(
            format!("{prefix}.fleet.{}", verb.name()),
            inbox,
            Bytes::from(serde_json::to_vec(s)?),
        )
        .await?;
    let mut tally = Tally::new(verb, expected);
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + GATHER_WITHIN;
    while !tally.complete() {
        let m = tokio::select! {
            m = answers.next() => m,
            () = tokio::time::sleep_until(deadline) => None,
        };
        let Some(m) = m else { break };
        if let Ok(a) = serde_json::from_slice::<Answer>(&m.payload) {
            tally.add(a, &mut seen);
        }
    }
    let _ = answers.unsubscribe().await;
    Ok(tally)
}

/// Bound on `wsrelay ctl`'s request: the gather, and slack for NATS.
pub const ASK_WITHIN: Duration = Duration::from_secs(5);

/// Why [`ask`] has no reply to print.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// NATS could not be reached or refused the client.
    #[error("NATS: {0}")]
    Nats(String),
    /// No control service answered (none on this subject, or none in time).
    #[error("no control service answered on {subject}: {message}")]
    NoAnswer {
        /// The endpoint's subject.
        subject: String,
        /// What NATS said.
        message: String,
    },
    /// The service refused the command.
    #[error("refused ({code}): {status}")]
    Refused {
        /// The service error code (400: the command is invalid).
        code: String,
        /// Why.
        status: String,
    },
}

impl AskError {
    /// Whether the service itself refused (rather than not being reached).
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Refused { .. })
    }
}

/// Sends one command to the control service on `prefix` and returns its JSON reply
/// (`wsrelay ctl`).
pub async fn ask(
    nats: &str,
    creds: Option<&std::path::Path>,
    prefix: &str,
    verb: Verb,
    s: &Selector,
) -> Result<String, AskError> {
    let mut options = async_nats::ConnectOptions::new().name("wsrelay ctl");
    if let Some(path) = creds {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| AskError::Nats(e.to_string()))?;
    }
    let client = tokio::time::timeout(ASK_WITHIN, options.connect(nats))
        .await
        .map_err(|_| AskError::Nats(format!("{nats} did not answer")))?
        .map_err(|e| AskError::Nats(e.to_string()))?;
    let subject = format!("{prefix}.{}", verb.name());
    let body = serde_json::to_vec(s).map_err(|e| AskError::Nats(e.to_string()))?;
    let reply = tokio::time::timeout(ASK_WITHIN, client.request(subject.clone(), body.into()))
        .await
        .map_err(|_| AskError::NoAnswer {
            subject: subject.clone(),
            message: "timed out".into(),
        })?
        .map_err(|e| AskError::NoAnswer {
            subject: subject.clone(),
            message: e.to_string(),
        })?;
    let header = |k: &str| {
        reply
            .headers
            .as_ref()
            .and_then(|h| h.get(k))
            .map(|v| v.as_str().to_owned())
    };
    if let Some(status) = header(async_nats::service::NATS_SERVICE_ERROR) {
        return Err(AskError::Refused {
            code: header(async_nats::service::NATS_SERVICE_ERROR_CODE).unwrap_or_default(),
            status,
        });
    }
    Ok(String::from_utf8_lossy(&reply.payload).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_command_names_whom_and_nothing_unknown() {
        let ok = parse(Verb::Disconnect, br#"{"sub":"42","reconnect":false}"#).unwrap();
        assert_eq!(ok.sub.as_deref(), Some("42"));
        assert_eq!(ok.reconnect, Some(false));
        assert!(parse(Verb::Connections, br#"{"connection":"wsrelay-0/7"}"#).is_ok());
        for (verb, body, want) in [
            (Verb::Disconnect, &b"{}"[..], "name `sub` or `connection`"),
            (Verb::Disconnect, b"[]", "not a command"),
            (
                Verb::Disconnect,
                br#"{"sub":"1","kick":true}"#,
                "unknown field",
            ),
            (Verb::Disconnect, br#"{"sub":""}"#, "sub: 1 to 256"),
            (Verb::Disconnect, br#"{"sub":"a\u0000"}"#, "sub: 1 to 256"),
            (Verb::Disconnect, br#"{"iss":"x"}"#, "name `sub`"),
            (Verb::Disconnect, br#"{"sub":"1","iss":"x"}"#, ""),
            (Verb::Disconnect, br#"{"connection":"r1"}"#, "connection:"),
            (
                Verb::Disconnect,
                br#"{"connection":"r 1/2"}"#,
                "connection:",
            ),
            (Verb::Disconnect, br#"{"connection":"r1/x"}"#, "connection:"),
            (
                Verb::Connections,
                br#"{"sub":"1","reconnect":true}"#,
                "reconnect:",
            ),
        ] {
            let got = parse(verb, body)
                .map(|_| String::new())
                .unwrap_or_else(|e| e.to_string());
            assert!(
                if want.is_empty() {
                    got.is_empty()
                } else {
                    got.contains(want)
                },
                "{}: {got:?}, want {want:?}",
                String::from_utf8_lossy(body)
            );
        }
        let later = crate::clock::now_secs() + 600;
        let ok = parse(
            Verb::Revoke,
            format!(r#"{{"jti":"t1","until":{later}}}"#).as_bytes(),
        );
        let (key, r) = ok.unwrap().revocation(Verb::Revoke).unwrap();
        assert_eq!((key.as_str(), r.until), ("rev.jti.dDE", later));
        let ok = parse(Verb::Invalidate, br#"{"sub":"u","issuedBefore":5}"#).unwrap();
        let (key, r) = ok.revocation(Verb::Invalidate).unwrap();
        assert_eq!(key, "rev.sub.dQ.-");
        assert!(r.until > crate::clock::now_secs(), "a day by default");
        for (verb, body, want) in [
            (
                Verb::Revoke,
                r#"{"jti":"t1"}"#.to_owned(),
                "until: required",
            ),
            (
                Verb::Revoke,
                format!(r#"{{"until":{later}}}"#),
                "jti: required",
            ),
            (
                Verb::Revoke,
                format!(r#"{{"jti":"t","sub":"u","until":{later}}}"#),
                "sub: not a field",
            ),
            (
                Verb::Revoke,
                r#"{"jti":"t","until":5}"#.to_owned(),
                "until: in the future",
            ),
            (
                Verb::Revoke,
                format!(r#"{{"jti":"t","until":{}}}"#, later + 400 * 86_400),
                "until: in the future",
            ),
            (
                Verb::Invalidate,
                r#"{"sub":"u"}"#.to_owned(),
                "issuedBefore: required",
            ),
            (
                Verb::Invalidate,
                r#"{"sub":"u","issuedBefore":1,"connection":"r/1"}"#.to_owned(),
                "connection: not a field",
            ),
            (
                Verb::Disconnect,
                r#"{"sub":"u","jti":"t"}"#.to_owned(),
                "jti: not a field",
            ),
            (
                Verb::Connections,
                format!(r#"{{"sub":"u","until":{later}}}"#),
                "until: not a field",
            ),
        ] {
            let got = parse(verb, body.as_bytes())
                .map(|_| String::new())
                .unwrap_or_else(|e| e.to_string());
            assert!(got.contains(want), "{body}: {got:?}, want {want:?}");
        }
        let long = format!(r#"{{"sub":"{}"}}"#, "x".repeat(257));
        assert!(parse(Verb::Disconnect, long.as_bytes()).is_err());
    }

    #[test]
    fn server_side_commands_name_a_user_and_a_channel() {
        let ok = parse(Verb::Subscribe, br#"{"sub":"42","channel":"a.b"}"#).unwrap();
        let (key, s) = ok.server_sub(Verb::Subscribe).unwrap();
        assert_eq!(key, keys::server_sub_key("42", None, "a.b"));
        assert_eq!((s.sub.as_str(), s.channel.as_str()), ("42", "a.b"));
        assert!(parse(Verb::Unsubscribe, br#"{"sub":"4","iss":"i","channel":"c"}"#).is_ok());
        assert!(parse(Verb::Channels, br#"{}"#).is_ok());
        assert!(parse(Verb::Channels, br#"{"prefix":"rooms."}"#).is_ok());
        for (verb, body, want) in [
            (
                Verb::Subscribe,
                r#"{"sub":"42"}"#.to_owned(),
                "channel: required",
            ),
            (
                Verb::Subscribe,
                r#"{"channel":"a"}"#.to_owned(),
                "sub: required",
            ),
            (
                Verb::Subscribe,
                r#"{"connection":"r/1","channel":"a"}"#.to_owned(),
                "connection: not a field",
            ),
            (
                Verb::Unsubscribe,
                r#"{"sub":"1","channel":""}"#.to_owned(),
                "channel: required",
            ),
            (
                Verb::Subscribe,
                format!(r#"{{"sub":"1","channel":"{}"}}"#, "c".repeat(257)),
                "channel: required",
            ),
            (
                Verb::Disconnect,
                r#"{"sub":"1","channel":"a"}"#.to_owned(),
                "channel: not a field",
            ),
            (
                Verb::Channels,
                r#"{"sub":"1"}"#.to_owned(),
                "sub: not a field",
            ),
            (
                Verb::Subscribe,
                r#"{"sub":"1","channel":"a","prefix":"a"}"#.to_owned(),
                "prefix: not a field",
            ),
            (
                Verb::Channels,
                format!(r#"{{"prefix":"{}"}}"#, "p".repeat(257)),
                "prefix: at most 256",
            ),
        ] {
            let got = parse(verb, body.as_bytes())
                .map(|_| String::new())
                .unwrap_or_else(|e| e.to_string());
            assert!(got.contains(want), "{body}: {got:?}, want {want:?}");
        }
    }

    #[test]
    fn channel_counts_add_up_and_are_bounded() {
        let counts = |names: &[(&str, usize)]| {
            names
                .iter()
                .map(|(c, n)| ChannelCount {
                    channel: (*c).to_owned(),
                    subscribers: *n,
                })
                .collect::<Vec<_>>()
        };
        let mut t = Tally::new(Verb::Channels, 2);
        let mut seen = Vec::new();
        t.add(
            Answer {
                relay: "r1".into(),
                connections: 3,
                channels: counts(&[("a", 2), ("b", 1)]),
                ..Answer::default()
            },
            &mut seen,
        );
        t.add(
            Answer {
                relay: "r2".into(),
                connections: 2,
                channels: counts(&[("b", 1), ("c", 1)]),
                ..Answer::default()
            },
            &mut seen,
        );
        assert_eq!(
            serde_json::to_value(&t).unwrap(),
            json!({"reached": 5, "relays": 2, "expected": 2, "channels": [
                {"channel": "a", "subscribers": 2},
                {"channel": "b", "subscribers": 2},
                {"channel": "c", "subscribers": 1}]})
        );
        let many = |relay: &str, from: usize| Answer {
            relay: relay.into(),
            connections: MAX_CHANNELS,
            channels: (from..from + MAX_CHANNELS)
                .map(|i| ChannelCount {
                    channel: format!("c{i:05}"),
                    subscribers: 1,
                })
                .collect(),
            ..Answer::default()
        };
        let mut t = Tally::new(Verb::Channels, 2);
        let mut seen = Vec::new();
        t.add(many("r1", 0), &mut seen);
        t.add(many("r2", 500), &mut seen);
        let list = t.channels.as_ref().unwrap();
        assert_eq!(list.len(), MAX_CHANNELS);
        assert!(t.truncated);
        assert_eq!(list[499].subscribers, 1);
        assert_eq!(list[500].subscribers, 2, "in both relays' lists");
    }

    #[test]
    fn every_field_named_must_match() {
        let c = claims(json!({"sub": "42", "iss": "a"}));
        let sel = |v: Value| serde_json::from_value::<Selector>(v).unwrap();
        assert!(sel(json!({"sub": "42"})).selects("r/1", Some(&c)));
        assert!(sel(json!({"sub": "42", "iss": "a"})).selects("r/1", Some(&c)));
        assert!(!sel(json!({"sub": "42", "iss": "b"})).selects("r/1", Some(&c)));
        assert!(!sel(json!({"sub": "4"})).selects("r/1", Some(&c)));
        assert!(sel(json!({"connection": "r/1"})).selects("r/1", None));
        assert!(!sel(json!({"connection": "r/1"})).selects("r/11", Some(&c)));
        assert!(!sel(json!({"sub": "42", "connection": "r/2"})).selects("r/1", Some(&c)));
        assert!(!sel(json!({"sub": "42"})).selects("r/1", None), "anonymous");
    }

    #[test]
    fn answers_add_up_once_per_relay_and_lists_are_bounded() {
        let listed = |relay: &str, n: usize| {
            (0..n)
                .map(|i| Listed {
                    connection: format!("{relay}/{i}"),
                    sub: None,
                    iss: None,
                    connected_at: 0,
                    channels: vec![],
                })
                .collect::<Vec<_>>()
        };
        let mut t = Tally::new(Verb::Disconnect, 2);
        let mut seen = Vec::new();
        let a = Answer {
            relay: "r1".into(),
            connections: 3,
            listed: vec![],
            ..Answer::default()
        };
        t.add(a.clone(), &mut seen);
        t.add(a, &mut seen);
        assert_eq!((t.reached, t.relays, t.complete()), (3, 1, false));
        t.add(
            Answer {
                relay: "r2".into(),
                connections: 0,
                listed: vec![],
                ..Answer::default()
            },
            &mut seen,
        );
        assert!(t.complete());
        assert_eq!(t.connections, None);
        assert_eq!(
            serde_json::to_value(&t).unwrap(),
            json!({"reached": 3, "relays": 2, "expected": 2})
        );

        let mut t = Tally::new(Verb::Connections, 2);
        let mut seen = Vec::new();
        t.add(
            Answer {
                relay: "b".into(),
                connections: 600,
                listed: listed("b", 600),
                ..Answer::default()
            },
            &mut seen,
        );
        t.add(
            Answer {
                relay: "a".into(),
                connections: 600,
                listed: listed("a", 600),
                ..Answer::default()
            },
            &mut seen,
        );
        let list = t.connections.as_ref().unwrap();
        assert_eq!(list.len(), MAX_LISTED);
        assert!(list.windows(2).all(|w| w[0].connection <= w[1].connection));
        assert!(t.truncated);
        assert_eq!(t.reached, 1200);
    }
}
