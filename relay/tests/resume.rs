//! Resumable channels (docs/protocol.md section 8) against a real nats-server with
//! JetStream: positions on every message, resume after a disconnect with nothing lost or
//! doubled, `recovered: false` for a stale epoch or a position older than the history,
//! replays racing live publishes, NATS restarted mid-stream, publishes stored before `ok`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use wsrelay::config::{Direction, History};
use wsrelay_testkit::prelude::*;

const STREAM: &str = "WSRELAY_TEST_ORDERS";

/// `orders.{id}` resumable, keeping `max_messages` (the send queue holds as many), and
/// `news`, not resumable.
fn resumable_config(nats_url: &str, max_messages: u32) -> RelayBuilder {
    let mut orders = binding("orders.{id}", "orders.{id}", Direction::Both);
    // From the config's own form: the limits left out take their defaults.
    let history: History = serde_json::from_value(
        json!({"stream": STREAM, "maxMessages": max_messages, "maxAgeSeconds": 300}),
    )
    .unwrap();
    orders.history = Some(history);
    TestRelay::builder(nats_url)
        .config(|c| c.limits.send_queue_len = c.limits.send_queue_len.max(max_messages))
        .with_binding(orders)
        .binding("news", "public.news", Direction::Both)
}

/// A JetStream nats-server (its store removed after it) and a relay whose `orders.{id}`
/// channels keep `max_messages` each, started once its history stream is in place.
async fn resumable_relay(tag: &str, max_messages: u32) -> (StoreDir, Nats, TestRelay) {
    init_logs();
    let (store, nats) = jetstream_nats(tag);
    let relay = resumable_config(&nats.url(), max_messages)
        .streams_ready(1)
        .start()
        .await;
    (store, nats, relay)
}

async fn publish_all(nc: &async_nats::Client, subject: &str, from: u64, to: u64) {
    for i in from..to {
        nc.publish(subject.to_owned(), i.to_string().into())
            .await
            .unwrap();
    }
    nc.flush().await.unwrap();
}

/// Reads message frames until `want` of them came or `quiet` passes without one; checks
/// that every one carries a position above the last and a `prev` equal to the last.
async fn read_chain(ws: &mut Ws, last: &mut u64, want: usize, quiet: Duration) -> Vec<u64> {
    let mut payloads = Vec::new();
    while payloads.len() < want {
        match next_event(ws, quiet).await {
            Got::Json(v) if v["type"] == "message" => {
                let seq = v["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {v}"));
                let prev = v["prev"].as_u64().unwrap_or_else(|| panic!("no prev: {v}"));
                assert!(seq > *last, "seq {seq} not above {last}: {v}");
                assert_eq!(prev, *last, "prev of {v} is not the last position {last}");
                *last = seq;
                payloads.push(v["payload"].as_u64().unwrap());
            }
            Got::Json(v) => panic!("unexpected frame {v}"),
            Got::Closed(c) => panic!("closed {c:?}"),
            Got::Timeout => break,
        }
    }
    payloads
}

/// Waits until the history stream has stored its message `seq`: what core NATS publishes
/// reaches the stream asynchronously, after the publisher's `flush`.
async fn stream_stored(nc: &async_nats::Client, seq: u64) {
    let js = async_nats::jetstream::new(nc.clone());
    assert!(
        eventually(Duration::from_secs(20), || {
            let js = js.clone();
            async move {
                match js.get_stream(STREAM).await {
                    Ok(s) => s.cached_info().state.last_sequence >= seq,
                    Err(_) => false,
                }
            }
        })
        .await,
        "the stream did not store message {seq}"
    );
}

async fn resume(ws: &mut Ws, id: u64, channel: &str, epoch: &str, seq: u64) -> Value {
    request(
        ws,
        json!({"type": "subscribe", "id": id, "channel": channel,
               "since": {"epoch": epoch, "seq": seq}}),
    )
    .await
}

