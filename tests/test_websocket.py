"""The web port's WebSocket (``--web-port``): browsers in the same chat as nc users.

Black-box: a real server, nc-like TCP clients (``conftest``) and WebSocket clients, either the
``websockets`` library's (as a browser would behave) or ``ws_harness.RawWs`` (frames by hand,
for what a library will not send and for many clients without a thread each). Every
expectation is written from what the clients send; "nothing else arrives" only after a later
message proved the server got that far.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import selectors
import signal
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from chat_harness import WELCOME, Chatter, check_replay, join
from conftest import (
    BACKLOG_LIMIT,
    HOST,
    WAIT,
    Client,
    ServerProcess,
    StartServer,
    assert_nothing_arrives,
    closed_by_server,
    peer_of,
    recv_exactly,
    recv_until,
    send_messages,
)
from tls_certs import SERVER_NAME, client_context, make_tls_files, tls_args
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection
from ws_harness import (
    BINARY,
    CLOSE,
    CONT,
    PING,
    PONG,
    TEXT,
    Frame,
    RawWs,
    WsLines,
    accepted_ws,
    apply_mask,
    decode_frames,
    encode_frame,
    new_key,
    recv_bytes,
    upgrade_request,
    web_port,
    ws_connect,
)

WEB = ("--web-port", "0")
CHAT = ("--mode", "chat")
RAW_LIMIT = 64 * 1024  # raw mode: the largest WebSocket message the server takes


class Jar:
    """WebSocket clients of one test, every one closed at teardown."""

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()
        self.raws: list[RawWs] = []

    def connect(self, port: int, **kwargs: object) -> ClientConnection:
        """A library client, entered as its context manager (websockets wants it so)."""
        return self.stack.enter_context(ws_connect(port, **kwargs))  # type: ignore[arg-type]

    def raw(self, port: int, **kwargs: object) -> RawWs:
        ws = RawWs.open(port, **kwargs)  # type: ignore[arg-type]
        self.raws.append(ws)
        return ws

    def close(self) -> None:
        for ws in self.raws:
            ws.close()
        self.stack.close()


@pytest.fixture
def jar() -> Iterator[Jar]:
    jar = Jar()
    yield jar
    jar.close()


@dataclass
class WsChatter:
    """A chat-mode WebSocket client: its connection, the server's view, its name, its lines."""

    conn: ClientConnection
    client: Client
    name: str
    lines: WsLines

    def say(self, text: str) -> None:
        """One text frame: one line (several if it holds ``\\n``)."""
        self.conn.send(text)

    def expect(self, *expected: str) -> None:
        self.lines.expect(*expected)

    def quiet(self) -> None:
        self.lines.quiet()


def ws_join(server: ServerProcess, jar: Jar, *present: Chatter | WsChatter) -> WsChatter:
    """A WebSocket client in chat mode: its welcome line first, and each of ``present`` told."""
    conn = jar.connect(web_port(server))
    client = accepted_ws(server, conn.socket)
    lines = WsLines(conn)
    first = lines.line()
    match = WELCOME.fullmatch(first.encode())
    assert match is not None, f"not a welcome line: {first!r}"
    name = match.group(1).decode()
    for other in present:
        other.expect(f"*** {name} joined lobby\n")
    return WsChatter(conn, client, name, lines)


def raw_ws(server: ServerProcess, jar: Jar) -> tuple[ClientConnection, Client]:
    """A raw-mode WebSocket client, once the server has accepted it."""
    conn = jar.connect(web_port(server))
    return conn, accepted_ws(server, conn.socket)


