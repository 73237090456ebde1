//! Rebalancing (docs/autoscaling.md, "Rebalancing"): moving connections off relay pods that
//! hold well above the fleet's mean, for gateways with `spec.rebalance.enabled`.
//!
//! [`decide`] is the pure decision (counts, readiness, rollout and HPA state, and the memory
//! of earlier ticks in; a round or the reason to wait out), [`observe`] reads the gateway's
//! objects into its input, [`summary`] says a decision as the `Rebalancing` condition.
//! [`Rebalancer`] is the edge: it runs in the leader beside the controller, ticks every
//! [`TICK`], reads the controller's watch caches and the shared relay [`Scraper`], and for a
//! round POSTs `/rebalance` to each hot relay's admin port. It writes no status itself: it
//! keeps each gateway's last [`Summary`] in [`Summaries`], which the controller's status
//! stage reads, and wakes the gateway's reconcile when the condition's reason changes.

pub mod decide;
pub mod observe;
pub mod summary;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::mpsc::Sender;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Deserialize;
use serde_json::json;

use crate::api::WebsocketGateway;
use crate::controller::Context;
use crate::fetch::{self, Caches};
use crate::metrics_api::scrape::{self, ScrapeError, Scraper, post};
use decide::{Decision, Memory, Move, Round};
pub use summary::Summary;

/// How often each rebalanced gateway is looked at. The relays' counts come from the shared
/// scraper, whose cache (2 s by default) is shorter, so each tick reads fresh counts.
pub const TICK: Duration = Duration::from_secs(5);
/// Bound on one relay's answer to `POST /rebalance` (it only picks connections and answers;
/// the moves happen after).
pub const POST_TIMEOUT: Duration = Duration::from_secs(5);
/// The relay admin path of a round.
pub const PATH: &str = "/rebalance";
/// Reconcile wake-ups waiting for the controller; when full, the resync shows the
/// condition instead.
pub const TRIGGER_BUFFER: usize = 64;

/// Outcomes of a round, the label `result` of `wsrelay_operator_rebalance_rounds_total`:
/// every relay asked took it, some did, none did.
pub const RESULTS: &[&str] = &["ok", "partial", "failed"];

/// Label of `wsrelay_operator_rebalance_rounds_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoundLabels {
    pub result: &'static str,
}

/// The rebalancer's counters, registered with the operator's metrics.
#[derive(Debug, Clone, Default)]
pub struct RebalanceMetrics {
    /// `wsrelay_operator_rebalance_rounds_total{result}`.
    pub rounds: Family<RoundLabels, Counter>,
    /// `wsrelay_operator_rebalance_moves_requested_total`: connections relays were asked
    /// to move (what they picked may be fewer).
    pub moves_requested: Counter,
}

/// Each gateway's last decision as the condition shows it, by `namespace/name`: written by
/// the rebalancer, read by the status stage (the one status writer).
#[derive(Debug, Default)]
pub struct Summaries(Mutex<HashMap<String, Summary>>);

impl Summaries {
    pub fn get(&self, gateway: &str) -> Option<Summary> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(gateway)
            .cloned()
    }

    /// Stores `summary`; whether the condition changed enough to write the status now: its
    /// reason or status changed, or `new_round` (a round's moves are news whatever the
    /// reason was).
    pub fn set(&self, gateway: &str, summary: Summary, new_round: bool) -> bool {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let changed = map
            .get(gateway)
            .is_none_or(|s| s.reason != summary.reason || s.active != summary.active);
        map.insert(gateway.to_string(), summary);
        changed || new_round
    }

    fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| keep(k));
    }
}

/// Why one relay did not take its part of a round.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Unreachable(#[source] ScrapeError),
    #[error("busy: a round or a drain is already under way (409)")]
    Busy,
    #[error("refused with HTTP {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("unreadable answer {body:?}: {source}")]
    BadAnswer {
        body: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A relay's answer to `POST /rebalance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Took {
    /// Connections it will move (at most the shed asked: only those it may move).
    pub picked: u64,
    /// Connections it could have moved.
    pub eligible: u64,
    #[serde(default)]
    pub window_ms: u64,
}

