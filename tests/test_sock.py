"""The loop's rules and the socket base: descriptors select cannot watch stay out, a handler's or
a timer's crash is contained in one place (logged, that socket closed, the loop goes on), and
every close reason the code uses is in the catalogue.

The server here runs in-process on real socket pairs, one loop turn at a time, so that a bug can
be planted where a real client cannot reach.
"""

from __future__ import annotations

import ast
import errno
import io
import socket
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from test_model import ScriptedSocket

import fsmchat
from fsmchat.connection import Connection
from fsmchat.lifecycle import LIFECYCLES, State
from fsmchat.net.loop import FD_SETSIZE, EventLoop, FdLimit
from fsmchat.net.sock import contain_in
from fsmchat.ops.events import make_logger
from fsmchat.ops.logstream import LogStream
from fsmchat.ops.metrics_http import MetricsSite
from fsmchat.options import Options
from fsmchat.reasons import ERRNO_DOC, Reason, error_reason
from fsmchat.server import Server


class Recorder:
    """A loop handler that records its calls and raises on the ones it is told to."""

    def __init__(self, name: str, calls: list[str], *, fails: bool = False) -> None:
        self.name, self.calls, self.fails = name, calls, fails

    def on_readable(self) -> None:
        self.calls.append(self.name)
        if self.fails:
            raise RuntimeError(self.name)

    def on_writable(self) -> None:
        self.on_readable()

    def tick(self) -> None:
        self.on_readable()


# -- the loop ----------------------------------------------------------------------------------


def test_the_loop_refuses_a_descriptor_select_cannot_watch() -> None:
    loop = EventLoop()
    with pytest.raises(FdLimit):
        loop.register(FD_SETSIZE, Recorder("x", []))
    calls: list[str] = []
    loop.register(FD_SETSIZE - 1, Recorder("below", calls))
    loop.dispatch((FD_SETSIZE, FD_SETSIZE - 1), ())
    assert calls == ["below"]  # the refused one was never taken in


def test_a_handler_that_raises_is_reported_and_the_turn_goes_on() -> None:
    crashes: list[tuple[object, str, str]] = []
    loop = EventLoop(on_crash=lambda who, event, exc: crashes.append((who, event, str(exc))))
    calls: list[str] = []
    first, bad, last = (Recorder("first", calls), Recorder("bad", calls, fails=True),
                        Recorder("last", calls))
    for fd, handler in ((3, first), (4, bad), (5, last)):
        loop.register(fd, handler)
        loop.want_write(fd, True)
    loop.dispatch((3, 4, 5), (3, 4, 5))
    assert calls == ["first", "bad", "last"] * 2  # every one called once per event, no more
    assert crashes == [(bad, "readable", "bad"), (bad, "writable", "bad")]


def test_a_timer_that_raises_is_reported_with_its_owner_and_later_timers_still_run() -> None:
    crashes: list[tuple[object, str]] = []
    loop = EventLoop(on_crash=lambda who, event, exc: crashes.append((who, event)))
    calls: list[str] = []
    bad = Recorder("bad", calls, fails=True)
    loop.call_later(0, bad.tick)
    loop.call_later(0, lambda: calls.append("after"))
    loop.run_timers(float("inf"))
    assert calls == ["bad", "after"]
    assert crashes == [(bad, "Recorder.tick")]


def test_without_a_hook_a_crash_ends_run_as_any_exception_would() -> None:
    loop = EventLoop()
    loop.call_later(0, Recorder("bad", [], fails=True).tick)
    with pytest.raises(RuntimeError, match="bad"):
        loop.run()


# -- the socket base in a server -----------------------------------------------------------------


