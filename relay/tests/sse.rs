//! The Server-Sent Events + POST fallback (docs/protocol.md section 9) and refusals after the
//! upgrade (`auth.refuseAfterUpgrade`, section 1), against a real relay and nats-server. The
//! HTTP client here is raw TCP (the event stream's chunked body decoded by hand), so every
//! byte the relay writes is what is checked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use wsrelay::config::Direction;
use wsrelay_testkit::prelude::*;
use wsrelay_testkit::sse::*;

/// HS256 tokens only, one allowed origin, pings every second; a chat and a personal channel.
fn config(nats: &Nats) -> RelayBuilder {
    TestRelay::builder(nats)
        .hs256()
        .anonymous(false)
        .origin("https://app.test")
        .config(|c| c.limits.ping_interval_seconds = 1)
        .binding("chat.{room}", "chat.{room}", Direction::Both)
        .binding(
            "me.notify",
            "users.{claims.sub}.notify",
            Direction::Subscribe,
        )
}

fn token(sub: &str) -> String {
    hs256(claims(sub))
}

async fn connections(admin: SocketAddr) -> f64 {
    metric(admin, "wsrelay_connections ").await.unwrap()
}

#[tokio::test]
async fn a_session_subscribes_receives_and_publishes_like_a_connection() {
    init_logs();
    let nats = Nats::start();
    let relay = config(&nats).start().await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    let nc = nats.client().await;

    let t = token("alice");
    let q = format!("?token={t}");
    let mut s = Stream::open(addr, &q, "Origin: https://app.test\r\n").await;
    assert_eq!(s.status, 200, "{}", s.headers);
    let h = s.headers.to_ascii_lowercase();
    for want in [
        "content-type: text/event-stream",
        "cache-control: no-cache",
        "x-accel-buffering: no",
        "access-control-allow-origin: https://app.test",
    ] {
        assert!(h.contains(want), "{want} missing: {h}");
    }
    let path = s.session().await;
    assert_eq!(connections(admin).await, 1.0, "a session is a connection");

    // Subscribe over POST: 202, the `ok` on the stream; a NATS message arrives.
    let sub = json!({"type": "subscribe", "id": 1, "channel": "me.notify"}).to_string();
    assert_eq!(post(addr, &format!("{path}{q}"), &sub, "").await, 202);
    assert_eq!(s.reply(1).await["type"], "ok");
    nc.publish("users.alice.notify", "{\"n\":\n1}".into())
        .await
        .unwrap();
    nc.flush().await.unwrap();
    let m = s.frame().await;
    assert_eq!(m["type"], "message", "{m}");
    assert_eq!(
        m["payload"],
        json!({"n": 1}),
        "a payload with a line break survives"
    );

    // Publish over POST (token in the Authorization header this time): on NATS, `ok` on the
    // stream.
    let mut inbox = nc.subscribe("chat.lobby").await.unwrap();
    // Until a probe comes back through it, the server may not hold the subscription yet:
    // `flush` only empties the socket buffer, and the relay's publish on its own connection
    // could reach the server first and be lost.
    nc.publish("chat.lobby", "probe".into()).await.unwrap();
    let probe = tokio::time::timeout(Duration::from_secs(20), inbox.next())
        .await
        .expect("the probe comes back")
        .unwrap();
    assert_eq!(&probe.payload[..], b"probe");
    let pubf = json!({"type": "publish", "id": 2, "channel": "chat.lobby", "payload": {"hi": 1}})
        .to_string();
    let auth = format!("Authorization: Bearer {t}\r\n");
    assert_eq!(post(addr, &path, &pubf, &auth).await, 202);
    assert_eq!(s.reply(2).await["type"], "ok");
    let got = tokio::time::timeout(Duration::from_secs(20), inbox.next())
        .await
        .expect("the publish reaches NATS")
        .unwrap();
    assert_eq!(&got.payload[..], b"{\"hi\":1}");

    // Errors are the protocol's, on the stream.
    assert_eq!(post(addr, &format!("{path}{q}"), "not json", "").await, 202);
    let e = s.frame().await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_u64()),
        (Some("error"), Some(400)),
        "{e}"
    );

    // The heartbeat: the relay's pings (every second here) are SSE comments. Two of them,
    // waited for (bounded): how many come in a fixed time depends on the machine's load.
    let mut comments = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while comments < 2 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match s.next(left).await {
            Some((Some(n), _)) if n == ":" => comments += 1,
            Some(_) => {}
            None => break,
        }
    }
    assert!(comments >= 2, "{comments} heartbeats in 20 s");

    // POSTs that are not the session's.
    let ping = json!({"type": "ping", "id": 3}).to_string();
    assert_eq!(post(addr, &path, &ping, "").await, 401, "no token");
    let bob = format!("?token={}", token("bob"));
    assert_eq!(
        post(addr, &format!("{path}{bob}"), &ping, "").await,
        403,
        "another identity"
    );
    assert_eq!(
        post(
            addr,
            &format!("{path}{q}"),
            &ping,
            "Origin: https://evil.test\r\n"
        )
        .await,
        403,
        "another origin"
    );
    assert_eq!(post(addr, &format!("/ws/sse/00{q}"), &ping, "").await, 404);

    // The client leaves: the session ends, it is no longer counted.
    drop(s);
    assert!(
        eventually(Duration::from_secs(20), || async {
            connections(admin).await == 0.0
        })
        .await,
        "the session outlived its stream"
    );
    assert_eq!(post(addr, &format!("{path}{q}"), &ping, "").await, 404);
    assert_eq!(
        metric(admin, "wsrelay_connections_accepted_total").await,
        Some(1.0)
    );
}

