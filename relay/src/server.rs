//! The client listener: accept loop (TCP_NODELAY, optional TLS, handshake timeout, cap on
//! handshakes in flight) and the upgrade handler (drain, limits per client address, per
//! process and per token subject, auth, then the WebSocket upgrade).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tracing::Instrument;

use crate::auth::TokenVia;
use crate::config::Limits;
use crate::limits::{client_ip, ip_key, is_trusted_proxy};
use crate::outbox::Outbox;
use crate::protocol::{SUBPROTOCOL, close};
use crate::relay::Relay;
use crate::tls::TlsAcceptor;

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

/// The client-facing router: the WebSocket path, and under it the SSE fallback
/// (`<path>/sse`, `<path>/sse/{session}`).
pub fn router(relay: Arc<Relay>, path: &str) -> Router {
    Router::new()
        .route(path, get(upgrade))
        .with_state(relay.clone())
        .merge(crate::sse::router(relay, path))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                [(header::CONNECTION, "close")],
                "not found",
            )
        })
}

/// Set on each request: a handler that answers with a long-lived stream (SSE) notifies it,
/// and the connection leaves the handshake timeout and the handshakes-in-flight count.
#[derive(Debug, Clone)]
pub struct StreamHandoff(pub Arc<tokio::sync::Notify>);

pub(crate) fn refuse(
    relay: &Relay,
    status: StatusCode,
    reason: &'static str,
    retry_after: Option<u64>,
) -> Response {
    relay.metrics.refuse(reason);
    tracing::debug!(status = status.as_u16(), reason, "handshake refused");
    let mut resp = (status, reason).into_response();
    // One request per connection: close after a refusal, so that only a stalled
    // handshake ever meets the handshake timeout.
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    if let Some(s) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    resp
}

