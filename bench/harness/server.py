"""One server process of the bench: started, read, measured and stopped the same way by all.

A server runs in its own session (so SIGTERM reaches the group, and Ctrl-C in the terminal does
not), stdin closed, stderr to ``LOGDIR/NAME.stderr.log``. It is started when ``server.started``
appears on its stdout (fsmchat: the port is read from it) or, for a peer that prints nothing,
when its port accepts a connection. A thread reads stdout all the time, as fast as it comes, so
the server never blocks on a full pipe; what it parses is a choice, since parsing the debug
stream would take a core from the server under test:

- ``"problems"``: the lines until the start, and only batches with a warning or an error after;
- ``"all"``: every event (``--log-level info``: a few lines per connection, not per message);
- ``"no-debug"``: every event but the debug ones (``data.received``, ``data.sent``).

From what it parses it keeps the counts a suite asks about: events by name, the warnings and
errors, ``connection.accepted`` and ``connection.closed`` (by reason), the Redis links
connected, ``log.dropped``, and the ``server.started`` and ``server.stopped`` events themselves.
``stop`` sends SIGTERM, then SIGKILL after ``timeout``; every server still live is stopped by
``stop_all`` on the way out. ``raise_nofile`` raises the descriptor limit, which children
inherit.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Literal

from harness.checkout import current
from harness.procfs import Proc

HOST = "127.0.0.1"
KEEP_PROBLEMS = 20  # warning/error lines kept verbatim
Read = Literal["problems", "all", "no-debug"]


def raise_nofile(want: int = 65536) -> int:
    """Raise this process's descriptor limit (children inherit it); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def fsmchat(*args: str) -> list[str]:
    """An fsmchat server on 127.0.0.1 of the checkout measured; every client of the bench comes
    from one address, so the per-address limit is off."""
    return current().argv("--host", HOST, "--max-clients-per-addr", "0", *args)


class Server(Proc):
    """One server process; ``argv`` is its command, given the port when ``fixed_port`` (the
    bench picks it: the server prints no ``server.started``)."""

    def __init__(self, name: str, argv: list[str] | Callable[[int], list[str]], logdir: Path,
                 *, fixed_port: bool = False, read: Read = "problems",
                 keep_stdout: bool = False) -> None:
        super().__init__(0)
        self.name = name
        self.argv = argv
        self.logdir = logdir
        self.fixed_port = fixed_port
        self.read = read
        self.keep_stdout = keep_stdout  # also write stdout to LOGDIR/NAME.stdout.jsonl
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.ready = threading.Event()
        self.eof = threading.Event()  # stdout closed: the server is gone or going
        self.reader: threading.Thread | None = None
        self.stdout_bytes = 0
        self.started: dict[str, Any] = {}  # the server.started event
        self.stopped: dict[str, Any] = {}  # the server.stopped event
        self.events: Counter[str] = Counter()  # every event parsed, by name
        self.problems: Counter[str] = Counter()  # warning/error events by name
        self.problem_lines: list[str] = []  # the first few of them
        self.bad_lines: list[str] = []  # lines that are not JSON objects (the first few)
        self.accepted = 0
        self.closed = 0
        self.reasons: Counter[str] = Counter()  # connection.closed by reason
        self.secured: Counter[str] = Counter()  # connection.secured by "version cipher"
        self.links: set[str] = set()  # Redis links that logged redis.connected
        self.dropped = 0  # events the server said it dropped (log.dropped)
        self.stderr_path = logdir / f"{name}.stderr.log"
        self._stderr: IO[bytes] | None = None
        self._stdout_log: IO[bytes] | None = None

    # -- the process -----------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        port = free_port() if self.fixed_port else 0
        argv = self.argv(port) if callable(self.argv) else self.argv
        self._stderr = self.stderr_path.open("ab")
        if self.keep_stdout:
            self._stdout_log = (self.logdir / f"{self.name}.stdout.jsonl").open("ab")
        checkout = current()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._stderr, cwd=checkout.root, env=checkout.env(),
                                     start_new_session=True)
        self.pid = self.proc.pid
        LIVE.add(self)
        self.reader = threading.Thread(target=self._read_stdout, daemon=True,
                                       name=f"stdout-{self.name}")
        self.reader.start()
        deadline = time.monotonic() + timeout
        if self.fixed_port:
            self.port = port
            for _ in range(int(timeout / 0.05) + 1):
                if time.monotonic() > deadline or not self.alive():
                    break
                with contextlib.suppress(OSError), socket.create_connection((HOST, port), 1.0):
                    self.ready.set()
                    break
                time.sleep(0.05)
        else:
            self.ready.wait(timeout)
        if not self.ready.is_set() or not self.alive():
            raise RuntimeError(f"{self.name} did not start (see {self.stderr_path})")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def exit_status(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

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

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM (SIGKILL after ``timeout``); the exit status."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
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
        for stream in (self._stderr, self._stdout_log):
            if stream is not None:
                stream.close()
        self._stderr = self._stdout_log = None
        LIVE.discard(self)
        return self.exit_status

    def stderr_text(self, limit: int = 64 * 1024) -> str:
        try:
            return self.stderr_path.read_bytes()[:limit].decode(errors="replace")
        except OSError:
            return ""

    # -- its stdout ------------------------------------------------------------------------------

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        tail = b""
        try:
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
                if self.read != "problems" or not self.ready.is_set() or \
                        b'"level":"warning"' in lines or b'"level":"error"' in lines:
                    self._scan(lines)
        finally:
            self.eof.set()

    def _scan(self, lines: bytes) -> None:
        skip_debug = self.read == "no-debug"
        for raw in lines.splitlines():
            if skip_debug and b'"level":"debug"' in raw[:64]:
                continue
            try:
                event = json.loads(raw)
            except ValueError:
                event = None
            if isinstance(event, dict):
                self._event(event, raw)
            elif raw.strip() and len(self.bad_lines) < KEEP_PROBLEMS:
                self.bad_lines.append(raw[:200].decode(errors="replace"))

    def _event(self, event: dict[str, Any], raw: bytes) -> None:
        name = str(event.get("event"))
        self.events[name] += 1
        if name == "connection.accepted":
            self.accepted += 1
        elif name == "connection.closed":
            self.closed += 1
            self.reasons[str(event.get("reason"))] += 1
        elif name == "connection.secured":
            self.secured[f"{event.get('version')} {event.get('cipher')}"] += 1
        elif name == "redis.connected":
            self.links.add(str(event.get("link")))
        elif name == "log.dropped":
            self.dropped += int(event.get("count", 0))
        elif name == "server.stopped":
            self.stopped = event
        elif name == "server.started" and not self.ready.is_set():
            self.started = event
            self.port = int(event["port"])
            self.ready.set()
        if event.get("level") in ("warning", "error", "critical"):
            self.problems[name] += 1
            if len(self.problem_lines) < KEEP_PROBLEMS:
                self.problem_lines.append(raw.decode(errors="replace"))

    def totals(self) -> dict[str, Any]:
        """The ``server.stopped`` figures, without the event's own fields."""
        return {k: v for k, v in self.stopped.items() if k not in ("timestamp", "level", "event")}


LIVE: set[Server] = set()


def stop_all() -> None:
    for server in list(LIVE):
        server.stop()
