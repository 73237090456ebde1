//! Limits per connection and per process, and the drain.

use serde::{Deserialize, Serialize};

use super::{Config, ValidationError};

/// What happens when a client does not read fast enough and its send queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SlowConsumerPolicy {
    /// Close the connection with code 4008 (slow consumer).
    #[default]
    Disconnect,
    /// Drop the oldest queued message, count it, and tell the client with a `dropped` frame.
    DropOldest,
}

/// Limits. Zero is refused where it would make the relay useless.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Open WebSocket connections per relay process; beyond it, HTTP 503 with `Retry-After`
    /// before the upgrade. Default 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Largest WebSocket message a client may send, in bytes; larger closes with 1009.
    /// Also the largest NATS payload relayed to clients (larger are dropped and counted).
    /// Default 65536.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: u32,
    /// Frames queued per connection before the slow-consumer policy applies. Default 256.
    #[serde(default = "default_send_queue_len")]
    pub send_queue_len: u32,
    /// Bytes queued per connection before the slow-consumer policy applies (counted with
    /// `sendQueueLen`; the first to be reached applies). A message pushed to an empty queue
    /// is always queued. At least `maxMessageBytes`. Default 1048576 (1 MiB).
    #[serde(default = "default_send_queue_bytes")]
    pub send_queue_bytes: u64,
    /// Bytes queued on all connections of the process together. When a message would take
    /// the total above it, the slow-consumer policy applies to it if its connection already
    /// has something queued (it is behind); a connection with an empty queue (it keeps up)
    /// still gets it. Gauge `wsrelay_queued_bytes`. At least `sendQueueBytes`. Default
    /// 536870912 (512 MiB).
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: u64,
    /// What to do with a client whose send queue is full. Default `disconnect`.
    #[serde(default)]
    pub slow_consumer_policy: SlowConsumerPolicy,
    /// Open connections per client address; beyond it, HTTP 429 with `Retry-After` before
    /// the upgrade. The address is the peer's, or the one `listen.trustedProxies` lets a
    /// proxy header name; IPv6 addresses are counted per /64. 0: no limit (the default:
    /// behind a proxy that is not in `trustedProxies`, every client has the proxy's address).
    #[serde(default)]
    pub max_connections_per_ip: u32,
    /// Open connections per token subject (`sub` claim; anonymous clients are not counted);
    /// beyond it, HTTP 429 with `Retry-After` before the upgrade. 0: no limit (the default).
    #[serde(default)]
    pub max_connections_per_subject: u32,
    /// Open connections per token subject across the fleet: every relay that shares the
    /// connection registry (`registry`, which it needs) counts its own per subject there,
    /// and a handshake is refused like one over `maxConnectionsPerSubject` when the relays
    /// with a live lease hold this many already. Handshakes at the same instant on two relays
    /// may both pass (the counts are read, not reserved). 0: no limit (the default). Read at
    /// the start: a relay counts subjects only if it is set then.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_fleet_connections_per_subject: u32,
    /// HTTP handshakes (TLS included) in progress at once, from TCP accept to the upgrade
    /// response; beyond it a new TCP connection is answered 503 with `Retry-After` (on `ws://`)
    /// or closed (on `wss://`, where an answer would cost the TLS handshake it protects
    /// against). Default 1024.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes_in_flight: u32,
    /// Handshakes in progress at once from one client address (the TCP peer's, IPv6 per
    /// /64), counted from the TCP accept; beyond it the new TCP connection is refused like
    /// one over `maxHandshakesInFlight`. Peers in `listen.trustedProxies` are not counted
    /// (every client behind them shares their address). Unset: a quarter of
    /// `maxHandshakesInFlight` (at least 1). Also, a TCP connection takes one of the
    /// `maxHandshakesInFlight` slots only once its first bytes arrive, within 5 s (or the
    /// handshake timeout, if shorter) of the accept, else it is closed: a connect that sends
    /// nothing holds no slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_handshakes_in_flight_per_ip: Option<u32>,
    /// Storm control: new connections (WebSocket upgrades and SSE sessions) this relay admits
    /// per second, sustained, a token bucket checked before the token is verified; above it
    /// the handshake is refused 503 with `Retry-After: 1` (close 4503 with
    /// `auth.refuseAfterUpgrade`), counted as `accept_rate`. So that the clients of a relay
    /// that went away do not all land on one neighbour in the same second (each costs a JWT
    /// verification, the connect step, a resume, its subscriptions). 0: no limit (the
    /// default: the right rate depends on the pod's CPU and the backend behind the connect
    /// step, docs/operations.md).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub accept_rate_per_second: u32,
    /// New connections admitted at once above `acceptRatePerSecond` (the bucket's size; it
    /// starts full). Needs `acceptRatePerSecond`. Unset: equal to the rate (one second's
    /// worth, so at most twice the rate in any one second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_burst: Option<u32>,
    /// Channels one connection may be subscribed to at once. Default 100.
    #[serde(default = "default_max_subscriptions")]
    pub max_subscriptions_per_connection: u32,
    /// Sustained requests that cost work per second per connection: `subscribe`,
    /// `unsubscribe`, `publish` and `refresh` share one rate limit (a subscription costs the
    /// NATS server a `SUB` and a round trip, a publish a `PUB`, a refresh a JWT
    /// verification); a connection's first `maxSubscriptionsPerConnection` subscribes are
    /// not counted (a reconnecting client subscribes again at once). Above it each gets an `error`
    /// 429, and `2 × publishBurst` refusals in a row close the connection with 4029. The
    /// name is older than the limit's reach. Default 10.
    #[serde(default = "default_publish_rate")]
    pub publish_rate_per_second: u32,
    /// Such requests a connection may make in a burst above the rate. Default 20.
    #[serde(default = "default_publish_burst")]
    pub publish_burst: u32,
    /// Close a connection from which nothing (not even a pong) arrived for this long, in
    /// seconds. Default 60.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_seconds: u64,
    /// Interval between server WebSocket pings, in seconds. Must be below the idle timeout.
    /// Default 20.
    #[serde(default = "default_ping_interval")]
    pub ping_interval_seconds: u64,
    /// Time allowed from TCP accept to a completed upgrade (TLS included), in seconds.
    /// Default 10.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_seconds: u64,
    /// Time one write to a client (a batch of frames, a ping, a close) may take, in seconds;
    /// a client that takes no bytes for this long is dropped (close reason `write_timeout`).
    /// Also the client sockets' TCP user timeout. Default 10.
    #[serde(default = "default_write_timeout")]
    pub write_timeout_seconds: u64,
}

