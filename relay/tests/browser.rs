//! A real browser as the client: headless Chromium runs the browser example of
//! docs/protocol.md (section 7, taken from the document itself, so the example cannot rot)
//! against a relay and a real nats-server. The example uses the SDK: the page loads the built
//! `@wsrelay/client` (clients/js/dist/esm, through an import map) as an application would. The
//! token travels the only way a browser can send it, in `Sec-WebSocket-Protocol`, and the
//! browser's own `Origin` header meets the relay's allowlist: allowed from the page's origin,
//! refused (403 before the upgrade) from another.
//!
//! Chromium comes from Debian (`chromium`, installed by `make deps`; `CHROMIUM` overrides).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::response::IntoResponse;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use wsrelay::config::Direction;
use wsrelay_testkit::prelude::*;

/// How long the browser may take to start, load the page, connect and report.
const BROWSER_WAIT: Duration = Duration::from_secs(60);

/// The ```js block of docs/protocol.md's browser example.
fn documented_example() -> String {
    let doc = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md"),
    )
    .unwrap();
    let section = doc
        .split("## 7. Example (browser)")
        .nth(1)
        .expect("docs/protocol.md has the browser example section");
    let code = section
        .split("```js\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the browser example is a ```js block");
    assert!(
        code.contains(r#"import { Client } from "@wsrelay/client";"#)
            && code.contains("export function start(url, getToken, onMessage)"),
        "{code}"
    );
    code.to_string()
}

/// The SDK's build output (clients/js/dist/esm), built first if missing (needs
/// `npm ci` in clients/js, which `make client-js` runs).
fn sdk_dist() -> PathBuf {
    let js = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../clients/js");
    let dist = js.join("dist/esm");
    if !dist.join("index.js").exists() {
        let built = Command::new("npm")
            .args(["run", "build"])
            .current_dir(&js)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            built && dist.join("index.js").exists(),
            "the SDK is not built: run `cd clients/js && npm ci && npm run build` (or make client-js)"
        );
    }
    dist
}

/// A page that runs the example (a module that imports the SDK by its package name) and
/// reports to the test server what it sees: every message (`onMessage`), and each connection
/// with its transport.
fn page(relay: SocketAddr, token: &str) -> String {
    format!(
        r#"<!doctype html><html><head>
<script type="importmap">{{ "imports": {{ "@wsrelay/client": "/dist/esm/index.js" }} }}</script>
</head><body><script type="module">
{example}
const report = (what) => fetch("/report", {{ method: "POST", body: JSON.stringify(what) }});
const client = start("ws://{relay}/ws", async () => "{token}", (channel, payload) => report({{ kind: "message", channel, payload }}));
client.on("connected", (c) => report({{ kind: "connected", transport: c.transport }}));
</script></body></html>"#,
        example = documented_example()
    )
}

/// A page whose connection the relay must refuse: it reports the close code once.
fn refused_page(relay: SocketAddr, token: &str) -> String {
    format!(
        r#"<!doctype html><html><body><script>
const ws = new WebSocket("ws://{relay}/ws", ["wsrelay.v1", "bearer.{token}"]);
ws.onclose = (e) => fetch("/report", {{ method: "POST", body: JSON.stringify({{ kind: "closed", code: e.code, opened: e.wasClean }}) }});
</script></body></html>"#
    )
}

