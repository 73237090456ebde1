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
    /// What to do with a client whose send queue is full. Default `disconnect`.
    #[serde(default)]
    pub slow_consumer_policy: SlowConsumerPolicy,
    /// Channels one connection may be subscribed to at once. Default 100.
    #[serde(default = "default_max_subscriptions")]
    pub max_subscriptions_per_connection: u32,
    /// Sustained client publishes per second per connection (token bucket). Default 10.
    #[serde(default = "default_publish_rate")]
    pub publish_rate_per_second: u32,
    /// Publishes a connection may make in a burst above the rate. Default 20.
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

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            max_message_bytes: default_max_message_bytes(),
            send_queue_len: default_send_queue_len(),
            slow_consumer_policy: SlowConsumerPolicy::default(),
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
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            grace_period_seconds: default_grace(),
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
        let positive: [(&str, u64); 8] = [
            ("maxConnections", l.max_connections.into()),
            ("maxMessageBytes", l.max_message_bytes.into()),
            ("sendQueueLen", l.send_queue_len.into()),
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
