"""Several fsmchat instances joined by Redis pub/sub: one chat across processes.

Every test runs a real ``redis-server`` (tests/redis_harness.py) and real fsmchat processes, and
talks to them over real sockets. A message is whatever one recv on the server returned; tests
that count messages await each send as received (``data.received``) so that each one is its own.
Before an instance is used, both of its Redis links (publish, subscribe) must have logged
``redis.connected``: before that, a message may go nowhere (nobody subscribed yet).
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import signal
from collections.abc import Callable, Iterator, Sequence

import pytest
from conftest import (
    HOST,
    QUIET,
    WAIT,
    BackgroundReader,
    Client,
    Event,
    ServerProcess,
    StartServer,
    StreamReader,
    proc_status_kib,
    recv_exactly,
    recv_until_suffix,
    run_cli,
    usage_error,
    wait_event_count,
)
from redis_harness import FakeFactory, FakeSession, RedisFactory, RedisServer, bug_free

from fsmchat.redis.bus import PING_IDLE
from fsmchat.redis.link import ANSWER_TIMEOUT, RECV_SIZE, REPLY_MAX

pytest_plugins = ["redis_harness"]

LINKS = ("publish", "subscribe")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


@pytest.fixture
def start_server(start_server: StartServer) -> Iterator[StartServer]:
    """conftest's factory, checked at teardown: no instance logged a lifecycle.bug."""
    yield from bug_free(start_server)


def on_link(link: str) -> Callable[[Event], bool]:
    """Predicate: the event is about this Redis link."""
    return lambda e: e.get("link") == link


def retry_number(link: str, least: int) -> Callable[[Event], bool]:
    """Predicate: a ``redis.retrying`` of this link, attempt ``least`` or later."""
    return lambda e: e.get("link") == link and int(e.get("attempt", 0)) >= least


def link_counts(server: ServerProcess, name: str) -> dict[str, int]:
    """How many ``name`` events each link has logged so far (to wait for the next ones)."""
    return {link: len([e for e in server.events(name) if e.get("link") == link]) for link in LINKS}


def wait_links(
    server: ServerProcess,
    name: str = "redis.connected",
    before: dict[str, int] | None = None,
    timeout: float = WAIT,
) -> list[Event]:
    """Wait for one more ``name`` event per link than ``before`` counted; return those events."""
    found: list[Event] = []
    for link in LINKS:
        count = (before or {}).get(link, 0) + 1
        found.append(wait_event_count(server, name, count, timeout, on_link(link))[-1])
    return found


def start_instance(start_server: StartServer, redis: RedisServer, *extra: str) -> ServerProcess:
    """An fsmchat on ``redis`` whose two links are connected (its subscription is live)."""
    server = start_server("--redis", redis.url, *extra)
    wait_links(server)
    return server


def instance_id(server: ServerProcess) -> str:
    return str(server.events("server.started")[0]["instance"])


def send_message(server: ServerProcess, client: Client, message: bytes) -> None:
    """Send and wait until the server has read it all: the next send is another message."""
    already = server.bytes_received_from(client)
    client.sock.sendall(message)
    server.wait_received_from(client, already + len(message))


def exchange(sender: Client, receivers: Sequence[Client], message: bytes) -> None:
    """``sender`` says ``message``; each receiver's next bytes are exactly that."""
    sender.sock.sendall(message)
    for receiver in receivers:
        assert recv_exactly(receiver.sock, len(message)) == message


def assert_quiet(*clients: Client, wait: float = QUIET) -> None:
    """Nothing (not even EOF) is pending for any of ``clients`` (checked all at once).

    A negative check: callers first prove that a later message already arrived.
    """
    socks = [c.sock for c in clients]
    readable, _, _ = select.select(socks, [], [], wait)
    for sock in readable:
        sock.settimeout(0.0)
        try:
            data = sock.recv(65536)
        except BlockingIOError:  # readable, then nothing after all
            continue
        finally:
            sock.settimeout(WAIT)
        raise AssertionError(f"unexpected data (or EOF) for {sock.getsockname()}: {data[:80]!r}")


def numbered(prefix: str, count: int, size: int | None = None) -> list[bytes]:
    """Distinct messages ``prefix-0000;`` ..., padded to ``size`` bytes if given."""
    out = []
    for i in range(count):
        head = f"{prefix}-{i:04d};".encode()
        out.append(head if size is None else head.ljust(size, b"."))
    return out


