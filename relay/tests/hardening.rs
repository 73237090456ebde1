//! Regressions for defects found by third-party clients and a line-by-line read (issue
//! "Relay hardening"): each test failed against the relay before its fix. A real relay, a
//! real nats-server and real WebSocket clients (or a byte stream the test controls, where
//! the defect is a peer that stops taking bytes at a precise moment).

#![allow(clippy::unwrap_used)]

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;
use wsrelay::config::{Direction, SlowConsumerPolicy};
use wsrelay::conn::outbox::Outbox;
use wsrelay_testkit::prelude::*;

/// HS256 tokens (and anonymous clients); two channels on one subject, a personal one.
fn jwt_config(nats: &Nats) -> RelayBuilder {
    TestRelay::builder(nats)
        .hs256()
        .binding("news", "public.news", Direction::Both)
        .binding("orders.{id}", "orders.{id}", Direction::Subscribe)
        .binding("o.{id}", "orders.{id}", Direction::Subscribe)
        .binding("me", "users.{claims.sub}", Direction::Subscribe)
}

fn token(claims: serde_json::Value) -> String {
    format!("?token={}", hs256(claims))
}

/// Defect 1: a relay configured with an issuer and audiences must refuse tokens that carry
/// no `iss` or no `aud`, not only tokens that carry wrong ones.
#[tokio::test]
async fn configured_issuer_and_audience_are_required() {
    init_logs();
    let nats = Nats::start();
    let relay = jwt_config(&nats).start().await;
    let addr = relay.client_addr;
    let exp = now_secs() + 600;
    let no_iss = json!({"sub": "a", "aud": "wsrelay", "exp": exp});
    let no_aud = json!({"sub": "a", "iss": "https://issuer.test", "exp": exp});
    for (what, claims) in [("no iss", no_iss), ("no aud", no_aud)] {
        let r = connect_with(addr, &token(claims), &[]).await;
        assert_eq!(r.err(), Some(401), "{what}");
    }
    assert!(connect_with(addr, &token(claims("a")), &[]).await.is_ok());
    relay.drain().await;
}

/// Defect 2: `exp` written as a fractional number (`Date.now()/1000 + ttl`) is accepted and
/// floored, and the connection is closed when it passes.
#[tokio::test]
async fn fractional_exp_is_floored_and_enforced() {
    init_logs();
    let nats = Nats::start();
    let relay = jwt_config(&nats).start().await;
    let exp = now_secs() as f64 + 2.5;
    let mut c = claims("a");
    c["exp"] = json!(exp);
    let mut ws = connect(relay.client_addr, &token(c)).await;
    assert_eq!(
        close_code(&mut ws, Duration::from_secs(10)).await,
        Some(1008),
        "closed at expiry"
    );
    relay.drain().await;
}

/// A byte stream whose write side can be frozen: once `frozen`, every write and flush stays
/// pending forever, as toward a peer that advertises a zero receive window.
struct Valve {
    inner: DuplexStream,
    frozen: Arc<AtomicBool>,
}

