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

use tokio_tungstenite::tungstenite::Message;

use crate::access::Presented;
use crate::authz::Operation;
use crate::clock::now_ms;
use crate::conn::{AddError, Attached, Conn, ServerAdd};
use crate::events::{Event, EventType};
use crate::fanout::Target;
use crate::metrics::Op;
use crate::presence::{self, Handle, SNAPSHOT_WITHIN, entry};
use crate::protocol::{self, ErrorCode, RequestId, Since};
use crate::state::Relay;

use super::{log_id, reply_denied, reply_error, who};

/// The reason of a 503 when presence cannot be had.
pub const PRESENCE_UNAVAILABLE: &str = "presence unavailable";

/// The reason of a 400 for presence on a binding without it.
pub const NO_PRESENCE: &str = "the channel's binding has no presence";

/// A presence membership to hold: the binding's policy, the member's key and info.
type Member = (presence::members::Policy, String, String);

/// The membership `conn` holds on `binding`'s channel, when the binding has presence: the
/// binding's key, else the connection itself.
fn member_of(
    settings: &crate::state::Settings,
    binding: usize,
    channel: &str,
    conn: &Conn,
    relay: &Relay,
) -> Option<Member> {
    let config = settings.config.bindings.get(binding)?.presence.as_ref()?;
    let claims = conn.claims();
    let key = settings
        .authz
        .presence_key(binding, channel, claims.as_deref())
        .and_then(Result::ok)
        .filter(|k| k.len() <= entry::MAX_KEY_BYTES)
        .unwrap_or_else(|| entry::own_key(&relay.name, conn.id));
    Some((
        presence::policy(config),
        key,
        entry::info(claims.as_deref(), &config.info),
    ))
}

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
    let member = member_of(&settings, binding, &channel, conn, relay);
    if presence && member.is_none() {
        return reply_error(conn, id, ErrorCode::BadRequest, NO_PRESENCE);
    }
    let target = Target::of(&grant.resolved);
    let max = settings.config.limits.max_subscriptions_per_connection as usize;
    drop(settings);
    if presence && relay.presence.is_none() {
        relay.metrics.presence_unavailable.inc();
        return reply_error(conn, id, ErrorCode::Unavailable, PRESENCE_UNAVAILABLE);
    }
    if let Err(e) = conn.add_subscription(&channel, &target.key, max) {
        let code = match e {
            AddError::AlreadySubscribed | AddError::Ended => ErrorCode::AlreadySubscribed,
            AddError::TooMany => ErrorCode::TooManySubscriptions,
        };
        return reply_error(conn, id, code, &e.to_string());
    }
    if let Some(exp) = grant.token_expires_at {
        conn.set_token_expiry(&channel, &target.key, exp);
    }
    let how = Setup {
        id,
        since: since.as_ref(),
        data: grant.data.as_deref(),
        snapshot: presence,
        kind: Kind::Client,
    };
    match set_up(conn, relay, &channel, &target, member, how).await {
        Ok(()) => tracing::debug!(request_id = %log_id(id), %channel, "subscribed"),
        Err((code, reason)) => reply_error(conn, id, code, &reason),
    }
}

/// Subscribes `conn` to `channel` for the backend (a server-side subscription,
/// docs/protocol.md section 3): the channel's binding must allow subscribe, its `authorize`
/// checks do not run (the backend's command is the authorization), and the client gets a
/// `subscribed` frame with `byServer` instead of an `ok`. A subscription of the client's own
/// to the channel is taken over. Returns whether the connection holds it server-side now.
pub async fn server(conn: &Arc<Conn>, relay: &Relay, channel: &str) -> bool {
    let settings = relay.settings();
    let claims = conn.claims();
    let resolved = match settings.authz.resolve_binding(
        channel,
        Operation::Subscribe,
        claims.as_deref(),
    ) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(conn = conn.id, %channel, error = %e, "server-side subscription not made");
            return false;
        }
    };
    let member = member_of(&settings, resolved.binding, channel, conn, relay);
    let target = Target::of(&resolved);
    let max = settings.config.limits.max_subscriptions_per_connection as usize;
    drop(settings);
    match conn.add_server_subscription(channel, &target.key, max) {
        Ok(ServerAdd::Held) => return true,
        Ok(ServerAdd::TakenOver) => {
            conn.outbox
                .push_reply(Message::text(protocol::encode_server_subscribed(channel)));
            return true;
        }
        Ok(ServerAdd::New) => {}
        Err(e) => {
            tracing::debug!(conn = conn.id, %channel, error = %e, "server-side subscription not made");
            return false;
        }
    }
    let how = Setup {
        id: None,
        since: None,
        data: None,
        snapshot: false,
        kind: Kind::Server,
    };
    match set_up(conn, relay, channel, &target, member, how).await {
        Ok(()) => true,
        Err((_, reason)) => {
            tracing::debug!(conn = conn.id, %channel, %reason, "server-side subscription not made");
            false
        }
    }
}

