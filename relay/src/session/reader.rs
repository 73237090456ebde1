//! A connection's reader: frames from the client, the idle and token-expiry timers, the
//! request rate, then each request to its handler (`requests`). It asks the outbox for every
//! close it decides, and lingers for the client's close reply.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{Stream, StreamExt};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

use super::requests::{self, reply_error, reply_ok};
use crate::conn::Conn;
use crate::conn::close::{CLOSE_FRAME_WITHIN, Cause, LINGER_WITHIN, TOO_BIG_HOLD};
use crate::limits::{RequestLimiter, Verdict};
use crate::metrics::Op;
use crate::protocol::{self, ErrorCode, Request};
use crate::state::Relay;

/// Reads until the client leaves, a close is asked for, or `done` (the writer ended).
pub(super) async fn read_loop<St>(
    mut stream: St,
    conn: &Arc<Conn>,
    relay: &Relay,
    done: &CancellationToken,
    idle_timeout: Duration,
    mut expires_at: Option<u64>,
) where
    St: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let settings = relay.settings();
    let limits = &settings.config.limits;
    // One rate over the requests that cost NATS work (subscribe, unsubscribe, publish).
    let mut limiter = RequestLimiter::new(limits.publish_rate_per_second, limits.publish_burst);
    // Except a connection's first `maxSubscriptionsPerConnection` subscribes: a client that
    // reconnects subscribes again to everything it had at once.
    let mut free_subscribes = limits.max_subscriptions_per_connection;
    drop(settings);
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    let expiry = tokio::time::sleep(until_expiry(expires_at));
    tokio::pin!(expiry);
    // The earliest subscription-token expiry; moved after the requests that change it.
    let mut next_sub_expiry: Option<u64> = None;
    let sub_expiry = tokio::time::sleep(EXPIRY_HORIZON);
    tokio::pin!(sub_expiry);
    loop {
        let msg = tokio::select! {
            () = done.cancelled() => return linger(&mut stream).await,
            () = &mut idle => {
                conn.outbox.close(Cause::Idle);
                return linger(&mut stream).await;
            }
            () = &mut expiry, if expires_at.is_some() => {
                conn.outbox.close(Cause::TokenExpired);
                return linger(&mut stream).await;
            }
            () = &mut sub_expiry, if next_sub_expiry.is_some() => {
                for (channel, key) in conn.take_expired(now_secs()) {
                    requests::end_expired(conn, relay, &channel, &key);
                }
                next_sub_expiry = conn.next_token_expiry();
                sub_expiry.as_mut().reset(tokio::time::Instant::now() + until_expiry(next_sub_expiry));
                continue;
            }
            m = stream.next() => m,
        };
        let msg = match msg {
            None => return,
            Some(Err(tungstenite::Error::Capacity(_))) => {
                conn.outbox.close(Cause::TooBig);
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
                    Request::SubRefresh { id, .. } => Some(("subrefresh", id)),
                    // A lock and a page of up to 1000 members.
                    Request::Presence { id, .. } => Some(("presence", id)),
                    Request::Ping { .. } => None,
                };
                if let Some((op, id)) = limited {
                    let verdict = limiter.check();
                    if verdict != Verdict::Allowed {
                        relay.metrics.rate_limited.get_or_create(&Op { op }).inc();
                        if matches!(req, Request::Publish { .. }) {
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
                            conn.outbox.close(Cause::Flood);
                            return linger(&mut stream).await;
                        }
                    }
                }
                if let Request::Refresh { id, token } = req {
                    // In band: the connection stays, its expiry moves (this task owns the
                    // timer).
                    match Box::pin(requests::refresh::apply(&token, conn, relay)).await {
                        Ok(exp) => {
                            expires_at = Some(exp);
                            expiry
                                .as_mut()
                                .reset(tokio::time::Instant::now() + until_expiry(expires_at));
                            reply_ok(conn, id.as_ref());
                        }
                        Err(e) => reply_error(conn, id.as_ref(), e.code(), &e.to_string()),
                    }
                    continue;
                }
                let moves_expiry = matches!(
                    req,
                    Request::Subscribe { token: Some(_), .. }
                        | Request::SubRefresh { .. }
                        | Request::Unsubscribe { .. }
                );
                // Boxed, here and for `refresh`: a request's future (a subscribe waits for
                // NATS and may read a stream) is larger than everything else an idle
                // connection holds. Inline, it sized every connection's task for it.
                Box::pin(requests::handle(req, conn, relay)).await;
                if moves_expiry {
                    let next = conn.next_token_expiry();
                    if next != next_sub_expiry {
                        next_sub_expiry = next;
                        sub_expiry
                            .as_mut()
                            .reset(tokio::time::Instant::now() + until_expiry(next));
                    }
                }
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
async fn linger<St>(stream: &mut St)
where
    St: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
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
    Duration::from_secs(exp.saturating_sub(now_secs())).min(EXPIRY_HORIZON)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
