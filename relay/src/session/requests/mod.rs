//! The client's requests (docs/protocol.md section 4), one module each with its own
//! `apply`, and the one dispatcher that picks it. Parsing is `protocol::parse_request`'s; the
//! rate and the expiry timer are the reader's.

pub mod ping;
pub mod publish;
pub mod refresh;
pub mod subscribe;
pub mod unsubscribe;

use std::sync::Arc;

use tokio_tungstenite::tungstenite::Message;

use crate::authz::AuthzError;
use crate::conn::Conn;
use crate::protocol::{self, ErrorCode, Request, RequestId};
use crate::state::Relay;

/// Applies one request; its answer is queued on `conn`.
pub async fn handle(req: Request, conn: &Arc<Conn>, relay: &Relay) {
    match req {
        Request::Ping { id } => ping::apply(id.as_ref(), conn),
        // Handled by the reader, which owns the connection's expiry timer.
        Request::Refresh { .. } => {}
        Request::Subscribe { id, channel, since } => {
            subscribe::apply(id.as_ref(), channel, since, conn, relay).await;
        }
        Request::Unsubscribe { id, channel } => {
            unsubscribe::apply(id.as_ref(), &channel, conn, relay);
        }
        Request::Publish {
            id,
            channel,
            payload,
            msg_id,
        } => publish::apply(id.as_ref(), &channel, payload, msg_id, conn, relay).await,
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

/// The error code a client hears for a channel the bindings refuse.
pub fn authz_code(e: &AuthzError) -> ErrorCode {
    match e {
        AuthzError::InvalidChannel { .. }
        | AuthzError::InvalidClaim { .. }
        | AuthzError::SubjectTooLong { .. } => ErrorCode::InvalidValue,
        AuthzError::NoBinding(_)
        | AuthzError::WrongDirection { .. }
        | AuthzError::MissingClaim { .. }
        | AuthzError::ReservedSubject { .. } => ErrorCode::Forbidden,
    }
}
