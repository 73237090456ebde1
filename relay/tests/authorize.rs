//! Channel authorization beyond templates (docs/protocol.md section 3, "Who may use a
//! channel"): subscription tokens, CEL rules, a backend that decides over NATS, the connect
//! step, and a `refresh` that re-checks every subscription. Real relay, real nats-server,
//! real WebSocket clients; the backends are real NATS responders in the test.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use wsrelay_testkit::prelude::*;

const WAIT: Duration = Duration::from_secs(10);

fn guarded(channel: &str, subject: &str, authorize: Authorize) -> Binding {
    let mut b = binding(channel, subject, Direction::Both);
    b.authorize = Some(authorize);
    b
}

fn rule(source: &str) -> Authorize {
    Authorize {
        rule: Some(source.into()),
        ..Authorize::default()
    }
}

fn asking(subject: &str) -> BackendRequest {
    BackendRequest {
        subject: subject.into(),
        timeout_ms: 1000,
        cache_seconds: 30,
        cache_entries: 10_000,
        on_timeout: OnTimeout::Deny,
    }
}

/// A connection token for `sub` with extra claims.
fn token(sub: &str, extra: Value) -> String {
    let mut c = claims(sub);
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    hs256(c)
}

/// A subscription token for `sub` on `channel`, expiring at `exp`.
fn sub_token(sub: &str, channel: &str, exp: u64) -> String {
    token(sub, json!({"channel": channel, "exp": exp}))
}

async fn open(relay: &TestRelay, token: &str) -> Client {
    Client::connect(relay.client_addr)
        .query(&format!("?token={token}"))
        .welcomed()
        .await
        .0
}

fn error_code(f: &Frame) -> Option<u16> {
    match f {
        Frame::Error { code, .. } => Some(*code),
        _ => None,
    }
}

fn is_ok(f: &Frame) -> bool {
    matches!(f, Frame::Ok { .. })
}

/// The value of one sample of the relay's metrics, 0 when absent.
fn counter(relay: &TestRelay, sample: &str) -> u64 {
    relay
        .relay
        .metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Reads frames until an `unsubscribed` for `channel`, skipping messages.
async fn until_unsubscribed(c: &mut Client, channel: &str, within: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.next(left).await {
            Event::Frame(Frame::Unsubscribed {
                channel: ch,
                reason,
            }) if ch == channel => {
                return Some(reason);
            }
            Event::Frame(_) => {}
            _ => return None,
        }
    }
}

#[tokio::test]
async fn a_rule_decides_subscribe_and_publish_from_claims_and_channel() {
    init_logs();
    let nats = Nats::start();
    let relay = TestRelay::builder(&nats)
        .hs256()
        .with_binding(guarded(
            "rooms.{room}",
            "rooms.{room}",
            rule("vars.room in claims.rooms || 'admin' in claims.roles"),
        ))
        .ready()
        .start()
        .await;
    let mut alice = open(
        &relay,
        &token("alice", json!({"rooms": ["1"], "roles": []})),
    )
    .await;
    assert!(is_ok(&alice.subscribe("rooms.1").await));
    let denied = alice.subscribe("rooms.2").await;
    assert_eq!(error_code(&denied), Some(403), "{denied:?}");
    assert!(matches!(&denied, Frame::Error { reason, .. } if reason == "denied by rule"));
    assert!(is_ok(&alice.publish("rooms.1", json!({"m": 1})).await));
    assert_eq!(
        error_code(&alice.publish("rooms.2", json!({"m": 2})).await),
        Some(403)
    );
    // An admin passes by the other branch; a token without `rooms` fails the rule (an
    // absent claim is an error: denied and counted).
    let mut root = open(
        &relay,
        &token("root", json!({"rooms": [], "roles": ["admin"]})),
    )
    .await;
    assert!(is_ok(&root.subscribe("rooms.2").await));
    let mut bare = open(&relay, &token("bob", json!({}))).await;
    assert_eq!(error_code(&bare.subscribe("rooms.1").await), Some(403));
    assert_eq!(
        counter(
            &relay,
            "wsrelay_authorize_failures_total{op=\"subscribe\",reason=\"rule_error\"}"
        ),
        1
    );
    assert_eq!(
        counter(
            &relay,
            "wsrelay_authorize_denied_total{op=\"subscribe\",check=\"rule\"}"
        ),
        2
    );
}

