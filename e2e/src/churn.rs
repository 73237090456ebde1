//! Lifecycle events under churn (issue 27): clients that connect, subscribe, unsubscribe, leave
//! (a clean close or a dropped TCP connection), and come back naming their old connection in
//! `?resume=` (docs/protocol.md section 1), some within the gateway's `events.graceSeconds`
//! and some after it; and the [`Ledger`] that checks what the events stream holds against
//! the invariant of docs/backend.md: every chain of connections (a `Connected`, then the
//! `Resumed` that follow it) ends with exactly one `Disconnected`, or is still open.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;
use wsrelay_testkit::client::Ws;

/// Bound on one connection attempt (the handshake and the `welcome`).
const ATTEMPT_WITHIN: Duration = Duration::from_secs(10);

/// Bound on the close handshake of a clean close.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

/// What the events stream says of the connections, per connection id.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Events that start a connection: its `Connected`, or the `Resumed` it said.
    pub starts: BTreeMap<String, u32>,
    /// Events that end one: its `Disconnected`, or a `Resumed` naming it `previous`.
    pub ends: BTreeMap<String, u32>,
    /// Each resuming connection's `previous`.
    pub resumed: BTreeMap<String, String>,
    pub connected: usize,
    pub resumes: usize,
    pub disconnected: usize,
    /// `Disconnected` said for a dead relay.
    pub relay_lost: usize,
    /// `Disconnected` after the control service's `disconnect` with `reconnect: false`.
    pub kicked: usize,
    /// `Subscribed` and `Unsubscribed`.
    pub subscriptions: usize,
    /// Per channel, its `Occupied` (true) and `Vacated` (false) by their `revision`.
    pub occupancy: BTreeMap<String, BTreeMap<u64, bool>>,
}

impl Ledger {
    /// Counts one event.
    pub fn add(&mut self, e: &Value) {
        let conn = e["connection"].as_str().unwrap_or_default().to_owned();
        match e["type"].as_str() {
            Some("Connected") => {
                self.connected += 1;
                *self.starts.entry(conn).or_default() += 1;
            }
            Some("Resumed") => {
                self.resumes += 1;
                let previous = e["previous"].as_str().unwrap_or_default().to_owned();
                *self.ends.entry(previous.clone()).or_default() += 1;
                *self.starts.entry(conn.clone()).or_default() += 1;
                self.resumed.insert(conn, previous);
            }
            Some("Disconnected") => {
                self.disconnected += 1;
                self.relay_lost += usize::from(e["reason"] == "relay_lost");
                self.kicked += usize::from(e["reason"] == "disconnect" && e["closeCode"] == 4101);
                *self.ends.entry(conn).or_default() += 1;
            }
            Some("Subscribed" | "Unsubscribed") => self.subscriptions += 1,
            Some(kind @ ("Occupied" | "Vacated")) => {
                let channel = e["channel"].as_str().unwrap_or_default().to_owned();
                let revision = e["revision"].as_u64().unwrap_or_default();
                self.occupancy
                    .entry(channel)
                    .or_default()
                    .insert(revision, kind == "Occupied");
            }
            _ => {}
        }
    }

    /// What breaks the invariant whatever is still open: a connection started or ended twice
    /// (a duplicate), or ended without a start (a lost `Connected`).
    pub fn faults(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (c, n) in &self.starts {
            if *n > 1 {
                out.push(format!("{c} started {n} times"));
            }
        }
        for (c, n) in &self.ends {
            if *n > 1 {
                out.push(format!("{c} ended {n} times"));
            }
            if !self.starts.contains_key(c) {
                out.push(format!("{c} ended, never started"));
            }
        }
        for (channel, events) in &self.occupancy {
            // Occupied, Vacated, Occupied...: the n-th is Occupied exactly when n is even.
            if let Some((i, _)) = events
                .values()
                .enumerate()
                .find(|(i, occupied)| **occupied != (i % 2 == 0))
            {
                out.push(format!(
                    "{channel}: event {i} breaks Occupied/Vacated alternation"
                ));
            }
        }
        out
    }

    /// Whether `channel`'s last event (by revision) is `Vacated`: nobody holds it.
    pub fn vacated(&self, channel: &str) -> bool {
        self.occupancy
            .get(channel)
            .and_then(|e| e.values().next_back())
            == Some(&false)
    }

    /// The connections started and not ended: the chains still open.
    pub fn open(&self) -> usize {
        self.starts
            .keys()
            .filter(|c| !self.ends.contains_key(*c))
            .count()
    }
}

