"""The hot-path goals in one run: fsmchat's machine per connection against the textbook loops.

    python bench/hotpath.py [--quick] [--repeats N] [--scaling-rate R] [--parts LIST]
                            [--fsmchat DIR] [--out DIR]

Every figure is a ratio of servers measured side by side in this run, each server a fresh
process on 127.0.0.1, the servers of a part alternating (A, B, C, A, B, C, ...: the machine's
drift spreads over all), ``--repeats`` runs of each (3; ``--quick``: 2), medians reported:

1. CPU per delivery at 50 clients x 20 msg/s x 64 B (``run.py``'s figure 1: ``utime + stime``
   over the deliveries, and the user-space share) for fsmchat at ``--log-level info`` and at
   the default ``debug``, the asyncio relay and the textbook select relay;
2. churn: connections per second that connect, have one frame relayed to an observer and
   close (``run.py``'s figure 5), for fsmchat-info, select and asyncio, and the server's CPU
   per connection (schedstat), which the load generator's own pace on a small machine does
   not move;
3. scaling: CPU per delivery at 10, 50, 200 and 1,000 connected clients, every client at the
   same rate (``--scaling-rate``, 0.05 msg/s: the 1,000-client step stays under a core for
   the server and the generator alike), for fsmchat-info and asyncio, alternating at each N
   (``--quick``: one run). The light steps use a few milliseconds of CPU, so this part reads
   the scheduler's nanoseconds (``/proc/PID/task/*/schedstat``), not 10 ms ticks;
4. transports: fsmchat-info's 50 clients x 20 msg/s x 64 B over plain TCP and TLS (one server
   with a TLS port, trustme certificates: ``tls.py``'s) and over WebSocket (a server with a web
   port and ``websocket.py``'s clients), with ``harness.alternating``'s runs and checks.

``--parts`` runs some of them only (the others' figures are n/a).

Prints the medians (min and max of the runs beside them) and the goal table: each goal, its
target, what this run measured, met or not. Writes ``results/hotpath-<date>.json`` (every run
and step) and the chart ``results/scaling.png`` (CPU per delivery against clients). Capacity,
p99 latency and memory per idle connection, the goals to keep, are ``run.py``'s figures.
``bench/README.md`` explains the figures.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import run
from harness import alternating
from harness.alternating import OTHER_LOAD, Workload
from harness.capacity import judge
from harness.counting import Generator
from harness.loadgen import LoadGen
from harness.procfs import machine_busy, own_cpu
from harness.report import Table, cell, say
from harness.server import HOST, Server, fsmchat
from harness.stats import spread
from harness.suite import Session, add_options, sigint_ignored, usage_error
from run import Figures, Phase, churn_figure, cpu_figure, fail, measure_one, warm_up
from tls import make_certs
from websocket import GOAL as WS_GOAL
from websocket import server_argv as web_argv
from websocket import ws_worker_main

CPU_SERVERS = ("fsmchat-info", "fsmchat-debug", "asyncio", "select")
CHURN_SERVERS = ("fsmchat-info", "select", "asyncio")
SCALING_SERVERS = ("fsmchat-info", "asyncio")
SCALING_CLIENTS = (10, 50, 200, 1000)
SCALING_RATE = 0.05  # msg/s per client: 1,000 clients make 50 msg/s, 49,950 deliveries/s
SATURATED = 0.9  # server cores in a scaling step from which it batches: no longer light load
TRANSPORTS = ("plain", "tls", "ws")
LABELS = {"plain": "plain TCP", "tls": "TLS", "ws": "WebSocket"}
STEP = "64B@20"  # the transports' one workload
PARTS = ("cpu", "churn", "scaling", "transports")

Y_TICKS = (1, 1.5, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500)  # the chart's
GOALS = {"cpu": 0.85, "churn": 1.0, "debug": 1.3}  # fsmchat-info/asyncio, /select, debug/info


@dataclass(frozen=True)
class Profile:
    name: str
    repeats: int  # runs of each server, parts 1, 2 and 4
    scaling_repeats: int  # part 3
    cpu_seconds: float  # parts 1 and 4: the 50 x 20 msg/s step
    churn: int  # part 2: connections per run
    scaling_messages: int  # part 3: messages per step at least (and one per client)
    drain_timeout: float


FULL = Profile("full", repeats=3, scaling_repeats=3, cpu_seconds=10, churn=3000,
               scaling_messages=10, drain_timeout=5)
QUICK = Profile("quick", repeats=2, scaling_repeats=1, cpu_seconds=3, churn=1000,
                scaling_messages=10, drain_timeout=3)


@dataclass
class Point:
    """One scaling step: a fresh server, ``clients`` clients at ``rate`` each."""

    server: str
    repeat: int
    clients: int
    rate: float
    seconds: float  # planned sending time: a whole number of messages per client
    deliveries: int = 0
    cpu_s: float | None = None  # schedstat: user and kernel
    user_s: float = 0.0  # /proc/PID/stat ticks
    sys_s: float = 0.0
    server_cores: float = 0.0
    other_cores: float = 0.0  # what other processes used meanwhile
    flags: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    step: dict[str, Any] = field(default_factory=dict)  # loadgen's StepResult

    @property
    def us_per_delivery(self) -> float | None:
        if self.errors or not self.deliveries or self.cpu_s is None:
            return None
        return self.cpu_s / self.deliveries * 1e6


# -- the parts -------------------------------------------------------------------------------


def churn_phase(gen: LoadGen, srv: Server, fig: Figures, prof: run.Profile) -> None:
    """run.py's churn alone: the warm-up (which also points the generator at the server)."""
    warm_up(gen, srv, fig)
    churn_figure(gen, srv, fig, prof)


