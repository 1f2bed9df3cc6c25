"""Throughput of fsmchat with 1, 2 and 4 instances joined by Redis pub/sub, on one port.

    python bench/multi.py [--quick] [--json PATH] [--clients 200] [--instances 1,2,4]
                          [--fsmchat DIR] [--out DIR]

One redis-server of its own (from PATH, on a free loopback port, no persistence), then one
configuration after the other, each with fresh processes on a fresh port P:

- ``baseline``: one ``python -m fsmchat`` without ``--redis`` (the relay as it was);
- ``N=1``, ``N=2``, ``N=4``: N instances ``--port P --reuse-port --redis redis://127.0.0.1:R``,
  each ready once it has logged ``redis.connected`` for its publish and its subscribe link (and
  Redis counts N subscribers on the channel).

The clients (``LoadGen``, one process: the machine has two cores) connect to P and the kernel
spreads them over the instances (SO_REUSEPORT hashes each connection's addresses); every
instance's ``connection.accepted`` events say how many it got. Every frame must still reach
every other client, whichever instance each one is on. Per configuration, in this order:

1. Burst: 20 clients of their own (and a generator process of its own) keep their sockets full
   for a few seconds: the delivery rate, and whether everything arrived (nothing paces one
   instance's senders for another instance's slow readers).
2. CPU per delivery at a fixed paced load (200 clients x 2 msg/s: one message every 2.5 ms,
   so every delivery is its own send): the instances' CPU summed, and Redis's apart, both from
   /proc/PID/stat (all threads), divided by the deliveries; with ``verify`` (per-sender order).
3. Capacity at 200 clients: the highest delivery rate with nothing lost, echoed or garbled and
   p99 latency under 50 ms, found by doubling the per-client rate until a step fails, then
   bisecting (``harness.capacity`` decides, and says when the generator was the limit).

Each step also records the machine's busy time (/proc/stat): what other processes used is
flagged, since on 2 cores it shows up as latency. Prints a table (stdout; progress on stderr)
and writes every figure and every step to ``results/multi-<date>.json``. ``bench/README.md``
explains the figures. Every process it starts is stopped at the end, also on errors, SIGINT,
SIGTERM and SIGHUP.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hiredis
from harness.capacity import GEN_BUSY, GEN_MAX_MSGS, P99_LIMIT_MS, judge, search, short
from harness.checkout import current
from harness.loadgen import LoadGen, StepResult
from harness.procfs import machine_busy
from harness.report import Table, cell, say
from harness.server import HOST, Server, free_port, fsmchat
from harness.suite import Session, add_options, sigint_ignored, usage_error

CHANNEL = "fsmchat"  # the default --channel
OTHER_LOAD = 0.15
"""Cores used by processes not of this bench during a step (machine busy time from /proc/stat,
less the instances, Redis and the generator) above which the step is flagged: on 2 cores that
load takes time from the relay and shows as latency."""
DRAIN_TIMEOUT = 2.0
"""The instances' --drain-timeout: well under the 5 s ``Server.stop`` waits after SIGTERM, so
an instance that needs SIGKILL is one that hung, not one still draining."""
LINKS = frozenset({"publish", "subscribe"})
FRAME_SIZE = 64  # LoadGen's default frame


@dataclass(frozen=True)
class Profile:
    name: str
    clients: int
    fixed_rate: float  # msg/s per client for the CPU figure
    fixed_seconds: float
    start_rate: float  # capacity: the first step's msg/s per client
    growth: float  # capacity: factor between steps going up (or down)
    refine: int  # capacity: bisections between the last pass and the first failure
    step_seconds: float
    burst_clients: int  # a separate, smaller set: 200 bursting clients overflow any queue
    burst_seconds: float  # 0: no burst step
    drain_timeout: float


FULL = Profile("full", clients=200, fixed_rate=2.0, fixed_seconds=10.0, start_rate=4.0,
               growth=2.0, refine=3, step_seconds=4.0, burst_clients=20, burst_seconds=4.0,
               drain_timeout=5.0)
QUICK = Profile("quick", clients=200, fixed_rate=2.0, fixed_seconds=3.0, start_rate=4.0,
                growth=3.0, refine=0, step_seconds=1.5, burst_clients=20, burst_seconds=1.5,
                drain_timeout=3.0)


# -- processes -----------------------------------------------------------------------------------


class RedisError(Exception):
    """An error reply (``-ERR ...``) from Redis."""


def redis_call(port: int, *args: str, timeout: float = 2.0) -> object:
    """One command over a fresh connection: enough for PING, PUBSUB and INFO. hiredis (fsmchat's
    own parser) packs it and reads the reply: simple and bulk strings come back as bytes; an
    error reply is raised as ``RedisError``, a reply that is not RESP as ``ConnectionError``."""
    parser = hiredis.Reader(replyError=RedisError, protocolError=ConnectionError)
    with socket.create_connection((HOST, port), timeout) as sock:
        sock.sendall(hiredis.pack_command(args))  # type: ignore[arg-type] # stub: a 1-tuple
        reply = parser.gets()
        while reply is False:  # not a whole reply yet
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            parser.feed(chunk)
            reply = parser.gets()
    if isinstance(reply, RedisError):
        raise reply
    return reply


def redis_info(port: int, section: str) -> dict[str, str]:
    reply = redis_call(port, "INFO", section)
    text = reply.decode() if isinstance(reply, bytes) else ""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and not key.startswith("#"):
            out[key] = value
    return out


def publish_calls(port: int) -> int:
    """PUBLISH commands Redis has run: frames sent over calls is how much the instances batch."""
    stat = redis_info(port, "commandstats").get("cmdstat_publish", "")
    found = re.search(r"calls=(\d+)", stat)
    return int(found.group(1)) if found else 0


def numsub(port: int, channel: str) -> int:
    reply = redis_call(port, "PUBSUB", "NUMSUB", channel)
    if isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], int):
        return reply[1]
    raise RedisError(f"unexpected PUBSUB NUMSUB reply {reply!r}")


class Redis(Server):
    """redis-server on a free loopback port, without persistence; ready when it answers PING
    (a listening socket alone may still answer -LOADING)."""

    def __init__(self, logdir: Path) -> None:
        self.logfile = logdir / "redis.log"

        def argv(port: int) -> list[str]:
            return ["redis-server", "--port", str(port), "--bind", HOST, "--save", "",
                    "--appendonly", "no", "--dir", str(logdir), "--logfile", str(self.logfile)]

        super().__init__("redis", argv, logdir, fixed_port=True)

    def start(self, timeout: float = 15.0) -> None:
        super().start(timeout)
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline and self.alive():
            try:
                if redis_call(self.port, "PING") == b"PONG":
                    return
            except (OSError, RedisError) as exc:
                last = str(exc)
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer PING ({last or 'exited'}; see "
                           f"{self.logfile})")

    def buffer_kills(self) -> int:
        """Clients Redis closed for their output buffer (a subscriber too slow): its log is the
        only place that says so in Redis 7.0."""
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return 0
        return text.count("output buffer limits")


def redis_version() -> str:
    try:
        done = subprocess.run(["redis-server", "--version"], check=False, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "missing"
    return done.stdout.strip()


def has_redis_option() -> bool:
    """Whether the fsmchat being measured has ``--redis`` (the feature may not be in yet)."""
    return "--redis" in current().run("-m", "fsmchat", "--help").stdout


# -- one configuration ---------------------------------------------------------------------------


@dataclass
class Config:
    name: str
    instances: int
    redis: bool
    port: int = 0
    clients: int = 0
    per_instance: list[int] = field(default_factory=list)  # connection.accepted per instance
    instance_ids: list[str] = field(default_factory=list)
    subscribers: int | None = None  # PUBSUB NUMSUB before the clients connect
    # 2. fixed load
    fixed_deliveries_per_s: float | None = None
    cpu_us_per_delivery: float | None = None  # the instances' CPU, summed
    redis_us_per_delivery: float | None = None
    cpu_us_per_message: float | None = None  # per message relayed (to clients - 1 others)
    redis_us_per_message: float | None = None
    fixed_p50_ms: float | None = None
    fixed_p99_ms: float | None = None
    fixed_server_cores: float | None = None
    fixed_redis_cores: float | None = None
    # 3. capacity
    capacity: float | None = None  # deliveries/s
    capacity_note: str = ""
    capacity_limit: list[str] = field(default_factory=list)  # why the step above it failed
    capacity_p99_ms: float | None = None
    capacity_server_cores: float | None = None
    capacity_redis_cores: float | None = None
    capacity_frames_per_publish: float | None = None
    # 1. burst
    burst_per_instance: list[int] = field(default_factory=list)
    burst_deliveries_per_s: float | None = None
    burst_gen_bound: bool = False  # the generator used 90 % of its core: a lower bound
    burst_lost: int | None = None
    burst_garbled: int = 0  # bytes: frames split at a recv boundary, interleaved
    burst_why: list[str] = field(default_factory=list)
    burst_server_cores: float | None = None
    burst_redis_cores: float | None = None
    # what the processes said
    totals: list[dict[str, Any]] = field(default_factory=list)  # server.stopped per instance
    redis_buffer_kills: int = 0
    problems: dict[str, int] = field(default_factory=dict)  # warning/error events, summed
    problem_lines: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    loadavg: float = 0.0  # 1-minute load average when the configuration started
    seconds: float = 0.0

    @property
    def other_cores(self) -> float | None:
        """The most CPU other processes used during one step (see ``OTHER_LOAD``)."""
        return max((s["other_cores"] for s in self.steps), default=None)


def check_totals(cfg: Config) -> None:
    """The instances' own counts must agree: each receives what every other one published, once
    (nothing else publishes on the channel), and none dropped, missed or saw a duplicate."""
    told = [t for t in cfg.totals if "redis_published" in t]
    if len(told) < cfg.instances:
        cfg.errors.append(f"only {len(told)} of {cfg.instances} instances logged server.stopped "
                          "with Redis totals")
        return
    published = sum(int(t["redis_published"]) for t in told)
    received = sum(int(t.get("redis_received") or 0) for t in told)
    if received != (cfg.instances - 1) * published:
        cfg.errors.append(f"instances received {received:,} messages from Redis, expected "
                          f"{cfg.instances - 1} x {published:,} published")
    for key in ("redis_dropped", "redis_missed", "redis_duplicates"):
        if any(t.get(key) for t in told):
            cfg.errors.append(f"{key}: {[t.get(key) for t in told]}")


@dataclass
class Generators:
    """Two load generators, forked before any thread. Bursts get their own: a generator that
    has just run an overloaded 200-client step bursts at a different speed (2-3x) and meets
    more split frames, so the burst figure would depend on what ran before it."""

    main: LoadGen
    burst: LoadGen

    def close(self) -> None:
        self.main.close()
        self.burst.close()


class Bench:
    """The processes of one configuration and the steps measured on them."""

    def __init__(self, gens: Generators, redis: Redis, cfg: Config, prof: Profile,
                 logdir: Path) -> None:
        self.gen = gens.main
        self.gens, self.redis, self.cfg, self.prof, self.logdir = gens, redis, cfg, prof, logdir
        self.instances: list[Server] = []
        self._best: dict[str, Any] | None = None  # the passing capacity step at the top rate

    # -- processes --

    def start(self) -> None:
        cfg = self.cfg
        cfg.port = free_port()
        for i in range(cfg.instances):
            argv = fsmchat("--port", str(cfg.port), "--log-level", "info", "--drain-timeout",
                           str(DRAIN_TIMEOUT))  # every instance on the one port P
            if cfg.redis:
                argv += ["--reuse-port", "--redis", f"redis://{HOST}:{self.redis.port}"]
            # every event read: the Redis links, the accepts, the totals (info: a few lines
            # per connection, not per message)
            inst = Server(f"{cfg.name}-{i}", argv, self.logdir, read="all", keep_stdout=True)
            self.instances.append(inst)
            inst.start()
        if cfg.redis:
            for inst in self.instances:
                self._wait_links(inst, 15.0)
            cfg.instance_ids = [str(inst.started.get("instance", "")) for inst in self.instances]
            cfg.subscribers = self._wait_subscribers(cfg.instances, 5.0)
            if cfg.subscribers != cfg.instances:
                raise RuntimeError(f"Redis counts {cfg.subscribers} subscribers on "
                                   f"{CHANNEL!r}, expected {cfg.instances}")

    def _wait_links(self, inst: Server, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and inst.alive():
            if inst.links >= LINKS:
                return
            time.sleep(0.02)
        raise RuntimeError(f"{inst.name}: redis.connected for {sorted(inst.links)} only "
                           f"after {timeout:g}s (alive: {inst.alive()})")

    def _wait_subscribers(self, want: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        got = numsub(self.redis.port, CHANNEL)
        while got != want and time.monotonic() < deadline:
            time.sleep(0.05)
            got = numsub(self.redis.port, CHANNEL)
        return got

    def stop(self) -> None:
        cfg = self.cfg
        for inst in self.instances:
            inst.stop()
            if inst.stopped:
                cfg.totals.append(inst.totals())
            elif inst.proc is not None:
                cfg.totals.append({"exit_status": inst.proc.returncode})
            for name, count in inst.problems.items():
                cfg.problems[name] = cfg.problems.get(name, 0) + count
            room = 20 - len(cfg.problem_lines)
            cfg.problem_lines += inst.problem_lines[:max(0, room)]
            if inst.proc is not None and inst.proc.returncode not in (0, None):
                cfg.errors.append(f"{inst.name} exited with status {inst.proc.returncode}")
        if cfg.redis:
            check_totals(cfg)

    def check_alive(self) -> None:
        for inst in [*self.instances, *([self.redis] if self.cfg.redis else [])]:
            if not inst.alive():
                code = inst.proc.returncode if inst.proc is not None else None
                raise RuntimeError(f"{inst.name} died (exit status {code})")

    # -- measuring --

    def cpu(self) -> tuple[float, list[float], float, float]:
        """Now, each instance's CPU seconds, Redis's, and the machine's busy seconds less this
        process's own (its stdout readers and the generator's coordinator)."""
        return (time.monotonic(), [inst.cpu_seconds() for inst in self.instances],
                self.redis.cpu_seconds(), machine_busy() - time.process_time())

    def step(self, kind: str, rate: float, seconds: float, *, burst: bool = False,
             verify: bool = False, gen: LoadGen | None = None,
             ) -> tuple[StepResult, list[str], dict[str, Any]]:
        """One loadgen step with the CPU used meanwhile, the PUBLISH calls, and the warning
        events the instances logged during it (to tie a loss to its cause)."""
        self.check_alive()
        problems0 = Counter[str]()
        for inst in self.instances:
            problems0.update(inst.problems)
        pub0 = publish_calls(self.redis.port) if self.cfg.redis else 0
        t0, inst0, redis0, busy0 = self.cpu()
        gen = gen or self.gen
        res = gen.run(rate, seconds, burst=burst, verify=verify,
                           drain_timeout=self.prof.drain_timeout)
        t1, inst1, redis1, busy1 = self.cpu()
        pub1 = publish_calls(self.redis.port) if self.cfg.redis else 0
        problems1 = Counter[str]()
        for inst in self.instances:
            problems1.update(inst.problems)
        wall = max(1e-9, t1 - t0)
        server_s = sum(inst1) - sum(inst0)
        busy = (busy1 - busy0) / wall
        other = busy - (server_s + redis1 - redis0) / wall - res.gen_cpu_frac
        why = judge(res)
        row: dict[str, Any] = {
            "kind": kind, **asdict(res), "pass": not why, "why": why, "wall_s": wall,
            "server_cpu_s": server_s, "redis_cpu_s": redis1 - redis0,
            "server_cores": server_s / wall, "redis_cores": (redis1 - redis0) / wall,
            "instance_cores": [(b - a) / wall for a, b in zip(inst0, inst1, strict=True)],
            "publish_calls": pub1 - pub0,
            "machine_cores": busy, "other_cores": max(0.0, other),
            "events": dict(problems1 - problems0),
        }
        self.cfg.steps.append(row)
        extra = f", servers {row['server_cores']:.2f} cores"
        if self.cfg.redis:
            extra += f", redis {row['redis_cores']:.2f}"
        if row["other_cores"] >= OTHER_LOAD:
            extra += f", OTHER PROCESSES {row['other_cores']:.2f} cores"
        if row["events"]:
            extra += f", events {row['events']}"
        say(f"  {kind}: " + short(res, why) + extra)
        if why and not gen.quiesce(timeout=15):
            say("  (still receiving 15 s after the step)")
        return res, why, row

    def connect(self, clients: int, gen: LoadGen | None = None) -> list[int] | None:
        """Connect ``clients`` to the shared port; how many each instance accepted (from its
        events), or None when they are not all in one chat."""
        cfg = self.cfg
        before = [inst.accepted for inst in self.instances]
        conn = (gen or self.gen).connect(HOST, cfg.port, clients, timeout=30,
                                         barrier_timeout=20)
        deadline = time.monotonic() + 5.0  # the accept events may still be in the pipe
        while (sum(i.accepted for i in self.instances) - sum(before) < conn.connected
               and time.monotonic() < deadline):
            time.sleep(0.02)
        spread = [inst.accepted - b for inst, b in zip(self.instances, before, strict=True)]
        say(f"  {conn.connected} clients in {conn.seconds:.1f}s, per instance "
            f"{'+'.join(map(str, spread))}")
        if not conn.in_chat:
            cfg.errors.append(f"clients not all in the chat: {conn.connected} of {clients} "
                              f"connected ({conn.errors}), a probe reached {conn.reached} of "
                              f"{conn.connected - 1}, per instance {spread}")
            return None
        if sum(spread) != conn.connected:
            cfg.errors.append(f"{sum(spread)} connection.accepted events for "
                              f"{conn.connected} clients")
        return spread

    def fixed(self) -> None:
        """Figure 2: CPU per delivery, paced, nothing coalesced; per-sender order verified."""
        cfg = self.cfg
        res, why, row = self.step("fixed", self.prof.fixed_rate, self.prof.fixed_seconds,
                                  verify=True)
        if res.errors:
            cfg.errors.append(f"fixed-load step: {res.errors}")
        if why and not res.errors:
            cfg.errors.append(f"fixed-load step failed: {why}")
        if res.received:
            cfg.fixed_deliveries_per_s = res.delivered_per_s
            cfg.cpu_us_per_delivery = row["server_cpu_s"] / res.received * 1e6
            cfg.cpu_us_per_message = row["server_cpu_s"] / max(1, res.sent) * 1e6
            if cfg.redis:
                cfg.redis_us_per_delivery = row["redis_cpu_s"] / res.received * 1e6
                cfg.redis_us_per_message = row["redis_cpu_s"] / max(1, res.sent) * 1e6
                cfg.fixed_redis_cores = row["redis_cores"]
        cfg.fixed_p50_ms, cfg.fixed_p99_ms = res.p50_ms, res.p99_ms
        cfg.fixed_server_cores = row["server_cores"]

    def capacity(self) -> None:
        """Figure 3: ``harness.capacity``'s search; the figures of the passing step at the top
        rate."""
        cfg, prof = self.cfg, self.prof
        best: dict[float, dict[str, Any]] = {}

        def trial(rate: float) -> list[str]:
            _res, why, row = self.step("capacity", rate, prof.step_seconds)
            if not why:
                best[rate] = row
            return why

        found = search(trial, cfg.clients, prof.start_rate, growth=prof.growth,
                       refine=prof.refine)
        cfg.capacity, cfg.capacity_note = found.deliveries, found.note
        if found.failed_rate is not None and found.passed_rate is not None:
            cfg.capacity_limit = [f"{found.failed_rate:g} msg/s per client", *found.failed_why]
        row = best.get(found.passed_rate) if found.passed_rate is not None else None
        if row is not None:
            cfg.capacity_p99_ms = row["p99_ms"]
            cfg.capacity_server_cores = row["server_cores"]
            if cfg.redis:
                cfg.capacity_redis_cores = row["redis_cores"]
                if row["publish_calls"]:
                    cfg.capacity_frames_per_publish = row["sent"] / row["publish_calls"]

    def burst(self) -> None:
        """Figure 1: a few clients of their own, each sending as fast as its socket takes it."""
        cfg = self.cfg
        gen = self.gens.burst
        spread = self.connect(self.prof.burst_clients, gen)
        if spread is None:
            return
        cfg.burst_per_instance = spread
        res, _why, row = self.step("burst", 0.0, self.prof.burst_seconds, burst=True, gen=gen)
        gen.disconnect()
        cfg.burst_deliveries_per_s = res.delivered_per_s
        cfg.burst_gen_bound = res.gen_cpu_frac >= GEN_BUSY
        cfg.burst_lost = res.lost
        cfg.burst_garbled = res.garbled_bytes
        cfg.burst_why = list(res.errors)
        cfg.burst_server_cores = row["server_cores"]
        if cfg.redis:
            cfg.burst_redis_cores = row["redis_cores"]


def run_config(gens: Generators, redis: Redis, cfg: Config, prof: Profile,
               logdir: Path) -> None:
    """Start the configuration's processes, measure, and stop them whatever happens."""
    say(f"== {cfg.name}: {cfg.instances} instance(s)" + (", Redis" if cfg.redis else
                                                          ", no Redis"))
    t0 = time.monotonic()
    cfg.loadavg = os.getloadavg()[0]
    bench = Bench(gens, redis, cfg, prof, logdir)
    kills0 = redis.buffer_kills()
    try:
        bench.start()
        if prof.burst_seconds > 0:
            bench.burst()  # first: after an overloaded capacity step, bursts split frames
        spread = bench.connect(prof.clients)
        if spread is not None:
            cfg.clients, cfg.per_instance = sum(spread), spread
            bench.fixed()
            bench.capacity()
    except (RuntimeError, TimeoutError, OSError, RedisError) as exc:
        cfg.errors.append(f"{type(exc).__name__}: {exc}")
        say(f"  error: {exc}")
    finally:
        for gen in (gens.main, gens.burst):
            with contextlib.suppress(Exception):
                gen.disconnect()
        bench.stop()
        cfg.redis_buffer_kills = redis.buffer_kills() - kills0
        cfg.seconds = round(time.monotonic() - t0, 1)
        say(f"  ({cfg.seconds:.1f}s)")


