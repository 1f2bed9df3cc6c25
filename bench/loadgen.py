"""One load step by hand against a relay already running: the harness's clients as a program.

    python bench/loadgen.py --port 8080 --clients 100 --rate 10 --duration 10 [--verify]
    python bench/loadgen.py --port 8080 --clients 20 --burst --duration 5 --verify

Connects, waits until every client is in the chat (a probe from one reaches all the others),
runs one paced or burst step and prints its result as JSON; exit status 1 when the step saw a
loss, an echo, garbled bytes or (``--verify``) frames out of order. ``harness/loadgen.py`` says
how the clients work.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from harness.frames import MIN_SIZE
from harness.loadgen import LoadGen
from harness.server import raise_nofile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="load generator for broadcast chat relays")
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--size", type=int, default=64, help=f"frame bytes (>= {MIN_SIZE})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--rate", type=float, default=10.0, help="frames/s per client (paced)")
    mode.add_argument("--burst", action="store_true", help="send as fast as possible")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
    parser.add_argument("--verify", action="store_true",
                        help="check per-sender order (no loss, no echo are always checked)")
    parser.add_argument("--procs", type=int, default=1, help="worker processes")
    parser.add_argument("--drain-timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    if not args.host.startswith("127.") and args.host not in ("::1", "localhost"):
        parser.error("only loopback addresses")
    if args.size < MIN_SIZE:
        parser.error(f"--size must be at least {MIN_SIZE}")
    raise_nofile()
    with LoadGen(args.procs, lifetime=args.duration + 600) as gen:
        conn = gen.connect(args.host, args.port, args.clients, size=args.size)
        if not conn.in_chat:
            print(json.dumps({"error": "clients not all in the chat", **asdict(conn)}))
            return 1
        res = gen.run(args.rate, args.duration, burst=args.burst, verify=args.verify,
                      drain_timeout=args.drain_timeout)
    print(json.dumps(asdict(res), indent=1))
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
