//! The rebalancing decision, pure: the fleet's connection counts, readiness, rollout and
//! autoscaler state and what earlier ticks remembered in; what to do out ([`decide`]).
//!
//! A pod is hot when it holds more than the mean by more than the tolerance; each hot pod
//! sheds down to the mean (rounded up). The moved clients reconnect through the Service,
//! which spreads them over the Ready pods that do not shed (a shedding relay reads not Ready
//! on purpose), so [`plan`] also makes shed a pod within the tolerance that its share of
//! the moved clients would push over it. Hysteresis: an imbalance must last `stableSeconds`
//! (any guard failing or the fleet balancing starts the count over), and a round is
//! followed by its window and `stableSeconds` of settling before the next can start.

use std::time::{Duration, Instant};

use crate::api::RebalanceSpec;

/// One relay pod as the rebalancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    /// Its Ready condition is True.
    pub ready: bool,
    /// Being deleted (draining).
    pub deleting: bool,
    /// Open connections; None when its `/metrics` did not answer.
    pub connections: Option<u64>,
    /// It reports `wsrelay_rebalancing 1`: shedding for a round.
    pub shedding: bool,
}

/// The autoscaler's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hpa {
    /// No HPA, or it wants what runs: desired == current == the Deployment's replicas.
    Stable,
    /// It is changing the fleet (or the Deployment has not caught up with it yet).
    Scaling {
        desired: i32,
        current: i32,
        replicas: i32,
    },
}

/// What one tick looks at.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    /// `spec.rebalance` (None: unset).
    pub spec: Option<&'a RebalanceSpec>,
    pub now: Instant,
    /// The gateway's relay pods, terminal ones (Failed, Succeeded) left out.
    pub pods: &'a [PodView],
    /// The Deployment is rolling out (see [`super::observe::rollout_in_progress`]).
    pub rollout: bool,
    pub hpa: Hpa,
}

/// One hot pod's part of a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub pod: String,
    /// What it holds.
    pub connections: u64,
    /// How many it is asked to move.
    pub shed: u64,
}

/// The fleet's load, for the condition's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    pub pods: usize,
    pub total: u64,
    /// The mean, rounded up: what a hot pod sheds down to.
    pub mean: u64,
    /// The pod holding the most, and how many.
    pub busiest: (String, u64),
}

/// A round: ask each pod of `moves` to move `shed` of its connections, spread over `window`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    pub moves: Vec<Move>,
    pub window: Duration,
    pub load: Load,
}

impl Round {
    /// Connections the round moves in all.
    pub fn total(&self) -> u64 {
        self.moves.iter().map(|m| m.shed).sum()
    }
}

/// The last round, as remembered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastRound {
    pub round: Round,
    /// When its moves end (started + window).
    pub ends: Instant,
    /// When the next round may start: its end plus `stableSeconds`.
    pub settled: Instant,
    /// Relays that took it (set by the edge from their answers; all of them until then).
    pub accepted: usize,
}

/// Why no round starts now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// `spec.rebalance` unset or `enabled: false`.
    Disabled,
    RolloutInProgress,
    HpaScaling {
        desired: i32,
        current: i32,
        replicas: i32,
    },
    /// Pods not Ready or being deleted.
    PodsNotReady {
        pods: Vec<String>,
    },
    /// Ready pods whose connection count could not be read.
    Unscraped {
        pods: Vec<String>,
    },
    /// Pods still shedding outside a round of ours (one an earlier leader started, or
    /// running past its window).
    RelaysShedding {
        pods: Vec<String>,
    },
    /// Fewer than 2 Ready pods: nowhere to move to.
    TooFewPods {
        ready: usize,
    },
    /// No pod holds more than the mean by more than the tolerance.
    Balanced(Load),
    /// Some do, not for `stableSeconds` yet.
    Imbalanced {
        load: Load,
        hot: Vec<Move>,
        since: Instant,
        remaining: Duration,
    },
    /// The last round is under way (until `round.ends`) or settling (until `until`).
    Settling {
        round: LastRound,
        until: Instant,
    },
}

/// What to do this tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Wait(Reason),
    Round(Round),
}

