"""The event stream: stdout as one more descriptor in the loop, behind a bounded buffer.

structlog hands every rendered event line to the ``LogStream`` (it is structlog's "logger"). The
lines wait in a buffer and are written only when ``select`` reports stdout writable, the way
every client socket is written, so a log reader that stalls (a paused ``jq``, a ``less`` left on
one page, a log shipper that falls behind) never stalls the chat: past ``--log-buffer`` bytes,
events are dropped, counted, and reported once the reader catches up.

Rules it keeps:
- A line is buffered whole or dropped whole: a reader never gets a cut line.
- Lower levels go first: a debug line is taken while the buffer is under half full, an info line
  under three quarters, warnings and errors up to the limit. Each drop is counted by level.
- A level that lost a line loses every line until the drops are reported, so its gap is one:
  once the buffer is back under a quarter, a ``log.dropped`` warning with the counts is written,
  and lines of that level are taken again only after it.
- Nothing here changes stdout for anyone else: a pipe or a terminal is reopened non-blocking (a
  file description of our own), a socket is sent to with MSG_DONTWAIT, and a regular file is
  written as it is (it is always writable). Where a pipe cannot be reopened, stdout is written
  as before, blocking.
- A reader that goes away (EPIPE) ends the writing, never the server; a full disk (ENOSPC) is a
  pause: lines wait or are dropped and counted, and writing is tried again a second later. Each
  is said once on stderr, and a stderr that fails too is ignored.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO, Protocol

from fsmchat.net.outqueue import Buffer, OutQueue

DEFAULT_LOG_BUFFER = 4 * 1024 * 1024

LEVELS = ("debug", "info", "warning", "error")

SHARE = {"debug": 0.5, "info": 0.75, "warning": 1.0, "error": 1.0, "critical": 1.0}
"""How full the buffer may be, as a share of the limit, for a line of each level to be taken."""

CAUGHT_UP = 0.25
"""After drops, the share of the limit the buffer must drain to before ``log.dropped``."""

RETRY = 1.0
"""Seconds between tries to write to stdout after an error that may pass (a full disk)."""

Write = Callable[[Sequence[Buffer]], int]
"""Writes some of the buffers, in order; returns the bytes taken. Raises ``BlockingIOError``
when nothing can be taken now, ``OSError`` on a failure."""


class Reporter(Protocol):
    def warning(self, event: str, **fields: object) -> object: ...


class Loop(Protocol):
    def register(self, fd: int, handler: LogStream, *, read: bool = True) -> None: ...

    def unregister(self, fd: int) -> None: ...

    def want_write(self, fd: int, on: bool) -> None: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> object: ...


def say(text: str) -> None:
    """One line on stderr, for a person. It never blocks (stderr may be the stalled pipe stdout
    is, with ``2>&1``), and a stderr that fails (the same broken pipe) is ignored."""
    with contextlib.suppress(OSError):
        fd = _own_nonblocking(2, os.fstat(2).st_mode)
        try:
            os.write(fd, f"fsmchat: {text}\n".encode())
        finally:
            if fd != 2:
                os.close(fd)


def _own_nonblocking(fd: int, mode: int) -> int:
    """A non-blocking descriptor of our own for a pipe or a terminal (a new file description,
    so nobody else's is changed); ``fd`` itself for a regular file, or when that fails."""
    if stat.S_ISREG(mode):
        return fd
    try:
        return os.open(f"/proc/self/fd/{fd}",
                       os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return fd


class LogStream:
    def __init__(self, write: Write, fd: int | None = None, *, limit: int = DEFAULT_LOG_BUFFER,
                 close: Callable[[], None] = lambda: None) -> None:
        self._write = write
        self._fd = -1 if fd is None else fd  # watched once attached; -1: by flush() only
        self._close = close
        self._queue = OutQueue()  # rendered lines waiting for stdout, each ending in a newline
        self._room = {level: int(limit * share) for level, share in SHARE.items()}
        self._room_debug = self._room["debug"]
        self._caught_up = int(limit * CAUGHT_UP)
        self._forcing = False  # the line being taken must be kept whatever the room
        self._loop: Loop | None = None  # set once attached; it then watches _fd
        self.dropped = Counter(dict.fromkeys(LEVELS, 0))  # level -> lines dropped since start
        self._unreported: Counter[str] = Counter()  # level -> dropped since the last report
        self._resting = False  # a write failed in a way that may pass: wait for the retry
        self._troubled = False  # writes fail since the last that worked (said once on stderr)
        self.broken = False  # the reader is gone: nothing is written any more
        self.log: Reporter | None = None  # the logger over this stream (for log.dropped)

    @classmethod
    def stdout(cls, *, limit: int = DEFAULT_LOG_BUFFER, fd: int = 1) -> LogStream:
        """The stream for the process's stdout, whatever it is (see the module's rules)."""
        try:
            mode = os.fstat(fd).st_mode
        except OSError:  # no stdout at all: every event is dropped, and counted
            stream = cls(_nowhere, None, limit=limit)
            stream._break()
            return stream
        if stat.S_ISSOCK(mode):
            sock = socket.socket(fileno=os.dup(fd))
            return cls(lambda buffers: sock.sendmsg(buffers, (), socket.MSG_DONTWAIT),
                       sock.fileno(), limit=limit, close=sock.close)
        own = _own_nonblocking(fd, mode)
        return cls(lambda buffers: os.writev(own, buffers), own, limit=limit,
                   close=(lambda: os.close(own)) if own != fd else lambda: None)

    def isatty(self) -> bool:
        """The stream writes to a terminal (where ``--log-format auto`` renders for people)."""
        return self._fd >= 0 and os.isatty(self._fd)

    @classmethod
    def memory(cls, out: BinaryIO, *, limit: int = DEFAULT_LOG_BUFFER) -> LogStream:
        """A stream into ``out`` that takes everything at once, for in-process tests."""
        return cls(lambda buffers: out.write(b"".join(buffers)), None, limit=limit)

    # -- structlog's side -----------------------------------------------------------------

    def _take(self, line: bytes, level: str) -> None:
        queue = self._queue
        size = queue.nbytes + len(line)
        if (size > self._room[level] or self._unreported) and self._refused(size, level):
            return
        if not queue and self._loop is not None and not self._resting:
            self._loop.want_write(self._fd, True)
        queue.append(line)
        queue.nbytes = size

    def debug(self, line: bytes) -> None:  # the hot one: ``_take`` inlined
        queue = self._queue
        size = queue.nbytes + len(line)
        if (size > self._room_debug or self._unreported) and self._refused(size, "debug"):
            return
        if not queue and self._loop is not None and not self._resting:
            self._loop.want_write(self._fd, True)
        queue.append(line)
        queue.nbytes = size

    def info(self, line: bytes) -> None:
        self._take(line, "info")

    def warning(self, line: bytes) -> None:
        self._take(line, "warning")

    def error(self, line: bytes) -> None:
        self._take(line, "error")

    def critical(self, line: bytes) -> None:
        self._take(line, "critical")

    msg = info

    def _refused(self, size: int, level: str) -> bool:
        """The slow path of ``_take``: no room (or broken: no room at all), or a gap of this
        level is not reported yet. A refused line is counted."""
        if self.broken or (not self._forcing and (
                size > self._room[level] or level in self._unreported)):
            self.dropped[level] += 1
            self._unreported[level] += 1
            return True
        return False

    @contextlib.contextmanager
    def forced(self) -> Iterator[None]:
        """Lines logged inside are kept whatever the room: ``log.dropped``, ``server.stopped``."""
        self._forcing = True
        try:
            yield
        finally:
            self._forcing = False

    # -- the loop's side ------------------------------------------------------------------

    def attach(self, loop: Loop) -> None:
        """Watch stdout in ``loop``: from now on it is written when ``select`` says it may be."""
        if self._fd < 0 or self.broken:
            return
        self._loop = loop
        loop.register(self._fd, self, read=False)
        if self._queue:
            loop.want_write(self._fd, True)

    @property
    def pending(self) -> bool:
        """Lines wait that may still be written."""
        return bool(self._queue) and not self.broken

    def on_readable(self) -> None:
        raise AssertionError("stdout was reported readable")

    def on_writable(self) -> None:
        self.flush()

    def flush(self) -> None:
        """Write what stdout takes now (the loop calls it when stdout is writable)."""
        queue = self._queue
        while queue and not self.broken:
            try:
                sent = self._write(queue.chunk())
            except BlockingIOError:
                return
            except OSError as exc:
                self._failed(exc)
                return
            queue.consume(sent)
            self._troubled = False
            if self._loop is not None:
                break  # one write per writable event, like every socket
        if not queue and self._loop is not None:
            self._loop.want_write(self._fd, False)
        if self._unreported and queue.nbytes <= self._caught_up:
            self.report()

    def report(self) -> None:
        """Log ``log.dropped`` with what was dropped since the last report, if anything."""
        if not self._unreported or self.log is None:
            return
        levels, self._unreported = dict(self._unreported), Counter()
        with self.forced():
            self.log.warning("log.dropped", count=sum(levels.values()), levels=levels)

    def _failed(self, exc: OSError) -> None:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
            if not self._troubled:
                say(f"cannot write status events to stdout ({exc.strerror}); they wait, or are "
                    "dropped and counted, until it works again; serving goes on")
            self._troubled = True
            if self._loop is not None and not self._resting:
                self._resting = True
                self._loop.want_write(self._fd, False)
                self._loop.call_later(RETRY, self._retry)
            return
        self._break()
        self._discard()
        if self._loop is not None:
            self._loop.unregister(self._fd)
        say("stdout is closed; status events are no longer written, serving goes on")

    def _break(self) -> None:
        """The reader is gone: no room for any line (each goes to ``_refused``, and counts)."""
        self.broken = True
        self._room = dict.fromkeys(SHARE, -1)
        self._room_debug = -1

    def _retry(self) -> None:
        self._resting = False
        if self._queue and self._loop is not None:
            self._loop.want_write(self._fd, True)

    def abandon(self) -> int:
        """Give up on what still waits (the stop's flush ran out of time); returns the count.
        A line half written is ended with a newline if stdout takes one byte more."""
        if self._queue and isinstance(self._queue[0], memoryview):
            with contextlib.suppress(OSError):
                self._write([b"\n"])
        return self._discard()

    def _discard(self) -> int:
        """Drop every line that waits, counted by level (read from the line: only a stop or a
        broken stdout gets here, so the hot path keeps no level per line); returns the count."""
        count = len(self._queue)
        for line in self._queue:
            self.dropped[_level_of(bytes(line[:64]))] += 1
        self._queue.clear()
        return count

    def close(self) -> None:
        if self._loop is not None and not self.broken:
            self._loop.unregister(self._fd)
        self._loop = None
        self._close()


def _level_of(head: bytes) -> str:
    """The level of a rendered line, from its start: ``"level":"info"`` (JSON) or ``[info``
    (console); a line cut before it (the rest of one half written) counts as info."""
    for level in SHARE:
        if b'"level":"%s"' % level.encode() in head or b"[%s" % level.encode() in head:
            return level
    return "info"


def _nowhere(buffers: Sequence[Buffer]) -> int:
    raise BrokenPipeError(errno.EBADF, "stdout is closed")