impl AsyncRead for Valve {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Valve {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.frozen.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Defect 3: a writer blocked in a ping write toward a peer that takes no more bytes is
/// released (its connection unregistered, the gauge back to zero) when the connection is
/// killed by its idle timeout.
#[tokio::test]
async fn a_writer_blocked_mid_ping_is_released() {
    init_logs();
    let nats = Nats::start();
    let c = TestRelay::builder(&nats)
        .config(|c| {
            c.limits.ping_interval_seconds = 1;
            c.limits.idle_timeout_seconds = 2;
            c.limits.write_timeout_seconds = 30;
        })
        .build();
    let running = TestRelay::start(c.clone()).await;
    let relay = running.relay.clone();
    let (server_io, client_io) = tokio::io::duplex(64 * 1024);
    let frozen = Arc::new(AtomicBool::new(false));
    let valve = Valve {
        inner: server_io,
        frozen: frozen.clone(),
    };
    let ws = WebSocketStream::from_raw_socket(
        valve,
        Role::Server,
        Some(wsrelay::edge::websocket::ws_config(&c.limits)),
    )
    .await;
    let conn = relay.register(
        Arc::new(Outbox::new(64, SlowConsumerPolicy::Disconnect)),
        None,
        None,
    );
    let (sink, stream) = ws.split();
    let task = tokio::spawn(wsrelay::session::run(
        sink,
        stream,
        relay.clone(),
        conn,
        None,
        wsrelay::session::Welcome::default(),
    ));
    let mut client = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
    let welcome = tokio::time::timeout(Duration::from_secs(5), client.next())
        .await
        .unwrap();
    assert!(welcome.is_some(), "welcome frame");
    // The peer stops taking bytes before the first ping (1 s): the writer blocks in it.
    frozen.store(true, Ordering::SeqCst);
    assert_eq!(relay.connections().len(), 1);
    let ended = tokio::time::timeout(Duration::from_secs(20), task).await;
    assert!(ended.is_ok(), "the connection task is still blocked");
    assert_eq!(relay.connections().len(), 0);
    assert_eq!(
        metric(running.admin_addr, "wsrelay_connections ").await,
        Some(0.0)
    );
    drop(client);
    running.drain().await;
}

/// Defect 3, on a real socket: a client that stops reading (its socket buffers full) is let
/// go by the write deadline, not only by the idle timeout, with its permit and its share of
/// the connection gauge.
#[tokio::test]
async fn a_client_that_stops_reading_is_released_by_the_write_deadline() {
    init_logs();
    let nats = Nats::start();
    let relay = TestRelay::builder(&nats)
        .slow_consumer_policy(SlowConsumerPolicy::DropOldest)
        .send_queue_len(64)
        .config(|c| {
            c.limits.idle_timeout_seconds = 120;
            c.limits.ping_interval_seconds = 60;
            c.limits.write_timeout_seconds = 2;
        })
        .start()
        .await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    let mut stuck = connect(addr, "").await;
    assert_eq!(subscribe(&mut stuck, 1, "public.t").await["type"], "ok");
    let nc = nats.client().await;
    // 16 MiB: more than loopback socket buffers hold for a client that does not read.
    let payload = bytes::Bytes::from(vec![b'x'; 8 * 1024]);
    for _ in 0..2_000 {
        nc.publish("public.t", payload.clone()).await.unwrap();
    }
    nc.flush().await.unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(admin, "wsrelay_connections ").await == Some(0.0)
        })
        .await,
        "the stuck client still counts as a connection"
    );
    // Let go by the write deadline, which the relay enforces twice with the same duration:
    // its own timer on the blocked write (`write_timeout`), and the socket's TCP user
    // timeout, which makes the kernel abort a connection whose peer keeps a zero window.
    // Which one fires first is a race (a loaded machine delays the relay's timer). A write
    // that meets the kernel's ETIMEDOUT counts as `write_timeout` too, but when the reader
    // meets it first the writer then sees a broken pipe (`write_error`): either is the
    // deadline at work.
    let closes: Vec<String> = http_get(admin, "/metrics")
        .await
        .1
        .lines()
        .filter(|l| l.starts_with("wsrelay_connections_closed_total"))
        .map(str::to_owned)
        .collect();
    let closed = |reason: &'static str| async move {
        metric(
            admin,
            &format!("wsrelay_connections_closed_total{{reason=\"{reason}\"}}"),
        )
        .await
        .unwrap_or(0.0)
    };
    assert_eq!(
        closed("write_timeout").await + closed("write_error").await,
        1.0,
        "{closes:?}"
    );
    drop(stuck);
    relay.drain().await;
}

/// Defect 5: two channels of one connection on the same subject each get the message, and
/// unsubscribing one leaves the other.
#[tokio::test]
async fn two_channels_on_one_subject_are_independent() {
    init_logs();
    let nats = Nats::start();
    let relay = jwt_config(&nats).start().await;
    let mut ws = connect(relay.client_addr, &token(claims("a"))).await;
    assert_eq!(subscribe(&mut ws, 1, "orders.1").await["type"], "ok");
    assert_eq!(subscribe(&mut ws, 2, "o.1").await["type"], "ok");
    let nc = nats.client().await;
    nc.publish("orders.1", "m1".into()).await.unwrap();
    nc.flush().await.unwrap();
    let got = messages_then_quiet(&mut ws, 2).await;
    let mut channels: Vec<&str> = got.iter().map(|m| m["channel"].as_str().unwrap()).collect();
    channels.sort_unstable();
    assert_eq!(channels, ["o.1", "orders.1"], "{got:?}");
    let r = request(
        &mut ws,
        json!({"type": "unsubscribe", "id": 3, "channel": "o.1"}),
    )
    .await;
    assert_eq!(r["type"], "ok");
    nc.publish("orders.1", "m2".into()).await.unwrap();
    nc.flush().await.unwrap();
    let got = messages_then_quiet(&mut ws, 1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["channel"], "orders.1");
    assert_eq!(got[0]["text"], "m2");
    relay.drain().await;
}