#[tokio::test]
async fn a_client_resumes_after_a_disconnect_with_nothing_lost_or_doubled() {
    let (_store, nats, relay) = resumable_relay("basic", 100).await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    let nc = nats.client().await;

    let mut ws = connect(addr, "").await;
    let ok = subscribe(&mut ws, 1, "orders.7").await;
    assert_eq!(ok["type"], "ok", "{ok}");
    let epoch = ok["epoch"].as_str().unwrap().to_owned();
    assert!(ok.get("recovered").is_none(), "{ok}");
    let mut last = ok["seq"].as_u64().unwrap();
    publish_all(&nc, "orders.7", 0, 10).await;
    let got = read_chain(&mut ws, &mut last, 10, Duration::from_secs(20)).await;
    assert_eq!(got, (0..10).collect::<Vec<_>>());
    drop(ws);
    // The relay ends the channel's entry once it has read the close: until then a client
    // coming back would join the old entry, and no second stream read would make its ring.
    assert!(
        eventually(Duration::from_secs(20), || async {
            relay.relay.hub.subject_count() == 0
        })
        .await,
        "the channel's entry outlived its only client"
    );

    // Published while the client is away, with another channel's messages in between.
    publish_all(&nc, "orders.8", 100, 105).await;
    publish_all(&nc, "orders.7", 10, 25).await;
    // Stored before the client comes back, so the stream reads counted below do not depend
    // on how far the stream had got.
    stream_stored(&nc, 30).await;
    let mut ws = connect(addr, "").await;
    let ok = resume(&mut ws, 2, "orders.7", &epoch, last).await;
    assert_eq!(ok["recovered"], true, "{ok}");
    assert_eq!(ok["seq"].as_u64(), Some(last), "{ok}");
    let got = read_chain(&mut ws, &mut last, 15, Duration::from_secs(20)).await;
    assert_eq!(got, (10..25).collect::<Vec<_>>(), "the replay");
    publish_all(&nc, "orders.7", 25, 30).await;
    let got = read_chain(&mut ws, &mut last, 5, Duration::from_secs(20)).await;
    assert_eq!(got, (25..30).collect::<Vec<_>>(), "live after the replay");
    assert!(
        read_chain(&mut ws, &mut last, 1, Duration::from_millis(300))
            .await
            .is_empty(),
        "nothing more"
    );
    assert_eq!(
        metric(admin, "wsrelay_history_resumes_total{reason=\"recovered\"}").await,
        Some(1.0)
    );
    // The channel's entry left with its only client and came back with it: one stream
    // read made its ring each time; the resume itself needed no other read.
    assert_eq!(
        metric(admin, "wsrelay_history_reads_total{reason=\"load\"}").await,
        Some(2.0)
    );
    assert_eq!(
        metric(admin, "wsrelay_history_reads_total{reason=\"check\"}").await,
        None
    );
    relay.drain().await;
}

/// A client that subscribed before the stream had any message holds position 0 (its `ok`);
/// it resumes from there on a relay whose ring was made afresh: the stream never removed a
/// message, so nothing was lost.
#[tokio::test]
async fn a_client_that_subscribed_before_any_message_resumes_from_zero() {
    let (_store, nats, relay) = resumable_relay("zero", 100).await;
    let addr = relay.client_addr;
    let nc = nats.client().await;

    let mut ws = connect(addr, "").await;
    let ok = subscribe(&mut ws, 1, "orders.7").await;
    assert_eq!(ok["seq"], 0, "{ok}");
    let epoch = ok["epoch"].as_str().unwrap().to_owned();
    drop(ws);
    // The channel's entry leaves with its client; messages come while it is away.
    publish_all(&nc, "orders.8", 100, 102).await;
    publish_all(&nc, "orders.7", 0, 3).await;
    let mut ws = connect(addr, "").await;
    let ok = resume(&mut ws, 2, "orders.7", &epoch, 0).await;
    assert_eq!(ok["recovered"], true, "{ok}");
    let mut last = 0;
    let got = read_chain(&mut ws, &mut last, 3, Duration::from_secs(20)).await;
    assert_eq!(got, [0, 1, 2]);
}

#[tokio::test]
async fn stale_epochs_and_positions_past_the_window_are_not_recovered() {
    let (_store, nats, relay) = resumable_relay("window", 5).await;
    let addr = relay.client_addr;
    let nc = nats.client().await;
    let mut ws = connect(addr, "").await;
    let ok = subscribe(&mut ws, 1, "orders.1").await;
    let epoch = ok["epoch"].as_str().unwrap().to_owned();
    let mut last = ok["seq"].as_u64().unwrap();
    publish_all(&nc, "orders.1", 0, 3).await;
    read_chain(&mut ws, &mut last, 3, Duration::from_secs(20)).await;
    drop(ws);
    // Twenty while away: the channel keeps five, so the client's position is gone (once
    // the stream has stored them: until it holds more than five after the position, the
    // position is still in it).
    publish_all(&nc, "orders.1", 3, 23).await;
    stream_stored(&nc, 23).await;

    let mut ws = connect(addr, "").await;
    let ok = resume(&mut ws, 2, "orders.1", &epoch, last).await;
    assert_eq!(ok["recovered"], false, "{ok}");
    let head = ok["seq"].as_u64().unwrap();
    assert!(head > last, "{ok}");
    assert!(
        drain_messages(&mut ws, Duration::from_millis(300))
            .await
            .is_empty(),
        "nothing partial"
    );
    // Live delivery goes on from the head.
    let mut pos = head;
    publish_all(&nc, "orders.1", 23, 25).await;
    assert_eq!(
        read_chain(&mut ws, &mut pos, 2, Duration::from_secs(20)).await,
        [23, 24]
    );

    // Another epoch: not recovered, nothing replayed.
    let mut other = connect(addr, "").await;
    let ok = resume(&mut other, 3, "orders.1", "not-this-stream", last).await;
    assert_eq!(ok["recovered"], false, "{ok}");
    assert!(
        drain_messages(&mut other, Duration::from_millis(300))
            .await
            .is_empty()
    );
    // A position beyond the stream: not recovered.
    let ok = resume(&mut other, 4, "orders.2", &epoch, 1_000_000).await;
    assert_eq!(ok["recovered"], false, "{ok}");
    relay.drain().await;
}

