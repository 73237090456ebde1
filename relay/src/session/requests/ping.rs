//! `ping`: answered with `pong` at once (an application-level round trip).

use tokio_tungstenite::tungstenite::Message;

use crate::conn::Conn;
use crate::protocol::{self, RequestId};

/// Queues the `pong`.
pub fn apply(id: Option<&RequestId>, conn: &Conn) {
    conn.outbox
        .push_reply(Message::text(protocol::encode_pong(id)));
}
