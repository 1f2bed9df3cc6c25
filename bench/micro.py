"""Micro-benchmarks of the per-event costs inside one process: triggers and status events.

    python bench/micro.py [--fsmchat DIR] [--out DIR]

Prints microseconds per call for: one delivery (a 64-byte message queued, then the
``writable`` trigger sends it); the ``readable`` action called directly (a recv on a socket
with nothing to read), the same through ``Connection.fire`` (the table's hot path) and through the
``transitions`` machine, so the difference is the cost of dispatch; ``add_model``/``remove_model``
at 1,000 connections; one status event rendered to JSON (and one filtered out by the level); and
with ``--redis``, the bus's own work per message: wrapping one for PUBLISH, and unwrapping,
checking and handing on one from another instance (no socket I/O in either); and chat mode's
``clean`` of one line: ASCII, accented Latin, CJK, emoji, and a line that needs the full walk.
Each figure is the best of 5 runs of many calls; the table goes to ``results/micro-<date>.json``.
A second table counts instead of timing (``sys.setprofile``: the same on a busy machine as on
an idle one): the Python and C calls of one delivery, and of one connection's life on loopback
TCP through the server's listener (accept, one message relayed, EOF, release), with its
``setsockopt`` calls.

The calls are timed in a child process of the checkout measured (``harness.checkout``: this
one, or ``--fsmchat DIR``), which imports that checkout's fsmchat and prints its rows as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import FrameType

from harness.checkout import current
from harness.report import Table
from harness.suite import Session, add_options
from structlog.typing import FilteringBoundLogger

from fsmchat.chat.text import clean
from fsmchat.connection import MACHINE, Connection
from fsmchat.lifecycle import Trigger
from fsmchat.net.loop import EventLoop
from fsmchat.ops.events import hot_events, make_logger
from fsmchat.ops.logstream import LogStream
from fsmchat.options import Options
from fsmchat.redis.bus import PublishLink, SubscribeLink
from fsmchat.redis.link import RedisAddress
from fsmchat.server import Server


def per_call(fn: Callable[[], object], n: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def measure() -> list[tuple[str, float]]:
    listener = socket.create_server(("127.0.0.1", 0))
    hub = Server(Options(host=None, port=0), [(listener, None)],
                 make_logger(LogStream.memory(io.BytesIO()), "info", "json"), loop=EventLoop()).hub
    a, b = socket.socketpair()
    a.setblocking(False)
    conn = Connection(a, "bench", hub)
    conn.fire(Trigger.START)
    event = MACHINE.events[Trigger.READABLE]
    n = 100_000
    rows = [
        ("readable: action called directly", per_call(conn.receive, n)),
        ("readable: Connection.fire (table, hot path)",
         per_call(lambda: conn.fire(Trigger.READABLE), n)),
        ("readable: transitions Machine trigger", per_call(lambda: event.trigger(conn), n)),
    ]
    message = b"m" * 64

    def deliver() -> None:
        for _ in range(100):
            conn.enqueue(message)
            conn.on_writable()
        b.recv(1 << 16)

    rows.append(("delivery: enqueue + writable + send (64 B)", per_call(deliver, n // 100) / 100))
    socks = [socket.socket() for _ in range(1000)]  # one each: every one below FD_SETSIZE
    start = time.perf_counter()
    conns = [Connection(s, "bench", hub) for s in socks]
    rows.append(("Connection() incl. add_model, 1,000 live",
                 (time.perf_counter() - start) / len(conns) * 1e6))
    start = time.perf_counter()
    for c in conns:
        MACHINE.remove_model(c)
    rows.append(("remove_model, 1,000 live", (time.perf_counter() - start) / len(conns) * 1e6))
    for s in socks:
        s.close()

    for level in ("debug", "info"):
        sink = LogStream.memory(io.BytesIO())
        log = make_logger(sink, level, "json")

        def emit(log: FilteringBoundLogger = log, sink: LogStream = sink) -> None:
            for _ in range(100):
                log.debug("data.sent", fd=7, bytes=512, queued=0)
            sink.flush()

        rows.append((f"one data.sent event at --log-level {level}, through structlog",
                     per_call(emit, n // 100) / 100))
        if level != "debug":  # (above debug the server makes no such call)
            continue
        sent = hot_events(log).sent  # what the server calls: a bytes template into the stream

        def emit_hot(sent: Callable[[int, int, int], None] = sent,
                     sink: LogStream = sink) -> None:
            for _ in range(100):
                sent(7, 512, 0)
            sink.flush()

        rows.append(("one data.sent event at --log-level debug, as the server emits it",
                     per_call(emit_hot, n // 100) / 100))
    rows.extend(bus_rows(n))
    rows.extend(clean_rows(n // 10))
    a.close()
    b.close()
    return rows


class Calls:
    """Counts the calls the server makes inside ``count``: Python functions, C functions, and
    the C ones by name. Unlike a time, a count is the same on a busy machine and an idle one."""

    def __init__(self) -> None:
        self.python = 0
        self.c: Counter[str] = Counter()

    def _profile(self, frame: FrameType, event: str, arg: object) -> None:
        if event == "call":
            self.python += 1
        elif event == "c_call":
            self.c[getattr(arg, "__name__", "?")] += 1

    def count(self, work: Callable[[], object]) -> None:
        sys.setprofile(self._profile)
        try:
            work()
        finally:
            sys.setprofile(None)


def call_rows() -> list[tuple[str, float]]:
    """Calls per delivery and per connection's life, on loopback TCP through the server's own
    listener: accept, one 64-byte message relayed to one observer, EOF, release."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)  # as the server's own are
    server = Server(Options(host=None, port=0), [(listener, None)],
                    make_logger(LogStream.memory(io.BytesIO()), "info", "json"),
                    loop=EventLoop())
    loop, hub = server.loop, server.hub
    address = listener.getsockname()[:2]

    def arrive() -> tuple[socket.socket, Callable[[], None]]:
        """A client, and the server's turn that takes it."""
        client = socket.create_connection(address)
        return client, lambda: loop.dispatch([listener.fileno()], [])

    observer, accept = arrive()
    accept()
    watching = next(iter(hub.connections.values()))

    def life(calls: Calls) -> None:
        client, accept = arrive()
        run = calls.count
        run(accept)
        conn = next(c for c in hub.connections.values() if c is not watching)
        client.sendall(b"m" * 64)
        run(lambda: loop.dispatch([conn.fd], []))
        run(lambda: loop.dispatch([], [watching.fd]))
        observer.recv(1 << 16)
        client.close()
        time.sleep(0.01)  # the FIN's way over loopback: nothing to wait on from here
        run(lambda: loop.dispatch([conn.fd], []))
        run(loop.before_sleep)
        assert conn.state == "closed", conn

    for _ in range(3):  # warm: the listener's first socket, the caches
        life(Calls())
    lives, per_life = 20, Calls()
    for _ in range(lives):
        life(per_life)
    delivery = Calls()
    message = b"m" * 64

    def deliveries() -> None:
        for _ in range(100):
            hub.deliver(message)
            loop.dispatch([], [watching.fd])

    delivery.count(deliveries)
    observer.close()
    listener.close()
    return [
        ("Python calls per delivery (hub.deliver to one, its writable turn)",
         delivery.python / 100),
        ("C calls per delivery", sum(delivery.c.values()) / 100),
        ("Python calls per connection (accept, one message relayed, EOF, release)",
         per_life.python / lives),
        ("C calls per connection", sum(per_life.c.values()) / lives),
        ("setsockopt calls per connection", per_life.c["setsockopt"] / lives),
    ]


