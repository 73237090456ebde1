//! Refusals before the upgrade (bad/expired token, wrong audience or issuer, wrong Origin,
//! too many connections) and the documented answers to abuse after it (oversize frame,
//! publish flood, slow reader, idle client, stalled handshake), with other clients served.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use wsrelay_testkit::prelude::*;

/// Tokens only (HS256), from every source; one allowed origin.
fn hs_config(nats: &Nats) -> RelayBuilder {
    TestRelay::builder(nats)
        .anonymous(false)
        .origin("https://app.test")
        .token_sources(vec![
            TokenSource::Query {
                name: "token".into(),
            },
            TokenSource::AuthorizationHeader {},
            TokenSource::Subprotocol {},
            TokenSource::Cookie {
                name: "session".into(),
            },
        ])
        .hs256()
        .binding("news", "public.news", Direction::Both)
}

fn status_of(head: &str) -> u16 {
    head[9..12].parse().unwrap()
}

#[tokio::test]
async fn bad_tokens_and_origins_are_refused_before_the_upgrade() {
    init_logs();
    let nats = Nats::start();
    let relay = hs_config(&nats).start().await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    let now = now_secs();
    let base = claims("alice");
    let with = |k: &str, v: serde_json::Value| {
        let mut c = base.clone();
        c[k] = v;
        c
    };
    let other_secret = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &base,
        &jsonwebtoken::EncodingKey::from_secret(b"not the secret"),
    )
    .unwrap();
    type Case<'a> = (&'a str, String, Vec<(&'a str, String)>, u16);
    let cases: Vec<Case<'_>> = vec![
        ("no token", String::new(), vec![], 401),
        ("garbage", "?token=garbage".into(), vec![], 401),
        ("wrong key", format!("?token={other_secret}"), vec![], 401),
        (
            "expired",
            format!("?token={}", hs256(with("exp", json!(now - 60)))),
            vec![],
            401,
        ),
        (
            "not yet valid",
            format!("?token={}", hs256(with("nbf", json!(now + 600)))),
            vec![],
            401,
        ),
        (
            "wrong audience",
            format!("?token={}", hs256(with("aud", json!("other")))),
            vec![],
            401,
        ),
        (
            "wrong issuer",
            format!("?token={}", hs256(with("iss", json!("https://evil.test")))),
            vec![],
            401,
        ),
        (
            "no exp",
            format!(
                "?token={}",
                hs256(json!({"sub":"a","iss":"https://issuer.test","aud":"wsrelay"}))
            ),
            vec![],
            401,
        ),
        (
            "wrong origin",
            format!("?token={}", hs256(base.clone())),
            vec![("Origin", "https://evil.test".into())],
            403,
        ),
    ];
    for (name, query, headers, want) in &cases {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let got = connect_with(addr, query, &h).await;
        assert_eq!(got.err(), Some(*want), "{name}");
    }
    // The raw exchange shows no 101 and no upgrade header.
    let head = raw_upgrade(addr, "Authorization: Bearer nope\r\n").await;
    assert_eq!(status_of(&head), 401, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert!(
        !head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );

    // Each token source works.
    let token = hs256(base.clone());
    let ok_cases: Vec<(String, Vec<(&str, String)>)> = vec![
        (
            format!("?token={token}"),
            vec![("Origin", "https://app.test".into())],
        ),
        (
            String::new(),
            vec![("Authorization", format!("Bearer {token}"))],
        ),
        (
            String::new(),
            vec![("Cookie", format!("a=b; session={token}"))],
        ),
    ];
    for (query, headers) in &ok_cases {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut ws = connect_with(addr, query, &h).await.expect("accepted");
        assert_eq!(next_json(&mut ws).await.unwrap()["type"], "welcome");
    }
    // Sec-WebSocket-Protocol: the relay answers wsrelay.v1, never the token.
    let head = raw_upgrade(
        addr,
        &format!("Sec-WebSocket-Protocol: wsrelay.v1, bearer.{token}\r\n"),
    )
    .await;
    assert_eq!(status_of(&head), 101, "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains("sec-websocket-protocol: wsrelay.v1"),
        "{head}"
    );
    assert!(!head.contains(&token), "{head}");
    // A bearer subprotocol without wsrelay.v1 is refused (a browser would fail anyway).
    let head = raw_upgrade(addr, &format!("Sec-WebSocket-Protocol: bearer.{token}\r\n")).await;
    assert_eq!(status_of(&head), 400, "{head}");

    // A token is good until its `exp`: then the connection is closed with 1008.
    // `now` was read before the cases above, which a loaded machine may have taken seconds
    // over: the expiry counts from the clock now.
    let mut short = connect(
        addr,
        &format!("?token={}", hs256(with("exp", json!(now_secs() + 2)))),
    )
    .await;
    let (count, task) = count_messages(connect(addr, &format!("?token={token}")).await);
    assert_eq!(
        close_code(&mut short, Duration::from_secs(10)).await,
        Some(1008)
    );
    assert!(!task.is_finished(), "the other client stays");
    assert_eq!(count.load(Ordering::SeqCst), 0);
    task.abort();

    assert!(
        metric(
            admin,
            "wsrelay_connections_refused_total{reason=\"invalid_token\"}"
        )
        .await
        .unwrap()
            >= 7.0
    );
    assert_eq!(
        metric(
            admin,
            "wsrelay_connections_refused_total{reason=\"origin\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            admin,
            "wsrelay_connections_refused_total{reason=\"no_token\"}"
        )
        .await,
        Some(1.0)
    );
    relay.drain().await;
}