class InProcess:
    """A server in this process on socket pairs, with the production crash hook."""

    def __init__(self) -> None:
        self.output = io.BytesIO()
        self.sink = LogStream.memory(self.output)
        self.log = make_logger(self.sink, "debug", "json")
        self.loop = EventLoop(on_crash=contain_in(self.log))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.server = Server(Options(host=None, port=0), [(self.listener, None)], self.log,
                             loop=self.loop)
        self.hub = self.server.hub
        self.peers: list[socket.socket] = []

    def connect(self) -> tuple[Connection, socket.socket]:
        ours, theirs = socket.socketpair()
        self.peers.append(theirs)
        self.server.acceptor.admit(ours, f"pair{ours.fileno()}")
        return self.hub.connections[ours.fileno()], theirs

    def turn(self) -> None:
        """One loop turn that waits for nothing: the step, what is ready, the timers."""
        self.loop.call_later(0, self.loop.stop)
        self.loop.run()

    def events(self, name: str) -> list[dict[str, object]]:
        self.sink.flush()
        lines = [orjson.loads(line) for line in self.output.getvalue().splitlines()]
        return [event for event in lines if event["event"] == name]

    def close(self) -> None:
        self.listener.close()
        for sock in self.peers:
            sock.close()


@pytest.fixture
def chat() -> Iterator[InProcess]:
    server = InProcess()
    yield server
    server.close()


