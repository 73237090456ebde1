//! The validate stage: what the API server cannot check because it needs other objects.
//! The schema and CEL rules have already refused malformed specs; here the referenced
//! Secrets must exist, hold the keys named, and hold something usable.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Secret;
use sha2::{Digest, Sha256};

use crate::api::{SecretKeyRef, WebsocketGateway};

/// Shortest HMAC key accepted: HS256 with less than 256 bits of key is brute-forceable.
pub const MIN_HMAC_BYTES: usize = 32;

/// A problem a person must fix. Each variant's category is its Event reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidateError {
    /// A referenced Secret does not exist (yet).
    #[error("Secret {name} does not exist in the gateway's namespace")]
    SecretNotFound { name: String },
    /// A referenced Secret lacks the key named.
    #[error("Secret {name} has no key {key}")]
    SecretKeyNotFound { name: String, key: String },
    /// A Secret key holds something the relay cannot use.
    #[error("Secret {name} key {key}: {reason}")]
    InvalidSecret {
        name: String,
        key: String,
        reason: String,
    },
    /// A referenced Secret lacks the label this installation requires of Secrets a gateway
    /// may name (`--secret-label`): an author may not point a gateway at any Secret of the
    /// namespace.
    #[error(
        "Secret {name} lacks the label {label}: this installation lets a gateway use only Secrets labelled so (ask whoever owns the Secret to label it)"
    )]
    SecretNotUsable { name: String, label: SecretLabel },
    /// A binding's `authorize.rule` does not compile (checked here too, so a cluster
    /// without the validating webhook never renders a config the relays refuse).
    #[error("{field}: {error}")]
    InvalidRule {
        /// Where, e.g. `spec.bindings[2].authorize.rule`.
        field: String,
        /// Why, with the line and column when the parser knows them.
        error: wsrelay_config::rule::RuleError,
    },
    /// A binding's `presence` (or `spec.registry`) the relay would refuse, judged by the
    /// relay config's own validation (the CRD's rules catch most of it at admission; this
    /// names what they cannot, or what a cluster with an older CRD let through).
    #[error("{}", .faults.join("; "))]
    InvalidPresence {
        /// Each fault, `spec.<path>: <why>`.
        faults: Vec<String>,
    },
    /// `events` or `control` the relay would refuse, judged like presence by the relay
    /// config's own validation (the CRD's rules catch most of it at admission).
    #[error("{}", .faults.join("; "))]
    InvalidEvents {
        /// Each fault, `spec.<path>: <why>`.
        faults: Vec<String>,
    },
}

/// The label a Secret must carry for a gateway to use it (`--secret-label key=value`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretLabel {
    /// The label's key.
    pub key: String,
    /// Its value.
    pub value: String,
}

impl std::fmt::Display for SecretLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

impl std::str::FromStr for SecretLabel {
    type Err = String;

    /// `key=value`, a label key and value as Kubernetes allows them (checked loosely: no
    /// spaces, both sides non-empty for the key).
    fn from_str(s: &str) -> Result<Self, String> {
        let (key, value) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not key=value"))?;
        let ok = |t: &str| {
            t.len() <= 317
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        };
        if key.is_empty() || !ok(key) || !ok(value) {
            return Err(format!(
                "{s:?} is not a label key=value (letters, digits, '-', '_', '.', '/')"
            ));
        }
        Ok(Self {
            key: key.to_string(),
            value: value.to_string(),
        })
    }
}

impl ValidateError {
    /// The bounded category (metric label and Event reason).
    pub fn category(&self) -> &'static str {
        match self {
            Self::SecretNotFound { .. } => "SecretNotFound",
            Self::SecretKeyNotFound { .. } => "SecretKeyNotFound",
            Self::InvalidSecret { .. } => "InvalidSecret",
            Self::SecretNotUsable { .. } => "SecretNotUsable",
            Self::InvalidRule { .. } => "InvalidRule",
            Self::InvalidPresence { .. } => "InvalidPresence",
            Self::InvalidEvents { .. } => "InvalidEvents",
        }
    }
}

