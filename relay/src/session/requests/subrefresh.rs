//! `subrefresh`: a new subscription token for a live subscription. The binding's checks run
//! again with it (`crate::access`); its `exp` replaces the subscription's (the reader moves
//! its timer).

use crate::access::Presented;
use crate::authz::Operation;
use crate::conn::Conn;
use crate::fanout::Target;
use crate::protocol::{ErrorCode, RequestId};
use crate::state::Relay;

use super::{reply_denied, reply_error, reply_ok, who};

/// Checks `token` for `conn`'s subscription to `channel` and moves its expiry, or answers
/// why not; the subscription stays either way until its current expiry.
pub async fn apply(id: Option<&RequestId>, channel: &str, token: &str, conn: &Conn, relay: &Relay) {
    match conn.token_expiry(channel) {
        None => return reply_error(conn, id, ErrorCode::NotSubscribed, "not subscribed"),
        Some(None) => {
            return reply_error(
                conn,
                id,
                ErrorCode::BadRequest,
                "the channel's binding takes no subscription token",
            );
        }
        Some(Some(_)) => {}
    }
    let access = relay.settings().access.clone();
    let claims = conn.claims();
    let grant = match access
        .check(
            channel,
            Operation::Subscribe,
            who(conn, relay, claims.as_deref()),
            Presented::Token(token),
            relay.link(),
        )
        .await
    {
        Ok(g) => g,
        Err(e) => return reply_denied(conn, id, &e),
    };
    let key = Target::of(&grant.resolved).key;
    match grant.token_expires_at {
        Some(exp) if conn.set_token_expiry(channel, &key, exp) => reply_ok(conn, id),
        // The binding changed (a reload) or the subscription ended meanwhile.
        _ => reply_error(conn, id, ErrorCode::NotSubscribed, "not subscribed"),
    }
}
