"""The profile section of docs/benchmarks.md: where the relay's CPU goes per personal delivery.

run.sh runs relay/tests/delivery_cost.rs (10,000 personal clients, 16,000 msg/s, relay and its
nats-server on the server core) with perf sampling the relay, into <dir>/profile/:
  cost.txt    the test's output (CPU per delivery from /proc, system calls per delivery)
  leaves.txt  `perf script -F ip,sym --hide-call-graph`: per sample, the function it hit
  stacks.txt  `perf script -F period,ip,sym`: per sample (a line with its period, then its call
              stack, leaf first; empty where user space did not unwind), in the same order
This sorts the samples into parts and prints them with their share and µs per delivery.
"""

import os
import re

KERNEL = 0xFFFF800000000000

# Kernel samples by the system call they ran in (the first match walking up the stack).
SYSCALLS = [
    ("__x64_sys_sendto", "sendto: writing a frame to a client's socket"),
    ("__x64_sys_recvfrom", "recvfrom: reading from NATS (and from clients)"),
    ("__x64_sys_epoll_wait", "epoll_wait: waiting for sockets, sleeping"),
]

# User-space samples by their own function (leaf), first match wins.
USER = [
    ("async_nats", "async-nats: NATS protocol, per-subscription channels"),
    ("tungstenite", "tungstenite: WebSocket framing"),
    ("serde_json", "serde_json: the payload's JSON check"),
    ("wsrelay::fanout", "wsrelay hub: fan-out"),
    ("wsrelay::protocol", "wsrelay protocol: encoding frames"),
    ("wsrelay::", "wsrelay: connection, sink, outbox"),
    ("poll_fn::PollFn", "task bodies inlined into their pollers (subject loop, writer)"),
    ("TrackedFuture", "task bodies inlined into their pollers (subject loop, writer)"),
    ("tokio::", "tokio: scheduler, I/O driver, timers"),
    ("futures_util", "futures: the split stream's lock, sink adapters"),
    ("clock_gettime", "clock reads"),
    ("mem", "libc: memory copies and compares"),
    ("malloc", "allocator"),
    ("free", "allocator"),
    ("_int_", "allocator"),
]


def samples(leaves_path, stacks_path):
    """Yields each sample as (leaf address, leaf symbol, symbols of its stack)."""
    stacks, cur = [], None
    with open(stacks_path, errors="replace") as f:
        for line in f:
            t = line.strip()
            if re.fullmatch(r"\d+", t):
                cur = []
                stacks.append(cur)
            elif t and cur is not None:
                cur.append(t.partition(" ")[2])
    with open(leaves_path, errors="replace") as f:
        for line, stack in zip(f, stacks):
            addr, _, sym = line.strip().partition(" ")
            try:
                yield int(addr, 16), sym, stack
            except ValueError:
                continue


def classify(leaf_addr, leaf, syms):
    if leaf_addr >= KERNEL:
        for marker, part in SYSCALLS:
            if marker in syms:
                if marker == "__x64_sys_sendto" and "handle_softirqs" in syms:
                    return "kernel", "sendto, of which the loopback receive path (softirq: the client's TCP receive, its wake-up)"
                return "kernel", part
        if any(s.startswith("__x64_sys_") for s in syms):
            return "kernel", "other system calls"
        if "handle_softirqs" in syms:
            return "kernel", "softirq outside system calls"
        return "kernel", "other kernel: scheduling, interrupts, page faults"
    for marker, part in USER:
        if marker in leaf:
            return "user", part
    return "user", "other user space (libc, std, prometheus-client, ...)"


def figures(cost):
    """(relay µs/delivery, nats µs/delivery, relay syscalls text, nats syscalls text, p99 text)."""
    m = re.search(r"relay cpu [\d.]+s = ([\d.]+) us/delivery; nats-server cpu [\d.]+s = ([\d.]+) us/delivery", cost)
    rs = re.search(r"^relay system calls per delivery: (.*)$", cost, re.M)
    ns = re.search(r"^nats-server system calls per delivery: (.*)$", cost, re.M)
    lat = re.search(r"p50 ([\d.]+) ms, p99 ([\d.]+) ms", cost)
    return (float(m.group(1)) if m else None, float(m.group(2)) if m else None,
            rs.group(1) if rs else None, ns.group(1) if ns else None, lat.groups() if lat else None)


def section(d):
    """The section's lines, or [] when no profile was taken."""
    paths = [os.path.join(d, "profile", f) for f in ("cost.txt", "leaves.txt", "stacks.txt")]
    if not all(os.path.exists(p) for p in paths):
        return []
    cost_path, leaves_path, stacks_path = paths
    relay_us, nats_us, relay_calls, nats_calls, lat = figures(open(cost_path, errors="replace").read())
    counts, total = {}, 0
    for sample in samples(leaves_path, stacks_path):
        key = classify(*sample)
        counts[key] = counts.get(key, 0) + 1
        total += 1
    if not total or relay_us is None:
        return []
    L = ["## Where the relay's CPU goes (personal deliveries, profiled)", ""]
    L.append("`relay/tests/delivery_cost.rs` run by this script: 10,000 clients each subscribed to its own subject, 16,000")
    L.append("messages/s of 128 bytes for 8 s, the relay (one tokio worker) and its nats-server on the server core as above, the")
    L.append("clients on the other. CPU from `/proc`; system calls counted with `perf stat` on their tracepoints; the parts from")
    L.append(f"`perf record -e cpu-clock -g` on the relay ({total:,} samples), kernel samples by the system call they ran in,")
    L.append("user-space samples by their own function.")
    L.append("")
    L.append(f"- relay: {relay_us:.2f} µs of CPU per delivery; its nats-server: {nats_us:.2f} µs.")
    if relay_calls:
        L.append(f"- relay system calls per delivery: {relay_calls}.")
    if nats_calls:
        L.append(f"- nats-server system calls per delivery: {nats_calls}.")
    if lat:
        L.append(f"- client latency (scheduled send to receive) in this run: p50 {lat[0]} ms, p99 {lat[1]} ms.")
    L.append("")
    L.append("| part | share of relay CPU | µs per delivery |")
    L.append("|---|---:|---:|")
    for side in ("kernel", "user"):
        side_n = sum(n for (s, _), n in counts.items() if s == side)
        L.append(f"| **{side}** | **{side_n / total * 100:.1f}%** | **{relay_us * side_n / total:.2f}** |")
        for (s, part), n in sorted(counts.items(), key=lambda kv: -kv[1]):
            if s == side:
                L.append(f"| {part} | {n / total * 100:.1f}% | {relay_us * n / total:.2f} |")
    sendto = sum(n for (s, part), n in counts.items() if s == "kernel" and part.startswith("sendto"))
    L.append("")
    L.append(f"Writing each frame to its client's socket (`sendto`, one per delivery) is {sendto / total * 100:.0f}% of the relay's CPU,")
    L.append(f"{relay_us * sendto / total:.2f} µs per delivery. Each client here has its own socket and a message every few seconds, so")
    L.append("whichever server delivers it makes a write per delivery. What the relay adds to that is its NATS hop (its")
    L.append("nats-server's routing, the relay's reads from NATS) and its user-space work above.")
    sendto_us = relay_us * sendto / total
    if sendto_us > 8:
        L.append(f"Issue 15's goal of at most 8 µs of relay CPU per personal delivery is below what this one system call")
        L.append(f"costs on this machine ({sendto_us:.2f} µs), before any of the relay's own work.")
    L.append("")
    return L
