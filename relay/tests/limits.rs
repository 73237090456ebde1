//! The limits a public endpoint needs (issue "Relay hardening"), each against a real relay
//! and a real nats-server: send-queue bytes per connection and per process, connections per
//! client address (with and without a trusted proxy) and per token subject, handshakes in
//! flight, one rate limit over subscribe/unsubscribe/publish, the JWKS cache (background
//! refresh, key filtering, https only) and the drain delay.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use wsrelay::config::{Config, Direction, JwtAlgorithm, JwtKey, SlowConsumerPolicy};
use wsrelay_testkit::prelude::*;

/// A reader that counts message frames of a client in the background.
fn count_messages(mut ws: Ws) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<Ws>) {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let task = tokio::spawn(async move {
        while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            if let Message::Text(t) = m
                && t.as_str().contains("\"type\":\"message\"")
            {
                n2.fetch_add(1, Ordering::SeqCst);
            }
        }
        ws
    });
    (n, task)
}

/// No idle timeout or ping within a test's time.
fn quiet_config(nats: &Nats) -> RelayBuilder {
    TestRelay::builder(nats).config(|c| {
        c.limits.idle_timeout_seconds = 120;
        c.limits.ping_interval_seconds = 60;
    })
}

/// Publishes `total` messages of 8 KiB on `subject`, in batches paced by `good` (the client
/// that keeps up): 16 MiB for 2,000, more than loopback socket buffers hold for clients that
/// do not read.
async fn publish_paced(nc: &async_nats::Client, subject: &str, total: usize, good: &AtomicUsize) {
    let payload = bytes::Bytes::from(vec![b'x'; 8 * 1024]);
    for batch in 0..total / 25 {
        for _ in 0..25 {
            nc.publish(subject.to_owned(), payload.clone())
                .await
                .unwrap();
        }
        nc.flush().await.unwrap();
        let want = (batch + 1) * 25;
        assert!(
            eventually(Duration::from_secs(20), || async {
                good.load(Ordering::SeqCst) >= want
            })
            .await,
            "the client that keeps up stalled at {} of {want}",
            good.load(Ordering::SeqCst)
        );
    }
}

/// The stream of a client that did not read ends: a 4008 close if the frame fit in the
/// socket, else the connection is simply gone.
async fn assert_ended_slow(ws: &mut Ws) {
    let end = loop {
        match next_event(ws, Duration::from_secs(30)).await {
            Got::Json(_) => {}
            Got::Closed(code) => break code,
            Got::Timeout => panic!("the slow client's stream did not end"),
        }
    };
    assert!(end.is_none() || end == Some(4008), "{end:?}");
}

#[tokio::test]
async fn send_queue_bytes_disconnect_a_slow_reader_before_the_message_count() {
    init_logs();
    let nats = Nats::start();
    let relay = quiet_config(&nats)
        .send_queue_len(10_000)
        .slow_consumer_policy(SlowConsumerPolicy::Disconnect)
        .config(|c| {
            // The count limit (10,000 x 8 KiB = 80 MiB) is never reached; the byte limit is.
            // Above what the paced publisher queues to the client that keeps up (25 x 8 KiB).
            c.limits.send_queue_bytes = 512 * 1024;
        })
        .start()
        .await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    let nc = nats.client().await;
    let mut slow = connect(addr, "").await;
    assert_eq!(subscribe(&mut slow, 1, "public.t").await["type"], "ok");
    let mut good = connect(addr, "").await;
    assert_eq!(subscribe(&mut good, 1, "public.t").await["type"], "ok");
    let (good_count, good_task) = count_messages(good);

    publish_paced(&nc, "public.t", 2_000, &good_count).await;
    assert_eq!(good_count.load(Ordering::SeqCst), 2_000);
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(admin, "wsrelay_connections ").await == Some(1.0)
        })
        .await,
        "the slow reader was not disconnected"
    );
    let hits = |limit: &'static str| async move {
        metric(
            admin,
            &format!("wsrelay_send_queue_limit_hits_total{{limit=\"{limit}\"}}"),
        )
        .await
        .unwrap_or(0.0)
    };
    assert_eq!(
        hits("bytes").await,
        1.0,
        "one connection met the byte limit"
    );
    assert_eq!(hits("messages").await, 0.0);
    assert_eq!(
        metric(admin, "wsrelay_slow_consumers_total").await,
        Some(1.0)
    );
    assert_ended_slow(&mut slow).await;
    // Nothing is left queued once the good client has read everything.
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(admin, "wsrelay_queued_bytes ").await == Some(0.0)
        })
        .await,
        "queued bytes do not return to 0"
    );
    good_task.abort();
    relay.drain().await;
}

