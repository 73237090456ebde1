//! A POST that reached a relay without its session goes over NATS to the relay the session
//! id names (docs/protocol.md section 9), which decides it as a POST of its own
//! ([`Post::apply`]) and sends back the answer, so the client's POST may land on any relay of
//! the gateway and no session affinity is needed.
//!
//! The request goes to `<listen.sseForwardSubject>.<relay token>`, the one subject each
//! relay takes them on: under `_WSRELAY`, which no binding may map a channel to, so no
//! client can publish there. It carries the session id, the `Origin` and the token the POST
//! carried (unverified: the owner verifies it against the session's identity), and the frame.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use futures::StreamExt;
use http::StatusCode;

use super::Sessions;
use super::id::SessionId;
use super::post::{Answer, Body, Post};
use crate::state::Relay;

/// How long a forwarded POST waits for the owner's answer: the owner may itself wait
/// [`super::POST_WAIT`] for room in the session's inbox, and answers 503 then.
pub const FORWARD_WITHIN: Duration = Duration::from_secs(super::POST_WAIT.as_secs() + 2);

/// The session id.
const SESSION: &str = "Wsrelay-Session";
/// The POST's `Origin`, when it had one.
const ORIGIN: &str = "Wsrelay-Origin";
/// The POST's token, when it carried one.
const TOKEN: &str = "Wsrelay-Token";
/// Present when the body was over `maxMessageBytes` (none is sent then).
const TOO_BIG: &str = "Wsrelay-Too-Big";
/// The owner's answer: the HTTP status (its body is the reply's payload).
const STATUS: &str = "Wsrelay-Status";

/// What a token that cannot travel in a NATS header (over the relay's token size, which it
/// refuses anyway, or holding bytes no JWT holds) is sent as: a string no key verifies,
/// so the owner answers as it would have to the token itself (401, after the session check).
const UNUSABLE_TOKEN: &str = "unusable";

/// Longest answer text read back (the owner's are short fixed texts).
const MAX_ANSWER_TEXT: usize = 256;

/// The subject the relay with token `relay` takes forwarded POSTs on. Pure.
pub fn subject(prefix: &str, relay: &str) -> String {
    format!("{prefix}.{relay}")
}

/// The request for `post`. Pure.
fn encode(post: &Post) -> (async_nats::HeaderMap, Bytes) {
    let mut h = async_nats::HeaderMap::new();
    h.insert(SESSION, post.session.as_str());
    if let Some(o) = &post.origin {
        h.insert(ORIGIN, o.as_str());
    }
    if let Some(t) = &post.token {
        let usable =
            t.len() <= crate::protocol::MAX_TOKEN_BYTES && t.bytes().all(|b| b.is_ascii_graphic());
        h.insert(TOKEN, if usable { t.as_str() } else { UNUSABLE_TOKEN });
    }
    let payload = match &post.body {
        Body::Frame(b) => b.clone(),
        Body::TooBig => {
            h.insert(TOO_BIG, "1");
            Bytes::new()
        }
    };
    (h, payload)
}

/// The POST a request carries, if it is one (its session id well-formed). Pure.
fn decode(msg: &async_nats::Message) -> Option<Post> {
    let h = msg.headers.as_ref()?;
    let text = |name: &str| h.get(name).map(|v| v.as_str().to_owned());
    let session = SessionId::parse(h.get(SESSION)?.as_str())?;
    let body = if h.get(TOO_BIG).is_some() {
        Body::TooBig
    } else {
        Body::Frame(msg.payload.clone())
    };
    Some(Post {
        session,
        origin: text(ORIGIN),
        token: text(TOKEN),
        body,
    })
}

/// The answer a reply carries; `None` if it is not one. Pure.
fn decode_answer(msg: &async_nats::Message) -> Option<Answer> {
    let status: u16 = msg.headers.as_ref()?.get(STATUS)?.as_str().parse().ok()?;
    let status = StatusCode::from_u16(status).ok()?;
    let text = String::from_utf8_lossy(&msg.payload[..msg.payload.len().min(MAX_ANSWER_TEXT)]);
    Some(Answer {
        status,
        text: text.into_owned().into(),
    })
}

