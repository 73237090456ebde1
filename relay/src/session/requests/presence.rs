//! `presence`: a page of a subscribed channel's members (docs/protocol.md section 10),
//! from the channel's watcher on this relay.

use crate::authz::Operation;
use crate::conn::Conn;
use crate::metrics::Op;
use crate::presence::SNAPSHOT_WITHIN;
use crate::protocol::{self, ErrorCode, RequestId};
use crate::state::Relay;

use super::reply_error;
use super::subscribe::{NO_PRESENCE, PRESENCE_UNAVAILABLE};

/// Answers the members of `channel` after `after`, at most `limit`, or why not.
pub async fn apply(
    id: Option<&RequestId>,
    channel: &str,
    after: Option<&str>,
    limit: usize,
    conn: &Conn,
    relay: &Relay,
) {
    if conn.token_expiry(channel).is_none() {
        return reply_error(conn, id, ErrorCode::NotSubscribed, "not subscribed");
    }
    let settings = relay.settings();
    let claims = conn.claims();
    let has_presence = settings
        .authz
        .resolve_binding(channel, Operation::Subscribe, claims.as_deref())
        .ok()
        .and_then(|r| settings.config.bindings.get(r.binding))
        .is_some_and(|b| b.presence.is_some());
    drop(settings);
    if !has_presence {
        return reply_error(conn, id, ErrorCode::BadRequest, NO_PRESENCE);
    }
    let watcher = relay.presence.as_ref().and_then(|p| p.watcher(channel));
    let Some(watcher) = watcher else {
        relay.metrics.presence_unavailable.inc();
        return reply_error(conn, id, ErrorCode::Unavailable, PRESENCE_UNAVAILABLE);
    };
    if !watcher.applied(0, SNAPSHOT_WITHIN).await {
        relay.metrics.presence_unavailable.inc();
        return reply_error(conn, id, ErrorCode::Unavailable, PRESENCE_UNAVAILABLE);
    }
    relay
        .metrics
        .presence_snapshots
        .get_or_create(&Op { op: "presence" })
        .inc();
    watcher.answer_page(conn, protocol::encode_ok(id), after, limit);
}
