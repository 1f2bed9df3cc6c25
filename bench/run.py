"""The benchmark suite: fsmchat against other broadcast relays, one command, one table.

    python bench/run.py [--quick] [--out bench/results]

Servers: fsmchat at ``--log-level info`` and at its default ``debug``; the asyncio, select and
Twisted relays in ``bench/peers/``; ``ncat --broker`` when the ``ncat`` binary exists (skipped
with a note otherwise, and Twisted likewise when it is not installed). Every figure is measured
for every server in the same run, one figure after the other (all servers for one figure, then
the next), each server a fresh process on 127.0.0.1 with the descriptor limit raised:

1. server CPU (utime + stime from /proc/PID/stat) per delivered message, 50 clients x 20 msg/s;
2. capacity: the highest delivery rate with p99 latency under 50 ms and nothing lost, found by
   doubling the per-client rate and then bisecting, at 100 and at 500 clients;
3. p50/p99 latency at 100 clients x 10 msg/s;
4. memory per idle connection: VmRSS delta over 1,000 idle clients (per descriptor gained);
5. accept rate: connections that connect, are relayed (an observer client sees their frame)
   and close, per second, until the server's descriptor count is back where it was.

Prints the table and the fsmchat/peer ratios, writes ``results.json`` and ``latency.png``
(p99 latency against offered load) into ``--out``. ``bench/README.md`` explains the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from loadgen import LoadGen, StepResult, raise_nofile

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / "peers"
PY = sys.executable
HOST = "127.0.0.1"
P99_LIMIT_MS = 50.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
GEN_MAX_MSGS = 50_000.0
"""Messages per second one generator process can send, each with its own ``send``, while the
server under test has the other core (measured: about 60,000 here); capacity steps stop there."""
GEN_LIMIT = "generator limit"
GEN_BUSY = 0.9
"""A failed step with the generator this busy (fraction of its core) may be the generator's
failure as much as the server's: the capacity found is then only a lower bound."""


@dataclass(frozen=True)
class Profile:
    name: str
    cpu_seconds: float  # figure 1: sending time
    latency_seconds: float  # figure 3
    step_seconds: float  # one capacity step
    growth: float  # capacity: factor between steps going up (or down)
    refine: int  # capacity: bisections between the last pass and the first failure
    max_up: int  # capacity: most steps up from the start rate
    idle_clients: int  # figure 4
    churn: int  # figure 5: connections
    drain_timeout: float  # seconds a step may take to deliver what was sent


FULL = Profile("full", cpu_seconds=10, latency_seconds=10, step_seconds=4, growth=2.0, refine=3,
               max_up=9, idle_clients=1000, churn=3000, drain_timeout=5)
QUICK = Profile("quick", cpu_seconds=3, latency_seconds=3, step_seconds=1.5, growth=3.0,
                refine=0, max_up=8, idle_clients=1000, churn=1000, drain_timeout=3)


@dataclass(frozen=True)
class Spec:
    name: str
    argv: Callable[[int], list[str]]  # the command, given a port (0 unless fixed_port)
    fixed_port: bool = False  # True: no server.started line, the bench picks the port
    note: str = ""


def specs() -> tuple[list[Spec], list[str]]:
    """The servers to measure, and a note for each one skipped."""
    fsm = [PY, "-m", "fsmchat", "--host", HOST, "--max-clients-per-addr", "0"]  # one address
    out = [
        Spec("fsmchat-info", lambda p: [*fsm, "--port", str(p), "--log-level", "info"],
             note="fsmchat --log-level info"),
        Spec("fsmchat-debug", lambda p: [*fsm, "--port", str(p)],
             note="fsmchat at its default --log-level debug"),
        Spec("asyncio", lambda p: [PY, str(PEERS / "asyncio_relay.py"), "--port", str(p)],
             note="asyncio streams, write + await drain() per recipient"),
        Spec("select", lambda p: [PY, str(PEERS / "select_relay.py"), "--port", str(p)],
             note="textbook select(), one send per message per writable event"),
    ]
    skipped: list[str] = []
    try:
        import twisted  # noqa: F401, PLC0415 - only whether it is there
    except ImportError:
        skipped.append("twisted: not installed (pip install twisted)")
    else:
        out.append(Spec("twisted", lambda p: [PY, str(PEERS / "twisted_relay.py"), "--port",
                                              str(p)],
                        note="Twisted Protocol/Factory, transport.write to the others"))
    ncat = shutil.which("ncat")
    if ncat:
        out.append(Spec("ncat", lambda p: [ncat, "--broker", "--listen", HOST, str(p),
                                           "--max-conns", "2000"], fixed_port=True,
                        note="ncat --broker (C); --max-conns 2000 (its default is 100)"))
    else:
        skipped.append("ncat: no ncat binary (Debian: apt-get install ncat)")
    return out, skipped


