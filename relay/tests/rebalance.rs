//! Rebalancing, the relay's part (docs/autoscaling.md, "Rebalancing"): `POST /rebalance` on
//! the admin port makes the relay not ready and refuse new connections, move the oldest
//! connections whose subscriptions are all resumable (a `drain` frame with
//! `reason: "rebalance"`, then 1012 at the turn), keep the others, and be ready again after
//! the round. A moved client resumes its channel with nothing lost.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{Value, json};
use wsrelay::config::{Direction, History};
use wsrelay_testkit::prelude::*;

const STREAM: &str = "WSRELAY_TEST_REBALANCE";

/// `orders.{id}` resumable, `news` plain.
async fn relay(tag: &str) -> (StoreDir, Nats, TestRelay) {
    init_logs();
    let (store, nats) = jetstream_nats(tag);
    let mut orders = binding("orders.{id}", "orders.{id}", Direction::Both);
    let history: History =
        serde_json::from_value(json!({"stream": STREAM, "maxMessages": 100, "maxAgeSeconds": 300}))
            .unwrap();
    orders.history = Some(history);
    let relay = TestRelay::builder(&nats.url())
        .with_binding(orders)
        .binding("news", "public.news", Direction::Both)
        .streams_ready(1)
        .start()
        .await;
    (store, nats, relay)
}

/// A client connected after the previous one (the relay orders them by connect time, in ms),
/// subscribed to `channel` if any; with the channel's epoch when it is resumable.
async fn client(relay: &TestRelay, channel: Option<&str>) -> (Client, Option<String>) {
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (mut c, _) = Client::connect(relay.addr()).welcomed().await;
    let mut epoch = None;
    if let Some(ch) = channel {
        match c.subscribe(ch).await {
            Frame::Ok { epoch: e, .. } => epoch = e,
            f => panic!("{f:?}"),
        }
    }
    (c, epoch)
}

/// The `drain` frame's reason and the close code, or `None`s if the connection stays open
/// for `within`.
async fn moved(c: &mut Client, within: Duration) -> (Option<String>, Option<u16>) {
    let deadline = tokio::time::Instant::now() + within;
    let mut reason = None;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.next(left).await {
            Event::Frame(Frame::Drain { reason: r, .. }) => reason = r,
            Event::Frame(_) => {}
            Event::Closed(code) => return (reason, code),
            Event::Timeout => return (reason, None),
        }
    }
}

fn status_of(head: &str) -> u16 {
    head[9..12].parse().unwrap()
}

/// The round's wait before the first turn, its window and the settle after the last, with
/// margin for a loaded machine.
const ROUND: Duration = Duration::from_secs(3 + 1 + 5 + 10);

