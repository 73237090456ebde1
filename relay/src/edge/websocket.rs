//! The WebSocket transport: the upgrade handler (the request's shape, then admission, then
//! `101 Switching Protocols`) and the upgraded socket's two halves handed to the session.
//! With `auth.refuseAfterUpgrade`, a refusal browsers could not read (they see a refused
//! upgrade only as 1006) is an upgrade closed at once with a 4xxx code and a readable reason.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use http::{HeaderValue, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tracing::Instrument;

use super::Edge;
use super::admit::{Asking, Refusal, admit};
use super::http::{
    Peer, REQUEST_ID_HEADER, header_has_token, refuse, refused_after_upgrade, request_id,
};
use crate::auth::TokenVia;
use crate::config::Limits;
use crate::protocol::SUBPROTOCOL;

/// WebSocket buffers sized for many mostly idle connections, not for one busy one.
/// tungstenite's defaults allocate a 128 KiB read buffer per connection up front.
pub fn ws_config(limits: &Limits) -> WebSocketConfig {
    let max_msg = limits.max_message_bytes as usize;
    let write_buffer = 16 * 1024;
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(write_buffer)
        // Room for a batch plus one outgoing message (base64 grows payloads by 4/3).
        .max_write_buffer_size(write_buffer + 2 * max_msg + 64 * 1024)
        .max_message_size(Some(max_msg))
        .max_frame_size(Some(max_msg))
}

/// The WebSocket route.
pub fn router(edge: Arc<Edge>, path: &str) -> Router {
    Router::new().route(path, get(upgrade)).with_state(edge)
}

/// The WebSocket handshake, in a span that puts its request id (answered in `X-Request-Id`)
/// on every log line of the handshake and of the connection it opens.
async fn upgrade(State(edge): State<Arc<Edge>>, req: Request) -> Response {
    let id = request_id(req.headers());
    let span = tracing::debug_span!("handshake", request_id = %id);
    let mut resp = handshake(edge, req, span.clone()).instrument(span).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

async fn handshake(edge: Arc<Edge>, mut req: Request, span: tracing::Span) -> Response {
    let relay = &edge.relay;
    let headers = req.headers();
    let key = headers.get(header::SEC_WEBSOCKET_KEY).cloned();
    if !header_has_token(headers, header::UPGRADE, "websocket")
        || !header_has_token(headers, header::CONNECTION, "upgrade")
        || headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(|v| v.as_bytes())
            != Some(b"13")
        || key.is_none()
    {
        return refuse(&relay.metrics, &Refusal::NotWebsocket);
    }
    // Select our subprotocol when offered (browsers that send a token in
    // Sec-WebSocket-Protocol must offer it too: the token itself is never echoed).
    let offers_ours = header_has_token(headers, header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL);
    let asking = Asking {
        headers,
        query: req.uri().query(),
        peer: req.extensions().get::<Peer>().map(|p| p.0),
        auto_by_default: false,
    };
    let admitted = match admit(relay, &edge.admission, asking).await {
        Ok(a) => a,
        Err(refusal) => return refuse_ws(&edge, &mut req, &refusal, offers_ours),
    };
    if admitted.via == Some(TokenVia::Subprotocol) && !offers_ours {
        return refuse(&relay.metrics, &Refusal::Subprotocol);
    }
    let config = ws_config(&relay.settings().config.limits);
    let on_upgrade = hyper::upgrade::on(&mut req);
    let edge2 = edge.clone();
    let task = async move {
        // Held for the connection's life: its slot and its counts per address and subject.
        let held = admitted.held;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        let (conn, resumed) = edge2
            .open(admitted.identity.claims, admitted.resume.as_deref())
            .await;
        tracing::debug!(conn = conn.id, "connection accepted");
        let id = conn.id;
        let (sink, stream) = ws.split();
        crate::session::run(
            sink,
            stream,
            edge2.relay.clone(),
            conn,
            admitted.identity.expires_at,
            crate::session::Welcome {
                data: admitted.data,
                resumed,
                auto: admitted.auto,
            },
        )
        .instrument(tracing::debug_span!("connection", conn = id))
        .await;
        drop(held);
    };
    relay.tracker.spawn(task.instrument(span));
    switching_protocols(key.as_ref(), offers_ours)
}

/// A refusal of a valid WebSocket request: an HTTP status, or, with
/// `auth.refuseAfterUpgrade`, an upgrade closed at once with a 4xxx code and a readable reason.
/// Counted in the same refusal metric; the connection is never registered, so it cannot
/// subscribe and is not in `wsrelay_connections`.
fn refuse_ws(edge: &Edge, req: &mut Request, refusal: &Refusal, offers_ours: bool) -> Response {
    let relay = &edge.relay;
    let Some(code) = refused_after_upgrade(relay, refusal) else {
        return refuse(&relay.metrics, refusal);
    };
    let text = refusal.text();
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let config = ws_config(&relay.settings().config.limits);
    let on_upgrade = hyper::upgrade::on(req);
    relay.tracker.spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        // Bounded: the close frame, then the client's close reply (or its end).
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: text.into(),
            };
            if ws.send(Message::Close(Some(frame))).await.is_err() {
                return;
            }
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
    });
    switching_protocols(key.as_ref(), offers_ours)
}

/// The `101 Switching Protocols` answer to a WebSocket request.
fn switching_protocols(key: Option<&HeaderValue>, offers_ours: bool) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Some(key) = key
        && let Ok(v) = HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
    {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if offers_ours {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    resp
}
