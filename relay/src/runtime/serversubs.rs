//! Server-side subscriptions (docs/backend.md, docs/protocol.md section 3): the control
//! service's `subscribe {sub, channel}` stores `srv.<sub>.<iss>.<channel>` in the connection
//! registry; every relay watches those keys, keeps them by `sub` ([`ServerSubs`]), subscribes
//! its live connections of that user when one comes and every connection of that user it
//! admits later, right after the `welcome` (`crate::session::server_subs`); a key removed ends the
//! subscriptions it made (`unsubscribed` reason `server`). `/ready` waits until the keys
//! present at the start were read, so a relay started after a command applies it too.

use std::sync::Arc;

use tokio_tungstenite::tungstenite::Message;

use crate::conn::Conn;
use crate::protocol;
use crate::registry::keys::{SERVER_SUB_FILTER, ServerSub};
use crate::registry::server_subs::covers;
use crate::session::requests::subscribe;
use crate::state::Relay;

/// Most server-side channels one `sub` may have (whatever the `iss`).
pub const MAX_PER_SUB: usize = 64;

/// The `reason` of the `unsubscribed` notice the backend's `unsubscribe` sends.
pub const REASON: &str = "server";

/// This relay's live connections that `s` covers (not those closing already).
fn covered(relay: &Relay, s: &ServerSub) -> Vec<Arc<Conn>> {
    relay
        .connections()
        .into_iter()
        .filter(|c| c.outbox.close_request().is_none())
        .filter(|c| c.claims().is_some_and(|claims| covers(s, &claims)))
        .collect()
}

/// Subscribes this relay's connections that `s` covers; returns how many hold it now.
pub async fn subscribe_live(relay: &Relay, s: &ServerSub) -> usize {
    let conns = covered(relay, s);
    let made = conns
        .iter()
        .map(|conn| subscribe::server(conn, relay, &s.channel));
    futures::future::join_all(made)
        .await
        .into_iter()
        .filter(|held| *held)
        .count()
}

/// Ends the server-side subscriptions `s` made on this relay's connections (unless another
/// of the user's keys still covers one); returns how many it ended.
pub fn unsubscribe_live(relay: &Relay, s: &ServerSub) -> usize {
    let mut ended = 0;
    for conn in covered(relay, s) {
        if conn
            .claims()
            .is_some_and(|c| relay.server_subs.holds(&c, &s.channel))
        {
            continue;
        }
        if let Some(key) = conn.remove_server_subscription(&s.channel) {
            relay.hub.unsubscribe(&key, conn.id, &s.channel);
            conn.outbox
                .push_reply(Message::text(protocol::encode_unsubscribed(
                    &s.channel, REASON,
                )));
            ended += 1;
        }
    }
    ended
}

/// Watches the server-side subscriptions until the relay stops (`super::follow`).
pub async fn watch(relay: Arc<Relay>) {
    let read = &relay.server_subs_read;
    super::follow::follow(
        &relay,
        SERVER_SUB_FILTER,
        read,
        "server-side subscriptions",
        |key, value| {
            let relay = relay.clone();
            async move {
                match value.and_then(|v| serde_json::from_slice::<ServerSub>(&v).ok()) {
                    Some(s) => {
                        relay.server_subs.set(&key, Some(s.clone()));
                        subscribe_live(&relay, &s).await;
                    }
                    None => {
                        if let Some(s) = relay.server_subs.set(&key, None) {
                            unsubscribe_live(&relay, &s);
                        }
                    }
                }
            }
        },
    )
    .await;
}