# -- output --------------------------------------------------------------------------------------


def table(cfgs: list[Config], prof: Profile) -> Table:
    n = prof.clients
    fixed = f"{n}x{prof.fixed_rate:g}/s"
    base = next((c for c in cfgs if c.name == "baseline"), None)

    def capacity(c: Config) -> str:
        text = cell(c.capacity, "{:,.0f}")
        return (">=" + text) if c.capacity_note.startswith("at least") else text

    def vs_base(c: Config) -> str:
        if base is None or not base.capacity or not c.capacity:
            return "n/a"
        return f"{c.capacity / base.capacity:.2f}x"

    def burst(c: Config) -> str:
        text = cell(c.burst_deliveries_per_s, "{:,.0f}")
        return (">=" + text) if c.burst_gen_bound else text

    def burst_lost(c: Config) -> str:
        if c.burst_lost is None:
            return "n/a"
        if not c.burst_why:
            return "none"
        split = c.burst_garbled // FRAME_SIZE
        if c.burst_lost == split and len(c.burst_why) == 2:  # lost=..., garbled_bytes=...
            return f"{split:,} split"
        return "FAILED (below)"

    def total_us(c: Config) -> float | None:
        if c.cpu_us_per_delivery is None:
            return None
        return c.cpu_us_per_delivery + (c.redis_us_per_delivery or 0.0)

    rows: list[tuple[str, Any]] = [
        ("clients per instance", lambda c: "+".join(map(str, c.per_instance)) or "n/a"),
        (f"capacity @{n} clients, deliv/s", capacity),
        ("  relative to baseline", vs_base),
        ("  p99 at that load, ms", lambda c: cell(c.capacity_p99_ms, "{:.1f}")),
        ("  instances' CPU, cores", lambda c: cell(c.capacity_server_cores, "{:.2f}")),
        ("  Redis CPU, cores", lambda c: cell(c.capacity_redis_cores, "{:.2f}")),
        ("  frames per PUBLISH", lambda c: cell(c.capacity_frames_per_publish, "{:.1f}")),
        (f"CPU/delivery, us ({fixed})", lambda c: cell(c.cpu_us_per_delivery, "{:.2f}")),
        ("  Redis CPU/delivery, us", lambda c: cell(c.redis_us_per_delivery, "{:.3f}")),
        ("  both, us", lambda c: cell(total_us(c), "{:.2f}")),
        (f"CPU/message, us ({fixed})", lambda c: cell(c.cpu_us_per_message, "{:,.0f}")),
        ("  Redis CPU/message, us", lambda c: cell(c.redis_us_per_message, "{:.1f}")),
        (f"p50 latency @{fixed}, ms", lambda c: cell(c.fixed_p50_ms, "{:.2f}")),
        (f"p99 latency @{fixed}, ms", lambda c: cell(c.fixed_p99_ms, "{:.2f}")),
        (f"instances' CPU @{fixed}, cores", lambda c: cell(c.fixed_server_cores, "{:.2f}")),
        (f"Redis CPU @{fixed}, cores", lambda c: cell(c.fixed_redis_cores, "{:.2f}")),
        (f"burst ({prof.burst_clients} clients), deliv/s", burst),
        ("  frames lost or split", burst_lost),
        ("warning/error events", lambda c: str(sum(c.problems.values()))),
        ("other processes, cores (worst step)", lambda c: cell(c.other_cores, "{:.2f}")),
    ]
    out = Table("", ["figure", *(c.name for c in cfgs)])
    for label, fn in rows:
        out.add(label, *(fn(c) for c in cfgs))
    return out


