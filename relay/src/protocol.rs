//! Protocol v1 (`wsrelay.v1`): the JSON text frames exchanged with clients.
//!
//! Pure: parsing client frames and encoding server frames. The normative description is
//! `docs/protocol.md`; the codes and close codes here are the ones listed there.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The WebSocket subprotocol name of this protocol version.
pub const SUBPROTOCOL: &str = "wsrelay.v1";
/// Prefix of the subprotocol entry that carries a bearer token (`bearer.<jwt>`).
pub const BEARER_SUBPROTOCOL_PREFIX: &str = "bearer.";

/// A request id chosen by the client, echoed in the reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RequestId {
    /// A number.
    Num(u64),
    /// A string (at most 64 bytes).
    Str(String),
}

/// A client-to-server request, parsed and checked for shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Start receiving messages of a channel.
    Subscribe {
        /// Request id.
        id: Option<RequestId>,
        /// Channel name.
        channel: String,
        /// Resume from this position (resumable channels).
        since: Option<Since>,
        /// A subscription token, for a binding that takes one.
        token: Option<String>,
        /// The members, then their joins and leaves (a binding with presence).
        presence: bool,
    },
    /// A page of a subscribed channel's members.
    Presence {
        /// Request id.
        id: Option<RequestId>,
        /// The subscribed channel.
        channel: String,
        /// Members whose key sorts after this one (exclusive).
        after: Option<String>,
        /// At most this many ([`PRESENCE_LIMITS`]).
        limit: usize,
    },
    /// Stop receiving messages of a channel.
    Unsubscribe {
        /// Request id.
        id: Option<RequestId>,
        /// Channel name.
        channel: String,
    },
    /// Publish a payload on a channel.
    Publish {
        /// Request id.
        id: Option<RequestId>,
        /// Channel name.
        channel: String,
        /// The NATS payload bytes (raw JSON of `payload`, or the UTF-8 of `text`).
        payload: Vec<u8>,
        /// Client message id for de-duplication on resumable channels (`Nats-Msg-Id`).
        msg_id: Option<String>,
        /// A subscription token, for a binding that takes one.
        token: Option<String>,
    },
    /// A new subscription token for a live subscription: its expiry replaces the old one.
    SubRefresh {
        /// Request id.
        id: Option<RequestId>,
        /// The subscribed channel.
        channel: String,
        /// The JWT.
        token: String,
    },
    /// A new token for this connection (same identity): its expiry replaces the old one.
    Refresh {
        /// Request id.
        id: Option<RequestId>,
        /// The JWT.
        token: String,
    },
    /// Application-level ping; answered with `pong`.
    Ping {
        /// Request id.
        id: Option<RequestId>,
    },
}

/// A position on a resumable channel, as a client sends it back (`since`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Since {
    /// The stream's epoch the position belongs to.
    pub epoch: String,
    /// The last position received.
    pub seq: u64,
}

/// Longest `since.epoch` and `msgId` accepted, in bytes.
pub const MAX_TOKEN_FIELD: usize = 64;

/// Whether `s` may be a `msgId`: 1 to 64 bytes of printable ASCII, no space. It becomes the
/// `Nats-Msg-Id` header of a stored publish, where a line break would end the header (the
/// NATS client refuses it) and anything unprintable would reach the backend's logs. Pure.
pub fn is_msg_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_TOKEN_FIELD && s.bytes().all(|b| b.is_ascii_graphic())
}

/// `s` cut to at most 64 bytes (on a character boundary) for an error reason that quotes
/// what the client sent: a reply never grows with the request that caused it.
fn quoted(s: &str) -> &str {
    if s.len() <= MAX_TOKEN_FIELD {
        return s;
    }
    let mut end = MAX_TOKEN_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A `since` as the documented object, `{"epoch": .., "seq": ..}`; serde would take the
/// array `[epoch, seq]` for the struct too.
fn parse_since(raw: &RawValue) -> Result<Since, String> {
    if !raw.get().trim_start().starts_with('{') {
        return Err("since must be an object {\"epoch\": .., \"seq\": ..}".into());
    }
    serde_json::from_str(raw.get()).map_err(|e| format!("malformed since: {e}"))
}

/// A malformed frame: answered with an `error` reply (code 400), never a crash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct BadFrame {
    /// The request id if it could be read.
    pub id: Option<RequestId>,
    /// What is wrong.
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrame<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<RequestId>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default, borrow)]
    payload: Option<&'a RawValue>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default, borrow)]
    since: Option<&'a RawValue>,
    #[serde(default, rename = "msgId")]
    msg_id: Option<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    presence: Option<bool>,
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    limit: Option<u64>,
}

/// The `limit` of a `presence` request: at least, at most, and without one.
pub const PRESENCE_LIMITS: (usize, usize, usize) = (1, 1000, 100);

/// The frames that may carry a `token`.
const TOKEN_FRAMES: &[&str] = &["refresh", "subrefresh", "subscribe", "publish"];

/// Longest token a `refresh` frame may carry, in bytes.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Best effort: the id of a frame that failed to parse as a whole.
fn salvage_id(text: &str) -> Option<RequestId> {
    #[derive(Deserialize)]
    struct IdOnly {
        #[serde(default)]
        id: Option<RequestId>,
    }
    serde_json::from_str::<IdOnly>(text).ok().and_then(|f| f.id)
}

