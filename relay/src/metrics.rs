//! Prometheus metrics of the relay (prometheus-client), served on the admin port.
//!
//! `wsrelay_connections` (gauge, no labels) is the open-connection count the autoscaler
//! reads: keep its name.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A bounded `reason` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// One of a fixed set of reasons (never user input).
    pub reason: &'static str,
}

/// A bounded `op` label (a request type).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Op {
    /// `subscribe`, `unsubscribe` or `publish`.
    pub op: &'static str,
}

/// Labels of the `wsrelay_authorize_*` counters: the operation (`connect`, `subscribe`,
/// `publish`) and one of a fixed set of values (a failure reason, a cache result, a check).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpReason {
    /// `connect`, `subscribe` or `publish`.
    pub op: &'static str,
    /// A fixed value (never user input).
    pub reason: &'static str,
}

/// Labels of `wsrelay_authorize_cache_total`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpResult {
    /// `connect`, `subscribe` or `publish`.
    pub op: &'static str,
    /// `hit` or `miss`.
    pub result: &'static str,
}

/// Labels of `wsrelay_authorize_denied_total`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpCheck {
    /// `connect`, `subscribe` or `publish`.
    pub op: &'static str,
    /// `token`, `rule` or `request`.
    pub check: &'static str,
}

/// Buckets of `wsrelay_authorize_duration_seconds`: 0.5 ms to about 8 s.
fn authorize_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_5, 2.0, 15))
}

/// Labels of `wsrelay_history_stream_error`: the stream, and why it is not in place
/// (JetStream's answer, at most 200 characters). One per stream of the config.
/// Which limit sent a push to the slow-consumer policy (label `limit` of
/// `wsrelay_send_queue_limit_hits_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct LimitHit {
    /// `messages` (`sendQueueLen`), `bytes` (`sendQueueBytes`) or `process_bytes`
    /// (`maxQueuedBytes`); `replies` for a client that makes requests without reading.
    pub limit: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamError {
    /// The stream's name.
    pub stream: String,
    /// JetStream's answer, e.g. `insufficient storage resources available (10047)`.
    pub error: String,
}

/// Labels of `wsrelay_nats_last_error`: a configured server URL without credentials, and
/// one of a fixed set of causes (`crate::nats::io_cause`, `crate::nats::nats_cause`). Bounded by the config.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NatsError {
    /// The server, e.g. `nats://nats.messaging:4222` (never a user or password).
    pub server: String,
    /// Why it cannot be reached, e.g. `connection refused`.
    pub error: String,
}

/// `reason` values of `wsrelay_connections_refused_total` (`crate::server`, `crate::sse`,
/// `crate::auth::AuthError::reason`).
pub const REFUSAL_REASONS: &[&str] = &[
    "not_websocket",
    "draining",
    "rebalancing",
    "per_ip",
    "max_connections",
    "accept_rate",
    "no_token",
    "invalid_token",
    "origin",
    "keys_unavailable",
    "per_subject",
    "per_subject_fleet",
    "bad_resume",
    "subprotocol",
    "handshakes",
    "handshakes_per_ip",
    "handshake_timeout",
    "connect_denied",
    "connect_unavailable",
    "revoked",
];
/// `reason` values of `wsrelay_connections_closed_total` (`crate::conn::close::End::label`:
/// every cause, and the writer's `write_error`, `write_timeout`, `other`).
pub const CLOSE_REASONS: &[&str] = &[
    "write_error",
    "write_timeout",
    "normal",
    "token_expired",
    "too_big",
    "drain",
    "rebalance",
    "idle",
    "slow_consumer",
    "flood",
    "internal_error",
    "disconnect",
    "revoked",
    "other",
];
/// `reason` values of `wsrelay_messages_dropped_total`.
pub const DROP_REASONS: &[&str] = &[
    "too_large",
    "slow_consumer_drop_oldest",
    "slow_consumer_disconnect",
    "rate_limited",
    "nats_unavailable",
];
/// `reason` values of `wsrelay_sse_posts_forwarded_total`: the session's relay answered (any
/// status), no relay took the session's subject (it is gone: 404), or NATS failed or the
/// answer did not come in time (503).
pub const FORWARD_OUTCOMES: &[&str] = &["answered", "no_relay", "unavailable"];
/// `reason` values of `wsrelay_history_resumes_total`.
pub const RESUME_OUTCOMES: &[&str] = &["recovered", "not_recovered", "unavailable"];

