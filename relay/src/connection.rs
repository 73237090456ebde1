//! One WebSocket connection: a reader that handles requests, and one writer task that
//! drains the connection's queue, feeding many frames and flushing once. While the writer is
//! idle with nothing queued, a fan-out may write a message itself (`sink::deliver`).
//!
//! Closing follows one sequence, described on [`CloseRequest`] and in docs/protocol.md
//! section 6: whoever decides asks the outbox with a [`Cause`]; the writer flushes or is
//! killed, sends the close frame (bounded), and ends; the reader lingers for the client's
//! close reply (bounded); `run` unregisters and counts the close under its label.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use futures::stream::SplitStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use crate::authz::{AuthzError, Operation};
use crate::hub::Target;
use crate::limits::{RequestLimiter, Verdict};
use crate::metrics::{Op, Reason};
use crate::outbox::{
    CLOSE_FRAME_WITHIN, Cause, CloseRequest, Frame, KILLED_CLOSE_WITHIN, LINGER_WITHIN,
    TOO_BIG_HOLD,
};
use crate::protocol::{self, ErrorCode, Request, RequestId};
use crate::relay::{ConnShared, Relay};
use crate::sink::SharedSink;

/// Frames taken from the queue per write batch.
const BATCH: usize = 64;

/// Runs a connection to its end. `io` is the upgraded stream.
pub async fn run<S>(
    ws: WebSocketStream<S>,
    relay: Arc<Relay>,
    conn: Arc<ConnShared>,
    expires_at: Option<u64>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let live = relay.live();
    let limits = live.config.limits.clone();
    drop(live);
    let (sink, stream) = ws.split();
    let sink = Arc::new(SharedSink::new(sink));
    let _ = conn.sink.set(sink.clone());
    conn.outbox
        .push_reply(Message::text(protocol::encode_welcome(
            limits.max_message_bytes,
            conn.claims.is_none(),
        )));
    let done = CancellationToken::new();
    // The writer is a task of its own: joined with the reader in one task, every delivery's
    // wake-up also polled the reader (its socket, idle and expiry timers, cancellation),
    // which cost more than the delivery's own user-space work. This task still waits for it.
    let writer = tokio::spawn({
        let (conn, relay, done) = (conn.clone(), relay.clone(), done.clone());
        let ping_every = Duration::from_secs(limits.ping_interval_seconds);
        let write_timeout = Duration::from_secs(limits.write_timeout_seconds);
        async move {
            let why = crate::task::catch(
                "writer",
                &relay.metrics,
                write_loop(&sink, &conn, &relay, ping_every, write_timeout),
            )
            .await
            .unwrap_or("internal_error");
            // The socket closes once both halves are gone: not kept open by fan-outs that
            // still hold the connection.
            sink.release();
            done.cancel();
            why
        }
    });
    // Whatever ended the reader, make sure the writer ends too (a no-op when a close was
    // requested already: the first request wins). A panic in a request's handling ends
    // this connection with 1011 and nothing else.
    let read = crate::task::catch(
        "reader",
        &relay.metrics,
        read_loop(
            stream,
            &conn,
            &relay,
            &done,
            Duration::from_secs(limits.idle_timeout_seconds),
            expires_at,
        ),
    );
    let cause = match read.await {
        Some(()) => Cause::PeerGone,
        None => Cause::Internal,
    };
    conn.outbox.close(cause.request());
    let why = writer.await.unwrap_or("internal_error");
    relay.unregister(&conn);
    relay
        .metrics
        .closed
        .get_or_create(&Reason { reason: why })
        .inc();
    tracing::debug!(conn = conn.id, reason = why, "connection closed");
}

/// How a bounded write ended.
#[derive(Debug)]
enum WriteEnd {
    /// The socket failed.
    Error,
    /// No progress within the write timeout: the peer takes no bytes.
    Timeout,
}

impl WriteEnd {
    fn label(&self) -> &'static str {
        match self {
            Self::Error => "write_error",
            Self::Timeout => "write_timeout",
        }
    }
}

