#!/usr/bin/env python3
"""Turns the JSON of `e2e/bench/run.sh` runs into summary.json, PNG plots and docs/benchmarks.md.

Every number in the document comes from the JSON files of the run (target/bench/<workload>/
<target>.<trial>.json, target/bench/config/); nothing is typed by hand.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics

import cpu_profile  # e2e/bench/cpu_profile.py, beside this file

TARGETS = ["wsrelay", "nats-ws", "centrifugo", "baseline"]
LABEL = {"wsrelay": "wsrelay", "nats-ws": "nats-server WebSocket", "centrifugo": "Centrifugo",
         "baseline": "bare baseline"}
CORE = ["broadcast-1k", "broadcast-10k", "personal-10k"]
LADDERS = CORE + ["channels-10k", "upstream-1k", "churn-1k", "payload-64", "payload-1k", "payload-16k", "payload-64k", "wss-1k"]
DESCRIBE = {
    "broadcast-1k": "1,000 connections on one channel; a message fans out to all",
    "broadcast-10k": "10,000 connections on one channel",
    "personal-10k": "10,000 connections, each on its own channel (`bench.u{i}`, the per-user case); one delivery per message",
    "channels-10k": "10,000 connections over 1,000 channels, 10 subscribers each; the publisher goes round the channels",
    "upstream-1k": "1,000 connections publish (client -> server -> NATS); the generator receives on NATS. Rate = client publishes per second over all connections",
    "churn-1k": "1,000 connections each subscribe and unsubscribe (a random one of 100 channels) when the schedule says; rate = subscribe+unsubscribe cycles per second; latency = due time to the unsubscribe's confirmation",
    "payload-64": "100 connections on one channel, 64-byte payloads",
    "payload-1k": "100 connections on one channel, 1 KiB payloads",
    "payload-16k": "100 connections on one channel, 16 KiB payloads",
    "payload-64k": "100 connections on one channel, 64 KiB payloads",
    "wss-1k": "broadcast-1k over TLS (wss; a P-256 certificate, TLS 1.3 with rustls in the generator); the baseline has no TLS and does not run",
}
UNIT = {"upstream-1k": "publishes/s", "churn-1k": "cycles/s"}
# Channel authorization (issue 25): wsrelay alone, their own section (authorize_section).
AUTHZ = ["subscribe-plain", "subscribe-rule", "subscribe-cached", "subscribe-miss"]
AUTHZ_BEGIN, AUTHZ_END = "<!-- authorize:begin -->", "<!-- authorize:end -->"
# Presence (issue 26): wsrelay alone, its own section (presence_section).
PRES = ["presence-10k"]
PRES_BEGIN, PRES_END = "<!-- presence:begin -->", "<!-- presence:end -->"


def load(d):
    runs = {}
    for w in sorted(os.listdir(d)):
        wd = os.path.join(d, w)
        if not os.path.isdir(wd) or w in ("run", "config"):
            continue
        for name in sorted(os.listdir(wd)):
            if not name.endswith(".json"):
                continue
            try:
                r = json.load(open(os.path.join(wd, name)))
            except (OSError, ValueError):
                continue
            runs.setdefault(w, {}).setdefault(r["target"], []).append(r)
    return runs


def fmt(v, digits=0):
    if v is None:
        return "–"
    if v == float("inf"):
        return "∞"
    if digits:
        return f"{v:,.{digits}f}"
    return f"{v:,.0f}"


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rng(xs, digits=1):
    """median (min–max) of xs, or the value alone when there is one."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    m = statistics.median(xs)
    if len(xs) == 1 or min(xs) == max(xs):
        return fmt(m, digits)
    return f"{fmt(m, digits)} ({fmt(min(xs), digits)}–{fmt(max(xs), digits)})"


def steps_at(r, rate, kinds=("ladder", "refine")):
    return [s for s in r.get("steps", []) if s["rate"] == rate and s["kind"] in kinds]


def valid(s):
    return s["verdict"] != "discarded"


def shared_rates(runs_w):
    """Ladder rates every peer sustained (median over trials of each peer's max sustained rate)."""
    peers = [t for t in TARGETS if runs_w.get(t)]
    if not peers:
        return []
    ladder = sorted({s["rate"] for t in peers for r in runs_w[t] for s in r.get("steps", []) if s["kind"] == "ladder"})
    out = []
    for rate in ladder:
        ok = True
        for t in peers:
            mx = med([r.get("max_sustained_rate") for r in runs_w[t]])
            have = [s for r in runs_w[t] for s in steps_at(r, rate, ("ladder",)) if valid(s)]
            if mx is None or mx < rate or not have:
                ok = False
        if ok:
            out.append(rate)
    return out


def at_rate(runs_w, t, rate, key):
    """key(step) per trial at a ladder rate: the last valid step there (a failed rate is run
    twice; the repeat decides)."""
    vals = []
    for r in runs_w.get(t, []):
        ss = [s for s in steps_at(r, rate, ("ladder",)) if valid(s)]
        if ss:
            vals.append(key(ss[-1]))
    return vals


def stop_reasons(rs):
    return "; ".join(sorted({r.get("stop_reason") or "–" for r in rs}))


def ladders(runs):
    """Workloads with a rate ladder, known ones in their order, then any other (smoke runs)."""
    extra = sorted(w for w, rw in runs.items() if w not in LADDERS and w not in ("storm-5k", "slow-1k", "idle") and w not in AUTHZ + PRES
                   and any(r.get("steps") for rs in rw.values() for r in rs))
    return [w for w in LADDERS if w in runs] + extra


def summarize(runs):
    out = {"ladders": {}, "storm": {}, "slow": {}, "idle": {}}
    for w in ladders(runs):
        rw = runs.get(w)
        if not rw:
            continue
        shared = shared_rates(rw)
        fallback = False
        if not shared:
            # No rate every peer sustained: the lowest ladder rate every peer ran (its verdicts shown).
            ran = [rate for rate in sorted({s["rate"] for rs in rw.values() for r in rs for s in r.get("steps", []) if s["kind"] == "ladder"})
                   if all(at_rate(rw, t, rate, lambda s: 1) for t in rw)]
            shared, fallback = ran[:1], bool(ran)
        entry = {"shared_rates": shared, "fallback": fallback, "peers": {}}
        for t in TARGETS:
            rs = rw.get(t)
            if not rs:
                continue
            maxes = [r.get("max_sustained_rate") for r in rs]
            best_steps = []
            for r in rs:
                m = r.get("max_sustained_rate")
                ss = [s for s in r.get("steps", []) if s["rate"] == m and s["verdict"] == "sustained"]
                if ss:
                    best_steps.append(ss[-1])
            entry["peers"][t] = {
                "trials": len(rs),
                "max_sustained_rate": maxes,
                "deliveries_per_second_at_max": [s["deliveries_per_second"] for s in best_steps],
                "p99_ms_at_max": [s["latency"]["p99_ms"] for s in best_steps],
                "stop_reasons": [r.get("stop_reason") for r in rs],
                "at_shared_rates": {
                    str(rate): {
                        "cpu_us_per_delivery_incl_nats": at_rate(rw, t, rate, lambda s: s["cpu_us_per_delivery_incl_nats"]),
                        "cpu_us_per_delivery": at_rate(rw, t, rate, lambda s: s["cpu_us_per_delivery"]),
                        "nats_cpu_us_per_delivery": at_rate(rw, t, rate, lambda s: (s["cpu_us_per_delivery_incl_nats"] or 0) - (s["cpu_us_per_delivery"] or 0)),
                        "generator_cpu_us_per_delivery": at_rate(rw, t, rate, lambda s: s["generator_cpu_us_per_delivery"]),
                        "p50_ms": at_rate(rw, t, rate, lambda s: s["latency"]["p50_ms"]),
                        "p99_ms": at_rate(rw, t, rate, lambda s: s["latency"]["p99_ms"]),
                        "relay_p99_ms": at_rate(rw, t, rate, lambda s: (s.get("relay_delivery_latency") or {}).get("p99_ms")),
                        "deliveries_per_second": at_rate(rw, t, rate, lambda s: s["deliveries_per_second"]),
                        "sustained": at_rate(rw, t, rate, lambda s: s["verdict"] == "sustained"),
                    } for rate in shared
                },
            }
        out["ladders"][w] = entry
    for t, rs in (runs.get("storm-5k") or {}).items():
        out["storm"][t] = [r.get("storm") for r in rs]
    for t, rs in (runs.get("slow-1k") or {}).items():
        out["slow"][t] = [[{k: s.get(k) for k in ("rate", "kind", "verdict", "reason", "delivery_ratio", "server_rss_bytes")}
                           | {"p99_ms": s["latency"]["p99_ms"]} for s in r.get("steps", [])] for r in rs]
    for t, rs in (runs.get("idle") or {}).items():
        out["idle"][t] = [{
            "connections": r["connections_ready"],
            "connect_failed": r["connect_failed"],
            "rss_bytes_per_connection": r.get("idle", {}).get("rss_bytes_per_connection", {}).get("server"),
            "handshakes_per_second": r["handshake"]["per_second"],
            "handshake_p50_ms": r["handshake"]["latency"]["p50_ms"],
            "handshake_p99_ms": r["handshake"]["latency"]["p99_ms"],
            "handshake_max_ms": r["handshake"]["latency"]["max_ms"],
            "handshake_cpu_seconds": r["handshake"].get("cpu_seconds", {}),
            "tcp_counters": r["handshake"].get("tcp_counters", {}),
            "concurrency": r["handshake"].get("concurrency"),
        } for r in rs]
    return out


