"""The benchmark suite: fsmchat against other broadcast relays, one command, one table.

    python bench/run.py [--quick] [--out bench/results] [--fsmchat DIR] [--only NAMES]

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

Prints the table and the fsmchat/peer ratios, writes the dated result ``run-<date>.json`` and
``latency.png`` (p99 latency against offered load) into ``--out``. ``bench/README.md`` explains
the figures; ``bench/harness`` has the server wrapper, the clients and the rate search.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.capacity import P99_LIMIT_MS, Capacity, judge, search, short
from harness.checkout import PY, ROOT
from harness.loadgen import LoadGen, StepResult
from harness.report import Table, cell, say
from harness.server import HOST, Server, fsmchat, stop_all
from harness.suite import Session, add_options

PEERS = ROOT / "bench" / "peers"


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
    out = [
        Spec("fsmchat-info", lambda p: fsmchat("--port", str(p), "--log-level", "info"),
             note="fsmchat --log-level info"),
        Spec("fsmchat-debug", lambda p: fsmchat("--port", str(p)),
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


# -- the figures -----------------------------------------------------------------------------------


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
    accept_cpu_us: float | None = None  # server CPU per churned connection (schedstat)
    steps: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    problems: dict[str, int] = field(default_factory=dict)  # warning/error events, fsmchat
    problem_lines: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each phase
    errors: list[str] = field(default_factory=list)


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


def idle_figures(gen: LoadGen, srv: Server, fig: Figures, prof: Profile) -> None:
    """Figures 4 and 5: memory per idle connection, then connections set up and torn down."""
    warm_up(gen, srv, fig)
    memory_figure(gen, srv, fig, prof)
    churn_figure(gen, srv, fig, prof)


def warm_up(gen: LoadGen, srv: Server, fig: Figures) -> None:
    """20 clients come and go: first-use allocations are out of the way, and the generator
    knows the server's address (``churn_figure`` connects to it)."""
    warm = gen.connect(HOST, srv.port, 20, barrier_timeout=10)
    gen.disconnect()
    fds0 = srv.fd_count()
    srv.wait_fds(fds0, 5)
    if not warm.in_chat:
        fail(fig, "idle: 20 warm-up clients were not all relayed to")
    time.sleep(0.3)


def memory_figure(gen: LoadGen, srv: Server, fig: Figures, prof: Profile) -> None:
    """Figure 4: VmRSS growth over ``prof.idle_clients`` idle clients, per descriptor gained."""
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


def churn_figure(gen: LoadGen, srv: Server, fig: Figures, prof: Profile) -> None:
    """Figure 5: ``prof.churn`` connections, 8 at a time, each relayed once and closed, per
    second until the server's descriptor count is back (the generator must have connected
    to this server before: ``warm_up``)."""
    fds0 = srv.fd_count()
    ns0 = srv.cpu_ns()
    churn = gen.churn(prof.churn, concurrency=8, timeout=60)
    if "error" in churn:
        fail(fig, f"accept: {churn['error']}")
        return
    t0 = time.monotonic()
    settled = srv.wait_fds(fds0, 10)
    seconds = churn["seconds"] + (time.monotonic() - t0)
    fig.accept_per_s = churn["done"] / seconds if settled else None
    if settled and churn["done"] and not churn["failed"]:  # what the server spent, whatever
        # the generator's pace (failed connections cost it too, but are not in ``done``)
        fig.accept_cpu_us = (srv.cpu_ns() - ns0) / churn["done"] / 1000
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


def capacity(gen: LoadGen, srv: Server, fig: Figures, prof: Profile, key: str, *,
             start: float, min_rate: float) -> Capacity:
    """The capacity at the clients connected (``harness.capacity``), every step recorded."""

    def trial(rate: float) -> list[str]:
        if not srv.alive():
            raise RuntimeError(f"{srv.name} died")
        res, cpu = measured(gen, srv, rate, prof.step_seconds, prof)
        why = judge(res)
        record(fig, key, res, why, cpu)
        say(f"  {key}: " + short(res, why) + f", server cpu {cpu:.2f}")
        if why and not gen.quiesce(timeout=15):
            say("  (still receiving 15 s after the step)")
        return why

    return search(trial, gen.clients, start, growth=prof.growth, refine=prof.refine,
                  max_up=prof.max_up, min_rate=min_rate)


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
    found = capacity(gen, srv, fig, prof, "n100", start=2.0, min_rate=0.1)
    fig.capacity_100, fig.capacity_100_note = found.deliveries, found.note
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
    found = capacity(gen, srv, fig, prof, "n500", start=start, min_rate=0.03)
    fig.capacity_500, fig.capacity_500_note = found.deliveries, found.note
    gen.disconnect()


Phase = Callable[[LoadGen, Server, Figures, Profile], None]
"""One figure (or several) measured on a server just started, into ``Figures``."""

