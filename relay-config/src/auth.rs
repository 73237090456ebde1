//! Client authentication: token sources, Origin allowlist, JWT verification.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Config, ValidationError};

/// Client authentication, decided on the HTTP request before the upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Auth {
    /// JWT verification. Absent: no token is accepted, so `allowAnonymous` must be true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<Jwt>,
    /// Where the token is looked for, tried in this order; the first present wins.
    /// Default: query parameter `token`, then the `Authorization: Bearer` header, then
    /// `Sec-WebSocket-Protocol`.
    #[serde(default = "default_token_sources")]
    pub token_sources: Vec<TokenSource>,
    /// Allowed values of the `Origin` header (`https://app.example.com`; `*` allows any).
    /// A request that carries an `Origin` not in the list is refused with 403. Empty: the
    /// `Origin` header is not checked. Requests without `Origin` (non-browser clients) are
    /// never refused for it.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Accept clients that present no token. They see only bindings that use no claims.
    /// A token that is present but invalid is refused all the same. Default false.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// Refuse a WebSocket request for auth, origin or capacity reasons *after* the upgrade:
    /// accept it, then close at once with 4401 (no or invalid token), 4403 (origin not
    /// allowed), 4429 (too many connections from this address or subject) or 4503 (at
    /// capacity, draining, keys unavailable) and a readable reason, instead of an HTTP 401,
    /// 403, 429 or 503 that browsers only report as 1006. Such a connection never subscribes
    /// and is not counted in `wsrelay_connections`. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refuse_after_upgrade: bool,
    /// The connect step: ask the application's backend, after the token is verified and
    /// before the upgrade, whether this identity may connect (docs/protocol.md section 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_request: Option<super::BackendRequest>,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            jwt: None,
            token_sources: default_token_sources(),
            allowed_origins: Vec::new(),
            allow_anonymous: false,
            refuse_after_upgrade: false,
            connect_request: None,
        }
    }
}

pub(super) fn default_token_sources() -> Vec<TokenSource> {
    vec![
        TokenSource::Query {
            name: "token".to_owned(),
        },
        TokenSource::AuthorizationHeader {},
        TokenSource::Subprotocol {},
    ]
}

/// One place a client token may be read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum TokenSource {
    /// A query parameter of the upgrade request: `{type: query, name: token}`.
    Query {
        /// Parameter name.
        name: String,
    },
    /// `Authorization: Bearer <token>`: `{type: authorizationHeader}`.
    AuthorizationHeader {},
    /// `Sec-WebSocket-Protocol: wsrelay.v1, bearer.<token>` (for browsers, which cannot set
    /// headers); the relay answers with `wsrelay.v1`, never echoing the token:
    /// `{type: subprotocol}`.
    Subprotocol {},
    /// A cookie: `{type: cookie, name: session}`. Needs `allowedOrigins`, since browsers send
    /// cookies on cross-site WebSocket requests.
    Cookie {
        /// Cookie name.
        name: String,
    },
}

/// A JWT signature algorithm the relay accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    /// HMAC with SHA-256 (shared secret).
    HS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// ECDSA P-256 with SHA-256.
    ES256,
}

impl JwtAlgorithm {
    fn is_hmac(self) -> bool {
        matches!(self, Self::HS256)
    }
}

/// JWT verification settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Jwt {
    /// Accepted algorithms. HS256 cannot be mixed with RS256/ES256 (that would allow
    /// algorithm confusion). Default `[RS256]`.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<JwtAlgorithm>,
    /// Where the verification key comes from (exactly one source).
    pub key: JwtKey,
    /// Required `iss` claim. Absent: not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Accepted `aud` values; the token's `aud` must contain one. Empty: `aud` not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Clock skew tolerated on `nbf`, in seconds (`exp` is enforced to the second: an expired
    /// token would only be closed at once). Default 30.
    #[serde(default = "default_leeway")]
    pub leeway_seconds: u64,
}

fn default_algorithms() -> Vec<JwtAlgorithm> {
    vec![JwtAlgorithm::RS256]
}
fn default_leeway() -> u64 {
    30
}

