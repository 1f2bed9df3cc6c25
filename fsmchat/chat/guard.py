"""The throttle: wrong passwords make the next try wait, longer each time, so guessing does not pay.

Each wrong try is counted against keys (the address it came from, the account name it was for,
for the join password the address alone); after the n-th wrong try in a row, no try for any of
those keys is even checked for ``base * 2**(n-1)`` seconds, at most ``cap``: 1, 2, 4, ... 60 s
by default. With the cap, one name can be guessed at most once a minute whatever the number of
addresses, and one address can guess once a minute whatever the number of names: some 1,400
guesses a day, against a password.

Rules it keeps:
- A try during the wait is refused before any hash is computed: waiting costs the server
  nothing (``wait``), and a right password during the wait is refused like a wrong one.
- A key quiet for ``forget`` seconds after its wait ends starts again from one second; a right
  password forgives its account name at once (``forgive``), never the address, so one's own
  account cannot be used to reset an address that guesses at others.
- The memory is bounded: at most ``max_keys`` keys are kept, the least recently failed dropped
  first, and keys past their forgetting are dropped as they come up (oldest first).
- No clock is read but the one given, so the arithmetic is testable without sleeping.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

BASE_DELAY = 1.0
"""Seconds the first wrong try makes the next one wait."""

MAX_DELAY = 60.0
"""Seconds a wait lasts at most, however many wrong tries came before: the owner of a name that
someone keeps guessing waits at most this long for a try of their own."""

FORGET_AFTER = 15 * 60.0
"""Seconds without a wrong try, after the wait, after which a key starts over."""

MAX_KEYS = 100_000
"""Keys remembered at most (a few MB): past it, the one that failed least recently goes."""


@dataclass(slots=True)
class _Record:
    failures: int  # wrong tries in a row
    until: float  # no try before this time (the clock's)


class Throttle:
    """Wrong tries per key, and how long the next try must wait."""

    def __init__(self, base: float = BASE_DELAY, cap: float = MAX_DELAY,
                 forget: float = FORGET_AFTER, max_keys: int = MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base = base
        self.cap = cap
        self.forget = forget
        self.max_keys = max_keys
        self.clock = clock
        self.records: dict[Hashable, _Record] = {}  # least recently failed first

    def __len__(self) -> int:
        return len(self.records)

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` wrong tries in a row."""
        if failures <= 0:
            return 0.0
        return min(self.cap, self.base * 2.0 ** min(failures - 1, 64))

    def wait(self, *keys: Hashable) -> float:
        """Seconds before a try for all of ``keys`` may be checked (0: now)."""
        now = self.clock()
        self._prune(now)
        records = self.records
        longest = 0.0
        for key in keys:
            record = records.get(key)
            if record is not None and record.until > now:
                longest = max(longest, record.until - now)
        return longest

    def failed(self, *keys: Hashable) -> float:
        """A wrong try for ``keys``: each one's count goes up; the wait it makes (the longest)."""
        now = self.clock()
        self._prune(now)
        records = self.records
        longest = 0.0
        for key in keys:
            record = records.pop(key, None)  # (taken out: put back last, the most recent)
            if record is None or now >= record.until + self.forget:
                record = _Record(0, now)
            record.failures += 1
            record.until = now + self.delay(record.failures)
            records[key] = record
            longest = max(longest, record.until - now)
        while len(records) > self.max_keys:
            del records[next(iter(records))]
        return longest

    def forgive(self, key: Hashable) -> None:
        """A right password for ``key``: its wrong tries are forgotten."""
        self.records.pop(key, None)

    def _prune(self, now: float) -> None:
        """Drop the keys at the front (the least recently failed) whose forgetting has come."""
        records = self.records
        forget = self.forget
        while records:
            key = next(iter(records))
            if now < records[key].until + forget:
                return
            del records[key]


def seconds(wait: float) -> int:
    """A wait as people are told it: whole seconds, rounded up (never 0 for a wait)."""
    return max(1, math.ceil(wait - 1e-9))
