//! The example presence reader (examples/presence-reader, Go) reads a channel's presence with
//! plain NATS from the registry bucket (docs/protocol.md section 10, "Backends read presence
//! with plain NATS") while real WebSocket clients come and go on a real relay: its members
//! line, then a join and a leave. The binary is built once by its own build.sh (cached under
//! ~/.cache/wsrelay/bin by its sources; needs `go`) and stopped with SIGTERM at the end.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use wsrelay::config::Presence;
use wsrelay_testkit::client::EXPECT;
use wsrelay_testkit::prelude::*;

const BUCKET: &str = "WSRELAY_TEST_PRES_READER";

type Lines = Arc<Mutex<Vec<Value>>>;

/// Keeps every line of `from` (JSON, else `{"notJson": line}`) until it ends, so that the
/// child never blocks on a full pipe.
fn keep_lines(from: impl Read + Send + 'static) -> Lines {
    let lines = Lines::default();
    let keep = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            let v = serde_json::from_str(&line).unwrap_or_else(|_| json!({"notJson": line}));
            keep.lock().unwrap().push(v);
        }
    });
    lines
}

/// The example reader as a child process: its stdout (the members and changes) and its
/// stderr (its log, with every entry it read: `-v`) kept; killed when dropped.
struct Reader {
    child: Option<Child>,
    out: Lines,
    log: Lines,
}

impl Reader {
    fn start(nats: &Nats, channel: &str) -> Self {
        let mut child = Command::new(example_bin("presence-reader"))
            .args(["-nats", &nats.url(), "-bucket", BUCKET, "-channel", channel])
            .arg("-v")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = keep_lines(child.stdout.take().unwrap());
        let log = keep_lines(child.stderr.take().unwrap());
        Self {
            child: Some(child),
            out,
            log,
        }
    }

    fn out(&self) -> Vec<Value> {
        self.out.lock().unwrap().clone()
    }

    fn log(&self) -> Vec<Value> {
        self.log.lock().unwrap().clone()
    }

