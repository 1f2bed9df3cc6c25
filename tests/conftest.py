"""Black-box harness for fsmchat: a real server process and real TCP clients.

The server is started as ``python -m fsmchat --port 0 --host 127.0.0.1`` and its
stdout (one structlog JSON object per line) is read by a background thread of
the *test* process into a list guarded by a :class:`threading.Condition`.
Tests wait on that list instead of sleeping.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import IO, Any

import pytest

Event = dict[str, Any]

HOST = "127.0.0.1"
#: Upper bound for any single wait on the server (events, bytes, exit).
WAIT = 10.0
#: Hard per-test guard (SIGALRM in the test process's main thread).
TEST_TIMEOUT = 60.0
#: How long a "nothing arrives" read waits; only used after a positive proof.
QUIET = 0.25


class TestTimeoutError(Exception):
    """Raised in the main thread when a test exceeds TEST_TIMEOUT."""


@pytest.fixture(autouse=True)
def _per_test_timeout() -> Iterator[None]:
    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise TestTimeoutError(f"test exceeded {TEST_TIMEOUT:.0f}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------
# Server process
# --------------------------------------------------------------------------


def server_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fsmchat", *args]


PYCACHE = tempfile.mkdtemp(prefix="fsmchat-tests-pycache-")
"""Where the servers the tests start keep their compiled modules, for this run only: a machine
that writes no bytecode (PYTHONDONTWRITEBYTECODE) would have each of them compile every module
again, most of its start-up, as an installed server never does."""


@pytest.fixture(scope="session", autouse=True)
def _pycache() -> Iterator[None]:
    yield
    shutil.rmtree(PYCACHE, ignore_errors=True)


def server_env() -> dict[str, str]:
    """The environment for the server: inherited, minus output-buffering crutches.

    The server must flush its own log lines; we do not set PYTHONUNBUFFERED.
    """
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = PYCACHE
    return env


def run_cli(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run the server command to completion (for argument / startup errors)."""
    return subprocess.run(
        server_command(*args),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=server_env(),
        check=False,
    )


def usage_error(result: subprocess.CompletedProcess[str], option: str) -> str:
    """A usage error: exit status 2, no stdout, one stderr line naming ``option``, no traceback.

    Returns that line, for checks of its wording.
    """
    assert result.returncode == 2, result
    assert result.stdout == "", result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {lines!r}"
    assert option in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def free_port() -> int:
    """A port that was free a moment ago (for tests that cannot read server.started)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def peer_of(sock: socket.socket) -> str:
    """How the server names this client: "ip:port" of the client's local address."""
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


@dataclass
class Client:
    """A connected client and the server's view of it."""

    sock: socket.socket
    fd: int
    peer: str
    #: Index of this connection's ``connection.accepted`` event in the log.
    accepted_index: int


class LineReader:
    """Reads a process's output stream in a thread into a list of lines, under a Condition.

    ``on_line`` (optional) sees every line as it is added, with ``cond`` held: owners keep
    their own views of the output (guarded by the same ``cond``) in step with ``lines``.
    """

    def __init__(self, stream: IO[bytes], on_line: Callable[[str], None] | None = None) -> None:
        self.cond = threading.Condition()
        #: Every line so far, decoded, without its line ending.
        self.lines: list[str] = []
        #: The stream has ended: no more lines will come.
        self.eof = False
        self._on_line = on_line
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            with self.cond:
                self.lines.append(line)
                if self._on_line is not None:
                    self._on_line(line)
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def join(self, timeout: float = WAIT) -> None:
        self._thread.join(timeout)

    def tail(self, count: int) -> list[str]:
        with self.cond:
            return self.lines[-count:]

    def wait_until(
        self, ready: Callable[[], bool], timeout: float, failure: Callable[[bool], str]
    ) -> None:
        """Wait (``cond`` held) until ``ready()`` holds; it is checked again after every line.

        Otherwise an AssertionError with the message ``failure(ended)``: ``ended`` is True when
        the stream ended first, False when ``timeout`` ran out.
        """
        deadline = time.monotonic() + timeout
        with self.cond:
            while not ready():
                if self.eof:
                    raise AssertionError(failure(True))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(failure(False))
                self.cond.wait(remaining)

    def wait_line(
        self,
        predicate: Callable[[str], bool],
        timeout: float = WAIT,
        failure: Callable[[bool], str] | None = None,
    ) -> str:
        """The first line (old or new) for which ``predicate`` holds; see wait_until."""
        seen = 0
        found: list[str] = []

        def ready() -> bool:
            nonlocal seen
            while seen < len(self.lines):
                line = self.lines[seen]
                seen += 1
                if predicate(line):
                    found.append(line)
                    return True
            return False

        def default_failure(ended: bool) -> str:
            why = "the output ended" if ended else f"timed out after {timeout}s"
            return f"{why} before the line:\n" + "\n".join(self.lines[-20:])

        self.wait_until(ready, timeout, failure or default_failure)
        return found[0]


