//! Config format and validation tests.

use super::auth::default_token_sources;
use super::*;
use crate::template::*;
use std::path::PathBuf;

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
fn trusted_proxies_are_cidrs_or_single_addresses() {
    let parse = |proxies: &str| {
        serde_json::from_str::<Config>(&format!(
            r#"{{"nats":{{"urls":["nats://n:4222"]}},"listen":{{"trustedProxies":{proxies}}}}}"#
        ))
        .map(|c| c.listen.trusted_proxies)
    };
    let nets = parse(r#"["10.0.0.0/8","10.1.2.3","2001:db8::1"]"#).unwrap();
    let shown: Vec<String> = nets.iter().map(ToString::to_string).collect();
    assert_eq!(shown, ["10.0.0.0/8", "10.1.2.3/32", "2001:db8::1/128"]);
    let err = parse(r#"["ingress-nginx"]"#).unwrap_err().to_string();
    assert!(err.contains("neither a CIDR"), "{err}");
    assert!(parse(r#"["10.0.0.0/33"]"#).is_err());
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
    let err = serde_json::from_str::<Config>(r#"{"nats":{"urls":[]},"natsUrl":"x"}"#).unwrap_err();
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
        ("_WSRELAY.{topic}", false),
        ("_WSRELAY.confirm.x", false),
        ("_WSRELAYS.{topic}", true),
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

#[cfg(feature = "load")]
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

#[cfg(feature = "load")]
#[test]
fn the_example_file_is_valid() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../relay/config.example.yaml");
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

#[test]
fn history_is_bounded_in_bytes_by_default_and_by_the_message_limit() {
    let mut c = Config::example("nats://n:4222");
    c.bindings[0].history =
        Some(serde_json::from_str(r#"{"stream": "S", "maxAgeSeconds": 30}"#).unwrap());
    c.validate().unwrap();
    let h = c.bindings[0].history.clone().unwrap();
    assert_eq!(h.max_bytes, DEFAULT_HISTORY_BYTES);
    for (bytes, ok) in [
        (u64::from(c.limits.max_message_bytes), true),
        (u64::from(c.limits.max_message_bytes) - 1, false),
        (MAX_HISTORY_BYTES, true),
        (MAX_HISTORY_BYTES + 1, false),
    ] {
        c.bindings[0].history.as_mut().unwrap().max_bytes = bytes;
        let r = c.validate();
        assert_eq!(r.is_ok(), ok, "{bytes}: {r:?}");
        if let Err(errs) = r {
            assert_eq!(errs.0[0].field(), "bindings[0].history.maxBytes");
        }
    }
}

#[test]
fn the_registry_is_optional_and_defaults_its_lease_replicas_and_bytes() {
    let mut c = Config::example("nats://n:4222");
    assert_eq!(c.registry, None);
    c.registry = Some(serde_json::from_str(r#"{"bucket": "WSRELAY_GW_REG"}"#).unwrap());
    c.validate().unwrap();
    let r = c.registry.clone().unwrap();
    assert_eq!(
        (r.lease_seconds, r.replicas, r.max_bytes),
        (15, 1, DEFAULT_REGISTRY_BYTES)
    );
    let back: Config = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    assert!(
        serde_json::from_str::<Registry>(r#"{"bucket": "B", "lease": 3}"#).is_err(),
        "unknown fields are refused"
    );
}

#[test]
fn each_registry_field_is_validated_by_name() {
    let base = || {
        let mut c = Config::example("nats://n:4222");
        c.registry = Some(serde_json::from_str(r#"{"bucket": "REG"}"#).unwrap());
        c
    };
    type Break = fn(&mut Registry);
    let cases: [(&str, Break); 8] = [
        ("registry.bucket", |r| r.bucket = String::new()),
        ("registry.bucket", |r| r.bucket = "a.b".into()),
        ("registry.bucket", |r| r.bucket = "x".repeat(62)),
        ("registry.leaseSeconds", |r| r.lease_seconds = 2),
        ("registry.leaseSeconds", |r| r.lease_seconds = 3601),
        ("registry.replicas", |r| r.replicas = 2),
        ("registry.maxBytes", |r| {
            r.max_bytes = MIN_REGISTRY_BYTES - 1
        }),
        ("registry.maxBytes", |r| {
            r.max_bytes = MAX_REGISTRY_BYTES + 1
        }),
    ];
    for (field, break_it) in cases {
        let mut c = base();
        break_it(c.registry.as_mut().unwrap());
        let errs = c.validate().unwrap_err();
        assert_eq!(errs.0.len(), 1, "{field}: {errs}");
        assert_eq!(errs.0[0].field(), field, "{errs}");
    }
    for ok in [3, 3600] {
        let mut c = base();
        c.registry.as_mut().unwrap().lease_seconds = ok;
        c.validate().unwrap();
    }
    let mut c = base();
    c.registry.as_mut().unwrap().relay_name = Some("a.b".into());
    assert_eq!(c.validate().unwrap_err().0[0].field(), "registry.relayName");
    // The bucket's stream may not be a history stream.
    let mut c = base();
    c.bindings[0].history = Some(serde_json::from_str(r#"{"stream": "KV_REG"}"#).unwrap());
    let errs = c.validate().unwrap_err();
    assert_eq!(errs.0[0].field(), "registry.bucket", "{errs}");
}

#[test]
fn presence_needs_the_registry_and_each_field_is_validated_by_name() {
    let base = || {
        let mut c = Config::example("nats://n:4222");
        c.bindings[0].channel = "rooms.{room}".into();
        c.bindings[0].subject = "chat.{room}".into();
        c.bindings[0].presence = Some(Presence::default());
        c.registry = Some(serde_json::from_str(r#"{"bucket": "REG"}"#).unwrap());
        c
    };
    let p: Presence = serde_json::from_str("{}").unwrap();
    assert_eq!(p, Presence::default());
    assert_eq!(
        (
            p.key.as_str(),
            p.events,
            p.max_members_with_events,
            p.leave_grace_seconds
        ),
        ("{claims.sub}", true, 200, 10)
    );
    let mut c = base();
    c.bindings[0].presence.as_mut().unwrap().key = "{room}".into();
    c.validate().unwrap();

    let mut c = base();
    c.registry = None;
    let errs = c.validate().unwrap_err();
    assert!(
        errs.0.iter().any(|e| e.field() == "bindings[0].presence"),
        "{errs}"
    );
    type Break = fn(&mut Presence);
    let cases: [(&str, Break); 6] = [
        ("bindings[0].presence.key", |p| p.key = "{nope}".into()),
        ("bindings[0].presence.key", |p| p.key = "a..b".into()),
        ("bindings[0].presence.info[0]", |p| {
            p.info = vec!["name".into()]
        }),
        ("bindings[0].presence.info", |p| {
            p.info = (0..9).map(|i| format!("claims.c{i}")).collect()
        }),
        ("bindings[0].presence.maxMembersWithEvents", |p| {
            p.max_members_with_events = 0
        }),
        ("bindings[0].presence.leaveGraceSeconds", |p| {
            p.leave_grace_seconds = 301
        }),
    ];
    for (field, break_it) in cases {
        let mut c = base();
        c.bindings[0].presence.as_mut().unwrap().key = "{room}".into();
        break_it(c.bindings[0].presence.as_mut().unwrap());
        let errs = c.validate().unwrap_err();
        assert!(errs.0.iter().any(|e| e.field() == field), "{field}: {errs}");
    }
    // A publish-only binding has no subscribers, so no members.
    let mut c = base();
    c.bindings[0].presence.as_mut().unwrap().key = "{room}".into();
    c.bindings[0].direction = Direction::Publish;
    assert!(c.validate().is_err());
}

#[test]
fn events_and_control_need_the_registry_and_each_field_is_validated_by_name() {
    let base = || {
        let mut c = Config::example("nats://n:4222");
        c.registry = Some(serde_json::from_str(r#"{"bucket": "REG"}"#).unwrap());
        c.events = Some(
            serde_json::from_str(
                r#"{"subject": "wsrelay.events.ns.gw", "durable": {"stream": "EV"}}"#,
            )
            .unwrap(),
        );
        c.control = Some(serde_json::from_str(r#"{"subject": "wsrelay.control.ns.gw"}"#).unwrap());
        c
    };
    let c = base();
    c.validate().unwrap();
    let e = c.events.clone().unwrap();
    assert_eq!(
        e.types,
        EventType::CONNECTIONS.to_vec(),
        "the connections' types by default"
    );
    let d = e.durable.unwrap();
    assert_eq!(
        (
            d.max_age_seconds,
            d.replicas,
            d.max_bytes,
            d.duplicate_window_seconds
        ),
        (86_400, 1, 256 << 20, 300)
    );
    let back: Config = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    assert!(
        serde_json::from_str::<Events>(r#"{"subject": "a", "type": []}"#).is_err(),
        "unknown fields are refused"
    );
    assert!(serde_json::from_str::<Events>(r#"{"subject": "a", "types": ["Renamed"]}"#).is_err());

    type Break = fn(&mut Config);
    let cases: [(&str, Break); 16] = [
        ("events.graceSeconds", |c| {
            c.events.as_mut().unwrap().grace_seconds = 61
        }),
        ("events.graceSeconds", |c| {
            let e = c.events.as_mut().unwrap();
            e.grace_seconds = 5;
            e.types.retain(|t| *t != EventType::Resumed);
        }),
        ("events.graceSeconds", |c| {
            let e = c.events.as_mut().unwrap();
            e.grace_seconds = 5;
            e.durable = None;
        }),
        ("events", |c| c.registry = None),
        ("events.subject", |c| {
            c.events.as_mut().unwrap().subject = "a.*".into()
        }),
        ("events.subject", |c| {
            c.events.as_mut().unwrap().subject = "$SYS.x".into()
        }),
        ("events.subject", |c| {
            c.events.as_mut().unwrap().subject = "_WSRELAY.x".into()
        }),
        ("events.subject", |c| {
            c.events.as_mut().unwrap().subject = "x".repeat(201)
        }),
        ("events.subject", |c| {
            c.control.as_mut().unwrap().subject = "wsrelay.events.ns.gw.x".into()
        }),
        ("events.types", |c| {
            c.events.as_mut().unwrap().types = vec![EventType::Connected, EventType::Connected]
        }),
        ("events.durable.stream", |c| dur(c).stream = "a.b".into()),
        ("events.durable.maxAgeSeconds", |c| {
            dur(c).max_age_seconds = 59
        }),
        ("events.durable.replicas", |c| dur(c).replicas = 2),
        ("events.durable.maxBytes", |c| dur(c).max_bytes = 1),
        ("events.durable.duplicateWindowSeconds", |c| {
            dur(c).duplicate_window_seconds = 29
        }),
        ("events.durable.stream", |c| dur(c).stream = "KV_REG".into()),
    ];
    fn dur(c: &mut Config) -> &mut DurableEvents {
        c.events.as_mut().unwrap().durable.as_mut().unwrap()
    }
    for (field, break_it) in cases {
        let mut c = base();
        break_it(&mut c);
        let errs = c.validate().unwrap_err();
        assert!(errs.0.iter().any(|e| e.field() == field), "{field}: {errs}");
    }
    let mut c = base();
    c.registry = None;
    c.events = None;
    assert_eq!(c.validate().unwrap_err().0[0].field(), "control");
    let mut c = base();
    c.control.as_mut().unwrap().subject = "wsrelay.control.ns.gw.>".into();
    assert_eq!(c.validate().unwrap_err().0[0].field(), "control.subject");
}

#[test]
fn storm_control_is_off_unless_set_and_its_burst_defaults_to_the_rate() {
    let base = |limits: &str| -> Config {
        serde_json::from_str(&format!(
            r#"{{"nats": {{"urls": ["nats://n:4222"]}}, "auth": {{"allowAnonymous": true}},
                "bindings": [{{"channel": "news", "subject": "news"}}], "limits": {limits}}}"#
        ))
        .unwrap()
    };
    let off = base("{}");
    assert_eq!(off.limits.accept_rate_per_second, 0);
    assert_eq!(off.limits.accept_burst(), 0);
    off.validate().unwrap();
    // Absent from the serialized config while off: existing configs keep their bytes (and the
    // operator's config hash).
    let json = serde_json::to_string(&off.limits).unwrap();
    assert!(!json.contains("accept"), "{json}");

    let on = base(r#"{"acceptRatePerSecond": 50}"#);
    assert_eq!(on.limits.accept_burst(), 50);
    on.validate().unwrap();
    let burst = base(r#"{"acceptRatePerSecond": 50, "acceptBurst": 200}"#);
    assert_eq!(burst.limits.accept_burst(), 200);
    burst.validate().unwrap();

    for (limits, field) in [
        (
            r#"{"acceptRatePerSecond": 50, "acceptBurst": 0}"#,
            "limits.acceptBurst",
        ),
        (r#"{"acceptBurst": 10}"#, "limits.acceptBurst"),
    ] {
        let errs = base(limits).validate().unwrap_err().0;
        assert!(
            errs.iter().any(|e| e.field() == field),
            "{limits}: {errs:#?}"
        );
    }
}

#[test]
fn the_sse_forward_subject_is_a_fixed_subject_under_the_relays_prefix() {
    let c = Config::example("nats://x:1");
    assert_eq!(c.listen.sse_forward_subject, "_WSRELAY.sse");
    for (subject, ok) in [
        ("_WSRELAY", true),
        ("_WSRELAY.sse.team-a.chat_1", true),
        ("sse.x", false),
        ("_WSRELAYS.sse", false),
        ("_WSRELAY.*", false),
        ("_WSRELAY.>", false),
        ("_WSRELAY..x", false),
        ("_WSRELAY.a b", false),
        ("", false),
    ] {
        let mut c = c.clone();
        c.listen.sse_forward_subject = subject.into();
        let bad = c
            .validate()
            .err()
            .is_some_and(|e| e.0.iter().any(|e| e.field() == "listen.sseForwardSubject"));
        assert_eq!(!bad, ok, "{subject:?}");
    }
    let mut long = c.clone();
    long.listen.sse_forward_subject = format!("_WSRELAY.{}", "a".repeat(120));
    assert!(long.validate().is_err());
}

#[test]
fn auto_subscribe_needs_a_fixed_channel_that_allows_subscribe_and_is_its_own() {
    let config = |bindings: &str| -> Config {
        serde_json::from_str(&format!(
            r#"{{"nats":{{"urls":["nats://n:4222"]}},"auth":{{"jwt":{{"algorithms":["HS256"],"key":{{"hmacSecretFile":"/k"}}}}}},"bindings":{bindings}}}"#
        ))
        .unwrap()
    };
    let fields = |c: &Config| -> Vec<String> {
        c.validate()
            .err()
            .map(|e| e.0.iter().map(|e| e.to_string()).collect())
            .unwrap_or_default()
    };
    let ok = config(
        r#"[{"channel":"orders.{id}","subject":"orders.{id}"},
            {"channel":"notifications","subject":"users.{claims.sub}.notify","autoSubscribe":true}]"#,
    );
    assert_eq!(fields(&ok), Vec::<String>::new());
    assert!(ok.bindings[1].auto_subscribe && !ok.bindings[0].auto_subscribe);
    // Absent when false: existing configs keep their bytes.
    assert!(
        !serde_json::to_string(&ok.bindings[0])
            .unwrap()
            .contains("auto")
    );

    let e = fields(&config(
        r#"[{"channel":"orders.{id}","subject":"orders.{id}","autoSubscribe":true}]"#,
    ));
    assert!(
        e.iter().any(|e| e.starts_with("bindings[0].autoSubscribe")
            && e.contains("placeholder {id}, which the client would choose")),
        "{e:?}"
    );
    let e = fields(&config(
        r#"[{"channel":"n","subject":"u.{claims.sub}","direction":"publish","autoSubscribe":true}]"#,
    ));
    assert!(
        e.iter()
            .any(|e| e.starts_with("bindings[0].autoSubscribe") && e.contains("subscribe")),
        "{e:?}"
    );
    let e = fields(&config(
        r#"[{"channel":"{any}","subject":"all.{any}"},
            {"channel":"notifications","subject":"u.{claims.sub}","autoSubscribe":true}]"#,
    ));
    assert!(
        e.iter().any(|e| e.starts_with("bindings[1].autoSubscribe")
            && e.contains("bindings[0].channel")
            && e.contains("taken by the earlier binding")),
        "{e:?}"
    );
}