/// Defect 6: a long claim cannot push a SUB past NATS's control-line limit (which would
/// take down the relay's whole NATS connection): the subscribe is refused with 422.
#[tokio::test]
async fn an_overlong_subject_is_refused_and_nats_stays_up() {
    init_logs();
    let nats = Nats::start();
    let relay = jwt_config(&nats).start().await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    let long = "x".repeat(5_000);
    let mut ws = connect(addr, &token(claims(&long))).await;
    let r = subscribe(&mut ws, 1, "me").await;
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["code"], 422, "{r}");
    // The relay's NATS connection was never disturbed: another subscription works.
    assert_eq!(subscribe(&mut ws, 2, "news").await["type"], "ok");
    let nc = nats.client().await;
    nc.publish("public.news", "hi".into()).await.unwrap();
    nc.flush().await.unwrap();
    let got = messages_then_quiet(&mut ws, 1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        metric(admin, "wsrelay_nats_disconnects_total").await,
        Some(0.0)
    );
    relay.drain().await;
}

fn write_temp(name: &str, content: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wsrelay-hardening-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

/// Defect 4: a subscription NATS refuses (here: the relay's NATS user may not subscribe to
/// `private.>`) is not answered `ok` and left dead: the client hears 503 (or, if the refusal
/// arrives after the `ok`, an `unsubscribed` notice), the hub entry is removed, and a later
/// subscriber is not joined to a dead entry.
#[tokio::test]
async fn a_subscription_nats_refuses_is_reported_and_removed() {
    init_logs();
    let conf = write_temp(
        "nats.conf",
        r#"authorization {
  users = [
    { user: relay, password: relaypw, permissions: { subscribe: { allow: [">"], deny: ["private.>"] } } }
    { user: test, password: testpw }
  ]
}
"#,
    );
    let nats = Nats::start_args(&["-c", conf.to_str().unwrap()]);
    let relay = TestRelay::builder(&format!("nats://127.0.0.1:{}", nats.port))
        .binding("private.{id}", "private.{id}", Direction::Subscribe)
        .binding("public.{id}", "public.{id}", Direction::Subscribe)
        .config(|c| {
            c.nats.credentials.user_file = Some(write_temp("user", "relay"));
            c.nats.credentials.password_file = Some(write_temp("password", "relaypw"));
        })
        .start()
        .await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    let nc = async_nats::ConnectOptions::with_user_and_password("test".into(), "testpw".into())
        .connect(nats.url())
        .await
        .unwrap();

    for round in 0..2 {
        let mut ws = connect(addr, "").await;
        let r = subscribe(&mut ws, 1, "private.x").await;
        if r["type"] == "ok" {
            // Refused after the round trip that confirmed the SUB: the notice follows.
            let n = next_json(&mut ws).await.expect("an unsubscribed notice");
            assert_eq!(n["type"], "unsubscribed", "round {round}: {n}");
            assert_eq!(n["channel"], "private.x", "round {round}: {n}");
        } else {
            assert_eq!(r["code"], 503, "round {round}: {r}");
        }
        assert!(
            eventually(Duration::from_secs(20), || async {
                metric(admin, "wsrelay_nats_subscriptions ").await == Some(0.0)
            })
            .await,
            "round {round}: the refused subject's hub entry is still there"
        );
        // The connection still works, and knows it is not subscribed to the refused channel.
        assert_eq!(subscribe(&mut ws, 2, "public.y").await["type"], "ok");
        let r = request(
            &mut ws,
            json!({"type": "unsubscribe", "id": 3, "channel": "private.x"}),
        )
        .await;
        assert_eq!(r["code"], 404, "round {round}: {r}");
        nc.publish("public.y", "ok".into()).await.unwrap();
        nc.flush().await.unwrap();
        let got = messages_then_quiet(&mut ws, 1).await;
        assert_eq!(got.len(), 1, "round {round}: {got:?}");
    }
    relay.drain().await;
}