/// What a gateway's rebalancer keeps from one tick to the next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Memory {
    /// Since when the fleet has been imbalanced with every guard passing.
    pub imbalanced_since: Option<Instant>,
    pub last_round: Option<LastRound>,
}

/// Decides one tick of one gateway, and what to remember for the next. Pure.
pub fn decide(input: &Input<'_>, memory: &Memory) -> (Decision, Memory) {
    let Some(spec) = input.spec.filter(|s| s.enabled) else {
        return (Decision::Wait(Reason::Disabled), Memory::default());
    };
    let now = input.now;
    let mut mem = memory.clone();
    // Every guard that fails starts the imbalance's count over.
    let wait = |mut mem: Memory, reason: Reason| {
        mem.imbalanced_since = None;
        (Decision::Wait(reason), mem)
    };
    if input.rollout {
        return wait(mem, Reason::RolloutInProgress);
    }
    if let Hpa::Scaling {
        desired,
        current,
        replicas,
    } = input.hpa
    {
        return wait(
            mem,
            Reason::HpaScaling {
                desired,
                current,
                replicas,
            },
        );
    }
    // Before the readiness guard: the pods of our own round read not Ready on purpose.
    if let Some(last) = &mem.last_round
        && now < last.settled
    {
        let reason = Reason::Settling {
            round: last.clone(),
            until: last.settled,
        };
        return wait(mem, reason);
    }
    let names = |f: &dyn Fn(&PodView) -> bool| -> Vec<String> {
        let mut v: Vec<String> = input
            .pods
            .iter()
            .filter(|p| f(p))
            .map(|p| p.name.clone())
            .collect();
        v.sort();
        v
    };
    let shedding = names(&|p| p.shedding);
    if !shedding.is_empty() {
        return wait(mem, Reason::RelaysShedding { pods: shedding });
    }
    let not_ready = names(&|p| !p.ready || p.deleting);
    if !not_ready.is_empty() {
        return wait(mem, Reason::PodsNotReady { pods: not_ready });
    }
    let unscraped = names(&|p| p.connections.is_none());
    if !unscraped.is_empty() {
        return wait(mem, Reason::Unscraped { pods: unscraped });
    }
    if input.pods.len() < 2 {
        return wait(
            mem,
            Reason::TooFewPods {
                ready: input.pods.len(),
            },
        );
    }
    let counts: Vec<(String, u64)> = input
        .pods
        .iter()
        .map(|p| (p.name.clone(), p.connections.unwrap_or(0)))
        .collect();
    let load = load(&counts);
    let moves = plan(&counts, spec.tolerance_percent.unsigned_abs());
    if moves.is_empty() {
        return wait(mem, Reason::Balanced(load));
    }
    let since = *mem.imbalanced_since.get_or_insert(now);
    let stable = seconds(spec.stable_seconds);
    let lasted = now.saturating_duration_since(since);
    if lasted < stable {
        let reason = Reason::Imbalanced {
            load,
            hot: moves,
            since,
            remaining: stable - lasted,
        };
        return (Decision::Wait(reason), mem);
    }
    let shed: u64 = moves.iter().map(|m| m.shed).sum();
    let round = Round {
        window: window(spec, shed),
        moves,
        load,
    };
    mem.imbalanced_since = None;
    mem.last_round = Some(LastRound {
        ends: now + round.window,
        settled: now + round.window + stable,
        accepted: round.moves.len(),
        round: round.clone(),
    });
    (Decision::Round(round), mem)
}

fn seconds(s: i32) -> Duration {
    Duration::from_secs(u64::from(s.unsigned_abs()))
}

/// The spread every relay of a round gets: `overSeconds`, or longer when the fleet's
/// `shed` moves would exceed `maxMovesPerSecond` (the relays spread their turns evenly, so
/// the fleet's rate is the sum of theirs). Pure.
pub fn window(spec: &RebalanceSpec, shed: u64) -> Duration {
    let over = u64::from(spec.over_seconds.unsigned_abs()) * 1000;
    let rate = u64::from(spec.max_moves_per_second.unsigned_abs()).max(1);
    let needed = shed.saturating_mul(1000).div_ceil(rate);
    Duration::from_millis(over.max(needed))
}

