"""The server: everything one chat is, built from its options, and how it starts and stops.

``Server`` wires the parts together in its constructor, each owning one thing: the ``Acceptor``
(listeners, admission, socket options), the ``Hub`` (membership, delivery, counters, flow
control), and the extensions plugged into the hub (chat mode, history, the Redis bus), the
metrics endpoint and the stats reporter. ``run`` is the process around it: stdout, signals,
the listeners it opens, the exit status.

Rules it keeps:
- The parts never see the server: they share the hub (and its flow control and counters), hear
  what happens through its hooks, and ``stats`` and ``/metrics`` read a ``Snapshot`` the server
  takes.
- First SIGINT/SIGTERM/SIGHUP: stop accepting; read every client until what it had sent is
  used up (EOF, or nothing more to read; flow control still holds), so nothing that reached
  TCP before the signal is lost; then every connection drains (and the publisher publishes what
  waits). The reading may take half the drain timeout; second signal, or the drain timeout:
  close whatever is left, and count what it cuts off. Either way the process ends with status 0.
- After the stop, the last events are written in the same loop (no second select call), for
  what is left of the drain timeout; ``server.stopped`` is the last line.
"""

from __future__ import annotations

import gc
import os
import resource
import signal
import socket
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial

from structlog.typing import FilteringBoundLogger

from fsmchat.acceptor import Acceptor, Listener, ListenError, open_listener
from fsmchat.access import Access
from fsmchat.banner import tell_where_to_connect
from fsmchat.chat.gate import JoinGate
from fsmchat.chat.login import Login
from fsmchat.chat.mode import ENTRY_BYTES, Chat
from fsmchat.chat.moderation import Moderation, commands_with_accounts
from fsmchat.chat.payload import To, room_head
from fsmchat.chat.payload import route as payload_route
from fsmchat.chat.recent import Budget, time_zone
from fsmchat.chat.rooms import room_key
from fsmchat.chat.text import is_name, room_problem, skeleton
from fsmchat.connection import RECV_SIZE, Connection
from fsmchat.history import History
from fsmchat.history_file import COMPACT_FLOOR, HistoryFile, HistoryFileError
from fsmchat.history_keeper import HistoryKeeper
from fsmchat.hub import Extension, Hub, Limits
from fsmchat.lifecycle import LIVE, SENDING, State, Trigger
from fsmchat.net.loop import FD_SETSIZE, EventLoop, Reader, Timer
from fsmchat.net.signals import SignalWatch
from fsmchat.net.sock import contain_in
from fsmchat.net.tls import TLSSetupError, server_context
from fsmchat.ops.events import make_logger
from fsmchat.ops.logstream import LogStream, say
from fsmchat.ops.metrics import CONTENT_TYPE, Exposition
from fsmchat.ops.metrics_http import MetricsSite
from fsmchat.ops.stats import Snapshot, StatsReporter
from fsmchat.options import RESERVED_FDS, WEB_FDS, Options
from fsmchat.reasons import Reason
from fsmchat.redis.bus import RedisBus
from fsmchat.redis.presence import Presence, Rules, SharedDirectory, renaming
from fsmchat.web.site import WebSite

EMPTY_QUIET = 0.2
"""Seconds a client must send nothing while the stop reads it before it counts as having
nothing more: what is still on its way (a network's round trip, a slow link) is read too."""

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Each begins an orderly stop (SIGHUP: the terminal it ran in is gone); a second one forces it."""

LAST_EVENTS_MIN = 1.0
"""Seconds the last events get at least, after a stop that used all of --drain-timeout."""

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


def default_max_clients(web: bool = False) -> int:
    """What select() and this process's descriptor limit allow, less a reserve (and, with
    ``web``, the web port's HTTP connections)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    usable = FD_SETSIZE if soft == resource.RLIM_INFINITY else min(FD_SETSIZE, soft)
    return max(1, usable - RESERVED_FDS - (WEB_FDS if web else 0))




