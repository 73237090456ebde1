//! A client of resumable channels (docs/protocol.md section 8) that behaves like the SDK, and
//! a publisher that knows what the history stream stored, for the tests that break relays
//! under clients (tests/chaos.rs, tests/fleet.rs).
//!
//! The client keeps, for its one channel, the epoch and the last position received. When its
//! connection closes or its relay announces a drain, it connects again through the same URL
//! and subscribes with `since`; on `unsubscribed` with reason `unavailable` it subscribes again
//! on the same connection, with `since`. It checks every message against the position chain
//! (`seq` above the last one, `prev` equal to it) and records what breaks it, every
//! `recovered: false`, and the time from losing its subscription to having every message the
//! stream stored before it resumed ("reconnect to caught up").
//!
//! The publisher publishes with JetStream acknowledgements: the ack names the stream position
//! of each message, so the test knows exactly what the stream stored, which is what a
//! resumable channel promises to deliver (a core NATS publish lost while JetStream was away
//! is not promised to anyone). Backends may use core NATS; the relay path is the same.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use wsrelay_testkit::client::{Request, Since, Ws, read_value};

use crate::subscriber::Target;

type Socket = Ws;

/// How long a handshake (and the `welcome`) may take before the attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed connection attempts in a row after which a client gives up (a test failure).
const MAX_FAILED_ATTEMPTS: u32 = 60;
/// Subscribes refused in a row (503 while JetStream is slow) after which a client gives up.
const MAX_REFUSED_SUBSCRIBES: u32 = 20;
/// Frames read on one connection without any, after which it counts as dead (the relay
/// pings every 20 s by default; a message arrives more often than that in these tests).
const READ_TIMEOUT: Duration = Duration::from_secs(45);

/// What the stream stored, per channel: (position, publisher's counter), in position order.
#[derive(Debug, Default)]
pub struct Published {
    stored: Mutex<BTreeMap<String, Vec<(u64, u64)>>>,
    /// Publishes JetStream did not acknowledge (the test cannot say whether they were stored).
    pub errors: AtomicU64,
}

impl Published {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Vec<(u64, u64)>>> {
        self.stored.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last position the stream acknowledged on `channel` (0 before any).
    pub fn head(&self, channel: &str) -> u64 {
        self.lock()
            .get(channel)
            .and_then(|v| v.last())
            .map_or(0, |&(seq, _)| seq)
    }

    /// The last acknowledged position of every channel.
    pub fn heads(&self) -> BTreeMap<String, u64> {
        self.lock()
            .iter()
            .map(|(c, v)| (c.clone(), v.last().map_or(0, |&(s, _)| s)))
            .collect()
    }