/// Defect 8: lowering and then raising `maxConnections` by reload must not inflate the limit.
#[tokio::test]
async fn max_connections_survives_lowering_and_raising() {
    init_logs();
    let nats = Nats::start();
    let mut c = TestRelay::builder(&nats).max_connections(3).build();
    let relay = TestRelay::start(c.clone()).await;
    let addr = relay.client_addr;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(connect(addr, "").await);
    }
    let path = write_temp("relay.json", "");
    for max in [1, 3] {
        c.limits.max_connections = max;
        std::fs::write(&path, serde_json::to_string(&c).unwrap()).unwrap();
        relay.reload(&path).unwrap();
    }
    // Three are open and the limit is three: a fourth is refused.
    assert_eq!(connect_with(addr, "", &[]).await.err(), Some(503));
    drop(open.pop());
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(relay.admin_addr, "wsrelay_connections ").await == Some(2.0)
        })
        .await
    );
    let again = connect_with(addr, "", &[]).await;
    assert!(again.is_ok(), "a freed slot is usable");
    assert_eq!(connect_with(addr, "", &[]).await.err(), Some(503));
    relay.drain().await;
}

/// A receive-only client under a steady flood still gets the relay's pings. Without pings it
/// sends nothing (its pongs answer them) and the idle timeout would close it mid-stream. The
/// writer looks at its queue before its ping timer, so a queue that is ready on every turn
/// would starve the timer; the ping then rides with a batch. (Here the writer still goes idle
/// between bursts now and then, so this guards the property rather than that path alone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_only_client_under_a_flood_keeps_getting_pings() {
    init_logs();
    let nats = Nats::start();
    let relay = jwt_config(&nats)
        .slow_consumer_policy(SlowConsumerPolicy::DropOldest)
        .send_queue_len(64)
        .config(|c| {
            // Idle timeout 5 s, pings every second: pings starved for the flood's 10 s close the
            // client mid-flood, while an answering client has 4 s for a pong to be read (a loaded
            // machine can stall this process for seconds).
            c.limits.ping_interval_seconds = 1;
            c.limits.idle_timeout_seconds = 5;
        })
        .start()
        .await;
    let mut ws = connect(relay.client_addr, &token(claims("alice"))).await;
    assert_eq!(subscribe(&mut ws, 1, "news").await["type"], "ok");

    // Bounded: 10 s of publishing, in bursts that keep the writer's queue non-empty.
    let nc = nats.client().await;
    let flood = tokio::spawn(async move {
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < until {
            for _ in 0..200 {
                nc.publish("public.news", r#"{"n":1}"#.into())
                    .await
                    .unwrap();
            }
            nc.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
    });
    let (mut pings, mut messages, mut closed) = (0u32, 0u64, None);
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < until {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(Message::Text(_)))) => messages += 1,
            Ok(Some(Ok(Message::Close(f)))) => {
                closed = Some(f.map(|f| u16::from(f.code)));
                break;
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => panic!("read failed after {messages} messages: {e}"),
            Ok(None) => {
                closed = Some(None);
                break;
            }
            Err(_) => panic!("nothing for 10 s in a flood ({messages} messages so far)"),
        }
    }
    flood.await.unwrap();
    assert_eq!(
        closed, None,
        "closed mid-flood after {messages} messages, {pings} pings"
    );
    eprintln!("{messages} messages, {pings} pings");
    assert!(messages > 1000, "{messages} messages");
    assert!(
        pings >= 3,
        "{pings} pings in 10 s at a 1 s interval ({messages} messages)"
    );
    // Still connected and answering, once what the flood left queued is read.
    drain_messages(&mut ws, Duration::from_millis(500)).await;
    assert_eq!(
        request(&mut ws, json!({"type":"ping","id":9})).await["type"],
        "pong"
    );
    relay.drain().await;
}