def notes(cfgs: list[Config]) -> list[str]:
    out: list[str] = []
    for c in cfgs:
        if c.capacity_note:
            out.append(f"note: {c.name}: capacity {c.capacity_note}")
        if c.capacity_limit:
            out.append(f"note: {c.name}: the step above capacity, {c.capacity_limit[0]}, failed: "
                  + "; ".join(c.capacity_limit[1:]))
        for err in c.errors:
            out.append(f"error: {c.name}: {err}")
        if c.problems:
            out.append(f"events: {c.name}: {c.problems}")
        if c.redis_buffer_kills:
            out.append(f"redis: {c.name}: {c.redis_buffer_kills} client(s) closed for their output "
                  "buffer (see redis.log)")
        keys = ("redis_published", "redis_received", "redis_dropped", "redis_missed",
                "redis_duplicates")
        told = [t for t in c.totals if "redis_published" in t]
        if c.redis and told:
            sums = {k.removeprefix("redis_"): sum(int(t.get(k) or 0) for t in told)
                    for k in keys}
            out.append(f"totals: {c.name}: {len(told)} of {c.instances} server.stopped: "
                  + ", ".join(f"{k} {v:,}" for k, v in sums.items()))
        if c.burst_why:
            out.append(f"burst: {c.name}: {'; '.join(c.burst_why)}")
        busy = [s for s in c.steps if s["other_cores"] >= OTHER_LOAD]
        if busy:
            out.append(f"machine: {c.name}: other processes used {OTHER_LOAD:g} cores or more "
                  f"during {len(busy)} of {len(c.steps)} steps (up to {c.other_cores:.2f}); load "
                  f"average {c.loadavg:.2f} at the start: its figures are not clean")
    return out


