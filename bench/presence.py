"""What presence costs: the refresh of 1,000 names, and an idle instance with and without it.

    python bench/presence.py [--quick] [--clients 1000] [--seconds 60] [--fsmchat DIR]
                             [--out DIR]

One redis-server of its own, then one configuration after the other, each with fresh processes:

- ``raw``: one instance in raw mode with ``--redis`` (its two links, no presence) and N idle
  clients: what an idle instance costs without presence;
- ``chat``: two instances in chat mode (``--presence-ttl 15``, the default: a refresh every 5 s),
  N idle clients each, so that each has N names of its own and N of the other's in its view;
- ``chat ttl 1``: the same with ``--presence-ttl 1``, a refresh three times a second (15 times as
  often), so that what a refresh costs stands out of the noise of /proc's 10 ms ticks.

Per configuration, once every client is in and the first instance's ``/who`` counts them all:
its CPU seconds over the window (/proc/PID/stat, all threads), Redis's, and the presence
scripts Redis ran (``INFO commandstats``: EVALSHA calls and microseconds). A refresh costs, on
fsmchat's side, (CPU of ``chat ttl 1`` - CPU of ``chat``) / (refreshes of the one - of the
other); the share of a core at the default interval follows from it. In process, without
sockets: what a full read of 2N names costs the view (after a reconnect, or a gap in the
revisions), the one case where a refresh is not O(1) for fsmchat; and, more exactly than /proc
can, the CPU of one refresh (process time around the script call and its reply). The in-process
figures are always this checkout's, whatever ``--fsmchat`` says.

Prints a table (stdout; progress on stderr) and writes ``results/presence-<date>.json``. Every
process it starts is stopped at the end, also on errors and signals.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.procfs import Proc, machine_busy
from harness.report import Table, cell, say
from harness.server import HOST, Server, fsmchat
from harness.suite import Session, add_options
from multi import Redis, redis_info, redis_version

from fsmchat.chat.rooms import room_key
from fsmchat.chat.text import is_name, room_problem, skeleton
from fsmchat.hub import Hub, Limits
from fsmchat.net.loop import EventLoop
from fsmchat.ops.events import make_logger
from fsmchat.ops.logstream import LogStream
from fsmchat.redis.bus import RedisBus
from fsmchat.redis.link import RedisAddress
from fsmchat.redis.presence import Presence, Rules

RULES = Rules(skeleton, is_name, lambda room: room_problem(room) is None, room_key)

DRAIN_TIMEOUT = 2.0
LINKS = {"publish", "subscribe"}


@dataclass
class Config:
    name: str
    mode: str  # "raw" or "chat"
    instances: int
    ttl: float | None  # --presence-ttl; None: raw mode, no presence
    cpu: float = 0.0  # the first instance's CPU seconds over the window
    others_cpu: float = 0.0  # the other instances'
    redis_cpu: float = 0.0
    seconds: float = 0.0
    scripts: int = 0  # EVALSHA calls Redis ran over the window
    script_usec: float = 0.0
    other_cores: float = 0.0  # what the rest of the machine used meanwhile
    names: int = 0  # what /who counted
    notes: list[str] = field(default_factory=list)

    @property
    def refreshes(self) -> float:
        return self.seconds / (self.ttl / 3) if self.ttl else 0.0


def instance(name: str, cfg: Config, redis_port: int, logdir: Path) -> Server:
    args = ["--port", "0", "--mode", cfg.mode, "--redis", f"redis://{HOST}:{redis_port}",
            "--log-level", "info", "--stats-interval", "0", "--drain-timeout",
            str(DRAIN_TIMEOUT), "--max-clients", "1008"]
    if cfg.ttl is not None:
        args += ["--presence-ttl", f"{cfg.ttl:g}"]
    server = Server(name, fsmchat(*args), logdir, read="all")
    server.start()
    links = LINKS | ({"presence"} if cfg.mode == "chat" else set())
    deadline = time.monotonic() + 15
    while not links <= server.links:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: Redis links {sorted(links - server.links)} not ready")
        time.sleep(0.05)
    return server


def crowd(port: int, count: int) -> list[socket.socket]:
    """``count`` idle clients; what the server sends them is left unread (a few KiB each)."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection((HOST, port), 10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        socks.append(sock)
    return socks


