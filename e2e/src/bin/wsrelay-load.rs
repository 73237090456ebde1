//! `wsrelay-load`: the one benchmark client of `make bench`, run against wsrelay, nats-server's
//! own WebSocket listener and the centrifuge peer alike.
//!
//! It opens N WebSocket connections (bound to source addresses 127.0.0.2.. so the ephemeral
//! port range is no limit), authenticates them, subscribes them, then publishes through NATS
//! at fixed rates with the send time in each 128-byte payload and records publish-to-receive
//! latency in an HDR histogram. Every run is bounded: `--connections`, `--step-seconds` times
//! `--max-steps`, and a hard `--max-seconds` after which the process exits by itself.
//! Output: one JSON document (`--out`).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, ValueEnum};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use wsrelay_e2e::load::natsproto::{Op, Reader};
use wsrelay_e2e::load::{
    ProcSample, encode_payload, new_histogram, now_ns, sample_proc, summarize, timestamps,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    Wsrelay,
    NatsWs,
    Centrifuge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// Every connection on one channel.
    Broadcast,
    /// Each connection on its own channel.
    Personal,
    /// Authenticated connections that subscribe to nothing: memory and handshakes.
    Idle,
}

#[derive(Debug, Parser)]
#[command(about = "WebSocket fan-out benchmark client (bounded in connections and time)")]
struct Args {
    #[arg(long, value_enum)]
    target: Target,
    #[arg(long, value_enum)]
    workload: Workload,
    /// Server address (loopback only), e.g. 127.0.0.1:18080.
    #[arg(long)]
    server: SocketAddrV4,
    /// WebSocket path: /ws (wsrelay), / (nats-ws), /connection/websocket (centrifuge).
    #[arg(long, default_value = "/ws")]
    path: String,
    /// NATS server the publisher uses (loopback only).
    #[arg(long, default_value = "127.0.0.1:4222")]
    nats: SocketAddrV4,
    /// NATS auth token for the publisher and for nats-ws clients.
    #[arg(long, default_value = "")]
    nats_token: String,
    /// HS256 key file: the generator mints one JWT per connection with it.
    #[arg(long)]
    jwt_secret_file: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Spread connections over 127.0.0.2 ..= 127.0.0.(1 + sources).
    #[arg(long, default_value_t = 16)]
    sources: u8,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Publish rates (messages per second), tried in order; empty: start, factor, steps.
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    #[arg(long, default_value_t = 50.0)]
    rate_start: f64,
    #[arg(long, default_value_t = 2.0)]
    rate_factor: f64,
    #[arg(long, default_value_t = 10)]
    max_steps: usize,
    #[arg(long, default_value_t = 5.0)]
    step_seconds: f64,
    /// A step fails when its p99 passes max(this, `--knee-factor` x the first step's p99);
    /// the run stops after the first failed step.
    #[arg(long, default_value_t = 50.0)]
    p99_limit_ms: f64,
    /// See `--p99-limit-ms`: on a small machine one fan-out burst to 10k sockets takes longer
    /// than 50 ms by itself, so saturation is where p99 grows well past its low-rate value.
    #[arg(long, default_value_t = 4.0)]
    knee_factor: f64,
    /// Idle workload: how long the connections are held before memory is read.
    #[arg(long, default_value_t = 5.0)]
    hold_seconds: f64,
    /// Processes to read CPU time and memory of: name=PID (repeatable).
    #[arg(long = "pid", value_parser = parse_pid)]
    pids: Vec<(String, u32)>,
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
    /// Hard bound: the process exits (status 3) after this many seconds whatever happens.
    #[arg(long, default_value_t = 300)]
    max_seconds: u64,
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_pid(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s.split_once('=').ok_or("expected name=PID")?;
    Ok((name.to_string(), pid.parse().map_err(|e| format!("{e}"))?))
}

const SHARDS: usize = 64;

#[derive(Debug)]
struct Shard {
    hist: Histogram<u64>,
    delivered: u64,
}

#[derive(Debug)]
struct Shared {
    shards: Vec<Mutex<Shard>>,
    ready: AtomicUsize,
    failed: AtomicUsize,
    lost: AtomicUsize,
    handshake: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    last_ready_ns: AtomicU64,
    stop: CancellationToken,
}

impl Shared {
    fn record(&self, conn: usize, frame: &[u8]) {
        let now = now_ns();
        let mut shard = match self.shards[conn % SHARDS].lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        for t in timestamps(frame) {
            let us = (now.saturating_sub(t) / 1000).max(1);
            shard.hist.saturating_record(us);
            shard.delivered += 1;
        }
    }

