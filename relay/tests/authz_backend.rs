//! The example authorization backend (examples/authz-backend, Go) against a real nats-server
//! and a real relay: `authorize.request` on `rooms.{room}` and `auth.connectRequest`
//! (docs/protocol.md section 3). The backend binary is built once by its own build.sh (cached
//! under ~/.cache/wsrelay/bin by its sources; needs `go`), started with the test's NATS URL,
//! and stopped with SIGTERM at the end, which must drain and exit 0.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use wsrelay::config::{Authorize, BackendRequest, OnTimeout};
use wsrelay_testkit::prelude::*;

/// The subject the backend serves and the relay asks.
const SUBJECT: &str = "authz.example";

/// The example backend as a child process, its JSON log kept; killed when dropped.
struct Backend {
    child: Option<Child>,
    log: Arc<Mutex<Vec<Value>>>,
}

impl Backend {
    /// Starts it on `nats` with the table in `env` (ROOMS, ORDERS, BANNED) and waits (20 s)
    /// for its `serving` line: the NATS server has its subscription from then on.
    fn start(nats: &Nats, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(example_bin("authz-backend"))
            .args(["-nats", &nats.url(), "-subject", SUBJECT])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = log.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the log to its end (the process's exit), so that it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| json!({"msg": "not json", "line": line}));
                if v["msg"] == "serving"
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(());
                }
                keep.lock().unwrap().push(v);
            }
        });
        let mut backend = Self {
            child: Some(child),
            log,
        };
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            backend.kill();
            panic!(
                "the backend did not serve within 20 s: {:?}",
                backend.lines()
            );
        }
        backend
    }

    fn lines(&self) -> Vec<Value> {
        self.log.lock().unwrap().clone()
    }

    /// Its decision lines, in order.
    fn decisions(&self) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|v| v["msg"] == "decision")
            .collect()
    }

    /// SIGTERM, then its exit status (within 20 s).
    fn stop(&mut self) -> ExitStatus {
        terminate(self.child.take().expect("running"), "the backend")
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

fn token(sub: &str) -> String {
    format!("?token={}", hs256(claims(sub)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_backend_decides_who_joins_a_room() {
    init_logs();
    let nats = Nats::start();
    let mut backend = Backend::start(
        &nats,
        &[("ROOMS", "alice:1;bob:1,2"), ("BANNED", "mallory")],
    );
    // A generous timeout: the answer takes microseconds, but this machine can stall.
    let request = BackendRequest {
        subject: SUBJECT.into(),
        timeout_ms: 5000,
        cache_seconds: 30,
        cache_entries: 100,
        on_timeout: OnTimeout::Deny,
    };
    let rooms = wsrelay::config::Binding {
        authorize: Some(Authorize {
            request: Some(request.clone()),
            ..Authorize::default()
        }),
        ..binding("rooms.{room}", "rooms.{room}", Direction::Both)
    };
    let relay = TestRelay::builder(&nats)
        .anonymous(false)
        .hs256()
        .with_binding(rooms)
        .config(|c| c.auth.connect_request = Some(request))
        .ready()
        .start()
        .await;

    // The connect step: the banned user is refused before the upgrade, alice is welcomed with
    // what the backend replied (her rooms).
    assert_eq!(
        connect_with(relay.addr(), &token("mallory"), &[])
            .await
            .err(),
        Some(403),
        "mallory is banned"
    );
    let mut ws = connect_with(relay.addr(), &token("alice"), &[])
        .await
        .expect("alice admitted");
    let welcome = next_json(&mut ws).await.expect("welcome");
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["data"], json!({"rooms": ["1"]}), "{welcome}");

    // Room 1: allowed, with the backend's data in the ok.
    let ok = subscribe(&mut ws, 1, "rooms.1").await;
    assert_eq!(ok["type"], "ok", "{ok}");
    assert_eq!(ok["data"], json!({"room": "1", "members": 2}), "{ok}");
    // Room 2: the backend's deny, its reason and code.
    let denied = subscribe(&mut ws, 2, "rooms.2").await;
    assert_eq!(denied["type"], "error", "{denied}");
    assert_eq!(denied["code"], 403, "{denied}");
    assert_eq!(denied["reason"], "not a member of room 2", "{denied}");
    assert_eq!(denied["appCode"], 4031, "{denied}");

    // Alice's subscription is live: what is published on room 1 reaches her.
    let nc = nats.client().await;
    nc.publish("rooms.1", r#"{"text":"hi"}"#.into())
        .await
        .unwrap();
    nc.flush().await.unwrap();
    let m = next_json(&mut ws).await.expect("message");
    assert_eq!(m["type"], "message", "{m}");
    assert_eq!(m["channel"], "rooms.1", "{m}");

    // The backend logged one line per question, with the relay's headers. It logs after it
    // replied, and its log is read by a thread: wait for the four lines (bounded).
    let logged = eventually(Duration::from_secs(10), || async {
        backend.decisions().len() >= 4
    })
    .await;
    assert!(logged, "the backend logged {:?}", backend.lines());
    let seen: Vec<(String, String, String, bool)> = backend
        .decisions()
        .iter()
        .map(|d| {
            (
                d["op"].as_str().unwrap().to_owned(),
                d["channel"].as_str().unwrap().to_owned(),
                d["sub"].as_str().unwrap().to_owned(),
                d["allow"].as_bool().unwrap(),
            )
        })
        .collect();
    let want = [
        ("connect", "", "mallory", false),
        ("connect", "", "alice", true),
        ("subscribe", "rooms.1", "alice", true),
        ("subscribe", "rooms.2", "alice", false),
    ]
    .map(|(o, c, s, a)| (o.to_owned(), c.to_owned(), s.to_owned(), a));
    assert_eq!(seen, want, "{:?}", backend.lines());
    // Wsrelay-Connection: `<relay>/-` at the connect step (no connection id before the
    // upgrade), then one `<relay>/<id>` for all of alice's subscribes.
    let connections: Vec<String> = backend.decisions()[1..]
        .iter()
        .map(|d| d["connection"].as_str().unwrap().to_owned())
        .collect();
    let (relay_name, _) = connections[0]
        .split_once('/')
        .unwrap_or_else(|| panic!("{connections:?}"));
    assert_eq!(connections[0], format!("{relay_name}/-"), "{connections:?}");
    assert!(
        connections[1].starts_with(&format!("{relay_name}/"))
            && connections[1] != connections[0]
            && connections[2] == connections[1],
        "one connection id for alice's subscribes: {connections:?}"
    );

    // SIGTERM: the backend drains and exits 0; then no one serves the subject, and a question
    // not in the relay's cache gets 503 at once.
    let status = backend.stop();
    assert!(status.success(), "exit {status}: {:?}", backend.lines());
    assert!(
        backend.lines().iter().any(|v| v["msg"] == "stopped"),
        "{:?}",
        backend.lines()
    );
    let gone = subscribe(&mut ws, 3, "rooms.3").await;
    assert_eq!(gone["type"], "error", "{gone}");
    assert_eq!(gone["code"], 503, "{gone}");
}
