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
    /// Proxies (CIDRs, `10.0.0.0/8`, `2001:db8::/32`, or single addresses) whose
    /// `clientIpHeader` is believed. A request from one of them is counted (for
    /// `limits.maxConnectionsPerIp`) under the address the header names: the header's list is
    /// read from the right, skipping trusted proxies, and the first other address is the
    /// client. A request from any other peer is counted under the peer's address, whatever it
    /// sends. Empty (the default): the header is never read. The PROXY protocol is not
    /// supported.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "nets_or_addresses"
    )]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The header a trusted proxy puts the client's address in: a comma-separated list
    /// appended to by each proxy (`X-Forwarded-For`), or a single address (`X-Real-IP`).
    /// Default `X-Forwarded-For`.
    #[serde(default = "default_client_ip_header")]
    pub client_ip_header: String,
    /// The NATS subject under which each relay takes the SSE POSTs other relays forward to
    /// it (`<sseForwardSubject>.<relay>`: a POST may reach any relay of the gateway,
    /// docs/protocol.md section 9). Under `_WSRELAY` (no binding can map a channel there, so
    /// no client can publish on it), fixed tokens of letters, digits, `-` and `_`, at most
    /// 128 bytes. Read at the start. Default `_WSRELAY.sse`; the operator names it after the
    /// gateway, so gateways that share a NATS account never take each other's POSTs.
    #[serde(default = "default_sse_forward_subject")]
    pub sse_forward_subject: String,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            client: default_client_addr(),
            admin: default_admin_addr(),
            path: default_ws_path(),
            trusted_proxies: Vec::new(),
            client_ip_header: default_client_ip_header(),
            sse_forward_subject: default_sse_forward_subject(),
        }
    }
}

fn default_sse_forward_subject() -> String {
    format!("{}.sse", super::RELAY_SUBJECT_PREFIX)
}

/// Whether `s` can be `listen.sseForwardSubject`: `_WSRELAY` or under it, fixed tokens of
/// letters, digits, `-`, `_`, at most 128 bytes (room for the relay's token after it). Pure.
pub fn is_sse_forward_subject(s: &str) -> bool {
    s.len() <= 128
        && s.split('.').next() == Some(super::RELAY_SUBJECT_PREFIX)
        && s.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn default_client_ip_header() -> String {
    "X-Forwarded-For".to_owned()
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
        let h = &self.listen.client_ip_header;
        if h.is_empty()
            || !h
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        {
            errs.push(ValidationError::invalid(
                "listen.clientIpHeader",
                format!("{h:?} is not an HTTP header name"),
            ));
        }
        if !is_sse_forward_subject(&self.listen.sse_forward_subject) {
            errs.push(ValidationError::invalid(
                "listen.sseForwardSubject",
                format!(
                    "{:?} is not a fixed NATS subject under {} (dot-separated names of letters, digits, '-', '_'; at most 128 bytes)",
                    self.listen.sse_forward_subject,
                    super::RELAY_SUBJECT_PREFIX
                ),
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

/// CIDRs, or single addresses taken as a network of one (`10.1.2.3` is `10.1.2.3/32`).
fn nets_or_addresses<'de, D>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let items = <Vec<String> as Deserialize<'de>>::deserialize(d)?;
    items
        .iter()
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "{s:?} is neither a CIDR (10.0.0.0/8) nor an address (10.1.2.3)"
                    ))
                })
        })
        .collect()
}
