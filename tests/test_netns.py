"""The chat across machines: instances in namespaces of their own, Redis in a third, clients in a
fourth (tests/netns_harness.py), so every line crosses a network and an outage is a cable out.
"""

from __future__ import annotations

from chat_harness import join
from conftest import WAIT, wait_event_count
from netns_harness import FRONT, Hosts
from test_redis import on_link, wait_links
from test_redis_chat import Person
from test_streams import (
    CHAT,
    KEEP_NAMES,
    Witness,
    joined,
    late,
    replay,
    said,
    talk,
    until,
    wait_ready,
)

from fsmchat.redis.bus import PING_IDLE
from fsmchat.redis.link import ANSWER_TIMEOUT
from fsmchat.redis.presence import RECONNECTED, UNREACHABLE

pytest_plugins = ["netns_harness"]


def test_lines_cross_the_network_both_ways_and_the_chat_on_b_resumes_after_its_link_is_cut(
        hosts: Hosts) -> None:
    # B's names must outlive its outage on A (detecting it takes its ping and answer timeout):
    # this test is about the link, not about a vanished instance's names.
    chat = ("--mode", "chat", "--presence-ttl", "60")
    a = hosts.start_instance("a", *chat)
    b = hosts.start_instance("b", *chat)
    for server in (a, b):
        for link in wait_links(server):
            assert link["address"] == hosts.redis.address, link  # Redis's namespace, not ours
    bob = Person(b)
    a.wait_event("redis.received")  # bob's join reached A before alice came: not hers to see
    alice = Person(a)
    for person in (alice, bob):  # each came from the clients' namespace, as its server saw
        assert person.client.peer.split(":")[0] == FRONT["c"], person.client.peer
    assert bob.line() == b"*** %s joined lobby" % alice.name

    alice.say(b"hello from a")
    assert bob.line() == b"<%s> hello from a" % alice.name
    bob.say(b"hello from b")
    assert alice.line() == b"<%s> hello from b" % bob.name

    hosts.cut("b")
    assert bob.line() == UNREACHABLE.rstrip(b"\n")
    assert not a.events("redis.disconnected"), "A's link to Redis is not B's"
    b.wait_event("redis.disconnected")  # its line may reach stdout after bob's notice
    lost = b.events("redis.disconnected")
    assert all(e["address"] == hosts.redis.address for e in lost), lost
    hosts.restore("b")
    assert bob.line() == RECONNECTED.rstrip(b"\n")

    alice.say(b"still there?")
    assert bob.line() == b"<%s> still there?" % alice.name
    bob.say(b"back again")
    assert alice.line() == b"<%s> back again" % bob.name


def test_an_instance_whose_cable_was_out_gets_every_line_said_meanwhile_in_order_once(
        hosts: Hosts) -> None:
    """Issue 17's recovery across machines: no RST tells B of the cut, its links find out by
    their own timeouts, and what A's client said meanwhile comes from the stream."""
    chat = (*CHAT, *KEEP_NAMES)
    a = hosts.start_instance("a", *chat)
    b = hosts.start_instance("b", *chat)
    for server in (a, b):
        wait_ready(server)
    witness = Witness(hosts.redis.dial(hosts.redis.host, hosts.redis.port))
    try:
        bob = join(b)
        a.wait_event("redis.received")  # bob's join reached A before alice came
        alice = join(a)
        assert replay(alice) == [joined(bob.name)]
        bob.expect(joined(alice.name))

        hosts.cut("b")
        # The subscriber's ping after PING_IDLE, unanswered for ANSWER_TIMEOUT.
        assert bob.line(timeout=PING_IDLE + ANSWER_TIMEOUT + WAIT) == UNREACHABLE
        # ... and the subscriber itself is down: what A says now reaches B by the stream only.
        wait_event_count(b, "redis.disconnected", 1, PING_IDLE + ANSWER_TIMEOUT + WAIT,
                         on_link("subscribe"))
        gap = [f"while b was away {i}" for i in range(10)]
        talk(a, alice, gap)
        witness.said(gap[-1].encode())
        hosts.restore("b")
        # Only the links that noticed the cut come back: the subscriber always does.
        wait_ready(b, 2, timeout=3 * WAIT, links=("subscribe",))
        talk(a, alice, ["b is back"])
        got = until(bob, said(alice, "b is back"))
        assert got.count(RECONNECTED) == 1, got
        got.remove(RECONNECTED)
        assert [late(line) for line in got[:-1]] == [said(alice, text) for text in gap], got
        bob.say("hello again")
        alice.expect(said(bob, "hello again"))
    finally:
        witness.close()
