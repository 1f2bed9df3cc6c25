"""The shared history: one Redis stream per room, kept by every instance, read after a loss.

Pub/sub keeps nothing: an instance whose subscriber was away misses for good what the others
said meanwhile, and one that starts has no past to give newcomers. So every room message is
also an entry of its room's stream (raw mode: one stream for the chat), and the live message on
the channel says which entry it is::

    fsmchat1s <stream> <entry id>\\n<payload>

where ``<payload>`` is the bus's (``redis/bus.py``: envelope, chat's head, the message) and the
entry's one field ``m`` holds the same payload. One script (``PUBLISH_SCRIPT``, run by the
publish link instead of PUBLISH) appends the entry (``XADD ... MAXLEN ~ N``), adds the stream to
the set of the chat's streams, and publishes: atomically, so that the channel's order is each
stream's order and no entry is ever published without being kept, nor the reverse. Private
messages (``@NAME``) go on plain PUBLISH: they belong to no room.

A fourth link (``HistoryLink``) runs ``SYNC_SCRIPT`` when the subscriber (re)subscribes: for
every stream of the chat, the entries after the last one this instance saw (``after``), or
the newest N when it saw none of that stream (``tail``), and the stream's
``max-deleted-entry-id``. While it runs, the subscriber holds live messages back; then what was
missed is delivered (late), what was never heard of goes to history only (``seed``: the past
of a chat this process joined), the held messages follow, and every entry reaches the chat once
(an entry id at or below the stream's last is a repeat). When a stream trimmed away entries
after the last one seen, they are lost: ``redis.gap``.

Keys (all under ``fsmchat:<channel>:``): ``history:<room key>`` (raw mode: ``history``) and
``streams``, the set of them. Anything else in a stream is untrusted like the channel: an entry
without ``m`` is skipped (``redis.skipped``); one whose ``m`` has no envelope is a foreign
message, cleaned and delivered like a foreign publish.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hiredis
from structlog.typing import FilteringBoundLogger

from fsmchat.lifecycle import LinkState, LinkTrigger
from fsmchat.net.loop import EventLoop
from fsmchat.redis.link import RedisAddress, RedisLink

STREAM_MIN = 1000
"""Entries a stream keeps at least (``MAXLEN ~``), whatever --history says: what an instance
cut off for a while can recover."""

PREFIX = b"fsmchat1s "
"""What a live message that is a stream's entry starts with."""

EntryId = tuple[int, int]
"""An entry id, ``<ms>-<n>``, as numbers: what orders a stream."""

PUBLISH_SCRIPT = b"""
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[3])
redis.call('SADD', KEYS[2], KEYS[1])
return redis.call('PUBLISH', ARGV[1], 'fsmchat1s ' .. KEYS[1] .. ' ' .. id .. '\\n' .. ARGV[3])
"""
"""KEYS: the stream, the set of streams; ARGV: the channel, N, the payload. Answers PUBLISH's
count of subscribers, as PUBLISH would."""

PUBLISH_SHA = hashlib.sha1(PUBLISH_SCRIPT).hexdigest().encode()

SYNC_SCRIPT = b"""
local known = {}
for i = 3, #ARGV, 2 do known[ARGV[i]] = ARGV[i + 1] end
local out = {}
for _, s in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local info = redis.pcall('XINFO', 'STREAM', s)
  if type(info) == 'table' and not info.err then
    local deleted = '0-0'
    for i = 1, #info, 2 do
      if info[i] == 'max-deleted-entry-id' then deleted = info[i + 1] end
    end
    local last = known[s] or ARGV[2]
    local after = {}
    if last ~= '' then after = redis.call('XRANGE', s, '(' .. last, '+') end
    local tail = {}
    if not known[s] and tonumber(ARGV[1]) > 0 then
      tail = redis.call('XREVRANGE', s, '+', '-', 'COUNT', ARGV[1])
    end
    out[#out + 1] = {s, deleted, after, tail}
  end
end
return out
"""
"""KEYS: the set of streams; ARGV: N, the newest entry id seen of any stream ('' for none),
then pairs of a stream and the last entry id seen of it. Answers, per stream: its name, its
``max-deleted-entry-id``, the entries after the last seen (of it, or of any stream when it is
unknown), and, when it is unknown, its newest N entries, newest first."""


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
    payload: bytes | None  # its ``m`` (None: it has none, and is skipped)
    deliver: bool  # missed while the subscriber was away (else: history only)


