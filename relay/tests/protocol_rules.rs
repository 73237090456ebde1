//! The rules of docs/protocol.md that no other test checked, each against a real relay and
//! a real nats-server: the welcome frame and subprotocol answer, binary frames, malformed
//! requests, a second subscribe (409), reply order, what a publish puts in NATS, how NATS
//! payloads are encoded, oversized NATS payloads, long channel names, the admission order,
//! a subscribe while NATS is down, and JetStream that does not answer (503).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use wsrelay::config::{Direction, History};
use wsrelay_testkit::prelude::*;

/// Anonymous and HS256 clients; a channel both ways, one subscribe-only. Started, the relay
/// is ready (connected to NATS).
fn config(nats: &Nats) -> RelayBuilder {
    TestRelay::builder(nats)
        .anonymous(true)
        .hs256()
        .binding("orders.{id}", "orders.{id}", Direction::Both)
        .binding("news", "public.news", Direction::Subscribe)
        .ready()
}

async fn raw_request(ws: &mut Ws, text: &str) -> Value {
    ws.send(Message::text(text.to_owned())).await.unwrap();
    next_json(ws).await.expect("a reply")
}

/// §1 "After the upgrade" and "Where the token goes": the welcome frame is exactly the
/// documented one; `wsrelay.v1` is selected when offered; no subprotocol when none offered.
#[tokio::test]
async fn the_welcome_frame_and_the_subprotocol_answer_are_as_documented() {
    init_logs();
    let nats = Nats::start();
    let relay = config(&nats).max_message_bytes(4096).start().await;
    let addr = relay.client_addr;

    // `connection`: `<relay>/<n>`, a number of its own per connection.
    let connection = |w: &mut Value| {
        let c = w
            .as_object_mut()
            .and_then(|o| o.remove("connection"))
            .and_then(|c| c.as_str().map(str::to_owned))
            .unwrap_or_default();
        let (relay, n) = c.rsplit_once('/').unwrap_or_default();
        assert!(
            !relay.is_empty() && n.parse::<u64>().is_ok(),
            "connection {c:?}"
        );
        c
    };
    let mut anon = connect_with(addr, "", &[]).await.unwrap();
    let mut w = next_json(&mut anon).await.unwrap();
    let first = connection(&mut w);
    assert_eq!(
        w,
        json!({"type":"welcome","protocol":"wsrelay.v1","maxMessageBytes":4096,"anonymous":true})
    );
    let token = hs256(claims("alice"));
    let mut alice = connect_with(addr, &format!("?token={token}"), &[])
        .await
        .unwrap();
    let mut w = next_json(&mut alice).await.unwrap();
    assert_ne!(connection(&mut w), first);
    assert_eq!(
        w,
        json!({"type":"welcome","protocol":"wsrelay.v1","maxMessageBytes":4096,"anonymous":false})
    );

    let head = raw_upgrade(addr, "").await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(!head.contains("sec-websocket-protocol"), "{head}");
    let head = raw_upgrade(addr, "Sec-WebSocket-Protocol: other, wsrelay.v1\r\n")
        .await
        .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-protocol: wsrelay.v1\r\n"),
        "{head}"
    );
    relay.drain().await;
}