#[tokio::test]
async fn a_subscription_token_admits_one_channel_until_it_expires_unless_refreshed() {
    init_logs();
    let nats = Nats::start();
    let relay = TestRelay::builder(&nats)
        .hs256()
        .with_binding(guarded(
            "private.{id}",
            "private.{id}",
            Authorize {
                token: Some(SubscriptionToken::default()),
                ..Authorize::default()
            },
        ))
        .ready()
        .start()
        .await;
    let later = now_secs() + 600;
    let mut alice = open(&relay, &token("alice", json!({}))).await;

    // Without a token, for another channel, for another sub, forged: refused.
    assert_eq!(error_code(&alice.subscribe("private.1").await), Some(403));
    let other_channel = alice
        .subscribe_with_token("private.1", &sub_token("alice", "private.2", later))
        .await;
    assert_eq!(error_code(&other_channel), Some(403), "{other_channel:?}");
    let other_sub = alice
        .subscribe_with_token("private.1", &sub_token("bob", "private.1", later))
        .await;
    assert_eq!(error_code(&other_sub), Some(403), "{other_sub:?}");
    let forged = format!("{}x", sub_token("alice", "private.1", later));
    let forged = alice.subscribe_with_token("private.1", &forged).await;
    assert_eq!(error_code(&forged), Some(401), "{forged:?}");

    // A token expiring in 3 to 4 s: admitted, then ended with `expired`.
    let short = sub_token("alice", "private.1", now_secs() + 4);
    let ok = alice.subscribe_with_token("private.1", &short).await;
    assert!(is_ok(&ok), "{ok:?}");
    assert_eq!(
        until_unsubscribed(&mut alice, "private.1", WAIT)
            .await
            .as_deref(),
        Some("expired")
    );
    // The subscription is gone: subscribing again is a new subscription, not a 409.
    let again = alice
        .subscribe_with_token("private.1", &sub_token("alice", "private.1", later))
        .await;
    assert!(is_ok(&again), "{again:?}");

    // A second connection: a short token refreshed before it expires keeps the
    // subscription past the first `exp`, and a publish without a token uses the held one.
    let mut bob = open(&relay, &token("bob", json!({}))).await;
    let first_exp = now_secs() + 4;
    let ok = bob
        .subscribe_with_token("private.7", &sub_token("bob", "private.7", first_exp))
        .await;
    assert!(is_ok(&ok), "{ok:?}");
    let refreshed = bob
        .subrefresh("private.7", &sub_token("bob", "private.7", later))
        .await;
    assert!(is_ok(&refreshed), "{refreshed:?}");
    // A subrefresh with another channel's token, or of a channel not held: refused.
    let wrong = bob
        .subrefresh("private.7", &sub_token("bob", "private.8", later))
        .await;
    assert_eq!(error_code(&wrong), Some(403), "{wrong:?}");
    let not_held = bob
        .subrefresh("private.9", &sub_token("bob", "private.9", later))
        .await;
    assert_eq!(error_code(&not_held), Some(404), "{not_held:?}");
    while now_secs() <= first_exp + 1 {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(is_ok(
        &bob.publish("private.7", json!({"after": true})).await
    ));
    let got = bob.messages(1, WAIT).await;
    assert!(
        matches!(&got[..], [Frame::Message { channel, payload: Some(p), .. }] if channel == "private.7" && p["after"] == true),
        "still subscribed past the first token's exp: {got:?}"
    );
    // A connection without the channel has no token to lend a publish.
    let mut carol = open(&relay, &token("carol", json!({}))).await;
    assert_eq!(
        error_code(&carol.publish("private.7", json!({})).await),
        Some(403)
    );
}

/// A backend on `subject` in the test: allows `allowed` (user, room) pairs with `data`,
/// denies the others with a reason and an app code; counts its requests.
struct Backend {
    asked: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backend(nats: &Nats, subject: &str, allowed: &[(&str, &str)], delay: Duration) -> Backend {
    let client = nats.client().await;
    let mut sub = client
        .queue_subscribe(subject.to_owned(), "authz".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let allowed: HashSet<(String, String)> = allowed
        .iter()
        .map(|(u, r)| ((*u).to_owned(), (*r).to_owned()))
        .collect();
    let asked = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (asked2, seen2) = (asked.clone(), seen.clone());
    let task = tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            asked2.fetch_add(1, Ordering::SeqCst);
            let req: Value = serde_json::from_slice(&msg.payload).unwrap();
            let user = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Wsrelay-Sub"))
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            let room = req["vars"]["room"].as_str().unwrap_or("").to_owned();
            let reply = if req["op"] == "connect" {
                if user == "mallory" {
                    json!({"allow": false, "reason": "banned"})
                } else {
                    json!({"allow": true, "data": {"hello": user}})
                }
            } else if allowed.contains(&(user.clone(), room.clone())) {
                json!({"allow": true, "data": {"room": room}})
            } else {
                json!({"allow": false, "reason": "not a member", "code": 4031})
            };
            seen2.lock().unwrap().push(req);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if let Some(reply_to) = msg.reply {
                let _ = client.publish(reply_to, reply.to_string().into()).await;
            }
        }
    });
    Backend { asked, seen, task }
}