def bus_rows(n: int) -> list[tuple[str, float]]:
    loop, address = EventLoop(), RedisAddress("127.0.0.1")
    log = make_logger(LogStream.memory(io.BytesIO()), "info", "json")
    publisher = PublishLink(address, loop, log, channel=b"fsmchat", origin=b"0" * 16,
                            outbox_limit=1 << 40)
    message = b"m" * 64
    rows = [("bus: wrap one message for PUBLISH (64 B)",
             per_call(lambda: publisher.publish(message), n))]
    subscriber = SubscribeLink(address, loop, log, channel=b"fsmchat", origin=b"0" * 16,
                               deliver=lambda data, msg_id, late: False, payload_limit=1 << 40)
    replies = iter([[b"message", b"fsmchat", b"fsmchat1 1111222233334444 %d\n%s" % (seq, message)]
                    for seq in range(1, 5 * n + 1)])  # per_call runs n calls 5 times

    def receive() -> None:
        subscriber.on_reply(next(replies))

    rows.append(("bus: unwrap, check and hand on one message", per_call(receive, n)))
    return rows


CLEAN_LINES = (
    ("ASCII", "see you at the station at five, bring the maps"),
    ("accented Latin", "déjà vu à l'hôtel, très bien"),
    ("CJK", "今天天气很好\uff0c我们去公园散步吧\u3002" * 4),
    ("emoji", "good morning 👋 see you 🙂👍🏽 at 9"),
    ("emoji, a ZWJ sequence", "morning \U0001f468\u200d\U0001f469\u200d\U0001f467 see you"),
    ("full walk: marks, bidi, blanks", "e\u0301\u0301\u0301\u0301\u0301 \u202eevil\u3000x"),
)


def clean_rows(n: int) -> list[tuple[str, float]]:
    """Chat mode cleans each line once (not per recipient)."""
    clean(b"warm up: the Unicode tables \xc3\xa9")
    rows = []
    for name, text in CLEAN_LINES:
        line = text.encode()
        rows.append((f"clean: {name} ({len(line)} B)", per_call(partial(clean, line), n)))
    return rows


CHILD = "--measure-here"  # the child process: time the calls, print the rows as JSON


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list == [CHILD]:
        print(json.dumps([measure(), call_rows()]))
        return 0
    parser = argparse.ArgumentParser(description="fsmchat: per-event costs inside one process")
    add_options(parser)
    args = parser.parse_args(args_list)
    session = Session("micro", args, args_list)
    done = current().run(str(Path(__file__).resolve()), CHILD, timeout=600)
    if done.returncode:
        print(f"micro.py: the measuring process failed:\n{done.stderr}", file=sys.stderr)
        return 1
    timed, counted = json.loads(done.stdout)
    table = Table("", ["call", "us per call"])
    for name, micros in timed:
        table.add(name, f"{micros:.2f}")
    calls = Table("calls, counted (sys.setprofile): the same on a busy machine", ["", "calls"])
    for name, count in counted:
        calls.add(name, f"{count:.1f}")
    session.finish([table, calls], [], {"rows": table.rows, "calls": calls.rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
