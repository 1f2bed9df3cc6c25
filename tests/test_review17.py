"""Review of issue 17 (the shared history in Redis streams): defects found, each a failing test.

Real ``redis-server``, real fsmchat processes, real sockets (tests/test_streams.py's helpers).
Each test says what the design or the docs promise and shows the code not doing it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chat_harness import Chatter, join
from conftest import WAIT, ServerProcess, StartServer, recv_exactly, wait_event_count
from redis_harness import RedisServer, bug_free
from tcp_proxy import ProxyFactory
from test_redis import on_link, send_message
from test_streams import (
    CHANNEL,
    CHAT,
    KEEP_NAMES,
    LOBBY_STREAM,
    STREAMS,
    Witness,
    cut,
    cut_instance,
    instance,
    joined,
    replay,
    restore,
    said,
    talk,
    wait_ready,
)

from fsmchat.redis.presence import UNREACHABLE

pytest_plugins = ["redis_harness", "tcp_proxy"]


@pytest.fixture
def start_server(start_server: StartServer) -> Iterator[StartServer]:
    """No instance may log a ``lifecycle.bug`` or a ``server.bug``."""
    servers: list[ServerProcess] = []

    def start(*args: str, started: bool = True) -> ServerProcess:
        server = start_server(*args, started=started)
        servers.append(server)
        return server

    yield from bug_free(start)
    bugs = [(s.args, e) for s in servers for e in s.events("server.bug")]
    assert not bugs, f"server.bug logged: {bugs[:3]}"


@pytest.fixture
def witness(redis_server: RedisServer) -> Iterator[Witness]:
    seen = Witness(socket.create_connection((redis_server.host, redis_server.port), WAIT))
    yield seen
    seen.close()


def lines_until(chatter: Chatter, last: bytes, timeout: float = WAIT) -> list[bytes]:
    """Every line ``chatter`` gets up to and including ``last``; fails (saying what did come)
    when ``last`` does not come within ``timeout``."""
    deadline = time.monotonic() + timeout
    got: list[bytes] = []
    while not got or got[-1] != last:
        remaining = deadline - time.monotonic()
        try:
            got.append(chatter.line(max(remaining, 0.01)))
        except AssertionError:
            raise AssertionError(f"{chatter.name} never got {last!r} within {timeout}s; "
                                 f"got {got!r}") from None
    return got


def pair(start_server: StartServer, redis: RedisServer,
         *extra: str) -> tuple[ServerProcess, ServerProcess, Chatter, Chatter]:
    """Instances A and B, alice on A and bob on B in the lobby, each told of the other."""
    a = instance(start_server, redis.url, *extra)
    b = instance(start_server, redis.url, *extra)
    bob = join(b)
    a.wait_event("redis.received")  # bob's join reached A before alice came
    alice = join(a)
    if "--history" in extra:
        assert replay(alice) == [joined(bob.name)]
    bob.expect(joined(alice.name))
    return a, b, alice, bob


# --------------------------------------------------------------------------
# 1. A forged `fsmchat1s` line silences a room on every instance, for good
# --------------------------------------------------------------------------


def test_a_forged_entry_id_on_the_channel_does_not_silence_the_room(
        start_server: StartServer, redis_server: RedisServer) -> None:
    """bus.py's docstring: "the channel is untrusted ... a forged number ahead ... costs the
    one real message it equals". SubscribeLink._live takes the entry id of any well-made
    ``fsmchat1s`` line as the stream's last seen (``_seen``), so one ``PUBLISH`` with an id far
    ahead makes every later real entry of that stream a "repeat" (``key <= last``), and every
    sync asks only for entries after it: the room is silent on that instance until it
    restarts."""
    a, _b, alice, bob = pair(start_server, redis_server, *CHAT)
    talk(a, alice, ["before the forgery"])
    bob.expect(said(alice, "before the forgery"))
    forged = b"fsmchat1s %s 99999999999999-0 1\nforged\n" % LOBBY_STREAM.encode()
    assert redis_server.publish(CHANNEL, forged) == 2  # both instances' subscribers heard it
    talk(a, alice, ["after the forgery"])
    got = lines_until(bob, said(alice, "after the forgery"))
    assert got[-1] == said(alice, "after the forgery")


# --------------------------------------------------------------------------
# 2. A value written by hand in the streams hash stops every room message of every instance
# --------------------------------------------------------------------------


def test_a_non_numeric_count_in_the_streams_hash_does_not_stop_the_chat(
        start_server: StartServer, redis_server: RedisServer) -> None:
    """The brief: what someone writes by hand is "cleaned ... or skipped with a counted
    warning, never a crash". PUBLISH_SCRIPT starts with ``HINCRBY <streams> <stream> 1``: a
    count that is no integer (``HSET ... x``, or one at 2^63-1) makes the script fail, the
    publish link takes the error as "PUBLISH refused" and loses the session, sends the same
    message again on reconnect, is refused again: forever. Nothing A's clients say reaches
    another instance any more (private messages included: they wait behind it in the outbox),
    and read_sync's ``added.isdigit()`` makes every instance's sync Malformed as well."""
    a, _b, alice, bob = pair(start_server, redis_server, *CHAT)
    talk(a, alice, ["before the hset"])
    bob.expect(said(alice, "before the hset"))
    assert redis_server.command("HSET", STREAMS, LOBBY_STREAM, "x") == 0  # (it was there)
    talk(a, alice, ["after the hset"])
    got = lines_until(bob, said(alice, "after the hset"))
    assert got[-1] == said(alice, "after the hset")


# --------------------------------------------------------------------------
# 3. --history 0 (the default): a reconnect replays the whole stream as "missed"
# --------------------------------------------------------------------------


def test_with_the_default_history_a_reconnect_does_not_deliver_the_past_as_missed(
        start_server: StartServer, redis_server: RedisServer, tcp_proxy: ProxyFactory,
        witness: Witness) -> None:
    """With --history 0 (the default) the first sync fetches no tail (``tonumber(ARGV[1]) >
    0``), so no stream becomes known, and SubscribeLink.synced then sets ``high = (0, 0)``. At
    the next resubscribe every stream not heard live since start is "unknown" and the sync
    asks for all its entries after 0-0: everything the stream holds, said before this
    instance started, reaches its clients as missed, up to 1000 entries (raw mode, the
    default, has one stream, unknown until a message is heard live). With a trimmed stream
    the same path reports a false ``redis.gap`` (``_expected`` is 1 for an unknown stream
    with no older entry kept)."""
    a = instance(start_server, redis_server.url)
    sender = a.connect()
    send_message(a, sender, b"old bytes ")
    witness.heard(lambda p: p.endswith(b"old bytes "), "the old bytes")
    proxy = tcp_proxy(redis_server.host, redis_server.port)
    b = instance(start_server, proxy.url)
    receiver = b.connect()
    cut(b, proxy)
    restore(b, proxy)
    send_message(a, sender, b"live")
    got = recv_exactly(receiver.sock, 4)
    assert got == b"live", f"B's client, connected after it was said, got {got!r} first"
    assert not b.events("redis.gap")


# --------------------------------------------------------------------------
# 4. Past SYNC_MAX, what was missed is lost without a word
# --------------------------------------------------------------------------


def test_messages_missed_before_a_late_sync_are_delivered_or_told_as_a_gap(
        start_server: StartServer, redis_server: RedisServer, tcp_proxy: ProxyFactory,
        witness: Witness) -> None:
    """bus.py, SYNC_MAX: "past it they go on, and what the answer then brings that is older
    counts as a gap". But once the held live messages went on, ``last_ids`` holds their ids:
    the sync (re)sent then asks only after them, and ``read_sync`` filters what an older sync
    brings by the current ``last_ids`` too (``entry.key > bound``), so ``_take``'s
    ``overtaken`` count never sees it; the first-number check compares with the released
    entry's number. The messages missed during the outage are neither delivered nor told.

    The history link's sync is held off with an ACL that refuses EVAL (the sync is the only
    EVAL: publish and presence use EVALSHA), as a history link that cannot get an answer for
    longer than SYNC_MAX."""
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
    missed = [f"missed-{i}" for i in range(3)]
    talk(a, alice, missed)
    witness.said(b"missed-2")
    assert redis_server.command("ACL", "SETUSER", "default", "-eval") == b"OK"
    syncs = len(b.events("redis.synced"))
    proxy.restore()
    wait_event_count(b, "redis.connected", 2, WAIT, on_link("subscribe"))
    talk(a, alice, ["held"])  # held by B's subscriber until SYNC_MAX lets it go
    before = lines_until(bob, said(alice, "held"), timeout=3 * WAIT)
    assert redis_server.command("ACL", "SETUSER", "default", "+eval") == b"OK"
    wait_event_count(b, "redis.synced", syncs + 1, 3 * WAIT)
    wait_ready(b, 2, timeout=3 * WAIT)
    talk(a, alice, ["after"])
    got = before + lines_until(bob, said(alice, "after"))
    recovered = [text for text in missed if any(line.endswith(said(alice, text))
                                                  for line in got)]
    gaps = b.events("redis.gap")
    assert recovered == missed or gaps, (
        f"of {missed} bob got {recovered}, and B logged no redis.gap: {got!r}")


# --------------------------------------------------------------------------
# 5. During a sync, a private message overtakes the room line said before it
# --------------------------------------------------------------------------


def test_during_a_sync_a_private_message_does_not_overtake_the_room_line_before_it(
        start_server: StartServer, redis_server: RedisServer, tcp_proxy: ProxyFactory) -> None:
    """bus.py: "Per sender, order holds everywhere". While a sync runs, SubscribeLink._live
    holds back only ``fsmchat1s`` payloads (stream entries); a plain PUBLISH (a ``/msg``, or
    any message of an instance with --no-redis-streams) goes to the chat at once. So alice's
    room line (seq n) waits while her private message (seq n + 1) is delivered first; the
    envelope check then sees n skipped (a false ``redis.missed``) and, when the held line
    comes, delivers it as filling a gap: marked ``(delayed)``. Any sync is such a window (one
    round trip at least); here it is held open by an ACL that refuses the sync's EVAL."""
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
    assert redis_server.command("ACL", "SETUSER", "default", "-eval") == b"OK"
    proxy.restore()
    wait_event_count(b, "redis.connected", 2, WAIT, on_link("subscribe"))
    talk(a, alice, ["in the room", f"/msg {bob.name} in private"])
    private = f"*{alice.name}* in private\n".encode()
    got = lines_until(bob, private, timeout=3 * WAIT)
    assert said(alice, "in the room") in got, (
        f"bob got alice's private message before her room line said first: {got!r}")
    assert redis_server.command("ACL", "SETUSER", "default", "+eval") == b"OK"
    assert not b.events("redis.missed"), b.events("redis.missed")


