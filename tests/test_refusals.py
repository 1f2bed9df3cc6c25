"""Refusals said in words: a chat-mode client the server turns away or closes reads one ``*** ``
line saying why, then the close, as a person with nc sees it; on the web port the same line
comes as a text frame, then a close frame whose code says whether trying again may help (1013)
or not (1008).

Real server processes for everything a client can bring about; two checks in-process (a
descriptor select cannot watch, and ``hub.close_with``, which a moderator's /kick uses), where
no real client gets. Raw mode stays a byte relay: its refusals say nothing (tests/test_access.py,
tests/test_limits.py check that).
"""

from __future__ import annotations

import contextlib
import io
import math
import socket
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from chat_harness import Chatter, Lines, join
from conftest import (
    BACKLOG_LIMIT,
    HOST,
    WAIT,
    ServerProcess,
    StartServer,
    closed_by_server,
    peer_of,
    recv_until_eof,
)
from test_model import ScriptedSocket
from tls_certs import (
    Sockets,
    client_context,
    connect_tls,
    make_tls_files,
    timestamp,
    tls_args,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from ws_harness import TEXT, RawWs, WsLines, accepted_ws, web_port, ws_connect
from wsproto import ConnectionType, WSConnection

from fsmchat.connection import FAREWELL_TIMEOUT, Connection
from fsmchat.net.loop import FD_SETSIZE, EventLoop
from fsmchat.net.sock import contain_in
from fsmchat.ops.events import make_logger
from fsmchat.ops.logstream import LogStream
from fsmchat.options import Options
from fsmchat.reasons import Reason
from fsmchat.server import Server
from fsmchat.web.websocket import Frames, WebConnection, frame_header

CHAT = ("--mode", "chat")
WEB = ("--web-port", "0")
FULL_1 = "*** the chat is full (1 person); try again later\n"
SLOW_256K = "*** closed: you read too slowly (over 256 KiB waited for you, now dropped)\n"
STUCK_RCVBUF = 2048
"""SO_RCVBUF of a client that stops reading: the server's queue for it fills quickly."""


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    jar = Sockets()
    yield jar
    jar.close()


@pytest.fixture
def wss() -> Iterator[contextlib.ExitStack]:
    """Where library WebSocket clients are entered (as websockets wants), closed at teardown."""
    with contextlib.ExitStack() as stack:
        yield stack


def turned_away(server: ServerProcess, sock: socket.socket, reason: str) -> bytes:
    """What a client turned away at the door read before the server's EOF, once the server
    said ``connection.rejected`` for ``reason`` and never accepted it."""
    peer = peer_of(sock)
    rejected = server.wait_event("connection.rejected", peer=peer)
    assert rejected["reason"] == reason, rejected
    got = recv_until_eof(sock)
    assert not [e for e in server.events("connection.accepted") if e["peer"] == peer]
    return got


# --------------------------------------------------------------------------
# At the door, as nc sees it
# --------------------------------------------------------------------------


def test_a_full_chat_says_so_and_the_chat_goes_on(start_server: StartServer) -> None:
    # Fails if a newcomer past --max-clients is closed without a word (the seed's silent
    # close), if the line names another limit, or if the refusal disturbs those inside.
    server = start_server(*CHAT, "--max-clients", "2")
    first = join(server)
    second = join(server, first)
    late = server.raw_connect()
    assert turned_away(server, late, "server_full") == (
        b"*** the chat is full (2 people); try again later\n")
    first.say("still here")
    second.expect(f"<{first.name}> still here\n")
    first.lines.quiet()


def test_a_chat_of_one_place_says_person(start_server: StartServer) -> None:
    server = start_server(*CHAT, "--max-clients", "1")
    join(server)
    assert turned_away(server, server.raw_connect(), "server_full") == FULL_1.encode()


@pytest.mark.parametrize("dual_stack", [False, True], ids=["ipv4 listener", "dual-stack"])
def test_a_denied_address_is_told_so_with_the_address_the_server_sees(
    start_server: StartServer, sockets: Sockets, dual_stack: bool
) -> None:
    # A dual-stack listener sees an IPv4 client as ::ffff:127.0.0.2: the line must say the
    # address as its owner knows it. Fails if --deny closes without a word, or shows the
    # mapped form.
    where = ["--port", "0"] if dual_stack else ["--port", "0", "--host", HOST]
    server = start_server(*where, *CHAT, "--deny", "127.0.0.2/32", started=False)
    server.port = int(server.wait_event("server.started")["port"])
    sock = sockets.open(server.port, "127.0.0.2")
    assert turned_away(server, sock, "denied") == (
        b"*** not allowed from your address (127.0.0.2)\n")
    inside = sockets.open(server.port, "127.0.0.3")
    assert Lines(inside).line().startswith(b"*** welcome, you are ")


def test_too_many_from_one_address_is_told_so(
    start_server: StartServer, sockets: Sockets
) -> None:
    # Fails if the per-address refusal says nothing, or says the chat is full (it is not:
    # another address still gets in).
    server = start_server(*CHAT, "--max-clients-per-addr", "2")
    join(server)
    join(server)
    sock = sockets.open(server.port, "127.0.0.1")
    assert turned_away(server, sock, "per_addr_limit") == (
        b"*** too many connections from your address (2 at most); close one and try again\n")
    other = sockets.open(server.port, "127.0.0.2")
    assert Lines(other).line().startswith(b"*** welcome, you are ")


def test_a_tls_listener_sends_no_plain_text_before_a_handshake(
    start_server: StartServer, sockets: Sockets, tmp_path: Path
) -> None:
    # A TLS client turned away gets no line: plain text before a handshake would be garbage
    # to it, and a handshake for a client the chat will not take is the work a refusal
    # saves. The plain listener of the same server does say it.
    files = make_tls_files(tmp_path)
    server = start_server(*CHAT, "--max-clients", "1", *tls_args(files))
    tls_port = int(server.wait_event("server.started")["tls_port"])
    connect_tls(server, sockets, client_context(files), tls_port)
    refused = sockets.open(tls_port)
    peer = peer_of(refused)
    assert server.wait_event("connection.rejected", peer=peer)["reason"] == "server_full"
    assert closed_by_server(refused) == b""
    assert turned_away(server, sockets.open(server.port), "server_full") == FULL_1.encode()


# --------------------------------------------------------------------------
# Closed while in the chat
# --------------------------------------------------------------------------


def test_an_idle_client_is_told_how_long_it_was_silent_and_others_see_it_leave(
    start_server: StartServer,
) -> None:
    # Fails if --idle-timeout closes without a line, or if the line comes before the notice of
    # an earlier leave (the later joiner idles out later: it sees the first one leave).
    server = start_server(*CHAT, "--idle-timeout", "1")
    first = join(server)
    second = join(server, first)
    first.expect("*** closed: you sent nothing for 1 s\n")
    assert first.lines.rest_until_eof() == b""
    assert server.wait_closed(first.client)["reason"] == "idle_timeout"
    second.expect(f"*** {first.name} left lobby\n", "*** closed: you sent nothing for 1 s\n")
    assert second.lines.rest_until_eof() == b""


def flood(writer: Chatter, count: int, size: int = 500) -> list[bytes]:
    """``count`` numbered lines of about ``size`` bytes from ``writer``; what others read."""
    lines = [b"%06d " % i + b"x" * (size - 8) for i in range(count)]
    writer.sock.settimeout(30)
    writer.send(b"".join(line + b"\n" for line in lines))
    return [b"<%s> %s\n" % (writer.name.encode(), line) for line in lines]


def test_an_idle_client_gets_what_was_queued_before_its_line(start_server: StartServer) -> None:
    # The line goes after what waits for the client, not instead of it. Fails if the close
    # drops the queue (the seed's idle close did), or puts the line first.
    server = start_server(*CHAT, "--idle-timeout", "2")
    reader = join(server, rcvbuf=STUCK_RCVBUF)
    writer = join(server, reader)
    said = flood(writer, 2000)  # about 1 MB: under half the default queue limit
    server.wait_connection_event(reader.client, "connection.idle")
    for line in said:
        assert reader.line() == line
    reader.expect("*** closed: you sent nothing for 2 s\n")
    assert reader.lines.rest_until_eof() == b""
    assert server.wait_closed(reader.client)["reason"] == "idle_timeout"


def test_an_idle_client_that_does_not_read_is_closed_within_the_farewell_timeout(
    start_server: StartServer,
) -> None:
    # A client that neither sends nor reads cannot keep its seat by leaving its line unread.
    # Fails if the close waits for a drain without end, or does not wait at all.
    server = start_server(*CHAT, "--idle-timeout", "1", *BACKLOG_LIMIT)
    reader = join(server, rcvbuf=STUCK_RCVBUF)
    writer = join(server, reader)
    said = flood(writer, 16000)  # about 8 MB: more than the kernel's buffers hold
    idle = server.wait_connection_event(reader.client, "connection.idle")
    closed = server.wait_closed(reader.client, timeout=WAIT + FAREWELL_TIMEOUT)
    assert closed["reason"] == "idle_timeout"
    waited = timestamp(closed) - timestamp(idle)
    assert FAREWELL_TIMEOUT - 0.1 <= waited <= FAREWELL_TIMEOUT + 2, waited
    assert closed["bytes_out"] < sum(map(len, said)), closed  # much of it never went


def test_a_reader_too_slow_gets_its_line_alone_after_whole_lines(
    start_server: StartServer,
) -> None:
    # Past --max-queue-bytes the queue is full by definition: what waits is dropped and the
    # line goes alone, after the rest of a line partly sent (so every line stays whole).
    # Fails if the close says nothing, if the line waits behind the queue (it would never
    # arrive in time), or if a line is cut.
    server = start_server(*CHAT, "--max-queue-bytes", "256K")
    reader = join(server, rcvbuf=STUCK_RCVBUF)
    writer = join(server, reader)
    said = flood(writer, 8000)  # about 4 MB: sixteen times the limit
    over = server.wait_connection_event(reader.client, "connection.queue_limit")
    got = reader.lines.rest_until_eof().splitlines(keepends=True)
    assert got[-1] == SLOW_256K.encode()
    assert got[:-1] == said[: len(got) - 1], "a prefix of what was said, every line whole"
    # What the queue held was dropped (but for the rest of the line partly sent).
    missed = sum(map(len, said[len(got) - 1 :]))
    assert missed >= over["queued"] - len(said[0]), (missed, over)
    assert server.wait_closed(reader.client)["reason"] == "queue_limit"


def test_the_shutdown_is_said_before_the_close(start_server: StartServer) -> None:
    server = start_server(*CHAT)
    chatter = join(server)
    server.stop()
    chatter.expect("*** the server is shutting down\n")
    assert chatter.lines.rest_until_eof() == b""


# --------------------------------------------------------------------------
# In-process: a descriptor select cannot watch; hub.close_with (/kick)
# --------------------------------------------------------------------------


class InProcess:
    """A chat-mode server in this process on socket pairs, one loop turn at a time."""

    def __init__(self, mode: str = "chat") -> None:
        self.output = io.BytesIO()
        self.sink = LogStream.memory(self.output)
        self.log = make_logger(self.sink, "debug", "json")
        self.loop = EventLoop(on_crash=contain_in(self.log))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.server = Server(Options(host=None, port=0, mode=mode), [(self.listener, None)],
                             self.log, loop=self.loop)
        self.hub = self.server.hub
        self.peers: list[socket.socket] = []

    def connect(self) -> tuple[Connection, socket.socket]:
        ours, theirs = socket.socketpair()
        theirs.settimeout(WAIT)
        self.peers.append(theirs)
        self.server.acceptor.admit(ours, f"pair{ours.fileno()}")
        return self.hub.connections[ours.fileno()], theirs

    def turn(self) -> None:
        self.loop.call_later(0, self.loop.stop)
        self.loop.run()

    def events(self, name: str) -> list[dict[str, object]]:
        self.sink.flush()
        lines = [orjson.loads(line) for line in self.output.getvalue().splitlines()]
        return [event for event in lines if event["event"] == name]

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        self.listener.close()


@pytest.fixture
def chat() -> Iterator[InProcess]:
    server = InProcess()
    yield server
    server.close()


def test_a_descriptor_select_cannot_watch_is_told_to_try_later(chat: InProcess) -> None:
    sock = ScriptedSocket(FD_SETSIZE)
    sock.window = 1 << 16
    chat.server.acceptor.admit(sock, "high")  # type: ignore[arg-type]
    [rejected] = chat.events("connection.rejected")
    assert rejected["reason"] == "fd_limit" and sock.closed
    assert bytes(sock.received) == (
        b"*** the server cannot take another connection now; try again later\n")


def test_dropping_a_queue_keeps_the_message_partly_sent_and_a_frame_whole(
    chat: InProcess,
) -> None:
    # Past the limit what waits is dropped, but a message partly sent is finished, so the
    # line after it starts a line (and, on a WebSocket, a frame) of its own.
    first, second = b"<a> one\n", b"<a> two\n"
    conn, _ = chat.connect()
    conn.queue.clear()
    for data in (first, second):
        conn.queue.push(data)
    conn.queue.consume(3)  # as a send that took 3 bytes
    conn.drop_queued()
    assert [bytes(b) for b in conn.queue] == [first[3:]]
    ours, theirs = socket.socketpair()
    web = WebConnection(ours, "web", chat.hub, ws=WSConnection(ConnectionType.SERVER),
                        accept=b"", trailing=b"", frames=Frames(TEXT), limit=64)
    try:
        web.queue.clear()
        for data in (first, second):
            web.enqueue(data)
        framed = frame_header(TEXT, len(first)) + first
        web.queue.consume(1)  # one byte of the first frame: the rest of that frame follows
        web.drop_queued()
        assert [bytes(b) for b in web.queue] == [framed[1:]]
        web.queue.consume(3)  # further into it: still the rest of that frame only
        web.drop_queued()
        assert [bytes(b) for b in web.queue] == [framed[4:]]
        web.queue.clear()
        web.enqueue(first)
        web.drop_queued()  # nothing partly sent: nothing kept
        assert not web.queue
    finally:
        web.close_socket()
        theirs.close()


def read_until_eof(sock: socket.socket, chat: InProcess) -> bytes:
    """Everything ``sock`` gets until the server closes it, the loop turning meanwhile."""
    out = b""
    sock.setblocking(False)
    for _ in range(1000):
        chat.turn()
        try:
            while chunk := sock.recv(1 << 16):
                out += chunk
            return out
        except BlockingIOError:
            continue
    raise AssertionError(f"no EOF; got {out[-200:]!r}")


def test_close_with_says_the_line_after_what_is_queued(chat: InProcess) -> None:
    # The way for /kick: the line goes after what waits, then the close; the others see the
    # client leave. Fails if the queue is dropped, the line is missing, or it comes first.
    stays, stays_peer = chat.connect()
    kicked, kicked_peer = chat.connect()
    chat.turn()
    chat.hub.tell(kicked, b"*** queued before the kick\n")
    chat.hub.close_with(kicked, Reason.IDLE_TIMEOUT, b"*** kicked by alice: enough\n")
    got = read_until_eof(kicked_peer, chat).splitlines(keepends=True)
    assert got[-2:] == [b"*** queued before the kick\n", b"*** kicked by alice: enough\n"], got
    assert got[0].startswith(b"*** welcome, you are "), got
    [closed] = chat.events("connection.closed")
    assert closed["reason"] == "idle_timeout" and closed["fd"] == kicked.fd
    stays_peer.setblocking(False)
    assert stays_peer.recv(1 << 16).endswith(b" left lobby\n")
    assert chat.hub.connections == {stays.fd: stays}


def test_close_with_waits_at_most_the_farewell_timeout_for_one_that_does_not_read(
    chat: InProcess,
) -> None:
    kicked, _ = chat.connect()
    chat.turn()
    for _ in range(64):  # far more than a socket pair's buffer takes
        chat.hub.tell(kicked, b"x" * 16383 + b"\n")
    chat.hub.close_with(kicked, Reason.IDLE_TIMEOUT, b"*** kicked by alice\n")
    chat.turn()
    assert kicked.fd in chat.hub.connections and kicked.queue, "precondition: still draining"
    assert not chat.hub.readers
    chat.loop.run_timers(math.inf)  # the farewell timer's time has come
    chat.turn()
    assert not chat.hub.connections
    [closed] = chat.events("connection.closed")
    assert closed["reason"] == "idle_timeout"


def test_close_with_in_raw_mode_closes_at_once_without_a_line() -> None:
    raw = InProcess(mode="raw")
    try:
        conn, peer = raw.connect()
        conn.enqueue(b"queued\n")
        raw.hub.close_with(conn, Reason.IDLE_TIMEOUT, b"*** kicked by alice\n")
        assert read_until_eof(peer, raw) == b""
    finally:
        raw.close()


# --------------------------------------------------------------------------
# The web port: a text frame, then a close frame with a code a page acts on
# --------------------------------------------------------------------------


def open_ws(wss: contextlib.ExitStack, port: int) -> ClientConnection:
    return wss.enter_context(ws_connect(port))


def refused_ws(port: int, wss: contextlib.ExitStack) -> tuple[str, int, str]:
    """A library client turned away: (the text frame it got, the close code, its reason)."""
    conn = open_ws(wss, port)
    text = conn.recv(WAIT)
    assert isinstance(text, str), text
    with pytest.raises(ConnectionClosed) as closed:
        conn.recv(WAIT)
    rcvd = closed.value.rcvd
    assert rcvd is not None, "no close frame"
    return text, int(rcvd.code), rcvd.reason


def test_a_full_chat_tells_a_websocket_in_words_and_closes_with_1013(
    start_server: StartServer, wss: contextlib.ExitStack
) -> None:
    # An HTTP 503 is what a page's script cannot read: the WebSocket is accepted, told, and
    # closed with "try again later". Fails if it is answered 503, or takes a seat.
    server = start_server(*CHAT, *WEB, "--max-clients", "1")
    inside = join(server)
    text, code, reason = refused_ws(web_port(server), wss)
    assert (text, code, reason) == (FULL_1, 1013, FULL_1[4:].strip())
    assert server.wait_event("connection.rejected")["reason"] == "server_full"
    assert not [e for e in server.events("connection.accepted") if e.get("web")]
    inside.say("/who")
    inside.expect(f"*** 1 in lobby: {inside.name}\n")


def test_too_many_from_one_address_tells_a_websocket_and_closes_with_1013(
    start_server: StartServer, wss: contextlib.ExitStack
) -> None:
    server = start_server(*CHAT, *WEB, "--max-clients-per-addr", "1")
    join(server)
    line = "*** too many connections from your address (1 at most); close one and try again\n"
    assert refused_ws(web_port(server), wss) == (line, 1013, line[4:].strip())
    assert server.wait_event("connection.rejected")["reason"] == "per_addr_limit"


def test_an_idle_websocket_is_told_then_closed_with_1008(
    start_server: StartServer, wss: contextlib.ExitStack
) -> None:
    # 1008: trying again would change nothing (the page does not reconnect by itself).
    server = start_server(*CHAT, *WEB, "--idle-timeout", "1")
    conn = open_ws(wss, web_port(server))
    client = accepted_ws(server, conn.socket)
    lines = WsLines(conn)
    assert lines.line().startswith("*** welcome, you are ")
    lines.expect("*** closed: you sent nothing for 1 s\n")
    with pytest.raises(ConnectionClosed) as closed:
        conn.recv(WAIT)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
        1008, "closed: you sent nothing for 1 s")
    assert server.wait_closed(client)["reason"] == "idle_timeout"


