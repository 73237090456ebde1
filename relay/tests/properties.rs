//! Property-based tests (proptest) of the three parsers a client or an operator feeds: the
//! frame parser (`protocol::parse_request`), the subject renderer (`authz` over
//! `template`) and the config loader (`Config::from_yaml_str`, `Config::validate`).
//!
//! Each property runs `PROPTEST_CASES` generated cases (proptest's default, 256, inside
//! `cargo test`); `make proptest-long` runs over a million in all and prints, per property,
//! the cases run and the time taken.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use proptest::prelude::*;
use proptest::test_runner::{Config as RunConfig, TestCaseError, TestRunner};
use serde_json::{Map, Value, json};
use wsrelay::authz::{Authorizer, MAX_SUBJECT_LEN, Operation, is_reserved_subject};
use wsrelay::config::{Config, Direction, SlowConsumerPolicy, TokenSource};
use wsrelay::protocol::{Request, parse_request};

/// Runs `test` over `strategy` for `PROPTEST_CASES` cases (default 256) and prints the
/// count and the time.
fn check<S: Strategy>(
    name: &str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let config = RunConfig {
        failure_persistence: None,
        max_global_rejects: u32::MAX,
        ..RunConfig::default()
    };
    let cases = config.cases;
    let mut runner = TestRunner::new(config);
    let t0 = Instant::now();
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{name}: {e}");
    }
    eprintln!(
        "property {name}: {cases} cases in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------
// Frame parser
// ---------------------------------------------------------------------------------------

/// Strings that stress a JSON parser and the checks after it.
fn nasty_string() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,80}",
        "[a-z0-9._*> ]{0,20}",
        Just(String::new()),
        Just("x".repeat(65)),
        Just("\u{0}\u{7f}\u{feff}".to_owned()),
        "[\\PC]{60,70}",
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        nasty_string().prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A frame shaped like a request: a `type` (mostly a known one) and a random subset of the
/// known fields (with values of any JSON type), sometimes an unknown field.
fn frame_like() -> impl Strategy<Value = Map<String, Value>> {
    let kind = prop_oneof![
        4 => prop::sample::select(vec!["subscribe", "unsubscribe", "publish", "ping"])
            .prop_map(|k| json!(k)),
        1 => json_leaf(),
    ];
    let field = |name: &'static str, v: BoxedStrategy<Value>| {
        prop::option::weighted(0.5, v).prop_map(move |v| v.map(|v| (name.to_owned(), v)))
    };
    let id = prop_oneof![
        any::<u64>().prop_map(|n| json!(n)),
        "[a-z0-9]{0,70}".prop_map(Value::String),
        json_leaf(),
    ]
    .boxed();
    let channel = prop_oneof![
        "[a-z]{1,8}(\\.[a-z0-9{}*>]{1,8}){0,3}".prop_map(Value::String),
        json_leaf(),
    ]
    .boxed();
    let since = prop_oneof![
        ("[0-9a-f]{0,70}", any::<u64>()).prop_map(|(e, s)| json!({"epoch": e, "seq": s})),
        json_value(),
    ]
    .boxed();
    (
        kind,
        field("id", id),
        field("channel", channel),
        field("payload", json_value().boxed()),
        field("text", json_leaf().boxed()),
        field("since", since),
        field("msgId", json_leaf().boxed()),
        field("bogus", json_leaf().boxed()),
    )
        .prop_map(|(kind, id, ch, payload, text, since, msg_id, bogus)| {
            let mut m = Map::new();
            m.insert("type".into(), kind);
            for (k, v) in [id, ch, payload, text, since, msg_id, bogus]
                .into_iter()
                .flatten()
            {
                m.insert(k, v);
            }
            m
        })
}

/// The `id` a frame's text carries, when it is a string (request types may be added: this
/// reads the text, not the parsed request).
fn string_id(text: &str) -> Option<String> {
    serde_json::from_str::<Value>(text)
        .ok()?
        .get("id")?
        .as_str()
        .map(str::to_owned)
}