def relay_runs(gen: LoadGen, names: Sequence[str], title: str, phase: Phase, *,
               repeats: int, prof: run.Profile, logdir: Path) -> dict[str, list[Figures]]:
    """``phase`` in a fresh server of each of ``names``, alternating, ``repeats`` times."""
    specs = {s.name: s for s in run.specs()[0]}
    out: dict[str, list[Figures]] = {name: [] for name in names}
    for repeat in range(1, repeats + 1):
        for name in names:
            say(f"- {name} #{repeat}")
            fig = Figures(name, note=f"{title} #{repeat}")
            measure_one(gen, specs[name], fig, title, phase, prof=prof, logdir=logdir,
                        name=f"{title}-{name}-{repeat}")
            out[name].append(fig)
    return out


def scaling_phase(point: Point) -> Phase:
    """The step of ``point`` on a server just started."""

    def phase(gen: LoadGen, srv: Server, fig: Figures, prof: run.Profile) -> None:
        conn = gen.connect(HOST, srv.port, point.clients, timeout=60, barrier_timeout=20)
        if not conn.in_chat:
            fail(fig, f"scaling: {conn.connected} of {point.clients} connected, a probe "
                      f"reached {conn.reached}; errors {conn.errors}")
            return
        ns0, (user0, sys0) = srv.cpu_ns(), srv.cpu_times()
        busy0, own0, t0 = machine_busy(), own_cpu(), time.monotonic()
        res = gen.run(point.rate, point.seconds, drain_timeout=prof.drain_timeout)
        ns1, (user1, sys1) = srv.cpu_ns(), srv.cpu_times()
        busy1, own1, wall = machine_busy(), own_cpu(), time.monotonic() - t0
        used = (ns1 - ns0) / 1e9
        point.cpu_s, point.user_s, point.sys_s = used, user1 - user0, sys1 - sys0
        point.deliveries = res.received
        point.server_cores = used / wall
        other = (busy1 - busy0) - used - res.gen_cpu_frac * wall - (own1 - own0)
        point.other_cores = max(0.0, other / wall)
        point.step = asdict(res)
        point.flags = [w for w in judge(res) if w not in res.errors]
        if point.server_cores >= SATURATED:
            point.flags.append(f"server at {point.server_cores:.0%} of a core: it batches")
        if point.other_cores >= OTHER_LOAD:
            point.flags.append(f"other processes used {point.other_cores:.2f} cores")
        for err in res.errors:
            fail(fig, f"scaling step: {err}")
        us = f"{used / res.received * 1e6:.2f}" if res.received else "n/a"
        say(f"  {point.clients} x {point.rate:g}/s: {us} us/delivery ({res.received:,} in "
            f"{res.send_s:.1f}s), server {point.server_cores:.2f} cores, gen "
            f"{res.gen_cpu_frac:.2f}, p99 {res.p99_ms:.1f} ms"
            + (f" [{'; '.join(point.flags)}]" if point.flags else ""))
        gen.disconnect()

    return phase


