//! The client's requests (docs/protocol.md section 4), one module each with its own
//! `apply`, and the one dispatcher that picks it. Parsing is `protocol::parse_request`'s; the
//! rate and the expiry timer are the reader's.

pub mod ping;
pub mod presence;
pub mod publish;
pub mod refresh;
pub mod subrefresh;
pub mod subscribe;
pub mod unsubscribe;

use std::sync::Arc;

use tokio_tungstenite::tungstenite::Message;

use serde_json::{Map, Value};

use crate::access::{Denied, Presented, Who};
use crate::authz::Operation;
use crate::conn::Conn;
use crate::fanout::Target;
use crate::protocol::{self, ErrorCode, Request, RequestId};
use crate::state::Relay;

/// Applies one request; its answer is queued on `conn`.
pub async fn handle(req: Request, conn: &Arc<Conn>, relay: &Relay) {
    match req {
        Request::Ping { id } => ping::apply(id.as_ref(), conn),
        // Handled by the reader, which owns the connection's expiry timer.
        Request::Refresh { .. } => {}
        Request::Subscribe {
            id,
            channel,
            since,
            token,
            presence,
        } => {
            subscribe::apply(id.as_ref(), channel, since, token, presence, conn, relay).await;
        }
        Request::Presence {
            id,
            channel,
            after,
            limit,
        } => {
            presence::apply(id.as_ref(), &channel, after.as_deref(), limit, conn, relay).await;
        }
        Request::SubRefresh { id, channel, token } => {
            subrefresh::apply(id.as_ref(), &channel, &token, conn, relay).await;
        }
        Request::Unsubscribe { id, channel } => {
            unsubscribe::apply(id.as_ref(), &channel, conn, relay);
        }
        Request::Publish {
            id,
            channel,
            payload,
            msg_id,
            token,
        } => {
            let token = token.as_deref();
            publish::apply(id.as_ref(), &channel, payload, msg_id, token, conn, relay).await;
        }
    }
}

/// A client's request id as a log field: `7`, `"a-string"` (escaped), or `-` without one.
pub fn log_id(id: Option<&RequestId>) -> String {
    match id {
        Some(RequestId::Num(n)) => n.to_string(),
        Some(RequestId::Str(s)) => format!("{s:?}"),
        None => "-".into(),
    }
}

/// Queues an `error` reply.
pub fn reply_error(conn: &Conn, id: Option<&RequestId>, code: ErrorCode, reason: &str) {
    tracing::debug!(request_id = %log_id(id), code = code as u16, reason, "request refused");
    conn.outbox
        .push_reply(Message::text(protocol::encode_error(id, code, reason)));
}

/// Queues an `ok` reply.
pub fn reply_ok(conn: &Conn, id: Option<&RequestId>) {
    conn.outbox
        .push_reply(Message::text(protocol::encode_ok(id)));
}

/// Queues the `error` for a denied channel (with the backend's `appCode`, if any).
pub fn reply_denied(conn: &Conn, id: Option<&RequestId>, denied: &Denied) {
    let (code, reason) = (denied.code(), denied.to_string());
    tracing::debug!(request_id = %log_id(id), code = code as u16, %reason, "request refused");
    conn.outbox
        .push_reply(Message::text(protocol::encode_error_app(
            id,
            code,
            &reason,
            denied.app_code(),
        )));
}

/// Who `conn` is, for the access checks.
pub fn who<'a>(conn: &Conn, relay: &'a Relay, claims: Option<&'a Map<String, Value>>) -> Who<'a> {
    Who {
        claims,
        relay: &relay.name,
        conn: Some(conn.id),
    }
}

/// Ends `conn`'s subscription to `channel` by the relay's decision, unless the client ended
/// it meanwhile (or subscribed again to another key), and tells the client `reason`.
/// Returns whether it ended it.
pub fn end(conn: &Conn, relay: &Relay, channel: &str, key: &str, reason: &str) -> bool {
    if !conn.remove_if(channel, key) {
        return false;
    }
    relay.hub.unsubscribe(key, conn.id, channel);
    conn.outbox
        .push_reply(Message::text(protocol::encode_unsubscribed(
            channel, reason,
        )));
    true
}

/// Ends a subscription whose token expired (already taken from the connection's map).
pub fn end_expired(conn: &Conn, relay: &Relay, channel: &str, key: &str) {
    relay.hub.unsubscribe(key, conn.id, channel);
    conn.outbox
        .push_reply(Message::text(protocol::encode_unsubscribed(
            channel, "expired",
        )));
}

/// Authorizes every live subscription of `conn` again (its claims changed): the ones no
/// longer allowed, or now mapped to another subject, end with `forbidden`. The checks run
/// concurrently; a backend's cached decisions are reused. Returns how many ended.
pub async fn recheck(conn: &Conn, relay: &Relay) -> usize {
    let access = relay.settings().access.clone();
    let claims = conn.claims();
    let authz = relay.settings().authz.clone();
    let checks = conn.subscriptions().into_iter().map(|(channel, key)| {
        let (access, authz) = (&access, &authz);
        let claims = claims.as_deref();
        async move {
            // A server-side subscription: its template only, the checks do not apply.
            if conn.is_server_held(&channel) {
                let still = authz
                    .resolve_binding(&channel, Operation::Subscribe, claims)
                    .is_ok_and(|r| Target::of(&r).key == key);
                return (channel, key, still);
            }
            let presented = match conn.token_expiry(&channel) {
                Some(Some(_)) => Presented::Held,
                _ => Presented::None,
            };
            let still = access
                .check(
                    &channel,
                    Operation::Subscribe,
                    who(conn, relay, claims),
                    presented,
                    relay.link(),
                )
                .await
                .is_ok_and(|g| Target::of(&g.resolved).key == key);
            (channel, key, still)
        }
    });
    futures::future::join_all(checks)
        .await
        .into_iter()
        .filter(|(channel, key, still)| !still && end(conn, relay, channel, key, "forbidden"))
        .count()
}