def test_a_websocket_too_slow_gets_whole_frames_then_its_line_and_1013(
    start_server: StartServer,
) -> None:
    # Dropping what waits must keep frames whole: a frame partly sent is finished first.
    # Fails if a frame is cut (the frames would not parse, or a line would break), if the line
    # is missing, or if the close is not "try again later".
    server = start_server(*CHAT, *WEB, "--max-queue-bytes", "256K")
    writer = join(server)
    browser = RawWs.open(web_port(server), rcvbuf=STUCK_RCVBUF)
    try:
        client = accepted_ws(server, browser.sock)
        writer.expect(f"*** {browser_name(browser)} joined lobby\n")
        said = flood(writer, 4000)
        server.wait_connection_event(client, "connection.queue_limit")
        frames = browser.frames_until_close(timeout=WAIT)
        close = frames.pop()
        assert close.close_code == 1013, close
        assert {frame.opcode for frame in frames} == {TEXT}, {frame.opcode for frame in frames}
        got = "".join(frame.payload.decode() for frame in frames).splitlines(keepends=True)
        line = SLOW_256K
        assert got[-1] == line
        assert [g.encode() for g in got[:-1]] == said[: len(got) - 1]
        assert close.payload[2:] == line[4:].strip().encode()
        assert browser.eof() == b""
        assert server.wait_closed(client)["reason"] == "queue_limit"
    finally:
        browser.close()


def browser_name(browser: RawWs) -> str:
    """The name in the welcome frame a RawWs client reads first."""
    frame = browser.frame()
    assert frame.opcode == TEXT, frame
    text = frame.payload.decode()
    assert text.startswith("*** welcome, you are "), text
    return text.split()[4]


def test_a_websocket_message_over_the_limit_is_told_the_limit_then_1009(
    start_server: StartServer, wss: contextlib.ExitStack
) -> None:
    server = start_server(*CHAT, *WEB, "--max-line", "64")
    conn = open_ws(wss, web_port(server))
    lines = WsLines(conn)
    assert lines.line().startswith("*** welcome, you are ")
    conn.send("x" * 200)
    lines.expect("*** closed: your message was over 64 bytes, the most this chat takes\n")
    with pytest.raises(ConnectionClosed) as closed:
        conn.recv(WAIT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