def scaling_runs(gen: LoadGen, rate: float, hp: Profile, prof: run.Profile,
                 logdir: Path) -> list[Point]:
    """Every N, each scaling server in turn at it (a fresh server per step), repeated."""
    specs = {s.name: s for s in run.specs()[0]}
    points: list[Point] = []
    for repeat in range(1, hp.scaling_repeats + 1):
        for n in SCALING_CLIENTS:
            per_client = max(1, math.ceil(hp.scaling_messages / n))
            for name in SCALING_SERVERS:
                say(f"- {name} #{repeat}, {n} clients")
                point = Point(name, repeat, n, rate, per_client / rate)
                fig = Figures(name, note=f"scaling {n} #{repeat}")
                measure_one(gen, specs[name], fig, "scaling", scaling_phase(point), prof=prof,
                            logdir=logdir, name=f"scaling-{name}-{n}-{repeat}")
                point.errors += fig.errors
                point.errors += [f"server event {k} x{v}" for k, v in fig.problems.items()]
                points.append(point)
    return points


def transport_argvs(cert: Path, key: Path) -> dict[str, list[str]]:
    """The servers of the transports: plain and TLS clients on one with a TLS port (as
    tls.py), WebSocket clients on one with a web port (as websocket.py: with a certificate the
    web port would be https)."""
    tls = fsmchat("--port", "0", "--tls-port", "0", "--tls-cert", str(cert), "--tls-key",
                  str(key), "--log-level", "info", "--drain-timeout", "2")
    return {"plain": tls, "tls": tls, "ws": web_argv()}


def port_of(config: str) -> Callable[[Server], int]:
    key = {"tls": "tls_port", "ws": "web_port"}.get(config)
    return lambda srv: int(srv.started.get(key) or 0) if key else srv.port


def transport_workload(hp: Profile) -> Workload:
    return Workload(STEP, "64 B, 50 clients x 20 msg/s paced", 50, 64, 20.0, hp.cpu_seconds)


def transport_profile(hp: Profile) -> alternating.Profile:
    return alternating.Profile("hotpath", paced_seconds=hp.cpu_seconds, burst_seconds=0.0,
                               repeats=hp.repeats, drain_timeout=hp.drain_timeout)


def transport_runs(gens: dict[str, Generator], argvs: dict[str, list[str]], hp: Profile,
                   session: Session) -> list[alternating.Run]:
    """``harness.alternating``'s runs of the one workload: plain, TLS, WebSocket, plain, ..."""
    wl, prof = transport_workload(hp), transport_profile(hp)

    def one(config: str, repeat: int) -> alternating.Run:
        return alternating.one_run(gens[config], config, repeat, argv=argvs[config],
                                   workloads=[wl], prof=prof, session=session, labels=LABELS,
                                   port=port_of(config))

    return alternating.alternate(TRANSPORTS, prof, one)


# -- the figures -----------------------------------------------------------------------------


Values = list[float | None]  # one per repeat, None where that run has no figure
Spread = tuple[float | None, float | None, float | None]  # median, min, max
NONE: Spread = (None, None, None)


def summary(values: Values) -> Spread:
    got = spread([v for v in values if v is not None])
    return NONE if got is None else (got[1], got[0], got[2])