/// Parses one client text frame.
pub fn parse_request(text: &str) -> Result<Request, BadFrame> {
    let raw: RawFrame<'_> = serde_json::from_str(text).map_err(|e| BadFrame {
        id: salvage_id(text),
        reason: format!("malformed frame: {e}"),
    })?;
    let id = raw.id;
    if let Some(RequestId::Str(s)) = &id
        && s.len() > 64
    {
        return Err(BadFrame {
            id: None,
            reason: "id longer than 64 bytes".into(),
        });
    }
    let bad = |id: Option<RequestId>, reason: &str| BadFrame {
        id,
        reason: reason.to_owned(),
    };
    let need_channel = |id: &Option<RequestId>, ch: Option<String>| {
        ch.ok_or_else(|| bad(id.clone(), "missing field `channel`"))
    };
    if raw.token.is_some() && !TOKEN_FRAMES.contains(&raw.kind.as_str()) {
        return Err(bad(
            id,
            "token is only allowed on refresh, subrefresh, subscribe and publish",
        ));
    }
    if raw
        .token
        .as_ref()
        .is_some_and(|t| t.is_empty() || t.len() > MAX_TOKEN_BYTES)
    {
        return Err(bad(id, "token must be 1 to 8192 bytes"));
    }
    if raw.presence.is_some() && raw.kind != "subscribe" {
        return Err(bad(id, "presence is only allowed on subscribe"));
    }
    if (raw.after.is_some() || raw.limit.is_some()) && raw.kind != "presence" {
        return Err(bad(id, "after and limit are only allowed on presence"));
    }
    match raw.kind.as_str() {
        "subscribe" | "unsubscribe" => {
            if raw.payload.is_some() || raw.text.is_some() || raw.msg_id.is_some() {
                return Err(bad(id, "payload and msgId are only allowed on publish"));
            }
            let channel = need_channel(&id, raw.channel)?;
            if raw.kind == "subscribe" {
                let since = match raw.since.map(parse_since).transpose() {
                    Ok(s) => s,
                    Err(reason) => return Err(bad(id, &reason)),
                };
                if since
                    .as_ref()
                    .is_some_and(|s| s.epoch.is_empty() || s.epoch.len() > MAX_TOKEN_FIELD)
                {
                    return Err(bad(id, "since.epoch must be 1 to 64 bytes"));
                }
                Ok(Request::Subscribe {
                    id,
                    channel,
                    since,
                    token: raw.token,
                    presence: raw.presence.unwrap_or(false),
                })
            } else if raw.since.is_some() {
                Err(bad(id, "since is only allowed on subscribe"))
            } else if raw.token.is_some() {
                Err(bad(id, "token is not allowed on unsubscribe"))
            } else {
                Ok(Request::Unsubscribe { id, channel })
            }
        }
        "publish" => {
            if raw.since.is_some() {
                return Err(bad(id, "since is only allowed on subscribe"));
            }
            if raw.msg_id.as_deref().is_some_and(|m| !is_msg_id(m)) {
                return Err(bad(
                    id,
                    "msgId must be 1 to 64 bytes of printable ASCII (no spaces or control characters)",
                ));
            }
            let channel = need_channel(&id, raw.channel)?;
            let payload = match (raw.payload, raw.text) {
                (Some(p), None) => p.get().as_bytes().to_vec(),
                (None, Some(t)) => t.into_bytes(),
                _ => return Err(bad(id, "publish needs exactly one of `payload` or `text`")),
            };
            Ok(Request::Publish {
                id,
                channel,
                payload,
                msg_id: raw.msg_id,
                token: raw.token,
            })
        }
        "subrefresh" => {
            let extra = raw.payload.is_some()
                || raw.text.is_some()
                || raw.since.is_some()
                || raw.msg_id.is_some();
            if extra {
                return Err(bad(
                    id,
                    "subrefresh takes only an id, a channel and a token",
                ));
            }
            let channel = need_channel(&id, raw.channel)?;
            match raw.token {
                None => Err(bad(id, "missing field `token`")),
                Some(token) => Ok(Request::SubRefresh { id, channel, token }),
            }
        }
        "refresh" => {
            let extra = raw.channel.is_some()
                || raw.payload.is_some()
                || raw.text.is_some()
                || raw.since.is_some()
                || raw.msg_id.is_some();
            match raw.token {
                _ if extra => Err(bad(id, "refresh takes only an id and a token")),
                None => Err(bad(id, "missing field `token`")),
                Some(t) if t.is_empty() || t.len() > MAX_TOKEN_BYTES => {
                    Err(bad(id, "token must be 1 to 8192 bytes"))
                }
                Some(token) => Ok(Request::Refresh { id, token }),
            }
        }
        "presence" => {
            let extra = raw.payload.is_some()
                || raw.text.is_some()
                || raw.since.is_some()
                || raw.msg_id.is_some()
                || raw.token.is_some();
            if extra {
                return Err(bad(
                    id,
                    "presence takes only an id, a channel, after and limit",
                ));
            }
            let channel = need_channel(&id, raw.channel)?;
            let (min, max, default) = PRESENCE_LIMITS;
            let limit = match raw.limit {
                None => default,
                Some(l) if (min as u64..=max as u64).contains(&l) => l as usize,
                Some(_) => return Err(bad(id, "limit must be 1 to 1000")),
            };
            Ok(Request::Presence {
                id,
                channel,
                after: raw.after,
                limit,
            })
        }
        "ping" if raw.since.is_some() || raw.msg_id.is_some() => {
            Err(bad(id, "ping takes only an id"))
        }
        "ping" => Ok(Request::Ping { id }),
        other => Err(BadFrame {
            id,
            reason: format!("unknown frame type {:?}", quoted(other)),
        }),
    }
}

/// Numeric codes of `error` replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 400: malformed frame, unknown type, missing field, binary frame.
    BadRequest = 400,
    /// 401: the token of a `refresh` is not valid (signature, expiry, issuer, audience).
    Unauthorized = 401,
    /// 403: no binding allows this operation on this channel (or it needs claims the
    /// connection does not have); a `refresh` token of another identity.
    Forbidden = 403,
    /// 404: unsubscribe from a channel the connection is not subscribed to.
    NotSubscribed = 404,
    /// 409: subscribe to a channel the connection is already subscribed to.
    AlreadySubscribed = 409,
    /// 422: a channel token or claim value would widen the subject (empty, `.`, `*`, `>`,
    /// whitespace or control characters), or the channel name is malformed.
    InvalidValue = 422,
    /// 429: publish rate exceeded; the publish was dropped.
    RateLimited = 429,
    /// 430: too many subscriptions on this connection.
    TooManySubscriptions = 430,
    /// 503: NATS is not reachable right now; try again.
    Unavailable = 503,
}

impl ErrorCode {
    /// The number sent on the wire.
    pub fn as_u16(self) -> u16 {
        self as u16
    }
}