    /// Positions stored on `channel` in `(after, upto]`, with their counters.
    pub fn stored_between(&self, channel: &str, after: u64, upto: u64) -> Vec<(u64, u64)> {
        self.lock()
            .get(channel)
            .map(|v| {
                v.iter()
                    .copied()
                    .filter(|&(s, _)| s > after && s <= upto)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Messages stored in `(from, to]` over all channels (per-channel bounds).
    pub fn count_between(&self, from: &BTreeMap<String, u64>, to: &BTreeMap<String, u64>) -> usize {
        to.iter()
            .map(|(c, &upto)| {
                let after = from.get(c).copied().unwrap_or(0);
                self.stored_between(c, after, upto).len()
            })
            .sum()
    }

    fn record(&self, channel: &str, seq: u64, n: u64) {
        self.lock()
            .entry(channel.to_string())
            .or_default()
            .push((seq, n));
    }
}

/// A channel a publisher writes to: the client-facing name and its NATS subject.
#[derive(Clone, Debug)]
pub struct Feed {
    pub channel: String,
    pub subject: String,
}

/// Publishes one message to `feed` with a JetStream ack and records its position. Returns
/// an error when JetStream does not acknowledge within 5 s.
pub async fn publish_acked(
    js: &async_nats::jetstream::Context,
    feed: &Feed,
    n: u64,
    published: &Published,
) -> Result<u64> {
    let payload = json!({ "n": n, "channel": feed.channel }).to_string();
    let ack = tokio::time::timeout(Duration::from_secs(5), async {
        js.publish(feed.subject.clone(), payload.into())
            .await?
            .await
            .map_err(anyhow::Error::from)
    })
    .await
    .context("JetStream ack timed out")??;
    published.record(&feed.channel, ack.sequence, n);
    Ok(ack.sequence)
}

/// Publishes at `rate` messages a second in all, round-robin over `feeds`, until stopped;
/// returns how many were stored. A publish JetStream does not acknowledge is counted in
/// [`Published::errors`] and publishing goes on.
pub async fn publish_steadily(
    js: async_nats::jetstream::Context,
    feeds: Vec<Feed>,
    rate: u64,
    published: Arc<Published>,
    counter: Arc<AtomicU64>,
    stop: CancellationToken,
) -> u64 {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stored = 0;
    for i in 0.. {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let feed = &feeds[i % feeds.len()];
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        match publish_acked(&js, feed, n, &published).await {
            Ok(_) => stored += 1,
            Err(e) => {
                published.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %format!("{e:#}"), "publish not acknowledged");
            }
        }
    }
    stored
}

/// Deletes the JetStream stream that captures `subject`, if any: the relays create history
/// streams and nobody else removes them, so a test removes its own when it is done.
pub async fn delete_stream_of(nats_url: &str, subject: &str) {
    let Ok(nats) = async_nats::connect(nats_url).await else {
        return;
    };
    let js = async_nats::jetstream::new(nats);
    if let Ok(name) = js.stream_by_subject(subject.to_string()).await
        && let Err(e) = js.delete_stream(&name).await
    {
        eprintln!("cleanup: deleting stream {name}: {e}");
    }
}

/// What a client saw on its channel.
#[derive(Debug, Default)]
pub struct Record {
    /// Epoch from the last `ok`.
    pub epoch: Option<String>,
    /// The position of the first `ok`: everything stored after it is owed to the client.
    pub first: Option<u64>,
    /// The last position received (or given by an `ok`).
    pub last: u64,
    /// Positions received, with the publisher's counter from the payload.
    pub received: BTreeMap<u64, u64>,
    /// A message at or below the last position (delivered twice, or out of order).
    pub duplicates: u64,
    /// A message whose `prev` is not the last position (a hole, or a reorder).
    pub chain_breaks: u64,
    /// `recovered: false` answers.
    pub not_recovered: u64,
    /// Subscriptions that reached `ok` after the first.
    pub resubscribes: u64,
    pub drains: u64,
    /// `drain` notices with reason `rebalance`: the relay moved the client to another.
    pub moves: u64,
    /// Connections that ended without a drain notice.
    pub closes: u64,
    /// `unsubscribed` with reason `unavailable`.
    pub unavailable: u64,
    /// Connection attempts that failed.
    pub failed_attempts: u64,
    /// Subscribes answered with an error.
    pub refused_subscribes: u64,
    /// From losing the subscription to having every message stored before the resume.
    pub catchups: Vec<Duration>,
    /// Messages received after a resume up to the stream head it had to reach (mostly the
    /// relay's replay of what the client missed).
    pub replayed: u64,
    /// The client stopped trying (too many failures in a row): why.
    pub gave_up: Option<String>,
    /// The first few anomalies, for the failure message.
    pub anomalies: Vec<String>,
    /// Since when the client has been without a subscription, if it is.
    down_since: Option<Instant>,
    /// After a resume: the stream head to reach before counting as caught up.
    catching_up: Option<(Instant, u64)>,
    /// `last` comes from an `ok`, not from a message.
    after_ok: bool,
}

impl Record {
    fn anomaly(&mut self, what: String) {
        if self.anomalies.len() < 5 {
            self.anomalies.push(what);
        }
    }

    /// The subscription is gone: the catch-up clock starts, or keeps running from an earlier
    /// loss the client had not caught up from.
    fn lost_subscription(&mut self) {
        if let Some((since, _)) = self.catching_up.take() {
            self.down_since = Some(since);
        } else if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
        }
    }

    fn check_caught_up(&mut self) {
        if let Some((since, target)) = self.catching_up
            && self.last >= target
        {
            self.catchups.push(since.elapsed());
            self.catching_up = None;
        }
    }
}

/// Counters of one [`Record`] since the last [`ResumableClient::take_counters`].
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub duplicates: u64,
    pub chain_breaks: u64,
    pub not_recovered: u64,
    pub resubscribes: u64,
    pub drains: u64,
    pub moves: u64,
    pub closes: u64,
    pub unavailable: u64,
    pub failed_attempts: u64,
    pub refused_subscribes: u64,
    pub replayed: u64,
    pub catchups: Vec<Duration>,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.duplicates += o.duplicates;
        self.chain_breaks += o.chain_breaks;
        self.not_recovered += o.not_recovered;
        self.resubscribes += o.resubscribes;
        self.drains += o.drains;
        self.moves += o.moves;
        self.closes += o.closes;
        self.unavailable += o.unavailable;
        self.failed_attempts += o.failed_attempts;
        self.refused_subscribes += o.refused_subscribes;
        self.replayed += o.replayed;
        self.catchups.extend(o.catchups.iter().copied());
    }
}