#[tokio::test]
async fn foreign_and_malformed_positions_get_defined_answers() {
    let (_store, nats, relay) = resumable_relay("foreign", 100).await;
    let addr = relay.client_addr;
    let nc = nats.client().await;
    publish_all(&nc, "orders.secret", 0, 5).await;
    publish_all(&nc, "orders.mine", 100, 102).await;
    stream_stored(&nc, 7).await;
    let mut ws = connect(addr, "").await;
    let ok = subscribe(&mut ws, 1, "orders.mine").await;
    let epoch = ok["epoch"].as_str().unwrap().to_owned();
    // Position 1 is a message of orders.secret: only orders.mine's messages after it are
    // replayed, never the other channel's.
    let mut again = connect(addr, "").await;
    let ok = resume(&mut again, 2, "orders.mine", &epoch, 1).await;
    assert_eq!(ok["recovered"], true, "{ok}");
    let got = messages_then_quiet(&mut again, 2).await;
    let payloads: Vec<u64> = got.iter().map(|m| m["payload"].as_u64().unwrap()).collect();
    assert_eq!(payloads, [100, 101], "{got:?}");
    assert!(got.iter().all(|m| m["channel"] == "orders.mine"));
    // Malformed positions are refused with 400 and the connection stays.
    for (id, since) in [
        (3, json!({"epoch": epoch, "seq": -1})),
        (4, json!({"epoch": 5, "seq": 1})),
        (5, json!("e:1")),
        (6, json!({"epoch": epoch})),
    ] {
        let r = request(
            &mut again,
            json!({"type": "subscribe", "id": id, "channel": "orders.x", "since": since}),
        )
        .await;
        assert_eq!(r["code"], 400, "{r}");
    }
    // On a channel without history: accepted, not recovered.
    let r = resume(&mut again, 7, "news", &epoch, 3).await;
    assert_eq!(r["type"], "ok", "{r}");
    assert_eq!(r["recovered"], false, "{r}");
    relay.drain().await;
}

#[tokio::test]
async fn publishes_on_resumable_channels_are_stored_before_ok() {
    let (_store, _nats, relay) = resumable_relay("publish", 100).await;
    let mut reader = connect(relay.client_addr, "").await;
    let ok = subscribe(&mut reader, 1, "orders.p").await;
    let mut last = ok["seq"].as_u64().unwrap();
    let mut writer = connect(relay.client_addr, "").await;
    let first = request(
        &mut writer,
        json!({"type": "publish", "id": 1, "channel": "orders.p", "payload": 1, "msgId": "m-1"}),
    )
    .await;
    assert_eq!(first["type"], "ok", "{first}");
    let seq = first["seq"].as_u64().unwrap();
    assert!(first.get("duplicate").is_none(), "{first}");
    let again = request(
        &mut writer,
        json!({"type": "publish", "id": 2, "channel": "orders.p", "payload": 1, "msgId": "m-1"}),
    )
    .await;
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["seq"].as_u64(), Some(seq), "{again}");
    let mut got = read_chain(&mut reader, &mut last, 1, Duration::from_secs(20)).await;
    got.extend(read_chain(&mut reader, &mut last, 1, Duration::from_millis(500)).await);
    assert_eq!(got, [1], "stored once, delivered once");
    assert_eq!(last, seq);
    relay.drain().await;
}

/// Replays race a publisher at full speed: a client reconnects and resumes five times while
/// 2,000 messages go out; it ends with every message, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_racing_live_publishes_lose_and_double_nothing() {
    init_logs();
    let (_store, nats) = jetstream_nats("race");
    // A window that holds everything: what is measured is the merge, not the window.
    let relay = resumable_config(&nats.url(), 4_096)
        .streams_ready(1)
        .start()
        .await;
    let addr = relay.client_addr;
    let nc = nats.client().await;
    let total: u64 = 2_000;
    let mut ws = connect(addr, "").await;
    let ok = subscribe(&mut ws, 1, "orders.race").await;
    let epoch = ok["epoch"].as_str().unwrap().to_owned();
    let mut last = ok["seq"].as_u64().unwrap();
    let publisher = tokio::spawn({
        let nc = nc.clone();
        async move {
            for i in 0..total {
                nc.publish("orders.race", i.to_string().into())
                    .await
                    .unwrap();
                if i % 50 == 49 {
                    nc.flush().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            nc.flush().await.unwrap();
        }
    });
    let mut got: Vec<u64> = Vec::new();
    for round in 0..5 {
        got.extend(read_chain(&mut ws, &mut last, 150, Duration::from_secs(20)).await);
        drop(ws);
        tokio::time::sleep(Duration::from_millis(20)).await;
        ws = connect(addr, "").await;
        let ok = resume(&mut ws, 10 + round, "orders.race", &epoch, last).await;
        assert_eq!(ok["recovered"], true, "round {round}: {ok}");
    }
    publisher.await.unwrap();
    while (got.len() as u64) < total {
        let more = read_chain(&mut ws, &mut last, 1_000, Duration::from_secs(20)).await;
        if more.is_empty() {
            break;
        }
        got.extend(more);
    }
    let distinct: BTreeSet<u64> = got.iter().copied().collect();
    assert_eq!(distinct.len(), got.len(), "duplicates");
    let first_wrong = got.iter().enumerate().find(|(i, v)| **v != *i as u64);
    assert_eq!(first_wrong, None, "lost or reordered");
    assert_eq!(got.len() as u64, total, "lost at the end");
    relay.drain().await;
}

/// NATS itself restarts (JetStream keeps its store on disk): the relay reconnects, the
/// stream's epoch is the same, and a client that resumes gets what was published before
/// and after the restart.
#[tokio::test]
async fn nats_restarted_mid_stream_loses_nothing() {
    init_logs();
    let (dir, mut nats) = jetstream_nats("restart");
    let port = nats.port;
    let relay = resumable_config(&nats.url(), 100)
        .streams_ready(1)
        .start()
        .await;
    let addr = relay.client_addr;
    let nc = nats.client().await;
    let mut ws = connect(addr, "").await;
    let ok = subscribe(&mut ws, 1, "orders.r").await;
    let epoch = ok["epoch"].as_str().unwrap().to_owned();
    let mut last = ok["seq"].as_u64().unwrap();
    publish_all(&nc, "orders.r", 0, 5).await;
    let mut got = read_chain(&mut ws, &mut last, 5, Duration::from_secs(20)).await;
    drop(nc);
    nats.stop();
    let nats = Nats::start_with(port, &["-js", "-sd", dir.to_str().unwrap()]);
    let nc = nats.client().await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            metric(relay.admin_addr, "wsrelay_nats_connected").await == Some(1.0)
        })
        .await
    );
    publish_all(&nc, "orders.r", 5, 10).await;
    // The subscription survived the restart (async-nats resubscribes); if it had missed
    // anything the resync after the reconnection read it from the stream.
    got.extend(read_chain(&mut ws, &mut last, 5, Duration::from_secs(20)).await);
    assert_eq!(got, (0..10).collect::<Vec<_>>());
    drop(ws);
    publish_all(&nc, "orders.r", 10, 12).await;
    let mut ws = connect(addr, "").await;
    let ok = resume(&mut ws, 2, "orders.r", &epoch, last).await;
    assert_eq!(ok["recovered"], true, "{ok}");
    assert_eq!(
        read_chain(&mut ws, &mut last, 2, Duration::from_secs(20)).await,
        [10, 11]
    );
    relay.drain().await;
}

