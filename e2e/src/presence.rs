//! A presence member for the e2e suites (issue 26, docs/protocol.md section 10): it connects
//! with a JWT, subscribes to one channel with `presence: true`, and records every `join` and
//! `leave` frame the relay sends it, with when it came. On a `drain` notice it opens its new
//! connection and subscribes there before it drops the old one (make before break, as
//! docs/protocol.md section 5 advises: the member is never away); after an unexpected close
//! it reconnects with backoff while `reconnect` is on, and otherwise counts itself gone (the
//! member left with its relay).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use wsrelay_testkit::client::Ws;

/// How long one connect-and-subscribe attempt may take before it counts as failed.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a member keeps trying its first connection.
const FIRST_CONNECTION_WITHIN: Duration = Duration::from_secs(30);

/// A presence frame the relay sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Join,
    Leave,
}

/// One `join` or `leave`, when it arrived.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub kind: Kind,
    pub key: String,
}

/// What a member saw, shared with the test.
#[derive(Debug)]
pub struct State {
    events: Mutex<Vec<Seen>>,
    /// Reconnect after an unexpected close (else the member is gone).
    pub reconnect: AtomicBool,
    /// When the member's connection ended for good (`reconnect` off).
    gone_at: Mutex<Option<Instant>>,
    /// Subscriptions confirmed, the first one included.
    pub subscribed: AtomicU32,
    /// The last snapshot's `users`.
    pub users: AtomicU32,
    /// Connect or subscribe attempts that failed.
    pub failed_attempts: AtomicU32,
}

impl State {
    /// The joins and leaves seen since `since`.
    pub fn seen_since(&self, since: Instant) -> Vec<Seen> {
        self.events
            .lock()
            .expect("events lock")
            .iter()
            .filter(|s| s.at >= since)
            .cloned()
            .collect()
    }

    /// How many joins and leaves it has seen.
    pub fn seen_count(&self) -> usize {
        self.events.lock().expect("events lock").len()
    }

    /// When the member left for good, if it did.
    pub fn gone_at(&self) -> Option<Instant> {
        *self.gone_at.lock().expect("gone lock")
    }
}

/// A running member; stopped when dropped.
#[derive(Debug)]
pub struct Member {
    pub key: String,
    pub channel: String,
    pub state: Arc<State>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

/// Where and as whom a member connects: the fleet subscriber's target.
pub use crate::subscriber::Target;

/// Connects and subscribes with presence, returns once the first snapshot came, then keeps
/// the membership alive in the background.
pub async fn start(key: &str, target: Target) -> Result<Member> {
    let state = Arc::new(State {
        events: Mutex::new(Vec::new()),
        reconnect: AtomicBool::new(true),
        gone_at: Mutex::new(None),
        subscribed: AtomicU32::new(0),
        users: AtomicU32::new(0),
        failed_attempts: AtomicU32::new(0),
    });
    // The first connection may meet a Service whose rules the node is still writing ("no
    // route to host"): a few tries, within a bound.
    let deadline = Instant::now() + FIRST_CONNECTION_WITHIN;
    let socket = loop {
        match connect_and_subscribe(&target, &state).await {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "presence member: first attempt failed");
                state.failed_attempts.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("first connection of {key} to {}", target.url));
            }
        }
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(supervise(
        target.clone(),
        socket,
        state.clone(),
        stop.clone(),
    ));
    Ok(Member {
        key: key.to_owned(),
        channel: target.channel,
        state,
        stop,
        task,
    })
}

/// How a connection's reading ended.
enum End {
    /// A drain notice: the connection, still open, until the new one is in place.
    Drain(Box<Ws>),
    Closed,
    Stopped,
}

