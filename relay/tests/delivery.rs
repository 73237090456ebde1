//! Delivery reaches exactly the allowed clients; publish directions; claim-templated
//! subjects; injection refused; the hub shares one NATS subscription per subject;
//! config reload keeps connections.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::json;
use wsrelay_testkit::prelude::*;

/// Anonymous and HS256 clients; both directions, a claim-templated subject, publish-only and
/// subscribe-only channels.
fn jwt_config(nats: &Nats) -> RelayBuilder {
    TestRelay::builder(nats)
        .anonymous(true)
        .hs256()
        .binding("orders.{id}", "orders.{id}", Direction::Both)
        .binding(
            "me.notify",
            "users.{claims.sub}.notify",
            Direction::Subscribe,
        )
        .binding("chat.{room}", "chat.in.{room}", Direction::Publish)
        .binding("news", "public.news", Direction::Subscribe)
}

const QUIET: Duration = Duration::from_millis(300);

/// Subscribes on the test's own NATS connection and returns once the server holds the
/// subscription: a probe published on the same connection has come back through it. `flush`
/// alone only empties the socket buffer, so the relay's publish on its own connection could
/// otherwise reach the server before this SUB and be lost.
async fn subscribed(nc: &async_nats::Client, subject: &str, probe: &str) -> async_nats::Subscriber {
    let mut sub = nc.subscribe(subject.to_string()).await.unwrap();
    nc.publish(probe.to_string(), "probe".into()).await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(20), futures::StreamExt::next(&mut sub))
        .await
        .expect("the probe comes back within 20 s")
        .unwrap();
    assert_eq!(m.subject.as_str(), probe);
    sub
}