# -- a server process ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    """One server process in its own session; stdout read all the time by a thread."""

    scan_all = False
    """Whether ``_scan`` sees every line of stdout, not only the batches read before the start
    and those with a warning or an error: for a subclass that wants every event."""
    log_stdout = False
    """Whether stdout is also written, as read, to ``LOGDIR/NAME.stdout.jsonl``."""

    def __init__(self, spec: Spec, logdir: Path) -> None:
        self.spec = spec
        self.logdir = logdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.started = threading.Event()
        self.reader: threading.Thread | None = None
        self.stdout_bytes = 0
        self.problems: Counter[str] = Counter()  # warning/error events by name
        self.problem_lines: list[str] = []  # the first few of them
        self._stderr: IO[bytes] | None = None
        self._stdout_log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> None:
        port = free_port() if self.spec.fixed_port else 0
        self._stderr = (self.logdir / f"{self.spec.name}.stderr.log").open("ab")
        if self.log_stdout:
            self._stdout_log = (self.logdir / f"{self.spec.name}.stdout.jsonl").open("ab")
        self.proc = subprocess.Popen(self.spec.argv(port), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self._stderr, cwd=ROOT,
                                     start_new_session=True)
        LIVE.add(self)
        self.reader = threading.Thread(target=self._read_stdout, daemon=True,
                                       name=f"stdout-{self.spec.name}")
        self.reader.start()
        deadline = time.monotonic() + timeout
        if self.spec.fixed_port:
            self.port = port
            for _ in range(int(timeout / 0.05) + 1):
                if time.monotonic() > deadline or not self.alive():
                    break
                with contextlib.suppress(OSError), socket.create_connection((HOST, port), 1.0):
                    self.started.set()
                    break
                time.sleep(0.05)
        else:
            self.started.wait(timeout)
        if not self.started.is_set() or not self.alive():
            raise RuntimeError(f"{self.spec.name} did not start (see {self._stderr.name})")

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        tail = b""
        for _ in range(10**9):  # until EOF; bounded all the same
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            self.stdout_bytes += len(chunk)
            if self._stdout_log is not None:
                self._stdout_log.write(chunk)
            data = tail + chunk
            cut = data.rfind(b"\n") + 1
            lines, tail = data[:cut], data[cut:]
            if self.scan_all or not self.started.is_set() or b'"level":"warning"' in lines or \
                    b'"level":"error"' in lines:
                self._scan(lines)

    def _scan(self, lines: bytes) -> None:
        for raw in lines.splitlines():
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if isinstance(event, dict):
                self._event(event, raw)

    def _event(self, event: dict[str, Any], raw: bytes) -> None:
        """One JSON event from stdout: the start and the problems (a subclass may read more)."""
        name = event.get("event")
        if name == "server.started" and not self.started.is_set():
            self.port = int(event["port"])
            self.started.set()
        if event.get("level") in ("warning", "error"):
            self.problems[str(name)] += 1
            if len(self.problem_lines) < 20:
                self.problem_lines.append(raw.decode(errors="replace"))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_times(self) -> tuple[float, float]:
        """User and system CPU seconds so far (fields 14 and 15 of /proc/PID/stat)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK

    def cpu_seconds(self) -> float:
        user, system = self.cpu_times()
        return user + system

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def wait_fds(self, target: int, timeout: float) -> bool:
        """Wait until the server holds at most ``target`` descriptors."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.01) + 1):
            if not self.alive() or self.fd_count() <= target:
                return self.alive()
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)  # its own session: the group is its pid
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.reader is not None:
            self.reader.join(5.0)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
        if self._stdout_log is not None:
            self._stdout_log.close()
            self._stdout_log = None
        LIVE.discard(self)