#[tokio::test]
async fn process_budget_punishes_the_backlogged_not_the_client_keeping_up() {
    init_logs();
    let nats = Nats::start();
    let relay = quiet_config(&nats)
        .send_queue_len(10_000)
        .config(|c| {
            // Each connection could queue 1 MiB; the process only 1 MiB for all.
            c.limits.send_queue_bytes = 1024 * 1024;
            c.limits.max_queued_bytes = 1024 * 1024;
        })
        .start()
        .await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    let nc = nats.client().await;
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut ws = connect(addr, "").await;
        assert_eq!(subscribe(&mut ws, 1, "public.t").await["type"], "ok");
        slow.push(ws);
    }
    let mut good = connect(addr, "").await;
    assert_eq!(subscribe(&mut good, 1, "public.t").await["type"], "ok");
    let (good_count, good_task) = count_messages(good);

    publish_paced(&nc, "public.t", 2_000, &good_count).await;
    assert_eq!(
        good_count.load(Ordering::SeqCst),
        2_000,
        "the client that keeps up got every message"
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(admin, "wsrelay_connections ").await == Some(1.0)
        })
        .await,
        "the two slow readers were not disconnected"
    );
    let process_hits = metric(
        admin,
        "wsrelay_send_queue_limit_hits_total{limit=\"process_bytes\"}",
    )
    .await
    .unwrap_or(0.0);
    assert!(process_hits >= 1.0, "the process budget was never met");
    assert_eq!(
        metric(admin, "wsrelay_slow_consumers_total").await,
        Some(2.0)
    );
    for ws in &mut slow {
        assert_ended_slow(ws).await;
    }
    good_task.abort();
    relay.drain().await;
}

#[tokio::test]
async fn drop_oldest_under_the_byte_limit_counts_every_message() {
    init_logs();
    let nats = Nats::start();
    let relay = quiet_config(&nats)
        .send_queue_len(10_000)
        .slow_consumer_policy(SlowConsumerPolicy::DropOldest)
        .config(|c| {
            c.limits.send_queue_bytes = 512 * 1024;
        })
        .start()
        .await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    let nc = nats.client().await;
    let mut slow = connect(addr, "").await;
    assert_eq!(subscribe(&mut slow, 1, "public.t").await["type"], "ok");
    let mut good = connect(addr, "").await;
    assert_eq!(subscribe(&mut good, 1, "public.t").await["type"], "ok");
    let (good_count, good_task) = count_messages(good);
    let total = 2_000u64;
    publish_paced(&nc, "public.t", total as usize, &good_count).await;
    // Until every message is accounted for (bounded): a quiet period is no proof that
    // nothing more comes on a loaded machine.
    let (mut seen, mut dropped) = (0u64, 0u64);
    while seen + dropped < total {
        match next_event(&mut slow, Duration::from_secs(20)).await {
            Got::Json(v) if v["type"] == "dropped" => dropped += v["count"].as_u64().unwrap(),
            Got::Json(v) if v["type"] == "message" => seen += 1,
            Got::Json(_) => {}
            Got::Closed(c) => panic!("closed {c:?}"),
            Got::Timeout => break,
        }
    }
    assert!(dropped > 0, "nothing dropped");
    assert_eq!(seen + dropped, total, "every message delivered or counted");
    assert_eq!(
        metric(
            admin,
            "wsrelay_messages_dropped_total{reason=\"slow_consumer_drop_oldest\"}"
        )
        .await,
        Some(dropped as f64),
        "the metric counts each dropped message once"
    );
    good_task.abort();
    relay.drain().await;
}