PHASES: list[tuple[str, Phase]] = [
    ("idle connections and accept rate", idle_figures),
    ("CPU per delivery", cpu_figure),
    ("latency and capacity at 100 clients", n100_figures),
    ("capacity at 500 clients", n500_figures),
]


# -- output ----------------------------------------------------------------------------------------


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


def tables(figs: list[Figures]) -> list[Table]:
    """The figures, server by server, and each fsmchat's ratios to every other server."""
    out = [Table("", ["figure", *(f.spec for f in figs)])]
    for attr, label, fmt, _ in ROWS:
        out[0].add(label, *(cell(getattr(f, attr), fmt) for f in figs))
    for base in ("fsmchat-info", "fsmchat-debug"):
        ref = next((f for f in figs if f.spec == base), None)
        if ref is None:
            continue
        peers = [f for f in figs if f.spec != base]
        ratios = Table(f"{base} / peer (>1: fsmchat better)",
                       ["figure", *(p.spec for p in peers)])
        for attr, label, _fmt, higher in ROWS:
            if higher is None:
                continue
            cells = []
            for p in peers:
                a, b = getattr(ref, attr), getattr(p, attr)
                if a is None or b is None or not a or not b:
                    cells.append("n/a")
                    continue
                cells.append(f"{(a / b if higher else b / a):.2f}x")  # >1: fsmchat better
            ratios.add(label, *cells)
        out.append(ratios)
    return out


def notes(figs: list[Figures], skipped: list[str]) -> list[str]:
    out: list[str] = []
    for f in figs:
        out += [f"note: {f.spec}: {n}" for n in (f.capacity_100_note, f.capacity_500_note) if n]
        out += [f"error: {f.spec}: {err}" for err in f.errors]
        if f.problems:
            out.append(f"events: {f.spec}: {dict(f.problems)}")
    return out + [f"skipped: {note}" for note in skipped]


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


def measure_one(gen: LoadGen, spec: Spec, fig: Figures, title: str, phase: Phase, *,
                prof: Profile, logdir: Path, name: str | None = None) -> None:
    """One phase in a fresh server process of ``spec`` (named ``name`` in the logs), stopped
    at the end whatever happens; errors, wall time and the server's problems go to ``fig``."""
    srv = Server(name or spec.name, spec.argv, logdir, fixed_port=spec.fixed_port)
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
        for problem, count in srv.problems.items():
            fig.problems[f"{title}: {problem}"] = count
        room = 20 - len(fig.problem_lines)
        fig.problem_lines += srv.problem_lines[:max(0, room)]


def run_phases(servers: list[Spec], figs: dict[str, Figures], prof: Profile,
               logdir: Path) -> None:
    """Every phase for every server, a fresh server process each time; all stopped at the end."""
    gen = LoadGen(procs=1, lifetime=3600)  # before any thread: the workers are forked
    try:
        for title, phase in PHASES:
            say(f"== {title}")
            for spec in servers:
                say(f"- {spec.name}")
                measure_one(gen, spec, figs[spec.name], title, phase, prof=prof, logdir=logdir)
    finally:
        gen.close()
        stop_all()


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for mod in ("twisted", "matplotlib", "numpy"):
        try:
            out[mod] = str(getattr(__import__(mod), "__version__", "?"))
        except ImportError:
            out[mod] = "missing"
    ncat = shutil.which("ncat")
    out["ncat"] = "missing"
    if ncat:
        done = subprocess.run([ncat, "--version"], check=False, capture_output=True, text=True)
        out["ncat"] = (done.stdout or done.stderr).split("(")[0].strip()
    return out


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description="fsmchat benchmark suite")
    parser.add_argument("--quick", action="store_true", help="shorter steps: about 3 minutes")
    parser.add_argument("--only", default="", help="comma-separated server names (debugging)")
    add_options(parser)
    args = parser.parse_args(args_list)
    prof = QUICK if args.quick else FULL
    session = Session("run", args, args_list, logdir=args.out / "logs")
    servers, skipped = specs()
    if args.only:
        wanted = set(args.only.split(","))
        servers = [s for s in servers if s.name in wanted]
    figs = {s.name: Figures(s.name, s.note) for s in servers}

    def body() -> int:
        run_phases(servers, figs, prof, session.logdir)
        chart_note = chart(list(figs.values()), args.out / "latency.png")
        session.finish(tables(list(figs.values())),
                       notes(list(figs.values()), [*skipped, *([chart_note] if chart_note
                                                               else [])]),
                       {"profile": asdict(prof), "p99_limit_ms": P99_LIMIT_MS,
                        "versions": versions(), "skipped": skipped,
                        "servers": [asdict(f) for f in figs.values()]})
        print(f"chart: {args.out / 'latency.png'}")
        return 0

    return session.run(body)


if __name__ == "__main__":
    sys.exit(main())