# --------------------------------------------------------------------------
# 6. A session Redis keeps refusing tells every user of every retry
# --------------------------------------------------------------------------


def test_a_link_refused_at_each_retry_is_one_outage_for_the_users(
        start_server: StartServer, redis_server: RedisServer) -> None:
    """docs/operating.md, "Outages, as users hear them": the unreachable notice comes "once per
    outage: the first loss; retries say nothing", and "a link Redis drops again within 5 s is
    the same outage". A link whose session is refused by a reply (here the history link's
    sync, refused by an ACL) reconnects fine and is lost again at once: that is one outage for
    the users, told once, not a pair of notices every retry."""
    a, _b, alice, _bob = pair(start_server, redis_server, *CHAT)
    assert redis_server.command("ACL", "SETUSER", "default", "-eval") == b"OK"
    subscriber = [client for client in client_list(redis_server)
                  if b"cmd=subscribe" in client or b"flags=P" in client]
    assert subscriber
    for client in subscriber:  # every subscriber comes back, and each one's sync is refused
        redis_server.command("CLIENT", "KILL", "ID", client.split()[0].split(b"=")[1])
    wait_event_count(a, "redis.retrying", 3, 3 * WAIT, on_link("history"))
    assert redis_server.publish(CHANNEL, b"marker\n") == 2
    got = lines_until(alice, b"marker\n")
    assert got.count(UNREACHABLE) <= 1, f"alice was told of every retry: {got!r}"
    assert redis_server.command("ACL", "SETUSER", "default", "+eval") == b"OK"


