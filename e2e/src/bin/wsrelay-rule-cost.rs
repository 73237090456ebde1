//! `wsrelay-rule-cost`: what one evaluation of an `authorize.rule` costs. It builds the
//! relay's own [`Rule`] (`relay/src/access/rule.rs`) and calls [`Rule::allows`] as a subscribe
//! does (the claims turned into CEL values, the program run) many times per case, for claims
//! of several sizes, and prints one JSON document: nanoseconds per evaluation (median and
//! minimum over rounds) and the size of the claims. `make bench` runs it pinned to one core
//! and writes the figures into docs/benchmarks.md. No criterion: a timed loop with
//! `black_box`, bounded by `--rounds` rounds of about `--round-ms` each per case.

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Parser;
use serde_json::{Map, Value, json};
use wsrelay::access::rule::Rule;
use wsrelay::metrics::Metrics;

/// The rule of the benchmark's `subscribe-rule` workload (and of docs/protocol.md).
const ROOMS_RULE: &str = "vars.room in claims.rooms || 'admin' in claims.roles";

#[derive(Debug, Parser)]
#[command(about = "Nanoseconds per evaluation of an authorize.rule (bounded loop)")]
struct Args {
    /// Rounds per case; the median and the minimum are reported.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Length of a round, in milliseconds.
    #[arg(long, default_value_t = 150)]
    round_ms: u64,
}

/// One measured case: a rule, claims with `rooms` rooms, and the room the channel names.
struct Case {
    what: &'static str,
    rule: &'static str,
    rooms: usize,
    /// Whether the channel's room is the last of the claims' (a full scan of the list for
    /// `in`) or absent (the scan, then the second clause).
    member: bool,
    admin: bool,
}

/// Claims like the benchmark's tokens: `sub`, `exp`, `rooms` (room names as the load
/// generator's) and `roles`.
fn claims(rooms: usize, admin: bool) -> Map<String, Value> {
    let rooms: Vec<String> = (0..rooms).map(|k| format!("u4242k{k}")).collect();
    let roles = if admin {
        vec!["member", "admin"]
    } else {
        vec!["member"]
    };
    let v = json!({"sub": "u4242", "exp": 1_800_000_000u64, "rooms": rooms, "roles": roles});
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cases = [
        Case {
            what: "a rule that reads no claim (the fixed cost: the claims converted, the context built)",
            rule: "op == 'subscribe'",
            rooms: 16,
            member: true,
            admin: false,
        },
        Case {
            what: "the room is the last of 1",
            rule: ROOMS_RULE,
            rooms: 1,
            member: true,
            admin: false,
        },
        Case {
            what: "the room is the last of 16 (the subscribe-rule workload's tokens)",
            rule: ROOMS_RULE,
            rooms: 16,
            member: true,
            admin: false,
        },
        Case {
            what: "the room is the last of 64",
            rule: ROOMS_RULE,
            rooms: 64,
            member: true,
            admin: false,
        },
        Case {
            what: "the room is the last of 256",
            rule: ROOMS_RULE,
            rooms: 256,
            member: true,
            admin: false,
        },
        Case {
            what: "the room is not among 16; 'admin' in roles allows",
            rule: ROOMS_RULE,
            rooms: 16,
            member: false,
            admin: true,
        },
    ];
    let metrics = Metrics::new();
    let mut out = Vec::new();
    for case in &cases {
        let rule = Rule::new(case.rule);
        let claims = claims(case.rooms, case.admin);
        let claims_bytes = serde_json::to_string(&claims)?.len();
        let room = if case.member {
            format!("u4242k{}", case.rooms.saturating_sub(1))
        } else {
            "elsewhere".to_string()
        };
        let channel = format!("rooms.{room}");
        let vars = vec![("room".to_string(), room)];
        let eval = || {
            rule.allows(
                black_box(Some(&claims)),
                black_box(&vars),
                black_box(&channel),
                "subscribe",
                &metrics,
            )
            .is_ok()
        };
        if !eval() {
            bail!(
                "{:?} denied the case {:?}: it must allow",
                case.rule,
                case.what
            );
        }
        // Warm-up, then rounds of about round_ms each, in batches of 64 evaluations.
        let mut per_eval = Vec::new();
        let mut total: u64 = 0;
        for round in 0..=args.rounds {
            let start = Instant::now();
            let mut n: u64 = 0;
            while start.elapsed() < Duration::from_millis(args.round_ms) {
                for _ in 0..64 {
                    black_box(eval());
                }
                n += 64;
            }
            let ns = start.elapsed().as_nanos() as f64 / n as f64;
            if round > 0 {
                per_eval.push(ns);
                total += n;
            }
        }
        per_eval.sort_by(f64::total_cmp);
        let median = per_eval.get(per_eval.len() / 2).copied().unwrap_or(0.0);
        let min = per_eval.first().copied().unwrap_or(0.0);
        eprintln!(
            "rule-cost: {:>5.0} ns/eval (min {min:.0}), {} rooms, claims {claims_bytes} B: {}",
            median, case.rooms, case.what
        );
        out.push(json!({
            "what": case.what,
            "rule": case.rule,
            "rooms": case.rooms,
            "claims_bytes": claims_bytes,
            "evaluations": total,
            "ns_per_eval_median": median,
            "ns_per_eval_min": min,
            "rounds": per_eval.len(),
        }));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({"cases": out, "round_ms": args.round_ms}))?
    );
    Ok(())
}
