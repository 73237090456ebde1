//! The relay config (the `wsrelay-config` crate's own `Config`, never a copy of it)
//! mapped from the gateway spec, rendered for the ConfigMap.

use std::path::PathBuf;

use sha2::{Digest, Sha256};
use wsrelay_config as relay;

use super::{ADMIN_PORT, CLIENT_PORT, WS_PATH};
use crate::api::{
    AuthorizeSpec, BackendRequestSpec, Direction, EventType, JwtAlgorithm, JwtSpec, OnTimeout,
    PresenceSpec, SecretKeyRef, SlowConsumerPolicy, TokenLocation, WebsocketGatewaySpec,
};

/// The ConfigMap key holding the relay config.
pub const CONFIG_KEY: &str = "relay.json";
/// Where the relay reads its config inside the pod.
pub const CONFIG_FILE: &str = "/etc/wsrelay/config/relay.json";
/// Directory under which each referenced Secret is mounted, one sub-directory per Secret.
pub const SECRETS_DIR: &str = "/etc/wsrelay/secrets";
/// Directory where the serving certificate Secret is mounted.
pub const TLS_DIR: &str = "/etc/wsrelay/tls";

/// The file a Secret key appears as inside the relay pod.
pub fn secret_path(secret: &str, key: &str) -> PathBuf {
    PathBuf::from(format!("{SECRETS_DIR}/{secret}/{key}"))
}

fn key_path(r: &SecretKeyRef) -> PathBuf {
    secret_path(&r.name, &r.key)
}

/// A relay config section with the relay's own serde defaults (not `Default`, which zeroes
/// numbers the relay requires to be positive), so the operator never restates them.
fn relay_default<T: serde::de::DeserializeOwned + Default>() -> T {
    serde_json::from_str("{}").unwrap_or_default()
}

/// Clamps a spec integer (bounded by the CRD schema) into the relay's unsigned type.
fn u32_of(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}
fn u64_of(v: i32) -> u64 {
    u64::try_from(v.max(0)).unwrap_or(0)
}
fn u64_of_i64(v: i64) -> u64 {
    u64::try_from(v.max(0)).unwrap_or(0)
}

/// The trusted proxies as the relay reads them: CIDRs as they are, a single address as a
/// network of one. The CRD's CEL rule admits only CIDRs and addresses; an entry that
/// parses there but not here is left out, which trusts less, never more.
fn trusted_proxies<T>(entries: &[String]) -> Vec<T>
where
    T: std::str::FromStr + From<std::net::IpAddr>,
{
    entries
        .iter()
        .filter_map(|e| {
            let e = e.trim();
            e.parse::<T>()
                .ok()
                .or_else(|| e.parse::<std::net::IpAddr>().ok().map(T::from))
        })
        .collect()
}

/// The pod's queued-bytes budget: `limits.maxQueuedBytesPerPod` when set; else half the
/// container's memory limit, when one is set (never below one connection's queue, which the
/// relay requires); else the relay's own default.
fn max_queued_bytes(spec: &WebsocketGatewaySpec) -> u64 {
    let send_queue = u64_of_i64(spec.limits.send_queue_bytes);
    if let Some(explicit) = spec.limits.max_queued_bytes_per_pod {
        return u64_of_i64(explicit).max(send_queue);
    }
    let memory_limit = spec
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("memory"))
        .and_then(|q| quantity_bytes(&q.0));
    match memory_limit {
        Some(bytes) => (bytes / 2).max(send_queue),
        None => relay_default::<relay::Limits>()
            .max_queued_bytes
            .max(send_queue),
    }
}