/// One connection a churning client made.
#[derive(Debug, Clone)]
pub struct Record {
    /// Its id, from its `welcome`.
    pub connection: String,
    /// The connection it named in `?resume=`.
    pub asked: Option<String>,
    /// What its `welcome` said.
    pub resumed: bool,
    /// How long after the asked connection ended it was opened.
    pub away: Option<Duration>,
}

/// What the churning clients did.
#[derive(Debug, Default)]
pub struct Churned {
    pub records: Vec<Record>,
    /// Attempts that did not reach `welcome` (a relay restarting, refusals).
    pub failed_attempts: usize,
    /// Connections the relay ended (a drain, a killed relay).
    pub ended_by_relay: usize,
}

/// Runs `tokens.len()` clients against `url` until `until`: each connects (naming its last
/// connection in `?resume=`), subscribes to one or two of `channels`, stays 0.5 to 6 s
/// (unsubscribing from one half the time), leaves with a clean close or by dropping its TCP
/// connection, and stays away for up to twice `grace`; after a drain notice or a connection
/// the relay ended it comes back at once. Every connection is closed at the end.
pub async fn churn(
    url: &str,
    tokens: Vec<String>,
    channels: &[String],
    grace: Duration,
    until: Instant,
) -> Churned {
    let tasks: Vec<_> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, token)| {
            let target = format!("{url}?token={token}");
            let channels = channels.to_vec();
            tokio::spawn(client(target, channels, grace, until, i as u64))
        })
        .collect();
    let mut all = Churned::default();
    for t in tasks {
        if let Ok(c) = t.await {
            all.records.extend(c.records);
            all.failed_attempts += c.failed_attempts;
            all.ended_by_relay += c.ended_by_relay;
        }
    }
    all
}

/// How one connection ended.
enum Left {
    /// The client's turn to leave.
    Done,
    /// The relay ended it or announced a drain: come back now.
    ByRelay,
}

async fn client(
    target: String,
    channels: Vec<String>,
    grace: Duration,
    until: Instant,
    seed: u64,
) -> Churned {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Churned::default();
    // A start spread over the first two seconds.
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..2000))).await;
    let mut last: Option<(String, Instant)> = None;
    while Instant::now() < until {
        let url = match &last {
            Some((c, _)) => format!("{target}&resume={}", c.replace('/', "%2F")),
            None => target.clone(),
        };
        let opened = Instant::now();
        let Ok(Ok((mut ws, welcome))) = tokio::time::timeout(ATTEMPT_WITHIN, open(&url)).await
        else {
            out.failed_attempts += 1;
            tokio::time::sleep(Duration::from_millis(rng.random_range(200..1000))).await;
            continue;
        };
        let connection = welcome["connection"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        out.records.push(Record {
            connection: connection.clone(),
            asked: last.as_ref().map(|(c, _)| c.clone()),
            resumed: welcome["resumed"] == true,
            away: last
                .as_ref()
                .map(|(_, at)| opened.saturating_duration_since(*at)),
        });
        let left = session(&mut ws, &channels, &mut rng, until).await;
        last = Some((connection, Instant::now()));
        match left {
            Left::ByRelay => {
                out.ended_by_relay += 1;
                drop(ws);
            }
            Left::Done => {
                if rng.random_bool(0.6) {
                    let _ = tokio::time::timeout(CLOSE_WITHIN, ws.close(None)).await;
                }
                drop(ws);
                let away = rng.random_range(0..2 * grace.as_millis() as u64);
                let away = Duration::from_millis(away)
                    .min(until.saturating_duration_since(Instant::now()));
                tokio::time::sleep(away).await;
            }
        }
    }
    out
}

/// Opens a connection and reads its `welcome`.
async fn open(url: &str) -> Result<(Ws, Value)> {
    let (mut ws, _) = connect_async(url).await.context("WebSocket handshake")?;
    loop {
        let Some(frame) = ws.next().await else {
            anyhow::bail!("closed before the welcome");
        };
        if let Message::Text(t) = frame? {
            let v: Value = serde_json::from_str(&t)?;
            anyhow::ensure!(v["type"] == "welcome", "not a welcome: {v}");
            return Ok((ws, v));
        }
    }
}