#[tokio::test]
async fn a_backend_decides_with_data_reasons_and_a_cache() {
    init_logs();
    let nats = Nats::start();
    let b = backend(&nats, "authz.rooms", &[("alice", "1")], Duration::ZERO).await;
    let relay = TestRelay::builder(&nats)
        .hs256()
        .with_binding(guarded(
            "rooms.{room}",
            "rooms.{room}",
            Authorize {
                request: Some(asking("authz.rooms")),
                ..Authorize::default()
            },
        ))
        .ready()
        .start()
        .await;
    let mut alice = open(&relay, &token("alice", json!({"team": "x"}))).await;
    let ok = alice.subscribe("rooms.1").await;
    assert!(
        matches!(&ok, Frame::Ok { data: Some(d), .. } if d == &json!({"room": "1"})),
        "{ok:?}"
    );
    let denied = alice.subscribe("rooms.2").await;
    assert!(
        matches!(&denied, Frame::Error { code: 403, reason, app_code: Some(4031), .. } if reason == "not a member"),
        "{denied:?}"
    );
    // The backend saw the documented request.
    let first = b.seen.lock().unwrap()[0].clone();
    assert_eq!(first["op"], "subscribe");
    assert_eq!(first["channel"], "rooms.1");
    assert_eq!(first["vars"], json!({"room": "1"}));
    assert_eq!(first["claims"]["sub"], "alice");
    assert_eq!(first["claims"]["team"], "x");
    assert!(first["connection"].as_str().unwrap().contains('/'));
    // Decisions are cached: again, and from another connection of the same user, the
    // backend is not asked; the deny is cached too.
    assert!(is_ok(&alice.unsubscribe("rooms.1").await));
    assert!(is_ok(&alice.subscribe("rooms.1").await));
    let mut alice2 = open(&relay, &token("alice", json!({}))).await;
    assert!(is_ok(&alice2.subscribe("rooms.1").await));
    assert_eq!(error_code(&alice2.subscribe("rooms.2").await), Some(403));
    assert_eq!(b.asked.load(Ordering::SeqCst), 2);
    assert_eq!(
        counter(
            &relay,
            "wsrelay_authorize_cache_total{op=\"subscribe\",result=\"hit\"}"
        ),
        3
    );
    assert_eq!(
        counter(&relay, "wsrelay_authorize_requests_total{op=\"subscribe\"}"),
        2
    );
    // Publishing is another operation: asked once, allowed or denied.
    assert!(is_ok(&alice.publish("rooms.1", json!({})).await));
    let denied = alice.publish("rooms.2", json!({})).await;
    assert!(
        matches!(
            &denied,
            Frame::Error {
                code: 403,
                app_code: Some(4031),
                ..
            }
        ),
        "{denied:?}"
    );
    assert_eq!(b.asked.load(Ordering::SeqCst), 4);
    assert_eq!(b.seen.lock().unwrap()[3]["op"], "publish");
}