/// The source of JWT verification keys. Exactly one of the fields must be set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtKey {
    /// File holding the HMAC secret (raw bytes; trailing newline stripped). For HS256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac_secret_file: Option<PathBuf>,
    /// PEM file with an RSA or EC public key (or certificate). For RS256/ES256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_file: Option<PathBuf>,
    /// URL of a JWKS document (`https://issuer/.well-known/jwks.json`). For RS256/ES256.
    /// Keys are cached and refetched when a token names an unknown `kid`. Only keys for a
    /// configured algorithm are used: `use` absent or `sig`, `kty` `RSA` (RS256) or `EC` on
    /// P-256 (ES256), `alg` absent or configured. `https://` unless `jwksAllowHttp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// Keep fetched JWKS keys this long before refetching, in seconds. Default 300.
    #[serde(default = "default_jwks_cache")]
    pub jwks_cache_seconds: u64,
    /// Minimum time between two JWKS fetches (bounds refetches caused by unknown `kid`s),
    /// in seconds. Default 10.
    #[serde(default = "default_jwks_min_refresh")]
    pub jwks_min_refresh_seconds: u64,
    /// Allow an `http://` `jwksUrl` (keys fetched without TLS can be replaced by anyone on
    /// the path: for tests and loopback only). Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub jwks_allow_http: bool,
}

impl Default for JwtKey {
    fn default() -> Self {
        Self {
            hmac_secret_file: None,
            public_key_file: None,
            jwks_url: None,
            jwks_cache_seconds: default_jwks_cache(),
            jwks_min_refresh_seconds: default_jwks_min_refresh(),
            jwks_allow_http: false,
        }
    }
}

fn default_jwks_cache() -> u64 {
    300
}
fn default_jwks_min_refresh() -> u64 {
    10
}

impl Config {
    pub(super) fn validate_auth(&self, errs: &mut Vec<ValidationError>) {
        let auth = &self.auth;
        if auth.jwt.is_none() && !auth.allow_anonymous {
            errs.push(ValidationError::Conflict {
                field: "auth.jwt".into(),
                other: "auth.allowAnonymous".into(),
                reason:
                    "without jwt no client could ever connect; set auth.jwt or allowAnonymous: true"
                        .into(),
            });
        }
        if auth.jwt.is_some() && auth.token_sources.is_empty() {
            errs.push(ValidationError::Required {
                field: "auth.tokenSources".into(),
            });
        }
        let mut seen = BTreeSet::new();
        for (i, src) in auth.token_sources.iter().enumerate() {
            let field = format!("auth.tokenSources[{i}]");
            let (kind, name) = match src {
                TokenSource::Query { name } => ("query", Some(name)),
                TokenSource::Cookie { name } => ("cookie", Some(name)),
                TokenSource::AuthorizationHeader {} => ("authorizationHeader", None),
                TokenSource::Subprotocol {} => ("subprotocol", None),
            };
            if let Some(name) = name
                && (name.is_empty()
                    || name
                        .chars()
                        .any(|c| c.is_whitespace() || c.is_control() || "=;&,".contains(c)))
            {
                errs.push(ValidationError::invalid(
                    format!("{field}.name"),
                    "must be a non-empty name without whitespace, '=', ';', '&' or ','",
                ));
            }
            if !seen.insert(kind) {
                errs.push(ValidationError::invalid(
                    field.clone(),
                    format!("source type {kind} is listed twice"),
                ));
            }
            if kind == "cookie" && auth.allowed_origins.is_empty() {
                errs.push(ValidationError::Conflict {
                    field,
                    other: "auth.allowedOrigins".into(),
                    reason:
                        "a cookie token needs an Origin allowlist (cross-site WebSocket hijacking)"
                            .into(),
                });
            } else if kind == "cookie" && auth.allowed_origins.iter().any(|o| o == "*") {
                errs.push(ValidationError::Conflict {
                    field,
                    other: "auth.allowedOrigins".into(),
                    reason: "a cookie token cannot be combined with the origin '*': any site could open a connection with the visitor's cookie (cross-site WebSocket hijacking); list the allowed origins".into(),
                });
            }
        }
        for (i, origin) in auth.allowed_origins.iter().enumerate() {
            let ok = origin == "*"
                || ((origin.starts_with("https://") || origin.starts_with("http://"))
                    && !origin.ends_with('/')
                    && !origin.chars().any(char::is_whitespace)
                    && origin.split("://").nth(1).is_some_and(|h| !h.is_empty()));
            if !ok {
                errs.push(ValidationError::invalid(
                    format!("auth.allowedOrigins[{i}]"),
                    format!(
                        "{origin:?} is not an origin (scheme://host[:port], no path or trailing '/'), nor '*'"
                    ),
                ));
            }
        }
        if let Some(jwt) = &auth.jwt {
            validate_jwt(jwt, errs);
        }
    }
}

