//! The fallback transport for networks that block WebSockets: Server-Sent Events for relay to
//! client (`GET <path>/sse`) and one HTTP POST per client frame (`POST <path>/sse/<session>`),
//! same frames, same authentication, same limits.
//!
//! A session *is* a connection: it is admitted like an upgrade (`edge::admit`), registered,
//! counted, and served by the one session loop (`crate::session::run`) over the SSE
//! transport ([`transport`]). The session ends when its stream ends (the client left), or
//! when the connection closes. Its id ([`id`]) names the relay that holds it, so a POST
//! that reaches another relay is forwarded there over NATS ([`forward`]) and decided as a
//! local one ([`post`]).

pub mod event_id;
pub mod forward;
pub mod id;
pub mod post;
pub mod transport;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::Edge;
use super::admit::{Asking, Refusal, admit};
use super::http::{Peer, StreamHandoff, refuse, refused_after_upgrade};
use crate::conn::Conn;
use crate::state::Relay;
use id::SessionId;
use post::{Answer, Post};
use transport::{close_event, event};

/// Frames POSTed to one session that may wait for its connection loop.
const INBOX: usize = 16;
/// Event-stream chunks that may wait for the HTTP connection.
const BODY_CHUNKS: usize = 16;
/// How long a POST may wait for room in its session's inbox.
const POST_WAIT: Duration = Duration::from_secs(5);

/// One open session, as a POST finds it.
#[derive(Debug)]
struct Session {
    conn: Arc<Conn>,
    inbox: mpsc::Sender<Message>,
}

/// The sessions this relay holds, and what names them: this relay's token (the first part
/// of their ids) and the subject prefix forwarded POSTs travel under.
#[derive(Debug)]
pub struct Sessions {
    map: Mutex<HashMap<SessionId, Session>>,
    own: String,
    forward_prefix: String,
}

