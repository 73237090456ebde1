//! The control service (docs/backend.md): the backend commands the fleet over NATS. Every
//! relay serves the NATS service [`SERVICE_NAME`] (the NATS micro conventions: found with
//! `$SRV.PING`, `$SRV.INFO`), whose endpoints `<control.subject>.disconnect`, `.connections`,
//! `.revoke` and `.invalidate` share one queue group: one relay takes each command. It
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
use crate::registry::keys;
use crate::state::Relay;

/// The NATS service's name (every gateway's relays serve it; `$SRV.INFO.wsrelay_control`
/// lists them, each with its endpoints' subjects).
pub const SERVICE_NAME: &str = "wsrelay_control";

/// The service's version: that of the commands' JSON.
pub const SERVICE_VERSION: &str = "1.0.0";

/// How long the relay that took a command waits for the others' answers.
pub const GATHER_WITHIN: Duration = Duration::from_secs(2);

/// Most connections one `connections` answer lists (per relay, and in all).
pub const MAX_LISTED: usize = 1000;

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
}

impl Verb {
    /// Every one, in the order of the docs.
    pub const ALL: [Self; 4] = [
        Self::Disconnect,
        Self::Connections,
        Self::Revoke,
        Self::Invalidate,
    ];

    /// The endpoint's name, the last token of its subjects.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Disconnect => "disconnect",
            Self::Connections => "connections",
            Self::Revoke => "revoke",
            Self::Invalidate => "invalidate",
        }
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
        let has = [
            ("sub", s.sub.is_some() && verb == Verb::Revoke),
            ("iss", s.iss.is_some() && verb == Verb::Revoke),
            ("connection", s.connection.is_some() && verb.revokes()),
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
            Verb::Disconnect | Verb::Connections => None,
        }
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

/// One relay's answer to a fleet request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Answer {
    /// The relay.
    pub relay: String,
    /// How many of its connections the command reached.
    pub connections: usize,
    /// `connections`: them (at most [`MAX_LISTED`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listed: Vec<Listed>,
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
    /// `connections`: true when more were found than listed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

impl Tally {
    /// Starts a tally for `verb`, expecting `expected` relays.
    pub fn new(verb: Verb, expected: usize) -> Self {
        Self {
            expected,
            connections: (verb == Verb::Connections).then(Vec::new),
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
    }

    /// Whether every expected relay answered.
    pub fn complete(&self) -> bool {
        self.relays >= self.expected
    }
}

/// Carries `verb` out on this relay's own connections.
pub fn apply(relay: &Relay, verb: Verb, s: &Selector) -> Answer {
    let mut answer = Answer {
        relay: relay.name.clone(),
        connections: 0,
        listed: Vec::new(),
    };
    if let Some((_, r)) = s.revocation(verb) {
        answer.connections = super::revocations::close_covered(relay, &r);
        relay
            .metrics
            .control_applied
            .get_or_create(&Kind { event: verb.name() })
            .inc();
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
            Verb::Connections | Verb::Revoke | Verb::Invalidate => {}
        }
    }
    relay
        .metrics
        .control_applied
        .get_or_create(&Kind { event: verb.name() })
        .inc();
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
            "wsrelay: disconnect and list a gateway's connections, revoke tokens (docs/backend.md)",
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
    let a = apply(relay, verb, &s);
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
    // Revocations: the connections closed first (and counted), then the revocation stored
    // for later handshakes, refreshes and relays.
    let gathered = match gather(relay, prefix, verb, &s).await {
        Ok(tally) => match (s.revocation(verb), &relay.registry) {
            (Some((key, r)), Some(registry)) => {
                let ttl = r.until.saturating_sub(crate::clock::now_secs());
                let value = Bytes::from(serde_json::to_vec(&r).unwrap_or_default());
                registry
                    .put_ttl(&key, value, Duration::from_secs(ttl))
                    .await
                    .map(|()| tally)
                    .map_err(|e| -> async_nats::Error {
                        format!("the revocation was not stored: {e}").into()
                    })
            }
            _ => Ok(tally),
        },
        Err(e) => Err(e),
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
        };
        t.add(a.clone(), &mut seen);
        t.add(a, &mut seen);
        assert_eq!((t.reached, t.relays, t.complete()), (3, 1, false));
        t.add(
            Answer {
                relay: "r2".into(),
                connections: 0,
                listed: vec![],
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
            },
            &mut seen,
        );
        t.add(
            Answer {
                relay: "a".into(),
                connections: 600,
                listed: listed("a", 600),
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