def ratio(top: Values, bottom: Values) -> Spread:
    """The ratio of the medians, and the min and max of the runs' ratios, run by run (the
    runs of one repeat are neighbours in time)."""
    a, b = summary(top)[0], summary(bottom)[0]
    pairs = [x / y for x, y in zip(top, bottom, strict=False) if x and y]
    return (a / b if a and b else None, min(pairs, default=None), max(pairs, default=None))


def attr(runs: list[Figures], name: str) -> Values:
    return [getattr(f, name) for f in runs]


def scaled(points: list[Point], server: str, clients: int) -> Values:
    """A server's figures at ``clients``, by repeat."""
    return [p.us_per_delivery for p in points if p.server == server and p.clients == clients]


def transport_values(runs: list[alternating.Run], config: str, name: str) -> Values:
    value = alternating.step_value(STEP, name)
    return [value(r) for r in runs if r.config == config]


@dataclass
class Results:
    cpu: dict[str, list[Figures]]
    churn: dict[str, list[Figures]]
    points: list[Point]
    transports: list[alternating.Run]
    rate: float

    def growth(self, server: str) -> Spread:
        return ratio(scaled(self.points, server, SCALING_CLIENTS[-1]),
                     scaled(self.points, server, SCALING_CLIENTS[0]))


def main_table(res: Results, hp: Profile) -> Table:
    """Every figure: the median of the runs, their min and max, the user-space share."""
    table = Table(f"hotpath: medians of {hp.repeats} alternating runs ({hp.scaling_repeats} "
                  "for the scaling), min and max of the runs",
                  ["figure", "median", "min", "max", "user space"])

    def row(label: str, got: Spread, fmt: str, user: Values | None = None) -> None:
        cells = [cell(v, fmt) for v in got]
        if user is not None:
            cells.append(cell(summary(user)[0], "{:.0%}"))
        table.add(f"  {label}", *cells)

    table.add("CPU per delivery, us, 50 clients x 20 msg/s x 64 B")
    for name in CPU_SERVERS:
        runs = res.cpu.get(name, [])
        row(name, summary(attr(runs, "cpu_us_per_delivery")), "{:.2f}",
            attr(runs, "cpu_user_frac"))
    us = {name: attr(res.cpu.get(name, []), "cpu_us_per_delivery") for name in CPU_SERVERS}
    row("fsmchat-debug / fsmchat-info", ratio(us["fsmchat-debug"], us["fsmchat-info"]),
        "{:.2f}x")
    for peer in ("asyncio", "select"):
        row(f"fsmchat-info / {peer}", ratio(us["fsmchat-info"], us[peer]), "{:.2f}x")

    table.add(f"churn, conn/s: connect, one frame relayed, close ({hp.churn:,}, 8 at a time)")
    per_s = {name: attr(res.churn.get(name, []), "accept_per_s") for name in CHURN_SERVERS}
    for name in CHURN_SERVERS:
        row(name, summary(per_s[name]), "{:,.0f}")
    for peer in ("select", "asyncio"):
        row(f"fsmchat-info / {peer}", ratio(per_s["fsmchat-info"], per_s[peer]), "{:.2f}x")
    table.add("churn: server CPU per connection, us (schedstat; the pace above is the "
              "generator's too)")
    cpu = {name: attr(res.churn.get(name, []), "accept_cpu_us") for name in CHURN_SERVERS}
    for name in CHURN_SERVERS:
        row(name, summary(cpu[name]), "{:.0f}")
    for peer in ("select", "asyncio"):
        row(f"fsmchat-info / {peer}", ratio(cpu["fsmchat-info"], cpu[peer]), "{:.2f}x")

    table.add(f"scaling: CPU per delivery, us, every client at {res.rate:g} msg/s")
    for name in SCALING_SERVERS:
        for n in SCALING_CLIENTS:
            load = n * res.rate * (n - 1)
            shown = f"{load:,.0f}" if load >= 10 else f"{load:.2g}"
            row(f"{name} @ {n:,} clients ({shown} deliv/s)",
                summary(scaled(res.points, name, n)), "{:.2f}")
        row(f"{name} growth, @ {SCALING_CLIENTS[-1]:,} / @ {SCALING_CLIENTS[0]:,}",
            res.growth(name), "{:.2f}x")

    table.add("fsmchat-info by transport: CPU per delivery, us, 50 clients x 20 msg/s x 64 B")
    values = {c: transport_values(res.transports, c, "us_per_delivery") for c in TRANSPORTS}
    for config in TRANSPORTS:
        row(LABELS[config], summary(values[config]), "{:.2f}",
            transport_values(res.transports, config, "user_frac"))
    for config in TRANSPORTS[1:]:
        row(f"{LABELS[config]} / {LABELS['plain']}", ratio(values[config], values["plain"]),
            "{:.2f}x")
    return table


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "yes" if ok else "no"


