//! `subscribe`: the bindings decide the channel's subject, the connection records it (one
//! of at most `limits.maxSubscriptionsPerConnection`), and the hub joins it, queueing the
//! `ok` itself (for a resumable channel before the replay and the first live message).

use std::sync::Arc;

use crate::authz::Operation;
use crate::conn::{AddError, Conn};
use crate::fanout::Target;
use crate::protocol::{ErrorCode, RequestId, Since};
use crate::state::Relay;

use super::{authz_code, log_id, reply_error};

/// Subscribes `conn` to `channel`, or answers why not.
pub async fn apply(
    id: Option<&RequestId>,
    channel: String,
    since: Option<Since>,
    conn: &Arc<Conn>,
    relay: &Relay,
) {
    tracing::debug!(request_id = %log_id(id), %channel, resume = since.is_some(), "subscribe");
    let settings = relay.settings();
    let target =
        match settings
            .authz
            .resolve_binding(&channel, Operation::Subscribe, conn.claims.as_ref())
        {
            Ok(r) => Target::of(&r),
            Err(e) => return reply_error(conn, id, authz_code(&e), &e.to_string()),
        };
    let max = settings.config.limits.max_subscriptions_per_connection as usize;
    drop(settings);
    if let Err(e) = conn.add_subscription(&channel, &target.key, max) {
        let code = match e {
            AddError::AlreadySubscribed => ErrorCode::AlreadySubscribed,
            AddError::TooMany => ErrorCode::TooManySubscriptions,
        };
        return reply_error(conn, id, code, &e.to_string());
    }
    match relay
        .hub
        .subscribe(&target, conn, &channel, id, since.as_ref())
        .await
    {
        Ok(()) => tracing::debug!(request_id = %log_id(id), %channel, "subscribed"),
        Err(e) => {
            conn.remove_if(&channel, &target.key);
            reply_error(conn, id, ErrorCode::Unavailable, &e.to_string());
        }
    }
}
