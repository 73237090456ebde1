//! `wsrelay-load`: the one benchmark client of `make bench`, run against wsrelay, nats-server's
//! own WebSocket listener, Centrifugo and the bare baseline alike.
//!
//! It opens N WebSocket connections (bound to source addresses 127.0.0.2.. so the ephemeral
//! port range is no limit), authenticates them, subscribes them, then drives a schedule at
//! fixed rates, step by step: publishes through NATS (or the baseline's publish socket), or
//! hands each connection its due publish or subscribe/unsubscribe cycle. Every timestamp is
//! the time the schedule says an item is due, on the monotonic clock, so a late sender counts
//! as latency (no coordinated omission). Per step it reads the CPU time of the server, its
//! nats-server and itself, the busy time of every core, the relay's own delivery-latency
//! histogram when given its admin address, and judges the step against one fixed p99 limit.
//! Every run is bounded: `--connections`, the number of steps times `--step-seconds`, and a
//! hard `--max-seconds` after which the process exits by itself. Output: one JSON document.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, ValueEnum};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use wsrelay_e2e::load::natsproto::{Op, Reader};
use wsrelay_e2e::load::{
    ProcSample, encode_payload, histogram_delta_quantile, new_histogram, now_ns, parse_cpu_ticks,
    parse_netstat, parse_prom_counter, parse_prom_histogram, sample_proc, summarize, timestamps,
};
use wsrelay_testkit::client::{Head, Request};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Target {
    Wsrelay,
    NatsWs,
    Centrifugo,
    /// `wsrelay-baseline`: no auth, no NATS; publishes go to its `/pub` socket.
    Baseline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// Every connection on one channel.
    Broadcast,
    /// Each connection on its own channel.
    Personal,
    /// `--channels` channels, connection i on channel i mod channels.
    Channels,
    /// Authenticated connections that subscribe to nothing: memory and handshakes.
    Idle,
    /// Connections publish upstream (client -> server -> NATS), received by the generator.
    Upstream,
    /// Connections subscribe and unsubscribe (one cycle per schedule item, on a random channel
    /// of `--channels`); latency is from the item's due time to the unsubscribe's reply.
    Churn,
    /// Every connection on one channel; the server is killed and restarted by the driver
    /// (after `--ready-file` appears); every client reconnects and subscribes again.
    Storm,
    /// wsrelay only: connections subscribe to channels `rooms.{room}` of their own (one
    /// subscribe per schedule item, then its unsubscribe, so that a connection stays under
    /// `maxSubscriptionsPerConnection`); latency is from the item's due time to the
    /// subscribe's `ok`. `--authz` says which `authorize` the relay's binding has.
    Subscribe,
    /// wsrelay only (issue 26): `--connections` members join one presence channel
    /// (`--presence-channel`, each its own `sub`, `presence: true`) at `--join-rate`; then
    /// `--snapshots` fresh subscribers take the snapshot and page every member; then members
    /// leave and new ones join at the first of `--rates` per second for `--churn-seconds`
    /// while a steady observer counts the presence frames it gets: occupancy only, at most
    /// one per second, or the run fails (status 4). No ladder.
    Presence,
}

/// The `subscribe` workload's variant: what the relay's `rooms.{room}` binding checks (the
/// driver writes the relay's config to match) and which channels the clients name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Authz {
    /// No `authorize`: the cost of a subscribe itself.
    Plain,
    /// `authorize.rule`; every token's `rooms` claim lists the connection's rooms, so the
    /// rule passes.
    Rule,
    /// `authorize.request`, every decision cached before the ladder: each connection
    /// subscribes once to each of its `--rooms` rooms while it connects, and its scheduled
    /// subscribes go round them.
    Cached,
    /// `authorize.request`, every subscribe a new (user, channel) pair: a cache miss, a
    /// request to the backend.
    Miss,
}

#[derive(Debug, Clone, Parser)]
#[command(about = "WebSocket fan-out benchmark client (bounded in connections and time)")]
struct Args {
    #[arg(long, value_enum)]
    target: Target,
    #[arg(long, value_enum)]
    workload: Workload,
    /// Server address (loopback only), e.g. 127.0.0.1:18080.
    #[arg(long)]
    server: SocketAddrV4,
    /// WebSocket path: /ws (wsrelay), / (nats-ws), /connection/websocket (Centrifugo).
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
    /// Channels of the `channels` and `churn` workloads.
    #[arg(long, default_value_t = 100)]
    channels: usize,
    /// Connections that never read after subscribing (slow consumers; broadcast only). They
    /// are the first ones, with a small receive buffer, and are not expected to receive.
    #[arg(long, default_value_t = 0)]
    slow: usize,
    /// Payload size in bytes (at least 32).
    #[arg(long, default_value_t = wsrelay_e2e::load::PAYLOAD_BYTES)]
    payload_bytes: usize,
    /// Spread connections over 127.0.0.2 ..= 127.0.0.(1 + sources).
    #[arg(long, default_value_t = 16)]
    sources: u8,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// The rate ladder (items per second), tried in order until a step fails.
    #[arg(long, value_delimiter = ',', required = true)]
    rates: Vec<f64>,
    /// Steps between the last sustained and the first failed rate of the ladder (geometric
    /// bisection), to find the knee finer than the ladder.
    #[arg(long, default_value_t = 2)]
    refine: usize,
    /// A warm-up step at the first rate, discarded, before the ladder.
    #[arg(long, default_value_t = 2.0)]
    warmup_seconds: f64,
    #[arg(long, default_value_t = 4.0)]
    step_seconds: f64,
    /// After a step's schedule, how long to wait at most for what is in flight.
    #[arg(long, default_value_t = 3.0)]
    grace_seconds: f64,
    /// A step is sustained when its p99 is at most this, at least 99% of the expected
    /// deliveries arrived and no connection was lost. The same for every server.
    #[arg(long)]
    p99_limit_ms: f64,
    /// A step in which the generator's own CPU use reached this share of its core is thrown
    /// out (it measured the generator, not the server) and the ladder stops there.
    #[arg(long, default_value_t = 0.9)]
    generator_saturation: f64,
    /// Idle workload: how long the connections are held before memory is read.
    #[arg(long, default_value_t = 5.0)]
    hold_seconds: f64,
    /// wsrelay's admin address: its delivery-latency histogram is read around every step.
    #[arg(long)]
    metrics: Option<SocketAddrV4>,
    /// Storm: written once every connection is subscribed; the driver then restarts the server.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Storm: a client's first reconnect waits a uniform random time up to this; later ones
    /// back off (full jitter, 0.5 s doubling up to 8 s).
    #[arg(long, default_value_t = 1000)]
    reconnect_jitter_ms: u64,
    /// Subscribe: the variant (the relay's config must match it).
    #[arg(long, value_enum, default_value = "plain")]
    authz: Authz,
    /// Subscribe: rooms per connection (`plain`, `rule` and `cached` go round them; the
    /// token's `rooms` claim lists them).
    #[arg(long, default_value_t = 16)]
    rooms: usize,
    /// Subscribe (`cached`, `miss`): the NATS subject of `authorize.request`; the generator
    /// answers it (`{"allow":true}`, queue group `authz`) on a thread of its own.
    #[arg(long, default_value = "authz.bench")]
    authz_subject: String,
    /// Presence: the channel every member joins (the relay's binding for it has `presence`).
    #[arg(long, default_value = "pres.big")]
    presence_channel: String,
    /// Presence: members joining per second while the channel grows (a bounded rate).
    #[arg(long, default_value_t = 500.0)]
    join_rate: f64,
    /// Presence: fresh subscribers that take the snapshot, one after another.
    #[arg(long, default_value_t = 20)]
    snapshots: usize,
    /// Presence: `limit` of the `presence` requests that page the members.
    #[arg(long, default_value_t = 1000)]
    page_limit: usize,
    /// Presence: how long members leave and join (at the first of `--rates` per second).
    #[arg(long, default_value_t = 15.0)]
    churn_seconds: f64,
    /// Presence: how long the observer keeps counting after the churn's last item (the last
    /// leavers' `leaveGraceSeconds` end in it).
    #[arg(long, default_value_t = 3.0)]
    churn_tail_seconds: f64,
    /// Storm: how long to wait for every client to be back.
    #[arg(long, default_value_t = 60.0)]
    storm_seconds: f64,
    /// wss: the CA certificate (PEM) that signed the server's certificate for 127.0.0.1.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
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

impl Args {
    /// The NATS subject connection `i` subscribes to (the channel is derived from it).
    fn subject_of(&self, i: usize) -> String {
        match self.workload {
            Workload::Personal => format!("bench.u{i}"),
            Workload::Channels => format!("bench.c{}", i % self.channels.max(1)),
            _ => "bench.all".to_string(),
        }
    }

    /// Index of connection i's subject in [`Args::subjects`].
    fn subject_index(&self, i: usize) -> usize {
        match self.workload {
            Workload::Personal => i,
            Workload::Channels => i % self.channels.max(1),
            _ => 0,
        }
    }

    /// The subjects the publisher goes round, in order.
    fn subjects(&self) -> Vec<String> {
        match self.workload {
            Workload::Personal => (0..self.connections).map(|i| self.subject_of(i)).collect(),
            Workload::Channels => (0..self.channels.max(1))
                .map(|i| self.subject_of(i))
                .collect(),
            _ => vec![self.subject_of(0)],
        }
    }

    fn subscribes_at_connect(&self) -> bool {
        !matches!(
            self.workload,
            Workload::Idle
                | Workload::Upstream
                | Workload::Churn
                | Workload::Subscribe
                | Workload::Presence
        )
    }

    fn ticketed(&self) -> bool {
        matches!(
            self.workload,
            Workload::Upstream | Workload::Churn | Workload::Subscribe
        )
    }

    /// The `room` of connection `i`'s `seq`-th scheduled subscribe: one of its own `--rooms`
    /// rooms in turn, or (`miss`) a room never named before.
    fn room_of(&self, i: usize, seq: u64) -> String {
        match self.authz {
            Authz::Miss => format!("u{i}m{seq}"),
            // The same names as the token's `rooms` claim (extra_claims).
            _ => format!("u{i}k{}", seq % self.rooms.max(1) as u64),
        }
    }