/// [`validate_jwt`] for a key set at `prefix` (a binding's subscription-token keys): the
/// same checks, naming the fields under `prefix`.
pub(super) fn validate_jwt_at(prefix: &str, jwt: &Jwt, errs: &mut Vec<ValidationError>) {
    let mut found = Vec::new();
    validate_jwt(jwt, &mut found);
    let rename = |f: &mut String| {
        if let Some(rest) = f.strip_prefix("auth.jwt") {
            *f = format!("{prefix}{rest}");
        }
    };
    for mut e in found {
        match &mut e {
            ValidationError::Required { field } | ValidationError::Invalid { field, .. } => {
                rename(field)
            }
            ValidationError::Conflict { field, other, .. } => {
                rename(field);
                rename(other);
            }
        }
        errs.push(e);
    }
}

fn validate_jwt(jwt: &Jwt, errs: &mut Vec<ValidationError>) {
    if jwt.algorithms.is_empty() {
        errs.push(ValidationError::Required {
            field: "auth.jwt.algorithms".into(),
        });
    }
    let hmac = jwt.algorithms.iter().any(|a| a.is_hmac());
    let public = jwt.algorithms.iter().any(|a| !a.is_hmac());
    if hmac && public {
        errs.push(ValidationError::invalid(
            "auth.jwt.algorithms",
            "HS256 cannot be combined with RS256/ES256 (algorithm confusion)",
        ));
    }
    let k = &jwt.key;
    let sources: Vec<&str> = [
        (k.hmac_secret_file.is_some(), "hmacSecretFile"),
        (k.public_key_file.is_some(), "publicKeyFile"),
        (k.jwks_url.is_some(), "jwksUrl"),
    ]
    .iter()
    .filter(|(set, _)| *set)
    .map(|(_, n)| *n)
    .collect();
    match sources.len() {
        0 => errs.push(ValidationError::invalid(
            "auth.jwt.key",
            "set one of hmacSecretFile, publicKeyFile, jwksUrl",
        )),
        1 => {}
        _ => errs.push(ValidationError::Conflict {
            field: "auth.jwt.key".into(),
            other: sources[1..].join(", "),
            reason: format!("set only one key source, found {}", sources.join(", ")),
        }),
    }
    if k.hmac_secret_file.is_some() && public {
        errs.push(ValidationError::Conflict {
            field: "auth.jwt.key.hmacSecretFile".into(),
            other: "auth.jwt.algorithms".into(),
            reason: "an HMAC secret verifies HS256 only".into(),
        });
    }
    if (k.public_key_file.is_some() || k.jwks_url.is_some()) && hmac {
        errs.push(ValidationError::Conflict {
            field: "auth.jwt.algorithms".into(),
            other: "auth.jwt.key".into(),
            reason: "HS256 needs hmacSecretFile, not a public key".into(),
        });
    }
    if k.public_key_file.is_some()
        && jwt.algorithms.contains(&JwtAlgorithm::RS256)
        && jwt.algorithms.contains(&JwtAlgorithm::ES256)
    {
        errs.push(ValidationError::invalid(
            "auth.jwt.algorithms",
            "one PEM public key is either RSA (RS256) or EC (ES256), not both",
        ));
    }
    if let Some(url) = &k.jwks_url {
        if url.starts_with("http://") && !k.jwks_allow_http {
            errs.push(ValidationError::Conflict {
                field: "auth.jwt.key.jwksUrl".into(),
                other: "auth.jwt.key.jwksAllowHttp".into(),
                reason: format!(
                    "{url:?} is not https: keys fetched without TLS can be replaced on the way; use https, or set jwksAllowHttp (tests, loopback)"
                ),
            });
        } else if !(url.starts_with("https://") || url.starts_with("http://")) {
            errs.push(ValidationError::invalid(
                "auth.jwt.key.jwksUrl",
                format!("{url:?} is not an https URL"),
            ));
        }
    }
    if k.jwks_cache_seconds == 0 {
        errs.push(ValidationError::invalid(
            "auth.jwt.key.jwksCacheSeconds",
            "must be at least 1",
        ));
    }
    if jwt.issuer.as_deref() == Some("") {
        errs.push(ValidationError::Required {
            field: "auth.jwt.issuer".into(),
        });
    }
    for (i, a) in jwt.audiences.iter().enumerate() {
        if a.is_empty() {
            errs.push(ValidationError::Required {
                field: format!("auth.jwt.audiences[{i}]"),
            });
        }
    }
    if jwt.leeway_seconds > 300 {
        errs.push(ValidationError::invalid(
            "auth.jwt.leewaySeconds",
            "must be at most 300",
        ));
    }
}