def stopped_event(server: ServerProcess) -> Event:
    """SIGTERM, a clean exit, and its ``server.stopped`` event."""
    assert server.stop(signal.SIGTERM) == 0, server.describe()
    stopped = server.events("server.stopped")
    assert len(stopped) == 1, server.describe()
    return stopped[0]


# --------------------------------------------------------------------------
# 1. Fan-out across instances
# --------------------------------------------------------------------------


def test_message_reaches_every_client_on_every_instance_but_not_its_sender(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """The core promise: one chat across processes, and no echo of a client's own message."""
    a, b, c = (start_instance(start_server, redis_server) for _ in range(3))

    ids = [instance_id(s) for s in (a, b, c)]
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids), ids
    assert len(set(ids)) == 3, f"instances share an id: {ids}"
    for server in (a, b, c):
        started = server.events("server.started")[0]
        assert started["channel"] == "fsmchat"
        assert str(started["redis"]).startswith(f"redis://{redis_server.address}")
        for event in server.events("redis.connected"):
            assert event["address"] == redis_server.address, event

    a1, a2 = a.connect_many(2)
    b1 = b.connect()
    c1 = c.connect()

    exchange(a1, [a2, b1, c1], b"hello from a1 on instance A\n")
    # b1 answers after A's message went out: had A echoed a1's message back from Redis, it would
    # reach a1 before this reply (Redis delivers publishes in order).
    exchange(b1, [a1, a2, c1], b"reply from b1 on instance B\n")
    exchange(c1, [a1, a2, b1], b"and c1 on instance C\n")
    assert_quiet(a1, a2, b1, c1)


# --------------------------------------------------------------------------
# 2. Binary safety
# --------------------------------------------------------------------------