    /// The extra claims of connection `i`'s token: its rooms (the subscribe workload's rule
    /// reads them; every variant carries them so that the claims are the same size).
    fn extra_claims(&self, i: usize) -> Value {
        if self.workload != Workload::Subscribe {
            return json!({});
        }
        let rooms: Vec<String> = (0..self.rooms.max(1))
            .map(|k| format!("u{i}k{k}"))
            .collect();
        json!({"rooms": rooms, "roles": ["member"]})
    }
}

/// The channel a client names for a NATS subject: the subject itself, except on Centrifugo,
/// whose namespace `bench` is written `bench:` (its raw-mode NATS broker maps `:` to `.`).
fn channel_for(target: Target, subject: &str) -> String {
    match target {
        Target::Centrifugo => subject.replacen('.', ":", 1),
        _ => subject.to_string(),
    }
}

const UPSTREAM_SUBJECT: &str = "bench.up";
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
    /// Healthy (reading) subscribers per subject index.
    subscribers: Vec<AtomicU32>,
    // Storm.
    first_drop_ns: AtomicU64,
    recovered: AtomicUsize,
    recovery: Mutex<Histogram<u64>>,
    reconnect_attempts: AtomicU64,
    reconnect_failures: AtomicU64,
}

impl Shared {
    /// Nothing recorded yet; `subjects` subjects to count subscribers of.
    fn new(subjects: usize) -> Self {
        Shared {
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
            subscribers: (0..subjects).map(|_| AtomicU32::new(0)).collect(),
            first_drop_ns: AtomicU64::new(u64::MAX),
            recovered: AtomicUsize::new(0),
            recovery: Mutex::new(new_histogram()),
            reconnect_attempts: AtomicU64::new(0),
            reconnect_failures: AtomicU64::new(0),
        }
    }

    fn record_at(&self, conn: usize, t_ns: u64) {
        let us = (now_ns().saturating_sub(t_ns) / 1000).max(1);
        let mut shard = lock(&self.shards[conn % SHARDS]);
        shard.hist.saturating_record(us);
        shard.delivered += 1;
    }

    fn record(&self, conn: usize, frame: &[u8]) {
        let now = now_ns();
        let mut shard = lock(&self.shards[conn % SHARDS]);
        for t in timestamps(frame) {
            let us = (now.saturating_sub(t) / 1000).max(1);
            shard.hist.saturating_record(us);
            shard.delivered += 1;
        }
    }

    fn delivered(&self) -> u64 {
        self.shards.iter().map(|s| lock(s).delivered).sum()
    }

    /// Resets every shard and returns what they held.
    fn take(&self) -> (Histogram<u64>, u64) {
        let mut all = new_histogram();
        let mut delivered = 0;
        for s in &self.shards {
            let mut s = lock(s);
            let _ = all.add(&s.hist);
            delivered += s.delivered;
            s.hist.reset();
            s.delivered = 0;
        }
        (all, delivered)
    }

    fn error(&self, e: &anyhow::Error) {
        let key: String = format!("{e:#}").chars().take(120).collect();
        *lock(&self.errors).entry(key).or_default() += 1;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The byte stream under a WebSocket (plain TCP today; a trait object so a TLS stream fits).
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct BoxIo(Box<dyn Io>);

impl AsyncRead for BoxIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for BoxIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

type Ws = WebSocketStream<BoxIo>;

fn mint(key: &[u8], i: usize, extra: Value) -> Result<String> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 3600;
    let mut claims = json!({"sub": format!("u{i}"), "exp": exp});
    if let (Some(c), Value::Object(extra)) = (claims.as_object_mut(), extra) {
        c.extend(extra);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key),
    )
    .context("mint JWT")
}

/// The TLS client for `--tls-ca`, built once.
fn tls_connector(ca: &std::path::Path) -> Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::pem::PemObject;
    static CONNECTOR: std::sync::OnceLock<tokio_rustls::TlsConnector> = std::sync::OnceLock::new();
    if let Some(c) = CONNECTOR.get() {
        return Ok(c.clone());
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("read {}", ca.display()))?
    {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(CONNECTOR
        .get_or_init(|| tokio_rustls::TlsConnector::from(Arc::new(config)))
        .clone())
}

/// TCP, then TLS when `--tls-ca` is given.
async fn io_connect(args: &Args, i: usize, small_rcvbuf: bool) -> Result<BoxIo> {
    let tcp = tcp_connect(args, i, small_rcvbuf).await?;
    match &args.tls_ca {
        None => Ok(BoxIo(Box::new(tcp))),
        Some(ca) => {
            let name = rustls::pki_types::ServerName::IpAddress((*args.server.ip()).into());
            let tls = tls_connector(ca)?
                .connect(name, tcp)
                .await
                .context("TLS handshake")?;
            Ok(BoxIo(Box::new(tls)))
        }
    }
}

async fn tcp_connect(args: &Args, i: usize, small_rcvbuf: bool) -> Result<TcpStream> {
    let src = Ipv4Addr::new(127, 0, 0, 2 + (i % args.sources.max(1) as usize) as u8);
    let sock = TcpSocket::new_v4()?;
    if small_rcvbuf {
        sock.set_recv_buffer_size(4096)?;
    }
    sock.bind(SocketAddr::V4(SocketAddrV4::new(src, 0)))
        .with_context(|| format!("bind {src}"))?;
    let stream = sock
        .connect(SocketAddr::V4(args.server))
        .await
        .context("connect")?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Replies to what a server asks of an idle client in `frame` (Centrifugo's `{}` ping, NATS
/// `PING`), recording any benchmark payload on the way when `conn` is given.
fn absorb(
    target: Target,
    shared: &Shared,
    conn: Option<usize>,
    reader: &mut Reader,
    msg: &Message,
    mut on_op: impl FnMut(&Op),
) -> Option<Message> {
    match msg {
        Message::Text(t) => {
            let b = t.as_bytes();
            if let Some(c) = conn {
                shared.record(c, b);
            }
            (target == Target::Centrifugo && b.split(|c| *c == b'\n').any(|l| l == b"{}"))
                .then(|| Message::text("{}"))
        }
        Message::Binary(b) if target == Target::NatsWs => {
            reader.push(b);
            let mut pong = false;
            while let Some(op) = reader.next_op() {
                match &op {
                    Op::Msg(p) => {
                        if let Some(c) = conn {
                            shared.record(c, p);
                        }
                    }
                    Op::Ping => pong = true,
                    Op::Err(e) => shared.error(&anyhow!("nats: {e}")),
                    _ => {}
                }
                on_op(&op);
            }
            pong.then(|| Message::binary(b"PONG\r\n".to_vec()))
        }
        Message::Binary(b) => {
            if let Some(c) = conn {
                shared.record(c, b);
            }
            None
        }
        _ => None,
    }
}

/// Reads frames until `done` says the exchange is over (Some(Ok)) or failed (Some(Err)),
/// answering pings meanwhile.
async fn expect(
    ws: &mut Ws,
    target: Target,
    shared: &Shared,
    reader: &mut Reader,
    mut done: impl FnMut(&[u8]) -> Option<Result<()>>,
) -> Result<()> {
    while let Some(msg) = ws.next().await {
        let msg = msg.context("read")?;
        if let Message::Close(c) = &msg {
            bail!("closed: {c:?}");
        }
        if target == Target::NatsWs {
            let mut result = None;
            let reply = absorb(target, shared, None, reader, &msg, |op| {
                if result.is_none() {
                    result = nats_reply(op);
                }
            });
            if let Some(r) = reply {
                ws.send(r).await?;
            }
            if let Some(r) = result {
                return r;
            }
            continue;
        }
        let bytes: &[u8] = match &msg {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b,
            _ => continue,
        };
        if let Some(r) = done(bytes) {
            return r;
        }
        if let Some(r) = absorb(target, shared, None, reader, &msg, |_| {}) {
            ws.send(r).await?;
        }
    }
    bail!("connection ended")
}

fn nats_reply(op: &Op) -> Option<Result<()>> {
    match op {
        Op::Pong => Some(Ok(())),
        Op::Err(e) => Some(Err(anyhow!("nats: {e}"))),
        _ => None,
    }
}

/// The reply to request `id`: read from the frame's head alone, so that the messages that
/// arrive meanwhile are not parsed into value trees.
fn wsrelay_reply(b: &[u8], id: u64) -> Option<Result<()>> {
    match Head::reply_to(b, id)? {
        true => Some(Ok(())),
        false => Some(Err(anyhow!("wsrelay: {}", String::from_utf8_lossy(b)))),
    }
}

/// The reply to Centrifugo command `id`, possibly among other lines of one frame.
fn centrifugo_reply(b: &[u8], id: u64) -> Option<Result<()>> {
    for line in b.split(|c| *c == b'\n') {
        let Ok(v) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        if v["id"].as_u64() == Some(id) {
            return Some(match v.get("error") {
                Some(e) => Err(anyhow!("centrifugo: {e}")),
                None => Ok(()),
            });
        }
    }
    None
}

/// Subscribes (`on`) or unsubscribes a connection to `subject`'s channel and waits for the
/// server's confirmation (NATS: a PING's PONG after the SUB or UNSUB).
async fn set_subscription(
    ws: &mut Ws,
    args: &Args,
    shared: &Shared,
    reader: &mut Reader,
    subject: &str,
    sid: u64,
    on: bool,
) -> Result<()> {
    let channel = channel_for(args.target, subject);
    match args.target {
        Target::Wsrelay => {
            let cmd = if on {
                Request::subscribe(sid, &channel)
            } else {
                Request::unsubscribe(sid, &channel)
            };
            ws.send(Message::text(cmd.to_text())).await?;
            expect(ws, args.target, shared, reader, |b| wsrelay_reply(b, sid)).await
        }
        Target::Centrifugo => {
            let kind = if on { "subscribe" } else { "unsubscribe" };
            let cmd = json!({"id": sid, kind: {"channel": channel}}).to_string();
            ws.send(Message::text(cmd)).await?;
            expect(ws, args.target, shared, reader, |b| {
                centrifugo_reply(b, sid)
            })
            .await
        }
        Target::NatsWs => {
            let cmd = if on {
                format!("SUB {subject} {sid}\r\nPING\r\n")
            } else {
                format!("UNSUB {sid}\r\nPING\r\n")
            };
            ws.send(Message::binary(cmd.into_bytes())).await?;
            expect(ws, args.target, shared, reader, |_| None).await
        }
        Target::Baseline => bail!("the baseline has no subscribe command"),
    }
}

/// Connects, authenticates and (when the workload says so) subscribes; returns the open
/// socket and, for nats-ws, the protocol reader holding any bytes already received.
async fn open(
    args: &Args,
    shared: &Shared,
    i: usize,
    token: &str,
    slow: bool,
) -> Result<(Ws, Reader)> {
    let io = io_connect(args, i, slow).await?;
    let subject = args.subject_of(i);
    let scheme = if args.tls_ca.is_some() { "wss" } else { "ws" };
    let url = match args.target {
        Target::Wsrelay => format!("{scheme}://{}{}?token={token}", args.server, args.path),
        Target::Baseline => format!("{scheme}://{}/sub?c={subject}", args.server),
        _ => format!("{scheme}://{}{}", args.server, args.path),
    };
    let req = url.into_client_request()?;
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(1 << 20);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(req, io, Some(config))
        .await
        .context("upgrade")?;
    let subscribe = args.subscribes_at_connect();
    let mut reader = Reader::default();
    match args.target {
        Target::Wsrelay => {
            expect(&mut ws, args.target, shared, &mut reader, |b| {
                wsrelay_e2e::load::find(b, b"\"type\":\"welcome\"").map(|_| Ok(()))
            })
            .await?;
        }
        Target::Centrifugo => {
            let connect = json!({"id": 1, "connect": {"token": token}}).to_string();
            ws.send(Message::text(connect)).await?;
            expect(&mut ws, args.target, shared, &mut reader, |b| {
                centrifugo_reply(b, 1)
            })
            .await?;
        }
        Target::NatsWs => {
            // INFO first (it may share a frame with more), then CONNECT and a PING whose
            // PONG says the server took the CONNECT.
            let mut info = false;
            while !info {
                let msg = ws.next().await.context("connection ended")??;
                if let Message::Binary(b) = msg {
                    reader.push(&b);
                    match reader.next_op() {
                        Some(Op::Info) => info = true,
                        None => {}
                        Some(other) => bail!("expected INFO, got {other:?}"),
                    }
                }
            }
            let connect = json!({"verbose": false, "pedantic": false, "protocol": 1,
                "auth_token": args.nats_token, "name": format!("bench-{i}"), "lang": "rust",
                "version": "0", "headers": false});
            ws.send(Message::binary(
                format!("CONNECT {connect}\r\nPING\r\n").into_bytes(),
            ))
            .await?;
            let mut done = None;
            while let Some(op) = reader.next_op() {
                done = done.or(nats_reply(&op));
            }
            match done {
                Some(r) => r?,
                None => expect(&mut ws, args.target, shared, &mut reader, |_| None).await?,
            }
        }
        Target::Baseline => {}
    }
    if subscribe && args.target != Target::Baseline {
        set_subscription(&mut ws, args, shared, &mut reader, &subject, 1, true).await?;
    }
    Ok((ws, reader))
}

/// Opens connection `i` within the handshake bound.
async fn open_bounded(
    args: &Args,
    shared: &Shared,
    i: usize,
    token: &str,
    slow: bool,
) -> Result<(Ws, Reader)> {
    match tokio::time::timeout(Duration::from_secs(20), open(args, shared, i, token, slow)).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!("handshake timed out (20 s)")),
    }
}