fn load(counts: &[(String, u64)]) -> Load {
    let total: u64 = counts.iter().map(|(_, c)| c).sum();
    let pods = counts.len();
    let busiest = counts
        .iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .cloned()
        .unwrap_or_default();
    Load {
        pods,
        total,
        mean: total.div_ceil(pods.max(1) as u64),
        busiest,
    }
}

/// The moves that bring `counts` (every Ready pod, by name) within `tolerance_percent` of
/// the mean: each pod above the mean by more than the tolerance sheds down to the mean
/// rounded up; then, since the moved clients spread evenly over the pods that do not shed,
/// a pod whose share would push it over the tolerance sheds too (it then takes none), and
/// when a pod would stay below the mean by more than the tolerance even with its share (a
/// relay back from a crash, its clients gone to the others), every pod above the mean sheds
/// down to it; until nothing changes. A pod within the tolerance otherwise keeps its
/// connections. Empty when balanced. Pure.
pub fn plan(counts: &[(String, u64)], tolerance_percent: u32) -> Vec<Move> {
    let n = counts.len() as u128;
    let total: u64 = counts.iter().map(|(_, c)| c).sum();
    if n < 2 || total == 0 {
        return Vec::new();
    }
    let mean = total.div_ceil(n as u64);
    let tol = u128::from(tolerance_percent);
    // c > mean * (1 + tol/100), in integers: c * 100 * n > total * (100 + tol).
    let over = |c: u64| u128::from(c) * 100 * n > u128::from(total) * (100 + tol);
    // c < mean * (1 - tol/100).
    let under = |c: u64| u128::from(c) * 100 * n < u128::from(total) * 100u128.saturating_sub(tol);
    let mut shedding: Vec<bool> = counts.iter().map(|(_, c)| over(*c) && *c > mean).collect();
    // Each pass adds at least one pod or stops: at most n passes.
    for _ in 0..=counts.len() {
        let shed: u64 = counts
            .iter()
            .zip(&shedding)
            .filter(|(_, s)| **s)
            .map(|((_, c), _)| c - mean)
            .sum();
        let receivers = shedding.iter().filter(|s| !**s).count() as u64;
        if receivers == 0 {
            break;
        }
        let share = shed.div_ceil(receivers);
        let mut added = false;
        for (i, (_, c)) in counts.iter().enumerate() {
            if !shedding[i] && *c > mean && over(c + share) {
                shedding[i] = true;
                added = true;
            }
        }
        let least = shed / receivers;
        let cold = counts
            .iter()
            .zip(&shedding)
            .any(|((_, c), s)| !*s && under(c + least));
        if !added && cold {
            for (i, (_, c)) in counts.iter().enumerate() {
                if !shedding[i] && *c > mean {
                    shedding[i] = true;
                    added = true;
                }
            }
        }
        // Never leave nobody to take the moved clients.
        if shedding.iter().all(|s| *s) {
            break;
        }
        if !added {
            break;
        }
    }
    counts
        .iter()
        .zip(&shedding)
        .filter(|(_, s)| **s)
        .map(|((pod, c), _)| Move {
            pod: pod.clone(),
            connections: *c,
            shed: c - mean,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RebalanceSpec {
        RebalanceSpec {
            enabled: true,
            ..RebalanceSpec::default()
        }
    }

    fn counts(c: &[u64]) -> Vec<(String, u64)> {
        c.iter()
            .enumerate()
            .map(|(i, c)| (format!("relay-{}", (b'a' + i as u8) as char), *c))
            .collect()
    }

    fn sheds(moves: &[Move]) -> Vec<(&str, u64)> {
        moves.iter().map(|m| (m.pod.as_str(), m.shed)).collect()
    }

    fn pods(c: &[u64]) -> Vec<PodView> {
        counts(c)
            .into_iter()
            .map(|(name, c)| PodView {
                name,
                ready: true,
                deleting: false,
                connections: Some(c),
                shedding: false,
            })
            .collect()
    }

    /// The cases: a scale-up from 2 to 4 pods, a near one, a balanced fleet, and a
    /// fleet after a SIGKILL sent one pod's clients to the other two.
    #[test]
    fn hot_pods_shed_down_to_the_mean() {
        assert_eq!(
            sheds(&plan(&counts(&[300, 300, 0, 0]), 25)),
            [("relay-a", 150), ("relay-b", 150)]
        );
        assert_eq!(
            sheds(&plan(&counts(&[310, 290, 0, 0]), 25)),
            [("relay-a", 160), ("relay-b", 140)]
        );
        assert!(plan(&counts(&[160, 150, 140, 150]), 25).is_empty());
        assert_eq!(
            sheds(&plan(&counts(&[300, 300, 0]), 25)),
            [("relay-a", 100), ("relay-b", 100)]
        );
    }

    /// A pod above the mean but within the tolerance keeps its connections, unless its
    /// share of the moved clients would push it over: then it sheds too (and takes none).
    #[test]
    fn pods_within_the_tolerance_shed_only_when_their_share_would_push_them_over() {
        // Mean 150, ceiling 187.5: 240 sheds 90; 155 keeps its own (155 + 90/3 = 185).
        let m = plan(&counts(&[240, 155, 105, 100]), 25);
        assert_eq!(sheds(&m), [("relay-a", 90)]);
        // 180 is within 187.5, but a third of 250 would put it at 264: it sheds its 30.
        let m = plan(&counts(&[400, 180, 10, 10]), 25);
        assert_eq!(sheds(&m), [("relay-a", 250), ("relay-b", 30)]);
        // The two receivers end at 150 each: 10 + 280/2.
        assert_eq!(m.iter().map(|m| m.shed).sum::<u64>(), 280);
    }

    /// A pod far below the mean with nobody far above it (a relay back from a crash while
    /// its clients stayed on the others): every pod above the mean sheds down to it.
    #[test]
    fn a_cold_pod_is_filled_by_every_pod_above_the_mean() {
        // Mean 150, floor 112.5: 45 would stay cold; nobody is over 187.5.
        assert_eq!(
            sheds(&plan(&counts(&[185, 185, 185, 45]), 25)),
            [("relay-a", 35), ("relay-b", 35), ("relay-c", 35)]
        );
        // Its share of the hot pod's moves lifts a cool pod over the floor: no more moves.
        assert_eq!(
            sheds(&plan(&counts(&[240, 155, 105, 100]), 25)),
            [("relay-a", 90)]
        );
        // Within the tolerance on both sides: balanced.
        assert!(plan(&counts(&[170, 160, 150, 120]), 25).is_empty());
    }

    #[test]
    fn tiny_and_empty_fleets_move_nothing_or_converge() {
        assert!(plan(&counts(&[]), 25).is_empty());
        assert!(plan(&counts(&[500]), 25).is_empty());
        assert!(plan(&counts(&[0, 0, 0]), 25).is_empty());
        // One connection over a mean of 0.5: its mean rounded up is 1, nothing to move.
        assert!(plan(&counts(&[1, 0]), 25).is_empty());
        // [3,1,1,1] moves one; the result [2,2,1,1] is balanced within the rounding.
        assert_eq!(sheds(&plan(&counts(&[3, 1, 1, 1]), 25)), [("relay-a", 1)]);
        assert!(plan(&counts(&[2, 2, 1, 1]), 25).is_empty());
        // A wide tolerance lets more through.
        assert!(plan(&counts(&[180, 120, 100, 100]), 50).is_empty());
        assert_eq!(
            sheds(&plan(&counts(&[180, 120, 100, 100]), 25)),
            [("relay-a", 55)]
        );
    }

    /// The fleet's rate: 300 moves at 100/s need 3 s, less than overSeconds; 30 000 at
    /// 100/s need 300 s.
    #[test]
    fn the_window_is_over_seconds_or_longer_to_keep_the_fleet_rate() {
        let s = spec();
        assert_eq!(window(&s, 300), Duration::from_secs(120));
        assert_eq!(window(&s, 30_000), Duration::from_secs(300));
        let slow = RebalanceSpec {
            max_moves_per_second: 7,
            over_seconds: 1,
            ..spec()
        };
        assert_eq!(window(&slow, 10), Duration::from_millis(1429));
    }

    struct Clock {
        t0: Instant,
    }

    impl Clock {
        fn at(&self, s: u64) -> Instant {
            self.t0 + Duration::from_secs(s)
        }
    }

    fn input<'a>(spec: &'a RebalanceSpec, now: Instant, pods: &'a [PodView]) -> Input<'a> {
        Input {
            spec: Some(spec),
            now,
            pods,
            rollout: false,
            hpa: Hpa::Stable,
        }
    }

    fn reason(d: &Decision) -> &Reason {
        match d {
            Decision::Wait(r) => r,
            Decision::Round(r) => panic!("a round: {r:?}"),
        }
    }

    /// An imbalance must last stableSeconds; then one round; then nothing until the round's
    /// window and stableSeconds of settling have passed, even though the counts (read before
    /// the moves happen) still look imbalanced.
    #[test]
    fn a_round_needs_a_sustained_imbalance_and_the_last_one_to_settle() {
        let c = Clock { t0: Instant::now() };
        let s = spec();
        let hot = pods(&[300, 300, 0, 0]);
        let (d, m) = decide(&input(&s, c.at(0), &hot), &Memory::default());
        assert!(
            matches!(reason(&d), Reason::Imbalanced { remaining, .. } if *remaining == Duration::from_secs(60)),
            "{d:?}"
        );
        let (d, m) = decide(&input(&s, c.at(59), &hot), &m);
        assert!(matches!(reason(&d), Reason::Imbalanced { .. }), "{d:?}");
        let (d, m) = decide(&input(&s, c.at(60), &hot), &m);
        let Decision::Round(round) = d else {
            panic!("no round: {d:?}")
        };
        assert_eq!(sheds(&round.moves), [("relay-a", 150), ("relay-b", 150)]);
        assert_eq!(round.window, Duration::from_secs(120));
        assert_eq!(round.load.mean, 150);
        // The round runs 120 s and settles 60 s: no new round before 240 s.
        let last = m.last_round.clone().expect("remembered");
        assert_eq!((last.ends, last.settled), (c.at(180), c.at(240)));
        for t in [61, 179, 180, 239] {
            let (d, _) = decide(&input(&s, c.at(t), &hot), &m);
            assert!(
                matches!(reason(&d), Reason::Settling { until, .. } if *until == c.at(240)),
                "at {t}: {d:?}"
            );
        }
        // Settled, still imbalanced: the count starts over, it does not fire at once.
        let (d, m) = decide(&input(&s, c.at(240), &hot), &m);
        assert!(matches!(reason(&d), Reason::Imbalanced { .. }), "{d:?}");
        let (d, _) = decide(&input(&s, c.at(300), &hot), &m);
        assert!(matches!(d, Decision::Round(_)), "{d:?}");
    }

    #[test]
    fn below_the_tolerance_nothing_happens_and_the_count_starts_over() {
        let c = Clock { t0: Instant::now() };
        let s = spec();
        let (d, m) = decide(
            &input(&s, c.at(0), &pods(&[160, 150, 140, 150])),
            &Memory::default(),
        );
        assert!(
            matches!(reason(&d), Reason::Balanced(l) if l.mean == 150 && l.busiest == ("relay-a".into(), 160)),
            "{d:?}"
        );
        assert_eq!(m.imbalanced_since, None);
        // Imbalanced for 50 s, balanced once, imbalanced again: 60 s more are needed.
        let hot = pods(&[300, 300, 0, 0]);
        let (_, m) = decide(&input(&s, c.at(0), &hot), &Memory::default());
        let (_, m) = decide(&input(&s, c.at(50), &hot), &m);
        let (d, m) = decide(&input(&s, c.at(55), &pods(&[160, 150, 140, 150])), &m);
        assert!(matches!(reason(&d), Reason::Balanced(_)));
        let (_, m) = decide(&input(&s, c.at(56), &hot), &m);
        let (d, _) = decide(&input(&s, c.at(100), &hot), &m);
        assert!(matches!(reason(&d), Reason::Imbalanced { .. }), "{d:?}");
    }

    /// No action during a rollout, while the HPA scales, while a pod is not Ready or being
    /// deleted, unscraped, or still shedding, with fewer than 2 pods, or when disabled; each
    /// starts the imbalance's count over.
    #[test]
    fn every_guard_holds_the_round_and_resets_the_count() {
        let c = Clock { t0: Instant::now() };
        let s = spec();
        let hot = pods(&[300, 300, 0, 0]);
        let (_, sustained) = decide(&input(&s, c.at(0), &hot), &Memory::default());
        assert_eq!(sustained.imbalanced_since, Some(c.at(0)));
        let at = c.at(60);
        let check = |i: Input<'_>, want: &dyn Fn(&Reason) -> bool| {
            let (d, m) = decide(&i, &sustained);
            assert!(want(reason(&d)), "{d:?}");
            assert_eq!(m.imbalanced_since, None, "{d:?}");
        };
        check(
            Input {
                rollout: true,
                ..input(&s, at, &hot)
            },
            &|r| *r == Reason::RolloutInProgress,
        );
        check(
            Input {
                hpa: Hpa::Scaling {
                    desired: 4,
                    current: 2,
                    replicas: 2,
                },
                ..input(&s, at, &hot)
            },
            &|r| matches!(r, Reason::HpaScaling { desired: 4, .. }),
        );
        let mut unready = hot.clone();
        unready[2].ready = false;
        unready[3].deleting = true;
        check(input(&s, at, &unready), &|r| {
            *r == Reason::PodsNotReady {
                pods: vec!["relay-c".into(), "relay-d".into()],
            }
        });
        let mut unscraped = hot.clone();
        unscraped[1].connections = None;
        check(input(&s, at, &unscraped), &|r| {
            *r == Reason::Unscraped {
                pods: vec!["relay-b".into()],
            }
        });
        let mut foreign = hot.clone();
        foreign[0].shedding = true;
        foreign[0].ready = false;
        check(input(&s, at, &foreign), &|r| {
            *r == Reason::RelaysShedding {
                pods: vec!["relay-a".into()],
            }
        });
        check(input(&s, at, &hot[..1]), &|r| {
            *r == Reason::TooFewPods { ready: 1 }
        });
        let off = RebalanceSpec::default();
        check(input(&off, at, &hot), &|r| *r == Reason::Disabled);
        check(
            Input {
                spec: None,
                ..input(&s, at, &hot)
            },
            &|r| *r == Reason::Disabled,
        );
        // With every guard passing, the same memory starts the round.
        let (d, _) = decide(&input(&s, at, &hot), &sustained);
        assert!(matches!(d, Decision::Round(_)));
    }

    /// During its own round the hot pods read not Ready (on purpose) and report shedding:
    /// that is Settling, not a readiness problem. A rollout during settling still shows,
    /// and the settling is kept for after it.
    #[test]
    fn the_pods_of_our_own_round_may_be_unready_while_it_settles() {
        let c = Clock { t0: Instant::now() };
        let s = RebalanceSpec {
            stable_seconds: 5,
            ..spec()
        };
        let hot = pods(&[300, 300, 0, 0]);
        let (_, m) = decide(&input(&s, c.at(0), &hot), &Memory::default());
        let (d, m) = decide(&input(&s, c.at(5), &hot), &m);
        assert!(matches!(d, Decision::Round(_)));
        let mut shedding = pods(&[200, 200, 100, 100]);
        for p in &mut shedding[..2] {
            p.ready = false;
            p.shedding = true;
        }
        let (d, m) = decide(&input(&s, c.at(30), &shedding), &m);
        assert!(matches!(reason(&d), Reason::Settling { .. }), "{d:?}");
        let (d, m) = decide(
            &Input {
                rollout: true,
                ..input(&s, c.at(31), &shedding)
            },
            &m,
        );
        assert_eq!(*reason(&d), Reason::RolloutInProgress);
        let (d, _) = decide(&input(&s, c.at(32), &shedding), &m);
        assert!(matches!(reason(&d), Reason::Settling { .. }), "{d:?}");
    }

    /// Turning it off forgets everything: turned on again, an imbalance needs its full
    /// stableSeconds.
    #[test]
    fn disabling_forgets_the_imbalance_and_the_last_round() {
        let c = Clock { t0: Instant::now() };
        let s = spec();
        let hot = pods(&[300, 300, 0, 0]);
        let (_, m) = decide(&input(&s, c.at(0), &hot), &Memory::default());
        let off = RebalanceSpec::default();
        let (_, m) = decide(&input(&off, c.at(30), &hot), &m);
        assert_eq!(m, Memory::default());
        let (d, _) = decide(&input(&s, c.at(60), &hot), &m);
        assert!(matches!(reason(&d), Reason::Imbalanced { .. }));
    }
}
