"""The bus's bookkeeping, in process: the envelope, repeats and gaps, the outbox and its window.

The black-box tests (``test_redis.py``) run real instances against a real Redis; these pin down
what is hard to provoke from outside: a reply lost with the link, a repeat, a gap, the exact
bound of the outbox. The links are driven through their machine; what a publish link sends is
read from the other end of a socketpair and parsed with hiredis, as Redis would parse it.
"""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator

import hiredis
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fsmchat.lifecycle import LinkState
from fsmchat.net.loop import EventLoop
from fsmchat.ops.events import make_logger
from fsmchat.ops.logstream import LogStream
from fsmchat.redis.bus import (
    DROP_REPORT,
    ENVELOPE,
    GAP_MAX,
    GAPS_MAX,
    REPEATS_MAX,
    PublishLink,
    SubscribeLink,
    unpack,
)
from fsmchat.redis.link import RedisAddress, RedisLink

ORIGIN = b"00112233aabbccdd"
OTHER = b"ffeeddccbbaa9988"


class Harness:
    """A loop, a log that can be read back, and links that are forgotten at the end."""

    def __init__(self) -> None:
        self.loop = EventLoop()
        self.out = io.BytesIO()
        self.sink = LogStream.memory(self.out)
        self.log = make_logger(self.sink, "debug", "json")
        self.links: list[RedisLink] = []
        self.pairs: list[tuple[socket.socket, socket.socket]] = []

    def publisher(self, outbox_limit: int = 1 << 20) -> PublishLink:
        link = PublishLink(RedisAddress("127.0.0.1"), self.loop, self.log, channel=b"chat",
                           origin=ORIGIN, outbox_limit=outbox_limit)
        self.links.append(link)
        return link

    def subscriber(self, delivered: list[bytes]) -> SubscribeLink:
        def deliver(data: bytes, msg_id: bytes) -> bool:
            delivered.append(data)
            return False

        link = SubscribeLink(RedisAddress("127.0.0.1"), self.loop, self.log, channel=b"chat",
                             origin=ORIGIN, deliver=deliver, payload_limit=1 << 20)
        self.links.append(link)
        return link

    def connect(self, link: RedisLink) -> socket.socket:
        """Put the link in ``ready`` on one end of a socketpair; return the 'Redis' end."""
        if link.retry_timer is not None:  # it is this reconnect
            link.retry_timer.cancel()
            link.retry_timer = None
        ours, theirs = socket.socketpair()
        self.pairs.append((ours, theirs))
        ours.setblocking(False)
        link.sock, link.fd = ours, ours.fileno()
        self.loop.register(link.fd, link, read=False)
        link.machine.set_state(str(LinkState.READY), model=link)
        link.ready()
        return theirs

    def events(self, name: str) -> list[dict[str, object]]:
        self.sink.flush()
        lines = [orjson.loads(line) for line in self.out.getvalue().splitlines()]
        return [e for e in lines if e["event"] == name]

    def close(self) -> None:
        for link in self.links:
            if link in link.machine.models:
                link.machine.remove_model(link)
        for pair in self.pairs:
            for sock in pair:
                sock.close()


@pytest.fixture
def bus() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.close()


def published(link: PublishLink, redis_end: socket.socket) -> list[list[bytes]]:
    """Flush the link into the socketpair and parse every command Redis would see."""
    while link.queue:
        link.flush()
    reader = hiredis.Reader()
    redis_end.setblocking(False)
    try:
        while chunk := redis_end.recv(1 << 20):
            reader.feed(chunk)
    except BlockingIOError:
        pass
    commands = []
    while (command := reader.gets()) is not False:
        commands.append(command)
    return commands


@given(st.binary(max_size=2048))
def test_a_message_crosses_the_envelope_unchanged(data: bytes) -> None:
    harness = Harness()
    try:
        link = harness.publisher()
        redis_end = harness.connect(link)
        link.publish(data)
        [command] = published(link, redis_end)
        assert command[:2] == [b"PUBLISH", b"chat"]
        assert unpack(command[2]) == (ORIGIN, 1, None, data)
    finally:
        harness.close()


