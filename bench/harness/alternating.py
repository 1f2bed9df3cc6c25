"""One build, several configurations in alternating runs: the method of tls.py, chat.py, logs.py.

A suite names its configurations (plain and TLS; raw and chat; info and debug), each a server
command and the port its clients use. Runs alternate between them (A, B, A, B, ...: the
machine's drift spreads over all), ``repeats`` of each, every run a fresh server with every
workload, one after the other:

- a paced step per rate and message size (per-sender order checked), and a burst step where a
  few clients keep their sockets full and the relay batches what it can;
- per step: the server's ``utime + stime`` (``harness.procfs``) over the deliveries (bytes
  every client received / message size, or what the suite's ``check`` counts) and over the
  messages sent; the server's CPU during the connects per connection (the handshakes);
  segments and wire bytes per delivery from TCP_INFO; what other processes used (machine busy
  time less the server, the generator and the bench) flagged at ``OTHER_LOAD`` cores;
- checks: every client received exactly what every other client sent (``check_bytes``, client
  by client), the load generator's frame checks, the server's ``server.stopped`` byte totals
  and connection count against the clients' counts, the same sources at the end as at the
  start (one build).

The report has, per configuration after the first, a table of min / median / max of the runs
against the first configuration's, the ratio and the difference of the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.capacity import GEN_BUSY
from harness.counting import Generator
from harness.frames import MIN_SIZE
from harness.loadgen import StepResult
from harness.procfs import machine_busy
from harness.report import Table, cell, say
from harness.server import HOST, Read, Server
from harness.stats import spread
from harness.suite import Session, add_options

OTHER_LOAD = 0.15
"""Cores used by other processes during a step above which the step is flagged: on a 2-core
machine that time comes out of the server's or the generator's."""


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    clients: int
    size: int
    rate: float  # msg/s per client; 0 for a burst
    seconds: float
    burst: bool = False


@dataclass(frozen=True)
class Profile:
    name: str
    paced_seconds: float
    burst_seconds: float
    repeats: int
    drain_timeout: float


FULL = Profile("full", paced_seconds=8.0, burst_seconds=3.0, repeats=3, drain_timeout=5.0)
QUICK = Profile("quick", paced_seconds=1.5, burst_seconds=1.0, repeats=3, drain_timeout=3.0)


@dataclass
class Run:
    """One server process, one configuration, every workload."""

    config: str
    repeat: int
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)  # workload key -> figures
    connect_cpu_s: float = 0.0  # server CPU during the connects (handshakes), all workloads
    connections: int = 0
    server_totals: dict[str, Any] = field(default_factory=dict)
    client_totals: dict[str, int] = field(default_factory=dict)
    tls: list[str] = field(default_factory=list)  # server's "version cipher" of the handshakes
    problems: dict[str, int] = field(default_factory=dict)  # warning/error events
    problem_lines: list[str] = field(default_factory=list)
    exit_status: int | None = None
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def connect_us(self) -> float | None:
        return self.connect_cpu_s / self.connections * 1e6 if self.connections else None


def check_bytes(counts: list[dict[str, Any]], size: int) -> dict[str, Any]:
    """Client by client: did each receive exactly what all the others sent?"""
    rows = [row for c in counts for row in c["streams"]]
    sent = sum(row[2] for row in rows)
    received = sum(row[1] for row in rows)
    wire = sum(row[3] for row in rows)
    segs = sum(row[4] for row in rows)
    short = extra = wrong = 0
    for _gid, rx, tx, *_ in rows:
        want = sent - tx
        if rx != want:
            wrong += 1
            short += max(0, want - rx)
            extra += max(0, rx - want)
    return {"bytes_sent": sent, "bytes_received": received,
            "bytes_expected": sent * (len(rows) - 1) if rows else 0,
            "clients_wrong": wrong, "bytes_short": short, "bytes_extra": extra,
            "messages": sent / size, "deliveries": received / size,
            "wire_bytes_received": wire, "segments_received": segs,
            "wire_per_delivery": wire / received * size if received else None,
            "segments_per_delivery": segs / received * size if received else None,
            "split_frames": sum(int(c["garbled_bytes"]) for c in counts) // size,
            "gen_cpu_s": sum(float(c["cpu"]) for c in counts)}


Check = Callable[[list[dict[str, Any]], int], dict[str, Any]]
"""What the clients received against what they should have, from the workers' counters and the
message size: ``check_bytes``'s keys (``clients_wrong``, ``deliveries``, ...), and optionally
``check_errors``, a list of other failures. A step waits until ``clients_wrong`` is 0."""


def measure(gen: Generator, srv: Server, wl: Workload, prof: Profile,
            check: Check = check_bytes) -> dict[str, Any]:
    """One step with the server's CPU around it, the byte count, and what else ran."""
    problems0 = Counter(srv.problems)
    user0, sys0 = srv.cpu_times()
    busy0, own0, t0 = machine_busy(), time.process_time(), time.monotonic()
    # A burst's frames can be split (below), so loadgen's frame count may never reach what was
    # sent: it does not wait for them, the byte count does.
    res = gen.run(wl.rate, wl.seconds, burst=wl.burst, verify=not wl.burst,
                  drain_timeout=0.0 if wl.burst else prof.drain_timeout)
    got, done = wait_bytes(gen, wl.size, prof.drain_timeout + (wl.seconds if wl.burst else 0),
                           check)
    user1, sys1 = srv.cpu_times()
    busy1, own1, t1 = machine_busy(), time.process_time(), time.monotonic()
    wall = max(1e-9, t1 - t0)
    used = (user1 - user0) + (sys1 - sys0)
    other = (busy1 - busy0) - used - got["gen_cpu_s"] - (own1 - own0)
    errors = bytes_errors(got) + list(got.get("check_errors", []))  # check's own findings
    for err in res.errors:
        # a burst relays each recv as it came: a frame cut at a recv boundary can have another
        # sender's bytes in its middle. That is not a loss when every byte arrived.
        if wl.burst and not errors and err.split("=")[0] in ("lost", "garbled_bytes"):
            continue
        errors.append(err)
    deliveries = got["deliveries"]
    step: dict[str, Any] = {
        "workload": wl.key, **got,
        "server_cpu_s": used, "server_user_s": user1 - user0, "server_sys_s": sys1 - sys0,
        "wall_s": wall, "server_cores": used / wall,
        "us_per_delivery": used / deliveries * 1e6 if deliveries else None,
        "us_per_message": used / got["messages"] * 1e6 if got["messages"] else None,
        "user_frac": (user1 - user0) / used if used else None,
        # from the planned start (loadgen starts sending 0.1 s after it is asked) until the
        # last byte arrived
        "deliveries_per_s": deliveries / max(1e-9, done - t0 - 0.1),
        "p50_ms": res.p50_ms, "p99_ms": res.p99_ms,
        "gen_cpu_frac": res.gen_cpu_frac, "gen_lag_max_ms": res.gen_lag_max_ms,
        "gen_cores": got["gen_cpu_s"] / wall,
        "other_cores": max(0.0, other / wall),
        "events": dict(Counter(srv.problems) - problems0),
        "errors": errors, "ok": not errors,
        "loadgen": asdict(res),
    }
    step["flags"] = step_flags(wl, res, step)
    return step


