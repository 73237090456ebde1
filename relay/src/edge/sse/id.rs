//! A session's id, `<relay>.<32 hex>`: the relay that holds the session (its name as a
//! NATS subject token, `config::relay_token`) and 128 random bits. A POST that reaches
//! another relay is forwarded to the one the id names (`super::forward`), with no lookup.
//! Parsed strictly before it reaches a NATS subject, a header or a log.

use std::fmt;

/// Hex digits of the random part.
const RANDOM_HEX: usize = 32;

/// A well-formed session id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionId(String);

impl SessionId {
    /// A fresh id for a session held by the relay whose token is `relay`.
    pub fn new(relay: &str) -> Self {
        Self(format!("{relay}.{:032x}", rand::random::<u128>()))
    }

    /// `s` if it is a session id: a relay token (1 to 128 of letters, digits, `-`, `_`,
    /// `=`), a `.`, 32 lowercase hex digits. Pure.
    pub fn parse(s: &str) -> Option<Self> {
        let (relay, random) = s.split_once('.')?;
        let token_ok = crate::registry::keys::is_token(relay);
        let random_ok = random.len() == RANDOM_HEX
            && random
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        (token_ok && random_ok).then(|| Self(s.to_owned()))
    }

    /// The token of the relay that holds the session.
    pub fn owner(&self) -> &str {
        self.0.split_once('.').map_or("", |(relay, _)| relay)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_names_its_relay_and_anything_else_is_refused() {
        let id = SessionId::new("wsrelay-7f9c_x=");
        assert_eq!(id.owner(), "wsrelay-7f9c_x=");
        assert_eq!(SessionId::parse(id.as_str()), Some(id.clone()));
        let hex = "0123456789abcdef0123456789abcdef";
        assert_eq!(SessionId::parse(&format!("r.{hex}")).unwrap().owner(), "r");
        for bad in [
            String::new(),
            hex.to_owned(),
            format!(".{hex}"),
            format!("r.{}", &hex[1..]),
            format!("r.{hex}0"),
            format!("r.{}", hex.to_uppercase()),
            format!("a.b.{hex}"),
            format!("a*.{hex}"),
            format!("a>.{hex}"),
            format!("a b.{hex}"),
            format!("a\n.{hex}"),
            format!("ü.{hex}"),
            format!("{}.{hex}", "r".repeat(129)),
            "00".to_owned(),
        ] {
            assert_eq!(SessionId::parse(&bad), None, "{bad:?}");
        }
        assert!(SessionId::parse(&format!("{}.{hex}", "r".repeat(128))).is_some());
    }
}