class ServerProcess:
    """A running ``python -m fsmchat`` plus threads that collect its output."""

    def __init__(self, args: Sequence[str], prefix: Sequence[str] = ()) -> None:
        """``prefix`` goes before the command, e.g. ``ip netns exec NS`` (it must exec, not fork:
        the PID is the server's)."""
        self.args = list(args)
        self.proc = subprocess.Popen(
            [*prefix, *server_command(*args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=server_env(),
        )
        self._events: list[Event] = []
        #: For each raw stdout line, the index into _events (None if not JSON).
        self._line_event: list[int | None] = []
        self._bad_lines: list[str] = []
        self._stderr = bytearray()
        self._clients: list[socket.socket] = []
        self._port: int | None = None
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._stdout = LineReader(self.proc.stdout, self._add_line)
        #: Guards the stdout views (lines, events, bad lines) and the stderr bytes.
        self._cond = self._stdout.cond
        self._err_thread = threading.Thread(
            target=self._read_stderr, args=(self.proc.stderr,), daemon=True
        )
        self._err_thread.start()

    # ---- output collection (background threads) -------------------------

    def _add_line(self, line: str) -> None:
        """Each stdout line, in the reader thread with ``_cond`` held: an event or a bad line."""
        parsed: Any
        try:
            parsed = json.loads(line)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            self._line_event.append(len(self._events))
            self._events.append(parsed)
        else:
            self._line_event.append(None)
            self._bad_lines.append(line)

    def _read_stderr(self, stream: IO[bytes]) -> None:
        while chunk := os.read(stream.fileno(), 65536):
            with self._cond:
                self._stderr += chunk

    # ---- accessors --------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        if self._port is None:
            self._port = int(self.wait_for(lambda e: e.get("event") == "server.started")["port"])
        return self._port

    @port.setter
    def port(self, value: int) -> None:
        self._port = value

    def events(self, name: str | None = None) -> list[Event]:
        with self._cond:
            return [e for e in self._events if name is None or e.get("event") == name]

    def lines(self) -> list[str]:
        with self._cond:
            return list(self._stdout.lines)

    def bad_lines(self) -> list[str]:
        """Stdout lines that were not a JSON object."""
        with self._cond:
            return list(self._bad_lines)

    def stderr(self) -> str:
        with self._cond:
            return self._stderr.decode("utf-8", errors="replace")

    def describe(self, tail: int = 15) -> str:
        last = self._stdout.tail(tail)
        return (
            f"server {self.args} exit={self.proc.poll()}\n"
            f"--- last stdout lines ---\n" + "\n".join(last) + "\n"
            f"--- stderr ---\n{self.stderr()[-3000:]}"
        )

    # ---- waiting ---------------------------------------------------------

    def _wait(self, feed: Callable[[int, Event], bool], timeout: float, what: str) -> None:
        """Feed every event (old and new, in order) to ``feed`` until it returns True."""
        seen = 0

        def ready() -> bool:
            nonlocal seen
            while seen < len(self._events):
                if feed(seen, self._events[seen]):
                    return True
                seen += 1
            return False

        def failure(ended: bool) -> str:
            if ended:
                return f"server output ended before {what}\n{self.describe()}"
            return f"timed out after {timeout}s waiting for {what}\n{self.describe()}"

        self._stdout.wait_until(ready, timeout, failure)

    def wait_for_index(
        self, predicate: Callable[[Event], bool], timeout: float = WAIT, what: str = "an event"
    ) -> int:
        found: list[int] = []

        def feed(i: int, e: Event) -> bool:
            if predicate(e):
                found.append(i)
                return True
            return False

        self._wait(feed, timeout, what)
        return found[0]

    def wait_for(
        self, predicate: Callable[[Event], bool], timeout: float = WAIT, what: str = "an event"
    ) -> Event:
        index = self.wait_for_index(predicate, timeout, what)
        with self._cond:
            return self._events[index]

    def wait_event(self, name: str, timeout: float = WAIT, **fields: Any) -> Event:
        """First event called ``name`` whose fields equal ``fields``."""
        return self.wait_for(
            lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items()),
            timeout,
            f"{name} {fields}",
        )

    def wait_line(self, predicate: Callable[[str], bool], timeout: float = WAIT) -> str:
        def failure(ended: bool) -> str:
            if ended:
                return f"server output ended before the line\n{self.describe()}"
            return f"timed out waiting for a line\n{self.describe()}"

        return self._stdout.wait_line(predicate, timeout, failure)

    # ---- per-connection views ---------------------------------------------

    def connection_events(self, client: Client, name: str | None = None) -> list[Event]:
        """Events about ``client``'s fd during this connection's life (fds get reused)."""
        with self._cond:
            out: list[Event] = []
            for e in self._events[client.accepted_index + 1 :]:
                if e.get("fd") != client.fd:
                    continue
                if e.get("event") == "connection.accepted":
                    break
                if name is None or e.get("event") == name:
                    out.append(e)
            return out

    def bytes_received_from(self, client: Client) -> int:
        return sum(int(e["bytes"]) for e in self.connection_events(client, "data.received"))

    def bytes_sent_to(self, client: Client) -> int:
        return sum(int(e["bytes"]) for e in self.connection_events(client, "data.sent"))

    def wait_bytes(self, client: Client, name: str, total: int, timeout: float = WAIT) -> None:
        """Wait until ``name`` events (data.received/sent) for ``client`` sum to ``total``."""
        got = 0

        def feed(i: int, e: Event) -> bool:
            nonlocal got
            if i <= client.accepted_index or e.get("fd") != client.fd:
                return False
            if e.get("event") == name:
                got += int(e["bytes"])
            return got >= total

        self._wait(feed, timeout, f"{name} for fd {client.fd} summing to {total} bytes")
        assert got == total, f"{name} for fd {client.fd} sums to {got} bytes, expected {total}"

    def wait_received_from(self, client: Client, total: int, timeout: float = WAIT) -> None:
        """Wait until the server logged receiving ``total`` bytes from ``client``."""
        self.wait_bytes(client, "data.received", total, timeout)

    def wait_sent_to(self, client: Client, total: int, timeout: float = WAIT) -> None:
        """Wait until the server logged sending ``total`` bytes to ``client``."""
        self.wait_bytes(client, "data.sent", total, timeout)

    def wait_connection_event(
        self,
        client: Client,
        name: str,
        predicate: Callable[[Event], bool] = lambda e: True,
        timeout: float = WAIT,
    ) -> Event:
        """First ``name`` event of this connection (after its accept) matching ``predicate``."""
        found: list[Event] = []

        def feed(i: int, e: Event) -> bool:
            if (
                i > client.accepted_index
                and e.get("fd") == client.fd
                and e.get("event") == name
                and predicate(e)
            ):
                found.append(e)
                return True
            return False

        self._wait(feed, timeout, f"{name} for fd {client.fd}")
        return found[0]

    def wait_closed(self, client: Client, timeout: float = WAIT) -> Event:
        """The connection.closed event of this connection."""
        return self.wait_connection_event(client, "connection.closed", timeout=timeout)

    # ---- clients -------------------------------------------------------------

    def raw_connect(self, rcvbuf: int | None = None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._clients.append(sock)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(WAIT)
        sock.connect((HOST, self.port))
        return sock

    def connect(self, rcvbuf: int | None = None) -> Client:
        """Connect and wait until the server has accepted (registered) this client."""
        sock = self.raw_connect(rcvbuf)
        peer = peer_of(sock)
        index = self.wait_for_index(
            lambda e: e.get("event") == "connection.accepted" and e.get("peer") == peer,
            what=f"connection.accepted for {peer}",
        )
        with self._cond:
            fd = int(self._events[index]["fd"])
        return Client(sock=sock, fd=fd, peer=peer, accepted_index=index)

    def connect_many(self, count: int) -> list[Client]:
        return [self.connect() for _ in range(count)]

    # ---- process control -------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = WAIT) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"server did not exit within {timeout}s\n{self.describe()}"
            ) from None
        self._stdout.join(WAIT)
        self._err_thread.join(WAIT)
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = WAIT) -> int:
        self.send_signal(sig)
        return self.wait_exit(timeout)

    def close(self) -> None:
        for sock in self._clients:
            sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(WAIT)
        finally:
            self._stdout.join(WAIT)
            self._err_thread.join(WAIT)
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


