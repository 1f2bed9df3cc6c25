"""The shared history in Redis streams (issue 17): the past outlives an instance, every instance
gives the same one, and an instance cut off from Redis gets back what it missed, in order, once.

Real ``redis-server`` (tests/redis_harness.py) and real fsmchat processes, chat mode unless a
test says otherwise. Where an instance must lose Redis while the others keep it, its links go
through a ``TcpProxy`` (tests/tcp_proxy.py) that the test cuts: the RSTs end them at once, so
the instance notices without waiting for a timeout of its own.

What the design promises (docs/design.md, issue 17): every room message is appended to the
stream ``fsmchat:<channel>:history:<room key>`` (raw mode: ``fsmchat:<channel>:history``),
listed in ``fsmchat:<channel>:streams`` (a hash: stream -> entries ever added, each entry
numbered ``n`` by it), and announced on the channel as ``fsmchat1s <stream> <entry id>
<number>`` before its payload; an instance's history link syncs every
stream at start and after each reconnect of its subscriber: the recovered entries reach the
local chat marked ``(delayed HH:MM) ``, before what the subscriber held back meanwhile, each
once. A stream trimmed past the last entry an instance saw is a gap: a ``redis.gap`` warning,
counted in ``redis_gaps``, and a ``*** `` notice to the room's people here. An entry without
``m`` is skipped (``redis.skipped``, counted in ``redis_skipped``); one whose ``m`` has no
envelope is a foreign message, cleaned like a foreign publish.

Nothing here sleeps: each test awaits an event of the instances, a line of a client, or what
Redis itself announced to a subscriber of the test's (``Witness``): when the witness has heard a
message, the stream holds it (the script appends and publishes in one step).
"""

from __future__ import annotations

import re
import signal
import socket
from collections.abc import Callable, Iterator, Sequence

import hiredis
import pytest
from chat_harness import END_OF_RECENT, RECENT, STARTED, Chatter, join, minutes
from conftest import (
    WAIT,
    Event,
    ServerProcess,
    StartServer,
    recv_exactly,
    wait_event_count,
)
from redis_harness import RedisServer, bug_free
from tcp_proxy import ProxyFactory, TcpProxy
from test_redis import on_link, send_message

from fsmchat.redis.presence import RECONNECTED, UNREACHABLE

pytest_plugins = ["redis_harness", "tcp_proxy"]

CHAT = ("--mode", "chat", "--history", "10")
#: A cut-off instance's names outlive its outage on the others: these tests are about messages.
KEEP_NAMES = ("--presence-ttl", "60")
CHANNEL = "fsmchat"
#: The keys, under ``fsmchat:<channel>:`` as presence's are (redis/streams.py).
KEYS = f"fsmchat:{CHANNEL}:"
LOBBY_STREAM = f"{KEYS}history:lobby"
RAW_STREAM = f"{KEYS}history"
STREAMS = f"{KEYS}streams"
#: The links of an instance, by mode: each logs ``redis.connected`` once per session.
CHAT_LINKS = ("publish", "subscribe", "presence", "history")
RAW_LINKS = ("publish", "subscribe", "history")
#: The history link's sync ended (at start, and after each reconnect of the subscriber).
SYNCED = "redis.synced"
#: The most entries a stream keeps by default: max(--history, 1000), trimmed approximately.
STREAM_MIN = 1000
DELAYED = re.compile(rb"\(delayed(?: (\d\d:\d\d))?\) (.*)\n")


@pytest.fixture
def start_server(start_server: StartServer) -> Iterator[StartServer]:
    """No instance may log a ``lifecycle.bug`` (bug_free) or a ``server.bug``."""
    servers: list[ServerProcess] = []

    def start(*args: str, started: bool = True) -> ServerProcess:
        server = start_server(*args, started=started)
        servers.append(server)
        return server

    yield from bug_free(start)
    bugs = [(s.args, e) for s in servers for e in s.events("server.bug")]
    assert not bugs, f"server.bug logged: {bugs[:3]}"


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def links_of(args: Sequence[str]) -> tuple[str, ...]:
    return CHAT_LINKS if "chat" in args else RAW_LINKS