#[test]
fn frame_parser_never_panics_on_any_text() {
    check(
        "frame parser, any text",
        prop_oneof![
            ".{0,200}",
            // Near-JSON: braces, quotes, escapes and keywords in random order.
            "[{}\\[\\]\":,a-z0-9\\\\ .-]{0,120}",
        ],
        |text| {
            if parse_request(&text).is_ok()
                && let Some(id) = string_id(&text)
            {
                prop_assert!(id.len() <= 64);
            }
            Ok(())
        },
    );
}

#[test]
fn frame_parser_follows_the_protocol_on_request_shaped_frames() {
    check("frame parser, request-shaped", frame_like(), |m| {
        let text = Value::Object(m.clone()).to_string();
        // A field set to null is a field left out (serde's `Option`).
        let has = |k: &str| m.get(k).is_some_and(|v| !v.is_null());
        let r = parse_request(&text);
        let kind = m["type"].as_str().unwrap_or("");
        let known = ["subscribe", "unsubscribe", "publish", "ping"].contains(&kind);
        // Refusals that follow from the frame alone.
        if m.contains_key("bogus") || !known {
            prop_assert!(r.is_err(), "{text} -> {r:?}");
            return Ok(());
        }
        let Ok(req) = r else {
            return Ok(());
        };
        // Whatever is accepted carries the frame's own values.
        if let Some(id) = string_id(&text) {
            prop_assert!(id.len() <= 64);
        }
        if let Request::Subscribe { channel, .. } | Request::Unsubscribe { channel, .. } = &req {
            prop_assert!(kind == "subscribe" || kind == "unsubscribe");
            prop_assert_eq!(m.get("channel"), Some(&json!(channel)));
            prop_assert!(!has("payload") && !has("text"));
        } else if let Request::Publish {
            channel, payload, ..
        } = &req
        {
            prop_assert_eq!(kind, "publish");
            prop_assert_eq!(m.get("channel"), Some(&json!(channel)));
            prop_assert!(!has("since"));
            let text_field = m.get("text").filter(|v| !v.is_null());
            match (m.get("payload").filter(|v| !v.is_null()), text_field) {
                (Some(p), None) => {
                    // The exact JSON text the client sent.
                    let sent = p.to_string();
                    prop_assert_eq!(payload, sent.as_bytes());
                }
                (None, Some(Value::String(t))) => prop_assert_eq!(payload, t.as_bytes()),
                other => prop_assert!(false, "accepted publish with {other:?}"),
            }
        } else if let Request::Ping { .. } = &req {
            prop_assert_eq!(kind, "ping");
            prop_assert!(!has("since") && !has("msgId"));
        } else {
            prop_assert!(false, "{kind} frame parsed as {req:?}");
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------
// Subject rendering
// ---------------------------------------------------------------------------------------

/// A value a client or an issuer might put where a token goes.
fn token_value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9_-]{1,12}",
        1 => Just(String::new()),
        1 => prop::sample::select(vec![
            "*", ">", ".", "a.b", "a*", "a>", " ", "\t", "\n", "\u{0}", "\u{85}", "\u{a0}",
            "\u{2028}", "$SYS", "$JS", "_INBOX", "$", "{id}", "{claims.sub}", "é", "日本",
        ])
        .prop_map(str::to_owned),
        1 => "\\PC{0,8}",
        1 => "[a-z]{100,300}",
    ]
}

fn claim_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => token_value().prop_map(Value::String),
        1 => any::<i64>().prop_map(|n| json!(n)),
        1 => any::<u64>().prop_map(|n| json!(n)),
        1 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => prop::collection::vec(token_value().prop_map(Value::String), 0..3).prop_map(Value::Array),
        1 => token_value().prop_map(|v| json!({"id": v})),
    ]
}

fn claims() -> impl Strategy<Value = Option<Map<String, Value>>> {
    prop::option::weighted(
        0.85,
        (claim_value(), claim_value(), claim_value()).prop_map(|(sub, org, tenant)| {
            let mut m = Map::new();
            m.insert("sub".into(), sub);
            m.insert("org".into(), json!({"id": org}));
            m.insert("tenant".into(), tenant);
            m
        }),
    )
}

