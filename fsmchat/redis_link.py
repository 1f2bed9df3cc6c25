"""One connection to Redis, as one more socket in the select loop with a machine of its own.

A link is a model of ``lifecycle.REDIS_LINK``: it dials without blocking, greets Redis (AUTH and
SELECT when the URL asks for them, then what its role needs), lives in ``ready`` until something
fails, and then waits in ``backoff`` for a capped exponential delay before it dials again, for as
long as the server runs. Replies are parsed by ``hiredis.Reader``; commands are packed by
``hiredis.pack_command`` or, on the publish hot path, by the role itself.

``RedisLink`` is the socket and the lifecycle; what the link is *for* lives in a subclass
(``bus.PublishLink``, ``bus.SubscribeLink``), through a few hooks: ``greeting``, ``ready``,
``on_reply``, ``lost``, ``idle`` and ``closed``.

Rules it keeps:
- No call blocks: connect is non-blocking and finishes when select reports the socket writable.
  The one exception is resolving a host *name* (an IP address is not looked up), which goes
  through the system resolver at each dial.
- A loss is logged once (``redis.disconnected``), the retries that follow at debug level.
- The socket is written only when select says it is writable, like a client's.
"""

from __future__ import annotations

import errno
import os
import random
import socket
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import hiredis
from structlog.typing import FilteringBoundLogger

from fsmchat.lifecycle import REDIS_LINK, LinkState, LinkTrigger
from fsmchat.loop import FD_SETSIZE, EventLoop, Timer
from fsmchat.machine import TableModel
from fsmchat.outqueue import OutQueue

DEFAULT_PORT = 6379
RECV_SIZE = 256 * 1024
"""Bytes one recv may take from Redis: many replies or messages, parsed in one go."""

RETRY_FIRST = 0.1
"""Seconds before the first retry; each failed attempt doubles it, up to ``RETRY_MAX``."""

