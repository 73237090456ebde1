"""Commands a gateway's relays through the control service `wsrelay_control`
(docs/backend.md, "The control service"): one NATS request, the JSON reply printed.

    python control.py --subject wsrelay.control.default.chat connections --sub 42
    python control.py --subject wsrelay.control.default.chat disconnect --sub 42 --no-reconnect
    python control.py --subject ... revoke --jti t-81f2 --until 1796003600
    python control.py --subject ... invalidate --sub 42 --issued-before 1796000000

Exits 0 with the reply on stdout; 1 when the service refused the command (its reason on
stderr); 2 when no service answered (none on this subject, or NATS not reachable), as
`wsrelay ctl` does.
"""

import argparse
import asyncio
import json
import os
import sys

import nats

TIMEOUT = 5  # seconds: the relays gather their answers within 2


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nats", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"),
                   help="NATS URL; a user and password may be in it (nats://user:pass@host:4222)")
    p.add_argument("--creds", default=os.environ.get("NATS_CREDS"), help="a NATS .creds file")
    subject = os.environ.get("WSRELAY_CONTROL_SUBJECT")
    p.add_argument("--subject", default=subject, required=subject is None,
                   help="the gateway's status.control.subject (or WSRELAY_CONTROL_SUBJECT)")
    cmds = p.add_subparsers(dest="command", required=True)

    def selector(c):
        c.add_argument("--sub", help="the token's sub claim")
        c.add_argument("--iss", help="with --sub: only tokens of this issuer")
        c.add_argument("--connection", help="one connection: <relay>/<n>, as in the events")

    selector(cmds.add_parser("connections", help="list connections"))
    d = cmds.add_parser("disconnect", help="close connections (4100; 4101 with --no-reconnect)")
    selector(d)
    d.add_argument("--no-reconnect", action="store_true", help="tell the clients not to come back")
    r = cmds.add_parser("revoke", help="refuse one token (its jti) until it expires")
    r.add_argument("--jti", required=True)
    r.add_argument("--until", type=int, required=True, help="the token's exp (Unix seconds)")
    i = cmds.add_parser("invalidate", help="refuse a sub's tokens issued before a time")
    i.add_argument("--sub", required=True)
    i.add_argument("--iss")
    i.add_argument("--issued-before", type=int, required=True, help="Unix seconds")
    i.add_argument("--until", type=int, help="how long it holds (Unix seconds; default a day)")
    return p.parse_args()


def request_body(args):
    fields = {
        "sub": getattr(args, "sub", None),
        "iss": getattr(args, "iss", None),
        "connection": getattr(args, "connection", None),
        "jti": getattr(args, "jti", None),
        "issuedBefore": getattr(args, "issued_before", None),
        "until": getattr(args, "until", None),
    }
    if getattr(args, "no_reconnect", False):
        fields["reconnect"] = False
    return {k: v for k, v in fields.items() if v is not None}


async def main():
    args = parse_args()
    subject = f"{args.subject}.{args.command}"
    async def quiet(e):  # nats-py prints a traceback per failed attempt by default
        pass

    try:
        # One attempt: nats-py's default is to try again forever.
        nc = await asyncio.wait_for(
            nats.connect(args.nats, user_credentials=args.creds, max_reconnect_attempts=1,
                         allow_reconnect=False, error_cb=quiet),
            TIMEOUT)
    except Exception as e:  # any failure to connect is "not reached"
        print(f"NATS {args.nats}: {e!r}", file=sys.stderr)
        return 2
    try:
        reply = await nc.request(subject, json.dumps(request_body(args)).encode(), timeout=TIMEOUT)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as e:
        print(f"no control service answered on {subject}: {e}", file=sys.stderr)
        return 2
    finally:
        await nc.close()
    # The NATS micro conventions: a refusal is said in headers (400: an invalid command).
    headers = reply.headers or {}
    if "Nats-Service-Error" in headers:
        print(f"refused ({headers.get('Nats-Service-Error-Code')}): {headers['Nats-Service-Error']}",
              file=sys.stderr)
        return 1
    print(json.dumps(json.loads(reply.data)))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
