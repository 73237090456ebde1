//! Authentication of the upgrade request: Origin allowlist, token lookup, JWT checks.
//!
//! Runs on the plain HTTP request, before any upgrade, so a refused client gets an HTTP
//! status (401/403) and never a WebSocket. Token lookup and the Origin check are pure;
//! JWT verification uses `jsonwebtoken` with keys from a file or a cached JWKS URL.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderMap;
use http::header::{AUTHORIZATION, COOKIE, ORIGIN, SEC_WEBSOCKET_PROTOCOL};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use tokio::sync::Mutex;

use crate::config::{Auth, Jwt, JwtAlgorithm, TokenSource};
use crate::protocol::BEARER_SUBPROTOCOL_PREFIX;

/// Why a request is refused before the upgrade.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// `Origin` not in the allowlist: 403.
    #[error("origin {0:?} is not allowed")]
    OriginNotAllowed(String),
    /// No token, and anonymous clients are not allowed: 401.
    #[error("no token")]
    MissingToken,
    /// The token is not valid (signature, expiry, issuer, audience...): 401.
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// The token names a key the relay does not know (even after a JWKS refresh): 401.
    #[error("unknown signing key {0:?}")]
    UnknownKey(String),
    /// The keys could not be fetched: 503 (the client may retry).
    #[error("keys unavailable: {0}")]
    KeysUnavailable(String),
}

impl AuthError {
    /// The HTTP status answered for this refusal.
    pub fn status(&self) -> http::StatusCode {
        match self {
            Self::OriginNotAllowed(_) => http::StatusCode::FORBIDDEN,
            Self::MissingToken | Self::InvalidToken(_) | Self::UnknownKey(_) => {
                http::StatusCode::UNAUTHORIZED
            }
            Self::KeysUnavailable(_) => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::OriginNotAllowed(_) => "origin",
            Self::MissingToken => "no_token",
            Self::InvalidToken(_) | Self::UnknownKey(_) => "invalid_token",
            Self::KeysUnavailable(_) => "keys_unavailable",
        }
    }
}

/// Checks the `Origin` header against the allowlist. Pure.
pub fn check_origin(allowed: &[String], headers: &HeaderMap) -> Result<(), AuthError> {
    if allowed.is_empty() {
        return Ok(());
    }
    let Some(origin) = headers.get(ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    if allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        Ok(())
    } else {
        Err(AuthError::OriginNotAllowed(origin.to_owned()))
    }
}

/// Where the token was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenVia {
    /// Query parameter.
    Query,
    /// `Authorization: Bearer`.
    Header,
    /// `Sec-WebSocket-Protocol: bearer.<token>`.
    Subprotocol,
    /// Cookie.
    Cookie,
}

/// Looks for a token in the configured sources, in order. Pure.
pub fn extract_token(
    sources: &[TokenSource],
    headers: &HeaderMap,
    query: Option<&str>,
) -> Option<(String, TokenVia)> {
    for source in sources {
        let found = match source {
            // application/x-www-form-urlencoded: `%XX` and `+` decoded (`form_urlencoded`).
            TokenSource::Query { name } => query.and_then(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .find_map(|(k, v)| (k == name.as_str()).then(|| v.into_owned()))
            }),
            TokenSource::AuthorizationHeader {} => headers
                .get_all(AUTHORIZATION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(|v| {
                    let (scheme, rest) = v.trim().split_once(' ')?;
                    scheme
                        .eq_ignore_ascii_case("bearer")
                        .then(|| rest.trim().to_owned())
                }),
            TokenSource::Subprotocol {} => headers
                .get_all(SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .find_map(|p| {
                    p.trim()
                        .strip_prefix(BEARER_SUBPROTOCOL_PREFIX)
                        .map(str::to_owned)
                }),
            TokenSource::Cookie { name } => headers
                .get_all(COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|c| {
                    let (k, v) = c.trim().split_once('=')?;
                    (k == name).then(|| v.trim_matches('"').to_owned())
                }),
        };
        if let Some(token) = found.filter(|t| !t.is_empty()) {
            let via = match source {
                TokenSource::Query { .. } => TokenVia::Query,
                TokenSource::AuthorizationHeader {} => TokenVia::Header,
                TokenSource::Subprotocol {} => TokenVia::Subprotocol,
                TokenSource::Cookie { .. } => TokenVia::Cookie,
            };
            return Some((token, via));
        }
    }
    None
}

/// What a verified client is.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// The JWT claims; `None` for an anonymous client.
    pub claims: Option<Map<String, Value>>,
    /// `exp` of the token, seconds since the epoch.
    pub expires_at: Option<u64>,
}