/// The `event` label of `wsrelay_presence_events_sent_total` and of the lifecycle events'
/// counters.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    /// `join`, `leave` or `occupancy`; `Connected`, `Disconnected`, ...
    pub event: &'static str,
}

/// The labels of `wsrelay_control_commands_total`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Command {
    /// The endpoint: `disconnect`, `connections`.
    pub command: &'static str,
    /// `ok`, `invalid` (refused with 400), `partial` (not every relay answered in time),
    /// `error`.
    pub outcome: &'static str,
}

/// `command` values of `wsrelay_control_commands_total`.
pub const CONTROL_COMMANDS: &[&str] = &["disconnect", "connections", "revoke", "invalidate"];
/// `outcome` values of `wsrelay_control_commands_total`.
pub const CONTROL_OUTCOMES: &[&str] = &["ok", "invalid", "partial", "error"];

/// `event` values of `wsrelay_presence_events_sent_total`.
pub const PRESENCE_EVENTS: &[&str] = &["join", "leave", "occupancy"];

/// Every metric of the relay.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `wsrelay_connections`: open WebSocket connections (the autoscaler's input).
    pub connections: Gauge,
    /// Backend authorization requests sent (cache misses), by operation.
    pub authorize_requests: Family<Op, Counter>,
    /// Their latency, by operation.
    pub authorize_duration: Family<Op, Histogram, fn() -> Histogram>,
    /// Authorization checks that failed (not denials), by operation and reason.
    pub authorize_failures: Family<OpReason, Counter>,
    /// Backend decision cache lookups, by operation and result.
    pub authorize_cache: Family<OpResult, Counter>,
    /// Denials, by operation and the check that denied.
    pub authorize_denied: Family<OpCheck, Counter>,
    /// `wsrelay_connections_accepted_total`: upgrades accepted.
    pub accepted: Counter,
    /// `wsrelay_connections_refused_total{reason}`: requests refused before the upgrade.
    pub refused: Family<Reason, Counter>,
    /// `wsrelay_connections_closed_total{reason}`: connections closed, by why.
    pub closed: Family<Reason, Counter>,
    /// `wsrelay_messages_delivered_total`: message frames written to clients.
    pub delivered: Counter,
    /// `wsrelay_messages_published_total`: client publishes sent to NATS.
    pub published: Counter,
    /// `wsrelay_messages_dropped_total{reason}`: messages not delivered/published.
    pub dropped: Family<Reason, Counter>,
    /// `wsrelay_slow_consumers_total`: times a connection's send queue overflowed.
    pub slow_consumers: Counter,
    /// `wsrelay_task_panics_total`: panics caught at a task's boundary (`crate::task`): each
    /// ended its own connection or subject, never the process.
    pub task_panics: Counter,
    /// `wsrelay_nats_client_failed`: 1 once the NATS client itself has stopped (its
    /// connection task ended): the relay is not ready, not live, and drains to restart.
    pub nats_client_failed: Gauge,
    /// `wsrelay_queued_bytes`: bytes in all send queues (`limits.maxQueuedBytes` bounds it).
    pub queued_bytes: Gauge,
    /// `wsrelay_send_queue_limit_hits_total{limit}`: pushes that met the slow-consumer
    /// policy, by the limit reached.
    pub queue_limit_hits: Family<LimitHit, Counter>,
    /// `wsrelay_requests_rate_limited_total{op}`: requests refused with 429.
    pub rate_limited: Family<Op, Counter>,
    /// `wsrelay_handshakes_in_flight`: HTTP handshakes between accept and upgrade.
    pub handshakes_in_flight: Gauge,
    /// `wsrelay_nats_subscriptions`: NATS subscriptions held (one per distinct subject).
    pub nats_subscriptions: Gauge,
    /// `wsrelay_nats_connected`: 1 while the NATS connection is up.
    pub nats_connected: Gauge,
    /// `wsrelay_nats_disconnects_total`: NATS connection losses.
    pub nats_disconnects: Counter,
    /// `wsrelay_nats_last_error{server,error}`: 1 for the last connection failure while
    /// NATS is not connected; no sample while connected (info-style, at most one sample).
    pub nats_last_error: Family<NatsError, Gauge>,
    /// `wsrelay_config_rejected`: 1 while the last config reload was refused (the relay
    /// runs the previous config).
    pub config_rejected: Gauge,
    /// `wsrelay_jwks_fetch_failing`: 1 while the last fetch of the JWKS document failed
    /// (handshakes with a key the relay does not hold are refused 503 meanwhile).
    pub jwks_fetch_failing: Gauge,
    /// `wsrelay_delivery_latency_seconds`: NATS receive to socket write.
    pub delivery_latency: Histogram,
    /// `wsrelay_draining`: 1 while draining.
    pub draining: Gauge,
    /// `wsrelay_drain_started_timestamp_seconds`: Unix time the drain began (0 before).
    pub drain_started: Gauge,
    /// `wsrelay_sse_posts_forwarded_total{reason}`: SSE POSTs for another relay's session,
    /// forwarded to it over NATS.
    pub sse_forwarded: Family<Reason, Counter>,
    /// `wsrelay_rebalancing`: 1 while a rebalancing round sheds connections.
    pub rebalancing: Gauge,
    /// `wsrelay_rebalance_moved_total`: connections closed at their rebalancing turn.
    pub rebalance_moved: Counter,
    /// `wsrelay_drain_grace_period_seconds`: `drain.gracePeriodSeconds` of the config in
    /// force, so an alert can compare a drain's age with it.
    pub drain_grace: Gauge,
    /// `wsrelay_config_reloads_total{reason}`: config reloads, `ok` or `error`.
    pub reloads: Family<Reason, Counter>,
    /// `wsrelay_history_streams_ready`: history streams in place (resumable bindings).
    pub history_streams_ready: Gauge,
    /// `wsrelay_history_stream_error{stream,error}`: 1 per history stream the relay could
    /// not create or update at its last try, with JetStream's answer; none once in place.
    pub history_stream_error: Family<StreamError, Gauge>,
    /// `wsrelay_history_resumes_total{reason}`: subscribes with `since`, by outcome:
    /// `recovered`, `not_recovered`, `unavailable` (JetStream did not answer: 503).
    pub history_resumes: Family<Reason, Counter>,
    /// `wsrelay_history_reads_total{reason}`: JetStream requests made for history: `load`
    /// (a channel's retained messages, once per channel and relay), `check` (whether the
    /// stream still holds a position), `fill` (a hole in live delivery), `error` (failed).
    pub history_reads: Family<Reason, Counter>,
    /// `wsrelay_history_gaps_total{reason}`: holes in live delivery: `filled` from the
    /// stream, or `lost` (the subscribers were told to resubscribe).
    pub history_gaps: Family<Reason, Counter>,
    /// `wsrelay_registry_ready`: 1 while the registry's bucket is in place (0 without a
    /// registry, or while JetStream refuses it). Readiness does not depend on it.
    pub registry_ready: Gauge,
    /// `wsrelay_registry_keys_written_total`: registry keys written (lease, connections).
    pub registry_keys_written: Counter,
    /// `wsrelay_revocations`: revocations this relay holds (control service `revoke`,
    /// `invalidate`; until the registry's TTL removes them).
    pub revocations: Gauge,
    /// `wsrelay_registry_live_relays`: relays of the gateway whose lease this relay's watch
    /// sees live (the control service waits for as many answers).
    pub registry_live_relays: Gauge,
    /// `wsrelay_registry_keys_deleted_total`: registry keys deleted (closes and purges).
    pub registry_keys_deleted: Counter,
    /// `wsrelay_registry_write_failures_total`: registry writes or deletes JetStream refused
    /// or did not answer (the entry is missing or stale until the next reassertion).
    pub registry_write_failures: Counter,
    /// `wsrelay_registry_lease_failures_total`: lease refreshes that failed.
    pub registry_lease_failures: Counter,
    /// `wsrelay_registry_purges_total{reason}`: a relay's entries purged, by cause:
    /// `shutdown` (its own, at exit), `forget` (`POST /registry/forget`), `lease_expired`,
    /// `restart` (what a previous run under the same name left).
    pub registry_purges: Family<Reason, Counter>,
    /// `wsrelay_presence_members`: members (users, those in their leave grace included) of
    /// the channels this relay watches (those with a local subscriber).
    pub presence_members: Gauge,
    /// `wsrelay_presence_watchers`: channels this relay watches.
    pub presence_watchers: Gauge,
    /// `wsrelay_presence_events_sent_total{event}`: presence frames queued to subscribers
    /// (one per recipient), by `join`, `leave`, `occupancy`.
    pub presence_events: Family<Kind, Counter>,
    /// `wsrelay_presence_snapshot_reads_total{op}`: member pages answered: `subscribe` (the
    /// snapshot of a `presence: true` subscribe) or `presence` (a paging request).
    pub presence_snapshots: Family<Op, Counter>,
    /// `wsrelay_presence_unavailable_total`: presence requests answered 503 (the registry
    /// did not store the membership, or the watcher did not read it, in time).
    pub presence_unavailable: Counter,
    /// `wsrelay_events_published_total{event}`: lifecycle events sent (stored, for a
    /// durable stream), by type.
    pub events_published: Family<Kind, Counter>,
    /// `wsrelay_events_failed_total{event}`: lifecycle events not sent or not stored (NATS
    /// or the stream refused, no acknowledgement in time, the queue full).
    pub events_failed: Family<Kind, Counter>,
    /// `wsrelay_control_commands_total{command,outcome}`: control commands this relay took
    /// from the backend (not the fleet requests it answered for another relay).
    pub control_commands: Family<Command, Counter>,
    /// `wsrelay_control_applied_total{command}`: fleet requests this relay carried out on
    /// its own connections, for whichever relay took the command.
    pub control_applied: Family<Kind, Counter>,
}

