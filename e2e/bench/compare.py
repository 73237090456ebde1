#!/usr/bin/env python3
"""Compares interleaved before/after runs of the relay alone (e2e/bench/before-after.sh).

usage: compare.py OUT TRIALS WORKLOAD...

Reads OUT/{before,after}.<trial>/<workload>/wsrelay.1.json. For each ladder workload: the
highest rate sustained, and at every rate both sides sustained in every trial, the relay's CPU
per delivery and the client-measured p99; for `idle`: resident bytes per connection and the
handshake p99. Each figure is shown as the median and the spread (min..max) over the trials;
a figure is flagged WORSE when the after side's median is worse than the before side's worst
trial, i.e. outside the trials' own spread.
"""
import json
import statistics
import sys
from pathlib import Path


def load(out, side, trials, workload):
    runs = []
    for t in range(1, trials + 1):
        p = Path(out) / f"{side}.{t}" / workload / "wsrelay.1.json"
        if p.exists():
            runs.append(json.loads(p.read_text()))
    return runs


def spread(values):
    vs = [v for v in values if v is not None]
    if not vs:
        return None
    return statistics.median(vs), min(vs), max(vs)


def fmt(s, unit):
    if s is None:
        return "-"
    med, lo, hi = s
    return f"{med:,.2f}{unit} ({lo:,.2f}..{hi:,.2f})"


def verdict(before, after, higher_is_better):
    if before is None or after is None:
        return "n/a"
    worse = after[0] < before[1] if higher_is_better else after[0] > before[2]
    return "WORSE" if worse else "ok"


def steps_at(run, rate):
    return [s for s in run.get("steps", []) if s.get("rate") == rate and s.get("kind") == "ladder"]


def main():
    out, trials, workloads = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    worse = 0
    for w in workloads:
        b, a = load(out, "before", trials, w), load(out, "after", trials, w)
        print(f"== {w}: {len(b)} trials before, {len(a)} after")
        rows = []
        if w == "idle":
            rss = lambda r: (r.get("idle", {}).get("rss_bytes_per_connection", {}) or {}).get("server")
            hs = lambda r: r.get("handshake", {}).get("latency", {}).get("p99_ms")
            rows.append(("RSS per connection (KiB)", [(rss(r) or 0) / 1024 for r in b], [(rss(r) or 0) / 1024 for r in a], False, " KiB"))
            rows.append(("handshake p99", [hs(r) for r in b], [hs(r) for r in a], False, " ms"))
        else:
            rows.append(("max sustained rate", [r.get("max_sustained_rate") for r in b], [r.get("max_sustained_rate") for r in a], True, "/s"))
            every = b + a
            rates = sorted({s["rate"] for r in every for s in r.get("steps", []) if s.get("kind") == "ladder"})
            shared = [rate for rate in rates
                      if every and all(any(s.get("verdict") == "sustained" for s in steps_at(r, rate)) for r in every)]
            for rate in shared:
                pick = lambda rs, f: [f(steps_at(r, rate)[-1]) for r in rs]
                rows.append((f"CPU per delivery at {rate:,}/s", pick(b, lambda s: s.get("cpu_us_per_delivery")),
                             pick(a, lambda s: s.get("cpu_us_per_delivery")), False, " µs"))
                rows.append((f"p99 at {rate:,}/s", pick(b, lambda s: s["latency"]["p99_ms"]),
                             pick(a, lambda s: s["latency"]["p99_ms"]), False, " ms"))
        for name, bv, av, higher, unit in rows:
            sb, sa = spread(bv), spread(av)
            v = verdict(sb, sa, higher)
            worse += v == "WORSE"
            print(f"  {name:32} before {fmt(sb, unit):34} after {fmt(sa, unit):34} {v}")
    print(f"figures worse than the before side's spread: {worse}")


if __name__ == "__main__":
    main()
