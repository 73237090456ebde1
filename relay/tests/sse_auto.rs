//! Streams without a client (docs/protocol.md section 9): a binding with `autoSubscribe`
//! streams its channel to `GET /ws/sse?token=…` with no POST, to the real `curl -N`; on a
//! resumable binding each event carries an id, and a stream opened again with
//! `Last-Event-ID` after the relay process was SIGKILLed and restarted loses nothing and
//! repeats nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use wsrelay::config::{Binding, Config, Direction};
use wsrelay_testkit::prelude::*;
use wsrelay_testkit::sse::*;

fn notifications(history: Option<&str>) -> Binding {
    let mut b = binding(
        "notifications",
        "users.{claims.sub}.notify",
        Direction::Subscribe,
    );
    b.auto_subscribe = true;
    b.history = history.map(|stream| History {
        stream: stream.into(),
        max_messages: 100,
        max_age_seconds: 300,
        max_bytes: wsrelay::config::DEFAULT_HISTORY_BYTES,
        replicas: 1,
    });
    b
}

fn config(nats: &Nats, history: Option<&str>) -> Config {
    TestRelay::builder(nats)
        .hs256()
        .anonymous(false)
        .binding("chat.{room}", "chat.{room}", Direction::Both)
        .with_binding(notifications(history))
        .build()
}

fn token(sub: &str) -> String {
    hs256(claims(sub))
}

/// `curl -N -s <url>`, its output lines sent on a channel as they come.
struct Curl {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Curl {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new("curl")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("curl runs");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The next `data:` frame, parsed (other lines skipped), within 20 s.
    fn frame(&self) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self.lines.recv_timeout(left).expect("a frame from curl");
            if let Some(d) = line.strip_prefix("data: ")
                && let Ok(v) = serde_json::from_str::<Value>(d)
                && v.get("type").is_some()
            {
                return v;
            }
        }
    }

    /// Every line until curl exits (bounded).
    fn rest(&self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(10)) {
            out.push(l);
        }
        out
    }
}

impl Drop for Curl {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_receives_its_users_notifications_with_no_post_and_a_bad_token_reads_401() {
    init_logs();
    let nats = Nats::start();
    let relay = TestRelay::with_config(config(&nats, None))
        .ready()
        .start()
        .await;
    let base = format!("http://{}/ws/sse", relay.client_addr);
    let nc = nats.client().await;

    let alice = Curl::start(&["-N", "-s", &format!("{base}?token={}", token("alice"))]);
    let bob = Curl::start(&["-N", "-s", &format!("{base}?token={}", token("bob"))]);
    for c in [&alice, &bob] {
        assert_eq!(c.frame()["type"], "welcome");
        let s = c.frame();
        assert_eq!(
            (
                s["type"].as_str(),
                s["channel"].as_str(),
                s["auto"].as_bool()
            ),
            (Some("subscribed"), Some("notifications"), Some(true)),
            "{s}"
        );
    }
    nc.publish("users.alice.notify", "{\"to\":\"alice\"}".into())
        .await
        .unwrap();
    nc.publish("users.bob.notify", "{\"to\":\"bob\"}".into())
        .await
        .unwrap();
    nc.publish("users.alice.notify", "{\"to\":\"alice\",\"n\":2}".into())
        .await
        .unwrap();
    nc.flush().await.unwrap();
    let got: Vec<Value> = (0..2).map(|_| alice.frame()).collect();
    assert_eq!(got[0]["payload"], serde_json::json!({"to": "alice"}));
    assert_eq!(
        got[1]["payload"],
        serde_json::json!({"to": "alice", "n": 2})
    );
    assert!(got.iter().all(|m| m["channel"] == "notifications"));
    let b = bob.frame();
    assert_eq!(b["payload"], serde_json::json!({"to": "bob"}), "{b}");

    // A stream that opts out gets no auto-subscription (what the SDK asks for).
    let mut s = Stream::open(
        relay.client_addr,
        &format!("?token={}&autoSubscribe=false", token("carol")),
        "",
    )
    .await;
    s.session().await;
    assert!(
        s.next(Duration::from_secs(2))
            .await
            .is_none_or(|(n, _)| n.as_deref() == Some(":")),
        "nothing after the welcome but heartbeats"
    );