def who_counts(port: int, want: int, timeout: float = 60.0) -> int:
    """Ask ``/who`` on a client of its own until it counts ``want`` (the view is complete)."""
    answer = re.compile(rb"^\*\*\* (\d+) in lobby: ", re.MULTILINE)
    deadline = time.monotonic() + timeout
    count = 0
    with socket.create_connection((HOST, port), 10) as sock:
        sock.settimeout(timeout)
        while time.monotonic() < deadline:
            sock.sendall(b"/who\n")
            buf = b""
            while (found := answer.search(buf)) is None or b"\n" not in buf[found.end():]:
                buf += sock.recv(1 << 20)
            count = int(found.group(1))
            if count >= want:
                break
            time.sleep(0.2)
    return count


def commandstats(port: int) -> tuple[int, float]:
    stat = redis_info(port, "commandstats").get("cmdstat_evalsha", "")
    fields = dict(part.split("=", 1) for part in stat.split(",") if "=" in part)
    return int(fields.get("calls", 0)), float(fields.get("usec", 0))


def run_config(cfg: Config, redis: Redis, clients: int, seconds: float, logdir: Path) -> None:
    say(f"{cfg.name}: starting {cfg.instances} instance(s), {clients} clients each")
    servers = [instance(f"{cfg.name.replace(' ', '-')}-{i}", cfg, redis.port, logdir)
               for i in range(cfg.instances)]
    socks: list[socket.socket] = []
    try:
        for server in servers:
            socks += crowd(server.port, clients)
        if cfg.mode == "chat":  # the first one's view holds everyone (its /who asker too)
            cfg.names = who_counts(servers[0].port, clients * cfg.instances + 1)
        time.sleep(1.0)  # the joins' fan-out is over: the window starts idle
        proc, redis_proc = Proc(servers[0].pid), Proc(redis.pid)
        rest = [Proc(server.pid) for server in servers[1:]]
        calls0, usec0 = commandstats(redis.port)
        cpu0, rcpu0, busy0 = proc.cpu_seconds(), redis_proc.cpu_seconds(), machine_busy()
        rest0 = sum(p.cpu_seconds() for p in rest)
        t0 = time.monotonic()
        say(f"{cfg.name}: measuring for {seconds:g} s")
        time.sleep(seconds)
        cfg.seconds = time.monotonic() - t0
        cfg.cpu = proc.cpu_seconds() - cpu0
        cfg.redis_cpu = redis_proc.cpu_seconds() - rcpu0
        cfg.others_cpu = sum(p.cpu_seconds() for p in rest) - rest0
        calls, usec = commandstats(redis.port)
        cfg.scripts, cfg.script_usec = calls - calls0, usec - usec0
        busy = machine_busy() - busy0
        cfg.other_cores = max(0.0, (busy - cfg.cpu - cfg.others_cpu - cfg.redis_cpu)
                              / cfg.seconds)
    finally:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()
        for server in servers:
            server.stop()


class Node:
    """In process: one instance's presence (a hub without clients, a bus, its links)."""

    def __init__(self, loop: EventLoop, redis_port: int, channel: str) -> None:
        log = make_logger(LogStream.memory(io.BytesIO()), "warning", "json")
        self.bus = RedisBus(RedisAddress(HOST, redis_port), channel, loop, log,
                            outbox_limit=1 << 20, payload_limit=1 << 20,
                            deliver=lambda payload, msg_id: False)
        self.presence = Presence(Hub(loop, log, Limits(1 << 20), gone=lambda conn: None),
                                 self.bus, loop, log, ttl=15, rules=RULES)