/// A subject template token, as a config might write it (some invalid).
fn subject_token() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9_-]{1,8}",
        2 => prop::sample::select(vec!["{id}", "{x}", "{claims.sub}", "{claims.org.id}", "{claims.tenant}", "{claims.missing}"])
            .prop_map(str::to_owned),
        1 => prop::sample::select(vec!["$JS", "$SYS", "_INBOX", "$KV", "*", ">", "a b", "\u{1}", "{}", "{claims.}", "é"])
            .prop_map(str::to_owned),
    ]
}

fn channel_token() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9_-]{1,8}",
        2 => prop::sample::select(vec!["{id}", "{x}"]).prop_map(str::to_owned),
        1 => prop::sample::select(vec!["*", ">", "{claims.sub}", "a b", "{}"]).prop_map(str::to_owned),
    ]
}

fn binding_strategy() -> impl Strategy<Value = (String, String, Direction)> {
    (
        prop::collection::vec(channel_token(), 1..4).prop_map(|t| t.join(".")),
        prop::collection::vec(subject_token(), 1..5).prop_map(|t| t.join(".")),
        prop::sample::select(vec![
            Direction::Subscribe,
            Direction::Publish,
            Direction::Both,
        ]),
    )
}

/// A channel: from the bindings' patterns with the placeholders filled by hostile values,
/// or arbitrary.
fn channel_for(patterns: Vec<String>) -> impl Strategy<Value = String> {
    let n = patterns.len();
    prop_oneof![
        3 => (0..n, prop::collection::vec(token_value(), 4)).prop_map(move |(i, vals)| {
            let mut vals = vals.into_iter();
            patterns[i]
                .split('.')
                .map(|t| if t.starts_with('{') { vals.next().unwrap_or_default() } else { t.to_owned() })
                .collect::<Vec<_>>()
                .join(".")
        }),
        1 => "\\PC{0,40}",
    ]
}

fn subject_is_safe(subject: &str) -> Result<(), TestCaseError> {
    prop_assert!(!subject.is_empty());
    prop_assert!(subject.len() <= MAX_SUBJECT_LEN, "{} bytes", subject.len());
    prop_assert!(!is_reserved_subject(subject), "{subject:?}");
    for tok in subject.split('.') {
        prop_assert!(!tok.is_empty(), "empty token in {subject:?}");
        prop_assert!(!tok.contains(['*', '>']), "wildcard in {subject:?}");
        prop_assert!(
            !tok.chars().any(|c| c.is_whitespace() || c.is_control()),
            "whitespace or control character in {subject:?}"
        );
    }
    Ok(())
}

fn token_count(template: &str) -> usize {
    wsrelay::config::parse_subject_template(template)
        .map(|t| t.len())
        .unwrap_or(usize::MAX)
}

#[test]
fn rendered_subjects_never_widen_or_leave_their_namespace() {
    let case = prop::collection::vec(binding_strategy(), 1..4).prop_flat_map(|bindings| {
        let patterns: Vec<String> = bindings.iter().map(|b| b.0.clone()).collect();
        (
            Just(bindings),
            channel_for(patterns),
            claims(),
            prop::sample::select(vec![Operation::Subscribe, Operation::Publish]),
        )
    });
    let rendered = AtomicU64::new(0);
    check(
        "subject renderer, any binding/channel/claims",
        case,
        |(bindings, channel, claims, op)| {
            // Bindings straight to the authorizer, validated or not: the checks at render
            // time must hold on their own.
            let bs: Vec<_> = bindings
                .iter()
                .map(|(c, s, d)| wsrelay_testkit::relay::binding(c, s, *d))
                .collect();
            let authz = Authorizer::new(&bs);
            if let Ok(subject) = authz.resolve(&channel, op, claims.as_ref()) {
                rendered.fetch_add(1, Ordering::Relaxed);
                subject_is_safe(&subject)?;
                // One token per template token: no value added a level.
                let n = subject.split('.').count();
                prop_assert!(
                    bindings.iter().any(|(_, s, _)| token_count(s) == n),
                    "{subject:?} from {bindings:?}"
                );
            }
            Ok(())
        },
    );
    eprintln!(
        "  of which rendered a subject: {}",
        rendered.load(Ordering::Relaxed)
    );
}