/// What a key's content must look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    /// Anything non-empty.
    Any,
    /// An HMAC key of at least [`MIN_HMAC_BYTES`].
    HmacKey,
    /// A PEM block (public key, certificate or CA bundle).
    Pem,
    /// An NKey user seed.
    NkeySeed,
}

/// Every Secret key the gateway uses, with what it must hold.
fn references(gw: &WebsocketGateway) -> Vec<(String, String, Content)> {
    let mut refs = mounted_references(gw);
    if let Some(tls) = &gw.spec.tls {
        refs.push((tls.secret_name.clone(), "tls.crt".into(), Content::Pem));
        refs.push((tls.secret_name.clone(), "tls.key".into(), Content::Pem));
    }
    refs
}

/// The keys of the Secrets mounted under the relay's secrets directory: NATS and JWT, the
/// connection tokens' and each binding's subscription-token keys (the serving certificate
/// has a mount of its own).
fn mounted_references(gw: &WebsocketGateway) -> Vec<(String, String, Content)> {
    let mut refs = nats_references(gw);
    let mut push_keys = |hmac: Option<&SecretKeyRef>, public_key: Option<&SecretKeyRef>| {
        if let Some(r) = hmac {
            refs.push((r.name.clone(), r.key.clone(), Content::HmacKey));
        }
        if let Some(r) = public_key {
            refs.push((r.name.clone(), r.key.clone(), Content::Pem));
        }
    };
    if let Some(j) = &gw.spec.auth.jwt {
        push_keys(j.hmac_secret_ref.as_ref(), j.public_key_secret_ref.as_ref());
    }
    for j in gw
        .spec
        .bindings
        .iter()
        .filter_map(|b| b.authorize.as_ref()?.token.as_ref()?.jwt.as_ref())
    {
        push_keys(j.hmac_secret_ref.as_ref(), j.public_key_secret_ref.as_ref());
    }
    refs
}

/// Compiles each binding's `authorize.rule` as the relay will: the first that does not
/// compile is named with where it fails. Pure.
fn check_rules(gw: &WebsocketGateway) -> Result<(), ValidateError> {
    for (i, b) in gw.spec.bindings.iter().enumerate() {
        if let Some(rule) = b.authorize.as_ref().and_then(|a| a.rule.as_deref()) {
            wsrelay_config::rule::compile(rule).map_err(|error| ValidateError::InvalidRule {
                field: format!("spec.bindings[{i}].authorize.rule"),
                error,
            })?;
        }
    }
    Ok(())
}

/// Whether a relay config field is of presence or the registry (`bindings[2].presence.key`,
/// `registry.leaseSeconds`).
fn is_presence_field(field: &str) -> bool {
    field.starts_with("registry")
        || (field.starts_with("bindings[") && field.contains("].presence"))
}

/// Whether a relay config field is of the lifecycle events or the control service
/// (`events.durable.maxAgeSeconds`, `control.subject`).
fn is_events_field(field: &str) -> bool {
    ["events", "control"]
        .iter()
        .any(|s| field == *s || field.starts_with(&format!("{s}.")))
}

/// Judges each binding's `presence`, the registry, `events` and `control` with the relay
/// config's own validation of the config the spec maps to, naming each fault by its spec
/// path: presence and the registry first (`InvalidPresence`), then events and control
/// (`InvalidEvents`). Other faults are the build stage's (`InvalidConfig`). Pure.
fn check_presence_and_events(gw: &WebsocketGateway) -> Result<(), ValidateError> {
    let spec = &gw.spec;
    if spec.registry.is_none()
        && spec.events.is_none()
        && spec.control.is_none()
        && spec.bindings.iter().all(|b| b.presence.is_none())
    {
        return Ok(());
    }
    let config = crate::build::relay_config(
        spec,
        gw.metadata.namespace.as_deref().unwrap_or_default(),
        gw.metadata.name.as_deref().unwrap_or_default(),
    );
    let Err(errors) = config.validate() else {
        return Ok(());
    };
    let faults = |of: fn(&str) -> bool| -> Vec<String> {
        errors
            .0
            .iter()
            .filter(|e| of(e.field()))
            .map(|e| format!("spec.{e}"))
            .collect()
    };
    let presence = faults(is_presence_field);
    if !presence.is_empty() {
        return Err(ValidateError::InvalidPresence { faults: presence });
    }
    let events = faults(is_events_field);
    if !events.is_empty() {
        return Err(ValidateError::InvalidEvents { faults: events });
    }
    Ok(())
}

