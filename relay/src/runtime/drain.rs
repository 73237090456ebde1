//! Graceful drain: readiness off, new connections refused, every client told when it
//! will be closed and closed with 1012 at its turn, spread across the grace period.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::Rng;
use rand::seq::SliceRandom;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::conn::close::Cause;
use crate::protocol;
use crate::state::Relay;

/// Share of the grace period over which clients are closed; the rest is for NATS to drain
/// and the process to exit.
pub const SPREAD_SHARE: f64 = 0.7;

/// Turn times for `n` connections: the window is cut into `n` equal slots and each turn
/// is drawn uniformly inside its slot, so closes are spread evenly and jittered. Pure
/// given `rng`; sorted ascending.
pub fn schedule(n: usize, window: Duration, rng: &mut impl Rng) -> Vec<Duration> {
    if n == 0 {
        return Vec::new();
    }
    let slot = window.as_secs_f64() / n as f64;
    (0..n)
        .map(|i| Duration::from_secs_f64(slot * (i as f64 + rng.random::<f64>())))
        .collect()
}

/// Drains the relay. Returns when every connection task has ended (or at the deadline)
/// and NATS has been drained.
///
/// With `drain.delayBeforeCloseSeconds`, the relay first only stops being ready and refuses
/// new connections for that long, so that Service endpoints and ingresses stop routing to it
/// before any client is told to reconnect; then turns are spread over 70% of the rest of
/// the grace period.
pub async fn drain(relay: &Arc<Relay>, grace: Duration) {
    let start = Instant::now();
    let deadline = start + grace.mul_f64(0.9);
    relay.draining.store(true, Ordering::SeqCst);
    relay.metrics.draining.set(1);
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    relay
        .metrics
        .drain_started
        .set(since_epoch.as_secs() as i64);
    let delay = Duration::from_secs(relay.settings().config.drain.delay_before_close_seconds)
        .min(grace.saturating_sub(Duration::from_secs(1)));
    if !delay.is_zero() {
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "draining: not ready, waiting before the first close"
        );
        tokio::time::sleep(delay).await;
    }
    let start = Instant::now();
    let window = grace.saturating_sub(delay).mul_f64(SPREAD_SHARE);
    let mut conns = relay.connections();
    let turns = {
        let mut rng = rand::rng();
        conns.shuffle(&mut rng);
        schedule(conns.len(), window, &mut rng)
    };
    tracing::info!(
        connections = conns.len(),
        window_ms = window.as_millis() as u64,
        "draining"
    );
    for (conn, turn) in conns.iter().zip(&turns) {
        conn.outbox.push_reply(Message::text(protocol::encode_drain(
            turn.as_millis() as u64,
            protocol::DrainReason::Shutdown,
        )));
    }
    let restart = Cause::Drain;
    for (conn, turn) in conns.iter().zip(&turns) {
        tokio::time::sleep_until(start + *turn).await;
        conn.outbox.close(restart);
    }
    // Anything that got through the upgrade while the snapshot was taken.
    for conn in relay.connections() {
        if !conn.outbox.is_closing() {
            conn.outbox.push_reply(Message::text(protocol::encode_drain(
                0,
                protocol::DrainReason::Shutdown,
            )));
            conn.outbox.close(restart);
        }
    }
    relay.shutdown.cancel();
    relay.tracker.close();
    if tokio::time::timeout_at(deadline, relay.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some connection tasks outlived the drain window");
    }
    // Every connection's close queued its delete: the registry flushes them, deletes what
    // is left of this relay's keys, then its lease (before NATS drains).
    if let Some(r) = &relay.registry {
        // At least the wait for resumes (`events.graceSeconds`), which the pod's
        // termination grace period includes.
        let left = deadline.saturating_duration_since(Instant::now());
        let least = r.grace() + Duration::from_secs(1);
        if tokio::time::timeout(left.max(least), r.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("registry: no time left to delete this relay's keys");
        }
    }
    let left = deadline.saturating_duration_since(Instant::now());
    relay.hub.close(left / 2).await;
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(
        left.max(Duration::from_millis(100)),
        relay.hub.client().drain(),
    )
    .await
    {
        Ok(Ok(())) => tracing::info!("NATS drained"),
        Ok(Err(e)) => tracing::warn!(error = %e, "NATS drain failed"),
        Err(_) => tracing::warn!("NATS drain timed out"),
    }
    tracing::info!(elapsed_ms = start.elapsed().as_millis() as u64, "drained");
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn schedule_spreads_evenly_inside_the_window() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let w = Duration::from_secs(10);
        let t = schedule(1000, w, &mut rng);
        assert_eq!(t.len(), 1000);
        assert!(t.windows(2).all(|p| p[0] <= p[1]));
        assert!(t.iter().all(|d| *d < w));
        // Each tenth of the window holds exactly a tenth of the turns.
        for k in 0..10u64 {
            let lo = Duration::from_secs(k);
            let hi = Duration::from_secs(k + 1);
            assert_eq!(t.iter().filter(|d| **d >= lo && **d < hi).count(), 100);
        }
        assert!(schedule(0, w, &mut rng).is_empty());
    }
}