/// WebSocket close codes used by the relay.
pub mod close {
    /// Normal closure (client asked, or the connection's work is done).
    pub const NORMAL: u16 = 1000;
    /// Policy violation (e.g. the token expired while connected).
    pub const POLICY: u16 = 1008;
    /// A client message larger than `limits.maxMessageBytes`.
    pub const TOO_BIG: u16 = 1009;
    /// Internal error.
    pub const INTERNAL: u16 = 1011;
    /// Service restart: the relay is draining; reconnect (after the hint).
    pub const RESTART: u16 = 1012;
    /// Nothing (not even a pong) received for `limits.idleTimeoutSeconds`.
    pub const IDLE_TIMEOUT: u16 = 4000;
    /// The client did not read fast enough (slow-consumer policy `disconnect`).
    pub const SLOW_CONSUMER: u16 = 4008;
    /// The client kept publishing above its rate after being told (flood).
    pub const FLOOD: u16 = 4029;
    /// Disconnected by the backend (control service); the client may reconnect.
    pub const DISCONNECT: u16 = 4100;
    /// Disconnected by the backend, for good: the client must not reconnect on its own.
    pub const DISCONNECT_FINAL: u16 = 4101;
    /// The backend revoked the connection's token: do not reconnect with it.
    pub const REVOKED: u16 = 4409;
    /// A request refused after the upgrade (`auth.refuseAfterUpgrade`): no token, or an
    /// invalid one (HTTP 401 otherwise).
    pub const REFUSED_UNAUTHORIZED: u16 = 4401;
    /// Refused after the upgrade: the `Origin` is not allowed (HTTP 403 otherwise).
    pub const REFUSED_FORBIDDEN: u16 = 4403;
    /// Refused after the upgrade: too many connections from this client address or token
    /// subject (HTTP 429 otherwise).
    pub const REFUSED_TOO_MANY: u16 = 4429;
    /// Refused after the upgrade: the relay is at capacity, draining, or cannot fetch its
    /// keys (HTTP 503 otherwise).
    pub const REFUSED_UNAVAILABLE: u16 = 4503;
}

/// Whether JSON escapes byte `b` inside a string (as serde_json does: `"`, `\\` and the
/// control characters; nothing else).
fn escaped(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Appends `s` to `out` as a JSON string literal.
fn push_json_str(out: &mut String, s: &str) {
    if !s.bytes().any(escaped) {
        // The common case (channel names): nothing to escape, no temporary string.
        out.push('"');
        out.push_str(s);
        out.push('"');
        return;
    }
    // serde_json escapes correctly; writing to a String cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned()));
}

/// The length of `s` as [`push_json_str`] writes it.
fn json_str_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | 0x08 | 0x0c | b'\n' | b'\r' | b'\t' => 2,
            b if b < 0x20 => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// Decimal digits of `n`.
fn digits(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |l| l as usize + 1)
}

fn push_id(out: &mut String, id: Option<&RequestId>) {
    out.push_str("\"id\":");
    match id {
        None => out.push_str("null"),
        Some(RequestId::Num(n)) => {
            let _ = write!(out, "{n}");
        }
        Some(RequestId::Str(s)) => push_json_str(out, s),
    }
}

/// `{"type":"message","channel":..,"payload":..}`: the NATS payload goes in `payload` when
/// it is JSON, in `text` when it is other UTF-8, in `base64` otherwise. Encoded once per
/// (subject, channel) and shared by every recipient.
pub fn encode_message(channel: &str, payload: &[u8]) -> String {
    encode_message_at(channel, payload, None)
}

/// [`encode_message`] with the position on a resumable channel: `seq` and `prev`.
pub fn encode_message_at(channel: &str, payload: &[u8], at: Option<(u64, u64)>) -> String {
    const HEAD: &str = "{\"type\":\"message\",\"channel\":";
    // Embedded raw only when it is UTF-8 and JSON. serde_json skips over a string's bytes
    // without decoding them, so it alone let non-UTF-8 bytes inside a string pass (and the
    // payload became `null`): such a payload goes as base64.
    let utf8 = std::str::from_utf8(payload).ok();
    let json = utf8.filter(|p| serde_json::from_str::<serde::de::IgnoredAny>(p).is_ok());
    let text = if json.is_some() { None } else { utf8 };
    // Sized exactly: the frame's bytes become a `Bytes` without another allocation (one
    // whose length is below its capacity needs a shared header allocated beside it).
    let len = HEAD.len()
        + json_str_len(channel)
        + at.map_or(0, |(seq, prev)| {
            ",\"seq\":".len() + digits(seq) + ",\"prev\":".len() + digits(prev)
        })
        + match (json, text) {
            (Some(j), _) => ",\"payload\":".len() + j.len(),
            (None, Some(t)) => ",\"text\":".len() + json_str_len(t),
            (None, None) => ",\"base64\":\"".len() + payload.len().div_ceil(3) * 4 + 1,
        }
        + 1;
    let mut out = String::with_capacity(len);
    out.push_str(HEAD);
    push_json_str(&mut out, channel);
    if let Some((seq, prev)) = at {
        let _ = write!(out, ",\"seq\":{seq},\"prev\":{prev}");
    }
    if let Some(j) = json {
        out.push_str(",\"payload\":");
        out.push_str(j);
    } else if let Some(text) = text {
        out.push_str(",\"text\":");
        push_json_str(&mut out, text);
    } else {
        out.push_str(",\"base64\":\"");
        base64_encode(payload, &mut out);
        out.push('"');
    }
    out.push('}');
    out
}

/// Standard alphabet, padded (the `base64` crate), appended to `out`.
fn base64_encode(data: &[u8], out: &mut String) {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode_string(data, out);
}

/// `{"type":"ok","id":..}`.
pub fn encode_ok(id: Option<&RequestId>) -> String {
    let mut out = String::from("{\"type\":\"ok\",");
    push_id(&mut out, id);
    out.push('}');
    out
}

/// The `ok` of a subscribe on a resumable channel: `{"type":"ok","id":..,"epoch":..,
/// "seq":..}`, with `"recovered":..` when the subscribe carried `since`.
pub fn encode_ok_position(
    id: Option<&RequestId>,
    epoch: &str,
    seq: u64,
    recovered: Option<bool>,
) -> String {
    let mut out = String::from("{\"type\":\"ok\",");
    push_id(&mut out, id);
    out.push_str(",\"epoch\":");
    push_json_str(&mut out, epoch);
    let _ = write!(out, ",\"seq\":{seq}");
    if let Some(r) = recovered {
        let _ = write!(out, ",\"recovered\":{r}");
    }
    out.push('}');
    out
}

