"""Presence across instances: a name is one person's wherever they connect, and who is where.

With ``--redis`` in chat mode every instance keeps its people in Redis, and a view of everyone
else's, so that a name check is local and instant and ``/who`` and ``/rooms`` count the whole
chat. In Redis, under ``fsmchat:<channel>:``::

    names         hash: skeleton -> "<instance> <since us> <name> <room>"  (one per person)
    alive:<id>    one key per instance, set with PX --presence-ttl and refreshed every third
    instances     a set: the instances that may hold names (whose alive keys a refresh checks)
    rev           a counter: every change to ``names`` takes the next revision
    presence      the pub/sub channel every change is announced on: "<rev>\\n+ <skeleton>
                  <entry>" or "- <skeleton> <instance>", a line per change

A names hash keyed by skeleton (look-alike letters folded, as chat mode compares names) makes a
claim one atomic look-up, whoever asks; a per-instance hash would need every instance's looked
at. Liveness is a key per instance, refreshed in O(1) however many people it has, and a
refresh looks at one key per instance, not per person: the names are read only to free those
of an instance that vanished, or to heal a view that missed a change. Every change
is a Lua script (``APPLY``, ``TICK``: atomic, one round trip), run through one more
``RedisLink`` (``PresenceLink``), non-blocking in the same select loop, its replies parsed by
hiredis. The scripts are loaded at each greeting and called by their SHA-1.

The rules, which every instance applies the same way (the scripts are the one judge):
- A name asked for (``/nick``: ``rename``) is granted once Redis says nobody else holds it; the
  person keeps their old name meanwhile (a round trip) and, when another instance got it first,
  is told so. Another instance's name counts only while that instance is alive.
- A name granted without asking (a newcomer's, or any name while Redis is away: ``claim``) is
  checked when Redis can be reached: of two claims of one name, the earlier one (by the time
  each instance took it, then by instance id) keeps it; the other is renamed (``on_lost``).
- An instance that stops cleanly removes its names at once. One that vanishes (killed, cut off)
  stops refreshing its key: it expires after the TTL, and the next ``TICK`` of any instance
  (every third of the TTL) frees its names and announces it: at most 4/3 of the TTL.
- The view: announcements are applied as they come, in revision order; a ``TICK`` every third
  of the TTL (and after each reconnect, and at any gap in the revisions) heals it from a full
  read, which costs nothing when no revision was missed. Announcements heard while a full read
  is on its way are applied again after it, so none is lost between the two.
- Redis away: local names only. The view is kept to refuse the other instances' names, but
  ``names_in`` and ``rooms`` count this instance alone, as only its people can hear you then.
- Nothing from the channel or the hash is trusted: a malformed entry is left out, and the view
  holds at most ``VIEW_MAX`` people.

``Presence`` is also the hub's extension for what users hear about the other instances: the
outage notices (``isolated``, ``reconnected``), and ``delayed``, which marks a message that
arrives late.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from structlog.typing import FilteringBoundLogger

from fsmchat.chat.directory import Directory
from fsmchat.chat.mode import Member
from fsmchat.hub import Extension
from fsmchat.lifecycle import LinkState
from fsmchat.net.loop import EventLoop, Timer
from fsmchat.redis.bus import RedisBus
from fsmchat.redis.link import AskingLink, Malformed, RedisAddress

if TYPE_CHECKING:
    from fsmchat.chat.mode import Chat
    from fsmchat.chat.rooms import Room, Rooms
    from fsmchat.connection import Connection
    from fsmchat.hub import Hub

UNREACHABLE = b"*** other servers unreachable; this part of the chat goes on\n"
RECONNECTED = b"*** reconnected to the other servers\n"

VIEW_MAX = 1 << 16
"""Other instances' people the view holds at most: a forged flood cannot grow it further."""

HEARD_MAX = 1 << 14
"""Announcements kept while a full read is on its way; past it the read is taken again."""