    // A bad token: a readable status and reason.
    let refused = Curl::start(&["-s", "-i", &format!("{base}?token=not-a-jwt")]);
    let lines = refused.rest();
    assert!(
        lines.first().is_some_and(|l| l.starts_with("HTTP/1.1 401")),
        "{lines:?}"
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some("invalid_token"),
        "{lines:?}"
    );
    // A malformed Last-Event-ID: 400, readable.
    let bad = Curl::start(&[
        "-s",
        "-i",
        "-H",
        "Last-Event-ID: notifications:x",
        &format!("{base}?token={}", token("alice")),
    ]);
    let lines = bad.rest();
    assert!(
        lines.first().is_some_and(|l| l.starts_with("HTTP/1.1 400")),
        "{lines:?}"
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some("bad_last_event_id"),
        "{lines:?}"
    );
}

/// Reads events until `n` messages came; returns their payload numbers and the last id.
async fn messages(s: &mut Stream, n: usize, last_id: &mut String) -> Vec<u64> {
    let mut out = Vec::new();
    while out.len() < n {
        let (name, data, id) = next_with_id(s).await;
        if let Some(id) = id {
            *last_id = id;
        }
        if name.is_some() {
            continue;
        }
        let f: Value = serde_json::from_str(&data).unwrap();
        if f["type"] == "message" {
            out.push(f["payload"].as_u64().unwrap());
        }
    }
    out
}

/// The next event with its `id:` line, if any (comments skipped).
async fn next_with_id(s: &mut Stream) -> (Option<String>, String, Option<String>) {
    for _ in 0..1000 {
        s.dechunk();
        if let Some(i) = find(&s.body, b"\n\n") {
            let block = String::from_utf8(s.body.drain(..i + 2).collect()).unwrap();
            if block.starts_with(':') {
                continue;
            }
            let mut name = None;
            let mut id = None;
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = Some(n.to_owned());
                } else if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.to_owned());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push(d);
                }
            }
            return (name, data.join("\n"), id);
        }
        let mut b = [0u8; 4096];
        use tokio::io::AsyncReadExt;
        let n = tokio::time::timeout(Duration::from_secs(20), s.tcp.read(&mut b))
            .await
            .expect("an event within 20 s")
            .unwrap();
        assert!(n > 0, "the stream ended");
        s.raw.extend_from_slice(&b[..n]);
    }
    panic!("no event");
}

async fn publish(nc: &async_nats::Client, from: u64, to: u64) {
    for i in from..=to {
        nc.publish("users.alice.notify", i.to_string().into())
            .await
            .unwrap();
    }
    nc.flush().await.unwrap();
}

async fn ready(admin: SocketAddr) {
    assert!(
        eventually(Duration::from_secs(20), || async {
            metric(admin, "wsrelay_history_streams_ready").await == Some(1.0)
        })
        .await,
        "the history stream was not put in place"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_resumed_with_last_event_id_across_a_relay_sigkill_loses_and_repeats_nothing() {
    init_logs();
    let (_dir, nats) = jetstream_nats("sse-auto-resume");
    let mut c = config(&nats, Some("WSRELAY_SSE_AUTO"));
    let port = free_port();
    c.listen.client = format!("127.0.0.1:{port}").parse().unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_wsrelay"));
    let relay = RelayProcess::spawn_config(bin, &c, "sse-auto", "info");
    ready(relay.admin).await;
    let nc = nats.client().await;
    let q = format!("?token={}", token("alice"));

    let mut s = Stream::open(relay.client, &q, "").await;
    assert_eq!(s.status, 200, "{}", s.headers);
    s.session().await;
    let mut last_id = String::new();
    let (_, data, id) = next_with_id(&mut s).await;
    let subscribed: Value = serde_json::from_str(&data).unwrap();
    assert_eq!(subscribed["auto"], true, "{subscribed}");
    let epoch = subscribed["epoch"].as_str().expect("resumable").to_owned();
    assert_eq!(
        id.as_deref(),
        Some(format!("notifications:{epoch}:{}", subscribed["seq"]).as_str())
    );
    publish(&nc, 1, 10).await;
    let mut got = messages(&mut s, 10, &mut last_id).await;
    assert!(
        last_id.starts_with(&format!("notifications:{epoch}:")),
        "{last_id}"
    );

    // SIGKILL (std's kill), published to while down, restarted on its port.
    drop(relay);
    drop(s);
    publish(&nc, 11, 20).await;
    let relay = RelayProcess::spawn_config(bin, &c, "sse-auto", "info");
    ready(relay.admin).await;

    // What EventSource does by itself: the same URL, the last id in `Last-Event-ID`.
    let mut s = Stream::open(relay.client, &q, &format!("Last-Event-ID: {last_id}\r\n")).await;
    assert_eq!(s.status, 200, "{}", s.headers);
    s.session().await;
    let (_, data, _) = next_with_id(&mut s).await;
    let resumed: Value = serde_json::from_str(&data).unwrap();
    assert_eq!(
        (resumed["type"].as_str(), resumed["recovered"].as_bool()),
        (Some("subscribed"), Some(true)),
        "{resumed}"
    );
    got.extend(messages(&mut s, 10, &mut last_id).await);
    publish(&nc, 21, 30).await;
    got.extend(messages(&mut s, 10, &mut last_id).await);
    assert_eq!(got, (1..=30).collect::<Vec<u64>>(), "0 lost, 0 repeated");
    // Nothing more (a repeat would come now).
    publish(&nc, 31, 31).await;
    assert_eq!(messages(&mut s, 1, &mut last_id).await, vec![31]);
}
