"""What a sync comes to (``streams.Sync``), its commands run against a real Redis: missed
entries delivered, the past kept for history, trimmed gaps found, pages, bad answers refused."""

from __future__ import annotations

from typing import Any

import pytest
from redis_harness import RedisServer

from fsmchat.redis.link import Malformed
from fsmchat.redis.streams import (
    PAGE,
    PUBLISH_SCRIPT,
    EntryId,
    Sync,
    Synced,
    entry_key,
    parse_live,
)

pytest_plugins = ["redis_harness"]

SET = b"fsmchat:t:streams"
ROOM = b"fsmchat:t:history:lobby"


def publish(redis: RedisServer, payload: bytes, length: int = 1000, stream: bytes = ROOM) -> None:
    redis.command("EVAL", PUBLISH_SCRIPT, "2", stream, SET, "t", str(length), payload)


def sync(redis: RedisServer, count: int, known: dict[bytes, tuple[EntryId, int]],
         high: EntryId | None) -> Synced:
    """A sync whose commands Redis answers at once, in order."""
    out: list[Synced] = []

    def ask(then: Any, *command: bytes) -> None:
        then(redis.command(*command))

    Sync(ask, SET, count=count, known=known, high=high, done=out.append).start()
    assert len(out) == 1, "done once"
    return out[0]


def ids(redis: RedisServer, stream: bytes = ROOM) -> list[bytes]:
    reply = redis.command("XRANGE", stream, "-", "+")
    assert isinstance(reply, list)
    out = []
    for entry in reply:
        assert isinstance(entry, list) and isinstance(entry[0], bytes)
        out.append(entry[0])
    return out


def later_ms(redis: RedisServer) -> int:
    reply = redis.command("TIME")
    assert isinstance(reply, list) and all(isinstance(part, bytes) for part in reply)
    seconds, micros = (int(part) for part in reply if isinstance(part, bytes))
    return seconds * 1000 + micros // 1000


def test_a_first_sync_is_the_past_and_a_later_one_what_was_missed(
        redis_server: RedisServer) -> None:
    for i in range(5):
        publish(redis_server, b"m%d" % i)
    first = sync(redis_server, 3, {}, None)
    assert [(entry.payload, entry.deliver) for entry in first.entries] == [
        (b"m2", False), (b"m3", False), (b"m4", False)], "the newest 3, oldest first"
    assert not first.gaps
    seen = ids(redis_server)
    last = entry_key(seen[-1])
    assert first.entries[-1].number == len(seen), "numbered 1, 2, 3, ... as they were added"
    for i in range(5, 8):
        publish(redis_server, b"m%d" % i)
    later = sync(redis_server, 3, {ROOM: (last, len(seen))}, last)
    assert [(entry.payload, entry.deliver) for entry in later.entries] == [
        (b"m5", True), (b"m6", True), (b"m7", True)]
    assert not later.gaps


def test_a_stream_that_trimmed_what_was_missed_is_a_gap(redis_server: RedisServer) -> None:
    publish(redis_server, b"seen", length=1)
    seen = ids(redis_server)[-1]
    said = 300
    for i in range(said):  # MAXLEN ~ 1 trims whole nodes: the seen one and some after it go
        publish(redis_server, b"after %d" % i, length=1)
    known = {ROOM: (entry_key(seen), 1)}
    done = sync(redis_server, 10, known, entry_key(seen))
    kept = ids(redis_server)
    assert [entry.key for entry in done.entries] == [entry_key(i) for i in kept]
    assert done.entries[-1].payload == b"after %d" % (said - 1)
    assert done.gaps == [(ROOM, said - len(kept), said - len(kept) + 2)], "lost: all but kept"


def test_nothing_trimmed_is_no_gap(redis_server: RedisServer) -> None:
    publish(redis_server, b"seen")
    seen = ids(redis_server)[-1]
    publish(redis_server, b"after")
    done = sync(redis_server, 10, {ROOM: (entry_key(seen), 1)}, entry_key(seen))
    assert [entry.payload for entry in done.entries] == [b"after"] and not done.gaps


