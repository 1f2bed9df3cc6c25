"""Soak test: a real fsmchat server, hundreds of chatting and churning clients, one report.

Run it from the repository, with the interpreter the package is installed in (the soak starts
the server itself, as ``sys.executable -m fsmchat --port 0 --host 127.0.0.1 --log-level info``):

    .venv/bin/python bench/soak.py --clients 50 --seconds 10      # a quick check
    .venv/bin/python bench/soak.py                                # 500 clients for 120 s
    .venv/bin/python bench/soak.py --json soak.json               # the report as JSON as well

Options: ``--clients N`` (500), ``--seconds S`` (120), ``--rate R`` messages per second per
client (2), ``--churn F`` fraction of all clients that disconnect and reconnect per second
(0.02), ``--size B`` bytes per message (64), ``--stable F`` fraction of clients that never
disconnect (0.5; all of them when ``--churn 0``), ``--seed N``, ``--json PATH``.

Phases, each bounded by a timeout: start the server and read its port from ``server.started``;
connect every client and wait for as many ``connection.accepted`` events; chat (and churn) for
``--seconds``; stop sending and wait until everything sent has been delivered; close every client
(half-close, read to EOF, close) and wait for a ``connection.closed`` per accepted connection;
count the server's descriptors; send SIGTERM and expect exit status 0.

Messages are frames of exactly ``--size`` bytes: ``b"FSMC"``, the sender's slot (u32), its
sequence number (u32, counted across all of the slot's connections), the send time (u64 ns on
the soak's monotonic clock), padding ending in a newline. A receiver cuts its byte stream into
frames itself, since the server's recv may join several frames and TCP may split them.

Verification: no client receives its own frame (echo); within one connection, the frames from
each sender arrive with consecutive sequence numbers, so a gap is a loss, a repeat a duplicate
and a step back out of order; and every *stable* client (connected from before the first message
to after the last delivery) receives every frame every other client sent, exactly once and in
order. Churning clients close gracefully (shutdown, read to EOF), so everything they sent reaches
the server. The server's ``server.stopped`` byte totals are checked against the clients' own.

Every second the server's RSS (VmRSS), open descriptors and CPU time are sampled from /proc.
All the clients run in this one process, in a single-threaded non-blocking ``selectors`` loop.
Only loopback addresses are used. Exit status: 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import array
import enum
import errno
import heapq
import json
import os
import random
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
MAGIC = b"FSMC"
HEADER = struct.Struct("<4sIIQ")  # magic, sender slot, sequence number, send time (ns)
MIN_SIZE = HEADER.size + 1
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
KEEP_PROBLEMS = 20  # warning/error events kept verbatim for the report
KEEP_STDERR = 64 * 1024


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


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_fd_limit(need: int) -> int:
    """Soft RLIMIT_NOFILE up to the hard limit: the clients need it, and the server inherits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft == resource.RLIM_INFINITY or soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < max(need, 1024):
        sys.exit(f"soak: RLIMIT_NOFILE is {soft} (hard {hard}); {max(need, 1024)} are needed")
    return int(soft)