def wait_bytes(gen: Generator, size: int, timeout: float,
               check: Check = check_bytes) -> tuple[dict[str, Any], float]:
    """Poll the clients' byte counts until every client has everything the others sent (or the
    timeout): the counts, and when they were complete."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.01) + 2):
        got = check(gen.counts(), size)
        now = time.monotonic()
        if not got["clients_wrong"] or now > deadline:
            return got, now
        time.sleep(0.01)
    return got, now


def bytes_errors(got: dict[str, Any]) -> list[str]:
    if not got["clients_wrong"]:
        return []
    return [f"bytes: {got['clients_wrong']} clients did not receive exactly what the others "
            f"sent ({got['bytes_short']:,} short, {got['bytes_extra']:,} extra)"]


def step_flags(wl: Workload, res: StepResult, step: dict[str, Any]) -> list[str]:
    """What makes a step's figure less clean without making it wrong."""
    flags: list[str] = []
    if step["other_cores"] >= OTHER_LOAD:
        flags.append(f"other processes used {step['other_cores']:.2f} cores")
    if not wl.burst:
        if res.send_s > res.duration * 1.2 + 0.2:
            flags.append(f"generator late: sending took {res.send_s:.1f}s for "
                         f"{res.duration:.1f}s")
        if res.gen_cpu_frac >= GEN_BUSY:
            flags.append(f"generator at {res.gen_cpu_frac:.0%} of its core")
    elif res.gen_cpu_frac >= GEN_BUSY:
        flags.append(f"generator at {res.gen_cpu_frac:.0%} of its core: the rate is its limit")
    if step["events"]:
        flags.append(f"server events {step['events']}")
    return flags