/// A three-server NATS cluster on loopback (JetStream, replicas 3). The relay knows only
/// the first server and is killed off it mid-stream: it moves to another (learned from the
/// cluster), reads from the stream what was stored while it was away, and its client gets
/// every message the stream stored, in order, once, without reconnecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_server_killed_mid_stream_loses_nothing() {
    init_logs();
    // Each server names the route ports of all three, so those are chosen before any starts:
    // one taken meanwhile by another process makes its server exit, and then all three
    // start again on other ports. Client ports are picked by nats-server itself.
    let mut attempt = 0;
    let mut servers: Vec<(Nats, StoreDir)> = loop {
        attempt += 1;
        let cports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes = cports
            .iter()
            .map(|c| format!("nats://127.0.0.1:{c}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers = Vec::new();
        let mut failed = None;
        for (i, cport) in cports.iter().enumerate() {
            let dir = StoreDir::new(&format!("c{i}"));
            match Nats::try_start_args(&[
                "-js",
                "-sd",
                dir.to_str().unwrap(),
                "--server_name",
                &format!("n{i}"),
                "--cluster_name",
                "wsrelay-test",
                "--cluster",
                &format!("nats://127.0.0.1:{cport}"),
                "--routes",
                &routes,
            ]) {
                Ok(nats) => servers.push((nats, dir)),
                Err(log) => {
                    failed = Some(log);
                    break;
                }
            }
        }
        match failed {
            None => break servers,
            Some(log) if attempt < 4 => {
                eprintln!("a cluster server did not start; again on other ports:\n{log}");
            }
            Some(log) => panic!("the cluster did not start:\n{log}"),
        }
    };
    let relay = resumable_config(&servers[0].0.url(), 100)
        .config(|c| c.bindings[0].history.as_mut().unwrap().replicas = 3)
        // The stream needs the JetStream cluster formed: the relay retries until it is.
        .start()
        .await;
    let admin = relay.admin_addr;
    assert!(
        eventually(Duration::from_secs(60), || async {
            metric(admin, "wsrelay_history_streams_ready").await == Some(1.0)
        })
        .await,
        "no R3 stream"
    );
    let mut ws = connect(relay.client_addr, "").await;
    let ok = subscribe(&mut ws, 1, "orders.c").await;
    assert_eq!(ok["type"], "ok", "{ok}");
    let mut last = ok["seq"].as_u64().unwrap();

    // The backend publishes through the third server and counts what the stream stored
    // (acknowledged publishes, retried under a message id while the cluster re-elects).
    let js_client = servers[2].0.client().await;
    let total: u64 = 400;
    let publisher = tokio::spawn(async move {
        let js = async_nats::jetstream::new(js_client);
        for i in 0..total {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("c-{i}").as_str());
            let mut stored = false;
            for _ in 0..200 {
                let ack = async {
                    js.publish_with_headers("orders.c", headers.clone(), i.to_string().into())
                        .await
                        .ok()?
                        .await
                        .ok()
                };
                if tokio::time::timeout(Duration::from_secs(2), ack)
                    .await
                    .ok()
                    .flatten()
                    .is_some()
                {
                    stored = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(stored, "message {i} never stored");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let mut got = read_chain(&mut ws, &mut last, 100, Duration::from_secs(10)).await;
    // Kill the server the relay is connected to.
    servers[0].0.stop();
    assert!(
        eventually(Duration::from_secs(30), || async {
            metric(admin, "wsrelay_nats_disconnects_total").await >= Some(1.0)
                && metric(admin, "wsrelay_nats_connected").await == Some(1.0)
        })
        .await,
        "the relay did not move to another server"
    );
    publisher.await.unwrap();
    while (got.len() as u64) < total {
        let more = read_chain(&mut ws, &mut last, 1_000, Duration::from_secs(10)).await;
        if more.is_empty() {
            break;
        }
        got.extend(more);
    }
    let first_wrong = got.iter().enumerate().find(|(i, v)| **v != *i as u64);
    assert_eq!(first_wrong, None, "lost, doubled or reordered");
    assert_eq!(got.len() as u64, total, "lost at the end");
    eprintln!(
        "cluster: {total} delivered in order; history reads: fill {:?}, gaps filled {:?}",
        metric(admin, "wsrelay_history_reads_total{reason=\"fill\"}").await,
        metric(admin, "wsrelay_history_gaps_total{reason=\"filled\"}").await,
    );
    relay.drain().await;
}

/// A WebSocket client with a 4 KiB receive buffer: a client that stops reading fills the
/// relay's send queue after a few hundred KiB instead of the megabytes loopback buffers hold.
async fn connect_small_window(addr: std::net::SocketAddr) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(
        format!("ws://{addr}/ws"),
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
    )
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await.unwrap()["type"], "welcome");
    ws
}

/// Slow-consumer policy `dropOldest` on a resumable channel (protocol sections 5 and 8): the
/// `dropped` notice names the channel, the next message's `prev` shows the hole, and a client
/// that subscribes again from its last position is told `recovered: false` (the history holds
/// at most `sendQueueLen` messages of the channel, all newer than what was dropped), then
/// receives a gap-free chain again.
#[tokio::test]
async fn a_slow_client_on_a_resumable_channel_is_told_of_the_hole() {
    init_logs();
    let (_store, nats) = jetstream_nats("dropped");
    let relay = resumable_config(&nats.url(), 16)
        .send_queue_len(16)
        .slow_consumer_policy(SlowConsumerPolicy::DropOldest)
        .streams_ready(1)
        .start()
        .await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    let nc = nats.client().await;

    let mut ws = connect_small_window(addr).await;
    let ok = subscribe(&mut ws, 1, "orders.7").await;
    let epoch = ok["epoch"].as_str().unwrap().to_owned();
    let mut last = ok["seq"].as_u64().unwrap();

    // Publish 1 KiB messages, unread, until the relay drops some for this client, then a
    // few more (bounded: at most 12,000 messages, 12 MiB: the relay's socket buffer can take 4 MiB).
    let pad = "x".repeat(1024);
    let dropped_metric = "wsrelay_messages_dropped_total{reason=\"slow_consumer_drop_oldest\"}";
    let mut total = 0u64;
    let mut extra = None;
    while total < 12_000 && extra.is_none_or(|n| n > 0) {
        for i in total..total + 100 {
            nc.publish("orders.7", json!({"i": i, "pad": pad}).to_string().into())
                .await
                .unwrap();
        }
        nc.flush().await.unwrap();
        total += 100;
        extra = match extra {
            None if metric(admin, dropped_metric).await.unwrap_or(0.0) > 0.0 => Some(2),
            Some(n) => Some(n - 1),
            e => e,
        };
    }
    // The relay may still be behind the publisher (messages a fan-out writes to an idle
    // connection at once fill the socket before any queue): wait for it to catch up.
    assert!(
        extra.is_some()
            || eventually(Duration::from_secs(30), || async {
                metric(admin, dropped_metric).await.unwrap_or(0.0) > 0.0
            })
            .await,
        "{total} messages published, nothing dropped"
    );
    // Until the relay has taken in every message: each one now drops an older one.
    let mut seen = -1.0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = metric(admin, dropped_metric).await.unwrap_or(0.0);
        if now == seen {
            break;
        }
        seen = now;
    }

    // Read what comes; on the hole, subscribe again from the last position, as the SDK does.
    let (mut notices, mut delivered) = (0u64, 0u64);
    let mut resync = None;
    let mut answer = None;
    // Until 3 s pass without a frame once the resubscribe is answered; before that, a pause
    // (a loaded machine) is waited out, up to 30 s in all.
    let patience = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let quiet = if answer.is_some() {
            Duration::from_secs(3)
        } else {
            patience.saturating_duration_since(tokio::time::Instant::now())
        };
        match next_event(&mut ws, quiet).await {
            Got::Json(v) if v["type"] == "dropped" => {
                assert_eq!(v["channel"], "orders.7", "{v}");
                notices += v["count"].as_u64().unwrap();
            }
            Got::Json(v) if v["type"] == "message" => {
                let (seq, prev) = (v["seq"].as_u64().unwrap(), v["prev"].as_u64().unwrap());
                if resync.is_some() && answer.is_none() {
                    continue; // the old subscription's tail, before the answer
                }
                // A hole: `prev` above the last position held (after an `ok`, the first
                // `prev` may be below its position, section 8).
                if prev > last {
                    assert!(
                        answer.is_none(),
                        "a hole after the resubscribe: {v}, last {last}"
                    );
                    send(
                        &mut ws,
                        json!({"type":"unsubscribe","id":2,"channel":"orders.7"}),
                    )
                    .await;
                    send(
                        &mut ws,
                        json!({"type":"subscribe","id":3,"channel":"orders.7",
                               "since":{"epoch":epoch,"seq":last}}),
                    )
                    .await;
                    resync = Some(last);
                    continue;
                }
                assert!(seq > last);
                last = seq;
                delivered += 1;
            }
            Got::Json(v) if v["type"] == "ok" && v["id"] == 3 => {
                // From here the chain starts at the answer's position.
                last = v["seq"].as_u64().unwrap();
                answer = Some(v);
            }
            Got::Json(v) if v["type"] == "ok" => {}
            Got::Timeout => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(notices > 0, "no dropped notice");
    assert!(resync.is_some(), "no hole seen");
    let answer = answer.expect("no answer to the resubscribe");
    assert_eq!(answer["recovered"], false, "{answer}");
    // More messages: live delivery carries on, gap-free, from the answer's position.
    publish_all(&nc, "orders.7", 0, 5).await;
    let got = read_chain(&mut ws, &mut last, 5, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 5);
    eprintln!(
        "dropOldest on a resumable channel: {total} published, {delivered} delivered, {notices} \
         named in dropped notices, resubscribed from {resync:?}: {answer}"
    );
}

/// Payloads of `size` bytes with their index: `{"i":N,"pad":"xx…"}`.
fn big_payload(i: u64, size: usize) -> String {
    let head = format!("{{\"i\":{i},\"pad\":\"");
    let pad = "x".repeat(size - head.len() - 2);
    format!("{head}{pad}\"}}")
}

/// Reads `want` message frames of big payloads, checking the position chain; panics on a
/// close (naming its code) or when nothing comes for 20 s.
async fn read_big_chain(ws: &mut Ws, last: &mut u64, want: usize) -> Vec<u64> {
    let mut got = Vec::new();
    while got.len() < want {
        match next_event(ws, Duration::from_secs(20)).await {
            Got::Json(v) if v["type"] == "message" => {
                let (seq, prev) = (v["seq"].as_u64().unwrap(), v["prev"].as_u64().unwrap());
                assert!(seq > *last, "seq {seq} not above {last}");
                assert_eq!(prev, *last, "prev of {seq} is not the last position");
                *last = seq;
                got.push(v["payload"]["i"].as_u64().unwrap());
            }
            Got::Json(v) => panic!("unexpected frame {}", v["type"]),
            other => panic!("after {} messages: {other:?}", got.len()),
        }
    }
    got
}

/// Issue 22 item 4: a resume whose replay is larger than the connection's send queue
/// (`sendQueueBytes`, 1 MiB here: 60 messages of 60 KB are 3.6 MB) is paced against the
/// client's reading, never closed as a slow consumer. Before the fix the whole replay was
/// queued at once and the client was closed with 4008 before its `ok`, on every retry.
#[tokio::test]
async fn a_resume_larger_than_the_send_queue_is_paced_not_closed() {
    init_logs();
    let (_store, nats) = jetstream_nats("paced");
    let c = resumable_config(&nats.url(), 100).build();
    assert_eq!(c.limits.send_queue_bytes, 1 << 20);
    let relay = TestRelay::with_config(c).streams_ready(1).start().await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    let nc = nats.client().await;

    let mut ws = connect(addr, "").await;
    let ok = subscribe(&mut ws, 1, "orders.big").await;
    let epoch = ok["epoch"].as_str().unwrap().to_owned();
    let from = ok["seq"].as_u64().unwrap();
    drop(ws);
    for i in 0..60 {
        nc.publish("orders.big", big_payload(i, 60_000).into())
            .await
            .unwrap();
    }
    nc.flush().await.unwrap();
    stream_stored(&nc, 60).await;

    // Twice: a client that resumed once resumes the same way again.
    for attempt in 0..2 {
        let mut ws = connect_small_window(addr).await;
        let ok = resume(&mut ws, 2, "orders.big", &epoch, from).await;
        assert_eq!(ok["type"], "ok", "attempt {attempt}: {ok}");
        assert_eq!(ok["recovered"], true, "attempt {attempt}: {ok}");
        let mut last = from;
        let got = read_big_chain(&mut ws, &mut last, 60).await;
        assert_eq!(got, (0..60).collect::<Vec<_>>(), "attempt {attempt}");
        // Live after the replay, in the same chain.
        nc.publish("orders.big", big_payload(60, 100).into())
            .await
            .unwrap();
        nc.flush().await.unwrap();
        assert_eq!(read_big_chain(&mut ws, &mut last, 1).await, [60]);
        drop(ws);
        assert!(
            eventually(Duration::from_secs(20), || async {
                relay.relay.hub.subject_count() == 0
            })
            .await
        );
    }
    assert_eq!(
        metric(admin, "wsrelay_slow_consumers_total").await,
        Some(0.0)
    );
    assert_eq!(
        metric(
            admin,
            "wsrelay_connections_closed_total{reason=\"slow_consumer\"}"
        )
        .await
        .unwrap_or(0.0),
        0.0
    );
    relay.drain().await;
}

/// A TCP proxy on loopback to a NATS server that the test can cut (every connection through
/// it dropped, new ones closed at once) and restore: the relay loses NATS while the server,
/// and its stream, carry on.
struct Cuttable {
    port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Cuttable {
    async fn start(upstream: u16) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let (open, conns) = (open.clone(), conns.clone());
            async move {
                while let Ok((mut down, _)) = listener.accept().await {
                    if !open.load(Ordering::SeqCst) {
                        continue; // dropped: closed at once
                    }
                    conns.lock().unwrap().push(tokio::spawn(async move {
                        if let Ok(mut up) =
                            tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        }
                    }));
                }
            }
        });
        Self {
            port,
            open,
            conns,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Cuttable {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Issue 22 item 4, the gap fill: messages stored while the relay was cut off from NATS
/// (60 of 60 KB: 3.6 MB, above each connection's 1 MiB send queue) are read from the stream
/// after the reconnection and reach every subscriber of the channel, paced, in order; none
/// is closed as a slow consumer. Before the fix the fill was queued at once to all of them
/// and every one was closed with 4008.
#[tokio::test]
async fn a_gap_fill_larger_than_the_send_queue_is_paced_for_every_subscriber() {
    init_logs();
    let (_store, nats) = jetstream_nats("paced-fill");
    let proxy = Cuttable::start(nats.port).await;
    let relay = resumable_config(&proxy.url(), 100)
        .streams_ready(1)
        .start()
        .await;
    let (addr, admin) = (relay.client_addr, relay.admin_addr);
    let nc = nats.client().await;

    // More subscribers than a fan-out writes to itself: every message goes through the
    // connections' queues.
    let mut clients = Vec::new();
    for id in 0..6 {
        let mut ws = connect_small_window(addr).await;
        let ok = subscribe(&mut ws, id, "orders.fill").await;
        assert_eq!(ok["type"], "ok", "{ok}");
        let last = ok["seq"].as_u64().unwrap();
        clients.push((ws, last));
    }
    nc.publish("orders.fill", big_payload(0, 100).into())
        .await
        .unwrap();
    nc.flush().await.unwrap();
    for (ws, last) in &mut clients {
        assert_eq!(read_big_chain(ws, last, 1).await, [0]);
    }

    proxy.cut();
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(admin, "wsrelay_nats_connected").await == Some(0.0)
        })
        .await,
        "the relay did not notice the cut"
    );
    for i in 1..61 {
        nc.publish("orders.fill", big_payload(i, 60_000).into())
            .await
            .unwrap();
    }
    nc.flush().await.unwrap();
    stream_stored(&nc, 61).await;
    proxy.restore();
    assert!(
        eventually(Duration::from_secs(30), || async {
            metric(admin, "wsrelay_nats_connected").await == Some(1.0)
        })
        .await,
        "the relay did not reconnect"
    );

    for (n, (ws, last)) in clients.iter_mut().enumerate() {
        let got = read_big_chain(ws, last, 60).await;
        assert_eq!(got, (1..61).collect::<Vec<_>>(), "subscriber {n}");
    }
    // Live again, for all.
    nc.publish("orders.fill", big_payload(61, 100).into())
        .await
        .unwrap();
    nc.flush().await.unwrap();
    for (ws, last) in &mut clients {
        assert_eq!(read_big_chain(ws, last, 1).await, [61]);
    }
    assert!(
        metric(admin, "wsrelay_history_reads_total{reason=\"fill\"}")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(
        metric(admin, "wsrelay_slow_consumers_total").await,
        Some(0.0)
    );
    relay.drain().await;
}

/// The stream's configuration as JetStream holds it.
async fn stream_config(nc: &async_nats::Client) -> async_nats::jetstream::stream::Config {
    let js = async_nats::jetstream::new(nc.clone());
    js.get_stream(STREAM)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone()
}

/// Issue 22 item 6: the history stream is bounded in bytes (the binding's `maxBytes`,
/// 256 MiB by default) and per message (`maxMessageBytes` plus room for headers). Before
/// the fix the relay created it with neither (`max_bytes` -1, `max_msg_size` -1).
#[tokio::test]
async fn the_history_stream_is_bounded_in_bytes_by_default() {
    init_logs();
    let (_store, nats) = jetstream_nats("bytes-default");
    let c = resumable_config(&nats.url(), 100).build();
    let relay = TestRelay::with_config(c.clone())
        .streams_ready(1)
        .start()
        .await;
    let nc = nats.client().await;
    let cfg = stream_config(&nc).await;
    assert_eq!(cfg.max_bytes, 256 << 20, "{cfg:?}");
    assert_eq!(
        i64::from(cfg.max_message_size),
        i64::from(c.limits.max_message_bytes) + 4096
    );
    relay.drain().await;
}

/// Issue 22 item 6: one client publishing to new channels of its own choosing cannot grow
/// the stream beyond the binding's `maxBytes` (256 KiB here); the oldest messages go first.
/// Before the fix 10 channels of 6 messages of 10 KB added 0.6 MB to a stream without limit.
#[tokio::test]
async fn a_client_publishing_to_new_channels_cannot_grow_the_stream_beyond_max_bytes() {
    init_logs();
    let (_store, nats) = jetstream_nats("bytes");
    let h: History = serde_json::from_value(
        json!({"stream": STREAM, "maxMessages": 100, "maxAgeSeconds": 300, "maxBytes": 262_144}),
    )
    .unwrap();
    let relay = resumable_config(&nats.url(), 100)
        .config(|c| {
            c.bindings[0].history = Some(h);
            // 60 publishes in a row: not the rate limit under test.
            c.limits.publish_rate_per_second = 1_000;
            c.limits.publish_burst = 1_000;
        })
        .streams_ready(1)
        .start()
        .await;
    let nc = nats.client().await;
    let mut ws = connect(relay.client_addr, "").await;
    let pad = "x".repeat(10_000);
    let mut id = 0;
    for channel in 0..10 {
        for i in 0..6 {
            id += 1;
            let ok = request(
                &mut ws,
                json!({"type": "publish", "id": id, "channel": format!("orders.new{channel}"),
                       "payload": {"i": i, "pad": pad}}),
            )
            .await;
            assert_eq!(ok["type"], "ok", "{ok}");
        }
    }
    let js = async_nats::jetstream::new(nc.clone());
    let info = js.get_stream(STREAM).await.unwrap().cached_info().clone();
    assert_eq!(info.config.max_bytes, 262_144);
    assert_eq!(info.state.last_sequence, 60, "every publish was stored");
    assert!(
        info.state.bytes <= 262_144,
        "the stream holds {} bytes",
        info.state.bytes
    );
    assert!(info.state.first_sequence > 1, "the oldest went first");
    eprintln!(
        "60 publishes of 10 KB on 10 new channels: the stream holds {} bytes in {} messages",
        info.state.bytes, info.state.messages
    );
    relay.drain().await;
}

/// Issue 22 item 7: a history younger than JetStream's default duplicate window (120 s)
/// gets its stream (the window is the max age then), and its channels work. Before the fix
/// JetStream refused the stream (error 10052) for ever and every subscribe answered 503.
#[tokio::test]
async fn a_history_shorter_than_two_minutes_gets_its_stream() {
    init_logs();
    let (_store, nats) = jetstream_nats("short-age");
    let h: History =
        serde_json::from_value(json!({"stream": STREAM, "maxMessages": 100, "maxAgeSeconds": 30}))
            .unwrap();
    let relay = resumable_config(&nats.url(), 100)
        .config(|c| c.bindings[0].history = Some(h))
        .streams_ready(1)
        .start()
        .await;
    let nc = nats.client().await;
    let cfg = stream_config(&nc).await;
    assert_eq!(cfg.duplicate_window, Duration::from_secs(30));
    assert_eq!(cfg.max_age, Duration::from_secs(30));
    let mut ws = connect(relay.client_addr, "").await;
    let ok = subscribe(&mut ws, 1, "orders.short").await;
    assert_eq!(ok["type"], "ok", "{ok}");
    // A publish with a msgId twice: stored once (the duplicate window works).
    let mut oks = Vec::new();
    for id in [2, 3] {
        let ok = request(
            &mut ws,
            json!({"type": "publish", "id": id, "channel": "orders.short", "payload": 7,
                   "msgId": "once"}),
        )
        .await;
        assert_eq!(ok["type"], "ok", "{ok}");
        oks.push(ok);
    }
    assert_eq!(oks[1]["duplicate"], true, "{}", oks[1]);
    let js = async_nats::jetstream::new(nc.clone());
    let info = js.get_stream(STREAM).await.unwrap().cached_info().clone();
    assert_eq!(info.state.messages, 1);
    relay.drain().await;
}

/// Issue 22 item 7: a stream the relay cannot create is visible with JetStream's answer,
/// in `wsrelay_history_stream_error{stream,error}` (which the operator turns into
/// `Degraded` `HistoryNotReady` with the reason), and the sample goes once the stream is in
/// place. Here another stream already holds the binding's subjects.
#[tokio::test]
async fn a_stream_the_relay_cannot_create_is_reported_with_jetstreams_answer() {
    init_logs();
    let (_store, nats) = jetstream_nats("refused");
    let nc = nats.client().await;
    let js = async_nats::jetstream::new(nc.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "SQUATTER".into(),
        subjects: vec!["orders.*".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let relay = resumable_config(&nats.url(), 100).start().await;
    let admin = relay.admin_addr;
    let sample = format!("wsrelay_history_stream_error{{stream=\"{STREAM}\",error=\"");
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(admin, &sample).await == Some(1.0)
        })
        .await,
        "no wsrelay_history_stream_error sample for the refused stream"
    );
    let (_, body) = http_get(admin, "/metrics").await;
    let line = body.lines().find(|l| l.starts_with(&sample)).unwrap();
    assert!(
        line.contains("overlap"),
        "JetStream's answer is named: {line}"
    );
    assert_eq!(
        metric(admin, "wsrelay_history_streams_ready").await,
        Some(0.0)
    );
    eprintln!("{line}");

    js.delete_stream("SQUATTER").await.unwrap();
    assert!(
        eventually(Duration::from_secs(60), || async {
            metric(admin, "wsrelay_history_streams_ready").await == Some(1.0)
        })
        .await,
        "the stream was not put in place once possible"
    );
    assert_eq!(metric(admin, &sample).await, None, "the error sample stays");
    relay.drain().await;
}
