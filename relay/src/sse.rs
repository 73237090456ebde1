//! The fallback transport for networks that block WebSockets: Server-Sent Events for relay to
//! client (`GET <path>/sse`) and one HTTP POST per client frame (`POST <path>/sse/<session>`),
//! same frames, same authentication, same limits.
//!
//! A session *is* a connection: it is admitted like an upgrade (drain, per address, per
//! process, token, per subject), registered, counted, and served by the very same connection
//! loop (`connection::run`) over an in-memory WebSocket pair. A bridge task carries the
//! relay's frames to the event stream (`data:` lines), the relay's WebSocket pings as SSE
//! comments (heartbeats; the bridge's pong keeps the session from idling out while its stream
//! is open), and the close frame as a `close` event; POSTed frames go the other way. The
//! session ends when its stream ends (the client left), or when the connection closes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::auth::Identity;
use crate::limits::{client_ip, ip_key};
use crate::outbox::{CloseRequest, Outbox};
use crate::protocol::close;
use crate::relay::{ConnShared, Relay};
use crate::server::{Peer, StreamHandoff, refusal_close_code, refusal_text, refuse, ws_config};

/// Frames POSTed to one session that may wait for its connection loop.
const INBOX: usize = 16;
/// Event-stream chunks that may wait for the HTTP connection.
const BODY_CHUNKS: usize = 16;
/// How long a POST may wait for room in its session's inbox.
const POST_WAIT: Duration = Duration::from_secs(5);
/// Bytes of the in-memory WebSocket pair between the bridge and the connection loop.
const PIPE_BYTES: usize = 64 * 1024;

/// One open session, as a POST finds it.
struct Session {
    conn: Arc<ConnShared>,
    inbox: mpsc::Sender<Message>,
}

/// The state of the SSE routes.
#[derive(Clone)]
struct Sse {
    relay: Arc<Relay>,
    sessions: Arc<Mutex<HashMap<String, Session>>>,
}

impl Sse {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The SSE routes under the WebSocket path: `GET <path>/sse`, `POST <path>/sse/{session}`.
pub fn router(relay: Arc<Relay>, path: &str) -> Router {
    let base = path.trim_end_matches('/');
    let state = Sse {
        relay,
        sessions: Arc::default(),
    };
    Router::new()
        .route(&format!("{base}/sse"), get(open))
        .route(
            &format!("{base}/sse/{{session}}"),
            post(frame).options(preflight),
        )
        .with_state(state)
}

/// CORS for a cross-origin page. An origin the allowlist names is echoed with credentials
/// (the cookie token source); with no allowlist, or `*` in it, any origin is echoed without
/// credentials; any other origin gets no CORS header at all. A reflected origin never comes
/// with credentials unless the list names it.
fn cors(relay: &Relay, req: &HeaderMap, resp: &mut Response) {
    let Some(origin) = req.get(header::ORIGIN) else {
        return;
    };
    let live = relay.live();
    let allowed = &live.config.auth.allowed_origins;
    let listed = origin.to_str().is_ok_and(|o| {
        allowed
            .iter()
            .any(|a| a != "*" && a.eq_ignore_ascii_case(o))
    });
    let open = allowed.is_empty() || allowed.iter().any(|a| a == "*");
    if !listed && !open {
        return;
    }
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    if listed {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
}

/// One SSE event holding `text` (split into `data:` lines: a frame's payload may hold line
/// breaks, which EventSource joins back with `\n`, equivalent JSON whitespace).
fn event(name: Option<&str>, text: &str) -> Bytes {
    let mut out = String::with_capacity(text.len() + 16);
    if let Some(n) = name {
        out.push_str("event: ");
        out.push_str(n);
        out.push('\n');
    }
    for line in text.split(['\n', '\r']) {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

fn close_event(code: u16, reason: &str) -> Bytes {
    event(
        Some("close"),
        &serde_json::json!({ "code": code, "reason": reason }).to_string(),
    )
}

/// An event-stream response over `rx`.
fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    // nginx (ingress-nginx) buffers responses unless told not to.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    // One session per TCP connection: when the stream ends, so does the socket. Another
    // request on it would skip the handshake limits, and an idle kept-alive socket would be
    // counted nowhere.
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// A refused stream: an HTTP status, or with `auth.refuseAfterUpgrade` a stream that holds
/// only a `close` event with the 4xxx code and a readable reason (EventSource cannot read a
/// status either).
fn refuse_stream(
    relay: &Relay,
    status: StatusCode,
    reason: &'static str,
    retry_after: Option<u64>,
) -> Response {
    let code = refusal_close_code(status);
    let Some(code) = code.filter(|_| relay.live().config.auth.refuse_after_upgrade) else {
        return refuse(relay, status, reason, retry_after);
    };
    relay.metrics.refuse(reason);
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(close_event(code, refusal_text(reason)));
    stream_response(rx)
}

/// What an admitted session holds for its life.
struct Admitted {
    held: Box<dyn Send + Sync>,
    identity: Identity,
}

/// The upgrade's admission, in the same order: draining, per client address, per process,
/// token (Origin, signature, claims), per token subject.
async fn admit(
    relay: &Arc<Relay>,
    req: &http::request::Parts,
) -> Result<Admitted, (StatusCode, &'static str, Option<u64>)> {
    if relay.is_draining() {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "draining", Some(1)));
    }
    let peer = req.extensions.get::<Peer>().map(|p| p.0.ip());
    let ip_guard = match peer {
        Some(peer) => {
            let live = relay.live();
            let listen = &live.config.listen;
            let values = req
                .headers
                .get_all(listen.client_ip_header.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok());
            let ip = client_ip(peer, &listen.trusted_proxies, values);
            match relay
                .per_ip
                .try_acquire(ip_key(ip), live.config.limits.max_connections_per_ip)
            {
                Some(g) => Some(g),
                None => return Err((StatusCode::TOO_MANY_REQUESTS, "per_ip", Some(5))),
            }
        }
        None => None,
    };
    let Some(permit) = relay.slots.try_acquire() else {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "max_connections", Some(5)));
    };
    let authn = relay.live().authn.clone();
    let (identity, _via) = authn
        .authenticate(&req.headers, req.uri.query())
        .await
        .map_err(|e| {
            tracing::debug!(error = %e, "SSE session refused");
            let status = e.status();
            let retry = (status == StatusCode::SERVICE_UNAVAILABLE).then_some(5);
            (status, e.reason(), retry)
        })?;
    let sub_guard = match identity.claims.as_ref().and_then(crate::auth::subject) {
        Some(sub) => {
            let max = relay.live().config.limits.max_connections_per_subject;
            match relay.per_subject.try_acquire(sub.to_owned(), max) {
                Some(g) => Some(g),
                None => return Err((StatusCode::TOO_MANY_REQUESTS, "per_subject", Some(5))),
            }
        }
        None => None,
    };
    Ok(Admitted {
        held: Box::new((permit, ip_guard, sub_guard)),
        identity,
    })
}

