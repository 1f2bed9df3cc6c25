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

A fourth link (``HistoryLink``) runs ``SYNC_SCRIPT`` when the subscriber (re)subscribes: for
every stream of the chat, the entries after the last one this instance saw (``after``), or
the newest N when it saw none of that stream (``tail``), and how many entries the stream was
ever given. While it runs, the subscriber holds live messages back; then what was
missed is delivered (late), what was never heard of goes to history only (``seed``: the past
of a chat this process joined), the held messages follow, and every entry reaches the chat once
(an entry id at or below the stream's last is a repeat). When a stream trimmed away entries
after the last one seen, they are lost: ``redis.gap``.

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

PUBLISH_SCRIPT = b"""
local n = redis.call('HINCRBY', KEYS[2], KEYS[1], 1)
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[3], 'n', n)
return redis.call('PUBLISH', ARGV[1],
                  'fsmchat1s ' .. KEYS[1] .. ' ' .. id .. ' ' .. n .. '\\n' .. ARGV[3])
"""
"""KEYS: the stream, the hash of streams (stream -> entries ever added); ARGV: the channel, N,
the payload. Each entry is numbered (``n``: 1, 2, 3, ... per stream), so that a reader can tell
entries trimmed away from entries never made. Answers PUBLISH's count of subscribers, as
PUBLISH would."""

PUBLISH_SHA = hashlib.sha1(PUBLISH_SCRIPT).hexdigest().encode()

SYNC_SCRIPT = b"""
local known = {}
for i = 3, #ARGV, 2 do known[ARGV[i]] = ARGV[i + 1] end
local out = {}
local streams = redis.call('HGETALL', KEYS[1])
for i = 1, #streams, 2 do
  local s = streams[i]
  if redis.call('TYPE', s).ok == 'stream' then
    local last = known[s] or ARGV[2]
    local after = {}
    if last ~= '' then after = redis.call('XRANGE', s, '(' .. last, '+') end
    local tail = {}
    if not known[s] and tonumber(ARGV[1]) > 0 then
      tail = redis.call('XREVRANGE', s, '+', '-', 'COUNT', ARGV[1])
    end
    out[#out + 1] = {s, streams[i + 1], after, tail}
  end
end
return out
"""
"""KEYS: the hash of streams; ARGV: N, the newest entry id seen of any stream ('' for none),
then pairs of a stream and the last entry id seen of it. Answers, per stream: its name, how
many entries it was ever given, the entries after the last seen (of it, or of any stream when
it is unknown), and, when it is unknown, its newest N entries, newest first."""


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

    entries: list[Entry] = field(default_factory=list)  # by entry id, oldest first
    gaps: list[tuple[bytes, int, int]] = field(default_factory=list)  # (stream, entries
    # lost, the number of the first entry kept) of every stream that lost what was missed


def read_sync(reply: Any, known: dict[bytes, tuple[EntryId, int]],
              high: EntryId | None) -> Synced:
    """The sync ``reply`` for an instance that saw, of each stream, ``known`` (its last entry
    and that entry's number), and of any stream ``high`` at newest (None: it saw nothing yet:
    everything is its history's past). Ids of two streams compare by Redis's clock: an entry of
    a stream never seen, made in the very millisecond of ``high``, counts as past."""
    if type(reply) is not list:
        raise Malformed
    out = Synced()
    for item in reply:
        if type(item) is not list or len(item) != 4:
            raise Malformed
        stream, added, after, tail = item
        if type(stream) is not bytes or type(added) is not bytes or not added.isdigit():
            raise Malformed
        last = known.get(stream)
        bound = last[0] if last is not None else high
        missed = [entry for entry in _entries(stream, after, True)
                  if bound is not None and entry.key > bound]
        past = [entry for entry in reversed(_entries(stream, tail, False))
                if bound is None or entry.key <= bound]
        out.entries += missed
        out.entries += past
        if bound is not None:
            # What came after the last seen: numbered from its number + 1 (from 1 for a stream
            # never seen, made since); the first kept says how many went before it. Unknown:
            # the last seen was an entry not ours (unnumbered), or a stream never seen still
            # holds entries from before ``high`` (so nothing after it went).
            expected = _expected(last, bool(past))
            first = missed[0].number if missed else int(added) + 1
            if expected and first > expected:
                out.gaps.append((stream, first - expected, first))
    out.entries.sort(key=lambda entry: entry.key)
    return out


def _expected(last: tuple[EntryId, int] | None, older_kept: bool) -> int:
    """The number the first entry after the last seen should have; 0: unknown."""
    if last is not None:
        return last[1] + 1 if last[1] else 0
    return 0 if older_kept else 1


def _entries(stream: bytes, reply: Any, deliver: bool) -> list[Entry]:
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
             then: Callable[[Any], None]) -> None:
        args = [b"%d" % count, entry_text(high) if high is not None else b""]
        for stream, (key, _) in known.items():
            args += [stream, entry_text(key)]
        self.ask(then, b"EVAL", SYNC_SCRIPT, b"1", self.streams_key, *args)

    def ready(self) -> None:
        self.on_ready()

    def lost(self) -> None:
        super().lost()
        self.on_lost()

    def idle(self) -> bool:
        return True  # a stopping server has no use for a sync's answer