class Server:
    """The fsmchat process: its event stream (read without blocking) and /proc figures."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.selector = selector
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fsmchat", "--port", "0", "--host", HOST,
             "--log-level", "info", "--max-clients-per-addr", "0"],  # all from one address
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.out_fd = self.proc.stdout.fileno()
        self.err_fd = self.proc.stderr.fileno()
        for fd, reader in ((self.out_fd, self._read_stdout), (self.err_fd, self._read_stderr)):
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ, reader)
        self.started_at = time.monotonic()
        self.tick = os.sysconf("SC_CLK_TCK")
        self.buffer = bytearray()
        self.stdout_eof = False
        self.stderr = bytearray()
        self.started: dict[str, Any] | None = None
        self.stopped: dict[str, Any] | None = None
        self.events: Counter[str] = Counter()
        self.problems: Counter[str] = Counter()  # event names at level warning or error
        self.problem_samples: list[dict[str, Any]] = []
        self.reasons: Counter[str] = Counter()  # connection.closed by reason
        self.bad_lines: list[str] = []
        self.accepted = 0
        self.closed = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        assert self.started is not None
        return int(self.started["port"])

    def _read_stdout(self) -> None:
        try:
            chunk = os.read(self.out_fd, 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            self.stdout_eof = True
            self.selector.unregister(self.out_fd)
            return
        self.buffer += chunk
        *lines, rest = self.buffer.split(b"\n")
        self.buffer = bytearray(rest)
        for line in lines:
            self._event(bytes(line))

    def _read_stderr(self) -> None:
        try:
            chunk = os.read(self.err_fd, 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            self.selector.unregister(self.err_fd)
            return
        self.stderr += chunk[: max(0, KEEP_STDERR - len(self.stderr))]

    def _event(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            self.bad_lines.append(line.decode(errors="replace")[:200])
            return
        name, level = str(event.get("event")), str(event.get("level"))
        self.events[name] += 1
        if level in ("warning", "error", "critical"):
            self.problems[name] += 1
            if len(self.problem_samples) < KEEP_PROBLEMS:
                self.problem_samples.append(event)
        if name == "connection.accepted":
            self.accepted += 1
        elif name == "connection.closed":
            self.closed += 1
            self.reasons[str(event.get("reason"))] += 1
        elif name == "server.started":
            self.started = event
        elif name == "server.stopped":
            self.stopped = event

    def running(self) -> bool:
        return self.proc.poll() is None

    def sample(self, phase: Phase, tally: Tally) -> Sample | None:
        proc = Path("/proc", str(self.pid))
        try:
            status = (proc / "status").read_text()
            fds = len(os.listdir(proc / "fd"))
            stat = (proc / "stat").read_text()
        except OSError:  # gone (or a zombie without /proc/PID/fd)
            return None
        rss = next((int(line.split()[1]) for line in status.splitlines()
                    if line.startswith("VmRSS:")), 0)
        fields = stat.rsplit(")", 1)[1].split()  # fields from 3 (state) on; 14, 15: utime, stime
        cpu = (int(fields[11]) + int(fields[12])) / self.tick
        return Sample(t=round(time.monotonic() - self.started_at, 3), phase=phase.value,
                      rss_kib=rss, fds=fds, cpu_s=cpu, soak_cpu_s=round(cpu_self(), 3),
                      sent=tally.sent, delivered=tally.delivered, recvs=tally.recvs,
                      connections=self.accepted - self.closed)

    def stop(self) -> None:
        if self.running():
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Last resort, on the way out after a failure: never leave the server behind."""
        if self.running():
            self.proc.kill()
        self.proc.wait(timeout=10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


class Soak:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.selector = selectors.DefaultSelector()
        n = config.clients
        stable = n if config.churn == 0 else max(2, min(n, round(n * config.stable)))
        self.clients = [Client(slot, slot < stable, slot < min(PROBES, stable))
                        for slot in range(n)]
        self.churning = [c for c in self.clients if not c.stable]
        self.frame = struct.Struct(f"<4sIIQ{config.size - HEADER.size}x")
        self.padding = b"-" * (config.size - HEADER.size - 1) + b"\n"
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
        self.server = Server(self.selector)

    # -- the loop ---------------------------------------------------------------------------

    def run_until(self, done: Callable[[], bool], limit: float) -> bool:
        """Turn the loop until ``done()`` or ``limit`` seconds pass (or the server dies)."""
        deadline = time.monotonic() + limit
        while not done():
            now = time.monotonic()
            if now >= deadline or (self.server.stdout_eof and self.phase is not Phase.STOP):
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
        sample = self.server.sample(self.phase, self.tally)
        if sample is not None:
            self.samples.append(sample)

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic()
        self.soak_cpu[name] = cpu_self()
        sample = self.server.sample(self.phase, self.tally)
        if sample is not None:
            self.samples.append(sample)
            self.marked[name] = sample

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
        frame = HEADER.pack(MAGIC, client.slot, client.seq, time.monotonic_ns()) + self.padding
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
            start = data.find(MAGIC, start + bad * size + 1)
            if start < 0:
                client.pending = b""
                return

    def _verify(self, client: Client, frames: memoryview) -> int:
        """Check whole frames; return the index of the first malformed one, or -1."""
        last, own, slots = client.last, client.slot, len(client.last)
        good = echoes = lost = duplicates = disordered = 0
        bad = -1
        for index, (magic, sender, seq, _) in enumerate(self.frame.iter_unpack(frames)):
            if magic != MAGIC or sender >= slots:
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
            self.latency_ns.extend(now - sent for *_, sent in self.frame.iter_unpack(frames))
        return bad

    # -- phases -----------------------------------------------------------------------------

    def start_server(self) -> None:
        if not self.run_until(lambda: self.server.started is not None, STARTUP_TIMEOUT):
            raise SoakError("the server did not report server.started")
        started = self.server.started or {}
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
        self.server.stop()
        self.run_until(lambda: self.server.stdout_eof, EXIT_TIMEOUT)
        try:
            return self.server.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

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
        self.server.kill()
        self.selector.close()


class SoakError(Exception):
    """A phase could not finish: the report says which and why."""


# -- the report -----------------------------------------------------------------------------


def percentile(ordered: list[int], fraction: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1e6


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
    latencies = sorted(soak.latency_ns)
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
        "latency_ms": {"samples": len(latencies), "p50": percentile(latencies, 0.5),
                       "p90": percentile(latencies, 0.9), "p99": percentile(latencies, 0.99),
                       "max": latencies[-1] / 1e6 if latencies else 0.0},
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
        "warning_error_samples": server.problem_samples,
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
        "server_stderr": server.stderr.decode(errors="replace"),
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


def print_report(report: dict[str, Any]) -> None:
    rows = table(report)
    width = max(len(name) for name, _ in rows)
    print(f"\nfsmchat soak ({' '.join(sys.argv[1:]) or 'defaults'})")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for event in report["warning_error_samples"][:5]:
        print(f"  ! {json.dumps(event)}")
    if report["server_stderr"]:
        print("  server stderr:\n    " + report["server_stderr"].rstrip().replace("\n", "\n    "))


# -- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> Config:
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
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON to PATH")
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
                  size=ns.size, stable=ns.stable, seed=ns.seed, json=ns.json)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    raise_fd_limit(config.clients + 64)
    soak = Soak(config)
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
    print_report(report)
    if config.json:
        Path(config.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