async fn supervise(target: Target, first: Ws, state: Arc<State>, stop: CancellationToken) {
    let mut socket = Some(first);
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(current) = socket.take() else {
            if !state.reconnect.load(Ordering::SeqCst) {
                *state.gone_at.lock().expect("gone lock") = Some(Instant::now());
                return;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                attempt = connect_and_subscribe(&target, &state) => match attempt {
                    Ok(s) => {
                        backoff = Duration::from_millis(100);
                        socket = Some(s);
                    }
                    Err(e) => {
                        state.failed_attempts.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(error = %e, "presence member: attempt failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                },
            }
            continue;
        };
        match read(current, &state, &stop).await {
            End::Stopped => return,
            End::Closed => {}
            // The old connection stays open (unread) until the new one is subscribed.
            End::Drain(_old) => loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    attempt = connect_and_subscribe(&target, &state) => match attempt {
                        Ok(s) => {
                            socket = Some(s);
                            break;
                        }
                        Err(_) => {
                            state.failed_attempts.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    },
                }
            },
        }
    }
}

/// Reads one connection until it closes or announces a drain, recording joins and leaves.
async fn read(mut socket: Ws, state: &State, stop: &CancellationToken) -> End {
    loop {
        let frame = tokio::select! {
            () = stop.cancelled() => return End::Stopped,
            frame = socket.next() => frame,
        };
        let text = match frame {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_)) | Err(_)) | None => return End::Closed,
            Some(Ok(_)) => continue,
        };
        let Ok(frame) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let kind = match frame["type"].as_str() {
            Some("join") => Kind::Join,
            Some("leave") => Kind::Leave,
            Some("drain") => return End::Drain(Box::new(socket)),
            _ => continue,
        };
        if let Some(key) = frame["member"]["key"].as_str() {
            state.events.lock().expect("events lock").push(Seen {
                at: Instant::now(),
                kind,
                key: key.to_owned(),
            });
        }
    }
}

/// Opens a connection, reads `welcome`, subscribes with presence and waits for the `ok`
/// with its snapshot.
async fn connect_and_subscribe(target: &Target, state: &State) -> Result<Ws> {
    let ws = tokio::time::timeout(ATTEMPT_TIMEOUT, async {
        let (mut ws, _) = connect_async(target.url_with_token())
            .await
            .context("WebSocket handshake")?;
        let subscribe =
            json!({"type": "subscribe", "id": 1, "channel": target.channel, "presence": true});
        ws.send(Message::text(subscribe.to_string())).await?;
        loop {
            let Some(frame) = ws.next().await else {
                bail!("closed before the subscribe's answer");
            };
            let Message::Text(text) = frame? else {
                continue;
            };
            let v: Value = serde_json::from_str(&text)?;
            match v["type"].as_str() {
                Some("ok") if v["id"] == 1 => {
                    let users = v["presence"]["users"]
                        .as_u64()
                        .context("ok without presence")?;
                    state
                        .users
                        .store(u32::try_from(users).unwrap_or(u32::MAX), Ordering::Relaxed);
                    return Ok(ws);
                }
                Some("error") => bail!("subscribe to {} refused: {v}", target.channel),
                _ => {}
            }
        }
    })
    .await
    .context("connect and subscribe timed out")??;
    state.subscribed.fetch_add(1, Ordering::Relaxed);
    Ok(ws)
}

/// Starts members `range`, `parallel` at a time: member `i` is `m{i}` on channel
/// `channels[i % channels.len()]`, with the token `token(i)`.
pub async fn open_members(
    url: &str,
    channels: &[String],
    range: std::ops::Range<usize>,
    token: impl Fn(usize) -> Result<String>,
    parallel: usize,
) -> Result<Vec<Member>> {
    let targets: Vec<(String, Target)> = range
        .map(|i| {
            Ok((
                format!("m{i}"),
                Target {
                    url: url.to_owned(),
                    token: token(i)?,
                    channel: channels[i % channels.len()].clone(),
                },
            ))
        })
        .collect::<Result<_>>()?;
    let members: Vec<Result<Member>> = futures::stream::iter(targets)
        .map(|(key, target)| async move { start(&key, target).await })
        .buffered(parallel)
        .collect()
        .await;
    members.into_iter().collect()
}
