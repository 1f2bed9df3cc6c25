"""Presence across instances: names unique wherever people connect, who is where, and what
people hear when the other instances cannot be reached.

Two parts. In process, two ``Presence`` objects (two instances, each with its own bus and links)
share one event loop and a real ``redis-server``: the claim rules (who keeps a name when two
ask at once, or both took it while Redis was away), the view (announcements, a full read that
heals a gap, nothing malformed let in) and the sweep of a vanished instance's names are driven
from here, where the moment of each step can be chosen. Black-box, real fsmchat processes in
chat mode on a real Redis: the outage notices and the delayed marks, as a person sees them.
"""

from __future__ import annotations

import io
import signal
import time
from collections.abc import Callable, Iterator
from zoneinfo import ZoneInfo

import orjson
import pytest
from conftest import WAIT, ServerProcess, StartServer, wait_event_count
from redis_harness import RedisServer, bug_free
from test_redis import send_message, start_instance
from test_redis_chat import Person

from fsmchat.chat.rooms import room_key
from fsmchat.chat.text import is_name, room_problem, skeleton
from fsmchat.hub import Hub, Limits
from fsmchat.net.loop import EventLoop
from fsmchat.ops.events import make_logger
from fsmchat.ops.logstream import LogStream
from fsmchat.redis.bus import RedisBus
from fsmchat.redis.link import RedisAddress
from fsmchat.redis.presence import RECONNECTED, UNREACHABLE, Presence, Rules, delayed, now_us

pytest_plugins = ["redis_harness"]

TTL = 1.5  # seconds: short, so that a vanished instance is swept within a test
RULES = Rules(skeleton, is_name, lambda room: room_problem(room) is None, room_key)


@pytest.fixture
def start_server(start_server: StartServer) -> Iterator[StartServer]:
    yield from bug_free(start_server)


# --------------------------------------------------------------------------
# In process: instances as objects in one loop
# --------------------------------------------------------------------------


class Node:
    """One instance's presence: its hub (no clients), bus, links, and what it was told."""

    def __init__(self, loop: EventLoop, redis: RedisServer, channel: str = "fsmchat") -> None:
        self.out = io.BytesIO()
        self.sink = LogStream.memory(self.out)
        self.log = make_logger(self.sink, "info", "json")
        self.hub = Hub(loop, self.log, Limits(1 << 20), gone=lambda conn: None)
        self.bus = RedisBus(RedisAddress.parse(redis.url), channel, loop, self.log,
                            outbox_limit=1 << 20, payload_limit=1 << 20,
                            deliver=lambda payload, msg_id: False)
        self.presence = Presence(self.hub, self.bus, loop, self.log, ttl=TTL, rules=RULES)
        self.lost: list[tuple[object, bytes, bytes]] = []
        self.presence.on_lost = lambda who, name, holder: self.lost.append((who, name, holder))
        self.answers: dict[object, list[bytes | None]] = {}

    @property
    def id(self) -> bytes:
        return self.bus.origin

    def ask(self, who: str, name: bytes) -> None:
        """``who`` types /nick NAME: what they are answered lands in ``answers[who]``."""
        self.presence.rename(who, name, self.answers.setdefault(who, []).append)

    def linked(self) -> bool:
        return len(self.bus.up) == len(self.bus.links)

    def events(self, name: str) -> list[dict[str, object]]:
        self.sink.flush()
        lines = [orjson.loads(line) for line in self.out.getvalue().splitlines()]
        return [e for e in lines if e["event"] == name]


