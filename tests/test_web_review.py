"""Adversarial black-box tests of the web port: what a hostile or unlucky client can do.

A raw socket speaks the WebSocket protocol here (frames masked by hand, so the tests can also
send what no library would); wsproto's client side reads what the server sends, and checks it
as a browser would. Each test names the defect it was written for.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import conftest
import pytest
from conftest import HOST, WAIT, Event, ServerProcess, StartServer
from wsproto import ConnectionType
from wsproto.connection import Connection as WsParser
from wsproto.events import BytesMessage, CloseConnection, Pong, TextMessage

TEXT, BINARY, CLOSE, PING = 0x1, 0x2, 0x8, 0x9


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One client frame, masked as RFC 6455 wants."""
    size = len(payload)
    first = (0x80 if fin else 0) | opcode
    if size < 126:
        head = bytes((first, 0x80 | size))
    elif size < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, size)
    key = os.urandom(4)
    stream = (key * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(size, "big")
    return head + key + masked


def handshake(port: int, extra: str = "", version: str = "1.1", host: bool = True) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    host_line = f"Host: {HOST}:{port}\r\n" if host else ""
    return (f"GET /ws HTTP/{version}\r\n{host_line}Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


def web_port(srv: ServerProcess) -> int:
    return int(srv.wait_event("server.started")["web_port"])


def answer(port: int, request: bytes) -> bytes:
    """The server's whole answer to ``request`` on a fresh connection, up to its close."""
    with socket.create_connection((HOST, port), timeout=WAIT) as sock:
        sock.sendall(request)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        return got


class Browser:
    """A WebSocket client on a raw socket; ``events`` is what the server sent, parsed."""

    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(WAIT)
        self.sock.connect((HOST, port))
        self.peer = conftest.peer_of(self.sock)
        self.sock.sendall(handshake(port))
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = self.sock.recv(65536)
            assert chunk, f"closed during the handshake: {got!r}"
            got += chunk
        head, _, rest = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        self.parser = WsParser(ConnectionType.CLIENT)
        self.parser.receive_data(rest)
        self.events: list[Any] = list(self.parser.events())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait(self, ready: Callable[[], bool], what: str) -> None:
        """Read until ``ready()``; the server closing first, or WAIT seconds, fail."""
        deadline = time.monotonic() + WAIT
        while not ready():
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {what}; last events {self.events[-3:]!r}"
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            assert data, f"the server closed before {what}; last events {self.events[-3:]!r}"
            self.parser.receive_data(data)
            self.events += self.parser.events()

    def close_frame(self) -> CloseConnection:
        self.wait(lambda: any(isinstance(e, CloseConnection) for e in self.events),
                  "a close frame")
        return next(e for e in self.events if isinstance(e, CloseConnection))

    def binary(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, BytesMessage))

    def text(self) -> str:
        return "".join(e.data for e in self.events if isinstance(e, TextMessage))


def closed_event(srv: ServerProcess, peer: str) -> Event:
    return srv.wait_for(lambda e: e.get("event") == "connection.closed" and e.get("peer") == peer,
                        what=f"connection.closed for {peer}")


def no_bug(srv: ServerProcess) -> None:
    assert srv.events("lifecycle.bug") == []
    assert "Traceback" not in srv.stderr()


@pytest.fixture
def debug_server(start_server: StartServer) -> Callable[..., ServerProcess]:
    def start(*extra: str) -> ServerProcess:
        return start_server("--web-port", "0", "--log-format", "json", "--log-level", "debug",
                            *extra)
    return start


# -- a close or a refusal that came with a read the rate or flow control held back ----------------


@pytest.mark.parametrize("mode", ["raw", "chat"])
def test_a_close_frame_behind_a_rate_limited_message_is_answered(
        debug_server: Callable[..., ServerProcess], mode: str) -> None:
    """The close frame came in the read that took the sender past --max-recv-rate: it must be
    answered once the rate allows (it was dropped, and the browser hung until it gave up)."""
    srv = debug_server("--mode", mode, "--max-recv-rate", "4000")
    browser = Browser(web_port(srv))
    message = b"x" * 3000  # with its frames, more than the bucket's 4000 bytes left after it
    browser.send(frame(TEXT, message) + frame(TEXT, message) + frame(CLOSE, b"\x03\xe8bye"))
    assert browser.close_frame().code == 1000
    assert closed_event(srv, browser.peer)["reason"] == "peer_closed"
    no_bug(srv)


def test_bad_utf8_behind_a_rate_limited_message_is_refused(
        debug_server: Callable[..., ServerProcess]) -> None:
    """The same for a text frame that is not UTF-8: 1007, not a client left in the chat whose
    parser has stopped for good."""
    srv = debug_server("--mode", "chat", "--max-recv-rate", "4000")
    browser = Browser(web_port(srv))
    browser.send(frame(TEXT, b"y" * 3000) + frame(TEXT, b"y" * 3000) + frame(TEXT, b"\xff"))
    assert browser.close_frame().code == 1007
    assert closed_event(srv, browser.peer)["reason"] == "websocket_error"
    no_bug(srv)


def test_quit_and_a_close_frame_in_one_read_get_a_close_frame(
        debug_server: Callable[..., ServerProcess]) -> None:
    """A page that sends /quit and closes at once: /quit ended it while its close frame was
    parsed already, and neither the server's close frame nor the answer to its own went out."""
    srv = debug_server("--mode", "chat")
    browser = Browser(web_port(srv))
    browser.send(frame(TEXT, b"/quit") + frame(CLOSE, b"\x03\xe8"))
    assert browser.close_frame().code == 1000
    assert "*** bye\n" in browser.text()
    assert closed_event(srv, browser.peer)["reason"] == "quit"
    no_bug(srv)


# -- control frames obey the limits too -----------------------------------------------------------


def test_pings_from_a_client_that_never_reads_are_bounded(
        debug_server: Callable[..., ServerProcess]) -> None:
    """Every ping is answered with a pong, queued: one that never reads must be closed at the
    output limit like any client (the pongs queued without limit, the server's memory grew)."""
    srv = debug_server("--max-queue-bytes", "64K")
    browser = Browser(web_port(srv), rcvbuf=4096)
    burst = frame(PING, b"p" * 125) * 2000  # 262 kB of pings, as many pongs
    browser.sock.settimeout(0.2)
    deadline = time.monotonic() + WAIT
    while not srv.events("connection.queue_limit") and time.monotonic() < deadline:
        try:
            browser.sock.sendall(burst)
        except TimeoutError:  # the server stopped reading it: what is sent so far will do
            pass
        except OSError:  # closed: the event is on its way
            break
    assert closed_event(srv, browser.peer)["reason"] == "queue_limit"
    no_bug(srv)


def test_the_receive_rate_counts_pings(debug_server: Callable[..., ServerProcess]) -> None:
    """--max-recv-rate is the bytes a client may send: pings are bytes too (they were read at
    full speed, each answered, whatever the rate)."""
    srv = debug_server("--max-recv-rate", "2000")
    browser = Browser(web_port(srv))
    count = 1000
    browser.send(frame(PING, b"p" * 100) * count)  # 106 kB: more than one read, and 53 s' worth
    browser.wait(lambda: any(isinstance(e, Pong) for e in browser.events), "a first pong")
    accepted = srv.wait_event("connection.accepted", peer=browser.peer)
    srv.wait_event("connection.limited", fd=accepted["fd"])
    assert sum(isinstance(e, Pong) for e in browser.events) < count
    no_bug(srv)


# -- the largest message, at the smallest output limit --------------------------------------------


def test_a_browser_gets_the_largest_message_at_the_smallest_queue_limit(
        debug_server: Callable[..., ServerProcess]) -> None:
    """--max-queue-bytes may be as small as 64K, "the largest message": a browser must get a
    64 KiB read in raw mode, as an nc user does (its frame's header took it over the limit)."""
    srv = debug_server("--mode", "raw", "--max-queue-bytes", "64K")
    browser = Browser(web_port(srv))
    srv.wait_event("connection.accepted", peer=browser.peer)
    sender = srv.connect()
    message = os.urandom(64 * 1024)
    sender.sock.sendall(message)
    browser.wait(lambda: len(browser.binary()) >= len(message), "the whole message")
    assert browser.binary() == message
    no_bug(srv)


def test_a_browser_sends_an_nc_user_no_more_than_the_largest_message_at_once(
        debug_server: Callable[..., ServerProcess]) -> None:
    """Raw mode: a TCP client's read is at most 64 KiB, and so is what a recipient gets from one
    sender in a loop turn; a browser's read that completes the rest of one message and the
    next, joined, takes an idle nc user at the smallest output limit past it."""
    srv = debug_server("--mode", "raw", "--max-queue-bytes", "64K")
    reader = srv.connect()
    browser = Browser(web_port(srv))
    fd = srv.wait_event("connection.accepted", peer=browser.peer)["fd"]
    first, second = b"a" * 60000, b"b" * 60000
    head = frame(BINARY, first)
    browser.send(head[:-10])
    srv.wait_event("data.received", fd=fd, bytes=len(head) - 10)
    browser.send(head[-10:] + frame(BINARY, second))
    got = b""
    while len(got) < len(first) + len(second):
        chunk = reader.sock.recv(1 << 20)
        assert chunk, f"closed after {len(got)} bytes: {srv.wait_closed(reader)}"
        got += chunk
    assert got == first + second
    no_bug(srv)


# -- handshakes --------------------------------------------------------------------------------


def test_an_http10_handshake_without_host_is_answered_400(
        debug_server: Callable[..., ServerProcess]) -> None:
    """HTTP/1.0 needs no Host, wsproto's handshake does (it raised past the site: a
    lifecycle.bug, and no answer)."""
    srv = debug_server()
    port = web_port(srv)
    got = answer(port, handshake(port, version="1.0", host=False))
    assert got.startswith(b"HTTP/1.1 400 "), got
    srv.wait_event("http.request", status=400)
    no_bug(srv)


@pytest.mark.parametrize("together", [True, False])
def test_a_handshake_with_a_body_is_refused_however_it_arrives(
        debug_server: Callable[..., ServerProcess], together: bool) -> None:
    """A handshake with a body: one answer, however TCP cut it (it was 101 with the body in
    the same segment, and its body read as frames, 1002, when the body came later)."""
    srv = debug_server()
    port = web_port(srv)
    request = handshake(port, extra="Content-Length: 5\r\n")
    with socket.create_connection((HOST, port), timeout=WAIT) as sock:
        sock.sendall(request + b"HELLO" if together else request)
        got = sock.recv(65536)
        assert got.startswith(b"HTTP/1.1 400 "), got
    no_bug(srv)


# -- the web port's connections and the chat's seats -----------------------------------------


FD_LIMIT = 128


@pytest.fixture
def few_descriptors(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The server runs with a small descriptor limit (the test process keeps its own)."""
    script = ("import resource, runpy, sys; "
              f"resource.setrlimit(resource.RLIMIT_NOFILE, ({FD_LIMIT}, {FD_LIMIT})); "
              "sys.argv[0] = 'fsmchat'; runpy.run_module('fsmchat', run_name='__main__')")
    monkeypatch.setattr(conftest, "server_command",
                        lambda *args: [sys.executable, "-c", script, *args])
    yield


def test_slow_web_clients_take_no_chat_seat(few_descriptors: None,
                                            debug_server: Callable[..., ServerProcess]) -> None:
    """Every HTTP place of the web port held by a client that never finishes its request: each
    of --max-clients (its default) still gets in (the places' descriptors were not kept out of
    it, so accept ran out of them first)."""
    srv = debug_server("--mode", "raw", "--max-clients-per-addr", "0")
    port = web_port(srv)
    max_clients = int(srv.wait_event("server.started")["max_clients"])
    slow = []
    for _ in range(64):  # the web port's places
        sock = socket.create_connection((HOST, port), timeout=WAIT)
        sock.sendall(b"GET / HTTP/1.1\r\n")
        slow.append(sock)
    try:
        clients = srv.connect_many(max_clients)
        assert len(clients) == max_clients
        assert srv.events("accept.failed") == []
    finally:
        for sock in slow:
            sock.close()
    no_bug(srv)
