//! `publish`: the bindings and their checks decide the subject (`crate::access`; a
//! subscription token comes with the publish, or is the one the connection holds for the
//! channel); the message goes to NATS with headers naming its sender, and on a resumable channel is stored by JetStream before the `ok`, which then
//! carries its position.

use tokio_tungstenite::tungstenite::Message;

use crate::access::{Denied, Presented};
use crate::authz::Operation;
use crate::conn::Conn;
use crate::protocol::{self, ErrorCode, RequestId};
use crate::state::Relay;

use super::{reply_denied, reply_error, who};

/// Why a publish is refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The bindings or their checks refuse the channel.
    #[error(transparent)]
    Refused(#[from] Denied),
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
            Self::Refused(e) => e.code(),
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
    token: Option<&str>,
    conn: &Conn,
    relay: &Relay,
) {
    match publish(channel, payload, msg_id, token, conn, relay).await {
        Ok(stored) => {
            relay.metrics.published.inc();
            let ok = match stored {
                Some((seq, duplicate)) => protocol::encode_ok_stored(id, seq, duplicate),
                None => protocol::encode_ok(id),
            };
            conn.outbox.push_reply(Message::text(ok));
        }
        Err(PublishError::Refused(denied)) => reply_denied(conn, id, &denied),
        Err(e) => {
            relay.metrics.drop_msgs("nats_unavailable", 1);
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
    token: Option<&str>,
    conn: &Conn,
    relay: &Relay,
) -> Result<Option<(u64, bool)>, PublishError> {
    let access = relay.settings().access.clone();
    let claims = conn.claims();
    let who = who(conn, relay, claims.as_deref());
    let presented = match token {
        Some(t) => Presented::Token(t),
        None if holds_live_token(conn, channel) => Presented::Held,
        None => Presented::None,
    };
    let resolved = access
        .check(channel, Operation::Publish, who, presented, relay.link())
        .await?
        .resolved;
    if !relay
        .nats_connected
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        return Err(PublishError::NatsUnavailable);
    }
    let headers = who.headers();
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

/// Whether `conn` holds `channel` with a subscription token that has not expired.
fn holds_live_token(conn: &Conn, channel: &str) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    matches!(conn.token_expiry(channel), Some(Some(exp)) if exp > now)
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