#[tokio::test]
async fn a_storm_of_subscribes_asks_the_backend_once_per_user_and_channel() {
    init_logs();
    const USERS: usize = 10;
    const CONNS_PER_USER: usize = 10;
    const ROOMS: usize = 100;
    let nats = Nats::start();
    let pairs: Vec<(String, String)> = (0..USERS)
        .flat_map(|u| (0..ROOMS).map(move |r| (format!("u{u}"), r.to_string())))
        .collect();
    let refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(u, r)| (u.as_str(), r.as_str()))
        .collect();
    let b = backend(&nats, "authz.storm", &refs, Duration::ZERO).await;
    let relay = TestRelay::builder(&nats)
        .hs256()
        .with_binding(guarded(
            "rooms.{room}",
            "rooms.{room}",
            Authorize {
                request: Some(asking("authz.storm")),
                ..Authorize::default()
            },
        ))
        .ready()
        .start()
        .await;
    // 100 connections, each subscribing to 100 rooms at once: 10,000 subscribes.
    let mut tasks = Vec::new();
    for c in 0..USERS * CONNS_PER_USER {
        let addr = relay.client_addr;
        let t = token(&format!("u{}", c % USERS), json!({}));
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(addr)
                .query(&format!("?token={t}"))
                .welcomed()
                .await
                .0;
            for r in 0..ROOMS {
                let id = client.id();
                client
                    .send(&Request::subscribe(id, &format!("rooms.{r}")))
                    .await;
            }
            let mut oks = 0;
            while oks < ROOMS {
                match client.next(Duration::from_secs(60)).await {
                    Event::Frame(Frame::Ok { .. }) => oks += 1,
                    Event::Frame(Frame::Error { code, reason, .. }) => {
                        panic!("subscribe refused: {code} {reason}")
                    }
                    Event::Frame(_) => {}
                    other => panic!("no answer: {other:?}"),
                }
            }
            client
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    let asked = b.asked.load(Ordering::SeqCst);
    let hits = counter(
        &relay,
        "wsrelay_authorize_cache_total{op=\"subscribe\",result=\"hit\"}",
    );
    let misses = counter(
        &relay,
        "wsrelay_authorize_cache_total{op=\"subscribe\",result=\"miss\"}",
    );
    println!("storm: 10000 subscribes, backend asked {asked} times, {hits} cache hits");
    assert_eq!(asked, USERS * ROOMS, "one request per user and room");
    assert_eq!(misses as usize, USERS * ROOMS);
    assert_eq!(
        hits as usize,
        USERS * CONNS_PER_USER * ROOMS - USERS * ROOMS
    );
    drop(clients);
}

