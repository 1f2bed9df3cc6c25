"""One socket in the loop: what a client, a TLS client, a Redis link and a scraper share.

``LoopSocket`` is a ``TableModel`` without a table of its own: each kind binds its lifecycle
(``class Connection(LoopSocket, lifecycle=CONNECTION)``) and keeps only its hooks and actions.
The base owns the descriptor and the plumbing around it:

- ``attach``: the socket enters the loop; one select cannot watch (``loop.FdLimit``) stays out,
  and the caller turns it away (reason ``fd_limit``).
- ``push`` queues bytes and asks for writability when the queue was empty; ``send_queued`` sends
  what the socket takes (the one socket call of ``OutQueue``'s buffers) and drops write interest
  once the queue is empty. Writability is asked
  for only while output is pending, so an idle socket never wakes the loop.
- ``recv_some`` reads once (and, under TLS, what was already decrypted, which select cannot see);
  "nothing yet" (``BlockingIOError``, ``SSLWant*``) is None, any other ``OSError`` goes to the
  kind's ``failed`` hook, never up the stack.
- ``unwatch`` takes the socket out of the loop at once; ``close_socket`` closes it. A kind that
  detaches mid-turn closes only when the turn is over (a client's ``finish`` runs from the end of
  the turn, Redis's CLOSE_ASAP), so no descriptor number is reused while the loop still holds it.
- ``contain`` is the one place a crash is contained: the loop's ``on_crash`` hook (``contain_in``)
  and ``safely``/``fire_safely`` (for what runs outside the socket's own readiness, in a pass
  over many sockets at once) both end there. It logs ``lifecycle.bug`` (fd, state, trigger,
  exception), has the kind close that socket (``abandon``: a client closes, a link redials) and
  returns: the loop and every other socket go on.

What a kind implements: ``failed(op, exc)`` (a socket error), ``abandon()`` (close after a bug),
``bug_fields()`` (what tells its bugs apart in the log, if anything), and its table's actions.
"""

from __future__ import annotations

import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import ClassVar, cast

from structlog.typing import FilteringBoundLogger

from fsmchat.lifecycle import InvalidTrigger
from fsmchat.machine import TableModel, firing
from fsmchat.net.loop import CrashHook, EventLoop
from fsmchat.net.outqueue import OutQueue

NOTHING_YET = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
"""What a non-blocking recv or send raises when it would block: not an error."""