RETRY_MAX = 2.0
"""The longest wait between two attempts: how long a restarted Redis may go unnoticed."""


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where Redis is and how to log in: ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]``."""

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """Raise ``ValueError`` with a message for people when ``url`` is not a Redis URL."""
        parts = urlsplit(url)
        if parts.scheme == "rediss":
            raise ValueError("rediss:// (TLS to Redis) is not supported; use redis://")
        if parts.scheme != "redis":
            raise ValueError("expected redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError("the port must be a number from 1 to 65535") from None
        if not parts.hostname:
            raise ValueError("no host: expected redis://HOST[:PORT][/DB]")
        path = parts.path.strip("/")
        if not path:
            db = 0
        elif path.isdigit():
            db = int(path)
        else:
            raise ValueError(f"the database must be a number, not {path!r}")
        if parts.query or parts.fragment:
            raise ValueError("options after ? or # are not supported")
        return cls(parts.hostname, port, db, unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password is not None else None)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def url(self) -> str:
        """The URL with the password hidden: what the logs show."""
        login = ""
        if self.password is not None:
            login = f"{self.username or ''}:***@"
        elif self.username:
            login = f"{self.username}@"
        return f"redis://{login}{self}/{self.db}"

    def login(self) -> list[tuple[bytes, ...]]:
        """The commands that come before any other on a fresh connection."""
        commands: list[tuple[bytes, ...]] = []
        if self.password is not None:
            user = (self.username.encode(),) if self.username else ()
            commands.append((b"AUTH", *user, self.password.encode()))
        if self.db:
            commands.append((b"SELECT", b"%d" % self.db))
        return commands


def describe(exc: OSError) -> str:
    """``ECONNREFUSED: Connection refused``: an errno name operators can search for."""
    code = exc.errno or 0
    name = errno.errorcode.get(code, "")
    text = exc.strerror or str(exc)
    return f"{name}: {text}" if name else text


class RedisLink(TableModel, lifecycle=REDIS_LINK):
    role: ClassVar[str]  # "publish" or "subscribe": the `link` field of its events

    def __init__(self, address: RedisAddress, loop: EventLoop, log: FilteringBoundLogger) -> None:
        self.address = address
        self.loop = loop
        self.log = log
        self.sock: socket.socket | None = None
        self.fd = -1
        self.queue = OutQueue()
        self.reader = hiredis.Reader()
        self.greeting_left = 0  # greeting replies still awaited
        self.attempts = 0  # dials since the link was last ready
        self.delay = RETRY_FIRST  # the next backoff, before jitter
        self.error = ""  # why the last attempt or the last session ended
        self.down_reported = False  # redis.disconnected logged for the current outage
        self.retry_timer: Timer | None = None
        self.machine.add_model(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} fd={self.fd} {self.address} {self.state}>"

    # -- what the bus calls ---------------------------------------------------------------------

    def start(self) -> None:
        self.fire(LinkTrigger.DIAL)

    def stop(self) -> None:
        """The server is stopping: drain when connected, close otherwise."""
        if self.lifecycle.allowed(self.state, LinkTrigger.SHUTDOWN):
            self.fire(LinkTrigger.SHUTDOWN)

    def abort(self, reason: str) -> None:
        """The drain took too long: close now."""
        if self.state == LinkState.DRAINING:
            self.error = reason
            self.fire(LinkTrigger.FAIL)

    def send_command(self, *args: bytes) -> None:
        self.push(hiredis.pack_command(args))  # type: ignore[arg-type] # stub: a 1-tuple

    def push(self, *buffers: bytes) -> None:
        """Queue bytes for Redis; only while connected (the socket is in the loop)."""
        queue = self.queue
        if not queue:
            self.loop.want_write(self.fd, True)
        for buffer in buffers:
            queue.push(buffer)

    def lose(self, error: str) -> None:
        self.error = error
        self.fire(LinkTrigger.FAIL)

    # -- the loop's handler ----------------------------------------------------------------------

    def on_readable(self) -> None:
        self._safely(LinkTrigger.READABLE)

    def on_writable(self) -> None:
        self._safely(LinkTrigger.WRITABLE)

    def _safely(self, trigger: str) -> None:
        try:
            self.fire(trigger)
        except Exception as exc:  # a bug drops the link (which retries), never the loop
            self.log.error("lifecycle.bug", fd=self.fd, link=self.role, state=self.state,
                           trigger=trigger, exception=repr(exc), exc_info=True)
            if self.lifecycle.allowed(self.state, LinkTrigger.FAIL):
                self.lose("internal_error")

    def changing(self, source: str, dest: str, trigger: str) -> None:
        self.log.debug("redis.state", link=self.role, **{"from": source, "to": dest},
                       trigger=trigger)

    # -- actions, named by lifecycle.LINK_TRANSITIONS ----------------------------------------------

    def open_socket(self) -> None:
        self.attempts += 1
        self.retry_timer = None
        try:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                self.address.host, self.address.port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:  # socket.gaierror included
            self.lose(describe(exc))
            return
        if sock.fileno() >= FD_SETSIZE:
            sock.close()
            self.lose("no descriptor below FD_SETSIZE left for select")
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.fd = sock, sock.fileno()
        self.reader = hiredis.Reader()
        self.queue.clear()
        self.loop.register(self.fd, self, read=False)
        self.loop.want_write(self.fd, True)
        code = sock.connect_ex(sockaddr)
        if code not in (0, errno.EINPROGRESS):
            self.lose(describe(OSError(code, os.strerror(code))))

    def check_connect(self) -> None:
        assert self.sock is not None
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.lose(describe(OSError(code, os.strerror(code))))
            return
        self.loop.want_write(self.fd, False)
        self.fire(LinkTrigger.CONNECTED)

    def greet(self) -> None:
        self.loop.want_read(self.fd, True)
        commands = [*self.address.login(), *self.greeting()]
        for command in commands:
            self.send_command(*command)
        self.greeting_left = len(commands)

    def receive(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self.lose(describe(exc))
            return
        if not data:
            self.lose("closed by Redis")
            return
        reader = self.reader
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.lose(f"protocol error: {exc}")
                return
            if reply is False:
                return
            if self.state == LinkState.GREETING:
                if isinstance(reply, hiredis.ReplyError):
                    self.lose(str(reply))
                    return
                self.greeting_left -= 1
                if not self.greeting_left:
                    self.fire(LinkTrigger.GREETED)
                continue
            self.on_reply(reply)
            if self.sock is None:
                return  # the reply ended this session: what is left belongs to no one

    def flush(self) -> None:
        assert self.sock is not None
        try:
            self.queue.send_to(self.sock)
        except BlockingIOError:
            return
        except OSError as exc:
            self.lose(describe(exc))
            return
        if not self.queue:
            self.loop.want_write(self.fd, False)

    def go_live(self) -> None:
        self.log.info("redis.connected", link=self.role, address=str(self.address),
                      attempts=self.attempts)
        self.attempts = 0
        self.delay = RETRY_FIRST
        self.down_reported = False
        self.ready()

    def pause_reading(self) -> None:
        self.loop.want_read(self.fd, False)

    def resume_reading(self) -> None:
        self.loop.want_read(self.fd, True)

    def schedule_retry(self) -> None:
        self._close_socket()
        if not self.down_reported:
            self.down_reported = True
            self.log.warning("redis.disconnected", link=self.role, address=str(self.address),
                             error=self.error, **self.counters())
        # Jitter, so that instances that lost Redis together do not retry in step.
        delay = round(random.uniform(self.delay / 2, self.delay), 3)
        self.delay = min(self.delay * 2, RETRY_MAX)
        self.log.debug("redis.retrying", link=self.role, attempt=self.attempts + 1, delay=delay,
                       error=self.error)
        self.retry_timer = self.loop.call_later(delay, lambda: self._safely(LinkTrigger.DIAL))
        self.lost()

    def drain(self) -> None:
        if self.idle():
            self.fire(LinkTrigger.DRAINED)

    def close_link(self) -> None:
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        self._close_socket()
        self.machine.remove_model(self)
        self.closed()

    def _close_socket(self) -> None:
        if self.sock is not None:
            self.loop.unregister(self.fd)
            self.sock.close()
            self.sock = None
            self.fd = -1
        self.queue.clear()

    # -- the role's hooks ------------------------------------------------------------------------

    def greeting(self) -> list[tuple[bytes, ...]]:
        """Commands after the login; the link is ready once all are answered without error."""
        return [(b"PING",)]

    def ready(self) -> None:
        """The greeting was answered: start doing the link's work."""

    def on_reply(self, reply: Any) -> None:
        """A reply (or, subscribed, a message) once ready."""

    def lost(self) -> None:
        """The session ended and a retry is scheduled."""

    def idle(self) -> bool:
        """Nothing waits for Redis: a stopping server may close the link."""
        return True

    def closed(self) -> None:
        """The link is closed for good."""

    def counters(self) -> dict[str, int]:
        """What the link relayed: its events and ``server.stopped`` carry these."""
        return {}
