//! The backend's side of docs/backend.md as a backend runs it: the Python examples
//! (examples/backend-python) against a real relay binary and a JetStream nats-server, and the
//! NATS permissions docs/backend.md lists, on a nats-server that enforces them.
//!
//! The Python examples run in the venv `examples/backend-python/setup.sh` installs
//! (`~/.cache/wsrelay/venv`, `make tools` runs it); without it the test fails and says so.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use wsrelay_testkit::prelude::*;

const BUCKET: &str = "WSRELAY_TEST_BACKEND_REG";
const EVENTS: &str = "wsrelay.events.test.gw";
const CONTROL: &str = "wsrelay.control.test.gw";
const STREAM: &str = "WSRELAY_TEST_BACKEND_EVENTS";
/// Bound on anything expected to come (2 loaded cores can stall for seconds).
const WAIT: Duration = Duration::from_secs(20);

/// The examples' venv python; the test fails, naming the command that installs it, if absent.
fn python() -> PathBuf {
    let cache = std::env::var("WSRELAY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/wsrelay")
        });
    let py = cache.join("venv/bin/python");
    assert!(
        py.is_file(),
        "{} is missing: the backend examples' venv is installed by `examples/backend-python/setup.sh` (`make tools` runs it)",
        py.display()
    );
    py
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/backend-python")
        .join(name)
}

/// `control.py --nats <url> --subject <subject> <args>`, run to its end: exit code, stdout,
/// stderr.
async fn control_on(url: &str, subject: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = tokio::time::timeout(
        WAIT,
        Command::new(python())
            .arg(example("control.py"))
            .args(["--nats", url, "--subject", subject])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("control.py did not exit within 20 s")
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// [`control_on`] the test gateway's control subject; the reply parsed, the exit asserted 0.
async fn control(url: &str, args: &[&str]) -> Value {
    let (code, out, err) = control_on(url, CONTROL, args).await;
    assert_eq!(code, Some(0), "control.py {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `events_consumer.py` running, its stdout read line by line.
struct Consumer {
    child: Child,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl Consumer {
    fn start(url: &str, durable: &str) -> Self {
        let mut child = Command::new(python())
            .arg(example("events_consumer.py"))
            .args(["--nats", url, "--stream", STREAM, "--durable", durable])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, lines }
    }

    /// Its next line, `{"event": .., "online": ..}`; fails with its stderr when none comes.
    async fn next(&mut self) -> Value {
        match tokio::time::timeout(WAIT, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
            }
            got => {
                let _ = self.child.start_kill();
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), e.read_to_string(&mut err))
                            .await;
                }
                panic!("events_consumer.py printed no event within 20 s ({got:?}); stderr:\n{err}");
            }
        }
    }

    /// Its next event, asserted to be of `kind`.
    async fn expect(&mut self, kind: &str) -> Value {
        let line = self.next().await;
        assert_eq!(line["event"]["type"], kind, "{line}");
        line
    }

    /// Stops it with SIGTERM, as a deployment does; its exit status.
    async fn stop(mut self) -> std::process::ExitStatus {
        let pid = i32::try_from(self.child.id().unwrap()).unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("events_consumer.py did not exit within 20 s of SIGTERM")
            .unwrap()
    }
}

fn token(c: Value) -> String {
    format!("?token={}", hs256(c))
}