def one_run(gen: Generator, config: str, repeat: int, *, argv: list[str],
            workloads: list[Workload], prof: Profile, session: Session,
            labels: dict[str, str], port: Callable[[Server], int] | None = None,
            check: Check = check_bytes, read: Read = "all", keep_stdout: bool = True,
            finish: Callable[[Run, Server], None] | None = None) -> Run:
    """One server, every workload. The clients connect to ``port(server)`` (default: the
    port of ``server.started``); ``read`` and ``keep_stdout`` say how its stdout is read;
    ``check`` judges what the clients received; ``finish`` (default ``finish_run``) what the
    server said about itself at the end."""
    run = Run(config, repeat)
    srv = Server(f"{config}-{repeat}", argv, session.logdir, read=read, keep_stdout=keep_stdout)
    started = time.monotonic()
    say(f"- {labels[config]} #{repeat}")
    try:
        srv.start()
        to = port(srv) if port is not None else srv.port
        if not to:
            raise RuntimeError("server.started has no port for these clients")
        life0 = gen.counts()
        for wl in workloads:
            if not srv.alive():
                raise RuntimeError(f"the server died (exit status {srv.proc and srv.proc.poll()})")
            cpu0 = srv.cpu_seconds()
            conn = gen.connect(HOST, to, wl.clients, size=wl.size)
            run.connect_cpu_s += srv.cpu_seconds() - cpu0
            run.connections += conn.connected
            if not conn.in_chat:
                raise RuntimeError(f"{wl.key}: {conn.connected} of {wl.clients} connected, a "
                                   f"probe reached {conn.reached}; errors {conn.errors}")
            step = measure(gen, srv, wl, prof, check)
            run.steps[wl.key] = step
            say(f"  {wl.key:>6}: {step['us_per_delivery'] or 0:6.2f} us/delivery, "
                f"{step['deliveries_per_s']:>10,.0f} deliv/s, server {step['server_cores']:.2f} "
                f"cores, gen {step['gen_cpu_frac']:.2f}, p99 {step['p99_ms']:.2f} ms"
                + (f", split frames {step['split_frames']}" if step["split_frames"] else "")
                + ("" if step["ok"] else f", ERRORS {step['errors']}")
                + (f" [{'; '.join(step['flags'])}]" if step["flags"] else ""))
            if not step["ok"]:
                run.errors += [f"{wl.key}: {e}" for e in step["errors"]]
                gen.quiesce(timeout=15)
        gen.disconnect()
        life1 = gen.counts()
        run.client_totals = {
            "rx": sum(int(c["rx_all"]) for c in life1) - sum(int(c["rx_all"]) for c in life0),
            "tx": sum(int(c["tx_all"]) for c in life1) - sum(int(c["tx_all"]) for c in life0)}
        run.tls = sorted({" ".join(c["tls"]) for c in life1 if any(c["tls"])})
    except (RuntimeError, TimeoutError, OSError) as exc:
        run.errors.append(f"{type(exc).__name__}: {exc}")
        say(f"  error: {exc}")
        with contextlib.suppress(Exception):
            gen.disconnect()
    finally:
        srv.stop()
        run.seconds = time.monotonic() - started
    (finish or finish_run)(run, srv)
    return run


