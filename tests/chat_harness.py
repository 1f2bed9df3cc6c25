"""Chat-mode clients for the black-box tests: lines, names, the welcome line and the notices.

A ``Chatter`` is a connected client that reads the server's output one line at a time (keeping
whatever arrived past the line asked for), so tests can state exactly which lines a client gets,
in which order, and that nothing else came. Its asserts carry their own messages (pytest does not
rewrite this module).
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo
from zoneinfo import ZoneInfo

from conftest import WAIT, Client, ServerProcess, assert_nothing_arrives

WELCOME = re.compile(
    rb"\*\*\* welcome, you are ([A-Za-z0-9_-]{1,16}) \(/help lists the commands\)\n"
)


RECENT = b"*** recent messages:\n"
END_OF_RECENT = b"*** end of recent messages\n"
STARTED = time.time()
"""When the tests started: a replayed line's time is no earlier (its minute, at least)."""
UTC = ZoneInfo("UTC")


def minutes(since: float, zone: tzinfo = UTC) -> set[bytes]:
    """Every ``HH:MM`` in ``zone`` from ``since`` until now: the times a replay may show."""
    first = int(since // 60)
    return {datetime.fromtimestamp(minute * 60, zone).strftime("%H:%M").encode()
            for minute in range(first, int(time.time() // 60) + 1)}


def check_replay(line: Callable[[], bytes | str], expected: Sequence[bytes | str],
                 since: float = STARTED, zone: tzinfo = UTC) -> list[bytes]:
    """The next lines ``line()`` gives are framed history: its first line, then each of
    ``expected`` after a time (``HH:MM `` in ``zone``, from ``since`` until now), then its last
    line. Returns the times shown."""
    first = as_bytes(line())
    assert first == RECENT, f"got {first!r}, expected {RECENT!r}"
    shown: list[bytes] = []
    for want in expected:
        got = as_bytes(line())
        stamp, _, rest = got.partition(b" ")
        assert rest == as_bytes(want), f"got {got!r}, expected a time and {as_bytes(want)!r}"
        assert stamp in minutes(since, zone), f"{stamp!r} is no time since the tests began"
        shown.append(stamp)
    last = as_bytes(line())
    assert last == END_OF_RECENT, f"got {last!r}, expected {END_OF_RECENT!r}"
    return shown


def welcome(name: str) -> bytes:
    return f"*** welcome, you are {name} (/help lists the commands)\n".encode()


def as_bytes(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else text


class Lines:
    """A socket read line by line (``\\n``-terminated); what arrived past a line is kept."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        #: Every byte read from the socket so far (lines handed out and the rest).
        self.received = 0
        #: Lines handed out so far.
        self.count = 0

    def _fill(self, deadline: float, what: str) -> bool:
        """Read once more; False on EOF."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {what} within {WAIT}s; pending: {bytes(self.buf[:200])!r}")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 16)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(WAIT)
        if not chunk:
            return False
        self.buf += chunk
        self.received += len(chunk)
        return True

    def line(self, timeout: float = WAIT) -> bytes:
        """The next line, with its ``\\n``."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if not self._fill(deadline, "line"):
                raise AssertionError(f"EOF before a line; pending: {bytes(self.buf[:200])!r}")
        end = self.buf.index(b"\n") + 1
        out = bytes(self.buf[:end])
        del self.buf[:end]
        self.count += 1
        return out

    def lines(self, count: int, timeout: float = WAIT) -> list[bytes]:
        return [self.line(timeout) for _ in range(count)]

    def rest_until_eof(self, timeout: float = WAIT) -> bytes:
        """Everything until the server closes the connection."""
        deadline = time.monotonic() + timeout
        while self._fill(deadline, "EOF"):
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def quiet(self) -> None:
        """Nothing more is pending or arrives (call it after a positive proof elsewhere)."""
        assert not self.buf, f"unexpected data: {bytes(self.buf[:200])!r}"
        assert_nothing_arrives(self.sock)


@dataclass
class Chatter:
    """A chat-mode client: its connection, the name the welcome line gave it, its line reader."""

    client: Client
    name: str
    lines: Lines

    @property
    def sock(self) -> socket.socket:
        return self.client.sock

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(as_bytes(data))

    def say(self, text: bytes | str) -> None:
        """Send one line ending with ``\\n``."""
        self.send(as_bytes(text) + b"\n")

    def line(self, timeout: float = WAIT) -> bytes:
        return self.lines.line(timeout)

    def expect(self, *expected: bytes | str) -> None:
        """The next lines are exactly these (each given with its ``\\n``), in this order."""
        for want in expected:
            got = self.line()
            assert got == as_bytes(want), f"{self.name} got {got!r}, expected {as_bytes(want)!r}"

    def quiet(self) -> None:
        self.lines.quiet()

    def expect_replay(self, *expected: bytes | str, since: float = STARTED,
                      zone: tzinfo = UTC) -> list[bytes]:
        """The framed history (``check_replay``) holding ``expected``; the times shown."""
        return check_replay(self.line, expected, since, zone)


def join(server: ServerProcess, *present: Chatter, rcvbuf: int | None = None) -> Chatter:
    """Connect, read the welcome line (nothing else), and check each of ``present`` is told.

    ``rcvbuf``: the client's SO_RCVBUF (small for a reader that is to stop reading)."""
    client = server.connect(rcvbuf)
    lines = Lines(client.sock)
    first = lines.line()
    match = WELCOME.fullmatch(first)
    assert match is not None, f"not a welcome line: {first!r}"
    name = match.group(1).decode()
    for other in present:
        other.expect(f"*** {name} joined lobby\n")
    return Chatter(client, name, lines)


def join_many(server: ServerProcess, count: int) -> list[Chatter]:
    """``count`` chatters, each joined after the previous (so each earlier one sees the joins)."""
    chatters: list[Chatter] = []
    for _ in range(count):
        chatters.append(join(server, *chatters))
    return chatters


def settled(server: ServerProcess, *chatters: Chatter) -> None:
    """Wait until the server logged sending each chatter exactly what it has read so far.

    Events the server logged while handling what led to those bytes are then in the log.
    """
    for chatter in chatters:
        server.wait_sent_to(chatter.client, chatter.lines.received)