/// Subscribes, stays, and says how the connection ended.
async fn session(ws: &mut Ws, channels: &[String], rng: &mut StdRng, until: Instant) -> Left {
    let n = rng.random_range(1..=2);
    let mine: Vec<&String> = (0..n)
        .map(|_| &channels[rng.random_range(0..channels.len())])
        .collect();
    for (id, c) in mine.iter().enumerate() {
        let f = json!({"type": "subscribe", "id": id, "channel": c});
        if ws.send(Message::text(f.to_string())).await.is_err() {
            return Left::ByRelay;
        }
    }
    let stay = Duration::from_millis(rng.random_range(500..6000));
    let end = (Instant::now() + stay).min(until);
    let unsubscribe_at = rng.random_bool(0.5).then(|| Instant::now() + stay / 2);
    loop {
        let wake = unsubscribe_at
            .filter(|at| *at > Instant::now())
            .unwrap_or(end);
        let frame = match tokio::time::timeout_at(wake.into(), ws.next()).await {
            Err(_) if wake == end => return Left::Done,
            Err(_) => {
                let f = json!({"type": "unsubscribe", "id": 9, "channel": mine[0]});
                if ws.send(Message::text(f.to_string())).await.is_err() {
                    return Left::ByRelay;
                }
                continue;
            }
            Ok(f) => f,
        };
        match frame {
            Some(Ok(Message::Text(t))) => {
                if serde_json::from_str::<Value>(&t).is_ok_and(|v| v["type"] == "drain") {
                    let _ = tokio::time::timeout(CLOSE_WITHIN, ws.close(None)).await;
                    return Left::ByRelay;
                }
            }
            Some(Ok(Message::Close(_)) | Err(_)) | None => return Left::ByRelay,
            Some(Ok(_)) => {}
        }
    }
}

/// The ledger of everything `stream` holds now, read with an ordered consumer (bounded).
pub async fn read_ledger(js: &async_nats::jetstream::Context, stream: &str) -> Result<Ledger> {
    use async_nats::jetstream::consumer;
    let s = js.get_stream(stream).await.context("the events stream")?;
    let consumer = s
        .create_consumer(consumer::push::OrderedConfig {
            deliver_subject: js.client().new_inbox(),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut ledger = Ledger::default();
    if consumer.cached_info().num_pending == 0 {
        return Ok(ledger);
    }
    let mut messages = consumer.messages().await?;
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(m) = messages.next().await {
            let m = m?;
            if let Ok(e) = serde_json::from_slice::<Value>(&m.payload) {
                ledger.add(&e);
            }
            if m.info().map_err(|e| anyhow::anyhow!("{e}"))?.pending == 0 {
                break;
            }
        }
        anyhow::Ok(())
    })
    .await
    .context("reading the events stream took over 60 s")??;
    Ok(ledger)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: &str, conn: &str, previous: Option<&str>) -> Value {
        let mut e = json!({"type": kind, "connection": conn});
        if let Some(p) = previous {
            e["previous"] = json!(p);
        }
        e
    }

    #[test]
    fn a_chain_ends_once_and_a_resume_renames_it() {
        let mut l = Ledger::default();
        for e in [
            ev("Connected", "a/1", None),
            ev("Resumed", "b/1", Some("a/1")),
            ev("Subscribed", "b/1", None),
            ev("Connected", "a/2", None),
            ev("Disconnected", "b/1", None),
        ] {
            l.add(&e);
        }
        let occ = |kind: &str, revision: u64| json!({"type": kind, "channel": "c", "revision": revision, "relay": "a"});
        // Published out of order by two relays: ordered by revision.
        for e in [occ("Occupied", 3), occ("Occupied", 9), occ("Vacated", 5)] {
            l.add(&e);
        }
        assert!(l.faults().is_empty(), "{:?}", l.faults());
        assert!(!l.vacated("c"));
        l.add(&occ("Vacated", 12));
        assert!(l.vacated("c"));
        assert_eq!(l.open(), 1, "a/2");
        assert_eq!((l.connected, l.resumes, l.disconnected), (2, 1, 1));
        // A Disconnected for a resumed connection is a second end; one never started is lost.
        l.add(&ev("Disconnected", "a/1", None));
        l.add(&ev("Disconnected", "c/9", None));
        l.add(&ev("Connected", "a/2", None));
        l.add(&occ("Vacated", 20));
        assert_eq!(
            l.faults(),
            [
                "a/2 started 2 times",
                "a/1 ended 2 times",
                "c/9 ended, never started",
                "c: event 4 breaks Occupied/Vacated alternation"
            ]
        );
    }
}