/// The body of `POST /rebalance` for one move.
pub fn body(m: &Move, window: Duration, include_plain_channels: bool) -> serde_json::Value {
    json!({
        "shed": m.shed,
        "windowMs": u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
        "includePlainChannels": include_plain_channels,
    })
}

/// Asks the relay at `addr` to take its part `m` of a round, bounded by `timeout`.
pub async fn ask(
    addr: SocketAddr,
    m: &Move,
    window: Duration,
    include_plain_channels: bool,
    timeout: Duration,
) -> Result<Took, AskError> {
    let body = body(m, window, include_plain_channels);
    let (status, answer) = tokio::time::timeout(timeout, post(addr, PATH, Some(&body)))
        .await
        .map_err(|_| AskError::Timeout(timeout))?
        .map_err(AskError::Unreachable)?;
    match status {
        200 => serde_json::from_str(&answer).map_err(|source| AskError::BadAnswer {
            body: answer.trim().to_string(),
            source,
        }),
        409 => Err(AskError::Busy),
        status => Err(AskError::Refused {
            status,
            body: answer.trim().to_string(),
        }),
    }
}

/// The leader's rebalancer: one per controller run.
pub struct Rebalancer {
    ctx: Arc<Context>,
    gateways: Store<WebsocketGateway>,
    caches: Caches,
    /// Wakes a gateway's reconcile (the controller's `reconcile_on` stream).
    trigger: Sender<ObjectRef<WebsocketGateway>>,
    memories: HashMap<String, Memory>,
    timeout: Duration,
}

impl Rebalancer {
    pub fn new(
        ctx: Arc<Context>,
        gateways: Store<WebsocketGateway>,
        caches: Caches,
        trigger: Sender<ObjectRef<WebsocketGateway>>,
    ) -> Self {
        Self {
            ctx,
            gateways,
            caches,
            trigger,
            memories: HashMap::new(),
            timeout: POST_TIMEOUT,
        }
    }