fn to_alg(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::HS256 => Algorithm::HS256,
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::ES256 => Algorithm::ES256,
    }
}

/// Why keys could not be loaded at start-up.
#[derive(Debug, thiserror::Error)]
pub enum KeyLoadError {
    /// The key file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The key file is not a key of the expected kind.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
}

#[derive(Debug)]
enum Keys {
    Static(DecodingKey),
    Jwks(JwksCache),
}

/// Verifies client tokens against the configured keys.
#[derive(Debug)]
pub struct Verifier {
    validation: Validation,
    keys: Keys,
}

impl Verifier {
    /// Builds a verifier, reading key files now.
    pub fn new(jwt: &Jwt) -> Result<Self, KeyLoadError> {
        let algorithms: Vec<Algorithm> = jwt.algorithms.iter().copied().map(to_alg).collect();
        let mut validation = Validation::new(algorithms.first().copied().unwrap_or_default());
        validation.algorithms = algorithms;
        validation.leeway = jwt.leeway_seconds;
        validation.validate_nbf = true;
        validation.validate_exp = true;
        // A configured claim is required, not only compared: jsonwebtoken checks `iss` and
        // `aud` only when the token carries them.
        let mut required = vec!["exp"];
        if let Some(iss) = &jwt.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        if jwt.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&jwt.audiences);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| KeyLoadError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let parse_err = |p: &std::path::Path, e: jsonwebtoken::errors::Error| KeyLoadError::Parse {
            path: p.display().to_string(),
            message: e.to_string(),
        };
        let keys = if let Some(p) = &jwt.key.hmac_secret_file {
            let mut secret = read(p)?;
            while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                secret.pop();
            }
            if secret.is_empty() {
                return Err(KeyLoadError::Parse {
                    path: p.display().to_string(),
                    message: "the HMAC secret is empty".into(),
                });
            }
            Keys::Static(DecodingKey::from_secret(&secret))
        } else if let Some(p) = &jwt.key.public_key_file {
            let pem = read(p)?;
            let key = if jwt.algorithms.contains(&JwtAlgorithm::ES256) {
                DecodingKey::from_ec_pem(&pem)
            } else {
                DecodingKey::from_rsa_pem(&pem)
            };
            Keys::Static(key.map_err(|e| parse_err(p, e))?)
        } else {
            Keys::Jwks(JwksCache::new(
                jwt.key.jwks_url.clone().unwrap_or_default(),
                Duration::from_secs(jwt.key.jwks_cache_seconds),
                Duration::from_secs(jwt.key.jwks_min_refresh_seconds),
                validation.algorithms.clone(),
                jwt.key.jwks_allow_http,
            ))
        };
        Ok(Self { validation, keys })
    }

    /// Verifies a token: size, signature, algorithm, `exp`, `nbf`, `iss`, `aud`, `sub`.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.len() > crate::protocol::MAX_TOKEN_BYTES {
            return Err(AuthError::InvalidToken(format!(
                "the token is longer than {} bytes",
                crate::protocol::MAX_TOKEN_BYTES
            )));
        }
        let invalid = |e: jsonwebtoken::errors::Error| AuthError::InvalidToken(e.to_string());
        let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
        if !self.validation.algorithms.contains(&header.alg) {
            return Err(AuthError::InvalidToken(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let data = match &self.keys {
            Keys::Static(key) => {
                jsonwebtoken::decode::<Map<String, Value>>(token, key, &self.validation)
            }
            Keys::Jwks(cache) => {
                let key = cache.key_for(header.kid.as_deref(), header.alg).await?;
                jsonwebtoken::decode::<Map<String, Value>>(token, &key, &self.validation)
            }
        }
        .map_err(invalid)?;
        let expires_at = expiry(&data.claims).ok_or_else(|| {
            AuthError::InvalidToken("exp is not a number of seconds since the epoch".into())
        })?;
        // The leeway is for clocks that disagree on when a token starts (`nbf`); a token past
        // its `exp` would be accepted only to be closed at once (1008).
        if expires_at <= now_secs() {
            return Err(AuthError::InvalidToken("the token has expired".into()));
        }
        // Identity is the pair (iss, sub): a token that names no subject cannot be told from
        // another one of its issuer (an SSE POST, a refresh, a per-subject limit).
        if subject(&data.claims).is_none() {
            return Err(AuthError::InvalidToken(
                "the token has no sub (a non-empty string without control characters)".into(),
            ));
        }
        Ok(Identity {
            claims: Some(data.claims),
            expires_at: Some(expires_at),
        })
    }
}

/// The token's `exp` in whole seconds. Issuers that compute `Date.now()/1000 + ttl` write
/// a fraction; it is floored (the connection ends no later than the token says). `None` for
/// anything that is not a non-negative number: such a token never gets a connection without
/// its expiry timer. Pure.
pub fn expiry(claims: &Map<String, Value>) -> Option<u64> {
    match claims.get("exp")? {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
                // Truncation is the floor for a non-negative value.
                .map(|f| f as u64)
        }),
        _ => None,
    }
}

