"""Soak test: a real fsmchat server, hundreds of chatting and churning clients, one report.

Run it from the repository, with the interpreter the package is installed in (the soak starts
the server itself, as ``sys.executable -m fsmchat --port 0 --host 127.0.0.1 --log-level info``):

    .venv/bin/python bench/soak.py --clients 50 --seconds 10      # a quick check
    .venv/bin/python bench/soak.py                                # 500 clients for 120 s
    .venv/bin/python bench/soak.py --json soak.json               # the report as JSON as well
    .venv/bin/python bench/soak.py --fsmchat ../old               # another checkout's fsmchat

Options: ``--clients N`` (500), ``--seconds S`` (120), ``--rate R`` messages per second per
client (2), ``--churn F`` fraction of all clients that disconnect and reconnect per second
(0.02), ``--size B`` bytes per message (64), ``--stable F`` fraction of clients that never
disconnect (0.5; all of them when ``--churn 0``), ``--seed N``, ``--json PATH``, and
``--fsmchat DIR``, ``--out DIR`` as every suite. The report goes to
``results/soak-<date>.json``.

Phases, each bounded by a timeout: start the server and read its port from ``server.started``;
connect every client and wait for as many ``connection.accepted`` events; chat (and churn) for
``--seconds``; stop sending and wait until everything sent has been delivered; close every client
(half-close, read to EOF, close) and wait for a ``connection.closed`` per accepted connection;
count the server's descriptors; send SIGTERM and expect exit status 0.

Messages are the harness's frames (``harness.frames``) of exactly ``--size`` bytes: the
sender is the client's slot, the sequence number is counted across all of the slot's
connections. A receiver cuts its byte stream into frames itself, since the server's recv may
join several frames and TCP may split them.

Verification: no client receives its own frame (echo); within one connection, the frames from
each sender arrive with consecutive sequence numbers, so a gap is a loss, a repeat a duplicate
and a step back out of order; and every *stable* client (connected from before the first message
to after the last delivery) receives every frame every other client sent, exactly once and in
order. Churning clients close gracefully (shutdown, read to EOF), so everything they sent reaches
the server. The server's ``server.stopped`` byte totals are checked against the clients' own.

Every second the server's RSS (VmRSS), open descriptors and CPU time are sampled from /proc.
All the clients run in this one process, in a single-threaded non-blocking ``selectors`` loop;
the server's events are read by ``harness.server``'s reader thread.
Only loopback addresses are used. Exit status: 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import array
import enum
import errno
import heapq
import random
import selectors
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from harness.frames import HEADER, MAGIC, MAGIC_BYTES, MIN_SIZE, TRAILER, frame_struct, frame_tail
from harness.procfs import own_cpu
from harness.report import Table, say
from harness.server import HOST, Server, fsmchat
from harness.stats import buckets, histogram, percentile_ns
from harness.suite import Session, add_options, usage_error

SOAK_STEP = 1  # the frames' step field: one step, the whole soak
RECV_SIZE = 256 * 1024
FRESH = -2  # in `Client.last`: nothing from that sender yet, in a session that joined mid-run
PROBES = 4  # stable clients whose every received frame's latency is recorded
LATE = 0.1  # a message sent this many seconds after its slot counts as late
TURN = 0.05  # longest select() wait, so timers and deadlines are checked often enough

STARTUP_TIMEOUT = 15.0
CONNECT_TIMEOUT = 60.0
SETTLE_TIMEOUT = 30.0
CLOSE_TIMEOUT = 30.0
HALF_CLOSE_TIMEOUT = 10.0  # a client that shut its side down waits this long for the server's EOF
RECONNECT_DELAY = 0.05
EXIT_TIMEOUT = 20.0  # after SIGTERM; the server's own drain timeout is 5 s


class Phase(enum.Enum):
    START = "start"
    CONNECT = "connect"
    RUN = "run"
    SETTLE = "settle"
    CLOSE = "close"
    STOP = "stop"


class State(enum.Enum):
    IDLE = "idle"  # no socket
    CONNECTING = "connecting"  # connect() in progress
    OPEN = "open"  # connected: reads, and sends on schedule
    CLOSING = "closing"  # sends what is buffered, shuts down its side, reads until EOF


@dataclass(frozen=True)
class Config:
    clients: int
    seconds: float
    rate: float
    churn: float
    size: int
    stable: float
    seed: int
    json: str | None


class Client:
    """One simulated chat user: a slot number that lives on across its connections."""

    __slots__ = ("deadline", "intact", "last", "out", "pending", "probe", "received", "reconnect",
                 "seq", "sessions", "shut", "slot", "sock", "stable", "state")

    def __init__(self, slot: int, stable: bool, probe: bool) -> None:
        self.slot = slot
        self.stable = stable  # never disconnects on purpose
        self.probe = probe  # records the latency of every frame it receives
        self.intact = stable  # stable, and its one connection was never broken
        self.sock: socket.socket | None = None
        self.state = State.IDLE
        self.seq = 0  # next sequence number = frames sent so far, over all sessions
        self.out = bytearray()  # what the socket did not take yet
        self.pending = b""  # the start of a frame whose rest has not arrived yet
        self.last: list[int] = []  # per sender: last sequence number seen in this session
        self.received = 0
        self.sessions = 0
        self.reconnect = False  # reconnect once the current session has closed
        self.deadline = 0.0  # CLOSING: give up waiting for the server's EOF at this time
        self.shut = False  # CLOSING: our side is shut down


@dataclass
class Tally:
    """What the clients saw."""

    sent: int = 0
    late_sends: int = 0
    bytes_sent: int = 0
    delivered: int = 0
    stable_delivered: int = 0
    bytes_received: int = 0
    recvs: int = 0  # recv calls that returned data: frames per recv shows the server's batching
    lost_stable: int = 0  # gaps seen by stable receivers (their missing tails are added at the end)
    lost_churning: int = 0  # gaps inside one session of a churning receiver
    duplicates: int = 0
    out_of_order: int = 0
    echoes: int = 0
    corrupt: int = 0
    connects: int = 0
    churns: int = 0
    unexpected_eof: int = 0
    half_close_timeouts: int = 0
    connect_failures: Counter[str] = field(default_factory=Counter)
    socket_errors: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the server started
    phase: str
    rss_kib: int
    fds: int
    cpu_s: float  # server utime + stime
    soak_cpu_s: float  # this process
    sent: int
    delivered: int
    recvs: int
    connections: int  # server: accepted - closed


def errname(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def sample(server: Server, phase: Phase, tally: Tally, started_at: float) -> Sample | None:
    """The server's figures now, from /proc; None when it is gone."""
    try:
        rss, fds, cpu = server.rss_kib(), server.fd_count(), server.cpu_seconds()
    except OSError:  # gone (or a zombie without /proc/PID/fd)
        return None
    return Sample(t=round(time.monotonic() - started_at, 3), phase=phase.value, rss_kib=rss,
                  fds=fds, cpu_s=cpu, soak_cpu_s=round(own_cpu(), 3), sent=tally.sent,
                  delivered=tally.delivered, recvs=tally.recvs,
                  connections=server.accepted - server.closed)