    /// Resets every shard and returns what they held.
    fn take(&self) -> (Histogram<u64>, u64) {
        let mut all = new_histogram();
        let mut delivered = 0;
        for s in &self.shards {
            let mut s = match s.lock() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            let _ = all.add(&s.hist);
            delivered += s.delivered;
            s.hist.reset();
            s.delivered = 0;
        }
        (all, delivered)
    }

    fn error(&self, e: &anyhow::Error) {
        let key: String = format!("{e:#}").chars().take(120).collect();
        if let Ok(mut m) = self.errors.lock() {
            *m.entry(key).or_default() += 1;
        }
    }
}

type Ws = WebSocketStream<TcpStream>;

fn subject_for(workload: Workload, i: usize) -> String {
    match workload {
        Workload::Personal => format!("bench.u{i}"),
        _ => "bench.all".to_string(),
    }
}

fn mint(key: &[u8], i: usize) -> Result<String> {
    let exp = now_ns() / 1_000_000_000 + 3600;
    let claims = json!({"sub": format!("u{i}"), "exp": exp});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key),
    )
    .context("mint JWT")
}

async fn tcp_connect(args: &Args, i: usize) -> Result<TcpStream> {
    let src = Ipv4Addr::new(127, 0, 0, 2 + (i % args.sources.max(1) as usize) as u8);
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::V4(SocketAddrV4::new(src, 0)))
        .with_context(|| format!("bind {src}"))?;
    let stream = sock
        .connect(SocketAddr::V4(args.server))
        .await
        .context("connect")?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads frames until `done` says the exchange is over (Some(Ok)) or failed (Some(Err)).
async fn expect(ws: &mut Ws, mut done: impl FnMut(&[u8]) -> Option<Result<()>>) -> Result<()> {
    while let Some(msg) = ws.next().await {
        let msg = msg.context("read")?;
        let bytes: &[u8] = match &msg {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b,
            Message::Close(c) => bail!("closed: {c:?}"),
            _ => continue,
        };
        if let Some(r) = done(bytes) {
            return r;
        }
    }
    bail!("connection ended")
}

/// Connects, authenticates and (unless idle) subscribes; returns the open socket and, for
/// nats-ws, the protocol reader holding any bytes already received.
async fn open(args: &Args, i: usize, token: &str) -> Result<(Ws, Reader)> {
    let stream = tcp_connect(args, i).await?;
    let url = match args.target {
        Target::Wsrelay => format!("ws://{}{}?token={token}", args.server, args.path),
        _ => format!("ws://{}{}", args.server, args.path),
    };
    let req = url.into_client_request()?;
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(1 << 20);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(config))
        .await
        .context("upgrade")?;
    let subscribe = args.workload != Workload::Idle;
    let subject = subject_for(args.workload, i);
    let mut reader = Reader::default();
    match args.target {
        Target::Wsrelay => {
            expect(&mut ws, |b| wsrelay_welcome(b).then_some(Ok(()))).await?;
            if subscribe {
                let sub = json!({"type": "subscribe", "id": 1, "channel": subject}).to_string();
                ws.send(Message::text(sub)).await?;
                expect(&mut ws, |b| {
                    let v: Value = serde_json::from_slice(b).ok()?;
                    match v["type"].as_str()? {
                        "ok" => Some(Ok(())),
                        "error" => Some(Err(anyhow!("subscribe: {v}"))),
                        _ => None,
                    }
                })
                .await?;
            }
        }
        Target::Centrifuge => {
            let connect = json!({"id": 1, "connect": {"token": token}}).to_string();
            ws.send(Message::text(connect)).await?;
            expect(&mut ws, |b| centrifuge_reply(b, 1)).await?;
            if subscribe {
                let sub = json!({"id": 2, "subscribe": {"channel": subject}}).to_string();
                ws.send(Message::text(sub)).await?;
                expect(&mut ws, |b| centrifuge_reply(b, 2)).await?;
            }
        }
        Target::NatsWs => {
            expect(&mut ws, |b| {
                reader.push(b);
                match reader.next_op()? {
                    Op::Info => Some(Ok(())),
                    other => Some(Err(anyhow!("expected INFO, got {other:?}"))),
                }
            })
            .await?;
            let connect = json!({"verbose": false, "pedantic": false, "protocol": 1,
                "auth_token": args.nats_token, "name": format!("bench-{i}"), "lang": "rust",
                "version": "0", "headers": false});
            let mut cmd = format!("CONNECT {connect}\r\n");
            if subscribe {
                cmd.push_str(&format!("SUB {subject} 1\r\n"));
            }
            cmd.push_str("PING\r\n");
            ws.send(Message::binary(cmd.into_bytes())).await?;
            let mut pending: Option<Result<()>> = None;
            // Anything already buffered first (INFO may share a frame with more).
            while let Some(op) = reader.next_op() {
                if let Some(r) = nats_handshake_op(op) {
                    pending = Some(r);
                    break;
                }
            }
            match pending {
                Some(r) => r?,
                None => {
                    expect(&mut ws, |b| {
                        reader.push(b);
                        while let Some(op) = reader.next_op() {
                            if let Some(r) = nats_handshake_op(op) {
                                return Some(r);
                            }
                        }
                        None
                    })
                    .await?
                }
            }
        }
    }
    Ok((ws, reader))
}

