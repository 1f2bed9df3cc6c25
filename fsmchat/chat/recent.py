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
  builds new ones, with the time in front.
- A line larger than ``max_bytes`` on its own is not kept, and evicts nothing.
- ``Budget.order`` names the room of every line kept, oldest first. A line that leaves its room
  another way (the room's own ``limit``, or the room is gone) leaves its entry behind: the room
  counts such entries (``gone``), always its oldest ones, and they are skipped when reached, or
  compacted away once they outnumber the lines kept. With one room, its oldest entry is at the
  front: it is taken off at once, and nothing is left behind.
- A replayed line starts with a time (``HH:MM``), which no live line does (those start with
  ``<``, ``*`` or ``-> ``), and the frame's lines with ``*** ``, which no client can send.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime, tzinfo
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

    __slots__ = ("kept", "limit", "max_bytes", "nbytes", "order")

    def __init__(self, limit: int, max_bytes: int) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self.nbytes = 0  # of every line kept, in every room
        self.kept = 0  # lines kept, in every room
        self.order: deque[Recent] = deque()  # the room of each line kept (and of some gone)

    def evict(self) -> None:
        """The oldest line of all goes."""
        order = self.order
        while True:
            recent = order.popleft()
            if recent.gone:
                recent.gone -= 1  # its line went already
                continue
            recent.forget()
            return

    def compact(self) -> None:
        """Entries of lines that went another way, dropped (each room's are its oldest)."""
        order: deque[Recent] = deque()
        for recent in self.order:
            if recent.gone:
                recent.gone -= 1
            else:
                order.append(recent)
        self.order = order


class Recent:
    """One room's recent lines: (time, line) pairs, oldest first."""

    __slots__ = ("budget", "gone", "lines", "nbytes")

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.lines: deque[tuple[float, bytes]] = deque()
        self.nbytes = 0
        self.gone = 0  # this room's entries in budget.order whose lines went another way

    def add(self, data: bytes, lines: Sequence[bytes] = ()) -> None:
        """What was said to the room: ``data``, or the ``lines`` it joins."""
        now = time.time()
        if lines:
            for line in lines:
                self._add(now, line)
        else:
            self._add(now, data)

    def _add(self, now: float, line: bytes) -> None:
        budget = self.budget
        size = len(line)
        if size > budget.max_bytes:
            return
        if len(self.lines) >= budget.limit:
            self._drop_own()
        self.lines.append((now, line))
        self.nbytes += size
        budget.nbytes += size
        budget.kept += 1
        budget.order.append(self)
        while budget.nbytes > budget.max_bytes:
            budget.evict()

    def _drop_own(self) -> None:
        """The room's oldest line goes, for the room's own ``limit``."""
        self.forget()
        order = self.budget.order
        while order[0].gone:  # a room's gone entries are its oldest: the front one is one
            order.popleft().gone -= 1
        if order[0] is self:  # one room, or this room's turn: nothing is left behind
            order.popleft()
        else:
            self.gone += 1
            if len(order) > 2 * self.budget.kept + 64:
                self.budget.compact()

    def forget(self) -> None:
        """The oldest line goes (its entry in ``budget.order`` is the caller's business)."""
        size = len(self.lines.popleft()[1])
        self.nbytes -= size
        self.budget.nbytes -= size
        self.budget.kept -= 1

    def clear(self) -> None:
        """The room is gone: its lines go, their entries with them in time."""
        budget = self.budget
        budget.nbytes -= self.nbytes
        budget.kept -= len(self.lines)
        self.gone += len(self.lines)
        self.lines.clear()
        self.nbytes = 0
        if len(budget.order) > 2 * budget.kept + 64:
            budget.compact()

    def __len__(self) -> int:
        return len(self.lines)

    def framed(self, zone: tzinfo) -> list[bytes]:
        """The lines for a newcomer, framed, each after its time in ``zone``; none if empty."""
        if not self.lines:
            return []
        shown: dict[int, bytes] = {}  # minute -> "HH:MM "
        out = [HEADER]
        for when, line in self.lines:
            minute = int(when // 60)
            stamp = shown.get(minute)
            if stamp is None:
                stamp = shown[minute] = datetime.fromtimestamp(
                    minute * 60, zone).strftime("%H:%M ").encode()
            out.append(stamp + line)
        out.append(FOOTER)
        return out