/// Serves `app` on a loopback port of its own.
async fn serve(
    app: axum::Router,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (
        addr,
        tokio::spawn(async move { axum::serve(listener, app).await }),
    )
}

/// RS256 tokens, their keys from the JWKS `jwks_addr` serves over plain HTTP.
fn jwks_config(
    nats: &Nats,
    jwks_addr: std::net::SocketAddr,
    min_refresh_seconds: u64,
) -> RelayBuilder {
    hs_config(nats).jwt_with(
        JwtAlgorithm::RS256,
        JwtKey {
            jwks_url: Some(format!("http://{jwks_addr}/jwks.json")),
            jwks_allow_http: true,
            jwks_min_refresh_seconds: min_refresh_seconds,
            ..JwtKey::default()
        },
    )
}

fn rs_token(kid: Option<&str>) -> String {
    rs256(&claims("r"), kid)
}

#[tokio::test]
async fn rs256_es256_from_pem_and_jwks_with_refresh_limits() {
    init_logs();
    let nats = Nats::start();
    let relay = hs_config(&nats)
        .jwt_with(
            JwtAlgorithm::RS256,
            JwtKey {
                public_key_file: Some(fixture("rsa.pub")),
                ..JwtKey::default()
            },
        )
        .start()
        .await;
    assert!(
        connect_with(
            relay.client_addr,
            &format!("?token={}", rs_token(None)),
            &[]
        )
        .await
        .is_ok()
    );
    // An HS256 token is refused by an RS256 relay (no algorithm confusion).
    assert_eq!(
        connect_with(
            relay.client_addr,
            &format!("?token={}", hs256(claims("x"))),
            &[]
        )
        .await
        .err(),
        Some(401)
    );
    relay.drain().await;

    let relay = hs_config(&nats)
        .jwt_with(
            JwtAlgorithm::ES256,
            JwtKey {
                public_key_file: Some(fixture("ec.pub")),
                ..JwtKey::default()
            },
        )
        .start()
        .await;
    let key = std::fs::read(fixture("ec.key")).unwrap();
    let es_token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims("e"),
        &jsonwebtoken::EncodingKey::from_ec_pem(&key).unwrap(),
    )
    .unwrap();
    assert!(
        connect_with(relay.client_addr, &format!("?token={es_token}"), &[])
            .await
            .is_ok()
    );
    assert_eq!(
        connect_with(
            relay.client_addr,
            &format!("?token={}", rs_token(None)),
            &[]
        )
        .await
        .err(),
        Some(401)
    );
    relay.drain().await;

    // JWKS over HTTP, counting fetches.
    let hits = Arc::new(AtomicUsize::new(0));
    let jwks = std::fs::read_to_string(fixture("jwks.json")).unwrap();
    let h2 = hits.clone();
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            h2.fetch_add(1, Ordering::SeqCst);
            let body = jwks.clone();
            async move { body }
        }),
    );
    let (jwks_addr, server) = serve(app).await;
    let relay = jwks_config(&nats, jwks_addr, 30).start().await;
    for _ in 0..3 {
        assert!(
            connect_with(
                relay.client_addr,
                &format!("?token={}", rs_token(Some("test-rsa"))),
                &[]
            )
            .await
            .is_ok()
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1, "keys are cached");
    // Unknown kids: refused, and the refetches they cause are rate-limited.
    for i in 0..5 {
        let t = rs_token(Some(&format!("rotated-{i}")));
        assert_eq!(
            connect_with(relay.client_addr, &format!("?token={t}"), &[])
                .await
                .err(),
            Some(401)
        );
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "unknown kids within minRefresh do not refetch"
    );
    relay.drain().await;
    server.abort();

    // Key rotation: a token with a kid the cached set lacks triggers a refetch (once the
    // minimum refresh interval has passed) and is then accepted.
    let rotated = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hits = Arc::new(AtomicUsize::new(0));
    let jwks = std::fs::read_to_string(fixture("jwks.json")).unwrap();
    let old_set = jwks.replace("test-rsa", "old-key");
    let (r2, h2) = (rotated.clone(), hits.clone());
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            h2.fetch_add(1, Ordering::SeqCst);
            let body = if r2.load(Ordering::SeqCst) {
                jwks.clone()
            } else {
                old_set.clone()
            };
            async move { body }
        }),
    );
    let (jwks_addr, server) = serve(app).await;
    let relay = jwks_config(&nats, jwks_addr, 1).start().await;
    let token = rs_token(Some("test-rsa"));
    assert_eq!(
        connect_with(relay.client_addr, &format!("?token={token}"), &[])
            .await
            .err(),
        Some(401)
    );
    rotated.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(
        connect_with(relay.client_addr, &format!("?token={token}"), &[])
            .await
            .is_ok(),
        "the rotated key was not fetched"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    relay.drain().await;
    server.abort();
}