/// The Secrets the relay pods mount under the secrets directory, one volume each (sorted,
/// so volume order is stable).
pub fn mounted_secret_names(gw: &WebsocketGateway) -> BTreeSet<String> {
    mounted_references(gw)
        .into_iter()
        .map(|(name, _, _)| name)
        .collect()
}

/// The Secret keys of the NATS connection: credentials and CA. The relay reads them only
/// when it starts (unlike its JWT keys and serving certificate, which it reloads).
fn nats_references(gw: &WebsocketGateway) -> Vec<(String, String, Content)> {
    let spec = &gw.spec;
    let mut refs = Vec::new();
    let mut push = |r: &SecretKeyRef, c: Content| refs.push((r.name.clone(), r.key.clone(), c));
    if let Some(c) = &spec.nats.credentials {
        if let Some(r) = &c.token {
            push(r, Content::Any);
        }
        if let Some(r) = &c.nkey_seed {
            push(r, Content::NkeySeed);
        }
        if let Some(r) = &c.creds_file {
            push(r, Content::Any);
        }
    }
    if let Some(r) = &spec.nats.ca_secret_ref {
        push(r, Content::Pem);
    }
    if let Some(name) = &spec.nats.client_cert_secret_name {
        refs.push((name.clone(), "tls.crt".into(), Content::Pem));
        refs.push((name.clone(), "tls.key".into(), Content::Pem));
    }
    if let Some(u) = spec
        .nats
        .credentials
        .as_ref()
        .and_then(|c| c.user_password.as_ref())
    {
        refs.push((u.secret_name.clone(), u.username_key.clone(), Content::Any));
        refs.push((u.secret_name.clone(), u.password_key.clone(), Content::Any));
    }
    refs
}

/// A digest of the Secrets whose values the relay reads only at start (the NATS credentials
/// and CA), for the pod template: rotating one of them rolls the relays, which reconnect
/// with the new value. JWT keys and the wss certificate are left out: the relay reloads
/// those files in place, keeping its connections. Empty when the gateway uses none. Pure.
///
/// Built from each Secret's `metadata.uid` and `metadata.resourceVersion`, never from its
/// data: the digest ends up in a pod-template annotation that anyone with the built-in
/// `view` role reads, and an unkeyed hash of a password is an offline oracle for it. Any
/// write to a Secret moves its resourceVersion, so a rotation still rolls the relays; so
/// does any other write to that Secret (another key, a label), which is why the NATS
/// credentials are best kept in a Secret of their own (docs/operations.md).
pub fn restart_secrets_digest(
    gw: &WebsocketGateway,
    secrets: &BTreeMap<String, Option<Secret>>,
) -> String {
    let names: BTreeSet<String> = nats_references(gw)
        .into_iter()
        .map(|(name, _, _)| name)
        .collect();
    if names.is_empty() {
        return String::new();
    }
    let mut hasher = Sha256::new();
    for name in names {
        let meta = secrets
            .get(&name)
            .and_then(Option::as_ref)
            .map(|s| &s.metadata);
        let uid = meta.and_then(|m| m.uid.as_deref()).unwrap_or_default();
        let version = meta
            .and_then(|m| m.resource_version.as_deref())
            .unwrap_or_default();
        // Length-prefixed, so no two different lists hash alike.
        for part in [name.as_str(), uid, version] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
    }
    hasher
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The names of every Secret the gateway refers to (what the fetch stage reads).
pub fn secret_names(gw: &WebsocketGateway) -> Vec<String> {
    let mut names: Vec<String> = references(gw).into_iter().map(|(n, _, _)| n).collect();
    names.sort();
    names.dedup();
    names
}

/// Checks the bindings' rules, the referenced Secrets (`None`: the Secret does not exist),
/// and that each Secret carries `required` when the installation requires a label. Pure.
pub fn validate(
    gw: &WebsocketGateway,
    secrets: &BTreeMap<String, Option<Secret>>,
    required: Option<&SecretLabel>,
) -> Result<(), ValidateError> {
    check_rules(gw)?;
    check_presence_and_events(gw)?;
    for (name, key, content) in references(gw) {
        let secret = secrets
            .get(&name)
            .and_then(Option::as_ref)
            .ok_or_else(|| ValidateError::SecretNotFound { name: name.clone() })?;
        if let Some(label) = required
            && secret
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(&label.key))
                != Some(&label.value)
        {
            return Err(ValidateError::SecretNotUsable {
                name: name.clone(),
                label: label.clone(),
            });
        }
        let value = secret_value(secret, &key).ok_or_else(|| ValidateError::SecretKeyNotFound {
            name: name.clone(),
            key: key.clone(),
        })?;
        let invalid = |reason: &str| ValidateError::InvalidSecret {
            name: name.clone(),
            key: key.clone(),
            reason: reason.to_string(),
        };
        let trimmed = value.trim_ascii();
        if trimmed.is_empty() {
            return Err(invalid("is empty"));
        }
        match content {
            Content::Any => {}
            Content::HmacKey if trimmed.len() < MIN_HMAC_BYTES => {
                return Err(invalid(&format!(
                    "an HS256 key needs at least {MIN_HMAC_BYTES} bytes, this one has {}",
                    trimmed.len()
                )));
            }
            Content::HmacKey => {}
            Content::Pem if !trimmed.windows(11).any(|w| w == b"-----BEGIN ") => {
                return Err(invalid("is not PEM (no -----BEGIN line)"));
            }
            Content::Pem => {}
            Content::NkeySeed if !trimmed.starts_with(b"SU") => {
                return Err(invalid("is not an NKey user seed (it starts with SU)"));
            }
            Content::NkeySeed => {}
        }
    }
    Ok(())
}