#[tokio::test]
async fn a_slow_or_absent_backend_denies_with_503_and_is_counted() {
    init_logs();
    let nats = Nats::start();
    let _slow = backend(
        &nats,
        "authz.slow",
        &[("alice", "1")],
        Duration::from_secs(2),
    )
    .await;
    let slow = |on_timeout| {
        let mut r = asking("authz.slow");
        r.timeout_ms = 200;
        r.on_timeout = on_timeout;
        Authorize {
            request: Some(r),
            ..Authorize::default()
        }
    };
    let relay = TestRelay::builder(&nats)
        .hs256()
        .with_binding(guarded("slow.{room}", "slow.{room}", slow(OnTimeout::Deny)))
        .with_binding(guarded("lenient.{room}", "lenient.{room}", {
            let mut a = slow(OnTimeout::Allow);
            a.request.as_mut().unwrap().subject = "authz.slow".into();
            a
        }))
        .with_binding(guarded(
            "absent.{room}",
            "absent.{room}",
            Authorize {
                request: Some(asking("authz.nobody")),
                ..Authorize::default()
            },
        ))
        .ready()
        .start()
        .await;
    let mut alice = open(&relay, &token("alice", json!({}))).await;
    let timed_out = alice.subscribe("slow.1").await;
    assert!(
        matches!(&timed_out, Frame::Error { code: 503, reason, .. } if reason == "authorization backend unavailable"),
        "{timed_out:?}"
    );
    assert!(
        is_ok(&alice.subscribe("lenient.1").await),
        "onTimeout: Allow"
    );
    assert_eq!(error_code(&alice.subscribe("absent.1").await), Some(503));
    assert_eq!(
        counter(
            &relay,
            "wsrelay_authorize_failures_total{op=\"subscribe\",reason=\"timeout\"}"
        ),
        2
    );
    assert_eq!(
        counter(
            &relay,
            "wsrelay_authorize_failures_total{op=\"subscribe\",reason=\"no_responders\"}"
        ),
        1
    );
    // Failures are not cached: asked again.
    assert_eq!(error_code(&alice.subscribe("absent.1").await), Some(503));
    assert_eq!(
        counter(
            &relay,
            "wsrelay_authorize_failures_total{op=\"subscribe\",reason=\"no_responders\"}"
        ),
        2
    );
}

