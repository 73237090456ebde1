//! The registry's key layout and values (pure).
//!
//! Keys are NATS subject tokens joined by `.`; a relay name and a connection id are one
//! token each, a channel is one token in base64url without padding (a channel may hold
//! characters a KV key refuses). So `conn.<relay>.*` is one relay's connections,
//! `pres.*.<relay>.*` its presence entries and `pres.<chan>.>` one channel's members.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

/// Version of the values' JSON (`"v"`): a reader skips what it does not know.
pub const VALUE_VERSION: u32 = 1;

/// Whether `s` is one KV key token (and one NATS subject token): `[-_=a-zA-Z0-9]`, 1 to 128.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
}

pub use crate::config::relay_token;

/// `relay.<relay>`: the relay's lease.
pub fn lease_key(relay: &str) -> String {
    format!("relay.{relay}")
}

/// The relay a lease key names (`relay.<relay>`), if it is one.
pub fn lease_owner(key: &str) -> Option<&str> {
    key.strip_prefix("relay.").filter(|r| is_token(r))
}

/// `conn.<relay>.<conn>`: one open connection.
pub fn conn_key(relay: &str, conn: u64) -> String {
    format!("conn.{relay}.{conn}")
}

/// The relay token and connection number of a `conn.<relay>.<conn>` key, if it is one.
pub fn conn_of(key: &str) -> Option<(&str, u64)> {
    let mut parts = key.split('.');
    let (Some("conn"), Some(relay), Some(id), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    Some((relay, id.parse().ok()?))
}

/// `pres.<chan>.<relay>.<conn>`: one connection's membership of a channel.
pub fn presence_key(channel: &str, relay: &str, conn: u64) -> String {
    format!("pres.{}.{relay}.{conn}", channel_token(channel))
}

/// `rev.jti.<jti>` (base64url): a token revoked by its `jti`.
pub fn revoked_jti_key(jti: &str) -> String {
    format!("rev.jti.{}", channel_token(jti))
}

/// `rev.sub.<sub>.<iss or ->` (base64url): a subject's tokens issued before a time.
pub fn invalidated_sub_key(sub: &str, iss: Option<&str>) -> String {
    let iss = iss.map_or_else(|| "-".to_owned(), channel_token);
    format!("rev.sub.{}.{iss}", channel_token(sub))
}

/// The filter of every revocation.
pub const REVOKED_FILTER: &str = "rev.>";

/// `srv.<sub>.<iss or ->.<channel>` (base64url): a server-side subscription of a user.
pub fn server_sub_key(sub: &str, iss: Option<&str>, channel: &str) -> String {
    let iss = iss.map_or_else(|| "-".to_owned(), channel_token);
    format!(
        "srv.{}.{iss}.{}",
        channel_token(sub),
        channel_token(channel)
    )
}

/// The filter of every server-side subscription.
pub const SERVER_SUB_FILTER: &str = "srv.>";

/// The value of `srv.<sub>.<iss>.<channel>`: what the key says, readable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerSub {
    /// [`VALUE_VERSION`].
    pub v: u32,
    /// The user: the connections whose token has this `sub`.
    pub sub: String,
    /// And this `iss`, when it names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// The channel.
    pub channel: String,
    /// When the backend asked, in milliseconds since the epoch.
    pub at: u64,
}

/// A channel as one token: base64url without padding.
pub fn channel_token(channel: &str) -> String {
    URL_SAFE_NO_PAD.encode(channel)
}

/// The channel a [`channel_token`] encodes.
pub fn channel_of(token: &str) -> Option<String> {
    let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
    String::from_utf8(bytes).ok()
}

/// `subc.<sub>.<relay>` (base64url): how many connections of a token subject `relay` holds
/// (`limits.maxFleetConnectionsPerSubject`).
pub fn subject_count_key(sub: &str, relay: &str) -> String {
    format!("subc.{}.{relay}", channel_token(sub))
}

/// The filter of a subject's counts on every relay.
pub fn subject_count_filter(sub: &str) -> String {
    format!("subc.{}.*", channel_token(sub))
}

/// The key filters that hold every entry of `relay` but its lease: what a purge deletes.
pub fn relay_filters(relay: &str) -> [String; 3] {
    [
        format!("conn.{relay}.*"),
        format!("pres.*.{relay}.*"),
        format!("subc.*.{relay}"),
    ]
}