class Server:
    empty_quiet = EMPTY_QUIET
    """Seconds of silence after which the stop counts a client as emptied (a model of the
    server whose clock does not run sets 0)."""

    def __init__(self, options: Options, listeners: list[Listener], log: FilteringBoundLogger,
                 *, loop: EventLoop | None = None, stream: LogStream | None = None,
                 metrics_listener: socket.socket | None = None,
                 web_listener: Listener | None = None) -> None:
        self.options = options
        self.loop = loop = loop or EventLoop(on_crash=contain_in(log))  # a bug: that socket only
        self.log = log
        self.stream = stream  # for the counts of events dropped
        self.listeners = listeners
        self.max_clients = options.max_clients or default_max_clients(web_listener is not None)
        self.hub = hub = Hub(loop, log, Limits(options.max_queue_bytes, options.max_recv_rate,
                                               options.idle_timeout, options.handshake_timeout),
                             gone=self._gone, chat_mode=options.mode == "chat")
        self.acceptor = Acceptor(listeners, hub, Access(options.allow, options.deny),
                                 max_clients=self.max_clients,
                                 max_clients_per_addr=options.max_clients_per_addr)
        self.bus: RedisBus | None = None
        if options.redis is not None:
            # A payload no client's queue can hold would close them all; chat mode's cleaning
            # may make three bytes (U+FFFD) of one.
            payload_limit = options.max_queue_bytes // (3 if options.mode == "chat" else 1)
            self.bus = bus = RedisBus(options.redis, options.channel, loop, log,
                                      outbox_limit=options.redis_outbox,
                                      payload_limit=payload_limit, deliver=hub.relay,
                                      origin=hub.origin,
                                      stream_of=self._stream_of if options.redis_streams
                                      else None,
                                      history=options.history)
            bus.subscriber.seed = hub.seed
            bus.subscriber.on_gap = lambda stream: hub.call("gap", bus.stream_name(stream))
            if options.mode == "chat":
                bus.subscriber.foreign_head = lambda stream: room_head(bus.stream_name(stream))
        self.chat: Chat | None = None
        self.presence: Presence | None = None
        if options.mode == "chat":
            self.chat, self.presence = self._chat_mode(options)
        self.history = (History(options.history, options.history_bytes, hub.replay)
                        if options.history and self.chat is None else None)
        if self.history is not None:
            hub.seeded = self.history.seed
        self.keeper = self._keep_history(options) if options.history_file else None
        parts: list[Extension] = [self.acceptor, *(
            part for part in (self.chat, self.history, self.presence, self.bus, self.keeper)
            if part is not None)]
        if self.chat is not None:
            parts[2:2] = self._accounts(self.chat, options)
        hub.plug(*parts)
        self.metrics: MetricsSite | None = None
        if metrics_listener is not None:
            self.metrics = MetricsSite(loop, log, Exposition(self.snapshot).render, CONTENT_TYPE)
            self.acceptor.serve(metrics_listener, self.metrics)
        self.metrics_listener = metrics_listener
        self.web: WebSite | None = None
        if web_listener is not None:
            web_sock, web_tls = web_listener
            self.web = WebSite(self.acceptor, log, mode=options.mode,
                               limit=options.max_line if options.mode == "chat" else RECV_SIZE,
                               origins=options.web_origin, tls=web_tls,
                               handshake_timeout=options.handshake_timeout)
            self.acceptor.serve(web_sock, self.web)
        self.web_listener = web_listener
        self.reporter = StatsReporter(self.snapshot, loop, log, options.stats_interval)
        self.started = time.monotonic()
        self.start_time = time.time()
        self.stopping = False
        self._emptying: Emptying | None = None  # the stop's first part, while it lasts
        self.stop_deadline = 0.0  # when the stop closes whatever is left
        self.cut = Cut()  # what a stop cut short did not deliver
        loop.before_sleep = self.end_of_turn

    def _keep_history(self, options: Options) -> HistoryKeeper:
        """--history-file: the history loaded from it, and kept in it from now on (raises
        HistoryFileError when the file cannot be used)."""
        assert options.history_file is not None
        file = HistoryFile.open(options.history_file,
                                limit_bytes=max(4 * options.history_bytes, COMPACT_FLOOR))
        hub = self.hub
        hub.origin, hub.seq = file.epoch, file.last_seq  # ids go on where they stopped
        records = file.records()
        if file.skipped_bytes:
            self.log.warning("history.skipped", path=options.history_file,
                             bytes=file.skipped_bytes, records=file.skipped_records)
        if self.chat is not None:
            rooms = self.chat.rooms
            rooms.load(records)
            budget = rooms.budget
            assert budget is not None
            keeper = HistoryKeeper(file, self.log, live=rooms.records,
                                   live_bytes=lambda: budget.nbytes)
            budget.keeper = keeper.kept
        else:
            history = self.history
            assert history is not None
            for record in records:
                history.add(record.data)
            keeper = HistoryKeeper(file, self.log, live=history.records,
                                   live_bytes=lambda: history.nbytes)
            history.keeper = keeper.kept
        self.log.info("history.loaded", path=options.history_file, records=len(records),
                      bytes=file.size)
        return keeper

    def _stream_of(self, head: bytes) -> bytes | None:
        """The Redis stream of a payload's head: its room's (chat mode), or the chat's one
        (raw mode); private messages have none."""
        assert self.bus is not None
        if self.options.mode != "chat":
            return self.bus.stream(b"")
        route, name, _ = payload_route(head)
        if route is To.ROOM:
            return self.bus.stream(room_key(name))
        return None

    def _chat_mode(self, options: Options) -> tuple[Chat, Presence | None]:
        """Chat mode and, with --redis, its presence across instances (names shared, the outage
        notices, delayed lines marked)."""
        hub, bus = self.hub, self.bus
        presence = None
        if bus is not None:
            rules = Rules(skeleton, is_name, lambda room: room_problem(room) is None, room_key)
            presence = Presence(hub, bus, self.loop, self.log, ttl=options.presence_ttl,
                                rules=rules)
        # Every instance counts from user1: tell theirs apart.
        suffix = b"-" + bus.origin[:4] if bus is not None else b""
        # History is kept per room, by the chat itself.
        budget = Budget(options.history, options.history_bytes) if options.history else None
        zone = time_zone(options.tz)
        chat = Chat(hub, options.max_line, min(ENTRY_BYTES, options.max_queue_bytes // 8),
                    suffix, history=budget, zone=zone,
                    directory=(partial(SharedDirectory, presence=presence)
                               if presence is not None else None))
        hub.take_input(chat.received, chat.relayed, chat.relay_waits)
        hub.seeded = chat.seeded
        if bus is not None:
            bus.rebuild = chat.rebuild
        if bus is not None and presence is not None:
            presence.on_lost = renaming(chat)
            bus.on_links = lambda up: hub.call("reconnected" if up else "isolated")
        return chat, presence

    def _accounts(self, chat: Chat, options: Options) -> list[Extension]:
        """Chat mode's accounts, moderators and join password, when asked for: the parts that
        come right after the chat (a newcomer's topic follows its welcome, before history)."""
        parts: list[Extension] = []
        if options.accounts is not None:
            login = Login(chat, options.accounts)
            moderation = Moderation(chat)
            chat.commands = commands_with_accounts(login, moderation, chat.commands)
            parts += [login, moderation]
        if options.password is not None:
            hub = self.hub
            gate = JoinGate(hub, options.password, options.max_line, passed=self.acceptor.greet)
            hub.gate = gate
            hub.take_input(gate.wrap(chat.received), chat.relayed, chat.relay_waits)
            parts.append(gate)
        return parts

    def start(self) -> None:
        """Say where it listens, and set the timers and links going."""
        options = self.options
        first, tls = self.listeners[0]
        host, port = first.getsockname()[:2]
        where: dict[str, object] = {"tls": tls is not None}
        if len(self.listeners) == 2:
            where = {"tls": False, "tls_port": self.listeners[1][0].getsockname()[1]}
        redis: dict[str, object] = {}
        if self.bus is not None and options.redis is not None:
            redis = {"instance": self.bus.origin.decode(), "redis": options.redis.url(),
                     "channel": options.channel}
        extra: dict[str, object] = {"mode": options.mode}
        if self.metrics_listener is not None:
            extra["metrics_port"] = self.metrics_listener.getsockname()[1]
        if self.web_listener is not None:
            extra["web_port"] = self.web_listener[0].getsockname()[1]
        if options.history:
            extra.update(history=options.history, history_bytes=options.history_bytes)
        self.log.info("server.started", host=host, port=port, pid=os.getpid(),
                      max_clients=self.max_clients, max_queue_bytes=options.max_queue_bytes,
                      **where, **redis, **extra)
        if self.bus is not None:
            self.bus.start()
        self.reporter.start()

    def _gone(self, conn: Connection) -> None:
        self.acceptor.unseat(conn)

    # -- the loop's callbacks -------------------------------------------------------------------

    def end_of_turn(self) -> None:
        """What waited goes on; release what closed during the turn; stop once stopping and
        nobody is left."""
        hub = self.hub
        hub.call("end_of_turn")
        if self._emptying is not None:
            self._check_emptied()
        hub.release()
        if self.stopping and not hub.connections and hub.parts_done():
            self.loop.stop()

    def on_signals(self, received: list[signal.Signals]) -> None:
        for signum in received:
            if not self.stopping:
                self._begin_stop(signum)
            else:
                self._force_close(Reason.SECOND_SIGNAL)

    # -- numbers ------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        hub, counts = self.hub, self.hub.counts
        live = list(hub.connections.values())
        states = Counter(conn.state for conn in live)
        queued = [conn.queue.nbytes for conn in live]
        redis = self.bus.totals() if self.bus is not None else {}
        stream = self.stream
        return Snapshot(
            connections={str(state): states.get(state, 0) for state in LIVE},
            accepted=counts.accepted,
            messages_in=counts.messages_in,
            messages_out=counts.messages_out,
            bytes_in=counts.bytes_in + sum(conn.bytes_in for conn in live),
            bytes_out=counts.bytes_out + sum(conn.bytes_out for conn in live),
            queued_bytes=sum(queued),
            queued_max=max(queued, default=0),
            closed=dict(counts.closed),
            rejected=dict(counts.rejected),
            loop_turns=self.loop.turns,
            select_seconds=self.loop.select_seconds,
            lines_cut=self.chat.cuts() if self.chat is not None else 0,
            history=(len(self.history) if self.history is not None
                     else self.chat.history_kept() if self.chat is not None else 0),
            seconds=round(time.monotonic() - self.started, 3),
            start_time=self.start_time,
            log_dropped=dict(stream.dropped) if stream is not None else {},
            **redis,
        )

    def totals(self) -> dict[str, float]:
        """What ``server.stopped`` reports: the snapshot's totals since start."""
        record = self.snapshot().fields()
        totals: dict[str, float] = {"connections": self.hub.counts.accepted}
        totals.update((key, value) for key, value in record.items()  # type: ignore[misc]
                      if key in ("bytes_in", "bytes_out", "seconds") or key.startswith("redis_"))
        totals.update(asdict(self.cut))
        return totals

    # -- the stop -----------------------------------------------------------------------------

    def _begin_stop(self, signum: signal.Signals) -> None:
        """Stop accepting; from now on every client is read until it has nothing more."""
        hub = self.hub
        self.stopping = True
        self.log.info("server.stopping", signal=signum.name, connections=len(hub.connections))
        self.acceptor.close()
        for site in (self.metrics, self.web):
            if site is not None:
                site.close_all()
        self.reporter.stop()
        for conn in list(hub.connections.values()):
            if conn.state == State.HANDSHAKING:  # not in the chat: nothing to deliver to it
                conn.close_because(Reason.SERVER_SHUTDOWN)
        now = time.monotonic()
        self._emptying = Emptying(dict(hub.readers), now + self.options.drain_timeout / 2)
        self.stop_deadline = now + self.options.drain_timeout
        self.loop.call_later(self.options.drain_timeout / 2, _nothing)  # a turn ends the reading
        self.loop.call_later(self.options.drain_timeout,
                             lambda: self._force_close(Reason.DRAIN_TIMEOUT))

    def _check_emptied(self) -> None:
        """End of a turn while stopping: a client that reached EOF leaves as usual; one that
        sent nothing for ``EMPTY_QUIET`` seconds (what was on its way is read too) is emptied;
        once every one is (or half the drain timeout passed), everyone drains."""
        assert self._emptying is not None
        hub = self.hub
        emptying, quiet = self._emptying.reading, self._emptying.quiet
        waiting = hub.flow.waiting
        now = time.monotonic()
        late = now >= self._emptying.until
        for fd, conn in list(emptying.items()):
            if conn.state not in SENDING:  # it left (EOF, /quit, an error) or was emptied
                del emptying[fd]
                quiet.pop(fd, None)
                continue
            if not late:
                if fd in waiting or conn.has_input():  # (held lines, or bytes, or EOF)
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
            conn.fire_safely(Trigger.EMPTY)
        if emptying:
            return
        self._emptying = None
        hub.call("stopping")
        for conn in list(hub.readers.values()):
            conn.fire_safely(Trigger.SHUTDOWN)
        hub.call("drain")

    def _count_unread(self, conn: Connection) -> None:
        """A client the stop reads no more: what it had sent that nothing will pass on (not
        read yet, or chat lines flow control holds back) is counted in ``unread_bytes``."""
        held = self.hub.unread_by_parts(conn)
        self.cut.unread_bytes += held + (conn.unread() if conn.state in SENDING else 0)

    def _force_close(self, reason: str) -> None:
        hub = self.hub
        hub.call("forced", reason)
        if not hub.connections:
            return
        self.log.warning("server.forced", reason=reason, connections=len(hub.connections))
        self._emptying = None
        for conn in list(hub.connections.values()):
            if conn.state not in (State.CLOSING, State.CLOSED):
                self.cut.undrained += 1
                self.cut.undelivered_bytes += conn.queue.nbytes
                self._count_unread(conn)
            conn.close_safely(reason)


def _nothing() -> None:
    """A timer's callback whose only work is to end a loop turn (``end_of_turn`` follows)."""


def run(options: Options) -> int:
    """Serve until a signal ends it; return the exit status."""
    stream = LogStream.stdout(limit=options.log_buffer)
    log = make_logger(stream, options.log_level, options.log_format)
    try:
        listeners = open_listeners(options)
        metrics_listener = open_metrics_listener(options, listeners)
        web_listener = open_web_listener(options, listeners, metrics_listener)
    except (ListenError, TLSSetupError) as exc:
        log.error("server.failed", host=options.host, port=options.port, error=str(exc))
        stream.flush()
        stream.close()
        say(str(exc))
        return 2 if isinstance(exc, TLSSetupError) or exc.usage else 1
    try:
        server = Server(options, listeners, log, stream=stream,
                        metrics_listener=metrics_listener, web_listener=web_listener)
    except HistoryFileError as exc:
        for sock in [sock for sock, _ in listeners] + (
                [metrics_listener] if metrics_listener else []) + (
                [web_listener[0]] if web_listener else []):
            sock.close()
        log.error("server.failed", host=options.host, port=options.port, error=str(exc))
        stream.flush()
        stream.close()
        say(str(exc))
        return 1
    signals = _watch_signals(server)
    stream.attach(server.loop)
    server.start()
    tell_where_to_connect(options, listeners, metrics_listener, web_listener)
    try:
        _serve(server, stream, signals)
    finally:
        signals.close()
        stream.close()
    return 0


def _watch_signals(server: Server) -> SignalWatch:
    """Stop signals begin (or force) the stop; SIGUSR1 asks for a ``server.stats`` now."""
    signals = SignalWatch((*STOP_SIGNALS, signal.SIGUSR1))

    def on_signals() -> None:
        received = signals.take()
        if signal.SIGUSR1 in received:
            server.reporter.report()
        server.on_signals([signum for signum in received if signum in STOP_SIGNALS])

    server.loop.register(signals.fileno(), Reader(on_signals))
    return signals


def _serve(server: Server, stream: LogStream, signals: SignalWatch) -> None:
    """Run the loop until the server stops, then write the last events in the same loop: until
    they are written, what is left of the drain timeout passes (at least ``LAST_EVENTS_MIN``
    seconds), or a stop signal comes. Nothing the server scheduled runs any more, so
    ``server.stopped`` stays the last line."""
    loop = server.loop
    gc.collect()  # start-up's garbage first: what is frozen is never collected
    gc.freeze()  # what start-up made lives as long as the server: collections never walk it
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


def open_web_listener(options: Options, listeners: list[Listener],
                      metrics: socket.socket | None) -> Listener | None:
    """The --web-port listener, if asked for, speaking TLS when the chat does; a failure closes
    the other listeners too."""
    if options.web_port is None:
        return None
    tls = next((context for _, context in listeners if context is not None), None)
    try:
        return open_listener(options.web_host or options.host, options.web_port), tls
    except ListenError as exc:
        for sock in [sock for sock, _ in listeners] + ([metrics] if metrics else []):
            sock.close()
        raise ListenError(f"web: {exc}", usage=exc.usage) from None


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