fn status_and_retry(head: &str) -> (u16, Option<u64>) {
    let status = head[9..12].parse().unwrap();
    let retry = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("retry-after: ")
                .or(l.strip_prefix("Retry-After: "))
        })
        .and_then(|v| v.trim().parse().ok());
    (status, retry)
}

#[tokio::test]
async fn connections_per_client_address_with_and_without_a_trusted_proxy() {
    init_logs();
    let nats = Nats::start();
    let c = quiet_config(&nats)
        .config(|c| {
            c.limits.max_connections_per_ip = 2;
            c.listen.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        })
        .build();
    let relay = TestRelay::start(c.clone()).await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    let xff = |ip: &str| format!("X-Forwarded-For: 198.51.100.1, {ip}\r\n");
    let a1 = connect_with(
        addr,
        "",
        &[("x-forwarded-for", "198.51.100.1, 203.0.113.5")],
    )
    .await
    .unwrap();
    let a2 = connect_with(addr, "", &[("x-forwarded-for", "203.0.113.5")])
        .await
        .unwrap();
    let head = raw_upgrade(addr, &xff("203.0.113.5")).await;
    assert_eq!(status_and_retry(&head), (429, Some(5)), "{head}");
    // Another address behind the same proxy is served; the client-written left part of the
    // header does not matter.
    let b = connect_with(addr, "", &[("x-forwarded-for", "203.0.113.5, 203.0.113.6")])
        .await
        .unwrap();
    assert_eq!(
        metric(
            admin,
            "wsrelay_connections_refused_total{reason=\"per_ip\"}"
        )
        .await,
        Some(1.0)
    );
    // A closed connection frees its address's slot.
    drop(a1);
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(admin, "wsrelay_connections ").await == Some(2.0)
        })
        .await
    );
    let a3 = connect_with(addr, "", &[("x-forwarded-for", "203.0.113.5")])
        .await
        .unwrap();
    drop((a2, a3, b));
    relay.drain().await;

    // Without a trusted proxy the header is ignored: every client is 127.0.0.1.
    let mut c2 = c;
    c2.listen.trusted_proxies.clear();
    let relay = TestRelay::start(c2).await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    let x = connect_with(addr, "", &[("x-forwarded-for", "203.0.113.7")])
        .await
        .unwrap();
    let y = connect_with(addr, "", &[("x-forwarded-for", "203.0.113.8")])
        .await
        .unwrap();
    let head = raw_upgrade(addr, &xff("203.0.113.9")).await;
    assert_eq!(status_and_retry(&head).0, 429, "{head}");
    assert_eq!(
        metric(
            admin,
            "wsrelay_connections_refused_total{reason=\"per_ip\"}"
        )
        .await,
        Some(1.0)
    );
    drop((x, y));
    relay.drain().await;
}

#[tokio::test]
async fn connections_per_token_subject() {
    init_logs();
    let nats = Nats::start();
    let relay = quiet_config(&nats)
        .hs256()
        .config(|c| {
            c.limits.max_connections_per_subject = 2;
        })
        .start()
        .await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    let alice = format!("?token={}", hs256(claims("alice")));
    let a1 = connect(addr, &alice).await;
    let a2 = connect(addr, &alice).await;
    // A new token for the same subject does not help.
    let again = format!("?token={}", hs256(claims("alice")));
    assert_eq!(connect_with(addr, &again, &[]).await.err(), Some(429));
    let head = raw_upgrade(
        addr,
        &format!("Authorization: Bearer {}\r\n", hs256(claims("alice"))),
    )
    .await;
    assert_eq!(status_and_retry(&head), (429, Some(5)), "{head}");
    let bob = connect(addr, &format!("?token={}", hs256(claims("bob")))).await;
    assert_eq!(
        metric(
            admin,
            "wsrelay_connections_refused_total{reason=\"per_subject\"}"
        )
        .await,
        Some(2.0)
    );
    drop(a1);
    assert!(
        eventually(Duration::from_secs(20), || async {
            connect_with(addr, &alice, &[]).await.is_ok()
        })
        .await,
        "a closed connection frees its subject's slot"
    );
    drop((a2, bob));
    relay.drain().await;
}