# Lua, run by Redis atomically. KEYS: the names hash, the revision counter, this instance's
# alive key, the set of instances. ARGV: this instance's id, the TTL in ms, the alive keys'
# prefix, the channel.
APPLY = b"""
local names, me, prefix, mode = KEYS[1], ARGV[1], ARGV[3], ARGV[5]
if mode == '2' then
  redis.call('DEL', KEYS[3])
  redis.call('SREM', KEYS[4], me)
else
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
  redis.call('SADD', KEYS[4], me)
end
local alive = {[me] = true}
local function live(id)
  local yes = alive[id]
  if yes == nil then yes = redis.call('EXISTS', prefix .. id) == 1; alive[id] = yes end
  return yes
end
local news, results, keep = {}, {}, {}
for i = 6, #ARGV, 4 do
  local op, skel, entry, old = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local held = redis.call('HGET', names, skel)
  local owner, since
  if held then owner, since = string.match(held, '^(%x+) (%d+) ') end
  local result = 0
  if op == 'D' then
    keep[skel] = nil
    if owner == me then
      redis.call('HDEL', names, skel)
      news[#news + 1] = '- ' .. skel .. ' ' .. me
    end
  else
    if owner and owner ~= me and live(owner) then
      if op == 'A' then
        result = held
      else
        local mine, theirs = tonumber(string.match(entry, '^%S+ (%d+)')), tonumber(since)
        if theirs < mine or (theirs == mine and owner < me) then result = held end
      end
    end
    if result == 0 then
      keep[skel] = true
      if held ~= entry then
        redis.call('HSET', names, skel, entry)
        news[#news + 1] = '+ ' .. skel .. ' ' .. entry
      end
    end
    -- a refused ask keeps the old name; a refused claim left it already (on_lost renames)
    if old ~= '' and old ~= skel and (result == 0 or op == 'C') then
      keep[old] = nil
      if string.match(redis.call('HGET', names, old) or '', '^(%x+) ') == me then
        redis.call('HDEL', names, old)
        news[#news + 1] = '- ' .. old .. ' ' .. me
      end
    end
  end
  results[#results + 1] = result
end
if mode ~= '0' then
  local all = redis.call('HGETALL', names)
  for i = 1, #all, 2 do
    if not keep[all[i]] and string.match(all[i + 1], '^(%x+) ') == me then
      redis.call('HDEL', names, all[i])
      news[#news + 1] = '- ' .. all[i] .. ' ' .. me
    end
  end
end
local rev
if #news > 0 then
  rev = redis.call('INCR', KEYS[2])
  redis.call('PUBLISH', ARGV[4], rev .. '\\n' .. table.concat(news, '\\n'))
else
  rev = tonumber(redis.call('GET', KEYS[2]) or '0')
end
return {rev, results}
"""
"""Changes by this instance. ARGV[5]: ``0`` the ops only, ``1`` also drop this instance's
other entries (after a reconnect), ``2`` drop all of them and the alive key (a clean stop).
Then ops by fours: ``A`` (ask: taken unless another live instance holds it) or ``C`` (claim:
taken unless another live instance holds it since earlier), each with the skeleton, the entry
and a skeleton to drop once it is taken (or empty); ``D`` with a skeleton drops it. Returns
the revision and, per op, 0 (done) or the entry that holds the name."""

TICK = b"""
local names, me, prefix = KEYS[1], ARGV[1], ARGV[3]
local existed = redis.call('EXISTS', KEYS[3])
redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
redis.call('SADD', KEYS[4], me)
local alive, dead = {[me] = true}, 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  if alive[id] == nil then
    alive[id] = redis.call('EXISTS', prefix .. id) == 1
    if not alive[id] then
      dead = dead + 1
      redis.call('SREM', KEYS[4], id)
    end
  end
end
local rev = tonumber(redis.call('GET', KEYS[2]) or '0')
local known = tostring(rev) == ARGV[5]
if dead == 0 and known then return {rev, existed, 0} end
local all = redis.call('HGETALL', names)
local gone, news, live = {}, {}, {}
for i = 1, #all, 2 do
  local owner = string.match(all[i + 1], '^(%x+) %d+ ')
  local yes = false
  if owner then
    yes = alive[owner]
    if yes == nil then
      yes = redis.call('EXISTS', prefix .. owner) == 1
      alive[owner] = yes
    end
  end
  if yes then
    live[#live + 1] = all[i]
    live[#live + 1] = all[i + 1]
  else
    gone[#gone + 1] = all[i]
    news[#news + 1] = '- ' .. all[i] .. ' ' .. (owner or '?')
  end
end
for i = 1, #gone, 1000 do
  redis.call('HDEL', names, unpack(gone, i, math.min(i + 999, #gone)))
end
if #news > 0 then
  rev = redis.call('INCR', KEYS[2])
  redis.call('PUBLISH', ARGV[4], rev .. '\\n' .. table.concat(news, '\\n'))
end
if known then return {rev, existed, #gone} end
return {rev, existed, #gone, live}
"""
"""Every third of the TTL: refresh this instance's key; free the names of the instances whose
key expired (the set of instances says which keys to look at; the names are read only when one
vanished, or the caller's view is not current: ARGV[5] is the revision it knows), and of any
owner not alive found on the way; and, unless the view was current, return every live entry.
Returns the revision, whether this instance's key was still there, how many names were
freed[, the entries as skeleton, entry, ...]."""