/// Authenticates an upgrade request: Origin, then token (or anonymous).
#[derive(Debug)]
pub struct Authenticator {
    config: Auth,
    verifier: Option<Verifier>,
}

impl Authenticator {
    /// Builds the authenticator (reads key files).
    pub fn new(config: &Auth) -> Result<Self, KeyLoadError> {
        let verifier = config.jwt.as_ref().map(Verifier::new).transpose()?;
        Ok(Self {
            config: config.clone(),
            verifier,
        })
    }

    /// Decides on a request. Returns the identity and where the token came from.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<(Identity, Option<TokenVia>), AuthError> {
        check_origin(&self.config.allowed_origins, headers)?;
        let found = extract_token(&self.config.token_sources, headers, query);
        let via = found.as_ref().map(|(_, via)| *via);
        let identity = self
            .identify(found.as_ref().map(|(t, _)| t.as_str()))
            .await?;
        Ok((identity, via))
    }

    /// The Origin check, then the token a request carries (its first configured source),
    /// not yet verified: what an SSE POST forwarded to another relay carries
    /// (`edge::sse::forward`), which [`Authenticator::identify`] decides there.
    pub fn token_of(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Option<String>, AuthError> {
        check_origin(&self.config.allowed_origins, headers)?;
        Ok(extract_token(&self.config.token_sources, headers, query).map(|(t, _)| t))
    }

    /// Decides on the token a request carried (`None`: none, anonymous if allowed).
    pub async fn identify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        match (token, &self.verifier) {
            (Some(token), Some(v)) => v.verify(token).await,
            (Some(_), None) => Err(AuthError::InvalidToken(
                "tokens are not accepted by this relay".into(),
            )),
            (None, _) if self.config.allow_anonymous => Ok(Identity::default()),
            (None, _) => Err(AuthError::MissingToken),
        }
    }

    /// Whether the last JWKS fetch failed (false without a JWKS URL).
    pub fn jwks_failing(&self) -> bool {
        match self.verifier.as_ref().map(|v| &v.keys) {
            Some(Keys::Jwks(cache)) => cache
                .inner
                .failing
                .load(std::sync::atomic::Ordering::Acquire),
            _ => false,
        }
    }

    /// Verifies a token sent in band (the `refresh` frame), as the handshake would.
    pub async fn verify_token(&self, token: &str) -> Result<Identity, AuthError> {
        match &self.verifier {
            Some(v) => v.verify(token).await,
            None => Err(AuthError::InvalidToken(
                "tokens are not accepted by this relay".into(),
            )),
        }
    }
}

/// Whether two tokens' claims name the same identity: the same `iss` and the same `sub`, which
/// both must carry (a refresh may extend a connection's life, never change whose it is). Pure.
pub fn same_identity(old: &Map<String, Value>, new: &Map<String, Value>) -> bool {
    subject(old).is_some() && old.get("iss") == new.get("iss") && subject(old) == subject(new)
}

/// The token's subject: `sub`, a non-empty string without control characters (it is shown
/// to backends in the `Wsrelay-Sub` header, and counted per subject). Pure.
pub fn subject(claims: &Map<String, Value>) -> Option<&str> {
    claims
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && !s.chars().any(char::is_control))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The HTTP client JWKS documents are fetched with (built once, connections reused).
type JwksClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Empty<bytes::Bytes>,
>;

