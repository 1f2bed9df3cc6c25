"""The chat: a listener, the table of connections, broadcast and an orderly shutdown.

The server owns what is shared between connections; each connection owns its socket, queue and
state. A readable listener means ``accept`` (in a bounded batch), a readable client means a
``readable`` trigger on that client's model: the two are told apart by the handler the loop holds
for each descriptor. At the end of each loop step the server releases the connections that moved to
``closing`` during it, and stops the loop once it is stopping and nobody is left.

Rules it keeps:
- A message is appended, as the same bytes object, to the queue of every *other* connection in
  the chat (``reading`` or ``paused``); draining or closing connections take no new messages.
- Output limit: a recipient whose queue would pass ``max_queue_bytes`` is closed (``queue_limit``)
  once the broadcast is done; everyone else still gets the message. The closes, and the leave
  notices they announce (which may take others past their limit in turn), run from one work list
  at one level, never by recursion: one warning per client, however many overflow at once.
- Flow control: a broadcast that leaves a recipient over the high-water mark (half the limit)
  pauses the sender, so TCP slows it down instead of the server buffering without end. Senders
  resume when no recipient is over the low-water mark (a quarter) any more. A recipient may hold
  senders back for ``CONGESTION_GRACE`` seconds at most: after that it is ``stalled``, holds
  nobody, and is closed at the limit unless it reads. So a fast reader is never dropped because
  a sender bursts, and a stuck one cannot freeze the chat. Chat mode asks (``held``) between the
  queue entries of one read too; a sender with lines held back goes on with them at the end of
  a loop step where nobody holds it back, still paused, and reads again once they are out.
- Capacity: past ``max_clients``, past ``max_clients_per_addr`` from its address, or for a
  descriptor ``select`` cannot watch (at or above FD_SETSIZE), the newcomer is accepted and
  closed at once with ``connection.rejected``. So is one whose socket fails while it is being
  taken in (a reset before TLS could begin): the error closes that connection, never the loop.
- TLS handshakes under way take at most a quarter of ``max_clients``: a newcomer past that
  closes the oldest unfinished one (``handshake_limit``), so stalled handshakes can neither
  take the slots of the chat nor keep a real TLS client out.
- Running out of descriptors pauses accepting for a moment (or until a connection closes) instead
  of spinning on a listener that stays readable, and says so once per episode.
- With ``--redis``, every message is also published once on the Redis bus, and every message
  from another instance reaches every local client in the chat; while local recipients are
  congested, the subscriber is paused like a local sender (``bus``). In chat mode a payload goes
  out in queue entries, flow control asked between them; the rest waits in the chat, the
  subscriber paused, and goes on at the end of a step where nobody holds senders back.
- Chat mode (``chat``) is a layer, not a second server: a connection's recv goes to the chat's
  framing instead of straight to ``announce``, and the chat asks back through ``announce``,
  ``tell`` and ``quit``. Raw mode pays one attribute call for it.
- History keeps what ``announce`` and ``relay`` fanned out (the same bytes objects); a newcomer
  gets it in ``joined``, after chat mode's welcome and before anything live.
- Counters are plain attributes bumped once per message, never per recipient; ``stats`` reads
  them for ``server.stats`` and ``/metrics`` (a listener of its own, in the same loop).
- First SIGINT/SIGTERM/SIGHUP: stop accepting; read every client until what it had sent is
  used up (EOF, or nothing more to read; flow control still holds), so nothing that reached
  TCP before the signal is lost; then every connection drains (and the publisher publishes what
  waits). The reading may take half the drain timeout; second signal, or the drain timeout:
  close whatever is left, and count what it cuts off. Either way the process ends with status 0.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial

from structlog.typing import FilteringBoundLogger

from fsmchat import lifecycle
from fsmchat.access import Access, address_key
from fsmchat.banner import tell_where_to_connect
from fsmchat.bus import RedisBus
from fsmchat.chat import DEFAULT_MAX_LINE, ENTRY_BYTES, Chat
from fsmchat.connection import Connection, error_reason
from fsmchat.events import make_logger
from fsmchat.history import History
from fsmchat.lifecycle import IN_CHAT, SENDING, InvalidTrigger, State, Trigger
from fsmchat.logstream import LogStream, say
from fsmchat.loop import FD_SETSIZE, EventLoop, Timer
from fsmchat.metrics import CONTENT_TYPE, Exposition
from fsmchat.metrics_http import MetricsEndpoint
from fsmchat.options import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HISTORY_BYTES,
    DEFAULT_MAX_CLIENTS_PER_ADDR,
    DEFAULT_MAX_QUEUE_BYTES,
    MAX_CLIENTS_CEILING,
    RESERVED_FDS,
    Options,
)
from fsmchat.signals import SignalWatch
from fsmchat.stats import StatsReporter, snapshot
from fsmchat.tls import TLSSetupError, server_context

EMPTY_QUIET = 0.2
"""Seconds a client must send nothing while the stop reads it before it counts as having
nothing more: what is still on its way (a network's round trip, a slow link) is read too."""

CONGESTION_GRACE = 1.0
"""Seconds a recipient over the high-water mark may hold senders back before it is stalled."""

ACCEPT_BATCH = 64
"""Connections accepted per readable listener event, so a connect storm cannot starve chat."""

ACCEPT_RETRY = 0.25
"""Seconds the listener rests after accept ran out of descriptors or memory."""

KEEPALIVE_IDLE = 300
"""Seconds of silence before TCP probes a client (then every 30 s, 4 times): a peer that
vanished without a FIN or RST is found without any chat traffic."""

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Each begins an orderly stop (SIGHUP: the terminal it ran in is gone); a second one forces it."""

LAST_EVENTS_MIN = 1.0
"""Seconds the last events get at least, after a stop that used all of --drain-timeout."""

_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


@dataclass(slots=True)
class Emptying:
    """The first part of a stop: clients still read until they have nothing more."""

    reading: dict[int, Connection]  # fd -> a client not emptied yet
    until: float  # when they are emptied anyway (half the drain timeout)
    quiet: dict[int, tuple[float, int]] = field(default_factory=dict)  # silent since, bytes_in
    wake: Timer | None = None  # a turn once a quiet client may count as emptied

    def wake_later(self, loop: EventLoop, delay: float) -> None:
        if self.wake is None:
            self.wake = loop.call_later(delay, self._woken)

    def _woken(self) -> None:
        self.wake = None


@dataclass(slots=True)
class Cut:
    """What a stop cut short (the drain timeout, a second signal) did not deliver."""

    undrained: int = 0  # connections closed before everything reached them
    undelivered_bytes: int = 0  # what was still queued to them
    unread_bytes: int = 0  # what clients had sent that the stop never read


def default_max_clients() -> int:
    """What select() and this process's descriptor limit allow, less a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    usable = FD_SETSIZE if soft == resource.RLIM_INFINITY else min(FD_SETSIZE, soft)
    return max(1, usable - RESERVED_FDS)


class Reader:
    """A loop handler for descriptors that are only ever read: listeners, the signal socket."""

    __slots__ = ("on_readable",)

    def __init__(self, on_readable: Callable[[], None]) -> None:
        self.on_readable = on_readable

    def on_writable(self) -> None:
        raise AssertionError("a read-only descriptor was reported writable")


Listener = tuple[socket.socket, ssl.SSLContext | None]
"""A listening socket, and the TLS context its clients are served with (None: plain TCP)."""


class ChatServer:
    empty_quiet = EMPTY_QUIET
    """Seconds of silence after which the stop counts a client as emptied (a model of the
    server whose clock does not run sets 0)."""

    def __init__(self, listeners: list[Listener], loop: EventLoop, log: FilteringBoundLogger,
                 *, drain_timeout: float = 5.0, max_clients: int = MAX_CLIENTS_CEILING,
                 max_queue_bytes: int = DEFAULT_MAX_QUEUE_BYTES, access: Access | None = None,
                 idle_timeout: float = 0.0,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 max_recv_rate: int = 0, mode: str = "raw", max_line: int = DEFAULT_MAX_LINE,
                 history: int = 0, history_bytes: int = DEFAULT_HISTORY_BYTES,
                 max_clients_per_addr: int = DEFAULT_MAX_CLIENTS_PER_ADDR,
                 log_stream: LogStream | None = None) -> None:
        self.listeners = listeners
        self.loop = loop
        self.log = log
        self.drain_timeout = drain_timeout
        self.max_clients = max_clients
        self.max_clients_per_addr = max_clients_per_addr
        self.max_handshakes = max(1, max_clients // 4)
        self.per_addr: Counter[str] = Counter()  # address_key -> connections now
        self._address: dict[int, str] = {}  # fd -> its address_key
        self._handshakes: dict[int, Connection] = {}  # TLS, not yet in the chat; oldest first
        self.max_queue_bytes = max_queue_bytes
        self.high_water = max_queue_bytes // 2
        self.low_water = max_queue_bytes // 4
        self.access = access or Access()
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.max_recv_rate = max_recv_rate
        self.connections: dict[int, Connection] = {}  # every connection not yet closed, by fd
        self.readers: dict[int, Connection] = {}  # in the chat (reading, paused): take messages
        self.paused: dict[int, Connection] = {}  # senders held back by flow control
        self._holding: dict[int, Timer] = {}  # recipients holding senders back -> grace timer
        self._overflowed: dict[int, Connection] = {}  # past the limit, to close: by fd, in order
        self._refused = 0  # messages left out of a queue for its limit, so far (not counted out)
        self._closing_overflowed = False  # _close_overflowed is working through its list
        self._waiting: dict[int, Connection] = {}  # chat mode: senders with lines held back
        self._closing: list[Connection] = []  # moved to `closing` this step; released after it
        self._accept_timer: Timer | None = None  # set while accepting is paused
        self._accept_failures = 0  # failed accepts in the current episode
        self.stopping = False
        self._emptying: Emptying | None = None  # the stop's first part, while it lasts
        self.stop_deadline = 0.0  # when the stop closes whatever is left
        self.started = time.monotonic()
        self.start_time = time.time()
        self.accepted = 0
        self.messages_in = 0  # read from local clients: recvs (raw) or lines (chat)
        self.messages_out = 0  # queued to local clients, one per recipient
        self.bytes_in = 0  # of connections already closed; live ones add theirs at the end
        self.bytes_out = 0
        self.closed: Counter[str] = Counter()  # reason -> connections closed
        self.rejected: Counter[str] = Counter()  # reason -> connections turned away
        self.cut = Cut()  # what a stop cut short did not deliver
        self.log_stream = log_stream  # for the counts of events dropped
        self.history = History(history, history_bytes) if history else None
        self.chat = Chat(self, max_line, min(ENTRY_BYTES, max_queue_bytes // 8)) if (
            mode == "chat") else None
        self.received: Callable[[Connection, bytes], None] = (
            self.chat.received if self.chat is not None else self._relay_bytes)
        """What a connection's recv is handed to: the chat's framing, or straight to everyone."""
        self.bus: RedisBus | None = None  # set by run() with --redis
        self.metrics: MetricsEndpoint | None = None  # set by run() with --metrics-port
        self.metrics_listener: socket.socket | None = None
        for listener, tls in listeners:
            self._listen(listener, partial(self._take_client, tls))

    # -- the Hub a connection sees ----------------------------------------------------------

    def _relay_bytes(self, sender: Connection, data: bytes) -> None:
        """Raw mode: what one recv returned is one message, for everyone else."""
        self.messages_in += 1
        self.announce(data, sender)
        self.hold_back(sender)

    def announce(self, data: bytes, exclude: Connection | None = None,
                 lines: Sequence[bytes] = ()) -> None:
        """A message for every client in the chat but ``exclude``, and every other instance.

        ``lines``: the chat lines that ``data`` joins, when it joins several (one sender's lines
        of one read go out as one queue entry; history and the counters still see each)."""
        self._fan_out(data, exclude, lines)
        if self.bus is not None:
            self.bus.publish(data)

    def announce_here(self, data: bytes, lines: Sequence[bytes] = ()) -> None:
        """A message for every local client in the chat only (``lines``: as for ``announce``)."""
        self._fan_out(data, None, lines)

    def publish(self, data: bytes) -> None:
        """A message for the other instances only."""
        if self.bus is not None:
            self.bus.publish(data)

    def hold_back(self, sender: Connection) -> None:
        """Flow control: pause the sender while someone else's queue is over the high-water
        mark (a recipient does not hold back its own sending)."""
        if self._holding and sender.state == State.READING and (
                len(self._holding) > 1 or sender.fd not in self._holding):
            self.fire(sender, Trigger.THROTTLE)

    def held(self, sender: Connection) -> bool:
        """Whether flow control holds ``sender`` back now (chat mode asks between the queue
        entries of one read)."""
        return bool(self._holding) and sender.state in IN_CHAT and (
            len(self._holding) > 1 or sender.fd not in self._holding)

    def throttled(self) -> bool:
        """Whether a recipient holds senders back now (chat mode asks between the queue entries
        of a relayed payload)."""
        return bool(self._holding)

    def wait(self, sender: Connection) -> None:
        """Chat mode: ``sender`` has lines held back. It is paused (if it is reading) and goes on
        with them at the end of a loop step where nobody holds it back (``_go_on``)."""
        self._waiting[sender.fd] = sender
        self.hold_back(sender)

    def relay(self, payload: bytes) -> bool:
        """A message from another instance, for every local client in the chat.

        Returns whether a recipient now holds senders back, or (chat mode) lines of it wait
        for flow control: the subscriber then pauses, and resumes once they are out."""
        chat = self.chat
        if chat is None:
            self._fan_out(payload, None)
            return bool(self._holding)
        chat.relayed(payload)
        return bool(self._holding) or bool(chat.relaying)

    def _fan_out(self, data: bytes, exclude: Connection | None,
                 lines: Sequence[bytes] = ()) -> None:
        """The same bytes object to every local queue but ``exclude``'s, and into history
        (each of ``lines``, if ``data`` joins several)."""
        readers = self.readers
        refused = self._refused
        for conn in readers.values():
            if conn is not exclude:
                conn.enqueue(data)
        count = len(readers) - (self._refused - refused)
        if exclude is not None and readers.get(exclude.fd) is exclude:
            count -= 1
        self.messages_out += count * (len(lines) or 1)
        history = self.history
        if history is not None:
            if lines:
                for line in lines:
                    history.add(line)
            else:
                history.add(data)
        if self._overflowed:
            self._close_overflowed()

    def tell(self, conn: Connection, data: bytes) -> None:
        """A message for one client only (chat mode's replies), while it is in the chat."""
        if conn.state not in IN_CHAT:
            return
        refused = self._refused
        conn.enqueue(data)
        if self._refused == refused:
            self.messages_out += 1
        if self._overflowed:
            self._close_overflowed()

    def joined(self, conn: Connection) -> None:
        """A client entered the chat: (chat mode: its welcome,) the history, then live."""
        self._handshakes.pop(conn.fd, None)
        if self.chat is not None:
            self.chat.joined(conn)
        if self.history:
            for data in self.history:
                conn.enqueue(data)
            self.messages_out += len(self.history)
            if self._overflowed:
                self._close_overflowed()
        if self.chat is not None and conn.state in IN_CHAT:
            self.chat.announce_join(conn)

    def departed(self, conn: Connection) -> None:
        """A client left the chat, for whatever reason."""
        if self.chat is not None:
            self.chat.left(conn)

    def quit(self, conn: Connection) -> None:
        if conn.state in IN_CHAT:  # not if its goodbye took it past its limit
            conn.reason = "quit"
            self.fire(conn, Trigger.QUIT)

    def in_chat(self, conn: Connection) -> bool:
        return conn.state in IN_CHAT

    def overflowed(self, conn: Connection) -> None:
        self._refused += 1
        self._overflowed[conn.fd] = conn  # once, however many messages it refuses meanwhile

    def congested(self, conn: Connection) -> None:
        if conn.crowded:
            return
        conn.crowded = True
        self._holding[conn.fd] = self.loop.call_later(CONGESTION_GRACE, lambda: self._stall(conn))

    def relieved(self, conn: Connection) -> None:
        conn.crowded = False
        timer = self._holding.pop(conn.fd, None)
        if timer is not None:
            timer.cancel()
            if not self._holding:
                self._resume_senders()

    def release_soon(self, conn: Connection) -> None:
        self._closing.append(conn)

    def forget(self, conn: Connection) -> None:
        del self.connections[conn.fd]
        self._unseat(conn.fd)
        self.closed[conn.reason] += 1
        self.bytes_in += conn.bytes_in
        self.bytes_out += conn.bytes_out
        if self._accept_timer is not None:
            self._resume_accepting()

    # -- loop callbacks ---------------------------------------------------------------------

    def end_of_step(self) -> None:
        """Release what closed during the step; stop once stopping and nobody is left."""
        if self._waiting:
            self._go_on()
        if self.chat is not None and self.chat.relaying and not self._holding:
            self._relay_on(self.chat)
        if self._emptying is not None:
            self._check_emptied()
        while self._closing:
            closing, self._closing = self._closing, []
            for conn in closing:
                self.fire(conn, Trigger.RELEASE)
        if self.stopping and not self.connections and (self.bus is None or self.bus.closed):
            self.loop.stop()

    def on_signals(self, received: list[signal.Signals]) -> None:
        for signum in received:
            if not self.stopping:
                self._begin_shutdown(signum)
            else:
                self._force_close("second_signal")

    def fire(self, conn: Connection, trigger: Trigger) -> None:
        """Fire a trigger the server decided on; a bug is logged and closes that client only."""
        try:
            conn.fire(trigger)
        except Exception as exc:  # noqa: BLE001 - one client's bug must not stop the others
            self.bug(conn, trigger, exc)

    def bug(self, conn: Connection, trigger: str, exc: Exception) -> None:
        self.log.error("lifecycle.bug", fd=conn.fd, state=conn.state, trigger=trigger,
                       exception=repr(exc), exc_info=not isinstance(exc, InvalidTrigger))
        try:
            conn.close_because("internal_error")
        except Exception:  # noqa: BLE001 - the table itself is broken: take it out by hand
            self._take_out(conn)
            conn.sock.close()
            if self.connections.pop(conn.fd, None) is not None:
                self.closed["internal_error"] += 1
                self._unseat(conn.fd)
            return
        if conn.state == State.CLOSING and conn not in self._closing:
            # The bug struck inside detach: finish it by hand, release it as usual. Never a
            # connection in `closing` that the loop still watches and nobody will release.
            conn.reason = conn.reason or "internal_error"
            self._take_out(conn)
            self.release_soon(conn)

    def _take_out(self, conn: Connection) -> None:
        """What ``detach`` does, safe to repeat: out of the loop, the chat and flow control."""
        self.loop.unregister(conn.fd)
        if self.readers.pop(conn.fd, None) is not None:
            self.departed(conn)
        self.paused.pop(conn.fd, None)
        conn.queue.clear()
        if conn.crowded:
            self.relieved(conn)

    def _close_overflowed(self) -> None:
        """Close every recipient past its limit, oldest first, from one work list.

        A close announces a leave (chat mode), which may take others past their limit: they join
        the list (a nested call returns at once), so the stack stays flat however many there are."""
        if self._closing_overflowed:
            return
        self._closing_overflowed = True
        overflowed = self._overflowed
        try:
            while overflowed:
                conn = overflowed.pop(next(iter(overflowed)))
                if not lifecycle.allowed(conn.state, Trigger.FAIL):
                    continue  # closed meanwhile, for another reason
                self.log.warning("connection.queue_limit", fd=conn.fd, peer=conn.peer,
                                 queued=conn.queue.nbytes, limit=self.max_queue_bytes)
                try:
                    conn.close_because("queue_limit")
                except Exception as exc:  # noqa: BLE001
                    self.bug(conn, Trigger.FAIL, exc)
        finally:
            self._closing_overflowed = False

    def _stall(self, conn: Connection) -> None:
        """The grace ran out: the recipient stops holding senders (it stays crowded)."""
        del self._holding[conn.fd]
        self.log.warning("connection.stalled", fd=conn.fd, peer=conn.peer,
                         queued=conn.queue.nbytes)
        if not self._holding:
            self._resume_senders()

    def _resume_senders(self) -> None:
        waiting = self._waiting
        for conn in list(self.paused.values()):
            if conn.fd not in waiting:  # (one with held lines resumes in _go_on, after them)
                self.fire(conn, Trigger.RESUME)
        if self.bus is not None and not (self.chat is not None and self.chat.relaying):
            self.bus.resume()  # (one with relayed lines waiting resumes in _relay_on)

    def _relay_on(self, chat: Chat) -> None:
        """Chat mode, at the end of a loop step where nobody holds senders back: relayed lines
        held back go on; once they are out, the subscriber reads again."""
        chat.relay_on()
        if not chat.relaying and not self._holding and self.bus is not None:
            self.bus.resume()

    def _go_on(self) -> None:
        """Chat mode, at the end of a loop step: senders with lines held back that nobody holds
        back any more go on with them (a paused one still paused, so that nothing newer is
        read before them), then read again. At the top of the step, never inside a flush or a
        close; one that is held again waits for a later step."""
        chat = self.chat
        waiting = self._waiting
        for fd, conn in list(waiting.items()):
            if conn.state not in IN_CHAT:
                del waiting[fd]  # gone: the chat said or dropped its lines as it left
                continue
            if chat is None or self.held(conn):
                continue
            del waiting[fd]
            try:
                chat.resumed(conn)  # (held again: back in waiting)
            except Exception as exc:  # noqa: BLE001
                self.bug(conn, Trigger.RESUME, exc)
                continue
            if conn.state == State.PAUSED and fd not in waiting and not self.held(conn):
                self.fire(conn, Trigger.RESUME)

    # -- accepting ----------------------------------------------------------------------------

    def _listen(self, listener: socket.socket,
                take: Callable[[socket.socket, object], None]) -> None:
        self.loop.register(listener.fileno(), Reader(partial(self._accept, listener, take)))

    def serve_metrics(self, listener: socket.socket, endpoint: MetricsEndpoint) -> None:
        """Answer scrapers on ``listener``, in this loop."""
        self.metrics, self.metrics_listener = endpoint, listener
        self._listen(listener, partial(self._take_scraper, endpoint))

    def _take_scraper(self, endpoint: MetricsEndpoint, sock: socket.socket,
                      address: object) -> None:
        host = address[0] if isinstance(address, tuple) else ""
        endpoint.admit(sock, format_peer(address),
                       allowed=self.access.open or self.access.permits(host))

    def _take_client(self, tls: ssl.SSLContext | None, sock: socket.socket,
                     address: object) -> None:
        self.admit(sock, format_peer(address), tls,
                   address[0] if isinstance(address, tuple) else "")

    def _accept(self, listener: socket.socket,
                take: Callable[[socket.socket, object], None]) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._pause_accepting(exc)
                    return
                continue  # ECONNABORTED and the like: that client is gone, try the next
            if self._accept_failures:
                self.log.info("accept.resumed", failures=self._accept_failures)
                self._accept_failures = 0
            take(sock, address)

    def admit(self, sock: socket.socket, peer: str, tls: ssl.SSLContext | None = None,
              host: str = "") -> None:
        """Take an accepted socket into the chat, or turn it away: not allowed, no room, or
        gone before it could be taken in (a reset before TLS began)."""
        fd = sock.fileno()
        reason = ""
        address = address_key(host)
        if not self.access.open and not self.access.permits(host):
            reason = "denied"
        elif fd >= FD_SETSIZE:
            reason = "fd_limit"
        elif 0 < self.max_clients_per_addr <= self.per_addr[address]:
            reason = "per_addr_limit"
        elif len(self.connections) >= self.max_clients:
            reason = "server_full"
        else:
            try:
                sock = _prepare(sock, tls)
            except OSError as exc:  # gone already: that client only, never the loop
                reason = "tls_error" if isinstance(exc, ssl.SSLError) else error_reason(exc)
        if reason:
            self.rejected[reason] += 1
            self.log.warning("connection.rejected", peer=peer, reason=reason)
            sock.close()
            return
        conn = Connection(sock, peer, self)
        self.connections[fd] = conn
        self.per_addr[address] += 1
        self._address[fd] = address
        if tls is not None:
            self._make_room_for_handshake()
            self._handshakes[fd] = conn
        self.accepted += 1
        self.loop.register(fd, conn, read=False)
        self.log.info("connection.accepted", fd=fd, peer=peer, tls=tls is not None)
        self.fire(conn, Trigger.START if tls is None else Trigger.SECURE)

    def _make_room_for_handshake(self) -> None:
        """At ``max_handshakes`` unfinished TLS handshakes, close the oldest one still going."""
        if len(self._handshakes) < self.max_handshakes:
            return
        for conn in self._handshakes.values():
            if conn.state == State.HANDSHAKING:
                self.log.warning("connection.tls_error", fd=conn.fd, peer=conn.peer,
                                 error=f"the oldest of {self.max_handshakes} unfinished "
                                       "handshakes, the most at once (a quarter of "
                                       "--max-clients), closed for a newcomer")
                try:
                    conn.close_because("handshake_limit")
                except Exception as exc:  # noqa: BLE001
                    self.bug(conn, Trigger.FAIL, exc)
                return

    def _unseat(self, fd: int) -> None:
        """A connection is gone: its address has room for one more."""
        self._handshakes.pop(fd, None)
        address = self._address.pop(fd)
        self.per_addr[address] -= 1
        if not self.per_addr[address]:
            del self.per_addr[address]

    def _listening(self) -> list[socket.socket]:
        """Every listener: the chat's, and the metrics one."""
        sockets = [listener for listener, _ in self.listeners]
        if self.metrics_listener is not None:
            sockets.append(self.metrics_listener)
        return sockets

    def _pause_accepting(self, exc: OSError) -> None:
        for listener in self._listening():
            self.loop.want_read(listener.fileno(), False)
        if self._accept_timer is None:
            self._accept_timer = self.loop.call_later(ACCEPT_RETRY, self._resume_accepting)
        if not self._accept_failures:
            self.log.warning("accept.failed", error=f"{errno.errorcode.get(exc.errno or 0)}: "
                             f"{exc.strerror}", retry_in=ACCEPT_RETRY)
        self._accept_failures += 1

    def _resume_accepting(self) -> None:
        if self._accept_timer is not None:
            self._accept_timer.cancel()
            self._accept_timer = None
        if not self.stopping:
            for listener in self._listening():
                self.loop.want_read(listener.fileno(), True)

    # -- shutdown -----------------------------------------------------------------------------

    def _begin_shutdown(self, signum: signal.Signals) -> None:
        """Stop accepting; from now on every client is read until it has nothing more."""
        self.stopping = True
        self.log.info("server.stopping", signal=signum.name, connections=len(self.connections))
        for listener, _ in self.listeners:
            self.loop.unregister(listener.fileno())
            listener.close()
        if self.metrics is not None and self.metrics_listener is not None:
            self.loop.unregister(self.metrics_listener.fileno())
            self.metrics_listener.close()
            self.metrics.close_all()
        if self._accept_timer is not None:
            self._accept_timer.cancel()
        for conn in list(self.connections.values()):
            if conn.state == State.HANDSHAKING:  # not in the chat: nothing to deliver to it
                conn.close_because("server_shutdown")
        now = time.monotonic()
        self._emptying = Emptying(dict(self.readers), now + self.drain_timeout / 2)
        self.stop_deadline = now + self.drain_timeout
        self.loop.call_later(self.drain_timeout / 2, _nothing)  # a turn then ends the reading
        self.loop.call_later(self.drain_timeout, lambda: self._force_close("drain_timeout"))

    def _check_emptied(self) -> None:
        """End of a step while stopping: a client that reached EOF leaves as usual; one that
        sent nothing for ``EMPTY_QUIET`` seconds (what was on its way is read too) is emptied;
        once every one is (or half the drain timeout passed), everyone drains."""
        assert self._emptying is not None
        emptying, quiet = self._emptying.reading, self._emptying.quiet
        now = time.monotonic()
        late = now >= self._emptying.until
        for fd, conn in list(emptying.items()):
            if conn.state not in SENDING:  # it left (EOF, /quit, an error) or was emptied
                del emptying[fd]
                quiet.pop(fd, None)
                continue
            if not late:
                if fd in self._waiting or conn.has_input():  # (held lines, or bytes, or EOF)
                    quiet.pop(fd, None)
                    continue
                since, seen = quiet.get(fd, (now, conn.bytes_in))
                if seen != conn.bytes_in:  # it sent more since: quiet from now on
                    since, seen = now, conn.bytes_in
                if now - since < self.empty_quiet:
                    quiet[fd] = since, seen
                    self._emptying.wake_later(self.loop, self.empty_quiet)
                    continue
            self._count_unread(conn)
            del emptying[fd]
            quiet.pop(fd, None)
            self.fire(conn, Trigger.EMPTY)
        if emptying:
            return
        self._emptying = None
        if self.chat is not None:
            self.chat.closing()
        for conn in list(self.readers.values()):
            self.fire(conn, Trigger.SHUTDOWN)
        if self.bus is not None:
            self.bus.stop()

    def _count_unread(self, conn: Connection) -> None:
        """A client the stop reads no more: what it had sent that nothing will pass on (not
        read yet, or chat lines flow control holds back) is counted in ``unread_bytes``."""
        held = self.chat.held_bytes(conn) if self.chat is not None else 0
        self.cut.unread_bytes += held + (conn.unread() if conn.state in SENDING else 0)

    def _force_close(self, reason: str) -> None:
        if self.bus is not None:
            self.bus.abort(reason)
        if not self.connections:
            return
        self.log.warning("server.forced", reason=reason, connections=len(self.connections))
        self._emptying = None
        for conn in list(self.connections.values()):
            if conn.state not in (State.CLOSING, State.CLOSED):
                self.cut.undrained += 1
                self.cut.undelivered_bytes += conn.queue.nbytes
                self._count_unread(conn)
            try:
                conn.close_because(reason)
            except Exception as exc:  # noqa: BLE001
                self.bug(conn, Trigger.FAIL, exc)

    def totals(self) -> dict[str, float]:
        """What ``server.stopped`` reports: the snapshot's totals since start."""
        record = snapshot(self)
        totals: dict[str, float] = {"connections": record["accepted"]}
        totals.update((key, value) for key, value in record.items()
                      if key in ("bytes_in", "bytes_out", "seconds") or key.startswith("redis_"))
        totals.update(asdict(self.cut))
        return totals


def _prepare(sock: socket.socket, tls: ssl.SSLContext | None) -> socket.socket:
    """Non-blocking, no Nagle, keepalive, and TLS if asked: OSError if the client is gone."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _keepalive(sock)
    if tls is not None:
        _still_connected(sock)
        sock = tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    return sock


def _still_connected(sock: socket.socket) -> None:
    """OSError (ECONNRESET, say) if the client is gone already.

    ``wrap_socket`` would find it out too, but its error leaves a half-made SSLSocket holding
    the descriptor until the garbage collector gets to it; this closes it at once."""
    try:
        sock.getpeername()
    except OSError as exc:
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or exc.errno or 0
        raise OSError(code, os.strerror(code)) from None


def _nothing() -> None:
    """A timer's callback whose only work is to end a loop turn (``end_of_step`` follows)."""


def _keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; elsewhere the system's defaults apply
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)


def format_peer(address: object) -> str:
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]  # an IPv4 client on a dual-stack listener
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address) or "unnamed"