#[test]
fn safe_values_render_exactly() {
    let case = (
        "[a-z][a-z0-9]{0,8}",
        "[a-zA-Z0-9_-]{1,16}",
        "[a-zA-Z0-9_-]{1,16}",
        any::<i64>(),
    );
    check(
        "subject renderer, safe values render exactly",
        case,
        |(lit, id, sub, org)| {
            let bs = vec![wsrelay_testkit::relay::binding(
                &format!("{lit}.{{id}}"),
                &format!("{lit}.{{claims.sub}}.{{id}}.{{claims.org.id}}"),
                Direction::Both,
            )];
            let authz = Authorizer::new(&bs);
            let claims = json!({"sub": sub, "org": {"id": org}});
            let subject = authz
                .resolve(
                    &format!("{lit}.{id}"),
                    Operation::Subscribe,
                    claims.as_object(),
                )
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(subject, format!("{lit}.{sub}.{id}.{org}"));
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------
// Config loader
// ---------------------------------------------------------------------------------------

#[test]
fn config_loader_never_panics_on_any_text() {
    check(
        "config loader, any text",
        prop_oneof![
            ".{0,200}",
            // YAML-ish: keys, colons, dashes, flow collections, anchors, tags, indentation.
            "([a-zA-Z]{1,12}|[:\\-\\[\\]{},&*!|>'\"#%@` \n]|  ){0,60}",
        ],
        |text| {
            if let Ok(c) = Config::from_yaml_str(&text) {
                let _ = c.validate();
            }
            Ok(())
        },
    );
}

const KEYS: &[&str] = &[
    "listen",
    "client",
    "admin",
    "path",
    "trustedProxies",
    "clientIpHeader",
    "nats",
    "urls",
    "name",
    "credentials",
    "tokenFile",
    "auth",
    "jwt",
    "algorithms",
    "key",
    "hmacSecretFile",
    "jwksUrl",
    "jwksAllowHttp",
    "issuer",
    "audiences",
    "leewaySeconds",
    "tokenSources",
    "type",
    "allowedOrigins",
    "allowAnonymous",
    "bindings",
    "channel",
    "subject",
    "direction",
    "limits",
    "maxConnections",
    "maxMessageBytes",
    "sendQueueLen",
    "sendQueueBytes",
    "maxQueuedBytes",
    "slowConsumerPolicy",
    "maxConnectionsPerIp",
    "maxConnectionsPerSubject",
    "maxHandshakesInFlight",
    "publishRatePerSecond",
    "publishBurst",
    "idleTimeoutSeconds",
    "pingIntervalSeconds",
    "drain",
    "gracePeriodSeconds",
    "delayBeforeCloseSeconds",
    "tls",
    "certFile",
    "keyFile",
    "bogus",
];

/// JSON trees whose keys are mostly the config's own, with values of any type.
fn config_like() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        json_leaf(),
        prop::sample::select(vec![
            "nats://127.0.0.1:4222",
            "RS256",
            "HS256",
            "both",
            "subscribe",
            "disconnect",
            "dropOldest",
            "10.0.0.0/8",
            "::1/128",
            "0.0.0.0:8080",
            "/ws",
            "query",
            "orders.{id}",
            "users.{claims.sub}",
        ])
        .prop_map(|s| json!(s)),
        (0u64..100_000).prop_map(|n| json!(n)),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

/// Places in a loadable config a mutation may hit (JSON pointers of objects' members).
const PATHS: &[&str] = &[
    "/listen",
    "/listen/client",
    "/listen/admin",
    "/listen/path",
    "/listen/trustedProxies",
    "/listen/clientIpHeader",
    "/nats",
    "/nats/urls",
    "/nats/name",
    "/auth",
    "/auth/allowAnonymous",
    "/auth/tokenSources",
    "/auth/allowedOrigins",
    "/auth/jwt",
    "/bindings",
    "/bindings/0",
    "/bindings/0/channel",
    "/bindings/0/subject",
    "/bindings/0/direction",
    "/limits",
    "/limits/maxConnections",
    "/limits/maxMessageBytes",
    "/limits/sendQueueLen",
    "/limits/sendQueueBytes",
    "/limits/maxQueuedBytes",
    "/limits/slowConsumerPolicy",
    "/limits/maxConnectionsPerIp",
    "/limits/maxHandshakesInFlight",
    "/limits/publishRatePerSecond",
    "/limits/idleTimeoutSeconds",
    "/limits/pingIntervalSeconds",
    "/drain",
    "/drain/gracePeriodSeconds",
    "/drain/delayBeforeCloseSeconds",
    "/bogus",
];

/// A loadable config (the example, anonymous) with one to four members replaced by values
/// of any shape, removed, or added.
fn mutated_config() -> impl Strategy<Value = Value> {
    let mut base = serde_json::to_value(Config::example("nats://127.0.0.1:4222")).unwrap();
    base["auth"] = json!({"allowAnonymous": true});
    base["listen"]["trustedProxies"] = json!(["10.0.0.0/8"]);
    let edit = (
        prop::sample::select(PATHS),
        prop::option::weighted(0.85, config_like()),
    );
    prop::collection::vec(edit, 1..5).prop_map(move |edits| {
        let mut doc = base.clone();
        for (path, value) in edits {
            let (parent, key) = path.rsplit_once('/').unwrap();
            let parent = if parent.is_empty() {
                Some(&mut doc)
            } else {
                doc.pointer_mut(parent)
            };
            match (parent, value) {
                (Some(Value::Object(m)), Some(v)) => {
                    m.insert(key.to_owned(), v);
                }
                (Some(Value::Object(m)), None) => {
                    m.remove(key);
                }
                (Some(Value::Array(a)), v) => {
                    if let (Ok(i), Some(v)) = (key.parse::<usize>(), v)
                        && i < a.len()
                    {
                        a[i] = v;
                    }
                }
                _ => {}
            }
        }
        doc
    })
}

#[test]
fn config_loader_and_validate_never_panic_on_config_shaped_documents() {
    let loaded = AtomicU64::new(0);
    check(
        "config loader, config-shaped documents",
        prop_oneof![1 => config_like(), 3 => mutated_config()],
        |doc| {
            let text = doc.to_string();
            if let Ok(c) = Config::from_yaml_str(&text) {
                loaded.fetch_add(1, Ordering::Relaxed);
                let _ = c.validate();
                // What loads, serializes and loads back the same.
                let back = Config::from_yaml_str(&serde_json::to_string(&c).unwrap());
                prop_assert_eq!(back.as_ref(), Ok(&c));
            }
            Ok(())
        },
    );
    eprintln!("  of which loaded: {}", loaded.load(Ordering::Relaxed));
}

/// Mostly `default`, else any value of `range`.
fn or<T: Clone + std::fmt::Debug + 'static>(
    default: T,
    range: impl Strategy<Value = T> + 'static,
) -> BoxedStrategy<T> {
    prop_oneof![3 => Just(default), 1 => range].boxed()
}

/// Configs built field by field (valid or not).
fn config_strategy() -> impl Strategy<Value = Config> {
    let d = wsrelay::config::Limits::default();
    let limits = (
        (
            or(d.max_connections, 0u32..200_000),
            or(d.max_message_bytes, 0u32..(9 << 20)),
            or(d.send_queue_len, 0u32..5_000),
            or(d.send_queue_bytes, 0u64..(1 << 32)),
        ),
        (
            or(d.max_queued_bytes, 0u64..(1 << 34)),
            any::<bool>(),
            0u32..10,
            0u32..10,
            or(d.max_handshakes_in_flight, 0u32..5_000),
        ),
        (
            or(d.publish_rate_per_second, 0u32..1_000),
            or(d.publish_burst, 0u32..100),
            or(d.idle_timeout_seconds, 0u64..600),
            or(d.ping_interval_seconds, 0u64..600),
            or(d.handshake_timeout_seconds, 0u64..120),
        ),
    );
    let auth = (
        any::<bool>(),
        prop::collection::vec(
            prop_oneof![
                "[a-z]{0,6}".prop_map(|name| TokenSource::Query { name }),
                Just(TokenSource::AuthorizationHeader {}),
                Just(TokenSource::Subprotocol {}),
                "[a-z;= ]{0,6}".prop_map(|name| TokenSource::Cookie { name }),
            ],
            0..4,
        ),
        prop::collection::vec(
            prop_oneof![
                Just("*".to_owned()),
                "https://[a-z]{1,8}\\.test",
                "[a-z:/. ]{0,16}"
            ],
            0..3,
        ),
    );
    let listen = (
        prop::collection::vec(
            (any::<[u8; 4]>(), 0u8..=32)
                .prop_map(|(ip, p)| ipnet::IpNet::V4(ipnet::Ipv4Net::new(ip.into(), p).unwrap())),
            0..3,
        ),
        prop_oneof![Just("X-Forwarded-For".to_owned()), "[A-Za-z -]{0,12}"],
        prop_oneof![Just("/ws".to_owned()), "[a-z/]{0,6}"],
    );
    (
        limits,
        auth,
        listen,
        prop_oneof![
            3 => Just(vec![("orders.{id}".to_owned(), "orders.{id}".to_owned(), Direction::Both)]),
            2 => prop::collection::vec(binding_strategy(), 0..3),
        ],
        (or(30u64, 0u64..60), or(0u64, 0u64..60)),
    )
        .prop_map(
            |(
                (
                    (max_conn, max_msg, qlen, qbytes),
                    (total, drop_oldest, per_ip, per_sub, hs),
                    (rate, burst, idle, ping, hto),
                ),
                (anon, sources, origins),
                (proxies, header, path),
                bindings,
                (grace, delay),
            )| {
                let mut c = Config::example("nats://127.0.0.1:4222");
                let l = &mut c.limits;
                l.max_connections = max_conn;
                l.max_message_bytes = max_msg;
                l.send_queue_len = qlen;
                l.send_queue_bytes = qbytes;
                l.max_queued_bytes = total;
                l.slow_consumer_policy = if drop_oldest {
                    SlowConsumerPolicy::DropOldest
                } else {
                    SlowConsumerPolicy::Disconnect
                };
                l.max_connections_per_ip = per_ip;
                l.max_connections_per_subject = per_sub;
                l.max_handshakes_in_flight = hs;
                l.publish_rate_per_second = rate;
                l.publish_burst = burst;
                l.idle_timeout_seconds = idle;
                l.ping_interval_seconds = ping;
                l.handshake_timeout_seconds = hto;
                c.auth.allow_anonymous = anon;
                c.auth.token_sources = sources;
                c.auth.allowed_origins = origins;
                c.listen.trusted_proxies = proxies;
                c.listen.client_ip_header = header;
                c.listen.path = path;
                c.bindings = bindings
                    .iter()
                    .map(|(ch, s, d)| wsrelay_testkit::relay::binding(ch, s, *d))
                    .collect();
                c.drain.grace_period_seconds = grace;
                c.drain.delay_before_close_seconds = delay;
                c
            },
        )
}

#[test]
fn configs_round_trip_and_validate_never_panics() {
    let valid = AtomicU64::new(0);
    check("config round trip and validate", config_strategy(), |c| {
        let verdict = c.validate();
        if verdict.is_ok() {
            valid.fetch_add(1, Ordering::Relaxed);
        }
        // Validation is a function of the config: the same answer twice.
        prop_assert_eq!(&verdict, &c.validate());
        if let Err(errs) = &verdict {
            prop_assert!(!errs.0.is_empty());
        }
        // JSON (what the operator renders) and back: the same config.
        let text = serde_json::to_string_pretty(&c).unwrap();
        let back = Config::from_yaml_str(&text).map_err(TestCaseError::fail)?;
        prop_assert_eq!(&back, &c);
        Ok(())
    });
    eprintln!("  of which valid: {}", valid.load(Ordering::Relaxed));
}