class LoopSocket(TableModel):
    """Base of every socket the loop watches; a subclass binds its lifecycle table."""

    __slots__ = ("loop", "log", "peer", "sock", "fd", "tls", "queue")

    recv_size: ClassVar[int] = 64 * 1024
    """Bytes one ``recv_some`` may take by default."""

    def __init__(self, loop: EventLoop, log: FilteringBoundLogger, peer: str) -> None:
        self.loop = loop
        self.log = log
        self.peer = peer
        self.sock: socket.socket | None = None  # None while the socket is not in the loop
        self.fd = -1
        self.tls = False
        self.queue = OutQueue()

    # -- the descriptor ---------------------------------------------------------------------

    def attach(self, sock: socket.socket, *, read: bool = True) -> None:
        """Enter the loop (watched for reading unless ``read`` is False). Raises
        ``loop.FdLimit`` for a descriptor select cannot watch; the socket is then not taken."""
        fd = sock.fileno()
        self.loop.register(fd, self, read=read)
        self.sock, self.fd = sock, fd
        self.tls = isinstance(sock, ssl.SSLSocket)

    def unwatch(self) -> None:
        """Out of the loop now; the socket stays open until ``close_socket``."""
        self.loop.unregister(self.fd)

    def close_socket(self) -> None:
        """Out of the loop and closed; what was queued is dropped."""
        if self.sock is not None:
            self.loop.unregister(self.fd)
            self.sock.close()
            self.sock = None
        self.queue.clear()

    # -- bytes out ------------------------------------------------------------------------------

    def push(self, data: bytes) -> None:
        """Queue bytes; the first one into an empty queue asks for writability."""
        queue = self.queue
        if not queue:
            self.loop.writes.add(self.fd)
        queue.push(data)

    def send_queued(self) -> int | None:
        """One ``send`` (one buffer, the usual case at chat rates, is cheaper than ``sendmsg``)
        or ``sendmsg`` of the head of the queue (under TLS, which has no ``sendmsg``, the head
        buffers joined: ``OutQueue.joined``); writability is dropped once the queue is empty.
        Returns the bytes sent, or None if the send would block or failed (``failed`` was
        told). This runs once per writable socket: the queue's bookkeeping is inlined for the
        usual case, all of it sent."""
        queue = self.queue
        sock = self.sock  # set while attached; not checked: this is the hot path
        try:
            if len(queue) == 1:
                sent = sock.send(queue[0])  # type: ignore[union-attr]
            elif self.tls:
                sent = sock.send(queue.joined())  # type: ignore[union-attr]
            else:
                sent = sock.sendmsg(queue.chunk())  # type: ignore[union-attr]
        except NOTHING_YET:
            return None
        except OSError as exc:
            self.failed("send", exc)
            return None
        if sent == queue.nbytes:
            deque.clear(queue)
            queue.nbytes = 0
            self.loop.writes.discard(self.fd)
        else:
            queue.consume(sent)
        return sent

    # -- bytes in -------------------------------------------------------------------------------

    def recv_some(self, size: int = 0) -> bytes | None:
        """One recv (``recv_size`` bytes unless told): the bytes, ``b""`` at EOF, or None when
        there was nothing yet or it failed (``failed`` was told)."""
        sock = self.sock
        try:
            data = sock.recv(size or self.recv_size)  # type: ignore[union-attr] # attached
        except NOTHING_YET:
            return None
        except OSError as exc:
            self.failed("recv", exc)
            return None
        if self.tls and data:  # what TLS decrypted already is invisible to select: take it now
            tls = cast(ssl.SSLSocket, sock)  # (only under TLS: off the plain hot path)
            while tls.pending():
                data += tls.recv(tls.pending())
        return data

    # -- TLS -------------------------------------------------------------------------------------

    def handshake_step(self) -> bool:
        """One step of a TLS handshake: True once it is done; else it waits to read or to write
        (the loop is told which), or it failed (``failed`` was told)."""
        sock = cast(ssl.SSLSocket, self.sock)
        loop = self.loop
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            loop.want_read(self.fd, True)
            loop.want_write(self.fd, False)
            return False
        except ssl.SSLWantWriteError:
            loop.want_read(self.fd, False)
            loop.want_write(self.fd, True)
            return False
        except OSError as exc:
            self.failed("handshake", exc)
            return False
        loop.want_write(self.fd, False)
        return True

    # -- the loop's handler ----------------------------------------------------------------------

    on_readable = firing("readable")
    on_writable = firing("writable")

    # -- crashes ----------------------------------------------------------------------------------

    def fire_safely(self, trigger: str) -> None:
        """Fire a trigger decided outside this socket's own readiness (a pass over many
        sockets): a bug closes this socket only, and the pass goes on with the others."""
        self.safely(trigger, self.fire, trigger)

    def safely(self, trigger: str, work: Callable[..., object], *args: object) -> bool:
        """Run ``work(*args)`` for this socket (``trigger`` names it in a bug's log) from a
        pass over many sockets; False if it raised (then contained: this socket is closed)."""
        try:
            work(*args)
        except Exception as exc:  # noqa: BLE001 - contained as the loop contains its handlers'
            self.contain(trigger, exc)
            return False
        return True

    def contain(self, trigger: str, exc: Exception) -> None:
        """A bug struck while this socket handled ``trigger``: log it, close this socket."""
        self.log.error("lifecycle.bug", fd=self.fd, state=self.state, trigger=trigger,
                       exception=repr(exc), exc_info=not isinstance(exc, InvalidTrigger),
                       **self.bug_fields())
        try:
            self.abandon()
        except Exception as again:  # the close met a bug too: take it out of the loop by hand
            self.log.error("lifecycle.bug", fd=self.fd, state=self.state, trigger="abandon",
                           exception=repr(again), exc_info=True, **self.bug_fields())
            self.close_socket()

    # -- what a kind implements ------------------------------------------------------------------

    def failed(self, op: str, exc: OSError) -> None:
        """A recv or send (``op``) failed with ``exc``."""
        raise NotImplementedError

    def abandon(self) -> None:
        """Close after a bug, the kind's own way (through its table where it can)."""
        raise NotImplementedError

    def bug_fields(self) -> dict[str, str]:
        """Fields that tell this kind's ``lifecycle.bug`` apart (a link's name)."""
        return {}


def contain_in(log: FilteringBoundLogger) -> CrashHook:
    """The loop's ``on_crash``: a socket's crash goes to its ``contain``; any other handler's
    (a listener, the signal socket, a server timer) is logged, and the loop goes on."""

    def on_crash(culprit: object, event: str, exc: Exception) -> None:
        if isinstance(culprit, LoopSocket):
            culprit.contain(event, exc)
        else:
            log.error("lifecycle.bug", trigger=event, exception=repr(exc), exc_info=True)

    return on_crash