/// JWKS keys, cached. Handshakes are served from the current key set, read without waiting:
/// a stale set is refreshed by one background fetch while it goes on serving. Only a token
/// that names a key the set lacks (or the very first handshake) waits, for one fetch shared
/// by every such handshake, at most once per `min_refresh`. No lock is held across a fetch
/// but the one that makes concurrent fetches wait for each other.
#[derive(Debug)]
struct JwksCache {
    inner: Arc<JwksInner>,
}

#[derive(Debug)]
struct JwksInner {
    url: String,
    ttl: Duration,
    min_refresh: Duration,
    /// The configured algorithms: keys for others are left out of the set.
    accepted: Vec<Algorithm>,
    client: Result<JwksClient, String>,
    /// The key set in force; the lock is only held to clone or replace the `Arc`.
    current: std::sync::RwLock<Option<Arc<KeySet>>>,
    /// Held by the one fetch in progress.
    fetch: Mutex<FetchState>,
    /// Fetch attempts completed (success or not).
    generation: std::sync::atomic::AtomicU64,
    /// A background refresh is scheduled or running.
    refreshing: std::sync::atomic::AtomicBool,
    /// The last fetch failed (reported as `wsrelay_jwks_fetch_failing`).
    failing: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct FetchState {
    attempted_at: Option<Instant>,
    last_error: Option<String>,
}

type JwksKey = (DecodingKey, Algorithm);

#[derive(Debug)]
struct KeySet {
    by_kid: HashMap<String, JwksKey>,
    /// Keys without a `kid`, tried when the token has none.
    anonymous: Vec<JwksKey>,
    fetched_at: Instant,
}

impl KeySet {
    fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<&JwksKey> {
        match kid {
            Some(k) => self.by_kid.get(k),
            None => self.anonymous.iter().find(|(_, a)| *a == alg),
        }
    }
}

/// The key a JWK gives, if it is one the relay may use: for signatures (`use` absent or
/// `sig`, `key_ops` absent or with `verify`), of a type matching a configured algorithm
/// (`RSA` for RS256, `EC` on P-256 for ES256), and with `alg` absent or that algorithm.
/// Symmetric (`oct`) keys are never taken from a JWKS. Pure.
fn usable_key(jwk: &jsonwebtoken::jwk::Jwk, accepted: &[Algorithm]) -> Option<JwksKey> {
    use jsonwebtoken::jwk::{
        AlgorithmParameters, EllipticCurve, KeyAlgorithm, KeyOperations, PublicKeyUse,
    };
    let c = &jwk.common;
    if c.public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return None;
    }
    if c.key_operations
        .as_ref()
        .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
    {
        return None;
    }
    let alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        _ => return None,
    };
    if !accepted.contains(&alg) {
        return None;
    }
    match c.key_algorithm {
        None | Some(KeyAlgorithm::RS256 | KeyAlgorithm::ES256) => {}
        Some(_) => return None,
    }
    if c.key_algorithm
        .is_some_and(|a| (a == KeyAlgorithm::RS256) != (alg == Algorithm::RS256))
    {
        return None;
    }
    DecodingKey::from_jwk(jwk).ok().map(|k| (k, alg))
}