LIVE: set[Server] = set()


def stop_all() -> None:
    for server in list(LIVE):
        server.stop()


# -- the figures ---------------------------------------------------------------------------------


@dataclass
class Figures:
    spec: str
    note: str = ""
    cpu_us_per_delivery: float | None = None
    cpu_us_per_message: float | None = None  # per message relayed (to n-1 recipients)
    cpu_server_frac: float | None = None  # of one core, during the CPU step
    cpu_user_frac: float | None = None  # the share of that CPU time spent in user space
    capacity_100: float | None = None  # deliveries/s
    capacity_500: float | None = None
    capacity_100_note: str = ""
    capacity_500_note: str = ""
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_server_cpu: float | None = None  # fraction of one core during that step
    mem_kib_per_conn: float | None = None
    mem_idle_accepted: int | None = None
    accept_per_s: float | None = None
    accept_failed: int | None = None
    steps: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    problems: dict[str, int] = field(default_factory=dict)  # warning/error events, fsmchat
    problem_lines: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each phase
    errors: list[str] = field(default_factory=list)


def judge(res: StepResult) -> list[str]:
    """Why a capacity step fails: loss and the like, p99 at or over the limit, or a late sender."""
    why = list(res.errors)
    if not res.p99_ms < P99_LIMIT_MS:
        why.append(f"p99 {res.p99_ms:.1f} ms")
    if res.rate and res.send_s > res.duration * 1.2 + 0.2:
        why.append(f"{GEN_LIMIT}: sending took {res.send_s:.1f}s for {res.duration:.1f}s")
    if why and res.gen_cpu_frac >= GEN_BUSY:
        why.append(f"{GEN_LIMIT}: its CPU at {res.gen_cpu_frac:.0%}")
    return why


def fail(fig: Figures, msg: str) -> None:
    fig.errors.append(msg)
    say(f"  error: {msg}")


def measured(gen: LoadGen, srv: Server, rate: float, seconds: float, prof: Profile, *,
             verify: bool = False) -> tuple[StepResult, float]:
    """One step, and the server's CPU use during it (fraction of one core)."""
    before, t0 = srv.cpu_seconds(), time.monotonic()
    res = gen.run(rate, seconds, verify=verify, drain_timeout=prof.drain_timeout)
    return res, (srv.cpu_seconds() - before) / (time.monotonic() - t0)


def record(fig: Figures, key: str, res: StepResult, why: list[str], server_cpu: float) -> None:
    row = asdict(res)
    row["server_cpu_frac"] = server_cpu
    row["pass"] = not why
    row["why"] = why
    fig.steps.setdefault(key, []).append(row)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def short(res: StepResult, why: list[str]) -> str:
    verdict = "ok" if not why else "FAIL " + "; ".join(why)
    return (f"{res.clients}x{res.rate:g}/s -> {res.offered_deliveries:,.0f} deliv/s: "
            f"p50 {res.p50_ms:.2f} p99 {res.p99_ms:.2f} ms, gen cpu {res.gen_cpu_frac:.2f}, "
            f"{verdict}")