/// How a connection's life ended.
enum End {
    Stopped,
    Lost,
}

/// Serves one open connection: records deliveries, answers pings, and carries out the items
/// the schedule hands it (a publish, or a subscribe/unsubscribe cycle).
async fn serve(
    i: usize,
    args: &Args,
    shared: &Shared,
    ws: &mut Ws,
    reader: &mut Reader,
    tickets: &mut Option<mpsc::Receiver<u64>>,
) -> End {
    let stop = shared.stop.clone();
    let mut seq: u64 = 0;
    loop {
        let ticket = async {
            match tickets.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        let msg = tokio::select! {
            _ = stop.cancelled() => return End::Stopped,
            t = ticket => {
                let Some(due) = t else { return End::Stopped };
                let item = seq;
                seq += 1;
                if let Err(e) = work(i, args, shared, ws, reader, due, item).await {
                    shared.error(&e);
                    return End::Lost;
                }
                continue;
            }
            m = ws.next() => m,
        };
        let msg = match msg {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                shared.error(&anyhow!("read: {e}"));
                return End::Lost;
            }
            None => return End::Lost,
        };
        if let Message::Close(c) = &msg {
            shared.error(&anyhow!("closed by server: {c:?}"));
            return End::Lost;
        }
        if let Some(r) = absorb(args.target, shared, Some(i), reader, &msg, |_| {})
            && ws.send(r).await.is_err()
        {
            return End::Lost;
        }
    }
}

/// The connection's `seq`-th schedule item (0, 1, ...), due at `due` (ns): a publish upstream,
/// or a subscribe/unsubscribe cycle.
async fn work(
    i: usize,
    args: &Args,
    shared: &Shared,
    ws: &mut Ws,
    reader: &mut Reader,
    due: u64,
    seq: u64,
) -> Result<()> {
    // Request ids 12, 14, ...: above the subscribe at connect (1); two per item.
    let id = 12 + 2 * seq;
    match args.workload {
        Workload::Upstream => {
            let payload = encode_payload(due, args.payload_bytes);
            let text = String::from_utf8(payload).unwrap_or_default();
            let channel = channel_for(args.target, UPSTREAM_SUBJECT);
            let msg = match args.target {
                Target::Wsrelay => Message::text(format!(
                    r#"{{"type":"publish","channel":"{channel}","payload":{text}}}"#
                )),
                Target::Centrifugo => Message::text(format!(
                    r#"{{"id":{id},"publish":{{"channel":"{channel}","data":{text}}}}}"#
                )),
                Target::NatsWs => Message::binary(
                    format!("PUB {UPSTREAM_SUBJECT} {}\r\n{text}\r\n", text.len()).into_bytes(),
                ),
                Target::Baseline => bail!("the baseline takes no client publishes"),
            };
            ws.send(msg).await?;
        }
        Workload::Churn => {
            let subject = format!("bench.c{}", rand::random_range(0..args.channels.max(1)));
            set_subscription(ws, args, shared, reader, &subject, id, true).await?;
            set_subscription(ws, args, shared, reader, &subject, id + 1, false).await?;
            shared.record_at(i, due);
        }
        Workload::Subscribe => {
            // Only the subscribe is timed; the unsubscribe keeps the connection under
            // `maxSubscriptionsPerConnection` (and, for `cached`, lets it come back to a room).
            let channel = format!("rooms.{}", args.room_of(i, seq));
            set_subscription(ws, args, shared, reader, &channel, id, true).await?;
            shared.record_at(i, due);
            set_subscription(ws, args, shared, reader, &channel, id + 1, false).await?;
        }
        _ => {}
    }
    Ok(())
}

