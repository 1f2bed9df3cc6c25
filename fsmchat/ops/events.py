"""Status events: one JSON object per line, rendered by structlog into the ``LogStream``.

structlog turns each call into ``{"timestamp", "level", "event", ...fields}`` (orjson renders it,
newline included) and hands the line to the stream, which writes stdout when ``select`` says it
may (``logstream``). On a terminal the events are rendered for people instead (``--log-format
auto``, the default: console when stdout is a terminal, JSON otherwise). ``CATALOGUE`` lists
every event the server emits, with its level and fields: the README's table and the tests read
it.

Rules it keeps:
- Debug-level calls cost a no-op method call when the level is higher (structlog's filtering
  logger); the per-read, per-write and per-state-change events (``HotEvents``, the hub's ``trace``)
  cost not even that: above debug there is no trace, and the hot path checks for one.
- In JSON, the hot events are rendered straight into the stream, the same line ``_json_line``
  makes (the tests hold them to it), without structlog's chain: that chain was most of what
  ``--log-level debug`` cost a busy server, and a good part of what a connection cost.
- Every line a processor chain returns is one whole line, ending in a newline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
import structlog
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

from fsmchat.ops.logstream import LEVELS, LogStream

__all__ = ["CATALOGUE", "FORMATS", "LEVELS", "EventSpec", "HotEvents", "hot_events", "make_logger"]

FORMATS = ("auto", "json", "console")
"""``auto``: console when stdout is a terminal, json otherwise (structlog's own convention)."""


@dataclass(frozen=True, slots=True)
class EventSpec:
    name: str
    level: str
    fields: tuple[str, ...]
    doc: str


CATALOGUE: tuple[EventSpec, ...] = (
    EventSpec("server.started", "info",
              ("host", "port", "pid", "max_clients", "max_queue_bytes", "tls", "tls_port",
               "instance", "redis", "channel", "mode", "metrics_port", "web_port", "history",
               "history_bytes"),
              "the listener is bound; port is the one actually bound (useful with --port 0); "
              "instance, redis and channel with --redis"),
    EventSpec("server.stats", "info",
              ("connections", "accepted", "messages_in", "messages_out", "bytes_in",
               "bytes_out", "queued_bytes", "queued_max", "closed", "rejected", "loop_turns",
               "select_share", "lines_cut", "history", "seconds", "log_dropped",
               "redis_published", "redis_received", "redis_dropped", "redis_missed",
               "redis_duplicates", "redis_oversize", "redis_gaps", "redis_skipped"),
              "every --stats-interval seconds and on SIGUSR1: what the server did since start, "
              "and its queues and connections now"),
    EventSpec("server.failed", "error", ("host", "port", "error"),
              "the server could not start (port in use, address not available, ...)"),
    EventSpec("server.stopping", "info", ("signal", "connections"),
              "a signal arrived: no more accepts; every client is read until it has nothing "
              "more, then every connection drains"),
    EventSpec("server.forced", "warning", ("reason", "connections"),
              "connections still draining are closed at once (second signal or drain timeout)"),
    EventSpec("server.stopped", "info",
              ("connections", "bytes_in", "bytes_out", "seconds", "undrained",
               "undelivered_bytes", "unread_bytes", "redis_published", "redis_received",
               "redis_dropped", "redis_missed", "redis_duplicates", "redis_oversize",
               "redis_gaps", "redis_skipped"),
              "everything is closed, and this is the last line; totals since start (the redis_ "
              "ones with --redis); undrained: connections the stop closed before everything "
              "reached them, undelivered_bytes what was still queued to them, unread_bytes "
              "what clients had sent that was never read"),
    EventSpec("log.dropped", "warning", ("count", "levels"),
              "the log reader fell behind and --log-buffer filled: count events were dropped "
              "whole since the last report (levels: how many of each level); written once it "
              "catches up"),
    EventSpec("connection.accepted", "info", ("fd", "peer", "tls", "web"),
              "a client connected (web: a browser's WebSocket, from the web port)"),
    EventSpec("connection.rejected", "warning", ("peer", "reason"),
              "a client was accepted and closed at once (denied, per_addr_limit, server_full, "
              "fd_limit, reset)"),
    EventSpec("connection.secured", "info", ("fd", "peer", "version", "cipher", "subject"),
              "a TLS handshake completed; subject is the client certificate's, if any"),
    EventSpec("connection.tls_error", "warning", ("fd", "peer", "error"),
              "a TLS handshake failed or took too long, or a TLS record was bad: it closes"),
    EventSpec("connection.idle", "warning", ("fd", "peer", "seconds"),
              "a client sent nothing for --idle-timeout seconds, or a WebSocket client did not "
              "answer a ping in 30 s: it closes"),
    EventSpec("connection.websocket_error", "warning", ("fd", "peer", "code", "limit"),
              "a WebSocket client sent a message over the limit (code 1009), a text frame "
              "that is not UTF-8 (1007), a malformed frame (1002) or, in chat mode, a binary "
              "frame (1003): it gets a close frame with that code after what is queued"),
    EventSpec("connection.limited", "debug", ("fd", "credit_in"),
              "a client went over --max-recv-rate: not read for credit_in seconds"),
    EventSpec("connection.queue_limit", "warning", ("fd", "peer", "queued", "limit"),
              "a message would take a recipient's queue past --max-queue-bytes: it is closed"),
    EventSpec("connection.stalled", "warning", ("fd", "peer", "queued"),
              "a recipient stayed congested past the grace time: it holds senders back no more"),
    EventSpec("connection.state", "debug", ("fd", "from", "to", "trigger"),
              "a connection moved in its lifecycle"),
    EventSpec("connection.error", "warning", ("fd", "peer", "op", "error"),
              "a socket call failed; the connection closes, nothing else is affected"),
    EventSpec("connection.closed", "info",
              ("fd", "peer", "reason", "bytes_in", "bytes_out", "seconds"),
              "a connection is gone; reason says why"),
    EventSpec("accept.failed", "warning", ("error", "retry_in"),
              "accept failed (out of descriptors or memory); the listener pauses, then retries; "
              "once per episode"),
    EventSpec("accept.resumed", "info", ("failures",),
              "accepting works again after an episode of failures"),
    EventSpec("data.received", "debug", ("fd", "bytes"), "one recv: one message"),
    EventSpec("data.sent", "debug", ("fd", "bytes", "queued"),
              "one send; queued is what is still waiting for that client"),
    EventSpec("lifecycle.bug", "error", ("fd", "state", "trigger", "exception", "link"),
              "a trigger the table does not allow, or an exception in an action; "
              "the connection is closed (a Redis link reconnects) and the server goes on"),
    EventSpec("chat.nick", "info", ("fd", "old", "new"), "chat mode: a client changed its name"),
    EventSpec("chat.line_cut", "warning", ("fd", "peer", "limit"),
              "chat mode: a line longer than --max-line was cut into lines of that size"),
    EventSpec("chat.login", "info", ("fd", "peer", "name", "op"),
              "chat mode: a client gave an account's password (--accounts) and took its name; "
              "op: it is an operator"),
    EventSpec("chat.login_failed", "warning", ("fd", "peer", "name", "wait"),
              "chat mode: a wrong password for an account; no try for that name or from that "
              "address is checked for wait seconds (never the password itself)"),
    EventSpec("chat.pass_failed", "warning", ("fd", "peer", "wait"),
              "chat mode: a wrong join password (--password); no try from that address is "
              "checked for wait seconds"),
    EventSpec("chat.kick", "info", ("fd", "peer", "name", "by", "reason"),
              "chat mode: the operator by kicked name (reason: what they gave, maybe empty)"),
    EventSpec("chat.mute", "info", ("fd", "peer", "name", "by", "minutes"),
              "chat mode: the operator by muted name for minutes (0: lifted the mute)"),
    EventSpec("chat.topic", "info", ("fd", "by", "room", "topic"),
              "chat mode: the operator by set the topic of room"),
    EventSpec("http.request", "debug", ("site", "fd", "method", "target", "status"),
              "an HTTP request to the metrics port (site metrics) or the web port (site web) "
              "was answered"),
    EventSpec("http.bad_request", "warning", ("site", "peer", "error"),
              "a request to the metrics or web port was not HTTP: answered 400, then closed"),
    EventSpec("http.bad_origin", "warning", ("site", "peer", "origin"),
              "a page of another site tried to open the chat's WebSocket: answered 403 (see "
              "--web-origin)"),
    EventSpec("http.rejected", "warning", ("site", "peer", "reason"),
              "a connection to the metrics or web port was closed at once: denied "
              "(--allow/--deny), busy (every place is being answered), fd_limit, or gone "
              "before its TLS could begin"),
    EventSpec("http.evicted", "warning", ("site", "peer", "served", "seconds"),
              "every place of the metrics port (4) or the web port (64) was taken: the "
              "connection that waited longest for a request is closed for a newcomer"),
    EventSpec("redis.connected", "info", ("link", "address", "attempts"),
              "a Redis link is ready (the subscriber once SUBSCRIBE is confirmed)"),
    EventSpec("redis.disconnected", "warning",
              ("link", "address", "error", "published", "dropped", "received", "missed"),
              "a Redis link was lost, or could not connect; once per outage; the counters are "
              "the link's since start"),
    EventSpec("redis.retrying", "debug", ("link", "attempt", "delay", "error"),
              "a Redis link dials again after delay seconds"),
    EventSpec("redis.state", "debug", ("link", "from", "to", "trigger"),
              "a Redis link moved in its lifecycle"),
    EventSpec("redis.published", "debug", ("seq", "bytes", "receivers"),
              "Redis took a message; receivers is how many subscribers it reached"),
    EventSpec("redis.received", "debug", ("origin", "seq", "bytes"),
              "a message from another instance (origin null: not sent by fsmchat)"),
    EventSpec("redis.dropped", "warning", ("reason", "messages", "limit"),
              "messages that will never be published: the outbox was full (at most one "
              "warning a second), or the server stopped with Redis away"),
    EventSpec("redis.missed", "warning", ("origin", "messages"),
              "a gap in another instance's sequence numbers: messages this one never got"),
    EventSpec("redis.renumbered", "warning", ("origin", "last", "seq"),
              "an instance's number jumped implausibly far from its last (forged, or a very "
              "long outage): it counts from seq on, no repeat dropped and no gap counted"),
    EventSpec("redis.oversize", "warning", ("origin", "bytes", "limit"),
              "a message from the channel was larger than a client's queue can hold: dropped, "
              "counted in redis_oversize"),
    EventSpec("redis.synced", "info", ("streams", "missed", "past", "gaps", "held"),
              "the shared history was read after the subscriber (re)subscribed: missed entries "
              "delivered late, past ones (said before this process heard the chat) kept for "
              "newcomers' history, gaps found, live messages held back meanwhile"),
    EventSpec("redis.gap", "warning", ("stream", "entries"),
              "entries of a stream said while this instance could not hear them were trimmed "
              "away (MAXLEN) before it read them: lost; its room is told (chat mode), counted "
              "in redis_gaps"),
    EventSpec("redis.skipped", "warning", ("stream", "id"),
              "an entry of a stream that no instance wrote (no field m) was skipped, counted in "
              "redis_skipped"),
    EventSpec("history.loaded", "info", ("path", "records", "bytes"),
              "--history-file: the history kept across restarts was read at the start"),
    EventSpec("history.skipped", "warning", ("path", "bytes", "records"),
              "--history-file: a torn or damaged part of the file (a crash mid-write) was "
              "skipped; the rest was read"),
    EventSpec("history.rewritten", "info", ("path", "records", "bytes", "before"),
              "--history-file: the file grew past twice what the history holds and was "
              "rewritten with only that (before: its size until then)"),
    EventSpec("history.unwritten", "warning", ("path", "error"),
              "--history-file: a write failed (disk full, ...): the chat goes on, the history "
              "in memory keeps the messages and the next rewrite puts them back (once until a "
              "write succeeds)"),
    EventSpec("redis.holding", "info", ("messages", "subscribers", "expected"),
              "after a reconnect, the outbox waits for the subscribers the chat had"),
    EventSpec("redis.flushing", "info", ("messages", "subscribers", "waited"),
              "the wait is over (they are back, or 5 s passed): the outbox goes out"),
    EventSpec("presence.lost", "info", ("name", "holder", "instance"),
              "chat mode with --redis: a local client's name was claimed earlier on another "
              "instance (both took it while Redis was away); the client is renamed"),
    EventSpec("presence.freed", "info", ("names",),
              "chat mode with --redis: names of instances that stopped refreshing them for "
              "--presence-ttl seconds (killed, cut off) were freed"),
)


class _Clock:
    """ISO 8601 UTC timestamps with microseconds; the date and time of day are formatted once a
    second, the microseconds per event (datetime.isoformat per event costs several times more)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""
        self._prefix_bytes = b""

    def now(self) -> str:
        micros = time.time_ns() // 1000
        second = micros // 1_000_000
        if second != self._second:
            self._tick(second)
        return f"{self._prefix}.{micros % 1_000_000:06d}Z"

    def now_bytes(self) -> bytes:
        micros = time.time_ns() // 1000  # integers: no float's rounding, and cheaper
        second = micros // 1_000_000
        if second != self._second:
            self._tick(second)
        return b"%s.%06dZ" % (self._prefix_bytes, micros % 1_000_000)

    def _tick(self, second: int) -> None:
        self._second = second
        self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self._prefix_bytes = self._prefix.encode()


def _json_line(logger: WrappedLogger, level: str, event: EventDict) -> bytes:
    """The whole JSON chain in one processor: timestamp, level and event first, then the fields."""
    if "exc_info" in event:
        event = structlog.processors.format_exc_info(logger, level, event)
    line = {"timestamp": _CLOCK.now(), "level": level, "event": event.pop("event"), **event}
    return orjson.dumps(line, default=str, option=orjson.OPT_APPEND_NEWLINE)


def _console_line() -> Callable[[WrappedLogger, str, EventDict], bytes]:
    """structlog's console rendering, as one line of bytes."""
    render = structlog.dev.ConsoleRenderer(colors=False, sort_keys=False)

    def line(logger: WrappedLogger, name: str, event_dict: EventDict) -> bytes:
        return render(logger, name, event_dict).encode() + b"\n"

    return line


_CLOCK = _Clock()


class HotEvents:
    """The events a busy server emits most: per read, per write and per state change at debug
    (``trace``), and a connection's ``connection.accepted`` and ``connection.closed`` at info.
    This one goes through ``log``, as every other event does (the console format, a test's
    logger); ``hot_events`` gives the JSON one where it can."""

    def __init__(self, log: FilteringBoundLogger) -> None:
        self._log = log
        self.debug = log.is_enabled_for(logging.DEBUG)
        self.info = log.is_enabled_for(logging.INFO)

    def received(self, fd: int, size: int) -> None:
        self._log.debug("data.received", fd=fd, bytes=size)

    def sent(self, fd: int, size: int, queued: int) -> None:
        self._log.debug("data.sent", fd=fd, bytes=size, queued=queued)

    def state(self, fd: int, source: str, dest: str, trigger: str) -> None:
        self._log.debug("connection.state", fd=fd, **{"from": source, "to": dest},
                        trigger=trigger)

    def accepted(self, fd: int, peer: str, tls: bool, *, web: bool = False) -> None:
        if web:
            self._log.info("connection.accepted", fd=fd, peer=peer, tls=tls, web=True)
        else:
            self._log.info("connection.accepted", fd=fd, peer=peer, tls=tls)

    def closed(self, fd: int, peer: str, reason: str, *, bytes_in: int, bytes_out: int,
               seconds: float) -> None:
        self._log.info("connection.closed", fd=fd, peer=peer, reason=reason,
                       bytes_in=bytes_in, bytes_out=bytes_out, seconds=seconds)


class JsonHotEvents(HotEvents):
    """The same lines as ``_json_line`` makes, straight into the stream: the per-read and
    per-write ones from a bytes template (numbers only), the others one orjson call each."""

    def __init__(self, log: FilteringBoundLogger, stream: LogStream) -> None:
        super().__init__(log)
        self._debug = stream.debug
        self._info = stream.info
        self._now = _CLOCK.now_bytes

    def received(self, fd: int, size: int) -> None:
        self._debug(b'{"timestamp":"%s","level":"debug","event":"data.received","fd":%d,'
                    b'"bytes":%d}\n' % (self._now(), fd, size))

    def sent(self, fd: int, size: int, queued: int) -> None:
        self._debug(b'{"timestamp":"%s","level":"debug","event":"data.sent","fd":%d,'
                    b'"bytes":%d,"queued":%d}\n' % (self._now(), fd, size, queued))

    def state(self, fd: int, source: str, dest: str, trigger: str) -> None:
        self._debug(orjson.dumps({"timestamp": _CLOCK.now(), "level": "debug",
                                  "event": "connection.state", "fd": fd, "from": source,
                                  "to": dest, "trigger": trigger}, default=str, option=_NEWLINE))

    def accepted(self, fd: int, peer: str, tls: bool, *, web: bool = False) -> None:
        if not self.info:
            return
        line = {"timestamp": _CLOCK.now(), "level": "info", "event": "connection.accepted",
                "fd": fd, "peer": peer, "tls": tls}
        if web:
            line["web"] = True
        self._info(orjson.dumps(line, default=str, option=_NEWLINE))

    def closed(self, fd: int, peer: str, reason: str, *, bytes_in: int, bytes_out: int,
               seconds: float) -> None:
        if self.info:
            self._info(orjson.dumps({"timestamp": _CLOCK.now(), "level": "info",
                                     "event": "connection.closed", "fd": fd, "peer": peer,
                                     "reason": reason, "bytes_in": bytes_in,
                                     "bytes_out": bytes_out, "seconds": seconds},
                                    default=str, option=_NEWLINE))


_NEWLINE = orjson.OPT_APPEND_NEWLINE


def hot_events(log: FilteringBoundLogger) -> HotEvents:
    """The hot events of ``log``: rendered here for a JSON logger over a ``LogStream``, else
    through ``log``."""
    stream = getattr(log, "_logger", None)
    if isinstance(stream, LogStream) and getattr(log, "_processors", None) == [_json_line]:
        return JsonHotEvents(log, stream)
    return HotEvents(log)


def make_logger(stream: LogStream, level: str, fmt: str) -> FilteringBoundLogger:
    """The server's logger over ``stream``; the stream reports its own drops through it."""
    processors: list[structlog.typing.Processor]
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    if fmt == "json":
        processors = [_json_line]
    else:
        processors = [
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _console_line(),
        ]
    wrapper = structlog.make_filtering_bound_logger(logging.getLevelName(level.upper()))
    logger: FilteringBoundLogger = structlog.wrap_logger(
        stream, processors=processors, wrapper_class=wrapper).bind()
    stream.log = logger
    return logger