def goals(res: Results) -> tuple[Table, list[dict[str, Any]]]:
    """One row per goal of the issue: target, what this run measured, met or not."""
    table = Table("goals", ["goal", "target", "measured", "met"])
    rows: list[dict[str, Any]] = []

    def goal(text: str, target: str, value: float | None, ok: bool | None,
             measured: str | None = None) -> None:
        shown = measured or cell(value, "{:.2f}x")
        table.add(text, target, shown, verdict(ok))
        rows.append({"goal": text, "target": target, "measured": value, "shown": shown,
                     "met": ok})

    us = {name: attr(res.cpu.get(name, []), "cpu_us_per_delivery") for name in CPU_SERVERS}
    cpu = ratio(us["fsmchat-info"], us["asyncio"])[0]
    goal("CPU per delivery, fsmchat-info / asyncio (50 x 20/s x 64 B)",
         f"<= {GOALS['cpu']:.2f}x", cpu, None if cpu is None else cpu <= GOALS["cpu"])
    per_s = {name: attr(res.churn.get(name, []), "accept_per_s") for name in CHURN_SERVERS}
    churn = ratio(per_s["fsmchat-info"], per_s["select"])[0]
    goal("churn conn/s, fsmchat-info / select", f">= {GOALS['churn']:.2f}x", churn,
         None if churn is None else churn >= GOALS["churn"])
    debug = ratio(us["fsmchat-debug"], us["fsmchat-info"])[0]
    goal("CPU per delivery, debug / info", f"<= {GOALS['debug']:.2f}x", debug,
         None if debug is None else debug <= GOALS["debug"])
    mine, theirs = res.growth("fsmchat-info")[0], res.growth("asyncio")[0]
    goal(f"scaling: CPU per delivery @ {SCALING_CLIENTS[-1]:,} / @ {SCALING_CLIENTS[0]} "
         "clients, fsmchat-info", f"<= asyncio's ({cell(theirs, '{:.2f}x')})", mine,
         None if mine is None or theirs is None else mine <= theirs)
    values = {c: transport_values(res.transports, c, "us_per_delivery") for c in TRANSPORTS}
    tls = ratio(values["tls"], values["plain"])[0]
    goal("CPU per delivery, TLS / plain TCP", "none (shown)", tls, None)
    ws = ratio(values["ws"], values["plain"])[0]
    goal("CPU per delivery, WebSocket / plain TCP", f"<= {WS_GOAL}x (websocket.py's)", ws,
         None if ws is None else ws <= WS_GOAL)
    for text, target in (("keep: capacity @ 100 and @ 500 clients", "ahead of the peers"),
                         ("keep: p99 latency @ 100 x 10/s", "ahead of the peers"),
                         ("keep: memory per idle connection", "1.2 KiB")):
        goal(text, target, None, None, measured="bench/run.py")
    return table, rows