class Cluster:
    """Nodes on one loop; ``until`` runs the loop until a condition holds."""

    def __init__(self, redis: RedisServer) -> None:
        self.loop = EventLoop()
        self.redis = redis
        self.nodes: list[Node] = []
        self.loop.before_sleep = self._end_of_turn

    def _end_of_turn(self) -> None:
        for node in self.nodes:
            node.presence.end_of_turn()

    def node(self) -> Node:
        node = Node(self.loop, self.redis)
        self.nodes.append(node)
        node.bus.start()
        return node

    def until(self, condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        loop = self.loop

        def check() -> None:
            if condition() or time.monotonic() > deadline:
                loop.stop()
            else:
                loop.call_later(0.005, check)

        loop.call_later(0, check)
        loop.run()
        assert condition(), f"no {what} within {timeout} s"

    def turn(self) -> None:
        """One loop turn, at most 50 ms: what is queued goes out (a negative check waits more)."""
        self.loop.call_later(0.05, self.loop.stop)
        self.loop.run()

    def close(self) -> None:
        for node in self.nodes:
            for link in node.bus.links:
                link.close_socket()
                if link in link.machine.models:
                    link.machine.remove_model(link)


@pytest.fixture
def cluster(redis_server: RedisServer) -> Iterator[Cluster]:
    made = Cluster(redis_server)
    yield made
    made.close()


def linked(cluster: Cluster, *nodes: Node) -> None:
    cluster.until(lambda: all(node.linked() for node in nodes), "links ready")


def names_hash(redis: RedisServer) -> dict[bytes, bytes]:
    flat = redis.command("HGETALL", "fsmchat:fsmchat:names")
    assert isinstance(flat, list)
    return {k: v for k, v in zip(flat[::2], flat[1::2], strict=True)
            if isinstance(k, bytes) and isinstance(v, bytes)}


def test_a_name_taken_on_one_instance_is_refused_on_the_other(cluster: Cluster) -> None:
    a, b = cluster.node(), cluster.node()
    linked(cluster, a, b)
    a.presence.claim("ann", b"user1-aaaa", b"lobby")
    b.presence.claim("bob", b"user1-bbbb", b"lobby")
    a.ask("ann", b"alice")
    cluster.until(lambda: a.answers["ann"] == [None], "answer to ann")
    cluster.until(lambda: b.presence.elsewhere(b"alice") == b"alice", "alice seen on B")
    assert b.presence.elsewhere(b"ALlCE") == b"alice", "look-alikes are the same name"
    assert a.presence.elsewhere(b"alice") is None, "A's own people are not 'elsewhere'"
    b.ask("bob", b"Alice")  # asked without looking first: Redis refuses it too
    cluster.until(lambda: bool(b.answers.get("bob")), "answer to bob")
    assert b.answers["bob"] == [b"alice"]
    assert sorted(b.presence.names_in(b"lobby")) == [b"alice", b"user1-bbbb"]
    assert b.presence.rooms() == {b"lobby": (b"lobby", 2)}
    assert {v.split(b" ")[2] for v in names_hash(cluster.redis).values()} == {
        b"alice", b"user1-bbbb"}, "the old name went with the rename"


def test_two_instances_asking_for_one_name_at_once_end_with_one_owner(cluster: Cluster) -> None:
    a, b = cluster.node(), cluster.node()
    linked(cluster, a, b)
    a.presence.claim("ann", b"user1-aaaa", b"lobby")
    b.presence.claim("bob", b"user1-bbbb", b"lobby")
    a.ask("ann", b"carol")
    b.ask("bob", b"carol")  # the same turn: both go to Redis at its end
    cluster.until(lambda: bool(a.answers.get("ann")) and bool(b.answers.get("bob")), "answers")
    answers = a.answers["ann"] + b.answers["bob"]
    assert sorted(answers, key=repr) == sorted([None, b"carol"], key=repr), answers
    winner, loser = (a, b) if a.answers["ann"] == [None] else (b, a)
    cluster.until(lambda: loser.presence.elsewhere(b"carol") == b"carol", "the winner seen")
    owner = names_hash(cluster.redis)[skeleton(b"carol")].split(b" ")[0]
    assert owner == winner.id


def test_a_second_question_while_the_first_waits_is_answered_with_it(cluster: Cluster) -> None:
    a = cluster.node()
    linked(cluster, a)
    a.presence.claim("ann", b"user1-aaaa", b"lobby")
    a.presence.claim("amy", b"user2-aaaa", b"lobby")
    a.ask("ann", b"dora")
    a.ask("ann", b"dina")  # before Redis answered the first
    a.ask("amy", b"DORA")  # someone else here asks for what ann asked for
    assert a.answers["ann"] == [b"dora"] and a.answers["amy"] == [b"dora"]
    cluster.until(lambda: a.answers["ann"] == [b"dora", None], "the first answer")


def test_while_redis_is_away_names_are_local_and_the_earlier_claim_wins_after(
        cluster: Cluster) -> None:
    a, b = cluster.node(), cluster.node()
    linked(cluster, a, b)
    a.presence.claim("ann", b"user1-aaaa", b"lobby")
    b.presence.claim("bob", b"user1-bbbb", b"lobby")
    cluster.until(lambda: b.presence.elsewhere(b"user1-aaaa") is not None, "ann seen on B")
    cluster.redis.kill()
    cluster.until(lambda: a.bus.apart and b.bus.apart, "the outage noticed")
    assert b.presence.names_in(b"lobby") == [b"user1-bbbb"], "Redis away: local people only"
    assert b.presence.elsewhere(b"user1-aaaa") == b"user1-aaaa", "... but their names kept"
    a.ask("ann", b"erin")
    assert a.answers["ann"] == [None], "granted at once: nobody to ask"
    later = now_us()
    while now_us() == later:  # the next microsecond: B's claim is the later one
        pass
    b.ask("bob", b"Erin")
    assert b.answers["bob"] == [None]
    cluster.redis.start()
    linked(cluster, a, b)
    cluster.until(lambda: bool(b.lost), "B told it lost the name")
    assert b.lost == [("bob", b"Erin", b"erin")]
    assert not a.lost
    assert names_hash(cluster.redis)[skeleton(b"erin")].split(b" ")[:1] == [a.id]
    [event] = b.events("presence.lost")
    assert event["name"] == "Erin" and event["instance"] == a.id.decode()


def test_a_vanished_instances_names_are_freed_after_the_ttl(cluster: Cluster) -> None:
    a = cluster.node()
    linked(cluster, a)
    ghost = b"0123456789abcdef"  # an instance that wrote its names and died
    redis = cluster.redis
    redis.command("SET", b"fsmchat:fsmchat:alive:" + ghost, "1", "PX", str(int(TTL * 1000)))
    redis.command("SADD", "fsmchat:fsmchat:instances", ghost)
    redis.command("HSET", "fsmchat:fsmchat:names", skeleton(b"frank"),
                  b"%s %d frank lobby" % (ghost, now_us()))
    redis.command("INCR", "fsmchat:fsmchat:rev")  # a change A has not heard of: A reads anew
    cluster.until(lambda: a.presence.elsewhere(b"frank") == b"frank", "frank seen", TTL)
    started = time.monotonic()
    cluster.until(lambda: a.presence.elsewhere(b"frank") is None, "frank freed", 2 * TTL)
    assert time.monotonic() - started <= TTL * 4 / 3 + 0.5
    assert skeleton(b"frank") not in names_hash(redis)
    assert a.events("presence.freed")[0]["names"] == 1
    assert redis.command("SMEMBERS", "fsmchat:fsmchat:instances") == [a.id]


def test_a_names_owner_that_never_was_alive_is_swept_by_a_full_read(cluster: Cluster) -> None:
    """Written by hand (or by an instance of another version): no alive key, in no set."""
    a = cluster.node()
    linked(cluster, a)
    cluster.until(lambda: a.presence.rev >= 0, "A's first full read")
    redis = cluster.redis
    for name, owner in ((b"lena", b"00000000000000aa"), (b"mona", b"not an instance")):
        redis.command("HSET", "fsmchat:fsmchat:names", skeleton(name), owner + b" 1 x lobby")
    redis.command("INCR", "fsmchat:fsmchat:rev")  # A's view is not current: it reads in full
    cluster.until(lambda: names_hash(redis) == {}, "the hash swept")
    assert a.presence.elsewhere(b"lena") is None


def test_a_clean_stop_takes_the_instances_names_with_it(cluster: Cluster) -> None:
    a, b = cluster.node(), cluster.node()
    linked(cluster, a, b)
    b.presence.claim("bob", b"gina", b"lobby")
    cluster.until(lambda: a.presence.elsewhere(b"gina") == b"gina", "gina seen on A")
    b.bus.drain()  # the server stops
    cluster.until(b.bus.done, "B's links closed")
    cluster.until(lambda: a.presence.elsewhere(b"gina") is None, "gina gone from A's view")
    assert names_hash(cluster.redis) == {}
    assert cluster.redis.command("EXISTS", b"fsmchat:fsmchat:alive:" + b.id) == 0


def test_a_moved_person_is_seen_in_their_room_and_released_everywhere(
        cluster: Cluster) -> None:
    a, b = cluster.node(), cluster.node()
    linked(cluster, a, b)
    a.presence.claim("ann", b"hana", b"lobby")
    a.presence.move("ann", b"Kitchen")
    cluster.until(lambda: b.presence.rooms() == {b"kitchen": (b"Kitchen", 1)},
                  "hana in the kitchen on B")
    assert b.presence.names_in(b"KITCHEN") == [b"hana"], "rooms are found in any case"
    assert sorted(b.presence.everyone()) == [(b"hana", b"Kitchen")]
    a.presence.release("ann")
    cluster.until(lambda: not b.presence.rooms(), "hana gone on B")


def test_what_the_channel_says_out_of_shape_never_enters_the_view(cluster: Cluster) -> None:
    a = cluster.node()
    linked(cluster, a)
    cluster.until(lambda: a.presence.rev >= 0, "A's first full read")
    rev = a.presence.rev + 1
    other = b"fedcba9876543210"
    bad = [
        b"+ %s %s 1 \x1b[2Jx lobby" % (skeleton(b"\x1b[2Jx"), other),  # a name out of shape
        b"+ %s %s 1 ivan lobby" % (skeleton(b"notivan"), other),  # filed under another name
        b"+ %s %s x ivan lobby" % (skeleton(b"ivan"), other),  # no time
        b"+ %s nothex 1 ivan lobby" % skeleton(b"ivan"),
        b"+ %s %s 1 ivan lob\x07by" % (skeleton(b"ivan"), other),  # a room out of shape
        b"garbage",
    ]
    cluster.redis.publish("fsmchat:fsmchat:presence", b"%d\n" % rev + b"\n".join(bad))
    cluster.redis.publish("fsmchat:fsmchat:presence", b"no revision\n+ x y")
    good = b"+ %s %s 1 judy lobby" % (skeleton(b"judy"), other)
    cluster.redis.publish("fsmchat:fsmchat:presence", b"%d\n%s" % (rev + 1, good))
    cluster.until(lambda: a.presence.elsewhere(b"judy") == b"judy", "the good line taken in")
    assert [name for name, _ in a.presence.everyone()] == [b"judy"]


def test_a_gap_in_the_revisions_heals_the_view_from_a_full_read(cluster: Cluster) -> None:
    a = cluster.node()
    linked(cluster, a)
    cluster.until(lambda: a.presence.rev >= 0, "A's first full read")
    redis = cluster.redis
    other = b"fedcba9876543210"
    redis.command("SET", b"fsmchat:fsmchat:alive:" + other, "1", "PX", "60000")
    redis.command("HSET", "fsmchat:fsmchat:names", skeleton(b"kim"),
                  b"%s 1 kim lobby" % other)  # announced in a message A misses
    rev = redis.command("INCR", "fsmchat:fsmchat:rev")
    assert isinstance(rev, int)
    redis.command("INCR", "fsmchat:fsmchat:rev")
    redis.publish("fsmchat:fsmchat:presence", b"%d\n- nobody %s" % (rev + 1, other))
    cluster.until(lambda: a.presence.elsewhere(b"kim") == b"kim", "kim read in full")


def test_the_bus_says_once_when_the_links_are_lost_and_once_when_all_are_back(
        cluster: Cluster) -> None:
    a = cluster.node()
    told: list[bool] = []
    a.bus.on_links = told.append
    linked(cluster, a)
    assert told == []
    cluster.redis.kill()
    cluster.until(lambda: all(link.attempts >= 3 for link in a.bus.links), "retries")
    assert told == [False], "one notice however many retries"
    cluster.redis.start()
    linked(cluster, a)
    assert told == [False, True]


@pytest.mark.parametrize(("payload", "marked"), [
    (b"<bob> hi\n", b"(delayed 00:01) <bob> hi\n"),
    (b"<bob> a\n\n* bob b\n", b"(delayed 00:01) <bob> a\n\n(delayed 00:01) * bob b\n"),
    (b"#kitchen\n<bob> hi\n", b"#kitchen\n(delayed 00:01) <bob> hi\n"),
    (b"@alice\n* bob: psst\n", b"@alice\n(delayed 00:01) * bob: psst\n"),
    (b"no newline", b"(delayed 00:01) no newline"),
])
def test_a_delayed_message_is_marked_line_by_line_after_its_address(
        payload: bytes, marked: bytes) -> None:
    assert delayed(payload, 61_000) == marked


def test_a_delayed_message_is_marked_in_the_chats_time_zone() -> None:
    assert delayed(b"<bob> hi\n", 61_000, ZoneInfo("Asia/Kolkata")) == (
        b"(delayed 05:31) <bob> hi\n")


def test_a_late_message_that_does_not_say_when_is_marked_without_a_time() -> None:
    assert delayed(b"<bob> hi\n", None) == b"(delayed) <bob> hi\n"


# --------------------------------------------------------------------------
# Black-box: what people hear
# --------------------------------------------------------------------------


def start_chat(start_server: StartServer, redis: RedisServer, *extra: str) -> ServerProcess:
    """A chat-mode instance whose three links (publish, subscribe, presence) are ready."""
    server = start_server("--redis", redis.url, "--mode", "chat", "--presence-ttl", str(TTL),
                          *extra)
    for link in ("publish", "subscribe", "presence"):
        server.wait_event("redis.connected", link=link)
    return server


def gather(*where: ServerProcess) -> list[Person]:
    """A person on each of ``where``, one at a time: each comes once the last one's join
    notice reached every instance, and everyone before hears it (nobody hears an older one)."""
    servers = list(dict.fromkeys(where))
    people: list[Person] = []
    for server in where:
        heard = {other: len(other.events("redis.received")) for other in servers}
        person = Person(server)
        for other in servers:
            if other is not server:
                wait_event_count(other, "redis.received", heard[other] + 1)
        for before in people:
            assert before.line() == b"*** %s joined lobby" % person.name
        people.append(person)
    return people


def answer(person: Person, line: bytes) -> bytes:
    """What ``person`` is answered when they type ``line`` (a command that answers in one line)."""
    person.say(line)
    return person.line()


def until_who(person: Person, expected: bytes, timeout: float = WAIT) -> float:
    """Ask /who until the answer is ``expected`` (the view comes through Redis); the seconds it
    took. Each question waits for its answer: no sleeps."""
    started = time.monotonic()
    while (said := answer(person, b"/who")) != expected:
        assert time.monotonic() - started < timeout, f"/who still says {said!r}"
    return time.monotonic() - started


def test_a_name_held_on_one_instance_is_refused_on_the_other_with_a_clear_line(
        start_server: StartServer, redis_server: RedisServer) -> None:
    a = start_chat(start_server, redis_server)
    b = start_chat(start_server, redis_server)
    alice, bob = gather(a, b)
    assert answer(alice, b"/nick alice") == b"*** you are now alice"
    assert bob.line() == b"*** %s is now alice" % alice.name
    until_who(bob, b"*** 2 in lobby: alice, %s" % bob.name)
    assert answer(bob, b"/nick alice") == b"*** nick: alice is taken (on another server)"
    assert answer(bob, b"/nick ALlCE") == (
        b"*** nick: ALlCE looks too much like alice, who is on another server")
    assert answer(bob, b"/who") == b"*** 2 in lobby: alice, %s" % bob.name, "bob kept his name"
    assert answer(alice, b"/who") == b"*** 2 in lobby: alice, %s" % bob.name
    assert answer(bob, b"/msg alice psst") == b"-> *alice* psst"
    assert alice.line() == b"*%s* psst" % bob.name, "found on the other instance"
    assert answer(bob, b"/msg zed hi") == b"*** msg: nobody here is called zed"


def test_two_asking_for_one_name_at_once_on_two_instances_get_one_owner(
        start_server: StartServer, redis_server: RedisServer) -> None:
    a = start_chat(start_server, redis_server)
    b = start_chat(start_server, redis_server)
    ann, bea = gather(a, b)
    go_apart(ann, bea)
    until_who(ann, b"*** 1 in north: %s" % ann.name)
    ann.say(b"/nick carol")
    bea.say(b"/nick carol")
    answers = [ann.line(), bea.line()]
    won = b"*** you are now carol"
    assert answers.count(won) == 1, answers
    [refused] = [line for line in answers if line != won]
    assert refused in (b"*** nick: carol was just taken on another server",
                       b"*** nick: carol is taken (on another server)"), refused
    loser = bea if answers[0] == won else ann
    assert answer(loser, b"/nick carol") == b"*** nick: carol is taken (on another server)"
    assert len(a.events("chat.nick")) + len(b.events("chat.nick")) == 1


def go_apart(ann: Person, bea: Person) -> None:
    """ann to north, bea to south, where each hears only what is said to them."""
    assert answer(ann, b"/join north") == b"*** you are now in north"
    assert bea.line() == b"*** %s left lobby" % ann.name
    assert answer(bea, b"/join south") == b"*** you are now in south"


def lines(person: Person, count: int) -> list[bytes]:
    got: list[bytes] = []
    try:
        for _ in range(count):
            got.append(person.line())
    except AssertionError as exc:
        raise AssertionError(f"{count} lines awaited, got {got}") from exc
    return got


def test_the_names_of_a_killed_instance_are_freed_within_the_ttl(
        start_server: StartServer, redis_server: RedisServer) -> None:
    a = start_chat(start_server, redis_server)
    b = start_chat(start_server, redis_server)
    alice, bob = gather(a, b)
    assert answer(alice, b"/nick alice") == b"*** you are now alice"
    assert bob.line() == b"*** %s is now alice" % alice.name
    until_who(bob, b"*** 2 in lobby: alice, %s" % bob.name)
    assert answer(bob, b"/nick alice") == b"*** nick: alice is taken (on another server)"
    a.send_signal(signal.SIGKILL)  # no clean stop: its names stay until its key expires
    a.wait_exit()
    took = until_who(bob, b"*** 1 in lobby: %s" % bob.name, timeout=TTL * 4 / 3 + WAIT)
    assert took <= TTL * 4 / 3 + 1.0, f"freed after {took:.2f} s; the bound is 4/3 of the TTL"
    assert answer(bob, b"/nick alice") == b"*** you are now alice"
    assert b.events("presence.freed")


def test_who_and_rooms_count_everyone_on_every_instance(
        start_server: StartServer, redis_server: RedisServer) -> None:
    a = start_chat(start_server, redis_server)
    b = start_chat(start_server, redis_server)
    people = ann, amy, bob = gather(a, a, b)
    for person, name in zip(people, (b"ann", b"amy", b"bob"), strict=True):
        old = person.name
        assert answer(person, b"/nick " + name) == b"*** you are now " + name
        for other in people:
            if other is not person:
                assert other.line() == b"*** %s is now %s" % (old, name)
    assert answer(amy, b"/join Math") == b"*** you are now in Math"
    assert lines(ann, 1) == lines(bob, 1) == [b"*** amy left lobby"]
    assert answer(bob, b"/join math") == b"*** you are now in math"
    assert lines(ann, 1) == [b"*** bob left lobby"]
    assert lines(amy, 1) == [b"*** bob joined math"], "Math is math: one room"
    until_who(bob, b"*** 2 in math: amy, bob")
    until_who(amy, b"*** 2 in Math: amy, bob")  # (bob's move reaches a's view on its own path,
    # not with the notice: the notice may come first)
    assert answer(ann, b"/who") == b"*** 1 in lobby: ann"
    assert answer(ann, b"/rooms") == b"*** 2 rooms: lobby (1), Math (2)"
    assert answer(bob, b"/rooms") == b"*** 2 rooms: lobby (1), math (2)"
    assert answer(bob, b"/part") == b"*** you are now in lobby"
    assert lines(amy, 1) == [b"*** bob left math"]
    assert lines(ann, 1) == [b"*** bob joined lobby"]
    until_who(ann, b"*** 2 in lobby: ann, bob")
    bob.client.sock.close()
    assert lines(ann, 1) == [b"*** bob left lobby"]
    until_who(ann, b"*** 1 in lobby: ann")
    assert answer(ann, b"/rooms") == b"*** 2 rooms: lobby (1), Math (1)"


def test_a_name_given_on_two_instances_during_an_outage_stays_with_the_earlier(
        start_server: StartServer, redis_factory: Callable[..., RedisServer]) -> None:
    redis = redis_factory()
    a = start_chat(start_server, redis)
    b = start_chat(start_server, redis)
    ann, bea = gather(a, b)
    go_apart(ann, bea)
    until_who(ann, b"*** 1 in north: %s" % ann.name)
    redis.kill()
    assert ann.line() == UNREACHABLE.rstrip(b"\n")
    assert bea.line() == UNREACHABLE.rstrip(b"\n")
    assert answer(ann, b"/nick dave") == b"*** you are now dave", "nobody to ask: granted"
    assert answer(bea, b"/nick Dave") == b"*** you are now Dave", "... here too, later"
    redis.start()
    assert ann.line() == RECONNECTED.rstrip(b"\n")
    told = lines(bea, 3)  # the notice, and the rename (as Redis answers: in either order)
    assert RECONNECTED.rstrip(b"\n") in told, told
    told.remove(RECONNECTED.rstrip(b"\n"))
    assert told[0] == b"*** Dave was taken earlier on another server", told
    new = told[1].removeprefix(b"*** you are now ")
    assert new != told[1] and new.startswith(b"user") and new.endswith(bea.name[-5:]), told
    assert answer(bea, b"/nick dave") == b"*** nick: dave is taken (on another server)"
    assert answer(bea, b"/who") == b"*** 1 in south: %s" % new
    [lost] = b.events("presence.lost")
    assert lost["name"] == "Dave" and lost["holder"] == "dave"
    assert lost["instance"] == a.events("server.started")[0]["instance"]
    assert not a.events("presence.lost")


def test_an_outage_is_told_once_with_the_late_lines_marked_and_the_return_told(
        start_server: StartServer, redis_factory: Callable[..., RedisServer]) -> None:
    redis = redis_factory()
    a = start_instance(start_server, redis, "--mode", "chat")
    b = start_instance(start_server, redis, "--mode", "chat")
    bob = Person(b)
    a.wait_event("redis.received")  # bob's join reached A before alice came: not hers to see
    alice = Person(a)
    assert bob.line() == b"*** %s joined lobby" % alice.name
    retries = len(a.events("redis.retrying"))
    redis.kill()
    assert alice.line() == UNREACHABLE.rstrip(b"\n")
    assert bob.line() == UNREACHABLE.rstrip(b"\n")
    wait_event_count(a, "redis.retrying", retries + 6)  # retries go on: no more notices
    before = time.time()
    send_message(a, alice.client, b"anyone there?\n")  # read before carol comes
    carol = Person(a)  # a newcomer during the outage is told too
    assert carol.line() == UNREACHABLE.rstrip(b"\n")
    assert alice.line() == b"*** %s joined lobby" % carol.name
    after = time.time()
    redis.start()
    assert alice.line() == RECONNECTED.rstrip(b"\n")
    assert carol.line() == RECONNECTED.rstrip(b"\n")
    seen = [bob.line() for _ in range(3)]
    assert RECONNECTED.rstrip(b"\n") in seen, seen
    late = [line for line in seen if line != RECONNECTED.rstrip(b"\n")]
    stamps = {time.strftime("%H:%M", time.gmtime(t)).encode() for t in (before, after)}
    assert late[0][16:] == b"<%s> anyone there?" % alice.name, late
    assert late[1][16:] == b"*** %s joined lobby" % carol.name, late
    assert all(line[:9] == b"(delayed " and line[9:14] in stamps and line[14:16] == b") "
               for line in late), late
    alice.say(b"back")
    assert bob.line() == b"<%s> back" % alice.name, "on time again: no mark"
    assert len(a.events("redis.disconnected")) == 4, "one per link"