#[tokio::test]
async fn too_many_connections_get_503_with_retry_after() {
    init_logs();
    let nats = Nats::start();
    let relay = TestRelay::builder(&nats).max_connections(2).start().await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    let a = connect(addr, "").await;
    let _b = connect(addr, "").await;
    let head = raw_upgrade(addr, "").await;
    assert_eq!(status_of(&head), 503, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: "),
        "{head}"
    );
    assert_eq!(connect_with(addr, "", &[]).await.err(), Some(503));
    assert_eq!(
        metric(
            admin,
            "wsrelay_connections_refused_total{reason=\"max_connections\"}"
        )
        .await,
        Some(2.0)
    );
    drop(a);
    assert!(
        eventually(Duration::from_secs(20), || async {
            connect_with(addr, "", &[]).await.is_ok()
        })
        .await,
        "a slot frees when a client leaves"
    );
    relay.drain().await;
}

/// Storm control: a burst of handshakes at once gets exactly `acceptBurst` admitted and the
/// rest 503 with `Retry-After`, counted as `accept_rate`; the bucket refills at the rate. With
/// `auth.refuseAfterUpgrade` the refusal is a 4503 with a fixed reason, on the WebSocket and
/// on the event stream.
#[tokio::test]
async fn a_handshake_storm_gets_the_burst_then_503_with_retry_after() {
    init_logs();
    let nats = Nats::start();
    const BURST: u32 = 5;
    const STORM: usize = 12;
    let relay = TestRelay::builder(&nats)
        .config(|c| {
            c.limits.accept_rate_per_second = 1;
            c.limits.accept_burst = Some(BURST);
        })
        .start()
        .await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    let started = std::time::Instant::now();
    let heads = futures::future::join_all((0..STORM).map(|_| raw_upgrade(addr, ""))).await;
    let elapsed = started.elapsed();
    let admitted = heads.iter().filter(|h| status_of(h) == 101).count();
    let refused: Vec<&String> = heads.iter().filter(|h| status_of(h) == 503).collect();
    assert_eq!(admitted + refused.len(), STORM, "{heads:#?}");
    // Exactly the burst, unless the storm itself took more than a second on a loaded machine
    // (then one more token per second may have come back).
    let refills = usize::try_from(elapsed.as_secs()).unwrap();
    assert!(
        admitted >= BURST as usize && admitted <= BURST as usize + refills,
        "{admitted} admitted in {elapsed:?}"
    );
    for h in &refused {
        let lower = h.to_ascii_lowercase();
        assert!(lower.contains("retry-after: 1\r\n"), "{h}");
    }
    assert_eq!(
        metric(
            admin,
            "wsrelay_connections_refused_total{reason=\"accept_rate\"}"
        )
        .await,
        Some(refused.len() as f64)
    );
    // The bucket refills: a handshake is admitted again within a few seconds.
    let waiting = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(20), || async {
            status_of(&raw_upgrade(addr, "").await) == 101
        })
        .await,
        "the bucket refills at the rate"
    );
    eprintln!(
        "storm: {admitted} of {STORM} admitted in {elapsed:?} (burst {BURST}), {} refused; \
         admitted again after {:?}",
        refused.len(),
        waiting.elapsed()
    );
    relay.drain().await;

    // After the upgrade: 4503 and a readable reason, on both transports.
    let relay = TestRelay::builder(&nats)
        .config(|c| {
            c.limits.accept_rate_per_second = 1;
            c.limits.accept_burst = Some(1);
            c.auth.refuse_after_upgrade = true;
        })
        .start()
        .await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    // The bucket holds one token and gains one a second: of a few tries in a row, all but
    // the first (and one per second the tries take) are refused. Bounded tries, no timing.
    const REASON: &str = "too many new connections, retry later";
    let mut refused = 0.0;
    let mut ws_refused = false;
    for _ in 0..10 {
        let mut ws = connect_with(addr, "", &[]).await.expect("the upgrade");
        let frame = loop {
            match tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .unwrap()
            {
                Some(Ok(Message::Close(f))) => break f,
                Some(Ok(Message::Text(_))) => break None, // the welcome: admitted
                Some(Ok(_)) => {}
                other => panic!("{other:?}"),
            }
        };
        if let Some(f) = frame {
            assert_eq!(u16::from(f.code), 4503);
            assert_eq!(f.reason.as_str(), REASON);
            refused += 1.0;
            ws_refused = true;
            break;
        }
    }
    assert!(ws_refused, "no WebSocket refused in 10 tries");
    let mut sse_refused = false;
    for _ in 0..10 {
        let mut s = wsrelay_testkit::sse::Stream::open(addr, "", "").await;
        assert_eq!(s.status, 200);
        let (name, data) = loop {
            let e = s.next(Duration::from_secs(5)).await.expect("an event");
            if e.0.as_deref() != Some(":") {
                break e; // not a comment
            }
        };
        if name.as_deref() == Some("close") {
            let close: serde_json::Value = serde_json::from_str(&data).unwrap();
            assert_eq!(close, json!({"code": 4503, "reason": REASON}));
            refused += 1.0;
            sse_refused = true;
            break;
        }
        assert_eq!(name.as_deref(), Some("session"), "{data}");
    }
    assert!(sse_refused, "no event stream refused in 10 tries");
    assert_eq!(
        metric(
            admin,
            "wsrelay_connections_refused_total{reason=\"accept_rate\"}"
        )
        .await,
        Some(refused)
    );
    relay.drain().await;
}

