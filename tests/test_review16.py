"""Issue 16 as people use it, found by a review: each test is one defect seen on real servers.

Black-box: real fsmchat processes in chat mode on a real Redis, nc-like sockets.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from chat_harness import Chatter, join
from conftest import StartServer
from redis_harness import RedisServer, bug_free
from test_redis import start_instance

from fsmchat.chat.accounts import make_hash

pytest_plugins = ["redis_harness"]

PASSWORD = "wonder land"


@pytest.fixture
def start_server(start_server: StartServer) -> Iterator[StartServer]:
    yield from bug_free(start_server)


@pytest.fixture
def accounts(tmp_path: Path) -> Path:
    path = tmp_path / "accounts"
    path.write_text(f"alice:{make_hash(PASSWORD)}\n")
    return path


def settle(sender: Chatter, reader: Chatter) -> None:
    """``reader`` has had the bus's notices of ``sender``'s instance so far (a line of the
    sender's is behind them; the sender's own join notice may come before it)."""
    sender.say("hi")
    line = reader.line()
    if line == f"*** {sender.name} joined lobby\n".encode():
        line = reader.line()
    assert line == f"<{sender.name}> hi\n".encode(), line


def test_a_name_left_for_a_login_that_lost_across_instances_is_freed_everywhere(
        start_server: StartServer, redis_server: RedisServer, accounts: Path) -> None:
    """bob, logged in as alice on instance B while alice already is on A, loses the name and is
    renamed: his name from before the login must not stay in A's view, listed by /who and
    "reached" by /msg though nobody holds it."""
    extra = ("--mode", "chat", "--accounts", str(accounts))
    one = start_instance(start_server, redis_server, *extra)
    two = start_instance(start_server, redis_server, *extra)
    bob = join(two)
    alice = join(one, bob)
    settle(bob, alice)
    old = bob.name
    alice.say(f"/login alice {PASSWORD}")
    alice.expect("*** logged in as alice\n", "*** you are now alice\n")
    bob.expect(f"*** {alice.name} is now alice\n")
    bob.say(f"/login alice {PASSWORD}")
    bob.expect("*** logged in as alice\n", "*** you are now alice\n",
               "*** alice was taken earlier on another server\n")
    renamed = bob.line()
    assert renamed.startswith(b"*** you are now "), renamed
    new = renamed.removeprefix(b"*** you are now ").rstrip(b"\n").decode()
    alice.expect(f"*** {old} is now alice\n", f"*** alice is now {new}\n")
    alice.say(f"/msg {old} anyone there?")
    alice.expect(f"*** msg: nobody here is called {old}\n")
    alice.say("/who")
    alice.expect(f"*** 2 in lobby: {', '.join(sorted(['alice', new]))}\n")


def test_a_login_that_lost_the_name_across_instances_gives_no_operators_rights(
        start_server: StartServer, redis_server: RedisServer, tmp_path: Path) -> None:
    """On one instance a second login as an account takes it from the first connection, which
    is an operator no more; across instances the later login loses the name and must lose the
    account with it, or it kicks and sets topics under a generated name nobody can trace."""
    accounts = tmp_path / "ops"
    accounts.write_text(f"olga:{make_hash(PASSWORD)}:op\n")
    extra = ("--mode", "chat", "--accounts", str(accounts))
    one = start_instance(start_server, redis_server, *extra)
    two = start_instance(start_server, redis_server, *extra)
    bob = join(two)
    olga = join(one, bob)
    settle(bob, olga)
    olga.say(f"/login olga {PASSWORD}")
    olga.expect("*** logged in as olga, an operator\n", "*** you are now olga\n")
    bob.expect(f"*** {olga.name} is now olga\n")
    bob.say(f"/login olga {PASSWORD}")
    bob.expect("*** logged in as olga, an operator\n", "*** you are now olga\n",
               "*** olga was taken earlier on another server\n")
    assert bob.line().startswith(b"*** you are now "), "not renamed"
    bob.say("/topic set by whom?")
    bob.expect("*** topic: only operators set the topic\n")