StartServer = Callable[..., ServerProcess]


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """Factory: ``start_server(*extra_args, started=True)``; every process is killed at teardown.

    With ``started=True`` the server is given ``--port 0 --host 127.0.0.1`` and we
    wait for ``server.started`` (and read the port from it).
    """
    servers: list[ServerProcess] = []

    def start(*extra: str, started: bool = True) -> ServerProcess:
        args = ["--port", "0", "--host", HOST, *extra] if started else list(extra)
        srv = ServerProcess(args)
        servers.append(srv)
        if started:
            srv.port = int(srv.wait_event("server.started")["port"])
        return srv

    yield start
    for srv in servers:
        srv.close()


@pytest.fixture
def server(start_server: StartServer) -> ServerProcess:
    return start_server()


# --------------------------------------------------------------------------
# Client-side helpers
# --------------------------------------------------------------------------


def send_messages(server: ServerProcess, sender: Client, messages: Iterable[bytes]) -> int:
    """Send each message as its own recv: the next goes only once the server logged the last.

    Returns the bytes sent.
    """
    total = server.bytes_received_from(sender)
    sent = 0
    for message in messages:
        sender.sock.sendall(message)
        total += len(message)
        sent += len(message)
        server.wait_received_from(sender, total)
    return sent


def recv_exactly(sock: socket.socket, count: int, timeout: float = WAIT) -> bytes:
    """Read exactly ``count`` bytes or fail (EOF, or no progress for ``timeout``)."""
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while len(buf) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(
                f"got {len(buf)} of {count} bytes within {timeout}s: {bytes(buf[:80])!r}..."
            )
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(count - len(buf), 1 << 20))
        except TimeoutError:
            continue
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {count} bytes: {bytes(buf[:80])!r}...")
        buf += chunk
    return bytes(buf)