APPLY_SHA = hashlib.sha1(APPLY).hexdigest().encode()
TICK_SHA = hashlib.sha1(TICK).hexdigest().encode()

OPS, SYNC, LEAVE = b"0", b"1", b"2"

_OWNER = re.compile(rb"[0-9a-f]{16}")

Answer = Callable[["bytes | None"], None]
"""What ``rename`` is answered with: None when the name is the person's now, else the name
another instance holds (the same, or one that looks like it)."""

Lost = Callable[[Hashable, bytes, bytes], None]
"""``on_lost(who, name, holder)``: ``who`` lost ``name`` to an earlier claim of ``holder``'s on
another instance; the chat gives them another name (``claim``)."""


@dataclass(slots=True, eq=False)
class Ask:
    """A name asked for and not yet granted."""

    name: bytes
    skel: bytes
    since: int
    answer: Answer


@dataclass(slots=True, eq=False)
class Mine:
    """A person of this instance's, as Redis is (or will be) told."""

    name: bytes
    skel: bytes
    room: bytes
    since: int  # when the name was taken, in microseconds: the earlier of two claims keeps it
    rev: int = 0  # the revision that confirmed the name (0: not confirmed in this session)
    asking: Ask | None = None


@dataclass(slots=True, frozen=True)
class Entry:
    """A person of another instance's."""

    owner: bytes
    since: int
    name: bytes
    room: bytes
    rev: int  # the revision it is known from (a full read: that read's)


@dataclass(frozen=True, slots=True)
class Rules:
    """What chat mode calls a name and a room, so that nothing else enters the view."""

    skeleton: Callable[[bytes], bytes]  # what a name looks like: one person per skeleton
    is_name: Callable[[bytes], bool]
    is_room: Callable[[bytes], bool]
    room_key: Callable[[bytes], bytes]  # what finds a room (``Math`` is ``math``)

    def entry(self, value: bytes, skel: bytes, rev: int) -> Entry | None:
        """An entry of the names hash, or None if it is malformed or filed under another
        skeleton."""
        parts = value.split(b" ", 3)
        if len(parts) != 4:
            return None
        owner, since, name, room = parts
        if (_OWNER.fullmatch(owner) is None or not since.isdigit() or len(since) > 17
                or not self.is_name(name) or not self.is_room(room)
                or self.skeleton(name) != skel):
            return None
        return Entry(owner, int(since), name, room, rev)


def now_us() -> int:
    """Microseconds since the epoch: when a name was taken. Two claims one round trip apart
    are told apart (a double, as Lua's numbers are, holds them exactly)."""
    return time.time_ns() // 1000


class PresenceLink(AskingLink):
    """Runs the presence scripts; replies are handed back in order to whoever asked."""

    role = "presence"

    def __init__(self, address: RedisAddress, loop: EventLoop, log: FilteringBoundLogger,
                 presence: Presence) -> None:
        super().__init__(address, loop, log)
        self.presence = presence

    def run(self, sha: bytes, args: list[bytes], then: Callable[[Any], None]) -> None:
        self.ask(then, b"EVALSHA", sha, b"4", *self.presence.keys, *args)

    def greeting(self) -> list[tuple[bytes, ...]]:
        return [(b"SCRIPT", b"LOAD", APPLY), (b"SCRIPT", b"LOAD", TICK)]

    def ready(self) -> None:
        self.presence.linked()

    def lost(self) -> None:
        super().lost()
        self.presence.unlinked()

    def drain(self) -> None:
        self.presence.leave()
        super().drain()

    def closed(self) -> None:
        super().closed()
        self.presence.closed()