/// A Kubernetes quantity (`1Gi`, `512M`, `1e9`, `1.5Gi`, `128974848`) in bytes, rounded up;
/// `None` when it is not one or does not fit. Pure.
fn quantity_bytes(q: &str) -> Option<u64> {
    let q = q.trim();
    let number_end = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(number_end);
    let number = number.strip_prefix('+').unwrap_or(number);
    if number.starts_with('-') {
        return None;
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole
            .chars()
            .chain(fraction.chars())
            .all(|c| c.is_ascii_digit())
    {
        return None;
    }
    // value = digits / 10^fraction_len, times num / den.
    let digits: u128 = format!("{whole}{fraction}").parse().ok()?;
    let mut den: u128 = 10u128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    let mut num: u128 = 1;
    let binary = |p: u32| 1024u128.checked_pow(p);
    let decimal = |p: u32| 10u128.checked_pow(p);
    match suffix {
        "" => {}
        "Ki" => num = binary(1)?,
        "Mi" => num = binary(2)?,
        "Gi" => num = binary(3)?,
        "Ti" => num = binary(4)?,
        "Pi" => num = binary(5)?,
        "Ei" => num = binary(6)?,
        "n" => den = den.checked_mul(decimal(9)?)?,
        "u" => den = den.checked_mul(decimal(6)?)?,
        "m" => den = den.checked_mul(decimal(3)?)?,
        "k" => num = decimal(3)?,
        "M" => num = decimal(6)?,
        "G" => num = decimal(9)?,
        "T" => num = decimal(12)?,
        "P" => num = decimal(15)?,
        "E" => num = decimal(18)?,
        exponent => {
            let exp: i32 = exponent
                .strip_prefix(['e', 'E'])?
                .parse()
                .ok()
                .filter(|e: &i32| e.abs() <= 30)?;
            let scale = decimal(exp.unsigned_abs())?;
            if exp >= 0 {
                num = scale;
            } else {
                den = den.checked_mul(scale)?;
            }
        }
    }
    let bytes = digits.checked_mul(num)?.div_ceil(den);
    u64::try_from(bytes).ok()
}

/// The JetStream stream that keeps a binding's history: named after the gateway and the
/// subjects it keeps (not the binding's position, so reordering bindings keeps it), within
/// JetStream's 64 characters. Pure.
pub fn history_stream(namespace: &str, name: &str, subject_filter: &str) -> String {
    let digest = Sha256::digest(format!("{namespace}/{name}/{subject_filter}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let full = format!("wsrelay_{namespace}_{name}_{}", &hex[..8]);
    if full.len() <= 64 {
        full
    } else {
        format!("wsrelay_{}", &hex[..24])
    }
}

/// Longest KV bucket name: its stream, `KV_<bucket>`, must fit JetStream's 64 characters
/// (the relay's config refuses longer).
const MAX_BUCKET_LEN: usize = 61;

/// The JetStream KV bucket of a gateway's connection registry: named after the gateway like
/// its history streams (`wsrelay_<namespace>_<name>_reg_<hash>`), unique per gateway (the
/// hash is of `namespace/name`, so names whose other characters map alike still differ), at
/// most 61 characters of `[A-Za-z0-9_-]`. Pure.
pub fn registry_bucket(namespace: &str, name: &str) -> String {
    gateway_scoped_name(namespace, name, "reg", "registry", MAX_BUCKET_LEN)
}

/// Longest JetStream stream name.
const MAX_STREAM_LEN: usize = 64;

/// The JetStream stream that keeps a gateway's lifecycle events (`events.durable`): named
/// like its registry bucket (`wsrelay_<namespace>_<name>_ev_<hash>`), unique per gateway, at
/// most 64 characters of `[A-Za-z0-9_-]`, never one of its history streams' names (those
/// have no `_ev_`, as a namespace and a gateway name hold no `_`) nor its bucket's stream
/// (`KV_...`). Pure.
pub fn events_stream(namespace: &str, name: &str) -> String {
    gateway_scoped_name(namespace, name, "ev", "events", MAX_STREAM_LEN)
}

/// `wsrelay_<namespace>_<name>_<kind>_<hash8>`, or `wsrelay_<kind>_<hash24>` when that is
/// longer than `max`; the hash is of `<namespace>/<name>/<what>`, so gateways whose names
/// map alike still differ. Pure.
fn gateway_scoped_name(namespace: &str, name: &str, kind: &str, what: &str, max: usize) -> String {
    let digest = Sha256::digest(format!("{namespace}/{name}/{what}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    // A gateway's name may hold '.' (an older CRD allowed it), which a JetStream name may not.
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    let full = format!(
        "wsrelay_{}_{}_{kind}_{}",
        clean(namespace),
        clean(name),
        &hex[..8]
    );
    if full.len() <= max {
        full
    } else {
        format!("wsrelay_{kind}_{}", &hex[..24])
    }
}

/// A gateway's subject under a prefix the spec names (`events.subject`, `control.subject`):
/// `<prefix>.<namespace>.<name>`, a `.` in the name becoming `_` so that the name stays one
/// token (a namespace holds none). Pure.
pub fn gateway_subject(prefix: &str, namespace: &str, name: &str) -> String {
    format!("{prefix}.{namespace}.{}", name.replace('.', "_"))
}

/// The subject a gateway's relays forward SSE POSTs under (`listen.sseForwardSubject`):
/// `_WSRELAY.sse.<namespace>.<name>`, so that gateways on one NATS account never take each
/// other's; `_WSRELAY.sse.<hash24>` of `<namespace>/<name>` when that is longer than the
/// relay accepts. Pure.
pub fn sse_forward_subject(namespace: &str, name: &str) -> String {
    let prefix = format!("{}.sse", relay::RELAY_SUBJECT_PREFIX);
    let full = gateway_subject(&prefix, namespace, name);
    if relay::is_sse_forward_subject(&full) {
        return full;
    }
    let digest = Sha256::digest(format!("{namespace}/{name}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}.{}", &hex[..24])
}

/// The relay config's `events`, when the spec has them: the subject under the gateway's
/// namespace and name, the stream [`events_stream`] names. Pure.
pub fn relay_events(
    spec: &WebsocketGatewaySpec,
    namespace: &str,
    name: &str,
) -> Option<relay::Events> {
    let e = spec.events.as_ref()?;
    Some(relay::Events {
        subject: gateway_subject(&e.subject, namespace, name),
        types: e
            .types
            .iter()
            .map(|t| match t {
                EventType::Connected => relay::EventType::Connected,
                EventType::Resumed => relay::EventType::Resumed,
                EventType::Disconnected => relay::EventType::Disconnected,
                EventType::Subscribed => relay::EventType::Subscribed,
                EventType::Unsubscribed => relay::EventType::Unsubscribed,
                EventType::Occupied => relay::EventType::Occupied,
                EventType::Vacated => relay::EventType::Vacated,
            })
            .collect(),
        durable: e.durable.as_ref().map(|d| relay::DurableEvents {
            stream: events_stream(namespace, name),
            max_age_seconds: u64_of(d.max_age_seconds),
            replicas: u8::try_from(d.replicas).unwrap_or(1),
            max_bytes: u64_of_i64(d.max_bytes),
            duplicate_window_seconds: u64_of(d.duplicate_window_seconds),
        }),
        grace_seconds: u64_of(e.grace_seconds),
    })
}

/// The relay config's `control`, when the spec has it. Pure.
pub fn relay_control(
    spec: &WebsocketGatewaySpec,
    namespace: &str,
    name: &str,
) -> Option<relay::Control> {
    spec.control.as_ref().map(|c| relay::Control {
        subject: gateway_subject(&c.subject, namespace, name),
    })
}

/// The relay config's `registry`: present when a binding has presence, `spec.events` or
/// `spec.control` is set (both need it), or `spec.registry` is set; in the bucket
/// [`registry_bucket`] names. Pure.
pub fn relay_registry(
    spec: &WebsocketGatewaySpec,
    namespace: &str,
    name: &str,
) -> Option<relay::Registry> {
    let needed = spec.bindings.iter().any(|b| b.presence.is_some())
        || spec.events.is_some()
        || spec.control.is_some()
        || spec.limits.max_fleet_connections_per_subject > 0;
    if !needed && spec.registry.is_none() {
        return None;
    }
    let r = spec.registry.clone().unwrap_or_default();
    Some(relay::Registry {
        bucket: registry_bucket(namespace, name),
        lease_seconds: u64_of(r.lease_seconds),
        replicas: u8::try_from(r.replicas).unwrap_or(1),
        max_bytes: u64_of_i64(r.max_bytes),
        // A pod's relay names itself after its pod (HOSTNAME), which the forget path relies on.
        relay_name: None,
    })
}

/// A binding's presence as the relay reads it.
fn relay_presence(p: &PresenceSpec) -> relay::Presence {
    relay::Presence {
        key: p.key.clone(),
        info: p.info.clone(),
        events: p.events,
        max_members_with_events: u32_of(p.max_members_with_events.into()),
        leave_grace_seconds: u64_of(p.leave_grace_seconds),
    }
}

/// A JWT key set as the relay reads it (the connection tokens' or a binding's own).
fn relay_jwt(j: &JwtSpec) -> relay::Jwt {
    let algorithms = if j.algorithms.is_empty() {
        // The key source decides what can be verified; HS256 never mixes with the others.
        if j.hmac_secret_ref.is_some() {
            vec![relay::JwtAlgorithm::HS256]
        } else if j.public_key_secret_ref.is_some() {
            vec![relay::JwtAlgorithm::RS256]
        } else {
            vec![relay::JwtAlgorithm::RS256, relay::JwtAlgorithm::ES256]
        }
    } else {
        j.algorithms
            .iter()
            .map(|a| match a {
                JwtAlgorithm::HS256 => relay::JwtAlgorithm::HS256,
                JwtAlgorithm::RS256 => relay::JwtAlgorithm::RS256,
                JwtAlgorithm::ES256 => relay::JwtAlgorithm::ES256,
            })
            .collect()
    };
    let mut key = relay::JwtKey {
        hmac_secret_file: j.hmac_secret_ref.as_ref().map(key_path),
        public_key_file: j.public_key_secret_ref.as_ref().map(key_path),
        jwks_url: j.jwks_url.clone(),
        jwks_allow_http: j.jwks_allow_http,
        ..relay_default::<relay::JwtKey>()
    };
    if let Some(s) = j.jwks_cache_seconds {
        key.jwks_cache_seconds = u64_of(s);
    }
    if let Some(s) = j.jwks_min_refresh_seconds {
        key.jwks_min_refresh_seconds = u64_of(s);
    }
    relay::Jwt {
        algorithms,
        key,
        issuer: j.issuer.clone(),
        audiences: j.audiences.clone(),
        leeway_seconds: u64_of(j.leeway_seconds),
    }
}

/// A backend request (a binding's `authorize.request` or `auth.connectRequest`).
fn relay_request(r: &BackendRequestSpec) -> relay::BackendRequest {
    relay::BackendRequest {
        subject: r.subject.clone(),
        timeout_ms: u64_of(r.timeout_ms),
        cache_seconds: u64_of(r.cache_seconds),
        cache_entries: u32_of(r.cache_entries.into()),
        on_timeout: match r.on_timeout {
            OnTimeout::Deny => relay::OnTimeout::Deny,
            OnTimeout::Allow => relay::OnTimeout::Allow,
        },
    }
}

/// A binding's `authorize` section. The subscription token's own keys appear as file
/// paths like `auth.jwt`'s (the validate stage mounts their Secrets).
fn relay_authorize(a: &AuthorizeSpec) -> relay::Authorize {
    relay::Authorize {
        token: a.token.as_ref().map(|t| relay::SubscriptionToken {
            jwt: t.jwt.as_ref().map(|j| relay_jwt(&j.as_jwt_spec())),
        }),
        rule: a.rule.clone(),
        request: a.request.as_ref().map(relay_request),
    }
}

/// Maps the spec to the relay's config. Secrets appear as file paths (they are mounted into
/// the pod), never inline, so the ConfigMap holds nothing secret.
pub fn relay_config(spec: &WebsocketGatewaySpec, namespace: &str, name: &str) -> relay::Config {
    let nats_credentials = spec
        .nats
        .credentials
        .as_ref()
        .map(|c| relay::NatsCredentials {
            token_file: c.token.as_ref().map(key_path),
            user_file: c
                .user_password
                .as_ref()
                .map(|u| secret_path(&u.secret_name, &u.username_key)),
            password_file: c
                .user_password
                .as_ref()
                .map(|u| secret_path(&u.secret_name, &u.password_key)),
            nkey_seed_file: c.nkey_seed.as_ref().map(key_path),
            creds_file: c.creds_file.as_ref().map(key_path),
        })
        .unwrap_or_default();

    let jwt = spec.auth.jwt.as_ref().map(relay_jwt);

    let token_sources = spec
        .auth
        .jwt
        .as_ref()
        .map(|j| {
            j.token_sources
                .iter()
                .map(|s| {
                    let name = s.name.clone().unwrap_or_default();
                    match s.from {
                        TokenLocation::Query => relay::TokenSource::Query { name },
                        TokenLocation::Header => relay::TokenSource::AuthorizationHeader {},
                        TokenLocation::Cookie => relay::TokenSource::Cookie { name },
                        TokenLocation::Subprotocol => relay::TokenSource::Subprotocol {},
                    }
                })
                .collect()
        })
        .unwrap_or_else(|| relay::Auth::default().token_sources);

    let l = &spec.limits;
    relay::Config {
        listen: relay::Listen {
            client: std::net::SocketAddr::from(([0, 0, 0, 0], CLIENT_PORT as u16)),
            admin: std::net::SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT as u16)),
            path: WS_PATH.to_string(),
            trusted_proxies: trusted_proxies(&spec.network.trusted_proxies),
            client_ip_header: spec.network.client_ip_header.clone(),
            sse_forward_subject: sse_forward_subject(namespace, name),
        },
        tls: spec.tls.as_ref().map(|_| relay::ServerTls {
            cert_file: PathBuf::from(format!("{TLS_DIR}/tls.crt")),
            key_file: PathBuf::from(format!("{TLS_DIR}/tls.key")),
        }),
        nats: relay::Nats {
            urls: spec.nats.urls.clone(),
            name: "wsrelay".to_string(),
            credentials: nats_credentials,
            tls: nats_tls(spec),
        },
        auth: relay::Auth {
            jwt,
            token_sources,
            allowed_origins: spec.auth.allowed_origins.clone(),
            allow_anonymous: spec.auth.allow_anonymous,
            refuse_after_upgrade: spec.auth.refuse_after_upgrade,
            connect_request: spec.auth.connect_request.as_ref().map(relay_request),
        },
        bindings: spec
            .bindings
            .iter()
            .map(|b| relay::Binding {
                channel: b.channel.clone(),
                subject: b.subject.clone(),
                direction: match b.direction {
                    Direction::Subscribe => relay::Direction::Subscribe,
                    Direction::Publish => relay::Direction::Publish,
                    Direction::Both => relay::Direction::Both,
                },
                history: b.history.as_ref().map(|h| relay::History {
                    stream: history_stream(
                        namespace,
                        name,
                        &wsrelay_config::template::parse_subject_template(&b.subject)
                            .map(|t| relay::subject_filter(&t))
                            .unwrap_or_else(|_| b.subject.clone()),
                    ),
                    max_messages: u32_of(h.max_messages.into()),
                    max_age_seconds: u64_of(h.max_age_seconds),
                    max_bytes: u64::try_from(h.max_bytes.max(0)).unwrap_or(0),
                    replicas: u8::try_from(h.replicas).unwrap_or(1),
                }),
                authorize: b.authorize.as_ref().map(relay_authorize),
                presence: b.presence.as_ref().map(relay_presence),
                auto_subscribe: b.auto_subscribe,
            })
            .collect(),
        limits: relay::Limits {
            max_connections: u32_of(l.max_connections_per_pod),
            max_message_bytes: u32_of(l.max_message_bytes.into()),
            send_queue_len: u32_of(l.send_queue_length.into()),
            send_queue_bytes: u64_of_i64(l.send_queue_bytes),
            max_queued_bytes: max_queued_bytes(spec),
            max_connections_per_ip: u32_of(l.max_connections_per_ip),
            max_connections_per_subject: u32_of(l.max_connections_per_subject),
            max_fleet_connections_per_subject: u32_of(l.max_fleet_connections_per_subject),
            max_handshakes_in_flight: u32_of(l.max_handshakes_in_flight.into()),
            max_handshakes_in_flight_per_ip: l
                .max_handshakes_in_flight_per_ip
                .map(|v| u32_of(v.into())),
            accept_rate_per_second: u32_of(l.accept_rate_per_second),
            accept_burst: l.accept_burst.map(u32_of),
            slow_consumer_policy: match l.slow_consumer_policy {
                SlowConsumerPolicy::Disconnect => relay::SlowConsumerPolicy::Disconnect,
                SlowConsumerPolicy::DropOldest => relay::SlowConsumerPolicy::DropOldest,
            },
            max_subscriptions_per_connection: u32_of(l.max_subscriptions_per_connection.into()),
            publish_rate_per_second: u32_of(l.publish_rate_per_second.into()),
            publish_burst: u32_of(l.publish_burst.into()),
            idle_timeout_seconds: u64_of(l.idle_timeout_seconds),
            ping_interval_seconds: u64_of(l.ping_interval_seconds),
            handshake_timeout_seconds: u64_of(l.handshake_timeout_seconds),
            write_timeout_seconds: u64_of(l.write_timeout_seconds),
        },
        drain: relay::Drain {
            grace_period_seconds: u64_of(spec.drain.grace_period_seconds),
            // At most half the grace period: the rest is for the closes themselves.
            delay_before_close_seconds: u64_of(
                spec.drain
                    .delay_before_close_seconds
                    .min(spec.drain.grace_period_seconds / 2),
            ),
        },
        registry: relay_registry(spec, namespace, name),
        events: relay_events(spec, namespace, name),
        control: relay_control(spec, namespace, name),
    }
}

/// The config as the relay reads it. JSON is a subset of YAML, which the relay's loader
/// reads, and serde_json's output is stable, so the hash only changes with the content.
pub fn render_config(config: &relay::Config) -> Result<String, serde_json::Error> {
    let mut out = serde_json::to_string_pretty(config)?;
    out.push('\n');
    Ok(out)
}

/// TLS towards NATS: the CA to verify the servers with, and the client certificate for
/// mutual TLS, each when the spec names one.
fn nats_tls(spec: &WebsocketGatewaySpec) -> Option<relay::NatsTls> {
    let ca = spec.nats.ca_secret_ref.as_ref();
    let client = spec.nats.client_cert_secret_name.as_deref();
    if ca.is_none() && client.is_none() {
        return None;
    }
    Some(relay::NatsTls {
        ca_file: ca.map(key_path),
        cert_file: client.map(|s| secret_path(s, "tls.crt")),
        key_file: client.map(|s| secret_path(s, "tls.key")),
    })
}

/// A short, stable hash of the rendered config, for the pod-template annotation.
pub fn config_hash(rendered: &str) -> String {
    let digest = Sha256::digest(rendered.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::WebsocketGateway;

    fn spec(yaml: &str) -> WebsocketGatewaySpec {
        let gw: WebsocketGateway = serde_yaml::from_str(yaml).expect("fixture parses");
        gw.spec
    }

    #[test]
    fn rendered_config_reads_back_and_passes_the_relays_own_validation() {
        let config = relay_config(
            &spec(include_str!("../../tests/fixtures/full.yaml")),
            "ns",
            "gw",
        );
        config.validate().expect("the relay accepts the config");
        let rendered = render_config(&config).expect("renders");
        let back: relay::Config = serde_json::from_str(&rendered).expect("reads back");
        assert_eq!(back, config);
    }

    #[test]
    fn secrets_become_file_paths_never_inline_values() {
        let config = relay_config(
            &spec(include_str!("../../tests/fixtures/full.yaml")),
            "ns",
            "gw",
        );
        let key = config.auth.jwt.expect("jwt").key;
        assert_eq!(
            key.hmac_secret_file,
            Some(PathBuf::from("/etc/wsrelay/secrets/chat-jwt/hmac"))
        );
        assert_eq!(
            config.nats.credentials.token_file,
            Some(PathBuf::from("/etc/wsrelay/secrets/chat-nats/token"))
        );
    }

    #[test]
    fn empty_algorithms_follow_the_key_source() {
        let mut s = spec(include_str!("../../tests/fixtures/full.yaml"));
        let jwt = relay_config(&s, "ns", "gw").auth.jwt.expect("jwt");
        assert_eq!(jwt.algorithms, vec![relay::JwtAlgorithm::HS256]);
        let j = s.auth.jwt.as_mut().expect("jwt");
        j.hmac_secret_ref = None;
        j.jwks_url = Some("https://issuer.example.com/jwks.json".into());
        let jwt = relay_config(&s, "ns", "gw").auth.jwt.expect("jwt");
        assert_eq!(
            jwt.algorithms,
            vec![relay::JwtAlgorithm::RS256, relay::JwtAlgorithm::ES256]
        );
    }

    #[test]
    fn jwks_timings_are_passed_on_and_default_to_the_relays_own() {
        let mut s = spec(include_str!("../../tests/fixtures/full.yaml"));
        let j = s.auth.jwt.as_mut().expect("jwt");
        j.hmac_secret_ref = None;
        j.jwks_url = Some("https://issuer.example.com/jwks.json".into());
        let defaults = relay_config(&s, "ns", "gw").auth.jwt.expect("jwt").key;
        let relay_defaults: relay::JwtKey = relay_default();
        assert_eq!(
            defaults.jwks_cache_seconds,
            relay_defaults.jwks_cache_seconds
        );
        assert_eq!(
            defaults.jwks_min_refresh_seconds,
            relay_defaults.jwks_min_refresh_seconds
        );
        let j = s.auth.jwt.as_mut().expect("jwt");
        j.jwks_cache_seconds = Some(120);
        j.jwks_min_refresh_seconds = Some(3);
        let config = relay_config(&s, "ns", "gw");
        config.validate().expect("the relay accepts the config");
        let key = config.auth.jwt.expect("jwt").key;
        assert_eq!(
            (key.jwks_cache_seconds, key.jwks_min_refresh_seconds),
            (120, 3)
        );
    }

    #[test]
    fn the_nats_client_certificate_is_mounted_for_mutual_tls() {
        let config = relay_config(
            &spec(include_str!("../../tests/fixtures/full.yaml")),
            "ns",
            "gw",
        );
        let tls = config.nats.tls.expect("nats tls");
        assert_eq!(
            tls.cert_file,
            Some(PathBuf::from("/etc/wsrelay/secrets/nats-client/tls.crt"))
        );
        assert_eq!(
            tls.key_file,
            Some(PathBuf::from("/etc/wsrelay/secrets/nats-client/tls.key"))
        );
    }

    #[test]
    fn sse_forward_subjects_are_per_gateway_and_always_valid() {
        assert_eq!(
            sse_forward_subject("team-a", "chat"),
            "_WSRELAY.sse.team-a.chat"
        );
        assert_eq!(
            sse_forward_subject("team-a", "chat.v2"),
            "_WSRELAY.sse.team-a.chat_v2"
        );
        let long = sse_forward_subject(&"n".repeat(63), &"g".repeat(200));
        assert!(relay::is_sse_forward_subject(&long), "{long}");
        assert_ne!(long, sse_forward_subject(&"n".repeat(63), &"h".repeat(200)));
    }

    #[test]
    fn the_hash_changes_with_the_content_only() {
        assert_eq!(config_hash("a"), config_hash("a"));
        assert_ne!(config_hash("a"), config_hash("b"));
        assert_eq!(config_hash("a").len(), 16);
    }

    #[test]
    fn history_streams_are_named_after_the_gateway_and_subjects() {
        let a = history_stream("shop", "chat", "orders.*.events");
        assert!(a.starts_with("wsrelay_shop_chat_"), "{a}");
        assert_eq!(a, history_stream("shop", "chat", "orders.*.events"));
        assert_ne!(a, history_stream("shop", "chat", "orders.*"));
        assert_ne!(a, history_stream("other", "chat", "orders.*.events"));
        let long = history_stream(&"n".repeat(63), &"g".repeat(63), "x");
        assert!(long.len() <= 64 && long.starts_with("wsrelay_"), "{long}");
        for name in [a, long] {
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                "{name}"
            );
        }
        let config = relay_config(
            &spec(include_str!("../../tests/fixtures/full.yaml")),
            "ns",
            "gw",
        );
        let h = config
            .bindings
            .iter()
            .find_map(|b| b.history.clone())
            .expect("a binding with history");
        assert_eq!(h.stream, history_stream("ns", "gw", "orders.*.events"));
        assert_eq!(
            (h.max_messages, h.max_age_seconds, h.max_bytes, h.replicas),
            (200, 600, 512 << 20, 3)
        );
        config.validate().expect("valid");
    }

    fn minimal() -> WebsocketGatewaySpec {
        spec(include_str!("../../tests/fixtures/minimal.yaml"))
    }

    fn set_memory_limit(s: &mut WebsocketGatewaySpec, memory: &str) {
        use k8s_openapi::api::core::v1::ResourceRequirements;
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        s.resources = Some(ResourceRequirements {
            limits: Some([("memory".to_string(), Quantity(memory.to_string()))].into()),
            ..ResourceRequirements::default()
        });
    }

    /// A gateway that sets none of the protections gets the CRD's defaults, which differ
    /// from the relay's where a public gateway needs them to (per-subject limit, refusals
    /// a browser can read).
    #[test]
    fn protections_default_to_what_a_public_gateway_needs() {
        let config = relay_config(&minimal(), "ns", "gw");
        config.validate().expect("the relay accepts the config");
        let l = &config.limits;
        assert_eq!(l.max_connections_per_ip, 0, "off: the pods may see a proxy");
        assert_eq!(l.max_connections_per_subject, 100);
        assert_eq!(l.max_handshakes_in_flight, 1024);
        assert_eq!(l.max_handshakes_in_flight_per_ip, None);
        assert_eq!(l.handshakes_per_ip(), 256);
        // Storm control off, and absent from the rendered file: the config hash of a gateway
        // that does not set it is what it was before the field existed.
        assert_eq!((l.accept_rate_per_second, l.accept_burst), (0, None));
        assert!(!serde_json::to_string(&config).unwrap().contains("accept"));
        assert_eq!(l.send_queue_bytes, 1024 * 1024);
        assert_eq!(l.max_queued_bytes, 512 * 1024 * 1024, "no memory limit");
        assert!(config.auth.refuse_after_upgrade);
        assert!(config.listen.trusted_proxies.is_empty());
        assert_eq!(config.listen.client_ip_header, "X-Forwarded-For");
    }

    #[test]
    fn every_protection_set_in_the_spec_reaches_the_relay_config() {
        let mut s = minimal();
        s.limits.max_connections_per_ip = 50;
        s.limits.max_connections_per_subject = 7;
        s.limits.max_handshakes_in_flight = 300;
        s.limits.max_handshakes_in_flight_per_ip = Some(20);
        s.limits.max_message_bytes = 1_048_576;
        s.limits.send_queue_bytes = 4 * 1_048_576;
        s.limits.max_queued_bytes_per_pod = Some(64 * 1_048_576);
        s.limits.accept_rate_per_second = 200;
        s.limits.accept_burst = Some(400);
        s.auth.refuse_after_upgrade = false;
        s.network.trusted_proxies = vec!["10.244.0.0/16".into(), "fd00::/8".into()];
        s.network.client_ip_header = "X-Real-IP".into();
        let config = relay_config(&s, "ns", "gw");
        config.validate().expect("the relay accepts the config");
        let l = &config.limits;
        assert_eq!(
            (
                l.max_connections_per_ip,
                l.max_connections_per_subject,
                l.max_handshakes_in_flight,
                l.max_handshakes_in_flight_per_ip,
            ),
            (50, 7, 300, Some(20))
        );
        assert_eq!(
            (l.max_message_bytes, l.send_queue_bytes, l.max_queued_bytes),
            (1_048_576, 4 * 1_048_576, 64 * 1_048_576)
        );
        assert_eq!((l.accept_rate_per_second, l.accept_burst), (200, Some(400)));
        assert!(!config.auth.refuse_after_upgrade);
        let proxies: Vec<String> = config
            .listen
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(proxies, ["10.244.0.0/16", "fd00::/8"]);
        assert_eq!(config.listen.client_ip_header, "X-Real-IP");
        // The rendered file reads back as the same config (the relay's own loader).
        let back: relay::Config =
            serde_json::from_str(&render_config(&config).expect("renders")).expect("reads back");
        assert_eq!(back, config);
    }

    /// The ends of the ranges the CRD admits (schema bounds and CEL cross-checks) render a
    /// config the relay accepts: a gateway the API server took never fails the build on
    /// these fields.
    #[test]
    fn the_extremes_the_crd_admits_pass_the_relays_validation() {
        let mut s = minimal();
        for (message, queue, budget, handshakes, share) in [
            (256, 256, Some(256), 1, Some(1)),
            (8_388_608, 8_388_608, Some(8_388_608), 65_536, Some(65_536)),
            (8_388_608, 67_108_864, Some(1_099_511_627_776), 65_536, None),
            (256, 67_108_864, None, 1, None),
        ] {
            s.limits.max_message_bytes = message;
            s.limits.send_queue_bytes = queue;
            s.limits.max_queued_bytes_per_pod = budget;
            s.limits.max_handshakes_in_flight = handshakes;
            s.limits.max_handshakes_in_flight_per_ip = share;
            s.limits.max_connections_per_ip = 1_000_000;
            s.limits.max_connections_per_subject = 0;
            for memory in [None, Some("1"), Some("1Ti")] {
                match memory {
                    Some(m) => set_memory_limit(&mut s, m),
                    None => s.resources = None,
                }
                let config = relay_config(&s, "ns", "gw");
                config.validate().unwrap_or_else(|e| {
                    panic!("{message} {queue} {budget:?} {handshakes} {share:?} {memory:?}: {e}")
                });
            }
        }
    }

    /// The relay's config takes CIDRs only; the CRD also admits a single address, which
    /// becomes a network of one. An entry neither parses as is left out (trust less).
    #[test]
    fn a_single_trusted_address_becomes_a_network_of_one() {
        let mut s = minimal();
        s.network.trusted_proxies = vec![
            "10.1.2.3".into(),
            "2001:db8::7".into(),
            "192.168.0.0/24".into(),
            "not-an-address".into(),
        ];
        let config = relay_config(&s, "ns", "gw");
        config.validate().expect("valid");
        let proxies: Vec<String> = config
            .listen
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            proxies,
            ["10.1.2.3/32", "2001:db8::7/128", "192.168.0.0/24"]
        );
    }

    /// Unset, the pod's queued-bytes budget is half its memory limit (never below one
    /// connection's queue); without a memory limit, the relay's default.
    #[test]
    fn the_queued_bytes_budget_follows_the_memory_limit() {
        let mut s = minimal();
        let budget = |s: &WebsocketGatewaySpec| {
            let c = relay_config(s, "ns", "gw");
            c.validate().expect("the relay accepts the config");
            c.limits.max_queued_bytes
        };
        assert_eq!(budget(&s), relay::Limits::default().max_queued_bytes);
        set_memory_limit(&mut s, "3Gi");
        assert_eq!(budget(&s), 3 * 1024 * 1024 * 1024 / 2);
        set_memory_limit(&mut s, "600M");
        assert_eq!(budget(&s), 300_000_000);
        set_memory_limit(&mut s, "1Mi");
        assert_eq!(budget(&s), 1024 * 1024, "at least sendQueueBytes");
        // A limit it cannot read: the relay's default, not zero.
        set_memory_limit(&mut s, "lots");
        assert_eq!(budget(&s), relay::Limits::default().max_queued_bytes);
        // A memory request alone is no limit.
        s.resources = Some(k8s_openapi::api::core::v1::ResourceRequirements {
            requests: Some(
                [(
                    "memory".to_string(),
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity("2Gi".into()),
                )]
                .into(),
            ),
            ..Default::default()
        });
        assert_eq!(budget(&s), relay::Limits::default().max_queued_bytes);
        // An explicit budget wins over the memory limit.
        set_memory_limit(&mut s, "3Gi");
        s.limits.max_queued_bytes_per_pod = Some(100_000_000);
        assert_eq!(budget(&s), 100_000_000);
    }

    #[test]
    fn quantities_are_read_in_bytes_rounded_up() {
        let cases: [(&str, Option<u64>); 16] = [
            ("128974848", Some(128_974_848)),
            ("129e6", Some(129_000_000)),
            ("129M", Some(129_000_000)),
            ("123Mi", Some(123 * 1024 * 1024)),
            ("1Gi", Some(1 << 30)),
            ("1.5Gi", Some(3 << 29)),
            ("0.5Ki", Some(512)),
            ("1k", Some(1000)),
            ("1E3", Some(1000)),
            ("1E", Some(1_000_000_000_000_000_000)),
            ("1500m", Some(2)),
            ("+1Ki", Some(1024)),
            ("-1Gi", None),
            ("1Gb", None),
            ("", None),
            ("Gi", None),
        ];
        for (q, want) in cases {
            assert_eq!(quantity_bytes(q), want, "{q:?}");
        }
    }

    #[test]
    fn an_http_jwks_url_is_passed_on_with_its_flag() {
        let mut s = spec(include_str!("../../tests/fixtures/full.yaml"));
        let j = s.auth.jwt.as_mut().expect("jwt");
        j.hmac_secret_ref = None;
        j.jwks_url = Some("http://issuer.auth.svc/jwks.json".into());
        j.jwks_allow_http = true;
        let config = relay_config(&s, "ns", "gw");
        config
            .validate()
            .expect("the relay accepts http with the flag");
        assert!(config.auth.jwt.expect("jwt").key.jwks_allow_http);
    }

    #[test]
    fn a_history_without_max_bytes_gets_the_relays_default() {
        let mut s = spec(include_str!("../../tests/fixtures/full.yaml"));
        for b in &mut s.bindings {
            if let Some(h) = &mut b.history {
                *h = serde_json::from_value(serde_json::json!({})).expect("history");
            }
        }
        let config = relay_config(&s, "ns", "gw");
        let h = config
            .bindings
            .iter()
            .find_map(|b| b.history.clone())
            .expect("a binding with history");
        assert_eq!(h.max_bytes, relay::DEFAULT_HISTORY_BYTES);
        config.validate().expect("valid");
    }

    #[test]
    fn the_drain_delay_is_at_most_half_the_grace_period() {
        let mut s = spec(include_str!("../../tests/fixtures/full.yaml"));
        s.drain.grace_period_seconds = 30;
        s.drain.delay_before_close_seconds = 5;
        assert_eq!(
            relay_config(&s, "ns", "gw")
                .drain
                .delay_before_close_seconds,
            5
        );
        s.drain.delay_before_close_seconds = 100;
        let c = relay_config(&s, "ns", "gw");
        assert_eq!(c.drain.delay_before_close_seconds, 15);
        c.validate().expect("valid");
        s.drain.grace_period_seconds = 1;
        let c = relay_config(&s, "ns", "gw");
        assert_eq!(c.drain.delay_before_close_seconds, 0);
        c.validate().expect("valid");
    }

    fn authorize_fixture() -> WebsocketGatewaySpec {
        spec(include_str!("../../tests/fixtures/authorize.yaml"))
    }

    /// Each check of a binding's `authorize` and the connect step reach the relay config
    /// as written, the subscription token's own key as a mounted file, and the relay
    /// accepts the result.
    #[test]
    fn authorize_sections_reach_the_relay_config_and_the_relay_accepts_it() {
        let config = relay_config(&authorize_fixture(), "apps", "shop");
        config.validate().expect("the relay accepts the config");
        let authorize = |channel: &str| {
            config
                .bindings
                .iter()
                .find(|b| b.channel == channel)
                .and_then(|b| b.authorize.clone())
                .unwrap_or_else(|| panic!("{channel} has no authorize"))
        };
        assert_eq!(
            authorize("rooms.{room}"),
            relay::Authorize {
                token: None,
                rule: Some("vars.room in claims.rooms || 'admin' in claims.roles".into()),
                request: None,
            }
        );
        assert_eq!(
            authorize("orders.{id}").request,
            Some(relay::BackendRequest {
                subject: "authz.orders".into(),
                timeout_ms: 300,
                cache_seconds: 30,
                cache_entries: 10_000,
                on_timeout: relay::OnTimeout::Deny,
            })
        );
        let own = authorize("private.{id}")
            .token
            .expect("token")
            .jwt
            .expect("its own key set");
        assert_eq!(
            own.key.public_key_file,
            Some(PathBuf::from(
                "/etc/wsrelay/secrets/channel-keys/public.pem"
            ))
        );
        assert_eq!(own.key.hmac_secret_file, None);
        assert_eq!(own.algorithms, vec![relay::JwtAlgorithm::ES256]);
        assert_eq!(own.issuer.as_deref(), Some("https://channels.example.com"));
        let all = authorize("vault.{id}");
        assert_eq!(
            all.token,
            Some(relay::SubscriptionToken { jwt: None }),
            "{{}}: auth.jwt's keys"
        );
        assert!(all.rule.is_some());
        assert_eq!(
            all.request,
            Some(relay::BackendRequest {
                subject: "authz.vault".into(),
                timeout_ms: 1000,
                cache_seconds: 0,
                cache_entries: 500,
                on_timeout: relay::OnTimeout::Allow,
            })
        );
        assert_eq!(
            config.auth.connect_request,
            Some(relay::BackendRequest {
                subject: "authz.connect".into(),
                timeout_ms: 500,
                cache_seconds: 60,
                cache_entries: 10_000,
                on_timeout: relay::OnTimeout::Deny,
            })
        );
        let unchecked = config
            .bindings
            .iter()
            .filter(|b| b.authorize.is_none())
            .count();
        assert_eq!(unchecked, 0);
        // A gateway without the sections renders none.
        let plain = relay_config(&minimal(), "ns", "gw");
        assert!(plain.bindings.iter().all(|b| b.authorize.is_none()));
        assert_eq!(plain.auth.connect_request, None);
        // The rendered file reads back as the same config (the relay's own loader).
        let back: relay::Config =
            serde_json::from_str(&render_config(&config).expect("renders")).expect("reads back");
        assert_eq!(back, config);
    }

    /// The CRD's defaults for a backend request are the relay's own: a request that names
    /// only its subject means the same to both.
    #[test]
    fn a_backend_requests_crd_defaults_are_the_relays() {
        let crd: crate::api::BackendRequestSpec =
            serde_json::from_value(serde_json::json!({"subject": "authz.x"})).expect("crd");
        let relay: relay::BackendRequest =
            serde_json::from_value(serde_json::json!({"subject": "authz.x"})).expect("relay");
        assert_eq!(relay_request(&crd), relay);
    }

    /// The ends of the ranges the CRD admits for a backend request pass the relay's
    /// validation.
    #[test]
    fn the_request_extremes_the_crd_admits_pass_the_relays_validation() {
        let mut s = authorize_fixture();
        for (timeout, cache, entries) in [(1, 0, 1), (5000, 86_400, 1_000_000)] {
            for b in &mut s.bindings {
                if let Some(r) = b.authorize.as_mut().and_then(|a| a.request.as_mut()) {
                    (r.timeout_ms, r.cache_seconds, r.cache_entries) = (timeout, cache, entries);
                }
            }
            let config = relay_config(&s, "ns", "gw");
            config
                .validate()
                .unwrap_or_else(|e| panic!("{timeout} {cache} {entries}: {e}"));
        }
    }

    fn presence_fixture() -> WebsocketGatewaySpec {
        spec(include_str!("../../tests/fixtures/presence.yaml"))
    }

    /// Each binding's presence reaches the relay config as written (the CRD's defaults where
    /// it says `{}`), with the registry in the bucket the operator names, and the relay
    /// accepts the result.
    #[test]
    fn presence_and_the_registry_reach_the_relay_config_and_the_relay_accepts_it() {
        let config = relay_config(&presence_fixture(), "games", "lobby");
        config.validate().expect("the relay accepts the config");
        let presence = |channel: &str| {
            config
                .bindings
                .iter()
                .find(|b| b.channel == channel)
                .and_then(|b| b.presence.clone())
        };
        assert_eq!(
            presence("rooms.{room}"),
            Some(relay::Presence {
                key: "{claims.org}.{claims.sub}".into(),
                info: vec!["claims.name".into(), "claims.profile.avatar".into()],
                events: true,
                max_members_with_events: 50,
                leave_grace_seconds: 20,
            })
        );
        assert_eq!(presence("lobby"), Some(relay::Presence::default()));
        assert_eq!(presence("scores.{game}"), None);
        assert_eq!(
            config.registry,
            Some(relay::Registry {
                bucket: registry_bucket("games", "lobby"),
                lease_seconds: 9,
                replicas: 3,
                max_bytes: 128 << 20,
                relay_name: None,
            })
        );
        // The rendered file reads back as the same config (the relay's own loader).
        let back: relay::Config =
            serde_json::from_str(&render_config(&config).expect("renders")).expect("reads back");
        assert_eq!(back, config);
    }

    /// A presence section or registry that names nothing means the same to the CRD and to
    /// the relay: the defaults are the relay's own.
    #[test]
    fn the_crd_defaults_of_presence_and_the_registry_are_the_relays() {
        let crd: crate::api::PresenceSpec =
            serde_json::from_value(serde_json::json!({})).expect("crd");
        let relay: relay::Presence = serde_json::from_value(serde_json::json!({})).expect("relay");
        assert_eq!(relay_presence(&crd), relay);
        let mut s = presence_fixture();
        s.registry = None;
        let mapped = relay_config(&s, "games", "lobby")
            .registry
            .expect("registry");
        let relay: relay::Registry =
            serde_json::from_value(serde_json::json!({ "bucket": mapped.bucket })).expect("relay");
        assert_eq!(mapped, relay);
    }

    /// No presence and no `spec.registry`: no registry (no bucket, no lease). `spec.registry`
    /// alone keeps one (the connection entries backends may read).
    #[test]
    fn the_registry_is_rendered_only_when_presence_or_the_spec_asks_for_it() {
        assert_eq!(relay_config(&minimal(), "ns", "gw").registry, None);
        let mut s = minimal();
        s.registry = Some(crate::api::RegistrySpec::default());
        let config = relay_config(&s, "ns", "gw");
        config.validate().expect("valid");
        assert_eq!(
            config.registry.map(|r| r.bucket),
            Some(registry_bucket("ns", "gw"))
        );
    }

    #[test]
    fn registry_buckets_are_named_after_the_gateway_uniquely_within_61_characters() {
        let a = registry_bucket("games", "lobby");
        assert!(a.starts_with("wsrelay_games_lobby_reg_"), "{a}");
        assert_eq!(a, registry_bucket("games", "lobby"), "stable");
        assert_ne!(a, registry_bucket("games", "lobby2"));
        assert_ne!(a, registry_bucket("games2", "lobby"));
        // '.' is no bucket character: mapped, and the hash keeps the two apart.
        let dotted = registry_bucket("games", "lobby.eu");
        assert_ne!(dotted, registry_bucket("games", "lobby-eu"));
        let long = registry_bucket(&"n".repeat(63), &"g".repeat(253));
        assert_ne!(long, registry_bucket(&"n".repeat(63), &"h".repeat(253)));
        for name in [a, dotted, long] {
            assert!(name.len() <= 61, "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                "{name}"
            );
            // Never one of the history streams' names (those are `wsrelay_...` streams; the
            // bucket's stream is `KV_<bucket>`).
            assert!(!format!("KV_{name}").starts_with("wsrelay_"));
        }
        // The relay accepts the longest.
        let mut s = presence_fixture();
        s.registry = None;
        let mut config = relay_config(&s, "ns", "gw");
        config.registry.as_mut().expect("registry").bucket =
            registry_bucket(&"n".repeat(63), &"g".repeat(253));
        config.validate().expect("valid");
    }

    /// The ends of the ranges the CRD admits for presence and the registry pass the relay's
    /// validation.
    #[test]
    fn the_presence_extremes_the_crd_admits_pass_the_relays_validation() {
        let mut s = presence_fixture();
        for (lease, replicas, bytes, members, grace, infos) in [
            (3, 1, 1_048_576_i64, 1, 0, 0),
            (3600, 5, 1_099_511_627_776, 10_000, 300, 8),
        ] {
            s.registry = Some(crate::api::RegistrySpec {
                lease_seconds: lease,
                replicas,
                max_bytes: bytes,
            });
            for b in &mut s.bindings {
                if let Some(p) = &mut b.presence {
                    p.max_members_with_events = members;
                    p.leave_grace_seconds = grace;
                    p.info = (0..infos).map(|i| format!("claims.c{i}")).collect();
                }
            }
            relay_config(&s, "ns", "gw")
                .validate()
                .unwrap_or_else(|e| panic!("{lease} {replicas} {bytes} {members} {grace}: {e}"));
        }
    }

    fn events_fixture() -> WebsocketGatewaySpec {
        spec(include_str!("../../tests/fixtures/events.yaml"))
    }

    /// `events` and `control` reach the relay config as written, their subjects under the
    /// gateway's namespace and name, the stream the operator names, the registry turned on
    /// with its defaults; the relay accepts the result and reads the rendered file back.
    #[test]
    fn events_and_control_reach_the_relay_config_and_the_relay_accepts_it() {
        let config = relay_config(&events_fixture(), "apps", "chat");
        config.validate().expect("the relay accepts the config");
        assert_eq!(
            config.events,
            Some(relay::Events {
                subject: "backend.events.apps.chat".into(),
                types: vec![relay::EventType::Connected, relay::EventType::Disconnected],
                durable: Some(relay::DurableEvents {
                    stream: events_stream("apps", "chat"),
                    max_age_seconds: 3600,
                    replicas: 3,
                    max_bytes: 64 << 20,
                    duplicate_window_seconds: 120,
                }),
                grace_seconds: 0,
            })
        );
        assert_eq!(
            config.control,
            Some(relay::Control {
                subject: "wsrelay.control.apps.chat".into()
            })
        );
        let registry: relay::Registry = serde_json::from_value(
            serde_json::json!({ "bucket": registry_bucket("apps", "chat") }),
        )
        .expect("relay defaults");
        assert_eq!(config.registry, Some(registry), "the registry, defaulted");
        let back: relay::Config =
            serde_json::from_str(&render_config(&config).expect("renders")).expect("reads back");
        assert_eq!(back, config);
        // A gateway without them renders neither.
        let plain = relay_config(&minimal(), "ns", "gw");
        assert_eq!((plain.events, plain.control), (None, None));
    }

    /// Either section alone turns the registry on (the relay refuses them without one), and
    /// the relay accepts the result.
    #[test]
    fn events_or_control_alone_turn_the_registry_on() {
        let mut with_events = minimal();
        with_events.events = Some(serde_json::from_value(serde_json::json!({})).expect("events"));
        let mut with_control = minimal();
        with_control.control =
            Some(serde_json::from_value(serde_json::json!({})).expect("control"));
        for s in [with_events, with_control] {
            let config = relay_config(&s, "markets", "ticker");
            config.validate().expect("the relay accepts the config");
            assert_eq!(
                config.registry.map(|r| r.bucket),
                Some(registry_bucket("markets", "ticker"))
            );
            assert_eq!(
                relay_registry(&s, "markets", "ticker").map(|r| r.bucket),
                Some(registry_bucket("markets", "ticker")),
                "what the status and the forget path read"
            );
        }
    }

    /// Sections that name nothing mean the same to the CRD and to the relay: the defaults
    /// (every type; a day, one replica, 256 MiB, 300 s) are the relay's own.
    #[test]
    fn the_crd_defaults_of_events_are_the_relays() {
        let mut s = minimal();
        s.events =
            Some(serde_json::from_value(serde_json::json!({ "durable": {} })).expect("events"));
        let mapped = relay_events(&s, "ns", "gw").expect("events");
        let relay: relay::Events = serde_json::from_value(serde_json::json!({
            "subject": "wsrelay.events.ns.gw",
            "durable": { "stream": events_stream("ns", "gw") },
        }))
        .expect("relay");
        assert_eq!(mapped, relay);
        s.control = Some(serde_json::from_value(serde_json::json!({})).expect("control"));
        assert_eq!(
            relay_control(&s, "ns", "gw").map(|c| c.subject).as_deref(),
            Some("wsrelay.control.ns.gw")
        );
    }

    #[test]
    fn gateway_subjects_carry_the_namespace_and_the_name_with_dots_as_underscores() {
        assert_eq!(
            gateway_subject("wsrelay.events", "apps", "chat"),
            "wsrelay.events.apps.chat"
        );
        // A name from an older CRD may hold '.', which would make it two tokens.
        assert_eq!(
            gateway_subject("wsrelay.control", "apps", "chat.v2"),
            "wsrelay.control.apps.chat_v2"
        );
        // The longest prefix the CRD admits, with the longest namespace and name, is a
        // subject the relay takes.
        let mut s = minimal();
        let prefix = format!(
            "p{}",
            ".p".repeat((crate::api::MAX_PREFIX_SUBJECT_LEN - 1) / 2)
        );
        assert_eq!(prefix.len(), crate::api::MAX_PREFIX_SUBJECT_LEN - 1);
        let prefix = format!("{prefix}x");
        s.events =
            Some(serde_json::from_value(serde_json::json!({ "subject": prefix })).expect("events"));
        s.control = Some(
            serde_json::from_value(serde_json::json!({ "subject": format!("{}c", &prefix[..71]) }))
                .expect("control"),
        );
        let (ns, name) = ("n".repeat(63), "g".repeat(63));
        let config = relay_config(&s, &ns, &name);
        assert_eq!(config.events.as_ref().expect("events").subject.len(), 200);
        config
            .validate()
            .expect("the relay accepts the longest subjects");
    }

    #[test]
    fn events_streams_are_named_after_the_gateway_uniquely_within_64_characters() {
        let a = events_stream("apps", "chat");
        assert!(a.starts_with("wsrelay_apps_chat_ev_"), "{a}");
        assert_eq!(a, events_stream("apps", "chat"), "stable");
        assert_ne!(a, events_stream("apps", "chat2"));
        assert_ne!(a, events_stream("apps2", "chat"));
        let dotted = events_stream("apps", "chat.eu");
        assert_ne!(dotted, events_stream("apps", "chat-eu"));
        let long = events_stream(&"n".repeat(63), &"g".repeat(253));
        assert_ne!(long, events_stream(&"n".repeat(63), &"h".repeat(253)));
        for (ns, name) in [("apps", "chat"), ("apps", "chat.eu")] {
            // Neither the gateway's history streams nor its registry bucket's stream.
            assert_ne!(
                events_stream(ns, name),
                history_stream(ns, name, "chat.rooms.*")
            );
            assert_ne!(
                events_stream(ns, name),
                format!("KV_{}", registry_bucket(ns, name))
            );
        }
        for name in [a, dotted, long] {
            assert!(name.len() <= 64, "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                "{name}"
            );
        }
        // The relay accepts the longest, beside the history and registry of the fixture.
        let mut config = relay_config(&events_fixture(), "ns", "gw");
        let durable = config
            .events
            .as_mut()
            .and_then(|e| e.durable.as_mut())
            .expect("durable");
        durable.stream = events_stream(&"n".repeat(63), &"g".repeat(253));
        config.validate().expect("valid");
    }

    /// The ends of the ranges the CRD admits for a durable stream pass the relay's
    /// validation (with the registry lease the duplicate window must be twice of).
    #[test]
    fn the_events_extremes_the_crd_admits_pass_the_relays_validation() {
        let mut s = events_fixture();
        for (lease, age, replicas, bytes, window) in [
            (3, 60, 1, 1_048_576_i64, 6),
            (3600, 31_536_000, 5, 1_099_511_627_776, 31_536_000),
        ] {
            s.registry = Some(crate::api::RegistrySpec {
                lease_seconds: lease,
                ..Default::default()
            });
            let d = s
                .events
                .as_mut()
                .and_then(|e| e.durable.as_mut())
                .expect("durable");
            (
                d.max_age_seconds,
                d.replicas,
                d.max_bytes,
                d.duplicate_window_seconds,
            ) = (age, replicas, bytes, window);
            relay_config(&s, "ns", "gw")
                .validate()
                .unwrap_or_else(|e| panic!("{lease} {age} {replicas} {bytes} {window}: {e}"));
        }
    }
}
