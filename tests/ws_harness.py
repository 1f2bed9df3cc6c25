"""WebSocket clients for the black-box tests of ``--web-port``: a library's, and one by hand.

Most tests use the ``websockets`` library's sync client (``connect``), as a browser would be:
it does the handshake, masks, answers pings. ``WsLines`` reads a chat-mode connection line by
line, and checks what the interface promises: text frames, each holding whole lines.

Some tests need what a well-behaved library will not do (a text frame that is not UTF-8, a
client that stops reading while the server queues for it) or many connections at once without
a thread each: ``RawWs`` is a WebSocket client over a plain socket, with the frames made and
parsed here (RFC 6455: client frames masked, server frames not). Asserts carry their own
messages (pytest does not rewrite this module).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from conftest import HOST, WAIT, Client, ServerProcess, peer_of
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
IDS = Subprotocol("fsmchat.ids")  # chat mode: every room message's frame after its id
ID_MARK = "\x1e"
MESSAGE_ID = re.compile(r"[0-9a-f]{16}-[1-9][0-9]*")
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def web_port(server: ServerProcess) -> int:
    """The web listener's port, from ``server.started``."""
    started = server.wait_event("server.started")
    assert isinstance(started.get("web_port"), int), f"no web_port in {started}"
    port: int = started["web_port"]
    return port


def accepted_ws(server: ServerProcess, sock: socket.socket) -> Client:
    """The server's ``connection.accepted`` of the WebSocket client on ``sock``."""
    peer = peer_of(sock)
    # (web: true in the match too: a TCP client of the chat port may have the same source port,
    # which Linux reuses towards another destination port)
    index = server.wait_for_index(
        lambda e: e.get("event") == "connection.accepted" and e.get("peer") == peer
        and e.get("web") is True,
        what=f"connection.accepted with web: true for {peer}",
    )
    event = server.events()[index]
    return Client(sock=sock, fd=int(event["fd"]), peer=peer, accepted_index=index)


def ws_connect(
    port: int,
    *,
    origin: str | None = None,
    path: str = "/ws",
    context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    ids: bool = False,
) -> ClientConnection:
    """A library client of ``ws://HOST:port/ws`` (``wss://`` with ``context``), no proxy, no
    automatic pings (the tests send their own); ``ids``: it offers the subprotocol
    ``fsmchat.ids``."""
    scheme = "wss" if context is not None else "ws"
    return connect(
        f"{scheme}://{HOST}:{port}{path}",
        origin=origin,  # type: ignore[arg-type]  # websockets' Origin is a NewType of str
        ssl=context,
        server_hostname=server_hostname,
        subprotocols=[IDS] if ids else None,
        proxy=None,
        open_timeout=WAIT,
        close_timeout=WAIT,
        ping_interval=None,
        max_size=None,
    )


