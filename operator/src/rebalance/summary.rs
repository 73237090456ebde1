//! A decision as the gateway's `Rebalancing` condition says it: status, reason, message.
//! Pure. The messages carry no countdown, so a status rewritten on every reconcile does
//! not change for the clock alone.

use std::time::Instant;

use super::decide::{Decision, LastRound, Load, Move, Reason, Round};
use crate::api::RebalanceSpec;

/// Condition reasons (`status.conditions[type=Rebalancing].reason`). True only while a
/// round's moves are under way.
pub const SHEDDING: &str = "Shedding";
pub const SETTLING: &str = "Settling";
pub const BALANCED: &str = "Balanced";
pub const IMBALANCED: &str = "Imbalanced";
pub const ROLLOUT_IN_PROGRESS: &str = "RolloutInProgress";
pub const HPA_SCALING: &str = "HPAScaling";
pub const PODS_NOT_READY: &str = "PodsNotReady";
pub const UNSCRAPED: &str = "Unscraped";
pub const RELAYS_SHEDDING: &str = "RelaysShedding";
pub const TOO_FEW_PODS: &str = "TooFewPods";
pub const DISABLED: &str = "Disabled";

/// What the `Rebalancing` condition shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The condition's status: True while a round's moves are under way.
    pub active: bool,
    pub reason: &'static str,
    pub message: String,
}

/// Pods named in a message: the first few, then a count.
const NAMED: usize = 5;

fn list(pods: &[String]) -> String {
    let mut s = pods
        .iter()
        .take(NAMED)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if pods.len() > NAMED {
        s.push_str(&format!(" and {} more", pods.len() - NAMED));
    }
    s
}

fn moves(moves: &[Move]) -> String {
    let named: Vec<String> = moves
        .iter()
        .take(NAMED)
        .map(|m| format!("{} {}→{}", m.pod, m.connections, m.connections - m.shed))
        .collect();
    let mut s = named.join(", ");
    if moves.len() > NAMED {
        s.push_str(&format!(" and {} more", moves.len() - NAMED));
    }
    s
}

fn load(l: &Load) -> String {
    format!("{} pods, {} connections, mean {}", l.pods, l.total, l.mean)
}

/// "moving 300 connections from 2 pods (relay-a 300→150, relay-b 300→150) over 120s; 4
/// pods, 600 connections, mean 150": what a round does, for the condition, the Event and
/// the log.
pub fn round_text(round: &Round) -> String {
    format!(
        "moving {} connections from {} pods ({}) over {}s; {}",
        round.total(),
        round.moves.len(),
        moves(&round.moves),
        round.window.as_secs(),
        load(&round.load)
    )
}

fn running(last: &LastRound) -> String {
    let mut s = round_text(&last.round);
    if last.accepted < last.round.moves.len() {
        s.push_str(&format!(
            "; {} of {} relays took it",
            last.accepted,
            last.round.moves.len()
        ));
    }
    s
}