def close_code(conn: ClientConnection, timeout: float = WAIT) -> int | None:
    """Read until the server closes; the code of its close frame (None: no close frame)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"the server did not close within {timeout}s"
        try:
            conn.recv(remaining)
        except TimeoutError:
            continue
        except ConnectionClosed as exc:
            return None if exc.rcvd is None else int(exc.rcvd.code)


# --------------------------------------------------------------------------
# Chat mode: text frames, lines
# --------------------------------------------------------------------------


def test_chat_lines_go_both_ways_between_nc_and_websocket(
    start_server: StartServer, jar: Jar
) -> None:
    server = start_server(*WEB, *CHAT)
    nc = join(server)
    assert server.events("connection.accepted")[0].get("web") in (None, False)
    ws = ws_join(server, jar, nc)

    ws.say("hello from a browser")
    nc.expect(f"<{ws.name}> hello from a browser\n")
    nc.say("hi, browser")
    ws.expect(f"<{nc.name}> hi, browser\n")  # not its own line first: no echo
    ws.say("two\nlines")  # a frame with "\n" in it holds several lines
    nc.expect(f"<{ws.name}> two\n", f"<{ws.name}> lines\n")
    ws.say("/me waves")
    nc.expect(f"* {ws.name} waves\n")
    old = ws.name
    ws.say("/nick alice")
    ws.expect("*** you are now alice\n")
    nc.expect(f"*** {old} is now alice\n")
    ws.name = "alice"
    nc.say("/me nods")
    ws.expect(f"* {nc.name} nods\n")

    other = ws_join(server, jar, nc, ws)
    other.say("between browsers")
    ws.expect(f"<{other.name}> between browsers\n")
    nc.expect(f"<{other.name}> between browsers\n")
    ws.say("/who")
    names = sorted([nc.name, ws.name, other.name], key=str.lower)
    ws.expect(f"*** 3 in lobby: {', '.join(names)}\n")
    other.conn.close()
    nc.expect(f"*** {other.name} left lobby\n")
    ws.expect(f"*** {other.name} left lobby\n")
    closed = server.wait_closed(other.client)
    assert closed["reason"] == "peer_closed", closed  # its close frame: it closed its side
    assert closed["bytes_in"] > len("between browsers"), closed  # wire bytes: frames, request
    assert closed["bytes_out"] > 0, closed
    nc.say("last")
    ws.expect(f"<{nc.name}> last\n")
    nc.quiet()
    ws.quiet()


def test_chat_history_is_given_to_a_late_websocket_joiner(
    start_server: StartServer, jar: Jar
) -> None:
    server = start_server(*WEB, *CHAT, "--history", "5")
    a = join(server)
    b = join(server, a)
    b.expect_replay(f"*** {a.name} joined lobby\n")  # history of its own: a's join notice
    said = [f"line {i}" for i in range(6)]
    for text in said:
        a.say(text)
        b.expect(f"<{a.name}> {text}\n")
    late = ws_join(server, jar, a, b)
    check_replay(late.lines.line, [f"<{a.name}> {text}\n" for text in said[-5:]])
    a.say("live")
    late.expect(f"<{a.name}> live\n")
    b.expect(f"<{a.name}> live\n")
    late.quiet()


def test_raw_history_is_given_to_a_late_websocket_joiner(
    start_server: StartServer, jar: Jar
) -> None:
    server = start_server(*WEB, "--history", "3")
    sender, listener = server.connect_many(2)
    messages = [f"<{i}>".encode() + os.urandom(20 + i) for i in range(5)]
    send_messages(server, sender, messages)
    everything = b"".join(messages)
    assert recv_exactly(listener.sock, len(everything)) == everything
    late, _ = raw_ws(server, jar)
    last_three = b"".join(messages[-3:])
    assert recv_bytes(late, len(last_three)) == last_three
    sender.sock.sendall(b"live")
    assert recv_bytes(late, 4) == b"live"
    assert recv_exactly(listener.sock, 4) == b"live"


# --------------------------------------------------------------------------
# Raw mode: binary frames, bytes as they are
# --------------------------------------------------------------------------


def test_raw_bytes_go_both_ways_as_binary_frames(start_server: StartServer, jar: Jar) -> None:
    server = start_server(*WEB)
    nc = server.connect()
    ws, _ = raw_ws(server, jar)
    ws2, _ = raw_ws(server, jar)

    ws.send(b"\x00from a browser\xff")
    assert recv_exactly(nc.sock, 16) == b"\x00from a browser\xff"
    assert recv_bytes(ws2, 16) == b"\x00from a browser\xff"
    ws.send("text frames too: caf\u00e9")  # a text frame's UTF-8 bytes, as they are
    text = "text frames too: caf\u00e9".encode()
    assert recv_exactly(nc.sock, len(text)) == text
    assert recv_bytes(ws2, len(text)) == text
    nc.sock.sendall(b"from nc\r\n\x00")
    assert recv_bytes(ws, 10) == b"from nc\r\n\x00"  # the first bytes ws gets: no echo of its own
    assert recv_bytes(ws2, 10) == b"from nc\r\n\x00"
    ws2.send(b"ws2")
    assert recv_bytes(ws, 3) == b"ws2"
    assert recv_exactly(nc.sock, 3) == b"ws2"
    assert_nothing_arrives(nc.sock)


def test_raw_mode_carries_all_256_byte_values_both_ways(
    start_server: StartServer, jar: Jar
) -> None:
    server = start_server(*WEB)
    nc = server.connect()
    ws, _ = raw_ws(server, jar)
    ws2, _ = raw_ws(server, jar)
    every = bytes(range(256)) + bytes(reversed(range(256)))
    big = os.urandom(40_000) + every

    ws.send(every)
    assert recv_exactly(nc.sock, len(every)) == every
    assert recv_bytes(ws2, len(every)) == every
    nc.sock.sendall(every)
    assert recv_bytes(ws, len(every)) == every
    assert recv_bytes(ws2, len(every)) == every
    ws2.send(big)
    assert recv_exactly(nc.sock, len(big)) == big
    assert recv_bytes(ws, len(big)) == big
    nc.sock.sendall(big)
    assert recv_bytes(ws, len(big)) == big
    assert recv_bytes(ws2, len(big)) == big


def test_bytes_in_and_out_count_every_byte_on_the_wire(start_server: StartServer) -> None:
    """``connection.closed``'s bytes_in and bytes_out of a WebSocket client are wire bytes:
    the upgrade request and its 101, frame headers, close frames; also a frame that came in
    the same segment as the request."""
    server = start_server(*WEB)
    nc = server.connect()
    port = web_port(server)
    sock = socket.create_connection((HOST, port), timeout=WAIT)
    ws = RawWs(sock)
    try:
        key = new_key()
        first = encode_frame(BINARY, b"with the request", mask=os.urandom(4))
        ws.send(upgrade_request(f"{HOST}:{port}", key) + first)  # one send, one segment
        ws.upgraded(key)
        client = accepted_ws(server, sock)
        assert recv_exactly(nc.sock, 16) == b"with the request"
        nc.sock.sendall(b"to the browser")
        assert ws.frame() == Frame(BINARY, b"to the browser")
        ws.send_frame(BINARY, b"x" * 300)
        assert recv_exactly(nc.sock, 300) == b"x" * 300
        ws.send_frame(CLOSE, struct.pack("!H", 1000))
        assert ws.frames_until_close()[-1].close_code == 1000
        assert ws.eof() == b""
        closed = server.wait_closed(client)
    finally:
        ws.close()
    assert closed["reason"] == "peer_closed", closed
    assert (closed["bytes_in"], closed["bytes_out"]) == (ws.sent, ws.received), closed


def test_a_fragmented_message_is_relayed_and_utf8_may_span_fragments(
    start_server: StartServer, jar: Jar
) -> None:
    server = start_server(*WEB)
    nc = server.connect()
    ws = jar.raw(web_port(server))
    accepted_ws(server, ws.sock)
    # "café": the two bytes of "é" are in two fragments; ping in between (RFC 6455 5.4).
    ws.send_frame(TEXT, b"caf\xc3", fin=False)
    ws.send_frame(PING, b"mid")
    ws.send_frame(CONT, b"\xa9!", fin=True)
    pong = ws.frame()
    assert (pong.opcode, pong.payload) == (PONG, b"mid"), pong
    assert recv_until(nc.sock, lambda b: b.endswith(b"!"), "the message") == b"caf\xc3\xa9!"


# --------------------------------------------------------------------------
# Origin
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "null", "http://127.0.0.1:1", "http://127.0.0.1.evil.example"],
)
def test_a_cross_site_origin_is_refused_with_403(
    start_server: StartServer, jar: Jar, origin: str
) -> None:
    server = start_server(*WEB, *CHAT)
    nc = join(server)
    with pytest.raises(InvalidStatus) as refused:
        jar.connect(web_port(server), origin=origin)
    assert refused.value.response.status_code == 403
    # It never joined; the chat goes on.
    ws = ws_join(server, jar, nc)
    ws.say("still here")
    nc.expect(f"<{ws.name}> still here\n")
    nc.quiet()


def test_same_origin_and_no_origin_are_accepted(start_server: StartServer, jar: Jar) -> None:
    server = start_server(*WEB)
    port = web_port(server)
    nc = server.connect()
    same, _ = raw_ws(server, jar)  # the library sends no Origin unless told
    same_site = jar.connect(port, origin=f"http://{HOST}:{port}")
    accepted_ws(server, same_site.socket)
    same_site.send(b"same origin")
    assert recv_exactly(nc.sock, 11) == b"same origin"
    assert recv_bytes(same, 11) == b"same origin"


def test_web_origin_allows_the_origins_it_names_and_only_those(
    start_server: StartServer, jar: Jar
) -> None:
    server = start_server(*WEB, "--web-origin", "https://chat.example.org",
                          "--web-origin", "http://other.example:8000")
    port = web_port(server)
    nc = server.connect()
    for origin in ("https://chat.example.org", "http://other.example:8000"):
        conn = jar.connect(port, origin=origin)
        accepted_ws(server, conn.socket)
        conn.send(origin.encode())
        assert recv_exactly(nc.sock, len(origin)) == origin.encode()
    for origin in ("http://chat.example.org", "https://chat.example.org:8443",
                   "http://other.example", "http://evil.example"):
        with pytest.raises(InvalidStatus) as refused:
            jar.connect(port, origin=origin)
        assert refused.value.response.status_code == 403, origin


def test_web_origin_star_allows_any_origin(start_server: StartServer, jar: Jar) -> None:
    server = start_server(*WEB, "--web-origin", "*")
    nc = server.connect()
    conn = jar.connect(web_port(server), origin="http://anywhere.example")
    accepted_ws(server, conn.socket)
    conn.send(b"from anywhere")
    assert recv_exactly(nc.sock, 13) == b"from anywhere"


# --------------------------------------------------------------------------
# Limits and protocol errors
# --------------------------------------------------------------------------


def test_a_chat_message_over_max_line_is_closed_with_1009_and_the_chat_goes_on(
    start_server: StartServer, jar: Jar
) -> None:
    server = start_server(*WEB, *CHAT, "--max-line", "100")
    nc = join(server)
    big = ws_join(server, jar, nc)
    other = ws_join(server, jar, nc, big)
    big.say("x" * 60)  # under the limit: relayed
    nc.expect(f"<{big.name}> {'x' * 60}\n")
    other.expect(f"<{big.name}> {'x' * 60}\n")
    big.say(os.urandom(150).hex())  # 300 characters, not compressible to under 100
    assert close_code(big.conn) == 1009
    assert server.wait_closed(big.client)["reason"] == "message_too_big"
    nc.expect(f"*** {big.name} left lobby\n")
    other.expect(f"*** {big.name} left lobby\n")
    other.say("after that")
    nc.expect(f"<{other.name}> after that\n")
    nc.say("and back")
    other.expect(f"<{nc.name}> and back\n")
    nc.quiet()


def test_a_raw_message_over_64k_is_closed_with_1009_and_nothing_of_it_relayed(
    start_server: StartServer, jar: Jar
) -> None:
    server = start_server(*WEB)
    nc = server.connect()
    big, big_client = raw_ws(server, jar)
    other, _ = raw_ws(server, jar)
    largest = os.urandom(RAW_LIMIT)
    big.send(largest)  # exactly the limit: relayed
    assert recv_exactly(nc.sock, RAW_LIMIT, timeout=WAIT) == largest
    assert recv_bytes(other, RAW_LIMIT) == largest
    big.send(os.urandom(RAW_LIMIT + 1))
    assert close_code(big) == 1009
    assert server.wait_closed(big_client)["reason"] == "message_too_big"
    other.send(b"the chat goes on")
    assert recv_exactly(nc.sock, 16) == b"the chat goes on"  # the first bytes after: none of it
    nc.sock.sendall(b"both ways")
    assert recv_bytes(other, 9) == b"both ways"


@pytest.mark.parametrize("mode", ["raw", "chat"])
def test_a_text_frame_that_is_not_utf8_is_closed_with_1007(
    start_server: StartServer, jar: Jar, mode: str
) -> None:
    server = start_server(*WEB, "--mode", mode)
    nc = server.connect()
    bad = jar.raw(web_port(server))
    bad_client = accepted_ws(server, bad.sock)
    bad.send_frame(TEXT, b"not utf-8: \xff\xfe\xc3(")
    frames = bad.frames_until_close()
    assert frames[-1].close_code == 1007, frames
    assert server.wait_closed(bad_client)["reason"] == "websocket_error"
    # Nothing of it reached nc: the next thing nc gets is what a later client says.
    good, _ = raw_ws(server, jar)
    good.send("fine\n")
    got = recv_until(nc.sock, lambda b: b.endswith(b"fine\n"), "the good line")
    assert b"utf-8" not in got, got
    assert b"\xff" not in got, got


def test_a_binary_frame_in_chat_mode_is_closed_with_1003(
    start_server: StartServer, jar: Jar
) -> None:
    """Chat mode's lines are text (docs/using.md): a binary frame is unsupported data."""
    server = start_server(*WEB, *CHAT)
    nc = join(server)
    ws = ws_join(server, jar, nc)
    ws.conn.send(b"binary line\n")
    assert close_code(ws.conn) == 1003
    assert server.wait_closed(ws.client)["reason"] == "websocket_error"
    nc.expect(f"*** {ws.name} left lobby\n")  # and not the line
    other = ws_join(server, jar, nc)
    other.say("text is fine")
    nc.expect(f"<{other.name}> text is fine\n")


