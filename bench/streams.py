"""What Redis streams cost against plain pub/sub: CPU per delivery, and XREAD BLOCK fan-out.

    python bench/streams.py [--quick] [--instances 1,2,4] [--repeats 3] [--modes raw,chat]
                            [--history 100] [--before DIR] [--no-fanout | --fanout-only]
                            [--fsmchat DIR] [--out DIR] [--json PATH]

Part 1, fsmchat. One redis-server of its own (``multi.Redis``: loopback, no persistence), then
per mode (raw, then chat) and instance count N (1, 2, 4) runs alternating ``pubsub``,
``streams``, ``pubsub``, ... (``--repeats`` of each). A run empties Redis (FLUSHALL), starts N
fresh instances on one port,

    python -m fsmchat --port P --reuse-port --redis redis://127.0.0.1:R --history 100
        --mode M --log-level info --drain-timeout 2 [--no-redis-streams]

(``pubsub``: with ``--no-redis-streams``, or the build in ``--before DIR`` without it: a
checkout before streams), waits for their links (and, with streams, their first
``redis.synced``), connects 200 clients to P (raw: ``multi.py``'s generator; chat:
``chat.py``'s line clients, all in the lobby) and runs ``multi.py``'s fixed load:
200 clients x 2 msg/s of 64 bytes for 10 s (3 s with ``--quick``), every message its own
``send``, per-sender order verified. Over the step: deliveries counted by the generator, the
CPU seconds of every instance and of redis-server (/proc/PID/stat, all threads), and Redis's
command counts (``INFO commandstats``: PUBLISH, EVALSHA, XADD, the scripts' own calls
included), which say that a run did what its name says (streams: one XADD per message). CPU per
delivery = (instances + Redis) / deliveries, and split. The table has the medians per
configuration and N and the ratio streams / pubsub; the goal is at most 1.2.

Part 2, ``--fanout``: Redis alone, raw RESP over sockets (hiredis packs and parses), no
fsmchat. K readers (K = the instance counts), each a process of its own, receive M messages of
64 bytes from one publisher (one command at a time, its reply awaited), paced at 2,000/s,
then unpaced, either

- ``pubsub``: each reader SUBSCRIBEs; the publisher runs EVALSHA of a script that XADDs the
  message to a stream (``MAXLEN ~ 1000``) and PUBLISHes it; or
- ``xread``: each reader loops ``XREAD BLOCK 0 STREAMS s <last id>`` (``$`` first), re-issued
  after each reply; the publisher runs a plain ``XADD s MAXLEN ~ 1000 * m <message>``.

Figures: Redis CPU per message (/proc), reader CPU per message (each reader's own
``getrusage`` from ready to its last message, summed over the readers, per message), and the
latency from the publisher's send to a reader's receipt (CLOCK_MONOTONIC, the same clock in
every process): median and p99 over every (reader, message). Runs alternate too.

Prints the tables (stdout; progress on stderr), writes ``results/streams-<date>.json``; exit
status 1 when a run failed a check. Every process it starts is stopped at the end, also on
errors and signals.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import re
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import hiredis
from chat import chat_worker_main
from harness import checkout
from harness.counting import Generator
from harness.loadgen import LoadGen
from harness.procfs import Proc, machine_busy
from harness.report import Table, cell, say
from harness.server import HOST, Server, free_port, fsmchat
from harness.suite import Session, add_options, sigint_ignored, usage_error
from multi import Redis, RedisError, numsub, redis_call, redis_info, redis_version

CHANNEL = "fsmchat"  # the default --channel
CONFIGS = ("pubsub", "streams")
VARIANTS = ("pubsub", "xread")
GOAL = 1.2  # streams / pubsub, CPU per delivery, instances and Redis together
DRAIN_TIMEOUT = 2.0  # the instances' --drain-timeout (see multi.py)
OTHER_LOAD = 0.15  # cores other processes may use during a step before it is flagged
CLIENTS, RATE = 200, 2.0  # multi.py's fixed load: one message every 2.5 ms
FANOUT_SIZE = 64
FANOUT_MAXLEN = 1000


@dataclass(frozen=True)
class Profile:
    name: str
    seconds: float  # the fixed step
    repeats: int
    fanout_messages: int
    fanout_rates: tuple[float, ...]  # messages/s from the publisher; 0: unpaced


FULL = Profile("full", seconds=10.0, repeats=3, fanout_messages=10_000,
               fanout_rates=(2000.0, 0.0))
QUICK = Profile("quick", seconds=3.0, repeats=3, fanout_messages=3_000,
                fanout_rates=(2000.0, 0.0))


# -- Redis ---------------------------------------------------------------------------------------


def commandstats(port: int) -> dict[str, int]:
    """Calls per command so far (``INFO commandstats``; a script's own calls included)."""
    out: dict[str, int] = {}
    for key, value in redis_info(port, "commandstats").items():
        found = re.search(r"calls=(\d+)", value)
        if key.startswith("cmdstat_") and found:
            out[key.removeprefix("cmdstat_")] = int(found.group(1))
    return out


def calls_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    keep = ("publish", "evalsha", "xadd", "xread", "hincrby")
    return {k: after.get(k, 0) - before.get(k, 0) for k in keep}


# -- part 1: fsmchat -----------------------------------------------------------------------------


@dataclass
class Run:
    config: str  # "pubsub" or "streams"
    instances: int
    repeat: int
    mode: str = "raw"
    clients: int = 0
    per_instance: list[int] = field(default_factory=list)
    sent: int = 0
    deliveries: int = 0
    deliveries_per_s: float = 0.0
    wall_s: float = 0.0
    instance_cpu_s: float = 0.0
    redis_cpu_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)
    other_cores: float = 0.0
    totals: list[dict[str, Any]] = field(default_factory=list)
    problems: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def us_instances(self) -> float | None:
        return self.instance_cpu_s / self.deliveries * 1e6 if self.deliveries else None

    @property
    def us_redis(self) -> float | None:
        return self.redis_cpu_s / self.deliveries * 1e6 if self.deliveries else None

    @property
    def us_total(self) -> float | None:
        if not self.deliveries:
            return None
        return (self.instance_cpu_s + self.redis_cpu_s) / self.deliveries * 1e6


