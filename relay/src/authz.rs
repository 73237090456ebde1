//! Authorization: which channel a client may use, and the NATS subject it maps to.
//!
//! Pure. A binding's channel pattern is matched token by token against the channel the
//! client names; the subject template is rendered from the captured tokens and the JWT
//! claims. Every value that ends up in a subject is checked by [`check_value`], so no
//! client-chosen token and no claim can add a subject level or a wildcard.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::config::{Binding, Direction, History};
use crate::protocol::ErrorCode;
use crate::template::{TemplateToken, parse_subject_template, parse_template};

/// What a client wants to do on a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Receive messages.
    Subscribe,
    /// Send messages.
    Publish,
}

impl Operation {
    fn allowed_by(self, d: Direction) -> bool {
        match self {
            Self::Subscribe => d.allows_subscribe(),
            Self::Publish => d.allows_publish(),
        }
    }
}

/// Why a channel was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthzError {
    /// The channel name itself is malformed (empty token, wildcard, whitespace...).
    #[error("invalid channel {channel:?}: {reason}")]
    InvalidChannel {
        /// The channel.
        channel: String,
        /// Why.
        reason: &'static str,
    },
    /// No binding matches the channel.
    #[error("no binding for channel {0:?}")]
    NoBinding(String),
    /// A binding matches, but not for this operation.
    #[error("{op:?} is not allowed on channel {channel:?}")]
    WrongDirection {
        /// The channel.
        channel: String,
        /// The operation.
        op: Operation,
    },
    /// The subject needs a claim the connection does not have (or it is anonymous).
    #[error("channel {channel:?} needs claim {claim:?}, which the token does not carry")]
    MissingClaim {
        /// The channel.
        channel: String,
        /// Claim path, dotted.
        claim: String,
    },
    /// A claim value cannot go into a subject.
    #[error("claim {claim:?} cannot be used in a subject: {reason}")]
    InvalidClaim {
        /// Claim path, dotted.
        claim: String,
        /// Why.
        reason: &'static str,
    },
    /// The rendered subject is longer than [`MAX_SUBJECT_LEN`] (a long claim): NATS would
    /// refuse the control line and drop the relay's whole connection.
    #[error(
        "channel {channel:?} maps to a subject of {len} bytes, above the limit of {MAX_SUBJECT_LEN}"
    )]
    SubjectTooLong {
        /// The channel.
        channel: String,
        /// Length of the rendered subject.
        len: usize,
    },
    /// The rendered subject is in a namespace NATS reserves (`$JS.`, `$SYS.`, `_INBOX.`...).
    #[error("channel {channel:?} maps to a reserved NATS subject")]
    ReservedSubject {
        /// The channel.
        channel: String,
    },
}

/// Longest subject a channel may map to, in bytes. NATS's control line (`SUB <subject>
/// <sid>`) is limited to 4 KiB by default; real subjects are far shorter.
pub const MAX_SUBJECT_LEN: usize = 512;

/// Whether `subject` is in a namespace NATS reserves for itself or for request/reply, or
/// in the relay's own: anything starting with `$` (`$JS.`, `$SYS.`, `$KV.`...), `_INBOX.`,
/// or `_WSRELAY.` (history republishing and SUB confirmations, `crate::confirm`). Pure.
pub fn is_reserved_subject(subject: &str) -> bool {
    let first = subject.split('.').next().unwrap_or_default();
    subject.starts_with('$') || RESERVED_FIRST_TOKENS.contains(&first)
}

/// First tokens no binding may map to: NATS's request/reply inboxes and the relay's own.
pub const RESERVED_FIRST_TOKENS: &[&str] = &["_INBOX", crate::config::RELAY_SUBJECT_PREFIX];

