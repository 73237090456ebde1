//! The relay configuration file format (rendered by the operator, read by the relay).
//!
//! This module is the contract between the operator, which renders a [`Config`] into a
//! ConfigMap, and the relay, which reads it. It depends on serde and thiserror only, so the
//! operator can use it with `default-features = false`.
//!
//! On disk the file is YAML (the relay's loader, behind the `server` feature). JSON is a
//! subset of YAML, so an operator may render the config with `serde_json` and the relay
//! reads it all the same.
//!
//! All field names are camelCase and unknown fields are refused, so a typo fails loudly.
//! Every duration is a whole number of seconds in a field whose name ends in `Seconds`.
//! Secrets are never inline: the config names files (mounted from Kubernetes Secrets).
//!
//! [`Config::validate`] is pure (it reads no file) and reports every problem it finds, each
//! naming the path of the field at fault (`bindings[2].subject`).

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Top-level relay configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Where the relay listens.
    #[serde(default)]
    pub listen: Listen,
    /// Serving certificate for `wss://` on the client port. Absent: plain `ws://`
    /// (TLS terminated in front of the relay, or not at all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
    /// The NATS connection (one per relay process).
    pub nats: Nats,
    /// How clients are authenticated before the WebSocket upgrade.
    #[serde(default)]
    pub auth: Auth,
    /// Which client-facing channels map to which NATS subjects, in which direction.
    /// The first binding whose channel pattern matches a channel wins.
    #[serde(default)]
    pub bindings: Vec<Binding>,
    /// Per-process and per-connection limits.
    #[serde(default)]
    pub limits: Limits,
    /// Graceful drain on SIGTERM.
    #[serde(default)]
    pub drain: Drain,
}

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

fn default_nats_name() -> String {
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
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            jwt: None,
            token_sources: default_token_sources(),
            allowed_origins: Vec::new(),
            allow_anonymous: false,
        }
    }
}

fn default_token_sources() -> Vec<TokenSource> {
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
    /// Clock skew tolerated on `exp` and `nbf`, in seconds. Default 30.
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
    /// Keys are cached and refetched when a token names an unknown `kid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// Keep fetched JWKS keys this long before refetching, in seconds. Default 300.
    #[serde(default = "default_jwks_cache")]
    pub jwks_cache_seconds: u64,
    /// Minimum time between two JWKS fetches (bounds refetches caused by unknown `kid`s),
    /// in seconds. Default 10.
    #[serde(default = "default_jwks_min_refresh")]
    pub jwks_min_refresh_seconds: u64,
}

impl Default for JwtKey {
    fn default() -> Self {
        Self {
            hmac_secret_file: None,
            public_key_file: None,
            jwks_url: None,
            jwks_cache_seconds: default_jwks_cache(),
            jwks_min_refresh_seconds: default_jwks_min_refresh(),
        }
    }
}

fn default_jwks_cache() -> u64 {
    300
}
fn default_jwks_min_refresh() -> u64 {
    10
}

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

/// What happens when a client does not read fast enough and its send queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SlowConsumerPolicy {
    /// Close the connection with code 4008 (slow consumer).
    #[default]
    Disconnect,
    /// Drop the oldest queued message, count it, and tell the client with a `dropped` frame.
    DropOldest,
}

