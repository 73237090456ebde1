//! Presence (docs/protocol.md section 10): two relays on one JetStream-enabled nats-server
//! share a registry bucket; clients subscribe to a presence binding on either and see each
//! other's snapshot, joins, leaves (after the grace) and occupancy, over real WebSockets.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wsrelay::config::Presence;
use wsrelay_testkit::client::EXPECT;
use wsrelay_testkit::prelude::*;

const BUCKET: &str = "WSRELAY_TEST_PRES";

/// `rooms.{room}` with presence: members by `sub`, `name` as info.
fn rooms(max_members_with_events: u32, leave_grace_seconds: u64) -> Binding {
    let mut b = binding("rooms.{room}", "chat.rooms.{room}", Direction::Both);
    b.presence = Some(Presence {
        key: "{claims.sub}".into(),
        info: vec!["claims.name".into()],
        events: true,
        max_members_with_events,
        leave_grace_seconds,
    });
    b
}

/// An in-process relay named `name` with the registry and `bindings`, its bucket in place.
async fn relay(nats: &Nats, name: &str, bindings: Vec<Binding>) -> TestRelay {
    let mut builder = TestRelay::builder(nats).hs256().registry(BUCKET, name, 15);
    for b in bindings {
        builder = builder.with_binding(b);
    }
    builder.start().await
}

/// Two relays on one nats-server, both with `bindings`.
async fn pair(nats: &Nats, bindings: Vec<Binding>) -> (TestRelay, TestRelay) {
    let a = relay(nats, "relay-1", bindings.clone()).await;
    let b = relay(nats, "relay-2", bindings).await;
    (a, b)
}

/// A client of user `sub` named `name`.
async fn user(relay: &TestRelay, sub: &str, name: &str) -> Ws {
    let mut c = claims(sub);
    c["name"] = json!(name);
    relay.connect(&format!("?token={}", hs256(c))).await
}

/// Sends `req` and reads until its reply; the reply and the frames read before it.
async fn ask(ws: &mut Ws, req: Value) -> (Value, Vec<Value>) {
    let id = req["id"].clone();
    send(ws, req).await;
    let mut before = Vec::new();
    for _ in 0..10_000 {
        let f = next_json(ws).await.expect("a reply");
        if (f["type"] == "ok" || f["type"] == "error") && f["id"] == id {
            return (f, before);
        }
        before.push(f);
    }
    panic!("no reply");
}

async fn subscribe_presence(ws: &mut Ws, id: u64, channel: &str) -> Value {
    let (r, _) = ask(
        ws,
        json!({"type": "subscribe", "id": id, "channel": channel, "presence": true}),
    )
    .await;
    assert_eq!(r["type"], "ok", "{r}");
    r
}

/// The keys of a page, in order.
fn keys(presence: &Value) -> Vec<String> {
    presence["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["key"].as_str().unwrap().to_owned())
        .collect()
}

fn member<'a>(presence: &'a Value, key: &str) -> Option<&'a Value> {
    presence["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["key"] == key)
}

fn is_presence(f: &Value) -> bool {
    ["join", "leave", "occupancy"].contains(&f["type"].as_str().unwrap_or(""))
}

/// Reads frames until one satisfies `want` (bounded by `within`); the frames read, the one
/// wanted last, or `None` with all of them when it did not come.
async fn until(
    ws: &mut Ws,
    within: Duration,
    want: impl Fn(&Value) -> bool,
) -> (Option<Value>, Vec<Value>) {
    let deadline = tokio::time::Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_event(ws, left).await {
            Got::Json(f) if want(&f) => return (Some(f), seen),
            Got::Json(f) => seen.push(f),
            Got::Closed(_) | Got::Timeout => return (None, seen),
        }
    }
}

/// The frames that come until `quiet` passes without one.
async fn quiet(ws: &mut Ws, quiet: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    while let Got::Json(f) = next_event(ws, quiet).await {
        out.push(f);
    }
    out
}

