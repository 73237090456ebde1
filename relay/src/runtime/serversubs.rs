//! Server-side subscriptions (docs/backend.md, docs/protocol.md section 3): the control
//! service's `subscribe {sub, channel}` stores `srv.<sub>.<iss>.<channel>` in the connection
//! registry; every relay watches those keys, keeps them by `sub` ([`ServerSubs`]), subscribes
//! its live connections of that user when one comes and every connection of that user it
//! admits later, right after the `welcome` ([`on_admit`]); a key removed ends the
//! subscriptions it made (`unsubscribed` reason `server`). `/ready` waits until the keys
//! present at the start were read, so a relay started after a command applies it too.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Map, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::conn::Conn;
use crate::protocol;
use crate::registry::keys::{self, SERVER_SUB_FILTER, ServerSub};
use crate::session::requests::subscribe;
use crate::state::Relay;

/// Most server-side channels one `sub` may have (whatever the `iss`).
pub const MAX_PER_SUB: usize = 64;

/// The `reason` of the `unsubscribed` notice the backend's `unsubscribe` sends.
pub const REASON: &str = "server";

/// Pause before the watch starts again after an error.
const RETRY: Duration = Duration::from_secs(2);

/// The server-side subscriptions this relay read from the registry, by `sub`, then key.
#[derive(Debug, Default)]
pub struct ServerSubs {
    by_sub: Mutex<HashMap<String, BTreeMap<String, ServerSub>>>,
}

/// The `sub` a `srv.` key names.
fn sub_of(key: &str) -> Option<String> {
    keys::channel_of(key.split('.').nth(1)?)
}

/// Whether `s` covers a connection with `claims`: its `sub`, and its `iss` when it names one.
fn covers(s: &ServerSub, claims: &Map<String, Value>) -> bool {
    let claim = |k: &str| claims.get(k).and_then(Value::as_str);
    claim("sub") == Some(s.sub.as_str()) && s.iss.as_deref().is_none_or(|i| claim("iss") == Some(i))
}

impl ServerSubs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BTreeMap<String, ServerSub>>> {
        self.by_sub.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets `key` to `value`, or removes it (`None`); returns what it held.
    pub fn set(&self, key: &str, value: Option<ServerSub>) -> Option<ServerSub> {
        let mut m = self.lock();
        match value {
            Some(v) => m
                .entry(v.sub.clone())
                .or_default()
                .insert(key.to_owned(), v),
            None => {
                let sub = sub_of(key)?;
                let entries = m.get_mut(&sub)?;
                let was = entries.remove(key);
                if entries.is_empty() {
                    m.remove(&sub);
                }
                was
            }
        }
    }

    /// How many server-side channels `sub` has, and whether `key` is one of them.
    pub fn count(&self, sub: &str, key: &str) -> (usize, bool) {
        self.lock()
            .get(sub)
            .map_or((0, false), |e| (e.len(), e.contains_key(key)))
    }