#[tokio::test]
async fn messages_reach_exactly_the_allowed_clients() {
    init_logs();
    let nats = Nats::start();
    let relay = jwt_config(&nats).start().await;
    let addr = relay.client_addr;
    let nc = nats.client().await;

    let mut alice = connect(addr, &format!("?token={}", hs256(claims("alice")))).await;
    let mut bob = connect(addr, &format!("?token={}", hs256(claims("bob")))).await;
    let mut anon = connect(addr, "").await;

    // Claim-templated subjects: each user gets its own.
    assert_eq!(subscribe(&mut alice, 1, "me.notify").await["type"], "ok");
    assert_eq!(subscribe(&mut bob, 1, "me.notify").await["type"], "ok");
    let r = subscribe(&mut anon, 1, "me.notify").await;
    assert_eq!(r["code"], 403, "{r}");
    nc.publish("users.alice.notify", r#"{"for":"alice"}"#.into())
        .await
        .unwrap();
    nc.publish("users.bob.notify", "for bob".into())
        .await
        .unwrap();
    nc.flush().await.unwrap();
    let a = messages_then_quiet(&mut alice, 1).await;
    let b = messages_then_quiet(&mut bob, 1).await;
    assert_eq!(
        a,
        vec![json!({"type":"message","channel":"me.notify","payload":{"for":"alice"}})]
    );
    assert_eq!(
        b,
        vec![json!({"type":"message","channel":"me.notify","text":"for bob"})]
    );
    assert!(drain_messages(&mut anon, QUIET).await.is_empty());

    // Client tokens: orders.1 only to who asked for orders.1.
    assert_eq!(subscribe(&mut alice, 2, "orders.1").await["type"], "ok");
    assert_eq!(subscribe(&mut anon, 2, "orders.2").await["type"], "ok");
    nc.publish("orders.1", "1".into()).await.unwrap();
    nc.publish("orders.2", "2".into()).await.unwrap();
    nc.publish("orders.3", "3".into()).await.unwrap();
    nc.flush().await.unwrap();
    assert_eq!(
        messages_then_quiet(&mut alice, 1).await,
        vec![json!({"type":"message","channel":"orders.1","payload":1})]
    );
    assert_eq!(
        messages_then_quiet(&mut anon, 1).await,
        vec![json!({"type":"message","channel":"orders.2","payload":2})]
    );
    assert!(drain_messages(&mut bob, QUIET).await.is_empty());

    // Publish direction: chat publishes land on chat.in.<room>; subscribing is refused.
    let mut chat_in = subscribed(&nc, "chat.in.>", "chat.in.probe").await;
    let mut orders_nats = subscribed(&nc, "orders.7", "orders.7").await;
    let r = request(
        &mut bob,
        json!({"type":"publish","id":3,"channel":"chat.r1","payload":{"hi":1}}),
    )
    .await;
    assert_eq!(r, json!({"type":"ok","id":3}));
    let m = tokio::time::timeout(
        Duration::from_secs(20),
        futures::StreamExt::next(&mut chat_in),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(m.subject.as_str(), "chat.in.r1");
    assert_eq!(&m.payload[..], br#"{"hi":1}"#);
    assert_eq!(subscribe(&mut bob, 4, "chat.r1").await["code"], 403);
    // Subscribe-only binding refuses publish.
    let r = request(
        &mut bob,
        json!({"type":"publish","id":5,"channel":"news","text":"x"}),
    )
    .await;
    assert_eq!(r["code"], 403, "{r}");
    // Both: publish and receive on orders.7.
    assert_eq!(subscribe(&mut bob, 6, "orders.7").await["type"], "ok");
    let r = request(
        &mut bob,
        json!({"type":"publish","id":7,"channel":"orders.7","text":"t"}),
    )
    .await;
    assert_eq!(r["type"], "ok");
    let m = tokio::time::timeout(
        Duration::from_secs(20),
        futures::StreamExt::next(&mut orders_nats),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(&m.payload[..], b"t");
    assert_eq!(
        messages_then_quiet(&mut bob, 1).await,
        vec![json!({"type":"message","channel":"orders.7","text":"t"})]
    );

    // Malformed frames get a 400 reply and the connection lives on.
    send(&mut bob, json!({"type":"subscribe","id":8})).await;
    let r = next_json(&mut bob).await.unwrap();
    assert_eq!(
        (r["code"].clone(), r["id"].clone()),
        (json!(400), json!(8)),
        "{r}"
    );
    futures::SinkExt::send(
        &mut bob,
        tokio_tungstenite::tungstenite::Message::text("{{{"),
    )
    .await
    .unwrap();
    assert_eq!(next_json(&mut bob).await.unwrap()["code"], 400);
    assert_eq!(
        request(&mut bob, json!({"type":"ping","id":9})).await["type"],
        "pong"
    );
    assert_eq!(
        metric(relay.admin_addr, "wsrelay_messages_published_total").await,
        Some(2.0)
    );
    relay.drain().await;
}

#[tokio::test]
async fn injection_attempts_are_refused() {
    init_logs();
    let nats = Nats::start();
    let relay = jwt_config(&nats).start().await;
    let addr = relay.client_addr;
    let nc = nats.client().await;
    let mut anon = connect(addr, "").await;
    let mut id = 0;
    for ch in [
        "orders.*",
        "orders.>",
        "orders.1.2",
        "orders.1 2",
        "orders.",
        "orders..1",
        ">",
        "*",
        "orders.\t",
    ] {
        id += 1;
        let r = subscribe(&mut anon, id, ch).await;
        assert_eq!(r["type"], "error", "{ch:?}: {r}");
        assert!(r["code"] == 422 || r["code"] == 403, "{ch:?}: {r}");
        let r = request(
            &mut anon,
            json!({"type":"publish","id":id + 100,"channel":ch,"text":"x"}),
        )
        .await;
        assert_eq!(r["type"], "error", "{ch:?}: {r}");
    }
    // Claims that would widen the subject.
    for sub in ["*", ">", "alice.x", "a b"] {
        let mut c = connect(addr, &format!("?token={}", hs256(claims(sub)))).await;
        let r = subscribe(&mut c, 1, "me.notify").await;
        assert_eq!(r["code"], 422, "sub {sub:?}: {r}");
    }
    // An empty `sub` names no one: refused before the upgrade (docs/protocol.md section 1).
    assert_eq!(
        connect_with(addr, &format!("?token={}", hs256(claims(""))), &[])
            .await
            .err(),
        Some(401)
    );
    // Nothing was subscribed in NATS by those attempts.
    assert_eq!(relay.relay.hub.subject_count(), 0);
    nc.publish("orders.1", "1".into()).await.unwrap();
    nc.publish("users.alice.x.notify", "1".into())
        .await
        .unwrap();
    nc.flush().await.unwrap();
    assert!(drain_messages(&mut anon, QUIET).await.is_empty());
    relay.drain().await;
}

#[tokio::test]
async fn one_nats_subscription_per_subject_shared_and_released() {
    init_logs();
    let nats = Nats::start();
    let relay = jwt_config(&nats).start().await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    let nc = nats.client().await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut c = connect(addr, "").await;
        assert_eq!(subscribe(&mut c, 1, "news").await["type"], "ok");
        clients.push(c);
    }
    assert_eq!(relay.relay.hub.subject_count(), 1);
    assert_eq!(
        metric(admin, "wsrelay_nats_subscriptions ").await,
        Some(1.0)
    );
    assert_eq!(metric(admin, "wsrelay_connections ").await, Some(5.0));
    nc.publish("public.news", "hello".into()).await.unwrap();
    nc.flush().await.unwrap();
    for c in &mut clients {
        assert_eq!(messages_then_quiet(c, 1).await.len(), 1);
    }
    for c in &mut clients[..4] {
        let r = request(c, json!({"type":"unsubscribe","id":2,"channel":"news"})).await;
        assert_eq!(r["type"], "ok");
    }
    assert_eq!(relay.relay.hub.subject_count(), 1);
    let r = request(
        &mut clients[0],
        json!({"type":"unsubscribe","id":3,"channel":"news"}),
    )
    .await;
    assert_eq!(r["code"], 404);
    drop(clients.pop());
    assert!(
        eventually(Duration::from_secs(20), || async {
            relay.relay.hub.subject_count() == 0
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(admin, "wsrelay_connections ").await == Some(4.0)
        })
        .await
    );
    let (status, _) = http_get(admin, "/ready").await;
    assert_eq!(status, 200);
    assert!(
        metric(admin, "wsrelay_messages_delivered_total")
            .await
            .unwrap()
            >= 5.0
    );
    assert!(
        metric(admin, "wsrelay_delivery_latency_seconds_count")
            .await
            .unwrap()
            >= 5.0
    );
    relay.drain().await;
}

#[tokio::test]
async fn config_reload_changes_bindings_and_keeps_connections() {
    init_logs();
    let nats = Nats::start();
    let dir = std::env::temp_dir().join(format!("wsrelay-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.json");
    let mut config = jwt_config(&nats).build();
    std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
    let relay = TestRelay::start(config.clone()).await;
    let addr = relay.client_addr;
    let nc = nats.client().await;
    let mut c = connect(addr, "").await;
    assert_eq!(subscribe(&mut c, 1, "news").await["type"], "ok");
    assert_eq!(subscribe(&mut c, 2, "orders.5").await["type"], "ok");
    assert_eq!(subscribe(&mut c, 3, "alerts").await["code"], 403);

    // Remove `news`, add `alerts`.
    config.bindings.retain(|b| b.channel != "news");
    config
        .bindings
        .push(binding("alerts", "public.alerts", Direction::Subscribe));
    std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
    let ended = relay.reload(&path).unwrap();
    assert_eq!(ended, 1);
    assert_eq!(
        next_json(&mut c).await.unwrap(),
        json!({"type":"unsubscribed","channel":"news","reason":"binding removed"})
    );
    // Same connection: the kept binding still delivers, the new one works, the old is gone.
    assert_eq!(subscribe(&mut c, 4, "alerts").await["type"], "ok");
    assert_eq!(subscribe(&mut c, 5, "news").await["code"], 403);
    nc.publish("orders.5", "5".into()).await.unwrap();
    nc.publish("public.alerts", "a".into()).await.unwrap();
    nc.publish("public.news", "n".into()).await.unwrap();
    nc.flush().await.unwrap();
    let got = messages_then_quiet(&mut c, 2).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.iter().all(|m| m["channel"] != "news"));
    // An invalid file is refused and the config in force stays.
    std::fs::write(&path, "nats: {urls: []}\nbogus: 1\n").unwrap();
    assert!(relay.reload(&path).is_err());
    assert_eq!(subscribe(&mut c, 6, "orders.6").await["type"], "ok");
    let _ = std::fs::remove_dir_all(&dir);
    relay.drain().await;
}

/// A client publish carries who sent it: `Wsrelay-Sub` (the token's `sub`) and
/// `Wsrelay-Connection`, set by the relay; an anonymous publish has no `Wsrelay-Sub`.
#[tokio::test]
async fn publishes_carry_the_sender_in_nats_headers() {
    init_logs();
    let nats = Nats::start();
    let relay = jwt_config(&nats).start().await;
    let admin = relay.admin_addr;
    assert!(
        eventually(Duration::from_secs(10), || async {
            metric(admin, "wsrelay_nats_connected").await == Some(1.0)
        })
        .await
    );
    let nc = nats.client().await;
    let mut sub = subscribed(&nc, "orders.5", "orders.5").await;
    let mut alice = connect(
        relay.client_addr,
        &format!("?token={}", hs256(claims("alice"))),
    )
    .await;
    let r = request(
        &mut alice,
        json!({"type": "publish", "id": 1, "channel": "orders.5", "text": "hi"}),
    )
    .await;
    assert_eq!(r["type"], "ok", "{r}");
    let m = tokio::time::timeout(Duration::from_secs(20), futures::StreamExt::next(&mut sub))
        .await
        .unwrap()
        .unwrap();
    let h = m.headers.expect("headers");
    assert_eq!(h.get("Wsrelay-Sub").map(|v| v.as_str()), Some("alice"));
    let conn = h
        .get("Wsrelay-Connection")
        .expect("connection header")
        .as_str()
        .to_owned();
    assert!(conn.contains('/'), "{conn}");
    let mut anon = connect(relay.client_addr, "").await;
    let r = request(
        &mut anon,
        json!({"type": "publish", "id": 2, "channel": "orders.5", "text": "anon"}),
    )
    .await;
    assert_eq!(r["type"], "ok", "{r}");
    let m = tokio::time::timeout(Duration::from_secs(20), futures::StreamExt::next(&mut sub))
        .await
        .unwrap()
        .unwrap();
    let h = m.headers.expect("headers");
    assert!(h.get("Wsrelay-Sub").is_none(), "anonymous: no sub");
    assert_ne!(
        h.get("Wsrelay-Connection").map(|v| v.as_str().to_owned()),
        Some(conn),
        "another connection"
    );
    relay.drain().await;
}

/// A subject with one subscriber (a personal channel) has its messages written by the
/// fan-out itself while the connection's writer is idle, and queued for the writer while it
/// is busy (the welcome, replies, a backlog). Either way: every message, in NATS order, with
/// the replies to requests made meanwhile. Bursts and pauses switch between the two paths;
/// two runtime workers let the fan-out and the writer run at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_personal_channel_keeps_order_across_direct_and_queued_writes() {
    init_logs();
    let nats = Nats::start();
    let relay = jwt_config(&nats)
        .send_queue_len(20_000)
        .config(|c| {
            c.limits.ping_interval_seconds = 1;
            c.limits.idle_timeout_seconds = 30;
        })
        .start()
        .await;
    let mut ws = connect(
        relay.client_addr,
        &format!("?token={}", hs256(claims("alice"))),
    )
    .await;
    assert_eq!(subscribe(&mut ws, 1, "me.notify").await["type"], "ok");

    const N: u64 = 6_000;
    let nc = nats.client().await;
    let publisher = tokio::spawn(async move {
        for i in 0..N {
            nc.publish("users.alice.notify", format!("{{\"n\":{i}}}").into())
                .await
                .unwrap();
            if i % 300 == 299 {
                nc.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        nc.flush().await.unwrap();
    });
    let (mut next, mut asked, mut answered) = (0u64, 0u64, 0u64);
    while next < N {
        if next % 200 == 0 && asked * 200 <= next {
            asked += 1;
            send(&mut ws, json!({"type": "ping", "id": asked})).await;
        }
        let Some(v) = next_json(&mut ws).await else {
            panic!("nothing after message {next} of {N}");
        };
        match v["type"].as_str() {
            Some("message") => {
                assert_eq!(v["payload"]["n"], next, "out of order");
                next += 1;
            }
            Some("pong") => {
                answered += 1;
                assert_eq!(v["id"], answered, "replies in order");
            }
            _ => panic!("unexpected frame {v}"),
        }
    }
    publisher.await.unwrap();
    while answered < asked {
        let v = next_json(&mut ws).await.expect("a reply");
        assert_eq!(v["type"], "pong", "{v}");
        answered += 1;
    }
    assert!(
        drain_messages(&mut ws, QUIET).await.is_empty(),
        "no duplicates"
    );
    // Counted after each write returns, which can be just after the client read it.
    let admin = relay.admin_addr;
    let counted =
        || async move { metric(admin, "wsrelay_messages_delivered_total").await == Some(N as f64) };
    assert!(
        eventually(Duration::from_secs(10), counted).await,
        "every delivery counted once: {:?}",
        metric(admin, "wsrelay_messages_delivered_total").await
    );
    relay.drain().await;
}