impl JwksCache {
    fn new(
        url: String,
        ttl: Duration,
        min_refresh: Duration,
        accepted: Vec<Algorithm>,
        allow_http: bool,
    ) -> Self {
        use hyper_util::client::legacy::Client;
        use hyper_util::rt::TokioExecutor;
        let client = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| format!("no TLS roots: {e}"))
            .map(|b| {
                let b = if allow_http {
                    b.https_or_http()
                } else {
                    b.https_only()
                };
                let https = b.enable_http1().build();
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(30))
                    .build(https)
            });
        Self {
            inner: Arc::new(JwksInner {
                url,
                ttl,
                min_refresh,
                accepted,
                client,
                current: std::sync::RwLock::new(None),
                fetch: Mutex::new(FetchState::default()),
                generation: std::sync::atomic::AtomicU64::new(0),
                refreshing: std::sync::atomic::AtomicBool::new(false),
                failing: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, AuthError> {
        let inner = &self.inner;
        if let Some(set) = inner.current()
            && let Some((key, key_alg)) = set.find(kid, alg)
        {
            if set.fetched_at.elapsed() > inner.ttl {
                inner.refresh_in_background();
            }
            return check_key_alg(key, *key_alg, alg);
        }
        // A key the set lacks (rotation), or no set yet: wait for one fetch.
        let fetched = inner.refresh().await;
        match inner.current() {
            None => Err(AuthError::KeysUnavailable(
                fetched.err().unwrap_or_else(|| "no keys".into()),
            )),
            Some(set) => match set.find(kid, alg) {
                Some((key, key_alg)) => check_key_alg(key, *key_alg, alg),
                None => Err(AuthError::UnknownKey(kid.unwrap_or("").to_owned())),
            },
        }
    }
}

fn check_key_alg(
    key: &DecodingKey,
    key_alg: Algorithm,
    alg: Algorithm,
) -> Result<DecodingKey, AuthError> {
    if key_alg != alg {
        return Err(AuthError::InvalidToken(format!(
            "key is for {key_alg:?}, token says {alg:?}"
        )));
    }
    Ok(key.clone())
}

impl JwksInner {
    fn current(&self) -> Option<Arc<KeySet>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Starts one background refresh unless one is scheduled or running.
    fn refresh_in_background(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self
            .refreshing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let _ = me.refresh().await;
            me.refreshing.store(false, Ordering::Release);
        });
    }

    /// Fetches the set unless a fetch completed while this one waited its turn, or the
    /// last attempt is more recent than `min_refresh`. `Err` carries the last failure.
    async fn refresh(&self) -> Result<(), String> {
        use std::sync::atomic::Ordering;
        let seen = self.generation.load(Ordering::Acquire);
        let mut st = self.fetch.lock().await;
        if self.generation.load(Ordering::Acquire) != seen {
            // Another fetch ended while this one waited: use its outcome.
            return st.last_error.clone().map_or(Ok(()), Err);
        }
        let now = Instant::now();
        if st.attempted_at.is_some_and(|t| now - t < self.min_refresh) {
            return st.last_error.clone().map_or(Ok(()), Err);
        }
        st.attempted_at = Some(now);
        let result = match &self.client {
            Ok(client) => fetch_jwks(client, &self.url).await,
            Err(e) => Err(e.clone()),
        };
        let outcome = match result {
            Ok(set) => {
                let mut keys = KeySet {
                    by_kid: HashMap::new(),
                    anonymous: Vec::new(),
                    fetched_at: Instant::now(),
                };
                for jwk in &set.keys {
                    let Some(key) = usable_key(jwk, &self.accepted) else {
                        continue;
                    };
                    match &jwk.common.key_id {
                        Some(id) => {
                            keys.by_kid.insert(id.clone(), key);
                        }
                        None => keys.anonymous.push(key),
                    }
                }
                tracing::debug!(
                    url = %self.url,
                    listed = set.keys.len(),
                    usable = keys.by_kid.len() + keys.anonymous.len(),
                    "JWKS fetched"
                );
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(keys));
                st.last_error = None;
                self.failing.store(false, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(url = %self.url, error = %e, "JWKS fetch failed");
                st.last_error = Some(e.clone());
                self.failing.store(true, Ordering::Release);
                Err(e)
            }
        };
        self.generation.fetch_add(1, Ordering::AcqRel);
        outcome
    }
}

/// Fetches a JWKS document, bounded in time and size.
async fn fetch_jwks(client: &JwksClient, url: &str) -> Result<JwkSet, String> {
    use http_body_util::{BodyExt, Limited};

    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let fut = async {
        let resp = client.get(uri).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        serde_json::from_slice::<JwkSet>(&body).map_err(|e| format!("not a JWKS: {e}"))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| "timed out".to_owned())?
}

