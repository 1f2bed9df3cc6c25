"""The shared history: one Redis stream per room, kept by every instance, read after a loss.

Pub/sub keeps nothing: an instance whose subscriber was away misses for good what the others
said meanwhile, and one that starts has no past to give newcomers. So every room message is
also an entry of its room's stream (raw mode: one stream for the chat), and the live message on
the channel says which entry it is::

    fsmchat1s <stream> <entry id> <number>\\n<payload>

where ``<payload>`` is the bus's (``redis/bus.py``: envelope, chat's head, the message) and the
entry's one field ``m`` holds the same payload. One script (``PUBLISH_SCRIPT``, run by the
publish link instead of PUBLISH) appends the entry (``XADD ... MAXLEN ~ N``), adds the stream to
the set of the chat's streams, and publishes: atomically, so that the channel's order is each
stream's order and no entry is ever published without being kept, nor the reverse. Private
messages (``@NAME``) go on plain PUBLISH: they belong to no room.

One more link (``HistoryLink``) reads the streams when the subscriber (re)subscribes
(``Sync``): the list of the chat's streams with Redis's clock (``LIST_SCRIPT``), then for each
stream the entries after the last one this instance saw, a page (``PAGE``) at a time, the one
before them (whose number says what the next should be), and the newest N when it saw none
of that stream (``STREAM_SCRIPT``). While it runs, the subscriber holds everything the channel
brings back; then what was missed is delivered (late), what was never heard of goes to history
only (``seed``: the past of a chat this process joined), the held messages follow, and every
entry reaches the chat once (one the sync delivered is a repeat when it comes live, and the
reverse). When a stream trimmed away entries after the last one seen, they are lost:
``redis.gap``.

Keys (all under ``fsmchat:<channel>:``): ``history:<room key>`` (raw mode: ``history``) and
``streams``, a hash of them to how many entries each was ever given (each entry's number ``n``
is that count as it was added: a sync that finds the first entry after the last seen numbered
more than one past it knows how many were trimmed away, ``MAXLEN ~`` trimming leaving no other
trace). Anything else in a stream is untrusted like the channel: an entry
without ``m`` is skipped (``redis.skipped``); one whose ``m`` has no envelope is a foreign
message, cleaned and delivered like a foreign publish.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from structlog.typing import FilteringBoundLogger

from fsmchat.net.loop import EventLoop
from fsmchat.redis.link import AskingLink, Malformed, RedisAddress

STREAM_MIN = 1000
"""Entries a stream keeps at least (``MAXLEN ~``), whatever --history says: what an instance
cut off for a while can recover."""

PREFIX = b"fsmchat1s "
"""What a live message that is a stream's entry starts with."""

EntryId = tuple[int, int]
"""An entry id, ``<ms>-<n>``, as numbers: what orders a stream."""

Ask = Callable[..., None]
"""``ask(then, *command)``: send a command; its reply goes to ``then``."""

PUBLISH_SCRIPT = b"""
local n = redis.pcall('HINCRBY', KEYS[2], KEYS[1], 1)
if type(n) ~= 'number' then
  redis.pcall('HDEL', KEYS[2], KEYS[1])
  n = redis.pcall('HINCRBY', KEYS[2], KEYS[1], 1)
  if type(n) ~= 'number' then n = 0 end
end
local id = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[3], 'n', n)
if type(id) ~= 'string' then
  return redis.call('PUBLISH', ARGV[1], ARGV[3])
end
return redis.call('PUBLISH', ARGV[1],
                  'fsmchat1s ' .. KEYS[1] .. ' ' .. id .. ' ' .. n .. '\\n' .. ARGV[3])
"""
"""KEYS: the stream, the hash of streams (stream -> entries ever added); ARGV: the channel, N,
the payload. Each entry is numbered (``n``: 1, 2, 3, ... per stream), so that a reader can tell
entries trimmed away from entries never made. Answers PUBLISH's count of subscribers, as
PUBLISH would. What someone wrote by hand in its keys never stops the chat: a count that is no
number starts again from 1 (0: the hash is no hash), and a stream key that is no stream gets
the message published as it is, kept nowhere."""

PUBLISH_SHA = hashlib.sha1(PUBLISH_SCRIPT).hexdigest().encode()

LIST_SCRIPT = b"""
local streams = redis.pcall('HGETALL', KEYS[1])
local out = {}
if type(streams) == 'table' and not streams.err then
  for i = 1, #streams, 2 do
    if redis.call('TYPE', streams[i]).ok == 'stream' then
      out[#out + 1] = streams[i]
      out[#out + 1] = streams[i + 1]
    end
  end
end
return {redis.call('TIME'), out}
"""
"""KEYS: the hash of streams. Answers Redis's clock (``TIME``) and, of each key of the hash that
is a stream, its name and how many entries it was ever given (as written: maybe no number)."""

