//! wsrelay-config: the relay configuration file format (rendered by the operator, read by
//! the relay), the channel and subject template parser it validates with ([`template`]),
//! and the PEM loader both use for TLS ([`pem`], feature `pem`).
//!
//! This crate is the contract between the operator, which renders a [`Config`] into a
//! ConfigMap, and the relay, which reads it. Without features it depends on serde,
//! thiserror and ipnet only.
//!
//! On disk the file is YAML (the loader, [`load`], feature `load`). JSON is a
//! subset of YAML, so an operator may render the config with `serde_json` and the relay
//! reads it all the same.
//!
//! All field names are camelCase and unknown fields are refused, so a typo fails loudly.
//! Every duration is a whole number of seconds in a field whose name ends in `Seconds`.
//! Secrets are never inline: the config names files (mounted from Kubernetes Secrets).
//!
//! [`Config::validate`] is pure (it reads no file) and reports every problem it finds, each
//! naming the path of the field at fault (`bindings[2].subject`).
//!
//! Split by section: [`listen`], [`nats`], [`auth`], [`bindings`], [`limits`] (with drain),
//! [`registry`], [`env`] (secret path overrides) and the loader ([`load`], feature `load`). Each
//! section owns its types and the part of [`Config::validate`] that checks them.

use std::fmt;

use serde::{Deserialize, Serialize};

mod auth;
mod authorize;
mod bindings;
mod env;
mod events;
mod limits;
mod listen;
#[cfg(feature = "load")]
mod load;
mod nats;
#[cfg(feature = "pem")]
pub mod pem;
mod presence;
mod registry;
pub mod rule;
pub mod template;

pub use crate::template::{TemplateError, TemplateToken, parse_subject_template, parse_template};
pub use auth::*;
pub use authorize::*;
pub use bindings::*;
pub use env::*;
pub use events::*;
pub use limits::*;
pub use listen::*;
#[cfg(feature = "load")]
pub use load::*;
pub use nats::*;
pub use presence::*;
pub use registry::*;

/// The first token of every subject the relay uses for itself (history republishing,
/// SUB confirmations): reserved, no binding may map a channel under it.
pub const RELAY_SUBJECT_PREFIX: &str = "_WSRELAY";

/// Top-level relay configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Where the relay listens.
    #[serde(default)]
    pub listen: Listen,
    /// Serving certificate for `wss://` on the client port. Absent: plain `ws://`
    /// (TLS terminated in front of the relay, or not at all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
    /// The NATS connection (one per relay process).
    pub nats: Nats,
    /// How clients are authenticated before the WebSocket upgrade.
    #[serde(default)]
    pub auth: Auth,
    /// Which client-facing channels map to which NATS subjects, in which direction.
    /// The first binding whose channel pattern matches a channel wins.
    #[serde(default)]
    pub bindings: Vec<Binding>,
    /// Per-process and per-connection limits.
    #[serde(default)]
    pub limits: Limits,
    /// Graceful drain on SIGTERM.
    #[serde(default)]
    pub drain: Drain,
    /// The connection registry (a JetStream KV bucket: a lease per relay, an entry per
    /// connection). Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<Registry>,
    /// Lifecycle events for the backend (docs/backend.md). Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Events>,
    /// The control service for the backend (docs/backend.md). Absent: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control: Option<Control>,
}

/// One problem found by [`Config::validate`], naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// A required value is missing or empty.
    #[error("{field}: required, must not be empty")]
    Required {
        /// Path of the field, e.g. `nats.urls`.
        field: String,
    },
    /// A value is malformed or out of range.
    #[error("{field}: {reason}")]
    Invalid {
        /// Path of the field.
        field: String,
        /// What is wrong, for a person.
        reason: String,
    },
    /// Two settings that cannot be combined.
    #[error("{field}: conflicts with {other}: {reason}")]
    Conflict {
        /// Path of the field.
        field: String,
        /// Path of the other field.
        other: String,
        /// Why, for a person.
        reason: String,
    },
}

impl ValidationError {
    /// The path of the field at fault.
    pub fn field(&self) -> &str {
        match self {
            Self::Required { field }
            | Self::Invalid { field, .. }
            | Self::Conflict { field, .. } => field,
        }
    }

    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Every problem found in a config (never empty when returned as an error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error(s) in the relay config", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Checks everything that can be checked without touching the file system or network,
    /// and returns every problem found.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = Vec::new();
        self.validate_listen(&mut errs);
        self.validate_nats(&mut errs);
        self.validate_auth(&mut errs);
        self.validate_bindings(&mut errs);
        self.validate_authorize(&mut errs);
        self.validate_limits(&mut errs);
        self.validate_registry(&mut errs);
        self.validate_presence(&mut errs);
        self.validate_events(&mut errs);
        if self.drain.grace_period_seconds == 0 {
            errs.push(ValidationError::invalid(
                "drain.gracePeriodSeconds",
                "must be at least 1",
            ));
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(errs))
        }
    }
}

impl Config {
    /// Every file the config names, with the path of the field naming it (for checks that
    /// may touch the file system, e.g. `wsrelay check-config --check-files`).
    pub fn referenced_files(&self) -> Vec<(&'static str, &std::path::Path)> {
        let c = &self.nats.credentials;
        let nats_tls = self.nats.tls.as_ref();
        let jwt_key = self.auth.jwt.as_ref().map(|j| &j.key);
        let tls = self.tls.as_ref();
        [
            ("tls.certFile", tls.map(|t| &t.cert_file)),
            ("tls.keyFile", tls.map(|t| &t.key_file)),
            ("nats.credentials.tokenFile", c.token_file.as_ref()),
            ("nats.credentials.userFile", c.user_file.as_ref()),
            ("nats.credentials.passwordFile", c.password_file.as_ref()),
            ("nats.credentials.nkeySeedFile", c.nkey_seed_file.as_ref()),
            ("nats.credentials.credsFile", c.creds_file.as_ref()),
            ("nats.tls.caFile", nats_tls.and_then(|t| t.ca_file.as_ref())),
            (
                "nats.tls.certFile",
                nats_tls.and_then(|t| t.cert_file.as_ref()),
            ),
            (
                "nats.tls.keyFile",
                nats_tls.and_then(|t| t.key_file.as_ref()),
            ),
            (
                "auth.jwt.key.hmacSecretFile",
                jwt_key.and_then(|k| k.hmac_secret_file.as_ref()),
            ),
            (
                "auth.jwt.key.publicKeyFile",
                jwt_key.and_then(|k| k.public_key_file.as_ref()),
            ),
        ]
        .into_iter()
        .filter_map(|(field, p)| p.map(|p| (field, p.as_path())))
        .collect()
    }
}

#[cfg(test)]
mod tests;
