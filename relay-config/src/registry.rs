//! The connection registry: a JetStream KV bucket where every relay keeps a lease for
//! itself and an entry per open connection (docs/design/presence.md).

use serde::{Deserialize, Serialize};

use super::{Config, ValidationError};

/// The connection registry. Absent: the relay keeps no registry (no bucket, no lease).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Registry {
    /// Name of the KV bucket (letters, digits, `-`, `_`; at most 61: the bucket's stream is
    /// `KV_<bucket>`). The operator names it after the gateway; every relay of the gateway
    /// names the same bucket.
    pub bucket: String,
    /// How long a relay's lease outlives its last refresh: a relay refreshes it every third
    /// of this, and a relay silent for this long is taken for dead and its entries purged.
    /// Between 3 and 3600. Default 15.
    #[serde(default = "default_lease_seconds")]
    pub lease_seconds: u64,
    /// Bucket replicas in a NATS cluster (1, 3 or 5). Default 1.
    #[serde(default = "default_registry_replicas")]
    pub replicas: u8,
    /// Bytes the bucket keeps (its stream's `max_bytes`; writes beyond it are refused and
    /// counted). Reserved on the NATS servers' JetStream storage. Between 1 MiB and 1 TiB.
    /// Default 67108864 (64 MiB: about 400,000 connection entries).
    #[serde(default = "default_registry_bytes")]
    pub max_bytes: u64,
    /// This relay's name in the registry and in the `Wsrelay-Connection` header. Default:
    /// the pod name (`HOSTNAME`), else `nats.name`. Each relay of a gateway needs its own;
    /// set it only where relays do not run as pods (several relays on one host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_name: Option<String>,
}

fn default_lease_seconds() -> u64 {
    15
}
fn default_registry_replicas() -> u8 {
    1
}
/// Default `registry.maxBytes`: 64 MiB.
pub const DEFAULT_REGISTRY_BYTES: u64 = 64 << 20;
/// Lower bound of `registry.maxBytes`.
pub const MIN_REGISTRY_BYTES: u64 = 1 << 20;
/// Upper bound of `registry.maxBytes`.
pub const MAX_REGISTRY_BYTES: u64 = 1 << 40;
/// Lower bound of `registry.leaseSeconds`: a refresh every second, no faster.
pub const MIN_LEASE_SECONDS: u64 = 3;
/// Upper bound of `registry.leaseSeconds`.
pub const MAX_LEASE_SECONDS: u64 = 3600;
fn default_registry_bytes() -> u64 {
    DEFAULT_REGISTRY_BYTES
}

/// A relay's name as one registry key token: its pod name (`HOSTNAME`), each character a
/// key token refuses (a pod name may hold `.`) as `_`, at most 128 bytes. The relay names
/// its keys with it and the operator the relay it asks a survivor to forget. Pure.
pub fn relay_token(name: &str) -> String {
    let t: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '=' {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    if t.is_empty() { "_".to_owned() } else { t }
}

/// Whether `name` can name a KV bucket whose stream (`KV_<name>`) is a stream name.
fn is_bucket_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 61
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl Config {
    pub(super) fn validate_registry(&self, errs: &mut Vec<ValidationError>) {
        let Some(r) = &self.registry else {
            return;
        };
        if !is_bucket_name(&r.bucket) {
            errs.push(ValidationError::invalid(
                "registry.bucket",
                format!(
                    "{:?} is not a bucket name (letters, digits, '-', '_'; 1 to 61)",
                    r.bucket
                ),
            ));
        }
        if let Some(n) = &r.relay_name
            && (n.is_empty()
                || n.len() > 128
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '='))
        {
            errs.push(ValidationError::invalid(
                "registry.relayName",
                format!("{n:?} is not a relay name (letters, digits, '-', '_', '='; 1 to 128)"),
            ));
        }
        if !(MIN_LEASE_SECONDS..=MAX_LEASE_SECONDS).contains(&r.lease_seconds) {
            errs.push(ValidationError::invalid(
                "registry.leaseSeconds",
                format!("must be between {MIN_LEASE_SECONDS} and {MAX_LEASE_SECONDS}"),
            ));
        }
        if ![1, 3, 5].contains(&r.replicas) {
            errs.push(ValidationError::invalid(
                "registry.replicas",
                "must be 1, 3 or 5",
            ));
        }
        if !(MIN_REGISTRY_BYTES..=MAX_REGISTRY_BYTES).contains(&r.max_bytes) {
            errs.push(ValidationError::invalid(
                "registry.maxBytes",
                format!(
                    "must be between {MIN_REGISTRY_BYTES} (1 MiB) and {MAX_REGISTRY_BYTES} (1 TiB)"
                ),
            ));
        }
        let streams = self
            .bindings
            .iter()
            .filter_map(|b| b.history.as_ref())
            .map(|h| h.stream.as_str());
        let own = format!("KV_{}", r.bucket);
        if let Some(s) = streams.into_iter().find(|s| *s == own) {
            errs.push(ValidationError::Conflict {
                field: "registry.bucket".into(),
                other: "bindings[].history.stream".into(),
                reason: format!("the bucket's stream {own:?} is also a history stream ({s:?})"),
            });
        }
    }
}