def test_a_stream_never_heard_of_gives_what_came_after_the_newest_seen(
        redis_server: RedisServer) -> None:
    other = b"fsmchat:t:history:math"
    publish(redis_server, b"old", stream=other)
    publish(redis_server, b"in the lobby")
    high = ids(redis_server)[-1]
    # Ids of two streams compare by Redis's clock, to the millisecond: "new" must come in a
    # later one (entries of one millisecond in two streams cannot be told apart).
    while int(later_ms(redis_server)) <= entry_key(high)[0]:
        pass
    publish(redis_server, b"new", stream=other)
    done = sync(redis_server, 10, {}, entry_key(high))
    got = {(entry.stream, entry.payload, entry.deliver) for entry in done.entries}
    assert (other, b"new", True) in got and (other, b"old", False) in got
    assert (ROOM, b"in the lobby", False) in got


def test_an_entry_without_m_is_read_as_none_and_a_foreign_key_is_ignored(
        redis_server: RedisServer) -> None:
    redis_server.command("XADD", ROOM, "*", "other", "field")
    redis_server.command("HSET", SET, "fsmchat:t:not-a-stream", "1", ROOM, "x")
    redis_server.command("SET", "fsmchat:t:not-a-stream", "x")
    done = sync(redis_server, 10, {}, None)
    assert [entry.payload for entry in done.entries] == [None]


def test_what_was_missed_comes_in_pages_and_in_order(redis_server: RedisServer) -> None:
    publish(redis_server, b"seen")
    seen = ids(redis_server)[-1]
    said = [b"m%d" % i for i in range(2 * PAGE + 3)]
    for payload in said:
        publish(redis_server, payload, length=10 * PAGE)
    asked: list[bytes] = []
    out: list[Synced] = []

    def ask(then: Any, *command: bytes) -> None:
        asked.append(command[0])
        then(redis_server.command(*command))

    Sync(ask, SET, count=0, known={ROOM: (entry_key(seen), 1)}, high=entry_key(seen),
         done=out.append).start()
    assert [entry.payload for entry in out[0].entries] == said
    assert asked.count(b"XRANGE") == 2, asked  # a page in the first answer, two more
    assert not out[0].gaps


def test_the_newest_before_tells_a_gap_of_a_stream_never_heard_of(
        redis_server: RedisServer) -> None:
    publish(redis_server, b"before", length=1)
    high = entry_key(ids(redis_server)[-1])
    while later_ms(redis_server) <= high[0]:
        pass
    publish(redis_server, b"after", length=1)
    done = sync(redis_server, 0, {}, high)
    assert [entry.payload for entry in done.entries] == [b"after"] and not done.gaps, (
        "numbered right after the one before: nothing went")


@pytest.mark.parametrize("reply", [
    b"nonsense", [b"x"], [[b"1", b"2"], [b"s"]], [[b"x", b"2"], []], [[b"1"], []],
])
def test_a_malformed_list_is_refused(reply: object) -> None:
    def ask(then: Any, *command: bytes) -> None:
        then(reply)

    with pytest.raises(Malformed):
        Sync(ask, SET, count=1, known={}, high=None, done=lambda done: None).start()


@pytest.mark.parametrize("reply", [
    b"nonsense", [[], []], [[], [[b"1-1"]], []], [[], [[1, []]], []], [[], [[b"x-y", []]], []],
])
def test_a_malformed_stream_answer_is_refused(reply: object) -> None:
    answers = iter([[[b"1", b"0"], [ROOM, b"1"]], reply])

    def ask(then: Any, *command: bytes) -> None:
        then(next(answers))

    with pytest.raises(Malformed):
        Sync(ask, SET, count=1, known={}, high=None, done=lambda done: None).start()


def test_a_live_message_names_its_stream_and_entry() -> None:
    assert parse_live(b"fsmchat1s k 17-3 9\nrest") == (b"k", (17, 3), 9, 19)
    for bad in (b"fsmchat1s k 1-1\nrest", b"fsmchat1s k 1-x 2\n", b"fsmchat1s k 1-1 x\n",
                b"fsmchat1s k 1-1 1"):
        assert parse_live(bad) is None
