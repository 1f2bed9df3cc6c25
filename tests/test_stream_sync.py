"""What a sync's answer comes to (``streams.read_sync``), and the sync script against a real
Redis: missed entries delivered, the past kept for history, trimmed gaps found, bad answers
refused."""

from __future__ import annotations

import pytest
from redis_harness import RedisServer

from fsmchat.redis.link import Malformed
from fsmchat.redis.streams import (
    PUBLISH_SCRIPT,
    SYNC_SCRIPT,
    entry_key,
    parse_live,
    read_sync,
)

pytest_plugins = ["redis_harness"]

SET = b"fsmchat:t:streams"
ROOM = b"fsmchat:t:history:lobby"


def publish(redis: RedisServer, payload: bytes, length: int = 1000, stream: bytes = ROOM) -> None:
    redis.command("EVAL", PUBLISH_SCRIPT, "2", stream, SET, "t", str(length), payload)


def sync(redis: RedisServer, count: int, high: bytes = b"", *known: bytes) -> object:
    return redis.command("EVAL", SYNC_SCRIPT, "1", SET, str(count), high, *known)


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
    first = read_sync(sync(redis_server, 3), {}, None)
    assert [(entry.payload, entry.deliver) for entry in first.entries] == [
        (b"m2", False), (b"m3", False), (b"m4", False)], "the newest 3, oldest first"
    assert not first.gaps
    seen = ids(redis_server)
    last = entry_key(seen[-1])
    assert first.entries[-1].number == len(seen), "numbered 1, 2, 3, ... as they were added"
    for i in range(5, 8):
        publish(redis_server, b"m%d" % i)
    later = read_sync(sync(redis_server, 3, b"", ROOM, seen[-1]), {ROOM: (last, len(seen))},
                      last)
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
    done = read_sync(sync(redis_server, 10, b"", ROOM, seen), known, entry_key(seen))
    kept = ids(redis_server)
    assert [entry.key for entry in done.entries] == [entry_key(i) for i in kept]
    assert done.entries[-1].payload == b"after %d" % (said - 1)
    assert done.gaps == [(ROOM, said - len(kept), said - len(kept) + 2)], "lost: all but kept"


def test_nothing_trimmed_is_no_gap(redis_server: RedisServer) -> None:
    publish(redis_server, b"seen")
    seen = ids(redis_server)[-1]
    publish(redis_server, b"after")
    done = read_sync(sync(redis_server, 10, b"", ROOM, seen), {ROOM: (entry_key(seen), 1)},
                     entry_key(seen))
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
    done = read_sync(sync(redis_server, 10, high), {}, entry_key(high))
    got = {(entry.stream, entry.payload, entry.deliver) for entry in done.entries}
    assert (other, b"new", True) in got and (other, b"old", False) in got
    assert (ROOM, b"in the lobby", False) in got


def test_an_entry_without_m_is_read_as_none_and_a_foreign_key_is_ignored(
        redis_server: RedisServer) -> None:
    redis_server.command("XADD", ROOM, "*", "other", "field")
    redis_server.command("HSET", SET, "fsmchat:t:not-a-stream", "1", ROOM, "1")
    redis_server.command("SET", "fsmchat:t:not-a-stream", "x")
    done = read_sync(sync(redis_server, 10), {}, None)
    assert [entry.payload for entry in done.entries] == [None]


@pytest.mark.parametrize("reply", [
    b"nonsense", [b"x"], [[b"s", b"0-0", [], b"bad"]], [[b"s", b"x-y", [], []]],
    [[b"s", b"0-0", [[b"1-1"]], []]], [[1, b"0-0", [], []]],
])
def test_a_malformed_answer_is_refused(reply: object) -> None:
    with pytest.raises(Malformed):
        read_sync(reply, {}, (0, 0))


def test_a_live_message_names_its_stream_and_entry() -> None:
    assert parse_live(b"fsmchat1s k 17-3 9\nrest") == (b"k", (17, 3), 9, 19)
    for bad in (b"fsmchat1s k 1-1\nrest", b"fsmchat1s k 1-x 2\n", b"fsmchat1s k 1-1 x\n",
                b"fsmchat1s k 1-1 1"):
        assert parse_live(bad) is None