    /// The channels of the connection with `claims`, sorted, each once.
    pub fn channels_of(&self, claims: &Map<String, Value>) -> Vec<String> {
        let Some(sub) = claims.get("sub").and_then(Value::as_str) else {
            return Vec::new();
        };
        let mut out: Vec<String> = self
            .lock()
            .get(sub)
            .into_iter()
            .flat_map(|e| e.values())
            .filter(|s| covers(s, claims))
            .map(|s| s.channel.clone())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Whether any of them covers the connection with `claims` for `channel`.
    fn holds(&self, claims: &Map<String, Value>, channel: &str) -> bool {
        self.channels_of(claims).iter().any(|c| c == channel)
    }
}

/// This relay's live connections that `s` covers (not those closing already).
fn covered(relay: &Relay, s: &ServerSub) -> Vec<Arc<Conn>> {
    relay
        .connections()
        .into_iter()
        .filter(|c| c.outbox.close_request().is_none())
        .filter(|c| c.claims().is_some_and(|claims| covers(s, &claims)))
        .collect()
}

/// Subscribes this relay's connections that `s` covers; returns how many hold it now.
pub async fn subscribe_live(relay: &Relay, s: &ServerSub) -> usize {
    let conns = covered(relay, s);
    let made = conns
        .iter()
        .map(|conn| subscribe::server(conn, relay, &s.channel));
    futures::future::join_all(made)
        .await
        .into_iter()
        .filter(|held| *held)
        .count()
}

/// Ends the server-side subscriptions `s` made on this relay's connections (unless another
/// of the user's keys still covers one); returns how many it ended.
pub fn unsubscribe_live(relay: &Relay, s: &ServerSub) -> usize {
    let mut ended = 0;
    for conn in covered(relay, s) {
        if conn
            .claims()
            .is_some_and(|c| relay.server_subs.holds(&c, &s.channel))
        {
            continue;
        }
        if let Some(key) = conn.remove_server_subscription(&s.channel) {
            relay.hub.unsubscribe(&key, conn.id, &s.channel);
            conn.outbox
                .push_reply(Message::text(protocol::encode_unsubscribed(
                    &s.channel, REASON,
                )));
            ended += 1;
        }
    }
    ended
}

/// The server-side channels of `conn`'s user, sorted (none for an anonymous connection).
pub fn channels_for(relay: &Relay, conn: &Conn) -> Vec<String> {
    conn.claims()
        .map(|c| relay.server_subs.channels_of(&c))
        .unwrap_or_default()
}

/// A connection was admitted (its `welcome` queued, naming `channels`, its user's
/// server-side channels): subscribes it to them, in a task of its own.
pub fn on_admit(relay: &Arc<Relay>, conn: &Arc<Conn>, channels: Vec<String>) {
    if channels.is_empty() {
        return;
    }
    let (relay, conn) = (relay.clone(), conn.clone());
    relay.clone().tracker.spawn(async move {
        let made = channels
            .iter()
            .map(|channel| subscribe::server(&conn, &relay, channel));
        futures::future::join_all(made).await;
    });
}

/// Watches the server-side subscriptions until the relay stops; nothing without `control`
/// (they are written through it) or a registry.
pub async fn watch(relay: Arc<Relay>) {
    if relay.settings().config.control.is_none() {
        return;
    }
    let Some(registry) = relay.registry.clone() else {
        return;
    };
    loop {
        let watched = async {
            let (pending, mut changes) = registry.watch(SERVER_SUB_FILTER).await?;
            let mut read = 0u64;
            if pending == 0 {
                relay.server_subs_read.store(true, Ordering::SeqCst);
            }
            while let Some(change) = changes.next().await {
                let (key, value) = change?;
                let value = value.and_then(|v| serde_json::from_slice::<ServerSub>(&v).ok());
                match value {
                    Some(s) => {
                        relay.server_subs.set(&key, Some(s.clone()));
                        subscribe_live(&relay, &s).await;
                    }
                    None => {
                        if let Some(s) = relay.server_subs.set(&key, None) {
                            unsubscribe_live(&relay, &s);
                        }
                    }
                }
                read += 1;
                if read >= pending {
                    relay.server_subs_read.store(true, Ordering::SeqCst);
                }
            }
            Ok::<(), crate::registry::RegistryError>(())
        };
        tokio::select! {
            () = relay.shutdown.cancelled() => return,
            r = watched => if let Err(e) = r {
                tracing::debug!(error = %e, "server-side subscription watch ended; starting again");
            },
        }
        tokio::select! {
            () = relay.shutdown.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn s(sub: &str, iss: Option<&str>, channel: &str) -> (String, ServerSub) {
        (
            keys::server_sub_key(sub, iss, channel),
            ServerSub {
                v: 1,
                sub: sub.into(),
                iss: iss.map(str::to_owned),
                channel: channel.into(),
                at: 0,
            },
        )
    }

    #[test]
    fn a_users_channels_are_kept_by_sub_and_narrowed_by_iss() {
        let m = ServerSubs::default();
        for (k, v) in [
            s("42", None, "b.feed"),
            s("42", Some("i1"), "a.x"),
            s("42", Some("i2"), "a.y"),
            s("7", None, "b.feed"),
        ] {
            m.set(&k, Some(v));
        }
        let claims = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(
            m.channels_of(&claims(json!({"sub": "42", "iss": "i1"}))),
            ["a.x", "b.feed"]
        );
        assert_eq!(m.channels_of(&claims(json!({"sub": "42"}))), ["b.feed"]);
        assert!(m.channels_of(&claims(json!({"sub": "4"}))).is_empty());
        let (k, _) = s("42", None, "b.feed");
        assert_eq!(m.count("42", &k), (3, true));
        assert!(m.set(&k, None).is_some());
        assert_eq!(m.count("42", &k), (2, false));
        assert!(m.set(&k, None).is_none(), "removed once");
        for (k, _) in [s("42", Some("i1"), "a.x"), s("42", Some("i2"), "a.y")] {
            m.set(&k, None);
        }
        assert!(m.lock().get("42").is_none(), "an empty user is forgotten");
    }
}