/// Sends `post` to the relay its session id names and returns that relay's answer; 404 when
/// no relay takes that subject (the relay is gone, and its sessions with it), 503 when NATS
/// is down or the owner did not answer within [`FORWARD_WITHIN`].
pub async fn forward(relay: &Relay, sessions: &Sessions, post: &Post) -> Answer {
    const UNAVAILABLE: Answer = Answer::of(StatusCode::SERVICE_UNAVAILABLE, "NATS unavailable");
    let count = |reason| {
        relay
            .metrics
            .sse_forwarded
            .get_or_create(&crate::metrics::Reason { reason })
            .inc();
    };
    if !relay
        .nats_connected
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        count("unavailable");
        return UNAVAILABLE;
    }
    let (headers, payload) = encode(post);
    let subject = subject(sessions.forward_prefix(), post.session.owner());
    let sent = relay
        .hub
        .client()
        .request_with_headers(subject, headers, payload);
    let (reason, answer) = match tokio::time::timeout(FORWARD_WITHIN, sent).await {
        Ok(Ok(reply)) => (
            "answered",
            decode_answer(&reply).unwrap_or(Answer::of(
                StatusCode::SERVICE_UNAVAILABLE,
                "bad answer from the session's relay",
            )),
        ),
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
            ("no_relay", Answer::no_session())
        }
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::TimedOut => (
            "unavailable",
            Answer::of(
                StatusCode::SERVICE_UNAVAILABLE,
                "the session's relay did not answer",
            ),
        ),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "an SSE POST was not forwarded");
            ("unavailable", UNAVAILABLE)
        }
        Err(_) => (
            "unavailable",
            Answer::of(
                StatusCode::SERVICE_UNAVAILABLE,
                "the session's relay did not answer",
            ),
        ),
    };
    count(reason);
    answer
}

/// Takes the POSTs other relays forward to this one until the relay stops, each decided in
/// a task of its own (a panic there answers 500 and ends nothing else).
pub async fn serve(relay: Arc<Relay>, sessions: Arc<Sessions>) {
    let subject = subject(sessions.forward_prefix(), sessions.own());
    let client = relay.hub.client().clone();
    let mut requests = match client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(%subject, error = %e, "cannot take forwarded SSE POSTs: a POST for a session here that reaches another relay gets 404");
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            () = relay.shutdown.cancelled() => break,
            m = requests.next() => match m {
                Some(m) => m,
                None => break,
            },
        };
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let (relay2, sessions, client) = (relay.clone(), sessions.clone(), client.clone());
        relay.tracker.spawn(async move {
            let answer = match decode(&msg) {
                // Another relay's session (its id names another relay): not here.
                Some(post) if post.session.owner() == sessions.own() => crate::task::catch(
                    "sse forward",
                    &relay2.metrics,
                    post.apply(&relay2, &sessions),
                )
                .await
                .unwrap_or(Answer::of(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error",
                )),
                _ => Answer::no_session(),
            };
            let mut h = async_nats::HeaderMap::new();
            h.insert(STATUS, answer.status.as_str());
            let text = Bytes::from(answer.text.into_owned());
            if let Err(e) = client.publish_with_headers(reply, h, text).await {
                tracing::debug!(error = %e, "the answer to a forwarded SSE POST was not sent");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(headers: async_nats::HeaderMap, payload: Bytes) -> async_nats::Message {
        async_nats::Message {
            subject: "s".into(),
            reply: None,
            payload,
            headers: Some(headers),
            status: None,
            description: None,
            length: 0,
        }
    }

    #[test]
    fn a_post_travels_whole_and_a_token_that_cannot_travel_stays_unusable() {
        let session = SessionId::new("relay-a");
        let post = Post {
            session: session.clone(),
            origin: Some("https://app.test".into()),
            token: Some("a.b.c".into()),
            body: Body::Frame(Bytes::from_static(b"{\"type\":\"ping\"}\n")),
        };
        let (h, p) = encode(&post);
        assert_eq!(decode(&message(h, p)), Some(post.clone()));

        let bare = Post {
            origin: None,
            token: None,
            body: Body::TooBig,
            ..post.clone()
        };
        let (h, p) = encode(&bare);
        assert!(p.is_empty());
        assert_eq!(decode(&message(h, p)), Some(bare));

        for bad in [
            "a\r\nX: y",
            &"t".repeat(crate::protocol::MAX_TOKEN_BYTES + 1),
        ] {
            let (h, p) = encode(&Post {
                token: Some(bad.to_owned()),
                ..post.clone()
            });
            assert_eq!(
                decode(&message(h, p)).unwrap().token.as_deref(),
                Some(UNUSABLE_TOKEN)
            );
        }

        // A request whose session id is not one is no POST.
        let mut h = async_nats::HeaderMap::new();
        h.insert(SESSION, "../x");
        assert_eq!(decode(&message(h, Bytes::new())), None);
        assert_eq!(
            subject("_WSRELAY.sse", session.owner()),
            "_WSRELAY.sse.relay-a"
        );
    }

    #[test]
    fn an_answer_is_its_status_and_text() {
        let mut h = async_nats::HeaderMap::new();
        h.insert(STATUS, "403");
        let a = decode_answer(&message(h, Bytes::from_static(b"another identity"))).unwrap();
        assert_eq!(a, Answer::of(StatusCode::FORBIDDEN, "another identity"));
        let mut h = async_nats::HeaderMap::new();
        h.insert(STATUS, "x");
        assert_eq!(decode_answer(&message(h, Bytes::new())), None);
    }
}
