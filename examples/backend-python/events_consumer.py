"""Reads a gateway's lifecycle events from its JetStream stream with a durable pull consumer,
and keeps who is online (docs/backend.md, "Lifecycle events").

    python events_consumer.py --stream "$(kubectl get websocketgateway chat \
        -o jsonpath='{.status.events.stream}')" --durable presence

Prints one JSON line per event: {"event": <the event>, "online": {<sub>: [<connection>, ...]}}.
Runs until SIGINT or SIGTERM. Delivery is at least once: the state below is built so that an
event seen twice changes nothing.
"""

import argparse
import asyncio
import json
import os
import signal
import sys

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy


class Online:
    """Open connections by id, each with its sub and channels (the state a backend keeps)."""

    def __init__(self):
        self.connections = {}  # connection id -> {"sub": ..., "channels": set()}

    def apply(self, e):
        conn = e["connection"]
        kind = e["type"]
        if kind == "Connected":
            self.connections.setdefault(conn, {"sub": e.get("sub"), "channels": set()})
        elif kind == "Subscribed" and conn in self.connections:
            self.connections[conn]["channels"].add(e["channel"])
        elif kind == "Unsubscribed" and conn in self.connections:
            self.connections[conn]["channels"].discard(e["channel"])
        elif kind == "Disconnected":
            # The end of the connection and of all its subscriptions; a relay that died is
            # said Disconnected (reason "relay_lost") by a surviving relay.
            self.connections.pop(conn, None)

    def by_sub(self):
        subs = {}
        for conn, c in sorted(self.connections.items()):
            subs.setdefault(c["sub"] or "(anonymous)", []).append(conn)
        return subs


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nats", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"),
                   help="NATS URL; a user and password may be in it (nats://user:pass@host:4222)")
    p.add_argument("--creds", default=os.environ.get("NATS_CREDS"), help="a NATS .creds file")
    p.add_argument("--stream", required=True, help="the gateway's status.events.stream")
    p.add_argument("--durable", default="backend", help="the consumer's name (kept by JetStream)")
    args = p.parse_args()

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)

    async def on_error(e):  # one line (nats-py's default prints a traceback); it reconnects
        print(f"NATS: {e!r}", file=sys.stderr)

    nc = await nats.connect(args.nats, user_credentials=args.creds, error_cb=on_error)
    js = nc.jetstream()
    # Created on the first run, resumed afterwards from the first event not acknowledged.
    # The stream holds only the gateway's events (subjects <events.subject>.*).
    sub = await js.pull_subscribe(
        "",
        durable=args.durable,
        stream=args.stream,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
                              filter_subject=">"),
    )
    online = Online()
    while not stop.is_set():
        try:
            msgs = await sub.fetch(batch=100, timeout=1)
        except asyncio.TimeoutError:  # nats-py raises it, or its subclass, when none came
            continue
        for msg in msgs:
            event = json.loads(msg.data)
            online.apply(event)
            print(json.dumps({"event": event, "online": online.by_sub()}), flush=True)
            # Acknowledged once applied: after a crash, what was not acknowledged comes again.
            await msg.ack()
    # Unsubscribed first: with a pull subscription open, nats-py 2.16's drain() hangs.
    await sub.unsubscribe()
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