def idle_figures(gen: LoadGen, srv: Server, fig: Figures, prof: Profile) -> None:
    """Figures 4 and 5: memory per idle connection, then connections set up and torn down."""
    warm = gen.connect(HOST, srv.port, 20, barrier_timeout=10)  # first-use allocations
    gen.disconnect()
    fds0 = srv.fd_count()
    srv.wait_fds(fds0, 5)
    if not warm.in_chat:
        fail(fig, "idle: 20 warm-up clients were not all relayed to")
    time.sleep(0.3)
    fds0, rss0 = srv.fd_count(), srv.rss_kib()
    conn = gen.connect(HOST, srv.port, prof.idle_clients, timeout=30, barrier_timeout=15)
    time.sleep(1.0)
    fds1, rss1 = srv.fd_count(), srv.rss_kib()
    accepted = fds1 - fds0
    fig.mem_idle_accepted = accepted
    if accepted > 0:
        fig.mem_kib_per_conn = (rss1 - rss0) / accepted
    if not conn.in_chat:
        fail(fig, f"idle: {conn.connected} connected, the server holds {accepted} "
                          f"descriptors more, a probe reached {conn.reached} of "
                          f"{prof.idle_clients - 1}")
    say(f"  memory: {rss1 - rss0} KiB over {accepted} connections")
    gen.disconnect()
    if not srv.wait_fds(fds0, 30):
        fail(fig, "idle: the server did not close every idle connection in 30 s")
    fds0 = srv.fd_count()
    churn = gen.churn(prof.churn, concurrency=8, timeout=60)
    if "error" in churn:
        fail(fig, f"accept: {churn['error']}")
        return
    t0 = time.monotonic()
    settled = srv.wait_fds(fds0, 10)
    seconds = churn["seconds"] + (time.monotonic() - t0)
    fig.accept_per_s = churn["done"] / seconds if settled else None
    fig.accept_failed = churn["failed"]
    if churn["failed"] or not settled:
        fail(fig, f"accept: {churn['done']} relayed, {churn['failed']} failed "
                          f"{churn['errors']}, descriptors back: {settled}")
    say(f"  accept: {churn['done']} in {seconds:.2f}s, failed {churn['failed']}")


def cpu_figure(gen: LoadGen, srv: Server, fig: Figures, prof: Profile) -> None:
    """Figure 1: server CPU per delivery at 50 clients x 20 msg/s (no coalescing)."""
    conn = gen.connect(HOST, srv.port, 50)
    if not conn.in_chat:
        fail(fig, f"cpu: clients not in the chat ({conn})")
        return
    user0, sys0 = srv.cpu_times()
    t0 = time.monotonic()
    res = gen.run(20, prof.cpu_seconds, drain_timeout=prof.drain_timeout)
    user1, sys1 = srv.cpu_times()
    wall = time.monotonic() - t0
    used = (user1 - user0) + (sys1 - sys0)
    why = judge(res)
    record(fig, "cpu", res, why, used / wall)
    say("  cpu: " + short(res, why) + f", server {used:.2f} cpu-s in {wall:.1f}s")
    if res.received:
        fig.cpu_us_per_delivery = used / res.received * 1e6
        fig.cpu_us_per_message = used / max(1, res.sent) * 1e6
        fig.cpu_server_frac = used / wall
        fig.cpu_user_frac = (user1 - user0) / used if used else None
    if res.errors:
        fail(fig, f"cpu step: {res.errors}")
    gen.disconnect()


def search_rate(trial: Callable[[float], bool], start: float, max_rate: float, *,
                growth: float, refine: int, max_up: int = 10**9, min_rate: float = 0.0,
                ) -> tuple[float | None, float | None]:
    """Capacity search over the per-client rate: from ``start`` (at most ``max_rate``), step up
    by ``growth`` (at most ``max_up`` times, never past ``max_rate``) until a ``trial`` fails,
    or down (at most 4 times, not below ``min_rate``) until one passes; then bisect ``refine``
    times between the last pass and the first failure. Returns both (None: none passed, or none
    failed)."""
    lo, hi = _bracket(trial, min(start, max_rate), max_rate, growth=growth, max_up=max_up,
                      min_rate=min_rate)
    if lo is not None and hi is not None:
        for _ in range(refine):
            mid = math.sqrt(lo * hi)
            if trial(mid):
                lo = mid
            else:
                hi = mid
    return lo, hi


def _bracket(trial: Callable[[float], bool], rate: float, max_rate: float, *, growth: float,
             max_up: int, min_rate: float) -> tuple[float | None, float | None]:
    if trial(rate):
        for _ in range(max_up):
            if rate >= max_rate:
                return rate, None
            nxt = min(rate * growth, max_rate)
            if not trial(nxt):
                return rate, nxt
            rate = nxt
        return rate, None
    hi = rate
    for _ in range(4):
        rate /= growth
        if rate < min_rate:
            break
        if trial(rate):
            return rate, hi
        hi = rate
    return None, hi


