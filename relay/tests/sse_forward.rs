//! An SSE POST may reach any relay (docs/protocol.md section 9): two real relay processes on
//! one nats-server; a session opened on relay A is posted to through relay B, which forwards
//! each POST over NATS to A and answers with A's answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use wsrelay::config::{Config, Direction};
use wsrelay_testkit::prelude::*;
use wsrelay_testkit::sse::*;

const ORIGIN: &str = "Origin: https://app.test\r\n";
/// POSTs timed on each path.
const TIMED: usize = 200;

/// A relay named `name` (its session ids name it), HS256 tokens, one allowed origin.
fn config(nats: &Nats, name: &str) -> Config {
    TestRelay::builder(nats)
        .hs256()
        .anonymous(false)
        .origin("https://app.test")
        .config(|c| c.nats.name = name.into())
        .binding("chat.{room}", "chat.{room}", Direction::Both)
        .binding(
            "me.notify",
            "users.{claims.sub}.notify",
            Direction::Subscribe,
        )
        .build()
}

fn spawn(nats: &Nats, name: &str) -> RelayProcess {
    RelayProcess::spawn_config(
        std::path::Path::new(env!("CARGO_BIN_EXE_wsrelay")),
        &config(nats, name),
        &format!("sse-forward-{name}"),
        "info",
    )
}

async fn ready(admin: SocketAddr) {
    assert!(
        eventually(Duration::from_secs(20), || async {
            http_get(admin, "/ready").await.0 == 200
        })
        .await,
        "the relay did not become ready"
    );
}

fn token(sub: &str) -> String {
    format!("?token={}", hs256(claims(sub)))
}