def recv_until(
    sock: socket.socket,
    done: Callable[[bytearray], bool],
    what: str,
    timeout: float = WAIT,
    *,
    eof_ends: bool = False,
) -> bytes:
    """Read until ``done(what arrived so far)`` holds and return it all; fail on timeout.

    EOF: with ``eof_ends`` it ends the read (what arrived is returned), else it is a failure.
    ``what`` names the awaited thing in the messages.
    """
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while not done(buf):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {what} within {timeout}s (got {len(buf)} bytes)")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            continue
        if not chunk:
            if eof_ends:
                break
            raise AssertionError(f"EOF after {len(buf)} bytes, before {what}")
        buf += chunk
    return bytes(buf)


def recv_until_eof(sock: socket.socket, timeout: float = WAIT) -> bytes:
    """Read until the server closes the connection (clean EOF) or fail on timeout."""
    return recv_until(sock, lambda buf: False, "EOF", timeout, eof_ends=True)


def recv_until_suffix(sock: socket.socket, suffix: bytes, timeout: float = WAIT) -> bytes:
    """Read until what arrived ends with ``suffix`` (a marker sent last); return it all."""
    data = recv_until(sock, lambda buf: buf.endswith(suffix), repr(suffix), timeout)
    sock.settimeout(WAIT)
    return data