def finish_run(run: Run, srv: Server) -> None:
    """What the server said about itself: exit status, totals against the clients', events."""
    run.exit_status = srv.exit_status
    if run.exit_status not in (0, None):
        run.errors.append(f"the server exited with status {run.exit_status}")
    run.problems = dict(srv.problems)
    run.problem_lines = srv.problem_lines[:20]
    if srv.secured:
        run.tls = [f"server: {k} x{v}" for k, v in srv.secured.items()] + run.tls
    stopped = srv.totals()
    run.server_totals = stopped
    if not stopped:
        run.errors.append("no server.stopped event")
    elif run.client_totals:
        if int(stopped.get("bytes_out", -1)) != run.client_totals["rx"] or \
                int(stopped.get("bytes_in", -1)) != run.client_totals["tx"]:
            run.errors.append(
                f"server totals: bytes_in {stopped.get('bytes_in')}, bytes_out "
                f"{stopped.get('bytes_out')}; the clients sent {run.client_totals['tx']} and "
                f"received {run.client_totals['rx']}")
        if int(stopped.get("connections", -1)) != run.connections:
            run.errors.append(f"server counted {stopped.get('connections')} connections, the "
                              f"clients made {run.connections}")


# -- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    label: str
    value: Callable[[Run], float | None]
    fmt: str
    ratio: bool = True  # TLS / plain
    extra: bool = False  # TLS - plain


def step_value(key: str, name: str) -> Callable[[Run], float | None]:
    def value(run: Run) -> float | None:
        step = run.steps.get(key)
        if step is None or not step["ok"]:
            return None
        v = step.get(name)
        return None if v is None else float(v)
    return value


def millions(key: str) -> Callable[[Run], float | None]:
    per_s = step_value(key, "deliveries_per_s")

    def value(run: Run) -> float | None:
        v = per_s(run)
        return None if v is None else v / 1e6
    return value


def rows_for(workloads: list[Workload]) -> list[tuple[str, list[Row]]]:
    out: list[tuple[str, list[Row]]] = []
    for wl in workloads:
        rows: list[Row] = []
        if wl.burst:
            # the generator's limit more than the server's: no ratio
            rows.append(Row("deliveries/s, millions", millions(wl.key), "{:.2f}", ratio=False))
        rows += [
            Row("CPU per delivery, us", step_value(wl.key, "us_per_delivery"),
                "{:.3f}" if wl.burst else "{:.2f}", extra=True),
            Row("CPU per message sent, us", step_value(wl.key, "us_per_message"),
                "{:.2f}" if wl.burst else "{:,.0f}", extra=True),
            Row("of which user space", step_value(wl.key, "user_frac"), "{:.0%}",
                ratio=False),
            Row("server CPU, cores", step_value(wl.key, "server_cores"), "{:.2f}"),
        ]
        if not wl.burst:
            rows += [Row("p50 latency, ms", step_value(wl.key, "p50_ms"), "{:.2f}"),
                     Row("p99 latency, ms", step_value(wl.key, "p99_ms"), "{:.2f}")]
        rows += [
            Row("TCP segments per delivery", step_value(wl.key, "segments_per_delivery"),
                "{:.3f}"),
            Row("bytes received per delivery", step_value(wl.key, "wire_per_delivery"),
                "{:,.1f}", extra=True),
            Row("generator CPU, cores", step_value(wl.key, "gen_cores"), "{:.2f}",
                ratio=False)]
        out.append((wl.label, rows))
    out.append(("connect (all workloads' clients)", [
        Row("server CPU per connection, us", lambda r: r.connect_us, "{:,.0f}", extra=True)]))
    return out


