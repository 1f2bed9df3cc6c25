"""The server's numbers, read once for both ``server.stats`` events and ``/metrics``.

Counting happens where the work happens, as plain integers of the hub's ``Counts`` and the loop
(one addition per message, never per recipient); the server's ``snapshot`` gathers them,
with what is derived from the live connections (states, queued bytes), into one ``Snapshot``.
The periodic ``server.stats`` event and the Prometheus collector both read that record, so the
two can never disagree on what a number means.

Rules it keeps:
- Counters only grow, from the server's start. ``select_share`` is the exception: the share of
  the time since the previous ``server.stats`` event that the loop spent waiting in ``select``.
- A snapshot costs O(connections): it is taken per interval or per scrape, never per message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from structlog.typing import FilteringBoundLogger

from fsmchat.net.loop import EventLoop, Timer


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The server's numbers at one moment: what ``server.stats`` and ``/metrics`` both read."""

    connections: dict[str, int]  # live connections by state
    accepted: int
    messages_in: int
    messages_out: int
    bytes_in: int
    bytes_out: int
    queued_bytes: int
    queued_max: int
    closed: dict[str, int]  # reason -> connections closed
    rejected: dict[str, int]  # reason -> connections turned away
    loop_turns: int
    select_seconds: float
    lines_cut: int
    history: int
    seconds: float
    start_time: float
    log_dropped: dict[str, int]  # level -> events dropped
    redis_published: int | None = None  # the redis_ ones with --redis only
    redis_received: int | None = None
    redis_dropped: int | None = None
    redis_missed: int | None = None
    redis_duplicates: int | None = None
    redis_oversize: int | None = None
    redis_gaps: int | None = None
    redis_skipped: int | None = None

    def fields(self) -> dict[str, object]:
        """The figures as an event's fields: those that apply (no redis_ ones standalone)."""
        return {key: value for key, value in asdict(self).items() if value is not None}


class StatsReporter:
    """Logs ``server.stats`` every ``interval`` seconds, on the loop's timers."""

    def __init__(self, take: Callable[[], Snapshot], loop: EventLoop, log: FilteringBoundLogger,
                 interval: float) -> None:
        self.take = take
        self.loop = loop
        self.log = log
        self.interval = interval
        self.since = time.monotonic()  # the previous report (or the start)
        self.select_since = loop.select_seconds
        self.timer: Timer | None = None
        self.stopped = False

    def start(self) -> None:
        if self.interval:
            self.timer = self.loop.call_later(self.interval, self._tick)

    def stop(self) -> None:
        """The server is stopping: the next report (if one falls due) is the last."""
        self.stopped = True

    def _tick(self) -> None:
        self.report()
        if not self.stopped:
            self.timer = self.loop.call_later(self.interval, self._tick)

    def report(self) -> None:
        """One ``server.stats`` event now (the interval's timer, or SIGUSR1)."""
        now = time.monotonic()
        record = self.take().fields()
        waited = float(record.pop("select_seconds"))  # type: ignore[arg-type]
        del record["start_time"]
        elapsed = now - self.since
        share = (waited - self.select_since) / elapsed if elapsed > 0 else 0.0
        record["select_share"] = round(min(1.0, share), 4)
        self.since, self.select_since = now, waited
        self.log.info("server.stats", **record)