STREAM_SCRIPT = b"""
local before = {}
if ARGV[1] ~= '' then before = redis.call('XREVRANGE', KEYS[1], ARGV[1], '-', 'COUNT', 1) end
local after = {}
if ARGV[1] ~= '' then
  after = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[3])
end
local tail = {}
if tonumber(ARGV[2]) > 0 then
  tail = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[2])
end
return {before, after, tail}
"""
"""KEYS: a stream; ARGV: the entry after which this instance may have missed some ('' for none:
it heard of nothing yet), how many of the newest it wants for its history (0: none), a page.
Answers the newest entry at or before the first (what numbers the next), a page of the entries
after it, and the newest entries, newest first. More pages: ``XRANGE`` from the last one."""

PAGE = 256
"""Entries one answer of a sync holds at most (with the tail, at most --history more): each
reply stays a few MiB, whatever the streams hold, and Redis is never busy with one for long."""


def entry_key(entry_id: bytes) -> EntryId:
    """``b"1700000000000-3"`` as ``(1700000000000, 3)``; ValueError if it is none."""
    ms, _, n = entry_id.partition(b"-")
    return int(ms), int(n or b"0")


def entry_text(key: EntryId) -> bytes:
    return b"%d-%d" % key


@dataclass(slots=True)
class Entry:
    """One entry a sync brought: where it is, what it holds, and what is to be done with it."""

    stream: bytes
    key: EntryId
    number: int  # its ``n`` (0: it has none)
    payload: bytes | None  # its ``m`` (None: it has none, and is skipped)
    deliver: bool  # missed while the subscriber was away (else: history only)


@dataclass(slots=True)
class Synced:
    """What a sync's answer comes to, in the order the chat gets it."""

    redis_ms: int = 0  # Redis's clock when it answered
    streams: int = 0  # streams read
    entries: list[Entry] = field(default_factory=list)  # by entry id, oldest first
    gaps: list[tuple[bytes, int, int]] = field(default_factory=list)  # (stream, entries
    # lost, the number of the first entry kept) of every stream that lost what was missed


class Sync:
    """One sync, read stream by stream, page by page, through ``ask`` (the history link's);
    ``done`` is given what it comes to once every stream is read. ``Malformed`` from a callback
    when Redis answers what the commands do not (the link then drops it: a new one is asked)."""

    def __init__(self, ask: Ask, streams_key: bytes, *, count: int,
                 known: dict[bytes, tuple[EntryId, int]], high: EntryId | None,
                 done: Callable[[Synced], None]) -> None:
        self.ask = ask
        self.streams_key = streams_key
        self.count = count  # the newest entries of a stream never seen, for history
        self.known = known  # stream -> the last entry seen of it, and that entry's number
        self.high = high  # the newest entry seen of any stream (None: nothing yet)
        self.done = done
        self.out = Synced()
        self.reading = 0  # streams not read to their end yet

    def start(self) -> None:
        self.ask(self._listed, b"EVAL", LIST_SCRIPT, b"1", self.streams_key)

    def _listed(self, reply: Any) -> None:
        if type(reply) is not list or len(reply) != 2 or type(reply[1]) is not list:
            raise Malformed
        clock, pairs = reply
        self.out.redis_ms = _clock_ms(clock)
        if len(pairs) % 2 or not all(type(item) is bytes for item in pairs):
            raise Malformed
        self.out.streams = self.reading = len(pairs) // 2
        if not self.reading:
            self._maybe_done()
        for i in range(0, len(pairs), 2):
            stream, added = pairs[i], pairs[i + 1]
            last = self.known.get(stream)
            bound = last[0] if last is not None else self.high
            self.ask(partial(self._first, StreamRead(stream, added, last, bound)), b"EVAL",
                     STREAM_SCRIPT, b"1", stream,
                     entry_text(bound) if bound is not None else b"",
                     b"%d" % (self.count if last is None else 0), b"%d" % PAGE)

    def _first(self, read: StreamRead, reply: Any) -> None:
        if type(reply) is not list or len(reply) != 3:
            raise Malformed
        before, after, tail = reply
        previous = stream_entries(read.stream, before, False)
        read.previous = previous[0] if previous else None
        read.tail = list(reversed(stream_entries(read.stream, tail, False)))
        self._page(read, after)

    def _page(self, read: StreamRead, reply: Any) -> None:
        page = stream_entries(read.stream, reply, True)
        read.missed += page
        if len(page) >= PAGE:  # more after it
            self.ask(partial(self._page, read), b"XRANGE", read.stream,
                     b"(" + entry_text(page[-1].key), b"+", b"COUNT", b"%d" % PAGE)
            return
        self._read(read)
        self.reading -= 1
        self._maybe_done()

    def _read(self, read: StreamRead) -> None:
        """A stream read to its end: what was missed, what is its past, and any gap."""
        out, bound = self.out, read.bound
        missed = [entry for entry in read.missed if bound is not None and entry.key > bound]
        out.entries += missed
        out.entries += [entry for entry in read.tail if bound is None or entry.key <= bound]
        if bound is None:
            return
        # Entries after the one at or before ``bound`` are numbered from its number + 1; the
        # first kept says how many went before it. Unknown: numbers not ours, or written by
        # hand.
        previous = read.previous
        if previous is not None:
            expected = previous.number + 1 if previous.number else 0
        elif read.last is not None:
            expected = read.last[1] + 1 if read.last[1] else 0
        else:
            expected = 1  # a stream made after ``bound``
        added = read.added
        first = missed[0].number if missed else int(added) + 1 if added.isdigit() else 0
        if expected and first > expected:
            out.gaps.append((read.stream, first - expected, first))

    def _maybe_done(self) -> None:
        if not self.reading:
            self.out.entries.sort(key=lambda entry: entry.key)
            self.done(self.out)