    /// Ticks until dropped (the controller aborts it when it stops).
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // No decision on caches that have not listed once (an empty pod cache is no fleet).
            if self.caches.ready().await.is_err() {
                continue;
            }
            self.tick().await;
        }
    }

    /// One look at every gateway with `spec.rebalance`, one after the other (each costs at
    /// most one scrape timeout and, in a round, one [`POST_TIMEOUT`]).
    pub async fn tick(&mut self) {
        let gateways: Vec<Arc<WebsocketGateway>> = self
            .gateways
            .state()
            .into_iter()
            .filter(|g| g.spec.rebalance.is_some() && g.metadata.deletion_timestamp.is_none())
            .collect();
        let keys: Vec<String> = gateways.iter().map(|g| Context::key(g)).collect();
        self.memories.retain(|k, _| keys.contains(k));
        self.ctx.rebalance.retain(|k| keys.iter().any(|g| g == k));
        for gw in gateways {
            self.gateway(&gw).await;
        }
    }

    async fn gateway(&mut self, gw: &WebsocketGateway) {
        let key = Context::key(gw);
        let namespace = gw.namespace().unwrap_or_default();
        let name = gw.name_any();
        let spec = gw.spec.rebalance.as_ref();
        let pods = fetch::gateway_pods(&self.caches.pods, &namespace, &name);
        let deployment = self
            .caches
            .deployments
            .get(&ObjectRef::new(&name).within(&namespace));
        let hpa = self
            .caches
            .hpas
            .get(&ObjectRef::new(&name).within(&namespace));
        let enabled = spec.is_some_and(|s| s.enabled);
        // A disabled gateway costs no scrape.
        let targets = if enabled {
            scrape::targets(&pods)
        } else {
            Vec::new()
        };
        let reports = scraper(&self.ctx).reports(&targets).await;
        let views = observe::pod_views(&pods, &reports);
        let now = Instant::now();
        let input = decide::Input {
            spec,
            now,
            pods: &views,
            rollout: observe::rollout_in_progress(deployment.as_deref()),
            hpa: observe::hpa_state(hpa.as_deref(), deployment.as_deref()),
        };
        let memory = self.memories.remove(&key).unwrap_or_default();
        let (decision, mut memory) = decide::decide(&input, &memory);
        let new_round = matches!(decision, Decision::Round(_));
        if let Decision::Round(round) = &decision {
            let addrs: HashMap<&str, SocketAddr> =
                targets.iter().map(|t| (t.name.as_str(), t.addr)).collect();
            let include_plain = spec.is_some_and(|s| s.include_plain_channels);
            let accepted = self.round(gw, round, &addrs, include_plain).await;
            if let Some(last) = memory.last_round.as_mut() {
                last.accepted = accepted;
            }
        }
        let summary = summary::summarize(&decision, spec, now);
        tracing::debug!(gateway = %key, reason = summary.reason, "{}", summary.message);
        self.memories.insert(key.clone(), memory);
        if self.ctx.rebalance.set(&key, summary, new_round) {
            // Full: the resync writes the condition instead.
            let _ = self.trigger.try_send(ObjectRef::from_obj(gw));
        }
    }

    /// Sends a round to its relays at once; how many took it. Counted, logged, and told
    /// in an Event on the gateway.
    async fn round(
        &self,
        gw: &WebsocketGateway,
        round: &Round,
        addrs: &HashMap<&str, SocketAddr>,
        include_plain: bool,
    ) -> usize {
        let key = Context::key(gw);
        let text = summary::round_text(round);
        tracing::info!(gateway = %key, moves = round.total(), pods = round.moves.len(), window_s = round.window.as_secs(), "rebalance: {text}");
        let answers = futures::future::join_all(round.moves.iter().map(|m| async move {
            match addrs.get(m.pod.as_str()) {
                Some(addr) => ask(*addr, m, round.window, include_plain, self.timeout).await,
                // Scraped a moment ago, gone from the targets since: deleted or stopped.
                None => Err(AskError::Unreachable(ScrapeError::Io(
                    "no longer running".into(),
                ))),
            }
        }))
        .await;
        let mut took = 0;
        let mut said = Vec::new();
        for (m, answer) in round.moves.iter().zip(&answers) {
            match answer {
                Ok(t) => {
                    took += 1;
                    tracing::info!(gateway = %key, pod = %m.pod, shed = m.shed, picked = t.picked, eligible = t.eligible, "rebalance: relay took its part");
                    said.push(format!(
                        "{} picked {} of {} eligible",
                        m.pod, t.picked, t.eligible
                    ));
                }
                Err(e) => {
                    tracing::warn!(gateway = %key, pod = %m.pod, shed = m.shed, error = %e, "rebalance: relay did not take its part");
                    said.push(format!("{}: {e}", m.pod));
                }
            }
        }
        let result = match took {
            0 => "failed",
            n if n == round.moves.len() => "ok",
            _ => "partial",
        };
        let metrics = &self.ctx.metrics.rebalance;
        metrics.rounds.get_or_create(&RoundLabels { result }).inc();
        metrics.moves_requested.inc_by(round.total());
        let kind = if took == 0 {
            EventType::Warning
        } else {
            EventType::Normal
        };
        let note = truncate(format!("{text}; {}", said.join("; ")), EVENT_NOTE_MAX);
        crate::controller::publish(&self.ctx, gw, kind, "Rebalance", note).await;
        took
    }
}

/// An Event's note is limited to 1 kB by the API server.
const EVENT_NOTE_MAX: usize = 1000;

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max.saturating_sub(3);
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

impl std::fmt::Debug for Rebalancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rebalancer")
            .field("gateways", &self.memories.len())
            .finish_non_exhaustive()
    }
}

