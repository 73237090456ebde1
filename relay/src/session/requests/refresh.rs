//! `refresh`: a new token for the connection, of the same identity; its expiry replaces the
//! old one (the reader moves its timer).

use crate::auth::AuthError;
use crate::conn::Conn;
use crate::protocol::ErrorCode;
use crate::state::Relay;

/// Why a `refresh` is refused.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// The connection was opened without a token.
    #[error("an anonymous connection has no token to refresh")]
    Anonymous,
    /// The new token does not verify.
    #[error(transparent)]
    Token(#[from] AuthError),
    /// The new token is of another identity.
    #[error("the token names another identity (iss and sub must stay the same)")]
    OtherIdentity,
    /// The new token never expires (the old one's timer would be lost).
    #[error("the token has no exp")]
    NoExpiry,
    /// The backend revoked the new token.
    #[error("the token was revoked")]
    Revoked,
}

impl RefreshError {
    /// The error code the client hears.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Anonymous | Self::OtherIdentity => ErrorCode::Forbidden,
            Self::Token(_) | Self::NoExpiry | Self::Revoked => ErrorCode::Unauthorized,
        }
    }
}

/// Verifies `token`: valid as at the handshake, and of the connection's identity. Its
/// claims then replace the connection's, and every subscription is authorized again under
/// them (`super::recheck`). Returns its expiry.
pub async fn apply(token: &str, conn: &Conn, relay: &Relay) -> Result<u64, RefreshError> {
    let Some(old) = conn.claims() else {
        return Err(RefreshError::Anonymous);
    };
    let authn = relay.settings().authn.clone();
    let identity = authn.verify_token(token).await?;
    let new = identity.claims.unwrap_or_default();
    if relay.revoked.covers(&new, crate::clock::now_secs()) {
        return Err(RefreshError::Revoked);
    }
    if !crate::auth::same_identity(&old, &new) {
        return Err(RefreshError::OtherIdentity);
    }
    let expires_at = identity.expires_at.ok_or(RefreshError::NoExpiry)?;
    conn.set_claims(new);
    let ended = super::recheck(conn, relay).await;
    if ended > 0 {
        tracing::debug!(conn = conn.id, ended, "refresh ended subscriptions");
    }
    Ok(expires_at)
}
