//! `authorize.token`: a subscription token, a JWT for one channel and one connection's
//! `sub`, verified like a connection token by the gateway's keys or the binding's own.

use serde_json::Value;

use super::{Denied, Who};
use crate::auth::{AuthError, Authenticator, KeyLoadError, Verifier};
use crate::config::SubscriptionToken;

/// Largest `info` claim accepted, encoded, in bytes.
pub const MAX_INFO_BYTES: usize = 1024;

/// How one binding verifies its subscription tokens.
#[derive(Debug)]
pub struct TokenCheck {
    /// The binding's own keys; `None`: the connection tokens' keys.
    own: Option<Verifier>,
}

impl TokenCheck {
    /// Loads the binding's own keys, when it has some.
    pub fn new(config: &SubscriptionToken) -> Result<Self, KeyLoadError> {
        Ok(Self {
            own: config.jwt.as_ref().map(Verifier::new).transpose()?,
        })
    }

    /// Verifies `token` for `channel` and `who`; returns its `exp`.
    pub async fn verify(
        &self,
        authn: &Authenticator,
        token: &str,
        channel: &str,
        who: Who<'_>,
    ) -> Result<u64, Denied> {
        let Some(own_sub) = who.claims.and_then(crate::auth::subject) else {
            return Err(Denied::TokenMismatch(
                "cannot be held by an anonymous connection",
            ));
        };
        let identity = match &self.own {
            Some(v) => v.verify(token).await,
            None => authn.verify_token(token).await,
        }
        .map_err(Denied::TokenInvalid)?;
        let claims = identity.claims.unwrap_or_default();
        if crate::auth::subject(&claims) != Some(own_sub) {
            return Err(Denied::TokenMismatch("names another sub"));
        }
        if claims.get("channel").and_then(Value::as_str) != Some(channel) {
            return Err(Denied::TokenMismatch("is for another channel"));
        }
        if claims
            .get("info")
            .is_some_and(|i| i.to_string().len() > MAX_INFO_BYTES)
        {
            return Err(Denied::TokenMismatch("carries an info larger than 1 KiB"));
        }
        identity
            .expires_at
            .ok_or(Denied::TokenInvalid(AuthError::InvalidToken(
                "no exp".into(),
            )))
    }
}
