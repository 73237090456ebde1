//! The NATS connection: servers, credentials, TLS.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Config, ValidationError};

/// The NATS connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Nats {
    /// Server URLs, e.g. `nats://nats.messaging:4222` (`tls://` to require TLS).
    pub urls: Vec<String>,
    /// Client name shown by the NATS server (`connz`). Default `wsrelay`.
    #[serde(default = "default_nats_name")]
    pub name: String,
    /// Credentials, by file path. At most one method may be set.
    #[serde(default)]
    pub credentials: NatsCredentials,
    /// TLS towards NATS. Absent: TLS only if a URL says `tls://` or the server requires it,
    /// verified against the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<NatsTls>,
}

pub(super) fn default_nats_name() -> String {
    "wsrelay".to_owned()
}

/// NATS credentials, each by the path of a file (mounted from a Secret). At most one
/// method: a token, a user and password pair, an NKey seed, or a `.creds` file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsCredentials {
    /// File holding a bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// File holding the user name (with `passwordFile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_file: Option<PathBuf>,
    /// File holding the password (with `userFile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// File holding an NKey seed (`SU...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (user JWT and NKey seed, as `nsc` writes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<PathBuf>,
}

impl NatsCredentials {
    /// Names of the credential methods that are set (for the "at most one" rule).
    fn methods(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if self.token_file.is_some() {
            m.push("tokenFile");
        }
        if self.user_file.is_some() || self.password_file.is_some() {
            m.push("userFile/passwordFile");
        }
        if self.nkey_seed_file.is_some() {
            m.push("nkeySeedFile");
        }
        if self.creds_file.is_some() {
            m.push("credsFile");
        }
        m
    }
}

/// TLS towards NATS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NatsTls {
    /// PEM file with the CA certificates that sign the NATS server certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `keyFile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM client key for mutual TLS (with `certFile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl Config {
    pub(super) fn validate_nats(&self, errs: &mut Vec<ValidationError>) {
        if self.nats.urls.is_empty() {
            errs.push(ValidationError::Required {
                field: "nats.urls".into(),
            });
        }
        for (i, url) in self.nats.urls.iter().enumerate() {
            let ok = ["nats://", "tls://", "ws://", "wss://"]
                .iter()
                .any(|s| url.strip_prefix(s).is_some_and(|rest| !rest.is_empty()));
            if !ok {
                errs.push(ValidationError::invalid(
                    format!("nats.urls[{i}]"),
                    format!("{url:?} is not a nats://, tls://, ws:// or wss:// URL"),
                ));
            }
        }
        if self.nats.name.is_empty() {
            errs.push(ValidationError::Required {
                field: "nats.name".into(),
            });
        }
        let c = &self.nats.credentials;
        let methods = c.methods();
        if methods.len() > 1 {
            errs.push(ValidationError::Conflict {
                field: "nats.credentials".into(),
                other: methods[1..].join(", "),
                reason: format!(
                    "set only one credential method, found {}",
                    methods.join(", ")
                ),
            });
        }
        if c.user_file.is_some() != c.password_file.is_some() {
            let missing = if c.user_file.is_none() {
                "nats.credentials.userFile"
            } else {
                "nats.credentials.passwordFile"
            };
            errs.push(ValidationError::invalid(
                missing,
                "userFile and passwordFile go together",
            ));
        }
        if let Some(tls) = &self.nats.tls
            && tls.cert_file.is_some() != tls.key_file.is_some()
        {
            errs.push(ValidationError::invalid(
                "nats.tls",
                "certFile and keyFile go together",
            ));
        }
    }
}