@pytest.mark.parametrize("payload", [
    b"hello", b"", ENVELOPE, ENVELOPE + b"abc\n", ENVELOPE + b"a b c\nx", ENVELOPE + b"a -1\nx",
    ENVELOPE + b"a 1" + b" " * 80 + b"\nx",
])
def test_a_payload_without_a_whole_envelope_is_foreign_and_kept_whole(payload: bytes) -> None:
    assert unpack(payload) == (None, 0, None, payload)


def test_repeats_and_own_messages_are_dropped_and_gaps_counted(bus: Harness) -> None:
    delivered: list[bytes] = []
    link = bus.subscriber(delivered)
    bus.connect(link)
    sent = [(OTHER, 1), (OTHER, 2), (OTHER, 2), (ORIGIN, 3), (OTHER, 5), (OTHER, 3), (OTHER, 5),
            (OTHER, 3), (OTHER, 6)]
    for origin, seq in sent:
        link.on_reply([b"message", b"chat", b"%s%s %d\n%d" % (ENVELOPE, origin, seq, seq)])
    link.on_reply([b"message", b"chat", b"from redis-cli"])
    assert delivered == [b"1", b"2", b"5", b"3", b"6", b"from redis-cli"], "3 came late"
    assert (link.received, link.duplicates, link.missed) == (6, 3, 1), "4 never came"
    [missed] = bus.events("redis.missed")
    assert missed["origin"] == OTHER.decode() and missed["messages"] == 2


def test_the_first_message_of_an_instance_is_no_gap(bus: Harness) -> None:
    """An instance that joins late starts wherever the sender's numbering is."""
    delivered: list[bytes] = []
    link = bus.subscriber(delivered)
    bus.connect(link)
    link.on_reply([b"message", b"chat", b"%s%s 41\nx" % (ENVELOPE, OTHER)])
    assert delivered == [b"x"] and link.missed == 0


def test_what_redis_did_not_confirm_is_sent_again_first_and_in_order(bus: Harness) -> None:
    link = bus.publisher()
    redis_end = bus.connect(link)
    for i in range(5):
        link.publish(b"m%d" % i)
    assert [unpack(c[2])[1] for c in published(link, redis_end)] == [1, 2, 3, 4, 5]
    link.on_reply(1)
    link.on_reply(1)  # Redis took 1 and 2; the link is lost before 3, 4 and 5 are confirmed
    link.lose("test")
    link.publish(b"m5")
    assert [message[0] for message in link.unsent] == [3, 4, 5, 6]
    redis_end = bus.connect(link)
    assert published(link, redis_end) == [[b"PUBSUB", b"NUMSUB", b"chat"]]
    link.on_reply([b"chat", 1])  # the one subscriber that heard 1 and 2 is back
    again = [unpack(c[2]) for c in published(link, redis_end)]
    assert [(origin, seq, data) for origin, seq, _, data in again] == [
        (ORIGIN, 3, b"m2"), (ORIGIN, 4, b"m3"), (ORIGIN, 5, b"m4"), (ORIGIN, 6, b"m5")]
    assert all(said is not None for _, _, said, _ in again), "each is marked as delayed"
    assert link.published == 2


def test_the_outbox_keeps_the_newest_within_its_bound(bus: Harness) -> None:
    limit = 64 * 1024
    link = bus.publisher(outbox_limit=limit)
    size = 1000
    for i in range(200):
        link.publish(b"%04d" % i + b"x" * (size - 4))
    kept = [message[3][:4] for message in link.unsent]
    assert kept == [b"%04d" % i for i in range(200 - len(kept), 200)]
    assert link.unsent_bytes <= limit < link.unsent_bytes + size + 100
    assert link.dropped == 200 - len(kept)
    reports = bus.events("redis.dropped")
    assert len(reports) == 1, "a burst of drops is one warning until the next report is due"
    bus.loop.run_timers(time.monotonic() + DROP_REPORT)
    reports = bus.events("redis.dropped")
    assert sum(int(str(r["messages"])) for r in reports) == link.dropped
    assert {r["reason"] for r in reports} == {"outbox_full"}


def test_no_more_than_a_window_waits_for_replies(bus: Harness) -> None:
    link = bus.publisher(outbox_limit=128 * 1024)
    redis_end = bus.connect(link)
    for _ in range(100):
        link.publish(b"y" * 1000)
    assert link.inflight_bytes < link.window + 1100 and link.unsent
    first = len(published(link, redis_end))
    for _ in range(first):
        link.on_reply(2)
    assert len(published(link, redis_end)) > 0, "replies let the next messages go"
    assert link.audience == 2


