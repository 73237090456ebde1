//! Connections per token subject across the fleet (`limits.maxFleetConnectionsPerSubject`):
//! each relay keeps its own count of a subject's open connections in `subc.<sub>.<relay>`
//! (written in order with its other entries, purged with them), and a handshake adds up the
//! counts of the relays whose lease is live.

use bytes::Bytes;

use super::keys::{self, SubjectCount, VALUE_VERSION};
use super::{Registry, RegistryError};

/// Bound on adding up a subject's connections at a handshake; past it the handshake goes on
/// uncounted (a registry outage must not close the door).
pub const COUNT_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

impl Registry {
    /// Counts a connection of `sub` opened (`up`) or closed, and writes the new count (or
    /// deletes it at 0); a no-op when this relay does not count subjects.
    pub(super) fn count_subject(&self, sub: &str, up: bool) {
        let Some(subjects) = &self.subjects else {
            return;
        };
        let n = {
            let mut m = subjects.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(sub.to_owned()).or_default();
            *n = if up {
                n.saturating_add(1)
            } else {
                n.saturating_sub(1)
            };
            let n = *n;
            if n == 0 {
                m.remove(sub);
            }
            n
        };
        let key = keys::subject_count_key(sub, &self.relay);
        if n == 0 {
            self.delete(key);
        } else if let Ok(json) = serde_json::to_vec(&SubjectCount {
            v: VALUE_VERSION,
            n,
        }) {
            self.put(key, Bytes::from(json));
        }
    }

    /// How many connections `sub` holds on the relays with a live lease: this relay's own
    /// count, and what the others last wrote (bounded by [`COUNT_WITHIN`]).
    pub async fn fleet_connections(&self, sub: &str) -> Result<u32, RegistryError> {
        let own = self.subjects.as_ref().map_or(0, |s| {
            s.lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(sub)
                .copied()
                .unwrap_or(0)
        });
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let counts = tokio::time::timeout(
            COUNT_WITHIN,
            self.values(&[keys::subject_count_filter(sub)]),
        )
        .await
        .map_err(|_| RegistryError::Timeout { op: "count" })??;
        let others = counts
            .iter()
            .filter(|(k, _)| {
                let relay = k.rsplit('.').next().unwrap_or_default();
                relay != self.relay && live.contains(relay)
            })
            .filter_map(|(_, v)| serde_json::from_slice::<SubjectCount>(v).ok())
            .fold(0u32, |n, c| n.saturating_add(c.n));
        Ok(own.saturating_add(others))
    }
}
