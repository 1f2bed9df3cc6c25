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
import socket
import time
from typing import Protocol

from structlog.typing import FilteringBoundLogger

from fsmchat import lifecycle
from fsmchat.lifecycle import State, Trigger
from fsmchat.loop import EventLoop
from fsmchat.machine import TableModel
from fsmchat.outqueue import OutQueue

RECV_SIZE = 64 * 1024
"""Bytes one recv may return: one message, and the most one sender gets per loop turn."""

_REASONS = {errno.ECONNRESET: "reset", errno.EPIPE: "broken_pipe", errno.ETIMEDOUT: "timeout"}


class Hub(Protocol):
    """What a connection needs from the server around it."""

    loop: EventLoop
    log: FilteringBoundLogger
    readers: dict[int, Connection]  # connections that take new messages
    paused: dict[int, Connection]  # senders held back by flow control
    high_water: int  # queued bytes past which a recipient holds senders back
    low_water: int  # queued bytes under which it lets them go again
    max_queue_bytes: int  # queued bytes past which a recipient is closed

    def broadcast(self, sender: Connection, data: bytes) -> None: ...

    def overflowed(self, conn: Connection) -> None: ...

    def congested(self, conn: Connection) -> None: ...

    def relieved(self, conn: Connection) -> None: ...

    def release_soon(self, conn: Connection) -> None: ...

    def bug(self, conn: Connection, trigger: str, exc: Exception) -> None: ...

    def forget(self, conn: Connection) -> None: ...


class Connection(TableModel, lifecycle=lifecycle.CONNECTION):
    def __init__(self, sock: socket.socket, peer: str, hub: Hub) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.hub = hub
        self.queue = OutQueue()
        self.bytes_in = 0
        self.bytes_out = 0
        self.opened = time.monotonic()
        self.reason = ""  # why it closes: set when a drain begins, replaced by a forced close
        self.crowded = False  # over the high-water mark, and not yet back under the low one
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
        if queue.nbytes + len(data) > self.hub.high_water:
            if queue.nbytes + len(data) > self.hub.max_queue_bytes:
                self.hub.overflowed(self)
                return
            self.hub.congested(self)
        if not queue:
            self.hub.loop.want_write(self.fd, True)
        queue.push(data)

    # -- actions, named by lifecycle.TRANSITIONS ---------------------------------------------

    def join(self) -> None:
        self.hub.readers[self.fd] = self
        self.hub.loop.want_read(self.fd, True)

    def receive(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._failed("recv", exc)
            return
        if not data:
            self.reason = "peer_closed"
            self.fire(Trigger.HANGUP)
            return
        self.bytes_in += len(data)
        self.hub.log.debug("data.received", fd=self.fd, bytes=len(data))
        self.hub.broadcast(self, data)

    def flush(self) -> None:
        queue = self.queue
        try:
            sent = queue.send_to(self.sock)
        except BlockingIOError:
            return
        except OSError as exc:
            self._failed("send", exc)
            return
        self.bytes_out += sent
        self.hub.log.debug("data.sent", fd=self.fd, bytes=sent, queued=queue.nbytes)
        if self.crowded and queue.nbytes <= self.hub.low_water:
            self.hub.relieved(self)
        if not queue:
            self.hub.loop.want_write(self.fd, False)
            if self.state == State.DRAINING:
                self.fire(Trigger.DRAINED)

    def pause_reading(self) -> None:
        self.hub.paused[self.fd] = self
        self.hub.loop.want_read(self.fd, False)

    def resume_reading(self) -> None:
        del self.hub.paused[self.fd]
        self.hub.loop.want_read(self.fd, True)

    def leave(self) -> None:
        self.reason = self.reason or "server_shutdown"
        self.hub.readers.pop(self.fd, None)
        self.hub.paused.pop(self.fd, None)
        self.hub.loop.want_read(self.fd, False)
        if not self.queue:
            self.fire(Trigger.DRAINED)

    def detach(self) -> None:
        self.hub.readers.pop(self.fd, None)
        self.hub.paused.pop(self.fd, None)
        self.hub.loop.unregister(self.fd)
        self.queue.clear()
        if self.crowded:
            self.hub.relieved(self)
        self.hub.release_soon(self)

    def finish(self) -> None:
        self.sock.close()
        self.machine.remove_model(self)
        self.hub.forget(self)
        self.hub.log.info("connection.closed", fd=self.fd, peer=self.peer, reason=self.reason,
                          bytes_in=self.bytes_in, bytes_out=self.bytes_out,
                          seconds=round(time.monotonic() - self.opened, 3))

    def _failed(self, op: str, exc: OSError) -> None:
        code = exc.errno or 0
        name = errno.errorcode.get(code, str(code))
        self.hub.log.warning("connection.error", fd=self.fd, peer=self.peer, op=op,
                             error=f"{name}: {exc.strerror}")
        self.close_because(_REASONS.get(code, name.lower()))


MACHINE = Connection.machine
"""The one machine every connection shares."""