# -- main ----------------------------------------------------------------------------------------


def parse(args_list: list[str]) -> tuple[argparse.Namespace, Profile, list[int]]:
    """The options, the profile they select, and the instance counts; exit 2 when the run
    cannot happen (no redis-server, or an fsmchat without --redis)."""
    parser = argparse.ArgumentParser(
        description="fsmchat throughput with 1, 2 and 4 instances joined by Redis pub/sub")
    parser.add_argument("--quick", action="store_true", help="short steps: under 2 minutes")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="also write the result (every figure and step) to PATH")
    parser.add_argument("--clients", type=int, metavar="N", help="clients (default: 200)")
    parser.add_argument("--instances", default="1,2,4", metavar="LIST",
                        help="instance counts with Redis, comma-separated (default: 1,2,4)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the one instance without --redis")
    parser.add_argument("--no-burst", action="store_true", help="skip the burst step")
    parser.add_argument("--logdir", type=Path, metavar="DIR",
                        help="each process's output (default: a new directory under /tmp)")
    add_options(parser)
    args = parser.parse_args(args_list)
    prof = QUICK if args.quick else FULL
    if args.clients is not None:
        if args.clients < 2:
            parser.error("--clients must be at least 2")
        prof = Profile(**{**asdict(prof), "clients": args.clients})
    if args.no_burst:
        prof = Profile(**{**asdict(prof), "burst_seconds": 0.0})
    try:
        counts = [int(x) for x in args.instances.split(",") if x.strip()]
    except ValueError:
        parser.error("--instances takes comma-separated integers")
    if any(c < 1 for c in counts):
        parser.error("--instances: every count must be at least 1")
    if redis_version() == "missing":
        parser.error("redis-server is not on PATH (Debian: apt-get install redis-server)")
    return args, prof, counts


