"""The hot events, rendered without structlog's chain, are the lines structlog would write.

``JsonHotEvents`` writes the events a busy server emits most straight into the stream; the
same calls through ``HotEvents`` go through the logger and its one JSON processor. Every field,
its order and its type must agree; only the timestamps differ.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fsmchat.ops.events import HotEvents, JsonHotEvents, hot_events, make_logger
from fsmchat.ops.logstream import LogStream
from fsmchat.reasons import Reason

Call = Callable[[HotEvents], None]


def lines(level: str, call: Call) -> tuple[list[bytes], list[bytes]]:
    """What ``call`` writes through the JSON hot events, and through the logger."""
    out: list[bytes] = []
    for fast in (True, False):
        buffer = io.BytesIO()
        stream = LogStream.memory(buffer)
        log = make_logger(stream, level, "json")
        events = hot_events(log) if fast else HotEvents(log)
        assert isinstance(events, JsonHotEvents) == fast
        call(events)
        stream.flush()
        out.append(buffer.getvalue())
    return out[0].splitlines(), out[1].splitlines()


def without_time(line: bytes) -> tuple[tuple[str, object], ...]:
    fields = orjson.loads(line)
    assert fields.pop("timestamp").endswith("Z")
    return tuple(fields.items())  # the order counts


CALLS: dict[str, Call] = {
    "received": lambda e: e.received(7, 64),
    "sent": lambda e: e.sent(7, 128, 4096),
    "state": lambda e: e.state(7, "reading", "draining", "hangup"),
    "accepted": lambda e: e.accepted(7, "127.0.0.1:50000", False),
    "accepted_web": lambda e: e.accepted(9, "[::1]:443", True, web=True),
    "closed": lambda e: e.closed(7, '"odd" peer\n', Reason.PEER_CLOSED, bytes_in=10,
                                 bytes_out=20, seconds=0.001),
}


@pytest.mark.parametrize("level", ["debug", "info", "warning"])
@pytest.mark.parametrize("name", list(CALLS))
def test_the_same_line_as_the_logger_writes(name: str, level: str) -> None:
    fast, reference = lines(level, CALLS[name])
    if level == "warning" or (level == "info" and name in ("received", "sent", "state")):
        assert reference == []
    else:
        assert len(reference) == 1
    if name in ("received", "sent", "state") and level != "debug":
        return  # the hub has no trace above debug: these are never called then
    assert [without_time(x) for x in fast] == [without_time(x) for x in reference]


@given(st.integers(min_value=0, max_value=1 << 40), st.integers(min_value=0, max_value=1 << 40),
       st.floats(min_value=0, max_value=1e6, allow_nan=False), st.text(max_size=40))
def test_any_numbers_and_peer_render_alike(size: int, queued: int, seconds: float,
                                           peer: str) -> None:
    def call(events: HotEvents) -> None:
        events.sent(3, size, queued)
        events.closed(3, peer, Reason.QUEUE_LIMIT, bytes_in=size, bytes_out=queued,
                      seconds=round(seconds, 3))

    fast, reference = lines("debug", call)
    assert len(fast) == 2
    assert [without_time(x) for x in fast] == [without_time(x) for x in reference]


def test_the_hub_has_a_trace_only_at_debug() -> None:
    for level, traced in (("debug", True), ("info", False)):
        events = hot_events(make_logger(LogStream.memory(io.BytesIO()), level, "json"))
        assert events.debug is traced
    console = hot_events(make_logger(LogStream.memory(io.BytesIO()), "debug", "console"))
    assert type(console) is HotEvents  # rendered for people by structlog, as every other event