/// `GET <path>/sse`: opens a session. The first event is `session` with its id and the URL
/// path to POST frames to; then the connection's frames, as `data:` events.
async fn open(State(sse): State<Sse>, req: Request) -> Response {
    let relay = sse.relay.clone();
    let (req, _) = req.into_parts();
    let admitted = match admit(&relay, &req).await {
        Ok(a) => a,
        Err((status, reason, retry)) => {
            let mut resp = refuse_stream(&relay, status, reason, retry);
            cors(&relay, &req.headers, &mut resp);
            return resp;
        }
    };
    let live = relay.live();
    let limits = live.config.limits.clone();
    drop(live);
    let outbox = Arc::new(Outbox::with_budget(
        limits.send_queue_len as usize,
        usize::try_from(limits.send_queue_bytes).unwrap_or(usize::MAX),
        limits.slow_consumer_policy,
        relay.queue_budget.clone(),
    ));
    let conn = relay.register(outbox, admitted.identity.claims);
    relay.metrics.accepted.inc();
    let id = format!("{:032x}", rand::random::<u128>());
    let (inbox_tx, inbox_rx) = mpsc::channel(INBOX);
    sse.sessions().insert(
        id.clone(),
        Session {
            conn: conn.clone(),
            inbox: inbox_tx,
        },
    );
    let (body_tx, body_rx) = mpsc::channel(BODY_CHUNKS);
    let post = format!("{}/{id}", req.uri.path().trim_end_matches('/'));
    let _ = body_tx.try_send(event(
        Some("session"),
        &serde_json::json!({ "session": id, "post": post }).to_string(),
    ));
    // The pair: the connection loop on one end, the bridge on the other.
    let (server_io, client_io) = tokio::io::duplex(PIPE_BYTES);
    let config = ws_config(&limits);
    let expires_at = admitted.identity.expires_at;
    let held = admitted.held;
    let relay2 = relay.clone();
    let conn2 = conn.clone();
    relay.tracker.spawn(async move {
        let _held = held;
        let ws = WebSocketStream::from_raw_socket(server_io, Role::Server, Some(config)).await;
        crate::connection::run(ws, relay2, conn2, expires_at).await;
    });
    let write_timeout = Duration::from_secs(limits.write_timeout_seconds);
    let sse2 = sse.clone();
    relay.tracker.spawn(async move {
        let ws = WebSocketStream::from_raw_socket(client_io, Role::Client, Some(config)).await;
        bridge(ws, inbox_rx, body_tx, write_timeout).await;
        sse2.sessions().remove(&id);
    });
    if let Some(h) = req.extensions.get::<StreamHandoff>() {
        h.0.notify_one();
    }
    let mut resp = stream_response(body_rx);
    cors(&relay, &req.headers, &mut resp);
    resp
}

