//! A new connection's auto-subscriptions (docs/protocol.md section 9, *Streams without a
//! client*): the channels of the bindings with `autoSubscribe`, made right after the
//! `welcome` when the connection asked for them (every SSE session unless it opts out; a
//! WebSocket that opts in), each resumed from the position the client gave back
//! (`Last-Event-ID`) when it gave one.

use std::collections::HashMap;
use std::sync::Arc;

use crate::conn::Conn;
use crate::protocol::Since;
use crate::session::requests::subscribe;
use crate::state::Relay;

/// What a connection asked of its auto-subscriptions: where to resume, per channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AutoSubscribe {
    /// The last position the client received, per auto-subscribed resumable channel.
    pub since: HashMap<String, Since>,
}

/// A connection was admitted (its `welcome` queued): subscribes it to every channel of a
/// binding with `autoSubscribe` its claims may read, in the bindings' order, in a task of
/// its own.
pub fn on_admit(relay: &Arc<Relay>, conn: &Arc<Conn>, auto: AutoSubscribe) {
    let channels: Vec<String> = relay
        .settings()
        .config
        .bindings
        .iter()
        .filter(|b| b.auto_subscribe)
        .map(|b| b.channel.clone())
        .collect();
    if channels.is_empty() {
        return;
    }
    let (relay, conn) = (relay.clone(), conn.clone());
    relay.clone().tracker.spawn(async move {
        for channel in &channels {
            subscribe::auto(&conn, &relay, channel, auto.since.get(channel)).await;
        }
    });
}
