//! Rebalancing, the relay's part (docs/autoscaling.md, "Rebalancing"): the operator asks a
//! relay that holds more than its share of the fleet's connections to shed some
//! (`POST /rebalance` on the admin port). The relay stops being ready and refuses new
//! connections, so the clients it moves land on other relays and cannot come back; tells
//! each connection it picked its turn with the `drain` frame (`reason: "rebalance"`), the
//! turns spread over the window the operator gave; closes each with 1012 at its turn, as a
//! drain does; and is ready again a little after the last turn.
//!
//! Only connections whose subscriptions are all on resumable channels move (they resume
//! elsewhere without a loss), unless the operator says `includePlainChannels`. The oldest
//! move first: a client that just moved in is among the youngest, so it is not moved again.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::conn::ConnId;
use crate::conn::close::Cause;
use crate::protocol::{self, DrainReason};
use crate::state::Relay;

/// The longest window a round may spread its turns over.
pub const MAX_WINDOW: Duration = Duration::from_secs(3600);
/// Not ready this long before the first turn: the kubelet's readiness probe (every 2 s) and
/// the Service's endpoints must drop the relay before its clients reconnect.
pub const LEAVE_ENDPOINTS: Duration = Duration::from_secs(3);
/// Still not ready this long after the last turn: the last moved clients reconnect after
/// their own jitter and backoff, and must land elsewhere too.
pub const SETTLE: Duration = Duration::from_secs(5);

/// What the operator asks (the body of `POST /rebalance`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Ask {
    /// Connections to move.
    pub shed: u32,
    /// Spread of their turns, in milliseconds (at most [`MAX_WINDOW`]).
    pub window_ms: u64,
    /// Move connections with subscriptions on plain channels too (they may lose what is
    /// published while they reconnect).
    #[serde(default)]
    pub include_plain_channels: bool,
}

/// What the relay does about it (the answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Round {
    /// Connections that will move (at most `shed`).
    pub picked: usize,
    /// Connections that could have moved.
    pub eligible: usize,
    /// The window their turns are spread over.
    pub window_ms: u64,
}

/// Why a round cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RebalanceError {
    /// A round is under way on this relay.
    #[error("a rebalancing round is under way on this relay")]
    Busy,
    /// The relay is draining: every connection moves anyway.
    #[error("the relay is draining")]
    Draining,
}

/// One open connection as the choice sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub id: ConnId,
    /// When it opened (ms since the epoch).
    pub connected_at: u64,
    /// Whether it may move.
    pub movable: bool,
}

/// The connections to move: up to `shed` of the movable ones, oldest first. Pure.
pub fn pick(candidates: &[Candidate], shed: usize) -> Vec<ConnId> {
    let mut movable: Vec<&Candidate> = candidates.iter().filter(|c| c.movable).collect();
    movable.sort_by_key(|c| (c.connected_at, c.id));
    movable.into_iter().take(shed).map(|c| c.id).collect()
}

/// Clears the shedding state when the round ends, however it ends (a panic included).
struct Shedding(Arc<Relay>);

impl Drop for Shedding {
    fn drop(&mut self) {
        self.0.shedding.store(false, Ordering::SeqCst);
        self.0.metrics.rebalancing.set(0);
    }
}