/// The causes of `wsrelay_registry_purges_total`.
pub const PURGE_CAUSES: &[&str] = &["shutdown", "forget", "lease_expired", "restart"];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wsrelay");
        let m = Self {
            connections: Gauge::default(),
            authorize_requests: Family::default(),
            authorize_duration: Family::new_with_constructor(authorize_buckets),
            authorize_failures: Family::default(),
            authorize_cache: Family::default(),
            authorize_denied: Family::default(),
            accepted: Counter::default(),
            refused: Family::default(),
            closed: Family::default(),
            delivered: Counter::default(),
            published: Counter::default(),
            dropped: Family::default(),
            slow_consumers: Counter::default(),
            task_panics: Counter::default(),
            nats_client_failed: Gauge::default(),
            queued_bytes: Gauge::default(),
            queue_limit_hits: Family::default(),
            rate_limited: Family::default(),
            handshakes_in_flight: Gauge::default(),
            nats_subscriptions: Gauge::default(),
            nats_connected: Gauge::default(),
            nats_disconnects: Counter::default(),
            nats_last_error: Family::default(),
            config_rejected: Gauge::default(),
            jwks_fetch_failing: Gauge::default(),
            delivery_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            draining: Gauge::default(),
            drain_started: Gauge::default(),
            sse_forwarded: Family::default(),
            rebalancing: Gauge::default(),
            rebalance_moved: Counter::default(),
            drain_grace: Gauge::default(),
            reloads: Family::default(),
            history_streams_ready: Gauge::default(),
            history_stream_error: Family::default(),
            history_resumes: Family::default(),
            history_reads: Family::default(),
            history_gaps: Family::default(),
            registry_ready: Gauge::default(),
            registry_keys_written: Counter::default(),
            registry_keys_deleted: Counter::default(),
            registry_write_failures: Counter::default(),
            registry_lease_failures: Counter::default(),
            registry_purges: Family::default(),
            presence_members: Gauge::default(),
            presence_watchers: Gauge::default(),
            presence_events: Family::default(),
            presence_snapshots: Family::default(),
            presence_unavailable: Counter::default(),
            events_published: Family::default(),
            registry_live_relays: Gauge::default(),
            revocations: Gauge::default(),
            events_failed: Family::default(),
            control_commands: Family::default(),
            control_applied: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "connections",
            "Open WebSocket connections",
            m.connections.clone(),
        );
        r.register(
            "connections_accepted",
            "WebSocket upgrades accepted",
            m.accepted.clone(),
        );
        r.register(
            "connections_refused",
            "Requests refused before the upgrade, by reason",
            m.refused.clone(),
        );
        r.register(
            "connections_closed",
            "Connections closed, by reason",
            m.closed.clone(),
        );
        r.register(
            "messages_delivered",
            "Message frames written to clients",
            m.delivered.clone(),
        );
        r.register(
            "messages_published",
            "Client publishes sent to NATS",
            m.published.clone(),
        );
        r.register(
            "messages_dropped",
            "Messages not delivered or not published, by reason",
            m.dropped.clone(),
        );
        r.register(
            "slow_consumers",
            "Send-queue overflows",
            m.slow_consumers.clone(),
        );
        r.register(
            "task_panics",
            "Panics caught at a task boundary (each ended its own connection or subject)",
            m.task_panics.clone(),
        );
        r.register(
            "nats_client_failed",
            "1 once the NATS client has stopped for good (the relay drains to restart)",
            m.nats_client_failed.clone(),
        );
        r.register(
            "queued_bytes",
            "Bytes queued to clients, all connections together",
            m.queued_bytes.clone(),
        );
        r.register(
            "send_queue_limit_hits",
            "Messages that met the slow-consumer policy, by the limit reached",
            m.queue_limit_hits.clone(),
        );
        r.register(
            "requests_rate_limited",
            "Requests refused by the per-connection rate limit, by type",
            m.rate_limited.clone(),
        );
        r.register(
            "handshakes_in_flight",
            "HTTP handshakes between TCP accept and the upgrade",
            m.handshakes_in_flight.clone(),
        );
        r.register(
            "nats_subscriptions",
            "NATS subscriptions held (one per distinct subject)",
            m.nats_subscriptions.clone(),
        );
        r.register(
            "nats_connected",
            "1 while connected to NATS",
            m.nats_connected.clone(),
        );
        r.register(
            "nats_disconnects",
            "NATS connection losses",
            m.nats_disconnects.clone(),
        );
        r.register(
            "nats_last_error",
            "1 for the last NATS connection failure (server, cause) while disconnected",
            m.nats_last_error.clone(),
        );
        r.register(
            "config_rejected",
            "1 while the last config reload was refused",
            m.config_rejected.clone(),
        );
        r.register(
            "jwks_fetch_failing",
            "1 while the last fetch of the JWKS document failed",
            m.jwks_fetch_failing.clone(),
        );
        r.register(
            "delivery_latency_seconds",
            "Time from NATS receive to socket write",
            m.delivery_latency.clone(),
        );
        r.register("draining", "1 while the relay drains", m.draining.clone());
        r.register(
            "sse_posts_forwarded",
            "SSE POSTs for another relay's session, forwarded to it over NATS, by outcome",
            m.sse_forwarded.clone(),
        );
        r.register(
            "rebalancing",
            "1 while a rebalancing round sheds connections",
            m.rebalancing.clone(),
        );
        r.register(
            "rebalance_moved",
            "Connections closed at their rebalancing turn (to reconnect to another relay)",
            m.rebalance_moved.clone(),
        );
        r.register(
            "drain_started_timestamp_seconds",
            "Unix time the drain began, 0 before",
            m.drain_started.clone(),
        );
        r.register(
            "drain_grace_period_seconds",
            "Grace period of a drain (drain.gracePeriodSeconds in force)",
            m.drain_grace.clone(),
        );
        r.register(
            "config_reloads",
            "Config reloads, by outcome",
            m.reloads.clone(),
        );
        r.register(
            "history_streams_ready",
            "History streams in place",
            m.history_streams_ready.clone(),
        );
        r.register(
            "history_stream_error",
            "1 per history stream the relay cannot create or update (stream, JetStream's answer)",
            m.history_stream_error.clone(),
        );
        r.register(
            "history_resumes",
            "Subscribes with since, by outcome",
            m.history_resumes.clone(),
        );
        r.register(
            "history_reads",
            "JetStream requests made for history, by kind",
            m.history_reads.clone(),
        );
        r.register(
            "history_gaps",
            "Holes in live delivery of resumable channels, by outcome",
            m.history_gaps.clone(),
        );
        r.register(
            "authorize_requests",
            "Backend authorization requests sent (decision cache misses), by operation",
            m.authorize_requests.clone(),
        );
        r.register(
            "authorize_duration_seconds",
            "Latency of backend authorization requests, by operation",
            m.authorize_duration.clone(),
        );
        r.register(
            "authorize_failures",
            "Authorization checks that could not decide (timeout, no responders, a bad reply, a rule error), by operation and reason",
            m.authorize_failures.clone(),
        );
        r.register(
            "authorize_cache",
            "Backend decision cache lookups, by operation and result",
            m.authorize_cache.clone(),
        );
        r.register(
            "authorize_denied",
            "Requests denied by a binding's authorize section or the connect step, by operation and check",
            m.authorize_denied.clone(),
        );
        r.register(
            "registry_ready",
            "1 while the connection registry's bucket is in place",
            m.registry_ready.clone(),
        );
        r.register(
            "registry_keys_written",
            "Connection registry keys written (lease, connections)",
            m.registry_keys_written.clone(),
        );
        r.register(
            "registry_keys_deleted",
            "Connection registry keys deleted (closes and purges)",
            m.registry_keys_deleted.clone(),
        );
        r.register(
            "registry_write_failures",
            "Connection registry writes or deletes that JetStream refused or did not answer",
            m.registry_write_failures.clone(),
        );
        r.register(
            "registry_lease_failures",
            "Lease refreshes of this relay that failed",
            m.registry_lease_failures.clone(),
        );
        r.register(
            "registry_purges",
            "A relay's registry entries purged, by cause (shutdown, forget, lease_expired)",
            m.registry_purges.clone(),
        );
        r.register(
            "presence_members",
            "Members of the channels this relay watches (those in their leave grace included)",
            m.presence_members.clone(),
        );
        r.register(
            "presence_watchers",
            "Channels whose presence this relay watches (one per channel with local subscribers)",
            m.presence_watchers.clone(),
        );
        r.register(
            "presence_events_sent",
            "Presence frames queued to subscribers (one per recipient), by event",
            m.presence_events.clone(),
        );
        r.register(
            "presence_snapshot_reads",
            "Pages of members answered, by op (subscribe, presence)",
            m.presence_snapshots.clone(),
        );
        r.register(
            "presence_unavailable",
            "Presence subscribes and requests answered 503",
            m.presence_unavailable.clone(),
        );
        for event in PRESENCE_EVENTS {
            let _ = m.presence_events.get_or_create(&Kind { event });
        }
        r.register(
            "registry_live_relays",
            "Relays of the gateway whose registry lease this relay sees live",
            m.registry_live_relays.clone(),
        );
        r.register(
            "revocations",
            "Token revocations this relay holds (until they expire)",
            m.revocations.clone(),
        );
        r.register(
            "events_published",
            "Lifecycle events sent (stored, with a durable stream), by type",
            m.events_published.clone(),
        );
        r.register(
            "events_failed",
            "Lifecycle events not sent or not stored, by type",
            m.events_failed.clone(),
        );
        r.register(
            "control_commands",
            "Control commands taken from the backend, by command and outcome",
            m.control_commands.clone(),
        );
        r.register(
            "control_applied",
            "Control requests carried out on this relay's connections, by command",
            m.control_applied.clone(),
        );
        for t in crate::config::EventType::ALL {
            let _ = m.events_published.get_or_create(&Kind { event: t.name() });
            let _ = m.events_failed.get_or_create(&Kind { event: t.name() });
        }
        for command in CONTROL_COMMANDS {
            let _ = m.control_applied.get_or_create(&Kind { event: command });
            for outcome in CONTROL_OUTCOMES {
                let _ = m
                    .control_commands
                    .get_or_create(&Command { command, outcome });
            }
        }
        // The known label values show up at 0 from the start, so that rate() and increase()
        // (and the alerts built on them) see the first refusal, close or drop too.
        for (family, reasons) in [
            (&m.refused, REFUSAL_REASONS),
            (&m.closed, CLOSE_REASONS),
            (&m.dropped, DROP_REASONS),
            (&m.history_resumes, RESUME_OUTCOMES),
            (&m.registry_purges, PURGE_CAUSES),
            (&m.sse_forwarded, FORWARD_OUTCOMES),
        ] {
            for reason in reasons {
                let _ = family.get_or_create(&Reason { reason });
            }
        }
        Self { registry, ..m }
    }

    /// Counts one history event in `family`.
    pub fn history(&self, family: &Family<Reason, Counter>, reason: &'static str) {
        family.get_or_create(&Reason { reason }).inc();
    }

    /// Counts a refusal.
    pub fn refuse(&self, reason: &'static str) {
        self.refused.get_or_create(&Reason { reason }).inc();
    }

    /// Counts dropped messages.
    pub fn drop_msgs(&self, reason: &'static str, n: u64) {
        self.dropped.get_or_create(&Reason { reason }).inc_by(n);
    }

    /// Records why NATS cannot be reached (replacing the previous failure).
    pub fn nats_failed(&self, server: String, error: String) {
        self.nats_last_error.clear();
        self.nats_last_error
            .get_or_create(&NatsError { server, error })
            .set(1);
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable() {
        let m = Metrics::new();
        m.connections.set(3);
        m.refuse("max_connections");
        let text = m.encode();
        assert!(text.contains("\nwsrelay_connections 3\n"), "{text}");
        assert!(
            text.contains("wsrelay_connections_refused_total{reason=\"max_connections\"} 1"),
            "{text}"
        );
        // Known reasons are there at 0 before the first event.
        for sample in [
            "wsrelay_connections_refused_total{reason=\"invalid_token\"} 0",
            "wsrelay_connections_closed_total{reason=\"slow_consumer\"} 0",
            "wsrelay_messages_dropped_total{reason=\"slow_consumer_drop_oldest\"} 0",
            "wsrelay_history_resumes_total{reason=\"unavailable\"} 0",
        ] {
            assert!(text.contains(sample), "{sample} missing in {text}");
        }
        for name in [
            "wsrelay_messages_delivered_total",
            "wsrelay_nats_subscriptions",
            "wsrelay_delivery_latency_seconds_bucket",
            "wsrelay_draining",
            "wsrelay_drain_started_timestamp_seconds",
            "wsrelay_rebalancing",
            "wsrelay_rebalance_moved_total",
            "wsrelay_drain_grace_period_seconds",
            "wsrelay_nats_connected",
            "wsrelay_queued_bytes",
            "wsrelay_handshakes_in_flight",
        ] {
            assert!(text.contains(name), "{name} missing in {text}");
        }
    }

    #[test]
    fn the_last_nats_error_is_one_sample_cleared_on_connect() {
        let m = Metrics::new();
        m.nats_failed("nats://a:4222".into(), "timed out".into());
        m.nats_failed("nats://10.0.0.1:4222".into(), "connection refused".into());
        let text = m.encode();
        assert!(
            text.contains(
                "wsrelay_nats_last_error{server=\"nats://10.0.0.1:4222\",error=\"connection refused\"} 1"
            ),
            "{text}"
        );
        assert!(!text.contains("nats://a:4222"), "{text}");
        m.nats_last_error.clear();
        assert!(!m.encode().contains("wsrelay_nats_last_error{"));
        assert!(text.contains("wsrelay_config_rejected 0"), "{text}");
    }
}
