//! A well-behaved wsrelay client for the fleet tests: it connects with a JWT, subscribes to
//! one channel and records the sequence numbers of the messages it receives. When its relay
//! announces a drain it opens a new connection at once and subscribes there before the old
//! one closes (make before break), as docs/protocol.md advises; when a connection drops
//! without warning it reconnects with backoff. What it records tells a test how many
//! messages a rollout cost.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use wsrelay_testkit::client::{Frame, Request, Ws, read_frame};

type Socket = Ws;

/// How long one connect-and-subscribe attempt may take before it counts as failed.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a subscriber saw, shared with the test.
#[derive(Debug, Default)]
pub struct Stats {
    received: Mutex<BTreeSet<u64>>,
    /// Connections that reached `ok` for the subscription (the first one included).
    pub subscribed: AtomicU32,
    /// `drain` notices received.
    pub drains: AtomicU32,
    /// Connections that ended without a drain notice.
    pub unexpected_closes: AtomicU32,
    /// Connect or subscribe attempts that failed.
    pub failed_attempts: AtomicU32,
}

impl Stats {
    /// The sequence numbers received so far (each once, however often it arrived).
    pub fn received(&self) -> BTreeSet<u64> {
        self.received.lock().expect("stats lock").clone()
    }

    /// How many of `published` never arrived.
    pub fn missing(&self, published: impl IntoIterator<Item = u64>) -> usize {
        let received = self.received.lock().expect("stats lock");
        published
            .into_iter()
            .filter(|s| !received.contains(s))
            .count()
    }
}

/// A running subscriber; stopped when dropped.
#[derive(Debug)]
pub struct Subscriber {
    pub stats: Arc<Stats>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

/// Where and as whom a subscriber connects.
#[derive(Clone, Debug)]
pub struct Target {
    /// `ws://host:port/path` without the token.
    pub url: String,
    pub token: String,
    pub channel: String,
}

impl Target {
    /// The URL with the token as the `token` query parameter.
    pub fn url_with_token(&self) -> String {
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}token={}", self.url, self.token)
    }
}

/// Connects, subscribes and returns once the first subscription is confirmed, then keeps
/// the subscription alive in the background.
pub async fn start(target: Target) -> Result<Subscriber> {
    let stats = Arc::new(Stats::default());
    let socket = connect_and_subscribe(&target)
        .await
        .with_context(|| format!("first connection to {}", target.url))?;
    stats.subscribed.fetch_add(1, Ordering::Relaxed);
    let stop = CancellationToken::new();
    let task = tokio::spawn(supervise(target, socket, stats.clone(), stop.clone()));
    Ok(Subscriber { stats, stop, task })
}

/// Why a connection's reader stopped being the current one.
enum Event {
    Drain,
    Closed,
}

/// Keeps exactly one current connection: replaces it at once on a drain notice (the old one
/// keeps reading until the relay closes it) and with backoff after an unexpected close.
async fn supervise(target: Target, first: Socket, stats: Arc<Stats>, stop: CancellationToken) {
    let mut socket = Some(first);
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(current) = socket.take() else {
            tokio::select! {
                _ = stop.cancelled() => return,
                attempt = connect_and_subscribe(&target) => match attempt {
                    Ok(s) => {
                        stats.subscribed.fetch_add(1, Ordering::Relaxed);
                        backoff = Duration::from_millis(100);
                        socket = Some(s);
                    }
                    Err(e) => {
                        stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(error = %e, "subscriber: attempt failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                },
            }
            continue;
        };
        let (events, mut next) = mpsc::channel(2);
        tokio::spawn(read(current, stats.clone(), events, stop.clone()));
        tokio::select! {
            _ = stop.cancelled() => return,
            event = next.recv() => match event {
                Some(Event::Drain) => stats.drains.fetch_add(1, Ordering::Relaxed),
                Some(Event::Closed) | None => stats.unexpected_closes.fetch_add(1, Ordering::Relaxed),
            },
        };
    }
}

/// Reads one connection until it closes, recording `{"seq": n}` payloads.
async fn read(
    mut socket: Socket,
    stats: Arc<Stats>,
    events: mpsc::Sender<Event>,
    stop: CancellationToken,
) {
    let mut drained = false;
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => return,
            frame = socket.next() => frame,
        };
        let text = match frame {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
            Some(Ok(_)) => continue,
        };
        let Ok(frame) = serde_json::from_str::<Frame>(&text) else {
            continue;
        };
        match frame {
            Frame::Message {
                payload: Some(p), ..
            } => {
                if let Some(seq) = p["seq"].as_u64() {
                    stats.received.lock().expect("stats lock").insert(seq);
                }
            }
            Frame::Drain { .. } if !drained => {
                drained = true;
                let _ = events.try_send(Event::Drain);
            }
            _ => {}
        }
    }
    if !drained {
        let _ = events.try_send(Event::Closed);
    }
}

/// Opens a connection, reads `welcome`, subscribes and waits for `ok`.
pub async fn connect_and_subscribe(target: &Target) -> Result<Socket> {
    tokio::time::timeout(ATTEMPT_TIMEOUT, async {
        let (mut ws, _) = connect_async(target.url_with_token())
            .await
            .context("WebSocket handshake")?;
        let welcome = read_frame(&mut ws).await?;
        if !matches!(welcome, Frame::Welcome { .. }) {
            bail!("expected welcome, got {welcome:?}");
        }
        let request = Request::subscribe(1, &target.channel);
        ws.send(Message::text(request.to_text())).await?;
        let reply = read_frame(&mut ws).await?;
        if !matches!(reply, Frame::Ok { .. }) {
            bail!("subscribe to {} refused: {reply:?}", target.channel);
        }
        Ok(ws)
    })
    .await
    .context("connect and subscribe timed out")?
}