@dataclass(slots=True)
class StreamRead:
    """What a sync read of one stream so far."""

    stream: bytes
    added: bytes  # how many entries it was ever given, as the hash says
    last: tuple[EntryId, int] | None  # the last entry this instance saw of it, and its number
    bound: EntryId | None  # what it may have missed comes after this
    previous: Entry | None = None  # the newest entry at or before ``bound``
    missed: list[Entry] = field(default_factory=list)  # after ``bound``, oldest first
    tail: list[Entry] = field(default_factory=list)  # its newest, oldest first


def _clock_ms(clock: Any) -> int:
    """Redis's ``TIME`` (seconds, microseconds) in ms."""
    if (type(clock) is not list or len(clock) != 2
            or not all(type(part) is bytes and part.isdigit() for part in clock)):
        raise Malformed
    return int(clock[0]) * 1000 + int(clock[1]) // 1000


def stream_entries(stream: bytes, reply: Any, deliver: bool) -> list[Entry]:
    """The entries of an XRANGE-like reply; ``Malformed`` if it is none."""
    if reply is None:  # (what an empty answer may come as)
        return []
    if type(reply) is not list:
        raise Malformed
    out = []
    for entry in reply:
        if type(entry) is not list or len(entry) != 2 or type(entry[0]) is not bytes:
            raise Malformed
        fields = entry[1] if type(entry[1]) is list else []
        try:
            key = entry_key(entry[0])
        except ValueError:
            raise Malformed from None
        number = _field(fields, b"n")
        out.append(Entry(stream, key, int(number) if number and number.isdigit() else 0,
                         _field(fields, b"m"), deliver))
    return out


def _field(fields: list[Any], name: bytes) -> bytes | None:
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == name and type(fields[i + 1]) is bytes:
            value: bytes = fields[i + 1]
            return value
    return None


def parse_live(payload: bytes) -> tuple[bytes, EntryId, int, int] | None:
    """(stream, entry id, its number, where the bus's payload starts) of a live message that is
    an entry; None for one that is not (or whose first line is not a well-made one)."""
    end = payload.find(b"\n", 0, 512)
    if end < 0:
        return None
    parts = payload[len(PREFIX):end].split(b" ")
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    try:
        return parts[0], entry_key(parts[1]), int(parts[2]), end + 1
    except ValueError:
        return None


class HistoryLink(AskingLink):
    """Runs the sync script; each answer goes to whoever asked, in order."""

    role = "history"

    def __init__(self, address: RedisAddress, loop: EventLoop, log: FilteringBoundLogger, *,
                 streams_key: bytes, on_ready: Callable[[], None],
                 on_lost: Callable[[], None]) -> None:
        super().__init__(address, loop, log)
        self.streams_key = streams_key
        self.on_ready = on_ready
        self.on_lost = on_lost  # told when a session ends: an unanswered sync is asked again

    def sync(self, count: int, high: EntryId | None, known: dict[bytes, tuple[EntryId, int]],
             then: Callable[[Synced], None]) -> None:
        """What was missed after ``known`` and ``high`` (``Sync``), for ``then``."""
        Sync(self.ask, self.streams_key, count=count, known=known, high=high,
             done=then).start()

    def ready(self) -> None:
        self.on_ready()

    def lost(self) -> None:
        super().lost()
        self.on_lost()

    def idle(self) -> bool:
        return True  # a stopping server has no use for a sync's answer
