"""What TLS costs fsmchat per delivered message, against plain TCP: one server build, one load.

    python bench/tls.py [--quick] [--json PATH] [--repeats 3] [--clients 50] [--rates 10,20]

A throwaway CA and server certificate (trustme, for ``localhost`` and 127.0.0.1) go into a
temporary directory. Every run starts a fresh server with the same command line,

    python -m fsmchat --host 127.0.0.1 --port 0 --tls-port 0 --tls-cert C --tls-key K
                      --log-level info --drain-timeout 2

and its clients connect either all to ``port`` (``plain``) or all to ``tls_port`` (``TLS``):
the relay, its options and the load are the same, only the transport differs. Runs alternate
plain, TLS, plain, TLS, ... (``--repeats`` of each); each run measures, one after the other:

1. ``64B@R`` for each R of ``--rates`` (10 and 20): ``--clients`` clients (50) x R msg/s each,
   64-byte messages, paced (evenly spread: one message every 2 ms, or every 1 ms as in run.py's
   CPU figure); per-sender order checked. At 10/s every delivery is one send (one segment, one
   TLS record) to one client; at 20/s the relay starts to put two messages in one send now and
   then, and more often with TLS (``TCP segments per delivery``).
2. ``4096B@R``: 4,096-byte messages (``--large-size``) at the first rate.
3. ``burst``: ``--burst-clients`` clients (20) keep their sockets full of 64-byte frames for a
   few seconds; the relay batches as much as it can, and the generator is the limit.

The clients are ``bench/loadgen.py``'s: non-blocking sockets in one ``selectors`` loop per
generator process (``--procs``), here with the socket swapped for one that counts the bytes
each client sent and received and, for TLS, an ``ssl`` client socket (the handshake is done
when it connects, then SSL's want-read/want-write become ``BlockingIOError``, and what SSL has
decrypted but not handed out yet is read at once). One generator per configuration, forked
before any server starts. Each step's figures: the server's ``utime + stime`` from
``/proc/PID/stat`` before and after the step, over the deliveries (bytes received by all
clients / message size) and over the messages sent; the server's CPU during each connect (the
TCP and TLS handshakes) per connection; and from each client socket's ``TCP_INFO`` the bytes
(TLS records included) and segments it received. Checks: every client received exactly the
bytes every other client sent (``rx == sum(tx) - own tx``, client by client), loadgen's frame
checks (no loss, echo, garbling; per-sender order in the paced steps), and at the end of each
run the server's own ``server.stopped`` byte totals against the clients' counts; and the fsmchat
sources must be the same at the end as at the start (one build for every run).

Prints a table (min / median / max of the runs per configuration, and TLS over plain), progress
on stderr; ``--json PATH`` writes every step. Other processes' CPU during each step (machine
busy time from ``/proc/stat`` less the server, the generator and this process) is recorded,
and steps where it reached 0.15 of a core are flagged. Every process it starts is stopped at
the end, also on errors, SIGINT, SIGTERM and SIGHUP. ``bench/README.md`` explains the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import selectors
import signal
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

from loadgen import MIN_SIZE, LoadGen, StepResult, Worker, raise_nofile
from run import CLK_TCK, GEN_BUSY, HOST, PY, ROOT, Server, Spec, base_environment, say, stop_all

SERVER_NAME = "localhost"  # the name the clients check the certificate against
HANDSHAKE_TIMEOUT = 10.0
OTHER_LOAD = 0.15
"""Cores used by other processes during a step above which the step is flagged: on a 2-core
machine that time comes out of the server's or the generator's."""
CONFIGS = ("plain", "tls")
LABEL = {"plain": "plain", "tls": "TLS"}


# -- client sockets that count, and speak TLS (inside the generator processes) ------------------


class PlainSocket(socket.socket):
    """A plain client socket that counts the bytes it sent and received."""

    rx = 0  # bytes received since the step began
    tx = 0  # bytes sent since the step began
    rx_all = 0  # since it connected
    tx_all = 0

    def send(self, data: Any, flags: int = 0, /) -> int:
        sent = super().send(data, flags)
        self.tx += sent
        self.tx_all += sent
        return sent

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0, /) -> int:
        got = super().recv_into(buffer, nbytes, flags)
        self.rx += got
        self.rx_all += got
        return got


class TlsSocket(ssl.SSLSocket):
    """A TLS client socket as loadgen's ``Worker`` expects a non-blocking socket to behave:
    SSL's want-read/want-write (a record not complete yet, or a handshake message such as a
    session ticket instead of data) are ``BlockingIOError``; a read also takes what SSL has
    already decrypted (``pending``), which ``select`` cannot see. Counts bytes of plaintext."""

    rx = 0
    tx = 0
    rx_all = 0
    tx_all = 0

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            sent = super().send(data, flags)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            raise BlockingIOError from None
        self.tx += sent
        self.tx_all += sent
        return sent

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        try:
            got = super().recv_into(buffer, nbytes, flags)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError from None
        if got:
            view = memoryview(buffer)
            room = nbytes or len(view)
            while got < room and self.pending():
                try:
                    got += super().recv_into(view[got:room], None, flags)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    break  # not expected with data pending; keep what was read
        self.rx += got
        self.rx_all += got
        return got


Stream = PlainSocket | TlsSocket

TCP_INFO_BYTES_RECEIVED = 128  # offsetof(struct tcp_info, tcpi_bytes_received): u64, Linux 4.1
TCP_INFO_DATA_SEGS_IN = 152  # offsetof(struct tcp_info, tcpi_data_segs_in): u32, Linux 4.6


def tcp_received(sock: socket.socket) -> tuple[int, int]:
    """Bytes (TLS records included) and segments with data the kernel has received on this
    socket so far, from TCP_INFO; (0, 0) where that is not available."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, AttributeError):
        return 0, 0
    if len(info) < TCP_INFO_DATA_SEGS_IN + 4:
        return 0, 0
    (wire,) = struct.unpack_from("<Q", info, TCP_INFO_BYTES_RECEIVED)
    (segs,) = struct.unpack_from("<I", info, TCP_INFO_DATA_SEGS_IN)
    return int(wire), int(segs)