/// Waits until the relay has put the events stream in place (a consumer needs it).
async fn stream_in_place(nats: &Nats) {
    let js = async_nats::jetstream::new(nats.client().await);
    assert!(
        eventually(WAIT, || async { js.get_stream(STREAM).await.is_ok() }).await,
        "the relay did not create the events stream {STREAM}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_examples_follow_who_is_online_and_command_the_relays() {
    init_logs();
    python();
    let (_store, nats) = jetstream_nats("backend-examples");
    let config = TestRelay::builder(&nats)
        .hs256()
        .registry(BUCKET, "relay-a", 15)
        .events(EVENTS, Some(STREAM))
        .control(CONTROL)
        .build();
    let relay = RelayProcess::spawn_config(
        env!("CARGO_BIN_EXE_wsrelay").as_ref(),
        &config,
        "backend-examples",
        "info",
    );
    assert!(
        eventually(WAIT, || async {
            metric(relay.admin, "wsrelay_registry_ready").await == Some(1.0)
                && !relay.lines_with("control service started").is_empty()
        })
        .await,
        "the relay's registry or control service did not start:\n{}",
        relay.log()
    );
    stream_in_place(&nats).await;
    let url = nats.url();
    let mut events = Consumer::start(&url, "presence");

    // Connected and Subscribed: u1 is online, with its connection.
    let mut u1 = connect(relay.client, &token(claims("u1"))).await;
    assert_eq!(subscribe(&mut u1, 1, "public.lobby").await["type"], "ok");
    let line = events.expect("Connected").await;
    let id = line["event"]["connection"].as_str().unwrap().to_owned();
    assert!(id.starts_with("relay-a/"), "{line}");
    assert_eq!(line["online"], json!({"u1": [id]}));
    let line = events.expect("Subscribed").await;
    assert_eq!(line["event"]["channel"], "public.lobby", "{line}");

    // connections --sub u1 lists it, with its channel.
    let r = control(&url, &["connections", "--sub", "u1"]).await;
    assert_eq!(
        (r["reached"].as_u64(), r["relays"].as_u64()),
        (Some(1), Some(1)),
        "{r}"
    );
    assert_eq!(r["connections"][0]["connection"], id.as_str(), "{r}");
    assert_eq!(
        r["connections"][0]["channels"],
        json!(["public.lobby"]),
        "{r}"
    );

    // disconnect --sub u1 closes it with 4100 (may reconnect); the consumer hears why.
    let r = control(&url, &["disconnect", "--sub", "u1"]).await;
    assert_eq!(r, json!({"reached": 1, "relays": 1, "expected": 1}));
    assert_eq!(close_code(&mut u1, WAIT).await, Some(4100));
    let line = events.expect("Disconnected").await;
    let e = &line["event"];
    assert_eq!(
        (
            e["connection"].as_str(),
            e["reason"].as_str(),
            e["closeCode"].as_u64()
        ),
        (Some(id.as_str()), Some("disconnect"), Some(4100)),
        "{line}"
    );
    assert_eq!(line["online"], json!({}), "u1 is offline");

    // revoke --jti --until: that token's connection is closed with 4409, said `revoked`.
    let now = now_secs();
    let mut c = claims("u2");
    c["jti"] = json!("t-1");
    let mut u2 = connect(relay.client, &token(c)).await;
    assert_eq!(events.expect("Connected").await["event"]["sub"], "u2");
    let until = (now + 600).to_string();
    let r = control(&url, &["revoke", "--jti", "t-1", "--until", &until]).await;
    assert_eq!(r["reached"], 1, "{r}");
    assert_eq!(close_code(&mut u2, WAIT).await, Some(4409));
    let line = events.expect("Disconnected").await;
    assert_eq!(line["event"]["reason"], "revoked", "{line}");

    // invalidate --sub --issued-before: the user's token issued earlier is closed too.
    let mut c = claims("u3");
    c["iat"] = json!(now - 10);
    let mut u3 = connect(relay.client, &token(c)).await;
    assert_eq!(events.expect("Connected").await["event"]["sub"], "u3");
    let before = now.to_string();
    let r = control(
        &url,
        &["invalidate", "--sub", "u3", "--issued-before", &before],
    )
    .await;
    assert_eq!(r["reached"], 1, "{r}");
    assert_eq!(close_code(&mut u3, WAIT).await, Some(4409));
    let line = events.expect("Disconnected").await;
    assert_eq!(
        (
            line["event"]["sub"].as_str(),
            line["event"]["reason"].as_str()
        ),
        (Some("u3"), Some("revoked")),
        "{line}"
    );

    // A refused command exits 1 with the service's reason; no service answering exits 2.
    let (code, _, err) = control_on(&url, CONTROL, &["disconnect"]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("refused (400): name `sub` or `connection`"),
        "{err}"
    );
    let (code, _, err) = control_on(
        &url,
        "wsrelay.control.none",
        &["connections", "--sub", "u1"],
    )
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no control service answered"), "{err}");
    let nowhere = format!("nats://127.0.0.1:{}", free_port());
    let (code, _, err) = control_on(&nowhere, CONTROL, &["connections", "--sub", "u1"]).await;
    assert_eq!(code, Some(2), "NATS not reachable: {err}");

    // Stopped with SIGTERM and started again under the same durable name, the consumer goes
    // on after what it acknowledged: the first event it prints is the new connection's. Its
    // state is in memory (the README says so): it knows only what it read since.
    let status = events.stop().await;
    assert!(status.success(), "events_consumer.py exited with {status}");
    let mut events = Consumer::start(&url, "presence");
    let _u4 = connect(relay.client, &token(claims("u4"))).await;
    let line = events.expect("Connected").await;
    assert_eq!(line["event"]["sub"], "u4", "{line}");
    let u4 = line["event"]["connection"].clone();
    assert_eq!(line["online"], json!({"u4": [u4]}));
    assert!(events.stop().await.success());
}

/// The users of [`the_documented_nats_permissions_are_enough_and_refuse_the_rest`], with the
/// permissions docs/backend.md lists (section "NATS permissions") for its subjects.
fn permissions_conf(store: &Path) -> String {
    let list = |v: &[String]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // What every relay needs whatever its features (relay/README.md): its bindings' subjects
    // (here the example's `public.{topic}`) and `_WSRELAY.>`.
    let base = ["public.>".to_owned(), "_WSRELAY.>".to_owned()];
    let relay_pub: Vec<String> = base
        .iter()
        .cloned()
        .chain([
            format!("{EVENTS}.*"),
            "$JS.API.>".into(),
            format!("$KV.{BUCKET}.>"),
            "$JS.FC.>".into(),
            format!("{CONTROL}.fleet.*"),
            "_INBOX.>".into(),
        ])
        .collect();
    let relay_sub: Vec<String> = base
        .iter()
        .cloned()
        .chain([format!("{CONTROL}.>"), "$SRV.>".into(), "_INBOX.>".into()])
        .collect();
    let backend_pub: Vec<String> = ["disconnect", "connections", "revoke", "invalidate"]
        .iter()
        .map(|e| format!("{CONTROL}.{e}"))
        .collect();
    let reader_pub = [
        format!("$JS.API.CONSUMER.INFO.{STREAM}.reader"),
        format!("$JS.API.CONSUMER.CREATE.{STREAM}.reader"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{STREAM}.reader"),
        format!("$JS.ACK.{STREAM}.reader.>"),
    ];
    let reader_sub = [format!("{EVENTS}.*"), "_INBOX.>".into()];
    let inbox = ["_INBOX.>".to_owned()];
    format!(
        r#"
jetstream {{ store_dir: {store:?} }}
authorization {{
  users: [
    {{user: relay, password: relay-secret, permissions: {{publish: [{}], subscribe: [{}]}}}}
    {{user: backend, password: backend-secret, permissions: {{publish: [{}], subscribe: [{}]}}}}
    {{user: reader, password: reader-secret, permissions: {{publish: [{}], subscribe: [{}]}}}}
  ]
}}
"#,
        list(&relay_pub),
        list(&relay_sub),
        list(&backend_pub),
        list(&inbox),
        list(&reader_pub),
        list(&reader_sub),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_nats_permissions_are_enough_and_refuse_the_rest() {
    init_logs();
    let dir = StoreDir::new("nats-permissions");
    let nats = Nats::start_config(&dir, &permissions_conf(&dir.join("js")));
    // async-nats takes no user and password from a URL: they go in the options.
    let login = |user: &str| {
        async_nats::ConnectOptions::with_user_and_password(user.into(), format!("{user}-secret"))
    };
    std::fs::write(dir.join("user"), "relay").unwrap();
    std::fs::write(dir.join("password"), "relay-secret").unwrap();
    // The relay with exactly its documented permissions: the start waits for its registry.
    let relay = TestRelay::builder(&nats)
        .hs256()
        .registry(BUCKET, "relay-a", 15)
        .events(EVENTS, Some(STREAM))
        .control(CONTROL)
        .config(|c| {
            c.nats.credentials.user_file = Some(dir.join("user"));
            c.nats.credentials.password_file = Some(dir.join("password"));
        })
        .start()
        .await;

    // The events stream in place, seen with the relay's user (the reader may not look at
    // streams): the consumer is created on it.
    let js = async_nats::jetstream::new(login("relay").connect(nats.url()).await.unwrap());
    assert!(
        eventually(WAIT, || async { js.get_stream(STREAM).await.is_ok() }).await,
        "the relay did not create the events stream {STREAM}"
    );

    // The reader: events as plain messages (async-nats), and through its durable consumer
    // `reader` (the Python example; nats-py reads the user and password from the URL).
    let (errors_tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
    let reader = login("reader")
        .request_timeout(Some(Duration::from_secs(3)))
        .event_callback(move |e| {
            let tx = errors_tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = e {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(nats.url())
        .await
        .unwrap();
    let mut plain = reader.subscribe(format!("{EVENTS}.*")).await.unwrap();
    // The subscription in place at the server before the first event is published.
    reader.flush().await.unwrap();
    let as_user = |user: &str| format!("nats://{user}:{user}-secret@127.0.0.1:{}", nats.port);
    let mut consumer = Consumer::start(&as_user("reader"), "reader");

    let mut u1 = relay.connect(&token(claims("u1"))).await;
    assert_eq!(subscribe(&mut u1, 1, "public.lobby").await["type"], "ok");
    let next_plain = async |plain: &mut async_nats::Subscriber| -> Value {
        let m = tokio::time::timeout(WAIT, futures::StreamExt::next(plain))
            .await
            .expect("no event within 20 s")
            .unwrap();
        serde_json::from_slice(&m.payload).unwrap()
    };
    let e = next_plain(&mut plain).await;
    assert_eq!(
        (e["type"].as_str(), e["sub"].as_str()),
        (Some("Connected"), Some("u1"))
    );
    let line = consumer.expect("Connected").await;
    assert_eq!(line["event"]["sub"], "u1", "{line}");

    // The reader may not command: its request is refused by the server, which says so
    // (asynchronously) and delivers nothing, so the request times out.
    let subject = format!("{CONTROL}.disconnect");
    let err = reader
        .request(subject.clone(), r#"{"sub":"u1"}"#.into())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), async_nats::RequestErrorKind::TimedOut, "{err}");
    let said = tokio::time::timeout(WAIT, errors.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        said,
        format!("nats: Permissions Violation for Publish to {subject:?}")
    );
    assert_eq!(
        request(&mut u1, json!({"type": "ping", "id": 2})).await["type"],
        "pong",
        "u1 is still connected"
    );

    // The backend may.
    let backend = login("backend").connect(nats.url()).await.unwrap();
    let command = async |verb: &str, body: Value| -> Value {
        let reply = backend
            .request(format!("{CONTROL}.{verb}"), body.to_string().into())
            .await
            .unwrap();
        assert!(reply.headers.is_none(), "refused: {:?}", reply.headers);
        serde_json::from_slice(&reply.payload).unwrap()
    };
    let r = command("connections", json!({"sub": "u1"})).await;
    assert_eq!(r["reached"], 1, "{r}");
    // A revocation is stored in the registry by the relay (its `$KV` permission): else the
    // reply is an error (503).
    let until = now_secs() + 600;
    let r = command("revoke", json!({"jti": "t-9", "until": until})).await;
    assert_eq!(r, json!({"reached": 0, "relays": 1, "expected": 1}));
    // And through the Python example.
    let (code, out, err) = control_on(
        &as_user("backend"),
        CONTROL,
        &["disconnect", "--sub", "u1", "--no-reconnect"],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r, json!({"reached": 1, "relays": 1, "expected": 1}));
    assert_eq!(close_code(&mut u1, WAIT).await, Some(4101));
    let mut kinds = Vec::new();
    while kinds.last().map(String::as_str) != Some("Disconnected") {
        let e = next_plain(&mut plain).await;
        if e["type"] == "Disconnected" {
            assert_eq!(
                (e["reason"].as_str(), e["closeCode"].as_u64()),
                (Some("disconnect"), Some(4101)),
                "{e}"
            );
        }
        kinds.push(e["type"].as_str().unwrap().to_owned());
    }
    assert_eq!(kinds, ["Subscribed", "Disconnected"]);
    consumer.expect("Subscribed").await;
    let line = consumer.expect("Disconnected").await;
    assert_eq!(line["event"]["reason"], "disconnect", "{line}");
    // It stops cleanly (an acknowledgement refused would be a violation, checked below).
    assert!(consumer.stop().await.success());
    assert_eq!(
        relay
            .metric("wsrelay_events_failed_total{event=\"Disconnected\"}")
            .await,
        Some(0.0)
    );

    // The only violation the server saw is the reader's command.
    let log = nats.log();
    let violations: Vec<&str> = log.lines().filter(|l| l.contains("Violation")).collect();
    assert_eq!(violations.len(), 1, "{log}");
    assert!(
        violations[0].contains(r#""$G/user:reader" - Publish Violation"#)
            && violations[0].contains(&subject),
        "{log}"
    );
}
