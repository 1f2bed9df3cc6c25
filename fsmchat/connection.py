"""One client connection: a socket, its outgoing queue, and its place in the lifecycle.

Every connection is a model of the one shared ``transitions`` machine built from
``lifecycle.CONNECTION`` (see ``machine.TableModel``). The loop's readiness reaches it as
triggers through ``fire``, and the table decides what a trigger means in the current state.

Actions do the socket work and may fire the next trigger (an empty queue while draining fires
``drained``); they never close a socket mid-turn: ``detach`` hands the connection to the hub, which
releases it when the loop step ends (Redis's CLOSE_ASAP), so no descriptor is reused while the
loop still holds its number.
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
from fsmchat.loop import Timer
from fsmchat.machine import TableModel
from fsmchat.outqueue import OutQueue

if TYPE_CHECKING:
    from fsmchat.hub import Hub

RECV_SIZE = 64 * 1024
"""Bytes one recv may return: one message, and the most one sender gets per loop turn."""

_REASONS = {errno.ECONNRESET: "reset", errno.EPIPE: "broken_pipe", errno.ETIMEDOUT: "timeout"}


def error_reason(exc: OSError) -> str:
    """The close reason a socket error gives: ``reset``, ``broken_pipe``, ``timeout`` or another
    lower-case errno name."""
    code = exc.errno or 0
    return _REASONS.get(code) or errno.errorcode.get(code, str(code)).lower()


class Connection(TableModel, lifecycle=lifecycle.CONNECTION):
    def __init__(self, sock: socket.socket, peer: str, hub: Hub) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.hub = hub
        self.flow = hub.flow
        self.limits = hub.limits
        self.queue = OutQueue()
        self.bytes_in = 0
        self.bytes_out = 0
        self.opened = time.monotonic()
        self.reason = ""  # why it closes: set when a drain begins, replaced by a forced close
        self.congested = False  # over the high-water mark, and not yet back under the low one
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.heard = self.opened  # when it last sent something (for --idle-timeout)
        self.tokens = float(hub.limits.max_recv_rate)  # its token bucket (for --max-recv-rate)
        self.counted = self.opened  # when the bucket was last brought up to date
        self.timer: Timer | None = None  # the handshake's timeout, then the idle check
        self.credit_timer: Timer | None = None  # set while `limited`
        self.machine.add_model(self)

    def __repr__(self) -> str:
        return f"<Connection fd={self.fd} {self.peer} {self.state}>"

    # -- triggers -------------------------------------------------------------------------

    def changing(self, source: str, dest: str, trigger: str) -> None:
        self.hub.log.debug("connection.state", fd=self.fd, **{"from": source, "to": dest},
                           trigger=trigger)

    def on_readable(self) -> None:
        try:
            self.fire(Trigger.READABLE)
        except Exception as exc:  # noqa: BLE001 - a bug closes this client, never the loop
            self.hub.bug(self, Trigger.READABLE, exc)

    def on_writable(self) -> None:
        try:
            self.fire(Trigger.WRITABLE)
        except Exception as exc:  # noqa: BLE001
            self.hub.bug(self, Trigger.WRITABLE, exc)

    def close_because(self, reason: str) -> None:
        """Close without delivering what is queued, unless it is closing already.

        ``reason`` replaces one set earlier (a drain that began for ``peer_closed`` and was cut
        short closes for ``drain_timeout``): it says why queued data was dropped.
        """
        if lifecycle.allowed(self.state, Trigger.FAIL):
            self.reason = reason
            self.fire(Trigger.FAIL)

    def enqueue(self, data: bytes) -> None:
        """Queue a message; over the limit, leave it out and have the hub close this client."""
        queue = self.queue
        if queue.nbytes + len(data) > self.flow.high_water:
            if queue.nbytes + len(data) > self.hub.max_queue_bytes:
                self.hub.overflowed(self)
                return
            self.flow.congested(self)
        if not queue:
            self.hub.loop.want_write(self.fd, True)
        queue.push(data)

    # -- actions, named by lifecycle.TRANSITIONS ---------------------------------------------

    def join(self) -> None:
        hub = self.hub
        if self.timer is not None:  # the handshake's timeout
            self.timer.cancel()
            self.timer = None
        hub.loop.want_read(self.fd, True)
        if self.limits.idle_timeout:
            self.heard = time.monotonic()
            self.timer = hub.loop.call_later(self.limits.idle_timeout, self._check_idle)
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
            self.hub.log.warning("connection.idle", fd=self.fd, peer=self.peer,
                                 seconds=round(silent, 3))
            self._close_safely("idle_timeout")
            return
        self.timer = self.hub.loop.call_later(self.limits.idle_timeout - silent, self._check_idle)

    def begin_handshake(self) -> None:
        self.timer = self.hub.loop.call_later(self.limits.handshake_timeout, self._handshake_late)
        self.shake()

    def shake(self) -> None:
        assert isinstance(self.sock, ssl.SSLSocket)
        loop = self.hub.loop
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            loop.want_read(self.fd, True)
            loop.want_write(self.fd, False)
            return
        except ssl.SSLWantWriteError:
            loop.want_read(self.fd, False)
            loop.want_write(self.fd, True)
            return
        except OSError as exc:
            self._failed("handshake", exc)
            return
        loop.want_write(self.fd, False)
        cipher = self.sock.cipher()
        self.hub.log.info("connection.secured", fd=self.fd, peer=self.peer,
                          version=self.sock.version(), cipher=cipher[0] if cipher else None,
                          subject=_subject(self.sock.getpeercert()))
        self.fire(Trigger.ESTABLISHED)

    def _handshake_late(self) -> None:
        self.timer = None
        if self.state == State.HANDSHAKING:
            self.hub.log.warning("connection.tls_error", fd=self.fd, peer=self.peer,
                                 error=f"no handshake within {self.limits.handshake_timeout:g} s")
            self._close_safely("handshake_timeout")

    def _tls_failed(self, exc: ssl.SSLError) -> None:
        self.hub.log.warning("connection.tls_error", fd=self.fd, peer=self.peer,
                             error=exc.reason or str(exc))
        self.close_because("tls_error")

    def _close_safely(self, reason: str) -> None:
        """A close decided by a timer: a bug closes this client only, never the loop."""
        try:
            self.close_because(reason)
        except Exception as exc:  # noqa: BLE001
            self.hub.bug(self, Trigger.FAIL, exc)

    def wait_for_credit(self) -> None:
        rate = self.limits.max_recv_rate
        self.hub.loop.want_read(self.fd, False)
        wait = -self.tokens / rate
        self.hub.log.debug("connection.limited", fd=self.fd, credit_in=round(wait, 3))
        self.credit_timer = self.hub.loop.call_later(wait, self._credited)

    def _credited(self) -> None:
        self.credit_timer = None
        if self.state == State.LIMITED:
            try:
                self.fire(Trigger.CREDIT)
            except Exception as exc:  # noqa: BLE001
                self.hub.bug(self, Trigger.CREDIT, exc)

    def receive(self) -> None:
        sock = self.sock
        try:
            data = sock.recv(RECV_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError as exc:
            self._failed("recv", exc)
            return
        if not data:
            self.reason = "peer_closed"
            self.fire(Trigger.HANGUP)
            return
        if self.tls:  # what TLS decrypted already is invisible to select: take it now
            tls = cast(ssl.SSLSocket, sock)
            while tls.pending():
                data += tls.recv(tls.pending())
        self.bytes_in += len(data)
        self.hub.log.debug("data.received", fd=self.fd, bytes=len(data))
        limits = self.limits
        if limits.idle_timeout or limits.max_recv_rate:
            self._heard(len(data))
        self.hub.received(self, data)

    def _heard(self, size: int) -> None:
        """Mark it active, and charge its token bucket; over its rate, it waits for credit."""
        now = time.monotonic()
        rate = self.limits.max_recv_rate
        if rate:
            tokens = min(float(rate), self.tokens + (now - self.counted) * rate) - size
            self.tokens = tokens
            self.counted = now
            if tokens < 0 and self.state == State.READING:
                self.fire(Trigger.OVERRUN)
        self.heard = now

    def flush(self) -> None:
        queue = self.queue
        try:
            sent = queue.send_to(self.sock, gather=not self.tls)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return
        except OSError as exc:
            self._failed("send", exc)
            return
        self.bytes_out += sent
        self.hub.log.debug("data.sent", fd=self.fd, bytes=sent, queued=queue.nbytes)
        if self.congested and queue.nbytes <= self.flow.low_water:
            self.flow.caught_up(self)
        if not queue:
            self.hub.loop.want_write(self.fd, False)
            if self.state == State.DRAINING:
                self.fire(Trigger.DRAINED)

    def pause_reading(self) -> None:
        self.flow.paused[self.fd] = self
        self.hub.loop.want_read(self.fd, False)

    def resume_reading(self) -> None:
        self.flow.paused.pop(self.fd, None)
        self.hub.loop.want_read(self.fd, True)

    def stop_reading(self) -> None:
        if self.credit_timer is not None:
            self.credit_timer.cancel()
            self.credit_timer = None
        self.flow.paused.pop(self.fd, None)
        self.hub.loop.want_read(self.fd, False)

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
        self.reason = self.reason or "server_shutdown"
        self.hub.departed(self)
        self.hub.loop.want_read(self.fd, False)
        if not self.queue:
            self.fire(Trigger.DRAINED)

    def detach(self) -> None:
        self._cancel_timers()
        self.hub.departed(self)
        self.hub.loop.unregister(self.fd)
        self.queue.clear()
        self.flow.forget(self)
        self.hub.release_soon(self)

    def finish(self) -> None:
        self.sock.close()
        self.machine.remove_model(self)
        self.hub.forget(self)
        self.hub.log.info("connection.closed", fd=self.fd, peer=self.peer, reason=self.reason,
                          bytes_in=self.bytes_in, bytes_out=self.bytes_out,
                          seconds=round(time.monotonic() - self.opened, 3))

    def _cancel_timers(self) -> None:
        for timer in (self.timer, self.credit_timer):
            if timer is not None:
                timer.cancel()
        self.timer = self.credit_timer = None

    def _failed(self, op: str, exc: OSError) -> None:
        if isinstance(exc, ssl.SSLError):  # a TLS protocol error, not a socket error
            self._tls_failed(exc)
            return
        code = exc.errno or 0
        name = errno.errorcode.get(code, str(code))
        self.hub.log.warning("connection.error", fd=self.fd, peer=self.peer, op=op,
                             error=f"{name}: {exc.strerror}")
        self.close_because(error_reason(exc))


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
