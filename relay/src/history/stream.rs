//! The JetStream side of resumable channels: the stream a binding's history lives in
//! (created and updated by the relay, idempotently), and the reads a resume or a gap fill
//! makes (Direct Get, batched: no consumer is ever created).

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, StatusCode};
use futures::StreamExt;
use serde_json::json;

use super::ring::Stored;
use crate::config::History;

/// Bound on every JetStream request a subscribe or a gap fill makes.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Prefix of the subjects the stream republishes stored messages to; the relay subscribes
/// there, so every live message carries its position (`Nats-Sequence`) and the position of
/// the previous one on its subject (`Nats-Last-Sequence`).
pub const REPUBLISH_PREFIX: &str = crate::config::RELAY_SUBJECT_PREFIX;

/// A JetStream request failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Creating or updating the stream.
    #[error("stream {stream}: {message}")]
    Ensure {
        /// The stream.
        stream: String,
        /// Why.
        message: String,
    },
    /// A read.
    #[error("reading stream {stream}: {message}")]
    Read {
        /// The stream.
        stream: String,
        /// Why.
        message: String,
    },
}

impl StreamError {
    /// Why, without the stream's name.
    pub fn reason(&self) -> &str {
        match self {
            Self::Ensure { message, .. } | Self::Read { message, .. } => message,
        }
    }
}

/// The subject live messages of `subject` are republished to.
pub fn republish_subject(stream: &str, subject: &str) -> String {
    format!("{REPUBLISH_PREFIX}.{stream}.{subject}")
}

/// Longest duplicate window (JetStream's default): client publishes with the same `msgId`
/// within it are stored once.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Room for headers in the stream's per-message limit, which JetStream applies to headers
/// and payload together: a client publish carries the relay's sender headers and its
/// `msgId`, and a payload the relay accepted (`maxMessageBytes`) must be stored.
pub const HEADER_ROOM: u32 = 4096;

/// The stream's configuration: the binding's subjects (placeholders as `*`), its limits per
/// channel and in all (`max_bytes`; no message above `max_message_bytes`, the relay's own
/// message limit, plus [`HEADER_ROOM`]), republishing to [`republish_subject`]. The duplicate window is at most
/// the max age: JetStream refuses a longer one (error 10052). Pure.
pub fn stream_config(h: &History, subject_filter: &str, max_message_bytes: u32) -> stream::Config {
    let max_age = Duration::from_secs(h.max_age_seconds);
    stream::Config {
        name: h.stream.clone(),
        description: Some("wsrelay history (resumable channels); managed by the relays".into()),
        subjects: vec![subject_filter.to_owned()],
        max_messages_per_subject: i64::from(h.max_messages),
        max_age,
        max_bytes: i64::try_from(h.max_bytes).unwrap_or(i64::MAX),
        max_message_size: i32::try_from(max_message_bytes.saturating_add(HEADER_ROOM))
            .unwrap_or(i32::MAX),
        storage: stream::StorageType::File,
        num_replicas: usize::from(h.replicas),
        discard: stream::DiscardPolicy::Old,
        allow_direct: true,
        republish: Some(stream::Republish {
            source: ">".into(),
            destination: format!("{REPUBLISH_PREFIX}.{}.>", h.stream),
            headers_only: false,
        }),
        duplicate_window: DUPLICATE_WINDOW.min(max_age),
        ..Default::default()
    }
}

/// The epoch of a stream: its creation time, in hex nanoseconds. It changes only when the
/// stream is deleted and created again.
pub fn epoch_of(info: &stream::Info) -> String {
    format!("{:x}", info.created.unix_timestamp_nanos())
}

