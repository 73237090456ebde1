//! `publish`: the bindings decide the subject; the message goes to NATS with headers naming
//! its sender, and on a resumable channel is stored by JetStream before the `ok`, which then
//! carries its position.

use tokio_tungstenite::tungstenite::Message;

use crate::authz::{AuthzError, Operation};
use crate::conn::Conn;
use crate::protocol::{self, ErrorCode, RequestId};
use crate::state::Relay;

use super::{authz_code, reply_error};

/// The header naming the publishing client's token subject.
pub const SENDER_SUB_HEADER: &str = "Wsrelay-Sub";
/// The header naming the publishing connection.
pub const SENDER_CONNECTION_HEADER: &str = "Wsrelay-Connection";

/// Why a publish is refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The bindings refuse the channel.
    #[error(transparent)]
    Refused(#[from] AuthzError),
    /// The relay's NATS connection is down.
    #[error("NATS unavailable")]
    NatsUnavailable,
    /// NATS did not take the message.
    #[error("publish failed: {0}")]
    Failed(String),
    /// JetStream did not store it.
    #[error("not stored: {0}")]
    NotStored(String),
    /// JetStream did not acknowledge it within the bound.
    #[error("JetStream did not acknowledge in time")]
    NotAcknowledged,
}

impl PublishError {
    /// The error code the client hears.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Refused(e) => authz_code(e),
            _ => ErrorCode::Unavailable,
        }
    }
}

/// Publishes, then queues the `ok` (with the stored position on a resumable channel) or
/// the error.
pub async fn apply(
    id: Option<&RequestId>,
    channel: &str,
    payload: Vec<u8>,
    msg_id: Option<String>,
    conn: &Conn,
    relay: &Relay,
) {
    match publish(channel, payload, msg_id, conn, relay).await {
        Ok(stored) => {
            relay.metrics.published.inc();
            let ok = match stored {
                Some((seq, duplicate)) => protocol::encode_ok_stored(id, seq, duplicate),
                None => protocol::encode_ok(id),
            };
            conn.outbox.push_reply(Message::text(ok));
        }
        Err(e) => {
            if !matches!(e, PublishError::Refused(_)) {
                relay.metrics.drop_msgs("nats_unavailable", 1);
            }
            reply_error(conn, id, e.code(), &e.to_string());
        }
    }
}

/// Sends the message; for a resumable channel returns its stream position and whether
/// JetStream found it a duplicate.
async fn publish(
    channel: &str,
    payload: Vec<u8>,
    msg_id: Option<String>,
    conn: &Conn,
    relay: &Relay,
) -> Result<Option<(u64, bool)>, PublishError> {
    let resolved = relay.settings().authz.resolve_binding(
        channel,
        Operation::Publish,
        conn.claims.as_ref(),
    )?;
    if !relay
        .nats_connected
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        return Err(PublishError::NatsUnavailable);
    }
    let headers = sender_headers(conn, &relay.name);
    let client = relay.hub.client();
    if resolved.history.is_none() {
        client
            .publish_with_headers(resolved.subject, headers, payload.into())
            .await
            .map_err(|e| PublishError::Failed(e.to_string()))?;
        return Ok(None);
    }
    publish_stored(client, resolved.subject, headers, payload, msg_id)
        .await
        .map(Some)
}

/// Headers a client publish carries to NATS, so a backend knows who sent it: the token's
/// `sub` (absent for anonymous clients or a token without one) and the connection
/// (`<relay name>/<connection id>`). Set by the relay; a client cannot set NATS headers, so it
/// cannot forge them.
fn sender_headers(conn: &Conn, relay_name: &str) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    if let Some(sub) = conn.claims.as_ref().and_then(crate::auth::subject) {
        h.insert(SENDER_SUB_HEADER, sub);
    }
    h.insert(
        SENDER_CONNECTION_HEADER,
        format!("{relay_name}/{}", conn.id).as_str(),
    );
    h
}

/// A publish on a resumable channel: stored by JetStream before the `ok`, which carries its
/// position. `msg_id` de-duplicates within the stream's duplicate window.
async fn publish_stored(
    client: &async_nats::Client,
    subject: String,
    mut headers: async_nats::HeaderMap,
    payload: Vec<u8>,
    msg_id: Option<String>,
) -> Result<(u64, bool), PublishError> {
    if let Some(m) = &msg_id {
        headers.insert("Nats-Msg-Id", m.as_str());
    }
    let js = async_nats::jetstream::new(client.clone());
    let ack = async {
        js.publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|e| PublishError::Failed(e.to_string()))?
            .await
            .map_err(|e| PublishError::NotStored(e.to_string()))
    };
    let ack = tokio::time::timeout(crate::history::stream::READ_TIMEOUT, ack)
        .await
        .map_err(|_| PublishError::NotAcknowledged)??;
    Ok((ack.sequence, ack.duplicate))
}
