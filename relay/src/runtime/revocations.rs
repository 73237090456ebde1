//! Keeps the relay's revoked tokens (`access::revoked`) current from the connection
//! registry's `rev.` keys, which the control service's `revoke` and `invalidate` write: a new
//! one closes this relay's connections it covers (4409), and admission and `refresh` refuse
//! the tokens it covers. `/ready` waits until the keys present at the start were read, so a
//! relay started after a revocation refuses the token too.

use std::sync::Arc;

use crate::access::revoked::Revocation;
use crate::conn::close::Cause;
use crate::registry::keys::REVOKED_FILTER;
use crate::state::Relay;

/// Closes this relay's connections whose token `r` covers; returns how many (those already
/// closing for another cause are neither closed again nor counted).
pub fn close_covered(relay: &Relay, r: &Revocation) -> usize {
    let now = crate::clock::now_secs();
    let mut n = 0;
    for conn in relay.connections() {
        if conn.outbox.close_request().is_none() && conn.claims().is_some_and(|c| r.covers(&c, now))
        {
            conn.outbox.close(Cause::Revoked);
            n += 1;
        }
    }
    n
}

/// Watches the revocations until the relay stops (`super::follow`).
pub async fn watch(relay: Arc<Relay>) {
    let read = &relay.revocations_read;
    super::follow::follow(&relay, REVOKED_FILTER, read, "revocations", |key, value| {
        let r = value.and_then(|v| serde_json::from_slice::<Revocation>(&v).ok());
        if let Some(r) = &r {
            let closed = close_covered(&relay, r);
            if closed > 0 {
                tracing::info!(closed, "revoked tokens: connections closed");
            }
        }
        relay.revoked.set(&key, r);
        relay
            .metrics
            .revocations
            .set(i64::try_from(relay.revoked.len()).unwrap_or(i64::MAX));
        std::future::ready(())
    })
    .await;
}