class CountingWorker(Worker):
    """loadgen's worker, with every client socket replaced after it connected: by a counting
    plain socket, or (``ca`` given) by a TLS socket that has done its handshake."""

    def __init__(self, control: Connection, wid: int, lifetime: float, ca: str | None) -> None:
        self.streams: list[tuple[int, Stream]] = []  # before Worker.__init__: _reset_stats
        self.tcp_base: dict[int, tuple[int, int]] = {}  # gid -> tcp_received() at step start
        self.closed_rx = self.closed_tx = 0  # bytes of the clients already closed
        self.context: ssl.SSLContext | None = None
        if ca is not None:
            self.context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
            self.context.sslsocket_class = TlsSocket
        self.tls_version = ""
        self.tls_cipher = ""
        super().__init__(control, wid, lifetime)

    def _connect(self, msg: dict[str, Any]) -> dict[str, Any]:
        reply = super()._connect(msg)
        errors: dict[str, int] = reply["errors"]
        failed = 0
        for client in self.clients:
            raw = client.sock
            self.sel.unregister(raw)
            self.by_fd.pop(raw.fileno(), None)
            try:
                stream = self._upgrade(raw)
            except OSError as exc:  # ssl.SSLError and TimeoutError too
                why = f"handshake: {type(exc).__name__}: {exc}"[:120]
                errors[why] = errors.get(why, 0) + 1
                raw.close()
                failed += 1
                continue
            client.sock = stream
            self.by_fd[stream.fileno()] = client
            self.sel.register(stream, selectors.EVENT_READ, client)
            self.streams.append((client.gid, stream))
        reply["connected"] -= failed
        reply["errors"] = errors
        return reply

    def _upgrade(self, raw: socket.socket) -> Stream:
        if self.context is None:
            plain = PlainSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
            plain.setblocking(False)
            return plain
        raw.settimeout(HANDSHAKE_TIMEOUT)  # blocking, one handshake after the other
        tls = self.context.wrap_socket(raw, server_hostname=SERVER_NAME)
        tls.setblocking(False)
        assert isinstance(tls, TlsSocket)
        cipher = tls.cipher()
        self.tls_version, self.tls_cipher = tls.version() or "", cipher[0] if cipher else ""
        return tls

    def _close_clients(self) -> None:
        for _gid, stream in self.streams:
            self.closed_rx += stream.rx_all
            self.closed_tx += stream.tx_all
        self.streams = []
        super()._close_clients()

    def _reset_stats(self) -> None:
        super()._reset_stats()
        self.tcp_base = {}
        for gid, stream in self.streams:
            stream.rx = stream.tx = 0
            self.tcp_base[gid] = tcp_received(stream)

    def _stats(self) -> dict[str, Any]:
        stats = super()._stats()
        rows = []
        for gid, s in self.streams:
            wire0, segs0 = self.tcp_base.get(gid, (0, 0))
            wire, segs = tcp_received(s) if s.fileno() >= 0 else (wire0, segs0)
            rows.append([gid, s.rx, s.tx, wire - wire0, segs - segs0])
        stats["streams"] = rows
        stats["rx_all"] = self.closed_rx + sum(s.rx_all for _, s in self.streams)
        stats["tx_all"] = self.closed_tx + sum(s.tx_all for _, s in self.streams)
        stats["tls"] = [self.tls_version, self.tls_cipher]
        return stats


