//! `authorize.request` and `auth.connectRequest`: the application's backend decides, over
//! NATS request-reply. Decisions are cached per (identity, operation, channel), bounded,
//! and concurrent identical questions share one request, so a reconnect storm asks the
//! backend once per user and channel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::RequestErrorKind;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::Link;
use super::{Denied, Who};
use crate::config::{BackendRequest, OnTimeout};
use crate::metrics::{Op, OpReason, OpResult};

/// Longest `reason` a backend may give the client, in bytes.
pub const MAX_REASON_BYTES: usize = 256;
/// Largest `data` a backend may send, encoded, in bytes: it is cached with the decision
/// (`cacheEntries` of them per binding) and sent in a reply frame.
pub const MAX_DATA_BYTES: usize = 8 * 1024;
/// The reason of a deny without one.
pub const DEFAULT_REASON: &str = "denied by backend";

/// A backend's decision.
#[derive(Debug, Clone)]
struct Decision {
    allow: bool,
    reason: String,
    app_code: Option<u16>,
    data: Option<Arc<str>>,
    /// How long it may be cached.
    keep: Duration,
}

/// Why the backend did not decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum Failure {
    #[error("timed out")]
    Timeout,
    #[error("no responders")]
    NoResponders,
    #[error("NATS unavailable")]
    Unavailable,
    #[error("bad reply")]
    BadReply,
}

impl Failure {
    fn label(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::NoResponders => "no_responders",
            Self::Unavailable => "unavailable",
            Self::BadReply => "bad_reply",
        }
    }
}

/// The reply's JSON (unknown fields are ignored: a backend may say more).
#[derive(Deserialize)]
struct Reply<'a> {
    allow: bool,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    code: Option<i64>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
    #[serde(default, rename = "expiresAt")]
    expires_at: Option<f64>,
}

/// How long a decision may be kept: `cacheSeconds`, or until `expiresAt` if sooner.
struct KeepFor;

impl moka::Expiry<String, Arc<Decision>> for KeepFor {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<Decision>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.keep)
    }
}

/// Asks one subject.
pub struct Asker {
    subject: String,
    timeout: Duration,
    cache_for: Duration,
    on_timeout: OnTimeout,
    /// `None` with `cacheSeconds: 0`.
    cache: Option<moka::future::Cache<String, Arc<Decision>>>,
}

impl std::fmt::Debug for Asker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Asker")
            .field("subject", &self.subject)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Asker {
    /// An asker for `config`, with an empty cache.
    pub fn new(config: &BackendRequest) -> Self {
        let cache_for = Duration::from_secs(config.cache_seconds);
        Self {
            subject: config.subject.clone(),
            timeout: Duration::from_millis(config.timeout_ms),
            cache_for,
            on_timeout: config.on_timeout,
            cache: (config.cache_seconds > 0).then(|| {
                moka::future::Cache::builder()
                    .max_capacity(u64::from(config.cache_entries))
                    .expire_after(KeepFor)
                    .build()
            }),
        }
    }

    /// Decides for `who`: `Ok` with the backend's `data` when allowed.
    pub async fn decide(
        &self,
        op: &'static str,
        channel: Option<&str>,
        vars: &[(String, String)],
        who: Who<'_>,
        link: Link<'_>,
    ) -> Result<Option<Arc<str>>, Denied> {
        let asked = match &self.cache {
            None => self.ask(op, channel, vars, who, link).await,
            Some(cache) => {
                let mut missed = false;
                let key = cache_key(op, channel, who);
                let found = cache
                    .try_get_with(key, async {
                        missed = true;
                        self.ask(op, channel, vars, who, link).await.map(Arc::new)
                    })
                    .await
                    .map_err(|e| *e);
                let result = if missed { "miss" } else { "hit" };
                link.metrics
                    .authorize_cache
                    .get_or_create(&OpResult { op, result })
                    .inc();
                found.map(Arc::unwrap_or_clone)
            }
        };
        match asked {
            Ok(d) if d.allow => Ok(d.data),
            Ok(d) => Err(Denied::Backend {
                reason: d.reason,
                app_code: d.app_code,
            }),
            Err(Failure::Timeout) if self.on_timeout == OnTimeout::Allow => Ok(None),
            Err(_) => Err(Denied::Unavailable),
        }
    }

    /// One request to the backend, counted and timed.
    async fn ask(
        &self,
        op: &'static str,
        channel: Option<&str>,
        vars: &[(String, String)],
        who: Who<'_>,
        link: Link<'_>,
    ) -> Result<Decision, Failure> {
        let outcome = self.request(op, channel, vars, who, link).await;
        if let Err(f) = outcome {
            tracing::debug!(subject = %self.subject, op, error = %f, "authorization request failed");
            link.metrics
                .authorize_failures
                .get_or_create(&OpReason {
                    op,
                    reason: f.label(),
                })
                .inc();
        }
        outcome
    }

    async fn request(
        &self,
        op: &'static str,
        channel: Option<&str>,
        vars: &[(String, String)],
        who: Who<'_>,
        link: Link<'_>,
    ) -> Result<Decision, Failure> {
        if !link.connected {
            return Err(Failure::Unavailable);
        }
        let empty = Map::new();
        let vars: Map<String, Value> = vars
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let body = serde_json::json!({
            "op": op,
            "channel": channel,
            "vars": vars,
            "claims": who.claims.unwrap_or(&empty),
            "connection": who.connection(),
        });
        let payload = serde_json::to_vec(&body).map_err(|_| Failure::BadReply)?;
        link.metrics
            .authorize_requests
            .get_or_create(&Op { op })
            .inc();
        let started = Instant::now();
        let sent =
            link.nats
                .request_with_headers(self.subject.clone(), who.headers(), payload.into());
        let reply = tokio::time::timeout(self.timeout, sent).await;
        link.metrics
            .authorize_duration
            .get_or_create(&Op { op })
            .observe(started.elapsed().as_secs_f64());
        let msg = match reply {
            Err(_) => return Err(Failure::Timeout),
            Ok(Err(e)) => {
                tracing::debug!(subject = %self.subject, error = %e, "authorization request error");
                return Err(match e.kind() {
                    RequestErrorKind::NoResponders => Failure::NoResponders,
                    RequestErrorKind::TimedOut => Failure::Timeout,
                    _ => Failure::Unavailable,
                });
            }
            Ok(Ok(m)) => m,
        };
        parse_reply(&msg.payload, self.cache_for).ok_or(Failure::BadReply)
    }
}