def test_an_unmasked_client_frame_is_a_protocol_error(
    start_server: StartServer, jar: Jar
) -> None:
    """RFC 6455 5.1: a server closes a connection whose client sends an unmasked frame."""
    server = start_server(*WEB)
    nc = server.connect()
    bad = jar.raw(web_port(server))
    bad_client = accepted_ws(server, bad.sock)
    bad.sock.sendall(encode_frame(BINARY, b"unmasked", mask=None))
    frames = bad.frames_until_close()
    assert frames[-1].close_code == 1002, frames
    assert server.wait_closed(bad_client)["reason"] == "websocket_error"
    assert_nothing_arrives(nc.sock)


def http_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection; everything until the server closes it (a
    well-formed request asks for that with ``Connection: close``)."""
    with socket.create_connection((HOST, port), timeout=WAIT) as sock:
        sock.sendall(request)
        return closed_by_server(sock)


def get(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: x", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def status_of(response: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", response)
    assert match is not None, f"not an HTTP response: {response[:200]!r}"
    return int(match.group(1))


def test_bad_requests_get_400_404_426_and_the_chat_goes_on(
    start_server: StartServer, jar: Jar
) -> None:
    server = start_server(*WEB, *CHAT)
    port = web_port(server)
    nc = join(server)
    ws = ws_join(server, jar, nc)
    assert status_of(http_exchange(port, b"this is not HTTP at all\r\n\r\n")) == 400
    assert status_of(http_exchange(port, b"GET /ws HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")) in (
        400, 426)
    assert status_of(http_exchange(port, get("/nope"))) == 404
    assert status_of(http_exchange(port, get("/../../etc/passwd"))) in (400, 404)
    assert status_of(http_exchange(port, get("/ws"))) == 426
    # An upgrade with the wrong version or no key is no WebSocket either.
    key = new_key()
    bad_version = upgrade_request(f"{HOST}:{port}", key).replace(
        b"Version: 13\r\n", b"Version: 8\r\nConnection: close\r\n")
    assert status_of(http_exchange(port, bad_version)) in (400, 426)
    ws.say("still chatting")
    nc.expect(f"<{ws.name}> still chatting\n")
    nc.say("yes")
    ws.expect(f"<{nc.name}> yes\n")
    nc.quiet()
    ws.quiet()


def test_the_page_and_its_files_are_served_with_a_strict_csp_and_no_cookie(
    start_server: StartServer,
) -> None:
    server = start_server(*WEB)
    port = web_port(server)
    for path, kind in (("/", "text/html"), ("/app.js", "javascript"), ("/style.css", "text/css")):
        conn = http.client.HTTPConnection(HOST, port, timeout=WAIT)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        assert response.status == 200, (path, response.status)
        assert kind in (response.getheader("Content-Type") or ""), (path, response.headers)
        assert body, path
        assert response.getheader("Set-Cookie") is None, path
        csp = response.getheader("Content-Security-Policy") or ""
        assert "default-src 'self'" in csp, (path, csp)
        assert "unsafe-inline" not in csp, (path, csp)


# --------------------------------------------------------------------------
# Ping, shutdown, --max-clients, TLS
# --------------------------------------------------------------------------


def test_a_ping_from_the_client_is_answered_with_a_pong(
    start_server: StartServer, jar: Jar
) -> None:
    server = start_server(*WEB)
    conn, _ = raw_ws(server, jar)
    assert conn.ping(b"are you there").wait(WAIT), "no pong from the library's ping"
    raw = jar.raw(web_port(server))
    raw.send_frame(PING, b"\x00\xffpayload")
    pong = raw.frame()
    assert (pong.opcode, pong.payload) == (PONG, b"\x00\xffpayload"), pong


def test_sigterm_delivers_the_queue_then_closes_with_1001(
    start_server: StartServer, jar: Jar
) -> None:
    server = start_server(*WEB, *BACKLOG_LIMIT)
    writer = server.connect()
    reader = jar.raw(web_port(server), rcvbuf=16 * 1024)  # reads nothing for now
    reader_client = accepted_ws(server, reader.sock)
    payload = os.urandom(4 * 1024 * 1024)
    writer.sock.settimeout(30)
    writer.sock.sendall(payload)
    server.wait_received_from(writer, len(payload), timeout=20)
    assert server.bytes_sent_to(reader_client) < len(payload), "precondition: data queued"

    server.send_signal(signal.SIGTERM)
    server.wait_event("server.stopping")
    frames = reader.frames_until_close(timeout=20)
    close = frames.pop()
    assert close.close_code == 1001, close
    assert {f.opcode for f in frames} <= {BINARY, CONT}, {f.opcode for f in frames}
    got = b"".join(f.payload for f in frames)
    assert len(got) == len(payload)
    assert got == payload
    reader.sock.sendall(encode_frame(CLOSE, struct.pack("!H", 1001), mask=b"\x01\x02\x03\x04"))
    assert reader.eof() == b"", "the server sent something after its close frame"
    assert server.wait_exit() == 0
    assert server.wait_closed(reader_client)["reason"] == "server_shutdown"


def test_sigterm_closes_an_idle_library_client_with_1001(
    start_server: StartServer, jar: Jar
) -> None:
    server = start_server(*WEB, *CHAT)
    ws = ws_join(server, jar)
    server.send_signal(signal.SIGTERM)
    assert close_code(ws.conn) == 1001
    assert server.wait_exit() == 0


def test_max_clients_counts_websocket_clients(start_server: StartServer, jar: Jar) -> None:
    server = start_server(*WEB, "--max-clients", "2", "--log-level", "info")
    port = web_port(server)
    first, first_client = raw_ws(server, jar)
    raw_ws(server, jar)
    nc = server.raw_connect()
    assert server.wait_event("connection.rejected", peer=peer_of(nc))["reason"] == "server_full"
    assert closed_by_server(nc) == b""
    # Turned away in words a page's script can read: the upgrade is accepted, then a close
    # frame says why (raw mode: no text frame among the relay's binary ones), and no seat.
    late = jar.raw(port)
    assert server.wait_event("connection.rejected", peer=late.peer)["reason"] == "server_full"
    [close] = late.frames_until_close()
    assert close.close_code == 1013, close
    assert close.payload[2:] == b"the chat is full (2 people); try again later", close
    assert late.eof() == b""
    assert not [e for e in server.events("connection.accepted") if e["peer"] == late.peer]
    first.close()
    server.wait_closed(first_client)
    server.connect()  # a place is free again: accepted


def test_wss_with_tls_cert_joins_the_plain_chat(
    start_server: StartServer, jar: Jar, tmp_path: Path
) -> None:
    files = make_tls_files(tmp_path)
    server = start_server(*WEB, *CHAT, *tls_args(files))
    port = web_port(server)
    nc = join(server)
    conn = jar.connect(port, context=client_context(files), server_hostname=SERVER_NAME)
    client = accepted_ws(server, conn.socket)
    accepted = server.events()[client.accepted_index]
    assert accepted.get("tls") is True, accepted
    lines = WsLines(conn)
    match = WELCOME.fullmatch(lines.line().encode())
    assert match is not None
    name = match.group(1).decode()
    nc.expect(f"*** {name} joined lobby\n")
    conn.send("over wss")
    nc.expect(f"<{name}> over wss\n")
    nc.say("over tcp")
    lines.expect(f"<{nc.name}> over tcp\n")
    # A plain WebSocket on the TLS port gets no upgrade.
    with pytest.raises((InvalidHandshake, OSError, EOFError)):
        jar.connect(port)


# --------------------------------------------------------------------------
# Many clients
# --------------------------------------------------------------------------

CROWD_WS = 200
CROWD_TCP = 200
CROWD_MESSAGES = 10  # lines each client sends
IN_FLIGHT = 32  # connections opened but not welcomed yet
LINE = re.compile(rb"<([A-Za-z0-9_-]+)> m (\d+) (\d+)\n")


class Member:
    """One client of the crowd over a non-blocking socket: a WebSocket or a TCP one."""

    def __init__(self, index: int, sock: socket.socket, ws: bool, key: str) -> None:
        self.index = index
        self.sock = sock
        self.ws = ws
        self.key = key
        self.upgraded = not ws
        self.raw = bytearray()  # bytes read, not yet frames (or lines, for TCP)
        self.text = bytearray()  # line bytes not yet a whole line
        self.name = ""
        self.last: dict[int, int] = {}  # sender -> last seq seen
        self.received = 0  # message lines
        self.bad: list[bytes] = []

    def feed(self, chunk: bytes, names: dict[bytes, int]) -> None:
        self.raw += chunk
        if not self.upgraded:
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.raw[: end + 4])
            assert head.startswith(b"HTTP/1.1 101"), head[:200]
            del self.raw[: end + 4]
            self.upgraded = True
        if self.ws:
            for frame in decode_frames(self.raw):
                assert frame.opcode == TEXT and frame.fin, frame
                assert frame.payload.endswith(b"\n"), frame
                self.text += frame.payload
        else:
            self.text += self.raw
            self.raw.clear()
        cut = self.text.rfind(b"\n") + 1
        if not cut:
            return
        whole = bytes(self.text[:cut])
        del self.text[:cut]
        for line in whole.splitlines(keepends=True):
            self.line(line, names)

    def line(self, line: bytes, names: dict[bytes, int]) -> None:
        if not self.name:
            match = WELCOME.fullmatch(line)
            assert match is not None, f"client {self.index}: not a welcome: {line!r}"
            self.name = match.group(1).decode()
            return
        if line.startswith(b"*** "):
            return  # join notices
        match = LINE.fullmatch(line)
        if match is None or names.get(match.group(1)) != int(match.group(2)):
            self.bad.append(line)
            return
        sender, seq = int(match.group(2)), int(match.group(3))
        if sender == self.index or seq != self.last.get(sender, -1) + 1:
            self.bad.append(line)
        self.last[sender] = seq
        self.received += 1

    def send_messages(self) -> None:
        lines = [f"m {self.index} {seq}".encode() for seq in range(CROWD_MESSAGES)]
        if self.ws:
            data = b"".join(encode_frame(TEXT, line, mask=os.urandom(4)) for line in lines)
        else:
            data = b"".join(line + b"\n" for line in lines)
        self.sock.settimeout(WAIT)
        self.sock.sendall(data)
        self.sock.setblocking(False)


class Crowd:
    """Many members in one ``selectors`` loop of the test process: no thread per client."""

    def __init__(self, ports: dict[bool, int], deadline: float) -> None:
        self.ports = ports
        self.deadline = deadline
        self.sel = selectors.DefaultSelector()
        self.members: list[Member] = []
        self.names: dict[bytes, int] = {}  # name -> member, from the welcome lines

    def pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            member: Member = key.data
            try:
                chunk = member.sock.recv(1 << 18)
            except BlockingIOError:
                continue
            assert chunk, f"client {member.index} ({member.name}) closed by the server"
            had_name = bool(member.name)
            member.feed(chunk, self.names)
            if member.name and not had_name:
                self.names[member.name.encode()] = member.index

    def join(self, kinds: list[bool]) -> None:
        """Everyone in (``kinds``: True for a WebSocket), at most IN_FLIGHT not welcomed yet,
        so that the listen backlog never overflows (that costs a SYN retry of a second)."""
        total = len(kinds)
        while len(self.names) < total:
            assert time.monotonic() < self.deadline, f"{len(self.names)} of {total} welcomed"
            while len(self.members) < total and len(self.members) - len(self.names) < IN_FLIGHT:
                ws = kinds[len(self.members)]
                sock = socket.create_connection((HOST, self.ports[ws]), timeout=WAIT)
                key = new_key()
                if ws:
                    sock.sendall(upgrade_request(f"{HOST}:{self.ports[ws]}", key))
                sock.setblocking(False)
                member = Member(len(self.members), sock, ws, key)
                self.members.append(member)
                self.sel.register(sock, selectors.EVENT_READ, member)
            self.pump(1.0)

    def receive(self, want: int) -> None:
        """Until every member has ``want`` message lines; any wrong line fails at once."""
        while any(m.received < want for m in self.members):
            short = sum(1 for m in self.members if m.received < want)
            assert time.monotonic() < self.deadline, f"{short} clients short of {want} lines"
            self.pump(1.0)
            bad = [(m.index, m.bad[:3]) for m in self.members if m.bad]
            assert not bad, f"wrong lines (client, first ones): {bad[:5]}"

    def close(self) -> None:
        for member in self.members:
            member.sock.close()
        self.sel.close()


def test_200_websocket_and_200_tcp_clients_each_get_every_message_in_order(
    start_server: StartServer,
) -> None:
    server = start_server(*WEB, *CHAT, "--log-level", "info", "--max-clients-per-addr", "0")
    started = time.monotonic()
    total = CROWD_WS + CROWD_TCP
    kinds = [i % 2 == 0 for i in range(total)]  # interleaved: ws, tcp, ws, ...
    assert kinds.count(True) == CROWD_WS
    crowd = Crowd({True: web_port(server), False: server.port}, started + 40)
    try:
        crowd.join(kinds)
        # Every welcome arrived, so everyone is in the chat. Now everyone speaks.
        for member in crowd.members:
            member.send_messages()
        want = (total - 1) * CROWD_MESSAGES
        crowd.receive(want)
        for m in crowd.members:
            assert m.received == want, (m.index, m.received)
            assert len(m.last) == total - 1, (m.index, len(m.last))
            assert set(m.last.values()) == {CROWD_MESSAGES - 1}, m.index
    finally:
        crowd.close()
    assert time.monotonic() - started < 30, "the crowd took too long"
    assert server.proc.poll() is None


def test_mask_helper_round_trips() -> None:
    """The hand-made frames are right (else the tests above would test the harness)."""
    mask = b"\x12\x34\x56\x78"
    data = bytes(range(256)) * 3 + b"tail"
    assert apply_mask(apply_mask(data, mask), mask) == data
    assert apply_mask(b"abcd", mask) == bytes(a ^ b for a, b in zip(b"abcd", mask, strict=True))
    for size in (0, 125, 126, 65535, 65536, 70000):
        buf = bytearray(encode_frame(BINARY, b"x" * size, mask=None) + b"\x81")
        frames = decode_frames(buf)
        assert [(f.opcode, len(f.payload)) for f in frames] == [(BINARY, size)]
        assert buf == b"\x81"  # a partial frame stays
