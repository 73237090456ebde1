//! `unsubscribe`: the connection forgets the channel, the hub its subscriber. A server-side
//! subscription is the backend's to end (docs/protocol.md section 3): refused.

use crate::conn::Conn;
use crate::protocol::{ErrorCode, RequestId};
use crate::state::Relay;

use super::{reply_error, reply_ok};

/// The reason of the 403 for a client's `unsubscribe` of a server-side subscription.
pub const SERVER_HELD: &str = "a server-side subscription: the backend ends it";

/// Ends the subscription to `channel`, or answers `not_subscribed` (or `forbidden` for a
/// server-side one).
pub fn apply(id: Option<&RequestId>, channel: &str, conn: &Conn, relay: &Relay) {
    if conn.is_server_held(channel) {
        return reply_error(conn, id, ErrorCode::Forbidden, SERVER_HELD);
    }
    match conn.remove_subscription(channel) {
        Some(key) => {
            relay.hub.unsubscribe(&key, conn.id, channel);
            reply_ok(conn, id);
        }
        None => reply_error(conn, id, ErrorCode::NotSubscribed, "not subscribed"),
    }
}