/// The `ok` of a subscribe with `since` on a channel without history:
/// `{"type":"ok","id":..,"recovered":false}`.
pub fn encode_ok_not_recovered(id: Option<&RequestId>) -> String {
    let mut out = String::from("{\"type\":\"ok\",");
    push_id(&mut out, id);
    out.push_str(",\"recovered\":false}");
    out
}

/// The `ok` of a publish stored by JetStream: `{"type":"ok","id":..,"seq":..}`, with
/// `"duplicate":true` when JetStream had the `msgId` already.
pub fn encode_ok_stored(id: Option<&RequestId>, seq: u64, duplicate: bool) -> String {
    let mut out = String::from("{\"type\":\"ok\",");
    push_id(&mut out, id);
    let _ = write!(out, ",\"seq\":{seq}");
    if duplicate {
        out.push_str(",\"duplicate\":true");
    }
    out.push('}');
    out
}

/// `{"type":"error","id":..,"code":..,"reason":..}`.
pub fn encode_error(id: Option<&RequestId>, code: ErrorCode, reason: &str) -> String {
    let mut out = String::from("{\"type\":\"error\",");
    push_id(&mut out, id);
    let _ = write!(out, ",\"code\":{},\"reason\":", code.as_u16());
    push_json_str(&mut out, reason);
    out.push('}');
    out
}

/// `{"type":"error","id":..,"code":..,"reason":..,"appCode":..}`: [`encode_error`] with the
/// application's code of a backend's deny, when it gave one.
pub fn encode_error_app(
    id: Option<&RequestId>,
    code: ErrorCode,
    reason: &str,
    app_code: Option<u16>,
) -> String {
    let mut out = encode_error(id, code, reason);
    if let Some(c) = app_code {
        out.pop();
        let _ = write!(out, ",\"appCode\":{c}}}");
    }
    out
}

/// Adds `"data":<raw JSON>` to an encoded object (an `ok` or the `welcome`), when there is
/// data. `data` is JSON a backend sent, already parsed once.
pub fn with_data(mut frame: String, data: Option<&str>) -> String {
    if let Some(d) = data {
        frame.pop();
        frame.push_str(",\"data\":");
        frame.push_str(d);
        frame.push('}');
    }
    frame
}

/// Adds `"serverChannels":[..]` to an encoded `welcome`: the server-side subscriptions the
/// connection gets next (a `subscribed` frame each), when there are any.
pub fn with_server_channels(mut frame: String, channels: &[String]) -> String {
    if channels.is_empty() {
        return frame;
    }
    frame.pop();
    frame.push_str(",\"serverChannels\":[");
    for (i, c) in channels.iter().enumerate() {
        if i > 0 {
            frame.push(',');
        }
        push_json_str(&mut frame, c);
    }
    frame.push_str("]}");
    frame
}

/// Adds `"presence":<raw JSON>` (an [`encode_presence`]) to an encoded `ok`.
pub fn with_presence(mut frame: String, presence: &str) -> String {
    frame.pop();
    frame.push_str(",\"presence\":");
    frame.push_str(presence);
    frame.push('}');
    frame
}

/// A page of members, the `presence` of an `ok`: `{"members":[{"key":..,"info":..,
/// "clients":..}],"clients":..,"users":..,"events":..,"complete":..,"next":..}`. `members`
/// are (key, info as JSON object text, connections); `events`: whether `join`/`leave` are
/// sent now; `next`: the key to page on from, when the page is not complete.
pub fn encode_presence<'a>(
    members: impl IntoIterator<Item = (&'a str, &'a str, usize)>,
    clients: usize,
    users: usize,
    events: bool,
    next: Option<&str>,
) -> String {
    let mut out = String::from("{\"members\":[");
    for (i, (key, info, n)) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_member(&mut out, key, info);
        out.pop();
        let _ = write!(out, ",\"clients\":{n}}}");
    }
    let _ = write!(
        out,
        "],\"clients\":{clients},\"users\":{users},\"events\":{events},\"complete\":{}",
        next.is_none()
    );
    if let Some(n) = next {
        out.push_str(",\"next\":");
        push_json_str(&mut out, n);
    }
    out.push('}');
    out
}

/// `{"key":..,"info":..}`; `info` is a JSON object's text.
fn push_member(out: &mut String, key: &str, info: &str) {
    out.push_str("{\"key\":");
    push_json_str(out, key);
    out.push_str(",\"info\":");
    out.push_str(info);
    out.push('}');
}

/// `{"type":"join"|"leave","channel":..,"member":{"key":..,"info":..}}`: `kind` is `join`
/// or `leave`.
pub fn encode_member_event(kind: &str, channel: &str, key: &str, info: &str) -> String {
    let mut out = String::from("{\"type\":");
    push_json_str(&mut out, kind);
    out.push_str(",\"channel\":");
    push_json_str(&mut out, channel);
    out.push_str(",\"member\":");
    push_member(&mut out, key, info);
    out.push('}');
    out
}

/// `{"type":"occupancy","channel":..,"clients":..,"users":..,"events":..}`.
pub fn encode_occupancy(channel: &str, clients: usize, users: usize, events: bool) -> String {
    let mut out = String::from("{\"type\":\"occupancy\",\"channel\":");
    push_json_str(&mut out, channel);
    let _ = write!(
        out,
        ",\"clients\":{clients},\"users\":{users},\"events\":{events}}}"
    );
    out
}

/// `{"type":"pong","id":..}`.
pub fn encode_pong(id: Option<&RequestId>) -> String {
    let mut out = String::from("{\"type\":\"pong\",");
    push_id(&mut out, id);
    out.push('}');
    out
}

/// `{"type":"welcome","protocol":"wsrelay.v1","maxMessageBytes":..,"anonymous":..,
/// "connection":..}` (and `"resumed"` when the client asked to resume): first frame after
/// the upgrade.
pub fn encode_welcome(
    max_message_bytes: u32,
    anonymous: bool,
    connection: &str,
    resumed: Option<bool>,
) -> String {
    let mut out = format!(
        "{{\"type\":\"welcome\",\"protocol\":\"{SUBPROTOCOL}\",\"maxMessageBytes\":{max_message_bytes},\"anonymous\":{anonymous},\"connection\":"
    );
    push_json_str(&mut out, connection);
    if let Some(r) = resumed {
        out.push_str(if r {
            ",\"resumed\":true"
        } else {
            ",\"resumed\":false"
        });
    }
    out.push('}');
    out
}