impl Sessions {
    /// The sessions of the relay named `relay` (its name, as in connection ids), whose
    /// forwarded POSTs travel under `forward_prefix` (`listen.sseForwardSubject`).
    pub fn new(relay: &str, forward_prefix: &str) -> Self {
        Self {
            map: Mutex::default(),
            own: crate::config::relay_token(relay),
            forward_prefix: forward_prefix.to_owned(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Session>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// This relay's token, as session ids name it.
    pub fn own(&self) -> &str {
        &self.own
    }

    /// `listen.sseForwardSubject` at the start.
    pub fn forward_prefix(&self) -> &str {
        &self.forward_prefix
    }

    fn get(&self, id: &SessionId) -> Option<(Arc<Conn>, mpsc::Sender<Message>)> {
        self.lock()
            .get(id)
            .map(|s| (s.conn.clone(), s.inbox.clone()))
    }

    fn holds(&self, id: &SessionId) -> bool {
        self.lock().contains_key(id)
    }
}

/// The state of the SSE routes.
#[derive(Clone)]
struct Sse {
    edge: Arc<Edge>,
}

impl Sse {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Session>> {
        self.edge.sessions.lock()
    }
}

/// The SSE routes under the WebSocket path: `GET <path>/sse`, `POST <path>/sse/{session}`.
pub fn router(edge: Arc<Edge>, path: &str) -> Router {
    let base = path.trim_end_matches('/');
    let state = Sse { edge };
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
    let live = relay.settings();
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

/// An event-stream response over `rx`; `gone` is cancelled when hyper drops the body (the
/// client left, or the stream ended).
fn stream_response(rx: mpsc::Receiver<Bytes>, gone: CancellationToken) -> Response {
    let body = futures::stream::unfold((rx, gone.drop_guard()), |(mut rx, guard)| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(b), (rx, guard)))
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
fn refuse_stream(relay: &Relay, refusal: &Refusal) -> Response {
    let Some(code) = refused_after_upgrade(relay, refusal) else {
        return refuse(&relay.metrics, refusal);
    };
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(close_event(code, refusal.text()));
    stream_response(rx, CancellationToken::new())
}

/// `GET <path>/sse`: opens a session. The first event is `session` with its id and the URL
/// path to POST frames to; then the connection's frames, as `data:` events.
async fn open(State(sse): State<Sse>, req: Request) -> Response {
    let edge = sse.edge.clone();
    let relay = &edge.relay;
    let (req, _) = req.into_parts();
    let asking = Asking {
        headers: &req.headers,
        query: req.uri.query(),
        peer: req.extensions.get::<Peer>().map(|p| p.0),
        // A stream is all a bare EventSource or `curl -N` has: it gets the
        // auto-subscriptions unless it says `autoSubscribe=false` (the SDK does).
        auto_by_default: true,
    };
    let admitted = match admit(relay, &edge.admission, asking).await {
        Ok(a) => a,
        Err(refusal) => {
            let mut resp = refuse_stream(relay, &refusal);
            cors(relay, &req.headers, &mut resp);
            return resp;
        }
    };
    let held = admitted.held;
    let (conn, resumed) = edge
        .open(admitted.identity.claims, admitted.resume.as_deref())
        .await;
    let id = SessionId::new(edge.sessions.own());
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
        &serde_json::json!({ "session": id.as_str(), "post": post }).to_string(),
    ));
    let gone = CancellationToken::new();
    // Event ids (positions to resume from) when the session is auto-subscribed.
    let ids = admitted.auto.is_some();
    let (sink, stream) = transport::transport(body_tx, inbox_rx, gone.clone(), ids);
    let expires_at = admitted.identity.expires_at;
    let welcome = crate::session::Welcome {
        data: admitted.data,
        resumed,
        auto: admitted.auto,
    };
    let (relay2, sse2) = (relay.clone(), sse.clone());
    relay.tracker.spawn(async move {
        crate::session::run(sink, stream, relay2, conn, expires_at, welcome).await;
        sse2.sessions().remove(&id);
        drop(held);
    });
    if let Some(h) = req.extensions.get::<StreamHandoff>() {
        h.0.notify_one();
    }
    let mut resp = stream_response(body_rx, gone);
    cors(relay, &req.headers, &mut resp);
    resp
}

/// `OPTIONS <path>/sse/{session}`: the CORS preflight of a POST with an `Authorization`
/// header (a POST with the token in the query and `Content-Type: text/plain` needs none).
async fn preflight(State(sse): State<Sse>, headers: HeaderMap) -> Response {
    let relay = &sse.edge.relay;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    if crate::auth::check_origin(&relay.settings().config.auth.allowed_origins, &headers).is_err() {
        *resp.status_mut() = StatusCode::FORBIDDEN;
        return resp;
    }
    cors(relay, &headers, &mut resp);
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
fn answer(relay: &Relay, headers: &HeaderMap, a: Answer) -> Response {
    let mut resp = super::http::answer(a.status, a.text);
    cors(relay, headers, &mut resp);
    resp
}

/// `POST <path>/sse/{session}`: one client frame, authenticated as the stream was (the same
/// identity: `iss` and `sub`, or anonymous for an anonymous session). Answered 202; the reply
/// comes on the stream. Decided here when the session is here ([`Post::apply`]), else by the
/// relay its id names ([`forward::forward`]).
async fn frame(State(sse): State<Sse>, Path(session): Path<String>, req: Request) -> Response {
    let relay = sse.edge.relay.clone();
    let (parts, body) = req.into_parts();
    let headers = parts.headers;
    // The origin first: a page of another origin learns nothing, not even whether the
    // session exists, and its POST goes no further than this relay (the session's relay
    // checks a forwarded POST's origin again, `Post::apply`).
    if let Err(e) =
        crate::auth::check_origin(&relay.settings().config.auth.allowed_origins, &headers)
    {
        return answer(&relay, &headers, Answer::of(e.status(), e.reason()));
    }
    let token = match relay.settings().authn.token_of(&headers, parts.uri.query()) {
        Ok(t) => t,
        Err(e) => return answer(&relay, &headers, Answer::of(e.status(), e.reason())),
    };
    // Checked before it goes anywhere (a subject, a header, a log).
    let Some(session) = SessionId::parse(&session) else {
        return answer(&relay, &headers, Answer::no_session());
    };
    let max = relay.settings().config.limits.max_message_bytes as usize;
    let body = match axum::body::to_bytes(body, max).await {
        Ok(b) => post::Body::Frame(b),
        Err(_) => post::Body::TooBig,
    };
    let post = Post {
        session,
        origin: headers
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .map(str::to_owned),
        token,
        body,
    };
    let sessions = &sse.edge.sessions;
    let a = if sessions.holds(&post.session) || post.session.owner() == sessions.own() {
        post.apply(&relay, sessions).await
    } else {
        forward::forward(&relay, sessions, &post).await
    };
    answer(&relay, &headers, a)
}