@dataclass(slots=True)
class Synced:
    """What a sync's answer comes to, in the order the chat gets it."""

    entries: list[Entry] = field(default_factory=list)  # by entry id, oldest first
    gaps: list[tuple[bytes, EntryId, EntryId]] = field(default_factory=list)  # (stream, the
    # last entry seen, the newest trimmed away) of every stream that lost what was missed


class Malformed(Exception):
    """A sync answer that is not what the script answers."""


def read_sync(reply: Any, known: dict[bytes, EntryId], high: EntryId | None) -> Synced:
    """The sync ``reply`` for an instance that saw, of each stream, ``known``, and of any
    stream ``high`` at newest (None: it saw nothing yet: everything is its history's past)."""
    if type(reply) is not list:
        raise Malformed
    out = Synced()
    for item in reply:
        if type(item) is not list or len(item) != 4:
            raise Malformed
        stream, deleted, after, tail = item
        if type(stream) is not bytes or type(deleted) is not bytes:
            raise Malformed
        last = known.get(stream)
        bound = last if last is not None else high
        try:
            trimmed = entry_key(deleted)
        except ValueError:
            raise Malformed from None
        if bound is not None and trimmed > bound:
            out.gaps.append((stream, bound, trimmed))
        for entry_id, fields in _entries(after):
            if bound is not None and entry_id > bound:
                out.entries.append(Entry(stream, entry_id, _payload(fields), True))
        for entry_id, fields in reversed(_entries(tail)):
            if bound is None or entry_id <= bound:
                out.entries.append(Entry(stream, entry_id, _payload(fields), False))
    out.entries.sort(key=lambda entry: entry.key)
    return out


def _entries(reply: Any) -> list[tuple[EntryId, list[Any]]]:
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
            out.append((entry_key(entry[0]), fields))
        except ValueError:
            raise Malformed from None
    return out


def _payload(fields: list[Any]) -> bytes | None:
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == b"m" and type(fields[i + 1]) is bytes:
            value: bytes = fields[i + 1]
            return value
    return None


def parse_live(payload: bytes) -> tuple[bytes, EntryId, int] | None:
    """(stream, entry id, where the bus's payload starts) of a live message that is an entry;
    None for one that is not (or whose first line is not a well-made one)."""
    end = payload.find(b"\n", 0, 512)
    if end < 0:
        return None
    parts = payload[len(PREFIX):end].split(b" ")
    if len(parts) != 2:
        return None
    try:
        return parts[0], entry_key(parts[1]), end + 1
    except ValueError:
        return None


class HistoryLink(RedisLink):
    """Runs the sync script; each answer goes to whoever asked, in order."""

    role = "history"

    def __init__(self, address: RedisAddress, loop: EventLoop, log: FilteringBoundLogger, *,
                 streams_key: bytes, on_ready: Callable[[], None],
                 on_lost: Callable[[], None]) -> None:
        super().__init__(address, loop, log)
        self.streams_key = streams_key
        self.on_ready = on_ready
        self.on_lost = on_lost  # told when a session ends: an unanswered sync is asked again
        self.waiting: deque[Callable[[Any], None]] = deque()
        self.syncs = 0  # answered, since start

    def sync(self, count: int, high: EntryId | None, known: dict[bytes, EntryId],
             then: Callable[[Any], None]) -> None:
        args = [b"%d" % count, entry_text(high) if high is not None else b""]
        for stream, key in known.items():
            args += [stream, entry_text(key)]
        self.send_command(b"EVAL", SYNC_SCRIPT, b"1", self.streams_key, *args)
        self.waiting.append(then)

    def ready(self) -> None:
        self.on_ready()

    def on_reply(self, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):
            self.lose(f"history script refused: {reply}")
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
        self.syncs += 1
        if self.state == LinkState.DRAINING and self.idle():
            self.fire(LinkTrigger.DRAINED)

    def awaiting(self) -> bool:
        return bool(self.waiting)

    def lost(self) -> None:
        self.waiting.clear()
        self.on_lost()

    def idle(self) -> bool:
        return True  # a stopping server has no use for a sync's answer

    def closed(self) -> None:
        self.waiting.clear()