class Soak:
    def __init__(self, config: Config, logdir: Path) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.selector = selectors.DefaultSelector()
        n = config.clients
        stable = n if config.churn == 0 else max(2, min(n, round(n * config.stable)))
        self.clients = [Client(slot, slot < stable, slot < min(PROBES, stable))
                        for slot in range(n)]
        self.churning = [c for c in self.clients if not c.stable]
        self.frame = frame_struct(config.size)
        self.tail = frame_tail(config.size)
        self.interval = 1.0 / config.rate if config.rate > 0 else 0.0
        self.tally = Tally()
        self.latency_ns = array.array("q")
        self.phase = Phase.START
        self.schedule: list[tuple[float, int]] = []  # (due, slot): the next send of each client
        self.retries: list[tuple[float, int]] = []  # (when, slot): connects to make
        self.churn_credit = 0.0
        self.last_turn = time.monotonic()
        self.next_sample = 0.0
        self.samples: list[Sample] = []
        self.marks: dict[str, float] = {}  # phase boundaries, monotonic
        self.marked: dict[str, Sample] = {}  # the server's figures at those boundaries
        self.soak_cpu: dict[str, float] = {}  # this process's CPU seconds at those boundaries
        self.server = Server("soak", fsmchat("--port", "0", "--log-level", "info"), logdir,
                             read="all")
        self.started_at = time.monotonic()

    # -- the loop ---------------------------------------------------------------------------

    def run_until(self, done: Callable[[], bool], limit: float) -> bool:
        """Turn the loop until ``done()`` or ``limit`` seconds pass (or the server dies)."""
        deadline = time.monotonic() + limit
        while not done():
            now = time.monotonic()
            if now >= deadline or (self.server.eof.is_set() and self.phase is not Phase.STOP):
                return False
            self._turn(min(TURN, deadline - now, max(0.0, self._next_timer() - now)))
        return True

    def _next_timer(self) -> float:
        soonest = self.next_sample
        if self.schedule and self.phase is Phase.RUN:
            soonest = min(soonest, self.schedule[0][0])
        if self.retries:
            soonest = min(soonest, self.retries[0][0])
        return soonest

    def _turn(self, timeout: float) -> None:
        for key, mask in self.selector.select(timeout):
            target = key.data
            if not isinstance(target, Client):
                target()
                continue
            if mask & selectors.EVENT_READ and self._owns(target, key.fd):
                self._on_readable(target)
            if mask & selectors.EVENT_WRITE and self._owns(target, key.fd):
                self._on_writable(target)
        now = time.monotonic()
        if self.phase is Phase.RUN:
            self._send_due(now)
            self._churn(now)
        if self.retries and self.retries[0][0] <= now:
            self._retry(now)
        if now >= self.next_sample:
            self.next_sample = now + 1.0
            self._sample()
            self._check_half_closes(now)
        self.last_turn = now

    @staticmethod
    def _owns(client: Client, fd: int) -> bool:
        """The event is for the client's current socket, not one closed earlier in this batch."""
        return client.sock is not None and client.sock.fileno() == fd

    def _sample(self) -> None:
        found = sample(self.server, self.phase, self.tally, self.started_at)
        if found is not None:
            self.samples.append(found)

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic()
        self.soak_cpu[name] = own_cpu()
        found = sample(self.server, self.phase, self.tally, self.started_at)
        if found is not None:
            self.samples.append(found)
            self.marked[name] = found

    # -- connections ------------------------------------------------------------------------

    def _connect(self, client: Client) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex((HOST, self.server.port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._connect_failed(client, code)
            return
        client.sock = sock
        client.state = State.CONNECTING
        self.selector.register(sock, selectors.EVENT_WRITE, client)

    def _connected(self, client: Client) -> None:
        assert client.sock is not None
        code = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._drop(client)
            self._connect_failed(client, code)
            return
        client.state = State.OPEN
        client.sessions += 1
        self.tally.connects += 1
        first = -1 if client.intact and client.sessions == 1 else FRESH
        client.last = [first] * len(self.clients)
        self.selector.modify(client.sock, selectors.EVENT_READ, client)

    def _connect_failed(self, client: Client, code: int) -> None:
        self.tally.connect_failures[errname(code)] += 1
        client.intact = False
        heapq.heappush(self.retries, (time.monotonic() + RECONNECT_DELAY, client.slot))

    def _retry(self, now: float) -> None:
        while self.retries and self.retries[0][0] <= now:
            _, slot = heapq.heappop(self.retries)
            client = self.clients[slot]
            if client.state is State.IDLE and self.phase in (Phase.CONNECT, Phase.RUN):
                self._connect(client)

    def begin_close(self, client: Client, *, reconnect: bool) -> None:
        client.state = State.CLOSING
        client.reconnect = reconnect
        client.deadline = time.monotonic() + HALF_CLOSE_TIMEOUT
        client.shut = False
        if not client.out:
            self._shut(client)

    def _shut(self, client: Client) -> None:
        assert client.sock is not None
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._socket_error(client, "shutdown", exc)
            return
        client.shut = True

    def _drop(self, client: Client) -> None:
        """Forget the socket; the client is IDLE afterwards."""
        if client.sock is not None:
            self.selector.unregister(client.sock)
            client.sock.close()
        client.sock = None
        client.state = State.IDLE
        client.out.clear()
        client.pending = b""

    def _ended(self, client: Client, *, planned: bool) -> None:
        """A session is over; reconnect when planned, or when the run lost a client anyway."""
        reconnect = client.reconnect if planned else True
        if not planned:
            client.intact = False
        self._drop(client)
        if reconnect and self.phase is Phase.RUN:
            heapq.heappush(self.retries, (time.monotonic(), client.slot))

    def _socket_error(self, client: Client, op: str, exc: OSError) -> None:
        self.tally.socket_errors[f"{op}: {errname(exc.errno or 0)}"] += 1
        self._ended(client, planned=False)

    def _check_half_closes(self, now: float) -> None:
        for client in self.clients:
            if client.state is State.CLOSING and now > client.deadline:
                self.tally.half_close_timeouts += 1
                self._ended(client, planned=False)

    def _churn(self, now: float) -> None:
        if not self.churning or self.config.churn <= 0:
            return
        self.churn_credit += self.config.churn * len(self.clients) * (now - self.last_turn)
        while self.churn_credit >= 1:
            self.churn_credit -= 1
            for _ in range(20):
                client = self.rng.choice(self.churning)
                if client.state is State.OPEN:
                    self.tally.churns += 1
                    self.begin_close(client, reconnect=True)
                    break

    # -- I/O --------------------------------------------------------------------------------

    def _on_writable(self, client: Client) -> None:
        if client.state is State.CONNECTING:
            self._connected(client)
            return
        assert client.sock is not None
        if client.out:
            try:
                sent = client.sock.send(client.out)
            except BlockingIOError:
                return
            except OSError as exc:
                self._socket_error(client, "send", exc)
                return
            del client.out[:sent]
            self.tally.bytes_sent += sent
        if not client.out:
            self.selector.modify(client.sock, selectors.EVENT_READ, client)
            if client.state is State.CLOSING and not client.shut:
                self._shut(client)

    def _send_due(self, now: float) -> None:
        schedule, interval = self.schedule, self.interval
        while schedule and schedule[0][0] <= now:
            due, slot = schedule[0]
            client = self.clients[slot]
            if client.state is State.OPEN:
                if due < now - LATE:
                    self.tally.late_sends += 1
                self._send(client)
            following = due + interval
            heapq.heapreplace(schedule, (following if following > now else now + interval, slot))

    def _send(self, client: Client) -> None:
        sock = client.sock
        assert sock is not None
        frame = HEADER.pack(MAGIC, SOAK_STEP, client.slot, client.seq,
                            time.monotonic_ns()) + self.tail
        if client.out:
            client.out += frame
        else:
            try:
                sent = sock.send(frame)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._socket_error(client, "send", exc)
                return
            self.tally.bytes_sent += sent
            if sent < len(frame):
                client.out += frame[sent:]
                self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
        client.seq += 1
        self.tally.sent += 1

    def _on_readable(self, client: Client) -> None:
        assert client.sock is not None
        try:
            data = client.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._socket_error(client, "recv", exc)
            return
        if not data:
            planned = client.state is State.CLOSING
            if not planned:
                self.tally.unexpected_eof += 1
            self._ended(client, planned=planned)
            return
        self.tally.bytes_received += len(data)
        self.tally.recvs += 1
        self._absorb(client, client.pending + data if client.pending else data)

    def _absorb(self, client: Client, data: bytes) -> None:
        """Cut ``data`` into frames and check them; after a bad frame, resume at the next magic."""
        size = self.frame.size
        start = 0
        while True:
            end = start + (len(data) - start) // size * size
            bad = self._verify(client, memoryview(data)[start:end])
            if bad < 0:
                client.pending = data[end:]
                return
            self.tally.corrupt += 1
            start = data.find(MAGIC_BYTES, start + bad * size + 1)
            if start < 0:
                client.pending = b""
                return

    def _verify(self, client: Client, frames: memoryview) -> int:
        """Check whole frames; return the index of the first malformed one, or -1."""
        last, own, slots = client.last, client.slot, len(client.last)
        good = echoes = lost = duplicates = disordered = 0
        bad = -1
        for index, (magic, step, sender, seq, _, trailer) in enumerate(
                self.frame.iter_unpack(frames)):
            if magic != MAGIC or trailer != TRAILER or step != SOAK_STEP or sender >= slots:
                bad = index
                break
            if sender == own:
                echoes += 1
                continue
            good += 1
            previous = last[sender]
            if seq == previous + 1 or previous == FRESH:
                last[sender] = seq
            elif seq > previous:
                lost += seq - previous - 1
                last[sender] = seq
            elif seq == previous:
                duplicates += 1
            else:
                disordered += 1
        tally = self.tally
        tally.delivered += good
        client.received += good
        tally.echoes += echoes
        tally.duplicates += duplicates
        tally.out_of_order += disordered
        if client.intact:
            tally.stable_delivered += good
            tally.lost_stable += lost
        else:
            tally.lost_churning += lost
        if client.probe and bad < 0:
            now = time.monotonic_ns()
            self.latency_ns.extend(now - sent for *_, sent, _ in self.frame.iter_unpack(frames))
        return bad

    # -- phases -----------------------------------------------------------------------------

    def start_server(self) -> None:
        try:
            self.server.start(STARTUP_TIMEOUT)
        except RuntimeError as exc:
            raise SoakError(f"the server did not report server.started: {exc}") from None
        self.started_at = time.monotonic()
        started = self.server.started
        max_clients = int(started.get("max_clients", 0))
        if max_clients < len(self.clients):
            raise SoakError(f"the server takes {max_clients} clients, fewer than --clients")
        self.mark("server_started")

    def connect_all(self) -> None:
        self.phase = Phase.CONNECT
        for client in self.clients:
            self._connect(client)
        n = len(self.clients)
        if not self.run_until(lambda: self.server.accepted >= n and all(
                c.state is State.OPEN for c in self.clients), CONNECT_TIMEOUT):
            raise SoakError(f"only {self.server.accepted} of {n} clients were accepted")
        self.mark("connected")

    def chat(self) -> None:
        self.phase = Phase.RUN
        now = time.monotonic()
        if self.interval > 0:
            self.schedule = [(now + self.rng.uniform(0, self.interval), c.slot)
                             for c in self.clients]
            heapq.heapify(self.schedule)
        self.last_turn = now
        self.mark("run_start")
        end = now + self.config.seconds
        self.run_until(lambda: time.monotonic() >= end, self.config.seconds + 1)
        self.mark("run_end")

    def settle(self) -> bool:
        """Stop sending; wait for buffered output, churns in progress and every delivery."""
        self.phase = Phase.SETTLE
        done = self.run_until(self._settled, SETTLE_TIMEOUT)
        self.mark("settled")
        return done

    def _settled(self) -> bool:
        busy = (State.CONNECTING, State.CLOSING)
        if any(c.out or c.state in busy for c in self.clients):
            return False
        return self.tally.stable_delivered >= self._expected_stable()

    def _expected_stable(self) -> int:
        total = self.tally.sent
        return sum(total - c.seq for c in self.clients if c.intact)

    def close_all(self) -> bool:
        """Close every client gracefully; wait for the server to log every close."""
        self.phase = Phase.CLOSE
        for client in self.clients:
            if client.state is State.OPEN:
                self.begin_close(client, reconnect=False)
            elif client.state is State.CONNECTING:
                self._drop(client)
        done = self.run_until(lambda: self.server.closed >= self.server.accepted and all(
            c.state is State.IDLE for c in self.clients), CLOSE_TIMEOUT)
        self.mark("closed")
        return done

    def stop_server(self) -> int | None:
        self.phase = Phase.STOP
        return self.server.stop(EXIT_TIMEOUT)  # SIGKILL after that: not status 0

    def missing_tails(self) -> int:
        """Frames a stable receiver never got at the end of some sender's sequence."""
        missing = 0
        for receiver in self.clients:
            if not receiver.intact:
                continue
            last = receiver.last
            for sender in self.clients:
                if sender is not receiver and last[sender.slot] < sender.seq - 1:
                    missing += sender.seq - 1 - max(last[sender.slot], -1)
        return missing

    def cleanup(self) -> None:
        for client in self.clients:
            if client.sock is not None:
                self._drop(client)
        self.server.stop()
        self.selector.close()


class SoakError(Exception):
    """A phase could not finish: the report says which and why."""


# -- the report -----------------------------------------------------------------------------


def slope_kib_per_min(samples: list[Sample]) -> float:
    """Least-squares slope of RSS over time: steady growth shows here."""
    if len(samples) < 3:
        return 0.0
    ts = [s.t for s in samples]
    mean_t = sum(ts) / len(ts)
    mean_r = sum(s.rss_kib for s in samples) / len(samples)
    var = sum((t - mean_t) ** 2 for t in ts)
    cov = sum((s.t - mean_t) * (s.rss_kib - mean_r) for s in samples)
    return cov / var * 60 if var else 0.0


def build_report(soak: Soak, exit_status: int | None, failure: str | None,
                 settled: bool, closed: bool) -> dict[str, Any]:
    config, tally, server, marks = soak.config, soak.tally, soak.server, soak.marks
    run_s = marks.get("run_end", 0.0) - marks.get("run_start", 0.0)
    load_s = marks.get("settled", 0.0) - marks.get("run_start", 0.0)
    tails = soak.missing_tails() if "settled" in marks else 0
    lost_stable = tally.lost_stable + tails
    checks = {
        "lost_to_stable_receivers": lost_stable,
        "lost_mid_session_churning_receivers": tally.lost_churning,
        "duplicates": tally.duplicates,
        "out_of_order": tally.out_of_order,
        "echoes": tally.echoes,
        "corrupt_frames": tally.corrupt,
    }
    samples, marked, soak_cpu = soak.samples, soak.marked, soak.soak_cpu
    run = [s for s in samples if s.phase == Phase.RUN.value]
    first, end = marked.get("server_started"), marked.get("closed")
    server_cpu_run = (marked["run_end"].cpu_s - marked["run_start"].cpu_s
                      if "run_end" in marked and "run_start" in marked else 0.0)
    soak_cpu_run = (soak_cpu["run_end"] - soak_cpu["run_start"]
                    if "run_end" in soak_cpu else 0.0)
    before_stop = [s for s in samples if s.phase != Phase.STOP.value]
    fds_start = first.fds if first else None
    fds_end = end.fds if end else None
    stopped = server.stopped or {}
    latencies = np.frombuffer(soak.latency_ns, dtype=np.int64)
    hist = histogram() + buckets(latencies) if len(latencies) else histogram()
    stable = sum(c.stable for c in soak.clients)
    intact = sum(c.intact for c in soak.clients)
    report: dict[str, Any] = {
        "config": asdict(config),
        "failure": failure,
        "duration_s": round(run_s, 3),
        "load_s": round(load_s, 3),
        "clients": {"total": config.clients, "stable": stable, "stable_intact": intact,
                    "churning": config.clients - stable},
        "messages_sent": tally.sent,
        "send_rate_per_s": round(tally.sent / run_s, 1) if run_s else 0.0,
        "target_send_rate_per_s": config.rate * config.clients,
        "late_sends": tally.late_sends,
        "messages_delivered": tally.delivered,
        "deliveries_per_s": round(tally.delivered / load_s, 1) if load_s > 0 else 0.0,
        "frames_per_recv": round(tally.delivered / tally.recvs, 2) if tally.recvs else 0.0,
        "latency_ms": {"samples": len(latencies), "p50": percentile_ns(hist, 50) / 1e6,
                       "p90": percentile_ns(hist, 90) / 1e6, "p99": percentile_ns(hist, 99) / 1e6,
                       "max": int(latencies.max()) / 1e6 if len(latencies) else 0.0},
        "verification": {**checks, "settled": settled,
                         "stable_pairs_checked": intact * (config.clients - 1),
                         "passed": settled and not any(checks.values())},
        "client_sessions": tally.connects, "churn_reconnects": tally.churns,
        "unexpected_eof": tally.unexpected_eof, "half_close_timeouts": tally.half_close_timeouts,
        "connect_failures": dict(tally.connect_failures),
        "client_socket_errors": dict(tally.socket_errors),
        "connections_opened": server.accepted, "connections_closed": server.closed,
        "closed_by_reason": dict(server.reasons),
        "warnings_errors": dict(server.problems),
        "warning_error_samples": server.problem_lines,
        "events": dict(server.events),
        "bytes": {"clients_sent": tally.bytes_sent, "server_in": stopped.get("bytes_in"),
                  "clients_received": tally.bytes_received,
                  "server_out": stopped.get("bytes_out")},
        "rss_kib": {"start": first.rss_kib if first else None,
                    "peak": max((s.rss_kib for s in before_stop), default=0),
                    "final": end.rss_kib if end else None,
                    "run_slope_kib_per_min": round(slope_kib_per_min(run), 1)},
        "fds": {"start": fds_start, "peak": max((s.fds for s in before_stop), default=0),
                "end": fds_end, "all_closed": closed},
        "server_cpu": {"run_s": round(server_cpu_run, 2),
                       "run_pct_of_core": round(server_cpu_run / run_s * 100, 1) if run_s else 0,
                       "total_s": round(samples[-1].cpu_s, 2) if samples else 0.0},
        "soak_cpu": {"run_s": round(soak_cpu_run, 2),
                     "run_pct_of_core": round(soak_cpu_run / run_s * 100, 1) if run_s else 0},
        "server_exit_status": exit_status,
        "server_stderr": server.stderr_text(),
        "server_bad_lines": server.bad_lines[:20],
        "samples": [asdict(s) for s in samples],
    }
    report["passed"] = (failure is None and report["verification"]["passed"] and closed
                        and exit_status == 0 and fds_end is not None and fds_end == fds_start
                        and not server.problems
                        and stopped.get("bytes_in") == tally.bytes_sent
                        and stopped.get("bytes_out") == tally.bytes_received)
    return report


def mib(kib: int | None) -> str:
    return "?" if kib is None else f"{kib / 1024:.1f}"


def counter_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def table(report: dict[str, Any]) -> list[tuple[str, str]]:
    c, v, lat, b = report["config"], report["verification"], report["latency_ms"], report["bytes"]
    rss, fds, cpu = report["rss_kib"], report["fds"], report["server_cpu"]
    soak_cpu, clients = report["soak_cpu"], report["clients"]
    return [
        ("duration (sending)", f"{report['duration_s']:.1f} s (+ settle: load "
                               f"{report['load_s']:.1f} s)"),
        ("clients", f"{clients['total']} ({clients['stable']} stable, "
                    f"{clients['churning']} churning)"),
        ("rate / churn / size", f"{c['rate']} msg/s per client, {c['churn']} of clients/s, "
                                f"{c['size']} B"),
        ("messages sent", f"{report['messages_sent']} ({report['send_rate_per_s']}/s, target "
                          f"{report['target_send_rate_per_s']:g}/s; late {report['late_sends']})"),
        ("messages delivered", f"{report['messages_delivered']}"),
        ("deliveries per second", f"{report['deliveries_per_s']} ({report['frames_per_recv']} "
                                  "frames per client recv)"),
        ("latency (probes)", f"p50 {lat['p50']:.2f} ms, p90 {lat['p90']:.2f} ms, p99 "
                             f"{lat['p99']:.2f} ms, max {lat['max']:.2f} ms "
                             f"({lat['samples']} frames)"),
        ("verification", ("PASS" if v["passed"] else "FAIL")
         + f" ({v['stable_pairs_checked']} stable receiver x sender pairs"
         + ("" if v["settled"] else "; deliveries did not settle") + ")"),
        ("  lost (stable / churning)", f"{v['lost_to_stable_receivers']} / "
                                       f"{v['lost_mid_session_churning_receivers']}"),
        ("  duplicates / out of order", f"{v['duplicates']} / {v['out_of_order']}"),
        ("  echoes / corrupt frames", f"{v['echoes']} / {v['corrupt_frames']}"),
        ("client sessions", f"{report['client_sessions']} (churn reconnects "
                            f"{report['churn_reconnects']}, unexpected EOF "
                            f"{report['unexpected_eof']}, socket errors "
                            f"{counter_text(report['client_socket_errors'])})"),
        ("connections opened / closed", f"{report['connections_opened']} / "
                                        f"{report['connections_closed']}"),
        ("closed by reason", counter_text(report["closed_by_reason"])),
        ("warnings / errors", counter_text(report["warnings_errors"])),
        ("bytes in: clients / server", f"{b['clients_sent']} / {b['server_in']}"),
        ("bytes out: server / clients", f"{b['server_out']} / {b['clients_received']}"),
        ("RSS start / peak / final", f"{mib(rss['start'])} / {mib(rss['peak'])} / "
                                     f"{mib(rss['final'])} MiB (slope while sending "
                                     f"{rss['run_slope_kib_per_min']} KiB/min)"),
        ("open fds start / peak / end", f"{fds['start']} / {fds['peak']} / {fds['end']}"),
        ("server CPU", f"{cpu['run_s']} s while sending = {cpu['run_pct_of_core']}% of one core "
                       f"(total {cpu['total_s']} s)"),
        ("soak (client) CPU", f"{soak_cpu['run_s']} s = {soak_cpu['run_pct_of_core']}% of one "
                              "core"),
        ("server exit status", str(report["server_exit_status"])),
        ("result", ("PASS" if report["passed"] else "FAIL")
         + (f": {report['failure']}" if report["failure"] else "")),
    ]


def tables_and_notes(report: dict[str, Any]) -> tuple[list[Table], list[str]]:
    out = Table("fsmchat soak", ["figure", "value"])
    for name, value in table(report):
        out.add(name, value)
    notes = [f"! {line}" for line in report["warning_error_samples"][:5]]
    if report["server_stderr"]:
        notes.append("server stderr:\n    "
                     + report["server_stderr"].rstrip().replace("\n", "\n    "))
    return [out], notes


# -- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(description="Soak test for fsmchat (see the docstring).")
    parser.add_argument("--clients", type=int, default=500, help="clients (default 500)")
    parser.add_argument("--seconds", type=float, default=120.0,
                        help="how long the clients chat (default 120)")
    parser.add_argument("--rate", type=float, default=2.0,
                        help="messages per second per client (default 2)")
    parser.add_argument("--churn", type=float, default=0.02,
                        help="fraction of all clients that disconnect and reconnect per second "
                             "(default 0.02)")
    parser.add_argument("--size", type=int, default=64, help="bytes per message (default 64)")
    parser.add_argument("--stable", type=float, default=0.5,
                        help="fraction of clients that never disconnect (default 0.5)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--json", type=Path, metavar="PATH",
                        help="also write the result (the report as JSON) to PATH")
    add_options(parser)
    ns = parser.parse_args(argv)
    if not 2 <= ns.clients <= 1008:
        parser.error("--clients must be from 2 to 1008 (what select() in the server allows)")
    if not 0 < ns.seconds <= 24 * 3600:
        parser.error("--seconds must be more than 0 and at most a day")
    if not 0 <= ns.rate <= 1000 or not 0 <= ns.churn <= 1 or not 0 < ns.stable <= 1:
        parser.error("--rate must be 0..1000, --churn 0..1, --stable more than 0, at most 1")
    if not MIN_SIZE <= ns.size <= 65536:
        parser.error(f"--size must be from {MIN_SIZE} to 65536")
    return Config(clients=ns.clients, seconds=ns.seconds, rate=ns.rate, churn=ns.churn,
                  size=ns.size, stable=ns.stable, seed=ns.seed,
                  json=str(ns.json) if ns.json else None), ns


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    config, ns = parse_args(args_list)
    session = Session("soak", ns, args_list)
    need = max(config.clients + 64, 1024)
    if session.nofile < need:
        usage_error("soak", f"RLIMIT_NOFILE is {session.nofile}; {need} are needed")
    say(f"logs: {session.logdir}")
    soak = Soak(config, session.logdir)
    failure: str | None = None
    settled = closed = False
    exit_status: int | None = None
    try:
        soak.start_server()
        soak.connect_all()
        soak.chat()
        settled = soak.settle()
        closed = soak.close_all()
        exit_status = soak.stop_server()
    except SoakError as exc:
        failure = str(exc)
    except KeyboardInterrupt:
        failure = "interrupted"
    finally:
        soak.cleanup()
    report = build_report(soak, exit_status, failure, settled, closed)
    tables, notes = tables_and_notes(report)
    session.finish(tables, notes, report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