def tables(runs: list[Run], workloads: list[Workload], configs: tuple[str, ...],
           labels: dict[str, str]) -> tuple[list[Table], dict[str, Any]]:
    """Per configuration after the first, its table against the first (min / median / max
    of the runs, ratio and difference of the medians), and the same figures for the JSON."""
    base = configs[0]
    out: list[Table] = []
    summary: dict[str, Any] = {}
    for other in configs[1:]:
        b, o = labels[base], labels[other]
        table = Table(f"{o} against {b}", ["figure", *(f"{label} {x}" for label in (b, o)
                                                      for x in ("min", "median", "max")),
                                           f"{o}/{b}", f"{o}-{b}"])
        mine: dict[str, Any] = {}
        for title, rows in rows_for(workloads):
            table.add(title)
            for row in rows:
                got = {c: spread([v for r in runs if r.config == c
                                  if (v := row.value(r)) is not None]) for c in (base, other)}
                cells = [cell(None if s is None else x, row.fmt)
                         for c in (base, other) for s in [got[c]]
                         for x in (s or (None, None, None))]
                first, second = got[base], got[other]
                ratio = (second[1] / first[1] if first and second and first[1] and row.ratio
                         else None)
                extra = second[1] - first[1] if first and second and row.extra else None
                extra_fmt = "{:+,.0f}" if abs(extra or 0) >= 100 else "{:+.2f}" if abs(
                    extra or 0) >= 0.1 else "{:+.3f}"
                table.add(f"  {row.label}", *cells, cell(ratio, "{:.2f}x"),
                          cell(extra, extra_fmt))
                mine[f"{title}: {row.label}"] = {base: first, other: second,
                                                 f"{other}_over_{base}": ratio,
                                                 f"{other}_minus_{base}": extra}
        out.append(table)
        summary[other] = mine
    return out, summary


def notes(runs: list[Run], workloads: list[Workload], configs: tuple[str, ...],
          labels: dict[str, str], received: dict[str, str] | None = None) -> list[str]:
    """Checks, errors and flags, configuration by configuration; ``received`` says, per
    configuration, what every client was checked to receive."""
    out: list[str] = []
    for config in configs:
        mine = [r for r in runs if r.config == config]
        steps = [s for r in mine for s in r.steps.values()]
        good = [s for s in steps if s["ok"]]
        checked = sum(int(s["bytes_received"]) for s in good)
        what = (received or {}).get(config, "exactly the bytes every other client sent")
        out.append(f"check: {labels[config]}: {len(good)} of {len(mine) * len(workloads)} steps: "
                   f"every client received {what} ({checked / 1e6:,.1f} MB checked)")
        split = sum(int(s["split_frames"]) for s in steps)
        if split:
            out.append(f"burst: {labels[config]}: {split:,} frames split at a recv boundary "
                       "with another sender's bytes inside (every byte arrived)")
        totals_ok = sum(1 for r in mine if r.server_totals and r.client_totals and not any(
            e.startswith(("server totals", "server counted")) for e in r.errors))
        out.append(f"totals: {labels[config]}: server.stopped bytes_in/bytes_out/connections "
                   f"match the clients' counts in {totals_ok} of {len(mine)} runs")
        for r in mine:
            for err in r.errors:
                out.append(f"error: {labels[config]} #{r.repeat}: {err}")
            for s in r.steps.values():
                for flag in s["flags"]:
                    out.append(f"flag: {labels[config]} #{r.repeat} {s['workload']}: {flag}")
        events: Counter[str] = Counter()
        for r in mine:
            events.update(r.problems)
        out.append(f"events: {labels[config]}: "
                   + (", ".join(f"{k} x{v}" for k, v in events.items()) if events else
                      "no warning or error from the server"))
    tls = sorted({t for r in runs for t in r.tls})
    if tls:
        out.append("tls: " + "; ".join(tls))
    return out