class WsLines:
    """A chat-mode connection read line by line; every frame must be text of whole lines."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.pending: list[str] = []
        self.frames = 0

    def line(self, timeout: float = WAIT) -> str:
        """The next line, with its ``\\n``."""
        while not self.pending:
            message = self.conn.recv(timeout)
            self.frames += 1
            assert isinstance(message, str), f"chat mode sent a binary frame: {message[:80]!r}"
            assert message.endswith("\n"), f"a text frame that does not end a line: {message!r}"
            self.pending += message.splitlines(keepends=True)
        return self.pending.pop(0)

    def expect(self, *expected: str) -> None:
        for want in expected:
            got = self.line()
            assert got == want, f"got {got!r}, expected {want!r}"

    def quiet(self, wait: float = 0.25) -> None:
        """Nothing more is pending or arrives (call it after a positive proof elsewhere)."""
        assert not self.pending, f"unexpected lines: {self.pending}"
        try:
            message = self.conn.recv(wait)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame: {message!r}")


class IdLines:
    """A chat-mode connection of a client that reads ids (``fsmchat.ids``), line by line: each
    line with the id its frame came after (None: a frame without one), and the ids of our own
    lines (frames that are an id alone) in ``own``, in order."""

    def __init__(self, conn: ClientConnection) -> None:
        assert conn.subprotocol == IDS, f"the server chose {conn.subprotocol!r}"
        self.conn = conn
        self.pending: list[tuple[str | None, str]] = []
        self.own: list[str] = []

    def _frame(self, timeout: float) -> None:
        message = self.conn.recv(timeout)
        assert isinstance(message, str), f"chat mode sent a binary frame: {message[:80]!r}"
        msg_id = None
        if message.startswith(ID_MARK):
            msg_id, newline, message = message[1:].partition("\n")
            assert newline and MESSAGE_ID.fullmatch(msg_id), f"a bad id in {message!r}"
            if not message:
                self.own.append(msg_id)
                return
        assert ID_MARK not in message, f"a mark inside a frame: {message!r}"
        assert message.endswith("\n"), f"a text frame that does not end a line: {message!r}"
        self.pending += [(msg_id, line) for line in message.splitlines(keepends=True)]

    def line(self, timeout: float = WAIT) -> tuple[str | None, str]:
        """The next line (with its ``\\n``) and the id of its message."""
        while not self.pending:
            self._frame(timeout)
        return self.pending.pop(0)

    def own_id(self, timeout: float = WAIT) -> str:
        """The id of our own line that comes next (lines before it are kept for ``line``)."""
        count = len(self.own)
        while len(self.own) == count:
            self._frame(timeout)
        return self.own[-1]

    def text(self, timeout: float = WAIT) -> str:
        """The next line, whatever its id."""
        return self.line(timeout)[1]

    def expect(self, *expected: str) -> None:
        """The next lines are these, each without an id (replies, notices to us alone)."""
        for want in expected:
            got = self.line()
            assert got == (None, want), f"got {got!r}, expected {want!r} without an id"

    def said(self, *expected: str) -> list[str]:
        """The next lines are these room messages, each after an id; the ids."""
        ids = []
        for want in expected:
            msg_id, got = self.line()
            assert got == want and msg_id is not None, f"got {(msg_id, got)!r}, expected {want!r}"
            ids.append(msg_id)
        return ids

    def quiet(self, wait: float = 0.25) -> None:
        """Nothing more is pending or arrives (call it after a positive proof elsewhere)."""
        assert not self.pending, f"unexpected lines: {self.pending}"
        try:
            message = self.conn.recv(wait)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame: {message!r}")


def recv_bytes(conn: ClientConnection, count: int, timeout: float = WAIT) -> bytes:
    """Exactly ``count`` bytes of binary frames (raw mode: the relay's chunks, any boundaries)."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    while len(out) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"got {len(out)} of {count} bytes within {timeout}s"
        try:
            message = conn.recv(remaining)
        except TimeoutError:
            continue
        assert isinstance(message, bytes), f"raw mode sent a text frame: {message[:80]!r}"
        out += message
    assert len(out) == count, f"got {len(out)} bytes, expected {count}: {bytes(out[-40:])!r}"
    return bytes(out)


# --------------------------------------------------------------------------
# Frames by hand
# --------------------------------------------------------------------------


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """``data`` XOR the 4-byte ``mask`` repeated (masking and unmasking are the same)."""
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes, *, mask: bytes | None, fin: bool = True) -> bytes:
    """One frame; ``mask`` (4 bytes) for a client's frame, None for a server's."""
    first = (0x80 if fin else 0) | opcode
    masked = 0x80 if mask is not None else 0
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, masked | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, masked | 126, n)
    else:
        head = struct.pack("!BBQ", first, masked | 127, n)
    if mask is None:
        return head + payload
    return head + mask + apply_mask(payload, mask)


@dataclass(frozen=True)
class Frame:
    opcode: int
    payload: bytes
    fin: bool = True

    @property
    def close_code(self) -> int | None:
        """A close frame's status code (None: a close frame without one)."""
        assert self.opcode == CLOSE, f"not a close frame: {self}"
        if len(self.payload) < 2:
            return None
        code: int = struct.unpack("!H", self.payload[:2])[0]
        return code