/// Subscribes `conn` to `channel` by itself, for a binding with `autoSubscribe`
/// (docs/protocol.md section 9): checked as the client's own `subscribe` (the binding's
/// direction and `authorize`, with no subscription token), resumed from `since` when given,
/// confirmed by a `subscribed` frame with `auto` instead of an `ok`. A channel the client may
/// not read is left out, silently. Returns whether the connection holds it now.
pub async fn auto(conn: &Arc<Conn>, relay: &Relay, channel: &str, since: Option<&Since>) -> bool {
    let settings = relay.settings();
    let claims = conn.claims();
    let grant = match settings
        .access
        .check(
            channel,
            Operation::Subscribe,
            who(conn, relay, claims.as_deref()),
            Presented::None,
            relay.link(),
        )
        .await
    {
        Ok(g) => g,
        Err(e) => {
            tracing::debug!(conn = conn.id, %channel, error = %e, "auto-subscription not made");
            return false;
        }
    };
    let member = member_of(&settings, grant.resolved.binding, channel, conn, relay);
    let target = Target::of(&grant.resolved);
    let max = settings.config.limits.max_subscriptions_per_connection as usize;
    drop(settings);
    if let Err(e) = conn.add_subscription(channel, &target.key, max) {
        tracing::debug!(conn = conn.id, %channel, error = %e, "auto-subscription not made");
        return false;
    }
    let how = Setup {
        id: None,
        since,
        data: grant.data.as_deref(),
        snapshot: false,
        kind: Kind::Auto,
    };
    match set_up(conn, relay, channel, &target, member, how).await {
        Ok(()) => true,
        Err((_, reason)) => {
            tracing::debug!(conn = conn.id, %channel, %reason, "auto-subscription not made");
            false
        }
    }
}

/// Who asked for a subscription: what confirms it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The client's `subscribe`: an `ok`.
    Client,
    /// The backend (server-side): a `subscribed` frame with `byServer`.
    Server,
    /// The binding's `autoSubscribe`: a `subscribed` frame with `auto`.
    Auto,
}

/// How a subscription recorded on the connection is set up.
struct Setup<'a> {
    id: Option<&'a RequestId>,
    since: Option<&'a Since>,
    data: Option<&'a str>,
    /// The `ok` carries the channel's members (`presence: true`).
    snapshot: bool,
    /// Who asked.
    kind: Kind,
}

/// Sets up the subscription `conn` just recorded (`channel` to `target`): its presence
/// membership, the hub's subscriber (which queues the `ok`), its events. On an error the
/// connection forgets it.
async fn set_up(
    conn: &Arc<Conn>,
    relay: &Relay,
    channel: &str,
    target: &Target,
    member: Option<Member>,
    how: Setup<'_>,
) -> Result<(), (ErrorCode, String)> {
    let mut snapshot: Option<Handle> = None;
    if let (Some(presences), Some((policy, key, info))) = (&relay.presence, member) {
        let (membership, handle, ack) =
            presences.join(conn, channel, policy, &key, &info, how.snapshot);
        // Held by the subscription from now on: whatever ends it ends the membership.
        if conn
            .attach(channel, &target.key, Attached(Box::new(membership)))
            .is_err()
        {
            return Err((
                ErrorCode::Unavailable,
                "the subscription ended while it was being set up".into(),
            ));
        }
        if let Some(ack) = ack {
            if !stored_and_read(&handle, ack).await {
                conn.remove_if(channel, &target.key);
                relay.metrics.presence_unavailable.inc();
                return Err((ErrorCode::Unavailable, PRESENCE_UNAVAILABLE.into()));
            }
            snapshot = Some(handle);
        }
    }
    let snapshotted = snapshot.is_some();
    let answer: Option<Box<dyn Fn(String) + Send + Sync>> = match snapshot {
        Some(h) => {
            let conn = conn.clone();
            Some(Box::new(move |ok: String| h.answer(&conn, ok)))
        }
        None if how.kind == Kind::Server => {
            let (conn, channel) = (conn.clone(), channel.to_owned());
            Some(Box::new(move |ok: String| {
                conn.outbox
                    .push_reply(Message::text(protocol::ok_as_server_subscribed(
                        &ok, &channel,
                    )));
            }))
        }
        None if how.kind == Kind::Auto => {
            let (conn, channel) = (conn.clone(), channel.to_owned());
            Some(Box::new(move |ok: String| {
                conn.outbox
                    .push_reply(Message::text(protocol::ok_as_auto_subscribed(
                        &ok, &channel,
                    )));
            }))
        }
        None => None,
    };
    match relay
        .hub
        .subscribe(
            target,
            conn,
            channel,
            how.id,
            how.since,
            how.data,
            answer.as_deref().map(|a| a as crate::fanout::Answer<'_>),
        )
        .await
    {
        Ok(()) => {
            announce(relay, conn, channel, &target.key, how.kind == Kind::Server);
            if snapshotted {
                relay
                    .metrics
                    .presence_snapshots
                    .get_or_create(&Op { op: "subscribe" })
                    .inc();
            }
            Ok(())
        }
        Err(e) => {
            conn.remove_if(channel, &target.key);
            Err((ErrorCode::Unavailable, e.to_string()))
        }
    }
}

/// Says `Subscribed` (lifecycle events), and attaches to the subscription what says
/// `Unsubscribed` when it ends while its connection stays.
fn announce(relay: &Relay, conn: &Conn, channel: &str, key: &str, by_server: bool) {
    let Some(registry) = relay.registry.as_ref() else {
        return;
    };
    let Some(mut event) = registry.conn_event(conn.id, EventType::Subscribed) else {
        return;
    };
    event.channel = Some(channel.to_owned());
    event.by_server = by_server;
    let serial = conn.next_serial();
    registry.event(&event, Some(serial));
    let ends = Unannounce {
        registry: registry.clone(),
        event,
        serial,
        connection_ended: conn.ended(),
        _occupying: registry.occupying(channel),
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
    /// The channel counted for `Occupied`/`Vacated` while the subscription lasts, however
    /// it ends.
    _occupying: Option<crate::registry::Occupying>,
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
