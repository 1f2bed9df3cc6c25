"""History per room: each room's recent lines with their times, and the framed replay.

Every room keeps its last ``limit`` public lines (``Recent``); all rooms together keep at most
``max_bytes`` bytes (``Budget``), so a chat of many rooms holds no more than a chat of one:
past the budget, the oldest line of all goes first, whichever room it is in. A newcomer to a
room is given its lines framed (``framed``), each with the time it was said::

    *** recent messages:
    14:02 <alice> hi
    14:03 * bob waves
    *** end of recent messages

Rules it keeps:
- The lines kept are the very bytes objects queued to the room (no copy); only the replay
  builds new ones, with the time in front. Times are kept per minute, as runs of lines
  (``Recent.stamps``), since the replay shows no more; message ids (``Hub.msg_id``) as runs
  of the lines each message joins (``Recent.ids``), so that a page that comes back can be
  given what it missed (``after``).
- A line larger than ``max_bytes`` on its own is not kept, and evicts nothing.
- ``Budget.order`` holds runs of lines, oldest first, each naming its room: what the budget
  evicts from when it is over. A line that leaves its room another way (the room's own
  ``limit``, or the room is gone) is counted in its room's ``ahead`` until its run is reached
  (``settle``), or compacted away once such lines outnumber the lines kept (``compact``): a
  room's lines that went are always its oldest. With one room, or when the room's lines are the
  oldest of all, its run at the front is shortened at once and nothing is left behind.
- The common case costs what plain history did, per line: an append, and the oldest line let go
  (``tests/test_recent.py`` checks every case against the rule written the slow way).
- A replayed line starts with a time (``HH:MM``), which no live line does (those start with
  ``<``, ``*`` or ``-> ``), and the frame's lines with ``*** ``, which no client can send.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

HEADER = b"*** recent messages:\n"
FOOTER = b"*** end of recent messages\n"


def time_zone(name: str) -> tzinfo:
    """The zone ``--tz`` names (an IANA name such as ``Europe/Paris``, or ``UTC``); ValueError
    if there is none of that name."""
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None


class Budget:
    """What every room's history holds together: ``limit`` lines per room, ``max_bytes`` in all."""

    __slots__ = ("ahead", "kept", "limit", "max_bytes", "nbytes", "order")

    def __init__(self, limit: int, max_bytes: int) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self.nbytes = 0  # of every line kept, in every room
        self.kept = 0  # lines kept, in every room
        self.ahead = 0  # lines gone from their rooms whose entries are still in ``order``
        self.order: deque[list[Any]] = deque()  # [room's Recent, lines]: runs, oldest first

    def evict(self) -> None:
        """The oldest lines of all go, until the rest fits ``max_bytes``."""
        order = self.order
        while self.nbytes > self.max_bytes:
            entry = order[0]
            recent: Recent = entry[0]
            if recent.ahead:
                self._settle(entry)
                continue
            size = len(recent.lines.popleft())
            recent.nbytes -= size
            recent.unstamp(1)
            self.nbytes -= size
            self.kept -= 1
            entry[1] -= 1
            if not entry[1]:
                order.popleft()

    def settle(self) -> None:
        """Entries at the front whose lines went another way, taken off."""
        order = self.order
        while order and order[0][0].ahead:
            self._settle(order[0])
        if self.ahead > self.kept + 64:
            self.compact()

    def _settle(self, entry: list[Any]) -> None:
        recent: Recent = entry[0]
        done = min(recent.ahead, entry[1])
        recent.ahead -= done
        self.ahead -= done
        entry[1] -= done
        if not entry[1]:
            self.order.popleft()

    def compact(self) -> None:
        """Every entry's lines that went another way taken off (each room's are its oldest)."""
        order: deque[list[Any]] = deque()
        for entry in self.order:
            recent: Recent = entry[0]
            done = min(recent.ahead, entry[1])
            recent.ahead -= done
            entry[1] -= done
            if entry[1]:
                order.append(entry)
        self.order = order
        self.ahead = 0


