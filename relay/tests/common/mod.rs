//! Shared helpers for the relay's integration tests: a real nats-server per test, a relay
//! in-process (or the real binary), real WebSocket clients. Loopback only; every wait is
//! bounded, by 20 s for what is expected to come: a loaded machine can stall for seconds.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream as TokioTcp;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsrelay::config::{Binding, Config, Direction, Jwt, JwtAlgorithm, JwtKey};

pub mod sse;

pub type Ws = WebSocketStream<MaybeTlsStream<TokioTcp>>;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The nats-server binary: `NATS_SERVER_BIN`, else `nats-server` on PATH, else the
/// project's tool cache.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("nats-server");
            if p.is_file() {
                return p;
            }
        }
    }
    let cache = std::env::var("WSRELAY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/wsrelay")
        });
    let p = cache.join("path/nats-server");
    if p.is_file() {
        return p;
    }
    panic!(
        "nats-server not found: set NATS_SERVER_BIN or put nats-server on PATH (run `make tools`, which builds it into ~/.cache/wsrelay/path)"
    );
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A nats-server on 127.0.0.1, killed on drop.
pub struct Nats {
    pub port: u16,
    child: Option<Child>,
}

impl Nats {
    /// On a port nats-server picks itself (`-p -1`): no other process can take it between
    /// the choice and the bind, as one could a port `free_port` saw free.
    pub fn start() -> Self {
        Self::start_args(&[])
    }

    /// Like [`Nats::start`], with extra nats-server arguments (auth, TLS, JetStream).
    pub fn start_args(extra: &[&str]) -> Self {
        Self::try_start_args(extra)
            .unwrap_or_else(|log| panic!("nats-server did not start:\n{log}"))
    }

    /// Like [`Nats::start_args`]; `Err(its log)` when it exited instead of starting.
    pub fn try_start_args(extra: &[&str]) -> Result<Self, String> {
        Self::spawn("-1", extra)
    }

    /// On `port`, e.g. to start again where a stopped server listened.
    pub fn start_on(port: u16) -> Self {
        Self::start_with(port, &[])
    }

    /// On `port`, with extra nats-server arguments (auth, TLS).
    pub fn start_with(port: u16, extra: &[&str]) -> Self {
        Self::try_start_with(port, extra)
            .unwrap_or_else(|log| panic!("nats-server could not start on {port}:\n{log}"))
    }

    /// Starts nats-server on `port`; `Err(its log)` when it exited instead (the port was
    /// taken: what answers there is someone else's server).
    pub fn try_start_with(port: u16, extra: &[&str]) -> Result<Self, String> {
        Self::spawn(&port.to_string(), extra)
    }

    /// Starts nats-server and waits for its own log to say it is ready, and on which port.
    /// A connect to the port cannot tell this server from another test's that took the port
    /// first (this one then exits, but maybe only after a check had found it alive).
    fn spawn(port: &str, extra: &[&str]) -> Result<Self, String> {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(nats_server_bin())
            .args(["-a", "127.0.0.1", "-p", port])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nats-server");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel::<Result<u16, String>>();
        // Reads the log to its end (the server's exit), so that it never blocks on a full pipe.
        // A cluster member binds its route port after "Server is ready" (and exits if that
        // port is taken): it is ready once it listens for routes too.
        let mut routes = !extra.contains(&"--cluster");
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            let (mut log, mut listening, mut ready) = (String::new(), None, false);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.is_none() {
                    continue;
                }
                log.push_str(&line);
                log.push('\n');
                if let Some(at) = line.split("Listening for client connections on ").nth(1) {
                    listening = at.trim().rsplit(':').next().and_then(|p| p.parse().ok());
                }
                routes |= line.contains("Listening for route connections on ");
                ready |= line.contains("Server is ready");
                if ready
                    && routes
                    && let Some(port) = listening
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(Ok(port));
                }
            }
            if let Some(tx) = tx {
                let _ = tx.send(Err(log));
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(port)) => Ok(Self {
                port,
                child: Some(child),
            }),
            Ok(Err(log)) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(log)
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("nats-server (port {port}) was not ready within 30 s")
            }
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's process id (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.expect("nats connect")
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A directory of a test's own under the system temp dir, removed when dropped.
pub struct StoreDir(PathBuf);