class ListenError(Exception):
    """The listener could not be set up; ``usage`` is True when the host itself is bad."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def open_listener(host: str | None, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A non-blocking listener; ``reuse_port`` lets other processes listen on the same port."""
    try:
        if host is None:
            try:
                sock = socket.create_server(("::", port), family=socket.AF_INET6,
                                            dualstack_ipv6=True, backlog=socket.SOMAXCONN,
                                            reuse_port=reuse_port)
            except (OSError, ValueError):  # no IPv6 here: every IPv4 interface then
                sock = socket.create_server(("0.0.0.0", port), backlog=socket.SOMAXCONN,
                                            reuse_port=reuse_port)
        else:
            family, _, _, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            sock = socket.create_server(address[:2], family=family, backlog=socket.SOMAXCONN,
                                        reuse_port=reuse_port)
    except socket.gaierror as exc:
        raise ListenError(f"cannot resolve --host {host!r}: {exc.strerror}", usage=True) from None
    except OSError as exc:
        where = f"[{host}]:{port}" if host and ":" in host else f"{host or '*'}:{port}"
        raise ListenError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def run(options: Options) -> int:
    """Serve until a signal ends it; return the exit status."""
    stream = LogStream.stdout(limit=options.log_buffer)
    log = make_logger(stream, options.log_level, options.log_format)
    try:
        listeners = open_listeners(options)
        metrics_listener = open_metrics_listener(options, listeners)
    except (ListenError, TLSSetupError) as exc:
        log.error("server.failed", host=options.host, port=options.port, error=str(exc))
        stream.flush()
        stream.close()
        say(str(exc))
        return 2 if isinstance(exc, TLSSetupError) or exc.usage else 1
    loop = EventLoop()
    max_clients = options.max_clients or default_max_clients()
    server = ChatServer(listeners, loop, log, drain_timeout=options.drain_timeout,
                        max_clients=max_clients, max_queue_bytes=options.max_queue_bytes,
                        access=Access(options.allow, options.deny),
                        idle_timeout=options.idle_timeout,
                        handshake_timeout=options.handshake_timeout,
                        max_recv_rate=options.max_recv_rate, mode=options.mode,
                        max_line=options.max_line, history=options.history,
                        history_bytes=options.history_bytes,
                        max_clients_per_addr=options.max_clients_per_addr, log_stream=stream)
    extra: dict[str, object] = {"mode": options.mode}
    if metrics_listener is not None:
        server.serve_metrics(metrics_listener, MetricsEndpoint(
            loop, log, Exposition(partial(snapshot, server)).render, CONTENT_TYPE))
        extra["metrics_port"] = metrics_listener.getsockname()[1]
    if options.history:
        extra.update(history=options.history, history_bytes=options.history_bytes)
    reporter = StatsReporter(server, options.stats_interval)
    signals = _watch_signals(server, reporter)
    stream.attach(loop)
    loop.before_sleep = server.end_of_step
    first, tls = listeners[0]
    host, port = first.getsockname()[:2]
    where: dict[str, object] = {"tls": tls is not None}
    if len(listeners) == 2:
        where = {"tls": False, "tls_port": listeners[1][0].getsockname()[1]}
    redis: dict[str, str] = {}
    if options.redis is not None:
        # A payload no client's queue can hold would close them all; chat mode's cleaning
        # may make three bytes (U+FFFD) of one.
        payload_limit = options.max_queue_bytes // (1 if server.chat is None else 3)
        server.bus = RedisBus(options.redis, options.channel, loop, log,
                              outbox_limit=options.redis_outbox, payload_limit=payload_limit,
                              deliver=server.relay)
        redis = {"instance": server.bus.origin.decode(), "redis": options.redis.url(),
                 "channel": options.channel}
        if server.chat is not None:  # every instance counts from user1: tell theirs apart
            server.chat.suffix = b"-" + server.bus.origin[:4]
    log.info("server.started", host=host, port=port, pid=os.getpid(), max_clients=max_clients,
             max_queue_bytes=options.max_queue_bytes, **where, **redis, **extra)
    tell_where_to_connect(options, listeners, metrics_listener)
    if server.bus is not None:
        server.bus.start()
    if options.stats_interval:
        reporter.start()
    try:
        _serve(server, stream, signals)
    finally:
        signals.close()
        stream.close()
    return 0