def client_list(redis: RedisServer) -> list[bytes]:
    reply = redis.command("CLIENT", "LIST")
    assert isinstance(reply, bytes)
    return reply.splitlines()


# --------------------------------------------------------------------------
# 7. A sync's one reply grows with every stream ever made: past 32 MiB it never succeeds
# --------------------------------------------------------------------------

FILL = b"""
for r = 1, tonumber(ARGV[2]) do
  local s = KEYS[1] .. r
  for i = 1, tonumber(ARGV[3]) do
    local n = redis.call('HINCRBY', KEYS[2], s, 1)
    redis.call('XADD', s, 'MAXLEN', '~', ARGV[3], '*', 'm', ARGV[1], 'n', n)
  end
end
return 1
"""


def test_a_sync_succeeds_however_many_rooms_the_streams_hold(
        start_server: StartServer, redis_server: RedisServer) -> None:
    """SYNC_SCRIPT answers every stream of ``<channel>:streams`` (every room ever made: no
    stream or hash field is ever removed) in ONE reply: its newest N entries at a start, all
    it holds after a reconnect for a stream not heard live. The link takes a reply of at most
    REPLY_MAX (32 MiB) and otherwise loses the session and syncs again, with the same
    answer: ten rooms of 1,000 lines of 4 KiB (--max-line's default) and no instance can ever
    sync again; each one's users hear of every retry, and live messages wait SYNC_MAX at each
    resubscribe. (Redis also runs the whole script at once, blocked meanwhile.) Fix: page the
    sync (a bounded number of entries per reply, or one stream per call)."""
    filled = redis_server.command(
        "EVAL", FILL, "2", f"{LOBBY_STREAM[:-len('lobby')]}room", STREAMS,
        b"x" * 4000 + b"\n", "10", "1000")
    assert filled == 1, filled
    server = start_server("--redis", redis_server.url, "--mode", "chat", "--history", "1000")
    wait_event_count(server, "redis.synced", 1, 3 * WAIT)