impl StoreDir {
    /// `wsrelay-js-<pid>-<tag>` under the temp dir, empty.
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("wsrelay-js-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl std::ops::Deref for StoreDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for StoreDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A nats-server with JetStream, its store in a directory of the test's own. The directory
/// comes first so that it outlives the server: `let (_store, nats) = jetstream_nats(..)`.
pub fn jetstream_nats(tag: &str) -> (StoreDir, Nats) {
    let dir = StoreDir::new(tag);
    let nats = Nats::start_args(&["-js", "-sd", dir.to_str().unwrap()]);
    (dir, nats)
}

/// A config on loopback with free ports.
pub fn base_config(nats_url: &str) -> Config {
    let mut c = Config::example(nats_url);
    c.listen.client = "127.0.0.1:0".parse().unwrap();
    c.listen.admin = "127.0.0.1:0".parse().unwrap();
    c.drain.grace_period_seconds = 2;
    c
}

pub fn binding(channel: &str, subject: &str, direction: Direction) -> Binding {
    Binding {
        channel: channel.into(),
        subject: subject.into(),
        direction,
        history: None,
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// JWT verification that accepts what [`hs256`] signs with [`claims`]: HS256 with the fixture
/// secret, issuer `https://issuer.test`, audience `wsrelay`.
pub fn fixture_jwt() -> Jwt {
    Jwt {
        algorithms: vec![JwtAlgorithm::HS256],
        key: JwtKey {
            hmac_secret_file: Some(fixture("hmac.secret")),
            ..JwtKey::default()
        },
        issuer: Some("https://issuer.test".into()),
        audiences: vec!["wsrelay".into()],
        leeway_seconds: 5,
    }
}

/// An HS256 token signed with the fixture secret.
pub fn hs256(claims: Value) -> String {
    let secret = std::fs::read_to_string(fixture("hmac.secret")).unwrap();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.trim_end().as_bytes()),
    )
    .unwrap()
}

pub fn claims(sub: &str) -> Value {
    json!({"sub": sub, "iss": "https://issuer.test", "aud": "wsrelay", "exp": now_secs() + 600})
}

/// Connects a client; `Err(status)` if refused before the upgrade.
pub async fn connect_with(
    addr: SocketAddr,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, u16> {
    let url = format!("ws://{addr}/ws{query}");
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().append(
            tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let config = tungstenite::protocol::WebSocketConfig::default();
    match tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::connect_async_with_config(req, Some(config), true),
    )
    .await
    .expect("connect timed out")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("unexpected connect error: {e}"),
    }
}

/// Connects and reads the welcome frame.
pub async fn connect(addr: SocketAddr, query: &str) -> Ws {
    let mut ws = connect_with(addr, query, &[]).await.expect("refused");
    let w = next_json(&mut ws).await.expect("welcome");
    assert_eq!(w["type"], "welcome", "{w}");
    ws
}

/// What a read gave.
#[derive(Debug, PartialEq)]
pub enum Got {
    Json(Value),
    Closed(Option<u16>),
    Timeout,
}

/// The next text frame or close, skipping pings; bounded by `within`.
pub async fn next_event(ws: &mut Ws, within: Duration) -> Got {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Got::Timeout,
            Ok(None) => return Got::Closed(None),
            Ok(Some(Err(_))) => return Got::Closed(None),
            Ok(Some(Ok(Message::Text(t)))) => {
                return Got::Json(serde_json::from_str(t.as_str()).expect("json frame"));
            }
            Ok(Some(Ok(Message::Close(f)))) => return Got::Closed(f.map(|f| u16::from(f.code))),
            Ok(Some(Ok(_))) => {}
        }
    }
}

pub async fn next_json(ws: &mut Ws) -> Option<Value> {
    match next_event(ws, Duration::from_secs(20)).await {
        Got::Json(v) => Some(v),
        _ => None,
    }
}

/// Waits for a close frame, skipping text; returns its code.
pub async fn close_code(ws: &mut Ws, within: Duration) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_event(ws, left).await {
            Got::Json(_) => {}
            Got::Closed(code) => return code,
            Got::Timeout => return None,
        }
    }
}

pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Sends a request and returns its reply (skipping message frames).
pub async fn request(ws: &mut Ws, v: Value) -> Value {
    let id = v["id"].clone();
    send(ws, v).await;
    for _ in 0..1000 {
        let r = next_json(ws).await.expect("reply");
        if (r["type"] == "ok" || r["type"] == "error" || r["type"] == "pong") && r["id"] == id {
            return r;
        }
    }
    panic!("no reply");
}

pub async fn subscribe(ws: &mut Ws, id: u64, channel: &str) -> Value {
    request(
        ws,
        json!({"type": "subscribe", "id": id, "channel": channel}),
    )
    .await
}

/// Collects message frames until `quiet` passes without one.
pub async fn drain_messages(ws: &mut Ws, quiet: Duration) -> Vec<Value> {
    let mut out = Vec::new();
    while let Got::Json(v) = next_event(ws, quiet).await {
        if v["type"] == "message" {
            out.push(v);
        }
    }
    out
}

/// Waits for `n` message frames (skipping other frames), at most `within` in all; returns
/// those that came. Delivery is asynchronous (NATS, the hub, the client's outbox): a loaded
/// machine can take seconds, so expected messages are awaited, never assumed to come within
/// a short quiet period. Pair it with [`drain_messages`] to check that nothing more comes.
pub async fn expect_messages(ws: &mut Ws, n: usize, within: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_event(ws, left).await {
            Got::Json(v) if v["type"] == "message" => out.push(v),
            Got::Json(_) => {}
            Got::Closed(_) | Got::Timeout => break,
        }
    }
    out
}

/// The `n` message frames a client is waiting for (bounded: 20 s), then any that follow
/// within a short quiet period: for asserting that exactly these came.
pub async fn messages_then_quiet(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut got = expect_messages(ws, n, Duration::from_secs(20)).await;
    got.extend(drain_messages(ws, Duration::from_millis(300)).await);
    got
}

/// HTTP GET on the admin port; (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TokioTcp::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text[9..12].parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// A metric's value from the exposition (first sample whose line starts with `prefix`).
pub async fn metric(addr: SocketAddr, prefix: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics").await;
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Polls `f` until true, at most `within`.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Logs to the test output when `WSRELAY_LOG` is set (e.g. `WSRELAY_LOG=debug`).
pub fn init_logs() {
    if let Ok(filter) = std::env::var("WSRELAY_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// Sends a raw upgrade request and returns the response head (status line and headers).
pub async fn raw_upgrade(addr: SocketAddr, extra: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TokioTcp::connect(addr).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&buf[..got]).contains("\r\n\r\n") {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf[got..]))
            .await
            .expect("response timed out")
            .unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    let text = String::from_utf8_lossy(&buf[..got]).into_owned();
    text.split("\r\n\r\n").next().unwrap_or("").to_owned()
}

/// Upgrades a raw TCP connection (no WebSocket library: nothing is ever written after the
/// handshake, so pings stay unanswered) and returns it positioned after the 101 head.
pub async fn raw_ws(addr: SocketAddr) -> TokioTcp {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TokioTcp::connect(addr).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "connection closed during the handshake");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// Reads server frames from a raw socket until it closes (bounded); returns
/// (opcode, payload) pairs.
pub async fn raw_frames(s: &mut TokioTcp, within: Duration) -> Vec<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut buf)).await;
    let mut out = Vec::new();
    let mut i = 0;
    while i + 2 <= buf.len() {
        let op = buf[i] & 0x0f;
        let mut len = (buf[i + 1] & 0x7f) as usize;
        let mut at = i + 2;
        if len == 126 {
            len = u16::from_be_bytes([buf[at], buf[at + 1]]) as usize;
            at += 2;
        } else if len == 127 {
            len = u64::from_be_bytes(buf[at..at + 8].try_into().unwrap()) as usize;
            at += 8;
        }
        if at + len > buf.len() {
            break;
        }
        out.push((op, buf[at..at + len].to_vec()));
        i = at + len;
    }
    out
}