def summarize_authz(runs):
    """Channel authorization (issue 25): per variant, its maximum sustained rate and, per ladder
    rate, the figures of each trial."""
    out = {}
    for w in AUTHZ:
        rs = (runs.get(w) or {}).get("wsrelay")
        if not rs:
            continue
        rw = {"wsrelay": rs}
        rates = sorted({s["rate"] for r in rs for s in r.get("steps", []) if s["kind"] == "ladder"})

        def auth(key):
            return lambda s: (s.get("relay_authorize") or {}).get(key)

        keys = {
            "subscribes_per_second": lambda s: s["deliveries_per_second"],
            "cpu_us": lambda s: s["cpu_us_per_delivery"],
            "cpu_us_incl_nats": lambda s: s["cpu_us_per_delivery_incl_nats"],
            "generator_cpu_us": lambda s: s["generator_cpu_us_per_delivery"],
            "p50_ms": lambda s: s["latency"]["p50_ms"],
            "p99_ms": lambda s: s["latency"]["p99_ms"],
            "max_ms": lambda s: s["latency"]["max_ms"],
            "sustained": lambda s: s["verdict"] == "sustained",
            "cache_hits": auth("cache_hits"),
            "cache_misses": auth("cache_misses"),
            "backend_requests": auth("backend_requests"),
            "denied": auth("denied"),
            "failures": auth("failures"),
        }
        sub = [r.get("subscribe") or {} for r in rs]
        out[w] = {
            "trials": len(rs),
            "connections": [r.get("connections_ready") for r in rs],
            "rooms_per_connection": [x.get("rooms_per_connection") for x in sub],
            "token_bytes": [x.get("token_bytes") for x in sub],
            "backend_answered": [x.get("backend_answered") for x in sub],
            "max_sustained_rate": [r.get("max_sustained_rate") for r in rs],
            "stop_reasons": [r.get("stop_reason") for r in rs],
            "lost_connections": [r.get("lost_connections") for r in rs],
            "errors": [r.get("errors") for r in rs],
            "at": {str(rate): {k: at_rate(rw, "wsrelay", rate, f) for k, f in keys.items()} for rate in rates},
        }
    return out


def authz_shared_rates(az):
    """Ladder rates every variant ran and sustained in every trial."""
    if not az:
        return []
    common = set.intersection(*(set(v["at"]) for v in az.values()))
    ok = [r for r in common if all(v["at"][r]["sustained"] and all(v["at"][r]["sustained"]) for v in az.values())]
    return sorted(ok, key=float)


