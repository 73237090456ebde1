//! A binding's `authorize` section and the connect step's backend request: who may use a
//! channel beyond what its templates decide (docs/protocol.md section 3).

use serde::{Deserialize, Serialize};

use super::{Config, Jwt, ValidationError};

/// Longest rule accepted, in bytes.
pub const MAX_RULE_BYTES: usize = 1024;
/// Longest backend timeout accepted, in milliseconds.
pub const MAX_TIMEOUT_MS: u64 = 5000;
/// Most decisions a binding's cache may be given.
pub const MAX_CACHE_ENTRIES: u32 = 1_000_000;

/// The checks a binding adds; all the ones named must allow, cheapest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authorize {
    /// A subscription token for the channel, sent with the `subscribe`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<SubscriptionToken>,
    /// A CEL expression over `claims`, `vars`, `channel` and `op` that must be `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Ask a backend over NATS request-reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<BackendRequest>,
}

impl Authorize {
    /// Whether it names no check at all.
    pub fn is_empty(&self) -> bool {
        self.token.is_none() && self.rule.is_none() && self.request.is_none()
    }
}

/// How subscription tokens are verified.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubscriptionToken {
    /// The binding's own key set. Absent: the connection tokens' (`auth.jwt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<Jwt>,
}

/// A question to the application's backend over NATS request-reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRequest {
    /// The NATS subject the backend serves (a fixed subject, no placeholders).
    pub subject: String,
    /// How long to wait for the reply, in milliseconds (1 to 5000). Default 300.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// How long a decision is reused for the same identity, operation and channel, in
    /// seconds; 0: never. Default 30.
    #[serde(default = "default_cache_seconds")]
    pub cache_seconds: u64,
    /// Most decisions kept. Default 10000.
    #[serde(default = "default_cache_entries")]
    pub cache_entries: u32,
    /// What a timeout decides. Default `deny`.
    #[serde(default)]
    pub on_timeout: OnTimeout,
}

fn default_timeout_ms() -> u64 {
    300
}
fn default_cache_seconds() -> u64 {
    30
}
fn default_cache_entries() -> u32 {
    10_000
}

/// What a backend that does not answer in time decides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OnTimeout {
    /// Refuse (503, retry later).
    #[default]
    Deny,
    /// Allow.
    Allow,
}

/// Whether `s` is a fixed NATS subject a relay may send requests to: dot-separated tokens
/// of letters, digits, `-` and `_`, outside the reserved namespaces.
pub(crate) fn is_request_subject(s: &str) -> bool {
    let first = s.split('.').next().unwrap_or_default();
    s.len() <= 256
        && !s.starts_with('$')
        && first != "_INBOX"
        && first != super::RELAY_SUBJECT_PREFIX
        && s.split('.').all(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

/// Checks a backend request's fields, naming them under `field`.
pub(super) fn validate_request(field: &str, r: &BackendRequest, errs: &mut Vec<ValidationError>) {
    if !is_request_subject(&r.subject) {
        errs.push(ValidationError::invalid(
            format!("{field}.subject"),
            format!(
                "{:?} is not a fixed NATS subject (dot-separated names of letters, digits, '-', '_'; at most 256 bytes; not '$...', '_INBOX' or '_WSRELAY')",
                r.subject
            ),
        ));
    }
    if r.timeout_ms == 0 || r.timeout_ms > MAX_TIMEOUT_MS {
        errs.push(ValidationError::invalid(
            format!("{field}.timeoutMs"),
            format!("must be 1 to {MAX_TIMEOUT_MS}"),
        ));
    }
    if r.cache_entries == 0 || r.cache_entries > MAX_CACHE_ENTRIES {
        errs.push(ValidationError::invalid(
            format!("{field}.cacheEntries"),
            format!("must be 1 to {MAX_CACHE_ENTRIES}"),
        ));
    }
}

impl Config {
    pub(super) fn validate_authorize(&self, errs: &mut Vec<ValidationError>) {
        if let Some(r) = &self.auth.connect_request {
            validate_request("auth.connectRequest", r, errs);
            if self.auth.jwt.is_none() {
                errs.push(ValidationError::Conflict {
                    field: "auth.connectRequest".into(),
                    other: "auth.jwt".into(),
                    reason:
                        "the connect step asks about a token's identity; without jwt there is none"
                            .into(),
                });
            }
        }
        for (i, b) in self.bindings.iter().enumerate() {
            let Some(a) = &b.authorize else { continue };
            let field = |f: &str| format!("bindings[{i}].authorize{f}");
            if a.is_empty() {
                errs.push(ValidationError::invalid(
                    field(""),
                    "names no check: set token, rule or request, or remove it",
                ));
            }
            if let Some(t) = &a.token {
                match &t.jwt {
                    Some(jwt) => super::auth::validate_jwt_at(&field(".token.jwt"), jwt, errs),
                    None if self.auth.jwt.is_none() => errs.push(ValidationError::Conflict {
                        field: field(".token"),
                        other: "auth.jwt".into(),
                        reason: "a subscription token is verified with auth.jwt's keys unless token.jwt names its own; set one".into(),
                    }),
                    None => {}
                }
            }
            if let Some(rule) = &a.rule
                && let Err(e) = crate::rule::check(rule)
            {
                errs.push(ValidationError::invalid(field(".rule"), e.to_string()));
            }
            if let Some(r) = &a.request {
                validate_request(&field(".request"), r, errs);
            }
        }
    }
}
