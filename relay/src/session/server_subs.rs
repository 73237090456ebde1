//! A new connection's server-side subscriptions (docs/protocol.md section 3): named in its
//! `welcome`, then made, right after it.

use std::sync::Arc;

use crate::conn::Conn;
use crate::session::requests::subscribe;
use crate::state::Relay;

/// The server-side channels of `conn`'s user, sorted (none for an anonymous connection).
pub fn channels_for(relay: &Relay, conn: &Conn) -> Vec<String> {
    conn.claims()
        .map(|c| relay.server_subs.channels_of(&c))
        .unwrap_or_default()
}

/// A connection was admitted (its `welcome` queued, naming `channels`, its user's
/// server-side channels): subscribes it to them, in a task of its own.
pub fn on_admit(relay: &Arc<Relay>, conn: &Arc<Conn>, channels: Vec<String>) {
    if channels.is_empty() {
        return;
    }
    let (relay, conn) = (relay.clone(), conn.clone());
    relay.clone().tracker.spawn(async move {
        let made = channels
            .iter()
            .map(|channel| subscribe::server(&conn, &relay, channel));
        futures::future::join_all(made).await;
    });
}