/// The condition for `decision`, taken at `now`.
pub fn summarize(decision: &Decision, spec: Option<&RebalanceSpec>, now: Instant) -> Summary {
    let tolerance = spec.map(|s| s.tolerance_percent).unwrap_or(0);
    let stable = spec.map(|s| s.stable_seconds).unwrap_or(0);
    let wait = |reason, message| Summary {
        active: false,
        reason,
        message,
    };
    let reason = match decision {
        Decision::Round(round) => {
            return Summary {
                active: true,
                reason: SHEDDING,
                message: round_text(round),
            };
        }
        Decision::Wait(r) => r,
    };
    match reason {
        Reason::Settling { round, .. } if now < round.ends && round.accepted > 0 => Summary {
            active: true,
            reason: SHEDDING,
            message: running(round),
        },
        Reason::Settling { round, .. } => wait(
            SETTLING,
            format!(
                "the last round asked {} pods to move {} connections ({} of them took it); no new round until the fleet has settled for stableSeconds ({stable}s) after its last move",
                round.round.moves.len(),
                round.round.total(),
                round.accepted
            ),
        ),
        Reason::Disabled => wait(DISABLED, "spec.rebalance.enabled is false".into()),
        Reason::RolloutInProgress => wait(
            ROLLOUT_IN_PROGRESS,
            "the relay Deployment is rolling out or scaling; rebalancing waits until it is done"
                .into(),
        ),
        Reason::HpaScaling {
            desired,
            current,
            replicas,
        } => wait(
            HPA_SCALING,
            format!(
                "the autoscaler wants {desired} relay pods and saw {current} (the Deployment asks for {replicas}); rebalancing waits until it is steady"
            ),
        ),
        Reason::PodsNotReady { pods } => wait(
            PODS_NOT_READY,
            format!(
                "relay pods not Ready or being deleted: {}; rebalancing waits until every pod is Ready",
                list(pods)
            ),
        ),
        Reason::Unscraped { pods } => wait(
            UNSCRAPED,
            format!(
                "the connection count of {} could not be read (its /metrics did not answer); rebalancing waits",
                list(pods)
            ),
        ),
        Reason::RelaysShedding { pods } => wait(
            RELAYS_SHEDDING,
            format!(
                "{} still shed connections from an earlier round; rebalancing waits until they are done",
                list(pods)
            ),
        ),
        Reason::TooFewPods { ready } => wait(
            TOO_FEW_PODS,
            format!("{ready} relay pods: fewer than 2, nowhere to move connections to"),
        ),
        Reason::Balanced(l) => wait(
            BALANCED,
            format!(
                "{}; the busiest, {}, holds {}, within {tolerance}% of the mean",
                load(l),
                l.busiest.0,
                l.busiest.1
            ),
        ),
        Reason::Imbalanced { load: l, hot, .. } => wait(
            IMBALANCED,
            format!(
                "{} above the mean by more than {tolerance}% ({}); a round starts if this lasts stableSeconds ({stable}s)",
                moves(hot),
                load(l)
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rebalance::decide::Hpa;
    use crate::rebalance::decide::{Input, Memory, PodView, decide};
    use std::time::Duration;

    fn pods(c: &[u64]) -> Vec<PodView> {
        c.iter()
            .enumerate()
            .map(|(i, c)| PodView {
                name: format!("relay-{}", (b'a' + i as u8) as char),
                ready: true,
                deleting: false,
                connections: Some(*c),
                shedding: false,
            })
            .collect()
    }

    /// The condition across a round: Imbalanced, then True/Shedding with the moves for the
    /// round's window, then Settling, then Balanced.
    #[test]
    fn the_condition_follows_a_round() {
        let t0 = Instant::now();
        let spec = RebalanceSpec {
            enabled: true,
            stable_seconds: 10,
            over_seconds: 20,
            ..RebalanceSpec::default()
        };
        let at = |s: u64| t0 + Duration::from_secs(s);
        let input = |now, pods| Input {
            spec: Some(&spec),
            now,
            pods,
            rollout: false,
            hpa: Hpa::Stable,
        };
        let hot = pods(&[300, 300, 0, 0]);
        let (d, m) = decide(&input(at(0), &hot), &Memory::default());
        let s = summarize(&d, Some(&spec), at(0));
        assert_eq!((s.active, s.reason), (false, IMBALANCED));
        assert_eq!(
            s.message,
            "relay-a 300→150, relay-b 300→150 above the mean by more than 25% (4 pods, 600 connections, mean 150); a round starts if this lasts stableSeconds (10s)"
        );
        let (d, m) = decide(&input(at(10), &hot), &m);
        let s = summarize(&d, Some(&spec), at(10));
        assert_eq!((s.active, s.reason), (true, SHEDDING));
        assert_eq!(
            s.message,
            "moving 300 connections from 2 pods (relay-a 300→150, relay-b 300→150) over 20s; 4 pods, 600 connections, mean 150"
        );
        let (d, m) = decide(&input(at(29), &hot), &m);
        assert_eq!(
            summarize(&d, Some(&spec), at(29)),
            s,
            "the same while it runs"
        );
        let (d, m) = decide(&input(at(30), &hot), &m);
        let s = summarize(&d, Some(&spec), at(30));
        assert_eq!((s.active, s.reason), (false, SETTLING));
        let (d, _) = decide(&input(at(40), &pods(&[150, 150, 150, 150])), &m);
        let s = summarize(&d, Some(&spec), at(40));
        assert_eq!((s.active, s.reason), (false, BALANCED));
        assert_eq!(
            s.message,
            "4 pods, 600 connections, mean 150; the busiest, relay-a, holds 150, within 25% of the mean"
        );
    }

    /// A round no relay took is not shown as running.
    #[test]
    fn a_round_nobody_took_is_settling_not_shedding() {
        let t0 = Instant::now();
        let spec = RebalanceSpec {
            enabled: true,
            stable_seconds: 5,
            ..RebalanceSpec::default()
        };
        let hot = pods(&[300, 300, 0, 0]);
        let input = |now| Input {
            spec: Some(&spec),
            now,
            pods: &hot,
            rollout: false,
            hpa: Hpa::Stable,
        };
        let (_, m) = decide(&input(t0), &Memory::default());
        let (_, mut m) = decide(&input(t0 + Duration::from_secs(5)), &m);
        m.last_round.as_mut().expect("round").accepted = 0;
        let (d, _) = decide(&input(t0 + Duration::from_secs(6)), &m);
        let s = summarize(&d, Some(&spec), t0 + Duration::from_secs(6));
        assert_eq!((s.active, s.reason), (false, SETTLING));
        assert!(s.message.contains("(0 of them took it)"), "{}", s.message);
    }
}