def wait_ready(server: ServerProcess, sessions: int = 1, timeout: float = WAIT,
               links: Sequence[str] | None = None) -> None:
    """Each link (of ``links``; by default all the instance has) has logged its ``sessions``-th
    ``redis.connected``, and the history link its ``sessions``-th sync: what the streams held
    is in the instance's history, or has reached its clients."""
    for link in links_of(server.args) if links is None else links:
        wait_event_count(server, "redis.connected", sessions, timeout, on_link(link))
    wait_event_count(server, SYNCED, sessions, timeout)


def instance(start_server: StartServer, url: str, *extra: str) -> ServerProcess:
    """An instance on Redis at ``url`` (the Redis, or a proxy to it), ready and synced."""
    server = start_server("--redis", url, *extra)
    wait_ready(server)
    return server


class Witness:
    """A subscriber of the test's on the channel: what Redis announced, hence what the streams
    hold (the script that appends an entry publishes it in the same step)."""

    def __init__(self, sock: socket.socket, channel: str = CHANNEL) -> None:
        self.sock = sock
        self.parser = hiredis.Reader()
        self.payloads: list[bytes] = []
        sock.sendall(hiredis.pack_command((b"SUBSCRIBE", channel.encode())))  # type: ignore[arg-type]
        reply = self._next()
        assert isinstance(reply, list) and reply[0] == b"subscribe", reply

    def _next(self) -> object:
        reply = self.parser.gets()
        while reply is False:
            chunk = self.sock.recv(1 << 20)
            assert chunk, "Redis closed the witness's connection"
            self.parser.feed(chunk)
            reply = self.parser.gets()
        return reply

    def heard(self, done: Callable[[bytes], bool], what: str) -> bytes:
        """Read announcements until one for which ``done(payload)`` holds; return it."""
        self.sock.settimeout(WAIT)
        for payload in self.payloads:
            if done(payload):
                return payload
        while True:
            try:
                reply = self._next()
            except TimeoutError:
                raise AssertionError(f"Redis announced no {what} within {WAIT}s "
                                     f"(last: {self.payloads[-3:]!r})") from None
            assert isinstance(reply, list) and reply[0] == b"message", reply
            payload = reply[2]
            assert isinstance(payload, bytes)
            self.payloads.append(payload)
            if done(payload):
                return payload

    def said(self, text: bytes) -> bytes:
        """Wait until a message ending with the line ``text`` was announced."""
        return self.heard(lambda p: p.endswith(b"> " + text + b"\n") or p.endswith(text),
                          repr(text))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def witness(redis_server: RedisServer) -> Iterator[Witness]:
    seen = Witness(socket.create_connection((redis_server.host, redis_server.port), WAIT))
    yield seen
    seen.close()


def replay(chatter: Chatter) -> list[bytes]:
    """The framed history a chatter is given next, each line without its time (checked)."""
    first = chatter.line()
    assert first == RECENT, f"{chatter.name} got {first!r}, expected {RECENT!r}"
    out: list[bytes] = []
    times = minutes(STARTED)
    while (line := chatter.line()) != END_OF_RECENT:
        stamp, _, rest = line.partition(b" ")
        assert stamp in times, f"{line!r}: {stamp!r} is no time since the tests began"
        out.append(rest)
    return out


def late(line: bytes) -> bytes:
    """A line marked as delayed, without its mark (its time, if shown, checked)."""
    found = DELAYED.fullmatch(line)
    assert found is not None, f"not a delayed line: {line!r}"
    if found[1] is not None:
        assert found[1] in minutes(STARTED), f"{line!r}: no time since the tests began"
    return found[2] + b"\n"


def joined(name: str, room: str = "lobby") -> bytes:
    return f"*** {name} joined {room}\n".encode()