def report(session: Session, runs: list[Run], workloads: list[Workload],
           configs: tuple[str, ...], *, labels: dict[str, str], prof: Profile,
           received: dict[str, str] | None = None, tables_after: list[Table] | None = None,
           notes_after: list[str] | None = None, **figures: Any) -> int:
    """The tables, the notes (``received`` as in ``notes``) and the result; the exit status.
    A suite's own tables and notes (``tables_after``, ``notes_after``) follow the common ones."""
    same_build = session.same_build()
    out, summary = tables(runs, workloads, configs, labels)
    out += tables_after or []
    lines = notes(runs, workloads, configs, labels, received) + (notes_after or [])
    if not same_build:
        lines.append("error: the fsmchat sources changed during the run: the runs did not all "
                     "measure the same build")
    session.finish(out, lines, {"profile": asdict(prof),
                                "workloads": [asdict(w) for w in workloads], **figures,
                                "summary": summary, "runs": [asdict(r) for r in runs]})
    return 1 if any(r.errors for r in runs) or not same_build else 0


def alternate(configs: tuple[str, ...], prof: Profile,
              one: Callable[[str, int], Run]) -> list[Run]:
    """Every configuration ``prof.repeats`` times, alternating: A, B, A, B, ..."""
    return [one(config, repeat) for repeat in range(1, prof.repeats + 1) for config in configs]


def parse(args_list: list[str], *, description: str, min_size: int = MIN_SIZE,
          extend: Callable[[argparse.ArgumentParser], None] | None = None,
          ) -> tuple[argparse.Namespace, Profile, list[Workload]]:
    """The options, the profile and the workloads; ``extend`` adds options of its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="short steps: under a minute")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="also write the result (every figure and step) to PATH")
    parser.add_argument("--repeats", type=int, metavar="N",
                        help="runs of each configuration, alternating (default: 3)")
    parser.add_argument("--clients", type=int, default=50, metavar="N",
                        help="clients of the paced steps (default: 50)")
    parser.add_argument("--rates", default="10,20", metavar="LIST",
                        help="messages per second per client: one paced step of --size bytes "
                             "at each (default: 10,20)")
    parser.add_argument("--size", type=int, default=64, metavar="B",
                        help="bytes per message (default: 64)")
    parser.add_argument("--large-size", type=int, default=4096, metavar="B",
                        help="bytes per message of one more paced step, at the first rate; "
                             "0: none (default: 4096)")
    parser.add_argument("--burst-clients", type=int, default=20, metavar="N",
                        help="clients of the burst step; 0: none (default: 20)")
    parser.add_argument("--procs", type=int, default=1, metavar="N",
                        help="generator processes per configuration (default: 1)")
    parser.add_argument("--logdir", type=Path, metavar="DIR",
                        help="each server's stdout and stderr (default: a new directory in /tmp)")
    add_options(parser)
    if extend is not None:
        extend(parser)
    args = parser.parse_args(args_list)
    prof = QUICK if args.quick else FULL
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error("--repeats must be at least 1")
        prof = Profile(**{**asdict(prof), "repeats": args.repeats})
    if args.clients < 2 or (args.burst_clients and args.burst_clients < 2):
        parser.error("--clients and --burst-clients must be at least 2")
    if args.size < min_size or (args.large_size and args.large_size < min_size):
        parser.error(f"message sizes must be at least {min_size} bytes")
    try:
        rates = [float(x) for x in args.rates.split(",") if x.strip()]
    except ValueError:
        parser.error("--rates takes comma-separated numbers")
    if not rates or any(r <= 0 for r in rates):
        parser.error("--rates: at least one rate, every one positive")
    n = args.clients
    sizes = [(args.size, r) for r in rates] + ([(args.large_size, rates[0])]
                                               if args.large_size else [])
    workloads = [Workload(f"{size}B@{r:g}", f"{size:,} B, {n} clients x {r:g} msg/s paced", n,
                          size, r, prof.paced_seconds) for size, r in sizes]
    if len({w.key for w in workloads}) < len(workloads):
        parser.error("the same size and rate twice")
    if args.burst_clients:
        workloads.append(Workload("burst", f"{args.size:,} B, {args.burst_clients} clients "
                                  "bursting", args.burst_clients, args.size, 0.0,
                                  prof.burst_seconds, burst=True))
    return args, prof, workloads


