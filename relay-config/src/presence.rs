//! Presence of a binding's channels (docs/protocol.md section 10): who a member is, what the
//! others see of it, and how join/leave events are bounded.

use serde::{Deserialize, Serialize};

use super::{Config, ValidationError};
use crate::template::{TemplateToken, parse_subject_template};

/// A binding's presence. Present: every subscriber of the binding's channels is a member,
/// written to the connection registry (the config's `registry` section is then required).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Presence {
    /// Who a member is: a template of literals, the channel's placeholders and claims, like a
    /// subject template (`{claims.sub}`, `{claims.org.id}.{claims.sub}`). Several connections
    /// that render the same key are one member. Default `{claims.sub}`.
    #[serde(default = "default_key")]
    pub key: String,
    /// Claims the other members see as this member's `info` (`claims.name`; at most 8).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub info: Vec<String>,
    /// Send `join` and `leave` frames. Default true. False: `occupancy` only.
    #[serde(default = "default_events")]
    pub events: bool,
    /// Above this many members a channel sends `occupancy` only (at most one per second),
    /// never per-member events. Between 1 and 10000. Default 200.
    #[serde(default = "default_max_members_with_events")]
    pub max_members_with_events: u32,
    /// A member whose connections all ended and who is back within this many seconds makes
    /// no leave/join pair. Between 0 and 300. Default 10.
    #[serde(default = "default_leave_grace_seconds")]
    pub leave_grace_seconds: u64,
}

/// Default `presence.key`.
pub const DEFAULT_PRESENCE_KEY: &str = "{claims.sub}";
/// Most `presence.info` paths.
pub const MAX_PRESENCE_INFO: usize = 8;
/// Upper bound of `presence.maxMembersWithEvents`.
pub const MAX_MEMBERS_WITH_EVENTS: u32 = 10_000;
/// Upper bound of `presence.leaveGraceSeconds`.
pub const MAX_LEAVE_GRACE_SECONDS: u64 = 300;

fn default_key() -> String {
    DEFAULT_PRESENCE_KEY.to_owned()
}
fn default_events() -> bool {
    true
}
fn default_max_members_with_events() -> u32 {
    200
}
fn default_leave_grace_seconds() -> u64 {
    10
}

impl Default for Presence {
    fn default() -> Self {
        Self {
            key: default_key(),
            info: Vec::new(),
            events: default_events(),
            max_members_with_events: default_max_members_with_events(),
            leave_grace_seconds: default_leave_grace_seconds(),
        }
    }
}

/// The claim path of an `info` entry (`claims.org.name` → `["org", "name"]`), if it is one.
pub fn info_claim_path(entry: &str) -> Option<Vec<&str>> {
    let path = entry.strip_prefix("claims.")?;
    let parts: Vec<&str> = path.split('.').collect();
    parts
        .iter()
        .all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
        .then_some(parts)
}

impl Config {
    pub(super) fn validate_presence(&self, errs: &mut Vec<ValidationError>) {
        for (i, b) in self.bindings.iter().enumerate() {
            let Some(p) = &b.presence else { continue };
            let field = |f: &str| format!("bindings[{i}].presence.{f}");
            if self.registry.is_none() {
                errs.push(ValidationError::Conflict {
                    field: format!("bindings[{i}].presence"),
                    other: "registry".into(),
                    reason: "presence is kept in the connection registry: configure `registry`"
                        .into(),
                });
            }
            if !b.direction.allows_subscribe() {
                errs.push(ValidationError::invalid(
                    format!("bindings[{i}].presence"),
                    "members are the channel's subscribers: the binding must allow subscribe",
                ));
            }
            match parse_subject_template(&p.key) {
                Err(e) => errs.push(ValidationError::invalid(
                    field("key"),
                    format!("{:?}: {e}", p.key),
                )),
                Ok(tokens) => {
                    let vars = crate::parse_template(&b.channel, true)
                        .map(|t| {
                            t.into_iter()
                                .filter_map(|t| match t {
                                    TemplateToken::Var(v) => Some(v),
                                    _ => None,
                                })
                                .collect::<Vec<_>>()
                        })
                        .unwrap_or_default();
                    for t in tokens {
                        if let TemplateToken::Var(v) = t
                            && !vars.contains(&v)
                        {
                            errs.push(ValidationError::invalid(
                                field("key"),
                                format!(
                                    "{{{v}}} is not a placeholder of the channel {:?}",
                                    b.channel
                                ),
                            ));
                        }
                    }
                }
            }
            if p.info.len() > MAX_PRESENCE_INFO {
                errs.push(ValidationError::invalid(
                    field("info"),
                    format!("at most {MAX_PRESENCE_INFO} claims"),
                ));
            }
            for (j, entry) in p.info.iter().enumerate() {
                if info_claim_path(entry).is_none() {
                    errs.push(ValidationError::invalid(
                        format!("bindings[{i}].presence.info[{j}]"),
                        format!(
                            "{entry:?} is not a claim path ('claims.' then names joined by '.')"
                        ),
                    ));
                }
            }
            if !(1..=MAX_MEMBERS_WITH_EVENTS).contains(&p.max_members_with_events) {
                errs.push(ValidationError::invalid(
                    field("maxMembersWithEvents"),
                    format!("must be between 1 and {MAX_MEMBERS_WITH_EVENTS}"),
                ));
            }
            if p.leave_grace_seconds > MAX_LEAVE_GRACE_SECONDS {
                errs.push(ValidationError::invalid(
                    field("leaveGraceSeconds"),
                    format!("must be at most {MAX_LEAVE_GRACE_SECONDS}"),
                ));
            }
        }
    }
}