/// Creates the stream, or updates it to `config`; returns its epoch.
pub async fn ensure(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<String, StreamError> {
    let name = config.name.clone();
    let err = |message: String| StreamError::Ensure {
        stream: name.clone(),
        message,
    };
    let info = tokio::time::timeout(READ_TIMEOUT, js.create_or_update_stream(config))
        .await
        .map_err(|_| err("JetStream did not answer".into()))?
        .map_err(|e| err(said_once(e.to_string())))?;
    Ok(epoch_of(&info))
}

/// `"x: x"` as `"x"`: async-nats says a JetStream refusal twice (kind, then source). Pure.
fn said_once(s: String) -> String {
    let n = s.len();
    if n > 2 && (n - 2).is_multiple_of(2) {
        let h = (n - 2) / 2;
        if s.is_char_boundary(h) && s.get(h..h + 2) == Some(": ") && s[..h] == s[h + 2..] {
            return s[..h].to_owned();
        }
    }
    s
}

/// The stream's last sequence.
pub async fn last_sequence(js: &jetstream::Context, name: &str) -> Result<u64, StreamError> {
    let err = |message: String| StreamError::Read {
        stream: name.to_owned(),
        message,
    };
    let fut = async {
        let s = js.get_stream(name).await.map_err(|e| err(e.to_string()))?;
        Ok::<u64, StreamError>(s.cached_info().state.last_sequence)
    };
    tokio::time::timeout(READ_TIMEOUT, fut)
        .await
        .map_err(|_| err("JetStream did not answer".into()))?
}

/// The stream's first sequence: 1 (or 0 when empty) as long as it never removed a message.
pub async fn first_sequence(js: &jetstream::Context, name: &str) -> Result<u64, StreamError> {
    let err = |message: String| StreamError::Read {
        stream: name.to_owned(),
        message,
    };
    let fut = async {
        let s = js.get_stream(name).await.map_err(|e| err(e.to_string()))?;
        Ok::<u64, StreamError>(s.cached_info().state.first_sequence)
    };
    tokio::time::timeout(READ_TIMEOUT, fut)
        .await
        .map_err(|_| err("JetStream did not answer".into()))?
}

fn header_u64(h: Option<&HeaderMap>, name: &str) -> Option<u64> {
    h?.get(name)?.as_str().parse().ok()
}

/// Reads the messages of `subject` with a position above `after` (and below `before`, when
/// given), oldest first, at most `max` of them: one batched Direct Get request.
pub async fn read_after(
    client: &async_nats::Client,
    name: &str,
    subject: &str,
    after: u64,
    before: Option<u64>,
    max: usize,
) -> Result<Vec<Stored>, StreamError> {
    let err = |message: String| StreamError::Read {
        stream: name.to_owned(),
        message,
    };
    let fut = async {
        let inbox = client.new_inbox();
        let mut replies = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| err(e.to_string()))?;
        let request = json!({
            "seq": after + 1,
            "next_by_subj": subject,
            "batch": max.max(1),
        });
        client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{name}"),
                inbox,
                request.to_string().into(),
            )
            .await
            .map_err(|e| err(e.to_string()))?;
        let mut out = Vec::new();
        while let Some(msg) = replies.next().await {
            match msg.status {
                // End of batch, or nothing at all after `after`.
                Some(StatusCode::NOT_FOUND) => break,
                Some(s) if s.as_u16() == 204 => break,
                Some(s) if s != StatusCode::OK => {
                    return Err(err(format!(
                        "status {} {}",
                        s.as_u16(),
                        msg.description.unwrap_or_default()
                    )));
                }
                _ => {}
            }
            let Some(seq) = header_u64(msg.headers.as_ref(), "Nats-Sequence") else {
                return Err(err("a reply without Nats-Sequence".into()));
            };
            if before.is_some_and(|b| seq >= b) {
                break;
            }
            let at_ms = jetstream::message::StreamMessage::try_from(msg.clone())
                .ok()
                .map_or_else(super::now_ms, |m| {
                    u64::try_from(m.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
                });
            out.push(Stored {
                seq,
                at_ms,
                payload: msg.payload,
            });
            // An old server answers one message and no end-of-batch marker.
            if header_u64(msg.headers.as_ref(), "Nats-Num-Pending").is_none() || out.len() >= max {
                break;
            }
        }
        let _ = replies.unsubscribe().await;
        Ok(out)
    };
    tokio::time::timeout(READ_TIMEOUT, fut)
        .await
        .map_err(|_| err("JetStream did not answer".into()))?
}

/// Whether the stream still holds the message at `seq`, and whether it is on `subject`:
/// `None` when it is gone (or never was).
pub async fn held(
    client: &async_nats::Client,
    name: &str,
    seq: u64,
    subject: &str,
) -> Result<Option<bool>, StreamError> {
    let err = |message: String| StreamError::Read {
        stream: name.to_owned(),
        message,
    };
    let request = json!({ "seq": seq });
    let reply = tokio::time::timeout(
        READ_TIMEOUT,
        client.request(
            format!("$JS.API.DIRECT.GET.{name}"),
            request.to_string().into(),
        ),
    )
    .await
    .map_err(|_| err("JetStream did not answer".into()))?;
    let msg = match reply {
        Ok(m) => m,
        Err(e) => return Err(err(e.to_string())),
    };
    match msg.status {
        Some(StatusCode::NOT_FOUND) => Ok(None),
        Some(s) if s != StatusCode::OK => Err(err(format!("status {}", s.as_u16()))),
        _ => {
            let on = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Subject"))
                .map(|v| v.as_str() == subject);
            Ok(Some(on.unwrap_or(false)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(max_age_seconds: u64) -> History {
        History {
            stream: "S".into(),
            max_messages: 10,
            max_age_seconds,
            max_bytes: 1 << 20,
            replicas: 1,
        }
    }

    #[test]
    fn the_duplicate_window_is_never_longer_than_the_max_age() {
        let c = stream_config(&history(30), "a.*", 65_536);
        assert_eq!(c.duplicate_window, Duration::from_secs(30));
        let c = stream_config(&history(3_600), "a.*", 65_536);
        assert_eq!(c.duplicate_window, DUPLICATE_WINDOW);
        assert_eq!(c.max_bytes, 1 << 20);
        assert_eq!(c.max_message_size, 65_536 + 4_096);
    }

    #[test]
    fn refusals_said_twice_are_said_once() {
        assert_eq!(said_once("a b (1): a b (1)".into()), "a b (1)");
        assert_eq!(said_once("a: b".into()), "a: b");
        assert_eq!(said_once("timeout".into()), "timeout");
    }
}