/// §1 "Where the token goes": the configured places in the configured order (default: query,
/// header, subprotocol); the first one present is used, even when a later one holds a good
/// token.
#[tokio::test]
async fn the_first_token_source_present_is_the_one_used() {
    init_logs();
    let nats = Nats::start();
    let relay = config(&nats).anonymous(false).start().await;
    let addr = relay.client_addr;
    let good = hs256(claims("alice"));
    let bearer = format!("Bearer {good}");
    let protocols = format!("wsrelay.v1, bearer.{good}");
    // Query before header.
    assert_eq!(
        connect_with(addr, "?token=garbage", &[("Authorization", &bearer)])
            .await
            .err(),
        Some(401)
    );
    // Header before subprotocol.
    assert_eq!(
        connect_with(
            addr,
            "",
            &[
                ("Authorization", "Bearer garbage"),
                ("Sec-WebSocket-Protocol", &protocols)
            ]
        )
        .await
        .err(),
        Some(401)
    );
    // Each good one alone is accepted.
    assert!(
        connect_with(addr, &format!("?token={good}"), &[])
            .await
            .is_ok()
    );
    assert!(
        connect_with(addr, "", &[("Authorization", &bearer)])
            .await
            .is_ok()
    );
    let head = raw_upgrade(addr, &format!("Sec-WebSocket-Protocol: {protocols}\r\n")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    relay.drain().await;
}

/// §2 "Binary frames are answered with an `error` (400)", and the connection stays.
#[tokio::test]
async fn a_binary_frame_is_answered_400_and_the_connection_stays() {
    init_logs();
    let nats = Nats::start();
    let relay = config(&nats).start().await;
    let mut ws = connect(relay.client_addr, "").await;
    ws.send(Message::binary(br#"{"type":"ping","id":1}"#.to_vec()))
        .await
        .unwrap();
    let r = next_json(&mut ws)
        .await
        .expect("a reply to the binary frame");
    assert_eq!(
        (r["type"].clone(), r["code"].clone()),
        (json!("error"), json!(400)),
        "{r}"
    );
    assert_eq!(r["id"], Value::Null, "{r}");
    assert_eq!(
        request(&mut ws, json!({"type":"ping","id":2})).await,
        json!({"type":"pong","id":2})
    );
    relay.drain().await;
}

/// §2 error code 400 (unknown type, unknown field, both or neither of `payload`/`text`) and
/// the `id` rules: a string of at most 64 bytes or a non-negative integer, echoed; `null`
/// when it could not be read.
#[tokio::test]
async fn malformed_requests_are_answered_400_with_their_id() {
    init_logs();
    let nats = Nats::start();
    let relay = config(&nats).start().await;
    let mut ws = connect(relay.client_addr, "").await;
    let id64 = "x".repeat(64);
    let id65 = "x".repeat(65);
    let cases: Vec<(&str, Value, Value)> = vec![
        (
            "unknown type",
            json!({"type":"subscrib","id":1,"channel":"news"}),
            json!(1),
        ),
        (
            "unknown field",
            json!({"type":"subscribe","id":2,"chanel":"news"}),
            json!(2),
        ),
        (
            "unknown field next to the right ones",
            json!({"type":"subscribe","id":3,"channel":"news","extra":true}),
            json!(3),
        ),
        (
            "payload and text",
            json!({"type":"publish","id":4,"channel":"orders.1","payload":1,"text":"1"}),
            json!(4),
        ),
        (
            "neither payload nor text",
            json!({"type":"publish","id":5,"channel":"orders.1"}),
            json!(5),
        ),
        ("no type", json!({"id":6,"channel":"news"}), json!(6)),
        (
            "a 65-byte id",
            json!({"type":"ping","id":id65}),
            Value::Null,
        ),
        ("a negative id", json!({"type":"ping","id":-1}), Value::Null),
        (
            "a fractional id",
            json!({"type":"ping","id":1.5}),
            Value::Null,
        ),
    ];
    for (name, frame, want_id) in cases {
        send(&mut ws, frame).await;
        let r = next_json(&mut ws).await.expect("a reply");
        assert_eq!(r["type"], "error", "{name}: {r}");
        assert_eq!(r["code"], 400, "{name}: {r}");
        assert_eq!(r["id"], want_id, "{name}: {r}");
    }
    // Nothing of the above was carried out: the connection is subscribed to nothing.
    let r = request(
        &mut ws,
        json!({"type":"unsubscribe","id":7,"channel":"news"}),
    )
    .await;
    assert_eq!(r["code"], 404, "{r}");
    // The ids the protocol allows are echoed as sent.
    for id in [json!(0), json!(u64::MAX), json!(id64), json!("")] {
        let r = request(&mut ws, json!({"type":"ping","id":id.clone()})).await;
        assert_eq!(r, json!({"type":"pong","id":id}));
    }
    relay.drain().await;
}

/// §2 error code 409: `subscribe` twice to the same channel; the first subscription stays
/// and delivers each message once.
#[tokio::test]
async fn a_second_subscribe_to_a_channel_is_answered_409() {
    init_logs();
    let nats = Nats::start();
    let relay = config(&nats).start().await;
    let nc = nats.client().await;
    let mut ws = connect(relay.client_addr, "").await;
    assert_eq!(
        subscribe(&mut ws, 1, "news").await,
        json!({"type":"ok","id":1})
    );
    let r = subscribe(&mut ws, 2, "news").await;
    assert_eq!(
        (r["type"].clone(), r["code"].clone()),
        (json!("error"), json!(409)),
        "{r}"
    );
    nc.publish("public.news", "once".into()).await.unwrap();
    nc.flush().await.unwrap();
    assert_eq!(
        messages_then_quiet(&mut ws, 1).await,
        vec![json!({"type":"message","channel":"news","text":"once"})]
    );
    // Still subscribed once: one unsubscribe, then 404.
    let r = request(
        &mut ws,
        json!({"type":"unsubscribe","id":3,"channel":"news"}),
    )
    .await;
    assert_eq!(r, json!({"type":"ok","id":3}));
    let r = request(
        &mut ws,
        json!({"type":"unsubscribe","id":4,"channel":"news"}),
    )
    .await;
    assert_eq!(r["code"], 404, "{r}");
    relay.drain().await;
}

/// §2 "Replies to one connection's requests come in request order": requests sent back to
/// back, some waiting for NATS (subscribe, publish), some answered at once (ping, errors).
#[tokio::test]
async fn replies_come_in_request_order() {
    init_logs();
    let nats = Nats::start();
    let relay = config(&nats).start().await;
    let mut ws = connect(relay.client_addr, "").await;
    let mut want = Vec::new();
    for round in 0..10u64 {
        let base = round * 10;
        let frames = [
            json!({"type":"subscribe","id":base,"channel":format!("orders.{round}")}),
            json!({"type":"ping","id":base + 1}),
            json!({"type":"publish","id":base + 2,"channel":format!("orders.{round}"),"text":"x"}),
            json!({"type":"unsubscribe","id":base + 3,"channel":"news"}),
            json!({"type":"subscribe","id":base + 4,"channel":"forbidden.channel"}),
            json!({"type":"ping","id":base + 5}),
        ];
        for f in frames {
            want.push(f["id"].as_u64().unwrap());
            ws.feed(Message::text(f.to_string())).await.unwrap();
        }
    }
    ws.flush().await.unwrap();
    let mut got = Vec::new();
    while got.len() < want.len() {
        match next_event(&mut ws, Duration::from_secs(20)).await {
            Got::Json(v) if v["type"] == "message" => {}
            Got::Json(v) => got.push(v["id"].as_u64().unwrap_or_else(|| panic!("{v}"))),
            other => panic!("after {} replies: {other:?}", got.len()),
        }
    }
    assert_eq!(got, want);
    relay.drain().await;
}

/// §2 "The NATS payload of a `publish` is the exact JSON text of `payload`, or the UTF-8
/// bytes of `text`": whitespace, key order, number spelling and escapes kept.
#[tokio::test]
async fn a_publish_puts_the_exact_json_text_of_its_payload_in_nats() {
    init_logs();
    let nats = Nats::start();
    let relay = config(&nats).start().await;
    let nc = nats.client().await;
    let mut sub = nc.subscribe("orders.>").await.unwrap();
    // A flush only writes the SUB: a message of our own coming back proves the server has
    // it, before the relay's publishes (on another connection) can race it.
    nc.publish("orders.probe", "p".into()).await.unwrap();
    let probe = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .expect("the subscription is in place")
        .unwrap();
    assert_eq!(probe.subject.as_str(), "orders.probe");
    let mut ws = connect(relay.client_addr, "").await;
    let payload = r#"{ "b" : [1, 2.50, 1e3],"a":"\u00e9\n" }"#;
    let r = raw_request(
        &mut ws,
        &format!(r#"{{"type":"publish","id":1,"channel":"orders.1","payload":{payload}}}"#),
    )
    .await;
    assert_eq!(r, json!({"type":"ok","id":1}));
    let r = request(
        &mut ws,
        json!({"type":"publish","id":2,"channel":"orders.2","text":"é \"quoted\"\n"}),
    )
    .await;
    assert_eq!(r, json!({"type":"ok","id":2}));
    for (subject, bytes) in [
        ("orders.1", payload.as_bytes()),
        ("orders.2", "é \"quoted\"\n".as_bytes()),
    ] {
        let m = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .expect("the publish reaches NATS")
            .unwrap();
        assert_eq!(m.subject.as_str(), subject);
        assert_eq!(&m.payload[..], bytes, "{subject}");
    }
    relay.drain().await;
}

/// §2 "A `message` carries the NATS payload as `payload` when it is valid JSON, as `text`
/// when it is other UTF-8, and as `base64` otherwise", with the document's own examples.
#[tokio::test]
async fn nats_payloads_arrive_as_payload_text_or_base64() {
    init_logs();
    let nats = Nats::start();
    let relay = config(&nats).start().await;
    let nc = nats.client().await;
    let mut ws = connect(relay.client_addr, "").await;
    assert_eq!(subscribe(&mut ws, 1, "orders.42").await["type"], "ok");
    for p in [
        br#"{"status":"shipped"}"#.to_vec(),
        b"hello".to_vec(),
        vec![0xff, 0x00, 0x10, 0x80],
        b"".to_vec(),
    ] {
        nc.publish("orders.42", p.into()).await.unwrap();
    }
    nc.flush().await.unwrap();
    assert_eq!(
        messages_then_quiet(&mut ws, 4).await,
        vec![
            json!({"type":"message","channel":"orders.42","payload":{"status":"shipped"}}),
            json!({"type":"message","channel":"orders.42","text":"hello"}),
            json!({"type":"message","channel":"orders.42","base64":"/wAQgA=="}),
            json!({"type":"message","channel":"orders.42","text":""}),
        ]
    );
    relay.drain().await;
}

/// §2 "NATS payloads larger than `limits.maxMessageBytes` are not relayed (counted in
/// `wsrelay_messages_dropped_total{reason="too_large"}`)"; a payload of exactly the limit is.
#[tokio::test]
async fn a_nats_payload_over_max_message_bytes_is_not_relayed_and_is_counted() {
    init_logs();
    let nats = Nats::start();
    let relay = config(&nats).max_message_bytes(1024).start().await;
    let nc = nats.client().await;
    let mut ws = connect(relay.client_addr, "").await;
    assert_eq!(subscribe(&mut ws, 1, "news").await["type"], "ok");
    let at_limit = "a".repeat(1024);
    nc.publish("public.news", "b".repeat(1025).into())
        .await
        .unwrap();
    nc.publish("public.news", at_limit.clone().into())
        .await
        .unwrap();
    nc.flush().await.unwrap();
    assert_eq!(
        messages_then_quiet(&mut ws, 1).await,
        vec![json!({"type":"message","channel":"news","text":at_limit})]
    );
    assert_eq!(
        metric(
            relay.admin_addr,
            "wsrelay_messages_dropped_total{reason=\"too_large\"}"
        )
        .await,
        Some(1.0)
    );
    relay.drain().await;
}

/// §3 "Channel names are ... at most 256 bytes": 256 is accepted, 257 refused with 422.
#[tokio::test]
async fn a_channel_name_over_256_bytes_is_refused_with_422() {
    init_logs();
    let nats = Nats::start();
    let relay = config(&nats).start().await;
    let mut ws = connect(relay.client_addr, "").await;
    let ok = format!("orders.{}", "1".repeat(256 - "orders.".len()));
    let long = format!("{ok}1");
    assert_eq!(
        subscribe(&mut ws, 1, &ok).await,
        json!({"type":"ok","id":1})
    );
    let r = subscribe(&mut ws, 2, &long).await;
    assert_eq!(r["code"], 422, "{r}");
    let r = request(
        &mut ws,
        json!({"type":"publish","id":3,"channel":long,"text":"x"}),
    )
    .await;
    assert_eq!(r["code"], 422, "{r}");
    relay.drain().await;
}

/// §1 "The checks run cheapest first: draining, connections per client address,
/// connections per process, then the token (Origin, signature, claims), then connections per
/// token subject": where two checks fail, the earlier one answers. Client addresses come
/// from `X-Forwarded-For` (127.0.0.1 is a trusted proxy), so each check can be met alone.
#[tokio::test]
async fn admission_checks_run_in_the_documented_order() {
    init_logs();
    let nats = Nats::start();
    let relay = config(&nats)
        .anonymous(false)
        .max_connections(3)
        .config(|c| {
            c.auth.allowed_origins = vec!["https://app.test".into()];
            c.listen.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
            c.limits.max_connections_per_ip = 2;
            c.limits.max_connections_per_subject = 1;
            // Connections stay open during the drain's delay: the drain check meets full limits.
            c.drain.delay_before_close_seconds = 8;
            c.drain.grace_period_seconds = 9;
        })
        .start()
        .await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    let token = |sub: &str| format!("?token={}", hs256(claims(sub)));
    let try_from = |ip: &'static str, query: String, origin: &'static str| async move {
        connect_with(addr, &query, &[("X-Forwarded-For", ip), ("Origin", origin)])
            .await
            .map(|_| 101)
            .unwrap_or_else(|status| status)
    };
    const GOOD: &str = "https://app.test";
    const EVIL: &str = "https://evil.test";
    let garbage = || "?token=garbage".to_owned();

    let a1 = connect_with(
        addr,
        &token("alice"),
        &[("X-Forwarded-For", "10.0.0.1"), ("Origin", GOOD)],
    )
    .await
    .unwrap();
    // Alice is at her subject's limit: the token checks answer first.
    assert_eq!(
        try_from("10.0.0.2", token("alice"), EVIL).await,
        403,
        "origin before subject"
    );
    assert_eq!(
        try_from("10.0.0.2", token("alice"), GOOD).await,
        429,
        "subject"
    );
    // Origin before signature.
    assert_eq!(
        try_from("10.0.0.2", garbage(), EVIL).await,
        403,
        "origin before signature"
    );
    assert_eq!(
        try_from("10.0.0.2", garbage(), GOOD).await,
        401,
        "signature"
    );
    // 10.0.0.1 at its address's limit: the address answers before the token.
    let b1 = connect_with(
        addr,
        &token("bob"),
        &[("X-Forwarded-For", "10.0.0.1"), ("Origin", GOOD)],
    )
    .await
    .unwrap();
    assert_eq!(
        try_from("10.0.0.1", garbage(), EVIL).await,
        429,
        "address before token"
    );
    // The process at its limit (3): the process answers before the token, and the address
    // before the process.
    let c1 = connect_with(
        addr,
        &token("carol"),
        &[("X-Forwarded-For", "10.0.0.3"), ("Origin", GOOD)],
    )
    .await
    .unwrap();
    assert_eq!(
        try_from("10.0.0.4", garbage(), EVIL).await,
        503,
        "process before token"
    );
    assert_eq!(
        try_from("10.0.0.1", garbage(), EVIL).await,
        429,
        "address before process"
    );
    // Draining before everything: the same request from the full address is 503.
    let drained = tokio::spawn(relay.drain());
    assert!(
        eventually(Duration::from_secs(20), || async {
            http_get(admin, "/ready").await.0 == 503
        })
        .await
    );
    assert_eq!(
        try_from("10.0.0.1", garbage(), EVIL).await,
        503,
        "draining first"
    );
    // Read after that answer: the three connections were still open (the drain's delay), so
    // every limit was met when draining answered.
    assert_eq!(metric(admin, "wsrelay_connections ").await, Some(3.0));
    drop((a1, b1, c1));
    drained.await.unwrap();
}

/// §2 error code 503 "NATS is not connected right now", for a subscribe (the publish case is
/// in nats_restart.rs); the connection stays.
#[tokio::test]
async fn a_subscribe_while_nats_is_down_is_answered_503() {
    init_logs();
    let mut nats = Nats::start();
    let relay = config(&nats).start().await;
    let admin = relay.admin_addr;
    let mut ws = connect(relay.client_addr, "").await;
    nats.stop();
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(admin, "wsrelay_nats_connected ").await == Some(0.0)
        })
        .await
    );
    let r = subscribe(&mut ws, 1, "news").await;
    assert_eq!(
        (r["type"].clone(), r["code"].clone()),
        (json!("error"), json!(503)),
        "{r}"
    );
    // Not subscribed: unsubscribe is 404, and the connection still answers.
    let r = request(
        &mut ws,
        json!({"type":"unsubscribe","id":2,"channel":"news"}),
    )
    .await;
    assert_eq!(r["code"], 404, "{r}");
    assert_eq!(
        request(&mut ws, json!({"type":"ping","id":3})).await["type"],
        "pong"
    );
    relay.drain().await;
}

/// §2 error code 503 "(for `subscribe`) the NATS server ... did not confirm it within 2 s; the
/// connection is not subscribed". The nats-server is stopped (SIGSTOP): the relay's
/// connection to it stays open, so the relay still counts NATS as connected, but nothing
/// comes back. After SIGCONT the same subscribe works.
#[tokio::test]
async fn a_subscribe_nats_does_not_confirm_is_answered_503() {
    init_logs();
    let nats = Nats::start();
    let relay = config(&nats).start().await;
    let mut ws = connect(relay.client_addr, "").await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(nats.pid()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let r = subscribe(&mut ws, 1, "news").await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(
        (r["type"].clone(), r["code"].clone()),
        (json!("error"), json!(503)),
        "{r}"
    );
    let r = request(
        &mut ws,
        json!({"type":"unsubscribe","id":2,"channel":"news"}),
    )
    .await;
    assert_eq!(r["code"], 404, "{r}");
    // The next subscriber is not joined to the dead entry: it gets a working subscription.
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(relay.admin_addr, "wsrelay_nats_subscriptions ").await == Some(0.0)
        })
        .await,
        "the unconfirmed subject's entry stayed"
    );
    assert_eq!(
        subscribe(&mut ws, 3, "news").await,
        json!({"type":"ok","id":3})
    );
    let nc = nats.client().await;
    nc.publish("public.news", "back".into()).await.unwrap();
    nc.flush().await.unwrap();
    assert_eq!(
        messages_then_quiet(&mut ws, 1).await,
        vec![json!({"type":"message","channel":"news","text":"back"})]
    );
    relay.drain().await;
}

