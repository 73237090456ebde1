//! What both transports' HTTP handlers share: the request extensions the listener sets
//! (the TCP peer, the stream hand-off), the request id of log lines, a refusal's answer.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};

use super::admit::Refusal;
use crate::metrics::Metrics;
use crate::state::Relay;

/// The TCP peer of the connection a request came on (a request extension).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Set on each request: a handler that answers with a long-lived stream (SSE) notifies it,
/// and the connection leaves the handshake timeout and the handshakes-in-flight count.
#[derive(Debug, Clone)]
pub struct StreamHandoff(pub Arc<tokio::sync::Notify>);

/// The header a request id is read from and answered in.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The id of one handshake in the relay's log lines: the client's (or its proxy's)
/// `X-Request-Id` when it is a short token of letters, digits and `.-_:`, else a fresh random
/// one. Never derived from anything secret.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
        })
        .map_or_else(|| format!("{:016x}", rand::random::<u64>()), str::to_owned)
}

/// A refusal answered with its HTTP status (and `Retry-After` when retrying may help),
/// counted under its label. One request per connection: closed after a refusal, so that only
/// a stalled handshake ever meets the handshake timeout.
pub fn refuse(metrics: &Metrics, refusal: &Refusal) -> Response {
    let (status, reason) = (refusal.status(), refusal.label());
    metrics.refuse(reason);
    tracing::debug!(status = status.as_u16(), reason, "handshake refused");
    let mut resp = answer(status, reason);
    if let Some(s) = refusal.retry_after() {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    resp
}

/// The close code a refusal is answered with after the upgrade (WebSocket) or in a `close`
/// event (SSE), when `auth.refuseAfterUpgrade` is on and the refusal has one; counted then.
/// `None`: answer with the HTTP status ([`refuse`]).
pub fn refused_after_upgrade(relay: &Relay, refusal: &Refusal) -> Option<u16> {
    let on = relay.settings().config.auth.refuse_after_upgrade;
    let code = refusal.close_code().filter(|_| on)?;
    relay.metrics.refuse(refusal.label());
    tracing::debug!(
        close = code,
        reason = refusal.label(),
        "refused after the upgrade"
    );
    Some(code)
}

/// Whether a comma-separated header holds `token` (case-insensitive).
pub fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// A plain answer that closes the connection after it (one request per TCP connection).
pub fn answer(status: StatusCode, text: impl Into<std::borrow::Cow<'static, str>>) -> Response {
    let mut resp = (status, text.into()).into_response();
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}