def assert_nothing_arrives(sock: socket.socket, wait: float = QUIET) -> None:
    """A negative check; callers first prove a later message already arrived elsewhere."""
    sock.settimeout(wait)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        return
    finally:
        sock.settimeout(WAIT)
    raise AssertionError(f"unexpected data (or EOF) on the socket: {data[:80]!r}")


def reset(sock: socket.socket) -> None:
    """Close abruptly: SO_LINGER (on, 0 s) makes close() send an RST."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class BackgroundReader:
    """Reads ``count`` bytes from a socket in a thread (for concurrent large transfers)."""

    def __init__(self, sock: socket.socket, count: int, timeout: float = 30.0) -> None:
        self.sock = sock
        self.count = count
        self.timeout = timeout
        self.data = b""
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.data = recv_exactly(self.sock, self.count, self.timeout)
        except (AssertionError, OSError) as exc:  # re-raised in result()
            self.error = exc

    def result(self) -> bytes:
        self._thread.join(self.timeout + 5)
        assert not self._thread.is_alive(), "reader thread still running"
        if self.error is not None:
            raise self.error
        return self.data


# --------------------------------------------------------------------------
# Helpers for the robustness tests (slow readers, limits, faults)
# --------------------------------------------------------------------------

MiB = 1024 * 1024


def wait_event_count(
    server: ServerProcess,
    name: str,
    count: int,
    timeout: float = WAIT,
    predicate: Callable[[Event], bool] = lambda e: True,
) -> list[Event]:
    """Wait until ``count`` events called ``name`` (and matching ``predicate``) were logged.

    Returns the first ``count`` of them, in log order.
    """
    matched: list[Event] = []
    if count <= 0:
        return matched

    def feed(e: Event) -> bool:
        if e.get("event") == name and predicate(e):
            matched.append(e)
        return len(matched) >= count

    server.wait_for(feed, timeout, f"{count} {name} events (saw {len(matched)})")
    return matched


def proc_status_kib(pid: int, field: str) -> int:
    """A ``kB`` line of /proc/PID/status (``VmRSS``, ``VmHWM``, ...), in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
"""Units of proc_cpu_ticks per second."""


def proc_cpu_ticks(pid: int) -> int:
    """CPU time a process has used so far (utime + stime), in CLOCK_TICKS."""
    with open(f"/proc/{pid}/stat") as stat:
        text = stat.read()
    # The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    # There, index 0 is field 3 (state); utime and stime are fields 14 and 15.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def proc_fd_count(pid: int) -> int:
    """How many descriptors a process has open (entries in /proc/PID/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def closed_by_server(sock: socket.socket, timeout: float = WAIT) -> bytes:
    """Read until the server's EOF or reset; return what arrived first (b"" if nothing did)."""
    try:
        return recv_until_eof(sock, timeout)
    except ConnectionResetError:
        return b""