def test_any_bytes_cross_instances_unchanged_even_when_they_look_like_the_envelope(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """The payload is opaque: a relay that parses it (or its own framing inside it) loses data."""
    a, b = (start_instance(start_server, redis_server) for _ in range(2))
    a1, b1 = a.connect(), b.connect()
    id_a, id_b = instance_id(a), instance_id(b)
    payloads = [
        bytes(range(256)),
        b"\r\n",
        b"\x00",
        b"line one\r\nline two\nline three\r",
        b"fsmchat1 ",
        b"fsmchat1",
        # What an envelope could look like, naming each instance, with early sequence numbers:
        # a relay that reads these as its own framing drops them as "own" or "duplicate".
        *(f"fsmchat1 {iid} {seq}{sep}".encode() + b"payload\x00\xff" for iid in (id_a, id_b)
          for seq in (0, 1, 2) for sep in (" ", "\n", "\r\n")),
        f"fsmchat1 {id_a}:1:".encode(),
        f"{id_b} 1\n".encode() + bytes(range(256)),
        b"*3\r\n$7\r\nmessage\r\n$7\r\nfsmchat\r\n$5\r\nhello\r\n",
        b"$-1\r\n",
        b"\xff" * 300 + b"\x00" * 300,
        bytes(range(255, -1, -1)) * 64,  # 16 KiB: may be several messages, still in order
    ]
    for payload in payloads:
        exchange(a1, [b1], payload)
        exchange(b1, [a1], payload)
    exchange(a1, [b1], b"done")
    assert_quiet(a1, b1)


# --------------------------------------------------------------------------
# 3. Per-sender order
# --------------------------------------------------------------------------


def test_one_senders_messages_arrive_in_order_once_on_every_instance(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """Order per sender must survive the outbox, Redis and the other instance's fan-out."""
    a, b, c = (start_instance(start_server, redis_server) for _ in range(3))
    sender = a.connect()
    receivers = [b.connect(), c.connect()]
    messages = numbered("m", 3000)
    expected = b"".join(messages)
    readers = [BackgroundReader(r.sock, len(expected), timeout=30) for r in receivers]
    for message in messages:
        sender.sock.sendall(message)
    for reader in readers:
        got = reader.result()
        assert got.split(b";")[:-1] == [m[:-1] for m in messages]
        assert got == expected

    # The events agree: A published every message it read, with consecutive sequence numbers, and
    # each other instance received exactly those, in that order, with no gap reported.
    a.wait_received_from(sender, len(expected))  # A's log may trail what the receivers got
    reads = len(a.connection_events(sender, "data.received"))
    published = wait_event_count(a, "redis.published", reads)
    seqs = [int(e["seq"]) for e in published]
    assert seqs == list(range(seqs[0], seqs[0] + reads))
    assert sum(int(e["bytes"]) for e in published) == len(expected)
    origin = instance_id(a)
    for server in (b, c):
        received = wait_event_count(
            server, "redis.received", reads, predicate=lambda e: e.get("origin") == origin
        )
        assert [int(e["seq"]) for e in received] == seqs
        assert not server.events("redis.missed"), server.events("redis.missed")
    exchange(receivers[0], [sender, receivers[1]], b"end")
    assert_quiet(sender, *receivers)


# --------------------------------------------------------------------------
# 4. Redis crashes mid-chat
# --------------------------------------------------------------------------


def test_redis_crash_keeps_local_chat_and_delivers_what_was_said_meanwhile(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """An outage must cost neither local chat nor (short of the outbox bound) any message."""
    a, b = (start_instance(start_server, redis_server) for _ in range(2))
    a1, a2 = a.connect_many(2)
    b1, b2 = b.connect_many(2)
    # Chat across first: the last PUBLISH before the outage reached both instances, so after it
    # each outbox waits until both are subscribed again.
    exchange(a1, [a2, b1, b2], b"before the crash, from A")
    exchange(b1, [a1, a2, b2], b"before the crash, from B")

    lost = {s.pid: link_counts(s, "redis.disconnected") for s in (a, b)}
    back = {s.pid: link_counts(s, "redis.connected") for s in (a, b)}
    redis_server.kill()
    for server in (a, b):
        for event in wait_links(server, "redis.disconnected", lost[server.pid]):
            assert event["level"] == "warning", event
            assert event["address"] == redis_server.address, event
            assert isinstance(event["error"], str) and event["error"], event

    # Local chat goes on, and what is said now is kept for the other instance.
    down_a = numbered("said on A while Redis was down", 20)
    down_b = numbered("said on B while Redis was down", 15)
    for message in down_a:
        send_message(a, a1, message)
        assert recv_exactly(a2.sock, len(message)) == message
    for message in down_b:
        send_message(b, b2, message)
        assert recv_exactly(b1.sock, len(message)) == message

    redis_server.start()
    for server in (a, b):
        for event in wait_links(server, "redis.connected", back[server.pid]):
            assert event["address"] == redis_server.address, event

    # Each side gets the other's outage messages, once, in order...
    from_a, from_b = b"".join(down_a), b"".join(down_b)
    for client in (b1, b2):
        assert recv_exactly(client.sock, len(from_a)) == from_a
    for client in (a1, a2):
        assert recv_exactly(client.sock, len(from_b)) == from_b
    # ...and chat goes on both ways; nothing else (no duplicate) came before these.
    exchange(a2, [a1, b1, b2], b"after the crash, from A")
    exchange(b2, [a1, a2, b1], b"after the crash, from B")
    assert_quiet(a1, a2, b1, b2)
    for server in (a, b):
        assert server.proc.poll() is None


def test_outbox_waits_after_an_outage_for_the_instances_that_listened_before(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """Pub/sub keeps nothing: flushed before B resubscribes, A's backlog would be lost to B.

    B is frozen (SIGSTOP) while Redis comes back, so A reconnects first, for sure.
    """
    instances = [start_instance(start_server, redis_server) for _ in range(2)]
    a, b = instances
    a1, b1 = a.connect(), b.connect()
    exchange(a1, [b1], b"heard by both instances")  # this PUBLISH reached every instance

    lost = {s.pid: link_counts(s, "redis.disconnected") for s in (a, b)}
    back = link_counts(a, "redis.connected")
    redis_server.kill()
    for server in (a, b):
        wait_links(server, "redis.disconnected", lost[server.pid])
    backlog = numbered("said on A while Redis was down", 10)
    for message in backlog:
        send_message(a, a1, message)

    b.send_signal(signal.SIGSTOP)
    try:
        redis_server.start()
        wait_links(a, "redis.connected", back)
        holding = a.wait_event("redis.holding")
        assert holding["messages"] == len(backlog), holding
        assert holding["expected"] == len(instances), holding
        assert holding["subscribers"] < len(instances), holding
    finally:
        b.send_signal(signal.SIGCONT)
    flushing = a.wait_event("redis.flushing")
    assert flushing["subscribers"] == len(instances), flushing
    assert flushing["messages"] == len(backlog), flushing
    expected = b"".join(backlog)
    assert recv_exactly(b1.sock, len(expected)) == expected
    exchange(b1, [a1], b"B got it all")
    assert_quiet(a1, b1)


# --------------------------------------------------------------------------
# 5. Redis absent at start
# --------------------------------------------------------------------------


def test_instance_starts_without_redis_and_joins_when_it_appears(
    start_server: StartServer, redis_factory: RedisFactory
) -> None:
    """A missing Redis must not stop a server from serving; it joins the chat once it's there."""
    redis = redis_factory(started=False)
    a = start_server("--redis", redis.url)
    for event in wait_links(a, "redis.disconnected"):
        assert event["address"] == redis.address, event
    a1, a2 = a.connect_many(2)
    exchange(a1, [a2], b"local chat without Redis")
    exchange(a2, [a1], b"still local")
    # Let each link fail a few more times: that is retrying, not one more disconnection.
    for link in LINKS:
        retry = wait_event_count(a, "redis.retrying", 1, predicate=retry_number(link, 3))[0]
        assert float(retry["delay"]) > 0, retry
    assert link_counts(a, "redis.disconnected") == dict.fromkeys(LINKS, 1)

    redis.start()
    for event in wait_links(a, "redis.connected"):
        assert int(event["attempts"]) > 1, event
    b = start_instance(start_server, redis)
    b1 = b.connect()
    exchange(a1, [a2, b1], b"A joined the chat")
    exchange(b1, [a1, a2], b"B hears A and answers")
    assert_quiet(a1, a2, b1)
    assert link_counts(a, "redis.disconnected") == dict.fromkeys(LINKS, 1)


# --------------------------------------------------------------------------
# 6. The outbox bound
# --------------------------------------------------------------------------


def test_outbox_keeps_the_newest_messages_up_to_its_bound_and_reports_the_rest(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """A long outage must cost bounded memory; what is dropped is the oldest, and it is said."""
    bound, size, count = 64 * 1024, 1024, 200
    a = start_instance(start_server, redis_server, "--redis-outbox", "64K")
    b = start_instance(start_server, redis_server)
    a1, b1 = a.connect(), b.connect()
    exchange(a1, [b1], b"before the outage")  # the last PUBLISH reached both instances

    lost = link_counts(a, "redis.disconnected")
    back = {s.pid: link_counts(s, "redis.connected") for s in (a, b)}
    redis_server.kill()
    wait_links(a, "redis.disconnected", lost)

    messages = numbered("outbox", count, size)
    for message in messages:
        send_message(a, a1, message)
    assert len(a.connection_events(a1, "data.received")) == count + 1, "one recv per message"

    redis_server.start()
    for server in (a, b):
        wait_links(server, "redis.connected", back[server.pid])
    marker = b"sent after Redis came back"
    a1.sock.sendall(marker)
    stream = recv_until_suffix(b1.sock, marker)[: -len(marker)]

    assert len(stream) % size == 0, f"{len(stream)} bytes: a message arrived in part"
    got = [stream[i : i + size] for i in range(0, len(stream), size)]
    kept = len(got)
    assert 0 < kept < count
    assert got == messages[count - kept :], "not the newest messages, in order"
    # At most the bound waited; and one more would not have fit even allowing each message up
    # to its own size again in envelope and bookkeeping.
    assert kept * size <= bound < (kept + 1) * 2 * size, f"{kept} messages kept"

    dropped = count - kept
    reported = 0

    def adds_up(event: Event) -> bool:
        nonlocal reported
        if event.get("event") == "redis.dropped" and event.get("reason") == "outbox_full":
            assert event["level"] == "warning", event
            reported += int(event["messages"])
        return reported >= dropped

    a.wait_for(adds_up, what=f"redis.dropped outbox_full adding up to {dropped}")
    assert reported == dropped
    assert_quiet(b1)
    stopped = stopped_event(a)
    assert stopped["redis_dropped"] == dropped, stopped


# --------------------------------------------------------------------------
# 7. Someone else publishes
# --------------------------------------------------------------------------


def test_a_foreign_publish_reaches_every_client_as_is(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """Anything on the channel is chat: other programs can speak to every client."""
    instances = [start_instance(start_server, redis_server) for _ in range(2)]
    a, b = instances
    clients = [*a.connect_many(2), b.connect()]

    for payload in (b"hello", bytes(range(256)) + b"fsmchat1 0000000000000000 1 x"):
        assert redis_server.publish("fsmchat", payload) == len(instances)
        for client in clients:
            assert recv_exactly(client.sock, len(payload)) == payload
        for server in instances:
            server.wait_event("redis.received", origin=None, bytes=len(payload))

    exchange(clients[0], clients[1:], b"and the clients still chat")
    assert_quiet(*clients)


# --------------------------------------------------------------------------
# 8. Command line and channels
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://x",
        "rediss://127.0.0.1:6379",
        "redis://127.0.0.1:notaport",
        "redis://127.0.0.1:70000",
        "redis://127.0.0.1:-1",
        "redis://127.0.0.1:6379/abc",
        "redis://127.0.0.1:6379/1.5",
        "127.0.0.1:6379",
        "",
        "redis://127.0.0.1:0",  # not "the default port"
        "redis://a..b",
        "redis://" + "a" * 300,
        "redis://\udcff",  # a byte of the command line that is not UTF-8
        "redis://:\udcff@127.0.0.1",
        "redis://:%ff@127.0.0.1",
    ],
)
def test_bad_redis_url_exits_2_with_one_line_naming_the_option(url: str) -> None:
    """A typo in the URL must be a usage error up front, not a retry loop or a traceback."""
    result = run_cli("--host", HOST, "--port", "0", "--redis", url)
    usage_error(result, "--redis")


@pytest.mark.parametrize("value", ["1K", "63K", "lots", "-1M"])
def test_bad_redis_outbox_exits_2(value: str) -> None:
    """The outbox takes sizes like --max-queue-bytes, at least 64K."""
    result = run_cli("--host", HOST, "--port", "0", "--redis", "redis://127.0.0.1:1",
                     "--redis-outbox", value)
    usage_error(result, "--redis-outbox")


def test_channel_that_is_not_utf8_exits_2() -> None:
    result = run_cli("--host", HOST, "--port", "0", "--redis", "redis://127.0.0.1:1",
                     "--channel", "room\udcff")
    usage_error(result, "--channel")


def test_channel_without_redis_exits_2() -> None:
    """A channel means nothing without Redis: say so instead of silently chatting alone."""
    result = run_cli("--host", HOST, "--port", "0", "--channel", "room")
    usage_error(result, "--channel")


def test_instances_on_different_channels_do_not_hear_each_other(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """A channel is a room: one Redis can carry several chats apart."""
    a = start_instance(start_server, redis_server, "--channel", "room1")
    b = start_instance(start_server, redis_server, "--channel", "room2")
    c = start_instance(start_server, redis_server, "--channel", "room1")
    assert [s.events("server.started")[0]["channel"] for s in (a, b, c)] == [
        "room1", "room2", "room1"]
    a1, b1, c1 = a.connect(), b.connect(), c.connect()

    # B speaks first; once Redis has taken its PUBLISH, C speaks on room1. A and C hear only C.
    b1.sock.sendall(b"only room2 hears this")
    b.wait_event("redis.published", bytes=len(b"only room2 hears this"))
    exchange(c1, [a1], b"room1 from C")
    exchange(a1, [c1], b"room1 from A")
    assert_quiet(a1, b1, c1)
    assert redis_server.publish("room2", b"for room2 only") == 1
    assert recv_exactly(b1.sock, 14) == b"for room2 only"
    exchange(a1, [c1], b"room1 again")
    assert_quiet(a1, b1, c1)


def test_password_is_used_and_never_shown(
    start_server: StartServer, redis_factory: RedisFactory
) -> None:
    """The URL's password authenticates both links, and the log shows *** in its place."""
    secret = "s3cret-Pw"
    redis = redis_factory("--requirepass", secret)
    url = f"redis://:{secret}@{redis.address}"
    a = start_server("--redis", url)
    wait_links(a)
    b = start_server("--redis", f"redis://default:{secret}@{redis.address}/0")
    wait_links(b)
    assert "***" in str(a.events("server.started")[0]["redis"])
    a1, b1 = a.connect(), b.connect()
    exchange(a1, [b1], b"authenticated")
    for server in (a, b):
        assert not [line for line in server.lines() if secret in line]
        stopped_event(server)
        assert secret not in server.stderr()


# --------------------------------------------------------------------------
# 9. Counters at the end
# --------------------------------------------------------------------------


def test_stopped_event_counts_what_crossed_redis(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """The totals are how an operator checks that the instances really talk to each other."""
    a, b = (start_instance(start_server, redis_server) for _ in range(2))
    a1, a2 = a.connect_many(2)
    b1 = b.connect()

    talks = [(a, a1, [a2, b1], "from a1", 4), (a, a2, [a1, b1], "from a2", 2),
             (b, b1, [a1, a2], "from b1", 3)]
    for server, sender, receivers, prefix, count in talks:
        for message in numbered(prefix, count):
            send_message(server, sender, message)
            for receiver in receivers:
                assert recv_exactly(receiver.sock, len(message)) == message

    from_a = sum(len(a.connection_events(c, "data.received")) for c in (a1, a2))
    from_b = len(b.connection_events(b1, "data.received"))
    stopped_a, stopped_b = stopped_event(a), stopped_event(b)
    assert stopped_a["redis_published"] == from_a, stopped_a
    assert stopped_a["redis_received"] == from_b, stopped_a
    assert stopped_b["redis_published"] == from_b, stopped_b
    assert stopped_b["redis_received"] == from_a, stopped_b
    for stopped in (stopped_a, stopped_b):
        for counter in ("redis_dropped", "redis_missed", "redis_duplicates"):
            assert stopped[counter] == 0, stopped


def test_what_a_stop_reads_is_published_like_any_other_message(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """A sender's burst still in TCP buffers when its instance gets SIGTERM reaches a client of
    the other instance whole: the stop reads it, publishes it, then drains the outbox."""
    stopping = start_instance(start_server, redis_server, "--log-level", "info")
    staying = start_instance(start_server, redis_server, "--log-level", "info")
    sender = stopping.connect()
    receiver = staying.connect(rcvbuf=16 * 1024)
    digest = hashlib.sha256()
    payload = os.urandom(4 << 20)
    stream = StreamReader(receiver.sock, limit=len(payload), on_chunk=digest.update, timeout=20)
    sender.sock.settimeout(20)
    sender.sock.sendall(payload)
    stopping.send_signal(signal.SIGTERM)
    assert stream.result().received == len(payload)
    assert digest.digest() == hashlib.sha256(payload).digest()
    assert stopping.wait_exit(timeout=15) == 0
    assert stopping.events("server.stopped")[-1]["redis_dropped"] == 0


# --------------------------------------------------------------------------
# 10. Whoever may PUBLISH on the channel
# --------------------------------------------------------------------------


def test_an_envelope_with_a_bad_instance_id_is_a_foreign_payload_and_costs_nothing(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """A forged origin that is not UTF-8 once made every subscriber reconnect (and lose what
    arrived meanwhile); now it is a payload like any other."""
    a, b = (start_instance(start_server, redis_server) for _ in range(2))
    a1, b1 = a.connect(), b.connect()
    lost = {s.pid: link_counts(s, "redis.disconnected") for s in (a, b)}
    forged = [b"fsmchat1 \xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf7\xf6\xf5\xf4\xf3\xf2\xf1\xf0 1\nhi",
              b"fsmchat1 \xff 7\nhi", b"fsmchat1 ZZZZZZZZZZZZZZZZ 7\nhi"]
    for payload in forged:
        assert redis_server.publish("fsmchat", payload) == 2
        for client in (a1, b1):
            assert recv_exactly(client.sock, len(payload)) == payload
    exchange(a1, [b1], b"the subscribers stayed")
    exchange(b1, [a1], b"both ways")
    assert {s.pid: link_counts(s, "redis.disconnected") for s in (a, b)} == lost
    assert_quiet(a1, b1)


def test_a_forged_sequence_number_does_not_silence_the_instance_it_names(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """A huge number under A's id once made every other instance drop A's messages as repeats
    until A restarted."""
    a, b = (start_instance(start_server, redis_server) for _ in range(2))
    a1, b1 = a.connect(), b.connect()
    exchange(a1, [b1], b"A before the forgery")
    forged = f"fsmchat1 {instance_id(a)} {10**19 - 1}\n".encode() + b"forged"
    assert redis_server.publish("fsmchat", forged) == 2
    assert recv_exactly(b1.sock, len(b"forged")) == b"forged"
    for message in numbered("A after the forgery", 5):
        exchange(a1, [b1], message)
    renumbered = b.wait_event("redis.renumbered", origin=instance_id(a))
    assert renumbered["level"] == "warning", renumbered
    assert_quiet(a1, b1)
    stopped = stopped_event(b)
    assert stopped["redis_duplicates"] == 0 and stopped["redis_missed"] == 0, stopped


def test_a_forged_small_jump_does_not_make_the_next_real_messages_repeats(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """A number a little ahead under A's id once made B drop that many of A's next messages
    as repeats."""
    a, b = (start_instance(start_server, redis_server) for _ in range(2))
    a1, b1 = a.connect(), b.connect()
    exchange(a1, [b1], b"A before the forgery")
    forged = f"fsmchat1 {instance_id(a)} {1 + 1000}\n".encode() + b"forged"
    assert redis_server.publish("fsmchat", forged) == 2
    assert recv_exactly(b1.sock, len(b"forged")) == b"forged"
    for message in numbered("A after the forgery", 5):
        exchange(a1, [b1], message)
    assert_quiet(a1, b1)
    stopped = stopped_event(b)
    assert stopped["redis_duplicates"] == 0, stopped
    assert stopped["redis_missed"] == 1000 - 1 - 5, "the gap, less the real ones that came"


def test_a_payload_larger_than_a_clients_queue_is_dropped_and_counted(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """One such publish once closed every client of every instance (queue_limit)."""
    limit = 1024 * 1024
    a, b = (start_instance(start_server, redis_server, "--max-queue-bytes", "1M",
                           "--stats-interval", "0.2") for _ in range(2))
    clients = [*a.connect_many(2), b.connect()]
    fits = b"f" * limit  # as large as a queue may be: it is delivered
    assert redis_server.publish("fsmchat", fits) == 2
    for client in clients:
        assert recv_exactly(client.sock, limit) == fits
    assert redis_server.publish("fsmchat", b"o" * (limit + 1)) == 2
    for server in (a, b):
        oversize = server.wait_event("redis.oversize")
        assert oversize["level"] == "warning", oversize
        assert (oversize["bytes"], oversize["limit"]) == (limit + 1, limit), oversize
        server.wait_for(lambda e: e.get("event") == "server.stats"
                        and e.get("redis_oversize") == 1, what="server.stats counting it")
    exchange(clients[0], clients[1:], b"nobody was closed")
    assert_quiet(*clients)
    for server in (a, b):
        assert not server.events("connection.queue_limit"), server.events("connection.queue_limit")
        assert stopped_event(server)["redis_oversize"] == 1


def test_a_reply_without_end_closes_the_link_not_the_memory(
    start_server: StartServer, fake_redis: FakeFactory
) -> None:
    """A bulk string that never ends once grew the server by gigabytes."""
    budget = 2 * REPLY_MAX + 4 * RECV_SIZE  # what the fake offers before it gives up

    def endless(session: FakeSession) -> None:
        if session.greet() != "subscribe":
            session.listen()
            return
        session.send(b"*3\r\n$7\r\nmessage\r\n$7\r\nfsmchat\r\n$%d\r\n" % (1 << 40))
        chunk = b"x" * RECV_SIZE
        while session.sent < budget and session.send(chunk):
            pass
        session.listen()

    fake = fake_redis(endless)
    server = start_server("--redis", fake.url)
    wait_links(server)
    before = proc_status_kib(server.pid, "VmRSS")
    lost = wait_event_count(server, "redis.disconnected", 1, WAIT + ANSWER_TIMEOUT,
                            on_link("subscribe"))[0]
    assert lost["level"] == "warning" and lost["error"], lost
    first = fake.of("subscribe")[0]
    fake.wait(lambda: first in fake.ended, "end of the first subscribe session")
    assert first.cut and first.sent < budget, "the link was not closed before the fake gave up"
    grown = proc_status_kib(server.pid, "VmHWM") - before
    assert grown * 1024 < 3 * REPLY_MAX, f"peak RSS grew by {grown} KiB"
    client = server.connect()
    other = server.connect()
    exchange(client, [other], b"local chat goes on")


# --------------------------------------------------------------------------
# 11. A Redis that does not answer
# --------------------------------------------------------------------------


def test_a_redis_that_never_answers_is_a_lost_link_that_keeps_retrying(
    start_server: StartServer, fake_redis: FakeFactory
) -> None:
    """Accepting and then saying nothing once left both links in greeting, with no event."""
    fake = fake_redis(FakeSession.listen)
    server = start_server("--redis", fake.url)
    for event in wait_links(server, "redis.disconnected", timeout=WAIT + ANSWER_TIMEOUT):
        assert event["level"] == "warning" and event["error"], event
    one, two = server.connect_many(2)
    exchange(one, [two], b"the chat works locally")
    for link in LINKS:  # each link dials again, and again, and says so once
        wait_event_count(server, "redis.retrying", 1, WAIT + 2 * ANSWER_TIMEOUT,
                         retry_number(link, 3))
    fake.wait(lambda: len(fake.sessions) >= 2 * len(LINKS), "second dial of each link")
    assert link_counts(server, "redis.disconnected") == dict.fromkeys(LINKS, 1)
    assert not server.events("redis.connected")


def test_a_frozen_redis_is_noticed_by_the_subscriber_and_the_chat_joins_again(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """Without a PING, a subscriber waits for a Redis host that vanished for ever."""
    a, b = (start_instance(start_server, redis_server) for _ in range(2))
    a1, b1 = a.connect(), b.connect()
    exchange(a1, [b1], b"before the freeze")
    back = {s.pid: link_counts(s, "redis.connected") for s in (a, b)}
    redis_server.send_signal(signal.SIGSTOP)
    try:
        for server in (a, b):
            lost = wait_event_count(server, "redis.disconnected", 1,
                                    WAIT + PING_IDLE + ANSWER_TIMEOUT, on_link("subscribe"))[0]
            assert lost["level"] == "warning" and lost["error"], lost
        a2 = a.connect()
        exchange(a1, [a2], b"local chat goes on")
    finally:
        redis_server.send_signal(signal.SIGCONT)
    for server in (a, b):
        wait_event_count(server, "redis.connected", back[server.pid]["subscribe"] + 1,
                         WAIT + ANSWER_TIMEOUT, on_link("subscribe"))
    exchange(b1, [a1, a2], b"after the freeze")


# --------------------------------------------------------------------------
# 12. A Redis that says what nobody asked
# --------------------------------------------------------------------------


def test_replies_nobody_asked_for_are_a_protocol_error_logged_once_per_outage(
    start_server: StartServer, fake_redis: FakeFactory
) -> None:
    """They were a lifecycle.bug, and the reconnects that followed each logged the outage anew
    (72 warnings in 5 s)."""

    def chatty(session: FakeSession) -> None:
        if session.greet() == "publish":
            session.send(b":1\r\n" * 3)
            session.listen()
        else:
            session.pong()

    fake = fake_redis(chatty)
    server = start_server("--redis", fake.url)  # the fixture checks: no lifecycle.bug
    fake.wait(lambda: len(fake.of("publish")) >= 4, "four sessions of the publish link")
    lost = wait_event_count(server, "redis.disconnected", 1, predicate=on_link("publish"))[0]
    assert lost["level"] == "warning" and "protocol" in str(lost["error"]), lost
    connected = wait_event_count(server, "redis.connected", 4, predicate=on_link("publish"))
    assert [int(e["attempts"]) for e in connected] == [1, 2, 3, 4], connected
    assert link_counts(server, "redis.disconnected")["publish"] == 1
def test_a_subscriber_paused_for_a_congested_reader_resumes_when_it_catches_up(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a = start_instance(start_server, redis_server, "--max-queue-bytes", "1M")
    b = start_instance(start_server, redis_server)
    reader = a.connect(rcvbuf=4096)
    sender = b.connect()
    messages = numbered("flood", 96, 64 * 1024)  # 6 MiB: more than the kernel buffers, too
    expected = b"".join(messages)
    # The reader sleeps early on: its queue passes the high-water mark, the subscriber pauses.
    stream = StreamReader(reader.sock, limit=len(expected), keep=True, pauses=[(1, 0.7)])
    for message in messages:
        send_message(b, sender, message)
    assert stream.result().data == expected
    paused = [e for e in a.events("redis.state") if e.get("to") == "paused"]
    assert paused, "precondition: the subscriber was paused"
    assert a.events("connection.queue_limit") == []
