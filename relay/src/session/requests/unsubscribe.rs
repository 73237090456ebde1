//! `unsubscribe`: the connection forgets the channel, the hub its subscriber.

use crate::conn::Conn;
use crate::protocol::{ErrorCode, RequestId};
use crate::state::Relay;

use super::{reply_error, reply_ok};

/// Ends the subscription to `channel`, or answers `not_subscribed`.
pub fn apply(id: Option<&RequestId>, channel: &str, conn: &Conn, relay: &Relay) {
    match conn.remove_subscription(channel) {
        Some(key) => {
            relay.hub.unsubscribe(&key, conn.id, channel);
            reply_ok(conn, id);
        }
        None => reply_error(conn, id, ErrorCode::NotSubscribed, "not subscribed"),
    }
}