def test_after_an_outage_the_outbox_waits_for_the_audience(bus: Harness) -> None:
    link = bus.publisher()
    redis_end = bus.connect(link)
    link.publish(b"before")
    published(link, redis_end)
    link.on_reply(3)  # three subscribers heard it
    link.lose("test")
    link.publish(b"during")
    redis_end = bus.connect(link)
    assert published(link, redis_end) == [[b"PUBSUB", b"NUMSUB", b"chat"]]
    link.on_reply([b"chat", 1])
    assert bus.events("redis.holding")[0]["expected"] == 3
    bus.loop.run_timers(time.monotonic() + 1)
    assert published(link, redis_end) == [[b"PUBSUB", b"NUMSUB", b"chat"]]
    link.on_reply([b"chat", 3])
    [command] = published(link, redis_end)
    _, _, said, data = unpack(command[2])
    assert data == b"during" and said is not None
    assert abs(said / 1000 - time.time()) < 60, "said: when it was said, in ms"
    assert bus.events("redis.flushing")[0]["subscribers"] == 3


@pytest.mark.parametrize("envelope", [
    ENVELOPE + b"\xff" * 16 + b" 1\n",  # an id that is not text: once decoded in log arguments
    ENVELOPE + b"FFEEDDCCBBAA9988 1\n",  # not the hex new_origin writes
    ENVELOPE + OTHER[:15] + b" 1\n",
    ENVELOPE + OTHER + b" " + b"9" * 20 + b"\n",  # more than the logs' 64-bit integers hold
    ENVELOPE + OTHER + b" +1\n",
    ENVELOPE + OTHER + b" 1 \n",  # a time without digits
    ENVELOPE + OTHER + b" 1 " + b"9" * 16 + b"\n",  # a time past the year 30000
])
def test_an_envelope_with_a_field_out_of_shape_is_foreign(envelope: bytes) -> None:
    assert unpack(envelope + b"x") == (None, 0, None, envelope + b"x")


def message(origin: bytes, seq: int, data: bytes = b"m") -> list[bytes]:
    return [b"message", b"chat", b"%s%s %d\n%s" % (ENVELOPE, origin, seq, data)]


def test_a_number_far_from_the_last_starts_a_new_count_instead_of_poisoning_it(
        bus: Harness) -> None:
    delivered: list[bytes] = []
    link = bus.subscriber(delivered)
    bus.connect(link)
    link.on_reply(message(OTHER, 10))
    link.on_reply(message(OTHER, 9, b"repeat"))  # close behind: a repeat, dropped
    link.on_reply(message(OTHER, 10 + GAP_MAX + 2, b"forged ahead"))
    link.on_reply(message(OTHER, 11, b"real"))  # far behind the forgery: not a repeat
    link.on_reply(message(OTHER, 12, b"real"))
    link.on_reply(message(OTHER, 12 + REPEATS_MAX, b"gap"))  # a gap, counted
    link.on_reply(message(OTHER, 12, b"far back"))  # a restart of the count, delivered
    assert delivered == [b"m", b"forged ahead", b"real", b"real", b"gap", b"far back"]
    assert (link.duplicates, link.missed) == (1, REPEATS_MAX - 1)
    renumbered = [(e["last"], e["seq"]) for e in bus.events("redis.renumbered")]
    assert renumbered == [(10, 10 + GAP_MAX + 2), (10 + GAP_MAX + 2, 11),
                          (12 + REPEATS_MAX, 12)]


def test_a_forged_jump_costs_the_instance_it_names_one_message_at_most(bus: Harness) -> None:
    """A number a little ahead under another instance's id once made every instance drop that
    many of its next real messages as repeats."""
    delivered: list[bytes] = []
    link = bus.subscriber(delivered)
    bus.connect(link)
    for seq in range(1, 6):
        link.on_reply(message(OTHER, seq, b"real %d" % seq))
    link.on_reply(message(OTHER, 1005, b"forged"))
    for seq in range(6, 1011):
        link.on_reply(message(OTHER, seq, b"real %d" % seq))
    assert [e["messages"] for e in bus.events("redis.missed")] == [999]
    assert link.missed == 0, "the real messages arrived: nothing was missed"
    real = [b"real %d" % seq for seq in range(1, 1011) if seq != 1005]
    assert delivered == [*real[:5], b"forged", *real[5:]]
    assert link.duplicates == 1, "the real 1005 looks like the forged one"