#[tokio::test]
async fn handshakes_in_flight_are_capped() {
    init_logs();
    let nats = Nats::start();
    let relay = quiet_config(&nats)
        .config(|c| {
            c.limits.max_handshakes_in_flight = 3;
            c.limits.max_handshakes_in_flight_per_ip = Some(10);
            c.limits.handshake_timeout_seconds = 30;
        })
        .start()
        .await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    // Three clients that start their request and stall hold every handshake slot (a connect
    // that sends nothing holds none: `audit.rs`, item 8).
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /ws HTTP/1.1\r\n").await.unwrap();
        stalled.push(s);
    }
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(admin, "wsrelay_handshakes_in_flight ").await == Some(3.0)
        })
        .await
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("Retry-After: 1"), "{text}");
    assert_eq!(
        metric(
            admin,
            "wsrelay_connections_refused_total{reason=\"handshakes\"}"
        )
        .await,
        Some(1.0)
    );
    // A stalled client that leaves gives its slot back.
    drop(stalled.pop());
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(admin, "wsrelay_handshakes_in_flight ").await == Some(2.0)
        })
        .await
    );
    let mut ws = connect(addr, "").await;
    assert_eq!(
        request(&mut ws, json!({"type":"ping","id":1})).await["type"],
        "pong"
    );
    for mut s in stalled {
        let _ = s.shutdown().await;
    }
    relay.drain().await;
}

/// What a burst of requests got.
#[derive(Debug, Default)]
struct Fired {
    ok: u32,
    /// `error` 429.
    limited: u32,
    /// Other errors (the request passed the rate limit and was refused for another reason).
    other: u32,
    close: Option<u16>,
}

/// Sends requests without waiting, then reads until the connection closes (bounded).
async fn fire(ws: &mut Ws, reqs: Vec<serde_json::Value>) -> Fired {
    for r in reqs {
        if ws.send(Message::text(r.to_string())).await.is_err() {
            break;
        }
    }
    let mut f = Fired::default();
    loop {
        match next_event(ws, Duration::from_secs(10)).await {
            Got::Json(v) if v["type"] == "ok" => f.ok += 1,
            Got::Json(v) if v["type"] == "error" && v["code"] == 429 => f.limited += 1,
            Got::Json(v) if v["type"] == "error" => f.other += 1,
            Got::Json(_) => {}
            Got::Closed(c) => {
                f.close = c;
                return f;
            }
            Got::Timeout => return f,
        }
    }
}

