"""The server's numbers, read once for both ``server.stats`` events and ``/metrics``.

Counting happens where the work happens, as plain integer attributes of the server and the loop
(one addition per message, never a per-recipient step); ``snapshot`` gathers them, with what is
derived from the live connections (states, queued bytes), into one flat record. The periodic
``server.stats`` event and the Prometheus collector both read that record, so the two can never
disagree on what a number means.

Rules it keeps:
- Counters only grow, from the server's start. ``select_share`` is the exception: the share of
  the time since the previous ``server.stats`` event that the loop spent waiting in ``select``.
- A snapshot costs O(connections): it is taken per interval or per scrape, never per message.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from fsmchat.lifecycle import LIVE

if TYPE_CHECKING:
    from fsmchat.server import ChatServer

Snapshot = dict[str, Any]


def snapshot(server: ChatServer) -> Snapshot:
    live = list(server.connections.values())
    states = Counter(conn.state for conn in live)
    queued = [conn.queue.nbytes for conn in live]
    record: Snapshot = {
        "connections": {str(state): states.get(state, 0) for state in LIVE},
        "accepted": server.accepted,
        "messages_in": server.messages_in,
        "messages_out": server.messages_out,
        "bytes_in": server.bytes_in + sum(conn.bytes_in for conn in live),
        "bytes_out": server.bytes_out + sum(conn.bytes_out for conn in live),
        "queued_bytes": sum(queued),
        "queued_max": max(queued, default=0),
        "closed": dict(server.closed),
        "rejected": dict(server.rejected),
        "loop_turns": server.loop.turns,
        "select_seconds": server.loop.select_seconds,
        "lines_cut": server.chat.cuts() if server.chat is not None else 0,
        "history": len(server.history) if server.history is not None else 0,
        "seconds": round(time.monotonic() - server.started, 3),
        "start_time": server.start_time,
        "log_dropped": dict(server.log_stream.dropped) if server.log_stream is not None else {},
    }
    if server.bus is not None:
        record.update(server.bus.totals())
    return record


class StatsReporter:
    """Logs ``server.stats`` every ``interval`` seconds, on the loop's timers."""

    def __init__(self, server: ChatServer, interval: float) -> None:
        self.server = server
        self.interval = interval
        self.since = time.monotonic()  # the previous report (or the start)
        self.select_since = server.loop.select_seconds

    def start(self) -> None:
        self.server.loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        self.report()
        if not self.server.stopping:
            self.server.loop.call_later(self.interval, self._tick)

    def report(self) -> None:
        """One ``server.stats`` event now (the interval's timer, or SIGUSR1)."""
        now = time.monotonic()
        record = snapshot(self.server)
        waited = record.pop("select_seconds")
        del record["start_time"]
        elapsed = now - self.since
        share = (waited - self.select_since) / elapsed if elapsed > 0 else 0.0
        record["select_share"] = round(min(1.0, share), 4)
        self.since, self.select_since = now, waited
        self.server.log.info("server.stats", **record)
