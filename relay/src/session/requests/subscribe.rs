//! `subscribe`: the bindings and their checks decide the channel's subject
//! (`crate::access`), the connection records it (one of at most
//! `limits.maxSubscriptionsPerConnection`, with its subscription token's expiry), and the hub
//! joins it, queueing the `ok` itself (for a resumable channel before the replay and the
//! first live message), with the backend's `data`.

use std::sync::Arc;

use crate::access::Presented;
use crate::authz::Operation;
use crate::conn::{AddError, Conn};
use crate::fanout::Target;
use crate::protocol::{ErrorCode, RequestId, Since};
use crate::state::Relay;

use super::{log_id, reply_denied, reply_error, who};

/// Subscribes `conn` to `channel`, or answers why not.
pub async fn apply(
    id: Option<&RequestId>,
    channel: String,
    since: Option<Since>,
    token: Option<String>,
    conn: &Arc<Conn>,
    relay: &Relay,
) {
    tracing::debug!(request_id = %log_id(id), %channel, resume = since.is_some(), "subscribe");
    let settings = relay.settings();
    let claims = conn.claims();
    let presented = token.as_deref().map_or(Presented::None, Presented::Token);
    let grant = match settings
        .access
        .check(
            &channel,
            Operation::Subscribe,
            who(conn, relay, claims.as_deref()),
            presented,
            relay.link(),
        )
        .await
    {
        Ok(g) => g,
        Err(e) => return reply_denied(conn, id, &e),
    };
    let target = Target::of(&grant.resolved);
    let max = settings.config.limits.max_subscriptions_per_connection as usize;
    drop(settings);
    if let Err(e) = conn.add_subscription(&channel, &target.key, max) {
        let code = match e {
            AddError::AlreadySubscribed => ErrorCode::AlreadySubscribed,
            AddError::TooMany => ErrorCode::TooManySubscriptions,
        };
        return reply_error(conn, id, code, &e.to_string());
    }
    if let Some(exp) = grant.token_expires_at {
        conn.set_token_expiry(&channel, &target.key, exp);
    }
    match relay
        .hub
        .subscribe(
            &target,
            conn,
            &channel,
            id,
            since.as_ref(),
            grant.data.as_deref(),
        )
        .await
    {
        Ok(()) => tracing::debug!(request_id = %log_id(id), %channel, "subscribed"),
        Err(e) => {
            conn.remove_if(&channel, &target.key);
            reply_error(conn, id, ErrorCode::Unavailable, &e.to_string());
        }
    }
}
