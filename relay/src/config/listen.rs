//! Where the relay listens, and TLS for clients.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Config, ValidationError};

/// Listen addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listen {
    /// Address of the client (WebSocket) listener. Default `0.0.0.0:8080`.
    #[serde(default = "default_client_addr")]
    pub client: SocketAddr,
    /// Address of the admin listener (`/live`, `/ready`, `/metrics`). Default `0.0.0.0:9090`.
    #[serde(default = "default_admin_addr")]
    pub admin: SocketAddr,
    /// HTTP path of the WebSocket endpoint on the client listener. Default `/ws`.
    #[serde(default = "default_ws_path")]
    pub path: String,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            client: default_client_addr(),
            admin: default_admin_addr(),
            path: default_ws_path(),
        }
    }
}

fn default_client_addr() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}
fn default_admin_addr() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9090))
}
fn default_ws_path() -> String {
    "/ws".to_owned()
}

/// TLS for the client listener, from PEM files; the relay reloads them when they change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerTls {
    /// PEM file with the certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

impl Config {
    pub(super) fn validate_listen(&self, errs: &mut Vec<ValidationError>) {
        if self.listen.client == self.listen.admin && self.listen.client.port() != 0 {
            errs.push(ValidationError::Conflict {
                field: "listen.admin".into(),
                other: "listen.client".into(),
                reason: "the two listeners need different addresses".into(),
            });
        }
        if !self.listen.path.starts_with('/') {
            errs.push(ValidationError::invalid(
                "listen.path",
                "must start with '/'",
            ));
        }
        if let Some(tls) = &self.tls {
            if tls.cert_file.as_os_str().is_empty() {
                errs.push(ValidationError::Required {
                    field: "tls.certFile".into(),
                });
            }
            if tls.key_file.as_os_str().is_empty() {
                errs.push(ValidationError::Required {
                    field: "tls.keyFile".into(),
                });
            }
        }
    }
}
