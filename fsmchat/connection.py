"""One client connection: a socket, its outgoing queue, and its place in the lifecycle.

Every connection is a model of the one shared ``transitions`` machine built from
``lifecycle.CONNECTION`` (see ``machine.TableModel``), and a ``sock.LoopSocket``: the base owns
the descriptor, the queue's write interest, recv/send errors and bug containment; this module
owns what a chat client is. The loop's readiness reaches it as triggers through ``fire``, and
the table decides what a trigger means in the current state.

Actions do the socket work and may fire the next trigger (an empty queue while draining fires
``drained``); they never close a socket mid-turn: ``detach`` hands the connection to the hub, which
releases it when the loop turn ends (Redis's CLOSE_ASAP), so no descriptor is reused while the
loop still holds its number. ``detach`` does its bookkeeping first and calls out (``departed``,
``flow.forget``) last, so a bug in what it calls cannot leave a connection that nobody releases.

A client the server sends away in chat mode hears why first (``close_with``: the idle timeout,
the output limit, a moderator's /kick): one ``*** `` line after what is queued (past the output
limit, instead of it: what waited is dropped, but for the rest of a message partly sent, so the
line starts a line of its own), then the close; ``FAREWELL_TIMEOUT`` bounds the wait for a
client that does not read. Raw mode stays a byte relay: it closes at once and says nothing.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import ssl
import sys
import termios
import time
from typing import TYPE_CHECKING, Any, cast

from fsmchat import lifecycle
from fsmchat.lifecycle import State, Trigger
from fsmchat.net.loop import Timer
from fsmchat.net.sock import LoopSocket
from fsmchat.reasons import Reason, error_reason

if TYPE_CHECKING:
    from fsmchat.chat.resume import Resume
    from fsmchat.hub import Hub

RECV_SIZE = 64 * 1024
"""Bytes one recv may return: one message, and the most one sender gets per loop turn."""

FAREWELL_TIMEOUT = 5.0
"""Seconds a client sent away with a line (``close_with``) has to take it, and what was queued
before it, before it is closed anyway: one that does not read costs its seat no longer."""

__all__ = ["FAREWELL_TIMEOUT", "MACHINE", "RECV_SIZE", "Connection", "error_reason"]


class Connection(LoopSocket, lifecycle=lifecycle.CONNECTION):
    __slots__ = ("hub", "flow", "limits", "bytes_in", "bytes_out", "opened", "reason",
                 "congested", "heard", "tokens", "counted", "timer", "credit_timer", "farewell",
                 "asked")
    """Slots, not a dict: an idle client costs its socket, its queue and these."""

    sock: socket.socket  # always set: a connection is attached from the start
    recv_size = RECV_SIZE

    def __init__(self, sock: socket.socket, peer: str, hub: Hub) -> None:
        """Raises ``loop.FdLimit`` for a descriptor select cannot watch (nothing is kept)."""
        super().__init__(hub.loop, hub.log, peer)
        self.attach(sock, read=False)
        self.hub = hub
        self.flow = hub.flow
        self.limits = hub.limits
        self.bytes_in = 0
        self.bytes_out = 0
        self.opened = time.monotonic()
        self.reason: str = ""  # why it closes (a Reason): set as a drain begins, replaced by a
        # forced close
        self.congested = False  # over the high-water mark, and not yet back under the low one
        self.heard = self.opened  # when it last sent something (for --idle-timeout)
        self.tokens = float(hub.limits.max_recv_rate)  # its token bucket (for --max-recv-rate)
        self.counted = self.opened  # when the bucket was last brought up to date
        self.timer: Timer | None = None  # the handshake's timeout, then the idle check
        self.credit_timer: Timer | None = None  # set while `limited`
        self.farewell = b""  # chat mode: the line that says why the server closes it
        self.asked: Resume | None = None  # chat mode: what a WebSocket client asked for in
        # its handshake (ids, and when it comes back its room and what it showed last)
        self.machine.add_model(self)

    def __repr__(self) -> str:
        return f"<Connection fd={self.fd} {self.peer} {self.state}>"

    # -- triggers -------------------------------------------------------------------------

    def changing(self, source: str, dest: str, trigger: str) -> None:
        trace = self.hub.trace
        if trace is not None:
            trace.state(self.fd, source, dest, trigger)

    def close_because(self, reason: str) -> None:
        """Close without delivering what is queued, unless it is closing already.

        ``reason`` replaces one set earlier (a drain that began for ``peer_closed`` and was cut
        short closes for ``drain_timeout``): it says why queued data was dropped.
        """
        if lifecycle.allowed(self.state, Trigger.FAIL):
            self.reason = reason
            self.fire(Trigger.FAIL)

    def close_safely(self, reason: str) -> None:
        """``close_because`` from a pass over many clients: a bug closes this one only."""
        self.safely(Trigger.FAIL, self.close_because, reason)

    def close_with(self, reason: str, line: bytes, *, drop_queued: bool = False) -> None:
        """Close for ``reason``, and in chat mode tell the client why first: ``line`` (one
        ``*** `` line ending in ``\\n``) goes after what is queued (``drop_queued``: instead of
        it), and the socket closes once it is out, ``FAREWELL_TIMEOUT`` seconds at most.

        Raw mode, or a client not in the chat (a handshake, a drain under way): as
        ``close_because``, at once and without a line."""
        if not (self.hub.chat_mode and lifecycle.allowed(self.state, Trigger.DISMISS)):
            self.close_because(reason)
            return
        if drop_queued:
            self.drop_queued()
        self.reason = reason
        self.farewell = line
        self.fire(Trigger.DISMISS)

    def close_over_limit(self) -> None:
        """Its queue would pass --max-queue-bytes: it reads too slowly. What waited for it is
        dropped (it would only make the line wait behind it), and the line goes alone."""
        self.close_with(Reason.QUEUE_LIMIT, b"*** closed: you read too slowly (over %s waited "
                        b"for you, now dropped)\n" % _size(self.hub.max_queue_bytes).encode(),
                        drop_queued=True)

    def drop_queued(self) -> None:
        """Empty the queue but for the rest of a message partly sent (a memoryview at its
        head): what is queued next starts on a boundary of its own."""
        queue = self.queue
        head = queue[0] if queue and isinstance(queue[0], memoryview) else None
        queue.clear()
        if head is not None:
            queue.append(head)
            queue.nbytes = len(head)

    def enqueue(self, data: bytes) -> None:
        """Queue a message; over the limit, leave it out and have the hub close this client.
        (``push``, inlined: this runs once per recipient of every message.)"""
        queue = self.queue
        size = queue.nbytes + len(data)
        if size > self.flow.high_water and not self.may_grow(size):
            return
        if not queue:
            self.loop.writes.add(self.fd)
        queue.append(data)
        queue.nbytes = size

    def may_grow(self, size: int) -> bool:
        """Over the high-water mark: whether the queue may grow to ``size`` (congested), or
        the message is left out and the hub closes this client."""
        if size > self.hub.max_queue_bytes:
            self.hub.overflowed(self)
            return False
        self.flow.congested(self)
        return True

    # -- the socket base's hooks ------------------------------------------------------------

    def failed(self, op: str, exc: OSError) -> None:
        if isinstance(exc, ssl.SSLError):  # a TLS protocol error, not a socket error
            self._tls_failed(exc)
            return
        code = exc.errno or 0
        name = errno.errorcode.get(code, str(code))
        self.log.warning("connection.error", fd=self.fd, peer=self.peer, op=op,
                         error=f"{name}: {exc.strerror}")
        self.close_because(error_reason(exc))

    def abandon(self) -> None:
        """After a bug: close now, through the table (``detach`` has released it already if
        the bug struck there)."""
        self.close_because(Reason.INTERNAL_ERROR)

    # -- actions, named by lifecycle.TRANSITIONS ---------------------------------------------

    def join(self) -> None:
        hub = self.hub
        if self.timer is not None:  # the handshake's timeout
            self.timer.cancel()
            self.timer = None
        self.loop.want_read(self.fd, True)
        if self.limits.idle_timeout:
            self.heard = time.monotonic()
            self.timer = self.loop.call_later(self.limits.idle_timeout, self._check_idle)
        hub.joined(self)

    def _check_idle(self) -> None:
        """The idle timer: close if nothing came since, else wait for the rest of the time.

        One timer per connection, moved only when it fires: a message costs a clock reading,
        not a heap operation."""
        self.timer = None
        if self.state not in lifecycle.IN_CHAT:
            return
        if self.state != State.READING:  # the server holds it back: it is not silent
            self.heard = time.monotonic()
        silent = time.monotonic() - self.heard
        if silent >= self.limits.idle_timeout:
            self.log.warning("connection.idle", fd=self.fd, peer=self.peer,
                             seconds=round(silent, 3))
            self.close_with(Reason.IDLE_TIMEOUT, b"*** closed: you sent nothing for %s s\n"
                            % f"{self.limits.idle_timeout:g}".encode())
            return
        self.timer = self.loop.call_later(self.limits.idle_timeout - silent, self._check_idle)

    def begin_handshake(self) -> None:
        self.timer = self.loop.call_later(self.limits.handshake_timeout, self._handshake_late)
        self.shake()

    def shake(self) -> None:
        assert isinstance(self.sock, ssl.SSLSocket)
        if not self.handshake_step():
            return
        cipher = self.sock.cipher()
        self.log.info("connection.secured", fd=self.fd, peer=self.peer,
                      version=self.sock.version(), cipher=cipher[0] if cipher else None,
                      subject=_subject(self.sock.getpeercert()))
        self.fire(Trigger.ESTABLISHED)

    def _handshake_late(self) -> None:
        self.timer = None
        if self.state == State.HANDSHAKING:
            self.log.warning("connection.tls_error", fd=self.fd, peer=self.peer,
                             error=f"no handshake within {self.limits.handshake_timeout:g} s")
            self.close_because(Reason.HANDSHAKE_TIMEOUT)

    def _tls_failed(self, exc: ssl.SSLError) -> None:
        self.log.warning("connection.tls_error", fd=self.fd, peer=self.peer,
                         error=exc.reason or str(exc))
        self.close_because(Reason.TLS_ERROR)

    def wait_for_credit(self) -> None:
        rate = self.limits.max_recv_rate
        self.loop.want_read(self.fd, False)
        wait = -self.tokens / rate
        self.log.debug("connection.limited", fd=self.fd, credit_in=round(wait, 3))
        self.credit_timer = self.loop.call_later(wait, self._credited)

    def _credited(self) -> None:
        self.credit_timer = None
        if self.state == State.LIMITED:
            self.fire(Trigger.CREDIT)

    def receive(self) -> None:
        data = self.recv_some()
        if data is None:
            return
        if not data:
            self.reason = Reason.PEER_CLOSED
            self.fire(Trigger.HANGUP)
            return
        self.bytes_in += len(data)
        trace = self.hub.trace
        if trace is not None:
            trace.received(self.fd, len(data))
        limits = self.limits
        if limits.idle_timeout or limits.max_recv_rate:
            self._heard(len(data))
        self.hub.received(self, data)

    def _heard(self, size: int) -> None:
        """Mark it active, and charge its token bucket; over its rate, it waits for credit."""
        now = time.monotonic()
        if self.limits.max_recv_rate:
            self._charge(size, now)
        self.heard = now

    def _charge(self, size: int, now: float) -> None:
        """Take ``size`` bytes from its token bucket; over its rate, it waits for credit."""
        rate = self.limits.max_recv_rate
        tokens = min(float(rate), self.tokens + (now - self.counted) * rate) - size
        self.tokens = tokens
        self.counted = now
        if tokens < 0 and self.state == State.READING:
            self.fire(Trigger.OVERRUN)

    def flush(self) -> None:
        sent = self.send_queued()
        if sent is None:
            return
        queue = self.queue
        self.bytes_out += sent
        trace = self.hub.trace
        if trace is not None:
            trace.sent(self.fd, sent, queue.nbytes)
        if self.congested and queue.nbytes <= self.flow.low_water:
            self.flow.caught_up(self)
        if not queue and self.state == State.DRAINING:
            self.fire(Trigger.DRAINED)

    def pause_reading(self) -> None:
        self.flow.paused[self.fd] = self
        self.loop.want_read(self.fd, False)

    def resume_reading(self) -> None:
        self.flow.paused.pop(self.fd, None)
        self.loop.want_read(self.fd, True)

    def stop_reading(self) -> None:
        if self.credit_timer is not None:
            self.credit_timer.cancel()
            self.credit_timer = None
        self.flow.paused.pop(self.fd, None)
        self.loop.want_read(self.fd, False)

    def has_input(self) -> bool:
        """Whether reading it now would get something: bytes, or its EOF (a peek)."""
        flags = socket.MSG_PEEK | socket.MSG_DONTWAIT
        try:
            if self.tls:  # beneath TLS: the plain socket's recv sees records and the peer's FIN
                tls = cast(ssl.SSLSocket, self.sock)
                if tls.pending():
                    return True
                socket.socket.recv(tls, 1, flags)
            else:
                self.sock.recv(1, flags)
        except OSError:  # BlockingIOError: nothing; any other error: reading would fail anyway
            return False
        return True

    def unread(self) -> int:
        """Bytes the client sent that were not read yet (FIONREAD), and what TLS decrypted
        already: what a stop that is cut short counts as never read."""
        try:
            count = int.from_bytes(fcntl.ioctl(self.fd, termios.FIONREAD, bytes(4)),
                                   sys.byteorder, signed=True)
        except OSError:
            return 0
        if self.tls:
            count += cast(ssl.SSLSocket, self.sock).pending()
        return count

    def leave(self) -> None:
        self._cancel_timers()
        self.reason = self.reason or Reason.SERVER_SHUTDOWN
        self.last_words()
        self.hub.departed(self)
        self.loop.want_read(self.fd, False)
        if not self.queue:
            self.fire(Trigger.DRAINED)

    def last_words(self) -> None:
        """What goes after everything queued as it leaves: the line saying why, if any."""
        if self.farewell:
            self.push(self.farewell)

    def send_off(self) -> None:
        """Sent away (``close_with``): it is out of the chat, holds no sender back, and has
        ``FAREWELL_TIMEOUT`` seconds to take its line."""
        self.flow.forget(self)
        self.leave()
        if self.state == State.DRAINING:
            self.timer = self.loop.call_later(FAREWELL_TIMEOUT, self._farewell_late)

    def _farewell_late(self) -> None:
        self.timer = None
        if self.state == State.DRAINING:  # it does not read: closed for the same reason
            self.close_because(self.reason)

    def detach(self) -> None:
        """Out of the loop, the chat and flow control; released at the end of the turn. What
        cannot fail comes first, the calls out last: a bug in them (logged and contained) still
        leaves the connection out of the loop and released."""
        self._cancel_timers()
        self.unwatch()
        self.queue.clear()
        self.hub.release_soon(self)
        self.hub.departed(self)
        self.flow.forget(self)

    def finish(self) -> None:
        self.sock.close()
        self.machine.remove_model(self)
        self.hub.forget(self)
        self.hub.events.closed(self.fd, self.peer, self.reason, bytes_in=self.bytes_in,
                               bytes_out=self.bytes_out,
                               seconds=round(time.monotonic() - self.opened, 3))

    def _cancel_timers(self) -> None:
        for timer in (self.timer, self.credit_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.credit_timer = None


def _size(count: int) -> str:
    """A size for people: ``4 MiB``, ``512 KiB``, ``300 bytes``."""
    for unit, name in ((1 << 20, "MiB"), (1 << 10, "KiB")):
        if count >= unit:
            return f"{count / unit:.3g} {name}"
    return f"{count} bytes"


def _subject(cert: dict[str, Any] | None) -> str | None:
    """A client certificate's subject as ``CN=alice,O=Example``; None without a certificate."""
    if not cert or not isinstance(cert.get("subject"), tuple):
        return None
    subject: tuple[tuple[tuple[str, str], ...], ...] = cert["subject"]
    names = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
             "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
             "emailAddress": "emailAddress"}
    return ",".join(f"{names.get(key, key)}={value}" for rdn in subject for key, value in rdn)


MACHINE = Connection.machine
"""The one machine every connection shares."""