#[tokio::test]
async fn a_frame_over_the_limit_closes_with_1009_and_drain_closes_with_1012() {
    init_logs();
    let nats = Nats::start();
    let relay = config(&nats).max_message_bytes(1024).start().await;
    let addr = relay.client_addr;
    let q = format!("?token={}", token("alice"));

    let mut s = Stream::open(addr, &q, "").await;
    let path = s.session().await;
    let big = "x".repeat(2000);
    assert_eq!(post(addr, &format!("{path}{q}"), &big, "").await, 413);
    let c = s.close_event().await;
    assert_eq!(c["code"], 1009, "{c}");
    assert!(
        s.next(Duration::from_secs(5)).await.is_none(),
        "the stream ends after close"
    );

    // Drain: the `drain` frame, then the close with 1012 at the turn, then the stream ends.
    let mut s = Stream::open(addr, &q, "").await;
    s.session().await;
    let draining = tokio::spawn(relay.drain());
    let mut saw_drain = false;
    let close = loop {
        match s.next(Duration::from_secs(10)).await.expect("drain events") {
            (None, d) => {
                let f: Value = serde_json::from_str(&d).unwrap();
                if f["type"] == "drain" {
                    saw_drain = true;
                }
            }
            (Some(n), d) if n == "close" => break serde_json::from_str::<Value>(&d).unwrap(),
            _ => {}
        }
    };
    assert!(saw_drain, "no drain frame before the close");
    assert_eq!(close["code"], 1012, "{close}");
    assert!(s.next(Duration::from_secs(5)).await.is_none());
    tokio::time::timeout(Duration::from_secs(10), draining)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn refusals_after_the_upgrade_carry_a_code_and_a_reason() {
    init_logs();
    let nats = Nats::start();
    let relay = config(&nats)
        .max_connections(1)
        .config(|c| {
            c.auth.refuse_after_upgrade = true;
        })
        .start()
        .await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);

    let bad = format!("{}x", token("alice"));
    let cases = [
        (
            format!("?token={bad}"),
            "",
            4401,
            "invalid token",
            "invalid_token",
        ),
        (String::new(), "", 4401, "no token", "no_token"),
        (
            format!("?token={}", token("alice")),
            "https://evil.test",
            4403,
            "origin not allowed",
            "origin",
        ),
    ];
    for (query, origin, code, reason, label) in &cases {
        let headers: Vec<(&str, &str)> = if origin.is_empty() {
            vec![]
        } else {
            vec![("Origin", *origin)]
        };
        let mut ws = connect_with(addr, query, &headers)
            .await
            .expect("the upgrade is accepted");
        match next_event(&mut ws, Duration::from_secs(5)).await {
            Got::Closed(Some(c)) => assert_eq!(c, *code, "{label}"),
            other => panic!("{label}: expected a close, got {other:?}"),
        }
        let _ = reason;
        assert_eq!(
            metric(
                admin,
                &format!("wsrelay_connections_refused_total{{reason=\"{label}\"}}")
            )
            .await,
            Some(1.0),
            "{label}"
        );
        // The same refusal on the event stream: 200 and a lone `close` event.
        let extra = if origin.is_empty() {
            String::new()
        } else {
            format!("Origin: {origin}\r\n")
        };
        let mut s = Stream::open(addr, query, &extra).await;
        assert_eq!(s.status, 200);
        let c = s.close_event().await;
        assert_eq!(c, json!({"code": code, "reason": reason}), "{label}");
        assert!(
            !c.to_string().contains(&bad),
            "the reason never holds the token"
        );
        assert!(s.next(Duration::from_secs(5)).await.is_none());
        assert_eq!(
            metric(
                admin,
                &format!("wsrelay_connections_refused_total{{reason=\"{label}\"}}")
            )
            .await,
            Some(2.0),
            "{label}"
        );
    }

    // The reason is readable by the client (a raw close frame, checked byte for byte).
    let mut ws = connect_with(addr, &format!("?token={bad}"), &[])
        .await
        .unwrap();
    let frame = loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(f))) => break f.unwrap(),
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(u16::from(frame.code), 4401);
    assert_eq!(frame.reason.as_str(), "invalid token");

    // At capacity: 4503. The refused connections were never counted.
    let _one = connect(addr, &format!("?token={}", token("alice"))).await;
    assert_eq!(connections(admin).await, 1.0);
    let mut ws = connect_with(addr, &format!("?token={}", token("bob")), &[])
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut ws, Duration::from_secs(5)).await,
        Got::Closed(Some(4503))
    );
    assert_eq!(
        metric(
            admin,
            "wsrelay_connections_refused_total{reason=\"max_connections\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(connections(admin).await, 1.0);
}

#[tokio::test]
async fn without_the_option_refusals_stay_http_statuses() {
    init_logs();
    let nats = Nats::start();
    let relay = config(&nats).start().await;
    let addr = relay.client_addr;
    assert_eq!(connect_with(addr, "?token=bad", &[]).await.err(), Some(401));
    let s = Stream::open(addr, "?token=bad", "").await;
    assert_eq!(s.status, 401);
    let s = Stream::open(addr, "", "Origin: https://evil.test\r\n").await;
    assert_eq!(s.status, 403);
}
