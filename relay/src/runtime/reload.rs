//! Config reload (SIGHUP or file change) that keeps connections.
//!
//! Bindings and auth take effect at once for every request; subscriptions whose channel no
//! longer resolves to the same subject are ended with an `unsubscribed` notice. A binding's
//! `authorize` checks apply to new requests; live subscriptions are not re-checked against
//! them (a `refresh` re-checks a connection's).
//! `limits.maxConnections` changes at once; the other limits apply to connections opened
//! after the reload. Listen addresses, NATS settings and TLS file paths need a restart (a
//! warning says so); the TLS files themselves are reloaded when their content changes.

use std::path::Path;
use std::sync::Arc;

use crate::authz::Operation;
use crate::config::Config;
use crate::edge::Edge;
use crate::fanout::Target;
use crate::metrics::Reason;
use crate::session::requests::end;
use crate::state::{Relay, Settings};

/// Why a reload was refused (the old config stays in force).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file did not load or validate.
    #[error(transparent)]
    Load(#[from] crate::config::LoadError),
    /// A key file did not load.
    #[error(transparent)]
    Keys(#[from] crate::state::SettingsError),
}

/// Reloads from `path`. Returns how many subscriptions were ended.
pub fn reload(relay: &Arc<Relay>, edge: &Edge, path: &Path) -> Result<usize, ReloadError> {
    let result = reload_inner(relay, edge, path);
    let outcome = if result.is_ok() { "ok" } else { "error" };
    relay
        .metrics
        .config_rejected
        .set(i64::from(result.is_err()));
    relay
        .metrics
        .reloads
        .get_or_create(&Reason { reason: outcome })
        .inc();
    result
}

fn reload_inner(relay: &Arc<Relay>, edge: &Edge, path: &Path) -> Result<usize, ReloadError> {
    let settings = Settings::new(Config::load(path)?)?;
    let new = settings.config.clone();
    let old = relay.settings();
    if new.listen != old.config.listen
        || new.nats != old.config.nats
        || new.tls != old.config.tls
        || new.registry != old.config.registry
        || new.events != old.config.events
        || new.control != old.config.control
    {
        tracing::warn!(
            "listen, nats, tls, registry, events and control changes take effect at the next restart"
        );
    }
    edge.admission
        .slots
        .set_max(new.limits.max_connections as usize);
    let authz = settings.authz.clone();
    relay.swap_settings(settings);
    let mut ended = 0;
    for conn in relay.connections() {
        let claims = conn.claims();
        let gone: Vec<(String, String)> = conn
            .subscriptions()
            .into_iter()
            .filter(|(channel, key)| {
                authz
                    .resolve_binding(channel, Operation::Subscribe, claims.as_deref())
                    .map(|r| Target::of(&r).key)
                    .as_ref()
                    != Ok(key)
            })
            .collect();
        for (channel, subject) in gone {
            if end(&conn, relay, &channel, &subject, "binding removed") {
                ended += 1;
            }
        }
    }
    tracing::info!(ended_subscriptions = ended, "config reloaded");
    Ok(ended)
}