/// Shared handle.
pub type SharedAuthenticator = Arc<Authenticator>;

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn all_sources() -> Vec<TokenSource> {
        vec![
            TokenSource::Query {
                name: "token".into(),
            },
            TokenSource::AuthorizationHeader {},
            TokenSource::Subprotocol {},
            TokenSource::Cookie {
                name: "session".into(),
            },
        ]
    }

    #[test]
    fn token_sources_in_order() {
        let s = all_sources();
        let h = headers(&[
            ("authorization", "Bearer from-header"),
            ("sec-websocket-protocol", "wsrelay.v1, bearer.from-proto"),
            ("cookie", "a=b; session=from-cookie"),
        ]);
        assert_eq!(
            extract_token(&s, &h, Some("x=1&token=from%2Dquery")),
            Some(("from-query".into(), TokenVia::Query))
        );
        assert_eq!(
            extract_token(&s, &h, Some("x=1")),
            Some(("from-header".into(), TokenVia::Header))
        );
        let h2 = headers(&[
            ("sec-websocket-protocol", "wsrelay.v1"),
            ("sec-websocket-protocol", "bearer.a.b.c"),
            ("cookie", "session=from-cookie"),
        ]);
        assert_eq!(
            extract_token(&s, &h2, None),
            Some(("a.b.c".into(), TokenVia::Subprotocol))
        );
        let h3 = headers(&[("cookie", "x=1; session=\"c\"")]);
        assert_eq!(
            extract_token(&s, &h3, None),
            Some(("c".into(), TokenVia::Cookie))
        );
        assert_eq!(extract_token(&s, &headers(&[]), Some("token=")), None);
        assert_eq!(
            extract_token(&s, &headers(&[("authorization", "Basic abc")]), None),
            None
        );
        // Only configured sources are read.
        assert_eq!(extract_token(&s[1..2], &h3, Some("token=q")), None);
    }

    #[test]
    fn a_refresh_keeps_the_identity() {
        let m = |v: Value| v.as_object().unwrap().clone();
        let old = m(serde_json::json!({"iss": "i", "sub": "alice", "exp": 1}));
        assert!(same_identity(
            &old,
            &m(serde_json::json!({"iss": "i", "sub": "alice", "exp": 9, "x": 1}))
        ));
        assert!(!same_identity(
            &old,
            &m(serde_json::json!({"iss": "i", "sub": "bob", "exp": 9}))
        ));
        assert!(!same_identity(
            &old,
            &m(serde_json::json!({"iss": "j", "sub": "alice", "exp": 9}))
        ));
        assert!(!same_identity(
            &old,
            &m(serde_json::json!({"iss": "i", "exp": 9}))
        ));
        // Two tokens without `sub` are not one identity.
        let none = m(serde_json::json!({"iss": "i", "exp": 1}));
        assert!(!same_identity(&none, &none));
        let empty = m(serde_json::json!({"iss": "i", "sub": "", "exp": 1}));
        assert!(!same_identity(&empty, &empty));
    }

    #[test]
    fn expiry_is_floored_and_required() {
        let c = |v: Value| serde_json::json!({ "exp": v }).as_object().unwrap().clone();
        assert_eq!(expiry(&c(serde_json::json!(1767225600))), Some(1767225600));
        assert_eq!(
            expiry(&c(serde_json::json!(1767225600.5))),
            Some(1767225600)
        );
        assert_eq!(
            expiry(&c(serde_json::json!(1767225600.999))),
            Some(1767225600)
        );
        for bad in [
            serde_json::json!(-1),
            serde_json::json!(-0.5),
            serde_json::json!("1767225600"),
            serde_json::json!(null),
            serde_json::json!(1e300),
        ] {
            assert_eq!(expiry(&c(bad.clone())), None, "{bad}");
        }
        assert_eq!(expiry(&Map::new()), None);
    }

    #[test]
    fn query_tokens_are_form_decoded() {
        let s = &all_sources()[..1];
        let q = |query: &str| extract_token(s, &headers(&[]), Some(query)).map(|(t, _)| t);
        assert_eq!(q("token=a%2Eb+c%zz%4").as_deref(), Some("a.b c%zz%4"));
        assert_eq!(q("t%6Fken=ab%41").as_deref(), Some("abA"));
        assert_eq!(q("x=1&token").as_deref(), None);
    }

    #[test]
    fn origin_allowlist() {
        let allowed = vec!["https://app.example.com".to_owned()];
        assert!(check_origin(&allowed, &headers(&[])).is_ok());
        assert!(check_origin(&allowed, &headers(&[("origin", "https://app.example.com")])).is_ok());
        let err =
            check_origin(&allowed, &headers(&[("origin", "https://evil.example")])).unwrap_err();
        assert_eq!(err.status(), http::StatusCode::FORBIDDEN);
        assert!(check_origin(&[], &headers(&[("origin", "https://x")])).is_ok());
        assert!(check_origin(&["*".into()], &headers(&[("origin", "https://x")])).is_ok());
    }
}