/// Checks one value (a channel token or a claim) before it goes into a subject: it must
/// not be empty and must not contain `.`, `*`, `>`, whitespace or control characters.
pub fn check_value(v: &str) -> Result<(), &'static str> {
    if v.is_empty() {
        return Err("empty value");
    }
    if v.contains('.') {
        return Err("contains '.'");
    }
    if v.contains(['*', '>']) {
        return Err("contains a wildcard ('*' or '>')");
    }
    if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace or a control character");
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct Compiled {
    /// Its index in the config's bindings.
    index: usize,
    channel: Vec<TemplateToken>,
    subject: Vec<TemplateToken>,
    direction: Direction,
    history: Option<History>,
    /// Its `presence.key`, parsed (a binding with presence).
    presence_key: Option<Vec<TemplateToken>>,
}

/// What a channel resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The NATS subject.
    pub subject: String,
    /// The binding's history, when its channels are resumable.
    pub history: Option<History>,
    /// The binding's index in the config.
    pub binding: usize,
}

/// The bindings of a config, parsed once.
#[derive(Debug, Clone, Default)]
pub struct Authorizer {
    bindings: Vec<Compiled>,
}

/// Longest channel name accepted, in bytes.
pub const MAX_CHANNEL_LEN: usize = 256;

impl Authorizer {
    /// Compiles bindings; the config has been validated, so invalid ones are skipped.
    pub fn new(bindings: &[Binding]) -> Self {
        let bindings = bindings
            .iter()
            .enumerate()
            .filter_map(|(index, b)| {
                Some(Compiled {
                    index,
                    channel: parse_template(&b.channel, true).ok()?,
                    subject: parse_subject_template(&b.subject).ok()?,
                    direction: b.direction,
                    history: b.history.clone(),
                    presence_key: match &b.presence {
                        None => None,
                        Some(p) => Some(parse_subject_template(&p.key).ok()?),
                    },
                })
            })
            .collect();
        Self { bindings }
    }

    /// Resolves `channel` for `op`: the subject of the first binding whose pattern matches
    /// and whose direction allows `op`. `claims` is `None` for anonymous connections.
    pub fn resolve(
        &self,
        channel: &str,
        op: Operation,
        claims: Option<&Map<String, Value>>,
    ) -> Result<String, AuthzError> {
        self.resolve_binding(channel, op, claims).map(|r| r.subject)
    }

    /// [`Authorizer::resolve`], with the matching binding's history.
    pub fn resolve_binding(
        &self,
        channel: &str,
        op: Operation,
        claims: Option<&Map<String, Value>>,
    ) -> Result<Resolved, AuthzError> {
        let invalid = |reason| AuthzError::InvalidChannel {
            channel: channel.to_owned(),
            reason,
        };
        if channel.len() > MAX_CHANNEL_LEN {
            return Err(invalid("longer than 256 bytes"));
        }
        let tokens: Vec<&str> = channel.split('.').collect();
        for t in &tokens {
            check_value(t).map_err(invalid)?;
        }
        let mut matched_other_direction = false;
        for b in &self.bindings {
            let Some(vars) = match_pattern(&b.channel, &tokens) else {
                continue;
            };
            if !op.allowed_by(b.direction) {
                matched_other_direction = true;
                continue;
            }
            let subject = render(&b.subject, &vars, claims, channel)?;
            if subject.len() > MAX_SUBJECT_LEN {
                return Err(AuthzError::SubjectTooLong {
                    channel: channel.to_owned(),
                    len: subject.len(),
                });
            }
            if is_reserved_subject(&subject) {
                return Err(AuthzError::ReservedSubject {
                    channel: channel.to_owned(),
                });
            }
            return Ok(Resolved {
                subject,
                history: b.history.clone(),
                binding: b.index,
            });
        }
        if matched_other_direction {
            Err(AuthzError::WrongDirection {
                channel: channel.to_owned(),
                op,
            })
        } else {
            Err(AuthzError::NoBinding(channel.to_owned()))
        }
    }
}

