//! Lifecycle events and the control service (docs/backend.md), on a JetStream-enabled
//! nats-server with real relays: a connection's events come once each and in order; a killed
//! relay's connections are said `Disconnected` by a survivor, with the id the relay itself
//! would have used (so the stream stores one); the backend disconnects a user on every relay
//! and hears how many it reached, through the service and through `wsrelay ctl`.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wsrelay::runtime::control::{AskError, Selector, Verb, ask};
use wsrelay_testkit::prelude::*;

const BUCKET: &str = "WSRELAY_TEST_EVENTS_REG";
const EVENTS: &str = "wsrelay.events.test.gw";
const CONTROL: &str = "wsrelay.control.test.gw";
const STREAM: &str = "WSRELAY_TEST_EVENTS";

/// A relay named `name` with the registry, durable events and the control service.
fn builder(nats: &Nats, name: &str, lease: u64) -> RelayBuilder {
    TestRelay::builder(nats)
        .hs256()
        .registry(BUCKET, name, lease)
        .events(EVENTS, Some(STREAM))
        .control(CONTROL)
}

async fn as_user(relay: &TestRelay, sub: &str) -> Ws {
    relay
        .connect(&format!("?token={}", hs256(claims(sub))))
        .await
}

/// Every event in the stream, in order, once it holds at least `n` (or the bound passed).
async fn stored(nats: &Nats, n: u64, within: Duration) -> Vec<Value> {
    stored_until(nats, within, |all| all.len() as u64 >= n).await
}