/// A reader that counts message frames of a client in the background.
fn count_messages(mut ws: Ws) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<Ws>) {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let task = tokio::spawn(async move {
        while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            if let Message::Text(t) = m
                && t.as_str().contains("\"type\":\"message\"")
                && n2.fetch_add(1, Ordering::SeqCst) + 1 == usize::MAX
            {
                break;
            }
        }
        ws
    });
    (n, task)
}

#[tokio::test]
async fn oversize_frame_closes_1009_and_flood_closes_4029_others_served() {
    init_logs();
    let nats = Nats::start();
    let relay = TestRelay::builder(&nats)
        .max_message_bytes(1024)
        .binding("news", "public.news", Direction::Both)
        .config(|c| {
            c.limits.publish_rate_per_second = 5;
            c.limits.publish_burst = 5;
        })
        .start()
        .await;
    let addr = relay.client_addr;
    let nc = nats.client().await;
    let mut good = connect(addr, "").await;
    assert_eq!(subscribe(&mut good, 1, "news").await["type"], "ok");

    // Oversize.
    let mut big = connect(addr, "").await;
    big.send(Message::text(format!(
        "{{\"type\":\"ping\",\"id\":\"{}\"}}",
        "x".repeat(2000)
    )))
    .await
    .unwrap();
    assert_eq!(
        close_code(&mut big, Duration::from_secs(10)).await,
        Some(1009)
    );

    // Flood: the first `burst` publishes pass, then 429 replies, then close 4029.
    let mut flood = connect(addr, "").await;
    for i in 0..40u64 {
        if flood
            .send(Message::text(
                json!({"type":"publish","id":i,"channel":"news","text":"f"}).to_string(),
            ))
            .await
            .is_err()
        {
            break;
        }
    }
    let (mut ok, mut limited, mut code) = (0, 0, None);
    loop {
        match next_event(&mut flood, Duration::from_secs(10)).await {
            Got::Json(v) if v["type"] == "ok" => ok += 1,
            Got::Json(v) if v["type"] == "error" => {
                assert_eq!(v["code"], 429, "{v}");
                limited += 1;
            }
            Got::Json(_) => {}
            Got::Closed(c) => {
                code = c;
                break;
            }
            Got::Timeout => break,
        }
    }
    assert_eq!(code, Some(4029));
    assert!((5..=15).contains(&ok), "ok {ok}");
    assert!(limited >= 5, "limited {limited}");

    // The well-behaved client is still served.
    nc.publish("public.news", "still here".into())
        .await
        .unwrap();
    nc.flush().await.unwrap();
    // After the flood's own publishes (the good client is subscribed to `news` too); each
    // awaited, bounded.
    let mut got = Vec::new();
    while !got
        .iter()
        .any(|m: &serde_json::Value| m["text"] == "still here")
    {
        let more = expect_messages(&mut good, 1, Duration::from_secs(20)).await;
        if more.is_empty() {
            break;
        }
        got.extend(more);
    }
    assert!(got.iter().any(|m| m["text"] == "still here"), "{got:?}");
    relay.drain().await;
}