/// The cache key: identity (`iss`, `sub`; empty for an anonymous connection), operation and
/// channel, separated by a byte none of them can hold.
fn cache_key(op: &str, channel: Option<&str>, who: Who<'_>) -> String {
    let claim = |name| {
        who.claims
            .and_then(|c| c.get(name))
            .and_then(Value::as_str)
            .unwrap_or("")
    };
    format!(
        "{}\u{0}{}\u{0}{op}\u{0}{}",
        claim("iss"),
        claim("sub"),
        channel.unwrap_or("")
    )
}

/// Reads a reply; `None` when it is not the documented JSON. Pure.
fn parse_reply(payload: &[u8], cache_for: Duration) -> Option<Decision> {
    let reply: Reply<'_> = serde_json::from_slice(payload).ok()?;
    if reply.data.is_some_and(|d| d.get().len() > MAX_DATA_BYTES) {
        return None;
    }
    let reason = reply
        .reason
        .filter(|r| {
            !r.is_empty() && r.len() <= MAX_REASON_BYTES && !r.chars().any(char::is_control)
        })
        .unwrap_or_else(|| DEFAULT_REASON.to_owned());
    let app_code = reply
        .code
        .and_then(|c| u16::try_from(c).ok())
        .filter(|c| (4000..=4999).contains(c));
    let keep = match reply.expires_at {
        Some(at) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            Duration::from_secs_f64((at - now).clamp(0.0, cache_for.as_secs_f64()))
        }
        None => cache_for,
    };
    Some(Decision {
        allow: reply.allow,
        reason,
        app_code,
        data: reply.data.map(|d| Arc::from(d.get())),
        keep,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_read_as_documented() {
        let keep = Duration::from_secs(30);
        let d = parse_reply(br#"{"allow":true,"data":{"members":3}}"#, keep).unwrap();
        assert!(d.allow);
        assert_eq!(d.data.as_deref(), Some(r#"{"members":3}"#));
        assert_eq!(d.keep, keep);
        let d = parse_reply(
            br#"{"allow":false,"reason":"not your order","code":4031,"extra":1}"#,
            keep,
        )
        .unwrap();
        assert!(!d.allow);
        assert_eq!(d.reason, "not your order");
        assert_eq!(d.app_code, Some(4031));
        // A code outside 4000-4999 and a reason with a control character are dropped.
        let d = parse_reply(br#"{"allow":false,"reason":"a\nb","code":200}"#, keep).unwrap();
        assert_eq!(d.reason, DEFAULT_REASON);
        assert_eq!(d.app_code, None);
        // expiresAt shortens the time a decision is kept, never lengthens it.
        let d = parse_reply(br#"{"allow":true,"expiresAt":1}"#, keep).unwrap();
        assert_eq!(d.keep, Duration::ZERO);
        let d = parse_reply(br#"{"allow":true,"expiresAt":99999999999}"#, keep).unwrap();
        assert_eq!(d.keep, keep);
        for bad in [
            &b"yes"[..],
            br#"{"allow":"yes"}"#,
            br#"{"reason":"x"}"#,
            b"",
        ] {
            assert!(parse_reply(bad, keep).is_none(), "{bad:?}");
        }
        let big = format!(
            r#"{{"allow":true,"data":"{}"}}"#,
            "x".repeat(MAX_DATA_BYTES)
        );
        assert!(
            parse_reply(big.as_bytes(), keep).is_none(),
            "data above 8 KiB"
        );
    }

    #[test]
    fn cache_keys_separate_identities_operations_and_channels() {
        let alice: Map<String, Value> =
            serde_json::from_str(r#"{"iss":"i","sub":"alice"}"#).unwrap();
        let bob: Map<String, Value> = serde_json::from_str(r#"{"iss":"i","sub":"bob"}"#).unwrap();
        let who = |c| Who {
            claims: Some(c),
            relay: "r",
            conn: Some(1),
        };
        let k = |op, ch, c| cache_key(op, Some(ch), who(c));
        assert_ne!(k("subscribe", "a", &alice), k("subscribe", "a", &bob));
        assert_ne!(k("subscribe", "a", &alice), k("publish", "a", &alice));
        assert_ne!(k("subscribe", "a", &alice), k("subscribe", "b", &alice));
        let mut other_conn = who(&alice);
        other_conn.conn = Some(2);
        assert_eq!(
            cache_key("subscribe", Some("a"), other_conn),
            k("subscribe", "a", &alice),
            "one decision per identity, whatever the connection"
        );
    }
}
