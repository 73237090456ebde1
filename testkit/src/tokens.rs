//! Tokens signed with the fixture keys, and the relay's verification settings that accept them.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::api::{Jwt, JwtAlgorithm, JwtKey};
use crate::fixture;

/// The issuer [`claims`] names and [`fixture_jwt`] requires.
pub const ISSUER: &str = "https://issuer.test";
/// The audience [`claims`] names and [`fixture_jwt`] requires.
pub const AUDIENCE: &str = "wsrelay";

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// JWT verification that accepts what [`hs256`] signs with [`claims`]: HS256 with the fixture
/// secret, issuer `https://issuer.test`, audience `wsrelay`.
pub fn fixture_jwt() -> Jwt {
    Jwt {
        algorithms: vec![JwtAlgorithm::HS256],
        key: JwtKey {
            hmac_secret_file: Some(fixture("hmac.secret")),
            ..JwtKey::default()
        },
        issuer: Some(ISSUER.into()),
        audiences: vec![AUDIENCE.into()],
        leeway_seconds: 5,
    }
}

/// An HS256 token signed with the fixture secret.
pub fn hs256(claims: Value) -> String {
    let secret = std::fs::read_to_string(fixture("hmac.secret")).unwrap();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.trim_end().as_bytes()),
    )
    .unwrap()
}

/// Claims [`fixture_jwt`] accepts for `sub`, valid for ten minutes.
pub fn claims(sub: &str) -> Value {
    json!({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": now_secs() + 600})
}

/// An RS256 token of `claims` signed with the fixture RSA key, with `kid` if given
/// (`test-rsa` is the key's id in `jwks.json`).
pub fn rs256(claims: &Value, kid: Option<&str>) -> String {
    let key = std::fs::read(fixture("rsa.key")).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&key).unwrap(),
    )
    .unwrap()
}