def counting_worker_main(control: Connection, wid: int, lifetime: float, ca: str | None) -> None:
    raise_nofile()
    CountingWorker(control, wid, lifetime, ca).serve()


class Generator(LoadGen):
    """loadgen's ``LoadGen`` with ``CountingWorker`` processes: plain (``ca`` None) or TLS.
    ``target(control, wid, lifetime, ca)`` may run a subclass of ``CountingWorker`` instead."""

    def __init__(self, ca: str | None, procs: int = 1, lifetime: float = 3600.0, *,
                 target: Callable[..., None] = counting_worker_main,
                 name: str = "tls-bench-gen") -> None:
        super().__init__(procs, lifetime, target=target, extra=(ca,), name=name)

    def counts(self) -> list[dict[str, Any]]:
        """Every worker's counters now (the ``stats`` command does not reset them)."""
        return self._ask_all([{"cmd": "stats"}] * len(self.workers))


# -- the server ----------------------------------------------------------------------------------


class TlsServer(Server):
    """fsmchat with a plain and a TLS listener; every stdout event read (info level: a few
    lines per connection), for ``tls_port``, the negotiated cipher and the final totals."""

    scan_all = True
    log_stdout = True

    def __init__(self, spec: Spec, logdir: Path) -> None:
        super().__init__(spec, logdir)
        self.tls_port = 0
        self.secured: Counter[str] = Counter()  # "version cipher" of connection.secured
        self.accepted = 0
        self.stopped: dict[str, Any] = {}

    def _event(self, event: dict[str, Any], raw: bytes) -> None:
        name = event.get("event")
        if name == "server.started" and not self.started.is_set():
            self.tls_port = int(event.get("tls_port") or 0)  # before super() sets started
        elif name == "connection.accepted":
            self.accepted += 1
        elif name == "connection.secured":
            self.secured[f"{event.get('version')} {event.get('cipher')}"] += 1
        elif name == "server.stopped":
            self.stopped = event
        super()._event(event, raw)


def make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """A fresh CA and a server certificate for ``localhost`` and 127.0.0.1: (CA, cert, key)."""
    import trustme  # noqa: PLC0415 - here only: bench/chat.py uses this module without it

    ca = trustme.CA()
    leaf = ca.issue_cert(SERVER_NAME, HOST)
    ca_pem, cert, key = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return ca_pem, cert, key


def server_argv(cert: Path, key: Path) -> list[str]:
    return [PY, "-m", "fsmchat", "--host", HOST, "--port", "0", "--tls-port", "0",
            "--tls-cert", str(cert), "--tls-key", str(key), "--log-level", "info",
            "--drain-timeout", "2", "--max-clients-per-addr", "0"]  # all from one address