def decode_frames(buf: bytearray, limit: int | None = None) -> list[Frame]:
    """The whole server frames at the start of ``buf`` (at most ``limit``), removed from it; a
    partial one stays."""
    frames: list[Frame] = []
    while len(buf) >= 2 and (limit is None or len(frames) < limit):
        first, second = buf[0], buf[1]
        assert not second & 0x80, "the server masked a frame (RFC 6455 5.1: it must not)"
        assert not first & 0x70, f"RSV bits set without an extension: {first:#x}"
        n = second & 0x7F
        offset = 2
        if n == 126:
            if len(buf) < 4:
                break
            n = struct.unpack_from("!H", buf, 2)[0]
            offset = 4
        elif n == 127:
            if len(buf) < 10:
                break
            n = struct.unpack_from("!Q", buf, 2)[0]
            offset = 10
        if len(buf) < offset + n:
            break
        frames.append(Frame(first & 0x0F, bytes(buf[offset : offset + n]), bool(first & 0x80)))
        del buf[: offset + n]
    return frames


def upgrade_request(
    host_port: str, key: str, *, path: str = "/ws", origin: str | None = None
) -> bytes:
    """A browser's upgrade request, without extensions (the frames stay plain)."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host_port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def check_switching(head: bytes, key: str) -> None:
    """``head`` (the response up to its blank line) is a 101 that accepts ``key``."""
    status, *header_lines = head.decode("latin-1").split("\r\n")
    assert status.startswith("HTTP/1.1 101"), f"not switching protocols: {head[:300]!r}"
    headers = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    assert headers.get("upgrade", "").lower() == "websocket", headers
    assert headers.get("sec-websocket-accept") == accept_for(key), headers
    assert "sec-websocket-extensions" not in headers, "an extension nobody asked for"


@dataclass
class RawWs:
    """A WebSocket client over a plain blocking socket: frames made and read by hand."""

    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    #: Bytes sent and received on the wire so far (by the methods of this class).
    sent: int = 0
    received: int = 0

    @classmethod
    def open(
        cls, port: int, *, rcvbuf: int | None = None, origin: str | None = None
    ) -> RawWs:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(WAIT)
        sock.connect((HOST, port))
        ws = cls(sock)
        key = new_key()
        request = upgrade_request(f"{HOST}:{port}", key, origin=origin)
        sock.sendall(request)
        ws.sent += len(request)
        ws.upgraded(key)
        return ws

    def upgraded(self, key: str) -> None:
        """Read the server's answer to an upgrade request with ``key``: a 101 that accepts it."""
        self._read_until(lambda: b"\r\n\r\n" in self.buf, "the upgrade response")
        end = self.buf.index(b"\r\n\r\n") + 4
        check_switching(bytes(self.buf[:end]), key)
        del self.buf[:end]

    @property
    def peer(self) -> str:
        return peer_of(self.sock)

    def _read_until(self, ready: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {what} within {timeout}s; got {bytes(self.buf[:200])!r}"
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            finally:
                self.sock.settimeout(WAIT)
            assert chunk, f"EOF before {what}; got {bytes(self.buf[:200])!r}"
            self.received += len(chunk)
            self.buf += chunk

    def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        self.send(encode_frame(opcode, payload, mask=os.urandom(4), fin=fin))

    def send(self, data: bytes) -> None:
        """Bytes as they are (frames made by the caller)."""
        self.sock.sendall(data)
        self.sent += len(data)

    def frame(self, timeout: float = WAIT) -> Frame:
        """The next frame from the server."""
        got: list[Frame] = []

        def ready() -> bool:
            if not got:
                got.extend(decode_frames(self.buf, 1))
            return bool(got)

        self._read_until(ready, "frame", timeout)
        return got[0]

    def frames_until_close(self, timeout: float = WAIT) -> list[Frame]:
        """Every frame up to and including the server's close frame."""
        out: list[Frame] = []
        deadline = time.monotonic() + timeout
        while not out or out[-1].opcode != CLOSE:
            out.append(self.frame(max(0.0, deadline - time.monotonic())))
        return out

    def eof(self, timeout: float = WAIT) -> bytes:
        """Read until the server closes the TCP connection; what came first (b"": nothing)."""
        self.sock.settimeout(timeout)
        rest = bytearray(self.buf)
        self.buf.clear()
        try:
            while chunk := self.sock.recv(1 << 16):
                self.received += len(chunk)
                rest += chunk
        except ConnectionResetError:
            pass
        finally:
            self.sock.settimeout(WAIT)
        return bytes(rest)

    def close(self) -> None:
        self.sock.close()