def test_more_gaps_than_are_kept_still_silence_nobody(bus: Harness) -> None:
    """Forged numbers that cut one gap into many: the gaps are joined, never dropped while
    their numbers could still be taken for repeats."""
    delivered: list[bytes] = []
    link = bus.subscriber(delivered)
    bus.connect(link)
    link.on_reply(message(OTHER, 1))
    link.on_reply(message(OTHER, 10_000, b"forged"))
    for seq in range(5000, 5000 + 2 * (GAPS_MAX + 4), 2):  # each cuts the gap once more
        link.on_reply(message(OTHER, seq, b"forged"))
    assert len(link.gaps[OTHER]) <= GAPS_MAX
    for seq in range(2, 5000):
        link.on_reply(message(OTHER, seq, b"real"))
    assert delivered.count(b"real") == 4998 and link.duplicates == 0


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_one_forged_jump_costs_no_real_message_but_the_one_it_names(data: st.DataObject) -> None:
    """Real messages in order (some repeated, a few never arriving) and one forged number a
    little ahead, sent at any point after the first: every real message is delivered once,
    but the one whose number the forgery took, which is delivered at most once."""
    count = data.draw(st.integers(1, 60), label="real messages")
    lost = data.draw(st.sets(st.integers(2, count), max_size=8), label="never arrive") \
        if count > 1 else set()
    arrivals: list[int] = []
    for seq in range(1, count + 1):
        if seq not in lost:
            arrivals.append(seq)
        if data.draw(st.booleans()):  # a resend after a lost link, within the window
            arrivals.append(data.draw(st.integers(max(1, seq - 10), seq)))
    at = data.draw(st.integers(1, len(arrivals)), label="forged after")
    # resends go back at most 10: the forged number stays less than REPEATS_MAX above every
    # one of them (further below, a number is a new count, delivered again, by design)
    forged = max(arrivals[:at]) + data.draw(st.integers(2, REPEATS_MAX - 11), label="jump")
    harness = Harness()
    try:
        delivered: list[bytes] = []
        link = harness.subscriber(delivered)
        harness.connect(link)
        for seq in arrivals[:at]:
            link.on_reply(message(OTHER, seq, b"%d" % seq))
        link.on_reply(message(OTHER, forged, b"forged"))
        for seq in arrivals[at:]:
            link.on_reply(message(OTHER, seq, b"%d" % seq))
        assert delivered.count(b"forged") == 1
        for seq in set(arrivals):
            assert delivered.count(b"%d" % seq) == (seq != forged), (seq, forged)
        seen = set(arrivals) | {forged}
        assert link.missed == max(seen) - len(seen), "missed: the numbers nothing came for"
    finally:
        harness.close()


def test_a_payload_over_the_limit_is_counted_not_delivered(bus: Harness) -> None:
    delivered: list[bytes] = []
    link = bus.subscriber(delivered)
    bus.connect(link)
    limit = link.payload_limit
    link.on_reply([b"message", b"chat", b"x" * limit])
    link.on_reply([b"message", b"chat", b"y" * (limit + 1)])
    link.on_reply(message(OTHER, 1, b"z" * (limit + 1)))
    link.on_reply(message(OTHER, 2))
    assert delivered == [b"x" * limit, b"m"]
    assert (link.oversize, link.missed) == (2, 0), "the oversize one is no gap in the numbering"
    origins = [e["origin"] for e in bus.events("redis.oversize")]
    assert origins == [None, OTHER.decode()]


@pytest.mark.parametrize("reply", [1, [b"chat", 1], b"OK", None, [b"chat"]])
def test_a_reply_the_publisher_did_not_ask_for_is_a_protocol_error(
        bus: Harness, reply: object) -> None:
    link = bus.publisher()
    bus.connect(link)
    link.on_reply(reply)
    assert link.state == LinkState.BACKOFF
    [lost] = bus.events("redis.disconnected")
    assert str(lost["error"]).startswith("protocol error"), lost