def _watch_signals(server: ChatServer, reporter: StatsReporter) -> SignalWatch:
    """Stop signals begin (or force) the stop; SIGUSR1 asks for a ``server.stats`` now."""
    signals = SignalWatch((*STOP_SIGNALS, signal.SIGUSR1))

    def on_signals() -> None:
        received = signals.take()
        if signal.SIGUSR1 in received:
            reporter.report()
        server.on_signals([signum for signum in received if signum in STOP_SIGNALS])

    server.loop.register(signals.fileno(), Reader(on_signals))
    return signals


def _serve(server: ChatServer, stream: LogStream, signals: SignalWatch) -> None:
    """Run the loop until the server stops, then write the last events in the same loop: until
    they are written, what is left of the drain timeout passes (at least ``LAST_EVENTS_MIN``
    seconds), or a stop signal comes. Nothing the server scheduled runs any more, so
    ``server.stopped`` stays the last line."""
    loop = server.loop
    loop.run()
    loop.cancel_timers()
    stream.report()
    with stream.forced():
        server.log.info("server.stopped", **server.totals())
    if not stream.pending:
        return
    bound = max(LAST_EVENTS_MIN, server.stop_deadline - time.monotonic())

    def on_signals() -> None:
        if any(signum in STOP_SIGNALS for signum in signals.take()):
            loop.stop()

    loop.register(signals.fileno(), Reader(on_signals))
    loop.before_sleep = lambda: None if stream.pending else loop.stop()
    loop.call_later(bound, loop.stop)
    loop.run()
    if stream.pending:
        say(f"{stream.abandon()} status events were never written: stdout took nothing "
            f"for {bound:.3g} s")