fn scraper(ctx: &Context) -> &Scraper {
    ctx.scraper()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::extract::State;
    use axum::http::StatusCode;
    use tokio::net::TcpListener;

    /// What the stand-in relay saw: each request's Content-Type and JSON body.
    type Seen = Arc<Mutex<Vec<(Option<String>, serde_json::Value)>>>;

    /// A relay's admin port standing in for the real one: records each `/rebalance` body
    /// and answers `status` with `answer`.
    async fn relay(
        status: StatusCode,
        answer: &'static str,
    ) -> (
        SocketAddr,
        Arc<Mutex<Vec<(Option<String>, serde_json::Value)>>>,
    ) {
        let seen: Seen = Arc::default();
        let app = Router::new()
            .route(
                PATH,
                axum::routing::post(
                    move |State(seen): State<Seen>,
                          headers: axum::http::HeaderMap,
                          body: String| async move {
                        let content_type = headers
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
                        seen.lock().unwrap().push((content_type, json));
                        (status, answer)
                    },
                ),
            )
            .with_state(seen.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (addr, seen)
    }

    fn part(shed: u64) -> Move {
        Move {
            pod: "relay-a".into(),
            connections: 300,
            shed,
        }
    }

    /// The body the relay contract names, as JSON, and the relay's answer read back.
    #[tokio::test]
    async fn a_round_posts_the_shed_the_window_and_the_plain_channel_choice() {
        let (addr, seen) = relay(
            StatusCode::OK,
            r#"{"picked": 140, "eligible": 290, "windowMs": 120000}"#,
        )
        .await;
        let took = ask(
            addr,
            &part(150),
            Duration::from_secs(120),
            false,
            POST_TIMEOUT,
        )
        .await
        .expect("took");
        assert_eq!(
            took,
            Took {
                picked: 140,
                eligible: 290,
                window_ms: 120_000
            }
        );
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            [(
                Some("application/json".to_string()),
                json!({"shed": 150, "windowMs": 120000, "includePlainChannels": false})
            )]
        );
    }

    #[tokio::test]
    async fn a_busy_or_refusing_relay_is_told_apart() {
        let (busy, _) = relay(StatusCode::CONFLICT, "draining").await;
        let e = ask(busy, &part(1), Duration::from_secs(1), true, POST_TIMEOUT)
            .await
            .expect_err("busy");
        assert!(matches!(e, AskError::Busy), "{e:?}");
        let (bad, _) = relay(StatusCode::BAD_REQUEST, "shed must be a number").await;
        let e = ask(bad, &part(1), Duration::from_secs(1), true, POST_TIMEOUT)
            .await
            .expect_err("refused");
        assert!(
            matches!(&e, AskError::Refused { status: 400, body } if body == "shed must be a number"),
            "{e:?}"
        );
        let (garbled, _) = relay(StatusCode::OK, "yes").await;
        let e = ask(
            garbled,
            &part(1),
            Duration::from_secs(1),
            true,
            POST_TIMEOUT,
        )
        .await
        .expect_err("garbled");
        assert!(matches!(e, AskError::BadAnswer { .. }), "{e:?}");
    }

    /// A relay that accepts the connection and never answers costs the timeout, no more.
    #[tokio::test]
    async fn a_silent_relay_costs_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let e = ask(
            addr,
            &part(1),
            Duration::from_secs(1),
            false,
            Duration::from_millis(300),
        )
        .await
        .expect_err("silent");
        assert!(matches!(e, AskError::Timeout(_)), "{e:?}");
        hold.abort();
    }

    #[test]
    fn the_condition_is_rewritten_when_its_reason_changes_or_a_round_starts() {
        let s = Summaries::default();
        let summary = |reason, active| Summary {
            active,
            reason,
            message: "m".into(),
        };
        assert!(s.set("apps/chat", summary(summary::BALANCED, false), false));
        assert!(!s.set("apps/chat", summary(summary::BALANCED, false), false));
        assert!(s.set("apps/chat", summary(summary::IMBALANCED, false), false));
        assert!(s.set("apps/chat", summary(summary::SHEDDING, true), true));
        assert!(!s.set("apps/chat", summary(summary::SHEDDING, true), false));
        assert!(s.set("apps/chat", summary(summary::SHEDDING, true), true));
        assert_eq!(
            s.get("apps/chat").map(|s| s.reason),
            Some(summary::SHEDDING)
        );
    }

    #[test]
    fn long_event_notes_are_cut_on_a_character_boundary() {
        let s = truncate("→".repeat(600), EVENT_NOTE_MAX);
        assert!(s.len() <= EVENT_NOTE_MAX && s.ends_with("..."));
        assert_eq!(truncate("short".into(), EVENT_NOTE_MAX), "short");
    }
}
