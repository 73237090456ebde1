//! `subscribe`: the bindings and their checks decide the channel's subject
//! (`crate::access`), the connection records it (one of at most
//! `limits.maxSubscriptionsPerConnection`, with its subscription token's expiry), and the hub
//! joins it, queueing the `ok` itself (for a resumable channel before the replay and the
//! first live message), with the backend's `data`. On a binding with presence the
//! subscription holds a membership (`crate::presence`); with `presence: true` its `ok`
//! carries the members, once the registry stored the membership and the channel's watcher
//! read it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::access::Presented;
use crate::authz::Operation;
use crate::clock::now_ms;
use crate::conn::{AddError, Attached, Conn};
use crate::events::{Event, EventType};
use crate::fanout::Target;
use crate::metrics::Op;
use crate::presence::{self, Handle, SNAPSHOT_WITHIN, entry};
use crate::protocol::{ErrorCode, RequestId, Since};
use crate::state::Relay;

use super::{log_id, reply_denied, reply_error, who};

/// The reason of a 503 when presence cannot be had.
pub const PRESENCE_UNAVAILABLE: &str = "presence unavailable";

/// The reason of a 400 for presence on a binding without it.
pub const NO_PRESENCE: &str = "the channel's binding has no presence";

/// Subscribes `conn` to `channel`, or answers why not.
#[allow(clippy::too_many_arguments)]
pub async fn apply(
    id: Option<&RequestId>,
    channel: String,
    since: Option<Since>,
    token: Option<String>,
    presence: bool,
    conn: &Arc<Conn>,
    relay: &Relay,
) {
    tracing::debug!(request_id = %log_id(id), %channel, resume = since.is_some(), presence, "subscribe");
    let settings = relay.settings();
    let claims = conn.claims();
    let presented = token.as_deref().map_or(Presented::None, Presented::Token);
    let grant = match settings
        .access
        .check(
            &channel,
            Operation::Subscribe,
            who(conn, relay, claims.as_deref()),
            presented,
            relay.link(),
        )
        .await
    {
        Ok(g) => g,
        Err(e) => return reply_denied(conn, id, &e),
    };
    let binding = grant.resolved.binding;
    let config = settings
        .config
        .bindings
        .get(binding)
        .and_then(|b| b.presence.clone());
    if presence && config.is_none() {
        return reply_error(conn, id, ErrorCode::BadRequest, NO_PRESENCE);
    }
    // Who the member is: the binding's key, else the connection itself.
    let member = config.as_ref().map(|p| {
        let key = settings
            .authz
            .presence_key(binding, &channel, claims.as_deref())
            .and_then(Result::ok)
            .filter(|k| k.len() <= entry::MAX_KEY_BYTES)
            .unwrap_or_else(|| entry::own_key(&relay.name, conn.id));
        (
            presence::policy(p),
            key,
            entry::info(claims.as_deref(), &p.info),
        )
    });
    let target = Target::of(&grant.resolved);
    let max = settings.config.limits.max_subscriptions_per_connection as usize;
    drop(settings);
    if presence && relay.presence.is_none() {
        relay.metrics.presence_unavailable.inc();
        return reply_error(conn, id, ErrorCode::Unavailable, PRESENCE_UNAVAILABLE);
    }
    if let Err(e) = conn.add_subscription(&channel, &target.key, max) {
        let code = match e {
            AddError::AlreadySubscribed => ErrorCode::AlreadySubscribed,
            AddError::TooMany => ErrorCode::TooManySubscriptions,
        };
        return reply_error(conn, id, code, &e.to_string());
    }
    if let Some(exp) = grant.token_expires_at {
        conn.set_token_expiry(&channel, &target.key, exp);
    }
    let mut snapshot: Option<Handle> = None;
    if let (Some(presences), Some((policy, key, info))) = (&relay.presence, member) {
        let (membership, handle, ack) =
            presences.join(conn, &channel, policy, &key, &info, presence);
        // Held by the subscription from now on: whatever ends it ends the membership.
        if conn
            .attach(&channel, &target.key, Attached(Box::new(membership)))
            .is_err()
        {
            return reply_error(
                conn,
                id,
                ErrorCode::Unavailable,
                "the subscription ended while it was being set up",
            );
        }
        if let Some(ack) = ack {
            if !stored_and_read(&handle, ack).await {
                conn.remove_if(&channel, &target.key);
                relay.metrics.presence_unavailable.inc();
                return reply_error(conn, id, ErrorCode::Unavailable, PRESENCE_UNAVAILABLE);
            }
            snapshot = Some(handle);
        }
    }
    let answer = snapshot.map(|h| {
        let conn = conn.clone();
        move |ok: String| h.answer(&conn, ok)
    });
    match relay
        .hub
        .subscribe(
            &target,
            conn,
            &channel,
            id,
            since.as_ref(),
            grant.data.as_deref(),
            answer.as_ref().map(|a| a as crate::fanout::Answer<'_>),
        )
        .await
    {
        Ok(()) => {
            announce(relay, conn, &channel, &target.key);
            if answer.is_some() {
                relay
                    .metrics
                    .presence_snapshots
                    .get_or_create(&Op { op: "subscribe" })
                    .inc();
            }
            tracing::debug!(request_id = %log_id(id), %channel, "subscribed");
        }
        Err(e) => {
            conn.remove_if(&channel, &target.key);
            reply_error(conn, id, ErrorCode::Unavailable, &e.to_string());
        }
    }
}

/// Says `Subscribed` (lifecycle events), and attaches to the subscription what says
/// `Unsubscribed` when it ends while its connection stays.
fn announce(relay: &Relay, conn: &Conn, channel: &str, key: &str) {
    let Some(registry) = relay.registry.as_ref() else {
        return;
    };
    let Some(mut event) = registry.conn_event(conn.id, EventType::Subscribed) else {
        return;
    };
    event.channel = Some(channel.to_owned());
    let serial = conn.next_serial();
    registry.event(&event, Some(serial));
    let ends = Unannounce {
        registry: registry.clone(),
        event,
        serial,
        connection_ended: conn.ended(),
    };
    // When the subscription already ended, `attach` gives `ends` back, and dropping it says
    // the end at once, after the start.
    drop(conn.attach(channel, key, Attached(Box::new(ends))));
}

/// Says `Unsubscribed` when dropped with its subscription, unless the connection ended
/// (its `Disconnected` says that).
struct Unannounce {
    registry: Arc<crate::registry::Registry>,
    event: Event,
    serial: u64,
    connection_ended: Arc<AtomicBool>,
}

impl Drop for Unannounce {
    fn drop(&mut self) {
        if self.connection_ended.load(Ordering::SeqCst) {
            return;
        }
        let at = now_ms();
        let mut e = self.event.clone();
        e.kind = EventType::Unsubscribed;
        e.duration_ms = Some(at.saturating_sub(e.at));
        e.at = at;
        self.registry.event(&e, Some(self.serial));
    }
}

/// Whether the registry stored the membership and the channel's watcher read it, within
/// [`SNAPSHOT_WITHIN`].
async fn stored_and_read(
    handle: &Handle,
    ack: tokio::sync::oneshot::Receiver<Result<u64, crate::registry::RegistryError>>,
) -> bool {
    let start = tokio::time::Instant::now();
    let seq = match tokio::time::timeout(SNAPSHOT_WITHIN, ack).await {
        Ok(Ok(Ok(seq))) => seq,
        Ok(Ok(Err(e))) => {
            tracing::debug!(error = %e, "presence: membership not stored");
            return false;
        }
        _ => return false,
    };
    let left = SNAPSHOT_WITHIN.saturating_sub(start.elapsed());
    handle.watcher.applied(seq, left).await
}
