//! The backend's side of docs/backend.md as a backend runs it: the Python examples
//! (examples/backend-python) against a real relay binary and a JetStream nats-server.
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
