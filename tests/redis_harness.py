"""A real, throwaway ``redis-server`` for the multi-instance tests, and its pytest fixtures.

Each ``RedisServer`` listens on 127.0.0.1 on a port of its own, keeps nothing on disk
(``--save "" --appendonly no``) and can be killed (SIGKILL, like a crash) and started again on the
same port, so fsmchat instances pointed at it see a real outage and a real recovery. Start-up is
awaited, never slept on: its "Ready to accept connections" line, then a PING over a socket.

``FakeRedis`` is the other kind: a listener that speaks only as much RESP as a test scripts
(it never answers, it answers the greeting and then says nothing, it sends what nobody asked
for, it streams a reply without end), for what no real Redis does.

Test modules load the fixtures with ``pytest_plugins = ["redis_harness"]`` and import the rest;
as they import it first, pytest could not rewrite its asserts anyway (and would warn), so it
does not try: PYTEST_DONT_REWRITE. Its asserts carry their own messages.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import hiredis
import pytest
from conftest import HOST, WAIT, LineReader, ServerProcess, StartServer

#: RESP replies, decoded: simple strings and bulk strings as bytes, integers, arrays, nil.
Reply = bytes | int | list["Reply"] | None


class RedisError(Exception):
    """Redis answered a command with an error reply (``-ERR ...``)."""


def fixed_port() -> int:
    """A free 127.0.0.1 port below the ephemeral range.

    A Redis that is down leaves its port free for a while; a port the kernel never hands out as
    the local end of an outgoing connection cannot be taken by a client (or by fsmchat's own
    reconnect attempt, connecting to itself) before Redis comes back on it.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
        low = int(ports.read().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(10001, low))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((HOST, port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port found in 10000..{low - 1}")


def _dial(host: str, port: int) -> socket.socket:
    return socket.create_connection((host, port), timeout=WAIT)


def _encode_command(*args: bytes | str) -> bytes:
    """A command as a RESP array of bulk strings (binary safe)."""
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type] # stub: a 1-tuple
    return packed


class _RespReader:
    """Reads RESP replies from a blocking socket; ``hiredis.Reader`` parses them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser = hiredis.Reader(replyError=RedisError)

    def reply(self) -> Reply:
        """The next reply; an error reply is raised as ``RedisError``."""
        reply = self.parser.gets()
        while reply is False:  # not a whole reply yet
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("Redis closed the connection")
            self.parser.feed(chunk)
            reply = self.parser.gets()
        if isinstance(reply, RedisError):
            raise reply
        result: Reply = reply
        return result


class RedisServer:
    """One ``redis-server`` process on a fixed 127.0.0.1 port; restartable on that port."""

    READY = "Ready to accept connections"

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        *,
        host: str = HOST,
        prefix: Sequence[str] = (),
        dial: Callable[[str, int], socket.socket] | None = None,
    ) -> None:
        """``host``, ``prefix`` and ``dial`` place it elsewhere (tests/netns_harness.py: in a
        network namespace): the address it binds, what goes before its command (``ip netns exec
        NS``), and how a test opens a connection to it (a connected socket, timeout set)."""
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not on PATH: these tests need a real Redis "
                "(Debian/Ubuntu: apt-get install redis-server)",
                pytrace=False,
            )
        self.binary = binary
        self.workdir = workdir
        self.port = port if port is not None else fixed_port()
        #: More redis-server options, e.g. ``("--requirepass", "secret")``.
        self.extra_args = list(extra_args)
        self.host = host
        self.prefix = list(prefix)
        self.dial = dial if dial is not None else _dial
        self.proc: subprocess.Popen[bytes] | None = None
        #: The output of the current (or last) run.
        self._output: LineReader | None = None

    # ---- addresses ---------------------------------------------------------

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """How fsmchat names this Redis in its events: ``host:port``."""
        return f"{self.host}:{self.port}"

    @property
    def password(self) -> str | None:
        """The ``--requirepass`` among the extra options, if any."""
        args = self.extra_args
        for i, arg in enumerate(args[:-1]):
            if arg == "--requirepass":
                return args[i + 1]
        return None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---- process control -------------------------------------------------------

    def start(self, timeout: float = WAIT) -> None:
        """Start (or restart) on ``self.port``; return once it answers PING."""
        assert not self.running, "redis-server is already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                self.binary,
                "--port", str(self.port),
                "--bind", self.host,
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--daemonize", "no",
                "--loglevel", "notice",
                "--logfile", "",
                *self.extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        output = self._output = LineReader(self.proc.stdout)

        def failure(ended: bool) -> str:
            why = "exited" if ended else f"was not ready within {timeout}s"
            return f"redis-server on port {self.port} {why}:\n" + "\n".join(output.lines[-20:])

        output.wait_line(lambda line: self.READY in line, timeout, failure)
        pong = self.command("PING", password=self.password)
        assert pong == b"PONG", f"redis-server answered PING with {pong!r}"

    def kill(self) -> None:
        """SIGKILL (a crash: no goodbye to clients) and wait until it is gone."""
        proc = self.proc
        assert proc is not None and proc.poll() is None, "redis-server is not running"
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
        self._finish()

    def send_signal(self, sig: int) -> None:
        """SIGSTOP freezes it (a host that vanished: no FIN, no RST), SIGCONT thaws it."""
        assert self.proc is not None and self.proc.poll() is None, "redis-server is not running"
        self.proc.send_signal(sig)

    def close(self) -> None:
        """Teardown: kill it if it still runs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        self._finish()

    def _finish(self) -> None:
        if self._output is not None:
            self._output.join(WAIT)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    # ---- output --------------------------------------------------------------

    def output(self) -> str:
        """What the current (or last) run has printed so far."""
        if self._output is None:
            return ""
        with self._output.cond:
            return "\n".join(self._output.lines)

    # ---- talking to it ---------------------------------------------------------

    def command(self, *args: bytes | str, password: str | None = None) -> Reply:
        """Send one command on a fresh connection and return its decoded reply."""
        with self.dial(self.host, self.port) as sock:
            reader = _RespReader(sock)
            if password is not None:
                sock.sendall(_encode_command("AUTH", password))
                ok = reader.reply()
                assert ok == b"OK", f"AUTH answered {ok!r}"
            sock.sendall(_encode_command(*args))
            return reader.reply()

    def publish(self, channel: bytes | str, payload: bytes | str) -> int:
        """PUBLISH as any Redis client would; returns how many subscribers got it."""
        receivers = self.command("PUBLISH", channel, payload, password=self.password)
        assert isinstance(receivers, int), f"PUBLISH answered {receivers!r}"
        return receivers


RedisFactory = Callable[..., RedisServer]


class FakeSession:
    """One connection to a ``FakeRedis``, as its script sees it."""

    def __init__(self, sock: socket.socket, changed: Callable[[], None]) -> None:
        self.sock = sock
        self.changed = changed  # tells the FakeRedis's waiters to look again
        self.parser = hiredis.Reader()
        self.link = ""  # "publish" or "subscribe", once the greeting told which
        self.commands: list[list[bytes]] = []  # every command read, in order
        self.sent = 0  # bytes the script sent
        self.cut = False  # the other end closed or reset the connection

    def command(self) -> list[bytes] | None:
        """The next command fsmchat sent; None once it closed the connection."""
        command = self.parser.gets()
        while command is False:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                chunk = b""
            if not chunk:
                self.cut = True
                self.changed()
                return None
            self.parser.feed(chunk)
            command = self.parser.gets()
        self.commands.append(command)
        self.changed()
        return list(command)

    def send(self, data: bytes) -> bool:
        """Send it all; False once fsmchat closed the connection."""
        try:
            self.sock.sendall(data)
        except OSError:
            self.cut = True
            self.changed()
            return False
        self.sent += len(data)
        return True

    def greet(self) -> str:
        """Answer the link's greeting as Redis would: PING (publish) or SUBSCRIBE (subscribe),
        after the TIME a subscriber with streams asks first."""
        command = self.command()
        if command is not None and command[0].upper() == b"TIME":
            now = time.time()
            seconds, micros = b"%d" % int(now), b"%d" % int(now % 1 * 1e6)
            self.send(b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
                len(seconds), seconds, len(micros), micros))
            command = self.command()
        if command is None:
            return ""
        if command[0].upper() == b"SUBSCRIBE":
            channel = command[1]
            self.link = "subscribe"
            self.send(b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n" % (len(channel), channel))
        else:
            self.link = "publish"
            self.send(b"+PONG\r\n")
        self.changed()
        return self.link

    def listen(self) -> None:
        """Read every command to the end, answering none."""
        while self.command() is not None:
            pass

    def pong(self) -> None:
        """Read every command to the end, answering only the subscriber's PINGs."""
        while (command := self.command()) is not None:
            if command[0].upper() == b"PING":
                self.send(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n")


class FakeRedis:
    """A listener on 127.0.0.1 that runs ``script`` on each connection, in a thread of its own."""

    def __init__(self, script: Callable[[FakeSession], None]) -> None:
        self.script = script
        self.listener = socket.create_server((HOST, 0))
        self.port: int = self.listener.getsockname()[1]
        self.sessions: list[FakeSession] = []
        self.ended: list[FakeSession] = []  # sessions whose script returned
        self.cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        accepter = threading.Thread(target=self._accept, daemon=True)
        accepter.start()
        self._threads.append(accepter)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:  # closed at teardown
                return
            session = FakeSession(sock, self._changed)
            with self.cond:
                self.sessions.append(session)
                self.cond.notify_all()
            thread = threading.Thread(target=self._run, args=(session,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _changed(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def _run(self, session: FakeSession) -> None:
        try:
            self.script(session)
        finally:
            with self.cond:
                self.ended.append(session)
                self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        """Wait until ``predicate()`` holds (checked under the lock, on every change)."""
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(f"fake Redis: no {what} within {timeout}s "
                                     f"({len(self.sessions)} sessions)")

    def of(self, link: str) -> list[FakeSession]:
        """The sessions of one link, in the order they came."""
        with self.cond:
            return [s for s in self.sessions if s.link == link]

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accepting thread (a close alone does not)
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self.cond:
            sessions = list(self.sessions)
        for session in sessions:
            with contextlib.suppress(OSError):
                session.sock.shutdown(socket.SHUT_RDWR)
            session.sock.close()
        for thread in self._threads:
            thread.join(WAIT)


FakeFactory = Callable[[Callable[[FakeSession], None]], FakeRedis]


@pytest.fixture
def fake_redis() -> Iterator[FakeFactory]:
    """Factory: ``fake_redis(script)``, a ``FakeRedis``; closed at teardown."""
    fakes: list[FakeRedis] = []

    def make(script: Callable[[FakeSession], None]) -> FakeRedis:
        fake = FakeRedis(script)
        fakes.append(fake)
        return fake

    yield make
    for fake in fakes:
        fake.close()


def bug_free(start_server: StartServer) -> Iterator[StartServer]:
    """Wrap the ``start_server`` factory: after the test, no server may have logged a bug.

    The Redis links are state machines like the connections: a trigger their table does not allow
    is logged as ``lifecycle.bug`` and survived, so a test that only looks at the chat would not
    notice it. Test modules override ``start_server`` with this.
    """
    servers: list[ServerProcess] = []

    def start(*args: str, started: bool = True) -> ServerProcess:
        server = start_server(*args, started=started)
        servers.append(server)
        return server

    yield start
    bugs = [(s.args, e) for s in servers for e in s.events("lifecycle.bug")]
    assert not bugs, f"lifecycle.bug logged: {bugs[:3]}"


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[RedisFactory]:
    """Factory: ``redis_factory(*redis_args, started=True, port=None)``; killed at teardown."""
    servers: list[RedisServer] = []

    def make(*redis_args: str, started: bool = True, port: int | None = None) -> RedisServer:
        redis = RedisServer(tmp_path / f"redis{len(servers)}", port, redis_args)
        servers.append(redis)
        if started:
            redis.start()
        return redis

    yield make
    for redis in servers:
        redis.close()


@pytest.fixture
def listen_port() -> int:
    """A free fixed port for servers that must share one (--reuse-port); see fixed_port."""
    return fixed_port()


@pytest.fixture
def redis_server(redis_factory: RedisFactory) -> RedisServer:
    """A running Redis for one test."""
    return redis_factory()