#[tokio::test]
async fn one_rate_limit_over_subscribe_unsubscribe_and_publish() {
    init_logs();
    let nats = Nats::start();
    let relay = quiet_config(&nats)
        .config(|c| {
            c.limits.publish_rate_per_second = 5;
            c.limits.publish_burst = 5;
            c.limits.max_subscriptions_per_connection = 10;
            c.bindings = vec![
                binding("public.{topic}", "public.{topic}", Direction::Both),
                binding("news", "public.news", Direction::Both),
            ];
        })
        .start()
        .await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);

    // A reconnecting client subscribes again to all it had (10) at once: not limited.
    let mut ws = connect(addr, "").await;
    for i in 0..10u64 {
        let r = subscribe(&mut ws, i, &format!("public.s{i}")).await;
        assert_eq!(r["type"], "ok", "{r}");
    }
    // Then subscription churn (unsubscribe, subscribe) is limited like publishes.
    let mut churn = Vec::new();
    for i in 0..40u64 {
        let ch = format!("public.s{}", (i / 2) % 10);
        let ty = if i % 2 == 0 {
            "unsubscribe"
        } else {
            "subscribe"
        };
        churn.push(json!({"type": ty, "id": 100 + i, "channel": ch}));
    }
    let f = fire(&mut ws, churn).await;
    assert_eq!(f.close, Some(4029), "{f:?}");
    // The burst (5) passes, plus what the rate refills while the frames arrive.
    assert!((5..=12).contains(&(f.ok + f.other)), "{f:?}");
    assert!(f.limited >= 9, "{f:?}");

    // A flood of subscribes to distinct subjects: each refusal costs NATS nothing.
    let mut ws = connect(addr, "").await;
    let flood = (0..200u64)
        .map(|i| json!({"type":"subscribe","id":i,"channel":format!("public.f{i}")}))
        .collect();
    let f = fire(&mut ws, flood).await;
    assert_eq!(f.close, Some(4029), "{f:?}");
    // 10 free subscribes, then the burst of 5 (+ refills) passes the rate limit and meets
    // maxSubscriptionsPerConnection (430); 2 x burst refusals in a row close: the 10th.
    assert_eq!(f.ok, 10, "{f:?}");
    assert!((5..=12).contains(&f.other), "{f:?}");
    assert!(f.limited >= 9, "{f:?}");
    assert!(f.ok + f.other + f.limited < 200, "{f:?}");
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(admin, "wsrelay_nats_subscriptions ").await == Some(0.0)
        })
        .await,
        "the subscriptions are gone with their connections"
    );

    // Mixed: publishes and subscribes draw on the same limit.
    let mut ws = connect(addr, "").await;
    let r = subscribe(&mut ws, 1, "news").await;
    assert_eq!(r["type"], "ok");
    let mixed = (0..40u64)
        .map(|i| {
            if i % 2 == 0 {
                json!({"type":"publish","id":i,"channel":"news","text":"m"})
            } else {
                json!({"type":"unsubscribe","id":i,"channel":"public.nothing"})
            }
        })
        .collect();
    let f = fire(&mut ws, mixed).await;
    assert_eq!(f.close, Some(4029), "{f:?}");
    assert!(f.limited >= 9, "{f:?}");
    for op in ["subscribe", "unsubscribe", "publish"] {
        let n = metric(
            admin,
            &format!("wsrelay_requests_rate_limited_total{{op=\"{op}\"}}"),
        )
        .await
        .unwrap_or(0.0);
        assert!(n >= 1.0, "{op}: {n}");
    }
    relay.drain().await;
}

fn rs_token(kid: &str) -> String {
    rs256(&claims("r"), Some(kid))
}