/// A small web server on `listener`: the page at `/`, the built SDK under `/dist/esm/`, and
/// each JSON body POSTed to `/report` forwarded to the test.
fn serve_page(listener: TcpListener, page: String) -> mpsc::UnboundedReceiver<Value> {
    use axum::routing::{get, post};
    let (tx, rx) = mpsc::unbounded_channel();
    let dist = sdk_dist();
    let app = axum::Router::new()
        .route("/", get(move || async move { axum::response::Html(page) }))
        .route(
            "/dist/esm/{file}",
            get(
                move |axum::extract::Path(file): axum::extract::Path<String>| {
                    let dist = dist.clone();
                    async move {
                        let ok =
                            file.ends_with(".js") && !file.contains("..") && !file.contains('/');
                        match std::fs::read(dist.join(&file)) {
                            Ok(body) if ok => (
                                [(axum::http::header::CONTENT_TYPE, "text/javascript")],
                                body,
                            )
                                .into_response(),
                            _ => axum::http::StatusCode::NOT_FOUND.into_response(),
                        }
                    }
                },
            ),
        )
        .route(
            "/report",
            // The page posts text (no CORS preflight), so the body is parsed here.
            post(move |body: String| async move {
                if let Ok(v) = serde_json::from_str::<Value>(&body) {
                    let _ = tx.send(v);
                }
                axum::http::StatusCode::NO_CONTENT
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });
    rx
}

/// Headless Chromium on `url`, killed on drop.
struct Browser {
    child: Child,
    profile: PathBuf,
}

impl Browser {
    fn open(url: &str) -> Self {
        let bin = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into());
        let profile = std::env::temp_dir().join(format!(
            "wsrelay-chromium-{}-{}",
            std::process::id(),
            free_port()
        ));
        // No background networking: this machine has no way out, and the browser must not try.
        let child = Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin} ({e}): install Debian's chromium (make deps) or set CHROMIUM")
            });
        Self { child, profile }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// HS256 tokens, one allowed origin, each user's own channel.
fn config(nats: &Nats, allowed_origin: &str) -> RelayBuilder {
    TestRelay::builder(nats)
        .hs256()
        .origin(allowed_origin)
        .binding(
            "me.notify",
            "users.{claims.sub}.notify",
            Direction::Subscribe,
        )
}