#[tokio::test]
async fn a_refresh_that_removes_a_room_ends_exactly_that_subscription() {
    init_logs();
    let nats = Nats::start();
    let relay = TestRelay::builder(&nats)
        .hs256()
        .with_binding(guarded(
            "rooms.{room}",
            "rooms.{room}",
            rule("vars.room in claims.rooms"),
        ))
        .binding("news", "public.news", Direction::Subscribe)
        .ready()
        .start()
        .await;
    let mut alice = open(&relay, &token("alice", json!({"rooms": ["1", "2", "3"]}))).await;
    for ch in ["rooms.1", "rooms.2", "rooms.3", "news"] {
        assert!(is_ok(&alice.subscribe(ch).await), "{ch}");
    }
    let id = alice.id();
    alice
        .send(&Request::refresh(
            id,
            &token("alice", json!({"rooms": ["1", "3"]})),
        ))
        .await;
    // The `unsubscribed` comes before the refresh's `ok`.
    let first = alice.frame().await.unwrap();
    assert!(
        matches!(&first, Frame::Unsubscribed { channel, reason } if channel == "rooms.2" && reason == "forbidden"),
        "{first:?}"
    );
    let second = alice.frame().await.unwrap();
    assert!(second.answers(id) && is_ok(&second), "{second:?}");
    let publisher = nats.client().await;
    for s in ["rooms.1", "rooms.2", "rooms.3", "public.news"] {
        publisher
            .publish(s, json!({"s": s}).to_string().into())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    let got = alice.messages(3, WAIT).await;
    let channels: HashSet<String> = got
        .iter()
        .filter_map(|f| match f {
            Frame::Message { channel, .. } => Some(channel.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        channels,
        HashSet::from(["rooms.1".into(), "rooms.3".into(), "news".into()])
    );
    assert!(
        alice
            .messages(1, Duration::from_millis(500))
            .await
            .is_empty(),
        "nothing of rooms.2"
    );
    // The rule applies to new subscribes under the new claims too.
    assert_eq!(error_code(&alice.subscribe("rooms.2").await), Some(403));
}

#[tokio::test]
async fn the_connect_step_admits_with_data_and_refuses_before_the_upgrade() {
    init_logs();
    let nats = Nats::start();
    let b = backend(&nats, "authz.connect", &[], Duration::ZERO).await;
    let relay = TestRelay::builder(&nats)
        .hs256()
        .binding("news", "public.news", Direction::Subscribe)
        .config(|c| c.auth.connect_request = Some(asking("authz.connect")))
        .ready()
        .start()
        .await;
    let (_alice, welcome) = Client::connect(relay.client_addr)
        .query(&format!("?token={}", token("alice", json!({}))))
        .welcomed()
        .await;
    assert!(
        matches!(&welcome, Frame::Welcome { data: Some(d), .. } if d == &json!({"hello": "alice"})),
        "{welcome:?}"
    );
    let refused = Client::connect(relay.client_addr)
        .query(&format!("?token={}", token("mallory", json!({}))))
        .open()
        .await;
    assert_eq!(refused.err(), Some(403));
    assert_eq!(b.seen.lock().unwrap()[0]["op"], "connect");
    assert_eq!(
        counter(
            &relay,
            "wsrelay_connections_refused_total{reason=\"connect_denied\"}"
        ),
        1
    );
    // Cached per identity: alice again is not asked again.
    let _again = open(&relay, &token("alice", json!({}))).await;
    assert_eq!(b.asked.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn all_checks_must_allow_and_the_cheapest_decide_first() {
    init_logs();
    let nats = Nats::start();
    let b = backend(
        &nats,
        "authz.all",
        &[("alice", "1"), ("alice", "2")],
        Duration::ZERO,
    )
    .await;
    let relay = TestRelay::builder(&nats)
        .hs256()
        .with_binding(guarded(
            "rooms.{room}",
            "rooms.{room}",
            Authorize {
                token: Some(SubscriptionToken::default()),
                rule: Some("vars.room in claims.rooms".into()),
                request: Some(asking("authz.all")),
            },
        ))
        .ready()
        .start()
        .await;
    let later = now_secs() + 600;
    let mut alice = open(&relay, &token("alice", json!({"rooms": ["1", "3"]}))).await;
    // No token: refused before the rule and the backend.
    assert_eq!(error_code(&alice.subscribe("rooms.1").await), Some(403));
    // A token, but the rule says no (room 2 is not in the claims): the backend is not asked.
    let r = alice
        .subscribe_with_token("rooms.2", &sub_token("alice", "rooms.2", later))
        .await;
    assert!(
        matches!(&r, Frame::Error { code: 403, reason, .. } if reason == "denied by rule"),
        "{r:?}"
    );
    assert_eq!(b.asked.load(Ordering::SeqCst), 0);
    // Token and rule allow, the backend says no (room 3 is not its member list).
    let r = alice
        .subscribe_with_token("rooms.3", &sub_token("alice", "rooms.3", later))
        .await;
    assert!(
        matches!(
            &r,
            Frame::Error {
                code: 403,
                app_code: Some(4031),
                ..
            }
        ),
        "{r:?}"
    );
    // All three allow: subscribed, with the backend's data.
    let r = alice
        .subscribe_with_token("rooms.1", &sub_token("alice", "rooms.1", later))
        .await;
    assert!(
        matches!(&r, Frame::Ok { data: Some(d), .. } if d["room"] == "1"),
        "{r:?}"
    );
    assert_eq!(b.asked.load(Ordering::SeqCst), 2);
    for (check, n) in [("token", 1), ("rule", 1), ("request", 1)] {
        let sample =
            format!("wsrelay_authorize_denied_total{{op=\"subscribe\",check=\"{check}\"}}");
        assert_eq!(counter(&relay, &sample), n, "{check}");
    }
}