def read_some(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    return sock.recv(1 << 16)


def test_a_bug_in_an_action_closes_that_client_only(chat: InProcess,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    victim, victim_peer = chat.connect()
    a, a_peer = chat.connect()
    b, b_peer = chat.connect()
    relay = chat.hub.received

    def received(sender: Connection, data: bytes) -> None:
        if data == b"boom":
            raise RuntimeError("planted")
        relay(sender, data)

    monkeypatch.setattr(chat.hub, "received", received)
    victim_peer.sendall(b"boom")
    chat.turn()
    chat.turn()  # the end of the turn releases it
    [bug] = chat.events("lifecycle.bug")
    assert (bug["fd"], bug["state"], bug["trigger"]) == (victim.fd, "reading", "readable")
    assert "planted" in str(bug["exception"])
    [closed] = chat.events("connection.closed")
    assert (closed["fd"], closed["reason"]) == (victim.fd, "internal_error")
    assert victim.state == State.CLOSED and victim_peer.recv(1) == b""
    a_peer.sendall(b"still here")
    chat.turn()
    chat.turn()
    assert read_some(b_peer) == b"still here"
    assert a.state == b.state == State.READING


def test_a_bug_inside_detach_still_releases_the_client(chat: InProcess,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # The bug strikes in what detach calls out to, once the connection is out of the loop and
    # the chat: it must still be released (closed, forgotten) at the end of the turn, and
    # never be watched again.
    victim, victim_peer = chat.connect()
    other, _ = chat.connect()

    def departed(conn: Connection) -> None:
        raise RuntimeError("planted in departed")

    monkeypatch.setattr(chat.hub, "departed", departed)
    victim.close_safely(Reason.QUEUE_LIMIT)  # as the server closes one past its limit
    chat.turn()
    [bug] = chat.events("lifecycle.bug")
    assert (bug["fd"], bug["state"], bug["trigger"]) == (victim.fd, "closing", "fail")
    [closed] = chat.events("connection.closed")
    assert (closed["fd"], closed["reason"]) == (victim.fd, "queue_limit")
    assert list(chat.hub.connections) == [other.fd] and victim_peer.recv(1) == b""
    chat.loop.dispatch((victim.fd,), (victim.fd,))  # were it still watched: a second bug
    assert len(chat.events("lifecycle.bug")) == 1
    assert other.state == State.READING


def test_a_bug_in_a_timer_closes_the_client_it_belongs_to(chat: InProcess,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    conn, _ = chat.connect()

    def check_idle(self: Connection) -> None:
        raise RuntimeError("planted in _check_idle")

    monkeypatch.setattr(Connection, "_check_idle", check_idle)
    conn.timer = chat.loop.call_later(0, conn._check_idle)
    chat.turn()
    chat.turn()
    [bug] = chat.events("lifecycle.bug")
    assert bug["fd"] == conn.fd and str(bug["trigger"]).endswith(".check_idle"), bug
    [closed] = chat.events("connection.closed")
    assert closed["reason"] == "internal_error"


def test_a_client_whose_descriptor_select_cannot_watch_is_turned_away(chat: InProcess) -> None:
    sock = ScriptedSocket(FD_SETSIZE)
    chat.server.acceptor.admit(sock, "high")  # type: ignore[arg-type]
    [rejected] = chat.events("connection.rejected")
    assert rejected["reason"] == "fd_limit" and sock.closed
    assert not chat.hub.connections and chat.hub.counts.rejected == {"fd_limit": 1}


def test_a_scraper_whose_descriptor_select_cannot_watch_is_turned_away(chat: InProcess) -> None:
    endpoint = MetricsSite(chat.loop, chat.log, lambda: b"", "text/plain")
    sock = ScriptedSocket(FD_SETSIZE)
    endpoint.admit(sock, "high")  # type: ignore[arg-type]
    [rejected] = chat.events("http.rejected")
    assert rejected["reason"] == "fd_limit" and rejected["site"] == "metrics"
    assert sock.closed and not endpoint.clients


# -- the catalogue of reasons --------------------------------------------------------------------

REASON_CALLS = {"close_because", "close_safely", "close_with", "_force_close", "abort"}
"""Calls whose first argument is a close reason."""


def reasons_in_code() -> tuple[set[str], set[str]]:
    """(string literals used as reasons, ``Reason.NAME`` names) across the package."""
    literals: set[str] = set()
    names: set[str] = set()
    for path in Path(fsmchat.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            candidates: list[ast.expr] = []
            if isinstance(node, ast.Call):
                candidates += [kw.value for kw in node.keywords if kw.arg == "reason"]
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in REASON_CALLS and node.args:
                    candidates.append(node.args[0])
            elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if node.value is not None and any(
                        isinstance(t, ast.Attribute) and t.attr == "reason" for t in targets):
                    candidates.append(node.value)
            elif isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(isinstance(s, ast.Attribute) and s.attr == "reason" for s in sides):
                    candidates += sides
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id == "Reason"):
                names.add(node.attr)
            for value in candidates:
                for part in ast.walk(value):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str):
                        literals.add(part.value)
    return literals, names


def test_every_reason_the_code_uses_is_in_the_catalogue() -> None:
    literals, names = reasons_in_code()
    assert names, "the search found no Reason member: it looks in the wrong place"
    assert names <= set(Reason.__members__), names - set(Reason.__members__)
    # The code names members; a literal (besides "" for "none yet") must at least be one.
    assert literals - {""} <= {str(reason) for reason in Reason}, literals
    assert literals <= {""}, f"name the catalogue's member instead of {literals - {''}}"


def test_every_reason_says_what_it_means_and_is_its_string() -> None:
    for reason in Reason:
        assert reason.doc and reason.doc == reason.doc.strip(), reason
        assert str(reason) == reason.value and reason.value.islower(), reason
        assert orjson.loads(orjson.dumps({"reason": reason})) == {"reason": reason.value}
    assert len({reason.value for reason in Reason}) == len(Reason)
    assert ERRNO_DOC


def test_a_socket_error_gives_a_catalogued_reason_or_its_errno_name() -> None:
    for code, name in errno.errorcode.items():
        reason = error_reason(OSError(code, "x"))
        assert reason in Reason.__members__.values() or reason == name.lower(), (code, reason)
    assert error_reason(ConnectionResetError(errno.ECONNRESET, "x")) is Reason.RESET


def test_every_table_names_the_triggers_the_base_fires() -> None:
    # LoopSocket.on_readable/on_writable fire "readable"/"writable" in every kind's table.
    for table in LIFECYCLES:
        assert {"readable", "writable"} <= {str(row.trigger) for row in table.transitions}