/// The value of `subc.<sub>.<relay>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectCount {
    /// [`VALUE_VERSION`].
    pub v: u32,
    /// Open connections.
    pub n: u32,
}

/// The value of `relay.<relay>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// [`VALUE_VERSION`].
    pub v: u32,
    /// When the relay started, in milliseconds since the epoch.
    pub started: u64,
    /// The lease's lifetime: the relay refreshes it every third of it.
    pub lease_seconds: u64,
}

/// The value of `conn.<relay>.<conn>`: small, read by whoever lists connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnEntry {
    /// [`VALUE_VERSION`].
    pub v: u32,
    /// The token's `sub`, if it has one (anonymous: absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// The token's `iss`, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// When the connection opened, in milliseconds since the epoch.
    pub connected_at: u64,
    /// The relay's name (its connections' ids are `<relay>/<id>`), which its key token may
    /// have changed; absent in entries of relays before events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// How it ended, while its relay waits `events.graceSeconds` for a resume before it
    /// says `Disconnected` (whoever says it for a dead relay says this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<Ended>,
    /// The connection it resumes (`<relay>/<n>`), until it is settled whether it did:
    /// whoever ends an entry that still has it settles it first (`registry::resume`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumes: Option<String>,
}

/// How a connection ended (in its [`ConnEntry`] during the grace).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ended {
    /// When, in milliseconds since the epoch.
    pub at: u64,
    /// The close's reason label.
    pub reason: String,
    /// The close code the relay sent, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_code: Option<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_tokens_and_one_relay_is_one_filter() {
        assert_eq!(lease_key("wsrelay-0"), "relay.wsrelay-0");
        assert_eq!(conn_key("wsrelay-0", 7), "conn.wsrelay-0.7");
        assert_eq!(relay_token("a.b c*>"), "a_b_c__");
        assert_eq!(relay_token(""), "_");
        assert_eq!(lease_owner("relay.r1"), Some("r1"));
        assert_eq!(lease_owner("relay.a.b"), None);
        assert_eq!(lease_owner("conn.r1.1"), None);
        assert!(is_token("wsrelay-7f9c_x="));
        for bad in ["", "a.b", "a*", "a>", "a b", "ü"] {
            assert!(!is_token(bad), "{bad:?}");
        }
        assert_eq!(
            relay_filters("r1"),
            [
                "conn.r1.*".to_owned(),
                "pres.*.r1.*".to_owned(),
                "subc.*.r1".to_owned()
            ]
        );
        assert_eq!(subject_count_key("u.1", "r1"), "subc.dS4x.r1");
        assert_eq!(conn_of(&conn_key("r1", 7)), Some(("r1", 7)));
        for bad in ["conn.r1", "conn.r1.x", "pres.r1.7", "conn.r1.7.8"] {
            assert_eq!(conn_of(bad), None, "{bad}");
        }
        assert_eq!(subject_count_filter("u.1"), "subc.dS4x.*");
    }

    #[test]
    fn a_channel_is_one_token_whatever_it_holds() {
        for ch in ["orders.42", "a b/c>*", "ü.€", ""] {
            let t = channel_token(ch);
            assert!(t.is_empty() || is_token(&t), "{ch:?} -> {t:?}");
            assert_eq!(channel_of(&t).as_deref(), Some(ch));
        }
        let k = server_sub_key("42", None, "a.b");
        assert_eq!(k, format!("srv.NDI.-.{}", channel_token("a.b")));
        assert_eq!(k.split('.').count(), 4);
        assert_ne!(k, server_sub_key("42", Some("i"), "a.b"));
        let k = presence_key("orders.42", "r1", 3);
        assert_eq!(k, format!("pres.{}.r1.3", channel_token("orders.42")));
        assert_eq!(k.split('.').count(), 4);
    }

    #[test]
    fn values_are_versioned_camel_case_json() {
        let c = ConnEntry {
            v: VALUE_VERSION,
            sub: Some("u1".into()),
            iss: None,
            connected_at: 5,
            relay: None,
            ended: None,
            resumes: None,
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"v":1,"sub":"u1","connectedAt":5}"#
        );
        let l = Lease {
            v: 1,
            started: 9,
            lease_seconds: 15,
        };
        assert_eq!(
            serde_json::to_string(&l).unwrap(),
            r#"{"v":1,"started":9,"leaseSeconds":15}"#
        );
    }
}