async fn slow_reader_case(policy: SlowConsumerPolicy) {
    init_logs();
    let nats = Nats::start();
    let relay = TestRelay::builder(&nats)
        .send_queue_len(64)
        .slow_consumer_policy(policy)
        .config(|c| {
            c.limits.idle_timeout_seconds = 120;
            c.limits.ping_interval_seconds = 60;
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

    // 2,000 x 8 KiB = 16 MiB: more than loopback socket buffers hold for a client that
    // does not read. Paced by the good client, so only the slow one falls behind.
    let payload = bytes::Bytes::from(vec![b'x'; 8 * 1024]);
    let total = 2_000;
    for batch in 0..total / 25 {
        for _ in 0..25 {
            nc.publish("public.t", payload.clone()).await.unwrap();
        }
        nc.flush().await.unwrap();
        let want = (batch + 1) * 25;
        assert!(
            eventually(Duration::from_secs(20), || async {
                good_count.load(Ordering::SeqCst) >= want
            })
            .await,
            "good client stalled at {} of {want}",
            good_count.load(Ordering::SeqCst)
        );
    }
    assert_eq!(good_count.load(Ordering::SeqCst), total);
    match policy {
        SlowConsumerPolicy::Disconnect => {
            assert!(
                eventually(Duration::from_secs(10), || async {
                    metric(admin, "wsrelay_connections ").await == Some(1.0)
                })
                .await,
                "slow consumer not disconnected"
            );
            assert!(metric(admin, "wsrelay_slow_consumers_total").await.unwrap() >= 1.0);
            // The slow client finds the end of its stream (close 4008 if the frame fit in
            // the socket, else the connection is simply gone) after fewer messages.
            let mut seen = 0;
            let end = loop {
                match next_event(&mut slow, Duration::from_secs(20)).await {
                    Got::Json(_) => seen += 1,
                    Got::Closed(code) => break code,
                    Got::Timeout => panic!("slow client stream did not end"),
                }
            };
            assert!(end.is_none() || end == Some(4008), "{end:?}");
            assert!(seen < total, "seen {seen}");
        }
        SlowConsumerPolicy::DropOldest => {
            // Until every message is accounted for (bounded): the relay may still be
            // writing when the good client has read its last message, and a quiet period
            // is no proof that nothing more comes on a loaded machine.
            let (mut seen, mut dropped) = (0u64, 0u64);
            while seen + dropped < total as u64 {
                match next_event(&mut slow, Duration::from_secs(20)).await {
                    Got::Json(v) if v["type"] == "dropped" => {
                        // The notice names the channel that lost the messages.
                        assert_eq!(v["channel"], "public.t", "{v}");
                        dropped += v["count"].as_u64().unwrap()
                    }
                    Got::Json(v) if v["type"] == "message" => seen += 1,
                    Got::Json(_) => {}
                    Got::Closed(c) => panic!("closed {c:?}"),
                    Got::Timeout => break,
                }
            }
            assert!(dropped > 0, "nothing dropped");
            assert_eq!(
                seen + dropped,
                total as u64,
                "every message delivered or counted"
            );
            assert_eq!(
                request(&mut slow, json!({"type":"ping","id":1})).await["type"],
                "pong"
            );
            assert!(
                metric(
                    admin,
                    "wsrelay_messages_dropped_total{reason=\"slow_consumer_drop_oldest\"}"
                )
                .await
                .unwrap()
                    >= dropped as f64
            );
        }
    }
    good_task.abort();
    relay.drain().await;
}

#[tokio::test]
async fn slow_reader_is_disconnected_others_served() {
    slow_reader_case(SlowConsumerPolicy::Disconnect).await;
}

#[tokio::test]
async fn slow_reader_drops_oldest_with_notice() {
    slow_reader_case(SlowConsumerPolicy::DropOldest).await;
}

#[tokio::test]
async fn idle_client_and_stalled_handshake_are_closed() {
    use tokio::io::AsyncReadExt;
    init_logs();
    let nats = Nats::start();
    let relay = TestRelay::builder(&nats)
        .config(|c| {
            // An answering client's pong must reach the relay within the idle timeout after a
            // ping, and each handshake here must complete within the handshake timeout: seconds
            // of slack, since a loaded machine can stall this process for that long.
            c.limits.idle_timeout_seconds = 5;
            c.limits.ping_interval_seconds = 1;
            c.limits.handshake_timeout_seconds = 3;
        })
        .start()
        .await;
    let addr = relay.client_addr;
    // A client that answers pings (its library does, while reading) stays.
    let (live_count, live_task) = count_messages(connect(addr, "").await);
    // A client that never answers pings is closed with 4000 after the idle timeout.
    let mut idle = raw_ws(addr).await;
    let frames = raw_frames(&mut idle, Duration::from_secs(20)).await;
    let close = frames
        .iter()
        .find(|(op, _)| *op == 8)
        .expect("a close frame");
    assert_eq!(
        u16::from_be_bytes([close.1[0], close.1[1]]),
        4000,
        "{frames:?}"
    );
    assert!(frames.iter().any(|(op, _)| *op == 9), "pings were sent");
    assert!(!live_task.is_finished(), "the answering client was kept");
    assert_eq!(live_count.load(Ordering::SeqCst), 0);
    live_task.abort();
    // A TCP connection that never sends its request is dropped.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(20), tcp.read(&mut buf)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "{n:?}");
    // Only the stalled handshake counts as a handshake timeout (refusals close at once).
    assert_eq!(
        metric(
            relay.admin_addr,
            "wsrelay_connections_refused_total{reason=\"handshake_timeout\"}"
        )
        .await,
        Some(1.0)
    );
    relay.drain().await;
}

/// A JWKS document the relay cannot fetch: handshakes that need it get 503 (`keys_unavailable`,
/// with `Retry-After`) and `wsrelay_jwks_fetch_failing` says so, for the operator to report.
#[tokio::test]
async fn an_unreachable_jwks_is_reported() {
    init_logs();
    let nats = Nats::start();
    let relay = hs_config(&nats)
        .jwt_with(
            JwtAlgorithm::RS256,
            JwtKey {
                // A loopback port nothing listens on.
                jwks_url: Some(format!("http://127.0.0.1:{}/jwks.json", free_port())),
                jwks_allow_http: true,
                ..JwtKey::default()
            },
        )
        .start()
        .await;
    assert_eq!(
        metric(relay.admin_addr, "wsrelay_jwks_fetch_failing").await,
        Some(0.0),
        "nothing fetched yet"
    );
    assert_eq!(
        connect_with(
            relay.client_addr,
            &format!("?token={}", rs_token(Some("test-rsa"))),
            &[]
        )
        .await
        .err(),
        Some(503)
    );
    assert_eq!(
        metric(relay.admin_addr, "wsrelay_jwks_fetch_failing").await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            relay.admin_addr,
            "wsrelay_connections_refused_total{reason=\"keys_unavailable\"}"
        )
        .await,
        Some(1.0)
    );
    relay.drain().await;
}