def source_digest() -> str:
    """A digest of the fsmchat package's sources: every run must measure the same build."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "fsmchat").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores, /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


# -- the measurements ----------------------------------------------------------------------------


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


def measure(gen: Generator, srv: TlsServer, wl: Workload, prof: Profile,
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
            workloads: list[Workload], prof: Profile, logdir: Path,
            labels: dict[str, str] = LABEL, check: Check = check_bytes,
            server_class: type[TlsServer] | None = None,
            finish: Callable[[Run, TlsServer], None] | None = None) -> Run:
    """One server, every workload. ``check`` judges what the clients received; ``finish``
    (default ``finish_run``) what the server said about itself at the end."""
    run = Run(config, repeat)
    srv = (server_class or TlsServer)(Spec(f"{config}-{repeat}", lambda _port: argv), logdir)
    started = time.monotonic()
    say(f"- {labels[config]} #{repeat}")
    try:
        srv.start()
        port = srv.tls_port if config == "tls" else srv.port
        if not port:
            raise RuntimeError("server.started has no tls_port")
        life0 = gen.counts()
        for wl in workloads:
            if not srv.alive():
                raise RuntimeError(f"the server died (exit status {srv.proc and srv.proc.poll()})")
            cpu0 = srv.cpu_seconds()
            conn = gen.connect(HOST, port, wl.clients, size=wl.size)
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
        if config == "tls":
            run.tls = sorted({" ".join(c["tls"]) for c in life1})
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


def finish_run(run: Run, srv: TlsServer) -> None:
    """What the server said about itself: exit status, totals against the clients', events."""
    run.exit_status = srv.proc.returncode if srv.proc is not None else None
    if run.exit_status not in (0, None):
        run.errors.append(f"the server exited with status {run.exit_status}")
    run.problems = dict(srv.problems)
    run.problem_lines = srv.problem_lines[:20]
    if srv.secured:
        run.tls = [f"server: {k} x{v}" for k, v in srv.secured.items()] + run.tls
    stopped = {k: v for k, v in srv.stopped.items() if k not in ("timestamp", "level", "event")}
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


def spread(values: list[float]) -> tuple[float, float, float] | None:
    if not values:
        return None
    return min(values), statistics.median(values), max(values)


def fmt(value: float | None, form: str) -> str:
    return "n/a" if value is None else form.format(value)


def table(runs: list[Run], workloads: list[Workload], pair: tuple[str, str] = CONFIGS,
          labels: dict[str, str] = LABEL) -> tuple[str, dict[str, Any]]:
    """The table of ``pair`` (a baseline configuration, another one), and the same figures for
    the JSON file."""
    col = 9
    base, other = pair
    over, minus = f"{labels[other]}/{labels[base]}", f"{labels[other]}-{labels[base]}"
    wr, wd = max(col + 2, len(over) + 2), max(col + 1, len(minus) + 1)
    head = (f"{'':<34}" + f"{labels[base]:^{col * 3}}" + f"{labels[other]:^{col * 3}}"
            + f"{over:>{wr}}{minus:>{wd}}")
    sub = (f"{'figure':<34}" + "".join(f"{h:>{col}}" for h in ("min", "median", "max") * 2)
           + f"{'(median)':>{wr}}{'(median)':>{wd}}")
    lines = [head, sub]
    summary: dict[str, Any] = {}
    for title, rows in rows_for(workloads):
        lines.append(title)
        for row in rows:
            got: dict[str, tuple[float, float, float] | None] = {}
            cells = ""
            for config in pair:
                vals = [v for r in runs if r.config == config
                        if (v := row.value(r)) is not None]
                got[config] = spread(vals)
                s = got[config]
                cells += "".join(f"{fmt(None if s is None else x, row.fmt):>{col}}"
                                 for x in (s or (None, None, None)))
            first, second = got[base], got[other]
            ratio = (second[1] / first[1] if first and second and first[1] and row.ratio
                     else None)
            extra = second[1] - first[1] if first and second and row.extra else None
            extra_fmt = "{:+,.0f}" if abs(extra or 0) >= 100 else "{:+.2f}" if abs(
                extra or 0) >= 0.1 else "{:+.3f}"
            lines.append(f"  {row.label:<32}{cells}{fmt(ratio, '{:.2f}x'):>{wr}}"
                         f"{fmt(extra, extra_fmt):>{wd}}")
            summary[f"{title}: {row.label}"] = {
                base: first, other: second, f"{other}_over_{base}": ratio,
                f"{other}_minus_{base}": extra}
    return "\n".join(lines), summary


def notes(runs: list[Run], workloads: list[Workload], configs: tuple[str, ...] = CONFIGS,
          labels: dict[str, str] = LABEL, received: dict[str, str] | None = None) -> list[str]:
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