/// Limits. Zero is refused where it would make the relay useless.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Open WebSocket connections per relay process; beyond it, HTTP 503 with `Retry-After`
    /// before the upgrade. Default 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Largest WebSocket message a client may send, in bytes; larger closes with 1009.
    /// Also the largest NATS payload relayed to clients (larger are dropped and counted).
    /// Default 65536.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: u32,
    /// Frames queued per connection before the slow-consumer policy applies. Default 256.
    #[serde(default = "default_send_queue_len")]
    pub send_queue_len: u32,
    /// What to do with a client whose send queue is full. Default `disconnect`.
    #[serde(default)]
    pub slow_consumer_policy: SlowConsumerPolicy,
    /// Channels one connection may be subscribed to at once. Default 100.
    #[serde(default = "default_max_subscriptions")]
    pub max_subscriptions_per_connection: u32,
    /// Sustained client publishes per second per connection (token bucket). Default 10.
    #[serde(default = "default_publish_rate")]
    pub publish_rate_per_second: u32,
    /// Publishes a connection may make in a burst above the rate. Default 20.
    #[serde(default = "default_publish_burst")]
    pub publish_burst: u32,
    /// Close a connection from which nothing (not even a pong) arrived for this long, in
    /// seconds. Default 60.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_seconds: u64,
    /// Interval between server WebSocket pings, in seconds. Must be below the idle timeout.
    /// Default 20.
    #[serde(default = "default_ping_interval")]
    pub ping_interval_seconds: u64,
    /// Time allowed from TCP accept to a completed upgrade (TLS included), in seconds.
    /// Default 10.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_seconds: u64,
    /// Time one write to a client (a batch of frames, a ping, a close) may take, in seconds;
    /// a client that takes no bytes for this long is dropped (close reason `write_timeout`).
    /// Also the client sockets' TCP user timeout. Default 10.
    #[serde(default = "default_write_timeout")]
    pub write_timeout_seconds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            max_message_bytes: default_max_message_bytes(),
            send_queue_len: default_send_queue_len(),
            slow_consumer_policy: SlowConsumerPolicy::default(),
            max_subscriptions_per_connection: default_max_subscriptions(),
            publish_rate_per_second: default_publish_rate(),
            publish_burst: default_publish_burst(),
            idle_timeout_seconds: default_idle_timeout(),
            ping_interval_seconds: default_ping_interval(),
            handshake_timeout_seconds: default_handshake_timeout(),
            write_timeout_seconds: default_write_timeout(),
        }
    }
}

fn default_max_connections() -> u32 {
    10_000
}
fn default_max_message_bytes() -> u32 {
    64 * 1024
}
fn default_send_queue_len() -> u32 {
    256
}
fn default_max_subscriptions() -> u32 {
    100
}
fn default_publish_rate() -> u32 {
    10
}
fn default_publish_burst() -> u32 {
    20
}
fn default_idle_timeout() -> u64 {
    60
}
fn default_ping_interval() -> u64 {
    20
}
fn default_handshake_timeout() -> u64 {
    10
}
fn default_write_timeout() -> u64 {
    10
}

/// Graceful drain on SIGTERM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Drain {
    /// Time from SIGTERM to exit, in seconds. Clients are closed spread over the first
    /// 70% of it; the relay then drains NATS and exits within 90% of it. The pod's
    /// `terminationGracePeriodSeconds` must be larger. Default 30.
    #[serde(default = "default_grace")]
    pub grace_period_seconds: u64,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            grace_period_seconds: default_grace(),
        }
    }
}

fn default_grace() -> u64 {
    30
}

/// Largest accepted `maxMessageBytes` (NATS's own default max payload is 1 MiB; 8 MiB is a
/// hard ceiling to keep per-connection buffers bounded).
pub const MAX_MESSAGE_BYTES_CEILING: u32 = 8 * 1024 * 1024;

/// One problem found by [`Config::validate`], naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// A required value is missing or empty.
    #[error("{field}: required, must not be empty")]
    Required {
        /// Path of the field, e.g. `nats.urls`.
        field: String,
    },
    /// A value is malformed or out of range.
    #[error("{field}: {reason}")]
    Invalid {
        /// Path of the field.
        field: String,
        /// What is wrong, for a person.
        reason: String,
    },
    /// Two settings that cannot be combined.
    #[error("{field}: conflicts with {other}: {reason}")]
    Conflict {
        /// Path of the field.
        field: String,
        /// Path of the other field.
        other: String,
        /// Why, for a person.
        reason: String,
    },
}

impl ValidationError {
    /// The path of the field at fault.
    pub fn field(&self) -> &str {
        match self {
            Self::Required { field }
            | Self::Invalid { field, .. }
            | Self::Conflict { field, .. } => field,
        }
    }

    fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Every problem found in a config (never empty when returned as an error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error(s) in the relay config", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

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
    /// `*`, `>`, whitespace or a stray brace in a literal token.
    #[error("token {index} ({token:?}) may not contain '*', '>', '{{', '}}' or whitespace")]
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
        } else if tok.contains(['*', '>', '{', '}']) || tok.chars().any(char::is_whitespace) {
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

impl Config {
    /// Checks everything that can be checked without touching the file system or network,
    /// and returns every problem found.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = Vec::new();
        self.validate_listen(&mut errs);
        self.validate_nats(&mut errs);
        self.validate_auth(&mut errs);
        self.validate_bindings(&mut errs);
        self.validate_limits(&mut errs);
        if self.drain.grace_period_seconds == 0 {
            errs.push(ValidationError::invalid(
                "drain.gracePeriodSeconds",
                "must be at least 1",
            ));
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(errs))
        }
    }