class Presence(Extension):
    """This instance's people and a view of everyone else's; what the chat asks about names.

    The chat calls: ``elsewhere`` (is a name held on another instance?), ``claim`` (a name
    granted now: a newcomer's, or a new one for someone who lost theirs), ``rename`` (a name
    asked for: answered when Redis has decided; ``asking`` says what is being asked), ``move``
    (to a room), ``release`` (gone), ``names_in`` and ``rooms`` (everyone, every instance). It
    sets ``on_lost`` and, if it wants to hear of other instances' changes, ``on_change``.
    ``SharedDirectory`` is that chat side: chat mode's ``Directory``, answered from here."""

    def __init__(self, hub: Hub, bus: RedisBus, loop: EventLoop, log: FilteringBoundLogger, *,
                 ttl: float, rules: Rules) -> None:
        self.hub = hub
        self.bus = bus
        self.loop = loop
        self.log = log
        self.rules = rules
        self.skeleton = rules.skeleton
        self.me = bus.origin
        prefix = b"fsmchat:%s:" % bus.channel.encode()
        self.keys = (prefix + b"names", prefix + b"rev", prefix + b"alive:" + self.me,
                     prefix + b"instances")
        self.alive_prefix = prefix + b"alive:"
        self.announcements = prefix + b"presence"
        self.ttl = ttl
        self.head = [self.me, b"%d" % int(ttl * 1000), self.alive_prefix, self.announcements]
        self.mine: dict[Hashable, Mine] = {}  # who -> their name here
        self.local: dict[bytes, Hashable] = {}  # skeleton -> who holds it, or asks for it
        self.others: dict[bytes, Entry] = {}  # skeleton -> a person of another instance's
        self.by_room: dict[bytes, dict[bytes, bytes]] = {}  # room key -> skeleton -> name
        self.rev = -1  # the newest revision the view has taken in (-1: none this session)
        self.heard: list[tuple[int, list[bytes]]] | None = None  # while a full read is out
        self.again = False  # a full read is due as soon as the one out is answered
        self.ops: list[tuple[bytes, bytes, bytes, bytes]] = []  # to run at the end of the turn
        self.thens: list[Callable[[object, int], None]] = []  # ... and what each answer does
        self.leaving = False  # the server stops: names are dropped all at once
        self.on_lost: Lost | None = None
        self.on_change: Callable[[], None] | None = None
        """Told when someone of another instance came, went, was renamed or moved."""
        self.timer: Timer | None = loop.call_later(ttl / 3, self._tick_timer)
        self.link = PresenceLink(bus.address, loop, log, self)
        bus.add_link(self.link)
        bus.listen(self.announcements, self.announced, self.resubscribed)

    # -- what the chat calls -----------------------------------------------------------------

    def elsewhere(self, name: bytes) -> bytes | None:
        """The name held on another instance that looks like ``name`` (the same skeleton),
        if any: from the view, instantly (Redis away: as the view was)."""
        entry = self.others.get(self.skeleton(name))
        return entry.name if entry is not None else None

    def claim(self, who: Hashable, name: bytes, room: bytes) -> None:
        """``who`` is ``name`` from now on (a newcomer, or a new name after ``on_lost``); the
        chat checked it is free here and ``elsewhere``. Should another instance hold it since
        earlier after all, ``on_lost`` is told."""
        skel = self.skeleton(name)
        old = self.mine.get(who)
        dropped = b""
        if old is not None:
            self._forget_local(who, old)
            if old.skel != skel:
                dropped = old.skel
        mine = self.mine[who] = Mine(name, skel, room, now_us())
        self.local[skel] = who
        self._send(b"C", mine, dropped)

    def rename(self, who: Hashable, name: bytes, answer: Answer) -> None:
        """``who`` asks for ``name`` (free here and ``elsewhere``, as the chat checked).
        ``answer(None)`` once it is theirs (at once while Redis is away: checked again when it
        is back), ``answer(holder)`` if another instance had it first; meanwhile ``who`` keeps
        their name. One question at a time: asking again meanwhile is answered with the name
        still asked for."""
        mine = self.mine[who]
        skel = self.skeleton(name)
        if mine.asking is not None:
            answer(mine.asking.name)
            return
        holder = self.local.get(skel)
        if holder is not None and holder is not who:  # asked for by someone here meanwhile
            other = self.mine[holder]
            asked = other.asking
            answer(asked.name if asked is not None and asked.skel == skel else other.name)
            return
        ask = Ask(name, skel, now_us(), answer)
        if not self._linked():
            self.local[skel] = who
            self._grant(who, mine, ask, 0)
            return
        mine.asking = ask
        self.local[skel] = who
        self._queue(b"A", skel, self._entry(mine, ask), mine.skel if mine.skel != skel else b"",
                    lambda result, rev: self._asked(who, mine, ask, result, rev))

    def asking(self, who: Hashable) -> bytes | None:
        """The name ``who`` asked for and waits for, if any."""
        mine = self.mine.get(who)
        return mine.asking.name if mine is not None and mine.asking is not None else None

    def name_of(self, who: Hashable) -> bytes | None:
        mine = self.mine.get(who)
        return mine.name if mine is not None else None

    def move(self, who: Hashable, room: bytes) -> None:
        mine = self.mine[who]
        mine.room = room
        self._send(b"C", mine, b"")

    def release(self, who: Hashable) -> None:
        """``who`` left the chat."""
        mine = self.mine.pop(who, None)
        if mine is None:
            return
        self._forget_local(who, mine)
        if self._linked() and not self.leaving:
            self._queue(b"D", mine.skel, b"", b"", _nothing)

    def names_in(self, room: bytes) -> list[bytes]:
        """Who is in ``room``, on every instance (Redis away: this one's only), unsorted."""
        key = self.rules.room_key
        wanted = key(room)
        names = [mine.name for mine in self.mine.values() if key(mine.room) == wanted]
        if not self.bus.apart:
            names += self.by_room.get(wanted, {}).values()
        return names

    def rooms(self) -> dict[bytes, tuple[bytes, int]]:
        """Room key -> (its name, how many are in it), on every instance (Redis away: this
        one's only). A room's name is the one this instance knows it by, if any."""
        key = self.rules.room_key
        counts: dict[bytes, list[Any]] = {}
        for mine in self.mine.values():
            counts.setdefault(key(mine.room), [mine.room, 0])[1] += 1
        if not self.bus.apart:
            for entry in self.others.values():
                counts.setdefault(key(entry.room), [entry.room, 0])[1] += 1
        return {room: (name, count) for room, (name, count) in counts.items()}

    def everyone(self) -> Iterator[tuple[bytes, bytes]]:
        """(name, room) of everyone, on every instance (Redis away: this one's only)."""
        for mine in self.mine.values():
            yield mine.name, mine.room
        if not self.bus.apart:
            for entry in self.others.values():
                yield entry.name, entry.room

    # -- the hub's hooks ---------------------------------------------------------------------

    def greet(self, conn: Connection) -> None:
        """A newcomer during an outage hears of it, as everyone here did."""
        if self.bus.apart:
            self.hub.tell(conn, UNREACHABLE)

    def isolated(self) -> None:
        self._tell_everyone(UNREACHABLE)

    def reconnected(self) -> None:
        self._tell_everyone(RECONNECTED)

    def end_of_turn(self) -> None:
        """What this turn changed goes to Redis in one script call."""
        if self.ops:
            ops, thens = self.ops, self.thens
            self.ops, self.thens = [], []
            if self.link.state not in (LinkState.READY, LinkState.DRAINING):
                return  # lost meanwhile: the next session's sync tells it all
            self.link.run(APPLY_SHA, [*self.head, OPS, *(part for op in ops for part in op)],
                          lambda reply: self._applied(reply, thens))

    def _tell_everyone(self, notice: bytes) -> None:
        """A notice for each local reader, kept out of history (it is news only now)."""
        hub = self.hub
        for conn in list(hub.readers.values()):
            hub.tell(conn, notice)

    # -- the link's news -----------------------------------------------------------------------

    def linked(self) -> None:
        """A session is ready: Redis learns everyone here (names taken meanwhile included) and
        forgets what this instance held before and holds no more; the view is read anew."""
        self.ops.clear()
        self.thens.clear()
        self.rev = -1
        self._sync()
        self._tick()

    def unlinked(self) -> None:
        """The session was lost: what was asked is granted here (and checked when Redis is
        back), what was sent will be sent again in the next session's sync."""
        self.ops.clear()
        self.thens.clear()
        self.heard = None
        self.again = False
        for who, mine in list(self.mine.items()):
            mine.rev = 0
            ask = mine.asking
            if ask is not None:
                mine.asking = None
                self._grant(who, mine, ask, 0)

    def leave(self) -> None:
        """The server stops: every name of this instance's goes, with its alive key."""
        self.leaving = True
        self.ops.clear()
        self.thens.clear()
        self.link.run(APPLY_SHA, [*self.head, LEAVE], lambda reply: self._applied(reply, []))

    def closed(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def resubscribed(self) -> None:
        """The subscriber is back: announcements made meanwhile were missed."""
        self._tick()

    def announced(self, payload: bytes) -> None:
        """An announcement from the presence channel: taken in now, in revision order (and
        again after a full read that is on its way)."""
        head, _, body = payload.partition(b"\n")
        if not head.isdigit() or len(head) > 18:
            return
        rev, lines = int(head), body.split(b"\n")
        if self.heard is not None:
            if len(self.heard) < HEARD_MAX:
                self.heard.append((rev, lines))
            else:
                self.again = True
        if self.rev >= 0 and rev > self.rev + 1:
            self._tick()  # some were missed
        if rev > self.rev:
            self._take_in(rev, lines)

    # -- inside -----------------------------------------------------------------------------

    def _linked(self) -> bool:
        return self.link.state == LinkState.READY

    def _entry(self, mine: Mine, ask: Ask | None = None) -> bytes:
        if ask is not None:
            return b"%s %d %s %s" % (self.me, ask.since, ask.name, mine.room)
        return b"%s %d %s %s" % (self.me, mine.since, mine.name, mine.room)

    def _send(self, op: bytes, mine: Mine, dropped: bytes) -> None:
        """Tell Redis of ``mine`` now, if it can be reached (else the next session's sync
        will); ``dropped``: the skeleton it held before, if another."""
        if self._linked() and not self.leaving:
            skel = mine.skel
            self._queue(op, skel, self._entry(mine), dropped,
                        lambda result, rev: self._claimed(mine, skel, result, rev))

    def _queue(self, op: bytes, skel: bytes, entry: bytes, dropped: bytes,
               then: Callable[[object, int], None]) -> None:
        self.ops.append((op, skel, entry, dropped))
        self.thens.append(then)

    def _sync(self) -> None:
        mines = list(self.mine.values())
        args = [*self.head, SYNC]
        for mine in mines:
            args += (b"C", mine.skel, self._entry(mine), b"")
        thens = [self._claimer(mine) for mine in mines]
        self.link.run(APPLY_SHA, args, lambda reply: self._applied(reply, thens))

    def _claimer(self, mine: Mine) -> Callable[[object, int], None]:
        skel = mine.skel
        return lambda result, rev: self._claimed(mine, skel, result, rev)

    def _applied(self, reply: Any, thens: list[Callable[[object, int], None]]) -> None:
        if (type(reply) is not list or len(reply) != 2 or type(reply[0]) is not int
                or type(reply[1]) is not list or len(reply[1]) != len(thens)):
            raise Malformed
        rev, results = reply
        for then, result in zip(thens, results, strict=True):
            then(result, rev)

    def _claimed(self, mine: Mine, skel: bytes, result: object, rev: int) -> None:
        """Redis's answer to a claim (or a move) of ``mine``'s name ``skel``."""
        if mine.skel != skel or self.local.get(skel) is None or (
                self.mine.get(self.local[skel]) is not mine):
            return  # renamed or gone since: what came after it decides
        if result == 0:
            mine.rev = rev
            other = self.others.get(skel)
            if other is not None:
                if other.rev > rev:  # another instance claimed it after us: ask again
                    self._send(b"C", mine, b"")
                else:
                    self._drop_other(skel)
            return
        holder = self._holder(skel, result, rev)
        who = self.local.pop(skel)
        self.log.info("presence.lost", name=mine.name.decode(),
                      holder=holder.name.decode() if holder else None,
                      instance=holder.owner.decode() if holder else None)
        if self.on_lost is not None:
            self.on_lost(who, mine.name, holder.name if holder else mine.name)

    def _asked(self, who: Hashable, mine: Mine, ask: Ask, result: object, rev: int) -> None:
        if mine.asking is not ask:
            return  # (the session ended meanwhile: granted then)
        mine.asking = None
        if self.mine.get(who) is not mine:  # gone meanwhile: the name was taken for nobody
            if self.local.get(ask.skel) is who:
                del self.local[ask.skel]
            if result == 0:
                self._queue(b"D", ask.skel, b"", b"", _nothing)
            return
        if result == 0:
            self._grant(who, mine, ask, rev)
            return
        if self.local.get(ask.skel) is who:
            del self.local[ask.skel]
        holder = self._holder(ask.skel, result, rev)
        ask.answer(holder.name if holder is not None else ask.name)

    def _grant(self, who: Hashable, mine: Mine, ask: Ask, rev: int) -> None:
        if mine.skel != ask.skel and self.local.get(mine.skel) is who:
            del self.local[mine.skel]
        mine.name, mine.skel, mine.since, mine.rev = ask.name, ask.skel, ask.since, rev
        self.local[ask.skel] = who
        if rev:
            self._drop_other(ask.skel)
        ask.answer(None)

    def _holder(self, skel: bytes, result: object, rev: int) -> Entry | None:
        """The entry that holds ``skel``, from a refusal; the view takes it in."""
        if type(result) is not bytes:
            raise Malformed
        entry = self.rules.entry(result, skel, rev)
        if entry is not None and entry.owner != self.me:
            self._set_other(skel, entry)
            self._changed()
        return entry

    def _forget_local(self, who: Hashable, mine: Mine) -> None:
        if self.local.get(mine.skel) is who:
            del self.local[mine.skel]
        ask = mine.asking
        if ask is not None and self.local.get(ask.skel) is who:
            del self.local[ask.skel]

    # -- the view --------------------------------------------------------------------------

    def _tick_timer(self) -> None:
        self.timer = self.loop.call_later(self.ttl / 3, self._tick_timer)
        self._tick()

    def _tick(self) -> None:
        """Refresh this instance's key, free vanished instances' names, heal the view."""
        if not self._linked():
            return
        if self.heard is not None:
            self.again = True
            return
        self.heard = []
        self.link.run(TICK_SHA, [*self.head, b"%d" % self.rev], self._ticked)

    def _ticked(self, reply: Any) -> None:
        if (type(reply) is not list or len(reply) not in (3, 4)
                or not all(type(part) is int for part in reply[:3])):
            raise Malformed
        rev, existed, freed = reply[:3]
        heard, self.heard = self.heard or [], None
        if freed:
            self.log.info("presence.freed", names=freed)
        if len(reply) == 4:
            if type(reply[3]) is not list:
                raise Malformed
            self._read_all(rev, reply[3])
            for later, lines in heard:
                if later > self.rev:
                    if later != self.rev + 1:  # one was missed after the read: read again
                        self.again = True
                    self._take_in(later, lines)
        if not existed and self.mine:  # this instance's key had expired: its names may be gone
            self._sync()
        if self.again:
            self.again = False
            self._tick()

    def _read_all(self, rev: int, flat: list[Any]) -> None:
        """The view anew from a full read at revision ``rev``."""
        self.others.clear()
        self.by_room.clear()
        rules = self.rules
        for i in range(0, len(flat) - 1, 2):
            skel, value = flat[i], flat[i + 1]
            if type(skel) is not bytes or type(value) is not bytes:
                raise Malformed
            entry = rules.entry(value, skel, rev)
            if entry is None or entry.owner == self.me:
                continue
            if len(self.others) >= VIEW_MAX:
                break
            self._set_other(skel, entry)
            self._contest(skel, rev)
        self.rev = rev
        self._changed()

    def _take_in(self, rev: int, lines: list[bytes]) -> None:
        """One announcement: its changes, in order."""
        self.rev = rev
        rules = self.rules
        for line in lines:
            kind, _, rest = line.partition(b" ")
            skel, _, value = rest.partition(b" ")
            if kind == b"+":
                entry = rules.entry(value, skel, rev)
                if entry is None:
                    continue
                if entry.owner == self.me:
                    self._drop_other(skel)
                elif skel in self.others or len(self.others) < VIEW_MAX:
                    self._set_other(skel, entry)
                    self._contest(skel, rev)
            elif kind == b"-":
                other = self.others.get(skel)
                if other is not None and other.owner == value:
                    self._drop_other(skel)
        self._changed()

    def _contest(self, skel: bytes, rev: int) -> None:
        """Another instance holds ``skel`` as of ``rev``: if someone here had it confirmed
        before that, the scripts decide again (the earlier claim keeps it)."""
        who = self.local.get(skel)
        if who is None:
            return
        mine = self.mine[who]
        if mine.skel == skel and 0 < mine.rev <= rev:
            mine.rev = 0
            self._send(b"C", mine, b"")

    def _set_other(self, skel: bytes, entry: Entry) -> None:
        old = self.others.get(skel)
        if old is not None:
            self._unroom(skel, old.room)
        self.others[skel] = entry
        self.by_room.setdefault(self.rules.room_key(entry.room), {})[skel] = entry.name

    def _drop_other(self, skel: bytes) -> None:
        old = self.others.pop(skel, None)
        if old is not None:
            self._unroom(skel, old.room)

    def _unroom(self, skel: bytes, room: bytes) -> None:
        key = self.rules.room_key(room)
        people = self.by_room.get(key)
        if people is not None:
            people.pop(skel, None)
            if not people:
                del self.by_room[key]

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


def _nothing(result: object, rev: int) -> None:
    """What a drop waits for from Redis: nothing."""


class SharedDirectory(Directory):
    """Chat mode's directory with presence: its answers count every instance, and a name is
    granted only once the other instances had their say (``Presence.rename``). Made by the chat
    (``Chat(directory=...)``, a ``MakeDirectory``), from its members and rooms."""

    def __init__(self, members: Mapping[int, Member], rooms: Rooms, presence: Presence) -> None:
        super().__init__(members, rooms, shared=True)
        self.presence = presence

    # -- questions --------------------------------------------------------------------------

    def holder(self, name: bytes) -> bytes | None:
        """Someone here, or someone asking for it here, or someone on another instance."""
        here = super().holder(name)
        if here is not None:
            return here
        presence = self.presence
        asker = presence.local.get(presence.skeleton(name))  # (not its holder: found above)
        asked = presence.asking(asker) if asker is not None else None
        return asked if asked is not None else presence.elsewhere(name)

    def elsewhere(self, name: bytes) -> bool:
        return self.presence.elsewhere(name) is not None

    def who(self, room: Room) -> list[bytes]:
        return sorted(self.presence.names_in(room.name), key=bytes.lower)

    def asking(self, member: Member) -> bytes | None:
        return self.presence.asking(member)

    def rooms(self) -> list[tuple[bytes, int]]:
        """Every room someone is in, on any instance (and the lobby), lobby first."""
        lobby = self.local_rooms.lobby.name
        counts = self.presence.rooms()
        key = self.presence.rules.room_key
        first = counts.pop(key(lobby), (lobby, 0))
        return [first, *sorted(counts.values(), key=lambda room: room[0].lower())]

    # -- changes ----------------------------------------------------------------------------

    def ask(self, member: Member, name: bytes, answer: Callable[[bytes | None], None]) -> None:
        self.presence.rename(member, name, answer)

    def claim(self, member: Member) -> None:
        super().claim(member)
        self.presence.claim(member, member.name, member.room.name)

    def renamed(self, member: Member, old: bytes) -> None:
        super().renamed(member, old)
        if self.presence.name_of(member) != member.name:  # not asked for: a new name given
            self.presence.claim(member, member.name, member.room.name)

    def release(self, name: bytes) -> None:
        member = self.find(name)
        super().release(name)
        if member is not None:
            self.presence.release(member)

    def moved(self, member: Member, old: Room | None, new: Room | None) -> None:
        if old is not None and new is not None:
            self.presence.move(member, new.name)


def renaming(chat: Chat) -> Lost:
    """``Presence.on_lost`` in chat mode: a member who lost its name (still here) is told, and
    given a new one (``Chat.lost_name``)."""

    def lost(who: Hashable, name: bytes, holder: bytes) -> None:
        if isinstance(who, Member) and chat.members.get(who.client.fd) is who:
            chat.lost_name(who, holder)

    return lost