impl Authorizer {
    /// The placeholder values `channel` gives binding `binding` (`rooms.{room}` on
    /// `rooms.7`: `room` = `7`), in pattern order; empty when it does not match.
    pub fn vars(&self, binding: usize, channel: &str) -> Vec<(String, String)> {
        let tokens: Vec<&str> = channel.split('.').collect();
        let Some(b) = self.bindings.iter().find(|b| b.index == binding) else {
            return Vec::new();
        };
        if b.channel.len() != tokens.len() {
            return Vec::new();
        }
        b.channel
            .iter()
            .zip(&tokens)
            .filter_map(|(p, t)| match p {
                TemplateToken::Var(name) => Some((name.clone(), (*t).to_owned())),
                _ => None,
            })
            .collect()
    }
}

impl Authorizer {
    /// A member key of `channel` (which binding `binding` matched): the binding's
    /// `presence.key` rendered like its subject, from the channel's placeholders and
    /// `claims`. `None` when the binding has no presence; an error when `claims` cannot
    /// render it (anonymous, a claim missing or not fit for a subject).
    pub fn presence_key(
        &self,
        binding: usize,
        channel: &str,
        claims: Option<&Map<String, Value>>,
    ) -> Option<Result<String, AuthzError>> {
        let b = self.bindings.iter().find(|b| b.index == binding)?;
        let template = b.presence_key.as_ref()?;
        let tokens: Vec<&str> = channel.split('.').collect();
        let Some(vars) = match_pattern(&b.channel, &tokens) else {
            return Some(Err(AuthzError::NoBinding(channel.to_owned())));
        };
        Some(render(template, &vars, claims, channel))
    }
}

impl AuthzError {
    /// The error code a client hears for a channel the bindings refuse.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidChannel { .. }
            | Self::InvalidClaim { .. }
            | Self::SubjectTooLong { .. } => ErrorCode::InvalidValue,
            Self::NoBinding(_)
            | Self::WrongDirection { .. }
            | Self::MissingClaim { .. }
            | Self::ReservedSubject { .. } => ErrorCode::Forbidden,
        }
    }
}

fn match_pattern<'a>(
    pattern: &'a [TemplateToken],
    tokens: &[&'a str],
) -> Option<HashMap<&'a str, &'a str>> {
    if pattern.len() != tokens.len() {
        return None;
    }
    let mut vars = HashMap::new();
    for (p, t) in pattern.iter().zip(tokens) {
        match p {
            TemplateToken::Literal(l) if l == t => {}
            TemplateToken::Var(name) => {
                vars.insert(name.as_str(), *t);
            }
            _ => return None,
        }
    }
    Some(vars)
}

fn lookup_claim<'a>(claims: &'a Map<String, Value>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut v = claims.get(first)?;
    for seg in rest {
        v = v.as_object()?.get(seg)?;
    }
    Some(v)
}