/// One sink call (`feed` of a frame, or `flush`) bounded by the write timeout. The call is
/// polled once first: a write that completes at once (nearly all of them) neither reads the
/// clock nor creates a timer; one that has to wait gets `within` from then.
async fn bounded<F>(within: Duration, call: F) -> Result<(), WriteEnd>
where
    F: std::future::Future<Output = Result<(), tungstenite::Error>>,
{
    let mut call = std::pin::pin!(call);
    let at_once = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match call.as_mut().poll(cx) {
            std::task::Poll::Ready(r) => Some(r),
            std::task::Poll::Pending => None,
        })
    })
    .await;
    let done = match at_once {
        Some(r) => Ok(r),
        None => tokio::time::timeout(within, call).await,
    };
    match done {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(write_end(&e)),
        Err(_) => Err(WriteEnd::Timeout),
    }
}

/// A failed write's label. The kernel's TCP user timeout (set to the write timeout, see
/// `server::tune_socket`) ends a write to a peer that takes no bytes with ETIMEDOUT, at the
/// moment our own deadline would: the same cause, so the same label, whichever fires first.
fn write_end(e: &tungstenite::Error) -> WriteEnd {
    match e {
        tungstenite::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            WriteEnd::Timeout
        }
        _ => WriteEnd::Error,
    }
}

async fn write_loop(
    sink: &SharedSink,
    conn: &ConnShared,
    relay: &Relay,
    ping_every: Duration,
    write_timeout: Duration,
) -> &'static str {
    let outbox = &conn.outbox;
    let metrics = &relay.metrics;
    // The ping schedule lives in the outbox: a fan-out that writes a message itself sends a
    // due ping with it, and so does a batch here. Pings must keep flowing under load: the
    // client's pongs are what keep a receive-only client within the idle timeout.
    outbox.start_pings(ping_every);
    let ping = tokio::time::sleep(ping_every);
    tokio::pin!(ping);
    let mut received: Vec<Instant> = Vec::new();
    // The batch being written: the queue's own buffer, swapped out (`Outbox::take_into`).
    let mut frames: VecDeque<Frame> = VecDeque::new();
    // Created once: a fresh one per batch registered and unregistered a waiter per message.
    let killed = outbox.killed();
    tokio::pin!(killed);
    loop {
        let mut send_ping = false;
        tokio::select! {
            // The queue first: under load it is nearly always ready, and then the ping
            // timer is not polled (nor a branch order drawn at random) per delivery.
            biased;
            () = outbox.wait() => {}
            () = &mut ping => send_ping = true,
        }
        if send_ping {
            // Unless a message took the ping with it since: the timer only wakes the writer
            // when the outbox's schedule says.
            match outbox.take_ping(Instant::now()) {
                Ok(next) => ping.as_mut().reset(next.into()),
                Err(due) => {
                    ping.as_mut().reset(due.into());
                    continue;
                }
            }
            // Every write, the ping included, is bounded by the write timeout and raced
            // against the kill signal: a peer that stopped taking bytes must not hold the
            // connection (its permit, its subscriptions, its share of the connection
            // gauge) past either.
            let write = async {
                bounded(write_timeout, sink.feed(Message::Ping(Default::default()))).await?;
                bounded(write_timeout, sink.flush()).await
            };
            let r = tokio::select! {
                biased;
                r = write => r,
                () = &mut killed => {
                    let c = outbox.close_request();
                    return send_close(sink, c.as_ref(), KILLED_CLOSE_WITHIN).await;
                }
            };
            if let Err(e) = r {
                return e.label();
            }
            continue;
        }
        // Batch after batch until a look finds nothing: an empty look marks the writer idle
        // (fan-outs may then write themselves).
        loop {
            let batch = outbox.take_into(BATCH, &mut frames);
            if batch.is_idle(frames.len()) {
                break;
            }
            let dropped = batch.dropped;
            received.clear();
            received.extend(frames.iter().filter_map(|f| f.received));
            // A busy connection's ping rides with a batch (its newest message's arrival
            // time stands for the clock: one read fewer per delivery).
            let ping_now = match received.last().map(|t| outbox.take_ping(*t)) {
                Some(Ok(next)) => {
                    ping.as_mut().reset(next.into());
                    true
                }
                _ => false,
            };
            let write = async {
                let mut wrote = batch.flush;
                if ping_now {
                    bounded(write_timeout, sink.feed(Message::Ping(Default::default()))).await?;
                }
                for (channel, count) in &dropped {
                    let notice = Message::text(protocol::encode_dropped(channel, *count));
                    bounded(write_timeout, sink.feed(notice)).await?;
                    wrote = true;
                }
                for f in frames.drain(..) {
                    bounded(write_timeout, sink.feed(f.msg)).await?;
                    wrote = true;
                }
                if wrote {
                    bounded(write_timeout, sink.flush()).await?;
                }
                Ok::<bool, WriteEnd>(wrote)
            };
            // The write first: one that completes at once never looks at `killed`.
            let wrote = tokio::select! {
                biased;
                r = write => r,
                () = &mut killed => {
                    // Blocked on a full socket and told to stop: try a close frame
                    // briefly, then drop the connection.
                    let c = outbox.close_request();
                    return send_close(sink, c.as_ref(), KILLED_CLOSE_WITHIN).await;
                }
            };
            match wrote {
                Err(e) => return e.label(),
                Ok(true) => {
                    let now = Instant::now();
                    for t in &received {
                        metrics
                            .delivery_latency
                            .observe(now.saturating_duration_since(*t).as_secs_f64());
                    }
                    metrics.delivered.inc_by(received.len() as u64);
                }
                Ok(false) => {}
            }
            if let Some(c) = batch.close {
                return send_close(sink, Some(&c), CLOSE_FRAME_WITHIN).await;
            }
        }
        // Going idle: keep no buffer (memory per idle connection; `Outbox::take_into`
        // swaps buffers, so the queue's next push allocates one: once per wake-up).
        frames = VecDeque::new();
    }
}