def open_metrics_listener(options: Options, listeners: list[Listener]) -> socket.socket | None:
    """The --metrics-port listener, if asked for; a failure closes ``listeners`` too."""
    if options.metrics_port is None:
        return None
    try:
        return open_listener(options.metrics_host or options.host, options.metrics_port)
    except ListenError as exc:
        for sock, _ in listeners:
            sock.close()
        raise ListenError(f"metrics: {exc}", usage=exc.usage) from None


def open_listeners(options: Options) -> list[Listener]:
    """The plain listener first (unless TLS replaces it), then the TLS one, if any."""
    tls = None
    if options.tls_cert and options.tls_key:
        tls = server_context(options.tls_cert, options.tls_key, options.tls_client_ca)
    listeners: list[Listener] = []
    try:
        if tls is None or options.tls_port is None:
            listeners.append((open_listener(options.host, options.port,
                                            reuse_port=options.reuse_port), tls))
        elif options.plain:
            listeners.append((open_listener(options.host, options.port,
                                            reuse_port=options.reuse_port), None))
        if tls is not None and options.tls_port is not None:
            listeners.append((open_listener(options.host, options.tls_port,
                                            reuse_port=options.reuse_port), tls))
    except ListenError:
        for sock, _ in listeners:
            sock.close()
        raise
    return listeners