def report(runs: list[Run], workloads: list[Workload], configs: tuple[str, ...], *,
           labels: dict[str, str], env: dict[str, Any], started: float, logdir: Path,
           json_path: Path | None, received: dict[str, str] | None = None) -> int:
    """A table of each configuration against the first, the notes (``received`` as in
    ``notes``), everything into ``json_path``; the exit status. ``env`` gets the figures of
    the end of the bench (``started`` is when it began)."""
    env["seconds"] = round(time.monotonic() - started, 1)
    env["fsmchat_sources_after"] = source_digest()
    env["loadavg_after"] = os.getloadavg()
    env["logdir"] = str(logdir)
    same_build = env["fsmchat_sources_after"] == env["fsmchat_sources"]
    texts: list[str] = []
    summary: dict[str, Any] = {}
    for other in configs[1:]:
        text, summary[other] = table(runs, workloads, (configs[0], other), labels)
        texts.append(text)
    if json_path:
        json_path.write_text(json.dumps({"environment": env, "summary": summary,
                                         "runs": [asdict(r) for r in runs]}, indent=1) + "\n")
    print("\n\n".join(texts))
    print()
    for line in notes(runs, workloads, configs, labels, received):
        print(line)
    if not same_build:
        print("error: the fsmchat sources changed during the run: the runs did not all measure "
              "the same build")
    print(f"\n{len(runs)} runs in {env['seconds']:.0f} s (load average before "
          f"{env['loadavg_before'][0]:.2f}); logs: {env['logdir']}"
          + (f"; results: {json_path}" if json_path else ""))
    return 1 if any(r.errors for r in runs) or not same_build else 0


# -- main ----------------------------------------------------------------------------------------


def parse(args_list: list[str], *,
          description: str = "fsmchat: server CPU per delivered message over TLS against "
                             "plain TCP",
          min_size: int = MIN_SIZE,
          extend: Callable[[argparse.ArgumentParser], None] | None = None,
          ) -> tuple[argparse.Namespace, Profile, list[Workload]]:
    """The options, the profile and the workloads; ``extend`` adds options of its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="short steps: under a minute")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every figure and step")
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


def interrupt_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt in this process, so that a bench's
    main stops every process it started. SIGINT too: a shell starts a background job with
    SIGINT ignored, and Python then leaves it so."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)


def begin(name: str, args: argparse.Namespace, prof: Profile, args_list: list[str],
          workloads: list[Workload], **more: Any) -> tuple[dict[str, Any], Path]:
    """What every suite does first: its log folder, the environment its report records (with
    ``more``), and Ctrl-C and kill stopping every process it starts."""
    logdir: Path = args.logdir or Path(tempfile.mkdtemp(prefix=f"fsmchat-{name}-"))
    logdir.mkdir(parents=True, exist_ok=True)
    env = {**base_environment(f"{name}.py", asdict(prof), args_list),
           "workloads": [asdict(w) for w in workloads], "procs": args.procs,
           "nofile": raise_nofile(), "fsmchat_sources": source_digest(), **more}
    interrupt_on_signals()
    say(f"logs: {logdir}")
    return env, logdir


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    args, prof, workloads = parse(args_list)
    env, logdir = begin("tls", args, prof, args_list, workloads, openssl=ssl.OPENSSL_VERSION)
    started = time.monotonic()
    runs: list[Run] = []
    gens: dict[str, Generator] = {}
    with tempfile.TemporaryDirectory(prefix="fsmchat-tls-certs-") as certdir:
        ca, cert, key = make_certs(Path(certdir))
        argv = server_argv(cert, key)
        env["server_command"] = " ".join(argv[1:]).replace(certdir, "$CERTS")
        # Forked before any thread; they ignore Ctrl-C (sent to the whole foreground group):
        # this process stops them.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            gens["plain"] = Generator(None, args.procs)
            gens["tls"] = Generator(str(ca), args.procs)
        finally:
            signal.signal(signal.SIGINT, previous)
        try:
            for repeat in range(1, prof.repeats + 1):
                for config in CONFIGS:
                    runs.append(one_run(gens[config], config, repeat, argv=argv,
                                        workloads=workloads, prof=prof, logdir=logdir))
        except KeyboardInterrupt as exc:
            say(f"interrupted ({str(exc) or 'SIGINT'}); every process this bench started was "
                "stopped")
            return 130
        finally:
            for gen in gens.values():
                gen.close()
            stop_all()
    return report(runs, workloads, CONFIGS, labels=LABEL, env=env, started=started, logdir=logdir,
                  json_path=args.json)


if __name__ == "__main__":
    raise_nofile()
    sys.exit(main())