/// The p50 and p99 of `times`, in microseconds.
fn percentiles(times: &mut [Duration]) -> (u128, u128) {
    times.sort();
    let at = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize].as_micros();
    (at(0.5), at(0.99))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_to_another_relay_is_answered_by_the_sessions_relay() {
    init_logs();
    let nats = Nats::start();
    let a = spawn(&nats, "relay-a");
    let b = spawn(&nats, "relay-b");
    ready(a.admin).await;
    ready(b.admin).await;
    let nc = nats.client().await;
    // Every forwarded POST, as the NATS server carries it.
    let mut forwards = nc.subscribe("_WSRELAY.sse.>").await.unwrap();
    nc.flush().await.unwrap();

    let q = token("alice");
    let mut s = Stream::open(a.client, &q, ORIGIN).await;
    assert_eq!(s.status, 200, "{}", s.headers);
    let path = s.session().await;
    assert!(path.starts_with("/ws/sse/relay-a."), "{path}");

    // Subscribe through B: A's session answers on A's stream; a NATS message follows.
    let sub = json!({"type": "subscribe", "id": 1, "channel": "me.notify"}).to_string();
    assert_eq!(
        post(b.client, &format!("{path}{q}"), &sub, ORIGIN).await,
        202
    );
    assert_eq!(s.reply(1).await["type"], "ok");
    let m = tokio::time::timeout(Duration::from_secs(10), forwards.next())
        .await
        .expect("the POST went over NATS")
        .unwrap();
    assert_eq!(m.subject.as_str(), "_WSRELAY.sse.relay-a");
    nc.publish("users.alice.notify", "{\"n\":1}".into())
        .await
        .unwrap();
    nc.flush().await.unwrap();
    let m = s.frame().await;
    assert_eq!(
        (m["type"].as_str(), m["payload"]["n"].as_u64()),
        (Some("message"), Some(1)),
        "{m}"
    );

    // Refused through B as A refuses it: another identity, no token, another origin.
    let ping = json!({"type": "ping", "id": 2}).to_string();
    for relay in [a.client, b.client] {
        assert_eq!(
            post(relay, &format!("{path}{}", token("bob")), &ping, ORIGIN).await,
            403,
            "another identity"
        );
        assert_eq!(post(relay, &path, &ping, ORIGIN).await, 401, "no token");
        assert_eq!(
            post(
                relay,
                &format!("{path}{q}"),
                &ping,
                "Origin: https://evil.test\r\n"
            )
            .await,
            403,
            "another origin"
        );
    }

    // A malformed id: 404 at once, and nothing on NATS. A marker published after the answer
    // is the next thing the NATS server carries on the forward subjects (a forward would
    // have been carried before the answer: the relay answers after its request).
    while tokio::time::timeout(Duration::from_millis(300), forwards.next())
        .await
        .is_ok()
    {}
    for bad in [
        "/ws/sse/relay-a.XYZ",
        "/ws/sse/relay-a",
        "/ws/sse/a*b.0123456789abcdef0123456789abcdef",
        "/ws/sse/0123456789abcdef0123456789abcdef",
    ] {
        assert_eq!(
            post(b.client, &format!("{bad}{q}"), &ping, ORIGIN).await,
            404,
            "{bad}"
        );
    }
    nc.publish("_WSRELAY.sse.marker", "".into()).await.unwrap();
    nc.flush().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), forwards.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.subject.as_str(), "_WSRELAY.sse.marker");

    // The added latency of a forwarded POST: the same pings posted to A and through B.
    let mut times = [Vec::new(), Vec::new()];
    for i in 0..TIMED * 2 {
        let (relay, which) = if i % 2 == 0 {
            (a.client, 0)
        } else {
            (b.client, 1)
        };
        let ping = json!({"type": "ping", "id": 1000 + i}).to_string();
        let started = Instant::now();
        assert_eq!(post(relay, &format!("{path}{q}"), &ping, ORIGIN).await, 202);
        times[which].push(started.elapsed());
        // Each one answered on the stream, in order.
        assert_eq!(s.reply(1000 + i as u64).await["type"], "pong");
    }
    let (local, forwarded) = (percentiles(&mut times[0]), percentiles(&mut times[1]));
    println!(
        "SSE POST round trip over {TIMED} POSTs each: local p50 {} us p99 {} us; forwarded p50 {} us p99 {} us; added p50 {} us p99 {} us",
        local.0,
        local.1,
        forwarded.0,
        forwarded.1,
        forwarded.0.saturating_sub(local.0),
        forwarded.1.saturating_sub(local.1),
    );

    // Over the size limit through B: 413, and A closes the session with 1009.
    let big = "x".repeat(70_000);
    assert_eq!(
        post(b.client, &format!("{path}{q}"), &big, ORIGIN).await,
        413
    );
    assert_eq!(s.close_event().await["code"], 1009);

    // The session ended: A says so through B.
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(a.admin, "wsrelay_connections ").await == Some(0.0)
        })
        .await,
        "the session outlived its close"
    );
    assert_eq!(
        post(b.client, &format!("{path}{q}"), &ping, ORIGIN).await,
        404
    );

    // A session whose relay is gone: nobody takes its subject, 404. (This test's own
    // watcher of the subjects would take it.)
    forwards.unsubscribe().await.unwrap();
    let mut s2 = Stream::open(a.client, &q, ORIGIN).await;
    let path2 = s2.session().await;
    drop(a);
    // Once the NATS server saw A's connection close (at once for a killed process, whose
    // socket the kernel closes).
    assert!(
        eventually(Duration::from_secs(20), || async {
            nc.request("_WSRELAY.sse.relay-a", "".into())
                .await
                .is_err_and(|e| e.kind() == async_nats::RequestErrorKind::NoResponders)
        })
        .await,
        "relay-a's subject still taken"
    );
    assert_eq!(
        post(b.client, &format!("{path2}{q}"), &ping, ORIGIN).await,
        404
    );
    // B counted what it forwarded: answered by A, and the one nobody took.
    assert!(
        metric(
            b.admin,
            "wsrelay_sse_posts_forwarded_total{reason=\"answered\"}"
        )
        .await
        .is_some_and(|n| n >= 200.0)
    );
    assert_eq!(
        metric(
            b.admin,
            "wsrelay_sse_posts_forwarded_total{reason=\"no_relay\"}"
        )
        .await,
        Some(1.0)
    );
}