class Builds:
    """Which checkout and which options each configuration runs."""

    def __init__(self, before: checkout.Checkout | None) -> None:
        self.after = checkout.current()
        self.before = before

    @contextlib.contextmanager
    def of(self, config: str) -> Iterator[list[str]]:
        """The extra options of ``config``, with its checkout in use meanwhile."""
        if config == "pubsub" and self.before is not None:
            checkout.CHECKOUT = self.before
            try:
                yield []
            finally:
                checkout.CHECKOUT = self.after
        else:
            yield ["--no-redis-streams"] if config == "pubsub" else []


def wait_for(what: str, condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not after {timeout:g}s")
        time.sleep(0.02)


def start_instances(run: Run, redis: Redis, port: int, *, extra: list[str], history: int,
                    logdir: Path) -> list[Server]:
    servers: list[Server] = []
    for i in range(run.instances):
        argv = fsmchat("--port", str(port), "--reuse-port", "--redis",
                       f"redis://{HOST}:{redis.port}", "--history", str(history),
                       "--mode", run.mode, "--log-level", "info", "--drain-timeout",
                       str(DRAIN_TIMEOUT), *extra)
        server = Server(f"{run.mode}-{run.config}-n{run.instances}-r{run.repeat}-{i}", argv,
                        logdir, read="all")
        servers.append(server)
        server.start()
    links = {"publish", "subscribe"} | ({"history"} if run.config == "streams" else set())
    for server in servers:
        wait_for(f"{server.name}: Redis links {sorted(links)}",
                 lambda s=server: links <= s.links or not s.alive(), 15.0)  # type: ignore[misc]
        if run.config == "streams":
            wait_for(f"{server.name}: redis.synced",
                     lambda s=server: s.events["redis.synced"] > 0 or not s.alive(),  # type: ignore[misc]
                     15.0)
        if not server.alive():
            raise RuntimeError(f"{server.name} exited (see {server.stderr_path})")
    wait_for(f"{run.instances} subscribers", lambda: numsub(redis.port, CHANNEL) == run.instances,
             5.0)
    return servers


def measure(run: Run, gen: LoadGen, redis: Redis, *, builds: Builds, prof: Profile,
            history: int, logdir: Path) -> None:
    """One run: fresh instances on a fresh port, one fixed step, everything stopped."""
    redis_call(redis.port, "FLUSHALL")
    port = free_port()
    servers: list[Server] = []
    try:
        with builds.of(run.config) as extra:
            servers = start_instances(run, redis, port, extra=extra, history=history,
                                      logdir=logdir)
        before = [s.accepted for s in servers]
        conn = gen.connect(HOST, port, CLIENTS, timeout=30, barrier_timeout=20)
        wait_for("accept events", lambda: sum(s.accepted for s in servers) - sum(before)
                 >= conn.connected, 5.0)
        run.clients = conn.connected
        run.per_instance = [s.accepted - b for s, b in zip(servers, before, strict=True)]
        if not conn.in_chat:
            raise RuntimeError(f"clients not all in the chat: {conn.connected} connected, a "
                               f"probe reached {conn.reached}")
        stats0 = commandstats(redis.port)
        t0, busy0 = time.monotonic(), machine_busy() - time.process_time()
        cpu0 = [s.cpu_seconds() for s in servers]
        rcpu0 = redis.cpu_seconds()
        res = gen.run(RATE, prof.seconds, verify=True, drain_timeout=5.0)
        cpu1 = [s.cpu_seconds() for s in servers]
        rcpu1 = redis.cpu_seconds()
        t1, busy1 = time.monotonic(), machine_busy() - time.process_time()
        run.calls = calls_between(stats0, commandstats(redis.port))
        run.wall_s = t1 - t0
        run.instance_cpu_s = sum(cpu1) - sum(cpu0)
        run.redis_cpu_s = rcpu1 - rcpu0
        run.sent, run.deliveries = res.sent, res.received
        run.deliveries_per_s = res.delivered_per_s
        run.p50_ms, run.p99_ms = res.p50_ms, res.p99_ms
        used = run.instance_cpu_s + run.redis_cpu_s + res.gen_cpu_frac * run.wall_s
        run.other_cores = max(0.0, (busy1 - busy0 - used) / run.wall_s)
        run.errors += [f"step: {e}" for e in res.errors]
        xadds = run.calls["xadd"]
        if run.config == "streams" and xadds < res.sent:
            run.errors.append(f"streams: {xadds} XADD for {res.sent} messages")
        if run.config == "pubsub" and xadds:
            run.errors.append(f"pubsub: {xadds} XADD (streams were on)")
        gen.disconnect()
    finally:
        for server in servers:
            server.stop()
            run.totals.append(server.totals())
            for name, count in server.problems.items():
                run.problems[name] = run.problems.get(name, 0) + count
            if server.exit_status not in (0, None):
                run.errors.append(f"{server.name} exited with status {server.exit_status}")
    check_totals(run)


def check_totals(run: Run) -> None:
    """Each instance receives what every other one published, once; none missed any."""
    told = [t for t in run.totals if "redis_published" in t]
    if len(told) < run.instances:
        run.errors.append(f"{len(told)} of {run.instances} instances logged Redis totals")
        return
    published = sum(int(t["redis_published"]) for t in told)
    received = sum(int(t.get("redis_received") or 0) for t in told)
    if received != (run.instances - 1) * published:
        run.errors.append(f"instances received {received:,} from Redis, expected "
                          f"{run.instances - 1} x {published:,}")
    for key in ("redis_dropped", "redis_missed", "redis_duplicates", "redis_gaps"):
        if any(t.get(key) for t in told):
            run.errors.append(f"{key}: {[t.get(key) for t in told]}")


def median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def aggregate(values: list[float | None], *, worst: bool) -> float | None:
    """The median of the runs' figures, or the worst (highest) one."""
    got = [v for v in values if v is not None]
    if not got:
        return None
    return max(got) if worst else statistics.median(got)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def fsmchat_table(runs: list[Run], counts: list[int], title: str
                  ) -> tuple[Table, dict[str, Any]]:
    columns = ["figure (median)"]
    for n in counts:
        columns += [f"N={n} pubsub", f"N={n} streams", "ratio"]
    table = Table(title, columns)
    summary: dict[str, Any] = {}

    def of(config: str, n: int) -> list[Run]:
        return [r for r in runs if r.config == config and r.instances == n]

    figures: list[tuple[str, Callable[[Run], float | None], str, bool]] = [
        ("CPU/delivery, us (instances + Redis)", lambda r: r.us_total, "{:.2f}", True),
        ("  instances, us", lambda r: r.us_instances, "{:.2f}", True),
        ("  Redis, us", lambda r: r.us_redis, "{:.3f}", True),
        ("deliveries/s", lambda r: r.deliveries_per_s, "{:,.0f}", False),
        ("instances' CPU, cores", lambda r: r.instance_cpu_s / r.wall_s if r.wall_s else None,
         "{:.2f}", True),
        ("Redis CPU, cores", lambda r: r.redis_cpu_s / r.wall_s if r.wall_s else None,
         "{:.3f}", True),
        ("p50 latency, ms", lambda r: r.p50_ms, "{:.2f}", False),
        ("p99 latency, ms", lambda r: r.p99_ms, "{:.2f}", False),
        ("XADD per message", lambda r: r.calls.get("xadd", 0) / r.sent if r.sent else None,
         "{:.2f}", False),
        ("other processes, cores (worst run)", lambda r: r.other_cores, "{:.2f}", False),
    ]
    for label, fn, fmt, with_ratio in figures:
        cells: list[str] = []
        for n in counts:
            a, b = (aggregate([fn(r) for r in of(config, n)], worst="worst" in label)
                    for config in CONFIGS)
            cells += [cell(a, fmt), cell(b, fmt), ratio(b, a) if with_ratio else ""]
            if label.startswith("CPU/delivery"):
                summary[f"N={n}"] = {"pubsub_us": a, "streams_us": b,
                                     "ratio": (b / a) if a and b is not None else None}
        table.add(label, *cells)
    spread: list[str] = []
    for n in counts:
        for config in CONFIGS:
            vals = [r.us_total for r in of(config, n) if r.us_total is not None]
            spread.append(f"{min(vals):.2f}-{max(vals):.2f}" if vals else "n/a")
        spread.append("")
    table.add("  CPU/delivery, runs' min-max", *spread)
    runs_row: list[str] = []
    for n in counts:
        runs_row += [str(len(of("pubsub", n))), str(len(of("streams", n))), ""]
    table.add("runs", *runs_row)
    return table, summary


# -- part 2: fan-out, Redis alone ----------------------------------------------------------------

FANOUT_SCRIPT = b"""
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[3])
return redis.call('PUBLISH', ARGV[1], ARGV[3])
"""
STREAM_KEY, FANOUT_CHANNEL = b"fanout:s", b"fanout:c"


def message(seq: int) -> bytes:
    """64 bytes: the sequence number and the send time (CLOCK_MONOTONIC, ns), padded."""
    return b"%010d %020d " % (seq, time.monotonic_ns()) + b"." * (FANOUT_SIZE - 32)


def fanout_reader(control: Connection, port: int, variant: str, count: int) -> None:
    """One reader process: receive ``count`` messages, then send back the latencies (ns) and
    its own CPU from ready to the last message."""
    parser = hiredis.Reader(replyError=RedisError, protocolError=ConnectionError)
    sock = socket.create_connection((HOST, port), 10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(60)

    def send(*args: bytes) -> None:
        sock.sendall(hiredis.pack_command(args))  # type: ignore[arg-type]

    if variant == "pubsub":
        send(b"SUBSCRIBE", FANOUT_CHANNEL)
        reply = parser.gets()
        while reply is False:
            parser.feed(sock.recv(1 << 16))
            reply = parser.gets()
    latencies: list[int] = []
    last_id = b"$"
    if variant == "xread":
        send(b"XREAD", b"BLOCK", b"0", b"STREAMS", STREAM_KEY, last_id)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    control.send("ready")
    last_seq = -1
    replies = 0
    while last_seq < count - 1:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        now = time.monotonic_ns()
        parser.feed(chunk)
        reply = parser.gets()
        while reply is not False:
            replies += 1
            if variant == "pubsub":
                payloads = [reply[2]]  # [b"message", channel, payload]
            else:
                entries = reply[0][1]  # [[stream, [[id, [b"m", payload]], ...]]]
                payloads = [fields[1] for _id, fields in entries]
                last_id = entries[-1][0]
                send(b"XREAD", b"BLOCK", b"0", b"STREAMS", STREAM_KEY, last_id)
            for payload in payloads:
                last_seq = int(payload[:10])
                latencies.append(now - int(payload[11:31]))
            reply = parser.gets()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    control.send({"cpu_s": usage.ru_utime + usage.ru_stime - cpu0, "latencies": latencies,
                  "replies": replies})
    control.recv()  # until the parent is done with this process
    sock.close()


@dataclass
class FanoutRun:
    variant: str
    readers: int
    repeat: int
    rate: float  # messages/s; 0: unpaced (one command at a time, each reply awaited)
    messages: int = 0
    received: int = 0  # by all readers
    seconds: float = 0.0
    redis_cpu_s: float = 0.0
    reader_cpu_s: float = 0.0
    publisher_cpu_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    lag_ms: float = 0.0  # how late the publisher got against its schedule, at worst
    entries_per_reply: float = 0.0  # xread: entries over XREAD replies, all readers
    errors: list[str] = field(default_factory=list)


class Client:
    """The publisher's link: one command at a time, its reply awaited."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), 10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.parser = hiredis.Reader(replyError=RedisError, protocolError=ConnectionError)

    def call(self, *args: bytes) -> Any:
        self.sock.sendall(hiredis.pack_command(args))  # type: ignore[arg-type]
        reply = self.parser.gets()
        while reply is False:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.parser.feed(chunk)
            reply = self.parser.gets()
        if isinstance(reply, RedisError):
            raise reply
        return reply

    def close(self) -> None:
        self.sock.close()


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q / 100 * len(sorted_values)))]


Readers = list[tuple[mp.process.BaseProcess, Connection]]


def start_readers(run: FanoutRun, redis: Redis, count: int) -> Readers:
    """K reader processes (spawned: this process has threads), each ready, and Redis counting
    them subscribed or blocked."""
    ctx = mp.get_context("spawn")
    readers: Readers = []
    for i in range(run.readers):
        parent, child = ctx.Pipe()
        proc: mp.process.BaseProcess = ctx.Process(
            target=fanout_reader, args=(child, redis.port, run.variant, count), daemon=True,
            name=f"fanout-reader-{i}")
        proc.start()
        child.close()
        readers.append((proc, parent))
    for _proc, conn in readers:
        if not conn.poll(30) or conn.recv() != "ready":
            raise RuntimeError("a fan-out reader did not get ready")
    if run.variant == "pubsub":
        wait_for("subscribers", lambda: numsub(redis.port, FANOUT_CHANNEL.decode())
                 == run.readers, 10.0)
    else:
        wait_for("blocked readers", lambda: int(redis_info(redis.port, "clients")
                 .get("blocked_clients", "0")) == run.readers, 10.0)
    return readers


def publish(run: FanoutRun, pub: Client, sha: bytes, prof: Profile) -> None:
    """M messages, paced; how late the publisher got against its schedule."""
    maxlen = str(FANOUT_MAXLEN).encode()
    t0 = time.monotonic()
    for seq in range(prof.fanout_messages):
        if run.rate:
            due = t0 + seq / run.rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            else:
                run.lag_ms = max(run.lag_ms, (now - due) * 1000)
        if run.variant == "pubsub":
            pub.call(b"EVALSHA", sha, b"1", STREAM_KEY, FANOUT_CHANNEL, maxlen, message(seq))
        else:
            pub.call(b"XADD", STREAM_KEY, b"MAXLEN", b"~", maxlen, b"*", b"m", message(seq))


def fanout_run(run: FanoutRun, redis: Redis, prof: Profile) -> None:
    redis_call(redis.port, "FLUSHALL")
    pub = Client(redis.port)
    sha = pub.call(b"SCRIPT", b"LOAD", FANOUT_SCRIPT)
    readers: Readers = []
    try:
        readers = start_readers(run, redis, prof.fanout_messages)
        rproc = Proc(redis.pid)
        rcpu0, pcpu0, t0 = rproc.cpu_seconds(), time.process_time(), time.monotonic()
        publish(run, pub, sha, prof)
        run.publisher_cpu_s = time.process_time() - pcpu0
        latencies: list[int] = []
        replies = 0
        for _proc, conn in readers:
            if not conn.poll(30):
                raise RuntimeError("a fan-out reader did not receive every message in 30 s")
            got = conn.recv()
            run.reader_cpu_s += float(got["cpu_s"])
            latencies += got["latencies"]
            replies += int(got["replies"])
        run.seconds = time.monotonic() - t0
        run.redis_cpu_s = rproc.cpu_seconds() - rcpu0
        run.messages, run.received = prof.fanout_messages, len(latencies)
        if run.variant == "xread" and replies:
            run.entries_per_reply = run.received / replies
        latencies.sort()
        run.p50_ms = percentile(latencies, 50) / 1e6
        run.p99_ms = percentile(latencies, 99) / 1e6
        if run.received != run.messages * run.readers:
            run.errors.append(f"received {run.received} of {run.messages} x {run.readers}")
    finally:
        pub.close()
        for proc, conn in readers:
            with contextlib.suppress(OSError):
                conn.send("exit")
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def fanout_table(runs: list[FanoutRun], counts: list[int], prof: Profile, rate: float
                 ) -> Table:
    columns = ["figure (median)"]
    for k in counts:
        columns += [f"K={k} pubsub", f"K={k} xread", "ratio"]
    pace = f"at {rate:,.0f}/s" if rate else "unpaced (each reply awaited)"
    table = Table(f"fan-out in Redis alone: {prof.fanout_messages:,} messages of "
                  f"{FANOUT_SIZE} B {pace} to K readers "
                  f"(pubsub: EVALSHA XADD+PUBLISH, SUBSCRIBE; xread: XADD, XREAD BLOCK)",
                  columns)
    runs = [r for r in runs if r.rate == rate]

    def per_msg(attr: str) -> Callable[[FanoutRun], float | None]:
        return lambda r: getattr(r, attr) / r.messages * 1e6 if r.messages else None

    figures: list[tuple[str, Callable[[FanoutRun], float | None], str, bool]] = [
        ("Redis CPU/message, us", per_msg("redis_cpu_s"), "{:.2f}", True),
        ("readers' CPU/message, us (all K)", per_msg("reader_cpu_s"), "{:.2f}", True),
        ("publisher CPU/message, us", per_msg("publisher_cpu_s"), "{:.2f}", True),
        ("latency p50, ms", lambda r: r.p50_ms, "{:.3f}", True),
        ("latency p99, ms", lambda r: r.p99_ms, "{:.3f}", True),
        ("messages/s", lambda r: r.messages / r.seconds if r.seconds else None, "{:,.0f}",
         False),
        ("entries per XREAD reply", lambda r: r.entries_per_reply or None, "{:.2f}", False),
        ("publisher late at worst, ms", lambda r: r.lag_ms if r.rate else None, "{:.1f}",
         False),
    ]
    for label, fn, fmt, with_ratio in figures:
        cells: list[str] = []
        for k in counts:
            a = median([fn(r) for r in runs if r.variant == "pubsub" and r.readers == k])
            b = median([fn(r) for r in runs if r.variant == "xread" and r.readers == k])
            cells += [cell(a, fmt), cell(b, fmt), ratio(b, a) if with_ratio else ""]
        table.add(label, *cells)
    return table


# -- main ----------------------------------------------------------------------------------------


def parse(args_list: list[str]) -> tuple[argparse.Namespace, Profile, list[int]]:
    parser = argparse.ArgumentParser(
        description="fsmchat with Redis streams against plain pub/sub: CPU per delivery, 1, 2 "
        "and 4 instances; and XREAD BLOCK fan-out against SUBSCRIBE in Redis alone")
    parser.add_argument("--quick", action="store_true", help="3 s steps, fewer messages")
    parser.add_argument("--instances", default="1,2,4", metavar="LIST",
                        help="instance (and reader) counts, comma-separated (default: 1,2,4)")
    parser.add_argument("--repeats", type=int, metavar="N", help="runs of each (default: 3)")
    parser.add_argument("--modes", default="raw,chat", metavar="LIST",
                        help="fsmchat modes measured, in this order (default: raw,chat)")
    parser.add_argument("--history", type=int, default=100, metavar="N",
                        help="the instances' --history (default: 100)")
    parser.add_argument("--before", type=Path, metavar="DIR",
                        help="run pubsub on the fsmchat of DIR (a checkout before streams) "
                             "instead of this build with --no-redis-streams")
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--no-fanout", action="store_true", help="leave out part 2")
    part.add_argument("--fanout-only", action="store_true", help="only part 2, no fsmchat")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the result here")
    parser.add_argument("--logdir", type=Path, metavar="DIR",
                        help="each process's output (default: a new directory under /tmp)")
    add_options(parser)
    args = parser.parse_args(args_list)
    prof = QUICK if args.quick else FULL
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error("--repeats must be at least 1")
        prof = Profile(**{**asdict(prof), "repeats": args.repeats})
    try:
        counts = [int(x) for x in args.instances.split(",") if x.strip()]
    except ValueError:
        parser.error("--instances takes comma-separated integers")
    if not counts or any(c < 1 for c in counts):
        parser.error("--instances: counts of at least 1")
    args.modes = [m for m in args.modes.split(",") if m.strip()]
    if not set(args.modes) <= {"raw", "chat"}:
        parser.error("--modes: raw and/or chat")
    if redis_version() == "missing":
        parser.error("redis-server is not on PATH (Debian: apt-get install redis-server)")
    return args, prof, counts


def say_run(run: Run) -> None:
    say(f"  {run.deliveries:,} deliveries, {run.deliveries_per_s:,.0f}/s; CPU/delivery "
        f"{cell(run.us_total, '{:.2f}')} us (instances {cell(run.us_instances, '{:.2f}')}, "
        f"Redis {cell(run.us_redis, '{:.3f}')}); calls {run.calls}"
        + (f"; OTHER PROCESSES {run.other_cores:.2f} cores" if run.other_cores >= OTHER_LOAD
           else "")
        + "".join(f"\n  error: {e}" for e in run.errors))


def run_fsmchat(gens: dict[str, LoadGen], redis: Redis, counts: list[int], *, builds: Builds,
                prof: Profile, history: int, logdir: Path) -> list[Run]:
    """Part 1: per mode and instance count, the configurations in turn, ``repeats`` times."""
    runs: list[Run] = []
    for mode, gen in gens.items():
        for n in counts:
            for repeat in range(prof.repeats):
                for config in CONFIGS:
                    run = Run(config, n, repeat, mode)
                    say(f"== {mode} {config}, {n} instance(s), run {repeat + 1} of "
                        f"{prof.repeats}")
                    try:
                        measure(run, gen, redis, builds=builds, prof=prof, history=history,
                                logdir=logdir)
                    except (RuntimeError, TimeoutError, OSError, RedisError) as exc:
                        run.errors.append(f"{type(exc).__name__}: {exc}")
                    runs.append(run)
                    say_run(run)
    return runs


def run_fanout(redis: Redis, counts: list[int], prof: Profile) -> list[FanoutRun]:
    """Part 2: per reader count, the variants in turn, ``repeats`` times."""
    fruns: list[FanoutRun] = []
    for rate in prof.fanout_rates:
        for k in counts:
            for repeat in range(prof.repeats):
                for variant in VARIANTS:
                    frun = FanoutRun(variant, k, repeat, rate)
                    say(f"== fan-out {variant}, {k} reader(s), "
                        f"{f'{rate:g}/s' if rate else 'unpaced'}, run {repeat + 1}")
                    try:
                        fanout_run(frun, redis, prof)
                    except (RuntimeError, OSError, RedisError) as exc:
                        frun.errors.append(f"{type(exc).__name__}: {exc}")
                    fruns.append(frun)
                    say(f"  Redis {frun.redis_cpu_s:.3f}s, readers {frun.reader_cpu_s:.3f}s, "
                        f"p50 {frun.p50_ms:.3f} ms, p99 {frun.p99_ms:.3f} ms"
                        + "".join(f"\n  error: {e}" for e in frun.errors))
    return fruns


def report(runs: list[Run], fruns: list[FanoutRun], *, modes: list[str], counts: list[int],
           prof: Profile, history: int, pubsub: str
           ) -> tuple[list[Table], list[str], dict[str, Any]]:
    """The tables, the notes (goals, errors, events, a busy machine) and the medians."""
    tables: list[Table] = []
    summary: dict[str, Any] = {}
    notes: list[str] = []
    for mode in modes:
        t, summary[mode] = fsmchat_table(
            [r for r in runs if r.mode == mode], counts,
            f"fsmchat {mode} mode --history {history}, {CLIENTS} clients x {RATE:g} msg/s of "
            f"64 B, {prof.seconds:g} s; pubsub: {pubsub}; streams: this build")
        tables.append(t)
        for n, got in summary[mode].items():
            if got["ratio"] is not None:
                met = "met" if got["ratio"] <= GOAL else "NOT met"
                notes.append(f"goal {mode} {n}: streams/pubsub CPU per delivery "
                             f"{got['ratio']:.2f}x (goal <= {GOAL:g}x): {met}")
    if fruns:
        tables += [fanout_table(fruns, counts, prof, rate) for rate in prof.fanout_rates]
    for r in runs:
        name = f"{r.mode} {r.config} N={r.instances} run {r.repeat + 1}"
        notes += [f"error: {name}: {e}" for e in r.errors]
        if r.problems:
            notes.append(f"events: {name}: {r.problems}")
        if r.other_cores >= OTHER_LOAD:
            notes.append(f"machine: {name}: other processes used {r.other_cores:.2f} cores")
    for f in fruns:
        notes += [f"error: fan-out {f.variant} K={f.readers} run {f.repeat + 1}: {e}"
                  for e in f.errors]
    return tables, notes, summary


def generators(modes: list[str]) -> dict[str, LoadGen]:
    """A load generator per mode (binary frames for raw, lines for chat), forked before any
    thread."""
    with sigint_ignored():
        return {mode: LoadGen(procs=1, lifetime=3600) if mode == "raw" else
                Generator(None, 1, target=chat_worker_main, name="streams-chat")
                for mode in modes}


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    args, prof, counts = parse(args_list)
    session = Session("streams", args, args_list, logdir=args.logdir)
    after = checkout.current()
    before: checkout.Checkout | None = None
    if args.before is not None:
        try:
            before = checkout.use(args.before)
        except checkout.CheckoutError as exc:
            usage_error("streams", str(exc).replace("--fsmchat", "--before"))
        checkout.CHECKOUT = after
    before_sources = before.digest() if before is not None else ""
    modes: list[str] = [] if args.fanout_only else args.modes
    if modes and before is None and \
            "--no-redis-streams" not in after.run("-m", "fsmchat", "--help").stdout:
        usage_error("streams", "this fsmchat has no --no-redis-streams: no streams to measure "
                    "(an older build? give it as --before)")
    builds = Builds(before)
    pubsub = (f"--before {before.facts()['describe']}" if before is not None
              else "--no-redis-streams")

    def body() -> int:
        gens = generators(modes)
        try:
            redis = Redis(session.logdir)
            redis.start()
            runs = run_fsmchat(gens, redis, counts, builds=builds, prof=prof,
                               history=args.history, logdir=session.logdir)
            fruns = [] if args.no_fanout else run_fanout(redis, counts, prof)
        finally:
            for gen in gens.values():
                gen.close()
        tables, notes, summary = report(runs, fruns, modes=modes, counts=counts, prof=prof,
                                        history=args.history, pubsub=pubsub)
        changed = not session.same_build() or (
            before is not None and before.digest() != before_sources)
        if changed:
            notes.append("error: the fsmchat sources changed during the run")
        session.finish(tables, notes, {
            "profile": asdict(prof), "redis": redis_version(), "clients": CLIENTS,
            "rate": RATE, "history": args.history, "modes": modes, "goal": GOAL,
            "pubsub": pubsub, "summary": summary,
            "before": before.facts() if before is not None else None,
            "runs": [{**asdict(r), "us_total": r.us_total, "us_instances": r.us_instances,
                      "us_redis": r.us_redis} for r in runs],
            "fanout": [asdict(f) for f in fruns]})
        failed = changed or any(r.errors for r in runs) or any(f.errors for f in fruns)
        return 1 if failed else 0

    return session.run(body)


if __name__ == "__main__":
    sys.exit(main())