impl Limits {
    /// Handshakes one client address may have in progress at once.
    pub fn handshakes_per_ip(&self) -> u32 {
        self.max_handshakes_in_flight_per_ip
            .unwrap_or((self.max_handshakes_in_flight / 4).max(1))
    }

    /// The accept bucket's size: `acceptBurst`, else the rate.
    pub fn accept_burst(&self) -> u32 {
        self.accept_burst.unwrap_or(self.accept_rate_per_second)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            max_message_bytes: default_max_message_bytes(),
            send_queue_len: default_send_queue_len(),
            send_queue_bytes: default_send_queue_bytes(),
            max_queued_bytes: default_max_queued_bytes(),
            slow_consumer_policy: SlowConsumerPolicy::default(),
            max_connections_per_ip: 0,
            max_connections_per_subject: 0,
            max_fleet_connections_per_subject: 0,
            max_handshakes_in_flight: default_max_handshakes(),
            max_handshakes_in_flight_per_ip: None,
            accept_rate_per_second: 0,
            accept_burst: None,
            max_subscriptions_per_connection: default_max_subscriptions(),
            publish_rate_per_second: default_publish_rate(),
            publish_burst: default_publish_burst(),
            idle_timeout_seconds: default_idle_timeout(),
            ping_interval_seconds: default_ping_interval(),
            handshake_timeout_seconds: default_handshake_timeout(),
            write_timeout_seconds: default_write_timeout(),
        }
    }
}

fn default_max_connections() -> u32 {
    10_000
}
fn default_max_message_bytes() -> u32 {
    64 * 1024
}
fn default_send_queue_len() -> u32 {
    256
}
fn default_send_queue_bytes() -> u64 {
    1024 * 1024
}
fn default_max_queued_bytes() -> u64 {
    512 * 1024 * 1024
}
fn default_max_handshakes() -> u32 {
    1024
}
fn default_max_subscriptions() -> u32 {
    100
}
fn default_publish_rate() -> u32 {
    10
}
fn default_publish_burst() -> u32 {
    20
}
fn default_idle_timeout() -> u64 {
    60
}
fn default_ping_interval() -> u64 {
    20
}
fn default_handshake_timeout() -> u64 {
    10
}
fn default_write_timeout() -> u64 {
    10
}

/// Graceful drain on SIGTERM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Drain {
    /// Time from SIGTERM to exit, in seconds. Clients are closed spread over the first
    /// 70% of it; the relay then drains NATS and exits within 90% of it. The pod's
    /// `terminationGracePeriodSeconds` must be larger. Default 30.
    #[serde(default = "default_grace")]
    pub grace_period_seconds: u64,
    /// Time from SIGTERM to the first `drain` notice, in seconds (counted in the grace
    /// period). During it the relay is not ready and refuses new connections (503) but
    /// leaves open ones alone, so that the Service's endpoints and the ingress drop the pod
    /// before its clients reconnect: reconnects then land on other pods. Turns are spread
    /// over 70% of what remains of the grace period. Must leave at least 1 s of it.
    /// Default 0 (the operator sets it from the gateway's spec).
    #[serde(default)]
    pub delay_before_close_seconds: u64,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            grace_period_seconds: default_grace(),
            delay_before_close_seconds: 0,
        }
    }
}

