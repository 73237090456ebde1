//! Revoked tokens (docs/backend.md, Revocation): what the backend revoked through the
//! control service, as every relay holds it from the connection registry's `rev.` keys
//! (`runtime::revocations` keeps it current). Two kinds: one token by its `jti`, and every
//! token of a `sub` issued before a time (its `iat`). An entry lasts until its `until` (the
//! time the revoked tokens expire anyway), when the registry's TTL removes it. Pure.

use std::collections::HashMap;
use std::sync::RwLock;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The value of a `rev.` key (camelCase JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocation {
    /// The value's version (1).
    pub v: u32,
    /// `revoke`: the token's `jti`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// `invalidate`: the tokens' `sub`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// `invalidate`: and `iss`, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// `invalidate`: tokens whose `iat` is before this (Unix seconds), or that have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_before: Option<u64>,
    /// Until when (Unix seconds) it holds.
    pub until: u64,
}

impl Revocation {
    /// Whether a token with `claims` falls under it at `now` (Unix seconds).
    pub fn covers(&self, claims: &Map<String, Value>, now: u64) -> bool {
        if now >= self.until {
            return false;
        }
        let claim = |k: &str| claims.get(k).and_then(Value::as_str);
        if let Some(jti) = &self.jti {
            return claim("jti") == Some(jti.as_str());
        }
        let Some(sub) = &self.sub else {
            return false;
        };
        claim("sub") == Some(sub.as_str())
            && self.iss.as_deref().is_none_or(|i| claim("iss") == Some(i))
            && match (
                self.issued_before,
                claims.get("iat").and_then(Value::as_u64),
            ) {
                (Some(before), Some(iat)) => iat < before,
                // Without `iat`, nothing shows the token was issued after.
                (Some(_), None) => true,
                (None, _) => true,
            }
    }
}

/// The revocations in force, by registry key.
#[derive(Debug, Default)]
pub struct Revoked {
    by_key: RwLock<HashMap<String, Revocation>>,
}

impl Revoked {
    /// Records the entry `key` (a put), or forgets it (`None`: deleted or expired).
    pub fn set(&self, key: &str, value: Option<Revocation>) {
        let mut g = self
            .by_key
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match value {
            Some(v) => {
                g.insert(key.to_owned(), v);
            }
            None => {
                g.remove(key);
            }
        }
    }

    /// Whether a token with `claims` is revoked at `now` (Unix seconds).
    pub fn covers(&self, claims: &Map<String, Value>, now: u64) -> bool {
        self.by_key
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .any(|r| r.covers(claims, now))
    }

    /// How many entries are in force (expired ones the registry has not removed yet
    /// included).
    pub fn len(&self) -> usize {
        self.by_key
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_jti_covers_its_token_until_its_time() {
        let r = Revocation {
            v: 1,
            jti: Some("t1".into()),
            sub: None,
            iss: None,
            issued_before: None,
            until: 100,
        };
        assert!(r.covers(&claims(json!({"jti": "t1", "sub": "u"})), 99));
        assert!(
            !r.covers(&claims(json!({"jti": "t1"})), 100),
            "until passed"
        );
        assert!(!r.covers(&claims(json!({"jti": "t2"})), 99));
        assert!(!r.covers(&claims(json!({"sub": "u"})), 99));
    }

    #[test]
    fn a_sub_covers_its_tokens_issued_before_and_those_without_iat() {
        let r = Revocation {
            v: 1,
            jti: None,
            sub: Some("u".into()),
            iss: Some("i".into()),
            issued_before: Some(50),
            until: 100,
        };
        assert!(r.covers(&claims(json!({"sub": "u", "iss": "i", "iat": 49})), 60));
        assert!(!r.covers(&claims(json!({"sub": "u", "iss": "i", "iat": 50})), 60));
        assert!(
            r.covers(&claims(json!({"sub": "u", "iss": "i"})), 60),
            "no iat"
        );
        assert!(!r.covers(&claims(json!({"sub": "u", "iss": "j", "iat": 1})), 60));
        assert!(!r.covers(&claims(json!({"sub": "v", "iss": "i", "iat": 1})), 60));
        let set = Revoked::default();
        set.set("rev.sub.dQ", Some(r));
        assert!(set.covers(&claims(json!({"sub": "u", "iss": "i", "iat": 1})), 60));
        set.set("rev.sub.dQ", None);
        assert!(set.is_empty());
        assert!(!set.covers(&claims(json!({"sub": "u", "iss": "i", "iat": 1})), 60));
    }
}