/// A key's bytes, from `data` or (for objects not yet normalised) `stringData`.
fn secret_value<'a>(secret: &'a Secret, key: &str) -> Option<&'a [u8]> {
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return Some(&v.0);
    }
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|s| s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn gateway() -> WebsocketGateway {
        serde_yaml::from_str(include_str!("../tests/fixtures/full.yaml")).expect("fixture")
    }

    fn secret(pairs: &[(&str, &str)]) -> Option<Secret> {
        versioned("uid-0", "1", pairs)
    }

    /// A Secret as the API server returns it: with a uid and a resourceVersion.
    fn versioned(uid: &str, version: &str, pairs: &[(&str, &str)]) -> Option<Secret> {
        Some(Secret {
            metadata: ObjectMeta {
                uid: Some(uid.into()),
                resource_version: Some(version.into()),
                ..ObjectMeta::default()
            },
            data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        })
    }

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn good() -> BTreeMap<String, Option<Secret>> {
        BTreeMap::from([
            ("chat-nats".to_string(), secret(&[("token", "t0ken")])),
            ("nats-ca".to_string(), secret(&[("ca.crt", PEM)])),
            (
                "nats-client".to_string(),
                secret(&[
                    ("tls.crt", PEM),
                    ("tls.key", "-----BEGIN PRIVATE KEY-----\n"),
                ]),
            ),
            (
                "chat-jwt".to_string(),
                secret(&[("hmac", "0123456789abcdef0123456789abcdef")]),
            ),
            (
                "chat-tls".to_string(),
                secret(&[
                    ("tls.crt", PEM),
                    ("tls.key", "-----BEGIN PRIVATE KEY-----\n"),
                ]),
            ),
        ])
    }

    #[test]
    fn rotating_nats_credentials_changes_the_restart_digest_and_jwt_or_tls_keys_do_not() {
        let gw = gateway();
        let base = restart_secrets_digest(&gw, &good());
        assert_eq!(base.len(), 16);
        assert_eq!(base, restart_secrets_digest(&gw, &good()), "stable");

        // A rotation is a write, which moves the Secret's resourceVersion.
        let mut token = good();
        token.insert(
            "chat-nats".into(),
            versioned("uid-0", "2", &[("token", "n3w")]),
        );
        assert_ne!(restart_secrets_digest(&gw, &token), base, "NATS token");
        let mut ca = good();
        ca.insert(
            "nats-ca".into(),
            versioned(
                "uid-0",
                "2",
                &[("ca.crt", "-----BEGIN CERTIFICATE-----\nMIIC\n")],
            ),
        );
        assert_ne!(restart_secrets_digest(&gw, &ca), base, "NATS CA");
        let mut client = good();
        client.insert(
            "nats-client".into(),
            versioned("uid-0", "2", &[("tls.crt", PEM), ("tls.key", "new")]),
        );
        assert_ne!(
            restart_secrets_digest(&gw, &client),
            base,
            "NATS client certificate"
        );
        // Deleted and created again under the same name: a new uid, maybe an old version.
        let mut recreated = good();
        recreated.insert(
            "chat-nats".into(),
            versioned("uid-1", "1", &[("token", "t0ken")]),
        );
        assert_ne!(restart_secrets_digest(&gw, &recreated), base, "recreated");

        // Reloaded by the relay in place: no roll.
        let mut jwt = good();
        jwt.insert(
            "chat-jwt".into(),
            versioned(
                "uid-0",
                "2",
                &[("hmac", "another-key-of-at-least-32-bytes!")],
            ),
        );
        assert_eq!(restart_secrets_digest(&gw, &jwt), base, "JWT key");
        let mut tls = good();
        tls.insert(
            "chat-tls".into(),
            versioned("uid-0", "2", &[("tls.crt", PEM), ("tls.key", "other")]),
        );
        assert_eq!(restart_secrets_digest(&gw, &tls), base, "wss certificate");
    }

    /// The digest lands in a pod-template annotation anyone with `view` reads: it must not
    /// be a function of the Secrets' bytes (an unkeyed hash of a password is an offline
    /// oracle for it), only of their identity and version.
    #[test]
    fn the_restart_digest_depends_on_secret_versions_never_on_their_data() {
        let gw = gateway();
        let base = restart_secrets_digest(&gw, &good());
        // Other bytes under the same uid and resourceVersion: the same digest.
        let mut guess = good();
        guess.insert("chat-nats".into(), secret(&[("token", "password1")]));
        guess.insert("nats-ca".into(), secret(&[("ca.crt", "guess")]));
        guess.insert(
            "nats-client".into(),
            secret(&[("tls.crt", "guess"), ("tls.key", "guess")]),
        );
        assert_eq!(
            restart_secrets_digest(&gw, &guess),
            base,
            "data changed the digest"
        );
        // No data at all: still the same.
        let mut empty = good();
        for name in ["chat-nats", "nats-ca", "nats-client"] {
            empty.insert(name.into(), versioned("uid-0", "1", &[]));
        }
        assert_eq!(
            restart_secrets_digest(&gw, &empty),
            base,
            "data changed the digest"
        );
        // Only the version moved, the bytes are the same: another digest.
        let mut touched = good();
        touched.insert(
            "nats-ca".into(),
            versioned("uid-0", "7", &[("ca.crt", PEM)]),
        );
        assert_ne!(
            restart_secrets_digest(&gw, &touched),
            base,
            "version ignored"
        );
    }

    #[test]
    fn a_gateway_without_nats_secrets_has_no_restart_digest() {
        let mut gw = gateway();
        gw.spec.nats.credentials = None;
        gw.spec.nats.ca_secret_ref = None;
        gw.spec.nats.client_cert_secret_name = None;
        assert_eq!(restart_secrets_digest(&gw, &good()), "");
    }

    #[test]
    fn all_secrets_present_and_usable_passes() {
        assert_eq!(validate(&gateway(), &good(), None), Ok(()));
    }

    #[test]
    fn the_fetch_stage_reads_each_secret_once() {
        assert_eq!(
            secret_names(&gateway()),
            [
                "chat-jwt",
                "chat-nats",
                "chat-tls",
                "nats-ca",
                "nats-client"
            ]
        );
    }

    #[test]
    fn a_missing_secret_is_named() {
        let mut s = good();
        s.insert("chat-jwt".into(), None);
        assert_eq!(
            validate(&gateway(), &s, None),
            Err(ValidateError::SecretNotFound {
                name: "chat-jwt".into()
            })
        );
    }

    #[test]
    fn a_missing_key_is_named() {
        let mut s = good();
        s.insert("chat-nats".into(), secret(&[("other", "x")]));
        let err = validate(&gateway(), &s, None).expect_err("missing key");
        assert_eq!(err.category(), "SecretKeyNotFound");
        assert_eq!(err.to_string(), "Secret chat-nats has no key token");
    }

    #[test]
    fn a_short_hmac_key_is_refused() {
        let mut s = good();
        s.insert("chat-jwt".into(), secret(&[("hmac", "short")]));
        let err = validate(&gateway(), &s, None).expect_err("weak key");
        assert_eq!(err.category(), "InvalidSecret");
        assert!(err.to_string().contains("at least 32 bytes"), "{err}");
    }

    #[test]
    fn a_ca_that_is_not_pem_is_refused() {
        let mut s = good();
        s.insert("nats-ca".into(), secret(&[("ca.crt", "not a certificate")]));
        let err = validate(&gateway(), &s, None).expect_err("not pem");
        assert!(err.to_string().contains("not PEM"), "{err}");
    }

    #[test]
    fn a_required_label_is_checked_on_every_secret_named() {
        let label: SecretLabel = "wsrelay.dev/usable=true".parse().expect("label");
        let labelled = |mut s: BTreeMap<String, Option<Secret>>| {
            for secret in s.values_mut().flatten() {
                secret.metadata.labels =
                    Some(BTreeMap::from([(label.key.clone(), label.value.clone())]));
            }
            s
        };
        assert_eq!(
            validate(&gateway(), &labelled(good()), Some(&label)),
            Ok(())
        );
        // One Secret without it (here the NATS token) is named, with the label it lacks.
        let mut s = labelled(good());
        s.insert("chat-nats".into(), secret(&[("token", "t")]));
        let err = validate(&gateway(), &s, Some(&label)).expect_err("unlabelled");
        assert_eq!(err.category(), "SecretNotUsable");
        assert!(
            err.to_string()
                .starts_with("Secret chat-nats lacks the label wsrelay.dev/usable=true"),
            "{err}"
        );
        // Another value of the label is not the label.
        let mut s = labelled(good());
        if let Some(Some(n)) = s.get_mut("chat-nats") {
            n.metadata.labels = Some(BTreeMap::from([(label.key.clone(), "false".into())]));
        }
        assert!(validate(&gateway(), &s, Some(&label)).is_err());
        // Without the requirement, labels do not matter.
        assert_eq!(validate(&gateway(), &good(), None), Ok(()));
    }

    #[test]
    fn a_secret_label_is_key_equals_value() {
        assert_eq!(
            "wsrelay.dev/usable=true".parse::<SecretLabel>(),
            Ok(SecretLabel {
                key: "wsrelay.dev/usable".into(),
                value: "true".into()
            })
        );
        for bad in ["usable", "=true", "a b=c", "k=v v"] {
            assert!(bad.parse::<SecretLabel>().is_err(), "{bad}");
        }
    }

    #[test]
    fn an_empty_value_is_refused() {
        let mut s = good();
        s.insert("chat-nats".into(), secret(&[("token", " \n")]));
        let err = validate(&gateway(), &s, None).expect_err("empty");
        assert!(err.to_string().ends_with("is empty"), "{err}");
    }

    fn authorize_gateway() -> WebsocketGateway {
        serde_yaml::from_str(include_str!("../tests/fixtures/authorize.yaml")).expect("fixture")
    }

    const PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n";

    fn authorize_secrets() -> BTreeMap<String, Option<Secret>> {
        BTreeMap::from([
            (
                "shop-jwt".to_string(),
                secret(&[("hmac", "0123456789abcdef0123456789abcdef")]),
            ),
            (
                "channel-keys".to_string(),
                secret(&[("public.pem", PUBLIC_KEY)]),
            ),
        ])
    }

    /// A binding's subscription-token keys are checked like `auth.jwt`'s and mounted
    /// beside them.
    #[test]
    fn a_subscription_tokens_own_key_secret_is_checked_and_mounted() {
        let gw = authorize_gateway();
        assert_eq!(validate(&gw, &authorize_secrets(), None), Ok(()));
        assert_eq!(secret_names(&gw), ["channel-keys", "shop-jwt"]);
        assert!(mounted_secret_names(&gw).contains("channel-keys"));

        let mut s = authorize_secrets();
        s.insert("channel-keys".into(), None);
        assert_eq!(
            validate(&gw, &s, None),
            Err(ValidateError::SecretNotFound {
                name: "channel-keys".into()
            })
        );
        let mut s = authorize_secrets();
        s.insert("channel-keys".into(), secret(&[("other.pem", PUBLIC_KEY)]));
        assert_eq!(
            validate(&gw, &s, None).map_err(|e| e.category()),
            Err("SecretKeyNotFound")
        );
        let mut s = authorize_secrets();
        s.insert(
            "channel-keys".into(),
            secret(&[("public.pem", "not a key")]),
        );
        let err = validate(&gw, &s, None).expect_err("not PEM");
        assert_eq!(err.category(), "InvalidSecret");
        assert!(err.to_string().contains("not PEM"), "{err}");

        // An HMAC key of the binding's own is held to HS256's minimum length.
        let mut gw = authorize_gateway();
        let jwt = gw.spec.bindings[2]
            .authorize
            .as_mut()
            .and_then(|a| a.token.as_mut())
            .and_then(|t| t.jwt.as_mut())
            .expect("the private binding's own key set");
        jwt.public_key_secret_ref = None;
        jwt.algorithms.clear();
        jwt.hmac_secret_ref = Some(SecretKeyRef {
            name: "channel-keys".into(),
            key: "hmac".into(),
        });
        let mut s = authorize_secrets();
        s.insert("channel-keys".into(), secret(&[("hmac", "short")]));
        let err = validate(&gw, &s, None).expect_err("weak key");
        assert_eq!(err.category(), "InvalidSecret");
        assert!(err.to_string().contains("at least 32 bytes"), "{err}");
    }

    /// A rule that does not compile is named with its binding and where it fails, before
    /// any Secret is looked at.
    #[test]
    fn a_rule_that_does_not_compile_is_an_invalid_rule_with_its_position() {
        let mut gw = authorize_gateway();
        let rule = &mut gw.spec.bindings[0]
            .authorize
            .as_mut()
            .expect("authorize")
            .rule;
        *rule = Some("vars.room in claims.rooms ||\n  claims.roles.exists(r, r ==)".into());
        let err = validate(&gw, &BTreeMap::new(), None).expect_err("bad rule");
        assert_eq!(err.category(), "InvalidRule");
        let ValidateError::InvalidRule { field, error } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(field, "spec.bindings[0].authorize.rule");
        let (line, column) = error.at.expect("a position");
        assert_eq!(line, 2, "{err}");
        assert!(column > 1, "{err}");
        assert!(
            err.to_string().starts_with(&format!(
                "spec.bindings[0].authorize.rule: line 2, column {column}: "
            )),
            "{err}"
        );
        // A variable the relay does not provide is refused too (the checker, not the parser).
        *gw.spec.bindings[0]
            .authorize
            .as_mut()
            .expect("authorize")
            .rule
            .as_mut()
            .expect("rule") = "user.admin".into();
        let err = validate(&gw, &authorize_secrets(), None).expect_err("unknown variable");
        assert_eq!(err.category(), "InvalidRule");
        assert!(err.to_string().contains("user"), "{err}");
        // The fixture's own rules compile.
        assert_eq!(
            validate(&authorize_gateway(), &authorize_secrets(), None),
            Ok(())
        );
    }

    fn presence_gateway() -> WebsocketGateway {
        let mut gw = gateway();
        gw.spec.bindings[0].direction = crate::api::Direction::Both;
        gw.spec.bindings[0].presence = Some(
            serde_json::from_value(serde_json::json!({ "info": ["claims.name"] }))
                .expect("presence"),
        );
        gw
    }

    #[test]
    fn a_valid_presence_passes() {
        assert_eq!(validate(&presence_gateway(), &good(), None), Ok(()));
    }

    /// What the CRD's rules would refuse at admission, a cluster with an older CRD lets
    /// through: the validate stage names it by its spec path, with the relay's reason.
    #[test]
    fn a_presence_the_relay_would_refuse_is_named_by_its_spec_path() {
        let mut gw = presence_gateway();
        let channel = gw.spec.bindings[0].channel.clone();
        let p = gw.spec.bindings[0].presence.as_mut().expect("presence");
        p.key = "{claims.sub}.{room}".into();
        p.info = vec!["name".into()];
        let err = validate(&gw, &good(), None).expect_err("refused");
        assert_eq!(err.category(), "InvalidPresence");
        assert_eq!(
            err.to_string(),
            format!(
                "spec.bindings[0].presence.key: {{room}} is not a placeholder of the channel {channel:?}; \
                 spec.bindings[0].presence.info[0]: \"name\" is not a claim path ('claims.' then names joined by '.')"
            )
        );
        // A publish-only binding has no subscribers to be members.
        let mut gw = presence_gateway();
        gw.spec.bindings[0].direction = crate::api::Direction::Publish;
        let err = validate(&gw, &good(), None).expect_err("refused");
        assert!(
            err.to_string().starts_with("spec.bindings[0].presence: "),
            "{err}"
        );
        // The registry's own fields, named under spec.registry.
        let mut gw = presence_gateway();
        gw.spec.registry = Some(crate::api::RegistrySpec {
            replicas: 2,
            ..Default::default()
        });
        let err = validate(&gw, &good(), None).expect_err("refused");
        assert_eq!(err.to_string(), "spec.registry.replicas: must be 1, 3 or 5");
    }

    fn events_gateway() -> WebsocketGateway {
        let mut gw = gateway();
        gw.spec.events =
            Some(serde_json::from_value(serde_json::json!({ "durable": {} })).expect("events"));
        gw.spec.control = Some(serde_json::from_value(serde_json::json!({})).expect("control"));
        gw
    }

    #[test]
    fn valid_events_and_control_pass() {
        assert_eq!(validate(&events_gateway(), &good(), None), Ok(()));
    }

    /// What the CRD's rules refuse at admission, or what they cannot see (the subjects as
    /// rendered with the namespace and name), the validate stage names by its spec path
    /// with the relay's reason, as InvalidEvents.
    #[test]
    fn events_or_control_the_relay_would_refuse_are_named_by_their_spec_path() {
        let refused = |gw: &WebsocketGateway| {
            let err = validate(gw, &good(), None).expect_err("refused");
            assert_eq!(err.category(), "InvalidEvents", "{err}");
            err.to_string()
        };
        // A duplicate window shorter than two leases (the registry's default lease: 15 s).
        let mut gw = events_gateway();
        let mut d = gw
            .spec
            .events
            .as_ref()
            .and_then(|e| e.durable.clone())
            .expect("durable");
        d.duplicate_window_seconds = 10;
        gw.spec.events.as_mut().expect("events").durable = Some(d.clone());
        assert_eq!(
            refused(&gw),
            "spec.events.durable.duplicateWindowSeconds: must be at least twice registry.leaseSeconds plus graceSeconds (30) and at most maxAgeSeconds (86400)"
        );
        // Replicas JetStream does not have.
        d.duplicate_window_seconds = 300;
        d.replicas = 2;
        gw.spec.events.as_mut().expect("events").durable = Some(d);
        assert_eq!(
            refused(&gw),
            "spec.events.durable.replicas: must be 1, 3 or 5"
        );
        // A control subject that, rendered, is within the events subject.
        let mut gw = events_gateway();
        gw.spec.control.as_mut().expect("control").subject = "wsrelay.events.apps.chat".into();
        assert_eq!(
            refused(&gw),
            "spec.events.subject: conflicts with control.subject: one is within the other: events would reach the control service"
        );
        // A subject too long once rendered (a CRD older than its maxLength let it through).
        let mut gw = events_gateway();
        gw.spec.control.as_mut().expect("control").subject = "c".repeat(192);
        let err = refused(&gw);
        assert!(
            err.starts_with(&format!(
                "spec.control.subject: \"{}.apps.chat\" is not a fixed NATS subject",
                "c".repeat(192)
            )),
            "{err}"
        );
    }
}
