//! The server-side subscriptions a relay read from the registry (`srv.` keys), by `sub`:
//! what `crate::runtime::serversubs` keeps up to date and a session reads at its `welcome`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde_json::{Map, Value};

use super::keys::{self, ServerSub};

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
pub fn covers(s: &ServerSub, claims: &Map<String, Value>) -> bool {
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
    pub fn holds(&self, claims: &Map<String, Value>, channel: &str) -> bool {
        self.channels_of(claims).iter().any(|c| c == channel)
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