def notes(res: Results, hp: Profile) -> list[str]:
    out: list[str] = []
    for part in (res.cpu, res.churn):
        for runs in part.values():
            for fig in runs:
                out += [f"error: {fig.note}: {fig.spec}: {err}" for err in fig.errors]
                if fig.problems:
                    out.append(f"events: {fig.note}: {fig.spec}: {dict(fig.problems)}")
    for p in res.points:
        where = f"scaling #{p.repeat}: {p.server} @ {p.clients}"
        out += [f"error: {where}: {err}" for err in p.errors]
        out += [f"flag: {where}: {flag}" for flag in p.flags]
    if res.transports:
        out += alternating.notes(res.transports, [transport_workload(hp)], TRANSPORTS, LABELS,
                                 received={"ws": "exactly the payload bytes every other client "
                                                 "sent"})
    return out


def chart(res: Results, path: Path) -> str | None:
    """CPU per delivery against connected clients, log-log, one line per server (median,
    bars from the runs' min to max); a note instead when there is none."""
    if not any(p.us_per_delivery is not None for p in res.points):
        return "no scaling figure: no chart"
    try:
        import matplotlib  # noqa: PLC0415 - optional
    except ImportError:
        return "matplotlib is not installed: no chart (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(8, 5.2))
    for name in SCALING_SERVERS:
        xs: list[int] = []
        med: list[float] = []
        low: list[float] = []
        high: list[float] = []
        for n in SCALING_CLIENTS:
            m, lo, hi = summary(scaled(res.points, name, n))
            if m is not None and lo is not None and hi is not None:
                xs.append(n)
                med.append(m)
                low.append(m - lo)
                high.append(hi - m)
        if xs:
            growth = res.growth(name)[0]
            ax.errorbar(xs, med, yerr=[low, high], marker="o", capsize=3,
                        label=f"{name} (@ {SCALING_CLIENTS[-1]:,} / @ {SCALING_CLIENTS[0]}: "
                              f"{cell(growth, '{:.2f}x')})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(list(SCALING_CLIENTS))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    low_y, high_y = ax.get_ylim()
    ax.set_yticks([t for t in Y_TICKS if low_y <= t <= high_y])
    ax.set_ylim(low_y, high_y)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))  # not 2 x 10^1
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title(f"server CPU per delivery, every client at {res.rate:g} msg/s, 64 B")
    ax.set_xlabel("connected clients (deliveries/s = clients x rate x (clients - 1))")
    ax.set_ylabel("CPU per delivery, us (schedstat)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# -- main ------------------------------------------------------------------------------------


def parse(args_list: list[str]) -> tuple[argparse.Namespace, Profile]:
    parser = argparse.ArgumentParser(
        description="fsmchat's hot-path goals in one run: CPU per delivery against asyncio "
        "and select, debug against info, churn, scaling with clients, TLS and WebSocket")
    parser.add_argument("--quick", action="store_true",
                        help="short steps, 2 runs of each, 1 of the scaling: about 4 minutes")
    parser.add_argument("--repeats", type=int, metavar="N",
                        help="runs of each server in every part (default: 3; --quick: 2, and "
                             "1 for the scaling)")
    parser.add_argument("--scaling-rate", type=float, default=SCALING_RATE, metavar="R",
                        help=f"msg/s per client of the scaling steps (default: {SCALING_RATE}"
                             "; 1,000 clients must stay under a core)")
    parser.add_argument("--parts", default=",".join(PARTS), metavar="LIST",
                        help=f"comma-separated parts to run (default: all: {','.join(PARTS)})")
    add_options(parser)
    args = parser.parse_args(args_list)
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not args.parts or args.parts - set(PARTS):
        usage_error("hotpath", f"--parts: a list of {', '.join(PARTS)}")
    hp = QUICK if args.quick else FULL
    if args.repeats is not None:
        if args.repeats < 1:
            usage_error("hotpath", "--repeats must be at least 1")
        hp = replace(hp, repeats=args.repeats, scaling_repeats=args.repeats)
    if not args.scaling_rate > 0:
        usage_error("hotpath", "--scaling-rate must be positive")
    return args, hp


def measure(args: argparse.Namespace, hp: Profile, relay: run.Profile,
            session: Session) -> tuple[Results, dict[str, str]]:
    """The parts asked for, one after the other; the figures and the server commands of the
    transports (the certificates' directory as $CERTS). Every process is stopped at the end."""
    cpu: dict[str, list[Figures]] = {}
    churn: dict[str, list[Figures]] = {}
    points: list[Point] = []
    transports: list[alternating.Run] = []
    with tempfile.TemporaryDirectory(prefix="fsmchat-hotpath-certs-") as certdir:
        ca, cert, key = make_certs(Path(certdir))
        argvs = transport_argvs(cert, key)
        with sigint_ignored():  # forked before any thread
            gen = LoadGen(procs=1, name="hotpath-gen")
            gens = {"plain": Generator(None, name="hotpath-plain"),
                    "tls": Generator(str(ca), name="hotpath-tls"),
                    "ws": Generator(None, target=ws_worker_main, name="hotpath-ws")}
        try:
            if "cpu" in args.parts:
                say("== 1. CPU per delivery, 50 clients x 20 msg/s x 64 B")
                cpu = relay_runs(gen, CPU_SERVERS, "cpu", cpu_figure, repeats=hp.repeats,
                                 prof=relay, logdir=session.logdir)
            if "churn" in args.parts:
                say("== 2. churn: connect, one frame relayed, close")
                churn = relay_runs(gen, CHURN_SERVERS, "churn", churn_phase,
                                   repeats=hp.repeats, prof=relay, logdir=session.logdir)
            if "scaling" in args.parts:
                say(f"== 3. scaling: {', '.join(map(str, SCALING_CLIENTS))} clients x "
                    f"{args.scaling_rate:g} msg/s")
                points = scaling_runs(gen, args.scaling_rate, hp, relay, session.logdir)
            if "transports" in args.parts:
                say("== 4. transports: plain TCP, TLS, WebSocket")
                transports = transport_runs(gens, argvs, hp, session)
        finally:
            gen.close()
            for g in gens.values():
                g.close()
        commands = {c: " ".join(a[1:]).replace(certdir, "$CERTS") for c, a in argvs.items()}
    return Results(cpu, churn, points, transports, args.scaling_rate), commands


def failed(res: Results) -> bool:
    """Whether any run of any part had an error."""
    figs = [f for part in (res.cpu, res.churn) for runs in part.values() for f in runs]
    return any(f.errors for f in figs) or any(p.errors for p in res.points) or any(
        r.errors for r in res.transports)


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    args, hp = parse(args_list)
    relay = replace(run.QUICK if args.quick else run.FULL, cpu_seconds=hp.cpu_seconds,
                    churn=hp.churn, drain_timeout=hp.drain_timeout)
    session = Session("hotpath", args, args_list, logdir=args.out / "logs")

    def body() -> int:
        res, commands = measure(args, hp, relay, session)
        goal_table, goal_rows = goals(res)
        lines = notes(res, hp)
        chart_path = args.out / "scaling.png"
        args.out.mkdir(parents=True, exist_ok=True)
        chart_note = chart(res, chart_path)
        lines += [chart_note] if chart_note else []
        same_build = session.same_build()
        if not same_build:
            lines.append("error: the fsmchat sources changed during the run: the runs did not "
                         "all measure the same build")
        session.finish(
            [main_table(res, hp), goal_table], lines,
            {"profile": asdict(hp), "relay_profile": asdict(relay),
             "transport_profile": asdict(transport_profile(hp)),
             "scaling_rate": res.rate, "scaling_clients": list(SCALING_CLIENTS),
             "parts": sorted(args.parts), "goals": goal_rows, "server_commands": commands,
             "cpu": {n: [asdict(f) for f in runs] for n, runs in res.cpu.items()},
             "churn": {n: [asdict(f) for f in runs] for n, runs in res.churn.items()},
             "scaling": [{**asdict(p), "us_per_delivery": p.us_per_delivery}
                         for p in res.points],
             "transports": [asdict(r) for r in res.transports]})
        if chart_note is None:
            print(f"chart: {chart_path}")
        return 1 if failed(res) or not same_build else 0

    return session.run(body)


if __name__ == "__main__":
    sys.exit(main())