async fn send_close(sink: &SharedSink, c: Option<&CloseRequest>, within: Duration) -> &'static str {
    let Some(c) = c else {
        return "other";
    };
    if c.sends_frame() {
        let frame = CloseFrame {
            code: CloseCode::from(c.code),
            reason: c.reason.into(),
        };
        let _ = tokio::time::timeout(within, sink.send(Message::Close(Some(frame)))).await;
    }
    c.label()
}

async fn read_loop<S>(
    mut stream: SplitStream<WebSocketStream<S>>,
    conn: &Arc<ConnShared>,
    relay: &Relay,
    done: &CancellationToken,
    idle_timeout: Duration,
    mut expires_at: Option<u64>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let live = relay.live();
    let limits = &live.config.limits;
    // One rate over the requests that cost NATS work (subscribe, unsubscribe, publish).
    let mut limiter = RequestLimiter::new(limits.publish_rate_per_second, limits.publish_burst);
    // Except a connection's first `maxSubscriptionsPerConnection` subscribes: a client that
    // reconnects subscribes again to everything it had at once.
    let mut free_subscribes = limits.max_subscriptions_per_connection;
    drop(live);
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    let expiry = tokio::time::sleep(until_expiry(expires_at));
    tokio::pin!(expiry);
    loop {
        let msg = tokio::select! {
            () = done.cancelled() => return linger(&mut stream).await,
            () = &mut idle => {
                conn.outbox.close(Cause::Idle.request());
                return linger(&mut stream).await;
            }
            () = &mut expiry, if expires_at.is_some() => {
                conn.outbox.close(Cause::TokenExpired.request());
                return linger(&mut stream).await;
            }
            m = stream.next() => m,
        };
        let msg = match msg {
            None => return,
            Some(Err(tungstenite::Error::Capacity(_))) => {
                conn.outbox.close(Cause::TooBig.request());
                // The rest of the oversize message is unread: closing the socket now
                // would send a TCP reset that can overtake the close frame. Hold it open
                // briefly after the writer sent the close.
                let _ = tokio::time::timeout(CLOSE_FRAME_WITHIN, done.cancelled()).await;
                tokio::time::sleep(TOO_BIG_HOLD).await;
                return;
            }
            Some(Err(_)) => return,
            Some(Ok(m)) => m,
        };
        idle.as_mut()
            .reset(tokio::time::Instant::now() + idle_timeout);
        match msg {
            Message::Text(text) => {
                let req = match protocol::parse_request(text.as_str()) {
                    Ok(r) => r,
                    Err(bad) => {
                        reply_error(conn, bad.id.as_ref(), ErrorCode::BadRequest, &bad.reason);
                        continue;
                    }
                };
                let limited = match &req {
                    Request::Subscribe { .. } if free_subscribes > 0 => {
                        free_subscribes -= 1;
                        None
                    }
                    Request::Subscribe { id, .. } => Some(("subscribe", id)),
                    Request::Unsubscribe { id, .. } => Some(("unsubscribe", id)),
                    Request::Publish { id, .. } => Some(("publish", id)),
                    // A JWT verification each (and maybe a JWKS fetch).
                    Request::Refresh { id, .. } => Some(("refresh", id)),
                    Request::Ping { .. } => None,
                };
                if let Some((op, id)) = limited {
                    let verdict = limiter.check();
                    if verdict != Verdict::Allowed {
                        relay.metrics.rate_limited.get_or_create(&Op { op }).inc();
                        if op == "publish" {
                            relay.metrics.drop_msgs("rate_limited", 1);
                        }
                    }
                    match verdict {
                        Verdict::Allowed => {}
                        Verdict::Limited => {
                            reply_error(
                                conn,
                                id.as_ref(),
                                ErrorCode::RateLimited,
                                "request rate exceeded",
                            );
                            continue;
                        }
                        Verdict::Flood => {
                            conn.outbox.close(Cause::Flood.request());
                            return linger(&mut stream).await;
                        }
                    }
                }
                if let Request::Refresh { id, token } = req {
                    // In band: the connection stays, its expiry moves.
                    match Box::pin(refresh(&token, conn, relay)).await {
                        Ok(exp) => {
                            expires_at = Some(exp);
                            expiry
                                .as_mut()
                                .reset(tokio::time::Instant::now() + until_expiry(expires_at));
                            reply_ok(conn, id.as_ref());
                        }
                        Err((code, reason)) => reply_error(conn, id.as_ref(), code, &reason),
                    }
                    continue;
                }
                // Boxed, here and for `refresh`: a request's future (a subscribe waits for
                // NATS and may read a stream) is larger than everything else an idle
                // connection holds. Inline, it sized every connection's task for it:
                // 4,440 bytes, now 1,840 (one allocation per request instead).
                Box::pin(handle(req, conn, relay)).await;
            }
            Message::Binary(_) => {
                reply_error(
                    conn,
                    None,
                    ErrorCode::BadRequest,
                    "binary frames are not supported; send JSON text",
                );
            }
            Message::Close(_) => return,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
        if conn.outbox.is_closing() {
            return linger(&mut stream).await;
        }
    }
}

/// After the relay sent (or is sending) a close frame: keep reading, bounded, until the
/// client's close reply or the end of the stream. Closing the socket with unread client
/// data would send a TCP reset, and the client could lose the close frame.
async fn linger<S>(stream: &mut SplitStream<WebSocketStream<S>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(LINGER_WITHIN, async {
        while let Some(Ok(m)) = stream.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await;
}

/// The longest a connection's expiry timer is set for: a token with no `exp` (anonymous) or
/// an `exp` centuries away gets this, and an `Instant` never overflows.
const EXPIRY_HORIZON: Duration = Duration::from_secs(365 * 24 * 3600);

fn until_expiry(expires_at: Option<u64>) -> Duration {
    let Some(exp) = expires_at else {
        return EXPIRY_HORIZON;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Duration::from_secs(exp.saturating_sub(now)).min(EXPIRY_HORIZON)
}

/// Verifies a `refresh` token: valid as at the handshake, and of the connection's identity.
/// Returns its expiry.
async fn refresh(
    token: &str,
    conn: &ConnShared,
    relay: &Relay,
) -> Result<u64, (ErrorCode, String)> {
    let Some(old) = &conn.claims else {
        return Err((
            ErrorCode::Forbidden,
            "an anonymous connection has no token to refresh".into(),
        ));
    };
    let authn = relay.live().authn.clone();
    let identity = authn
        .verify_token(token)
        .await
        .map_err(|e| (ErrorCode::Unauthorized, e.to_string()))?;
    let new = identity.claims.unwrap_or_default();
    if !crate::auth::same_identity(old, &new) {
        return Err((
            ErrorCode::Forbidden,
            "the token names another identity (iss and sub must stay the same)".into(),
        ));
    }
    identity
        .expires_at
        .ok_or((ErrorCode::Unauthorized, "the token has no exp".into()))
}

/// A client's request id as a log field: `7`, `"a-string"` (escaped), or `-` without one.
fn log_id(id: Option<&RequestId>) -> String {
    match id {
        Some(RequestId::Num(n)) => n.to_string(),
        Some(RequestId::Str(s)) => format!("{s:?}"),
        None => "-".into(),
    }
}

fn reply_error(conn: &ConnShared, id: Option<&RequestId>, code: ErrorCode, reason: &str) {
    tracing::debug!(request_id = %log_id(id), code = code as u16, reason, "request refused");
    conn.outbox
        .push_reply(Message::text(protocol::encode_error(id, code, reason)));
}

fn reply_ok(conn: &ConnShared, id: Option<&RequestId>) {
    conn.outbox
        .push_reply(Message::text(protocol::encode_ok(id)));
}

fn authz_code(e: &AuthzError) -> ErrorCode {
    match e {
        AuthzError::InvalidChannel { .. }
        | AuthzError::InvalidClaim { .. }
        | AuthzError::SubjectTooLong { .. } => ErrorCode::InvalidValue,
        AuthzError::NoBinding(_)
        | AuthzError::WrongDirection { .. }
        | AuthzError::MissingClaim { .. }
        | AuthzError::ReservedSubject { .. } => ErrorCode::Forbidden,
    }
}

async fn handle(req: Request, conn: &Arc<ConnShared>, relay: &Relay) {
    let live = relay.live();
    match req {
        Request::Ping { id } => {
            conn.outbox
                .push_reply(Message::text(protocol::encode_pong(id.as_ref())));
        }
        // Handled by the reader, which owns the connection's expiry timer.
        Request::Refresh { .. } => {}
        Request::Subscribe { id, channel, since } => {
            tracing::debug!(request_id = %log_id(id.as_ref()), %channel, resume = since.is_some(), "subscribe");
            let target = match live.authz.resolve_binding(
                &channel,
                Operation::Subscribe,
                conn.claims.as_ref(),
            ) {
                Ok(r) => Target::of(&r),
                Err(e) => {
                    return reply_error(conn, id.as_ref(), authz_code(&e), &e.to_string());
                }
            };
            {
                let mut subs = conn.subs();
                if subs.contains_key(&channel) {
                    drop(subs);
                    return reply_error(
                        conn,
                        id.as_ref(),
                        ErrorCode::AlreadySubscribed,
                        "already subscribed",
                    );
                }
                if subs.len() >= live.config.limits.max_subscriptions_per_connection as usize {
                    drop(subs);
                    return reply_error(
                        conn,
                        id.as_ref(),
                        ErrorCode::TooManySubscriptions,
                        "too many subscriptions",
                    );
                }
                subs.insert(channel.clone(), target.key.clone());
            }
            drop(live);
            // The hub queues the `ok` itself (for a resumable channel: before the replay
            // and the first live message, under one lock).
            if let Err(e) = relay
                .hub
                .subscribe(&target, conn, &channel, id.as_ref(), since.as_ref())
                .await
            {
                let mut subs = conn.subs();
                if subs.get(&channel) == Some(&target.key) {
                    subs.remove(&channel);
                }
                drop(subs);
                reply_error(conn, id.as_ref(), ErrorCode::Unavailable, &e.to_string());
            } else {
                tracing::debug!(request_id = %log_id(id.as_ref()), %channel, "subscribed");
            }
        }
        Request::Unsubscribe { id, channel } => {
            let removed = conn.subs().remove(&channel);
            match removed {
                Some(subject) => {
                    relay.hub.unsubscribe(&subject, conn.id, &channel);
                    reply_ok(conn, id.as_ref());
                }
                None => reply_error(
                    conn,
                    id.as_ref(),
                    ErrorCode::NotSubscribed,
                    "not subscribed",
                ),
            }
        }
        Request::Publish {
            id,
            channel,
            payload,
            msg_id,
        } => {
            let resolved =
                match live
                    .authz
                    .resolve_binding(&channel, Operation::Publish, conn.claims.as_ref())
                {
                    Ok(r) => r,
                    Err(e) => {
                        return reply_error(conn, id.as_ref(), authz_code(&e), &e.to_string());
                    }
                };
            drop(live);
            if !relay
                .nats_connected
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                relay.metrics.drop_msgs("nats_unavailable", 1);
                return reply_error(
                    conn,
                    id.as_ref(),
                    ErrorCode::Unavailable,
                    "NATS unavailable",
                );
            }
            let headers = sender_headers(conn, &relay.name);
            let outcome = if resolved.history.is_some() {
                publish_stored(relay, resolved.subject, headers, payload, msg_id).await
            } else {
                relay
                    .hub
                    .client()
                    .publish_with_headers(resolved.subject, headers, payload.into())
                    .await
                    .map(|()| protocol::encode_ok(id.as_ref()))
                    .map_err(|e| format!("publish failed: {e}"))
                    .map(|ok| (ok, None))
            };
            match outcome {
                Ok((ok, stored)) => {
                    relay.metrics.published.inc();
                    let ok = match stored {
                        Some((seq, duplicate)) => {
                            protocol::encode_ok_stored(id.as_ref(), seq, duplicate)
                        }
                        None => ok,
                    };
                    conn.outbox.push_reply(Message::text(ok));
                }
                Err(reason) => {
                    relay.metrics.drop_msgs("nats_unavailable", 1);
                    reply_error(conn, id.as_ref(), ErrorCode::Unavailable, &reason);
                }
            }
        }
    }
}

/// Headers a client publish carries to NATS, so a backend knows who sent it: the token's
/// `sub` (absent for anonymous clients or a token without one) and the connection
/// (`<relay name>/<connection id>`). Set by the relay; a client cannot set NATS headers, so it
/// cannot forge them.
fn sender_headers(conn: &ConnShared, relay_name: &str) -> async_nats::HeaderMap {
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

/// The header naming the publishing client's token subject.
pub const SENDER_SUB_HEADER: &str = "Wsrelay-Sub";
/// The header naming the publishing connection.
pub const SENDER_CONNECTION_HEADER: &str = "Wsrelay-Connection";

/// A publish on a resumable channel: stored by JetStream before the `ok`, which carries its
/// position. `msg_id` de-duplicates within the stream's duplicate window.
async fn publish_stored(
    relay: &Relay,
    subject: String,
    mut headers: async_nats::HeaderMap,
    payload: Vec<u8>,
    msg_id: Option<String>,
) -> Result<(String, Option<(u64, bool)>), String> {
    if let Some(m) = &msg_id {
        headers.insert("Nats-Msg-Id", m.as_str());
    }
    let js = async_nats::jetstream::new(relay.hub.client().clone());
    let ack = async {
        js.publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|e| format!("publish failed: {e}"))?
            .await
            .map_err(|e| format!("not stored: {e}"))
    };
    let ack = tokio::time::timeout(crate::history::stream::READ_TIMEOUT, ack)
        .await
        .map_err(|_| "JetStream did not acknowledge in time".to_owned())??;
    Ok((String::new(), Some((ack.sequence, ack.duplicate))))
}
