"""The chat across machines: instances in namespaces of their own, Redis in a third, clients in a
fourth (tests/netns_harness.py), so every line crosses a network and an outage is a cable out.
"""

from __future__ import annotations

from netns_harness import FRONT, Hosts
from test_redis import wait_links
from test_redis_chat import Person

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
    lost = b.events("redis.disconnected")
    assert lost and all(e["address"] == hosts.redis.address for e in lost), lost
    hosts.restore("b")
    assert bob.line() == RECONNECTED.rstrip(b"\n")

    alice.say(b"still there?")
    assert bob.line() == b"<%s> still there?" % alice.name
    bob.say(b"back again")
    assert alice.line() == b"<%s> back again" % bob.name