/// Carries frames between the connection loop's WebSocket and the session's HTTP exchanges
/// until either side ends.
async fn bridge<S>(
    ws: WebSocketStream<S>,
    mut inbox: mpsc::Receiver<Message>,
    body: mpsc::Sender<Bytes>,
    write_timeout: Duration,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    // A chunk for the event stream, bounded like a socket write: a client that stopped
    // reading ends its session.
    let emit = |b: Bytes| {
        let body = body.clone();
        async move {
            matches!(
                tokio::time::timeout(write_timeout, body.send(b)).await,
                Ok(Ok(()))
            )
        }
    };
    loop {
        tokio::select! {
            // The event stream ended: the client left. Close the connection as a client would.
            () = body.closed() => {
                let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(None))).await;
                return;
            }
            m = inbox.recv() => {
                let Some(m) = m else { return };
                if sink.send(m).await.is_err() {
                    return;
                }
            }
            m = stream.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if !emit(event(None, t.as_str())).await {
                        return;
                    }
                }
                // The relay's heartbeat; tungstenite answers the ping on the next read.
                Some(Ok(Message::Ping(_))) => {
                    if !emit(Bytes::from_static(b": ping\n\n")).await {
                        return;
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((close::NORMAL, String::new()));
                    let _ = emit(close_event(code, &reason)).await;
                    // Finish the close handshake so the connection loop ends at once.
                    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            },
        }
    }
}

/// `OPTIONS <path>/sse/{session}`: the CORS preflight of a POST with an `Authorization`
/// header (a POST with the token in the query and `Content-Type: text/plain` needs none).
async fn preflight(State(sse): State<Sse>, headers: HeaderMap) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    if crate::auth::check_origin(&sse.relay.live().config.auth.allowed_origins, &headers).is_err() {
        *resp.status_mut() = StatusCode::FORBIDDEN;
        return resp;
    }
    cors(&sse.relay, &headers, &mut resp);
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    resp
}

/// An answer to a POST; one request per TCP connection, so a browser's idle keep-alive
/// connection never holds a handshake slot.
fn answer(relay: &Relay, headers: &HeaderMap, status: StatusCode, text: &'static str) -> Response {
    let mut resp = (status, text).into_response();
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    cors(relay, headers, &mut resp);
    resp
}

/// `POST <path>/sse/{session}`: one client frame, authenticated as the stream was (the same
/// identity: `iss` and `sub`, or anonymous for an anonymous session). Answered 202; the reply
/// comes on the stream.
async fn frame(State(sse): State<Sse>, Path(session): Path<String>, req: Request) -> Response {
    let relay = sse.relay.clone();
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    // The origin first: a page of another origin learns nothing, not even whether the
    // session exists.
    if let Err(e) = crate::auth::check_origin(&relay.live().config.auth.allowed_origins, &headers) {
        return answer(&relay, &headers, e.status(), e.reason());
    }
    let session = sse
        .sessions()
        .get(&session)
        .map(|s| (s.conn.clone(), s.inbox.clone()));
    let Some((conn, inbox)) = session else {
        return answer(&relay, &headers, StatusCode::NOT_FOUND, "no such session");
    };
    let authn = relay.live().authn.clone();
    let same = match authn.authenticate(&headers, parts.uri.query()).await {
        Ok((identity, _)) => match (&conn.claims, &identity.claims) {
            (None, None) => true,
            (Some(old), Some(new)) => crate::auth::same_identity(old, new),
            _ => false,
        },
        Err(e) => {
            return answer(&relay, &headers, e.status(), e.reason());
        }
    };
    if !same {
        return answer(&relay, &headers, StatusCode::FORBIDDEN, "another identity");
    }
    let max = relay.live().config.limits.max_message_bytes as usize;
    let bytes = match axum::body::to_bytes(body, max).await {
        Ok(b) => b,
        Err(_) => {
            // As a WebSocket frame over the limit would: the connection closes with 1009.
            conn.outbox.close(CloseRequest {
                code: close::TOO_BIG,
                reason: "message too big",
                flush_first: false,
            });
            return answer(
                &relay,
                &headers,
                StatusCode::PAYLOAD_TOO_LARGE,
                "message too big",
            );
        }
    };
    let msg = match std::str::from_utf8(&bytes) {
        Ok(t) => Message::text(t),
        // Answered on the stream, as a binary WebSocket frame is.
        Err(_) => Message::Binary(bytes),
    };
    match tokio::time::timeout(POST_WAIT, inbox.send(msg)).await {
        Ok(Ok(())) => answer(&relay, &headers, StatusCode::ACCEPTED, ""),
        Ok(Err(_)) => answer(&relay, &headers, StatusCode::NOT_FOUND, "no such session"),
        Err(_) => answer(&relay, &headers, StatusCode::SERVICE_UNAVAILABLE, "busy"),
    }
}