    /// Waits (within `within`) until stdout holds `n` lines; those lines.
    async fn lines(&self, n: usize, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let out = self.out();
            if out.len() >= n {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "the reader printed {} of {n} lines within {within:?}: {out:?}\nlog: {:?}",
                out.len(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then its exit status (within 20 s).
    fn stop(&mut self) -> ExitStatus {
        terminate(self.child.take().expect("running"), "the reader")
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A client of user `sub` named `name`, subscribed to `channel` with presence.
async fn member(relay: &TestRelay, sub: &str, name: &str, channel: &str) -> Ws {
    let mut c = claims(sub);
    c["name"] = json!(name);
    let mut ws = relay.connect(&format!("?token={}", hs256(c))).await;
    send(
        &mut ws,
        json!({"type": "subscribe", "id": 1, "channel": channel, "presence": true}),
    )
    .await;
    for _ in 0..100 {
        let f = next_json(&mut ws).await.expect("the subscribe's answer");
        if f["id"] == 1 {
            assert_eq!(f["type"], "ok", "{f}");
            return ws;
        }
    }
    panic!("no answer to the subscribe");
}

/// The `clients` of `key` in a `presence` page asked on `ws` (other frames skipped).
async fn clients_of(ws: &mut Ws, channel: &str, key: &str) -> Value {
    send(ws, json!({"type": "presence", "id": 2, "channel": channel})).await;
    for _ in 0..100 {
        let f = next_json(ws).await.expect("the page");
        if f["id"] == 2 {
            assert_eq!(f["type"], "ok", "{f}");
            return f["presence"]["members"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["key"] == key)
                .map_or(Value::Null, |m| m["clients"].clone());
        }
    }
    panic!("no page");
}

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_reader_prints_members_then_joins_and_leaves_from_the_registry() {
    init_logs();
    example_bin("presence-reader"); // built before anything runs: its build is not part of any bound
    let started_ms = now_ms();
    let (_store, nats) = jetstream_nats("presence-reader");
    // A long grace: the relays hold bob's leave back; the reader, which applies none, not.
    let mut rooms = binding("rooms.{room}", "chat.rooms.{room}", Direction::Both);
    rooms.presence = Some(Presence {
        key: "{claims.sub}".into(),
        info: vec!["claims.name".into()],
        events: true,
        max_members_with_events: 200,
        leave_grace_seconds: 60,
    });
    let relay = TestRelay::builder(&nats)
        .hs256()
        .registry(BUCKET, "relay-1", 15)
        .with_binding(rooms)
        .start()
        .await;

    // Alice is in (her `ok` came once her entry was stored) before the reader starts.
    let mut alice = member(&relay, "alice", "Alice", "rooms.7").await;
    let mut reader = Reader::start(&nats, "rooms.7");
    let out = reader.lines(1, EXPECT).await;
    assert_eq!(
        out[0],
        json!({"event": "members", "members": [{"key": "alice", "info": {"name": "Alice"}, "clients": 1}]}),
        "{:?}",
        reader.log()
    );

    // A second tab of alice's, then bob: the reader's next line is bob's join (its entries
    // come in the bucket's order), so alice's tab made none.
    let mut alice2 = member(&relay, "alice", "Alice", "rooms.7").await;
    let mut bob = member(&relay, "bob", "Bob", "rooms.7").await;
    let joined = Instant::now();
    let out = reader.lines(2, EXPECT).await;
    let join_seen = joined.elapsed();
    assert_eq!(
        out[1],
        json!({"event": "join", "key": "bob", "info": {"name": "Bob"}}),
        "{out:?}"
    );

    // Alice's tab closes; once the relay has read its delete back (a page shows alice with
    // one client), the delete is in the bucket before bob's.
    alice2.close(None).await.unwrap();
    let deadline = Instant::now() + EXPECT;
    while clients_of(&mut alice, "rooms.7", "alice").await != 1 {
        assert!(
            Instant::now() < deadline,
            "the relay never read the tab's delete"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bob.close(None).await.unwrap();
    let gone = Instant::now();
    let out = reader.lines(3, EXPECT).await;
    eprintln!(
        "reader: bob's join printed {join_seen:?} after his subscribe's ok, his leave {:?} after his close",
        gone.elapsed()
    );
    assert_eq!(
        out[2],
        json!({"event": "leave", "key": "bob", "info": {"name": "Bob"}}),
        "{out:?}"
    );
    // No leave of alice's (she has a tab left), and the relay's subscribers have no leave
    // of bob's yet: it waits for the 60 s grace, the reader did not.
    let mut frames = Vec::new();
    while let Got::Json(f) = next_event(&mut alice, Duration::from_millis(300)).await {
        frames.push(f);
    }
    assert!(
        frames.iter().all(|f| f["type"] != "leave"),
        "a leave within the grace: {frames:?}"
    );
    assert_eq!(reader.out().len(), 3, "{:?}", reader.out());

    // What it read: three connections' entries in the documented layout and values. Its
    // log line of an entry precedes the line it prints for it; the pipes are read apart.
    let deadline = Instant::now() + EXPECT;
    while reader.log().iter().filter(|l| l["op"] == "delete").count() < 2 {
        assert!(Instant::now() < deadline, "{:?}", reader.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = reader.log();
    let entries: Vec<&Value> = log.iter().filter(|l| l["msg"] == "entry").collect();
    let puts: Vec<&Value> = entries
        .iter()
        .copied()
        .filter(|e| e["op"] == "put")
        .collect();
    assert_eq!(puts.len(), 3, "alice, her tab, bob: {log:?}");
    let mut conns = Vec::new();
    for (p, (key, name)) in
        puts.iter()
            .zip([("alice", "Alice"), ("alice", "Alice"), ("bob", "Bob")])
    {
        let kv_key = p["kvKey"].as_str().unwrap();
        let conn = kv_key
            .strip_prefix("pres.cm9vbXMuNw.relay-1.")
            .unwrap_or_else(|| panic!("pres.<base64url(rooms.7)>.<relay>.<conn>: {kv_key}"));
        assert!(conn.parse::<u64>().is_ok(), "{kv_key}");
        conns.push(kv_key.to_owned());
        let v = &p["value"];
        let since = v["since"].as_u64().unwrap_or_else(|| panic!("since: {v}"));
        assert!(
            (started_ms..=now_ms()).contains(&since),
            "since is when the membership began, in ms: {v}"
        );
        assert_eq!(
            v,
            &json!({"v": 1, "channel": "rooms.7", "key": key, "info": {"name": name}, "since": since}),
            "{p}"
        );
    }
    conns.sort();
    conns.dedup();
    assert_eq!(conns.len(), 3, "one entry per connection: {conns:?}");
    let deleted: Vec<&str> = entries
        .iter()
        .filter(|e| e["op"] == "delete")
        .map(|e| e["kvKey"].as_str().unwrap())
        .collect();
    assert_eq!(
        deleted,
        [
            puts[1]["kvKey"].as_str().unwrap(),
            puts[2]["kvKey"].as_str().unwrap()
        ],
        "the tab's delete, then bob's: {log:?}"
    );
    assert!(
        log.iter().all(|l| l["level"] == "INFO"),
        "nothing skipped or failed: {log:?}"
    );

    let status = reader.stop();
    assert!(status.success(), "exit {status}: {:?}", reader.log());
    assert!(reader.log().iter().any(|l| l["msg"] == "stopped"));
}