@pytest.mark.parametrize("reply", [[b"message", b"chat", 5], [b"message", b"chat", [b"x"]],
                                   [b"pong", b""], 7, [b"pmessage", b"*", b"chat", b"x"]])
def test_a_reply_the_subscriber_did_not_ask_for_is_a_protocol_error(
        bus: Harness, reply: object) -> None:
    link = bus.subscriber([])
    bus.connect(link)
    link.on_reply(reply)
    assert link.state == LinkState.BACKOFF
    [lost] = bus.events("redis.disconnected")
    assert str(lost["error"]).startswith("protocol error"), lost


def test_each_address_of_the_host_is_tried_in_turn(
        bus: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host name with an address where nothing listens and one where Redis does."""
    with socket.socket() as probe:  # a port nothing listens on once it is closed
        probe.bind(("127.0.0.1", 0))
        refused = probe.getsockname()
    listener = socket.create_server(("127.0.0.1", 0))
    bus.pairs.append((listener, listener))
    addresses = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", address)
                 for address in (refused, listener.getsockname())]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: addresses)

    class Redis:
        """Accepts the link and answers its greeting (PING)."""

        def on_readable(self) -> None:
            sock, _ = listener.accept()
            bus.pairs.append((sock, sock))
            sock.sendall(b"+PONG\r\n")

        def on_writable(self) -> None:
            pass

    bus.loop.register(listener.fileno(), Redis())
    link = bus.publisher()
    link.address = RedisAddress("redis.test")

    def until_ready() -> None:
        if link.state == LinkState.READY:
            bus.loop.stop()

    bus.loop.before_sleep = until_ready
    bus.loop.call_later(5.0, bus.loop.stop)
    link.start()
    bus.loop.run()
    assert link.state == LinkState.READY, bus.events("redis.disconnected")
    assert not bus.events("redis.disconnected")
    assert [e["attempts"] for e in bus.events("redis.connected")] == [1]
    link.stop()


def test_a_message_published_while_the_link_is_down_says_when_it_was_said(bus: Harness) -> None:
    link = bus.publisher()
    before = time.time()
    link.publish(b"said offline")
    redis_end = bus.connect(link)
    [command] = published(link, redis_end)
    origin, seq, said, data = unpack(command[2])
    assert (origin, seq, data) == (ORIGIN, 1, b"said offline")
    assert said is not None and before - 1 <= said / 1000 <= time.time() + 1
    link.publish(b"said online")
    [command] = published(link, redis_end)
    assert unpack(command[2]) == (ORIGIN, 2, None, b"said online"), "on time: no mark"


def test_late_messages_go_through_late_and_others_do_not(bus: Harness) -> None:
    delivered: list[bytes] = []
    link = bus.subscriber(delivered)
    link.late = lambda data, said: b"late(%s):%s" % (b"%d" % said if said else b"-", data)
    bus.connect(link)
    link.on_reply(message(OTHER, 1, b"a"))
    link.on_reply([b"message", b"chat", b"%s%s 2 1234\nb" % (ENVELOPE, OTHER)])
    link.on_reply(message(OTHER, 4, b"d"))
    link.on_reply(message(OTHER, 3, b"c"))  # fills the gap: came late
    link.on_reply([b"message", b"chat", b"foreign"])
    assert delivered == [b"a", b"late(1234):b", b"d", b"late(-):c", b"foreign"]


def test_another_channel_goes_to_whoever_listens_to_it(bus: Harness) -> None:
    delivered: list[bytes] = []
    heard: list[bytes] = []
    told: list[bool] = []
    link = bus.subscriber(delivered)
    link.also[b"side"] = heard.append
    link.subscribed.append(lambda: told.append(True))
    assert link.greeting() == [(b"SUBSCRIBE", b"chat"), (b"SUBSCRIBE", b"side")]
    bus.connect(link)
    assert told == [True], "told at each new subscription"
    link.on_reply([b"message", b"side", b"news"])
    link.on_reply(message(OTHER, 1, b"chat"))
    assert heard == [b"news"] and delivered == [b"chat"]
    link.on_reply([b"message", b"elsewhere", b"x"])  # a channel nobody subscribed to
    assert link.state == LinkState.BACKOFF and link.error.startswith("protocol error")
