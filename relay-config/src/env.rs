//! Secret file paths from the environment, and the example config.

use std::path::PathBuf;

use super::*;

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
                history: None,
                authorize: None,
                presence: None,
                auto_subscribe: false,
            }],
            limits: Limits::default(),
            drain: Drain::default(),
            registry: None,
            events: None,
            control: None,
        }
    }
}