async fn client(
    i: usize,
    args: Arc<Args>,
    shared: Arc<Shared>,
    token: String,
    gate: Arc<Semaphore>,
    started: Instant,
    mut tickets: Option<mpsc::Receiver<u64>>,
) {
    let slow = i < args.slow;
    let permit = gate.acquire().await;
    let t0 = Instant::now();
    let opened = open_bounded(&args, &shared, i, &token, slow).await;
    drop(permit);
    let (mut ws, mut reader) = match opened {
        Ok(v) => v,
        Err(e) => {
            shared.error(&e);
            shared.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    lock(&shared.handshake).saturating_record((t0.elapsed().as_micros() as u64).max(1));
    if args.workload == Workload::Subscribe && args.authz == Authz::Cached {
        let primed = tokio::time::timeout(
            Duration::from_secs(60),
            prime(i, &args, &shared, &mut ws, &mut reader),
        )
        .await
        .unwrap_or_else(|_| Err(anyhow!("priming the cache timed out (60 s)")));
        if let Err(e) = primed {
            shared.error(&e);
            shared.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    shared
        .last_ready_ns
        .fetch_max(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    if !slow && args.subscribes_at_connect() {
        shared.subscribers[args.subject_index(i)].fetch_add(1, Ordering::Relaxed);
    }
    shared.ready.fetch_add(1, Ordering::Relaxed);
    if slow {
        // Never read again: the server's queue for this client fills.
        shared.stop.cancelled().await;
        return;
    }
    loop {
        match serve(i, &args, &shared, &mut ws, &mut reader, &mut tickets).await {
            End::Stopped => break,
            End::Lost if args.workload == Workload::Storm => {
                match reconnect(i, &args, &shared, &token).await {
                    Some((w, r)) => {
                        ws = w;
                        reader = r;
                    }
                    None => return,
                }
            }
            End::Lost => {
                shared.lost.fetch_add(1, Ordering::Relaxed);
                // Later steps expect nothing for it.
                if args.subscribes_at_connect() {
                    shared.subscribers[args.subject_index(i)].fetch_sub(1, Ordering::Relaxed);
                }
                return;
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
}

/// Subscribe, `cached`: one subscribe (and its unsubscribe) to each of the connection's rooms,
/// so that the relay holds a decision for every (user, channel) the schedule will name.
async fn prime(
    i: usize,
    args: &Args,
    shared: &Shared,
    ws: &mut Ws,
    reader: &mut Reader,
) -> Result<()> {
    for k in 0..args.rooms.max(1) as u64 {
        let channel = format!("rooms.{}", args.room_of(i, k));
        // Ids far above the schedule's, which starts after this.
        let id = 1_000_000 + 2 * k;
        set_subscription(ws, args, shared, reader, &channel, id, true)
            .await
            .context("priming")?;
        set_subscription(ws, args, shared, reader, &channel, id + 1, false)
            .await
            .context("priming")?;
    }
    Ok(())
}

/// Subscribe (`cached`, `miss`): the application's backend for `authorize.request`, on a thread
/// of the generator's own (and so on its core): a queue-group subscriber on `--authz-subject`
/// that answers `{"allow":true}` at once. Returns the count of requests answered, once it
/// listens.
fn start_backend(args: &Args) -> Result<Arc<AtomicU64>> {
    let answered = Arc::new(AtomicU64::new(0));
    let count = answered.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
    let (nats, token, subject) = (
        args.nats.to_string(),
        args.nats_token.clone(),
        args.authz_subject.clone(),
    );
    std::thread::Builder::new()
        .name("authz-backend".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                let setup = async {
                    let nc = async_nats::ConnectOptions::new()
                        .token(token)
                        .name("wsrelay-load authz backend")
                        .connect(nats)
                        .await
                        .context("backend: connect to NATS")?;
                    let sub = nc.queue_subscribe(subject, "authz".into()).await?;
                    nc.flush().await?;
                    anyhow::Ok((nc, sub))
                };
                let (nc, mut sub) = match setup.await {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                while let Some(m) = sub.next().await {
                    if let Some(reply) = m.reply
                        && nc.publish(reply, r#"{"allow":true}"#.into()).await.is_ok()
                    {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        })?;
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow!("the authz backend did not start within 10 s"))??;
    Ok(answered)
}

/// Storm: reconnects after the server went away, with a jittered first attempt and full-jitter
/// backoff after failures; records the time from the first drop any client saw.
async fn reconnect(i: usize, args: &Args, shared: &Shared, token: &str) -> Option<(Ws, Reader)> {
    shared.first_drop_ns.fetch_min(now_ns(), Ordering::Relaxed);
    let mut delay = rand::random_range(0..=args.reconnect_jitter_ms.max(1));
    let mut backoff: u64 = 500;
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
        }
        shared.reconnect_attempts.fetch_add(1, Ordering::Relaxed);
        match open_bounded(args, shared, i, token, false).await {
            Ok(v) => {
                let since = now_ns().saturating_sub(shared.first_drop_ns.load(Ordering::Relaxed));
                lock(&shared.recovery).saturating_record((since / 1000).max(1));
                shared.recovered.fetch_add(1, Ordering::Relaxed);
                return Some(v);
            }
            Err(e) => {
                shared.reconnect_failures.fetch_add(1, Ordering::Relaxed);
                shared.error(&e.context("reconnect"));
                delay = rand::random_range(0..=backoff);
                backoff = (backoff * 2).min(8000);
            }
        }
    }
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

fn cores() -> BTreeMap<String, (u64, u64)> {
    std::fs::read_to_string("/proc/stat")
        .map(|s| parse_cpu_ticks(&s))
        .unwrap_or_default()
}

/// Busy share of each core between two readings.
fn cores_busy(a: &BTreeMap<String, (u64, u64)>, b: &BTreeMap<String, (u64, u64)>) -> Value {
    let mut m = serde_json::Map::new();
    for (name, (busy, total)) in b {
        if let Some((b0, t0)) = a.get(name) {
            let dt = total.saturating_sub(*t0).max(1);
            m.insert(
                name.clone(),
                json!(busy.saturating_sub(*b0) as f64 / dt as f64),
            );
        }
    }
    Value::Object(m)
}

/// The kernel TCP counters that tell why a handshake waited (all of the machine: other
/// loopback traffic counts too).
const NET_COUNTERS: &[&str] = &[
    "TcpExt.ListenOverflows",
    "TcpExt.ListenDrops",
    "TcpExt.TCPSynRetrans",
    "TcpExt.TCPReqQFullDrop",
    "TcpExt.TCPReqQFullDoCookies",
    "TcpExt.SyncookiesSent",
    "TcpExt.TCPTimeouts",
    "TcpExt.TCPBacklogDrop",
    "Tcp.RetransSegs",
    "Tcp.AttemptFails",
];

fn net_counters() -> BTreeMap<String, i64> {
    let mut text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    text.push_str(&std::fs::read_to_string("/proc/net/snmp").unwrap_or_default());
    parse_netstat(&text)
}

fn net_delta(a: &BTreeMap<String, i64>, b: &BTreeMap<String, i64>) -> Value {
    let mut m = serde_json::Map::new();
    for k in NET_COUNTERS {
        if let (Some(x), Some(y)) = (a.get(*k), b.get(*k)) {
            m.insert((*k).to_string(), json!(y - x));
        }
    }
    Value::Object(m)
}

/// wsrelay's metrics (text exposition), from its admin port.
async fn relay_metrics(addr: Option<SocketAddrV4>) -> Option<String> {
    let addr = addr?;
    let fetch = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
            .await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        anyhow::Ok(body)
    };
    tokio::time::timeout(Duration::from_secs(2), fetch)
        .await
        .ok()?
        .ok()
}

/// wsrelay's delivery-latency histogram (NATS receive to socket write) in its metrics.
fn delivery_histogram(text: &str) -> Vec<(f64, u64)> {
    parse_prom_histogram(text, "wsrelay_delivery_latency_seconds")
}

/// wsrelay's authorization counters for subscribes (docs/protocol.md section 3, "Metrics"):
/// what a step's subscribes cost the cache and the backend.
fn authorize_counters(text: &str) -> BTreeMap<&'static str, f64> {
    let sub = ("op", "subscribe");
    [
        (
            "cache_hits",
            "wsrelay_authorize_cache_total",
            vec![sub, ("result", "hit")],
        ),
        (
            "cache_misses",
            "wsrelay_authorize_cache_total",
            vec![sub, ("result", "miss")],
        ),
        (
            "backend_requests",
            "wsrelay_authorize_requests_total",
            vec![sub],
        ),
        ("denied", "wsrelay_authorize_denied_total", vec![sub]),
        ("failures", "wsrelay_authorize_failures_total", vec![sub]),
    ]
    .into_iter()
    .map(|(key, name, labels)| (key, parse_prom_counter(text, name, &labels).unwrap_or(0.0)))
    .collect()
}

/// Where the schedule's items go.
enum Sink {
    Nats(async_nats::Client, Vec<String>),
    /// The baseline's publish socket.
    Baseline(Box<Ws>, Vec<String>),
    /// Per-connection schedule items (upstream publishes, churn cycles).
    Tickets(Vec<mpsc::Sender<u64>>),
}

impl Sink {
    /// Issues `rate` items per second for `seconds`; item k is due at start + k/rate and
    /// carries that time. Returns how many were issued.
    async fn drive(
        &mut self,
        rate: f64,
        seconds: f64,
        size: usize,
        shared: &Shared,
    ) -> Result<u64> {
        let start = now_ns();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let total = (rate * seconds).round() as u64;
        let mut sent: u64 = 0;
        let due_at = |k: u64| start + (k as f64 * 1e9 / rate) as u64;
        while sent < total {
            tick.tick().await;
            let elapsed = now_ns().saturating_sub(start) as f64 / 1e9;
            let due = ((elapsed * rate) as u64 + 1).min(total);
            while sent < due {
                let t = due_at(sent);
                match self {
                    Sink::Nats(nc, subjects) => {
                        let subject = subjects[(sent as usize) % subjects.len()].clone();
                        nc.publish(subject, encode_payload(t, size).into()).await?;
                    }
                    Sink::Baseline(ws, subjects) => {
                        let subject = &subjects[(sent as usize) % subjects.len()];
                        let payload = String::from_utf8(encode_payload(t, size))?;
                        ws.feed(Message::text(format!("{subject} {payload}")))
                            .await?;
                    }
                    Sink::Tickets(txs) => {
                        if txs[(sent as usize) % txs.len()].try_send(t).is_err() {
                            shared.error(&anyhow!("a connection's schedule queue was full"));
                        }
                    }
                }
                sent += 1;
            }
            match self {
                Sink::Nats(nc, _) => nc.flush().await?,
                Sink::Baseline(ws, _) => ws.flush().await?,
                Sink::Tickets(_) => {}
            }
        }
        Ok(sent)
    }
}

/// What a step is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Warmup,
    Ladder,
    Refine,
    Check,
}

struct Runner {
    args: Arc<Args>,
    shared: Arc<Shared>,
    sink: Sink,
}

impl Runner {
    /// Expected deliveries for `issued` items.
    fn expected(&self, issued: u64) -> f64 {
        match self.args.workload {
            Workload::Upstream | Workload::Churn | Workload::Subscribe => issued as f64,
            _ => {
                let counts: Vec<u64> = self
                    .shared
                    .subscribers
                    .iter()
                    .map(|c| c.load(Ordering::Relaxed) as u64)
                    .collect();
                let n = counts.len() as u64;
                if n == 0 {
                    return 0.0;
                }
                let full = issued / n;
                let rest = issued % n;
                let all: u64 = counts.iter().sum();
                (full * all + counts.iter().take(rest as usize).sum::<u64>()) as f64
            }
        }
    }

    async fn step(&mut self, rate: f64, kind: Kind) -> Result<Value> {
        let args = self.args.clone();
        let shared = self.shared.clone();
        let seconds = if kind == Kind::Warmup {
            args.warmup_seconds
        } else {
            args.step_seconds
        };
        let lost_before = shared.lost.load(Ordering::Relaxed);
        let errors_before: u64 = lock(&shared.errors).values().sum();
        let text_a = relay_metrics(args.metrics).await;
        shared.take();
        let (a, cores_a, t_a) = (samples(&args), cores(), Instant::now());
        let issued = self
            .sink
            .drive(rate, seconds, args.payload_bytes, &shared)
            .await?;
        let (c, cores_c, window) = (samples(&args), cores(), t_a.elapsed().as_secs_f64());
        let expected = self.expected(issued);
        let grace = Instant::now();
        while (shared.delivered() as f64) < expected
            && grace.elapsed().as_secs_f64() < args.grace_seconds
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let elapsed = t_a.elapsed().as_secs_f64();
        let b = samples(&args);
        let (hist, delivered) = shared.take();
        let text_b = relay_metrics(args.metrics).await;
        let metrics_a = text_a.as_deref().map(delivery_histogram);
        let metrics_b = text_b.as_deref().map(delivery_histogram);
        // What this step's subscribes cost the relay's authorization (cache, backend).
        let authorize = match (&text_a, &text_b) {
            (Some(x), Some(y)) if args.workload == Workload::Subscribe => {
                let (x, y) = (authorize_counters(x), authorize_counters(y));
                Value::Object(
                    y.iter()
                        .map(|(k, v)| ((*k).to_string(), json!(v - x.get(k).unwrap_or(&0.0))))
                        .collect(),
                )
            }
            _ => Value::Null,
        };
        let lat = summarize(&hist);
        let cpu = cpu_delta(&a, &b);
        let cpu_window = cpu_delta(&a, &c);
        let share = |name: &str| cpu_window[name].as_f64().map(|s| s / window.max(1e-9));
        let lost = shared.lost.load(Ordering::Relaxed) - lost_before;
        let ratio = if expected > 0.0 {
            delivered as f64 / expected
        } else {
            0.0
        };
        let server_cpu = cpu["server"].as_f64().unwrap_or(0.0);
        let with_nats = server_cpu + cpu["nats"].as_f64().unwrap_or(0.0);
        let per = |cpu: f64| (delivered > 0).then(|| cpu * 1e6 / delivered as f64);
        let generator = share("loadgen").unwrap_or(0.0);
        let relay = match (&metrics_a, &metrics_b) {
            (Some(x), Some(y)) => json!({
                "p50_ms": histogram_delta_quantile(x, y, 0.5),
                "p99_ms": histogram_delta_quantile(x, y, 0.99),
                "count": y.last().map(|l| l.1).unwrap_or(0)
                    .saturating_sub(x.last().map(|l| l.1).unwrap_or(0)),
            }),
            _ => Value::Null,
        };
        let (verdict, reason) = if kind == Kind::Warmup || kind == Kind::Check {
            ("discarded", format!("{kind:?} step").to_lowercase())
        } else if generator >= args.generator_saturation {
            (
                "discarded",
                format!(
                    "generator core saturated ({:.0}% of its core)",
                    generator * 100.0
                ),
            )
        } else if lost > 0 {
            ("failed", format!("{lost} connections lost"))
        } else if ratio < 0.99 {
            (
                "failed",
                format!("{:.1}% of expected deliveries arrived", ratio * 100.0),
            )
        } else if lat.p99_ms > args.p99_limit_ms {
            (
                "failed",
                format!(
                    "p99 {:.1} ms above the limit {} ms",
                    lat.p99_ms, args.p99_limit_ms
                ),
            )
        } else {
            ("sustained", String::new())
        };
        let errors_after: u64 = lock(&shared.errors).values().sum();
        let step = json!({
            "kind": format!("{kind:?}").to_lowercase(),
            "rate": rate,
            "issued": issued,
            "expected_deliveries": expected,
            "delivered": delivered,
            "delivery_ratio": ratio,
            "seconds": seconds,
            "elapsed_seconds": elapsed,
            "deliveries_per_second": delivered as f64 / seconds,
            "cpu_seconds": cpu,
            "core_share_during_schedule": {
                "server": share("server"), "nats": share("nats"), "loadgen": share("loadgen"),
            },
            "cores_busy_during_schedule": cores_busy(&cores_a, &cores_c),
            "cpu_us_per_delivery": per(server_cpu),
            "cpu_us_per_delivery_incl_nats": per(with_nats),
            "generator_cpu_us_per_delivery": per(cpu["loadgen"].as_f64().unwrap_or(0.0)),
            "server_rss_bytes": b.get("server").map(|s| s.rss_bytes),
            "latency": lat,
            "relay_delivery_latency": relay,
            "relay_authorize": authorize,
            "lost_connections": lost,
            "errors": errors_after - errors_before,
            "verdict": verdict,
            "reason": reason,
        });
        eprintln!(
            "  {kind:?} {rate:>8}: {delivered}/{expected:.0} p50 {:.2} ms p99 {:.2} ms, server {:.2}s nats {:.2}s gen {:.0}% -> {verdict} {reason}",
            lat.p50_ms,
            lat.p99_ms,
            server_cpu,
            cpu["nats"].as_f64().unwrap_or(0.0),
            generator * 100.0
        );
        Ok(step)
    }

    /// Warm-up, the ladder until a rate fails (twice in a row), then bisection between the last
    /// sustained and the first failed rate.
    async fn ladder(&mut self) -> Result<Value> {
        let args = self.args.clone();
        let mut steps = Vec::new();
        if args.warmup_seconds > 0.0 {
            steps.push(self.step(args.rates[0], Kind::Warmup).await?);
        }
        let mut pass: Option<f64> = None;
        let mut fail: Option<(f64, String)> = None;
        let mut stop = "sustained every rate of the ladder".to_string();
        for &rate in &args.rates {
            let mut s = self.step(rate, Kind::Ladder).await?;
            if s["verdict"] == "failed" {
                // One noisy step on a shared machine is not a knee: a failed rate is run
                // again, and fails only when the repeat fails too.
                steps.push(s);
                s = self.step(rate, Kind::Ladder).await?;
                s["repeat"] = json!(true);
            }
            let verdict = s["verdict"].as_str().unwrap_or("").to_string();
            let reason = s["reason"].as_str().unwrap_or("").to_string();
            steps.push(s);
            match verdict.as_str() {
                "sustained" => pass = Some(rate),
                "discarded" => {
                    stop = reason;
                    break;
                }
                _ => {
                    fail = Some((rate, reason.clone()));
                    stop = reason;
                    break;
                }
            }
        }
        // Bisecting on fewer connections than the ladder had would measure something else.
        let lost = self.shared.lost.load(Ordering::Relaxed) > 0;
        if let (Some(mut p), Some((mut f, _)), false) = (pass, fail.clone(), lost) {
            for _ in 0..args.refine {
                let m = ((p * f).sqrt()).round();
                if m <= p || m >= f {
                    break;
                }
                let s = self.step(m, Kind::Refine).await?;
                let verdict = s["verdict"].as_str().unwrap_or("").to_string();
                let reason = s["reason"].as_str().unwrap_or("").to_string();
                steps.push(s);
                match verdict.as_str() {
                    "sustained" => p = m,
                    "discarded" => break,
                    _ => {
                        f = m;
                        stop = reason;
                    }
                }
            }
            pass = Some(p);
        }
        Ok(json!({
            "steps": steps,
            "max_sustained_rate": pass,
            "stop_reason": stop,
        }))
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    for addr in [args.server.ip(), args.nats.ip()] {
        if !addr.is_loopback() {
            bail!("{addr} is not a loopback address: this tool only runs on loopback");
        }
    }
    if let Some(m) = args.metrics
        && !m.ip().is_loopback()
    {
        bail!("{m} is not a loopback address");
    }
    let max_seconds = args.max_seconds;
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(max_seconds));
        eprintln!("wsrelay-load: --max-seconds {max_seconds} reached, exiting");
        std::process::exit(3);
    });
    // One thread: the generator has one core of its own.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(Arc::new(args)))
}

async fn run(args: Arc<Args>) -> Result<()> {
    now_ns();
    if args.workload == Workload::Subscribe && args.target != Target::Wsrelay {
        bail!("the subscribe workload measures wsrelay's authorize: --target wsrelay only");
    }
    if args.workload == Workload::Presence {
        if args.target != Target::Wsrelay {
            bail!("the presence workload measures wsrelay's presence: --target wsrelay only");
        }
        return presence::run(args).await;
    }
    // Before any connection: `cached` primes the relay's cache while it connects.
    let backend = match (args.workload, args.authz) {
        (Workload::Subscribe, Authz::Cached | Authz::Miss) => Some(start_backend(&args)?),
        _ => None,
    };
    let key = match &args.jwt_secret_file {
        Some(p) => std::fs::read(p).with_context(|| format!("read {}", p.display()))?,
        None => Vec::new(),
    };
    let n = args.connections;
    let tokens: Vec<String> = (0..n)
        .map(|i| {
            if key.is_empty() {
                Ok(String::new())
            } else {
                mint(&key, i, args.extra_claims(i))
            }
        })
        .collect::<Result<_>>()?;
    let subjects = args.subjects();
    let shared = Arc::new(Shared::new(subjects.len()));
    let before_connect = samples(&args);
    let net_before = net_counters();

    // Connect phase.
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut ticket_txs = Vec::new();
    for (i, token) in tokens.iter().cloned().enumerate() {
        let rx = if args.ticketed() {
            let (tx, rx) = mpsc::channel(1024);
            ticket_txs.push(tx);
            Some(rx)
        } else {
            None
        };
        tasks.spawn(client(
            i,
            args.clone(),
            shared.clone(),
            token,
            gate.clone(),
            started,
            rx,
        ));
    }
    while shared.ready.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_seconds = (shared.last_ready_ns.load(Ordering::Relaxed) as f64 / 1e9).max(1e-9);
    let ready = shared.ready.load(Ordering::Relaxed);
    let failed = shared.failed.load(Ordering::Relaxed);
    let after_connect = samples(&args);
    let net_after = net_counters();
    let handshake = summarize(&lock(&shared.handshake));
    eprintln!(
        "wsrelay-load {:?}/{:?}: {ready} connected, {failed} failed in {connect_seconds:.2}s (handshake p99 {:.1} ms)",
        args.target, args.workload, handshake.p99_ms
    );

    let mut report = json!({
        "target": format!("{:?}", args.target).to_lowercase().replace("natsws", "nats-ws"),
        "workload": format!("{:?}", args.workload).to_lowercase(),
        "connections_requested": n,
        "connections_ready": ready,
        "connect_failed": failed,
        "slow_connections": args.slow.min(n),
        "channels": subjects.len(),
        "handshake": {
            "seconds": connect_seconds,
            "per_second": ready as f64 / connect_seconds,
            "concurrency": args.connect_concurrency,
            "latency": handshake,
            "cpu_seconds": cpu_delta(&before_connect, &after_connect),
            "tcp_counters": net_delta(&net_before, &net_after),
        },
        "procs_before_connect": before_connect,
        "procs_after_connect": after_connect,
        "payload_bytes": args.payload_bytes,
        "p99_limit_ms": args.p99_limit_ms,
        "step_seconds": args.step_seconds,
        "generator_saturation": args.generator_saturation,
        "sources": args.sources,
    });
    if args.workload == Workload::Subscribe {
        report["subscribe"] = json!({
            "authz": format!("{:?}", args.authz).to_lowercase(),
            "rooms_per_connection": args.rooms,
            "token_bytes": tokens.first().map(String::len),
            "authz_subject": (args.authz == Authz::Cached || args.authz == Authz::Miss)
                .then(|| args.authz_subject.clone()),
            "backend": backend.as_ref().map(|_| "a thread of wsrelay-load (the generator's core): queue group authz, replies {\"allow\":true} at once"),
        });
    }

    let sink = if args.ticketed() {
        Sink::Tickets(ticket_txs)
    } else if args.target == Target::Baseline {
        let url = format!("ws://{}/pub", args.server);
        let stream = TcpStream::connect(args.server).await?;
        stream.set_nodelay(true)?;
        let (ws, _) =
            tokio_tungstenite::client_async(url.into_client_request()?, BoxIo(Box::new(stream)))
                .await
                .context("baseline publish socket")?;
        Sink::Baseline(Box::new(ws), subjects.clone())
    } else {
        let nc = async_nats::ConnectOptions::new()
            .token(args.nats_token.clone())
            .name("wsrelay-load publisher")
            .connect(args.nats.to_string())
            .await
            .context("publisher: connect to NATS")?;
        Sink::Nats(nc, subjects.clone())
    };
    // Upstream: the generator is the backend that receives what clients publish.
    if args.workload == Workload::Upstream {
        let nc = async_nats::ConnectOptions::new()
            .token(args.nats_token.clone())
            .name("wsrelay-load upstream receiver")
            .connect(args.nats.to_string())
            .await
            .context("upstream receiver: connect to NATS")?;
        let mut sub = nc.subscribe(UPSTREAM_SUBJECT).await?;
        nc.flush().await?;
        let shared = shared.clone();
        tokio::spawn(async move {
            let _keep = nc;
            while let Some(m) = sub.next().await {
                shared.record(0, &m.payload);
            }
        });
    }
    let mut runner = Runner {
        args: args.clone(),
        shared: shared.clone(),
        sink,
    };

    match args.workload {
        Workload::Idle => {
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
        }
        Workload::Storm => {
            if let Some(f) = &args.ready_file {
                std::fs::write(f, "ready\n")?;
            }
            let wait = Instant::now();
            while shared.first_drop_ns.load(Ordering::Relaxed) == u64::MAX
                && wait.elapsed() < Duration::from_secs(30)
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let t = Instant::now();
            while shared.recovered.load(Ordering::Relaxed) < ready
                && t.elapsed().as_secs_f64() < args.storm_seconds
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let recovered = shared.recovered.load(Ordering::Relaxed);
            report["storm"] = json!({
                "clients": ready,
                "recovered": recovered,
                "not_recovered": ready - recovered.min(ready),
                "reconnect_attempts": shared.reconnect_attempts.load(Ordering::Relaxed),
                "reconnect_failures": shared.reconnect_failures.load(Ordering::Relaxed),
                "reconnect_jitter_ms": args.reconnect_jitter_ms,
                "recovered_after": summarize(&lock(&shared.recovery)),
                "procs_after": samples(&args),
            });
            eprintln!("  storm: {recovered}/{ready} back");
            // The server's pid changed: CPU figures of the check step are not read.
            let mut check_args = args.as_ref().clone();
            check_args.pids.clear();
            check_args.metrics = None;
            runner.args = Arc::new(check_args);
            report["storm"]["delivery_after"] = match runner.step(args.rates[0], Kind::Check).await
            {
                Ok(v) => v,
                Err(e) => json!({"error": format!("{e:#}")}),
            };
        }
        _ if ready > 0 => {
            let l = runner.ladder().await?;
            report["steps"] = l["steps"].clone();
            report["max_sustained_rate"] = l["max_sustained_rate"].clone();
            report["stop_reason"] = l["stop_reason"].clone();
        }
        _ => {}
    }
    report["lost_connections"] = json!(shared.lost.load(Ordering::Relaxed));
    report["errors"] = json!(lock(&shared.errors).clone());
    report["procs_end"] = json!(samples(&args));
    if let Some(answered) = &backend {
        report["subscribe"]["backend_answered"] = json!(answered.load(Ordering::Relaxed));
    }

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

/// The presence workload (issue 26), wsrelay only: one channel of `--connections` members,
/// its snapshot, and its churn seen by a steady observer. Writes the report and exits: status
/// 4 when the observer's bound (occupancy only, at most one per second) was broken.
mod presence {
    use super::*;
    use tokio::sync::mpsc::UnboundedSender;
    use wsrelay_e2e::load::presence::{FrameKind, kind_of, min_gap, occupancy_bound};

    /// Token indices (`sub` `u<i>`) of the connections that are not members from the start:
    /// churn joiners are `connections + k`, these far above.
    const SNAPSHOT_BASE: usize = 1_000_000;
    const OBSERVER: usize = 2_000_000;
    /// Bound on one reply (a subscribe with presence waits at most 5 s in the relay).
    const REPLY_WITHIN: Duration = Duration::from_secs(20);

    /// Presence frames received, by kind.
    #[derive(Debug, Default)]
    struct Counts {
        join: AtomicU64,
        leave: AtomicU64,
        occupancy: AtomicU64,
    }

    impl Counts {
        fn add(&self, text: &[u8]) {
            let c = match kind_of(text) {
                FrameKind::Join => &self.join,
                FrameKind::Leave => &self.leave,
                FrameKind::Occupancy => &self.occupancy,
                FrameKind::Other => return,
            };
            c.fetch_add(1, Ordering::Relaxed);
        }

        fn read(&self) -> [u64; 3] {
            [&self.join, &self.leave, &self.occupancy].map(|c| c.load(Ordering::Relaxed))
        }
    }

    /// What arrived between two readings of [`Counts`], and per second over `seconds`.
    fn counts_between(a: [u64; 3], b: [u64; 3], seconds: f64) -> Value {
        let d: Vec<u64> = (0..3).map(|k| b[k].saturating_sub(a[k])).collect();
        json!({
            "join": d[0], "leave": d[1], "occupancy": d[2],
            "per_second": d.iter().sum::<u64>() as f64 / seconds.max(1e-9),
        })
    }

    /// The relay's presence counters (docs/protocol.md section 10, "Metrics").
    fn relay_presence(text: Option<&str>) -> BTreeMap<&'static str, f64> {
        let Some(text) = text else {
            return BTreeMap::new();
        };
        let sent = "wsrelay_presence_events_sent_total";
        let reads = "wsrelay_presence_snapshot_reads_total";
        [
            ("join_sent", sent, vec![("event", "join")]),
            ("leave_sent", sent, vec![("event", "leave")]),
            ("occupancy_sent", sent, vec![("event", "occupancy")]),
            ("snapshot_reads", reads, vec![("op", "subscribe")]),
            ("page_reads", reads, vec![("op", "presence")]),
            ("unavailable", "wsrelay_presence_unavailable_total", vec![]),
            ("members", "wsrelay_presence_members", vec![]),
        ]
        .into_iter()
        .map(|(k, name, labels)| (k, parse_prom_counter(text, name, &labels).unwrap_or(0.0)))
        .collect()
    }

    /// Counters' differences (`members`, a gauge, as read at the end).
    fn relay_between(a: &BTreeMap<&str, f64>, b: &BTreeMap<&str, f64>) -> Value {
        Value::Object(
            b.iter()
                .map(|(k, v)| {
                    let d = if *k == "members" {
                        *v
                    } else {
                        v - a.get(k).unwrap_or(&0.0)
                    };
                    ((*k).to_string(), json!(d))
                })
                .collect(),
        )
    }

    fn subscribe_text(id: u64, channel: &str) -> String {
        json!({"type": "subscribe", "id": id, "channel": channel, "presence": true}).to_string()
    }

    /// Sends `text` and reads until the reply to `id` (presence frames read meanwhile are
    /// counted); the reply's text and the time from the send to it.
    async fn request(
        ws: &mut Ws,
        text: String,
        id: u64,
        counts: &Counts,
    ) -> Result<(String, Duration)> {
        let exchange = async {
            let t0 = Instant::now();
            ws.send(Message::text(text)).await?;
            loop {
                match ws
                    .next()
                    .await
                    .context("connection ended")?
                    .context("read")?
                {
                    Message::Text(t) => match Head::reply_to(t.as_bytes(), id) {
                        Some(true) => return Ok((t.as_str().to_owned(), t0.elapsed())),
                        Some(false) => bail!("wsrelay: {}", t.as_str()),
                        None => counts.add(t.as_bytes()),
                    },
                    Message::Close(c) => bail!("closed: {c:?}"),
                    _ => {}
                }
            }
        };
        tokio::time::timeout(REPLY_WITHIN, exchange)
            .await
            .map_err(|_| anyhow!("no reply to {id} within {REPLY_WITHIN:?}"))?
    }

    /// A member's join: its handshake (TCP, upgrade, `welcome`) and its subscribe with
    /// presence (the send to the `ok`), in µs.
    struct Joined {
        handshake_us: u64,
        subscribe_us: u64,
    }

    /// One member, token index `i`: connects, subscribes with presence, says how long it took
    /// on `done` (with `k`, its place in the phase), then reads (counting presence frames)
    /// until `stop`, and closes.
    #[allow(clippy::too_many_arguments)]
    async fn member(
        k: usize,
        i: usize,
        args: Arc<Args>,
        shared: Arc<Shared>,
        counts: Arc<Counts>,
        token: String,
        stop: CancellationToken,
        done: UnboundedSender<(usize, Result<Joined>)>,
    ) {
        let t0 = Instant::now();
        let (mut ws, _) = match open_bounded(&args, &shared, i, &token, false).await {
            Ok(v) => v,
            Err(e) => {
                let _ = done.send((k, Err(e)));
                return;
            }
        };
        let handshake_us = t0.elapsed().as_micros() as u64;
        let text = subscribe_text(1, &args.presence_channel);
        match request(&mut ws, text, 1, &counts).await {
            Ok((_, took)) => {
                let _ = done.send((
                    k,
                    Ok(Joined {
                        handshake_us,
                        subscribe_us: took.as_micros() as u64,
                    }),
                ));
            }
            Err(e) => {
                let _ = done.send((k, Err(e)));
                return;
            }
        }
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => break,
                m = ws.next() => m,
            };
            match msg {
                Some(Ok(Message::Text(t))) => counts.add(t.as_bytes()),
                Some(Ok(Message::Close(c))) => {
                    shared.error(&anyhow!("closed by server: {c:?}"));
                    shared.lost.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    shared.error(&anyhow!("read: {e}"));
                    shared.lost.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                None => {
                    shared.lost.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
    }

    /// Everything the phases share.
    struct Ctx {
        args: Arc<Args>,
        shared: Arc<Shared>,
        counts: Arc<Counts>,
        key: Vec<u8>,
        tasks: tokio::task::JoinSet<()>,
        /// Each member slot's stop (a churned slot's is its newest member's).
        stops: Vec<CancellationToken>,
    }

    impl Ctx {
        /// Starts the member with token index `i` (in slot `slot`), `k` in its phase.
        fn spawn(
            &mut self,
            slot: usize,
            k: usize,
            i: usize,
            done: &UnboundedSender<(usize, Result<Joined>)>,
        ) -> Result<()> {
            let token = mint(&self.key, i, json!({}))?;
            let stop = self.shared.stop.child_token();
            if let Some(old) = self.stops.get_mut(slot) {
                // The slot's member leaves.
                old.cancel();
                *old = stop.clone();
            } else {
                self.stops.push(stop.clone());
            }
            self.tasks.spawn(member(
                k,
                i,
                self.args.clone(),
                self.shared.clone(),
                self.counts.clone(),
                token,
                stop,
                done.clone(),
            ));
            Ok(())
        }
    }

    /// Join results, as they come.
    struct Joins {
        all: Histogram<u64>,
        handshake: Histogram<u64>,
        /// Subscribe times by tenth of the phase (the channel's size when the member joined).
        by_tenth: Vec<Histogram<u64>>,
        joined: usize,
        failed: usize,
        last: Instant,
    }

    impl Joins {
        fn new() -> Self {
            Joins {
                all: new_histogram(),
                handshake: new_histogram(),
                by_tenth: (0..10).map(|_| new_histogram()).collect(),
                joined: 0,
                failed: 0,
                last: Instant::now(),
            }
        }

        fn add(&mut self, shared: &Shared, k: usize, n: usize, r: Result<Joined>) {
            self.last = Instant::now();
            match r {
                Ok(j) => {
                    self.joined += 1;
                    self.all.saturating_record(j.subscribe_us.max(1));
                    self.handshake.saturating_record(j.handshake_us.max(1));
                    let tenth = (k * 10 / n.max(1)).min(9);
                    self.by_tenth[tenth].saturating_record(j.subscribe_us.max(1));
                }
                Err(e) => {
                    self.failed += 1;
                    shared.error(&e);
                }
            }
        }

        fn seen(&self) -> usize {
            self.joined + self.failed
        }
    }

    /// Waits until `joins` holds `n` results, at most `within`.
    async fn drain(
        rx: &mut mpsc::UnboundedReceiver<(usize, Result<Joined>)>,
        joins: &mut Joins,
        shared: &Shared,
        n: usize,
        phase_n: usize,
        within: Duration,
    ) {
        let until = tokio::time::Instant::now() + within;
        while joins.seen() < n {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some((k, r))) => joins.add(shared, k, phase_n, r),
                _ => break,
            }
        }
    }

    /// Phase 1: `--connections` members join at `--join-rate`, at most
    /// `--connect-concurrency` joins in flight.
    async fn grow(ctx: &mut Ctx) -> Result<Value> {
        let args = ctx.args.clone();
        let n = args.connections;
        let rate = args.join_rate.max(1.0);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut joins = Joins::new();
        let (a, cores_a, metrics_a) = (samples(&args), cores(), relay_metrics(args.metrics).await);
        let counts_a = ctx.counts.read();
        let t0 = Instant::now();
        let start = tokio::time::Instant::now();
        for k in 0..n {
            tokio::time::sleep_until(start + Duration::from_secs_f64(k as f64 / rate)).await;
            while k - joins.seen() >= args.connect_concurrency.max(1) {
                match tokio::time::timeout(REPLY_WITHIN * 3, rx.recv()).await {
                    Ok(Some((kk, r))) => joins.add(&ctx.shared, kk, n, r),
                    _ => bail!("no join completed within {:?}", REPLY_WITHIN * 3),
                }
            }
            ctx.spawn(k, k, k, &tx)?;
        }
        let spawned = t0.elapsed().as_secs_f64();
        drain(&mut rx, &mut joins, &ctx.shared, n, n, REPLY_WITHIN * 3).await;
        let seconds = joins.last.duration_since(t0).as_secs_f64();
        let (b, cores_b, metrics_b) = (samples(&args), cores(), relay_metrics(args.metrics).await);
        let cpu = cpu_delta(&a, &b);
        let rss = |s: &BTreeMap<String, ProcSample>, name: &str| s.get(name).map(|p| p.rss_bytes);
        let per_member = |name: &str| match (rss(&a, name), rss(&b, name)) {
            (Some(x), Some(y)) if joins.joined > 0 => {
                Some((y as f64 - x as f64) / joins.joined as f64)
            }
            _ => None,
        };
        let per_join = |name: &str| {
            cpu[name]
                .as_f64()
                .filter(|_| joins.joined > 0)
                .map(|c| c * 1e6 / joins.joined as f64)
        };
        let by_size: Vec<Value> = joins
            .by_tenth
            .iter()
            .enumerate()
            .map(|(t, h)| {
                json!({"members_from": t * n / 10, "members_to": (t + 1) * n / 10, "subscribe": summarize(h)})
            })
            .collect();
        let out = json!({
            "members": n,
            "rate": rate,
            "joined": joins.joined,
            "failed": joins.failed,
            "schedule_seconds": spawned,
            "seconds": seconds,
            "per_second": joins.joined as f64 / seconds.max(1e-9),
            "subscribe": summarize(&joins.all),
            "handshake": summarize(&joins.handshake),
            "by_size": by_size,
            "cpu_seconds": cpu,
            "cores_busy": cores_busy(&cores_a, &cores_b),
            "relay_cpu_us_per_join": per_join("server"),
            "nats_cpu_us_per_join": per_join("nats"),
            "rss_bytes_before": {"server": rss(&a, "server"), "nats": rss(&a, "nats")},
            "rss_bytes_after": {"server": rss(&b, "server"), "nats": rss(&b, "nats")},
            "rss_bytes_per_member": {"server": per_member("server"), "nats": per_member("nats")},
            "relay": relay_between(
                &relay_presence(metrics_a.as_deref()),
                &relay_presence(metrics_b.as_deref()),
            ),
            "members_received": counts_between(counts_a, ctx.counts.read(), seconds),
        });
        eprintln!(
            "  presence join: {}/{n} in {seconds:.1} s ({} failed), subscribe p50 {:.2} ms p99 {:.2} ms",
            joins.joined,
            joins.failed,
            out["subscribe"]["p50_ms"].as_f64().unwrap_or(0.0),
            out["subscribe"]["p99_ms"].as_f64().unwrap_or(0.0)
        );
        Ok(out)
    }

    /// What one snapshot repetition measured.
    struct Snapshot {
        ok: Duration,
        ok_bytes: usize,
        first_page: usize,
        users: u64,
        complete: bool,
        page: Duration,
        page_bytes: usize,
        pages: usize,
        paged: usize,
    }

    /// One fresh subscriber (token index `i`): subscribes with presence, pages every member,
    /// unsubscribes, closes.
    async fn snapshot_once(ctx: &Ctx, i: usize, counts: &Counts) -> Result<Snapshot> {
        let args = &ctx.args;
        let channel = &args.presence_channel;
        let token = mint(&ctx.key, i, json!({}))?;
        let (mut ws, _) = open_bounded(args, &ctx.shared, i, &token, false).await?;
        let (ok, took) = request(&mut ws, subscribe_text(1, channel), 1, counts).await?;
        let v: Value = serde_json::from_str(&ok)?;
        let p = &v["presence"];
        let first_page = p["members"].as_array().map_or(0, Vec::len);
        let (users, complete) = (p["users"].as_u64().unwrap_or(0), p["complete"] == true);
        let t0 = Instant::now();
        let (mut after, mut pages, mut paged, mut page_bytes) = (None::<String>, 0, 0, 0);
        // Bounded: far more pages than the members can fill.
        for id in 100..100 + 1000u64 {
            let mut req =
                json!({"type": "presence", "id": id, "channel": channel, "limit": args.page_limit});
            if let Some(a) = &after {
                req["after"] = json!(a);
            }
            let (text, _) = request(&mut ws, req.to_string(), id, counts).await?;
            page_bytes += text.len();
            pages += 1;
            let v: Value = serde_json::from_str(&text)?;
            let p = &v["presence"];
            paged += p["members"].as_array().map_or(0, Vec::len);
            if p["complete"] == true {
                break;
            }
            after = Some(
                p["next"]
                    .as_str()
                    .context("an incomplete page without next")?
                    .to_owned(),
            );
        }
        let page = t0.elapsed();
        request(
            &mut ws,
            Request::unsubscribe(2, channel).to_text(),
            2,
            counts,
        )
        .await?;
        let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
        Ok(Snapshot {
            ok: took,
            ok_bytes: ok.len(),
            first_page,
            users,
            complete,
            page,
            page_bytes,
            pages,
            paged,
        })
    }

    /// Phase 2: `--snapshots` fresh subscribers, one after another, on the full channel.
    async fn snapshots(ctx: &Ctx) -> Value {
        let counts = Counts::default();
        let (mut ok, mut page) = (new_histogram(), new_histogram());
        let mut reps = Vec::new();
        let mut failed = 0;
        for r in 0..ctx.args.snapshots {
            match snapshot_once(ctx, SNAPSHOT_BASE + r, &counts).await {
                Ok(s) => {
                    ok.saturating_record((s.ok.as_micros() as u64).max(1));
                    page.saturating_record((s.page.as_micros() as u64).max(1));
                    reps.push(s);
                }
                Err(e) => {
                    failed += 1;
                    ctx.shared.error(&e.context("snapshot"));
                }
            }
        }
        let median = |mut v: Vec<usize>| {
            v.sort_unstable();
            v.get(v.len() / 2).copied()
        };
        let out = json!({
            "repetitions": ctx.args.snapshots,
            "failed": failed,
            "ok": summarize(&ok),
            "ok_bytes": median(reps.iter().map(|s| s.ok_bytes).collect()),
            "ok_bytes_max": reps.iter().map(|s| s.ok_bytes).max(),
            "first_page_members": median(reps.iter().map(|s| s.first_page).collect()),
            "users": reps.iter().map(|s| s.users).max(),
            "complete": reps.iter().any(|s| s.complete),
            "page_limit": ctx.args.page_limit,
            "page_all": summarize(&page),
            "page_all_bytes": median(reps.iter().map(|s| s.page_bytes).collect()),
            "pages": median(reps.iter().map(|s| s.pages).collect()),
            "paged_members": median(reps.iter().map(|s| s.paged).collect()),
        });
        eprintln!(
            "  presence snapshot: ok p50 {:.2} ms p99 {:.2} ms, {} bytes; all {} members in {} pages: p50 {:.1} ms, {} bytes",
            out["ok"]["p50_ms"].as_f64().unwrap_or(0.0),
            out["ok"]["p99_ms"].as_f64().unwrap_or(0.0),
            out["ok_bytes"],
            out["paged_members"],
            out["pages"],
            out["page_all"]["p50_ms"].as_f64().unwrap_or(0.0),
            out["page_all_bytes"],
        );
        out
    }

    /// A presence frame the observer received: when, its kind, and an occupancy's counts.
    struct Seen {
        at: Instant,
        kind: FrameKind,
        users: Option<u64>,
        events: Option<bool>,
    }

    /// The steady observer: subscribed with presence before the churn, it records every
    /// presence frame until `stop`.
    async fn observer(
        ctx: &Ctx,
        stop: CancellationToken,
    ) -> Result<(tokio::task::JoinHandle<()>, Arc<Mutex<Vec<Seen>>>)> {
        let token = mint(&ctx.key, OBSERVER, json!({}))?;
        let (mut ws, _) = open_bounded(&ctx.args, &ctx.shared, OBSERVER, &token, false).await?;
        let text = subscribe_text(1, &ctx.args.presence_channel);
        request(&mut ws, text, 1, &Counts::default()).await?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let shared = ctx.shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = ws.next() => m,
                };
                let t = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_)) | Err(_)) | None => {
                        shared.error(&anyhow!("the presence observer's connection ended"));
                        shared.lost.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Some(Ok(_)) => continue,
                };
                let kind = kind_of(t.as_bytes());
                if kind == FrameKind::Other {
                    continue;
                }
                let v: Value = serde_json::from_slice(t.as_bytes()).unwrap_or(Value::Null);
                lock(&log).push(Seen {
                    at: Instant::now(),
                    kind,
                    users: v["users"].as_u64(),
                    events: v["events"].as_bool(),
                });
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
        });
        Ok((task, seen))
    }

    /// Phase 3: members leave and new ones join at the first of `--rates` per second for
    /// `--churn-seconds`; the observer's frames over that and `--churn-tail-seconds` after.
    async fn churn(ctx: &mut Ctx) -> Result<Value> {
        let args = ctx.args.clone();
        let n = args.connections;
        let rate = args.rates.first().copied().unwrap_or(100.0).max(0.1);
        let stop = ctx.shared.stop.child_token();
        let (task, seen) = observer(ctx, stop.clone()).await?;
        // What the snapshots' subscribers changed reaches the observer before the window.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut joins = Joins::new();
        let items = (rate * args.churn_seconds).round() as usize;
        let (a, cores_a, metrics_a) = (samples(&args), cores(), relay_metrics(args.metrics).await);
        let counts_a = ctx.counts.read();
        let t0 = Instant::now();
        let start = tokio::time::Instant::now();
        for k in 0..items {
            tokio::time::sleep_until(start + Duration::from_secs_f64(k as f64 / rate)).await;
            while let Ok((kk, r)) = rx.try_recv() {
                joins.add(&ctx.shared, kk, items, r);
            }
            // Slot k mod n's member leaves; a new member (a `sub` never seen) joins.
            ctx.spawn(k % n.max(1), k, n + k, &tx)?;
        }
        let (c, cores_c) = (samples(&args), cores());
        let schedule = t0.elapsed().as_secs_f64();
        let window = args.churn_seconds + args.churn_tail_seconds;
        tokio::time::sleep_until(start + Duration::from_secs_f64(window)).await;
        let t_end = Instant::now();
        let (b, metrics_b) = (samples(&args), relay_metrics(args.metrics).await);
        let counts_b = ctx.counts.read();
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        drain(
            &mut rx,
            &mut joins,
            &ctx.shared,
            items,
            items,
            REPLY_WITHIN * 3,
        )
        .await;

        let seen = std::mem::take(&mut *lock(&seen));
        let inside: Vec<&Seen> = seen.iter().filter(|s| s.at >= t0 && s.at < t_end).collect();
        let rel = |s: &Seen| s.at.duration_since(t0).as_secs_f64();
        let of = |k: FrameKind| inside.iter().filter(|s| s.kind == k).count() as u64;
        let occupancy: Vec<f64> = inside
            .iter()
            .filter(|s| s.kind == FrameKind::Occupancy)
            .map(|s| rel(s))
            .collect();
        let (joined, left) = (of(FrameKind::Join), of(FrameKind::Leave));
        let observed = t_end.duration_since(t0).as_secs_f64();
        let bound = occupancy_bound(observed, &occupancy, joined, left);
        let users: Vec<u64> = inside.iter().filter_map(|s| s.users).collect();
        let cpu = cpu_delta(&a, &c);
        let share = |name: &str| cpu[name].as_f64().map(|s| s / schedule.max(1e-9));
        let per_item = |name: &str| {
            cpu[name]
                .as_f64()
                .filter(|_| items > 0)
                .map(|s| s * 1e6 / items as f64)
        };
        let out = json!({
            "rate": rate,
            "seconds": args.churn_seconds,
            "items": items,
            "schedule_seconds": schedule,
            "joined": joins.joined,
            "failed": joins.failed,
            "subscribe": summarize(&joins.all),
            "cpu_seconds": cpu,
            "cpu_seconds_window": cpu_delta(&a, &b),
            "core_share": {"server": share("server"), "nats": share("nats"), "loadgen": share("loadgen")},
            "cores_busy": cores_busy(&cores_a, &cores_c),
            "relay_cpu_us_per_item": per_item("server"),
            "nats_cpu_us_per_item": per_item("nats"),
            "relay": relay_between(
                &relay_presence(metrics_a.as_deref()),
                &relay_presence(metrics_b.as_deref()),
            ),
            "members_received": counts_between(counts_a, counts_b, observed),
            "observer": {
                "window_seconds": observed,
                "tail_seconds": args.churn_tail_seconds,
                "occupancy": occupancy.len(),
                "join": joined,
                "leave": left,
                "per_second": occupancy.len() as f64 / observed.max(1e-9),
                "min_gap_seconds": min_gap(&occupancy),
                "events_true": inside.iter().filter(|s| s.events == Some(true)).count(),
                "users_first": users.first(),
                "users_last": users.last(),
                "users_min": users.iter().min(),
                "users_max": users.iter().max(),
            },
            "bound": bound,
        });
        eprintln!(
            "  presence churn: {items} leave+join at {rate}/s, observer {} occupancy {joined} join {left} leave in {observed:.1} s, relay {:.0}% of its core -> {}",
            occupancy.len(),
            share("server").unwrap_or(0.0) * 100.0,
            if bound.pass {
                "bound held".to_string()
            } else {
                format!("BOUND VIOLATED: {}", bound.reason)
            }
        );
        Ok(out)
    }

    /// Waits (at most 30 s) until the relay's registry bucket is in place.
    async fn registry_ready(args: &Args) -> bool {
        if args.metrics.is_none() {
            return true;
        }
        for _ in 0..300 {
            let text = relay_metrics(args.metrics).await;
            if text
                .as_deref()
                .and_then(|t| parse_prom_counter(t, "wsrelay_registry_ready", &[]))
                == Some(1.0)
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    pub(super) async fn run(args: Arc<Args>) -> Result<()> {
        let key = match &args.jwt_secret_file {
            Some(p) => std::fs::read(p).with_context(|| format!("read {}", p.display()))?,
            None => {
                bail!("the presence workload needs --jwt-secret-file: every member its own sub")
            }
        };
        if !registry_ready(&args).await {
            bail!("the relay's registry was not ready within 30 s (wsrelay_registry_ready)");
        }
        let shared = Arc::new(Shared::new(1));
        let mut ctx = Ctx {
            args: args.clone(),
            shared: shared.clone(),
            counts: Arc::new(Counts::default()),
            key,
            tasks: tokio::task::JoinSet::new(),
            stops: Vec::new(),
        };
        let before = samples(&args);
        let join = grow(&mut ctx).await?;
        // The joins' occupancy frames go out before the snapshots.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let snapshot = snapshots(&ctx).await;
        let churn = match churn(&mut ctx).await {
            Ok(v) => v,
            Err(e) => {
                shared.error(&e);
                json!({"error": format!("{e:#}"), "bound": {"pass": false, "reason": format!("the churn did not run: {e:#}")}})
            }
        };
        let pass = churn["bound"]["pass"] == true;
        let report = json!({
            "target": "wsrelay",
            "workload": "presence",
            "connections_requested": args.connections,
            "connections_ready": join["joined"],
            "connect_failed": join["failed"],
            "channels": 1,
            "sources": args.sources,
            "step_seconds": args.step_seconds,
            "procs_before_connect": before,
            "presence": {
                "channel": args.presence_channel,
                "join": join,
                "snapshot": snapshot,
                "churn": churn,
                "bound_pass": pass,
            },
            "lost_connections": shared.lost.load(Ordering::Relaxed),
            "errors": lock(&shared.errors).clone(),
            "procs_end": samples(&args),
        });
        shared.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while ctx.tasks.join_next().await.is_some() {}
        })
        .await;
        ctx.tasks.abort_all();
        let text = serde_json::to_string_pretty(&report)?;
        match &args.out {
            Some(p) => std::fs::write(p, text).with_context(|| format!("write {}", p.display()))?,
            None => println!("{text}"),
        }
        if !pass {
            eprintln!(
                "wsrelay-load presence: BOUND VIOLATED: {}",
                churn["bound"]["reason"].as_str().unwrap_or("?")
            );
            std::process::exit(4);
        }
        std::process::exit(0)
    }
}