/// A refusal of a valid WebSocket request: an HTTP status, or, with
/// `auth.refuseAfterUpgrade`, an upgrade closed at once with a 4xxx code and a readable reason
/// (browsers show a refused upgrade only as 1006). Counted in the same refusal metric; the
/// connection is never registered, so it cannot subscribe and is not in `wsrelay_connections`.
fn refuse_ws(
    relay: &Arc<Relay>,
    req: &mut Request,
    status: StatusCode,
    reason: &'static str,
    retry_after: Option<u64>,
) -> Response {
    let code = refusal_close_code(status);
    let Some(code) = code.filter(|_| relay.live().config.auth.refuse_after_upgrade) else {
        return refuse(relay, status, reason, retry_after);
    };
    relay.metrics.refuse(reason);
    tracing::debug!(close = code, reason, "handshake refused after the upgrade");
    let text = refusal_text(reason);
    let offers_ours = header_has_token(req.headers(), header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL);
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let config = ws_config(&relay.live().config.limits);
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

/// The close code that stands for an HTTP refusal after the upgrade.
pub(crate) fn refusal_close_code(status: StatusCode) -> Option<u16> {
    match status {
        StatusCode::UNAUTHORIZED => Some(close::REFUSED_UNAUTHORIZED),
        StatusCode::FORBIDDEN => Some(close::REFUSED_FORBIDDEN),
        StatusCode::TOO_MANY_REQUESTS => Some(close::REFUSED_TOO_MANY),
        StatusCode::SERVICE_UNAVAILABLE => Some(close::REFUSED_UNAVAILABLE),
        _ => None,
    }
}

/// The close reason of a refusal after the upgrade, by metric label. Fixed texts: a reason
/// never carries anything from the request (the token least of all).
pub(crate) fn refusal_text(reason: &'static str) -> &'static str {
    match reason {
        "no_token" => "no token",
        "invalid_token" => "invalid token",
        "origin" => "origin not allowed",
        "keys_unavailable" => "signing keys unavailable, retry later",
        "draining" => "relay draining, retry later",
        "max_connections" => "relay at capacity, retry later",
        "per_ip" => "too many connections from this address",
        "per_subject" => "too many connections for this token subject",
        _ => "refused",
    }
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

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The TCP peer of the connection a request came on (a request extension).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

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

/// The WebSocket handshake, in a span that puts its request id (answered in `X-Request-Id`)
/// on every log line of the handshake and of the connection it opens.
async fn upgrade(State(relay): State<Arc<Relay>>, req: Request) -> Response {
    let id = request_id(req.headers());
    let span = tracing::debug_span!("handshake", request_id = %id);
    let mut resp = handshake(relay, req, span.clone()).instrument(span).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

async fn handshake(relay: Arc<Relay>, mut req: Request, span: tracing::Span) -> Response {
    let peer = req.extensions().get::<Peer>().map(|p| p.0.ip());
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
        return refuse(&relay, StatusCode::BAD_REQUEST, "not_websocket", None);
    }
    if relay.is_draining() {
        return refuse_ws(
            &relay,
            &mut req,
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            Some(1),
        );
    }
    let live = relay.live();
    let limits = &live.config.limits;
    // Per client address first: the cheapest refusal, before any token is verified.
    let ip_guard = match peer {
        Some(peer) => {
            let listen = &live.config.listen;
            let values = req
                .headers()
                .get_all(listen.client_ip_header.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok());
            let ip: IpAddr = client_ip(peer, &listen.trusted_proxies, values);
            match relay
                .per_ip
                .try_acquire(ip_key(ip), limits.max_connections_per_ip)
            {
                Some(g) => Some(g),
                None => {
                    tracing::debug!(%ip, "too many connections from one address");
                    return refuse_ws(
                        &relay,
                        &mut req,
                        StatusCode::TOO_MANY_REQUESTS,
                        "per_ip",
                        Some(5),
                    );
                }
            }
        }
        None => None,
    };
    drop(live);
    let Some(permit) = relay.slots.try_acquire() else {
        return refuse_ws(
            &relay,
            &mut req,
            StatusCode::SERVICE_UNAVAILABLE,
            "max_connections",
            Some(5),
        );
    };
    let live = relay.live();
    let (identity, via) = match live
        .authn
        .authenticate(req.headers(), req.uri().query())
        .await
    {
        Ok(ok) => ok,
        Err(e) => {
            tracing::debug!(error = %e, "refused before upgrade");
            let status = e.status();
            let retry = (status == StatusCode::SERVICE_UNAVAILABLE).then_some(5);
            return refuse_ws(&relay, &mut req, status, e.reason(), retry);
        }
    };
    let sub_guard = match identity.claims.as_ref().and_then(crate::auth::subject) {
        Some(sub) => match relay.per_subject.try_acquire(
            sub.to_owned(),
            live.config.limits.max_connections_per_subject,
        ) {
            Some(g) => Some(g),
            None => {
                tracing::debug!(sub, "too many connections for one token subject");
                return refuse_ws(
                    &relay,
                    &mut req,
                    StatusCode::TOO_MANY_REQUESTS,
                    "per_subject",
                    Some(5),
                );
            }
        },
        None => None,
    };
    // Select our subprotocol when offered (browsers that send a token in
    // Sec-WebSocket-Protocol must offer it too: the token itself is never echoed).
    let offers_ours = header_has_token(req.headers(), header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL);
    if via == Some(TokenVia::Subprotocol) && !offers_ours {
        return refuse(&relay, StatusCode::BAD_REQUEST, "subprotocol", None);
    }
    let config = ws_config(&live.config.limits);
    let outbox_cap = live.config.limits.send_queue_len as usize;
    let outbox_bytes = usize::try_from(live.config.limits.send_queue_bytes).unwrap_or(usize::MAX);
    let policy = live.config.limits.slow_consumer_policy;
    drop(live);
    let on_upgrade = hyper::upgrade::on(&mut req);
    let relay2 = relay.clone();
    let task = async move {
        // Held for the connection's life: its slot and its counts per address and subject.
        let _held = (permit, ip_guard, sub_guard);
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
        relay2.metrics.accepted.inc();
        let outbox = Arc::new(Outbox::with_budget(
            outbox_cap,
            outbox_bytes,
            policy,
            relay2.queue_budget.clone(),
        ));
        let conn = relay2.register(outbox, identity.claims);
        tracing::debug!(conn = conn.id, "connection accepted");
        let id = conn.id;
        crate::connection::run(ws, relay2.clone(), conn, identity.expires_at)
            .instrument(tracing::debug_span!("connection", conn = id))
            .await;
    };
    relay.tracker.spawn(task.instrument(span));
    switching_protocols(key.as_ref(), offers_ours)
}

/// Socket options for a client connection: no Nagle delay; keepalive probes so a peer that
/// vanished without a FIN is found even when nothing is being sent (30 s idle, then 3 probes
/// 10 s apart); and a TCP user timeout equal to the write timeout, so the kernel gives up on
/// data a peer leaves unacknowledged as soon as the writer would. Best effort.
fn tune_socket(tcp: &tokio::net::TcpStream, write_timeout: Duration) {
    let _ = tcp.set_nodelay(true);
    let sock = socket2::SockRef::from(tcp);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    if let Err(e) = sock.set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = sock.set_tcp_user_timeout(Some(write_timeout)) {
        tracing::debug!(error = %e, "TCP user timeout not set");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = write_timeout;
}

/// Accepts client connections until the relay shuts down. Each TCP connection serves one
/// HTTP/1.1 request (the upgrade) within the handshake timeout (TLS included).
pub async fn serve(listener: TcpListener, relay: Arc<Relay>, tls: Option<TlsAcceptor>) {
    let path = relay.live().config.listen.path.clone();
    let app = router(relay.clone(), &path);
    loop {
        let (tcp, peer) = tokio::select! {
            () = relay.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let live = relay.live();
        let limits = live.config.limits.clone();
        // One address's share first, from the accept on: connects that send nothing from one
        // address cannot hold the whole handshake budget. A trusted proxy speaks for many
        // clients and is not counted.
        let behind_proxy = is_trusted_proxy(peer.ip(), &live.config.listen.trusted_proxies);
        drop(live);
        let share = if behind_proxy {
            None
        } else {
            match relay
                .handshakes_per_ip
                .try_acquire(ip_key(peer.ip()), limits.handshakes_per_ip())
            {
                Some(g) => Some(g),
                None => {
                    refuse_handshake(&relay, tcp, tls.is_some(), "handshakes_per_ip");
                    continue;
                }
            }
        };
        tune_socket(&tcp, Duration::from_secs(limits.write_timeout_seconds));
        let app = app.clone();
        let tls = tls.clone();
        let handshake = Duration::from_secs(limits.handshake_timeout_seconds);
        let relay2 = relay.clone();
        relay.tracker.spawn(async move {
            let mut share = share;
            // A slot of `maxHandshakesInFlight` only once the client has sent something.
            // The handshake timeout counts from the accept, the wait for first bytes included.
            let deadline = tokio::time::Instant::now() + handshake;
            let first = handshake.min(FIRST_BYTES_WITHIN);
            if !matches!(
                tokio::time::timeout(first, tcp.readable()).await,
                Ok(Ok(()))
            ) {
                relay2.metrics.refuse("handshake_timeout");
                tracing::debug!(%peer, "nothing sent after the TCP connect");
                return;
            }
            let Some(in_flight) = relay2
                .handshakes
                .try_enter(limits.max_handshakes_in_flight as usize)
            else {
                refuse_handshake(&relay2, tcp, tls.is_some(), "handshakes");
                return;
            };
            let mut _in_flight = Some(in_flight);
            relay2
                .metrics
                .handshakes_in_flight
                .set(relay2.handshakes.get() as i64);
            let handoff = Arc::new(tokio::sync::Notify::new());
            let handoff2 = handoff.clone();
            // The router, with the peer address as a request extension.
            let svc =
                hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(Peer(peer));
                    req.extensions_mut().insert(StreamHandoff(handoff2.clone()));
                    let mut app = app.clone();
                    tower_service::Service::call(&mut app, req)
                });
            let fut = async {
                // Keep-alive stays on: turning it off makes hyper answer the upgrade with
                // `Connection: close`. The handshake timeout bounds the connection anyway.
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    Some(acceptor) => match acceptor.accept(tcp).await {
                        Ok(stream) => {
                            let _ = http
                                .serve_connection(TokioIo::new(stream), svc)
                                .with_upgrades()
                                .await;
                        }
                        Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    },
                    None => {
                        let _ = http
                            .serve_connection(TokioIo::new(tcp), svc)
                            .with_upgrades()
                            .await;
                    }
                }
            };
            tokio::pin!(fut);
            let timed_out = tokio::select! {
                () = &mut fut => false,
                () = tokio::time::sleep_until(deadline) => true,
                // An SSE stream: served for its life, which its session bounds.
                () = handoff.notified() => {
                    drop(_in_flight.take());
                    drop(share.take());
                    relay2
                        .metrics
                        .handshakes_in_flight
                        .set(relay2.handshakes.get() as i64);
                    fut.await;
                    false
                }
            };
            if timed_out {
                relay2.metrics.refuse("handshake_timeout");
                tracing::debug!(%peer, "handshake timed out");
            }
            drop(_in_flight);
            relay2
                .metrics
                .handshakes_in_flight
                .set(relay2.handshakes.get() as i64);
        });
    }
}

/// How long a new TCP connection may stay silent before it is closed; it takes a handshake
/// slot only once it has sent something (`limits.handshakeTimeoutSeconds`, if shorter).
pub const FIRST_BYTES_WITHIN: Duration = Duration::from_secs(5);

/// Refuses a TCP connection over a handshake limit, counted under `reason`. On ws:// a fixed
/// answer costs nothing; on wss:// answering would need the TLS handshake the limit protects
/// against: close.
fn refuse_handshake(relay: &Relay, tcp: tokio::net::TcpStream, tls: bool, reason: &'static str) {
    relay.metrics.refuse(reason);
    tracing::debug!(reason, "handshake limit reached");
    if !tls {
        relay.tracker.spawn(refuse_raw(tcp));
    }
}

/// Answers a plain-TCP client 503 without reading its request (a handshake limit), bounded
/// in time. What the client sent is read and dropped until it closes too: closing with
/// unread bytes would send a reset that can overtake the answer.
async fn refuse_raw(mut tcp: tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    const ANSWER: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: 10\r\n\r\nhandshakes";
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        tcp.write_all(ANSWER).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 1024];
        while tcp.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}