class Ladder:
    """Capacity search: step the per-client rate up (or down) by ``growth`` until a step fails,
    then bisect between the last pass and the first failure."""

    def __init__(self, gen: LoadGen, srv: Server, fig: Figures, prof: Profile, key: str) -> None:
        self.gen, self.srv, self.fig, self.prof, self.key = gen, srv, fig, prof, key
        self.n = gen.clients
        self.max_rate = GEN_MAX_MSGS / self.n
        self.gen_failed: set[float] = set()  # failed rates that may be the generator's failure

    def trial(self, rate: float) -> bool:
        if not self.srv.alive():
            raise RuntimeError(f"{self.srv.spec.name} died")
        res, cpu = measured(self.gen, self.srv, rate, self.prof.step_seconds, self.prof)
        why = judge(res)
        record(self.fig, self.key, res, why, cpu)
        say(f"  {self.key}: " + short(res, why) + f", server cpu {cpu:.2f}")
        if why and not self.gen.quiesce(timeout=15):
            say("  (still receiving 15 s after the step)")
        if any(w.startswith(GEN_LIMIT) for w in why):
            self.gen_failed.add(rate)
        return not why

    def search(self, start_rate: float, min_rate: float) -> tuple[float | None, str]:
        """The highest passing delivery rate, and a note when it is only a bound."""
        prof = self.prof
        lo, hi = search_rate(self.trial, start_rate, self.max_rate, growth=prof.growth,
                             refine=prof.refine, max_up=prof.max_up, min_rate=min_rate)
        n = self.n
        if lo is None:
            return None, f"fails even at {hi:g} msg/s per client"
        if hi is None:
            return lo * n * (n - 1), (f"at least: no failure up to {lo:g} msg/s per client "
                                      "(the generator's limit)")
        if hi in self.gen_failed:
            return lo * n * (n - 1), (f"at least: the step above, {hi:g} msg/s per client, "
                                      "failed with the generator at its limit")
        return lo * n * (n - 1), ""


def n100_figures(gen: LoadGen, srv: Server, fig: Figures, prof: Profile) -> None:
    """Figure 3 (100 x 10 msg/s) and the capacity at 100 clients."""
    conn = gen.connect(HOST, srv.port, 100)
    if not conn.in_chat:
        fail(fig, f"n100: clients not in the chat ({conn})")
        return
    res, cpu = measured(gen, srv, 10, prof.latency_seconds, prof, verify=True)
    why = judge(res)
    record(fig, "n100", res, why, cpu)
    say("  latency: " + short(res, why) + f", server cpu {cpu:.2f}")
    fig.latency_p50_ms, fig.latency_p99_ms = res.p50_ms, res.p99_ms
    fig.latency_server_cpu = cpu
    if res.errors:
        fail(fig, f"latency step: {res.errors}")
    if why:
        gen.quiesce(timeout=15)
    cap, note = Ladder(gen, srv, fig, prof, "n100").search(start_rate=2.0, min_rate=0.1)
    fig.capacity_100, fig.capacity_100_note = cap, note
    gen.disconnect()


def n500_figures(gen: LoadGen, srv: Server, fig: Figures, prof: Profile) -> None:
    """The capacity at 500 clients, starting from a quarter of the 100-client capacity."""
    n = 500
    conn = gen.connect(HOST, srv.port, n, timeout=60, barrier_timeout=20)
    if not conn.in_chat:
        fail(fig, f"n500: clients not in the chat ({conn})")
        return
    guess = (fig.capacity_100 or 20_000.0) / 4 / (n * (n - 1))
    start = max(0.25, round(guess, 2))
    cap, note = Ladder(gen, srv, fig, prof, "n500").search(start_rate=start, min_rate=0.03)
    fig.capacity_500, fig.capacity_500_note = cap, note
    gen.disconnect()


PHASES: list[tuple[str, Callable[[LoadGen, Server, Figures, Profile], None]]] = [
    ("idle connections and accept rate", idle_figures),
    ("CPU per delivery", cpu_figure),
    ("latency and capacity at 100 clients", n100_figures),
    ("capacity at 500 clients", n500_figures),
]