fn render(
    subject: &[TemplateToken],
    vars: &HashMap<&str, &str>,
    claims: Option<&Map<String, Value>>,
    channel: &str,
) -> Result<String, AuthzError> {
    let mut out = String::with_capacity(64);
    for (i, tok) in subject.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        match tok {
            TemplateToken::Literal(l) => out.push_str(l),
            TemplateToken::Var(name) => {
                // Checked with the whole channel; validation guarantees the var exists.
                let Some(v) = vars.get(name.as_str()) else {
                    return Err(AuthzError::NoBinding(channel.to_owned()));
                };
                out.push_str(v);
            }
            TemplateToken::Claim(path) => {
                let dotted = path.join(".");
                let missing = || AuthzError::MissingClaim {
                    channel: channel.to_owned(),
                    claim: dotted.clone(),
                };
                let value = claims
                    .and_then(|c| lookup_claim(c, path))
                    .ok_or_else(missing)?;
                let text = match value {
                    Value::String(s) => s.clone(),
                    Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
                    Value::Null => return Err(missing()),
                    _ => {
                        return Err(AuthzError::InvalidClaim {
                            claim: dotted,
                            reason: "not a string or an integer",
                        });
                    }
                };
                check_value(&text).map_err(|reason| AuthzError::InvalidClaim {
                    claim: dotted.clone(),
                    reason,
                })?;
                out.push_str(&text);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn binding(channel: &str, subject: &str, direction: Direction) -> Binding {
        Binding {
            channel: channel.into(),
            subject: subject.into(),
            direction,
            history: None,
            authorize: None,
            presence: None,
            auto_subscribe: false,
        }
    }

    fn authz() -> Authorizer {
        Authorizer::new(&[
            binding("orders.{id}", "orders.{id}", Direction::Both),
            binding(
                "me.notify",
                "users.{claims.sub}.notify",
                Direction::Subscribe,
            ),
            binding(
                "org.{room}",
                "orgs.{claims.org.id}.rooms.{room}",
                Direction::Subscribe,
            ),
            binding("chat.{room}", "chat.in.{room}", Direction::Publish),
            binding("chat.{room}", "chat.out.{room}", Direction::Subscribe),
            binding("news", "public.news", Direction::Subscribe),
        ])
    }

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn resolves_tokens_and_claims() {
        let a = authz();
        let c = claims(json!({"sub": "42", "org": {"id": 7}}));
        assert_eq!(
            a.resolve("orders.99", Operation::Subscribe, None),
            Ok("orders.99".into())
        );
        assert_eq!(
            a.resolve("orders.99", Operation::Publish, None),
            Ok("orders.99".into())
        );
        assert_eq!(
            a.resolve("me.notify", Operation::Subscribe, Some(&c)),
            Ok("users.42.notify".into())
        );
        assert_eq!(
            a.resolve("org.lobby", Operation::Subscribe, Some(&c)),
            Ok("orgs.7.rooms.lobby".into())
        );
        assert_eq!(
            a.resolve("chat.r1", Operation::Publish, Some(&c)),
            Ok("chat.in.r1".into())
        );
        assert_eq!(
            a.resolve("chat.r1", Operation::Subscribe, Some(&c)),
            Ok("chat.out.r1".into())
        );
        assert_eq!(
            a.resolve("news", Operation::Subscribe, None),
            Ok("public.news".into())
        );
    }

    #[test]
    fn direction_is_enforced() {
        let a = authz();
        assert!(matches!(
            a.resolve("news", Operation::Publish, None),
            Err(AuthzError::WrongDirection { .. })
        ));
        assert!(matches!(
            a.resolve(
                "me.notify",
                Operation::Publish,
                Some(&claims(json!({"sub":"1"})))
            ),
            Err(AuthzError::WrongDirection { .. })
        ));
    }

    #[test]
    fn unknown_channels_are_refused() {
        let a = authz();
        for ch in [
            "orders",
            "orders.1.2",
            "users.42.notify",
            "new",
            "newsx",
            "me",
        ] {
            assert_eq!(
                a.resolve(ch, Operation::Subscribe, None),
                Err(AuthzError::NoBinding(ch.into())),
                "{ch}"
            );
        }
    }

    #[test]
    fn channel_injection_is_refused() {
        let a = authz();
        for ch in [
            "orders.*",
            "orders.>",
            "orders.1 2",
            "orders.1\t",
            "orders.\n1",
            "orders.",
            ".orders",
            "orders..1",
            "",
            "orders.a\u{0}b",
            "orders.\u{a0}",
            "orders.*.x",
        ] {
            let r = a.resolve(ch, Operation::Subscribe, None);
            assert!(
                matches!(r, Err(AuthzError::InvalidChannel { .. })),
                "{ch:?} gave {r:?}"
            );
        }
        let long = format!("orders.{}", "x".repeat(300));
        assert!(a.resolve(&long, Operation::Subscribe, None).is_err());
    }

    #[test]
    fn claim_injection_is_refused() {
        let a = authz();
        for sub in [
            json!("42.admin"),
            json!("*"),
            json!(">"),
            json!("a b"),
            json!(""),
            json!("x\n"),
            json!(" 42"),
            json!("4>2"),
            json!(true),
            json!(1.5),
            json!(["a"]),
            json!({"a": 1}),
        ] {
            let c = claims(json!({ "sub": sub }));
            let r = a.resolve("me.notify", Operation::Subscribe, Some(&c));
            assert!(
                matches!(r, Err(AuthzError::InvalidClaim { .. })),
                "{sub} gave {r:?}"
            );
        }
        assert_eq!(
            a.resolve(
                "me.notify",
                Operation::Subscribe,
                Some(&claims(json!({"sub": 42})))
            ),
            Ok("users.42.notify".into())
        );
        assert_eq!(
            a.resolve(
                "me.notify",
                Operation::Subscribe,
                Some(&claims(json!({"sub": -1})))
            ),
            Ok("users.-1.notify".into())
        );
    }

    #[test]
    fn missing_claims_and_anonymous_are_refused() {
        let a = authz();
        for c in [
            None,
            Some(claims(json!({}))),
            Some(claims(json!({"sub": null}))),
        ] {
            assert!(matches!(
                a.resolve("me.notify", Operation::Subscribe, c.as_ref()),
                Err(AuthzError::MissingClaim { .. })
            ));
        }
        assert!(matches!(
            a.resolve(
                "org.x",
                Operation::Subscribe,
                Some(&claims(json!({"org": "7"})))
            ),
            Err(AuthzError::MissingClaim { .. })
        ));
    }

    #[test]
    fn long_and_reserved_subjects_are_refused() {
        let a = authz();
        let long = "x".repeat(600);
        assert!(matches!(
            a.resolve(
                "me.notify",
                Operation::Subscribe,
                Some(&claims(json!({ "sub": long })))
            ),
            Err(AuthzError::SubjectTooLong { .. })
        ));
        let just = "x".repeat(MAX_SUBJECT_LEN - "users..notify".len());
        assert!(
            a.resolve(
                "me.notify",
                Operation::Subscribe,
                Some(&claims(json!({ "sub": just })))
            )
            .is_ok()
        );
        // Config validation refuses such templates; the authorizer refuses the subjects too.
        let raw = Authorizer::new(&[
            binding("a.{x}", "{x}.feed", Direction::Subscribe),
            binding("b", "$JS.API.INFO", Direction::Subscribe),
        ]);
        for (ch, subject) in [("a.$SYS", "$SYS"), ("a._INBOX", "_INBOX"), ("b", "$JS")] {
            assert!(
                matches!(
                    raw.resolve(ch, Operation::Subscribe, None),
                    Err(AuthzError::ReservedSubject { .. })
                ),
                "{ch} -> {subject}"
            );
        }
        assert!(raw.resolve("a.orders", Operation::Subscribe, None).is_ok());
        assert!(is_reserved_subject("_INBOX.abc"));
        assert!(is_reserved_subject("_WSRELAY.confirm.abc"));
        assert!(is_reserved_subject("_WSRELAY"));
        assert!(!is_reserved_subject("_WSRELAYS.a"));
        assert!(!is_reserved_subject("_INBOXES.a"));
        assert!(!is_reserved_subject("a.$JS"));
    }

    #[test]
    fn check_value_rules() {
        assert!(check_value("abc-DEF_123").is_ok());
        assert!(check_value("ünïcode").is_ok());
        for bad in ["", ".", "a.b", "*", ">", "a*", " ", "a\u{2003}b", "\u{7f}"] {
            assert!(check_value(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_presence_key_renders_like_a_subject_or_fails_without_its_claims() {
        let mut b = binding("rooms.{room}", "chat.{room}", Direction::Both);
        b.presence = Some(crate::config::Presence {
            key: "{room}.{claims.sub}".into(),
            ..Default::default()
        });
        let a = Authorizer::new(&[binding("plain", "plain", Direction::Both), b]);
        let claims = json!({"sub": "alice"});
        assert_eq!(
            a.presence_key(1, "rooms.7", claims.as_object())
                .unwrap()
                .unwrap(),
            "7.alice"
        );
        assert!(
            a.presence_key(1, "rooms.7", None).unwrap().is_err(),
            "anonymous"
        );
        assert!(
            a.presence_key(0, "plain", claims.as_object()).is_none(),
            "no presence"
        );
    }
}