#[tokio::test]
async fn a_relay_sheds_its_oldest_resumable_connections_and_keeps_the_rest() {
    let (_store, nats, relay) = relay("rebalance-shed").await;
    let (addr, admin) = (relay.addr(), relay.admin());
    // Oldest first: one with no subscription, four on resumable channels, one on a plain one.
    let (mut none, _) = client(&relay, None).await;
    let mut orders = Vec::new();
    let mut epoch = None;
    for i in 1..=4 {
        let (c, e) = client(&relay, Some(&format!("orders.{i}"))).await;
        epoch = epoch.or(e);
        orders.push(c);
    }
    let epoch = epoch.expect("a resumable channel's ok names its epoch");
    let (mut plain, _) = client(&relay, Some("news")).await;

    for bad in [
        "",
        "{}",
        r#"{"shed":3}"#,
        r#"{"shed":3,"windowMs":1000,"other":true}"#,
    ] {
        let (status, body) = http_post(admin, "/rebalance", bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("windowMs"), "{body}");
    }
    let (status, body) = http_post(admin, "/rebalance", r#"{"shed":3,"windowMs":1000}"#).await;
    assert_eq!(status, 200, "{body}");
    let round: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(round, json!({"picked": 3, "eligible": 5, "windowMs": 1000}));
    assert_eq!(metric(admin, "wsrelay_rebalancing ").await, Some(1.0));

    // Shedding: not ready, new connections refused (a client retries elsewhere), a second
    // round refused.
    assert_eq!(http_get(admin, "/ready").await, (503, "rebalancing".into()));
    let head = raw_upgrade(addr, "").await;
    assert_eq!(status_of(&head), 503, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1\r\n"),
        "{head}"
    );
    let (status, body) = http_post(admin, "/rebalance", r#"{"shed":1,"windowMs":0}"#).await;
    assert_eq!(status, 409, "{body}");

    // Messages published on a moving client's channel while it moves.
    let nc = async_nats::connect(nats.url()).await.unwrap();
    let mut last = 0;
    for i in 0..5 {
        nc.publish("orders.1", i.to_string().into()).await.unwrap();
    }
    nc.flush().await.unwrap();

    // The three oldest movable ones move: the one with no subscription, orders.1, orders.2.
    let (reason, code) = moved(&mut none, ROUND).await;
    assert_eq!((reason.as_deref(), code), (Some("rebalance"), Some(1012)));
    let mut order1 = orders.remove(0);
    for f in order1.messages(5, Duration::from_secs(10)).await {
        if let Frame::Message { seq: Some(s), .. } = f {
            last = s;
        }
    }
    assert!(last > 0, "orders.1 got its messages before it moved");
    let (reason, code) = moved(&mut order1, ROUND).await;
    assert_eq!((reason.as_deref(), code), (Some("rebalance"), Some(1012)));
    let (reason, code) = moved(&mut orders[0], ROUND).await;
    assert_eq!((reason.as_deref(), code), (Some("rebalance"), Some(1012)));
    for i in 5..10 {
        nc.publish("orders.1", i.to_string().into()).await.unwrap();
    }
    nc.flush().await.unwrap();
    // The younger ones and the plain one stay, and are served.
    for c in orders.iter_mut().skip(1).chain([&mut plain]) {
        assert_eq!(moved(c, Duration::from_millis(200)).await, (None, None));
        assert!(matches!(c.ping().await, Frame::Pong { .. }));
    }
    assert_eq!(
        metric(admin, "wsrelay_rebalance_moved_total").await,
        Some(3.0)
    );
    // Counted once each has closed (after the reader's linger).
    assert!(
        eventually(Duration::from_secs(10), || async {
            metric(
                admin,
                "wsrelay_connections_closed_total{reason=\"rebalance\"}",
            )
            .await
                == Some(3.0)
        })
        .await
    );

    // Ready again after the round; the moved client resumes where it left off.
    assert!(
        eventually(ROUND, || async { http_get(admin, "/ready").await.0 == 200 }).await,
        "ready again after the round"
    );
    assert_eq!(metric(admin, "wsrelay_rebalancing ").await, Some(0.0));
    let (mut back, _) = Client::connect(addr).welcomed().await;
    let ok = back
        .resume(
            "orders.1",
            serde_json::from_value(json!({"epoch": epoch, "seq": last})).unwrap(),
        )
        .await;
    assert!(
        matches!(
            ok,
            Frame::Ok {
                recovered: Some(true),
                ..
            }
        ),
        "{ok:?}"
    );
    let got: Vec<String> = back
        .messages(10 - last as usize, Duration::from_secs(10))
        .await
        .into_iter()
        .filter_map(|f| match f {
            Frame::Message { payload, .. } => payload.map(|p| p.to_string()),
            _ => None,
        })
        .collect();
    let want: Vec<String> = (last..10).map(|i| i.to_string()).collect();
    assert_eq!(got, want, "nothing lost or doubled across the move");
}

#[tokio::test]
async fn plain_channel_connections_move_only_when_asked() {
    let (_store, _nats, relay) = relay("rebalance-plain").await;
    let admin = relay.admin();
    let (mut plain, _) = client(&relay, Some("news")).await;
    let (mut order, _) = client(&relay, Some("orders.7")).await;
    let (status, body) = http_post(
        admin,
        "/rebalance",
        r#"{"shed":5,"windowMs":500,"includePlainChannels":true}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let round: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(round, json!({"picked": 2, "eligible": 2, "windowMs": 500}));
    for c in [&mut plain, &mut order] {
        let (reason, code) = moved(c, ROUND).await;
        assert_eq!((reason.as_deref(), code), (Some("rebalance"), Some(1012)));
    }
}
