"""Chat mode across instances: names travel with the lines, history keeps them, the channel is
cleaned like a client.

Real ``redis-server`` and real fsmchat processes in ``--mode chat``, as in test_redis.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from chat_harness import check_replay
from conftest import ServerProcess, StartServer, recv_until, recv_until_suffix
from redis_harness import RedisServer, bug_free
from test_redis import start_instance

pytest_plugins = ["redis_harness"]


@pytest.fixture
def start_server(start_server: StartServer) -> Iterator[StartServer]:
    yield from bug_free(start_server)


class Person:
    """A chat-mode client read line by line."""

    def __init__(self, server: ServerProcess) -> None:
        self.client = server.connect()
        self.buffer = b""
        welcome = self.line()
        self.name = welcome.split(b"you are ", 1)[1].split(b" ", 1)[0]

    def say(self, text: bytes) -> None:
        self.client.sock.sendall(text + b"\n")

    def line(self) -> bytes:
        if b"\n" not in self.buffer:
            self.buffer += recv_until(self.client.sock, lambda buf: b"\n" in buf, "a line")
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line


def test_lines_from_other_instances_carry_their_senders_name_and_enter_history(
        start_server: StartServer, redis_server: RedisServer) -> None:
    a = start_instance(start_server, redis_server, "--mode", "chat")
    b = start_instance(start_server, redis_server, "--mode", "chat", "--history", "10")
    b.wait_event("redis.synced")  # B read the shared history: what comes now comes live
    alice = Person(a)
    b.wait_event("redis.received")  # A's join notice is in B's history before bob comes
    bob = Person(b)
    # B's history: A's join came through Redis.
    check_replay(lambda: bob.line() + b"\n", [b"*** %s joined lobby\n" % alice.name])
    assert alice.name != bob.name  # both are the first on their instance: told apart
    assert alice.line() == b"*** %s joined lobby" % bob.name

    alice.say(b"/nick alice")
    assert alice.line() == b"*** you are now alice"
    assert bob.line() == b"*** %s is now alice" % alice.name
    alice.say(b"hello \x1b[31mbob")
    assert bob.line() == b"<alice> hello ^[[31mbob"
    bob.say(b"/me waves")
    assert alice.line() == b"* %s waves" % bob.name

    carol = Person(b)  # B's history, with what came from A, in order, then live
    expected = [b"*** %s joined lobby" % alice.name, b"*** %s joined lobby" % bob.name,
                b"*** %s is now alice" % alice.name, b"<alice> hello ^[[31mbob",
                b"* %s waves" % bob.name]
    check_replay(lambda: carol.line() + b"\n", [line + b"\n" for line in expected])
    assert alice.line() == b"*** %s joined lobby" % carol.name
    alice.say(b"welcome carol")
    assert carol.line() == b"<alice> welcome carol"


def test_a_foreign_publish_is_cleaned_and_ends_in_a_newline(
        start_server: StartServer, redis_server: RedisServer) -> None:
    server = start_instance(start_server, redis_server, "--mode", "chat")
    person = Person(server)
    redis_server.publish("fsmchat", b"\x1b]0;owned\x07maintenance at 5")
    assert person.line() == b"^[]0;owned^Gmaintenance at 5"


def test_a_payload_whose_cleaning_would_overflow_a_queue_is_dropped(
        start_server: StartServer, redis_server: RedisServer) -> None:
    """Cleaning makes three bytes (U+FFFD) of a bad one: under the limit as published, over it
    as queued, such a payload would close every client for queue_limit."""
    limit = 1024 * 1024
    server = start_instance(start_server, redis_server, "--mode", "chat",
                            "--max-queue-bytes", "1M")
    alice, bob = Person(server), Person(server)
    assert alice.line() == b"*** %s joined lobby" % bob.name
    payload = b"\xff" * (limit // 2)
    assert redis_server.publish("fsmchat", payload) == 1
    oversize = server.wait_event("redis.oversize")
    assert oversize["bytes"] == len(payload) and oversize["level"] == "warning", oversize
    alice.say(b"still here")
    assert bob.line() == b"<%s> still here" % alice.name
    assert not server.events("connection.queue_limit")


def test_a_payload_as_big_as_a_queue_reaches_a_reader_that_keeps_up_in_cut_lines(
        start_server: StartServer, redis_server: RedisServer) -> None:
    """Cleaned, a payload may be four times what was published (a soft hyphen, two bytes, is
    shown as ``<U+00AD>``), or just the queue limit (0x80, one byte, as U+FFFD): it goes out cut
    like a client's long line, in entries flow control sees, and nobody is closed for it."""
    server = start_instance(start_server, redis_server, "--mode", "chat")
    started = server.events("server.started")[0]
    limit = started["max_queue_bytes"]
    bob = Person(server)
    hyphens = (b"\xc2\xad" * 50 + b"\n") * (limit // 3 // 101)  # many short lines
    bad = b"\x80" * (limit // 3)  # one long line, under the bus's payload limit
    shown_hyphens = ("\u00ad".encode(), b"<U+00AD>")
    for payload in (hyphens, bad, bad):  # the second comes while the first is queued
        assert redis_server.publish("fsmchat", payload) == 1
    redis_server.publish("fsmchat", b"that was all")
    data = recv_until_suffix(bob.client.sock, b"\nthat was all\n", timeout=60)
    lines = data.split(b"\n")[:-2]
    hyphen_lines = len(hyphens.split(b"\n")) - 1
    assert lines[:hyphen_lines] == [hyphens.split(b"\n")[0].replace(*shown_hyphens)] * (
        hyphen_lines)
    rest = lines[hyphen_lines:]
    shown_bad = "\ufffd".encode() * len(bad)
    assert b"".join(rest) == shown_bad + shown_bad
    max_line = 4096  # the default --max-line: a cut piece is at most that, cleaned
    assert all(0 < len(line) <= 3 * max_line for line in rest), max(map(len, rest))
    assert len(rest) > 2  # cut: not one line per payload
    alice = Person(server)
    assert bob.line() == b"*** %s joined lobby" % alice.name
    alice.say(b"still here")
    assert bob.line() == b"<%s> still here" % alice.name
    assert not server.events("connection.queue_limit")
    assert server.events("chat.line_cut")
