//! Why and how a connection ends: one table from cause to close code, reason, whether the
//! queue is written first, and the `reason` label of `wsrelay_connections_closed_total`.
//!
//! How a connection closes, as one sequence (docs/protocol.md section 6 has the table):
//!
//! ```text
//! open --close(cause)--> closing --flush_first--> flushing --(queue written)--> close frame
//!                                \--!flush_first--> killed: the write in progress is
//!                                    interrupted, the queue discarded --> close frame
//! close frame (bounded: CLOSE_FRAME_WITHIN, KILLED_CLOSE_WITHIN after a kill; none for
//!   PeerGone) --> the reader lingers (reads until the client's close, LINGER_WITHIN; for
//!   TooBig it holds the socket TOO_BIG_HOLD without reading) --> closed: unregistered,
//!   counted under `End::label()`
//! ```
//!
//! The first request wins; a later one changes nothing. A write that fails or makes no
//! progress for `limits.writeTimeoutSeconds` skips to closed (`write_error`,
//! `write_timeout`), with no close frame.

use std::time::Duration;

use crate::protocol::close;

/// Time the writer may take to send a close frame after the queue (flush-first closes, and
/// closes that find the writer idle).
pub const CLOSE_FRAME_WITHIN: Duration = Duration::from_secs(2);
/// Time a killed writer (it was blocked on a full socket) may still try its close frame.
pub const KILLED_CLOSE_WITHIN: Duration = Duration::from_millis(500);
/// Time the reader keeps reading after a close, for the client's close reply: closing a
/// socket with unread client data sends a TCP reset, and the client could lose the close.
pub const LINGER_WITHIN: Duration = Duration::from_secs(2);
/// After a 1009 the rest of the oversize message is unread: the reader waits for the writer
/// (at most `CLOSE_FRAME_WITHIN`), then holds the socket this long without reading.
pub const TOO_BIG_HOLD: Duration = Duration::from_millis(500);

/// Why a connection is closed by the relay (or found closed by the client); the first one
/// asked of the outbox wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The client closed, or its stream ended or failed: no close frame, queue discarded.
    PeerGone,
    /// Nothing from the client for `limits.idleTimeoutSeconds`: 4000, queue discarded.
    Idle,
    /// The token's `exp` passed: 1008 after the queue.
    TokenExpired,
    /// A client message above `limits.maxMessageBytes`: 1009, queue discarded.
    TooBig,
    /// Requests above the rate after `2 × publishBurst` refusals in a row: 4029 after the
    /// queue (its 429 replies included).
    Flood,
    /// A send-queue limit under policy `disconnect`: 4008, queue discarded.
    SlowConsumer,
    /// The drain reached this connection's turn: 1012 after the queue (the `drain` notice).
    Drain,
    /// A rebalancing round reached this connection's turn: 1012 as for a drain (clients
    /// reconnect the same way), after the queue (the `drain` notice with its reason).
    Rebalance,
    /// The connection's own task panicked (a bug, caught at the task boundary): 1011, queue
    /// discarded.
    Internal,
    /// The backend's `disconnect` (control service), the client may come back: 4100 after
    /// the queue.
    Disconnect,
    /// The backend's `disconnect` with `reconnect: false`: 4101 after the queue; the client
    /// must not reconnect on its own.
    DisconnectFinal,
    /// The backend revoked the connection's token (control service `revoke`, `invalidate`):
    /// 4409 after the queue; the client must not reconnect with that token.
    Revoked,
}

/// One row of the table: close code, close reason, queue written first, metric label.
struct Row(u16, &'static str, bool, &'static str);

impl Cause {
    /// Whether the client may come back and resume the connection (docs/backend.md,
    /// *Resumes*): not after the backend closed it.
    pub const fn resumable(self) -> bool {
        !matches!(
            self,
            Self::Disconnect | Self::DisconnectFinal | Self::Revoked
        )
    }

    /// The table.
    const fn row(self) -> Row {
        match self {
            Self::PeerGone => Row(close::NORMAL, "", false, "normal"),
            Self::Idle => Row(close::IDLE_TIMEOUT, "idle timeout", false, "idle"),
            Self::TokenExpired => Row(close::POLICY, "token expired", true, "token_expired"),
            Self::TooBig => Row(close::TOO_BIG, "message too big", false, "too_big"),
            Self::Flood => Row(close::FLOOD, "request flood", true, "flood"),
            Self::SlowConsumer => Row(
                close::SLOW_CONSUMER,
                "slow consumer",
                false,
                "slow_consumer",
            ),
            Self::Drain => Row(close::RESTART, "service restart", true, "drain"),
            Self::Rebalance => Row(close::RESTART, "rebalancing", true, "rebalance"),
            Self::Internal => Row(close::INTERNAL, "internal error", false, "internal_error"),
            Self::Disconnect => Row(close::DISCONNECT, "disconnected", true, "disconnect"),
            Self::Revoked => Row(close::REVOKED, "token revoked", true, "revoked"),
            Self::DisconnectFinal => Row(
                close::DISCONNECT_FINAL,
                "disconnected, do not reconnect",
                true,
                "disconnect",
            ),
        }
    }

    /// The WebSocket close code.
    pub const fn code(self) -> u16 {
        self.row().0
    }

    /// The close reason (short, for people).
    pub const fn reason(self) -> &'static str {
        self.row().1
    }

    /// Whether what is queued is written before closing (drain), or discarded (slow
    /// consumer).
    pub const fn flush_first(self) -> bool {
        self.row().2
    }

    /// Whether the writer sends a close frame (not when the client is gone).
    pub fn sends_frame(self) -> bool {
        self != Self::PeerGone
    }

    /// The `reason` label of `wsrelay_connections_closed_total`.
    pub const fn label(self) -> &'static str {
        self.row().3
    }
}

/// How a connection's writer ended: a close it carried out, or a write that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Closed for this cause.
    Closed(Cause),
    /// The socket failed.
    WriteError,
    /// No progress within the write timeout: the peer takes no bytes.
    WriteTimeout,
    /// The writer stopped with no close asked of it (cannot happen; counted apart if it
    /// does).
    Other,
}

impl End {
    /// The `reason` label of `wsrelay_connections_closed_total`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Closed(c) => c.label(),
            Self::WriteError => "write_error",
            Self::WriteTimeout => "write_timeout",
            Self::Other => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_is_one_the_metric_documents() {
        let causes = [
            Cause::PeerGone,
            Cause::Idle,
            Cause::TokenExpired,
            Cause::TooBig,
            Cause::Flood,
            Cause::SlowConsumer,
            Cause::Drain,
            Cause::Rebalance,
            Cause::Internal,
            Cause::Disconnect,
            Cause::DisconnectFinal,
            Cause::Revoked,
        ];
        let ends = causes.iter().map(|c| End::Closed(*c)).chain([
            End::WriteError,
            End::WriteTimeout,
            End::Other,
        ]);
        for e in ends {
            assert!(
                crate::metrics::CLOSE_REASONS.contains(&e.label()),
                "{e:?} is counted under {}, which metrics::CLOSE_REASONS does not list",
                e.label()
            );
        }
        // Codes are distinct, so a client tells the causes apart by code alone; but a
        // rebalancing turn is a drain's 1012 on purpose: a client reconnects the same way.
        let mut codes: Vec<u16> = causes
            .iter()
            .filter(|c| **c != Cause::Rebalance)
            .map(|c| c.code())
            .collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), causes.len() - 1);
        assert_eq!(Cause::Rebalance.code(), Cause::Drain.code());
    }
}