/// A running client; stopped when dropped.
#[derive(Debug)]
pub struct ResumableClient {
    pub channel: String,
    record: Arc<Mutex<Record>>,
    taken: Mutex<Counters>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Drop for ResumableClient {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

impl ResumableClient {
    /// Connects, subscribes, and returns once the first `ok` came; then keeps the
    /// subscription in the background. `head` says, for the catch-up figure, the last
    /// position the stream stored on the channel.
    pub async fn start(target: Target, head: Arc<dyn Fn() -> u64 + Send + Sync>) -> Result<Self> {
        let record = Arc::new(Mutex::new(Record::default()));
        let (socket, ok) = connect_and_subscribe(&target, None)
            .await
            .with_context(|| format!("first subscription to {}", target.channel))?;
        {
            let mut r = record.lock().unwrap_or_else(|e| e.into_inner());
            let seq = ok["seq"]
                .as_u64()
                .with_context(|| format!("ok without seq on a resumable channel: {ok}"))?;
            r.epoch = Some(
                ok["epoch"]
                    .as_str()
                    .with_context(|| format!("ok without epoch: {ok}"))?
                    .to_string(),
            );
            r.first = Some(seq);
            r.last = seq;
            r.after_ok = true;
        }
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            target.clone(),
            socket,
            record.clone(),
            head,
            stop.clone(),
        ));
        Ok(Self {
            channel: target.channel,
            record,
            taken: Mutex::new(Counters::default()),
            stop,
            task,
        })
    }

    /// The client's record, locked.
    pub fn record(&self) -> MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The counters that grew since the last call (catch-up times included).
    pub fn take_counters(&self) -> Counters {
        let r = self.record();
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        let delta = Counters {
            duplicates: r.duplicates - taken.duplicates,
            chain_breaks: r.chain_breaks - taken.chain_breaks,
            not_recovered: r.not_recovered - taken.not_recovered,
            resubscribes: r.resubscribes - taken.resubscribes,
            drains: r.drains - taken.drains,
            moves: r.moves - taken.moves,
            closes: r.closes - taken.closes,
            unavailable: r.unavailable - taken.unavailable,
            failed_attempts: r.failed_attempts - taken.failed_attempts,
            refused_subscribes: r.refused_subscribes - taken.refused_subscribes,
            replayed: r.replayed - taken.replayed,
            catchups: r.catchups[taken.catchups.len()..].to_vec(),
        };
        *taken = Counters {
            catchups: r.catchups.clone(),
            duplicates: r.duplicates,
            chain_breaks: r.chain_breaks,
            not_recovered: r.not_recovered,
            resubscribes: r.resubscribes,
            drains: r.drains,
            moves: r.moves,
            closes: r.closes,
            unavailable: r.unavailable,
            failed_attempts: r.failed_attempts,
            refused_subscribes: r.refused_subscribes,
            replayed: r.replayed,
        };
        delta
    }

