//! Bindings: client channels to NATS subjects.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{Config, ValidationError};
use crate::template::{TemplateToken, parse_subject_template, parse_template};

/// Direction a binding allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Direction {
    /// Clients may subscribe (NATS to client).
    #[default]
    Subscribe,
    /// Clients may publish (client to NATS).
    Publish,
    /// Both.
    Both,
}

impl Direction {
    /// Whether subscribing is allowed.
    pub fn allows_subscribe(self) -> bool {
        matches!(self, Self::Subscribe | Self::Both)
    }
    /// Whether publishing is allowed.
    pub fn allows_publish(self) -> bool {
        matches!(self, Self::Publish | Self::Both)
    }
}

/// Maps client-facing channels to a NATS subject.
///
/// A channel pattern is dot-separated tokens, each either a literal or a whole-token
/// placeholder `{name}` that matches one client-chosen token (`orders.{id}`). A subject
/// template is dot-separated tokens, each a literal, a placeholder from the channel pattern
/// (`{id}`) or a JWT claim (`{claims.sub}`, `{claims.org.id}` for nested claims). A value
/// substituted into a subject is refused if it is empty or holds `.`, `*`, `>` or whitespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Binding {
    /// Client-facing channel pattern, e.g. `orders.{id}` or `notifications`.
    pub channel: String,
    /// NATS subject template, e.g. `orders.{id}` or `users.{claims.sub}.notify`.
    pub subject: String,
    /// What clients may do on it. Default `subscribe`.
    #[serde(default)]
    pub direction: Direction,
}

impl Config {
    pub(super) fn validate_bindings(&self, errs: &mut Vec<ValidationError>) {
        if self.bindings.is_empty() {
            errs.push(ValidationError::Required {
                field: "bindings".into(),
            });
        }
        let mut channels = BTreeSet::new();
        for (i, b) in self.bindings.iter().enumerate() {
            let channel = match parse_template(&b.channel, true) {
                Ok(t) => Some(t),
                Err(e) => {
                    errs.push(ValidationError::invalid(
                        format!("bindings[{i}].channel"),
                        format!("{:?}: {e}", b.channel),
                    ));
                    None
                }
            };
            for dir in [b.direction.allows_subscribe(), b.direction.allows_publish()]
                .iter()
                .zip(["subscribe", "publish"])
                .filter(|(on, _)| **on)
                .map(|(_, d)| d)
            {
                if !channels.insert((b.channel.as_str(), dir)) {
                    errs.push(ValidationError::invalid(
                        format!("bindings[{i}].channel"),
                        format!("{:?} is bound twice for {dir}", b.channel),
                    ));
                }
            }
            match parse_subject_template(&b.subject) {
                Ok(subject) => {
                    match subject.first() {
                        Some(TemplateToken::Literal(first))
                            if first.starts_with('$') || first == "_INBOX" =>
                        {
                            errs.push(ValidationError::invalid(
                                format!("bindings[{i}].subject"),
                                format!(
                                    "{:?} is in a namespace NATS reserves ('$...', '_INBOX')",
                                    b.subject
                                ),
                            ));
                        }
                        Some(TemplateToken::Literal(_)) => {}
                        _ => errs.push(ValidationError::invalid(
                            format!("bindings[{i}].subject"),
                            format!(
                                "{:?} must start with a literal token (a placeholder first could reach '$JS.', '$SYS.' or '_INBOX.')",
                                b.subject
                            ),
                        )),
                    }
                    for tok in &subject {
                        match tok {
                            TemplateToken::Var(v) => {
                                if let Some(ch) = &channel
                                    && !ch.contains(&TemplateToken::Var(v.clone()))
                                {
                                    errs.push(ValidationError::invalid(
                                        format!("bindings[{i}].subject"),
                                        format!(
                                            "{{{v}}} is not a placeholder of the channel {:?}",
                                            b.channel
                                        ),
                                    ));
                                }
                            }
                            TemplateToken::Claim(path) => {
                                if self.auth.jwt.is_none() {
                                    errs.push(ValidationError::Conflict {
                                        field: format!("bindings[{i}].subject"),
                                        other: "auth.jwt".into(),
                                        reason: format!(
                                            "uses {{claims.{}}} but no JWT is configured",
                                            path.join(".")
                                        ),
                                    });
                                }
                            }
                            TemplateToken::Literal(_) => {}
                        }
                    }
                }
                Err(e) => errs.push(ValidationError::invalid(
                    format!("bindings[{i}].subject"),
                    format!("{:?}: {e}", b.subject),
                )),
            }
        }
    }
}