/// `{"type":"dropped","channel":..,"count":..}`: this many messages of `channel` were
/// dropped for this connection since the last notice (slow-consumer policy `dropOldest`).
pub fn encode_dropped(channel: &str, count: u64) -> String {
    let mut out = String::from("{\"type\":\"dropped\",\"channel\":");
    push_json_str(&mut out, channel);
    let _ = write!(out, ",\"count\":{count}}}");
    out
}

/// `{"type":"unsubscribed","channel":..,"reason":..}`: the relay ended a subscription by
/// itself (its binding was removed by a config reload).
pub fn encode_unsubscribed(channel: &str, reason: &str) -> String {
    let mut out = String::from("{\"type\":\"unsubscribed\",\"channel\":");
    push_json_str(&mut out, channel);
    out.push_str(",\"reason\":");
    push_json_str(&mut out, reason);
    out.push('}');
    out
}

/// `{"type":"subscribed","channel":..,"byServer":true}`: the backend made the connection's
/// subscription to `channel` server-side (a server-side subscription, docs/protocol.md
/// section 3).
pub fn encode_server_subscribed(channel: &str) -> String {
    let mut out = String::from("{\"type\":\"subscribed\",\"channel\":");
    push_json_str(&mut out, channel);
    out.push_str(",\"byServer\":true}");
    out
}

/// A subscribe's `ok` without an id (`{"type":"ok","id":null,...}`) as the `subscribed`
/// frame of a server-side subscription to `channel`: the same fields (a resumable channel's
/// `epoch` and `seq`) after `"byServer":true`.
pub fn ok_as_server_subscribed(ok: &str, channel: &str) -> String {
    let rest = ok
        .strip_prefix("{\"type\":\"ok\",\"id\":null")
        .unwrap_or("}");
    let mut out = encode_server_subscribed(channel);
    out.pop();
    out.push_str(rest);
    out
}

/// A subscribe's `ok` without an id as the `subscribed` frame of an auto-subscription to
/// `channel` (a binding with `autoSubscribe`, docs/protocol.md section 9): `"auto":true`, then
/// the `ok`'s fields (a resumable channel's `epoch`, `seq`, `recovered`; the backend's
/// `data`).
pub fn ok_as_auto_subscribed(ok: &str, channel: &str) -> String {
    let rest = ok
        .strip_prefix("{\"type\":\"ok\",\"id\":null")
        .unwrap_or("}");
    let mut out = String::from("{\"type\":\"subscribed\",\"channel\":");
    push_json_str(&mut out, channel);
    out.push_str(",\"auto\":true");
    out.push_str(rest);
    out
}

/// Where a frame the relay sends puts a channel: a `message` at its `seq`, or an
/// auto-subscription's `subscribed` at its `epoch` and `seq` (a resumable channel's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// An auto-subscribed resumable channel's start.
    Subscribed {
        /// The channel.
        channel: String,
        /// Its stream's epoch.
        epoch: String,
        /// The position.
        seq: u64,
    },
    /// A message with a position.
    Message {
        /// The channel.
        channel: String,
        /// Its position.
        seq: u64,
    },
}

/// The position `frame` (one the relay encoded) carries, if any. Reads the frame's
/// top-level fields only (the payload is skipped, not built). Pure.
pub fn position_of(frame: &str) -> Option<Position> {
    #[derive(Deserialize)]
    struct Peek<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        channel: Option<std::borrow::Cow<'a, str>>,
        epoch: Option<String>,
        seq: Option<u64>,
        #[serde(default)]
        auto: bool,
    }
    let p: Peek<'_> = serde_json::from_str(frame).ok()?;
    let (channel, seq) = (p.channel?.into_owned(), p.seq?);
    match (p.kind.as_ref(), p.epoch) {
        ("message", _) => Some(Position::Message { channel, seq }),
        ("subscribed", Some(epoch)) if p.auto => Some(Position::Subscribed {
            channel,
            epoch,
            seq,
        }),
        _ => None,
    }
}

/// Why a relay tells a connection to reconnect elsewhere (the `drain` frame's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainReason {
    /// The relay is shutting down (SIGTERM: a rollout, a scale-down).
    Shutdown,
    /// The relay holds more than its share of the fleet's connections (rebalancing).
    Rebalance,
}

impl DrainReason {
    /// The `reason` text.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Shutdown => "shutdown",
            Self::Rebalance => "rebalance",
        }
    }
}

