"""The chat never waits on its own logs: stdout as a pipe that stalls, is slow, goes away or is
full, a terminal that must stay as it was, and a closed stdout.

These servers are started by hand, since the harness's server reads stdout at once: each test
chooses what stdout is. The port comes from ``free_port`` and the server is known to listen once
a connect succeeds.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any

import pytest
from conftest import HOST, WAIT, free_port, recv_exactly, server_command, server_env

from fsmchat.net.outqueue import Buffer
from fsmchat.ops.events import make_logger
from fsmchat.ops.logstream import LogStream

Event = dict[str, Any]


class Server:
    """A server process whose stdout is whatever the test gives it."""

    def __init__(self, *args: str, stdout: int | IO[bytes], stderr: int | IO[bytes] | None = None,
                 shell_prefix: str = "") -> None:
        self.port = free_port()
        argv = server_command("--host", HOST, "--port", str(self.port), *args)
        if shell_prefix:  # e.g. closing stdout: exec python ... >&-
            argv = ["bash", "-c", 'exec "$@" ' + shell_prefix, "bash", *argv]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout,
                                     stderr=subprocess.PIPE if stderr is None else stderr,
                                     env=server_env())
        self.clients: list[socket.socket] = []

    def connect(self) -> socket.socket:
        """A client, once the server listens (a refused connect is retried until WAIT)."""
        deadline = time.monotonic() + WAIT
        while True:
            try:
                sock = socket.create_connection((HOST, self.port), timeout=WAIT)
            except ConnectionRefusedError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.01)
                continue
            self.clients.append(sock)
            return sock

    def stop(self, output: int | None = None) -> tuple[int, bytes]:
        """SIGTERM; read ``output`` (a pipe's read end) to its end meanwhile, since the stop
        writes what waits; the exit status, and what was read."""
        self.proc.send_signal(signal.SIGTERM)
        text = read_all(output) if output is not None else b""
        return self.proc.wait(WAIT * 2), text

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode()

    def close(self) -> None:
        for sock in self.clients:
            sock.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.close()


def round_trip(a: socket.socket, b: socket.socket, message: bytes) -> None:
    """``a`` says it, ``b`` hears it. What a client sends is read only once it is in the chat,
    and clients join in the order they connected: so the first message of two new clients goes
    from the later one to the earlier one."""
    a.sendall(message)
    assert recv_exactly(b, len(message)) == message


def chat_a_while(server: Server, messages: int = 200) -> tuple[socket.socket, socket.socket]:
    """Two clients, and ``messages`` from one to the other that all arrive."""
    a, b = server.connect(), server.connect()
    round_trip(b, a, b"hello\n")
    for n in range(messages):
        round_trip(a, b, b"still here %d\n" % n)
    return a, b


def unread_stdout(servers: list[Server], *args: str, kind: str = "pipe",
                  merged: bool = False) -> tuple[Server, int]:
    """A server whose stdout (and stderr, if ``merged``) is a pipe or a socket that the test
    reads only when it wants to; the server, and the test's end of it."""
    read_end, write_end = os.pipe() if kind == "pipe" else (
        sock.detach() for sock in socket.socketpair())
    server = Server(*args, stdout=write_end, stderr=write_end if merged else None)
    servers.append(server)
    os.close(write_end)
    return server, read_end


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def parse(output: bytes) -> list[Event]:
    """Every line whole JSON, the output ending in a newline."""
    assert output.endswith(b"\n"), output[-200:]
    return [json.loads(line) for line in output.split(b"\n")[:-1]]


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_a_stalled_log_reader_never_stalls_the_chat(servers: list[Server], kind: str) -> None:
    """stdout on a pipe (or a socket, as a log shipper's) nobody reads: at the default debug
    level, 4,000 round trips all arrive and a newcomer chats; then every line read is whole,
    drops are reported, stopped is last."""
    server, read_end = unread_stdout(servers, "--log-buffer", "256K", kind=kind)
    a, b = chat_a_while(server, 0)
    for n in range(4000):
        round_trip(a, b, b"ping %d\n" % n)
        round_trip(b, a, b"pong %d\n" % n)
    c = server.connect()
    round_trip(c, b, b"hello from the newcomer\n")
    round_trip(a, c, b"welcome\n")
    status, output = server.stop(read_end)
    os.close(read_end)
    assert status == 0
    events = parse(output)
    dropped = [e for e in events if e["event"] == "log.dropped"]
    assert dropped, "no log.dropped event"
    for event in dropped:
        assert isinstance(event["count"], int) and event["count"] > 0
        assert event["count"] == sum(event["levels"].values())
        assert event["level"] == "warning"
    assert events[-1]["event"] == "server.stopped"
    assert sum(e["count"] for e in dropped) >= 4000, "8,000 messages: far more than 4,000 events"


def test_a_slow_log_reader_loses_nothing_at_info(servers: list[Server]) -> None:
    """A reader that takes a little now and then through a one-page pipe: every event of 300
    connections arrives, and nothing is reported dropped."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    server = Server("--log-level", "info", stdout=write_end)
    servers.append(server)
    os.close(write_end)
    chunks: list[bytes] = []

    def slow_reader() -> None:
        while chunk := os.read(read_end, 1024):
            chunks.append(chunk)
            time.sleep(0.002)

    thread = threading.Thread(target=slow_reader, daemon=True)
    thread.start()
    keep = server.connect()
    peers = []
    for n in range(300):
        sock = server.connect()
        peers.append("{}:{}".format(*sock.getsockname()[:2]))
        round_trip(sock, keep, b"%d\n" % n)  # it is in the chat: its close will be logged
        sock.close()
    assert server.stop()[0] == 0
    thread.join(WAIT * 2)
    os.close(read_end)
    events = parse(b"".join(chunks))
    assert not [e for e in events if e["event"] == "log.dropped"]
    closed = {e["peer"] for e in events if e["event"] == "connection.closed"}
    accepted = {e["peer"] for e in events if e["event"] == "connection.accepted"}
    assert set(peers) <= accepted & closed
    assert events[-1]["event"] == "server.stopped"


@pytest.mark.parametrize("merged", [False, True], ids=["stdout", "stdout-and-stderr"])
def test_a_log_reader_that_goes_away_stops_the_logging_not_the_server(
    servers: list[Server], merged: bool
) -> None:
    """``fsmchat | head -1`` (and ``2>&1 | head -1``): the chat goes on, the exit status is 0."""
    server, read_end = unread_stdout(servers, merged=merged)
    first = os.read(read_end, 1 << 16).split(b"\n")[0]
    assert json.loads(first)["event"] == "server.started"
    os.close(read_end)
    chat_a_while(server)
    assert server.stop()[0] == 0
    if not merged:
        lines = server.stderr().splitlines()
        assert lines == ["fsmchat: stdout is closed; status events are no longer written, "
                         "serving goes on"]


def test_a_full_disk_is_a_counted_pause_not_a_crash(servers: list[Server]) -> None:
    """``fsmchat > /dev/full``: one line on stderr, the chat goes on, the exit status is 0."""
    with open("/dev/full", "wb") as full:
        server = Server("--stats-interval", "0.1", stdout=full)
    servers.append(server)
    chat_a_while(server)
    assert server.stop()[0] == 0
    lines = server.stderr().splitlines()
    assert len(lines) >= 1 and "No space left on device" in lines[0], lines
    assert [line for line in lines if "No space" in line] == lines[:1]
    assert "Traceback" not in "\n".join(lines)


def test_a_closed_stdout_is_no_problem(servers: list[Server]) -> None:
    server = Server(stdout=subprocess.DEVNULL, shell_prefix=">&-")
    servers.append(server)
    chat_a_while(server, 1)
    assert server.stop()[0] == 0
    assert "Traceback" not in server.stderr()


def test_a_terminal_is_left_as_it_was(servers: list[Server]) -> None:
    """stdout a terminal: it is never made non-blocking for the others who share it. (JSON
    asked for: on a terminal the default is the console format.)"""
    controller, terminal = pty.openpty()
    server = Server("--log-format", "json", stdout=terminal)
    servers.append(server)
    output: list[bytes] = []

    def read_terminal() -> None:
        try:
            while chunk := os.read(controller, 1 << 16):
                output.append(chunk)
        except OSError:  # EIO once the last writer is gone
            pass

    thread = threading.Thread(target=read_terminal, daemon=True)
    thread.start()
    a, b = server.connect(), server.connect()
    round_trip(b, a, b"hello\n")
    assert not fcntl.fcntl(terminal, fcntl.F_GETFL) & os.O_NONBLOCK
    round_trip(a, b, b"on a terminal\n")
    assert server.stop()[0] == 0
    assert not fcntl.fcntl(terminal, fcntl.F_GETFL) & os.O_NONBLOCK
    os.close(terminal)
    thread.join(WAIT)
    os.close(controller)
    text = b"".join(output).replace(b"\r\n", b"\n")
    assert parse(text)[-1]["event"] == "server.stopped"


def test_a_stop_with_a_stalled_log_reader_ends_within_the_drain_timeout(
    servers: list[Server],
) -> None:
    """stdout and stderr one pipe nobody reads (``2>&1 | less`` left alone): the stop gives
    the events that wait --drain-timeout seconds, then exits 0, saying so without blocking."""
    server, read_end = unread_stdout(servers, "--drain-timeout", "1", merged=True)
    chat_a_while(server, 2000)  # far more events than the pipe holds
    filler = os.open(f"/proc/self/fd/{read_end}", os.O_WRONLY | os.O_NONBLOCK)
    with contextlib.suppress(BlockingIOError):  # not one more byte fits: stderr too is stuck
        while True:
            os.write(filler, b"#")
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(WAIT) == 0
    first = os.read(read_end, 1 << 16)
    os.close(filler)
    os.close(read_end)
    assert json.loads(first.split(b"\n")[0])["event"] == "server.started"


def test_server_stopped_stays_last_when_the_reader_comes_back_late(
    servers: list[Server],
) -> None:
    """A reader away during the stop, with server.stats due every 0.1 s: nothing the server had
    scheduled is written after server.stopped."""
    server, read_end = unread_stdout(servers, "--stats-interval", "0.1", "--log-buffer", "128K")
    chat_a_while(server, 2000)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the reader is away a while: several stats ticks would be due meanwhile
    events = parse(read_all(read_end))
    os.close(read_end)
    assert server.proc.wait(WAIT) == 0
    assert events[-1]["event"] == "server.stopped"
    assert [e for e in events if e["event"] == "log.dropped"]


# -- the stream itself, in-process: what is kept, dropped and reported ------------------------


class Stdout:
    """A stdout that takes ``allow`` bytes, then would block until given more."""

    def __init__(self) -> None:
        self.allow = 0
        self.out = bytearray()

    def write(self, buffers: Sequence[Buffer]) -> int:
        data = b"".join(bytes(b) for b in buffers)[: self.allow]
        if not data:
            raise BlockingIOError
        self.allow -= len(data)
        self.out += data
        return len(data)

    def events(self) -> list[Event]:
        return parse(bytes(self.out))


def test_a_level_that_lost_a_line_loses_every_line_until_the_loss_is_reported() -> None:
    stdout = Stdout()
    stream = LogStream(stdout.write, limit=4000)
    log = make_logger(stream, "debug", "json")
    for n in range(100):
        log.debug("data.sent", fd=7, bytes=n, queued=0)
    log.warning("connection.idle", fd=7, peer="x", seconds=1)  # warnings still have room
    stdout.allow = 1200
    stream.flush()  # some room again, but not caught up: debug lines still go
    log.debug("data.sent", fd=7, bytes=1000, queued=0)
    stdout.allow = 1 << 20
    stream.flush()  # caught up: the report, then debug lines again
    log.debug("data.sent", fd=7, bytes=2000, queued=0)
    stream.flush()
    events = stdout.events()
    names = [e["event"] for e in events]
    assert names[-3:] == ["connection.idle", "log.dropped", "data.sent"]
    assert events[-1]["bytes"] == 2000
    kept = [e["bytes"] for e in events if e["event"] == "data.sent"][:-1]
    assert kept == list(range(len(kept)))  # one gap: a prefix was kept, the rest dropped
    report = events[-2]
    assert report["levels"] == {"debug": 100 - len(kept) + 1} == {"debug": report["count"]}
    assert stream.dropped["debug"] == report["count"]


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_what_a_stop_gives_up_on_is_counted_by_level(fmt: str) -> None:
    stdout = Stdout()
    stream = LogStream(stdout.write, limit=1 << 20)
    log = make_logger(stream, "debug", fmt)
    for n in range(3):
        log.debug("data.sent", fd=7, bytes=n, queued=0)
    log.warning("connection.idle", fd=7, peer="x", seconds=1)
    log.info("connection.closed", fd=7, peer="x", reason="idle_timeout", bytes_in=0,
             bytes_out=0, seconds=1)
    stdout.allow = 10  # the first line is half written
    stream.flush()
    assert stream.abandon() == 5
    assert dict(stream.dropped) == {"debug": 3, "info": 1, "warning": 1, "error": 0}