def authorize_section(runs, summary, d, standalone):
    """The channel authorization section, between markers (a run of these workloads alone
    replaces just this section of the document)."""
    az = summary.get("authorize") or {}
    cost = None
    try:
        cost = json.load(open(os.path.join(d, "rule-cost.json")))
    except (OSError, ValueError):
        pass
    if not az and not cost:
        return []
    L = [AUTHZ_BEGIN, "## Channel authorization: the cost of `authorize` per subscribe (wsrelay)", ""]
    p = L.append
    if standalone:
        L += measured_apart(runs, d, AUTHZ)
    conns = fmt(med([c for v in az.values() for c in v["connections"]]))
    rooms = fmt(med([k for v in az.values() for k in v["rooms_per_connection"]]))
    p(f"Issue 25: what a binding's `authorize` adds to a subscribe. {conns} connections, each on its own channels")
    p("`rooms.{room}`: when the schedule says, a connection subscribes and, once the `ok` is in, unsubscribes again (it")
    p("stays under `maxSubscriptionsPerConnection`, and `cached` comes back to its rooms). Rate = subscribes per second")
    p("over all connections; latency = the subscribe's due time to its `ok` (sent once the NATS subscription is confirmed")
    p("by a round trip through the NATS server). CPU-µs per subscribe = the relay process's CPU time over a step")
    p("(`/proc/PID/stat`, 10 ms ticks) / the subscribes in it; it includes the unsubscribe that follows each one, the")
    p("same in every variant, so the difference to `plain` is what the check costs. wsrelay only: the peers have no")
    p("equivalent. The variants differ only in the relay's binding for `rooms.{room}` (as run):")
    p("")
    p("```yaml")
    p(read(os.path.join(d, "config", "authorize-bindings.yaml")).strip())
    p("```")
    p("")
    p("- **plain**: no `authorize`: the cost of a subscribe itself.")
    p(f"- **rule**: the CEL rule; every connection's token carries `rooms` (its {rooms} rooms) and `roles`, so the rule")
    p("  passes on its first clause (every variant's tokens carry the same claims).")
    p(f"- **cached**: `authorize.request`; each connection subscribes once to each of its {rooms} rooms while it connects, so")
    p("  the relay holds a decision for every (user, channel) the schedule names: every measured subscribe is a cache hit.")
    p("- **miss**: `authorize.request`; every subscribe names a room never named before: a cache miss, a NATS request to")
    p("  the backend and its reply before the `ok`.")
    p("")
    p("The backend of `cached` and `miss` is a thread of the load generator (Rust, async-nats, queue group `authz`,")
    p("`{\"allow\":true}` at once): it runs on the generator's core, its CPU counts as the generator's, and its requests")
    p("and replies go through the relay's nats-server (in \"incl. NATS\"). The relay's own counters")
    p("(`wsrelay_authorize_cache_total`, `wsrelay_authorize_requests_total`), read around every step, say what each step's")
    p("subscribes cost the cache and the backend.")
    p("")
    p("This machine has 2 cores shared with other agents' builds and tests: the figures are noisy (other processes'")
    p("share of the cores is in the last table); compare variants within this run, not with other pages.")
    p("")
    if az:
        label = {w: w.removeprefix("subscribe-") for w in AUTHZ}
        limit = next((r.get("p99_limit_ms") for w in az for r in runs[w]["wsrelay"]), None)
        p(f"| variant | trials | max subscribes/s sustained (p99 ≤ {fmt(limit)} ms) | stopped because | connections lost | errors |")
        p("|---|---:|---:|---|---:|---|")
        for w in AUTHZ:
            v = az.get(w)
            if not v:
                continue
            errs = "; ".join(f"{k} ({n})" for e in v["errors"] for k, n in (e or {}).items()) or "none"
            p(f"| {label[w]} | {v['trials']} | {rng(v['max_sustained_rate'], 0)} | {'; '.join(sorted(set(x or '–' for x in v['stop_reasons'])))} | "
              f"{fmt(sum(x or 0 for x in v['lost_connections']))} | {errs} |")
        p("")
        shared = authz_shared_rates(az)
        if shared:
            step = next((r.get("step_seconds") for w in az for r in runs[w]["wsrelay"]), None)
            p("At each rate every variant sustained (median over trials, (min–max) when they differ); \"vs plain\" = the")
            p("variant's relay CPU per subscribe / plain's at the same rate (and the difference). One 10 ms tick of CPU time")
            if step:
                p(f"is 10,000 / (rate × {step:g} s) µs per subscribe ({fmt(10_000 / (float(shared[0]) * step), 1)} µs at {fmt(float(shared[0]))}/s,"
                  f" {fmt(10_000 / (float(shared[-1]) * step), 1)} µs at {fmt(float(shared[-1]))}/s): compare at the higher rates.")
            else:
                p("is a large share of a step's CPU at the low rates: compare at the higher rates.")
            p("")
            p("| rate (subscribes/s) | variant | achieved subscribes/s | relay CPU-µs per subscribe | vs plain | incl. its NATS | generator CPU-µs | p50 ms | p99 ms | max ms | cache hits | backend requests |")
            p("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for rate in shared:
                base = med((az.get("subscribe-plain") or {}).get("at", {}).get(rate, {}).get("cpu_us", []))
                for w in AUTHZ:
                    v = az.get(w)
                    if not v:
                        continue
                    a = v["at"][rate]
                    c = med(a["cpu_us"])
                    vs = "–" if w == "subscribe-plain" or not (c and base) else f"{c / base:.2f}x ({c - base:+.1f})"
                    p(f"| {fmt(float(rate))} | {label[w]} | {rng(a['subscribes_per_second'], 0)} | {rng(a['cpu_us'], 1)} | {vs} | "
                      f"{rng(a['cpu_us_incl_nats'], 1)} | {rng(a['generator_cpu_us'], 1)} | {rng(a['p50_ms'], 2)} | {rng(a['p99_ms'], 2)} | "
                      f"{rng(a['max_ms'], 2)} | {rng(a['cache_hits'], 0)} | {rng(a['backend_requests'], 0)} |")
            p("")
            miss, plain, rule = az.get("subscribe-miss"), az.get("subscribe-plain"), az.get("subscribe-rule")
            top = shared[-1]
            if miss and plain:
                p(f"A subscribe with a cache miss (the backend asked, on this machine's loopback): p99 {rng(miss['at'][top]['p99_ms'], 2)} ms"
                  f" at {fmt(float(top))} subscribes/s, against {rng(plain['at'][top]['p99_ms'], 2)} ms for a plain subscribe.")
                p("")
            sixteen = next((c for c in (cost or {}).get("cases", []) if c["rule"] != "op == 'subscribe'" and c["rooms"] == 16 and "last" in c["what"]), None)
            if rule and plain and sixteen:
                r, b = med(rule["at"][top]["cpu_us"]), med(plain["at"][top]["cpu_us"])
                if r is not None and b is not None:
                    p(f"The rule in the relay, at {fmt(float(top))} subscribes/s: {r - b:+.1f} CPU-µs per subscribe over plain; the same rule")
                    p(f"evaluated in a loop (below, 16 rooms): {sixteen['ns_per_eval_median'] / 1000:.1f} µs. The loop runs with warm caches;")
                    p("in the relay each evaluation comes between other work.")
                    p("")
        else:
            p("No rate every variant sustained in this run.")
            p("")
        fl = foreign_load({w: runs[w] for w in az})
        p("| variant | other processes on the server core | on the generator core |")
        p("|---|---:|---:|")
        for w in AUTHZ:
            f = fl.get(w)
            if f:
                p(f"| {label[w]} | {fmt(f[0] * 100)}% | {fmt(f[1] * 100)}% |")
        p("")
    if cost:
        p("### The CEL rule's cost per evaluation")
        p("")
        p("`wsrelay-rule-cost` (`e2e/src/bin/wsrelay-rule-cost.rs`) builds the relay's own `Rule`")
        p(f"(`relay/src/access/rule.rs`, the `cel` crate {cel_version()}) and calls `Rule::allows` as a subscribe does (the claims")
        p("turned into CEL values, the context built, the program run) in a loop pinned to the server's core, in rounds of")
        p(f"about {cost.get('round_ms')} ms; median (and minimum) over the rounds. Claims as the bench's tokens: `sub`, `exp`,")
        p("`rooms` (names like `u4242k15`) and `roles`.")
        p("")
        p("| rule | case | rooms in the claims | claims bytes (JSON) | ns per evaluation | min |")
        p("|---|---|---:|---:|---:|---:|")
        for c in cost.get("cases", []):
            rule = c["rule"].replace("|", "\\|")  # a `|` in a cell ends it, even in code
            p(f"| `{rule}` | {c['what']} | {c['rooms']} | {fmt(c['claims_bytes'])} | {fmt(c['ns_per_eval_median'])} | {fmt(c['ns_per_eval_min'])} |")
        p("")
    if standalone:
        p("Reproduce: `BENCH_WORKLOADS=\"subscribe-plain subscribe-rule subscribe-cached subscribe-miss\" make bench`; a run of")
        p("these workloads alone rewrites only this section of the page.")
        p("")
    p(AUTHZ_END)
    p("")
    return L


def measured_apart(runs, d, names):
    """The lines that say when a run of the workloads `names` alone (which rewrites only their
    section) was made, with what and on what."""
    vpath = os.path.join(d, "config", "versions.txt")
    ended = os.path.getmtime(vpath) if os.path.exists(vpath) else None
    when = datetime.datetime.fromtimestamp(ended, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if ended else "?"
    seconds = read(os.path.join(d, "config", "seconds.txt")).strip()
    first = (read(vpath).strip().splitlines() or ["?"])[0]
    mine = [r for w in names for rs in (runs.get(w) or {}).values() for r in rs]
    loads = sorted(float(r["loadavg"][0]) for r in mine if r.get("loadavg"))
    quick = any(r.get("step_seconds") == 2 for r in mine)
    L = [f"Measured apart from the rest of this page: run of {when}, {fmt(int(seconds) / 60 if seconds else None, 1)} min"
         f" (`BENCH_WORKLOADS=\"{' '.join(w for w in names if w in runs)}\"`{' BENCH_QUICK=1' if quick else ''}), `{first}`."]
    if loads:
        L.append(f"Machine: {machine()}, shared with other work: 1-minute load average {loads[0]:.2f} to {loads[-1]:.2f} after the runs.")
    L.append("")
    return L


def summarize_presence(runs):
    """Presence (issue 26): per workload, each trial's figures as the load generator wrote them."""
    out = {}
    for w in PRES:
        rs = (runs.get(w) or {}).get("wsrelay")
        if rs:
            out[w] = [{"trial": r.get("trial"), "presence": r.get("presence"), "lost_connections": r.get("lost_connections"),
                       "errors": r.get("errors"), "cores": r.get("cores"), "loadavg": r.get("loadavg")} for r in rs]
    return out


def pct(v):
    return f"{fmt(v * 100)}%" if v is not None else "–"


def other_share(trial, phase, seconds):
    """The share of the server's core busy with other processes' work during a presence phase:
    the core's busy share less the relay's and its nats-server's CPU over the phase."""
    sc = (trial.get("cores") or {}).get("server", 0)
    busy = (phase.get("cores_busy") or {}).get(f"cpu{sc}")
    cpu = phase.get("cpu_seconds") or {}
    if busy is None or not seconds:
        return None
    return max(0.0, busy - ((cpu.get("server") or 0) + (cpu.get("nats") or 0)) / seconds)


def presence_section(runs, summary, d, standalone):
    """The presence section, between markers (a run of its workload alone replaces just this
    section of the document)."""
    pr = summary.get("presence") or {}
    if not pr:
        return []
    L = [PRES_BEGIN, "## Presence: a 10,000-member channel (wsrelay)", ""]
    p = L.append
    if standalone:
        L += measured_apart(runs, d, PRES)
    for w, trials in pr.items():
        first = trials[0]["presence"] or {}
        j0, c0 = first.get("join") or {}, first.get("churn") or {}
        n = j0.get("members")
        p(f"Issue 26: one channel (`{first.get('channel')}`) of {fmt(n)} members, occupancy only ({w}). wsrelay only: the peers have")
        p("no equivalent presence over NATS (nats-server has no membership at all; Centrifugo keeps presence in its own")
        p("presence manager, in memory or Redis, not through the NATS broker it runs with on this page). The relay's")
        p("nats-server runs JetStream for this workload alone (the connection registry is a KV bucket in it), on the")
        p("server's core like the relay. Relay config besides the other workloads' (as run):")
        p("")
        p("```yaml")
        p(read(os.path.join(d, "config", "presence.yaml")).strip())
        p("```")
        p("")
        p(f"Every member is a connection with a token of its own `sub`, subscribed with `presence: true`; {fmt(n)} members are")
        p("above `maxMembersWithEvents` (200): the channel sends `occupancy` only, at most one per second per subscriber.")
        p(f"`leaveGraceSeconds: 2` (default 10) so that the churn's leavers leave within its window. Three phases, one run:")
        p("")
        p(f"1. **Join**: the members connect and subscribe at {fmt(j0.get('rate'))}/s (at most 256 joins in flight). Join")
        p("   latency = the `subscribe` with `presence: true` sent to its `ok` (the relay has stored the membership in the")
        p("   registry and read it back), by the channel's size when the member joined. Relay CPU and memory over the phase")
        p("   (`/proc`), per member joined; every member receives the channel's `occupancy` meanwhile (part of the cost).")
        p(f"2. **Snapshot**: {fmt((first.get('snapshot') or {}).get('repetitions'))} fresh connections, one after another, subscribe with `presence: true` to the full")
        p("   channel (time to the `ok`, whose `presence` is the first page of 100 members), then page every member with")
        p(f"   `presence` requests (limit {fmt((first.get('snapshot') or {}).get('page_limit'))}, from the start) until `complete`, then unsubscribe.")
        p(f"3. **Churn**: {fmt(c0.get('rate'))} members per second leave (close their connection) and {fmt(c0.get('rate'))} new ones (`sub`s never")
        p(f"   seen) join, for {fmt(c0.get('seconds'))} s. A steady observer (a connection subscribed with `presence: true` before")
        p(f"   it) counts the presence frames it receives over the churn and {fmt((c0.get('observer') or {}).get('tail_seconds'))} s after (when the last leavers' grace")
        p("   ends). **The bound** (issue 26): occupancy only (no `join`/`leave`) and at most one per second, checked by the")
        p("   load generator: a window of W seconds admits ⌈W⌉ + 1 (one sent before the window may arrive in it). A violation")
        p("   fails the workload: `wsrelay-load` exits 4, `make bench` exits 4 after writing this page.")
        p("")
        p("One trial on this machine's 2 cores shared with other agents' builds and tests: noisy figures (the other")
        p("processes' share of the cores is given per phase); the bound, not the speed, is the verdict.")
        p("")
        p("**The bound during churn**")
        p("")
        p("| trial | observed s | occupancy frames | join | leave | per second | shortest gap s | `events: true` | users seen | bound |")
        p("|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
        for t in trials:
            c = (t["presence"] or {}).get("churn") or {}
            o, b = c.get("observer") or {}, c.get("bound") or {}
            verdict = "**PASS**" if b.get("pass") else f"**FAIL**: {b.get('reason') or c.get('error') or '?'}"
            users = f"{fmt(o.get('users_min'))}–{fmt(o.get('users_max'))}" if o.get("users_min") is not None else "–"
            p(f"| {t['trial']} | {fmt(o.get('window_seconds'), 1)} | {fmt(o.get('occupancy'))} (at most {fmt(b.get('max_allowed'))}) | {fmt(o.get('join'))} | "
              f"{fmt(o.get('leave'))} | {fmt(o.get('per_second'), 2)} | {fmt(o.get('min_gap_seconds'), 3)} | {fmt(o.get('events_true'))} | {users} | {verdict} |")
        p("")
        p("**Join** (the channel growing to its members)")
        p("")
        p("| trial | joined | failed | joins/s | subscribe p50 ms | p99 ms | max ms | handshake p99 ms | relay CPU-µs per join | its NATS | relay RSS per member | its NATS | other processes on the server core |")
        p("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in trials:
            j = (t["presence"] or {}).get("join") or {}
            s, h = j.get("subscribe") or {}, j.get("handshake") or {}
            rss = j.get("rss_bytes_per_member") or {}
            kib = lambda v: f"{fmt(v / 1024, 1)} KiB" if v is not None else "–"
            p(f"| {t['trial']} | {fmt(j.get('joined'))} | {fmt(j.get('failed'))} | {fmt(j.get('per_second'))} | {fmt(s.get('p50_ms'), 2)} | "
              f"{fmt(s.get('p99_ms'), 2)} | {fmt(s.get('max_ms'), 2)} | {fmt(h.get('p99_ms'), 2)} | {fmt(j.get('relay_cpu_us_per_join'))} | "
              f"{fmt(j.get('nats_cpu_us_per_join'))} | {kib(rss.get('server'))} | {kib(rss.get('nats'))} | {pct(other_share(t, j, j.get('seconds')))} |")
        p("")
        p("Join latency by the channel's size when the member joined (first trial):")
        p("")
        p("| members before | joins | p50 ms | p99 ms | max ms |")
        p("|---|---:|---:|---:|---:|")
        for b in j0.get("by_size") or []:
            s = b.get("subscribe") or {}
            p(f"| {fmt(b['members_from'])}–{fmt(b['members_to'])} | {fmt(s.get('count'))} | {fmt(s.get('p50_ms'), 2)} | {fmt(s.get('p99_ms'), 2)} | {fmt(s.get('max_ms'), 2)} |")
        p("")
        rel = j0.get("relay") or {}
        rec = j0.get("members_received") or {}
        p(f"During the join the relay queued {fmt(rel.get('join_sent'))} `join` frames (while the channel had at most 200 members) and")
        p(f"{fmt(rel.get('occupancy_sent'))} `occupancy` frames; the members received {fmt(rec.get('join'))} and {fmt(rec.get('occupancy'))}. The relay's RSS per member includes")
        p("its connection (an idle authenticated connection costs about 7.6 KiB, \"Idle connections\" above); the NATS server's")
        p("includes the registry's entries (one per connection, one per membership).")
        p("")
        p("**Snapshot** (a new subscriber on the full channel)")
        p("")
        p("| trial | repetitions | failed | `ok` p50 ms | p99 ms | max ms | `ok` bytes (first page) | members in it | users | all members: pages | members | bytes | p50 ms | p99 ms |")
        p("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in trials:
            sn = (t["presence"] or {}).get("snapshot") or {}
            o, a = sn.get("ok") or {}, sn.get("page_all") or {}
            p(f"| {t['trial']} | {fmt(sn.get('repetitions'))} | {fmt(sn.get('failed'))} | {fmt(o.get('p50_ms'), 2)} | {fmt(o.get('p99_ms'), 2)} | "
              f"{fmt(o.get('max_ms'), 2)} | {fmt(sn.get('ok_bytes'))} | {fmt(sn.get('first_page_members'))} | {fmt(sn.get('users'))} | {fmt(sn.get('pages'))} | "
              f"{fmt(sn.get('paged_members'))} | {fmt(sn.get('page_all_bytes'))} | {fmt(a.get('p50_ms'), 1)} | {fmt(a.get('p99_ms'), 1)} |")
        p("")
        reps = (first.get("snapshot") or {}).get("repetitions")
        if reps and reps < 100:
            p(f"With {fmt(reps)} repetitions the p99 is the slowest of them.")
        p("The `ok` carries the first page (100 members), not the channel. `users` counts members in their leave grace")
        p("(earlier repetitions' subscribers); the pages hold them too.")
        p("")
        p("**Churn** (relay CPU while members leave and join)")
        p("")
        p("| trial | leave+join per s | s | new members' subscribe p50 ms | p99 ms | relay core share | its NATS | relay CPU-µs per leave+join | `occupancy` queued by the relay per s | frames received by all members per s | other processes on the server core |")
        p("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in trials:
            c = (t["presence"] or {}).get("churn") or {}
            s, sh, rel = c.get("subscribe") or {}, c.get("core_share") or {}, c.get("relay") or {}
            other = other_share(t, c, c.get("schedule_seconds"))
            obs = (c.get("observer") or {}).get("window_seconds")
            occ = rel.get("occupancy_sent") / obs if obs and rel.get("occupancy_sent") is not None else None
            p(f"| {t['trial']} | {fmt(c.get('rate'))} | {fmt(c.get('seconds'))} | {fmt(s.get('p50_ms'), 2)} | {fmt(s.get('p99_ms'), 2)} | {pct(sh.get('server'))} | "
              f"{pct(sh.get('nats'))} | {fmt(c.get('relay_cpu_us_per_item'))} | {fmt(occ)} | {fmt((c.get('members_received') or {}).get('per_second'))} | {pct(other)} |")
        p("")
        p("Every member is a presence subscriber that gets the channel's `occupancy` once a second while its counts change:")
        p("the relay's CPU during the churn is that fan-out (the frames queued per second above) and the leaves and joins")
        p("themselves (handshakes, tokens, registry writes and reads) together; this run does not separate the two.")
        p("")
        lost = sum(t.get("lost_connections") or 0 for t in trials)
        errs = "; ".join(f"{k} ({v})" for t in trials for k, v in (t.get("errors") or {}).items()) or "none"
        p(f"Connections lost: {fmt(lost)}; errors: {errs}.")
        p("")
    if standalone:
        p(f"Reproduce: `BENCH_WORKLOADS=\"{' '.join(PRES)}\" make bench`; a run of this workload alone rewrites only this section")
        p("of the page.")
        p("")
    p(PRES_END)
    p("")
    return L


def cel_version():
    """The `cel` crate's version in the workspace's Cargo.lock."""
    lock = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "Cargo.lock")
    m = re.search(r'name = "cel"\nversion = "([^"]+)"', read(lock))
    return m.group(1) if m else "(version unknown)"


def splice(path, section, begin=AUTHZ_BEGIN, end=AUTHZ_END):
    """Replaces the section between `begin` and `end` of the document at `path` (or inserts it
    before the targets, or the end), leaving the rest as the last full run wrote it."""
    text = read(path)
    block = "\n".join(section)
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + block + "\n" + tail
    else:
        at = text.find("## Issue 15's targets")
        if at < 0:
            at = text.find("## Reproduce")
        text = text + "\n" + block if at < 0 else text[:at] + block + "\n" + text[at:]
    with open(path, "w") as f:
        f.write(text)


def ladder_series(rs, key):
    """Per ladder rate: the values over trials of key(step) for valid steps."""
    by = {}
    for r in rs:
        last = {}
        for s in r.get("steps", []):
            if s["kind"] in ("ladder", "refine") and valid(s):
                last[s["rate"]] = s
        for rate, s in last.items():
            by.setdefault(rate, []).append(key(s))
    return sorted(by.items())


def plots(runs, d):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    for w in ladders(runs):
        rw = runs.get(w)
        if not rw:
            continue
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        limit = next((r.get("p99_limit_ms") for rs in rw.values() for r in rs), None)
        for t in TARGETS:
            rs = rw.get(t)
            if not rs:
                continue
            for ax, key in ((a, lambda s: max(s["latency"]["p99_ms"], 0.01)),
                            (b, lambda s: s["cpu_us_per_delivery_incl_nats"])):
                ser = [(x, [v for v in vs if v is not None]) for x, vs in ladder_series(rs, key)]
                ser = [(x, vs) for x, vs in ser if vs]
                if not ser:
                    continue
                xs = [x for x, _ in ser]
                ys = [statistics.median(vs) for _, vs in ser]
                lo = [y - min(vs) for y, (_, vs) in zip(ys, ser)]
                hi = [max(vs) - y for y, (_, vs) in zip(ys, ser)]
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=LABEL[t])
        if limit:
            a.axhline(limit, color="grey", linestyle="--", linewidth=1, label=f"p99 limit {limit:g} ms")
        unit = UNIT.get(w, "messages/s")
        a.set(xscale="log", yscale="log", xlabel=f"rate ({unit})", ylabel="p99 latency (ms)", title=f"{w}: p99")
        b.set(xscale="log", yscale="log", xlabel=f"rate ({unit})", ylabel="CPU-µs per delivery (server + its NATS)",
              title=f"{w}: cost per delivery")
        for ax in (a, b):
            ax.legend(fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        name = f"{w}.png"
        fig.savefig(os.path.join(d, name), dpi=90)
        plt.close(fig)
        made.append(name)
    return made


def machine():
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), {mem} RAM, Linux {platform.release()}"


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "–"


def read(path, default=""):
    try:
        return open(path).read()
    except OSError:
        return default


def foreign_load(runs):
    """Per workload: median share of each core busy with work that is not ours (other
    processes of the machine), during the schedules of valid steps."""
    out = {}
    for w, rw in runs.items():
        srv, gen = [], []
        for rs in rw.values():
            for r in rs:
                for s in r.get("steps", []):
                    cb, sh = s.get("cores_busy_during_schedule") or {}, s.get("core_share_during_schedule") or {}
                    sc, gc = r.get("cores", {}).get("server", 0), r.get("cores", {}).get("generator", 1)
                    if f"cpu{sc}" in cb:
                        srv.append(max(0.0, cb[f"cpu{sc}"] - (sh.get("server") or 0) - (sh.get("nats") or 0)))
                    if f"cpu{gc}" in cb:
                        gen.append(max(0.0, cb[f"cpu{gc}"] - (sh.get("loadgen") or 0)))
        if srv:
            out[w] = (med(srv), med(gen))
    return out


def doc(runs, summary, d, images, path, step_seconds):
    # When the run ended (run.sh writes versions.txt then), not when this report was written:
    # regenerating the document from the same results keeps its date.
    vpath = os.path.join(d, "config", "versions.txt")
    ended = os.path.getmtime(vpath) if os.path.exists(vpath) else None
    now = datetime.datetime.fromtimestamp(ended, datetime.timezone.utc) if ended else datetime.datetime.now(datetime.timezone.utc)
    now = now.strftime("%Y-%m-%d %H:%M UTC")
    versions = read(vpath).strip()
    seconds = read(os.path.join(d, "config", "seconds.txt")).strip()
    loads = sorted({tuple(r.get("loadavg", [])) for rw in runs.values() for rs in rw.values() for r in rs})
    L = []
    p = L.append
    p("# Benchmarks: wsrelay and its peers, side by side")
    p("")
    p("<!-- Generated by e2e/bench/run.sh (make bench) from target/bench/**/*.json; do not edit by hand. -->")
    p("")
    p(f"Run of {now}, {fmt(int(seconds) / 60 if seconds else None, 0)} min of measuring (`make bench`). Machine: {machine()}.")
    if loads:
        l1 = [float(x[0]) for x in loads if x]
        p(f"The machine was shared while it ran: its 1-minute load average, read after each run, went from {min(l1):.2f} to"
          f" {max(l1):.2f}. Other processes' share of each core during the steps is in the table of workloads below.")
    p("")
    p("```")
    p(versions)
    p("```")
    p("")
    p("## Headline: CPU per delivery, server and its NATS together, at rates every peer sustained")
    p("")
    p("CPU-µs per delivery = CPU time (user + system, `/proc/PID/stat`, 10 ms ticks) of the server process and of the")
    p("nats-server behind it over a step, divided by the messages delivered to clients in it. nats-server's WebSocket listener *is* the NATS server;")
    p("the bare baseline has none. Median over trials, (min–max) when they differ. A rate appears when every peer's")
    p("median maximum sustained rate reached it. Ratio = peer's cost / wsrelay's cost (above 1: wsrelay does the same")
    p("work with less CPU).")
    p("")
    p("| workload | rate (msg/s) | " + " | ".join(LABEL[t] for t in TARGETS) + " | wsrelay vs nats-ws | wsrelay vs Centrifugo |")
    p("|---|---:|" + "---:|" * len(TARGETS) + "---:|---:|")
    for w in CORE:
        e = summary["ladders"].get(w)
        if not e:
            continue
        for rate in e["shared_rates"]:
            cells, m = [], {}
            for t in TARGETS:
                pe = e["peers"].get(t)
                a = pe["at_shared_rates"][str(rate)] if pe else {}
                vals = a.get("cpu_us_per_delivery_incl_nats", [])
                m[t] = med(vals)
                flag = "" if all(a.get("sustained", [True])) else " *"
                cells.append(rng(vals, 2) + flag if pe else "–")
            p(f"| {w} | {fmt(rate)}{' †' if e.get('fallback') else ''} | " + " | ".join(cells) + f" | {ratio(m.get('nats-ws'), m.get('wsrelay'))} | {ratio(m.get('centrifugo'), m.get('wsrelay'))} |")
        if not e["shared_rates"]:
            p(f"| {w} | no rate every peer sustained | " + " | ".join("" for _ in TARGETS) + " | – | – |")
    if any(e.get("fallback") for e in summary["ladders"].values()):
        p("")
        p("† no rate was sustained by every peer in this run: the row is the lowest rate every peer ran, and * marks a peer")
        p("that did not sustain it in every trial (its p99 or delivery failed the criteria; see the tables below).")
    p("")
    p("### Maximum sustained rate under the shared limit, and why each peer stopped")
    p("")
    p("| workload | p99 limit | peer | trials | max rate (msg/s) | deliveries/s there | p99 ms there | stopped because |")
    p("|---|---:|---|---:|---:|---:|---:|---|")
    for w in CORE:
        e = summary["ladders"].get(w)
        if not e:
            continue
        limit = next((r.get("p99_limit_ms") for rs in runs[w].values() for r in rs), None)
        for t in TARGETS:
            pe = e["peers"].get(t)
            if not pe:
                continue
            p(f"| {w} | {fmt(limit)} ms | {LABEL[t]} | {pe['trials']} | {rng(pe['max_sustained_rate'], 0)} | "
              f"{rng(pe['deliveries_per_second_at_max'], 0)} | {rng(pe['p99_ms_at_max'], 1)} | {'; '.join(sorted(set(x or '–' for x in pe['stop_reasons'])))} |")
    p("")
    p("\"generator core saturated\" means the load generator used its whole core in that step: the server was not the")
    p("limit, this machine's client was, and the step was thrown out.")
    p("")
    p("## The peers")
    p("")
    p("Each runs as its users would run it in front of NATS, on one core (`taskset`), with one worker thread:")
    p("")
    p("- **wsrelay**: the relay of this repository, release build, `TOKIO_WORKER_THREADS=1`, behind its own nats-server")
    p("  on the same core. Clients authenticate with an HS256 JWT in the query string; one binding.")
    p("- **nats-server WebSocket**: nats-server's own WebSocket listener (`GOMAXPROCS=1`); clients speak the NATS text")
    p("  protocol (CONNECT with a token, SUB, MSG, PING/PONG): the \"browsers talk to NATS directly\" design.")
    p("- **Centrifugo**: the real server (`github.com/centrifugal/centrifugo/v6`, built from the Go module proxy by")
    p("  `e2e/cluster/go/centrifugo`), `GOMAXPROCS=1`, behind its own nats-server on the same core: its NATS broker in raw")
    p("  mode (backends publish plain payloads on NATS subjects; `:` in a channel becomes `.` in the subject, so channel")
    p("  `bench:u42` is subject `bench.u42`), HS256 connection JWT, namespace `bench` that lets clients subscribe (and")
    p("  publish, for the upstream workload). JSON protocol over WebSocket.")
    p("- **bare baseline**: `wsrelay-baseline` (`e2e/src/bin/wsrelay-baseline.rs`): tokio-tungstenite, one thread, no")
    p("  auth, no NATS, no protocol; the generator publishes into its `/pub` socket. What one core of this machine can")
    p("  push through WebSocket fan-out; not a product.")
    p("")
    p("Configs as run (ports and secrets replaced by placeholders):")
    p("")
    for name, lang in (("wsrelay.yaml", "yaml"), ("centrifugo.json", "json"), ("nats-server.conf", "")):
        text = read(os.path.join(d, "config", name)).strip()
        if text:
            p(f"`{name}`" + (" (every nats-server of the run; the WebSocket block is what nats-ws clients use)" if name.startswith("nats") else
                             " (every other option at its default)" if name.startswith("centrifugo") else
                             " (every other limit at its default; wss runs add `tls: {certFile, keyFile}`)") + ":")
            p("")
            p(f"```{lang}")
            p(text)
            p("```")
            p("")
    for name, lang, what in (("wsrelay.effective.yaml", "yaml", "wsrelay's effective config (the file above as the relay reads it, every default filled in; printed by `wsrelay-effective-config`)"),
                             ("centrifugo.effective.json", "json", "Centrifugo's effective config (`centrifugo defaultconfig -b centrifugo.json -d`: the file above with every default)")):
        text = read(os.path.join(d, "config", name)).strip()
        if text and not text.startswith("error"):
            p(f"<details><summary>{what}</summary>")
            p("")
            p(f"```{lang}")
            p(text)
            p("```")
            p("")
            p("</details>")
            p("")
    p("## Method")
    p("")
    p("- One client for all, `wsrelay-load` (`e2e/src/bin/wsrelay-load.rs`, Rust, one tokio thread). It opens the")
    p("  connections over source addresses 127.0.0.2..127.0.0.33, authenticates and subscribes them, then drives a")
    p("  schedule: item k of a step is due at start + k/rate, and the timestamp it carries is that due time on the")
    p("  monotonic clock, so a late sender shows as latency instead of hiding it (no coordinated omission). Latency =")
    p("  receive time - due time, in an HDR histogram.")
    nice = next((r.get("nice") for rw in runs.values() for rs in rw.values() for r in rs if r.get("nice") is not None), None)
    p(f"- Cores: the server and its nats-server on one core, the generator on the other (`taskset`), every benchmark process")
    p(f"  at niceness {nice} so that the machine's other work yields the cores to them when they want them. Per step, CPU time")
    p("  of server, nats-server and generator from `/proc/PID/stat`, and each core's busy time from `/proc/stat`. A step in")
    p("  which the generator used 90% or more of its core is thrown out (it measured the client), and the ladder stops.")
    p(f"- Steps: a warm-up step (discarded), then a fixed ladder of rates, the same for every peer, {step_seconds} s each plus")
    p("  up to 3 s for what is in flight. A failed rate is run once more (one noisy step on a shared machine is not a")
    p("  knee) and the ladder stops when the repeat fails too; then two steps bisect (geometric mean) between the last")
    p("  sustained and the first failed rate. A step is sustained when its p99 is within the")
    p("  workload's one p99 limit (the same for every peer), at least 99% of the expected deliveries arrived, and no")
    p("  connection was lost.")
    p("- Trials: broadcast-1k, broadcast-10k and personal-10k run three times, the peers one after another with their")
    p("  order rotated per trial, each on fresh processes; tables give the median and the range. The other workloads run")
    p("  once (`BENCH_EXTRA_TRIALS` raises it).")
    p("- wsrelay's own histogram `wsrelay_delivery_latency_seconds` (NATS receive to socket write) is read from its")
    p("  admin port around every step and kept in the JSON next to the client's figure.")
    p("")
    fl = foreign_load(runs)
    p("| workload | what it is | p99 limit | trials | other processes on the server core | on the generator core |")
    p("|---|---|---:|---:|---:|---:|")
    for w in ladders(runs):
        if w not in runs:
            continue
        limit = next((r.get("p99_limit_ms") for rs in runs[w].values() for r in rs), None)
        trials = max(len(rs) for rs in runs[w].values())
        f = fl.get(w, (None, None))
        p(f"| {w} | {DESCRIBE.get(w, '')} | {fmt(limit)} ms | {trials} | {fmt(f[0] * 100 if f[0] is not None else None)}% | {fmt(f[1] * 100 if f[1] is not None else None)}% |")
    p("")
    p("## All workloads with a rate ladder")
    p("")
    p("Per workload: each peer's maximum sustained rate and why it stopped, then at each rate every peer sustained the")
    p("CPU per delivery (server + NATS; the server alone in brackets where a NATS is behind it), the client's p99, and")
    p("for wsrelay its own delivery-latency p99 (bucket upper bound).")
    p("")
    for w in ladders(runs):
        e = summary["ladders"].get(w)
        if not e:
            continue
        unit = UNIT.get(w, "msg/s")
        p(f"### {w}")
        p("")
        p(DESCRIBE.get(w, "") + ".")
        p("")
        p(f"| peer | max rate ({unit}) | deliveries/s there | p99 ms there | stopped because |")
        p("|---|---:|---:|---:|---|")
        for t in TARGETS:
            pe = e["peers"].get(t)
            if pe:
                p(f"| {LABEL[t]} | {rng(pe['max_sustained_rate'], 0)} | {rng(pe['deliveries_per_second_at_max'], 0)} | "
                  f"{rng(pe['p99_ms_at_max'], 1)} | {'; '.join(sorted(set(x or '–' for x in pe['stop_reasons'])))} |")
        p("")
        if e["shared_rates"]:
            p(f"| rate ({unit}) | peer | CPU-µs per delivery incl. NATS | server alone | generator CPU-µs per delivery | p50 ms | p99 ms | wsrelay's own p99 ms |")
            p("|---:|---|---:|---:|---:|---:|---:|---:|")
            for rate in e["shared_rates"]:
                for t in TARGETS:
                    pe = e["peers"].get(t)
                    if not pe:
                        continue
                    a = pe["at_shared_rates"][str(rate)]
                    own = rng(a['cpu_us_per_delivery'], 2) if t in ("wsrelay", "centrifugo") else ""
                    p(f"| {fmt(rate)} | {LABEL[t]} | {rng(a['cpu_us_per_delivery_incl_nats'], 2)} | {own} | {rng(a['generator_cpu_us_per_delivery'], 2)} | "
                      f"{rng(a['p50_ms'], 2)} | {rng(a['p99_ms'], 2)} | {rng(a['relay_p99_ms'], 2) if t == 'wsrelay' else ''} |")
            p("")
        else:
            p("No rate every peer sustained.")
            p("")
        if f"{w}.png" in images:
            p(f"![{w}](benchmarks/{w}.png)")
            p("")
    if summary["storm"]:
        p("## Reconnect storm after a server restart (storm-5k)")
        p("")
        p("5,000 connections subscribed to one channel; the driver kills the server with SIGKILL and starts it again at")
        p("once (nats-ws: the nats-server itself). Every client notices the drop, waits a uniform random time of up to")
        p("1 s, reconnects, authenticates and subscribes again (after a failed attempt it backs off with full jitter, 0.5 s")
        p("doubling to 8 s). \"Back after\" is from the first drop any client saw to that client's confirmed subscription;")
        p(f"it includes the server's start. Then a {step_seconds}-second check step at 10 msg/s counts what arrives. Plain channels: what")
        p("is published meanwhile is not replayed (wsrelay's resumable channels are tested by")
        p("`relay/tests/resume_storm.rs`, not here).")
        p("")
        p("| peer | clients | back | not back | back after p50 s | p99 s | max s | attempts | failed attempts | delivered after |")
        p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in TARGETS:
            for s in summary["storm"].get(t) or []:
                if not s:
                    continue
                ra = s.get("recovered_after") or {}
                da = s.get("delivery_after") or {}
                p(f"| {LABEL[t]} | {fmt(s['clients'])} | {fmt(s['recovered'])} | {fmt(s['not_recovered'])} | {fmt(ra.get('p50_ms', 0) / 1000, 2)} | "
                  f"{fmt(ra.get('p99_ms', 0) / 1000, 2)} | {fmt(ra.get('max_ms', 0) / 1000, 2)} | {fmt(s['reconnect_attempts'])} | {fmt(s['reconnect_failures'])} | "
                  f"{fmt(da['delivery_ratio'] * 100, 1) + '%' if 'delivery_ratio' in da else '– (' + da.get('error', 'not measured')[:60] + ')'} |")
        p("")
    resume_storm = os.path.join(d, "resume-storm.txt")
    if os.path.exists(resume_storm):
        line = read(resume_storm).strip()
        p("## Reconnect storm on resumable channels (wsrelay)")
        p("")
        p("`relay/tests/resume_storm.rs`, run by this script in release: 5,000 clients on resumable channels")
        p("(history) of one relay, a publisher running; the relay is killed with SIGKILL and another one started;")
        p("every client reconnects and subscribes with its last position. Lost must be 0 (the test fails")
        p("otherwise). \"Caught up\" is from the kill to the client holding the last message published;")
        p("JetStream reads are what the new relay asked of the stream (load: one per channel's ring).")
        p("")
        m = re.match(r"storm: (\d+) clients, (\d+) messages \((\d+) before the kill\), lost (\d+), doubled (\d+), "
                     r"not recovered (\d+); caught up after the kill p50 ([\d.]+) s, p99 ([\d.]+) s, max ([\d.]+) s; "
                     r"relay B JetStream reads: load ([\d.]+), check ([\d.]+), fill ([\d.]+)", line)
        if m:
            g = m.groups()
            p("| clients | messages | lost | doubled | not recovered | caught up p50 s | p99 s | max s | JetStream reads (load, check, fill) |")
            p("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
            p(f"| {fmt(int(g[0]))} | {fmt(int(g[1]))} | {g[3]} | {g[4]} | {g[5]} | {g[6]} | {g[7]} | {g[8]} | "
              f"{int(float(g[9]))}, {int(float(g[10]))}, {int(float(g[11]))} |")
        else:
            p(f"Not measured in this run: {line or 'no figures printed'}")
        p("")
    if summary["slow"]:
        p("## Slow consumers (slow-1k)")
        p("")
        p("1,000 connections on one channel, 1 KiB payloads; 100 of them never read after subscribing (4 KiB receive")
        p("buffer). The healthy 900 are expected to receive everything; each step runs 8 s. Server memory is its RSS at the")
        p("end of the step.")
        p("")
        p("| peer | rate (msg/s) | healthy delivered | healthy p99 ms | server RSS MiB | verdict |")
        p("|---|---:|---:|---:|---:|---|")
        for t in TARGETS:
            for trial in summary["slow"].get(t) or []:
                for s in trial:
                    if s["kind"] == "warmup":
                        continue
                    p(f"| {LABEL[t]} | {fmt(s['rate'])} | {fmt((s['delivery_ratio'] or 0) * 100, 1)}% | {fmt(s['p99_ms'], 1)} | "
                      f"{fmt((s['server_rss_bytes'] or 0) / 2**20, 1)} | {s['verdict']}{': ' + s['reason'] if s['reason'] else ''} |")
        p("")
    if summary["idle"]:
        p("## Idle connections and handshakes")
        p("")
        idle_n = max((x["connections"] for v in summary["idle"].values() for x in v), default=0)
        conc = next((x["concurrency"] for v in summary["idle"].values() for x in v), None)
        p(f"{fmt(idle_n)} authenticated connections that subscribe to nothing, {conc} handshakes in flight. RSS per")
        p("connection = (server VmRSS after holding them 5 s - before connecting) / connections. The TCP counters are the")
        p("kernel's (`/proc/net/netstat`, what `nstat` reads) over the connect phase, for the whole machine.")
        p("")
        p("| peer | connections | failed | RSS per connection KiB | handshakes/s | handshake p50 ms | p99 ms | max ms | ListenOverflows | ListenDrops | TCPSynRetrans | TCPTimeouts |")
        p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in TARGETS:
            for x in summary["idle"].get(t) or []:
                c = x["tcp_counters"]
                rss = x["rss_bytes_per_connection"]
                p(f"| {LABEL[t]} | {fmt(x['connections'])} | {fmt(x['connect_failed'])} | {fmt(rss / 1024 if rss else None, 1)} | "
                  f"{fmt(x['handshakes_per_second'])} | {fmt(x['handshake_p50_ms'], 1)} | {fmt(x['handshake_p99_ms'], 1)} | {fmt(x['handshake_max_ms'], 1)} | "
                  f"{fmt(c.get('TcpExt.ListenOverflows'))} | {fmt(c.get('TcpExt.ListenDrops'))} | {fmt(c.get('TcpExt.TCPSynRetrans'))} | {fmt(c.get('TcpExt.TCPTimeouts'))} |")
        p("")
        # What this run's counters say, peer by peer: written from the data, not fixed text.
        p("A TCP client whose SYN is dropped retransmits it after 1 s (the initial retransmission timeout); the kernel")
        p("drops a SYN when the listening socket's accept queue is full and counts it in `ListenOverflows`/`ListenDrops`,")
        p("the client side in `TCPSynRetrans`. The counters are for the whole machine (other loopback traffic counts as")
        p("well). In this run:")
        p("")
        for t in TARGETS:
            for x in summary["idle"].get(t) or []:
                c = x["tcp_counters"]
                over = (c.get("TcpExt.ListenOverflows") or 0) + (c.get("TcpExt.ListenDrops") or 0)
                retrans = c.get("TcpExt.TCPSynRetrans") or 0
                p99 = x["handshake_p99_ms"]
                if over or retrans:
                    why = (f"{fmt(over)} listen overflows/drops and {fmt(retrans)} SYN retransmits during its connect phase: "
                           f"{'its p99 of ' + fmt(p99, 1) + ' ms includes clients that waited for a retransmitted SYN' if p99 >= 900 else 'too few to reach its p99 (' + fmt(p99, 1) + ' ms)'}")
                else:
                    why = f"no listen overflow and no SYN retransmit: its handshake p99 ({fmt(p99, 1)} ms) is queueing behind the CPU"
                p(f"- {LABEL[t]}: {why}.")
        p("")
        p("History (2026-11-28): the relay's handshake p99 was about 1 s while it listened with tokio's default backlog")
        p("of 128 (`TcpListener::bind`): 256 handshakes in flight overflowed it. nats-server and Centrifugo (Go) ask")
        p("`listen(2)` for `net.core.somaxconn`; the relay now does the same (`relay/src/runtime/process.rs`), and the baseline too.")
        p("")
    for line in cpu_profile.section(d):
        p(line)
    for line in authorize_section(runs, summary, d, standalone=False):
        p(line)
    for line in presence_section(runs, summary, d, standalone=False):
        p(line)
    p("## Issue 15's targets against this run")
    p("")
    for line in targets(summary):
        p(f"- {line}")
    p("")
    p("## Reproduce")
    p("")
    p("`make bench` (or `e2e/bench/run.sh`). `BENCH_QUICK=1` runs one trial of everything with 2-second steps;")
    p("`BENCH_WORKLOADS=smoke` checks the harness in about a minute; `BENCH_WORKLOADS`, `BENCH_TARGETS`, `BENCH_TRIALS`,")
    p("`BENCH_CORES` narrow or move a run; `BENCH_RELAY_BIN` measures another wsrelay binary (before/after). Raw results:")
    p("`target/bench/<workload>/<peer>.<trial>.json` (every step: CPU per process, core shares, latency, the relay's")
    p("histogram, verdict and reason), `target/bench/summary.json`; plots copied to `docs/benchmarks/`. A before/after of")
    p("the relay alone: `e2e/bench/before-after.sh <old binary>` runs personal-10k, broadcast-1k and idle against the old")
    p("binary and the one built from the tree, trial after trial interleaved (three each), and `e2e/bench/compare.py` prints")
    p("each figure's median and spread and flags the new binary where it is worse than the old one's worst trial")
    p("(recorded runs: [before-after.md](before-after.md)). `BENCH_WORKLOADS=\"subscribe-plain subscribe-rule subscribe-cached")
    p("subscribe-miss\"` measures channel authorization alone and rewrites only its section of this page;")
    p("`BENCH_WORKLOADS=presence-10k` presence alone, likewise.")
    p("")
    with open(path, "w") as f:
        f.write("\n".join(L))


def targets(summary):
    out = []
    for w in CORE:
        e = summary["ladders"].get(w)
        if not e or not e["shared_rates"]:
            continue
        rs_n, rs_c = [], []
        for rate in e["shared_rates"]:
            g = lambda t: med((e["peers"].get(t) or {}).get("at_shared_rates", {}).get(str(rate), {}).get("cpu_us_per_delivery_incl_nats", []))
            ws, nw, cf = g("wsrelay"), g("nats-ws"), g("centrifugo")
            if ws and nw:
                rs_n.append((nw / ws, rate))
            if ws and cf:
                rs_c.append((cf / ws, rate))
        if rs_n:
            worst = min(rs_n)
            out.append(f"{w}: deliveries per CPU-second incl. NATS, wsrelay / nats-ws, goal at least 1.0x at every shared rate: "
                       f"lowest {worst[0]:.2f}x (at {fmt(worst[1])} msg/s) — {'met' if worst[0] >= 1.0 else 'not met'}.")
        if rs_c:
            worst = min(rs_c)
            out.append(f"{w}: wsrelay / Centrifugo, goal at least 1.5x: lowest {worst[0]:.2f}x (at {fmt(worst[1])} msg/s) — "
                       f"{'met' if worst[0] >= 1.5 else 'not met'}.")
    e = summary["ladders"].get("personal-10k")
    if e:
        for rate in e["shared_rates"]:
            a = e["peers"].get("wsrelay", {}).get("at_shared_rates", {}).get(str(rate), {})
            n = e["peers"].get("nats-ws", {}).get("at_shared_rates", {}).get(str(rate), {})
            own, p99, np99 = med(a.get("cpu_us_per_delivery", [])), med(a.get("p99_ms", [])), med(n.get("p99_ms", []))
            if own is not None:
                out.append(f"personal-10k at {fmt(rate)} msg/s: relay CPU per delivery {own:.1f} µs (goal at most 8: "
                           f"{'met' if own <= 8 else 'not met'}); p99 {fmt(p99, 2)} ms vs nats-ws {fmt(np99, 2)} ms "
                           f"({'met' if p99 is not None and np99 is not None and p99 <= np99 else 'not met'}).")
    for w in CORE:
        e = summary["ladders"].get(w)
        if not e or "wsrelay" not in e["peers"] or "baseline" not in e["peers"]:
            continue
        mx = med(e["peers"]["wsrelay"]["max_sustained_rate"])
        if not mx:
            continue
        # The ladder rate nearest half of wsrelay's max that both ran.
        rates = sorted(set(e["shared_rates"]))
        cand = [r for r in rates if r <= mx / 2] or rates[:1]
        if not cand:
            continue
        r = cand[-1]
        a = med(e["peers"]["wsrelay"]["at_shared_rates"][str(r)]["p99_ms"])
        b = med(e["peers"]["baseline"]["at_shared_rates"][str(r)]["p99_ms"])
        if a is not None and b:
            out.append(f"{w}: p99 at about half wsrelay's max ({fmt(r)} of {fmt(mx)} msg/s): {a:.2f} ms vs baseline {b:.2f} ms = "
                       f"{a / b:.1f}x (goal at most 2x: {'met' if a <= 2 * b else 'not met'}).")
    for x in summary["idle"].get("wsrelay") or []:
        rss = x["rss_bytes_per_connection"]
        if rss:
            out.append(f"Idle: {rss / 1024:.1f} KiB RSS per authenticated connection at {fmt(x['connections'])} (goal at most 8: "
                       f"{'met' if rss / 1024 <= 8 else 'not met'}); handshake p99 {x['handshake_p99_ms']:.1f} ms at {x['concurrency']} in flight "
                       f"(goal under 50: {'met' if x['handshake_p99_ms'] < 50 else 'not met'}).")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--nofile", default="?")
    ap.add_argument("--step", default="4")
    ap.add_argument("--doc")
    ap.add_argument("--authorize-only", action="store_true",
                    help="the run measured the authorization workloads alone: rewrite only their section of --doc")
    ap.add_argument("--presence-only", action="store_true",
                    help="the run measured the presence workload alone (with --authorize-only: and those): rewrite only its section of --doc")
    a = ap.parse_args()
    runs = load(a.dir)
    only = (AUTHZ if a.authorize_only else []) + (PRES if a.presence_only else [])
    if only:
        # Results of other workloads left in the directory by earlier runs are not this run's.
        runs = {w: rw for w, rw in runs.items() if w in only}
    summary = summarize(runs)
    summary["authorize"] = summarize_authz(runs)
    summary["presence"] = summarize_presence(runs)
    summary["nofile_limit"] = a.nofile
    with open(os.path.join(a.dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    images = plots(runs, a.dir)
    if a.doc and only and os.path.exists(a.doc):
        # wsrelay-only workloads alone: their sections of the document, the rest (and its
        # plots) as the last full run left them.
        if a.authorize_only:
            splice(a.doc, authorize_section(runs, summary, a.dir, standalone=True))
        if a.presence_only:
            splice(a.doc, presence_section(runs, summary, a.dir, standalone=True), PRES_BEGIN, PRES_END)
    elif a.doc:
        img_dir = os.path.join(os.path.dirname(a.doc), "benchmarks")
        os.makedirs(img_dir, exist_ok=True)
        for old in os.listdir(img_dir):
            if old.endswith(".png") and old not in images:
                os.remove(os.path.join(img_dir, old))
        for i in images:
            shutil.copy(os.path.join(a.dir, i), os.path.join(img_dir, i))
        doc(runs, summary, a.dir, images, a.doc, a.step)
    print(json.dumps({w: {t: v["max_sustained_rate"] for t, v in e["peers"].items()} for w, e in summary["ladders"].items()}, indent=1))


if __name__ == "__main__":
    main()
