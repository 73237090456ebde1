//! A POST to a session, as the relay that holds the session decides it, whether it came to
//! this relay or was forwarded by another (`super::forward`): the same checks in the same
//! order, so the answer is the same wherever the client's POST landed.

use std::borrow::Cow;

use axum::body::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::Message;

use super::id::SessionId;
use super::{POST_WAIT, Sessions};
use crate::conn::close::Cause;
use crate::state::Relay;

/// What a POST carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// One frame, at most `maxMessageBytes`.
    Frame(Bytes),
    /// More than `maxMessageBytes`: not read further, never forwarded.
    TooBig,
}

/// One POST: the session it names, what authenticates it (read by the relay it reached:
/// the `Origin`, the token from the relay's token sources, unverified), its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Post {
    /// The session.
    pub session: SessionId,
    /// The `Origin` header, when the request had one.
    pub origin: Option<String>,
    /// The token, when the request carried one.
    pub token: Option<String>,
    /// The frame.
    pub body: Body,
}

/// The HTTP answer to a POST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its body: a fixed text, never anything from the request.
    pub text: Cow<'static, str>,
}

impl Answer {
    /// An answer with a fixed text.
    pub const fn of(status: StatusCode, text: &'static str) -> Self {
        Self {
            status,
            text: Cow::Borrowed(text),
        }
    }

    /// No such session (it ended, or never was).
    pub const fn no_session() -> Self {
        Self::of(StatusCode::NOT_FOUND, "no such session")
    }
}

impl Post {
    /// Decides the POST against the sessions this relay holds: the session (404), the token
    /// (401, or 503 when the keys cannot be had) of the session's identity (403), the size
    /// (413, and the session closes with 1009 as a WebSocket's would), then the frame goes
    /// to the session (202; 503 when its inbox stays full for [`POST_WAIT`]). The `Origin`
    /// was checked by the relay the POST reached; a forwarded one is checked again here.
    pub async fn apply(self, relay: &Relay, sessions: &Sessions) -> Answer {
        let authn = relay.settings().authn.clone();
        let mut origin = HeaderMap::new();
        if let Some(o) = self
            .origin
            .as_deref()
            .and_then(|o| HeaderValue::from_str(o).ok())
        {
            origin.insert(header::ORIGIN, o);
        }
        if let Err(e) =
            crate::auth::check_origin(&relay.settings().config.auth.allowed_origins, &origin)
        {
            return Answer::of(e.status(), e.reason());
        }
        let Some((conn, inbox)) = sessions.get(&self.session) else {
            return Answer::no_session();
        };
        let same = match authn.identify(self.token.as_deref()).await {
            Ok(identity) => match (conn.claims(), &identity.claims) {
                (None, None) => true,
                (Some(old), Some(new)) => crate::auth::same_identity(&old, new),
                _ => false,
            },
            Err(e) => return Answer::of(e.status(), e.reason()),
        };
        if !same {
            return Answer::of(StatusCode::FORBIDDEN, "another identity");
        }
        let bytes = match self.body {
            Body::Frame(b) => b,
            Body::TooBig => {
                // As a WebSocket frame over the limit would: the connection closes with 1009.
                conn.outbox.close(Cause::TooBig);
                return Answer::of(StatusCode::PAYLOAD_TOO_LARGE, "message too big");
            }
        };
        let msg = match std::str::from_utf8(&bytes) {
            Ok(t) => Message::text(t),
            // Answered on the stream, as a binary WebSocket frame is.
            Err(_) => Message::Binary(bytes),
        };
        match tokio::time::timeout(POST_WAIT, inbox.send(msg)).await {
            Ok(Ok(())) => Answer::of(StatusCode::ACCEPTED, ""),
            Ok(Err(_)) => Answer::no_session(),
            Err(_) => Answer::of(StatusCode::SERVICE_UNAVAILABLE, "busy"),
        }
    }
}