fn wsrelay_welcome(b: &[u8]) -> bool {
    wsrelay_e2e::load::find(b, b"\"type\":\"welcome\"").is_some()
}

fn nats_handshake_op(op: Op) -> Option<Result<()>> {
    match op {
        Op::Pong => Some(Ok(())),
        Op::Err(e) => Some(Err(anyhow!("nats: {e}"))),
        _ => None,
    }
}

/// The reply to centrifuge command `id`, possibly among other lines of one frame.
fn centrifuge_reply(b: &[u8], id: u64) -> Option<Result<()>> {
    for line in b.split(|c| *c == b'\n') {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        if v["id"].as_u64() == Some(id) {
            return Some(match v.get("error") {
                Some(e) => Err(anyhow!("centrifuge: {e}")),
                None => Ok(()),
            });
        }
    }
    None
}

async fn client(
    i: usize,
    args: Arc<Args>,
    shared: Arc<Shared>,
    token: String,
    gate: Arc<Semaphore>,
    started: Instant,
) {
    let permit = gate.acquire().await;
    let t0 = Instant::now();
    let opened = tokio::time::timeout(Duration::from_secs(20), open(&args, i, &token)).await;
    drop(permit);
    let (mut ws, mut reader) = match opened {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            shared.error(&e);
            shared.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Err(_) => {
            shared.error(&anyhow!("handshake timed out (20 s)"));
            shared.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    if let Ok(mut h) = shared.handshake.lock() {
        h.saturating_record((t0.elapsed().as_micros() as u64).max(1));
    }
    shared
        .last_ready_ns
        .fetch_max(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    shared.ready.fetch_add(1, Ordering::Relaxed);
    let stop = shared.stop.clone();
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            m = ws.next() => m,
        };
        let reply: Option<Message> = match msg {
            Some(Ok(Message::Text(t))) => {
                let b = t.as_bytes();
                shared.record(i, b);
                (args.target == Target::Centrifuge && b.split(|c| *c == b'\n').any(|l| l == b"{}"))
                    .then(|| Message::text("{}"))
            }
            Some(Ok(Message::Binary(b))) => {
                reader.push(&b);
                let mut pong = false;
                while let Some(op) = reader.next_op() {
                    match op {
                        Op::Msg(p) => shared.record(i, &p),
                        Op::Ping => pong = true,
                        Op::Err(e) => shared.error(&anyhow!("nats: {e}")),
                        _ => {}
                    }
                }
                pong.then(|| Message::binary(b"PONG\r\n".to_vec()))
            }
            Some(Ok(Message::Close(c))) => {
                shared.error(&anyhow!("closed by server: {c:?}"));
                shared.lost.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Some(Ok(_)) => None,
            Some(Err(e)) => {
                shared.error(&anyhow!("read: {e}"));
                shared.lost.fetch_add(1, Ordering::Relaxed);
                return;
            }
            None => {
                shared.lost.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        if let Some(r) = reply
            && ws.send(r).await.is_err()
        {
            shared.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
}

fn samples(args: &Args) -> BTreeMap<String, ProcSample> {
    args.pids
        .iter()
        .map(|(name, pid)| (name.clone(), *pid))
        .chain([("loadgen".to_string(), std::process::id())])
        .filter_map(|(name, pid)| Some((name, sample_proc(pid, args.clk_tck)?)))
        .collect()
}

fn cpu_delta(a: &BTreeMap<String, ProcSample>, b: &BTreeMap<String, ProcSample>) -> Value {
    let mut m = serde_json::Map::new();
    for (name, after) in b {
        if let Some(before) = a.get(name) {
            m.insert(name.clone(), json!(after.cpu_seconds - before.cpu_seconds));
        }
    }
    Value::Object(m)
}

/// Publishes `rate` messages per second for `seconds`, round-robin over `subjects`.
async fn publish(
    nc: &async_nats::Client,
    subjects: &[String],
    rate: f64,
    seconds: f64,
) -> Result<u64> {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent: u64 = 0;
    let total = (rate * seconds).round() as u64;
    while sent < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate) as u64).min(total);
        while sent < due {
            let subject = subjects[(sent as usize) % subjects.len()].clone();
            nc.publish(subject, encode_payload(now_ns()).into()).await?;
            sent += 1;
        }
    }
    nc.flush().await?;
    Ok(sent)
}

fn rates(args: &Args) -> Vec<f64> {
    if !args.rates.is_empty() {
        return args.rates.clone();
    }
    (0..args.max_steps)
        .map(|k| (args.rate_start * args.rate_factor.powi(k as i32)).round())
        .collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    for addr in [args.server.ip(), args.nats.ip()] {
        if !addr.is_loopback() {
            bail!("{addr} is not a loopback address: this tool only runs on loopback");
        }
    }
    let max_seconds = args.max_seconds;
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(max_seconds)).await;
        eprintln!("wsrelay-load: --max-seconds {max_seconds} reached, exiting");
        std::process::exit(3);
    });
    let key = match &args.jwt_secret_file {
        Some(p) => std::fs::read(p).with_context(|| format!("read {}", p.display()))?,
        None => Vec::new(),
    };
    let tokens: Vec<String> = (0..args.connections)
        .map(|i| {
            if key.is_empty() {
                Ok(String::new())
            } else {
                mint(&key, i)
            }
        })
        .collect::<Result<_>>()?;

    let shared = Arc::new(Shared {
        shards: (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    hist: new_histogram(),
                    delivered: 0,
                })
            })
            .collect(),
        ready: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        lost: AtomicUsize::new(0),
        handshake: Mutex::new(new_histogram()),
        errors: Mutex::new(BTreeMap::new()),
        last_ready_ns: AtomicU64::new(0),
        stop: CancellationToken::new(),
    });
    let before_connect = samples(&args);

    // Connect phase.
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, token) in tokens.into_iter().enumerate() {
        tasks.spawn(client(
            i,
            args.clone(),
            shared.clone(),
            token,
            gate.clone(),
            started,
        ));
    }
    let n = args.connections;
    while shared.ready.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_seconds = (shared.last_ready_ns.load(Ordering::Relaxed) as f64 / 1e9).max(1e-9);
    let ready = shared.ready.load(Ordering::Relaxed);
    let failed = shared.failed.load(Ordering::Relaxed);
    let after_connect = samples(&args);
    let handshake = shared.handshake.lock().map(|h| summarize(&h)).ok();
    eprintln!(
        "wsrelay-load {:?}/{:?}: {ready} connected, {failed} failed in {connect_seconds:.2}s",
        args.target, args.workload
    );

    let mut report = json!({
        "target": format!("{:?}", args.target).to_lowercase(),
        "workload": format!("{:?}", args.workload).to_lowercase(),
        "connections_requested": n,
        "connections_ready": ready,
        "connect_failed": failed,
        "handshake": {
            "seconds": connect_seconds,
            "per_second": ready as f64 / connect_seconds,
            "concurrency": args.connect_concurrency,
            "latency": handshake,
            "cpu_seconds": cpu_delta(&before_connect, &after_connect),
        },
        "procs_before_connect": before_connect,
        "procs_after_connect": after_connect,
        "payload_bytes": wsrelay_e2e::load::PAYLOAD_BYTES,
        "sources": args.sources,
    });

    if args.workload == Workload::Idle {
        tokio::time::sleep(Duration::from_secs_f64(args.hold_seconds)).await;
        let held = samples(&args);
        let mut per_conn = serde_json::Map::new();
        for (name, s) in &held {
            if let Some(b) = before_connect.get(name) {
                let alive = ready
                    .saturating_sub(shared.lost.load(Ordering::Relaxed))
                    .max(1);
                per_conn.insert(
                    name.clone(),
                    json!((s.rss_bytes as f64 - b.rss_bytes as f64) / alive as f64),
                );
            }
        }
        report["idle"] = json!({
            "hold_seconds": args.hold_seconds,
            "procs_held": held,
            "rss_bytes_per_connection": per_conn,
            "lost_while_held": shared.lost.load(Ordering::Relaxed),
        });
    } else if ready > 0 {
        let nc = async_nats::ConnectOptions::new()
            .token(args.nats_token.clone())
            .name("wsrelay-load publisher")
            .connect(args.nats.to_string())
            .await
            .context("publisher: connect to NATS")?;
        let subjects: Vec<String> = match args.workload {
            Workload::Personal => (0..n).map(|i| subject_for(Workload::Personal, i)).collect(),
            _ => vec![subject_for(Workload::Broadcast, 0)],
        };
        let fanout = if args.workload == Workload::Broadcast {
            ready as f64
        } else {
            1.0
        };
        let mut steps = Vec::new();
        let mut best: Option<Value> = None;
        let mut limit_ms = args.p99_limit_ms;
        for rate in rates(&args) {
            let lost_before = shared.lost.load(Ordering::Relaxed);
            shared.take();
            let a = samples(&args);
            let t0 = Instant::now();
            let published = publish(&nc, &subjects, rate, args.step_seconds).await?;
            // Let what is in flight arrive (bounded).
            let expected = published as f64 * fanout;
            let grace = Instant::now();
            loop {
                let got: u64 = shared
                    .shards
                    .iter()
                    .map(|s| s.lock().map(|s| s.delivered).unwrap_or(0))
                    .sum();
                if got as f64 >= expected || grace.elapsed() > Duration::from_secs(3) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let elapsed = t0.elapsed().as_secs_f64();
            let b = samples(&args);
            let (hist, delivered) = shared.take();
            let lat = summarize(&hist);
            let cpu = cpu_delta(&a, &b);
            let server_cpu = cpu["server"].as_f64().unwrap_or(0.0);
            let lost = shared.lost.load(Ordering::Relaxed) - lost_before;
            let ratio = if expected > 0.0 {
                delivered as f64 / expected
            } else {
                0.0
            };
            let step = json!({
                "rate": rate,
                "published": published,
                "expected_deliveries": expected,
                "delivered": delivered,
                "delivery_ratio": ratio,
                "seconds": elapsed,
                "deliveries_per_second": delivered as f64 / args.step_seconds,
                "cpu_seconds": cpu,
                "deliveries_per_server_cpu_second": if server_cpu > 0.0 { delivered as f64 / server_cpu } else { 0.0 },
                "latency": lat,
                "lost_connections": lost,
            });
            eprintln!(
                "  rate {rate:>8}: delivered {delivered}/{expected:.0} p50 {:.2} ms p99 {:.2} ms, server cpu {server_cpu:.2}s",
                lat.p50_ms, lat.p99_ms
            );
            if steps.is_empty() {
                limit_ms = limit_ms.max(args.knee_factor * lat.p99_ms);
            }
            let sustained = lat.p99_ms <= limit_ms && ratio >= 0.99 && lost == 0;
            let mut step = step;
            step["p99_limit_ms"] = json!(limit_ms);
            step["sustained"] = json!(sustained);
            steps.push(step.clone());
            if !sustained {
                break;
            }
            best = Some(step);
        }
        report["steps"] = json!(steps);
        report["max_sustained"] = best.unwrap_or(Value::Null);
        report["p99_limit_ms"] = json!(limit_ms);
        report["p99_limit_floor_ms"] = json!(args.p99_limit_ms);
        report["knee_factor"] = json!(args.knee_factor);
        report["step_seconds"] = json!(args.step_seconds);
    }
    report["lost_connections"] = json!(shared.lost.load(Ordering::Relaxed));
    report["errors"] = json!(shared.errors.lock().map(|m| m.clone()).unwrap_or_default());
    report["procs_end"] = json!(samples(&args));

    shared.stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();

    let text = serde_json::to_string_pretty(&report)?;
    match &args.out {
        Some(p) => std::fs::write(p, text).with_context(|| format!("write {}", p.display()))?,
        None => println!("{text}"),
    }
    std::process::exit(0)
}