def check_fsmchat(counts: list[int]) -> None:
    if counts and not has_redis_option():
        usage_error("multi", "this fsmchat has no --redis option: nothing to measure but the "
                    "baseline (use --instances '' to run only that)")


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    args, prof, counts = parse(args_list)
    session = Session("multi", args, args_list, logdir=args.logdir)
    check_fsmchat(counts)  # of the checkout measured
    cfgs = ([] if args.no_baseline else [Config("baseline", 1, redis=False)])
    cfgs += [Config(f"N={c}", c, redis=True) for c in counts]

    def body() -> int:
        with sigint_ignored():  # forked before any thread
            gens = Generators(LoadGen(procs=1, lifetime=3600), LoadGen(procs=1, lifetime=3600))
        try:
            redis = Redis(session.logdir)
            redis.start()
            for cfg in cfgs:
                run_config(gens, redis, cfg, prof, session.logdir)
        except (RuntimeError, OSError) as exc:
            say(f"error: {exc}")
            return 1
        finally:
            gens.close()
        session.finish([table(cfgs, prof)], notes(cfgs),
                       {"profile": asdict(prof), "redis": redis_version(),
                        "redis_port": redis.port, "p99_limit_ms": P99_LIMIT_MS,
                        "generator_max_msgs_per_s": GEN_MAX_MSGS,
                        "configs": [asdict(c) for c in cfgs]})
        return 1 if any(c.errors for c in cfgs) else 0

    return session.run(body)


if __name__ == "__main__":
    sys.exit(main())