    fn validate_listen(&self, errs: &mut Vec<ValidationError>) {
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

    fn validate_nats(&self, errs: &mut Vec<ValidationError>) {
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

    fn validate_auth(&self, errs: &mut Vec<ValidationError>) {
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

    fn validate_bindings(&self, errs: &mut Vec<ValidationError>) {
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

    fn validate_limits(&self, errs: &mut Vec<ValidationError>) {
        let l = &self.limits;
        let positive: [(&str, u64); 8] = [
            ("maxConnections", l.max_connections.into()),
            ("maxMessageBytes", l.max_message_bytes.into()),
            ("sendQueueLen", l.send_queue_len.into()),
            (
                "maxSubscriptionsPerConnection",
                l.max_subscriptions_per_connection.into(),
            ),
            ("publishRatePerSecond", l.publish_rate_per_second.into()),
            ("idleTimeoutSeconds", l.idle_timeout_seconds),
            ("pingIntervalSeconds", l.ping_interval_seconds),
            ("handshakeTimeoutSeconds", l.handshake_timeout_seconds),
        ];
        for (name, v) in positive {
            if v == 0 {
                errs.push(ValidationError::invalid(
                    format!("limits.{name}"),
                    "must be at least 1",
                ));
            }
        }
        if l.max_message_bytes > MAX_MESSAGE_BYTES_CEILING {
            errs.push(ValidationError::invalid(
                "limits.maxMessageBytes",
                format!("must be at most {MAX_MESSAGE_BYTES_CEILING}"),
            ));
        }
        if l.max_message_bytes != 0 && l.max_message_bytes < 256 {
            errs.push(ValidationError::invalid(
                "limits.maxMessageBytes",
                "must be at least 256 (room for the protocol envelope)",
            ));
        }
        if l.publish_burst == 0 {
            errs.push(ValidationError::invalid(
                "limits.publishBurst",
                "must be at least 1",
            ));
        }
        if l.ping_interval_seconds >= l.idle_timeout_seconds && l.idle_timeout_seconds != 0 {
            errs.push(ValidationError::Conflict {
                field: "limits.pingIntervalSeconds".into(),
                other: "limits.idleTimeoutSeconds".into(),
                reason: "the ping interval must be shorter than the idle timeout".into(),
            });
        }
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
    if let Some(url) = &k.jwks_url
        && !(url.starts_with("https://") || url.starts_with("http://"))
    {
        errs.push(ValidationError::invalid(
            "auth.jwt.key.jwksUrl",
            format!("{url:?} is not an http(s) URL"),
        ));
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

impl Config {
    /// Every file the config names, with the path of the field naming it (for checks that
    /// may touch the file system, e.g. `wsrelay check-config --check-files`).
    pub fn referenced_files(&self) -> Vec<(&'static str, &std::path::Path)> {
        let c = &self.nats.credentials;
        let nats_tls = self.nats.tls.as_ref();
        let jwt_key = self.auth.jwt.as_ref().map(|j| &j.key);
        let tls = self.tls.as_ref();
        [
            ("tls.certFile", tls.map(|t| &t.cert_file)),
            ("tls.keyFile", tls.map(|t| &t.key_file)),
            ("nats.credentials.tokenFile", c.token_file.as_ref()),
            ("nats.credentials.userFile", c.user_file.as_ref()),
            ("nats.credentials.passwordFile", c.password_file.as_ref()),
            ("nats.credentials.nkeySeedFile", c.nkey_seed_file.as_ref()),
            ("nats.credentials.credsFile", c.creds_file.as_ref()),
            ("nats.tls.caFile", nats_tls.and_then(|t| t.ca_file.as_ref())),
            (
                "nats.tls.certFile",
                nats_tls.and_then(|t| t.cert_file.as_ref()),
            ),
            (
                "nats.tls.keyFile",
                nats_tls.and_then(|t| t.key_file.as_ref()),
            ),
            (
                "auth.jwt.key.hmacSecretFile",
                jwt_key.and_then(|k| k.hmac_secret_file.as_ref()),
            ),
            (
                "auth.jwt.key.publicKeyFile",
                jwt_key.and_then(|k| k.public_key_file.as_ref()),
            ),
        ]
        .into_iter()
        .filter_map(|(field, p)| p.map(|p| (field, p.as_path())))
        .collect()
    }
}

/// Environment variables that override secret file paths (so a Pod can mount Secrets
/// wherever it likes without re-rendering the ConfigMap).
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("WSRELAY_NATS_TOKEN_FILE", "nats.credentials.tokenFile"),
    ("WSRELAY_NATS_USER_FILE", "nats.credentials.userFile"),
    (
        "WSRELAY_NATS_PASSWORD_FILE",
        "nats.credentials.passwordFile",
    ),
    (
        "WSRELAY_NATS_NKEY_SEED_FILE",
        "nats.credentials.nkeySeedFile",
    ),
    ("WSRELAY_NATS_CREDS_FILE", "nats.credentials.credsFile"),
    ("WSRELAY_NATS_CA_FILE", "nats.tls.caFile"),
    (
        "WSRELAY_JWT_HMAC_SECRET_FILE",
        "auth.jwt.key.hmacSecretFile",
    ),
    ("WSRELAY_JWT_PUBLIC_KEY_FILE", "auth.jwt.key.publicKeyFile"),
    ("WSRELAY_TLS_CERT_FILE", "tls.certFile"),
    ("WSRELAY_TLS_KEY_FILE", "tls.keyFile"),
];

impl Config {
    /// Applies the [`ENV_OVERRIDES`] found by `lookup` (pure: pass `std::env::var(..).ok()`).
    /// An override of a JWT key file needs `auth.jwt` to be present; one of a TLS file
    /// creates `tls` if needed (and `validate` then asks for the other file).
    pub fn apply_env_overrides(&mut self, lookup: impl Fn(&str) -> Option<String>) {
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let c = &mut self.nats.credentials;
        for (var, slot) in [
            ("WSRELAY_NATS_TOKEN_FILE", &mut c.token_file),
            ("WSRELAY_NATS_USER_FILE", &mut c.user_file),
            ("WSRELAY_NATS_PASSWORD_FILE", &mut c.password_file),
            ("WSRELAY_NATS_NKEY_SEED_FILE", &mut c.nkey_seed_file),
            ("WSRELAY_NATS_CREDS_FILE", &mut c.creds_file),
        ] {
            if let Some(p) = get(var) {
                *slot = Some(p);
            }
        }
        if let Some(p) = get("WSRELAY_NATS_CA_FILE") {
            self.nats.tls.get_or_insert_with(NatsTls::default).ca_file = Some(p);
        }
        if let Some(jwt) = &mut self.auth.jwt {
            if let Some(p) = get("WSRELAY_JWT_HMAC_SECRET_FILE") {
                jwt.key.hmac_secret_file = Some(p);
            }
            if let Some(p) = get("WSRELAY_JWT_PUBLIC_KEY_FILE") {
                jwt.key.public_key_file = Some(p);
            }
        }
        let cert = get("WSRELAY_TLS_CERT_FILE");
        let key = get("WSRELAY_TLS_KEY_FILE");
        if cert.is_some() || key.is_some() {
            let tls = self.tls.get_or_insert_with(|| ServerTls {
                cert_file: PathBuf::new(),
                key_file: PathBuf::new(),
            });
            if let Some(p) = cert {
                tls.cert_file = p;
            }
            if let Some(p) = key {
                tls.key_file = p;
            }
        }
    }

    /// A minimal valid config: anonymous clients, one subscribe binding. Handy for tests
    /// and as a starting point for renderers.
    pub fn example(nats_url: &str) -> Self {
        Self {
            listen: Listen::default(),
            tls: None,
            nats: Nats {
                urls: vec![nats_url.to_owned()],
                name: default_nats_name(),
                credentials: NatsCredentials::default(),
                tls: None,
            },
            auth: Auth {
                allow_anonymous: true,
                ..Auth::default()
            },
            bindings: vec![Binding {
                channel: "public.{topic}".to_owned(),
                subject: "public.{topic}".to_owned(),
                direction: Direction::Subscribe,
            }],
            limits: Limits::default(),
            drain: Drain::default(),
        }
    }
}

/// Why a config file could not be loaded.
#[cfg(feature = "server")]
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid YAML/JSON for [`Config`] (unknown field, wrong type...).
    #[error("cannot parse {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the position.
        message: String,
    },
    /// It parsed, but [`Config::validate`] found problems.
    #[error("{path}: {errors}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        errors: ValidationErrors,
    },
}

#[cfg(feature = "server")]
impl Config {
    /// Parses a config from YAML (or JSON, which is YAML) text, without validating it.
    pub fn from_yaml_str(text: &str) -> Result<Self, String> {
        serde_saphyr::from_str(text).map_err(|e| e.to_string())
    }

    /// Reads `path`, applies the environment overrides and validates the result.
    pub fn load(path: &std::path::Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::from_yaml_str(&text).map_err(|message| LoadError::Parse {
            path: path.to_owned(),
            message,
        })?;
        config.apply_env_overrides(|k| std::env::var(k).ok());
        config.validate().map_err(|errors| LoadError::Invalid {
            path: path.to_owned(),
            errors,
        })?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"{
        "listen": {"client": "0.0.0.0:8080", "admin": "0.0.0.0:9090", "path": "/ws"},
        "tls": {"certFile": "/tls/tls.crt", "keyFile": "/tls/tls.key"},
        "nats": {
            "urls": ["nats://nats:4222"],
            "name": "wsrelay-gw",
            "credentials": {"credsFile": "/nats/user.creds"},
            "tls": {"caFile": "/nats/ca.crt"}
        },
        "auth": {
            "jwt": {
                "algorithms": ["RS256", "ES256"],
                "key": {"jwksUrl": "https://issuer.example/.well-known/jwks.json"},
                "issuer": "https://issuer.example",
                "audiences": ["wsrelay"],
                "leewaySeconds": 30
            },
            "tokenSources": [
                {"type": "query", "name": "access_token"},
                {"type": "authorizationHeader"},
                {"type": "subprotocol"},
                {"type": "cookie", "name": "session"}
            ],
            "allowedOrigins": ["https://app.example.com"],
            "allowAnonymous": false
        },
        "bindings": [
            {"channel": "orders.{id}", "subject": "orders.{id}", "direction": "both"},
            {"channel": "me.notify", "subject": "users.{claims.sub}.notify"},
            {"channel": "org.feed", "subject": "orgs.{claims.org.id}.feed", "direction": "subscribe"}
        ],
        "limits": {
            "maxConnections": 50000, "maxMessageBytes": 65536, "sendQueueLen": 128,
            "slowConsumerPolicy": "dropOldest", "maxSubscriptionsPerConnection": 50,
            "publishRatePerSecond": 5, "publishBurst": 10,
            "idleTimeoutSeconds": 90, "pingIntervalSeconds": 30, "handshakeTimeoutSeconds": 5
        },
        "drain": {"gracePeriodSeconds": 45}
    }"#;

    #[test]
    fn full_config_parses_and_validates() {
        let c: Config = serde_json::from_str(FULL).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.limits.slow_consumer_policy,
            SlowConsumerPolicy::DropOldest
        );
        assert_eq!(c.auth.token_sources.len(), 4);
        assert_eq!(c.bindings[0].direction, Direction::Both);
        // Round trip.
        let back: Config = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c: Config = serde_json::from_str(
            r#"{"nats":{"urls":["nats://n:4222"]},"auth":{"allowAnonymous":true},
                "bindings":[{"channel":"news","subject":"news"}]}"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.listen.client.port(), 8080);
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.drain.grace_period_seconds, 30);
        assert_eq!(c.nats.name, "wsrelay");
        assert_eq!(c.bindings[0].direction, Direction::Subscribe);
        assert_eq!(c.auth.token_sources, default_token_sources());
        assert_eq!(Config::example("nats://x:1").validate(), Ok(()));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err =
            serde_json::from_str::<Config>(r#"{"nats":{"urls":[]},"natsUrl":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `natsUrl`"), "{err}");
        let err = serde_json::from_str::<Config>(
            r#"{"nats":{"urls":[]},"auth":{"tokenSources":[{"type":"query","name":"t","x":1}]}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err = serde_json::from_str::<Config>(
            r#"{"nats":{"urls":[]},"auth":{"tokenSources":[{"type":"authorizationHeader","name":"x"}]}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn validate_reports_every_error_with_its_field() {
        let c: Config = serde_json::from_str(
            r#"{
            "listen": {"client": "0.0.0.0:8080", "admin": "0.0.0.0:8080", "path": "ws"},
            "nats": {"urls": ["http://x"], "credentials": {"tokenFile": "/t", "userFile": "/u"}},
            "auth": {
                "jwt": {"algorithms": ["HS256", "RS256"], "key": {}, "audiences": [""]},
                "tokenSources": [{"type": "cookie", "name": "a b"}, {"type": "cookie", "name": "c"}],
                "allowedOrigins": ["app.example.com/"]
            },
            "bindings": [
                {"channel": "orders.*", "subject": "orders.{id}"},
                {"channel": "a.{x}", "subject": "b.{y}"},
                {"channel": "a.{x}", "subject": "c.>"},
                {"channel": "u", "subject": "users.{claims.}"}
            ],
            "limits": {"maxConnections": 0, "publishBurst": 0, "pingIntervalSeconds": 60, "idleTimeoutSeconds": 60},
            "drain": {"gracePeriodSeconds": 0}
        }"#,
        )
        .unwrap();
        let errs = c.validate().unwrap_err().0;
        let fields: Vec<&str> = errs.iter().map(ValidationError::field).collect();
        for expected in [
            "listen.admin",
            "listen.path",
            "nats.urls[0]",
            "nats.credentials",
            "nats.credentials.passwordFile",
            "auth.jwt.algorithms",
            "auth.jwt.key",
            "auth.jwt.audiences[0]",
            "auth.tokenSources[0].name",
            "auth.tokenSources[1]",
            "auth.allowedOrigins[0]",
            "bindings[0].channel",
            "bindings[1].subject",
            "bindings[2].channel",
            "bindings[2].subject",
            "bindings[3].subject",
            "limits.maxConnections",
            "limits.publishBurst",
            "limits.pingIntervalSeconds",
            "drain.gracePeriodSeconds",
        ] {
            assert!(
                fields.contains(&expected),
                "missing {expected} in {errs:#?}"
            );
        }
        let text = ValidationErrors(errs).to_string();
        assert!(
            text.contains("bindings[1].subject: {y} is not a placeholder"),
            "{text}"
        );
    }

    #[test]
    fn claims_need_jwt_and_cookie_needs_origins() {
        let mut c = Config::example("nats://n:4222");
        c.bindings[0].subject = "users.{claims.sub}".into();
        c.bindings[0].channel = "me".into();
        c.auth
            .token_sources
            .push(TokenSource::Cookie { name: "s".into() });
        let errs = c.validate().unwrap_err().0;
        assert!(
            errs.iter().any(|e| e.field() == "bindings[0].subject"),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.field() == "auth.tokenSources[3]"),
            "{errs:?}"
        );
    }

    #[test]
    fn cookie_with_any_origin_is_refused() {
        let mut c = Config::example("nats://n:4222");
        c.auth
            .token_sources
            .push(TokenSource::Cookie { name: "s".into() });
        c.auth.allowed_origins = vec!["https://app.example.com".into(), "*".into()];
        let errs = c.validate().unwrap_err().0;
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field(), "auth.tokenSources[3]");
        assert!(errs[0].to_string().contains("'*'"), "{}", errs[0]);
        c.auth.allowed_origins.pop();
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn subject_templates_start_literal_outside_reserved_namespaces() {
        let mut c = Config::example("nats://n:4222");
        for (subject, ok) in [
            ("{topic}.feed", false),
            ("{topic}", false),
            ("$JS.API.STREAM.INFO.{topic}", false),
            ("$SYS.x.{topic}", false),
            ("_INBOX.{topic}", false),
            ("public.{topic}", true),
            ("_INBOXES.{topic}", true),
            ("a.$JS.{topic}", true),
        ] {
            c.bindings[0].subject = subject.into();
            let r = c.validate();
            assert_eq!(r.is_ok(), ok, "{subject}: {r:?}");
            if let Err(errs) = r {
                assert_eq!(errs.0[0].field(), "bindings[0].subject", "{subject}");
            }
        }
        c.auth.jwt = Some(Jwt {
            algorithms: vec![JwtAlgorithm::HS256],
            key: JwtKey {
                hmac_secret_file: Some("/k".into()),
                ..JwtKey::default()
            },
            issuer: None,
            audiences: vec![],
            leeway_seconds: 5,
        });
        c.bindings[0].subject = "{claims.sub}.notify".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn no_jwt_and_no_anonymous_is_refused() {
        let mut c = Config::example("nats://n:4222");
        c.auth.allow_anonymous = false;
        let errs = c.validate().unwrap_err().0;
        assert_eq!(errs[0].field(), "auth.jwt");
    }

    #[cfg(feature = "server")]
    #[test]
    fn yaml_and_json_parse_alike() {
        let yaml = r#"
nats:
  urls: [nats://nats:4222]
  credentials:
    credsFile: /nats/user.creds
auth:
  jwt:
    algorithms: [HS256]
    key: {hmacSecretFile: /jwt/secret}
    issuer: https://issuer.example
    audiences: [wsrelay]
  tokenSources:
    - {type: query, name: token}
    - type: authorizationHeader
bindings:
  - channel: orders.{id}
    subject: orders.{id}
    direction: both
  - channel: me.notify
    subject: users.{claims.sub}.notify
limits:
  slowConsumerPolicy: dropOldest
"#;
        let c = Config::from_yaml_str(yaml).unwrap();
        c.validate().unwrap();
        assert_eq!(c.bindings[1].subject, "users.{claims.sub}.notify");
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(Config::from_yaml_str(&json).unwrap(), c);
        let err = Config::from_yaml_str("nats: {urls: [a]}\nbogus: 1\n").unwrap_err();
        assert!(err.contains("bogus"), "{err}");
    }

    #[cfg(feature = "server")]
    #[test]
    fn the_example_file_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.yaml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.bindings.len(), 3);
        assert_eq!(c.nats.name, "wsrelay-orders");
    }

    #[test]
    fn templates_parse() {
        use TemplateToken::*;
        assert_eq!(
            parse_template("orders.{id}", true).unwrap(),
            vec![Literal("orders".into()), Var("id".into())]
        );
        assert_eq!(
            parse_subject_template("orgs.{claims.org.id}.{x}.feed").unwrap(),
            vec![
                Literal("orgs".into()),
                Claim(vec!["org".into(), "id".into()]),
                Var("x".into()),
                Literal("feed".into())
            ]
        );
        assert_eq!(
            parse_template("a.{x}.{x}", true),
            Err(TemplateError::DuplicateVar("x".into()))
        );
        assert!(matches!(
            parse_template("a.{claims.sub}", true),
            Err(TemplateError::ClaimInChannel(_))
        ));
        for bad in [
            "", ".a", "a.", "a..b", "a.*", "a.>", "a b", "a.{}", "a.{x", "{claims}",
        ] {
            assert!(parse_template(bad, true).is_err(), "{bad:?} parsed");
            assert!(parse_subject_template(bad).is_err(), "{bad:?} parsed");
        }
        for bad in [
            "x.{claims.a..b}",
            "x.{claims.",
            "x.{claims.a b}",
            "{claims.}",
        ] {
            assert!(parse_subject_template(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn env_overrides_set_secret_paths() {
        let mut c: Config = serde_json::from_str(FULL).unwrap();
        c.nats.credentials = NatsCredentials::default();
        c.tls = None;
        c.apply_env_overrides(|k| match k {
            "WSRELAY_NATS_CREDS_FILE" => Some("/secrets/nats.creds".into()),
            "WSRELAY_TLS_CERT_FILE" => Some("/c".into()),
            "WSRELAY_TLS_KEY_FILE" => Some("/k".into()),
            "WSRELAY_NATS_TOKEN_FILE" => Some(String::new()),
            _ => None,
        });
        assert_eq!(
            c.nats.credentials.creds_file.as_deref(),
            Some(std::path::Path::new("/secrets/nats.creds"))
        );
        assert_eq!(c.nats.credentials.token_file, None);
        assert_eq!(c.tls.as_ref().unwrap().key_file, PathBuf::from("/k"));
        c.validate().unwrap();
    }
}