def until(loop: EventLoop, condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout

    def check() -> None:
        if condition() or time.monotonic() > deadline:
            loop.stop()
        else:
            loop.call_later(0.001, check)

    loop.call_later(0, check)
    loop.run()
    if not condition():
        raise RuntimeError("in process: presence did not get there in time")


def in_process(redis_port: int, names: int, rounds: int = 200) -> dict[str, float]:
    """This checkout's presence, two instances in one process on the bench's Redis (a channel
    of their own), ``names`` people each: the CPU of one refresh (the script call, its reply,
    the loop turns between; select's wait is no CPU), and of a full read into the view."""
    loop = EventLoop()
    a, b = Node(loop, redis_port, "bench-presence"), Node(loop, redis_port, "bench-presence")

    def end_of_turn() -> None:
        a.presence.end_of_turn()
        b.presence.end_of_turn()

    loop.before_sleep = end_of_turn
    for node in (a, b):
        node.bus.start()
    until(loop, lambda: all(len(n.bus.up) == len(n.bus.links) for n in (a, b)))
    for node, tag in ((a, b"a"), (b, b"b")):
        for i in range(names):
            node.presence.claim(i, b"%s%d" % (tag, i), b"lobby")
    until(loop, lambda: len(a.presence.others) == names and len(b.presence.others) == names)
    started = time.process_time()
    for _ in range(rounds):
        a.presence._tick()
        until(loop, lambda: a.presence.heard is None)
    tick = (time.process_time() - started) / rounds
    flat: list[Any] = []
    for skel, entry in b.presence.others.items():
        flat += [skel, b"%s %d %s %s" % (entry.owner, entry.since, entry.name, entry.room)]
    started = time.process_time()
    for _ in range(20):
        a.presence._read_all(1, flat)
    full = (time.process_time() - started) / 20
    for node in (a, b):
        node.bus.drain()
    until(loop, lambda: a.bus.done() and b.bus.done())
    return {"tick_cpu_us": tick * 1e6, "full_read_ms": full * 1000}


def table(cfgs: list[Config], clients: int) -> tuple[Table, dict[str, Any]]:
    t = Table(f"presence: {clients} idle clients per instance, CPU over the window",
              ["configuration", "fsmchat % core", "Redis % core", "scripts/s", "Redis µs/script",
               "names"])
    for c in cfgs:
        t.add(c.name, cell(100 * c.cpu / c.seconds, "{:.3f}"),
              cell(100 * c.redis_cpu / c.seconds, "{:.3f}"),
              cell(c.scripts / c.seconds, "{:.2f}"),
              cell(c.script_usec / c.scripts if c.scripts else None, "{:.0f}"),
              str(c.names) if c.names else "-")
    chat, fast = cfgs[1], cfgs[2]
    extra = fast.refreshes - chat.refreshes
    per = (fast.cpu - chat.cpu) / extra if extra > 0 else 0.0
    figures = {"refresh_cpu_ms": per * 1000,
               "refresh_share_at_default": per / (chat.ttl / 3) if chat.ttl else 0.0,
               "idle_share_raw": cfgs[0].cpu / cfgs[0].seconds,
               "idle_share_chat": chat.cpu / chat.seconds}
    return t, figures


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description="what presence costs an idle instance")
    parser.add_argument("--quick", action="store_true", help="a 20 s window (default 60 s)")
    parser.add_argument("--clients", type=int, default=1000, metavar="N",
                        help="idle clients per instance (default: 1000, at most 1000)")
    parser.add_argument("--seconds", type=float, metavar="S", help="the window")
    add_options(parser)
    args = parser.parse_args(args_list)
    if not 1 <= args.clients <= 1000:
        parser.error("--clients must be 1 to 1000")
    if redis_version() == "missing":
        parser.error("redis-server is not on PATH (Debian: apt-get install redis-server)")
    seconds = args.seconds or (20.0 if args.quick else 60.0)
    session = Session("presence", args, args_list)
    cfgs = [Config("raw", "raw", 1, None), Config("chat", "chat", 2, 15.0),
            Config("chat ttl 1", "chat", 2, 1.0)]

    def body() -> int:
        redis = Redis(session.logdir)
        redis.start()
        for cfg in cfgs:
            run_config(cfg, redis, args.clients, seconds, session.logdir)
        t, figures = table(cfgs, args.clients)
        say("in process: one refresh, and a full read")
        inner = in_process(redis.port, args.clients)
        notes = [
            f"a refresh costs fsmchat {inner['tick_cpu_us']:.0f} µs of CPU in process "
            f"({args.clients} names here, {args.clients} elsewhere); every 5 s (the default) "
            f"that is {inner['tick_cpu_us'] / 5e6 * 100:.4f} % of a core. From the two chat "
            f"runs' difference (/proc, 10 ms ticks): {figures['refresh_cpu_ms']:.2f} ms",
            f"a full read of {args.clients} names into the view (after a reconnect, or a "
            f"gap in the revisions): {inner['full_read_ms']:.2f} ms",
            *(f"machine: {c.name}: other processes used {c.other_cores:.2f} cores"
              for c in cfgs if c.other_cores >= 0.15),
        ]
        session.finish([t], notes, {**figures, **inner, "seconds": seconds,
                                    "clients": args.clients, "redis": redis_version(),
                                    "configs": [c.__dict__ for c in cfgs]})
        return 0

    return session.run(body)


if __name__ == "__main__":
    sys.exit(main())