    /// Stored positions on the client's channel in `(after, upto]` (and after its first
    /// `ok`) that it never received.
    pub fn lost(&self, published: &Published, after: u64, upto: u64) -> Vec<u64> {
        let r = self.record();
        let after = after.max(r.first.unwrap_or(u64::MAX));
        published
            .stored_between(&self.channel, after, upto)
            .into_iter()
            .filter(|(s, _)| !r.received.contains_key(s))
            .map(|(s, _)| s)
            .collect()
    }

    /// Positions received in `(after, upto]` that the stream did not store on this channel
    /// under the same counter (misrouted or corrupted).
    pub fn foreign(&self, published: &Published, after: u64, upto: u64) -> Vec<u64> {
        let stored: BTreeMap<u64, u64> = published
            .stored_between(&self.channel, after, upto)
            .into_iter()
            .collect();
        let r = self.record();
        r.received
            .range(after + 1..=upto)
            .filter(|(s, n)| stored.get(s) != Some(n))
            .map(|(s, _)| *s)
            .collect()
    }
}

/// Waits (at most `limit`) until every client has received up to `heads` on its channel,
/// or gave up. Returns the clients still behind, with how far they got.
pub async fn wait_caught_up(
    clients: &[ResumableClient],
    heads: &BTreeMap<String, u64>,
    limit: Duration,
) -> Vec<(usize, u64, u64)> {
    let deadline = Instant::now() + limit;
    loop {
        let behind: Vec<(usize, u64, u64)> = clients
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let want = heads.get(&c.channel).copied().unwrap_or(0);
                let r = c.record();
                (r.last < want).then_some((i, r.last, want))
            })
            .collect();
        if behind.is_empty() || Instant::now() >= deadline {
            return behind;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Opens `n` clients on `channels` (client `i` on `channels[i % len]`), `concurrency` at a
/// time, each with its own token from `token(i)`.
pub async fn open_clients(
    url: &str,
    channels: &[String],
    n: usize,
    token: impl Fn(usize) -> Result<String>,
    published: &Arc<Published>,
    concurrency: usize,
) -> Result<Vec<ResumableClient>> {
    let mut targets = Vec::with_capacity(n);
    for i in 0..n {
        targets.push(Target {
            url: url.to_string(),
            token: token(i)?,
            channel: channels[i % channels.len()].clone(),
        });
    }
    let opened: Vec<Result<ResumableClient>> = futures::stream::iter(targets)
        .map(|t| {
            let published = published.clone();
            let channel = t.channel.clone();
            async move {
                let head: Arc<dyn Fn() -> u64 + Send + Sync> =
                    Arc::new(move || published.head(&channel));
                // kube-proxy may still be programming an endpoint: a few tries.
                let mut last_err = None;
                for _ in 0..10 {
                    match ResumableClient::start(t.clone(), head.clone()).await {
                        Ok(c) => return Ok(c),
                        Err(e) => last_err = Some(e),
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no attempt")))
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    opened.into_iter().collect()
}

/// p50 and p99 of `d` (zero when empty) and its maximum.
pub fn percentiles(d: &[Duration]) -> (Duration, Duration, Duration) {
    if d.is_empty() {
        return (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    }
    let mut v = d.to_vec();
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.50), at(0.99), v[v.len() - 1])
}

/// Why a connection stopped being used.
enum End {
    Drain,
    Closed(String),
    Stop,
    GiveUp(String),
}

async fn run(
    target: Target,
    first: Socket,
    record: Arc<Mutex<Record>>,
    head: Arc<dyn Fn() -> u64 + Send + Sync>,
    stop: CancellationToken,
) {
    let lock = || record.lock().unwrap_or_else(|e| e.into_inner());
    let mut socket = Some(first);
    let mut failures = 0u32;
    let mut backoff = Duration::from_millis(100);
    loop {
        let ws = match socket.take() {
            Some(ws) => ws,
            None => {
                let since = {
                    let r = lock();
                    r.epoch.clone().map(|e| (e, r.last))
                };
                let attempt = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = connect_and_subscribe(&target, since.clone()) => a,
                };
                match attempt {
                    Ok((ws, ok)) => {
                        failures = 0;
                        backoff = Duration::from_millis(100);
                        let mut r = lock();
                        r.resubscribes += 1;
                        on_ok(&mut r, &ok, since.is_some(), &*head);
                        ws
                    }
                    Err(e) => {
                        failures += 1;
                        {
                            let mut r = lock();
                            r.failed_attempts += 1;
                            if failures >= MAX_FAILED_ATTEMPTS {
                                r.gave_up =
                                    Some(format!("{failures} failed attempts, last: {e:#}"));
                                return;
                            }
                        }
                        tracing::debug!(error = %format!("{e:#}"), "resumable client: attempt failed");
                        // Full jitter, as the SDK does.
                        let wait = backoff.mul_f64(rand::random::<f64>().max(0.1));
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(wait) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
        };
        match serve(ws, &target, &record, &*head, &stop).await {
            End::Stop => return,
            End::GiveUp(why) => {
                lock().gave_up = Some(why);
                return;
            }
            End::Drain => {
                let mut r = lock();
                r.drains += 1;
                r.lost_subscription();
            }
            End::Closed(why) => {
                tracing::debug!(%why, "resumable client: connection ended");
                let mut r = lock();
                r.closes += 1;
                r.lost_subscription();
            }
        }
    }
}

/// Applies the `ok` of a subscribe (a resume when `resumed`) to the record.
fn on_ok(r: &mut Record, ok: &Value, resumed: bool, head: &(dyn Fn() -> u64 + Send + Sync)) {
    let epoch = ok["epoch"].as_str().map(str::to_string);
    let seq = ok["seq"].as_u64();
    if resumed && ok["recovered"] != json!(true) {
        r.not_recovered += 1;
        r.anomaly(format!("resume from {} not recovered: {ok}", r.last));
        // Carry on from where the relay starts, as an app would after refetching.
        if let Some(seq) = seq {
            r.last = seq;
        }
    }
    if epoch.is_some() {
        r.epoch = epoch;
    }
    // A recovered resume replays from `since` (a message's position, or an earlier `ok`'s);
    // otherwise the relay starts at the `ok`'s position.
    if !(resumed && ok["recovered"] == json!(true)) {
        if let Some(seq) = seq {
            r.last = seq;
        }
        r.after_ok = true;
    }
    // Catch-up is measured from a loss only (not for the first subscribe).
    if let Some(since) = r.down_since.take() {
        r.catching_up = Some((since, head()));
        r.check_caught_up();
    }
}

/// Reads one connection until it ends; resubscribes on it after `unavailable`.
async fn serve(
    mut ws: Socket,
    target: &Target,
    record: &Mutex<Record>,
    head: &(dyn Fn() -> u64 + Send + Sync),
    stop: &CancellationToken,
) -> End {
    let lock = || record.lock().unwrap_or_else(|e| e.into_inner());
    let mut next_id = 100u64;
    // A subscribe in flight on this connection (after `unavailable` or a refusal).
    let mut pending: Option<u64> = None;
    let mut refused = 0u32;
    // Told to move (a rebalancing `drain`): the close that follows ends a drain.
    let mut moving = false;
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => return End::Stop,
            f = tokio::time::timeout(READ_TIMEOUT, ws.next()) => f,
        };
        let text = match frame {
            Err(_) => return End::Closed(format!("nothing read for {READ_TIMEOUT:?}")),
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(Message::Close(_)))) if moving => return End::Drain,
            Ok(Some(Ok(Message::Close(c)))) => return End::Closed(format!("close {c:?}")),
            Ok(Some(Err(e))) => return End::Closed(format!("{e}")),
            Ok(None) => return End::Closed("end of stream".into()),
            Ok(Some(Ok(_))) => continue,
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        match v["type"].as_str() {
            Some("message") if v["channel"] == target.channel.as_str() => {
                let mut r = lock();
                on_message(&mut r, &v);
            }
            Some("drain") if v["reason"] == "rebalance" => {
                // As the SDK does: stay until the relay closes at the turn (the turns pace the
                // moves), then resume elsewhere.
                lock().moves += 1;
                moving = true;
            }
            Some("drain") => {
                // Leave at once and resume elsewhere: with positions nothing is lost.
                let _ = ws.close(None).await;
                return End::Drain;
            }
            Some("unsubscribed") if v["channel"] == target.channel.as_str() => {
                let since = {
                    let mut r = lock();
                    if v["reason"] == "unavailable" {
                        r.unavailable += 1;
                    } else {
                        r.anomaly(format!("unsubscribed: {v}"));
                    }
                    r.lost_subscription();
                    r.epoch.clone().map(|e| (e, r.last))
                };
                next_id += 1;
                pending = Some(next_id);
                if let Err(e) = ws
                    .send(Message::text(
                        subscribe_frame(next_id, target, since).to_text(),
                    ))
                    .await
                {
                    return End::Closed(format!("resubscribe: {e}"));
                }
            }
            Some("ok") if pending.is_some() && v["id"].as_u64() == pending => {
                pending = None;
                refused = 0;
                let mut r = lock();
                r.resubscribes += 1;
                on_ok(&mut r, &v, true, head);
            }
            Some("error") if pending.is_some() && v["id"].as_u64() == pending => {
                refused += 1;
                let since = {
                    let mut r = lock();
                    r.refused_subscribes += 1;
                    if refused >= MAX_REFUSED_SUBSCRIBES {
                        return End::GiveUp(format!("{refused} subscribes refused, last: {v}"));
                    }
                    r.epoch.clone().map(|e| (e, r.last))
                };
                tokio::time::sleep(Duration::from_millis(250)).await;
                next_id += 1;
                pending = Some(next_id);
                if let Err(e) = ws
                    .send(Message::text(
                        subscribe_frame(next_id, target, since).to_text(),
                    ))
                    .await
                {
                    return End::Closed(format!("resubscribe: {e}"));
                }
            }
            Some("dropped") => lock().anomaly(format!("dropped: {v}")),
            _ => {}
        }
    }
}

fn on_message(r: &mut Record, v: &Value) {
    let (Some(seq), Some(prev)) = (v["seq"].as_u64(), v["prev"].as_u64()) else {
        r.chain_breaks += 1;
        r.anomaly(format!("message without a position: {v}"));
        return;
    };
    if seq <= r.last {
        r.duplicates += 1;
        if r.received.contains_key(&seq) {
            r.anomaly(format!("seq {seq} again (last {})", r.last));
        } else {
            r.anomaly(format!("seq {seq} below the last {} (reordered)", r.last));
            r.chain_breaks += 1;
        }
        return;
    }
    // The first message after an `ok` may follow a position the channel never had (an `ok`
    // gives a stream position): its predecessor on the channel is then at or below it.
    // After a message, the predecessor is that message.
    let chained = if r.after_ok {
        prev <= r.last
    } else {
        prev == r.last
    };
    if !chained {
        r.chain_breaks += 1;
        r.anomaly(format!(
            "seq {seq} has prev {prev}, last was {}{}",
            r.last,
            if r.after_ok { " (from an ok)" } else { "" }
        ));
    }
    r.after_ok = false;
    r.last = seq;
    if r.catching_up.is_some() {
        r.replayed += 1;
    }
    r.received
        .insert(seq, v["payload"]["n"].as_u64().unwrap_or(u64::MAX));
    r.check_caught_up();
}

fn subscribe_frame(id: u64, target: &Target, since: Option<(String, u64)>) -> Request {
    Request::Subscribe {
        id: Some(id),
        channel: target.channel.clone(),
        since: since.map(|(epoch, seq)| Since { epoch, seq }),
        token: None,
    }
}

/// Connects, reads `welcome`, subscribes (with `since` when given) and returns the socket
/// and the `ok`. A refused subscribe is an error.
async fn connect_and_subscribe(
    target: &Target,
    since: Option<(String, u64)>,
) -> Result<(Socket, Value)> {
    let sep = if target.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{sep}token={}", target.url, target.token);
    tokio::time::timeout(CONNECT_TIMEOUT, async {
        let (mut ws, _) = connect_async(url).await.context("WebSocket handshake")?;
        let welcome = next_json(&mut ws).await?;
        if welcome["type"] != "welcome" {
            bail!("expected welcome, got {welcome}");
        }
        ws.send(Message::text(subscribe_frame(1, target, since).to_text()))
            .await?;
        // The `ok` may follow messages of nothing else: this is the only subscription.
        let reply = next_json(&mut ws).await?;
        if reply["type"] != "ok" {
            bail!("subscribe to {} refused: {reply}", target.channel);
        }
        Ok((ws, reply))
    })
    .await
    .context("connect and subscribe timed out")?
}

async fn next_json(ws: &mut Socket) -> Result<Value> {
    Ok(read_value(ws).await?)
}

/// The figures of one case over all clients.
#[derive(Debug, Default)]
pub struct CaseFigures {
    pub clients: usize,
    /// Messages the stream stored during the case (all channels).
    pub messages: usize,
    /// Deliveries owed: for each client, the messages stored on its channel in the case.
    pub deliveries: usize,
    pub lost: usize,
    pub foreign: usize,
    pub counters: Counters,
    /// Clients that gave up.
    pub gave_up: Vec<String>,
    /// Clients still behind the stream at the end.
    pub behind: usize,
    pub anomalies: Vec<String>,
}

impl CaseFigures {
    /// Lost, duplicated, reordered or not recovered: what a resumable channel must never do.
    pub fn failed(&self) -> bool {
        self.lost > 0
            || self.foreign > 0
            || self.counters.duplicates > 0
            || self.counters.chain_breaks > 0
            || self.counters.not_recovered > 0
            || !self.gave_up.is_empty()
            || self.behind > 0
    }

    pub fn line(&self, case: &str) -> String {
        let (p50, p99, max) = percentiles(&self.counters.catchups);
        format!(
            "FIGURE {case}: {} clients, {} messages stored ({} deliveries owed), lost {}, duplicated {}, chain breaks {}, recovered:false {}, foreign {}; resubscribes {} (drain notices {}, closes {}, unavailable {}), failed connects {}, refused subscribes {}; {} messages received while catching up; reconnect-to-caught-up p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (n={})",
            self.clients,
            self.messages,
            self.deliveries,
            self.lost,
            self.counters.duplicates,
            self.counters.chain_breaks,
            self.counters.not_recovered,
            self.foreign,
            self.counters.resubscribes,
            self.counters.drains,
            self.counters.closes,
            self.counters.unavailable,
            self.counters.failed_attempts,
            self.counters.refused_subscribes,
            self.counters.replayed,
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            self.counters.catchups.len(),
        )
    }
}

/// Waits until every client caught up with `to`, then counts the case: what the stream
/// stored in `(from, to]` against what each client received, and the counters since the
/// previous case.
pub async fn tally(
    clients: &[ResumableClient],
    published: &Published,
    from: &BTreeMap<String, u64>,
    to: &BTreeMap<String, u64>,
    limit: Duration,
) -> CaseFigures {
    let behind = wait_caught_up(clients, to, limit).await;
    let mut f = CaseFigures {
        clients: clients.len(),
        messages: published.count_between(from, to),
        behind: behind.len(),
        ..Default::default()
    };
    for (i, last, want) in behind.iter().take(5) {
        f.anomalies
            .push(format!("client {i} behind: at {last}, stream at {want}"));
    }
    let mut channels = BTreeSet::new();
    for (i, c) in clients.iter().enumerate() {
        channels.insert(c.channel.clone());
        let after = from.get(&c.channel).copied().unwrap_or(0);
        let upto = to.get(&c.channel).copied().unwrap_or(0);
        let owed = {
            let first = c.record().first.unwrap_or(u64::MAX);
            published
                .stored_between(&c.channel, after.max(first), upto)
                .len()
        };
        f.deliveries += owed;
        let lost = c.lost(published, after, upto);
        if !lost.is_empty() && f.anomalies.len() < 10 {
            f.anomalies.push(format!(
                "client {i} ({}) lost {} messages, first {:?}",
                c.channel,
                lost.len(),
                &lost[..lost.len().min(5)]
            ));
        }
        f.lost += lost.len();
        f.foreign += c.foreign(published, after, upto).len();
        f.counters.add(&c.take_counters());
        let mut r = c.record();
        if let Some(why) = &r.gave_up {
            f.gave_up.push(format!("client {i}: {why}"));
        }
        for a in std::mem::take(&mut r.anomalies) {
            if f.anomalies.len() < 10 {
                f.anomalies.push(format!("client {i}: {a}"));
            }
        }
    }
    f
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn msg(seq: u64, prev: u64) -> Value {
        json!({"type": "message", "channel": "c", "seq": seq, "prev": prev, "payload": {"n": seq}})
    }

    fn fresh(ok_seq: u64) -> Record {
        let mut r = Record::default();
        on_ok(
            &mut r,
            &json!({"type": "ok", "id": 1, "epoch": "e", "seq": ok_seq}),
            false,
            &|| 0,
        );
        r
    }

    #[test]
    fn the_first_message_after_an_ok_may_follow_an_earlier_position() {
        // An ok gives a stream position; the channel's last message may be older.
        let mut r = fresh(5);
        on_message(&mut r, &msg(8, 3));
        on_message(&mut r, &msg(9, 8));
        assert_eq!((r.chain_breaks, r.duplicates, r.last), (0, 0, 9));
        // But not a later one: that message's predecessor was never delivered.
        let mut r = fresh(5);
        on_message(&mut r, &msg(8, 6));
        assert_eq!(r.chain_breaks, 1);
    }

    #[test]
    fn holes_duplicates_and_reorders_are_counted() {
        let mut r = fresh(0);
        on_message(&mut r, &msg(1, 0));
        on_message(&mut r, &msg(4, 2)); // 2 never arrived
        assert_eq!(r.chain_breaks, 1);
        on_message(&mut r, &msg(4, 2)); // again
        assert_eq!((r.duplicates, r.chain_breaks), (1, 1));
        on_message(&mut r, &msg(3, 1)); // late: below the last
        assert_eq!((r.duplicates, r.chain_breaks), (2, 2));
        assert_eq!(r.received.keys().copied().collect::<Vec<_>>(), vec![1, 4]);
    }

    #[test]
    fn a_recovered_resume_continues_the_chain_and_a_lost_one_is_counted() {
        let mut r = fresh(0);
        on_message(&mut r, &msg(1, 0));
        r.lost_subscription();
        let ok = json!({"type": "ok", "id": 2, "epoch": "e", "seq": 1, "recovered": true});
        on_ok(&mut r, &ok, true, &|| 3);
        on_message(&mut r, &msg(2, 1));
        assert!(r.catching_up.is_some(), "not caught up before the head");
        on_message(&mut r, &msg(3, 2));
        assert_eq!((r.chain_breaks, r.not_recovered, r.replayed), (0, 0, 2));
        assert_eq!(r.catchups.len(), 1);
        // After a recovered resume the next message must follow the last one exactly.
        r.lost_subscription();
        on_ok(&mut r, &ok, true, &|| 0);
        on_message(&mut r, &msg(5, 4));
        assert_eq!(r.chain_breaks, 1);
        // recovered: false is a failure, and the relay's position is taken.
        let not = json!({"type": "ok", "id": 3, "epoch": "f", "seq": 9, "recovered": false});
        on_ok(&mut r, &not, true, &|| 0);
        assert_eq!((r.not_recovered, r.last), (1, 9));
    }
}