class Recent:
    """One room's recent lines, oldest first, the minutes they were said in and the ids of the
    messages they were."""

    __slots__ = ("ahead", "budget", "ids", "lines", "nbytes", "stamps")

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.lines: deque[bytes] = deque()
        self.stamps: deque[list[int]] = deque()  # [minute, lines]: runs of lines, oldest first
        self.ids: deque[list[Any]] = deque()  # [message id, lines]: one run per message
        self.nbytes = 0
        self.ahead = 0  # lines gone from here whose entries are still in budget.order

    def add(self, data: bytes, lines: Sequence[bytes] = (), msg_id: bytes = b"",
            minute: int | None = None) -> None:
        """What was said to the room: ``data``, or the ``lines`` it joins (whole: their sizes
        add up to ``data``'s), the message ``msg_id`` (b"": one without), said in ``minute``
        (minutes since the epoch; None: now). The common case (the room at its ``limit``, one
        room or this one's lines the oldest of all) takes two calls: ``time.time`` and
        ``_drop``."""
        budget = self.budget
        size = len(data)
        if size > budget.max_bytes:  # some line may not fit on its own: one by one
            for line in lines or (data,):
                if len(line) <= budget.max_bytes:
                    self.add(line, (), msg_id, minute)
            return
        kept = self.lines
        if lines:
            kept.extend(lines)
            count = len(lines)
        else:
            kept.append(data)
            count = 1
        self.nbytes += size
        self._mark(count, msg_id, minute)
        order = budget.order
        if order and order[-1][0] is self:
            order[-1][1] += count
        else:
            order.append([self, count])
        budget.nbytes += size
        budget.kept += count
        excess = len(kept) - budget.limit
        if excess > 0:
            self._drop(excess)
        if budget.nbytes > budget.max_bytes:
            budget.evict()

    def _mark(self, count: int, msg_id: bytes, minute: int | None) -> None:
        """The ``count`` newest lines are of message ``msg_id``, said in ``minute``."""
        if minute is None:
            minute = int(time.time() // 60)
        ids = self.ids
        if ids and msg_id and ids[-1][0] == msg_id:  # (a message too large, line by line)
            ids[-1][1] += count
        else:
            ids.append([msg_id, count])
        stamps = self.stamps
        if stamps and stamps[-1][0] == minute:
            stamps[-1][1] += count
        else:
            stamps.append([minute, count])

    def _drop(self, count: int) -> None:
        """The room's ``count`` oldest lines go, for its own ``limit``."""
        kept = self.lines
        budget = self.budget
        gone = 0
        for _ in range(count):
            gone += len(kept.popleft())
        self.nbytes -= gone
        budget.nbytes -= gone
        budget.kept -= count
        self.unstamp(count)
        front = budget.order[0]
        if front[0] is self and not self.ahead and front[1] > count:
            front[1] -= count  # their entry is the oldest of all: nothing left behind
        else:
            self.ahead += count
            budget.ahead += count
            budget.settle()

    def unstamp(self, count: int) -> None:
        """The ``count`` oldest lines went: their minutes and ids too."""
        _shorten(self.stamps, count)
        _shorten(self.ids, count)

    def clear(self) -> None:
        """The room is gone: its lines go, their entries with them in time."""
        count = len(self.lines)
        budget = self.budget
        budget.nbytes -= self.nbytes
        budget.kept -= count
        self.ahead += count
        budget.ahead += count
        self.lines.clear()
        self.stamps.clear()
        self.ids.clear()
        self.nbytes = 0
        budget.settle()

    def __len__(self) -> int:
        return len(self.lines)

    def framed(self, zone: tzinfo) -> list[bytes]:
        """The lines for a newcomer, framed, each after its time in ``zone``; none if empty."""
        if not self.lines:
            return []
        return [HEADER, *self.stamped(zone), FOOTER]

    def stamped(self, zone: tzinfo, skip: int = 0) -> list[bytes]:
        """The lines but the ``skip`` oldest, each after its time in ``zone``."""
        out: list[bytes] = []
        lines = iter(self.lines)
        for minute, count in self.stamps:
            if skip >= count:
                skip -= count
                for _ in range(count):
                    next(lines)
                continue
            stamp = datetime.fromtimestamp(minute * 60, zone).strftime("%H:%M ").encode()
            for _ in range(skip):
                next(lines)
            out.extend(stamp + next(lines) for _ in range(count - skip))
            skip = 0
        return out

    def missed(self, seen: Sequence[bytes],
               zone: tzinfo) -> list[tuple[bytes, list[bytes]]] | None:
        """What a client that showed the messages ``seen`` (ids, the newest last) missed: the
        messages after the newest of them found here, but those it showed (two instances may
        have seen messages said at the same moment in two orders), each as (its id, its lines
        after their time in ``zone``). None when none of ``seen`` is here any more: the gap is
        older than the history."""
        wanted = set(seen)
        found = None
        for index, (msg_id, _) in enumerate(self.ids):
            if msg_id in wanted:
                found = index
        if found is None:
            return None
        stamps = [stamp for minute, count in self.stamps
                  for stamp in [datetime.fromtimestamp(minute * 60, zone).strftime(
                      "%H:%M ").encode()] * count]
        lines = list(self.lines)
        out = []
        first = 0
        for index, (msg_id, count) in enumerate(self.ids):
            if index > found and msg_id not in wanted:
                out.append((msg_id, [stamps[i] + lines[i]
                                     for i in range(first, first + count)]))
            first += count
        return out


def _shorten(runs: deque[list[Any]], count: int) -> None:
    """Runs ``[value, lines]``, oldest first, without their ``count`` oldest lines."""
    while count:
        run = runs[0]
        if run[1] > count:
            run[1] -= count
            return
        count -= run[1]
        runs.popleft()