/// A JWKS endpoint on loopback that counts fetches, and fetches that ended (answered, or
/// abandoned by the relay), and waits `delay_ms` before answering every fetch after the first.
async fn jwks_server(
    body: String,
    delay_ms: Arc<AtomicUsize>,
) -> (
    std::net::SocketAddr,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    /// Counts a fetch as ended when its handler's future is dropped: answered or abandoned.
    struct Ended(Arc<AtomicUsize>);
    impl Drop for Ended {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let hits = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(AtomicUsize::new(0));
    let (h2, e2) = (hits.clone(), ended.clone());
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let n = h2.fetch_add(1, Ordering::SeqCst);
            let body = body.clone();
            let delay = delay_ms.load(Ordering::SeqCst) as u64;
            let ended = Ended(e2.clone());
            async move {
                let _ended = ended;
                if n > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                body
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, hits, ended, task)
}

/// RS256 tokens, their keys from a JWKS at `url`.
fn jwks_config(nats: &Nats, url: String, cache_seconds: u64) -> RelayBuilder {
    quiet_config(nats).jwt_with(
        JwtAlgorithm::RS256,
        JwtKey {
            jwks_url: Some(url),
            jwks_cache_seconds: cache_seconds,
            jwks_min_refresh_seconds: 1,
            jwks_allow_http: true,
            ..JwtKey::default()
        },
    )
}

#[tokio::test]
async fn jwks_stale_keys_serve_handshakes_while_one_background_refresh_runs() {
    init_logs();
    let nats = Nats::start();
    let jwks = std::fs::read_to_string(fixture("jwks.json")).unwrap();
    // A refresh the endpoint never answers: the relay gives up on it after its own fetch
    // timeout (5 s). Handshakes served from the stale set complete while it is still open.
    let delay = Arc::new(AtomicUsize::new(600_000));
    let (jwks_addr, hits, ended, server) = jwks_server(jwks, delay).await;
    let relay = jwks_config(&nats, format!("http://{jwks_addr}/jwks.json"), 1)
        .start()
        .await;
    let addr = relay.client_addr;
    let token = format!("?token={}", rs_token("test-rsa"));
    assert!(connect_with(addr, &token, &[]).await.is_ok());
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // The set is now stale (1 s); its refresh does not end before the relay's fetch timeout.
    // Handshakes meanwhile are served from the stale set at once, and start one refresh
    // between them, not one each.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // The handshake that starts the refresh is served before the refresh ends (an ordering,
    // not a clock: one that waited for it would complete only after the fetch ended).
    assert!(connect_with(addr, &token, &[]).await.is_ok());
    assert_eq!(
        ended.load(Ordering::SeqCst),
        1,
        "the handshake waited for the refresh to end"
    );
    for _ in 0..4 {
        assert!(connect_with(addr, &token, &[]).await.is_ok());
    }
    assert!(
        eventually(Duration::from_secs(20), || async {
            hits.load(Ordering::SeqCst) == 2
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(hits.load(Ordering::SeqCst), 2, "one background refresh");
    relay.drain().await;
    server.abort();
}

#[tokio::test]
async fn jwks_keys_are_filtered_by_use_kty_and_alg() {
    init_logs();
    let nats = Nats::start();
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("jwks.json")).unwrap()).unwrap();
    let good = base["keys"][0].clone();
    let with = |kid: &str, field: &str, value: serde_json::Value| {
        let mut k = good.clone();
        k["kid"] = json!(kid);
        k[field] = value;
        k
    };
    let set = json!({"keys": [
        good,
        with("enc", "use", json!("enc")),
        with("rs512", "alg", json!("RS512")),
        with("ops", "key_ops", json!(["encrypt"])),
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
    ]});
    let (jwks_addr, _hits, _ended, server) =
        jwks_server(set.to_string(), Arc::new(AtomicUsize::new(0))).await;
    let relay = jwks_config(&nats, format!("http://{jwks_addr}/jwks.json"), 300)
        .start()
        .await;
    let addr = relay.client_addr;
    assert!(
        connect_with(addr, &format!("?token={}", rs_token("test-rsa")), &[])
            .await
            .is_ok()
    );
    for kid in ["enc", "rs512", "ops"] {
        assert_eq!(
            connect_with(addr, &format!("?token={}", rs_token(kid)), &[])
                .await
                .err(),
            Some(401),
            "{kid}"
        );
    }
    // An HS256 token signed with the JWKS's symmetric key: refused (no oct keys, and HS256
    // is not configured).
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some("hmac".into());
    let t = jsonwebtoken::encode(
        &h,
        &claims("h"),
        &jsonwebtoken::EncodingKey::from_secret(b"secret"),
    )
    .unwrap();
    assert_eq!(
        connect_with(addr, &format!("?token={t}"), &[]).await.err(),
        Some(401)
    );
    relay.drain().await;
    server.abort();

    // http needs the flag.
    let mut c = jwks_config(&nats, "http://127.0.0.1:1/jwks.json".into(), 300).unvalidated();
    c.auth.jwt.as_mut().unwrap().key.jwks_allow_http = false;
    let errs = c.validate().unwrap_err();
    assert!(
        errs.0
            .iter()
            .any(|e| e.field() == "auth.jwt.key.jwksUrl" && e.to_string().contains("jwksAllowHttp")),
        "{errs}"
    );
}

#[tokio::test]
async fn drain_waits_before_the_first_close() {
    init_logs();
    let nats = Nats::start();
    let relay = quiet_config(&nats)
        .config(|c| {
            // A delay long enough that two loaded cores cannot run through it before this test has
            // looked at the relay (the checks below are ordered against the drain notice, not timed).
            c.drain.grace_period_seconds = 8;
            c.drain.delay_before_close_seconds = 5;
        })
        .start()
        .await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    let mut ws = connect(addr, "").await;
    let t0 = Instant::now();
    let drained = tokio::spawn(relay.drain());
    // Not ready, new connections refused, and the open client served as usual: all before
    // that client hears of the drain (the pong is the next frame, not the drain notice).
    assert!(
        eventually(Duration::from_secs(20), || async {
            http_get(admin, "/ready").await.0 == 503
        })
        .await
    );
    assert_eq!(connect_with(addr, "", &[]).await.err(), Some(503));
    send(&mut ws, json!({"type":"ping","id":1})).await;
    let pong = next_json(&mut ws).await.expect("a reply");
    assert_eq!(
        pong,
        json!({"type":"pong","id":1}),
        "served before the drain notice"
    );
    // The open client is left alone for the delay, then told and closed.
    let drain = next_json(&mut ws).await.expect("drain frame");
    let at = t0.elapsed();
    assert_eq!(drain["type"], "drain", "{drain}");
    // A lower bound: a loaded machine only makes it later.
    assert!(
        at >= Duration::from_millis(4_900),
        "drain notice after {at:?}"
    );
    let turn = drain["reconnectAfterMs"].as_u64().unwrap();
    assert!(
        turn < 3_000 * 7 / 10,
        "turn {turn} ms within 70% of the rest"
    );
    assert_eq!(
        close_code(&mut ws, Duration::from_secs(20)).await,
        Some(1012)
    );
    drained.await.unwrap();
}

#[test]
fn new_limits_are_validated() {
    let base = || {
        let mut c = base_config("nats://127.0.0.1:4222");
        c.auth.allow_anonymous = true;
        c
    };
    let fields = |c: Config| -> Vec<String> {
        c.validate()
            .err()
            .map(|e| e.0.iter().map(|e| e.field().to_owned()).collect())
            .unwrap_or_default()
    };
    assert!(fields(base()).is_empty());
    let mut c = base();
    c.limits.send_queue_bytes = 1024;
    assert_eq!(fields(c), ["limits.sendQueueBytes"]);
    let mut c = base();
    c.limits.max_queued_bytes = c.limits.send_queue_bytes - 1;
    assert_eq!(fields(c), ["limits.maxQueuedBytes"]);
    let mut c = base();
    c.limits.max_handshakes_in_flight = 0;
    assert_eq!(fields(c), ["limits.maxHandshakesInFlight"]);
    let mut c = base();
    c.drain.delay_before_close_seconds = c.drain.grace_period_seconds;
    assert_eq!(fields(c), ["drain.delayBeforeCloseSeconds"]);
    let mut c = base();
    c.listen.client_ip_header = "X Forwarded".into();
    assert_eq!(fields(c), ["listen.clientIpHeader"]);
    // CIDRs parse from YAML; garbage does not.
    let yaml = "nats: {urls: [nats://n:4222]}\nauth: {allowAnonymous: true}\nlisten: {trustedProxies: [10.0.0.0/8, 2001:db8::/32, 192.0.2.7/32]}\n";
    let c = Config::from_yaml_str(yaml).unwrap();
    assert_eq!(c.listen.trusted_proxies.len(), 3);
    let bad = yaml.replace("10.0.0.0/8", "10.0.0.0/33");
    assert!(Config::from_yaml_str(&bad).is_err());
}