def left(name: str, room: str = "lobby") -> bytes:
    return f"*** {name} left {room}\n".encode()


def said(chatter: Chatter, text: str) -> bytes:
    return f"<{chatter.name}> {text}\n".encode()


def talk(server: ServerProcess, chatter: Chatter, lines: Sequence[str]) -> None:
    """Each line its own message: the next is sent once the instance has read the last."""
    for text in lines:
        send_message(server, chatter.client, text.encode() + b"\n")


def stopped(server: ServerProcess) -> Event:
    assert server.stop(signal.SIGTERM) == 0, server.describe()
    (event,) = server.events("server.stopped")
    return event


def entries(redis: RedisServer, stream: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XRANGE - +: each entry's id and fields."""
    reply = redis.command("XRANGE", stream, "-", "+")
    assert isinstance(reply, list), reply
    out: list[tuple[bytes, dict[bytes, bytes]]] = []
    for entry in reply:
        assert isinstance(entry, list) and isinstance(entry[0], bytes), entry
        flat = entry[1]
        assert isinstance(flat, list), entry
        fields = {k: v for k, v in zip(flat[::2], flat[1::2], strict=True)
                  if isinstance(k, bytes) and isinstance(v, bytes)}
        out.append((entry[0], fields))
    return out


def until(chatter: Chatter, last: bytes) -> list[bytes]:
    """Every line a chatter gets up to and including ``last``."""
    lines: list[bytes] = []
    while not lines or lines[-1] != last:
        lines.append(chatter.line())
    return lines


def cut_instance(
        start_server: StartServer, tcp_proxy: ProxyFactory, redis: RedisServer,
        *extra: str) -> tuple[ServerProcess, ServerProcess, TcpProxy]:
    """Instance A on Redis and B through a proxy, both ready."""
    a = instance(start_server, redis.url, *extra)
    proxy = tcp_proxy(redis.host, redis.port)
    b = instance(start_server, proxy.url, *extra)
    return a, b, proxy


def cut(b: ServerProcess, proxy: TcpProxy) -> None:
    """Cut B off: its links end at once (RST), and a redial is refused."""
    before = len(b.events("redis.disconnected"))
    proxy.cut()
    wait_event_count(b, "redis.disconnected", before + 1, WAIT, on_link("subscribe"))
    proxy.wait(lambda: proxy.refused >= 1, "refused redial")


def restore(b: ServerProcess, proxy: TcpProxy, sessions: int = 2) -> None:
    """Let B back in and wait until it resubscribed and synced (its ``sessions``-th time)."""
    proxy.restore()
    wait_ready(b, sessions, timeout=3 * WAIT)


# --------------------------------------------------------------------------
# 1. The past outlives the instance that heard it
# --------------------------------------------------------------------------


def test_an_instance_started_after_another_stopped_gives_a_newcomer_its_messages(
        start_server: StartServer, redis_server: RedisServer, witness: Witness) -> None:
    a = instance(start_server, redis_server.url, *CHAT)
    alice = join(a)
    lines = ["one", "two \x1b[31mred", "three"]
    talk(a, alice, lines)
    witness.said(b"three")
    stopped(a)
    assert redis_server.command("HKEYS", STREAMS) == [LOBBY_STREAM.encode()]
    kept = entries(redis_server, LOBBY_STREAM)  # m: the payload as published; n: its number
    assert kept and all(set(fields) == {b"m", b"n"} for _, fields in kept), kept
    assert [int(f[b"n"]) for _, f in kept] == list(range(1, len(kept) + 1))
    assert [f[b"m"] for _, f in kept if f[b"m"].endswith(said(alice, "three"))], kept

    b = instance(start_server, redis_server.url, *CHAT)
    bob = join(b)
    past = replay(bob)
    expected = [joined(alice.name), said(alice, "one"), said(alice, "two ^[[31mred"),
                said(alice, "three")]
    assert past[:4] == expected, past
    assert past[4:] in ([], [left(alice.name)]), past  # A's goodbye, if it was news elsewhere
    carol = join(b, bob)  # the same past for everyone, then live lines
    assert replay(carol) == [*past, joined(bob.name)]
    bob.say("live")
    carol.expect(said(bob, "live"))


def test_raw_mode_an_instance_started_after_another_stopped_gives_a_newcomer_the_past_bytes(
        start_server: StartServer, redis_server: RedisServer, witness: Witness) -> None:
    a = instance(start_server, redis_server.url, "--history", "10")
    sender = a.connect()
    messages = [b"first \x00\xff", b"second\r\n", b"third"]
    for message in messages:
        send_message(a, sender, message)
    witness.heard(lambda p: p.endswith(b"third"), "the third message")
    stopped(a)
    assert [fields for _, fields in entries(redis_server, RAW_STREAM)][-1][b"m"].endswith(
        b"third")

    b = instance(start_server, redis_server.url, "--history", "10")
    newcomer = b.connect()
    past = b"".join(messages)
    assert recv_exactly(newcomer.sock, len(past)) == past
    other = b.connect()
    send_message(b, other, b"live")
    assert recv_exactly(newcomer.sock, 4) == b"live"  # next: nothing else came before it


# --------------------------------------------------------------------------
# 2. Every instance gives the same past
# --------------------------------------------------------------------------


def test_a_newcomer_to_b_gets_the_lobby_history_a_heard_while_a_still_runs(
        start_server: StartServer, redis_server: RedisServer, witness: Witness) -> None:
    a = instance(start_server, redis_server.url, *CHAT)
    alice = join(a)
    talk(a, alice, ["hello", "anyone?"])
    witness.said(b"anyone?")
    b = instance(start_server, redis_server.url, *CHAT)  # after the lines: from the stream
    bob = join(b)
    expected = [joined(alice.name), said(alice, "hello"), said(alice, "anyone?")]
    assert replay(bob) == expected
    alice.expect(joined(bob.name))
    carol = join(a, alice)  # A's own history is the same, bob's join (from B) included
    assert replay(carol) == [*expected, joined(bob.name)]
    bob.expect(joined(carol.name))
    dave = join(b, bob, carol)
    alice.expect(joined(dave.name))
    assert replay(dave) == [*expected, joined(bob.name), joined(carol.name)]


def test_a_rooms_history_outlives_the_room_on_every_instance(
        start_server: StartServer, redis_server: RedisServer, witness: Witness) -> None:
    a = instance(start_server, redis_server.url, *CHAT)
    b = instance(start_server, redis_server.url, *CHAT)
    bob = join(b)
    a.wait_event("redis.received")  # bob's join reached A before alice came
    alice = join(a)
    assert replay(alice) == [joined(bob.name)]
    bob.expect(joined(alice.name))
    alice.say("/join den")
    alice.expect("*** you are now in den\n")  # a new room: no history, no frame
    bob.expect(left(alice.name))
    talk(a, alice, ["in the den", "bye den"])
    alice.say("/part")  # the den is empty, so gone as a room; its past stays
    alice.expect("*** you are now in lobby\n")
    assert replay(alice) == [joined(bob.name), joined(alice.name), left(alice.name)]
    bob.expect(joined(alice.name))  # after the den's lines: B has heard them all
    den = [joined(alice.name, "den"), said(alice, "in the den"), said(alice, "bye den")]

    bob.say("/join den")  # on another instance than the one it was said on
    bob.expect("*** you are now in den\n")
    past = replay(bob)
    assert past[:3] == den and past[3:] in ([], [left(alice.name, "den")]), past
    alice.expect(left(bob.name))
    witness.heard(lambda p: p.endswith(joined(bob.name, "den")), "bob's join of the den")
    c = instance(start_server, redis_server.url, *CHAT)  # after it all: the den's stream
    carol = join(c)
    alice.expect(joined(carol.name))
    replay(carol)
    carol.say("/join den")
    carol.expect("*** you are now in den\n")
    assert replay(carol) == [*past, joined(bob.name, "den")]
    bob.expect(joined(carol.name, "den"))


# --------------------------------------------------------------------------
# 3. An instance cut off gets the gap back: in order, once, marked late
# --------------------------------------------------------------------------


def test_an_instance_cut_off_from_redis_gets_every_line_of_the_gap_in_order_once(
        start_server: StartServer, redis_server: RedisServer, tcp_proxy: ProxyFactory,
        witness: Witness) -> None:
    a, b, proxy = cut_instance(start_server, tcp_proxy, redis_server, *CHAT, *KEEP_NAMES)
    bob = join(b)
    a.wait_event("redis.received")  # bob's join reached A before alice came
    alice = join(a)
    assert replay(alice) == [joined(bob.name)]
    bob.expect(joined(alice.name))
    bea = join(b, bob)
    assert replay(bea) == [joined(bob.name), joined(alice.name)]
    alice.expect(joined(bea.name))
    talk(a, alice, ["before the cut"])
    for person in (bob, bea):
        person.expect(said(alice, "before the cut"))

    cut(b, proxy)
    for person in (bob, bea):
        person.expect(UNREACHABLE)
    gap = [f"gap-{i:02d}" for i in range(20)]
    talk(a, alice, gap)
    witness.said(b"gap-19")
    restore(b, proxy)
    talk(a, alice, ["after the restore"])
    for person in (bob, bea):
        got = until(person, said(alice, "after the restore"))
        assert got.count(RECONNECTED) == 1, got
        got.remove(RECONNECTED)
        assert [late(line) for line in got[:-1]] == [said(alice, text) for text in gap], got
    bea.say("bea is back")
    alice.expect(said(bea, "bea is back"))
    bob.expect(said(bea, "bea is back"))
    synced = b.events("redis.synced")[-1]
    assert synced["missed"] == len(gap) and synced["gaps"] == 0, synced
    assert not b.events("redis.gap")
    assert not b.events("redis.missed"), b.events("redis.missed")  # the stream filled it
    # And the history is the same on both instances again: the gap's lines are in B's, as
    # they were said (a replay shows each line's time; "delayed" was news for those present).
    dave = join(a, alice, bob, bea)
    past = replay(dave)
    assert past[-2:] == [said(alice, "after the restore"), said(bea, "bea is back")], past
    erin = join(b, alice, bob, bea, dave)
    assert replay(erin) == [*past[1:], joined(dave.name)]
    assert stopped(b)["redis_gaps"] == 0


def test_a_gap_longer_than_the_stream_is_a_counted_warning_and_a_notice(
        start_server: StartServer, redis_server: RedisServer, tcp_proxy: ProxyFactory,
        witness: Witness) -> None:
    a, b, proxy = cut_instance(start_server, tcp_proxy, redis_server, *CHAT, *KEEP_NAMES)
    bob = join(b)
    a.wait_event("redis.received")
    alice = join(a)
    assert replay(alice) == [joined(bob.name)]
    bob.expect(joined(alice.name))
    talk(a, alice, ["before the cut"])
    bob.expect(said(alice, "before the cut"))
    cut(b, proxy)
    bob.expect(UNREACHABLE)
    # More than the stream keeps (N, and up to a node of 100 entries more: MAXLEN ~).
    count = STREAM_MIN + 200
    gap = [f"gap-{i:04d}" for i in range(count)]
    talk(a, alice, gap)
    witness.said(gap[-1].encode())
    kept = entries(redis_server, LOBBY_STREAM)
    assert len(kept) < count, f"the stream kept {len(kept)} of {count}: no gap to test"
    restore(b, proxy)
    warning = b.wait_event("redis.gap")
    assert warning["level"] == "warning", warning
    talk(a, alice, ["after the restore"])
    got = until(bob, said(alice, "after the restore"))
    notices = [line for line in got if line.startswith(b"*** ") and line != RECONNECTED]
    assert len(notices) == 1 and b"missed" in notices[0], notices
    assert got.count(RECONNECTED) == 1, got[:5]
    recovered = [late(line) for line in got[:-1] if line not in (RECONNECTED, notices[0])]
    # What the stream still held: the newest lines of the gap, in order, each once.
    assert recovered, got[:5]
    first = gap.index(recovered[0].decode().split("> ", 1)[1].rstrip("\n"))
    assert recovered == [said(alice, text) for text in gap[first:]], recovered[:3]
    assert first > 0
    assert stopped(b)["redis_gaps"] == 1


# --------------------------------------------------------------------------
# 4. Entries nobody wrote
# --------------------------------------------------------------------------


def test_an_entry_added_by_hand_is_history_cleaned_and_one_without_m_is_skipped_and_counted(
        start_server: StartServer, redis_server: RedisServer, witness: Witness) -> None:
    a = instance(start_server, redis_server.url, *CHAT)
    alice = join(a)  # the lobby's stream exists, and is listed
    witness.heard(lambda p: p.endswith(b" joined lobby\n"), "alice's join")
    redis_server.command("XADD", LOBBY_STREAM, "*", "m", b"hello from redis-cli \x1b[31mred")
    redis_server.command("XADD", LOBBY_STREAM, "*", "other", "field")
    b = instance(start_server, redis_server.url, *CHAT)
    bob = join(b)
    assert replay(bob) == [joined(alice.name), b"hello from redis-cli ^[[31mred\n"]
    (skipped,) = b.events("redis.skipped")
    assert skipped["level"] == "warning" and skipped["stream"] == LOBBY_STREAM, skipped
    alice.expect(joined(bob.name))
    bob.say("still serving")
    alice.expect(said(bob, "still serving"))
    assert stopped(b)["redis_skipped"] == 1


def test_entries_added_by_hand_during_a_cut_are_recovered_cleaned_or_skipped_never_a_crash(
        start_server: StartServer, redis_server: RedisServer, tcp_proxy: ProxyFactory,
        witness: Witness) -> None:
    a, b, proxy = cut_instance(start_server, tcp_proxy, redis_server, *CHAT, *KEEP_NAMES)
    bob = join(b)
    a.wait_event("redis.received")
    alice = join(a)
    assert replay(alice) == [joined(bob.name)]
    bob.expect(joined(alice.name))
    cut(b, proxy)
    bob.expect(UNREACHABLE)
    redis_server.command("XADD", LOBBY_STREAM, "*", "m", b"by hand \x07\x1b]0;t\x07")
    redis_server.command("XADD", LOBBY_STREAM, "*", "other", "field")
    redis_server.command("XADD", LOBBY_STREAM, "*", "m", b"\xff\xfe not utf-8")
    talk(a, alice, ["after the hand"])
    witness.said(b"after the hand")
    restore(b, proxy)
    talk(a, alice, ["live again"])
    got = until(bob, said(alice, "live again"))
    got.remove(RECONNECTED)
    assert [late(line) for line in got[:-1]] == [
        b"by hand ^G^[]0;t^G\n", "\ufffd\ufffd not utf-8\n".encode(),
        said(alice, "after the hand")], got
    bob.say("still serving")
    alice.expect(said(bob, "still serving"))
    (skipped,) = b.events("redis.skipped")
    assert skipped["level"] == "warning" and skipped["stream"] == LOBBY_STREAM, skipped
    carol = join(b, bob)
    alice.expect(joined(carol.name))
    past = replay(carol)  # the recovered lines as they were said: no "delayed" in history
    assert past[-5:] == [b"by hand ^G^[]0;t^G\n", "\ufffd\ufffd not utf-8\n".encode(),
                         said(alice, "after the hand"), said(alice, "live again"),
                         said(bob, "still serving")], past
    assert stopped(b)["redis_skipped"] == 1