/// The stream's events once `done` says they are all there, or at `within`.
async fn stored_until(
    nats: &Nats,
    within: Duration,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let js = async_nats::jetstream::new(nats.client().await);
    let deadline = Instant::now() + within;
    let mut stream = loop {
        match js.get_stream(STREAM).await {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => panic!("no events stream: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    loop {
        let state = stream.info().await.unwrap().state.clone();
        let mut out = Vec::new();
        for seq in state.first_sequence..=state.last_sequence.max(state.first_sequence) {
            if let Ok(m) = stream.get_raw_message(seq).await {
                out.push(serde_json::from_slice(&m.payload).unwrap());
            }
        }
        if done(&out) || Instant::now() > deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_events_come_once_each_and_in_order() {
    init_logs();
    let (_store, nats) = jetstream_nats("events-order");
    let relay = builder(&nats, "relay-a", 15).start().await;
    let mut ws = as_user(&relay, "u1").await;
    assert_eq!(subscribe(&mut ws, 1, "public.a").await["type"], "ok");
    assert_eq!(
        request(
            &mut ws,
            json!({"type": "unsubscribe", "id": 2, "channel": "public.a"})
        )
        .await["type"],
        "ok"
    );
    assert_eq!(subscribe(&mut ws, 3, "public.a").await["type"], "ok");
    ws.close(None).await.unwrap();

    let got = stored(&nats, 5, Duration::from_secs(20)).await;
    let kinds: Vec<&str> = got.iter().map(|e| e["type"].as_str().unwrap()).collect();
    // The second subscription ends with its connection: `Disconnected` says it.
    assert_eq!(
        kinds,
        [
            "Connected",
            "Subscribed",
            "Unsubscribed",
            "Subscribed",
            "Disconnected"
        ],
        "{got:#?}"
    );
    let connection = got[0]["connection"].as_str().unwrap();
    assert!(connection.starts_with("relay-a/"), "{connection}");
    for e in &got {
        assert_eq!(e["connection"], connection, "{e}");
        assert_eq!(
            (e["sub"].as_str(), e["relay"].as_str()),
            (Some("u1"), Some("relay-a"))
        );
        assert!(e["at"].as_u64().unwrap() > 0);
    }
    assert_eq!(got[1]["channel"], "public.a");
    assert!(got[2]["durationMs"].is_u64(), "{}", got[2]);
    let d = &got[4];
    assert_eq!(
        (d["reason"].as_str(), d["closeCode"].as_u64()),
        (Some("normal"), None)
    );
    assert!(d["durationMs"].is_u64(), "{d}");
    assert_eq!(
        relay
            .metric("wsrelay_events_published_total{event=\"Subscribed\"}")
            .await,
        Some(2.0)
    );
    assert_eq!(
        relay
            .metric("wsrelay_events_failed_total{event=\"Connected\"}")
            .await,
        Some(0.0)
    );

    // Nothing else comes later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stored(&nats, 0, Duration::ZERO).await.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relays_connections_are_said_disconnected_once_by_a_survivor() {
    init_logs();
    const LEASE: u64 = 3;
    let (_store, nats) = jetstream_nats("events-lost");
    let _a = builder(&nats, "relay-a", LEASE).start().await;
    let config = builder(&nats, "relay-b", LEASE).build();
    let mut b = RelayProcess::spawn_config(
        env!("CARGO_BIN_EXE_wsrelay").as_ref(),
        &config,
        "events-relay-b",
        "info",
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(b.admin, "wsrelay_registry_ready").await == Some(1.0)
        })
        .await,
        "relay-b's registry is not in place"
    );
    let token = |sub: &str| format!("?token={}", hs256(claims(sub)));
    let _c1 = connect(b.client, &token("u1")).await;
    let _c2 = connect(b.client, &token("u2")).await;
    let connected = stored(&nats, 2, Duration::from_secs(20)).await;
    let ids: Vec<String> = of_type(&connected, "Connected")
        .iter()
        .map(|e| e["connection"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2, "{connected:#?}");

    // As if relay-b had said the first one's `Disconnected` just before it died: the
    // survivor says it again with the same message id, and the stream keeps one.
    let js = async_nats::jetstream::new(nats.client().await);
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", format!("{}:Disconnected", ids[0]).as_str());
    let said = json!({"type": "Disconnected", "connection": ids[0], "reason": "said before"});
    js.publish_with_headers(
        format!("{EVENTS}.Disconnected"),
        h,
        serde_json::to_vec(&said).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let killed = Instant::now();
    // Bound: the lease, the marker's delivery and the purge; generous for 2 loaded cores.
    let all = stored(&nats, 4, Duration::from_secs(LEASE + 25)).await;
    let took = killed.elapsed();
    let gone = of_type(&all, "Disconnected");
    assert_eq!(gone.len(), 2, "one Disconnected per connection: {all:#?}");
    assert_eq!(
        gone[0]["reason"], "said before",
        "the duplicate was removed"
    );
    assert_eq!(gone[1]["connection"].as_str(), Some(ids[1].as_str()));
    assert_eq!(gone[1]["reason"], "relay_lost");
    assert_eq!(gone[1]["sub"], "u2");
    assert!(gone[1]["durationMs"].is_u64());
    eprintln!(
        "relay_lost said {} ms after the SIGKILL (lease {LEASE} s)",
        took.as_millis()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        stored(&nats, 0, Duration::ZERO).await.len(),
        4,
        "nothing more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_disconnects_a_user_on_every_relay_and_hears_how_many() {
    init_logs();
    let (_store, nats) = jetstream_nats("events-control");
    let a = builder(&nats, "relay-a", 15).start().await;
    let b = builder(&nats, "relay-b", 15).start().await;
    let url = nats.url();
    // Both relays' leases seen by both (the relay that takes a command waits for as many
    // answers as it sees leases).
    let service = nats.client().await;
    for r in [&a, &b] {
        assert!(
            eventually(Duration::from_secs(20), || async {
                r.metric("wsrelay_registry_live_relays").await == Some(2.0)
            })
            .await,
            "a relay does not see both leases"
        );
    }
    let mut u1_a = as_user(&a, "u1").await;
    let mut u1_b = as_user(&b, "u1").await;
    let mut u2_a = as_user(&a, "u2").await;
    assert_eq!(subscribe(&mut u2_a, 1, "public.x").await["type"], "ok");

    // Listed, with their channels.
    let r: Value = serde_json::from_str(
        &ask(&url, None, CONTROL, Verb::Connections, &by_sub("u2"))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (r["reached"].as_u64(), r["relays"].as_u64()),
        (Some(1), Some(2)),
        "{r}"
    );
    assert_eq!(r["connections"][0]["channels"], json!(["public.x"]), "{r}");
    assert!(
        r["connections"][0]["connection"]
            .as_str()
            .unwrap()
            .starts_with("relay-a/")
    );

    // The same through `wsrelay ctl`.
    let out = ctl(&url, &["connections", "--sub", "u1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["reached"], 2, "{r}");

    let started = Instant::now();
    let mut final_ = by_sub("u1");
    final_.reconnect = Some(false);
    let r: Value = serde_json::from_str(
        &ask(&url, None, CONTROL, Verb::Disconnect, &final_)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(r, json!({"reached": 2, "relays": 2, "expected": 2}));
    let within = Duration::from_secs(10);
    assert_eq!(close_code(&mut u1_a, within).await, Some(4101));
    assert_eq!(close_code(&mut u1_b, within).await, Some(4101));
    eprintln!(
        "both of u1's connections closed {} ms after the command",
        started.elapsed().as_millis()
    );
    // The other user stays.
    assert_eq!(
        request(&mut u2_a, json!({"type": "ping", "id": 9})).await["type"],
        "pong"
    );
    // Three Connected, one Subscribed, and both Disconnected (said once each session ended).
    let gone = stored(&nats, 6, Duration::from_secs(20)).await;
    let gone = of_type(&gone, "Disconnected");
    assert_eq!(gone.len(), 2, "{gone:#?}");
    for e in gone {
        assert_eq!(
            (e["reason"].as_str(), e["closeCode"].as_u64()),
            (Some("disconnect"), Some(4101))
        );
    }

    // Refused with a reason, counted.
    let e = ask(&url, None, CONTROL, Verb::Disconnect, &Selector::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AskError::Refused { code, .. } if code == "400"),
        "{e}"
    );
    let taken = a
        .metric("wsrelay_control_commands_total{command=\"disconnect\",outcome=\"invalid\"}")
        .await
        .unwrap_or(0.0)
        + b.metric("wsrelay_control_commands_total{command=\"disconnect\",outcome=\"invalid\"}")
            .await
            .unwrap_or(0.0);
    assert_eq!(taken, 1.0);
    let out = ctl(&url, &["disconnect"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("name `sub` or `connection`"));
    // No service on a subject: exit 2.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsrelay"))
        .args([
            "ctl",
            "--nats",
            &url,
            "--subject",
            "wsrelay.control.none",
            "connections",
            "--sub",
            "u1",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Found the NATS way: the service's INFO names both endpoints on the control subject.
    let info = service
        .request("$SRV.INFO.wsrelay_control", "".into())
        .await
        .unwrap();
    let info: Value = serde_json::from_slice(&info.payload).unwrap();
    let subjects: Vec<&str> = info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["subject"].as_str().unwrap())
        .collect();
    assert!(
        subjects.contains(&format!("{CONTROL}.disconnect").as_str()),
        "{info}"
    );
    assert!(
        subjects.contains(&format!("{CONTROL}.connections").as_str()),
        "{info}"
    );
}

fn by_sub(sub: &str) -> Selector {
    Selector {
        sub: Some(sub.to_owned()),
        ..Selector::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_are_closed_refused_and_known_to_relays_started_later() {
    init_logs();
    let (_store, nats) = jetstream_nats("events-revoke");
    let a = builder(&nats, "relay-a", 15).start().await;
    let b = builder(&nats, "relay-b", 15).start().await;
    for r in [&a, &b] {
        assert!(
            eventually(Duration::from_secs(20), || async {
                r.metric("wsrelay_registry_live_relays").await == Some(2.0)
            })
            .await
        );
    }
    let url = nats.url();
    let now = now_secs();
    let token = |sub: &str, jti: &str, iat: u64| {
        let mut c = claims(sub);
        c["jti"] = json!(jti);
        c["iat"] = json!(iat);
        hs256(c)
    };
    let stolen = token("u1", "t1", now - 10);
    let mut on_a = a.connect(&format!("?token={stolen}")).await;
    let mut on_b = b.connect(&format!("?token={stolen}")).await;
    let mut other = a
        .connect(&format!("?token={}", token("u1", "t2", now - 10)))
        .await;

    // revoke {jti}: both of the token's connections close with 4409, the other stays.
    let until = now + 600;
    let out = ctl(
        &url,
        &["revoke", "--jti", "t1", "--until", &until.to_string()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r, json!({"reached": 2, "relays": 2, "expected": 2}));
    let within = Duration::from_secs(10);
    assert_eq!(close_code(&mut on_a, within).await, Some(4409));
    assert_eq!(close_code(&mut on_b, within).await, Some(4409));
    assert_eq!(
        request(&mut other, json!({"type": "ping", "id": 1})).await["type"],
        "pong"
    );

    // Refused at the handshake (401) and on refresh, here and on a relay started later.
    assert!(
        eventually(Duration::from_secs(10), || async {
            upgrade_status(a.addr(), &stolen).await == 401
                && upgrade_status(b.addr(), &stolen).await == 401
        })
        .await,
        "the revoked token is still admitted"
    );
    let r = request(
        &mut other,
        json!({"type": "refresh", "id": 2, "token": stolen}),
    )
    .await;
    assert_eq!(r["code"], 401, "{r}");
    let c = builder(&nats, "relay-c", 15).start().await;
    assert_eq!(
        upgrade_status(c.addr(), &stolen).await,
        401,
        "a relay started later knows it"
    );
    assert_eq!(c.metric("wsrelay_revocations").await, Some(1.0));

    // invalidate {sub, issuedBefore}: u1's tokens issued before now go, a newer one is admitted.
    let mut i = Selector {
        sub: Some("u1".into()),
        ..Selector::default()
    };
    i.issued_before = Some(now);
    let r: Value = serde_json::from_str(
        &ask(&url, None, CONTROL, Verb::Invalidate, &i)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(r["reached"], 1, "{r}");
    assert_eq!(close_code(&mut other, within).await, Some(4409));
    assert_eq!(
        upgrade_status(c.addr(), &token("u1", "t3", now - 1)).await,
        401
    );
    let fresh = token("u1", "t4", now + 1);
    assert_eq!(
        upgrade_status(c.addr(), &fresh).await,
        101,
        "issued after: admitted"
    );
    // Counted once each session ended (after the client's close reply, or the linger).
    let revoked = |admin: std::net::SocketAddr| async move {
        metric(
            admin,
            "wsrelay_connections_closed_total{reason=\"revoked\"}",
        )
        .await
        .unwrap_or(0.0)
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            revoked(a.admin()).await + revoked(b.admin()).await == 3.0
        })
        .await,
        "3 closes counted as revoked"
    );
}

/// A connection of `sub` to `relay`, resuming `resume` when given, and its `welcome`.
async fn welcomed(relay: &TestRelay, sub: &str, resume: Option<&str>) -> (Ws, Value) {
    let mut query = format!("?token={}", hs256(claims(sub)));
    if let Some(r) = resume {
        query.push_str(&format!("&resume={}", r.replace('/', "%2F")));
    }
    let mut ws = connect_with(relay.addr(), &query, &[]).await.unwrap();
    let w = next_json(&mut ws).await.unwrap();
    assert_eq!(w["type"], "welcome", "{w}");
    (ws, w)
}

fn conn_of(welcome: &Value) -> String {
    welcome["connection"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_comes_back_within_the_grace_is_resumed_once_on_any_relay() {
    init_logs();
    const GRACE: u64 = 2;
    let (_store, nats) = jetstream_nats("events-resume");
    let a = builder(&nats, "relay-a", 15)
        .events_grace(GRACE)
        .start()
        .await;
    let b = builder(&nats, "relay-b", 15)
        .events_grace(GRACE)
        .start()
        .await;

    // u1 leaves relay-a and comes back on relay-b within the grace: resumed.
    let (mut ws, w) = welcomed(&a, "u1", None).await;
    assert_eq!(w.get("resumed"), None, "{w}");
    let a1 = conn_of(&w);
    assert!(a1.starts_with("relay-a/"), "{a1}");
    ws.close(None).await.unwrap();
    drop(ws);
    let (mut b1_ws, w) = welcomed(&b, "u1", Some(&a1)).await;
    assert_eq!(w["resumed"], true, "{w}");
    let b1 = conn_of(&w);
    // Once only: another resume of the same connection is a new connection.
    let (_b2_ws, w) = welcomed(&b, "u1", Some(&a1)).await;
    assert_eq!(w["resumed"], false, "{w}");
    let b2 = conn_of(&w);
    // Never another user's connection.
    let (_u2, w) = welcomed(&a, "u2", Some(&b1)).await;
    assert_eq!(w["resumed"], false, "{w}");
    // Nor one that is still open (its relay would say its Disconnected later).
    let (_u1c, w) = welcomed(&a, "u1", Some(&b2)).await;
    assert_eq!(w["resumed"], false, "{w}");
    // A malformed resume is a 400 before the upgrade.
    let bad = format!("?token={}&resume=relay-a", hs256(claims("u1")));
    assert_eq!(connect_with(a.addr(), &bad, &[]).await.err(), Some(400));

    // A connection the backend closed is said Disconnected at once, and is not resumed.
    let (mut kicked, w) = welcomed(&a, "u3", None).await;
    let k1 = conn_of(&w);
    let r = ask(&nats.url(), None, CONTROL, Verb::Disconnect, &by_sub("u3"))
        .await
        .unwrap();
    assert!(r.contains("\"reached\":1"), "{r}");
    assert_eq!(
        next_event(&mut kicked, Duration::from_secs(5)).await,
        Got::Closed(Some(4100))
    );
    let (_u3, w) = welcomed(&a, "u3", Some(&k1)).await;
    assert_eq!(w["resumed"], false, "{w}");

    // u4 comes back after the grace: a new connection, and the old one's Disconnected.
    let (mut ws, w) = welcomed(&a, "u4", None).await;
    let late = conn_of(&w);
    ws.close(None).await.unwrap();
    drop(ws);
    tokio::time::sleep(Duration::from_secs(GRACE) + Duration::from_millis(1500)).await;
    let (_u4, w) = welcomed(&b, "u4", Some(&late)).await;
    assert_eq!(w["resumed"], false, "{w}");

    // b1 ends: its Disconnected comes after the grace, dated when it closed.
    b1_ws.close(None).await.unwrap();
    drop(b1_ws);
    let closed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;

    // Connected: a1, b2, u2, u1 (on a), u3 twice, u4 twice; Resumed: b1 <- a1;
    // Disconnected: u3's kicked one, u4's late one, and b1's.
    let all = stored(&nats, 12, Duration::from_secs(GRACE + 20)).await;
    let of = |kind: &str, conn: &str| {
        all.iter()
            .filter(|e| e["type"] == kind && e["connection"] == conn)
            .count()
    };
    let resumed = of_type(&all, "Resumed");
    assert_eq!(resumed.len(), 1, "{all:#?}");
    assert_eq!(
        (
            resumed[0]["connection"].as_str(),
            resumed[0]["previous"].as_str()
        ),
        (Some(b1.as_str()), Some(a1.as_str()))
    );
    assert_eq!(resumed[0]["sub"], "u1");
    assert_eq!(
        (of("Connected", &a1), of("Disconnected", &a1)),
        (1, 0),
        "{all:#?}"
    );
    assert_eq!(
        (of("Connected", &b1), of("Disconnected", &b1)),
        (0, 1),
        "{all:#?}"
    );
    assert_eq!(
        (of("Connected", &b2), of("Disconnected", &b2)),
        (1, 0),
        "{all:#?}"
    );
    assert_eq!(of("Disconnected", &k1), 1, "{all:#?}");
    assert_eq!(of("Disconnected", &late), 1, "{all:#?}");
    assert_eq!(of_type(&all, "Connected").len(), 8, "{all:#?}");
    let end = all
        .iter()
        .find(|e| e["type"] == "Disconnected" && e["connection"] == b1.as_str())
        .unwrap();
    assert_eq!(end["reason"], "normal", "{end}");
    let at = end["at"].as_u64().unwrap();
    assert!(
        at <= closed_at + 1000,
        "dated when it closed ({at}), not when said: {end}"
    );
    let kick = all
        .iter()
        .find(|e| e["type"] == "Disconnected" && e["connection"] == k1.as_str())
        .unwrap();
    assert_eq!(
        (kick["reason"].as_str(), kick["closeCode"].as_u64()),
        (Some("disconnect"), Some(4100))
    );
    assert_eq!(
        b.metric("wsrelay_events_published_total{event=\"Resumed\"}")
            .await,
        Some(1.0)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        stored(&nats, 0, Duration::ZERO).await.len(),
        12,
        "nothing more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subjects_connections_are_limited_across_the_relays() {
    init_logs();
    let (_store, nats) = jetstream_nats("events-fleet-limit");
    let limited = |name| {
        builder(&nats, name, 15).config(|c| {
            c.limits.max_fleet_connections_per_subject = 3;
            c.limits.max_connections_per_subject = 2;
        })
    };
    let a = limited("relay-a").start().await;
    let b = limited("relay-b").start().await;
    for r in [&a, &b] {
        assert!(
            eventually(Duration::from_secs(20), || async {
                r.metric("wsrelay_registry_live_relays").await == Some(2.0)
            })
            .await,
            "a relay does not see both leases"
        );
    }
    let token = format!("?token={}", hs256(claims("u1")));
    let first = connect(a.addr(), &token).await;
    let _second = connect(b.addr(), &token).await;
    let _third = connect(b.addr(), &token).await;
    // The fourth: relay-a holds one, within its own limit of 2, but the fleet holds 3. Each
    // relay reads the other's count from the registry, written in order with its entries.
    let refused = eventually(Duration::from_secs(10), || async {
        connect_with(a.addr(), &token, &[]).await.err() == Some(429)
    })
    .await;
    assert!(refused, "the fourth connection of u1 was admitted");
    assert_eq!(
        a.metric("wsrelay_connections_refused_total{reason=\"per_subject_fleet\"}")
            .await
            .map(|n| n >= 1.0),
        Some(true)
    );
    // Another subject is not counted with it.
    let _other = connect(a.addr(), &format!("?token={}", hs256(claims("u2")))).await;
    // One of u1's closes: the fourth is admitted again (on relay-a: relay-b is at its own
    // limit of 2).
    drop(first);
    assert!(
        eventually(Duration::from_secs(10), || async {
            connect_with(a.addr(), &token, &[]).await.is_ok()
        })
        .await,
        "a connection of u1 refused after one of its three closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_is_occupied_and_vacated_once_across_the_relays_and_a_dead_ones() {
    init_logs();
    const LEASE: u64 = 3;
    let (_store, nats) = jetstream_nats("events-occupancy");
    let every_type = |c: &mut wsrelay::config::Config| {
        c.events.as_mut().unwrap().types = wsrelay::config::EventType::ALL.to_vec();
    };
    let a = builder(&nats, "relay-a", LEASE)
        .config(every_type)
        .start()
        .await;
    let config = builder(&nats, "relay-b", LEASE).config(every_type).build();
    let b = RelayProcess::spawn_config(
        env!("CARGO_BIN_EXE_wsrelay").as_ref(),
        &config,
        "events-occupancy-b",
        "info",
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(b.admin, "wsrelay_registry_ready").await == Some(1.0)
        })
        .await,
        "relay-b's registry is not in place"
    );
    let token = |sub: &str| format!("?token={}", hs256(claims(sub)));
    // A channel's events, in the order of the registry writes that made them.
    let occupancy = |all: &[Value], channel: &str| -> Vec<String> {
        let mut of: Vec<&Value> = all
            .iter()
            .filter(|e| {
                (e["type"] == "Occupied" || e["type"] == "Vacated") && e["channel"] == channel
            })
            .collect();
        of.sort_by_key(|e| e["revision"].as_u64().unwrap());
        of.iter()
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect()
    };

    // public.o: first on relay-a, then on relay-b too; relay-a's leaves; relay-b is killed.
    let mut u1 = as_user(&a, "u1").await;
    assert_eq!(subscribe(&mut u1, 1, "public.o").await["type"], "ok");
    let mut u2 = connect(b.client, &token("u2")).await;
    assert_eq!(subscribe(&mut u2, 1, "public.o").await["type"], "ok");
    // A channel subscribed twice on one relay is one occupant.
    let mut u3 = as_user(&a, "u3").await;
    assert_eq!(subscribe(&mut u3, 1, "public.o").await["type"], "ok");
    for ws in [&mut u1, &mut u3] {
        let r = request(
            ws,
            json!({"type": "unsubscribe", "id": 2, "channel": "public.o"}),
        )
        .await;
        assert_eq!(r["type"], "ok");
    }
    // public.p: on relay-a alone, until its subscriber leaves.
    let mut u4 = as_user(&a, "u4").await;
    assert_eq!(subscribe(&mut u4, 1, "public.p").await["type"], "ok");
    u4.close(None).await.unwrap();
    drop(u4);
    // Until public.p's Vacated is stored (it follows its subscriber's close).
    let mid = stored_until(&nats, Duration::from_secs(20), |all| {
        occupancy(all, "public.p").len() == 2
    })
    .await;
    assert_eq!(occupancy(&mid, "public.o"), ["Occupied"], "{mid:#?}");
    assert_eq!(
        occupancy(&mid, "public.p"),
        ["Occupied", "Vacated"],
        "{mid:#?}"
    );

    // relay-b dies holding public.o's last subscriber: the survivor that purges it says
    // Vacated.
    let mut b = b;
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(LEASE + 25);
    let all = loop {
        let all = stored(&nats, 0, Duration::ZERO).await;
        if occupancy(&all, "public.o").len() >= 2 || Instant::now() > deadline {
            break all;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        occupancy(&all, "public.o"),
        ["Occupied", "Vacated"],
        "{all:#?}"
    );
    let vacated = all
        .iter()
        .find(|e| e["type"] == "Vacated" && e["channel"] == "public.o")
        .unwrap();
    assert_eq!(vacated["relay"], "relay-a", "{vacated}");
    assert!(vacated.get("connection").is_none() && vacated.get("sub").is_none());
    assert_eq!(
        a.metric("wsrelay_events_published_total{event=\"Vacated\"}")
            .await,
        Some(2.0)
    );
}

/// The HTTP status of a WebSocket upgrade with `token` (101: upgraded).
async fn upgrade_status(addr: std::net::SocketAddr, token: &str) -> u16 {
    let head = raw_upgrade(addr, &format!("Authorization: Bearer {token}\r\n")).await;
    head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// `wsrelay ctl --nats <url> --subject <CONTROL> <args>`, run to its end.
fn ctl(url: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_wsrelay"))
        .args(["ctl", "--nats", url, "--subject", CONTROL])
        .args(args)
        .output()
        .unwrap()
}

/// A relay of [`builder`] whose bindings are `public.{topic}` (both ways), `me.feed` (the
/// user's own subject, from its `sub` claim) and `out.{x}` (publish only).
fn server_side_builder(nats: &Nats, name: &str) -> RelayBuilder {
    builder(nats, name, 15)
        .binding("public.{topic}", "public.{topic}", Direction::Both)
        .binding("me.feed", "users.{claims.sub}.feed", Direction::Subscribe)
        .binding("out.{x}", "out.{x}", Direction::Publish)
}

/// The next frame of type `kind`, skipping others (bounded).
async fn frame_of(ws: &mut Ws, kind: &str) -> Value {
    for _ in 0..100 {
        match next_event(ws, Duration::from_secs(10)).await {
            Got::Json(v) if v["type"] == kind => return v,
            Got::Json(_) => {}
            other => panic!("no {kind} frame: {other:?}"),
        }
    }
    panic!("no {kind} frame in 100");
}

fn user_channel(sub: &str, channel: &str) -> Selector {
    Selector {
        sub: Some(sub.to_owned()),
        channel: Some(channel.to_owned()),
        ..Selector::default()
    }
}

async fn command(url: &str, verb: Verb, s: &Selector) -> Value {
    serde_json::from_str(&ask(url, None, CONTROL, verb, s).await.unwrap()).unwrap()
}

/// Publishes `payload` on `subject` and waits until `ws` receives it on `channel`.
async fn delivered(nats: &async_nats::Client, subject: &str, ws: &mut Ws, channel: &str) -> Value {
    nats.publish(subject.to_owned(), "{\"n\":1}".into())
        .await
        .unwrap();
    nats.flush().await.unwrap();
    let m = frame_of(ws, "message").await;
    assert_eq!(m["channel"], channel, "{m}");
    m
}

async fn live_relays(relays: &[&TestRelay], n: f64) {
    for r in relays {
        assert!(
            eventually(Duration::from_secs(20), || async {
                r.metric("wsrelay_registry_live_relays").await == Some(n)
            })
            .await,
            "a relay does not see {n} leases"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_subscriptions_reach_a_users_connections_everywhere_and_later() {
    init_logs();
    let (_store, nats) = jetstream_nats("events-srvsub");
    let a = server_side_builder(&nats, "relay-a").start().await;
    let b = server_side_builder(&nats, "relay-b").start().await;
    live_relays(&[&a, &b], 2.0).await;
    let url = nats.url();
    let pubs = nats.client().await;
    let mut u1_a = as_user(&a, "u1").await;
    let mut u1_b = as_user(&b, "u1").await;
    let mut u2_a = as_user(&a, "u2").await;
    // u1's connection on b had subscribed itself: taken over.
    assert_eq!(subscribe(&mut u1_b, 1, "public.x").await["type"], "ok");

    let r = command(&url, Verb::Subscribe, &user_channel("u1", "public.x")).await;
    assert_eq!(r, json!({"reached": 2, "relays": 2, "expected": 2}));
    let want = json!({"type": "subscribed", "channel": "public.x", "byServer": true});
    assert_eq!(frame_of(&mut u1_a, "subscribed").await, want);
    assert_eq!(frame_of(&mut u1_b, "subscribed").await, want);
    delivered(&pubs, "public.x", &mut u1_a, "public.x").await;
    delivered(&pubs, "public.x", &mut u1_b, "public.x").await;
    // The other user is not subscribed.
    assert!(
        drain_messages(&mut u2_a, Duration::from_millis(300))
            .await
            .is_empty()
    );
    // Again: idempotent, the same count, no second frame.
    let r = command(&url, Verb::Subscribe, &user_channel("u1", "public.x")).await;
    assert_eq!(r["reached"], 2, "{r}");

    // The client cannot end it, nor subscribe a second time.
    let r = request(
        &mut u1_a,
        json!({"type": "unsubscribe", "id": 2, "channel": "public.x"}),
    )
    .await;
    assert_eq!(
        (r["code"].as_u64(), r["reason"].as_str()),
        (
            Some(403),
            Some("a server-side subscription: the backend ends it")
        ),
        "{r}"
    );
    assert_eq!(subscribe(&mut u1_a, 3, "public.x").await["code"], 409);
    delivered(&pubs, "public.x", &mut u1_a, "public.x").await;

    // The binding's template is rendered with each connection's claims.
    let r = command(&url, Verb::Subscribe, &user_channel("u1", "me.feed")).await;
    assert_eq!(r["reached"], 2, "{r}");
    frame_of(&mut u1_a, "subscribed").await;
    delivered(&pubs, "users.u1.feed", &mut u1_a, "me.feed").await;

    // A channel no binding allows to subscribe is refused, and nothing is stored.
    for channel in ["nobinding.x", "out.x", "public.*"] {
        let e = ask(
            &url,
            None,
            CONTROL,
            Verb::Subscribe,
            &user_channel("u1", channel),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&e, AskError::Refused { code, .. } if code == "400"),
            "{channel}: {e}"
        );
    }

    // A connection admitted later, on a relay started after the command, gets both right
    // after its welcome.
    let c = server_side_builder(&nats, "relay-c").start().await;
    live_relays(&[&a, &b, &c], 3.0).await;
    let mut u1_c = connect_with(c.addr(), &format!("?token={}", hs256(claims("u1"))), &[])
        .await
        .unwrap();
    let welcome = next_json(&mut u1_c).await.unwrap();
    assert_eq!(
        welcome["serverChannels"],
        json!(["me.feed", "public.x"]),
        "{welcome}"
    );
    let mut got: Vec<String> = Vec::new();
    for _ in 0..2 {
        let f = frame_of(&mut u1_c, "subscribed").await;
        assert_eq!(f["byServer"], true, "{f}");
        got.push(f["channel"].as_str().unwrap().to_owned());
    }
    got.sort();
    assert_eq!(got, ["me.feed", "public.x"]);
    delivered(&pubs, "public.x", &mut u1_c, "public.x").await;
    // And a reconnect on a relay that was there: again (once the first connection is gone,
    // so that it is not counted below).
    u1_a.close(None).await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            a.metric("wsrelay_connections").await == Some(1.0)
        })
        .await
    );
    let mut u1_a = as_user(&a, "u1").await;
    for _ in 0..2 {
        frame_of(&mut u1_a, "subscribed").await;
    }
    delivered(&pubs, "public.x", &mut u1_a, "public.x").await;

    // channels: counted across the relays, filtered by prefix; u2's own subscription too.
    assert_eq!(subscribe(&mut u2_a, 4, "public.z").await["type"], "ok");
    let r = command(
        &url,
        Verb::Channels,
        &Selector {
            prefix: Some("public.".into()),
            ..Selector::default()
        },
    )
    .await;
    assert_eq!(
        r,
        json!({"reached": 4, "relays": 3, "expected": 3, "channels": [
            {"channel": "public.x", "subscribers": 3},
            {"channel": "public.z", "subscribers": 1}]})
    );
    let out = ctl(&url, &["channels"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        r["channels"][0],
        json!({"channel": "me.feed", "subscribers": 3}),
        "{r}"
    );
    assert_eq!(r["reached"], 7, "{r}");

    // unsubscribe (through `wsrelay ctl`): ended on all three, said to each client.
    let out = ctl(
        &url,
        &["unsubscribe", "--sub", "u1", "--channel", "public.x"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r, json!({"reached": 3, "relays": 3, "expected": 3}));
    for ws in [&mut u1_a, &mut u1_b, &mut u1_c] {
        assert_eq!(
            frame_of(ws, "unsubscribed").await,
            json!({"type": "unsubscribed", "channel": "public.x", "reason": "server"})
        );
    }
    // Gone: a later connection gets only me.feed, and public.x reaches nobody.
    let mut u1_late = connect_with(b.addr(), &format!("?token={}", hs256(claims("u1"))), &[])
        .await
        .unwrap();
    let welcome = next_json(&mut u1_late).await.unwrap();
    assert_eq!(welcome["serverChannels"], json!(["me.feed"]), "{welcome}");
    assert_eq!(
        frame_of(&mut u1_late, "subscribed").await["channel"],
        "me.feed"
    );
    pubs.publish("public.x", "{}".into()).await.unwrap();
    pubs.flush().await.unwrap();
    for ws in [&mut u1_a, &mut u1_late] {
        assert!(
            drain_messages(ws, Duration::from_millis(300))
                .await
                .is_empty()
        );
    }
    // Now the client may subscribe to it itself, and unsubscribe.
    assert_eq!(subscribe(&mut u1_a, 5, "public.x").await["type"], "ok");
    let r = request(
        &mut u1_a,
        json!({"type": "unsubscribe", "id": 6, "channel": "public.x"}),
    )
    .await;
    assert_eq!(r["type"], "ok", "{r}");

    // Events: Subscribed and Unsubscribed with byServer for server-side ones only. Of
    // public.x's: u1_a's two connections' and u1_c's are server-side; u1_b's (taken over)
    // and u1_a's own later one are the client's.
    let of_x = |events: &[Value], kind: &str, by_server: bool| {
        of_type(events, kind)
            .into_iter()
            .filter(|e| e["channel"] == "public.x" && (e["byServer"] == true) == by_server)
            .count()
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            let events = stored(&nats, 0, Duration::ZERO).await;
            of_x(&events, "Unsubscribed", true) + of_x(&events, "Unsubscribed", false) >= 4
        })
        .await,
        "four Unsubscribed on public.x"
    );
    let events = stored(&nats, 0, Duration::ZERO).await;
    assert_eq!(of_x(&events, "Subscribed", true), 3, "{events:#?}");
    assert_eq!(of_x(&events, "Subscribed", false), 2, "{events:#?}");
    assert_eq!(of_x(&events, "Unsubscribed", true), 2, "{events:#?}");
    assert_eq!(of_x(&events, "Unsubscribed", false), 2, "{events:#?}");
    assert!(
        of_type(&events, "Subscribed")
            .iter()
            .all(|e| e["byServer"].is_null() || e["byServer"] == true),
        "byServer is true or absent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_a_user_has_at_most_64_channels() {
    init_logs();
    let (_store, nats) = jetstream_nats("events-srvsub-bound");
    let a = server_side_builder(&nats, "relay-a").start().await;
    let url = nats.url();
    for i in 0..64 {
        let r = command(
            &url,
            Verb::Subscribe,
            &user_channel("u1", &format!("public.c{i}")),
        )
        .await;
        assert_eq!(r["reached"], 0, "{r}");
    }
    let e = ask(
        &url,
        None,
        CONTROL,
        Verb::Subscribe,
        &user_channel("u1", "public.more"),
    )
    .await
    .unwrap_err();
    match &e {
        AskError::Refused { code, status } => {
            assert_eq!(code, "409");
            assert_eq!(status, "sub has 64 server-side channels (the most)");
        }
        other => panic!("{other}"),
    }
    // One it has is not one more; another user has room.
    command(&url, Verb::Subscribe, &user_channel("u1", "public.c7")).await;
    command(&url, Verb::Subscribe, &user_channel("u2", "public.more")).await;
    // u1's connection gets the 64, and the room one unsubscribe makes is usable.
    let mut ws = as_user(&a, "u1").await;
    for _ in 0..64 {
        frame_of(&mut ws, "subscribed").await;
    }
    let r = command(&url, Verb::Unsubscribe, &user_channel("u1", "public.c0")).await;
    assert_eq!(r["reached"], 1, "{r}");
    let r = command(&url, Verb::Subscribe, &user_channel("u1", "public.more")).await;
    assert_eq!(r["reached"], 1, "{r}");
    assert_eq!(
        a.metric("wsrelay_control_commands_total{command=\"subscribe\",outcome=\"invalid\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        a.metric("wsrelay_control_commands_total{command=\"subscribe\",outcome=\"ok\"}")
            .await,
        Some(67.0)
    );
}