async fn next_report(rx: &mut mpsc::UnboundedReceiver<Value>, within: Duration) -> Option<Value> {
    tokio::time::timeout(within, rx.recv()).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_browser_example_receives_its_messages_in_chromium() {
    init_logs();
    let nats = Nats::start();
    let nc = nats.client().await;
    // The page's origin (its server's address) goes into the relay's allowlist.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let token = hs256(claims("alice"));
    let relay = config(&nats, &format!("http://{addr}")).start().await;
    let mut reports = serve_page(listener, page(relay.client_addr, &token));
    let _browser = Browser::open(&format!("http://{addr}/"));

    let connected = next_report(&mut reports, BROWSER_WAIT)
        .await
        .expect("the SDK connects");
    assert_eq!(
        connected,
        json!({"kind": "connected", "transport": "websocket"})
    );
    // Publish until the browser reports a message: its subscription is in place once one
    // arrives (the example does not surface the `ok`).
    let deadline = tokio::time::Instant::now() + BROWSER_WAIT;
    let got = loop {
        nc.publish("users.alice.notify", r#"{"hello":"browser"}"#.into())
            .await
            .unwrap();
        nc.flush().await.unwrap();
        if let Some(r) = next_report(&mut reports, Duration::from_millis(500)).await {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Chromium reported no message within {BROWSER_WAIT:?}"
        );
    };
    assert_eq!(
        got,
        json!({"kind": "message", "channel": "me.notify", "payload": {"hello": "browser"}})
    );
    // Nothing for another user reaches this page.
    nc.publish("users.bob.notify", r#"{"not":"yours"}"#.into())
        .await
        .unwrap();
    nc.publish("users.alice.notify", r#"{"last":1}"#.into())
        .await
        .unwrap();
    nc.flush().await.unwrap();
    // Until the last message's report (bounded): the page reports each message with its
    // own request, so reports can come late and in any order; then briefly, for stragglers.
    let mut rest = Vec::new();
    let deadline = tokio::time::Instant::now() + BROWSER_WAIT;
    while !rest.contains(&json!({"last": 1})) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_report(&mut reports, left).await {
            Some(r) => rest.push(r["payload"].clone()),
            None => break,
        }
    }
    while let Some(r) = next_report(&mut reports, Duration::from_millis(700)).await {
        rest.push(r["payload"].clone());
    }
    assert!(rest.contains(&json!({"last": 1})), "{rest:?}");
    assert!(!rest.contains(&json!({"not": "yours"})), "{rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_from_another_origin_is_refused_before_the_upgrade() {
    init_logs();
    let nats = Nats::start();
    let relay = config(&nats, "https://app.example.com").start().await;
    let token = hs256(claims("alice"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut reports = serve_page(listener, refused_page(relay.client_addr, &token));
    let _browser = Browser::open(&format!("http://{addr}/"));
    let report = next_report(&mut reports, BROWSER_WAIT)
        .await
        .expect("the page reports how its connection ended");
    // A browser shows a refused handshake as close code 1006, never as an open socket.
    assert_eq!(report["kind"], "closed", "{report}");
    assert_eq!(report["code"], 1006, "{report}");
    let refused = metric(
        relay.admin_addr,
        "wsrelay_connections_refused_total{reason=\"origin\"}",
    )
    .await;
    assert_eq!(refused, Some(1.0), "the relay counts one origin refusal");
}

/// A page whose SDK client reports its connections, the server-side subscriptions the client
/// surfaces (`subscribed` events) and their messages (handlers attached from the event).
fn server_side_page(relay: SocketAddr, token: &str) -> String {
    format!(
        r#"<!doctype html><html><head>
<script type="importmap">{{ "imports": {{ "@wsrelay/client": "/dist/esm/index.js" }} }}</script>
</head><body><script type="module">
import {{ Client }} from "@wsrelay/client";
const report = (what) => fetch("/report", {{ method: "POST", body: JSON.stringify(what) }});
const client = new Client({{ url: "ws://{relay}/ws", getToken: async () => "{token}" }});
client.on("connected", (c) => report({{ kind: "connected", reconnected: c.reconnected }}));
client.on("subscribed", ({{ channel, byServer, subscription, resubscribed }}) => {{
  report({{ kind: "subscribed", channel, byServer, resubscribed, same: client.getSubscription(channel) === subscription }});
  if (!resubscribed) subscription.on("message", (m) => report({{ kind: "message", channel: m.channel, payload: m.data }}));
}});
client.connect();
</script></body></html>"#
    )
}

/// The next report `want` accepts, skipping others (bounded by [`BROWSER_WAIT`]).
async fn report_where(
    rx: &mut mpsc::UnboundedReceiver<Value>,
    want: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + BROWSER_WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_report(rx, left).await {
            Some(r) if want(&r) => return r,
            Some(_) => {}
            None => panic!("no such report from Chromium within {BROWSER_WAIT:?}"),
        }
    }
}

/// Publishes `payload` on `subject` every half second until the page reports it.
async fn published_until_reported(
    nc: &async_nats::Client,
    rx: &mut mpsc::UnboundedReceiver<Value>,
    subject: &str,
    payload: Value,
) {
    let deadline = tokio::time::Instant::now() + BROWSER_WAIT;
    loop {
        nc.publish(subject.to_owned(), payload.to_string().into())
            .await
            .unwrap();
        nc.flush().await.unwrap();
        let until = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some(r)) = tokio::time::timeout_at(until, rx.recv()).await {
            if r["kind"] == "message" && r["payload"] == payload {
                assert_eq!(r["channel"], "feed.news", "{r}");
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Chromium reported no {payload} within {BROWSER_WAIT:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_side_subscription_reaches_the_sdk_in_chromium_and_survives_its_reconnect() {
    use wsrelay::runtime::control::{Selector, Verb, ask};
    init_logs();
    const CONTROL: &str = "wsrelay.control.test.browser";
    let (_store, nats) = jetstream_nats("browser-srvsub");
    let nc = nats.client().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let relay = config(&nats, &format!("http://{addr}"))
        .binding("feed.{x}", "feed.{x}", Direction::Subscribe)
        .registry("WSRELAY_TEST_BROWSER_REG", "relay-a", 15)
        .control(CONTROL)
        .start()
        .await;
    // The backend subscribes alice before her page connects: she gets it after `welcome`.
    let command = |verb, s: Selector| {
        let url = nats.url();
        async move { ask(&url, None, CONTROL, verb, &s).await.unwrap() }
    };
    let alice = |channel: Option<&str>| Selector {
        sub: Some("alice".into()),
        channel: channel.map(str::to_owned),
        ..Selector::default()
    };
    let r = command(Verb::Subscribe, alice(Some("feed.news"))).await;
    assert_eq!(
        serde_json::from_str::<Value>(&r).unwrap()["reached"],
        0,
        "{r}"
    );
    let token = hs256(claims("alice"));
    let mut reports = serve_page(listener, server_side_page(relay.client_addr, &token));
    let _browser = Browser::open(&format!("http://{addr}/"));
    let first = report_where(&mut reports, |r| r["kind"] == "subscribed").await;
    assert_eq!(
        first,
        json!({"kind": "subscribed", "channel": "feed.news", "byServer": true, "resubscribed": false, "same": true})
    );
    published_until_reported(&nc, &mut reports, "feed.news", json!({"n": 1})).await;

    // Its connection dropped by the backend (4100: reconnect); the SDK reconnects, does not
    // subscribe itself, and the relay gives the subscription back.
    let r = command(Verb::Disconnect, alice(None)).await;
    assert_eq!(
        serde_json::from_str::<Value>(&r).unwrap()["reached"],
        1,
        "{r}"
    );
    report_where(&mut reports, |r| {
        r["kind"] == "connected" && r["reconnected"] == true
    })
    .await;
    let again = report_where(&mut reports, |r| r["kind"] == "subscribed").await;
    assert_eq!(
        again,
        json!({"kind": "subscribed", "channel": "feed.news", "byServer": true, "resubscribed": true, "same": true})
    );
    published_until_reported(&nc, &mut reports, "feed.news", json!({"n": 2})).await;
}

/// A page with no SDK: a bare `EventSource` on an auto-subscribed binding, reporting each
/// frame with its event id, and a second one with a bad token, reporting the `close` event
/// it reads (then closing it, as an application would).
fn event_source_page(relay: SocketAddr, token: &str) -> String {
    format!(
        r#"<!doctype html><html><body><script>
// One report after the other, so the test reads them in the order the page saw them.
let chain = Promise.resolve();
const report = (what) => {{
  chain = chain.then(() => fetch("/report", {{ method: "POST", body: JSON.stringify(what) }})).catch(() => {{}});
}};
const es = new EventSource("http://{relay}/ws/sse?token={token}");
es.onmessage = (e) => report({{ kind: "frame", frame: JSON.parse(e.data), id: e.lastEventId }});
es.onerror = () => report({{ kind: "error", state: es.readyState }});
const bad = new EventSource("http://{relay}/ws/sse?token=not-a-token");
bad.addEventListener("close", (e) => {{
  report({{ kind: "refused", close: JSON.parse(e.data) }});
  bad.close();
}});
</script></body></html>"#
    )
}

/// Message payloads the page reported until `want` of them (skipping other reports), and
/// whether a `subscribed` frame said `recovered: true` meanwhile; bounded.
async fn event_source_messages(
    rx: &mut mpsc::UnboundedReceiver<Value>,
    want: usize,
    recovered: &mut bool,
) -> Vec<u64> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + BROWSER_WAIT;
    while got.len() < want {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(r) = next_report(rx, left).await else {
            panic!("the page reported {got:?}, not {want} messages, within {BROWSER_WAIT:?}");
        };
        let f = &r["frame"];
        match f["type"].as_str() {
            Some("message") => got.push(f["payload"].as_u64().unwrap()),
            Some("subscribed") if f["recovered"] == true => *recovered = true,
            _ => {}
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_event_source_gets_its_notifications_and_resumes_across_a_relay_sigkill() {
    init_logs();
    let (_store, nats) = jetstream_nats("browser-event-source");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let page_addr = listener.local_addr().unwrap();
    let mut notifications = binding(
        "notifications",
        "users.{claims.sub}.notify",
        Direction::Subscribe,
    );
    notifications.auto_subscribe = true;
    notifications.history = Some(
        serde_json::from_value(
            json!({"stream": "WSRELAY_TEST_EVENT_SOURCE", "maxMessages": 100, "maxAgeSeconds": 300}),
        )
        .unwrap(),
    );
    let mut c = TestRelay::builder(&nats)
        .hs256()
        .anonymous(false)
        .origin(&format!("http://{page_addr}"))
        .with_binding(notifications)
        .build();
    // As the operator renders it: refusals a page can read.
    c.auth.refuse_after_upgrade = true;
    let port = free_port();
    c.listen.client = format!("127.0.0.1:{port}").parse().unwrap();
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_wsrelay"));
    let streams_ready = |admin| async move {
        assert!(
            eventually(Duration::from_secs(20), || async {
                metric(admin, "wsrelay_history_streams_ready").await == Some(1.0)
            })
            .await,
            "the history stream was not put in place"
        );
    };
    let relay = RelayProcess::spawn_config(bin, &c, "browser-event-source", "info");
    streams_ready(relay.admin).await;
    let nc = nats.client().await;
    let publish = |from: u64, to: u64| {
        let nc = nc.clone();
        async move {
            for i in from..=to {
                for user in ["alice", "bob"] {
                    nc.publish(
                        format!("users.{user}.notify"),
                        (i * 1000).to_string().into(),
                    )
                    .await
                    .unwrap();
                }
                nc.publish("users.alice.notify", i.to_string().into())
                    .await
                    .unwrap();
            }
            nc.flush().await.unwrap();
        }
    };
    let token = hs256(claims("alice"));
    let mut reports = serve_page(listener, event_source_page(relay.client, &token));
    let _browser = Browser::open(&format!("http://{page_addr}/"));

    // The bad token's stream: a readable close with 4401, not a silent error.
    // The good one: subscribed with no request, then the user's own notifications only.
    let mut refused = None;
    let mut subscribed = false;
    let deadline = tokio::time::Instant::now() + BROWSER_WAIT;
    while refused.is_none() || !subscribed {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let r = next_report(&mut reports, left)
            .await
            .expect("the page reports its two streams");
        match r["kind"].as_str() {
            Some("refused") => refused = Some(r["close"].clone()),
            Some("frame") if r["frame"]["type"] == "subscribed" => {
                assert_eq!(r["frame"]["auto"], true, "{r}");
                assert_eq!(r["frame"]["channel"], "notifications", "{r}");
                subscribed = true;
            }
            _ => {}
        }
    }
    let refused = refused.unwrap();
    assert_eq!(refused["code"], 4401, "{refused}");
    assert_eq!(refused["reason"], "invalid token", "{refused}");

    // Alice's and bob's notifications are published; the page shows alice's, in order.
    // Each publish round is alice's i * 1000 and bob's, then alice's i.
    let mut recovered = false;
    publish(1, 10).await;
    let mut got = event_source_messages(&mut reports, 20, &mut recovered).await;

    // SIGKILL; published to while down; restarted on its port. EventSource reconnects by
    // itself, with the last event id in `Last-Event-ID`.
    drop(relay);
    publish(11, 20).await;
    let relay = RelayProcess::spawn_config(bin, &c, "browser-event-source", "info");
    streams_ready(relay.admin).await;
    got.extend(event_source_messages(&mut reports, 20, &mut recovered).await);
    assert!(recovered, "the reconnected stream said recovered: true");
    publish(21, 30).await;
    got.extend(event_source_messages(&mut reports, 20, &mut recovered).await);
    let want: Vec<u64> = (1..=30).flat_map(|i| [i * 1000, i]).collect();
    assert_eq!(
        got, want,
        "alice's notifications, 0 lost, 0 repeated, none of bob's"
    );
}
