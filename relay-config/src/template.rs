//! Channel patterns and subject templates: the parser used by config validation and by the
//! authorizer (`crate::authz`), which renders subjects from them. Pure, and compiled without
//! the `server` feature so the operator's config validation shares it.

use std::collections::BTreeSet;

/// One token of a parsed channel pattern or subject template.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TemplateToken {
    /// Matched or emitted literally.
    Literal(String),
    /// `{name}`: a client-chosen channel token.
    Var(String),
    /// `{claims.a.b}`: a JWT claim, by path (only in subject templates).
    Claim(Vec<String>),
}

/// Why a pattern or template does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// Nothing at all.
    #[error("must not be empty")]
    Empty,
    /// `a..b`, `.a`, `a.`.
    #[error("token {0} is empty (leading, trailing or doubled '.')")]
    EmptyToken(usize),
    /// `*`, `>`, whitespace, a control character or a stray brace in a literal token.
    #[error(
        "token {index} ({token:?}) may not contain '*', '>', '{{', '}}', whitespace or control characters"
    )]
    BadLiteral {
        /// Position of the token.
        index: usize,
        /// The token.
        token: String,
    },
    /// `{}` or `{a b}` or `{claims.}`.
    #[error("token {index} ({token:?}) is not a valid placeholder")]
    BadPlaceholder {
        /// Position of the token.
        index: usize,
        /// The token.
        token: String,
    },
    /// The same placeholder twice in a channel pattern.
    #[error("placeholder {{{0}}} appears twice")]
    DuplicateVar(String),
    /// A claim placeholder in a channel pattern.
    #[error("a channel pattern cannot use claims ({{claims.{0}}})")]
    ClaimInChannel(String),
}

fn is_ident(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Parses a channel pattern (`orders.{id}`) or a subject template
/// (`users.{claims.sub}.{id}`) into tokens. Pure.
pub fn parse_template(s: &str, is_channel: bool) -> Result<Vec<TemplateToken>, TemplateError> {
    if s.is_empty() {
        return Err(TemplateError::Empty);
    }
    if is_channel && let Some(pos) = s.find("{claims.") {
        let rest = &s[pos + "{claims.".len()..];
        let path = rest.split('}').next().unwrap_or(rest);
        return Err(TemplateError::ClaimInChannel(path.to_owned()));
    }
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (index, tok) in s.split('.').enumerate() {
        if tok.is_empty() {
            return Err(TemplateError::EmptyToken(index));
        }
        if let Some(inner) = tok.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
            if let Some(path) = inner.strip_prefix("claims.") {
                // The split on '.' above cut `{claims.a.b}` apart; claim paths are parsed
                // from the whole template below, so reaching here means `{claims.x}`.
                if is_channel {
                    return Err(TemplateError::ClaimInChannel(path.to_owned()));
                }
                if !is_ident(path) {
                    return Err(TemplateError::BadPlaceholder {
                        index,
                        token: tok.to_owned(),
                    });
                }
                out.push(TemplateToken::Claim(vec![path.to_owned()]));
            } else if is_ident(inner) && inner != "claims" {
                if is_channel && !seen.insert(inner.to_owned()) {
                    return Err(TemplateError::DuplicateVar(inner.to_owned()));
                }
                out.push(TemplateToken::Var(inner.to_owned()));
            } else {
                return Err(TemplateError::BadPlaceholder {
                    index,
                    token: tok.to_owned(),
                });
            }
        } else if tok.contains(['*', '>', '{', '}'])
            || tok.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(TemplateError::BadLiteral {
                index,
                token: tok.to_owned(),
            });
        } else {
            out.push(TemplateToken::Literal(tok.to_owned()));
        }
    }
    Ok(out)
}

/// Like [`parse_template`] for subject templates, but lets a claim path contain dots
/// (`{claims.org.id}` names the nested claim `org` → `id`).
pub fn parse_subject_template(s: &str) -> Result<Vec<TemplateToken>, TemplateError> {
    // Join `{claims.a` `.b}` pieces back together before parsing each token.
    let mut pieces: Vec<String> = Vec::new();
    let mut open: Option<String> = None;
    for part in s.split('.') {
        match open.take() {
            Some(mut acc) => {
                acc.push('.');
                acc.push_str(part);
                if part.ends_with('}') {
                    pieces.push(acc);
                } else {
                    open = Some(acc);
                }
            }
            None if part.starts_with("{claims") && !part.ends_with('}') => {
                open = Some(part.to_owned())
            }
            None => pieces.push(part.to_owned()),
        }
    }
    if let Some(acc) = open {
        pieces.push(acc);
    }
    if s.is_empty() {
        return Err(TemplateError::Empty);
    }
    let mut out = Vec::with_capacity(pieces.len());
    for (index, piece) in pieces.iter().enumerate() {
        if let Some(path) = piece
            .strip_prefix("{claims.")
            .and_then(|p| p.strip_suffix('}'))
        {
            let segs: Vec<String> = path.split('.').map(str::to_owned).collect();
            if segs.iter().any(|s| !is_ident(s)) {
                return Err(TemplateError::BadPlaceholder {
                    index,
                    token: piece.clone(),
                });
            }
            out.push(TemplateToken::Claim(segs));
        } else {
            match parse_template(piece, false) {
                Ok(mut toks) => out.append(&mut toks),
                Err(TemplateError::Empty) => return Err(TemplateError::EmptyToken(index)),
                Err(
                    TemplateError::BadLiteral { token, .. }
                    | TemplateError::BadPlaceholder { token, .. },
                ) => {
                    return Err(TemplateError::BadPlaceholder { index, token });
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(out)
}