fn default_grace() -> u64 {
    30
}

/// Largest accepted `maxMessageBytes` (NATS's own default max payload is 1 MiB; 8 MiB is a
/// hard ceiling to keep per-connection buffers bounded).
pub const MAX_MESSAGE_BYTES_CEILING: u32 = 8 * 1024 * 1024;

impl Config {
    pub(super) fn validate_limits(&self, errs: &mut Vec<ValidationError>) {
        let l = &self.limits;
        let positive: [(&str, u64); 11] = [
            ("maxConnections", l.max_connections.into()),
            ("maxMessageBytes", l.max_message_bytes.into()),
            ("sendQueueLen", l.send_queue_len.into()),
            ("sendQueueBytes", l.send_queue_bytes),
            ("maxQueuedBytes", l.max_queued_bytes),
            ("maxHandshakesInFlight", l.max_handshakes_in_flight.into()),
            (
                "maxSubscriptionsPerConnection",
                l.max_subscriptions_per_connection.into(),
            ),
            ("publishRatePerSecond", l.publish_rate_per_second.into()),
            ("idleTimeoutSeconds", l.idle_timeout_seconds),
            ("pingIntervalSeconds", l.ping_interval_seconds),
            ("handshakeTimeoutSeconds", l.handshake_timeout_seconds),
        ];
        for (name, v) in positive {
            if v == 0 {
                errs.push(ValidationError::invalid(
                    format!("limits.{name}"),
                    "must be at least 1",
                ));
            }
        }
        if l.max_fleet_connections_per_subject > 0 && self.registry.is_none() {
            errs.push(ValidationError::invalid(
                "limits.maxFleetConnectionsPerSubject",
                "needs registry: the relays count each subject's connections there",
            ));
        }
        if l.max_message_bytes > MAX_MESSAGE_BYTES_CEILING {
            errs.push(ValidationError::invalid(
                "limits.maxMessageBytes",
                format!("must be at most {MAX_MESSAGE_BYTES_CEILING}"),
            ));
        }
        if l.max_message_bytes != 0 && l.max_message_bytes < 256 {
            errs.push(ValidationError::invalid(
                "limits.maxMessageBytes",
                "must be at least 256 (room for the protocol envelope)",
            ));
        }
        if l.send_queue_bytes != 0 && l.send_queue_bytes < u64::from(l.max_message_bytes) {
            errs.push(ValidationError::Conflict {
                field: "limits.sendQueueBytes".into(),
                other: "limits.maxMessageBytes".into(),
                reason: "a connection's queue must have room for the largest message".into(),
            });
        }
        if l.max_queued_bytes != 0 && l.max_queued_bytes < l.send_queue_bytes {
            errs.push(ValidationError::Conflict {
                field: "limits.maxQueuedBytes".into(),
                other: "limits.sendQueueBytes".into(),
                reason: "the process budget must hold at least one connection's queue".into(),
            });
        }
        if l.max_handshakes_in_flight_per_ip == Some(0) {
            errs.push(ValidationError::invalid(
                "limits.maxHandshakesInFlightPerIp",
                "must be at least 1 (leave it unset for a quarter of maxHandshakesInFlight)",
            ));
        }
        if l.accept_burst == Some(0) {
            errs.push(ValidationError::invalid(
                "limits.acceptBurst",
                "must be at least 1 (leave it unset for one second's worth of the rate)",
            ));
        }
        if l.accept_burst.is_some() && l.accept_rate_per_second == 0 {
            errs.push(ValidationError::Conflict {
                field: "limits.acceptBurst".into(),
                other: "limits.acceptRatePerSecond".into(),
                reason: "a burst needs a rate (0 turns storm control off)".into(),
            });
        }
        let d = &self.drain;
        if d.grace_period_seconds != 0 && d.delay_before_close_seconds >= d.grace_period_seconds {
            errs.push(ValidationError::Conflict {
                field: "drain.delayBeforeCloseSeconds".into(),
                other: "drain.gracePeriodSeconds".into(),
                reason: "the delay must leave at least 1 s of the grace period for closing".into(),
            });
        }
        if l.publish_burst == 0 {
            errs.push(ValidationError::invalid(
                "limits.publishBurst",
                "must be at least 1",
            ));
        }
        if l.ping_interval_seconds >= l.idle_timeout_seconds && l.idle_timeout_seconds != 0 {
            errs.push(ValidationError::Conflict {
                field: "limits.pingIntervalSeconds".into(),
                other: "limits.idleTimeoutSeconds".into(),
                reason: "the ping interval must be shorter than the idle timeout".into(),
            });
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}