class StreamReader:
    """Reads a socket in a thread: counts the bytes and can keep, hash or pause on them.

    - ``limit``: stop after exactly this many bytes (else read until EOF or ``stop``).
    - ``keep``: keep the bytes (``data``); otherwise only count them.
    - ``on_chunk``: called with every chunk read (e.g. a hash object's ``update``).
    - ``pauses``: ``(offset, seconds)`` pairs: once ``offset`` bytes have arrived, stop reading
      for ``seconds`` (a bursty consumer).
    - ``timeout``: an error when no byte arrives for this long.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        limit: int | None = None,
        keep: bool = False,
        on_chunk: Callable[[memoryview], object] | None = None,
        pauses: Sequence[tuple[int, float]] = (),
        timeout: float = 30.0,
    ) -> None:
        self.sock = sock
        self.limit = limit
        self.timeout = timeout
        self.received = 0
        self.eof = False
        self.error: Exception | None = None
        self._keep = bytearray() if keep else None
        self._on_chunk = on_chunk
        self._pauses = sorted(pauses)
        self._stopping = False
        self._done = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        pauses = list(self._pauses)
        try:
            self.sock.settimeout(self.timeout)
            while self.limit is None or self.received < self.limit:
                want = len(buffer)
                if self.limit is not None:
                    want = min(want, self.limit - self.received)
                count = self.sock.recv_into(view[:want])
                if count == 0:
                    with self._cond:
                        self.eof = True
                    break
                chunk = view[:count]
                if self._on_chunk is not None:
                    self._on_chunk(chunk)
                if self._keep is not None:
                    self._keep += chunk
                with self._cond:
                    self.received += count
                    self._cond.notify_all()
                while pauses and self.received >= pauses[0][0]:
                    time.sleep(pauses.pop(0)[1])
        except OSError as exc:  # includes TimeoutError; re-raised in result()
            if not self._stopping:
                self.error = exc
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    @property
    def data(self) -> bytes:
        assert self._keep is not None, "StreamReader(keep=True) keeps the data"
        with self._cond:
            return bytes(self._keep)

    def wait_received(self, count: int, timeout: float = WAIT) -> None:
        """Wait until at least ``count`` bytes have arrived."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.received < count:
                remaining = deadline - time.monotonic()
                if self._done or remaining <= 0:
                    raise AssertionError(
                        f"reader got {self.received} of {count} bytes "
                        f"(eof={self.eof}, error={self.error!r})"
                    )
                self._cond.wait(remaining)

    def result(self) -> StreamReader:
        """Wait for the thread to end (limit reached, EOF); re-raise its error."""
        self._thread.join(self.timeout + 5)
        assert not self._thread.is_alive(), f"reader still running after {self.received} bytes"
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        """End the thread (the socket stops reading) and wait for it."""
        self._stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError as exc:  # closed or reset: the thread ends on its own
            self._thread.join(WAIT)
            if self._thread.is_alive():
                raise AssertionError("reader thread did not end") from exc
            return
        self._thread.join(WAIT)


# --------------------------------------------------------------------------
# A backlog queued inside the server
# --------------------------------------------------------------------------


BACKLOG_BYTES = 8 * 1024 * 1024
#: These tests keep BACKLOG_BYTES queued in the server for a reader that waits on purpose:
#: the output limit must let that much wait (the default, 4 MiB, would close the reader).
BACKLOG_LIMIT = ("--max-queue-bytes", "64M")


def queue_backlog(server: ServerProcess) -> tuple[Client, Client, bytes]:
    """A writer sends BACKLOG_BYTES to a reader that does not read (small receive buffer).

    Returns once the server has received every byte, with part of them still
    queued inside the server for the reader.
    """
    writer = server.connect()
    reader = server.connect(rcvbuf=16 * 1024)
    payload = os.urandom(BACKLOG_BYTES)
    writer.sock.settimeout(30)
    writer.sock.sendall(payload)
    server.wait_received_from(writer, len(payload), timeout=20)
    assert server.bytes_sent_to(reader) < len(payload), (
        "precondition: data should be queued in the server"
    )
    return writer, reader, payload
