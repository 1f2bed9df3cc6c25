"""One connection to Redis, as one more socket in the select loop with a machine of its own.

A link is a model of ``lifecycle.REDIS_LINK``: it dials without blocking, greets Redis (AUTH and
SELECT when the URL asks for them, then what its role needs), lives in ``ready`` until something
fails, and then waits in ``backoff`` for a capped exponential delay before it dials again, for as
long as the server runs. Replies are parsed by ``hiredis.Reader``; commands are packed by
``hiredis.pack_command`` or, on the publish hot path, by the role itself.

Redis is trusted no more than a client: whatever it sends (or fails to send) ends one session of
the link, never the link's retries, the loop or the local chat.

``RedisLink`` is the socket and the lifecycle (the socket plumbing, and a bug that drops the link,
which then redials, come from ``sock.LoopSocket``); what the link is *for* lives in a subclass
(``bus.PublishLink``, ``bus.SubscribeLink``, and the asking links, ``AskingLink``, whose replies go
back to whoever asked: ``presence.PresenceLink``, ``streams.HistoryLink``), through a few hooks:
``greeting``, ``ready``, ``on_reply``, ``awaiting``, ``quiet``, ``lost``, ``idle`` and ``closed``.
Whoever owns the link may set its ``watcher``, told when each session begins and ends (the bus
tells local users of an outage with it).

Rules it keeps:
- No call blocks: connect is non-blocking and finishes when select reports the socket writable.
  The one exception is resolving a host *name* (an IP address is not looked up), which goes
  through the system resolver at each dial. Each address the name has is tried in turn.
- A loss is logged once per outage (``redis.disconnected``), the retries that follow at debug
  level. An outage ends when the link has stayed ready for ``STABLE`` seconds: one that Redis
  drops sooner is the same outage, and the retries go on backing off.
- The socket is written only when select says it is writable, like a client's.
- Redis answers in time: the connect, the greeting and every command it owes an answer to must
  hear from it within ``ANSWER_TIMEOUT``, or the link is lost (``redis.disconnected``).
- One reply takes at most ``REPLY_MAX`` bytes; a longer one, a reply that cannot be parsed, or
  one the link did not ask for is a protocol error: the link is lost, never the server.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import hiredis
from structlog.typing import FilteringBoundLogger

from fsmchat.lifecycle import REDIS_LINK, LinkState, LinkTrigger
from fsmchat.net.loop import EventLoop, FdLimit, Timer
from fsmchat.net.sock import LoopSocket
from fsmchat.reasons import Reason

SockAddr = tuple[socket.AddressFamily, socket.SocketKind, int, Any]
"""One address of the host as ``getaddrinfo`` gives it: family, type, protocol, address."""

DEFAULT_PORT = 6379
RECV_SIZE = 256 * 1024
"""Bytes one recv may take from Redis: many replies or messages, parsed in one go."""

RETRY_FIRST = 0.1
"""Seconds before the first retry; each failed attempt doubles it, up to ``RETRY_MAX``."""

RETRY_MAX = 2.0
"""The longest wait between two attempts: how long a restarted Redis may go unnoticed."""

STABLE = 5.0
"""Seconds a link must stay ready before its outage is over: a Redis that accepts the link and
drops it again sooner is one outage, logged once, with retries still backing off."""

ANSWER_TIMEOUT = 5.0
"""Seconds Redis may say nothing while it owes the link an answer (to the connect, the greeting,
a command, the subscriber's PING): past it the link is taken for lost and dials again."""

WATCH_EVERY = 1.0
"""Seconds between two looks at how long Redis has been silent."""

REPLY_MAX = 32 * 1024 * 1024
"""The most bytes one reply may take. Redis closes a pub/sub client whose output passes 32 MB
(``client-output-buffer-limit pubsub``, by default), so a longer reply comes from a Redis set up
otherwise or from something that is not Redis; the link closes rather than buffer it."""


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
            port = parts.port
        except ValueError:
            port = 0
        if port is None:
            port = DEFAULT_PORT
        elif not port:
            raise ValueError("the port must be a number from 1 to 65535")
        if not parts.hostname:
            raise ValueError("no host: expected redis://HOST[:PORT][/DB]")
        try:
            parts.hostname.encode("idna")  # what the resolver will be asked: checked now
        except UnicodeError:
            raise ValueError("not a host name: each part between dots must have 1 to 63 "
                             "characters") from None
        path = parts.path.strip("/")
        if not path:
            db = 0
        elif path.isdigit():
            db = int(path)
        else:
            raise ValueError(f"the database must be a number, not {path!r}")
        if parts.query or parts.fragment:
            raise ValueError("options after ? or # are not supported")
        return cls(parts.hostname, port, db,
                   _login_part(parts.username, "user") if parts.username else None,
                   _login_part(parts.password, "password") if parts.password is not None
                   else None)

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


def _login_part(text: str, what: str) -> str:
    try:
        value = unquote(text, errors="strict")
        value.encode()  # bytes of the command line that are not UTF-8 cannot be sent
    except UnicodeError:
        raise ValueError(f"the {what} must be UTF-8 (%-escapes too)") from None
    return value


def describe(exc: OSError) -> str:
    """``ECONNREFUSED: Connection refused``: an errno name operators can search for."""
    code = exc.errno or 0
    name = errno.errorcode.get(code, "")
    text = exc.strerror or str(exc)
    return f"{name}: {text}" if name else text


class RedisLink(LoopSocket, lifecycle=REDIS_LINK):
    role: ClassVar[str]  # "publish" or "subscribe": the `link` field of its events
    recv_size = RECV_SIZE

    def __init__(self, address: RedisAddress, loop: EventLoop, log: FilteringBoundLogger) -> None:
        super().__init__(loop, log, str(address))
        self.address = address
        self.reader = hiredis.Reader()
        self.greeting_left = 0  # greeting replies still awaited
        self.attempts = 0  # dials since the last outage ended
        self.delay = RETRY_FIRST  # the next backoff, before jitter
        self.error = ""  # why the last attempt or the last session ended
        self.down_reported = False  # redis.disconnected logged for the current outage
        self.live_since: float | None = None  # when the session went ready
        self.retry_timer: Timer | None = None
        self.addresses: list[SockAddr] = []  # the host's addresses this dial has yet to try
        self.unparsed = 0  # bytes fed to the reader since its last whole reply (at least)
        self.reads = 0  # recvs that returned data, this session
        self.reads_seen = 0  # ... when the watch last looked
        self.heard_at = 0.0  # when the watch last saw Redis say something (or the dial)
        self.owed_since = 0.0  # when the watch last saw Redis owe nothing
        self.watch_timer: Timer | None = None
        self.watcher: Callable[[RedisLink, bool], None] | None = None
        """Told ``(link, True)`` when a session is ready, ``(link, False)`` when one is lost or
        a dial failed (a retry is scheduled then); not when the link closes for good."""
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
        """Queue a command for Redis; only while connected (the socket is in the loop)."""
        self.push(hiredis.pack_command(args))  # type: ignore[arg-type] # stub: a 1-tuple

    def hurry(self) -> None:
        """Another link to the same Redis got through: dial now rather than at the retry."""
        if self.state == LinkState.BACKOFF and self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
            self.fire(LinkTrigger.DIAL)

    def lose(self, error: str) -> None:
        self.error = error
        self.fire(LinkTrigger.FAIL)

    def unexpected(self, reply: object) -> None:
        """Redis sent what the link did not ask for: a protocol error, not a bug of ours."""
        self.lose(f"protocol error: unexpected reply {reply!r:.80}")

    # -- the socket base's hooks ------------------------------------------------------------------

    def failed(self, op: str, exc: OSError) -> None:
        self.lose(describe(exc))

    def abandon(self) -> None:
        """After a bug: drop the session; the link redials as after any loss."""
        if self.lifecycle.allowed(self.state, LinkTrigger.FAIL):
            self.lose(Reason.INTERNAL_ERROR)

    def bug_fields(self) -> dict[str, str]:
        return {"link": self.role}

    def changing(self, source: str, dest: str, trigger: str) -> None:
        self.log.debug("redis.state", link=self.role, **{"from": source, "to": dest},
                       trigger=trigger)

    # -- actions, named by lifecycle.LINK_TRANSITIONS ----------------------------------------------

    def open_socket(self) -> None:
        self.attempts += 1
        self.retry_timer = None
        try:
            found = socket.getaddrinfo(self.address.host, self.address.port,
                                       type=socket.SOCK_STREAM)
        except OSError as exc:  # socket.gaierror included
            self.lose(describe(exc))
            return
        self.addresses = [(family, kind, proto, sockaddr)
                          for family, kind, proto, _, sockaddr in found]
        self._connect_next("the host has no address")

    def _connect_next(self, error: str) -> None:
        """Connect to the next address of the host; ``error`` is why the previous one failed."""
        self._close_socket()
        while self.addresses:
            family, kind, proto, sockaddr = self.addresses.pop(0)
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                error = describe(exc)
                continue
            try:
                self.attach(sock, read=False)
            except FdLimit:
                sock.close()
                error = "no descriptor below FD_SETSIZE left for select"
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex(sockaddr)
            if code not in (0, errno.EINPROGRESS):
                self._close_socket()
                error = describe(OSError(code, os.strerror(code)))
                continue
            self.reader = hiredis.Reader()
            self.unparsed = self.reads = self.reads_seen = 0
            self.heard_at = self.owed_since = time.monotonic()
            self.loop.want_write(self.fd, True)
            self.watch_timer = self.loop.call_later(WATCH_EVERY, self._watch)
            return
        self.lose(error)

    def check_connect(self) -> None:
        assert self.sock is not None
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._connect_next(describe(OSError(code, os.strerror(code))))
            return
        self.addresses.clear()  # connected: a later failure is the session's, not the address's
        self.loop.want_write(self.fd, False)
        self.fire(LinkTrigger.CONNECTED)

    def _watch(self) -> None:
        """Every WATCH_EVERY seconds while the socket is open: lose a link whose Redis owes an
        answer and has been silent for ANSWER_TIMEOUT; let a quiet link's role speak up."""
        self.watch_timer = self.loop.call_later(WATCH_EVERY, self._watch)
        now = time.monotonic()
        if self.reads != self.reads_seen:
            self.reads_seen, self.heard_at = self.reads, now
        state = self.state
        owed = state in (LinkState.CONNECTING, LinkState.GREETING) or (
            state != LinkState.PAUSED and self.awaiting())
        if not owed:
            self.owed_since = now
            if state == LinkState.READY:
                self.quiet(now - self.heard_at)
        elif now - max(self.heard_at, self.owed_since) >= ANSWER_TIMEOUT:
            error = f"no answer from Redis within {ANSWER_TIMEOUT:g} s"
            if state == LinkState.CONNECTING and self.addresses:
                self._connect_next(error)
            else:
                self.lose(error)

    def greet(self) -> None:
        self.loop.want_read(self.fd, True)
        commands = [*self.address.login(), *self.greeting()]
        for command in commands:
            self.send_command(*command)
        self.greeting_left = len(commands)

    def receive(self) -> None:
        data = self.recv_some()
        if data is None:
            return
        if not data:
            self.lose("closed by Redis")
            return
        self.reads += 1
        reader = self.reader
        reader.feed(data)
        whole = False  # a reply ended in this read
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.lose(f"protocol error: {exc}")
                return
            if reply is False:
                # What is left is (at most) one unfinished reply, begun in this read if a reply
                # ended in it. The reader keeps no more than a few KiB it has parsed already.
                self.unparsed = reader.len() if whole else self.unparsed + len(data)
                if self.unparsed > REPLY_MAX:
                    self.lose(f"protocol error: a reply longer than {REPLY_MAX >> 20} MiB")
                return
            whole = True
            if self.state == LinkState.GREETING:
                if isinstance(reply, hiredis.ReplyError):
                    self.lose(str(reply))
                    return
                self.greeting_left -= 1
                self.greeting_reply(reply)
                if not self.greeting_left:
                    self.fire(LinkTrigger.GREETED)
                continue
            self.on_reply(reply)
            if self.sock is None:
                return  # the reply ended this session: what is left belongs to no one

    def flush(self) -> None:
        self.send_queued()

    def go_live(self) -> None:
        self.log.info("redis.connected", link=self.role, address=str(self.address),
                      attempts=self.attempts)
        self.live_since = time.monotonic()
        self.ready()
        if self.watcher is not None:
            self.watcher(self, True)

    def pause_reading(self) -> None:
        self.loop.want_read(self.fd, False)

    def resume_reading(self) -> None:
        self.loop.want_read(self.fd, True)

    def schedule_retry(self) -> None:
        self._close_socket()
        self.addresses.clear()
        if self.live_since is not None and time.monotonic() - self.live_since >= STABLE:
            self.attempts = 0  # the link was up long enough: this is a new outage
            self.delay = RETRY_FIRST
            self.down_reported = False
        self.live_since = None
        if not self.down_reported:
            self.down_reported = True
            self.log.warning("redis.disconnected", link=self.role, address=str(self.address),
                             error=self.error, **self.counters())
        # Jitter, so that instances that lost Redis together do not retry in step.
        delay = round(random.uniform(self.delay / 2, self.delay), 3)
        self.delay = min(self.delay * 2, RETRY_MAX)
        self.log.debug("redis.retrying", link=self.role, attempt=self.attempts + 1, delay=delay,
                       error=self.error)
        self.retry_timer = self.loop.call_later(delay, self._redial)
        self.lost()
        if self.watcher is not None:
            self.watcher(self, False)

    def _redial(self) -> None:
        """The retry timer (a bug here is contained by the loop, like a handler's)."""
        self.fire(LinkTrigger.DIAL)

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
        if self.watch_timer is not None:
            self.watch_timer.cancel()
            self.watch_timer = None
        self.close_socket()
        self.fd = -1

    # -- the role's hooks ------------------------------------------------------------------------

    def greeting(self) -> list[tuple[bytes, ...]]:
        """Commands after the login; the link is ready once all are answered without error."""
        return [(b"PING",)]

    def greeting_reply(self, reply: Any) -> None:
        """One reply of the greeting (not an error), in order."""

    def ready(self) -> None:
        """The greeting was answered: start doing the link's work."""

    def on_reply(self, reply: Any) -> None:
        """A reply (or, subscribed, a message) once ready."""

    def awaiting(self) -> bool:
        """Whether Redis owes the ready link an answer (so its silence counts)."""
        return False

    def quiet(self, silent: float) -> None:
        """Redis has said nothing for ``silent`` seconds and owes nothing: the role may ask."""

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


class Malformed(Exception):
    """A reply that is not what its command answers: Redis's protocol error, not a bug of ours."""


class AskingLink(RedisLink):
    """A link whose commands each have one reply, handed back in order to whoever asked
    (``ask``); a reply that is an error, or that whoever asked finds ``Malformed``, ends the
    session."""

    def __init__(self, address: RedisAddress, loop: EventLoop, log: FilteringBoundLogger) -> None:
        super().__init__(address, loop, log)
        self.waiting: deque[Callable[[Any], None]] = deque()  # one per command sent
        self.answered = 0  # replies taken, since start

    def ask(self, then: Callable[[Any], None], *command: bytes) -> None:
        self.send_command(*command)
        self.waiting.append(then)

    def on_reply(self, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):
            self.lose(f"{self.role} script refused: {reply}")
            return
        if not self.waiting:
            self.unexpected(reply)
            return
        then = self.waiting.popleft()
        try:
            then(reply)
        except Malformed:
            self.unexpected(reply)
            return
        self.answered += 1
        if self.state == LinkState.DRAINING and self.idle():
            self.fire(LinkTrigger.DRAINED)

    def awaiting(self) -> bool:
        return bool(self.waiting)

    def lost(self) -> None:
        self.waiting.clear()

    def idle(self) -> bool:
        return not self.waiting

    def closed(self) -> None:
        self.waiting.clear()