# -- output --------------------------------------------------------------------------------------


ROWS: list[tuple[str, str, str, bool | None]] = [
    # attribute, label, format, higher is better (None: no ratio)
    ("cpu_us_per_delivery", "CPU per delivery, us (50x20/s)", "{:.2f}", False),
    ("cpu_user_frac", "  of which user space", "{:.0%}", None),
    ("capacity_100", "capacity @100 clients, deliv/s", "{:,.0f}", True),
    ("capacity_500", "capacity @500 clients, deliv/s", "{:,.0f}", True),
    ("latency_p50_ms", "p50 latency @100x10/s, ms", "{:.2f}", False),
    ("latency_p99_ms", "p99 latency @100x10/s, ms", "{:.2f}", False),
    ("latency_server_cpu", "server CPU @100x10/s, % of a core", "{:.0%}", False),
    ("mem_kib_per_conn", "memory per idle conn, KiB", "{:.1f}", False),
    ("accept_per_s", "accept+relay+close, conn/s", "{:,.0f}", True),
]


def cell(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return fmt.format(value)


def table(figs: list[Figures]) -> str:
    names = [f.spec for f in figs]
    width = max(13, *(len(n) + 1 for n in names))
    out = [f"{'figure':<34}" + "".join(f"{n:>{width}}" for n in names)]
    for attr, label, fmt, _ in ROWS:
        out.append(f"{label:<34}" + "".join(f"{cell(getattr(f, attr), fmt):>{width}}"
                                            for f in figs))
    for base in ("fsmchat-info", "fsmchat-debug"):
        ref = next((f for f in figs if f.spec == base), None)
        if ref is None:
            continue
        peers = [f for f in figs if f.spec != base]
        out.append("")
        out.append(f"{base + ' / peer':<34}" + "".join(f"{p.spec:>{width}}" for p in peers)
                   + "   (>1: fsmchat better)")
        for attr, label, _fmt, higher in ROWS:
            if higher is None:
                continue
            cells = []
            for p in peers:
                a, b = getattr(ref, attr), getattr(p, attr)
                if a is None or b is None or not a or not b:
                    cells.append("n/a")
                    continue
                better = a / b if higher else b / a  # >1 means fsmchat is better
                cells.append(f"{better:.2f}x")
            out.append(f"{label:<34}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(out)


def chart(figs: list[Figures], path: Path) -> str | None:
    try:
        import matplotlib  # noqa: PLC0415 - optional
    except ImportError:
        return "matplotlib is not installed: no chart (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    for ax, key, title in ((axes[0], "n100", "100 clients"), (axes[1], "n500", "500 clients")):
        for f in figs:
            steps = sorted(f.steps.get(key, []), key=lambda s: s["offered_deliveries"])
            if not steps:
                continue
            xs = [s["offered_deliveries"] for s in steps]
            ys = [max(s["p99_ms"], 0.01) if not math.isnan(s["p99_ms"]) else 1e4
                  for s in steps]
            (line,) = ax.plot(xs, ys, "-", label=f.spec, alpha=0.8)
            good = [(x, y) for x, y, s in zip(xs, ys, steps, strict=True) if s["pass"]]
            bad = [(x, y) for x, y, s in zip(xs, ys, steps, strict=True) if not s["pass"]]
            if good:
                ax.plot(*zip(*good, strict=True), "o", color=line.get_color(), ms=4)
            if bad:
                ax.plot(*zip(*bad, strict=True), "x", color=line.get_color(), ms=7)
        ax.axhline(P99_LIMIT_MS, color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"p99 latency against offered load, {title}")
        ax.set_xlabel("offered deliveries per second (messages/s x recipients)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("p99 one-way latency, ms (x: step failed)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def command_output(cmd: list[str]) -> str:
    """What a command prints (stdout, else stderr), or "" when it cannot run."""
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() or done.stderr.strip()


def base_environment(script: str, profile: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    """What every bench records first: its command and profile, the machine, the checkout."""
    return {
        "command": " ".join(["python", f"bench/{script}", *argv]),
        "profile": profile,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "git_head": command_output(["git", "rev-parse", "HEAD"]),
        "git_dirty": command_output(["git", "status", "--porcelain"]).splitlines(),
    }


def environment(prof: Profile, argv: list[str]) -> dict[str, Any]:
    versions: dict[str, str] = {}
    for mod in ("fsmchat", "twisted", "matplotlib", "numpy"):
        try:
            versions[mod] = str(getattr(__import__(mod), "__version__", "?"))
        except ImportError:
            versions[mod] = "missing"
    ncat = shutil.which("ncat")
    return {
        **base_environment("run.py", asdict(prof), argv),
        "versions": versions,
        "ncat": command_output([ncat, "--version"]).split("(")[0].strip() if ncat else "missing",
        "nofile": raise_nofile(),
        "p99_limit_ms": P99_LIMIT_MS,
    }


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description="fsmchat benchmark suite")
    parser.add_argument("--quick", action="store_true", help="shorter steps: about 3 minutes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--only", default="", help="comma-separated server names (debugging)")
    args = parser.parse_args(args_list)
    prof = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    logdir = args.out / "logs"
    logdir.mkdir(exist_ok=True)
    env = environment(prof, args_list)  # also raises the descriptor limit for every child
    servers, skipped = specs()
    if args.only:
        wanted = set(args.only.split(","))
        servers = [s for s in servers if s.name in wanted]
    figs = {s.name: Figures(s.name, s.note) for s in servers}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    try:
        run_phases(servers, figs, prof, logdir)
    except KeyboardInterrupt as exc:
        say(f"interrupted ({exc}); every server and load generator process was stopped")
        return 130
    elapsed = time.monotonic() - started
    env["seconds"] = round(elapsed, 1)
    env["loadavg_after"] = os.getloadavg()
    env["skipped"] = skipped
    results = {"environment": env, "servers": [asdict(f) for f in figs.values()]}
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    chart_note = chart(list(figs.values()), args.out / "latency.png")
    report(list(figs.values()), [*skipped, *([chart_note] if chart_note else [])])
    print(f"\n{len(servers)} servers in {elapsed / 60:.1f} min; results: "
          f"{args.out / 'results.json'}, chart: {args.out / 'latency.png'}")
    return 0


def run_phases(servers: list[Spec], figs: dict[str, Figures], prof: Profile,
               logdir: Path) -> None:
    """Every phase for every server, a fresh server process each time; all stopped at the end."""
    gen = LoadGen(procs=1, lifetime=3600)  # before any thread: the workers are forked
    try:
        for title, phase in PHASES:
            say(f"== {title}")
            for spec in servers:
                say(f"- {spec.name}")
                srv = Server(spec, logdir)
                fig = figs[spec.name]
                t0 = time.monotonic()
                try:
                    srv.start()
                    phase(gen, srv, fig, prof)
                except (RuntimeError, TimeoutError, OSError) as exc:
                    fail(fig, f"{title}: {type(exc).__name__}: {exc}")
                    with contextlib.suppress(Exception):
                        gen.disconnect()
                finally:
                    srv.stop()
                    fig.seconds[title] = round(time.monotonic() - t0, 1)
                    say(f"  ({fig.seconds[title]:.1f}s)")
                    for name, count in srv.problems.items():
                        fig.problems[f"{title}: {name}"] = count
                    room = 20 - len(fig.problem_lines)
                    fig.problem_lines += srv.problem_lines[:max(0, room)]
    finally:
        gen.close()
        stop_all()


def report(figs: list[Figures], skipped: list[str]) -> None:
    print(table(figs))
    print()
    for f in figs:
        for note in (f.capacity_100_note, f.capacity_500_note):
            if note:
                print(f"note: {f.spec}: {note}")
        for err in f.errors:
            print(f"error: {f.spec}: {err}")
        if f.problems:
            print(f"events: {f.spec}: {dict(f.problems)}")
    for note in skipped:
        print(f"skipped: {note}")


if __name__ == "__main__":
    raise_nofile()
    sys.exit(main())