/// Starts a round: the relay sheds at once, the turns follow in a task of their own.
pub fn start(relay: &Arc<Relay>, ask: &Ask) -> Result<Round, RebalanceError> {
    if relay.is_draining() {
        return Err(RebalanceError::Draining);
    }
    if relay
        .shedding
        .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return Err(RebalanceError::Busy);
    }
    let guard = Shedding(relay.clone());
    relay.metrics.rebalancing.set(1);
    let conns = relay.connections();
    let candidates: Vec<Candidate> = conns
        .iter()
        .filter(|c| !c.outbox.is_closing())
        .map(|c| Candidate {
            id: c.id,
            connected_at: c.connected_at,
            movable: ask.include_plain_channels
                || c.keys().iter().all(|k| relay.hub.is_resumable(k)),
        })
        .collect();
    let picked = pick(&candidates, ask.shed as usize);
    let window = Duration::from_millis(ask.window_ms).min(MAX_WINDOW);
    let round = Round {
        picked: picked.len(),
        eligible: candidates.iter().filter(|c| c.movable).count(),
        window_ms: window.as_millis() as u64,
    };
    let picked: std::collections::HashSet<ConnId> = picked.into_iter().collect();
    let moving: Vec<_> = conns
        .into_iter()
        .filter(|c| picked.contains(&c.id))
        .collect();
    tracing::info!(
        asked = ask.shed,
        picked = round.picked,
        eligible = round.eligible,
        connections = candidates.len(),
        window_ms = round.window_ms,
        "rebalancing: shedding connections"
    );
    let relay = relay.clone();
    tokio::spawn(async move {
        let metrics = relay.metrics.clone();
        crate::task::catch("rebalance", &metrics, turns(&relay, moving, window)).await;
        drop(guard);
        tracing::info!("rebalancing: round over, ready again");
    });
    Ok(round)
}

/// Waits out [`LEAVE_ENDPOINTS`], gives every moving connection its turn, closes each at it,
/// then waits out [`SETTLE`]. Stops early when the relay drains (the drain moves everyone).
async fn turns(relay: &Arc<Relay>, mut moving: Vec<Arc<crate::conn::Conn>>, window: Duration) {
    let stop = relay.shutdown.clone();
    let wait = |until: Instant| {
        let stop = stop.clone();
        async move {
            tokio::select! {
                () = tokio::time::sleep_until(until) => {}
                () = stop.cancelled() => {}
            }
        }
    };
    wait(Instant::now() + LEAVE_ENDPOINTS).await;
    let start = Instant::now();
    let schedule = {
        let mut rng = rand::rng();
        rand::seq::SliceRandom::shuffle(moving.as_mut_slice(), &mut rng);
        super::drain::schedule(moving.len(), window, &mut rng)
    };
    for (conn, turn) in moving.iter().zip(&schedule) {
        conn.outbox.push_reply(Message::text(protocol::encode_drain(
            turn.as_millis() as u64,
            DrainReason::Rebalance,
        )));
    }
    for (conn, turn) in moving.iter().zip(&schedule) {
        wait(start + *turn).await;
        if relay.is_draining() || stop.is_cancelled() {
            return;
        }
        if !conn.outbox.is_closing() {
            conn.outbox.close(Cause::Rebalance);
            relay.metrics.rebalance_moved.inc();
        }
    }
    wait(Instant::now() + SETTLE).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: ConnId, connected_at: u64, movable: bool) -> Candidate {
        Candidate {
            id,
            connected_at,
            movable,
        }
    }

    #[test]
    fn the_oldest_movable_connections_move_first() {
        let cands = [
            c(1, 300, true),
            c(2, 100, false),
            c(3, 200, true),
            c(4, 50, true),
            c(5, 400, true),
        ];
        assert_eq!(pick(&cands, 2), vec![4, 3]);
        assert_eq!(pick(&cands, 10), vec![4, 3, 1, 5]);
        assert!(pick(&cands, 0).is_empty());
        assert!(pick(&[], 3).is_empty());
    }

    #[test]
    fn the_ask_is_read_strictly() {
        let a: Ask = serde_json::from_str(r#"{"shed":3,"windowMs":2000}"#).unwrap();
        assert_eq!(
            a,
            Ask {
                shed: 3,
                window_ms: 2000,
                include_plain_channels: false
            }
        );
        for bad in [
            r#"{"shed":-1,"windowMs":2000}"#,
            r#"{"windowMs":2000}"#,
            r#"{"shed":3,"windowMs":2000,"extra":1}"#,
            r#"{"shed":3,"windowMs":"2000"}"#,
        ] {
            assert!(serde_json::from_str::<Ask>(bad).is_err(), "{bad}");
        }
    }
}