/// `{"type":"drain","reconnectAfterMs":..,"reason":..}`: the relay closes this connection
/// with 1012 after `reconnectAfterMs`; reconnect then (to another relay).
pub fn encode_drain(reconnect_after_ms: u64, reason: DrainReason) -> String {
    format!(
        "{{\"type\":\"drain\",\"reconnectAfterMs\":{reconnect_after_ms},\"reason\":\"{}\"}}",
        reason.as_str()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn v(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn an_auto_subscription_is_a_subscribed_frame_and_positions_are_read_back() {
        let ok = encode_ok_position(None, "e1", 17, Some(true));
        let f = ok_as_auto_subscribed(&ok, "notifications");
        assert_eq!(
            v(&f),
            json!({"type": "subscribed", "channel": "notifications", "auto": true, "epoch": "e1", "seq": 17, "recovered": true})
        );
        assert_eq!(
            position_of(&f),
            Some(Position::Subscribed {
                channel: "notifications".into(),
                epoch: "e1".into(),
                seq: 17
            })
        );
        let live = ok_as_auto_subscribed(&encode_ok(None), "n");
        assert_eq!(
            v(&live),
            json!({"type": "subscribed", "channel": "n", "auto": true})
        );
        assert_eq!(position_of(&live), None);
        let m = encode_message_at("n", b"{\"a\":[1,{\"seq\":9}]}", Some((43, 17)));
        assert_eq!(
            position_of(&m),
            Some(Position::Message {
                channel: "n".into(),
                seq: 43
            })
        );
        assert_eq!(position_of(&encode_message("n", b"{}")), None);
        assert_eq!(position_of(&encode_server_subscribed("n")), None);
        assert_eq!(position_of("not json"), None);
    }

    #[test]
    fn a_reason_never_grows_with_the_request() {
        let long = format!(r#"{{"type":"{}","id":1}}"#, "é".repeat(10_000));
        let e = parse_request(&long).unwrap_err();
        assert!(e.reason.len() < 100, "{}", e.reason);
    }

    #[test]
    fn presence_is_asked_on_subscribe_only_and_paged_with_presence() {
        assert!(matches!(
            parse_request(r#"{"type":"subscribe","channel":"c","presence":true}"#),
            Ok(Request::Subscribe { presence: true, .. })
        ));
        assert_eq!(
            parse_request(r#"{"type":"presence","id":2,"channel":"c","after":"bob","limit":5}"#),
            Ok(Request::Presence {
                id: Some(RequestId::Num(2)),
                channel: "c".into(),
                after: Some("bob".into()),
                limit: 5,
            })
        );
        assert_eq!(
            parse_request(r#"{"type":"presence","channel":"c"}"#),
            Ok(Request::Presence {
                id: None,
                channel: "c".into(),
                after: None,
                limit: 100,
            })
        );
        for bad in [
            r#"{"type":"publish","id":3,"channel":"c","text":"x","presence":true}"#,
            r#"{"type":"unsubscribe","id":3,"channel":"c","presence":false}"#,
            r#"{"type":"subscribe","id":3,"channel":"c","limit":5}"#,
            r#"{"type":"presence","id":3,"channel":"c","limit":0}"#,
            r#"{"type":"presence","id":3,"channel":"c","limit":1001}"#,
            r#"{"type":"presence","id":3,"channel":"c","presence":true}"#,
            r#"{"type":"presence","id":3}"#,
            r#"{"type":"subscribe","id":3,"channel":"c","presence":"yes"}"#,
        ] {
            let e = parse_request(bad).unwrap_err();
            assert_eq!(e.id, Some(RequestId::Num(3)), "{bad}: {e}");
        }
    }

    #[test]
    fn presence_frames_are_the_documented_json() {
        let page = encode_presence(
            [("alice", r#"{"name":"Alice"}"#, 2), ("b\"ob", "{}", 0)],
            3,
            2,
            true,
            Some("b\"ob"),
        );
        assert_eq!(
            v(&with_presence(encode_ok(Some(&RequestId::Num(1))), &page)),
            json!({"type": "ok", "id": 1, "presence": {
                "members": [{"key": "alice", "info": {"name": "Alice"}, "clients": 2},
                            {"key": "b\"ob", "info": {}, "clients": 0}],
                "clients": 3, "users": 2, "events": true, "complete": false, "next": "b\"ob"}})
        );
        assert_eq!(
            v(&encode_presence([], 0, 0, false, None)),
            json!({"members": [], "clients": 0, "users": 0, "events": false, "complete": true})
        );
        assert_eq!(
            v(&encode_member_event(
                "join",
                "rooms.7",
                "alice",
                r#"{"name":"A"}"#
            )),
            json!({"type": "join", "channel": "rooms.7", "member": {"key": "alice", "info": {"name": "A"}}})
        );
        assert_eq!(
            v(&encode_occupancy("rooms.7", 3, 2, false)),
            json!({"type": "occupancy", "channel": "rooms.7", "clients": 3, "users": 2, "events": false})
        );
    }

    #[test]
    fn parses_requests() {
        assert_eq!(
            parse_request(r#"{"type":"subscribe","id":1,"channel":"orders.1"}"#),
            Ok(Request::Subscribe {
                id: Some(RequestId::Num(1)),
                channel: "orders.1".into(),
                since: None,
                token: None,
                presence: false,
            })
        );
        assert_eq!(
            parse_request(r#"{"type":"unsubscribe","id":"a","channel":"x"}"#),
            Ok(Request::Unsubscribe {
                id: Some(RequestId::Str("a".into())),
                channel: "x".into()
            })
        );
        assert_eq!(
            parse_request(r#"{"type":"publish","channel":"x","payload": {"a": [1, 2]}}"#),
            Ok(Request::Publish {
                id: None,
                channel: "x".into(),
                payload: br#"{"a": [1, 2]}"#.to_vec(),
                msg_id: None,
                token: None,
            })
        );
        assert_eq!(
            parse_request(r#"{"type":"publish","channel":"x","text":"hé"}"#),
            Ok(Request::Publish {
                id: None,
                channel: "x".into(),
                payload: "hé".as_bytes().to_vec(),
                msg_id: None,
                token: None,
            })
        );
        assert_eq!(
            parse_request(r#"{"type":"ping","id":7}"#),
            Ok(Request::Ping {
                id: Some(RequestId::Num(7))
            })
        );
    }

    #[test]
    fn positions_and_message_ids() {
        assert_eq!(
            parse_request(
                r#"{"type":"subscribe","id":1,"channel":"c","since":{"epoch":"e1","seq":42}}"#
            ),
            Ok(Request::Subscribe {
                id: Some(RequestId::Num(1)),
                channel: "c".into(),
                since: Some(Since {
                    epoch: "e1".into(),
                    seq: 42
                }),
                token: None,
                presence: false,
            })
        );
        assert_eq!(
            parse_request(r#"{"type":"publish","id":2,"channel":"c","text":"t","msgId":"m-1"}"#),
            Ok(Request::Publish {
                id: Some(RequestId::Num(2)),
                channel: "c".into(),
                payload: b"t".to_vec(),
                msg_id: Some("m-1".into()),
                token: None,
            })
        );
        let long = "x".repeat(65);
        for bad in [
            r#"{"type":"subscribe","id":3,"channel":"c","since":{"epoch":"e","seq":-1}}"#
                .to_owned(),
            r#"{"type":"subscribe","id":3,"channel":"c","since":{"epoch":"e","seq":1.5}}"#
                .to_owned(),
            r#"{"type":"subscribe","id":3,"channel":"c","since":{"epoch":1,"seq":1}}"#.to_owned(),
            r#"{"type":"subscribe","id":3,"channel":"c","since":{"epoch":"e"}}"#.to_owned(),
            r#"{"type":"subscribe","id":3,"channel":"c","since":{"epoch":"","seq":1}}"#.to_owned(),
            r#"{"type":"subscribe","id":3,"channel":"c","since":{"epoch":"e","seq":1,"x":1}}"#
                .to_owned(),
            r#"{"type":"subscribe","id":3,"channel":"c","since":"e:1"}"#.to_owned(),
            format!(
                r#"{{"type":"subscribe","id":3,"channel":"c","since":{{"epoch":"{long}","seq":1}}}}"#
            ),
            r#"{"type":"unsubscribe","id":3,"channel":"c","since":{"epoch":"e","seq":1}}"#
                .to_owned(),
            r#"{"type":"subscribe","id":3,"channel":"c","msgId":"m"}"#.to_owned(),
            r#"{"type":"publish","id":3,"channel":"c","text":"t","msgId":""}"#.to_owned(),
            format!(r#"{{"type":"publish","id":3,"channel":"c","text":"t","msgId":"{long}"}}"#),
            r#"{"type":"ping","id":3,"since":{"epoch":"e","seq":1}}"#.to_owned(),
            // The array form of `since` is not the documented object.
            r#"{"type":"subscribe","id":3,"channel":"c","since":["e",1]}"#.to_owned(),
            // A msgId becomes a NATS header: no line breaks, controls or spaces.
            r#"{"type":"publish","id":3,"channel":"c","text":"t","msgId":"a\r\nb"}"#.to_owned(),
            r#"{"type":"publish","id":3,"channel":"c","text":"t","msgId":"a\nb"}"#.to_owned(),
            r#"{"type":"publish","id":3,"channel":"c","text":"t","msgId":"a\u0000b"}"#.to_owned(),
            r#"{"type":"publish","id":3,"channel":"c","text":"t","msgId":"a b"}"#.to_owned(),
            r#"{"type":"publish","id":3,"channel":"c","text":"t","msgId":"é"}"#.to_owned(),
        ] {
            let e = parse_request(&bad).unwrap_err();
            assert_eq!(e.id, Some(RequestId::Num(3)), "{bad}: {e}");
        }
        assert_eq!(
            v(&encode_message_at("c", b"{}", Some((9, 4)))),
            json!({"type":"message","channel":"c","seq":9,"prev":4,"payload":{}})
        );
        assert_eq!(
            v(&encode_ok_position(
                Some(&RequestId::Num(1)),
                "e",
                7,
                Some(true)
            )),
            json!({"type":"ok","id":1,"epoch":"e","seq":7,"recovered":true})
        );
        assert_eq!(
            v(&encode_ok_position(None, "e", 0, None)),
            json!({"type":"ok","id":null,"epoch":"e","seq":0})
        );
        assert_eq!(
            v(&encode_ok_stored(Some(&RequestId::Num(2)), 8, true)),
            json!({"type":"ok","id":2,"seq":8,"duplicate":true})
        );
    }

    #[test]
    fn refresh_frames() {
        assert_eq!(
            parse_request(r#"{"type":"refresh","id":9,"token":"a.b.c"}"#),
            Ok(Request::Refresh {
                id: Some(RequestId::Num(9)),
                token: "a.b.c".into()
            })
        );
        for bad in [
            r#"{"type":"refresh","id":9}"#,
            r#"{"type":"refresh","id":9,"token":""}"#,
            r#"{"type":"refresh","id":9,"token":"t","channel":"c"}"#,
            r#"{"type":"unsubscribe","id":9,"channel":"c","token":"t"}"#,
            r#"{"type":"ping","id":9,"token":"t"}"#,
            r#"{"type":"subrefresh","id":9,"channel":"c"}"#,
            r#"{"type":"subrefresh","id":9,"token":"t"}"#,
            r#"{"type":"subrefresh","id":9,"channel":"c","token":"t","text":"x"}"#,
            r#"{"type":"subscribe","id":9,"channel":"c","token":""}"#,
        ] {
            assert_eq!(
                parse_request(bad).unwrap_err().id,
                Some(RequestId::Num(9)),
                "{bad}"
            );
        }
    }

    #[test]
    fn subscription_tokens_ride_on_subscribe_publish_and_subrefresh() {
        assert_eq!(
            parse_request(r#"{"type":"subscribe","id":1,"channel":"c","token":"t"}"#),
            Ok(Request::Subscribe {
                id: Some(RequestId::Num(1)),
                channel: "c".into(),
                since: None,
                token: Some("t".into()),
                presence: false,
            })
        );
        assert_eq!(
            parse_request(r#"{"type":"publish","channel":"c","text":"x","token":"t"}"#),
            Ok(Request::Publish {
                id: None,
                channel: "c".into(),
                payload: b"x".to_vec(),
                msg_id: None,
                token: Some("t".into()),
            })
        );
        assert_eq!(
            parse_request(r#"{"type":"subrefresh","id":"r","channel":"c","token":"t"}"#),
            Ok(Request::SubRefresh {
                id: Some(RequestId::Str("r".into())),
                channel: "c".into(),
                token: "t".into(),
            })
        );
        let long = "t".repeat(MAX_TOKEN_BYTES + 1);
        let frame = format!(r#"{{"type":"subscribe","id":2,"channel":"c","token":"{long}"}}"#);
        assert!(parse_request(&frame).is_err());
    }

    #[test]
    fn data_and_app_codes_are_added_to_replies() {
        let v = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        assert_eq!(
            v(&with_data(
                encode_ok(Some(&RequestId::Num(1))),
                Some(r#"{"n":1}"#)
            )),
            json!({"type":"ok","id":1,"data":{"n":1}})
        );
        assert_eq!(
            v(&with_data(
                encode_welcome(10, false, "r/1", None),
                Some("[1]")
            ))["data"],
            json!([1])
        );
        assert_eq!(with_data(encode_ok(None), None), encode_ok(None));
        assert_eq!(
            v(&encode_error_app(
                None,
                ErrorCode::Forbidden,
                "no",
                Some(4031)
            )),
            json!({"type":"error","id":null,"code":403,"reason":"no","appCode":4031})
        );
        assert_eq!(
            encode_error_app(None, ErrorCode::Forbidden, "no", None),
            encode_error(None, ErrorCode::Forbidden, "no")
        );
    }

    #[test]
    fn malformed_frames_are_errors_with_the_id_when_readable() {
        for (text, id) in [
            ("", None),
            ("not json", None),
            ("[]", None),
            (r#"{"type":"subscribe","id":3}"#, Some(RequestId::Num(3))),
            (r#"{"type":"nope","id":4}"#, Some(RequestId::Num(4))),
            (
                r#"{"type":"publish","id":5,"channel":"x"}"#,
                Some(RequestId::Num(5)),
            ),
            (
                r#"{"type":"publish","id":6,"channel":"x","text":"a","payload":1}"#,
                Some(RequestId::Num(6)),
            ),
            (
                r#"{"type":"subscribe","id":8,"channel":"x","extra":1}"#,
                Some(RequestId::Num(8)),
            ),
            (
                r#"{"type":"subscribe","id":9,"channel":7}"#,
                Some(RequestId::Num(9)),
            ),
            (r#"{"type":"subscribe","id":{"x":1},"channel":"a"}"#, None),
            (r#"{"type":"subscribe","id":-1,"channel":"a"}"#, None),
        ] {
            let err = parse_request(text).expect_err(text);
            assert_eq!(err.id, id, "{text}: {err}");
        }
        let long = format!(r#"{{"type":"ping","id":"{}"}}"#, "x".repeat(65));
        assert!(parse_request(&long).is_err());
    }

    #[test]
    fn message_encoding_picks_payload_text_or_base64() {
        assert_eq!(
            v(&encode_message("orders.1", br#"{"n": 1}"#)),
            json!({"type":"message","channel":"orders.1","payload":{"n":1}})
        );
        assert_eq!(
            v(&encode_message("c", b"hello \"world\"")),
            json!({"type":"message","channel":"c","text":"hello \"world\""})
        );
        assert_eq!(
            v(&encode_message("c", b"")),
            json!({"type":"message","channel":"c","text":""})
        );
        assert_eq!(
            v(&encode_message("c", &[0xff, 0x00, 0x10, 0x80])),
            json!({"type":"message","channel":"c","base64":"/wAQgA=="})
        );
        assert_eq!(
            v(&encode_message("c", &[0xfe, 0xff])),
            json!({"type":"message","channel":"c","base64":"/v8="})
        );
        // Two JSON values are not one JSON value.
        assert_eq!(
            v(&encode_message("c", b"1 2")),
            json!({"type":"message","channel":"c","text":"1 2"})
        );
        // JSON-shaped but not UTF-8 inside a string (serde_json skips those bytes): base64,
        // not `"payload": null`.
        assert_eq!(
            v(&encode_message("c", b"[\"\xff\"]")),
            json!({"type":"message","channel":"c","base64":"WyL/Il0="})
        );
    }

    #[test]
    fn message_frames_are_sized_exactly() {
        let channels = ["c", "orders.1", "a\"b\\c\u{1}\n\u{7f}é"];
        let payloads: [&[u8]; 7] = [
            br#"{"n": 1}"#,
            b"hello \"world\"\t\x01",
            b"",
            &[0xff, 0x00, 0x10, 0x80],
            &[0xfe, 0xff, 0x01, 0x02, 0x03],
            b"1 2",
            b"\"\xff\"",
        ];
        for channel in channels {
            for payload in payloads {
                for at in [None, Some((0, 0)), Some((10, 9)), Some((u64::MAX, 99))] {
                    let out = encode_message_at(channel, payload, at);
                    assert_eq!(out.len(), out.capacity(), "{out}");
                    // The channel is escaped as serde_json escapes it.
                    assert_eq!(v(&out)["channel"], channel, "{out}");
                }
            }
        }
    }

    #[test]
    fn replies_encode() {
        assert_eq!(
            v(&encode_ok(Some(&RequestId::Num(1)))),
            json!({"type":"ok","id":1})
        );
        assert_eq!(
            v(&encode_error(
                Some(&RequestId::Str("q\"".into())),
                ErrorCode::Forbidden,
                "no \"binding\""
            )),
            json!({"type":"error","id":"q\"","code":403,"reason":"no \"binding\""})
        );
        assert_eq!(
            v(&encode_error(None, ErrorCode::BadRequest, "x")),
            json!({"type":"error","id":null,"code":400,"reason":"x"})
        );
        assert_eq!(v(&encode_pong(None)), json!({"type":"pong","id":null}));
        assert_eq!(
            v(&encode_drain(1500, DrainReason::Shutdown)),
            json!({"type":"drain","reconnectAfterMs":1500,"reason":"shutdown"})
        );
        assert_eq!(
            v(&encode_drain(0, DrainReason::Rebalance)),
            json!({"type":"drain","reconnectAfterMs":0,"reason":"rebalance"})
        );
        assert_eq!(
            v(&encode_dropped("a\"b", 3)),
            json!({"type":"dropped","channel":"a\"b","count":3})
        );
        assert_eq!(
            v(&with_server_channels(
                encode_welcome(10, false, "r/1", None),
                &["a".into(), "b\"".into()]
            )),
            json!({"type":"welcome","protocol":"wsrelay.v1","maxMessageBytes":10,"anonymous":false,"connection":"r/1","serverChannels":["a","b\""]})
        );
        assert_eq!(
            with_server_channels(encode_welcome(10, false, "r/1", None), &[]),
            encode_welcome(10, false, "r/1", None)
        );
        assert_eq!(
            v(&ok_as_server_subscribed(&encode_ok(None), "a.b")),
            json!({"type":"subscribed","channel":"a.b","byServer":true})
        );
        assert_eq!(
            v(&ok_as_server_subscribed(
                &encode_ok_position(None, "e1", 7, None),
                "a.b"
            )),
            json!({"type":"subscribed","channel":"a.b","byServer":true,"epoch":"e1","seq":7})
        );
        assert_eq!(
            v(&encode_unsubscribed("a.b", "binding removed")),
            json!({"type":"unsubscribed","channel":"a.b","reason":"binding removed"})
        );
        assert_eq!(
            v(&encode_welcome(1024, true, "r-0/7", None)),
            json!({"type":"welcome","protocol":"wsrelay.v1","maxMessageBytes":1024,"anonymous":true,"connection":"r-0/7"})
        );
        assert_eq!(
            v(&encode_welcome(1024, false, "r-0/8", Some(true)))["resumed"],
            json!(true)
        );
    }
}