const STREAM: &str = "WSRELAY_TEST_RULES";

fn nats_conf(path: &std::path::Path, relay_permissions: &str) {
    std::fs::write(
        path,
        format!(
            r#"jetstream {{ store_dir: "{}" }}
authorization {{
  users = [
    {{ user: relay, password: relaypw {relay_permissions} }}
    {{ user: test, password: testpw }}
  ]
}}
"#,
            path.with_extension("js").display()
        ),
    )
    .unwrap();
}

/// §8 "A subscribe waits for at most 5 s of stream reads; if JetStream does not answer, it
/// is refused with 503", and "If JetStream does not acknowledge within 5 s the answer is 503".
/// JetStream is made silent for the relay alone, after its stream is in place: a config
/// reload of nats-server denies the relay's user the JetStream API and the channel's
/// subjects, so its requests get no answer (core NATS, and the `_WSRELAY.sync` round trip
/// that confirms a SUB, still work).
#[tokio::test]
async fn silent_jetstream_makes_resumable_subscribes_and_publishes_503() {
    init_logs();
    let dir = std::env::temp_dir().join(format!("wsrelay-rules-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("nats.conf");
    nats_conf(&conf, "");
    let nats = Nats::start_args(&["-c", conf.to_str().unwrap()]);
    let secret = |name: &str, v: &str| {
        let p = dir.join(name);
        std::fs::write(&p, v).unwrap();
        p
    };
    let mut orders = binding("orders.{id}", "orders.{id}", Direction::Both);
    // From the config format, so that fields added to `History` later take their defaults.
    let history: History = serde_json::from_value(
        json!({"stream": STREAM, "maxMessages": 100, "maxAgeSeconds": 300, "replicas": 1}),
    )
    .unwrap();
    orders.history = Some(history);
    let relay = TestRelay::builder(&nats)
        .with_binding(orders)
        .config(|c| {
            c.nats.credentials.user_file = Some(secret("user", "relay"));
            c.nats.credentials.password_file = Some(secret("password", "relaypw"));
        })
        .ready()
        .start()
        .await;
    let admin = relay.admin_addr;
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(admin, "wsrelay_history_streams_ready").await == Some(1.0)
        })
        .await,
        "the history stream was not put in place"
    );
    let mut ws = connect(relay.client_addr, "").await;
    // Working first: a stored publish and a resumable subscribe.
    let r = request(
        &mut ws,
        json!({"type":"publish","id":1,"channel":"orders.1","text":"a"}),
    )
    .await;
    assert_eq!(r["type"], "ok", "{r}");
    assert!(r["seq"].as_u64().is_some(), "{r}");

    nats_conf(
        &conf,
        r#", permissions: { publish: { deny: ["$JS.>", "orders.>"] } }"#,
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(nats.pid()).unwrap()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    // The reload is asynchronous: wait until the relay's publishes are refused (the server
    // drops them, so a plain NATS subscriber of the test no longer sees them).
    let nc = async_nats::ConnectOptions::with_user_and_password("test".into(), "testpw".into())
        .connect(nats.url())
        .await
        .unwrap();
    let mut seen = nc.subscribe("orders.>").await.unwrap();
    nc.flush().await.unwrap();
    let t0 = Instant::now();
    let mut reloaded = false;
    for i in 0..20u64 {
        let r = request(
            &mut ws,
            json!({"type":"publish","id":100 + i,"channel":"orders.2","text":"b"}),
        )
        .await;
        if r["type"] == "error" {
            assert_eq!(r["code"], 503, "{r}");
            eprintln!("stored publish: {r}");
            // No forwarding of the denied publish reached NATS.
            let leaked = tokio::time::timeout(Duration::from_millis(300), seen.next()).await;
            assert!(leaked.is_err(), "a denied publish reached NATS: {leaked:?}");
            reloaded = true;
            break;
        }
        // Still allowed: the publish went through; drain its copy and try again.
        let _ = tokio::time::timeout(Duration::from_secs(5), seen.next()).await;
    }
    assert!(reloaded, "the nats-server reload never took effect");
    eprintln!(
        "stored publish answered 503 {:?} after the reload",
        t0.elapsed()
    );

    // A subscribe on a resumable channel needs the stream (its ring is loaded once per
    // channel, and a `since` is checked against it): 503, bounded, and not subscribed.
    let asked = Instant::now();
    let r = request(
        &mut ws,
        json!({"type":"subscribe","id":200,"channel":"orders.3","since":{"epoch":"e","seq":1}}),
    )
    .await;
    let took = asked.elapsed();
    assert_eq!(
        (r["type"].clone(), r["code"].clone()),
        (json!("error"), json!(503)),
        "{r}"
    );
    assert!(took < Duration::from_secs(20), "503 after {took:?}");
    eprintln!("resumable subscribe answered 503 after {took:?}: {r}");
    let r = request(
        &mut ws,
        json!({"type":"unsubscribe","id":201,"channel":"orders.3"}),
    )
    .await;
    assert_eq!(r["code"], 404, "{r}");
    assert_eq!(
        request(&mut ws, json!({"type":"ping","id":202})).await["type"],
        "pong"
    );
    relay.drain().await;
    let _ = std::fs::remove_dir_all(&dir);
}