fn joins_of<'a>(frames: &'a [Value], key: &str) -> Vec<&'a Value> {
    frames
        .iter()
        .filter(|f| (f["type"] == "join" || f["type"] == "leave") && f["member"]["key"] == key)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_on_two_relays_see_each_other_join_and_tabs_of_one_user_are_one_member() {
    init_logs();
    let (_store, nats) = jetstream_nats("presence-join");
    let (r1, r2) = pair(&nats, vec![rooms(200, 10)]).await;

    let mut alice = user(&r1, "alice", "Alice").await;
    let ok = subscribe_presence(&mut alice, 1, "rooms.7").await;
    assert_eq!(
        ok["presence"],
        json!({"members": [{"key": "alice", "info": {"name": "Alice"}, "clients": 1}],
               "clients": 1, "users": 1, "events": true, "complete": true}),
        "the snapshot holds the subscriber itself"
    );

    let mut bob = user(&r2, "bob", "Bob").await;
    let ok = subscribe_presence(&mut bob, 1, "rooms.7").await;
    assert_eq!(keys(&ok["presence"]), ["alice", "bob"], "{ok}");
    assert_eq!(ok["presence"]["clients"], 2);
    assert_eq!(ok["presence"]["users"], 2);
    assert_eq!(
        member(&ok["presence"], "alice").unwrap()["info"],
        json!({"name": "Alice"})
    );

    // Alice, on the other relay, hears Bob join, with his info.
    let (join, _) = until(&mut alice, EXPECT, |f| f["type"] == "join").await;
    assert_eq!(
        join,
        Some(
            json!({"type": "join", "channel": "rooms.7", "member": {"key": "bob", "info": {"name": "Bob"}}})
        )
    );

    // A second tab of Alice's, on relay 2: one member with two clients, no join.
    let mut alice2 = user(&r2, "alice", "Alice").await;
    let ok = subscribe_presence(&mut alice2, 1, "rooms.7").await;
    assert_eq!(
        member(&ok["presence"], "alice").unwrap()["clients"],
        2,
        "{ok}"
    );
    assert_eq!(ok["presence"]["users"], 2);
    assert_eq!(ok["presence"]["clients"], 3);
    // Relay 1 has read the tab when a page there shows it; no join for it came before.
    let deadline = Instant::now() + EXPECT;
    let mut seen = Vec::new();
    loop {
        let (page, before) = ask(
            &mut alice,
            json!({"type": "presence", "id": 9, "channel": "rooms.7"}),
        )
        .await;
        seen.extend(before);
        assert_eq!(page["type"], "ok", "{page}");
        if member(&page["presence"], "alice").unwrap()["clients"] == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "relay 1 never saw the second tab: {page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen.extend(quiet(&mut alice, Duration::from_millis(300)).await);
    assert!(joins_of(&seen, "alice").is_empty(), "{seen:?}");
    assert!(
        joins_of(&seen, "bob").is_empty(),
        "bob joined once: {seen:?}"
    );
    let bob_frames = quiet(&mut bob, Duration::from_millis(300)).await;
    assert!(joins_of(&bob_frames, "alice").is_empty(), "{bob_frames:?}");
    assert!(
        joins_of(&bob_frames, "bob").is_empty(),
        "none for itself: {bob_frames:?}"
    );
    assert!(r1.metric("wsrelay_presence_watchers").await == Some(1.0));
    assert!(r1.metric("wsrelay_presence_members").await == Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_gone_leaves_after_the_grace() {
    init_logs();
    const GRACE: u64 = 1;
    let (_store, nats) = jetstream_nats("presence-leave");
    let (r1, r2) = pair(&nats, vec![rooms(200, GRACE)]).await;
    let mut alice = user(&r1, "alice", "Alice").await;
    subscribe_presence(&mut alice, 1, "rooms.7").await;
    let mut bob = user(&r2, "bob", "Bob").await;
    subscribe_presence(&mut bob, 1, "rooms.7").await;
    let (join, _) = until(&mut alice, EXPECT, |f| f["type"] == "join").await;
    assert!(join.is_some());

    bob.close(None).await.unwrap();
    let gone = Instant::now();
    let (leave, _) = until(&mut alice, EXPECT, |f| f["type"] == "leave").await;
    assert_eq!(
        leave,
        Some(
            json!({"type": "leave", "channel": "rooms.7", "member": {"key": "bob", "info": {"name": "Bob"}}})
        )
    );
    assert!(
        gone.elapsed() >= Duration::from_secs(GRACE),
        "the leave waited for the grace"
    );
    let (page, _) = ask(
        &mut alice,
        json!({"type": "presence", "id": 2, "channel": "rooms.7"}),
    )
    .await;
    assert_eq!(keys(&page["presence"]), ["alice"], "{page}");
    assert!(
        r1.metric("wsrelay_presence_events_sent_total{event=\"leave\"}")
            .await
            >= Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_back_on_another_relay_within_the_grace_makes_no_leave_or_join() {
    init_logs();
    // Long enough for a reconnect on two loaded cores.
    const GRACE: u64 = 8;
    let (_store, nats) = jetstream_nats("presence-grace");
    let (r1, r2) = pair(&nats, vec![rooms(200, GRACE)]).await;
    let mut alice = user(&r1, "alice", "Alice").await;
    subscribe_presence(&mut alice, 1, "rooms.7").await;
    let mut bob = user(&r2, "bob", "Bob").await;
    subscribe_presence(&mut bob, 1, "rooms.7").await;
    let (join, _) = until(&mut alice, EXPECT, |f| f["type"] == "join").await;
    assert!(join.is_some());

    // A relay drain, as a client lives it: gone from relay 2, back on relay 1.
    bob.close(None).await.unwrap();
    let gone = Instant::now();
    let mut bob = user(&r1, "bob", "Bob").await;
    let ok = subscribe_presence(&mut bob, 1, "rooms.7").await;
    let back = gone.elapsed();
    assert!(
        back < Duration::from_secs(GRACE),
        "the reconnect took {back:?}, more than the grace: the test proves nothing"
    );
    assert_eq!(keys(&ok["presence"]), ["alice", "bob"], "{ok}");
    // Past the grace (and then some): neither a leave nor a join of bob.
    let frames = quiet_until(&mut alice, gone + Duration::from_secs(GRACE + 2)).await;
    assert!(joins_of(&frames, "bob").is_empty(), "{frames:?}");

    // The control: bob gone for good leaves.
    bob.close(None).await.unwrap();
    let (leave, _) = until(&mut alice, EXPECT, |f| f["type"] == "leave").await;
    assert_eq!(leave.unwrap()["member"]["key"], "bob");
}

/// A rolling update, as a relay sees it: a member leaves its old relay, and the new relay's
/// watcher for the channel starts while the member is in its grace (nobody there followed the
/// channel before). The new relay learns the departure from the registry's delete marker: its
/// snapshot holds the member (in its grace, no connection), and the member coming back makes
/// no join; gone for good, it leaves at the end of the grace that began when it went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_starts_following_a_channel_knows_who_is_in_their_grace() {
    init_logs();
    const GRACE: u64 = 8;
    let (_store, nats) = jetstream_nats("presence-late-watcher");
    let (r1, r2) = pair(&nats, vec![rooms(200, GRACE)]).await;
    let mut bob = user(&r1, "bob", "Bob").await;
    subscribe_presence(&mut bob, 1, "rooms.7").await;
    let mut carol = user(&r1, "carol", "Carol").await;
    subscribe_presence(&mut carol, 1, "rooms.7").await;
    bob.close(None).await.unwrap();
    carol.close(None).await.unwrap();
    let gone = Instant::now();

    // Relay 2 has followed nobody on rooms.7 so far: alice is its first subscriber.
    let mut alice = user(&r2, "alice", "Alice").await;
    let ok = subscribe_presence(&mut alice, 1, "rooms.7").await;
    assert_eq!(keys(&ok["presence"]), ["alice", "bob", "carol"], "{ok}");
    assert_eq!(
        member(&ok["presence"], "bob").unwrap()["clients"],
        0,
        "{ok}"
    );
    assert_eq!(ok["presence"]["users"], 3, "{ok}");
    assert_eq!(ok["presence"]["clients"], 1, "{ok}");

    // Bob back within his grace, on the other relay: no join at alice's.
    let mut bob = user(&r1, "bob", "Bob").await;
    subscribe_presence(&mut bob, 1, "rooms.7").await;
    assert!(
        gone.elapsed() < Duration::from_secs(GRACE),
        "bob came back after the grace: the test proves nothing"
    );
    // Carol does not come back: alice hears her leave once her grace, from when she went,
    // has passed; of bob, nothing.
    let (leave, before) = until(&mut alice, EXPECT, |f| f["type"] == "leave").await;
    let leave = leave.expect("carol's leave");
    assert_eq!(leave["member"]["key"], "carol");
    assert_eq!(leave["member"]["info"]["name"], "Carol");
    assert!(
        gone.elapsed() >= Duration::from_secs(GRACE),
        "carol left before her grace ended"
    );
    assert!(joins_of(&before, "bob").is_empty(), "{before:?}");
    let after = quiet(&mut alice, Duration::from_secs(1)).await;
    assert!(joins_of(&after, "bob").is_empty(), "{after:?}");
}

/// Every frame until `at`.
async fn quiet_until(ws: &mut Ws, at: Instant) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let left = at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return out;
        }
        match next_event(ws, left).await {
            Got::Json(f) => out.push(f),
            Got::Closed(_) | Got::Timeout => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_max_members_with_events_only_occupancy_at_most_once_a_second() {
    init_logs();
    const OTHERS: usize = 9;
    let (_store, nats) = jetstream_nats("presence-occupancy");
    let (r1, r2) = pair(&nats, vec![rooms(3, 0)]).await;
    let mut alice = user(&r1, "alice", "Alice").await;
    subscribe_presence(&mut alice, 1, "rooms.7").await;

    // A burst of joins, on both relays: one change every quarter of a second or so.
    let start = Instant::now();
    let mut others = Vec::new();
    for i in 0..OTHERS {
        let r = if i % 2 == 0 { &r1 } else { &r2 };
        let mut ws = user(r, &format!("u{i}"), "U").await;
        let (ok, _) = ask(
            &mut ws,
            json!({"type": "subscribe", "id": 1, "channel": "rooms.7"}),
        )
        .await;
        assert_eq!(ok["type"], "ok", "{ok}");
        others.push(ws);
        // Spread over seconds, so that pacing, not the burst's brevity, bounds the frames.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let users = 1 + OTHERS;
    let (last, frames) = until(&mut alice, EXPECT, |f| {
        f["type"] == "occupancy" && f["users"] == users
    })
    .await;
    let elapsed = start.elapsed();
    let last = last.expect("an occupancy with every member");
    assert_eq!(
        last,
        json!({"type": "occupancy", "channel": "rooms.7", "clients": users, "users": users, "events": false})
    );
    let occupancy = frames.iter().filter(|f| f["type"] == "occupancy").count() + 1;
    let joins = frames.iter().filter(|f| f["type"] == "join").count();
    eprintln!("{occupancy} occupancy frames and {joins} joins in {elapsed:?}");
    assert!(
        occupancy as f64 <= elapsed.as_secs_f64() + 1.0,
        "{occupancy} occupancy frames in {elapsed:?}: {frames:?}"
    );
    assert!(joins <= 2, "joins only up to 3 members: {frames:?}");
    assert!(frames.iter().all(|f| f["type"] != "leave"), "{frames:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_return_every_member_once_in_key_order() {
    init_logs();
    const N: usize = 12;
    let (_store, nats) = jetstream_nats("presence-pages");
    let (r1, r2) = pair(&nats, vec![rooms(200, 10)]).await;
    let mut clients = Vec::new();
    let mut want = BTreeSet::new();
    for i in 0..N {
        let r = if i % 2 == 0 { &r1 } else { &r2 };
        let sub = format!("user-{:02}", (i * 7) % N);
        let mut ws = user(r, &sub, &sub).await;
        let (ok, _) = ask(
            &mut ws,
            json!({"type": "subscribe", "id": 1, "channel": "rooms.9"}),
        )
        .await;
        assert_eq!(ok["type"], "ok", "{ok}");
        want.insert(sub);
        clients.push(ws);
    }
    let mut reader = user(&r1, "zed", "Zed").await;
    let ok = subscribe_presence(&mut reader, 1, "rooms.9").await;
    want.insert("zed".into());
    assert_eq!(ok["presence"]["users"], N + 1, "{ok}");
    let mut got: Vec<String> = keys(&ok["presence"]);
    assert_eq!(ok["presence"]["complete"], true);
    // Paged by 5: the same members, once each, in order.
    let mut paged: Vec<String> = Vec::new();
    let mut after: Option<String> = None;
    for id in 10..30u64 {
        let mut req = json!({"type": "presence", "id": id, "channel": "rooms.9", "limit": 5});
        if let Some(a) = &after {
            req["after"] = json!(a);
        }
        let (page, _) = ask(&mut reader, req).await;
        assert_eq!(page["type"], "ok", "{page}");
        let p = &page["presence"];
        assert!(keys(p).len() <= 5);
        paged.extend(keys(p));
        if p["complete"] == true {
            assert!(p.get("next").is_none());
            break;
        }
        after = Some(p["next"].as_str().unwrap().to_owned());
        assert_eq!(after.as_deref(), paged.last().map(String::as_str));
    }
    let want: Vec<String> = want.into_iter().collect();
    assert_eq!(paged, want);
    got.sort();
    assert_eq!(got, want);
    assert!(
        r1.metric("wsrelay_presence_snapshot_reads_total{op=\"presence\"}")
            .await
            >= Some(3.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_subscriber_is_a_member_and_hears_no_presence() {
    init_logs();
    let (_store, nats) = jetstream_nats("presence-plain");
    let (r1, r2) = pair(&nats, vec![rooms(200, 10)]).await;
    let mut alice = user(&r1, "alice", "Alice").await;
    subscribe_presence(&mut alice, 1, "rooms.7").await;
    // On alice's relay: its events, had it any, would come in the same fan-out as hers.
    let mut carol = user(&r1, "carol", "Carol").await;
    let t = Instant::now();
    let (ok, _) = ask(
        &mut carol,
        json!({"type": "subscribe", "id": 1, "channel": "rooms.7"}),
    )
    .await;
    eprintln!("a plain subscribe to a presence binding: {:?}", t.elapsed());
    assert_eq!(ok, json!({"type": "ok", "id": 1}), "a plain ok");
    let (join, _) = until(&mut alice, EXPECT, |f| f["type"] == "join").await;
    assert_eq!(join.unwrap()["member"]["key"], "carol", "carol is a member");

    let mut dave = user(&r2, "dave", "Dave").await;
    let t = Instant::now();
    subscribe_presence(&mut dave, 1, "rooms.7").await;
    eprintln!(
        "a presence subscribe (relay 2 starts following the channel): {:?}",
        t.elapsed()
    );
    let (join, _) = until(&mut alice, EXPECT, |f| {
        f["type"] == "join" && f["member"]["key"] == "dave"
    })
    .await;
    assert!(join.is_some());
    let frames = quiet(&mut carol, Duration::from_millis(500)).await;
    assert!(!frames.iter().any(is_presence), "{frames:?}");
    // It may page all the same.
    let (page, _) = ask(
        &mut carol,
        json!({"type": "presence", "id": 2, "channel": "rooms.7"}),
    )
    .await;
    assert_eq!(
        keys(&page["presence"]),
        ["alice", "carol", "dave"],
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_errors_are_the_documented_ones() {
    init_logs();
    let (_store, nats) = jetstream_nats("presence-errors");
    let r1 = relay(
        &nats,
        "relay-1",
        vec![
            rooms(200, 10),
            binding("news.{topic}", "news.{topic}", Direction::Both),
        ],
    )
    .await;
    let mut c = user(&r1, "alice", "Alice").await;
    let code = |r: &Value| r["code"].as_u64();

    let (r, _) = ask(
        &mut c,
        json!({"type": "subscribe", "id": 1, "channel": "news.a", "presence": true}),
    )
    .await;
    assert_eq!(code(&r), Some(400), "{r}");
    assert_eq!(r["reason"], "the channel's binding has no presence");
    let (r, _) = ask(
        &mut c,
        json!({"type": "presence", "id": 2, "channel": "rooms.7"}),
    )
    .await;
    assert_eq!(code(&r), Some(404), "not subscribed: {r}");
    let (r, _) = ask(
        &mut c,
        json!({"type": "subscribe", "id": 3, "channel": "news.a"}),
    )
    .await;
    assert_eq!(r["type"], "ok");
    let (r, _) = ask(
        &mut c,
        json!({"type": "presence", "id": 4, "channel": "news.a"}),
    )
    .await;
    assert_eq!(code(&r), Some(400), "{r}");
    let (r, _) = ask(
        &mut c,
        json!({"type": "presence", "id": 5, "channel": "rooms.7", "limit": 1001}),
    )
    .await;
    assert_eq!(code(&r), Some(400), "{r}");
    let (r, _) = ask(
        &mut c,
        json!({"type": "publish", "id": 6, "channel": "rooms.7", "text": "x", "presence": true}),
    )
    .await;
    assert_eq!(code(&r), Some(400), "{r}");
    // An unsubscribe ends the membership: the next one sees alice in her grace, with no
    // client. (Eve keeps the relay watching the channel: a relay that starts watching it
    // later does not know who is in their grace.)
    let mut eve = user(&r1, "eve", "Eve").await;
    let (r, _) = ask(
        &mut eve,
        json!({"type": "subscribe", "id": 1, "channel": "rooms.7"}),
    )
    .await;
    assert_eq!(r["type"], "ok");
    subscribe_presence(&mut c, 7, "rooms.7").await;
    let (r, _) = ask(
        &mut c,
        json!({"type": "unsubscribe", "id": 8, "channel": "rooms.7"}),
    )
    .await;
    assert_eq!(r["type"], "ok");
    let mut d = user(&r1, "dave", "Dave").await;
    let ok = subscribe_presence(&mut d, 1, "rooms.7").await;
    assert_eq!(keys(&ok["presence"]), ["alice", "dave", "eve"], "{ok}");
    assert_eq!(
        member(&ok["presence"], "alice").unwrap()["clients"],
        0,
        "alice is in her grace: {ok}"
    );
    assert_eq!(ok["presence"]["clients"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_members_of_a_killed_relay_leave_once_the_survivor_purges_it() {
    init_logs();
    const LEASE: u64 = 3;
    const GRACE: u64 = 1;
    let (_store, nats) = jetstream_nats("presence-killed");
    let r1 = TestRelay::builder(&nats)
        .hs256()
        .registry(BUCKET, "relay-1", LEASE)
        .with_binding(rooms(200, GRACE))
        .start()
        .await;
    // Relay 2 is the binary, to be killed.
    let config = TestRelay::builder(&nats)
        .hs256()
        .registry(BUCKET, "relay-2", LEASE)
        .with_binding(rooms(200, GRACE))
        .build();
    let dir = std::env::temp_dir().join(format!("wsrelay-presence-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("relay-2.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let mut r2 = RelayProcess::spawn(env!("CARGO_BIN_EXE_wsrelay").as_ref(), &path, "info");
    assert!(
        eventually(EXPECT, || async {
            metric(r2.admin, "wsrelay_registry_ready").await == Some(1.0)
        })
        .await
    );

    let mut alice = user(&r1, "alice", "Alice").await;
    subscribe_presence(&mut alice, 1, "rooms.7").await;
    let mut c = claims("bob");
    c["name"] = json!("Bob");
    let mut bob = connect(r2.client, &format!("?token={}", hs256(c))).await;
    subscribe_presence(&mut bob, 1, "rooms.7").await;
    let (join, _) = until(&mut alice, EXPECT, |f| f["type"] == "join").await;
    assert_eq!(join.unwrap()["member"]["key"], "bob");

    r2.child.kill().unwrap();
    r2.child.wait().unwrap();
    let killed = Instant::now();
    // Bound: the lease, the expiry marker's delivery, the purge, the grace; generous.
    let (leave, seen) = until(&mut alice, Duration::from_secs(LEASE + GRACE + 30), |f| {
        f["type"] == "leave"
    })
    .await;
    let after = killed.elapsed();
    eprintln!("bob left {after:?} after relay 2 was killed");
    assert_eq!(leave.expect("a leave")["member"]["key"], "bob", "{seen:?}");
    let (page, _) = ask(
        &mut alice,
        json!({"type": "presence", "id": 2, "channel": "rooms.7"}),
    )
    .await;
    assert_eq!(keys(&page["presence"]), ["alice"], "{page}");
    let _ = std::fs::remove_dir_all(&dir);
}