# --------------------------------------------------------------------------
# 8. After an outage in which both sides spoke, two instances keep different pasts
# --------------------------------------------------------------------------


def line_ending(chatter: Chatter, end: bytes) -> list[bytes]:
    """Every line ``chatter`` gets up to and including the first that ends with ``end``."""
    got: list[bytes] = []
    while not got or not got[-1].endswith(end):
        got.append(chatter.line())
    return got


def test_after_an_outage_both_instances_give_a_newcomer_the_same_past(
        start_server: StartServer, redis_server: RedisServer, tcp_proxy: ProxyFactory,
        witness: Witness) -> None:
    """docs/operating.md: "a newcomer on any instance, or after any restart, is given the same
    past"; commit 21b1e19: late lines are kept "as said ... the same on every instance". But a
    relayed line that comes late is appended at the end of the room's history
    (ChatMode.relay_on -> Recent.add, with only its minute): B, cut off, keeps its own line where
    it said it and the others' lines after it, while the stream (and A) has them the other way
    round. Fix: place recovered/late lines by their entry order (or said time), or rebuild a
    room's history from its stream after a sync."""
    a, b, proxy = cut_instance(start_server, tcp_proxy, redis_server, *CHAT, *KEEP_NAMES)
    bob = join(b)
    a.wait_event("redis.received")
    alice = join(a)
    assert replay(alice) == [joined(bob.name)]
    bob.expect(joined(alice.name))
    cut(b, proxy)
    bob.expect(UNREACHABLE)
    talk(a, alice, ["alice during the cut"])
    witness.said(b"alice during the cut")
    talk(b, bob, ["bob during the cut"])
    restore(b, proxy)
    line_ending(bob, said(alice, "alice during the cut"))
    line_ending(alice, said(bob, "bob during the cut"))
    dave = join(a, alice, bob)
    on_a = replay(dave)
    erin = join(b, alice, bob, dave)
    on_b = replay(erin)
    assert on_b == [*on_a, joined(dave.name)], f"A: {on_a!r}\nB: {on_b!r}"


# --------------------------------------------------------------------------
# 9. --history-file: one damaged length loses every record after it, for good
# --------------------------------------------------------------------------


def test_a_damaged_length_in_the_history_file_loses_only_its_record(
        start_server: StartServer, tmp_path: Path) -> None:
    """history_file.py: "a record framed right whose CRC or body is wrong is skipped alone".
    A frame whose length digit is damaged (a bit flip, a bad sector) still matches ``_FRAME``,
    but ``_scan`` then finds no newline where the body should end and ``break``s: every whole,
    CRC-checked record after it counts as "the torn tail", is not loaded, and the next write
    cuts the file back to before it (``_tail_at``): the whole history is gone because of one
    byte at its start. Fix: on a frame whose end does not check, look for the next frame whose
    CRC checks (resync) and treat only what cannot be resynced as the torn tail."""
    path = tmp_path / "history"
    chat = ("--mode", "chat", "--history", "20", "--history-file", str(path))
    server = start_server(*chat)
    server.wait_event("history.loaded")
    alice = join(server)
    alice.say("kept line")
    server.wait_received_from(alice.client, len(b"kept line\n"))
    alice.say("/quit")
    server.wait_event("connection.closed")
    assert server.stop() == 0
    content = path.read_bytes()
    first = content.index(b"\nr ") + 1  # the first record: alice's join
    length = int(content[first + 2:first + 10], 16)
    damaged = content[:first + 2] + b"%08x" % (length + 1) + content[first + 10:]
    path.write_bytes(damaged)

    again = start_server(*chat)
    loaded = again.wait_event("history.loaded")
    assert loaded["records"] == 2, (loaded, again.events("history.skipped"))  # the rest
    bob = join(again)
    bob.expect_replay(f"<{alice.name}> kept line\n", f"*** {alice.name} left lobby\n")
